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

impl DecodeError {
    /// The CONNACK return code to send before closing, if the error deserves one: only an
    /// unsupported protocol level does [MQTT-3.1.2-2]; everything else closes silently.
    pub fn connack_code(&self) -> Option<ConnectReturnCode> {
        match self {
            DecodeError::UnsupportedProtocolLevel(_) => {
                Some(ConnectReturnCode::UnacceptableProtocolVersion)
            }
            _ => None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn decode_all(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), MAX)
    }

    fn decode_ok(bytes: &[u8]) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = decode(&mut buf, MAX)
            .expect("valid packet")
            .expect("complete packet");
        assert!(buf.is_empty(), "the whole packet is consumed");
        packet
    }

    fn decode_err(bytes: &[u8]) -> DecodeError {
        decode_all(bytes).expect_err("malformed packet")
    }

    /// A packet with the given first byte and body, remaining length in minimal form.
    fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![byte1];
        let mut rest = body.len();
        loop {
            let digit = (rest % 128) as u8;
            rest /= 128;
            if rest == 0 {
                out.push(digit);
                break;
            }
            out.push(digit | 0x80);
        }
        out.extend_from_slice(body);
        out
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    /// A CONNECT body: protocol name, level, flags, keep alive 10, then `payload`.
    fn connect_body(name: &[u8], level: u8, flags: u8, payload: &[&[u8]]) -> Vec<u8> {
        let mut body = string(name);
        body.extend_from_slice(&[level, flags, 0x00, 0x0a]);
        for field in payload {
            body.extend_from_slice(&string(field));
        }
        body
    }

    fn connect(flags: u8, payload: &[&[u8]]) -> Vec<u8> {
        frame(0x10, &connect_body(b"MQTT", 4, flags, payload))
    }

    // ---- framing ----

    #[test]
    fn an_empty_buffer_needs_more_bytes() {
        assert_eq!(decode_all(&[]), Ok(None));
    }

    #[test]
    fn every_strict_prefix_needs_more_bytes_and_consumes_nothing() {
        let packet = frame(
            0x32,
            &[&string(b"a/b")[..], &[0x00, 0x0a], b"hello"].concat(),
        );
        for len in 0..packet.len() {
            let mut buf = BytesMut::from(&packet[..len]);
            assert_eq!(decode(&mut buf, MAX), Ok(None), "prefix of {len} bytes");
            assert_eq!(&buf[..], &packet[..len], "nothing consumed");
        }
        assert!(matches!(decode_ok(&packet), Packet::Publish(_)));
    }

    #[test]
    fn packets_in_one_buffer_are_decoded_one_at_a_time() {
        let mut buf = BytesMut::from(&[0xc0, 0x00, 0x40, 0x02, 0x00, 0x07, 0xe0][..]);
        assert_eq!(decode(&mut buf, MAX), Ok(Some(Packet::PingReq)));
        assert_eq!(decode(&mut buf, MAX), Ok(Some(Packet::PubAck(7))));
        assert_eq!(decode(&mut buf, MAX), Ok(None));
        assert_eq!(&buf[..], &[0xe0]);
    }

    #[test]
    fn remaining_length_examples_of_table_2_4_are_read() {
        let examples: [(&[u8], usize); 8] = [
            (&[0x00], 0),
            (&[0x7f], 127),
            (&[0x80, 0x01], 128),
            (&[0xff, 0x7f], 16_383),
            (&[0x80, 0x80, 0x01], 16_384),
            (&[0xff, 0xff, 0x7f], 2_097_151),
            (&[0x80, 0x80, 0x80, 0x01], 2_097_152),
            (&[0xff, 0xff, 0xff, 0x7f], 268_435_455),
        ];
        for (bytes, value) in examples {
            let input = [&[0x30][..], bytes].concat();
            let header = parse_fixed_header(&input).unwrap().unwrap();
            assert_eq!(header.remaining_len, value);
            assert_eq!(header.len, 1 + bytes.len());
        }
    }

    #[test]
    fn a_fifth_remaining_length_byte_is_malformed() {
        assert_eq!(
            decode_err(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            DecodeError::RemainingLengthTooLong
        );
        // Judged as soon as the fifth byte is due, whatever follows.
        assert_eq!(
            decode_err(&[0x30, 0x80, 0x80, 0x80, 0x80]),
            DecodeError::RemainingLengthTooLong
        );
    }

    #[test]
    fn a_remaining_length_in_more_bytes_than_needed_is_malformed() {
        assert_eq!(
            decode_err(&[0xc0, 0x80, 0x00]),
            DecodeError::NonMinimalRemainingLength
        );
        assert_eq!(
            decode_err(&[0x40, 0x82, 0x80, 0x00, 0x00, 0x01]),
            DecodeError::NonMinimalRemainingLength
        );
    }

    #[test]
    fn an_oversized_packet_is_refused_before_its_body_arrives() {
        // Announces 268,435,455 bytes; only the fixed header is there.
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0x7f][..]);
        assert_eq!(
            decode(&mut buf, 1024),
            Err(DecodeError::PacketTooLarge {
                size: 268_435_460,
                max: 1024
            })
        );
    }

    #[test]
    fn the_limit_counts_the_fixed_header() {
        let packet = frame(0x30, &[&string(b"t")[..], &[0u8; 10]].concat());
        assert_eq!(packet.len(), 15);
        let mut buf = BytesMut::from(&packet[..]);
        assert!(matches!(decode(&mut buf, 15), Ok(Some(Packet::Publish(_)))));
        let mut buf = BytesMut::from(&packet[..]);
        assert_eq!(
            decode(&mut buf, 14),
            Err(DecodeError::PacketTooLarge { size: 15, max: 14 })
        );
    }

    #[test]
    fn reserved_packet_types_0_and_15_are_refused_from_the_first_byte() {
        assert_eq!(decode_err(&[0x00]), DecodeError::ReservedPacketType(0));
        assert_eq!(
            decode_err(&[0xf0, 0x00]),
            DecodeError::ReservedPacketType(15)
        );
    }

    #[test]
    fn mqtt_2_2_2_2_reserved_flags_other_than_zero_are_malformed() {
        for packet_type in [1u8, 2, 4, 5, 7, 9, 11, 12, 13, 14] {
            for flags in 1..16u8 {
                let err = decode_err(&[packet_type << 4 | flags]);
                assert!(
                    matches!(err, DecodeError::InvalidFlags { flags: f, .. } if f == flags),
                    "type {packet_type} flags {flags}: {err}"
                );
            }
        }
    }

    #[test]
    fn mqtt_3_6_1_1_pubrel_with_wrong_flags_is_malformed() {
        for byte1 in [0x60, 0x61, 0x63, 0x66, 0x6a] {
            assert!(matches!(
                decode_err(&[byte1, 0x02, 0x00, 0x01]),
                DecodeError::InvalidFlags {
                    packet: "PUBREL",
                    ..
                }
            ));
        }
        assert_eq!(decode_ok(&[0x62, 0x02, 0x00, 0x01]), Packet::PubRel(1));
    }

    #[test]
    fn mqtt_3_8_1_1_subscribe_with_wrong_flags_is_malformed() {
        let body = [&[0x00, 0x01][..], &string(b"a"), &[0x00]].concat();
        assert!(matches!(
            decode_err(&frame(0x80, &body)),
            DecodeError::InvalidFlags {
                packet: "SUBSCRIBE",
                flags: 0
            }
        ));
        assert!(matches!(
            decode_ok(&frame(0x82, &body)),
            Packet::Subscribe(_)
        ));
    }

    #[test]
    fn mqtt_3_10_1_1_unsubscribe_with_wrong_flags_is_malformed() {
        let body = [&[0x00, 0x01][..], &string(b"a")].concat();
        assert!(matches!(
            decode_err(&frame(0xa3, &body)),
            DecodeError::InvalidFlags {
                packet: "UNSUBSCRIBE",
                flags: 3
            }
        ));
        assert!(matches!(
            decode_ok(&frame(0xa2, &body)),
            Packet::Unsubscribe(_)
        ));
    }

    #[test]
    fn mqtt_3_3_1_4_publish_with_qos_3_is_malformed() {
        assert_eq!(decode_err(&[0x36]), DecodeError::InvalidPublishQoS);
        assert_eq!(decode_err(&[0x3f]), DecodeError::InvalidPublishQoS);
    }

    #[test]
    fn mqtt_3_3_1_2_dup_with_qos_0_is_malformed() {
        assert_eq!(decode_err(&[0x38]), DecodeError::DupWithQoS0);
        assert_eq!(decode_err(&[0x39]), DecodeError::DupWithQoS0);
    }

    #[test]
    fn fixed_size_packets_with_another_remaining_length_are_malformed() {
        let fixed: [(u8, usize); 9] = [
            (0x20, 2),
            (0x40, 2),
            (0x50, 2),
            (0x62, 2),
            (0x70, 2),
            (0xb0, 2),
            (0xc0, 0),
            (0xd0, 0),
            (0xe0, 0),
        ];
        for (byte1, expected) in fixed {
            for actual in [0usize, 1, 2, 3, 4] {
                if actual == expected {
                    continue;
                }
                let packet = frame(byte1, &vec![1u8; actual]);
                assert!(
                    matches!(
                        decode_err(&packet),
                        DecodeError::WrongRemainingLength { expected: e, actual: a, .. }
                            if e == expected && a == actual
                    ),
                    "{packet:02x?}"
                );
            }
        }
    }

    #[test]
    fn mqtt_2_3_1_1_acks_with_packet_id_0_are_malformed() {
        for byte1 in [0x40, 0x50, 0x62, 0x70, 0xb0] {
            assert!(matches!(
                decode_err(&[byte1, 0x02, 0x00, 0x00]),
                DecodeError::ZeroPacketId { .. }
            ));
        }
    }

    #[test]
    fn acks_and_empty_packets_decode() {
        assert_eq!(decode_ok(&[0x40, 0x02, 0x12, 0x34]), Packet::PubAck(0x1234));
        assert_eq!(decode_ok(&[0x50, 0x02, 0x00, 0x01]), Packet::PubRec(1));
        assert_eq!(decode_ok(&[0x62, 0x02, 0xff, 0xff]), Packet::PubRel(0xffff));
        assert_eq!(decode_ok(&[0x70, 0x02, 0x00, 0x02]), Packet::PubComp(2));
        assert_eq!(decode_ok(&[0xb0, 0x02, 0x00, 0x03]), Packet::UnsubAck(3));
        assert_eq!(decode_ok(&[0xc0, 0x00]), Packet::PingReq);
        assert_eq!(decode_ok(&[0xd0, 0x00]), Packet::PingResp);
        assert_eq!(decode_ok(&[0xe0, 0x00]), Packet::Disconnect);
    }

    // ---- CONNECT ----

    #[test]
    fn the_connect_example_of_section_3_1_decodes() {
        // The variable header example of section 3.1.2: "MQTT", level 4, flags 0xce, keep alive 10.
        let packet = connect(
            0xce,
            &[b"client", b"will/topic", b"gone", b"user", b"\xffsecret"],
        );
        assert_eq!(
            &packet[2..12],
            &[0, 4, b'M', b'Q', b'T', b'T', 4, 0xce, 0, 10]
        );
        assert_eq!(
            decode_ok(&packet),
            Packet::Connect(Connect {
                protocol: ProtocolLevel::V311,
                clean_session: true,
                keep_alive: 10,
                client_id: "client".into(),
                will: Some(LastWill {
                    topic: "will/topic".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                }),
                username: Some("user".into()),
                password: Some(Bytes::from_static(b"\xffsecret")),
            })
        );
    }

    #[test]
    fn an_mqtt_3_1_connect_decodes_as_level_3() {
        let packet = frame(0x10, &connect_body(b"MQIsdp", 3, 0x02, &[b"sensor-1"]));
        let Packet::Connect(c) = decode_ok(&packet) else {
            panic!("not a CONNECT")
        };
        assert_eq!(c.protocol, ProtocolLevel::V31);
        assert_eq!(c.client_id, "sensor-1");
        assert!(c.clean_session && c.will.is_none() && c.username.is_none());
    }

    #[test]
    fn an_empty_client_id_is_left_to_the_broker() {
        let Packet::Connect(c) = decode_ok(&connect(0x02, &[b""])) else {
            panic!("not a CONNECT")
        };
        assert_eq!(c.client_id, "");
    }

    #[test]
    fn mqtt_3_1_2_2_a_known_name_with_another_level_is_unsupported_not_malformed() {
        // An MQTT 5.0 CONNECT: properties follow, which 3.1.1 cannot parse.
        let v5 = frame(
            0x10,
            &[
                &connect_body(b"MQTT", 5, 0x02, &[])[..],
                &[0x00, 0x00, 0x00],
            ]
            .concat(),
        );
        assert_eq!(decode_err(&v5), DecodeError::UnsupportedProtocolLevel(5));
        let mqisdp_4 = frame(0x10, &connect_body(b"MQIsdp", 4, 0x02, &[b"c"]));
        assert_eq!(
            decode_err(&mqisdp_4),
            DecodeError::UnsupportedProtocolLevel(4)
        );
        let mqtt_3 = frame(0x10, &connect_body(b"MQTT", 3, 0x02, &[b"c"]));
        assert_eq!(
            decode_err(&mqtt_3),
            DecodeError::UnsupportedProtocolLevel(3)
        );
    }

    #[test]
    fn only_an_unsupported_protocol_level_is_answered_with_a_connack() {
        assert_eq!(
            DecodeError::UnsupportedProtocolLevel(5).connack_code(),
            Some(ConnectReturnCode::UnacceptableProtocolVersion)
        );
        assert_eq!(
            DecodeError::UnknownProtocolName("x".into()).connack_code(),
            None
        );
        assert_eq!(DecodeError::ReservedConnectFlag.connack_code(), None);
    }

    #[test]
    fn mqtt_3_1_2_1_an_unknown_protocol_name_is_refused() {
        let packet = frame(0x10, &connect_body(b"MQTX", 4, 0x02, &[b"c"]));
        assert_eq!(
            decode_err(&packet),
            DecodeError::UnknownProtocolName("MQTX".into())
        );
        let packet = frame(0x10, &connect_body(b"mqtt", 4, 0x02, &[b"c"]));
        assert!(matches!(
            decode_err(&packet),
            DecodeError::UnknownProtocolName(_)
        ));
    }

    #[test]
    fn mqtt_3_1_2_3_the_reserved_connect_flag_is_malformed_in_3_1_1_only() {
        assert_eq!(
            decode_err(&connect(0x03, &[b"c"])),
            DecodeError::ReservedConnectFlag
        );
        let v31 = frame(0x10, &connect_body(b"MQIsdp", 3, 0x03, &[b"c"]));
        assert!(matches!(decode_ok(&v31), Packet::Connect(_)));
    }

    #[test]
    fn mqtt_3_1_2_11_will_qos_without_will_flag_is_malformed() {
        assert_eq!(
            decode_err(&connect(0x0a, &[b"c"])),
            DecodeError::WillOptionsWithoutWill
        );
        assert_eq!(
            decode_err(&connect(0x12, &[b"c"])),
            DecodeError::WillOptionsWithoutWill
        );
    }

    #[test]
    fn mqtt_3_1_2_15_will_retain_without_will_flag_is_malformed() {
        assert_eq!(
            decode_err(&connect(0x22, &[b"c"])),
            DecodeError::WillOptionsWithoutWill
        );
    }

    #[test]
    fn mqtt_3_1_2_14_will_qos_3_is_malformed() {
        assert_eq!(
            decode_err(&connect(0x1e, &[b"c", b"t", b"m"])),
            DecodeError::InvalidWillQoS
        );
    }

    #[test]
    fn mqtt_3_1_2_22_a_password_without_user_name_is_malformed_in_3_1_1_only() {
        assert_eq!(
            decode_err(&connect(0x42, &[b"c", b"pw"])),
            DecodeError::PasswordWithoutUsername
        );
        let v31 = frame(0x10, &connect_body(b"MQIsdp", 3, 0x42, &[b"c", b"pw"]));
        let Packet::Connect(c) = decode_ok(&v31) else {
            panic!("not a CONNECT")
        };
        assert_eq!(
            (c.username, c.password),
            (None, Some(Bytes::from_static(b"pw")))
        );
    }

    #[test]
    fn will_retain_and_qos_2_are_read() {
        let Packet::Connect(c) = decode_ok(&connect(0x36, &[b"c", b"t", b""])) else {
            panic!("not a CONNECT")
        };
        let will = c.will.expect("a will");
        assert_eq!(
            (will.qos, will.retain, &will.payload[..]),
            (QoS::ExactlyOnce, true, &b""[..])
        );
    }

    #[test]
    fn a_will_topic_must_be_a_topic_name() {
        assert_eq!(
            decode_err(&connect(0x06, &[b"c", b"a/#", b"m"])),
            DecodeError::WildcardInTopicName {
                field: "will topic"
            }
        );
        assert_eq!(
            decode_err(&connect(0x06, &[b"c", b"", b"m"])),
            DecodeError::EmptyTopicName {
                field: "will topic"
            }
        );
    }

    #[test]
    fn mqtt_1_5_3_1_a_client_id_that_is_not_utf8_is_malformed() {
        assert_eq!(
            decode_err(&connect(0x02, &[b"\xc3\x28"])),
            DecodeError::InvalidUtf8 {
                field: "client identifier"
            }
        );
        // An encoded surrogate (U+D800) is ill-formed UTF-8 too.
        assert_eq!(
            decode_err(&connect(0x02, &[b"\xed\xa0\x80"])),
            DecodeError::InvalidUtf8 {
                field: "client identifier"
            }
        );
    }

    #[test]
    fn mqtt_1_5_3_2_a_user_name_with_u0000_is_malformed() {
        assert_eq!(
            decode_err(&connect(0x82, &[b"c", b"us\0er"])),
            DecodeError::NullCharacter { field: "user name" }
        );
    }

    #[test]
    fn a_connect_missing_its_announced_fields_is_malformed() {
        // User name flag set, user name absent.
        assert!(matches!(
            decode_err(&connect(0x82, &[b"c"])),
            DecodeError::UnexpectedEnd {
                field: "user name",
                ..
            }
        ));
        // Stops inside the keep alive.
        let body = [&string(b"MQTT")[..], &[4, 0x02, 0x00]].concat();
        assert!(matches!(
            decode_err(&frame(0x10, &body)),
            DecodeError::UnexpectedEnd {
                field: "keep alive",
                ..
            }
        ));
        // A string length that runs past the end.
        let body = [
            &connect_body(b"MQTT", 4, 0x02, &[])[..],
            &[0x00, 0x09, b'c'],
        ]
        .concat();
        assert!(matches!(
            decode_err(&frame(0x10, &body)),
            DecodeError::UnexpectedEnd {
                field: "client identifier",
                ..
            }
        ));
    }

    #[test]
    fn bytes_after_the_last_connect_field_are_malformed() {
        let body = [&connect_body(b"MQTT", 4, 0x02, &[b"c"])[..], &[0x00]].concat();
        assert_eq!(
            decode_err(&frame(0x10, &body)),
            DecodeError::TrailingBytes {
                packet: "CONNECT",
                count: 1
            }
        );
    }

    // ---- CONNACK ----

    #[test]
    fn connack_return_codes_decode() {
        assert_eq!(
            decode_ok(&[0x20, 0x02, 0x01, 0x00]),
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: ConnectReturnCode::Accepted
            })
        );
        let codes = [
            ConnectReturnCode::Accepted,
            ConnectReturnCode::UnacceptableProtocolVersion,
            ConnectReturnCode::IdentifierRejected,
            ConnectReturnCode::ServerUnavailable,
            ConnectReturnCode::BadUsernameOrPassword,
            ConnectReturnCode::NotAuthorized,
        ];
        for (byte, code) in (0u8..).zip(codes) {
            assert_eq!(
                decode_ok(&[0x20, 0x02, 0x00, byte]),
                Packet::ConnAck(ConnAck {
                    session_present: false,
                    code
                })
            );
        }
    }

    #[test]
    fn connack_reserved_flags_and_codes_are_malformed() {
        assert_eq!(
            decode_err(&[0x20, 0x02, 0x02, 0x00]),
            DecodeError::ReservedConnAckFlags(0x02)
        );
        assert_eq!(
            decode_err(&[0x20, 0x02, 0x00, 0x06]),
            DecodeError::InvalidConnectReturnCode(6)
        );
    }

    #[test]
    fn mqtt_3_2_2_4_a_refusal_with_session_present_is_malformed() {
        assert_eq!(
            decode_err(&[0x20, 0x02, 0x01, 0x05]),
            DecodeError::SessionPresentWithRefusal
        );
    }

    // ---- PUBLISH ----

    #[test]
    fn the_publish_example_of_section_3_3_decodes() {
        // Topic "a/b", packet identifier 10, as in the example of section 3.3.2, then a payload.
        let body = [
            0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0a, b'2', b'1', b'.', b'5',
        ];
        assert_eq!(
            decode_ok(&frame(0x3b, &body)),
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: "a/b".into(),
                pkid: 10,
                payload: Bytes::from_static(b"21.5"),
            })
        );
    }

    #[test]
    fn a_qos_0_publish_has_no_packet_id_and_may_have_no_payload() {
        assert_eq!(
            decode_ok(&frame(0x30, &string(b"t"))),
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "t".into(),
                pkid: 0,
                payload: Bytes::new(),
            })
        );
    }

    #[test]
    fn the_utf8_example_of_section_1_5_3_is_a_valid_topic() {
        let body = [0x00, 0x05, 0x41, 0xf0, 0xaa, 0x9b, 0x94];
        let Packet::Publish(p) = decode_ok(&frame(0x30, &body)) else {
            panic!("not a PUBLISH")
        };
        assert_eq!(p.topic, "A\u{2a6d4}");
    }

    #[test]
    fn mqtt_3_3_2_2_a_publish_topic_with_wildcards_is_malformed() {
        for topic in [&b"a/+"[..], b"#", b"a/b#"] {
            assert_eq!(
                decode_err(&frame(0x30, &string(topic))),
                DecodeError::WildcardInTopicName {
                    field: "topic name"
                }
            );
        }
    }

    #[test]
    fn mqtt_4_7_3_1_an_empty_publish_topic_is_malformed() {
        assert_eq!(
            decode_err(&frame(0x30, &string(b""))),
            DecodeError::EmptyTopicName {
                field: "topic name"
            }
        );
    }

    #[test]
    fn mqtt_2_3_1_1_a_qos_1_publish_with_packet_id_0_is_malformed() {
        let body = [&string(b"t")[..], &[0x00, 0x00]].concat();
        assert_eq!(
            decode_err(&frame(0x32, &body)),
            DecodeError::ZeroPacketId { packet: "PUBLISH" }
        );
        assert_eq!(
            decode_err(&frame(0x34, &body)),
            DecodeError::ZeroPacketId { packet: "PUBLISH" }
        );
    }

    #[test]
    fn a_publish_topic_with_u0000_or_bad_utf8_is_malformed() {
        assert_eq!(
            decode_err(&frame(0x30, &string(b"a\0b"))),
            DecodeError::NullCharacter {
                field: "topic name"
            }
        );
        assert_eq!(
            decode_err(&frame(0x30, &string(b"a\xffb"))),
            DecodeError::InvalidUtf8 {
                field: "topic name"
            }
        );
    }

    #[test]
    fn a_publish_ending_inside_its_topic_or_packet_id_is_malformed() {
        assert!(matches!(
            decode_err(&frame(0x30, &[0x00, 0x05, b'a'])),
            DecodeError::UnexpectedEnd {
                field: "topic name",
                ..
            }
        ));
        assert!(matches!(
            decode_err(&frame(0x32, &[0x00, 0x01, b'a', 0x00])),
            DecodeError::UnexpectedEnd {
                field: "packet identifier",
                ..
            }
        ));
        assert!(matches!(
            decode_err(&[0x30, 0x00]),
            DecodeError::UnexpectedEnd { .. }
        ));
    }

    #[test]
    fn a_publish_payload_is_a_slice_of_the_read_buffer() {
        let packet = frame(0x30, &[&string(b"t")[..], &[7u8; 64]].concat());
        let mut buf = BytesMut::from(&packet[..]);
        let start = buf.as_ptr() as usize;
        let Ok(Some(Packet::Publish(p))) = decode(&mut buf, MAX) else {
            panic!("not a PUBLISH")
        };
        assert_eq!(p.payload.as_ptr() as usize, start + 5, "no copy");
        assert_eq!(&p.payload[..], &[7u8; 64]);
    }

    // ---- SUBSCRIBE / SUBACK / UNSUBSCRIBE ----

    #[test]
    fn the_subscribe_example_of_section_3_8_decodes() {
        // Packet identifier 10, "a/b" QoS 1, "c/d" QoS 2 (the examples of section 3.8).
        let body = [
            0x00, 0x0a, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x03, b'c', b'/', b'd', 0x02,
        ];
        assert_eq!(
            decode_ok(&frame(0x82, &body)),
            Packet::Subscribe(Subscribe {
                pkid: 10,
                filters: vec![
                    ("a/b".into(), QoS::AtLeastOnce),
                    ("c/d".into(), QoS::ExactlyOnce)
                ],
            })
        );
    }

    #[test]
    fn subscribe_filters_are_left_to_the_broker() {
        let body = [
            &[0x00, 0x01][..],
            &string(b"a/#/b"),
            &[0x00],
            &string(b""),
            &[0x01],
        ]
        .concat();
        let Packet::Subscribe(s) = decode_ok(&frame(0x82, &body)) else {
            panic!("not a SUBSCRIBE")
        };
        assert_eq!(s.filters[0].0, "a/#/b");
        assert_eq!(s.filters[1].0, "");
    }

    #[test]
    fn mqtt_3_8_3_3_a_subscribe_without_filters_is_malformed() {
        assert_eq!(
            decode_err(&frame(0x82, &[0x00, 0x01])),
            DecodeError::NoTopicFilters {
                packet: "SUBSCRIBE"
            }
        );
    }

    #[test]
    fn mqtt_3_8_3_4_reserved_bits_or_qos_3_in_a_requested_qos_are_malformed() {
        for requested in [0x03u8, 0x04, 0x80, 0xfd] {
            let body = [&[0x00, 0x01][..], &string(b"a"), &[requested]].concat();
            assert_eq!(
                decode_err(&frame(0x82, &body)),
                DecodeError::InvalidRequestedQoS(requested)
            );
        }
    }

    #[test]
    fn a_subscribe_filter_without_its_qos_byte_is_malformed() {
        let body = [&[0x00, 0x01][..], &string(b"a")].concat();
        assert!(matches!(
            decode_err(&frame(0x82, &body)),
            DecodeError::UnexpectedEnd {
                field: "requested QoS",
                ..
            }
        ));
    }

    #[test]
    fn mqtt_2_3_1_1_subscribe_and_unsubscribe_with_packet_id_0_are_malformed() {
        let body = [&[0x00, 0x00][..], &string(b"a"), &[0x00]].concat();
        assert!(matches!(
            decode_err(&frame(0x82, &body)),
            DecodeError::ZeroPacketId { .. }
        ));
        let body = [&[0x00, 0x00][..], &string(b"a")].concat();
        assert!(matches!(
            decode_err(&frame(0xa2, &body)),
            DecodeError::ZeroPacketId { .. }
        ));
    }

    #[test]
    fn the_suback_example_of_section_3_9_decodes() {
        assert_eq!(
            decode_ok(&[0x90, 0x05, 0x00, 0x0a, 0x00, 0x02, 0x80]),
            Packet::SubAck(SubAck {
                pkid: 10,
                codes: vec![
                    SubAckCode::Granted(QoS::AtMostOnce),
                    SubAckCode::Granted(QoS::ExactlyOnce),
                    SubAckCode::Failure
                ],
            })
        );
    }

    #[test]
    fn mqtt_3_9_3_2_reserved_suback_codes_are_malformed() {
        assert_eq!(
            decode_err(&[0x90, 0x03, 0x00, 0x01, 0x03]),
            DecodeError::InvalidSubAckReturnCode(3)
        );
        assert_eq!(
            decode_err(&[0x90, 0x03, 0x00, 0x01, 0x81]),
            DecodeError::InvalidSubAckReturnCode(0x81)
        );
        assert_eq!(
            decode_err(&[0x90, 0x02, 0x00, 0x01]),
            DecodeError::NoSubAckReturnCodes
        );
    }

    #[test]
    fn the_unsubscribe_example_of_section_3_10_decodes() {
        let body = [
            0x00, 0x0a, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x03, b'c', b'/', b'd',
        ];
        assert_eq!(
            decode_ok(&frame(0xa2, &body)),
            Packet::Unsubscribe(Unsubscribe {
                pkid: 10,
                filters: vec!["a/b".into(), "c/d".into()],
            })
        );
    }

    #[test]
    fn mqtt_3_10_3_2_an_unsubscribe_without_filters_is_malformed() {
        assert_eq!(
            decode_err(&frame(0xa2, &[0x00, 0x01])),
            DecodeError::NoTopicFilters {
                packet: "UNSUBSCRIBE"
            }
        );
    }

    #[test]
    fn an_unsubscribe_filter_that_is_not_utf8_is_malformed() {
        let body = [&[0x00, 0x01][..], &string(b"\x80")].concat();
        assert_eq!(
            decode_err(&frame(0xa2, &body)),
            DecodeError::InvalidUtf8 {
                field: "topic filter"
            }
        );
    }
}
