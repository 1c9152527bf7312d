//! The ingest benchmark: serial frames through the whole gateway (decode, dedupe, map, publish
//! into the broker, acknowledgement back to the node), with pseudo-terminals as serial ports.
//!
//! ```text
//! cargo bench --bench ingest                            # full run
//! cargo bench --bench ingest -- --quick                 # smoke run
//! SENSORGATE_BENCH_QUICK=1 cargo bench --bench ingest   # the same
//! SENSORGATE_BENCH_PACED_SECS=60 cargo bench --bench ingest   # a longer paced run
//! ```
//!
//! The gateway runs in this process (`sensorgate::start`) on its own tokio runtime; the load
//! (pty writers, ack readers) runs on another. Gateway CPU is the on-CPU time of every thread
//! except the load runtime's and the main thread (`/proc/self/task/*/schedstat`), so the
//! figures leave out the load generator; the whole process (`getrusage`) is shown as well.
//!
//! Every frame is a 24-byte `Readings` frame with two readings, which is how much a node sends
//! per report; a frame counts once the gateway's acknowledgement for it is back at the pty,
//! which the gateway sends after both readings were published into the broker.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use common::group;
use sensorgate_wire as wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, timeout};
use tokio_serial::{SerialPort, SerialStream};

/// Bytes of every measured frame on the wire.
const FRAME_LEN: usize = 24;
/// Sequence numbers from here to `SEQ_END` take three varint bytes, so every frame has the
/// same length.
const SEQ_START: u32 = 1 << 14;
const SEQ_END: u32 = 1 << 21;
const BOOT_ID: u32 = 7;
/// Ports written as fast as the gateway takes the bytes.
const THROUGHPUT_PORTS: usize = 4;
/// Ports paced like 115,200-baud UARTs: 11,520 bytes/s is 480 frames of 24 bytes per second.
const PACED_PORTS: usize = 8;
const PACED_FRAMES_PER_SEC: u64 = 115_200 / 10 / FRAME_LEN as u64;
/// Frames written per `write` call when unpaced: about one pty buffer.
const WRITE_FRAMES: usize = 4096 / FRAME_LEN;
const LOAD_THREAD: &str = "sg-load";
const GATEWAY_THREAD: &str = "sg-gateway";
/// Longest wait for any single event before the bench gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Target from the issue: CPU share of 8 paced ports, as a percentage of one core.
const TARGET_PACED_CPU_PCT: f64 = 2.0;

#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    frames_per_port: u32,
    paced_secs: u64,
}

impl Plan {
    fn from_env_and_args() -> Plan {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("SENSORGATE_BENCH_QUICK").is_ok_and(|v| v == "1");
        let mut plan = if quick {
            Plan {
                quick,
                frames_per_port: 5_000,
                paced_secs: 2,
            }
        } else {
            Plan {
                quick,
                frames_per_port: 100_000,
                paced_secs: 10,
            }
        };
        // A longer paced run, e.g. to profile it.
        if let Some(secs) = std::env::var("SENSORGATE_BENCH_PACED_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            plan.paced_secs = secs;
        }
        plan
    }
}

fn main() {
    let plan = Plan::from_env_and_args();
    common::report("ingest", || run(&plan));
}

struct Measured {
    frames: u64,
    wall: Duration,
    gateway_cpu: Duration,
    process_cpu: Duration,
}

fn run(plan: &Plan) -> Result<String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(GATEWAY_THREAD)
        .enable_all()
        .build()
        .context("cannot start the gateway's runtime")?;
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(LOAD_THREAD)
        .enable_all()
        .build()
        .context("cannot start the load runtime")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ingest-bench");
    std::fs::create_dir_all(&root)?;

    eprintln!(
        "throughput: {THROUGHPUT_PORTS} ports, {} frames each, unpaced",
        plan.frames_per_port
    );
    let throughput = measure(
        &gateway_rt,
        &load_rt,
        &root,
        THROUGHPUT_PORTS,
        plan.frames_per_port,
        None,
    )?;
    let paced_frames = u32::try_from(PACED_FRAMES_PER_SEC * plan.paced_secs)?;
    eprintln!(
        "paced: {PACED_PORTS} ports at {PACED_FRAMES_PER_SEC} frames/s for {} s",
        plan.paced_secs
    );
    let paced = measure(
        &gateway_rt,
        &load_rt,
        &root,
        PACED_PORTS,
        paced_frames,
        Some(PACED_FRAMES_PER_SEC),
    )?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(render(plan, cores, &throughput, &paced))
}

fn render(plan: &Plan, cores: usize, t: &Measured, p: &Measured) -> String {
    let mut out = String::new();
    let rate = |m: &Measured| m.frames as f64 / m.wall.as_secs_f64();
    let per_cpu = |m: &Measured, cpu: Duration| m.frames as f64 / cpu.as_secs_f64();
    let share = |m: &Measured, cpu: Duration| cpu.as_secs_f64() / m.wall.as_secs_f64() * 100.0;
    let paced_share = share(p, p.gateway_cpu);
    let _ = writeln!(
        out,
        "\n### Ingest benchmark{}\n",
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
        "| Ingest throughput, {THROUGHPUT_PORTS} ptys unpaced, {} frames of {FRAME_LEN} B | {} frames/s | – | – |",
        group(t.frames),
        group(rate(t).round() as u64)
    );
    let _ = writeln!(
        out,
        "| Ingest per core: frames per gateway CPU-second ({:.0} % of one core busy) | {} frames/CPU-s | – | – |",
        share(t, t.gateway_cpu),
        group(per_cpu(t, t.gateway_cpu).round() as u64)
    );
    let _ = writeln!(
        out,
        "| Same, whole bench process incl. load generator (getrusage) | {} frames/CPU-s | – | – |",
        group(per_cpu(t, t.process_cpu).round() as u64)
    );
    let _ = writeln!(
        out,
        "| Gateway CPU per frame | {:.1} µs | – | – |",
        t.gateway_cpu.as_secs_f64() * 1e6 / t.frames as f64
    );
    let _ = writeln!(
        out,
        "| CPU share, {PACED_PORTS} ports × {PACED_FRAMES_PER_SEC} frames/s (115,200 baud, {FRAME_LEN}-B frames), {} s, gateway | {paced_share:.2} % of one core | < {TARGET_PACED_CPU_PCT} % | {} |",
        plan.paced_secs,
        if paced_share < TARGET_PACED_CPU_PCT {
            "pass"
        } else {
            "FAIL"
        }
    );
    let _ = writeln!(
        out,
        "| Same, whole bench process incl. load generator (getrusage) | {:.2} % of one core | – | – |",
        share(p, p.process_cpu)
    );
    let _ = writeln!(
        out,
        "\nMachine: {cores} core(s), shared by the gateway (in this process, its own 2-thread \
         runtime) and the load generator (another 2-thread runtime writing the pty masters and \
         reading the acknowledgements). A frame counts when its acknowledgement is back, i.e. \
         after it was decoded, deduplicated, mapped to two messages and both were published \
         into the broker (no subscribers; no upstream). Paced ports write one frame per \
         write every 1/{PACED_FRAMES_PER_SEC} s. Gateway CPU: every thread but the load \
         runtime's and main (schedstat, ns). Registry persistence on (default).\n\n\
         Command: `cargo bench --bench ingest{}`",
        if plan.quick { " -- --quick" } else { "" }
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Frames

fn encode(node: u32, seq: u32, body: wire::Body) -> Result<Vec<u8>> {
    let f = wire::Frame::new(wire::Header::new(node, BOOT_ID, seq), body);
    let mut buf = [0u8; wire::MAX_FRAME];
    let bytes = wire::encode(&f, &mut buf).map_err(|e| anyhow!("encoding a frame: {e:?}"))?;
    Ok(bytes.to_vec())
}

fn hello() -> wire::Body {
    let mut sensors = wire::heapless::Vec::new();
    let _ = sensors.push(wire::SensorInfo {
        channel: 0,
        quantity: wire::Quantity::Temperature,
        unit: wire::Unit::DegreeCelsius,
    });
    let _ = sensors.push(wire::SensorInfo {
        channel: 1,
        quantity: wire::Quantity::Humidity,
        unit: wire::Unit::PercentRh,
    });
    wire::Body::Hello(wire::Hello {
        firmware: wire::FirmwareVersion {
            major: 1,
            minor: 0,
            patch: 0,
        },
        report_interval_s: 60,
        sensors,
    })
}

/// Temperature 21.537 °C and humidity 48.125 %: three-byte mantissas, so that with a
/// three-byte sequence number the frame is `FRAME_LEN` bytes.
fn readings(seq: u32) -> Result<wire::Body> {
    let wobble = (seq % 64) as i32;
    let list = [
        wire::Reading::new(0, 21_537 + wobble, -3),
        wire::Reading::new(1, 48_125 - wobble, -3),
    ];
    Ok(wire::Body::Readings(
        wire::Readings::from_slice(&list).ok_or_else(|| anyhow!("two readings fit"))?,
    ))
}

/// `count` consecutive readings frames of `node`, ready to write.
fn readings_frames(node: u32, count: u32) -> Result<Vec<Vec<u8>>> {
    if SEQ_START + count > SEQ_END {
        bail!("at most {} frames per port", SEQ_END - SEQ_START);
    }
    (SEQ_START..SEQ_START + count)
        .map(|seq| {
            let f = encode(node, seq, readings(seq)?)?;
            if f.len() != FRAME_LEN {
                bail!("frame of {} bytes, expected {FRAME_LEN}", f.len());
            }
            Ok(f)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Gateway and ports

/// A pseudo-terminal; the gateway opens `link`, a symlink to the slave side.
struct Pty {
    master: SerialStream,
    _slave: SerialStream,
}

fn pty_at(link: &Path) -> Result<Pty> {
    let (master, slave) = SerialStream::pair().context("cannot open a pseudo-terminal pair")?;
    let target = slave.name().context("the pty slave has no path")?;
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&target, link)?;
    Ok(Pty {
        master,
        _slave: slave,
    })
}

fn config_text(data: &Path, links: &[PathBuf]) -> String {
    let mut text = format!(
        "data-dir = {:?}\ngateway-id = \"bench\"\n\n[log]\nlevel = \"warn\"\n\n\
         [[broker.listener]]\nbind = \"127.0.0.1:0\"\n",
        data.display().to_string()
    );
    for (i, link) in links.iter().enumerate() {
        let _ = write!(
            text,
            "\n[[port]]\nname = \"p{i}\"\npath = {:?}\nbaud = 115200\nprotocol = \"sensorgate\"\n",
            link.display().to_string()
        );
    }
    text
}

/// CPU time of this process's threads, split into the load generator (the load runtime and
/// the main thread) and everything else (the gateway).
fn thread_cpu() -> Result<(Duration, Duration)> {
    let me = std::process::id().to_string();
    let (mut gateway, mut load) = (0u64, 0u64);
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let tid = entry.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        // A thread that ended between read_dir and here simply no longer counts.
        let Ok(sched) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let ns: u64 = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("malformed schedstat of thread {tid}"))?;
        if tid == me || comm.trim().starts_with(LOAD_THREAD) {
            load += ns;
        } else {
            gateway += ns;
        }
    }
    Ok((Duration::from_nanos(gateway), Duration::from_nanos(load)))
}

fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Starts a gateway with `ports` pty ports, sends each node's `Hello` and one readings frame,
/// waits for their publishes and acks, then writes `frames` frames per port (paced at `rate`
/// frames/s, or as fast as they are taken) and waits for every ack.
fn measure(
    gateway_rt: &Runtime,
    load_rt: &Runtime,
    root: &Path,
    ports: usize,
    frames: u32,
    rate: Option<u64>,
) -> Result<Measured> {
    let dir = tempfile::tempdir_in(root)?;
    let links: Vec<PathBuf> = (0..ports)
        .map(|i| dir.path().join(format!("tty{i}")))
        .collect();
    // The pty masters belong to the load runtime's reactor.
    let entered = load_rt.enter();
    let ptys = links
        .iter()
        .map(|l| pty_at(l))
        .collect::<Result<Vec<_>>>()?;
    drop(entered);
    let config = sensorgate::config::parse(
        &config_text(&dir.path().join("data"), &links),
        "bench",
        None,
    )
    .map_err(|e| anyhow!("bench configuration: {e}"))?;
    let gw = gateway_rt
        .block_on(sensorgate::start(config))
        .map_err(|e| anyhow!("the gateway did not start: {e}"))?;
    let stats = gw.port_stats();
    let broker = gw.broker();
    let result = load_rt.block_on(async {
        for (name, s) in &stats {
            let mut rx = s.opened.subscribe();
            timeout(IO_TIMEOUT, rx.wait_for(|&n| n >= 1))
                .await
                .map_err(|_| anyhow!("port {name} did not open within {IO_TIMEOUT:?}"))??;
        }
        let mut sub = broker
            .subscribe("sensors/#", 64)
            .await
            .map_err(|_| anyhow!("the broker stopped"))?;
        let mut halves = Vec::new();
        for (i, pty) in ptys.into_iter().enumerate() {
            let node = i as u32 + 1;
            let (mut rd, mut wr) = tokio::io::split(pty.master);
            wr.write_all(&encode(node, 1, hello())?).await?;
            wr.write_all(&encode(node, 2, readings(2)?)?).await?;
            wait_acks(&mut rd, &mut wire::Accumulator::new(), 1, node).await?;
            for _ in 0..2 {
                let m = timeout(IO_TIMEOUT, sub.recv())
                    .await
                    .map_err(|_| anyhow!("no publish from node {node} within {IO_TIMEOUT:?}"))?
                    .ok_or_else(|| anyhow!("the broker dropped the subscription"))?;
                if !m.topic.starts_with("sensors/") {
                    bail!("unexpected topic {}", m.topic);
                }
            }
            halves.push((node, rd, wr, readings_frames(node, frames)?, pty._slave));
        }
        drop(sub);
        let frames_before: Vec<u64> = stats.iter().map(|(_, s)| s.frames.load(Relaxed)).collect();

        let (gw0, _) = thread_cpu()?;
        let p0 = process_cpu();
        let t0 = Instant::now();
        let mut tasks = JoinSet::new();
        for (node, mut rd, wr, data, slave) in halves {
            tasks.spawn(async move {
                let writer = tokio::spawn(write_frames(wr, data, rate));
                wait_acks(
                    &mut rd,
                    &mut wire::Accumulator::new(),
                    u64::from(frames),
                    node,
                )
                .await?;
                writer.await.context("writer panicked")??;
                drop(slave);
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.context("port task panicked")??;
        }
        let wall = t0.elapsed();
        let (gw1, _) = thread_cpu()?;
        let p1 = process_cpu();
        for ((name, s), before) in stats.iter().zip(frames_before) {
            let got = s.frames.load(Relaxed) - before;
            if got != u64::from(frames) {
                bail!("port {name} decoded {got} frames, {frames} written");
            }
            let errors = s.errors_crc.load(Relaxed)
                + s.errors_framing.load(Relaxed)
                + s.errors_undecodable.load(Relaxed)
                + s.duplicates.load(Relaxed);
            if errors > 0 {
                bail!("port {name}: {errors} errors or duplicates");
            }
        }
        Ok(Measured {
            frames: u64::from(frames) * ports as u64,
            wall,
            gateway_cpu: gw1.saturating_sub(gw0),
            process_cpu: p1.saturating_sub(p0),
        })
    });
    gateway_rt.block_on(gw.shutdown());
    result
}

/// Writes the frames: in pty-buffer-sized writes, or one per tick at `rate` frames/s.
async fn write_frames(
    mut wr: WriteHalf<SerialStream>,
    frames: Vec<Vec<u8>>,
    rate: Option<u64>,
) -> Result<()> {
    match rate {
        None => {
            for chunk in frames.chunks(WRITE_FRAMES) {
                let bytes = chunk.concat();
                timeout(IO_TIMEOUT, wr.write_all(&bytes))
                    .await
                    .map_err(|_| anyhow!("the gateway stopped reading the port"))??;
            }
        }
        Some(r) => {
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / r));
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            for f in &frames {
                tick.tick().await;
                timeout(IO_TIMEOUT, wr.write_all(f))
                    .await
                    .map_err(|_| anyhow!("the gateway stopped reading the port"))??;
            }
        }
    }
    Ok(())
}

/// Reads what the gateway writes back until `n` acks arrived.
async fn wait_acks(
    rd: &mut ReadHalf<SerialStream>,
    acc: &mut wire::Accumulator,
    n: u64,
    node: u32,
) -> Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut acks = 0;
    while acks < n {
        let read = timeout(IO_TIMEOUT, rd.read(&mut buf)).await.map_err(|_| {
            anyhow!("node {node}: {acks} of {n} acks, then nothing for {IO_TIMEOUT:?}")
        })??;
        if read == 0 {
            bail!("node {node}: the pty closed after {acks} of {n} acks");
        }
        for d in acc.feed_iter(&buf[..read]) {
            match d.result {
                Ok(wire::Frame {
                    body: wire::Body::Ack(_),
                    ..
                }) => acks += 1,
                Ok(other) => bail!("node {node}: unexpected frame from the gateway: {other:?}"),
                Err(e) => bail!("node {node}: bad frame from the gateway: {e:?}"),
            }
        }
    }
    Ok(())
}
