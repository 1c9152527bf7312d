//! CONNECT, CONNACK, sessions, keep-alive, wills and MQTT 3.1 clients.

mod common;

use common::wire::{self, Connect};
use common::*;

#[tokio::test]
async fn mqtt_3_1_0_1_first_packet_must_be_connect() {
    let b = TestBroker::start().await;
    let mut c = Raw::tcp(b.addr).await;
    c.send(&wire::pingreq()).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_0_2_a_second_connect_closes_the_connection() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "twice", true).await;
    let again = Connect {
        client_id: "twice",
        ..Default::default()
    };
    c.send(&again.encode()).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_2_2_protocol_level_5_gets_connack_0x01() {
    let b = TestBroker::start().await;
    let c = Connect {
        level: 5,
        client_id: "v5",
        ..Default::default()
    };
    let (mut raw, (sp, code)) = Raw::connect_with(b.addr, &c).await;
    assert_eq!(code, 0x01, "unacceptable protocol level");
    assert!(
        !sp,
        "session present must be 0 with a non-zero code [MQTT-3.2.2-4]"
    );
    raw.expect_closed().await; // [MQTT-3.2.2-5]
}

#[tokio::test]
async fn mqtt_3_1_2_2_protocol_level_2_gets_connack_0x01() {
    let b = TestBroker::start().await;
    let c = Connect {
        level: 2,
        client_id: "v2",
        ..Default::default()
    };
    let (mut raw, (_, code)) = Raw::connect_with(b.addr, &c).await;
    assert_eq!(code, 0x01);
    raw.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_2_1_wrong_protocol_name_is_not_accepted() {
    let b = TestBroker::start().await;
    let c = Connect {
        protocol_name: "MQTX",
        client_id: "badname",
        ..Default::default()
    };
    let mut raw = Raw::tcp(b.addr).await;
    raw.send(&c.encode()).await;
    // The server MAY disconnect without CONNACK; if it answers, it must not accept.
    for p in raw.expect_closed_after().await {
        assert!(
            p.kind() == wire::CONNACK && p.body[1] != 0,
            "only a refusing CONNACK may come before the close: {p:?}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_1_2_3_reserved_connect_flag_closes_the_connection() {
    let b = TestBroker::start().await;
    let c = Connect {
        client_id: "reserved",
        reserved_flag: true,
        ..Default::default()
    };
    let mut raw = Raw::tcp(b.addr).await;
    raw.send(&c.encode()).await;
    raw.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_2_22_password_without_username_closes_the_connection() {
    let b = TestBroker::start().await;
    let c = Connect {
        client_id: "pwonly",
        password: Some(b"secret"),
        ..Default::default()
    };
    let mut raw = Raw::tcp(b.addr).await;
    raw.send(&c.encode()).await;
    for p in raw.expect_closed_after().await {
        assert!(
            p.kind() == wire::CONNACK && p.body[1] != 0,
            "the CONNECT must not be accepted: {p:?}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_1_3_8_empty_client_id_with_clean_session_0_gets_connack_0x02() {
    let b = TestBroker::start().await;
    let c = Connect {
        client_id: "",
        clean_session: false,
        ..Default::default()
    };
    let (mut raw, (sp, code)) = Raw::connect_with(b.addr, &c).await;
    assert_eq!(code, 0x02, "identifier rejected [MQTT-3.1.3-8]");
    assert!(!sp);
    raw.expect_closed().await; // [MQTT-3.1.3-9]
}

#[tokio::test]
async fn mqtt_3_1_3_6_empty_client_id_with_clean_session_1_is_assigned_one() {
    let b = TestBroker::start().await;
    let (mut a, sp) = Raw::connect(b.addr, "", true).await;
    assert!(!sp);
    let (mut other, _) = Raw::connect(b.addr, "", true).await;
    // Two anonymous clients get distinct identifiers: neither takes the other over.
    assert_eq!(a.subscribe(1, &[("anon/t", 0)]).await, vec![0]);
    assert_eq!(other.subscribe(1, &[("anon/t", 0)]).await, vec![0]);
    raw_publish(b.addr, "anon/t", b"hi", 0, false).await;
    assert_eq!(a.recv_publish().await.payload, b"hi");
    assert_eq!(other.recv_publish().await.payload, b"hi");
}

#[tokio::test]
async fn mqtt_3_1_3_5_client_ids_of_any_allowed_characters_and_length_are_accepted() {
    let b = TestBroker::start().await;
    // 3.1.1 servers MAY accept more than 23 bytes; this broker promises to.
    let long = "a-client-id-longer-than-23-bytes-0123456789";
    let (_c, sp) = Raw::connect(b.addr, long, true).await;
    assert!(!sp);
}

#[tokio::test]
async fn mqtt_3_2_2_1_clean_session_1_connack_has_session_present_0() {
    let b = TestBroker::start().await;
    let (c, sp) = Raw::connect(b.addr, "clean1", false).await;
    assert!(!sp, "no session existed yet [MQTT-3.2.2-3]");
    c.disconnect().await;
    let (_c, sp) = Raw::connect(b.addr, "clean1", true).await;
    assert!(
        !sp,
        "clean session 1 always gets session present 0 [MQTT-3.2.2-1]"
    );
}

#[tokio::test]
async fn mqtt_3_2_2_2_persistent_session_is_resumed_with_its_subscriptions() {
    let b = TestBroker::start().await;
    let (mut c, sp) = Raw::connect(b.addr, "keeper", false).await;
    assert!(!sp);
    assert_eq!(c.subscribe(1, &[("keep/t", 1)]).await, vec![1]);
    c.disconnect().await;

    let (mut c, sp) = Raw::connect(b.addr, "keeper", false).await;
    assert!(sp, "session present 1 on resume [MQTT-3.2.2-2]");
    raw_publish(b.addr, "keep/t", b"still subscribed", 1, false).await;
    let m = c.recv_publish().await;
    assert_eq!(m.payload, b"still subscribed");
    assert_eq!(m.qos, 1);
}

#[tokio::test]
async fn mqtt_3_1_2_6_clean_session_1_discards_the_previous_session() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "forget", false).await;
    c.subscribe(1, &[("old/t", 1)]).await;
    c.disconnect().await;

    let (mut c, sp) = Raw::connect(b.addr, "forget", true).await;
    assert!(!sp);
    c.subscribe(2, &[("marker", 0)]).await;
    raw_publish(b.addr, "old/t", b"stale", 1, false).await;
    raw_publish(b.addr, "marker", b"m", 0, false).await;
    let before = c.publishes_until("marker").await;
    assert!(before.is_empty(), "old subscription survived: {before:?}");
}

#[tokio::test]
async fn mqtt_3_1_2_4_clean_session_0_session_survives_a_clean_session_1_only_when_asked() {
    // After a clean-session-1 connection ends, its state is gone: reconnecting with
    // clean session 0 must start a new session [MQTT-3.1.2-6].
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "ephemeral", true).await;
    c.subscribe(1, &[("e/t", 0)]).await;
    c.disconnect().await;
    let (_c, sp) = Raw::connect(b.addr, "ephemeral", false).await;
    assert!(!sp);
}

#[tokio::test]
async fn mqtt_3_1_4_2_session_takeover_disconnects_the_first() {
    let b = TestBroker::start().await;
    let (mut first, _) = Raw::connect(b.addr, "same-id", true).await;
    let (mut second, _) = Raw::connect(b.addr, "same-id", true).await;
    first.expect_closed().await;
    assert_eq!(second.subscribe(1, &[("take/t", 0)]).await, vec![0]);
    raw_publish(b.addr, "take/t", b"to the new one", 0, false).await;
    assert_eq!(second.recv_publish().await.payload, b"to the new one");
}

#[tokio::test]
async fn mqtt_3_1_4_2_takeover_by_rumqttc_keeps_the_persistent_session() {
    let b = TestBroker::start().await;
    let (mut first, _) = Raw::connect(b.addr, "shared-id", false).await;
    first.subscribe(1, &[("shared/t", 1)]).await;
    let mut opts = rumq_options(b.addr, "shared-id");
    opts.set_clean_session(false);
    let mut second = Rumq::connect_with(opts).await;
    first.expect_closed().await;
    raw_publish(b.addr, "shared/t", b"x", 1, false).await;
    let m = second.next_publish().await;
    assert_eq!(m.payload.as_ref(), b"x");
}

#[tokio::test]
async fn mqtt_3_12_4_1_pingreq_gets_pingresp() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "pinger", true).await;
    c.send(&wire::pingreq()).await;
    c.recv_kind(wire::PINGRESP).await;
}

#[tokio::test]
async fn mqtt_3_1_2_24_keepalive_disconnect_publishes_the_will() {
    let b = TestBroker::start().await;
    let mut watcher = MosqSub::spawn(b.addr, &["-t", "wills/#", "-q", "1"]).await;
    let c = Connect {
        client_id: "sleepy",
        keep_alive: 1,
        will: Some(("wills/sleepy", b"gone quiet", 1, false)),
        ..Default::default()
    };
    let (mut raw, (_, code)) = Raw::connect_with(b.addr, &c).await;
    assert_eq!(code, 0);
    // Send nothing: after 1.5 x 1 s the broker must drop us and publish the will.
    let will = watcher.next().await;
    assert_eq!(will.topic, "wills/sleepy");
    assert_eq!(will.payload, "gone quiet");
    raw.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_1_2_23_a_client_that_pings_within_keepalive_stays_connected() {
    let b = TestBroker::start().await;
    let c = Connect {
        client_id: "awake",
        keep_alive: 1,
        ..Default::default()
    };
    let (mut raw, _) = Raw::connect_with(b.addr, &c).await;
    // A client's own keep-alive timer: ping every 500 ms for 3 s (twice the 1.5 s limit).
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    for _ in 0..6 {
        tick.tick().await;
        raw.send(&wire::pingreq()).await;
        raw.recv_kind(wire::PINGRESP).await;
    }
}

#[tokio::test]
async fn mqtt_3_1_2_8_will_published_on_abnormal_disconnect_with_its_qos_and_retain() {
    let b = TestBroker::start().await;
    let (mut watcher, _) = Raw::connect(b.addr, "watcher", true).await;
    watcher.subscribe(1, &[("status/+", 2)]).await;
    let c = Connect {
        client_id: "dies",
        will: Some(("status/dies", b"offline", 1, true)),
        ..Default::default()
    };
    let (raw, (_, code)) = Raw::connect_with(b.addr, &c).await;
    assert_eq!(code, 0);
    drop(raw); // TCP close without DISCONNECT

    let m = watcher.recv_publish().await;
    assert_eq!(m.topic, "status/dies");
    assert_eq!(m.payload, b"offline");
    assert_eq!(
        m.qos, 1,
        "the will keeps its QoS (min with the subscription)"
    );
    assert!(
        !m.retain,
        "to an existing subscriber RETAIN is 0 [MQTT-3.3.1-9]"
    );
    watcher.ack_publish(&m).await;

    // Will retain = 1: a later subscriber gets it as a retained message [MQTT-3.1.2-17].
    let mut late = MosqSub::spawn(b.addr, &["-t", "status/dies", "-q", "1"]).await;
    let r = late.next().await;
    assert_eq!(r.payload, "offline");
    assert!(r.retain);
    assert_eq!(r.qos, 1);
}

#[tokio::test]
async fn mqtt_3_1_2_10_will_not_published_after_disconnect() {
    let b = TestBroker::start().await;
    let mut watcher = Rumq::connect(b.addr, "will-watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    watcher.subscribe("marker", QoS::AtLeastOnce).await;
    let c = Connect {
        client_id: "polite",
        will: Some(("wills/polite", b"should not appear", 1, false)),
        ..Default::default()
    };
    let (raw, _) = Raw::connect_with(b.addr, &c).await;
    raw.disconnect().await;
    // Barrier: the same client id connects again (so the broker is done with the first
    // connection) and publishes a marker; nothing may arrive before it.
    let (mut again, _) = Raw::connect(b.addr, "polite", true).await;
    again.publish_acked("marker", b"m", 1, 1).await;
    let before = watcher.publishes_until("marker").await;
    assert!(
        before.is_empty(),
        "will published after DISCONNECT: {before:?}"
    );
}

#[tokio::test]
async fn mqtt_3_1_2_8_rumqttc_last_will_is_published_when_the_connection_drops() {
    let b = TestBroker::start().await;
    let mut watcher = MosqSub::spawn(b.addr, &["-t", "lw/#"]).await;
    let mut opts = rumq_options(b.addr, "rq-will");
    opts.set_last_will(rumqttc::LastWill::new(
        "lw/rq",
        "bye",
        QoS::AtMostOnce,
        false,
    ));
    let client = Rumq::connect_with(opts).await;
    drop(client); // aborts the event loop task, dropping the socket
    let m = watcher.next().await;
    assert_eq!((m.topic.as_str(), m.payload.as_str()), ("lw/rq", "bye"));
}

#[tokio::test]
async fn mqtt_3_1_mqisdp_level_3_client_is_accepted() {
    let b = TestBroker::start().await;
    let c = Connect {
        protocol_name: "MQIsdp",
        level: 3,
        client_id: "old-client",
        ..Default::default()
    };
    let (mut raw, (sp, code)) = Raw::connect_with(b.addr, &c).await;
    assert_eq!(code, 0);
    assert!(!sp);
    assert_eq!(raw.subscribe(1, &[("v31/t", 1)]).await, vec![1]);
    raw_publish(b.addr, "v31/t", b"hello 3.1", 1, false).await;
    let m = raw.recv_publish().await;
    assert_eq!(m.payload, b"hello 3.1");
}

#[tokio::test]
async fn mqtt_3_1_mosquitto_clients_speaking_mqttv31_exchange_messages() {
    let b = TestBroker::start().await;
    let mut sub = MosqSub::spawn(b.addr, &["-V", "mqttv31", "-t", "v31/#", "-q", "2"]).await;
    mosquitto_pub(
        b.addr,
        &["-V", "mqttv31", "-t", "v31/a", "-m", "from 3.1", "-q", "2"],
    )
    .await;
    let m = sub.next().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_str(), m.qos),
        ("v31/a", "from 3.1", 2)
    );
}

#[tokio::test]
async fn mqtt_3_1_and_3_1_1_clients_interoperate() {
    let b = TestBroker::start().await;
    let mut sub = MosqSub::spawn(b.addr, &["-V", "mqttv311", "-t", "mix", "-q", "1"]).await;
    mosquitto_pub(
        b.addr,
        &["-V", "mqttv31", "-t", "mix", "-m", "a", "-q", "1"],
    )
    .await;
    assert_eq!(sub.next().await.payload, "a");
}
