//! The embedded MQTT broker (3.1.1 and 3.1).
//!
//! ```text
//!  TCP ─▶ connection task ──Command──▶ router task ──Outgoing──▶ connection task ─▶ TCP
//!         (decode, CONNECT,           (sessions, trie,          (bounded queue,
//!          auth, keep-alive)           retained, QoS)            batched writes)
//!                                          │ snapshot bytes
//!                                          ▼
//!                                     store thread (fsync, rename)
//! ```

pub mod auth;
pub mod codec;
mod connection;
mod persist;
mod router;
pub mod session;
pub mod store;
pub mod topic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::ValidConfig;
use codec::QoS;
pub use persist::FILE_NAME as SNAPSHOT_FILE;
pub use router::InternalMessage;
use router::{Command, Origin, Router, RouterConfig};

/// Commands waiting for the router. Large enough to absorb a burst from many publishers;
/// when full, publishers wait (TCP backpressure) rather than the router dropping anything.
const ROUTER_QUEUE: usize = 8192;

/// Broker counters, shared with connections and published under `$SYS`.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub clients_connected: AtomicU64,
    pub clients_total: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub retained: AtomicU64,
}

/// A running broker.
pub struct Broker {
    addrs: Vec<SocketAddr>,
    handle: BrokerHandle,
    stop_accepting: watch::Sender<bool>,
    acceptors: Vec<JoinHandle<()>>,
    router: JoinHandle<()>,
}

/// In-process access to the broker, for the sensor pipeline and status reporting.
#[derive(Clone)]
pub struct BrokerHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    gate: Arc<OutboxGate>,
}

/// The outbox the out-rules forward to, as seen by producers: a local client's connection and
/// in-process publishers reserve room here before handing a message an out-rule stores to the
/// router, and wait while the outbox holds back appends under `when-full = "block"`
/// ([`crate::outbox::Outbox::wait_for_room`]). The router itself never waits, so subscribers
/// and the uplink keep going.
#[derive(Default)]
pub(crate) struct OutboxGate(std::sync::Mutex<Option<Arc<crate::uplink::Forward>>>);

impl OutboxGate {
    fn set(&self, forward: Option<&Arc<crate::uplink::Forward>>) {
        // A std mutex, never held across an `.await`.
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = forward.cloned();
    }

    /// Waits for, and reserves, room for the message in the outbox if an out-rule stores it
    /// and the outbox blocks when full; at once otherwise.
    pub(crate) async fn wait(&self, topic: &str, payload: &Bytes, qos: QoS, retain: bool) {
        if let Some((outbox, bytes)) = self.reservation(topic, payload, qos, retain) {
            outbox.wait_for_room(bytes).await;
        }
    }

    /// Reserves room at once if there is; false if the message must wait in [`wait`](Self::wait).
    pub(crate) fn try_pass(&self, topic: &str, payload: &Bytes, qos: QoS, retain: bool) -> bool {
        self.reservation(topic, payload, qos, retain)
            .is_none_or(|(outbox, bytes)| outbox.try_reserve_room(bytes))
    }

    /// The outbox and record size to reserve, for a message an out-rule stores in an outbox
    /// that blocks when full.
    fn reservation(
        &self,
        topic: &str,
        payload: &Bytes,
        qos: QoS,
        retain: bool,
    ) -> Option<(crate::outbox::Outbox, u64)> {
        let f = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        if f.outbox.when_full() != crate::outbox::FullPolicy::Block {
            return None;
        }
        let record = f.record_for(topic, payload, qos, retain)?;
        if record.qos == crate::outbox::Qos::AtMostOnce && !f.store_qos0 {
            return None;
        }
        Some((f.outbox.clone(), crate::outbox::record_size(&record)))
    }
}

/// The broker has stopped; the message was not accepted.
#[derive(Debug, thiserror::Error)]
#[error("the broker has stopped")]
pub struct Stopped;

impl BrokerHandle {
    /// Publishes a message as if a local client had; waits only for room in the router's queue.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), Stopped> {
        let message = (topic.into(), payload.into(), qos, retain);
        self.send_publish(message, Origin::Gateway, None, None)
            .await
    }

    /// Publishes like [`publish`](Self::publish); the returned receiver says `true` once the
    /// message is durable where it must be (the outbox, when an out-rule forwards it) and
    /// `false` if it could not be stored. This is what a node's acknowledgement waits for.
    /// `state` is committed to the outbox atomically with the message (dedupe windows).
    pub async fn publish_durable(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
        state: Option<(String, Vec<u8>)>,
    ) -> Result<oneshot::Receiver<bool>, Stopped> {
        let (done, rx) = oneshot::channel();
        let message = (topic.into(), payload.into(), qos, retain);
        self.send_publish(message, Origin::Gateway, Some(done), state)
            .await?;
        Ok(rx)
    }

    /// Commits outbox state on its own, after every message published before it; the receiver
    /// says `true` once it is durable (at once when there is no outbox). A node's dedupe window
    /// when none of its frame's readings is published.
    pub async fn commit_state(
        &self,
        state: (String, Vec<u8>),
    ) -> Result<oneshot::Receiver<bool>, Stopped> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::CommitState { state, done })
            .await
            .map_err(|_| Stopped)?;
        Ok(rx)
    }

    /// A message from the upstream broker (`in` rules): published locally, never forwarded
    /// back upstream.
    pub async fn publish_from_upstream(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), Stopped> {
        let message = (topic.into(), payload.into(), qos, retain);
        self.send_publish(message, Origin::Upstream, None, None)
            .await
    }

    async fn send_publish(
        &self,
        (topic, payload, qos, retain): (String, Bytes, QoS, bool),
        origin: Origin,
        done: Option<oneshot::Sender<bool>>,
        state: Option<(String, Vec<u8>)>,
    ) -> Result<(), Stopped> {
        if origin == Origin::Gateway {
            self.gate.wait(&topic, &payload, qos, retain).await;
        }
        let cmd = Command::Publish {
            topic,
            payload,
            qos,
            retain,
            origin,
            done,
            state,
        };
        self.tx.send(cmd).await.map_err(|_| Stopped)
    }

    /// Replaces the forwarding rules and outbox (start-up and configuration reload).
    pub async fn set_forward(
        &self,
        forward: Option<Arc<crate::uplink::Forward>>,
    ) -> Result<(), Stopped> {
        self.gate.set(forward.as_ref());
        self.tx
            .send(Command::SetForward(forward))
            .await
            .map_err(|_| Stopped)
    }

    /// Subscribes in-process to a valid `filter`: live messages (not retained ones) arrive on
    /// the returned channel; when it is full, further messages are dropped and counted.
    pub async fn subscribe(
        &self,
        filter: &str,
        capacity: usize,
    ) -> Result<mpsc::Receiver<InternalMessage>, Stopped> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let cmd = Command::SubscribeInternal {
            filter: filter.to_string(),
            tx,
        };
        self.tx.send(cmd).await.map_err(|_| Stopped)?;
        Ok(rx)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Broker {
    /// Restores state, binds every listener and starts serving.
    /// Restores state, binds every listener and starts serving, with no forwarding.
    pub async fn start(config: &ValidConfig) -> Result<Broker, crate::Error> {
        Self::start_with(config, None).await
    }

    /// Like [`start`](Self::start), forwarding what the out-rules select to the outbox from
    /// the first message on.
    pub async fn start_with(
        config: &ValidConfig,
        forward: Option<Arc<crate::uplink::Forward>>,
    ) -> Result<Broker, crate::Error> {
        let b = &config.broker;
        let passwords = match &b.password_file {
            Some(path) => Some(Arc::new(auth::PasswordFile::load(path).map_err(|e| {
                crate::Error::PasswordFile {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?)),
            None => None,
        };

        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for addr in &b.listeners {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| crate::Error::Bind {
                    addr: *addr,
                    source,
                })?;
            addrs.push(l.local_addr().map_err(|source| crate::Error::Bind {
                addr: *addr,
                source,
            })?);
            listeners.push(l);
        }

        let (snapshot, store) = if b.persistence {
            let store = persist::StoreHandle::spawn(config.data_dir.clone()).map_err(|source| {
                crate::Error::DataDir {
                    path: config.data_dir.clone(),
                    source,
                }
            })?;
            (persist::load(&config.data_dir), Some(store))
        } else {
            (persist::Snapshot::default(), None)
        };

        let stats = Arc::new(Stats::default());
        let gate = Arc::new(OutboxGate::default());
        gate.set(forward.as_ref());
        let (tx, rx) = mpsc::channel(ROUTER_QUEUE);
        let router = Router::new(
            RouterConfig {
                max_inflight: b.max_inflight,
                max_queued: b.max_queued,
                sys_interval: b.sys_interval,
                snapshot_interval: b.snapshot_interval,
                forward,
            },
            stats.clone(),
            store,
            snapshot,
        );
        let router = tokio::spawn(router.run(rx, tx.downgrade()));

        let shared = Arc::new(connection::Shared {
            router: tx.clone(),
            passwords,
            allow_anonymous: b.allow_anonymous,
            max_packet_size: b.max_packet_size,
            max_inflight: b.max_inflight,
            max_keep_alive: b.max_keep_alive,
            stats: stats.clone(),
            gate: gate.clone(),
        });
        let limit = Arc::new(Semaphore::new(b.max_connections));
        let next_conn = Arc::new(AtomicU64::new(1));
        let (stop_accepting, stop_rx) = watch::channel(false);
        let acceptors = listeners
            .into_iter()
            .map(|l| {
                tokio::spawn(accept_loop(
                    l,
                    shared.clone(),
                    limit.clone(),
                    next_conn.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();

        Ok(Broker {
            addrs,
            handle: BrokerHandle { tx, stats, gate },
            stop_accepting,
            acceptors,
            router,
        })
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn handle(&self) -> BrokerHandle {
        self.handle.clone()
    }

    /// Stops accepting, saves state, closes every connection.
    pub async fn shutdown(self) {
        let _ = self.stop_accepting.send(true);
        for a in self.acceptors {
            let _ = a.await;
        }
        let (done_tx, done_rx) = oneshot::channel();
        if self
            .handle
            .tx
            .send(Command::Shutdown { done: done_tx })
            .await
            .is_ok()
        {
            let _ = done_rx.await;
        }
        let _ = self.router.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<connection::Shared>,
    limit: Arc<Semaphore>,
    next_conn: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning (mini-redis).
                tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.stats.connections_refused.fetch_add(1, Relaxed);
            tracing::warn!(%peer, "connection limit reached; closing the new connection");
            drop(stream);
            continue;
        };
        shared.stats.connections_total.fetch_add(1, Relaxed);
        let conn = next_conn.fetch_add(1, Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            connection::serve(stream, peer, conn, shared).await;
            drop(permit);
        });
    }
}
