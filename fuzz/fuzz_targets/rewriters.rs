//! The CONNACK Server Keep Alive rewriter and the CONNECT Keep Alive patch on arbitrary frames:
//! never panic; a re-encoded CONNACK is one well-formed frame that decodes to the new value and
//! keeps the code and the session-present flag; a patched CONNECT changes exactly two bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_chaos::codec::{Connack, Connect, FrameHeader, Protocol, connack_with_server_keep_alive};

fuzz_target!(|input: (u16, Vec<u8>)| {
    let (value, data) = input;
    let Ok(Some(h)) = FrameHeader::parse(&data) else { return };
    if data.len() < h.frame_len() {
        return;
    }
    let frame = &data[..h.frame_len()];
    if let Ok(before) = Connack::decode(frame, &h, Protocol::V5)
        && let Ok(bytes) = connack_with_server_keep_alive(frame, &h, value)
    {
        let h2 = FrameHeader::parse(&bytes).unwrap().unwrap();
        assert_eq!(h2.frame_len(), bytes.len(), "remaining length matches");
        let after = Connack::decode(&bytes, &h2, Protocol::V5).expect("a re-encoded CONNACK decodes");
        assert_eq!(after.server_keep_alive, Some(value));
        assert_eq!((after.code, after.session_present), (before.code, before.session_present));
        assert_eq!(after.assigned_client_id, before.assigned_client_id);
    }
    if let Ok(c) = Connect::decode(frame, &h) {
        let mut patched = frame.to_vec();
        let at = c.keep_alive_offset;
        patched[at..at + 2].copy_from_slice(&value.to_be_bytes());
        let again = Connect::decode(&patched, &h).expect("a patched CONNECT still decodes");
        assert_eq!(again.keep_alive, value);
        assert_eq!((again.client_id, again.will, again.protocol), (c.client_id, c.will, c.protocol));
        let changed = frame.iter().zip(&patched).filter(|(a, b)| a != b).count();
        assert!(changed <= 2);
    }
});
