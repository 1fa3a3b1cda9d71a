//! A route: one listener forwarding to one upstream broker, and everything measured on it.

use crate::codec::PacketType;
use crate::metrics::{
    DURATION_BUCKETS, Exposition, Histogram, KEEPALIVE_BUCKETS, RATIO_BUCKETS, RTT_BUCKETS, SECONDS_BUCKETS,
};
use crate::record::Direction;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

/// Counts keyed by a few bounded label values.
#[derive(Debug, Default)]
pub struct LabeledCounts<K: Ord>(Mutex<BTreeMap<K, u64>>);

impl<K: Ord + Clone> LabeledCounts<K> {
    pub fn inc(&self, key: K) {
        *self.lock().entry(key).or_default() += 1;
    }

    pub fn get(&self, key: &K) -> u64 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> Vec<(K, u64)> {
        self.lock().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<K, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Route-wide measurements: the pumps add to the atomics once per batch; the sessions and the
/// monitor record events; [`RouteStats::render_all`] turns them into metrics.
#[derive(Debug)]
pub struct RouteStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    /// Failed connections of the Will observer (`--observe-wills`).
    pub observer_connect_failures: AtomicU64,
    /// Sessions that panicked (a bug): each closed alone, counted here.
    pub internal_errors: AtomicU64,
    /// Failed accepts (typically out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Clients closed at once because `--max-connections` was reached.
    pub connections_rejected: AtomicU64,
    /// Directions switched to raw relay or closed because their bytes were not MQTT,
    /// indexed client_to_broker, broker_to_client.
    pub malformed: [AtomicU64; 2],
    /// Packets forwarded, by direction and type.
    pub packets: [[AtomicU64; 15]; 2],
    /// Bytes forwarded, by direction.
    pub bytes: [AtomicU64; 2],
    /// Fault applications by (rule, action, direction); `direction` is `both` for actions on
    /// the whole connection.
    pub faults: LabeledCounts<(String, &'static str, &'static str)>,
    /// Closes by (closed_by, how).
    pub closes: LabeledCounts<(&'static str, &'static str)>,
    /// Closes by (by, how, cause).
    pub closes_by_cause: LabeledCounts<(&'static str, &'static str, &'static str)>,
    /// DISCONNECT packets seen, by (direction, reason name); `none` for MQTT 3.x.
    pub disconnect_reasons: LabeledCounts<(&'static str, &'static str)>,
    pub keepalive_requested: Histogram,
    pub keepalive_rewrites: AtomicU64,
    pub broker_detection_seconds: Histogram,
    /// Exact broker and client detection ratios of recent closes, for the summary.
    pub broker_detection: crate::summary::Samples,
    pub client_detection: crate::summary::Samples,
    pub broker_detection_ratio: Histogram,
    pub client_detection_seconds: Histogram,
    pub client_detection_ratio: Histogram,
    pub client_keepalive_violations: AtomicU64,
    /// Each connection's longest client silence as a multiple of its Keep Alive.
    pub client_keepalive_gap_ratio: Histogram,
    pub ping_rtt: Histogram,
    pub wills_expected: AtomicU64,
    pub wills_observed: AtomicU64,
    pub wills_missing: AtomicU64,
    pub wills_unobservable: AtomicU64,
    pub will_delay: Histogram,
    /// Takeovers by outcome: `closed`, `disconnect_0x8e`, `not_enforced`.
    pub takeovers: LabeledCounts<&'static str>,
    pub takeover_close_seconds: Histogram,
    pub connection_duration: Histogram,
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            connections_total: AtomicU64::default(),
            connections_active: AtomicU64::default(),
            upstream_connect_failures: AtomicU64::default(),
            observer_connect_failures: AtomicU64::default(),
            internal_errors: AtomicU64::default(),
            accept_errors: AtomicU64::default(),
            connections_rejected: AtomicU64::default(),
            malformed: Default::default(),
            packets: Default::default(),
            bytes: Default::default(),
            faults: LabeledCounts::default(),
            closes: LabeledCounts::default(),
            closes_by_cause: LabeledCounts::default(),
            disconnect_reasons: LabeledCounts::default(),
            keepalive_requested: Histogram::new(KEEPALIVE_BUCKETS),
            keepalive_rewrites: AtomicU64::default(),
            broker_detection_seconds: Histogram::new(SECONDS_BUCKETS),
            broker_detection: Default::default(),
            client_detection: Default::default(),
            broker_detection_ratio: Histogram::new(RATIO_BUCKETS),
            client_detection_seconds: Histogram::new(SECONDS_BUCKETS),
            client_detection_ratio: Histogram::new(RATIO_BUCKETS),
            client_keepalive_violations: AtomicU64::default(),
            client_keepalive_gap_ratio: Histogram::new(RATIO_BUCKETS),
            ping_rtt: Histogram::new(RTT_BUCKETS),
            wills_expected: AtomicU64::default(),
            wills_observed: AtomicU64::default(),
            wills_missing: AtomicU64::default(),
            wills_unobservable: AtomicU64::default(),
            will_delay: Histogram::new(SECONDS_BUCKETS),
            takeovers: LabeledCounts::default(),
            takeover_close_seconds: Histogram::new(RTT_BUCKETS),
            connection_duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

impl RouteStats {
    /// How often `rule` was applied on this route, summed over directions.
    pub fn fault_count(&self, rule: &str) -> u64 {
        self.faults.snapshot().iter().filter(|((r, _, _), _)| r == rule).map(|(_, n)| n).sum()
    }

    /// Every route metric, family by family.
    pub(crate) fn render_all(routes: &[Arc<Route>], e: &mut Exposition) {
        type Counter = fn(&RouteStats) -> u64;
        let simple: [(&str, &str, &str, Counter); 13] = [
            (
                "mqtt_chaos_internal_errors_total",
                "counter",
                "Connections closed because their session hit an internal error (a bug; see the log).",
                |s| s.internal_errors.load(Relaxed),
            ),
            (
                "mqtt_chaos_accept_errors_total",
                "counter",
                "Failed accepts on the route's listener (typically out of file descriptors).",
                |s| s.accept_errors.load(Relaxed),
            ),
            (
                "mqtt_chaos_connections_rejected_total",
                "counter",
                "Clients closed at once because --max-connections was reached.",
                |s| s.connections_rejected.load(Relaxed),
            ),
            ("mqtt_chaos_connections_total", "counter", "Client connections accepted.", |s| {
                s.connections_total.load(Relaxed)
            }),
            ("mqtt_chaos_connections_active", "gauge", "Open proxied connections.", |s| {
                s.connections_active.load(Relaxed)
            }),
            (
                "mqtt_chaos_upstream_connect_failures_total",
                "counter",
                "Broker dials that failed or timed out.",
                |s| s.upstream_connect_failures.load(Relaxed),
            ),
            (
                "mqtt_chaos_observer_connect_failures_total",
                "counter",
                "Failed connections of the Will observer (--observe-wills) to the upstream.",
                |s| s.observer_connect_failures.load(Relaxed),
            ),
            (
                "mqtt_chaos_keepalive_rewrites_total",
                "counter",
                "CONNECT and CONNACK Keep Alive rewrites.",
                |s| s.keepalive_rewrites.load(Relaxed),
            ),
            (
                "mqtt_chaos_client_keepalive_violations_total",
                "counter",
                "Times a client stayed silent longer than the Keep Alive it enforces.",
                |s| s.client_keepalive_violations.load(Relaxed),
            ),
            (
                "mqtt_chaos_wills_expected_total",
                "counter",
                "Connections with a Will that ended without a normal DISCONNECT.",
                |s| s.wills_expected.load(Relaxed),
            ),
            ("mqtt_chaos_wills_observed_total", "counter", "Expected Wills seen published.", |s| {
                s.wills_observed.load(Relaxed)
            }),
            (
                "mqtt_chaos_wills_missing_total",
                "counter",
                "Expected Wills not seen within the Will Delay Interval plus --will-timeout.",
                |s| s.wills_missing.load(Relaxed),
            ),
            (
                "mqtt_chaos_wills_unobservable_total",
                "counter",
                "Expected Wills not seen that nothing could have seen (no matching subscription through the proxy, no observer).",
                |s| s.wills_unobservable.load(Relaxed),
            ),
        ];
        for (name, kind, help, get) in simple {
            e.family(name, kind, help);
            for r in routes {
                e.sample(name, &[("route", &r.name)], get(&r.stats) as f64);
            }
        }

        e.family(
            "mqtt_chaos_packets_total",
            "counter",
            "Packets forwarded, by direction and MQTT packet type.",
        );
        for r in routes {
            for dir in Direction::BOTH {
                for t in PacketType::ALL {
                    let n = r.stats.packets[dir as usize][t.index()].load(Relaxed);
                    if n > 0 {
                        e.sample(
                            "mqtt_chaos_packets_total",
                            &[("route", &r.name), ("direction", dir.as_str()), ("type", t.name())],
                            n as f64,
                        );
                    }
                }
            }
        }
        e.family("mqtt_chaos_bytes_total", "counter", "Bytes forwarded, by direction.");
        e.family("mqtt_chaos_malformed_total", "counter", "Directions whose bytes stopped being MQTT.");
        for r in routes {
            for dir in Direction::BOTH {
                let labels = [("route", r.name.as_str()), ("direction", dir.as_str())];
                e.sample("mqtt_chaos_bytes_total", &labels, r.stats.bytes[dir as usize].load(Relaxed) as f64);
                e.sample(
                    "mqtt_chaos_malformed_total",
                    &labels,
                    r.stats.malformed[dir as usize].load(Relaxed) as f64,
                );
            }
        }
        e.family("mqtt_chaos_faults_total", "counter", "Fault applications, by rule, action and direction.");
        for r in routes {
            for ((rule, action, direction), n) in r.stats.faults.snapshot() {
                let labels = [
                    ("route", r.name.as_str()),
                    ("rule", &rule),
                    ("action", action),
                    ("direction", direction),
                ];
                e.sample("mqtt_chaos_faults_total", &labels, n as f64);
            }
        }
        type Pairs = fn(&RouteStats) -> &LabeledCounts<(&'static str, &'static str)>;
        let by_pair: [(&str, &str, [&str; 2], Pairs); 2] = [
            (
                "mqtt_chaos_connection_closes_total",
                "Connections ended, by who closed first and how.",
                ["closed_by", "how"],
                |s| &s.closes,
            ),
            (
                "mqtt_chaos_disconnect_reasons_total",
                "DISCONNECT packets seen, by direction and reason.",
                ["direction", "reason"],
                |s| &s.disconnect_reasons,
            ),
        ];
        for (name, help, [first, second], get) in by_pair {
            e.family(name, "counter", help);
            for r in routes {
                for ((a, b), n) in get(&r.stats).snapshot() {
                    e.sample(name, &[("route", &r.name), (first, a), (second, b)], n as f64);
                }
            }
        }
        e.family(
            "mqtt_chaos_closes_total",
            "counter",
            "First closes of connections, by who closed, how, and cause (METRICS.md gives the rules).",
        );
        for r in routes {
            for ((by, how, cause), n) in r.stats.closes_by_cause.snapshot() {
                let labels = [("route", r.name.as_str()), ("by", by), ("how", how), ("cause", cause)];
                e.sample("mqtt_chaos_closes_total", &labels, n as f64);
            }
        }
        e.family(
            "mqtt_chaos_takeovers_total",
            "counter",
            "CONNECTs with a client id already live on the route, by outcome.",
        );
        for r in routes {
            for outcome in crate::monitor::TAKEOVER_OUTCOMES {
                let n = r.stats.takeovers.get(&outcome);
                e.sample("mqtt_chaos_takeovers_total", &[("route", &r.name), ("outcome", outcome)], n as f64);
            }
        }
        type Hist = fn(&RouteStats) -> &Histogram;
        let histograms: [(&str, &str, Hist); 10] = [
            ("mqtt_chaos_keepalive_requested_seconds", "Keep Alive clients asked for in CONNECT.", |s| {
                &s.keepalive_requested
            }),
            (
                "mqtt_chaos_broker_detection_seconds",
                "At a broker-initiated close (Keep Alive > 0, not a takeover): silence since the last packet delivered to the broker.",
                |s| &s.broker_detection_seconds,
            ),
            (
                "mqtt_chaos_broker_detection_ratio",
                "The broker detection time divided by the Keep Alive the broker enforces.",
                |s| &s.broker_detection_ratio,
            ),
            (
                "mqtt_chaos_client_detection_seconds",
                "At a client-initiated close without DISCONNECT: silence since the last packet delivered to the client.",
                |s| &s.client_detection_seconds,
            ),
            (
                "mqtt_chaos_client_detection_ratio",
                "The client detection time divided by the Keep Alive the client enforces.",
                |s| &s.client_detection_ratio,
            ),
            (
                "mqtt_chaos_client_keepalive_gap_ratio",
                "At a connection's first close: the client's longest silence (its last one included) divided by the Keep Alive it enforces.",
                |s| &s.client_keepalive_gap_ratio,
            ),
            (
                "mqtt_chaos_ping_rtt_seconds",
                "PINGREQ forwarded to the broker until its PINGRESP arrived.",
                |s| &s.ping_rtt,
            ),
            (
                "mqtt_chaos_will_delay_seconds",
                "Close of a connection until its Will was seen published.",
                |s| &s.will_delay,
            ),
            (
                "mqtt_chaos_takeover_close_seconds",
                "A takeover CONNECT until the broker closed the old connection.",
                |s| &s.takeover_close_seconds,
            ),
            ("mqtt_chaos_connection_duration_seconds", "Lifetime of proxied connections.", |s| {
                &s.connection_duration
            }),
        ];
        for (name, help, get) in histograms {
            e.family(name, "histogram", help);
            for r in routes {
                e.histogram(name, &[("route", &r.name)], get(&r.stats));
            }
        }
    }
}

/// A named listener → upstream pair.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// The address actually bound (port 0 resolved).
    pub listen: SocketAddr,
    /// `host:port`, resolved at every dial so DNS changes are followed.
    pub upstream: String,
    pub stats: RouteStats,
    /// What the last dial of `upstream` gave (`/readyz`, and the log of failures).
    pub reach: Reach,
    /// What the route's Will observer watches now (`--observe-wills`).
    pub observer: ObserverView,
}

#[cfg(test)]
impl Route {
    /// A route for unit tests: nothing listens on it and nothing is dialled.
    pub(crate) fn for_test(name: &str) -> Arc<Route> {
        Arc::new(Route {
            name: name.into(),
            listen: "127.0.0.1:1".parse().expect("a literal address"),
            upstream: "127.0.0.1:2".into(),
            stats: RouteStats::default(),
            reach: Default::default(),
            observer: Default::default(),
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
