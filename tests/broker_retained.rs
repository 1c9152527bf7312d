//! Retained messages [MQTT-3.3.1-5 .. 3.3.1-12].

mod common;

use common::*;

#[tokio::test]
async fn mqtt_3_3_1_6_retained_message_sent_on_subscribe_with_retain_1() {
    let b = TestBroker::start().await;
    mosquitto_pub(b.addr, &["-t", "ret/a", "-m", "kept", "-r", "-q", "1"]).await;
    let (mut c, _) = Raw::connect(b.addr, "late", true).await;
    c.subscribe(1, &[("ret/#", 1)]).await;
    let m = c.recv_publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("ret/a", &b"kept"[..])
    );
    assert!(
        m.retain,
        "RETAIN 1 when sent because of a new subscription [MQTT-3.3.1-8]"
    );
    assert_eq!(m.qos, 1);
}

#[tokio::test]
async fn mqtt_3_3_1_6_retained_message_seen_by_mosquitto_sub_as_retained() {
    let b = TestBroker::start().await;
    let mut rq = Rumq::connect(b.addr, "retainer").await;
    rq.publish("ret/rq", QoS::AtLeastOnce, true, b"from rumqttc")
        .await;
    let mut sub = MosqSub::spawn(b.addr, &["-t", "ret/+", "-q", "1"]).await;
    let m = sub.next().await;
    assert_eq!(m.payload, "from rumqttc");
    assert!(m.retain);
}

#[tokio::test]
async fn mqtt_3_3_1_5_retained_message_is_replaced_by_a_newer_one() {
    let b = TestBroker::start().await;
    mosquitto_pub(b.addr, &["-t", "ret/r", "-m", "one", "-r"]).await;
    mosquitto_pub(b.addr, &["-t", "ret/r", "-m", "two", "-r"]).await;
    raw_publish(b.addr, "marker", b"m", 0, true).await;
    let (mut c, _) = Raw::connect(b.addr, "replaced", true).await;
    c.subscribe(1, &[("ret/r", 0)]).await;
    c.subscribe(2, &[("marker", 0)]).await;
    let got: Vec<Vec<u8>> = c
        .publishes_until("marker")
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(got, [b"two".to_vec()], "one retained message per topic");
}

#[tokio::test]
async fn mqtt_3_3_1_10_empty_retained_payload_clears_the_retained_message() {
    let b = TestBroker::start().await;
    mosquitto_pub(b.addr, &["-t", "ret/c", "-m", "soon gone", "-r"]).await;
    // An existing subscriber still gets the empty message, normally [MQTT-3.3.1-10].
    let mut existing = MosqSub::spawn(b.addr, &["-t", "ret/c"]).await;
    assert_eq!(existing.next().await.payload, "soon gone");
    mosquitto_pub(b.addr, &["-t", "ret/c", "-r", "-n"]).await;
    let cleared = existing.next().await;
    assert_eq!(cleared.payload, "");

    raw_publish(b.addr, "marker", b"m", 0, true).await;
    let (mut c, _) = Raw::connect(b.addr, "after-clear", true).await;
    c.subscribe(1, &[("ret/c", 0)]).await;
    c.subscribe(2, &[("marker", 0)]).await;
    let before = c.publishes_until("marker").await;
    assert!(
        before.is_empty(),
        "cleared retained message still sent [MQTT-3.3.1-11]: {before:?}"
    );
}

#[tokio::test]
async fn mqtt_3_3_1_9_existing_subscribers_get_retain_0() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::connect(b.addr, "existing", true).await;
    c.subscribe(1, &[("ret/live", 1)]).await;
    raw_publish(b.addr, "ret/live", b"live", 1, true).await;
    let m = c.recv_publish().await;
    assert_eq!(m.payload, b"live");
    assert!(
        !m.retain,
        "RETAIN 0 to subscriptions that existed [MQTT-3.3.1-9]"
    );

    let mut sub = MosqSub::spawn(b.addr, &["-t", "ret/live2"]).await;
    mosquitto_pub(b.addr, &["-t", "ret/live2", "-m", "x", "-r"]).await;
    assert!(!sub.next().await.retain);
}

#[tokio::test]
async fn mqtt_3_3_1_12_retain_0_publish_does_not_replace_the_retained_message() {
    let b = TestBroker::start().await;
    mosquitto_pub(b.addr, &["-t", "ret/k", "-m", "keep", "-r"]).await;
    mosquitto_pub(b.addr, &["-t", "ret/k", "-m", "transient"]).await;
    let mut sub = MosqSub::spawn(b.addr, &["-t", "ret/k"]).await;
    let m = sub.next().await;
    assert_eq!(m.payload, "keep");
    assert!(m.retain);
}

#[tokio::test]
async fn mqtt_3_3_1_6_retained_messages_match_wildcard_subscriptions() {
    let b = TestBroker::start().await;
    for t in ["home/a/temp", "home/b/temp", "home/b/hum", "office/temp"] {
        mosquitto_pub(b.addr, &["-t", t, "-m", t, "-r"]).await;
    }
    raw_publish(b.addr, "marker", b"m", 0, true).await;
    let (mut c, _) = Raw::connect(b.addr, "wild-ret", true).await;
    c.subscribe(1, &[("home/+/temp", 0)]).await;
    c.subscribe(2, &[("marker", 0)]).await;
    let mut got: Vec<String> = c
        .publishes_until("marker")
        .await
        .into_iter()
        .map(|m| {
            assert!(m.retain);
            m.topic
        })
        .collect();
    got.sort();
    assert_eq!(got, ["home/a/temp", "home/b/temp"]);
}

#[tokio::test]
async fn mqtt_3_3_5_retained_message_delivered_at_min_of_its_qos_and_the_subscription() {
    let b = TestBroker::start().await;
    raw_publish(b.addr, "ret/q2", b"two", 2, true).await;
    raw_publish(b.addr, "ret/q0", b"zero", 0, true).await;
    let (mut c, _) = Raw::connect(b.addr, "retqos", true).await;
    c.subscribe(1, &[("ret/q2", 1)]).await;
    let m = c.recv_publish().await;
    assert_eq!((m.qos, m.retain), (1, true));
    c.ack_publish(&m).await;
    c.subscribe(2, &[("ret/q0", 2)]).await;
    let m = c.recv_publish().await;
    assert_eq!((m.qos, m.retain), (0, true));
}

#[tokio::test]
async fn mqtt_3_8_4_3_resubscribing_resends_retained_messages() {
    let b = TestBroker::start().await;
    raw_publish(b.addr, "ret/again", b"r", 0, true).await;
    let (mut c, _) = Raw::connect(b.addr, "resub-ret", true).await;
    c.subscribe(1, &[("ret/again", 0)]).await;
    assert!(c.recv_publish().await.retain);
    c.subscribe(2, &[("ret/again", 0)]).await;
    let m = c.recv_publish().await;
    assert!(
        m.retain,
        "retained messages are re-sent on a repeated SUBSCRIBE [MQTT-3.8.4-3]"
    );
}
