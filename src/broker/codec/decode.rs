//! Strict decoding of MQTT 3.1.1 and 3.1 packets from untrusted bytes.
//!
//! ```text
//!  byte 1          bytes 2..=5                    remaining length bytes
//! +------+------+ +---------------------------+ +-----------------+---------+
//! | type | flags| | remaining length (varint, | | variable header | payload |
//! | 7..4 | 3..0 | | 1 to 4 bytes, minimal)    | |                 |         |
//! +------+------+ +---------------------------+ +-----------------+---------+
//! ```
//!
//! Order of checks, so that a hostile peer costs as little as possible: the first byte (packet
//! type and flags) is judged as soon as it arrives; then the remaining length; then the announced
//! total size against the limit; only then does the decoder wait for the body. Nothing is
//! allocated before the body is complete, and every allocation (strings, the filter list) is
//! bounded by the size of a body that already passed the limit.
//!
//! Spec interpretations (MQTT 3.1.1 OASIS Standard unless noted):
//! - A remaining length in more bytes than needed (e.g. `0x80 0x00` for 0) is rejected. 3.1.1
//!   section 2.2.3 only shows the minimal encoding; MQTT 5.0 makes it normative
//!   [MQTT-1.5.5-1], no known client sends anything else, and it keeps one byte form per packet.
//! - The Will Topic must be a valid topic name (non-empty, no wildcards), like a PUBLISH topic:
//!   the will is published under it [MQTT-4.7.3-1], [MQTT-4.7.3-2].
//! - Control characters U+0001..U+001F and U+007F..U+009F and non-characters are accepted: the
//!   spec only says they SHOULD NOT appear (section 1.5.3), and a receiver MAY close.
//! - For protocol level 3 ("MQIsdp") the 3.1.1-only rules on the reserved connect flag
//!   [MQTT-3.1.2-3] and on a password without a user name [MQTT-3.1.2-22] are not applied; the
//!   reserved bit is ignored, as in MQTT 3.1 it was simply unused.
//! - A CONNECT with a known protocol name and an unknown level is reported as
//!   [`DecodeError::UnsupportedProtocolLevel`] as soon as the level is read, without parsing
//!   the rest: other levels (MQTT 5.0) lay out the rest differently, and the broker must answer
//!   with CONNACK 0x01 [MQTT-3.1.2-2].
//! - CONNACK, SUBACK and the acks are decoded as strictly as the server-bound packets: reserved
//!   bits and return codes are checked, and packet identifiers must be non-zero.

use bytes::{Buf, Bytes, BytesMut};

use super::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, ProtocolLevel, Publish, QoS, SubAck,
    SubAckCode, Subscribe, Unsubscribe,
};

/// Why bytes from the network are not a valid packet. Every variant means "close the
/// connection"; [`DecodeError::UnsupportedProtocolLevel`] first deserves a CONNACK 0x01.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// Types 0 and 15 are reserved (section 2.2.1).
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    /// [MQTT-2.2.2-1], [MQTT-2.2.2-2], [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1].
    #[error("{packet} with invalid fixed header flags {flags:#06b}")]
    InvalidFlags { packet: &'static str, flags: u8 },
    /// [MQTT-3.3.1-4].
    #[error("PUBLISH with QoS 3")]
    InvalidPublishQoS,
    /// [MQTT-3.3.1-2].
    #[error("PUBLISH with QoS 0 and the DUP flag set")]
    DupWithQoS0,
    /// A fifth remaining-length byte (section 2.2.3).
    #[error("remaining length longer than 4 bytes")]
    RemainingLengthTooLong,
    /// See the module documentation.
    #[error("remaining length not encoded in the minimum number of bytes")]
    NonMinimalRemainingLength,
    /// A packet whose remaining length is fixed by the spec announced another one.
    #[error("{packet} must have a remaining length of {expected}, not {actual}")]
    WrongRemainingLength {
        packet: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A field runs past the end of the packet.
    #[error("{packet} ends inside its {field}")]
    UnexpectedEnd {
        packet: &'static str,
        field: &'static str,
    },
    /// Bytes left after the last field of the packet.
    #[error("{packet} has {count} bytes after its last field")]
    TrailingBytes { packet: &'static str, count: usize },
    /// [MQTT-1.5.3-1].
    #[error("{field} is not well-formed UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// [MQTT-1.5.3-2].
    #[error("{field} contains U+0000")]
    NullCharacter { field: &'static str },
    /// [MQTT-4.7.3-1].
    #[error("{field} is empty")]
    EmptyTopicName { field: &'static str },
    /// [MQTT-3.3.2-2], [MQTT-4.7.3-2].
    #[error("{field} contains a wildcard character")]
    WildcardInTopicName { field: &'static str },
    /// [MQTT-2.3.1-1]; also applied to the acks, which echo a non-zero identifier.
    #[error("{packet} with packet identifier 0")]
    ZeroPacketId { packet: &'static str },
    /// Not "MQTT" (3.1.1) or "MQIsdp" (3.1): close without CONNACK [MQTT-3.1.2-1].
    #[error("unknown protocol name {0:?}")]
    UnknownProtocolName(String),
    /// A known protocol name with another level: answer CONNACK 0x01, then close [MQTT-3.1.2-2].
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// [MQTT-3.1.2-3].
    #[error("CONNECT with the reserved flag set")]
    ReservedConnectFlag,
    /// [MQTT-3.1.2-11], [MQTT-3.1.2-13], [MQTT-3.1.2-15].
    #[error("CONNECT with will QoS or will retain but no will flag")]
    WillOptionsWithoutWill,
    /// [MQTT-3.1.2-14].
    #[error("CONNECT with will QoS 3")]
    InvalidWillQoS,
    /// [MQTT-3.1.2-22].
    #[error("CONNECT with a password but no user name")]
    PasswordWithoutUsername,
    /// [MQTT-3.8.3-3], [MQTT-3.10.3-2].
    #[error("{packet} without any topic filter")]
    NoTopicFilters { packet: &'static str },
    /// [MQTT-3.8.3-4].
    #[error("SUBSCRIBE with invalid requested QoS byte {0:#04x}")]
    InvalidRequestedQoS(u8),
    /// Section 3.2.2.1: bits 7..1 of the acknowledge flags are reserved.
    #[error("CONNACK with reserved acknowledge flags {0:#04x}")]
    ReservedConnAckFlags(u8),
    /// Section 3.2.2.3: values 6..=255 are reserved.
    #[error("CONNACK with reserved return code {0}")]
    InvalidConnectReturnCode(u8),
    /// [MQTT-3.2.2-4].
    #[error("CONNACK refusing the connection with session present set")]
    SessionPresentWithRefusal,
    /// [MQTT-3.9.3-2].
    #[error("SUBACK with reserved return code {0:#04x}")]
    InvalidSubAckReturnCode(u8),
    /// A SUBACK answers at least one filter (section 3.9.3).
    #[error("SUBACK without any return code")]
    NoSubAckReturnCodes,
}

/// The fixed header of a packet whose first bytes have arrived.
#[derive(Debug, Clone, Copy)]
struct FixedHeader {
    byte1: u8,
    /// Bytes of the fixed header itself: 2 to 5.
    len: usize,
    remaining_len: usize,
}

/// Decodes one packet from the front of `buf`. Ok(None) = need more bytes (nothing consumed).
/// Err = bad bytes (the broker closes the connection). The announced size is checked against
/// `max_packet_size` (total packet size incl. fixed header) BEFORE waiting for or allocating the body.
///
/// On `Err` the packet's bytes may have been consumed; the stream cannot be resynchronised.
/// The PUBLISH payload and CONNECT password are zero-copy slices of `buf`'s allocation.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = parse_fixed_header(buf)? else {
        return Ok(None);
    };
    // At most 5 + 268_435_455: no overflow, even with a 32-bit usize.
    let size = header.len + header.remaining_len;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut frame = buf.split_to(size).freeze();
    frame.advance(header.len);
    decode_body(header, frame).map(Some)
}

/// Reads and judges the fixed header; `Ok(None)` while it is incomplete.
fn parse_fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    check_type_and_flags(byte1)?;
    let mut remaining_len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining_len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(DecodeError::NonMinimalRemainingLength);
            }
            return Ok(Some(FixedHeader {
                byte1,
                len: 2 + i,
                remaining_len,
            }));
        }
    }
    Err(DecodeError::RemainingLengthTooLong)
}

fn packet_name(packet_type: u8) -> &'static str {
    match packet_type {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        _ => "reserved packet",
    }
}

/// Checks the first byte alone, so garbage is refused before its length is even read.
fn check_type_and_flags(byte1: u8) -> Result<(), DecodeError> {
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0f;
    let expected = match packet_type {
        0 | 15 => return Err(DecodeError::ReservedPacketType(packet_type)),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::InvalidPublishQoS);
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::DupWithQoS0);
            }
            return Ok(());
        }
        // [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1]
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::InvalidFlags {
            packet: packet_name(packet_type),
            flags,
        });
    }
    Ok(())
}

fn decode_body(header: FixedHeader, body: Bytes) -> Result<Packet, DecodeError> {
    let packet_type = header.byte1 >> 4;
    let name = packet_name(packet_type);
    let fixed_len = match packet_type {
        2 | 4..=7 | 11 => Some(2),
        12..=14 => Some(0),
        _ => None,
    };
    if let Some(expected) = fixed_len {
        if body.len() != expected {
            return Err(DecodeError::WrongRemainingLength {
                packet: name,
                expected,
                actual: body.len(),
            });
        }
    }
    let mut r = Reader {
        buf: body,
        packet: name,
    };
    let packet = match packet_type {
        1 => Packet::Connect(decode_connect(&mut r)?),
        2 => Packet::ConnAck(decode_connack(&mut r)?),
        3 => Packet::Publish(decode_publish(header.byte1, &mut r)?),
        4 => Packet::PubAck(r.packet_id()?),
        5 => Packet::PubRec(r.packet_id()?),
        6 => Packet::PubRel(r.packet_id()?),
        7 => Packet::PubComp(r.packet_id()?),
        8 => Packet::Subscribe(decode_subscribe(&mut r)?),
        9 => Packet::SubAck(decode_suback(&mut r)?),
        10 => Packet::Unsubscribe(decode_unsubscribe(&mut r)?),
        11 => Packet::UnsubAck(r.packet_id()?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect,
        other => return Err(DecodeError::ReservedPacketType(other)),
    };
    r.finish()?;
    Ok(packet)
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolLevel::V311,
        (b"MQIsdp", 3) => ProtocolLevel::V31,
        (b"MQTT" | b"MQIsdp", other) => {
            return Err(DecodeError::UnsupportedProtocolLevel(other));
        }
        (unknown, _) => {
            let shown = unknown.get(..32).unwrap_or(unknown);
            return Err(DecodeError::UnknownProtocolName(
                String::from_utf8_lossy(shown).into_owned(),
            ));
        }
    };
    let flags = r.u8("connect flags")?;
    let v311 = protocol == ProtocolLevel::V311;
    if v311 && flags & 0x01 != 0 {
        return Err(DecodeError::ReservedConnectFlag);
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::WillOptionsWithoutWill);
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidWillQoS)?;
    if v311 && password_flag && !username_flag {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16("keep alive")?;
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let topic = r.string("will topic")?;
        check_topic_name(&topic, "will topic")?;
        let payload = r.binary("will message")?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = username_flag.then(|| r.string("user name")).transpose()?;
    let password = password_flag.then(|| r.binary("password")).transpose()?;
    Ok(Connect {
        protocol,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_connack(r: &mut Reader) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("acknowledge flags")?;
    if flags & 0xfe != 0 {
        return Err(DecodeError::ReservedConnAckFlags(flags));
    }
    let code = match r.u8("return code")? {
        0 => ConnectReturnCode::Accepted,
        1 => ConnectReturnCode::UnacceptableProtocolVersion,
        2 => ConnectReturnCode::IdentifierRejected,
        3 => ConnectReturnCode::ServerUnavailable,
        4 => ConnectReturnCode::BadUsernameOrPassword,
        5 => ConnectReturnCode::NotAuthorized,
        other => return Err(DecodeError::InvalidConnectReturnCode(other)),
    };
    let session_present = flags & 0x01 != 0;
    if session_present && code != ConnectReturnCode::Accepted {
        return Err(DecodeError::SessionPresentWithRefusal);
    }
    Ok(ConnAck {
        session_present,
        code,
    })
}

fn decode_publish(byte1: u8, r: &mut Reader) -> Result<Publish, DecodeError> {
    // The flags were checked by `check_type_and_flags`; QoS 3 cannot reach here.
    let qos = QoS::from_u8((byte1 >> 1) & 0b11).ok_or(DecodeError::InvalidPublishQoS)?;
    let topic = r.string("topic name")?;
    check_topic_name(&topic, "topic name")?;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        r.packet_id()?
    };
    Ok(Publish {
        dup: byte1 & 0b1000 != 0,
        qos,
        retain: byte1 & 0b0001 != 0,
        topic,
        pkid,
        payload: r.rest(),
    })
}

fn decode_subscribe(r: &mut Reader) -> Result<Subscribe, DecodeError> {
    let pkid = r.packet_id()?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string("topic filter")?;
        let requested = r.u8("requested QoS")?;
        // [MQTT-3.8.3-4]: upper six bits reserved, QoS 3 invalid.
        let qos = match requested & 0xfc {
            0 => QoS::from_u8(requested),
            _ => None,
        }
        .ok_or(DecodeError::InvalidRequestedQoS(requested))?;
        filters.push((filter, qos));
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters { packet: r.packet });
    }
    Ok(Subscribe { pkid, filters })
}

fn decode_suback(r: &mut Reader) -> Result<SubAck, DecodeError> {
    let pkid = r.packet_id()?;
    let mut codes = Vec::with_capacity(r.buf.len());
    while !r.is_empty() {
        let code = match r.u8("return code")? {
            0x80 => SubAckCode::Failure,
            other => SubAckCode::Granted(
                QoS::from_u8(other).ok_or(DecodeError::InvalidSubAckReturnCode(other))?,
            ),
        };
        codes.push(code);
    }
    if codes.is_empty() {
        return Err(DecodeError::NoSubAckReturnCodes);
    }
    Ok(SubAck { pkid, codes })
}

fn decode_unsubscribe(r: &mut Reader) -> Result<Unsubscribe, DecodeError> {
    let pkid = r.packet_id()?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string("topic filter")?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters { packet: r.packet });
    }
    Ok(Unsubscribe { pkid, filters })
}

/// A topic name of PUBLISH or a will: non-empty, no wildcards.
fn check_topic_name(topic: &str, field: &'static str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        return Err(DecodeError::EmptyTopicName { field });
    }
    if topic.contains(['+', '#']) {
        return Err(DecodeError::WildcardInTopicName { field });
    }
    Ok(())
}

/// Reads the fields of one packet's body, which is complete and already within the size limit.
struct Reader {
    buf: Bytes,
    packet: &'static str,
}

impl Reader {
    fn end(&self, field: &'static str) -> DecodeError {
        DecodeError::UnexpectedEnd {
            packet: self.packet,
            field,
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.buf.try_get_u8().map_err(|_| self.end(field))
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.buf.try_get_u16().map_err(|_| self.end(field))
    }

    /// A non-zero packet identifier [MQTT-2.3.1-1].
    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16("packet identifier")? {
            0 => Err(DecodeError::ZeroPacketId {
                packet: self.packet,
            }),
            id => Ok(id),
        }
    }

    /// Two-byte length, then that many bytes, as a zero-copy slice.
    fn binary(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > self.buf.len() {
            return Err(self.end(field));
        }
        Ok(self.buf.split_to(len))
    }

    /// A UTF-8 encoded string (section 1.5.3).
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let raw = self.binary(field)?;
        let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidUtf8 { field })?;
        if s.contains('\0') {
            return Err(DecodeError::NullCharacter { field });
        }
        Ok(s.to_owned())
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                packet: self.packet,
                count,
            }),
        }
    }
}

impl DecodeError {
    /// The CONNACK return code the spec asks for when this error is in a CONNECT, if any.
    pub fn connack_code(&self) -> Option<super::ConnectReturnCode> {
        match self {
            // [MQTT-3.1.2-2]
            DecodeError::UnsupportedProtocolLevel(_) => {
                Some(super::ConnectReturnCode::UnacceptableProtocolVersion)
            }
            _ => None,
        }
    }
}
