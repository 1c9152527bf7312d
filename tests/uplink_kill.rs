//! The real `sensorgate` binary SIGKILLed again and again while a local producer streams:
//! what the gateway acknowledged reaches the upstream `mosquitto` (QoS 1: at least once;
//! QoS 2 with a persistent producer session: exactly once), in order per topic; the will
//! announces `offline` upstream.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::upstream::{
    GatewayProcess, MosqOptions, Mosquitto, Sink, free_port, gateway_toml, missing_and_duplicates,
};
use common::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const STATUS: &str = "sensorgate/gw1/status";
/// Messages a producer has sent and not yet seen completed.
const WINDOW: usize = 32;
const TOPICS: u32 = 4;

fn rules(qos: u8) -> String {
    format!(
        "[[upstream.out]]\nfilter = \"sensors/#\"\nremote-prefix = \"site/{{gateway}}/\"\nqos = {qos}\n"
    )
}

fn topic(i: u32) -> String {
    format!("sensors/k{}", i % TOPICS)
}

/// A minimal MQTT client connection for a producer that must survive the gateway dying:
/// every failure is an `Err`, never a panic.
struct Link {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Link {
    /// Connects; returns the session-present flag.
    async fn open(addr: SocketAddr, id: &str, clean: bool) -> std::io::Result<(Link, bool)> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut link = Link {
            stream,
            buf: Vec::new(),
        };
        let c = wire::Connect {
            client_id: id,
            clean_session: clean,
            ..Default::default()
        };
        link.stream.write_all(&c.encode()).await?;
        let (byte0, body) = link.recv().await?;
        if byte0 >> 4 != wire::CONNACK || body.len() != 2 || body[1] != 0 {
            return Err(std::io::Error::other(format!(
                "bad CONNACK {byte0:#x} {body:?}"
            )));
        }
        Ok((link, body[0] & 1 == 1))
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next packet: first byte and body. Gives up after 20 s of silence.
    async fn recv(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let mut len = 0usize;
                let mut mult = 1;
                let mut i = 1;
                let mut complete = false;
                while i < self.buf.len() && i < 5 {
                    let b = self.buf[i];
                    len += usize::from(b & 0x7f) * mult;
                    mult *= 128;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if complete && self.buf.len() >= i + len {
                    let byte0 = self.buf[0];
                    let body = self.buf[i..i + len].to_vec();
                    self.buf.drain(..i + len);
                    return Ok((byte0, body));
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut chunk))
                .await
                .map_err(|_| std::io::Error::other("no packet from the gateway in 20 s"))??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn pid_of(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}

/// Where a message stands with the gateway, for the producer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, no PUBACK/PUBREC yet.
    Sent,
    /// PUBREC received, PUBREL sent.
    Released,
}

#[derive(Default)]
struct Produced {
    /// Messages the gateway acknowledged (PUBACK) or completed (PUBCOMP).
    done: HashSet<u32>,
    connects: u32,
    /// Connections that came back without the session (QoS 2 producer).
    sessions_lost: u32,
    /// In-flight messages discarded because the session was gone.
    discarded: u32,
}

/// Streams messages `0..n` to the gateway at `qos`, reconnecting whenever it dies (waiting for
/// the next start, not for time to pass). QoS 1: a clean session that publishes again what
/// was not acknowledged. QoS 2: a persistent session that, per MQTT 4.4, resends unacknowledged
/// PUBLISHes with DUP and pending PUBRELs when the session is present, and discards them
/// when it is not.
async fn produce(
    addr: SocketAddr,
    qos: u8,
    n: u32,
    mut starts: watch::Receiver<u64>,
    out: Arc<Mutex<Produced>>,
    progress: watch::Sender<usize>,
) {
    let clean = qos == 1;
    let id = if clean { "q1-producer" } else { "q2-producer" };
    // Message number → (packet id, stage), in publish order.
    let mut open: BTreeMap<u32, (u16, Stage)> = BTreeMap::new();
    let mut next = 0u32;
    loop {
        if next == n && open.is_empty() {
            return;
        }
        starts.borrow_and_update();
        let (mut link, present) = match Link::open(addr, id, clean).await {
            Ok(l) => l,
            Err(_) => {
                tokio::time::timeout(Duration::from_secs(20), starts.changed())
                    .await
                    .expect("the gateway restarts")
                    .unwrap();
                continue;
            }
        };
        {
            let mut o = out.lock().unwrap();
            o.connects += 1;
            if !clean && !present && !open.is_empty() {
                o.sessions_lost += 1;
                o.discarded += open.len() as u32;
                open.clear();
            }
        }
        let _ = session(&mut link, qos, n, &mut next, &mut open, &out, &progress).await;
    }
}

/// One connection of [`produce`]; returns when it breaks or everything is done.
async fn session(
    link: &mut Link,
    qos: u8,
    n: u32,
    next: &mut u32,
    open: &mut BTreeMap<u32, (u16, Stage)>,
    out: &Mutex<Produced>,
    progress: &watch::Sender<usize>,
) -> std::io::Result<()> {
    let pid = |i: u32| u16::try_from(i % 60_000 + 1).unwrap();
    // Resend what is open. QoS 1 on a clean session: new publishes of the same messages.
    for (&i, &(p, stage)) in open.iter() {
        match stage {
            Stage::Sent => {
                let mut bytes = wire::publish(&topic(i), i.to_string().as_bytes(), qos, false, p);
                if qos == 2 {
                    bytes[0] |= 0x08; // DUP
                }
                link.send(&bytes).await?;
            }
            Stage::Released => link.send(&wire::ack(wire::PUBREL, p)).await?,
        }
    }
    let mut by_pid: HashMap<u16, u32> = open.iter().map(|(&i, &(p, _))| (p, i)).collect();
    loop {
        while open.len() < WINDOW && *next < n {
            let i = *next;
            *next += 1;
            let p = pid(i);
            open.insert(i, (p, Stage::Sent));
            by_pid.insert(p, i);
            link.send(&wire::publish(
                &topic(i),
                i.to_string().as_bytes(),
                qos,
                false,
                p,
            ))
            .await?;
        }
        if open.is_empty() {
            return Ok(());
        }
        let (byte0, body) = link.recv().await?;
        let p = pid_of(&body);
        let Some(&i) = by_pid.get(&p) else { continue };
        match byte0 >> 4 {
            wire::PUBACK | wire::PUBCOMP => {
                open.remove(&i);
                by_pid.remove(&p);
                let done = {
                    let mut o = out.lock().unwrap();
                    o.done.insert(i);
                    o.done.len()
                };
                progress.send_replace(done);
            }
            wire::PUBREC => {
                if let Some(e) = open.get_mut(&i) {
                    e.1 = Stage::Released;
                }
                link.send(&wire::ack(wire::PUBREL, p)).await?;
            }
            other => panic!("unexpected packet type {other} from the gateway"),
        }
    }
}

/// Runs the whole scenario: `n` messages at `qos`, the gateway SIGKILLed `kills` times at
/// evenly spread points of the stream. Returns (duplicates upstream, producer record).
async fn kill_while_streaming(qos: u8, n: u32, kills: u32) -> (usize, Produced) {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let sink = Sink::spawn(up.addr(), "counter", qos, &["site/#", STATUS]).await;
    let local = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = gateway_toml(
        &dir.path().join("data"),
        &local.to_string(),
        &format!("mqtt://{}", up.addr()),
        "",
        &rules(qos),
        "",
    );
    let mut gw = GatewayProcess::start(dir.path(), &text, local).await;

    let out = Arc::new(Mutex::new(Produced::default()));
    let (progress_tx, mut progress) = watch::channel(0usize);
    let producer = tokio::spawn(produce(
        local,
        qos,
        n,
        gw.starts.subscribe(),
        out.clone(),
        progress_tx,
    ));
    gw.kill_along(kills, n as usize, &mut progress, Duration::from_secs(30))
        .await;
    tokio::time::timeout(Duration::from_secs(40), producer)
        .await
        .unwrap_or_else(|_| panic!("the producer did not finish:\n{}", gw.log()))
        .unwrap();

    let done: Vec<u32> = {
        let mut d: Vec<u32> = out.lock().unwrap().done.iter().copied().collect();
        d.sort_unstable();
        d
    };
    let want: HashSet<(String, String)> = done
        .iter()
        .map(|&i| (format!("site/gw1/{}", topic(i)), i.to_string()))
        .collect();
    sink.wait(
        &format!("the {} acknowledged messages", want.len()),
        Duration::from_secs(30),
        |s| s.has_all(&want),
    )
    .await;

    let mut dups = 0;
    for t in 0..TOPICS {
        let up_topic = format!("site/gw1/sensors/k{t}");
        let got = sink.with(|s| s.payloads(&up_topic));
        let mine: Vec<String> = done
            .iter()
            .filter(|&&i| i % TOPICS == t)
            .map(|i| i.to_string())
            .collect();
        let (missing, d) = missing_and_duplicates(&got, mine.clone());
        assert!(
            missing.is_empty(),
            "{up_topic}: acknowledged but missing: {missing:?}"
        );
        dups += d;
        // Order per topic: the first arrival of each message follows publish order.
        let mut seen = HashSet::new();
        let first: Vec<u32> = got
            .iter()
            .filter(|p| seen.insert(p.to_string()))
            .map(|p| p.parse().unwrap())
            .collect();
        if let Some(k) = first.windows(2).position(|w| w[0] > w[1]) {
            let from = k.saturating_sub(12);
            panic!(
                "{up_topic}: out of order upstream: ... {:?} ...",
                &first[from..(k + 12).min(first.len())]
            );
        }
    }
    gw.stop().await;
    let o = std::mem::take(&mut *out.lock().unwrap());
    (dups, o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_gateway_loses_no_acknowledged_qos1_message() {
    let n = 10_000;
    let (dups, p) = kill_while_streaming(1, n, 12).await;
    assert_eq!(
        p.done.len(),
        n as usize,
        "every message was acknowledged in the end"
    );
    println!(
        "QoS 1, 12 SIGKILLs: {n} acknowledged, all arrived; {dups} duplicates upstream; {} producer connections",
        p.connects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_gateway_delivers_completed_qos2_messages_exactly_once() {
    let n = 600;
    let (dups, p) = kill_while_streaming(2, n, 10).await;
    println!(
        "QoS 2, 10 SIGKILLs: {} completed, {} discarded with {} lost sessions, {} producer connections; {dups} duplicates upstream",
        p.done.len(),
        p.discarded,
        p.sessions_lost,
        p.connects
    );
    assert_eq!(dups, 0, "QoS 2 end to end: exactly once");
    // The first kill comes only after messages were completed, so the session's creation and
    // its inbound QoS 2 packet ids are durable by then (the snapshot written at once, and the
    // ids committed with the outbox records): every reconnection finds it.
    assert_eq!(
        (p.sessions_lost, p.discarded),
        (0, 0),
        "the persistent session survives every SIGKILL"
    );
    assert_eq!(p.done.len(), n as usize, "every message was completed");
}

#[tokio::test]
async fn the_will_announces_offline_upstream_when_the_gateway_is_sigkilled() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let sink = Sink::spawn(up.addr(), "status-watch", 1, &[STATUS]).await;
    let local = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = gateway_toml(
        &dir.path().join("data"),
        &local.to_string(),
        &format!("mqtt://{}", up.addr()),
        "",
        &rules(1),
        "",
    );
    let long = Duration::from_secs(10);
    let mut gw = GatewayProcess::start(dir.path(), &text, local).await;
    let status = |want: &'static str, count: usize| {
        move |s: &common::upstream::SinkState| {
            s.payloads(STATUS).iter().filter(|p| p == &want).count() >= count
        }
    };
    sink.wait("online", long, status("online", 1)).await;
    gw.kill9().await;
    sink.wait("offline from the will", long, status("offline", 1))
        .await;
    // Retained: a subscriber arriving now is told the gateway is offline.
    let late = Sink::spawn(up.addr(), "late", 1, &[STATUS]).await;
    late.wait("the retained status", long, |s| !s.msgs.is_empty())
        .await;
    let first = late.with(|s| s.msgs[0].clone());
    assert!(first.retain && first.payload == "offline", "{first:?}");
    gw.start_again().await;
    sink.wait("online again", long, status("online", 2)).await;
    gw.stop().await;
}
