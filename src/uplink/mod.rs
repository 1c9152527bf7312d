//! The uplink: delivers outbox records to the upstream broker, and brings subscribed upstream
//! topics into the local broker.
//!
//! ```text
//!  router ──append──▶ outbox (disk) ──cursor──▶ uplink ──PUBLISH──▶ upstream broker
//!     ▲                   ▲  ack / released         │◀──PUBACK/PUBREC/PUBCOMP──┘
//!     └── in-rules ◀──────┴──────────────────────── │◀──PUBLISH (commands)
//! ```
//!
//! Exactly once for QoS 2 (invariant 3): a record's packet id is a function of its record id
//! ([`packet_id_of`]), so it never changes — across reconnects and restarts — without a disk
//! write; record ids are never reused, and two records share a packet id only 65,533 records
//! apart (the newer waits for the older). PUBREC is committed as "released" before PUBREL goes
//! out; after a restart released records resume with PUBREL only and the others are resent
//! under the same id, with DUP=1 if the upstream kept the session. A record leaves the outbox
//! only on PUBACK (QoS 1) or PUBCOMP (QoS 2) (invariant 2), or by a counted drop policy; a
//! PUBREC for a record so dropped is still answered with PUBREL, which frees the id upstream.
//!
//! The MQTT client is the project's own codec over TCP or rustls, not rumqttc: rumqttc answers
//! PUBREC with PUBREL inside its event loop, before the released state can be made durable,
//! which would break the ordering above; and its `publish()` does not expose the packet id.
//! For the same reason packet ids are not confined to `1..=inflight`: an id per record, not per
//! window slot, is what keeps a resend under the id its first PUBLISH had.

mod client;
mod rules;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::broker::BrokerHandle;
use crate::broker::codec::{Packet, Publish, QoS, SubAckCode};
use crate::config::{Backlog, UpstreamConfig};
use crate::outbox::{AppendError, Outbox, OutboxError, Pending, Qos, Record, Ticket};
pub use client::{ConnectError, Connection, connect, credentials, tls_config};
pub use rules::Forward;

/// Records read from the outbox per batch.
const READ_BATCH: usize = 1024;
/// QoS 0 messages waiting for the link when they are not stored (`store-qos0 = false`).
pub const LIVE_QUEUE: usize = 1024;
/// The size of a PUBACK, PUBREC or PUBCOMP.
const ACK_BYTES: usize = 4;
/// How long a PINGRESP or an incoming command can wait behind a run of acknowledgements still
/// on its way (see `Connection::wake_after`).
const NUDGE: Duration = Duration::from_millis(20);
/// Packet ids the uplink keeps for itself (subscriptions); records use the rest.
const SUBSCRIBE_PKID: u16 = u16::MAX - 1;

/// Counters and state of the uplink, for `$SYS` and the status topic.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub delivered: AtomicU64,
    pub superseded: AtomicU64,
    pub live_dropped: AtomicU64,
    pub incoming: AtomicU64,
    /// Why the last attempt failed, for `sensorgate status`.
    pub last_error: std::sync::Mutex<String>,
}

/// One record on its way: where it stands with the upstream.
#[derive(Debug, Clone)]
struct InFlight {
    id: u64,
    qos: Qos,
    released: bool,
}

pub struct Uplink {
    pub config: UpstreamConfig,
    pub outbox: Outbox,
    pub forward: Arc<Forward>,
    /// Set when the task is spawned, once the broker runs.
    pub broker: Option<BrokerHandle>,
    pub live: mpsc::Receiver<Record>,
    pub stats: Arc<UplinkStats>,
    /// Records this task has sent at least once: a resend carries DUP=1.
    pub attempted: IdSet,
    /// Records with lower ids were in the outbox before this task started, so an earlier
    /// process may have sent them: they go out with DUP=1 too.
    pub resumed_below: u64,
}

/// Record ids and packet ids are sequential numbers chosen here, not input: a multiplicative
/// hash spreads them well and costs a multiplication, where the default SipHash is a
/// noticeable part of draining a backlog (three set operations per message).
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdBuild = std::hash::BuildHasherDefault<IdHasher>;
/// A set of record ids.
pub type IdSet = HashSet<u64, IdBuild>;

enum Ended {
    Stop,
    Lost(String),
}

impl Uplink {
    /// Runs until `stop` turns true: connects, delivers, reconnects with backoff and jitter.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = self.config.reconnect_min;
        let mut last_error = String::new();
        let mut first = true;
        loop {
            if *stop.borrow() {
                return;
            }
            let attempt = match client::credentials(&self.config) {
                Ok((password, tls)) => tokio::select! {
                    c = client::connect(&self.config, password.as_deref(), tls) => c,
                    _ = stop.changed() => return,
                },
                Err(e) => Err(e),
            };
            match attempt {
                Ok((conn, session_present)) => {
                    tracing::info!(url = %self.config.url, session_present, "upstream connected");
                    self.stats.connected.store(true, Relaxed);
                    self.stats.connects.fetch_add(1, Relaxed);
                    last_error.clear();
                    let started = Instant::now();
                    let ended = self.session(conn, session_present, &mut stop).await;
                    self.stats.connected.store(false, Relaxed);
                    match ended {
                        Ended::Stop => return,
                        Ended::Lost(why) => {
                            tracing::warn!(url = %self.config.url, "upstream connection lost: {why}; reconnecting");
                            self.set_error(&why);
                            // A connection that lasted a while earns a quick retry; one
                            // that drops at once keeps backing off, so an upstream that
                            // accepts and then closes is not hammered.
                            if started.elapsed() > Duration::from_secs(30) {
                                backoff = self.config.reconnect_min;
                            }
                        }
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    if why != last_error || first {
                        tracing::warn!(url = %self.config.url, "upstream unavailable: {why}; retrying with backoff up to {:?}; messages keep collecting in the outbox", self.config.reconnect_max);
                        last_error = why.clone();
                    } else {
                        tracing::debug!("upstream still unavailable: {why}");
                    }
                    self.set_error(&why);
                    if e.is_permanent() {
                        backoff = self.config.reconnect_max;
                    }
                }
            }
            first = false;
            let wait = jitter(backoff);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(self.config.reconnect_max);
        }
    }

    fn set_error(&self, why: &str) {
        if let Ok(mut e) = self.stats.last_error.lock() {
            why.clone_into(&mut e);
        }
    }

    /// One connected session: resend, then deliver until the link breaks or `stop`.
    async fn session(
        &mut self,
        mut conn: Connection,
        session_present: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut inflight: HashMap<u16, InFlight, IdBuild> = HashMap::default();
        let mut window: VecDeque<Pending> = VecDeque::new();
        let mut cursor = self.outbox.cursor();
        let mut sent = IdSet::default();
        // PUBRECs whose released state is being committed, in arrival order: PUBRELs go out
        // in the same order, since the upstream delivers a QoS 2 message on PUBREL
        // (invariant 7). Commits complete in queue order, so waiting on the front is enough.
        let mut releasing: VecDeque<(u16, Ticket<(), OutboxError>)> = VecDeque::new();
        let mut incoming_qos2: HashSet<u16> = HashSet::new();
        let mut superseded = self.superseded_backlog().await;

        // Presence: retained "online" (the will says "offline"). QoS 0: a new QoS 1/2
        // publish sent before the session's resumed ones can find the upstream's in-flight
        // quota full of our unreleased QoS 2 messages (mosquitto then closes the connection,
        // on every reconnect). Lost with the link at worst, and then the will fires.
        let status = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: self.config.status_topic.clone(),
            pkid: 0,
            payload: Bytes::from_static(b"online"),
        };
        if let Err(e) = conn.send(&Packet::Publish(status)).await {
            return Ended::Lost(e.to_string());
        }
        if !self.forward.inbound_filters().is_empty() {
            let sub = Packet::Subscribe(crate::broker::codec::Subscribe {
                pkid: SUBSCRIBE_PKID,
                filters: self.forward.inbound_filters(),
            });
            if let Err(e) = conn.send(&sub).await {
                return Ended::Lost(e.to_string());
            }
        }

        // Keep-alive 0 turns pings off (MQTT-3.1.2.10): the ping branch is disabled; the
        // interval only must not be zero.
        let keep_alive = self.config.keep_alive;
        let ping_every = keep_alive.max(Duration::from_secs(1));
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let mut last_heard = Instant::now();
        let rate = self.config.drain_rate;
        let mut tokens = f64::from(rate.unwrap_or(0));
        let mut refilled = Instant::now();
        let mut nudge = tokio::time::interval(NUDGE);
        nudge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nudged = false;
        loop {
            // Fill the window from the outbox, in log order: once an eighth of it is free
            // (or nothing is in flight), so that acknowledgements and publishes travel in runs
            // rather than one TCP segment each way per message.
            let capacity = usize::from(self.config.inflight);
            let refill_at = capacity - (capacity / 8).max(1);
            let room = inflight.is_empty() || inflight.len() <= refill_at;
            while room && inflight.len() < capacity {
                if let Some(r) = rate {
                    let now = Instant::now();
                    tokens = (tokens + now.duration_since(refilled).as_secs_f64() * f64::from(r))
                        .min(f64::from(r));
                    refilled = now;
                    if tokens < 1.0 {
                        break;
                    }
                }
                let p = match window.pop_front() {
                    Some(p) => p,
                    None => match cursor.next_batch(READ_BATCH).await {
                        Ok(b) if b.is_empty() => break,
                        Ok(b) => {
                            window.extend(b);
                            continue;
                        }
                        Err(e) => return Ended::Lost(format!("reading the outbox: {e}")),
                    },
                };
                if sent.contains(&p.id) {
                    continue;
                }
                if superseded.remove(&p.id) {
                    // `latest` backlog: a newer message for this topic is waiting.
                    self.outbox.ack(p.id);
                    self.stats.superseded.fetch_add(1, Relaxed);
                    continue;
                }
                if p.record.qos == Qos::AtMostOnce {
                    if let Err(e) = conn
                        .send(&Packet::Publish(publish_of(&p.record, 0, false)))
                        .await
                    {
                        return Ended::Lost(e.to_string());
                    }
                    self.outbox.ack(p.id);
                    self.stats.delivered.fetch_add(1, Relaxed);
                    tokens -= 1.0;
                    continue;
                }
                // The packet id is a function of the record id, so it never changes, across
                // reconnects and restarts, without a disk write (invariant 3). Two records share
                // an id only 65,533 records apart; the newer one waits for the older.
                let pkid = packet_id_of(p.id);
                if inflight.contains_key(&pkid) {
                    window.push_front(p);
                    break;
                }
                sent.insert(p.id);
                // PUBREC was committed as released before: resume with PUBREL only, if the
                // upstream still has the session that holds the message.
                let resume_release = p.released && session_present;
                inflight.insert(
                    pkid,
                    InFlight {
                        id: p.id,
                        qos: p.record.qos,
                        released: resume_release,
                    },
                );
                let packet = if resume_release {
                    Packet::PubRel(pkid)
                } else {
                    // A resend within the upstream's session carries DUP=1; a new session
                    // (session present 0) holds no state, so records go out as new publishes.
                    let dup = session_present
                        && (p.id < self.resumed_below || self.attempted.contains(&p.id));
                    Packet::Publish(publish_of(&p.record, pkid, dup))
                };
                self.attempted.insert(p.id);
                if let Err(e) = conn.send(&packet).await {
                    return Ended::Lost(e.to_string());
                }
                tokens -= 1.0;
            }
            // No flush here: `recv` flushes before it waits for the network, so publishes made
            // for a run of buffered acks leave in one write rather than one segment each.

            // Acknowledgements certainly coming: one per record in flight, except those whose
            // PUBREC is being committed (their PUBCOMP waits for our PUBREL). Wake for a run
            // of them (up to a quarter of the window), not for each; `nudge` drops the threshold now and then so a lone
            // PINGRESP or command is never held back for long.
            let coming = inflight.len().saturating_sub(releasing.len());
            let run = (capacity / 4).max(1);
            let threshold = if nudged {
                1
            } else {
                ACK_BYTES * coming.min(run)
            };
            if threshold > 1 && !conn.waits_for_a_run() {
                // A whole period before the first nudge, not the tick missed while idle.
                nudge.reset();
            }
            conn.wake_after(threshold);
            nudged = false;

            let throttled = rate.is_some() && tokens < 1.0;
            tokio::select! {
                packet = conn.recv() => {
                    let packet = match packet {
                        Ok(Some(p)) => p,
                        Ok(None) => return Ended::Lost("the upstream closed the connection".into()),
                        Err(e) => return Ended::Lost(e.to_string()),
                    };
                    last_heard = Instant::now();
                    match packet {
                        Packet::PubAck(pkid) => {
                            if let Some(f) = inflight.remove(&pkid) {
                                self.outbox.ack(f.id);
                                self.attempted.remove(&f.id);
                                sent.remove(&f.id);
                                self.stats.delivered.fetch_add(1, Relaxed);
                            }
                        }
                        Packet::PubRec(pkid) => {
                            if let Some(f) = inflight.get(&pkid) {
                                if f.released {
                                    let _ = conn.send(&Packet::PubRel(pkid)).await;
                                } else {
                                    // Released is durable before PUBREL goes out.
                                    releasing.push_back((pkid, self.outbox.mark_released(f.id)));
                                }
                            }
                        }
                        Packet::PubComp(pkid) => {
                            if let Some(f) = inflight.remove(&pkid) {
                                self.outbox.ack(f.id);
                                self.attempted.remove(&f.id);
                                sent.remove(&f.id);
                                self.stats.delivered.fetch_add(1, Relaxed);
                            }
                        }
                        Packet::SubAck(ack) => {
                            for (code, filter) in ack.codes.iter().zip(self.forward.inbound_filters()) {
                                if *code == SubAckCode::Failure {
                                    tracing::warn!(filter = %filter.0, "the upstream refused a subscription");
                                }
                            }
                        }
                        Packet::Publish(p) => {
                            if let Err(e) = self.incoming(&mut conn, p, &mut incoming_qos2).await {
                                return Ended::Lost(e);
                            }
                        }
                        Packet::PubRel(pkid) => {
                            incoming_qos2.remove(&pkid);
                            if let Err(e) = conn.send(&Packet::PubComp(pkid)).await {
                                return Ended::Lost(e.to_string());
                            }
                        }
                        Packet::PingResp => {}
                        other => return Ended::Lost(format!("unexpected packet from the upstream: {other:?}")),
                    }
                }
                committed = async { (&mut releasing.front_mut().expect("not empty").1).await }, if !releasing.is_empty() => {
                    let Some((pkid, _)) = releasing.pop_front() else { continue };
                    match committed {
                        Ok(()) => {}
                        // A drop policy removed the record while it was in flight. The upstream
                        // holds the message under this packet id: release it, or the id stays
                        // taken there and a later record sent under it would be lost as a
                        // duplicate.
                        Err(OutboxError::UnknownId(id)) => {
                            tracing::debug!(id, pkid, "PUBREC for a record a drop policy removed; releasing it");
                        }
                        Err(e) => {
                            return Ended::Lost(format!("the outbox could not record a PUBREC: {e}"));
                        }
                    }
                    if let Some(f) = inflight.get_mut(&pkid) {
                        f.released = true;
                        debug_assert!(f.qos == Qos::ExactlyOnce);
                        if let Err(e) = conn.send(&Packet::PubRel(pkid)).await {
                            return Ended::Lost(e.to_string());
                        }
                    }
                }
                _ = cursor.wait_for_more(), if room && inflight.len() < capacity && window.is_empty() && !throttled => {}
                _ = tokio::time::sleep(Duration::from_millis(50)), if throttled => {}
                Some(record) = self.live.recv() => {
                    if let Err(e) = conn.send(&Packet::Publish(publish_of(&record, 0, false))).await {
                        return Ended::Lost(e.to_string());
                    }
                }
                _ = nudge.tick(), if conn.waits_for_a_run() => nudged = true,
                _ = ping.tick(), if !keep_alive.is_zero() => {
                    if last_heard.elapsed() > keep_alive * 3 / 2 + keep_alive {
                        return Ended::Lost("no answer to keep-alive pings".into());
                    }
                    if let Err(e) = conn.send(&Packet::PingReq).await {
                        return Ended::Lost(e.to_string());
                    }
                }
                _ = stop.changed() => {
                    let offline = Publish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain: true,
                        topic: self.config.status_topic.clone(),
                        pkid: 0,
                        payload: Bytes::from_static(b"offline"),
                    };
                    let _ = conn.send(&Packet::Publish(offline)).await;
                    let _ = conn.send(&Packet::Disconnect).await;
                    let _ = conn.flush().await;
                    return Ended::Stop;
                }
            }
        }
    }

    /// A message from an `in` rule: into the local broker, not forwarded back.
    async fn incoming(
        &self,
        conn: &mut Connection,
        p: Publish,
        qos2: &mut HashSet<u16>,
    ) -> Result<(), String> {
        self.stats.incoming.fetch_add(1, Relaxed);
        let deliver = p.qos != QoS::ExactlyOnce || qos2.insert(p.pkid);
        if deliver {
            if let Some(topic) = self.forward.local_topic(&p.topic) {
                if let Some(broker) = &self.broker {
                    let _ = broker
                        .publish_from_upstream(topic, p.payload.clone(), p.qos, p.retain)
                        .await;
                }
            }
        }
        let ack = match p.qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Packet::PubAck(p.pkid),
            QoS::ExactlyOnce => Packet::PubRec(p.pkid),
        };
        conn.send(&ack).await.map_err(|e| e.to_string())
    }

    /// For `latest` out-rules: the records a newer one for the same topic supersedes.
    async fn superseded_backlog(&self) -> HashSet<u64> {
        if !self.config.out.iter().any(|r| r.backlog == Backlog::Latest) {
            return HashSet::new();
        }
        let mut cursor = self.outbox.cursor();
        let mut newest: HashMap<String, u64> = HashMap::new();
        let mut older = HashSet::new();
        loop {
            let batch = match cursor.next_batch(4096).await {
                Ok(b) if !b.is_empty() => b,
                _ => break,
            };
            for p in batch {
                // QoS 2 promises every message exactly once, and a record may hold a packet id
                // the upstream still waits on (released, or PUBREC'd before a crash): never
                // superseded.
                if p.record.qos == Qos::ExactlyOnce
                    || self.forward.backlog_of(&p.record.topic) != Backlog::Latest
                {
                    continue;
                }
                if let Some(prev) = newest.insert(p.record.topic.clone(), p.id) {
                    older.insert(prev);
                }
            }
        }
        older
    }
}

fn publish_of(r: &Record, pkid: u16, dup: bool) -> Publish {
    let qos = match r.qos {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    };
    Publish {
        dup: dup && qos != QoS::AtMostOnce,
        qos,
        retain: r.retain,
        topic: r.topic.clone(),
        pkid,
        payload: r.payload.clone(),
    }
}

/// A record's packet id: 1..=65533 (65534 and 65535 are the uplink's own).
fn packet_id_of(record_id: u64) -> u16 {
    (record_id % u64::from(SUBSCRIBE_PKID - 1)) as u16 + 1
}

/// ±25 % so a fleet of gateways does not reconnect in lockstep after an upstream restart.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        32768
    };
    let factor = 0.75 + f64::from(r) / f64::from(u16::MAX) * 0.5;
    d.mul_f64(factor)
}

/// Settles an append for the router: durable (or dropped by an explicit, counted policy) is
/// `true`; an I/O failure is `false`, so the producer is not acknowledged.
pub fn settle(result: Result<u64, AppendError>) -> bool {
    match result {
        Ok(_) => true,
        Err(AppendError::Full(_))
        | Err(AppendError::TooLarge { .. })
        | Err(AppendError::Invalid { .. }) => {
            // drop-newest: the policy the user chose; counted by the outbox.
            true
        }
        Err(e) => {
            tracing::error!("the outbox could not store a message: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_are_stable_and_avoid_the_reserved_ones() {
        assert_eq!(packet_id_of(0), 1);
        assert_eq!(packet_id_of(65_532), 65_533);
        assert_eq!(packet_id_of(65_533), 1, "wraps before the reserved ids");
        assert_eq!(packet_id_of(7), packet_id_of(7));
        assert!((0..200_000u64).all(|id| (1..SUBSCRIBE_PKID).contains(&packet_id_of(id))));
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(4));
            assert!(
                j >= Duration::from_secs(3) && j <= Duration::from_secs(5),
                "{j:?}"
            );
        }
    }
}
