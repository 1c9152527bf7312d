//! The uplink benchmark: the gateway binary as a child process, with a real `mosquitto` as its
//! upstream, measured from the outside the way a user would see it.
//!
//! ```text
//! cargo bench --bench uplink                            # full run: 1,000,000-message backlog
//! cargo bench --bench uplink -- --quick                 # smoke run: 20,000 messages
//! SENSORGATE_BENCH_QUICK=1 cargo bench --bench uplink   # the same
//! SENSORGATE_BENCH_BACKLOG=300000 cargo bench --bench uplink   # another backlog size
//! ```
//!
//! Three figures:
//! 1. Outbox append rate: local QoS 1 publishers, each pipelining, with the upstream down; the
//!    rate at which PUBACKs come back (each waits for its group commit, invariant 1). This is
//!    also the fill of the backlog for (2).
//! 2. Drain rate of that backlog once the upstream comes back, against a raw client publishing
//!    the same messages straight to the same mosquitto with the same window.
//!    Beside the rates it prints what each message cost mosquitto and the gateway (CPU time,
//!    system calls, sleeps). On loopback the broker's thread pays for every wake-up of the
//!    peer it writes to; that is what the gateway's `SO_RCVLOWAT` threshold saves
//!    (`src/uplink/client.rs`).
//! 3. Bytes written to disk per message (`/proc/<gateway>/io` `write_bytes`) at 10 and 10,000
//!    msg/s with default settings and the upstream down.
//!
//! The upstream "comes back" through a gate rather than by starting mosquitto late: mosquitto
//! starts refusing anonymous clients, the bench's subscriber (with a password) subscribes, then
//! the bench allows anonymous clients and sends SIGHUP. So the subscriber is always in place
//! before the gateway's first PUBLISH, which a fresh mosquitto on the gateway's port could not
//! guarantee. While the outbox fills, the upstream port is closed (nothing listens).

mod common;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use common::{Usage, filesystem, free_port, group, mosquitto_exe, mosquitto_version, proc_field};
use sensorgate::broker::codec::{
    ConnAck, Connect, ConnectReturnCode, Packet, ProtocolLevel, Publish, QoS, SubAckCode,
    Subscribe, decode, encode, encode_publish_head,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, timeout};

const PAYLOAD_LEN: usize = 100;
/// The gateway's `[upstream] inflight` (its default, set explicitly), and the baseline's window.
const UPSTREAM_INFLIGHT: u16 = 64;
/// Local publishers filling the outbox, and the QoS 1 PUBLISHes each keeps unacknowledged.
const LOCAL_PUBLISHERS: u32 = 4;
const LOCAL_WINDOW: usize = 512;
/// The paced publisher of the wear cases may have this many waiting for a commit (500 ms at
/// 10,000 msg/s is 5,000).
const WEAR_WINDOW: usize = 20_000;
/// Outbox quota for the backlog: 1,000,000 records of about 135 bytes do not fit the default
/// 64 MiB.
const BACKLOG_MAX_BYTES: &str = "1GiB";
const GATEWAY_ID: &str = "bench";
const REMOTE_PREFIX: &str = "up/";
const READ_CHUNK: usize = 256 * 1024;
const MAX_PACKET: usize = 1024 * 1024;
/// Longest wait for any single event (a packet, a log line) before the bench gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const KEEP_ALIVE: u16 = 600;
/// The bench's own mosquitto account, used while the gate is closed to anonymous clients.
const MOSQ_USER: &str = "bench";
const MOSQ_PASSWORD: &str = "bench-password";
/// Targets from the issue.
const TARGET_DRAIN_RATIO: f64 = 0.8;
const TARGET_LOW_RATE_BYTES: f64 = 1024.0;
const TARGET_HIGH_RATE_FACTOR: f64 = 1.5;

#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    backlog: u64,
    wear_secs: u64,
}

impl Plan {
    fn from_env_and_args() -> Plan {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("SENSORGATE_BENCH_QUICK").is_ok_and(|v| v == "1");
        let mut plan = if quick {
            Plan {
                quick,
                backlog: 20_000,
                wear_secs: 3,
            }
        } else {
            Plan {
                quick,
                backlog: 1_000_000,
                wear_secs: 10,
            }
        };
        if let Some(n) = std::env::var("SENSORGATE_BENCH_BACKLOG")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Whole multiples of the publishers.
            plan.backlog = n.max(1) / u64::from(LOCAL_PUBLISHERS) * u64::from(LOCAL_PUBLISHERS);
        }
        plan
    }
}

fn main() {
    let plan = Plan::from_env_and_args();
    common::report("uplink", || run(&plan));
}

struct Results {
    append_rate: f64,
    /// The mean of `baselines`.
    baseline_rate: f64,
    /// Before and after the drain.
    baselines: [f64; 2],
    cpu: DrainCpu,
    drain: Drain,
    record_bytes: u64,
    wear: Vec<Wear>,
    filesystem: String,
}

/// CPU time spent on the backlog's messages: mosquitto over both baseline runs (2 × backlog
/// messages) and over the drain, and the gateway over the drain (from the gate opening).
struct DrainCpu {
    mosquitto_baseline: Usage,
    mosquitto_drain: Usage,
    gateway_drain: Usage,
}

struct Drain {
    /// From the gateway's `online` status message to the last record.
    from_connect: Duration,
    /// From the gate opening (SIGHUP) to the last record: adds the reconnect backoff.
    from_gate: Duration,
    out_of_order: u64,
}

struct Wear {
    rate: u64,
    persistence: bool,
    messages: u64,
    /// From the first PUBLISH to the last PUBACK (which waits for the last commit).
    elapsed: Duration,
    write_bytes: u64,
}

fn run(plan: &Plan) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/uplink-bench");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let results = runtime.block_on(measure_all(plan, &root))?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(render(plan, &results, cores))
}

async fn measure_all(plan: &Plan, root: &Path) -> Result<Results> {
    let filesystem = filesystem(root);
    let n = plan.backlog;
    let record_bytes = record_size(root).await?;

    // 1 and 2: fill with the upstream down, baseline, then drain.
    let up_port = free_port()?;
    let gw = Gateway::start(root, "backlog", up_port, true, Some(BACKLOG_MAX_BYTES)).await?;
    eprintln!("filling the outbox with {n} messages, upstream down");
    let per = n / u64::from(LOCAL_PUBLISHERS);
    let fill = publish_local(gw.addr, LOCAL_PUBLISHERS, per, LOCAL_WINDOW, None)
        .await
        .context("filling the outbox")?;
    gw.check_alive()?;
    let append_rate = (per * u64::from(LOCAL_PUBLISHERS)) as f64 / fill.as_secs_f64();
    eprintln!("append: {append_rate:.0} msg/s");

    let mut mosq = Mosquitto::start(root, up_port, n).await?;
    eprintln!("baseline: {n} messages straight to {}", mosq.version);
    let mosq_cpu0 = Usage::of(mosq.child.id())?;
    let baseline_before = baseline(mosq.addr, n, 1).await.context("baseline")?;
    let mosq_cpu1 = Usage::of(mosq.child.id())?;
    eprintln!("baseline: {baseline_before:.0} msg/s");

    let mut sub = Conn::open(mosq.addr, "drain-sub", Some(MOSQ_USER)).await?;
    let status = format!("sensorgate/{GATEWAY_ID}/status");
    sub.subscribe(&[(&format!("{REMOTE_PREFIX}bench/#"), QoS::AtLeastOnce)])
        .await?;
    sub.subscribe(&[(&status, QoS::AtLeastOnce)]).await?;
    let receiver = tokio::spawn(receive(
        sub,
        LOCAL_PUBLISHERS,
        per * u64::from(LOCAL_PUBLISHERS),
        Some(status),
    ));
    let gw_cpu0 = Usage::of(gw.child.id())?;
    let mosq_cpu2 = Usage::of(mosq.child.id())?;
    let gate = Instant::now();
    mosq.open_gate().await?;
    eprintln!("gate open: draining");
    let got = receiver.await.context("subscriber panicked")??;
    gw.check_alive()?;
    let gw_cpu1 = Usage::of(gw.child.id())?;
    let mosq_cpu3 = Usage::of(mosq.child.id())?;
    let online = got
        .online_at
        .ok_or_else(|| anyhow!("the gateway's `online` status never arrived"))?;
    let drain = Drain {
        from_connect: got.last_at.duration_since(online),
        from_gate: got.last_at.duration_since(gate),
        out_of_order: got.out_of_order,
    };
    drop(gw);
    // Again after the drain: the drain is compared with the mean of the two, so a machine
    // whose load drifts during the run (other work on shared cores) biases neither side.
    eprintln!("baseline again, after the drain");
    let baseline_after = baseline(mosq.addr, n, 2).await.context("baseline")?;
    let mosq_cpu4 = Usage::of(mosq.child.id())?;
    let cpu = DrainCpu {
        mosquitto_baseline: (mosq_cpu1 - mosq_cpu0) + (mosq_cpu4 - mosq_cpu3),
        mosquitto_drain: mosq_cpu3 - mosq_cpu2,
        gateway_drain: gw_cpu1 - gw_cpu0,
    };
    eprintln!("baseline: {baseline_after:.0} msg/s");
    drop(mosq);

    // 3: wear at two rates, with and without the broker's snapshot.
    let mut wear = Vec::new();
    for rate in [10, 10_000] {
        for persistence in [true, false] {
            wear.push(measure_wear(root, rate, plan.wear_secs, persistence).await?);
        }
    }
    Ok(Results {
        append_rate,
        baseline_rate: (baseline_before + baseline_after) / 2.0,
        baselines: [baseline_before, baseline_after],
        cpu,
        drain,
        record_bytes,
        wear,
        filesystem,
    })
}

/// The encoded size of one outbox record as the gateway stores it (topic `up/bench/0`,
/// 100-byte payload), from a scratch outbox opened by this process.
async fn record_size(root: &Path) -> Result<u64> {
    use sensorgate::outbox::{Outbox, OutboxConfig, Qos, Record};
    let dir = root.join("record-size");
    let (outbox, _) = Outbox::open(&dir, OutboxConfig::default())?;
    let ticket = outbox.append(Record {
        topic: format!("{REMOTE_PREFIX}bench/0"),
        payload: Bytes::from(vec![0u8; PAYLOAD_LEN]),
        qos: Qos::AtLeastOnce,
        retain: false,
        timestamp_ms: 1,
    });
    ticket.await.map_err(|e| anyhow!("scratch outbox: {e}"))?;
    let bytes = outbox.stats().bytes;
    outbox
        .close()
        .await
        .map_err(|e| anyhow!("scratch outbox: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(bytes)
}

async fn measure_wear(root: &Path, rate: u64, secs: u64, persistence: bool) -> Result<Wear> {
    let up_port = free_port()?;
    let name = format!(
        "wear-{rate}-{}",
        if persistence { "snap" } else { "nosnap" }
    );
    let gw = Gateway::start(root, &name, up_port, persistence, None).await?;
    // Warm up: the first commit creates and preallocates the segment.
    publish_local(gw.addr, 1, 1, 1, None).await?;
    let before = gw.write_bytes()?;
    let messages = rate * secs;
    let started = Instant::now();
    publish_local(gw.addr, 1, messages, WEAR_WINDOW, Some(rate))
        .await
        .with_context(|| format!("paced publisher at {rate} msg/s"))?;
    let elapsed = started.elapsed();
    let write_bytes = gw.write_bytes()? - before;
    gw.check_alive()?;
    eprintln!(
        "wear at {rate} msg/s, persistence {persistence}: {write_bytes} bytes for {messages} messages"
    );
    Ok(Wear {
        rate,
        persistence,
        messages,
        elapsed,
        write_bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// The report

fn render(plan: &Plan, r: &Results, cores: usize) -> String {
    let mut out = String::new();
    let pass = |ok: bool| if ok { "pass" } else { "FAIL" };
    let n = plan.backlog;
    let drain_rate = n as f64 / r.drain.from_connect.as_secs_f64();
    let ratio = drain_rate / r.baseline_rate;
    let _ = writeln!(
        out,
        "\n### Uplink benchmark{}\n",
        if plan.quick {
            " (quick smoke run: small loads, the figures mean little)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "| figure | value | target | result |");
    let _ = writeln!(out, "| --- | ---: | --- | --- |");
    let _ = writeln!(
        out,
        "| Outbox append rate, {LOCAL_PUBLISHERS} local QoS 1 publishers × {LOCAL_WINDOW} in flight, upstream down, {} msgs | {} msg/s | – | – |",
        group(n),
        group(r.append_rate.round() as u64)
    );
    let _ = writeln!(
        out,
        "| Baseline: raw client → mosquitto, QoS 1, window {UPSTREAM_INFLIGHT}, {} msgs, mean of before and after the drain ({} and {}) | {} msg/s | – | – |",
        group(n),
        group(r.baselines[0].round() as u64),
        group(r.baselines[1].round() as u64),
        group(r.baseline_rate.round() as u64)
    );
    let _ = writeln!(
        out,
        "| Drain of a {}-message backlog → mosquitto (inflight {UPSTREAM_INFLIGHT}), from connect | {} msg/s | – | – |",
        group(n),
        group(drain_rate.round() as u64)
    );
    let _ = writeln!(
        out,
        "| Drain rate / baseline rate | {ratio:.2} | ≥ {TARGET_DRAIN_RATIO} | {} |",
        pass(ratio >= TARGET_DRAIN_RATIO)
    );
    let _ = writeln!(
        out,
        "| mosquitto per message, baseline (`/proc/<pid>`; sleeps: voluntary context switches) | {} | – | – |",
        r.cpu.mosquitto_baseline.per_msg(2 * n, true)
    );
    let _ = writeln!(
        out,
        "| mosquitto per message, drain | {} | – | – |",
        r.cpu.mosquitto_drain.per_msg(n, true)
    );
    let _ = writeln!(
        out,
        "| gateway per drained message | {} | – | – |",
        r.cpu.gateway_drain.per_msg(n, false)
    );
    for w in &r.wear {
        let per = w.write_bytes as f64 / w.messages as f64;
        let (target, ok) = if w.rate <= 10 {
            (
                format!("≤ {TARGET_LOW_RATE_BYTES:.0} B"),
                per <= TARGET_LOW_RATE_BYTES,
            )
        } else {
            let limit = TARGET_HIGH_RATE_FACTOR * r.record_bytes as f64;
            (
                format!("≤ {TARGET_HIGH_RATE_FACTOR}× record = {limit:.0} B"),
                per <= limit,
            )
        };
        let _ = writeln!(
            out,
            "| Bytes written per message at {} msg/s, {} msgs in {:.1} s, {} | {per:.0} B ({:.2}× record) | {target} | {} |",
            group(w.rate),
            group(w.messages),
            w.elapsed.as_secs_f64(),
            if w.persistence {
                "whole process, default settings"
            } else {
                "outbox only (`[broker] persistence = false`)"
            },
            per / r.record_bytes as f64,
            pass(ok)
        );
    }
    let _ = writeln!(
        out,
        "\nMachine: {cores} core(s), shared by this process (load clients, subscriber), the gateway \
         and mosquitto. Payloads {PAYLOAD_LEN} B; one outbox record (topic \
         `{REMOTE_PREFIX}bench/0`) is {} B on disk. Drain time runs from the gateway's `online` \
         status message (its first packet after CONNECT) to the last record at the subscriber; \
         from the gate opening it took {:.2} s instead of {:.2} s (reconnect backoff 100–200 ms). \
         Records out of order at the subscriber: {}. Write bytes are the gateway process's \
         `write_bytes` from `/proc/<pid>/io` (bytes dirtied in the page cache; the filesystem \
         journal is not included), counted from after a warm-up commit until the last PUBACK; \
         data dir on {}.\n\nCommand: `cargo bench --bench uplink{}`",
        r.record_bytes,
        r.drain.from_gate.as_secs_f64(),
        r.drain.from_connect.as_secs_f64(),
        r.drain.out_of_order,
        r.filesystem,
        if plan.quick { " -- --quick" } else { "" }
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Collects a child's stderr: the last lines for error messages, and every line for waiters.
struct LogTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    rx: mpsc::UnboundedReceiver<String>,
}

impl LogTail {
    fn follow(child: &mut Child) -> Result<LogTail> {
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let lines = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut l) = keep.lock() {
                    if l.len() >= 30 {
                        l.pop_front();
                    }
                    l.push_back(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        Ok(LogTail { lines, rx })
    }

    fn tail(&self) -> String {
        self.lines
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Waits for a line containing `needle`.
    async fn wait_for(&mut self, needle: &str, who: &str) -> Result<()> {
        let found = timeout(IO_TIMEOUT, async {
            while let Some(line) = self.rx.recv().await {
                if line.contains(needle) {
                    return true;
                }
            }
            false
        })
        .await;
        match found {
            Ok(true) => Ok(()),
            Ok(false) => bail!(
                "{who} exited before logging {needle:?}; its output:\n{}",
                self.tail()
            ),
            Err(_) => bail!(
                "{who} did not log {needle:?} within {IO_TIMEOUT:?}; its output:\n{}",
                self.tail()
            ),
        }
    }
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
    log: LogTail,
}

impl Gateway {
    async fn start(
        root: &Path,
        name: &str,
        up_port: u16,
        persistence: bool,
        max_bytes: Option<&str>,
    ) -> Result<Gateway> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dir.join("sensorgate.toml");
        let outbox = match max_bytes {
            Some(m) => format!("\n[outbox]\nmax-bytes = \"{m}\"\n"),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "data-dir = {data:?}\ngateway-id = \"{GATEWAY_ID}\"\n\n[log]\n\
                 level = \"warn,sensorgate=info\"\n\n[broker]\npersistence = {persistence}\n\n\
                 [[broker.listener]]\nbind = \"{addr}\"\n\n[upstream]\n\
                 url = \"mqtt://127.0.0.1:{up_port}\"\ninflight = {UPSTREAM_INFLIGHT}\n\
                 reconnect-min = \"100ms\"\nreconnect-max = \"200ms\"\n\n[[upstream.out]]\n\
                 filter = \"bench/#\"\nremote-prefix = \"{REMOTE_PREFIX}\"\nqos = 1\n{outbox}",
                data = dir.join("data").display().to_string(),
            ),
        )?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the sensorgate binary")?;
        let log = LogTail::follow(&mut child)?;
        let mut gw = Gateway { child, addr, log };
        gw.log
            .wait_for("MQTT broker listening", "the gateway")
            .await?;
        Ok(gw)
    }

    fn check_alive(&self) -> Result<()> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = std::fs::read_to_string(&path).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            bail!("the gateway exited; its output:\n{}", self.log.tail());
        }
        Ok(())
    }

    fn write_bytes(&self) -> Result<u64> {
        proc_field(self.child.id(), "io", "write_bytes:")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's mosquitto on the gateway's upstream port, closed to anonymous clients until
/// [`Mosquitto::open_gate`].
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
    text: String,
    version: String,
    log: LogTail,
}

impl Mosquitto {
    async fn start(root: &Path, port: u16, messages: u64) -> Result<Mosquitto> {
        let dir = root.join("mosquitto");
        std::fs::create_dir_all(&dir)?;
        let passwords = dir.join("passwords");
        std::fs::write(&passwords, format!("{MOSQ_USER}:{MOSQ_PASSWORD}\n"))?;
        let hashed = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&passwords)
            .status()
            .context("cannot run mosquitto_passwd: apt-get install -y mosquitto")?;
        if !hashed.success() {
            bail!("mosquitto_passwd -U failed: {hashed}");
        }
        let config = dir.join("mosquitto.conf");
        // Inflight and queue limits high enough that mosquitto neither throttles nor drops
        // for the subscriber, the same for the baseline and the drain.
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             max_inflight_messages 1000\nmax_queued_messages {}\npersistence false\n\
             set_tcp_nodelay true\nlog_dest stderr\nconnection_messages false\n",
            passwords.display(),
            messages * 2 + 1000
        );
        std::fs::write(&config, &text)?;
        let exe = mosquitto_exe()?;
        let version = mosquitto_version(&exe);
        let mut child = Command::new(exe)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start mosquitto")?;
        let log = LogTail::follow(&mut child)?;
        let mut m = Mosquitto {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            config,
            text,
            version,
            log,
        };
        m.log.wait_for(" running", "mosquitto").await?;
        Ok(m)
    }

    /// Lets anonymous clients (the gateway) in: new configuration, SIGHUP.
    async fn open_gate(&mut self) -> Result<()> {
        let text = self
            .text
            .replace("allow_anonymous false", "allow_anonymous true");
        std::fs::write(&self.config, text)?;
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            bail!("SIGHUP to mosquitto: {}", std::io::Error::last_os_error());
        }
        self.log.wait_for("Reloading config", "mosquitto").await
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Load clients

/// One raw MQTT 3.1.1 connection: packets to send are encoded into `wbuf` and written by
/// `flush`; reads land in `rbuf` in large chunks.
struct Conn {
    name: String,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    async fn open(addr: SocketAddr, client_id: &str, user: Option<&str>) -> Result<Conn> {
        let stream = timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("{client_id}: TCP connect to {addr} timed out"))?
            .with_context(|| format!("{client_id}: cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut conn = Conn {
            name: client_id.to_owned(),
            rd,
            wr,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(64 * 1024),
        };
        let connect = Connect {
            protocol: ProtocolLevel::V311,
            clean_session: true,
            keep_alive: KEEP_ALIVE,
            client_id: client_id.to_owned(),
            will: None,
            username: user.map(str::to_owned),
            password: user.map(|_| Bytes::from_static(MOSQ_PASSWORD.as_bytes())),
        };
        encode(&Packet::Connect(connect), &mut conn.wbuf);
        conn.flush().await?;
        match conn.next_packet("CONNACK").await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Accepted,
                ..
            }) => Ok(conn),
            other => bail!("{client_id}: expected an accepting CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Result<()> {
        let sub = Subscribe {
            pkid: 1,
            filters: filters.iter().map(|(f, q)| ((*f).to_owned(), *q)).collect(),
        };
        encode(&Packet::Subscribe(sub), &mut self.wbuf);
        self.flush().await?;
        match self.next_packet("SUBACK").await? {
            Packet::SubAck(ack)
                if ack.pkid == 1 && ack.codes.iter().all(|c| *c != SubAckCode::Failure) =>
            {
                Ok(())
            }
            other => bail!("{}: expected SUBACK, got {other:?}", self.name),
        }
    }

    async fn flush(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        timeout(IO_TIMEOUT, self.wr.write_all(&self.wbuf))
            .await
            .map_err(|_| anyhow!("{}: the peer stopped reading for {IO_TIMEOUT:?}", self.name))?
            .with_context(|| format!("{}: write failed", self.name))?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads whatever the socket has (at least one byte) within `IO_TIMEOUT`; fails on EOF.
    async fn read_some(&mut self, waiting_for: &str) -> Result<()> {
        self.rbuf.reserve(READ_CHUNK);
        let n = timeout(IO_TIMEOUT, self.rd.read_buf(&mut self.rbuf))
            .await
            .map_err(|_| anyhow!("{}: no {waiting_for} within {IO_TIMEOUT:?}", self.name))?
            .with_context(|| format!("{}: read failed", self.name))?;
        if n == 0 {
            bail!(
                "{}: the peer closed the connection while the client waited for {waiting_for}",
                self.name
            );
        }
        Ok(())
    }

    fn try_packet(&mut self) -> Result<Option<Packet>> {
        decode(&mut self.rbuf, MAX_PACKET).map_err(|e| anyhow!("{}: bad packet: {e}", self.name))
    }

    async fn next_packet(&mut self, what: &str) -> Result<Packet> {
        loop {
            if let Some(p) = self.try_packet()? {
                return Ok(p);
            }
            self.read_some(what).await?;
        }
    }

    async fn disconnect(mut self) -> Result<()> {
        encode(&Packet::Disconnect, &mut self.wbuf);
        self.flush().await?;
        let _ = self.wr.shutdown().await;
        Ok(())
    }
}

/// Payload: publisher number, sequence number, zeros up to `PAYLOAD_LEN`.
fn put_payload(out: &mut BytesMut, publisher: u32, seq: u64) {
    let mut p = [0u8; PAYLOAD_LEN];
    p[0..4].copy_from_slice(&publisher.to_le_bytes());
    p[4..12].copy_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&p);
}

/// Publishes `count` QoS 1 messages on `topic` with at most `window` unacknowledged, at
/// `rate` msg/s if given; returns once every PUBACK is back.
async fn publish(
    mut conn: Conn,
    topic: String,
    publisher: u32,
    count: u64,
    window: usize,
    rate: Option<u64>,
) -> Result<()> {
    let mut head = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic,
        pkid: 0,
        payload: Bytes::from_static(&[0; PAYLOAD_LEN]),
    };
    let mut in_flight = vec![false; usize::from(u16::MAX) + 1];
    // Pacing: `per_tick` messages per tick of at least 1 ms.
    let (tick, per_tick) = match rate {
        Some(r) => {
            let per_tick = (r / 1000).max(1);
            (
                Duration::from_secs_f64(per_tick as f64 / r as f64),
                per_tick,
            )
        }
        None => (Duration::from_secs(3600), count),
    };
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut due = if rate.is_some() { 0 } else { count };
    let (mut sent, mut acked, mut outstanding) = (0u64, 0u64, 0usize);
    let mut pkid: u16 = 0;
    while acked < count {
        while sent < due && outstanding < window {
            pkid = pkid.checked_add(1).unwrap_or(1);
            if in_flight[usize::from(pkid)] {
                bail!("{}: packet id {pkid} still in flight", conn.name);
            }
            in_flight[usize::from(pkid)] = true;
            head.pkid = pkid;
            outstanding += 1;
            encode_publish_head(&head, &mut conn.wbuf);
            put_payload(&mut conn.wbuf, publisher, sent);
            sent += 1;
        }
        conn.flush().await?;
        let want_tick = due < count && outstanding < window;
        tokio::select! {
            _ = ticker.tick(), if want_tick => due = (due + per_tick).min(count),
            r = conn.read_some("PUBACK"), if outstanding > 0 => {
                r?;
                while let Some(p) = conn.try_packet()? {
                    match p {
                        Packet::PubAck(id) if in_flight[usize::from(id)] => {
                            in_flight[usize::from(id)] = false;
                            outstanding -= 1;
                            acked += 1;
                        }
                        other => bail!("{}: unexpected {other:?}", conn.name),
                    }
                }
            }
        }
    }
    conn.disconnect().await
}

/// `publishers` clients publish `per` messages each to the gateway on `bench/<i>`; returns the
/// time from the first PUBLISH to the last PUBACK.
async fn publish_local(
    addr: SocketAddr,
    publishers: u32,
    per: u64,
    window: usize,
    rate: Option<u64>,
) -> Result<Duration> {
    let mut conns = Vec::new();
    for i in 0..publishers {
        conns.push(Conn::open(addr, &format!("local-pub-{i}"), None).await?);
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, c) in conns.into_iter().enumerate() {
        tasks.spawn(publish(
            c,
            format!("bench/{i}"),
            i as u32,
            per,
            window,
            rate,
        ));
    }
    while let Some(r) = tasks.join_next().await {
        r.context("publisher task panicked")??;
    }
    Ok(started.elapsed())
}

/// The baseline: one raw client publishes `n` messages straight to mosquitto with the
/// gateway's window while a subscriber counts them; messages per second at the subscriber.
async fn baseline(addr: SocketAddr, n: u64, round: u32) -> Result<f64> {
    let mut sub = Conn::open(addr, &format!("baseline-sub-{round}"), Some(MOSQ_USER)).await?;
    sub.subscribe(&[(&format!("b{round}/#"), QoS::AtLeastOnce)])
        .await?;
    let publisher = Conn::open(addr, &format!("baseline-pub-{round}"), Some(MOSQ_USER)).await?;
    let receiver = tokio::spawn(receive(sub, 1, n, None));
    let started = Instant::now();
    // The same topic length as the gateway's upstream topics (`up/bench/0`).
    publish(
        publisher,
        format!("b{round}/bench/0"),
        0,
        n,
        usize::from(UPSTREAM_INFLIGHT),
        None,
    )
    .await?;
    let got = receiver.await.context("subscriber panicked")??;
    Ok(n as f64 / got.last_at.duration_since(started).as_secs_f64())
}

struct Received {
    last_at: Instant,
    online_at: Option<Instant>,
    out_of_order: u64,
}

/// Receives `expected` messages from `publishers` publishers (QoS 1, acknowledged in batches),
/// checking the order per publisher; notes when `status` says `online`.
async fn receive(
    mut conn: Conn,
    publishers: u32,
    expected: u64,
    status: Option<String>,
) -> Result<Received> {
    let mut next_seq = vec![0u64; publishers as usize];
    let (mut count, mut out_of_order) = (0u64, 0u64);
    let mut online_at = None;
    let mut last_at = Instant::now();
    while count < expected {
        conn.read_some("PUBLISH").await.with_context(|| {
            format!("after {count} of {expected} messages (stalled, or mosquitto dropped some)")
        })?;
        let now = Instant::now();
        while let Some(p) = conn.try_packet()? {
            let Packet::Publish(p) = p else {
                bail!("{}: unexpected {p:?}", conn.name);
            };
            if p.qos == QoS::AtLeastOnce {
                encode(&Packet::PubAck(p.pkid), &mut conn.wbuf);
            }
            if status.as_deref() == Some(p.topic.as_str()) {
                if &p.payload[..] == b"online" && online_at.is_none() {
                    online_at = Some(now);
                }
                continue;
            }
            let (publisher, seq) = (p.payload.len() == PAYLOAD_LEN)
                .then(|| {
                    let publisher = u32::from_le_bytes(p.payload[0..4].try_into().ok()?);
                    let seq = u64::from_le_bytes(p.payload[4..12].try_into().ok()?);
                    Some((publisher, seq))
                })
                .flatten()
                .filter(|(publisher, _)| *publisher < publishers)
                .ok_or_else(|| anyhow!("{}: foreign PUBLISH on {}", conn.name, p.topic))?;
            let next = &mut next_seq[publisher as usize];
            if seq < *next {
                out_of_order += 1;
            }
            *next = seq + 1;
            count += 1;
            last_at = now;
        }
        conn.flush().await?;
    }
    conn.disconnect().await?;
    Ok(Received {
        last_at,
        online_at,
        out_of_order,
    })
}
