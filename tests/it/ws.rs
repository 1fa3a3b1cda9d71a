//! MQTT over WebSocket on either side of the proxy: a WebSocket client (tokio-tungstenite)
//! through a `ws://` listener to mosquitto over TCP, with packets split across frames and
//! several in one frame, WebSocket pings answered, a Close frame passed on as the end of the
//! stream; a plain HTTP request answered 400; TCP clients (libmosquitto) through a `ws://`
//! upstream to mosquitto's own WebSocket listener; the WebSocket gateway (`ws` in front, TCP
//! behind) chained in front of the `ws` upstream.

use crate::harness::*;
use futures_util::{SinkExt, StreamExt};
use mqtt_chaos::config::RouteConfig;
use mqtt_chaos::vocab::Side;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Bytes, Message};

async fn ws_proxy(upstream: &str, listen_ws: Option<&str>, upstream_ws: Option<&str>) -> TestProxy {
    ws_proxy_with(upstream, listen_ws, upstream_ws, Default::default()).await
}

async fn ws_proxy_with(
    upstream: &str,
    listen_ws: Option<&str>,
    upstream_ws: Option<&str>,
    settings: mqtt_chaos::config::Settings,
) -> TestProxy {
    let route = RouteConfig {
        listen_ws: listen_ws.map(str::to_string),
        upstream_ws: upstream_ws.map(str::to_string),
        ..RouteConfig::tcp("default", "127.0.0.1:0", upstream)
    };
    TestProxy::start_route(route, settings).await
}

/// A WebSocket client of the proxy's `/mqtt` listener, connected to the broker behind it.
pub(crate) async fn ws_client(
    addr: std::net::SocketAddr,
    client_id: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let mut request = format!("ws://{addr}/mqtt").into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.expect("the WebSocket handshake");
    ws.send(Message::Binary(Bytes::from(connect_v4(client_id, 30, None)))).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 4).await, [0x20, 2, 0, 0], "CONNACK");
    ws
}

/// Waits until each of `reasons` is counted on the client side, and checks it is counted once.
async fn websocket_errors_counted_once(p: &TestProxy, reasons: &[&'static str]) {
    use crate::metrics::{metrics_when, route, sample};
    let count = |m: &str, reason: &'static str| {
        sample(m, "mqtt_chaos_websocket_errors_total", &route(&[("side", "client"), ("reason", reason)]))
    };
    let m = metrics_when(p, |m| reasons.iter().all(|r| count(m, r).is_some())).await;
    for &reason in reasons {
        assert_eq!(count(&m, reason), Some(1.0), "{reason}\n{m}");
    }
}

/// The Close frame's code the proxy sends next (other frames skipped).
async fn close_code(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("a Close frame in time") {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("no Close frame: {other:?}"),
        }
    }
}

/// Reads binary frames until `n` bytes came (answering nothing itself).
pub(crate) async fn read_bytes<S>(ws: &mut S, n: usize) -> Vec<u8>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(_)) => {}
            other => panic!("the WebSocket ended: {other:?}"),
        }
    }
    got
}

#[tokio::test]
async fn a_websocket_client_reaches_a_tcp_broker_whatever_the_framing() {
    let broker = Mosquitto::start();
    let mut p = ws_proxy(&broker.addr(), Some("/mqtt"), None).await;
    let mut request = format!("ws://{}/mqtt", p.addr).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut ws, response) =
        tokio_tungstenite::client_async(request, tcp).await.expect("the WebSocket handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "mqtt");
    // CONNECT split across two frames.
    let connect = connect_v4("ws-client", 30, None);
    let (a, b) = connect.split_at(5);
    ws.send(Message::Binary(Bytes::copy_from_slice(a))).await.unwrap();
    ws.send(Message::Binary(Bytes::copy_from_slice(b))).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 4).await, [0x20, 2, 0, 0], "CONNACK");
    // SUBSCRIBE and PUBLISH in one frame: SUBACK, then the message back.
    let mut both = subscribe_v4(1, "ws/t", 0);
    both.extend(publish_v4("ws/t", b"framed"));
    ws.send(Message::Binary(Bytes::from(both))).await.unwrap();
    let expected_back = [vec![0x90, 3, 0, 1, 0], publish_v4("ws/t", b"framed")].concat();
    assert_eq!(read_bytes(&mut ws, expected_back.len()).await, expected_back);
    // A WebSocket ping is answered, and is not an MQTT packet.
    ws.send(Message::Ping(Bytes::from_static(b"hi"))).await.unwrap();
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) => break p,
            Some(Ok(_)) => {}
            other => panic!("no pong: {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"hi");
    let live = p.running().registry().list();
    let json = serde_json::to_value(live[0].snapshot()).unwrap();
    assert_eq!(json["client_transport"]["transport"], "ws", "{json}");
    assert_eq!(json["client_transport"]["websocket"]["subprotocol"], "mqtt");
    let up = &json["client_to_broker"];
    assert!(
        up["packets"]["PINGREQ"].is_null() && up["last_ping_ago_s"].is_null(),
        "a WebSocket ping is no PINGREQ: {json}"
    );
    // A Close frame ends the client's side like a FIN: the broker sees the client go; the
    // record then holds the WebSocket's own counts and the Close code.
    ws.close(None).await.unwrap();
    let (conn, close) = p.next_closed(Duration::from_secs(5)).await;
    assert_eq!(close.closed_by, Side::Client, "{close:?}");
    TestProxy::ended(&conn, Duration::from_secs(5)).await;
    let ws_info = conn.snapshot().client_transport.unwrap().websocket.unwrap();
    assert_eq!((ws_info.pings, ws_info.close_code), (1, Some(1005)), "{ws_info:?}");
}

/// A frame over `--ws-max-frame` and a text frame each close their own connection with the
/// Close code that says why (1009, 1003), are counted by reason and named in the record; a
/// client beside them goes on undisturbed.
#[tokio::test]
async fn a_frame_over_the_limit_or_a_text_frame_is_closed_with_its_close_code_and_counted() {
    let broker = Mosquitto::start();
    let settings = mqtt_chaos::config::Settings { ws_max_frame: 4096, ..Default::default() };
    let mut p = ws_proxy_with(&broker.addr(), Some("/mqtt"), None, settings).await;
    let mut bystander = ws_client(p.addr, "bystander").await;
    let cases: [(&str, Message, u16, &str); 2] = [
        ("big", Message::Binary(Bytes::from(publish_v4("ws/big", &[7u8; 5000]))), 1009, "--ws-max-frame"),
        ("text", Message::Text("hello".into()), 1003, "a text WebSocket frame"),
    ];
    for (id, frame, code, why) in cases {
        let mut ws = ws_client(p.addr, id).await;
        ws.send(frame).await.unwrap();
        assert_eq!(close_code(&mut ws).await, Some(code), "{id}");
        let (_, close) = p.next_closed(Duration::from_secs(5)).await;
        assert_eq!(
            (close.closed_by, close.how),
            (Side::Proxy, mqtt_chaos::vocab::CloseHow::Fin),
            "{id}: {close:?}"
        );
        let reason = close.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("the client broke the WebSocket protocol") && reason.contains(why),
            "{id}: {reason}"
        );
    }
    // Just under the limit passes (a 4,096-byte frame: PUBLISH header, topic and payload).
    let mut ws = ws_client(p.addr, "under").await;
    ws.send(Message::Binary(Bytes::from(subscribe_v4(1, "ws/under", 0)))).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 5).await, [0x90, 3, 0, 1, 0], "SUBACK");
    let publish = publish_v4("ws/under", &vec![1u8; 4096 - 3 - 10]);
    assert_eq!(publish.len(), 4096);
    ws.send(Message::Binary(Bytes::from(publish.clone()))).await.unwrap();
    assert_eq!(read_bytes(&mut ws, publish.len()).await, publish);
    // The bystander's connection is untouched.
    bystander.send(Message::Binary(Bytes::from_static(&[0xc0, 0]))).await.unwrap();
    assert_eq!(read_bytes(&mut bystander, 2).await, [0xd0, 0], "PINGRESP");
    websocket_errors_counted_once(&p, &["frame_too_large", "text_frame"]).await;
}

/// A client that goes without a Close frame (a browser tab closed) has closed with a FIN; it
/// broke nothing.
#[tokio::test]
async fn a_websocket_client_gone_without_a_close_frame_is_a_fin_not_an_error() {
    let broker = Mosquitto::start();
    let mut p = ws_proxy(&broker.addr(), Some("/mqtt"), None).await;
    let ws = ws_client(p.addr, "tab").await;
    drop(ws); // the TCP connection closes, no Close frame
    let (_, close) = p.next_closed(Duration::from_secs(5)).await;
    assert_eq!((close.closed_by, close.how), (Side::Client, mqtt_chaos::vocab::CloseHow::Fin), "{close:?}");
    assert!(
        !p.running().metrics().contains("mqtt_chaos_websocket_errors_total{"),
        "no WebSocket error counted"
    );
}

#[tokio::test]
async fn wss_is_websocket_over_tls() {
    let pki = crate::tls::Pki::new();
    let broker = Mosquitto::start();
    // The listener's certificate only: the upstream is plain TCP.
    let options =
        mqtt_chaos::tls::TlsOptions { upstream_ca: None, upstream_server_name: None, ..pki.options() };
    let tls = mqtt_chaos::tls::RouteTls::load(
        options,
        mqtt_chaos::transport::Transport::Wss,
        mqtt_chaos::transport::Transport::Tcp,
        &broker.addr(),
    )
    .unwrap();
    let route = RouteConfig {
        tls,
        listen_ws: Some("/mqtt".into()),
        ..RouteConfig::tcp("default", "127.0.0.1:0", broker.addr())
    };
    let p = TestProxy::start_route(route, Default::default()).await;
    let tls_stream = pki.connect(&p.addr.to_string(), false).await.unwrap();
    let mut request = format!("wss://localhost:{}/mqtt", p.addr.port()).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (mut ws, _) =
        tokio_tungstenite::client_async(request, tls_stream).await.expect("the WebSocket handshake over TLS");
    ws.send(Message::Binary(Bytes::from(connect_v4("wss-client", 30, None)))).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 4).await, [0x20, 2, 0, 0], "CONNACK over wss");
    let live = p.running().registry().list();
    let json = serde_json::to_value(live[0].snapshot()).unwrap();
    assert_eq!(json["client_transport"]["transport"], "wss", "{json}");
    assert!(json["client_transport"]["tls"]["version"].is_string(), "{json}");
}

#[tokio::test]
async fn a_plain_http_request_on_a_websocket_listener_is_answered_400_and_another_path_404() {
    let broker = Mosquitto::start();
    let p = ws_proxy(&broker.addr(), Some("/mqtt"), None).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: proxy\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
    let mut request = format!("ws://{}/elsewhere", p.addr).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let e = tokio_tungstenite::client_async(request, tcp).await.unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    websocket_errors_counted_once(&p, &["bad_request", "not_found"]).await;
}

#[tokio::test]
async fn tcp_clients_reach_mosquittos_websocket_listener_through_a_ws_upstream_and_a_ws_gateway() {
    let ws_port = free_port();
    let broker = Mosquitto::start_with(&format!("listener {ws_port} 127.0.0.1\nprotocol websockets\n"));
    // TCP in front, WebSocket behind: the proxy speaks WebSocket to mosquitto.
    let front = ws_proxy(&format!("127.0.0.1:{ws_port}"), None, Some("/mqtt")).await;
    // And a WebSocket gateway for a TCP-only broker, reached through a second ws upstream.
    let gateway = ws_proxy(&broker.addr(), Some("/mqtt"), None).await;
    let chained = ws_proxy(&gateway.addr.to_string(), None, Some("/mqtt")).await;
    for (via, name) in [(front.addr, "ws upstream"), (chained.addr, "ws gateway")] {
        let topic = format!("ws/{}", via.port());
        let sub = Command::new("mosquitto_sub")
            .args(["-p", &broker.port.to_string(), "-t", &topic, "-C", "1", "-W", "10"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (apt-get install -y mosquitto-clients)");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut publish = Command::new("mosquitto_pub");
        publish.args(["-p", &via.port().to_string(), "-t", &topic, "-q", "1", "-m", "through websocket"]);
        // Off the runtime: the proxies under test run on it.
        let out = tokio::task::spawn_blocking(move || publish.output()).await.unwrap().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let got = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap()).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got.stdout), "through websocket\n", "{name}\n{}", broker.log());
    }
    let closed = front.running().registry().closed();
    assert_eq!(closed[0]["broker_transport"]["transport"], "ws", "{}", closed[0]);
}
