//! The configuration file users edit on the device: TOML in, a validated [`ValidConfig`] out.
//!
//! Every error names the file, the line and the key, and says how to fix it. Parsing is strict
//! (`deny_unknown_fields`), so a misspelt key is an error rather than a silently ignored line.

mod duration;
mod locate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::parse_duration;

/// The raw file, as serde reads it. Validation turns it into a [`ValidConfig`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawConfig {
    /// Names this gateway in topics and upstream client ids; defaults to the host name.
    pub gateway_id: Option<String>,
    /// Where the broker snapshot and the outbox live.
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub broker: RawBroker,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawLog {
    /// A tracing filter such as `info` or `sensorgate=debug,info`; `RUST_LOG` overrides it.
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawBroker {
    #[serde(default)]
    pub listener: Vec<RawListener>,
    pub allow_anonymous: Option<bool>,
    pub password_file: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub max_packet_size: Option<usize>,
    pub max_inflight: Option<u16>,
    pub max_queued: Option<usize>,
    pub max_keep_alive: Option<u16>,
    pub sys_interval: Option<String>,
    pub persistence: Option<bool>,
    pub snapshot_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawListener {
    pub bind: String,
}

/// A configuration that passed validation: every value is in range and every default applied.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The file it came from, if any; `None` for the embedded default.
    pub source: Option<PathBuf>,
    pub gateway_id: String,
    pub data_dir: PathBuf,
    pub log_level: Option<String>,
    pub broker: BrokerConfig,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listeners: Vec<SocketAddr>,
    pub allow_anonymous: bool,
    pub password_file: Option<PathBuf>,
    pub max_connections: usize,
    pub max_packet_size: usize,
    pub max_inflight: u16,
    pub max_queued: usize,
    /// Keep-alive the broker imposes when a client asks for 0 or more than this; 0 = no limit.
    pub max_keep_alive: u16,
    pub sys_interval: Duration,
    pub persistence: bool,
    pub snapshot_interval: Duration,
}

/// Defaults, chosen to match Mosquitto's where a user would compare.
pub mod defaults {
    pub const LISTENER: &str = "127.0.0.1:1883";
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// 1 MiB: far above any sensor payload, small enough that a hostile client cannot make
    /// the gateway allocate much.
    pub const MAX_PACKET_SIZE: usize = 1024 * 1024;
    /// Mosquitto's `max_inflight_messages`.
    pub const MAX_INFLIGHT: u16 = 20;
    /// Mosquitto's `max_queued_messages`.
    pub const MAX_QUEUED: usize = 1000;
    pub const SYS_INTERVAL: &str = "10s";
    pub const SNAPSHOT_INTERVAL: &str = "30s";
    pub const DATA_DIR: &str = "./sensorgate-data";
}

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// Dotted key path, e.g. `broker.listener[0].bind`.
    pub key: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: None,
        column: None,
        key: None,
        message: format!("cannot read the file: {e}"),
        hint: Some("check the path and that the service user may read it".into()),
    })?;
    parse(&text, &path.display().to_string(), Some(path.to_path_buf()))
}

/// The embedded default: a local broker on 127.0.0.1:1883, data under `$STATE_DIRECTORY` or
/// `./sensorgate-data`.
pub fn embedded_default() -> ValidConfig {
    match parse("", "<embedded default>", None) {
        Ok(config) => config,
        Err(e) => unreachable!("the embedded default configuration is invalid: {e}"),
    }
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str, source: Option<PathBuf>) -> Result<ValidConfig, ConfigError> {
    let raw: RawConfig =
        toml::from_str(text).map_err(|e| locate::from_toml_error(text, file, &e))?;
    let v = Validator { text, file };
    v.validate(raw, source)
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn error(&self, path: &[locate::Seg<'_>], message: String, hint: &str) -> ConfigError {
        let (line, column) = locate::key_position(self.text, path).unzip();
        ConfigError {
            file: self.file.to_string(),
            line,
            column,
            key: Some(locate::dotted(path)),
            message,
            hint: (!hint.is_empty()).then(|| hint.to_string()),
        }
    }

    fn duration(
        &self,
        value: Option<&str>,
        default: &str,
        path: &[locate::Seg<'_>],
    ) -> Result<Duration, ConfigError> {
        let text = value.unwrap_or(default);
        parse_duration(text).ok_or_else(|| {
            self.error(
                path,
                format!("`{text}` is not a duration"),
                "write a number with a unit, e.g. \"500ms\", \"10s\", \"5m\", \"1h\"",
            )
        })
    }

    fn validate(
        &self,
        raw: RawConfig,
        source: Option<PathBuf>,
    ) -> Result<ValidConfig, ConfigError> {
        use locate::Seg::{Index, Key};

        let gateway_id = match raw.gateway_id {
            Some(id) => {
                if id.is_empty()
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                {
                    return Err(self.error(
                        &[Key("gateway-id")],
                        format!("`{id}` is not a usable gateway id"),
                        "use letters, digits, '-', '_' or '.'; it becomes part of MQTT topics",
                    ));
                }
                id
            }
            None => default_gateway_id(),
        };

        let data_dir = raw.data_dir.unwrap_or_else(default_data_dir);

        let b = raw.broker;
        let mut listeners = Vec::new();
        for (i, l) in b.listener.iter().enumerate() {
            let addr: SocketAddr = l.bind.parse().map_err(|_| {
                self.error(
                    &[Key("broker"), Key("listener"), Index(i), Key("bind")],
                    format!("`{}` is not an address and port", l.bind),
                    "write it as \"127.0.0.1:1883\", \"0.0.0.0:1883\" or \"[::1]:1883\"",
                )
            })?;
            listeners.push(addr);
        }
        if listeners.is_empty() {
            listeners.push(
                defaults::LISTENER.parse().map_err(|_| {
                    self.error(&[Key("broker")], "bad built-in listener".into(), "")
                })?,
            );
        }
        let exposed = listeners.iter().any(|a| !a.ip().is_loopback());
        let allow_anonymous = match (b.allow_anonymous, &b.password_file) {
            (Some(v), _) => v,
            (None, Some(_)) => false,
            (None, None) => {
                if exposed {
                    let i = listeners
                        .iter()
                        .position(|a| !a.ip().is_loopback())
                        .unwrap_or(0);
                    return Err(self.error(
                        &[Key("broker"), Key("listener"), Index(i), Key("bind")],
                        format!(
                            "listener {} is reachable from the network but no authentication is set",
                            listeners[i]
                        ),
                        "set `password-file` in [broker] (create it with `sensorgate passwd`), \
                         or write `allow-anonymous = true` if anyone on the network may connect",
                    ));
                }
                true
            }
        };

        let max_packet_size = b.max_packet_size.unwrap_or(defaults::MAX_PACKET_SIZE);
        if !(64..=268_435_455).contains(&max_packet_size) {
            return Err(self.error(
                &[Key("broker"), Key("max-packet-size")],
                format!("{max_packet_size} is out of range"),
                "use a size in bytes from 64 to 268435455 (MQTT's largest packet)",
            ));
        }
        let max_inflight = b.max_inflight.unwrap_or(defaults::MAX_INFLIGHT);
        if max_inflight == 0 {
            return Err(self.error(
                &[Key("broker"), Key("max-inflight")],
                "must be at least 1".into(),
                "20 is Mosquitto's default",
            ));
        }
        let max_connections = b.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(self.error(
                &[Key("broker"), Key("max-connections")],
                "must be at least 1".into(),
                "leave it out for the default of 10000",
            ));
        }

        let sys_interval = self.duration(
            b.sys_interval.as_deref(),
            defaults::SYS_INTERVAL,
            &[Key("broker"), Key("sys-interval")],
        )?;
        let snapshot_interval = self.duration(
            b.snapshot_interval.as_deref(),
            defaults::SNAPSHOT_INTERVAL,
            &[Key("broker"), Key("snapshot-interval")],
        )?;

        Ok(ValidConfig {
            source,
            gateway_id,
            data_dir,
            log_level: raw.log.level,
            broker: BrokerConfig {
                listeners,
                allow_anonymous,
                password_file: b.password_file,
                max_connections,
                max_packet_size,
                max_inflight,
                max_queued: b.max_queued.unwrap_or(defaults::MAX_QUEUED),
                max_keep_alive: b.max_keep_alive.unwrap_or(0),
                sys_interval,
                persistence: b.persistence.unwrap_or(true),
                snapshot_interval,
            },
        })
    }
}

fn default_data_dir() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories; the first is ours.
        Some(dirs) if !dirs.is_empty() => {
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            PathBuf::from(first)
        }
        _ => PathBuf::from(defaults::DATA_DIR),
    }
}

fn default_gateway_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .collect();
    if id.is_empty() {
        "sensorgate".into()
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_file_gives_a_loopback_broker() {
        let c = parse("", "t.toml", None).expect("valid");
        assert_eq!(c.broker.listeners, vec!["127.0.0.1:1883".parse().unwrap()]);
        assert!(c.broker.allow_anonymous);
        assert_eq!(c.broker.max_inflight, 20);
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let e = parse(
            "[broker]\nmax-inflight = 5\nmax-infligth = 3\n",
            "gw.toml",
            None,
        )
        .expect_err("unknown key");
        assert_eq!(e.file, "gw.toml");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("broker.max-infligth"));
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn a_bad_listener_address_points_at_its_line() {
        let text = "[broker]\n\n[[broker.listener]]\nbind = \"127.0.0.1:1883\"\n\n[[broker.listener]]\nbind = \"localhost\"\n";
        let e = parse(text, "gw.toml", None).expect_err("bad bind");
        assert_eq!(e.line, Some(7));
        assert_eq!(e.key.as_deref(), Some("broker.listener[1].bind"));
        assert!(e.hint.is_some());
    }

    #[test]
    fn a_network_listener_without_authentication_is_refused() {
        let text = "[[broker.listener]]\nbind = \"0.0.0.0:1883\"\n";
        let e = parse(text, "gw.toml", None).expect_err("exposed");
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("allow-anonymous"), "{e}");
        let ok = parse(
            &format!("{text}[broker]\nallow-anonymous = true\n"),
            "gw.toml",
            None,
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let e = parse("[broker]\nmax-inflight = \"lots\"\n", "gw.toml", None).expect_err("type");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.key.as_deref(), Some("broker.max-inflight"));
    }

    #[test]
    fn a_bad_duration_is_explained() {
        let e = parse("[broker]\nsys-interval = \"often\"\n", "gw.toml", None).expect_err("dur");
        assert_eq!(e.line, Some(2));
        assert!(e.hint.as_deref().unwrap_or("").contains("10s"));
    }
}
