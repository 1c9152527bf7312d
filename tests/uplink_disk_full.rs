//! A full disk, for real: the gateway's data directory is a 2 MiB tmpfs mounted by the test.
//! Publishes the outbox cannot commit are not acknowledged (the producer keeps them and sends
//! again), the rest of the gateway carries on, and once space is freed everything that was
//! acknowledged reaches the upstream.
//!
//! Mounting needs root (or CAP_SYS_ADMIN), which `./scripts/test` has on the CI machine and
//! in a root container; where the mount is refused the test says so on stderr and ends
//! without checking anything.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::proxy::Proxy;
use common::upstream::{MosqOptions, Mosquitto, Sink, gateway_toml, start_gateway};
use common::{Raw, Read, wire};

const LONG: Duration = Duration::from_secs(30);

/// A tmpfs of `size` at `at`, unmounted when dropped.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "not run: cannot mount a tmpfs here ({}); run the tests as root",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs {
            at: at.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Publishes `payload` at QoS 1 under `pid`; `true` once PUBACK comes, `false` if the gateway
/// closes the connection instead (what it does when the outbox cannot commit the message).
async fn try_publish(c: &mut Raw, topic: &str, payload: &[u8], pid: u16) -> bool {
    c.publish(topic, payload, 1, false, pid).await;
    loop {
        match c.read_within(LONG).await {
            Read::Packet(p) if p.kind() == wire::PUBACK && p.pid() == pid => return true,
            Read::Packet(_) => {}
            Read::Closed => return false,
            Read::Nothing => panic!("neither PUBACK nor a closed connection for {pid}"),
        }
    }
}

#[tokio::test]
async fn a_full_disk_withholds_acknowledgements_keeps_the_broker_up_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_fs) = Tmpfs::mount(&data, "2m") else {
        return;
    };
    // Ballast: freed later to make room again.
    let ballast = data.join("ballast");
    std::fs::write(&ballast, vec![0u8; 512 * 1024]).unwrap();

    // The upstream is reachable only at the end, through a proxy that refuses until then.
    let up = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let sink = Sink::spawn(up.addr(), "counter", 1, &["site/#"]).await;
    let proxy = Proxy::start(up.addr(), false).await;
    let rules = "[[upstream.out]]\nfilter = \"sensors/#\"\nremote-prefix = \"site/\"\nqos = 1\n";
    let text = gateway_toml(
        &data,
        "127.0.0.1:0",
        &format!("mqtt://{}", proxy.addr),
        "",
        rules,
        "",
    );
    let gw = start_gateway(&text).await;
    let local = gw.local_addrs()[0];

    // Fill the disk: 1 KiB messages until one is refused.
    let payload = |i: u32| format!("{i:06}-{}", "x".repeat(1017)).into_bytes();
    let (mut c, _) = Raw::connect(local, "producer", true).await;
    let mut acked = BTreeSet::new();
    let mut i = 0u32;
    loop {
        let pid = u16::try_from(i % 60_000 + 1).unwrap();
        if !try_publish(&mut c, "sensors/a", &payload(i), pid).await {
            break;
        }
        acked.insert(i);
        i += 1;
        assert!(i < 10_000, "2 MiB never filled up");
    }
    let refused = i;
    println!("disk full after {} acknowledged messages", acked.len());
    assert!(acked.len() > 100, "only {} stored before full", acked.len());

    // The broker carries on: local QoS 0 traffic that is not forwarded still flows.
    let (mut sub, _) = Raw::connect(local, "local-sub", true).await;
    sub.subscribe(1, &[("local/#", 0)]).await;
    let (mut other, _) = Raw::connect(local, "local-pub", true).await;
    other.publish("local/t", b"still here", 0, false, 0).await;
    assert_eq!(sub.recv_publish().await.payload, b"still here");

    // Room again: the refused message and more are accepted.
    std::fs::remove_file(&ballast).unwrap();
    let (mut c, _) = Raw::connect(local, "producer", true).await;
    for j in refused..refused + 20 {
        let pid = u16::try_from(j % 60_000 + 1).unwrap();
        assert!(
            try_publish(&mut c, "sensors/a", &payload(j), pid).await,
            "message {j} refused after space was freed"
        );
        acked.insert(j);
    }

    // Everything acknowledged goes up.
    proxy.set_accepting(true);
    let want: BTreeSet<String> = acked
        .iter()
        .map(|&i| String::from_utf8(payload(i)).unwrap())
        .collect();
    sink.wait("every acknowledged message", LONG, |s| {
        let got: BTreeSet<String> = s.payloads("site/sensors/a").into_iter().collect();
        want.is_subset(&got)
    })
    .await;
    gw.shutdown().await;
}
