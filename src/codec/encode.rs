//! Encoding the few packets a client sends: CONNECT (3.1.1 and 5.0, with Will, Will Delay,
//! Session Expiry and credentials), SUBSCRIBE, PINGREQ and DISCONNECT.
//!
//! The proxy never re-encodes what it forwards; these are for `mqtt-chaos probe`'s own raw
//! clients, which must send exactly what a scenario says and nothing else (no automatic
//! PINGREQ, no reconnect). Pure: bytes out, no I/O.

use super::packet::{Protocol, encode_varint};

/// PINGREQ: `c0 00`.
pub const PINGREQ: [u8; 2] = [0xc0, 0x00];

/// A Will to put in a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillSpec {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval (property 0x18), seconds.
    pub delay_interval: Option<u32>,
}

/// What a CONNECT says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSpec {
    /// 3.1.1 or 5.0 (3.1 is encoded with `MQIsdp`, level 3).
    pub protocol: Protocol,
    pub client_id: String,
    pub keep_alive: u16,
    /// Clean Session (3.1.1) / Clean Start (5.0).
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval (property 0x11), seconds.
    pub session_expiry: Option<u32>,
    pub will: Option<WillSpec>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl ConnectSpec {
    /// A clean-start CONNECT with no Will and no credentials.
    pub fn new(protocol: Protocol, client_id: impl Into<String>, keep_alive: u16) -> ConnectSpec {
        ConnectSpec {
            protocol,
            client_id: client_id.into(),
            keep_alive,
            clean_start: true,
            session_expiry: None,
            will: None,
            username: None,
            password: None,
        }
    }

    /// The CONNECT packet, fixed header included.
    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.protocol == Protocol::V5;
        let mut body = Vec::with_capacity(64);
        match self.protocol {
            Protocol::V31 => string(&mut body, b"MQIsdp"),
            Protocol::V311 | Protocol::V5 => string(&mut body, b"MQTT"),
        }
        body.push(self.protocol.level());
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos.min(2) << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            let mut props = Vec::new();
            if let Some(e) = self.session_expiry {
                props.push(0x11);
                props.extend_from_slice(&e.to_be_bytes());
            }
            properties(&mut body, &props);
        }
        string(&mut body, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if v5 {
                let mut props = Vec::new();
                if let Some(d) = w.delay_interval {
                    props.push(0x18);
                    props.extend_from_slice(&d.to_be_bytes());
                }
                properties(&mut body, &props);
            }
            string(&mut body, w.topic.as_bytes());
            string(&mut body, &w.payload);
        }
        if let Some(u) = &self.username {
            string(&mut body, u.as_bytes());
        }
        if let Some(p) = &self.password {
            string(&mut body, p);
        }
        packet(0x10, &body)
    }
}

/// SUBSCRIBE to one filter at `qos` with packet identifier `id`.
pub fn subscribe(protocol: Protocol, id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if protocol == Protocol::V5 {
        body.push(0);
    }
    string(&mut body, filter.as_bytes());
    body.push(qos.min(2));
    packet(0x82, &body)
}

/// UNSUBSCRIBE of one topic filter.
pub fn unsubscribe(protocol: Protocol, id: u16, filter: &str) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if protocol == Protocol::V5 {
        body.push(0);
    }
    string(&mut body, filter.as_bytes());
    packet(0xa2, &body)
}

/// DISCONNECT: `e0 00` before MQTT 5; in 5.0 with `reason` (`e0 00` for 0x00).
pub fn disconnect(protocol: Protocol, reason: u8) -> Vec<u8> {
    if protocol == Protocol::V5 && reason != 0 { vec![0xe0, 0x01, reason] } else { vec![0xe0, 0x00] }
}

/// A packet: first byte, remaining length, body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    encode_varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A two-byte length and the bytes (strings are at most 65,535 bytes; longer input is cut).
fn string(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An MQTT 5 property list: its length, then the properties.
fn properties(out: &mut Vec<u8>, props: &[u8]) {
    encode_varint(props.len(), out);
    out.extend_from_slice(props);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Connect, FrameHeader};

    fn decoded(bytes: &[u8]) -> Connect {
        let h = FrameHeader::parse(bytes).unwrap().unwrap();
        assert_eq!(h.frame_len(), bytes.len());
        Connect::decode(bytes, &h).unwrap()
    }

    #[test]
    fn a_connect_decodes_to_what_it_says_in_both_versions() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let spec = ConnectSpec {
                protocol,
                client_id: "dev-1".into(),
                keep_alive: 7,
                clean_start: false,
                session_expiry: (protocol == Protocol::V5).then_some(30),
                will: Some(WillSpec {
                    topic: "w/dev-1".into(),
                    payload: b"gone".to_vec(),
                    qos: 1,
                    retain: true,
                    delay_interval: (protocol == Protocol::V5).then_some(2),
                }),
                username: Some("u".into()),
                password: Some(b"secret".to_vec()),
            };
            let c = decoded(&spec.encode());
            assert_eq!(c.protocol, protocol);
            assert_eq!((c.client_id.as_str(), c.keep_alive, c.clean_start), ("dev-1", 7, false));
            let w = c.will.unwrap();
            assert_eq!((w.topic.as_str(), w.qos, w.retain, w.payload_len), ("w/dev-1", 1, true, 4));
            assert_eq!(c.username.as_deref(), Some("u"));
            assert!(c.password_present);
            if protocol == Protocol::V5 {
                assert_eq!((c.session_expiry, w.delay_interval), (Some(30), Some(2)));
            }
        }
    }

    #[test]
    fn the_minimal_packets_are_the_specifications_bytes() {
        let c = ConnectSpec::new(Protocol::V311, "a", 60).encode();
        assert_eq!(c, [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a']);
        assert_eq!(subscribe(Protocol::V311, 1, "t/#", 0), [0x82, 8, 0, 1, 0, 3, b't', b'/', b'#', 0]);
        assert_eq!(subscribe(Protocol::V5, 1, "t", 1), [0x82, 7, 0, 1, 0, 0, 1, b't', 1]);
        assert_eq!(unsubscribe(Protocol::V311, 2, "t"), [0xa2, 5, 0, 2, 0, 1, b't']);
        assert_eq!(unsubscribe(Protocol::V5, 2, "t"), [0xa2, 6, 0, 2, 0, 0, 1, b't']);
        assert_eq!(disconnect(Protocol::V5, 0x04), [0xe0, 1, 4]);
        assert_eq!(disconnect(Protocol::V311, 0x04), [0xe0, 0]);
    }
}
