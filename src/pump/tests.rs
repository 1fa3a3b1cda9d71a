//! Pump tests over in-memory streams, with tokio's paused clock.

use super::*;
use crate::route::{Route, RouteStats};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf, duplex};
use tokio_util::sync::CancellationToken;

fn ctx(settings: Settings) -> Ctx {
    ctx_with(settings, Vec::new())
}

/// A context whose rule set holds the given rules (TOML rule tables).
fn ctx_with(settings: Settings, rules: Vec<&str>) -> Ctx {
    let rules = rules
        .into_iter()
        .map(|r| Arc::new(toml::from_str::<crate::fault::RuleSpec>(r).unwrap().compile("r").unwrap()))
        .collect();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(crate::fault::RuleSet::new(None, Some(1), rules)));
    std::mem::forget(tx); // the rule set stays as it is for the test
    let route = Arc::new(Route {
        name: "test".into(),
        listen: "127.0.0.1:1".parse().unwrap(),
        upstream: "127.0.0.1:2".into(),
        stats: RouteStats::default(),
    });
    let registry = Arc::new(Registry::default());
    let conn = registry.open(route, "127.0.0.1:3".parse().unwrap(), CancellationToken::new());
    Ctx {
        conn,
        registry,
        settings: Arc::new(settings),
        faults: Mutex::new(ConnFaults::new(rx.clone())),
        rules: rx,
        stop: CancellationToken::new(),
        wake: Notify::new(),
    }
}

fn connect_v4(keep_alive: u16) -> Vec<u8> {
    let mut p = vec![0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    p.extend(keep_alive.to_be_bytes());
    p.extend([0, 2, b'p', b'1']);
    p
}

/// A writer that keeps what it is given and counts the write calls.
#[derive(Default)]
struct Recorder {
    data: Vec<u8>,
    writes: usize,
    shut_down: bool,
}

impl AsyncWrite for Recorder {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.data.extend_from_slice(buf);
        self.writes += 1;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut_down = true;
        Poll::Ready(Ok(()))
    }
}

/// A reader that hands out `data` in chunks of `chunk` bytes and remembers the largest buffer
/// the pump offered it.
struct Chunks {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
    largest_offer: usize,
}

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.largest_offer = self.largest_offer.max(buf.remaining());
        let n = self.chunk.min(buf.remaining()).min(self.data.len() - self.pos);
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn forwards_a_run_of_packets_with_one_write() {
    let ctx = ctx(Settings::default());
    let mut input = connect_v4(30);
    for _ in 0..100 {
        input.extend([0xc0, 0x00]);
    }
    let mut reader = Chunks { data: input.clone(), pos: 0, chunk: 1 << 20, largest_offer: 0 };
    let mut out = Recorder::default();
    let end = pump(&ctx, Direction::ClientToBroker, &mut reader, &mut out).await;
    assert!(matches!(end, PumpEnd::Eof), "{end:?}");
    assert_eq!(out.data, input);
    assert!(out.shut_down, "EOF is passed on as a shutdown of the write half");
    // The CONNECT fits the first (small) read; the 100 PINGREQs then go out together.
    assert!(out.writes <= 2, "{} writes for 101 packets", out.writes);
    assert_eq!(ctx.conn.packets(Direction::ClientToBroker, PacketType::Pingreq), 100);
    assert_eq!(ctx.conn.keep_alive().requested, Some(30));
}

#[tokio::test(start_paused = true)]
async fn a_packet_larger_than_the_inspection_buffer_streams_through_a_bounded_buffer() {
    let ctx = ctx(Settings { max_buffered_packet: 1024, ..Settings::default() });
    let mut input = connect_v4(30);
    let body_len = 4 * 1024 * 1024;
    input.extend([0x30, 0x80, 0x80, 0x80, 0x02]); // PUBLISH, remaining length 4 MiB
    input.extend((0..body_len).map(|i| (i % 253) as u8));
    input.extend([0xc0, 0x00]);
    let mut reader = Chunks { data: input.clone(), pos: 0, chunk: 100_000, largest_offer: 0 };
    let mut out = Recorder::default();
    pump(&ctx, Direction::ClientToBroker, &mut reader, &mut out).await;
    assert!(out.data == input, "streamed bytes differ");
    assert!(reader.largest_offer <= MAX_READ, "buffer grew to {}", reader.largest_offer);
    assert_eq!(ctx.conn.packets(Direction::ClientToBroker, PacketType::Publish), 1);
    assert_eq!(ctx.conn.packets(Direction::ClientToBroker, PacketType::Pingreq), 1);
}

#[tokio::test(start_paused = true)]
async fn a_receiver_that_does_not_read_back_pressures_the_sender() {
    let ctx = ctx(Settings::default());
    let (mut sender, mut from_sender) = duplex(16 * 1024);
    let (mut to_receiver, _receiver_not_reading) = duplex(16 * 1024);
    let pumping = tokio::spawn(async move {
        pump(&ctx, Direction::ClientToBroker, &mut from_sender, &mut to_receiver).await;
    });
    sender.write_all(&connect_v4(30)).await.unwrap();
    let mut sent = 0usize;
    let publish = [[0x30u8, 0x80, 0x08, 0, 1, b't'].as_slice(), &[7u8; 1021]].concat(); // 1027-byte PUBLISH
    let flood = async {
        loop {
            sender.write_all(&publish).await.unwrap();
            sent += publish.len();
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), flood).await;
    // Two 16 KiB pipes plus the pump's own buffer (at most 64 KiB) is all that can be in flight.
    assert!(sent < 16 * 1024 * 2 + MAX_READ + publish.len(), "{sent} bytes accepted from the sender");
    assert!(sent > 16 * 1024, "the pump forwarded nothing at all");
    pumping.abort();
}

#[tokio::test(start_paused = true)]
async fn timestamps_follow_the_clock_and_the_silence_is_measured_from_the_last_delivery() {
    let ctx = ctx(Settings::default());
    let (mut client, mut from_client) = duplex(1024);
    let (mut to_broker, mut broker) = duplex(1024);
    let conn = ctx.conn.clone();
    let pumping =
        tokio::spawn(
            async move { pump(&ctx, Direction::ClientToBroker, &mut from_client, &mut to_broker).await },
        );
    client.write_all(&connect_v4(4)).await.unwrap();
    let mut got = [0u8; 16];
    broker.read_exact(&mut got).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.write_all(&[0xc0, 0x00]).await.unwrap();
    broker.read_exact(&mut got[..2]).await.unwrap();
    let last = conn.last_packet(Direction::ClientToBroker).unwrap();
    assert_eq!(last.duration_since(conn.started), Duration::from_secs(3));

    tokio::time::sleep(Duration::from_secs(6)).await;
    conn.note_close(Side::Broker, CloseHow::Fin, None, None, Instant::now());
    let close = conn.close_info().unwrap();
    assert_eq!(close.silence_s, Some(6.0));
    assert_eq!(close.silence_ratio, Some(1.5));
    assert_eq!(close.keep_alive_enforced, Some(4));
    pumping.abort();
}

#[tokio::test(start_paused = true)]
async fn an_incomplete_trailing_packet_is_forwarded_as_is_at_eof() {
    let ctx = ctx(Settings::default());
    let mut input = connect_v4(30);
    input.extend([0x30, 0x10, 0, 3, b'a']); // a PUBLISH cut short by the sender's FIN
    let mut reader = Chunks { data: input.clone(), pos: 0, chunk: 7, largest_offer: 0 };
    let mut out = Recorder::default();
    let end = pump(&ctx, Direction::ClientToBroker, &mut reader, &mut out).await;
    assert!(matches!(end, PumpEnd::Eof));
    assert_eq!(out.data, input);
    assert!(out.shut_down);
    let close = ctx.conn.close_info().unwrap();
    assert_eq!((close.closed_by, close.how), (Side::Client, CloseHow::Fin));
}
