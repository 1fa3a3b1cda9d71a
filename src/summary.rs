//! The headline answer without Prometheus: per route, connections, closes, who detected a dead
//! peer and after how many Keep Alives, Wills, takeovers and faults by rule. Served as
//! `GET /summary`, printed by `ctl summary`, and logged when the proxy stops.
//!
//! Detection medians and maxima come from [`Samples`]: the exact ratios of the most recent
//! closes (at most [`SAMPLES`] per route and side), not histogram buckets.

use crate::monitor::TAKEOVER_OUTCOMES;
use crate::route::Route;
use serde_json::{Value, json};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

/// Detection ratios kept per route and side for the summary's median.
pub const SAMPLES: usize = 10_000;

/// The most recent values of a measurement (a ring of [`SAMPLES`]), their count and maximum.
#[derive(Debug, Default)]
pub struct Samples(Mutex<SamplesState>);

#[derive(Debug, Default)]
struct SamplesState {
    ring: Vec<f64>,
    next: usize,
    count: u64,
    max: Option<f64>,
}

impl Samples {
    pub fn push(&self, v: f64) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
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
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
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

/// The summary of every route, as JSON (`GET /summary`).
pub fn of(routes: &[Arc<Route>]) -> Value {
    let routes: Vec<Value> = routes
        .iter()
        .map(|r| {
            let s = &r.stats;
            let closes: Vec<Value> = s
                .closes_by_cause
                .snapshot()
                .into_iter()
                .map(|((by, how, cause), n)| json!({"closed_by": by, "how": how, "cause": cause, "count": n}))
                .collect();
            let faults: Vec<Value> = s
                .faults
                .snapshot()
                .into_iter()
                .map(|((rule, action, direction), n)| {
                    json!({"rule": rule, "action": action, "direction": direction, "count": n})
                })
                .collect();
            json!({
                "route": r.name,
                "upstream": r.upstream,
                "connections": {
                    "total": s.connections_total.load(Relaxed),
                    "active": s.connections_active.load(Relaxed),
                    "rejected": s.connections_rejected.load(Relaxed),
                    "upstream_failures": s.upstream_connect_failures.load(Relaxed),
                },
                "closes": closes,
                "broker_detection_ratio": s.broker_detection.describe(),
                "client_detection_ratio": s.client_detection.describe(),
                "wills": {
                    "expected": s.wills_expected.load(Relaxed),
                    "observed": s.wills_observed.load(Relaxed),
                    "missing": s.wills_missing.load(Relaxed),
                    "unobservable": s.wills_unobservable.load(Relaxed),
                },
                "takeovers": TAKEOVER_OUTCOMES
                    .iter()
                    .map(|&o| (o.to_string(), json!(s.takeovers.get(&o))))
                    .collect::<serde_json::Map<_, _>>(),
                "faults": faults,
            })
        })
        .collect();
    json!({ "routes": routes })
}

/// The summary as lines a person reads (`ctl summary`, the log at stop).
pub fn text(summary: &Value) -> String {
    let mut out = String::new();
    for r in summary["routes"].as_array().into_iter().flatten() {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let c = &r["connections"];
        out.push_str(&format!(
            "route {} → {}: {} connections ({} open, {} rejected, {} failed to reach the broker)\n",
            r["route"].as_str().unwrap_or(""),
            r["upstream"].as_str().unwrap_or(""),
            n(&c["total"]),
            n(&c["active"]),
            n(&c["rejected"]),
            n(&c["upstream_failures"])
        ));
        let closes: Vec<String> = r["closes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{} {} ({} by {})",
                    n(&c["count"]),
                    c["cause"].as_str().unwrap_or(""),
                    c["how"].as_str().unwrap_or(""),
                    c["closed_by"].as_str().unwrap_or("")
                )
            })
            .collect();
        if !closes.is_empty() {
            out.push_str(&format!("  closes: {}\n", closes.join(", ")));
        }
        for (side, key) in [("broker", "broker_detection_ratio"), ("client", "client_detection_ratio")] {
            let d = &r[key];
            if n(&d["count"]) > 0 {
                out.push_str(&format!(
                    "  {side} detected a silent peer {} times: median {} × Keep Alive, max {} ×\n",
                    n(&d["count"]),
                    d["median"],
                    d["max"]
                ));
            }
        }
        let w = &r["wills"];
        if n(&w["expected"]) > 0 {
            out.push_str(&format!(
                "  Wills: {} expected, {} observed, {} missing, {} unobservable (nothing watched their topic)\n",
                n(&w["expected"]),
                n(&w["observed"]),
                n(&w["missing"]),
                n(&w["unobservable"])
            ));
        }
        let t = &r["takeovers"];
        if TAKEOVER_OUTCOMES.iter().any(|o| n(&t[o]) > 0) {
            out.push_str(&format!(
                "  takeovers: {} old connection closed, {} with DISCONNECT 0x8E, {} not enforced, {} preempted\n",
                n(&t["closed"]),
                n(&t["disconnect_0x8e"]),
                n(&t["not_enforced"]),
                n(&t["preempted"])
            ));
        }
        for f in r["faults"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  fault {} ({} {}): {} times\n",
                f["rule"].as_str().unwrap_or(""),
                f["action"].as_str().unwrap_or(""),
                f["direction"].as_str().unwrap_or(""),
                n(&f["count"])
            ));
        }
    }
    out
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
}
