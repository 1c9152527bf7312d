//! The durable outbox: messages on their way to the upstream broker, kept on disk until the
//! upstream acknowledges them.
//!
//! # On-disk format
//!
//! The outbox directory holds segment files named by a 20-digit decimal sequence number,
//! `00000000000000000007.seg`. A new segment is preallocated (`set_len`, sparse) so the file
//! size never changes while it is written: each commit is an in-place write followed by
//! `fdatasync`, which then flushes data pages only, without an inode size update per commit.
//! Bytes past the last frame are zero. Every segment is a sequence of frames:
//!
//! ```text
//!  segment:  | frame | frame | ... | frame | 00 00 00 ... (preallocated) |
//!              ^ always a Snapshot (head) written when the segment was started
//!
//!  frame:    +------+----------+----------+------------------------+
//!            | SGOB | len: u32 | crc: u32 | body: len bytes        |   integers little-endian
//!            +------+----------+----------+------------------------+   crc = CRC-32C(len ++ body)
//!
//!  body[0] = kind, then:
//!   1 Data      id u64 | timestamp_ms u64 | qos u8 | flags u8 (bit 0 retain)
//!               | n u8 | n x (klen u8, key, vlen u32, value)      companion state, same CRC
//!               | tlen u16 | topic | payload (rest of the body)
//!   2 Ack       first u64 | last u64                               inclusive id range
//!   3 Drop      first u64 | last u64 | reason u8 (1 oldest, 2 expired, 3 corrupt)
//!   4 PacketId  id u64 | packet_id u16                             upstream QoS 2 packet id
//!   5 Released  id u64                                             PUBREC received
//!   6 State     klen u8 | key | value (rest)                       latest value per key wins
//!                                                                  ($outbox/drops: 5 x u64)
//!   7 Snapshot  next_id u64 | low u64                              all ids < low are removed
//!               | n u32 | n x (first u64, last u64)                removed ids in low..next_id
//!               | n u32 | n x (id u64, packet_id u16, flags u8)    QoS 2 state of live records
//!               | n u32 | n x (klen u8, key, vlen u32, value)      every state key
//! ```
//!
//! Data, acknowledgements, delivery state and keyed state share one append-only stream, so a
//! commit writes one contiguous run of bytes: at low rates one flash page per commit. The
//! snapshot at the head of each segment is cumulative, so any older segment whose records are
//! all removed can be deleted, in any order. Recovery replays the segments in order.
//!
//! # Group commit
//!
//! One std thread (`outbox-writer`) owns the files. Callers queue operations under a mutex and
//! get a [`Ticket`]; the writer takes everything queued, writes it with one `pwrite` and one
//! `fdatasync`, then completes the tickets. A batch is written `commit_delay` after its first
//! durable-ticket operation, or earlier once `commit_bytes` of records are queued; a batch of
//! only acknowledgements waits up to `ack_commit_delay`. Tokio tasks await tickets and never
//! touch the disk.
//!
//! Flash wear sets the defaults: every commit writes at least one 4 KiB page (plus, on average,
//! a rewrite of the page the previous commit left partly filled). At 10 messages/s, a 500 ms
//! delay puts about 5 records in each commit (under 1 KiB written per message); at high rates
//! the 32 KiB threshold commits early and keeps writes near 1.13 times the record bytes. The
//! price is up to 500 ms before a producer's acknowledgement at low rates; a deployment that
//! prefers latency sets `commit_delay` to 10 ms and pays about 4 KiB per message at low rates.
//! `benches/outbox.rs` measures both. (`write_bytes` does not include the filesystem journal;
//! preallocated segments keep `fdatasync` from journaling a size change on every commit.)
//!
//! # Crash guarantees
//!
//! * A completed append, `append_with_state`, `put_state`, `set_packet_id`, `mark_released`
//!   or `flush` ticket means the operation and every operation queued before it survive a crash
//!   (process, kernel or power), given a disk that honours `fdatasync`.
//! * Companion state given to `append_with_state` lives inside the data frame's CRC: after a
//!   crash either both the record and its state are present, or neither.
//! * An operation whose ticket did not complete may or may not be present after a crash.
//!   Ids of records that never became durable may be assigned again after a restart; an id that
//!   was ever readable from disk is never reused, including after all its segments are deleted
//!   (every snapshot carries `next_id`, and the newest segment is never deleted).
//! * `ack` is not durable on return; it becomes durable with the next commit (at the latest
//!   `ack_commit_delay` later, or with any ticket completed after it). After a crash an acked
//!   record can therefore be delivered again (at least once). For QoS 2 the durable
//!   `mark_released` decides: a released record resumes with PUBREL only.
//! * Recovery truncates a torn final write (non-zero bytes after the last valid frame of the
//!   last segment are zeroed and reported as `torn_tail_bytes`). A damaged region anywhere else
//!   is skipped up to the next valid frame, counted in `corrupt_skipped`, and the rest is
//!   delivered. A damaged snapshot or acknowledgement frame loses only removals and delivery
//!   state, so its records are delivered again rather than lost. Opening never fails because of
//!   file contents, only on I/O errors, which name the path.
//! * A failed write or `fdatasync` fails every ticket of that batch (appends hand their record
//!   back) and moves writing to a fresh segment, so committed frames are never overwritten and
//!   pages of uncertain state are never trusted.
//!
//! # Limits and drop policies
//!
//! `max_bytes` bounds the encoded bytes of pending and queued records. When an append does
//! not fit, `drop-oldest` drops the oldest records, `drop-newest` hands the new one back and
//! `block` keeps it waiting in RAM until acknowledgements free space; `max_age` drops records
//! older than that. Drop frames make these removals durable like acknowledgements.
//!
//! * Neither `drop-oldest` nor `max_age` ever drops a *released* record (PUBREC committed by
//!   `mark_released`): the upstream holds its packet id until our PUBREL, so dropping it would
//!   leave that id unanswered for good. They skip past it and drop the next droppable record.
//!   Released records are at most the uplink's window in number, so the skip is bounded; if
//!   only released records are left, a new record is itself the oldest droppable one.
//! * Every drop is counted by kind (oldest, newest, expired, too-large, invalid) in
//!   [`DropCounters`], logged at most once per kind per 10 s with the count since the last
//!   line, and written under the reserved state key `$outbox/drops` with the next commit, so
//!   the counters survive restarts (up to the last commit) and `inspect` sees them.
//! * Under `block`, producers reserve room with [`Outbox::wait_for_room`] before they hand a
//!   message on (the broker does, before the router sees a publish an out-rule stores); it
//!   waits while appends waiting for space, plus those reserved and on their way, would exceed
//!   [`Outbox::block_queue_bytes`] beyond the quota. So RAM stays bounded while the upstream
//!   is away. A reservation whose append never comes (a QoS 2 resend the broker does not
//!   forward again) is forgotten at the next commit with nothing waiting for space.
//!
//! Not covered: two processes opening one directory at once (the caller must prevent it), and
//! storage that acknowledges `fdatasync` without persisting.

mod format;
mod recovery;
mod writer;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot, watch};

pub use format::DropReason;
pub use recovery::SegmentSummary;

use format::{Body, DataBody, Scan};
use recovery::{Entry, segment_path};

/// Default delay between the first queued record and its commit. At 10 messages/s this
/// gathers about 5 records per commit, which keeps writes under 1 KiB per message on a
/// 4 KiB-page medium; the price is up to half a second before a producer's acknowledgement.
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_millis(500);

/// Default early-commit threshold. Each commit also rewrites the partly filled page left by
/// the previous one (one extra page on average), so batches of 32 KiB keep writes near 1.13
/// times the record bytes at high rates, while taking 3 ms to fill at 10,000 messages/s.
pub const DEFAULT_COMMIT_BYTES: usize = 32 * 1024;

/// Most bytes of appends held in RAM waiting for space under [`FullPolicy::Block`] before
/// producers are held back ([`Outbox::wait_for_room`]); the bound is a quarter of `max_bytes`
/// below that. 4 MiB is under 1 % of the smallest device's RAM, yet thousands of typical
/// records: enough to absorb a burst from many publishers without stalling them at once when
/// an acknowledgement frees room. A quarter of a small quota keeps RAM use proportional.
pub const BLOCK_QUEUE_MAX: u64 = 4 * 1024 * 1024;

/// Settings of one outbox.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Preallocated size of a segment; a batch larger than this gets a larger segment.
    pub segment_bytes: u64,
    /// Longest wait between a durable-ticket operation and the commit that holds it.
    pub commit_delay: Duration,
    /// Commit before `commit_delay` once this many bytes of records are queued.
    pub commit_bytes: usize,
    /// Longest wait before acknowledgements and drops alone are committed.
    pub ack_commit_delay: Duration,
    /// Quota on stored record bytes (encoded frames of pending and queued records). Each
    /// pending record also costs about 80 bytes of RAM in the index.
    pub max_bytes: u64,
    /// Records older than this (by their timestamp) are dropped and counted as expired.
    pub max_age: Option<Duration>,
    /// What an append does when the quota is reached.
    pub when_full: FullPolicy,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            segment_bytes: 8 * 1024 * 1024,
            commit_delay: DEFAULT_COMMIT_DELAY,
            commit_bytes: DEFAULT_COMMIT_BYTES,
            ack_commit_delay: Duration::from_secs(2),
            // About 400,000 small records: under 40 MB of index on a 512 MiB device.
            max_bytes: 64 * 1024 * 1024,
            max_age: None,
            when_full: FullPolicy::DropOldest,
        }
    }
}

/// What happens to an append that does not fit under `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// Drop the oldest pending records until the new one fits.
    #[default]
    DropOldest,
    /// Refuse the new record and hand it back.
    DropNewest,
    /// Wait for space; this is the backpressure that slows producers down.
    Block,
}

/// MQTT quality of service of the upstream publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl Qos {
    fn from_u8(v: u8) -> Option<Qos> {
        match v {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }
}

/// One message to deliver upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The upstream topic.
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// When the message was accepted, in unix milliseconds; drives `max_age` and `oldest age`.
    pub timestamp_ms: u64,
}

/// A stored record that waits for delivery, with its upstream delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: u64,
    pub record: Record,
    /// The QoS 2 packet id durably assigned with [`Outbox::set_packet_id`].
    pub packet_id: Option<u16>,
    /// PUBREC was received: resume with PUBREL only.
    pub released: bool,
}

/// Errors of the outbox as a whole and of tickets that carry no record.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the outbox is closed")]
    Closed,
    #[error("no pending record with id {0}")]
    UnknownId(u64),
    #[error("invalid state key {0:?}: it must be 1 to 255 bytes, not under `$outbox/`")]
    InvalidKey(String),
    #[error(
        "the outbox writer stopped before completing this operation; it may or may not be stored"
    )]
    WriterGone,
}

/// Why an append did not complete; every variant that can hand the record back does.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the outbox is full and its policy drops the newest record")]
    Full(Record),
    #[error("the record takes {size} bytes, more than the outbox quota of {max} bytes")]
    TooLarge { record: Record, size: u64, max: u64 },
    #[error("the record cannot be stored: {reason}")]
    Invalid { record: Record, reason: String },
    #[error("the outbox is closed")]
    Closed(Record),
    #[error("cannot write outbox file {}: {source}", path.display())]
    Io {
        record: Record,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the outbox writer stopped before completing this append; it may or may not be stored")]
    WriterGone,
}

impl AppendError {
    /// The record given back, if this error has it.
    pub fn into_record(self) -> Option<Record> {
        match self {
            AppendError::Full(record)
            | AppendError::TooLarge { record, .. }
            | AppendError::Invalid { record, .. }
            | AppendError::Closed(record)
            | AppendError::Io { record, .. } => Some(record),
            AppendError::WriterGone => None,
        }
    }
}

/// What an error becomes when the writer thread went away without answering.
pub trait WriterGoneError {
    fn writer_gone() -> Self;
}
impl WriterGoneError for OutboxError {
    fn writer_gone() -> Self {
        OutboxError::WriterGone
    }
}
impl WriterGoneError for AppendError {
    fn writer_gone() -> Self {
        AppendError::WriterGone
    }
}

/// Completes when the operation is durable (or has failed). Await it from async code, or call
/// [`Ticket::wait`] from a thread outside the runtime.
#[must_use = "a ticket tells when the operation is durable"]
pub struct Ticket<T, E: WriterGoneError> {
    rx: oneshot::Receiver<Result<T, E>>,
}

impl<T, E: WriterGoneError> Ticket<T, E> {
    fn channel() -> (oneshot::Sender<Result<T, E>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Ticket { rx })
    }

    fn ready(result: Result<T, E>) -> Self {
        let (tx, ticket) = Self::channel();
        let _ = tx.send(result);
        ticket
    }

    /// Blocks the current thread until the outcome is known. Panics inside an async context,
    /// like `blocking_recv`; await the ticket there.
    pub fn wait(self) -> Result<T, E> {
        self.rx
            .blocking_recv()
            .unwrap_or_else(|_| Err(E::writer_gone()))
    }
}

impl<T, E: WriterGoneError> Future for Ticket<T, E> {
    type Output = Result<T, E>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(E::writer_gone())))
    }
}

/// What recovery found at open (or what `inspect` found).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_timestamp_ms: Option<u64>,
    pub next_id: u64,
    pub state_keys: usize,
    /// Damaged regions skipped (each usually one frame).
    pub corrupt_skipped: u64,
    pub corrupt_bytes: u64,
    /// Bytes of a write cut short by a crash at the end of the log, removed at open.
    pub torn_tail_bytes: u64,
    /// Frames of a kind this version does not know (written by a newer version).
    pub unknown_skipped: u64,
}

/// Counters and levels, for `$SYS` topics and the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Committed records waiting for delivery.
    pub depth: u64,
    /// Their encoded bytes.
    pub bytes: u64,
    /// Timestamp of the oldest pending record.
    pub oldest_timestamp_ms: Option<u64>,
    /// Accepted records not yet committed.
    pub queued: u64,
    /// Appends waiting for space under [`FullPolicy::Block`].
    pub blocked: u64,
    pub next_id: u64,
    pub segments: u64,
    /// Bytes of the appends waiting under [`FullPolicy::Block`]; producers wait in
    /// [`Outbox::wait_for_room`] while this is at [`Outbox::block_queue_bytes`].
    pub blocked_bytes: u64,
    pub dropped_oldest: u64,
    pub dropped_newest: u64,
    pub expired: u64,
    /// Records larger than `max_bytes`, refused under every policy.
    pub dropped_too_large: u64,
    /// Records refused as [`AppendError::Invalid`] (topic or state keys out of range).
    pub dropped_invalid: u64,
    pub corrupt_skipped: u64,
    pub commits: u64,
    pub write_errors: u64,
    /// Bytes handed to `pwrite` since open.
    pub bytes_written: u64,
}

/// The result of [`inspect`]: everything in an outbox directory, read without changing it.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub report: RecoveryReport,
    pub segments: Vec<SegmentSummary>,
    pub pending: Vec<Pending>,
    pub state: Vec<(String, Bytes)>,
    /// The drop counters as last committed.
    pub drops: DropCounters,
}

/// Reads an outbox directory without modifying anything, for `sensorgate outbox dump`.
pub fn inspect(dir: impl AsRef<Path>) -> Result<Inspection, OutboxError> {
    let dir = dir.as_ref();
    let mut r = recovery::scan_dir(dir, true)?;
    let pending = r
        .index
        .iter()
        .filter_map(|(id, e)| {
            let body = r.bodies.remove(id)?;
            Some(pending_from(body, e))
        })
        .collect();
    let drops =
        r.kv.remove(DROPS_KEY)
            .map(|v| DropCounters::decode(&v))
            .unwrap_or_default();
    Ok(Inspection {
        report: r.report,
        segments: r.segments,
        pending,
        state: r
            .kv
            .into_iter()
            .filter(|(k, _)| !k.starts_with(RESERVED_KEY_PREFIX))
            .collect(),
        drops,
    })
}

fn pending_from(d: DataBody, e: &Entry) -> Pending {
    Pending {
        id: d.id,
        record: Record {
            topic: d.topic,
            payload: d.payload,
            qos: Qos::from_u8(d.qos).unwrap_or(Qos::AtLeastOnce),
            retain: d.retain,
            timestamp_ms: d.timestamp_ms,
        },
        packet_id: e.packet_id,
        released: e.released,
    }
}

/// The bytes a record takes in the outbox (its data frame without companion state): what
/// a producer reserves with [`Outbox::wait_for_room`].
pub fn record_size(record: &Record) -> u64 {
    format::data_frame_len(&record.topic, record.payload.len(), &[]) as u64
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An operation waiting for the writer.
pub(crate) enum Op {
    Append {
        id: u64,
        record: Record,
        state: Vec<(String, Bytes)>,
        size: u64,
        done: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// Acknowledged (`reason` None) or dropped by policy.
    Removed { id: u64, reason: Option<DropReason> },
    PacketId {
        id: u64,
        packet_id: u16,
        done: oneshot::Sender<Result<(), OutboxError>>,
    },
    Released {
        id: u64,
        done: oneshot::Sender<Result<(), OutboxError>>,
    },
    State {
        key: String,
        value: Bytes,
        done: oneshot::Sender<Result<(), OutboxError>>,
    },
    Flush {
        done: oneshot::Sender<Result<(), OutboxError>>,
    },
}

struct BlockedAppend {
    record: Record,
    state: Vec<(String, Bytes)>,
    size: u64,
    done: oneshot::Sender<Result<u64, AppendError>>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Cumulative over the outbox's life: persisted under [`DROPS_KEY`].
    drops: DropCounters,
    corrupt_skipped: u64,
    commits: u64,
    write_errors: u64,
    bytes_written: u64,
}

/// The state key that carries the drop counters, so they survive restarts and are visible to
/// `sensorgate outbox`. Reserved: `put_state` and `append_with_state` refuse keys under
/// `$outbox/`, and `state`/`states` never return it.
pub(crate) const DROPS_KEY: &str = "$outbox/drops";
const RESERVED_KEY_PREFIX: &str = "$outbox/";

/// Records dropped by a policy or refused at append, by kind, over the outbox's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// Dropped by `drop-oldest` to make room.
    pub oldest: u64,
    /// Refused by `drop-newest` (handed back as [`AppendError::Full`]).
    pub newest: u64,
    /// Older than `max-age`.
    pub expired: u64,
    /// Larger than `max-bytes` ([`AppendError::TooLarge`]).
    pub too_large: u64,
    /// Refused as [`AppendError::Invalid`].
    pub invalid: u64,
}

impl DropCounters {
    /// `(name, count)` per kind, in a stable order: for metrics and the CLI.
    pub fn by_kind(&self) -> [(&'static str, u64); 5] {
        DropKind::ALL.map(|k| (k.name(), self.get(k)))
    }

    fn get(&self, kind: DropKind) -> u64 {
        match kind {
            DropKind::Oldest => self.oldest,
            DropKind::Newest => self.newest,
            DropKind::Expired => self.expired,
            DropKind::TooLarge => self.too_large,
            DropKind::Invalid => self.invalid,
        }
    }

    fn add(&mut self, kind: DropKind, n: u64) {
        let c = match kind {
            DropKind::Oldest => &mut self.oldest,
            DropKind::Newest => &mut self.newest,
            DropKind::Expired => &mut self.expired,
            DropKind::TooLarge => &mut self.too_large,
            DropKind::Invalid => &mut self.invalid,
        };
        *c += n;
    }

    /// Five little-endian u64s in [`DropKind::ALL`] order.
    fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(40);
        for (_, n) in self.by_kind() {
            v.extend_from_slice(&n.to_le_bytes());
        }
        Bytes::from(v)
    }

    /// Tolerates a shorter value (missing kinds are 0) and ignores extra bytes, so other
    /// versions can add kinds.
    pub(crate) fn decode(value: &[u8]) -> DropCounters {
        let mut c = DropCounters::default();
        for (kind, chunk) in DropKind::ALL.into_iter().zip(value.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            c.add(kind, u64::from_le_bytes(b));
        }
        c
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropKind {
    Oldest,
    Newest,
    Expired,
    TooLarge,
    Invalid,
}

impl DropKind {
    const ALL: [DropKind; 5] = [
        DropKind::Oldest,
        DropKind::Newest,
        DropKind::Expired,
        DropKind::TooLarge,
        DropKind::Invalid,
    ];

    fn name(self) -> &'static str {
        match self {
            DropKind::Oldest => "oldest",
            DropKind::Newest => "newest",
            DropKind::Expired => "expired",
            DropKind::TooLarge => "too-large",
            DropKind::Invalid => "invalid",
        }
    }
}

/// At most one log line per drop kind per this period, carrying the count since the last one:
/// a full outbox drops a record per message, and a line each would flood the journal.
const DROP_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Rate limit of the drop warnings.
#[derive(Debug, Default)]
struct DropLog {
    last: [Option<Instant>; 5],
    unlogged: [u64; 5],
}

impl DropLog {
    /// Counts `n` drops of `kind`; returns the count to log now, if a line is due.
    fn record(&mut self, kind: DropKind, n: u64, now: Instant) -> Option<u64> {
        let k = kind as usize;
        self.unlogged[k] += n;
        self.take_if_due(k, now)
    }

    fn take_if_due(&mut self, k: usize, now: Instant) -> Option<u64> {
        let due = self.last[k].is_none_or(|t| now.duration_since(t) >= DROP_LOG_PERIOD);
        if !due || self.unlogged[k] == 0 {
            return None;
        }
        self.last[k] = Some(now);
        Some(std::mem::take(&mut self.unlogged[k]))
    }

    /// Counts held back whose period has passed (called by the writer as it goes), or all of
    /// them (`force`, at close).
    fn due(&mut self, now: Instant, force: bool) -> Vec<(DropKind, u64)> {
        let mut out = Vec::new();
        for kind in DropKind::ALL {
            let k = kind as usize;
            if force && self.unlogged[k] > 0 {
                self.last[k] = Some(now);
                out.push((kind, std::mem::take(&mut self.unlogged[k])));
            } else if let Some(n) = self.take_if_due(k, now) {
                out.push((kind, n));
            }
        }
        out
    }
}

fn log_drops(kind: DropKind, n: u64) {
    let why = match kind {
        DropKind::Oldest => {
            "the outbox is full: dropped the oldest records (when-full = drop-oldest)"
        }
        DropKind::Newest => "the outbox is full: refused new records (when-full = drop-newest)",
        DropKind::Expired => "dropped records older than max-age",
        DropKind::TooLarge => "refused records larger than the outbox quota (max-bytes)",
        DropKind::Invalid => {
            "refused records the outbox cannot store (topic or state keys too long)"
        }
    };
    tracing::warn!(kind = kind.name(), count = n, "{why}");
}

/// Everything callers and the writer share; guarded by one std mutex, never held across an
/// `.await` nor during disk I/O.
pub(crate) struct Shared {
    ops: Vec<Op>,
    first_op_at: Option<Instant>,
    first_urgent_at: Option<Instant>,
    /// Something queued asked to be committed without the group-commit delay.
    prompt: bool,
    queued_record_bytes: usize,
    closing: bool,
    crashed: bool,
    /// Committed, pending records.
    index: BTreeMap<u64, Entry>,
    index_bytes: u64,
    /// Accepted records not yet committed.
    queued_bytes: u64,
    queued_count: u64,
    next_id: u64,
    /// Every id below this is committed or failed.
    durable_next: u64,
    blocked: VecDeque<BlockedAppend>,
    /// Encoded bytes of `blocked`.
    blocked_bytes: u64,
    /// Bytes producers reserved in `wait_for_room` for appends still on their way.
    reserved_bytes: u64,
    kv: BTreeMap<String, Bytes>,
    /// Pending records per segment number.
    seg_live: BTreeMap<u64, u64>,
    counters: Counters,
    /// The drop counters last queued for writing under [`DROPS_KEY`].
    drops_written: DropCounters,
    drop_log: DropLog,
}

impl Shared {
    fn push(&mut self, op: Op) {
        let now = Instant::now();
        self.first_op_at.get_or_insert(now);
        match &op {
            Op::Removed { .. } => {}
            Op::Append { size, .. } => {
                self.queued_record_bytes += *size as usize;
                self.first_urgent_at.get_or_insert(now);
            }
            _ => {
                self.first_urgent_at.get_or_insert(now);
            }
        }
        self.ops.push(op);
    }

    fn take_ops(&mut self) -> Vec<Op> {
        self.first_op_at = None;
        self.first_urgent_at = None;
        self.prompt = false;
        self.queued_record_bytes = 0;
        std::mem::take(&mut self.ops)
    }

    fn stored_bytes(&self) -> u64 {
        self.index_bytes + self.queued_bytes
    }

    fn accept(
        &mut self,
        record: Record,
        state: Vec<(String, Bytes)>,
        size: u64,
        done: oneshot::Sender<Result<u64, AppendError>>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        self.queued_bytes += size;
        self.queued_count += 1;
        self.push(Op::Append {
            id,
            record,
            state,
            size,
            done,
        });
    }

    /// Removes a committed record from the index; the matching frame goes with the next batch.
    fn remove(&mut self, id: u64, reason: Option<DropReason>) -> bool {
        let Some(e) = self.index.remove(&id) else {
            return false;
        };
        self.index_bytes -= u64::from(e.len);
        if let Some(live) = self.seg_live.get_mut(&e.segment) {
            *live = live.saturating_sub(1);
        }
        self.push(Op::Removed { id, reason });
        true
    }

    /// Appends taken by the writer for the commit in progress (neither queued nor indexed).
    fn in_flight_appends(&self) -> u64 {
        let queued = self
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Append { .. }))
            .count() as u64;
        self.queued_count.saturating_sub(queued)
    }

    /// Counts `n` drops of `kind` and logs them, at most one line per kind per
    /// [`DROP_LOG_PERIOD`].
    fn count_drop(&mut self, kind: DropKind, n: u64) {
        self.counters.drops.add(kind, n);
        if let Some(count) = self.drop_log.record(kind, n, Instant::now()) {
            log_drops(kind, count);
        }
    }

    /// Logs the counts held back by the rate limit once their period has passed.
    fn log_held_drops(&mut self, force: bool) {
        for (kind, n) in self.drop_log.due(Instant::now(), force) {
            log_drops(kind, n);
        }
    }

    /// Queues the drop counters for writing when they changed since last time; they ride with
    /// a commit that happens anyway.
    fn queue_drop_counters(&mut self) {
        if self.counters.drops == self.drops_written {
            return;
        }
        self.drops_written = self.counters.drops;
        let (done, _) = oneshot::channel();
        self.push(Op::State {
            key: DROPS_KEY.to_string(),
            value: self.drops_written.encode(),
            done,
        });
    }

    /// The oldest committed record a policy may drop: not one already released. The upstream
    /// holds a released record's packet id until our PUBREL; dropping it would leave that id
    /// unanswered for good. Released records are at most the uplink's window in number, so
    /// this skips a bounded run.
    fn oldest_droppable(&self) -> Option<u64> {
        self.index
            .iter()
            .find(|(_, e)| !e.released)
            .map(|(&id, _)| id)
    }

    /// Drop-oldest: committed records first (never released ones), then those still queued.
    /// With only released records left, a new record is itself the oldest droppable one: it
    /// is dropped once committed (counted), and the released ones stay.
    pub(crate) fn trim_to_quota(&mut self, max_bytes: u64, extra: u64) {
        while self.stored_bytes() + extra > max_bytes {
            if let Some(oldest) = self.oldest_droppable() {
                self.remove(oldest, Some(DropReason::Oldest));
                self.count_drop(DropKind::Oldest, 1);
            } else if self.in_flight_appends() > 0 || !self.drop_oldest_queued() {
                // Older records are being written right now: the writer trims to the quota,
                // oldest first, once they are indexed.
                break;
            }
        }
    }

    /// Drops the oldest record not yet committed (a burst larger than the quota within one
    /// commit window); its producer is told `Full` and the drop is counted. False if none.
    fn drop_oldest_queued(&mut self) -> bool {
        let Some(i) = self
            .ops
            .iter()
            .position(|op| matches!(op, Op::Append { .. }))
        else {
            return false;
        };
        let Op::Append {
            record, size, done, ..
        } = self.ops.remove(i)
        else {
            return false;
        };
        self.queued_bytes -= size;
        self.queued_count -= 1;
        self.queued_record_bytes = self.queued_record_bytes.saturating_sub(size as usize);
        self.count_drop(DropKind::Oldest, 1);
        let _ = done.send(Err(AppendError::Full(record)));
        true
    }

    fn block(&mut self, b: BlockedAppend) {
        self.blocked_bytes += b.size;
        self.blocked.push_back(b);
    }

    /// Lets waiting appends in, in order, while they fit. True if any got in (producers
    /// waiting in [`Outbox::wait_for_room`] are then woken).
    fn admit_blocked(&mut self, max_bytes: u64) -> bool {
        let mut admitted = false;
        while let Some(front) = self.blocked.front() {
            if self.stored_bytes() + front.size > max_bytes {
                break;
            }
            if let Some(b) = self.blocked.pop_front() {
                self.blocked_bytes -= b.size;
                self.accept(b.record, b.state, b.size, b.done);
                admitted = true;
            }
        }
        admitted
    }

    /// Drops pending records older than `max_age`, oldest first; never released ones (see
    /// [`Shared::oldest_droppable`]).
    fn expire(&mut self, now_ms: u64, max_age: Duration) -> u64 {
        let limit = now_ms.saturating_sub(max_age.as_millis() as u64);
        let expired: Vec<u64> = self
            .index
            .iter()
            .filter(|(_, e)| !e.released)
            .take_while(|(_, e)| e.timestamp_ms < limit)
            .map(|(&id, _)| id)
            .collect();
        for &id in &expired {
            self.remove(id, Some(DropReason::Expired));
        }
        let n = expired.len() as u64;
        if n > 0 {
            self.count_drop(DropKind::Expired, n);
        }
        n
    }

    /// The cumulative state written at the head of a new segment.
    fn snapshot(&self) -> format::Snapshot {
        let next_id = self.durable_next;
        let low = self.index.keys().next().copied().unwrap_or(next_id);
        let mut removed = Vec::new();
        let mut expect = low;
        for &id in self.index.keys() {
            if id > expect {
                removed.push((expect, id - 1));
            }
            expect = id + 1;
        }
        if next_id > expect {
            removed.push((expect, next_id - 1));
        }
        let qos2 = self
            .index
            .iter()
            .filter(|(_, e)| e.packet_id.is_some() || e.released)
            .map(|(&id, e)| format::Qos2State {
                id,
                packet_id: e.packet_id,
                released: e.released,
            })
            .collect();
        format::Snapshot {
            next_id,
            low,
            removed,
            qos2,
            state: self
                .kv
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

pub(crate) struct Inner {
    dir: PathBuf,
    config: OutboxConfig,
    shared: Mutex<Shared>,
    /// Wakes the writer.
    wake: Condvar,
    /// Wakes producers waiting in [`Outbox::wait_for_room`] when blocked appends get in.
    room: Notify,
    /// `durable_next` after each commit; cursors wait on it.
    committed: watch::Sender<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tells the writer to commit what is queued and stop once the last handle is gone.
struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.lock().closing = true;
        self.0.wake.notify_one();
    }
}

/// A handle to an open outbox; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
    _close: Arc<CloseOnDrop>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

fn validate_key(key: &str) -> Result<(), OutboxError> {
    if key.is_empty() || key.len() > 255 || key.starts_with(RESERVED_KEY_PREFIX) {
        Err(OutboxError::InvalidKey(key.to_string()))
    } else {
        Ok(())
    }
}

impl Outbox {
    /// Opens (creating if needed) the outbox in `dir`, recovers its contents and starts the
    /// writer thread. Fails only on I/O errors, naming the path.
    pub fn open(
        dir: impl AsRef<Path>,
        config: OutboxConfig,
    ) -> Result<(Outbox, RecoveryReport), OutboxError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| OutboxError::Io {
            path: dir.clone(),
            source,
        })?;
        let r = recovery::scan_dir(&dir, false)?;
        if let Some(last) = r.segments.last()
            && last.torn_bytes > 0
        {
            if let Err(e) = writer::zero_range(&last.path, last.data_end, last.torn_bytes) {
                tracing::warn!(path = %last.path.display(), "cannot clear a torn write: {e}");
            }
        }
        let mut seg_live: BTreeMap<u64, u64> = r.segments.iter().map(|s| (s.number, 0)).collect();
        for e in r.index.values() {
            *seg_live.entry(e.segment).or_default() += 1;
        }
        let next_segment = r.segments.last().map_or(0, |s| s.number + 1);
        let report = r.report.clone();
        if report.corrupt_skipped > 0 || report.torn_tail_bytes > 0 {
            tracing::warn!(
                dir = %dir.display(),
                corrupt_skipped = report.corrupt_skipped,
                corrupt_bytes = report.corrupt_bytes,
                torn_tail_bytes = report.torn_tail_bytes,
                "outbox recovered from damaged files"
            );
        }
        let drops =
            r.kv.get(DROPS_KEY)
                .map(|v| DropCounters::decode(v))
                .unwrap_or_default();
        let shared = Shared {
            ops: Vec::new(),
            first_op_at: None,
            first_urgent_at: None,
            prompt: false,
            queued_record_bytes: 0,
            closing: false,
            crashed: false,
            index_bytes: report.pending_bytes,
            index: r.index,
            queued_bytes: 0,
            queued_count: 0,
            next_id: r.next_id,
            durable_next: r.next_id,
            blocked: VecDeque::new(),
            blocked_bytes: 0,
            reserved_bytes: 0,
            kv: r.kv,
            seg_live,
            counters: Counters {
                drops,
                corrupt_skipped: report.corrupt_skipped,
                ..Counters::default()
            },
            drops_written: drops,
            drop_log: DropLog::default(),
        };
        let (committed, _) = watch::channel(r.next_id);
        let inner = Arc::new(Inner {
            dir,
            config,
            shared: Mutex::new(shared),
            wake: Condvar::new(),
            room: Notify::new(),
            committed,
            writer: Mutex::new(None),
        });
        let handle = writer::spawn(inner.clone(), next_segment)?;
        *inner.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        let outbox = Outbox {
            _close: Arc::new(CloseOnDrop(inner.clone())),
            inner,
        };
        Ok((outbox, report))
    }

    /// Stores a record; the ticket completes with its id once it is durable.
    pub fn append(&self, record: Record) -> Ticket<u64, AppendError> {
        self.append_with_state(record, &[])
    }

    /// Stores a record together with companion state (for example the inbound QoS 2 packet id
    /// answered with PUBREC, or a node's dedupe key) in the same CRC'd frame: after a crash,
    /// both are present or neither. The values become the latest for their keys.
    pub fn append_with_state(
        &self,
        record: Record,
        state: &[(&str, &[u8])],
    ) -> Ticket<u64, AppendError> {
        let state_ok = state.len() <= 255 && state.iter().all(|(k, _)| validate_key(k).is_ok());
        let invalid = if record.topic.len() > usize::from(u16::MAX) {
            Some("topic longer than 65535 bytes")
        } else if !state_ok {
            Some("at most 255 state keys of 1 to 255 bytes, none under `$outbox/`")
        } else {
            None
        };
        let state: Vec<(String, Bytes)> = match invalid {
            Some(_) => Vec::new(),
            None => state
                .iter()
                .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v)))
                .collect(),
        };
        let size = format::data_frame_len(&record.topic, record.payload.len(), &state) as u64;
        let invalid =
            invalid.or((size > format::MAX_BODY_LEN as u64).then_some("record larger than 64 MiB"));
        let max = self.inner.config.max_bytes;
        let (done, ticket) = Ticket::channel();
        let mut s = self.inner.lock();
        if s.closing {
            return Ticket::ready(Err(AppendError::Closed(record)));
        }
        if let Some(reason) = invalid {
            s.count_drop(DropKind::Invalid, 1);
            return Ticket::ready(Err(AppendError::Invalid {
                record,
                reason: reason.to_string(),
            }));
        }
        if size > max {
            s.count_drop(DropKind::TooLarge, 1);
            return Ticket::ready(Err(AppendError::TooLarge { record, size, max }));
        }
        let policy = self.inner.config.when_full;
        if policy == FullPolicy::Block {
            // The room its producer reserved, if any, is now taken by the record itself.
            let reserved = record_size(&record);
            s.reserved_bytes = s.reserved_bytes.saturating_sub(reserved);
        }
        let blocked = BlockedAppend {
            record,
            state,
            size,
            done,
        };
        if policy == FullPolicy::Block && !s.blocked.is_empty() {
            s.block(blocked);
            return ticket;
        }
        if s.stored_bytes() + size > max {
            match policy {
                FullPolicy::DropOldest => s.trim_to_quota(max, size),
                FullPolicy::DropNewest => {
                    s.count_drop(DropKind::Newest, 1);
                    return Ticket::ready(Err(AppendError::Full(blocked.record)));
                }
                FullPolicy::Block => {
                    s.block(blocked);
                    return ticket;
                }
            }
        }
        s.accept(blocked.record, blocked.state, blocked.size, blocked.done);
        drop(s);
        self.inner.wake.notify_one();
        ticket
    }

    /// Sets keyed state on its own; durable when the ticket completes. The latest value per
    /// key is recovered at open.
    pub fn put_state(&self, key: &str, value: &[u8]) -> Ticket<(), OutboxError> {
        if let Err(e) = validate_key(key) {
            return Ticket::ready(Err(e));
        }
        self.queue(|done| Op::State {
            key: key.to_string(),
            value: Bytes::copy_from_slice(value),
            done,
        })
    }

    /// Like [`put_state`](Self::put_state), but committed at once (with whatever is queued)
    /// rather than after the group-commit delay: for rare changes a client waits on, such as a
    /// persistent session's SUBSCRIBE.
    pub fn put_state_now(&self, key: &str, value: &[u8]) -> Ticket<(), OutboxError> {
        let ticket = self.put_state(key, value);
        self.inner.lock().prompt = true;
        self.inner.wake.notify_one();
        ticket
    }

    /// The latest committed value of a state key.
    pub fn state(&self, key: &str) -> Option<Bytes> {
        if key.starts_with(RESERVED_KEY_PREFIX) {
            return None;
        }
        self.inner.lock().kv.get(key).cloned()
    }

    /// Every committed state key and value.
    pub fn states(&self) -> Vec<(String, Bytes)> {
        let s = self.inner.lock();
        s.kv.iter()
            .filter(|(k, _)| !k.starts_with(RESERVED_KEY_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Removes a delivered record (PUBACK for QoS 0/1, PUBCOMP for QoS 2). Not durable on
    /// return: it rides with the next commit, so a crash may deliver the record again.
    /// Returns false if the id is not pending.
    pub fn ack(&self, id: u64) -> bool {
        let mut s = self.inner.lock();
        let before = s.ops.len();
        let found = s.remove(id, None);
        if found {
            s.admit_blocked(self.inner.config.max_bytes);
        }
        // Wake the writer only when it has something new to schedule: the first queued
        // operation (it arms the ack commit delay) or appends let in from `Block`. Waking it for
        // every ack costs a thread switch per delivered message while draining a backlog.
        let wake = found && (before == 0 || s.ops.len() > before + 1);
        drop(s);
        if wake {
            self.inner.wake.notify_one();
        }
        if found && self.inner.config.when_full == FullPolicy::Block {
            self.inner.room.notify_waiters();
        }
        found
    }

    /// Records the upstream packet id of a QoS 2 record; await the ticket before the first
    /// PUBLISH so that a resend after a crash uses the same packet id.
    pub fn set_packet_id(&self, id: u64, packet_id: u16) -> Ticket<(), OutboxError> {
        if !self.inner.lock().index.contains_key(&id) {
            return Ticket::ready(Err(OutboxError::UnknownId(id)));
        }
        self.queue(|done| Op::PacketId {
            id,
            packet_id,
            done,
        })
    }

    /// Records that PUBREC arrived; the PUBREL must not be sent before the ticket completes.
    pub fn mark_released(&self, id: u64) -> Ticket<(), OutboxError> {
        if !self.inner.lock().index.contains_key(&id) {
            return Ticket::ready(Err(OutboxError::UnknownId(id)));
        }
        self.queue(|done| Op::Released { id, done })
    }

    /// Completes once everything queued before it is durable.
    pub fn flush(&self) -> Ticket<(), OutboxError> {
        self.queue(|done| Op::Flush { done })
    }

    /// Commits everything queued and stops the writer; blocked appends get their record back.
    pub fn close(self) -> Ticket<(), OutboxError> {
        let ticket = self.flush();
        self.inner.lock().closing = true;
        self.inner.wake.notify_one();
        self.inner.room.notify_waiters();
        ticket
    }

    /// Bytes of appends that may wait for space under [`FullPolicy::Block`] beyond
    /// `max_bytes` before [`wait_for_room`](Self::wait_for_room) holds producers back: a
    /// quarter of `max_bytes`, at most [`BLOCK_QUEUE_MAX`].
    pub fn block_queue_bytes(&self) -> u64 {
        (self.inner.config.max_bytes / 4).clamp(1, BLOCK_QUEUE_MAX)
    }

    /// What an append does when the quota is reached.
    pub fn when_full(&self) -> FullPolicy {
        self.inner.config.when_full
    }

    /// Under [`FullPolicy::Block`]: waits until an append of `bytes` (see [`record_size`])
    /// fits in the quota plus [`block_queue_bytes`](Self::block_queue_bytes), counting the
    /// appends waiting for space and those reserved by other producers, then reserves it until
    /// the next append arrives. This is the backpressure that stalls producers (a local
    /// publisher's connection, ingest) before their message is handed on, so RAM stays bounded
    /// however many are in transit. Returns at once under the other policies, with nothing
    /// waiting or reserved, and once the outbox closes.
    pub async fn wait_for_room(&self, bytes: u64) {
        loop {
            let notified = self.inner.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_reserve_room(bytes) {
                return;
            }
            notified.await;
        }
    }

    /// [`wait_for_room`](Self::wait_for_room) without the wait: reserves and returns true if
    /// there is room (or nothing to wait for), else false.
    pub fn try_reserve_room(&self, bytes: u64) -> bool {
        if self.inner.config.when_full != FullPolicy::Block {
            return true;
        }
        let limit = self.inner.config.max_bytes + self.block_queue_bytes();
        let mut s = self.inner.lock();
        let waiting = s.blocked_bytes + s.reserved_bytes;
        let room = s.stored_bytes() + waiting + bytes <= limit;
        if s.closing || s.crashed || waiting == 0 || room {
            s.reserved_bytes += bytes;
            return true;
        }
        false
    }

    fn queue<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, OutboxError>>) -> Op,
    ) -> Ticket<T, OutboxError> {
        let (done, ticket) = Ticket::channel();
        let mut s = self.inner.lock();
        if s.closing {
            return Ticket::ready(Err(OutboxError::Closed));
        }
        s.push(op(done));
        drop(s);
        self.inner.wake.notify_one();
        ticket
    }

    /// A reader over pending records in id order, from the oldest.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            inner: self.inner.clone(),
            after: None,
            files: HashMap::new(),
        }
    }

    pub fn stats(&self) -> OutboxStats {
        let s = self.inner.lock();
        OutboxStats {
            depth: s.index.len() as u64,
            bytes: s.index_bytes,
            oldest_timestamp_ms: s.index.values().next().map(|e| e.timestamp_ms),
            queued: s.queued_count,
            blocked: s.blocked.len() as u64,
            blocked_bytes: s.blocked_bytes,
            next_id: s.next_id,
            segments: s.seg_live.len() as u64,
            dropped_oldest: s.counters.drops.oldest,
            dropped_newest: s.counters.drops.newest,
            expired: s.counters.drops.expired,
            dropped_too_large: s.counters.drops.too_large,
            dropped_invalid: s.counters.drops.invalid,
            corrupt_skipped: s.counters.corrupt_skipped,
            commits: s.counters.commits,
            write_errors: s.counters.write_errors,
            bytes_written: s.counters.bytes_written,
        }
    }

    /// The directory this outbox lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops the writer without committing what is queued, as a crash would (tests only).
    #[cfg(test)]
    pub(crate) fn crash(self) {
        self.inner.lock().crashed = true;
        self.inner.wake.notify_one();
        self.inner.room.notify_waiters();
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Reads pending records in id order. `next_batch` runs the file reads on tokio's blocking
/// pool; `next_batch_blocking` reads on the calling thread.
pub struct Cursor {
    inner: Arc<Inner>,
    after: Option<u64>,
    files: HashMap<u64, File>,
}

impl Cursor {
    /// Starts again from the oldest pending record (after a reconnect).
    pub fn rewind(&mut self) {
        self.after = None;
    }

    /// Up to `max` pending records after the last one returned.
    pub fn next_batch_blocking(&mut self, max: usize) -> Result<Vec<Pending>, OutboxError> {
        let (batch, last) = read_batch(&self.inner, self.after, max, &mut self.files)?;
        if last.is_some() {
            self.after = last;
        }
        Ok(batch)
    }

    /// Up to `max` pending records after the last one returned, read off the async runtime.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Pending>, OutboxError> {
        let inner = self.inner.clone();
        let after = self.after;
        let mut files = std::mem::take(&mut self.files);
        let (read, files) = tokio::task::spawn_blocking(move || {
            let read = read_batch(&inner, after, max, &mut files);
            (read, files)
        })
        .await
        .map_err(|_| OutboxError::WriterGone)?;
        self.files = files;
        let (batch, last) = read?;
        if last.is_some() {
            self.after = last;
        }
        Ok(batch)
    }

    /// Waits until a record after the cursor is committed.
    pub async fn wait_for_more(&self) {
        let mut rx = self.inner.committed.subscribe();
        loop {
            let more = {
                let s = self.inner.lock();
                match self.after {
                    None => !s.index.is_empty(),
                    Some(a) => s.index.range(a + 1..).next().is_some(),
                }
            };
            if more || rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Largest read `read_batch` makes at once: records next to each other in a segment (as a
/// backlog is) are read together rather than one `pread` each.
const READ_RUN_BYTES: u64 = 1024 * 1024;

/// Reads the frames of up to `max` pending records after `after`. A frame that no longer
/// checks out (damaged since open) is dropped and counted, and reading goes on. `files` keeps
/// segments open between calls; those deleted meanwhile are closed.
fn read_batch(
    inner: &Inner,
    after: Option<u64>,
    max: usize,
    files: &mut HashMap<u64, File>,
) -> Result<(Vec<Pending>, Option<u64>), OutboxError> {
    let entries: Vec<(u64, Entry)> = {
        let s = inner.lock();
        files.retain(|segment, _| s.seg_live.contains_key(segment));
        let from = after.map_or(0, |a| a + 1);
        s.index
            .range(from..)
            .take(max)
            .map(|(&id, e)| (id, e.clone()))
            .collect()
    };
    let last = entries.last().map(|(id, _)| *id);
    let mut out = Vec::with_capacity(entries.len());
    let mut rest = &entries[..];
    let mut buf = Vec::new();
    while let Some((_, first)) = rest.first() {
        // A run: records that follow each other in one segment.
        let mut end = first.offset + u64::from(first.len);
        let mut n = 1;
        while let Some((_, e)) = rest.get(n) {
            let e_end = e.offset + u64::from(e.len);
            if e.segment != first.segment
                || e.offset != end
                || e_end - first.offset > READ_RUN_BYTES
            {
                break;
            }
            end = e_end;
            n += 1;
        }
        let (run, after_run) = rest.split_at(n);
        rest = after_run;
        let path = segment_path(&inner.dir, first.segment);
        buf.resize((end - first.offset) as usize, 0);
        let read = match files.entry(first.segment) {
            std::collections::hash_map::Entry::Occupied(f) => {
                f.get().read_exact_at(&mut buf, first.offset)
            }
            std::collections::hash_map::Entry::Vacant(v) => File::open(&path).and_then(|f| {
                f.read_exact_at(&mut buf, first.offset)
                    .map(|()| v.insert(f))
                    .map(|_| ())
            }),
        };
        if let Err(source) = read {
            let s = inner.lock();
            if run.iter().all(|(id, _)| !s.index.contains_key(id)) {
                continue; // removed meanwhile and their segment deleted
            }
            return Err(OutboxError::Io { path, source });
        }
        for (id, e) in run {
            let at = (e.offset - first.offset) as usize;
            let frame = &buf[at..at + e.len as usize];
            match format::scan(frame) {
                Scan::Frame {
                    body: Body::Data(d),
                    ..
                } if d.id == *id => out.push(pending_from(d, e)),
                _ => {
                    tracing::warn!(id, path = %path.display(), "outbox record damaged since open; dropped");
                    let mut s = inner.lock();
                    if s.remove(*id, Some(DropReason::Corrupt)) {
                        s.counters.corrupt_skipped += 1;
                    }
                }
            }
        }
    }
    Ok((out, last))
}
