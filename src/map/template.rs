//! Topic templates: `sensors/{room}/{node}/{quantity}`.

use std::fmt;

/// The placeholders a topic template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    Gateway,
    Port,
    Node,
    NodeName,
    Room,
    Channel,
    Quantity,
    Unit,
}

impl Placeholder {
    pub const ALL: [(&'static str, Placeholder); 8] = [
        ("gateway", Placeholder::Gateway),
        ("port", Placeholder::Port),
        ("node", Placeholder::Node),
        ("node_name", Placeholder::NodeName),
        ("room", Placeholder::Room),
        ("channel", Placeholder::Channel),
        ("quantity", Placeholder::Quantity),
        ("unit", Placeholder::Unit),
    ];

    fn from_name(name: &str) -> Option<Placeholder> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Value(Placeholder),
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("the topic is empty")]
    Empty,
    #[error("unknown placeholder `{{{0}}}`")]
    UnknownPlaceholder(String),
    #[error("an unclosed `{{`")]
    Unclosed,
    #[error("a `}}` without its `{{`")]
    StrayBrace,
    #[error(
        "`+` and `#` are subscription wildcards and cannot appear in a topic a message is published to"
    )]
    Wildcard,
    #[error("topics may not start with `$`; those are reserved for the broker")]
    Dollar,
    #[error("topics may not contain U+0000")]
    Nul,
}

impl TemplateError {
    /// How to fix it, for the configuration error message.
    pub fn hint(&self) -> String {
        match self {
            TemplateError::UnknownPlaceholder(_)
            | TemplateError::Unclosed
            | TemplateError::StrayBrace => {
                let names: Vec<String> = Placeholder::ALL
                    .iter()
                    .map(|(n, _)| format!("{{{n}}}"))
                    .collect();
                format!("the placeholders are {}", names.join(", "))
            }
            TemplateError::Wildcard => "name one topic, e.g. \"sensors/{room}/{quantity}\"".into(),
            _ => "e.g. \"sensors/{room}/{node}/{quantity}\"".into(),
        }
    }
}

/// The values placeholders take for one reading.
pub struct Context<'a> {
    pub gateway: &'a str,
    pub port: &'a str,
    pub node: &'a str,
    pub node_name: &'a str,
    pub room: &'a str,
    pub channel: u16,
    pub quantity: &'a str,
    pub unit: &'a str,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        if source.starts_with('$') {
            return Err(TemplateError::Dollar);
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Text(rest.to_string()));
                    rest = "";
                }
                Some(i) if rest.as_bytes()[i] == b'}' => return Err(TemplateError::StrayBrace),
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Text(rest[..i].to_string()));
                    }
                    let after = &rest[i + 1..];
                    let end = after.find('}').ok_or(TemplateError::Unclosed)?;
                    let name = &after[..end];
                    let p = Placeholder::from_name(name)
                        .ok_or_else(|| TemplateError::UnknownPlaceholder(name.to_string()))?;
                    parts.push(Part::Value(p));
                    rest = &after[end + 1..];
                }
            }
        }
        for part in &parts {
            if let Part::Text(t) = part {
                if t.contains(['+', '#']) {
                    return Err(TemplateError::Wildcard);
                }
                if t.contains('\0') {
                    return Err(TemplateError::Nul);
                }
            }
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// The topic for one reading. Values are made safe for a topic level: `/`, `+`, `#` and
    /// control characters become `_`, and an empty value becomes `_`.
    pub fn render(&self, ctx: &Context<'_>) -> String {
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Value(p) => {
                    let channel;
                    let value = match p {
                        Placeholder::Gateway => ctx.gateway,
                        Placeholder::Port => ctx.port,
                        Placeholder::Node => ctx.node,
                        Placeholder::NodeName => ctx.node_name,
                        Placeholder::Room => ctx.room,
                        Placeholder::Channel => {
                            channel = ctx.channel.to_string();
                            &channel
                        }
                        Placeholder::Quantity => ctx.quantity,
                        Placeholder::Unit => ctx.unit,
                    };
                    push_level_safe(&mut out, value);
                }
            }
        }
        out
    }

    pub fn uses(&self, p: Placeholder) -> bool {
        self.parts.contains(&Part::Value(p))
    }
}

fn push_level_safe(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push('_');
        return;
    }
    if !value
        .bytes()
        .any(|b| matches!(b, b'/' | b'+' | b'#') || b.is_ascii_control() || b >= 0x80)
    {
        out.push_str(value);
        return;
    }
    out.extend(value.chars().map(|c| {
        if matches!(c, '/' | '+' | '#') || c.is_control() {
            '_'
        } else {
            c
        }
    }));
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context<'static> {
        Context {
            gateway: "gw",
            port: "usb0",
            node: "17",
            node_name: "green/house",
            room: "",
            channel: 2,
            quantity: "temperature",
            unit: "°C",
        }
    }

    #[test]
    fn placeholders_are_filled_and_made_safe() {
        let t = Template::parse("{gateway}/{node_name}/{room}/{channel}/{quantity}").unwrap();
        assert_eq!(t.render(&ctx()), "gw/green_house/_/2/temperature");
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        assert_eq!(
            Template::parse("a/{nodes}"),
            Err(TemplateError::UnknownPlaceholder("nodes".into()))
        );
        assert_eq!(Template::parse("a/{node"), Err(TemplateError::Unclosed));
        assert_eq!(Template::parse("a/node}"), Err(TemplateError::StrayBrace));
        assert_eq!(Template::parse("a/+/b"), Err(TemplateError::Wildcard));
        assert_eq!(Template::parse("a/#"), Err(TemplateError::Wildcard));
        assert_eq!(Template::parse("$SYS/x"), Err(TemplateError::Dollar));
        assert_eq!(Template::parse(""), Err(TemplateError::Empty));
        assert!(
            TemplateError::UnknownPlaceholder("x".into())
                .hint()
                .contains("{node_name}")
        );
    }
}
