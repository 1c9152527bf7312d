//! The frame types: a [`Header`] and one [`Body`] per frame kind. They own their data in fixed
//! capacity containers, so the firmware needs no allocator.

use core::fmt;

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use crate::units::{NackReason, Quantity, Unit};

/// Most readings in one [`Readings`] frame.
pub const MAX_READINGS: usize = 8;
/// Most sensors a [`Hello`] announces.
pub const MAX_SENSORS: usize = 8;
/// Longest [`Log`] text in bytes (UTF-8).
pub const MAX_LOG_TEXT: usize = 48;
/// Largest inner frame a [`Relayed`] frame carries: any non-relayed frame fits (see [`crate::MAX_RAW`]).
pub const MAX_RELAYED_INNER: usize = 80;

/// Who sent a frame and where it stands in the sender's stream.
///
/// `node_id` always names the node at the far end of the gateway link: the sender of node
/// frames, the addressee of gateway frames. `boot_id` and `seq` are always the sender's own, so
/// `(node_id, boot_id, seq)` identifies a node frame for deduplication and acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Header {
    pub node_id: u32,
    /// Chosen anew at each boot (random or a flash counter), so a reset sequence is not a replay.
    pub boot_id: u32,
    /// Incremented per new frame; a retransmission repeats the original `seq`.
    pub seq: u32,
}

impl Header {
    pub const fn new(node_id: u32, boot_id: u32, seq: u32) -> Self {
        Header {
            node_id,
            boot_id,
            seq,
        }
    }

    /// The `(boot_id, seq)` pair an [`Ack`] refers to.
    pub const fn frame_ref(&self) -> FrameRef {
        FrameRef {
            boot_id: self.boot_id,
            seq: self.seq,
        }
    }
}

/// The frame kind byte. Codes are stable; new kinds are appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Readings = 2,
    Heartbeat = 3,
    Ack = 4,
    Command = 5,
    Log = 6,
    Relayed = 7,
}

impl FrameKind {
    pub const ALL: [FrameKind; 7] = [
        FrameKind::Hello,
        FrameKind::Readings,
        FrameKind::Heartbeat,
        FrameKind::Ack,
        FrameKind::Command,
        FrameKind::Log,
        FrameKind::Relayed,
    ];

    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Readings),
            3 => Some(FrameKind::Heartbeat),
            4 => Some(FrameKind::Ack),
            5 => Some(FrameKind::Command),
            6 => Some(FrameKind::Log),
            7 => Some(FrameKind::Relayed),
            _ => None,
        }
    }

    /// A stable snake_case name for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            FrameKind::Hello => "hello",
            FrameKind::Readings => "readings",
            FrameKind::Heartbeat => "heartbeat",
            FrameKind::Ack => "ack",
            FrameKind::Command => "command",
            FrameKind::Log => "log",
            FrameKind::Relayed => "relayed",
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Frame {
    pub header: Header,
    pub body: Body,
}

impl Frame {
    pub const fn new(header: Header, body: Body) -> Self {
        Frame { header, body }
    }

    pub const fn kind(&self) -> FrameKind {
        self.body.kind()
    }
}

/// The kind-specific part of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Body {
    /// Node → gateway, after boot and on [`Command::SendHello`].
    Hello(Hello),
    /// Node → gateway; the gateway answers with an [`Ack`] once the readings are durable.
    Readings(Readings),
    /// Node → gateway, periodically.
    Heartbeat(Heartbeat),
    /// Either way: gateway → node for node frames, node → gateway for [`Command`]s.
    Ack(Ack),
    /// Gateway → node.
    Command(Command),
    /// Node → gateway.
    Log(Log),
    /// Radio bridge → gateway: a node's frame, byte for byte, plus the link quality it arrived with.
    Relayed(Relayed),
}

impl Body {
    pub const fn kind(&self) -> FrameKind {
        match self {
            Body::Hello(_) => FrameKind::Hello,
            Body::Readings(_) => FrameKind::Readings,
            Body::Heartbeat(_) => FrameKind::Heartbeat,
            Body::Ack(_) => FrameKind::Ack,
            Body::Command(_) => FrameKind::Command,
            Body::Log(_) => FrameKind::Log,
            Body::Relayed(_) => FrameKind::Relayed,
        }
    }
}

/// A firmware version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FirmwareVersion {
    pub major: u8,
    pub minor: u8,
    pub patch: u8,
}

impl fmt::Display for FirmwareVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// One sensor channel a node reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SensorInfo {
    /// The node-local channel number that [`Reading::channel`] refers to.
    pub channel: u8,
    pub quantity: Quantity,
    pub unit: Unit,
}

/// The node announces itself: firmware and the meaning of its channels.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hello {
    pub firmware: FirmwareVersion,
    /// How often the node sends readings, in seconds (lets the gateway judge availability).
    pub report_interval_s: u32,
    pub sensors: Vec<SensorInfo, MAX_SENSORS>,
}

/// A decimal value `mantissa × 10^exponent`, so no floats travel: 21.37 °C is `(2137, -2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Value {
    pub mantissa: i32,
    pub exponent: i8,
}

impl Value {
    pub const fn new(mantissa: i32, exponent: i8) -> Self {
        Value { mantissa, exponent }
    }

    /// The value as a float, for arithmetic; use `Display` for exact text.
    pub fn to_f64(self) -> f64 {
        let mut scale = 1.0f64;
        for _ in 0..self.exponent.unsigned_abs() {
            scale *= 10.0;
        }
        if self.exponent < 0 {
            self.mantissa as f64 / scale
        } else {
            self.mantissa as f64 * scale
        }
    }
}

/// Exact decimal text without floats: `(2137, -2)` → `21.37`, `(-5, -3)` → `-0.005`, `(12, 2)` → `1200`.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut digits = [0u8; 10];
        let mut n = self.mantissa.unsigned_abs();
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        digits[..len].reverse();
        let digits = &digits[..len];
        if self.mantissa < 0 {
            f.write_str("-")?;
        }
        if self.exponent >= 0 {
            f.write_str(text(digits))?;
            if self.mantissa != 0 {
                for _ in 0..self.exponent {
                    f.write_str("0")?;
                }
            }
            return Ok(());
        }
        let frac_len = self.exponent.unsigned_abs() as usize;
        if len > frac_len {
            f.write_str(text(&digits[..len - frac_len]))?;
            f.write_str(".")?;
            f.write_str(text(&digits[len - frac_len..]))
        } else {
            f.write_str("0.")?;
            for _ in 0..frac_len - len {
                f.write_str("0")?;
            }
            f.write_str(text(digits))
        }
    }
}

/// ASCII digits as text (never fails for the digit buffers above).
fn text(digits: &[u8]) -> &str {
    core::str::from_utf8(digits).unwrap_or("")
}

/// One measurement on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Reading {
    pub channel: u8,
    pub value: Value,
}

impl Reading {
    pub const fn new(channel: u8, mantissa: i32, exponent: i8) -> Self {
        Reading {
            channel,
            value: Value::new(mantissa, exponent),
        }
    }
}

/// One or more readings taken together.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Readings {
    pub readings: Vec<Reading, MAX_READINGS>,
}

impl Readings {
    /// Readings from a slice; `None` if it holds more than [`MAX_READINGS`].
    pub fn from_slice(readings: &[Reading]) -> Option<Self> {
        Vec::from_slice(readings)
            .ok()
            .map(|readings| Readings { readings })
    }
}

/// Node health, sent periodically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Heartbeat {
    pub battery_mv: u16,
    pub uptime_s: u32,
    /// Readings the node discarded since boot (e.g. retransmit queue full).
    pub readings_dropped: u32,
}

/// Names a frame by its sender's `(boot_id, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameRef {
    pub boot_id: u32,
    pub seq: u32,
}

/// Positive or negative acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AckStatus {
    /// Gateway: the frame is durable and the node may forget it. Node: the command was carried out.
    Accepted,
    Rejected(NackReason),
}

/// Acknowledges the frame `of` sent by the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ack {
    pub of: FrameRef,
    pub status: AckStatus,
}

impl Ack {
    pub const fn accepted(of: FrameRef) -> Self {
        Ack {
            of,
            status: AckStatus::Accepted,
        }
    }

    pub const fn rejected(of: FrameRef, reason: NackReason) -> Self {
        Ack {
            of,
            status: AckStatus::Rejected(reason),
        }
    }
}

/// Gateway → node requests. New commands are appended; a node that cannot decode one answers
/// `Ack` `Rejected(Unsupported)` using the header from [`crate::FrameError::Body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Command {
    /// Send readings every `seconds`.
    SetReportInterval {
        seconds: u32,
    },
    /// Blink the LED for `seconds`, so a person can find the node.
    Identify {
        seconds: u16,
    },
    Reboot,
    /// Send a `Hello` now (the gateway lost or never saw it).
    SendHello,
}

/// Log severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// A short log line from the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Log {
    pub level: LogLevel,
    pub text: String<MAX_LOG_TEXT>,
}

impl Log {
    /// A log line, cut at a character boundary to at most [`MAX_LOG_TEXT`] bytes.
    pub fn new(level: LogLevel, text: &str) -> Self {
        let mut end = text.len().min(MAX_LOG_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut s = String::new();
        // Cannot fail: `end <= MAX_LOG_TEXT`.
        let _ = s.push_str(&text[..end]);
        Log { level, text: s }
    }
}

/// Link quality measured by a radio bridge for the frame it relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LinkQuality {
    pub rssi_dbm: i16,
    pub snr_db: i8,
}

/// A node frame relayed by a radio bridge. `inner` is the node's *raw* frame (header, body and
/// its own CRC, COBS removed) exactly as received: the bridge never decodes or re-encodes it,
/// and the node's CRC still protects it end to end. The outer header is the bridge's own.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Relayed {
    pub link: LinkQuality,
    pub inner: Vec<u8, MAX_RELAYED_INNER>,
}

impl Relayed {
    /// Wraps a raw inner frame (as from [`crate::unframe`]); `None` if it exceeds [`MAX_RELAYED_INNER`].
    pub fn new(link: LinkQuality, raw_inner: &[u8]) -> Option<Self> {
        Vec::from_slice(raw_inner)
            .ok()
            .map(|inner| Relayed { link, inner })
    }

    /// Decodes the relayed node frame, checking its own CRC.
    pub fn inner_frame(&self) -> Result<Frame, crate::FrameError> {
        crate::decode_raw(&self.inner)
    }
}
