//! Decoders: bytes from a serial port in, [`Observation`]s and counted errors out.
//!
//! Every byte fed to a decoder ends up in exactly one [`Decoded`] outcome or is still pending
//! inside it (design invariant 4), so a port's byte counter always equals the sum of what its
//! outcomes account for plus [`Decoder::pending`]. Decoders never panic on input.

mod lines;
mod mysensors;
mod sensorgate;
mod text;

use std::fmt;

pub use lines::{LinesDecoder, NodeSource};
pub use mysensors::MySensorsDecoder;
pub use sensorgate::SensorgateDecoder;

/// A node's identity as decoders report it: the decimal id for numeric protocols, the name for
/// text ones. Stable across reboots, used in topics and in the node registry.
pub type NodeId = String;

/// Identifies one node frame for deduplication and acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FrameId {
    pub boot_id: u32,
    pub seq: u32,
}

/// Radio link quality a bridge reported with a relayed frame.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkQuality {
    pub rssi_dbm: i32,
    pub snr_db: i8,
}

/// One sensor value.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The sensor's channel on its node (MySensors child id, frame channel, key index for lines).
    pub channel: u16,
    /// What is measured (`temperature`, `humidity`, or a `lines` key). `None` when the frame
    /// carries only a channel and the node has not said what it is yet (registry fills it in).
    pub quantity: Option<String>,
    pub unit: Option<String>,
    pub value: f64,
    /// Decimal places the sender gave the value, when it says (keeps `21.50` as sent).
    pub decimals: Option<u8>,
}

/// A sensor a node announced (frame `Hello`, MySensors presentation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SensorInfo {
    pub channel: u16,
    pub quantity: String,
    pub unit: Option<String>,
    /// A human name the node gave it (MySensors presentation description).
    pub name: Option<String>,
}

/// What a decoded message says.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Readings(Vec<Reading>),
    /// The node announced itself; `sensors` replaces what the registry knew when `complete`.
    Hello {
        firmware: Option<String>,
        sensors: Vec<SensorInfo>,
        complete: bool,
        interval_s: Option<u32>,
    },
    Heartbeat {
        battery_mv: Option<u32>,
        battery_pct: Option<u8>,
        uptime_s: Option<u32>,
        dropped: Option<u32>,
    },
    Log {
        level: String,
        text: String,
    },
    /// The node acknowledged a command the gateway sent (`accepted` false for a refusal,
    /// with the node's reason when it gives one).
    CommandAck {
        of: FrameId,
        accepted: bool,
        reason: Option<String>,
    },
}

/// One message from one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub node: NodeId,
    /// Present for protocols that number their frames (the sensorgate frames).
    pub frame: Option<FrameId>,
    pub link: Option<LinkQuality>,
    pub body: Body,
}

/// Classes of bad input, each a counter per port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Corrupted in transit: checksum mismatch.
    Crc,
    /// Not delimited or stuffed correctly: COBS errors, truncated, oversize, unterminated lines.
    Framing,
    /// Well transmitted but not understood: unknown version/kind, bad fields, unparsable text.
    Undecodable,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Crc => "crc",
            Fault::Framing => "framing",
            Fault::Undecodable => "undecodable",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One outcome of feeding bytes, with the number of bytes it accounts for.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Observation {
        obs: Observation,
        bytes: usize,
    },
    Error {
        fault: Fault,
        detail: String,
        bytes: usize,
    },
    /// Bytes that carry nothing and are not an error: blank lines, comments, keep-alive
    /// delimiters, messages for other parties.
    Ignored {
        bytes: usize,
    },
}

impl Decoded {
    pub fn bytes(&self) -> usize {
        match self {
            Decoded::Observation { bytes, .. }
            | Decoded::Error { bytes, .. }
            | Decoded::Ignored { bytes } => *bytes,
        }
    }
}

/// A command for a node, from MQTT (`sensorgate/<gateway>/nodes/<node>/set/<command>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeCommand {
    /// `interval`, payload: seconds between readings.
    SetInterval(u32),
    /// `identify`, payload: seconds to blink the LED (default 5).
    Identify(u16),
    /// `reboot`
    Reboot,
    /// `hello`: ask the node to announce its sensors again.
    SendHello,
}

impl NodeCommand {
    /// The name used in command topics.
    pub fn name(self) -> &'static str {
        match self {
            NodeCommand::SetInterval(_) => "interval",
            NodeCommand::Identify(_) => "identify",
            NodeCommand::Reboot => "reboot",
            NodeCommand::SendHello => "hello",
        }
    }

    /// Parses a command topic's last level and its payload.
    pub fn parse(name: &str, payload: &str) -> Result<NodeCommand, String> {
        let payload = payload.trim();
        match name {
            "interval" => payload
                .parse::<u32>()
                .ok()
                .filter(|&s| s > 0)
                .map(NodeCommand::SetInterval)
                .ok_or_else(|| {
                    format!("`interval` takes a number of seconds above 0, not `{payload}`")
                }),
            "identify" if payload.is_empty() => Ok(NodeCommand::Identify(5)),
            "identify" => payload
                .parse::<u16>()
                .map(NodeCommand::Identify)
                .map_err(|_| format!("`identify` takes a number of seconds, not `{payload}`")),
            "reboot" => Ok(NodeCommand::Reboot),
            "hello" => Ok(NodeCommand::SendHello),
            other => Err(format!(
                "unknown command `{other}`; the commands are interval, identify, reboot, hello"
            )),
        }
    }
}

/// A serial protocol decoder. One instance per port; state is per stream.
pub trait Decoder: Send {
    /// Feeds a chunk of bytes (any split); appends outcomes to `out`.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Decoded>);
    /// The stream ended (port closed): account for a partial message as an error.
    fn finish(&mut self, out: &mut Vec<Decoded>);
    /// Bytes held for an incomplete message.
    fn pending(&self) -> usize;
    /// The bytes that acknowledge `frame` to `node`, for protocols with acknowledgements.
    fn ack(&self, _node: &str, _frame: FrameId) -> Option<Vec<u8>> {
        None
    }
    /// The bytes that carry `command` to `node`, numbered `id`, for protocols with commands.
    fn command(&self, _node: &str, _id: FrameId, _command: NodeCommand) -> Option<Vec<u8>> {
        None
    }
}

/// The protocols a `[[port]]` can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Sensorgate,
    Lines,
    Mysensors,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Sensorgate => "sensorgate",
            Protocol::Lines => "lines",
            Protocol::Mysensors => "mysensors",
        }
    }
}
