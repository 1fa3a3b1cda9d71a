//! The probe's raw MQTT clients, written with the project's codec: they send exactly what a
//! scenario says (no automatic PINGREQ, no reconnect) and report what the broker did, including
//! how the connection ended. The Will watcher is one of them, subscribed straight to the broker.

use crate::codec::encode::{self, ConnectSpec};
use crate::codec::{Connack, Disconnect, FrameHeader, PacketType, Protocol, Publish, Splitter, Step};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until, timeout_at};

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
    stream: TcpStream,
    protocol: Protocol,
    buf: Vec<u8>,
    splitter: Splitter,
    /// A DISCONNECT the broker sent (`Some(None)` before MQTT 5), kept for [`Ended::Fin`].
    disconnect: Option<Option<u8>>,
    pub local: SocketAddr,
}

impl RawClient {
    /// Opens a TCP connection to `addr` within `within`.
    pub async fn open(addr: &str, protocol: Protocol, within: Duration) -> std::io::Result<RawClient> {
        let stream = tokio::time::timeout(within, TcpStream::connect(addr)).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {within:?}"))
        })??;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        Ok(RawClient {
            stream,
            protocol,
            buf: Vec::with_capacity(512),
            splitter: Splitter::new(64 * 1024),
            disconnect: None,
            local,
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
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
        match self.splitter.peek(&self.buf) {
            Step::Frame(h) => {
                let frame: Vec<u8> = self.buf.drain(..h.frame_len()).collect();
                if h.packet_type == PacketType::Disconnect {
                    self.disconnect =
                        Some(Disconnect::decode(&frame, &h, self.protocol).ok().and_then(|d| d.reason));
                }
                Some(Next::Packet(h, frame))
            }
            // The probe's peers send small packets; anything else ends the conversation.
            Step::StreamHead(_) | Step::StreamBody(_) | Step::Malformed(_) => Some(Next::Ended(Ended::Reset)),
            Step::NeedMore { .. } => None,
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

/// Wills (and any other PUBLISH) seen under the probe's topic root, by topic, with the time each
/// arrived. Filled by [`watch`], a subscriber connected straight to the broker.
#[derive(Default)]
pub struct Sightings {
    seen: Mutex<HashMap<String, Instant>>,
    changed: Notify,
}

impl Sightings {
    /// When a PUBLISH on `topic` first arrived, waiting for one until `until`.
    pub async fn wait(&self, topic: &str, until: Instant) -> Option<Instant> {
        loop {
            let notified = self.changed.notified();
            if let Some(at) = self.seen.lock().expect("sightings lock").get(topic) {
                return Some(*at);
            }
            if timeout_at(until, notified).await.is_err() {
                return self.seen.lock().expect("sightings lock").get(topic).copied();
            }
        }
    }

    fn note(&self, topic: String) {
        self.seen.lock().expect("sightings lock").entry(topic).or_insert_with(Instant::now);
        self.changed.notify_waiters();
    }
}

/// Subscribes to `filter` on `addr` and notes every PUBLISH in `sightings` until the
/// connection ends. Returns once the SUBACK arrived (the watch is in place), or an error that
/// says why it could not be set up.
pub async fn watch(
    addr: &str,
    connect: ConnectSpec,
    filter: &str,
    sightings: Arc<Sightings>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let protocol = connect.protocol;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = RawClient::open(addr, protocol, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
    match c.handshake(&connect, deadline).await.map_err(|e| e.to_string())? {
        Handshake::Accepted(_) => {}
        other => return Err(format!("the Will watcher's CONNECT was not accepted: {other:?}")),
    }
    c.send(&encode::subscribe(protocol, 1, filter, 0)).await.map_err(|e| e.to_string())?;
    loop {
        match c.next(deadline).await {
            Next::Packet(h, frame) if h.packet_type == PacketType::Suback => {
                // The last byte is the one filter's return (3.1.1) or reason (5) code.
                match frame.last() {
                    Some(&code) if code < 0x80 => break,
                    code => {
                        return Err(format!(
                            "the broker refused the Will watcher's subscription to {filter} (SUBACK code {:#04x}); the probe must be allowed to subscribe to the topics it publishes Wills on",
                            code.copied().unwrap_or_default()
                        ));
                    }
                }
            }
            Next::Packet(..) => {}
            Next::Ended(e) => return Err(format!("the broker closed the Will watcher ({e:?})")),
            Next::Quiet => return Err("the Will watcher's SUBSCRIBE was not answered within 10 s".into()),
        }
    }
    // The watcher's CONNECT asks for Keep Alive 60 (some brokers refuse 0): ping every 30 s.
    Ok(tokio::spawn(async move {
        let mut next_ping = Instant::now() + Duration::from_secs(30);
        loop {
            match c.next(next_ping).await {
                Next::Packet(h, frame) if h.packet_type == PacketType::Publish => {
                    if let Ok(p) = Publish::decode(&frame, &h, protocol) {
                        sightings.note(p.topic);
                    }
                }
                Next::Packet(..) => {}
                Next::Quiet => {
                    if c.send(&encode::PINGREQ).await.is_err() {
                        return;
                    }
                    next_ping += Duration::from_secs(30);
                }
                Next::Ended(_) => return,
            }
        }
    }))
}
