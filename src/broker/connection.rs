//! One client connection: reads and decodes packets, handles CONNECT, keep-alive and PINGREQ,
//! and writes what the router queues for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Stats;
use super::auth::PasswordFile;
use super::codec::{self, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet, ProtocolLevel};
use super::router::{ACK_RESERVE, Command, Outgoing, QOS0_QUEUE};

/// How long a new connection may take to send CONNECT [MQTT-3.1.0-1 gives no figure; Mosquitto
/// uses its keep-alive checks]; a silent socket must not hold a connection slot forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes gathered before a flush while draining the outgoing queue.
const WRITE_BATCH: usize = 64 * 1024;

/// What every connection shares.
pub struct Shared {
    pub router: mpsc::Sender<Command>,
    pub passwords: Option<Arc<PasswordFile>>,
    pub allow_anonymous: bool,
    pub max_packet_size: usize,
    pub max_inflight: u16,
    pub max_keep_alive: u16,
    pub stats: Arc<Stats>,
    /// Holds publishes back while the outbox's queue of blocked appends is full.
    pub(crate) gate: Arc<super::OutboxGate>,
}

/// Why a connection ended, for the log and for the will.
enum End {
    Disconnect,
    Eof,
    KeepAlive,
    Protocol(String),
    Io(std::io::Error),
    Closed,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Disconnect => write!(f, "client sent DISCONNECT"),
            End::Eof => write!(f, "client closed the connection"),
            End::KeepAlive => write!(f, "keep-alive expired"),
            End::Protocol(why) => write!(f, "protocol violation: {why}"),
            End::Io(e) => write!(f, "network error: {e}"),
            End::Closed => write!(f, "closed by the broker"),
        }
    }
}

pub async fn serve(stream: TcpStream, peer: SocketAddr, conn: u64, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let mut wr = BufWriter::new(wr);
    let mut buf = BytesMut::new();

    let connect =
        match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut rd, &mut buf, &shared)).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(Refuse { code, reason })) => {
                tracing::debug!(%peer, "connection refused: {reason}");
                if let Some(code) = code {
                    let ack = Packet::ConnAck(ConnAck {
                        session_present: false,
                        code,
                    });
                    let _ = write_packet(&mut wr, &ack, &shared.stats).await;
                }
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no CONNECT within {CONNECT_TIMEOUT:?}");
                return;
            }
        };
    let connect = match admit(connect, &shared).await {
        Ok(c) => c,
        Err(code) => {
            tracing::info!(%peer, ?code, "connection refused");
            let _ = write_packet(
                &mut wr,
                &Packet::ConnAck(ConnAck {
                    session_present: false,
                    code,
                }),
                &shared.stats,
            )
            .await;
            return;
        }
    };

    let keep_alive = effective_keep_alive(connect.keep_alive, shared.max_keep_alive);
    let client_id = connect.client_id.clone();
    let capacity = QOS0_QUEUE + ACK_RESERVE + usize::from(shared.max_inflight);
    let (tx, mut rx) = mpsc::channel(capacity);
    let (kill_tx, mut kill_rx) = oneshot::channel();
    if shared
        .router
        .send(Command::Connect {
            conn,
            connect,
            tx,
            kill: kill_tx,
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(%peer, client = %client_id, "client connected");

    // [MQTT-3.1.2-24]: disconnect after one and a half keep-alive periods of silence.
    let grace = keep_alive.map(|k| Duration::from_millis(u64::from(k) * 1500));
    let deadline = tokio::time::sleep(grace.unwrap_or(Duration::from_secs(86_400 * 365)));
    tokio::pin!(deadline);

    // A publish waiting for outbox room (`when-full = "block"`): meanwhile this client is not
    // read (TCP backpressure), but what the router queues for it is still written.
    let mut held: Option<Packet> = None;
    let end = loop {
        tokio::select! {
            biased;
            _ = &mut kill_rx => break End::Closed,
            // Room for the held publish: `handle_input` hands it on first.
            () = wait_held(&shared, held.as_ref()), if held.is_some() => {}
            out = rx.recv() => {
                let Some(out) = out else { break End::Closed };
                if let Err(e) = write_out(&mut wr, out, &shared.stats).await {
                    break End::Io(e);
                }
                // Drain what else is queued, then flush once.
                let mut failed = None;
                while wr.buffer().len() < WRITE_BATCH {
                    let Ok(out) = rx.try_recv() else { break };
                    if let Err(e) = write_out(&mut wr, out, &shared.stats).await {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    break End::Io(e);
                }
                if let Err(e) = wr.flush().await {
                    break End::Io(e);
                }
                continue;
            }
            read = read_some(&mut rd, &mut buf), if held.is_none() => {
                match read {
                    Ok(0) => break End::Eof,
                    Ok(n) => shared.stats.bytes_received.fetch_add(n as u64, Relaxed),
                    Err(e) => break End::Io(e),
                };
            }
            _ = &mut deadline, if grace.is_some() && held.is_none() => break End::KeepAlive,
        }
        // New input, or the held publish may go on: the client is alive and is read again.
        if let Some(g) = grace {
            deadline.as_mut().reset(Instant::now() + g);
        }
        match handle_input(&mut buf, conn, &shared, &mut wr, &mut held).await {
            Ok(true) => {}
            Ok(false) => break End::Disconnect,
            Err(end) => break end,
        }
    };
    let graceful = matches!(end, End::Disconnect);
    match &end {
        End::Disconnect | End::Eof | End::Closed => {
            tracing::debug!(%peer, client = %client_id, reason = %end, "connection ended")
        }
        _ => tracing::info!(%peer, client = %client_id, reason = %end, "connection closed"),
    }
    let _ = wr.flush().await;
    let _ = shared.router.send(Command::Closed { conn, graceful }).await;
}

/// Waits until the held publish has outbox room (reserved on return).
async fn wait_held(shared: &Shared, held: Option<&Packet>) {
    if let Some(Packet::Publish(p)) = held {
        shared
            .gate
            .wait(&p.topic, &p.payload, p.qos, p.retain)
            .await;
    }
}

/// Hands on the held publish, if any, then decodes everything buffered; false after
/// DISCONNECT. Stops at a publish that must wait for outbox room, leaving it in `held` and the
/// rest in `buf`.
async fn handle_input<W: AsyncWriteExt + Unpin>(
    buf: &mut BytesMut,
    conn: u64,
    shared: &Shared,
    wr: &mut BufWriter<W>,
    held: &mut Option<Packet>,
) -> Result<bool, End> {
    if let Some(packet) = held.take()
        && shared
            .router
            .send(Command::Packet { conn, packet })
            .await
            .is_err()
    {
        return Err(End::Closed);
    }
    let mut wrote = false;
    let result = loop {
        let packet = match codec::decode(buf, shared.max_packet_size) {
            Ok(Some(p)) => p,
            Ok(None) => break Ok(true),
            Err(e) => break Err(End::Protocol(e.to_string())),
        };
        match packet {
            Packet::PingReq => {
                if let Err(e) = write_packet_buffered(wr, &Packet::PingResp, &shared.stats).await {
                    break Err(End::Io(e));
                }
                wrote = true;
            }
            Packet::Disconnect => break Ok(false),
            // [MQTT-3.1.0-2]: a second CONNECT is a protocol violation; server-to-client packets
            // from a client are too.
            Packet::Connect(_) => break Err(End::Protocol("second CONNECT".into())),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                break Err(End::Protocol(
                    "server-to-client packet sent by a client".into(),
                ));
            }
            packet => {
                if let Packet::Publish(p) = &packet
                    && !shared.gate.try_pass(&p.topic, &p.payload, p.qos, p.retain)
                {
                    *held = Some(packet);
                    break Ok(true);
                }
                if shared
                    .router
                    .send(Command::Packet { conn, packet })
                    .await
                    .is_err()
                {
                    break Err(End::Closed);
                }
            }
        }
    };
    if wrote {
        wr.flush().await.map_err(End::Io)?;
    }
    // Give back memory a burst took: an idle connection keeps only a small buffer.
    if buf.is_empty() && buf.capacity() > READ_IDLE {
        *buf = BytesMut::new();
    }
    result
}

struct Refuse {
    code: Option<ConnectReturnCode>,
    reason: String,
}

async fn read_connect<R: AsyncReadExt + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<Connect, Refuse> {
    loop {
        match codec::decode(buf, shared.max_packet_size) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(other)) => {
                // [MQTT-3.1.0-1]: the first packet must be CONNECT.
                return Err(Refuse {
                    code: None,
                    reason: format!("first packet was not CONNECT: {other:?}"),
                });
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Refuse {
                    code: connack_for(&e),
                    reason: e.to_string(),
                });
            }
        }
        match read_some(rd, buf).await {
            Ok(0) => {
                return Err(Refuse {
                    code: None,
                    reason: "closed before CONNECT".into(),
                });
            }
            Ok(n) => {
                shared.stats.bytes_received.fetch_add(n as u64, Relaxed);
            }
            Err(e) => {
                return Err(Refuse {
                    code: None,
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// [MQTT-3.1.2-2]: an unsupported protocol level is answered with CONNACK 0x01.
fn connack_for(e: &DecodeError) -> Option<ConnectReturnCode> {
    e.connack_code()
}

/// Client id and credential checks; returns the CONNECT with its (possibly assigned) client id.
async fn admit(mut connect: Connect, shared: &Shared) -> Result<Connect, ConnectReturnCode> {
    if connect.client_id.is_empty() {
        // [MQTT-3.1.3-8]: an empty id needs clean session; [MQTT-3.1.3-6] the server assigns one.
        if !connect.clean_session || connect.protocol == ProtocolLevel::V31 {
            return Err(ConnectReturnCode::IdentifierRejected);
        }
        connect.client_id = assigned_client_id();
    } else if connect.protocol == ProtocolLevel::V31 && connect.client_id.chars().count() > 23 {
        // MQTT 3.1 limits client ids to 23 characters.
        return Err(ConnectReturnCode::IdentifierRejected);
    }

    match (&connect.username, &shared.passwords) {
        (Some(user), Some(passwords)) => {
            let passwords = passwords.clone();
            let user = user.clone();
            let password = connect.password.clone().unwrap_or_default();
            let ok = tokio::task::spawn_blocking(move || passwords.verify(&user, &password))
                .await
                .unwrap_or(false);
            if !ok {
                return Err(ConnectReturnCode::BadUsernameOrPassword);
            }
        }
        (None, _) if !shared.allow_anonymous => return Err(ConnectReturnCode::NotAuthorized),
        (Some(_), None) if !shared.allow_anonymous => return Err(ConnectReturnCode::NotAuthorized),
        _ => {}
    }
    Ok(connect)
}

fn assigned_client_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Unique enough without randomness: the time in nanoseconds.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos as u64).to_le_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("auto-{hex}")
}

/// The keep-alive enforced: the client's, capped by `max-keep-alive` when that is set; `None`
/// when neither asks for one.
fn effective_keep_alive(client: u16, max: u16) -> Option<u16> {
    match (client, max) {
        (0, 0) => None,
        (0, m) => Some(m),
        (c, 0) => Some(c),
        (c, m) => Some(c.min(m)),
    }
}

/// Read buffers start small, so thousands of idle connections cost little, and grow while
/// reads fill them.
const READ_IDLE: usize = 512;
const READ_MAX: usize = 64 * 1024;

/// Reads into `buf`, giving it room first: the spare room doubles after a read that filled it.
async fn read_some<R: AsyncReadExt + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    let spare = buf.capacity() - buf.len();
    if spare < READ_IDLE / 4 {
        let want = (buf.capacity() * 2).clamp(READ_IDLE, READ_MAX);
        buf.reserve(want);
    }
    rd.read_buf(buf).await
}

/// A write buffer that gathers a batch of packets into one write, and lets go of its memory
/// when a connection falls idle (unlike tokio's `BufWriter`, which keeps its capacity).
struct BufWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: AsyncWriteExt + Unpin> BufWriter<W> {
    fn new(inner: W) -> Self {
        BufWriter {
            inner,
            buf: Vec::new(),
        }
    }

    fn buffer(&self) -> &[u8] {
        &self.buf
    }

    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + b.len() > WRITE_BATCH {
            self.flush_buffer().await?;
        }
        if b.len() >= WRITE_BATCH {
            return self.inner.write_all(b).await;
        }
        self.buf.extend_from_slice(b);
        Ok(())
    }

    async fn flush_buffer(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            // A small batch means a quiet connection: do not keep a large buffer for it.
            if self.buf.len() < 1024 && self.buf.capacity() > 4096 {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.flush_buffer().await?;
        self.inner.flush().await
    }
}

async fn write_out<W: AsyncWriteExt + Unpin>(
    wr: &mut BufWriter<W>,
    out: Outgoing,
    stats: &Stats,
) -> std::io::Result<()> {
    match out {
        Outgoing::Frame(b) => write_bytes(wr, &b, stats).await,
        Outgoing::Publish { head, payload } => {
            write_bytes(wr, &head, stats).await?;
            write_bytes(wr, &payload, stats).await
        }
    }
}

async fn write_bytes<W: AsyncWriteExt + Unpin>(
    wr: &mut BufWriter<W>,
    b: &Bytes,
    stats: &Stats,
) -> std::io::Result<()> {
    stats.bytes_sent.fetch_add(b.len() as u64, Relaxed);
    wr.write_all(b).await
}

async fn write_packet_buffered<W: AsyncWriteExt + Unpin>(
    wr: &mut BufWriter<W>,
    packet: &Packet,
    stats: &Stats,
) -> std::io::Result<()> {
    let mut b = BytesMut::with_capacity(8);
    codec::encode(packet, &mut b);
    write_bytes(wr, &b.freeze(), stats).await
}

async fn write_packet<W: AsyncWriteExt + Unpin>(
    wr: &mut BufWriter<W>,
    packet: &Packet,
    stats: &Stats,
) -> std::io::Result<()> {
    write_packet_buffered(wr, packet, stats).await?;
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_is_capped_by_the_broker_limit() {
        assert_eq!(effective_keep_alive(0, 0), None);
        assert_eq!(effective_keep_alive(60, 0), Some(60));
        assert_eq!(effective_keep_alive(600, 120), Some(120));
        assert_eq!(effective_keep_alive(0, 120), Some(120));
    }

    #[test]
    fn assigned_ids_are_distinct() {
        assert_ne!(assigned_client_id(), assigned_client_id());
    }
}
