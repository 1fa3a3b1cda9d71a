//! The measurements' one home: every Prometheus family the proxy exports is declared in
//! `Families::register` with its name, help, type and typed label set, and each route holds a
//! [`RouteMetrics`] that says what happened (`on_close`, `on_batch`, …). Nothing else in the
//! crate touches a counter, so adding a metric is a change to this file (and METRICS.md).
//!
//! The forwarding path adds to handles created with the route (one atomic add per packet type in
//! a batch, no label lookup); labels that depend on events (a close's cause, a fault's rule) are
//! looked up at the event. Values only a scrape can know (the profile, the rules in force, index
//! sizes) come from the [`ScrapeTime`] source given to [`Metrics::new`].
//!
//! The exposition is `prometheus-client`'s: the Prometheus text format 0.0.4, or OpenMetrics 1.0
//! when the scraper's `Accept` asks for it ([`Format::negotiate`]). No label ever holds a client
//! id, a username or an address. METRICS.md documents every metric; a test checks that the two
//! name the same set.

use crate::codec::PacketType;
use crate::reload::ReloadResult;
use crate::vocab::{Batch, Cause, CloseHow, CloseInfo, Direction, Side, TakeoverOutcome, WillOutcome};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Buckets for Keep Alive values, seconds.
pub const KEEPALIVE_BUCKETS: &[f64] =
    &[0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0];
/// Buckets for detection and close times, seconds.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0];
/// Buckets for detection as a multiple of Keep Alive: fine between 1.0 and 2.0 around the 1.5×
/// the specification asks of brokers.
pub const RATIO_BUCKETS: &[f64] = &[0.5, 1.0, 1.25, 1.4, 1.5, 1.6, 1.75, 2.0, 2.5, 3.0, 5.0, 10.0];
/// Buckets for round trips and short delays, seconds.
pub const RTT_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets for connection lifetimes, seconds.
pub const DURATION_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];

/// Label values are the vocabulary's own strings.
macro_rules! label_values {
    ($($t:ty => $name:ident),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
                EncodeLabelValue::encode(&self.$name(), e)
            }
        }
    )*};
}
label_values!(Direction => as_str, Side => as_str, CloseHow => as_str, Cause => as_str,
    TakeoverOutcome => as_str, PacketType => name, ReloadResult => as_str);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    route: String,
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    route: String,
    direction: Direction,
    r#type: PacketType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    route: String,
    rule: String,
    action: &'static str,
    /// A [`Direction`], or `both` for actions on the whole connection.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionCloseLabels {
    route: String,
    closed_by: Side,
    how: CloseHow,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    route: String,
    by: Side,
    how: CloseHow,
    cause: Cause,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DisconnectLabels {
    route: String,
    direction: Direction,
    /// The reason's name (`none` for MQTT 3.x).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TakeoverLabels {
    route: String,
    outcome: TakeoverOutcome,
}

/// What a look at a changed profile file gave (no route: the profile is the proxy's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    route: String,
    side: Side,
}

/// A side's failure by reason (TLS handshakes, WebSocket errors).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    route: String,
    side: Side,
    /// [`crate::tls::failure_reason`], [`crate::ws::Broken::reason`],
    /// [`crate::ws::handshake_failure_reason`].
    reason: &'static str,
}

type PerRoute<M> = Family<RouteLabel, M>;
type Histograms = Family<RouteLabel, Histogram, Buckets>;

/// Makes a family's histograms with these bucket bounds.
#[derive(Clone, Debug)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Every family the proxy exports, each registered next to its name, help and type.
#[derive(Debug)]
struct Families {
    connections: PerRoute<Counter>,
    connections_active: PerRoute<Gauge>,
    connections_rejected: PerRoute<Counter>,
    accept_errors: PerRoute<Counter>,
    upstream_connect_failures: PerRoute<Counter>,
    observer_connect_failures: PerRoute<Counter>,
    internal_errors: PerRoute<Counter>,
    packets: Family<PacketLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    malformed: Family<DirectionLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    connection_closes: Family<ConnectionCloseLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    disconnect_reasons: Family<DisconnectLabels, Counter>,
    keepalive_rewrites: PerRoute<Counter>,
    client_keepalive_violations: PerRoute<Counter>,
    wills_expected: PerRoute<Counter>,
    wills_observed: PerRoute<Counter>,
    wills_missing: PerRoute<Counter>,
    wills_unobservable: PerRoute<Counter>,
    takeovers: Family<TakeoverLabels, Counter>,
    keepalive_requested: Histograms,
    broker_detection_seconds: Histograms,
    broker_detection_ratio: Histograms,
    client_detection_seconds: Histograms,
    client_detection_ratio: Histograms,
    client_keepalive_gap_ratio: Histograms,
    ping_rtt: Histograms,
    will_delay: Histograms,
    takeover_close_seconds: Histograms,
    connection_duration: Histograms,
    tls_handshake_failures: Family<FailureLabels, Counter>,
    websocket_errors: Family<FailureLabels, Counter>,
    tls_handshake_seconds: Family<SideLabels, Histogram, Buckets>,
    profile_reloads: Family<ReloadLabels, Counter>,
}

/// Registers a family. The encoder appends `_total` to a counter's name and a full stop to the
/// help, so neither is written here.
fn family<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

fn histograms(registry: &mut Registry, name: &str, help: &str, buckets: &'static [f64]) -> Histograms {
    let metric = Family::new_with_constructor(Buckets(buckets));
    registry.register(name, help, metric.clone());
    metric
}

impl Families {
    fn register(r: &mut Registry) -> Families {
        Families {
            connections: family(r, "mqtt_chaos_connections", "Client connections accepted"),
            connections_active: family(r, "mqtt_chaos_connections_active", "Open proxied connections"),
            connections_rejected: family(
                r,
                "mqtt_chaos_connections_rejected",
                "Clients closed at once because --max-connections was reached",
            ),
            accept_errors: family(
                r,
                "mqtt_chaos_accept_errors",
                "Failed accepts on the route's listener (typically out of file descriptors)",
            ),
            upstream_connect_failures: family(
                r,
                "mqtt_chaos_upstream_connect_failures",
                "Broker dials that failed or timed out",
            ),
            observer_connect_failures: family(
                r,
                "mqtt_chaos_observer_connect_failures",
                "Failed connections of the Will observer (--observe-wills) to the upstream",
            ),
            internal_errors: family(
                r,
                "mqtt_chaos_internal_errors",
                "Connections closed because their session hit an internal error (a bug; see the log)",
            ),
            packets: family(r, "mqtt_chaos_packets", "Packets forwarded, by direction and MQTT packet type"),
            bytes: family(r, "mqtt_chaos_bytes", "Bytes forwarded, by direction"),
            malformed: family(r, "mqtt_chaos_malformed", "Directions whose bytes stopped being MQTT"),
            faults: family(r, "mqtt_chaos_faults", "Fault applications, by rule, action and direction"),
            connection_closes: family(
                r,
                "mqtt_chaos_connection_closes",
                "Connections ended, by who closed first and how",
            ),
            closes: family(
                r,
                "mqtt_chaos_closes",
                "First closes of connections, by who closed, how, and cause (METRICS.md gives the rules)",
            ),
            disconnect_reasons: family(
                r,
                "mqtt_chaos_disconnect_reasons",
                "DISCONNECT packets seen, by direction and reason",
            ),
            keepalive_rewrites: family(
                r,
                "mqtt_chaos_keepalive_rewrites",
                "CONNECT and CONNACK Keep Alive rewrites",
            ),
            client_keepalive_violations: family(
                r,
                "mqtt_chaos_client_keepalive_violations",
                "Times a client stayed silent longer than the Keep Alive it enforces (with the tolerance METRICS.md gives)",
            ),
            wills_expected: family(
                r,
                "mqtt_chaos_wills_expected",
                "Connections with a Will that the broker accepted and that ended without a normal DISCONNECT",
            ),
            wills_observed: family(r, "mqtt_chaos_wills_observed", "Expected Wills seen published"),
            wills_missing: family(
                r,
                "mqtt_chaos_wills_missing",
                "Expected Wills not seen within the Will Delay Interval plus --will-timeout although their topic was watched",
            ),
            wills_unobservable: family(
                r,
                "mqtt_chaos_wills_unobservable",
                "Expected Wills not seen that nothing could have seen (no matching subscription through the proxy, no observer)",
            ),
            takeovers: family(
                r,
                "mqtt_chaos_takeovers",
                "CONNECTs with a client id already live on the route, by outcome",
            ),
            keepalive_requested: histograms(
                r,
                "mqtt_chaos_keepalive_requested_seconds",
                "Keep Alive clients asked for in CONNECT",
                KEEPALIVE_BUCKETS,
            ),
            broker_detection_seconds: histograms(
                r,
                "mqtt_chaos_broker_detection_seconds",
                "At a broker close judged a Keep Alive timeout: silence since the last packet delivered to the broker",
                SECONDS_BUCKETS,
            ),
            broker_detection_ratio: histograms(
                r,
                "mqtt_chaos_broker_detection_ratio",
                "The broker detection time divided by the Keep Alive the broker enforces",
                RATIO_BUCKETS,
            ),
            client_detection_seconds: histograms(
                r,
                "mqtt_chaos_client_detection_seconds",
                "At a client close judged client_gave_up: silence since the last packet delivered to the client",
                SECONDS_BUCKETS,
            ),
            client_detection_ratio: histograms(
                r,
                "mqtt_chaos_client_detection_ratio",
                "The client detection time divided by the Keep Alive the client enforces",
                RATIO_BUCKETS,
            ),
            client_keepalive_gap_ratio: histograms(
                r,
                "mqtt_chaos_client_keepalive_gap_ratio",
                "At a connection's first close: the client's longest silence (its last one included) divided by the Keep Alive it enforces",
                RATIO_BUCKETS,
            ),
            ping_rtt: histograms(
                r,
                "mqtt_chaos_ping_rtt_seconds",
                "PINGREQ forwarded to the broker until its PINGRESP arrived",
                RTT_BUCKETS,
            ),
            will_delay: histograms(
                r,
                "mqtt_chaos_will_delay_seconds",
                "Close of a connection until its Will was seen published",
                SECONDS_BUCKETS,
            ),
            takeover_close_seconds: histograms(
                r,
                "mqtt_chaos_takeover_close_seconds",
                "A takeover CONNECT until the broker closed the old connection",
                RTT_BUCKETS,
            ),
            tls_handshake_failures: family(
                r,
                "mqtt_chaos_tls_handshake_failures",
                "TLS handshakes that failed, by side (client: the listener's; broker: the upstream's) and reason",
            ),
            websocket_errors: family(
                r,
                "mqtt_chaos_websocket_errors",
                "WebSocket handshakes with clients that failed and WebSocket streams a peer broke, by side and reason",
            ),
            tls_handshake_seconds: {
                let metric = Family::new_with_constructor(Buckets(RTT_BUCKETS));
                r.register(
                    "mqtt_chaos_tls_handshake_seconds",
                    "TLS handshakes that succeeded, by side, in seconds",
                    metric.clone(),
                );
                metric
            },
            connection_duration: histograms(
                r,
                "mqtt_chaos_connection_duration_seconds",
                "Lifetime of proxied connections, to their first close",
                DURATION_BUCKETS,
            ),
            profile_reloads: family(
                r,
                "mqtt_chaos_profile_reloads",
                "Changes of the watched --profile file, by result: applied, invalid, unreadable, missing (METRICS.md)",
            ),
        }
    }
}

/// What only a scrape can know, read from the rest of the proxy each time `/metrics` is asked.
#[derive(Debug, Default)]
pub struct ScrapeTime {
    pub version: &'static str,
    /// The active profile's name (empty without one).
    pub profile: String,
    /// Its [`crate::fault::profile::hash_hex`] (empty without one).
    pub profile_hash: String,
    /// Per route: the rules in force that can apply to it.
    pub rules_active: Vec<(String, u64)>,
    /// Entries in the proxy's indexes keyed by what clients send, by index.
    pub tracked_entries: Vec<(&'static str, u64)>,
    /// `GET /events` subscribers dropped for falling behind.
    pub event_subscribers_dropped: u64,
    /// Bytes of unfinished WebSocket frames held, over all connections, and their limit.
    pub websocket_held_bytes: u64,
    pub websocket_held_limit_bytes: u64,
    /// Times a WebSocket connection stopped reading at `--ws-max-held`.
    pub websocket_reads_paused: u64,
}

/// The source of [`ScrapeTime`], a collector that encodes it at each scrape.
struct Scraped(Box<dyn Fn() -> ScrapeTime + Send + Sync>);

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let now = (self.0)();
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let mut m = e.encode_descriptor(
            "mqtt_chaos_build_info",
            "Always 1; labels give the version, the active profile and the hash of its text.",
            None,
            MetricType::Gauge,
        )?;
        gauge(1).encode(m.encode_family(&[
            ("version", now.version),
            ("profile", &now.profile),
            ("profile_hash", &now.profile_hash),
        ])?)?;
        let mut m = e.encode_descriptor(
            "mqtt_chaos_rules_active",
            "Rules in force that can apply to the route.",
            None,
            MetricType::Gauge,
        )?;
        for (route, n) in &now.rules_active {
            gauge(*n).encode(m.encode_family(&[("route", route.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "mqtt_chaos_tracked_entries",
            "Entries in the proxy's indexes keyed by what clients send; 0 when nothing is open or awaited.",
            None,
            MetricType::Gauge,
        )?;
        for (index, n) in &now.tracked_entries {
            gauge(*n).encode(m.encode_family(&[("index", *index)])?)?;
        }
        let counter = ConstCounter::new(now.event_subscribers_dropped);
        counter.encode(e.encode_descriptor(
            "mqtt_chaos_event_subscribers_dropped",
            "GET /events subscribers dropped because they fell more than 4,096 events behind.",
            None,
            counter.metric_type(),
        )?)?;
        gauge(now.websocket_held_bytes).encode(e.encode_descriptor(
            "mqtt_chaos_websocket_held_bytes",
            "Bytes of WebSocket frames not yet complete or not yet forwarded, over all connections.",
            None,
            MetricType::Gauge,
        )?)?;
        gauge(now.websocket_held_limit_bytes).encode(e.encode_descriptor(
            "mqtt_chaos_websocket_held_limit_bytes",
            "The limit on mqtt_chaos_websocket_held_bytes (--ws-max-held).",
            None,
            MetricType::Gauge,
        )?)?;
        let counter = ConstCounter::new(now.websocket_reads_paused);
        counter.encode(e.encode_descriptor(
            "mqtt_chaos_websocket_reads_paused",
            "Times a WebSocket connection stopped reading because --ws-max-held was reached.",
            None,
            counter.metric_type(),
        )?)
    }
}

/// The exposition formats served on `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4: what every scraper reads, and the default.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header lists `application/openmetrics-text` with a weight
    /// above zero and at least that of `text/plain` (Prometheus asks for it first); the
    /// Prometheus text format otherwise.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let weight = |wanted: &str| {
            accept
                .into_iter()
                .flat_map(|a| a.split(','))
                .filter_map(|range| {
                    let mut parts = range.split(';').map(str::trim);
                    let media = parts.next()?;
                    let q = parts
                        .filter_map(|p| p.strip_prefix("q="))
                        .find_map(|q| q.parse::<f32>().ok())
                        .unwrap_or(1.0);
                    media.eq_ignore_ascii_case(wanted).then_some(q)
                })
                .fold(0.0f32, f32::max)
        };
        let open_metrics = weight("application/openmetrics-text");
        if open_metrics > 0.0 && open_metrics >= weight("text/plain") {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The proxy's metrics: the registry every family is in, and the source of the routes' handles.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    families: Arc<Families>,
}

impl Metrics {
    /// Registers every family; `scrape` gives what only a scrape can know.
    pub fn new(scrape: impl Fn() -> ScrapeTime + Send + Sync + 'static) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scraped(Box::new(scrape))));
        let families = Arc::new(Families::register(&mut registry));
        // Every result exists from the start, at zero: a rate is 0 rather than no data.
        for result in ReloadResult::ALL {
            drop(families.profile_reloads.get_or_create(&ReloadLabels { result }));
        }
        Metrics { registry, families }
    }

    /// The watched profile file changed (or went away) and this is what came of it.
    pub fn on_profile_reload(&self, result: ReloadResult) {
        self.families.profile_reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// The handles of one route (its series exist, at zero, from now on).
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics::new(name, self.families.clone())
    }

    /// The exposition of every metric.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::with_capacity(32 * 1024);
        let written = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &self.registry),
        };
        // Only a collector can fail, and ours writes nothing it cannot encode.
        if let Err(e) = written {
            tracing::error!(error = %e, "encoding the metrics failed; the scrape is incomplete");
        }
        out
    }
}

/// The most recent values of a measurement (a ring of [`SAMPLES`]), their count and maximum:
/// exact medians for the summary where histogram buckets would only bound them.
#[derive(Debug, Default)]
pub struct Samples(Mutex<SamplesState>);

/// Values kept per [`Samples`].
pub const SAMPLES: usize = 10_000;

#[derive(Debug, Default)]
struct SamplesState {
    ring: Vec<f64>,
    next: usize,
    count: u64,
    max: Option<f64>,
}

impl Samples {
    pub fn push(&self, v: f64) {
        let mut s = lock(&self.0);
        if s.ring.len() < SAMPLES {
            s.ring.push(v);
        } else {
            let at = s.next;
            s.ring[at] = v;
        }
        s.next = (s.next + 1) % SAMPLES;
        s.count += 1;
        s.max = Some(s.max.map_or(v, |m| m.max(v)));
    }

    /// `{count, median, max}`, rounded to 3 decimals (median and max null when empty).
    pub fn describe(&self) -> Value {
        let s = lock(&self.0);
        let mut sorted = s.ring.clone();
        sorted.sort_by(f64::total_cmp);
        let median = (!sorted.is_empty()).then(|| {
            let n = sorted.len();
            if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
        });
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({"count": s.count, "median": median.map(round), "max": s.max.map(round)})
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A route's counts that the summary and the tests read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub connections: u64,
    pub active: i64,
    pub rejected: u64,
    pub upstream_failures: u64,
    pub internal_errors: u64,
    pub wills_expected: u64,
    pub wills_observed: u64,
    pub wills_missing: u64,
    pub wills_unobservable: u64,
    /// Indexed like [`TakeoverOutcome::ALL`].
    pub takeovers: [u64; 4],
}

/// A route's fault counters by rule, then (action, direction).
type FaultCounters = BTreeMap<String, Vec<(&'static str, &'static str, Counter)>>;

/// One route's metrics: handles to its series, and a method for each thing that happens.
#[derive(Debug)]
pub struct RouteMetrics {
    route: String,
    families: Arc<Families>,
    connections: Counter,
    active: Gauge,
    rejected: Counter,
    accept_errors: Counter,
    upstream_failures: Counter,
    observer_failures: Counter,
    internal_errors: Counter,
    /// By direction, then by packet type.
    packets: [[Counter; 15]; 2],
    bytes: [Counter; 2],
    malformed: [Counter; 2],
    keepalive_rewrites: Counter,
    violations: Counter,
    wills_expected: Counter,
    wills_observed: Counter,
    wills_missing: Counter,
    wills_unobservable: Counter,
    takeovers: [Counter; 4],
    keepalive_requested: Histogram,
    broker_detection_seconds: Histogram,
    broker_detection_ratio: Histogram,
    client_detection_seconds: Histogram,
    client_detection_ratio: Histogram,
    client_gap_ratio: Histogram,
    ping_rtt: Histogram,
    will_delay: Histogram,
    takeover_close_seconds: Histogram,
    connection_duration: Histogram,
    /// The route's series of `closes` and `faults`, kept for the summary (a family cannot be
    /// listed by route).
    closes: Mutex<BTreeMap<(Side, CloseHow, Cause), Counter>>,
    /// By rule, then (action, direction): a rule already counted is found without allocating.
    faults: Mutex<FaultCounters>,
    /// Exact detection ratios of recent closes, for the summary's medians.
    broker_detection: Samples,
    client_detection: Samples,
}

impl RouteMetrics {
    fn new(route: &str, f: Arc<Families>) -> RouteMetrics {
        let label = RouteLabel { route: route.to_string() };
        let by_direction = |family: &Family<DirectionLabels, Counter>| {
            Direction::BOTH.map(|direction| {
                family.get_or_create_owned(&DirectionLabels { route: route.into(), direction })
            })
        };
        let packets = Direction::BOTH.map(|direction| {
            PacketType::ALL.map(|r#type| {
                f.packets.get_or_create_owned(&PacketLabels { route: route.into(), direction, r#type })
            })
        });
        let takeovers = TakeoverOutcome::ALL
            .map(|outcome| f.takeovers.get_or_create_owned(&TakeoverLabels { route: route.into(), outcome }));
        RouteMetrics {
            connections: f.connections.get_or_create_owned(&label),
            active: f.connections_active.get_or_create_owned(&label),
            rejected: f.connections_rejected.get_or_create_owned(&label),
            accept_errors: f.accept_errors.get_or_create_owned(&label),
            upstream_failures: f.upstream_connect_failures.get_or_create_owned(&label),
            observer_failures: f.observer_connect_failures.get_or_create_owned(&label),
            internal_errors: f.internal_errors.get_or_create_owned(&label),
            packets,
            bytes: by_direction(&f.bytes),
            malformed: by_direction(&f.malformed),
            keepalive_rewrites: f.keepalive_rewrites.get_or_create_owned(&label),
            violations: f.client_keepalive_violations.get_or_create_owned(&label),
            wills_expected: f.wills_expected.get_or_create_owned(&label),
            wills_observed: f.wills_observed.get_or_create_owned(&label),
            wills_missing: f.wills_missing.get_or_create_owned(&label),
            wills_unobservable: f.wills_unobservable.get_or_create_owned(&label),
            takeovers,
            keepalive_requested: f.keepalive_requested.get_or_create_owned(&label),
            broker_detection_seconds: f.broker_detection_seconds.get_or_create_owned(&label),
            broker_detection_ratio: f.broker_detection_ratio.get_or_create_owned(&label),
            client_detection_seconds: f.client_detection_seconds.get_or_create_owned(&label),
            client_detection_ratio: f.client_detection_ratio.get_or_create_owned(&label),
            client_gap_ratio: f.client_keepalive_gap_ratio.get_or_create_owned(&label),
            ping_rtt: f.ping_rtt.get_or_create_owned(&label),
            will_delay: f.will_delay.get_or_create_owned(&label),
            takeover_close_seconds: f.takeover_close_seconds.get_or_create_owned(&label),
            connection_duration: f.connection_duration.get_or_create_owned(&label),
            closes: Mutex::default(),
            faults: Mutex::default(),
            broker_detection: Samples::default(),
            client_detection: Samples::default(),
            route: label.route,
            families: f,
        }
    }

    /// A client connection was accepted.
    pub fn on_accepted(&self) {
        self.connections.inc();
        self.active.inc();
    }

    /// A proxied connection's session ended.
    pub fn on_session_end(&self) {
        self.active.dec();
    }

    /// A client was closed at once because `--max-connections` was reached; returns how many
    /// have been so far.
    pub fn on_rejected(&self) -> u64 {
        self.rejected.inc() + 1
    }

    pub fn on_accept_error(&self) {
        self.accept_errors.inc();
    }

    pub fn on_upstream_failure(&self) {
        self.upstream_failures.inc();
    }

    pub fn on_observer_failure(&self) {
        self.observer_failures.inc();
    }

    /// A session panicked (a bug) and was closed alone.
    pub fn on_internal_error(&self) {
        self.internal_errors.inc();
    }

    /// A pump delivered a batch in `dir`: the forwarding path's only call.
    pub(crate) fn on_batch(&self, dir: Direction, batch: &Batch) {
        let d = dir.index();
        for (counter, &n) in self.packets[d].iter().zip(&batch.packets) {
            if n > 0 {
                counter.inc_by(u64::from(n));
            }
        }
        self.bytes[d].inc_by(batch.bytes);
    }

    /// The bytes in `dir` stopped being MQTT.
    pub fn on_malformed(&self, dir: Direction) {
        self.malformed[dir.index()].inc();
    }

    /// A rule was applied; `direction` is `both` for actions on the whole connection.
    pub fn on_fault(&self, rule: &str, action: &'static str, direction: &'static str) {
        let mut faults = lock(&self.faults);
        let counted =
            faults.get(rule).and_then(|v| v.iter().find(|(a, d, _)| (*a, *d) == (action, direction)));
        if let Some((_, _, counter)) = counted {
            counter.inc();
            return;
        }
        let labels = FaultLabels { route: self.route.clone(), rule: rule.to_string(), action, direction };
        let counter = self.families.faults.get_or_create_owned(&labels);
        counter.inc();
        faults.entry(rule.to_string()).or_default().push((action, direction, counter));
    }

    /// A CONNECT or CONNACK Keep Alive was rewritten.
    pub fn on_keepalive_rewrite(&self) {
        self.keepalive_rewrites.inc();
    }

    /// A DISCONNECT passed in `dir`, with its reason's name (`none` for MQTT 3.x).
    pub fn on_disconnect(&self, dir: Direction, reason: &'static str) {
        let labels = DisconnectLabels { route: self.route.clone(), direction: dir, reason };
        self.families.disconnect_reasons.get_or_create(&labels).inc();
    }

    /// A CONNECT asked for this Keep Alive.
    pub fn on_connect(&self, keep_alive_requested: Option<u16>) {
        if let Some(ka) = keep_alive_requested {
            self.keepalive_requested.observe(f64::from(ka));
        }
    }

    /// A PINGRESP came back `seconds` after its PINGREQ was forwarded.
    /// A TLS handshake with `side` succeeded after `seconds`.
    pub fn on_tls_handshake(&self, side: Side, seconds: f64) {
        let labels = SideLabels { route: self.route.clone(), side };
        self.families.tls_handshake_seconds.get_or_create(&labels).observe(seconds);
    }

    /// A TLS handshake with `side` failed.
    pub fn on_tls_failure(&self, side: Side, reason: &'static str) {
        let labels = FailureLabels { route: self.route.clone(), side, reason };
        self.families.tls_handshake_failures.get_or_create(&labels).inc();
    }

    /// A WebSocket handshake with a client failed, or `side` broke the WebSocket protocol.
    pub fn on_websocket_error(&self, side: Side, reason: &'static str) {
        let labels = FailureLabels { route: self.route.clone(), side, reason };
        self.families.websocket_errors.get_or_create(&labels).inc();
    }

    pub fn on_ping_rtt(&self, seconds: f64) {
        self.ping_rtt.observe(seconds);
    }

    /// A client stayed silent for longer than its Keep Alive allows.
    pub fn on_client_keepalive_violation(&self) {
        self.violations.inc();
    }

    /// A connection's first close: counted by who, how and cause; its duration; and, for a
    /// close that is a detection ([`Cause::detected_by`]), the silence before it.
    pub fn on_close(&self, close: &CloseInfo) {
        let (by, how, cause) = (close.closed_by, close.how, close.cause);
        let labels = ConnectionCloseLabels { route: self.route.clone(), closed_by: by, how };
        self.families.connection_closes.get_or_create(&labels).inc();
        lock(&self.closes)
            .entry((by, how, cause))
            .or_insert_with(|| {
                let labels = CloseLabels { route: self.route.clone(), by, how, cause };
                self.families.closes.get_or_create_owned(&labels)
            })
            .inc();
        self.connection_duration.observe(close.at_s);
        let (Some(side), Some(seconds), Some(ratio)) =
            (cause.detected_by(), close.silence_s, close.silence_ratio)
        else {
            return;
        };
        let (histogram, ratios, samples) = match side {
            Side::Broker => {
                (&self.broker_detection_seconds, &self.broker_detection_ratio, &self.broker_detection)
            }
            _ => (&self.client_detection_seconds, &self.client_detection_ratio, &self.client_detection),
        };
        histogram.observe(seconds);
        ratios.observe(ratio);
        samples.push(ratio);
    }

    /// A connection's longest client silence, as a multiple of its Keep Alive.
    pub fn on_client_gap(&self, ratio: f64) {
        self.client_gap_ratio.observe(ratio);
    }

    /// The broker is expected to publish a connection's Will.
    pub fn on_will_expected(&self) {
        self.wills_expected.inc();
    }

    /// What became of an expected Will; `delay_s` from the close when it was observed.
    pub fn on_will(&self, outcome: WillOutcome, delay_s: Option<f64>) {
        match outcome {
            WillOutcome::Observed => self.wills_observed.inc(),
            WillOutcome::Missing => self.wills_missing.inc(),
            WillOutcome::Unobservable => self.wills_unobservable.inc(),
        };
        if let Some(delay) = delay_s {
            self.will_delay.observe(delay);
        }
    }

    /// A takeover was settled; `close_s` from the new CONNECT when the broker closed the old
    /// connection.
    pub fn on_takeover(&self, outcome: TakeoverOutcome, close_s: Option<f64>) {
        self.takeovers[outcome as usize].inc();
        if let Some(s) = close_s {
            self.takeover_close_seconds.observe(s);
        }
    }

    /// The route's counts.
    pub fn totals(&self) -> Totals {
        Totals {
            connections: self.connections.get(),
            active: self.active.get(),
            rejected: self.rejected.get(),
            upstream_failures: self.upstream_failures.get(),
            internal_errors: self.internal_errors.get(),
            wills_expected: self.wills_expected.get(),
            wills_observed: self.wills_observed.get(),
            wills_missing: self.wills_missing.get(),
            wills_unobservable: self.wills_unobservable.get(),
            takeovers: self.takeovers.each_ref().map(Counter::get),
        }
    }

    /// First closes by (who, how, cause), those seen at least once.
    pub fn closes(&self) -> Vec<((Side, CloseHow, Cause), u64)> {
        lock(&self.closes).iter().map(|(k, c)| (*k, c.get())).collect()
    }

    /// Fault applications by (rule, action, direction).
    pub fn faults(&self) -> Vec<((String, &'static str, &'static str), u64)> {
        let faults = lock(&self.faults);
        let each = faults
            .iter()
            .flat_map(|(rule, v)| v.iter().map(move |(a, d, c)| ((rule.clone(), *a, *d), c.get())));
        each.collect()
    }

    /// How often `rule` was applied on this route, summed over actions and directions.
    pub fn fault_count(&self, rule: &str) -> u64 {
        lock(&self.faults).get(rule).map_or(0, |v| v.iter().map(|(_, _, c)| c.get()).sum())
    }

    /// How often the bytes in `dir` stopped being MQTT.
    pub fn malformed(&self, dir: Direction) -> u64 {
        self.malformed[dir.index()].get()
    }

    /// Exact detection ratios of recent closes by `side`'s detection (broker or client).
    pub fn detections(&self, side: Side) -> &Samples {
        match side {
            Side::Broker => &self.broker_detection,
            _ => &self.client_detection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_give_an_exact_median_and_max_and_keep_only_the_most_recent() {
        let s = Samples::default();
        assert_eq!(s.describe(), json!({"count": 0, "median": null, "max": null}));
        for v in [1.5, 4.1, 1.6] {
            s.push(v);
        }
        assert_eq!(s.describe(), json!({"count": 3, "median": 1.6, "max": 4.1}));
        s.push(2.0);
        assert_eq!(s.describe()["median"], json!(1.8), "even count: the mean of the middle two");
        for _ in 0..SAMPLES {
            s.push(1.0);
        }
        assert_eq!(s.describe(), json!({"count": SAMPLES + 4, "median": 1.0, "max": 4.1}));
    }

    #[test]
    fn openmetrics_is_served_only_to_a_scraper_that_asks_for_it_first() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("Application/OpenMetrics-Text")), Format::OpenMetrics);
        for other in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("application/openmetrics-text;q=0"),
            Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"),
        ] {
            assert_eq!(Format::negotiate(other), Format::Prometheus, "{other:?}");
        }
    }

    fn scraped() -> ScrapeTime {
        ScrapeTime {
            version: "1.2.3",
            profile: "p".into(),
            profile_hash: "00ff".into(),
            rules_active: vec![("r".into(), 2)],
            tracked_entries: vec![("wills", 3)],
            event_subscribers_dropped: 4,
            websocket_held_bytes: 5,
            websocket_held_limit_bytes: 6,
            websocket_reads_paused: 7,
        }
    }

    #[test]
    fn what_a_route_reports_is_exposed_under_its_labels() {
        let metrics = Metrics::new(scraped);
        let r = metrics.route("r");
        let mut batch = Batch::default();
        batch.count(PacketType::Pingreq);
        batch.count(PacketType::Pingreq);
        batch.bytes = 4;
        r.on_batch(Direction::ClientToBroker, &batch);
        r.on_fault("quote\"back\\slash", "drop", "client_to_broker");
        r.on_fault("quote\"back\\slash", "drop", "client_to_broker");
        r.on_close(&CloseInfo {
            closed_by: Side::Broker,
            how: CloseHow::Fin,
            cause: Cause::KeepaliveTimeout,
            disconnect_reason: None,
            reason: None,
            at_s: 10.0,
            silence_s: Some(3.0),
            silence_ratio: Some(1.5),
            keep_alive_enforced: Some(2),
        });
        r.on_takeover(TakeoverOutcome::Preempted, None);
        metrics.on_profile_reload(ReloadResult::Invalid);
        let text = metrics.encode(Format::Prometheus);
        for line in [
            "mqtt_chaos_packets_total{route=\"r\",direction=\"client_to_broker\",type=\"PINGREQ\"} 2",
            "mqtt_chaos_packets_total{route=\"r\",direction=\"broker_to_client\",type=\"PINGRESP\"} 0",
            "mqtt_chaos_bytes_total{route=\"r\",direction=\"client_to_broker\"} 4",
            "mqtt_chaos_faults_total{route=\"r\",rule=\"quote\\\"back\\\\slash\",action=\"drop\",direction=\"client_to_broker\"} 2",
            "mqtt_chaos_closes_total{route=\"r\",by=\"broker\",how=\"fin\",cause=\"keepalive_timeout\"} 1",
            "mqtt_chaos_connection_closes_total{route=\"r\",closed_by=\"broker\",how=\"fin\"} 1",
            "mqtt_chaos_broker_detection_ratio_bucket{route=\"r\",le=\"1.5\"} 1",
            "mqtt_chaos_broker_detection_ratio_bucket{route=\"r\",le=\"1.4\"} 0",
            "mqtt_chaos_broker_detection_seconds_count{route=\"r\"} 1",
            "mqtt_chaos_client_detection_ratio_count{route=\"r\"} 0",
            "mqtt_chaos_takeovers_total{route=\"r\",outcome=\"preempted\"} 1",
            "mqtt_chaos_takeovers_total{route=\"r\",outcome=\"not_enforced\"} 0",
            "mqtt_chaos_build_info{version=\"1.2.3\",profile=\"p\",profile_hash=\"00ff\"} 1",
            "mqtt_chaos_profile_reloads_total{result=\"invalid\"} 1",
            "mqtt_chaos_profile_reloads_total{result=\"applied\"} 0",
            "mqtt_chaos_rules_active{route=\"r\"} 2",
            "mqtt_chaos_tracked_entries{index=\"wills\"} 3",
            "mqtt_chaos_event_subscribers_dropped_total 4",
            "mqtt_chaos_websocket_held_bytes 5",
            "mqtt_chaos_websocket_held_limit_bytes 6",
            "mqtt_chaos_websocket_reads_paused_total 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert_eq!(r.fault_count("quote\"back\\slash"), 2);
        assert_eq!(r.detections(Side::Broker).describe()["median"], 1.5);
        assert_eq!(r.totals().takeovers, [0, 0, 0, 1]);
    }

    #[test]
    fn only_a_detection_cause_feeds_the_detection_histograms() {
        let metrics = Metrics::new(ScrapeTime::default);
        let r = metrics.route("r");
        for cause in [Cause::Takeover, Cause::NoConnack, Cause::Abrupt, Cause::ClientGaveUp] {
            let closed_by = if cause == Cause::ClientGaveUp { Side::Client } else { Side::Broker };
            r.on_close(&CloseInfo {
                closed_by,
                how: CloseHow::Fin,
                cause,
                disconnect_reason: None,
                reason: None,
                at_s: 1.0,
                silence_s: Some(0.5),
                silence_ratio: Some(0.25),
                keep_alive_enforced: Some(2),
            });
        }
        assert_eq!(r.detections(Side::Broker).describe()["count"], 0);
        assert_eq!(r.detections(Side::Client).describe()["count"], 1);
        assert_eq!(r.closes().len(), 4);
    }
}
