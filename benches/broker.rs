//! The broker benchmark: the same MQTT 3.1.1 load against sensorgate's broker and Eclipse
//! Mosquitto in one run, printed as a Markdown table with the ratio of the two.
//!
//! ```text
//! cargo bench --bench broker                              # full run, a few minutes
//! cargo bench --bench broker -- --quick                   # smoke run, seconds
//! SENSORGATE_BENCH_QUICK=1 cargo bench --bench broker     # the same
//! SENSORGATE_BENCH_SIDE_A=mosquitto cargo bench --bench broker   # mosquitto on both sides
//! ```
//!
//! Both brokers run as child processes on free loopback ports with the same limits (inflight
//! window, queue length, no persistence, warnings-only logging). The load clients are raw tokio
//! TCP clients in this process: they pre-encode and batch their writes and read in large chunks,
//! so that the client side is not the bottleneck; they still share the machine's cores with the
//! brokers, which the report says.

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use common::{free_port, group, mosquitto_exe, mosquitto_version};
use sensorgate::broker::codec::{
    ConnAck, Connect, ConnectReturnCode, Packet, ProtocolLevel, Publish, QoS, SubAckCode,
    Subscribe, decode, encode, encode_publish_head,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, sleep_until, timeout};

/// The broker compared with mosquitto; `SENSORGATE_BENCH_SIDE_A=mosquitto` runs mosquitto
/// against itself, which shows how much the machine's noise alone moves the ratios.
const DEFAULT_SIDE_A: BrokerKind = BrokerKind::Sensorgate;

/// The broker's outgoing inflight window, the same for both (`max_inflight_messages`).
const MAX_INFLIGHT: u16 = 100;
/// Messages a broker may queue per client beyond the inflight window (`max_queued_messages`):
/// above any case's total, so that the QoS 1/2 cases measure delivery, not the drop policy of a
/// full queue (publishers are acknowledged on receipt and may run far ahead of the subscriber).
const MAX_QUEUED: usize = 1_000_000;
/// Unacknowledged QoS 1/2 PUBLISHes a load publisher keeps outstanding.
const PUBLISH_WINDOW: usize = 64;
/// QoS 0 PUBLISHes encoded into one write.
const WRITE_BATCH: usize = 128;
const PAYLOAD_LEN: usize = 64;
const PUBLISHERS: u32 = 4;
/// Per-read buffer room: large reads keep the clients' syscall count low.
const READ_CHUNK: usize = 256 * 1024;
const MAX_PACKET: usize = 1024 * 1024;
/// Longest wait for any single network event before the bench gives up on a broker.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// After the QoS 0 publishers finish, this much silence means every surviving message arrived.
const QOS0_QUIET: Duration = Duration::from_millis(500);
/// Keep-alive of the load clients; longer than any case.
const LOAD_KEEP_ALIVE: u16 = 600;
/// Keep-alive of the idle connections.
const IDLE_KEEP_ALIVE: u16 = 3600;
/// Connections opened concurrently in the idle case; below both brokers' listen backlogs.
const IDLE_OPENERS: usize = 32;
const LATENCY_RATE: u64 = 1000;

/// How much load each case applies.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    /// Messages per publisher in the 4 → 1 throughput cases, by QoS 0, 1, 2.
    pub throughput_msgs: [u64; 3],
    /// Messages of the single fan-out publisher, QoS 0 and QoS 1.
    pub fanout_msgs: [u64; 2],
    pub fanout_subs: usize,
    /// Messages sent at `LATENCY_RATE` per second.
    pub latency_msgs: u64,
    pub idle_conns: usize,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            quick: false,
            throughput_msgs: [250_000, 50_000, 25_000],
            fanout_msgs: [20_000, 5_000],
            fanout_subs: 50,
            latency_msgs: 5_000,
            idle_conns: 5_000,
        }
    }

    /// A smoke run of a few seconds: every case, tiny loads; the numbers mean little.
    pub fn quick() -> Plan {
        Plan {
            quick: true,
            throughput_msgs: [2_000, 1_000, 500],
            fanout_msgs: [200, 100],
            fanout_subs: 50,
            latency_msgs: 300,
            idle_conns: 500,
        }
    }

    pub fn from_env_and_args() -> Plan {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("SENSORGATE_BENCH_QUICK").is_ok_and(|v| v == "1");
        if quick { Plan::quick() } else { Plan::full() }
    }
}

fn main() {
    let plan = Plan::from_env_and_args();
    common::report("broker", || run(&plan));
}

/// Starts both brokers, runs every case against each and returns the Markdown report.
pub fn run(plan: &Plan) -> Result<String> {
    raise_fd_limit(plan.idle_conns * 2 + 1024)?;
    let side_a = match std::env::var("SENSORGATE_BENCH_SIDE_A").as_deref() {
        Ok("sensorgate") => BrokerKind::Sensorgate,
        Ok("mosquitto") => BrokerKind::Mosquitto,
        Ok(other) => bail!("SENSORGATE_BENCH_SIDE_A must be sensorgate or mosquitto, not {other}"),
        Err(_) => DEFAULT_SIDE_A,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.max(2))
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let a = BrokerProcess::start(side_a, "A").await?;
        let b = BrokerProcess::start(BrokerKind::Mosquitto, "B").await?;
        let mut rows = Vec::new();
        for (i, case) in Case::all().into_iter().enumerate() {
            // Alternate who goes first, so that drift in the machine's load favours neither.
            let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            let m1 = measure(case, first, plan).await?;
            let m2 = measure(case, second, plan).await?;
            let (ma, mb) = if i % 2 == 0 { (m1, m2) } else { (m2, m1) };
            for ((spec, va), vb) in case.rows(plan).into_iter().zip(ma).zip(mb) {
                rows.push(Row { spec, a: va, b: vb });
            }
        }
        let (peak_a, peak_b) = (a.memory()?.peak_kib, b.memory()?.peak_kib);
        rows.push(Row {
            spec: RowSpec {
                name: "Peak RSS over the run (VmHWM)".into(),
                unit: "MiB",
                better: Better::Lower,
            },
            a: Measure::plain(kib_to_mib(peak_a)),
            b: Measure::plain(kib_to_mib(peak_b)),
        });
        Ok(render(plan, &a, &b, cores, &rows))
    })
}

// ---------------------------------------------------------------------------------------------
// Cases and the report

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Throughput(QoS),
    FanOut(QoS),
    Latency,
    Idle,
}

impl Case {
    fn all() -> Vec<Case> {
        vec![
            Case::Throughput(QoS::AtMostOnce),
            Case::Throughput(QoS::AtLeastOnce),
            Case::Throughput(QoS::ExactlyOnce),
            Case::FanOut(QoS::AtMostOnce),
            Case::FanOut(QoS::AtLeastOnce),
            Case::Latency,
            Case::Idle,
        ]
    }

    /// The table rows this case fills, in the order `measure` returns their values.
    fn rows(self, plan: &Plan) -> Vec<RowSpec> {
        let row = |name: String, unit, better| RowSpec { name, unit, better };
        let cpu = |name: &str| row(format!("{name}: broker CPU"), "µs/delivery", Better::Lower);
        match self {
            Case::Throughput(qos) => {
                let name = format!(
                    "Throughput QoS {}, {PUBLISHERS} pub → 1 sub, {PAYLOAD_LEN} B, {} msgs",
                    qos.as_u8(),
                    group(u64::from(PUBLISHERS) * plan.throughput_msgs[usize::from(qos.as_u8())])
                );
                vec![row(name.clone(), "msg/s", Better::Higher), cpu(&name)]
            }
            Case::FanOut(qos) => {
                let name = format!(
                    "Fan-out QoS {}, 1 pub → {} subs, {} msgs",
                    qos.as_u8(),
                    plan.fanout_subs,
                    group(plan.fanout_msgs[usize::from(qos.as_u8())])
                );
                vec![
                    row(name.clone(), "deliveries/s", Better::Higher),
                    cpu(&name),
                ]
            }
            Case::Latency => ["p50", "p99"]
                .into_iter()
                .map(|p| {
                    row(
                        format!(
                            "Latency {p}, QoS 1, 1 pub → 1 sub at {} msg/s",
                            group(LATENCY_RATE)
                        ),
                        "µs",
                        Better::Lower,
                    )
                })
                .collect(),
            Case::Idle => vec![
                row(
                    format!(
                        "{} idle connections: time to connect all",
                        group(plan.idle_conns as u64)
                    ),
                    "ms",
                    Better::Lower,
                ),
                row(
                    format!(
                        "RSS with {} idle connections (VmRSS)",
                        group(plan.idle_conns as u64)
                    ),
                    "MiB",
                    Better::Lower,
                ),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

struct RowSpec {
    name: String,
    unit: &'static str,
    better: Better,
}

/// One measured value, with what the reader must know about it (losses, reordering).
struct Measure {
    value: f64,
    note: Option<String>,
}

impl Measure {
    fn plain(value: f64) -> Measure {
        Measure { value, note: None }
    }
}

struct Row {
    spec: RowSpec,
    a: Measure,
    b: Measure,
}

async fn measure(case: Case, broker: &BrokerProcess, plan: &Plan) -> Result<Vec<Measure>> {
    let context = || format!("{case:?} against {}", broker.title());
    let cpu_before = broker.cpu_time()?;
    let values = match case {
        Case::Throughput(qos) => {
            let flow = run_flow(
                broker.addr,
                &FlowSpec {
                    tag: format!("tp{}", qos.as_u8()),
                    qos,
                    publishers: PUBLISHERS,
                    subscribers: 1,
                    per_publisher: plan.throughput_msgs[usize::from(qos.as_u8())],
                    pace: None,
                    keep_latencies: false,
                },
            )
            .await
            .with_context(context)?;
            let cpu = broker.cpu_time()? - cpu_before;
            vec![flow.rate_measure(), flow.cpu_measure(cpu)]
        }
        Case::FanOut(qos) => {
            let flow = run_flow(
                broker.addr,
                &FlowSpec {
                    tag: format!("fo{}", qos.as_u8()),
                    qos,
                    publishers: 1,
                    subscribers: plan.fanout_subs,
                    per_publisher: plan.fanout_msgs[usize::from(qos.as_u8())],
                    pace: None,
                    keep_latencies: false,
                },
            )
            .await
            .with_context(context)?;
            let cpu = broker.cpu_time()? - cpu_before;
            vec![flow.rate_measure(), flow.cpu_measure(cpu)]
        }
        Case::Latency => {
            let mut flow = run_flow(
                broker.addr,
                &FlowSpec {
                    tag: "lat".into(),
                    qos: QoS::AtLeastOnce,
                    publishers: 1,
                    subscribers: 1,
                    per_publisher: plan.latency_msgs,
                    pace: Some(Duration::from_nanos(1_000_000_000 / LATENCY_RATE)),
                    keep_latencies: true,
                },
            )
            .await
            .with_context(context)?;
            flow.latencies_ns.sort_unstable();
            let v = &flow.latencies_ns;
            let pct = |p: usize| v[(v.len() * p / 100).min(v.len() - 1)] as f64 / 1000.0;
            vec![Measure::plain(pct(50)), Measure::plain(pct(99))]
        }
        Case::Idle => {
            let started = Instant::now();
            let conns = open_idle(broker.addr, plan.idle_conns)
                .await
                .with_context(context)?;
            let took = started.elapsed();
            let rss = broker.memory()?.rss_kib;
            drop(conns);
            vec![
                Measure::plain(took.as_secs_f64() * 1000.0),
                Measure::plain(kib_to_mib(rss)),
            ]
        }
    };
    let shown: Vec<String> = values.iter().map(|m| format!("{:.1}", m.value)).collect();
    eprintln!(
        "{:<24} {:<32} {}",
        format!("{case:?}"),
        broker.title(),
        shown.join(" / ")
    );
    Ok(values)
}

fn render(plan: &Plan, a: &BrokerProcess, b: &BrokerProcess, cores: usize, rows: &[Row]) -> String {
    let mut out = String::new();
    let ours = a.kind == BrokerKind::Sensorgate;
    let a_head = if ours {
        a.version.clone()
    } else {
        format!("{} (standing in for sensorgate)", a.version)
    };
    let ratio_head = if ours {
        "ratio sensorgate / mosquitto"
    } else {
        "ratio A / B"
    };
    let _ = writeln!(
        out,
        "\n### Broker benchmark{}\n",
        if plan.quick {
            " (quick smoke run: loads too small to compare)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "| case | unit | A: {a_head} | B: {} | {ratio_head} | better |",
        b.version
    );
    let _ = writeln!(out, "| --- | --- | ---: | ---: | ---: | --- |");
    for r in rows {
        let cell = |m: &Measure| match &m.note {
            Some(n) => format!("{} ({n})", number(m.value)),
            None => number(m.value),
        };
        let ratio = if r.b.value > 0.0 {
            format!("{:.2}", r.a.value / r.b.value)
        } else {
            "–".into()
        };
        let better = match r.spec.better {
            Better::Higher => "higher (ratio > 1: A better)",
            Better::Lower => "lower (ratio < 1: A better)",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {ratio} | {better} |",
            r.spec.name,
            r.spec.unit,
            cell(&r.a),
            cell(&r.b)
        );
    }
    let _ = writeln!(
        out,
        "\nMachine: {cores} core(s), shared by the load clients (tokio, {} worker threads, this \
         process) and the broker under test; both brokers run throughout, one is loaded at a time, \
         and the order alternates per case. Limits on both: max inflight {MAX_INFLIGHT}, max \
         queued {MAX_QUEUED}, no persistence, TCP_NODELAY. QoS 1/2 publishers keep {PUBLISH_WINDOW} \
         PUBLISHes outstanding. Rates count messages received by subscribers from the first \
         publish to the last delivery; broker CPU is user + system time of the broker process \
         (all threads) over the case, per delivered message, which depends less than the rates on \
         what else runs on the machine.\n\nCommand: `cargo bench --bench broker{}`",
        cores.max(2),
        if plan.quick { " -- --quick" } else { "" }
    );
    out
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A value for the table: integers with thousands separators, small values with decimals.
fn number(v: f64) -> String {
    if v >= 100.0 {
        group(v.round() as u64)
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

// ---------------------------------------------------------------------------------------------
// Broker processes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Sensorgate,
    Mosquitto,
}

/// A broker child process on a free loopback port; killed when dropped.
pub struct BrokerProcess {
    kind: BrokerKind,
    side: &'static str,
    version: String,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

struct Memory {
    rss_kib: u64,
    peak_kib: u64,
}

impl BrokerProcess {
    async fn start(kind: BrokerKind, side: &'static str) -> Result<BrokerProcess> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.path().join("broker.log");
        let log_file = std::fs::File::create(&log).context("cannot create the broker log")?;
        let (mut cmd, version) = match kind {
            BrokerKind::Sensorgate => {
                let config = dir.path().join("sensorgate.toml");
                let data = dir.path().join("data");
                std::fs::write(
                    &config,
                    format!(
                        "data-dir = {data:?}\n\n[log]\nlevel = \"warn\"\n\n[broker]\n\
                         max-connections = 20000\nmax-inflight = {MAX_INFLIGHT}\n\
                         max-queued = {MAX_QUEUED}\npersistence = false\n\n\
                         [[broker.listener]]\nbind = \"{addr}\"\n"
                    ),
                )?;
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorgate"));
                cmd.arg("run").arg("--config").arg(&config);
                cmd.env_remove("RUST_LOG");
                (cmd, format!("sensorgate {}", env!("CARGO_PKG_VERSION")))
            }
            BrokerKind::Mosquitto => {
                let exe = mosquitto_exe()?;
                let config = dir.path().join("mosquitto.conf");
                std::fs::write(
                    &config,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\n\
                         max_inflight_messages {MAX_INFLIGHT}\nmax_queued_messages {MAX_QUEUED}\n\
                         persistence false\nset_tcp_nodelay true\nmax_connections -1\n\
                         log_dest stderr\nlog_type error\nlog_type warning\n\
                         connection_messages false\n"
                    ),
                )?;
                let version = mosquitto_version(&exe);
                let mut cmd = Command::new(exe);
                cmd.arg("-c").arg(&config);
                (cmd, version)
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {kind:?}"))?;
        let mut broker = BrokerProcess {
            kind,
            side,
            version,
            child,
            addr,
            log,
            _dir: dir,
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    fn title(&self) -> String {
        format!("{} ({})", self.version, self.side)
    }

    /// Polls until the broker accepts TCP connections, then checks it answers CONNECT.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited at start-up ({status}); its output:\n{}",
                    self.title(),
                    self.log_tail()
                );
            }
            if TcpStream::connect(self.addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept connections on {} within {IO_TIMEOUT:?}; its output:\n{}",
                    self.title(),
                    self.addr,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let probe = Conn::open(self.addr, &format!("probe-{}", self.side), LOAD_KEEP_ALIVE)
            .await
            .with_context(|| {
                format!(
                    "{} accepts TCP on {} but does not complete an MQTT CONNECT",
                    self.title(),
                    self.addr
                )
            })?;
        probe.disconnect().await
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn memory(&self) -> Result<Memory> {
        let path = format!("/proc/{}/status", self.child.id());
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| anyhow!("no {name} in {path}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            peak_kib: field("VmHWM:")?,
        })
    }
}

impl BrokerProcess {
    /// User plus system CPU time of the broker so far, all threads, at clock-tick resolution.
    fn cpu_time(&self) -> Result<Duration> {
        common::cpu_time(self.child.id())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's open-file limit (inherited by the brokers) to the hard limit.
fn raise_fd_limit(needed: usize) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    if (lim.rlim_cur as u128) < needed as u128 {
        bail!(
            "the open-file limit is {} but the bench needs {needed}; raise the hard limit (nofile)",
            lim.rlim_cur
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Load clients

/// One client connection with its buffers: reads land in `rbuf`, packets to send are encoded into
/// `wbuf` and written in one call by `flush`.
struct Conn {
    name: String,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    async fn open(addr: SocketAddr, client_id: &str, keep_alive: u16) -> Result<Conn> {
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
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
        };
        let connect = Connect {
            protocol: ProtocolLevel::V311,
            clean_session: true,
            keep_alive,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
        };
        encode(&Packet::Connect(connect), &mut conn.wbuf);
        conn.flush().await?;
        match conn.next_packet("CONNACK").await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Accepted,
                ..
            }) => Ok(conn),
            Packet::ConnAck(ack) => {
                bail!("{client_id}: the broker refused CONNECT: {:?}", ack.code)
            }
            other => bail!("{client_id}: expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<()> {
        let sub = Subscribe {
            pkid: 1,
            filters: vec![(filter.to_owned(), qos)],
        };
        encode(&Packet::Subscribe(sub), &mut self.wbuf);
        self.flush().await?;
        match self.next_packet("SUBACK").await? {
            Packet::SubAck(ack) if ack.pkid == 1 && ack.codes == [SubAckCode::Granted(qos)] => {
                Ok(())
            }
            other => bail!(
                "{}: expected SUBACK granting {qos:?}, got {other:?}",
                self.name
            ),
        }
    }

    async fn flush(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        timeout(IO_TIMEOUT, self.wr.write_all(&self.wbuf))
            .await
            .map_err(|_| {
                anyhow!(
                    "{}: the broker stopped reading for {IO_TIMEOUT:?}",
                    self.name
                )
            })?
            .with_context(|| format!("{}: write failed", self.name))?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads whatever the socket has (at least one byte); fails on EOF.
    async fn read_some(&mut self, waiting_for: &str) -> Result<()> {
        self.rbuf.reserve(READ_CHUNK);
        let n = self
            .rd
            .read_buf(&mut self.rbuf)
            .await
            .with_context(|| format!("{}: read failed", self.name))?;
        if n == 0 {
            bail!(
                "{}: the broker closed the connection while the client waited for {waiting_for}",
                self.name
            );
        }
        Ok(())
    }

    /// The next complete packet already read, if any.
    fn try_packet(&mut self) -> Result<Option<Packet>> {
        decode(&mut self.rbuf, MAX_PACKET)
            .map_err(|e| anyhow!("{}: bad packet from the broker: {e}", self.name))
    }

    async fn next_packet(&mut self, what: &str) -> Result<Packet> {
        loop {
            if let Some(p) = self.try_packet()? {
                return Ok(p);
            }
            timeout(IO_TIMEOUT, self.read_some(what))
                .await
                .map_err(|_| anyhow!("{}: no {what} within {IO_TIMEOUT:?}", self.name))??;
        }
    }

    /// Sends DISCONNECT and closes the connection.
    async fn disconnect(mut self) -> Result<()> {
        encode(&Packet::Disconnect, &mut self.wbuf);
        self.flush().await?;
        let _ = self.wr.shutdown().await;
        Ok(())
    }

    /// Sends DISCONNECT and waits for the broker to close, which proves it read all we sent
    /// (a QoS 0 publisher has no other proof).
    async fn disconnect_and_wait_for_close(mut self) -> Result<()> {
        encode(&Packet::Disconnect, &mut self.wbuf);
        self.flush().await?;
        let _ = self.wr.shutdown().await;
        let deadline = tokio::time::Instant::now() + IO_TIMEOUT * 3;
        loop {
            self.rbuf.clear();
            self.rbuf.reserve(READ_CHUNK);
            match tokio::time::timeout_at(deadline, self.rd.read_buf(&mut self.rbuf)).await {
                Err(_) => bail!(
                    "{}: the broker did not close the connection within {:?} of DISCONNECT",
                    self.name,
                    IO_TIMEOUT * 3
                ),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// One many-to-many message flow: publishers on `bench/<tag>/<n>`, subscribers on `bench/<tag>/+`.
struct FlowSpec {
    tag: String,
    qos: QoS,
    publishers: u32,
    subscribers: usize,
    per_publisher: u64,
    /// Send one message per period instead of as fast as the window allows.
    pace: Option<Duration>,
    keep_latencies: bool,
}

struct FlowResult {
    qos: QoS,
    /// Messages each subscriber should have received.
    expected_each: u64,
    subscribers: u64,
    delivered: u64,
    /// Messages that arrived with a lower sequence number than one before them (duplicates or
    /// reordering within one publisher's stream).
    out_of_order: u64,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
}

impl FlowResult {
    fn rate_measure(&self) -> Measure {
        let value = self.delivered as f64 / self.elapsed.as_secs_f64();
        let mut notes = Vec::new();
        let lost = (self.expected_each * self.subscribers).saturating_sub(self.delivered);
        if self.qos == QoS::AtMostOnce {
            notes.push(format!("lost {}", group(lost)));
        }
        if self.out_of_order > 0 {
            notes.push(format!("{} out of order", group(self.out_of_order)));
        }
        Measure {
            value,
            note: (!notes.is_empty()).then(|| notes.join(", ")),
        }
    }

    /// Broker CPU time (user + system, all threads) per delivered message, in µs.
    fn cpu_measure(&self, cpu: Duration) -> Measure {
        Measure::plain(cpu.as_secs_f64() * 1e6 / self.delivered as f64)
    }
}

async fn run_flow(addr: SocketAddr, spec: &FlowSpec) -> Result<FlowResult> {
    let tag = &spec.tag;
    let mut subs = Vec::new();
    for i in 0..spec.subscribers {
        let mut c = Conn::open(addr, &format!("{tag}-sub-{i}"), LOAD_KEEP_ALIVE).await?;
        c.subscribe(&format!("bench/{tag}/+"), spec.qos).await?;
        subs.push(c);
    }
    let mut pubs = Vec::new();
    for i in 0..spec.publishers {
        pubs.push(Conn::open(addr, &format!("{tag}-pub-{i}"), LOAD_KEEP_ALIVE).await?);
    }
    let expected = spec.per_publisher * u64::from(spec.publishers);
    let (done_tx, done_rx) = watch::channel(false);
    let t0 = Instant::now();
    let mut sub_tasks = JoinSet::new();
    for c in subs {
        sub_tasks.spawn(receive(
            c,
            Expected {
                qos: spec.qos,
                messages: expected,
                publishers: spec.publishers,
                keep_latencies: spec.keep_latencies,
            },
            done_rx.clone(),
            t0,
        ));
    }
    let mut pub_tasks = JoinSet::new();
    for (i, c) in pubs.into_iter().enumerate() {
        pub_tasks.spawn(publish(
            c,
            format!("bench/{tag}/{i}"),
            spec.qos,
            i as u32,
            spec.per_publisher,
            spec.pace,
            t0,
        ));
    }
    while let Some(r) = pub_tasks.join_next().await {
        r.context("publisher task panicked")??;
    }
    let _ = done_tx.send(true);
    let mut result = FlowResult {
        qos: spec.qos,
        expected_each: expected,
        subscribers: spec.subscribers as u64,
        delivered: 0,
        out_of_order: 0,
        elapsed: Duration::ZERO,
        latencies_ns: Vec::new(),
    };
    while let Some(r) = sub_tasks.join_next().await {
        let got = r.context("subscriber task panicked")??;
        result.delivered += got.count;
        result.out_of_order += got.out_of_order;
        result.elapsed = result.elapsed.max(got.last_at.duration_since(t0));
        result.latencies_ns.extend(got.latencies_ns);
    }
    if result.delivered == 0 {
        bail!("no message reached any subscriber");
    }
    Ok(result)
}

/// The payload: publisher number, sequence number, send time in ns since the flow's start.
fn fill_payload(out: &mut BytesMut, publisher: u32, seq: u64, sent_ns: u64) {
    let mut p = [0u8; PAYLOAD_LEN];
    p[0..4].copy_from_slice(&publisher.to_le_bytes());
    p[4..12].copy_from_slice(&seq.to_le_bytes());
    p[12..20].copy_from_slice(&sent_ns.to_le_bytes());
    out.extend_from_slice(&p);
}

fn read_payload(p: &[u8]) -> Option<(u32, u64, u64)> {
    if p.len() != PAYLOAD_LEN {
        return None;
    }
    Some((
        u32::from_le_bytes(p[0..4].try_into().ok()?),
        u64::from_le_bytes(p[4..12].try_into().ok()?),
        u64::from_le_bytes(p[12..20].try_into().ok()?),
    ))
}

/// Where a QoS 1/2 PUBLISH of a publisher stands, by packet id.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outgoing {
    Free,
    /// Sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent,
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// Publishes `count` messages, keeping at most `PUBLISH_WINDOW` QoS 1/2 messages unacknowledged,
/// then disconnects (at QoS 0 waiting for the broker to close, its only proof of reading all).
async fn publish(
    mut conn: Conn,
    topic: String,
    qos: QoS,
    publisher: u32,
    count: u64,
    pace: Option<Duration>,
    t0: Instant,
) -> Result<()> {
    let mut head = Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        pkid: 0,
        payload: Bytes::from_static(&[0; PAYLOAD_LEN]),
    };
    let window = if qos == QoS::AtMostOnce {
        usize::MAX
    } else {
        PUBLISH_WINDOW
    };
    let mut state = vec![Outgoing::Free; usize::from(u16::MAX) + 1];
    let mut ticker = tokio::time::interval(pace.unwrap_or(Duration::from_secs(3600)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut due = if pace.is_some() { 0 } else { count };
    let (mut sent, mut done, mut outstanding) = (0u64, 0u64, 0usize);
    let mut pkid: u16 = 0;
    loop {
        let mut batch = 0;
        while sent < due && outstanding < window && batch < WRITE_BATCH {
            if qos != QoS::AtMostOnce {
                pkid = pkid.checked_add(1).unwrap_or(1);
                if state[usize::from(pkid)] != Outgoing::Free {
                    bail!("{}: packet id {pkid} still in flight", conn.name);
                }
                state[usize::from(pkid)] = Outgoing::Sent;
                head.pkid = pkid;
                outstanding += 1;
            }
            encode_publish_head(&head, &mut conn.wbuf);
            fill_payload(
                &mut conn.wbuf,
                publisher,
                sent,
                t0.elapsed().as_nanos() as u64,
            );
            sent += 1;
            batch += 1;
        }
        conn.flush().await?;
        if qos == QoS::AtMostOnce {
            done = sent;
        }
        if done == count {
            break;
        }
        let want_tick = pace.is_some() && due < count && outstanding < window;
        let want_read = outstanding > 0;
        if !want_tick && !want_read {
            continue;
        }
        tokio::select! {
            _ = ticker.tick(), if want_tick => due += 1,
            r = timeout(IO_TIMEOUT, conn.read_some("acknowledgements")), if want_read => {
                r.map_err(|_| anyhow!(
                    "{}: {outstanding} PUBLISHes unacknowledged for {IO_TIMEOUT:?}", conn.name
                ))??;
                while let Some(p) = conn.try_packet()? {
                    let (id, expected_state) = match p {
                        Packet::PubAck(id) if qos == QoS::AtLeastOnce => (id, Outgoing::Sent),
                        Packet::PubRec(id) if qos == QoS::ExactlyOnce => (id, Outgoing::Sent),
                        Packet::PubComp(id) if qos == QoS::ExactlyOnce => (id, Outgoing::Released),
                        other => bail!("{}: unexpected {other:?} at QoS {qos:?}", conn.name),
                    };
                    let slot = &mut state[usize::from(id)];
                    if *slot != expected_state {
                        bail!("{}: acknowledgement {p:?} for a packet id not awaiting it", conn.name);
                    }
                    if matches!(p, Packet::PubRec(_)) {
                        *slot = Outgoing::Released;
                        encode(&Packet::PubRel(id), &mut conn.wbuf);
                    } else {
                        *slot = Outgoing::Free;
                        done += 1;
                        outstanding -= 1;
                    }
                }
            }
        }
    }
    if qos == QoS::AtMostOnce {
        conn.disconnect_and_wait_for_close().await
    } else {
        conn.disconnect().await
    }
}

/// What a subscriber expects from a flow.
struct Expected {
    qos: QoS,
    messages: u64,
    publishers: u32,
    keep_latencies: bool,
}

#[derive(Default)]
struct Received {
    count: u64,
    out_of_order: u64,
    last_at: Option<Instant>,
    latencies_ns: Vec<u64>,
}

struct SubscriberResult {
    count: u64,
    out_of_order: u64,
    last_at: Instant,
    latencies_ns: Vec<u64>,
}

/// Receives until every expected message arrived; at QoS 0, also stops after the publishers
/// finished and the broker stayed quiet for `QOS0_QUIET` (the rest were dropped).
async fn receive(
    mut conn: Conn,
    expect: Expected,
    mut publishers_done: watch::Receiver<bool>,
    t0: Instant,
) -> Result<SubscriberResult> {
    let mut got = Received::default();
    let mut next_seq = vec![0u64; expect.publishers as usize];
    let mut pubs_done = false;
    let mut last_data = tokio::time::Instant::now();
    let mut now = Instant::now();
    loop {
        let before = got.count;
        while let Some(p) = conn.try_packet()? {
            match p {
                Packet::Publish(p) => {
                    let (publisher, seq, sent_ns) = read_payload(&p.payload)
                        .filter(|(publisher, ..)| *publisher < expect.publishers)
                        .ok_or_else(|| anyhow!("{}: foreign PUBLISH on {}", conn.name, p.topic))?;
                    got.count += 1;
                    let next = &mut next_seq[publisher as usize];
                    if seq < *next {
                        got.out_of_order += 1;
                    }
                    *next = seq + 1;
                    if expect.keep_latencies {
                        let at = now.duration_since(t0).as_nanos() as u64;
                        got.latencies_ns.push(at.saturating_sub(sent_ns));
                    }
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => encode(&Packet::PubAck(p.pkid), &mut conn.wbuf),
                        QoS::ExactlyOnce => encode(&Packet::PubRec(p.pkid), &mut conn.wbuf),
                    }
                }
                Packet::PubRel(id) => encode(&Packet::PubComp(id), &mut conn.wbuf),
                other => bail!("{}: unexpected {other:?}", conn.name),
            }
        }
        if got.count > before {
            got.last_at = Some(now);
        }
        conn.flush().await?;
        if got.count >= expect.messages {
            break;
        }
        let qos0_over = pubs_done && expect.qos == QoS::AtMostOnce;
        let limit = if qos0_over { QOS0_QUIET } else { IO_TIMEOUT };
        tokio::select! {
            r = conn.read_some("PUBLISH") => {
                r?;
                now = Instant::now();
                last_data = tokio::time::Instant::now();
            }
            _ = publishers_done.changed(), if !pubs_done => pubs_done = true,
            _ = sleep_until(last_data + limit) => {
                if qos0_over {
                    break;
                }
                bail!(
                    "{}: received {} of {} messages, then nothing for {IO_TIMEOUT:?} \
                     (stalled, or dropped messages from a full queue)",
                    conn.name, got.count, expect.messages
                );
            }
        }
    }
    let result = SubscriberResult {
        count: got.count,
        out_of_order: got.out_of_order,
        last_at: got.last_at.unwrap_or(t0),
        latencies_ns: got.latencies_ns,
    };
    conn.disconnect().await?;
    Ok(result)
}

/// Opens `n` connections, `IDLE_OPENERS` at a time, and returns them once all are CONNACKed.
async fn open_idle(addr: SocketAddr, n: usize) -> Result<Vec<Conn>> {
    let mut tasks = JoinSet::new();
    for opener in 0..IDLE_OPENERS {
        tasks.spawn(async move {
            let mut conns = Vec::new();
            for i in (opener..n).step_by(IDLE_OPENERS) {
                conns.push(Conn::open(addr, &format!("idle-{i}"), IDLE_KEEP_ALIVE).await?);
            }
            Ok::<_, anyhow::Error>(conns)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.context("opener task panicked")??);
    }
    Ok(all)
}
