//! The broker snapshot: retained messages and persistent sessions, saved atomically.
//!
//! ```text
//! broker.snapshot
//! +----------+-------------+-------------+---------------------------------+
//! | "SGSNAP" | version u16 | length u32  | crc32c u32 | body (postcard)    |
//! |  6 bytes |   LE        |   LE        |    LE      | `length` bytes     |
//! +----------+-------------+-------------+---------------------------------+
//! ```
//!
//! Crash guarantees: the file is replaced by write-temp, fsync, rename, fsync-dir, so after a
//! crash it is either the previous snapshot or the new one. Snapshots are debounced (taken every
//! `snapshot-interval` when something changed) and taken at once when a persistent session is
//! created or its subscriptions change; at shutdown a final snapshot is written before exit.
//! A file that fails the magic, length or CRC check is renamed `broker.snapshot.corrupt-<unix
//! time>`, reported, and the broker starts empty rather than not at all.
//!
//! Writing happens on a dedicated thread (invariant 5: the event loop never waits on disk); when
//! snapshots queue up behind a slow card, only the newest is written.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::codec::QoS;
use super::router::Retained;
use super::session::{InFlight, Message, OutState, Queued, SessionState};
use super::store::write_atomically;

pub const FILE_NAME: &str = "broker.snapshot";
const MAGIC: &[u8; 6] = b"SGSNAP";
const VERSION: u16 = 1;
const HEADER: usize = 6 + 2 + 4 + 4;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    retained: Vec<RetainedRec>,
    sessions: Vec<SessionRec>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RetainedRec {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
}

#[derive(Debug, Serialize, Deserialize)]
struct MessageRec {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct SessionRec {
    client_id: String,
    subscriptions: Vec<(String, QoS)>,
    inflight: Vec<(u16, OutState, MessageRec)>,
    queue: Vec<MessageRec>,
    inbound_qos2: Vec<u16>,
}

fn message_rec(msg: &Message, qos: QoS, retain: bool) -> MessageRec {
    MessageRec {
        topic: msg.topic.clone(),
        payload: msg.payload.to_vec(),
        qos,
        retain,
    }
}

/// Serialises the state to the snapshot file format.
pub fn encode<'a>(
    retained: &BTreeMap<String, Retained>,
    sessions: impl Iterator<Item = &'a SessionState>,
) -> Vec<u8> {
    let snapshot = Snapshot {
        retained: retained
            .values()
            .map(|r| RetainedRec {
                topic: r.msg.topic.clone(),
                payload: r.msg.payload.to_vec(),
                qos: r.qos,
            })
            .collect(),
        sessions: sessions
            .map(|s| SessionRec {
                client_id: s.client_id.clone(),
                subscriptions: s
                    .subscriptions
                    .iter()
                    .map(|(f, q)| (f.clone(), *q))
                    .collect(),
                inflight: s
                    .inflight
                    .iter()
                    .map(|f| (f.pkid, f.state, message_rec(&f.msg, f.qos, f.retain)))
                    .collect(),
                queue: s
                    .queue
                    .iter()
                    .map(|q| message_rec(&q.msg, q.qos, q.retain))
                    .collect(),
                inbound_qos2: s.inbound_qos2.iter().copied().collect(),
            })
            .collect(),
    };
    let body = postcard::to_stdvec(&snapshot).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&CRC.checksum(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a sensorgate snapshot (bad magic)")]
    Magic,
    #[error("snapshot format version {0} is not supported")]
    Version(u16),
    #[error("truncated: {have} of {want} bytes")]
    Truncated { have: usize, want: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("undecodable body: {0}")]
    Body(String),
}

pub fn decode(data: &[u8]) -> Result<Snapshot, SnapshotError> {
    if data.len() < HEADER || &data[..6] != MAGIC {
        return Err(if data.len() >= 6 && &data[..6] == MAGIC {
            SnapshotError::Truncated {
                have: data.len(),
                want: HEADER,
            }
        } else {
            SnapshotError::Magic
        });
    }
    let u32_at = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let version = u16::from_le_bytes([data[6], data[7]]);
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let len = u32_at(8) as usize;
    let crc = u32_at(12);
    let body = &data[HEADER..];
    if body.len() < len {
        return Err(SnapshotError::Truncated {
            have: data.len(),
            want: HEADER + len,
        });
    }
    let body = &body[..len];
    if CRC.checksum(body) != crc {
        return Err(SnapshotError::Checksum);
    }
    postcard::from_bytes(body).map_err(|e| SnapshotError::Body(e.to_string()))
}

impl Snapshot {
    /// Rebuilds router state; `max_inflight` and `max_queued` come from the current config.
    pub fn into_state(
        self,
        max_inflight: u16,
        max_queued: usize,
    ) -> (BTreeMap<String, Retained>, Vec<SessionState>) {
        let retained = self
            .retained
            .into_iter()
            .map(|r| {
                let msg = Arc::new(Message {
                    topic: r.topic.clone(),
                    payload: Bytes::from(r.payload),
                });
                (r.topic, Retained { msg, qos: r.qos })
            })
            .collect();
        let sessions = self
            .sessions
            .into_iter()
            .map(|s| {
                let mut state = SessionState::new(s.client_id, false, max_inflight, max_queued);
                state.subscriptions = s.subscriptions.into_iter().collect::<HashMap<_, _>>();
                state.inflight = s
                    .inflight
                    .into_iter()
                    .map(|(pkid, st, m)| InFlight {
                        pkid,
                        qos: m.qos,
                        retain: m.retain,
                        state: st,
                        msg: Arc::new(Message {
                            topic: m.topic,
                            payload: Bytes::from(m.payload),
                        }),
                    })
                    .collect::<VecDeque<_>>();
                state.queue = s
                    .queue
                    .into_iter()
                    .map(|m| Queued {
                        qos: m.qos,
                        retain: m.retain,
                        msg: Arc::new(Message {
                            topic: m.topic,
                            payload: Bytes::from(m.payload),
                        }),
                    })
                    .collect();
                state.inbound_qos2 = s.inbound_qos2.into_iter().collect::<HashSet<_>>();
                state.resync_pkid();
                state
            })
            .collect();
        (retained, sessions)
    }
}

/// Loads the snapshot from `dir`; a missing file is an empty state, a damaged one is set aside.
pub fn load(dir: &Path) -> Snapshot {
    let path = dir.join(FILE_NAME);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Snapshot::default(),
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot read the broker snapshot, starting empty: {e}");
            return Snapshot::default();
        }
    };
    match decode(&data) {
        Ok(s) => {
            tracing::info!(
                path = %path.display(),
                retained = s.retained.len(),
                sessions = s.sessions.len(),
                "broker state restored"
            );
            s
        }
        Err(e) => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = dir.join(format!("{FILE_NAME}.corrupt-{stamp}"));
            let moved = std::fs::rename(&path, &aside);
            tracing::error!(
                path = %path.display(),
                set_aside = %aside.display(),
                moved = moved.is_ok(),
                "the broker snapshot is damaged ({e}); starting with no retained messages or sessions"
            );
            Snapshot::default()
        }
    }
}

enum Job {
    Write(Vec<u8>, Option<oneshot::Sender<()>>),
}

/// The store thread's mailbox.
#[derive(Clone)]
pub struct StoreHandle {
    tx: std_mpsc::Sender<Job>,
}

impl StoreHandle {
    /// Starts the thread that writes snapshots to `dir`.
    pub fn spawn(dir: PathBuf) -> std::io::Result<StoreHandle> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new().name("sensorgate-store".into()).spawn(move || {
            let path = dir.join(FILE_NAME);
            while let Ok(mut job) = rx.recv() {
                let mut waiters = Vec::new();
                // Coalesce: only the newest queued snapshot needs writing.
                loop {
                    let Job::Write(_, done) = &mut job;
                    if let Some(d) = done.take() {
                        waiters.push(d);
                    }
                    match rx.try_recv() {
                        Ok(next) => job = next,
                        Err(_) => break,
                    }
                }
                let Job::Write(bytes, _) = job;
                if let Err(e) = write_atomically(&path, &bytes, 0o600) {
                    tracing::error!(path = %path.display(), "cannot save the broker snapshot: {e}");
                }
                for w in waiters {
                    let _ = w.send(());
                }
            }
        })?;
        Ok(StoreHandle { tx })
    }

    pub fn write(&self, bytes: Vec<u8>, done: Option<oneshot::Sender<()>>) {
        if self.tx.send(Job::Write(bytes, done)).is_err() {
            tracing::error!("the store thread has stopped; the broker snapshot is not being saved");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut retained = BTreeMap::new();
        let msg = Arc::new(Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"21.5"),
        });
        retained.insert(
            "a/b".to_string(),
            Retained {
                msg: msg.clone(),
                qos: QoS::AtLeastOnce,
            },
        );
        let mut s = SessionState::new("c1".into(), false, 10, 10);
        s.subscriptions.insert("a/#".into(), QoS::ExactlyOnce);
        s.inbound_qos2.insert(7);
        s.queue.push_back(Queued {
            msg,
            qos: QoS::AtLeastOnce,
            retain: false,
        });
        encode(&retained, [&s].into_iter())
    }

    #[test]
    fn a_snapshot_round_trips() {
        let snap = decode(&sample()).expect("decodes");
        let (retained, sessions) = snap.into_state(10, 10);
        assert_eq!(retained["a/b"].msg.payload, Bytes::from_static(b"21.5"));
        assert_eq!(sessions[0].client_id, "c1");
        assert_eq!(sessions[0].subscriptions["a/#"], QoS::ExactlyOnce);
        assert!(sessions[0].inbound_qos2.contains(&7));
        assert_eq!(sessions[0].queue.len(), 1);
    }

    #[test]
    fn a_truncated_snapshot_is_refused() {
        let data = sample();
        assert!(matches!(
            decode(&data[..data.len() - 1]),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&data[..10]),
            Err(SnapshotError::Truncated { .. })
        ));
        assert_eq!(decode(b"garbage").err(), Some(SnapshotError::Magic));
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_checksum() {
        let mut data = sample();
        let last = data.len() - 3;
        data[last] ^= 0x10;
        assert_eq!(decode(&data).err(), Some(SnapshotError::Checksum));
    }

    #[test]
    fn a_damaged_file_is_set_aside_and_loading_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            b"SGSNAP\x01\x00\xff\xff\xff\x00",
        )
        .unwrap();
        let snap = load(dir.path());
        assert!(snap.retained.is_empty() && snap.sessions.is_empty());
        assert!(!dir.path().join(FILE_NAME).exists());
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("broker.snapshot.corrupt-")
            })
            .count();
        assert_eq!(aside, 1);
    }
}
