//! `[upstream]` and `[outbox]`: where messages are forwarded and how they are kept until then.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::locate::Seg::{self, Index, Key};
use super::{ConfigError, Validator, parse_duration};
use crate::broker::codec::QoS;
use crate::broker::topic;
use crate::outbox::FullPolicy;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawUpstream {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// A file holding the password (first line); never put the password itself in this file.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// PEM file of the certificate authorities to trust; default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS (AWS IoT Core).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive: Option<String>,
    /// Keep the upstream session across reconnects (clean-session 0). Default true.
    pub persistent_session: Option<bool>,
    /// Publishes in flight upstream at once.
    pub inflight: Option<u16>,
    pub reconnect_min: Option<String>,
    pub reconnect_max: Option<String>,
    /// Messages per second when draining a backlog; 0 or absent: no limit.
    pub drain_rate: Option<u32>,
    /// Retained `online`/`offline` presence topic (default `sensorgate/{gateway}/status`).
    pub status_topic: Option<String>,
    #[serde(default)]
    pub out: Vec<RawOut>,
    #[serde(default, rename = "in")]
    pub inbound: Vec<RawIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOut {
    /// Local topic filter, e.g. `sensors/#`.
    pub filter: String,
    /// Stripped from the local topic before `remote-prefix` is added.
    pub local_prefix: Option<String>,
    /// Added in front of the upstream topic, e.g. `site/{gateway}/`.
    pub remote_prefix: Option<String>,
    pub qos: Option<u8>,
    /// `all` (default) or `latest`.
    pub backlog: Option<Backlog>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawIn {
    /// Upstream topic filter to subscribe to, e.g. `cmd/{gateway}/#`.
    pub filter: String,
    pub remote_prefix: Option<String>,
    pub local_prefix: Option<String>,
    pub qos: Option<u8>,
}

/// What to forward after an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backlog {
    /// Every message, in order.
    #[default]
    All,
    /// Only the newest message per topic; superseded ones are skipped and counted.
    Latest,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOutbox {
    /// Quota, e.g. `"64MiB"`.
    pub max_bytes: Option<String>,
    /// Messages older than this are dropped and counted, e.g. `"30d"`.
    pub max_age: Option<String>,
    /// `drop-oldest` (default), `drop-newest` or `block`.
    pub when_full: Option<WhenFull>,
    /// Longest wait before a commit: longer spares the SD card, shorter acknowledges sooner.
    pub commit_delay: Option<String>,
    /// Keep QoS 0 messages in the outbox too (default true); when false they are sent only
    /// while the uplink is connected.
    pub store_qos0: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    DropOldest,
    DropNewest,
    Block,
}

/// The URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutRule {
    pub filter: String,
    pub local_prefix: String,
    pub remote_prefix: String,
    pub qos: QoS,
    pub backlog: Backlog,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InRule {
    pub filter: String,
    pub remote_prefix: String,
    pub local_prefix: String,
    pub qos: QoS,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub url: String,
    pub endpoint: Endpoint,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Password>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub keep_alive: Duration,
    pub persistent_session: bool,
    pub inflight: u16,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub drain_rate: Option<u32>,
    pub status_topic: String,
    pub out: Vec<OutRule>,
    pub inbound: Vec<InRule>,
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    pub config: crate::outbox::OutboxConfig,
    pub store_qos0: bool,
}

/// Parses `64MiB`, `500 KB`, `1GiB`, `1000000`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1024,
        "mb" => 1_000_000,
        "mib" | "m" => 1024 * 1024,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn endpoint(url: &str) -> Option<Endpoint> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("ssl://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("tcp://") {
        (false, r)
    } else {
        return None;
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => return None,
        },
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return None;
    }
    Some(Endpoint {
        host: host.to_string(),
        port,
        tls,
    })
}

impl Validator<'_> {
    fn duration_or(
        &self,
        v: Option<&str>,
        default: Duration,
        path: &[Seg<'_>],
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(t) => parse_duration(t).ok_or_else(|| {
                self.error(
                    path,
                    format!("`{t}` is not a duration"),
                    "e.g. \"500ms\", \"30s\", \"5m\", \"7d\"",
                )
            }),
        }
    }

    fn rule_qos(&self, v: Option<u8>, path: &[Seg<'_>]) -> Result<QoS, ConfigError> {
        let v = v.unwrap_or(1);
        QoS::from_u8(v)
            .ok_or_else(|| self.error(path, format!("{v} is not a QoS"), "use 0, 1 or 2"))
    }

    pub(super) fn upstream(
        &self,
        raw: &RawUpstream,
        gateway: &str,
    ) -> Result<UpstreamConfig, ConfigError> {
        let at = |k: &'static str| [Key("upstream"), Key(k)];
        let endpoint = endpoint(&raw.url).ok_or_else(|| {
            self.error(
                &at("url"),
                format!("`{}` is not an MQTT broker address", raw.url),
                "write mqtt://host:1883 or mqtts://host:8883",
            )
        })?;
        let password = match (&raw.password_file, &raw.password_env) {
            (Some(_), Some(_)) => {
                return Err(self.error(
                    &at("password-env"),
                    "give the password one way".into(),
                    "keep `password-file` or `password-env`",
                ));
            }
            (Some(f), None) => Some(Password::File(f.clone())),
            (None, Some(e)) => Some(Password::Env(e.clone())),
            (None, None) => None,
        };
        if password.is_some() && raw.username.is_none() {
            return Err(self.error(
                &at("username"),
                "a password needs a `username`".into(),
                "MQTT 3.1.1 sends a password only with a user name",
            ));
        }
        let client_cert = match (&raw.client_cert, &raw.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(self.error(
                    &at(if raw.client_cert.is_some() {
                        "client-cert"
                    } else {
                        "client-key"
                    }),
                    "mutual TLS needs both `client-cert` and `client-key`".into(),
                    "give both PEM files, or neither",
                ));
            }
        };
        if (client_cert.is_some() || raw.ca_file.is_some()) && !endpoint.tls {
            return Err(self.error(
                &at("url"),
                "certificates are set but the URL is not mqtts://".into(),
                "use mqtts://host:8883",
            ));
        }
        // Mosquitto's default `max_inflight_messages`: more in flight and it disconnects a
        // QoS 2 publisher, which MQTT 3.1.1 gives no way to learn in advance.
        let inflight = raw.inflight.unwrap_or(20);
        if !(1..=1000).contains(&inflight) {
            return Err(self.error(
                &at("inflight"),
                format!("{inflight} is out of range"),
                "use 1 to 1000, at most the upstream's own limit (Mosquitto: 20)",
            ));
        }
        let keep_alive = self.duration_or(
            raw.keep_alive.as_deref(),
            Duration::from_secs(30),
            &at("keep-alive"),
        )?;
        if keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(self.error(&at("keep-alive"), "at most 65535 seconds".into(), ""));
        }
        if keep_alive.subsec_nanos() != 0 {
            return Err(self.error(
                &at("keep-alive"),
                "MQTT counts keep-alive in whole seconds".into(),
                "e.g. \"30s\"; \"0s\" turns pings off",
            ));
        }
        let reconnect_min = self.duration_or(
            raw.reconnect_min.as_deref(),
            Duration::from_secs(1),
            &at("reconnect-min"),
        )?;
        if reconnect_min.is_zero() {
            return Err(self.error(
                &at("reconnect-min"),
                "must be more than 0: the uplink would retry without pause".into(),
                "e.g. \"1s\"",
            ));
        }
        let reconnect_max = self.duration_or(
            raw.reconnect_max.as_deref(),
            Duration::from_secs(60),
            &at("reconnect-max"),
        )?;
        let client_id = raw
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sensorgate-{gateway}"));
        if client_id.is_empty() {
            return Err(self.error(
                &at("client-id"),
                "must not be empty".into(),
                "leave it out for sensorgate-<gateway-id>",
            ));
        }
        let status_topic = raw
            .status_topic
            .clone()
            .unwrap_or_else(|| "sensorgate/{gateway}/status".into())
            .replace("{gateway}", gateway);
        if !topic::validate_topic(&status_topic) {
            return Err(self.error(
                &at("status-topic"),
                format!("`{status_topic}` is not a topic name"),
                "no `+` or `#`",
            ));
        }
        let mut out = Vec::new();
        for (i, r) in raw.out.iter().enumerate() {
            let at = |k: &'static str| [Key("upstream"), Key("out"), Index(i), Key(k)];
            if topic::validate_filter(&r.filter).is_err() {
                return Err(self.error(
                    &at("filter"),
                    format!("`{}` is not a topic filter", r.filter),
                    "e.g. \"sensors/#\"",
                ));
            }
            let local_prefix = r.local_prefix.clone().unwrap_or_default();
            let remote_prefix = r
                .remote_prefix
                .clone()
                .unwrap_or_default()
                .replace("{gateway}", gateway);
            if remote_prefix.contains(['+', '#']) || local_prefix.contains(['+', '#']) {
                return Err(self.error(
                    &at("remote-prefix"),
                    "prefixes cannot contain wildcards".into(),
                    "e.g. \"site/{gateway}/\"",
                ));
            }
            if !r.filter.starts_with(&local_prefix) {
                return Err(self.error(
                    &at("local-prefix"),
                    format!("`{local_prefix}` is not the start of the filter `{}`", r.filter),
                    "the local prefix is stripped from topics the filter matches, so it must begin the filter",
                ));
            }
            out.push(OutRule {
                filter: r.filter.clone(),
                local_prefix,
                remote_prefix,
                qos: self.rule_qos(r.qos, &at("qos"))?,
                backlog: r.backlog.unwrap_or_default(),
            });
        }
        let mut inbound = Vec::new();
        for (i, r) in raw.inbound.iter().enumerate() {
            let at = |k: &'static str| [Key("upstream"), Key("in"), Index(i), Key(k)];
            let filter = r.filter.replace("{gateway}", gateway);
            if topic::validate_filter(&filter).is_err() {
                return Err(self.error(
                    &at("filter"),
                    format!("`{filter}` is not a topic filter"),
                    "e.g. \"cmd/{gateway}/#\"",
                ));
            }
            let remote_prefix = r
                .remote_prefix
                .clone()
                .unwrap_or_default()
                .replace("{gateway}", gateway);
            if !filter.starts_with(&remote_prefix) {
                return Err(self.error(
                    &at("remote-prefix"),
                    format!("`{remote_prefix}` is not the start of `{filter}`"),
                    "",
                ));
            }
            inbound.push(InRule {
                filter,
                remote_prefix,
                local_prefix: r
                    .local_prefix
                    .clone()
                    .unwrap_or_default()
                    .replace("{gateway}", gateway),
                qos: self.rule_qos(r.qos, &at("qos"))?,
            });
        }
        Ok(UpstreamConfig {
            url: raw.url.clone(),
            endpoint,
            client_id,
            username: raw.username.clone(),
            password,
            ca_file: raw.ca_file.clone(),
            client_cert,
            keep_alive,
            persistent_session: raw.persistent_session.unwrap_or(true),
            inflight,
            reconnect_min,
            reconnect_max: reconnect_max.max(reconnect_min),
            drain_rate: raw.drain_rate.filter(|&r| r > 0),
            status_topic,
            out,
            inbound,
        })
    }

    pub(super) fn outbox(&self, raw: &RawOutbox) -> Result<OutboxSettings, ConfigError> {
        let at = |k: &'static str| [Key("outbox"), Key(k)];
        let mut config = crate::outbox::OutboxConfig::default();
        if let Some(t) = &raw.max_bytes {
            config.max_bytes = parse_size(t).filter(|&n| n >= 64 * 1024).ok_or_else(|| {
                self.error(
                    &at("max-bytes"),
                    format!("`{t}` is not a size of at least 64KiB"),
                    "e.g. \"64MiB\" or \"2GiB\"",
                )
            })?;
        }
        if let Some(t) = &raw.max_age {
            config.max_age = Some(self.duration_or(Some(t), Duration::ZERO, &at("max-age"))?);
        }
        if let Some(t) = &raw.commit_delay {
            config.commit_delay = self.duration_or(Some(t), Duration::ZERO, &at("commit-delay"))?;
            if config.commit_delay > Duration::from_secs(10) {
                return Err(self.error(
                    &at("commit-delay"),
                    "at most 10s".into(),
                    "acknowledgements wait this long",
                ));
            }
        }
        config.when_full = match raw.when_full.unwrap_or(WhenFull::DropOldest) {
            WhenFull::DropOldest => FullPolicy::DropOldest,
            WhenFull::DropNewest => FullPolicy::DropNewest,
            WhenFull::Block => FullPolicy::Block,
        };
        Ok(OutboxSettings {
            config,
            store_qos0: raw.store_qos0.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_with_default_ports() {
        assert_eq!(
            endpoint("mqtt://h"),
            Some(Endpoint {
                host: "h".into(),
                port: 1883,
                tls: false
            })
        );
        assert_eq!(
            endpoint("mqtts://h.example:8884"),
            Some(Endpoint {
                host: "h.example".into(),
                port: 8884,
                tls: true
            })
        );
        assert_eq!(
            endpoint("mqtt://[::1]:1884"),
            Some(Endpoint {
                host: "::1".into(),
                port: 1884,
                tls: false
            })
        );
        assert_eq!(endpoint("http://h"), None);
        assert_eq!(endpoint("mqtt://h:port"), None);
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_size("64MiB"), Some(64 * 1024 * 1024));
        assert_eq!(parse_size("500 KB"), Some(500_000));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("lots"), None);
    }
}
