//! The directional pump: the one place where bytes leave the proxy.
//!
//! One pump per direction reads what its sender sends, splits it into packets with the pure
//! [`Splitter`], lets [`Inspector`] look at each packet (update the connection record, emit
//! events), and writes *runs* of consecutive forwarded packets to the receiver with a single
//! write, straight out of its read buffer: no copy and no allocation per packet.
//!
//! Packets larger than `max_buffered_packet` are not buffered whole: their fixed header is
//! forwarded at once and their body as it arrives. A write that blocks stops the reading, so a
//! slow receiver back-pressures its sender; the read buffer is the only buffer and it is bounded
//! by `max(max_buffered_packet, 64 KiB)`.
//!
//! When a direction's bytes stop being MQTT, the pump either relays the rest of that direction
//! raw (`--on-malformed relay`) or ends so the session closes both sides (`close`).

use crate::codec::frame::FrameHeader;
use crate::codec::{Connack, Connect, Disconnect, PacketType, Protocol, Publish, Splitter, Step};
use crate::config::{OnMalformed, Settings};
use crate::record::{Batch, CloseHow, Connection, Direction, Event, Registry, Side};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, warn};

/// The smallest read buffer; an idle connection keeps one this size per direction.
const MIN_READ: usize = 1024;
/// The largest read; busy connections grow towards it.
const MAX_READ: usize = 64 * 1024;

/// What a session's pumps share.
pub(crate) struct Ctx {
    pub conn: Arc<Connection>,
    pub registry: Arc<Registry>,
    pub settings: Arc<Settings>,
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
    /// The connection was ended from outside (the other pump, the admin API, shutdown).
    Cancelled,
}

/// Runs one direction until it ends, and records how it ended.
pub(crate) async fn pump<R, W>(ctx: &Ctx, dir: Direction, reader: &mut R, writer: &mut W) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pump = Pump {
        inspector: Inspector { ctx, dir, first: true, raw: false },
        splitter: Splitter::new(ctx.settings.max_buffered_packet),
        buf: Vec::new(),
        start: 0,
        needed: 0,
        read_size: MIN_READ,
    };
    let end = pump.run(reader, writer).await;
    let conn = &ctx.conn;
    let now = Instant::now();
    match &end {
        PumpEnd::Eof => conn.note_close(dir.sender(), CloseHow::Fin, None, None, now),
        PumpEnd::ReadError(e) => conn.note_close(dir.sender(), how_of(e), None, Some(e.to_string()), now),
        PumpEnd::WriteError(e) => conn.note_close(dir.receiver(), how_of(e), None, Some(e.to_string()), now),
        PumpEnd::Malformed | PumpEnd::Cancelled => false,
    };
    end
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
}

impl Pump<'_> {
    async fn run<R, W>(&mut self, reader: &mut R, writer: &mut W) -> PumpEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let spare = self.prepare_buffer();
            let n = match reader.read_buf(&mut self.buf).await {
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

    /// Forwards every complete packet (and streamed body bytes) in the buffer in one write.
    async fn forward<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> Result<(), PumpEnd> {
        let now = Instant::now();
        let mut batch = Batch::default();
        let mut cursor = self.start;
        self.needed = 0;
        let outcome = loop {
            if self.inspector.raw {
                batch.bytes += (self.buf.len() - cursor) as u64;
                cursor = self.buf.len();
                break Ok(());
            }
            let inspected = match self.splitter.step(&self.buf[cursor..]) {
                Step::Frame(h) => {
                    let len = h.frame_len();
                    self.inspector
                        .frame(&h, &self.buf[cursor..cursor + len], now)
                        .map(|()| (h.packet_type, len))
                }
                Step::StreamHead(h) => {
                    debug!(conn = self.inspector.ctx.conn.id, direction = %self.inspector.dir,
                        packet = %h.packet_type, size = h.frame_len(), "streaming a packet larger than the inspection buffer");
                    self.inspector.head(&h).map(|()| (h.packet_type, usize::from(h.header_len)))
                }
                Step::StreamBody(n) => {
                    batch.bytes += n as u64;
                    cursor += n;
                    continue;
                }
                Step::NeedMore { needed } => {
                    self.needed = needed;
                    break Ok(());
                }
                Step::Malformed(e) => Err(e.to_string()),
            };
            match inspected {
                Ok((packet_type, len)) => {
                    batch.count(packet_type);
                    batch.bytes += len as u64;
                    cursor += len;
                }
                // Relay: `raw` is now set and the next turn forwards the rest untouched.
                Err(reason) => {
                    if let Err(end) = self.inspector.malformed(reason, now) {
                        break Err(end);
                    }
                }
            }
        };
        // Whatever was decided before a malformed close is valid MQTT and is still delivered.
        if cursor > self.start {
            writer.write_all(&self.buf[self.start..cursor]).await.map_err(PumpEnd::WriteError)?;
            self.inspector.ctx.conn.commit(self.inspector.dir, &batch, Instant::now());
            self.start = cursor;
        }
        outcome
    }

    /// Forwards whatever is buffered, without framing it.
    async fn flush_raw<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        if self.start < self.buf.len() {
            writer.write_all(&self.buf[self.start..]).await?;
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

    fn frame(&mut self, h: &FrameHeader, frame: &[u8], now: Instant) -> Result<(), String> {
        self.head(h)?;
        let conn = &self.ctx.conn;
        // Until a CONNECT was decoded, assume 3.1.1: its framing of later packets is the 3.x one.
        let protocol = conn.protocol().unwrap_or(Protocol::V311);
        match (self.dir, h.packet_type) {
            (Direction::ClientToBroker, PacketType::Connect) => {
                let connect = Connect::decode(frame, h).map_err(|e| e.to_string())?;
                conn.on_connect(&connect, connect.keep_alive);
                debug!(conn = conn.id, client_id = %connect.client_id, protocol = connect.protocol.level(),
                    keep_alive = connect.keep_alive, will = connect.will.is_some(), "CONNECT");
                self.emit(|| Event::Connect(conn.clone()));
            }
            (Direction::BrokerToClient, PacketType::Connack) => match Connack::decode(frame, h, protocol) {
                Ok(connack) => {
                    conn.on_connack(&connack, connack.server_keep_alive);
                    debug!(conn = conn.id, code = connack.code, server_keep_alive = ?connack.server_keep_alive, "CONNACK");
                    self.emit(|| Event::Connack(conn.clone()));
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
                conn.note_close(dir.sender(), CloseHow::Disconnect, reason, None, now);
            }
            (dir, PacketType::Publish) if self.ctx.registry.has_subscribers() => {
                match Publish::decode(frame, h, protocol) {
                    Ok(p) => self.emit(|| Event::Publish {
                        conn: conn.clone(),
                        direction: dir,
                        topic: p.topic,
                        qos: p.qos,
                        retain: p.retain,
                        at: now,
                    }),
                    Err(e) => {
                        debug!(conn = conn.id, direction = %dir, error = %e, "PUBLISH could not be decoded")
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn emit(&self, event: impl FnOnce() -> Event) {
        if self.ctx.registry.has_subscribers() {
            self.ctx.registry.emit(event());
        }
    }

    /// Handles bytes that are not MQTT: relay the rest raw, or end the connection.
    fn malformed(&mut self, reason: String, now: Instant) -> Result<(), PumpEnd> {
        let conn = &self.ctx.conn;
        conn.route.stats.malformed[self.dir as usize].fetch_add(1, Relaxed);
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
