//! Accept-loop and session-lifecycle tests over real loopback sockets, with a scripted broker.

use super::*;
use crate::codec::{Splitter, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client id that makes the pump panic (compiled into test builds only).
pub(crate) const PANIC_CLIENT_ID: &str = "panic-in-pump";

/// A broker that answers every CONNECT with a CONNACK and every PINGREQ with a PINGRESP.
async fn scripted_broker() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut splitter = Splitter::new(1 << 20);
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n @ 1..) = socket.read(&mut chunk).await else { return };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Step::Frame(h) = splitter.step(&buf) {
                        let reply: &[u8] = match h.packet_type {
                            crate::codec::PacketType::Connect => &[0x20, 0x02, 0x00, 0x00],
                            crate::codec::PacketType::Pingreq => &[0xd0, 0x00],
                            _ => &[],
                        };
                        buf.drain(..h.frame_len());
                        if socket.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut p = vec![0x10, (12 + client_id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    p.extend((client_id.len() as u16).to_be_bytes());
    p.extend(client_id.as_bytes());
    p
}

async fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got)).await.unwrap().unwrap();
    got
}

async fn start(settings: Settings) -> RunningProxy {
    let upstream = scripted_broker().await;
    let route = RouteConfig::tcp("r", "127.0.0.1:0", upstream.to_string());
    Proxy::bind(&[route], settings).await.unwrap().start()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_panic_in_one_connection_closes_only_that_one_and_leaves_no_trace() {
    let proxy = start(Settings { max_connections: 2, ..Settings::default() }).await;
    let route = proxy.routes()[0].clone();
    let mut events = proxy.registry().subscribe();

    let mut healthy = TcpStream::connect(route.listen).await.unwrap();
    healthy.write_all(&connect_packet("healthy")).await.unwrap();
    assert_eq!(read_exactly(&mut healthy, 4).await, [0x20, 0x02, 0x00, 0x00]);

    let mut doomed = TcpStream::connect(route.listen).await.unwrap();
    doomed.write_all(&connect_packet(PANIC_CLIENT_ID)).await.unwrap();
    let mut rest = Vec::new();
    // The client sees its connection end (a FIN, or a reset: either way within the timeout).
    let _ = tokio::time::timeout(Duration::from_secs(5), doomed.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "the CONNECT never reached the broker, so no CONNACK");

    // Its record was closed, logged as an internal error, and removed; the permit came back.
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap() {
            crate::record::Event::Closed(conn) => break conn,
            _ => continue,
        }
    };
    let close = closed.close_info().unwrap();
    assert_eq!((close.closed_by.as_str(), close.how.as_str()), ("proxy", "error"));
    assert!(close.reason.unwrap().contains("internal error: injected by a test"));
    assert_eq!(closed.proxy_end().unwrap().cause, "internal_error");
    assert_eq!(route.metrics.totals().internal_errors, 1);
    wait_until("the gauge comes down", || route.metrics.totals().active == 1).await;
    assert_eq!(proxy.registry().len(), 1);

    // The other connection goes on, and the freed place under --max-connections 2 is usable.
    healthy.write_all(&[0xc0, 0x00]).await.unwrap();
    assert_eq!(read_exactly(&mut healthy, 2).await, [0xd0, 0x00]);
    let mut next = TcpStream::connect(route.listen).await.unwrap();
    next.write_all(&connect_packet("next")).await.unwrap();
    assert_eq!(read_exactly(&mut next, 4).await, [0x20, 0x02, 0x00, 0x00]);
    assert_eq!(route.metrics.totals().rejected, 0);
    assert!(proxy.metrics().contains("mqtt_chaos_internal_errors_total{route=\"r\"} 1"));
    drop((healthy, next));
    proxy.shutdown().await;
}

#[tokio::test]
async fn max_connections_is_one_pool_for_every_route() {
    let upstream = scripted_broker().await.to_string();
    let routes: Vec<_> =
        (0..3).map(|i| RouteConfig::tcp(format!("r{i}"), "127.0.0.1:0", upstream.clone())).collect();
    let proxy =
        Proxy::bind(&routes, Settings { max_connections: 4, ..Settings::default() }).await.unwrap().start();
    // 12 clients at once over three routes: exactly 4 get through, whatever the interleaving.
    let mut clients = Vec::new();
    for i in 0..12 {
        let mut c = TcpStream::connect(proxy.routes()[i % 3].listen).await.unwrap();
        c.write_all(&connect_packet(&format!("c{i}"))).await.unwrap();
        clients.push(c);
    }
    let mut served = 0;
    for c in &mut clients {
        let mut ack = [0u8; 4];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut ack)).await {
            served += 1;
        }
    }
    assert_eq!(served, 4);
    let rejected: u64 = proxy.routes().iter().map(|r| r.metrics.totals().rejected).sum();
    assert_eq!(rejected, 8);
    drop(clients);
    proxy.shutdown().await;
}

#[test]
fn a_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
    let mut t = Throttle::new(Duration::from_secs(10));
    let t0 = std::time::Instant::now();
    let at = |ms: u64| Instant::from_std(t0 + Duration::from_millis(ms));
    assert_eq!(t.hit(at(0)), Some(0));
    assert_eq!(t.hit(at(50)), None);
    assert_eq!(t.hit(at(9_999)), None);
    assert_eq!(t.hit(at(10_000)), Some(2), "two held back since the last line");
    assert_eq!(t.hit(at(30_000)), Some(0));
}
