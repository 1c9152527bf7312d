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
    /// Ports whose counters are published, by name.
    pub ports: Vec<(String, Arc<PortStats>)>,
    pub status_interval: Duration,
    /// Numbers the gateway's own frames (commands) so node acks can be matched.
    pub boot_id: u32,
    pub next_seq: u32,
    /// Each port's downlink, by port name: commands go to the port a node was last heard on.
    pub downlinks: HashMap<String, mpsc::Sender<Downlink>>,
    /// Nodes asked to repeat their `Hello` in this boot, so it is asked once.
    pub hello_requested: HashSet<(String, u32)>,
    /// Device tasks (issue 6): the watchdog's evidence that this loop turns, and the registry.
    pub probe: crate::health::PipelineProbe,
}

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
    ) {
        let mut status = tokio::time::interval(self.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = inbound.recv() => {
                    let Some(msg) = msg else { break };
                    if !self.process(msg).await {
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
                let known = self
                    .registry
                    .get(&node)
                    .map(|r| r.sensors.clone())
                    .unwrap_or_default();
                // A node the gateway knows nothing about (registry lost, Hello missed): ask it
                // to announce its sensors, once per boot.
                if let Some(f) = frame {
                    let unknown = readings
                        .iter()
                        .any(|r| r.quantity.is_none() && !known.contains_key(&r.channel));
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
                for mut reading in readings {
                    if reading.quantity.is_none() {
                        if let Some(info) = known.get(&reading.channel) {
                            reading.quantity = Some(info.quantity.clone());
                            reading.unit = reading.unit.or_else(|| info.unit.clone());
                        }
                    }
                    let Some(p) = self.mapping.map(&port, &node, &reading, facts) else {
                        continue;
                    };
                    if self
                        .broker
                        .publish(p.topic, p.payload, p.qos, p.retain)
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                // Published in order into the broker; the outbox (when configured) makes this
                // durable before the ack.
                if let Some(frame) = frame {
                    let _ = reply.try_send(Downlink::Ack { node, frame });
                }
            }
            Body::Log { level, text } => {
                tracing::info!(node = %node, port = %port, %level, "node says: {text}")
            }
            Body::CommandAck { of, accepted } => {
                tracing::info!(node = %node, seq = of.seq, accepted, "node answered a command");
                let topic = format!(
                    "sensorgate/{}/nodes/{node}/command-result",
                    self.mapping.gateway
                );
                let payload = format!("{{\"seq\":{},\"accepted\":{accepted}}}", of.seq);
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
                let body = format!(
                    "{{\"error\":{}}}",
                    serde_json::to_string(&why).unwrap_or_default()
                );
                let _ = self
                    .broker
                    .publish(result_topic, body, QoS::AtLeastOnce, false)
                    .await;
                return;
            }
        };
        let port = self.registry.get(node).map(|r| r.port.clone());
        let Some(route) = port.and_then(|p| self.downlinks.get(&p)).cloned() else {
            let why = format!("node {node} has never been heard on a configured port");
            tracing::warn!("cannot send a command: {why}");
            let body = format!(
                "{{\"error\":{}}}",
                serde_json::to_string(&why).unwrap_or_default()
            );
            let _ = self
                .broker
                .publish(result_topic, body, QoS::AtLeastOnce, false)
                .await;
            return;
        };
        let id = self.next_id();
        tracing::info!(%node, ?command, seq = id.seq, "sending a command");
        let _ = route
            .send(Downlink::Command {
                node: node.to_string(),
                id,
                command,
            })
            .await;
    }

    async fn publish_port_stats(&self) {
        for (name, s) in &self.ports {
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

fn merge_sensor(sensors: &mut std::collections::BTreeMap<u16, SensorInfo>, s: &SensorInfo) {
    sensors.insert(s.channel, s.clone());
}
