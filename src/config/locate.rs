//! Finding the line and key of a configuration error in the TOML text.

use super::ConfigError;
use toml_edit::{Document, Item, Table, Value};

/// One step of a key path: a table key or an index into an array (of tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// `broker.listener[1].bind`
pub fn dotted(path: &[Seg<'_>]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = offset
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

/// Where `path` is written in `text`: the key itself if present, else the nearest table above.
pub fn key_position(text: &str, path: &[Seg<'_>]) -> Option<(u32, u32)> {
    let doc = Document::parse(text).ok()?;
    let mut best = None;
    let mut item: Option<&Item> = None;
    let mut table: Option<&Table> = Some(doc.as_table());
    for seg in path {
        match (seg, table, item) {
            (Seg::Key(k), Some(t), _) => {
                // A missing key is reported at the nearest table that exists.
                let Some((key, value)) = t.get_key_value(k) else {
                    break;
                };
                best = key.span().or_else(|| value.span()).or(best);
                item = Some(value);
                table = value.as_table();
            }
            (Seg::Index(i), _, Some(Item::ArrayOfTables(a))) => {
                let Some(t) = a.get(*i) else { break };
                best = t.span().or(best);
                table = Some(t);
                item = None;
            }
            (Seg::Index(i), _, Some(Item::Value(Value::Array(a)))) => {
                let Some(v) = a.get(*i) else { break };
                best = v.span().or(best);
                table = None;
                item = None;
            }
            _ => break,
        }
    }
    best.map(|span| line_col(text, span.start))
}

/// The deepest key path whose key or value covers `offset`.
fn path_at(text: &str, offset: usize) -> Option<String> {
    let doc = Document::parse(text).ok()?;
    let mut path = Vec::new();
    walk(doc.as_table(), offset, &mut path).then(|| path.join(""))
}

fn walk(table: &Table, offset: usize, path: &mut Vec<String>) -> bool {
    for (k, item) in table.iter() {
        let key_span = table.key(k).and_then(|key| key.span());
        let covers =
            |span: Option<std::ops::Range<usize>>| span.is_some_and(|s| s.contains(&offset));
        let sep = if path.is_empty() { "" } else { "." };
        path.push(format!("{sep}{k}"));
        match item {
            Item::Table(t) if walk(t, offset, path) => return true,
            Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    path.push(format!("[{i}]"));
                    if walk(t, offset, path) {
                        return true;
                    }
                    path.pop();
                }
            }
            _ => {}
        }
        if covers(key_span)
            || (!matches!(item, Item::Table(_) | Item::ArrayOfTables(_)) && covers(item.span()))
        {
            return true;
        }
        path.pop();
    }
    false
}

pub fn from_toml_error(text: &str, file: &str, err: &toml::de::Error) -> ConfigError {
    let span = err.span();
    let (line, column) = span.clone().map(|s| line_col(text, s.start)).unzip();
    let key = span.and_then(|s| path_at(text, s.start));
    let message = err.message().trim().to_string();
    let hint = if message.contains("unknown field") {
        Some("check the spelling against the configuration reference in README.md".to_string())
    } else if message.contains("unknown variant") {
        Some("use one of the values listed".to_string())
    } else if message.contains("invalid type") {
        Some("numbers and booleans are written without quotes, text with quotes".to_string())
    } else if key.is_none() {
        Some("this is a TOML syntax error; see https://toml.io for the syntax".to_string())
    } else {
        None
    };
    ConfigError {
        file: file.to_string(),
        line,
        column,
        key,
        message,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\n", 0), (1, 1));
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
    }

    #[test]
    fn a_nested_key_is_found() {
        let text = "x = 1\n[broker]\n[[broker.listener]]\nbind = \"a\"\n";
        let p = [
            Seg::Key("broker"),
            Seg::Key("listener"),
            Seg::Index(0),
            Seg::Key("bind"),
        ];
        assert_eq!(key_position(text, &p), Some((4, 1)));
        assert_eq!(dotted(&p), "broker.listener[0].bind");
    }
}
