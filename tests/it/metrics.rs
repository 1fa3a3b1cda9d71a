//! What the metrics say after real scenarios against mosquitto.

use crate::harness::*;
use crate::pubsub::Client;
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

#[tokio::test]
async fn metrics_md_and_the_endpoint_name_the_same_metrics_with_the_same_types() {
    let proxy = TestProxy::start("127.0.0.1:1").await;
    let exposed: std::collections::BTreeMap<String, String> = proxy
        .running()
        .metrics()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect();
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
    assert!(exposed.len() >= 26, "{exposed:?}");
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
