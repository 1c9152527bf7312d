//! Running under systemd: the `sd_notify(3)` protocol and a watchdog that pings only while the
//! gateway makes progress.
//!
//! The protocol is one datagram of `KEY=value` lines to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name when it starts with `@`). Without that variable every call here
//! does nothing, so the same binary runs by hand, in tests and under systemd.
//!
//! Liveness, checked before each `WATCHDOG=1`:
//! - the broker's router answers: a message published to [`PROBE_TOPIC`] comes back through its
//!   queue to an in-process subscriber within [`ROUTER_ANSWER`];
//! - the pipeline's loop turns: its status tick ([`PipelineProbe`]) advanced within
//!   `3 × sys-interval`.
//!
//! A wedged router or pipeline stops the pings, and systemd restarts the service after
//! `WatchdogSec=`.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::broker::codec::QoS;
use crate::broker::{BrokerHandle, InternalMessage};
use crate::health::{GatewayStatus, PipelineProbe};

/// Where the watchdog's round trips through the router go (visible to `$SYS/#` subscribers).
pub const PROBE_TOPIC: &str = "$SYS/sensorgate/watchdog";

/// The router must answer a probe within this; far above its normal microseconds, far below any
/// sensible `WatchdogSec=`.
pub const ROUTER_ANSWER: Duration = Duration::from_secs(5);

/// How often `STATUS=` is refreshed when there is no watchdog to piggyback on.
pub const STATUS_EVERY: Duration = Duration::from_secs(10);

/// The service manager's notification socket.
pub struct Notifier {
    socket: UnixDatagram,
    target: Target,
}

enum Target {
    Path(std::path::PathBuf),
    Abstract(std::os::unix::net::SocketAddr),
}

impl Notifier {
    /// The socket named by `$NOTIFY_SOCKET`, or `None` when not run by a service manager.
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        Notifier::new(&name.to_string_lossy())
            .inspect_err(|e| tracing::warn!("cannot use NOTIFY_SOCKET: {e}"))
            .ok()
    }

    pub fn new(name: &str) -> std::io::Result<Notifier> {
        let target = if let Some(abstract_name) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            Target::Abstract(std::os::unix::net::SocketAddr::from_abstract_name(
                abstract_name.as_bytes(),
            )?)
        } else if name.starts_with('/') {
            Target::Path(name.into())
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{name}` is neither a path nor an abstract socket name"),
            ));
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            target,
        })
    }

    /// Sends one notification, e.g. `"READY=1\nSTATUS=..."`. Never blocks for long: the socket
    /// is a datagram socket and systemd reads it at once.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        let sent = match &self.target {
            Target::Path(p) => self.socket.send_to(state.as_bytes(), p)?,
            Target::Abstract(a) => self.socket.send_to_addr(state.as_bytes(), a)?,
        };
        if sent != state.len() {
            return Err(std::io::Error::other("short write to NOTIFY_SOCKET"));
        }
        Ok(())
    }
}

/// Sends `state` to the service manager if there is one; failures are logged, not fatal.
pub fn notify(state: &str) {
    if let Some(n) = Notifier::from_env() {
        if let Err(e) = n.notify(state) {
            tracing::warn!("sd_notify failed: {e}");
        }
    }
}

/// The watchdog interval systemd asked for (`$WATCHDOG_USEC`), if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Why a watchdog ping was withheld.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    #[error("the broker's router did not answer within {0:?}")]
    RouterSilent(Duration),
    #[error("the broker has stopped")]
    BrokerStopped,
    #[error("the pipeline has not ticked for {0:?}")]
    PipelineStalled(Duration),
}

/// Proves the router and the pipeline are alive.
pub struct Liveness {
    broker: BrokerHandle,
    answers: mpsc::Receiver<InternalMessage>,
    pipeline: PipelineProbe,
    /// Longest time the pipeline may go without a tick; `None` when it has no ports to read
    /// (it then finishes at once, having nothing to do).
    stall_limit: Option<Duration>,
    last_beats: u64,
    last_progress: Instant,
    nonce: u64,
}

impl Liveness {
    /// `stall_limit` should be a few pipeline status intervals.
    pub async fn new(
        broker: BrokerHandle,
        pipeline: PipelineProbe,
        stall_limit: Option<Duration>,
    ) -> Result<Liveness, crate::broker::Stopped> {
        let answers = broker.subscribe(PROBE_TOPIC, 4).await?;
        Ok(Liveness {
            broker,
            answers,
            last_beats: pipeline.beats(),
            pipeline,
            stall_limit,
            last_progress: Instant::now(),
            nonce: 0,
        })
    }

    /// One check: a router round trip, then the pipeline's progress since the last check.
    pub async fn check(&mut self) -> Result<(), Unhealthy> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let round_trip = async {
            self.broker
                .publish(PROBE_TOPIC, nonce.clone(), QoS::AtMostOnce, false)
                .await
                .map_err(|_| Unhealthy::BrokerStopped)?;
            loop {
                match self.answers.recv().await {
                    Some(m) if m.payload == nonce.as_bytes() => return Ok(()),
                    Some(_) => continue, // an answer to an earlier probe that timed out
                    None => return Err(Unhealthy::BrokerStopped),
                }
            }
        };
        tokio::time::timeout(ROUTER_ANSWER, round_trip)
            .await
            .map_err(|_| Unhealthy::RouterSilent(ROUTER_ANSWER))??;

        let beats = self.pipeline.beats();
        if beats != self.last_beats {
            self.last_beats = beats;
            self.last_progress = Instant::now();
        }
        let idle = self.last_progress.elapsed();
        if self.stall_limit.is_some_and(|limit| idle > limit) {
            return Err(Unhealthy::PipelineStalled(idle));
        }
        Ok(())
    }
}

/// Sends `WATCHDOG=1` every `interval / 2` while [`Liveness::check`] passes, and `STATUS=` with
/// the gateway's summary; runs until `stop` turns true. `send` is the notifier (a closure so tests
/// can record what would be sent).
pub async fn supervise(
    mut liveness: Liveness,
    watchdog: Option<Duration>,
    mut status: watch::Receiver<std::sync::Arc<GatewayStatus>>,
    send: impl Fn(&str),
    mut stop: watch::Receiver<bool>,
) {
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).max(Duration::from_millis(10)));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let summary = status.borrow_and_update().summary();
        let mut message = String::new();
        if watchdog.is_some() {
            match liveness.check().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("healthy again; watchdog pings resume");
                        failing = false;
                    }
                    message.push_str("WATCHDOG=1\n");
                }
                Err(why) => {
                    if !failing {
                        tracing::error!("withholding the watchdog ping: {why}");
                        failing = true;
                    }
                    let line = format!("STATUS=unhealthy: {why}");
                    if line != last_status {
                        send(&line);
                        last_status = line;
                    }
                    continue;
                }
            }
        }
        let line = format!("STATUS={summary}");
        if line != last_status {
            message.push_str(&line);
            last_status = line;
        }
        if !message.is_empty() {
            send(message.trim_end());
        }
    }
}

/// The device tasks `start` spawns: health, watchdog and status, metrics, discovery.
pub struct Device {
    stop: watch::Sender<bool>,
    uplink: watch::Sender<crate::health::UplinkStatus>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    status: watch::Receiver<std::sync::Arc<GatewayStatus>>,
}

impl Device {
    /// Spawns the tasks; fails only when the broker has already stopped or the metrics
    /// listener cannot bind.
    pub async fn spawn(
        config: &crate::config::ValidConfig,
        broker: BrokerHandle,
        ports: Vec<(String, std::sync::Arc<crate::ingest::PortStats>)>,
        probe: PipelineProbe,
        mapping: watch::Receiver<std::sync::Arc<crate::map::Mapping>>,
    ) -> Result<Device, crate::Error> {
        let (stop, stop_rx) = watch::channel(false);
        let initial = crate::health::gateway_status(
            &config.gateway_id,
            &Default::default(),
            &ports,
            &mapping.borrow(),
            &config.device,
            crate::ingest::now_ms(),
            crate::ingest::now_ms(),
        );
        let (status_tx, status) = watch::channel(std::sync::Arc::new(initial));
        let mut tasks = Vec::new();
        let (uplink, uplink_rx) = watch::channel(crate::health::UplinkStatus::not_configured());

        let health = crate::health::HealthTask {
            gateway: config.gateway_id.clone(),
            broker: broker.clone(),
            nodes: probe.nodes(),
            ports: ports.clone(),
            mapping: mapping.borrow().clone(),
            config: config.device.clone(),
            refresh: config.broker.sys_interval,
            status: status_tx,
            clock: std::sync::Arc::new(crate::ingest::now_ms),
            uplink: uplink_rx,
        };
        tasks.push(tokio::spawn(health.run(stop_rx.clone())));

        let stall_limit = (!config.ports.is_empty()).then(|| config.broker.sys_interval * 3);
        let liveness = Liveness::new(broker.clone(), probe.clone(), stall_limit)
            .await
            .map_err(|_| crate::Error::Stopped)?;
        let watchdog = watchdog_interval();
        if let Some(w) = watchdog {
            tracing::info!(interval = ?w, "systemd watchdog enabled");
        }
        tasks.push(tokio::spawn(supervise(
            liveness,
            watchdog,
            status.clone(),
            notify,
            stop_rx.clone(),
        )));

        if let Some(addr) = config.device.metrics_listen {
            let server =
                crate::metrics::Server::bind(addr, broker.clone(), ports.clone(), status.clone())
                    .await
                    .map_err(|source| crate::Error::Bind { addr, source })?;
            tracing::info!(addr = %server.local_addr(), "Prometheus metrics on GET /metrics");
            tasks.push(tokio::spawn(server.run(stop_rx.clone())));
        }

        if let Some(prefix) = &config.device.discovery_prefix {
            let discovery = crate::discovery::DiscoveryTask {
                prefix: prefix.clone(),
                gateway: config.gateway_id.clone(),
                broker,
                nodes: probe.nodes(),
                mapping,
                data_dir: config.data_dir.clone(),
            };
            tasks.push(tokio::spawn(discovery.run(stop_rx.clone())));
        }
        Ok(Device {
            stop,
            uplink,
            tasks,
            status,
        })
    }

    /// Reports the uplink's state: the status topic, `STATUS=` and `sensorgate status` show it.
    pub fn set_uplink(&self, status: crate::health::UplinkStatus) {
        self.uplink.send_replace(status);
    }

    /// For a task that follows the uplink: sets the status when it changed.
    pub fn uplink_reporter(&self) -> watch::Sender<crate::health::UplinkStatus> {
        self.uplink.clone()
    }

    /// The latest gateway status.
    pub fn status(&self) -> std::sync::Arc<GatewayStatus> {
        self.status.borrow().clone()
    }

    /// Stops the tasks; the health task publishes the gateway as offline on its way out.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.notify("READY=1\nSTATUS=hello").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=hello");
    }

    #[test]
    fn a_notification_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sensorgate-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 16];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        assert!(Notifier::new("notify.sock").is_err());
    }
}
