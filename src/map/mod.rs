//! Mapping: a reading in, an MQTT topic and payload out, by the rules the user wrote.
//!
//! Rules select readings by port, node, channel and quantity; the most specific matching rule
//! wins (ties go to the rule written first). Readings no rule selects use the default template,
//! or are dropped when `unmapped = "drop"`.

mod template;

use std::collections::HashMap;

use bytes::Bytes;

use crate::broker::codec::QoS;
use crate::decode::{NodeId, Reading};
pub use template::{Placeholder, Template, TemplateError};

/// How a reading's value is written into the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadFormat {
    /// The number alone: `21.5` (what Home Assistant and most dashboards expect).
    #[default]
    Number,
    /// `{"value":21.5,"unit":"°C","ts":1764250000000,"node":"17","seq":42}`
    Json,
}

/// What a rule selects; `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub port: Option<String>,
    pub node: Option<NodeId>,
    pub channel: Option<u16>,
    pub quantity: Option<String>,
}

impl Selector {
    fn specificity(&self) -> u8 {
        u8::from(self.port.is_some())
            + u8::from(self.node.is_some())
            + u8::from(self.channel.is_some())
            + u8::from(self.quantity.is_some())
    }

    fn selects(&self, port: &str, node: &str, r: &Reading) -> bool {
        self.port.as_deref().is_none_or(|p| p == port)
            && self.node.as_deref().is_none_or(|n| n == node)
            && self.channel.is_none_or(|c| c == r.channel)
            && self
                .quantity
                .as_deref()
                .is_none_or(|q| Some(q) == r.quantity.as_deref())
    }
}

/// `value * scale + offset`, rounded to `decimals` when given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    pub scale: f64,
    pub offset: f64,
    pub decimals: Option<u8>,
}

impl Default for Transform {
    fn default() -> Self {
        Transform {
            scale: 1.0,
            offset: 0.0,
            decimals: None,
        }
    }
}

/// Where a matching reading goes and how it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub topic: Template,
    pub transform: Transform,
    pub payload: PayloadFormat,
    pub qos: QoS,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub selector: Selector,
    /// `None`: the rule drops what it selects.
    pub output: Option<Output>,
}

/// Node metadata from the configuration, used in topic templates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeMeta {
    pub name: Option<String>,
    pub room: Option<String>,
}

/// The validated mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    pub gateway: String,
    pub rules: Vec<Rule>,
    /// For readings no rule selects; `None` drops them.
    pub default: Option<Output>,
    pub nodes: HashMap<NodeId, NodeMeta>,
}

/// One MQTT message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// Facts about the frame a reading came in, for JSON payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameFacts {
    pub ts_ms: u64,
    pub seq: Option<u32>,
}

/// Default topic for readings no rule selects.
pub const DEFAULT_TOPIC: &str = "sensors/{node_name}/{quantity}";

impl Mapping {
    /// The message for one reading, or `None` when it is dropped.
    pub fn map(
        &self,
        port: &str,
        node: &str,
        reading: &Reading,
        facts: FrameFacts,
    ) -> Option<Publication> {
        let rule = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.selector.selects(port, node, reading))
            .max_by_key(|(i, r)| (r.selector.specificity(), std::cmp::Reverse(*i)))
            .map(|(_, r)| r);
        let output = match rule {
            Some(rule) => rule.output.as_ref()?,
            None => self.default.as_ref()?,
        };
        let meta = self.nodes.get(node);
        let quantity = match &reading.quantity {
            Some(q) => std::borrow::Cow::Borrowed(q.as_str()),
            None => std::borrow::Cow::Owned(format!("channel{}", reading.channel)),
        };
        let ctx = template::Context {
            gateway: &self.gateway,
            port,
            node,
            node_name: meta.and_then(|m| m.name.as_deref()).unwrap_or(node),
            room: meta.and_then(|m| m.room.as_deref()).unwrap_or("unassigned"),
            channel: reading.channel,
            quantity: &quantity,
            unit: reading.unit.as_deref().unwrap_or(""),
        };
        let topic = output.topic.render(&ctx);
        let t = output.transform;
        let value = reading.value * t.scale + t.offset;
        let decimals = t.decimals.or(if t.scale == 1.0 {
            reading.decimals
        } else {
            None
        });
        let number = format_number(value, decimals);
        let payload = match output.payload {
            PayloadFormat::Number => number,
            PayloadFormat::Json => {
                let mut s = format!("{{\"value\":{number}");
                if let Some(unit) = &reading.unit {
                    s.push_str(&format!(",\"unit\":{}", json_string(unit)));
                }
                s.push_str(&format!(
                    ",\"ts\":{},\"node\":{}",
                    facts.ts_ms,
                    json_string(node)
                ));
                if let Some(seq) = facts.seq {
                    s.push_str(&format!(",\"seq\":{seq}"));
                }
                s.push('}');
                s
            }
        };
        Some(Publication {
            topic,
            payload: Bytes::from(payload),
            qos: output.qos,
            retain: output.retain,
        })
    }
}

/// Writes a number for a payload: fixed decimals when known, else the shortest exact form.
/// Non-finite values (a scale gone wrong) are written as JSON-safe `null`.
pub fn format_number(value: f64, decimals: Option<u8>) -> String {
    if !value.is_finite() {
        return "null".into();
    }
    match decimals {
        Some(d) => {
            if let Some(s) = format_fixed_exact(value, d) {
                return s;
            }
            let s = format!("{value:.prec$}", prec = usize::from(d));
            // "-0.0" reads badly on a dashboard.
            if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
                s[1..].to_string()
            } else {
                s
            }
        }
        None => {
            let s = format!("{value}");
            if s == "-0" { "0".into() } else { s }
        }
    }
}

/// The common case of [`format_number`] without float formatting: a value that is an integer
/// count of 10^-`decimals` (as sensor readings are: a mantissa and a decimal exponent), written
/// from that integer. `None` when the value is not within 1e-6 of such a count, which leaves
/// the rounding of everything else (ties included) to the float formatter; within it, the
/// formatter's correctly rounded result is this same integer, so the output is identical.
fn format_fixed_exact(value: f64, decimals: u8) -> Option<String> {
    const POW10: [f64; 10] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
    let scale = *POW10.get(usize::from(decimals))?;
    let scaled = value * scale;
    let count = scaled.round();
    if !(count.abs() < 1e15 && (scaled - count).abs() < 1e-6) {
        return None;
    }
    let n = count as i64;
    let digits = n.unsigned_abs().to_string();
    let d = usize::from(decimals);
    let mut s = String::with_capacity(digits.len() + d + 3);
    if n < 0 {
        s.push('-');
    }
    if d == 0 {
        s.push_str(&digits);
    } else if digits.len() > d {
        let (int, frac) = digits.split_at(digits.len() - d);
        s.push_str(int);
        s.push('.');
        s.push_str(frac);
    } else {
        s.push_str("0.");
        s.extend(std::iter::repeat_n('0', d - digits.len()));
        s.push_str(&digits);
    }
    Some(s)
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(channel: u16, quantity: &str, value: f64, decimals: Option<u8>) -> Reading {
        Reading {
            channel,
            quantity: Some(quantity.into()),
            unit: Some("°C".into()),
            value,
            decimals,
        }
    }

    fn output(topic: &str) -> Output {
        Output {
            topic: Template::parse(topic).unwrap(),
            transform: Transform::default(),
            payload: PayloadFormat::Number,
            qos: QoS::AtLeastOnce,
            retain: true,
        }
    }

    fn mapping(rules: Vec<Rule>) -> Mapping {
        let mut nodes = HashMap::new();
        nodes.insert(
            "1".to_string(),
            NodeMeta {
                name: Some("kitchen".into()),
                room: Some("room".into()),
            },
        );
        Mapping {
            gateway: "gw".into(),
            rules,
            default: Some(output(DEFAULT_TOPIC)),
            nodes,
        }
    }

    const FACTS: FrameFacts = FrameFacts {
        ts_ms: 1_700_000_000_000,
        seq: Some(42),
    };

    #[test]
    fn the_issue_example_maps_to_sensors_room_1_temp() {
        let m = mapping(vec![Rule {
            selector: Selector {
                quantity: Some("temperature".into()),
                ..Default::default()
            },
            output: Some(output("sensors/{room}/{node}/temp")),
        }]);
        let p = m
            .map(
                "pico",
                "1",
                &reading(0, "temperature", 21.5, Some(1)),
                FACTS,
            )
            .unwrap();
        assert_eq!(p.topic, "sensors/room/1/temp");
        assert_eq!(p.payload, Bytes::from_static(b"21.5"));
        assert_eq!((p.qos, p.retain), (QoS::AtLeastOnce, true));
    }

    #[test]
    fn the_most_specific_rule_wins_and_ties_go_to_the_first() {
        let m = mapping(vec![
            Rule {
                selector: Selector {
                    node: Some("1".into()),
                    ..Default::default()
                },
                output: Some(output("a/{quantity}")),
            },
            Rule {
                selector: Selector {
                    node: Some("1".into()),
                    channel: Some(2),
                    ..Default::default()
                },
                output: Some(output("b/{channel}")),
            },
            Rule {
                selector: Selector {
                    channel: Some(0),
                    ..Default::default()
                },
                output: Some(output("c")),
            },
        ]);
        assert_eq!(
            m.map("p", "1", &reading(2, "x", 1.0, None), FACTS)
                .unwrap()
                .topic,
            "b/2"
        );
        assert_eq!(
            m.map("p", "1", &reading(0, "x", 1.0, None), FACTS)
                .unwrap()
                .topic,
            "a/x"
        );
        assert_eq!(
            m.map("p", "9", &reading(0, "x", 1.0, None), FACTS)
                .unwrap()
                .topic,
            "c"
        );
        assert_eq!(
            m.map("p", "9", &reading(5, "hum", 1.0, None), FACTS)
                .unwrap()
                .topic,
            "sensors/9/hum"
        );
    }

    #[test]
    fn a_drop_rule_and_an_absent_default_drop_readings() {
        let mut m = mapping(vec![Rule {
            selector: Selector {
                channel: Some(3),
                ..Default::default()
            },
            output: None,
        }]);
        assert!(
            m.map("p", "1", &reading(3, "x", 1.0, None), FACTS)
                .is_none()
        );
        m.default = None;
        assert!(
            m.map("p", "1", &reading(4, "x", 1.0, None), FACTS)
                .is_none()
        );
    }

    #[test]
    fn transforms_scale_offset_and_round() {
        let mut o = output("t");
        o.transform = Transform {
            scale: 0.1,
            offset: -1.0,
            decimals: Some(2),
        };
        let m = mapping(vec![Rule {
            selector: Selector::default(),
            output: Some(o),
        }]);
        let p = m
            .map("p", "1", &reading(0, "x", 225.0, None), FACTS)
            .unwrap();
        assert_eq!(p.payload, Bytes::from_static(b"21.50"));
    }

    #[test]
    fn the_senders_decimals_are_kept() {
        let m = mapping(vec![]);
        let p = m
            .map("p", "1", &reading(0, "temperature", 21.0, Some(2)), FACTS)
            .unwrap();
        assert_eq!(p.payload, Bytes::from_static(b"21.00"));
        assert_eq!(p.topic, "sensors/kitchen/temperature");
    }

    #[test]
    fn json_payloads_carry_value_unit_time_node_and_seq() {
        let mut o = output("t");
        o.payload = PayloadFormat::Json;
        let m = mapping(vec![Rule {
            selector: Selector::default(),
            output: Some(o),
        }]);
        let p = m
            .map("p", "1", &reading(0, "temperature", 21.5, Some(1)), FACTS)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(v["value"], 21.5);
        assert_eq!(v["unit"], "°C");
        assert_eq!(v["ts"], 1_700_000_000_000u64);
        assert_eq!(v["node"], "1");
        assert_eq!(v["seq"], 42);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(format_number(21.5, None), "21.5");
        assert_eq!(format_number(-0.0001, Some(1)), "0.0");
        assert_eq!(format_number(f64::NAN, None), "null");
        assert_eq!(format_number(1e3, None), "1000");
    }

    #[test]
    fn the_integer_path_writes_what_the_float_formatter_writes() {
        // Readings as they come: mantissa × 10^exponent, and transformed values around them.
        let mut cases = Vec::new();
        for m in [
            -100_000i64,
            -2150,
            -5,
            -1,
            0,
            1,
            7,
            99,
            2150,
            101_325,
            123_456_789,
        ] {
            for d in 0..=6u8 {
                let v = m as f64 / 10f64.powi(i32::from(d));
                cases.push((v, d));
                cases.push((v * 1.8 + 32.0, d));
                cases.push((v + 0.5 / 10f64.powi(i32::from(d)), d));
            }
        }
        cases.extend([
            (0.125, 2),
            (2.675, 2),
            (-0.0, 1),
            (-0.04, 1),
            (1e14, 0),
            (5e-7, 6),
        ]);
        for (v, d) in cases {
            let want = format!("{v:.prec$}", prec = usize::from(d));
            let want = if want.starts_with('-') && want[1..].chars().all(|c| c == '0' || c == '.') {
                want[1..].to_string()
            } else {
                want
            };
            assert_eq!(format_number(v, Some(d)), want, "{v} with {d} decimals");
        }
    }
}
