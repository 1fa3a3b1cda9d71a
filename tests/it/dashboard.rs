//! The Grafana dashboard against a real Prometheus that scraped the proxy during a scenario.

use crate::harness::*;
use serde_json::{Value, json};
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
    let admin = format!("127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&broker.addr(), &["--admin", &admin, "--will-timeout", "3s"]);
    let prometheus = Prometheus::start(&admin);
    let proxy_addr: std::net::SocketAddr = proxy.listen.parse().unwrap();
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

    assert_eq!(pinger.await.unwrap().ending, Ending::Open);
    assert_eq!(victim.await.unwrap().ending, Ending::Eof, "mosquitto closed the muted victim");
    expect_packet(&mut watcher, WAIT, "the victim's Will").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few more scrapes

    let count = prometheus.query("sum(mqtt_chaos_broker_detection_ratio_count)").await;
    assert_eq!(count["data"]["result"][0]["value"][1], "1", "{count}");
    let observed = prometheus.query("sum(mqtt_chaos_wills_observed_total)").await;
    assert_eq!(observed["data"]["result"][0]["value"][1], "1", "{observed}");

    let routes = prometheus.api("/api/v1/label/route/values?match[]=mqtt_chaos_connections_total").await;
    assert_eq!(routes["data"], json!(["default"]), "the $route variable's query");
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
