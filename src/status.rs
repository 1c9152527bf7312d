//! `sensorgate status`: asks a running gateway's broker for its retained status and prints it as
//! tables, like `mosquitto_sub` and a person's eyes would.
//!
//! It subscribes to `sensorgate/+/status`, `sensorgate/+/nodes/+/availability` and
//! `$SYS/broker/#`, then publishes to a topic of its own that it also subscribed to. The broker
//! handles one connection's packets in order, so when that marker comes back every retained
//! message has arrived: no waiting for a quiet period.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::health::GatewayStatus;

/// What `sensorgate status` read from the broker.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub status: Option<GatewayStatus>,
    /// Node id → `online` / `offline`, from the availability topics.
    pub availability: BTreeMap<String, String>,
    /// `$SYS/broker/...` leaf (e.g. `clients/connected`) → value.
    pub sys: BTreeMap<String, String>,
}

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the broker at {host}:{port}: {message}")]
    Connect {
        host: String,
        port: u16,
        message: String,
    },
    #[error("no answer from the broker within {0:?}")]
    Timeout(Duration),
}

/// Connects to `host:port`, reads the retained status and returns it.
pub async fn fetch(
    host: &str,
    port: u16,
    credentials: Option<(String, String)>,
    timeout: Duration,
) -> Result<Snapshot, Error> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let id = format!("sensorgate-status-{}", std::process::id());
    let marker = format!("sensorgate-status/{id}/done");
    let mut options = MqttOptions::new(&id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, mut events) = AsyncClient::new(options, 16);
    let connect_error = |message: String| Error::Connect {
        host: host.to_string(),
        port,
        message,
    };
    for filter in [
        "sensorgate/+/status",
        "sensorgate/+/nodes/+/availability",
        "$SYS/broker/#",
        marker.as_str(),
    ] {
        client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
    }
    client
        .publish(&marker, QoS::AtMostOnce, false, "done")
        .await
        .map_err(|e| connect_error(e.to_string()))?;

    let mut snapshot = Snapshot::default();
    let read = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == marker {
                        return Ok(());
                    }
                    snapshot.absorb(&p.topic, &String::from_utf8_lossy(&p.payload));
                }
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code != rumqttc::ConnectReturnCode::Success =>
                {
                    return Err(connect_error(format!("refused: {:?}", ack.code)));
                }
                Ok(_) => {}
                Err(e) => return Err(connect_error(e.to_string())),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Error::Timeout(timeout))??;
    let _ = client.disconnect().await;
    Ok(snapshot)
}

impl Snapshot {
    /// Files one retained message into the snapshot.
    pub fn absorb(&mut self, topic: &str, payload: &str) {
        if let Some(leaf) = topic.strip_prefix("$SYS/broker/") {
            self.sys.insert(leaf.to_string(), payload.to_string());
            return;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        match levels.as_slice() {
            ["sensorgate", _, "status"] if self.status.is_none() => {
                self.status = serde_json::from_str(payload).ok();
            }
            ["sensorgate", _, "nodes", node, "availability"] => {
                self.availability
                    .insert(node.to_string(), payload.to_string());
            }
            _ => {}
        }
    }
}

/// "4s ago", "12m ago", "3h ago", "2d ago"; "never" for 0.
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn uptime(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
fn table(headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i > 0 {
                line.push_str("  ");
            }
            if headers[i].1 == Align::Right {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The terminal view of a snapshot at `now_ms`.
pub fn render(s: &Snapshot, now_ms: u64) -> String {
    use Align::{Left, Right};
    let mut out = String::new();
    let Some(st) = &s.status else {
        out.push_str("no gateway status on this broker (is `sensorgate run` serving it?)\n");
        return out;
    };
    let sys = |k: &str| s.sys.get(k).map(String::as_str).unwrap_or("?");
    out.push_str(&format!(
        "gateway  {} ({}, sensorgate {}, up {})\n",
        st.gateway,
        st.state,
        st.version,
        uptime(now_ms.saturating_sub(st.started_ms) / 1000)
    ));
    let mut uplink = st.uplink.state.clone();
    if let Some(n) = st.uplink.outbox {
        uplink.push_str(&format!(", outbox {n}"));
    }
    if let Some(age) = st.uplink.oldest_age_s {
        uplink.push_str(&format!(", oldest {age} s"));
    }
    out.push_str(&format!("uplink   {uplink}\n"));
    out.push_str(&format!(
        "broker   {} clients, {} received, {} sent, {} dropped, {} retained\n",
        sys("clients/connected"),
        sys("messages/received"),
        sys("messages/sent"),
        sys("messages/dropped"),
        sys("retained messages/count"),
    ));
    out.push('\n');
    if st.ports.is_empty() {
        out.push_str("no serial ports configured\n");
    } else {
        let rows: Vec<Vec<String>> = st
            .ports
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    if p.open { "open" } else { "closed" }.into(),
                    p.bytes.to_string(),
                    p.frames.to_string(),
                    p.errors.to_string(),
                    p.duplicates.to_string(),
                    ago(p.last_frame_ms, now_ms),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                ("PORT", Left),
                ("STATE", Left),
                ("BYTES", Right),
                ("FRAMES", Right),
                ("ERRORS", Right),
                ("DUPS", Right),
                ("LAST FRAME", Left),
            ],
            &rows,
        ));
    }
    out.push('\n');
    if st.nodes.is_empty() {
        out.push_str("no nodes heard yet\n");
    } else {
        let rows: Vec<Vec<String>> = st
            .nodes
            .iter()
            .map(|n| {
                let availability = s
                    .availability
                    .get(&n.id)
                    .cloned()
                    .unwrap_or_else(|| if n.online { "online" } else { "offline" }.into());
                let battery = match (n.battery_pct, n.battery_mv) {
                    (Some(p), _) => format!("{p}%"),
                    (None, Some(mv)) => format!("{mv} mV"),
                    (None, None) => "-".into(),
                };
                vec![
                    n.id.clone(),
                    n.name.clone().unwrap_or_else(|| "-".into()),
                    availability,
                    n.port.clone(),
                    ago(n.last_seen_ms, now_ms),
                    battery,
                    n.rssi_dbm
                        .map_or_else(|| "-".into(), |r| format!("{r} dBm")),
                    n.firmware.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                ("NODE", Left),
                ("NAME", Left),
                ("STATUS", Left),
                ("PORT", Left),
                ("LAST SEEN", Left),
                ("BATTERY", Right),
                ("RSSI", Right),
                ("FIRMWARE", Left),
            ],
            &rows,
        ));
        out.push_str(&format!(
            "{}/{} nodes online\n",
            st.nodes_online, st.nodes_total
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{NodeStatus, PortStatus, UplinkStatus};

    const NOW: u64 = 1_764_000_000_000;

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        let status = GatewayStatus {
            gateway: "pi".into(),
            state: "online".into(),
            version: "0.1.0".into(),
            started_ms: NOW - 7_380_000,
            uplink: UplinkStatus {
                state: "connected".into(),
                outbox: Some(0),
                oldest_age_s: None,
            },
            ports: vec![
                PortStatus {
                    name: "usb0".into(),
                    open: true,
                    bytes: 120_345,
                    frames: 3_101,
                    errors: 2,
                    duplicates: 5,
                    last_frame_ms: NOW - 4_000,
                },
                PortStatus {
                    name: "radio".into(),
                    ..Default::default()
                },
            ],
            nodes_online: 1,
            nodes_total: 2,
            nodes: vec![
                NodeStatus {
                    id: "7".into(),
                    name: Some("Kitchen".into()),
                    online: true,
                    port: "usb0".into(),
                    last_seen_ms: NOW - 12_000,
                    battery_pct: Some(87),
                    battery_mv: Some(3010),
                    rssi_dbm: Some(-71),
                    firmware: Some("1.4.0".into()),
                },
                NodeStatus {
                    id: "12".into(),
                    port: "usb0".into(),
                    last_seen_ms: NOW - 3 * 3_600_000,
                    battery_mv: Some(2750),
                    ..Default::default()
                },
            ],
        };
        s.absorb(
            "sensorgate/pi/status",
            &serde_json::to_string(&status).unwrap(),
        );
        s.absorb("sensorgate/pi/nodes/7/availability", "online");
        s.absorb("sensorgate/pi/nodes/12/availability", "offline");
        for (k, v) in [
            ("clients/connected", "3"),
            ("messages/received", "5120"),
            ("messages/sent", "4980"),
            ("messages/dropped", "0"),
            ("retained messages/count", "41"),
        ] {
            s.absorb(&format!("$SYS/broker/{k}"), v);
        }
        s
    }

    #[test]
    fn the_status_view_renders_ports_and_nodes_as_aligned_tables() {
        let expected = "\
gateway  pi (online, sensorgate 0.1.0, up 2h 03m)
uplink   connected, outbox 0
broker   3 clients, 5120 received, 4980 sent, 0 dropped, 41 retained

PORT   STATE    BYTES  FRAMES  ERRORS  DUPS  LAST FRAME
usb0   open    120345    3101       2     5  4s ago
radio  closed       0       0       0     0  never

NODE  NAME     STATUS   PORT  LAST SEEN  BATTERY     RSSI  FIRMWARE
7     Kitchen  online   usb0  12s ago        87%  -71 dBm  1.4.0
12    -        offline  usb0  3h ago     2750 mV        -  -
1/2 nodes online
";
        assert_eq!(render(&snapshot(), NOW), expected);
    }

    #[test]
    fn a_broker_without_a_gateway_status_says_so() {
        assert!(render(&Snapshot::default(), NOW).starts_with("no gateway status"));
    }

    #[test]
    fn ages_read_in_the_largest_whole_unit() {
        assert_eq!(ago(NOW - 59_999, NOW), "59s ago");
        assert_eq!(ago(NOW - 60_000, NOW), "1m ago");
        assert_eq!(ago(NOW - 2 * 86_400_000, NOW), "2d ago");
        assert_eq!(ago(0, NOW), "never");
    }
}
