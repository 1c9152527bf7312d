//! Differential tests: rumqttc's `mqttbytes::v4` codec as an oracle for ours.
//!
//! 1. Packets we encode are byte-identical to rumqttc's encoding and decode identically there.
//! 2. Packets rumqttc encodes decode identically here.
//! 3. Whatever we accept — including mutations of valid packets — rumqttc accepts as the same
//!    packet. The converse is not asserted: rumqttc is deliberately lenient (it ignores reserved
//!    flag bits, fixed header flags, requested-QoS reserved bits, trailing bytes in acks,
//!    zero packet ids in SUBSCRIBE, non-minimal remaining lengths, empty UNSUBSCRIBE...).
//!
//! Where the two legitimately differ, packets are kept out of the comparison by [`to_rumqttc`]
//! returning `None`:
//! - rumqttc speaks only "MQTT" level 4 (and 5): no MQTT 3.1 ("MQIsdp", level 3) CONNECT.
//! - rumqttc's `Login` holds `String`s and treats an empty user name or password as absent; so a
//!   present-but-empty user name or password, a non-UTF-8 password, or a password without a user
//!   name (3.1 only, here) cannot be represented.
//! - rumqttc's `max_size` limits the remaining length, ours the whole packet: both run unlimited.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use rumqttc::mqttbytes::{self as theirs, v4};

use super::*;

fn their_qos(qos: QoS) -> theirs::QoS {
    match qos {
        QoS::AtMostOnce => theirs::QoS::AtMostOnce,
        QoS::AtLeastOnce => theirs::QoS::AtLeastOnce,
        QoS::ExactlyOnce => theirs::QoS::ExactlyOnce,
    }
}

/// Our packet as rumqttc's, or `None` where rumqttc cannot represent it (see module docs).
fn to_rumqttc(packet: &Packet) -> Option<v4::Packet> {
    Some(match packet {
        Packet::Connect(c) => {
            if c.protocol != ProtocolLevel::V311 {
                return None;
            }
            let login = match (&c.username, &c.password) {
                (None, None) => None,
                (Some(u), None) if !u.is_empty() => Some(v4::Login::new(u.clone(), "")),
                (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Some(v4::Login::new(
                    u.clone(),
                    std::str::from_utf8(p).ok()?.to_owned(),
                )),
                _ => return None,
            };
            v4::Packet::Connect(v4::Connect {
                protocol: theirs::Protocol::V4,
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                clean_session: c.clean_session,
                last_will: c.will.as_ref().map(|w| v4::LastWill {
                    topic: w.topic.clone(),
                    message: w.payload.clone(),
                    qos: their_qos(w.qos),
                    retain: w.retain,
                }),
                login,
            })
        }
        Packet::ConnAck(c) => v4::Packet::ConnAck(v4::ConnAck {
            session_present: c.session_present,
            code: match c.code {
                ConnectReturnCode::Accepted => v4::ConnectReturnCode::Success,
                ConnectReturnCode::UnacceptableProtocolVersion => {
                    v4::ConnectReturnCode::RefusedProtocolVersion
                }
                ConnectReturnCode::IdentifierRejected => v4::ConnectReturnCode::BadClientId,
                ConnectReturnCode::ServerUnavailable => v4::ConnectReturnCode::ServiceUnavailable,
                ConnectReturnCode::BadUsernameOrPassword => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                ConnectReturnCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
            },
        }),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: their_qos(p.qos),
            retain: p.retain,
            topic: p.topic.clone(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck(id) => v4::Packet::PubAck(v4::PubAck::new(*id)),
        Packet::PubRec(id) => v4::Packet::PubRec(v4::PubRec::new(*id)),
        Packet::PubRel(id) => v4::Packet::PubRel(v4::PubRel::new(*id)),
        Packet::PubComp(id) => v4::Packet::PubComp(v4::PubComp::new(*id)),
        Packet::Subscribe(s) => v4::Packet::Subscribe(v4::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), their_qos(*q)))
                .collect(),
        }),
        Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck::new(
            s.pkid,
            s.codes
                .iter()
                .map(|c| match c {
                    SubAckCode::Granted(q) => v4::SubscribeReasonCode::Success(their_qos(*q)),
                    SubAckCode::Failure => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::Unsubscribe(u) => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters.clone(),
        }),
        Packet::UnsubAck(id) => v4::Packet::UnsubAck(v4::UnsubAck::new(*id)),
        Packet::PingReq => v4::Packet::PingReq,
        Packet::PingResp => v4::Packet::PingResp,
        Packet::Disconnect => v4::Packet::Disconnect,
    })
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// Any UTF-8 string without U+0000, up to 12 characters (a mix of ASCII and the rest).
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9/+#$ ]{0,12}", "[^\u{0}]{0,12}"]
}

fn non_empty_text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9/+#$ ]{1,12}", "[^\u{0}]{1,12}"]
}

/// A valid topic name: non-empty, no wildcards.
fn topic_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9/$ ]{1,12}", "[^\u{0}+#]{1,12}"]
}

/// Payloads whose sizes cross the 1-, 2- and 3-byte remaining length boundaries.
fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..40),
        1 => vec(any::<u8>(), 100..300),
        1 => (16_300usize..16_500).prop_map(|n| vec![0xa5; n]),
    ]
    .prop_map(Bytes::from)
}

fn pkid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn will() -> impl Strategy<Value = LastWill> {
    (topic_name(), payload(), qos(), any::<bool>()).prop_map(|(topic, payload, qos, retain)| {
        LastWill {
            topic,
            payload,
            qos,
            retain,
        }
    })
}

fn publish() -> impl Strategy<Value = Publish> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        pkid(),
        payload(),
    )
        .prop_map(|(qos, dup, retain, topic, pkid, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                pkid: if at_most_once { 0 } else { pkid },
                payload,
            }
        })
}

fn connack() -> impl Strategy<Value = ConnAck> {
    let code = prop_oneof![
        Just(ConnectReturnCode::Accepted),
        Just(ConnectReturnCode::UnacceptableProtocolVersion),
        Just(ConnectReturnCode::IdentifierRejected),
        Just(ConnectReturnCode::ServerUnavailable),
        Just(ConnectReturnCode::BadUsernameOrPassword),
        Just(ConnectReturnCode::NotAuthorized),
    ];
    (code, any::<bool>()).prop_map(|(code, present)| ConnAck {
        session_present: present && code == ConnectReturnCode::Accepted,
        code,
    })
}

/// Every packet type, given a strategy for CONNECT.
fn packet_with(connect: BoxedStrategy<Connect>) -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect.prop_map(Packet::Connect),
        connack().prop_map(Packet::ConnAck),
        publish().prop_map(Packet::Publish),
        pkid().prop_map(Packet::PubAck),
        pkid().prop_map(Packet::PubRec),
        pkid().prop_map(Packet::PubRel),
        pkid().prop_map(Packet::PubComp),
        (pkid(), vec((text(), qos()), 1..5))
            .prop_map(|(pkid, filters)| Packet::Subscribe(Subscribe { pkid, filters })),
        (
            pkid(),
            vec(
                prop_oneof![
                    qos().prop_map(SubAckCode::Granted),
                    Just(SubAckCode::Failure)
                ],
                1..5
            )
        )
            .prop_map(|(pkid, codes)| Packet::SubAck(SubAck { pkid, codes })),
        (pkid(), vec(text(), 1..5))
            .prop_map(|(pkid, filters)| Packet::Unsubscribe(Unsubscribe { pkid, filters })),
        pkid().prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

/// CONNECTs rumqttc can represent: 3.1.1, non-empty user name, non-empty UTF-8 password.
fn connect_for_rumqttc() -> BoxedStrategy<Connect> {
    let login = prop_oneof![
        Just((None, None)),
        non_empty_text().prop_map(|u| (Some(u), None)),
        (non_empty_text(), non_empty_text())
            .prop_map(|(u, p)| (Some(u), Some(Bytes::from(p.into_bytes())))),
    ];
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        proptest::option::of(will()),
        login,
    )
        .prop_map(
            |(clean_session, keep_alive, client_id, will, (username, password))| Connect {
                protocol: ProtocolLevel::V311,
                clean_session,
                keep_alive,
                client_id,
                will,
                username,
                password,
            },
        )
        .boxed()
}

/// Every CONNECT this codec supports, 3.1 included.
fn any_connect() -> BoxedStrategy<Connect> {
    let protocol = prop_oneof![Just(ProtocolLevel::V311), Just(ProtocolLevel::V31)];
    let username = proptest::option::of(text());
    let password = proptest::option::of(payload());
    (
        protocol,
        any::<bool>(),
        any::<u16>(),
        text(),
        proptest::option::of(will()),
        username,
        password,
    )
        .prop_map(
            |(protocol, clean_session, keep_alive, client_id, will, username, password)| {
                // 3.1.1 forbids a password without a user name [MQTT-3.1.2-22].
                let password = match protocol {
                    ProtocolLevel::V311 if username.is_none() => None,
                    _ => password,
                };
                Connect {
                    protocol,
                    clean_session,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                }
            },
        )
        .boxed()
}

fn ours(packet: &Packet) -> BytesMut {
    let mut out = BytesMut::new();
    encode(packet, &mut out);
    out
}

fn rumqttc_encoded(packet: &v4::Packet) -> BytesMut {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, usize::MAX)
        .expect("rumqttc encodes a valid packet");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn our_encoding_is_rumqttcs_and_decodes_identically_there(
        packet in packet_with(connect_for_rumqttc())
    ) {
        let expected = to_rumqttc(&packet).expect("representable by construction");
        let mut bytes = ours(&packet);
        prop_assert_eq!(&bytes[..], &rumqttc_encoded(&expected)[..]);
        let decoded = v4::Packet::read(&mut bytes, usize::MAX).expect("rumqttc decodes it");
        prop_assert_eq!(decoded, expected);
        prop_assert!(bytes.is_empty());
    }

    #[test]
    fn rumqttcs_encoding_decodes_identically_here(packet in packet_with(connect_for_rumqttc())) {
        let theirs = to_rumqttc(&packet).expect("representable by construction");
        let mut bytes = rumqttc_encoded(&theirs);
        prop_assert_eq!(decode(&mut bytes, usize::MAX), Ok(Some(packet)));
        prop_assert!(bytes.is_empty());
    }

    #[test]
    fn whatever_we_accept_rumqttc_accepts_as_the_same_packet(
        packet in packet_with(any_connect()),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = ours(&packet);
        for (at, value) in &edits {
            let at = at.index(bytes.len());
            bytes[at] = *value;
        }
        if cut.index(4) == 0 {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let mut mine = bytes.clone();
        if let Ok(Some(accepted)) = decode(&mut mine, usize::MAX) {
            if let Some(expected) = to_rumqttc(&accepted) {
                let mut theirs = bytes.clone();
                let decoded = v4::Packet::read(&mut theirs, usize::MAX);
                prop_assert!(
                    matches!(&decoded, Ok(p) if *p == expected),
                    "we accepted {:?}, rumqttc read {:?}", accepted, decoded
                );
                prop_assert_eq!(mine.len(), theirs.len(), "both consumed the same frame");
            }
        }
    }

    #[test]
    fn every_packet_decodes_to_what_was_encoded(packet in packet_with(any_connect())) {
        let mut bytes = ours(&packet);
        prop_assert_eq!(bytes.len(), encoded_len(&packet));
        prop_assert_eq!(decode(&mut bytes, usize::MAX), Ok(Some(packet)));
        prop_assert!(bytes.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_consume_on_need_more(
        bytes in vec(any::<u8>(), 0..64),
        max in 0usize..80,
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(None) = decode(&mut buf, max) {
            prop_assert_eq!(&buf[..], &bytes[..]);
        }
    }
}
