//! sensorgate: serial sensor frames in, MQTT out, with its own broker and a durable uplink.
//!
//! The pipeline, in the order data flows (see `DESIGN.md`):
//! `ingest` (ports, framing) → `decode` → `map` → [`broker`] → `outbox` → `uplink`.
//! [`run`] wires the stages together; `main.rs` only parses the command line.

pub mod broker;
pub mod config;
pub mod outbox;

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
}

/// A running gateway, as returned by [`start`]: its addresses and a handle to stop it.
pub struct Gateway {
    broker: broker::Broker,
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

    /// Stops sources first, then drains and saves state.
    pub async fn shutdown(self) {
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
    Ok(Gateway { broker })
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
