//! End to end with the real node firmware: the emulator image runs in rp2040js
//! (`firmware/harness/run-node.js`), its UART0 is bridged to a pseudo-terminal, the gateway reads
//! the other side as a `sensorgate` port, and real MQTT clients see the result.
//!
//! ```text
//!  run-node.js ─stdout/stdin─▶ bridge (taps frames) ─▶ pty master ═ pty slave ─▶ sensorgate ─▶ broker
//!  (firmware, ADC at 23.5 °C)                                                     ▲   │
//!                                               mosquitto_pub set/<command> ──────┘   └─▶ rumqttc subscriber
//! ```
//!
//! It proves: the temperature set in the emulated ADC arrives on `sensors/lab/temp`; the gateway's
//! `Ack` reaches the node, which stops retransmitting; commands published on MQTT reach the node
//! and its `Ack` (or refusal) comes back on `command-result`; a command the gateway refuses itself
//! never reaches the node.
//!
//! Needs the emulator image and the harness's npm packages, which `firmware/build.sh` prepares;
//! so it is ignored by a plain `cargo test`. Run it with `firmware/test-e2e.sh`, or after
//! `firmware/build.sh`: `cargo test --test emulated_e2e -- --ignored`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use sensorgate_wire as wire;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_serial::{SerialPort, SerialStream};

/// Node id the emulator image is built with (`emu_node_id` in firmware/build.sh).
const NODE_ID: u32 = 0x00C0_FFEE;
const GATEWAY: &str = "gw-e2e";
const TEMP_TOPIC: &str = "sensors/lab/temp";
/// Temperature set in the emulated ADC, and what one ADC step (0.47 °C) plus rounding allows.
const TEMPERATURE_C: f64 = 23.5;
const TOLERANCE_C: f64 = 0.5;
/// Generous, for a loaded CI machine: the emulator runs at wall-clock pace at best.
const WAIT: Duration = Duration::from_secs(30);

fn command_result_topic() -> String {
    format!("sensorgate/{GATEWAY}/nodes/{NODE_ID}/command-result")
}

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A frame seen on the serial link, in the direction it travelled.
#[derive(Debug, Clone)]
enum Seen {
    FromNode(wire::Frame),
    ToNode(wire::Frame),
}

/// The firmware in the emulator, its UART0 bridged to a pty master; the bridge reports every
/// frame it carries so the test can see what crossed the wire.
struct EmulatedNode {
    _child: Child,
    tap: mpsc::UnboundedReceiver<Seen>,
    /// Every frame taken from `tap` so far.
    history: Vec<Seen>,
}

impl EmulatedNode {
    /// Starts the harness on stdio and bridges it to `master`.
    fn start(master: SerialStream) -> Self {
        let firmware = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware");
        let elf = std::env::var_os("SENSORGATE_NODE_ELF")
            .map(PathBuf::from)
            .unwrap_or_else(|| firmware.join("node/target/images/sensorgate-node-emu.elf"));
        assert!(
            elf.exists(),
            "{} is missing: build it with firmware/build.sh (or run firmware/test-e2e.sh)",
            elf.display()
        );
        let harness = firmware.join("harness");
        assert!(
            harness.join("node_modules/rp2040js").is_dir(),
            "{}/node_modules/rp2040js is missing: run `npm ci` there (firmware/build.sh does)",
            harness.display()
        );
        let mut child = Command::new("node")
            .arg(harness.join("run-node.js"))
            .arg("--elf")
            .arg(&elf)
            .args(["--temp", &TEMPERATURE_C.to_string()])
            // A backstop should the test's process die without killing it.
            .args(["--exit-after", "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start `node` (Node.js) with firmware/harness/run-node.js");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, tap) = mpsc::unbounded_channel();
        let (mut master_rx, mut master_tx) = tokio::io::split(master);

        let to_gateway = tx.clone();
        tokio::spawn(async move {
            let mut acc = wire::Accumulator::new();
            let mut buf = [0u8; 512];
            while let Ok(n @ 1..) = stdout.read(&mut buf).await {
                if master_tx.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                for d in acc.feed_iter(&buf[..n]) {
                    if let Ok(frame) = d.result {
                        let _ = to_gateway.send(Seen::FromNode(frame));
                    }
                }
            }
        });
        tokio::spawn(async move {
            let mut acc = wire::Accumulator::new();
            let mut buf = [0u8; 512];
            while let Ok(n @ 1..) = master_rx.read(&mut buf).await {
                if stdin.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                for d in acc.feed_iter(&buf[..n]) {
                    if let Ok(frame) = d.result {
                        let _ = tx.send(Seen::ToNode(frame));
                    }
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("harness: {line}");
            }
        });
        EmulatedNode {
            _child: child,
            tap,
            history: Vec::new(),
        }
    }

    /// The next frame on the link that `wanted` accepts; others are kept in the history.
    async fn expect<T>(&mut self, what: &str, mut wanted: impl FnMut(&Seen) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.tap.recv()).await {
                Ok(Some(seen)) => {
                    eprintln!("serial: {seen:?}");
                    let found = wanted(&seen);
                    self.history.push(seen);
                    if let Some(found) = found {
                        return found;
                    }
                }
                Ok(None) => panic!("the serial bridge closed before {what}"),
                Err(_) => panic!("no {what} on the serial link within {WAIT:?}"),
            }
        }
    }

    /// The next command the gateway sends to the node.
    async fn expect_command(&mut self, what: &str) -> wire::Frame {
        self.expect(what, |s| match s {
            Seen::ToNode(
                f @ wire::Frame {
                    body: wire::Body::Command(_),
                    ..
                },
            ) => Some(f.clone()),
            _ => None,
        })
        .await
    }

    /// The node's answer to the command `of`.
    async fn expect_node_ack(&mut self, of: wire::FrameRef) -> wire::AckStatus {
        self.expect("the node's Ack of a command", |s| match s {
            Seen::FromNode(wire::Frame {
                body: wire::Body::Ack(ack),
                ..
            }) if ack.of == of => Some(ack.status),
            _ => None,
        })
        .await
    }

    /// The gateway's acknowledgement of the node's frame `of`.
    async fn expect_gateway_ack(&mut self, of: wire::FrameRef) {
        self.expect("the gateway's Ack of a Readings frame", |s| match s {
            Seen::ToNode(wire::Frame {
                body: wire::Body::Ack(ack),
                ..
            }) if ack.of == of => {
                assert_eq!(ack.status, wire::AckStatus::Accepted);
                Some(())
            }
            _ => None,
        })
        .await
    }

    /// Every frame seen so far, including any still waiting in the tap.
    fn all_seen(&mut self) -> &[Seen] {
        while let Ok(seen) = self.tap.try_recv() {
            self.history.push(seen);
        }
        &self.history
    }
}

/// A rumqttc client subscribed to the temperature and the command results; messages on the
/// topic not asked for are kept for later, so interleaving cannot lose one.
struct Subscriber {
    _client: AsyncClient,
    events: EventLoop,
    pending: VecDeque<(String, String)>,
}

impl Subscriber {
    async fn connect(gw: &sensorgate::Gateway) -> Subscriber {
        let addr = gw.local_addrs()[0];
        let mut opts = MqttOptions::new("e2e-sub", addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(opts, 16);
        client
            .subscribe_many([
                SubscribeFilter::new(TEMP_TOPIC.into(), QoS::AtLeastOnce),
                SubscribeFilter::new(command_result_topic(), QoS::AtLeastOnce),
            ])
            .await
            .expect("subscribe");
        within("SUBACK", async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.expect("connected")
                {
                    break;
                }
            }
        })
        .await;
        Subscriber {
            _client: client,
            events,
            pending: VecDeque::new(),
        }
    }

    /// The next live message on `topic` (retained ones are skipped).
    async fn next_on(&mut self, topic: &str) -> String {
        if let Some(i) = self.pending.iter().position(|(t, _)| t == topic) {
            return self.pending.remove(i).expect("present").1;
        }
        let events = &mut self.events;
        let pending = &mut self.pending;
        within(&format!("a message on {topic}"), async {
            loop {
                match events.poll().await.expect("MQTT connection") {
                    Event::Incoming(Packet::Publish(p)) if !p.retain => {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        eprintln!("mqtt: {} {payload}", p.topic);
                        if p.topic == topic {
                            return payload;
                        }
                        pending.push_back((p.topic.clone(), payload));
                    }
                    _ => continue,
                }
            }
        })
        .await
    }

    async fn next_temperature(&mut self) -> f64 {
        let payload = self.next_on(TEMP_TOPIC).await;
        payload
            .parse()
            .unwrap_or_else(|_| panic!("{TEMP_TOPIC} carries `{payload}`, not a number"))
    }

    async fn next_command_result(&mut self) -> serde_json::Value {
        let payload = self.next_on(&command_result_topic()).await;
        serde_json::from_str(&payload)
            .unwrap_or_else(|e| panic!("command-result `{payload}` is not JSON: {e}"))
    }
}

/// Publishes a node command with an independent client, as a user would.
async fn send_command(gw: &sensorgate::Gateway, name: &str, payload: &str) {
    let port = gw.local_addrs()[0].port().to_string();
    let topic = format!("sensorgate/{GATEWAY}/nodes/{NODE_ID}/set/{name}");
    let status = within(
        "mosquitto_pub",
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", &topic])
            .args(["-m", payload])
            .kill_on_drop(true)
            .status(),
    )
    .await
    .expect("mosquitto_pub runs (install mosquitto-clients)");
    assert!(
        status.success(),
        "mosquitto_pub {topic} {payload}: {status}"
    );
}

/// Sends `name` = `payload`; returns the command frame that reached the node, the node's
/// answer on the wire and the gateway's `command-result` for it.
async fn command_round_trip(
    gw: &sensorgate::Gateway,
    node: &mut EmulatedNode,
    sub: &mut Subscriber,
    name: &str,
    payload: &str,
) -> (wire::Command, wire::AckStatus, serde_json::Value) {
    send_command(gw, name, payload).await;
    let frame = node.expect_command(&format!("the `{name}` command")).await;
    assert_eq!(frame.header.node_id, NODE_ID);
    let status = node.expect_node_ack(frame.header.frame_ref()).await;
    let result = sub.next_command_result().await;
    assert_eq!(
        result["seq"],
        serde_json::json!(frame.header.seq),
        "command-result {result} answers another command than seq {}",
        frame.header.seq
    );
    let wire::Body::Command(command) = frame.body else {
        unreachable!("expect_command returns commands")
    };
    (command, status, result)
}

#[tokio::test]
#[ignore = "needs firmware/build.sh; run by scripts/test"]
async fn emulated_node_reaches_mqtt_and_answers_commands_through_the_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (master, slave) = SerialStream::pair().expect("pseudo-terminal pair");
    let slave_path = slave.name().expect("the slave side has a path");
    let text = format!(
        r#"
data-dir = "{data}"
gateway-id = "{GATEWAY}"
[[broker.listener]]
bind = "127.0.0.1:0"
[[port]]
name = "node0"
path = "{slave_path}"
protocol = "sensorgate"
[[node]]
id = {NODE_ID}
name = "bench"
room = "lab"
[mapping]
[[mapping.rule]]
quantity = "temperature"
topic = "sensors/{{room}}/temp"
"#,
        data = dir.path().join("data").display(),
    );
    let config = sensorgate::config::parse(&text, "e2e.toml", None).expect("valid config");
    let gw = sensorgate::start(config).await.expect("gateway starts");
    let stats = gw.port_stats()[0].1.clone();
    within(
        "the gateway to open the pty",
        stats.opened.subscribe().wait_for(|&n| n >= 1),
    )
    .await
    .expect("port open");
    let mut sub = Subscriber::connect(&gw).await;
    let mut node = EmulatedNode::start(master);

    // Boot: Hello, then Readings with the ADC temperature, which the subscriber sees.
    let boot_id = node
        .expect("the node's Hello", |s| match s {
            Seen::FromNode(
                f @ wire::Frame {
                    body: wire::Body::Hello(_),
                    ..
                },
            ) => Some(f.header.boot_id),
            _ => None,
        })
        .await;
    let first = node
        .expect("the node's Readings", |s| match s {
            Seen::FromNode(
                f @ wire::Frame {
                    body: wire::Body::Readings(_),
                    ..
                },
            ) => Some(f.header.frame_ref()),
            _ => None,
        })
        .await;
    let celsius = sub.next_temperature().await;
    assert!(
        (celsius - TEMPERATURE_C).abs() <= TOLERANCE_C,
        "{TEMP_TOPIC} carried {celsius} °C, the emulated ADC was set to {TEMPERATURE_C} °C"
    );
    // The gateway acknowledges the reading on the wire.
    node.expect_gateway_ack(first).await;

    // A command from MQTT reaches the node, and its Ack comes back as the command's result.
    let (command, status, result) =
        command_round_trip(&gw, &mut node, &mut sub, "interval", "30").await;
    assert_eq!(command, wire::Command::SetReportInterval { seconds: 30 });
    assert_eq!(status, wire::AckStatus::Accepted);
    assert_eq!(result["accepted"], true, "{result}");

    // `interval` 0 is refused by the gateway itself (NodeCommand::parse): an error on
    // command-result, and nothing sent to the node; the next command on the wire is `identify`.
    send_command(&gw, "interval", "0").await;
    let refused = sub.next_command_result().await;
    let why = refused["error"].as_str().unwrap_or_else(|| {
        panic!("a refused command's result carries an error message, got {refused}")
    });
    assert!(why.contains("interval"), "{why}");
    assert!(refused.get("seq").is_none(), "{refused}");

    let (command, status, result) =
        command_round_trip(&gw, &mut node, &mut sub, "identify", "3").await;
    assert_eq!(
        command,
        wire::Command::Identify { seconds: 3 },
        "`interval 0` must not reach the node"
    );
    assert_eq!(status, wire::AckStatus::Accepted);
    assert_eq!(result["accepted"], true, "{result}");

    // An interval the gateway passes on but the firmware refuses (above one day): the node's
    // negative Ack comes back as `accepted: false`.
    let (command, status, result) =
        command_round_trip(&gw, &mut node, &mut sub, "interval", "86401").await;
    assert_eq!(
        command,
        wire::Command::SetReportInterval { seconds: 86_401 }
    );
    assert_eq!(
        status,
        wire::AckStatus::Rejected(wire::NackReason::InvalidArgument)
    );
    assert_eq!(result["accepted"], false, "{result}");

    // A short interval: the node measures again 3 s (emulated) after this command, so after the
    // first reading's retransmission would have been due (2 s, `Backoff::default`) had the
    // gateway's Ack not reached it; the node sends in order, so the bridge would have seen it.
    let (command, status, _) = command_round_trip(&gw, &mut node, &mut sub, "interval", "3").await;
    assert_eq!(command, wire::Command::SetReportInterval { seconds: 3 });
    assert_eq!(status, wire::AckStatus::Accepted);
    let second = node
        .expect("the node's next Readings", |s| match s {
            Seen::FromNode(
                f @ wire::Frame {
                    body: wire::Body::Readings(_),
                    ..
                },
            ) if f.header.seq != first.seq => Some(f.header.frame_ref()),
            _ => None,
        })
        .await;
    let celsius = sub.next_temperature().await;
    assert!((celsius - TEMPERATURE_C).abs() <= TOLERANCE_C, "{celsius}");
    node.expect_gateway_ack(second).await;

    // Acknowledged means the node did not send the first reading again, and the gateway saw no
    // duplicate and no bad byte; one boot throughout.
    let seen = node.all_seen();
    let first_sent = seen
        .iter()
        .filter(|s| {
            matches!(s, Seen::FromNode(f) if matches!(f.body, wire::Body::Readings(_))
                && f.header.frame_ref() == first)
        })
        .count();
    assert_eq!(
        first_sent, 1,
        "the node retransmitted an acknowledged reading"
    );
    for s in seen {
        if let Seen::FromNode(f) = s {
            assert_eq!(
                (f.header.node_id, f.header.boot_id),
                (NODE_ID, boot_id),
                "{f:?}"
            );
        }
    }
    assert_eq!(
        stats.duplicates.load(Relaxed),
        0,
        "duplicates at the gateway"
    );
    assert_eq!(
        (
            stats.errors_crc.load(Relaxed),
            stats.errors_framing.load(Relaxed),
            stats.errors_undecodable.load(Relaxed)
        ),
        (0, 0, 0),
        "errors on the gateway's port"
    );

    within("gateway shutdown", gw.shutdown()).await;
    drop(slave);
}
