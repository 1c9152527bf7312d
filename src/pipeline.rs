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
use crate::registry::{Registry, Verdict};

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
    /// Frames whose readings could not be made durable, to forget in the dedupe window.
    pub failed_tx: mpsc::Sender<(String, FrameId)>,
    pub failed_rx: mpsc::Receiver<(String, FrameId)>,
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
                Some((node, frame)) = self.failed_rx.recv() => self.registry.forget(&node, frame),
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
                // The node repeats a frame when our ack was lost: acknowledge it again.
                if matches!(obs.body, Body::Readings(_)) {
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
                // The node's dedupe window rides with the frame's last forwarded reading, so a
                // crash cannot keep the records but lose the knowledge that they were seen.
                let dedupe = match (&self.uplink, frame) {
                    (Some(_), Some(_)) => self.registry.dedupe_state(&node),
                    _ => None,
                };
                let count = readings.len();
                let known = self.registry.get(&node).map(|r| &r.sensors);
                for (i, mut reading) in readings.into_iter().enumerate() {
                    if reading.quantity.is_none() {
                        if let Some(info) = known.and_then(|k| k.get(&reading.channel)) {
                            reading.quantity = Some(info.quantity.clone());
                            reading.unit = reading.unit.or_else(|| info.unit.clone());
                        }
                    }
                    let Some(p) = self.mapping.map(&port, &node, &reading, facts) else {
                        continue;
                    };
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
                    let state = if i + 1 == count { dedupe.clone() } else { None };
                    match self
                        .broker
                        .publish_durable(p.topic, p.payload, p.qos, p.retain, state)
                        .await
                    {
                        Ok(done) => durable.push(done),
                        Err(_) => return false,
                    }
                }
                // Published in order into the broker. The node's ack waits until every reading
                // of the frame is durable in the outbox (invariant 1); until then the node keeps
                // the frame and retransmits it, and dedupe keeps that exactly once.
                if let (Some(frame), true) = (frame, durable.is_empty()) {
                    let _ = reply.try_send(Downlink::Ack { node, frame });
                } else if let Some(frame) = frame {
                    let failed = self.failed_tx.clone();
                    tokio::spawn(async move {
                        for done in durable {
                            if !matches!(done.await, Ok(true)) {
                                // Not stored: no ack, and the retransmission must not be
                                // taken for a duplicate.
                                let _ = failed.send((node, frame)).await;
                                return;
                            }
                        }
                        let _ = reply.send(Downlink::Ack { node, frame }).await;
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
