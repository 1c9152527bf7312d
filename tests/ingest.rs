//! Serial ingest end to end: real pseudo-terminals as serial ports, real frames in, a real MQTT
//! subscriber (rumqttc) asserting topics and payloads out.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use sensorgate_wire as wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialStream;

use common::node::{Pty, frame, hello, pty_at, readings};

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    gw: sensorgate::Gateway,
    _dir: tempfile::TempDir,
    link: PathBuf,
}

async fn start(extra: &str, protocol: &str) -> (Setup, Pty) {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("ttyNODE");
    let pty = pty_at(&link);
    let text = format!(
        r#"
data-dir = "{data}"
gateway-id = "gw1"
[broker]
sys-interval = "1s"
[[broker.listener]]
bind = "127.0.0.1:0"
[[port]]
name = "p1"
path = "{link}"
protocol = "{protocol}"
[[node]]
id = 17
name = "kitchen"
room = "room"
[mapping]
[[mapping.rule]]
quantity = "temperature"
topic = "sensors/{{room}}/{{node}}/temp"
{extra}
"#,
        data = dir.path().join("data").display(),
        link = link.display(),
    );
    let config = sensorgate::config::parse(&text, "test.toml", None).expect("valid config");
    let gw = sensorgate::start(config).await.expect("starts");
    let stats = gw.port_stats()[0].1.clone();
    wait_opens(&stats, 1).await;
    (
        Setup {
            gw,
            _dir: dir,
            link,
        },
        pty,
    )
}

async fn wait_opens(stats: &Arc<sensorgate::ingest::PortStats>, n: u64) {
    let mut rx = stats.opened.subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|&opens| opens >= n))
        .await
        .expect("port opens in time")
        .expect("open");
}

async fn subscriber(gw: &sensorgate::Gateway, filter: &str) -> (AsyncClient, EventLoop) {
    let addr = gw.local_addrs()[0];
    let mut opts = MqttOptions::new(
        format!("sub-{}", addr.port()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 100);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        match tokio::time::timeout(WAIT, events.poll())
            .await
            .expect("suback in time")
            .expect("connected")
        {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    (client, events)
}

/// The next live PUBLISH as (topic, payload); retained messages sent on subscribe are skipped.
async fn next_publish(events: &mut EventLoop) -> (String, String) {
    loop {
        match tokio::time::timeout(WAIT, events.poll())
            .await
            .expect("a message in time")
            .expect("connection")
        {
            Event::Incoming(Packet::Publish(p)) if !p.retain => {
                return (
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                );
            }
            _ => continue,
        }
    }
}

/// Reads frames the gateway wrote back to the node until one is an ack.
/// Reads frames the gateway wrote back to the node until `pick` accepts one.
async fn next_frame<T>(master: &mut SerialStream, pick: impl Fn(wire::Frame) -> Option<T>) -> T {
    let mut acc = wire::Accumulator::new();
    let mut buf = [0u8; 256];
    loop {
        let n = tokio::time::timeout(WAIT, master.read(&mut buf))
            .await
            .expect("a frame from the gateway in time")
            .expect("read");
        for d in acc.feed_iter(&buf[..n]) {
            if let Some(t) = d.result.ok().and_then(&pick) {
                return t;
            }
        }
    }
}

async fn next_ack(master: &mut SerialStream) -> wire::Ack {
    next_frame(master, |f| match f.body {
        wire::Body::Ack(ack) => Some(ack),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn frames_from_a_serial_port_reach_an_mqtt_subscriber_and_are_acknowledged() {
    let (s, mut pty) = start("", "sensorgate").await;
    let (_c, mut events) = subscriber(&s.gw, "sensors/#").await;

    pty.master
        .write_all(&frame(17, 9, 1, hello()))
        .await
        .unwrap();
    pty.master
        .write_all(&frame(17, 9, 2, readings(&[(0, 215, -1), (1, 4800, -2)])))
        .await
        .unwrap();

    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/room/17/temp".into(), "21.5".into())
    );
    // No rule for humidity: the default template, with the sender's two decimals kept.
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/kitchen/humidity".into(), "48.00".into())
    );
    let ack = next_ack(&mut pty.master).await;
    assert_eq!((ack.of.boot_id, ack.of.seq), (9, 2));
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_retransmitted_frame_is_published_once_and_acknowledged_again() {
    let (s, mut pty) = start("", "sensorgate").await;
    let (_c, mut events) = subscriber(&s.gw, "sensors/#").await;
    let first = frame(17, 9, 5, readings(&[(0, 200, -1)]));
    pty.master.write_all(&first).await.unwrap();
    assert_eq!(next_publish(&mut events).await.1, "20.0");
    assert_eq!(next_ack(&mut pty.master).await.of.seq, 5);

    pty.master.write_all(&first).await.unwrap();
    assert_eq!(
        next_ack(&mut pty.master).await.of.seq,
        5,
        "the duplicate is acknowledged again"
    );
    // Barrier: the next new frame must be the next message the subscriber sees.
    pty.master
        .write_all(&frame(17, 9, 6, readings(&[(0, 201, -1)])))
        .await
        .unwrap();
    assert_eq!(next_publish(&mut events).await.1, "20.1");
    assert_eq!(
        s.gw.port_stats()[0]
            .1
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    s.gw.shutdown().await;
}

#[tokio::test]
async fn garbage_and_corrupt_frames_are_counted_and_the_next_frame_still_arrives() {
    let (s, mut pty) = start("", "sensorgate").await;
    let (_c, mut events) = subscriber(&s.gw, "sensors/#").await;
    let mut corrupt = frame(17, 9, 1, readings(&[(0, 100, -1)]));
    corrupt[3] ^= 0x08;
    pty.master
        .write_all(&frame(17, 9, 0, hello()))
        .await
        .unwrap();
    pty.master
        .write_all(b"\x13\x37 line noise \xff\xfe\x00")
        .await
        .unwrap();
    pty.master.write_all(&corrupt).await.unwrap();
    pty.master
        .write_all(&frame(17, 9, 2, readings(&[(0, 222, -1)])))
        .await
        .unwrap();
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/room/17/temp".into(), "22.2".into())
    );
    let stats = &s.gw.port_stats()[0].1;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        stats.frames.load(Relaxed),
        2,
        "the hello and the good readings"
    );
    assert_eq!(
        stats.errors_crc.load(Relaxed) + stats.errors_framing.load(Relaxed),
        2
    );
    assert_eq!(
        stats.bytes.load(Relaxed),
        stats.bytes_accounted.load(Relaxed),
        "every byte is accounted for"
    );
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_port_that_vanishes_is_reopened_when_it_comes_back() {
    let (s, pty) = start("", "sensorgate").await;
    let (_c, mut events) = subscriber(&s.gw, "sensors/#").await;
    let stats = s.gw.port_stats()[0].1.clone();
    // Unplug: the pseudo-terminal goes away and the link dangles.
    drop(pty);
    let _ = std::fs::remove_file(&s.link);
    // Plug back in: a new device behind the same link.
    let mut pty = pty_at(&s.link);
    wait_opens(&stats, 2).await;
    pty.master
        .write_all(&frame(17, 9, 1, readings(&[(0, 190, -1)])))
        .await
        .unwrap();
    assert_eq!(next_publish(&mut events).await.1, "19.0");
    s.gw.shutdown().await;
}

#[tokio::test]
async fn port_counters_are_published_under_sys() {
    let (s, mut pty) = start("", "sensorgate").await;
    let (_c, mut events) = subscriber(&s.gw, "$SYS/sensorgate/ports/p1/frames").await;
    pty.master
        .write_all(&frame(17, 9, 1, readings(&[(0, 190, -1)])))
        .await
        .unwrap();
    loop {
        let (topic, payload) = next_publish(&mut events).await;
        assert_eq!(topic, "$SYS/sensorgate/ports/p1/frames");
        if payload == "1" {
            break;
        }
    }
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_restart_remembers_nodes_and_does_not_forward_a_retransmit_twice() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("tty");
    let data = dir.path().join("data");
    let text = format!(
        "data-dir = \"{}\"\n[[broker.listener]]\nbind = \"127.0.0.1:0\"\n[[port]]\nname = \"p1\"\npath = \"{}\"\n",
        data.display(),
        link.display()
    );
    let f1 = frame(5, 1, 1, readings(&[(0, 100, 0)]));
    {
        let mut pty = pty_at(&link);
        let gw = sensorgate::start(sensorgate::config::parse(&text, "t.toml", None).unwrap())
            .await
            .unwrap();
        wait_opens(&gw.port_stats()[0].1, 1).await;
        pty.master
            .write_all(&frame(5, 1, 0, hello()))
            .await
            .unwrap();
        pty.master.write_all(&f1).await.unwrap();
        assert_eq!(next_ack(&mut pty.master).await.of.seq, 1);
        gw.shutdown().await;
    }
    let mut pty = pty_at(&link);
    let gw = sensorgate::start(sensorgate::config::parse(&text, "t.toml", None).unwrap())
        .await
        .unwrap();
    wait_opens(&gw.port_stats()[0].1, 1).await;
    let (_c, mut events) = subscriber(&gw, "sensors/#").await;
    pty.master.write_all(&f1).await.unwrap();
    assert_eq!(next_ack(&mut pty.master).await.of.seq, 1);
    pty.master
        .write_all(&frame(5, 1, 2, readings(&[(0, 101, 0)])))
        .await
        .unwrap();
    // The quantity is known from the Hello before the restart; seq 1 is not republished.
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/5/temperature".into(), "101".into())
    );
    gw.shutdown().await;
}

async fn next_command(master: &mut SerialStream) -> wire::Frame {
    next_frame(master, |f| {
        matches!(f.body, wire::Body::Command(_)).then_some(f)
    })
    .await
}

#[tokio::test]
async fn a_command_published_over_mqtt_reaches_the_node_and_its_ack_comes_back() {
    let (s, mut pty) = start("", "sensorgate").await;
    let (_client, mut events) = subscriber(&s.gw, "sensorgate/gw1/nodes/17/command-result").await;
    // The gateway learns where node 17 is from its frames; the ack shows it was processed.
    pty.master
        .write_all(&frame(17, 9, 0, hello()))
        .await
        .unwrap();
    pty.master
        .write_all(&frame(17, 9, 1, readings(&[(0, 215, -1)])))
        .await
        .unwrap();
    assert_eq!(next_ack(&mut pty.master).await.of.seq, 1);
    // An independent client sends the command.
    let port = s.gw.local_addrs()[0].port().to_string();
    let status = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "sensorgate/gw1/nodes/17/set/interval",
            "-m",
            "30",
        ])
        .status()
        .await
        .expect("mosquitto_pub runs");
    assert!(status.success());
    let cmd = next_command(&mut pty.master).await;
    assert_eq!(cmd.header.node_id, 17);
    assert_eq!(
        cmd.body,
        wire::Body::Command(wire::Command::SetReportInterval { seconds: 30 })
    );
    // The node answers with an ack of the command's (boot id, seq).
    let ack = wire::Body::Ack(wire::Ack::accepted(cmd.header.frame_ref()));
    pty.master.write_all(&frame(17, 9, 2, ack)).await.unwrap();
    let (topic, payload) = next_publish(&mut events).await;
    assert_eq!(topic, "sensorgate/gw1/nodes/17/command-result");
    assert_eq!(
        payload,
        format!(
            "{{\"seq\":{},\"command\":\"interval\",\"accepted\":true}}",
            cmd.header.seq
        )
    );
    s.gw.shutdown().await;
}

#[tokio::test]
async fn readings_from_an_unknown_channel_make_the_gateway_ask_for_a_hello() {
    let (s, mut pty) = start("", "sensorgate").await;
    pty.master
        .write_all(&frame(44, 3, 1, readings(&[(0, 1, 0)])))
        .await
        .unwrap();
    let cmd = next_command(&mut pty.master).await;
    assert_eq!(cmd.header.node_id, 44);
    assert_eq!(cmd.body, wire::Body::Command(wire::Command::SendHello));
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_lines_port_publishes_key_value_and_json_lines() {
    let (s, mut pty) = start("", "lines").await;
    let (_c, mut events) = subscriber(&s.gw, "sensors/#").await;
    pty.master
        .write_all(b"node=17 temperature=21.50 hum=48\r\n")
        .await
        .unwrap();
    pty.master
        .write_all(b"{\"node\":\"boiler\",\"pressure\":1.2}\n")
        .await
        .unwrap();
    pty.master
        .write_all(b"this is not a reading\n# a comment\n")
        .await
        .unwrap();
    pty.master
        .write_all(b"node=17 temperature=22.00\n")
        .await
        .unwrap();
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/room/17/temp".into(), "21.50".into())
    );
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/kitchen/hum".into(), "48".into())
    );
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/boiler/pressure".into(), "1.2".into())
    );
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/room/17/temp".into(), "22.00".into())
    );
    let stats = &s.gw.port_stats()[0].1;
    assert_eq!(
        stats
            .errors_undecodable
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_mysensors_port_uses_presentations_and_publishes_sets() {
    let (s, mut pty) = start("", "mysensors").await;
    let (_c, mut events) = subscriber(&s.gw, "sensors/#").await;
    let capture = b"0;255;3;0;14;Gateway startup complete.\n\
17;255;0;0;17;2.3.2\n\
17;0;0;0;6;Kitchen temperature\n\
17;1;0;0;7;Kitchen humidity\n\
17;0;1;0;0;21.5\n\
17;1;1;0;1;48.2\n\
17;x;1;0;0;oops\n\
17;0;1;0;0;21.7\n";
    pty.master.write_all(capture).await.unwrap();
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/room/17/temp".into(), "21.5".into())
    );
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/kitchen/humidity".into(), "48.2".into())
    );
    assert_eq!(
        next_publish(&mut events).await,
        ("sensors/room/17/temp".into(), "21.7".into())
    );
    let stats = &s.gw.port_stats()[0].1;
    assert_eq!(
        stats
            .errors_undecodable
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    s.gw.shutdown().await;
}

/// Reads acknowledgements until every sequence number in `seqs` was acknowledged.
async fn acks_for(
    master: &mut (impl tokio::io::AsyncRead + Unpin),
    mut seqs: std::collections::BTreeSet<u32>,
) {
    let mut acc = wire::Accumulator::new();
    let mut buf = [0u8; 4096];
    while !seqs.is_empty() {
        let n = tokio::time::timeout(WAIT, master.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{} frames still unacknowledged", seqs.len()))
            .expect("read");
        for d in acc.feed_iter(&buf[..n]) {
            if let Ok(wire::Frame {
                body: wire::Body::Ack(ack),
                ..
            }) = d.result
            {
                seqs.remove(&ack.of.seq);
            }
        }
    }
}

#[tokio::test]
async fn a_busy_port_is_read_on_the_tick_and_loses_nothing_then_a_lone_frame_still_arrives() {
    let (s, mut pty) = start("", "sensorgate").await;
    // Inside the gateway, with room for every message (an MQTT client this slow would see
    // the broker's bounded queue drop some, by design).
    let mut sub =
        s.gw.broker()
            .subscribe("sensors/room/#", 4096)
            .await
            .expect("subscribe");
    let (_c, mut events) = subscriber(&s.gw, "sensors/room/#").await;
    let stats = s.gw.port_stats()[0].1.clone();
    // 2,000 frames, one write each, back to back: far closer together than a quiet port's,
    // so the port is polled on the tick for most of them.
    let (mut rd, mut wr) = tokio::io::split(pty.master);
    let writer = tokio::spawn(async move {
        wr.write_all(&frame(17, 3, 0, hello())).await.unwrap();
        for seq in 1..=2000u32 {
            wr.write_all(&frame(
                17,
                3,
                seq,
                readings(&[(0, seq as i32, -1), (1, 5000, -2)]),
            ))
            .await
            .unwrap();
        }
        wr
    });
    let (_, _) = tokio::join!(acks_for(&mut rd, (1..=2000).collect()), async {
        // The temperatures arrive in order, each once.
        for seq in 1..=2000u32 {
            let m = tokio::time::timeout(WAIT, sub.recv())
                .await
                .expect("a message in time")
                .expect("subscribed");
            let (topic, payload) = (m.topic, String::from_utf8_lossy(&m.payload).into_owned());
            assert_eq!(topic, "sensors/room/17/temp");
            assert_eq!(payload, format!("{}.{}", seq / 10, seq % 10), "frame {seq}");
        }
    });
    let wr = writer.await.unwrap();
    // The Hello and the 2,000.
    assert_eq!(
        stats.frames.load(std::sync::atomic::Ordering::Relaxed),
        2001
    );
    assert!(
        stats
            .busy_periods
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "the flood made the port busy"
    );
    // Quiet again, the port goes back to reading each frame as it arrives.
    tokio::time::timeout(WAIT, stats.polled.subscribe().wait_for(|polled| !polled))
        .await
        .expect("the port is watched again after a quiet second")
        .expect("port running");
    // A lone frame afterwards is read and acknowledged too (the MQTT client sees it after
    // what it was sent of the flood).
    pty.master = rd.unsplit(wr);
    pty.master
        .write_all(&frame(17, 3, 2001, readings(&[(0, 123, -1)])))
        .await
        .unwrap();
    while next_publish(&mut events).await.1 != "12.3" {}
    assert_eq!(next_ack(&mut pty.master).await.of.seq, 2001);
    s.gw.shutdown().await;
}

#[tokio::test]
async fn a_busy_port_that_vanishes_is_reopened() {
    let (s, pty) = start("", "sensorgate").await;
    let (_c, mut events) = subscriber(&s.gw, "sensors/room/#").await;
    let stats = s.gw.port_stats()[0].1.clone();
    let mut master = pty.master;
    master.write_all(&frame(17, 4, 0, hello())).await.unwrap();
    for seq in 1..=300u32 {
        master
            .write_all(&frame(17, 4, seq, readings(&[(0, 100, -1)])))
            .await
            .unwrap();
    }
    acks_for(&mut master, (1..=300).collect()).await;
    // Unplugged while busy.
    drop(master);
    drop(pty.slave);
    let _ = std::fs::remove_file(&s.link);
    let mut pty = pty_at(&s.link);
    wait_opens(&stats, 2).await;
    pty.master
        .write_all(&frame(17, 5, 1, readings(&[(0, 190, -1)])))
        .await
        .unwrap();
    // The 300 readings before (the subscriber was not read meanwhile), then this one.
    loop {
        if next_publish(&mut events).await.1 == "19.0" {
            break;
        }
    }
    assert_eq!(next_ack(&mut pty.master).await.of.seq, 1);
    s.gw.shutdown().await;
}
