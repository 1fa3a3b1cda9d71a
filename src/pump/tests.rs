//! Pump tests over in-memory streams, with tokio's paused clock.

use super::*;
use crate::route::Route;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf, duplex};
use tokio_util::sync::CancellationToken;

fn ctx(settings: Settings) -> Ctx {
    ctx_with(settings, Vec::new())
}

fn rule(toml_text: &str) -> Arc<crate::fault::Rule> {
    Arc::new(toml::from_str::<crate::fault::RuleSpec>(toml_text).unwrap().compile("r").unwrap())
}

/// A context whose rule set holds the given rules (TOML rule tables).
fn ctx_with(settings: Settings, rules: Vec<&str>) -> Ctx {
    ctx_and_book(settings, rules).0
}

/// The same, with the book that owns its rules (no waker: a change reaches the pump at its next
/// batch or timer, as one with no time-driven effect would).
fn ctx_and_book(settings: Settings, rules: Vec<&str>) -> (Ctx, crate::fault::RuleBook) {
    let book = crate::fault::RuleBook::default();
    book.replace(crate::fault::RuleSet::new(None, Some(1), rules.into_iter().map(rule).collect()));
    let rx = book.subscribe();
    let route = Route::for_test("test");
    let registry = Arc::new(Registry::default());
    let conn = registry.open(route, "127.0.0.1:3".parse().unwrap(), CancellationToken::new());
    let ctx = Ctx {
        conn,
        registry,
        settings: Arc::new(settings),
        faults: Mutex::new(ConnFaults::new(rx)),
        stop: CancellationToken::new(),
        _permit: None,
        ws_held: crate::ws::HeldBytes::new(crate::ws::DEFAULT_MAX_HELD),
    };
    (ctx, book)
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

// ---- fault verdicts, executed -------------------------------------------------------------

/// One direction of a connection in memory: write to `sender`, read from `receiver`.
struct Line {
    sender: tokio::io::DuplexStream,
    receiver: tokio::io::DuplexStream,
    task: tokio::task::JoinHandle<PumpEnd>,
}

fn line(ctx: &Arc<Ctx>, dir: Direction) -> Line {
    let (sender, mut from_sender) = duplex(64 * 1024);
    let (mut to_receiver, receiver) = duplex(64 * 1024);
    let ctx = ctx.clone();
    let task = tokio::spawn(async move { pump(&ctx, dir, &mut from_sender, &mut to_receiver).await });
    Line { sender, receiver, task }
}

/// Everything the receiver can read within `wait` of paused time.
async fn received(r: &mut tokio::io::DuplexStream, wait: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x30, (2 + topic.len() + payload.len()) as u8, 0, topic.len() as u8];
    p.extend_from_slice(topic.as_bytes());
    p.extend_from_slice(payload);
    p
}

const PINGREQ: [u8; 2] = [0xc0, 0x00];

#[tokio::test(start_paused = true)]
async fn drop_discards_only_matching_packets_and_counts_them() {
    let rule =
        "name = \"no-ping\"\naction = \"drop\"\ndirection = \"client_to_broker\"\npackets = [\"PINGREQ\"]\n";
    let ctx = Arc::new(ctx_with(Settings::default(), vec![rule]));
    let mut l = line(&ctx, Direction::ClientToBroker);
    let connect = connect_v4(30);
    let input = [&connect[..], &PINGREQ, &publish("t", b"x"), &PINGREQ].concat();
    l.sender.write_all(&input).await.unwrap();
    let got = received(&mut l.receiver, Duration::from_secs(1)).await;
    assert_eq!(got, [&connect[..], &publish("t", b"x")].concat());
    assert_eq!(ctx.conn.faults()["no-ping"], 2);
    assert_eq!(ctx.conn.route.metrics.fault_count("no-ping"), 2);
    assert_eq!(
        ctx.conn.packets(Direction::ClientToBroker, PacketType::Pingreq),
        0,
        "dropped is not forwarded"
    );
    l.task.abort();
}

#[tokio::test(start_paused = true)]
async fn delay_holds_packets_from_receipt_and_keeps_their_order() {
    let rule = "name = \"slow\"\naction = \"delay\"\npackets = [\"PUBLISH\"]\nlatency = \"2s\"\n";
    let ctx = Arc::new(ctx_with(Settings::default(), vec![rule]));
    let mut l = line(&ctx, Direction::ClientToBroker);
    let connect = connect_v4(30);
    l.sender.write_all(&[&connect[..], &publish("a", b"1"), &PINGREQ].concat()).await.unwrap();
    assert_eq!(
        received(&mut l.receiver, Duration::from_millis(1900)).await,
        connect,
        "only the CONNECT at once"
    );
    // The PINGREQ is not delayed itself, but it may not overtake the PUBLISH.
    let later = received(&mut l.receiver, Duration::from_millis(200)).await;
    assert_eq!(later, [&publish("a", b"1")[..], &PINGREQ].concat());
    // A second PUBLISH sent 1 s later arrives 2 s after its own receipt, not 2 s after the first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    l.sender.write_all(&publish("b", b"2")).await.unwrap();
    assert!(received(&mut l.receiver, Duration::from_millis(1900)).await.is_empty());
    assert_eq!(received(&mut l.receiver, Duration::from_millis(200)).await, publish("b", b"2"));
    l.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_black_hole_discards_whole_packets_and_forwarding_resumes_at_a_packet_boundary() {
    let rule = "name = \"hole\"\naction = \"blackhole\"\ndirection = \"client_to_broker\"\nafter = \"1s\"\nduration = \"3s\"\n";
    let ctx = Arc::new(ctx_with(Settings::default(), vec![rule]));
    let mut l = line(&ctx, Direction::ClientToBroker);
    let connect = connect_v4(30);
    l.sender.write_all(&connect).await.unwrap();
    assert_eq!(received(&mut l.receiver, Duration::from_millis(1500)).await, connect);
    l.sender.write_all(&publish("lost", b"in the hole")).await.unwrap();
    // Half of a packet arrives inside the window, the rest after it: decided whole, forwarded.
    let straddling = publish("kept", b"straddles the end");
    l.sender.write_all(&straddling[..5]).await.unwrap();
    assert!(received(&mut l.receiver, Duration::from_secs(3)).await.is_empty(), "nothing passes the hole");
    l.sender.write_all(&straddling[5..]).await.unwrap();
    l.sender.write_all(&PINGREQ).await.unwrap();
    assert_eq!(
        received(&mut l.receiver, Duration::from_millis(100)).await,
        [&straddling[..], &PINGREQ].concat()
    );
    assert_eq!(ctx.conn.faults()["hole"], 1, "counted once per direction it affects");
    l.task.abort();
}

#[tokio::test(start_paused = true)]
async fn freeze_stops_reading_until_the_rule_ends() {
    let rule = "name = \"ice\"\naction = \"freeze\"\ndirection = \"client_to_broker\"\nafter = \"1s\"\nduration = \"3s\"\n";
    let ctx = Arc::new(ctx_with(Settings::default(), vec![rule]));
    let mut l = line(&ctx, Direction::ClientToBroker);
    l.sender.write_all(&connect_v4(30)).await.unwrap();
    received(&mut l.receiver, Duration::from_millis(1500)).await;
    let sent_at = Instant::now();
    l.sender.write_all(&PINGREQ).await.unwrap();
    let got = received(&mut l.receiver, Duration::from_millis(2400)).await;
    assert!(got.is_empty(), "read while frozen");
    let got = received(&mut l.receiver, Duration::from_millis(200)).await;
    assert_eq!(got, PINGREQ);
    assert!(Instant::now() - sent_at >= Duration::from_millis(2500));
    l.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_half_close_shuts_the_write_half_towards_that_side() {
    let rule = "name = \"half\"\naction = \"close\"\nside = \"broker\"\nhow = \"half\"\n";
    let ctx = Arc::new(ctx_with(Settings::default(), vec![rule]));
    let mut l = line(&ctx, Direction::ClientToBroker);
    let connect = connect_v4(30);
    l.sender.write_all(&[&connect[..], &PINGREQ].concat()).await.unwrap();
    // The CONNECT starts the rule clock, so it passes; then the broker gets EOF.
    let mut got = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(1), l.receiver.read_to_end(&mut got)).await;
    assert!(n.is_ok(), "the broker side sees EOF");
    assert_eq!(got, connect);
    l.task.abort();
}

#[tokio::test(start_paused = true)]
async fn rewrite_keepalive_patches_two_bytes_of_the_connect_and_nothing_else() {
    let rule = "name = \"shrink\"\naction = \"rewrite_keepalive\"\nset = 2\n";
    let ctx = Arc::new(ctx_with(Settings::default(), vec![rule]));
    let mut l = line(&ctx, Direction::ClientToBroker);
    let connect = connect_v4(60);
    l.sender.write_all(&connect).await.unwrap();
    let got = received(&mut l.receiver, Duration::from_millis(100)).await;
    let mut want = connect.clone();
    want[10..12].copy_from_slice(&[0, 2]);
    assert_eq!(got, want);
    let ka = ctx.conn.keep_alive();
    assert_eq!((ka.requested, ka.forwarded, ka.broker_enforced()), (Some(60), Some(2), Some(2)));
    assert_eq!(ctx.conn.faults()["shrink"], 1);
    l.task.abort();
}

#[tokio::test(start_paused = true)]
async fn server_keepalive_re_encodes_the_mqtt5_connack() {
    let rule = "name = \"ska\"\naction = \"server_keepalive\"\nset = 7\n";
    let ctx = Arc::new(ctx_with(Settings::default(), vec![rule]));
    let mut up = line(&ctx, Direction::ClientToBroker);
    let mut down = line(&ctx, Direction::BrokerToClient);
    let connect_v5 = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 0];
    up.sender.write_all(&connect_v5).await.unwrap();
    assert_eq!(received(&mut up.receiver, Duration::from_millis(100)).await, connect_v5);
    // A CONNACK that carries Receive Maximum, and a Server Keep Alive of 20 to be replaced.
    let connack = [0x20, 9, 0x00, 0x00, 6, 0x21, 0, 10, 0x13, 0, 20];
    down.sender.write_all(&[&connack[..], &[0xd0, 0x00]].concat()).await.unwrap();
    let got = received(&mut down.receiver, Duration::from_millis(100)).await;
    assert_eq!(got, [0x20, 9, 0x00, 0x00, 6, 0x21, 0, 10, 0x13, 0, 7, 0xd0, 0x00]);
    let ka = ctx.conn.keep_alive();
    assert_eq!((ka.requested, ka.server_announced, ka.server_to_client), (Some(60), Some(20), Some(7)));
    assert_eq!((ka.broker_enforced(), ka.client_enforced()), (Some(20), Some(7)));
    up.task.abort();
    down.task.abort();
}

/// A CONNECT with the given client id (MQTT 3.1.1, Keep Alive 30).
fn connect_id(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    let mut p = vec![0x10];
    crate::codec::encode_varint(body.len(), &mut p);
    p.extend(body);
    p
}

#[tokio::test(start_paused = true)]
async fn a_second_connect_is_malformed_and_changes_nothing_the_first_said() {
    let ctx = ctx(Settings { on_malformed: crate::config::OnMalformed::Close, ..Settings::default() });
    let first = connect_id("first");
    let input = [first.clone(), connect_id("second")].concat();
    let mut reader = Chunks { data: input, pos: 0, chunk: 1 << 20, largest_offer: 0 };
    let mut out = Recorder::default();
    let end = pump(&ctx, Direction::ClientToBroker, &mut reader, &mut out).await;
    assert!(matches!(end, PumpEnd::Malformed), "{end:?}");
    assert_eq!(out.data, first, "only the first CONNECT went out");
    assert_eq!(ctx.conn.client_id().as_deref(), Some("first"));
    let s = ctx.conn.snapshot();
    assert!(s.malformed["client_to_broker"].contains("second CONNECT"), "{:?}", s.malformed);
    assert_eq!(ctx.conn.route.metrics.malformed(Direction::ClientToBroker), 1);
}

#[tokio::test(start_paused = true)]
async fn with_relay_a_second_connect_goes_to_the_broker_raw_and_the_record_keeps_the_first() {
    let ctx = ctx(Settings::default());
    let input = [connect_id("first"), connect_id(&"x".repeat(60_000)), PINGREQ.to_vec()].concat();
    let mut reader = Chunks { data: input.clone(), pos: 0, chunk: 7_000, largest_offer: 0 };
    let mut out = Recorder::default();
    let end = pump(&ctx, Direction::ClientToBroker, &mut reader, &mut out).await;
    assert!(matches!(end, PumpEnd::Eof), "{end:?}");
    assert_eq!(out.data, input, "the broker sees exactly what the client sent, and closes");
    assert_eq!(ctx.conn.client_id().as_deref(), Some("first"));
    assert_eq!(ctx.conn.packets(Direction::ClientToBroker, PacketType::Connect), 1);
}

#[tokio::test(start_paused = true)]
async fn a_connect_over_its_own_limit_is_malformed_not_streamed_undecoded() {
    let settings = Settings {
        max_buffered_packet: 1024,
        max_connect_packet: 4096,
        on_malformed: crate::config::OnMalformed::Close,
        ..Settings::default()
    };
    // 3 KiB: over --max-buffered-packet, under --max-connect-packet: decoded whole.
    let ctx = ctx(settings.clone());
    let mid = connect_id(&"m".repeat(3000));
    let mut reader = Chunks { data: mid.clone(), pos: 0, chunk: 500, largest_offer: 0 };
    let mut out = Recorder::default();
    pump(&ctx, Direction::ClientToBroker, &mut reader, &mut out).await;
    assert_eq!(out.data, mid);
    assert_eq!(ctx.conn.client_id().map(|id| id.len()), Some(3000), "decoded: rules can match it");
    // 5 KiB: over its limit: malformed, nothing forwarded.
    let ctx = self::ctx(settings);
    let mut reader = Chunks { data: connect_id(&"b".repeat(5000)), pos: 0, chunk: 500, largest_offer: 0 };
    let mut out = Recorder::default();
    let end = pump(&ctx, Direction::ClientToBroker, &mut reader, &mut out).await;
    assert!(matches!(end, PumpEnd::Malformed), "{end:?}");
    assert!(out.data.is_empty());
    assert!(ctx.conn.snapshot().malformed["client_to_broker"].contains("--max-connect-packet"));
}

#[tokio::test(start_paused = true)]
async fn bytes_read_as_a_freeze_begins_wait_unforwarded_until_it_ends() {
    let (ctx, book) = ctx_and_book(Settings::default(), vec![]);
    let ctx = Arc::new(ctx);
    let mut l = line(&ctx, Direction::ClientToBroker);
    l.sender.write_all(&connect_v4(30)).await.unwrap();
    assert_eq!(received(&mut l.receiver, Duration::from_millis(100)).await, connect_v4(30));
    // The pump waits in its read when the freeze arrives; the PINGREQ that ends the read is
    // decided under the freeze: it is held, not forwarded, and not lost.
    book.add(rule(
        "name = \"ice\"\naction = \"freeze\"\ndirection = \"client_to_broker\"\nduration = \"2s\"\n",
    ))
    .unwrap();
    let sent_at = Instant::now();
    l.sender.write_all(&PINGREQ).await.unwrap();
    assert!(
        received(&mut l.receiver, Duration::from_millis(1900)).await.is_empty(),
        "forwarded while frozen"
    );
    assert_eq!(received(&mut l.receiver, Duration::from_millis(200)).await, PINGREQ);
    assert!(Instant::now() - sent_at >= Duration::from_secs(2));
    l.task.abort();
}
