//! The upstream side of the uplink tests: a real `mosquitto` the test starts, stops and
//! restarts; a `mosquitto_sub` that records everything arriving there; the gateway as a real
//! process that can be SIGKILLed and restarted; and the gateway configuration they share.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// A port nobody listens on right now, and that nobody else in this machine's tests will be
/// handed while this process runs: it comes from 20000..32000, below Linux's ephemeral range
/// (32768..60999), so no `bind(0)` and no outgoing connection can take it while a broker the
/// test stopped is down; and each test process walks its own offset of that range (cargo runs
/// test binaries one at a time; the threads of one binary share the counter).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// Debian installs the broker in /usr/sbin, which a test's PATH may lack.
fn mosquitto_bin() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin"] {
        let p = Path::new(dir).join("mosquitto");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("mosquitto")
}

/// Waits (at most `limit`) until something accepts TCP connections on `addr`.
pub async fn until_listening(what: &str, addr: SocketAddr, limit: Duration) {
    let ok = tokio::time::timeout(limit, async {
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(ok.is_ok(), "{what} not listening on {addr} after {limit:?}");
}

/// How the upstream `mosquitto` runs.
#[derive(Clone, Debug, Default)]
pub struct MosqOptions {
    /// Keep sessions and queued messages across restarts.
    pub persistence: bool,
    /// `(ca, cert, key)`: a TLS listener instead of plain TCP.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// A `mosquitto_passwd` file; anonymous clients are refused when set.
    pub password_file: Option<PathBuf>,
    /// With `tls`: clients must present a certificate signed by the CA (mutual TLS).
    pub require_certificate: bool,
}

/// A `mosquitto` on a free loopback port, with its own config in `dir`.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    opts: MosqOptions,
    child: Option<Child>,
}

impl Mosquitto {
    pub async fn start(dir: &Path, opts: MosqOptions) -> Mosquitto {
        let mut m = Mosquitto {
            port: free_port(),
            dir: dir.join("upstream"),
            opts,
            child: None,
        };
        std::fs::create_dir_all(&m.dir).unwrap();
        m.start_again().await;
        m
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts it again on the same port (after `stop`).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let mut conf = format!(
            "user root\nlistener {} 127.0.0.1\nmax_queued_messages 0\nlog_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\n",
            self.port
        );
        if let Some((ca, cert, key)) = &self.opts.tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                ca.display(),
                cert.display(),
                key.display()
            ));
            if self.opts.require_certificate {
                conf.push_str("require_certificate true\n");
            }
        }
        match &self.opts.password_file {
            Some(p) => conf.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                p.display()
            )),
            None => conf.push_str("allow_anonymous true\n"),
        }
        if self.opts.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\n",
                self.dir.display()
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        let path = self.dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var("UPLINK_DEBUG").is_ok() {
                Stdio::inherit()
            } else {
                log.into()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto runs (apt-get install mosquitto)");
        self.child = Some(child);
        until_listening("mosquitto", self.addr(), Duration::from_secs(10)).await;
    }

    /// SIGTERM and wait: with persistence on, sessions and queued messages are saved.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // SAFETY: a plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("mosquitto exits on SIGTERM")
            .expect("mosquitto wait");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

/// One message as it arrived upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrived {
    pub topic: String,
    pub retain: bool,
    pub payload: String,
}

/// What the subscriber has seen so far.
#[derive(Debug, Default)]
pub struct SinkState {
    pub msgs: Vec<Arrived>,
    /// SUBACKs received: one per (re)connection.
    pub subscribed: u32,
    pub exited: bool,
    /// mosquitto_sub's last lines other than messages (its `-d` log and errors), to say why
    /// it exited.
    pub log: VecDeque<String>,
}

impl SinkState {
    /// Whether every `(topic, payload)` of `want` has arrived.
    pub fn has_all<'a>(&self, want: impl IntoIterator<Item = &'a (String, String)>) -> bool {
        let got: std::collections::HashSet<(&str, &str)> = self
            .msgs
            .iter()
            .map(|m| (m.topic.as_str(), m.payload.as_str()))
            .collect();
        want.into_iter()
            .all(|(t, p)| got.contains(&(t.as_str(), p.as_str())))
    }

    /// Payloads that arrived on `topic`, in arrival order.
    pub fn payloads(&self, topic: &str) -> Vec<String> {
        self.msgs
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.payload.clone())
            .collect()
    }
}

const MSG_PREFIX: &str = "MSG>|";

/// A `mosquitto_sub` with a persistent session (`-c -i ID`) at QoS `qos`: it resubscribes
/// on every reconnect and delivers each QoS 2 message to us once. Lines are collected by a
/// background task; tests wait for conditions on [`SinkState`].
pub struct Sink {
    child: Child,
    state: Arc<Mutex<SinkState>>,
    tick: watch::Receiver<u64>,
}

impl Sink {
    /// Returns once its first SUBACK arrived.
    pub async fn spawn(addr: SocketAddr, id: &str, qos: u8, filters: &[&str]) -> Sink {
        Sink::spawn_with(addr, id, qos, filters, &[]).await
    }

    pub async fn spawn_with(
        addr: SocketAddr,
        id: &str,
        qos: u8,
        filters: &[&str],
        extra: &[&str],
    ) -> Sink {
        let sink = Sink::spawn_once(addr, id, qos, filters, extra).await;
        sink.wait("the subscriber's SUBACK", Duration::from_secs(10), |s| {
            s.subscribed >= 1 || s.exited
        })
        .await;
        let failed = sink.with(|s| s.exited.then(|| s.log.clone()));
        if let Some(log) = failed {
            // The harness's own client failing to start is not what any test checks: say
            // why, and start it once more (a second failure fails the test).
            eprintln!(
                "mosquitto_sub exited before its SUBACK; starting it again. It said: {log:?}"
            );
            let again = Sink::spawn_once(addr, id, qos, filters, extra).await;
            again
                .wait("the subscriber's SUBACK", Duration::from_secs(10), |s| {
                    s.subscribed >= 1
                })
                .await;
            return again;
        }
        sink
    }

    /// Starts mosquitto_sub and its readers, without waiting for anything.
    async fn spawn_once(
        addr: SocketAddr,
        id: &str,
        qos: u8,
        filters: &[&str],
        extra: &[&str],
    ) -> Sink {
        let port = addr.port().to_string();
        let fmt = format!("{MSG_PREFIX}%t|%r|%p");
        let qos = qos.to_string();
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &port, "-d"])
            .args(["-F", &fmt, "-c", "-i", id, "-q", &qos])
            .args(extra);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
        let state = Arc::new(Mutex::new(SinkState::default()));
        let (tx, tick) = watch::channel(0u64);
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                keep_log(&mut s.lock().unwrap().log, line);
            }
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(l)) => l,
                    _ => {
                        s.lock().unwrap().exited = true;
                        tx.send_modify(|t| *t += 1);
                        return;
                    }
                };
                if let Some(rest) = line.strip_prefix(MSG_PREFIX) {
                    let mut f = rest.splitn(3, '|');
                    let topic = f.next().unwrap_or("").to_string();
                    let retain = f.next() == Some("1");
                    let payload = f.next().unwrap_or("").to_string();
                    s.lock().unwrap().msgs.push(Arrived {
                        topic,
                        retain,
                        payload,
                    });
                } else if line.starts_with("Subscribed (mid") {
                    s.lock().unwrap().subscribed += 1;
                } else {
                    keep_log(&mut s.lock().unwrap().log, line);
                    continue;
                }
                tx.send_modify(|t| *t += 1);
            }
        });
        Sink { child, state, tick }
    }

    /// Waits (at most `limit`) until the collected state satisfies `ok`.
    pub async fn wait(&self, what: &str, limit: Duration, ok: impl Fn(&SinkState) -> bool) {
        let mut tick = self.tick.clone();
        let done = tokio::time::timeout(limit, async {
            loop {
                tick.borrow_and_update();
                {
                    let s = self.state.lock().unwrap();
                    if ok(&s) {
                        return;
                    }
                    assert!(
                        !s.exited,
                        "mosquitto_sub exited while waiting for {what}; its last lines: {:?}",
                        s.log
                    );
                }
                if tick.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if done.is_err() {
            let s = self.state.lock().unwrap();
            panic!(
                "timed out after {limit:?} waiting upstream for {what}; {} messages arrived, last {:?}",
                s.msgs.len(),
                s.msgs.last()
            );
        }
    }

    /// Runs `f` on the state collected so far.
    pub fn with<T>(&self, f: impl FnOnce(&SinkState) -> T) -> T {
        f(&self.state.lock().unwrap())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn keep_log(log: &mut VecDeque<String>, line: String) {
    if log.len() == 20 {
        log.pop_front();
    }
    log.push_back(line);
}

/// Counts how often each payload of `topic` arrived: `(missing, duplicates)` against `want`.
pub fn missing_and_duplicates(
    got: &[String],
    want: impl IntoIterator<Item = String>,
) -> (Vec<String>, usize) {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for p in got {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    let missing = want
        .into_iter()
        .filter(|w| !counts.contains_key(w.as_str()))
        .collect();
    let dups = counts.values().map(|c| c - 1).sum();
    (missing, dups)
}

/// The gateway configuration the uplink tests use. `upstream_extra` and `outbox_extra` add
/// keys to `[upstream]` (before the rules) and `[outbox]`.
pub fn gateway_toml(
    data_dir: &Path,
    listen: &str,
    url: &str,
    upstream_extra: &str,
    rules: &str,
    outbox_extra: &str,
) -> String {
    format!(
        r#"data-dir = {:?}
gateway-id = "gw1"

[log]
level = "info"

[[broker.listener]]
bind = "{listen}"

[upstream]
url = "{url}"
reconnect-min = "50ms"
reconnect-max = "250ms"
# mosquitto lets a client have 20 QoS 2 messages awaiting PUBREL (max_inflight_messages);
# MQTT 3.1.1 cannot tell the gateway, so it is configured to match.
inflight = 20
{upstream_extra}

{rules}

[outbox]
commit-delay = "5ms"
{outbox_extra}
"#,
        data_dir.display().to_string()
    )
}

/// The gateway in-process (`sensorgate::start`).
pub async fn start_gateway(text: &str) -> sensorgate::Gateway {
    let config = sensorgate::config::parse(text, "test.toml", None)
        .unwrap_or_else(|e| panic!("test config rejected: {e}\n{text}"));
    tokio::time::timeout(Duration::from_secs(10), sensorgate::start(config))
        .await
        .expect("gateway starts in time")
        .expect("gateway starts")
}

/// The gateway as a real process (`sensorgate run --config FILE`) on a fixed local port,
/// so it can be SIGKILLed and restarted on the same data directory and port.
pub struct GatewayProcess {
    config: PathBuf,
    log: PathBuf,
    pub local: SocketAddr,
    child: Option<Child>,
    /// Started so far; a watch so publishers can wait for the next start.
    pub starts: watch::Sender<u64>,
}

impl GatewayProcess {
    pub async fn start(dir: &Path, config_text: &str, local: SocketAddr) -> GatewayProcess {
        let config = dir.join("gateway.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut g = GatewayProcess {
            config,
            log: dir.join("gateway.log"),
            local,
            child: None,
            starts: watch::channel(0).0,
        };
        g.start_again().await;
        g
    }

    pub async fn start_again(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the sensorgate binary runs");
        self.child = Some(child);
        until_listening("the gateway", self.local, Duration::from_secs(10)).await;
        self.starts.send_modify(|n| *n += 1);
    }

    /// SIGKILL: no shutdown code runs, like a crash.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("SIGKILL the gateway");
        }
    }

    /// SIGKILLs and restarts it `kills` times, each once `progress` (what its clients have
    /// had acknowledged) reaches the next of `kills` evenly spread points of `total`.
    pub async fn kill_along(
        &mut self,
        kills: u32,
        total: usize,
        progress: &mut watch::Receiver<usize>,
        limit: Duration,
    ) {
        for k in 1..=kills {
            let at = total * k as usize / (kills as usize + 1);
            tokio::time::timeout(limit, progress.wait_for(|&d| d >= at))
                .await
                .unwrap_or_else(|_| panic!("no progress before kill {k}:\n{}", self.log()))
                .expect("the progress sender lives as long as its clients");
            self.kill9().await;
            self.start_again().await;
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: a plain kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .expect("the gateway exits on SIGTERM")
                .unwrap();
            assert!(status.success(), "gateway exit status {status}");
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
