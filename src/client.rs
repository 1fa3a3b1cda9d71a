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
        loop {
            match self.next(deadline).await {
                Next::Packet(h, frame) if h.packet_type == PacketType::Connack => {
                    let connack = Connack::decode(&frame, &h, self.protocol).map_err(invalid)?;
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
            let mut chunk = [0u8; 4096];
            match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Next::Quiet,
                Ok(Ok(0)) => return Next::Ended(Ended::Fin { disconnect: self.disconnect }),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) => return Next::Ended(Ended::Reset),
            }
        }
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

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}
