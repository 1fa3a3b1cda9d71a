//! Pure MQTT codec: no I/O, no clock.
//!
//! - [`frame`] finds packet boundaries in a byte stream (fixed header + remaining length) and
//!   decides, before anything is buffered, whether a packet is small enough to inspect whole or
//!   must be streamed through.
//! - [`packet`] decodes the few packets the proxy needs fields from (CONNECT, CONNACK, PUBLISH,
//!   DISCONNECT, the filters of SUBSCRIBE and UNSUBSCRIBE) out of one complete frame, for MQTT 3.1, 3.1.1 and 5.0.
//! - [`encode`] writes the few packets a client sends (CONNECT, SUBSCRIBE, PINGREQ, DISCONNECT)
//!   for `mqtt-chaos probe`'s raw clients.
//!
//! The proxy always forwards the original bytes. Decoding produces values that point at byte
//! offsets (for example the Keep Alive of a CONNECT) so a rule can patch a field in place.

pub mod encode;
pub mod frame;
pub mod packet;

pub use frame::{FrameError, FrameHeader, Splitter, Step};
pub use packet::{
    Connack, Connect, DecodeError, Disconnect, PacketType, Protocol, Publish, TopicFilters, Will,
    connack_with_server_keep_alive, encode_varint, filter_matches, reason_name,
};
