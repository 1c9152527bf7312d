//! Frame encoding and decoding: pure functions over byte slices, no I/O.
//!
//! Decoding distinguishes a frame that is cut short ([`Scan::Incomplete`]) from one whose bytes
//! are wrong ([`Scan::Bad`]); recovery decides from the position which of the two is a torn tail.

use bytes::Bytes;
use crc::{CRC_32_ISCSI, Crc};

/// Start of every frame; lets recovery find the next frame after a damaged region.
pub const MAGIC: [u8; 4] = *b"SGOB";
/// Magic, body length, CRC.
pub const HEADER_LEN: usize = 12;
/// A body longer than this is treated as damage, not as a record.
pub const MAX_BODY_LEN: usize = 64 * 1024 * 1024;

const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

pub const KIND_DATA: u8 = 1;
pub const KIND_ACK: u8 = 2;
pub const KIND_DROP: u8 = 3;
pub const KIND_PACKET_ID: u8 = 4;
pub const KIND_RELEASED: u8 = 5;
pub const KIND_STATE: u8 = 6;
pub const KIND_SNAPSHOT: u8 = 7;

/// Why a record left the outbox other than by acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Oldest = 1,
    Expired = 2,
    Corrupt = 3,
}

impl DropReason {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Oldest),
            2 => Some(Self::Expired),
            3 => Some(Self::Corrupt),
            _ => None,
        }
    }
}

/// A data record's fields as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataBody {
    pub id: u64,
    pub timestamp_ms: u64,
    pub qos: u8,
    pub retain: bool,
    pub state: Vec<(String, Bytes)>,
    pub topic: String,
    pub payload: Bytes,
}

/// QoS 2 delivery state of one live record, as carried in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos2State {
    pub id: u64,
    pub packet_id: Option<u16>,
    pub released: bool,
}

/// Cumulative state written at the head of every segment, so that older segments can be
/// deleted without losing the acknowledgements, delivery state and keyed state they carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every id below this was assigned before the snapshot was written.
    pub next_id: u64,
    /// Every id below this is removed (acknowledged or dropped).
    pub low: u64,
    /// Removed ids in `low..next_id`, as inclusive ranges.
    pub removed: Vec<(u64, u64)>,
    pub qos2: Vec<Qos2State>,
    pub state: Vec<(String, Bytes)>,
}

/// One decoded frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Data(DataBody),
    /// Inclusive range of acknowledged ids.
    Ack(u64, u64),
    Drop(u64, u64, DropReason),
    PacketId(u64, u16),
    Released(u64),
    State(String, Bytes),
    Snapshot(Snapshot),
    /// A kind written by a newer version; skipped.
    Unknown(u8),
}

/// What lies at an offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// A frame with a valid CRC; `len` bytes long in total.
    Frame { body: Body, len: usize },
    /// The bytes end before the frame does (or before a header).
    Incomplete,
    /// The bytes here are not a valid frame.
    Bad,
}

/// Appends one frame around `body` to `out`.
fn frame(out: &mut Vec<u8>, body: &[u8]) {
    let len = (body.len() as u32).to_le_bytes();
    let mut digest = CRC32C.digest();
    digest.update(&len);
    digest.update(body);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&digest.finalize().to_le_bytes());
    out.extend_from_slice(body);
}

fn put_key(b: &mut Vec<u8>, key: &str) {
    b.push(key.len() as u8);
    b.extend_from_slice(key.as_bytes());
}

fn put_kv(b: &mut Vec<u8>, key: &str, value: &[u8]) {
    put_key(b, key);
    b.extend_from_slice(&(value.len() as u32).to_le_bytes());
    b.extend_from_slice(value);
}

/// Encoded size of a data frame, without building it.
pub fn data_frame_len(topic: &str, payload_len: usize, state: &[(String, Bytes)]) -> usize {
    let kv: usize = state.iter().map(|(k, v)| 1 + k.len() + 4 + v.len()).sum();
    HEADER_LEN + 1 + 8 + 8 + 1 + 1 + 1 + kv + 2 + topic.len() + payload_len
}

/// Appends a data frame. Keys must be at most 255 bytes, topics at most 65535 (checked by
/// the caller).
pub fn encode_data(out: &mut Vec<u8>, d: &DataBody) {
    let mut b = Vec::with_capacity(data_frame_len(&d.topic, d.payload.len(), &d.state));
    b.push(KIND_DATA);
    b.extend_from_slice(&d.id.to_le_bytes());
    b.extend_from_slice(&d.timestamp_ms.to_le_bytes());
    b.push(d.qos);
    b.push(u8::from(d.retain));
    b.push(d.state.len() as u8);
    for (k, v) in &d.state {
        put_kv(&mut b, k, v);
    }
    b.extend_from_slice(&(d.topic.len() as u16).to_le_bytes());
    b.extend_from_slice(d.topic.as_bytes());
    b.extend_from_slice(&d.payload);
    frame(out, &b);
}

/// Appends any non-data frame.
pub fn encode(out: &mut Vec<u8>, body: &Body) {
    let mut b = Vec::with_capacity(32);
    match body {
        Body::Data(d) => return encode_data(out, d),
        Body::Ack(first, last) => {
            b.push(KIND_ACK);
            b.extend_from_slice(&first.to_le_bytes());
            b.extend_from_slice(&last.to_le_bytes());
        }
        Body::Drop(first, last, reason) => {
            b.push(KIND_DROP);
            b.extend_from_slice(&first.to_le_bytes());
            b.extend_from_slice(&last.to_le_bytes());
            b.push(*reason as u8);
        }
        Body::PacketId(id, pkid) => {
            b.push(KIND_PACKET_ID);
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&pkid.to_le_bytes());
        }
        Body::Released(id) => {
            b.push(KIND_RELEASED);
            b.extend_from_slice(&id.to_le_bytes());
        }
        Body::State(key, value) => {
            b.push(KIND_STATE);
            put_key(&mut b, key);
            b.extend_from_slice(value);
        }
        Body::Snapshot(s) => {
            b.push(KIND_SNAPSHOT);
            b.extend_from_slice(&s.next_id.to_le_bytes());
            b.extend_from_slice(&s.low.to_le_bytes());
            b.extend_from_slice(&(s.removed.len() as u32).to_le_bytes());
            for (first, last) in &s.removed {
                b.extend_from_slice(&first.to_le_bytes());
                b.extend_from_slice(&last.to_le_bytes());
            }
            b.extend_from_slice(&(s.qos2.len() as u32).to_le_bytes());
            for q in &s.qos2 {
                b.extend_from_slice(&q.id.to_le_bytes());
                b.extend_from_slice(&q.packet_id.unwrap_or(0).to_le_bytes());
                b.push(u8::from(q.packet_id.is_some()) | (u8::from(q.released) << 1));
            }
            b.extend_from_slice(&(s.state.len() as u32).to_le_bytes());
            for (k, v) in &s.state {
                put_kv(&mut b, k, v);
            }
        }
        Body::Unknown(kind) => b.push(*kind),
    }
    frame(out, &b);
}

/// Reads the frame at the start of `buf`.
pub fn scan(buf: &[u8]) -> Scan {
    if buf.len() < HEADER_LEN {
        return if MAGIC.starts_with(&buf[..buf.len().min(4)]) {
            Scan::Incomplete
        } else {
            Scan::Bad
        };
    }
    if buf[..4] != MAGIC {
        return Scan::Bad;
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len == 0 || len > MAX_BODY_LEN {
        return Scan::Bad;
    }
    if buf.len() < HEADER_LEN + len {
        return Scan::Incomplete;
    }
    let crc = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    let body = &buf[HEADER_LEN..HEADER_LEN + len];
    let mut digest = CRC32C.digest();
    digest.update(&buf[4..8]);
    digest.update(body);
    if digest.finalize() != crc {
        return Scan::Bad;
    }
    match decode_body(body) {
        Some(body) => Scan::Frame {
            body,
            len: HEADER_LEN + len,
        },
        None => Scan::Bad,
    }
}

/// A cursor over a body; every read returns `None` past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn key(&mut self) -> Option<String> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn kv(&mut self) -> Option<(String, Bytes)> {
        let key = self.key()?;
        let n = self.u32()? as usize;
        Some((key, Bytes::copy_from_slice(self.take(n)?)))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn done(&self) -> bool {
        self.buf.is_empty()
    }
}

fn decode_body(body: &[u8]) -> Option<Body> {
    let mut r = Reader { buf: body };
    let kind = r.u8()?;
    let decoded = match kind {
        KIND_DATA => {
            let id = r.u64()?;
            let timestamp_ms = r.u64()?;
            let qos = r.u8()?;
            let retain = r.u8()? & 1 == 1;
            let n = r.u8()?;
            let state = (0..n).map(|_| r.kv()).collect::<Option<Vec<_>>>()?;
            let tlen = r.u16()? as usize;
            let topic = String::from_utf8(r.take(tlen)?.to_vec()).ok()?;
            let payload = Bytes::copy_from_slice(r.rest());
            Body::Data(DataBody {
                id,
                timestamp_ms,
                qos,
                retain,
                state,
                topic,
                payload,
            })
        }
        KIND_ACK => Body::Ack(r.u64()?, r.u64()?),
        KIND_DROP => Body::Drop(r.u64()?, r.u64()?, DropReason::from_u8(r.u8()?)?),
        KIND_PACKET_ID => Body::PacketId(r.u64()?, r.u16()?),
        KIND_RELEASED => Body::Released(r.u64()?),
        KIND_STATE => Body::State(r.key()?, Bytes::copy_from_slice(r.rest())),
        KIND_SNAPSHOT => {
            let next_id = r.u64()?;
            let low = r.u64()?;
            let n = r.u32()? as usize;
            let mut removed = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                removed.push((r.u64()?, r.u64()?));
            }
            let n = r.u32()? as usize;
            let mut qos2 = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                let id = r.u64()?;
                let pkid = r.u16()?;
                let flags = r.u8()?;
                qos2.push(Qos2State {
                    id,
                    packet_id: (flags & 1 == 1).then_some(pkid),
                    released: flags & 2 == 2,
                });
            }
            let n = r.u32()? as usize;
            let mut state = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                state.push(r.kv()?);
            }
            Body::Snapshot(Snapshot {
                next_id,
                low,
                removed,
                qos2,
                state,
            })
        }
        other => return Some(Body::Unknown(other)),
    };
    r.done().then_some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u64) -> DataBody {
        DataBody {
            id,
            timestamp_ms: 1_700_000_000_000 + id,
            qos: 2,
            retain: true,
            state: vec![("inbound/pkid".into(), Bytes::from_static(b"\x00\x07"))],
            topic: "site/a/temp".into(),
            payload: Bytes::from_static(b"21.5"),
        }
    }

    #[test]
    fn every_kind_of_frame_round_trips() {
        let bodies = vec![
            Body::Data(data(7)),
            Body::Ack(3, 9),
            Body::Drop(1, 2, DropReason::Expired),
            Body::PacketId(4, 65535),
            Body::Released(4),
            Body::State("node/3".into(), Bytes::from_static(b"boot=1 seq=9")),
            Body::Snapshot(Snapshot {
                next_id: 10,
                low: 4,
                removed: vec![(5, 6)],
                qos2: vec![Qos2State {
                    id: 4,
                    packet_id: Some(1),
                    released: true,
                }],
                state: vec![("k".into(), Bytes::from_static(b"v"))],
            }),
        ];
        for body in bodies {
            let mut out = Vec::new();
            encode(&mut out, &body);
            assert_eq!(
                scan(&out),
                Scan::Frame {
                    body: body.clone(),
                    len: out.len()
                }
            );
        }
    }

    #[test]
    fn the_predicted_data_frame_length_is_exact() {
        let d = data(1);
        let mut out = Vec::new();
        encode_data(&mut out, &d);
        assert_eq!(
            out.len(),
            data_frame_len(&d.topic, d.payload.len(), &d.state)
        );
    }

    #[test]
    fn a_cut_frame_is_incomplete_and_a_flipped_bit_is_bad() {
        let mut out = Vec::new();
        encode_data(&mut out, &data(1));
        for cut in 0..out.len() {
            assert_eq!(scan(&out[..cut]), Scan::Incomplete, "cut at {cut}");
        }
        for i in 0..out.len() {
            let mut damaged = out.clone();
            damaged[i] ^= 0x10;
            assert!(
                matches!(scan(&damaged), Scan::Bad | Scan::Incomplete),
                "flip at {i}"
            );
        }
    }

    #[test]
    fn zeros_are_not_a_frame() {
        assert_eq!(scan(&[0u8; 64]), Scan::Bad);
        assert_eq!(scan(&[0u8; 3]), Scan::Bad);
    }
}
