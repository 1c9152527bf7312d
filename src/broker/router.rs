//! The router: one task that owns every session, the subscription trie and the retained store.
//!
//! Connections decode packets and send them here; the router never awaits a connection (it
//! `try_send`s into bounded per-connection queues) nor the disk (snapshots go to the store
//! thread), so one slow client or a slow SD card cannot stall the others (invariants 5 and 6).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::Stats;
use super::codec::{
    self, ConnAck, Connect, ConnectReturnCode, Packet, ProtocolLevel, Publish, QoS, SubAck,
    SubAckCode,
};
use super::persist::{self, Snapshot, StoreHandle};
use super::session::{Delivery, Message, Send, SessionState};
use super::topic::{self, SubscriptionTrie};

/// Identifies one network connection (not a client: a client id outlives its connections).
pub type ConnId = u64;
type SessionKey = u32;

/// Frames queued for a connection's writer.
#[derive(Debug)]
pub enum Outgoing {
    /// A complete encoded packet.
    Frame(Bytes),
    /// A PUBLISH: its head (fixed header, topic, packet id) and the payload shared by all
    /// subscribers (encode once, fan out).
    Publish { head: Bytes, payload: Bytes },
}

/// Room kept free in each connection queue for QoS 1/2 traffic and acknowledgements: QoS 0
/// messages are dropped before they can take it, so a flood of QoS 0 never blocks an ack.
pub const ACK_RESERVE: usize = 1024;
/// QoS 0 messages a connection may have queued before further ones are dropped for it.
pub const QOS0_QUEUE: usize = 4096;

/// What connections and in-process producers ask of the router.
pub enum Command {
    Connect {
        conn: ConnId,
        connect: Connect,
        tx: mpsc::Sender<Outgoing>,
        kill: oneshot::Sender<()>,
    },
    Packet {
        conn: ConnId,
        packet: Packet,
    },
    /// The connection ended; `graceful` after a DISCONNECT packet (no will).
    Closed {
        conn: ConnId,
        graceful: bool,
    },
    /// A message from inside the gateway (ingest, `$SYS`, the uplink's `in` rules).
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        origin: Origin,
        /// Told `true` once the message is durable where it has to be (the outbox, when an
        /// out-rule forwards it), `false` if it could not be stored.
        done: Option<oneshot::Sender<bool>>,
        /// Outbox state committed atomically with the message when it is stored, and on its
        /// own before `done` when the message is not (a node's dedupe window, invariant 3).
        state: Option<(String, Vec<u8>)>,
    },
    /// Outbox state to commit on its own, in order with the messages before it; `done` is told
    /// whether it is durable (a node's dedupe window for a frame with nothing to forward).
    CommitState {
        state: (String, Vec<u8>),
        done: oneshot::Sender<bool>,
    },
    /// The outbox committed (or failed to commit) what acknowledgement `token` of `conn` waits for.
    Durable {
        conn: ConnId,
        token: u64,
        ok: bool,
    },
    /// An in-process subscriber (the pipeline's command topics): live messages only.
    SubscribeInternal {
        filter: String,
        tx: mpsc::Sender<InternalMessage>,
    },
    /// Replaces the forwarding rules (configuration reload).
    SetForward(Option<Arc<crate::uplink::Forward>>),
    /// Save state and close every connection.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Where an in-process message comes from; messages from upstream are never forwarded back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Gateway,
    Upstream,
}

/// Completes with `true` once the outbox committed a forwarded message.
type Durability = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + std::marker::Send>>;

/// Acknowledgements of one connection that wait for the outbox, kept in the order the
/// packets arrived [MQTT-4.6.0-2].
#[derive(Default)]
struct AckQueue {
    next: u64,
    items: VecDeque<(u64, Send, bool)>,
}

/// A message delivered to an in-process subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
}

struct Link {
    conn: ConnId,
    tx: mpsc::Sender<Outgoing>,
    kill: Option<oneshot::Sender<()>>,
}

struct Entry {
    state: SessionState,
    link: Option<Link>,
}

#[derive(Debug, Clone)]
pub struct Retained {
    pub msg: Arc<Message>,
    pub qos: QoS,
}

pub struct RouterConfig {
    pub max_inflight: u16,
    pub max_queued: usize,
    pub sys_interval: Duration,
    pub snapshot_interval: Duration,
    /// Out-rules and the outbox, when an uplink is configured.
    pub forward: Option<Arc<crate::uplink::Forward>>,
}

pub struct Router {
    config: RouterConfig,
    entries: Vec<Option<Entry>>,
    free: Vec<SessionKey>,
    by_client: HashMap<String, SessionKey>,
    by_conn: HashMap<ConnId, SessionKey>,
    trie: SubscriptionTrie<SessionKey>,
    retained: BTreeMap<String, Retained>,
    stats: Arc<Stats>,
    store: Option<StoreHandle>,
    /// State changed since the last snapshot.
    dirty: bool,
    /// A change exactly-once depends on: snapshot at the end of this batch.
    urgent: bool,
    started: Instant,
    matches: Vec<(SessionKey, QoS)>,
    sends: Vec<Send>,
    /// Internal subscribers: filter, length of its part before the first wildcard, channel.
    internal: Vec<(String, usize, mpsc::Sender<InternalMessage>)>,
    acks: HashMap<ConnId, AckQueue>,
    /// For tasks that report outbox commits back to this router.
    self_tx: Option<mpsc::WeakSender<Command>>,
}

impl Router {
    pub fn new(
        config: RouterConfig,
        stats: Arc<Stats>,
        store: Option<StoreHandle>,
        snapshot: Snapshot,
    ) -> Router {
        let mut router = Router {
            config,
            entries: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::new(),
            by_conn: HashMap::new(),
            trie: SubscriptionTrie::new(),
            retained: BTreeMap::new(),
            stats,
            store,
            dirty: false,
            urgent: false,
            started: Instant::now(),
            matches: Vec::new(),
            sends: Vec::new(),
            internal: Vec::new(),
            acks: HashMap::new(),
            self_tx: None,
        };
        router.restore(snapshot);
        router.restore_sessions_from_outbox();
        router
    }

    fn restore(&mut self, snapshot: Snapshot) {
        let (retained, sessions) =
            snapshot.into_state(self.config.max_inflight, self.config.max_queued);
        self.retained = retained;
        for state in sessions {
            let key = self.insert_entry(Entry { state, link: None });
            let subs: Vec<(String, QoS)> = self
                .entry(key)
                .map(|e| {
                    e.state
                        .subscriptions
                        .iter()
                        .map(|(f, q)| (f.clone(), *q))
                        .collect()
                })
                .unwrap_or_default();
            for (filter, qos) in subs {
                self.trie.insert(&filter, key, qos);
            }
        }
        self.stats
            .retained
            .store(self.retained.len() as u64, Relaxed);
        self.update_client_counts();
    }

    /// The inbound QoS 2 packet ids committed with outbox records are newer than (or as new as)
    /// the snapshot's, and consistent with the records: they win. A session the snapshot
    /// missed (crash right after it was created) is recreated from them.
    fn restore_sessions_from_outbox(&mut self) {
        let Some(forward) = self.config.forward.clone() else {
            return;
        };
        for (key, value) in forward.outbox.states() {
            if let Some(client) = key.strip_prefix(SUBS_STATE_PREFIX) {
                self.restore_subscriptions(client, &value);
                continue;
            }
            let Some(client) = key.strip_prefix(QOS2_STATE_PREFIX) else {
                continue;
            };
            let ids = qos2_ids(&value);
            // No ids awaiting PUBREL: nothing to recognise a resend by, and the client may
            // since have discarded the session with a clean-session connect. Recreating it
            // would answer its next connect with a session present that holds nothing.
            if ids.is_empty() && !self.by_client.contains_key(client) {
                continue;
            }
            let session = self.persistent_session(client);
            if let Some(e) = self.entry(session) {
                e.state.inbound_qos2 = ids.into_iter().collect();
            }
        }
        self.update_client_counts();
    }

    /// The session of `client`, created (persistent, offline) if there is none.
    fn persistent_session(&mut self, client: &str) -> SessionKey {
        if let Some(&k) = self.by_client.get(client) {
            return k;
        }
        let state = SessionState::new(
            client.to_string(),
            false,
            self.config.max_inflight,
            self.config.max_queued,
        );
        self.insert_entry(Entry { state, link: None })
    }

    /// A persistent session's subscriptions as last committed to the outbox: newer than (or as
    /// new as) the snapshot's, so they win; a session the snapshot missed is recreated. An empty
    /// value is a discarded session.
    fn restore_subscriptions(&mut self, client: &str, value: &[u8]) {
        let Some(subscriptions) = decode_subscriptions(value) else {
            return;
        };
        let session = self.persistent_session(client);
        let Some(e) = self
            .entries
            .get_mut(session as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let old = std::mem::replace(&mut e.state.subscriptions, subscriptions.clone());
        for filter in old.keys() {
            self.trie.remove(filter, session);
        }
        for (filter, qos) in subscriptions {
            self.trie.insert(&filter, session, qos);
        }
    }

    /// Runs until a `Shutdown` command or until every sender is gone.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        self_tx: mpsc::WeakSender<Command>,
    ) {
        self.self_tx = Some(self_tx);
        let mut batch = Vec::with_capacity(256);
        let mut sys = tokio::time::interval(self.config.sys_interval);
        sys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snap = tokio::time::interval(self.config.snapshot_interval);
        snap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish_version();
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        self.save(None).await;
                        return;
                    }
                    for cmd in batch.drain(..) {
                        if let Command::Shutdown { done } = cmd {
                            self.shutdown(done).await;
                            return;
                        }
                        self.handle(cmd);
                    }
                    if self.urgent {
                        self.snapshot_async();
                    }
                }
                _ = sys.tick() => self.publish_sys(),
                _ = snap.tick() => if self.dirty { self.snapshot_async() },
            }
        }
    }

    async fn shutdown(&mut self, done: oneshot::Sender<()>) {
        self.save(Some(done)).await;
        for entry in self.entries.iter_mut().flatten() {
            if let Some(mut link) = entry.link.take() {
                if let Some(kill) = link.kill.take() {
                    let _ = kill.send(());
                }
            }
        }
    }

    /// The final snapshot at shutdown: written before `done` fires.
    async fn save(&mut self, done: Option<oneshot::Sender<()>>) {
        if let Some(store) = &self.store {
            let bytes = self.snapshot_bytes();
            let (tx, rx) = oneshot::channel();
            store.write(bytes, Some(tx));
            let _ = rx.await;
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn snapshot_bytes(&self) -> Vec<u8> {
        let sessions = self
            .entries
            .iter()
            .flatten()
            .filter(|e| !e.state.clean)
            .map(|e| &e.state);
        persist::encode(&self.retained, sessions)
    }

    fn snapshot_async(&mut self) {
        self.dirty = false;
        self.urgent = false;
        if let Some(store) = &self.store {
            store.write(self.snapshot_bytes(), None);
        }
    }

    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect {
                conn,
                connect,
                tx,
                kill,
            } => self.on_connect(conn, connect, tx, kill),
            Command::Packet { conn, packet } => {
                if let Some(&key) = self.by_conn.get(&conn) {
                    self.on_packet(key, packet);
                }
            }
            Command::Closed { conn, graceful } => self.on_closed(conn, graceful),
            Command::Publish {
                topic,
                payload,
                qos,
                retain,
                origin,
                done,
                state,
            } => {
                if !topic::validate_topic(&topic) {
                    tracing::warn!(%topic, "in-process publish to an invalid topic dropped");
                    if let Some(d) = done {
                        let _ = d.send(false);
                    }
                    return;
                }
                let msg = Arc::new(Message { topic, payload });
                self.publish(msg.clone(), qos, retain);
                let mut state = state;
                let wait = match origin {
                    Origin::Gateway => self.forward(&msg, qos, retain, &mut state),
                    Origin::Upstream => None,
                };
                // Not stored (no out-rule, QoS 0 sent live): the state still has to be durable
                // before the producer is told, or a crash forgets what the stored part of its
                // frame already holds.
                let wait = match state {
                    Some(state) => self.commit_state(state),
                    None => wait,
                };
                tell_when_durable(done, wait);
            }
            Command::CommitState { state, done } => {
                let wait = self.commit_state(state);
                tell_when_durable(Some(done), wait);
            }
            Command::Durable { conn, token, ok } => self.on_durable(conn, token, ok),
            Command::SetForward(forward) => {
                let had_none = self.config.forward.is_none();
                self.config.forward = forward;
                if had_none {
                    self.restore_sessions_from_outbox();
                }
            }
            Command::SubscribeInternal { filter, tx } => {
                let literal = filter.find(['+', '#']).unwrap_or(filter.len());
                self.internal.push((filter, literal, tx));
            }
            Command::Shutdown { done } => {
                let _ = done.send(());
            }
        }
    }

    fn entry(&mut self, key: SessionKey) -> Option<&mut Entry> {
        self.entries.get_mut(key as usize).and_then(Option::as_mut)
    }

    fn insert_entry(&mut self, entry: Entry) -> SessionKey {
        let id = entry.state.client_id.clone();
        let key = match self.free.pop() {
            Some(k) => {
                self.entries[k as usize] = Some(entry);
                k
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as SessionKey
            }
        };
        self.by_client.insert(id, key);
        key
    }

    fn remove_entry(&mut self, key: SessionKey) {
        let Some(entry) = self.entries.get_mut(key as usize).and_then(Option::take) else {
            return;
        };
        for filter in entry.state.subscriptions.keys() {
            self.trie.remove(filter, key);
        }
        self.by_client.remove(&entry.state.client_id);
        self.free.push(key);
        if !entry.state.clean {
            self.dirty = true;
            self.forget_durable_session(&entry.state.client_id);
        }
    }

    fn update_client_counts(&self) {
        let total = self.entries.iter().flatten().count() as u64;
        let connected = self
            .entries
            .iter()
            .flatten()
            .filter(|e| e.link.is_some())
            .count() as u64;
        self.stats.clients_total.store(total, Relaxed);
        self.stats.clients_connected.store(connected, Relaxed);
    }

    fn on_connect(
        &mut self,
        conn: ConnId,
        connect: Connect,
        tx: mpsc::Sender<Outgoing>,
        kill: oneshot::Sender<()>,
    ) {
        let mut session_present = false;
        if let Some(&key) = self.by_client.get(&connect.client_id) {
            // Session takeover [MQTT-3.1.4-2]: the first connection is closed by the server, not
            // by DISCONNECT, so its will is published.
            let mut will = None;
            let mut drop_session = connect.clean_session;
            if let Some(entry) = self.entry(key) {
                if let Some(mut old) = entry.link.take() {
                    tracing::info!(client = %entry.state.client_id, "session taken over by a new connection");
                    if let Some(k) = old.kill.take() {
                        let _ = k.send(());
                    }
                    self.by_conn.remove(&old.conn);
                }
                let entry = self.entries[key as usize].as_mut();
                if let Some(entry) = entry {
                    entry.state.online = false;
                    will = entry.state.will.take();
                    drop_session |= entry.state.clean;
                }
            }
            if let Some(w) = will {
                self.publish_will(w);
            }
            if drop_session {
                self.remove_entry(key);
            } else {
                session_present = true;
            }
        }
        let key = match self.by_client.get(&connect.client_id) {
            Some(&k) => k,
            None => {
                let state = SessionState::new(
                    connect.client_id.clone(),
                    connect.clean_session,
                    self.config.max_inflight,
                    self.config.max_queued,
                );
                if !connect.clean_session {
                    // A new persistent session: saved at once, since exactly-once depends on it.
                    self.urgent = true;
                }
                self.insert_entry(Entry { state, link: None })
            }
        };
        self.by_conn.insert(conn, key);
        let protocol = connect.protocol;
        let mut sends = std::mem::take(&mut self.sends);
        if let Some(entry) = self.entry(key) {
            entry.state.will = connect.will;
            let link = Link {
                conn,
                tx,
                kill: Some(kill),
            };
            // 3.1 has no session-present flag.
            let ack = ConnAck {
                session_present: session_present && protocol == ProtocolLevel::V311,
                code: ConnectReturnCode::Accepted,
            };
            let _ = link
                .tx
                .try_send(Outgoing::Frame(frame(&Packet::ConnAck(ack))));
            entry.link = Some(link);
            entry.state.resume(&mut sends);
        }
        self.flush_sends(key, &mut sends);
        self.sends = sends;
        self.update_client_counts();
    }

    fn on_closed(&mut self, conn: ConnId, graceful: bool) {
        self.acks.remove(&conn);
        let Some(key) = self.by_conn.remove(&conn) else {
            return;
        };
        let mut will = None;
        let mut clean = false;
        if let Some(entry) = self.entry(key) {
            entry.link = None;
            entry.state.online = false;
            will = entry.state.will.take();
            clean = entry.state.clean;
        }
        if clean {
            self.remove_entry(key);
        } else {
            self.dirty = true;
        }
        // [MQTT-3.1.2-8]: the will is published unless the client sent DISCONNECT.
        if let (false, Some(w)) = (graceful, will) {
            self.publish_will(w);
        }
        self.update_client_counts();
    }

    fn publish_will(&mut self, will: codec::LastWill) {
        let msg = Arc::new(Message {
            topic: will.topic,
            payload: will.payload,
        });
        self.publish(msg.clone(), will.qos, will.retain);
        // Nobody waits for a will's durability; the outbox commits it with the next batch.
        drop(self.forward(&msg, will.qos, will.retain, &mut None));
    }

    /// Appends a message an out-rule selects to the outbox; the future completes when it is
    /// durable. `state` is taken and committed atomically with it (inbound QoS 2 packet ids, a
    /// node's dedupe window); it is left in place when the message is not stored.
    fn forward(
        &mut self,
        msg: &Message,
        qos: QoS,
        retain: bool,
        state: &mut Option<(String, Vec<u8>)>,
    ) -> Option<Durability> {
        let forward = self.forward_config()?;
        let record = forward.record_for(&msg.topic, &msg.payload, qos, retain)?;
        if record.qos == crate::outbox::Qos::AtMostOnce && !forward.store_qos0 {
            forward.send_live(record);
            return None;
        }
        let ticket = match state.take() {
            Some((k, v)) => forward
                .outbox
                .append_with_state(record, &[(k.as_str(), v.as_slice())]),
            None => forward.outbox.append(record),
        };
        let f = forward.clone();
        Some(Box::pin(async move { f.settle(ticket.await) }))
    }

    /// Commits outbox state on its own, after everything appended before it; `None` without
    /// an outbox (nothing is forwarded, so there is nothing to keep consistent with).
    fn commit_state(&self, (key, value): (String, Vec<u8>)) -> Option<Durability> {
        let forward = self.forward_config()?;
        Some(logged(
            forward.outbox.put_state(&key, &value),
            "dedupe state",
        ))
    }

    /// With an outbox, a persistent session's subscriptions are committed to it before their
    /// SUBACK or UNSUBACK goes out, so a session recovered after a crash (from the snapshot or,
    /// if the snapshot missed it, from the outbox) has every subscription it confirmed.
    fn commit_subscriptions(&self, key: SessionKey, persistent: bool) -> Option<Durability> {
        if !persistent {
            return None;
        }
        let forward = self.forward_config()?;
        let state = &self.entries.get(key as usize)?.as_ref()?.state;
        let (k, v) = subscriptions_state(state);
        Some(logged(
            forward.outbox.put_state_now(&k, &v),
            "a session's subscriptions",
        ))
    }

    /// A persistent session discarded (clean-session connect): its outbox states say so, or it
    /// would come back after a restart the snapshot had not caught up with.
    fn forget_durable_session(&self, client: &str) {
        let Some(forward) = self.forward_config() else {
            return;
        };
        for key in [
            format!("{SUBS_STATE_PREFIX}{client}"),
            format!("{QOS2_STATE_PREFIX}{client}"),
        ] {
            if forward.outbox.state(&key).is_some_and(|v| !v.is_empty()) {
                // Not awaited (dropping the ticket does not withdraw the write): until it
                // commits, the snapshot (marked dirty) says the same.
                drop(forward.outbox.put_state(&key, &[]));
            }
        }
    }

    fn forward_config(&self) -> Option<Arc<crate::uplink::Forward>> {
        self.config.forward.clone()
    }

    /// Sends `send` now, or after the acknowledgements queued before it and after `wait`.
    fn queue_ack(
        &mut self,
        key: SessionKey,
        send: Send,
        wait: Option<Durability>,
        sends: &mut Vec<Send>,
    ) {
        let Some(conn) = self
            .entry(key)
            .and_then(|e| e.link.as_ref().map(|l| l.conn))
        else {
            return;
        };
        let queue = self.acks.entry(conn).or_default();
        if wait.is_none() && queue.items.is_empty() {
            sends.push(send);
            return;
        }
        let token = queue.next;
        queue.next += 1;
        queue.items.push_back((token, send, wait.is_none()));
        if let Some(wait) = wait {
            self.report_when_durable(conn, token, wait);
        }
    }

    fn report_when_durable(&self, conn: ConnId, token: u64, wait: Durability) {
        let Some(tx) = self.self_tx.clone() else {
            return;
        };
        tokio::spawn(async move {
            let ok = wait.await;
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(Command::Durable { conn, token, ok }).await;
            }
        });
    }

    /// Makes the acknowledgement just produced (the last in `sends` or the queue) also wait
    /// for `wait`.
    fn hold_last(&mut self, conn: ConnId, wait: Durability, sends: &mut Vec<Send>) {
        let queue = self.acks.entry(conn).or_default();
        let send = match queue.items.back() {
            Some(_) => queue.items.pop_back().map(|i| i.1),
            None => sends.pop(),
        };
        let Some(send) = send else { return };
        let token = queue.next;
        queue.next += 1;
        queue.items.push_back((token, send, false));
        self.report_when_durable(conn, token, wait);
    }

    fn on_durable(&mut self, conn: ConnId, token: u64, ok: bool) {
        let Some(&key) = self.by_conn.get(&conn) else {
            self.acks.remove(&conn);
            return;
        };
        if !ok {
            // Not stored (disk full, I/O error): no acknowledgement, so the client keeps the
            // message; closing the connection makes it resend once it reconnects.
            tracing::error!(
                conn,
                "the outbox could not store a message; closing the connection so its client retries"
            );
            self.acks.remove(&conn);
            if let Some(link) = self.entry(key).and_then(|e| e.link.as_mut()) {
                if let Some(k) = link.kill.take() {
                    let _ = k.send(());
                }
            }
            return;
        }
        let mut ready = Vec::new();
        if let Some(q) = self.acks.get_mut(&conn) {
            if let Some(item) = q.items.iter_mut().find(|i| i.0 == token) {
                item.2 = true;
            }
            while q.items.front().is_some_and(|i| i.2) {
                if let Some((_, send, _)) = q.items.pop_front() {
                    ready.push(send);
                }
            }
        }
        let mut sends = std::mem::take(&mut self.sends);
        sends.extend(ready);
        self.flush_sends(key, &mut sends);
        self.sends = sends;
    }

    fn on_packet(&mut self, key: SessionKey, packet: Packet) {
        let mut sends = std::mem::take(&mut self.sends);
        let persistent = self.entry(key).is_some_and(|e| !e.state.clean);
        match packet {
            Packet::Publish(p) => {
                self.stats.messages_received.fetch_add(1, Relaxed);
                let Publish {
                    qos,
                    retain,
                    topic,
                    pkid,
                    payload,
                    ..
                } = p;
                let route = match qos {
                    QoS::ExactlyOnce => self
                        .entry(key)
                        .is_some_and(|e| e.state.on_inbound_qos2(pkid)),
                    _ => true,
                };
                let mut wait = None;
                if route {
                    // The decoded payload is a slice of the connection's read buffer; copy it so
                    // a retained or queued message does not pin a whole read chunk.
                    let payload = Bytes::copy_from_slice(&payload);
                    let msg = Arc::new(Message { topic, payload });
                    self.publish(msg.clone(), qos, retain);
                    // Invariant 1: the acknowledgement waits for the outbox commit; for QoS 2
                    // the packet ids answered with PUBREC are committed with the record
                    // (invariant 3), so a resend after a crash is recognised.
                    let mut state = (persistent && qos == QoS::ExactlyOnce)
                        .then(|| self.entry(key).map(|e| qos2_state(&e.state)))
                        .flatten();
                    wait = self.forward(&msg, qos, retain, &mut state);
                }
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => self.queue_ack(key, Send::PubAck(pkid), wait, &mut sends),
                    QoS::ExactlyOnce => self.queue_ack(key, Send::PubRec(pkid), wait, &mut sends),
                }
                if persistent && qos == QoS::ExactlyOnce {
                    self.dirty = true;
                }
            }
            Packet::PubAck(pkid) => {
                if let Some(e) = self.entry(key) {
                    e.state.on_puback(pkid, &mut sends);
                }
            }
            Packet::PubRec(pkid) => {
                if let Some(e) = self.entry(key) {
                    e.state.on_pubrec(pkid, &mut sends);
                }
            }
            Packet::PubComp(pkid) => {
                if let Some(e) = self.entry(key) {
                    e.state.on_pubcomp(pkid, &mut sends);
                }
            }
            Packet::PubRel(pkid) => {
                let mut released = Vec::new();
                let mut state = None;
                if let Some(e) = self.entry(key) {
                    e.state.on_pubrel(pkid, &mut released);
                    if persistent {
                        state = Some(qos2_state(&e.state));
                    }
                }
                // The id leaves the durable set before PUBCOMP, or after a crash a new message
                // reusing the id would look like a resend and be dropped.
                let wait = match (state, self.forward_config()) {
                    (Some((k, v)), Some(f)) if f.outbox.state(&k).is_some() => {
                        let ticket = f.outbox.put_state(&k, &v);
                        let w: Durability = Box::pin(async move { ticket.await.is_ok() });
                        Some(w)
                    }
                    _ => None,
                };
                for send in released {
                    self.queue_ack(key, send, None, &mut sends);
                }
                if let Some(w) = wait {
                    if let Some(conn) = self
                        .entry(key)
                        .and_then(|e| e.link.as_ref().map(|l| l.conn))
                    {
                        self.hold_last(conn, w, &mut sends);
                    }
                }
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut granted = Vec::new();
                for (filter, qos) in s.filters {
                    if topic::validate_filter(&filter).is_err() {
                        codes.push(SubAckCode::Failure);
                        continue;
                    }
                    codes.push(SubAckCode::Granted(qos));
                    self.trie.insert(&filter, key, qos);
                    if let Some(e) = self.entry(key) {
                        e.state.subscriptions.insert(filter.clone(), qos);
                    }
                    granted.push((filter, qos));
                }
                let wait = self.commit_subscriptions(key, persistent);
                let ack = Send::SubAck(SubAck {
                    pkid: s.pkid,
                    codes,
                });
                self.queue_ack(key, ack, wait, &mut sends);
                // Retained messages follow the SUBACK [MQTT-3.3.1-6], with RETAIN=1 [MQTT-3.3.1-8].
                for (filter, sub_qos) in granted {
                    let hits: Vec<Retained> = self
                        .retained
                        .iter()
                        .filter(|(t, _)| topic::matches(&filter, t))
                        .map(|(_, r)| r.clone())
                        .collect();
                    for r in hits {
                        self.deliver(key, r.msg, r.qos.min(sub_qos), true, &mut sends);
                    }
                }
                if persistent {
                    self.urgent = true;
                }
            }
            Packet::Unsubscribe(u) => {
                for filter in &u.filters {
                    self.trie.remove(filter, key);
                    if let Some(e) = self.entry(key) {
                        e.state.subscriptions.remove(filter);
                    }
                }
                let wait = self.commit_subscriptions(key, persistent);
                self.queue_ack(key, Send::UnsubAck(u.pkid), wait, &mut sends);
                if persistent {
                    self.urgent = true;
                }
            }
            // Handled by the connection, or never sent by a client (the connection closes).
            _ => {}
        }
        if persistent && !sends.is_empty() {
            self.dirty = true;
        }
        self.flush_sends(key, &mut sends);
        self.sends = sends;
    }

    /// Routes a message to every matching subscriber, once per client at the highest QoS.
    fn publish(&mut self, msg: Arc<Message>, qos: QoS, retain: bool) {
        if retain {
            // [MQTT-3.3.1-10/11]: an empty retained message clears the topic's retained message.
            if msg.payload.is_empty() {
                self.retained.remove(&msg.topic);
            } else {
                let retained = Retained {
                    msg: msg.clone(),
                    qos,
                };
                // A sensor republishes the same topics: replace without a new key.
                match self.retained.get_mut(&msg.topic) {
                    Some(r) => *r = retained,
                    None => {
                        self.retained.insert(msg.topic.clone(), retained);
                    }
                }
            }
            self.stats
                .retained
                .store(self.retained.len() as u64, Relaxed);
            self.dirty = true;
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        self.trie.matches(&msg.topic, &mut matches);
        if matches.len() > 1 {
            // Overlapping subscriptions: deliver once at the maximum granted QoS.
            matches.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            matches.dedup_by_key(|m| m.0);
        }
        let mut sends = std::mem::take(&mut self.sends);
        let mut qos0_head: Option<Bytes> = None;
        for &(key, sub_qos) in &matches {
            let q = qos.min(sub_qos);
            if q == QoS::AtMostOnce {
                let reserve = ACK_RESERVE + usize::from(self.config.max_inflight);
                let Some(link) = self.entry(key).and_then(|e| e.link.as_ref()) else {
                    continue;
                };
                if link.tx.capacity() <= reserve {
                    self.stats.messages_dropped.fetch_add(1, Relaxed);
                    continue;
                }
                let head = qos0_head
                    .get_or_insert_with(|| publish_head(&msg, QoS::AtMostOnce, 0, false, false))
                    .clone();
                if link
                    .tx
                    .try_send(Outgoing::Publish {
                        head,
                        payload: msg.payload.clone(),
                    })
                    .is_ok()
                {
                    self.stats.messages_sent.fetch_add(1, Relaxed);
                } else {
                    self.stats.messages_dropped.fetch_add(1, Relaxed);
                }
            } else {
                self.deliver(key, msg.clone(), q, false, &mut sends);
                self.flush_sends(key, &mut sends);
            }
        }
        self.matches = matches;
        self.sends = sends;
        if !self.internal.is_empty() {
            self.internal.retain(|(_, _, tx)| !tx.is_closed());
            for (filter, literal, tx) in &self.internal {
                // Most topics differ from a filter before its first wildcard.
                if msg.topic.starts_with(&filter[..*literal]) && topic::matches(filter, &msg.topic)
                {
                    let m = InternalMessage {
                        topic: msg.topic.clone(),
                        payload: msg.payload.clone(),
                        qos,
                    };
                    if tx.try_send(m).is_err() {
                        self.stats.messages_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    }

    /// Hands one message to one session (any QoS), recording drops.
    fn deliver(
        &mut self,
        key: SessionKey,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        sends: &mut Vec<Send>,
    ) {
        let Some(entry) = self.entry(key) else { return };
        if qos == QoS::AtMostOnce {
            if entry.link.is_some() {
                sends.push(Send::Publish {
                    msg,
                    qos,
                    pkid: 0,
                    dup: false,
                    retain,
                });
            }
            return;
        }
        let persistent = !entry.state.clean;
        match entry.state.deliver(msg, qos, retain, sends) {
            Delivery::Dropped => {
                self.stats.messages_dropped.fetch_add(1, Relaxed);
            }
            Delivery::Queued | Delivery::Sent if persistent => self.dirty = true,
            _ => {}
        }
    }

    /// Encodes and queues what a session produced.
    fn flush_sends(&mut self, key: SessionKey, sends: &mut Vec<Send>) {
        for s in sends.drain(..) {
            let out = match s {
                Send::Publish {
                    msg,
                    qos: QoS::AtMostOnce,
                    retain,
                    ..
                } => {
                    // QoS 0 (retained on subscribe): dropped rather than crowding out acks.
                    let reserve = ACK_RESERVE + usize::from(self.config.max_inflight);
                    let Some(link) = self.entry(key).and_then(|e| e.link.as_ref()) else {
                        continue;
                    };
                    if link.tx.capacity() <= reserve {
                        self.stats.messages_dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    self.stats.messages_sent.fetch_add(1, Relaxed);
                    let head = publish_head(&msg, QoS::AtMostOnce, 0, false, retain);
                    Outgoing::Publish {
                        head,
                        payload: msg.payload.clone(),
                    }
                }
                Send::Publish {
                    msg,
                    qos,
                    pkid,
                    dup,
                    retain,
                } => {
                    self.stats.messages_sent.fetch_add(1, Relaxed);
                    Outgoing::Publish {
                        head: publish_head(&msg, qos, pkid, dup, retain),
                        payload: msg.payload.clone(),
                    }
                }
                Send::PubAck(id) => Outgoing::Frame(frame(&Packet::PubAck(id))),
                Send::PubRec(id) => Outgoing::Frame(frame(&Packet::PubRec(id))),
                Send::PubRel(id) => Outgoing::Frame(frame(&Packet::PubRel(id))),
                Send::PubComp(id) => Outgoing::Frame(frame(&Packet::PubComp(id))),
                Send::SubAck(ack) => Outgoing::Frame(frame(&Packet::SubAck(ack))),
                Send::UnsubAck(id) => Outgoing::Frame(frame(&Packet::UnsubAck(id))),
            };
            self.send_to(key, out);
        }
    }

    /// Queues a frame for a session's connection. A connection whose queue is full even for
    /// acknowledgements is not reading at all: it is closed rather than allowed to grow.
    fn send_to(&mut self, key: SessionKey, out: Outgoing) {
        let Some(entry) = self.entry(key) else { return };
        let Some(link) = entry.link.as_mut() else {
            return;
        };
        if link.tx.try_send(out).is_err() {
            tracing::warn!(client = %entry.state.client_id, "client is not reading; closing its connection");
            if let Some(k) = link.kill.take() {
                let _ = k.send(());
            }
        }
    }

    fn publish_internal(&mut self, topic: &str, payload: String) {
        let msg = Arc::new(Message {
            topic: topic.to_string(),
            payload: Bytes::from(payload),
        });
        self.publish(msg, QoS::AtMostOnce, true);
    }

    fn publish_version(&mut self) {
        self.publish_internal(
            "$SYS/broker/version",
            format!("sensorgate {}", env!("CARGO_PKG_VERSION")),
        );
    }

    /// `$SYS/broker/...` with Mosquitto's topic names, so existing dashboards work.
    fn publish_sys(&mut self) {
        let s = self.stats.clone();
        let values = [
            (
                "$SYS/broker/uptime",
                format!("{} seconds", self.started.elapsed().as_secs()),
            ),
            (
                "$SYS/broker/clients/connected",
                s.clients_connected.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/clients/total",
                s.clients_total.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/clients/disconnected",
                (s.clients_total
                    .load(Relaxed)
                    .saturating_sub(s.clients_connected.load(Relaxed)))
                .to_string(),
            ),
            (
                "$SYS/broker/messages/received",
                s.messages_received.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/messages/sent",
                s.messages_sent.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/messages/dropped",
                s.messages_dropped.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/bytes/received",
                s.bytes_received.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/bytes/sent",
                s.bytes_sent.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/retained messages/count",
                self.retained.len().to_string(),
            ),
            (
                "$SYS/broker/connections/total",
                s.connections_total.load(Relaxed).to_string(),
            ),
        ];
        for (topic, value) in values {
            self.publish_internal(topic, value);
        }
    }
}

/// Tells `done` (if anyone waits) whether the message is durable: once `wait` completes, or
/// at once when there is nothing to wait for.
fn tell_when_durable(done: Option<oneshot::Sender<bool>>, wait: Option<Durability>) {
    match (done, wait) {
        (Some(d), Some(w)) => {
            tokio::spawn(async move {
                let _ = d.send(w.await);
            });
        }
        (Some(d), None) => {
            let _ = d.send(true);
        }
        (None, _) => {}
    }
}

/// Encodes a whole control packet.
fn frame(packet: &Packet) -> Bytes {
    let mut buf = BytesMut::with_capacity(8);
    codec::encode(packet, &mut buf);
    buf.freeze()
}

fn publish_head(msg: &Message, qos: QoS, pkid: u16, dup: bool, retain: bool) -> Bytes {
    let p = Publish {
        dup,
        qos,
        retain,
        topic: msg.topic.clone(),
        pkid,
        payload: msg.payload.clone(),
    };
    let mut buf = BytesMut::with_capacity(msg.topic.len() + 8);
    codec::encode_publish_head(&p, &mut buf);
    buf.freeze()
}

/// A state commit as a [`Durability`]: `false`, with the reason logged, if it failed.
fn logged(
    ticket: crate::outbox::Ticket<(), crate::outbox::OutboxError>,
    what: &'static str,
) -> Durability {
    Box::pin(async move {
        match ticket.await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("the outbox could not store {what}: {e}");
                false
            }
        }
    })
}

/// Outbox state keys of inbound QoS 2 packet ids start with this, then the client id.
pub const QOS2_STATE_PREFIX: &str = "qos2/";

/// Outbox state keys of a persistent session's subscriptions: this, then the client id.
pub const SUBS_STATE_PREFIX: &str = "subs/";

/// The outbox state key and value holding a persistent session's subscriptions: a version
/// byte (1), then per subscription the filter's length (u16 LE), the filter and the QoS.
pub fn subscriptions_state(state: &SessionState) -> (String, Vec<u8>) {
    let mut subs: Vec<(&String, &QoS)> = state.subscriptions.iter().collect();
    subs.sort();
    let mut value = vec![1u8];
    for (filter, qos) in subs {
        let len = u16::try_from(filter.len()).unwrap_or(u16::MAX);
        value.extend_from_slice(&len.to_le_bytes());
        value.extend_from_slice(&filter.as_bytes()[..usize::from(len)]);
        value.push(qos.as_u8());
    }
    (format!("{SUBS_STATE_PREFIX}{}", state.client_id), value)
}

/// The subscriptions a `subs/<client>` value holds; `None` for a discarded session (empty) or
/// a value this version cannot read.
pub fn decode_subscriptions(value: &[u8]) -> Option<HashMap<String, QoS>> {
    let (&version, mut rest) = value.split_first()?;
    if version != 1 {
        return None;
    }
    let mut subs = HashMap::new();
    while !rest.is_empty() {
        let len = usize::from(u16::from_le_bytes([*rest.first()?, *rest.get(1)?]));
        let filter = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        let qos = QoS::from_u8(*rest.get(2 + len)?)?;
        subs.insert(filter.to_string(), qos);
        rest = &rest[3 + len..];
    }
    Some(subs)
}

/// The outbox state key and value holding a persistent session's inbound QoS 2 packet ids.
pub fn qos2_state(state: &SessionState) -> (String, Vec<u8>) {
    let mut ids: Vec<u16> = state.inbound_qos2.iter().copied().collect();
    ids.sort_unstable();
    let value = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    (format!("{QOS2_STATE_PREFIX}{}", state.client_id), value)
}

/// The packet ids a `qos2/<client>` state value holds.
pub fn qos2_ids(value: &[u8]) -> Vec<u16> {
    value
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backlog, OutRule};
    use crate::outbox::{Outbox, OutboxConfig};

    const KEY: &str = "dedupe/17";

    /// A router forwarding `sensors/#` at QoS 2 into an outbox in `dir`; QoS 0 is not stored.
    fn router(dir: &std::path::Path) -> (Router, Outbox) {
        let (outbox, _) = Outbox::open(dir, OutboxConfig::default()).expect("outbox opens");
        router_over(outbox)
    }

    fn router_over(outbox: Outbox) -> (Router, Outbox) {
        let (live, _) = mpsc::channel(8);
        let forward = crate::uplink::Forward {
            out: vec![OutRule {
                filter: "sensors/#".into(),
                local_prefix: String::new(),
                remote_prefix: String::new(),
                qos: QoS::ExactlyOnce,
                backlog: Backlog::All,
            }],
            inbound: Vec::new(),
            outbox: outbox.clone(),
            store_qos0: false,
            live,
            stats: Arc::default(),
        };
        let config = RouterConfig {
            max_inflight: 10,
            max_queued: 10,
            sys_interval: Duration::from_secs(60),
            snapshot_interval: Duration::from_secs(60),
            forward: Some(Arc::new(forward)),
        };
        let router = Router::new(config, Arc::default(), None, Snapshot::default());
        (router, outbox)
    }

    /// Publishes like the pipeline does with a frame's last reading, carrying `state`; returns
    /// what the producer is told.
    async fn publish_with_state(router: &mut Router, topic: &str, qos: QoS, state: &[u8]) -> bool {
        let (done, told) = oneshot::channel();
        router.handle(Command::Publish {
            topic: topic.into(),
            payload: Bytes::from_static(b"21.5"),
            qos,
            retain: false,
            origin: Origin::Gateway,
            done: Some(done),
            state: Some((KEY.into(), state.to_vec())),
        });
        told.await.expect("the router answers")
    }

    #[tokio::test]
    async fn state_riding_on_a_message_is_committed_whether_the_message_is_stored_or_not() {
        // (topic, QoS, records stored): forwarded at QoS 2; no out-rule; QoS 0, not stored.
        let cases = [
            ("sensors/a", QoS::ExactlyOnce, 1),
            ("local/a", QoS::ExactlyOnce, 0),
            ("sensors/a", QoS::AtMostOnce, 0),
        ];
        for (topic, qos, depth) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (mut router, outbox) = router(dir.path());
            let state = format!("{topic} {qos:?}");
            assert!(publish_with_state(&mut router, topic, qos, state.as_bytes()).await);
            assert_eq!(
                outbox.state(KEY).as_deref(),
                Some(state.as_bytes()),
                "{topic} at {qos:?}: the producer was told before its state was durable"
            );
            assert_eq!(outbox.stats().depth, depth, "{topic} at {qos:?}");
        }
    }

    /// A session the snapshot does not know is recreated from the outbox only if it still has
    /// inbound QoS 2 ids awaiting PUBREL; an empty state (every id released) brings nothing back.
    #[tokio::test]
    async fn only_qos2_ids_awaiting_pubrel_recreate_a_session_the_snapshot_missed() {
        let dir = tempfile::tempdir().unwrap();
        let (_, outbox) = router(dir.path());
        let mut waiting = SessionState::new("waiting".into(), false, 10, 10);
        waiting.inbound_qos2.insert(7);
        let released = SessionState::new("released".into(), false, 10, 10);
        for s in [&waiting, &released] {
            let (k, v) = qos2_state(s);
            outbox.put_state(&k, &v).await.expect("committed");
        }
        let (router, _) = router_over(outbox);
        assert!(router.by_client.contains_key("waiting"));
        assert!(
            !router.by_client.contains_key("released"),
            "an empty QoS 2 state recreated a session"
        );
    }

    #[tokio::test]
    async fn state_committed_on_its_own_survives_a_reopen_after_the_earlier_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut router, outbox) = router(dir.path());
            assert!(publish_with_state(&mut router, "sensors/a", QoS::ExactlyOnce, b"old").await);
            let (done, told) = oneshot::channel();
            router.handle(Command::CommitState {
                state: (KEY.into(), b"new".to_vec()),
                done,
            });
            assert!(told.await.expect("the router answers"));
            drop(router);
            outbox.close().await.expect("closes");
        }
        let (reopened, _) = Outbox::open(dir.path(), OutboxConfig::default()).unwrap();
        assert_eq!(reopened.state(KEY).as_deref(), Some(&b"new"[..]));
        assert_eq!(reopened.stats().depth, 1);
    }
}
