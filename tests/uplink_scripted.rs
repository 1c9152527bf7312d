//! The uplink against a scripted upstream: a hand-written MQTT peer on a real loopback socket,
//! for what no real broker can be told to do — withhold acknowledgements, answer a PUBREC
//! late, or say whether it kept the session. Everything else runs against real mosquitto in
//! the other `uplink_*` tests.

mod common;

use std::net::SocketAddr;

use common::upstream::start_gateway;
use common::{Msg, Raw, wire, within};
use tokio::net::TcpListener;

/// The upstream's side of the socket.
struct Scripted {
    listener: TcpListener,
}

impl Scripted {
    async fn bind() -> Scripted {
        Scripted {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Takes the gateway's next connection: reads CONNECT, answers CONNACK with
    /// `session_present`.
    async fn accept(&self, session_present: bool) -> Raw {
        let (socket, _) = within("the gateway connecting upstream", self.listener.accept())
            .await
            .unwrap();
        let mut up = Raw::over(socket);
        up.recv_kind(wire::CONNECT).await;
        up.send(&wire::packet(
            wire::CONNACK << 4,
            &[u8::from(session_present), 0],
        ))
        .await;
        up
    }
}

/// The next `n` PUBLISHes on `topic`; answers SUBSCRIBE, skips the status message.
async fn publishes(up: &mut Raw, topic: &str, n: usize) -> Vec<Msg> {
    let mut got = Vec::new();
    while got.len() < n {
        let p = up.recv().await;
        match p.kind() {
            wire::SUBSCRIBE => {
                let mut suback = p.body[..2].to_vec();
                suback.push(0);
                up.send(&wire::packet(wire::SUBACK << 4, &suback)).await;
            }
            wire::PUBLISH if p.publish().topic == topic => got.push(p.publish()),
            wire::PUBLISH => {}
            other => panic!("unexpected packet type {other} from the gateway: {p:?}"),
        }
    }
    got
}

fn config(dir: &std::path::Path, up: SocketAddr, qos: u8, extra: &str) -> String {
    format!(
        r#"
data-dir = {:?}
gateway-id = "gw1"
[[broker.listener]]
bind = "127.0.0.1:0"
[upstream]
url = "mqtt://{up}"
inflight = 64
keep-alive = "60s"
reconnect-min = "50ms"
reconnect-max = "200ms"
[[upstream.out]]
filter = "sensors/#"
remote-prefix = "site/"
qos = {qos}
[[upstream.in]]
filter = "cmd/{{gateway}}/#"
remote-prefix = "cmd/{{gateway}}/"
local-prefix = "local/cmd/"
qos = 0
[outbox]
commit-delay = "5ms"
{extra}
"#,
        dir.join("data").display().to_string()
    )
}

/// While PUBLISHes are unacknowledged the gateway's reader waits for a run of their
/// acknowledgements, not for each (`SO_RCVLOWAT`, see `Connection::wake_after`). A packet
/// shorter than that run, with no acknowledgement after it, must still be read promptly:
/// here a 13-byte command while the gateway waits for 64 bytes of PUBACKs.
#[tokio::test]
async fn a_command_is_not_held_back_behind_acknowledgements_still_due() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Scripted::bind().await;
    let gw = start_gateway(&config(dir.path(), peer.addr(), 1, "")).await;
    let mut up = peer.accept(false).await;
    let (mut c, _) = Raw::connect(gw.local_addrs()[0], "listener", true).await;
    c.subscribe(1, &[("local/#", 0)]).await;
    for i in 0..16u16 {
        c.publish_acked("sensors/t", format!("{i}").as_bytes(), 1, i + 2)
            .await;
    }
    publishes(&mut up, "site/sensors/t", 16).await;
    let command = wire::publish("cmd/gw1/a", b"", 0, false, 0);
    assert_eq!(command.len(), 13);
    up.send(&command).await;
    let m = c.recv_publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("local/cmd/a", &b""[..]),
        "the command reaches the local subscriber while 16 PUBACKs are still due"
    );
    gw.shutdown().await;
}

/// [MQTT-3.3.1-1]: a PUBLISH sent again carries DUP=1 — also after a restart, when the new
/// process cannot know which records its predecessor sent. An upstream that lost the session
/// (session present 0) gets them as new publishes, DUP=0. Packet ids never change.
#[tokio::test]
async fn mqtt_3_3_1_1_resends_after_a_restart_carry_dup_only_within_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Scripted::bind().await;
    let text = config(dir.path(), peer.addr(), 1, "");
    let gw = start_gateway(&text).await;
    let mut up = peer.accept(false).await;
    let (mut c, _) = Raw::connect(gw.local_addrs()[0], "producer", true).await;
    for i in 0..3u16 {
        c.publish_acked("sensors/t", format!("m{i}").as_bytes(), 1, i + 1)
            .await;
    }
    let first = publishes(&mut up, "site/sensors/t", 3).await;
    assert!(first.iter().all(|m| !m.dup), "first sends: {first:?}");
    drop(c);
    gw.shutdown().await;
    drop(up);

    let ids = |ms: &[Msg]| {
        ms.iter()
            .map(|m| (m.pid, m.payload.clone()))
            .collect::<Vec<_>>()
    };
    for session_present in [true, false] {
        let gw = start_gateway(&text).await;
        let mut up = peer.accept(session_present).await;
        let again = publishes(&mut up, "site/sensors/t", 3).await;
        assert_eq!(ids(&again), ids(&first), "same packet ids, same messages");
        assert!(
            again.iter().all(|m| m.dup == session_present),
            "session present {session_present}: {again:?}"
        );
        gw.shutdown().await;
    }
}

/// A drop policy can remove a QoS 2 record while it is in flight. The upstream then still holds
/// the message under its packet id: its PUBREC must be answered with PUBREL (not by dropping
/// the connection), or the id stays taken there and a later record sent under it would be
/// discarded as a duplicate.
#[tokio::test]
async fn a_pubrec_for_a_record_dropped_in_flight_is_answered_with_pubrel() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Scripted::bind().await;
    let text = config(
        dir.path(),
        peer.addr(),
        2,
        "max-bytes = \"64KiB\"\nwhen-full = \"drop-oldest\"",
    );
    let gw = start_gateway(&text).await;
    let mut up = peer.accept(false).await;
    let (mut c, _) = Raw::connect(gw.local_addrs()[0], "producer", true).await;
    c.publish_acked("sensors/t", b"first", 2, 1).await;
    let first = publishes(&mut up, "site/sensors/t", 1).await.remove(0);
    assert_eq!((first.qos, first.payload.as_slice()), (2, &b"first"[..]));
    // 1 KiB messages until the quota has pushed the first record out.
    let big = vec![b'x'; 1024];
    let outbox = gw.outbox().unwrap();
    let mut pid = 2;
    while outbox.stats().dropped_oldest == 0 {
        c.publish_acked("sensors/t", &big, 2, pid).await;
        pid += 1;
        assert!(pid < 1000, "the quota never dropped anything");
    }
    up.send(&wire::ack(wire::PUBREC, first.pid)).await;
    up.recv_ack(wire::PUBREL, first.pid).await;
    up.send(&wire::ack(wire::PUBCOMP, first.pid)).await;
    // The link stays up: a command still comes through it.
    c.subscribe(1, &[("local/#", 0)]).await;
    up.send(&wire::publish("cmd/gw1/after", b"", 0, false, 0))
        .await;
    assert_eq!(c.recv_publish().await.topic, "local/cmd/after");
    gw.shutdown().await;
}
