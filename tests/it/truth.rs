//! What the proxy says must be true: the close line counts what the API counts, client input
//! cannot forge a log line, its own reachability check is no failed handshake at the broker,
//! and `--connect-timeout` is one deadline for a `wss` client's whole setup.

use crate::harness::*;
use crate::peer_bounds::Binary;
use crate::tls::Pki;
use mqtt_chaos::config::RouteConfig;
use mqtt_chaos::tls::{RouteTls, TlsOptions};
use mqtt_chaos::transport::Transport;
use serde_json::Value;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Waits for a line of the binary's log that contains `needle`.
async fn log_line(proxy: &Binary, needle: &str) -> String {
    for _ in 0..100 {
        if let Some(line) = proxy.log_text().lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no log line with {needle:?}:\n{}", proxy.log_text());
}

/// The value of `field=` in a text log line.
fn field<'a>(line: &'a str, field: &str) -> &'a str {
    let start =
        line.find(&format!(" {field}=")).unwrap_or_else(|| panic!("no {field} in {line}")) + field.len() + 2;
    line[start..].split(' ').next().unwrap()
}

#[tokio::test]
async fn the_close_line_counts_the_bytes_the_api_counts_including_the_last_batch() {
    let broker = Mosquitto::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = Binary::start(&["--listen", &listen, "--upstream", &broker.addr()], &listen);
    let mut device = TcpStream::connect(&listen).await.unwrap();
    device.write_all(&connect_v4("counted", 30, None)).await.unwrap();
    expect_packet(&mut device, Duration::from_secs(5), "CONNACK").await;
    // A PUBLISH and the DISCONNECT in one write: one batch, which ends the connection.
    let mut last = publish_v4("counted/topic", b"the last batch");
    last.extend_from_slice(&DISCONNECT);
    device.write_all(&last).await.unwrap();
    drop(device);
    let sent = connect_v4("counted", 30, None).len() + last.len();

    let line = log_line(&proxy, "client_id=\"counted\"").await;
    // The record joins the closed ones once both sides are gone, just after the close line.
    let mut record = Value::Null;
    for _ in 0..100 {
        let closed: Value = serde_json::from_str(&proxy.get("/connections?state=closed")).unwrap();
        if let Some(r) = closed.as_array().unwrap().iter().find(|c| c["client_id"] == "counted") {
            record = r.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = record["client_to_broker"]["bytes"].as_u64().unwrap();
    assert_eq!(api, sent as u64, "{record}");
    assert_eq!(field(&line, "bytes_client_to_broker"), api.to_string(), "{line}");
    assert_eq!(field(&line, "how"), "disconnect", "{line}");
}

#[tokio::test]
async fn a_client_id_with_a_newline_and_escape_sequences_forges_no_log_line() {
    let broker = Mosquitto::start();
    let hostile = "dev\n2026-01-01T00:00:00Z  INFO mqtt_chaos: forged\x1b[2J\x1b]0;owned\x07";
    for format in ["text", "json"] {
        let listen = format!("127.0.0.1:{}", free_port());
        let proxy = Binary::start(
            &["--log-format", format, "--listen", &listen, "--upstream", &broker.addr()],
            &listen,
        );
        let mut device = TcpStream::connect(&listen).await.unwrap();
        device.write_all(&connect_v4(hostile, 30, None)).await.unwrap();
        // mosquitto refuses or accepts it; either way the connection closes and is logged.
        let _ = read_to_end(&mut device, Duration::from_millis(500)).await;
        drop(device);
        let line = log_line(&proxy, "forged").await;
        let log = proxy.log_text();
        assert!(
            !log.contains('\x1b') && !log.contains('\x07'),
            "a control character reached the log:\n{log}"
        );
        assert!(
            !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
            "a forged line in the {format} log:\n{log}"
        );
        if format == "json" {
            // Exact in JSON: the value decodes back to what the client sent.
            let record: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(record["client_id"], hostile, "{line}");
        } else {
            assert!(
                line.contains(r#"client_id="dev\n2026-01-01T00:00:00Z  INFO mqtt_chaos: forged\u{1b}[2J"#),
                "{line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_of_a_tls_upstream_at_start_is_a_whole_handshake_not_a_failure_at_the_broker() {
    let pki = Pki::new();
    let broker = Mosquitto::start();
    // The "broker" is a TLS listener (an in-process proxy in front of mosquitto): it counts
    // every handshake, and every failed one by reason.
    let gateway =
        crate::tls::proxy(&pki, Transport::Tls, &broker.addr(), Transport::Tcp, pki.options()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let upstream = format!("mqtts://{}", gateway.addr);
    let ca = pki.path("ca.pem").display().to_string();
    let args = [
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--upstream-ca",
        &ca,
        "--upstream-server-name",
        "localhost",
    ];
    let proxy = Binary::start(&args, &listen);
    let line = log_line(&proxy, "upstream reachable").await;
    assert!(line.contains("route=default"), "{line}");
    let m = gateway.running().metrics();
    assert!(!m.contains("mqtt_chaos_tls_handshake_failures_total{"), "the check failed a handshake:\n{m}");
    let done = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("mqtt_chaos_tls_handshake_seconds_count{route=\"default\",side=\"client\"} ")
        })
        .unwrap_or_else(|| panic!("no handshake count:\n{m}"));
    assert_eq!(done, "1", "the check completed one handshake:\n{m}");
}

#[tokio::test]
async fn a_wss_client_has_one_connect_timeout_for_its_tls_and_websocket_handshakes_together() {
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let timeout = Duration::from_millis(1000);
    let settings = mqtt_chaos::config::Settings { connect_timeout: timeout, ..Default::default() };
    let options = TlsOptions { upstream_ca: None, upstream_server_name: None, ..pki.options() };
    let tls = RouteTls::load(options, Transport::Tls, Transport::Tcp, &broker.addr()).unwrap();
    let route = RouteConfig {
        tls,
        listen_ws: Some("/mqtt".into()),
        ..RouteConfig::tcp("default", "127.0.0.1:0", broker.addr())
    };
    let p = TestProxy::start_route(route, settings).await;
    let started = std::time::Instant::now();
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    // A slow TLS handshake (most of the timeout), then no WebSocket request at all.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(false));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("the TLS handshake, in time");
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        // The proxy closes (without close_notify: the handshake was never finished).
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await
            && n > 0
        {}
    })
    .await;
    let after = started.elapsed();
    assert!(end.is_ok(), "still open after 5 s");
    // Before: the WebSocket handshake got a second full timeout after the TLS one (1.7 s).
    assert!(after >= timeout && after < Duration::from_millis(1500), "closed after {after:?}");
}

#[tokio::test]
async fn readyz_turns_ready_when_the_broker_comes_up_even_with_no_client_to_find_out() {
    let (socket, upstream) = dead_address();
    drop(socket);
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = Binary::start(&["--listen", &listen, "--upstream", &upstream], &listen);
    let readyz = || proxy.get("/readyz");
    assert!(readyz().contains("not_ready"), "{}", readyz());
    // The broker comes up; no client connects through the proxy.
    let _broker = std::net::TcpListener::bind(&upstream).expect("the dead address is free again");
    let started = std::time::Instant::now();
    while !readyz().contains("\"status\":\"ready\"") {
        assert!(started.elapsed() < Duration::from_secs(8), "still not ready: {}", readyz());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let line = log_line(&proxy, "reachable again").await;
    assert!(line.contains("route=default"), "{line}");
}
