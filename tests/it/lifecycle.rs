//! A connection's lifecycle against a real mosquitto: everything is decided at the first close,
//! whether or not the other side ever closes (a hung device keeps its socket), and each close
//! is classified so that only Keep Alive timeouts count as detections.

use crate::admin::{call, serve_admin};
use crate::harness::*;
use crate::metrics::{metrics_when, route, sample};
use mqtt_chaos::config::Settings;
use mqtt_chaos::record::TAKEOVER_WINDOW;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(5);

fn closes(m: &str, by: &'static str, how: &'static str, cause: &'static str) -> Option<f64> {
    sample(m, "mqtt_chaos_closes_total", &route(&[("by", by), ("how", how), ("cause", cause)]))
}

#[tokio::test]
async fn a_takeover_is_settled_by_the_brokers_close_while_the_old_client_hangs_on() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let admin = serve_admin(&proxy, None).await;
    // The old client never reads nor closes its socket: a hung device.
    let _old = proxy.connected("hung", 30).await;
    let _new = proxy.connected("hung", 30).await;
    let (old, close) = proxy.next_closed(WAIT).await;
    assert_eq!(
        (close.closed_by.as_str(), close.how.as_str(), close.cause.as_str()),
        ("broker", "fin", "takeover")
    );
    let s = old.snapshot();
    assert_eq!((s.state, s.state_detail), ("closing", Some("broker closed, client still open")));
    assert!(s.taken_over_s.is_some());
    let m = metrics_when(&proxy, |m| {
        sample(m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "closed")])) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "closed")])), Some(1.0), "{m}");
    let took = sample(&m, "mqtt_chaos_takeover_close_seconds_sum", &route(&[])).unwrap();
    assert!(took < 0.5, "the broker closed the old connection {took} s after the new CONNECT");
    assert_eq!(closes(&m, "broker", "fin", "takeover"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(0.0));
    let listed = call(admin, "GET", "/connections", None).await.json().unwrap();
    let listed_old = listed.as_array().unwrap().iter().find(|c| c["id"] == old.id).unwrap().clone();
    assert_eq!(listed_old["state"], "closing", "{listed_old}");
    assert_eq!(listed_old["close"]["cause"], "takeover");

    // Past the takeover window, with the old socket still open, the verdict stands.
    tokio::time::sleep(TAKEOVER_WINDOW + Duration::from_secs(1)).await;
    let m = proxy.running().metrics();
    assert_eq!(sample(&m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "not_enforced")])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_takeovers_total", &route(&[("outcome", "closed")])), Some(1.0));
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(0.0));
    assert_eq!(old.snapshot().state, "closing", "the hung client still holds its socket");
}

#[tokio::test]
async fn a_keepalive_timeout_is_measured_when_the_broker_closes_although_the_client_never_does() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    // Keep Alive 1 s, then nothing (a SIGSTOPped client, a device behind a dead NAT).
    let mut frozen = proxy.connect().await;
    frozen.write_all(&connect_v4("frozen", 1, Some(("status/frozen", "gone")))).await.unwrap();
    expect_packet(&mut frozen, WAIT, "CONNACK").await;
    // mosquitto closes after 1.5 × Keep Alive, checked every few seconds: well within 15 s, and
    // well before the 30 s --half-close-timeout would end the connection.
    let (conn, close) = proxy.next_closed(Duration::from_secs(15)).await;
    assert_eq!((close.closed_by.as_str(), close.cause.as_str()), ("broker", "keepalive_timeout"));
    let ratio = close.silence_ratio.unwrap();
    assert!((1.5..8.0).contains(&ratio), "closed after {ratio} × Keep Alive");
    assert_eq!(conn.snapshot().state, "closing");
    let m = metrics_when(&proxy, |m| {
        sample(m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])), Some(1.0));
    assert_eq!(sample(&m, "mqtt_chaos_connection_duration_seconds_count", &route(&[])), Some(1.0));
    assert_eq!(
        sample(&m, "mqtt_chaos_connections_active", &route(&[])),
        Some(1.0),
        "the client side is open"
    );
}

#[tokio::test]
async fn a_refused_connect_is_no_detection_and_expects_no_will() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    std::fs::write(&passwords, "").unwrap();
    // No anonymous clients and no known user: every CONNECT gets CONNACK 5 (not authorised).
    let broker =
        Mosquitto::start_with(&format!("allow_anonymous false\npassword_file {}", passwords.display()));
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut c = proxy.connect().await;
    c.write_all(&connect_v4("stranger", 5, Some(("status/stranger", "gone")))).await.unwrap();
    let connack = expect_packet(&mut c, WAIT, "CONNACK").await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x05], "mosquitto refuses the unknown client");
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!(close.cause.as_str(), "connect_refused");
    let m = metrics_when(&proxy, |m| {
        closes(m, close.closed_by.as_str(), close.how.as_str(), "connect_refused") == Some(1.0)
    })
    .await;
    assert_eq!(closes(&m, close.closed_by.as_str(), close.how.as_str(), "connect_refused"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_broker_detection_ratio_count", &route(&[])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_client_detection_ratio_count", &route(&[])), Some(0.0));
    assert_eq!(
        sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])),
        Some(0.0),
        "never accepted: no Will"
    );
}

#[tokio::test]
async fn a_client_closing_early_without_disconnect_is_abrupt_not_a_client_detection() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let c = proxy.connected("impolite", 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c); // a FIN, no DISCONNECT, 0.03 × Keep Alive after the CONNACK
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!(
        (close.closed_by.as_str(), close.how.as_str(), close.cause.as_str()),
        ("client", "fin", "abrupt")
    );
    let m = metrics_when(&proxy, |m| closes(m, "client", "fin", "abrupt") == Some(1.0)).await;
    assert_eq!(closes(&m, "client", "fin", "abrupt"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_client_detection_ratio_count", &route(&[])), Some(0.0));
}

#[tokio::test]
async fn clients_pinging_a_few_milliseconds_after_their_keepalive_are_compliant() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    // Keep Alive 1 s, a PINGREQ every 1.015 s (timers fire late), for 5 s.
    let seen = pinging_client(
        proxy.addr,
        "punctual",
        1,
        None,
        Some(Duration::from_millis(1015)),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(seen.ending, Ending::Open);
    assert!(seen.pingresps.len() >= 3, "{:?}", seen.pingresps);
    proxy.next_closed(WAIT).await; // the client dropped its socket at the end of the run
    let m = metrics_when(&proxy, |m| {
        sample(m, "mqtt_chaos_client_keepalive_gap_ratio_count", &route(&[])) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&m, "mqtt_chaos_client_keepalive_violations_total", &route(&[])), Some(0.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_client_keepalive_gap_ratio_count", &route(&[])), Some(1.0));
    let near_one = sample(&m, "mqtt_chaos_client_keepalive_gap_ratio_bucket", &route(&[("le", "1.25")]));
    assert_eq!(near_one, Some(1.0), "its longest silence was about 1.015 × Keep Alive: {m}");
}

#[tokio::test]
async fn a_connect_keepalive_rewrite_is_counted() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    proxy.set_rules("[[rules]]\nname = \"short\"\naction = \"rewrite_keepalive\"\nset = 5\ndirection = \"client_to_broker\"\n");
    let _c = proxy.connected("rewritten", 60).await;
    let m = proxy.running().metrics();
    assert_eq!(sample(&m, "mqtt_chaos_keepalive_rewrites_total", &route(&[])), Some(1.0), "{m}");
}

#[tokio::test]
async fn closed_connections_stay_listed_with_their_cause_in_a_bounded_ring() {
    let broker = Mosquitto::start();
    let settings = Settings { closed_history: 2, ..Settings::default() };
    let mut proxy = TestProxy::start_with(&broker.addr(), settings).await;
    let admin = serve_admin(&proxy, None).await;
    proxy.set_rules("[[rules]]\nname = \"no-pong\"\naction = \"drop\"\npackets = [\"PINGRESP\"]\n");
    for id in ["first", "second", "third"] {
        let mut c = proxy.connected(id, 30).await;
        c.write_all(&PINGREQ).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(c); // gives up with its PINGREQ unanswered
        let (conn, close) = proxy.next_closed(WAIT).await;
        assert_eq!(close.cause.as_str(), "client_gave_up", "{id}");
        TestProxy::ended(&conn, WAIT).await;
    }
    let closed = call(admin, "GET", "/connections?state=closed", None).await.json().unwrap();
    let ids: Vec<&str> =
        closed.as_array().unwrap().iter().map(|c| c["client_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["second", "third"], "the last 2, oldest first");
    let third = &closed[1];
    assert_eq!(third["state"], "closed");
    assert_eq!(third["close"]["cause"], "client_gave_up");
    assert_eq!(third["close"]["closed_by"], "client");
    assert_eq!(third["faults"]["no-pong"], 1);
    assert!(third["ended_s"].as_f64().is_some(), "{third}");
    let live = call(admin, "GET", "/connections", None).await.json().unwrap();
    assert_eq!(live, serde_json::json!([]), "the default lists live connections only");
    let all = call(admin, "GET", "/connections?state=all", None).await.json().unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let bad = call(admin, "GET", "/connections?state=gone", None).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(bad.json().unwrap()["field"], "state");
}
