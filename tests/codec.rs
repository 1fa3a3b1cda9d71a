//! Codec tests: annotated byte vectors for every packet type in MQTT 3.1, 3.1.1 and 5.0, and
//! property tests for framing under arbitrary chunking and arbitrary bytes.

use mqtt_chaos::codec::{
    Connack, Connect, Disconnect, FrameHeader, PacketType, Protocol, Publish, Splitter, Step, TopicFilters,
    filter_matches, reason_name,
};
use proptest::prelude::*;

fn header(frame: &[u8]) -> FrameHeader {
    FrameHeader::parse(frame).unwrap().unwrap()
}

fn connect(frame: &[u8]) -> Connect {
    let h = header(frame);
    assert_eq!((h.packet_type, h.frame_len()), (PacketType::Connect, frame.len()));
    Connect::decode(frame, &h).unwrap()
}

#[test]
fn mqtt31_connect() {
    #[rustfmt::skip]
    let frame = [
        0x10, 20,                                   // CONNECT, remaining length 20
        0, 6, b'M', b'Q', b'I', b's', b'd', b'p',   // protocol name "MQIsdp"
        3,                                          // level 3 (MQTT 3.1)
        0x02,                                       // clean session
        0x00, 0x3c,                                 // Keep Alive 60
        0, 6, b'd', b'e', b'v', b'-', b'3', b'1',   // client id
    ];
    let c = connect(&frame);
    assert_eq!((c.protocol, c.keep_alive, c.keep_alive_offset), (Protocol::V31, 60, 12));
    assert_eq!(&frame[c.keep_alive_offset..c.keep_alive_offset + 2], &[0x00, 0x3c]);
    assert_eq!(c.client_id, "dev-31");
    assert!(c.clean_start && c.will.is_none() && c.username.is_none() && !c.password_present);
}

#[test]
fn mqtt311_connect_with_will_username_and_password() {
    #[rustfmt::skip]
    let frame = [
        0x10, 38,
        0, 4, b'M', b'Q', b'T', b'T', 4,            // "MQTT" level 4
        0xf6,                                       // user, password, will retain, will QoS 2, will, clean
        0x00, 0x05,                                 // Keep Alive 5
        0, 2, b'c', b'1',                           // client id
        0, 4, b'w', b'/', b'c', b'1',               // will topic
        0, 7, b'o', b'f', b'f', b'l', b'i', b'n', b'e', // will payload
        0, 1, b'u',                                 // username
        0, 4, b's', b'3', b'c', b'r',               // password
    ];
    let c = connect(&frame);
    assert_eq!((c.protocol, c.keep_alive, c.keep_alive_offset), (Protocol::V311, 5, 10));
    let will = c.will.clone().unwrap();
    assert_eq!((will.topic.as_str(), will.qos, will.retain, will.payload_len), ("w/c1", 2, true, 7));
    assert_eq!(will.delay_interval, None);
    assert_eq!(c.username.as_deref(), Some("u"));
    assert!(c.password_present);
    assert!(!format!("{c:?}").contains("s3cr"), "the password is not kept");
}

#[test]
fn mqtt5_connect_with_every_connect_and_will_property() {
    #[rustfmt::skip]
    let props = [
        0x11, 0, 0, 0x0e, 0x10,                     // Session Expiry Interval 3600
        0x21, 0, 20,                                // Receive Maximum 20
        0x27, 0, 0, 0x10, 0,                        // Maximum Packet Size 4096
        0x22, 0, 8,                                 // Topic Alias Maximum 8
        0x19, 1,                                    // Request Response Information
        0x17, 0,                                    // Request Problem Information
        0x26, 0, 1, b'k', 0, 1, b'v',               // User Property k=v
        0x15, 0, 4, b'S', b'C', b'R', b'A',         // Authentication Method
        0x16, 0, 2, 1, 2,                           // Authentication Data
    ];
    #[rustfmt::skip]
    let will_props = [
        0x18, 0, 0, 0, 30,                          // Will Delay Interval 30
        0x01, 1,                                    // Payload Format Indicator
        0x02, 0, 0, 0, 60,                          // Message Expiry Interval
        0x03, 0, 4, b't', b'e', b'x', b't',         // Content Type
        0x08, 0, 1, b'r',                           // Response Topic
        0x09, 0, 1, 9,                              // Correlation Data
        0x26, 0, 1, b'a', 0, 1, b'b',               // User Property
    ];
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x0c, 0x00, 0x0a]; // will QoS 1, will, level 5
    body.push(props.len() as u8);
    body.extend(props);
    body.extend([0, 3, b'v', b'5', b'c']);
    body.push(will_props.len() as u8);
    body.extend(will_props);
    body.extend([0, 3, b'l', b'w', b't', 0, 1, b'x']);
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend(body);

    let c = connect(&frame);
    assert_eq!((c.protocol, c.keep_alive, c.keep_alive_offset), (Protocol::V5, 10, 10));
    assert!(!c.clean_start);
    assert_eq!(
        (c.session_expiry, c.receive_maximum, c.maximum_packet_size),
        (Some(3600), Some(20), Some(4096))
    );
    assert_eq!(c.client_id, "v5c");
    let will = c.will.unwrap();
    assert_eq!((will.topic.as_str(), will.qos, will.delay_interval), ("lwt", 1, Some(30)));
}

#[test]
fn connect_errors_are_specific() {
    let unknown = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'X', 4, 0x02, 0, 60, 0, 0];
    let e = Connect::decode(&unknown, &header(&unknown)).unwrap_err();
    assert_eq!(e.to_string(), "unknown protocol name \"MQTX\" with level 4");
    let level6 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 0];
    assert!(Connect::decode(&level6, &header(&level6)).unwrap_err().to_string().contains("level 6"));
    let truncated = [0x10, 8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    let e = Connect::decode(&truncated, &header(&truncated)).unwrap_err();
    assert_eq!(e.to_string(), "CONNECT is truncated: needed 2 more bytes at offset 10");
    let reserved = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 0];
    assert!(Connect::decode(&reserved, &header(&reserved)).unwrap_err().to_string().contains("reserved"));
    let bad_prop = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 1, 0x7f, 0, 0];
    let bad_prop = &bad_prop[..15];
    let e = Connect::decode(bad_prop, &header(bad_prop)).unwrap_err();
    assert_eq!(e.to_string(), "CONNECT has unknown property identifier 0x7f");
}

#[test]
fn connack_in_every_version() {
    let v4 = [0x20, 2, 0x01, 0x05]; // session present, return code 5 (not authorized)
    let c = Connack::decode(&v4, &header(&v4), Protocol::V311).unwrap();
    assert_eq!((c.session_present, c.code, c.server_keep_alive), (true, 5, None));
    let v31 = [0x20, 2, 0x00, 0x00];
    assert_eq!(Connack::decode(&v31, &header(&v31), Protocol::V31).unwrap().code, 0);

    #[rustfmt::skip]
    let v5 = [
        0x20, 16, 0x00, 0x00, 13,
        0x13, 0, 20,                                // Server Keep Alive 20
        0x12, 0, 3, b'a', b'i', b'd',               // Assigned Client Identifier
        0x24, 1,                                    // Maximum QoS 1
        0x25, 0,                                    // Retain Available 0
    ];
    let c = Connack::decode(&v5, &header(&v5), Protocol::V5).unwrap();
    assert_eq!((c.server_keep_alive, c.assigned_client_id.as_deref()), (Some(20), Some("aid")));
    // A 5.0 CONNACK without properties at all (some brokers send 2 bytes on refusal).
    let bare = [0x20, 2, 0x00, 0x87];
    assert_eq!(Connack::decode(&bare, &header(&bare), Protocol::V5).unwrap().code, 0x87);
}

#[test]
fn disconnect_in_every_form() {
    let d = |frame: &[u8], p| Disconnect::decode(frame, &header(frame), p).unwrap().reason;
    assert_eq!(d(&[0xe0, 0x00], Protocol::V311), None);
    assert_eq!(d(&[0xe0, 0x00], Protocol::V31), None);
    assert_eq!(d(&[0xe0, 0x00], Protocol::V5), Some(0x00), "e0 00: normal disconnection");
    assert_eq!(d(&[0xe0, 0x01, 0x8e], Protocol::V5), Some(0x8e), "e0 01 8e: no properties");
    assert_eq!(d(&[0xe0, 0x02, 0x8d, 0x00], Protocol::V5), Some(0x8d));
    assert_eq!(d(&[0xe0, 0x06, 0x04, 0x04, 0x1f, 0, 1, b'x'], Protocol::V5), Some(0x04));
    assert_eq!(reason_name(0x8d), "keep_alive_timeout");
    assert_eq!(reason_name(0x8e), "session_taken_over");
    assert_eq!(reason_name(0x42), "other");
}

#[test]
fn publish_in_every_version_and_qos() {
    let p = |frame: &[u8], proto| Publish::decode(frame, &header(frame), proto).unwrap();
    let q0 = p(&[0x31, 5, 0, 1, b't', b'h', b'i'], Protocol::V311);
    assert_eq!((q0.topic.as_str(), q0.qos, q0.retain, q0.payload_len), ("t", 0, true, 2));
    let q1 = p(&[0x3a, 6, 0, 1, b't', 0, 7, b'x'], Protocol::V31); // DUP, QoS 1
    assert_eq!((q1.qos, q1.dup, q1.payload_len), (1, true, 1));
    let q2 = p(&[0x34, 9, 0, 0, 0, 9, 3, 0x23, 0, 4, b'z'], Protocol::V5); // empty topic + alias 4
    assert_eq!((q2.topic.as_str(), q2.qos, q2.topic_alias, q2.payload_len), ("", 2, Some(4), 1));
    let bad = [0x36, 3, 0, 1, b't'];
    assert!(Publish::decode(&bad, &header(&bad), Protocol::V311).is_err(), "QoS 3 is invalid");
}

#[test]
fn subscribe_and_unsubscribe_filters_in_both_versions() {
    let f = |frame: &[u8], proto, sub| TopicFilters::decode(frame, &header(frame), proto, sub).map(|f| f.0);
    let two = [0x82, 0x0b, 0, 7, 0, 2, b'a', b'/', 1, 0, 1, b'#', 0];
    assert_eq!(f(&two, Protocol::V311, true).unwrap(), ["a/", "#"].map(String::from));
    // MQTT 5: a Subscription Identifier property (0x0b) before the list.
    let v5 = [0x82, 0x09, 0, 7, 2, 0x0b, 5, 0, 1, b'x', 0x10];
    assert_eq!(f(&v5, Protocol::V5, true).unwrap(), ["x"]);
    let unsub = [0xa2, 0x06, 0, 7, 0, 0, 1, b'y'];
    assert_eq!(f(&unsub, Protocol::V5, false).unwrap(), ["y"]);
    let empty = [0x82, 0x02, 0, 7];
    assert!(f(&empty, Protocol::V311, true).is_err(), "a SUBSCRIBE needs a filter");
    let cut = [0x82, 0x04, 0, 7, 0, 5];
    assert!(f(&cut, Protocol::V311, true).is_err());
}

#[test]
fn topic_filters_match_as_the_specification_says() {
    for (filter, topic, expected) in [
        ("a/b", "a/b", true),
        ("a/b", "a/c", false),
        ("a/+", "a/b", true),
        ("a/+", "a/b/c", false),
        ("a/+", "a/", true),
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("#", "a/b", true),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("+/+", "/x", true),
        ("$share/g/dev/+", "dev/1", true),
        ("$share/g", "dev/1", false),
        ("a/b", "a/b/c", false),
    ] {
        assert_eq!(filter_matches(filter, topic), expected, "{filter} ~ {topic}");
    }
}

#[test]
fn every_packet_type_frames_with_its_name() {
    #[rustfmt::skip]
    let frames: [(&[u8], &str); 15] = [
        (&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0], "CONNECT"),
        (&[0x20, 0x02, 0, 0], "CONNACK"),
        (&[0x30, 0x03, 0, 1, b't'], "PUBLISH"),
        (&[0x40, 0x02, 0, 1], "PUBACK"),
        (&[0x50, 0x02, 0, 1], "PUBREC"),
        (&[0x62, 0x02, 0, 1], "PUBREL"),
        (&[0x70, 0x02, 0, 1], "PUBCOMP"),
        (&[0x82, 0x06, 0, 1, 0, 1, b'#', 0], "SUBSCRIBE"),
        (&[0x90, 0x03, 0, 1, 0], "SUBACK"),
        (&[0xa2, 0x05, 0, 1, 0, 1, b'#'], "UNSUBSCRIBE"),
        (&[0xb0, 0x02, 0, 1], "UNSUBACK"),
        (&[0xc0, 0x00], "PINGREQ"),
        (&[0xd0, 0x00], "PINGRESP"),
        (&[0xe0, 0x00], "DISCONNECT"),
        (&[0xf0, 0x02, 0x18, 0x00], "AUTH"),
    ];
    let stream: Vec<u8> = frames.iter().flat_map(|(f, _)| f.iter().copied()).collect();
    let mut splitter = Splitter::new(1024);
    let mut rest = &stream[..];
    for (frame, name) in frames {
        let Step::Frame(h) = splitter.step(rest) else { panic!("{name} did not frame") };
        assert_eq!((h.packet_type.name(), &rest[..h.frame_len()]), (name, frame));
        assert_eq!(PacketType::from_name(&name.to_lowercase()), Some(h.packet_type));
        rest = &rest[h.frame_len()..];
    }
    assert!(rest.is_empty());
}

// ---- properties -----------------------------------------------------------------------

/// Encodes a remaining length, optionally padded to a non-minimal width.
fn encode_len(mut len: usize, min_bytes: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 || out.len() + 1 < min_bytes {
            b |= 0x80;
        }
        out.push(b);
        if b & 0x80 == 0 {
            return out;
        }
    }
}

fn arb_packet() -> impl Strategy<Value = Vec<u8>> {
    (1u8..=15, 0u8..16, prop_oneof![4 => 0usize..64, 1 => 64usize..3000], 1usize..=4).prop_map(
        |(t, flags, len, width)| {
            let mut p = vec![(t << 4) | flags];
            p.extend(encode_len(len, width));
            p.extend((0..len).map(|i| (i * 31 + len) as u8));
            p
        },
    )
}

/// Feeds `chunks` to a splitter as a pump does, and rebuilds each packet's bytes.
fn reframe(chunks: &[&[u8]], max_buffered: usize) -> Vec<Vec<u8>> {
    let mut splitter = Splitter::new(max_buffered);
    let mut buf: Vec<u8> = Vec::new();
    let mut packets: Vec<Vec<u8>> = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            match splitter.step(&buf[pos..]) {
                Step::Frame(h) => {
                    packets.push(buf[pos..pos + h.frame_len()].to_vec());
                    pos += h.frame_len();
                }
                Step::StreamHead(h) => {
                    packets.push(buf[pos..pos + usize::from(h.header_len)].to_vec());
                    pos += usize::from(h.header_len);
                }
                Step::StreamBody(n) => {
                    packets.last_mut().unwrap().extend_from_slice(&buf[pos..pos + n]);
                    pos += n;
                }
                Step::NeedMore { needed } => {
                    assert!(needed > buf.len() - pos, "asked for {needed} with {} buffered", buf.len() - pos);
                    let limit = match buf.get(pos).and_then(|b| PacketType::from_nibble(b >> 4)) {
                        Some(t) => splitter.limit_for(t),
                        None => max_buffered.max(5),
                    };
                    assert!(needed <= limit, "would buffer {needed} > {limit}");
                    break;
                }
                Step::Malformed(e) => panic!("valid stream reported malformed: {e}"),
            }
        }
        buf.drain(..pos);
    }
    assert!(buf.is_empty() && !splitter.is_streaming(), "bytes left over");
    packets
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_valid_stream_cut_anywhere_reframes_to_the_same_packets(
        packets in prop::collection::vec(arb_packet(), 1..20),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        max_buffered in prop_oneof![Just(5usize), 6usize..200, Just(256 * 1024)],
    ) {
        let stream = packets.concat();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.extend([0, stream.len()]);
        points.sort_unstable();
        points.dedup();
        let chunks: Vec<&[u8]> = points.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
        prop_assert_eq!(reframe(&chunks, max_buffered), packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_splitter_or_the_decoders(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        max_buffered in 5usize..600,
    ) {
        let mut splitter = Splitter::new(max_buffered);
        let mut rest = &bytes[..];
        loop {
            match splitter.step(rest) {
                Step::Frame(h) => {
                    let frame = &rest[..h.frame_len()];
                    let _ = Connect::decode(frame, &h);
                    for p in [Protocol::V31, Protocol::V311, Protocol::V5] {
                        let _ = Connack::decode(frame, &h, p);
                        let _ = Disconnect::decode(frame, &h, p);
                        let _ = Publish::decode(frame, &h, p);
                        let _ = TopicFilters::decode(frame, &h, p, true);
                        let _ = TopicFilters::decode(frame, &h, p, false);
                    }
                    rest = &rest[h.frame_len()..];
                }
                Step::StreamHead(h) => rest = &rest[usize::from(h.header_len)..],
                Step::StreamBody(n) => rest = &rest[n..],
                Step::NeedMore { .. } | Step::Malformed(_) => break,
            }
        }
    }

    #[test]
    fn decoders_never_panic_on_any_body(
        t in 1u8..=15, flags in 0u8..16, body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut frame = vec![(t << 4) | flags];
        frame.extend(encode_len(body.len(), 1));
        frame.extend(&body);
        let h = header(&frame);
        let _ = Connect::decode(&frame, &h);
        for p in [Protocol::V31, Protocol::V311, Protocol::V5] {
            let _ = Connack::decode(&frame, &h, p);
            let _ = Disconnect::decode(&frame, &h, p);
            let _ = Publish::decode(&frame, &h, p);
            let _ = TopicFilters::decode(&frame, &h, p, true);
            let _ = TopicFilters::decode(&frame, &h, p, false);
        }
    }
}
