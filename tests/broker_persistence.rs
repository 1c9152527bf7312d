//! Broker state across `shutdown()` + `start()` on the same data directory, and damaged
//! snapshots.

mod common;

use common::wire;
use common::*;

const SNAPSHOT: &str = "broker.snapshot";

#[tokio::test]
async fn retained_messages_survive_a_restart() {
    let mut b = TestBroker::start().await;
    mosquitto_pub(b.addr, &["-t", "p/ret", "-m", "durable", "-r", "-q", "1"]).await;
    mosquitto_pub(b.addr, &["-t", "p/gone", "-m", "x", "-r"]).await;
    mosquitto_pub(b.addr, &["-t", "p/gone", "-r", "-n"]).await;
    b.restart().await;

    raw_publish(b.addr, "marker", b"m", 0, true).await;
    let (mut c, _) = Raw::connect(b.addr, "after-restart", true).await;
    c.subscribe(1, &[("p/#", 1)]).await;
    c.subscribe(2, &[("marker", 0)]).await;
    let got = c.publishes_until("marker").await;
    assert_eq!(got.len(), 1, "the kept one, not the cleared one: {got:?}");
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_slice()),
        ("p/ret", &b"durable"[..])
    );
    assert!(got[0].retain);
    assert_eq!(got[0].qos, 1);
}

#[tokio::test]
async fn persistent_session_subscriptions_survive_a_restart() {
    let mut b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "durable-sub", false).await;
    assert_eq!(c.subscribe(1, &[("p/s/+", 2)]).await, vec![2]);
    c.disconnect().await;
    b.restart().await;

    let (mut c, sp) = Raw::connect(b.addr, "durable-sub", false).await;
    assert!(sp, "the session is still present after a restart");
    raw_publish(b.addr, "p/s/x", b"after restart", 2, false).await;
    let m = c.recv_publish().await;
    assert_eq!((m.payload.as_slice(), m.qos), (&b"after restart"[..], 2));
}

#[tokio::test]
async fn queued_qos1_and_qos2_messages_survive_a_restart() {
    let mut b = TestBroker::start().await;
    let mut opts = rumq_options(b.addr, "offline-rq");
    opts.set_clean_session(false);
    let mut rq = Rumq::connect_with(opts).await;
    rq.subscribe("p/q/#", QoS::ExactlyOnce).await;
    rq.client.disconnect().await.unwrap();
    rq.wait_for_error().await;
    drop(rq);

    raw_publish(b.addr, "p/q/1", b"one", 1, false).await;
    raw_publish(b.addr, "p/q/2", b"two", 2, false).await;
    raw_publish(b.addr, "p/q/0", b"zero", 0, false).await;
    b.restart().await;

    let (mut c, sp) = Raw::connect(b.addr, "offline-rq", false).await;
    assert!(sp);
    c.subscribe(1, &[("marker", 0)]).await;
    raw_publish(b.addr, "marker", b"", 0, false).await;
    let got: Vec<(String, u8)> = c
        .publishes_until("marker")
        .await
        .into_iter()
        .map(|m| (m.topic, m.qos))
        .collect();
    // QoS 0 messages for an offline client may be dropped [MQTT-3.1.2-5 lists QoS 0 as "optionally"].
    let durable: Vec<(String, u8)> = got.into_iter().filter(|(_, q)| *q > 0).collect();
    assert_eq!(
        durable,
        [("p/q/1".to_string(), 1), ("p/q/2".to_string(), 2)]
    );
}

#[tokio::test]
async fn inflight_qos1_message_is_redelivered_with_dup_after_a_restart() {
    let mut b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "inflight-restart", false).await;
    c.subscribe(1, &[("p/i", 1)]).await;
    raw_publish(b.addr, "p/i", b"unacked", 1, false).await;
    let first = c.recv_publish().await;
    drop(c);
    b.restart().await;

    let (mut c, sp) = Raw::connect(b.addr, "inflight-restart", false).await;
    assert!(sp);
    let again = c.recv_publish().await;
    assert_eq!(again.payload, b"unacked");
    assert!(again.dup, "a re-delivery has DUP 1 [MQTT-3.3.1-1]");
    assert_eq!(again.pid, first.pid, "original packet id [MQTT-4.4.0-1]");
    c.send(&wire::ack(wire::PUBACK, again.pid)).await;
    assert!(c.ping_barrier().await.is_empty());
}

#[tokio::test]
async fn inflight_qos2_pubrel_is_resent_after_a_restart() {
    let mut b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "pubrel-restart", false).await;
    c.subscribe(1, &[("p/r", 2)]).await;
    raw_publish(b.addr, "p/r", b"released", 2, false).await;
    let m = c.recv_publish().await;
    c.send(&wire::ack(wire::PUBREC, m.pid)).await;
    assert_eq!(c.recv_kind(wire::PUBREL).await.pid(), m.pid);
    drop(c); // no PUBCOMP
    b.restart().await;

    let (mut c, _) = Raw::connect(b.addr, "pubrel-restart", false).await;
    let p = c.recv().await;
    assert_eq!(
        p.kind(),
        wire::PUBREL,
        "only the PUBREL, not the message again: {p:?}"
    );
    assert_eq!(p.pid(), m.pid);
    c.send(&wire::ack(wire::PUBCOMP, m.pid)).await;
    assert!(c.ping_barrier().await.is_empty());
}

/// Invariant 3, inbound: a PUBLISH answered with PUBREC before the restart and resent after
/// it (DUP 1, same id) is recognised and delivered only once.
#[tokio::test]
async fn qos2_inbound_packet_id_survives_a_restart_so_a_resend_is_delivered_once() {
    let mut b = TestBroker::start().await;
    let (mut sub, _) = Raw::connect(b.addr, "once-sub", false).await;
    sub.subscribe(1, &[("p/once", 1), ("marker", 1)]).await;
    let (mut publ, _) = Raw::connect(b.addr, "once-pub", false).await;
    publ.publish("p/once", b"exactly once", 2, false, 31).await;
    assert_eq!(publ.recv_kind(wire::PUBREC).await.pid(), 31);
    // Deliveries before the restart (if the broker forwards on PUBLISH) are counted too.
    let before = sub.ping_barrier().await;
    let mut copies = 0;
    for p in before {
        let m = p.publish();
        sub.ack_publish(&m).await;
        copies += usize::from(m.payload == b"exactly once");
    }
    sub.ping_barrier().await;
    drop(publ);
    drop(sub);
    b.restart().await;

    let (mut sub, _) = Raw::connect(b.addr, "once-sub", false).await;
    let (mut publ, sp) = Raw::connect(b.addr, "once-pub", false).await;
    assert!(sp);
    publ.send(&wire::publish_raw(
        b"p/once",
        b"exactly once",
        2,
        false,
        true,
        31,
    ))
    .await;
    assert_eq!(publ.recv_kind(wire::PUBREC).await.pid(), 31);
    publ.send(&wire::ack(wire::PUBREL, 31)).await;
    assert_eq!(publ.recv_kind(wire::PUBCOMP).await.pid(), 31);
    publ.publish_acked("marker", b"", 1, 32).await;
    copies += sub
        .publishes_until("marker")
        .await
        .iter()
        .filter(|m| m.payload == b"exactly once")
        .count();
    assert_eq!(copies, 1, "delivered exactly once across the restart");
}

#[tokio::test]
async fn clean_sessions_are_not_restored_after_a_restart() {
    let mut b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "not-durable", true).await;
    c.subscribe(1, &[("p/c", 1)]).await;
    c.disconnect().await;
    b.restart().await;
    let (_c, sp) = Raw::connect(b.addr, "not-durable", false).await;
    assert!(!sp);
}

#[tokio::test]
async fn corrupt_snapshot_is_set_aside_and_the_broker_starts() {
    if against_mosquitto() {
        return; // the snapshot format is sensorgate's own
    }
    let mut b = TestBroker::start().await;
    b.stop().await;
    let garbage = b"this is not a snapshot \x00\xff\xfe\x01 at all".repeat(10);
    std::fs::write(b.data_dir().join(SNAPSHOT), &garbage).unwrap();
    b.start_again().await;

    let mut sub = MosqSub::spawn(b.addr, &["-t", "works"]).await;
    mosquitto_pub(b.addr, &["-t", "works", "-m", "yes"]).await;
    assert_eq!(sub.next().await.payload, "yes");
    assert_set_aside(b.data_dir(), &garbage);
}

#[tokio::test]
async fn truncated_snapshot_is_set_aside_and_the_broker_starts() {
    if against_mosquitto() {
        return;
    }
    let mut b = TestBroker::start().await;
    for i in 0..20 {
        let t = format!("p/t/{i}");
        let payload = format!("retained value number {i} with some length to it");
        mosquitto_pub(b.addr, &["-t", &t, "-m", &payload, "-r"]).await;
    }
    let (c, _) = Raw::connect(b.addr, "in-snapshot", false).await;
    c.disconnect().await;
    b.stop().await;
    let path = b.data_dir().join(SNAPSHOT);
    let full = std::fs::read(&path).expect("a snapshot is written at shutdown");
    assert!(full.len() > 16, "snapshot of {} bytes", full.len());
    let truncated = full[..full.len() / 2].to_vec();
    std::fs::write(&path, &truncated).unwrap();
    b.start_again().await;

    let (mut c, _) = Raw::connect(b.addr, "fresh", true).await;
    c.subscribe(1, &[("x", 0)]).await;
    raw_publish(b.addr, "x", b"alive", 0, false).await;
    assert_eq!(c.recv_publish().await.payload, b"alive");
    assert_set_aside(b.data_dir(), &truncated);
}

/// The damaged bytes are kept in another file of the data directory, for a post-mortem.
fn assert_set_aside(dir: &std::path::Path, damaged: &[u8]) {
    let entries = dir_entries(dir);
    let kept = entries.iter().any(|p| {
        p.file_name().is_some_and(|n| n != SNAPSHOT)
            && std::fs::read(p).ok().as_deref() == Some(damaged)
    });
    assert!(
        kept,
        "the damaged snapshot was not set aside; data dir holds {entries:?}"
    );
    if let Ok(now) = std::fs::read(dir.join(SNAPSHOT)) {
        assert_ne!(now, damaged, "the damaged snapshot is still in place");
    }
}

#[tokio::test]
async fn persistence_false_keeps_nothing_across_a_restart() {
    let mut b = TestBroker::with("persistence = false").await;
    mosquitto_pub(b.addr, &["-t", "np/ret", "-m", "ephemeral", "-r"]).await;
    b.restart().await;
    raw_publish(b.addr, "marker", b"m", 0, true).await;
    let (mut c, _) = Raw::connect(b.addr, "np", true).await;
    c.subscribe(1, &[("np/#", 0)]).await;
    c.subscribe(2, &[("marker", 0)]).await;
    assert!(c.publishes_until("marker").await.is_empty());
}
