//! What a hostile peer can make the proxy hold, measured on the binary while the peer pushes:
//! a WebSocket ping flood from a client and from a broker that never read, unfinished frames
//! from many connections at once — each beside a canary connection whose messages must come
//! through intact.

use crate::harness::*;
use crate::ws::{read_bytes, ws_client};
use futures_util::{SinkExt, StreamExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// The binary with its admin API, started with `args` after `proxy`; killed on drop.
pub struct Binary {
    _child: KillOnDrop,
    pub pid: u32,
    pub admin: String,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// `proxy --admin <free> args…`, ready once `ready_on` and the admin API accept.
    pub fn start(args: &[&str], ready_on: &str) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("proxy.log");
        let admin = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary())
            .arg("proxy")
            .args(["--admin", &admin])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        let child = KillOnDrop(child);
        for addr in [ready_on, admin.as_str()] {
            let up = (0..200).any(|_| {
                std::net::TcpStream::connect(addr).is_ok() || {
                    std::thread::sleep(Duration::from_millis(25));
                    false
                }
            });
            assert!(up, "the proxy did not listen on {addr}:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        Binary { _child: child, pid, admin, log, _dir: dir }
    }

    /// `GET path` on the admin API: the body.
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(text)
    }

    /// A metric without labels, from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    pub fn rss(&self) -> u64 {
        proc_memory(self.pid, "VmRSS")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// A canary: subscribes to its own topic through the proxy and sends itself `n` messages of
/// distinct content; every one must come back intact and in order.
async fn canary(addr: &str, id: &str, n: usize) {
    let mut ws = ws_client(addr.parse().unwrap(), id).await;
    let topic = format!("canary/{id}");
    ws.send(Message::Binary(Bytes::from(subscribe_v4(1, &topic, 0)))).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 5).await, [0x90, 3, 0, 1, 0], "SUBACK");
    for i in 0..n {
        let payload = format!("canary message {i} {}", "x".repeat(i % 200));
        let publish = publish_v4(&topic, payload.as_bytes());
        ws.send(Message::Binary(Bytes::from(publish.clone()))).await.unwrap();
        assert_eq!(read_bytes(&mut ws, publish.len()).await, publish, "message {i} came back intact");
    }
}

/// Writes `frame` over and over for `during` (at most `most` bytes), as fast as the proxy takes
/// it; returns the bytes it took. Every write is bounded, so a proxy that stops reading stops the loop's progress.
async fn push_for(tcp: &mut TcpStream, frame: &[u8], during: Duration, most: usize) -> Result<usize, String> {
    let batch: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * (65536 / frame.len())).collect();
    let end = Instant::now() + during;
    let (mut sent, mut at) = (0, 0);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let upto = (batch.len() - at).min(most - sent);
        if upto == 0 {
            tokio::time::sleep(left).await;
            break;
        }
        match tokio::time::timeout(left, tcp.write(&batch[at..at + upto])).await {
            Ok(Ok(n)) => {
                sent += n;
                at = (at + n) % batch.len();
            }
            Ok(Err(e)) => {
                return Err(format!("the proxy closed the flooding connection after {sent} bytes: {e}"));
            }
            Err(_) => break,
        }
    }
    Ok(sent)
}

/// A masked client frame (RFC 6455 §5.2): FIN, `opcode`, a payload under 126 bytes.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x5a, 0xa5, 0x3c, 0xc3];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The upgrade request of a raw WebSocket client, up to the end of the 101 answer.
async fn raw_upgrade(addr: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ping_flood_from_a_client_that_never_reads_stops_the_proxy_reading_it() {
    let broker = Mosquitto::start();
    let port = free_port();
    let listen = format!("ws://127.0.0.1:{port}/mqtt");
    let proxy =
        Binary::start(&["--listen", &listen, "--upstream", &broker.addr()], &format!("127.0.0.1:{port}"));
    let addr = format!("127.0.0.1:{port}");
    let before = proxy.rss();

    // Pings with the largest payload a control frame may carry; the flooder never reads.
    let mut flooder = raw_upgrade(&addr).await;
    let ping = client_frame(0x9, &[0x42; 125]);
    let flood = tokio::spawn(async move {
        let sent = push_for(&mut flooder, &ping, Duration::from_secs(4), usize::MAX).await;
        (sent, flooder)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    canary(&addr, "canary-ping-flood", 200).await;
    let (sent, _flooder) = flood.await.unwrap();
    let sent = sent.unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_text()));
    let grew = proxy.rss().saturating_sub(before);

    // Before: the proxy read ~250 MB/s of pings and queued a Pong for each (1.4 GB in 6 s).
    // Now it stops reading once a Pong cannot go out: the flooder gets as far as the socket
    // buffers between them and no further.
    eprintln!("client ping flood: {sent} bytes taken in 4 s, proxy RSS +{} KiB", grew >> 10);
    assert!(
        sent < 32 * MIB as usize,
        "the proxy kept reading a flooder that never reads: {sent} bytes taken"
    );
    assert!(grew < 32 * MIB, "the proxy grew by {} MiB during the flood", grew / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::result_large_err)] // tungstenite's handshake callback returns its HTTP response
async fn a_websocket_ping_flood_from_a_broker_that_never_reads_stops_the_proxy_reading_it() {
    // A WebSocket broker that accepts the proxy's upgrade, then sends pings and never reads.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("ws://{}/mqtt", listener.local_addr().unwrap());
    let flood = tokio::spawn(async move {
        // The connection that carries the client's CONNECT (the proxy's check at start sends none).
        let mut ws = loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let callback =
                |_: &tokio_tungstenite::tungstenite::handshake::server::Request,
                 mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    resp.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
                    Ok(resp)
                };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else { continue };
            if let Some(Ok(Message::Binary(_))) = ws.next().await {
                break ws;
            }
        };
        let tcp = ws.get_mut();
        // Unmasked server frames: a ping with a 125-byte payload.
        let mut ping = vec![0x89, 125];
        ping.extend([0x42; 125]);
        push_for(tcp, &ping, Duration::from_secs(4), usize::MAX).await
    });
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let proxy = Binary::start(&["--listen", &listen, "--upstream", &upstream], &listen);
    let before = proxy.rss();
    let mut client = TcpStream::connect(&listen).await.unwrap();
    client.write_all(&connect_v4("device-under-flood", 30, None)).await.unwrap();
    let sent = flood.await.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_text()));
    let grew = proxy.rss().saturating_sub(before);
    eprintln!("broker ping flood: {sent} bytes taken in 4 s, proxy RSS +{} KiB", grew >> 10);
    assert!(sent < 32 * MIB as usize, "the proxy kept reading a flooding broker: {sent} bytes taken");
    assert!(grew < 32 * MIB, "the proxy grew by {} MiB during the flood", grew / MIB);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_websocket_frames_of_many_connections_are_held_up_to_ws_max_held_and_no_further() {
    let broker = Mosquitto::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let listen = format!("ws://{addr}/mqtt");
    let proxy =
        Binary::start(&["--listen", &listen, "--upstream", &broker.addr(), "--ws-max-held", "24MiB"], &addr);
    assert_eq!(proxy.metric("mqtt_chaos_websocket_held_limit_bytes"), (24 * MIB) as f64);
    let before = proxy.rss();

    // 24 connections each start an 8 MiB binary frame (192 MiB in all) and never finish it.
    const HOLDERS: usize = 24;
    let mut holders = Vec::new();
    for _ in 0..HOLDERS {
        let mut tcp = raw_upgrade(&addr).await;
        let mut head = vec![0x82, 0x80 | 127];
        head.extend((8 * MIB).to_be_bytes());
        head.extend([0, 0, 0, 0]); // a zero mask: the payload goes as it is
        tcp.write_all(&head).await.unwrap();
        holders.push(tokio::spawn(async move {
            let chunk = vec![0x30u8; 64 * 1024];
            let sent =
                push_for(&mut tcp, &chunk, Duration::from_secs(4), 8 * MIB as usize - 1).await.unwrap();
            (sent, tcp)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A connection that holds nothing still gets through while the limit is reached.
    canary(&addr, "canary-held-frames", 50).await;
    let mut taken = 0;
    let mut conns = Vec::new();
    for h in holders {
        let (sent, tcp) = h.await.unwrap();
        taken += sent;
        conns.push(tcp);
    }
    let held = proxy.metric("mqtt_chaos_websocket_held_bytes");
    let paused = proxy.metric("mqtt_chaos_websocket_reads_paused_total");
    let grew = proxy.rss().saturating_sub(before);
    // The limit, the one message let through to finish (8 MiB here), one read per connection.
    let bound = 24 * MIB + 8 * MIB + HOLDERS as u64 * 8 * 1024;
    eprintln!(
        "{HOLDERS} unfinished 8 MiB frames: {taken} bytes taken, {held} held, {paused} pauses, proxy RSS +{} MiB",
        grew / MIB
    );
    assert!(held <= bound as f64 && held >= (20 * MIB) as f64, "held {held} bytes, bound {bound}");
    assert!(paused >= 1.0, "no connection was paused");
    assert!(grew < bound + 16 * MIB, "the proxy grew by {} MiB holding frames", grew / MIB);
    assert!(taken < 192 * MIB as usize, "every frame was taken whole: {taken} bytes");

    // The holders leave with a reset (a FIN would wait behind their unsent bytes for a window
    // the proxy, not reading, never opens: TCP's own flow control): what they held is given back.
    for tcp in &conns {
        tcp.set_zero_linger().unwrap();
    }
    drop(conns);
    let given_back = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        proxy.metric("mqtt_chaos_websocket_held_bytes") == 0.0
    });
    assert!(
        given_back,
        "held bytes stay counted after the connections closed: {}\n{}",
        proxy.metric("mqtt_chaos_websocket_held_bytes"),
        proxy.get("/connections")
    );
}
