//! The directional pump: the one place where bytes leave the proxy.
//!
//! One pump per direction reads what its sender sends, splits it into packets with the pure
//! [`Splitter`], lets `Inspector` look at each packet (update the connection record, emit
//! events, apply Keep Alive rewrites), asks the fault engine for a verdict, and then writes the
//! result. Each batch is decided first (without awaiting, under the connection's fault lock) and
//! written second: runs of consecutive forwarded packets become one write straight out of the
//! read buffer, so there is no copy and no allocation per packet.
//!
//! Verdicts and modes it executes: forward; drop; delay (the packet and everything after it in
//! this direction wait in a bounded queue, so order is kept); replace (a re-encoded CONNACK);
//! blackhole (read and discard at packet boundaries); freeze (stop reading); shut (write half
//! closed towards the receiver, the rest discarded). Decisions are made on whole packets only,
//! so a rule that starts or ends — or a rule set swapped — never cuts a packet in two.
//!
//! Packets larger than `max_buffered_packet` are not buffered whole: their fixed header is
//! forwarded at once and their body as it arrives (they can be dropped, black-holed or
//! forwarded, never delayed). A write that blocks stops the reading, so a slow receiver
//! back-pressures its sender; the read buffer is bounded by `max(max_buffered_packet, 64 KiB)`
//! and the delay queue by [`DELAY_QUEUE_LIMIT`].
//!
//! When a direction's bytes stop being MQTT, the pump either relays the rest of that direction
//! raw (`--on-malformed relay`) or ends so the session closes both sides (`close`).

use crate::codec::frame::FrameHeader;
use crate::codec::reason_name;
use crate::codec::{
    Connack, Connect, Disconnect, PacketType, Protocol, Publish, Splitter, Step, TopicFilters,
    connack_with_server_keep_alive,
};
use crate::config::{OnMalformed, Settings};
use crate::fault::{Applied, ConnFaults, Mode, Verdict};
use crate::record::{Connection, Event, Registry};
use crate::vocab::{Batch, CloseHow, Direction, Side};
use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The smallest read buffer; an idle connection keeps one this size per direction.
const MIN_READ: usize = 512;
/// The largest read; busy connections grow towards it.
const MAX_READ: usize = 64 * 1024;
/// Bytes a direction may hold in its delay queue before it stops reading from the sender.
pub const DELAY_QUEUE_LIMIT: usize = 1024 * 1024;

/// What a session's pumps share.
pub(crate) struct Ctx {
    pub conn: Arc<Connection>,
    pub registry: Arc<Registry>,
    pub settings: Arc<Settings>,
    /// The connection's fault state (both pumps and the session; never contended for long:
    /// both pumps run in the same task).
    pub faults: Mutex<ConnFaults>,
    /// Asks both pumps to stop at the next packet boundary (a connection action is due).
    pub stop: CancellationToken,
    /// This connection's place under `--max-connections`, given back when the session ends.
    pub _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// What WebSocket connections hold of unfinished frames (`--ws-max-held`).
    pub ws_held: Arc<crate::ws::HeldBytes>,
}

impl Ctx {
    pub fn faults(&self) -> MutexGuard<'_, ConnFaults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a pump stopped.
#[derive(Debug)]
pub(crate) enum PumpEnd {
    /// The sender closed its write half (FIN); the receiver's write half was shut down too.
    Eof,
    /// Reading from the sender failed (a reset, or another socket error).
    ReadError(io::Error),
    /// Writing to the receiver failed.
    WriteError(io::Error),
    /// The bytes were not MQTT and `--on-malformed close` is set.
    Malformed,
    /// Stopped at a packet boundary because the session has a connection action to carry out.
    Stopped,
    /// The connection was ended from outside (the other pump, the admin API, shutdown).
    Cancelled,
}

impl PumpEnd {
    /// The sender reset the connection.
    pub(crate) fn read_reset(&self) -> bool {
        matches!(self, PumpEnd::ReadError(e) if is_reset(e))
    }

    /// The receiver reset the connection (seen when writing to it).
    pub(crate) fn write_reset(&self) -> bool {
        matches!(self, PumpEnd::WriteError(e) if is_reset(e))
    }
}

fn is_reset(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted)
}

/// A socket error seen from one side: a reset, or something else.
fn how_of(e: &io::Error) -> CloseHow {
    if is_reset(e) { CloseHow::Rst } else { CloseHow::Error }
}

/// Runs one direction until it ends, and records how it ended.
pub(crate) async fn pump<R, W>(ctx: &Ctx, dir: Direction, reader: &mut R, writer: &mut W) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pump = Pump {
        inspector: Inspector { ctx, dir, first: true, raw: false, close_to_announce: false },
        splitter: Splitter::with_limits(ctx.settings.max_buffered_packet, ctx.settings.max_connect_packet),
        buf: Vec::new(),
        start: 0,
        needed: 0,
        read_size: MIN_READ,
        out: Vec::new(),
        delayed: VecDeque::new(),
        delayed_bytes: 0,
        discarding: false,
        shut: false,
        blocked: false,
        frozen: false,
    };
    let end = pump.run(reader, writer).await;
    let conn = &ctx.conn;
    let now = Instant::now();
    match &end {
        PumpEnd::Eof => conn.note_close(dir.sender(), CloseHow::Fin, None, None, now),
        PumpEnd::ReadError(e) => match crate::ws::Violation::of(e) {
            // The session answers with the Close frame that says why.
            Some(v) => {
                let sender = dir.sender();
                conn.route.metrics.on_websocket_error(sender, v.kind.reason());
                warn!(conn = conn.id, route = %conn.route.name, side = sender.as_str(), reason = v.kind.reason(), error = %v,
                    "the WebSocket protocol was broken; closing the connection with a Close frame to that side");
                let why = format!("the {} broke the WebSocket protocol: {v}", sender.as_str());
                conn.note_close(Side::Proxy, CloseHow::Fin, None, Some(why), now)
            }
            None => conn.note_close(dir.sender(), how_of(e), None, Some(e.to_string()), now),
        },
        PumpEnd::WriteError(e) => conn.note_close(dir.receiver(), how_of(e), None, Some(e.to_string()), now),
        PumpEnd::Malformed | PumpEnd::Stopped | PumpEnd::Cancelled => false,
    };
    end
}

/// A piece of a batch's output.
enum Out {
    /// Bytes of the read buffer (a run of forwarded packets, or streamed body bytes).
    Buf(Range<usize>),
    /// A packet the proxy re-encoded.
    Owned(Vec<u8>),
}

/// A packet waiting in the delay queue.
struct Held {
    due: Instant,
    bytes: Vec<u8>,
    packet_type: PacketType,
}

struct Pump<'a> {
    inspector: Inspector<'a>,
    splitter: Splitter,
    /// Read buffer; `buf[start..]` is not yet forwarded (an incomplete packet).
    buf: Vec<u8>,
    start: usize,
    /// How many bytes from `start` the packet at the front needs to be complete (0 = unknown).
    needed: usize,
    /// Adaptive read size: doubles when a read fills the buffer, shrinks when traffic is small.
    read_size: usize,
    /// The current batch's output, reused from batch to batch.
    out: Vec<Out>,
    /// Delayed packets, oldest first; due times never decrease.
    delayed: VecDeque<Held>,
    delayed_bytes: usize,
    /// The body of the packet being streamed is discarded (it was dropped or black-holed).
    discarding: bool,
    /// The write half towards the receiver was shut by a half-close rule.
    shut: bool,
    /// A packet too large to queue waits for the delay queue to drain before it may stream.
    blocked: bool,
    /// Bytes read just as a freeze began wait in the buffer until it ends.
    frozen: bool,
}

impl Pump<'_> {
    async fn run<R, W>(&mut self, reader: &mut R, writer: &mut W) -> PumpEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let ctx = self.inspector.ctx;
        loop {
            let seen = ctx.conn.wake.seen();
            let now = Instant::now();
            if let Err(e) = self.release_delayed(writer, now).await {
                return PumpEnd::WriteError(e);
            }
            if self.blocked && self.delayed.is_empty() {
                self.blocked = false;
                if let Err(end) = self.forward(writer).await {
                    return end;
                }
            }
            let (mode, wake) = self.time_driven(now);
            if mode == Mode::Shut && !self.shut {
                self.shut = true;
                let _ = writer.shutdown().await;
            }
            let wake = match (wake, self.delayed.front()) {
                (Some(a), Some(h)) => Some(a.min(h.due)),
                (a, h) => a.or(h.map(|h| h.due)),
            };
            if self.frozen && mode != Mode::Freeze {
                // A freeze ended: what was read before it began goes out now.
                self.frozen = false;
                if let Err(end) = self.forward(writer).await {
                    return end;
                }
            }
            let can_read = mode != Mode::Freeze && !self.blocked && self.delayed_bytes < DELAY_QUEUE_LIMIT;
            let spare = if can_read { self.prepare_buffer() } else { 0 };
            // Reading comes before wakes: however fast rules change, a pump keeps reading (each
            // batch picks up the newest rules anyway, in `decide`). Only changes that may start
            // or end a mode here wake it (see `RuleBook`).
            let read = tokio::select! {
                biased;
                _ = ctx.stop.cancelled() => return PumpEnd::Stopped,
                r = reader.read_buf(&mut self.buf), if can_read => r,
                () = ctx.conn.wake.after(seen) => continue,
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => continue,
            };
            let n = match read {
                Ok(n) => n,
                Err(e) => return PumpEnd::ReadError(e),
            };
            if n == 0 {
                // Forward an incomplete trailing packet as it is: the receiver sees exactly the
                // stream the sender sent, truncated where the sender stopped.
                if let Err(e) = self.flush_raw(writer).await {
                    return PumpEnd::WriteError(e);
                }
                let _ = writer.shutdown().await;
                return PumpEnd::Eof;
            }
            self.adapt_read_size(n, spare);
            if let Err(end) = self.forward(writer).await {
                return end;
            }
        }
    }

    /// The direction's mode now and when it next may change; counts a mode's first entry.
    fn time_driven(&mut self, now: Instant) -> (Mode, Option<Instant>) {
        let ctx = self.inspector.ctx;
        let mut faults = ctx.faults();
        faults.refresh();
        let mode = self.inspector.mode(&mut faults, now);
        (mode, faults.next_change(now))
    }

    /// Makes room for the next read and returns how much room there is.
    fn prepare_buffer(&mut self) -> usize {
        if self.start == self.buf.len() {
            self.buf.clear();
            if self.read_size == MIN_READ && self.buf.capacity() > 2 * MIN_READ {
                self.buf = Vec::new(); // traffic calmed down: give the big buffer back
            }
        } else if self.start > 0 {
            self.buf.drain(..self.start);
        }
        self.start = 0;
        let want = self.read_size.max(self.needed.saturating_sub(self.buf.len()));
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve_exact(want);
        }
        self.buf.capacity() - self.buf.len()
    }

    fn adapt_read_size(&mut self, n: usize, spare: usize) {
        if n == spare {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else if n < self.read_size / 4 {
            self.read_size = (self.read_size / 2).max(MIN_READ);
        }
    }

    /// Decides every complete packet (and streamed body bytes) in the buffer, then writes the
    /// result: runs of forwarded packets in one write each.
    async fn forward<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> Result<(), PumpEnd> {
        let now = Instant::now();
        let mut batch = Batch::default();
        let (cursor, outcome) = self.decide(now, &mut batch);
        let written = self.write_out(writer).await;
        let conn = &self.inspector.ctx.conn;
        if batch.bytes > 0 && written.is_ok() {
            conn.commit(self.inspector.dir, &batch, Instant::now());
        }
        if std::mem::take(&mut self.inspector.close_to_announce) {
            conn.announce_close();
        }
        written?;
        self.start = cursor;
        outcome
    }

    /// Writes what the decide phase chose: runs of forwarded packets, one write each.
    async fn write_out<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> Result<(), PumpEnd> {
        let wrote = !self.out.is_empty();
        for out in self.out.drain(..) {
            let bytes = match &out {
                Out::Buf(r) => &self.buf[r.clone()],
                Out::Owned(v) => v.as_slice(),
            };
            writer.write_all(bytes).await.map_err(PumpEnd::WriteError)?;
        }
        if wrote {
            // A no-op on TCP; TLS may hold records back until flushed.
            writer.flush().await.map_err(PumpEnd::WriteError)?;
        }
        Ok(())
    }

    /// The decide phase of [`Pump::forward`]: fills `self.out`, returns how far the buffer was
    /// consumed and whether the pump must end. Never awaits.
    fn decide(&mut self, now: Instant, batch: &mut Batch) -> (usize, Result<(), PumpEnd>) {
        let ctx = self.inspector.ctx;
        let dir = self.inspector.dir;
        let mut faults = ctx.faults();
        faults.refresh();
        let mode = self.inspector.mode(&mut faults, now);
        if mode == Mode::Freeze {
            self.frozen = true;
            return (self.start, Ok(()));
        }
        let discarding_mode = |inspector: &Inspector<'_>, faults: &mut ConnFaults| {
            matches!(inspector.mode(faults, now), Mode::Blackhole | Mode::Shut)
        };
        let mut discard_all = self.shut || matches!(mode, Mode::Blackhole | Mode::Shut);
        let mut cursor = self.start;
        let mut pingreq = false;
        self.needed = 0;
        let outcome = loop {
            if self.inspector.raw {
                self.emit(cursor..self.buf.len(), batch);
                cursor = self.buf.len();
                break Ok(());
            }
            let step = self.splitter.peek(&self.buf[cursor..]);
            if matches!(step, Step::StreamHead(_)) && !self.delayed.is_empty() {
                self.blocked = true; // it cannot queue; it goes after the delayed packets
                break Ok(());
            }
            self.splitter.advance(&step);
            let (header, len) = match step {
                Step::Frame(h) => (h, h.frame_len()),
                Step::StreamHead(h) => (h, usize::from(h.header_len)),
                Step::StreamBody(n) => {
                    if !self.discarding {
                        self.emit(cursor..cursor + n, batch);
                    }
                    cursor += n;
                    if !self.splitter.is_streaming() {
                        self.discarding = false;
                    }
                    continue;
                }
                Step::NeedMore { needed } => {
                    self.needed = needed;
                    break Ok(());
                }
                Step::Malformed(e) => match self.inspector.malformed(e.to_string(), now) {
                    Ok(()) => continue,
                    Err(end) => break Err(end),
                },
            };
            let whole = matches!(step, Step::Frame(_));
            let range = cursor..cursor + len;
            let inspected = if whole {
                self.inspector.frame(&header, &mut self.buf[range.clone()], now, &mut faults)
            } else {
                self.inspector.head(&header).map(|()| None)
            };
            let replacement = match inspected {
                Ok(r) => r,
                // Relay: `raw` is now set and the next turn forwards the rest untouched.
                Err(reason) => match self.inspector.malformed(reason, now) {
                    Ok(()) => continue,
                    Err(end) => break Err(end),
                },
            };
            cursor += len;
            let t = header.packet_type;
            pingreq |= t == PacketType::Pingreq;
            let discard = discard_all;
            if t == PacketType::Connect && dir == Direction::ClientToBroker && whole {
                // The CONNECT started the rule clock: modes apply from the next packet on.
                discard_all = discarding_mode(&self.inspector, &mut faults);
            }
            let verdict = if discard {
                Verdict::Drop
            } else if faults.is_idle() {
                Verdict::Forward
            } else if !self.delayed.is_empty() && whole {
                Verdict::Delay(now) // behind the packets already held, whatever its own fate
            } else {
                let (verdict, applied) = faults.decide(dir, t, now);
                if let Some(a) = applied {
                    self.inspector.applied(&a, Some(t));
                }
                verdict
            };
            match verdict {
                Verdict::Forward => {}
                Verdict::Delay(due) if whole => {
                    let bytes = replacement.unwrap_or_else(|| self.buf[range].to_vec());
                    self.hold(due, bytes, t);
                    continue;
                }
                Verdict::Delay(_) => debug!(conn = ctx.conn.id, direction = %dir, packet = %t,
                    "a packet larger than --max-buffered-packet cannot be delayed; forwarding it"),
                Verdict::Drop => {
                    self.discarding = !whole;
                    continue;
                }
            }
            batch.count(t);
            match replacement {
                Some(bytes) => {
                    batch.bytes += bytes.len() as u64;
                    self.out.push(Out::Owned(bytes));
                }
                None => self.emit(range, batch),
            }
        };
        if dir == Direction::ClientToBroker && cursor > self.start && !self.inspector.first {
            ctx.conn.on_client_activity(now, pingreq);
        }
        (cursor, outcome)
    }

    /// Adds buffer bytes to the output, extending the last run when contiguous.
    fn emit(&mut self, range: Range<usize>, batch: &mut Batch) {
        batch.bytes += range.len() as u64;
        if let Some(Out::Buf(last)) = self.out.last_mut()
            && last.end == range.start
        {
            last.end = range.end;
            return;
        }
        if !range.is_empty() {
            self.out.push(Out::Buf(range));
        }
    }

    fn hold(&mut self, due: Instant, bytes: Vec<u8>, packet_type: PacketType) {
        let due = self.delayed.back().map_or(due, |last| due.max(last.due));
        self.delayed_bytes += bytes.len();
        self.delayed.push_back(Held { due, bytes, packet_type });
    }

    /// Writes the delayed packets whose time has come.
    async fn release_delayed<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        now: Instant,
    ) -> io::Result<()> {
        while self.delayed.front().is_some_and(|h| h.due <= now) {
            let held = self.delayed.pop_front().expect("checked above");
            self.delayed_bytes -= held.bytes.len();
            if self.shut {
                continue;
            }
            writer.write_all(&held.bytes).await?;
            writer.flush().await?;
            let mut batch = Batch::default();
            batch.count(held.packet_type);
            batch.bytes = held.bytes.len() as u64;
            self.inspector.ctx.conn.commit(self.inspector.dir, &batch, Instant::now());
        }
        Ok(())
    }

    /// Forwards whatever is buffered, without framing it.
    async fn flush_raw<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        if self.start < self.buf.len() && !self.shut {
            writer.write_all(&self.buf[self.start..]).await?;
            writer.flush().await?;
            let batch = Batch { bytes: (self.buf.len() - self.start) as u64, ..Batch::default() };
            self.inspector.ctx.conn.commit(self.inspector.dir, &batch, Instant::now());
            self.start = self.buf.len();
        }
        Ok(())
    }
}

/// Looks at each packet of one direction: checks the stream is MQTT, and keeps the connection
/// record and the event stream up to date. Pure bookkeeping, no I/O.
struct Inspector<'a> {
    ctx: &'a Ctx,
    dir: Direction,
    /// No packet seen yet in this direction.
    first: bool,
    /// The direction is relayed raw (its bytes stopped being MQTT).
    raw: bool,
    /// A DISCONNECT in the batch being decided closed the connection: the close is recorded
    /// now (it is the first), announced once the batch it ends is written and counted, so the
    /// close line's byte counts include it (or at the session's end, if the write never ends).
    close_to_announce: bool,
}

impl Inspector<'_> {
    /// Checks the order of the first packet: CONNECT from a client; CONNACK, AUTH or
    /// DISCONNECT from a broker.
    fn head(&mut self, h: &FrameHeader) -> Result<(), String> {
        if !std::mem::take(&mut self.first) {
            return Ok(());
        }
        let t = h.packet_type;
        match self.dir {
            Direction::ClientToBroker if t != PacketType::Connect => {
                Err(format!("first packet from the client is {t}, not CONNECT"))
            }
            Direction::BrokerToClient
                if !matches!(t, PacketType::Connack | PacketType::Auth | PacketType::Disconnect) =>
            {
                Err(format!("first packet from the broker is {t}, not CONNACK"))
            }
            _ => Ok(()),
        }
    }

    /// Inspects a whole packet, applying Keep Alive rewrites: the CONNECT's two bytes are
    /// patched in place; a CONNACK that must change size is returned re-encoded.
    fn frame(
        &mut self,
        h: &FrameHeader,
        frame: &mut [u8],
        now: Instant,
        faults: &mut ConnFaults,
    ) -> Result<Option<Vec<u8>>, String> {
        self.head(h)?;
        let conn = &self.ctx.conn;
        // Until a CONNECT was decoded, assume 3.1.1: its framing of later packets is the 3.x one.
        let protocol = conn.protocol().unwrap_or(Protocol::V311);
        match (self.dir, h.packet_type) {
            (Direction::ClientToBroker, PacketType::Connect) => {
                if conn.protocol().is_some() {
                    // A CONNECT was decoded already. The broker must close the connection (MQTT
                    // 3.1.1 §3.1.0-2, MQTT 5 §3.1-2); the record and every index keep what the
                    // first CONNECT said.
                    return Err("a second CONNECT on the connection (a protocol violation: MQTT 3.1.1 \
                                §3.1.0-2, MQTT 5 §3.1-2)"
                        .into());
                }
                let connect = Connect::decode(frame, h).map_err(|e| e.to_string())?;
                #[cfg(test)]
                if connect.client_id == crate::server::tests::PANIC_CLIENT_ID {
                    panic!("injected by a test: a bug in the pump");
                }
                let level = connect.protocol.level();
                let cert_cn = conn.cert_cn();
                faults.on_connect(
                    &conn.route.name,
                    &connect.client_id,
                    connect.username.as_deref(),
                    cert_cn.as_deref(),
                    level,
                    now,
                );
                let mut forwarded = connect.keep_alive;
                if let Some((value, applied)) = faults.rewrite_keepalive(connect.keep_alive, now) {
                    let at = connect.keep_alive_offset;
                    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
                    forwarded = value;
                    debug!(
                        conn = conn.id,
                        rule = applied.rule.name(),
                        from = connect.keep_alive,
                        to = value,
                        "Keep Alive rewritten in CONNECT"
                    );
                    self.applied(&applied, Some(PacketType::Connect));
                    conn.route.metrics.on_keepalive_rewrite();
                }
                // Watched while the record lives, and while the monitor awaits the Will.
                let will_watch = connect.will.as_ref().map(|w| self.ctx.registry.watch_topic(&w.topic));
                conn.on_connect(&connect, forwarded, will_watch);
                self.ctx.registry.on_connect(conn);
                debug!(
                    conn = conn.id,
                    client_id = &*connect.client_id,
                    protocol = level,
                    keep_alive = connect.keep_alive,
                    will = connect.will.is_some(),
                    "CONNECT"
                );
                self.emit(|| Event::Connect(conn.clone()));
                self.ctx.conn.wake();
            }
            (Direction::BrokerToClient, PacketType::Connack) => match Connack::decode(frame, h, protocol) {
                Ok(connack) => {
                    let mut to_client = connack.server_keep_alive;
                    let mut replacement = None;
                    if protocol == Protocol::V5
                        && let Some((value, applied)) = faults.server_keepalive(now)
                    {
                        match connack_with_server_keep_alive(frame, h, value) {
                            Ok(bytes) => {
                                debug!(conn = conn.id, rule = applied.rule.name(), from = ?connack.server_keep_alive,
                                    to = value, "Server Keep Alive set in CONNACK");
                                self.applied(&applied, Some(PacketType::Connack));
                                conn.route.metrics.on_keepalive_rewrite();
                                to_client = Some(value);
                                replacement = Some(bytes);
                            }
                            Err(e) => {
                                warn!(conn = conn.id, error = %e, "CONNACK could not be re-encoded; forwarding it unchanged")
                            }
                        }
                    }
                    conn.on_connack(&connack, to_client);
                    debug!(conn = conn.id, code = connack.code, server_keep_alive = ?connack.server_keep_alive, "CONNACK");
                    self.emit(|| Event::Connack(conn.clone()));
                    return Ok(replacement);
                }
                Err(e) => {
                    warn!(conn = conn.id, error = %e, "CONNACK could not be decoded; forwarding it unchanged")
                }
            },
            (dir, PacketType::Disconnect) => {
                let reason = Disconnect::decode(frame, h, protocol).map(|d| d.reason).unwrap_or_else(|e| {
                    debug!(conn = conn.id, direction = %dir, error = %e, "DISCONNECT could not be decoded");
                    None
                });
                self.close_to_announce |=
                    conn.record_close(dir.sender(), CloseHow::Disconnect, reason, None, now);
                conn.route.metrics.on_disconnect(dir, reason.map_or("none", reason_name));
            }
            (Direction::BrokerToClient, PacketType::Pingresp) => conn.on_pingresp(now),
            (Direction::ClientToBroker, t @ (PacketType::Subscribe | PacketType::Unsubscribe)) => {
                let subscribe = t == PacketType::Subscribe;
                match TopicFilters::decode(frame, h, protocol, subscribe) {
                    Ok(TopicFilters(filters)) if subscribe => self.ctx.registry.on_subscribe(conn, filters),
                    Ok(TopicFilters(filters)) => self.ctx.registry.on_unsubscribe(conn, &filters),
                    Err(e) => debug!(conn = conn.id, error = %e, "{t} could not be decoded"),
                }
            }
            (dir @ Direction::BrokerToClient, PacketType::Publish) if self.ctx.registry.watching_topics() => {
                match Publish::decode(frame, h, protocol) {
                    Ok(p) => {
                        if let Some(topic) = self.ctx.registry.watched(&p.topic) {
                            let (qos, retain) = (p.qos, p.retain);
                            self.emit(|| Event::Publish {
                                conn: conn.clone(),
                                direction: dir,
                                topic,
                                qos,
                                retain,
                                at: now,
                            });
                        }
                    }
                    Err(e) => {
                        debug!(conn = conn.id, direction = %dir, error = %e, "PUBLISH could not be decoded")
                    }
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// The direction's mode now; a mode taking effect for the first time is counted.
    fn mode(&self, faults: &mut ConnFaults, now: Instant) -> Mode {
        if faults.is_idle() {
            return Mode::Normal;
        }
        let (mode, applied) = faults.mode(self.dir, now);
        if let Some(a) = applied {
            self.applied(&a, None);
        }
        mode
    }

    /// Counts and logs a fault applied in this direction.
    fn applied(&self, applied: &Applied, packet: Option<PacketType>) {
        let conn = &self.ctx.conn;
        conn.on_fault(applied, &self.ctx.registry);
        debug!(conn = conn.id, rule = applied.rule.name(), action = applied.rule.kind().as_str(),
            direction = %self.dir, packet = packet.map_or("-", PacketType::name), "fault applied");
    }

    fn emit(&self, event: impl FnOnce() -> Event) {
        if self.ctx.registry.has_subscribers() {
            self.ctx.registry.emit(event());
        }
    }

    /// Handles bytes that are not MQTT: relay the rest raw, or end the connection.
    fn malformed(&mut self, reason: String, now: Instant) -> Result<(), PumpEnd> {
        let conn = &self.ctx.conn;
        conn.route.metrics.on_malformed(self.dir);
        conn.on_malformed(self.dir, reason.clone());
        match self.ctx.settings.on_malformed {
            OnMalformed::Relay => {
                warn!(conn = conn.id, route = %conn.route.name, direction = %self.dir, %reason,
                    "bytes are not MQTT: relaying this direction raw for the rest of the connection");
                self.raw = true;
                Ok(())
            }
            OnMalformed::Close => {
                warn!(conn = conn.id, route = %conn.route.name, direction = %self.dir, %reason,
                    "bytes are not MQTT: closing the connection (--on-malformed close)");
                let why = format!("{} is not MQTT: {reason}", self.dir);
                conn.note_close(Side::Proxy, CloseHow::Fin, None, Some(why), now);
                Err(PumpEnd::Malformed)
            }
        }
    }
}

#[cfg(test)]
mod tests;
