//! Encoding (placeholder until the codec lands).
use super::{Packet, Publish};
use bytes::BytesMut;

pub fn encode(_packet: &Packet, _out: &mut BytesMut) {}
pub fn encode_publish_head(_publish: &Publish, _out: &mut BytesMut) {}
