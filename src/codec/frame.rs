//! Finding packet boundaries in an MQTT byte stream.
//!
//! An MQTT packet starts with a fixed header: one byte of type and flags, then the remaining
//! length as a variable byte integer of one to four bytes. [`FrameHeader::parse`] reads it from
//! the front of a buffer; [`Splitter`] walks a stream of arbitrarily chunked bytes and tells the
//! caller, step by step, what lies at the front of its buffer: a complete frame, the head of a
//! frame too large to buffer (whose body is then passed through as it arrives), or that more
//! bytes are needed. The size decision is made from the header alone, before buffering.

use super::packet::PacketType;

/// Largest value a four-byte variable byte integer can hold (MQTT 1.5.5).
pub const MAX_REMAINING_LENGTH: u32 = 268_435_455;

/// Why a byte stream stopped being MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved packet type 0 in fixed header byte {0:#04x}")]
    ReservedType(u8),
    #[error("remaining length is longer than 4 bytes")]
    RemainingLengthTooLong,
    /// A CONNECT or CONNACK over the limit for packets that are always decoded whole.
    #[error(
        "{packet_type} of {len} bytes is over the {limit}-byte limit for CONNECT and CONNACK (--max-connect-packet)"
    )]
    HandshakeTooLarge { packet_type: PacketType, len: usize, limit: usize },
}

/// Default limit for a CONNECT or CONNACK, which are always buffered and decoded whole.
pub const DEFAULT_MAX_HANDSHAKE: usize = 1024 * 1024;

/// The fixed header of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub packet_type: PacketType,
    /// The low nibble of the first byte (PUBLISH: DUP, QoS, RETAIN).
    pub flags: u8,
    /// Fixed header length in bytes: 2 to 5.
    pub header_len: u8,
    pub remaining_len: u32,
}

impl FrameHeader {
    /// Reads a fixed header from the front of `buf`; `Ok(None)` when `buf` ends inside it.
    ///
    /// Over-long (non-minimal) remaining-length encodings are accepted: the proxy is transparent
    /// and leaves it to the broker to judge them.
    pub fn parse(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let packet_type = PacketType::from_nibble(first >> 4).ok_or(FrameError::ReservedType(first))?;
        let mut remaining_len: u32 = 0;
        for i in 0..4 {
            let Some(&byte) = buf.get(1 + i) else {
                return Ok(None);
            };
            remaining_len |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(Some(FrameHeader {
                    packet_type,
                    flags: first & 0x0f,
                    header_len: 2 + i as u8,
                    remaining_len,
                }));
            }
        }
        Err(FrameError::RemainingLengthTooLong)
    }

    /// Total size of the packet: fixed header plus remaining length.
    pub fn frame_len(&self) -> usize {
        usize::from(self.header_len) + self.remaining_len as usize
    }
}

/// What lies at the front of the caller's buffer. After each step the caller consumes exactly
/// the bytes the step names, then asks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A complete packet of `header.frame_len()` bytes.
    Frame(FrameHeader),
    /// The fixed header (`header.header_len` bytes) of a packet larger than the inspection
    /// limit. Its body follows as [`Step::StreamBody`] steps.
    StreamHead(FrameHeader),
    /// `n` bytes (at least 1) of the body of the packet being streamed.
    StreamBody(usize),
    /// The buffer ends inside a packet; `needed` is how many bytes from the front of the buffer
    /// would complete the next step.
    NeedMore { needed: usize },
    /// The stream is not MQTT from this point on.
    Malformed(FrameError),
}

/// Splits a byte stream into packets, whatever its chunking.
#[derive(Debug, Clone)]
pub struct Splitter {
    max_buffered: usize,
    /// CONNECT and CONNACK are never streamed: the proxy must decode them (client id, Keep
    /// Alive, Will) to match rules and measure. Larger ones than this are malformed.
    max_handshake: usize,
    /// Body bytes still to come of the packet being streamed (0 when not streaming).
    streaming: u32,
}

impl Splitter {
    /// Packets up to `max_buffered` bytes (header included) are yielded whole; larger ones are
    /// streamed. `max_buffered` is at least 5 so any fixed header fits.
    pub fn new(max_buffered: usize) -> Self {
        Splitter::with_limits(max_buffered, DEFAULT_MAX_HANDSHAKE.max(max_buffered))
    }

    /// Like [`Splitter::new`], with CONNECT and CONNACK buffered whole up to `max_handshake`
    /// bytes whatever `max_buffered` is, and malformed beyond.
    pub fn with_limits(max_buffered: usize, max_handshake: usize) -> Self {
        Splitter { max_buffered: max_buffered.max(5), max_handshake: max_handshake.max(5), streaming: 0 }
    }

    /// The largest packet of type `t` that is yielded whole.
    pub fn limit_for(&self, t: PacketType) -> usize {
        match t {
            PacketType::Connect | PacketType::Connack => self.max_handshake,
            _ => self.max_buffered,
        }
    }

    /// Whether a streamed packet's body is in progress.
    pub fn is_streaming(&self) -> bool {
        self.streaming > 0
    }

    /// Tells what is at the front of `buf` and advances the splitter's own state as if the
    /// caller consumed what the step names.
    pub fn step(&mut self, buf: &[u8]) -> Step {
        let step = self.peek(buf);
        self.advance(&step);
        step
    }

    /// Tells what is at the front of `buf` without changing state; [`Splitter::advance`] then
    /// commits the step. Lets a caller decline to start streaming a packet for now.
    pub fn peek(&self, buf: &[u8]) -> Step {
        if self.streaming > 0 {
            if buf.is_empty() {
                return Step::NeedMore { needed: 1 };
            }
            return Step::StreamBody(buf.len().min(self.streaming as usize));
        }
        match FrameHeader::parse(buf) {
            Err(e) => Step::Malformed(e),
            Ok(None) => Step::NeedMore { needed: needed_for_header(buf) },
            Ok(Some(h)) if h.frame_len() > self.limit_for(h.packet_type) => match h.packet_type {
                t @ (PacketType::Connect | PacketType::Connack) => {
                    Step::Malformed(FrameError::HandshakeTooLarge {
                        packet_type: t,
                        len: h.frame_len(),
                        limit: self.max_handshake,
                    })
                }
                _ => Step::StreamHead(h),
            },
            Ok(Some(h)) if buf.len() >= h.frame_len() => Step::Frame(h),
            Ok(Some(h)) => Step::NeedMore { needed: h.frame_len() },
        }
    }

    /// Commits a step returned by [`Splitter::peek`].
    pub fn advance(&mut self, step: &Step) {
        match *step {
            Step::StreamHead(h) => self.streaming = h.remaining_len,
            Step::StreamBody(n) => self.streaming -= n as u32,
            _ => {}
        }
    }
}

/// Bytes needed to finish a fixed header that `buf` holds only the start of.
fn needed_for_header(buf: &[u8]) -> usize {
    // The header ends at the first length byte without the continuation bit; until it is seen,
    // one more byte is all we can ask for.
    buf.len() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_to_four_byte_remaining_lengths() {
        let cases: &[(&[u8], u32, u8)] = &[
            (&[0xc0, 0x00], 0, 2),
            (&[0x30, 0x7f], 127, 2),
            (&[0x30, 0x80, 0x01], 128, 3),
            (&[0x30, 0xff, 0x7f], 16_383, 3),
            (&[0x30, 0x80, 0x80, 0x01], 16_384, 4),
            (&[0x30, 0xff, 0xff, 0xff, 0x7f], MAX_REMAINING_LENGTH, 5),
        ];
        for &(bytes, len, header_len) in cases {
            let h = FrameHeader::parse(bytes).unwrap().unwrap();
            assert_eq!((h.remaining_len, h.header_len), (len, header_len), "{bytes:02x?}");
        }
    }

    #[test]
    fn accepts_non_minimal_remaining_length_encoding() {
        // 0 encoded in two bytes: the broker decides whether that is acceptable.
        let h = FrameHeader::parse(&[0xc0, 0x80, 0x00]).unwrap().unwrap();
        assert_eq!((h.remaining_len, h.header_len), (0, 3));
    }

    #[test]
    fn rejects_reserved_type_and_five_byte_length() {
        assert_eq!(FrameHeader::parse(&[0x00, 0x00]), Err(FrameError::ReservedType(0x00)));
        assert_eq!(
            FrameHeader::parse(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(FrameError::RemainingLengthTooLong)
        );
    }

    #[test]
    fn incomplete_header_asks_for_more() {
        assert_eq!(FrameHeader::parse(&[]), Ok(None));
        assert_eq!(FrameHeader::parse(&[0x30]), Ok(None));
        assert_eq!(FrameHeader::parse(&[0x30, 0x80, 0x80]), Ok(None));
    }

    #[test]
    fn splitter_yields_whole_frames_then_asks_for_the_rest() {
        let mut s = Splitter::new(1024);
        // PINGREQ, then the first 3 bytes of a 6-byte PUBLISH.
        let buf = [0xc0, 0x00, 0x30, 0x04, 0x00];
        let Step::Frame(h) = s.step(&buf) else { panic!() };
        assert_eq!((h.packet_type, h.frame_len()), (PacketType::Pingreq, 2));
        assert_eq!(s.step(&buf[2..]), Step::NeedMore { needed: 6 });
    }

    #[test]
    fn splitter_streams_packets_over_the_limit() {
        let mut s = Splitter::new(8);
        // PUBLISH with 10 bytes of remaining length: over the limit of 8.
        let buf = [0x30, 0x0a, 1, 2, 3];
        assert!(matches!(s.step(&buf), Step::StreamHead(h) if h.remaining_len == 10));
        assert_eq!(s.step(&buf[2..]), Step::StreamBody(3));
        assert!(s.is_streaming());
        assert_eq!(s.step(&[]), Step::NeedMore { needed: 1 });
        // 7 body bytes left; the buffer also holds the next packet, which must not be swallowed.
        let rest = [4, 5, 6, 7, 8, 9, 10, 0xd0, 0x00];
        assert_eq!(s.step(&rest), Step::StreamBody(7));
        assert!(!s.is_streaming());
        assert!(matches!(s.step(&rest[7..]), Step::Frame(h) if h.packet_type == PacketType::Pingresp));
    }

    #[test]
    fn connect_and_connack_are_buffered_whole_up_to_their_own_limit() {
        let mut s = Splitter::with_limits(8, 64);
        // A 20-byte CONNECT with an 8-byte limit for other packets: still one whole frame.
        let mut connect = vec![0x10, 18];
        connect.extend([0u8; 18]);
        assert_eq!(s.peek(&connect[..10]), Step::NeedMore { needed: 20 });
        assert!(matches!(s.step(&connect), Step::Frame(h) if h.frame_len() == 20));
        // Over its own limit, a CONNECT is not streamed undecoded: it is malformed.
        let big = [0x10, 100];
        assert_eq!(
            s.step(&big),
            Step::Malformed(FrameError::HandshakeTooLarge {
                packet_type: PacketType::Connect,
                len: 102,
                limit: 64
            })
        );
        assert!(matches!(s.step(&[0x20, 100]), Step::Malformed(FrameError::HandshakeTooLarge { .. })));
        assert!(matches!(s.step(&[0x30, 100]), Step::StreamHead(_)), "other packets stream");
    }

    #[test]
    fn splitter_reports_garbage() {
        let mut s = Splitter::new(1024);
        assert_eq!(s.step(&[0x0f, 0x00]), Step::Malformed(FrameError::ReservedType(0x0f)));
    }
}
