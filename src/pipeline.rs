//! The sensor pipeline: observations from the ports, through dedupe and the node registry, to
//! topics by the mapping, published into the broker; acknowledgements back to the nodes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::broker::BrokerHandle;
use crate::broker::codec::QoS;
use std::collections::{HashMap, HashSet};

use crate::broker::InternalMessage;
use crate::decode::{Body, FrameId, NodeCommand, Observation, SensorInfo};
use crate::ingest::{Downlink, Inbound, PortStats, now_ms};
use crate::map::{FrameFacts, Mapping};
use crate::registry::{Partial, Registry, Verdict};

pub struct Pipeline {
    pub mapping: Arc<Mapping>,
    pub registry: Registry,
    pub broker: BrokerHandle,
    pub data_dir: PathBuf,
    pub persist: bool,
    /// The ports: counters to publish, downlinks for acks and commands. Replaced on reload.
    pub ports: Vec<PortLink>,
    pub status_interval: Duration,
    /// Numbers the gateway's own frames (commands) so node acks can be matched.
    pub boot_id: u32,
    pub next_seq: u32,
    /// Nodes asked to repeat their `Hello` in this boot, so it is asked once.
    pub hello_requested: HashSet<(String, u32)>,
    /// Commands sent and not yet answered, by (node, seq): their names for the result.
    pub pending_commands: HashMap<(String, u32), &'static str>,
    /// Frames whose `Ack` waited for the outbox, once it is settled: `false` when they could
    /// not be made durable, to forget in the dedupe window.
    pub settled_tx: mpsc::Sender<(String, FrameId, bool)>,
    pub settled_rx: mpsc::Receiver<(String, FrameId, bool)>,
    /// Frames whose `Ack` waits for the outbox, by node: a retransmission of one is answered by
    /// the original's `Ack` once it is durable, not at once (invariant 1).
    pub unsettled: HashMap<String, Vec<FrameId>>,
    /// The uplink's counters and the outbox, for `$SYS/sensorgate/...`.
    pub uplink: Option<(Arc<crate::uplink::UplinkStats>, crate::outbox::Outbox)>,
    /// Device tasks (issue 6): the watchdog's evidence that this loop turns, and the registry.
    pub probe: crate::health::PipelineProbe,
}

/// What the pipeline knows of one port.
#[derive(Clone)]
pub struct PortLink {
    pub name: String,
    pub stats: Arc<PortStats>,
    /// Commands go to the port a node was last heard on.
    pub downlink: mpsc::Sender<Downlink>,
}

/// Unanswered commands remembered for their results; older ones are forgotten past this.
const MAX_PENDING_COMMANDS: usize = 256;

/// Observations taken from the inbound queue in one turn of the pipeline's loop.
const INBOUND_BATCH: usize = 256;

/// Commands waiting for the pipeline.
pub const COMMAND_QUEUE: usize = 64;

/// Settled frames waiting for the pipeline; a frame's durability task waits for room, which
/// only delays its report, never its `Ack` (sent first).
pub const SETTLED_QUEUE: usize = 256;

/// `sensorgate/<gateway>/nodes/+/set/+`: where MQTT clients send node commands.
pub fn command_filter(gateway: &str) -> String {
    format!("sensorgate/{gateway}/nodes/+/set/+")
}

impl Pipeline {
    /// Runs until every port has stopped (the inbound channel closes), then saves the registry.
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut mapping_updates: watch::Receiver<Arc<Mapping>>,
        mut commands: mpsc::Receiver<InternalMessage>,
        mut port_updates: watch::Receiver<Vec<PortLink>>,
    ) {
        let mut status = tokio::time::interval(self.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = inbound.recv() => {
                    let Some(msg) = msg else { break };
                    if !self.process_batch(msg, &mut inbound).await {
                        break;
                    }
                }
                _ = status.tick() => {
                    self.probe.tick(&self.registry);
                    self.publish_port_stats().await;
                    if self.persist {
                        self.registry.save_if_dirty(&self.data_dir);
                    }
                }
                Some(cmd) = commands.recv() => self.command(cmd).await,
                Ok(()) = port_updates.changed() => {
                    self.ports = port_updates.borrow_and_update().clone();
                }
                Some((node, frame, durable)) = self.settled_rx.recv() => {
                    self.settled(&node, frame, durable);
                }
                changed = mapping_updates.changed() => {
                    if changed.is_ok() {
                        self.mapping = mapping_updates.borrow_and_update().clone();
                    }
                }
            }
        }
        self.publish_port_stats().await;
        if self.persist {
            self.registry.save_if_dirty(&self.data_dir);
        }
    }

    /// `first` and what else is already waiting: ports deliver a tick's frames together.
    /// Bounded, so status and commands still get their turn. False when the broker stopped.
    async fn process_batch(
        &mut self,
        first: Inbound,
        inbound: &mut mpsc::Receiver<Inbound>,
    ) -> bool {
        let mut msg = first;
        for _ in 0..INBOUND_BATCH {
            if !self.process(msg).await {
                return false;
            }
            match inbound.try_recv() {
                Ok(next) => msg = next,
                Err(_) => return true,
            }
        }
        self.process(msg).await
    }

    /// One observation; false when the broker has stopped.
    async fn process(&mut self, msg: Inbound) -> bool {
        let Inbound {
            port,
            obs,
            reply,
            stats,
        } = msg;
        let now = now_ms();
        if let Some(frame) = obs.frame {
            let verdict = self.registry.check(&obs.node, frame);
            if verdict == Verdict::Rebooted {
                tracing::info!(node = %obs.node, port = %port, boot_id = frame.boot_id, "node rebooted");
            }
            if verdict == Verdict::Duplicate {
                stats.duplicates.fetch_add(1, Relaxed);
                // The node repeats a frame when our ack was lost: acknowledge it again, unless
                // the original is not durable yet; its own ack follows once it is.
                let unsettled = self
                    .unsettled
                    .get(obs.node.as_str())
                    .is_some_and(|f| f.contains(&frame));
                if !unsettled && matches!(obs.body, Body::Readings(_)) {
                    let _ = reply.try_send(Downlink::Ack {
                        node: obs.node.clone(),
                        frame,
                    });
                }
                return true;
            }
        }
        self.update_registry(&port, &obs, now);
        let Observation {
            node, frame, body, ..
        } = obs;
        match body {
            Body::Readings(readings) => {
                let facts = FrameFacts {
                    ts_ms: now,
                    seq: frame.map(|f| f.seq),
                };
                let knows = |registry: &Registry, channel: u16| {
                    registry
                        .get(&node)
                        .is_some_and(|r| r.sensors.contains_key(&channel))
                };
                // A node the gateway knows nothing about (registry lost, Hello missed): ask it
                // to announce its sensors, once per boot.
                if let Some(f) = frame {
                    let unknown = readings
                        .iter()
                        .any(|r| r.quantity.is_none() && !knows(&self.registry, r.channel));
                    if unknown && self.hello_requested.insert((node.clone(), f.boot_id)) {
                        let id = self.next_id();
                        let command = NodeCommand::SendHello;
                        let _ = reply.try_send(Downlink::Command {
                            node: node.clone(),
                            id,
                            command,
                        });
                    }
                }
                let mut durable = Vec::with_capacity(readings.len());
                // The node's dedupe window rides with the frame's last mapped reading; the
                // router commits it on its own if that reading is not stored, and so does an
                // explicit commit when nothing is mapped. Either way it is durable with the
                // frame's records and before the ack, so a crash cannot keep the records (or
                // the ack) but lose the knowledge that the frame was seen (invariant 3). The
                // readings before the last carry the frame's progress, for a crash between two
                // outbox commits: the retransmission then publishes only the rest.
                let dedupe = match (&self.uplink, frame) {
                    (Some(_), Some(_)) => self.registry.dedupe_state(&node, None),
                    _ => None,
                };
                let skip = match (&dedupe, frame) {
                    (Some(_), Some(f)) => self.registry.take_partial(&node, f).unwrap_or(0),
                    _ => 0,
                };
                let known = self.registry.get(&node).map(|r| &r.sensors);
                // Each mapped reading is published once the next one is mapped, so the last
                // one is known when it goes.
                let mut held = None;
                let mut mapped = 0u32;
                for mut reading in readings {
                    if reading.quantity.is_none() {
                        if let Some(info) = known.and_then(|k| k.get(&reading.channel)) {
                            reading.quantity = Some(info.quantity.clone());
                            reading.unit = reading.unit.or_else(|| info.unit.clone());
                        }
                    }
                    let Some(p) = self.mapping.map(&port, &node, &reading, facts) else {
                        continue;
                    };
                    mapped += 1;
                    if mapped <= skip {
                        // Durable before a crash: not again.
                        continue;
                    }
                    if self.uplink.is_none() {
                        // Nothing is forwarded: accepted by the broker is all there is to wait for.
                        if self
                            .broker
                            .publish(p.topic, p.payload, p.qos, p.retain)
                            .await
                            .is_err()
                        {
                            return false;
                        }
                        continue;
                    }
                    if let Some(p) = held.replace(p) {
                        let progress = frame.and_then(|frame| {
                            let done = mapped - 1;
                            let partial = Some(Partial { frame, done });
                            self.registry.dedupe_state(&node, partial)
                        });
                        match self.publish_durable(p, progress).await {
                            Some(done) => durable.push(done),
                            None => return false,
                        }
                    }
                }
                let last = match (held, dedupe) {
                    (Some(p), state) => Some(self.publish_durable(p, state).await),
                    (None, Some(state)) => Some(self.broker.commit_state(state).await.ok()),
                    (None, None) => None,
                };
                match last {
                    Some(Some(done)) => durable.push(done),
                    Some(None) => return false,
                    None => {}
                }
                // Published in order into the broker. The node's ack waits until every reading
                // of the frame and its dedupe window are durable in the outbox (invariant 1);
                // until then the node keeps the frame and retransmits it, and dedupe keeps that
                // exactly once.
                if let (Some(frame), true) = (frame, durable.is_empty()) {
                    let _ = reply.try_send(Downlink::Ack { node, frame });
                } else if let Some(frame) = frame {
                    match self.unsettled.get_mut(node.as_str()) {
                        Some(frames) => frames.push(frame),
                        None => {
                            self.unsettled.insert(node.clone(), vec![frame]);
                        }
                    }
                    let settled = self.settled_tx.clone();
                    tokio::spawn(async move {
                        let mut ok = true;
                        for done in durable {
                            if !matches!(done.await, Ok(true)) {
                                // Not stored: no ack, and the retransmission must not be
                                // taken for a duplicate.
                                ok = false;
                                break;
                            }
                        }
                        if ok {
                            let _ = reply
                                .send(Downlink::Ack {
                                    node: node.clone(),
                                    frame,
                                })
                                .await;
                        }
                        let _ = settled.send((node, frame, ok)).await;
                    });
                }
            }
            Body::Log { level, text } => {
                tracing::info!(node = %node, port = %port, %level, "node says: {text}")
            }
            Body::CommandAck {
                of,
                accepted,
                reason,
            } => {
                tracing::info!(node = %node, seq = of.seq, accepted, ?reason, "node answered a command");
                if of.boot_id != self.boot_id {
                    // An answer to a command from before the gateway restarted.
                    return true;
                }
                let command = self.pending_commands.remove(&(node.clone(), of.seq));
                let topic = format!(
                    "sensorgate/{}/nodes/{node}/command-result",
                    self.mapping.gateway
                );
                let mut payload = format!("{{\"seq\":{}", of.seq);
                if let Some(c) = command {
                    payload.push_str(&format!(",\"command\":\"{c}\""));
                }
                payload.push_str(&format!(",\"accepted\":{accepted}"));
                if let Some(r) = reason {
                    payload.push_str(&format!(",\"reason\":\"{r}\""));
                }
                payload.push('}');
                if self
                    .broker
                    .publish(topic, payload, QoS::AtLeastOnce, false)
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            Body::Hello { .. } | Body::Heartbeat { .. } => {}
        }
        true
    }

    /// Publishes a reading whose durability the frame's ack waits for; `None` when the
    /// broker has stopped.
    async fn publish_durable(
        &self,
        p: crate::map::Publication,
        state: Option<(String, Vec<u8>)>,
    ) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        self.broker
            .publish_durable(p.topic, p.payload, p.qos, p.retain, state)
            .await
            .ok()
    }

    /// A frame whose ack waited for the outbox is settled: acknowledged if `durable`, else
    /// forgotten so that its retransmission is taken as new.
    fn settled(&mut self, node: &str, frame: FrameId, durable: bool) {
        if let Some(frames) = self.unsettled.get_mut(node) {
            if let Some(i) = frames.iter().position(|f| *f == frame) {
                frames.swap_remove(i);
            }
        }
        if !durable {
            self.registry.forget(node, frame);
        }
    }

    fn update_registry(&mut self, port: &str, obs: &Observation, now: u64) {
        let rec = self.registry.touch(&obs.node, port, now);
        if obs.link.is_some() {
            rec.link = obs.link;
        }
        match &obs.body {
            Body::Hello {
                firmware,
                sensors,
                complete,
                interval_s,
            } => {
                if firmware.is_some() {
                    rec.firmware.clone_from(firmware);
                }
                if *complete {
                    rec.sensors.clear();
                }
                for s in sensors {
                    merge_sensor(&mut rec.sensors, s);
                }
                if interval_s.is_some() {
                    rec.interval_s = *interval_s;
                }
            }
            Body::Heartbeat {
                battery_mv,
                battery_pct,
                uptime_s,
                dropped,
            } => {
                rec.battery_mv = battery_mv.or(rec.battery_mv);
                rec.battery_pct = battery_pct.or(rec.battery_pct);
                rec.uptime_s = uptime_s.or(rec.uptime_s);
                rec.readings_dropped = dropped.or(rec.readings_dropped);
            }
            _ => {}
        }
    }

    fn next_id(&mut self) -> FrameId {
        self.next_seq = self.next_seq.wrapping_add(1);
        FrameId {
            boot_id: self.boot_id,
            seq: self.next_seq,
        }
    }

    /// A message on `sensorgate/<gateway>/nodes/<node>/set/<command>`.
    async fn command(&mut self, msg: InternalMessage) {
        let mut levels = msg.topic.split('/').skip(3);
        let (Some(node), Some(_set), Some(name)) = (levels.next(), levels.next(), levels.next())
        else {
            return;
        };
        let payload = String::from_utf8_lossy(&msg.payload);
        let result_topic = format!(
            "sensorgate/{}/nodes/{node}/command-result",
            self.mapping.gateway
        );
        let command = match NodeCommand::parse(name, &payload) {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!(%node, "refused a command: {why}");
                let body = error_result(name, &why);
                let _ = self
                    .broker
                    .publish(result_topic, body, QoS::AtLeastOnce, false)
                    .await;
                return;
            }
        };
        let port = self.registry.get(node).map(|r| r.port.clone());
        let route = port.and_then(|p| {
            self.ports
                .iter()
                .find(|l| l.name == p)
                .map(|l| l.downlink.clone())
        });
        let Some(route) = route else {
            let why = format!("node {node} has never been heard on a configured port");
            tracing::warn!("cannot send a command: {why}");
            let body = error_result(command.name(), &why);
            let _ = self
                .broker
                .publish(result_topic, body, QoS::AtLeastOnce, false)
                .await;
            return;
        };
        let id = self.next_id();
        tracing::info!(%node, ?command, seq = id.seq, "sending a command");
        if self.pending_commands.len() >= MAX_PENDING_COMMANDS {
            self.pending_commands.clear();
        }
        self.pending_commands
            .insert((node.to_string(), id.seq), command.name());
        let _ = route
            .send(Downlink::Command {
                node: node.to_string(),
                id,
                command,
            })
            .await;
    }

    async fn publish_port_stats(&self) {
        if let Some((stats, outbox)) = &self.uplink {
            let o = outbox.stats();
            let age = o
                .oldest_timestamp_ms
                .map(|t| now_ms().saturating_sub(t) / 1000)
                .unwrap_or(0);
            let connected = stats.connected.load(Relaxed);
            let values = [
                (
                    "uplink/state",
                    if connected {
                        "connected".to_string()
                    } else {
                        "disconnected".to_string()
                    },
                ),
                (
                    "uplink/delivered",
                    stats.delivered.load(Relaxed).to_string(),
                ),
                ("uplink/connects", stats.connects.load(Relaxed).to_string()),
                (
                    "uplink/superseded",
                    stats.superseded.load(Relaxed).to_string(),
                ),
                ("outbox/depth", o.depth.to_string()),
                ("outbox/bytes", o.bytes.to_string()),
                ("outbox/oldest-age", age.to_string()),
                ("outbox/dropped/oldest", o.dropped_oldest.to_string()),
                ("outbox/dropped/newest", o.dropped_newest.to_string()),
                ("outbox/dropped/expired", o.expired.to_string()),
                ("outbox/dropped/too-large", o.dropped_too_large.to_string()),
                ("outbox/dropped/invalid", o.dropped_invalid.to_string()),
                (
                    "outbox/dropped/qos0",
                    stats.live_dropped.load(Relaxed).to_string(),
                ),
                ("outbox/corrupt-skipped", o.corrupt_skipped.to_string()),
            ];
            for (leaf, value) in values {
                let topic = format!("$SYS/sensorgate/{leaf}");
                let _ = self
                    .broker
                    .publish(topic, value, QoS::AtMostOnce, true)
                    .await;
            }
        }
        for PortLink { name, stats: s, .. } in &self.ports {
            let base = format!("$SYS/sensorgate/ports/{name}");
            let values = [
                (
                    "state",
                    if s.open.load(Relaxed) {
                        "open".to_string()
                    } else {
                        "closed".to_string()
                    },
                ),
                ("bytes", s.bytes.load(Relaxed).to_string()),
                ("frames", s.frames.load(Relaxed).to_string()),
                ("errors/crc", s.errors_crc.load(Relaxed).to_string()),
                ("errors/framing", s.errors_framing.load(Relaxed).to_string()),
                (
                    "errors/undecodable",
                    s.errors_undecodable.load(Relaxed).to_string(),
                ),
                ("duplicates", s.duplicates.load(Relaxed).to_string()),
                ("last-frame", s.last_frame_ms.load(Relaxed).to_string()),
                ("polled", s.polled.borrow().to_string()),
                ("busy-periods", s.busy_periods.load(Relaxed).to_string()),
            ];
            for (leaf, value) in values {
                let _ = self
                    .broker
                    .publish(format!("{base}/{leaf}"), value, QoS::AtMostOnce, true)
                    .await;
            }
        }
    }
}

/// `{"command":"interval","error":"..."}`: the gateway refused or could not send a command.
fn error_result(command: &str, why: &str) -> String {
    let q = |t: &str| serde_json::to_string(t).unwrap_or_default();
    format!("{{\"command\":{},\"error\":{}}}", q(command), q(why))
}

fn merge_sensor(sensors: &mut std::collections::BTreeMap<u16, SensorInfo>, s: &SensorInfo) {
    sensors.insert(s.channel, s.clone());
}
