//! The outbox under pressure and damage, end to end: a full quota drops exactly what its
//! policy says (and counts it) or holds the producer back; a torn tail, a corrupt record and
//! wiped checkpoints do not stop the gateway, and everything else reaches the upstream.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::proxy::Proxy;
use common::upstream::{MosqOptions, Mosquitto, Sink, gateway_toml, start_gateway};
use common::{Raw, Read, wire};

const LONG: Duration = Duration::from_secs(30);
const TOPIC: &str = "sensors/bulk";
const UP_TOPIC: &str = "site/gw1/sensors/bulk";
const RULES: &str = r#"
[[upstream.out]]
filter = "sensors/#"
remote-prefix = "site/{gateway}/"
qos = 1
"#;

struct Rig {
    dir: tempfile::TempDir,
    _up: Mosquitto,
    proxy: Proxy,
    sink: Sink,
}

/// mosquitto with its subscriber, and a proxy that refuses the gateway for now.
async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let proxy = Proxy::start(up.addr(), false).await;
    let sink = Sink::spawn(up.addr(), "counter", 1, &["site/#"]).await;
    Rig {
        dir,
        _up: up,
        proxy,
        sink,
    }
}

fn config(rig: &Rig, outbox: &str) -> String {
    gateway_toml(
        &rig.dir.path().join("data"),
        "127.0.0.1:0",
        &format!("mqtt://{}", rig.proxy.addr),
        "",
        RULES,
        outbox,
    )
}

/// A payload of about 1000 bytes that starts with its number.
fn payload(i: usize) -> String {
    format!("{i:05}-{}", "x".repeat(994))
}

/// Sends `n` QoS 1 messages pipelined; returns the connection without waiting for acks.
async fn send_all(local: SocketAddr, n: usize) -> Raw {
    let (mut c, _) = Raw::connect(local, "producer", true).await;
    for i in 0..n {
        c.publish(TOPIC, payload(i).as_bytes(), 1, false, i as u16 + 1)
            .await;
    }
    c
}

/// Reads PUBACKs until `pred(acked)` holds; returns the packet ids acknowledged, in order.
async fn acks_until(c: &mut Raw, acked: &mut Vec<u16>, mut pred: impl FnMut(&[u16]) -> bool) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !pred(acked) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "acks stuck at {}",
            acked.len()
        );
        match c.read_within(Duration::from_millis(50)).await {
            Read::Packet(p) => {
                assert_eq!(p.kind(), wire::PUBACK);
                acked.push(p.pid());
            }
            Read::Nothing => {}
            Read::Closed => panic!("the gateway closed the producer's connection"),
        }
    }
}

fn arrived(sink: &Sink) -> Vec<usize> {
    sink.with(|s| s.payloads(UP_TOPIC))
        .iter()
        .map(|p| p[..5].parse().unwrap())
        .collect()
}

/// Publishes 150 messages of about 1 KiB into a 64 KiB outbox the uplink cannot drain, then
/// lets the uplink connect. Returns (acknowledged ids, outbox stats before the link came up,
/// ids that arrived upstream).
/// With `burst`, all are sent at once; else each after the previous one's acknowledgement.
async fn overflow(
    policy: &str,
    burst: bool,
) -> (Vec<u16>, sensorgate::outbox::OutboxStats, Vec<usize>) {
    const N: usize = 150;
    let rig = rig().await;
    let gw = start_gateway(&config(
        &rig,
        &format!("max-bytes = \"64KiB\"\nwhen-full = \"{policy}\""),
    ))
    .await;
    let outbox = gw.outbox().unwrap().clone();
    let mut acked = Vec::new();
    let mut c = if burst {
        send_all(gw.local_addrs()[0], N).await
    } else {
        let (mut c, _) = Raw::connect(gw.local_addrs()[0], "producer", true).await;
        for i in 0..N {
            let pid = i as u16 + 1;
            c.publish_acked(TOPIC, payload(i).as_bytes(), 1, pid).await;
            acked.push(pid);
        }
        c
    };
    if policy == "block" {
        // Acknowledged exactly as far as stored; appends wait for room up to the queue's bound,
        // and then the producer's connection is no longer read.
        acks_until(&mut c, &mut acked, |a| {
            let s = outbox.stats();
            s.blocked > 0 && s.queued == 0 && a.len() as u64 == s.depth
        })
        .await;
    } else {
        acks_until(&mut c, &mut acked, |a| a.len() == N).await;
    }
    let before = outbox.stats();
    rig.proxy.set_accepting(true);
    acks_until(&mut c, &mut acked, |a| a.len() == N).await;
    let want = match policy {
        "drop-oldest" => (N - before.depth as usize..N).collect::<Vec<_>>(),
        "drop-newest" => (0..before.depth as usize).collect(),
        _ => (0..N).collect(),
    };
    let last = *want.last().unwrap();
    rig.sink
        .wait("the last stored message", LONG, |s| {
            s.payloads(UP_TOPIC)
                .iter()
                .any(|p| p[..5].parse::<usize>().unwrap() == last)
        })
        .await;
    let got = arrived(&rig.sink);
    assert_eq!(got, want, "{policy}: exactly the stored messages, in order");
    gw.shutdown().await;
    (acked, before, got)
}

#[tokio::test]
async fn a_full_outbox_under_drop_oldest_drops_and_counts_the_oldest() {
    let (acked, st, _) = overflow("drop-oldest", false).await;
    assert_eq!(acked.len(), 150, "every message was accepted");
    assert!(st.depth > 40 && st.depth < 70, "about 64 KiB kept: {st:?}");
    assert_eq!(st.dropped_oldest + st.depth, 150, "{st:?}");
    assert_eq!(st.dropped_newest, 0);
}

#[tokio::test]
async fn a_burst_into_a_full_outbox_under_drop_oldest_stays_within_the_quota() {
    let (acked, st, _) = overflow("drop-oldest", true).await;
    assert_eq!(acked.len(), 150);
    assert!(st.bytes <= 64 * 1024, "over the quota: {st:?}");
    assert_eq!(st.dropped_oldest + st.depth, 150, "{st:?}");
}

#[tokio::test]
async fn a_full_outbox_under_drop_newest_refuses_and_counts_the_newest() {
    let (acked, st, _) = overflow("drop-newest", true).await;
    assert_eq!(
        acked.len(),
        150,
        "a counted drop is still an answer to the producer"
    );
    assert!(st.depth > 40 && st.depth < 70, "{st:?}");
    assert_eq!(st.dropped_newest + st.depth, 150, "{st:?}");
    assert_eq!(st.dropped_oldest, 0);
}

#[tokio::test]
async fn a_full_outbox_under_block_holds_acknowledgements_and_loses_nothing() {
    let (acked, st, got) = overflow("block", true).await;
    assert!(st.depth > 40 && st.depth < 70, "{st:?}");
    // 16 KiB (a quarter of the quota) of ~1 KiB records wait in RAM, the rest in the producer's
    // socket: the connection stopped being read.
    println!("under block, stalled at {st:?}");
    assert!(st.blocked_bytes <= 16 * 1024 + 1100, "{st:?}");
    assert!(
        st.depth + st.blocked < 150,
        "the producer was held back: {st:?}"
    );
    assert_eq!((st.dropped_oldest, st.dropped_newest), (0, 0));
    let want: Vec<u16> = (1..=150).collect();
    assert_eq!(acked, want, "acknowledged in order once there was room");
    assert_eq!(got.len(), 150);
}

/// The frames of a segment: (offset, total length, kind).
fn frames(buf: &[u8]) -> Vec<(usize, usize, u8)> {
    let mut out = Vec::new();
    let mut p = 0;
    while buf.len() >= p + 13 && &buf[p..p + 4] == b"SGOB" {
        let len = u32::from_le_bytes(buf[p + 4..p + 8].try_into().unwrap()) as usize;
        if buf.len() < p + 12 + len {
            break;
        }
        out.push((p, 12 + len, buf[p + 12]));
        p += 12 + len;
    }
    out
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_torn_tail_a_corrupt_record_and_wiped_checkpoints_do_not_stop_delivery() {
    let rig = rig().await;
    let text = config(&rig, "");
    // Some delivered (so there are acknowledgements to lose), the rest stored.
    rig.proxy.set_accepting(true);
    let gw = start_gateway(&text).await;
    let local = gw.local_addrs()[0];
    let mut c = send_all(local, 10).await;
    acks_until(&mut c, &mut Vec::new(), |a| a.len() == 10).await;
    rig.sink
        .wait("the first ten", LONG, |s| s.payloads(UP_TOPIC).len() == 10)
        .await;
    rig.proxy.set_accepting(false);
    rig.proxy.cut_all();
    let (mut c, _) = Raw::connect(local, "producer2", true).await;
    for i in 10..40 {
        c.publish_acked(TOPIC, payload(i).as_bytes(), 1, 1).await;
    }
    gw.shutdown().await;

    let outbox = rig.dir.path().join("data").join("outbox");
    let segs = segments(&outbox);
    assert!(!segs.is_empty());
    let mut corrupted = None;
    let mut wiped = 0;
    // What recovery must report, worked out from the frames damaged: each run of damaged
    // frames followed by a valid one is one corrupt region; a damaged run at the end of the last
    // segment belongs to the torn tail; one at the end of another segment is corrupt if any of
    // its bytes are not zero (wiped frames are zeros, like preallocated space).
    let mut want_corrupt = 0u64;
    let mut want_torn = 0u64;
    // Messages whose record is intact: exactly these are delivered after the restart (the
    // acknowledgements of the first ten were wiped, so they come again).
    let mut intact = Vec::new();
    let torn_len = 4 + 4 + 40;
    let mut last_end = 0;
    for (k, seg) in segs.iter().enumerate() {
        let buf = std::fs::read(seg).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        let mut run: Option<(usize, bool)> = None; // (start, any non-zero byte left)
        let mut end = 0;
        for (off, len, kind) in frames(&buf) {
            let frame = &buf[off..off + len];
            end = off + len;
            let damaged = match kind {
                // A flipped payload byte in the record of message 20.
                1 if frame.windows(6).any(|w| w == b"00020-") => {
                    f.write_all_at(b"Y", (off + len - 1) as u64).unwrap();
                    corrupted = Some(20);
                    Some(true)
                }
                // Acknowledgement ranges and the snapshot at each segment head.
                2 | 7 => {
                    f.write_all_at(&vec![0u8; len], off as u64).unwrap();
                    wiped += 1;
                    Some(false)
                }
                _ => None,
            };
            match damaged {
                Some(nonzero) => {
                    let r = run.get_or_insert((off, false));
                    r.1 |= nonzero;
                }
                None => {
                    if run.take().is_some() {
                        want_corrupt += 1;
                    }
                    if kind == 1 {
                        intact.push(
                            std::str::from_utf8(&frame[len - 1000..len - 995])
                                .unwrap()
                                .parse::<usize>()
                                .unwrap(),
                        );
                    }
                }
            }
        }
        if k + 1 == segs.len() {
            last_end = end;
            want_torn = match run {
                Some((start, _)) => (end + torn_len - start) as u64,
                None => torn_len as u64,
            };
        } else if run.is_some_and(|(_, nonzero)| nonzero) {
            want_corrupt += 1;
        }
    }
    assert_eq!(corrupted, Some(20));
    assert!(wiped >= 2, "acks and snapshots wiped: {wiped}");
    assert!(want_corrupt >= 1);
    intact.sort_unstable();
    let want: Vec<usize> = (0..40).filter(|&i| i != 20).collect();
    assert_eq!(intact, want, "every record but 20 is still on disk");
    // A write cut short by power loss at the end of the last segment.
    // (After the end of its frames before the damage: `frames` stops at a wiped head.)
    let last = segs.last().unwrap();
    let end = last_end;
    let mut torn = b"SGOB".to_vec();
    torn.extend_from_slice(&500u32.to_le_bytes());
    torn.extend_from_slice(&[0xAB; 40]);
    assert_eq!(torn.len(), torn_len);
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .write_all_at(&torn, end as u64)
        .unwrap();

    let found = sensorgate::outbox::inspect(&outbox).unwrap().report;
    assert_eq!(
        (found.corrupt_skipped, found.torn_tail_bytes),
        (want_corrupt, want_torn),
        "{found:?}"
    );
    let before = rig.sink.with(|s| s.msgs.len());
    let gw = start_gateway(&text).await;
    let stats = gw.outbox().unwrap().stats();
    assert_eq!(
        stats.corrupt_skipped, want_corrupt,
        "the damage is counted: {stats:?}"
    );
    assert_eq!(stats.depth, want.len() as u64, "{stats:?}");
    rig.proxy.set_accepting(true);
    let delivered = |s: &common::upstream::SinkState| -> Vec<usize> {
        let mut v: Vec<usize> = s.msgs[before..]
            .iter()
            .map(|m| m.payload[..5].parse().unwrap())
            .collect();
        v.sort_unstable();
        v
    };
    rig.sink
        .wait("every intact stored message", LONG, |s| {
            delivered(s).len() >= want.len()
        })
        .await;
    assert_eq!(
        rig.sink.with(delivered),
        want,
        "exactly the intact records, each once (0..10 again: their acks were wiped)"
    );
    let again = want.iter().filter(|&&i| i < 10).count();
    println!(
        "after the damage: {} delivered, {again} redelivered (wiped acknowledgements), {} corrupt region(s) skipped, {} torn byte(s)",
        want.len(),
        stats.corrupt_skipped,
        want_torn
    );
    gw.shutdown().await;
}
