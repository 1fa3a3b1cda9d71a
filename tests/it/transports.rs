//! Fault actions over each transport a client can use (TCP, TLS, WebSocket, WebSocket over
//! TLS): the Keep Alive rewrite and a dropped PINGREQ reach the broker exactly as over TCP, and
//! the `close` fault ends the client's side the way its transport ends a stream — a FIN, a
//! `close_notify` and FIN, a Close frame — or resets it, leaving the broker's side open. The
//! TLS client is tokio-rustls; the WebSocket clients are the proxy's own (tungstenite under it).

use crate::harness::*;
use crate::tls::Pki;
use mqtt_chaos::client::Dial;
use mqtt_chaos::codec::{Connect, FrameHeader};
use mqtt_chaos::config::RouteConfig;
use mqtt_chaos::tls::{RouteTls, TlsOptions};
use mqtt_chaos::transport::{Stream, Transport};
use mqtt_chaos::vocab::{CloseHow, Side};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A proxy whose listener speaks `via`, in front of the scripted broker.
async fn proxy(pki: &Pki, via: Transport, broker: &FakeBroker) -> TestProxy {
    let options = TlsOptions { upstream_ca: None, upstream_server_name: None, ..pki.options() };
    let options = if via.tls() { options } else { TlsOptions::default() };
    let tls = RouteTls::load(options, via, Transport::Tcp, &broker.addr()).unwrap();
    let route = RouteConfig {
        tls,
        listen_ws: via.websocket().then(|| "/mqtt".to_string()),
        ..RouteConfig::tcp("default", "127.0.0.1:0", broker.addr())
    };
    let p = TestProxy::start_route(route, Default::default()).await;
    p.set_rules(
        r#"
[[rules]]
name = "ka"
action = "rewrite_keepalive"
set = 7

[[rules]]
name = "quiet"
action = "drop"
direction = "client_to_broker"
packets = ["PINGREQ"]

[[rules]]
name = "fin"
action = "close"
side = "client"
how = "fin"
after = "300ms"
match = { client_id = "gone-fin" }

[[rules]]
name = "rst"
action = "close"
side = "client"
how = "rst"
after = "300ms"
match = { client_id = "gone-rst" }
"#,
    );
    p
}

/// A client of the proxy over `via`, connected (CONNECT sent, CONNACK read), and the broker's
/// side of its connection, which saw the CONNECT's Keep Alive rewritten to 7.
async fn connected(
    pki: &Pki,
    via: Transport,
    p: &TestProxy,
    broker: &FakeBroker,
    id: &str,
) -> (Box<dyn Io>, TcpStream) {
    let addr = p.addr.to_string();
    let mut client: Box<dyn Io> = match via {
        Transport::Tcp => Box::new(TcpStream::connect(&addr).await.unwrap()),
        Transport::Tls => Box::new(pki.connect(&addr, false).await.unwrap()),
        Transport::Ws | Transport::Wss => {
            let options = TlsOptions {
                upstream_ca: Some(pki.path("ca.pem")),
                upstream_server_name: Some("localhost".into()),
                ..TlsOptions::default()
            };
            let tls = mqtt_chaos::tls::client_side(&options, "127.0.0.1").unwrap();
            let dial = Dial { addr: &addr, tls: via.tls().then_some(&tls), ws_path: Some("/mqtt") };
            Box::new(dial.connect(WAIT).await.unwrap())
        }
    };
    client.write_all(&connect_v4(id, 30, None)).await.unwrap();
    client.flush().await.unwrap();
    let mut upstream = broker.accept().await;
    let frame = expect_packet(&mut upstream, WAIT, "CONNECT").await;
    let h = FrameHeader::parse(&frame).unwrap().unwrap();
    assert_eq!(Connect::decode(&frame, &h).unwrap().keep_alive, 7, "{via:?}: Keep Alive rewritten");
    upstream.write_all(&[0x20, 2, 0, 0]).await.unwrap();
    assert_eq!(expect_packet(&mut client, WAIT, "CONNACK").await, [0x20, 2, 0, 0], "{via:?}");
    (client, upstream)
}

/// The broker's side stays open and silent: nothing to read, no end, for a while.
async fn still_open(upstream: &mut TcpStream, via: Transport) {
    let mut byte = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(500), upstream.read(&mut byte)).await;
    assert!(r.is_err(), "{via:?}: the broker's side was left open and silent, got {r:?}");
}

#[tokio::test]
async fn every_fault_action_works_over_tcp_tls_websocket_and_websocket_over_tls() {
    let pki = Pki::new();
    for via in [Transport::Tcp, Transport::Tls, Transport::Ws, Transport::Wss] {
        let broker = FakeBroker::start().await;
        let mut p = proxy(&pki, via, &broker).await;

        // A PINGREQ dropped on its way: the broker's next packet is the PUBLISH after it.
        let (mut client, mut upstream) = connected(&pki, via, &p, &broker, "steady").await;
        let publish = publish_v4("t", b"after the ping");
        client.write_all(&[0xc0, 0]).await.unwrap();
        client.write_all(&publish).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(expect_packet(&mut upstream, WAIT, "PUBLISH").await, publish, "{via:?}: PINGREQ dropped");

        // `close` with FIN: the transport's own clean end towards the client.
        let (mut client, mut upstream) = connected(&pki, via, &p, &broker, "gone-fin").await;
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await.expect("closed in time");
        // tokio-rustls reports a FIN without close_notify as an error; the proxy's WebSocket
        // stream ends cleanly only at a Close frame or a FIN.
        assert!(matches!(end, Ok(0)), "{via:?}: a clean end, got {end:?}");
        still_open(&mut upstream, via).await;
        let (_, close) = p.next_closed(WAIT).await;
        assert_eq!((close.closed_by, close.how), (Side::Proxy, CloseHow::Fin), "{via:?}: {close:?}");

        // `close` with RST: the client's side is reset.
        let (mut client, mut upstream) = connected(&pki, via, &p, &broker, "gone-rst").await;
        let end = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await.expect("reset in time");
        let kind = end.as_ref().map_err(std::io::Error::kind);
        assert_eq!(kind, Err(std::io::ErrorKind::ConnectionReset), "{via:?}: {end:?}");
        still_open(&mut upstream, via).await;
        let (_, close) = p.next_closed(WAIT).await;
        assert_eq!((close.closed_by, close.how), (Side::Proxy, CloseHow::Rst), "{via:?}: {close:?}");
    }
}

/// A `close` fault with FIN towards a WebSocket client sends a Close frame first.
#[tokio::test]
async fn a_close_fault_towards_a_websocket_client_sends_a_close_frame() {
    let pki = Pki::new();
    let broker = FakeBroker::start().await;
    let p = proxy(&pki, Transport::Ws, &broker).await;
    let addr = p.addr.to_string();
    let dial = Dial { addr: &addr, tls: None, ws_path: Some("/mqtt") };
    let mut stream = dial.connect(WAIT).await.unwrap();
    stream.write_all(&connect_v4("gone-fin", 30, None)).await.unwrap();
    stream.flush().await.unwrap();
    let mut upstream = broker.accept().await;
    expect_packet(&mut upstream, WAIT, "CONNECT").await;
    upstream.write_all(&[0x20, 2, 0, 0]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.expect("closed in time").unwrap();
    assert_eq!((n, rest.as_slice()), (4, &[0x20, 2, 0, 0][..]), "the CONNACK, then the end");
    let Stream::Ws(ws) = &stream else { panic!("a WebSocket stream") };
    assert_eq!(ws.close_code, Some(1000), "a Close frame (normal closure)");
}
