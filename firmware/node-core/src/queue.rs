//! The uplink queue: `Readings` frames the gateway has not acknowledged yet, kept in RAM and
//! retransmitted with the same boot id and sequence number until the gateway's `Ack`.
//! When it is full the oldest entry is dropped and counted; that count travels in `Heartbeat`.

use heapless::Deque;
use sensorgate_wire::Readings;

use crate::Millis;

/// When to retransmit: `first_ms` after the first send, doubling per attempt up to `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first_ms: Millis,
    pub max_ms: Millis,
}

impl Backoff {
    /// Wait after the `attempt`-th transmission (1 = the first send).
    pub fn delay(&self, attempt: u32) -> Millis {
        let doublings = attempt.saturating_sub(1).min(16);
        self.first_ms
            .saturating_mul(1 << doublings)
            .min(self.max_ms)
    }
}

impl Default for Backoff {
    /// 2 s, 4 s, 8 s … capped at one minute: a gateway restart is survived without flooding.
    fn default() -> Self {
        Backoff {
            first_ms: 2_000,
            max_ms: 60_000,
        }
    }
}

/// One unacknowledged `Readings` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub seq: u32,
    pub readings: Readings,
    /// Transmissions so far.
    pub attempts: u32,
    /// When to send it again.
    pub due_at: Millis,
}

/// Unacknowledged readings, oldest first, at most `N`.
#[derive(Debug)]
pub struct UplinkQueue<const N: usize> {
    entries: Deque<Pending, N>,
    backoff: Backoff,
    dropped: u32,
}

impl<const N: usize> UplinkQueue<N> {
    pub const fn new(backoff: Backoff) -> Self {
        UplinkQueue {
            entries: Deque::new(),
            backoff,
            dropped: 0,
        }
    }

    /// Records a frame just sent for the first time. When the queue is full the oldest entry
    /// makes room and is counted in [`dropped`](Self::dropped).
    pub fn push(&mut self, seq: u32, readings: Readings, now: Millis) {
        if self.entries.is_full() && self.entries.pop_front().is_some() {
            self.dropped = self.dropped.saturating_add(1);
        }
        let entry = Pending {
            seq,
            readings,
            attempts: 1,
            due_at: now.saturating_add(self.backoff.delay(1)),
        };
        // Cannot fail: there is room after the pop above (N > 0 is checked at compile time).
        let _ = self.entries.push_back(entry);
    }

    /// Forgets the entry `seq` (acknowledged). Returns whether it was queued.
    pub fn ack(&mut self, seq: u32) -> bool {
        self.remove(seq).is_some()
    }

    /// Forgets the entry `seq` because the gateway refused it for good; it is counted as dropped.
    pub fn reject(&mut self, seq: u32) -> bool {
        let found = self.remove(seq).is_some();
        if found {
            self.dropped = self.dropped.saturating_add(1);
        }
        found
    }

    /// Makes entry `seq` due again no earlier than `at` (the gateway asked to retry later).
    pub fn defer(&mut self, seq: u32, at: Millis) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.seq == seq) {
            entry.due_at = entry.due_at.max(at);
        }
    }

    /// Restarts the backoff of entry `seq` from `now`, when it actually went on air (a radio
    /// may hold a frame back for its duty cycle), plus `extra_ms` of random jitter so that two
    /// nodes whose packets collided do not collide again on every retry.
    pub fn transmitted(&mut self, seq: u32, now: Millis, extra_ms: Millis) {
        let backoff = self.backoff;
        if let Some(entry) = self.entries.iter_mut().find(|e| e.seq == seq) {
            entry.due_at = now
                .saturating_add(backoff.delay(entry.attempts))
                .saturating_add(extra_ms);
        }
    }

    /// Makes every entry due at `now` (e.g. after a `Hello` the gateway was missing).
    pub fn make_all_due(&mut self, now: Millis) {
        for entry in self.entries.iter_mut() {
            entry.due_at = now;
        }
    }

    /// The oldest entry due for retransmission, with its attempt counted and next time set.
    pub fn next_due(&mut self, now: Millis) -> Option<&Pending> {
        let backoff = self.backoff;
        let entry = self.entries.iter_mut().find(|e| e.due_at <= now)?;
        entry.attempts = entry.attempts.saturating_add(1);
        entry.due_at = now.saturating_add(backoff.delay(entry.attempts));
        Some(entry)
    }

    /// The earliest time an entry falls due, if any is queued.
    pub fn earliest_due(&self) -> Option<Millis> {
        self.entries.iter().map(|e| e.due_at).min()
    }

    /// Readings dropped since boot: queue overflow plus permanent rejections.
    pub fn dropped(&self) -> u32 {
        self.dropped
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove(&mut self, seq: u32) -> Option<Pending> {
        let index = self.entries.iter().position(|e| e.seq == seq)?;
        // Rotate the entry to the front, pop it, rotate the rest back: keeps order with a Deque.
        let mut kept: Deque<Pending, N> = Deque::new();
        let mut removed = None;
        let mut i = 0;
        while let Some(entry) = self.entries.pop_front() {
            if i == index {
                removed = Some(entry);
            } else {
                let _ = kept.push_back(entry);
            }
            i += 1;
        }
        self.entries = kept;
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensorgate_wire::Reading;

    fn readings(v: i32) -> Readings {
        Readings::from_slice(&[Reading::new(0, v, -2)]).unwrap()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            first_ms: 1_000,
            max_ms: 5_000,
        };
        let delays: Vec<_> = (1..=5).map(|a| b.delay(a)).collect();
        assert_eq!(delays, [1_000, 2_000, 4_000, 5_000, 5_000]);
        assert_eq!(b.delay(u32::MAX), 5_000);
    }

    #[test]
    fn an_unacked_entry_is_retransmitted_after_the_backoff_with_its_own_seq() {
        let mut q = UplinkQueue::<4>::new(Backoff {
            first_ms: 1_000,
            max_ms: 8_000,
        });
        q.push(7, readings(1), 0);
        assert!(q.next_due(999).is_none());
        let again = q.next_due(1_000).unwrap();
        assert_eq!((again.seq, again.attempts, again.due_at), (7, 2, 3_000));
        assert!(q.next_due(2_999).is_none());
        assert_eq!(q.next_due(3_000).unwrap().attempts, 3);
    }

    #[test]
    fn ack_removes_only_the_matching_entry_and_keeps_order() {
        let mut q = UplinkQueue::<4>::new(Backoff::default());
        for seq in 1..=3 {
            q.push(seq, readings(seq as i32), 0);
        }
        assert!(q.ack(2));
        assert!(!q.ack(2));
        assert_eq!(q.len(), 2);
        let first = q.next_due(1_000_000).unwrap().seq;
        assert_eq!(first, 1);
        assert_eq!(q.next_due(1_000_000).unwrap().seq, 3);
        assert_eq!(q.dropped(), 0);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let mut q = UplinkQueue::<2>::new(Backoff::default());
        q.push(1, readings(1), 0);
        q.push(2, readings(2), 0);
        assert_eq!(q.dropped(), 0);
        q.push(3, readings(3), 0);
        assert_eq!(q.dropped(), 1);
        assert!(!q.ack(1), "the oldest was dropped");
        assert!(q.ack(2) && q.ack(3));
        assert!(q.is_empty());
    }

    #[test]
    fn transmitted_restarts_the_backoff_from_the_time_on_air_plus_jitter() {
        let mut q = UplinkQueue::<4>::new(Backoff {
            first_ms: 1_000,
            max_ms: 8_000,
        });
        q.push(5, readings(1), 0);
        // Held back by the duty cycle until 30 s, then sent.
        q.transmitted(5, 30_000, 250);
        assert!(q.next_due(31_249).is_none());
        assert_eq!(q.next_due(31_250).unwrap().attempts, 2);
        q.transmitted(5, 40_000, 0);
        assert_eq!(q.earliest_due(), Some(42_000));
        // Unknown entries are ignored.
        q.transmitted(99, 0, 0);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn reject_forgets_and_counts_defer_postpones() {
        let mut q = UplinkQueue::<4>::new(Backoff {
            first_ms: 100,
            max_ms: 100,
        });
        q.push(1, readings(1), 0);
        q.push(2, readings(2), 0);
        assert!(q.reject(1));
        assert_eq!(q.dropped(), 1);
        q.defer(2, 5_000);
        assert!(q.next_due(4_999).is_none());
        assert_eq!(q.earliest_due(), Some(5_000));
        q.make_all_due(10);
        assert_eq!(q.next_due(10).unwrap().seq, 2);
    }
}
