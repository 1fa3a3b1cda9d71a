//! The words the rest of the proxy speaks: directions, sides, how and why a connection closed,
//! what a takeover came to, and what a pump counted in a batch.
//!
//! A leaf: it imports nothing from the crate but the codec's [`PacketType`], so the record, the
//! fault engine, the pumps and the metrics can all use it without importing each other. The
//! `as_str` names are the strings of profiles, metric labels, logs and JSON.

use crate::codec::PacketType;
use serde::Serialize;

/// The direction bytes travel. The same strings name it in profiles, metrics, logs and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    ClientToBroker,
    BrokerToClient,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::ClientToBroker, Direction::BrokerToClient];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToBroker => "client_to_broker",
            Direction::BrokerToClient => "broker_to_client",
        }
    }

    /// The side that sends in this direction.
    pub fn sender(self) -> Side {
        match self {
            Direction::ClientToBroker => Side::Client,
            Direction::BrokerToClient => Side::Broker,
        }
    }

    /// The side that receives in this direction.
    pub fn receiver(self) -> Side {
        match self {
            Direction::ClientToBroker => Side::Broker,
            Direction::BrokerToClient => Side::Client,
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Client,
    Broker,
    Proxy,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Broker => "broker",
            Side::Proxy => "proxy",
        }
    }
}

/// How a connection was ended by the side that ended it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseHow {
    /// An MQTT DISCONNECT packet (its reason is in [`CloseInfo::disconnect_reason`]).
    Disconnect,
    /// A TCP FIN.
    Fin,
    /// A TCP RST.
    Rst,
    /// A socket error other than a reset, or an upstream that could not be reached.
    Error,
}

impl CloseHow {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseHow::Disconnect => "disconnect",
            CloseHow::Fin => "fin",
            CloseHow::Rst => "rst",
            CloseHow::Error => "error",
        }
    }
}

/// Why a connection ended, judged at its first close. METRICS.md gives the rules; only
/// `keepalive_timeout` counts as a broker detection and only `client_gave_up` as a client one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The broker closed a peer silent for at least the Keep Alive it enforces, or sent
    /// DISCONNECT 0x8D.
    KeepaliveTimeout,
    /// The broker answered the CONNECT with a refusing CONNACK.
    ConnectRefused,
    /// A side closed before any CONNACK (wrong protocol, rejected CONNECT, port checks).
    NoConnack,
    /// The broker closed a connection whose client id connected again (within
    /// [`crate::record::TAKEOVER_WINDOW`]), or sent DISCONNECT 0x8E.
    Takeover,
    /// A DISCONNECT with reason 0x00 or 0x04 (3.x: any DISCONNECT).
    Normal,
    /// The client closed without DISCONNECT with a PINGREQ unanswered or after at least its
    /// Keep Alive of silence.
    ClientGaveUp,
    /// Any other close by a side.
    Abrupt,
    /// The proxy closed it: a fault rule, the admin API, a timeout, an error, a shutdown.
    Proxy,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::KeepaliveTimeout => "keepalive_timeout",
            Cause::ConnectRefused => "connect_refused",
            Cause::NoConnack => "no_connack",
            Cause::Takeover => "takeover",
            Cause::Normal => "normal",
            Cause::ClientGaveUp => "client_gave_up",
            Cause::Abrupt => "abrupt",
            Cause::Proxy => "proxy",
        }
    }

    /// The side whose detection of a dead peer this close is: the broker for a Keep Alive
    /// timeout, the client when it gave up; nobody's for any other cause.
    pub fn detected_by(self) -> Option<Side> {
        match self {
            Cause::KeepaliveTimeout => Some(Side::Broker),
            Cause::ClientGaveUp => Some(Side::Client),
            _ => None,
        }
    }
}

/// What a takeover came to, settled at the first close of the connection taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TakeoverOutcome {
    /// The broker closed the old connection (no DISCONNECT 0x8E).
    Closed,
    /// The broker closed it with DISCONNECT 0x8E (Session taken over).
    Disconnect0x8e,
    /// The broker left it open for [`crate::record::TAKEOVER_WINDOW`].
    NotEnforced,
    /// The old client or the proxy closed it first.
    Preempted,
}

impl TakeoverOutcome {
    pub const ALL: [TakeoverOutcome; 4] = [
        TakeoverOutcome::Closed,
        TakeoverOutcome::Disconnect0x8e,
        TakeoverOutcome::NotEnforced,
        TakeoverOutcome::Preempted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TakeoverOutcome::Closed => "closed",
            TakeoverOutcome::Disconnect0x8e => "disconnect_0x8e",
            TakeoverOutcome::NotEnforced => "not_enforced",
            TakeoverOutcome::Preempted => "preempted",
        }
    }
}

/// What became of a Will the proxy expected the broker to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillOutcome {
    Observed,
    /// Not seen although an observer or a subscription through the proxy watched its topic.
    Missing,
    /// Not seen, and nothing watched its topic.
    Unobservable,
}

impl WillOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            WillOutcome::Observed => "observed",
            WillOutcome::Missing => "missing",
            WillOutcome::Unobservable => "unobservable",
        }
    }
}

/// The first close observed on a connection, and the silence that preceded it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CloseInfo {
    pub closed_by: Side,
    pub how: CloseHow,
    /// Why, as [`crate::record::classify`] judged it.
    pub cause: Cause,
    /// MQTT 5 reason code of the DISCONNECT, if `how` is `disconnect` and the protocol has one.
    pub disconnect_reason: Option<u8>,
    /// Human-readable detail: the reason name, the socket error, or why the proxy closed.
    pub reason: Option<String>,
    /// Seconds from the start of the connection to the close.
    pub at_s: f64,
    /// Time since the last packet the proxy delivered *to the closing side* (client or broker;
    /// counted from the connection's start if none was delivered).
    pub silence_s: Option<f64>,
    /// `silence_s` divided by the Keep Alive the closing side enforces (absent when that is 0
    /// or unknown).
    pub silence_ratio: Option<f64>,
    /// The Keep Alive the closing side enforces, seconds.
    pub keep_alive_enforced: Option<u16>,
}

/// What a pump counted in one batch, committed to the record after the batch was written.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub packets: [u32; 15],
    pub bytes: u64,
    /// Whether a complete packet (or the start of a streamed one) went out.
    pub any_packet: bool,
    pub ping: bool,
}

impl Batch {
    pub fn count(&mut self, t: PacketType) {
        self.packets[t.index()] += 1;
        self.any_packet = true;
        self.ping |= matches!(t, PacketType::Pingreq | PacketType::Pingresp);
    }
}
