//! Every decoder on every complete frame the splitter finds in arbitrary bytes: never panics,
//! and a decoded CONNECT's Keep Alive sits at the offset it reports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_chaos::codec::{Connack, Connect, Disconnect, Protocol, Publish, Splitter, Step, TopicFilters};

fuzz_target!(|data: &[u8]| {
    let mut s = Splitter::new(64 * 1024);
    let mut rest = data;
    loop {
        match s.step(rest) {
            Step::Frame(h) => {
                let frame = &rest[..h.frame_len()];
                if let Ok(c) = Connect::decode(frame, &h) {
                    let at = c.keep_alive_offset;
                    assert_eq!(u16::from_be_bytes([frame[at], frame[at + 1]]), c.keep_alive);
                }
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
            Step::NeedMore { .. } | Step::Malformed(_) => return,
        }
    }
});
