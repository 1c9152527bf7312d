//! The uplink against a real `mosquitto` upstream: local messages arrive upstream in order; what
//! `$SYS` and the status topic say during an outage; unstored QoS 0; a rate-limited drain.

mod common;

use common::MosqSub;
use common::raw_publish;
use common::upstream::{MosqOptions, Mosquitto, gateway_toml};

#[tokio::test]
async fn local_messages_reach_the_upstream_in_order_with_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mosq = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let up = mosq.addr();
    let mut sub = MosqSub::spawn(up, &["-t", "site/#", "-q", "1"]).await;
    let text = gateway_text(dir.path(), up, 1, ("", "", ""));
    let gw = sensorgate::start(sensorgate::config::parse(&text, "t.toml", None).unwrap())
        .await
        .unwrap();
    let local = gw.local_addrs()[0];
    for i in 0..20 {
        raw_publish(local, "sensors/a/temp", format!("{i}").as_bytes(), 1, false).await;
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let m = sub.next().await;
        if m.topic == "site/sensors/a/temp" {
            got.push(m.payload);
        }
    }
    let want: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    gw.shutdown().await;
}

/// What a user watches during an outage: `$SYS/sensorgate/uplink/state`,
/// `outbox/depth` and `outbox/oldest-age`, and the same in the retained status JSON; all
/// follow the upstream going away and coming back.
#[tokio::test]
async fn sys_and_the_status_topic_report_the_link_the_depth_and_the_oldest_age() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosq = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let up = mosq.addr();
    mosq.stop().await;
    let text = gateway_text(
        dir.path(),
        up,
        1,
        ("", "", "[broker]\nsys-interval = \"100ms\""),
    );
    let gw = sensorgate::start(sensorgate::config::parse(&text, "t.toml", None).unwrap())
        .await
        .unwrap();
    let local = gw.local_addrs()[0];
    for i in 0..3 {
        raw_publish(local, "sensors/a", format!("{i}").as_bytes(), 1, false).await;
    }
    let (mut c, _) = common::Raw::connect(local, "watcher", true).await;
    c.subscribe(1, &[("$SYS/sensorgate/#", 0), ("sensorgate/gw1/status", 0)])
        .await;
    /// A topic and what its latest value must satisfy.
    type Want<'a> = (&'a str, &'a dyn Fn(&str) -> bool);
    // Reads until every `(topic, accept)` has held for the latest value of its topic.
    async fn until(c: &mut common::Raw, want: &[Want<'_>]) {
        let mut ok = vec![false; want.len()];
        common::within("the reported values", async {
            while !ok.iter().all(|&o| o) {
                let m = c.recv_publish().await;
                let text = String::from_utf8_lossy(&m.payload).into_owned();
                for (i, (topic, accept)) in want.iter().enumerate() {
                    if m.topic == *topic {
                        ok[i] = accept(&text);
                    }
                }
            }
        })
        .await;
    }
    let status = |state: &'static str, depth: u64, aged: bool| {
        move |json: &str| {
            let s: sensorgate::health::GatewayStatus = serde_json::from_str(json).unwrap();
            s.uplink.state == state
                && s.uplink.outbox == Some(depth)
                && s.uplink.oldest_age_s.is_some() == aged
        }
    };
    let down = status("disconnected", 3, true);
    until(
        &mut c,
        &[
            ("$SYS/sensorgate/uplink/state", &|v| v == "disconnected"),
            ("$SYS/sensorgate/outbox/depth", &|v| v == "3"),
            ("$SYS/sensorgate/outbox/oldest-age", &|v| {
                v.parse::<u64>().is_ok()
            }),
            ("sensorgate/gw1/status", &down),
        ],
    )
    .await;
    mosq.start_again().await;
    let up_again = status("connected", 0, false);
    until(
        &mut c,
        &[
            ("$SYS/sensorgate/uplink/state", &|v| v == "connected"),
            ("$SYS/sensorgate/outbox/depth", &|v| v == "0"),
            ("$SYS/sensorgate/uplink/delivered", &|v| v == "3"),
            ("sensorgate/gw1/status", &up_again),
        ],
    )
    .await;
    gw.shutdown().await;
}

/// The gateway against `up` with one out-rule, `sensors/#` → `site/sensors/#` at `rule_qos`;
/// `more` is appended after the rule (further tables), the extras go into their sections.
fn gateway_text(
    dir: &std::path::Path,
    up: std::net::SocketAddr,
    rule_qos: u8,
    (upstream_extra, outbox_extra, more): (&str, &str, &str),
) -> String {
    gateway_toml(
        &dir.join("data"),
        "127.0.0.1:0",
        &format!("mqtt://{up}"),
        upstream_extra,
        &format!(
            "[[upstream.out]]\nfilter = \"sensors/#\"\nremote-prefix = \"site/\"\nqos = {rule_qos}\n{more}"
        ),
        outbox_extra,
    )
}

/// `store-qos0 = false`: QoS 0 messages are not stored; while the upstream is away they are
/// dropped and counted, once it is back they go straight up.
#[tokio::test]
async fn unstored_qos0_is_dropped_and_counted_while_down_and_sent_while_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosq = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let up = mosq.addr();
    mosq.stop().await;
    let text = gateway_text(dir.path(), up, 0, ("", "store-qos0 = false", ""));
    let gw = sensorgate::start(sensorgate::config::parse(&text, "t.toml", None).unwrap())
        .await
        .unwrap();
    let first_id = gw.outbox().unwrap().stats().next_id;
    let (mut c, _) = common::Raw::connect(gw.local_addrs()[0], "producer", true).await;
    for i in 0..2 {
        c.publish("sensors/a", format!("lost{i}").as_bytes(), 0, false, 0)
            .await;
    }
    // The broker routes a client's packets in order: once PINGREQ is answered, both were.
    c.ping_barrier().await;
    let stats = gw.uplink_stats().unwrap();
    assert_eq!(
        stats
            .live_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    mosq.start_again().await;
    let sink = common::upstream::Sink::spawn(up, "counter", 0, &["#"]).await;
    sink.wait(
        "the gateway online",
        std::time::Duration::from_secs(30),
        |s| {
            s.payloads("sensorgate/gw1/status")
                .iter()
                .any(|p| p == "online")
        },
    )
    .await;
    for i in 0..3 {
        c.publish("sensors/a", format!("m{i}").as_bytes(), 0, false, 0)
            .await;
    }
    sink.wait(
        "three live messages",
        std::time::Duration::from_secs(30),
        |s| s.payloads("site/sensors/a").len() == 3,
    )
    .await;
    assert_eq!(
        sink.with(|s| s.payloads("site/sensors/a")),
        ["m0", "m1", "m2"]
    );
    assert_eq!(
        gw.outbox().unwrap().stats().next_id,
        first_id,
        "nothing was stored"
    );
    gw.shutdown().await;
}

/// `drain-rate` throttles the catch-up after an outage; throttled, the backlog still arrives
/// whole and in order.
#[tokio::test]
async fn a_rate_limited_drain_delivers_the_whole_backlog_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosq = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let up = mosq.addr();
    mosq.stop().await;
    let text = gateway_text(dir.path(), up, 1, ("drain-rate = 500", "", ""));
    let gw = sensorgate::start(sensorgate::config::parse(&text, "t.toml", None).unwrap())
        .await
        .unwrap();
    let (mut c, _) = common::Raw::connect(gw.local_addrs()[0], "producer", true).await;
    for i in 0..200u16 {
        c.publish_acked("sensors/a", format!("{i}").as_bytes(), 1, i + 1)
            .await;
    }
    mosq.start_again().await;
    let sink = common::upstream::Sink::spawn(up, "counter", 1, &["site/#"]).await;
    sink.wait("the backlog", std::time::Duration::from_secs(30), |s| {
        s.payloads("site/sensors/a").len() >= 200
    })
    .await;
    let want: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(sink.with(|s| s.payloads("site/sensors/a")), want);
    gw.shutdown().await;
}
