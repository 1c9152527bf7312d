//! Health: which nodes are online, and the gateway's own status, as retained MQTT messages.
//!
//! ```text
//!  pipeline status tick ──PipelineProbe::tick──▶ beat counter (watchdog) + registry snapshot
//!                                                     │
//!            ports' counters ────────────┐            ▼
//!                                        └──▶ health task (1 s tick) ──▶ broker (retained)
//!   sensorgate/<gw>/nodes/<node>/availability = online | offline
//!   sensorgate/<gw>/status                    = {"state":"online","ports":[..],"nodes":{..},..}
//! ```
//!
//! A node is online while its last frame is younger than `missed-intervals` times its expected
//! report interval (its `Hello` interval, else `[availability] default-interval`). The status is
//! republished at once when something a person would notice changes (a node or port going up or
//! down, the uplink), at most every `sys-interval` when only counters moved, and not at all while
//! the gateway is idle: every retained change is eventually a broker snapshot on the SD card.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::broker::BrokerHandle;
use crate::broker::codec::QoS;
use crate::config::DeviceConfig;
use crate::decode::NodeId;
use crate::ingest::PortStats;
use crate::map::Mapping;
use crate::registry::{NodeRecord, Registry};

/// The registry as the pipeline last shared it.
pub type Nodes = BTreeMap<NodeId, NodeRecord>;

/// How often availability is re-evaluated; transitions are seen within this.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the pipeline shares with the device tasks, once per status tick: that its loop still
/// turns (the watchdog's evidence) and the node registry (availability, discovery, status).
#[derive(Clone)]
pub struct PipelineProbe {
    beats: Arc<AtomicU64>,
    nodes: watch::Sender<Arc<Nodes>>,
}

impl Default for PipelineProbe {
    fn default() -> Self {
        PipelineProbe {
            beats: Arc::default(),
            nodes: watch::Sender::new(Arc::default()),
        }
    }
}

impl PipelineProbe {
    /// Called from the pipeline's loop; cheap for the tens of nodes a gateway serves.
    pub fn tick(&self, registry: &Registry) {
        self.beats.fetch_add(1, Relaxed);
        self.nodes.send_if_modified(|shared| {
            let changed = shared.len() != registry.nodes().count()
                || registry
                    .nodes()
                    .any(|(id, rec)| shared.get(id).is_none_or(|old| old != rec));
            if changed {
                *shared = Arc::new(
                    registry
                        .nodes()
                        .map(|(id, rec)| (id.clone(), rec.clone()))
                        .collect(),
                );
            }
            changed
        });
    }

    /// How many times the pipeline has ticked.
    pub fn beats(&self) -> u64 {
        self.beats.load(Relaxed)
    }

    pub fn nodes(&self) -> watch::Receiver<Arc<Nodes>> {
        self.nodes.subscribe()
    }
}

/// Whether a node is reachable, as published on its availability topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Online,
    Offline,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Online => "online",
            Availability::Offline => "offline",
        }
    }
}

/// A node's availability at `now_ms`: online while fewer than `missed` expected reports are
/// overdue.
pub fn availability(rec: &NodeRecord, now_ms: u64, config: &DeviceConfig) -> Availability {
    let interval_ms = match rec.interval_s {
        Some(s) if s > 0 => u64::from(s) * 1000,
        _ => config.default_interval.as_millis() as u64,
    };
    let limit = interval_ms.saturating_mul(u64::from(config.missed_intervals));
    if rec.last_seen_ms > 0 && now_ms.saturating_sub(rec.last_seen_ms) <= limit {
        Availability::Online
    } else {
        Availability::Offline
    }
}

/// `sensorgate/<gateway>/nodes/<node>/availability`
pub fn availability_topic(gateway: &str, node: &str) -> String {
    format!("sensorgate/{gateway}/nodes/{node}/availability")
}

/// `sensorgate/<gateway>/status`
pub fn status_topic(gateway: &str) -> String {
    format!("sensorgate/{gateway}/status")
}

/// The uplink as the status reports it; filled in by the uplink stage when it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkStatus {
    /// `not-configured`, `connecting`, `connected`, `disconnected`.
    pub state: String,
    /// Records waiting in the outbox, when there is one.
    pub outbox: Option<u64>,
    /// Seconds since the oldest waiting record was accepted; absent when nothing waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_age_s: Option<u64>,
}

impl UplinkStatus {
    pub fn not_configured() -> UplinkStatus {
        UplinkStatus {
            state: "not-configured".into(),
            outbox: None,
            oldest_age_s: None,
        }
    }
}

/// The retained JSON on `sensorgate/<gateway>/status`, read back by `sensorgate status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub gateway: String,
    /// `online` while running, `offline` once stopped.
    pub state: String,
    pub version: String,
    /// Unix time the gateway started, in ms. A start time rather than an uptime, so an idle
    /// gateway's status does not change and its retained copy is not rewritten to the SD card.
    pub started_ms: u64,
    pub uplink: UplinkStatus,
    pub ports: Vec<PortStatus>,
    pub nodes_online: usize,
    pub nodes_total: usize,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    pub name: String,
    pub open: bool,
    pub bytes: u64,
    pub frames: u64,
    pub errors: u64,
    pub duplicates: u64,
    /// Unix time of the last frame in ms, 0 if none.
    pub last_frame_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub name: Option<String>,
    pub online: bool,
    pub port: String,
    pub last_seen_ms: u64,
    pub battery_pct: Option<u8>,
    pub battery_mv: Option<u32>,
    pub rssi_dbm: Option<i32>,
    pub firmware: Option<String>,
}

impl GatewayStatus {
    /// The one-line summary systemd shows (`STATUS=`), e.g.
    /// `3/4 nodes online, 2/2 ports open, uplink not-configured`.
    pub fn summary(&self) -> String {
        let open = self.ports.iter().filter(|p| p.open).count();
        let mut s = format!(
            "{}/{} nodes online, {}/{} ports open, uplink {}",
            self.nodes_online,
            self.nodes_total,
            open,
            self.ports.len(),
            self.uplink.state
        );
        if let Some(n) = self.uplink.outbox {
            s.push_str(&format!(", outbox {n}"));
        }
        s
    }

    /// The part of the status whose change is worth a publication at once (not counters).
    fn shape(&self) -> impl PartialEq + use<> {
        (
            self.state.clone(),
            self.uplink.clone(),
            self.ports.iter().map(|p| p.open).collect::<Vec<_>>(),
            self.nodes
                .iter()
                .map(|n| (n.id.clone(), n.online))
                .collect::<Vec<_>>(),
        )
    }
}

/// The status at `now_ms`, from the registry and the ports' counters.
pub fn gateway_status(
    gateway: &str,
    nodes: &Nodes,
    ports: &[(String, Arc<PortStats>)],
    mapping: &Mapping,
    config: &DeviceConfig,
    now_ms: u64,
    started_ms: u64,
) -> GatewayStatus {
    let nodes: Vec<NodeStatus> = nodes
        .iter()
        .map(|(id, rec)| NodeStatus {
            id: id.clone(),
            name: mapping.nodes.get(id).and_then(|m| m.name.clone()),
            online: availability(rec, now_ms, config) == Availability::Online,
            port: rec.port.clone(),
            last_seen_ms: rec.last_seen_ms,
            battery_pct: rec.battery_pct,
            battery_mv: rec.battery_mv,
            rssi_dbm: rec.link.map(|l| l.rssi_dbm),
            firmware: rec.firmware.clone(),
        })
        .collect();
    GatewayStatus {
        gateway: gateway.to_string(),
        state: "online".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_ms,
        uplink: UplinkStatus::not_configured(),
        ports: ports
            .iter()
            .map(|(name, s)| PortStatus {
                name: name.clone(),
                open: s.open.load(Relaxed),
                bytes: s.bytes.load(Relaxed),
                frames: s.frames.load(Relaxed),
                errors: s.errors_crc.load(Relaxed)
                    + s.errors_framing.load(Relaxed)
                    + s.errors_undecodable.load(Relaxed),
                duplicates: s.duplicates.load(Relaxed),
                last_frame_ms: s.last_frame_ms.load(Relaxed),
            })
            .collect(),
        nodes_online: nodes.iter().filter(|n| n.online).count(),
        nodes_total: nodes.len(),
        nodes,
    }
}

/// What the health task needs.
pub struct HealthTask {
    pub gateway: String,
    pub broker: BrokerHandle,
    pub nodes: watch::Receiver<Arc<Nodes>>,
    pub ports: Vec<(String, Arc<PortStats>)>,
    pub mapping: Arc<Mapping>,
    pub config: DeviceConfig,
    /// Counters are republished at most this often.
    pub refresh: Duration,
    /// The latest status, for systemd's `STATUS=` line and the metrics endpoint.
    pub status: watch::Sender<Arc<GatewayStatus>>,
    /// Wall-clock time in ms (a parameter so tests can move it with tokio's paused clock).
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// The uplink's state, as the uplink stage reports it ([`crate::service::Device::set_uplink`]).
    pub uplink: watch::Receiver<UplinkStatus>,
}

impl HealthTask {
    /// Runs until `stop` turns true, then publishes the gateway as `offline`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let started_ms = (self.clock)();
        let mut published: BTreeMap<NodeId, Availability> = BTreeMap::new();
        let mut last_refresh: Option<tokio::time::Instant> = None;
        let mut last_shape = None;
        let mut last_published: Option<GatewayStatus> = None;
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = check.tick() => {}
                changed = self.nodes.changed() => if changed.is_err() { break },
                changed = self.uplink.changed() => if changed.is_err() { break },
                _ = stop.wait_for(|s| *s) => break,
            }
            let nodes = self.nodes.borrow_and_update().clone();
            let now = (self.clock)();
            let mut status = gateway_status(
                &self.gateway,
                &nodes,
                &self.ports,
                &self.mapping,
                &self.config,
                now,
                started_ms,
            );
            status.uplink = self.uplink.borrow_and_update().clone();
            for n in &status.nodes {
                let a = if n.online {
                    Availability::Online
                } else {
                    Availability::Offline
                };
                if published.get(&n.id) != Some(&a) {
                    let topic = availability_topic(&self.gateway, &n.id);
                    if self
                        .broker
                        .publish(topic, a.as_str(), QoS::AtLeastOnce, true)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    published.insert(n.id.clone(), a);
                }
            }
            // At once when something a person notices changes; counters at most every
            // `refresh`; nothing while idle (each retained change is a snapshot write).
            let shape = Some(status.shape());
            let due = last_refresh.is_none_or(|t| t.elapsed() >= self.refresh);
            let counters_moved = last_published.as_ref() != Some(&status);
            if shape != last_shape || (due && counters_moved) {
                if self.publish_status(&status).await.is_err() {
                    return;
                }
                last_refresh = Some(tokio::time::Instant::now());
                last_shape = shape;
                last_published = Some(status.clone());
            }
            self.status.send_replace(Arc::new(status));
        }
        // A clean stop: say so, as a crashed gateway cannot (its broker is gone with it).
        let mut last = (**self.status.borrow()).clone();
        last.gateway.clone_from(&self.gateway);
        last.state = "offline".into();
        for node in published.keys() {
            let topic = availability_topic(&self.gateway, node);
            let _ = self
                .broker
                .publish(
                    topic,
                    Availability::Offline.as_str(),
                    QoS::AtLeastOnce,
                    true,
                )
                .await;
        }
        let _ = self.publish_status(&last).await;
    }

    async fn publish_status(&self, status: &GatewayStatus) -> Result<(), crate::broker::Stopped> {
        let json = serde_json::to_string(status).unwrap_or_default();
        self.broker
            .publish(status_topic(&self.gateway), json, QoS::AtLeastOnce, true)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DeviceConfig {
        DeviceConfig {
            default_interval: Duration::from_secs(60),
            missed_intervals: 3,
            metrics_listen: None,
            discovery_prefix: None,
        }
    }

    fn seen_at(ms: u64, interval_s: Option<u32>) -> NodeRecord {
        NodeRecord {
            last_seen_ms: ms,
            interval_s,
            ..Default::default()
        }
    }

    #[test]
    fn a_node_is_online_until_three_default_intervals_pass() {
        let rec = seen_at(1_000_000, None);
        let c = config();
        assert_eq!(availability(&rec, 1_000_000, &c), Availability::Online);
        assert_eq!(
            availability(&rec, 1_000_000 + 180_000, &c),
            Availability::Online
        );
        assert_eq!(
            availability(&rec, 1_000_000 + 180_001, &c),
            Availability::Offline
        );
    }

    #[test]
    fn the_interval_a_node_announced_wins_over_the_default() {
        let rec = seen_at(1_000_000, Some(10));
        assert_eq!(
            availability(&rec, 1_000_000 + 30_000, &config()),
            Availability::Online
        );
        assert_eq!(
            availability(&rec, 1_000_000 + 30_001, &config()),
            Availability::Offline
        );
    }

    #[test]
    fn a_node_never_heard_is_offline() {
        assert_eq!(
            availability(&seen_at(0, None), 5, &config()),
            Availability::Offline
        );
    }

    #[test]
    fn the_summary_reads_as_one_line() {
        let s = GatewayStatus {
            nodes_online: 3,
            nodes_total: 4,
            ports: vec![
                PortStatus {
                    open: true,
                    ..Default::default()
                },
                PortStatus::default(),
            ],
            uplink: UplinkStatus {
                state: "connected".into(),
                outbox: Some(0),
                oldest_age_s: None,
            },
            ..Default::default()
        };
        assert_eq!(
            s.summary(),
            "3/4 nodes online, 1/2 ports open, uplink connected, outbox 0"
        );
    }
}
