//! Decoding the packets the proxy needs fields from, out of one complete frame.
//!
//! Every decoder takes the whole frame (fixed header included) so that the offsets it reports
//! are offsets into the bytes that will be forwarded. Nothing here allocates for packets the
//! proxy only counts; strings are decoded lossily because the broker, not the proxy, judges
//! UTF-8 validity. The CONNECT password is skipped and never kept.

use super::frame::FrameHeader;
use serde::Serialize;

/// MQTT control packet types (the high nibble of the first byte). 0 is reserved and is a
/// framing error, so it has no variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PacketType {
    Connect = 1,
    Connack = 2,
    Publish = 3,
    Puback = 4,
    Pubrec = 5,
    Pubrel = 6,
    Pubcomp = 7,
    Subscribe = 8,
    Suback = 9,
    Unsubscribe = 10,
    Unsuback = 11,
    Pingreq = 12,
    Pingresp = 13,
    Disconnect = 14,
    /// MQTT 5.0 only.
    Auth = 15,
}

impl PacketType {
    /// Every type, in numeric order.
    pub const ALL: [PacketType; 15] = [
        PacketType::Connect,
        PacketType::Connack,
        PacketType::Publish,
        PacketType::Puback,
        PacketType::Pubrec,
        PacketType::Pubrel,
        PacketType::Pubcomp,
        PacketType::Subscribe,
        PacketType::Suback,
        PacketType::Unsubscribe,
        PacketType::Unsuback,
        PacketType::Pingreq,
        PacketType::Pingresp,
        PacketType::Disconnect,
        PacketType::Auth,
    ];

    pub fn from_nibble(n: u8) -> Option<PacketType> {
        PacketType::ALL.get(usize::from(n).checked_sub(1)?).copied()
    }

    /// Index into per-type counter arrays (0..15).
    pub fn index(self) -> usize {
        self as usize - 1
    }

    /// The name the specification uses, which is also the name in profiles, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            PacketType::Connect => "CONNECT",
            PacketType::Connack => "CONNACK",
            PacketType::Publish => "PUBLISH",
            PacketType::Puback => "PUBACK",
            PacketType::Pubrec => "PUBREC",
            PacketType::Pubrel => "PUBREL",
            PacketType::Pubcomp => "PUBCOMP",
            PacketType::Subscribe => "SUBSCRIBE",
            PacketType::Suback => "SUBACK",
            PacketType::Unsubscribe => "UNSUBSCRIBE",
            PacketType::Unsuback => "UNSUBACK",
            PacketType::Pingreq => "PINGREQ",
            PacketType::Pingresp => "PINGRESP",
            PacketType::Disconnect => "DISCONNECT",
            PacketType::Auth => "AUTH",
        }
    }

    /// Case-insensitive inverse of [`PacketType::name`].
    pub fn from_name(name: &str) -> Option<PacketType> {
        PacketType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }
}

impl std::fmt::Display for PacketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for PacketType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Protocol version, chosen by the CONNECT and used to decode the rest of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1: `MQTT`, level 4.
    V311,
    /// MQTT 5.0: `MQTT`, level 5.
    V5,
}

impl Protocol {
    /// The protocol level byte (3, 4 or 5), which is how profiles and records name it.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V31 => 3,
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }

    /// The version as people write it: `3.1`, `3.1.1`, `5`.
    pub fn version(self) -> &'static str {
        match self {
            Protocol::V31 => "3.1",
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        }
    }

    pub fn from_level(level: u8) -> Option<Protocol> {
        match level {
            3 => Some(Protocol::V31),
            4 => Some(Protocol::V311),
            5 => Some(Protocol::V5),
            _ => None,
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.level())
    }
}

/// Why a complete frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{packet} is truncated: needed {needed} more bytes at offset {at}")]
    Truncated { packet: &'static str, at: usize, needed: usize },
    #[error("unknown protocol name {name:?} with level {level}")]
    UnknownProtocol { name: String, level: u8 },
    #[error("{packet} has an invalid {what}")]
    Invalid { packet: &'static str, what: &'static str },
    #[error("{packet} has unknown property identifier {id:#04x}")]
    UnknownProperty { packet: &'static str, id: u32 },
}

/// The Will a CONNECT asks for (its payload is not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Will {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval (property 0x18), seconds.
    pub delay_interval: Option<u32>,
    pub payload_len: usize,
}

/// The fields of a CONNECT that rules and measurements use. The password is never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    /// The connect-flags byte as sent.
    pub flags: u8,
    pub clean_start: bool,
    pub keep_alive: u16,
    /// Offset of the two Keep Alive bytes from the start of the frame: a rewrite patches them.
    pub keep_alive_offset: usize,
    /// MQTT 5 Session Expiry Interval (0x11), seconds.
    pub session_expiry: Option<u32>,
    /// MQTT 5 Receive Maximum (0x21).
    pub receive_maximum: Option<u16>,
    /// MQTT 5 Maximum Packet Size (0x27).
    pub maximum_packet_size: Option<u32>,
    pub client_id: String,
    pub will: Option<Will>,
    /// Kept for rule matching; records only say whether one was present.
    pub username: Option<String>,
    pub password_present: bool,
}

/// The fields of a CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connack {
    pub session_present: bool,
    /// 3.1/3.1.1 return code or 5.0 reason code.
    pub code: u8,
    /// MQTT 5 Server Keep Alive (0x13).
    pub server_keep_alive: Option<u16>,
    /// MQTT 5 Assigned Client Identifier (0x12).
    pub assigned_client_id: Option<String>,
    /// MQTT 5 Reason String (0x1F).
    pub reason_string: Option<String>,
}

/// A DISCONNECT. Before MQTT 5 it has no reason; `e0 00` in 5.0 means reason 0x00.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: Option<u8>,
}

/// The fields of a PUBLISH the proxy looks at (the payload is not copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// MQTT 5 Topic Alias (0x23): with one, `topic` may be empty.
    pub topic_alias: Option<u16>,
    pub payload_len: usize,
}

/// A bounds-checked cursor over one frame.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    packet: &'static str,
}

impl<'a> Reader<'a> {
    fn new(frame: &'a [u8], header: &FrameHeader, packet: &'static str) -> Self {
        Reader { buf: frame, pos: usize::from(header.header_len), packet }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(DecodeError::Truncated {
            packet: self.packet,
            at: self.pos,
            needed: n,
        })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid { packet: self.packet, what: "variable byte integer" })
    }

    /// Two-byte length followed by that many bytes (UTF-8 strings and binary data).
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// An MQTT 5 property list: a varint length, then that many bytes of properties.
    fn properties(&mut self) -> Result<Properties<'a>, DecodeError> {
        let len = self.varint()? as usize;
        let bytes = self.take(len)?;
        Ok(Properties { r: Reader { buf: bytes, pos: 0, packet: self.packet } })
    }
}

/// A property's value, typed as MQTT 5 section 2.2.2.2 defines it for that identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PropValue<'a> {
    Byte(u8),
    U16(u16),
    U32(u32),
    Varint(u32),
    Bytes(&'a [u8]),
    Pair,
}

/// Iterates over an MQTT 5 property list.
struct Properties<'a> {
    r: Reader<'a>,
}

impl<'a> Iterator for Properties<'a> {
    type Item = Result<(u32, PropValue<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.r.remaining() == 0 {
            return None;
        }
        Some(self.read_one())
    }
}

impl<'a> Properties<'a> {
    fn read_one(&mut self) -> Result<(u32, PropValue<'a>), DecodeError> {
        let r = &mut self.r;
        let id = r.varint()?;
        let value = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => PropValue::Byte(r.u8()?),
            0x13 | 0x21 | 0x22 | 0x23 => PropValue::U16(r.u16()?),
            0x02 | 0x11 | 0x18 | 0x27 => PropValue::U32(r.u32()?),
            0x0b => PropValue::Varint(r.varint()?),
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => PropValue::Bytes(r.bytes()?),
            0x26 => {
                r.bytes()?;
                r.bytes()?;
                PropValue::Pair
            }
            _ => return Err(DecodeError::UnknownProperty { packet: r.packet, id }),
        };
        Ok((id, value))
    }
}

impl Connect {
    /// Decodes a complete CONNECT frame.
    pub fn decode(frame: &[u8], header: &FrameHeader) -> Result<Connect, DecodeError> {
        const P: &str = "CONNECT";
        let mut r = Reader::new(frame, header, P);
        let name = r.bytes()?;
        let level = r.u8()?;
        let protocol = match (name, level) {
            (b"MQIsdp", 3) => Protocol::V31,
            (b"MQTT", 4) => Protocol::V311,
            (b"MQTT", 5) => Protocol::V5,
            _ => {
                return Err(DecodeError::UnknownProtocol {
                    name: String::from_utf8_lossy(name).into_owned(),
                    level,
                });
            }
        };
        let flags = r.u8()?;
        if flags & 0x01 != 0 {
            return Err(DecodeError::Invalid { packet: P, what: "reserved connect flag" });
        }
        let keep_alive_offset = r.pos;
        let keep_alive = r.u16()?;
        let mut connect = Connect {
            protocol,
            flags,
            clean_start: flags & 0x02 != 0,
            keep_alive,
            keep_alive_offset,
            session_expiry: None,
            receive_maximum: None,
            maximum_packet_size: None,
            client_id: String::new(),
            will: None,
            username: None,
            password_present: flags & 0x40 != 0,
        };
        if protocol == Protocol::V5 {
            for prop in r.properties()? {
                match prop? {
                    (0x11, PropValue::U32(v)) => connect.session_expiry = Some(v),
                    (0x21, PropValue::U16(v)) => connect.receive_maximum = Some(v),
                    (0x27, PropValue::U32(v)) => connect.maximum_packet_size = Some(v),
                    _ => {}
                }
            }
        }
        connect.client_id = r.string()?;
        if flags & 0x04 != 0 {
            let mut delay_interval = None;
            if protocol == Protocol::V5 {
                for prop in r.properties()? {
                    if let (0x18, PropValue::U32(v)) = prop? {
                        delay_interval = Some(v);
                    }
                }
            }
            let topic = r.string()?;
            let payload_len = r.bytes()?.len();
            let qos = (flags >> 3) & 0x03;
            if qos == 3 {
                return Err(DecodeError::Invalid { packet: P, what: "will QoS (3)" });
            }
            connect.will = Some(Will { topic, qos, retain: flags & 0x20 != 0, delay_interval, payload_len });
        }
        if flags & 0x80 != 0 {
            connect.username = Some(r.string()?);
        }
        if connect.password_present {
            r.bytes()?; // skipped, never kept
        }
        Ok(connect)
    }
}

impl Connack {
    /// Decodes a complete CONNACK frame of the given protocol.
    pub fn decode(frame: &[u8], header: &FrameHeader, protocol: Protocol) -> Result<Connack, DecodeError> {
        let mut r = Reader::new(frame, header, "CONNACK");
        let ack_flags = r.u8()?;
        let code = r.u8()?;
        let mut connack = Connack {
            session_present: ack_flags & 0x01 != 0,
            code,
            server_keep_alive: None,
            assigned_client_id: None,
            reason_string: None,
        };
        if protocol == Protocol::V5 && r.remaining() > 0 {
            for prop in r.properties()? {
                match prop? {
                    (0x13, PropValue::U16(v)) => connack.server_keep_alive = Some(v),
                    (0x12, PropValue::Bytes(b)) => {
                        connack.assigned_client_id = Some(String::from_utf8_lossy(b).into_owned())
                    }
                    (0x1f, PropValue::Bytes(b)) => {
                        connack.reason_string = Some(String::from_utf8_lossy(b).into_owned())
                    }
                    _ => {}
                }
            }
        }
        Ok(connack)
    }
}

impl Disconnect {
    /// Decodes a complete DISCONNECT frame, including MQTT 5's short forms `e0 00` and
    /// `e0 01 <reason>`.
    pub fn decode(frame: &[u8], header: &FrameHeader, protocol: Protocol) -> Result<Disconnect, DecodeError> {
        if protocol != Protocol::V5 {
            return Ok(Disconnect { reason: None });
        }
        let mut r = Reader::new(frame, header, "DISCONNECT");
        let reason = if r.remaining() == 0 { 0 } else { r.u8()? };
        if r.remaining() > 0 {
            for prop in r.properties()? {
                prop?;
            }
        }
        Ok(Disconnect { reason: Some(reason) })
    }

    /// The Reason String (property 0x1F) of a complete MQTT 5 DISCONNECT frame, if it has a
    /// well-formed one.
    pub fn reason_string(frame: &[u8], header: &FrameHeader, protocol: Protocol) -> Option<String> {
        if protocol != Protocol::V5 {
            return None;
        }
        let mut r = Reader::new(frame, header, "DISCONNECT");
        if r.remaining() < 2 {
            return None;
        }
        r.u8().ok()?;
        let mut found = None;
        for prop in r.properties().ok()? {
            if let (0x1f, PropValue::Bytes(b)) = prop.ok()? {
                found = Some(String::from_utf8_lossy(b).into_owned());
            }
        }
        found
    }
}

impl Publish {
    /// Decodes a complete PUBLISH frame of the given protocol.
    pub fn decode(frame: &[u8], header: &FrameHeader, protocol: Protocol) -> Result<Publish, DecodeError> {
        const P: &str = "PUBLISH";
        let qos = (header.flags >> 1) & 0x03;
        if qos == 3 {
            return Err(DecodeError::Invalid { packet: P, what: "QoS (3)" });
        }
        let mut r = Reader::new(frame, header, P);
        let topic = r.string()?;
        if qos > 0 {
            r.u16()?; // packet identifier
        }
        let mut topic_alias = None;
        if protocol == Protocol::V5 {
            for prop in r.properties()? {
                if let (0x23, PropValue::U16(v)) = prop? {
                    topic_alias = Some(v);
                }
            }
        }
        Ok(Publish {
            topic,
            qos,
            retain: header.flags & 0x01 != 0,
            dup: header.flags & 0x08 != 0,
            topic_alias,
            payload_len: r.remaining(),
        })
    }
}

/// The topic filters of a SUBSCRIBE or an UNSUBSCRIBE, in order (options are not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilters(pub Vec<String>);

impl TopicFilters {
    /// Decodes a complete SUBSCRIBE (`subscribe`) or UNSUBSCRIBE frame of the given protocol.
    pub fn decode(
        frame: &[u8],
        header: &FrameHeader,
        protocol: Protocol,
        subscribe: bool,
    ) -> Result<TopicFilters, DecodeError> {
        let packet = if subscribe { "SUBSCRIBE" } else { "UNSUBSCRIBE" };
        let mut r = Reader::new(frame, header, packet);
        r.u16()?; // packet identifier
        if protocol == Protocol::V5 {
            for prop in r.properties()? {
                prop?;
            }
        }
        let mut filters = Vec::new();
        while r.remaining() > 0 {
            filters.push(r.string()?);
            if subscribe {
                r.u8()?; // subscription options (3.1.1: requested QoS)
            }
        }
        if filters.is_empty() {
            return Err(DecodeError::Invalid { packet, what: "topic filter list (empty)" });
        }
        Ok(TopicFilters(filters))
    }
}

/// Whether an MQTT topic filter matches a topic name (MQTT 5 §4.7; the same in 3.1.1): `+`
/// matches one level, a final `#` the parent and every level below it, wildcards in the first
/// level do not match topics starting with `$`, and a shared subscription
/// (`$share/{group}/{filter}`) matches as its filter.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((_, f)) => f,
            None => return false,
        },
        None => filter,
    };
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        match (f, levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Appends `n` as an MQTT variable byte integer.
pub fn encode_varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

/// Re-encodes an MQTT 5 CONNACK with Server Keep Alive (0x13) set to `value`: an existing 0x13
/// is replaced, otherwise one is appended; every other property is kept byte for byte, and the
/// property length and remaining length are recomputed.
pub fn connack_with_server_keep_alive(
    frame: &[u8],
    header: &FrameHeader,
    value: u16,
) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(frame, header, "CONNACK");
    let flags_and_reason = r.take(2)?;
    let mut props = Vec::new();
    if r.remaining() > 0 {
        let mut list = r.properties()?;
        loop {
            let start = list.r.pos;
            let Some(prop) = list.next() else { break };
            if prop?.0 != 0x13 {
                props.extend_from_slice(&list.r.buf[start..list.r.pos]);
            }
        }
    }
    props.push(0x13);
    props.extend_from_slice(&value.to_be_bytes());
    let mut body = flags_and_reason.to_vec();
    encode_varint(props.len(), &mut body);
    body.extend_from_slice(&props);
    let mut out = vec![frame[0]];
    encode_varint(body.len(), &mut out);
    out.extend_from_slice(&body);
    Ok(out)
}

/// The metric-label name of an MQTT 5 DISCONNECT reason code (`other` for codes the
/// specification does not allow in DISCONNECT).
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "normal_disconnection",
        0x04 => "disconnect_with_will_message",
        0x80 => "unspecified_error",
        0x81 => "malformed_packet",
        0x82 => "protocol_error",
        0x83 => "implementation_specific_error",
        0x87 => "not_authorized",
        0x89 => "server_busy",
        0x8b => "server_shutting_down",
        0x8d => "keep_alive_timeout",
        0x8e => "session_taken_over",
        0x8f => "topic_filter_invalid",
        0x90 => "topic_name_invalid",
        0x93 => "receive_maximum_exceeded",
        0x94 => "topic_alias_invalid",
        0x95 => "packet_too_large",
        0x96 => "message_rate_too_high",
        0x97 => "quota_exceeded",
        0x98 => "administrative_action",
        0x99 => "payload_format_invalid",
        0x9a => "retain_not_supported",
        0x9b => "qos_not_supported",
        0x9c => "use_another_server",
        0x9d => "server_moved",
        0x9e => "shared_subscriptions_not_supported",
        0x9f => "connection_rate_exceeded",
        0xa0 => "maximum_connect_time",
        0xa1 => "subscription_identifiers_not_supported",
        0xa2 => "wildcard_subscriptions_not_supported",
        _ => "other",
    }
}
