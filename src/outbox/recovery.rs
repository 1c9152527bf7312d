//! Start-up scan: reads every segment in order and rebuilds the index of pending records,
//! their delivery state, the keyed state and the next id. Reading never fails because of what
//! the files contain; only I/O errors (with the path) come back as errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::format::{self, Body, DataBody, Scan};
use super::{OutboxError, RecoveryReport};

/// Where a pending record lives and what the uplink needs to know without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub timestamp_ms: u64,
    pub qos: u8,
    pub packet_id: Option<u16>,
    pub released: bool,
}

/// One segment file as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub path: PathBuf,
    pub number: u64,
    pub file_len: u64,
    /// End of the last valid frame.
    pub data_end: u64,
    /// Non-zero bytes after `data_end` that form no valid frame (a torn write).
    pub torn_bytes: u64,
}

pub(crate) struct Recovered {
    pub index: BTreeMap<u64, Entry>,
    /// Kept only for `inspect`, which shows payloads without reading files twice.
    pub bodies: BTreeMap<u64, DataBody>,
    pub kv: BTreeMap<String, Bytes>,
    pub next_id: u64,
    pub segments: Vec<SegmentSummary>,
    pub report: RecoveryReport,
}

pub(crate) const SEGMENT_SUFFIX: &str = ".seg";

pub(crate) fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}{SEGMENT_SUFFIX}"))
}

fn io_error(path: &Path, source: std::io::Error) -> OutboxError {
    OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Segment numbers found in `dir`, in order. Other files are ignored.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>, OutboxError> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX)
            && stem.len() == 20
            && let Ok(n) = stem.parse::<u64>()
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// The offset of the next valid frame at or after `from`, if any.
fn next_frame(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + format::HEADER_LEN <= buf.len() {
        let pos = buf[i..].windows(4).position(|w| w == format::MAGIC)?;
        i += pos;
        if matches!(format::scan(&buf[i..]), Scan::Frame { .. }) {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn remove_range(index: &mut BTreeMap<u64, Entry>, first: u64, last: u64) {
    if first > last {
        return;
    }
    let ids: Vec<u64> = index.range(first..=last).map(|(id, _)| *id).collect();
    for id in ids {
        index.remove(&id);
    }
}

impl Recovered {
    fn apply(&mut self, body: Body, segment: u64, offset: u64, len: usize, keep_bodies: bool) {
        match body {
            Body::Data(d) => {
                self.next_id = self.next_id.max(d.id + 1);
                for (k, v) in &d.state {
                    self.kv.insert(k.clone(), v.clone());
                }
                self.index.insert(
                    d.id,
                    Entry {
                        segment,
                        offset,
                        len: len as u32,
                        timestamp_ms: d.timestamp_ms,
                        qos: d.qos,
                        packet_id: None,
                        released: false,
                    },
                );
                if keep_bodies {
                    self.bodies.insert(d.id, d);
                }
            }
            Body::Ack(first, last) | Body::Drop(first, last, _) => {
                remove_range(&mut self.index, first, last)
            }
            Body::PacketId(id, pkid) => {
                if let Some(e) = self.index.get_mut(&id) {
                    e.packet_id = Some(pkid);
                }
            }
            Body::Released(id) => {
                if let Some(e) = self.index.get_mut(&id) {
                    e.released = true;
                }
            }
            Body::State(k, v) => {
                self.kv.insert(k, v);
            }
            Body::Snapshot(s) => {
                self.next_id = self.next_id.max(s.next_id);
                let below: Vec<u64> = self.index.range(..s.low).map(|(id, _)| *id).collect();
                for id in below {
                    self.index.remove(&id);
                }
                for (first, last) in s.removed {
                    remove_range(&mut self.index, first, last);
                }
                // Delivery state only moves forward, so merging never undoes a later record.
                for q in s.qos2 {
                    if let Some(e) = self.index.get_mut(&q.id) {
                        e.packet_id = e.packet_id.or(q.packet_id);
                        e.released |= q.released;
                    }
                }
                self.kv.extend(s.state);
            }
            Body::Unknown(_) => self.report.unknown_skipped += 1,
        }
    }

    /// Applies every frame of one segment; returns where its valid data ends and how many
    /// non-zero bytes follow that form no frame.
    fn scan_segment(&mut self, buf: &[u8], number: u64, keep_bodies: bool) -> (u64, u64) {
        let mut p = 0usize;
        loop {
            if p >= buf.len() {
                return (p as u64, 0);
            }
            match format::scan(&buf[p..]) {
                Scan::Frame { body, len } => {
                    self.apply(body, number, p as u64, len, keep_bodies);
                    p += len;
                }
                Scan::Incomplete | Scan::Bad => {
                    let Some(last_nonzero) = buf[p..].iter().rposition(|&b| b != 0) else {
                        return (p as u64, 0); // clean end: preallocated zeros
                    };
                    match next_frame(buf, p + 1) {
                        Some(q) => {
                            self.report.corrupt_skipped += 1;
                            self.report.corrupt_bytes += (q - p) as u64;
                            p = q;
                        }
                        None => return (p as u64, (p + last_nonzero + 1) as u64),
                    }
                }
            }
        }
    }
}

/// Scans `dir`. A damaged tail is counted as torn in the last segment (a write cut by a crash)
/// and as corrupt in any other segment (the writer never leaves a torn tail behind it).
pub(crate) fn scan_dir(dir: &Path, keep_bodies: bool) -> Result<Recovered, OutboxError> {
    let mut r = Recovered {
        index: BTreeMap::new(),
        bodies: BTreeMap::new(),
        kv: BTreeMap::new(),
        next_id: 1, // ids start at 1

        segments: Vec::new(),
        report: RecoveryReport::default(),
    };
    let numbers = list_segments(dir)?;
    let last = numbers.last().copied();
    for number in numbers {
        let path = segment_path(dir, number);
        let buf = std::fs::read(&path).map_err(|e| io_error(&path, e))?;
        let (data_end, torn) = r.scan_segment(&buf, number, keep_bodies);
        let torn_bytes = torn.saturating_sub(data_end);
        if Some(number) == last {
            r.report.torn_tail_bytes += torn_bytes;
        } else if torn_bytes > 0 {
            r.report.corrupt_skipped += 1;
            r.report.corrupt_bytes += torn_bytes;
        }
        r.segments.push(SegmentSummary {
            path,
            number,
            file_len: buf.len() as u64,
            data_end,
            torn_bytes,
        });
    }
    r.report.segments = r.segments.len();
    r.report.pending = r.index.len() as u64;
    r.report.pending_bytes = r.index.values().map(|e| u64::from(e.len)).sum();
    r.report.oldest_timestamp_ms = r.index.values().next().map(|e| e.timestamp_ms);
    r.report.next_id = r.next_id;
    r.report.state_keys =
        r.kv.keys()
            .filter(|k| !k.starts_with(super::RESERVED_KEY_PREFIX))
            .count();
    Ok(r)
}
