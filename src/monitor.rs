//! Turning record events into measurements: how long each side took to notice a dead peer,
//! whether Wills arrived, what takeovers did.
//!
//! One task per proxy follows the [`Registry`]'s events:
//!
//! - **CONNECT**: the requested Keep Alive is observed; a client id already live on the same
//!   route makes the older connection a *takeover* victim, watched for 5 s.
//! - **Closed**: the close is counted by who and how. A broker-initiated close of a connection
//!   with a Keep Alive above 0 that was not a takeover victim is a *broker detection* (silence since the
//!   last packet delivered to the broker, and its multiple of the Keep Alive the broker enforces);
//!   a client-initiated close without DISCONNECT is a *client detection*. A connection with a
//!   Will that ended without a normal DISCONNECT expects its Will within the Will Delay Interval
//!   plus `--will-timeout`.
//! - **PUBLISH** on a Will topic flowing to any client through the proxy: an expected Will is
//!   observed (also one published moments before the proxy saw the close: the broker publishes
//!   at the close, on another socket).

use crate::record::{CloseHow, Connection, Event, Registry, Side, TopicWatch};
use crate::route::Route;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long after a takeover CONNECT the old connection may stay open before the broker is
/// said not to enforce takeovers.
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(5);
/// How long a Will-topic PUBLISH is remembered, to match a close the proxy sees after it.
const EARLY_WILL: Duration = Duration::from_secs(2);
/// How many such PUBLISHes are remembered at most (the oldest go first).
const MAX_RECENT: usize = 10_000;

struct ExpectedWill {
    route: Arc<Route>,
    conn_id: u64,
    /// Keeps the topic watched until the Will is settled (dropped with this).
    watch: Arc<TopicWatch>,
    closed_at: Instant,
    deadline: Instant,
}

impl ExpectedWill {
    fn topic(&self) -> &str {
        self.watch.topic()
    }
}

struct Takeover {
    route: Arc<Route>,
    at: Instant,
}

struct Monitor {
    registry: Arc<Registry>,
    will_timeout: Duration,
    /// Live connections by (route, client id).
    by_client: HashMap<(String, String), Vec<u64>>,
    /// The key each live connection was filed under in `by_client` (its client id may change
    /// later: a CONNACK can assign one).
    keys: HashMap<u64, (String, String)>,
    /// Old connection id → the takeover that made it a victim.
    takeovers: HashMap<u64, Takeover>,
    wills: Vec<ExpectedWill>,
    /// Recent PUBLISHes on watched topics: (topic, when).
    recent: VecDeque<(String, Instant)>,
}

/// Runs the monitor until `stop`.
pub async fn run(registry: Arc<Registry>, will_timeout: Duration, stop: CancellationToken) {
    let mut events = registry.subscribe();
    let mut m = Monitor {
        registry,
        will_timeout,
        by_client: HashMap::new(),
        keys: HashMap::new(),
        takeovers: HashMap::new(),
        wills: Vec::new(),
        recent: VecDeque::new(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => m.expire(Instant::now()),
            ev = events.recv() => match ev {
                Ok(ev) => m.handle(ev),
                Err(RecvError::Lagged(n)) => {
                    warn!(missed = n, "the monitor fell behind; some measurements are lost");
                    m.forget_closed();
                }
                Err(RecvError::Closed) => return,
            },
        }
        m.publish_sizes();
    }
}

impl Monitor {
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Connect(conn) => self.on_connect(&conn),
            Event::Connack(_)
            | Event::Fault { .. }
            | Event::Rules { .. }
            | Event::Detection { .. }
            | Event::Will { .. } => {}
            Event::Publish { topic, at, retain: false, .. } => self.on_will_topic_publish(topic, at, None),
            Event::Publish { .. } => {} // retained: delivered because of a subscription, not a Will firing
            Event::WillTopicPublish { route, topic, at } => {
                self.on_will_topic_publish(topic, at, Some(route))
            }
            Event::Closed(conn) => self.on_closed(&conn),
        }
    }

    fn on_connect(&mut self, conn: &Arc<Connection>) {
        let stats = &conn.route.stats;
        if let Some(ka) = conn.keep_alive().requested {
            stats.keepalive_requested.observe(f64::from(ka));
        }
        let Some(client_id) = conn.client_id().filter(|id| !id.is_empty()) else { return };
        if self.keys.contains_key(&conn.id) || self.registry.get(conn.id).is_none() {
            return; // filed already, or closed before we got here: nothing to take over
        }
        let key = (conn.route.name.clone(), client_id);
        let live = self.by_client.entry(key.clone()).or_default();
        for &old in live.iter() {
            debug!(conn = conn.id, old, client_id = %key.1, "takeover: the client id is already connected");
            self.takeovers.insert(old, Takeover { route: conn.route.clone(), at: Instant::now() });
        }
        live.push(conn.id);
        self.keys.insert(conn.id, key);
    }

    /// Removes a connection from the client-id index.
    fn unfile(&mut self, id: u64) {
        let Some(key) = self.keys.remove(&id) else { return };
        if let Some(ids) = self.by_client.get_mut(&key) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_client.remove(&key);
            }
        }
    }

    /// After missed events: forgets connections that are no longer live (their Closed event
    /// may have been among those missed), so no index keeps them.
    fn forget_closed(&mut self) {
        let gone: Vec<u64> =
            self.keys.keys().copied().filter(|&id| self.registry.get(id).is_none()).collect();
        for id in gone {
            self.unfile(id);
            self.takeovers.remove(&id);
        }
    }

    fn publish_sizes(&self) {
        let t = &self.registry.tracked;
        t.client_ids.store(self.keys.len() as u64, Relaxed);
        t.takeovers.store(self.takeovers.len() as u64, Relaxed);
        t.wills.store(self.wills.len() as u64, Relaxed);
        t.will_publishes.store(self.recent.len() as u64, Relaxed);
    }

    fn on_closed(&mut self, conn: &Arc<Connection>) {
        let Some(close) = conn.close_info() else { return };
        let stats = &conn.route.stats;
        let now = Instant::now();
        stats.closes.inc((close.closed_by.as_str(), close.how.as_str()));
        stats.connection_duration.observe(now.saturating_duration_since(conn.started).as_secs_f64());
        self.unfile(conn.id);
        let victim = self.takeovers.remove(&conn.id);
        if let Some(t) = &victim {
            let outcome = match (close.closed_by, close.how, close.disconnect_reason) {
                (Side::Broker, CloseHow::Disconnect, Some(0x8e)) => "disconnect_0x8e",
                _ => "closed",
            };
            stats.takeovers.inc(outcome);
            stats.takeover_close_seconds.observe(now.saturating_duration_since(t.at).as_secs_f64());
            info!(conn = conn.id, outcome, "takeover settled");
        }
        let ka = close.keep_alive_enforced.unwrap_or(0);
        match close.closed_by {
            Side::Broker if ka > 0 && victim.is_none() => {
                if let (Some(s), Some(r)) = (close.silence_s, close.silence_ratio) {
                    stats.broker_detection_seconds.observe(s);
                    stats.broker_detection_ratio.observe(r);
                    stats.broker_detection.push(r);
                    let detection =
                        Event::Detection { conn: conn.clone(), side: Side::Broker, seconds: s, ratio: r };
                    self.registry.emit(detection);
                }
            }
            Side::Client if close.how != CloseHow::Disconnect => {
                if let Some(s) = close.silence_s {
                    stats.client_detection_seconds.observe(s);
                }
                if let Some(r) = close.silence_ratio {
                    stats.client_detection_ratio.observe(r);
                    stats.client_detection.push(r);
                    if let Some(s) = close.silence_s {
                        let detection =
                            Event::Detection { conn: conn.clone(), side: Side::Client, seconds: s, ratio: r };
                        self.registry.emit(detection);
                    }
                }
            }
            _ => {}
        }
        // A client that said nothing for longer than its own Keep Alive before the end.
        let client_ka = conn.keep_alive().client_enforced().unwrap_or(0);
        let closed_at = conn.started + Duration::from_secs_f64(close.at_s);
        if client_ka > 0
            && let Some(last) = conn.last_from_client()
            && closed_at.saturating_duration_since(last) > Duration::from_secs(u64::from(client_ka))
        {
            stats.client_keepalive_violations.fetch_add(1, Relaxed);
        }
        self.expect_will(conn, &close, closed_at);
    }

    fn expect_will(&mut self, conn: &Arc<Connection>, close: &crate::record::CloseInfo, closed_at: Instant) {
        let (Some(will), Some(watch)) = (conn.will(), conn.will_watch()) else { return };
        let normal = close.closed_by == Side::Client
            && close.how == CloseHow::Disconnect
            && close.disconnect_reason.unwrap_or(0) == 0;
        if normal {
            return; // the record's watch goes with the record
        }
        let stats = &conn.route.stats;
        stats.wills_expected.fetch_add(1, Relaxed);
        let delay = Duration::from_secs(u64::from(will.delay_interval.unwrap_or(0)));
        let expected = ExpectedWill {
            route: conn.route.clone(),
            conn_id: conn.id,
            watch,
            closed_at,
            deadline: closed_at + delay + self.will_timeout,
        };
        // The broker may have published it before the proxy noticed the close.
        let early =
            self.recent.iter().position(|(t, at)| t == expected.topic() && *at + EARLY_WILL >= closed_at);
        match early {
            Some(i) => {
                let (_, at) = self.recent.remove(i).expect("found above");
                self.observed(expected, at);
            }
            None => self.wills.push(expected),
        }
    }

    /// A PUBLISH on a Will topic: through the proxy (any route), or seen by a route's observer.
    fn on_will_topic_publish(&mut self, topic: String, at: Instant, route: Option<String>) {
        let same_route = |w: &ExpectedWill| route.as_ref().is_none_or(|r| *r == w.route.name);
        match self.wills.iter().position(|w| w.topic() == topic && same_route(w)) {
            Some(i) => {
                let w = self.wills.remove(i);
                self.observed(w, at);
            }
            None => {
                if self.recent.len() >= MAX_RECENT {
                    self.recent.pop_front();
                }
                self.recent.push_back((topic, at))
            }
        }
    }

    fn observed(&mut self, w: ExpectedWill, at: Instant) {
        let stats = &w.route.stats;
        stats.wills_observed.fetch_add(1, Relaxed);
        let delay = at.saturating_duration_since(w.closed_at).as_secs_f64();
        stats.will_delay.observe(delay);
        debug!(conn = w.conn_id, topic = %w.topic(), delay_s = delay, "Will observed");
        self.registry.emit(Event::Will {
            conn_id: w.conn_id,
            route: w.route.name.clone(),
            topic: w.topic().to_string(),
            outcome: "observed",
            delay_s: Some(delay),
        });
    }

    fn expire(&mut self, now: Instant) {
        let (missing, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.wills).into_iter().partition(|w| now >= w.deadline);
        self.wills = waiting;
        for w in missing {
            w.route.stats.wills_missing.fetch_add(1, Relaxed);
            info!(conn = w.conn_id, topic = %w.topic(), "expected Will not seen");
            self.registry.emit(Event::Will {
                conn_id: w.conn_id,
                route: w.route.name.clone(),
                topic: w.topic().to_string(),
                outcome: "missing",
                delay_s: None,
            });
        }
        self.takeovers.retain(|old, t| {
            let open = now.saturating_duration_since(t.at) < TAKEOVER_WINDOW;
            if !open {
                t.route.stats.takeovers.inc("not_enforced");
                info!(conn = old, "takeover not enforced: the old connection is still open");
            }
            open
        });
        while self.recent.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) > EARLY_WILL) {
            self.recent.pop_front();
        }
    }
}
