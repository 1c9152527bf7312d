//! Model-based test: random appends, acknowledgements, QoS 2 state changes, crashes (with or
//! without a torn final write) and clean restarts, checked against an in-memory model.
//!
//! The rule for redelivery: an acknowledged record may reappear after a crash only while its
//! acknowledgement is *unsure*, that is, no ticket (append, state, packet id, released, flush)
//! has completed since the `ack` call. Any completed ticket proves that the commit holding it
//! also holds every operation queued before it, acks included. A clean close makes all acks
//! sure. A record that reappears comes back with the content and delivery state it had.
//!
//! Appends may also be left queued, their tickets not awaited, when a crash comes. Such a
//! record may be lost only if its ticket had not resolved `Ok`: after the crash each ticket is
//! looked at, an `Ok` one must survive, and any other may come back (unchanged) or not.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::format::{self, DataBody};
use super::*;

#[derive(Debug, Clone)]
enum Step {
    Append {
        len: usize,
        qos: u8,
        state: bool,
    },
    /// Append without awaiting the ticket: it may still be queued at the next crash.
    AppendQueued {
        len: usize,
        qos: u8,
    },
    Ack(usize),
    SetPacketId(usize, u16),
    Release(usize),
    Flush,
    /// Drop without a clean close; optionally leave this many bytes of a torn frame behind.
    Crash {
        torn: Option<usize>,
    },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0usize..300, 0u8..3, any::<bool>())
            .prop_map(|(len, qos, state)| Step::Append { len, qos, state }),
        3 => (0usize..300, 0u8..3).prop_map(|(len, qos)| Step::AppendQueued { len, qos }),
        4 => any::<usize>().prop_map(Step::Ack),
        1 => (any::<usize>(), 1u16..).prop_map(|(i, p)| Step::SetPacketId(i, p)),
        1 => any::<usize>().prop_map(Step::Release),
        1 => Just(Step::Flush),
        1 => proptest::option::of(1usize..400).prop_map(|torn| Step::Crash { torn }),
        1 => Just(Step::Reopen),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct ModelRecord {
    record: Record,
    packet_id: Option<u16>,
    released: bool,
}

#[derive(Default)]
struct Model {
    pending: BTreeMap<u64, ModelRecord>,
    unsure_acks: BTreeMap<u64, ModelRecord>,
    max_id: u64,
    kv: BTreeMap<String, Bytes>,
    /// Appends whose tickets were not awaited yet.
    queued: Vec<(Ticket<u64, AppendError>, Record)>,
    /// After a crash: appends whose tickets did not resolve `Ok`; each may or may not be back.
    maybe: Vec<Record>,
}

fn fresh(record: Record) -> ModelRecord {
    ModelRecord {
        record,
        packet_id: None,
        released: false,
    }
}

impl Model {
    /// A ticket completed: every operation queued before it is durable, acks included, and
    /// the appends queued before it are done.
    fn ticket_completed(&mut self) -> Result<(), TestCaseError> {
        self.unsure_acks.clear();
        for (ticket, record) in std::mem::take(&mut self.queued) {
            let id = ticket
                .wait()
                .map_err(|e| TestCaseError::fail(format!("queued append failed: {e}")))?;
            prop_assert!(id > self.max_id);
            self.max_id = id;
            self.pending.insert(id, fresh(record));
        }
        Ok(())
    }

    /// After a crash: queued appends acknowledged `Ok` must survive; the rest may.
    fn crashed(&mut self) {
        for (ticket, record) in std::mem::take(&mut self.queued) {
            match ticket.wait() {
                Ok(id) => {
                    self.max_id = self.max_id.max(id);
                    self.pending.insert(id, fresh(record));
                }
                Err(_) => self.maybe.push(record),
            }
        }
    }

    fn nth(&self, i: usize, pred: impl Fn(&ModelRecord) -> bool) -> Option<u64> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, r)| pred(r))
            .map(|(id, _)| *id)
            .collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }
}

fn config() -> OutboxConfig {
    OutboxConfig {
        segment_bytes: 1024,
        commit_delay: Duration::ZERO,
        ack_commit_delay: Duration::from_millis(20),
        ..OutboxConfig::default()
    }
}

/// Leaves the first `len` bytes of a never-committed frame after the last valid frame.
fn leave_torn_frame(dir: &Path, len: usize) {
    let Some(last) = inspect(dir).unwrap().segments.pop() else {
        return;
    };
    let mut frame = Vec::new();
    format::encode_data(
        &mut frame,
        &DataBody {
            id: u64::MAX / 2,
            timestamp_ms: 1,
            qos: 1,
            retain: false,
            state: vec![("node".into(), Bytes::from_static(b"torn"))],
            topic: "torn".into(),
            payload: Bytes::from(vec![0xA5; 300]),
        },
    );
    let len = len.min(frame.len() - 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last.path)
        .unwrap();
    f.write_all_at(&frame[..len], last.data_end).unwrap();
}

fn reopen_and_check(dir: &Path, model: &mut Model) -> Result<Outbox, TestCaseError> {
    let (outbox, report) = Outbox::open(dir, config()).unwrap();
    prop_assert_eq!(report.corrupt_skipped, 0);
    prop_assert!(report.next_id > model.max_id);
    let recovered = outbox.cursor().next_batch_blocking(usize::MAX).unwrap();
    prop_assert!(recovered.windows(2).all(|w| w[0].id < w[1].id));
    for p in &recovered {
        let got = ModelRecord {
            record: p.record.clone(),
            packet_id: p.packet_id,
            released: p.released,
        };
        if let Some(expected) = model.pending.get(&p.id) {
            prop_assert_eq!(&got, expected, "record {} changed", p.id);
        } else if let Some(expected) = model.unsure_acks.get(&p.id) {
            prop_assert_eq!(&got, expected, "redelivered record {} changed", p.id);
            model.pending.insert(p.id, got);
        } else if let Some(i) = model.maybe.iter().position(|r| *r == p.record) {
            // Queued at the crash and committed, though its ticket never said so.
            prop_assert!(!got.released && got.packet_id.is_none());
            model.maybe.swap_remove(i);
            model.max_id = model.max_id.max(p.id);
            model.pending.insert(p.id, got);
        } else {
            return Err(TestCaseError::fail(format!(
                "record {} reappeared though its ack was durable",
                p.id
            )));
        }
    }
    let ids: Vec<u64> = recovered.iter().map(|p| p.id).collect();
    let expected: Vec<u64> = model.pending.keys().copied().collect();
    prop_assert_eq!(ids, expected, "committed records lost");
    let kv: BTreeMap<String, Bytes> = outbox.states().into_iter().collect();
    prop_assert_eq!(&kv, &model.kv);
    model.unsure_acks.clear();
    model.maybe.clear();
    Ok(outbox)
}

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    let (mut outbox, _) = Outbox::open(dir.path(), config()).unwrap();
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Append { len, qos, state } => {
                let record = Record {
                    topic: format!("t/{}", n % 4),
                    payload: Bytes::from(vec![n as u8; len]),
                    qos: Qos::from_u8(qos).unwrap(),
                    retain: n % 5 == 0,
                    timestamp_ms: n as u64,
                };
                let value = format!("seq={n}");
                let companion: &[(&str, &[u8])] = if state {
                    &[("node", value.as_bytes())]
                } else {
                    &[]
                };
                let id = outbox
                    .append_with_state(record.clone(), companion)
                    .wait()
                    .unwrap();
                model.ticket_completed()?;
                prop_assert!(id > model.max_id);
                model.max_id = id;
                if state {
                    model.kv.insert("node".into(), Bytes::from(value));
                }
                model.pending.insert(id, fresh(record));
            }
            Step::AppendQueued { len, qos } => {
                let record = Record {
                    topic: format!("q/{}", n % 3),
                    payload: Bytes::from(vec![n as u8; len]),
                    qos: Qos::from_u8(qos).unwrap(),
                    retain: false,
                    timestamp_ms: n as u64,
                };
                model.queued.push((outbox.append(record.clone()), record));
            }
            Step::Ack(i) => {
                if let Some(id) = model.nth(i, |_| true) {
                    prop_assert!(outbox.ack(id));
                    let r = model.pending.remove(&id).unwrap();
                    model.unsure_acks.insert(id, r);
                }
            }
            Step::SetPacketId(i, pkid) => {
                let pick =
                    |r: &ModelRecord| r.record.qos == Qos::ExactlyOnce && r.packet_id.is_none();
                if let Some(id) = model.nth(i, pick) {
                    outbox.set_packet_id(id, pkid).wait().unwrap();
                    model.ticket_completed()?;
                    model.pending.get_mut(&id).unwrap().packet_id = Some(pkid);
                }
            }
            Step::Release(i) => {
                let pick = |r: &ModelRecord| r.packet_id.is_some() && !r.released;
                if let Some(id) = model.nth(i, pick) {
                    outbox.mark_released(id).wait().unwrap();
                    model.ticket_completed()?;
                    model.pending.get_mut(&id).unwrap().released = true;
                }
            }
            Step::Flush => {
                outbox.flush().wait().unwrap();
                model.ticket_completed()?;
            }
            Step::Crash { torn } => {
                outbox.crash();
                model.crashed();
                if let Some(len) = torn {
                    leave_torn_frame(dir.path(), len);
                }
                outbox = reopen_and_check(dir.path(), &mut model)?;
            }
            Step::Reopen => {
                outbox.close().wait().unwrap();
                model.ticket_completed()?;
                outbox = reopen_and_check(dir.path(), &mut model)?;
            }
        }
    }
    outbox.crash();
    model.crashed();
    reopen_and_check(dir.path(), &mut model)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_outbox_matches_its_model_across_crashes_and_restarts(
        steps in proptest::collection::vec(step(), 1..60)
    ) {
        run(steps)?;
    }
}
