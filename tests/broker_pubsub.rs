//! PUBLISH, SUBSCRIBE, UNSUBSCRIBE, topic matching and the QoS 1 and 2 flows.

mod common;

use common::wire;
use common::*;

/// Every one of the 14 packet types, in one session: CONNECT, CONNACK, SUBSCRIBE, SUBACK,
/// PUBLISH (all QoS), PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBSCRIBE, UNSUBACK, PINGREQ,
/// PINGRESP, DISCONNECT.
#[tokio::test]
async fn mqtt_2_2_1_all_fourteen_packet_types_round_trip() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "all-types", true).await; // CONNECT, CONNACK
    assert_eq!(c.subscribe(10, &[("loop/#", 2)]).await, vec![2]); // SUBSCRIBE, SUBACK

    c.publish_acked("loop/q0", b"zero", 0, 0).await;
    let m = c.recv_publish().await;
    assert_eq!((m.qos, m.payload.as_slice()), (0, &b"zero"[..]));

    c.publish_acked("loop/q1", b"one", 1, 11).await; // PUBLISH, PUBACK (inbound)
    let m = c.recv_publish().await;
    assert_eq!((m.qos, m.payload.as_slice()), (1, &b"one"[..]));
    c.send(&wire::ack(wire::PUBACK, m.pid)).await; // PUBACK (outbound)

    c.publish_acked("loop/q2", b"two", 2, 12).await; // PUBREC, PUBREL, PUBCOMP (inbound)
    let m = c.recv_publish().await;
    assert_eq!((m.qos, m.payload.as_slice()), (2, &b"two"[..]));
    c.ack_publish(&m).await; // PUBREC, PUBREL, PUBCOMP (outbound)

    c.send(&wire::unsubscribe(13, &["loop/#"])).await; // UNSUBSCRIBE
    assert_eq!(c.recv_kind(wire::UNSUBACK).await.pid(), 13); // UNSUBACK
    assert!(c.ping_barrier().await.is_empty()); // PINGREQ, PINGRESP
    c.send(&wire::disconnect()).await; // DISCONNECT
    c.expect_closed().await; // [MQTT-3.14.4-1]: the server closes after DISCONNECT
}

#[tokio::test]
async fn mqtt_4_7_1_2_multi_level_wildcard_matches_parent_and_children() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "hash", true).await;
    c.subscribe(1, &[("sport/tennis/#", 0), ("marker", 0)])
        .await;
    for t in [
        "sport/tennis",
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport/tennisx",
        "sport",
        "other/tennis",
    ] {
        raw_publish(b.addr, t, t.as_bytes(), 0, false).await;
    }
    raw_publish(b.addr, "marker", b"", 0, false).await;
    let got: Vec<String> = c
        .publishes_until("marker")
        .await
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(
        got,
        [
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking"
        ]
    );
}

#[tokio::test]
async fn mqtt_4_7_1_3_single_level_wildcard_matches_one_level() {
    let b = TestBroker::start().await;
    let mut sub =
        MosqSub::spawn(b.addr, &["-t", "sensors/+/temp", "-t", "+", "-t", "marker"]).await;
    for t in [
        "sensors/kitchen/temp",
        "sensors/kitchen/hall/temp",
        "sensors//temp",
        "sensors/temp",
        "top",
        "/top",
    ] {
        mosquitto_pub(b.addr, &["-t", t, "-m", t]).await;
    }
    mosquitto_pub(b.addr, &["-t", "marker", "-m", "end"]).await;
    let got: Vec<String> = sub
        .until("marker")
        .await
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(got, ["sensors/kitchen/temp", "sensors//temp", "top"]);
}

#[tokio::test]
async fn mqtt_4_7_2_1_dollar_topics_are_not_matched_by_leading_wildcards() {
    let b = TestBroker::with("sys-interval = \"1s\"").await;
    let (mut all, _) = Raw::connect(b.addr, "hash-all", true).await;
    all.subscribe(1, &[("#", 0), ("+/broker/#", 0), ("+/+/uptime", 0)])
        .await;
    // Barrier: see $SYS published twice after the wildcard subscriber was in place.
    let mut sys = SysWatch::start(b.addr).await;
    sys.next_number("$SYS/broker/uptime").await;
    sys.next_number("$SYS/broker/uptime").await;
    raw_publish(b.addr, "marker", b"", 0, false).await;
    let before = all.publishes_until("marker").await;
    let dollar: Vec<&str> = before
        .iter()
        .map(|m| m.topic.as_str())
        .filter(|t| t.starts_with('$'))
        .collect();
    assert!(dollar.is_empty(), "wildcards matched $ topics: {dollar:?}");
}

#[tokio::test]
async fn mqtt_4_7_2_1_sys_topics_match_an_explicit_dollar_filter() {
    let b = TestBroker::with("sys-interval = \"1s\"").await;
    let mut rq = Rumq::connect(b.addr, "sys-reader").await;
    rq.subscribe("$SYS/+/uptime", QoS::AtMostOnce).await;
    let m = rq.next_publish().await;
    assert_eq!(m.topic, "$SYS/broker/uptime");
}

#[tokio::test]
async fn mqtt_3_3_5_1_overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "overlap", true).await;
    assert_eq!(
        c.subscribe(1, &[("o/+", 0), ("o/#", 1), ("o/x", 0), ("marker", 0)])
            .await,
        vec![0, 1, 0, 0]
    );
    raw_publish(b.addr, "o/x", b"once", 2, false).await;
    raw_publish(b.addr, "marker", b"", 0, false).await;
    let got = c.publishes_until("marker").await;
    assert_eq!(got.len(), 1, "delivered once: {got:?}");
    assert_eq!(got[0].qos, 1, "at the highest matching subscription QoS");
}

#[tokio::test]
async fn mqtt_3_9_3_granted_qos_is_the_requested_qos_up_to_the_maximum() {
    let b = TestBroker::start().await;
    let mut rq = Rumq::connect(b.addr, "granted").await;
    use rumqttc::SubscribeReasonCode::Success;
    assert_eq!(
        rq.subscribe("g/0", QoS::AtMostOnce).await,
        [Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        rq.subscribe("g/1", QoS::AtLeastOnce).await,
        [Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        rq.subscribe("g/2", QoS::ExactlyOnce).await,
        [Success(QoS::ExactlyOnce)]
    );
}

#[tokio::test]
async fn mqtt_3_8_3_4_subscribe_with_qos_3_closes_the_connection() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "qos3sub", true).await;
    c.send(&wire::subscribe(1, &[("a", 3)])).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn mqtt_3_3_5_1_delivered_qos_is_the_minimum_of_publish_and_subscription() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "minqos", true).await;
    c.subscribe(1, &[("q/0", 0), ("q/1", 1), ("q/2", 2), ("marker", 0)])
        .await;
    let mut expected = Vec::new();
    for sub in 0..=2u8 {
        for publ in 0..=2u8 {
            let topic = format!("q/{sub}");
            raw_publish(b.addr, &topic, &[publ], publ, false).await;
            expected.push((topic, publ, publ.min(sub)));
        }
    }
    raw_publish(b.addr, "marker", b"", 0, false).await;
    let got: Vec<(String, u8, u8)> = c
        .publishes_until("marker")
        .await
        .into_iter()
        .map(|m| (m.topic, m.payload[0], m.qos))
        .collect();
    assert_eq!(got, expected, "(topic, published QoS, delivered QoS)");
}

#[tokio::test]
async fn mqtt_4_7_1_invalid_topic_filters_get_suback_0x80() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "badfilters", true).await;
    let codes = c
        .subscribe(
            1,
            &[
                ("a/#/b", 0),
                ("ok/+", 1),
                ("a+", 0),
                ("", 0),
                ("a/b#", 1),
                ("ok/#", 2),
            ],
        )
        .await;
    assert_eq!(codes, vec![0x80, 1, 0x80, 0x80, 0x80, 2]);
    // The valid ones work.
    raw_publish(b.addr, "ok/x", b"fine", 1, false).await;
    assert_eq!(c.recv_publish().await.payload, b"fine");
}

#[tokio::test]
async fn mqtt_3_10_4_4_unsubscribe_stops_delivery_and_gets_unsuback() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "unsub", true).await;
    c.subscribe(1, &[("u/a", 1), ("u/b", 1), ("marker", 0)])
        .await;
    c.send(&wire::unsubscribe(77, &["u/a", "never/subscribed"]))
        .await;
    let ack = c.recv_kind(wire::UNSUBACK).await;
    assert_eq!(ack.pid(), 77, "[MQTT-3.11.2-1]");
    assert_eq!(ack.body.len(), 2);
    raw_publish(b.addr, "u/a", b"gone", 1, false).await;
    raw_publish(b.addr, "u/b", b"kept", 1, false).await;
    raw_publish(b.addr, "marker", b"", 0, false).await;
    let got: Vec<String> = c
        .publishes_until("marker")
        .await
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(got, ["u/b"]);
}

#[tokio::test]
async fn mqtt_3_8_4_3_resubscribing_replaces_the_subscription_qos() {
    let b = TestBroker::start().await;
    let mut rq = Rumq::connect(b.addr, "resub").await;
    rq.subscribe("r/t", QoS::AtMostOnce).await;
    rq.subscribe("r/t", QoS::AtLeastOnce).await;
    rq.subscribe("marker", QoS::AtMostOnce).await;
    raw_publish(b.addr, "r/t", b"x", 1, false).await;
    raw_publish(b.addr, "marker", b"", 0, false).await;
    let got = rq.publishes_until("marker").await;
    assert_eq!(got.len(), 1, "one subscription, one copy: {got:?}");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
}

#[tokio::test]
async fn mqtt_4_3_2_qos1_both_directions() {
    let b = TestBroker::start().await;
    let (mut sub, _) = Raw::connect(b.addr, "q1-sub", true).await;
    sub.subscribe(1, &[("q1/t", 1)]).await;
    let (mut publ, _) = Raw::connect(b.addr, "q1-pub", true).await;
    publ.publish("q1/t", b"at least once", 1, false, 4242).await;
    let ack = publ.recv_kind(wire::PUBACK).await;
    assert_eq!(
        ack.pid(),
        4242,
        "PUBACK carries the PUBLISH packet id [MQTT-4.3.2-2]"
    );

    let m = sub.recv_publish().await;
    assert_eq!(m.qos, 1);
    assert_ne!(
        m.pid, 0,
        "a QoS 1 PUBLISH has a non-zero packet id [MQTT-2.3.1-1]"
    );
    assert!(!m.dup, "first delivery has DUP 0 [MQTT-3.3.1-2]");
    sub.send(&wire::ack(wire::PUBACK, m.pid)).await;
    assert!(
        sub.ping_barrier().await.is_empty(),
        "no redelivery after PUBACK"
    );
}

#[tokio::test]
async fn mqtt_4_3_3_qos2_both_directions() {
    let b = TestBroker::start().await;
    let (mut sub, _) = Raw::connect(b.addr, "q2-sub", true).await;
    sub.subscribe(1, &[("q2/t", 2)]).await;
    let (mut publ, _) = Raw::connect(b.addr, "q2-pub", true).await;
    publ.publish("q2/t", b"exactly once", 2, false, 9).await;
    assert_eq!(publ.recv_kind(wire::PUBREC).await.pid(), 9);
    publ.send(&wire::ack(wire::PUBREL, 9)).await;
    assert_eq!(publ.recv_kind(wire::PUBCOMP).await.pid(), 9);

    let m = sub.recv_publish().await;
    assert_eq!((m.qos, m.payload.as_slice()), (2, &b"exactly once"[..]));
    sub.send(&wire::ack(wire::PUBREC, m.pid)).await;
    let rel = sub.recv_kind(wire::PUBREL).await;
    assert_eq!(rel.byte0, 0x62, "PUBREL fixed header [MQTT-3.6.1-1]");
    assert_eq!(rel.pid(), m.pid);
    sub.send(&wire::ack(wire::PUBCOMP, m.pid)).await;
    assert!(sub.ping_barrier().await.is_empty());
}

#[tokio::test]
async fn mqtt_4_3_3_2_qos2_publish_resent_with_dup_before_pubrel_is_delivered_once() {
    let b = TestBroker::start().await;
    // QoS 1 at the watcher: a duplicate would show as a second copy (mosquitto_sub prints
    // QoS 2 messages only after their PUBREL, which would reorder them behind the marker).
    let mut watcher = MosqSub::spawn(b.addr, &["-t", "x2/#", "-t", "marker", "-q", "1"]).await;
    let (mut publ, _) = Raw::connect(b.addr, "x2-pub", true).await;
    publ.publish("x2/t", b"only once", 2, false, 5).await;
    assert_eq!(publ.recv_kind(wire::PUBREC).await.pid(), 5);
    publ.send(&wire::publish_raw(b"x2/t", b"only once", 2, false, true, 5))
        .await;
    assert_eq!(publ.recv_kind(wire::PUBREC).await.pid(), 5);
    publ.send(&wire::ack(wire::PUBREL, 5)).await;
    assert_eq!(publ.recv_kind(wire::PUBCOMP).await.pid(), 5);
    // After PUBCOMP the id is free again: a new message with id 5 is a new message.
    publ.publish_acked("x2/t", b"second", 2, 5).await;
    publ.publish_acked("marker", b"m", 1, 6).await;
    let got: Vec<String> = watcher
        .until("marker")
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(got, ["only once", "second"]);
}

#[tokio::test]
async fn mqtt_4_4_0_1_unacked_qos1_is_redelivered_with_dup_on_reconnect() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "redeliver1", false).await;
    c.subscribe(1, &[("rd/t", 1)]).await;
    raw_publish(b.addr, "rd/t", b"ack me", 1, false).await;
    let first = c.recv_publish().await;
    assert!(!first.dup);
    drop(c); // no PUBACK

    let (mut c, sp) = Raw::connect(b.addr, "redeliver1", false).await;
    assert!(sp);
    let again = c.recv_publish().await;
    assert_eq!(again.payload, b"ack me");
    assert_eq!(again.pid, first.pid, "original packet id [MQTT-4.4.0-1]");
    assert!(again.dup, "DUP 1 on a re-delivery [MQTT-3.3.1-1]");
    assert_eq!(again.qos, 1);
    c.send(&wire::ack(wire::PUBACK, again.pid)).await;
    assert!(c.ping_barrier().await.is_empty());
}

#[tokio::test]
async fn mqtt_4_4_0_1_unacked_qos2_publish_and_pubrel_are_resent_on_reconnect() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "redeliver2", false).await;
    c.subscribe(1, &[("rd2/#", 2)]).await;
    raw_publish(b.addr, "rd2/a", b"no pubrec yet", 2, false).await;
    raw_publish(b.addr, "rd2/b", b"pubrec sent", 2, false).await;
    let a = c.recv_publish().await;
    let bm = c.recv_publish().await;
    assert_eq!(a.payload, b"no pubrec yet");
    c.send(&wire::ack(wire::PUBREC, bm.pid)).await;
    assert_eq!(c.recv_kind(wire::PUBREL).await.pid(), bm.pid);
    drop(c); // neither PUBREC for a nor PUBCOMP for b

    let (mut c, sp) = Raw::connect(b.addr, "redeliver2", false).await;
    assert!(sp);
    let mut saw_publish = false;
    let mut saw_pubrel = false;
    for _ in 0..2 {
        let p = c.recv().await;
        match p.kind() {
            wire::PUBLISH => {
                let m = p.publish();
                assert_eq!((m.pid, m.dup, m.qos), (a.pid, true, 2));
                saw_publish = true;
            }
            wire::PUBREL => {
                assert_eq!(p.pid(), bm.pid);
                saw_pubrel = true;
            }
            _ => panic!("unexpected {p:?}"),
        }
    }
    assert!(saw_publish && saw_pubrel);
    c.send(&wire::ack(wire::PUBCOMP, bm.pid)).await;
    c.send(&wire::ack(wire::PUBREC, a.pid)).await;
    assert_eq!(c.recv_kind(wire::PUBREL).await.pid(), a.pid);
    c.send(&wire::ack(wire::PUBCOMP, a.pid)).await;
    assert!(c.ping_barrier().await.is_empty(), "nothing delivered twice");
}

#[tokio::test]
async fn mqtt_4_6_0_6_qos1_messages_keep_their_order() {
    let b = TestBroker::start().await;
    let mut sub = Rumq::connect(b.addr, "order-sub").await;
    sub.subscribe("ord/t", QoS::AtLeastOnce).await;
    let publ = Rumq::connect(b.addr, "order-pub").await;
    for i in 0..200u32 {
        publ.client
            .publish("ord/t", QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    for i in 0..200u32 {
        let m = sub.next_publish().await;
        assert_eq!(m.payload.as_ref(), i.to_string().as_bytes());
    }
}

#[tokio::test]
async fn mqtt_4_6_0_inflight_window_is_max_inflight() {
    let b = TestBroker::with("max-inflight = 5").await;
    let (mut sub, _) = Raw::connect(b.addr, "window", true).await;
    sub.subscribe(1, &[("w/t", 1)]).await;
    let (mut publ, _) = Raw::connect(b.addr, "window-pub", true).await;
    for i in 0..12u16 {
        publ.publish_acked("w/t", &i.to_be_bytes(), 1, i + 1).await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(sub.recv_publish().await);
    }
    let more = sub.ping_barrier().await;
    assert!(
        more.is_empty(),
        "more than 5 unacknowledged in flight: {more:?}"
    );
    // Each PUBACK opens the window by one, in order.
    let mut next = 5u16;
    while let Some(m) = got.first().cloned() {
        got.remove(0);
        sub.send(&wire::ack(wire::PUBACK, m.pid)).await;
        if next < 12 {
            let n = sub.recv_publish().await;
            assert_eq!(n.payload, next.to_be_bytes());
            got.push(n);
            next += 1;
        }
        let more = sub.ping_barrier().await;
        assert!(
            more.is_empty(),
            "window exceeded after {next} sent: {more:?}"
        );
    }
    assert_eq!(next, 12);
}

#[tokio::test]
async fn mqtt_3_3_2_topic_names_are_case_sensitive_and_may_contain_spaces() {
    let b = TestBroker::start().await;
    let mut sub = MosqSub::spawn(b.addr, &["-t", "Room 1/temp", "-t", "marker"]).await;
    mosquitto_pub(b.addr, &["-t", "room 1/temp", "-m", "lower"]).await;
    mosquitto_pub(b.addr, &["-t", "Room 1/temp", "-m", "upper"]).await;
    mosquitto_pub(b.addr, &["-t", "marker", "-m", ""]).await;
    let got: Vec<String> = sub
        .until("marker")
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(got, ["upper"]);
}
