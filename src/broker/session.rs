//! One client's session as a pure state machine: packets and deliveries in, packets to send out.
//!
//! No sockets, no channels, no clocks: the router feeds it and writes what it returns, so every
//! QoS rule here is unit-tested without a runtime (rumqttc's `state.rs` is the model).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::codec::{LastWill, QoS, SubAck};

/// An application message as the broker routes it; shared by every queue it sits in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
}

/// Something the session wants sent to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Send {
    Publish {
        msg: Arc<Message>,
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    /// Held until the subscriptions it confirms are durable (persistent sessions).
    SubAck(SubAck),
    UnsubAck(u16),
}

/// Where an outgoing QoS 1/2 message stands in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OutState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub pkid: u16,
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub state: OutState,
}

/// A queued message waiting for a free in-flight slot (or for the client to come back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
}

/// What a delivery attempt did, for the broker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    Queued,
    /// The offline queue was full; the message was dropped.
    Dropped,
    /// QoS 0 to an offline client: not kept, as Mosquitto does by default.
    Skipped,
}

#[derive(Debug)]
pub struct SessionState {
    pub client_id: String,
    pub clean: bool,
    pub subscriptions: HashMap<String, QoS>,
    pub will: Option<LastWill>,
    pub inflight: VecDeque<InFlight>,
    pub queue: VecDeque<Queued>,
    /// Inbound QoS 2 packet ids answered with PUBREC and not yet released (method B).
    pub inbound_qos2: HashSet<u16>,
    pub online: bool,
    next_pkid: u16,
    max_inflight: usize,
    max_queued: usize,
    pub dropped: u64,
}

impl SessionState {
    pub fn new(client_id: String, clean: bool, max_inflight: u16, max_queued: usize) -> Self {
        SessionState {
            client_id,
            clean,
            subscriptions: HashMap::new(),
            will: None,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            inbound_qos2: HashSet::new(),
            online: false,
            next_pkid: 1,
            max_inflight: usize::from(max_inflight.max(1)),
            max_queued,
            dropped: 0,
        }
    }

    /// Applies limits from the current configuration (after a restart or reload).
    pub fn set_limits(&mut self, max_inflight: u16, max_queued: usize) {
        self.max_inflight = usize::from(max_inflight.max(1));
        self.max_queued = max_queued;
    }

    /// After a restore: continue numbering after the highest packet id still in flight.
    pub fn resync_pkid(&mut self) {
        if let Some(max) = self.inflight.iter().map(|f| f.pkid).max() {
            self.next_pkid = if max == u16::MAX { 1 } else { max + 1 };
        }
    }

    fn allocate_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            if !self.inflight.iter().any(|f| f.pkid == pkid) {
                return pkid;
            }
        }
    }

    /// Offers a QoS 1/2 message (QoS 0 goes straight to the wire and never reaches here
    /// unless the client is offline).
    pub fn deliver(
        &mut self,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        out: &mut Vec<Send>,
    ) -> Delivery {
        if qos == QoS::AtMostOnce {
            return Delivery::Skipped;
        }
        if self.online && self.inflight.len() < self.max_inflight && self.queue.is_empty() {
            self.send_new(msg, qos, retain, out);
            return Delivery::Sent;
        }
        if self.queue.len() >= self.max_queued {
            self.dropped += 1;
            return Delivery::Dropped;
        }
        self.queue.push_back(Queued { msg, qos, retain });
        Delivery::Queued
    }

    fn send_new(&mut self, msg: Arc<Message>, qos: QoS, retain: bool, out: &mut Vec<Send>) {
        let pkid = self.allocate_pkid();
        let state = if qos == QoS::ExactlyOnce {
            OutState::AwaitPubRec
        } else {
            OutState::AwaitPubAck
        };
        self.inflight.push_back(InFlight {
            pkid,
            msg: msg.clone(),
            qos,
            retain,
            state,
        });
        out.push(Send::Publish {
            msg,
            qos,
            pkid,
            dup: false,
            retain,
        });
    }

    /// Moves queued messages into free in-flight slots.
    pub fn pump(&mut self, out: &mut Vec<Send>) {
        while self.online && self.inflight.len() < self.max_inflight {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            self.send_new(q.msg, q.qos, q.retain, out);
        }
    }

    /// The client came back: resend what it has not acknowledged, with DUP=1 [MQTT-4.4.0-1],
    /// then fill the window from the queue.
    pub fn resume(&mut self, out: &mut Vec<Send>) {
        self.online = true;
        for f in &self.inflight {
            out.push(match f.state {
                OutState::AwaitPubComp => Send::PubRel(f.pkid),
                _ => Send::Publish {
                    msg: f.msg.clone(),
                    qos: f.qos,
                    pkid: f.pkid,
                    dup: true,
                    retain: f.retain,
                },
            });
        }
        self.pump(out);
    }

    /// PUBACK: the QoS 1 message is done [MQTT-4.3.2-1].
    pub fn on_puback(&mut self, pkid: u16, out: &mut Vec<Send>) -> bool {
        let found = self.take_inflight(pkid, OutState::AwaitPubAck);
        self.pump(out);
        found
    }

    /// PUBREC: answer with PUBREL and wait for PUBCOMP [MQTT-4.3.3-1].
    pub fn on_pubrec(&mut self, pkid: u16, out: &mut Vec<Send>) -> bool {
        match self.inflight.iter_mut().find(|f| f.pkid == pkid) {
            Some(f) if f.state != OutState::AwaitPubAck => {
                f.state = OutState::AwaitPubComp;
                out.push(Send::PubRel(pkid));
                true
            }
            _ => false,
        }
    }

    /// PUBCOMP: the QoS 2 message is done.
    pub fn on_pubcomp(&mut self, pkid: u16, out: &mut Vec<Send>) -> bool {
        let found = self.take_inflight(pkid, OutState::AwaitPubComp);
        self.pump(out);
        found
    }

    fn take_inflight(&mut self, pkid: u16, state: OutState) -> bool {
        match self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.state == state)
        {
            Some(i) => {
                self.inflight.remove(i);
                true
            }
            None => false,
        }
    }

    /// An inbound QoS 2 PUBLISH: true if it is new and must be routed; false if it is a resend
    /// of one already answered with PUBREC (method B: the packet id is kept until PUBREL).
    pub fn on_inbound_qos2(&mut self, pkid: u16) -> bool {
        self.inbound_qos2.insert(pkid)
    }

    /// PUBREL for an inbound QoS 2 message: forget the id and answer PUBCOMP [MQTT-4.3.3-2].
    pub fn on_pubrel(&mut self, pkid: u16, out: &mut Vec<Send>) {
        self.inbound_qos2.remove(&pkid);
        out.push(Send::PubComp(pkid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: t.into(),
            payload: Bytes::from_static(b"x"),
        })
    }

    fn online(max_inflight: u16, max_queued: usize) -> SessionState {
        let mut s = SessionState::new("c".into(), false, max_inflight, max_queued);
        s.online = true;
        s
    }

    #[test]
    fn the_inflight_window_holds_back_messages_until_acknowledged() {
        let mut s = online(2, 10);
        let mut out = Vec::new();
        for t in ["a", "b", "c"] {
            s.deliver(msg(t), QoS::AtLeastOnce, false, &mut out);
        }
        assert_eq!(out.len(), 2);
        assert_eq!(s.queue.len(), 1);
        out.clear();
        assert!(s.on_puback(1, &mut out));
        assert!(matches!(
            &out[..],
            [Send::Publish {
                pkid: 3,
                dup: false,
                ..
            }]
        ));
    }

    #[test]
    fn puback_removes_the_matching_inflight_publish_only() {
        let mut s = online(5, 10);
        let mut out = Vec::new();
        s.deliver(msg("a"), QoS::AtLeastOnce, false, &mut out);
        assert!(!s.on_puback(9, &mut out));
        assert!(
            !s.on_pubcomp(1, &mut out),
            "PUBCOMP must not complete a QoS 1 message"
        );
        assert!(s.on_puback(1, &mut out));
        assert!(s.inflight.is_empty());
    }

    #[test]
    fn qos2_outbound_goes_publish_pubrec_pubrel_pubcomp() {
        let mut s = online(5, 10);
        let mut out = Vec::new();
        s.deliver(msg("a"), QoS::ExactlyOnce, false, &mut out);
        out.clear();
        assert!(s.on_pubrec(1, &mut out));
        assert_eq!(out, vec![Send::PubRel(1)]);
        out.clear();
        assert!(s.on_pubcomp(1, &mut out));
        assert!(s.inflight.is_empty());
    }

    #[test]
    fn a_reconnect_resends_unacknowledged_publishes_with_dup_and_pending_pubrels() {
        let mut s = online(5, 10);
        let mut out = Vec::new();
        s.deliver(msg("a"), QoS::AtLeastOnce, false, &mut out);
        s.deliver(msg("b"), QoS::ExactlyOnce, false, &mut out);
        s.deliver(msg("c"), QoS::ExactlyOnce, false, &mut out);
        s.on_pubrec(3, &mut out);
        s.online = false;
        out.clear();
        s.resume(&mut out);
        assert!(matches!(
            &out[0],
            Send::Publish {
                pkid: 1,
                dup: true,
                ..
            }
        ));
        assert!(matches!(
            &out[1],
            Send::Publish {
                pkid: 2,
                dup: true,
                qos: QoS::ExactlyOnce,
                ..
            }
        ));
        assert_eq!(out[2], Send::PubRel(3));
    }

    #[test]
    fn the_offline_queue_is_bounded_and_counts_drops() {
        let mut s = SessionState::new("c".into(), false, 5, 2);
        let mut out = Vec::new();
        assert_eq!(
            s.deliver(msg("a"), QoS::AtLeastOnce, false, &mut out),
            Delivery::Queued
        );
        assert_eq!(
            s.deliver(msg("b"), QoS::AtLeastOnce, false, &mut out),
            Delivery::Queued
        );
        assert_eq!(
            s.deliver(msg("c"), QoS::AtLeastOnce, false, &mut out),
            Delivery::Dropped
        );
        assert_eq!(
            s.deliver(msg("d"), QoS::AtMostOnce, false, &mut out),
            Delivery::Skipped
        );
        assert_eq!(s.dropped, 1);
        assert!(out.is_empty());
        s.resume(&mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn inbound_qos2_is_routed_once_until_released() {
        let mut s = online(5, 10);
        let mut out = Vec::new();
        assert!(s.on_inbound_qos2(7));
        assert!(
            !s.on_inbound_qos2(7),
            "a resend before PUBREL is not routed again"
        );
        s.on_pubrel(7, &mut out);
        assert_eq!(out, vec![Send::PubComp(7)]);
        assert!(s.on_inbound_qos2(7), "after PUBREL the id may be reused");
    }

    #[test]
    fn packet_ids_skip_those_still_in_flight() {
        let mut s = online(3, 10);
        s.next_pkid = u16::MAX;
        let mut out = Vec::new();
        s.deliver(msg("a"), QoS::AtLeastOnce, false, &mut out);
        s.deliver(msg("b"), QoS::AtLeastOnce, false, &mut out);
        let ids: Vec<u16> = out
            .iter()
            .filter_map(|o| {
                if let Send::Publish { pkid, .. } = o {
                    Some(*pkid)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(ids, vec![u16::MAX, 1]);
    }
}
