//! Turning record events into measurements: how long each side took to notice a dead peer,
//! whether Wills arrived, what takeovers did.
//!
//! One task per proxy follows the [`Registry`]'s events. Everything is decided at a
//! connection's *first* close (the record has classified it: [`crate::vocab::Cause`]), not
//! when its last side goes, so a hung device that keeps its socket open does not delay or
//! distort anything:
//!
//! - **CONNECT**: the requested Keep Alive is observed.
//! - **Takeover** (the registry saw a CONNECT with the client id of an open connection): the
//!   old connection is watched for [`TAKEOVER_WINDOW`].
//! - **Closed** (the first close): counted by who, how and cause. Only a `keepalive_timeout`
//!   is a broker detection and only a `client_gave_up` a client detection; a takeover victim's
//!   close settles the takeover. A connection the broker accepted, with a Will, that did not
//!   end with a normal DISCONNECT expects its Will within the Will Delay Interval plus
//!   `--will-timeout`; what could see it (the observer, subscriptions through the proxy) is
//!   noted, so a Will nothing could see is `unobservable`, not `missing`.
//! - **PUBLISH** on a Will topic flowing to any client through the proxy, or seen by the
//!   observer: an expected Will is observed (also one published moments before the proxy saw
//!   the close: the broker publishes at the close, on another socket).

use crate::record::{Connection, Event, Registry, TAKEOVER_WINDOW, TopicWatch, keepalive_violated};
use crate::route::Route;
use crate::vocab::{Cause, CloseInfo, TakeoverOutcome, WillOutcome};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    /// What could see it when the connection closed, in words; `None`: nothing could.
    watched_by: Option<String>,
}

impl ExpectedWill {
    fn topic(&self) -> &str {
        self.watch.topic()
    }

    /// Counts what became of the Will and tells the event subscribers.
    fn settle(self, registry: &Registry, outcome: WillOutcome, delay_s: Option<f64>) {
        self.route.metrics.on_will(outcome, delay_s);
        registry.emit(Event::Will {
            conn_id: self.conn_id,
            route: self.route.name.clone(),
            topic: crate::record::abbreviated(self.topic()).to_string(),
            topic_len: self.topic().len(),
            outcome: outcome.as_str(),
            delay_s,
            watched_by: self.watched_by.unwrap_or_else(|| "nothing".into()),
        });
    }
}

struct Takeover {
    route: Arc<Route>,
    at: Instant,
}

struct Monitor {
    registry: Arc<Registry>,
    will_timeout: Duration,
    /// Old connection id → the takeover that made it a victim.
    takeovers: HashMap<u64, Takeover>,
    wills: Vec<ExpectedWill>,
    /// Recent PUBLISHes on watched topics: (topic, when).
    recent: VecDeque<(Arc<str>, Instant)>,
}

/// Counts what the first close of a takeover's victim says about the broker: it closed the old
/// connection (with DISCONNECT 0x8E or not), or something else closed it first (`preempted`).
fn settle_takeover(conn: &Connection, close: &CloseInfo, t: Takeover) {
    let outcome = match close.cause {
        Cause::Takeover if close.disconnect_reason == Some(0x8e) => TakeoverOutcome::Disconnect0x8e,
        Cause::Takeover => TakeoverOutcome::Closed,
        _ => TakeoverOutcome::Preempted,
    };
    let closed_after = (close.cause == Cause::Takeover).then(|| {
        let closed_at = conn.started + Duration::from_secs_f64(close.at_s);
        closed_at.saturating_duration_since(t.at).as_secs_f64()
    });
    t.route.metrics.on_takeover(outcome, closed_after);
    info!(conn = conn.id, outcome = outcome.as_str(), cause = close.cause.as_str(), "takeover settled");
}

/// Runs the monitor until `stop`.
pub async fn run(registry: Arc<Registry>, will_timeout: Duration, stop: CancellationToken) {
    let mut events = registry.subscribe();
    let mut m = Monitor {
        registry,
        will_timeout,
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
            Event::Connect(conn) => {
                conn.route.metrics.on_connect(conn.keep_alive().requested);
            }
            Event::Takeover { old, at, .. } => {
                let takeover = Takeover { route: old.route.clone(), at };
                // The victim was open when it was marked, but may have closed since, and its
                // Closed event may even have been sent first: then it is settled here.
                match old.close_info() {
                    Some(close) => settle_takeover(&old, &close, takeover),
                    None => drop(self.takeovers.insert(old.id, takeover)),
                }
            }
            Event::Closed(conn) => self.on_closed(&conn),
            Event::Publish { topic, at, retain: false, .. } => self.on_will_topic_publish(topic, at, None),
            Event::WillTopicPublish { route, topic, at } => {
                self.on_will_topic_publish(topic, at, Some(route))
            }
            // A retained PUBLISH is delivered because of a subscription, not a Will firing.
            Event::Publish { .. }
            | Event::Connack(_)
            | Event::Ended(_)
            | Event::Fault { .. }
            | Event::Rules { .. }
            | Event::Detection { .. }
            | Event::Will { .. } => {}
        }
    }

    /// After missed events: forgets takeover victims already closed (their Closed event may
    /// have been among those missed).
    fn forget_closed(&mut self) {
        let registry = &self.registry;
        self.takeovers.retain(|&id, _| registry.get(id).is_some_and(|c| c.close_info().is_none()));
    }

    fn publish_sizes(&self) {
        let t = &self.registry.tracked;
        t.takeovers.store(self.takeovers.len() as u64, Relaxed);
        t.wills.store(self.wills.len() as u64, Relaxed);
        t.will_publishes.store(self.recent.len() as u64, Relaxed);
    }

    /// A connection's first close: everything about it is decided now.
    fn on_closed(&mut self, conn: &Arc<Connection>) {
        let Some(close) = conn.close_info() else { return };
        let metrics = &conn.route.metrics;
        let closed_at = conn.started + Duration::from_secs_f64(close.at_s);
        metrics.on_close(&close);
        if let Some(t) = self.takeovers.remove(&conn.id) {
            settle_takeover(conn, &close, t);
        }
        if let (Some(side), Some(seconds), Some(ratio)) =
            (close.cause.detected_by(), close.silence_s, close.silence_ratio)
        {
            self.registry.emit(Event::Detection { conn: conn.clone(), side, seconds, ratio });
        }
        // The client's silence before the close counts like any gap between its packets.
        let client_ka = conn.keep_alive().client_enforced().unwrap_or(0);
        if let Some(last) = conn.last_from_client()
            && keepalive_violated(closed_at.saturating_duration_since(last), client_ka)
        {
            metrics.on_client_keepalive_violation();
        }
        if let Some(ratio) = conn.client_gap_ratio(closed_at) {
            metrics.on_client_gap(ratio);
        }
        self.expect_will(conn, &close, closed_at);
    }

    fn expect_will(&mut self, conn: &Arc<Connection>, close: &CloseInfo, closed_at: Instant) {
        // The topic stays watched only while the Will is awaited.
        let (Some(will), Some(watch)) = (conn.will(), conn.take_will_watch()) else { return };
        // The broker publishes a Will only for a connection it accepted that did not end
        // with a normal DISCONNECT.
        if conn.connack_code() != Some(0) || close.cause == Cause::Normal {
            return; // and the watch with it: nothing awaits this Will
        }
        conn.route.metrics.on_will_expected();
        let delay = Duration::from_secs(u64::from(will.delay_interval.unwrap_or(0)));
        let observer = conn.route.observer.watches(&will.topic);
        let subscribers = self.registry.subscribers(&conn.route.name, &will.topic);
        let watched_by = match (observer, subscribers) {
            (false, 0) => None,
            (true, 0) => Some("the Will observer".to_string()),
            (false, n) => Some(format!("{n} subscription(s) through the proxy")),
            (true, n) => Some(format!("the Will observer and {n} subscription(s) through the proxy")),
        };
        let expected = ExpectedWill {
            route: conn.route.clone(),
            conn_id: conn.id,
            watch,
            closed_at,
            deadline: closed_at + delay + self.will_timeout,
            watched_by,
        };
        // The broker may have published it before the proxy noticed the close.
        let early =
            self.recent.iter().position(|(t, at)| &**t == expected.topic() && *at + EARLY_WILL >= closed_at);
        match early {
            Some(i) => {
                let (_, at) = self.recent.remove(i).expect("found above");
                self.observed(expected, at);
            }
            None => self.wills.push(expected),
        }
    }

    /// A PUBLISH on a Will topic: through the proxy (any route), or seen by a route's observer.
    fn on_will_topic_publish(&mut self, topic: Arc<str>, at: Instant, route: Option<String>) {
        let same_route = |w: &ExpectedWill| route.as_ref().is_none_or(|r| *r == w.route.name);
        match self.wills.iter().position(|w| w.topic() == &*topic && same_route(w)) {
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
        let delay = at.saturating_duration_since(w.closed_at).as_secs_f64();
        debug!(conn = w.conn_id, topic = w.topic(), delay_s = delay, "Will observed");
        w.settle(&self.registry, WillOutcome::Observed, Some(delay));
    }

    fn expire(&mut self, now: Instant) {
        let (due, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.wills).into_iter().partition(|w| now >= w.deadline);
        self.wills = waiting;
        for w in due {
            let outcome = match &w.watched_by {
                Some(by) => {
                    info!(conn = w.conn_id, topic = w.topic(), watched_by = %by,
                        "expected Will not seen, although it was watched");
                    WillOutcome::Missing
                }
                None => {
                    info!(
                        conn = w.conn_id,
                        topic = w.topic(),
                        "Will not seen, and nothing could have seen it: no subscription through the proxy matched its topic and the Will observer was not watching it (--observe-wills)"
                    );
                    WillOutcome::Unobservable
                }
            };
            w.settle(&self.registry, outcome, None);
        }
        let registry = &self.registry;
        self.takeovers.retain(|&old, t| {
            // A victim closed already is settled by its Closed event, whatever the time now.
            let closed = registry.get(old).is_none_or(|c| c.close_info().is_some());
            let open = closed || now.saturating_duration_since(t.at) < TAKEOVER_WINDOW;
            if !open {
                t.route.metrics.on_takeover(TakeoverOutcome::NotEnforced, None);
                info!(conn = old, "takeover not enforced: the broker did not close the old connection");
            }
            open
        });
        while self.recent.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) > EARLY_WILL) {
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Connack, Connect, FrameHeader};
    use crate::vocab::{CloseHow, Side};

    /// A connection of `client_id` whose CONNECT passed (filed for takeovers) and was accepted.
    fn accepted(registry: &Arc<Registry>, route: &Arc<Route>, client_id: &str) -> Arc<Connection> {
        let conn = registry.open(route.clone(), "127.0.0.1:3".parse().unwrap(), CancellationToken::new());
        let mut frame = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
        frame.extend((client_id.len() as u16).to_be_bytes());
        frame.extend(client_id.as_bytes());
        frame[1] = (frame.len() - 2) as u8;
        let header = FrameHeader::parse(&frame).unwrap().unwrap();
        conn.on_connect(&Connect::decode(&frame, &header).unwrap(), 30, None);
        registry.on_connect(&conn);
        let connack = Connack {
            session_present: false,
            code: 0,
            server_keep_alive: None,
            assigned_client_id: None,
            reason_string: None,
        };
        conn.on_connack(&connack, None);
        conn
    }

    #[tokio::test]
    async fn a_takeover_is_settled_once_whether_the_victims_close_is_read_before_or_after_it() {
        for close_read_first in [false, true] {
            let registry = Arc::new(Registry::default());
            let route = Route::for_test("r");
            let mut events = registry.subscribe();
            let mut m = Monitor {
                registry: registry.clone(),
                will_timeout: Duration::from_secs(1),
                takeovers: HashMap::new(),
                wills: Vec::new(),
                recent: VecDeque::new(),
            };
            let old = accepted(&registry, &route, "twin");
            let _new = accepted(&registry, &route, "twin");
            // The broker closes the old connection before the monitor has read anything.
            assert!(old.note_close(Side::Broker, CloseHow::Fin, None, None, Instant::now()));
            let mut read = Vec::new();
            while let Ok(ev) = events.try_recv() {
                read.push(ev);
            }
            let kinds: Vec<_> = read.iter().map(|e| crate::record::event_json(e).unwrap().0).collect();
            assert_eq!(kinds, ["takeover", "closed"]);
            if close_read_first {
                read.reverse();
            }
            for ev in read {
                m.handle(ev);
            }
            m.expire(Instant::now() + TAKEOVER_WINDOW + Duration::from_secs(1));
            assert_eq!(old.close_info().unwrap().cause, Cause::Takeover);
            assert_eq!(
                route.metrics.totals().takeovers,
                [1, 0, 0, 0],
                "closed once, never not_enforced (close read first: {close_read_first})"
            );
            let detections = route.metrics.detections(Side::Broker).describe();
            assert_eq!(detections["count"], 0, "a takeover is no detection");
        }
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_new_connect_is_not_taken_over() {
        let registry = Arc::new(Registry::default());
        let route = Route::for_test("r");
        let gone = accepted(&registry, &route, "solo");
        gone.note_close(Side::Client, CloseHow::Fin, None, None, Instant::now()); // its socket lingers
        let mut events = registry.subscribe();
        let _again = accepted(&registry, &route, "solo");
        assert!(events.try_recv().is_err(), "no Takeover event");
        assert!(gone.snapshot().taken_over_s.is_none());
    }
}
