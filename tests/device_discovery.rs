//! Home Assistant discovery against the real broker: configs are retained as nodes announce
//! sensors, and withdrawn (empty retained payload) when a node is deleted from the configuration,
//! also across a restart.

use std::sync::Arc;

use sensorgate::broker::{Broker, InternalMessage};
use sensorgate::decode::SensorInfo;
use sensorgate::discovery::DiscoveryTask;
use sensorgate::health::Nodes;
use sensorgate::map::Mapping;
use sensorgate::registry::NodeRecord;
use tokio::sync::{mpsc, watch};

const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn mapping(nodes_toml: &str) -> Arc<Mapping> {
    let text = format!("gateway-id = \"pi\"\n{nodes_toml}");
    Arc::new(
        sensorgate::config::parse(&text, "t.toml", None)
            .unwrap()
            .mapping,
    )
}

fn nodes() -> Arc<Nodes> {
    let mut nodes = Nodes::new();
    for id in ["7", "8"] {
        let mut rec = NodeRecord {
            port: "usb0".into(),
            ..Default::default()
        };
        rec.sensors.insert(
            0,
            SensorInfo {
                channel: 0,
                quantity: "temperature".into(),
                unit: Some("°C".into()),
                name: None,
            },
        );
        nodes.insert(id.into(), rec);
    }
    Arc::new(nodes)
}

async fn next(rx: &mut mpsc::Receiver<InternalMessage>) -> (String, String) {
    let m = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a discovery message in time")
        .expect("broker running");
    (m.topic, String::from_utf8_lossy(&m.payload).into_owned())
}

#[tokio::test]
async fn a_node_deleted_from_the_configuration_is_withdrawn_from_home_assistant() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "data-dir = {:?}\n[broker]\npersistence = false\n[[broker.listener]]\nbind = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    let config = sensorgate::config::parse(&text, "t.toml", None).unwrap();
    let broker = Broker::start(&config).await.unwrap();
    let mut seen = broker
        .handle()
        .subscribe("homeassistant/#", 64)
        .await
        .unwrap();
    let two_nodes = "[[node]]\nid = 7\nname = \"Kitchen\"\n[[node]]\nid = 8\nname = \"Cellar\"\n";
    let task = |mapping: Arc<Mapping>| {
        let (nodes_tx, nodes_rx) = watch::channel(nodes());
        let (mapping_tx, mapping_rx) = watch::channel(mapping);
        let (stop_tx, stop_rx) = watch::channel(false);
        let t = DiscoveryTask {
            prefix: "homeassistant".into(),
            gateway: "pi".into(),
            broker: broker.handle(),
            nodes: nodes_rx,
            mapping: mapping_rx,
            data_dir: dir.path().to_path_buf(),
        };
        (tokio::spawn(t.run(stop_rx)), nodes_tx, mapping_tx, stop_tx)
    };

    let (running, _nodes_tx, mapping_tx, stop) = task(mapping(two_nodes));
    let mut topics = Vec::new();
    for _ in 0..3 {
        let (topic, payload) = next(&mut seen).await;
        let config: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert!(config["unique_id"].is_string(), "{payload}");
        topics.push(topic);
    }
    topics.sort();
    assert_eq!(
        topics,
        [
            "homeassistant/sensor/sensorgate_pi_7_0/config",
            "homeassistant/sensor/sensorgate_pi_8_0/config",
            "homeassistant/sensor/sensorgate_pi_nodes_online/config",
        ]
    );

    // Node 8 deleted from the configuration (a reload hands over the new mapping).
    let one_node = "[[node]]\nid = 7\nname = \"Kitchen\"\n";
    mapping_tx.send(mapping(one_node)).unwrap();
    assert_eq!(
        next(&mut seen).await,
        (
            "homeassistant/sensor/sensorgate_pi_8_0/config".to_string(),
            String::new()
        )
    );
    stop.send(true).unwrap();
    running.await.unwrap();

    // Across a restart: the gateway starts with node 7 deleted too and remembers it announced it.
    let (running, _n, _m, stop) = task(mapping("[[node]]\nid = 9\n"));
    let mut withdrawn = Vec::new();
    loop {
        let (topic, payload) = next(&mut seen).await;
        if payload.is_empty() {
            withdrawn.push(topic);
            break;
        }
    }
    assert_eq!(withdrawn, ["homeassistant/sensor/sensorgate_pi_7_0/config"]);
    stop.send(true).unwrap();
    running.await.unwrap();
}
