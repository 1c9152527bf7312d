//! `$SYS/broker/...` statistics (Mosquitto's topic names), authentication and the
//! secure-by-default configuration rules.

mod common;

use common::wire::Connect;
use common::*;

const SYS_TOPICS: [&str; 10] = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/clients/total",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/messages/dropped",
];

const FAST_SYS: &str = "sys-interval = \"1s\"";

#[tokio::test]
async fn sys_broker_topics_are_all_published() {
    let b = TestBroker::with(FAST_SYS).await;
    let mut sys = SysWatch::start(b.addr).await;
    let version = sys.until("$SYS/broker/version", |v| !v.is_empty()).await;
    assert!(!version.trim().is_empty());
    for t in &SYS_TOPICS[1..] {
        let v = sys.until(t, |_| true).await;
        assert!(number(&v).is_some(), "{t} is not a number: {v:?}");
    }
}

#[tokio::test]
async fn sys_uptime_increases() {
    let b = TestBroker::with(FAST_SYS).await;
    let mut sys = SysWatch::start(b.addr).await;
    let first = sys.next_number("$SYS/broker/uptime").await;
    sys.until_number("$SYS/broker/uptime", |n| n > first).await;
}

#[tokio::test]
async fn sys_clients_connected_and_total_follow_connections() {
    let b = TestBroker::with(FAST_SYS).await;
    let mut sys = SysWatch::start(b.addr).await;
    // The watcher itself is the one connected client.
    sys.until_number("$SYS/broker/clients/connected", |n| n == 1.0)
        .await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(Raw::connect(b.addr, &format!("counted{i}"), true).await.0);
    }
    let (durable, _) = Raw::connect(b.addr, "counted-durable", false).await;
    sys.until_number("$SYS/broker/clients/connected", |n| n == 5.0)
        .await;
    sys.until_number("$SYS/broker/clients/total", |n| n >= 5.0)
        .await;
    for c in clients {
        c.disconnect().await;
    }
    durable.disconnect().await;
    sys.until_number("$SYS/broker/clients/connected", |n| n == 1.0)
        .await;
    // Mosquitto counts persistent sessions of disconnected clients in the total.
    sys.until_number("$SYS/broker/clients/total", |n| n >= 2.0)
        .await;
}

#[tokio::test]
async fn sys_message_and_byte_counters_grow_with_traffic() {
    let b = TestBroker::with(FAST_SYS).await;
    let mut sys = SysWatch::start(b.addr).await;
    let r0 = sys.next_number("$SYS/broker/messages/received").await;
    let s0 = sys.next_number("$SYS/broker/messages/sent").await;
    let br0 = sys.next_number("$SYS/broker/bytes/received").await;
    let bs0 = sys.next_number("$SYS/broker/bytes/sent").await;

    let mut sub = Rumq::connect(b.addr, "counter-sub").await;
    sub.subscribe("count/#", QoS::AtLeastOnce).await;
    let (mut publ, _) = Raw::connect(b.addr, "counter-pub", true).await;
    for i in 0..10u16 {
        publ.publish_acked("count/t", &[b'x'; 100], 1, i + 1).await;
    }
    for _ in 0..10 {
        sub.next_publish().await;
    }
    sys.until_number("$SYS/broker/messages/received", |n| n >= r0 + 10.0)
        .await;
    sys.until_number("$SYS/broker/messages/sent", |n| n >= s0 + 10.0)
        .await;
    sys.until_number("$SYS/broker/bytes/received", |n| n >= br0 + 1000.0)
        .await;
    sys.until_number("$SYS/broker/bytes/sent", |n| n >= bs0 + 1000.0)
        .await;
}

#[tokio::test]
async fn sys_retained_message_count_follows_set_and_clear() {
    let b = TestBroker::with(FAST_SYS).await;
    let mut sys = SysWatch::start(b.addr).await;
    sys.next_number("$SYS/broker/retained messages/count").await;
    let base = sys.next_number("$SYS/broker/retained messages/count").await;
    for t in ["rc/a", "rc/b", "rc/c"] {
        mosquitto_pub(b.addr, &["-t", t, "-m", "v", "-r"]).await;
    }
    let with = sys
        .until_number("$SYS/broker/retained messages/count", |n| n >= base + 3.0)
        .await;
    for t in ["rc/a", "rc/b", "rc/c"] {
        mosquitto_pub(b.addr, &["-t", t, "-r", "-n"]).await;
    }
    sys.until_number("$SYS/broker/retained messages/count", |n| n <= with - 3.0)
        .await;
}

/// The offline queue of a persistent session holds `max-queued` messages; the rest are dropped
/// and counted in `$SYS/broker/messages/dropped`.
#[tokio::test]
async fn offline_queue_is_bounded_by_max_queued_and_drops_are_counted() {
    let b = TestBroker::with("sys-interval = \"1s\"\nmax-queued = 10").await;
    let (mut c, _) = Raw::connect(b.addr, "offline", false).await;
    c.subscribe(1, &[("oq/t", 1)]).await;
    c.disconnect().await;
    let mut sys = SysWatch::start(b.addr).await;
    let d0 = sys.next_number("$SYS/broker/messages/dropped").await;

    let (mut publ, _) = Raw::connect(b.addr, "oq-pub", true).await;
    for i in 0..25u16 {
        publ.publish_acked("oq/t", &i.to_be_bytes(), 1, i + 1).await;
    }
    sys.until_number("$SYS/broker/messages/dropped", |n| n >= d0 + 15.0)
        .await;

    let (mut c, sp) = Raw::connect(b.addr, "offline", false).await;
    assert!(sp);
    let mut got = Vec::new();
    loop {
        let p = c.ping_barrier().await;
        if p.is_empty() {
            break;
        }
        for p in p {
            let m = p.publish();
            c.ack_publish(&m).await;
            got.push(u16::from_be_bytes([m.payload[0], m.payload[1]]));
        }
    }
    assert_eq!(got.len(), 10, "max-queued messages kept: {got:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
}

// ------------------------------------------------------------------------------------------
// Authentication
// ------------------------------------------------------------------------------------------

struct Secured {
    broker: TestBroker,
    _passwd_dir: tempfile::TempDir,
}

async fn secured(allow_anonymous: bool) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    let mut pw = sensorgate::broker::auth::PasswordFile::default();
    pw.set("alice", "wonderland").unwrap();
    pw.set("bob", "builder").unwrap();
    pw.save(&path).unwrap();
    let toml = format!(
        "password-file = {:?}\nallow-anonymous = {allow_anonymous}",
        path.display().to_string()
    );
    Secured {
        broker: TestBroker::with(&toml).await,
        _passwd_dir: dir,
    }
}

async fn connack_code(addr: std::net::SocketAddr, user: Option<&str>, pw: Option<&[u8]>) -> u8 {
    let c = Connect {
        client_id: "auth-test",
        username: user,
        password: pw,
        ..Default::default()
    };
    let (mut raw, (sp, code)) = Raw::connect_with(addr, &c).await;
    if code != 0 {
        assert!(!sp);
        raw.expect_closed().await; // [MQTT-3.2.2-5]
    }
    code
}

#[tokio::test]
async fn mqtt_3_1_3_good_username_and_password_are_accepted() {
    let s = secured(false).await;
    let addr = s.broker.addr;
    assert_eq!(
        connack_code(addr, Some("alice"), Some(b"wonderland")).await,
        0
    );
    let mut sub = MosqSub::spawn(addr, &["-u", "bob", "-P", "builder", "-t", "auth/t"]).await;
    let mut opts = rumq_options(addr, "rq-auth");
    opts.set_credentials("alice", "wonderland");
    let mut rq = Rumq::connect_with(opts).await;
    rq.publish("auth/t", QoS::AtLeastOnce, false, b"signed in")
        .await;
    assert_eq!(sub.next().await.payload, "signed in");
}

#[tokio::test]
async fn mqtt_3_2_2_3_bad_password_gets_connack_0x04() {
    let s = secured(false).await;
    assert_eq!(
        connack_code(s.broker.addr, Some("alice"), Some(b"wrong")).await,
        0x04
    );
}

#[tokio::test]
async fn mqtt_3_2_2_3_unknown_user_gets_connack_0x04() {
    let s = secured(false).await;
    assert_eq!(
        connack_code(s.broker.addr, Some("mallory"), Some(b"wonderland")).await,
        0x04
    );
}

#[tokio::test]
async fn mqtt_3_2_2_3_username_without_password_gets_connack_0x04() {
    let s = secured(false).await;
    assert_eq!(connack_code(s.broker.addr, Some("alice"), None).await, 0x04);
}

#[tokio::test]
async fn mqtt_3_2_2_3_no_credentials_when_anonymous_is_refused_gets_connack_0x05() {
    let s = secured(false).await;
    assert_eq!(connack_code(s.broker.addr, None, None).await, 0x05);
    let (ok, _) = mosquitto_pub_status(s.broker.addr, &["-t", "x", "-m", "anon"]).await;
    assert!(!ok, "mosquitto_pub without credentials must be refused");
}

#[tokio::test]
async fn allow_anonymous_with_a_password_file_accepts_anonymous_but_checks_given_passwords() {
    let s = secured(true).await;
    assert_eq!(connack_code(s.broker.addr, None, None).await, 0);
    assert_eq!(
        connack_code(s.broker.addr, Some("bob"), Some(b"builder")).await,
        0
    );
    assert_eq!(
        connack_code(s.broker.addr, Some("bob"), Some(b"nope")).await,
        0x04
    );
}

#[tokio::test]
async fn refused_connect_does_not_disturb_connected_clients() {
    let s = secured(false).await;
    let addr = s.broker.addr;
    let mut sub = MosqSub::spawn(addr, &["-u", "bob", "-P", "builder", "-t", "a/t"]).await;
    for _ in 0..5 {
        assert_eq!(connack_code(addr, Some("bob"), Some(b"guess")).await, 0x04);
    }
    mosquitto_pub(
        addr,
        &["-u", "alice", "-P", "wonderland", "-t", "a/t", "-m", "ok"],
    )
    .await;
    assert_eq!(sub.next().await.payload, "ok");
}

// ------------------------------------------------------------------------------------------
// Secure by default (configuration)
// ------------------------------------------------------------------------------------------

#[test]
fn a_non_loopback_listener_without_authentication_is_a_config_error() {
    for bind in ["0.0.0.0:0", "[::]:0", "192.168.1.10:1883"] {
        let text = format!(
            "data-dir = \"/tmp/unused\"\n[broker]\nmax-inflight = 5\n\n[[broker.listener]]\nbind = \"127.0.0.1:0\"\n\n[[broker.listener]]\nbind = \"{bind}\"\n"
        );
        let e = sensorgate::config::parse(&text, "gw.toml", None)
            .expect_err("an exposed anonymous listener must be refused");
        assert_eq!(e.file, "gw.toml");
        assert_eq!(e.key.as_deref(), Some("broker.listener[1].bind"), "{e}");
        assert_eq!(e.line, Some(9), "{e}");
        assert!(
            e.to_string().contains("allow-anonymous"),
            "the fix is suggested: {e}"
        );
    }
}

#[test]
fn a_non_loopback_listener_with_a_password_file_or_explicit_anonymous_is_accepted() {
    let listener = "[[broker.listener]]\nbind = \"0.0.0.0:0\"\n";
    for broker in [
        "password-file = \"/etc/sensorgate/passwd\"",
        "allow-anonymous = true",
    ] {
        let text = format!("[broker]\n{broker}\n\n{listener}");
        let c = sensorgate::config::parse(&text, "gw.toml", None);
        assert!(c.is_ok(), "{broker}: {:?}", c.err());
    }
    let c = sensorgate::config::parse(
        "[broker]\npassword-file = \"/p\"\n\n[[broker.listener]]\nbind = \"0.0.0.0:0\"\n",
        "gw.toml",
        None,
    )
    .unwrap();
    assert!(
        !c.broker.allow_anonymous,
        "a password file turns anonymous access off"
    );
}

#[tokio::test]
async fn a_loopback_listener_is_anonymous_by_default() {
    let b = TestBroker::start().await;
    let (_c, _) = Raw::connect(b.addr, "local", true).await;
    let mut sub = MosqSub::spawn(b.addr, &["-t", "lo"]).await;
    mosquitto_pub(b.addr, &["-t", "lo", "-m", "open"]).await;
    assert_eq!(sub.next().await.payload, "open");
}
