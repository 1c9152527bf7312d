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

mod pipeline;

// Running on the device (issue 6): systemd, health, metrics, Home Assistant, `sensorgate status`.
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod service;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

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
}

/// A running gateway, as returned by [`start`]: its addresses and a handle to stop it.
pub struct Gateway {
    broker: broker::Broker,
    ports: Vec<ingest::Port>,
    stop_ports: tokio::sync::watch::Sender<bool>,
    pipeline: tokio::task::JoinHandle<()>,
    mapping: tokio::sync::watch::Sender<std::sync::Arc<map::Mapping>>,
    device: service::Device,
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
    pub fn port_stats(&self) -> Vec<(String, std::sync::Arc<ingest::PortStats>)> {
        self.ports
            .iter()
            .map(|p| (p.config.name.clone(), p.stats.clone()))
            .collect()
    }

    /// Replaces the mapping rules while running.
    pub fn set_mapping(&self, mapping: map::Mapping) {
        let _ = self.mapping.send(std::sync::Arc::new(mapping));
    }

    /// Stops sources first (ports), lets the pipeline drain, then stops the broker, which
    /// saves its state.
    pub async fn shutdown(self) {
        self.device.shutdown().await;
        let _ = self.stop_ports.send(true);
        for port in self.ports {
            port.join().await;
        }
        let _ = self.pipeline.await;
        self.broker.shutdown().await;
    }
}

/// Starts every stage; returns once listeners are bound.
pub async fn start(config: ValidConfig) -> Result<Gateway, Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let broker = broker::Broker::start(&config).await?;

    // ingest → decode (in each port task) → pipeline: dedupe, registry, map → broker
    let (inbound_tx, inbound_rx) = tokio::sync::mpsc::channel(ingest::INBOUND_QUEUE);
    let (stop_ports, stop_rx) = tokio::sync::watch::channel(false);
    let ports: Vec<ingest::Port> = config
        .ports
        .iter()
        .map(|p| ingest::Port::spawn(p.clone(), inbound_tx.clone(), stop_rx.clone()))
        .collect();
    drop(inbound_tx);
    let mapping = std::sync::Arc::new(config.mapping.clone());
    let (mapping_tx, mapping_rx) = tokio::sync::watch::channel(mapping.clone());
    let persist = config.broker.persistence;
    let probe = health::PipelineProbe::default();
    let pipeline = pipeline::Pipeline {
        probe: probe.clone(),
        mapping,
        registry: if persist {
            registry::Registry::load(&config.data_dir)
        } else {
            registry::Registry::default()
        },
        broker: broker.handle(),
        data_dir: config.data_dir.clone(),
        persist,
        ports: ports
            .iter()
            .map(|p| (p.config.name.clone(), p.stats.clone()))
            .collect(),
        status_interval: config.broker.sys_interval,
        boot_id: random_u32(),
        next_seq: 0,
        downlinks: ports
            .iter()
            .map(|p| (p.config.name.clone(), p.downlink.clone()))
            .collect(),
        hello_requested: Default::default(),
    };
    let commands = broker
        .handle()
        .subscribe(
            &pipeline::command_filter(&config.gateway_id),
            pipeline::COMMAND_QUEUE,
        )
        .await
        .map_err(|_| Error::Stopped)?;
    let pipeline = tokio::spawn(pipeline.run(inbound_rx, mapping_rx, commands));

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

    Ok(Gateway {
        device,
        broker,
        ports,
        stop_ports,
        pipeline,
        mapping: mapping_tx,
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

/// Runs the gateway until `shutdown` completes, then stops it cleanly.
pub async fn run(config: ValidConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let gateway = start(config).await?;
    for addr in gateway.local_addrs() {
        tracing::info!(%addr, "MQTT broker listening");
    }
    service::notify(&format!(
        "READY=1\nSTATUS={}",
        gateway.device.status().summary()
    ));
    shutdown.await;
    tracing::info!("shutting down");
    service::notify("STOPPING=1\nSTATUS=shutting down");
    gateway.shutdown().await;
    Ok(())
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
