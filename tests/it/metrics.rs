//! What the metrics say after real scenarios against mosquitto.

use crate::harness::*;
use crate::pubsub::Client;
use mqtt_chaos::config::RouteConfig;
use mqtt_chaos::transport::Transport;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(5);

/// The value of the sample `name{labels}` (labels in any order, all given ones must match).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) =
            series.split_once('{').map_or((series, ""), |(m, l)| (m, l.trim_end_matches('}')));
        if metric != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

pub(crate) fn route(labels: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut l = vec![("route", "default")];
    l.extend_from_slice(labels);
    l
}

/// Waits until the monitor has counted what `ready` asks for (it runs on its own task).
pub(crate) async fn metrics_when(proxy: &TestProxy, ready: impl Fn(&str) -> bool) -> String {
    for _ in 0..100 {
        let text = proxy.running().metrics();
        if ready(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.running().metrics()
}

#[tokio::test]
async fn drop_pingreq_gives_one_broker_detection_inside_mosquittos_window_and_the_will_is_seen() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::with_profile(&broker.addr(), "drop-pingreq").await;
    // The subscriber that sees the Will is behind the proxy too.
    let mut watcher = Client::v4("watcher", proxy.addr).await;
    watcher.subscribe("status/#").await;
    let will = Some(("status/device-1", "offline"));
    let seen = pinging_client(
        proxy.addr,
        "device-1",
        2,
        will,
        Some(Duration::from_secs(1)),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(seen.ending, Ending::Eof);
    proxy.next_closed(WAIT).await;
    watcher.next_msg_within(Duration::from_secs(3)).await;
    let m = metrics_when(&proxy, |m| sample(m, "mqtt_chaos_wills_observed_total", &route(&[])) == Some(1.0))
        .await;
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(1.0), "{m}");
    let ratio = sample(&m, "mqtt_chaos_broker_detection_ratio_sum", &route(&[])).unwrap();
    assert!((1.45..=5.5).contains(&ratio), "detection ratio {ratio} outside mosquitto's window");
    assert_eq!(sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])), Some(1.0));
    assert_eq!(sample(&m, "mqtt_chaos_wills_observed_total", &route(&[])), Some(1.0));
    assert_eq!(sample(&m, "mqtt_chaos_wills_missing_total", &route(&[])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_will_delay_seconds_count", &route(&[])), Some(1.0));
    assert!(sample(&m, "mqtt_chaos_faults_total", &route(&[("rule", "swallow-pingreq")])).unwrap() >= 2.0);
    assert_eq!(
        sample(&m, "mqtt_chaos_connection_closes_total", &route(&[("closed_by", "broker"), ("how", "fin")])),
        Some(1.0)
    );
    assert!(
        sample(
            &m,
            "mqtt_chaos_packets_total",
            &route(&[("direction", "client_to_broker"), ("type", "CONNECT")])
        ) >= Some(2.0)
    );
    assert_eq!(sample(&m, "mqtt_chaos_client_detection_ratio_count", &route(&[])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_build_info", &[("profile", "drop-pingreq")]), Some(1.0));
    assert_eq!(sample(&m, "mqtt_chaos_rules_active", &route(&[])), Some(1.0));
}

#[tokio::test]
async fn drop_pingresp_gives_one_client_detection() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::with_profile(&broker.addr(), "drop-pingresp").await;
    let mut opts = rumqttc::MqttOptions::new("impatient", proxy.addr.ip().to_string(), proxy.addr.port());
    opts.set_keep_alive(Duration::from_secs(2));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let _ = tokio::time::timeout(Duration::from_secs(15), async { while eventloop.poll().await.is_ok() {} })
        .await;
    drop(eventloop);
    proxy.next_closed(WAIT).await;
    let m = metrics_when(&proxy, |m| {
        sample(m, "mqtt_chaos_client_detection_ratio_count", &route(&[])) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&m, "mqtt_chaos_client_detection_ratio_count", &route(&[])), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_client_detection_seconds_count", &route(&[])), Some(1.0));
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(0.0));
    assert!(
        sample(&m, "mqtt_chaos_ping_rtt_seconds_count", &route(&[])) >= Some(1.0),
        "PINGRESPs were received from the broker"
    );
}

#[tokio::test]
async fn a_takeover_is_counted_as_closed_and_is_not_a_broker_detection() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut old = proxy.connect().await;
    old.write_all(&connect_v4("twin", 30, Some(("status/twin", "gone")))).await.unwrap();
    expect_packet(&mut old, WAIT, "CONNACK").await;
    let mut new = proxy.connect().await;
    new.write_all(&connect_v4("twin", 30, None)).await.unwrap();
    expect_packet(&mut new, WAIT, "CONNACK").await;
    assert_eq!(read_to_end(&mut old, WAIT).await.1, Ending::Eof, "mosquitto closes the old connection");
    drop(old);
    let (conn, close) = proxy.next_closed(WAIT).await;
    assert_eq!((conn.client_id().as_deref(), close.closed_by.as_str()), (Some("twin"), "broker"));
    let m = metrics_when(&proxy, |m| {
        sample(m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "closed")])) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "closed")])), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "not_enforced")])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_takeover_close_seconds_count", &route(&[])), Some(1.0));
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(0.0));
    // The old connection ended without DISCONNECT and had a Will: it is expected (mosquitto
    // publishes it on takeover only for a clean session, which this one was).
    assert_eq!(sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])), Some(1.0));
}

#[tokio::test]
async fn a_normal_disconnect_expects_no_will() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut c = proxy.connect().await;
    c.write_all(&connect_v4("polite", 30, Some(("status/polite", "gone")))).await.unwrap();
    expect_packet(&mut c, WAIT, "CONNACK").await;
    c.write_all(&DISCONNECT).await.unwrap();
    assert_eq!(read_to_end(&mut c, WAIT).await.1, Ending::Eof);
    drop(c);
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("client", "disconnect"));
    let m = metrics_when(&proxy, |m| {
        sample(
            m,
            "mqtt_chaos_connection_closes_total",
            &route(&[("closed_by", "client"), ("how", "disconnect")]),
        ) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])), Some(0.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "mqtt_chaos_disconnect_reasons_total",
            &route(&[("direction", "client_to_broker"), ("reason", "none")])
        ),
        Some(1.0)
    );
    assert_eq!(sample(&m, "mqtt_chaos_client_detection_ratio_count", &route(&[])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_keepalive_requested_seconds_count", &route(&[])), Some(1.0));
}

/// The families a scrape shows, by the name of their samples (counters with `_total`), and type.
fn families(exposition: &str) -> std::collections::BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            // OpenMetrics names a counter family without the `_total` its samples carry.
            let name = match kind {
                "counter" if !name.ends_with("_total") => format!("{name}_total"),
                _ => name.to_string(),
            };
            (name, kind.to_string())
        })
        .collect()
}

/// A proxy on which one of everything has happened: a rule applied, a DISCONNECT, a close (a
/// family whose labels come from events has no series, and is not shown, before its first).
async fn proxy_with_history(broker: &Mosquitto) -> TestProxy {
    let mut proxy = TestProxy::start(&broker.addr()).await;
    proxy.set_rules("[[rules]]\nname = \"late\"\naction = \"delay\"\ndirection = \"client_to_broker\"\npackets = [\"CONNECT\"]\nlatency = \"1ms\"\n");
    let mut c = proxy.connected("documented", 30).await;
    c.write_all(&DISCONNECT).await.unwrap();
    assert_eq!(read_to_end(&mut c, WAIT).await.1, Ending::Eof);
    proxy.next_closed(WAIT).await;
    metrics_when(&proxy, |m| m.contains("mqtt_chaos_closes_total{")).await;
    proxy
}

#[tokio::test]
async fn metrics_md_and_the_endpoint_name_the_same_metrics_with_the_same_types() {
    let broker = Mosquitto::start();
    let proxy = proxy_with_history(&broker).await;
    let mut exposed = families(&proxy.running().metrics());
    // The TLS families have series once a TLS route saw a handshake succeed and one fail.
    let pki = crate::tls::Pki::new();
    let tls = crate::tls::proxy(&pki, Transport::Tls, &broker.addr(), Transport::Tcp, pki.options()).await;
    let mut plain = tokio::net::TcpStream::connect(tls.addr).await.unwrap();
    plain.write_all(&DISCONNECT).await.unwrap();
    let _ = read_to_end(&mut plain, WAIT).await;
    let _ok = pki.connect(&tls.addr.to_string(), false).await.unwrap();
    let m = metrics_when(&tls, |m| {
        m.contains("mqtt_chaos_tls_handshake_failures_total{")
            && m.contains("mqtt_chaos_tls_handshake_seconds_count{")
    })
    .await;
    exposed.extend(families(&m));
    // The WebSocket family, once a `ws` listener refused a plain HTTP request.
    let route = RouteConfig {
        listen_ws: Some("/mqtt".into()),
        ..RouteConfig::tcp("default", "127.0.0.1:0", broker.addr())
    };
    let ws = TestProxy::start_route(route, Default::default()).await;
    let mut http = tokio::net::TcpStream::connect(ws.addr).await.unwrap();
    http.write_all(b"GET /mqtt HTTP/1.1\r\nHost: proxy\r\n\r\n").await.unwrap();
    let _ = read_to_end(&mut http, WAIT).await;
    let m = metrics_when(&ws, |m| m.contains("mqtt_chaos_websocket_errors_total{")).await;
    exposed.extend(families(&m));
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/METRICS.md")).unwrap();
    let documented: std::collections::BTreeMap<String, String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `mqtt_chaos_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (format!("mqtt_chaos_{}", cells[0].trim_end_matches('`')), cells[1].to_string())
        })
        .collect();
    assert_eq!(exposed, documented, "METRICS.md and /metrics disagree");
    assert!(exposed.len() >= 35, "{exposed:?}");
}

/// `GET /metrics` over a plain HTTP/1.1 connection with `accept`: the Content-Type and the body.
async fn scrape(admin: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: test\r\n{accept}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_string(&mut s, &mut reply))
        .await
        .expect("the admin API answers in time")
        .unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
        .unwrap();
    (content_type, body.to_string())
}

#[tokio::test]
async fn a_scraper_that_asks_for_openmetrics_gets_it_with_the_same_families_and_values() {
    let broker = Mosquitto::start();
    let proxy = proxy_with_history(&broker).await;
    let admin = crate::admin::serve_admin(&proxy, None).await;
    // What Prometheus 2.x sends, and a plain client.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (open_type, open) = scrape(admin, Some(prometheus_accept)).await;
    let (text_type, text) = scrape(admin, None).await;
    assert_eq!(open_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert_eq!(text_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(open.ends_with("# EOF\n"), "OpenMetrics ends with # EOF:\n{open}");
    assert!(!text.contains("# EOF"), "the text format has no # EOF:\n{text}");
    assert!(open.contains("# TYPE mqtt_chaos_connections counter\n"), "{open}");
    assert!(text.contains("# TYPE mqtt_chaos_connections_total counter\n"), "{text}");
    assert_eq!(families(&open), families(&text));
    for (name, labels) in [
        ("mqtt_chaos_connections_total", route(&[])),
        ("mqtt_chaos_faults_total", route(&[("rule", "late")])),
        ("mqtt_chaos_closes_total", route(&[("by", "client"), ("how", "disconnect"), ("cause", "normal")])),
    ] {
        assert_eq!(sample(&open, name, &labels), Some(1.0), "{name} in\n{open}");
        assert_eq!(sample(&text, name, &labels), Some(1.0), "{name} in\n{text}");
    }
    // A scraper that prefers the text format, or refuses OpenMetrics, gets the text format.
    for accept in ["text/plain;q=0.9,application/openmetrics-text;q=0.5", "application/openmetrics-text;q=0"]
    {
        assert_eq!(scrape(admin, Some(accept)).await.0, text_type, "Accept: {accept}");
    }
}

fn observing() -> mqtt_chaos::config::Settings {
    mqtt_chaos::config::Settings {
        observe_wills: Some(mqtt_chaos::observer::ObserverConfig {
            client_id: "test-observer-".into(),
            ..Default::default()
        }),
        will_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

#[tokio::test]
async fn observe_wills_sees_the_will_when_no_subscriber_is_behind_the_proxy() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start_with(&broker.addr(), observing()).await;
    proxy.set_rules("[[rules]]\nname = \"mute\"\naction = \"drop\"\ndirection = \"client_to_broker\"\npackets = [\"PINGREQ\"]\n");
    tokio::time::sleep(Duration::from_millis(300)).await; // the observer connects
    let will = Some(("status/lonely", "offline"));
    let seen =
        pinging_client(proxy.addr, "lonely", 2, will, Some(Duration::from_secs(1)), Duration::from_secs(15))
            .await;
    assert_eq!(seen.ending, Ending::Eof, "mosquitto log:\n{}", broker.log());
    proxy.next_closed(WAIT).await;
    let m = metrics_when(&proxy, |m| sample(m, "mqtt_chaos_wills_observed_total", &route(&[])) == Some(1.0))
        .await;
    assert_eq!(sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "mqtt_chaos_wills_observed_total", &route(&[])),
        Some(1.0),
        "{m}\n{}",
        broker.log()
    );
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(1.0));
    let ratio = sample(&m, "mqtt_chaos_broker_detection_ratio_sum", &route(&[])).unwrap();
    assert!((1.45..=5.5).contains(&ratio), "detection ratio {ratio}");
    assert!(broker.log().contains("test-observer-default"), "the observer connected to the broker itself");
}

#[tokio::test]
async fn a_will_the_broker_never_publishes_is_counted_missing() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start_with(&broker.addr(), observing()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A persistent session (clean session 0) with a Will, taken over by a connection that
    // resumes it: mosquitto 2.0 closes the old connection without publishing its Will.
    let mut body = string("MQTT");
    body.extend([4, 0x04, 0, 60]); // will flag, no clean session
    body.extend(string("keeper"));
    body.extend(string("status/keeper"));
    body.extend(string("gone"));
    let mut old = proxy.connect().await;
    old.write_all(&packet(0x10, &body)).await.unwrap();
    expect_packet(&mut old, WAIT, "CONNACK").await;
    let mut resume = string("MQTT");
    resume.extend([4, 0x00, 0, 60]); // no clean session, no Will
    resume.extend(string("keeper"));
    let mut new = proxy.connect().await;
    new.write_all(&packet(0x10, &resume)).await.unwrap();
    expect_packet(&mut new, WAIT, "CONNACK").await;
    assert_eq!(read_to_end(&mut old, WAIT).await.1, Ending::Eof);
    drop(old);
    proxy.next_closed(WAIT).await;
    let m =
        metrics_when(&proxy, |m| sample(m, "mqtt_chaos_wills_missing_total", &route(&[])) == Some(1.0)).await;
    assert_eq!(sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_wills_missing_total", &route(&[])), Some(1.0), "{m}\n{}", broker.log());
    assert_eq!(sample(&m, "mqtt_chaos_wills_observed_total", &route(&[])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "closed")])), Some(1.0));
}

#[tokio::test]
async fn a_broker_that_sends_disconnect_0x8e_on_takeover_is_counted_as_such() {
    // mosquitto 2.0.11 closes without 0x8E, so a scripted MQTT 5 broker plays the part.
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut connect = string("MQTT");
    connect.extend([5, 0x02, 0, 60, 0]);
    connect.extend(string("dup"));
    let connect = packet(0x10, &connect);
    let connack = [0x20, 0x03, 0x00, 0x00, 0x00];
    let mut old = proxy.connect().await;
    old.write_all(&connect).await.unwrap();
    let mut old_up = broker.accept().await;
    expect_packet(&mut old_up, WAIT, "CONNECT").await;
    old_up.write_all(&connack).await.unwrap();
    expect_packet(&mut old, WAIT, "CONNACK").await;
    let mut new = proxy.connect().await;
    new.write_all(&connect).await.unwrap();
    let mut new_up = broker.accept().await;
    expect_packet(&mut new_up, WAIT, "CONNECT").await;
    old_up.write_all(&[0xe0, 0x02, 0x8e, 0x00]).await.unwrap();
    drop(old_up);
    new_up.write_all(&connack).await.unwrap();
    assert_eq!(expect_packet(&mut old, WAIT, "DISCONNECT").await, [0xe0, 0x02, 0x8e, 0x00]);
    drop(old);
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!(
        (close.closed_by.as_str(), close.how.as_str(), close.disconnect_reason),
        ("broker", "disconnect", Some(0x8e))
    );
    let m = metrics_when(&proxy, |m| {
        sample(m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "disconnect_0x8e")])) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "disconnect_0x8e")])),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "mqtt_chaos_disconnect_reasons_total",
            &route(&[("direction", "broker_to_client"), ("reason", "session_taken_over")])
        ),
        Some(1.0)
    );
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(0.0));
    drop(new);
}
