//! What the proxy keeps of connections once they closed (the closed-connection ring behind
//! `GET /connections?state=closed`, the live-event backlog behind `GET /events`) is bounded in
//! bytes, whatever the peers sent: measured on the binary with the longest client ids and Will
//! topics MQTT allows, while an `/events` subscriber that never reads holds the backlog.

use crate::harness::*;
use crate::peer_bounds::Binary;
use serde_json::Value;
use std::io::Write;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The longest UTF-8 string MQTT encodes (a two-byte length).
const MQTT_STRING_MAX: usize = 65_535;
const CLIENTS: usize = 300;
/// What history keeps of a long text (README, "What the proxy bounds").
const KEPT: usize = 256;

/// A string of exactly `MQTT_STRING_MAX` bytes starting with `prefix`, the rest two-byte
/// characters (with an odd-length prefix, a cut at 256 bytes falls inside one of them).
fn longest(prefix: &str) -> String {
    let mut s = prefix.to_string();
    while s.len() + 2 <= MQTT_STRING_MAX {
        s.push('é');
    }
    while s.len() < MQTT_STRING_MAX {
        s.push('x');
    }
    s
}

fn active_connections(proxy: &Binary) -> u64 {
    let text = proxy.get("/metrics");
    text.lines()
        .filter(|l| l.starts_with("mqtt_chaos_connections_active{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// Checks that `kept` is what history keeps of `whole`: the longest prefix of at most 256 bytes
/// that ends on a character boundary, with `len` the whole's length.
fn assert_abbreviated(kept: &Value, len: &Value, whole: &str, what: &str) {
    let kept = kept.as_str().unwrap_or_else(|| panic!("{what}: no text"));
    let boundary = (0..=KEPT).rev().find(|&end| whole.is_char_boundary(end)).unwrap();
    assert_eq!(kept.len(), boundary, "{what}: cut at the last character boundary within {KEPT} bytes");
    assert!(whole.starts_with(kept), "{what}: the kept text is the start of the whole one");
    assert_eq!(len.as_u64(), Some(whole.len() as u64), "{what}: the true length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connections_with_the_longest_ids_and_will_topics_leave_only_abbreviated_history() {
    let mosquitto = Mosquitto::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = Binary::start(&["--listen", &listen, "--upstream", &mosquitto.addr()], &listen);

    // An /events subscriber that never reads: the backlog keeps every event it has not taken.
    let mut stalled = std::net::TcpStream::connect(&proxy.admin).unwrap();
    write!(stalled, "GET /events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = proc_memory(proxy.pid, "RssAnon");

    // One client that stays: its live record keeps its id whole.
    let live_id = longest("live-");
    let mut live = tokio::net::TcpStream::connect(&listen).await.unwrap();
    live.write_all(&connect_v4(&live_id, 60, None)).await.unwrap();
    assert_eq!(expect_packet(&mut live, Duration::from_secs(5), "CONNACK").await, [0x20, 2, 0, 0]);

    // 300 clients with the longest id and Will topic connect, are accepted and leave.
    let ids: Vec<String> = (0..CLIENTS).map(|i| longest(&format!("c{i:04}"))).collect();
    let topics: Vec<String> = (0..CLIENTS).map(|i| longest(&format!("will/{i:04}"))).collect();
    for batch in (0..CLIENTS).collect::<Vec<_>>().chunks(50) {
        let clients = batch.iter().map(|&i| {
            let (id, topic, listen) = (ids[i].clone(), topics[i].clone(), listen.clone());
            tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(&listen).await.unwrap();
                c.write_all(&connect_v4(&id, 60, Some((&topic, "gone")))).await.unwrap();
                let connack = expect_packet(&mut c, Duration::from_secs(10), "CONNACK").await;
                assert_eq!(connack, [0x20, 2, 0, 0], "client {i} accepted");
                c.write_all(&DISCONNECT).await.unwrap();
                let (_, ending) = read_to_end(&mut c, Duration::from_secs(10)).await;
                assert_ne!(ending, Ending::Open, "client {i}: the proxy closed after its DISCONNECT");
            })
        });
        for c in clients.collect::<Vec<_>>() {
            c.await.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while active_connections(&proxy) > 1 {
        assert!(Instant::now() < deadline, "the 300 connections did not all close");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The proxy hands freed heap back to the OS within 5 s of closes.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = proc_memory(proxy.pid, "RssAnon");
    let grown = after.saturating_sub(before);
    eprintln!("RssAnon before {before} B, after {after} B: grown by {grown} B");
    // Whole, the ids and topics alone are 300 × 128 KiB = 39 MB; abbreviated, 300 × ~2 KB.
    assert!(grown < 8 << 20, "the proxy grew by {grown} bytes keeping 300 closed connections");

    // The closed records show the abbreviated forms with the true lengths.
    let closed: Value = serde_json::from_str(&proxy.get("/connections?state=closed")).unwrap();
    // (The start's readiness check left one more, without a CONNECT.)
    let closed: Vec<&Value> =
        closed.as_array().unwrap().iter().filter(|r| r["client_id"].is_string()).collect();
    assert_eq!(closed.len(), CLIENTS);
    for record in closed {
        let text = record.to_string();
        assert!(text.len() < 4096, "a closed record is {} bytes of JSON", text.len());
        let i: usize = record["client_id"].as_str().unwrap()[1..5].parse().unwrap();
        assert_abbreviated(&record["client_id"], &record["client_id_len"], &ids[i], "client_id");
        assert_abbreviated(&record["will"]["topic"], &record["will"]["topic_len"], &topics[i], "Will topic");
        assert_eq!(record["close"]["cause"], "normal");
    }
    // A live record keeps everything whole.
    let open: Value = serde_json::from_str(&proxy.get("/connections")).unwrap();
    assert_eq!(open[0]["client_id"].as_str(), Some(live_id.as_str()), "the live record's id, whole");
    assert!(open[0].get("client_id_len").is_none());
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_publishes_on_the_longest_will_topic_holds_the_topic_once() {
    let mosquitto = Mosquitto::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = Binary::start(&["--listen", &listen, "--upstream", &mosquitto.addr()], &listen);
    let mut stalled = std::net::TcpStream::connect(&proxy.admin).unwrap();
    write!(stalled, "GET /events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();

    // A device whose Will topic is the longest there is: PUBLISHes on it are watched.
    let topic = longest("w");
    let mut device = TcpStream::connect(&listen).await.unwrap();
    device.write_all(&connect_v4("will-holder", 60, Some((&topic, "gone")))).await.unwrap();
    expect_packet(&mut device, Duration::from_secs(5), "CONNACK").await;
    // A subscriber through the proxy, and a publisher straight to the broker.
    let mut subscriber = TcpStream::connect(&listen).await.unwrap();
    subscriber.write_all(&connect_v4("listener", 60, None)).await.unwrap();
    expect_packet(&mut subscriber, Duration::from_secs(5), "CONNACK").await;
    subscriber.write_all(&subscribe_v4(1, &topic, 0)).await.unwrap();
    expect_packet(&mut subscriber, Duration::from_secs(5), "SUBACK").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = proc_memory(proxy.pid, "RssAnon");

    // 3,000 PUBLISHes on it reach the subscriber through the proxy (about 200 MB of topics).
    const PUBLISHES: usize = 3000;
    let reader = tokio::spawn(async move {
        for _ in 0..PUBLISHES {
            expect_packet(&mut subscriber, Duration::from_secs(10), "PUBLISH").await;
        }
        subscriber
    });
    let mut publisher = TcpStream::connect(mosquitto.addr()).await.unwrap();
    publisher.write_all(&connect_v4("publisher", 60, None)).await.unwrap();
    expect_packet(&mut publisher, Duration::from_secs(5), "CONNACK").await;
    let publish = publish_v4(&topic, b"x");
    for _ in 0..PUBLISHES {
        publisher.write_all(&publish).await.unwrap();
    }
    let _subscriber = reader.await.unwrap();
    let grew = proc_memory(proxy.pid, "RssAnon").saturating_sub(before);
    eprintln!("{PUBLISHES} PUBLISHes on a 64 KiB Will topic: proxy RssAnon +{} KiB", grew >> 10);
    // Before: each event and each remembered PUBLISH held its own copy of the topic.
    assert!(grew < 32 * 1024 * 1024, "the proxy grew by {} MB over {PUBLISHES} PUBLISHes", grew >> 20);
    drop(device);
}
