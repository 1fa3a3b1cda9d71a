//! The Grafana dashboard against a real Prometheus that scraped the proxy during a scenario
//! (over TCP, TLS and WebSocket routes), against a fleet of two proxies scraped by one
//! Prometheus (the fleet panels sum both, the per-proxy ones show each), and against METRICS.md:
//! every metric family has a panel, and every query follows the proxy and route variables.

use crate::harness::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(5);

fn dashboard() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards/mqtt-chaos.json"))
            .unwrap();
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Every panel with queries (rows have none; a collapsed row holds its panels).
fn query_panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten().cloned());
        } else {
            out.push(panel.clone());
        }
    }
    out
}

/// Every PromQL expression in the dashboard, with the panel it belongs to.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in query_panels(&dashboard()) {
        let title = panel["title"].as_str().unwrap().to_string();
        let targets =
            panel["targets"].as_array().unwrap_or_else(|| panic!("{title}: a panel without targets"));
        for target in targets {
            out.push((title.clone(), target["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// The expression of the query `legend` (its legendFormat, or refId) of the panel `title`.
fn panel_query(title: &str, legend: &str) -> String {
    let panel = query_panels(&dashboard())
        .into_iter()
        .find(|p| p["title"] == title)
        .unwrap_or_else(|| panic!("the dashboard has no panel {title:?}"));
    let target = panel["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["legendFormat"] == legend || t["refId"] == legend)
        .unwrap_or_else(|| panic!("the panel {title:?} has no query {legend:?}"))
        .clone();
    target["expr"].as_str().unwrap().to_string()
}

/// A template variable's `label_values(SELECTOR, LABEL)` as the Prometheus API call Grafana
/// makes for it, with `instance` for `$instance`.
fn variable_values_call(name: &str, instance: &str) -> String {
    let dash = dashboard();
    let var = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("the dashboard has no variable {name}"))
        .clone();
    assert_eq!(
        (&var["multi"], &var["includeAll"], &var["allValue"]),
        (&json!(true), &json!(true), &json!(".*"))
    );
    let def = var["query"]["query"].as_str().unwrap();
    let args = def.strip_prefix("label_values(").and_then(|d| d.strip_suffix(')')).expect(def);
    let (selector, label) = args.rsplit_once(", ").expect(def);
    let selector = selector.replace("$instance", instance);
    format!("/api/v1/label/{label}/values?match[]={}", percent_encode(&selector))
}

/// The metric names a PromQL expression (or the variables' queries) mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("mqtt_chaos_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_family_of_metrics_md_has_a_dashboard_panel() {
    let metrics_md = include_str!("../../METRICS.md");
    let families: Vec<&str> = metrics_md
        .lines()
        .filter_map(|l| l.strip_prefix("| `mqtt_chaos_"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert!(families.len() >= 30, "METRICS.md's tables were read: {families:?}");
    let used: BTreeSet<String> =
        dashboard_queries().iter().flat_map(|(_, expr)| metric_names(expr)).collect();
    // Kept for existing queries; `mqtt_chaos_closes_total` has the same with the cause.
    let exempt = ["connection_closes_total"];
    let missing: Vec<String> = families
        .iter()
        .filter(|f| !exempt.contains(f))
        .map(|f| format!("mqtt_chaos_{f}"))
        .filter(|f| {
            ["", "_bucket", "_count", "_sum"].iter().all(|suffix| !used.contains(&format!("{f}{suffix}")))
        })
        .collect();
    assert!(missing.is_empty(), "metric families without a panel: {missing:?}");
}

/// METRICS.md's families, each with whether its series carry `route`.
fn metrics_md_families() -> BTreeMap<String, bool> {
    include_str!("../../METRICS.md")
        .lines()
        .filter(|l| l.starts_with("| `mqtt_chaos_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let labels = cells[3];
            (cells[1].trim_matches('`').to_string(), labels == "route" || labels.starts_with("route,"))
        })
        .collect()
}

#[test]
fn every_dashboard_query_follows_the_proxy_and_the_route_variables() {
    let families = metrics_md_families();
    assert!(families.values().filter(|r| **r).count() >= 30, "METRICS.md's labels were read: {families:?}");
    let mut wrong = Vec::new();
    for (panel, expr) in dashboard_queries() {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("mqtt_chaos_") {
            let name_len = rest[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len() - at);
            let name = &rest[at..at + name_len];
            rest = &rest[at + name_len..];
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|f| families.contains_key(*f))
                .unwrap_or(name);
            let Some(&has_route) = families.get(family) else {
                wrong.push(format!("{panel}: {name} is not in METRICS.md"));
                continue;
            };
            let matchers = rest.strip_prefix('{').and_then(|r| r.split_once('}')).map_or("", |(m, _)| m);
            let mut want = vec![r#"instance=~"$instance""#];
            if has_route {
                want.push(r#"route=~"$route""#);
            }
            for w in want {
                if !matchers.split(", ").any(|m| m == w) {
                    wrong.push(format!("{panel}: {name} without {w} in {expr}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "queries that ignore the dashboard's variables:\n{}", wrong.join("\n"));
}

/// The proxy binary with a routes file, once each route and the admin API listen. Killed on drop.
fn proxy_with_routes(routes: &std::path::Path, admin: &str, listening: &[&str]) -> KillOnDrop {
    let child = KillOnDrop(
        Command::new(binary())
            .args(["proxy", "--config", routes.to_str().unwrap(), "--admin", admin, "--will-timeout", "3s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for addr in listening.iter().copied().chain([admin]) {
        let up = (0..200).any(|_| {
            let up = std::net::TcpStream::connect(addr).is_ok();
            if !up {
                std::thread::sleep(Duration::from_millis(25));
            }
            up
        });
        assert!(up, "the proxy did not start listening on {addr}");
    }
    child
}

/// What Grafana substitutes before sending a query, with All selected in both variables.
fn grafana_substitute(expr: &str) -> String {
    grafana_substitute_for(expr, ".*")
}

/// What Grafana substitutes before sending a query, with `instance` for `$instance` (`.*` for
/// All; for selected proxies, their regex-escaped addresses as `(a|b)`, each `.` as `\\.`).
fn grafana_substitute_for(expr: &str, instance: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "5m")
        .replace("$__interval", "5s")
        .replace("$route", ".*")
        .replace("$instance", instance)
}

#[tokio::test]
async fn every_dashboard_query_parses_and_returns_data_after_a_scenario() {
    let broker = Mosquitto::start();
    let pki = crate::tls::Pki::new();
    let admin = format!("127.0.0.1:{}", free_port());
    let [tcp_addr, tls_addr, ws_addr] = [0; 3].map(|_| format!("127.0.0.1:{}", free_port()));
    let routes = pki.path("routes.toml");
    std::fs::write(
        &routes,
        format!(
            "[[route]]\nname = \"default\"\nlisten = \"{tcp_addr}\"\nupstream = \"{up}\"\n\n\
             [[route]]\nname = \"tls\"\nlisten = \"mqtts://{tls_addr}\"\nupstream = \"{up}\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\n\
             [[route]]\nname = \"ws\"\nlisten = \"ws://{ws_addr}/mqtt\"\nupstream = \"{up}\"\n",
            up = broker.addr(),
            cert = pki.path("server.pem").display(),
            key = pki.path("server.key").display(),
        ),
    )
    .unwrap();
    let _proxy = proxy_with_routes(&routes, &admin, &[&tcp_addr, &tls_addr, &ws_addr]);
    let prometheus = Prometheus::start(&admin);
    let proxy_addr: std::net::SocketAddr = tcp_addr.parse().unwrap();
    let api = mqtt_chaos::ctl::Client::new(&format!("http://{admin}"), None).unwrap();
    for rule in [
        json!({"name": "mute-victims", "action": "drop", "direction": "client_to_broker", "packets": ["PINGREQ"], "match": {"client_id": "victim-*"}}),
        json!({"name": "shrink", "action": "rewrite_keepalive", "set": 30, "match": {"client_id": "shrunk-*"}}),
    ] {
        let r = api
            .request("POST", "/rules", Some("application/json"), rule.to_string().as_bytes())
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }

    // A watcher of Wills behind the proxy.
    let mut watcher = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    watcher.write_all(&connect_v4("watcher", 60, None)).await.unwrap();
    expect_packet(&mut watcher, WAIT, "CONNACK").await;
    watcher.write_all(&subscribe_v4(1, "status/#", 0)).await.unwrap();
    expect_packet(&mut watcher, WAIT, "SUBACK").await;
    // A victim whose pings vanish: broker detection, a Will, faults.
    let victim = tokio::spawn(pinging_client(
        proxy_addr,
        "victim-1",
        2,
        Some(("status/victim-1", "offline")),
        Some(Duration::from_secs(1)),
        Duration::from_secs(14),
    ));
    // A healthy pinger: round trips.
    let pinger = tokio::spawn(pinging_client(
        proxy_addr,
        "pinger",
        10,
        None,
        Some(Duration::from_millis(300)),
        Duration::from_secs(3),
    ));
    // A takeover, a polite client, a client that vanishes, a rewritten Keep Alive, garbage.
    let mut twin = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    twin.write_all(&connect_v4("twin", 60, None)).await.unwrap();
    expect_packet(&mut twin, WAIT, "CONNACK").await;
    let mut twin2 = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    twin2.write_all(&connect_v4("twin", 60, None)).await.unwrap();
    expect_packet(&mut twin2, WAIT, "CONNACK").await;
    let _ = read_to_end(&mut twin, WAIT).await;
    drop(twin);
    for (id, polite) in [("polite", true), ("shrunk-1", false)] {
        let mut c = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
        c.write_all(&connect_v4(id, 60, None)).await.unwrap();
        expect_packet(&mut c, WAIT, "CONNACK").await;
        if polite {
            c.write_all(&DISCONNECT).await.unwrap();
            let _ = read_to_end(&mut c, WAIT).await;
        }
    }
    let mut garbage = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
    garbage.write_all(&[0x00, 0x00, 0x00]).await.unwrap();
    let _ = read_to_end(&mut garbage, Duration::from_secs(1)).await;
    // A device over TLS (a handshake), a plaintext client on the TLS listener (a handshake
    // failure), a plain HTTP request on the WebSocket listener (a WebSocket error).
    let mut device = pki.connect(&tls_addr, false).await.expect("the TLS handshake");
    device.write_all(&connect_v4("tls-device", 60, None)).await.unwrap();
    expect_packet(&mut device, WAIT, "CONNACK over TLS").await;
    let mut plaintext = tokio::net::TcpStream::connect(&tls_addr).await.unwrap();
    plaintext.write_all(&connect_v4("plaintext", 60, None)).await.unwrap();
    let _ = read_to_end(&mut plaintext, WAIT).await;
    let mut http = tokio::net::TcpStream::connect(&ws_addr).await.unwrap();
    http.write_all(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let (answer, _) = read_to_end(&mut http, WAIT).await;
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));

    assert_eq!(pinger.await.unwrap().ending, Ending::Open);
    assert_eq!(victim.await.unwrap().ending, Ending::Eof, "mosquitto closed the muted victim");
    expect_packet(&mut watcher, WAIT, "the victim's Will").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few more scrapes

    let count = prometheus.query("sum(mqtt_chaos_broker_detection_ratio_count)").await;
    assert_eq!(count["data"]["result"][0]["value"][1], "1", "{count}");
    let observed = prometheus.query("sum(mqtt_chaos_wills_observed_total)").await;
    assert_eq!(observed["data"]["result"][0]["value"][1], "1", "{observed}");
    for (expr, what) in [
        (r#"sum(mqtt_chaos_tls_handshake_seconds_count{route="tls",side="client"})"#, "the TLS handshake"),
        (
            r#"sum(mqtt_chaos_tls_handshake_failures_total{route="tls",side="client",reason="not_tls"})"#,
            "the plaintext client's failed handshake",
        ),
        (
            r#"sum(mqtt_chaos_websocket_errors_total{route="ws",side="client",reason="bad_request"})"#,
            "the plain HTTP request's WebSocket error",
        ),
    ] {
        // At least: the readiness check's bare connect counts on the TLS and WebSocket listeners too.
        let answer = prometheus.query(expr).await;
        let n = answer["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok());
        assert!(n.is_some_and(|n| n >= 1.0), "{what}: {expr} → {answer}");
    }

    let instances = prometheus.api(&variable_values_call("instance", ".*")).await;
    assert_eq!(instances["data"], json!([admin]), "the $instance variable's query");
    let routes = prometheus.api(&variable_values_call("route", ".*")).await;
    assert_eq!(routes["data"], json!(["default", "tls", "ws"]), "the $route variable's query");
    let mut empty = Vec::new();
    for (panel, expr) in dashboard_queries() {
        let answer = prometheus.query(&grafana_substitute(&expr)).await;
        assert_eq!(answer["status"], "success", "{panel}: {expr} → {answer}");
        if answer["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "queries without data after the scenario:\n{}", empty.join("\n"));
}

/// The sum of every sample of `name` in a `/metrics` text.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

async fn scrape(admin: &str) -> String {
    let api = mqtt_chaos::ctl::Client::new(&format!("http://{admin}"), None).unwrap();
    let reply = api.request("GET", "/metrics", None, b"").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

/// An instant query's values by `instance` ("" for series without it; values of the same key add up).
async fn by_instance(prometheus: &Prometheus, expr: &str) -> BTreeMap<String, f64> {
    let answer = prometheus.query(expr).await;
    assert_eq!(answer["status"], "success", "{expr} → {answer}");
    let mut out = BTreeMap::new();
    for r in answer["data"]["result"].as_array().unwrap() {
        let key = r["metric"]["instance"].as_str().unwrap_or("").to_string();
        let value: f64 = r["value"][1].as_str().unwrap().parse().unwrap();
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

/// Runs `queries` (name, dashboard query, `$instance` value) until their values by instance are
/// `want`, for at most 10 s (Prometheus scrapes every second); fails with what it saw otherwise.
async fn until_prometheus_says(
    prometheus: &Prometheus,
    queries: &[(&str, String, &str)],
    want: BTreeMap<&str, BTreeMap<String, f64>>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = BTreeMap::new();
        for (name, expr, instance) in queries {
            seen.insert(*name, by_instance(prometheus, &grafana_substitute_for(expr, instance)).await);
        }
        if seen == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 s, Prometheus still says\n{seen:#?}\nwhere the proxies' /metrics say\n{want:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `live` clients connected through `proxy` and kept open, after `polite` ones that connected and
/// sent DISCONNECT; every client id starts with `prefix` (one broker serves both proxies).
async fn clients(
    proxy: &ProxyProcess,
    prefix: &str,
    live: usize,
    polite: usize,
) -> Vec<tokio::net::TcpStream> {
    for i in 0..polite {
        let mut c = proxy.connect().await;
        c.write_all(&connect_v4(&format!("{prefix}-polite-{i}"), 60, None)).await.unwrap();
        expect_packet(&mut c, WAIT, "CONNACK").await;
        c.write_all(&DISCONNECT).await.unwrap();
        let _ = read_to_end(&mut c, WAIT).await;
    }
    let mut open = Vec::new();
    for i in 0..live {
        let mut c = proxy.connect().await;
        c.write_all(&connect_v4(&format!("{prefix}-live-{i}"), 60, None)).await.unwrap();
        expect_packet(&mut c, WAIT, "CONNACK").await;
        open.push(c);
    }
    open
}

#[tokio::test]
async fn the_fleet_panels_sum_two_proxies_scraped_by_one_prometheus_and_the_per_proxy_panels_show_each() {
    let started = Instant::now();
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let stretch = dir.path().join("keepalive-stretch.toml");
    std::fs::write(
        &stretch,
        "name = \"keepalive-stretch\"\ndescription = \"The broker is told Keep Alive 600 s.\"\n\n\
         [[rules]]\nname = \"keepalive-ten-minutes\"\naction = \"rewrite_keepalive\"\nset = 600\n",
    )
    .unwrap();
    let [admin_a, admin_b] = [0; 2].map(|_| format!("127.0.0.1:{}", free_port()));
    // Each proxy rewrites the Keep Alive of every CONNECT: one fault per client.
    let a = ProxyProcess::start(&broker.addr(), &["--admin", &admin_a, "--profile", "keepalive-disable"]);
    let b =
        ProxyProcess::start(&broker.addr(), &["--admin", &admin_b, "--profile", stretch.to_str().unwrap()]);
    let prometheus = Prometheus::scraping(&[&admin_a, &admin_b]);
    let _open_a = clients(&a, "a", 3, 2).await;
    let _open_b = clients(&b, "b", 2, 1).await;

    // What each proxy says itself, once the polite clients' closes are counted.
    let mut texts = [String::new(), String::new()];
    for _ in 0..100 {
        texts = [scrape(&admin_a).await, scrape(&admin_b).await];
        if texts.iter().map(|t| total(t, "mqtt_chaos_connections_active")).eq([3.0, 2.0]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let [text_a, text_b] = &texts;
    let each = |name: &str| [total(text_a, name), total(text_b, name)];
    assert_eq!(each("mqtt_chaos_connections_active"), [3.0, 2.0], "the proxies' own /metrics");
    assert_eq!(each("mqtt_chaos_faults_total"), [5.0, 3.0], "one Keep Alive rewrite per CONNECT");
    let closes = each("mqtt_chaos_closes_total");
    assert!(closes[0] >= 2.0 && closes[1] >= 1.0, "the polite clients' closes: {closes:?}");

    let fleet = |v: f64| BTreeMap::from([(String::new(), v)]);
    let per_proxy = |[va, vb]: [f64; 2]| BTreeMap::from([(admin_a.clone(), va), (admin_b.clone(), vb)]);
    let sum = |[va, vb]: [f64; 2]| va + vb;
    // Grafana escapes a selected value's regex characters with two backslashes in PromQL's quotes.
    let only_a = format!("({})", admin_a.replace('.', r"\\."));
    let active = panel_query("Active connections (fleet)", "active");
    let queries = [
        ("proxies up", panel_query("Proxies up", "up"), ".*"),
        ("proxies down", panel_query("Proxies up", "down"), ".*"),
        ("fleet active", active.clone(), ".*"),
        ("fleet active, proxy A selected", active.clone(), only_a.as_str()),
        ("fleet faults", panel_query("Faults applied (fleet, since start)", "faults"), ".*"),
        ("fleet closes (all causes)", panel_query("Closes by cause (fleet, since start)", "{{cause}}"), ".*"),
        ("active by proxy", panel_query("Active connections by proxy", "{{instance}}"), ".*"),
        ("faults by proxy", panel_query("Per proxy (since start)", "C"), ".*"),
        ("closes by proxy", panel_query("Per proxy (since start)", "F"), ".*"),
    ];
    let want = BTreeMap::from([
        ("proxies up", fleet(2.0)),
        ("proxies down", fleet(0.0)),
        ("fleet active", fleet(5.0)),
        ("fleet active, proxy A selected", fleet(3.0)),
        ("fleet faults", fleet(sum(each("mqtt_chaos_faults_total")))),
        ("fleet closes (all causes)", fleet(sum(closes))),
        ("active by proxy", per_proxy([3.0, 2.0])),
        ("faults by proxy", per_proxy(each("mqtt_chaos_faults_total"))),
        ("closes by proxy", per_proxy(closes)),
    ]);
    until_prometheus_says(&prometheus, &queries, want).await;

    let mut both = vec![admin_a.clone(), admin_b.clone()];
    both.sort();
    let instances = prometheus.api(&variable_values_call("instance", ".*")).await;
    assert_eq!(instances["data"], json!(both), "the $instance variable's query");
    // Which version and profile each proxy runs: every label of its build_info.
    let info = prometheus.query(&grafana_substitute(&panel_query("Proxies: version and profile", "A"))).await;
    let rows: BTreeMap<String, (String, String)> = info["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let l = &r["metric"];
            let s = |k: &str| l[k].as_str().unwrap_or_else(|| panic!("no {k} in {l}")).to_string();
            (s("instance"), (s("version"), s("profile")))
        })
        .collect();
    let version = env!("CARGO_PKG_VERSION").to_string();
    assert_eq!(
        rows,
        BTreeMap::from([
            (admin_a.clone(), (version.clone(), "keepalive-disable".to_string())),
            (admin_b.clone(), (version, "keepalive-stretch".to_string())),
        ]),
        "{info}"
    );
    // Every query of the dashboard parses with one proxy selected, as Grafana sends it.
    for (panel, expr) in dashboard_queries() {
        let answer = prometheus.query(&grafana_substitute_for(&expr, &only_a)).await;
        assert_eq!(answer["status"], "success", "{panel}: {expr} → {answer}");
    }

    // Proxy B stops: the fleet counts it down and sums what is left.
    drop(b);
    let queries = [
        ("proxies up", panel_query("Proxies up", "up"), ".*"),
        ("proxies down", panel_query("Proxies up", "down"), ".*"),
        ("fleet active", active, ".*"),
    ];
    let want = BTreeMap::from([
        ("proxies up", fleet(1.0)),
        ("proxies down", fleet(1.0)),
        ("fleet active", fleet(3.0)),
    ]);
    until_prometheus_says(&prometheus, &queries, want).await;
    eprintln!("the fleet test took {:.1} s", started.elapsed().as_secs_f64());
}
