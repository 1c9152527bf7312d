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
