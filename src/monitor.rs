//! `sensorgate monitor`: what a serial port says, decoded, one line per outcome, for wiring and
//! debugging a node. The formatting is pure ([`Monitor::lines`]); [`run`] only moves bytes.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;

use sensorgate::config::PortConfig;
use sensorgate::decode::{Body, Decoded, NodeSource, Observation, Protocol};
use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;

/// How lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours (only when stdout is a terminal).
    pub colour: bool,
    /// A second line with the outcome's raw bytes; ignored bytes get a line too.
    pub hex: bool,
}

const RESET: &str = "\x1b[0m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[1;31m";

/// Formats outcomes, remembering what each node announced so its readings name their quantity.
#[derive(Debug, Default)]
pub struct Monitor {
    style: Style,
    /// `(node, channel)` → (quantity, unit symbol) from the node's Hello.
    sensors: HashMap<(String, u16), (String, Option<String>)>,
}

impl Monitor {
    pub fn new(style: Style) -> Monitor {
        Monitor {
            style,
            sensors: HashMap::new(),
        }
    }

    /// The lines for one outcome whose bytes are `raw`, stamped `time`. Ignored bytes (lone
    /// delimiters, blank lines) are shown only with `hex`.
    pub fn lines(&mut self, time: &str, outcome: &Decoded, raw: &[u8]) -> Vec<String> {
        let (node, kind, fields) = match outcome {
            Decoded::Observation { obs, .. } => {
                let (kind, fields) = self.describe(obs);
                (format!("node {}", obs.node), kind, fields)
            }
            Decoded::Error { fault, detail, .. } => (
                "-".to_string(),
                "error",
                format!("{fault}: {detail} ({})", plural(raw.len(), "byte")),
            ),
            Decoded::Ignored { bytes } => {
                if !self.style.hex {
                    return Vec::new();
                }
                ("-".to_string(), "ignored", plural(*bytes, "byte"))
            }
        };
        let mut line = if self.style.colour {
            let colour = match kind {
                "readings" => "\x1b[32m",
                "hello" => "\x1b[36m",
                "heartbeat" => "\x1b[34m",
                "log" => "\x1b[33m",
                "error" => RED,
                _ => DIM,
            };
            let fields = if kind == "error" {
                format!("{RED}{fields}{RESET}")
            } else {
                fields
            };
            format!("{DIM}{time}{RESET}  {node:<9} {colour}{kind:<10}{RESET} {fields}")
        } else {
            format!("{time}  {node:<9} {kind:<10} {fields}")
        };
        line.truncate(line.trim_end().len());
        let mut out = vec![line];
        if self.style.hex {
            let pad = " ".repeat(time.len() + 2);
            let bytes = hex(raw);
            out.push(if self.style.colour {
                format!("{pad}{DIM}{bytes}{RESET}")
            } else {
                format!("{pad}{bytes}")
            });
        }
        out
    }

    /// The kind and the fields of an observation.
    fn describe(&mut self, obs: &Observation) -> (&'static str, String) {
        let frame = obs
            .frame
            .map(|f| format!("  [boot {:08x} seq {}]", f.boot_id, f.seq))
            .unwrap_or_default();
        let link = obs
            .link
            .map(|l| format!("  [rssi {} dBm snr {} dB]", l.rssi_dbm, l.snr_db))
            .unwrap_or_default();
        let (kind, fields) = match &obs.body {
            Body::Readings(readings) => {
                let list: Vec<String> = readings
                    .iter()
                    .map(|r| {
                        let known = self.sensors.get(&(obs.node.clone(), r.channel));
                        let quantity = r
                            .quantity
                            .as_deref()
                            .or(known.map(|k| k.0.as_str()))
                            .unwrap_or("?");
                        let unit = r
                            .unit
                            .as_deref()
                            .or(known.and_then(|k| k.1.as_deref()))
                            .map(|u| format!(" {u}"))
                            .unwrap_or_default();
                        format!(
                            "ch{} {quantity}={}{unit}",
                            r.channel,
                            number(r.value, r.decimals)
                        )
                    })
                    .collect();
                ("readings", list.join(", "))
            }
            Body::Hello {
                firmware,
                sensors,
                complete,
                interval_s,
            } => {
                if *complete {
                    self.sensors.retain(|(node, _), _| *node != obs.node);
                }
                let mut parts = Vec::new();
                if let Some(fw) = firmware {
                    parts.push(format!("firmware {fw}"));
                }
                if let Some(s) = interval_s {
                    parts.push(format!("reports every {s} s"));
                }
                let list: Vec<String> = sensors
                    .iter()
                    .map(|s| {
                        self.sensors.insert(
                            (obs.node.clone(), s.channel),
                            (s.quantity.clone(), s.unit.clone()),
                        );
                        let unit = s.unit.as_deref().map(|u| format!(" [{u}]"));
                        let name = s.name.as_deref().map(|n| format!(" \"{n}\""));
                        format!(
                            "ch{} {}{}{}",
                            s.channel,
                            s.quantity,
                            unit.unwrap_or_default(),
                            name.unwrap_or_default()
                        )
                    })
                    .collect();
                if !list.is_empty() {
                    parts.push(format!("sensors: {}", list.join(", ")));
                }
                ("hello", parts.join(", "))
            }
            Body::Heartbeat {
                battery_mv,
                battery_pct,
                uptime_s,
                dropped,
            } => {
                let mut parts = Vec::new();
                if let Some(mv) = battery_mv {
                    parts.push(format!("battery {mv} mV"));
                }
                if let Some(pct) = battery_pct {
                    parts.push(format!("battery {pct} %"));
                }
                if let Some(s) = uptime_s {
                    parts.push(format!("uptime {s} s"));
                }
                if let Some(d) = dropped {
                    parts.push(format!("dropped {d}"));
                }
                ("heartbeat", parts.join(", "))
            }
            Body::Log { level, text } => ("log", format!("{level}: {text}")),
            Body::CommandAck {
                of,
                accepted,
                reason,
            } => (
                "cmd-ack",
                format!(
                    "{}{} boot {:08x} seq {}",
                    if *accepted { "accepted" } else { "refused" },
                    reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                    of.boot_id,
                    of.seq
                ),
            ),
        };
        (kind, format!("{fields}{frame}{link}"))
    }
}

/// A value as the sender gave it: its decimals when known, else the shortest form.
fn number(value: f64, decimals: Option<u8>) -> String {
    match decimals {
        Some(d) => format!("{value:.*}", usize::from(d)),
        None => format!("{value}"),
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Bytes as space-separated hex pairs.
pub fn hex(bytes: &[u8]) -> String {
    let pairs: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    pairs.join(" ")
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
pub fn clock(unix_ms: u64) -> String {
    let ms = unix_ms % 1000;
    let s = unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600, s / 60 % 60, s % 60)
}

/// The bytes fed to a decoder and not yet accounted for, so each outcome can show its own:
/// outcomes account for every byte, in order.
#[derive(Debug, Default)]
pub struct ByteTrail {
    pending: Vec<u8>,
}

impl ByteTrail {
    pub fn fed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The bytes of the next outcome.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.pending.len());
        self.pending.drain(..n).collect()
    }
}

/// `--protocol` values.
pub fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "sensorgate" => Ok(Protocol::Sensorgate),
        "lines" => Ok(Protocol::Lines),
        "mysensors" => Ok(Protocol::Mysensors),
        _ => Err("use sensorgate, lines or mysensors".into()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: tokio_serial::Error,
    },
    #[error("reading {} failed: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} closed", path.display())]
    Closed { path: PathBuf },
}

/// Opens `port`, prints each outcome to `out` until `shutdown` or the port fails. Output errors
/// (a closed pipe) end the monitor quietly.
pub async fn run(
    port: PortConfig,
    style: Style,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MonitorError> {
    let mut stream = tokio_serial::new(port.path.to_string_lossy(), port.baud)
        .open_native_async()
        .map_err(|source| MonitorError::Open {
            path: port.path.clone(),
            source,
        })?;
    eprintln!(
        "monitoring {} ({}, {} baud); Ctrl-C to stop",
        port.path.display(),
        port.protocol.name(),
        port.baud
    );
    let mut decoder = sensorgate::ingest::decoder_for(&port);
    let mut monitor = Monitor::new(style);
    let mut trail = ByteTrail::default();
    let mut outcomes = Vec::new();
    let mut buf = vec![0u8; 4096];
    tokio::pin!(shutdown);
    let ended = loop {
        let n = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            read = stream.read(&mut buf) => match read {
                Ok(0) => break Err(MonitorError::Closed { path: port.path.clone() }),
                Ok(n) => n,
                Err(source) => break Err(MonitorError::Read { path: port.path.clone(), source }),
            },
        };
        trail.fed(&buf[..n]);
        decoder.feed(&buf[..n], &mut outcomes);
        if print(&mut monitor, &mut trail, &mut outcomes, out).is_err() {
            return Ok(());
        }
    };
    decoder.finish(&mut outcomes);
    let _ = print(&mut monitor, &mut trail, &mut outcomes, out);
    ended
}

fn print(
    monitor: &mut Monitor,
    trail: &mut ByteTrail,
    outcomes: &mut Vec<Decoded>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let time = clock(sensorgate::ingest::now_ms());
    for outcome in outcomes.drain(..) {
        let raw = trail.take(outcome.bytes());
        for line in monitor.lines(&time, &outcome, &raw) {
            writeln!(out, "{line}")?;
        }
    }
    out.flush()
}

/// The port to monitor, as `[[port]]` would describe it.
pub fn port_config(path: PathBuf, protocol: Protocol, baud: u32) -> PortConfig {
    PortConfig {
        name: "monitor".into(),
        path,
        baud,
        protocol,
        node_source: NodeSource::Key("node".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensorgate::decode::{Fault, FrameId, Reading, SensorInfo};

    fn obs(body: Body) -> Decoded {
        Decoded::Observation {
            obs: Observation {
                node: "7".into(),
                frame: Some(FrameId {
                    boot_id: 0xab,
                    seq: 3,
                }),
                link: None,
                body,
            },
            bytes: 4,
        }
    }

    fn hello() -> Decoded {
        obs(Body::Hello {
            firmware: Some("1.2.3".into()),
            sensors: vec![SensorInfo {
                channel: 0,
                quantity: "temperature".into(),
                unit: Some("°C".into()),
                name: None,
            }],
            complete: true,
            interval_s: Some(60),
        })
    }

    fn reading() -> Decoded {
        obs(Body::Readings(vec![Reading {
            channel: 0,
            quantity: None,
            unit: None,
            value: 21.5,
            decimals: Some(2),
        }]))
    }

    #[test]
    fn a_hello_names_firmware_and_sensors_and_later_readings_use_them() {
        let mut m = Monitor::new(Style::default());
        assert_eq!(
            m.lines("12:00:00.000", &hello(), &[1, 2, 3, 0]),
            [
                "12:00:00.000  node 7    hello      firmware 1.2.3, reports every 60 s, sensors: ch0 temperature [°C]  [boot 000000ab seq 3]"
            ]
        );
        assert_eq!(
            m.lines("12:00:01.000", &reading(), &[1, 2, 3, 0]),
            ["12:00:01.000  node 7    readings   ch0 temperature=21.50 °C  [boot 000000ab seq 3]"]
        );
    }

    #[test]
    fn a_reading_from_an_unannounced_node_shows_its_channel() {
        let mut m = Monitor::new(Style::default());
        let l = m.lines("t", &reading(), &[]);
        assert!(l[0].contains("ch0 ?=21.50"), "{l:?}");
    }

    #[test]
    fn an_error_shows_its_fault_detail_and_size_and_hex_adds_the_bytes() {
        let mut m = Monitor::new(Style {
            colour: false,
            hex: true,
        });
        let e = Decoded::Error {
            fault: Fault::Crc,
            detail: "CRC mismatch".into(),
            bytes: 3,
        };
        assert_eq!(
            m.lines("t", &e, &[0x13, 0xff, 0x00]),
            [
                "t  -         error      crc: CRC mismatch (3 bytes)",
                "   13 ff 00"
            ]
        );
    }

    #[test]
    fn ignored_bytes_show_only_with_hex() {
        let ignored = Decoded::Ignored { bytes: 1 };
        assert!(
            Monitor::new(Style::default())
                .lines("t", &ignored, &[0])
                .is_empty()
        );
        let l = Monitor::new(Style {
            colour: false,
            hex: true,
        })
        .lines("t", &ignored, &[0]);
        assert_eq!(l, ["t  -         ignored    1 byte", "   00"]);
    }

    #[test]
    fn colour_wraps_the_kind_and_plain_output_has_no_escape_codes() {
        let mut coloured = Monitor::new(Style {
            colour: true,
            hex: false,
        });
        let l = coloured.lines("t", &hello(), &[]);
        assert!(l[0].contains("\x1b[36mhello"), "{l:?}");
        let mut plain = Monitor::new(Style::default());
        assert!(!plain.lines("t", &hello(), &[])[0].contains('\x1b'));
    }

    #[test]
    fn heartbeats_and_logs_list_their_fields() {
        let mut m = Monitor::new(Style::default());
        let hb = obs(Body::Heartbeat {
            battery_mv: Some(3900),
            battery_pct: None,
            uptime_s: Some(12),
            dropped: Some(0),
        });
        assert!(
            m.lines("t", &hb, &[])[0]
                .contains("heartbeat  battery 3900 mV, uptime 12 s, dropped 0")
        );
        let log = obs(Body::Log {
            level: "warn".into(),
            text: "reset cause: watchdog".into(),
        });
        assert!(m.lines("t", &log, &[])[0].contains("log        warn: reset cause: watchdog"));
    }

    #[test]
    fn the_byte_trail_hands_each_outcome_its_own_bytes() {
        let mut t = ByteTrail::default();
        t.fed(&[1, 2]);
        t.fed(&[3, 4, 5]);
        assert_eq!(t.take(3), [1, 2, 3]);
        assert_eq!(t.take(1), [4]);
        assert_eq!(t.take(9), [5]);
    }

    #[test]
    fn the_clock_is_utc_time_of_day_with_milliseconds() {
        assert_eq!(clock(86_400_000 + 3_723_004), "01:02:03.004");
    }
}
