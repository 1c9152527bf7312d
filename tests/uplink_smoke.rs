//! The uplink against a real `mosquitto` upstream: local messages arrive upstream in order.

mod common;

use common::MosqSub;
use common::raw_publish;
use common::upstream::{MosqOptions, Mosquitto};

#[tokio::test]
async fn local_messages_reach_the_upstream_in_order_with_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mosq = Mosquitto::start(dir.path(), MosqOptions::default()).await;
    let up = mosq.addr();
    let mut sub = MosqSub::spawn(up, &["-t", "site/#", "-q", "1"]).await;
    let text = format!(
        r#"
data-dir = "{}"
gateway-id = "gw1"
[[broker.listener]]
bind = "127.0.0.1:0"
[upstream]
url = "mqtt://{up}"
reconnect-min = "50ms"
reconnect-max = "200ms"
[[upstream.out]]
filter = "sensors/#"
remote-prefix = "site/{{gateway}}/"
qos = 1
[outbox]
commit-delay = "5ms"
"#,
        dir.path().join("data").display()
    );
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
        if m.topic == "site/gw1/sensors/a/temp" {
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
    let text = format!(
        r#"
data-dir = "{}"
gateway-id = "gw1"
[broker]
sys-interval = "100ms"
[[broker.listener]]
bind = "127.0.0.1:0"
[upstream]
url = "mqtt://{up}"
reconnect-min = "50ms"
reconnect-max = "200ms"
[[upstream.out]]
filter = "sensors/#"
qos = 1
[outbox]
commit-delay = "5ms"
"#,
        dir.path().join("data").display()
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
