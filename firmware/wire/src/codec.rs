//! Encoding and decoding of single frames: postcard body, CRC-32/ISCSI trailer, COBS stuffing.

use core::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{Body, Frame, FrameKind, Header};
use crate::{CRC_LEN, MAX_FRAME, MAX_RAW, PROTOCOL_VERSION};

/// The frame check: CRC-32/ISCSI (Castagnoli), table driven (1 KiB of flash).
pub(crate) const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The CRC of `bytes` as this format computes it (CRC-32/ISCSI).
pub fn checksum(bytes: &[u8]) -> u32 {
    CRC.checksum(bytes)
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The output buffer is too small; a buffer of [`MAX_FRAME`] bytes always suffices.
    BufferTooSmall,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall => {
                write!(f, "output buffer too small (use {MAX_FRAME} bytes)")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EncodeError {}

/// Why bytes between two delimiters are not a frame. Every variant is counted by the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// A lone delimiter (zero-length frame). Senders may send one to flush a receiver's partial
    /// frame, so this is normal right after a node boots.
    Empty,
    /// More bytes than the receiver's buffer before a delimiter; skipped up to the next delimiter.
    Oversize,
    /// The stream ended (port closed) in the middle of a frame: see [`crate::FrameAccumulator::finish`].
    Unterminated,
    /// Invalid COBS stuffing.
    Cobs,
    /// Too short to hold version, kind and CRC.
    Truncated,
    /// CRC mismatch: the bytes were corrupted (or two frames ran together).
    Crc,
    /// A CRC-valid frame of a protocol version this build does not speak.
    UnknownVersion(u8),
    /// A CRC-valid frame of a kind this build does not know; the header if it parsed.
    UnknownKind { kind: u8, header: Option<Header> },
    /// The header's varints do not parse.
    Header,
    /// The body does not decode for its kind (e.g. a newer `Command`); the header is intact,
    /// so the receiver can answer with a negative `Ack`.
    Body { kind: FrameKind, header: Header },
}

impl FrameError {
    /// A stable snake_case label for metrics.
    pub const fn name(&self) -> &'static str {
        match self {
            FrameError::Empty => "empty",
            FrameError::Oversize => "oversize",
            FrameError::Unterminated => "unterminated",
            FrameError::Cobs => "cobs",
            FrameError::Truncated => "truncated",
            FrameError::Crc => "crc",
            FrameError::UnknownVersion(_) => "unknown_version",
            FrameError::UnknownKind { .. } => "unknown_kind",
            FrameError::Header => "header",
            FrameError::Body { .. } => "body",
        }
    }

    /// The header of the failed frame, when it was CRC-valid and parsed far enough.
    pub const fn header(&self) -> Option<Header> {
        match self {
            FrameError::UnknownKind { header, .. } => *header,
            FrameError::Body { header, .. } => Some(*header),
            _ => None,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Empty => f.write_str("empty frame"),
            FrameError::Oversize => f.write_str("frame too large"),
            FrameError::Unterminated => f.write_str("stream ended inside a frame"),
            FrameError::Cobs => f.write_str("invalid COBS encoding"),
            FrameError::Truncated => f.write_str("frame too short"),
            FrameError::Crc => f.write_str("CRC mismatch"),
            FrameError::UnknownVersion(v) => write!(f, "unknown protocol version {v}"),
            FrameError::UnknownKind { kind, .. } => write!(f, "unknown frame kind {kind}"),
            FrameError::Header => f.write_str("undecodable header"),
            FrameError::Body { kind, .. } => write!(f, "undecodable {} body", kind.name()),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// Encodes `frame` into `buf` as a complete wire frame: COBS-stuffed, ending with the 0x00
/// delimiter, ready to write to a UART or radio. Returns the used prefix of `buf`.
pub fn encode<'b>(frame: &Frame, buf: &'b mut [u8]) -> Result<&'b [u8], EncodeError> {
    let mut raw = [0u8; MAX_RAW];
    let raw_len = encode_raw(frame, &mut raw)?.len();
    let len = cobs_encode(&raw[..raw_len], buf).ok_or(EncodeError::BufferTooSmall)?;
    let delimiter = buf.get_mut(len).ok_or(EncodeError::BufferTooSmall)?;
    *delimiter = 0;
    Ok(&buf[..=len])
}

/// Encodes `frame` without COBS stuffing: version, kind, header, body, CRC. This is what a
/// [`crate::Relayed`] frame carries and what [`decode_raw`] reads.
pub fn encode_raw<'b>(frame: &Frame, buf: &'b mut [u8]) -> Result<&'b [u8], EncodeError> {
    if buf.len() < 2 {
        return Err(EncodeError::BufferTooSmall);
    }
    buf[0] = PROTOCOL_VERSION;
    buf[1] = frame.kind().code();
    let h = &frame.header;
    let mut len = 2;
    len += put(&(h.node_id, h.boot_id, h.seq), &mut buf[len..])?;
    len += match &frame.body {
        Body::Hello(b) => put(b, &mut buf[len..])?,
        Body::Readings(b) => put(b, &mut buf[len..])?,
        Body::Heartbeat(b) => put(b, &mut buf[len..])?,
        Body::Ack(b) => put(b, &mut buf[len..])?,
        Body::Command(b) => put(b, &mut buf[len..])?,
        Body::Log(b) => put(b, &mut buf[len..])?,
        Body::Relayed(b) => put(b, &mut buf[len..])?,
    };
    let crc = CRC.checksum(&buf[..len]).to_le_bytes();
    buf.get_mut(len..len + CRC_LEN)
        .ok_or(EncodeError::BufferTooSmall)?
        .copy_from_slice(&crc);
    Ok(&buf[..len + CRC_LEN])
}

fn put<T: Serialize>(value: &T, buf: &mut [u8]) -> Result<usize, EncodeError> {
    // The only way serialising our types fails is running out of buffer.
    postcard::to_slice(value, buf)
        .map(|used| used.len())
        .map_err(|_| EncodeError::BufferTooSmall)
}

/// Decodes a raw (unstuffed) frame: checks length, CRC, version and kind, then the header and body.
pub fn decode_raw(raw: &[u8]) -> Result<Frame, FrameError> {
    if raw.len() < 2 + CRC_LEN {
        return Err(FrameError::Truncated);
    }
    let (content, crc) = raw.split_at(raw.len() - CRC_LEN);
    let mut expected = [0u8; CRC_LEN];
    expected.copy_from_slice(crc);
    if CRC.checksum(content) != u32::from_le_bytes(expected) {
        return Err(FrameError::Crc);
    }
    if content[0] != PROTOCOL_VERSION {
        return Err(FrameError::UnknownVersion(content[0]));
    }
    let kind_code = content[1];
    let parsed = postcard::take_from_bytes::<(u32, u32, u32)>(&content[2..]);
    let kind = match FrameKind::from_code(kind_code) {
        Some(kind) => kind,
        None => {
            let header = parsed.ok().map(|((n, b, s), _)| Header::new(n, b, s));
            return Err(FrameError::UnknownKind {
                kind: kind_code,
                header,
            });
        }
    };
    let ((node_id, boot_id, seq), body) = parsed.map_err(|_| FrameError::Header)?;
    let header = Header::new(node_id, boot_id, seq);
    let bad_body = FrameError::Body { kind, header };
    let body = match kind {
        FrameKind::Hello => Body::Hello(take(body).ok_or(bad_body)?),
        FrameKind::Readings => Body::Readings(take(body).ok_or(bad_body)?),
        FrameKind::Heartbeat => Body::Heartbeat(take(body).ok_or(bad_body)?),
        FrameKind::Ack => Body::Ack(take(body).ok_or(bad_body)?),
        FrameKind::Command => Body::Command(take(body).ok_or(bad_body)?),
        FrameKind::Log => Body::Log(take(body).ok_or(bad_body)?),
        FrameKind::Relayed => Body::Relayed(take(body).ok_or(bad_body)?),
    };
    Ok(Frame { header, body })
}

/// Deserialises the whole of `bytes` as `T`; trailing bytes are an error (strict decoding).
fn take<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Some(value),
        _ => None,
    }
}

/// Un-stuffs one wire frame (with or without its trailing delimiter) into `out` and checks its
/// CRC, returning the raw frame. A radio bridge uses this to wrap a received frame in
/// [`crate::Relayed`] without decoding it.
pub fn unframe<'o>(encoded: &[u8], out: &'o mut [u8]) -> Result<&'o [u8], FrameError> {
    let encoded = encoded.strip_suffix(&[0]).unwrap_or(encoded);
    if encoded.is_empty() {
        return Err(FrameError::Empty);
    }
    let out = out.get_mut(..encoded.len()).ok_or(FrameError::Oversize)?;
    out.copy_from_slice(encoded);
    let len = cobs_decode_in_place(out).ok_or(FrameError::Cobs)?;
    let raw = &out[..len];
    if raw.len() < 2 + CRC_LEN {
        return Err(FrameError::Truncated);
    }
    let (content, crc) = raw.split_at(raw.len() - CRC_LEN);
    if CRC.checksum(content).to_le_bytes() != crc {
        return Err(FrameError::Crc);
    }
    Ok(raw)
}

/// COBS-encodes `src` into `dst` (no delimiter). Returns the encoded length, `None` if `dst`
/// is too small. Output is at most `src.len() + src.len() / 254 + 1` bytes.
pub(crate) fn cobs_encode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut code_at = 0;
    let mut write = 1;
    let mut code: u8 = 1;
    if dst.is_empty() {
        return None;
    }
    for &byte in src {
        if byte == 0 {
            dst[code_at] = code;
            code_at = write;
            write += 1;
            code = 1;
        } else {
            *dst.get_mut(write)? = byte;
            write += 1;
            code += 1;
            if code == 0xFF {
                dst[code_at] = code;
                code_at = write;
                write += 1;
                code = 1;
            }
        }
        if code_at >= dst.len() {
            return None;
        }
    }
    dst[code_at] = code;
    Some(write)
}

/// Decodes COBS in place (the output never overtakes the input). Returns the decoded length,
/// `None` for a zero byte or a code that runs past the end.
pub(crate) fn cobs_decode_in_place(buf: &mut [u8]) -> Option<usize> {
    let mut read = 0;
    let mut write = 0;
    while read < buf.len() {
        let code = buf[read];
        if code == 0 {
            return None;
        }
        read += 1;
        let run = code as usize - 1;
        if read + run > buf.len() {
            return None;
        }
        if buf[read..read + run].contains(&0) {
            return None;
        }
        buf.copy_within(read..read + run, write);
        read += run;
        write += run;
        if code != 0xFF && read < buf.len() {
            buf[write] = 0;
            write += 1;
        }
    }
    Some(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(src: &[u8]) -> usize {
        let mut enc = [0u8; 600];
        let n = cobs_encode(src, &mut enc).unwrap();
        assert!(!enc[..n].contains(&0));
        assert!(n <= src.len() + src.len() / 254 + 1);
        let len = cobs_decode_in_place(&mut enc[..n]).unwrap();
        assert_eq!(&enc[..len], src);
        n
    }

    #[test]
    fn cobs_round_trips_zeros_and_long_runs() {
        assert_eq!(round_trip(&[]), 1);
        assert_eq!(round_trip(&[0]), 2);
        assert_eq!(round_trip(&[0, 0, 1, 0]), 5);
        let long: [u8; 520] = core::array::from_fn(|i| (i % 255) as u8 + 1);
        round_trip(&long[..253]);
        round_trip(&long[..254]);
        round_trip(&long[..255]);
        round_trip(&long);
    }

    #[test]
    fn cobs_encode_refuses_a_short_buffer() {
        let mut enc = [0u8; 4];
        assert_eq!(cobs_encode(&[1, 2, 3, 4], &mut enc), None);
        assert_eq!(cobs_encode(&[1, 2, 3], &mut enc), Some(4));
    }

    #[test]
    fn cobs_decode_rejects_overlong_codes_and_zeros() {
        assert_eq!(cobs_decode_in_place(&mut [3, 1]), None);
        assert_eq!(cobs_decode_in_place(&mut [3, 0, 1]), None);
        assert_eq!(cobs_decode_in_place(&mut [0]), None);
    }
}
