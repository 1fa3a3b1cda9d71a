//! Prometheus metrics: the per-route state behind them and the text exposition.
//!
//! Everything the forwarding path touches is a plain atomic that a pump adds to once per batch
//! ([`crate::route::RouteStats`]); event-driven measurements (detection times, Wills, takeovers)
//! are recorded by [`crate::monitor`]. Nothing is registered per packet and no label ever holds
//! a client id, a username or an address. [`render`] writes the Prometheus text format (0.0.4),
//! which Prometheus and every OpenMetrics-capable scraper read. Every metric is documented in
//! METRICS.md; a test checks the two name the same set.

use crate::fault::RuleSet;
use crate::route::Route;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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

/// A lock-free histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts, one per bound plus +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations, as f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let i = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        let _ =
            self.sum.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + value).to_bits()));
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Relaxed))
    }
}

/// Writes metric families in the Prometheus text format.
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn new() -> Self {
        Exposition { out: String::with_capacity(16 * 1024) }
    }

    /// Starts a family: `# HELP` and `# TYPE`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample with labels.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", fmt_value(value));
    }

    /// All samples of a histogram with labels.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (i, bound) in h.bounds.iter().map(|b| fmt_value(*b)).chain(["+Inf".to_string()]).enumerate() {
            cumulative += h.counts[i].load(Relaxed);
            self.out.push_str(name);
            self.out.push_str("_bucket");
            write_labels(&mut self.out, labels, Some(&bound));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", fmt_value(h.sum()));
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {cumulative}");
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn fmt_value(v: f64) -> String {
    if v.is_infinite() { if v > 0.0 { "+Inf".into() } else { "-Inf".into() } } else { format!("{v}") }
}

/// Renders every metric of every route.
pub fn render(
    routes: &[std::sync::Arc<Route>],
    rules: &RuleSet,
    registry: &crate::record::Registry,
    version: &str,
) -> String {
    let mut e = Exposition::new();
    e.family("mqtt_chaos_build_info", "gauge", "Always 1; labels give the version and the active profile.");
    let profile = rules.profile.as_deref().unwrap_or("");
    e.sample("mqtt_chaos_build_info", &[("version", version), ("profile", profile)], 1.0);

    e.family("mqtt_chaos_rules_active", "gauge", "Rules in force that can apply to the route.");
    for r in routes {
        let n = rules
            .rules
            .iter()
            .filter(|rule| rule.matcher.route.as_ref().is_none_or(|n| n.contains(&r.name)))
            .count();
        e.sample("mqtt_chaos_rules_active", &[("route", &r.name)], n as f64);
    }
    e.family(
        "mqtt_chaos_tracked_entries",
        "gauge",
        "Entries in the proxy's indexes keyed by what clients send; 0 when nothing is open or awaited.",
    );
    for (index, n) in registry.tracked_entries() {
        e.sample("mqtt_chaos_tracked_entries", &[("index", index)], n as f64);
    }
    e.family(
        "mqtt_chaos_event_subscribers_dropped_total",
        "counter",
        "GET /events subscribers dropped because they fell more than 4,096 events behind.",
    );
    e.sample("mqtt_chaos_event_subscribers_dropped_total", &[], registry.events_dropped.load(Relaxed) as f64);
    crate::route::RouteStats::render_all(routes, &mut e);
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_is_kept() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.histogram("x", &[("route", "r")], &h);
        assert_eq!(
            e.out,
            "x_bucket{route=\"r\",le=\"1\"} 2\nx_bucket{route=\"r\",le=\"2\"} 3\nx_bucket{route=\"r\",le=\"+Inf\"} 4\n\
             x_sum{route=\"r\"} 6\nx_count{route=\"r\"} 4\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::new();
        e.sample("m", &[("rule", "a\"b\\c\nd")], 1.0);
        assert_eq!(e.out, "m{rule=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
