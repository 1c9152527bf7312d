//! Serial ports: each `[[port]]` is its own task that opens the device, feeds its bytes to the
//! port's decoder, forwards observations, and writes acknowledgements and commands back.
//!
//! A port that fails to open or disappears (USB unplugged) is retried with capped exponential
//! backoff and logged once per state change; the other ports never notice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use std::io;

use tokio::sync::{mpsc, watch};

pub use link::Clock;
use link::{Input, Link};

mod link;

use crate::config::PortConfig;
use crate::decode::{
    Decoded, Decoder, Fault, FrameId, LinesDecoder, MySensorsDecoder, NodeCommand, Observation,
    Protocol, SensorgateDecoder,
};

/// Observations waiting for the pipeline. When full, ports stop reading and the OS buffers
/// the serial bytes: backpressure rather than loss.
pub const INBOUND_QUEUE: usize = 1024;
/// Frames waiting to be written to one port (acks, commands). The pipeline can be ahead of a
/// port by at most the inbound queue plus one read's frames, and the port writes before it
/// reads again, so acknowledgements are not dropped even under a flood.
pub const DOWNLINK_QUEUE: usize = 4096;
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most one bad-input log line per port per this period; the rest are counted.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counters of one port, published under `$SYS/sensorgate/ports/<name>/...`.
#[derive(Debug, Default)]
pub struct PortStats {
    pub open: AtomicBool,
    pub opens: AtomicU64,
    pub bytes: AtomicU64,
    /// Bytes that ended in a frame, an error or were ignored; with the decoder's pending bytes
    /// this equals `bytes` (invariant 4).
    pub bytes_accounted: AtomicU64,
    pub frames: AtomicU64,
    pub errors_crc: AtomicU64,
    pub errors_framing: AtomicU64,
    pub errors_undecodable: AtomicU64,
    pub duplicates: AtomicU64,
    pub last_frame_ms: AtomicU64,
    /// Read on the tick of busy ports rather than as each byte arrives (see `link.rs`);
    /// `subscribe()` to await a change.
    pub polled: watch::Sender<bool>,
    /// How often the port became busy.
    pub busy_periods: AtomicU64,
    /// Counts successful opens; await `subscribe().changed()` to learn the port (re)opened.
    pub opened: watch::Sender<u64>,
}

impl PortStats {
    pub fn errors(&self, fault: Fault) -> &AtomicU64 {
        match fault {
            Fault::Crc => &self.errors_crc,
            Fault::Framing => &self.errors_framing,
            Fault::Undecodable => &self.errors_undecodable,
        }
    }
}

/// Something to write to a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downlink {
    /// Acknowledge a node frame (encoded by the port's decoder).
    Ack { node: String, frame: FrameId },
    /// A command for a node, numbered `id` so the node's ack can be matched.
    Command {
        node: String,
        id: FrameId,
        command: NodeCommand,
    },
    /// Bytes already encoded for this port's protocol.
    Raw(Vec<u8>),
}

/// An observation and where it came from.
pub struct Inbound {
    pub port: Arc<str>,
    pub obs: Observation,
    /// Where to send the acknowledgement.
    pub reply: mpsc::Sender<Downlink>,
    pub stats: Arc<PortStats>,
}

/// A running port task.
pub struct Port {
    pub config: PortConfig,
    pub stats: Arc<PortStats>,
    pub downlink: mpsc::Sender<Downlink>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Port {
    /// Starts reading `config`'s device; observations go to `inbound`.
    pub fn spawn(config: PortConfig, inbound: mpsc::Sender<Inbound>, clock: &Clock) -> Port {
        let (stop_tx, stop) = watch::channel(false);
        let stats = Arc::new(PortStats::default());
        let (downlink, rx) = mpsc::channel(DOWNLINK_QUEUE);
        let task = tokio::spawn(run(
            config.clone(),
            stats.clone(),
            inbound,
            downlink.clone(),
            rx,
            stop,
            clock.clone(),
        ));
        Port {
            config,
            stats,
            downlink,
            stop: stop_tx,
            task,
        }
    }

    /// Stops reading (a partial frame is counted), closes the device and waits for the task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The decoder for a port's protocol.
pub fn decoder_for(config: &PortConfig) -> Box<dyn Decoder> {
    match config.protocol {
        Protocol::Sensorgate => Box::new(SensorgateDecoder::new()),
        Protocol::Lines => Box::new(LinesDecoder::new(config.node_source.clone())),
        Protocol::Mysensors => Box::new(MySensorsDecoder::new()),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run(
    config: PortConfig,
    stats: Arc<PortStats>,
    inbound: mpsc::Sender<Inbound>,
    reply: mpsc::Sender<Downlink>,
    mut downlink: mpsc::Receiver<Downlink>,
    mut stop: watch::Receiver<bool>,
    clock: Clock,
) {
    let name: Arc<str> = Arc::from(config.name.as_str());
    let mut backoff = BACKOFF_START;
    let mut reported_failure = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let builder = tokio_serial::new(config.path.to_string_lossy(), config.baud);
        let link = mio_serial::SerialStream::open(&builder)
            .map_err(io::Error::from)
            .and_then(|s| Link::new(s, clock.clone()));
        let mut link = match link {
            Ok(l) => l,
            Err(e) => {
                if !reported_failure {
                    tracing::warn!(port = %name, path = %config.path.display(), "cannot open the port: {e}; retrying with backoff up to {BACKOFF_MAX:?}");
                    reported_failure = true;
                } else {
                    tracing::debug!(port = %name, "still cannot open: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!(port = %name, path = %config.path.display(), protocol = config.protocol.name(), baud = config.baud, "port open");
        reported_failure = false;
        backoff = BACKOFF_START;
        stats.open.store(true, Relaxed);
        let opens = stats.opens.fetch_add(1, Relaxed) + 1;
        stats.opened.send_replace(opens);

        let mut decoder = decoder_for(&config);
        let mut limiter = LogLimiter::default();
        let mut buf = vec![0u8; 4096];
        let mut outcomes = Vec::new();
        let ended = loop {
            // Acknowledgements and commands first (a node waits for them, and they bound the
            // queue), all that are waiting in one write; then stopping; then reading.
            while let Ok(out) = downlink.try_recv() {
                queue_downlink(&name, decoder.as_ref(), &mut link, out);
            }
            if let Err(e) = link.flush() {
                break e.to_string();
            }
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    decoder.finish(&mut outcomes);
                    let _ = forward(&name, &mut outcomes, &stats, &inbound, &reply, &mut limiter).await;
                    stats.open.store(false, Relaxed);
                    return;
                }
                // A polled port picks its downlink up on its tick, with its input.
                out = downlink.recv(), if !link.is_polled() => {
                    let Some(out) = out else { return };
                    queue_downlink(&name, decoder.as_ref(), &mut link, out);
                }
                read = link.read(&mut buf) => {
                    let polled = link.is_polled();
                    if stats.polled.send_if_modified(|p| std::mem::replace(p, polled) != polled) && polled {
                        stats.busy_periods.fetch_add(1, Relaxed);
                    }
                    let n = match read {
                        Ok(Input::Data(n)) => n,
                        Ok(Input::Nothing) => continue,
                        Err(e) => break e.to_string(),
                    };
                    stats.bytes.fetch_add(n as u64, Relaxed);
                    decoder.feed(&buf[..n], &mut outcomes);
                    if !forward(&name, &mut outcomes, &stats, &inbound, &reply, &mut limiter).await {
                        return;
                    }
                }
            }
        };
        stats.polled.send_replace(false);
        decoder.finish(&mut outcomes);
        if !forward(&name, &mut outcomes, &stats, &inbound, &reply, &mut limiter).await {
            return;
        }
        stats.open.store(false, Relaxed);
        tracing::warn!(port = %name, "port lost ({ended}); reopening");
        tokio::select! {
            _ = tokio::time::sleep(BACKOFF_START) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Encodes an acknowledgement or command for the port's protocol and queues it on the link.
fn queue_downlink(port: &str, decoder: &dyn Decoder, link: &mut Link, out: Downlink) {
    let bytes = match out {
        Downlink::Ack { node, frame } => decoder.ack(&node, frame),
        Downlink::Command { node, id, command } => {
            let bytes = decoder.command(&node, id, command);
            if bytes.is_none() {
                tracing::warn!(port, %node, "this port's protocol cannot carry commands");
            }
            bytes
        }
        Downlink::Raw(b) => Some(b),
    };
    if let Some(bytes) = bytes {
        if !link.queue(&bytes) {
            tracing::warn!(
                port,
                "the device has not taken {} KiB of acknowledgements and commands; discarding {} bytes (they are repeated)",
                link::MAX_PENDING_OUT / 1024,
                bytes.len()
            );
        }
    }
}

/// Counts outcomes and sends observations on; false when the pipeline is gone.
async fn forward(
    port: &Arc<str>,
    outcomes: &mut Vec<Decoded>,
    stats: &Arc<PortStats>,
    inbound: &mpsc::Sender<Inbound>,
    reply: &mpsc::Sender<Downlink>,
    limiter: &mut LogLimiter,
) -> bool {
    // One clock read for the frames of one read.
    let mut now = None;
    for outcome in outcomes.drain(..) {
        stats
            .bytes_accounted
            .fetch_add(outcome.bytes() as u64, Relaxed);
        match outcome {
            Decoded::Observation { obs, .. } => {
                stats.frames.fetch_add(1, Relaxed);
                stats
                    .last_frame_ms
                    .store(*now.get_or_insert_with(now_ms), Relaxed);
                let msg = Inbound {
                    port: port.clone(),
                    obs,
                    reply: reply.clone(),
                    stats: stats.clone(),
                };
                if inbound.send(msg).await.is_err() {
                    return false;
                }
            }
            Decoded::Error {
                fault,
                detail,
                bytes,
            } => {
                stats.errors(fault).fetch_add(1, Relaxed);
                limiter.log(port, fault, &detail, bytes);
            }
            Decoded::Ignored { .. } => {}
        }
    }
    true
}

/// Logs the first bad input at once, then at most one summary line per [`LOG_EVERY`].
#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn log(&mut self, port: &str, fault: Fault, detail: &str, bytes: usize) {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < LOG_EVERY => self.suppressed += 1,
            _ => {
                if self.suppressed > 0 {
                    tracing::warn!(port, %fault, bytes, suppressed = self.suppressed, "bad input: {detail} (and {} more since the last report)", self.suppressed);
                } else {
                    tracing::warn!(port, %fault, bytes, "bad input: {detail}");
                }
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}
