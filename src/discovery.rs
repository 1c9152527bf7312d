//! Home Assistant MQTT discovery: one retained `<prefix>/sensor/<unique_id>/config` per sensor a
//! node announced, so its readings appear in Home Assistant without any YAML.
//!
//! Each config follows Home Assistant's MQTT sensor schema: `name`, `unique_id`
//! (`sensorgate_<gateway>_<node>_<channel>`), `state_topic` (where the mapping publishes that
//! reading), `availability_topic` (the node's `online`/`offline`), `device_class`,
//! `unit_of_measurement`, `state_class`, `device` (the node, `via_device` the gateway) and
//! `origin`. The gateway itself is a device too, with a "Nodes online" sensor read from its status.
//!
//! Which nodes: every node in the registry that announced sensors; once the configuration has
//! `[[node]]` tables, only those. A config published before and no longer wanted (a node deleted
//! from the configuration, a channel a node stopped announcing, a rule that now drops it) is
//! withdrawn with an empty retained message. What was published is remembered in
//! `homeassistant.json` in the data directory, so withdrawal also works across restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::broker::BrokerHandle;
use crate::broker::codec::QoS;
use crate::decode::{Reading, SensorInfo};
use crate::health::{Nodes, availability_topic, status_topic};
use crate::map::{FrameFacts, Mapping};
use crate::registry::NodeRecord;
use sensorgate_wire::Quantity;

/// Remembers which config topics this gateway published.
pub const STATE_FILE: &str = "homeassistant.json";

/// `sensorgate_<gateway>` with characters Home Assistant's ids and topics accept.
pub fn gateway_device_id(gateway: &str) -> String {
    format!("sensorgate_{}", id_part(gateway))
}

/// `sensorgate_<gateway>_<node>`
pub fn node_device_id(gateway: &str, node: &str) -> String {
    format!("{}_{}", gateway_device_id(gateway), id_part(node))
}

/// `sensorgate_<gateway>_<node>_<channel>`: stable across restarts and renames.
pub fn unique_id(gateway: &str, node: &str, channel: u16) -> String {
    format!("{}_{channel}", node_device_id(gateway, node))
}

/// Letters, digits, `_` and `-` pass; anything else becomes `_` (discovery topics allow no more).
fn id_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn quantity(name: &str) -> Option<Quantity> {
    Quantity::ALL.iter().copied().find(|q| q.name() == name)
}

/// `state_class` for a quantity: counters and energy only grow, everything else is a
/// measurement (Home Assistant refuses `measurement` with the `energy` device class).
fn state_class(q: Option<Quantity>) -> &'static str {
    match q {
        Some(Quantity::Energy | Quantity::Counter) => "total_increasing",
        _ => "measurement",
    }
}

/// "Temperature", or the node's own name for the sensor.
fn entity_name(sensor: &SensorInfo, sensors: &BTreeMap<u16, SensorInfo>) -> String {
    if let Some(name) = &sensor.name {
        return name.clone();
    }
    let mut words = sensor.quantity.replace('_', " ");
    if let Some(first) = words.get(..1) {
        let upper = first.to_ascii_uppercase();
        words.replace_range(..1, &upper);
    }
    let same = sensors
        .values()
        .filter(|s| s.quantity == sensor.quantity && s.name.is_none())
        .count();
    if same > 1 {
        format!("{words} {}", sensor.channel)
    } else {
        words
    }
}

/// The discovery config of one node sensor, or `None` when the mapping drops its readings.
pub fn sensor_config(
    prefix: &str,
    gateway: &str,
    node: &str,
    rec: &NodeRecord,
    sensor: &SensorInfo,
    mapping: &Mapping,
) -> Option<(String, Value)> {
    let q = quantity(&sensor.quantity);
    let unit = sensor
        .unit
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| q.map(|q| q.unit().to_string()).filter(|u| !u.is_empty()));
    let probe = Reading {
        channel: sensor.channel,
        quantity: Some(sensor.quantity.clone()),
        unit: unit.clone(),
        value: 0.0,
        decimals: None,
    };
    let facts = FrameFacts {
        ts_ms: 0,
        seq: None,
    };
    let published = mapping.map(&rec.port, node, &probe, facts)?;
    let uid = unique_id(gateway, node, sensor.channel);
    let meta = mapping.nodes.get(node);
    let mut device = json!({
        "identifiers": [node_device_id(gateway, node)],
        "name": meta.and_then(|m| m.name.clone()).unwrap_or_else(|| format!("Node {node}")),
        "manufacturer": "sensorgate",
        "model": "sensorgate node",
        "via_device": gateway_device_id(gateway),
    });
    if let Some(fw) = &rec.firmware {
        device["sw_version"] = json!(fw);
    }
    if let Some(room) = meta.and_then(|m| m.room.clone()) {
        device["suggested_area"] = json!(room);
    }
    let mut config = json!({
        "name": entity_name(sensor, &rec.sensors),
        "unique_id": uid,
        "state_topic": published.topic,
        "availability_topic": availability_topic(gateway, node),
        "payload_available": "online",
        "payload_not_available": "offline",
        "state_class": state_class(q),
        "device": device,
        "origin": origin(),
    });
    if published.payload.first() == Some(&b'{') {
        config["value_template"] = json!("{{ value_json.value }}");
    }
    if let Some(class) = q.and_then(Quantity::device_class) {
        config["device_class"] = json!(class);
    }
    if let Some(unit) = unit {
        config["unit_of_measurement"] = json!(unit);
    }
    if published.qos != QoS::AtMostOnce {
        config["qos"] = json!(1);
    }
    Some((format!("{prefix}/sensor/{uid}/config"), config))
}

fn origin() -> Value {
    json!({"name": "sensorgate", "sw_version": env!("CARGO_PKG_VERSION")})
}

/// The gateway's own device, with one sensor: how many nodes are online.
pub fn gateway_config(prefix: &str, gateway: &str) -> (String, Value) {
    let uid = format!("{}_nodes_online", gateway_device_id(gateway));
    let config = json!({
        "name": "Nodes online",
        "unique_id": uid,
        "state_topic": status_topic(gateway),
        "value_template": "{{ value_json.nodes_online }}",
        "availability_topic": status_topic(gateway),
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "state_class": "measurement",
        "icon": "mdi:access-point-network",
        "device": {
            "identifiers": [gateway_device_id(gateway)],
            "name": format!("sensorgate {gateway}"),
            "manufacturer": "sensorgate",
            "model": "sensorgate gateway",
            "sw_version": env!("CARGO_PKG_VERSION"),
        },
        "origin": origin(),
    });
    (format!("{prefix}/sensor/{uid}/config"), config)
}

/// Every config that should be retained now, by topic.
pub fn wanted(
    prefix: &str,
    gateway: &str,
    nodes: &Nodes,
    mapping: &Mapping,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let (topic, config) = gateway_config(prefix, gateway);
    out.insert(topic, config.to_string());
    for (node, rec) in nodes {
        if !mapping.nodes.is_empty() && !mapping.nodes.contains_key(node) {
            continue;
        }
        for sensor in rec.sensors.values() {
            if let Some((topic, config)) =
                sensor_config(prefix, gateway, node, rec, sensor, mapping)
            {
                out.insert(topic, config.to_string());
            }
        }
    }
    out
}

/// Publishes discovery configs as the registry and the mapping change.
pub struct DiscoveryTask {
    pub prefix: String,
    pub gateway: String,
    pub broker: BrokerHandle,
    pub nodes: watch::Receiver<Arc<Nodes>>,
    pub mapping: watch::Receiver<Arc<Mapping>>,
    pub data_dir: PathBuf,
}

impl DiscoveryTask {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut published: BTreeMap<String, String> = BTreeMap::new();
        let mut remembered = load_state(&self.data_dir);
        loop {
            let nodes = self.nodes.borrow_and_update().clone();
            let mapping = self.mapping.borrow_and_update().clone();
            let want = wanted(&self.prefix, &self.gateway, &nodes, &mapping);
            for (topic, payload) in &want {
                if published.get(topic) != Some(payload) {
                    if self.send(topic, payload.clone()).await.is_err() {
                        return;
                    }
                    published.insert(topic.clone(), payload.clone());
                }
            }
            let gone: BTreeSet<String> = remembered
                .iter()
                .chain(published.keys())
                .filter(|t| !want.contains_key(*t))
                .cloned()
                .collect();
            for topic in &gone {
                tracing::info!(%topic, "withdrawing a Home Assistant entity");
                if self.send(topic, String::new()).await.is_err() {
                    return;
                }
                published.remove(topic);
            }
            let now: BTreeSet<String> = want.keys().cloned().collect();
            if now != remembered {
                save_state(&self.data_dir, &now);
                remembered = now;
            }
            tokio::select! {
                r = self.nodes.changed() => if r.is_err() { return },
                r = self.mapping.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn send(&self, topic: &str, payload: String) -> Result<(), crate::broker::Stopped> {
        self.broker
            .publish(topic, payload, QoS::AtLeastOnce, true)
            .await
    }
}

fn load_state(dir: &Path) -> BTreeSet<String> {
    std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_state(dir: &Path, topics: &BTreeSet<String>) {
    let bytes = serde_json::to_vec_pretty(topics).unwrap_or_default();
    if let Err(e) = crate::broker::store::write_atomically(&dir.join(STATE_FILE), &bytes, 0o644) {
        tracing::warn!("cannot remember the Home Assistant entities: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        crate::config::parse(
            "gateway-id = \"pi\"\n[[node]]\nid = 7\nname = \"Kitchen\"\nroom = \"kitchen\"\n",
            "t",
            None,
        )
        .unwrap()
        .mapping
    }

    fn node_with(sensors: &[(u16, &str, Option<&str>)]) -> NodeRecord {
        NodeRecord {
            port: "usb0".into(),
            firmware: Some("1.4.0".into()),
            sensors: sensors
                .iter()
                .map(|(c, q, u)| {
                    (
                        *c,
                        SensorInfo {
                            channel: *c,
                            quantity: q.to_string(),
                            unit: u.map(str::to_string),
                            name: None,
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Keys of Home Assistant's MQTT sensor schema (and the shared entity/device keys) used here.
    const SENSOR_KEYS: &[&str] = &[
        "name",
        "unique_id",
        "state_topic",
        "availability_topic",
        "availability_template",
        "payload_available",
        "payload_not_available",
        "device_class",
        "unit_of_measurement",
        "state_class",
        "value_template",
        "qos",
        "icon",
        "device",
        "origin",
    ];
    const DEVICE_KEYS: &[&str] = &[
        "identifiers",
        "name",
        "manufacturer",
        "model",
        "sw_version",
        "via_device",
        "suggested_area",
    ];
    /// Sensor device classes Home Assistant documents, with units it accepts for them.
    const DEVICE_CLASS_UNITS: &[(&str, &[&str])] = &[
        ("temperature", &["°C", "°F", "K"]),
        ("humidity", &["%"]),
        (
            "pressure",
            &["hPa", "Pa", "kPa", "mbar", "bar", "psi", "inHg", "mmHg"],
        ),
        ("voltage", &["V", "mV"]),
        ("battery", &["%"]),
        ("illuminance", &["lx"]),
        ("carbon_dioxide", &["ppm"]),
        ("current", &["A", "mA"]),
        ("power", &["W", "kW"]),
        ("energy", &["Wh", "kWh"]),
        ("pm25", &["µg/m³"]),
        ("moisture", &["%"]),
        ("distance", &["mm", "cm", "m", "km"]),
        ("signal_strength", &["dBm", "dB"]),
    ];

    #[test]
    fn every_quantity_gets_a_config_that_follows_the_documented_schema() {
        let m = mapping();
        for (i, q) in Quantity::ALL.iter().enumerate() {
            let channel = i as u16;
            let rec = node_with(&[(channel, q.name(), None)]);
            let sensor = &rec.sensors[&channel];
            let (topic, c) = sensor_config("homeassistant", "pi", "7", &rec, sensor, &m)
                .unwrap_or_else(|| panic!("{q:?} has a config"));
            let uid = format!("sensorgate_pi_7_{channel}");
            assert_eq!(topic, format!("homeassistant/sensor/{uid}/config"));
            for key in c.as_object().unwrap().keys() {
                assert!(
                    SENSOR_KEYS.contains(&key.as_str()),
                    "{q:?}: unknown key {key}"
                );
            }
            for key in c["device"].as_object().unwrap().keys() {
                assert!(
                    DEVICE_KEYS.contains(&key.as_str()),
                    "{q:?}: unknown device key {key}"
                );
            }
            assert_eq!(c["unique_id"], uid);
            assert_eq!(c["state_topic"], format!("sensors/Kitchen/{}", q.name()));
            assert_eq!(
                c["availability_topic"],
                "sensorgate/pi/nodes/7/availability"
            );
            assert_eq!(c["device"]["identifiers"], json!(["sensorgate_pi_7"]));
            assert_eq!(c["device"]["via_device"], "sensorgate_pi");
            assert_eq!(c["device"]["sw_version"], "1.4.0");
            assert_eq!(c["device"]["name"], "Kitchen");
            match q.device_class() {
                Some(class) => {
                    assert_eq!(c["device_class"], class);
                    let units = DEVICE_CLASS_UNITS
                        .iter()
                        .find(|(k, _)| *k == class)
                        .unwrap_or_else(|| panic!("{class} is not a documented device class"))
                        .1;
                    let unit = c["unit_of_measurement"].as_str().unwrap_or("");
                    assert!(
                        units.contains(&unit),
                        "{class} does not accept unit `{unit}`"
                    );
                }
                None => assert!(c.get("device_class").is_none()),
            }
            let expected_class = if matches!(q, Quantity::Energy | Quantity::Counter) {
                "total_increasing"
            } else {
                "measurement"
            };
            assert_eq!(c["state_class"], expected_class, "{q:?}");
        }
    }

    #[test]
    fn two_sensors_of_one_quantity_are_told_apart_by_channel() {
        let rec = node_with(&[
            (1, "temperature", Some("°C")),
            (2, "temperature", Some("°C")),
        ]);
        let (_, c) = sensor_config("ha", "pi", "7", &rec, &rec.sensors[&2], &mapping()).unwrap();
        assert_eq!(c["name"], "Temperature 2");
    }

    #[test]
    fn json_payloads_get_a_value_template() {
        let m = crate::config::parse("[mapping]\npayload = \"json\"\n", "t", None)
            .unwrap()
            .mapping;
        let rec = node_with(&[(0, "humidity", None)]);
        let (_, c) = sensor_config("ha", "pi", "7", &rec, &rec.sensors[&0], &m).unwrap();
        assert_eq!(c["value_template"], "{{ value_json.value }}");
    }

    #[test]
    fn a_dropped_reading_is_not_advertised() {
        let m = crate::config::parse("[mapping]\nunmapped = \"drop\"\n", "t", None)
            .unwrap()
            .mapping;
        let rec = node_with(&[(0, "humidity", None)]);
        assert!(sensor_config("ha", "pi", "7", &rec, &rec.sensors[&0], &m).is_none());
    }

    #[test]
    fn configured_nodes_limit_what_is_advertised() {
        let mut nodes = Nodes::new();
        nodes.insert("7".into(), node_with(&[(0, "temperature", None)]));
        nodes.insert("8".into(), node_with(&[(0, "temperature", None)]));
        let topics: Vec<String> = wanted("homeassistant", "pi", &nodes, &mapping())
            .into_keys()
            .collect();
        assert_eq!(
            topics,
            vec![
                "homeassistant/sensor/sensorgate_pi_7_0/config",
                "homeassistant/sensor/sensorgate_pi_nodes_online/config",
            ]
        );
    }

    #[test]
    fn ids_keep_only_characters_discovery_topics_accept() {
        assert_eq!(
            unique_id("pi.local", "a/b c", 3),
            "sensorgate_pi_local_a_b_c_3"
        );
    }
}
