//! The MQTT wire codec: strict decoding of untrusted bytes and encoding of packets.
//!
//! Decoding distinguishes *need more bytes* (`Ok(None)`, nothing consumed) from *bad bytes*
//! (`Err`), and checks the announced packet size against the limit before any allocation.

mod decode;
mod encode;
mod packet;

pub use decode::{DecodeError, decode};
pub use encode::{MAX_REMAINING_LENGTH, encode, encode_publish_head, encoded_len};
pub use packet::*;
