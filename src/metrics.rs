//! The optional Prometheus endpoint: `GET /metrics` in the text exposition format, over a tiny
//! HTTP/1.1 responder (one request per connection, then close). Off unless `[metrics] listen` is
//! set; keep it on loopback or behind a firewall, as it has no authentication.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::broker::{BrokerHandle, Stats};
use crate::health::GatewayStatus;
use crate::ingest::PortStats;

/// Scrapers served at once; Prometheus uses one connection per scrape.
const MAX_CONNECTIONS: usize = 8;
/// Largest request head read; a GET line and a few headers fit many times over.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that sends no full request head within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Server {
    listener: TcpListener,
    broker: BrokerHandle,
    ports: Vec<(String, Arc<PortStats>)>,
    status: watch::Receiver<Arc<GatewayStatus>>,
}

impl Server {
    pub async fn bind(
        addr: SocketAddr,
        broker: BrokerHandle,
        ports: Vec<(String, Arc<PortStats>)>,
        status: watch::Receiver<Arc<GatewayStatus>>,
    ) -> std::io::Result<Server> {
        Ok(Server {
            listener: TcpListener::bind(addr).await?,
            broker,
            ports,
            status,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let this = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                a = this.listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, _)) = accepted else {
                // Out of file descriptors and the like: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                continue; // dropped: too many scrapers at once
            };
            let this = this.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, this.serve(stream)).await;
                drop(permit);
            });
        }
    }

    async fn serve(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_REQUEST {
                return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
            }
        }
        let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
        let mut parts = line.split(|&b| b == b' ');
        let (method, path) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let path = path.split(|&b| b == b'?').next().unwrap_or_default();
        match (method, path) {
            (b"GET", b"/metrics") => {
                let body = render(self.broker.stats(), &self.ports, &self.status.borrow());
                respond(
                    &mut stream,
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    &body,
                )
                .await
            }
            (b"GET", _) => {
                respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await
            }
            _ => {
                respond(
                    &mut stream,
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n",
                )
                .await
            }
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !kind.is_empty() {
        head.push_str(&format!("Content-Type: {kind}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Label values escaped as the exposition format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text: broker counters, per-port counters, node counts.
pub fn render(stats: &Stats, ports: &[(String, Arc<PortStats>)], status: &GatewayStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: &std::sync::atomic::AtomicU64| vec![(String::new(), v.load(Relaxed))];
    metric(
        "sensorgate_broker_clients_connected",
        "gauge",
        "MQTT clients connected now.",
        &one(&stats.clients_connected),
    );
    metric(
        "sensorgate_broker_connections_total",
        "counter",
        "MQTT connections accepted.",
        &one(&stats.connections_total),
    );
    metric(
        "sensorgate_broker_connections_refused_total",
        "counter",
        "MQTT connections refused.",
        &one(&stats.connections_refused),
    );
    metric(
        "sensorgate_broker_messages_received_total",
        "counter",
        "PUBLISH messages received.",
        &one(&stats.messages_received),
    );
    metric(
        "sensorgate_broker_messages_sent_total",
        "counter",
        "PUBLISH messages delivered.",
        &one(&stats.messages_sent),
    );
    metric(
        "sensorgate_broker_messages_dropped_total",
        "counter",
        "Messages dropped (queues full).",
        &one(&stats.messages_dropped),
    );
    metric(
        "sensorgate_broker_bytes_received_total",
        "counter",
        "Bytes read from MQTT clients.",
        &one(&stats.bytes_received),
    );
    metric(
        "sensorgate_broker_bytes_sent_total",
        "counter",
        "Bytes written to MQTT clients.",
        &one(&stats.bytes_sent),
    );
    metric(
        "sensorgate_broker_retained_messages",
        "gauge",
        "Retained messages held.",
        &one(&stats.retained),
    );

    let per_port = |f: &dyn Fn(&PortStats) -> u64| -> Vec<(String, u64)> {
        ports
            .iter()
            .map(|(name, s)| (format!("{{port=\"{}\"}}", label(name)), f(s)))
            .collect()
    };
    metric(
        "sensorgate_port_open",
        "gauge",
        "1 while the serial port is open.",
        &per_port(&|s| u64::from(s.open.load(Relaxed))),
    );
    metric(
        "sensorgate_port_opens_total",
        "counter",
        "Times the serial port was opened.",
        &per_port(&|s| s.opens.load(Relaxed)),
    );
    metric(
        "sensorgate_port_bytes_total",
        "counter",
        "Bytes read from the serial port.",
        &per_port(&|s| s.bytes.load(Relaxed)),
    );
    metric(
        "sensorgate_port_frames_total",
        "counter",
        "Frames decoded.",
        &per_port(&|s| s.frames.load(Relaxed)),
    );
    metric(
        "sensorgate_port_duplicates_total",
        "counter",
        "Duplicate frames dropped.",
        &per_port(&|s| s.duplicates.load(Relaxed)),
    );
    let errors: Vec<(String, u64)> = ports
        .iter()
        .flat_map(|(name, s)| {
            [
                ("crc", s.errors_crc.load(Relaxed)),
                ("framing", s.errors_framing.load(Relaxed)),
                ("undecodable", s.errors_undecodable.load(Relaxed)),
            ]
            .map(|(kind, v)| (format!("{{port=\"{}\",kind=\"{kind}\"}}", label(name)), v))
        })
        .collect();
    metric(
        "sensorgate_port_errors_total",
        "counter",
        "Bytes or frames rejected, by kind.",
        &errors,
    );

    metric(
        "sensorgate_nodes",
        "gauge",
        "Nodes in the registry.",
        &[(String::new(), status.nodes_total as u64)],
    );
    metric(
        "sensorgate_nodes_online",
        "gauge",
        "Nodes heard within their expected interval.",
        &[(String::new(), status.nodes_online as u64)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_help_type_and_labelled_samples() {
        let stats = Stats::default();
        stats.messages_received.store(5, Relaxed);
        let port = Arc::new(PortStats::default());
        port.frames.store(3, Relaxed);
        port.errors_crc.store(1, Relaxed);
        let status = GatewayStatus {
            nodes_online: 2,
            nodes_total: 3,
            ..Default::default()
        };
        let text = render(&stats, &[("usb\"0".into(), port)], &status);
        assert!(text.contains("# TYPE sensorgate_broker_messages_received_total counter\nsensorgate_broker_messages_received_total 5\n"));
        assert!(text.contains("sensorgate_port_frames_total{port=\"usb\\\"0\"} 3\n"));
        assert!(text.contains("sensorgate_port_errors_total{port=\"usb\\\"0\",kind=\"crc\"} 1\n"));
        assert!(text.contains("sensorgate_nodes_online 2\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
