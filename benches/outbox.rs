//! Outbox benchmark: append rate with group commit, and bytes written to the block layer per
//! message (from `/proc/self/io` `write_bytes`, which is 0 on tmpfs, so it runs under
//! `target/`). Run with `cargo bench --bench outbox`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::filesystem;
use sensorgate::outbox::{Outbox, OutboxConfig, Qos, Record};

const PAYLOAD: usize = 100;

fn record(n: u64) -> Record {
    Record {
        topic: format!("site/gw1/node{}/temperature", n % 16),
        payload: Bytes::from(vec![b'x'; PAYLOAD]),
        qos: Qos::AtLeastOnce,
        retain: false,
        timestamp_ms: n,
    }
}

fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn describe(config: &OutboxConfig) -> String {
    format!(
        "commit_delay {} ms, commit_bytes {} KiB",
        config.commit_delay.as_millis(),
        config.commit_bytes / 1024
    )
}

/// Many producers, each awaiting its own append in a loop, so batches form.
async fn concurrent(root: &Path, config: OutboxConfig, producers: u64, secs: u64) {
    let label = describe(&config);
    let (outbox, _) = Outbox::open(fresh_dir(root, "concurrent"), config).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (outbox, done, stop) = (outbox.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = p;
            while !stop.load(Ordering::Relaxed) {
                let id = outbox.append(record(n)).await.unwrap();
                outbox.ack(id);
                done.fetch_add(1, Ordering::Relaxed);
                n += producers;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let stats = outbox.stats();
    println!(
        "append, {producers} concurrent producers ({label}): {:.0} msg/s, {:.1} records per commit",
        n as f64 / elapsed,
        n as f64 / stats.commits.max(1) as f64
    );
    outbox.close().await.unwrap();
}

/// One producer that waits for each commit before the next append.
async fn single(root: &Path, config: OutboxConfig, secs: u64) {
    let label = describe(&config);
    let (outbox, _) = Outbox::open(fresh_dir(root, "single"), config).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    let mut worst = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let id = outbox.append(record(n)).await.unwrap();
        worst = worst.max(t.elapsed());
        outbox.ack(id);
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "append, 1 producer awaiting each commit ({label}): {:.1} msg/s, mean {:.1} ms, worst {:.1} ms per commit",
        n as f64 / elapsed,
        elapsed * 1000.0 / n as f64,
        worst.as_secs_f64() * 1000.0
    );
    outbox.close().await.unwrap();
}

/// A steady producer at `rate` msg/s for `secs`, with an uplink that acknowledges what it
/// reads; reports `write_bytes` per message.
async fn wear(root: &Path, config: OutboxConfig, rate: u64, secs: u64) {
    let label = describe(&config);
    let (outbox, _) = Outbox::open(fresh_dir(root, "wear"), config).unwrap();
    // Warm up: the first commit creates and preallocates the segment.
    let first = outbox.append(record(0)).await.unwrap();
    let frame = outbox.stats().bytes;
    outbox.ack(first);
    outbox.flush().await.unwrap();

    let uplink = {
        let outbox = outbox.clone();
        let mut cursor = outbox.cursor();
        tokio::spawn(async move {
            loop {
                let batch = cursor.next_batch(256).await.unwrap();
                if batch.is_empty() {
                    cursor.wait_for_more().await;
                }
                for p in batch {
                    outbox.ack(p.id);
                }
            }
        })
    };

    let before = write_bytes();
    let start = Instant::now();
    let total = rate * secs;
    let per_tick = (rate / 1000).max(1);
    let tick = Duration::from_secs_f64(per_tick as f64 / rate as f64);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tickets = Vec::with_capacity(total as usize);
    let mut n = 0;
    while n < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - n) {
            n += 1;
            let t = outbox.append(record(n));
            tickets.push(tokio::spawn(t));
        }
    }
    let issued = start.elapsed().as_secs_f64();
    for t in tickets {
        t.await.unwrap().unwrap();
    }
    let steady = write_bytes() - before;
    let commits = outbox.stats().commits;
    // Let the uplink acknowledge the last records and commit those acks: an end effect that
    // a continuous stream would not pay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    outbox.flush().await.unwrap();
    let with_tail = write_bytes() - before;
    uplink.abort();
    let per = |w: u64| w as f64 / total as f64;
    println!(
        "wear at {rate} msg/s for {secs} s ({label}): {total} messages of {frame} bytes ({:.0} msg/s issued), {commits} commits; \
         write_bytes {steady} = {:.0} bytes/message ({:.2}x the record) until the last commit; \
         {with_tail} = {:.0} bytes/message ({:.2}x) including the final ack commit",
        total as f64 / issued,
        per(steady),
        per(steady) / frame as f64,
        per(with_tail),
        per(with_tail) / frame as f64,
    );
    outbox.close().await.unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/outbox-bench");
    std::fs::create_dir_all(&root).unwrap();
    println!(
        "outbox benchmark in {} on {}; payload {PAYLOAD} bytes",
        root.display(),
        filesystem(&root)
    );
    if write_bytes() == 0 && std::fs::read_to_string("/proc/self/io").is_err() {
        println!("note: /proc/self/io is not readable; byte figures will be 0");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let default = OutboxConfig::default();
    let fast = OutboxConfig {
        commit_delay: Duration::from_millis(10),
        ..OutboxConfig::default()
    };
    rt.block_on(async {
        concurrent(&root, default.clone(), 1000, 2).await;
        concurrent(&root, fast.clone(), 1000, 2).await;
        single(&root, default.clone(), 2).await;
        single(&root, fast.clone(), 2).await;
        wear(&root, default.clone(), 10, 3).await;
        wear(&root, fast.clone(), 10, 3).await;
        wear(&root, default.clone(), 10_000, 3).await;
        wear(&root, fast.clone(), 10_000, 3).await;
    });
    let _ = std::fs::remove_dir_all(&root);
}
