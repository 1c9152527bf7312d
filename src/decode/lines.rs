//! The `lines` protocol: one set of readings per text line, for sensors that print.
//!
//! ```text
//! temp=21.50 hum=48            key=value pairs, split by spaces, tabs, `,` or `;`
//! node=kitchen; temp = 21.5    spaces around `=` are allowed
//! {"node":"kitchen","temp":21.5,"hum":48,"door":true}
//! # a comment, or a blank line: ignored
//! ```
//!
//! Every numeric value is a [`Reading`]: `quantity` is its key, `channel` its position among the
//! line's readings, `decimals` the places it was written with. `true`/`false` read as 1/0. Other
//! values (text, null, arrays, objects) are skipped; a line with no reading at all is an error.
//! Lines end in `\n` or `\r\n` and hold at most [`MAX_LINE`] bytes.

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::text::{Line, LineBuffer, parse_number, quote};
use super::{Body, Decoded, Decoder, Fault, NodeId, Observation, Reading};

/// Longest line accepted, without its line end; longer lines are one framing error.
pub const MAX_LINE: usize = 1024;

/// Where a `lines` port takes the node id from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSource {
    /// Every line comes from this node (one sensor per port).
    Fixed(NodeId),
    /// The value of this key in each line names the node (`node=kitchen temp=21.5`).
    Key(String),
}

pub struct LinesDecoder {
    node: NodeSource,
    buf: LineBuffer,
}

impl LinesDecoder {
    pub fn new(node: NodeSource) -> Self {
        LinesDecoder {
            node,
            buf: LineBuffer::new(MAX_LINE),
        }
    }
}

/// One value of a line, before it is known whether it is the node key or a reading.
#[derive(Debug, PartialEq)]
enum Value {
    /// `text` is the number as written (to name a node by number); `None` for booleans.
    Number {
        value: f64,
        decimals: Option<u8>,
        text: Option<String>,
    },
    Text(String),
    /// JSON values that are neither: null, arrays, objects.
    Other,
}

/// Decodes one line (without its line end); `Ok(None)` for blank and comment lines.
fn decode_line(node: &NodeSource, text: &str) -> Result<Option<Observation>, String> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let pairs = if text.starts_with('{') {
        json_pairs(text).map_err(|e| format!("invalid JSON object ({e}): {}", quote(text)))?
    } else {
        key_value_pairs(text)
    };
    let mut node_id = match node {
        NodeSource::Fixed(id) => Some(id.clone()),
        NodeSource::Key(_) => None,
    };
    let mut readings = Vec::new();
    for (key, value) in pairs {
        if let NodeSource::Key(node_key) = node {
            if key == node_key.trim() {
                if node_id.is_none() {
                    node_id = match value {
                        Value::Text(t) | Value::Number { text: Some(t), .. } => {
                            Some(t.trim().to_string()).filter(|t| !t.is_empty())
                        }
                        Value::Number { text: None, .. } | Value::Other => None,
                    };
                }
                continue;
            }
        }
        let Value::Number {
            value, decimals, ..
        } = value
        else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        readings.push(Reading {
            channel: u16::try_from(readings.len()).unwrap_or(u16::MAX),
            quantity: Some(key.to_string()),
            unit: None,
            value,
            decimals,
        });
    }
    let Some(node_id) = node_id else {
        let key = match node {
            NodeSource::Key(k) => k.as_str(),
            NodeSource::Fixed(_) => "node",
        };
        return Err(format!("no `{key}` key: {}", quote(text)));
    };
    if readings.is_empty() {
        return Err(format!("no numeric readings: {}", quote(text)));
    }
    Ok(Some(Observation {
        node: node_id,
        frame: None,
        link: None,
        body: Body::Readings(readings),
    }))
}

/// `key=value` pairs in line order; tokens without `=` are skipped like other non-readings.
fn key_value_pairs(text: &str) -> Vec<(String, Value)> {
    let text = tighten_equals(text);
    text.split([' ', '\t', ',', ';'])
        .filter_map(|token| token.split_once('='))
        .map(|(key, raw)| {
            let value = match raw {
                "true" | "false" => boolean(raw == "true"),
                _ => match parse_number(raw) {
                    Some((value, decimals)) => Value::Number {
                        value,
                        decimals,
                        text: Some(raw.to_string()),
                    },
                    None => Value::Text(raw.to_string()),
                },
            };
            (key.trim().to_string(), value)
        })
        .collect()
}

fn boolean(b: bool) -> Value {
    Value::Number {
        value: if b { 1.0 } else { 0.0 },
        decimals: None,
        text: None,
    }
}

/// Removes spaces and tabs around `=` so `temp = 21.5` reads as one pair.
fn tighten_equals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut after_equals = false;
    for c in text.chars() {
        if c == '=' {
            out.truncate(out.trim_end_matches([' ', '\t']).len());
            out.push(c);
            after_equals = true;
        } else if after_equals && matches!(c, ' ' | '\t') {
        } else {
            out.push(c);
            after_equals = false;
        }
    }
    out
}

/// The members of a JSON object in the order written, with numbers' decimals from their text.
fn json_pairs(text: &str) -> Result<Vec<(String, Value)>, serde_json::Error> {
    let JsonObject(members) = serde_json::from_str(text)?;
    let raw = top_level_scalars(text);
    Ok(members
        .into_iter()
        .enumerate()
        .map(|(i, (key, value))| {
            let raw = raw.get(i).copied().flatten();
            let value = match value {
                JsonValue::Number(n) => match raw.and_then(parse_number) {
                    Some((value, decimals)) => Value::Number {
                        value,
                        decimals,
                        text: raw.map(str::to_string),
                    },
                    // serde_json accepted the text, so the scan found it; this is a fallback only.
                    None => Value::Number {
                        value: n,
                        decimals: None,
                        text: Some(n.to_string()),
                    },
                },
                JsonValue::Bool(b) => boolean(b),
                JsonValue::Text(t) => Value::Text(t),
                JsonValue::Other => Value::Other,
            };
            (key.trim().to_string(), value)
        })
        .collect())
}

/// For each member of the top-level object of valid JSON `text`, in order: the raw text of a
/// number, `true`, `false` or `null`, or `None` for strings, arrays and objects.
fn top_level_scalars(text: &str) -> Vec<Option<&str>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut expect_value) = (0usize, false, false, false);
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        i += 1;
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' | b'{' | b'[' => {
                if depth == 1 && expect_value {
                    out.push(None);
                    expect_value = false;
                }
                match b {
                    b'"' => in_string = true,
                    _ => depth += 1,
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b':' if depth == 1 => expect_value = true,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth == 1 && expect_value => {
                let start = i - 1;
                while bytes
                    .get(i)
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n'))
                {
                    i += 1;
                }
                out.push(text.get(start..i));
                expect_value = false;
            }
            _ => {}
        }
    }
    out
}

/// A JSON object's members in the order written (serde_json's `Map` sorts them).
struct JsonObject(Vec<(String, JsonValue)>);

enum JsonValue {
    Number(f64),
    Bool(bool),
    Text(String),
    Other,
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = JsonObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonObject, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, JsonValue>()? {
                    members.push(member);
                }
                Ok(JsonObject(members))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

impl<'de> Deserialize<'de> for JsonValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = JsonValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<JsonValue, E> {
                Ok(JsonValue::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<JsonValue, E> {
                Ok(JsonValue::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<JsonValue, E> {
                Ok(JsonValue::Number(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<JsonValue, E> {
                Ok(JsonValue::Number(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<JsonValue, E> {
                Ok(JsonValue::Text(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<JsonValue, E> {
                Ok(JsonValue::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(JsonValue::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(JsonValue::Other)
            }
        }
        d.deserialize_any(ValueVisitor)
    }
}

impl Decoder for LinesDecoder {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        let node = &self.node;
        self.buf.feed(bytes, |line| {
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
                    Ok(text) => match decode_line(node, text) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_source() -> LinesDecoder {
        LinesDecoder::new(NodeSource::Key("node".into()))
    }

    fn fixed() -> LinesDecoder {
        LinesDecoder::new(NodeSource::Fixed("sensor1".into()))
    }

    fn decode(d: &mut LinesDecoder, input: &[u8]) -> Vec<Decoded> {
        let mut out = Vec::new();
        d.feed(input, &mut out);
        assert_eq!(
            out.iter().map(Decoded::bytes).sum::<usize>() + d.pending(),
            input.len()
        );
        out
    }

    /// The one observation a line decodes to, and its readings as (quantity, value, decimals).
    fn readings(d: &mut LinesDecoder, line: &str) -> (NodeId, Vec<(String, f64, Option<u8>)>) {
        let out = decode(d, line.as_bytes());
        let [Decoded::Observation { obs, bytes }] = &out[..] else {
            panic!("{line:?} → {out:?}")
        };
        assert_eq!(*bytes, line.len());
        let Body::Readings(r) = &obs.body else {
            panic!("{obs:?}")
        };
        for (i, r) in r.iter().enumerate() {
            assert_eq!(usize::from(r.channel), i);
            assert_eq!(r.unit, None);
        }
        let r = r
            .iter()
            .map(|r| (r.quantity.clone().unwrap_or_default(), r.value, r.decimals))
            .collect();
        (obs.node.clone(), r)
    }

    fn error(d: &mut LinesDecoder, input: &str) -> (Fault, String) {
        let out = decode(d, input.as_bytes());
        let [Decoded::Error { fault, detail, .. }] = &out[..] else {
            panic!("{input:?} → {out:?}")
        };
        (*fault, detail.clone())
    }

    fn r(q: &str, v: f64, d: Option<u8>) -> (String, f64, Option<u8>) {
        (q.to_string(), v, d)
    }

    #[test]
    fn key_value_pairs_become_readings_in_line_order_with_their_decimals() {
        let (node, got) = readings(&mut key_source(), "node=kitchen temp=21.50 hum=48\n");
        assert_eq!(node, "kitchen");
        assert_eq!(got, vec![r("temp", 21.5, Some(2)), r("hum", 48.0, None)]);
    }

    #[test]
    fn pairs_may_be_separated_by_tabs_commas_and_semicolons() {
        let (_, got) = readings(&mut fixed(), "a=1\tb=2,c=3;d=4, e=5 ;\n");
        let keys: Vec<_> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn spaces_around_the_equals_sign_are_allowed() {
        let (node, got) = readings(&mut key_source(), "node = hall ;temp = -3.5\n");
        assert_eq!(node, "hall");
        assert_eq!(got, vec![r("temp", -3.5, Some(1))]);
    }

    #[test]
    fn a_fixed_node_source_names_every_line_and_a_node_key_is_just_a_key() {
        let (node, got) = readings(&mut fixed(), "node=7 temp=1\n");
        assert_eq!(node, "sensor1");
        assert_eq!(got, vec![r("node", 7.0, None), r("temp", 1.0, None)]);
    }

    #[test]
    fn non_numeric_values_are_skipped_and_booleans_read_as_one_and_zero() {
        let (_, got) = readings(&mut fixed(), "state=ok temp=20 door=true window=false x=\n");
        assert_eq!(
            got,
            vec![
                r("temp", 20.0, None),
                r("door", 1.0, None),
                r("window", 0.0, None)
            ]
        );
    }

    #[test]
    fn nan_and_infinity_are_not_readings() {
        let (_, got) = readings(&mut fixed(), "a=NaN b=inf c=-infinity d=1e999 e=2\n");
        assert_eq!(got, vec![r("e", 2.0, None)]);
    }

    #[test]
    fn a_json_object_keeps_member_order_and_decimals_as_written() {
        let line = r#"{"node":"kitchen","temp":21.50,"hum":48,"co2":4.1e2,"door":true}"#;
        let (node, got) = readings(&mut key_source(), &format!("{line}\n"));
        assert_eq!(node, "kitchen");
        assert_eq!(
            got,
            vec![
                r("temp", 21.5, Some(2)),
                r("hum", 48.0, None),
                r("co2", 410.0, None),
                r("door", 1.0, None)
            ]
        );
    }

    #[test]
    fn json_values_that_are_not_numbers_are_skipped() {
        let line = r#"{ "a" : "21.5", "b": null, "c": [1, 2], "d": {"e": 1.5}, " f ": -0.25 }"#;
        let (_, got) = readings(&mut fixed(), &format!("{line}\n"));
        assert_eq!(got, vec![r("f", -0.25, Some(2))]);
    }

    #[test]
    fn a_numeric_node_key_names_the_node_and_is_not_a_reading() {
        let (node, got) = readings(&mut key_source(), "{\"node\":12,\"t\":1.0}\n");
        assert_eq!(node, "12");
        assert_eq!(got, vec![r("t", 1.0, Some(1))]);
        let (node, _) = readings(&mut key_source(), "t=1 node=0012\n");
        assert_eq!(node, "0012");
    }

    #[test]
    fn the_node_key_is_configurable() {
        let mut d = LinesDecoder::new(NodeSource::Key("id".into()));
        let (node, got) = readings(&mut d, "id=attic node=3\n");
        assert_eq!(node, "attic");
        assert_eq!(got, vec![r("node", 3.0, None)]);
    }

    #[test]
    fn a_line_without_the_node_key_is_undecodable() {
        let (fault, detail) = error(&mut key_source(), "temp=21.5\n");
        assert_eq!(fault, Fault::Undecodable);
        assert!(detail.contains("no `node` key"), "{detail}");
        let (fault, _) = error(&mut key_source(), "node= temp=21.5\n");
        assert_eq!(fault, Fault::Undecodable);
    }

    #[test]
    fn a_line_without_numeric_readings_is_undecodable() {
        for line in [
            "node=kitchen\n",
            "node=k hello world\n",
            "{\"node\":\"k\",\"s\":\"x\"}\n",
        ] {
            let (fault, detail) = error(&mut key_source(), line);
            assert_eq!(fault, Fault::Undecodable);
            assert!(detail.contains("no numeric readings"), "{detail}");
        }
    }

    #[test]
    fn malformed_json_is_undecodable_and_quotes_the_line() {
        for line in ["{\"temp\":21.5\n", "{\"a\":1} trailing\n", "{temp:1}\n"] {
            let (fault, detail) = error(&mut fixed(), line);
            assert_eq!(fault, Fault::Undecodable);
            assert!(detail.contains("invalid JSON"), "{detail}");
        }
    }

    #[test]
    fn blank_lines_and_comments_are_ignored() {
        let input = b"\n  \r\n# comment temp=1\n\t# indented\n";
        let out = decode(&mut fixed(), input);
        assert_eq!(
            out,
            vec![
                Decoded::Ignored { bytes: 1 },
                Decoded::Ignored { bytes: 4 },
                Decoded::Ignored { bytes: 17 },
                Decoded::Ignored { bytes: 12 },
            ]
        );
    }

    #[test]
    fn crlf_line_ends_are_accepted_and_counted() {
        let (node, got) = readings(&mut key_source(), "node=a t=1.5\r\n");
        assert_eq!(node, "a");
        assert_eq!(got, vec![r("t", 1.5, Some(1))]);
    }

    #[test]
    fn invalid_utf8_is_undecodable_for_that_line_only() {
        let mut d = fixed();
        let out = decode(&mut d, b"t=\xff\xfe1\nt=2\n");
        assert!(matches!(
            out[0],
            Decoded::Error {
                fault: Fault::Undecodable,
                bytes: 6,
                ..
            }
        ));
        assert!(matches!(out[1], Decoded::Observation { bytes: 4, .. }));
    }

    #[test]
    fn an_over_long_line_is_one_framing_error_and_the_next_line_decodes() {
        let mut input = vec![b'x'; 5000];
        input.extend_from_slice(b"\nt=1\n");
        let mut d = fixed();
        let mut out = Vec::new();
        for chunk in input.chunks(100) {
            d.feed(chunk, &mut out);
            assert!(d.pending() <= 5001);
        }
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(
            out[0],
            Decoded::Error {
                fault: Fault::Framing,
                bytes: 5001,
                ..
            }
        ));
        assert!(matches!(out[1], Decoded::Observation { bytes: 4, .. }));
    }

    #[test]
    fn a_line_of_exactly_the_limit_still_decodes() {
        let mut line = "t=1 ".repeat(MAX_LINE / 4);
        line.push('\n');
        let out = decode(&mut fixed(), line.as_bytes());
        assert!(matches!(out[..], [Decoded::Observation { .. }]), "{out:?}");
    }

    #[test]
    fn an_unterminated_line_is_pending_until_finish_reports_it() {
        let mut d = fixed();
        let out = decode(&mut d, b"t=1\nt=2");
        assert_eq!(out.len(), 1);
        assert_eq!(d.pending(), 3);
        let mut out = Vec::new();
        d.finish(&mut out);
        assert!(matches!(
            out[..],
            [Decoded::Error {
                fault: Fault::Framing,
                bytes: 3,
                ..
            }]
        ));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn error_details_quote_at_most_eighty_characters() {
        let line = format!("{}\n", "é".repeat(300));
        let (_, detail) = error(&mut fixed(), &line);
        assert!(detail.chars().count() < 120, "{detail}");
        assert!(detail.ends_with('…'));
    }

    fn line_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"node=kitchen temp=21.50 hum=48\n".to_vec()),
            Just(b"{\"node\":\"k\",\"t\":-1.25,\"on\":true}\r\n".to_vec()),
            Just(b"temp=1\n".to_vec()),
            Just(b"# comment\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"{\"node\":\n".to_vec()),
            Just(vec![b'a'; MAX_LINE + 7]),
            prop::collection::vec(any::<u8>(), 0..40),
            "[a-z=0-9. ;,{}\":#\r\n]{0,60}".prop_map(String::into_bytes),
        ]
    }

    fn run(input: &[u8], cuts: &[usize]) -> (Vec<Decoded>, usize) {
        let mut d = key_source();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, input.len());
            d.feed(&input[start..cut], &mut out);
            start = cut;
        }
        d.feed(&input[start..], &mut out);
        let pending = d.pending();
        d.finish(&mut out);
        (out, pending)
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_outcomes_and_accounts_for_every_byte(
            lines in prop::collection::vec(line_strategy(), 0..12),
            mut cuts in prop::collection::vec(0usize..2000, 0..10),
        ) {
            let input = lines.concat();
            cuts.sort_unstable();
            let (whole, _) = run(&input, &[]);
            let (split, _) = run(&input, &cuts);
            prop_assert_eq!(&whole, &split);
            prop_assert_eq!(split.iter().map(Decoded::bytes).sum::<usize>(), input.len());
        }
    }
}
