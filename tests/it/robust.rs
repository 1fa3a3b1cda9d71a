//! Limits and recovery: nothing a peer does takes the proxy down or leaks a connection.

use crate::harness::*;
use crate::metrics::sample;
use mqtt_chaos::config::Settings;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

/// Waits until no connection is live any more and the active gauge is back to 0.
async fn assert_no_leak(proxy: &TestProxy) {
    let deadline = Instant::now() + WAIT;
    while !proxy.running().registry().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        proxy.running().registry().is_empty(),
        "live connections left: {}",
        proxy.running().registry().len()
    );
    assert_eq!(proxy.running().routes()[0].metrics.totals().active, 0);
}

#[tokio::test]
async fn beyond_max_connections_new_clients_are_closed_at_once_and_counted() {
    let broker = Mosquitto::start();
    let proxy =
        TestProxy::start_with(&broker.addr(), Settings { max_connections: 2, ..Settings::default() }).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = proxy.connect().await;
        c.write_all(&connect_v4(&format!("held-{i}"), 30, None)).await.unwrap();
        expect_packet(&mut c, WAIT, "CONNACK").await;
        held.push(c);
    }
    let mut refused = proxy.connect().await;
    let started = Instant::now();
    assert_eq!(read_to_end(&mut refused, WAIT).await, (vec![], Ending::Eof));
    assert!(started.elapsed() < Duration::from_millis(500));
    let m = proxy.running().metrics();
    assert_eq!(
        sample(&m, "mqtt_chaos_connections_rejected_total", &[("route", "default")]),
        Some(1.0),
        "{m}"
    );
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = proxy.connect().await;
    again.write_all(&connect_v4("held-again", 30, None)).await.unwrap();
    expect_packet(&mut again, WAIT, "CONNACK").await;
}

#[tokio::test]
async fn a_client_that_never_reads_while_the_broker_floods_it_keeps_proxy_memory_bounded() {
    let broker = FakeBroker::start().await;
    let proxy = ProxyProcess::start(&broker.addr(), &[]);
    let mut client = proxy.connect().await;
    client.write_all(&connect_v4("deaf", 30, None)).await.unwrap();
    // The readiness probe of ProxyProcess::start was proxied too: skip its (empty) dial.
    let mut upstream = loop {
        let mut u = broker.accept().await;
        if let Ok(Ok(p)) = tokio::time::timeout(WAIT, read_packet(&mut u)).await {
            assert_eq!(p[0], 0x10, "the client's CONNECT");
            break u;
        }
    };
    let baseline = peak_rss(proxy.pid());
    // 64 MiB of PUBLISHes towards a client that reads nothing.
    let publish = publish_v4("flood", &[0x5a; 16 * 1024]);
    let mut sent = 0usize;
    let _ = tokio::time::timeout(Duration::from_secs(4), async {
        while sent < 64 * 1024 * 1024 {
            upstream.write_all(&publish).await.unwrap();
            sent += publish.len();
        }
    })
    .await;
    let peak = peak_rss(proxy.pid());
    assert!(sent < 16 * 1024 * 1024, "the broker could send {sent} bytes: no back-pressure");
    assert!(peak < baseline + 4 * 1024 * 1024, "proxy peak RSS grew from {baseline} to {peak} bytes");
    drop(client);
}

#[tokio::test]
async fn a_broker_that_dies_and_comes_back_needs_no_proxy_restart() {
    let mut broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let mut c = proxy.connect().await;
    c.write_all(&connect_v4("survivor", 30, None)).await.unwrap();
    expect_packet(&mut c, WAIT, "CONNACK").await;
    for i in 0..20u8 {
        c.write_all(&publish_v4("traffic", &[i; 512])).await.unwrap();
    }
    broker.kill();
    // A killed broker's kernel sends FIN, or RST when unread data was pending: the client gets
    // the same, and the record says the broker closed.
    assert_ne!(read_to_end(&mut c, WAIT).await.1, Ending::Open, "the open connection ends");
    drop(c);
    let (_, close) = proxy.next_closed(WAIT).await;
    assert_eq!(close.closed_by.as_str(), "broker", "{close:?}");

    // While it is down, clients are closed promptly and the failure is counted.
    let mut early = proxy.connect().await;
    assert_eq!(read_to_end(&mut early, WAIT).await.1, Ending::Eof);
    proxy.next_closed(WAIT).await;
    assert!(proxy.running().routes()[0].metrics.totals().upstream_failures >= 1);

    broker.restart();
    let mut back = proxy.connect().await;
    back.write_all(&connect_v4("survivor", 30, None)).await.unwrap();
    assert_eq!(expect_packet(&mut back, WAIT, "CONNACK").await, [0x20, 0x02, 0x00, 0x00]);
    drop(back);
    assert_no_leak(&proxy).await;
}

#[tokio::test]
async fn an_upstream_that_accepts_but_never_answers_leaves_a_clear_record_and_no_leak() {
    let broker = FakeBroker::start().await;
    let settings = Settings { half_close_timeout: Duration::from_millis(500), ..Settings::default() };
    let mut proxy = TestProxy::start_with(&broker.addr(), settings).await;
    let mut c = proxy.connect().await;
    c.write_all(&connect_v4("waiting", 30, None)).await.unwrap();
    let _silent = broker.accept().await;
    assert_eq!(read_to_end(&mut c, Duration::from_secs(1)).await, (vec![], Ending::Open), "no CONNACK");
    drop(c); // the client gives up; the broker never closes, so the half-close timeout ends it
    let (conn, close) = proxy.next_closed(WAIT).await;
    // The client closed first; then the proxy ended what the broker left open, and says so.
    assert_eq!(
        (close.closed_by.as_str(), close.how.as_str(), close.cause.as_str()),
        ("client", "fin", "no_connack")
    );
    assert_eq!(conn.snapshot().state, "closing", "the broker still holds its side");
    TestProxy::ended(&conn, WAIT).await;
    let end = conn.proxy_end().expect("the proxy ended the half-open rest");
    assert_eq!(end.cause, "half_close_timeout");
    assert!(end.detail.contains("the broker never closed its side"), "{}", end.detail);
    assert!(conn.snapshot().connack.is_none(), "no CONNACK was ever forwarded");
    assert_no_leak(&proxy).await;
}

#[tokio::test]
async fn an_upstream_that_resets_every_connection_leaves_clear_records_and_no_leak() {
    let broker = FakeBroker::start().await;
    let mut proxy = TestProxy::start(&broker.addr()).await;
    for i in 0..20 {
        let mut c = proxy.connect().await;
        c.write_all(&connect_v4(&format!("reset-{i}"), 30, None)).await.unwrap();
        let upstream = broker.accept().await;
        upstream.set_zero_linger().unwrap();
        drop(upstream);
        let (_, ending) = read_to_end(&mut c, WAIT).await;
        assert_ne!(ending, Ending::Open);
        drop(c);
        let (_, close) = proxy.next_closed(WAIT).await;
        // Depending on whether the RST beat the end of the dial, it is the broker resetting an
        // established connection, or a failed dial; either way the record says so.
        let said = (close.closed_by.as_str(), close.how.as_str());
        let reason = close.reason.clone().unwrap_or_default();
        assert!(
            said == ("broker", "rst") || (said == ("proxy", "error") && reason.contains("reset by peer")),
            "connection {i}: {close:?}"
        );
    }
    assert_no_leak(&proxy).await;
}

#[tokio::test]
async fn a_client_that_connects_and_sends_nothing_is_recorded_when_it_leaves() {
    let broker = Mosquitto::start();
    let mut proxy = TestProxy::start(&broker.addr()).await;
    let c = proxy.connect().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(proxy.running().registry().len(), 1);
    drop(c);
    let (conn, close) = proxy.next_closed(WAIT).await;
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("client", "fin"));
    assert_eq!((conn.protocol(), conn.bytes(mqtt_chaos::vocab::Direction::ClientToBroker)), (None, 0));
    assert_no_leak(&proxy).await;
}

#[tokio::test]
async fn a_client_that_dribbles_its_connect_byte_by_byte_gets_through() {
    let broker = Mosquitto::start();
    let proxy = TestProxy::start(&broker.addr()).await;
    let mut c = proxy.connect().await;
    for byte in connect_v4("dribbler", 30, None) {
        c.write_all(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(expect_packet(&mut c, WAIT, "CONNACK").await, [0x20, 0x02, 0x00, 0x00]);
    let live = proxy.running().registry().list();
    assert_eq!(live[0].client_id().as_deref(), Some("dribbler"));
}
