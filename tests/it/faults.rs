//! Every shipped profile, end to end: real mosquitto, raw and library clients, and the record.

use crate::harness::*;
use crate::pubsub::Client;
use mqtt_chaos::codec::{Connack, FrameHeader, Protocol};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

/// mosquitto closes a silent Keep Alive 2 client between ~3 s and ~10 s after its last packet
/// (it checks every ~6 s in whole seconds; see KEEPALIVE.md).
const MOSQUITTO_KA2_WINDOW: std::ops::RangeInclusive<f64> = 2.9..=11.0;

/// The client both profile tests below compare: Keep Alive 2, a Will, a PINGREQ every second.
async fn ka2_pinger(proxy: &TestProxy) -> Pinged {
    let will = Some(("will/pinger", "gone"));
    pinging_client(proxy.addr, "pinger", 2, will, Some(Duration::from_secs(1)), Duration::from_secs(15)).await
}

#[tokio::test]
async fn drop_pingreq_makes_mosquitto_close_the_client_and_publish_its_will() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::with_profile(&broker.addr(), "drop-pingreq").await;
    let mut watcher = Client::v4("will-watcher", broker.addr().parse().unwrap()).await;
    watcher.subscribe("will/#").await;

    let seen = ka2_pinger(&proxy).await;
    assert_eq!(seen.ending, Ending::Eof, "mosquitto log:\n{}", broker.log());
    assert!(seen.pingresps.is_empty(), "no PINGREQ reached the broker, so no PINGRESP came back");
    assert!(MOSQUITTO_KA2_WINDOW.contains(&seen.lasted.as_secs_f64()), "closed after {:?}", seen.lasted);

    let will = watcher.next_msg().await;
    assert_eq!((will.topic.as_str(), will.payload.as_slice()), ("will/pinger", &b"gone"[..]));
    let (conn, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("broker", "fin"));
    // The silence the broker saw runs from the CONNECT: every PINGREQ after it was dropped.
    assert!(MOSQUITTO_KA2_WINDOW.contains(&close.silence_s.unwrap()), "{close:?}");
    assert!(conn.faults()["swallow-pingreq"] >= 2, "{:?}", conn.faults());
}

#[tokio::test]
async fn passthrough_keeps_the_same_pinging_client_connected_for_15_s() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::with_profile(&broker.addr(), "passthrough").await;
    let seen = ka2_pinger(&proxy).await;
    assert_eq!(seen.ending, Ending::Open, "mosquitto log:\n{}", broker.log());
    assert!(seen.pingresps.len() >= 13, "{} PINGRESPs in 15 s", seen.pingresps.len());
}

#[tokio::test]
async fn activating_a_profile_affects_connections_that_are_already_open() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let addr = proxy.addr;
    let client = tokio::spawn(async move {
        pinging_client(addr, "early", 2, None, Some(Duration::from_secs(1)), Duration::from_secs(18)).await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/drop-pingreq.toml");
    proxy.running().set_rules(mqtt_chaos::fault::load_profile(&path).unwrap().rule_set());
    let seen = client.await.unwrap();
    assert_eq!(seen.ending, Ending::Eof, "mosquitto log:\n{}", broker.log());
    assert!(seen.pingresps.len() >= 2, "pings were answered before the swap: {:?}", seen.pingresps);
    assert!(
        seen.pingresps.iter().all(|t| t.as_secs_f64() < 3.5),
        "answered after the swap: {:?}",
        seen.pingresps
    );
}

#[tokio::test]
async fn drop_pingresp_makes_a_real_client_library_give_up_and_the_record_says_client() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::with_profile(&broker.addr(), "drop-pingresp").await;
    let mut opts = rumqttc::MqttOptions::new("impatient", proxy.addr.ip().to_string(), proxy.addr.port());
    opts.set_keep_alive(Duration::from_secs(2));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let started = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("rumqttc did not give up within 15 s");
    assert!(
        matches!(error, rumqttc::ConnectionError::MqttState(rumqttc::StateError::AwaitPingResp)),
        "{error:?}"
    );
    drop(eventloop); // rumqttc closes the socket when its event loop goes
    let (conn, close) = proxy.next_closed(WAIT).await;
    assert_eq!(close.closed_by.as_str(), "client", "{close:?}");
    assert!(started.elapsed() < Duration::from_secs(12));
    assert!(conn.faults()["swallow-pingresp"] >= 1);
    // The client's silence-before-close counts from the CONNACK: no PINGRESP ever arrived.
    let ratio = close.silence_ratio.unwrap();
    assert!((1.0..=4.0).contains(&ratio), "client detection ratio {ratio}");
}

#[tokio::test]
async fn half_open_client_keeps_both_sockets_up_until_the_broker_times_the_client_out() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::with_profile(&broker.addr(), "half-open-client").await;
    let seen =
        pinging_client(proxy.addr, "ghost", 2, None, Some(Duration::from_secs(1)), Duration::from_secs(15))
            .await;
    assert_eq!(seen.ending, Ending::Eof, "mosquitto log:\n{}", broker.log());
    assert!(seen.pingresps.is_empty());
    assert!(MOSQUITTO_KA2_WINDOW.contains(&seen.lasted.as_secs_f64()), "closed after {:?}", seen.lasted);
    let (conn, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("broker", "fin"));
    assert_eq!(conn.faults()["client-to-broker-black-hole"], 1);
    assert!(broker.log().contains("ghost has exceeded timeout"), "mosquitto log:\n{}", broker.log());
}

#[tokio::test]
async fn half_open_broker_leaves_the_client_unanswered_while_the_broker_sees_nothing_wrong() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::with_profile(&broker.addr(), "half-open-broker").await;
    let seen =
        pinging_client(proxy.addr, "deaf", 2, None, Some(Duration::from_secs(2)), Duration::from_secs(9))
            .await;
    assert_eq!(seen.ending, Ending::Open, "the broker hears the pings and keeps the client");
    assert!(seen.pingresps.is_empty(), "PINGRESPs reached the client: {:?}", seen.pingresps);
    assert!(!broker.log().contains("deaf has exceeded timeout"));
}

#[tokio::test]
async fn a_three_second_partition_heals_and_the_session_survives_at_keep_alive_10() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::with_profile(&broker.addr(), "partition").await;
    let seen = pinging_client(
        proxy.addr,
        "patient",
        10,
        None,
        Some(Duration::from_secs(1)),
        Duration::from_secs(12),
    )
    .await;
    assert_eq!(seen.ending, Ending::Open, "mosquitto log:\n{}", broker.log());
    let during: Vec<_> = seen.pingresps.iter().filter(|t| (2.2..4.8).contains(&t.as_secs_f64())).collect();
    let after = seen.pingresps.iter().filter(|t| t.as_secs_f64() >= 5.5).count();
    assert!(during.is_empty(), "answers crossed the partition: {during:?}");
    assert!(after >= 5, "traffic did not resume: {:?}", seen.pingresps);
    let live = proxy.running().registry().list();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].faults()["both-directions-black-hole"], 2, "once per direction");
}

#[tokio::test]
async fn keepalive_disable_means_mosquitto_never_closes_a_silent_client() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::with_profile(&broker.addr(), "keepalive-disable").await;
    let seen = pinging_client(proxy.addr, "silent-zero", 2, None, None, Duration::from_secs(13)).await;
    assert_eq!(seen.ending, Ending::Open, "mosquitto log:\n{}", broker.log());
    let log = broker.log();
    assert!(log.lines().any(|l| l.contains("as silent-zero") && l.contains("k0")), "mosquitto log:\n{log}");
    let conn = &proxy.running().registry().list()[0];
    let ka = conn.keep_alive();
    assert_eq!((ka.requested, ka.forwarded, ka.broker_enforced()), (Some(2), Some(0), Some(0)));
}

#[tokio::test]
async fn keepalive_shrink_makes_mosquitto_enforce_2_s_on_a_client_that_asked_for_60() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::with_profile(&broker.addr(), "keepalive-shrink").await;
    let seen = pinging_client(proxy.addr, "sixty", 60, None, None, Duration::from_secs(14)).await;
    assert_eq!(seen.ending, Ending::Eof, "mosquitto log:\n{}", broker.log());
    assert!(MOSQUITTO_KA2_WINDOW.contains(&seen.lasted.as_secs_f64()), "closed after {:?}", seen.lasted);
    assert!(broker.log().lines().any(|l| l.contains("as sixty") && l.contains("k2")), "{}", broker.log());
    let (conn, close) = proxy.next_closed(WAIT).await;
    let ka = conn.keep_alive();
    assert_eq!((ka.requested, ka.forwarded), (Some(60), Some(2)));
    assert_eq!((close.closed_by.as_str(), close.keep_alive_enforced), ("broker", Some(2)));
}

#[tokio::test]
async fn server_keepalive_override_reaches_an_mqtt5_client_in_a_well_formed_connack() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::with_profile(&broker.addr(), "server-keepalive-override").await;
    let mut s = proxy.connect().await;
    let mut body = string("MQTT");
    body.extend([5, 0x02, 0, 60, 0]); // level 5, clean start, Keep Alive 60, no properties
    body.extend(string("five"));
    s.write_all(&packet(0x10, &body)).await.unwrap();
    let connack = expect_packet(&mut s, WAIT, "CONNACK").await;
    let header = FrameHeader::parse(&connack).unwrap().unwrap();
    assert_eq!(header.frame_len(), connack.len(), "remaining length matches the bytes");
    let decoded = Connack::decode(&connack, &header, Protocol::V5).unwrap();
    assert_eq!((decoded.code, decoded.server_keep_alive), (0, Some(5)));
    // The session works on: the broker answers a PINGREQ.
    s.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut s, WAIT, "PINGRESP").await, PINGRESP);
    let ka = proxy.running().registry().list()[0].keep_alive();
    assert_eq!((ka.requested, ka.server_announced, ka.server_to_client), (Some(60), None, Some(5)));
    assert_eq!((ka.broker_enforced(), ka.client_enforced()), (Some(60), Some(5)));
}

#[tokio::test]
async fn close_with_rst_resets_the_client_and_close_with_fin_ends_it() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    for (how, expected) in [("rst", Ending::Reset), ("fin", Ending::Eof)] {
        proxy.set_rules(&format!(
            "[[rules]]\nname = \"cut\"\naction = \"close\"\nside = \"both\"\nhow = \"{how}\"\nafter = \"500ms\"\n"
        ));
        let mut s = proxy.connect().await;
        s.write_all(&connect_v4(&format!("cut-{how}"), 60, None)).await.unwrap();
        expect_packet(&mut s, WAIT, "CONNACK").await;
        let started = Instant::now();
        let (_, ending) = read_to_end(&mut s, WAIT).await;
        assert_eq!(ending, expected, "close how = {how}");
        assert!(started.elapsed() >= Duration::from_millis(400), "closed before `after`");
        let (conn, close) = proxy.next_closed(WAIT).await;
        assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("proxy", how));
        assert_eq!(conn.faults()["cut"], 1);
    }
}

#[tokio::test]
async fn closing_only_the_client_side_leaves_the_broker_half_open_until_its_keep_alive_fires() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    proxy.set_rules("[[rules]]\nname = \"vanish\"\naction = \"close\"\nside = \"client\"\nhow = \"rst\"\nafter = \"1s\"\n");
    let mut watcher = Client::v4("vanish-watcher", broker.addr().parse().unwrap()).await;
    watcher.subscribe("will/#").await;
    let mut s = proxy.connect().await;
    s.write_all(&connect_v4("vanisher", 2, Some(("will/vanisher", "lost")))).await.unwrap();
    expect_packet(&mut s, WAIT, "CONNACK").await;
    assert_eq!(read_to_end(&mut s, WAIT).await.1, Ending::Reset);
    // The broker never got a FIN: only its Keep Alive check finds the client gone.
    let will = watcher.next_msg_within(Duration::from_secs(14)).await;
    assert_eq!(will.topic, "will/vanisher");
    assert!(broker.log().contains("vanisher has exceeded timeout"), "{}", broker.log());
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("proxy", "rst"));
}

/// How many of 40 PINGREQs each of three successive connections of one device got answered,
/// through a fresh proxy with the seeded `flaky-pingresp` profile.
async fn flaky_run(broker: &Mosquitto) -> Vec<usize> {
    let proxy = TestProxy::with_profile(&broker.addr(), "flaky-pingresp").await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut s = proxy.connect().await;
        s.write_all(&connect_v4("flaky-device", 60, None)).await.unwrap();
        expect_packet(&mut s, WAIT, "CONNACK").await;
        for _ in 0..40 {
            s.write_all(&PINGREQ).await.unwrap();
        }
        s.write_all(&subscribe_v4(1, "end/marker", 0)).await.unwrap();
        // The SUBACK comes after every PINGRESP the broker sent: count what arrived before it.
        let mut answered = 0;
        loop {
            let p = expect_packet(&mut s, WAIT, "PINGRESP or SUBACK").await;
            if p == PINGRESP {
                answered += 1;
            } else {
                break;
            }
        }
        runs.push(answered);
        s.write_all(&DISCONNECT).await.unwrap();
    }
    runs
}

#[tokio::test]
async fn flaky_pingresp_loses_about_30_percent_and_a_seeded_run_repeats_connection_by_connection() {
    let broker = Mosquitto::start();
    let (first, second) = (flaky_run(&broker).await, flaky_run(&broker).await);
    for answered in &first {
        assert!((20..=36).contains(answered), "{answered} of 40 answered at 30 % loss: {first:?}");
    }
    // Each reconnect draws anew (the engine's tests check that the draws differ); the seed
    // makes a second run draw the same, connection by connection.
    assert_eq!(first, second, "the seeded profile repeats across runs");
}

#[tokio::test]
async fn slow_pingresp_delivers_answers_3_to_7_seconds_late() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::with_profile(&broker.addr(), "slow-pingresp").await;
    let mut s = proxy.connect().await;
    s.write_all(&connect_v4("patient-pinger", 60, None)).await.unwrap();
    expect_packet(&mut s, WAIT, "CONNACK").await;
    for _ in 0..2 {
        let sent = Instant::now();
        s.write_all(&PINGREQ).await.unwrap();
        expect_packet(&mut s, Duration::from_secs(9), "PINGRESP").await;
        let late = sent.elapsed().as_secs_f64();
        assert!((2.95..=7.2).contains(&late), "PINGRESP after {late} s");
    }
}

#[tokio::test]
async fn reset_storm_resets_some_devices_after_5_s_and_spares_others_reproducibly() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::with_profile(&broker.addr(), "reset-storm").await;
    let devices: Vec<_> = (0..6)
        .map(|i| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                pinging_client(addr, &format!("storm-{i}"), 30, None, None, Duration::from_secs(7)).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for d in devices {
        outcomes.push(d.await.unwrap());
    }
    let reset: Vec<_> = outcomes.iter().filter(|o| o.ending == Ending::Reset).collect();
    let spared = outcomes.iter().filter(|o| o.ending == Ending::Open).count();
    assert!(!reset.is_empty() && spared > 0, "{outcomes:?}");
    assert_eq!(reset.len() + spared, outcomes.len(), "{outcomes:?}");
    for o in reset {
        assert!((4.9..6.5).contains(&o.lasted.as_secs_f64()), "reset after {:?}", o.lasted);
    }
}
