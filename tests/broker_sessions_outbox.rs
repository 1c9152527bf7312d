//! With an outbox (an upstream is configured), a persistent session's subscriptions are
//! committed to it before SUBACK: a session recovered after a crash that the broker snapshot
//! had not caught up with still has every subscription it confirmed. The snapshot is turned
//! off here (`persistence = false`), so only the outbox can bring the session back.

mod common;

use common::Raw;
use common::upstream::{gateway_toml, start_gateway};

const RULES: &str = r#"
[[upstream.out]]
filter = "sensors/#"
qos = 1
"#;

fn config(dir: &std::path::Path) -> String {
    // Nothing listens on port 1: the upstream stays away, the outbox is there.
    let text = gateway_toml(
        &dir.join("data"),
        "127.0.0.1:0",
        "mqtt://127.0.0.1:1",
        "",
        RULES,
        "",
    );
    format!("{text}\n[broker]\npersistence = false\n")
}

#[tokio::test]
async fn mqtt_3_1_2_4_subscriptions_confirmed_by_suback_survive_a_restart_without_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path());

    let gw = start_gateway(&text).await;
    let (mut keeper, present) = Raw::connect(gw.local_addrs()[0], "keeper", false).await;
    assert!(!present);
    keeper.subscribe(1, &[("alerts/#", 1)]).await;
    assert!(
        gw.outbox().unwrap().state("subs/keeper").is_some(),
        "SUBACK came before the subscription was in the outbox"
    );
    keeper.disconnect().await;
    gw.shutdown().await;

    // Restarted without a snapshot: the session and its subscription come from the outbox.
    let gw = start_gateway(&text).await;
    let local = gw.local_addrs()[0];
    let (mut keeper, present) = Raw::connect(local, "keeper", false).await;
    assert!(
        present,
        "the persistent session did not survive the restart"
    );
    let (mut other, _) = Raw::connect(local, "other", true).await;
    other.publish_acked("alerts/door", b"open", 1, 1).await;
    let m = keeper.recv_publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("alerts/door", &b"open"[..])
    );
    keeper.ack_publish(&m).await;
    keeper.disconnect().await;

    // A clean-session connect discards the session, durably too.
    let (discard, _) = Raw::connect(local, "keeper", true).await;
    discard.disconnect().await;
    gw.shutdown().await;
    let gw = start_gateway(&text).await;
    let (keeper, present) = Raw::connect(gw.local_addrs()[0], "keeper", false).await;
    assert!(!present, "a discarded session came back");
    keeper.disconnect().await;
    gw.shutdown().await;
}
