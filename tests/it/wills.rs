//! Wills that could not be seen are `unobservable`, not `missing`; the Will observer speaks
//! MQTT 5 or 3.1.1, whichever the broker takes, and backs off while it cannot connect.

use crate::harness::*;
use crate::metrics::{metrics_when, route, sample};
use mqtt_chaos::codec::{Connect, FrameHeader};
use mqtt_chaos::config::Settings;
use mqtt_chaos::observer::{ObserverConfig, ObserverProtocol};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

fn quick_wills() -> Settings {
    Settings { will_timeout: Duration::from_millis(500), ..Settings::default() }
}

#[tokio::test]
async fn a_will_nothing_could_see_is_unobservable_not_missing() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start_with(&broker.addr(), quick_wills()).await;
    // Keep Alive 1 s, then silence: mosquitto closes it and publishes the Will to nobody.
    let mut c = proxy.connect().await;
    c.write_all(&connect_v4("lonely", 1, Some(("status/lonely", "gone")))).await.unwrap();
    expect_packet(&mut c, WAIT, "CONNACK").await;
    proxy.next_closed(Duration::from_secs(15)).await;
    let m =
        metrics_when(&proxy, |m| sample(m, "mqtt_chaos_wills_unobservable_total", &route(&[])) == Some(1.0))
            .await;
    assert_eq!(sample(&m, "mqtt_chaos_wills_expected_total", &route(&[])), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_wills_unobservable_total", &route(&[])), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_wills_missing_total", &route(&[])), Some(0.0));
}

/// Reads a CONNECT from a scripted broker's socket: (protocol level, client id).
async fn read_connect(s: &mut TcpStream) -> Option<(u8, String)> {
    let frame = tokio::time::timeout(WAIT, read_packet(s)).await.ok()?.ok()?;
    let h = FrameHeader::parse(&frame).ok()??;
    let c = Connect::decode(&frame, &h).ok()?;
    Some((c.protocol.level(), c.client_id))
}

#[tokio::test]
async fn a_will_watched_through_the_proxy_that_never_comes_is_missing() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start_with(&broker.addr(), quick_wills()).await;
    // A subscriber to status/+ behind the proxy.
    let mut watcher = proxy.connect().await;
    watcher.write_all(&connect_v4("watcher", 30, None)).await.unwrap();
    let mut upstream_watcher = broker.accept().await;
    read_connect(&mut upstream_watcher).await.unwrap();
    upstream_watcher.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    expect_packet(&mut watcher, WAIT, "CONNACK").await;
    watcher.write_all(&subscribe_v4(1, "status/+", 1)).await.unwrap();
    expect_packet(&mut upstream_watcher, WAIT, "SUBSCRIBE").await;
    // A device with a Will, accepted, then dropped by a broker that publishes nothing.
    let mut device = proxy.connect().await;
    device.write_all(&connect_v4("device", 30, Some(("status/device", "gone")))).await.unwrap();
    let mut upstream_device = broker.accept().await;
    read_connect(&mut upstream_device).await.unwrap();
    upstream_device.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    expect_packet(&mut device, WAIT, "CONNACK").await;
    drop(upstream_device);
    proxy.next_closed(WAIT).await;
    let m =
        metrics_when(&proxy, |m| sample(m, "mqtt_chaos_wills_missing_total", &route(&[])) == Some(1.0)).await;
    assert_eq!(sample(&m, "mqtt_chaos_wills_missing_total", &route(&[])), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mqtt_chaos_wills_unobservable_total", &route(&[])), Some(0.0));
    assert_eq!(sample(&m, "mqtt_chaos_tracked_entries", &[("index", "subscriptions")]), Some(1.0), "{m}");
    drop(watcher);
    proxy.next_closed(WAIT).await;
    let m = metrics_when(&proxy, |m| {
        sample(m, "mqtt_chaos_tracked_entries", &[("index", "subscriptions")]) == Some(0.0)
    })
    .await;
    assert_eq!(sample(&m, "mqtt_chaos_tracked_entries", &[("index", "subscriptions")]), Some(0.0), "{m}");
}

/// A scripted broker for the Will observer: answers CONNECTs at the `accepted` protocol levels
/// (refusing the others with CONNACK 1, unacceptable protocol version, and closing), answers a
/// SUBSCRIBE with its SUBACK and one PUBLISH on the topic, and a PINGREQ only if `pings`.
/// Devices are accepted and left alone. Returns the address and the protocol levels the
/// observer tried, in order.
async fn observer_broker(accepted: &'static [u8]) -> (String, Arc<Mutex<Vec<u8>>>) {
    observer_broker_answering(accepted, false).await
}

async fn observer_broker_answering(accepted: &'static [u8], pings: bool) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tried = Arc::new(Mutex::new(Vec::new()));
    let log = tried.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let Some((level, client_id)) = read_connect(&mut s).await else { return };
                let observer = client_id.starts_with("mqtt-chaos-observer-");
                if observer {
                    log.lock().unwrap().push(level);
                }
                if observer && !accepted.contains(&level) {
                    let _ = s.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                    return;
                }
                let v5 = level == 5;
                let connack: &[u8] =
                    if v5 { &[0x20, 0x03, 0x00, 0x00, 0x00] } else { &[0x20, 0x02, 0x00, 0x00] };
                let _ = s.write_all(connack).await;
                while let Ok(p) = read_packet(&mut s).await {
                    if pings && p[0] == 0xc0 {
                        let _ = s.write_all(&[0xd0, 0]).await;
                    }
                    if observer && p[0] == 0x82 {
                        // SUBSCRIBE: packet id, (v5: properties), topic.
                        let props = if v5 { 1 + usize::from(p[4]) } else { 0 };
                        let at = 4 + props;
                        let len = usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
                        let topic = &p[at + 2..at + 2 + len];
                        let suback: Vec<u8> =
                            if v5 { vec![0x90, 4, p[2], p[3], 0, 1] } else { vec![0x90, 3, p[2], p[3], 1] };
                        let mut body = (len as u16).to_be_bytes().to_vec();
                        body.extend_from_slice(topic);
                        if v5 {
                            body.push(0); // no properties
                        }
                        body.extend_from_slice(b"gone");
                        let _ = s.write_all(&suback).await;
                        let _ = s.write_all(&packet(0x30, &body)).await;
                    }
                }
            });
        }
    });
    (addr, tried)
}

fn observing(protocol: ObserverProtocol) -> Settings {
    let observer =
        ObserverConfig { client_id: "mqtt-chaos-observer-".into(), protocol, ..Default::default() };
    Settings { observe_wills: Some(observer), ..quick_wills() }
}

/// Connects a device with a Will on `topic` and waits until the observer reports a PUBLISH on it.
async fn observer_relays(proxy: &mut TestProxy, topic: &str, within: Duration) {
    let mut device = proxy.connect().await;
    device.write_all(&connect_v4("device", 30, Some((topic, "gone")))).await.unwrap();
    expect_packet(&mut device, WAIT, "CONNACK").await;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, proxy.events.recv())
            .await
            .expect("the observer reported no PUBLISH on the Will topic")
            .unwrap();
        if let mqtt_chaos::record::Event::WillTopicPublish { topic: t, .. } = ev
            && &*t == topic
        {
            return;
        }
    }
}

#[tokio::test]
async fn the_will_observer_speaks_mqtt5_to_a_broker_that_takes_only_mqtt5() {
    let (addr, tried) = observer_broker(&[5]).await;
    let mut proxy = TestProxy::start_with(&addr, observing(ObserverProtocol::Auto)).await;
    observer_relays(&mut proxy, "status/v5", WAIT).await;
    assert_eq!(*tried.lock().unwrap(), [5], "auto tries MQTT 5 first");
    assert!(proxy.running().routes()[0].observer.watches("status/v5"));
}

#[tokio::test]
async fn the_will_observer_falls_back_to_mqtt311_when_mqtt5_is_refused() {
    let (addr, tried) = observer_broker(&[4]).await;
    let started = tokio::time::Instant::now();
    let mut proxy = TestProxy::start_with(&addr, observing(ObserverProtocol::Auto)).await;
    // The fallback is the plan, not a failure: at once (no back-off), not counted.
    observer_relays(&mut proxy, "status/v4", Duration::from_millis(900)).await;
    assert!(started.elapsed() < Duration::from_millis(900), "the fallback waited {:?}", started.elapsed());
    assert_eq!(*tried.lock().unwrap(), [5, 4], "MQTT 5 refused, then 3.1.1 at once");
    let m = proxy.running().metrics();
    assert_eq!(sample(&m, "mqtt_chaos_observer_connect_failures_total", &route(&[])), Some(0.0), "{m}");
}

#[tokio::test]
async fn the_will_observer_backs_off_while_the_broker_refuses_it() {
    let (addr, tried) = observer_broker(&[]).await;
    let proxy = TestProxy::start_with(&addr, observing(ObserverProtocol::V5)).await;
    // Retries after 1, 2, 4 s: attempts at about 0, 1 and 3 s, the next at 7 s.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let attempts = tried.lock().unwrap().clone();
    assert!((2..=4).contains(&attempts.len()), "{} attempts in 6.5 s: {attempts:?}", attempts.len());
    assert!(attempts.iter().all(|&l| l == 5), "--observer-protocol 5 sticks to 5: {attempts:?}");
    let m = proxy.running().metrics();
    let failures = sample(&m, "mqtt_chaos_observer_connect_failures_total", &route(&[])).unwrap();
    assert_eq!(failures, attempts.len() as f64, "{m}");
}

#[tokio::test]
async fn the_will_observer_unsubscribes_from_topics_nothing_watches_any_more() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start_with(&broker.addr(), observing(ObserverProtocol::Auto)).await;
    let route = proxy.running().routes()[0].clone();
    let watched = |topic: &str| route.observer.watches(topic);
    // One device leaves politely (no Will expected: its topic is needed no more), one stays.
    let mut leaving = proxy.connect().await;
    leaving.write_all(&connect_v4("leaving", 30, Some(("status/leaving", "gone")))).await.unwrap();
    expect_packet(&mut leaving, WAIT, "CONNACK").await;
    let mut staying = proxy.connect().await;
    staying.write_all(&connect_v4("staying", 30, Some(("status/staying", "gone")))).await.unwrap();
    expect_packet(&mut staying, WAIT, "CONNACK").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(watched("status/leaving") && watched("status/staying")) {
        assert!(tokio::time::Instant::now() < deadline, "the observer subscribed to both Will topics");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    leaving.write_all(&DISCONNECT).await.unwrap();
    assert_eq!(read_to_end(&mut leaving, WAIT).await.1, Ending::Eof);
    proxy.next_closed(WAIT).await;
    let deadline = tokio::time::Instant::now() + mqtt_chaos::observer::PRUNE_EVERY + WAIT;
    while watched("status/leaving") {
        assert!(tokio::time::Instant::now() < deadline, "the observer still watches a topic nobody needs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(watched("status/staying"), "a live connection's Will topic stays watched");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !broker.log().contains("Received UNSUBSCRIBE from mqtt-chaos-observer-default") {
        assert!(tokio::time::Instant::now() < deadline, "mosquitto got no UNSUBSCRIBE:\n{}", broker.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(staying);
}

/// The observer reaches the broker over the upstream's own transport, with the route's TLS
/// settings: mosquitto's TLS listener (verified against the test CA) and its WebSocket listener.
/// A device's Will is then seen by the observer alone (nothing subscribes through the proxy).
#[tokio::test]
async fn the_will_observer_reaches_a_tls_broker_and_a_websocket_broker() {
    use mqtt_chaos::config::RouteConfig;
    use mqtt_chaos::record::Event;
    use mqtt_chaos::tls::{RouteTls, TlsOptions};
    use mqtt_chaos::transport::Transport;
    let pki = crate::tls::Pki::new();
    let (_tls_broker, tls_addr) = pki.mosquitto("server");
    let ws_port = free_port();
    let _ws_broker = Mosquitto::start_with(&format!("listener {ws_port} 127.0.0.1\nprotocol websockets\n"));
    let ws_addr = format!("127.0.0.1:{ws_port}");
    let options = TlsOptions { cert: None, key: None, ..pki.options() };
    let tls = RouteTls::load(options, Transport::Tcp, Transport::Tls, &tls_addr).unwrap();
    let routes = [
        ("tls", RouteConfig { tls, ..RouteConfig::tcp("default", "127.0.0.1:0", &tls_addr) }),
        (
            "ws",
            RouteConfig {
                upstream_ws: Some("/mqtt".into()),
                ..RouteConfig::tcp("default", "127.0.0.1:0", &ws_addr)
            },
        ),
    ];
    for (name, route) in routes {
        let mut proxy = TestProxy::start_route(route, observing(ObserverProtocol::Auto)).await;
        let topic = format!("status/{name}");
        let mut device = proxy.connect().await;
        device.write_all(&connect_v4(&format!("dev-{name}"), 30, Some((&topic, "gone")))).await.unwrap();
        expect_packet(&mut device, WAIT, "CONNACK").await;
        // The subscription counts once its SUBACK granted it.
        let route = proxy.running().routes()[0].clone();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !route.observer.watches(&topic) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: the observer never subscribed to {topic}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(device); // a FIN without DISCONNECT: mosquitto publishes the Will
        let seen = tokio::time::timeout(WAIT, async {
            loop {
                match proxy.events.recv().await.unwrap() {
                    Event::WillTopicPublish { topic: t, .. } if *t == *topic => return,
                    _ => {}
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "{name}: the observer did not see the Will on {topic}");
    }
}

/// A broker that stops answering the observer's PINGREQ is a dead connection: the observer
/// reconnects after one Keep Alive without a PINGRESP; one that answers keeps its connection.
#[tokio::test]
async fn the_will_observer_reconnects_when_its_pingreq_goes_unanswered() {
    for answers in [false, true] {
        let (addr, tried) = observer_broker_answering(&[4], answers).await;
        let mut settings = observing(ObserverProtocol::V311);
        settings.observe_wills.as_mut().unwrap().keep_alive = Some(Duration::from_secs(1));
        let proxy = TestProxy::start_with(&addr, settings).await;
        // Pings at 1 s and 2 s; unanswered, the connection is given up at 2 s, retried at 3 s.
        tokio::time::sleep(Duration::from_millis(3800)).await;
        let connects = tried.lock().unwrap().len();
        if answers {
            assert_eq!(connects, 1, "an answering broker keeps the observer's connection");
        } else {
            assert!(connects >= 2, "the observer reconnected: {connects} CONNECT(s)");
            let m = proxy.running().metrics();
            assert!(
                sample(&m, "mqtt_chaos_observer_connect_failures_total", &route(&[])).unwrap() >= 1.0,
                "{m}"
            );
        }
    }
}

/// A broker that accepts the observer's CONNECT and drops it at once: retried ever more slowly
/// (1 s, then 2 s, …), not every second because each CONNACK looked like success.
#[tokio::test]
async fn a_broker_that_drops_the_observer_after_connack_is_retried_with_growing_back_off() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connects = Arc::new(Mutex::new(Vec::new()));
    let log = connects.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            if let Some((_, id)) = read_connect(&mut s).await
                && id.starts_with("mqtt-chaos-observer-")
            {
                log.lock().unwrap().push(tokio::time::Instant::now());
                let _ = s.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
            }
        }
    });
    let _proxy = TestProxy::start_with(&addr, observing(ObserverProtocol::V311)).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let at = connects.lock().unwrap().clone();
    // Attempts at about 0, 1 and 3 s (the next at 7 s); every second would be 5.
    assert_eq!(at.len(), 3, "{at:?}");
    let gaps: Vec<f64> = at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    assert!(gaps[1] > gaps[0] * 1.5, "the back-off grows: {gaps:?}");
}
