//! The headline answer without Prometheus: per route, connections, closes, who detected a dead
//! peer and after how many Keep Alives, Wills, takeovers and faults by rule. Served as
//! `GET /summary`, printed by `ctl summary`, and logged when the proxy stops.
//!
//! Detection medians and maxima come from [`crate::metrics::Samples`]: the exact ratios of the
//! most recent closes (at most [`crate::metrics::SAMPLES`] per route and side), not histogram
//! buckets.

use crate::route::Route;
use crate::vocab::{Side, TakeoverOutcome};
use serde_json::{Value, json};
use std::sync::Arc;

/// The summary of every route, as JSON (`GET /summary`).
pub fn of(routes: &[Arc<Route>]) -> Value {
    let routes: Vec<Value> = routes
        .iter()
        .map(|r| {
            let m = &r.metrics;
            let t = m.totals();
            let closes: Vec<Value> = m
                .closes()
                .into_iter()
                .map(|((by, how, cause), n)| {
                    json!({"closed_by": by.as_str(), "how": how.as_str(), "cause": cause.as_str(), "count": n})
                })
                .collect();
            let faults: Vec<Value> = m
                .faults()
                .into_iter()
                .map(|((rule, action, direction), n)| {
                    json!({"rule": rule, "action": action, "direction": direction, "count": n})
                })
                .collect();
            json!({
                "route": r.name,
                "upstream": r.upstream,
                "connections": {
                    "total": t.connections,
                    "active": t.active,
                    "rejected": t.rejected,
                    "upstream_failures": t.upstream_failures,
                },
                "closes": closes,
                "broker_detection_ratio": m.detections(Side::Broker).describe(),
                "client_detection_ratio": m.detections(Side::Client).describe(),
                "wills": {
                    "expected": t.wills_expected,
                    "observed": t.wills_observed,
                    "missing": t.wills_missing,
                    "unobservable": t.wills_unobservable,
                },
                "takeovers": TakeoverOutcome::ALL
                    .iter()
                    .zip(t.takeovers)
                    .map(|(o, n)| (o.as_str().to_string(), json!(n)))
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
        if TakeoverOutcome::ALL.iter().any(|o| n(&t[o.as_str()]) > 0) {
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
