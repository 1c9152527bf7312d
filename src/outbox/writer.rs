//! The writer thread: takes queued operations in batches, writes each batch with one `pwrite`
//! and one `fdatasync`, then completes the tickets and deletes segments nobody needs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::{self, Body, DataBody, DropReason};
use super::recovery::{Entry, segment_path};
use super::{AppendError, Inner, Op, OutboxError, now_ms};

/// How often the writer looks for expired records when `max_age` is set.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) fn spawn(
    inner: Arc<Inner>,
    next_segment: u64,
) -> Result<std::thread::JoinHandle<()>, OutboxError> {
    let dir = inner.dir.clone();
    let mut writer = Writer {
        inner,
        log: None,
        next_segment,
        must_roll: false,
    };
    std::thread::Builder::new()
        .name("outbox-writer".into())
        .spawn(move || writer.run())
        .map_err(|source| OutboxError::Io { path: dir, source })
}

/// Overwrites `len` bytes at `offset` with zeros and syncs; clears a torn write at open.
pub(crate) fn zero_range(path: &Path, offset: u64, len: u64) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&vec![0u8; len as usize], offset)?;
    f.sync_data()
}

/// The segment being written.
struct ActiveLog {
    number: u64,
    path: PathBuf,
    file: File,
    /// End of the committed frames; 0 until the head snapshot is durable.
    data_end: u64,
    capacity: u64,
}

struct Writer {
    inner: Arc<Inner>,
    log: Option<ActiveLog>,
    next_segment: u64,
    /// Set after a failed write to a segment that holds committed frames.
    must_roll: bool,
}

/// An operation's place in the batch buffer, kept to complete it afterwards.
struct Placed {
    op: Op,
    /// Offset and length of a data frame in the batch buffer.
    frame: Option<(u64, u32)>,
}

fn encode_removal(buf: &mut Vec<u8>, (first, last, reason): (u64, u64, Option<DropReason>)) {
    let body = match reason {
        None => Body::Ack(first, last),
        Some(r) => Body::Drop(first, last, r),
    };
    format::encode(buf, &body);
}

fn io_copy(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

impl Writer {
    fn run(&mut self) {
        let mut next_expiry = Instant::now();
        loop {
            let Some(ops) = self.next_batch(&mut next_expiry) else {
                break;
            };
            self.commit(ops);
        }
        let blocked: Vec<_> = {
            let mut s = self.inner.lock();
            s.log_held_drops(true);
            s.blocked_bytes = 0;
            s.blocked.drain(..).collect()
        };
        self.inner.room.notify_waiters();
        for b in blocked {
            let _ = b.done.send(Err(AppendError::Closed(b.record)));
        }
    }

    /// Waits until a batch is due; `None` once closed (or crashed) with nothing left.
    fn next_batch(&self, next_expiry: &mut Instant) -> Option<Vec<Op>> {
        let config = &self.inner.config;
        let mut s = self.inner.lock();
        loop {
            if s.crashed {
                return None;
            }
            let now = Instant::now();
            if let Some(max_age) = config.max_age
                && now >= *next_expiry
            {
                if s.expire(now_ms(), max_age) > 0 {
                    s.admit_blocked(config.max_bytes);
                    self.inner.room.notify_waiters();
                }
                *next_expiry = now + EXPIRY_INTERVAL;
            }
            let urgent_due = s.first_urgent_at.map(|t| t + config.commit_delay);
            let any_due = s.first_op_at.map(|t| t + config.ack_commit_delay);
            let due = [urgent_due, any_due].into_iter().flatten().min();
            if s.closing
                || s.prompt
                || s.queued_record_bytes >= config.commit_bytes
                || due.is_some_and(|d| d <= now)
            {
                if !s.ops.is_empty() || s.closing {
                    // Drop counters ride with a commit that happens anyway.
                    s.queue_drop_counters();
                    s.log_held_drops(false);
                }
                if s.ops.is_empty() {
                    if s.closing {
                        return None;
                    }
                } else {
                    return Some(s.take_ops());
                }
            }
            let mut wake_at = due;
            if config.max_age.is_some() {
                wake_at = Some(wake_at.map_or(*next_expiry, |d| d.min(*next_expiry)));
            }
            s = match wake_at {
                Some(t) => {
                    let wait = t.saturating_duration_since(now);
                    self.inner
                        .wake
                        .wait_timeout(s, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.inner.wake.wait(s).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// Encodes the batch. Removals (acks, drops) always concern records committed by an
    /// earlier batch, so they go last, sorted and merged into ranges: a few bytes per batch.
    fn encode(ops: Vec<Op>) -> (Vec<u8>, Vec<Placed>) {
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(ops.len());
        let mut removed: Vec<(u64, Option<DropReason>)> = Vec::new();
        for op in ops {
            if let Op::Removed { id, reason } = op {
                removed.push((id, reason));
                continue;
            }
            let mut frame = None;
            match &op {
                Op::Append {
                    id, record, state, ..
                } => {
                    let start = buf.len();
                    format::encode_data(
                        &mut buf,
                        &DataBody {
                            id: *id,
                            timestamp_ms: record.timestamp_ms,
                            qos: record.qos as u8,
                            retain: record.retain,
                            state: state.clone(),
                            topic: record.topic.clone(),
                            payload: record.payload.clone(),
                        },
                    );
                    frame = Some((start as u64, (buf.len() - start) as u32));
                }
                Op::PacketId { id, packet_id, .. } => {
                    format::encode(&mut buf, &Body::PacketId(*id, *packet_id))
                }
                Op::Released { id, .. } => format::encode(&mut buf, &Body::Released(*id)),
                Op::State { key, value, .. } => {
                    format::encode(&mut buf, &Body::State(key.clone(), value.clone()))
                }
                Op::Flush { .. } | Op::Removed { .. } => {}
            }
            placed.push(Placed { op, frame });
        }
        removed.sort_unstable_by_key(|(id, _)| *id);
        let mut run: Option<(u64, u64, Option<DropReason>)> = None;
        for (id, reason) in removed {
            match &mut run {
                Some((_, last, r)) if *r == reason && *last + 1 == id => *last = id,
                _ => {
                    if let Some(done) = run.replace((id, id, reason)) {
                        encode_removal(&mut buf, done);
                    }
                }
            }
        }
        if let Some(done) = run {
            encode_removal(&mut buf, done);
        }
        (buf, placed)
    }

    /// Makes sure a segment can take `len` more bytes; returns the bytes of a head snapshot
    /// to write first when the segment is new (or its first write failed).
    fn prepare(&mut self, len: u64) -> std::io::Result<Vec<u8>> {
        let fits = self
            .log
            .as_ref()
            .is_some_and(|l| l.data_end + len <= l.capacity);
        let mut head = Vec::new();
        let needs_head = self.log.as_ref().is_none_or(|l| l.data_end == 0);
        if !fits || self.must_roll || needs_head {
            format::encode(&mut head, &Body::Snapshot(self.inner.lock().snapshot()));
        }
        if fits && !self.must_roll {
            return Ok(if needs_head { head } else { Vec::new() });
        }
        let number = self.next_segment;
        let path = segment_path(&self.inner.dir, number);
        let capacity = self.inner.config.segment_bytes.max(head.len() as u64 + len);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.set_len(capacity)?;
        File::open(&self.inner.dir)?.sync_all()?;
        self.next_segment += 1;
        self.must_roll = false;
        self.inner.lock().seg_live.insert(number, 0);
        self.log = Some(ActiveLog {
            number,
            path,
            file,
            data_end: 0,
            capacity,
        });
        Ok(head)
    }

    fn commit(&mut self, ops: Vec<Op>) {
        let (body, placed) = Self::encode(ops);
        let outcome = self.write(&body);
        let (number, path) = match &self.log {
            Some(l) => (l.number, l.path.clone()),
            None => (0, self.inner.dir.clone()),
        };
        let max_bytes = self.inner.config.max_bytes;
        let mut s = self.inner.lock();
        let mut deletable = Vec::new();
        match &outcome {
            Ok((base, written)) => {
                s.counters.commits += 1;
                s.counters.bytes_written += *written;
                for p in &placed {
                    match &p.op {
                        Op::Append {
                            id,
                            record,
                            state,
                            size,
                            ..
                        } => {
                            let (off, len) = p.frame.unwrap_or_default();
                            s.queued_bytes -= size;
                            s.queued_count -= 1;
                            s.durable_next = s.durable_next.max(id + 1);
                            s.index_bytes += u64::from(len);
                            *s.seg_live.entry(number).or_default() += 1;
                            s.index.insert(
                                *id,
                                Entry {
                                    segment: number,
                                    offset: base + off,
                                    len,
                                    timestamp_ms: record.timestamp_ms,
                                    qos: record.qos as u8,
                                    packet_id: None,
                                    released: false,
                                },
                            );
                            for (k, v) in state {
                                s.kv.insert(k.clone(), v.clone());
                            }
                        }
                        Op::PacketId { id, packet_id, .. } => {
                            if let Some(e) = s.index.get_mut(id) {
                                e.packet_id = Some(*packet_id);
                            }
                        }
                        Op::Released { id, .. } => {
                            if let Some(e) = s.index.get_mut(id) {
                                e.released = true;
                            }
                        }
                        Op::State { key, value, .. } => {
                            s.kv.insert(key.clone(), value.clone());
                        }
                        Op::Flush { .. } | Op::Removed { .. } => {}
                    }
                }
                // A burst may have gone over the quota while this batch was being written:
                // now that its records are indexed, drop the oldest first.
                if self.inner.config.when_full == crate::outbox::FullPolicy::DropOldest {
                    s.trim_to_quota(max_bytes, 0);
                }
                // Forget reservations once nothing waits for space: one whose append never came
                // would otherwise hold room for good. (One still on its way is then not counted,
                // an overshoot of at most what is in transit.)
                if s.blocked.is_empty() && s.reserved_bytes > 0 {
                    s.reserved_bytes = 0;
                    self.inner.room.notify_waiters();
                }
                // Older segments with nothing pending are covered by this segment's head.
                for (&n, &live) in &s.seg_live {
                    if n < number && live == 0 {
                        deletable.push(n);
                    }
                }
                for n in &deletable {
                    s.seg_live.remove(n);
                }
            }
            Err(_) => {
                s.counters.write_errors += 1;
                for p in &placed {
                    if let Op::Append { id, size, .. } = &p.op {
                        s.queued_bytes -= size;
                        s.queued_count -= 1;
                        s.durable_next = s.durable_next.max(id + 1);
                    }
                }
                if s.admit_blocked(max_bytes) {
                    self.inner.room.notify_waiters();
                }
            }
        }
        let durable_next = s.durable_next;
        drop(s);
        for n in deletable {
            let p = segment_path(&self.inner.dir, n);
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), "cannot delete an acknowledged outbox segment: {e}");
            }
        }
        if let Err(e) = &outcome {
            tracing::error!(path = %path.display(), "outbox write failed: {e}");
        }
        for p in placed {
            let err = outcome.as_ref().err();
            let io = || OutboxError::Io {
                path: path.clone(),
                source: err.map_or_else(|| std::io::Error::other("write failed"), io_copy),
            };
            match p.op {
                Op::Append {
                    id, record, done, ..
                } => {
                    let _ = done.send(match err {
                        None => Ok(id),
                        Some(e) => Err(AppendError::Io {
                            record,
                            path: path.clone(),
                            source: io_copy(e),
                        }),
                    });
                }
                Op::PacketId { done, .. }
                | Op::Released { done, .. }
                | Op::State { done, .. }
                | Op::Flush { done } => {
                    let _ = done.send(if err.is_none() { Ok(()) } else { Err(io()) });
                }
                Op::Removed { .. } => {}
            }
        }
        self.inner.committed.send_replace(durable_next);
    }

    /// Writes `body` (after a head snapshot if needed) and syncs. Returns the offset of `body`
    /// in the segment and the bytes written.
    fn write(&mut self, body: &[u8]) -> std::io::Result<(u64, u64)> {
        let head = match self.prepare(body.len() as u64) {
            Ok(head) => head,
            Err(e) => {
                // A segment we could not create holds nothing; try a new one next time.
                self.must_roll = self.log.as_ref().is_some_and(|l| l.data_end > 0);
                return Err(e);
            }
        };
        let Some(log) = self.log.as_mut() else {
            return Err(std::io::Error::other("no active segment"));
        };
        let start = if head.is_empty() { log.data_end } else { 0 };
        let mut buf = head;
        let base = start + buf.len() as u64;
        buf.extend_from_slice(body);
        let result = log
            .file
            .write_all_at(&buf, start)
            .and_then(|()| log.file.sync_data());
        match result {
            Ok(()) => {
                log.data_end = start + buf.len() as u64;
                Ok((base, buf.len() as u64))
            }
            Err(e) => {
                // The page cache may now hold pages of unknown state: never write this segment
                // again once it holds committed frames; a segment without any is rewritten.
                if log.data_end > 0 {
                    self.must_roll = true;
                }
                Err(e)
            }
        }
    }
}
