//! `backlog = "latest"`: after an outage only the newest message per topic goes upstream; the
//! superseded ones are skipped and counted, while `all` rules still deliver everything, and
//! QoS 2 records, which promise every message exactly once, are never superseded.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::proxy::Proxy;
use common::upstream::{MosqOptions, Mosquitto, Sink, gateway_toml, start_gateway};
use common::{Raw, wire};

const LONG: Duration = Duration::from_secs(30);

const RULES: &str = r#"
[[upstream.out]]
filter = "latest/#"
remote-prefix = "site/"
qos = 1
backlog = "latest"

[[upstream.out]]
filter = "latest2/#"
remote-prefix = "site/"
qos = 2
backlog = "latest"

[[upstream.out]]
filter = "sensors/#"
remote-prefix = "site/"
qos = 1
"#;

async fn publish_acked(c: &mut Raw, topic: &str, payload: &str, pid: u16) {
    c.publish(topic, payload.as_bytes(), 1, false, pid).await;
    loop {
        let p = c.recv().await;
        if p.kind() == wire::PUBACK && p.pid() == pid {
            return;
        }
    }
}

#[tokio::test]
async fn after_an_outage_a_latest_rule_sends_only_the_newest_message_per_topic() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let proxy = Proxy::start(up.addr(), false).await;
    let sink = Sink::spawn(up.addr(), "counter", 1, &["site/#"]).await;
    let text = gateway_toml(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &format!("mqtt://{}", proxy.addr),
        "",
        RULES,
        "",
    );
    let gw = start_gateway(&text).await;
    let (mut c, _) = Raw::connect(gw.local_addrs()[0], "producer", true).await;
    let mut pid = 1;
    for i in 0..10 {
        publish_acked(&mut c, "latest/a", &format!("a{i}"), pid).await;
        pid += 1;
    }
    for i in 0..5 {
        publish_acked(&mut c, "latest/b", &format!("b{i}"), pid).await;
        pid += 1;
        publish_acked(&mut c, "sensors/x", &format!("x{i}"), pid).await;
        pid += 1;
    }
    for i in 0..3 {
        c.publish_acked("latest2/c", format!("c{i}").as_bytes(), 2, pid)
            .await;
        pid += 1;
    }
    assert_eq!(
        gw.outbox().unwrap().stats().depth,
        23,
        "all stored during the outage"
    );

    proxy.set_accepting(true);
    sink.wait(
        "the newest of each topic and every sensors message",
        LONG,
        |s| {
            s.payloads("site/latest/a").contains(&"a9".to_string())
                && s.payloads("site/latest/b").contains(&"b4".to_string())
                && s.payloads("site/sensors/x").len() == 5
                && s.payloads("site/latest2/c").len() == 3
        },
    )
    .await;
    sink.with(|s| {
        assert_eq!(s.payloads("site/latest/a"), vec!["a9"]);
        assert_eq!(s.payloads("site/latest/b"), vec!["b4"]);
        assert_eq!(
            s.payloads("site/sensors/x"),
            vec!["x0", "x1", "x2", "x3", "x4"]
        );
        assert_eq!(s.payloads("site/latest2/c"), vec!["c0", "c1", "c2"]);
    });
    assert_eq!(
        gw.uplink_stats().unwrap().superseded.load(Relaxed),
        13,
        "9 + 4 skipped and counted"
    );
    gw.shutdown().await;
}
