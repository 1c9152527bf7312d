//! sensorgate: serial sensor frames in, MQTT out, with its own broker and a durable uplink.
//!
//! The pipeline, in the order data flows (see `DESIGN.md`):
//! `ingest` (ports, framing) → `decode` → `map` → [`broker`] → `outbox` → `uplink`.
//! [`run`] wires the stages together; `main.rs` only parses the command line.

pub mod config;

pub mod ingest;

pub mod decode;

pub mod registry;

pub mod map;

pub mod broker;

pub mod outbox;

pub mod uplink;

mod pipeline;

pub mod demo;
// Running on the device (issue 6): systemd, health, metrics, Home Assistant, `sensorgate status`.
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod service;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use config::ValidConfig;

/// Why the gateway could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the data directory {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load the password file {}: {message}", path.display())]
    PasswordFile { path: PathBuf, message: String },
    #[error("the broker stopped while the gateway was starting")]
    Stopped,
    #[error("cannot open the outbox: {message}")]
    Outbox { message: String },
}

/// A running gateway, as returned by [`start`]: its addresses and a handle to stop it.
pub struct Gateway {
    config: Box<ValidConfig>,
    broker: broker::Broker,
    ports: Vec<ingest::Port>,
    /// Kept to start ports added by a reload; dropped at shutdown so the pipeline drains.
    inbound: tokio::sync::mpsc::Sender<ingest::Inbound>,
    /// The tick busy ports are read on, shared by all of them.
    clock: ingest::Clock,
    pipeline: tokio::task::JoinHandle<()>,
    mapping: tokio::sync::watch::Sender<Arc<map::Mapping>>,
    port_updates: tokio::sync::watch::Sender<Vec<pipeline::PortLink>>,
    outbox: Option<outbox::Outbox>,
    uplink: Option<RunningUplink>,
    device: service::Device,
}

struct RunningUplink {
    stats: Arc<uplink::UplinkStats>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Follows this uplink into the device status; replaced with the uplink on reload.
    reporter: Option<tokio::task::JoinHandle<()>>,
}

/// What a configuration reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub ports_added: Vec<String>,
    pub ports_removed: Vec<String>,
    pub ports_restarted: Vec<String>,
    pub mapping_changed: bool,
    pub upstream_changed: bool,
    /// Settings that only a restart applies (listeners, broker limits, data directory).
    pub needs_restart: Vec<&'static str>,
}

impl Gateway {
    /// The addresses the broker listens on (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        self.broker.local_addrs()
    }

    /// A handle for in-process publishing and subscribing.
    pub fn broker(&self) -> broker::BrokerHandle {
        self.broker.handle()
    }

    /// Counters of each serial port, by name.
    pub fn port_stats(&self) -> Vec<(String, Arc<ingest::PortStats>)> {
        self.ports
            .iter()
            .map(|p| (p.config.name.clone(), p.stats.clone()))
            .collect()
    }

    /// Replaces the mapping rules while running.
    pub fn set_mapping(&self, mapping: map::Mapping) {
        let _ = self.mapping.send(Arc::new(mapping));
    }

    /// The uplink's counters, when an upstream is configured.
    pub fn uplink_stats(&self) -> Option<Arc<uplink::UplinkStats>> {
        self.uplink.as_ref().map(|u| u.stats.clone())
    }

    /// The outbox, when an upstream is (or was) configured.
    pub fn outbox(&self) -> Option<&outbox::Outbox> {
        self.outbox.as_ref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ValidConfig {
        &self.config
    }

    /// Applies a new configuration without dropping local MQTT clients or losing the outbox:
    /// mapping and node metadata at once, ports added, removed or restarted only when their
    /// settings changed, the uplink restarted when `[upstream]` changed. Broker listeners and
    /// limits need a restart; the report says so.
    pub async fn reload(&mut self, new: ValidConfig) -> Result<ReloadReport, Error> {
        let mut report = ReloadReport::default();
        let old = &self.config;
        if old.broker.listeners != new.broker.listeners {
            report.needs_restart.push("broker.listener");
        }
        if old.broker.max_connections != new.broker.max_connections
            || old.broker.max_packet_size != new.broker.max_packet_size
            || old.broker.max_inflight != new.broker.max_inflight
            || old.broker.max_queued != new.broker.max_queued
            || old.broker.password_file != new.broker.password_file
            || old.broker.allow_anonymous != new.broker.allow_anonymous
        {
            report.needs_restart.push("broker");
        }
        if old.data_dir != new.data_dir {
            report.needs_restart.push("data-dir");
        }
        if old.gateway_id != new.gateway_id {
            report.needs_restart.push("gateway-id");
        }

        // Upstream first, so the mapping's new topics are forwarded by the new rules.
        if old.upstream != new.upstream || old.outbox.store_qos0 != new.outbox.store_qos0 {
            report.upstream_changed = true;
            if let Some(u) = self.uplink.take() {
                if let Some(r) = &u.reporter {
                    r.abort();
                }
                let _ = u.stop.send(true);
                let _ = u.task.await;
            }
            match &new.upstream {
                Some(up) => {
                    if self.outbox.is_none() {
                        self.outbox = Some(open_outbox(&new)?);
                    }
                    let outbox = self.outbox.clone().ok_or(Error::Stopped)?;
                    let (forward, prepared) = prepare_uplink(up, &new, outbox);
                    let mut uplink = prepared.spawn(self.broker.handle());
                    uplink.reporter = Some(report_uplink(
                        &self.device,
                        uplink.stats.clone(),
                        self.outbox.clone().ok_or(Error::Stopped)?,
                        new.broker.sys_interval,
                    ));
                    self.broker
                        .handle()
                        .set_forward(Some(forward))
                        .await
                        .map_err(|_| Error::Stopped)?;
                    self.uplink = Some(uplink);
                }
                None => {
                    self.device
                        .set_uplink(health::UplinkStatus::not_configured());
                    self.broker
                        .handle()
                        .set_forward(None)
                        .await
                        .map_err(|_| Error::Stopped)?;
                }
            }
        }

        if old.mapping != new.mapping {
            report.mapping_changed = true;
            let _ = self.mapping.send(Arc::new(new.mapping.clone()));
        }

        let mut keep = Vec::new();
        for port in std::mem::take(&mut self.ports) {
            match new.ports.iter().find(|p| p.name == port.config.name) {
                Some(p) if *p == port.config => keep.push(port),
                Some(_) => {
                    report.ports_restarted.push(port.config.name.clone());
                    port.stop().await;
                }
                None => {
                    report.ports_removed.push(port.config.name.clone());
                    port.stop().await;
                }
            }
        }
        for p in &new.ports {
            if keep.iter().any(|k| k.config.name == p.name) {
                continue;
            }
            if !report.ports_restarted.contains(&p.name) {
                report.ports_added.push(p.name.clone());
            }
            keep.push(ingest::Port::spawn(
                p.clone(),
                self.inbound.clone(),
                &self.clock,
            ));
        }
        self.ports = keep;
        let _ = self.port_updates.send(port_links(&self.ports));
        *self.config = new;
        Ok(report)
    }

    /// Stops sources first (ports), lets the pipeline drain, stops the broker (which saves its
    /// state), then the uplink, and commits the outbox.
    pub async fn shutdown(self) {
        self.device.shutdown().await;
        for port in self.ports {
            port.stop().await;
        }
        drop(self.inbound);
        drop(self.port_updates);
        let _ = self.pipeline.await;
        self.broker.shutdown().await;
        if let Some(u) = self.uplink {
            let _ = u.stop.send(true);
            let _ = u.task.await;
        }
        if let Some(outbox) = self.outbox {
            if let Err(e) = outbox.close().await {
                tracing::error!("closing the outbox: {e}");
            }
        }
    }
}

fn port_links(ports: &[ingest::Port]) -> Vec<pipeline::PortLink> {
    ports
        .iter()
        .map(|p| pipeline::PortLink {
            name: p.config.name.clone(),
            stats: p.stats.clone(),
            downlink: p.downlink.clone(),
        })
        .collect()
}

fn open_outbox(config: &ValidConfig) -> Result<outbox::Outbox, Error> {
    let dir = config.data_dir.join("outbox");
    let (outbox, report) =
        outbox::Outbox::open(&dir, config.outbox.config.clone()).map_err(|e| Error::Outbox {
            message: e.to_string(),
        })?;
    if report.corrupt_skipped > 0 || report.torn_tail_bytes > 0 {
        tracing::warn!(
            corrupt_skipped = report.corrupt_skipped,
            torn_tail_bytes = report.torn_tail_bytes,
            "the outbox was damaged (power loss?); the damaged records were skipped and the rest will be delivered"
        );
    }
    tracing::info!(pending = report.pending, dir = %dir.display(), "outbox open");
    Ok(outbox)
}

/// An uplink ready to run: its forwarding rules go to the router first, then the task starts.
struct PreparedUplink {
    task: uplink::Uplink,
    stats: Arc<uplink::UplinkStats>,
}

impl PreparedUplink {
    fn spawn(mut self, broker: broker::BrokerHandle) -> RunningUplink {
        self.task.broker = Some(broker);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(self.task.run(stop_rx));
        RunningUplink {
            stats: self.stats,
            stop,
            task,
            reporter: None,
        }
    }
}

/// The forwarding rules for the router, and the uplink task that will deliver what they store.
fn prepare_uplink(
    up: &config::UpstreamConfig,
    config: &ValidConfig,
    outbox: outbox::Outbox,
) -> (Arc<uplink::Forward>, PreparedUplink) {
    let outbox_next_id = outbox.stats().next_id;
    let stats = Arc::new(uplink::UplinkStats::default());
    let (live_tx, live_rx) = tokio::sync::mpsc::channel(uplink::LIVE_QUEUE);
    let forward = Arc::new(uplink::Forward {
        out: up.out.clone(),
        inbound: up.inbound.clone(),
        outbox: outbox.clone(),
        store_qos0: config.outbox.store_qos0,
        live: live_tx,
        stats: stats.clone(),
    });
    let task = uplink::Uplink {
        config: up.clone(),
        outbox,
        forward: forward.clone(),
        broker: None,
        live: live_rx,
        stats: stats.clone(),
        attempted: Default::default(),
        // Records already in the outbox may have been sent before the restart.
        resumed_below: outbox_next_id,
    };
    (forward, PreparedUplink { task, stats })
}

/// Starts every stage; returns once listeners are bound.
pub async fn start(config: ValidConfig) -> Result<Gateway, Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;

    // outbox: opened first, so the broker forwards into it from the first message
    let outbox = match &config.upstream {
        Some(_) => Some(open_outbox(&config)?),
        None => None,
    };
    // The router forwards from its first message: it starts with the rules, and the listeners
    // accept only once it has them (invariant 1 holds from the first connection).
    let prepared = match (&config.upstream, &outbox) {
        (Some(up), Some(ob)) => Some(prepare_uplink(up, &config, ob.clone())),
        _ => None,
    };
    let forward = prepared.as_ref().map(|(f, _)| f.clone());
    let broker = broker::Broker::start_with(&config, forward).await?;
    let uplink = prepared.map(|(_, p)| p.spawn(broker.handle()));

    // ingest → decode (in each port task) → pipeline: dedupe, registry, map → broker
    let (inbound, inbound_rx) = tokio::sync::mpsc::channel(ingest::INBOUND_QUEUE);
    let clock = ingest::Clock::start();
    let ports: Vec<ingest::Port> = config
        .ports
        .iter()
        .map(|p| ingest::Port::spawn(p.clone(), inbound.clone(), &clock))
        .collect();
    let mapping = Arc::new(config.mapping.clone());
    let (mapping_tx, mapping_rx) = tokio::sync::watch::channel(mapping.clone());
    let (port_updates, port_rx) = tokio::sync::watch::channel(port_links(&ports));
    let persist = config.broker.persistence;
    let mut registry = if persist {
        registry::Registry::load(&config.data_dir)
    } else {
        registry::Registry::default()
    };
    if let Some(ob) = &outbox {
        registry.restore_dedupe(&ob.states());
    }
    let (settled_tx, settled_rx) = tokio::sync::mpsc::channel(pipeline::SETTLED_QUEUE);
    let probe = health::PipelineProbe::default();
    let pipeline = pipeline::Pipeline {
        probe: probe.clone(),
        mapping,
        registry,
        broker: broker.handle(),
        data_dir: config.data_dir.clone(),
        persist,
        ports: port_links(&ports),
        status_interval: config.broker.sys_interval,
        boot_id: random_u32(),
        next_seq: 0,
        hello_requested: Default::default(),
        pending_commands: Default::default(),
        settled_tx,
        settled_rx,
        unsettled: Default::default(),
        uplink: match (&uplink, &outbox) {
            (Some(u), Some(ob)) => Some((u.stats.clone(), ob.clone())),
            _ => None,
        },
    };
    let commands = broker
        .handle()
        .subscribe(
            &pipeline::command_filter(&config.gateway_id),
            pipeline::COMMAND_QUEUE,
        )
        .await
        .map_err(|_| Error::Stopped)?;
    let pipeline = tokio::spawn(pipeline.run(inbound_rx, mapping_rx, commands, port_rx));

    // Device tasks (issue 6): availability and status, watchdog, metrics, HA discovery.
    let port_stats = ports
        .iter()
        .map(|p| (p.config.name.clone(), p.stats.clone()));
    let device = service::Device::spawn(
        &config,
        broker.handle(),
        port_stats.collect(),
        probe,
        mapping_tx.subscribe(),
    )
    .await?;

    let mut uplink = uplink;
    if let (Some(u), Some(ob)) = (&mut uplink, &outbox) {
        u.reporter = Some(report_uplink(
            &device,
            u.stats.clone(),
            ob.clone(),
            config.broker.sys_interval,
        ));
    }

    Ok(Gateway {
        device,
        config: Box::new(config),
        broker,
        ports,
        inbound,
        clock,
        pipeline,
        mapping: mapping_tx,
        port_updates,
        outbox,
        uplink,
    })
}

/// Keeps the device status's uplink part (status topic, `STATUS=`, `sensorgate status`)
/// following the uplink: at once on a state change, the outbox depth at most every `every`.
fn report_uplink(
    device: &service::Device,
    stats: Arc<uplink::UplinkStats>,
    outbox: outbox::Outbox,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let tx = device.uplink_reporter();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut last_depth_report = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            let state = if stats.connected.load(Relaxed) {
                "connected"
            } else {
                "disconnected"
            };
            let o = outbox.stats();
            let depth = o.depth;
            let oldest_age_s = o
                .oldest_timestamp_ms
                .map(|t| ingest::now_ms().saturating_sub(t) / 1000);
            tx.send_if_modified(|cur| {
                let state_changed = cur.state != state;
                let depth_due = (cur.outbox != Some(depth) || cur.oldest_age_s != oldest_age_s)
                    && last_depth_report.elapsed() >= every;
                if state_changed || depth_due {
                    cur.state = state.to_string();
                    cur.outbox = Some(depth);
                    cur.oldest_age_s = oldest_age_s;
                    last_depth_report = std::time::Instant::now();
                    true
                } else {
                    false
                }
            });
        }
    })
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return nanos;
    }
    u32::from_le_bytes(b)
}

/// Runs the gateway until `shutdown` completes, then stops it cleanly. SIGHUP reloads the
/// configuration file it was started from; a file that fails validation is refused with a log
/// line and the running configuration stays.
pub async fn run(config: ValidConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // Signal handlers before anything starts: SIGHUP's and SIGTERM's default action is to end
    // the process, and the uplink can announce `online` before `start` returns. Polling
    // `shutdown` once lets it install its handlers (`shutdown_signal` does so when polled).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::pin!(shutdown);
    tokio::select! {
        biased;
        _ = &mut shutdown => return Ok(()),
        _ = std::future::ready(()) => {}
    }
    let mut gateway = start(config).await?;
    for addr in gateway.local_addrs() {
        tracing::info!(%addr, "MQTT broker listening");
    }
    service::notify(&format!(
        "READY=1\nSTATUS={}",
        gateway.device.status().summary()
    ));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                service::notify("RELOADING=1");
                reload_from_file(&mut gateway).await;
                service::notify(&format!("READY=1\nSTATUS={}", gateway.device.status().summary()));
            }
        }
    }
    tracing::info!("shutting down");
    service::notify("STOPPING=1\nSTATUS=shutting down");
    gateway.shutdown().await;
    Ok(())
}

/// Re-reads the configuration file and applies it; logs the outcome either way.
pub async fn reload_from_file(gateway: &mut Gateway) -> Option<ReloadReport> {
    let Some(path) = gateway.config().source.clone() else {
        tracing::warn!(
            "SIGHUP: running with the embedded default configuration; nothing to reload"
        );
        return None;
    };
    let new = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration reload refused; the running configuration stays:\n{e}");
            return None;
        }
    };
    match gateway.reload(new).await {
        Ok(report) => {
            tracing::info!(
                added = ?report.ports_added,
                removed = ?report.ports_removed,
                restarted = ?report.ports_restarted,
                mapping = report.mapping_changed,
                upstream = report.upstream_changed,
                "configuration reloaded from {}",
                path.display()
            );
            if !report.needs_restart.is_empty() {
                tracing::warn!(settings = ?report.needs_restart, "these changes take effect after a restart");
            }
            Some(report)
        }
        Err(e) => {
            tracing::error!("configuration reload failed: {e}");
            None
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
