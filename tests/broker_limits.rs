//! Malformed input, size and connection limits, and slow consumers: each closes or throttles
//! only the offending connection [MQTT-4.8.0-1], never the others (DESIGN invariant 6).

mod common;

use common::wire;
use common::*;

/// Connects a well-behaved subscriber, then a client that sends `bad` after CONNECT; the bad
/// client must be closed and the good one must still get messages.
async fn bad_bytes_close_only_that_connection(bad: &[u8]) {
    let b = TestBroker::start().await;
    let mut good = MosqSub::spawn(b.addr, &["-t", "good/t", "-q", "1"]).await;
    let (mut evil, _) = Raw::connect(b.addr, "evil", true).await;
    evil.send(bad).await;
    evil.expect_closed().await;
    mosquitto_pub(b.addr, &["-t", "good/t", "-m", "still here", "-q", "1"]).await;
    assert_eq!(good.next().await.payload, "still here");
}

#[tokio::test]
async fn mqtt_2_2_3_remaining_length_of_five_bytes_closes_the_connection() {
    bad_bytes_close_only_that_connection(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]).await;
}

#[tokio::test]
async fn mqtt_2_2_3_remaining_length_disagreeing_with_the_content_closes_the_connection() {
    // A SUBSCRIBE whose topic length runs past the end of the packet.
    bad_bytes_close_only_that_connection(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x09, b'a', 0x00]).await;
}

#[tokio::test]
async fn mqtt_2_2_2_2_reserved_flags_of_subscribe_close_the_connection() {
    let mut p = wire::subscribe(1, &[("a", 0)]);
    p[0] = 0x80; // must be 0x82 [MQTT-3.8.1-1]
    bad_bytes_close_only_that_connection(&p).await;
}

#[tokio::test]
async fn mqtt_2_2_2_2_reserved_flags_of_pubrel_close_the_connection() {
    bad_bytes_close_only_that_connection(&[0x60, 0x02, 0x00, 0x01]).await; // [MQTT-3.6.1-1]
}

#[tokio::test]
async fn mqtt_2_2_2_2_reserved_flags_of_pingreq_close_the_connection() {
    bad_bytes_close_only_that_connection(&[0xc1, 0x00]).await;
}

#[tokio::test]
async fn mqtt_2_2_1_reserved_packet_type_0_closes_the_connection() {
    bad_bytes_close_only_that_connection(&[0x00, 0x00]).await;
}

#[tokio::test]
async fn mqtt_2_2_1_reserved_packet_type_15_closes_the_connection() {
    bad_bytes_close_only_that_connection(&[0xf0, 0x00]).await;
}

#[tokio::test]
async fn mqtt_3_3_1_4_publish_with_qos_3_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish_raw(b"a", b"x", 3, false, false, 1)).await;
}

#[tokio::test]
async fn mqtt_1_5_3_1_ill_formed_utf8_topic_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish_raw(
        b"a/\xc3\x28",
        b"x",
        0,
        false,
        false,
        0,
    ))
    .await;
}

#[tokio::test]
async fn mqtt_1_5_3_1_utf16_surrogate_in_topic_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish_raw(
        b"a/\xed\xa0\x80",
        b"x",
        0,
        false,
        false,
        0,
    ))
    .await;
}

#[tokio::test]
async fn mqtt_1_5_3_2_null_character_in_topic_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish_raw(b"a\0b", b"x", 0, false, false, 0))
        .await;
}

#[tokio::test]
async fn mqtt_3_3_2_2_plus_wildcard_in_publish_topic_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish("good/+", b"x", 0, false, 0)).await;
}

#[tokio::test]
async fn mqtt_3_3_2_2_hash_wildcard_in_publish_topic_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish("good/#", b"x", 1, false, 1)).await;
}

#[tokio::test]
async fn mqtt_4_7_3_1_empty_publish_topic_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish_raw(b"", b"x", 0, false, false, 0)).await;
}

#[tokio::test]
async fn mqtt_2_3_1_1_qos1_publish_with_packet_id_0_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::publish("good/t", b"x", 1, false, 0)).await;
}

#[tokio::test]
async fn mqtt_3_8_3_3_subscribe_without_filters_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::subscribe(1, &[])).await;
}

#[tokio::test]
async fn mqtt_3_10_3_2_unsubscribe_without_filters_closes_the_connection() {
    bad_bytes_close_only_that_connection(&wire::unsubscribe(1, &[])).await;
}

#[tokio::test]
async fn oversize_publish_over_max_packet_size_closes_the_connection() {
    let b = TestBroker::with("max-packet-size = 1024").await;
    let mut good = MosqSub::spawn(b.addr, &["-t", "big/#"]).await;
    let (mut evil, _) = Raw::connect(b.addr, "big", true).await;
    let _ = evil
        .try_send(&wire::publish("big/t", &[7u8; 2000], 0, false, 0))
        .await;
    evil.expect_closed().await;
    // Just under the limit still passes.
    mosquitto_pub(b.addr, &["-t", "big/ok", "-m", &"y".repeat(900)]).await;
    let m = good.next().await;
    assert_eq!(
        m.topic, "big/ok",
        "the oversize message must not be delivered"
    );
}

#[tokio::test]
async fn oversize_length_is_refused_before_the_body_arrives() {
    let b = TestBroker::with("max-packet-size = 1024").await;
    let (mut evil, _) = Raw::connect(b.addr, "huge", true).await;
    // Announce ~200 MB and send nothing more: the header alone must get us closed.
    let mut header = vec![0x30];
    wire::remaining_length(200_000_000, &mut header);
    evil.send(&header).await;
    evil.expect_closed().await;
}

#[tokio::test]
async fn oversize_connect_closes_the_connection() {
    let b = TestBroker::with("max-packet-size = 1024").await;
    let big_id = "c".repeat(2000);
    let c = wire::Connect {
        client_id: &big_id,
        ..Default::default()
    };
    let mut raw = Raw::tcp(b.addr).await;
    let _ = raw.try_send(&c.encode()).await;
    for p in raw.expect_closed_after().await {
        assert!(
            p.kind() == wire::CONNACK && p.body[1] != 0,
            "accepted: {p:?}"
        );
    }
}

#[tokio::test]
async fn max_connections_extra_connections_are_closed() {
    let b = TestBroker::with("max-connections = 3").await;
    let mut kept = Vec::new();
    for i in 0..3 {
        let (c, _) = Raw::connect(b.addr, &format!("slot{i}"), true).await;
        kept.push(c);
    }
    let mut extra = Raw::tcp(b.addr).await;
    let c = wire::Connect {
        client_id: "one-too-many",
        ..Default::default()
    };
    let _ = extra.try_send(&c.encode()).await;
    for p in extra.expect_closed_after().await {
        assert!(
            p.kind() == wire::CONNACK && p.body[1] != 0,
            "accepted: {p:?}"
        );
    }
    // The three are unaffected.
    for c in &mut kept {
        assert!(c.ping_barrier().await.is_empty());
    }
    // A freed slot can be used again once the broker has seen the close.
    kept.pop().unwrap().disconnect().await;
    within("a freed connection slot", async {
        loop {
            let mut r = Raw::tcp(b.addr).await;
            let c = wire::Connect {
                client_id: "reuse",
                ..Default::default()
            };
            if r.try_send(&c.encode()).await {
                if let Read::Packet(p) = r.read_within(WAIT).await {
                    if p.kind() == wire::CONNACK && p.body[1] == 0 {
                        break;
                    }
                }
            }
        }
    })
    .await;
}

/// A subscriber that never reads must not stall the publisher or the other subscribers;
/// what it cannot take is dropped and counted.
#[tokio::test]
async fn a_client_that_never_reads_does_not_stall_others() {
    let b = TestBroker::with("sys-interval = \"1s\"\nmax-queued = 100").await;
    let (mut stuck, _) = Raw::connect(b.addr, "never-reads", true).await;
    stuck.subscribe(1, &[("flood/#", 1)]).await;
    // From here on `stuck` is never read: its socket buffers fill up.

    let mut reader = Rumq::connect(b.addr, "reads").await;
    reader.subscribe("flood/#", QoS::AtLeastOnce).await;

    let payload = vec![b'p'; 4096];
    const N0: usize = 2000;
    const N1: usize = 500;
    let (mut publ, _) = Raw::connect(b.addr, "flooder", true).await;
    let publish_all = async {
        for i in 0..N0 {
            let mut p = payload.clone();
            p[..8].copy_from_slice(&(i as u64).to_be_bytes());
            publ.publish("flood/q0", &p, 0, false, 0).await;
        }
        for i in 0..N1 {
            let mut p = payload.clone();
            p[..8].copy_from_slice(&(i as u64).to_be_bytes());
            publ.publish_acked("flood/q1", &p, 1, (i % 60000 + 1) as u16)
                .await;
        }
        publ.ping_barrier().await;
    };
    let mut got0 = 0;
    let mut got1 = 0;
    let read_all = async {
        while got0 < N0 || got1 < N1 {
            let m = reader.next_publish().await;
            match m.topic.as_str() {
                "flood/q0" => got0 += 1,
                _ => got1 += 1,
            }
        }
    };
    // 10 MB through a debug build on a shared machine: a longer bound than `WAIT`.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        tokio::join!(publish_all, read_all)
    })
    .await
    .expect("the publisher and the reading subscriber finish within 60 s");
    assert_eq!((got0, got1), (N0, N1));

    let mut sys = SysWatch::start(b.addr).await;
    sys.until_number("$SYS/broker/messages/dropped", |n| n > 0.0)
        .await;
    drop(stuck);
}
