//! The check the fuzz target runs on every input, shared with `tests/codec_corpus.rs` so that
//! the corpus and every crasher found stay regression tests under plain `cargo test`.
//!
//! Expects the codec at `crate::codec`.

use bytes::BytesMut;

use crate::codec::{DecodeError, Packet, ProtocolLevel, decode, encode, encoded_len};

/// The packet size limit inputs are decoded with.
pub const MAX_PACKET_SIZE: usize = 64 * 1024;

/// How decoding an input ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Every byte was decoded into packets.
    Consumed,
    /// This many bytes are left: the start of a packet that is not complete.
    NeedMore(usize),
    /// Bad bytes; the connection would be closed.
    Error(DecodeError),
}

#[derive(Debug)]
pub struct Outcome {
    pub packets: Vec<Packet>,
    pub end: End,
}

/// Decodes packets from `input` until it fails or needs more bytes, and panics unless, for each
/// packet decoded:
/// - every strict prefix of its frame needs more bytes and consumes nothing;
/// - a limit one byte below its size refuses it as too large;
/// - its re-encoding has `encoded_len` bytes, equals the input frame byte for byte (except the
///   reserved CONNECT flag an MQTT 3.1 client may set, which is ignored) and decodes to the
///   same packet.
pub fn check(input: &[u8]) -> Outcome {
    let mut buf = BytesMut::from(input);
    let mut packets = Vec::new();
    loop {
        if buf.is_empty() {
            return Outcome {
                packets,
                end: End::Consumed,
            };
        }
        let before = buf.clone();
        let packet = match decode(&mut buf, MAX_PACKET_SIZE) {
            Ok(Some(packet)) => packet,
            Ok(None) => {
                assert_eq!(buf, before, "need-more-bytes consumed input");
                return Outcome {
                    packets,
                    end: End::NeedMore(buf.len()),
                };
            }
            Err(error) => {
                return Outcome {
                    packets,
                    end: End::Error(error),
                };
            }
        };
        let frame = &before[..before.len() - buf.len()];
        check_prefixes(frame);
        check_limit(frame);
        check_reencoding(&packet, frame);
        packets.push(packet);
    }
}

fn check_prefixes(frame: &[u8]) {
    for len in 0..frame.len() {
        let mut prefix = BytesMut::from(&frame[..len]);
        assert_eq!(
            decode(&mut prefix, MAX_PACKET_SIZE),
            Ok(None),
            "a {len}-byte prefix of a valid packet is not incomplete"
        );
        assert_eq!(&prefix[..], &frame[..len], "a prefix was consumed");
    }
}

fn check_limit(frame: &[u8]) {
    let max = frame.len() - 1;
    assert_eq!(
        decode(&mut BytesMut::from(frame), max),
        Err(DecodeError::PacketTooLarge {
            size: frame.len(),
            max
        }),
        "a limit below the packet size does not refuse it"
    );
}

fn check_reencoding(packet: &Packet, frame: &[u8]) {
    let mut reencoded = BytesMut::new();
    encode(packet, &mut reencoded);
    assert_eq!(
        reencoded.len(),
        encoded_len(packet),
        "encoded_len disagrees"
    );
    let mqtt_3_1_connect = matches!(packet, Packet::Connect(c) if c.protocol == ProtocolLevel::V31);
    if mqtt_3_1_connect {
        assert_eq!(
            reencoded.len(),
            frame.len(),
            "3.1 CONNECT re-encoded to another size"
        );
    } else {
        assert_eq!(&reencoded[..], frame, "re-encoding differs from the input");
    }
    let again = decode(&mut reencoded, MAX_PACKET_SIZE);
    assert_eq!(
        again.as_ref(),
        Ok(&Some(packet.clone())),
        "re-encoding decodes differently"
    );
    assert!(reencoded.is_empty(), "re-encoding left bytes behind");
}
