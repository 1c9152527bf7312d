#![cfg_attr(not(any(test, feature = "std")), no_std)]
//! The sensorgate frame format, shared by node firmware (no_std, no alloc) and the gateway.
//!
//! # On the wire
//!
//! ```text
//!   ┌──────────────── COBS(raw) ────────────────┬──────┐
//!   │ code byte │ raw bytes, zeros stuffed away │ 0x00 │   one frame = stuffed raw + delimiter
//!   └───────────────────────────────────────────┴──────┘
//!
//!   raw (n bytes, n ≤ MAX_RAW = 106):
//!   0         1        2 ..                                          n-4     n-1
//!   ┌─────────┬────────┬──────────┬──────────┬──────────┬───────────┬────────────┐
//!   │ version │ kind   │ node_id  │ boot_id  │ seq      │ body      │ CRC-32     │
//!   │ u8 = 1  │ u8     │ varint   │ varint   │ varint   │ postcard, │ ISCSI, u32 │
//!   │         │        │ 1..5 B   │ 1..5 B   │ 1..5 B   │ per kind  │ LE over    │
//!   │         │        │          │          │          │           │ bytes 0..n-4│
//!   └─────────┴────────┴──────────┴──────────┴──────────┴───────────┴────────────┘
//!   varint: postcard's LEB128 (7 bits per byte, low first); signed ints are zigzagged first.
//!
//!   body by kind (postcard: structs are their fields in order, Vec/str = varint length + items,
//!   enums = varint variant index + fields, u8/i8 = one raw byte):
//!   1 Hello      fw.major u8, fw.minor u8, fw.patch u8, report_interval_s varint,
//!                n, n × (channel u8, quantity u8, unit u8)                       n ≤ 8
//!   2 Readings   n, n × (channel u8, mantissa zigzag varint, exponent i8)        n ≤ 8
//!   3 Heartbeat  battery_mv varint, uptime_s varint, readings_dropped varint
//!   4 Ack        of.boot_id varint, of.seq varint, 0 = Accepted | 1 reason u8
//!   5 Command    0 SetReportInterval seconds varint | 1 Identify seconds varint
//!                | 2 Reboot | 3 SendHello                    (new commands appended)
//!   6 Log        level (0 Error .. 4 Trace), len, UTF-8 text                   len ≤ 48
//!   7 Relayed    rssi_dbm zigzag varint, snr_db i8, len, inner raw frame       len ≤ 80
//! ```
//!
//! Sizes: a `Readings` frame with 4 readings is at most 2 + 15 + 1 + 4 × 7 + 4 = 50 raw bytes,
//! 52 on the wire (one COBS code byte, one delimiter), within a 60-byte radio payload even with
//! `u32::MAX` ids and extreme values; a typical one (small node id, seq in the thousands) is
//! about 35. [`MAX_FRAME`] (108) bounds every frame (tests `roundtrip.rs`).
//!
//! Decoding order and errors: COBS → length → CRC → version → kind → header → body, so a
//! corrupted frame is a [`FrameError::Crc`], and `UnknownVersion`/`UnknownKind`/`Body` mean a
//! well-transmitted frame this build does not understand. A new protocol version keeps byte 0
//! as the version and the CRC-32 trailer; everything between may change.
//!
//! # Who sends what
//! `node_id` names the node at the far end of the link: the sender of node frames, the
//! addressee of gateway frames. `boot_id` and `seq` are the sender's own. A node picks a new
//! `boot_id` each boot and numbers its frames with `seq`; a retransmission repeats both, so the
//! gateway dedupes on `(node_id, boot_id, seq)` and answers with `Ack { of: (boot_id, seq) }`
//! once the frame is durable. Commands are acknowledged by the node the same way.
//!
//! # Radio bridges
//! A bridge that receives a frame over radio un-stuffs it with [`unframe`] (which checks the
//! CRC) and sends [`Relayed`] `{ link: rssi/snr, inner: raw bytes }` under its own header. The
//! inner frame is never decoded or re-encoded, its own CRC still covers it end to end, and the
//! gateway reads it with [`Relayed::inner_frame`]. Every non-relayed frame (≤ 78 raw bytes) fits.
//!
//! # CRC choice: CRC-32/ISCSI (Castagnoli)
//! Catalogue name CRC-32/ISCSI: width 32, poly 0x1EDC6F41, init 0xFFFFFFFF, refin/refout true,
//! xorout 0xFFFFFFFF, check 0xE3069283. For frames of 6 to 106 bytes (48 to 848 bits):
//! - Hamming distance: every error of up to 4 bits is detected at every length up to
//!   [`MAX_RAW`], proved exhaustively in `tests/crc_distance.rs`; its ignored release-mode
//!   test (≈ 45 s) also proves every 5-bit error is detected, so HD ≥ 6 for all our lengths
//!   (consistent with Koopman's tables, HD = 6 up to 5243 bits for this polynomial).
//!   CRC-16/IBM-3740 ("CCITT-FALSE") only guarantees HD = 4 (1–3 bit errors) at these lengths.
//! - Bursts: any degree-32 CRC detects every burst of ≤ 32 bits (16 for a CRC-16), i.e. up to
//!   four consecutive corrupted bytes, the typical UART/radio failure.
//! - Random garbage: a serial port at the wrong baud rate or a hot-plug produces many junk
//!   "frames"; each passes a CRC-16 with probability 2⁻¹⁶ (1 in 65 536, reachable in an
//!   afternoon), a CRC-32 with 2⁻³². A forged reading would be published durably, so the
//!   2 extra bytes are worth it; the 4-reading frame still fits 60 bytes.
//! - Cost on the RP2040: a 1 KiB table in flash, a few µs per frame.
//!
//! # Receiving
//! [`FrameAccumulator`] takes arbitrary chunks and reports every frame or error with the number
//! of bytes it consumed, so `sum(bytes) + pending()` always equals the bytes fed (design
//! invariant 4); it resynchronises on the next 0x00 after any error.

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
