//! `sensorgate demo` end to end: the simulated nodes' frames cross real pseudo-terminals into
//! the gateway and come out of its broker to an MQTT subscriber.

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sensorgate::demo::{DemoOptions, start_demo};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn all_three_nodes_publish_sensible_values_and_the_noisy_one_is_counted() {
    let opts = DemoOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        period: Duration::from_millis(50),
        sys_interval: Duration::from_millis(100),
        seed: Some(0x5eed),
        ..Default::default()
    };
    let demo = start_demo(opts).await.expect("demo starts");
    let data_dir = demo.data_dir.clone();
    assert!(demo.temporary && data_dir.is_dir());
    let addr = demo.gateway.local_addrs()[0];

    let mut mqtt = MqttOptions::new("demo-test", addr.ip().to_string(), addr.port());
    mqtt.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(mqtt, 100);
    for filter in [
        "sensors/#",
        "$SYS/sensorgate/ports/garden/errors/crc",
        "$SYS/sensorgate/ports/garden/duplicates",
    ] {
        client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
    }

    // Topic → plausible range of its value.
    let expected: BTreeMap<&str, (f64, f64)> = [
        ("sensors/living-room/temperature", (15.0, 30.0)),
        ("sensors/greenhouse/temperature", (15.0, 35.0)),
        ("sensors/greenhouse/humidity", (30.0, 100.0)),
        ("sensors/garden/moisture", (0.0, 100.0)),
        ("sensors/garden/battery", (3.0, 4.3)),
    ]
    .into_iter()
    .collect();
    let mut seen = BTreeMap::new();
    let (mut crc_errors, mut duplicates) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < expected.len() || crc_errors == 0 || duplicates == 0 {
        let Ok(event) = tokio::time::timeout_at(deadline, events.poll()).await else {
            panic!("timed out: seen {seen:?}, crc errors {crc_errors}, duplicates {duplicates}")
        };
        let event = event.expect("connection");
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        let payload = String::from_utf8_lossy(&p.payload).into_owned();
        match p.topic.as_str() {
            "$SYS/sensorgate/ports/garden/errors/crc" => crc_errors = payload.parse().unwrap(),
            "$SYS/sensorgate/ports/garden/duplicates" => duplicates = payload.parse().unwrap(),
            topic => {
                let Some(&(lo, hi)) = expected.get(topic) else {
                    panic!("unexpected topic {topic} = {payload}")
                };
                let value: f64 = payload
                    .parse()
                    .unwrap_or_else(|_| panic!("{topic}: `{payload}` is not a number"));
                assert!((lo..=hi).contains(&value), "{topic} = {value}");
                seen.insert(topic.to_string(), value);
            }
        }
    }

    demo.shutdown().await;
    assert!(
        !data_dir.exists(),
        "the temporary data directory is removed"
    );
}

#[tokio::test]
async fn the_demo_refuses_a_network_listener() {
    let opts = DemoOptions {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..Default::default()
    };
    let err = start_demo(opts).await.err().expect("refused");
    assert!(err.to_string().contains("loopback"), "{err}");
}
