//! The MySensors serial API (2.x), as a MySensors serial gateway prints it.
//!
//! ```text
//! node-id;child-sensor-id;command;ack;type;payload\n
//! 12;1;1;0;0;21.5          set (1), V_TEMP (0): node 12, child 1 reads 21.5 °C
//! 12;255;0;0;17;2.3.2      presentation (0) of the node itself, library 2.3.2
//! 0;255;3;0;14;Gateway startup complete.
//! ```
//!
//! What becomes what:
//! - set: a numeric payload is one [`Reading`] (channel = child id, quantity and unit from the
//!   `V_` type, metric units assumed). Non-numeric payloads (`nan` from a failed sensor, V_TEXT)
//!   and the text-valued types (V_RGB, V_IR_*, V_FORECAST, ...) are ignored, not errors.
//! - presentation: child 255 of type S_ARDUINO_NODE / S_ARDUINO_REPEATER_NODE is a `Hello` with
//!   the library version as firmware; any other is a `Hello` announcing that one sensor.
//! - internal: battery level and heartbeat responses are heartbeats; I_SKETCH_NAME and
//!   I_SKETCH_VERSION are each a `Hello`, the version one naming the firmware "<name> <version>"
//!   with the name the node sent before (kept per node until it presents itself again);
//!   I_LOG_MESSAGE, and I_GATEWAY_READY from the gateway (node 0), are logs. Others are ignored.
//! - req and stream: ignored (requests for the controller, firmware updates).
//!
//! The payload cannot hold `;`, so a line with more than six fields is undecodable, except where
//! the protocol itself puts `;` in the payload: V_POSITION ("lat;lon;alt") and log text.
//! Lines end in `\n` or `\r\n` and hold at most [`MAX_LINE`] bytes (messages are under 60).

use std::collections::HashMap;

use super::text::{Line, LineBuffer, parse_number, quote};
use super::{Body, Decoded, Decoder, Fault, Observation, Reading, SensorInfo};

/// Longest line accepted, without its line end; longer lines are one framing error.
pub const MAX_LINE: usize = 512;

/// Sketch names kept to combine with the version are cut to this many characters
/// (the protocol's payload is at most 25 bytes).
const MAX_SKETCH_NAME: usize = 64;

const PRESENTATION: u8 = 0;
const SET: u8 = 1;
const REQ: u8 = 2;
const INTERNAL: u8 = 3;
const STREAM: u8 = 4;

/// The child id a node uses for messages about itself.
const NODE_CHILD: u8 = 255;
/// The serial gateway's own node id.
const GATEWAY_NODE: u8 = 0;

const S_ARDUINO_NODE: u8 = 17;
const S_ARDUINO_REPEATER_NODE: u8 = 18;

const V_POSITION: u8 = 49;

const I_BATTERY_LEVEL: u8 = 0;
const I_LOG_MESSAGE: u8 = 9;
const I_SKETCH_NAME: u8 = 11;
const I_SKETCH_VERSION: u8 = 12;
const I_GATEWAY_READY: u8 = 14;
const I_HEARTBEAT_RESPONSE: u8 = 22;

/// Quantity names of the `S_` (presentation) types, indexed by type number.
const SENSOR_TYPES: [&str; 40] = [
    "door",                  // S_DOOR
    "motion",                // S_MOTION
    "smoke",                 // S_SMOKE
    "binary",                // S_BINARY (S_LIGHT)
    "dimmer",                // S_DIMMER
    "cover",                 // S_COVER
    "temperature",           // S_TEMP
    "humidity",              // S_HUM
    "pressure",              // S_BARO
    "wind",                  // S_WIND
    "rain",                  // S_RAIN
    "uv",                    // S_UV
    "weight",                // S_WEIGHT
    "power",                 // S_POWER
    "heater",                // S_HEATER
    "distance",              // S_DISTANCE
    "light_level",           // S_LIGHT_LEVEL
    "arduino_node",          // S_ARDUINO_NODE
    "arduino_repeater_node", // S_ARDUINO_REPEATER_NODE
    "lock",                  // S_LOCK
    "ir",                    // S_IR
    "water",                 // S_WATER
    "air_quality",           // S_AIR_QUALITY
    "custom",                // S_CUSTOM
    "dust",                  // S_DUST
    "scene_controller",      // S_SCENE_CONTROLLER
    "rgb_light",             // S_RGB_LIGHT
    "rgbw_light",            // S_RGBW_LIGHT
    "color_sensor",          // S_COLOR_SENSOR
    "hvac",                  // S_HVAC
    "multimeter",            // S_MULTIMETER
    "sprinkler",             // S_SPRINKLER
    "water_leak",            // S_WATER_LEAK
    "sound",                 // S_SOUND
    "vibration",             // S_VIBRATION
    "moisture",              // S_MOISTURE
    "info",                  // S_INFO
    "gas",                   // S_GAS
    "gps",                   // S_GPS
    "water_quality",         // S_WATER_QUALITY
];

/// One `V_` (set/req) type: the quantity it names, its unit, and whether its payload is text
/// even when it looks like a number (an RGB value "102030").
struct VarType {
    quantity: &'static str,
    unit: Option<&'static str>,
    text: bool,
}

const fn num(quantity: &'static str, unit: Option<&'static str>) -> VarType {
    VarType {
        quantity,
        unit,
        text: false,
    }
}

const fn text(quantity: &'static str) -> VarType {
    VarType {
        quantity,
        unit: None,
        text: true,
    }
}

/// The `V_` types, indexed by type number.
const VAR_TYPES: [VarType; 57] = [
    num("temperature", Some("°C")),        // V_TEMP
    num("humidity", Some("%")),            // V_HUM
    num("status", None),                   // V_STATUS (V_LIGHT)
    num("percentage", Some("%")),          // V_PERCENTAGE (V_DIMMER)
    num("pressure", Some("hPa")),          // V_PRESSURE
    text("forecast"),                      // V_FORECAST
    num("rain", None),                     // V_RAIN
    num("rainrate", None),                 // V_RAINRATE
    num("wind", None),                     // V_WIND
    num("gust", None),                     // V_GUST
    num("direction", None),                // V_DIRECTION
    num("uv", None),                       // V_UV
    num("weight", None),                   // V_WEIGHT
    num("distance", Some("cm")),           // V_DISTANCE
    num("impedance", None),                // V_IMPEDANCE
    num("armed", None),                    // V_ARMED
    num("tripped", None),                  // V_TRIPPED
    num("power", Some("W")),               // V_WATT
    num("energy", Some("kWh")),            // V_KWH
    num("scene_on", None),                 // V_SCENE_ON
    num("scene_off", None),                // V_SCENE_OFF
    text("hvac_flow_state"),               // V_HVAC_FLOW_STATE
    text("hvac_speed"),                    // V_HVAC_SPEED
    num("light_level", None),              // V_LIGHT_LEVEL
    num("var1", None),                     // V_VAR1
    num("var2", None),                     // V_VAR2
    num("var3", None),                     // V_VAR3
    num("var4", None),                     // V_VAR4
    num("var5", None),                     // V_VAR5
    num("up", None),                       // V_UP
    num("down", None),                     // V_DOWN
    num("stop", None),                     // V_STOP
    text("ir_send"),                       // V_IR_SEND
    text("ir_receive"),                    // V_IR_RECEIVE
    num("flow", None),                     // V_FLOW
    num("volume", None),                   // V_VOLUME
    num("lock_status", None),              // V_LOCK_STATUS
    num("level", None),                    // V_LEVEL
    num("voltage", Some("V")),             // V_VOLTAGE
    num("current", Some("A")),             // V_CURRENT
    text("rgb"),                           // V_RGB
    text("rgbw"),                          // V_RGBW
    text("id"),                            // V_ID
    text("unit_prefix"),                   // V_UNIT_PREFIX
    num("hvac_setpoint_cool", Some("°C")), // V_HVAC_SETPOINT_COOL
    num("hvac_setpoint_heat", Some("°C")), // V_HVAC_SETPOINT_HEAT
    text("hvac_flow_mode"),                // V_HVAC_FLOW_MODE
    text("text"),                          // V_TEXT
    num("custom", None),                   // V_CUSTOM
    text("position"),                      // V_POSITION
    text("ir_record"),                     // V_IR_RECORD
    num("ph", None),                       // V_PH
    num("orp", Some("mV")),                // V_ORP
    num("ec", Some("μS/cm")),              // V_EC
    num("var", Some("var")),               // V_VAR (reactive power)
    num("va", Some("VA")),                 // V_VA
    num("power_factor", None),             // V_POWER_FACTOR
];

pub struct MySensorsDecoder {
    buf: LineBuffer,
    nodes: Nodes,
}

/// What the decoder remembers about nodes between lines.
#[derive(Default)]
struct Nodes {
    /// The last I_SKETCH_NAME of each node, to name the firmware when its version follows.
    /// At most 256 entries of [`MAX_SKETCH_NAME`] characters.
    sketch_names: HashMap<u8, String>,
}

impl MySensorsDecoder {
    pub fn new() -> Self {
        MySensorsDecoder {
            buf: LineBuffer::new(MAX_LINE),
            nodes: Nodes::default(),
        }
    }
}

impl Default for MySensorsDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// One message, fields parsed; `payload` borrows the line.
struct Message<'a> {
    node: u8,
    child: u8,
    command: u8,
    kind: u8,
    payload: &'a str,
}

/// Parses the six fields; the error is the detail for an undecodable line.
fn parse(line: &str) -> Result<Message<'_>, String> {
    let mut fields = line.splitn(6, ';');
    let mut next = |name: &str, max: u8| -> Result<u8, String> {
        let field = fields
            .next()
            .ok_or_else(|| format!("too few fields, no {name}: {}", quote(line)))?;
        field
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| field.parse::<u8>().ok())
            .flatten()
            .filter(|&v| v <= max)
            .ok_or_else(|| format!("bad {name} {}: {}", quote(field), quote(line)))
    };
    let node = next("node id", u8::MAX)?;
    let child = next("child id", u8::MAX)?;
    let command = next("command", STREAM)?;
    let _ack = next("ack flag", 1)?;
    let kind = next("type", u8::MAX)?;
    let payload = fields
        .next()
        .ok_or_else(|| format!("too few fields, no payload: {}", quote(line)))?;
    let payload_may_hold_semicolons = matches!(
        (command, kind),
        (SET | REQ, V_POSITION) | (INTERNAL, I_LOG_MESSAGE)
    );
    if payload.contains(';') && !payload_may_hold_semicolons {
        return Err(format!("more than six fields: {}", quote(line)));
    }
    Ok(Message {
        node,
        child,
        command,
        kind,
        payload,
    })
}

fn hello(firmware: Option<String>, sensors: Vec<SensorInfo>) -> Body {
    Body::Hello {
        firmware,
        sensors,
        complete: false,
        interval_s: None,
    }
}

fn heartbeat(battery_pct: Option<u8>) -> Body {
    Body::Heartbeat {
        battery_mv: None,
        battery_pct,
        uptime_s: None,
        dropped: None,
    }
}

fn log(text: &str) -> Body {
    Body::Log {
        level: "info".to_string(),
        text: text.to_string(),
    }
}

impl Nodes {
    /// Decodes one line (without its line end); `Ok(None)` for what carries nothing for us.
    fn decode_line(&mut self, line: &str) -> Result<Option<Observation>, String> {
        if line.trim().is_empty() {
            return Ok(None);
        }
        let m = parse(line)?;
        let body = match m.command {
            PRESENTATION => self.presentation(&m, line)?,
            SET => set(&m, line)?,
            INTERNAL => self.internal(&m, line)?,
            _ => None, // REQ, STREAM
        };
        Ok(body.map(|body| Observation {
            node: m.node.to_string(),
            frame: None,
            link: None,
            body,
        }))
    }

    fn presentation(&mut self, m: &Message, line: &str) -> Result<Option<Body>, String> {
        let quantity = SENSOR_TYPES
            .get(usize::from(m.kind))
            .ok_or_else(|| format!("unknown S_ type {}: {}", m.kind, quote(line)))?;
        let text = Some(m.payload.trim().to_string()).filter(|t| !t.is_empty());
        if m.child == NODE_CHILD && matches!(m.kind, S_ARDUINO_NODE | S_ARDUINO_REPEATER_NODE) {
            // The node (re)started: a sketch name from before no longer describes it.
            self.sketch_names.remove(&m.node);
            return Ok(Some(hello(text, vec![])));
        }
        let sensor = SensorInfo {
            channel: u16::from(m.child),
            quantity: quantity.to_string(),
            unit: None,
            name: text,
        };
        Ok(Some(hello(None, vec![sensor])))
    }

    fn internal(&mut self, m: &Message, line: &str) -> Result<Option<Body>, String> {
        Ok(Some(match m.kind {
            I_BATTERY_LEVEL => {
                let pct = m
                    .payload
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|&p| p <= 100)
                    .ok_or_else(|| format!("battery level is not 0-100: {}", quote(line)))?;
                heartbeat(Some(pct))
            }
            I_HEARTBEAT_RESPONSE => heartbeat(None),
            I_LOG_MESSAGE => log(m.payload),
            I_GATEWAY_READY if m.node == GATEWAY_NODE => log(m.payload),
            I_SKETCH_NAME => {
                let name: String = m.payload.trim().chars().take(MAX_SKETCH_NAME).collect();
                self.sketch_names.insert(m.node, name.clone());
                hello(Some(name).filter(|n| !n.is_empty()), vec![])
            }
            I_SKETCH_VERSION => {
                let version = m.payload.trim();
                let firmware = match self.sketch_names.get(&m.node) {
                    Some(name) if !name.is_empty() => format!("{name} {version}"),
                    _ => version.to_string(),
                };
                hello(
                    Some(firmware.trim().to_string()).filter(|f| !f.is_empty()),
                    vec![],
                )
            }
            _ => return Ok(None),
        }))
    }
}

fn set(m: &Message, line: &str) -> Result<Option<Body>, String> {
    let var = VAR_TYPES
        .get(usize::from(m.kind))
        .ok_or_else(|| format!("unknown V_ type {}: {}", m.kind, quote(line)))?;
    if var.text {
        return Ok(None);
    }
    let Some((value, decimals)) = parse_number(m.payload) else {
        // `nan` from a sensor that failed to read, or text on a custom type: nothing to report.
        return Ok(None);
    };
    Ok(Some(Body::Readings(vec![Reading {
        channel: u16::from(m.child),
        quantity: Some(var.quantity.to_string()),
        unit: var.unit.map(str::to_string),
        value,
        decimals,
    }])))
}

impl Decoder for MySensorsDecoder {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        let MySensorsDecoder { buf, nodes } = self;
        buf.feed(bytes, |line| {
            out.push(match line {
                Line::TooLong { bytes } => Decoded::Error {
                    fault: Fault::Framing,
                    detail: format!("line longer than {MAX_LINE} bytes"),
                    bytes,
                },
                Line::Complete { text, bytes } => match std::str::from_utf8(text) {
                    Err(e) => Decoded::Error {
                        fault: Fault::Undecodable,
                        detail: format!("line is not UTF-8: {e}"),
                        bytes,
                    },
                    Ok(text) => match nodes.decode_line(text) {
                        Ok(Some(obs)) => Decoded::Observation { obs, bytes },
                        Ok(None) => Decoded::Ignored { bytes },
                        Err(detail) => Decoded::Error {
                            fault: Fault::Undecodable,
                            detail,
                            bytes,
                        },
                    },
                },
            });
        });
    }

    fn finish(&mut self, out: &mut Vec<Decoded>) {
        if let Some(bytes) = self.buf.finish() {
            out.push(Decoded::Error {
                fault: Fault::Framing,
                detail: "unterminated line at end of stream".to_string(),
                bytes,
            });
        }
    }

    fn pending(&self) -> usize {
        self.buf.pending()
    }

    /// MySensors nodes ack on their own radio layer; the gateway sends nothing back.
    fn ack(&self, _node: &str, _frame: super::FrameId) -> Option<Vec<u8>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(d: &mut MySensorsDecoder, input: &[u8]) -> Vec<Decoded> {
        let mut out = Vec::new();
        d.feed(input, &mut out);
        assert_eq!(
            out.iter().map(Decoded::bytes).sum::<usize>() + d.pending(),
            input.len()
        );
        out
    }

    /// Decodes one line with a fresh decoder and returns its single outcome.
    fn one(line: &str) -> Decoded {
        let out = decode_all(&mut MySensorsDecoder::new(), line.as_bytes());
        let [outcome] = &out[..] else {
            panic!("{line:?} → {out:?}")
        };
        assert_eq!(outcome.bytes(), line.len());
        outcome.clone()
    }

    fn observation(line: &str) -> Observation {
        match one(line) {
            Decoded::Observation { obs, .. } => obs,
            other => panic!("{line:?} → {other:?}"),
        }
    }

    fn reading(line: &str) -> (String, Reading) {
        let obs = observation(line);
        let Body::Readings(r) = obs.body else {
            panic!("{obs:?}")
        };
        let [r] = &r[..] else { panic!("{r:?}") };
        (obs.node, r.clone())
    }

    fn undecodable(line: &str) -> String {
        match one(line) {
            Decoded::Error {
                fault: Fault::Undecodable,
                detail,
                ..
            } => detail,
            other => panic!("{line:?} → {other:?}"),
        }
    }

    fn is_ignored(line: &str) -> bool {
        matches!(one(line), Decoded::Ignored { .. })
    }

    #[test]
    fn a_temperature_set_is_a_reading_in_celsius_on_the_child_channel() {
        let (node, r) = reading("12;1;1;0;0;21.50\n");
        assert_eq!(node, "12");
        assert_eq!(
            r,
            Reading {
                channel: 1,
                quantity: Some("temperature".into()),
                unit: Some("°C".into()),
                value: 21.5,
                decimals: Some(2),
            }
        );
    }

    #[test]
    fn set_types_map_to_quantity_names_and_metric_units() {
        let cases = [
            (1, "humidity", Some("%")),
            (2, "status", None),
            (3, "percentage", Some("%")),
            (4, "pressure", Some("hPa")),
            (6, "rain", None),
            (11, "uv", None),
            (12, "weight", None),
            (13, "distance", Some("cm")),
            (15, "armed", None),
            (16, "tripped", None),
            (17, "power", Some("W")),
            (18, "energy", Some("kWh")),
            (23, "light_level", None),
            (24, "var1", None),
            (28, "var5", None),
            (34, "flow", None),
            (35, "volume", None),
            (37, "level", None),
            (38, "voltage", Some("V")),
            (39, "current", Some("A")),
            (51, "ph", None),
            (53, "ec", Some("μS/cm")),
            (56, "power_factor", None),
        ];
        for (kind, quantity, unit) in cases {
            let (_, r) = reading(&format!("3;7;1;0;{kind};1\n"));
            assert_eq!(r.quantity.as_deref(), Some(quantity), "V_ type {kind}");
            assert_eq!(r.unit.as_deref(), unit, "V_ type {kind}");
            assert_eq!(r.channel, 7);
        }
    }

    #[test]
    fn non_numeric_and_text_typed_set_payloads_are_ignored() {
        assert!(is_ignored("3;1;1;0;47;hello world\n")); // V_TEXT
        assert!(is_ignored("3;1;1;0;40;102030\n")); // V_RGB, numeric-looking hex
        assert!(is_ignored("3;1;1;0;40;ff0000\n"));
        assert!(is_ignored("3;1;1;0;0;nan\n")); // V_TEMP from a failed sensor read
        assert!(is_ignored("3;1;1;0;0;\n"));
    }

    #[test]
    fn a_position_payload_may_hold_semicolons() {
        assert!(is_ignored("3;1;1;0;49;55.722526;13.017972;18\n"));
    }

    #[test]
    fn node_presentation_is_a_hello_with_the_library_version() {
        for kind in [17, 18] {
            let obs = observation(&format!("5;255;0;0;{kind};2.3.2\n"));
            assert_eq!(obs.node, "5");
            assert_eq!(
                obs.body,
                Body::Hello {
                    firmware: Some("2.3.2".into()),
                    sensors: vec![],
                    complete: false,
                    interval_s: None,
                }
            );
        }
    }

    #[test]
    fn child_presentation_announces_one_sensor_with_its_description() {
        let cases = [
            (6, "temperature"),
            (7, "humidity"),
            (8, "pressure"),
            (16, "light_level"),
            (30, "multimeter"),
            (13, "power"),
            (15, "distance"),
            (35, "moisture"),
            (0, "door"),
        ];
        for (kind, quantity) in cases {
            let obs = observation(&format!("5;2;0;0;{kind};Outdoor\n"));
            assert_eq!(
                obs.body,
                Body::Hello {
                    firmware: None,
                    sensors: vec![SensorInfo {
                        channel: 2,
                        quantity: quantity.into(),
                        unit: None,
                        name: Some("Outdoor".into()),
                    }],
                    complete: false,
                    interval_s: None,
                },
                "S_ type {kind}"
            );
        }
        let obs = observation("5;3;0;0;6;\n");
        let Body::Hello { sensors, .. } = obs.body else {
            panic!()
        };
        assert_eq!(sensors[0].name, None);
    }

    #[test]
    fn battery_level_is_a_heartbeat_with_a_percentage() {
        let obs = observation("9;255;3;0;0;87\n");
        assert_eq!(
            obs.body,
            Body::Heartbeat {
                battery_mv: None,
                battery_pct: Some(87),
                uptime_s: None,
                dropped: None,
            }
        );
        assert!(undecodable("9;255;3;0;0;101\n").contains("battery"));
        assert!(undecodable("9;255;3;0;0;low\n").contains("battery"));
    }

    #[test]
    fn a_heartbeat_response_says_the_node_is_alive() {
        let obs = observation("9;255;3;0;22;1234\n");
        assert_eq!(
            obs.body,
            Body::Heartbeat {
                battery_mv: None,
                battery_pct: None,
                uptime_s: None,
                dropped: None,
            }
        );
    }

    #[test]
    fn sketch_name_then_version_name_the_firmware() {
        let mut d = MySensorsDecoder::new();
        let out = decode_all(&mut d, b"4;255;3;0;11;Weather Station\n4;255;3;0;12;1.2\n");
        let firmware: Vec<_> = out
            .iter()
            .map(|o| match o {
                Decoded::Observation {
                    obs:
                        Observation {
                            body: Body::Hello { firmware, .. },
                            ..
                        },
                    ..
                } => firmware.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            firmware,
            [
                Some("Weather Station".into()),
                Some("Weather Station 1.2".into())
            ]
        );
    }

    #[test]
    fn a_sketch_version_without_a_known_name_is_the_version_alone() {
        let obs = observation("4;255;3;0;12;1.2\n");
        assert!(matches!(obs.body, Body::Hello { firmware: Some(f), .. } if f == "1.2"));
    }

    #[test]
    fn a_node_presenting_itself_again_forgets_its_old_sketch_name() {
        let mut d = MySensorsDecoder::new();
        let input = b"4;255;3;0;11;Old\n4;255;0;0;17;2.3.2\n4;255;3;0;12;2.0\n";
        let out = decode_all(&mut d, input);
        let Some(Decoded::Observation { obs, .. }) = out.last() else {
            panic!("{out:?}")
        };
        assert!(matches!(&obs.body, Body::Hello { firmware: Some(f), .. } if f == "2.0"));
    }

    #[test]
    fn log_messages_and_gateway_startup_are_info_logs() {
        let obs = observation("0;255;3;0;14;Gateway startup complete.\n");
        assert_eq!(obs.node, "0");
        assert_eq!(
            obs.body,
            Body::Log {
                level: "info".into(),
                text: "Gateway startup complete.".into(),
            }
        );
        let obs = observation("0;255;3;0;9;TSF:MSG:READ,12-12-0,s=1,c=1,t=0,pt=7,l=5:21.5;x\n");
        assert!(matches!(obs.body, Body::Log { text, .. } if text.ends_with("21.5;x")));
    }

    #[test]
    fn other_internal_messages_req_and_stream_are_ignored() {
        for line in [
            "12;255;3;0;6;M\n",      // I_CONFIG
            "12;255;3;0;3;\n",       // I_ID_REQUEST
            "12;255;3;0;14;ready\n", // I_GATEWAY_READY, but not from the gateway
            "12;1;2;0;2;\n",         // req V_STATUS
            "12;255;4;0;0;0100FF\n", // stream
            "\n",
            "\r\n",
        ] {
            assert!(is_ignored(line), "{line:?}");
        }
    }

    #[test]
    fn malformed_fields_are_undecodable_and_the_detail_quotes_the_line() {
        for line in [
            "x;1;1;0;0;21.5\n",
            "256;1;1;0;0;21.5\n",
            "1;256;1;0;0;21.5\n",
            "1;1;5;0;0;21.5\n",
            "1;1;1;2;0;21.5\n",
            "1;1;1;0;;21.5\n",
            "-1;1;1;0;0;21.5\n",
            "+1;1;1;0;0;21.5\n",
            " 1;1;1;0;0;21.5\n",
            "1;1;1;0;0\n",
            "1;1;1;0;0;21.5;extra\n",
            "hello\n",
        ] {
            let detail = undecodable(line);
            let shown = line.trim_end().get(..4).unwrap_or(line.trim_end());
            assert!(detail.contains(shown), "{line:?}: {detail}");
        }
    }

    #[test]
    fn unknown_type_numbers_are_undecodable() {
        assert!(undecodable("1;1;1;0;200;5\n").contains("V_ type 200"));
        assert!(undecodable("1;1;0;0;99;\n").contains("S_ type 99"));
    }

    #[test]
    fn error_details_quote_at_most_about_eighty_characters() {
        let line = format!("1;1;1;0;0;{}\n", "9;".repeat(200));
        let detail = undecodable(&line);
        assert!(detail.chars().count() < 200, "{detail}");
    }

    #[test]
    fn invalid_utf8_is_undecodable_for_that_line_only() {
        let mut d = MySensorsDecoder::new();
        let out = decode_all(&mut d, b"1;1;1;0;47;\xc3\x28\n1;1;1;0;0;20\n");
        assert!(matches!(
            out[..],
            [
                Decoded::Error {
                    fault: Fault::Undecodable,
                    bytes: 14,
                    ..
                },
                Decoded::Observation { bytes: 13, .. }
            ]
        ));
    }

    #[test]
    fn an_over_long_line_is_one_framing_error_and_the_decoder_resyncs() {
        let mut input = b"1;1;1;0;47;".to_vec();
        input.extend(std::iter::repeat_n(b'a', 2000));
        input.extend_from_slice(b"\r\n1;1;1;0;0;20\n");
        let mut d = MySensorsDecoder::new();
        let mut out = Vec::new();
        for chunk in input.chunks(7) {
            d.feed(chunk, &mut out);
        }
        assert!(
            matches!(
                out[..],
                [
                    Decoded::Error {
                        fault: Fault::Framing,
                        bytes: 2013,
                        ..
                    },
                    Decoded::Observation { bytes: 13, .. }
                ]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn an_unterminated_line_is_pending_until_finish_reports_it() {
        let mut d = MySensorsDecoder::new();
        decode_all(&mut d, b"1;1;1;0;0;2");
        assert_eq!(d.pending(), 11);
        let mut out = Vec::new();
        d.finish(&mut out);
        assert!(matches!(
            out[..],
            [Decoded::Error {
                fault: Fault::Framing,
                bytes: 11,
                ..
            }]
        ));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn the_gateway_never_acks_mysensors_messages() {
        let d = MySensorsDecoder::new();
        assert_eq!(
            d.ack("12", super::super::FrameId { boot_id: 0, seq: 1 }),
            None
        );
    }

    /// What a serial gateway (2.3.x, MY_DEBUG off) printed for one node starting up and
    /// reporting, with a CRLF controller bridge in between for part of it.
    const CAPTURE: &str = "0;255;3;0;14;Gateway startup complete.\n\
        0;255;0;0;18;2.3.2\n\
        12;255;3;0;11;Weather Station\r\n\
        12;255;3;0;12;1.1\r\n\
        12;255;0;0;17;2.3.2\n\
        12;255;3;0;11;Weather Station\n\
        12;255;3;0;12;1.1\n\
        12;0;0;0;6;Outdoor temp\n\
        12;1;0;0;7;Outdoor humidity\n\
        12;255;3;0;6;0\n\
        12;0;1;0;0;21.4\n\
        12;1;1;0;1;48.0\n\
        12;255;3;0;0;92\n\
        12;0;1;0;0;nan\n\
        12;0;1;0;0;21.6\n";

    #[test]
    fn a_real_gateway_capture_decodes_line_by_line() {
        let mut d = MySensorsDecoder::new();
        let out = decode_all(&mut d, CAPTURE.as_bytes());
        assert_eq!(out.len(), CAPTURE.lines().count());
        assert_eq!(d.pending(), 0);
        let summary: Vec<String> = out
            .iter()
            .map(|o| match o {
                Decoded::Observation { obs, .. } => match &obs.body {
                    Body::Log { text, .. } => format!("{} log {text}", obs.node),
                    Body::Hello {
                        firmware, sensors, ..
                    } => match &sensors[..] {
                        [] => format!("{} hello {}", obs.node, firmware.as_deref().unwrap_or("")),
                        [s] => format!("{} sensor {} {}", obs.node, s.channel, s.quantity),
                        _ => panic!(),
                    },
                    Body::Readings(r) => format!(
                        "{} {} {} {}{}",
                        obs.node,
                        r[0].channel,
                        r[0].quantity.as_deref().unwrap_or(""),
                        r[0].value,
                        r[0].unit.as_deref().unwrap_or("")
                    ),
                    Body::Heartbeat { battery_pct, .. } => {
                        format!("{} battery {battery_pct:?}", obs.node)
                    }
                    Body::CommandAck { .. } => panic!(),
                },
                Decoded::Ignored { .. } => "ignored".into(),
                Decoded::Error { detail, .. } => format!("error {detail}"),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "0 log Gateway startup complete.",
                "0 hello 2.3.2",
                "12 hello Weather Station",
                "12 hello Weather Station 1.1",
                "12 hello 2.3.2",
                "12 hello Weather Station",
                "12 hello Weather Station 1.1",
                "12 sensor 0 temperature",
                "12 sensor 1 humidity",
                "ignored",
                "12 0 temperature 21.4°C",
                "12 1 humidity 48%",
                "12 battery Some(92)",
                "ignored",
                "12 0 temperature 21.6°C",
            ]
        );
    }

    fn line_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"12;0;1;0;0;21.50\n".to_vec()),
            Just(b"12;255;3;0;11;Weather\r\n".to_vec()),
            Just(b"12;255;3;0;12;1.0\n".to_vec()),
            Just(b"12;255;0;0;17;2.3.2\n".to_vec()),
            Just(b"0;255;3;0;14;Gateway startup complete.\n".to_vec()),
            Just(b"300;0;1;0;0;1\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(vec![b'9'; MAX_LINE + 3]),
            prop::collection::vec(any::<u8>(), 0..40),
            "[0-9;a-z. \r\n]{0,60}".prop_map(String::into_bytes),
        ]
    }

    fn run(input: &[u8], cuts: &[usize]) -> Vec<Decoded> {
        let mut d = MySensorsDecoder::new();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, input.len());
            d.feed(&input[start..cut], &mut out);
            start = cut;
        }
        d.feed(&input[start..], &mut out);
        d.finish(&mut out);
        out
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_outcomes_and_accounts_for_every_byte(
            lines in prop::collection::vec(line_strategy(), 0..12),
            mut cuts in prop::collection::vec(0usize..1500, 0..10),
        ) {
            let input = lines.concat();
            cuts.sort_unstable();
            let whole = run(&input, &[]);
            let split = run(&input, &cuts);
            prop_assert_eq!(&whole, &split);
            prop_assert_eq!(split.iter().map(Decoded::bytes).sum::<usize>(), input.len());
        }
    }
}
