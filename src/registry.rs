//! Dedupe and the node registry: which nodes exist, what they measure, and which of their
//! frames were already seen.
//!
//! Radio retransmits and a node repeating an unacknowledged frame both deliver the same
//! `(node, boot id, sequence)` twice; the second is dropped here. A new boot id is a reboot: the
//! sequence window starts afresh. Frames from the boot before the current one are stragglers
//! and dropped too. The registry is saved to `nodes.json` (atomically, debounced, and at
//! shutdown) so a gateway restart neither forgets nodes nor forwards a retransmit twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::decode::{FrameId, LinkQuality, NodeId, SensorInfo};

pub const FILE_NAME: &str = "nodes.json";

/// Outbox state keys of node dedupe windows start with this, then the node id.
pub const DEDUPE_STATE_PREFIX: &str = "dedupe/";

/// How many sequence numbers below the highest seen are remembered one by one; older ones are
/// taken as seen.
pub const WINDOW: u32 = 64;

/// What the registry knows of one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub port: String,
    pub boot_id: Option<u32>,
    pub previous_boot_id: Option<u32>,
    pub highest_seq: u32,
    /// Bit i set: `highest_seq - i` was seen.
    pub seen: u64,
    pub reboots: u32,
    pub firmware: Option<String>,
    pub sensors: BTreeMap<u16, SensorInfo>,
    pub interval_s: Option<u32>,
    pub last_seen_ms: u64,
    pub battery_mv: Option<u32>,
    pub battery_pct: Option<u8>,
    pub uptime_s: Option<u32>,
    pub readings_dropped: Option<u32>,
    pub link: Option<LinkQuality>,
    pub frames: u64,
    pub duplicates: u64,
    /// A frame of which only a first part is durable, recovered from the outbox.
    #[serde(skip)]
    pub partial: Option<Partial>,
}

/// A frame whose first `done` mapped readings are durable and the rest are not (a crash came
/// between two outbox commits): its retransmission is new, but only the rest is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partial {
    pub frame: FrameId,
    pub done: u32,
}

/// The registry's judgement of a numbered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    /// The first frame of a new boot id.
    Rebooted,
    Duplicate,
}

impl Verdict {
    pub fn is_new(self) -> bool {
        self != Verdict::Duplicate
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    nodes: BTreeMap<NodeId, NodeRecord>,
    #[serde(skip)]
    dirty: bool,
}

impl Registry {
    /// Loads `nodes.json` from `dir`; a missing file is an empty registry and a damaged one is
    /// set aside and reported.
    pub fn load(dir: &Path) -> Registry {
        let path = dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Registry::default(),
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot read the node registry, starting empty: {e}");
                return Registry::default();
            }
        };
        match serde_json::from_str::<Registry>(&text) {
            Ok(r) => r,
            Err(e) => {
                let aside = path.with_extension("json.corrupt");
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(path = %path.display(), set_aside = %aside.display(), "the node registry is damaged ({e}); starting empty");
                Registry::default()
            }
        }
    }

    /// Writes `nodes.json` atomically if anything changed since the last save.
    pub fn save_if_dirty(&mut self, dir: &Path) {
        if !self.dirty {
            return;
        }
        match serde_json::to_vec_pretty(self) {
            Ok(bytes) => {
                match crate::broker::store::write_atomically(&dir.join(FILE_NAME), &bytes, 0o644) {
                    Ok(()) => self.dirty = false,
                    Err(e) => tracing::error!("cannot save the node registry: {e}"),
                }
            }
            Err(e) => tracing::error!("cannot encode the node registry: {e}"),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    pub fn get(&self, node: &str) -> Option<&NodeRecord> {
        self.nodes.get(node)
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&NodeId, &NodeRecord)> {
        self.nodes.iter()
    }

    /// The record of `node`, created if new (without allocating the key when it is not).
    fn record(&mut self, node: &str) -> &mut NodeRecord {
        if !self.nodes.contains_key(node) {
            return self.nodes.entry(node.to_string()).or_default();
        }
        self.nodes
            .get_mut(node)
            .expect("the key is present: checked just above, nothing removed it")
    }

    /// Records that `node` was heard on `port` now; returns its record.
    pub fn touch(&mut self, node: &str, port: &str, now_ms: u64) -> &mut NodeRecord {
        self.dirty = true;
        let rec = self.record(node);
        if rec.port != port {
            rec.port = port.to_string();
        }
        rec.last_seen_ms = now_ms;
        rec.frames += 1;
        rec
    }

    /// The dedupe window of `node`, for the outbox state committed with its records. With
    /// `partial` (or a recovered partial frame still waiting for its retransmission), the frame
    /// it names counts as seen only up to its `done` mapped readings.
    pub fn dedupe_state(&self, node: &str, partial: Option<Partial>) -> Option<(String, Vec<u8>)> {
        let r = self.nodes.get(node)?;
        let partial = partial.or(r.partial);
        let mut v = Vec::with_capacity(30);
        v.extend_from_slice(&r.boot_id.unwrap_or(0).to_le_bytes());
        v.push(u8::from(r.boot_id.is_some()));
        v.extend_from_slice(&r.previous_boot_id.unwrap_or(0).to_le_bytes());
        v.push(u8::from(r.previous_boot_id.is_some()));
        v.extend_from_slice(&r.highest_seq.to_le_bytes());
        v.extend_from_slice(&r.seen.to_le_bytes());
        if let Some(p) = partial {
            v.extend_from_slice(&p.frame.seq.to_le_bytes());
            v.extend_from_slice(&p.done.to_le_bytes());
        }
        Some((format!("{DEDUPE_STATE_PREFIX}{node}"), v))
    }

    /// Restores dedupe windows committed with outbox records. The outbox is authoritative:
    /// every frame is committed there before its ack, while `nodes.json` may be older, or newer
    /// by frames that never became durable (those must be taken as new when retransmitted).
    pub fn restore_dedupe(&mut self, states: &[(String, bytes::Bytes)]) {
        for (key, v) in states {
            let Some(node) = key.strip_prefix(DEDUPE_STATE_PREFIX) else {
                continue;
            };
            if v.len() != 22 && v.len() != 30 {
                continue;
            }
            let u32_at = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
            let boot = (v[4] == 1).then(|| u32_at(0));
            let prev = (v[9] == 1).then(|| u32_at(5));
            let highest = u32_at(10);
            let mut seen = [0u8; 8];
            seen.copy_from_slice(&v[14..22]);
            let seen = u64::from_le_bytes(seen);
            let rec = self.nodes.entry(node.to_string()).or_default();
            rec.boot_id = boot;
            rec.previous_boot_id = prev;
            rec.highest_seq = highest;
            rec.seen = seen;
            rec.partial = None;
            if let (30, Some(boot_id)) = (v.len(), boot) {
                let frame = FrameId {
                    boot_id,
                    seq: u32_at(22),
                };
                unmark(rec, frame);
                rec.partial = Some(Partial {
                    frame,
                    done: u32_at(26),
                });
            }
            self.dirty = true;
        }
    }

    /// How many mapped readings of `frame` are durable already, if a crash left only a first
    /// part of it in the outbox; asked once, when its retransmission arrives.
    pub fn take_partial(&mut self, node: &str, frame: FrameId) -> Option<u32> {
        let rec = self.nodes.get_mut(node)?;
        match rec.partial {
            Some(p) if p.frame == frame => {
                rec.partial = None;
                Some(p.done)
            }
            _ => None,
        }
    }

    /// Forgets that a frame was seen: its readings could not be stored, so the node's
    /// retransmission must be taken as new.
    pub fn forget(&mut self, node: &str, frame: FrameId) {
        if let Some(rec) = self.nodes.get_mut(node) {
            if unmark(rec, frame) {
                self.dirty = true;
            }
        }
    }

    /// Judges a numbered frame and records it as seen.
    pub fn check(&mut self, node: &str, frame: FrameId) -> Verdict {
        self.dirty = true;
        let rec = self.record(node);
        let verdict = judge(rec, frame);
        if verdict == Verdict::Duplicate {
            rec.duplicates += 1;
        }
        verdict
    }
}

/// Clears `frame` from the window; false if it is not in it.
fn unmark(rec: &mut NodeRecord, frame: FrameId) -> bool {
    if rec.boot_id != Some(frame.boot_id) || frame.seq > rec.highest_seq {
        return false;
    }
    let age = rec.highest_seq - frame.seq;
    if age >= WINDOW {
        return false;
    }
    rec.seen &= !(1u64 << age);
    true
}

fn judge(rec: &mut NodeRecord, frame: FrameId) -> Verdict {
    match rec.boot_id {
        Some(boot) if boot == frame.boot_id => {
            if frame.seq > rec.highest_seq {
                let shift = frame.seq - rec.highest_seq;
                rec.seen = if shift >= 64 { 0 } else { rec.seen << shift };
                rec.seen |= 1;
                rec.highest_seq = frame.seq;
                return Verdict::New;
            }
            let age = rec.highest_seq - frame.seq;
            if age >= WINDOW {
                return Verdict::Duplicate;
            }
            let bit = 1u64 << age;
            if rec.seen & bit != 0 {
                Verdict::Duplicate
            } else {
                rec.seen |= bit;
                Verdict::New
            }
        }
        Some(_) if rec.previous_boot_id == Some(frame.boot_id) => Verdict::Duplicate,
        previous => {
            if previous.is_some() {
                rec.reboots += 1;
            }
            rec.previous_boot_id = previous;
            rec.boot_id = Some(frame.boot_id);
            rec.highest_seq = frame.seq;
            rec.seen = 1;
            if previous.is_some() {
                Verdict::Rebooted
            } else {
                Verdict::New
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(boot_id: u32, seq: u32) -> FrameId {
        FrameId { boot_id, seq }
    }

    /// A registry restored from the outbox state `r` commits for node "1" (after a crash).
    fn recovered(r: &Registry, partial: Option<Partial>) -> Registry {
        let (key, value) = r.dedupe_state("1", partial).unwrap();
        let mut back = Registry::default();
        back.restore_dedupe(&[(key, bytes::Bytes::from(value))]);
        back
    }

    #[test]
    fn a_retransmitted_frame_is_a_duplicate() {
        let mut r = Registry::default();
        assert_eq!(r.check("1", f(7, 1)), Verdict::New);
        assert_eq!(r.check("1", f(7, 2)), Verdict::New);
        assert_eq!(r.check("1", f(7, 2)), Verdict::Duplicate);
        assert_eq!(r.check("1", f(7, 1)), Verdict::Duplicate);
        assert_eq!(r.get("1").map(|n| n.duplicates), Some(2));
    }

    #[test]
    fn a_frame_arriving_late_but_unseen_is_new() {
        let mut r = Registry::default();
        r.check("1", f(7, 10));
        assert_eq!(r.check("1", f(7, 12)), Verdict::New);
        assert_eq!(r.check("1", f(7, 11)), Verdict::New);
        assert_eq!(r.check("1", f(7, 11)), Verdict::Duplicate);
    }

    #[test]
    fn a_new_boot_id_is_a_reboot_and_restarts_the_window() {
        let mut r = Registry::default();
        r.check("1", f(7, 500));
        assert_eq!(r.check("1", f(9, 1)), Verdict::Rebooted);
        assert_eq!(r.check("1", f(9, 2)), Verdict::New);
        assert_eq!(
            r.check("1", f(7, 501)),
            Verdict::Duplicate,
            "a straggler from the previous boot"
        );
        assert_eq!(r.get("1").map(|n| n.reboots), Some(1));
    }

    #[test]
    fn frames_older_than_the_window_count_as_seen() {
        let mut r = Registry::default();
        r.check("1", f(7, 1000));
        assert_eq!(r.check("1", f(7, 1000 - WINDOW)), Verdict::Duplicate);
        assert_eq!(r.check("1", f(7, 1000 - WINDOW + 1)), Verdict::New);
        assert_eq!(
            r.check("1", f(7, 2000)),
            Verdict::New,
            "a large jump clears the window"
        );
        assert_eq!(r.check("1", f(7, 1999)), Verdict::New);
    }

    #[test]
    fn a_dedupe_window_round_trips_through_outbox_state() {
        let mut r = Registry::default();
        r.check("1", f(7, 10));
        r.check("1", f(7, 12));
        let mut back = recovered(&r, None);
        assert_eq!(back.check("1", f(7, 12)), Verdict::Duplicate);
        assert_eq!(back.check("1", f(7, 11)), Verdict::New);
        assert_eq!(back.check("1", f(7, 10)), Verdict::Duplicate);
    }

    #[test]
    fn a_frame_recovered_in_part_is_new_again_and_only_its_rest_is_published() {
        let mut r = Registry::default();
        r.check("1", f(7, 10));
        r.check("1", f(7, 11));
        let partial = Partial {
            frame: f(7, 11),
            done: 2,
        };
        let mut back = recovered(&r, Some(partial));
        assert_eq!(back.check("1", f(7, 10)), Verdict::Duplicate);
        assert_eq!(back.take_partial("1", f(7, 10)), None);
        assert_eq!(
            back.check("1", f(7, 11)),
            Verdict::New,
            "only part of it is durable"
        );
        assert_eq!(back.take_partial("1", f(7, 11)), Some(2));
        assert_eq!(back.take_partial("1", f(7, 11)), None, "asked once");
        assert_eq!(back.check("1", f(7, 11)), Verdict::Duplicate);
    }

    #[test]
    fn a_recovered_partial_frame_rides_with_the_next_window_until_it_is_retransmitted() {
        let mut r = Registry::default();
        r.check("1", f(7, 11));
        let partial = Some(Partial {
            frame: f(7, 11),
            done: 1,
        });
        let mut back = recovered(&r, partial);
        // Another frame first, and a second crash before frame 11 comes again.
        back.check("1", f(7, 12));
        let mut again = recovered(&back, None);
        assert_eq!(again.check("1", f(7, 12)), Verdict::Duplicate);
        assert_eq!(again.check("1", f(7, 11)), Verdict::New);
        assert_eq!(again.take_partial("1", f(7, 11)), Some(1));
    }

    #[test]
    fn the_outbox_window_wins_over_a_registry_file_that_saw_more() {
        // The file was saved while frame 12 was read but not yet durable, then the gateway died.
        let mut durable = Registry::default();
        durable.check("1", f(7, 11));
        let (key, value) = durable.dedupe_state("1", None).unwrap();
        let mut from_file = Registry::default();
        from_file.check("1", f(7, 11));
        from_file.check("1", f(7, 12));
        from_file.restore_dedupe(&[(key, bytes::Bytes::from(value))]);
        assert_eq!(from_file.check("1", f(7, 11)), Verdict::Duplicate);
        assert_eq!(
            from_file.check("1", f(7, 12)),
            Verdict::New,
            "never durable, never acknowledged: its retransmission is new"
        );
    }

    #[test]
    fn a_forgotten_frame_is_new_again() {
        let mut r = Registry::default();
        r.check("1", f(7, 10));
        r.forget("1", f(7, 10));
        assert_eq!(r.check("1", f(7, 10)), Verdict::New);
    }

    #[test]
    fn nodes_are_kept_apart() {
        let mut r = Registry::default();
        r.check("1", f(7, 1));
        assert_eq!(r.check("2", f(7, 1)), Verdict::New);
    }

    #[test]
    fn the_registry_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::default();
        r.check("1", f(7, 3));
        r.touch("1", "usb0", 5).firmware = Some("1.2.3".into());
        r.save_if_dirty(dir.path());
        let mut back = Registry::load(dir.path());
        assert_eq!(back.check("1", f(7, 3)), Verdict::Duplicate);
        assert_eq!(
            back.get("1").and_then(|n| n.firmware.clone()).as_deref(),
            Some("1.2.3")
        );
    }

    #[test]
    fn a_damaged_registry_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{ not json").unwrap();
        let r = Registry::load(dir.path());
        assert_eq!(r.nodes().count(), 0);
        assert!(dir.path().join("nodes.json.corrupt").exists());
    }
}
