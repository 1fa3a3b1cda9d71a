//! Byte-exactness and TCP-level behaviour, with a scripted fake broker where a real one cannot
//! produce the case, and with mosquitto where it can.

use crate::harness::*;
use mqtt_chaos::config::Settings;
use mqtt_chaos::vocab::Direction;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Every client→broker packet type, MQTT 5, including a Will with properties, AUTH, a PUBLISH
/// larger than the inspection buffer, and the short DISCONNECT form.
fn client_stream() -> Vec<u8> {
    let mut connect = string("MQTT");
    connect.extend([5, 0xee, 0x00, 0x0a]); // level 5; flags: user, password, will retain, will QoS 1, will, clean
    let props = [0x11, 0, 0, 0, 60, 0x21, 0, 10, 0x27, 0, 1, 0, 0, 0x22, 0, 5, 0x19, 1, 0x17, 0];
    connect.push(props.len() as u8);
    connect.extend(props);
    connect.extend(string("")); // empty: the broker assigns one
    let will_props = [0x18, 0, 0, 0, 5, 0x01, 1, 0x02, 0, 0, 0, 9, 0x03, 0, 1, b'x'];
    connect.push(will_props.len() as u8);
    connect.extend(will_props);
    connect.extend(string("will/topic"));
    connect.extend(string("gone"));
    connect.extend(string("user"));
    connect.extend(string("secret-password"));
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    [
        packet(0x10, &connect),
        packet(0x30, &[&string("a/b")[..], &[0], b"qos0"].concat()),
        packet(0x32, &[&string("a/b")[..], &[0, 1, 0], b"qos1"].concat()),
        packet(0x34, &[&string("a/b")[..], &[0, 2, 3, 0x23, 0, 1], b"qos2+alias"].concat()),
        packet(0x30, &[&string("big")[..], &[0], &big].concat()),
        packet(0x40, &[0, 7]),
        packet(0x50, &[0, 8]),
        packet(0x62, &[0, 8]),
        packet(0x70, &[0, 9]),
        packet(0x82, &[&[0, 3, 0][..], &string("s/#"), &[1]].concat()),
        packet(0xa2, &[&[0, 4, 0][..], &string("s/#")].concat()),
        PINGREQ.to_vec(),
        packet(0xf0, &[0x18, 0]),
        DISCONNECT.to_vec(),
    ]
    .concat()
}

/// Every broker→client packet type, MQTT 5.
fn broker_stream() -> Vec<u8> {
    [
        packet(0x20, &[1, 0, 8, 0x13, 0, 30, 0x12, 0, 2, b'i', b'd']),
        packet(0x30, &[&string("a/b")[..], &[0], b"hello"].concat()),
        packet(0x40, &[0, 1]),
        packet(0x50, &[0, 2]),
        packet(0x62, &[0, 2]),
        packet(0x70, &[0, 2]),
        packet(0x90, &[0, 3, 0, 1]),
        packet(0xb0, &[0, 4, 0, 0]),
        PINGRESP.to_vec(),
        packet(0xf0, &[0x18, 0]),
        vec![0xe0, 0x01, 0x8e],
    ]
    .concat()
}

/// Writes `data` in awkward pieces: 1, 2, 3, … bytes, each flushed on its own.
async fn write_awkwardly(s: &mut (impl AsyncWriteExt + Unpin), data: &[u8]) {
    let mut pos = 0;
    let mut size = 1;
    while pos < data.len() {
        let end = (pos + size).min(data.len());
        s.write_all(&data[pos..end]).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        pos = end;
        size = size % 13 + 1;
    }
}

#[tokio::test]
async fn every_packet_type_arrives_byte_for_byte_in_both_directions_whatever_the_chunking() {
    let broker = FakeBroker::start().await;
    // A small inspection buffer so the 5000-byte PUBLISH is streamed, not buffered.
    let settings = Settings { max_buffered_packet: 1024, ..Settings::default() };
    let mut proxy = TestProxy::start_with(&broker.addr(), settings).await;
    let mut client = proxy.connect().await;
    let mut upstream = broker.accept().await;

    let (to_broker, to_client) = (client_stream(), broker_stream());
    let (mut client_rx, mut client_tx) = client.split();
    let (mut upstream_rx, mut upstream_tx) = upstream.split();
    // The client speaks first and half-closes; the broker answers over the half-open connection.
    let script = async {
        write_awkwardly(&mut client_tx, &to_broker).await;
        client_tx.shutdown().await.unwrap();
        write_awkwardly(&mut upstream_tx, &to_client).await;
        upstream_tx.shutdown().await.unwrap();
    };
    let (_, (at_broker, end_b), (at_client, end_c)) =
        tokio::join!(script, read_to_end(&mut upstream_rx, WAIT), read_to_end(&mut client_rx, WAIT));
    assert_eq!((end_b, end_c), (Ending::Eof, Ending::Eof));
    assert_eq!(at_broker.len(), to_broker.len());
    assert!(at_broker == to_broker, "client→broker bytes differ");
    assert!(at_client == to_client, "broker→client bytes differ");

    // The client's FIN (its first close) comes before the broker's last bytes: wait for the end.
    let (events, conn, close) = proxy.events_until_ended(WAIT).await;
    // PUBLISH events are only for watched (Will) topics; "a/b" is not one.
    assert_eq!(events, ["CONNECT", "CONNACK"]);
    let s = conn.snapshot();
    assert_eq!(s.client_to_broker.bytes, to_broker.len() as u64);
    assert_eq!(s.broker_to_client.bytes, to_client.len() as u64);
    assert_eq!(s.client_to_broker.packets.values().sum::<u64>(), 14);
    assert_eq!(s.broker_to_client.packets.values().sum::<u64>(), 11);
    assert_eq!(s.client_to_broker.packets["PUBLISH"], 4);
    assert!(s.malformed.is_empty(), "{:?}", s.malformed);
    assert_eq!(s.client_id.as_deref(), Some("id"), "assigned client id replaces the empty one");
    assert_eq!(s.protocol.map(|p| p.level()), Some(5));
    assert!(s.username_present);
    assert_eq!(s.session_expiry, Some(60));
    let will = s.will.clone().unwrap();
    assert_eq!(
        (will.topic.as_str(), will.qos, will.retain, will.delay_interval),
        ("will/topic", 1, true, Some(5))
    );
    assert_eq!((s.keep_alive.values.requested, s.keep_alive.values.server_announced), (Some(10), Some(30)));
    assert_eq!((s.keep_alive.broker_enforced, s.keep_alive.client_enforced), (Some(30), Some(30)));
    // The client's DISCONNECT (short form: reason 0) came before either FIN.
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("client", "disconnect"));
    assert_eq!(close.disconnect_reason, Some(0));
    assert!(!format!("{:?}", s).contains("secret-password"), "the password must never be kept");
    let json = serde_json::to_string(&s).unwrap();
    assert!(!json.contains("secret-password") && !json.contains("\"user\""), "{json}");
}

#[tokio::test]
async fn mqtt31_connect_is_recognised_and_forwarded_unchanged() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut client = proxy.connect().await;
    let mut upstream = broker.accept().await;
    let mut body = string("MQIsdp");
    body.extend([3, 0x02, 0, 20]);
    body.extend(string("legacy"));
    let connect = packet(0x10, &body);
    client.write_all(&connect).await.unwrap();
    assert_eq!(expect_packet(&mut upstream, WAIT, "CONNECT").await, connect);
    upstream.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    assert_eq!(expect_packet(&mut client, WAIT, "CONNACK").await, [0x20, 0x02, 0x00, 0x00]);
    drop((client, upstream));
    let (conn, _) = proxy.next_closed(WAIT).await;
    assert_eq!(conn.protocol().map(|p| p.level()), Some(3));
    assert_eq!(conn.keep_alive().requested, Some(20));
    assert_eq!(conn.client_id().as_deref(), Some("legacy"));
}

/// Connects a client through the proxy to the fake broker and exchanges CONNECT/CONNACK.
async fn connected_pair(proxy: &TestProxy, broker: &FakeBroker) -> (TcpStream, TcpStream) {
    let mut client = proxy.connect().await;
    let mut upstream = broker.accept().await;
    client.write_all(&connect_v4("pair", 60, None)).await.unwrap();
    expect_packet(&mut upstream, WAIT, "CONNECT").await;
    upstream.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    expect_packet(&mut client, WAIT, "CONNACK").await;
    (client, upstream)
}

#[tokio::test]
async fn client_fin_half_closes_towards_the_broker_and_the_other_direction_keeps_flowing() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let (mut client, mut upstream) = connected_pair(&proxy, &broker).await;

    client.shutdown().await.unwrap(); // FIN from the client
    let (rest, ending) = read_to_end(&mut upstream, WAIT).await;
    assert_eq!((rest.len(), ending), (0, Ending::Eof), "the broker sees the FIN");

    // The broker can still talk to the client over the half-open connection.
    upstream.write_all(&publish_v4("late/news", b"still flowing")).await.unwrap();
    assert_eq!(expect_packet(&mut client, WAIT, "PUBLISH").await, publish_v4("late/news", b"still flowing"));
    drop(upstream);
    let (_, ending) = read_to_end(&mut client, WAIT).await;
    assert_eq!(ending, Ending::Eof);

    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("client", "fin"));
}

#[tokio::test]
async fn client_reset_becomes_a_reset_towards_the_broker() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let (client, mut upstream) = connected_pair(&proxy, &broker).await;
    client.set_zero_linger().unwrap();
    drop(client); // RST
    let (_, ending) = read_to_end(&mut upstream, WAIT).await;
    assert_eq!(ending, Ending::Reset);
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("client", "rst"));
}

#[tokio::test]
async fn a_broker_reset_after_a_client_half_close_still_resets_the_client() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let (mut client, mut upstream) = connected_pair(&proxy, &broker).await;
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut upstream, WAIT).await.1, Ending::Eof);
    upstream.set_zero_linger().unwrap();
    drop(upstream);
    assert_eq!(read_to_end(&mut client, WAIT).await.1, Ending::Reset);
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("client", "fin"), "the first close is kept");
}

#[tokio::test]
async fn broker_fin_and_reset_reach_the_client_as_such() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;

    let (mut client, upstream) = connected_pair(&proxy, &broker).await;
    drop(upstream); // FIN
    assert_eq!(read_to_end(&mut client, WAIT).await.1, Ending::Eof);
    drop(client); // as real clients do on EOF; until then the other direction stays open
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("broker", "fin"));
    assert!(close.silence_s.is_some() && close.keep_alive_enforced == Some(60));

    let (mut client, upstream) = connected_pair(&proxy, &broker).await;
    upstream.set_zero_linger().unwrap();
    drop(upstream); // RST
    assert_eq!(read_to_end(&mut client, WAIT).await.1, Ending::Reset);
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("broker", "rst"));
}

#[tokio::test]
async fn mosquitto_closing_a_protocol_violator_reaches_the_client() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut client = proxy.connect().await;
    client.write_all(&connect_v4("twice", 60, None)).await.unwrap();
    expect_packet(&mut client, WAIT, "CONNACK").await;
    // A second CONNECT is a protocol violation: mosquitto closes the connection.
    client.write_all(&connect_v4("twice", 60, None)).await.unwrap();
    let (_, ending) = read_to_end(&mut client, WAIT).await;
    assert_eq!(ending, Ending::Eof, "mosquitto log:\n{}", broker.log());
    drop(client);
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!(close.closed_by.as_str(), "broker");
}

#[tokio::test]
async fn unreachable_upstream_closes_the_client_promptly_and_is_counted() {
    let dead = format!("127.0.0.1:{}", free_port()); // nothing listens there
    let mut proxy = TestProxy::start(&dead).await;
    let started = tokio::time::Instant::now();
    let mut client = proxy.connect().await;
    let (_, ending) = read_to_end(&mut client, Duration::from_secs(2)).await;
    assert_eq!(ending, Ending::Eof);
    assert!(started.elapsed() < Duration::from_secs(1), "closed after {:?}", started.elapsed());
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("proxy", "error"));
    assert!(close.reason.as_deref().unwrap().starts_with("upstream connect failed: "), "{close:?}");
    let totals = proxy.running().routes()[0].metrics.totals();
    assert_eq!((totals.upstream_failures, totals.active), (1, 0));
}

#[tokio::test]
async fn a_broker_that_never_answers_the_dial_times_out_and_closes_the_client() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so a dial hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let addr = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            fillers.push(s);
        }
    }
    let settings = Settings { connect_timeout: Duration::from_millis(300), ..Settings::default() };
    let mut proxy = TestProxy::start_with(&addr.to_string(), settings).await;
    let started = tokio::time::Instant::now();
    let mut client = proxy.connect().await;
    assert_eq!(read_to_end(&mut client, WAIT).await.1, Ending::Eof);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(2), "closed after {took:?}");
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!(close.reason.as_deref(), Some("upstream connect failed: no answer within 300ms"));
    drop((fillers, full));
}

#[tokio::test]
async fn garbage_from_a_client_is_relayed_raw_so_mosquitto_answers_as_without_the_proxy() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    // 'G' frames as a PUBACK of 69 bytes: long enough that mosquitto reads it whole and rejects it.
    let garbage =
        b"GET / HTTP/1.1\r\nHost: broker\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\nConnection: close\r\n\r\n";

    let mut direct = TcpStream::connect(broker.addr()).await.unwrap();
    direct.write_all(garbage).await.unwrap();
    let want = read_to_end(&mut direct, WAIT).await;

    let mut via = proxy.connect().await;
    via.write_all(garbage).await.unwrap();
    let got = read_to_end(&mut via, WAIT).await;
    assert_eq!(got, want, "the client sees what it would see without the proxy");
    assert_ne!(want.1, Ending::Open, "mosquitto closes a non-MQTT connection");

    let (conn, _) = proxy.next_closed(WAIT).await;
    let s = conn.snapshot();
    assert_eq!(s.malformed["client_to_broker"], "first packet from the client is PUBACK, not CONNECT");
    assert_eq!(s.client_to_broker.bytes, garbage.len() as u64, "every byte was relayed");
    assert_eq!(proxy.running().routes()[0].metrics.malformed(Direction::ClientToBroker), 1);
}

#[tokio::test]
async fn after_a_valid_connect_garbage_is_relayed_byte_for_byte() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let (mut client, mut upstream) = connected_pair(&proxy, &broker).await;
    // A reserved type 0, then bytes that would frame as MQTT: all must pass untouched.
    let tail = [0x00, 0x05, 1, 2, 3, 0xc0, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff];
    client.write_all(&tail).await.unwrap();
    client.shutdown().await.unwrap();
    let (got, ending) = read_to_end(&mut upstream, WAIT).await;
    assert_eq!((got.as_slice(), ending), (&tail[..], Ending::Eof));
    drop(upstream);
    let (conn, _) = proxy.next_closed(WAIT).await;
    assert_eq!(
        conn.snapshot().malformed.get(Direction::ClientToBroker.as_str()).map(String::as_str),
        Some("reserved packet type 0 in fixed header byte 0x00")
    );
}

#[tokio::test]
async fn on_malformed_close_closes_both_sides_after_delivering_the_valid_prefix() {
    let broker = FakeBroker::start().await;
    let settings = Settings { on_malformed: mqtt_chaos::config::OnMalformed::Close, ..Settings::default() };
    let mut proxy = TestProxy::start_with(&broker.addr(), settings).await;
    let (mut client, mut upstream) = connected_pair(&proxy, &broker).await;
    let mut bytes = PINGREQ.to_vec();
    bytes.extend([0x00, 0x00, 0xde, 0xad]);
    client.write_all(&bytes).await.unwrap();
    let (at_broker, ending) = read_to_end(&mut upstream, WAIT).await;
    assert_eq!((at_broker.as_slice(), ending), (&PINGREQ[..], Ending::Eof));
    let (at_client, ending) = read_to_end(&mut client, WAIT).await;
    assert_eq!((at_client.len(), ending), (0, Ending::Eof));
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("proxy", "fin"));
    assert!(close.reason.unwrap().contains("client_to_broker is not MQTT"));
}

#[tokio::test]
async fn a_broken_client_does_not_disturb_another_connection() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let mut good = proxy.connect().await;
    good.write_all(&connect_v4("good", 60, None)).await.unwrap();
    expect_packet(&mut good, WAIT, "CONNACK").await;
    for garbage in [&[0x00u8, 0x00][..], &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f], b"\x16\x03\x01\x02\x00"] {
        let mut bad = proxy.connect().await;
        bad.write_all(garbage).await.unwrap();
        let _ = read_to_end(&mut bad, Duration::from_secs(1)).await;
    }
    good.write_all(&PINGREQ).await.unwrap();
    assert_eq!(expect_packet(&mut good, WAIT, "PINGRESP").await, PINGRESP);
    let mut buf = [0u8; 1];
    assert!(tokio::time::timeout(Duration::from_millis(200), good.read(&mut buf)).await.is_err());
}
