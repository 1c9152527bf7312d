//! The upstream connection: TCP or TLS (rustls), MQTT 3.1.1 framed with the project's codec.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;

use crate::broker::codec::{
    self, ConnAck, Connect, ConnectReturnCode, LastWill, Packet, ProtocolLevel, QoS,
};
use crate::config::{Password, UpstreamConfig};

/// Largest packet accepted from the upstream.
const MAX_PACKET: usize = 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An established MQTT connection to the upstream broker.
pub struct Connection {
    io: BufWriter<Box<dyn Stream>>,
    buf: BytesMut,
    out: BytesMut,
    /// The TCP socket under `io` (and under TLS, if any), for [`wake_after`](Self::wake_after).
    fd: RawFd,
    /// The socket's current `SO_RCVLOWAT`.
    wake_bytes: usize,
}

/// Why a connection attempt failed; `is_permanent` failures will not fix themselves by retrying
/// soon (credentials, certificates), so the uplink waits longer between them.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {addr}: {source}")]
    Network {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "TLS handshake with {host} failed: {source} (check `ca-file`, the server name and the clock)"
    )]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("the upstream refused the connection: {0}")]
    Refused(&'static str),
    #[error("the upstream did not answer CONNECT in time")]
    Timeout,
    #[error("the upstream broke the protocol: {0}")]
    Protocol(String),
    /// The password or a TLS file could not be loaded; read again on every attempt, so a
    /// file put right (or a rotated certificate) is picked up without a restart.
    #[error("{0}")]
    Credentials(String),
}

impl ConnectError {
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused(_) | ConnectError::Tls { .. } | ConnectError::Credentials(_)
        )
    }
}

fn refusal(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Accepted => "accepted",
        ConnectReturnCode::UnacceptableProtocolVersion => "it does not speak MQTT 3.1.1",
        ConnectReturnCode::IdentifierRejected => "client id rejected (set `client-id`)",
        ConnectReturnCode::ServerUnavailable => "server unavailable",
        ConnectReturnCode::BadUsernameOrPassword => "bad user name or password",
        ConnectReturnCode::NotAuthorized => "not authorised",
    }
}

/// Connects, sends CONNECT (with the `offline` will on the status topic) and waits for CONNACK.
/// Returns the connection and the session-present flag.
pub async fn connect(
    config: &UpstreamConfig,
    password: Option<&str>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(Connection, bool), ConnectError> {
    let attempt = async {
        let addr = format!("{}:{}", config.endpoint.host, config.endpoint.port);
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| ConnectError::Network {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let fd = tcp.as_raw_fd();
        let stream: Box<dyn Stream> = match tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(config.endpoint.host.clone())
                    .map_err(|e| ConnectError::Tls {
                        host: config.endpoint.host.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                let connector = tokio_rustls::TlsConnector::from(tls);
                let s = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|source| ConnectError::Tls {
                        host: config.endpoint.host.clone(),
                        source,
                    })?;
                Box::new(s)
            }
            None => Box::new(tcp),
        };
        let mut conn = Connection {
            io: BufWriter::new(stream),
            buf: BytesMut::with_capacity(8192),
            out: BytesMut::new(),
            fd,
            wake_bytes: 1,
        };
        let connect = Connect {
            protocol: ProtocolLevel::V311,
            clean_session: !config.persistent_session,
            keep_alive: u16::try_from(config.keep_alive.as_secs()).unwrap_or(u16::MAX),
            client_id: config.client_id.clone(),
            will: Some(LastWill {
                topic: config.status_topic.clone(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
            }),
            username: config.username.clone(),
            password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
        };
        let network = |e: std::io::Error| ConnectError::Network {
            addr: addr.clone(),
            source: e,
        };
        conn.send(&Packet::Connect(connect))
            .await
            .map_err(network)?;
        conn.flush().await.map_err(network)?;
        match conn.recv().await {
            Ok(Some(Packet::ConnAck(ConnAck {
                session_present,
                code: ConnectReturnCode::Accepted,
            }))) => Ok((conn, session_present)),
            Ok(Some(Packet::ConnAck(ConnAck { code, .. }))) => {
                Err(ConnectError::Refused(refusal(code)))
            }
            Ok(Some(other)) => Err(ConnectError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
            Ok(None) => Err(ConnectError::Protocol("closed before CONNACK".into())),
            Err(e) => Err(ConnectError::Protocol(e.to_string())),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

impl Connection {
    /// Buffers a packet; written on [`flush`](Self::flush) or when the buffer fills.
    pub async fn send(&mut self, packet: &Packet) -> std::io::Result<()> {
        self.out.clear();
        codec::encode(packet, &mut self.out);
        self.io.write_all(&self.out).await
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.io.flush().await
    }

    /// Lets the kernel wake this connection's reader only once `bytes` are waiting
    /// (`SO_RCVLOWAT`), or at once if they already are. While a backlog drains, every
    /// acknowledgement arriving on its own would wake the gateway, and each of those wake-ups is
    /// work for the upstream broker's thread that sends it; waiting for a run of them took
    /// mosquitto's cost per drained message on loopback from 40.7 to 33.3 µs and the gateway's
    /// from 19.1 to 6.9 µs (`cargo bench --bench uplink`). The caller asks
    /// only for bytes it knows are coming (4 per outstanding acknowledgement) and drops back to
    /// 1 on a timer, so nothing waits on bytes that never arrive. With TLS the records are
    /// larger than the MQTT bytes they carry, so the threshold is met sooner, never later.
    pub fn wake_after(&mut self, bytes: usize) {
        let bytes = bytes.max(1);
        if bytes == self.wake_bytes {
            return;
        }
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is the socket owned by `self.io`, open for as long as `self` lives;
        // the option value is a live `c_int` and the length passed is its size, as
        // setsockopt(2) requires for SO_RCVLOWAT.
        let rc = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // A kernel that refuses it simply wakes the reader per segment, as before.
        if rc == 0 {
            self.wake_bytes = bytes;
        }
    }

    /// Whether the reader waits for more than one byte.
    pub fn waits_for_a_run(&self) -> bool {
        self.wake_bytes > 1
    }

    /// The next packet; `None` when the upstream closed the connection. Cancel-safe: bytes
    /// read stay in the buffer.
    pub async fn recv(&mut self) -> std::io::Result<Option<Packet>> {
        loop {
            match codec::decode(&mut self.buf, MAX_PACKET) {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ));
                }
            }
            self.io.flush().await?;
            let n = self.io.get_mut().read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

/// The password and the TLS configuration, loaded from their files (or the environment) for one
/// connection attempt.
pub fn credentials(
    config: &UpstreamConfig,
) -> Result<(Option<String>, Option<Arc<rustls::ClientConfig>>), ConnectError> {
    let password = match &config.password {
        None => None,
        Some(Password::File(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConnectError::Credentials(format!(
                    "cannot read the password file {} (upstream.password-file): {e}",
                    path.display()
                ))
            })?;
            Some(text.lines().next().unwrap_or("").to_string())
        }
        Some(Password::Env(var)) => Some(std::env::var(var).map_err(|_| {
            ConnectError::Credentials(format!(
                "the environment variable {var} (upstream.password-env) is not set"
            ))
        })?),
    };
    let tls = if config.endpoint.tls {
        Some(tls_config(config).map_err(ConnectError::Credentials)?)
    } else {
        None
    };
    Ok((password, tls))
}

/// Builds the rustls configuration: the CA file or the system roots, and the client
/// certificate for mutual TLS.
pub fn tls_config(config: &UpstreamConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read ca-file {}: {e}", path.display()))?;
            let mut found = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("ca-file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca-file {}: {e}", path.display()))?;
                found += 1;
            }
            if found == 0 {
                return Err(format!(
                    "ca-file {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system certificate authorities found; set `ca-file`".into());
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match &config.client_cert {
        Some((cert_path, key_path)) => {
            let pem = std::fs::read(cert_path)
                .map_err(|e| format!("cannot read client-cert {}: {e}", cert_path.display()))?;
            let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("client-cert {}: {e}", cert_path.display()))?;
            let pem = std::fs::read(key_path)
                .map_err(|e| format!("cannot read client-key {}: {e}", key_path.display()))?;
            let key = rustls_pemfile::private_key(&mut pem.as_slice())
                .map_err(|e| format!("client-key {}: {e}", key_path.display()))?
                .ok_or_else(|| format!("client-key {} holds no private key", key_path.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
