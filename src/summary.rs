//! The headline answer without Prometheus: per route, connections, closes, who detected a dead
//! peer and after how many Keep Alives, Wills, takeovers and faults by rule. Served as
//! `GET /summary`, printed by `ctl summary`, and logged when the proxy stops.
//!
//! Detection medians and maxima come from [`crate::metrics::Samples`]: the exact ratios of the
//! most recent closes (at most [`crate::metrics::SAMPLES`] per route and side), not histogram
//! buckets.

use crate::route::Route;
use crate::text::escaped;
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

/// `n` with its noun, singular for one: `1 connection`, `2 connections`.
fn counted(n: u64, one: &str, many: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

/// How often: `once`, `3 times`.
fn times(n: u64) -> String {
    if n == 1 { "once".to_string() } else { format!("{n} times") }
}

/// One entry of the closes line: `2 keepalive_timeout (fin by the broker)`; the proxy's own
/// closes (cause `proxy`, closed by the proxy) say so once: `1 ended by the proxy (fin)`.
fn close_words(n: u64, cause: &str, how: &str, by: &str) -> String {
    if cause == "proxy" && by == "proxy" {
        format!("{n} ended by the proxy ({how})")
    } else {
        format!("{n} {cause} ({how} by the {by})")
    }
}

/// The summary as lines a person reads (`ctl summary`, the log at stop); the names in it are
/// escaped (`ctl` may be reading a server it does not control).
pub fn text(summary: &Value) -> String {
    let mut out = String::new();
    for r in summary["routes"].as_array().into_iter().flatten() {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let c = &r["connections"];
        out.push_str(&format!(
            "route {} → {}: {} ({} open, {} rejected, {} failed to reach the broker)\n",
            escaped(r["route"].as_str().unwrap_or("")),
            escaped(r["upstream"].as_str().unwrap_or("")),
            counted(n(&c["total"]), "connection", "connections"),
            n(&c["active"]),
            n(&c["rejected"]),
            n(&c["upstream_failures"])
        ));
        let closes: Vec<String> = r["closes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                close_words(
                    n(&c["count"]),
                    &escaped(c["cause"].as_str().unwrap_or("")),
                    &escaped(c["how"].as_str().unwrap_or("")),
                    &escaped(c["closed_by"].as_str().unwrap_or("")),
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
                    "  {side} detected a silent peer {}: median {} × Keep Alive, max {} ×\n",
                    times(n(&d["count"])),
                    d["median"],
                    d["max"]
                ));
            }
        }
        // Each expected Will ends in exactly one outcome, or is still awaited: the parts add up.
        let w = &r["wills"];
        let expected = n(&w["expected"]);
        if expected > 0 {
            let [observed, missing, unobservable] =
                [&w["observed"], &w["missing"], &w["unobservable"]].map(n);
            let settled = observed.saturating_add(missing).saturating_add(unobservable);
            let awaited = expected.saturating_sub(settled);
            out.push_str(&format!(
                "  Wills: {expected} expected = {observed} observed + {missing} missing + {unobservable} unobservable \
                 (nothing watched their topic) + {awaited} still awaited\n"
            ));
        }
        let t = &r["takeovers"];
        if TakeoverOutcome::ALL.iter().any(|o| n(&t[o.as_str()]) > 0) {
            out.push_str(&format!(
                "  takeovers by outcome: old connection closed {}, DISCONNECT 0x8E {}, not enforced {}, preempted {}\n",
                n(&t["closed"]),
                n(&t["disconnect_0x8e"]),
                n(&t["not_enforced"]),
                n(&t["preempted"])
            ));
        }
        for f in r["faults"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  fault {} ({} {}): applied {}\n",
                escaped(f["rule"].as_str().unwrap_or("")),
                escaped(f["action"].as_str().unwrap_or("")),
                escaped(f["direction"].as_str().unwrap_or("")),
                times(n(&f["count"]))
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(connections: u64, closes: Value, detections: u64, wills: Value, faults: Value) -> Value {
        json!({"routes": [{
            "route": "default",
            "upstream": "127.0.0.1:1883",
            "connections": {"total": connections, "active": 0, "rejected": 0, "upstream_failures": 0},
            "closes": closes,
            "broker_detection_ratio": {"count": detections, "median": 1.5, "max": 1.5},
            "client_detection_ratio": {"count": 0},
            "wills": wills,
            "takeovers": {"closed": 0, "disconnect_0x8e": 0, "not_enforced": 0, "preempted": 0},
            "faults": faults,
        }]})
    }

    #[test]
    fn one_of_something_is_singular_and_several_are_plural() {
        let one = text(&route(
            1,
            json!([]),
            1,
            json!({"expected": 0}),
            json!([{"rule": "mute", "action": "drop", "direction": "client_to_broker", "count": 1}]),
        ));
        assert!(one.contains(": 1 connection (0 open"), "{one}");
        assert!(one.contains("broker detected a silent peer once: median 1.5 × Keep Alive"), "{one}");
        assert!(one.contains("fault mute (drop client_to_broker): applied once\n"), "{one}");
        assert!(!one.contains(" 1 times") && !one.contains("1 connections"), "{one}");
        let many = text(&route(
            3,
            json!([]),
            2,
            json!({"expected": 0}),
            json!([{"rule": "mute", "action": "drop", "direction": "client_to_broker", "count": 3}]),
        ));
        assert!(many.contains(": 3 connections (0 open"), "{many}");
        assert!(many.contains("broker detected a silent peer 2 times: median"), "{many}");
        assert!(many.contains("fault mute (drop client_to_broker): applied 3 times\n"), "{many}");
    }

    #[test]
    fn a_close_by_the_proxy_names_the_proxy_once_and_others_name_who_closed() {
        let s = text(&route(
            3,
            json!([
                {"closed_by": "proxy", "how": "fin", "cause": "proxy", "count": 1},
                {"closed_by": "broker", "how": "fin", "cause": "keepalive_timeout", "count": 2},
            ]),
            0,
            json!({"expected": 0}),
            json!([]),
        ));
        assert!(
            s.contains("  closes: 1 ended by the proxy (fin), 2 keepalive_timeout (fin by the broker)\n"),
            "{s}"
        );
        assert!(!s.contains("proxy by proxy") && !s.contains("by proxy"), "{s}");
    }

    #[test]
    fn the_wills_outcomes_and_those_still_awaited_add_up_to_the_expected() {
        let s = text(&route(
            5,
            json!([]),
            0,
            json!({"expected": 5, "observed": 2, "missing": 1, "unobservable": 1}),
            json!([]),
        ));
        assert!(
            s.contains(
                "Wills: 5 expected = 2 observed + 1 missing + 1 unobservable (nothing watched their topic) + 1 still awaited\n"
            ),
            "{s}"
        );
        let settled = text(&route(
            1,
            json!([]),
            0,
            json!({"expected": 1, "observed": 1, "missing": 0, "unobservable": 0}),
            json!([]),
        ));
        assert!(settled.contains("Wills: 1 expected = 1 observed + 0 missing + 0 unobservable"), "{settled}");
        assert!(settled.contains("+ 0 still awaited"), "{settled}");
        let none = text(&route(1, json!([]), 0, json!({"expected": 0}), json!([])));
        assert!(!none.contains("Wills"), "no line without an expected Will: {none}");
    }
}
