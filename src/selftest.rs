//! `sensorgate self-test`: proves that this build works on the machine it runs on, with no
//! hardware, network or configuration: the frame codec, the broker over TCP, the outbox on disk
//! and broker state across a restart. `scripts/test` runs the ARM builds' self-test under
//! qemu-user, so a cross-compiled binary is exercised, not only linked.
//!
//! The gateway runs from an embedded configuration in a temporary directory: broker on
//! 127.0.0.1:0 with persistence, an upstream that accepts TCP and never answers (so what the
//! out-rule stores stays in the outbox), and an outbox that commits quickly.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sensorgate::broker::codec::QoS;
use sensorgate_wire as wire;

/// Bounds each networked step. A native run takes well under a second in all; a debug build
/// under qemu-user on a busy two-core machine takes a few seconds.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Published by the MQTT client, retained, forwarded into the outbox.
const TOPIC: &str = "selftest/temperature";
const PAYLOAD: &str = "21.5";
/// Published in-process with an acknowledgement that waits for the outbox commit.
const DURABLE_TOPIC: &str = "selftest/humidity";
const DURABLE_PAYLOAD: &str = "48";
/// The out-rule's remote prefix: what the outbox records' topics start with.
const REMOTE_PREFIX: &str = "upstream/";

/// The gateway's configuration; `data-dir` and the upstream port are filled in.
const CONFIG: &str = r#"
gateway-id = "selftest"

[broker]
persistence = true

[[broker.listener]]
bind = "127.0.0.1:0"

[upstream]
url = "mqtt://127.0.0.1:UPSTREAM_PORT"
reconnect-min = "1s"

[[upstream.out]]
filter = "selftest/#"
remote-prefix = "upstream/"
qos = 1

[outbox]
commit-delay = "5ms"
"#;

/// A frame encoded on x86_64 by this version of `sensorgate-wire`: every architecture must
/// produce the same bytes (byte order, varints, COBS, CRC table).
const REFERENCE_FRAME: [u8; 22] = [
    0x0a, 0x01, 0x02, 0x07, 0xee, 0xff, 0x83, 0x06, 0x2a, 0x02, 0x06, 0xcc, 0x21, 0xfe, 0x01, 0x5f,
    0x05, 0x50, 0x9e, 0x0f, 0x29, 0x00,
];

/// Runs every check, writes one line per check and a summary; true if all passed.
pub fn run(out: &mut impl Write) -> bool {
    let started = Instant::now();
    let _ = writeln!(
        out,
        "sensorgate {} self-test on {}-{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    let mut report = Report {
        out,
        passed: 0,
        failed: 0,
    };
    report.check("wire", wire_roundtrip());
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(gateway_checks(&mut report)),
        Err(e) => report.check("runtime", Err(e).context("cannot start the async runtime")),
    }
    let ok = report.failed == 0;
    let _ = writeln!(
        report.out,
        "self-test: {} passed, {} failed ({:.1} s)",
        report.passed,
        report.failed,
        started.elapsed().as_secs_f64()
    );
    ok
}

struct Report<'a, W: Write> {
    out: &'a mut W,
    passed: usize,
    failed: usize,
}

impl<W: Write> Report<'_, W> {
    fn check(&mut self, name: &str, result: anyhow::Result<String>) {
        let line = match result {
            Ok(detail) => {
                self.passed += 1;
                format!("PASS  {name:<12}{detail}")
            }
            Err(e) => {
                self.failed += 1;
                format!("FAIL  {name:<12}{e:#}")
            }
        };
        let _ = writeln!(self.out, "{line}");
    }

    /// Checks that cannot run because an earlier one failed count as failures.
    fn not_run(&mut self, names: &[&str], because: &str) {
        for name in names {
            self.check(name, Err(anyhow::anyhow!("not run: {because}")));
        }
    }
}

/// Encode, compare with the reference bytes, decode through the stream accumulator, and see a
/// flipped bit caught by the CRC.
fn wire_roundtrip() -> anyhow::Result<String> {
    ensure!(
        wire::checksum(b"123456789") == 0xE306_9283,
        "CRC-32/ISCSI of \"123456789\" is {:#010x}, not the catalogue's 0xe3069283",
        wire::checksum(b"123456789")
    );
    let readings = wire::Readings::from_slice(&[
        wire::Reading::new(0, 2150, -2),
        wire::Reading::new(1, -48, 0),
    ])
    .context("two readings fit a frame")?;
    let frame = wire::Frame::new(
        wire::Header::new(7, 0x00C0_FFEE, 42),
        wire::Body::Readings(readings),
    );
    let mut buf = [0u8; wire::MAX_FRAME];
    let encoded = wire::encode(&frame, &mut buf).map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
    ensure!(
        encoded == REFERENCE_FRAME,
        "encoded {encoded:02x?}, the reference is {REFERENCE_FRAME:02x?}"
    );
    let decoded: Vec<_> = wire::Accumulator::new()
        .feed_iter(encoded)
        .map(|d| d.result)
        .collect();
    ensure!(
        decoded == [Ok(frame.clone())],
        "decoded {decoded:?}, expected the frame back"
    );
    let mut flipped = encoded.to_vec();
    flipped[5] ^= 0x10;
    let decoded: Vec<_> = wire::Accumulator::new()
        .feed_iter(&flipped)
        .map(|d| d.result)
        .collect();
    ensure!(
        decoded == [Err(wire::FrameError::Crc)],
        "a flipped bit decoded as {decoded:?}, expected a CRC error"
    );
    Ok(format!(
        "CRC check value, a {}-byte Readings frame encodes to the reference bytes and decodes back, a flipped bit is a CRC error",
        encoded.len()
    ))
}

async fn gateway_checks<W: Write>(report: &mut Report<'_, W>) {
    const AFTER_START: [&str; 4] = ["mqtt", "durable", "outbox", "restart"];
    let dir = match TempDir::create() {
        Ok(d) => d,
        Err(e) => {
            report.check("gateway", Err(e));
            report.not_run(&AFTER_START, "no data directory");
            return;
        }
    };
    // Accepts the uplink's TCP connection into its backlog and never answers its CONNECT.
    let upstream = match std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr().map(|a| (l, a)))
    {
        Ok(u) => u,
        Err(e) => {
            report.check("gateway", Err(e).context("cannot listen on 127.0.0.1"));
            report.not_run(&AFTER_START, "no loopback listener");
            return;
        }
    };

    let started = start(&dir.0, upstream.1.port()).await;
    let gateway = match started {
        Ok(g) => g,
        Err(e) => {
            report.check("gateway", Err(e));
            report.not_run(&AFTER_START, "the gateway did not start");
            return;
        }
    };
    let Some(&addr) = gateway.local_addrs().first() else {
        report.check("gateway", Err(anyhow::anyhow!("no listener bound")));
        report.not_run(&AFTER_START, "the gateway did not start");
        return;
    };
    report.check(
        "gateway",
        Ok(format!(
            "started with persistence and an outbox in {}, broker on {addr}",
            dir.0.display()
        )),
    );

    report.check("mqtt", timed(mqtt_publish_and_receive(addr)).await);
    report.check("durable", timed(durable_publish(&gateway.broker())).await);
    gateway.shutdown().await;
    report.check("outbox", outbox_read_back(&dir.0.join("outbox")));

    let restarted = async {
        let gateway = start(&dir.0, upstream.1.port()).await?;
        let addr = *gateway
            .local_addrs()
            .first()
            .context("no listener bound after the restart")?;
        let result = timed(retained_after_restart(addr)).await;
        gateway.shutdown().await;
        result
    };
    report.check("restart", restarted.await);
}

async fn start(dir: &Path, upstream_port: u16) -> anyhow::Result<sensorgate::Gateway> {
    let text = CONFIG.replace("UPSTREAM_PORT", &upstream_port.to_string());
    let mut config = sensorgate::config::parse(&text, "<self-test>", None)
        .map_err(|e| anyhow::anyhow!("the embedded configuration is invalid (a bug): {e}"))?;
    config.data_dir = dir.to_path_buf();
    tokio::time::timeout(STEP_TIMEOUT, sensorgate::start(config))
        .await
        .context("the gateway did not start in time")?
        .context("the gateway did not start")
}

async fn timed(check: impl Future<Output = anyhow::Result<String>>) -> anyhow::Result<String> {
    tokio::time::timeout(STEP_TIMEOUT, check)
        .await
        .with_context(|| format!("no result within {STEP_TIMEOUT:?}"))?
}

fn client(addr: SocketAddr, name: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let id = format!("sensorgate-selftest-{name}-{}", std::process::id());
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    rumqttc::AsyncClient::new(options, 16)
}

/// A TCP client subscribes and publishes at QoS 1, retained; its PUBACK comes once the outbox
/// has committed the message (invariant 1), and the message comes back on the subscription.
async fn mqtt_publish_and_receive(addr: SocketAddr) -> anyhow::Result<String> {
    use rumqttc::{Event, Packet};
    let (client, mut events) = client(addr, "pub");
    client.subscribe(TOPIC, rumqttc::QoS::AtLeastOnce).await?;
    client
        .publish(TOPIC, rumqttc::QoS::AtLeastOnce, true, PAYLOAD)
        .await?;
    let (mut acked, mut received) = (false, false);
    while !(acked && received) {
        match events.poll().await.context("MQTT connection")? {
            Event::Incoming(Packet::ConnAck(ack))
                if ack.code != rumqttc::ConnectReturnCode::Success =>
            {
                bail!("CONNECT refused: {:?}", ack.code)
            }
            Event::Incoming(Packet::PubAck(_)) => acked = true,
            Event::Incoming(Packet::Publish(p)) if p.topic == TOPIC => {
                ensure!(
                    p.payload == PAYLOAD.as_bytes(),
                    "received {:?}, published {PAYLOAD:?}",
                    p.payload
                );
                received = true;
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(format!(
        "a TCP client published `{TOPIC}` at QoS 1, got its PUBACK and the message back"
    ))
}

/// An in-process publish whose acknowledgement waits for the outbox commit, as a node's does.
async fn durable_publish(broker: &sensorgate::broker::BrokerHandle) -> anyhow::Result<String> {
    let committed = broker
        .publish_durable(
            DURABLE_TOPIC,
            DURABLE_PAYLOAD,
            QoS::AtLeastOnce,
            false,
            None,
        )
        .await?
        .await
        .context("the broker dropped the acknowledgement")?;
    ensure!(committed, "the outbox did not store `{DURABLE_TOPIC}`");
    Ok(format!(
        "`{DURABLE_TOPIC}` acknowledged after the outbox commit"
    ))
}

/// Both messages are on disk, read back without the gateway running.
fn outbox_read_back(dir: &Path) -> anyhow::Result<String> {
    let inspection = sensorgate::outbox::inspect(dir)
        .with_context(|| format!("cannot read the outbox {}", dir.display()))?;
    for (topic, payload) in [(TOPIC, PAYLOAD), (DURABLE_TOPIC, DURABLE_PAYLOAD)] {
        let remote = format!("{REMOTE_PREFIX}{topic}");
        let found = inspection
            .pending
            .iter()
            .any(|p| p.record.topic == remote && p.record.payload == payload.as_bytes());
        ensure!(
            found,
            "`{remote}` = {payload} is not in the outbox ({} records)",
            inspection.pending.len()
        );
    }
    Ok(format!(
        "{} records read back from {} segment(s) after shutdown",
        inspection.pending.len(),
        inspection.segments.len()
    ))
}

/// After a restart from the same directory, the retained message is served from the snapshot.
async fn retained_after_restart(addr: SocketAddr) -> anyhow::Result<String> {
    use rumqttc::{Event, Packet};
    let (client, mut events) = client(addr, "sub");
    client.subscribe(TOPIC, rumqttc::QoS::AtLeastOnce).await?;
    loop {
        match events.poll().await.context("MQTT connection")? {
            Event::Incoming(Packet::Publish(p)) if p.topic == TOPIC => {
                ensure!(p.retain, "`{TOPIC}` arrived without the retain flag");
                ensure!(
                    p.payload == PAYLOAD.as_bytes(),
                    "retained {:?}, published {PAYLOAD:?}",
                    p.payload
                );
                break;
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(format!(
        "restarted from the same directory; retained `{TOPIC}` = {PAYLOAD} served again"
    ))
}

/// A data directory of our own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "sensorgate-selftest-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
