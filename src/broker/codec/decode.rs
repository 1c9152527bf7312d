//! Decoding (placeholder until the codec lands).
use super::Packet;
use bytes::BytesMut;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    PacketTooLarge { size: usize, max: usize },
}

pub fn decode(_buf: &mut BytesMut, _max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    Ok(None)
}

impl DecodeError {
    /// The CONNACK return code the spec asks for when this error is in a CONNECT, if any.
    pub fn connack_code(&self) -> Option<super::ConnectReturnCode> {
        None
    }
}
