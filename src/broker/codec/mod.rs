//! The MQTT wire codec: strict decoding of untrusted bytes and encoding of packets.
//!
//! Decoding distinguishes *need more bytes* (`Ok(None)`, nothing consumed) from *bad bytes*
//! (`Err`), and checks the announced packet size against the limit before any allocation.
//! `decode.rs` lists the spec interpretations chosen; `encode.rs` the encoder's preconditions.
//!
//! A decoded PUBLISH payload (and a CONNECT password or will payload) is a zero-copy slice of
//! the connection's read buffer, so it keeps that buffer's allocation alive: copy it
//! (`Bytes::copy_from_slice`) before keeping it for long, as a retained message or in a
//! persistent session, or the whole read chunk stays pinned.
//!
//! The codec uses nothing else from the crate: the fuzz target (`fuzz/`) compiles these files on
//! their own, with only `bytes`, `thiserror` and `serde`.

mod decode;
mod encode;
mod packet;

#[cfg(test)]
mod oracle_tests;

pub use decode::{DecodeError, decode};
pub use encode::{MAX_REMAINING_LENGTH, encode, encode_publish_head, encoded_len};
pub use packet::*;
