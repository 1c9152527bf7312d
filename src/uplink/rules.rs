//! Forwarding rules: which local messages go upstream under which topic, and back.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::UplinkStats;
use crate::broker::codec::QoS;
use crate::broker::topic;
use crate::config::{Backlog, InRule, OutRule};
use crate::outbox::{AppendError, Outbox, Qos, Record};

/// What the router needs to forward: the out-rules and the outbox.
pub struct Forward {
    pub out: Vec<OutRule>,
    pub inbound: Vec<InRule>,
    pub outbox: Outbox,
    pub store_qos0: bool,
    pub live: mpsc::Sender<Record>,
    pub stats: Arc<UplinkStats>,
}

impl Forward {
    /// The outbox record for a local message, if an out-rule selects it (the first one that
    /// matches). Upstream QoS is the lower of the message's and the rule's.
    pub fn record_for(
        &self,
        topic_name: &str,
        payload: &Bytes,
        qos: QoS,
        retain: bool,
    ) -> Option<Record> {
        let rule = self
            .out
            .iter()
            .find(|r| topic::matches(&r.filter, topic_name))?;
        let rest = topic_name
            .strip_prefix(rule.local_prefix.as_str())
            .unwrap_or(topic_name);
        let upstream = format!("{}{rest}", rule.remote_prefix);
        let qos = match qos.min(rule.qos) {
            QoS::AtMostOnce => Qos::AtMostOnce,
            QoS::AtLeastOnce => Qos::AtLeastOnce,
            QoS::ExactlyOnce => Qos::ExactlyOnce,
        };
        Some(Record {
            topic: upstream,
            payload: payload.clone(),
            qos,
            retain,
            timestamp_ms: crate::ingest::now_ms(),
        })
    }

    /// The backlog mode of the out-rule an upstream topic came from.
    pub fn backlog_of(&self, upstream_topic: &str) -> Backlog {
        self.out
            .iter()
            .find(|r| {
                upstream_topic
                    .strip_prefix(r.remote_prefix.as_str())
                    .is_some_and(|rest| {
                        let local = format!("{}{rest}", r.local_prefix);
                        topic::matches(&r.filter, &local)
                    })
            })
            .map(|r| r.backlog)
            .unwrap_or_default()
    }

    /// Where a message from upstream goes locally, if an in-rule selects it.
    pub fn local_topic(&self, upstream_topic: &str) -> Option<String> {
        let rule = self
            .inbound
            .iter()
            .find(|r| topic::matches(&r.filter, upstream_topic))?;
        let rest = upstream_topic
            .strip_prefix(rule.remote_prefix.as_str())
            .unwrap_or(upstream_topic);
        let local = format!("{}{rest}", rule.local_prefix);
        topic::validate_topic(&local).then_some(local)
    }

    /// Filters to subscribe to upstream.
    pub fn inbound_filters(&self) -> Vec<(String, QoS)> {
        self.inbound
            .iter()
            .map(|r| (r.filter.clone(), r.qos))
            .collect()
    }

    /// A QoS 0 message that is not stored: sent if the link has room, else dropped and counted.
    pub fn send_live(&self, record: Record) {
        if !self.stats.connected.load(Relaxed) || self.live.try_send(record).is_err() {
            self.stats.live_dropped.fetch_add(1, Relaxed);
        }
    }

    /// See [`super::settle`].
    pub fn settle(&self, result: Result<u64, AppendError>) -> bool {
        super::settle(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(out: Vec<OutRule>, inbound: Vec<InRule>) -> (Forward, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = Outbox::open(dir.path(), Default::default()).unwrap();
        let (live, _rx) = mpsc::channel(1);
        (
            Forward {
                out,
                inbound,
                outbox,
                store_qos0: true,
                live,
                stats: Default::default(),
            },
            dir,
        )
    }

    fn rule(filter: &str, local: &str, remote: &str, qos: QoS, backlog: Backlog) -> OutRule {
        OutRule {
            filter: filter.into(),
            local_prefix: local.into(),
            remote_prefix: remote.into(),
            qos,
            backlog,
        }
    }

    #[test]
    fn the_prefix_is_rewritten_and_qos_is_the_lower() {
        let (f, _d) = forward(
            vec![rule(
                "sensors/#",
                "",
                "site/gw1/",
                QoS::AtLeastOnce,
                Backlog::All,
            )],
            vec![],
        );
        let r = f
            .record_for(
                "sensors/room/1/temp",
                &Bytes::from_static(b"21.5"),
                QoS::ExactlyOnce,
                true,
            )
            .unwrap();
        assert_eq!(r.topic, "site/gw1/sensors/room/1/temp");
        assert_eq!(r.qos, Qos::AtLeastOnce);
        assert!(r.retain);
        assert!(
            f.record_for("other/x", &Bytes::new(), QoS::AtLeastOnce, false)
                .is_none()
        );
        assert!(
            f.record_for("$SYS/broker/uptime", &Bytes::new(), QoS::AtMostOnce, false)
                .is_none()
        );
    }

    #[test]
    fn a_local_prefix_is_stripped_first() {
        let (f, _d) = forward(
            vec![rule(
                "gw/out/#",
                "gw/out/",
                "up/",
                QoS::ExactlyOnce,
                Backlog::Latest,
            )],
            vec![],
        );
        let r = f
            .record_for("gw/out/a/b", &Bytes::new(), QoS::ExactlyOnce, false)
            .unwrap();
        assert_eq!(r.topic, "up/a/b");
        assert_eq!(f.backlog_of("up/a/b"), Backlog::Latest);
        assert_eq!(f.backlog_of("elsewhere/a"), Backlog::All);
    }

    #[test]
    fn inbound_topics_are_mapped_back() {
        let inbound = vec![InRule {
            filter: "cmd/gw1/#".into(),
            remote_prefix: "cmd/gw1/".into(),
            local_prefix: "sensorgate/gw1/".into(),
            qos: QoS::AtLeastOnce,
        }];
        let (f, _d) = forward(vec![], inbound);
        assert_eq!(
            f.local_topic("cmd/gw1/nodes/3/set/reboot").as_deref(),
            Some("sensorgate/gw1/nodes/3/set/reboot")
        );
        assert_eq!(f.local_topic("cmd/gw2/x"), None);
    }
}
