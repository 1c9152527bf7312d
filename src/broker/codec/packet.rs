//! MQTT control packets as values: what the codec decodes into and encodes from.
//!
//! Shaped for MQTT 3.1.1 (protocol level 4) and 3.1 (level 3, "MQIsdp"); v5 properties will be
//! added as optional fields so the session code keeps one packet type.

use bytes::Bytes;

/// The protocol a client speaks, from CONNECT's protocol name and level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolLevel {
    /// MQTT 3.1, protocol name "MQIsdp", level 3.
    V31,
    /// MQTT 3.1.1, protocol name "MQTT", level 4.
    V311,
}

impl ProtocolLevel {
    pub fn level(self) -> u8 {
        match self {
            ProtocolLevel::V31 => 3,
            ProtocolLevel::V311 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProtocolLevel::V31 => "MQIsdp",
            ProtocolLevel::V311 => "MQTT",
        }
    }
}

/// Quality of service of a PUBLISH or a subscription.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// The will message a client leaves in CONNECT, published if it goes away without DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolLevel,
    pub clean_session: bool,
    pub keep_alive: u16,
    /// May be empty (3.1.1 only); the broker then assigns one or rejects the connection.
    pub client_id: String,
    pub will: Option<LastWill>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

/// CONNACK return codes of MQTT 3.1.1 section 3.2.2.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUsernameOrPassword = 4,
    NotAuthorized = 5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: ConnectReturnCode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Validated: UTF-8 without U+0000, non-empty, no wildcard characters.
    pub topic: String,
    /// Zero for QoS 0; non-zero otherwise.
    pub pkid: u16,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    /// Filters are valid UTF-8 but not yet checked as topic filters: the broker answers an
    /// invalid filter with SUBACK 0x80 rather than dropping the connection.
    pub filters: Vec<(String, QoS)>,
}

/// One return code of a SUBACK: the granted QoS, or 0x80 failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubAckCode {
    Granted(QoS),
    Failure,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: u16,
    pub codes: Vec<SubAckCode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
}

/// All 14 MQTT 3.1.1 control packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
}
