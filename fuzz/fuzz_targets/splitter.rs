//! The frame splitter on arbitrary bytes cut at arbitrary points: never panics, never asks for
//! more than it may buffer, and yields the same steps whatever the chunking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_chaos::codec::{Splitter, Step};

/// Feeds `data` in chunks of `chunk` bytes the way a pump does; returns the byte ranges of every
/// step, and where it stopped (malformed or out of bytes).
fn split(data: &[u8], chunk: usize, max_buffered: usize) -> (Vec<(usize, usize, &'static str)>, usize) {
    let mut s = Splitter::new(max_buffered);
    let mut steps = Vec::new();
    let (mut start, mut end) = (0, 0);
    while end < data.len() {
        end = (end + chunk).min(data.len());
        loop {
            match s.step(&data[start..end]) {
                Step::Frame(h) => {
                    steps.push((start, h.frame_len(), "frame"));
                    start += h.frame_len();
                }
                Step::StreamHead(h) => {
                    steps.push((start, usize::from(h.header_len), "head"));
                    start += usize::from(h.header_len);
                }
                Step::StreamBody(n) => {
                    assert!(n >= 1 && start + n <= end);
                    start += n; // body bytes: their grouping depends on the chunking
                }
                Step::NeedMore { needed } => {
                    assert!(needed > end - start && needed <= max_buffered.max(5));
                    break;
                }
                Step::Malformed(_) => return (steps, start),
            }
        }
    }
    (steps, start)
}

fuzz_target!(|input: (u8, u16, Vec<u8>)| {
    let (chunk, max_buffered, data) = input;
    let max_buffered = usize::from(max_buffered).max(5);
    let whole = split(&data, data.len().max(1), max_buffered);
    let chunked = split(&data, usize::from(chunk).max(1), max_buffered);
    assert_eq!(whole, chunked, "framing depends on chunking");
});
