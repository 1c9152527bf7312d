//! Encoding of packets, and of a PUBLISH's head alone so one payload serves every subscriber.
//!
//! The encoder trusts its input: it writes what the packet says. Every packet the decoder
//! returns encodes back to a packet that decodes equal. A packet built by hand must respect what
//! the wire can carry, which debug builds assert: strings and binary fields of at most 65,535
//! bytes, a total remaining length of at most 268,435,455, a non-zero packet id for PUBLISH with
//! QoS > 0 and for every packet that carries one. A QoS 0 PUBLISH carries no packet id, so its
//! `pkid` is not written. The remaining length is always written in the fewest bytes.

use bytes::{BufMut, BytesMut};

use super::{Connect, Packet, ProtocolLevel, Publish, QoS, SubAckCode};

/// The largest remaining length the 4-byte varint can express (section 2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Appends the encoding of `packet` to `out`.
pub fn encode(packet: &Packet, out: &mut BytesMut) {
    let remaining = remaining_len(packet);
    out.reserve(1 + varint_len(remaining) + remaining);
    match packet {
        Packet::Connect(connect) => {
            out.put_u8(0x10);
            put_remaining_length(out, remaining);
            put_connect_body(connect, out);
        }
        Packet::ConnAck(connack) => {
            out.put_slice(&[
                0x20,
                0x02,
                u8::from(connack.session_present),
                connack.code as u8,
            ]);
        }
        Packet::Publish(publish) => {
            encode_publish_head(publish, out);
            out.put_slice(&publish.payload);
        }
        Packet::PubAck(pkid) => put_ack(out, 0x40, *pkid),
        Packet::PubRec(pkid) => put_ack(out, 0x50, *pkid),
        Packet::PubRel(pkid) => put_ack(out, 0x62, *pkid),
        Packet::PubComp(pkid) => put_ack(out, 0x70, *pkid),
        Packet::Subscribe(subscribe) => {
            out.put_u8(0x82);
            put_remaining_length(out, remaining);
            put_packet_id(out, subscribe.pkid);
            for (filter, qos) in &subscribe.filters {
                put_string(out, filter);
                out.put_u8(qos.as_u8());
            }
        }
        Packet::SubAck(suback) => {
            out.put_u8(0x90);
            put_remaining_length(out, remaining);
            put_packet_id(out, suback.pkid);
            for code in &suback.codes {
                out.put_u8(match code {
                    SubAckCode::Granted(qos) => qos.as_u8(),
                    SubAckCode::Failure => 0x80,
                });
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            out.put_u8(0xa2);
            put_remaining_length(out, remaining);
            put_packet_id(out, unsubscribe.pkid);
            for filter in &unsubscribe.filters {
                put_string(out, filter);
            }
        }
        Packet::UnsubAck(pkid) => put_ack(out, 0xb0, *pkid),
        Packet::PingReq => out.put_slice(&[0xc0, 0x00]),
        Packet::PingResp => out.put_slice(&[0xd0, 0x00]),
        Packet::Disconnect => out.put_slice(&[0xe0, 0x00]),
    }
}

/// Appends a PUBLISH's fixed header, topic and packet id — everything but the payload — so the
/// broker can share one payload `Bytes` across subscribers (encode once, fan out).
///
/// The remaining length written counts `publish.payload.len()`: the payload must follow.
pub fn encode_publish_head(publish: &Publish, out: &mut BytesMut) {
    let remaining = publish_remaining_len(publish);
    let mut byte1 = 0x30 | (publish.qos.as_u8() << 1);
    if publish.dup {
        byte1 |= 0b1000;
    }
    if publish.retain {
        byte1 |= 0b0001;
    }
    out.reserve(1 + varint_len(remaining) + remaining - publish.payload.len());
    out.put_u8(byte1);
    put_remaining_length(out, remaining);
    put_string(out, &publish.topic);
    if publish.qos != QoS::AtMostOnce {
        put_packet_id(out, publish.pkid);
    }
}

/// The number of bytes [`encode`] appends for `packet`, fixed header included.
pub fn encoded_len(packet: &Packet) -> usize {
    let remaining = remaining_len(packet);
    1 + varint_len(remaining) + remaining
}

fn remaining_len(packet: &Packet) -> usize {
    match packet {
        Packet::Connect(connect) => connect_remaining_len(connect),
        Packet::Publish(publish) => publish_remaining_len(publish),
        Packet::Subscribe(subscribe) => {
            2 + subscribe
                .filters
                .iter()
                .map(|(filter, _)| 2 + filter.len() + 1)
                .sum::<usize>()
        }
        Packet::SubAck(suback) => 2 + suback.codes.len(),
        Packet::Unsubscribe(unsubscribe) => {
            2 + unsubscribe
                .filters
                .iter()
                .map(|filter| 2 + filter.len())
                .sum::<usize>()
        }
        Packet::ConnAck(_)
        | Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::UnsubAck(_) => 2,
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
    }
}

fn publish_remaining_len(publish: &Publish) -> usize {
    let pkid = if publish.qos == QoS::AtMostOnce { 0 } else { 2 };
    2 + publish.topic.len() + pkid + publish.payload.len()
}

fn connect_remaining_len(connect: &Connect) -> usize {
    let mut len = 2 + connect.protocol.name().len() + 1 + 1 + 2 + 2 + connect.client_id.len();
    if let Some(will) = &connect.will {
        len += 2 + will.topic.len() + 2 + will.payload.len();
    }
    if let Some(username) = &connect.username {
        len += 2 + username.len();
    }
    if let Some(password) = &connect.password {
        len += 2 + password.len();
    }
    len
}

fn put_connect_body(connect: &Connect, out: &mut BytesMut) {
    let protocol: ProtocolLevel = connect.protocol;
    put_string(out, protocol.name());
    out.put_u8(protocol.level());
    let mut flags = 0u8;
    if connect.clean_session {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | (will.qos.as_u8() << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if connect.password.is_some() {
        flags |= 0x40;
    }
    if connect.username.is_some() {
        flags |= 0x80;
    }
    out.put_u8(flags);
    out.put_u16(connect.keep_alive);
    put_string(out, &connect.client_id);
    if let Some(will) = &connect.will {
        put_string(out, &will.topic);
        put_binary(out, &will.payload);
    }
    if let Some(username) = &connect.username {
        put_string(out, username);
    }
    if let Some(password) = &connect.password {
        put_binary(out, password);
    }
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK: a first byte and a packet id.
fn put_ack(out: &mut BytesMut, byte1: u8, pkid: u16) {
    out.put_slice(&[byte1, 0x02]);
    put_packet_id(out, pkid);
}

fn put_packet_id(out: &mut BytesMut, pkid: u16) {
    debug_assert_ne!(pkid, 0, "packet identifiers are non-zero [MQTT-2.3.1-1]");
    out.put_u16(pkid);
}

fn put_binary(out: &mut BytesMut, data: &[u8]) {
    debug_assert!(
        data.len() <= usize::from(u16::MAX),
        "a string or binary field holds at most 65535 bytes"
    );
    out.put_u16(data.len() as u16);
    out.put_slice(data);
}

fn put_string(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

/// Number of bytes of the remaining-length varint for `len`.
fn varint_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The remaining length as a varint of 1 to 4 bytes, minimal (section 2.2.3).
fn put_remaining_length(out: &mut BytesMut, len: usize) {
    debug_assert!(
        len <= MAX_REMAINING_LENGTH,
        "remaining length {len} exceeds {MAX_REMAINING_LENGTH}"
    );
    let mut rest = len;
    loop {
        let digit = (rest % 128) as u8;
        rest /= 128;
        if rest == 0 {
            out.put_u8(digit);
            return;
        }
        out.put_u8(digit | 0x80);
    }
}
