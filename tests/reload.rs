//! Configuration reload: mappings, nodes and ports change while local MQTT clients stay
//! connected and the outbox keeps its records; an invalid file changes nothing.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use sensorgate_wire as wire;
use tokio::io::AsyncWriteExt;
use tokio_serial::{SerialPort, SerialStream};

const WAIT: Duration = Duration::from_secs(10);

struct Pty {
    master: SerialStream,
    _slave: SerialStream,
    path: String,
}

fn pty() -> Pty {
    let (master, slave) = SerialStream::pair().expect("pty");
    let path = slave.name().expect("path");
    Pty {
        master,
        _slave: slave,
        path,
    }
}

fn readings_frame(node: u32, seq: u32, value: i32) -> Vec<u8> {
    let r = wire::Readings::from_slice(&[wire::Reading::new(0, value, -1)]).unwrap();
    let f = wire::Frame::new(wire::Header::new(node, 1, seq), wire::Body::Readings(r));
    let mut buf = [0u8; wire::MAX_FRAME];
    wire::encode(&f, &mut buf).unwrap().to_vec()
}

fn config(dir: &std::path::Path, ports: &[(&str, &str)], topic: &str, extra: &str) -> String {
    let mut t = format!(
        "data-dir = \"{}\"\ngateway-id = \"gw\"\n[[broker.listener]]\nbind = \"127.0.0.1:0\"\n",
        dir.join("data").display()
    );
    for (name, path) in ports {
        t.push_str(&format!("[[port]]\nname = \"{name}\"\npath = \"{path}\"\n"));
    }
    t.push_str(&format!("[mapping]\ndefault-topic = \"{topic}\"\n{extra}"));
    t
}

async fn subscriber(gw: &sensorgate::Gateway) -> (AsyncClient, EventLoop) {
    let addr = gw.local_addrs()[0];
    let opts = MqttOptions::new("watcher", addr.ip().to_string(), addr.port());
    let (client, mut events) = AsyncClient::new(opts, 100);
    client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = tokio::time::timeout(WAIT, events.poll())
            .await
            .unwrap()
            .unwrap()
        {
            return (client, events);
        }
    }
}

/// The next live reading: not under `$SYS`, not the gateway's own `sensorgate/...` status.
async fn next(events: &mut EventLoop) -> (String, String) {
    loop {
        match tokio::time::timeout(WAIT, events.poll())
            .await
            .expect("in time")
            .expect("still connected")
        {
            Event::Incoming(Packet::Publish(p))
                if !p.topic.starts_with('$')
                    && !p.topic.starts_with("sensorgate/")
                    && !p.retain =>
            {
                return (
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                );
            }
            Event::Incoming(Packet::ConnAck(_)) => {
                panic!("the client was disconnected and reconnected")
            }
            _ => {}
        }
    }
}

async fn opened(gw: &sensorgate::Gateway, name: &str, n: u64) {
    let stats = gw
        .port_stats()
        .into_iter()
        .find(|(p, _)| p == name)
        .expect("port exists")
        .1;
    let mut rx = stats.opened.subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|&o| o >= n))
        .await
        .expect("opens in time")
        .unwrap();
}

#[tokio::test]
async fn a_reload_changes_mapping_and_ports_while_clients_stay_connected() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = (pty(), pty());
    let first = config(dir.path(), &[("a", &a.path)], "old/{node}/{quantity}", "");
    let mut gw = sensorgate::start(sensorgate::config::parse(&first, "gw.toml", None).unwrap())
        .await
        .unwrap();
    opened(&gw, "a", 1).await;
    let (_client, mut events) = subscriber(&gw).await;
    a.master
        .write_all(&readings_frame(1, 1, 200))
        .await
        .unwrap();
    assert_eq!(
        next(&mut events).await,
        ("old/1/channel0".into(), "20.0".into())
    );

    let second = config(
        dir.path(),
        &[("a", &a.path), ("b", &b.path)],
        "new/{port}/{node}",
        "",
    );
    let report = gw
        .reload(sensorgate::config::parse(&second, "gw.toml", None).unwrap())
        .await
        .unwrap();
    assert!(report.mapping_changed);
    assert_eq!(report.ports_added, vec!["b".to_string()]);
    assert!(report.ports_restarted.is_empty() && report.ports_removed.is_empty());
    opened(&gw, "b", 1).await;
    let a_stats = gw
        .port_stats()
        .into_iter()
        .find(|(p, _)| p == "a")
        .unwrap()
        .1;
    assert_eq!(
        a_stats.opens.load(Relaxed),
        1,
        "an unchanged port is not reopened"
    );

    a.master
        .write_all(&readings_frame(1, 2, 210))
        .await
        .unwrap();
    assert_eq!(next(&mut events).await, ("new/a/1".into(), "21.0".into()));
    b.master
        .write_all(&readings_frame(2, 1, 220))
        .await
        .unwrap();
    assert_eq!(next(&mut events).await, ("new/b/2".into(), "22.0".into()));

    // Port a removed: the next reload stops it.
    let third = config(dir.path(), &[("b", &b.path)], "new/{port}/{node}", "");
    let report = gw
        .reload(sensorgate::config::parse(&third, "gw.toml", None).unwrap())
        .await
        .unwrap();
    assert_eq!(report.ports_removed, vec!["a".to_string()]);
    assert_eq!(gw.port_stats().len(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_invalid_file_is_refused_and_the_running_configuration_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = pty();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        config(dir.path(), &[("a", &a.path)], "kept/{node}", ""),
    )
    .unwrap();
    let mut gw = sensorgate::start(sensorgate::config::load(&path).unwrap())
        .await
        .unwrap();
    opened(&gw, "a", 1).await;
    let (_client, mut events) = subscriber(&gw).await;
    std::fs::write(
        &path,
        config(dir.path(), &[("a", &a.path)], "broken/{nodes}", ""),
    )
    .unwrap();
    assert!(
        sensorgate::reload_from_file(&mut gw).await.is_none(),
        "the bad file is refused"
    );
    a.master
        .write_all(&readings_frame(1, 1, 200))
        .await
        .unwrap();
    assert_eq!(next(&mut events).await.0, "kept/1");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_reload_of_the_upstream_keeps_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port: messages wait in the outbox.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let up = |prefix: &str| {
        format!(
            "[upstream]\nurl = \"mqtt://127.0.0.1:{closed}\"\nreconnect-min = \"50ms\"\n[[upstream.out]]\nfilter = \"t/#\"\nremote-prefix = \"{prefix}\"\n[outbox]\ncommit-delay = \"5ms\"\n"
        )
    };
    let text = |prefix: &str| {
        format!(
            "data-dir = \"{}\"\n[[broker.listener]]\nbind = \"127.0.0.1:0\"\n{}",
            dir.path().join("data").display(),
            up(prefix)
        )
    };
    let mut gw =
        sensorgate::start(sensorgate::config::parse(&text("one/"), "gw.toml", None).unwrap())
            .await
            .unwrap();
    let handle = gw.broker();
    for i in 0..5 {
        let done = handle
            .publish_durable(
                "t/x",
                format!("{i}"),
                sensorgate::broker::codec::QoS::AtLeastOnce,
                false,
                None,
            )
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(WAIT, done).await.unwrap().unwrap(),
            "committed"
        );
    }
    assert_eq!(gw.outbox().unwrap().stats().depth, 5);
    let report = gw
        .reload(sensorgate::config::parse(&text("two/"), "gw.toml", None).unwrap())
        .await
        .unwrap();
    assert!(report.upstream_changed);
    assert_eq!(
        gw.outbox().unwrap().stats().depth,
        5,
        "nothing lost across the reload"
    );
    let done = handle
        .publish_durable(
            "t/x",
            "5",
            sensorgate::broker::codec::QoS::AtLeastOnce,
            false,
            None,
        )
        .await
        .unwrap();
    assert!(tokio::time::timeout(WAIT, done).await.unwrap().unwrap());
    let records = sensorgate::outbox::inspect(dir.path().join("data/outbox"))
        .unwrap()
        .pending;
    let topics: Vec<&str> = records.iter().map(|p| p.record.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "one/t/x", "one/t/x", "one/t/x", "one/t/x", "one/t/x", "two/t/x"
        ]
    );
    gw.shutdown().await;
}
