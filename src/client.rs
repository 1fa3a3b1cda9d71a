//! The proxy's own MQTT client, written with the project's codec: it sends exactly what its
//! caller says (no automatic PINGREQ, no reconnect) and reports what the broker did, including
//! how the connection ended. It reaches a broker over any transport the proxy speaks
//! ([`Dial`]: TCP, TLS, WebSocket, WebSocket over TLS). The probe's clients and Will watcher
//! are these, and so is the proxy's Will observer (`--observe-wills`).

use crate::codec::encode::{self, ConnectSpec};
use crate::codec::{Connack, Disconnect, FrameHeader, PacketType, Protocol, Splitter, Step};
use crate::tls::ClientSide;
use crate::transport::Stream;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout_at};

/// The longest a [`RawClient::send`] may wait for the broker to take the bytes.
pub const SEND_WITHIN: Duration = Duration::from_secs(10);

/// How to reach a broker: its TCP address, and TLS and WebSocket on top where its URL says so.
#[derive(Clone, Copy)]
pub struct Dial<'a> {
    /// `host:port`.
    pub addr: &'a str,
    pub tls: Option<&'a ClientSide>,
    /// The WebSocket path (`ws://`, `wss://`).
    pub ws_path: Option<&'a str>,
}

impl<'a> Dial<'a> {
    /// Plain TCP to `addr`.
    pub fn tcp(addr: &'a str) -> Dial<'a> {
        Dial { addr, tls: None, ws_path: None }
    }

    /// Connects and completes the TLS and WebSocket handshakes, all within `within`. An error
    /// says which step failed.
    pub async fn connect(self, within: Duration) -> std::io::Result<Stream> {
        let steps = async {
            let tcp = TcpStream::connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            let stream = match self.tls {
                None => Stream::Tcp(tcp),
                Some(tls) => {
                    let stream = crate::tls_stream::connect(tcp, tls.config.clone(), tls.server_name.clone())
                        .await
                        .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
                    Stream::TlsClient(Box::new(stream))
                }
            };
            Ok(match self.ws_path {
                None => stream,
                Some(path) => {
                    let (ws, _) = crate::ws::connect(
                        stream,
                        self.addr,
                        path,
                        self.tls.is_some(),
                        crate::ws::DEFAULT_MAX_FRAME,
                        None,
                    )
                    .await
                    .map_err(|e| std::io::Error::new(e.kind(), format!("WebSocket handshake failed: {e}")))?;
                    Stream::Ws(Box::new(ws))
                }
            })
        };
        tokio::time::timeout(within, steps).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {within:?}"))
        })?
    }
}

/// How the broker ended a connection, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A FIN, after a DISCONNECT with this reason if one came (`Some(None)`: 3.1.1's DISCONNECT).
    Fin { disconnect: Option<Option<u8>> },
    /// A reset or another socket error.
    Reset,
}

/// What came next on a connection.
#[derive(Debug)]
pub enum Next {
    Packet(FrameHeader, Vec<u8>),
    Ended(Ended),
    /// The deadline passed first.
    Quiet,
}

/// How a CONNECT was answered.
#[derive(Debug)]
pub enum Handshake {
    Accepted(Connack),
    /// A CONNACK with a non-zero return or reason code.
    Refused(Connack),
    /// The broker closed the connection before any CONNACK.
    Closed(Ended),
    /// No CONNACK before the deadline.
    Silent,
}

/// One raw client connection.
pub struct RawClient {
    stream: Stream,
    protocol: Protocol,
    buf: Vec<u8>,
    splitter: Splitter,
    /// A DISCONNECT the broker sent (`Some(None)` before MQTT 5), kept for [`Ended::Fin`].
    disconnect: Option<Option<u8>>,
    /// That DISCONNECT's Reason String (MQTT 5).
    disconnect_reason_string: Option<String>,
    pub local: SocketAddr,
}

impl RawClient {
    /// Connects to the broker within `within`.
    pub async fn open(dial: Dial<'_>, protocol: Protocol, within: Duration) -> std::io::Result<RawClient> {
        let stream = dial.connect(within).await?;
        let local = stream.tcp().local_addr()?;
        Ok(RawClient {
            stream,
            protocol,
            buf: Vec::with_capacity(512),
            splitter: Splitter::new(64 * 1024),
            disconnect: None,
            disconnect_reason_string: None,
            local,
        })
    }

    /// Sends `bytes` now (a WebSocket frame or TLS record goes out at the flush), within
    /// [`SEND_WITHIN`]: a broker that stops reading does not hold its client for ever.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let send = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(SEND_WITHIN, send).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the broker took no bytes for {SEND_WITHIN:?}"),
            ))
        })
    }

    /// Sends the CONNECT and waits for its CONNACK until `deadline`.
    pub async fn handshake(
        &mut self,
        connect: &ConnectSpec,
        deadline: Instant,
    ) -> std::io::Result<Handshake> {
        self.send(&connect.encode()).await?;
        // The broker's first packet must be a CONNACK [MQTT-3.2.0-1]: a reply that is no MQTT at
        // all (an HTTP or TLS server) or a CONNACK that cannot be one is told for what it is as
        // soon as its first bytes arrive, instead of waiting for a CONNACK that will never come.
        loop {
            match first_reply(&self.buf, self.protocol, self.splitter.limit_for(PacketType::Connack)) {
                FirstReply::NeedMore => {}
                FirstReply::Mqtt => break,
                FirstReply::Wrong(why) => return Err(invalid(why)),
            }
            match self.fill(deadline).await {
                None => {}
                Some(Next::Ended(e)) => return Ok(Handshake::Closed(e)),
                Some(_) => return Ok(Handshake::Silent),
            }
        }
        loop {
            match self.next(deadline).await {
                Next::Packet(h, frame) if h.packet_type == PacketType::Connack => {
                    let connack = Connack::decode(&frame, &h, self.protocol)
                        .map_err(|e| invalid(format!("malformed CONNACK: {e}")))?;
                    return Ok(if connack.code == 0 {
                        Handshake::Accepted(connack)
                    } else {
                        Handshake::Refused(connack)
                    });
                }
                Next::Packet(..) => {}
                Next::Ended(e) => return Ok(Handshake::Closed(e)),
                Next::Quiet => return Ok(Handshake::Silent),
            }
        }
    }

    /// The next packet, the end of the connection, or [`Next::Quiet`] at `deadline`.
    pub async fn next(&mut self, deadline: Instant) -> Next {
        loop {
            // The deadline first: a peer that never stops sending cannot starve it.
            if Instant::now() >= deadline {
                return Next::Quiet;
            }
            if let Some(packet) = self.take_frame() {
                return packet;
            }
            if let Some(end) = self.fill(deadline).await {
                return end;
            }
        }
    }

    /// Reads what the broker sent into the buffer: `None` when bytes arrived, else how the
    /// connection ended or [`Next::Quiet`] at `deadline`.
    async fn fill(&mut self, deadline: Instant) -> Option<Next> {
        let mut chunk = [0u8; 4096];
        match timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Some(Next::Quiet),
            Ok(Ok(0)) => Some(Next::Ended(Ended::Fin { disconnect: self.disconnect })),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                None
            }
            Ok(Err(_)) => Some(Next::Ended(Ended::Reset)),
        }
    }

    /// The Reason String of the last DISCONNECT the broker sent (MQTT 5 property 0x1F).
    pub fn disconnect_reason_string(&self) -> Option<&str> {
        self.disconnect_reason_string.as_deref()
    }

    fn take_frame(&mut self) -> Option<Next> {
        loop {
            let step = self.splitter.peek(&self.buf);
            self.splitter.advance(&step);
            match step {
                // Packets over 64 KiB (a large retained message) are of no interest here: skipped.
                Step::StreamHead(h) => drop(self.buf.drain(..usize::from(h.header_len))),
                Step::StreamBody(n) => drop(self.buf.drain(..n)),
                other => return self.frame(other),
            }
        }
    }

    fn frame(&mut self, step: Step) -> Option<Next> {
        match step {
            Step::Frame(h) => {
                let frame: Vec<u8> = self.buf.drain(..h.frame_len()).collect();
                if h.packet_type == PacketType::Disconnect {
                    self.disconnect =
                        Some(Disconnect::decode(&frame, &h, self.protocol).ok().and_then(|d| d.reason));
                    self.disconnect_reason_string = Disconnect::reason_string(&frame, &h, self.protocol);
                }
                Some(Next::Packet(h, frame))
            }
            // Not MQTT: the conversation is over.
            Step::Malformed(_) => Some(Next::Ended(Ended::Reset)),
            Step::NeedMore { .. } | Step::StreamHead(_) | Step::StreamBody(_) => None,
        }
    }

    /// Sends a PINGREQ every `every` (the first at once; `None`: none) until `until`, or until
    /// the connection ends, counting the PINGRESPs that come back.
    pub async fn ping_until(&mut self, every: Option<Duration>, until: Instant) -> Pinging {
        let mut out = Pinging::default();
        self.ping_more(every, until, &mut out).await;
        out
    }

    /// [`RawClient::ping_until`], adding to what `out` already counted.
    pub async fn ping_more(&mut self, every: Option<Duration>, until: Instant, out: &mut Pinging) {
        let mut next_ping = every.map(|_| Instant::now());
        loop {
            let ping_due = next_ping.filter(|&t| t < until);
            let event = tokio::select! {
                () = sleep_until(ping_due.unwrap_or(until)), if ping_due.is_some() => None,
                next = self.next(until) => Some(next),
            };
            match event {
                None => {
                    if self.send(&encode::PINGREQ).await.is_err() {
                        out.ended = Some((Instant::now(), Ended::Reset));
                        return;
                    }
                    out.sent += 1;
                    out.last_sent = Some(Instant::now());
                    next_ping = next_ping.zip(every).map(|(t, e)| t + e);
                }
                Some(Next::Packet(h, _)) => out.answered += u32::from(h.packet_type == PacketType::Pingresp),
                Some(Next::Ended(e)) => {
                    out.ended = Some((Instant::now(), e));
                    return;
                }
                Some(Next::Quiet) => return,
            }
        }
    }

    /// Sends DISCONNECT (reason 0x00) and closes, ignoring errors: the end of a scenario.
    pub async fn disconnect(mut self) {
        let _ = self.send(&encode::disconnect(self.protocol, 0)).await;
        let _ = self.stream.shutdown().await;
    }

    /// Closes the socket without DISCONNECT (a FIN): an abnormal end that publishes the Will.
    pub async fn drop_connection(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// What [`RawClient::ping_until`] saw.
#[derive(Debug, Default)]
pub struct Pinging {
    pub sent: u32,
    /// PINGRESPs received.
    pub answered: u32,
    pub last_sent: Option<Instant>,
    /// The connection ended before `until`.
    pub ended: Option<(Instant, Ended)>,
}

/// What the front of a broker's reply to a CONNECT is.
#[derive(Debug, PartialEq, Eq)]
enum FirstReply {
    /// Too few bytes to tell.
    NeedMore,
    /// A CONNACK's fixed header (or an MQTT 5 DISCONNECT or AUTH): read on as MQTT.
    Mqtt,
    /// Not what an MQTT broker answers, in words (the broker's bytes escaped and shortened).
    Wrong(String),
}

/// Judges the first bytes of the reply to a CONNECT: a CONNACK whose remaining length fits
/// (at least its two bytes of flags and code, at most `max_connack` in all), or, from an MQTT 5
/// broker, a DISCONNECT or AUTH; anything else is no CONNACK.
fn first_reply(buf: &[u8], protocol: Protocol, max_connack: usize) -> FirstReply {
    let Some(&first) = buf.first() else { return FirstReply::NeedMore };
    match first >> 4 {
        2 => match FrameHeader::parse(buf) {
            Ok(None) => FirstReply::NeedMore,
            Err(_) => FirstReply::Wrong(format!(
                "malformed CONNACK: its remaining length runs over 4 bytes ({})",
                shown(buf)
            )),
            Ok(Some(h)) if h.remaining_len < 2 => FirstReply::Wrong(format!(
                "malformed CONNACK: remaining length {}, too short for its flags and code ({})",
                h.remaining_len,
                shown(buf)
            )),
            Ok(Some(h)) if h.frame_len() > max_connack => FirstReply::Wrong(format!(
                "malformed CONNACK: remaining length {}, over the {max_connack} bytes a CONNACK may take here ({})",
                h.remaining_len,
                shown(buf)
            )),
            Ok(Some(_)) => FirstReply::Mqtt,
        },
        14 | 15 if protocol == Protocol::V5 => FirstReply::Mqtt,
        _ => FirstReply::Wrong(format!("not MQTT: the reply starts with {}", shown(buf))),
    }
}

/// The first bytes (`buf` is not empty) of a peer's reply for a message: as text in backticks,
/// escaped ([`crate::text::escaped`]: `\r\n`), when they start with a printable character (a
/// text protocol such as HTTP), else in hex; at most 24 bytes, `…` when there is more.
fn shown(buf: &[u8]) -> String {
    const MAX: usize = 24;
    let head = &buf[..buf.len().min(MAX)];
    let more = if buf.len() > MAX { "…" } else { "" };
    if head[0].is_ascii_graphic() {
        format!("`{}`{more}", crate::text::escaped(&String::from_utf8_lossy(head)))
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}{}", hex.join(" "), if more.is_empty() { "" } else { " …" })
    }
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024 * 1024;

    #[test]
    fn a_connack_header_reads_on_and_too_few_bytes_wait() {
        assert_eq!(first_reply(&[], Protocol::V311, MAX), FirstReply::NeedMore);
        assert_eq!(first_reply(&[0x20], Protocol::V311, MAX), FirstReply::NeedMore);
        assert_eq!(first_reply(&[0x20, 0x02], Protocol::V311, MAX), FirstReply::Mqtt);
        assert_eq!(first_reply(&[0x20, 0x80], Protocol::V5, MAX), FirstReply::NeedMore);
        assert_eq!(first_reply(&[0x20, 0x09, 0, 0], Protocol::V5, MAX), FirstReply::Mqtt);
        // MQTT 5 may close with DISCONNECT instead (read on: the refusal names its reason).
        assert_eq!(first_reply(&[0xe0, 0x01, 0x82], Protocol::V5, MAX), FirstReply::Mqtt);
    }

    #[test]
    fn an_http_answer_is_not_mqtt_and_shown_escaped_and_shortened() {
        let FirstReply::Wrong(why) =
            first_reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", Protocol::V311, MAX)
        else {
            panic!()
        };
        assert_eq!(why, "not MQTT: the reply starts with `HTTP/1.1 400 Bad Request`…");
        let FirstReply::Wrong(why) = first_reply(b"HTTP/1.0 200\r\n\x1b[2J", Protocol::V5, MAX) else {
            panic!()
        };
        assert_eq!(why, r"not MQTT: the reply starts with `HTTP/1.0 200\r\n\u{1b}[2J`");
        let FirstReply::Wrong(why) = first_reply(b"SSH-2.0\r\n", Protocol::V5, MAX) else { panic!() };
        assert_eq!(why, r"not MQTT: the reply starts with `SSH-2.0\r\n`");
        // A TLS alert to a plain-text CONNECT.
        let FirstReply::Wrong(why) =
            first_reply(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46], Protocol::V5, MAX)
        else {
            panic!()
        };
        assert_eq!(why, "not MQTT: the reply starts with bytes 15 03 03 00 02 02 46");
    }

    #[test]
    fn a_connack_of_an_impossible_length_is_malformed() {
        let wrong = |buf: &[u8]| match first_reply(buf, Protocol::V5, MAX) {
            FirstReply::Wrong(why) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            wrong(&[0x20, 0xff, 0xff, 0xff, 0x7f, 0]),
            "malformed CONNACK: remaining length 268435455, over the 1048576 bytes a CONNACK may take here (bytes 20 ff ff ff 7f 00)"
        );
        assert!(
            wrong(&[0x20, 0xff, 0xff, 0xff, 0xff, 0x01])
                .starts_with("malformed CONNACK: its remaining length runs over 4 bytes")
        );
        assert!(wrong(&[0x20, 0x01, 0x00]).starts_with("malformed CONNACK: remaining length 1, too short"));
    }

    #[test]
    fn a_disconnect_reason_string_is_read() {
        let frame = [0xe0, 0x0a, 0x8d, 0x08, 0x1f, 0x00, 0x05, b'i', b'd', b'l', b'e', b'!'];
        let h = FrameHeader::parse(&frame).unwrap().unwrap();
        assert_eq!(Disconnect::reason_string(&frame, &h, Protocol::V5).as_deref(), Some("idle!"));
        assert_eq!(Disconnect::reason_string(&frame, &h, Protocol::V311), None);
        let short = [0xe0, 0x01, 0x8d];
        let h = FrameHeader::parse(&short).unwrap().unwrap();
        assert_eq!(Disconnect::reason_string(&short, &h, Protocol::V5), None);
    }
}
