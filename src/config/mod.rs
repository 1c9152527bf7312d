//! The configuration file users edit on the device: TOML in, a validated [`ValidConfig`] out.
//!
//! Every error names the file, the line and the key, and says how to fix it. Parsing is strict
//! (`deny_unknown_fields`), so a misspelt key is an error rather than a silently ignored line.

mod duration;
mod locate;
mod upstream;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::broker::codec::QoS;
use crate::decode::{NodeSource, Protocol};
use crate::map::{
    DEFAULT_TOPIC, Mapping, NodeMeta, Output, PayloadFormat, Rule, Selector, Template, Transform,
};

pub use duration::parse_duration;
pub use upstream::{
    Backlog, Endpoint, InRule, OutRule, OutboxSettings, Password, RawOutbox, RawUpstream,
    UpstreamConfig, parse_size,
};

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
    /// Serial ports to read, one `[[port]]` table each.
    #[serde(default)]
    pub port: Vec<RawPort>,
    /// Node metadata, one `[[node]]` table each.
    #[serde(default)]
    pub node: Vec<RawNode>,
    #[serde(default)]
    pub mapping: RawMapping,
    /// The broker to forward to; absent: no uplink.
    pub upstream: Option<RawUpstream>,
    #[serde(default)]
    pub outbox: RawOutbox,
    // --- running on the device (issue 6) ---
    #[serde(default)]
    pub availability: RawAvailability,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub homeassistant: RawHomeAssistant,
}

/// When a node counts as offline.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawAvailability {
    /// Expected report interval of nodes that do not announce one in their `Hello`.
    pub default_interval: Option<String>,
    /// A node is offline after this many intervals without a frame.
    pub missed_intervals: Option<u32>,
}

/// The optional Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawMetrics {
    /// Address to serve `GET /metrics` on; no endpoint when absent.
    pub listen: Option<String>,
}

/// Home Assistant MQTT discovery.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawHomeAssistant {
    pub discovery: Option<bool>,
    /// Discovery prefix (Home Assistant's default is `homeassistant`).
    pub prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawPort {
    pub name: Option<String>,
    pub path: PathBuf,
    pub baud: Option<u32>,
    pub protocol: Option<Protocol>,
    /// `lines` only: every line comes from this node.
    pub node: Option<IdValue>,
    /// `lines` only: the key whose value names the node (default `node`).
    pub node_key: Option<String>,
}

/// A node id as users write it: `17` or `"kitchen"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum IdValue {
    Number(u64),
    Text(String),
}

impl IdValue {
    pub fn as_id(&self) -> String {
        match self {
            IdValue::Number(n) => n.to_string(),
            IdValue::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawNode {
    pub id: IdValue,
    pub name: Option<String>,
    pub room: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawMapping {
    /// Topic for readings no rule selects.
    pub default_topic: Option<String>,
    /// `publish` (default) or `drop` readings no rule selects.
    pub unmapped: Option<Unmapped>,
    pub payload: Option<PayloadFormat>,
    pub qos: Option<u8>,
    pub retain: Option<bool>,
    #[serde(default)]
    pub rule: Vec<RawRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmapped {
    Publish,
    Drop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawRule {
    pub port: Option<String>,
    pub node: Option<IdValue>,
    pub channel: Option<u16>,
    pub quantity: Option<String>,
    /// Topic template; required unless `drop = true`.
    pub topic: Option<String>,
    #[serde(default)]
    pub drop: bool,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub decimals: Option<u8>,
    pub payload: Option<PayloadFormat>,
    pub qos: Option<u8>,
    pub retain: Option<bool>,
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
    pub ports: Vec<PortConfig>,
    pub mapping: Mapping,
    pub upstream: Option<UpstreamConfig>,
    pub outbox: OutboxSettings,
    pub device: DeviceConfig,
}

/// Node availability, metrics and Home Assistant discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Expected report interval for nodes that announce none.
    pub default_interval: Duration,
    /// Missed intervals after which a node is offline.
    pub missed_intervals: u32,
    /// Where the Prometheus endpoint listens, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// The Home Assistant discovery prefix, when discovery is on.
    pub discovery_prefix: Option<String>,
}

/// One serial port to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Used in topics (`{port}`), counters and logs.
    pub name: String,
    pub path: PathBuf,
    pub baud: u32,
    pub protocol: Protocol,
    /// `lines` only: where the node id comes from.
    pub node_source: NodeSource,
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
    pub const BAUD: u32 = 115_200;
    pub const NODE_KEY: &str = "node";
    /// Nodes that announce no interval are expected to report at least this often.
    pub const NODE_INTERVAL: &str = "5m";
    /// Zigbee2MQTT and ESPHome also wait a few missed reports before calling a device offline.
    pub const MISSED_INTERVALS: u32 = 3;
    pub const DISCOVERY_PREFIX: &str = "homeassistant";
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

    /// A duration that paces a recurring task, so it must not be zero.
    fn period(
        &self,
        value: Option<&str>,
        default: &str,
        path: &[locate::Seg<'_>],
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(value, default, path)?;
        if d.is_zero() {
            return Err(self.error(path, "must be more than 0".into(), "e.g. \"10s\""));
        }
        Ok(d)
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

        let sys_interval = self.period(
            b.sys_interval.as_deref(),
            defaults::SYS_INTERVAL,
            &[Key("broker"), Key("sys-interval")],
        )?;
        let snapshot_interval = self.period(
            b.snapshot_interval.as_deref(),
            defaults::SNAPSHOT_INTERVAL,
            &[Key("broker"), Key("snapshot-interval")],
        )?;

        let ports = self.ports(&raw.port)?;
        let mapping = self.mapping(&gateway_id, &raw.node, &raw.mapping, &ports)?;
        let upstream = match &raw.upstream {
            Some(u) => Some(self.upstream(u, &gateway_id)?),
            None => None,
        };
        let outbox = self.outbox(&raw.outbox)?;
        let device = self.device(&raw.availability, &raw.metrics, &raw.homeassistant)?;

        Ok(ValidConfig {
            source,
            ports,
            mapping,
            upstream,
            outbox,
            device,
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

impl Validator<'_> {
    /// `[availability]`, `[metrics]` and `[homeassistant]`.
    fn device(
        &self,
        a: &RawAvailability,
        m: &RawMetrics,
        h: &RawHomeAssistant,
    ) -> Result<DeviceConfig, ConfigError> {
        use locate::Seg::Key;
        let default_interval = self.duration(
            a.default_interval.as_deref(),
            defaults::NODE_INTERVAL,
            &[Key("availability"), Key("default-interval")],
        )?;
        if default_interval.is_zero() {
            return Err(self.error(
                &[Key("availability"), Key("default-interval")],
                "must be longer than zero".into(),
                "use how often your nodes report, e.g. \"60s\"",
            ));
        }
        let missed_intervals = a.missed_intervals.unwrap_or(defaults::MISSED_INTERVALS);
        if missed_intervals == 0 {
            return Err(self.error(
                &[Key("availability"), Key("missed-intervals")],
                "must be at least 1".into(),
                "3 tolerates a couple of lost radio frames",
            ));
        }
        let metrics_listen = match &m.listen {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                self.error(
                    &[Key("metrics"), Key("listen")],
                    format!("`{text}` is not an address and port"),
                    "write it as \"127.0.0.1:9108\" (Prometheus scrapes GET /metrics there)",
                )
            })?),
        };
        let discovery_prefix = if h.discovery.unwrap_or(false) {
            let prefix = h.prefix.as_deref().unwrap_or(defaults::DISCOVERY_PREFIX);
            if prefix.is_empty()
                || prefix.starts_with('/')
                || prefix.ends_with('/')
                || prefix.contains(['+', '#', '\0'])
            {
                return Err(self.error(
                    &[Key("homeassistant"), Key("prefix")],
                    format!("`{prefix}` cannot be a discovery prefix"),
                    "leave it out for Home Assistant's default `homeassistant`; no '+', '#' or leading/trailing '/'",
                ));
            }
            Some(prefix.to_string())
        } else {
            None
        };
        Ok(DeviceConfig {
            default_interval,
            missed_intervals,
            metrics_listen,
            discovery_prefix,
        })
    }

    fn ports(&self, raw: &[RawPort]) -> Result<Vec<PortConfig>, ConfigError> {
        use locate::Seg::{Index, Key};
        let mut ports: Vec<PortConfig> = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let at = |k: &'static str| [Key("port"), Index(i), Key(k)];
            let name = match &p.name {
                Some(n) => n.clone(),
                None => p
                    .path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("port{i}")),
            };
            if name.is_empty() || name.contains(['/', '+', '#']) {
                return Err(self.error(
                    &at("name"),
                    format!("`{name}` cannot be a port name"),
                    "port names appear in topics: use letters, digits, '-' or '_'",
                ));
            }
            if let Some(prev) = ports.iter().position(|q| q.name == name) {
                return Err(self.error(
                    &at(if p.name.is_some() { "name" } else { "path" }),
                    format!("port name `{name}` is already used by port {prev}"),
                    "give each [[port]] its own `name`",
                ));
            }
            if let Some(prev) = ports.iter().position(|q| q.path == p.path) {
                return Err(self.error(
                    &at("path"),
                    format!(
                        "{} is already read by port `{}`",
                        p.path.display(),
                        ports[prev].name
                    ),
                    "a serial device can be opened by one port only",
                ));
            }
            let baud = p.baud.unwrap_or(defaults::BAUD);
            if !(50..=4_000_000).contains(&baud) {
                return Err(self.error(
                    &at("baud"),
                    format!("{baud} is not a serial speed"),
                    "e.g. 9600, 38400, 115200",
                ));
            }
            let protocol = p.protocol.unwrap_or(Protocol::Sensorgate);
            if protocol != Protocol::Lines && (p.node.is_some() || p.node_key.is_some()) {
                return Err(self.error(
                    &at(if p.node.is_some() { "node" } else { "node-key" }),
                    format!("only `lines` ports take a node id from configuration; this port speaks `{}`", protocol.name()),
                    "remove the key; sensorgate and MySensors frames carry their node id",
                ));
            }
            let node_source = match (&p.node, &p.node_key) {
                (Some(_), Some(_)) => {
                    return Err(self.error(
                        &at("node-key"),
                        "`node` and `node-key` exclude each other".into(),
                        "keep one",
                    ));
                }
                (Some(id), None) => NodeSource::Fixed(id.as_id()),
                (None, Some(k)) => NodeSource::Key(k.clone()),
                (None, None) => NodeSource::Key(defaults::NODE_KEY.to_string()),
            };
            ports.push(PortConfig {
                name,
                path: p.path.clone(),
                baud,
                protocol,
                node_source,
            });
        }
        Ok(ports)
    }

    fn qos(&self, value: Option<u8>, path: &[locate::Seg<'_>]) -> Result<QoS, ConfigError> {
        match value {
            None => Ok(QoS::AtLeastOnce),
            Some(v) => QoS::from_u8(v)
                .ok_or_else(|| self.error(path, format!("{v} is not a QoS"), "use 0, 1 or 2")),
        }
    }

    fn template(&self, text: &str, path: &[locate::Seg<'_>]) -> Result<Template, ConfigError> {
        Template::parse(text)
            .map_err(|e| self.error(path, format!("topic `{text}`: {e}"), &e.hint()))
    }

    fn mapping(
        &self,
        gateway: &str,
        nodes: &[RawNode],
        raw: &RawMapping,
        ports: &[PortConfig],
    ) -> Result<Mapping, ConfigError> {
        use locate::Seg::{Index, Key};
        let mut metas = std::collections::HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            let id = n.id.as_id();
            if metas
                .insert(
                    id.clone(),
                    NodeMeta {
                        name: n.name.clone(),
                        room: n.room.clone(),
                    },
                )
                .is_some()
            {
                return Err(self.error(
                    &[Key("node"), Index(i), Key("id")],
                    format!("node `{id}` is described twice"),
                    "merge the two [[node]] tables",
                ));
            }
        }
        let default_payload = raw.payload.unwrap_or_default();
        let default_qos = self.qos(raw.qos, &[Key("mapping"), Key("qos")])?;
        let default_retain = raw.retain.unwrap_or(true);
        let default = match raw.unmapped.unwrap_or(Unmapped::Publish) {
            Unmapped::Drop => None,
            Unmapped::Publish => Some(Output {
                topic: self.template(
                    raw.default_topic.as_deref().unwrap_or(DEFAULT_TOPIC),
                    &[Key("mapping"), Key("default-topic")],
                )?,
                transform: Transform::default(),
                payload: default_payload,
                qos: default_qos,
                retain: default_retain,
            }),
        };
        let mut rules: Vec<Rule> = Vec::new();
        for (i, r) in raw.rule.iter().enumerate() {
            let at = |k: &'static str| [Key("mapping"), Key("rule"), Index(i), Key(k)];
            if let Some(port) = &r.port {
                if !ports.iter().any(|p| &p.name == port) {
                    let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
                    return Err(self.error(
                        &at("port"),
                        format!("no port is named `{port}`"),
                        &format!(
                            "the ports are: {}",
                            if names.is_empty() {
                                "(none)".into()
                            } else {
                                names.join(", ")
                            }
                        ),
                    ));
                }
            }
            let selector = Selector {
                port: r.port.clone(),
                node: r.node.as_ref().map(IdValue::as_id),
                channel: r.channel,
                quantity: r.quantity.clone(),
            };
            if let Some(j) = rules.iter().position(|other| other.selector == selector) {
                return Err(self.error(
                    &at("topic"),
                    format!("this rule selects exactly what rule {j} selects, so one of them would never apply"),
                    "make the selectors (port, node, channel, quantity) differ, or merge the rules",
                ));
            }
            let output = if r.drop {
                if r.topic.is_some() {
                    return Err(self.error(
                        &at("drop"),
                        "a rule cannot both drop and publish".into(),
                        "remove `topic` or `drop`",
                    ));
                }
                None
            } else {
                let Some(topic) = &r.topic else {
                    return Err(self.error(
                        &[Key("mapping"), Key("rule"), Index(i)],
                        "the rule has no `topic`".into(),
                        "add `topic = \"sensors/{room}/{quantity}\"`, or `drop = true` to discard what it selects",
                    ));
                };
                let scale = r.scale.unwrap_or(1.0);
                let offset = r.offset.unwrap_or(0.0);
                if !scale.is_finite() || !offset.is_finite() || scale == 0.0 {
                    return Err(self.error(
                        &at("scale"),
                        "scale must be a non-zero number and offset a number".into(),
                        "",
                    ));
                }
                if r.decimals.is_some_and(|d| d > 12) {
                    return Err(self.error(&at("decimals"), "at most 12 decimals".into(), ""));
                }
                Some(Output {
                    topic: self.template(topic, &at("topic"))?,
                    transform: Transform {
                        scale,
                        offset,
                        decimals: r.decimals,
                    },
                    payload: r.payload.unwrap_or(default_payload),
                    qos: match r.qos {
                        Some(_) => self.qos(r.qos, &at("qos"))?,
                        None => default_qos,
                    },
                    retain: r.retain.unwrap_or(default_retain),
                })
            };
            rules.push(Rule { selector, output });
        }
        Ok(Mapping {
            gateway: gateway.to_string(),
            rules,
            default,
            nodes: metas,
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
