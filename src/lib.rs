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
    #[error("cannot open the outbox: {message}")]
    Outbox { message: String },
    #[error("upstream: {message}")]
    Upstream { message: String },
}

/// A running gateway, as returned by [`start`]: its addresses and a handle to stop it.
pub struct Gateway {
    broker: broker::Broker,
    ports: Vec<ingest::Port>,
    stop_ports: tokio::sync::watch::Sender<bool>,
    pipeline: tokio::task::JoinHandle<()>,
    mapping: tokio::sync::watch::Sender<std::sync::Arc<map::Mapping>>,
    uplink: Option<RunningUplink>,
}

struct RunningUplink {
    stats: std::sync::Arc<uplink::UplinkStats>,
    outbox: outbox::Outbox,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
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

    /// The uplink's counters, when an upstream is configured.
    pub fn uplink_stats(&self) -> Option<std::sync::Arc<uplink::UplinkStats>> {
        self.uplink.as_ref().map(|u| u.stats.clone())
    }

    /// The outbox, when an upstream is configured.
    pub fn outbox(&self) -> Option<&outbox::Outbox> {
        self.uplink.as_ref().map(|u| &u.outbox)
    }

    /// Stops sources first (ports), lets the pipeline drain, stops the broker (which saves its
    /// state), then the uplink, and commits the outbox.
    pub async fn shutdown(self) {
        let _ = self.stop_ports.send(true);
        for port in self.ports {
            port.join().await;
        }
        let _ = self.pipeline.await;
        self.broker.shutdown().await;
        if let Some(u) = self.uplink {
            let _ = u.stop.send(true);
            let _ = u.task.await;
            if let Err(e) = u.outbox.close().await {
                tracing::error!("closing the outbox: {e}");
            }
        }
    }
}

/// Starts every stage; returns once listeners are bound.
pub async fn start(config: ValidConfig) -> Result<Gateway, Error> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    // broker → outbox → uplink, when an upstream is configured
    let mut uplink_parts = None;
    let forward = match &config.upstream {
        Some(up) => {
            let dir = config.data_dir.join("outbox");
            let (outbox, report) = outbox::Outbox::open(&dir, config.outbox.config.clone())
                .map_err(|e| Error::Outbox {
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
            let password = upstream_password(up)?;
            let tls = if up.endpoint.tls {
                Some(uplink::tls_config(up).map_err(|message| Error::Upstream { message })?)
            } else {
                None
            };
            let stats = std::sync::Arc::new(uplink::UplinkStats::default());
            let (live_tx, live_rx) = tokio::sync::mpsc::channel(uplink::LIVE_QUEUE);
            let forward = std::sync::Arc::new(uplink::Forward {
                out: up.out.clone(),
                inbound: up.inbound.clone(),
                outbox: outbox.clone(),
                store_qos0: config.outbox.store_qos0,
                live: live_tx,
                stats: stats.clone(),
            });
            uplink_parts = Some((
                up.clone(),
                outbox,
                forward.clone(),
                live_rx,
                stats,
                password,
                tls,
            ));
            Some(forward)
        }
        None => None,
    };
    let broker = broker::Broker::start(&config, forward).await?;
    let uplink = uplink_parts.map(|(up, outbox, forward, live, stats, password, tls)| {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = uplink::Uplink {
            config: up,
            outbox: outbox.clone(),
            forward,
            broker: broker.handle(),
            live,
            stats: stats.clone(),
            password,
            tls,
        };
        let task = tokio::spawn(task.run(stop_rx));
        RunningUplink {
            stats,
            outbox,
            stop,
            task,
        }
    });

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
    let mut registry = if persist {
        registry::Registry::load(&config.data_dir)
    } else {
        registry::Registry::default()
    };
    if let Some(u) = &uplink {
        registry.restore_dedupe(&u.outbox.states());
    }
    let (failed_tx, failed_rx) = tokio::sync::mpsc::channel(64);
    let pipeline = pipeline::Pipeline {
        mapping,
        registry,
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
        failed_tx,
        failed_rx,
        uplink: uplink.as_ref().map(|u| (u.stats.clone(), u.outbox.clone())),
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
    Ok(Gateway {
        uplink,
        broker,
        ports,
        stop_ports,
        pipeline,
        mapping: mapping_tx,
    })
}

/// The upstream password from its file or environment variable; never logged.
fn upstream_password(up: &config::UpstreamConfig) -> Result<Option<String>, Error> {
    match &up.password {
        None => Ok(None),
        Some(config::Password::File(path)) => std::fs::read_to_string(path)
            .map(|t| Some(t.lines().next().unwrap_or("").to_string()))
            .map_err(|e| Error::Upstream {
                message: format!("cannot read the password file {}: {e}", path.display()),
            }),
        Some(config::Password::Env(var)) => {
            std::env::var(var).map(Some).map_err(|_| Error::Upstream {
                message: format!(
                    "the environment variable {var} (upstream.password-env) is not set"
                ),
            })
        }
    }
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
    shutdown.await;
    tracing::info!("shutting down");
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
