#![cfg_attr(not(any(test, feature = "std")), no_std)]
//! The sensorgate frame format, shared by node firmware (no_std, no alloc) and the gateway.
//! (Layout documentation follows in the next commit.)

mod accumulator;
mod codec;
mod frame;
mod units;

pub use accumulator::{Decoded, FeedIter, FeedResult, FrameAccumulator};
pub use codec::{EncodeError, FrameError, checksum, decode_raw, encode, encode_raw, unframe};
pub use frame::{
    Ack, AckStatus, Body, Command, FirmwareVersion, Frame, FrameKind, FrameRef, Header, Heartbeat,
    Hello, LinkQuality, Log, LogLevel, MAX_LOG_TEXT, MAX_READINGS, MAX_RELAYED_INNER, MAX_SENSORS,
    Reading, Readings, Relayed, SensorInfo, Value,
};
pub use units::{NackReason, Quantity, Unit};

/// Re-exported so users name the same container types as the frame fields.
pub use heapless;

/// The protocol version in byte 0 of every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Length of the CRC trailer.
pub const CRC_LEN: usize = 4;
/// Largest raw (unstuffed) frame: a [`Relayed`] frame carrying a full inner frame.
pub const MAX_RAW: usize = 2 + 15 + (3 + 1 + 1 + MAX_RELAYED_INNER) + CRC_LEN;
/// Largest frame on the wire, COBS overhead and delimiter included: a buffer this size always
/// suffices for [`encode`], and `FrameAccumulator<MAX_FRAME>` accepts every valid frame.
pub const MAX_FRAME: usize = MAX_RAW + MAX_RAW / 254 + 1 + 1;

/// An accumulator that accepts every frame of this format.
pub type Accumulator = FrameAccumulator<MAX_FRAME>;
