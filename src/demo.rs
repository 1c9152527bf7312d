//! `sensorgate demo`: the gateway with simulated sensor nodes, for a first look without hardware.
//!
//! Each simulated node owns the master side of a pseudo-terminal pair and speaks the real frame
//! format (`sensorgate-wire`); the gateway opens the slave side as an ordinary `[[port]]`, so
//! everything from the serial read onwards is the production code path. The nodes behave like
//! the firmware: a new boot id at each boot, a Hello first, Readings kept and retransmitted until
//! the gateway's Ack arrives. The garden node also reboots now and then, misses an ack from time
//! to time, and suffers line noise and bit flips, so counters, dedupe and logs have something to
//! show.
//!
//! The configuration is generated as TOML text and goes through [`crate::config::parse`], the
//! same validation as a user's file.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sensorgate_wire as wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_serial::{SerialPort, SerialStream};

use crate::Gateway;

/// The report interval of a real node; the demo's default tick.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(2);
/// How many unacknowledged Readings a node keeps for retransmission; older ones are dropped and
/// counted in its heartbeat. Well inside the gateway's dedupe window (64 sequence numbers).
pub const RETRANSMIT_QUEUE: usize = 16;
/// `--nodes` upper bound: each node is a pseudo-terminal and a port task.
pub const MAX_NODES: usize = 32;

/// What `sensorgate demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The broker's listener; loopback only, since the demo serves anonymous clients.
    pub listen: SocketAddr,
    /// `None`: a fresh temporary directory, removed when the demo stops.
    pub data_dir: Option<PathBuf>,
    /// Simulated nodes: living room, greenhouse, garden, then more of the same.
    pub nodes: usize,
    /// How often each node reports.
    pub period: Duration,
    /// How often port counters are published under `$SYS/sensorgate/ports/...`.
    pub sys_interval: Duration,
    /// Seed for the simulation's randomness; `None` picks one.
    pub seed: Option<u64>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            data_dir: None,
            nodes: 3,
            period: DEFAULT_PERIOD,
            sys_interval: Duration::from_secs(5),
            seed: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "the demo serves anonymous clients, so it listens on loopback only (not {0}); use `sensorgate run` with a configuration for a network listener"
    )]
    NotLoopback(SocketAddr),
    #[error("--nodes must be from 1 to {MAX_NODES}")]
    NodeCount,
    #[error("cannot create a pseudo-terminal for a simulated node: {0}")]
    Pty(#[source] tokio_serial::Error),
    #[error("cannot create the temporary data directory {}: {source}", path.display())]
    TempDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the generated demo configuration is invalid (a bug): {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Gateway(#[from] crate::Error),
}

/// The three kinds of simulated node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Temperature on channel 0.
    Temperature,
    /// Temperature on channel 0, relative humidity on channel 1.
    Greenhouse,
    /// Soil moisture on channel 0, battery voltage on channel 1; heartbeats, reboots, noise.
    Garden,
}

impl NodeKind {
    fn for_index(i: usize) -> NodeKind {
        [
            NodeKind::Temperature,
            NodeKind::Greenhouse,
            NodeKind::Garden,
        ][i % 3]
    }

    fn base_name(self) -> &'static str {
        match self {
            NodeKind::Temperature => "living-room",
            NodeKind::Greenhouse => "greenhouse",
            NodeKind::Garden => "garden",
        }
    }

    fn sensors(self) -> &'static [(wire::Quantity, wire::Unit)] {
        use wire::{Quantity as Q, Unit as U};
        match self {
            NodeKind::Temperature => &[(Q::Temperature, U::DegreeCelsius)],
            NodeKind::Greenhouse => &[
                (Q::Temperature, U::DegreeCelsius),
                (Q::Humidity, U::PercentRh),
            ],
            NodeKind::Garden => &[(Q::Moisture, U::Percent), (Q::Voltage, U::Volt)],
        }
    }

    /// One line for the banner.
    fn describe(self) -> &'static str {
        match self {
            NodeKind::Temperature => "temperature",
            NodeKind::Greenhouse => "temperature, humidity",
            NodeKind::Garden => {
                "soil moisture, battery; heartbeats, reboots, missed acks, line noise"
            }
        }
    }
}

/// A small deterministic generator (xorshift64*), so a seed replays a demo run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next_u64() % n == 0
    }
}

/// One simulated node: a pure state machine that turns ticks and acks into bytes to send.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub id: u32,
    pub kind: NodeKind,
    boot_id: u32,
    next_seq: u32,
    /// Ticks since this boot (uptime) and since the demo started (drives the value curves).
    ticks_since_boot: u64,
    age: u64,
    period: Duration,
    /// Readings sent and not yet acknowledged, oldest first: `(seq, encoded frame)`.
    unacked: VecDeque<(u32, Vec<u8>)>,
    dropped: u32,
    battery_mv: u16,
    /// A slow random walk added to the curves, so values look measured.
    drift: f64,
    rng: Rng,
}

impl SimNode {
    pub fn new(id: u32, kind: NodeKind, period: Duration, seed: u64) -> SimNode {
        let mut rng = Rng::new(seed ^ u64::from(id).wrapping_mul(0x100_0000_01B3));
        SimNode {
            id,
            kind,
            boot_id: rng.next_u64() as u32,
            next_seq: 0,
            ticks_since_boot: 0,
            age: 0,
            period,
            unacked: VecDeque::new(),
            dropped: 0,
            battery_mv: 4150 - (rng.next_u64() % 200) as u16,
            drift: 0.0,
            rng,
        }
    }

    pub fn boot_id(&self) -> u32 {
        self.boot_id
    }

    /// Readings waiting for their ack.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// The frames a node sends when it boots: Hello first.
    pub fn boot(&mut self) -> Vec<Vec<u8>> {
        let mut sensors = wire::heapless::Vec::new();
        for (channel, &(quantity, unit)) in self.kind.sensors().iter().enumerate() {
            let _ = sensors.push(wire::SensorInfo {
                channel: channel as u8,
                quantity,
                unit,
            });
        }
        let hello = wire::Body::Hello(wire::Hello {
            firmware: wire::FirmwareVersion {
                major: 0,
                minor: 3,
                patch: 1,
            },
            report_interval_s: self.period.as_secs().max(1) as u32,
            sensors,
        });
        vec![self.frame(hello)]
    }

    /// One report period: retransmit what is unacknowledged, then send new readings, and for
    /// the garden node the occasional heartbeat, reboot and corruption.
    pub fn tick(&mut self) -> Vec<Vec<u8>> {
        self.age += 1;
        self.ticks_since_boot += 1;
        let mut out = Vec::new();
        if self.kind == NodeKind::Garden && self.ticks_since_boot > 8 && self.rng.one_in(40) {
            // A watchdog reset: RAM (and with it the retransmit queue) is lost.
            self.boot_id = self.rng.next_u64() as u32;
            self.next_seq = 0;
            self.ticks_since_boot = 0;
            self.unacked.clear();
            out.extend(self.boot());
            let log = wire::Log::new(wire::LogLevel::Warn, "reset cause: watchdog");
            out.push(self.frame(wire::Body::Log(log)));
            return out;
        }
        out.extend(self.unacked.iter().map(|(_, bytes)| bytes.clone()));

        let readings = self.measure();
        let frame = self.frame(wire::Body::Readings(readings));
        if self.unacked.len() == RETRANSMIT_QUEUE {
            self.unacked.pop_front();
            self.dropped += 1;
        }
        self.unacked
            .push_back((self.next_seq.wrapping_sub(1), frame.clone()));
        if self.kind == NodeKind::Garden && self.rng.one_in(6) {
            // Corrupted on the way; it stays queued and goes again next period.
            let pick = self.rng.next_u64() as usize;
            out.push(flip_one_bit(&frame, pick));
        } else {
            out.push(frame);
        }

        if self.kind == NodeKind::Garden {
            if self.rng.one_in(8) {
                out.push(self.line_noise());
            }
            if self.ticks_since_boot % 5 == 1 {
                let hb = wire::Heartbeat {
                    battery_mv: self.battery_mv,
                    uptime_s: (self.ticks_since_boot * self.period.as_secs().max(1)) as u32,
                    readings_dropped: self.dropped,
                };
                out.push(self.frame(wire::Body::Heartbeat(hb)));
            }
        }
        out
    }

    /// The gateway acknowledged `of`; the garden node sometimes misses it (a lost downlink
    /// byte), so it retransmits and the gateway's dedupe is seen at work.
    pub fn on_ack(&mut self, of: wire::FrameRef) {
        if of.boot_id != self.boot_id {
            return;
        }
        if self.kind == NodeKind::Garden && self.rng.one_in(10) {
            return;
        }
        self.unacked.retain(|(seq, _)| *seq != of.seq);
    }

    fn frame(&mut self, body: wire::Body) -> Vec<u8> {
        let f = wire::Frame::new(
            wire::Header::new(self.id, self.boot_id, self.next_seq),
            body,
        );
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut buf = [0u8; wire::MAX_FRAME];
        match wire::encode(&f, &mut buf) {
            Ok(bytes) => bytes.to_vec(),
            // MAX_FRAME fits every frame; an empty write is harmless if that ever changed.
            Err(_) => Vec::new(),
        }
    }

    /// Values on slow daily-looking curves (virtual time: one tick is one real report period
    /// of 2 s, whatever the demo's speed) plus a small random walk.
    fn measure(&mut self) -> wire::Readings {
        let t = self.age as f64 * DEFAULT_PERIOD.as_secs_f64();
        let wave = |period_s: f64| (t / period_s * std::f64::consts::TAU).sin();
        self.drift = (self.drift + (self.rng.unit() - 0.5) * 0.1).clamp(-0.6, 0.6);
        let list = match self.kind {
            NodeKind::Temperature => {
                let c = 21.0 + 1.5 * wave(1800.0) + self.drift;
                vec![wire::Reading::new(0, (c * 100.0).round() as i32, -2)]
            }
            NodeKind::Greenhouse => {
                let c = 25.0 + 4.0 * wave(1200.0) + self.drift;
                let rh = (68.0 - 2.0 * (c - 25.0) + 3.0 * self.drift).clamp(0.0, 100.0);
                vec![
                    wire::Reading::new(0, (c * 10.0).round() as i32, -1),
                    wire::Reading::new(1, (rh * 10.0).round() as i32, -1),
                ]
            }
            NodeKind::Garden => {
                self.battery_mv = self.battery_mv.saturating_sub(1);
                if self.battery_mv < 3300 {
                    self.battery_mv = 4150; // fresh batteries
                }
                let moisture = 42.0 + 8.0 * wave(2400.0) + 5.0 * self.drift;
                vec![
                    wire::Reading::new(0, moisture.round() as i32, 0),
                    wire::Reading::new(1, i32::from(self.battery_mv), -3),
                ]
            }
        };
        wire::Readings::from_slice(&list).unwrap_or_default()
    }

    /// A burst of junk such as a loose connector produces, ended by a delimiter byte.
    fn line_noise(&mut self) -> Vec<u8> {
        let len = 3 + (self.rng.next_u64() % 10) as usize;
        let mut noise: Vec<u8> = (0..len)
            .map(|_| (self.rng.next_u64() % 255) as u8 + 1)
            .collect();
        noise.push(0);
        noise
    }
}

/// The same frame with one bit flipped in a data byte (never a COBS code byte, never to 0x00),
/// so it still delimits as one frame and fails its CRC: what a noisy line does to a frame.
pub fn flip_one_bit(frame: &[u8], pick: usize) -> Vec<u8> {
    let mut out = frame.to_vec();
    let body_end = out.len().saturating_sub(1); // keep the delimiter
    let mut data = Vec::new();
    let mut next_code = 0;
    for (i, &byte) in out[..body_end].iter().enumerate() {
        if i == next_code {
            next_code = i + usize::from(byte.max(1));
        } else {
            data.push(i);
        }
    }
    if let Some(&i) = data.get(pick % data.len().max(1)) {
        let mask = if out[i] == 0x10 { 0x01 } else { 0x10 };
        out[i] ^= mask;
    }
    out
}

/// One simulated node as the banner describes it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: u32,
    pub name: String,
    pub kind: NodeKind,
    /// The pseudo-terminal the gateway reads (the port's path).
    pub path: PathBuf,
}

/// The running demo: the gateway and its simulated nodes.
pub struct Demo {
    pub gateway: Gateway,
    pub nodes: Vec<NodeInfo>,
    pub data_dir: PathBuf,
    /// Whether `data_dir` is removed at shutdown.
    pub temporary: bool,
    stop_nodes: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _temp: Option<TempDir>,
}

impl Demo {
    /// Stops the gateway first (so its ports do not see the nodes vanish), then the nodes, then
    /// removes a temporary data directory.
    pub async fn shutdown(self) {
        self.gateway.shutdown().await;
        let _ = self.stop_nodes.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Waits (at most `limit`) until the gateway has opened every node's port.
    pub async fn ports_opened(&self, limit: Duration) {
        let all = async {
            for (_, stats) in self.gateway.port_stats() {
                let _ = stats.opened.subscribe().wait_for(|&n| n >= 1).await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
    }

    /// The banner for stderr: what runs and what to try.
    pub fn banner(&self) -> String {
        let addr = self
            .gateway
            .local_addrs()
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1883)));
        let port = if addr.port() == 1883 {
            String::new()
        } else {
            format!(" -p {}", addr.port())
        };
        let host = addr.ip();
        let mut s = format!(
            "sensorgate demo: MQTT broker on {addr}, {} simulated node(s) on pseudo-terminals\n",
            self.nodes.len()
        );
        for n in &self.nodes {
            s.push_str(&format!(
                "  node {:<2} {:<14} {:<12} {}\n",
                n.id,
                n.name,
                n.path.display(),
                n.kind.describe()
            ));
        }
        s.push_str(&format!(
            "  data in {}{}\n\nTry, in another terminal:\n  mosquitto_sub -h {host}{port} -t 'sensors/#' -v\n  mosquitto_sub -h {host}{port} -t '$SYS/#' -v\n\nCtrl-C stops the demo.\n",
            self.data_dir.display(),
            if self.temporary { " (removed at exit)" } else { "" },
        ));
        s
    }
}

/// Starts the gateway and the simulated nodes; returns once the broker listens. The nodes
/// start talking as soon as the gateway has opened their ports.
pub async fn start_demo(opts: DemoOptions) -> Result<Demo, DemoError> {
    if !opts.listen.ip().is_loopback() {
        return Err(DemoError::NotLoopback(opts.listen));
    }
    if !(1..=MAX_NODES).contains(&opts.nodes) {
        return Err(DemoError::NodeCount);
    }
    let seed = opts.seed.unwrap_or_else(random_seed);
    let (temp, data_dir) = match &opts.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let t = TempDir::create(seed)?;
            let path = t.0.clone();
            (Some(t), path)
        }
    };

    let mut nodes = Vec::new();
    let mut ptys = Vec::new();
    for i in 0..opts.nodes {
        let kind = NodeKind::for_index(i);
        let id = i as u32 + 1;
        let name = if i < 3 {
            kind.base_name().to_string()
        } else {
            format!("{}-{id}", kind.base_name())
        };
        let (master, slave) = SerialStream::pair().map_err(DemoError::Pty)?;
        let path = PathBuf::from(slave.name().unwrap_or_default());
        nodes.push(NodeInfo {
            id,
            name,
            kind,
            path,
        });
        ptys.push((master, slave));
    }

    let text = config_text(&opts, &data_dir, &nodes);
    let config = crate::config::parse(&text, "<demo>", None)?;
    let gateway = crate::start(config).await?;

    let (stop_nodes, stop_rx) = watch::channel(false);
    let stats = gateway.port_stats();
    let mut tasks = Vec::new();
    for ((info, (master, slave)), (_, port)) in nodes.iter().zip(ptys).zip(stats) {
        let sim = SimNode::new(info.id, info.kind, opts.period, seed);
        tasks.push(tokio::spawn(drive(
            sim,
            master,
            slave,
            port.opened.subscribe(),
            opts.period,
            stop_rx.clone(),
        )));
    }
    Ok(Demo {
        gateway,
        nodes,
        data_dir,
        temporary: temp.is_some(),
        stop_nodes,
        tasks,
        _temp: temp,
    })
}

/// Runs the demo until `shutdown` completes, printing the banner to stderr.
pub async fn run_demo(
    opts: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let demo = start_demo(opts).await?;
    demo.ports_opened(Duration::from_secs(2)).await;
    eprintln!("{}", demo.banner());
    shutdown.await;
    tracing::info!("stopping the demo");
    demo.shutdown().await;
    Ok(())
}

/// The demo's configuration file, as a user would write it.
pub fn config_text(opts: &DemoOptions, data_dir: &Path, nodes: &[NodeInfo]) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut t = format!(
        "gateway-id = \"demo\"\ndata-dir = {}\n\n[broker]\nsys-interval = \"{}ms\"\n\n[[broker.listener]]\nbind = \"{}\"\n",
        quote(&data_dir.to_string_lossy()),
        opts.sys_interval.as_millis().max(1),
        opts.listen,
    );
    for n in nodes {
        t.push_str(&format!(
            "\n[[port]]\nname = {name}\npath = {path}\nprotocol = \"sensorgate\"\n\n[[node]]\nid = {id}\nname = {name}\nroom = {name}\n",
            name = quote(&n.name),
            path = quote(&n.path.to_string_lossy()),
            id = n.id,
        ));
    }
    t.push_str(
        r#"
[mapping]
default-topic = "sensors/{room}/{quantity}"

[[mapping.rule]]
quantity = "temperature"
topic = "sensors/{room}/temperature"
decimals = 1

[[mapping.rule]]
quantity = "humidity"
topic = "sensors/{room}/humidity"
decimals = 0

[[mapping.rule]]
quantity = "voltage"
topic = "sensors/{room}/battery"
decimals = 2
"#,
    );
    t
}

/// One node's I/O: waits for the gateway to open its port, boots, then ticks and reads acks.
async fn drive(
    mut sim: SimNode,
    mut master: SerialStream,
    _slave: SerialStream,
    mut opened: watch::Receiver<u64>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        r = opened.wait_for(|&n| n >= 1) => if r.is_err() { return },
        _ = stop.changed() => return,
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acks = wire::Accumulator::new();
    let mut buf = [0u8; 256];
    let mut pending = sim.boot();
    loop {
        for bytes in pending.drain(..) {
            if let Err(e) = master.write_all(&bytes).await {
                tracing::warn!(node = sim.id, "simulated node cannot write: {e}");
                return;
            }
        }
        tokio::select! {
            _ = ticks.tick() => pending = sim.tick(),
            read = master.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for d in acks.feed_iter(&buf[..n]) {
                    if let Ok(wire::Frame { header, body: wire::Body::Ack(ack) }) = d.result {
                        if header.node_id == sim.id {
                            sim.on_ack(ack.of);
                        }
                    }
                }
            }
            _ = stop.changed() => return,
        }
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    u64::from_le_bytes(b)
}

/// A data directory of our own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create(seed: u64) -> Result<TempDir, DemoError> {
        let path = std::env::temp_dir().join(format!(
            "sensorgate-demo-{}-{:08x}",
            std::process::id(),
            seed as u32
        ));
        std::fs::create_dir(&path).map_err(|source| DemoError::TempDir {
            path: path.clone(),
            source,
        })?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Vec<Result<wire::Frame, wire::FrameError>> {
        let mut acc = wire::Accumulator::new();
        acc.feed_iter(bytes).map(|d| d.result).collect()
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_crc_wherever_it_lands() {
        let mut sim = SimNode::new(3, NodeKind::Garden, DEFAULT_PERIOD, 7);
        let frame = sim.boot().remove(0);
        for pick in 0..frame.len() * 2 {
            let bad = flip_one_bit(&frame, pick);
            assert_ne!(bad, frame);
            assert_eq!(
                decode(&bad),
                vec![Err(wire::FrameError::Crc)],
                "pick {pick}"
            );
        }
    }

    #[test]
    fn a_node_says_hello_first_and_retransmits_until_acknowledged() {
        let mut sim = SimNode::new(1, NodeKind::Temperature, DEFAULT_PERIOD, 1);
        let hello = decode(&sim.boot().concat());
        assert!(matches!(
            hello[..],
            [Ok(wire::Frame {
                body: wire::Body::Hello(_),
                ..
            })]
        ));
        let first = decode(&sim.tick().concat());
        let [Ok(f1)] = &first[..] else {
            panic!("{first:?}")
        };
        assert_eq!(f1.header.seq, 1);
        // No ack: the next period repeats seq 1 before the new seq 2.
        let second = decode(&sim.tick().concat());
        let seqs: Vec<u32> = second
            .iter()
            .map(|f| f.as_ref().unwrap().header.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        sim.on_ack(wire::FrameRef {
            boot_id: sim.boot_id(),
            seq: 1,
        });
        sim.on_ack(wire::FrameRef {
            boot_id: sim.boot_id(),
            seq: 2,
        });
        assert_eq!(sim.unacked(), 0);
        let third = decode(&sim.tick().concat());
        assert_eq!(third.len(), 1);
    }

    #[test]
    fn values_are_realistic() {
        let mut sim = SimNode::new(2, NodeKind::Greenhouse, DEFAULT_PERIOD, 5);
        for _ in 0..500 {
            let r = sim.measure();
            let c = r.readings[0].value.to_f64();
            let rh = r.readings[1].value.to_f64();
            assert!((15.0..35.0).contains(&c), "{c}");
            assert!((40.0..95.0).contains(&rh), "{rh}");
        }
    }

    #[test]
    fn the_garden_node_reboots_and_makes_noise_over_time() {
        let mut sim = SimNode::new(3, NodeKind::Garden, DEFAULT_PERIOD, 42);
        let boot = sim.boot_id();
        let mut crc = 0;
        let mut heartbeats = 0;
        let mut rebooted = false;
        for _ in 0..400 {
            for r in decode(&sim.tick().concat()) {
                match r {
                    Err(wire::FrameError::Crc) => crc += 1,
                    Ok(wire::Frame {
                        body: wire::Body::Heartbeat(_),
                        ..
                    }) => heartbeats += 1,
                    _ => {}
                }
            }
            rebooted |= sim.boot_id() != boot;
            let of = wire::FrameRef {
                boot_id: sim.boot_id(),
                seq: sim.next_seq.wrapping_sub(1),
            };
            sim.on_ack(of);
        }
        assert!(crc > 0 && heartbeats > 0 && rebooted);
    }

    #[test]
    fn the_generated_configuration_is_valid_and_maps_to_room_topics() {
        let nodes: Vec<NodeInfo> = (0..3)
            .map(|i| NodeInfo {
                id: i + 1,
                name: NodeKind::for_index(i as usize).base_name().into(),
                kind: NodeKind::for_index(i as usize),
                path: format!("/dev/pts/{i}").into(),
            })
            .collect();
        let text = config_text(&DemoOptions::default(), Path::new("/tmp/x"), &nodes);
        let c = crate::config::parse(&text, "<demo>", None).expect("valid");
        assert_eq!(c.ports.len(), 3);
        let reading = crate::decode::Reading {
            channel: 0,
            quantity: Some("temperature".into()),
            unit: None,
            value: 21.37,
            decimals: Some(2),
        };
        let facts = crate::map::FrameFacts {
            ts_ms: 0,
            seq: None,
        };
        let p = c.mapping.map("living-room", "1", &reading, facts).unwrap();
        assert_eq!(p.topic, "sensors/living-room/temperature");
        assert_eq!(&p.payload[..], b"21.4");
    }
}
