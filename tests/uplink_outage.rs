//! Store and forward across uplink outages, against a real `mosquitto` behind a fault-injecting
//! proxy: messages accepted while the upstream is unreachable, cut, stalled or restarted all
//! arrive, in order per topic; QoS 2 arrives exactly once whichever packet the link dies after.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::proxy::{Dir, Kind, Proxy};
use common::upstream::{
    MosqOptions, Mosquitto, Sink, gateway_toml, missing_and_duplicates, start_gateway,
};
use common::{Raw, wire};

const STATUS: &str = "sensorgate/gw1/status";
const LONG: Duration = Duration::from_secs(30);

const RULES: &str = r#"
[[upstream.out]]
filter = "sensors/#"
remote-prefix = "site/{gateway}/"
qos = 2
"#;

/// Publishes every `(topic, payload)` at `qos` on one connection, pipelined, and completes
/// every handshake; returns once all are acknowledged.
async fn publish_all(c: &mut Raw, msgs: &[(String, String)], qos: u8) {
    let mut open = HashSet::new();
    for (k, (t, p)) in msgs.iter().enumerate() {
        let pid = u16::try_from(k % 60_000 + 1).unwrap();
        c.publish(t, p.as_bytes(), qos, false, pid).await;
        open.insert(pid);
    }
    while !open.is_empty() {
        let p = c.recv().await;
        match p.kind() {
            wire::PUBACK | wire::PUBCOMP => {
                open.remove(&p.pid());
            }
            wire::PUBREC => c.send(&wire::ack(wire::PUBREL, p.pid())).await,
            other => panic!("unexpected packet type {other} from the gateway"),
        }
    }
}

/// `n` messages round-robin over `topics` local topics, payload `tag-i`.
fn messages(tag: &str, n: usize, topics: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("sensors/t{}", i % topics), format!("{tag}-{i}")))
        .collect()
}

fn upstream_topic(local: &str) -> String {
    format!("site/gw1/{local}")
}

/// Asserts every message arrived exactly `once`, or at least once, and that the first
/// arrivals on each topic are in publish order. Returns the duplicates.
fn check_arrivals(sink: &Sink, sent: &[(String, String)], exactly_once: bool) -> usize {
    let topics: HashSet<&String> = sent.iter().map(|(t, _)| t).collect();
    let mut dups = 0;
    for t in topics {
        let want: Vec<String> = sent
            .iter()
            .filter(|(tt, _)| tt == t)
            .map(|(_, p)| p.clone())
            .collect();
        let wanted: HashSet<&String> = want.iter().collect();
        let got: Vec<String> = sink
            .with(|s| s.payloads(&upstream_topic(t)))
            .into_iter()
            .filter(|p| wanted.contains(p))
            .collect();
        let (missing, d) = missing_and_duplicates(&got, want.clone());
        assert!(missing.is_empty(), "{t}: missing upstream: {missing:?}");
        if exactly_once {
            assert_eq!(d, 0, "{t}: QoS 2 duplicates upstream: {got:?}");
        }
        dups += d;
        let mut seen = HashSet::new();
        let first: Vec<&String> = got.iter().filter(|p| seen.insert(*p)).collect();
        let want_order: Vec<&String> = want.iter().collect();
        assert_eq!(first, want_order, "{t}: order of first arrivals upstream");
    }
    dups
}

async fn wait_all(sink: &Sink, sent: &[(String, String)]) {
    let want: Vec<(String, String)> = sent
        .iter()
        .map(|(t, p)| (upstream_topic(t), p.clone()))
        .collect();
    sink.wait(&format!("{} messages", want.len()), LONG, |s| {
        s.has_all(&want)
    })
    .await;
}

struct Setup {
    _dir: tempfile::TempDir,
    up: Mosquitto,
    proxy: Proxy,
    sink: Sink,
    gw: sensorgate::Gateway,
    local: SocketAddr,
}

/// mosquitto, the subscriber (registered before the gateway can reach the upstream: the
/// proxy refuses until then), the proxy, and the gateway in-process.
async fn setup(opts: MosqOptions, upstream_extra: &str, accepting: bool) -> Setup {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("sensorgate=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start(dir.path(), opts).await;
    let proxy = Proxy::start(up.addr(), false).await;
    let sink = Sink::spawn(up.addr(), "counter", 2, &["site/#", STATUS]).await;
    let text = gateway_toml(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &format!("mqtt://{}", proxy.addr),
        upstream_extra,
        RULES,
        "",
    );
    let gw = start_gateway(&text).await;
    let local = gw.local_addrs()[0];
    proxy.set_accepting(accepting);
    Setup {
        _dir: dir,
        up,
        proxy,
        sink,
        gw,
        local,
    }
}

#[tokio::test]
async fn messages_accepted_while_the_upstream_is_unreachable_all_arrive_in_order_per_topic() {
    let s = setup(MosqOptions::default(), "", false).await;
    let (mut c, _) = Raw::connect(s.local, "producer", true).await;
    let q1 = messages("q1", 600, 3);
    publish_all(&mut c, &q1, 1).await;
    let q2: Vec<(String, String)> = (0..100)
        .map(|i| ("sensors/exact".to_string(), format!("q2-{i}")))
        .collect();
    publish_all(&mut c, &q2, 2).await;

    // Every acknowledged message is in the outbox; none went anywhere.
    let stats = s.gw.outbox().unwrap().stats();
    assert_eq!(stats.depth, 700, "{stats:?}");
    assert!(s.proxy.seen().refused > 0, "the gateway kept trying");
    assert_eq!(s.proxy.seen().accepted, 0);
    assert!(
        !s.gw
            .uplink_stats()
            .unwrap()
            .last_error
            .lock()
            .unwrap()
            .is_empty()
    );

    s.proxy.set_accepting(true);
    wait_all(&s.sink, &q1).await;
    wait_all(&s.sink, &q2).await;
    let dups = check_arrivals(&s.sink, &q1, false) + check_arrivals(&s.sink, &q2, true);
    println!("duplicates after the outage: {dups}");
    assert_eq!(dups, 0, "no fault while connected: nothing is sent twice");
    s.sink
        .wait("the retained online status", LONG, |st| {
            st.payloads(STATUS).last().map(String::as_str) == Some("online")
        })
        .await;
    s.gw.shutdown().await;
}

#[tokio::test]
async fn qos2_arrives_exactly_once_when_the_link_dies_after_publish_pubrec_or_pubrel() {
    let s = setup(MosqOptions::default(), "", true).await;
    let (mut c, _) = Raw::connect(s.local, "producer", true).await;
    let faults = [
        (Dir::Up, Kind::Publish2, 0, "after PUBLISH"),
        (Dir::Down, Kind::PubRec, 0, "after PUBREC"),
        (Dir::Up, Kind::PubRel, 0, "after PUBREL"),
        (Dir::Up, Kind::Publish2, 4, "after the 5th PUBLISH"),
        (Dir::Down, Kind::PubRec, 4, "after the 5th PUBREC"),
        (Dir::Up, Kind::PubRel, 4, "after the 5th PUBREL"),
        // The upstream holds up to `inflight` messages awaiting PUBREL: its quota is full
        // when the gateway reconnects.
        (Dir::Up, Kind::Publish2, 19, "after the 20th PUBLISH"),
    ];
    let mut all = Vec::new();
    for (round, (dir, kind, skip, what)) in faults.into_iter().enumerate() {
        let accepted = s.proxy.seen().accepted;
        s.proxy.cut_after(dir, kind, skip);
        let batch: Vec<(String, String)> = (0..20)
            .map(|i| (format!("sensors/q{}", i % 2), format!("r{round}-{i}")))
            .collect();
        publish_all(&mut c, &batch, 2).await;
        s.proxy
            .wait(what, LONG, |p| {
                p.fired > round as u64 && p.accepted > accepted
            })
            .await;
        wait_all(&s.sink, &batch).await;
        all.extend(batch);
    }
    // One more round trip, so a late duplicate of the last batch would show.
    let marker = vec![("sensors/q0".to_string(), "marker".to_string())];
    publish_all(&mut c, &marker, 2).await;
    wait_all(&s.sink, &marker).await;
    let dups = check_arrivals(&s.sink, &all, true);
    assert_eq!(dups, 0);
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_stalled_link_and_a_reset_mid_packet_lose_nothing() {
    let s = setup(MosqOptions::default(), "keep-alive = \"1s\"", true).await;
    let (mut c, _) = Raw::connect(s.local, "producer", true).await;
    let warm = messages("warm", 10, 2);
    publish_all(&mut c, &warm, 2).await;
    wait_all(&s.sink, &warm).await;

    // Stalled: sockets open, nothing moves; the gateway gives up on the silent link.
    s.proxy.stall(true);
    let closed = s.proxy.seen().closed;
    let stalled = messages("stalled", 50, 2);
    publish_all(&mut c, &stalled, 2).await;
    s.proxy
        .wait("the gateway to drop the stalled link", LONG, |p| {
            p.closed > closed
        })
        .await;
    s.proxy.stall(false);
    wait_all(&s.sink, &stalled).await;

    // Reset part-way through a packet, in each direction.
    for (round, dir) in [Dir::Up, Dir::Down].into_iter().enumerate() {
        let fired = s.proxy.seen().fired;
        s.proxy.reset_after(dir, 301);
        let batch = messages(&format!("reset{round}"), 100, 2);
        publish_all(&mut c, &batch, 1).await;
        s.proxy.wait("the reset", LONG, |p| p.fired > fired).await;
        wait_all(&s.sink, &batch).await;
        let dups = check_arrivals(&s.sink, &batch, false);
        println!("QoS 1 duplicates after a reset {dir:?}: {dups}");
    }
    assert_eq!(check_arrivals(&s.sink, &stalled, true), 0);
    s.gw.shutdown().await;
}

/// Restarts mosquitto with `persistence`; without it, the subscriber must resubscribe before
/// the gateway may reconnect (the proxy refuses until then).
async fn restart_upstream(persistence: bool) {
    let mut s = setup(
        MosqOptions {
            persistence,
            ..Default::default()
        },
        "",
        true,
    )
    .await;
    let (mut c, _) = Raw::connect(s.local, "producer", true).await;
    let before = messages("before", 100, 2);
    publish_all(&mut c, &before, 2).await;
    wait_all(&s.sink, &before).await;

    let subscribed = s.sink.with(|st| st.subscribed);
    let during = messages("during", 200, 2);
    if persistence {
        // Messages in flight while the upstream shuts down and saves its state.
        let publishing = publish_all(&mut c, &during, 2);
        let stopping = async {
            s.up.stop().await;
        };
        tokio::join!(publishing, stopping);
    } else {
        // What an upstream without persistence acknowledged is gone with it, so hold the
        // messages in the proxy: sent by the gateway (QoS 2 packet ids taken), never seen
        // upstream. The gateway may only come back once the subscriber has resubscribed.
        s.proxy.set_accepting(false);
        s.proxy.stall(true);
        let sent = s.proxy.seen();
        publish_all(&mut c, &during, 2).await;
        s.up.stop().await;
        s.proxy
            .wait("the link to close", LONG, |p| p.closed > sent.closed)
            .await;
        s.proxy.stall(false);
    }
    let down = messages("down", 100, 2);
    publish_all(&mut c, &down, 1).await;

    s.up.start_again().await;
    s.sink
        .wait("the subscriber to reconnect", LONG, |st| {
            st.subscribed > subscribed
        })
        .await;
    s.proxy.set_accepting(true);
    let after = messages("after", 100, 2);
    publish_all(&mut c, &after, 2).await;
    for batch in [&before, &during, &down, &after] {
        wait_all(&s.sink, batch).await;
    }
    let mut dups = 0;
    for batch in [&before, &during, &down, &after] {
        dups += check_arrivals(&s.sink, batch, false);
    }
    println!("upstream restart (persistence {persistence}): {dups} duplicates");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_restart_with_its_session_kept_loses_nothing() {
    restart_upstream(true).await;
}

#[tokio::test]
async fn an_upstream_restart_that_forgot_the_session_loses_nothing() {
    restart_upstream(false).await;
}

#[tokio::test]
async fn a_message_from_upstream_reaches_local_subscribers_and_is_not_forwarded_back() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let sink = Sink::spawn(up.addr(), "counter", 1, &["#"]).await;
    // The out-rule matches the local topic the in-rule publishes to: a loop if it forwarded.
    let rules = r#"
[[upstream.out]]
filter = "local/#"
remote-prefix = "up/"
qos = 1

[[upstream.in]]
filter = "cmd/{gateway}/#"
remote-prefix = "cmd/{gateway}/"
local-prefix = "local/cmd/"
qos = 1
"#;
    let text = gateway_toml(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &format!("mqtt://{}", up.addr()),
        "",
        rules,
        "",
    );
    let gw = start_gateway(&text).await;
    let local = gw.local_addrs()[0];
    let (mut c, _) = Raw::connect(local, "listener", true).await;
    c.subscribe(1, &[("local/#", 1)]).await;
    // Connected and subscribed upstream once "online" is there (SUBSCRIBE follows it).
    sink.wait("online", LONG, |st| {
        st.payloads(STATUS).iter().any(|p| p == "online")
    })
    .await;
    let up_pub = Raw::connect(up.addr(), "commander", true).await.0;
    let mut up_pub = up_pub;
    up_pub
        .publish_acked("cmd/gw1/nodes/3/set", b"reboot", 1, 1)
        .await;
    let m = tokio::time::timeout(LONG, c.recv_publish())
        .await
        .expect("the command reaches the local subscriber");
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("local/cmd/nodes/3/set", &b"reboot"[..])
    );
    c.ack_publish(&m).await;
    // A local message after it goes up; once it arrived, the command would have too.
    c.publish_acked("local/marker", b"m", 1, 2).await;
    sink.wait("the marker", LONG, |st| {
        !st.payloads("up/local/marker").is_empty()
    })
    .await;
    let echoed = sink.with(|st| {
        st.msgs
            .iter()
            .filter(|m| m.topic.starts_with("up/local/cmd"))
            .count()
    });
    assert_eq!(echoed, 0, "the command was forwarded back upstream");
    assert_eq!(
        gw.outbox().unwrap().stats().next_id,
        2,
        "only the marker was stored"
    );
    gw.shutdown().await;
}
