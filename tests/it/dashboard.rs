//! The Grafana dashboard against a real Prometheus that scraped the proxy during a scenario
//! (over TCP, TLS and WebSocket routes), and against METRICS.md: every metric family has a panel.

use crate::harness::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(5);

/// Every PromQL expression in the dashboard, with the panel it belongs to.
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards/mqtt-chaos.json"))
            .unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_string();
        for target in panel["targets"].as_array().unwrap() {
            out.push((title.clone(), target["expr"].as_str().unwrap().to_string()));
        }
    }
    out
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

/// What Grafana substitutes before sending a query.
fn grafana_substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "5m")
        .replace("$__interval", "5s")
        .replace("$route", ".*")
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

    let routes = prometheus.api("/api/v1/label/route/values?match[]=mqtt_chaos_connections_total").await;
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
