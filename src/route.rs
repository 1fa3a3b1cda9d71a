//! A route: one listener forwarding to one upstream broker, with its metrics, the reachability of
//! its upstream and what its Will observer watches.

use crate::metrics::RouteMetrics;
use crate::transport::Transport;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

/// A named listener → upstream pair.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// The address actually bound (port 0 resolved).
    pub listen: SocketAddr,
    /// `host:port`, resolved at every dial so DNS changes are followed.
    pub upstream: String,
    /// Everything measured on the route.
    pub metrics: RouteMetrics,
    /// What the last dial of `upstream` gave (`/readyz`, and the log of failures).
    pub reach: Reach,
    /// What the route's Will observer watches now (`--observe-wills`).
    pub observer: ObserverView,
    /// TLS of the listener and of the upstream, where their addresses are `mqtts://`/`wss://`.
    pub tls: crate::tls::RouteTls,
    /// WebSocket paths of the listener and of the upstream, where they are `ws://`/`wss://`.
    pub listen_ws: Option<String>,
    pub upstream_ws: Option<String>,
}

impl Route {
    /// The transports of the listener and of the upstream, as their addresses' schemes say.
    pub fn transports(&self) -> (Transport, Transport) {
        let of = |tls: bool, ws: bool| match (tls, ws) {
            (false, false) => Transport::Tcp,
            (true, false) => Transport::Tls,
            (false, true) => Transport::Ws,
            (true, true) => Transport::Wss,
        };
        (
            of(self.tls.listen.is_some(), self.listen_ws.is_some()),
            of(self.tls.upstream.is_some(), self.upstream_ws.is_some()),
        )
    }
}

#[cfg(test)]
impl Route {
    /// A route for unit tests: nothing listens on it and nothing is dialled.
    pub(crate) fn for_test(name: &str) -> std::sync::Arc<Route> {
        let metrics = crate::metrics::Metrics::new(Default::default).route(name);
        std::sync::Arc::new(Route {
            name: name.into(),
            listen: "127.0.0.1:1".parse().expect("a literal address"),
            upstream: "127.0.0.1:2".into(),
            metrics,
            reach: Default::default(),
            observer: Default::default(),
            tls: Default::default(),
            listen_ws: None,
            upstream_ws: None,
        })
    }
}

/// The Will topics the route's observer (`--observe-wills`) is subscribed to while it is
/// connected: the observer keeps it, the monitor asks it whether a Will could have been seen.
#[derive(Debug, Default)]
pub struct ObserverView(Mutex<Option<std::collections::HashSet<String>>>);

impl ObserverView {
    fn lock(&self) -> MutexGuard<'_, Option<std::collections::HashSet<String>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The observer (re)connected and subscribed to `topics`.
    pub fn connected(&self, topics: impl IntoIterator<Item = String>) {
        *self.lock() = Some(topics.into_iter().collect());
    }

    pub fn disconnected(&self) {
        *self.lock() = None;
    }

    /// The observer subscribed to one more topic (ignored while it is disconnected).
    pub fn subscribed(&self, topic: &str) {
        if let Some(topics) = self.lock().as_mut() {
            topics.insert(topic.to_string());
        }
    }

    /// The observer unsubscribed from a topic nothing watches any more.
    pub fn unsubscribed(&self, topic: &str) {
        if let Some(topics) = self.lock().as_mut() {
            topics.remove(topic);
        }
    }

    /// Whether the observer is connected and subscribed to `topic`.
    pub fn watches(&self, topic: &str) -> bool {
        self.lock().as_ref().is_some_and(|t| t.contains(topic))
    }
}

/// The upstream's reachability as the last dial saw it. Failures are logged once per interval
/// with the number held back, so clients retrying against a broker that is down do not flood the
/// log; the first success after failures is logged too.
#[derive(Debug)]
pub struct Reach(Mutex<ReachState>);

#[derive(Debug)]
struct ReachState {
    last: Option<Result<(), String>>,
    log: crate::server::Throttle,
}

impl Default for Reach {
    fn default() -> Self {
        Reach(Mutex::new(ReachState {
            last: None,
            log: crate::server::Throttle::new(std::time::Duration::from_secs(10)),
        }))
    }
}

/// What to log about a dial.
#[derive(Debug, PartialEq, Eq)]
pub enum ReachLog {
    Nothing,
    /// A failure to log, with the failures held back since the last line.
    Failed {
        held_back: u64,
    },
    /// The first success after failures.
    Back,
}

impl Reach {
    fn lock(&self) -> MutexGuard<'_, ReachState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a dial's outcome and says what to log.
    pub fn dialed(&self, result: Result<(), String>, now: tokio::time::Instant) -> ReachLog {
        let mut s = self.lock();
        let was_failing = matches!(s.last, Some(Err(_)));
        let log = match &result {
            Ok(()) if was_failing => ReachLog::Back,
            Ok(()) => ReachLog::Nothing,
            Err(_) => s.log.hit(now).map_or(ReachLog::Nothing, |held_back| ReachLog::Failed { held_back }),
        };
        s.last = Some(result);
        log
    }

    /// Whether the last dial succeeded (`None` before the first).
    pub fn reachable(&self) -> Option<bool> {
        self.lock().last.as_ref().map(Result::is_ok)
    }

    /// The error of the last dial, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last.as_ref().and_then(|r| r.as_ref().err().cloned())
    }
}
