//! Shared harness for the broker integration tests: a gateway on port 0 in a temp dir, a raw
//! MQTT 3.1.1 client with byte-level control, `mosquitto_sub`/`mosquitto_pub` processes and a
//! rumqttc client. Every wait has a deadline and waits for an event, never for time to pass.
//!
//! `SENSORGATE_TESTS_AGAINST=mosquitto` runs the protocol tests against a real `mosquitto`
//! instead, to check the tests themselves against a reference broker.
#![allow(dead_code)]

pub mod node;
pub mod proxy;
pub mod upstream;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

/// Upper bound for anything that should happen "promptly".
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

pub fn against_mosquitto() -> bool {
    std::env::var("SENSORGATE_TESTS_AGAINST").as_deref() == Ok("mosquitto")
}

// ---------------------------------------------------------------------------------------------
// The broker under test
// ---------------------------------------------------------------------------------------------

enum Running {
    Gateway(sensorgate::Gateway),
    Mosquitto(Child),
}

/// A broker on a free loopback port with its own data directory.
pub struct TestBroker {
    pub addr: SocketAddr,
    running: Option<Running>,
    dir: tempfile::TempDir,
    broker_toml: String,
}

/// The configuration file the tests use: `broker_toml` holds extra `[broker]` keys.
pub fn config_text(data_dir: &Path, broker_toml: &str) -> String {
    format!(
        "data-dir = {:?}\n\n[broker]\n{broker_toml}\n\n[[broker.listener]]\nbind = \"127.0.0.1:0\"\n",
        data_dir.display().to_string()
    )
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::with("").await
    }

    /// Starts with extra `[broker]` keys, e.g. `max-inflight = 5`.
    pub async fn with(broker_toml: &str) -> TestBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut b = TestBroker {
            addr: "127.0.0.1:0".parse().unwrap(),
            running: None,
            dir,
            broker_toml: broker_toml.to_string(),
        };
        b.launch().await;
        b
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    async fn launch(&mut self) {
        if against_mosquitto() {
            let (child, addr) = start_mosquitto(self.dir.path(), &self.broker_toml).await;
            self.addr = addr;
            self.running = Some(Running::Mosquitto(child));
            return;
        }
        let text = config_text(self.dir.path(), &self.broker_toml);
        let config = sensorgate::config::parse(&text, "test.toml", None)
            .unwrap_or_else(|e| panic!("test config rejected: {e}\n{text}"));
        let gw = within("sensorgate::start", sensorgate::start(config))
            .await
            .expect("gateway starts");
        self.addr = gw.local_addrs()[0];
        self.running = Some(Running::Gateway(gw));
    }

    /// Clean stop: sessions and retained messages are saved.
    pub async fn stop(&mut self) {
        match self.running.take() {
            Some(Running::Gateway(gw)) => within("gateway shutdown", gw.shutdown()).await,
            Some(Running::Mosquitto(mut child)) => {
                if let Some(pid) = child.id() {
                    let _ = Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status()
                        .await;
                }
                let _ = within("mosquitto exit", child.wait()).await;
            }
            None => {}
        }
    }

    /// `stop` then start again on the same data directory (the port changes).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// Starts again after `stop` (the data directory can be edited in between).
    pub async fn start_again(&mut self) {
        assert!(self.running.is_none(), "stop it first");
        self.launch().await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(Running::Mosquitto(child)) = &mut self.running {
            let _ = child.start_kill();
        }
    }
}

/// Self-check mode only: a `mosquitto` configured like the gateway would be.
async fn start_mosquitto(dir: &Path, broker_toml: &str) -> (Child, SocketAddr) {
    let port = upstream::free_port();
    let mut conf = format!(
        "user root\nlistener {port} 127.0.0.1\npersistence true\npersistence_location {}/\n\
         persistence_file broker.snapshot\nallow_anonymous true\nlog_dest stderr\n",
        dir.display()
    );
    for line in broker_toml.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"');
        let secs = || v.trim_end_matches('s').to_string();
        let (k, v) = match k.trim() {
            "max-connections" => ("max_connections", v.to_string()),
            "max-packet-size" => ("max_packet_size", v.to_string()),
            "max-inflight" => ("max_inflight_messages", v.to_string()),
            "max-queued" => ("max_queued_messages", v.to_string()),
            "max-keep-alive" => ("max_keepalive", v.to_string()),
            "sys-interval" => ("sys_interval", secs()),
            "snapshot-interval" => ("autosave_interval", secs()),
            "persistence" => ("persistence", v.to_string()),
            "allow-anonymous" => ("allow_anonymous", v.to_string()),
            "password-file" => ("password_file", v.to_string()),
            other => panic!("no mosquitto equivalent for {other}"),
        };
        conf.push_str(&format!("{k} {v}\n"));
    }
    let conf_path = dir.join("mosquitto.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto runs");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    within("mosquitto to listen", async {
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    (child, addr)
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1.1 bytes, written here independently of the broker's codec
// ---------------------------------------------------------------------------------------------

pub mod wire {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;

    pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    pub fn packet(byte0: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![byte0];
        remaining_length(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    pub fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// A CONNECT, with every field under the test's control.
    #[derive(Clone, Debug)]
    pub struct Connect<'a> {
        pub protocol_name: &'a str,
        pub level: u8,
        pub client_id: &'a str,
        pub clean_session: bool,
        pub keep_alive: u16,
        /// topic, payload, QoS, retain
        pub will: Option<(&'a str, &'a [u8], u8, bool)>,
        pub username: Option<&'a str>,
        pub password: Option<&'a [u8]>,
        /// Sets the reserved bit 0 of the connect flags [MQTT-3.1.2-3].
        pub reserved_flag: bool,
    }

    impl Default for Connect<'_> {
        fn default() -> Self {
            Connect {
                protocol_name: "MQTT",
                level: 4,
                client_id: "",
                clean_session: true,
                keep_alive: 60,
                will: None,
                username: None,
                password: None,
                reserved_flag: false,
            }
        }
    }

    impl Connect<'_> {
        pub fn encode(&self) -> Vec<u8> {
            let mut body = Vec::new();
            string(self.protocol_name.as_bytes(), &mut body);
            body.push(self.level);
            let mut flags = 0u8;
            if self.reserved_flag {
                flags |= 0x01;
            }
            if self.clean_session {
                flags |= 0x02;
            }
            if let Some((_, _, qos, retain)) = self.will {
                flags |= 0x04 | (qos << 3);
                if retain {
                    flags |= 0x20;
                }
            }
            if self.password.is_some() {
                flags |= 0x40;
            }
            if self.username.is_some() {
                flags |= 0x80;
            }
            body.push(flags);
            body.extend_from_slice(&self.keep_alive.to_be_bytes());
            string(self.client_id.as_bytes(), &mut body);
            if let Some((topic, payload, _, _)) = self.will {
                string(topic.as_bytes(), &mut body);
                string(payload, &mut body);
            }
            if let Some(u) = self.username {
                string(u.as_bytes(), &mut body);
            }
            if let Some(p) = self.password {
                string(p, &mut body);
            }
            packet(CONNECT << 4, &body)
        }
    }

    /// PUBLISH with raw topic bytes, so tests can send invalid topics.
    pub fn publish_raw(
        topic: &[u8],
        payload: &[u8],
        qos: u8,
        retain: bool,
        dup: bool,
        pid: u16,
    ) -> Vec<u8> {
        let mut byte0 = (PUBLISH << 4) | (qos << 1);
        if retain {
            byte0 |= 0x01;
        }
        if dup {
            byte0 |= 0x08;
        }
        let mut body = Vec::new();
        string(topic, &mut body);
        if qos > 0 {
            body.extend_from_slice(&pid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        packet(byte0, &body)
    }

    pub fn publish(topic: &str, payload: &[u8], qos: u8, retain: bool, pid: u16) -> Vec<u8> {
        publish_raw(topic.as_bytes(), payload, qos, retain, false, pid)
    }

    pub fn ack(kind: u8, pid: u16) -> Vec<u8> {
        let flags = if kind == PUBREL { 0x02 } else { 0 };
        packet((kind << 4) | flags, &pid.to_be_bytes())
    }

    pub fn subscribe(pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        for (f, q) in filters {
            string(f.as_bytes(), &mut body);
            body.push(*q);
        }
        packet((SUBSCRIBE << 4) | 0x02, &body)
    }

    pub fn unsubscribe(pid: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        for f in filters {
            string(f.as_bytes(), &mut body);
        }
        packet((UNSUBSCRIBE << 4) | 0x02, &body)
    }

    pub fn pingreq() -> Vec<u8> {
        vec![PINGREQ << 4, 0]
    }

    pub fn disconnect() -> Vec<u8> {
        vec![DISCONNECT << 4, 0]
    }
}

/// One packet as read off the wire: the first byte and the body after the remaining length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub byte0: u8,
    pub body: Vec<u8>,
}

/// A decoded PUBLISH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pid: u16,
}

impl Pkt {
    pub fn kind(&self) -> u8 {
        self.byte0 >> 4
    }

    /// The packet identifier of an ack, SUBACK or UNSUBACK.
    pub fn pid(&self) -> u16 {
        assert!(self.body.len() >= 2, "no packet id in {self:?}");
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    pub fn publish(&self) -> Msg {
        assert_eq!(self.kind(), wire::PUBLISH, "expected PUBLISH, got {self:?}");
        let qos = (self.byte0 >> 1) & 3;
        let tlen = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8(self.body[2..2 + tlen].to_vec()).expect("UTF-8 topic");
        let mut at = 2 + tlen;
        let mut pid = 0;
        if qos > 0 {
            pid = u16::from_be_bytes([self.body[at], self.body[at + 1]]);
            at += 2;
        }
        Msg {
            topic,
            payload: self.body[at..].to_vec(),
            qos,
            retain: self.byte0 & 1 == 1,
            dup: self.byte0 & 8 == 8,
            pid,
        }
    }
}

/// What a bounded read saw.
#[derive(Debug)]
pub enum Read {
    Packet(Pkt),
    Closed,
    Nothing,
}

/// A raw TCP MQTT client: bytes out, packets in, nothing hidden.
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
    /// Packets read while waiting for a specific ack, served first by `recv`.
    pending: VecDeque<Pkt>,
}

impl Raw {
    pub async fn tcp(addr: SocketAddr) -> Raw {
        let stream = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        Raw::over(stream)
    }

    /// Over a connected socket: either end, so a test can also play the server side.
    pub fn over(stream: TcpStream) -> Raw {
        stream.set_nodelay(true).ok();
        Raw {
            stream,
            buf: Vec::new(),
            closed: false,
            pending: VecDeque::new(),
        }
    }

    /// TCP + CONNECT; returns the client and the CONNACK (session present, return code).
    pub async fn connect_with(addr: SocketAddr, c: &wire::Connect<'_>) -> (Raw, (bool, u8)) {
        let mut raw = Raw::tcp(addr).await;
        raw.send(&c.encode()).await;
        let p = raw.recv().await;
        assert_eq!(p.kind(), wire::CONNACK, "expected CONNACK, got {p:?}");
        assert_eq!(p.body.len(), 2, "CONNACK body is two bytes: {p:?}");
        (raw, (p.body[0] & 1 == 1, p.body[1]))
    }

    /// Connects and asserts CONNACK 0; returns the session-present flag.
    pub async fn connect(addr: SocketAddr, client_id: &str, clean_session: bool) -> (Raw, bool) {
        let c = wire::Connect {
            client_id,
            clean_session,
            ..Default::default()
        };
        let (raw, (sp, code)) = Raw::connect_with(addr, &c).await;
        assert_eq!(code, 0, "CONNACK return code for {client_id:?}");
        (raw, sp)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to broker");
    }

    /// Like `send`, but a connection the broker has closed is not an error.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    fn parse(&mut self) -> Option<Pkt> {
        if self.buf.len() < 2 {
            return None;
        }
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len += (b & 0x7f) as usize * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            assert!(i <= 4, "broker sent a remaining length over four bytes");
        }
        if self.buf.len() < i + len {
            return None;
        }
        let body = self.buf[i..i + len].to_vec();
        let byte0 = self.buf[0];
        self.buf.drain(..i + len);
        Some(Pkt { byte0, body })
    }

    /// Reads one packet, waiting at most `d`.
    pub async fn read_within(&mut self, d: Duration) -> Read {
        if let Some(p) = self.pending.pop_front() {
            return Read::Packet(p);
        }
        self.read_wire_within(d).await
    }

    async fn read_wire_within(&mut self, d: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Some(p) = self.parse() {
                return Read::Packet(p);
            }
            if self.closed {
                return Read::Closed;
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Read::Nothing,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet; fails the test on timeout or close.
    pub async fn recv(&mut self) -> Pkt {
        match self.read_within(WAIT).await {
            Read::Packet(p) => p,
            Read::Closed => panic!("broker closed the connection while a packet was expected"),
            Read::Nothing => panic!("no packet within {WAIT:?}"),
        }
    }

    pub async fn recv_kind(&mut self, kind: u8) -> Pkt {
        let p = self.recv().await;
        assert_eq!(p.kind(), kind, "expected packet type {kind}, got {p:?}");
        p
    }

    /// Waits for the ack `kind` with packet id `pid`; other packets are kept for `recv`.
    pub async fn recv_ack(&mut self, kind: u8, pid: u16) -> Pkt {
        loop {
            let p = match self.read_wire_within(WAIT).await {
                Read::Packet(p) => p,
                Read::Closed => panic!("connection closed waiting for packet type {kind}"),
                Read::Nothing => panic!("no packet type {kind} within {WAIT:?}"),
            };
            if p.kind() == kind {
                assert_eq!(p.pid(), pid, "packet id of packet type {kind}");
                return p;
            }
            assert!(
                p.kind() == wire::PUBLISH || p.kind() == wire::PUBREL,
                "unexpected {p:?} while waiting for packet type {kind}"
            );
            self.pending.push_back(p);
        }
    }

    pub async fn recv_publish(&mut self) -> Msg {
        self.recv_kind(wire::PUBLISH).await.publish()
    }

    /// Asserts the broker closes the connection without sending anything first.
    pub async fn expect_closed(&mut self) {
        match self.read_within(WAIT).await {
            Read::Closed => {}
            Read::Packet(p) => panic!("expected the connection to be closed, got {p:?}"),
            Read::Nothing => panic!("connection still open after {WAIT:?}"),
        }
    }

    /// Asserts the connection gets closed; packets before the close are returned.
    pub async fn expect_closed_after(&mut self) -> Vec<Pkt> {
        let mut seen = Vec::new();
        loop {
            match self.read_within(WAIT).await {
                Read::Closed => return seen,
                Read::Packet(p) => seen.push(p),
                Read::Nothing => panic!("connection still open after {WAIT:?}; saw {seen:?}"),
            }
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool, pid: u16) {
        self.send(&wire::publish(topic, payload, qos, retain, pid))
            .await;
    }

    /// Publishes at `qos` and completes the handshake (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn publish_acked(&mut self, topic: &str, payload: &[u8], qos: u8, pid: u16) {
        self.publish(topic, payload, qos, false, pid).await;
        match qos {
            0 => {}
            1 => {
                self.recv_ack(wire::PUBACK, pid).await;
            }
            _ => {
                self.recv_ack(wire::PUBREC, pid).await;
                self.send(&wire::ack(wire::PUBREL, pid)).await;
                self.recv_ack(wire::PUBCOMP, pid).await;
            }
        }
    }

    /// SUBSCRIBE and wait for its SUBACK; returns the return codes.
    pub async fn subscribe(&mut self, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&wire::subscribe(pid, filters)).await;
        // Messages of earlier subscriptions may come first; they are kept for `recv`.
        let p = self.recv_ack(wire::SUBACK, pid).await;
        p.body[2..].to_vec()
    }

    /// A protocol-level barrier: everything the broker queued for us before it handled our
    /// PINGREQ is returned, in order.
    pub async fn ping_barrier(&mut self) -> Vec<Pkt> {
        self.send(&wire::pingreq()).await;
        let mut before = Vec::new();
        loop {
            let p = self.recv().await;
            if p.kind() == wire::PINGRESP {
                return before;
            }
            before.push(p);
        }
    }

    /// Receives PUBLISHes (acking QoS 1 and 2) until one arrives on `marker_topic`; returns
    /// those before it.
    pub async fn publishes_until(&mut self, marker_topic: &str) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            let m = self.recv_publish().await;
            self.ack_publish(&m).await;
            if m.topic == marker_topic {
                return got;
            }
            got.push(m);
        }
    }

    /// Acks a received PUBLISH: PUBACK for QoS 1; PUBREC, PUBREL, PUBCOMP for QoS 2.
    pub async fn ack_publish(&mut self, m: &Msg) {
        match m.qos {
            1 => self.send(&wire::ack(wire::PUBACK, m.pid)).await,
            2 => {
                self.send(&wire::ack(wire::PUBREC, m.pid)).await;
                let p = self.recv_ack(wire::PUBREL, m.pid).await;
                assert_eq!(p.byte0, 0x62, "PUBREL flags are 0010 [MQTT-3.6.1-1]");
                self.send(&wire::ack(wire::PUBCOMP, m.pid)).await;
            }
            _ => {}
        }
    }

    pub async fn disconnect(mut self) {
        let _ = self.stream.write_all(&wire::disconnect()).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A fresh anonymous raw client that publishes one QoS 1 message and waits for its PUBACK.
pub async fn raw_publish(addr: SocketAddr, topic: &str, payload: &[u8], qos: u8, retain: bool) {
    let (mut c, _) = Raw::connect(addr, "", true).await;
    c.publish(topic, payload, qos, retain, 1).await;
    match qos {
        0 => {
            c.ping_barrier().await;
        }
        1 => assert_eq!(c.recv_kind(wire::PUBACK).await.pid(), 1),
        _ => {
            assert_eq!(c.recv_kind(wire::PUBREC).await.pid(), 1);
            c.send(&wire::ack(wire::PUBREL, 1)).await;
            assert_eq!(c.recv_kind(wire::PUBCOMP).await.pid(), 1);
        }
    }
    c.disconnect().await;
}

// ---------------------------------------------------------------------------------------------
// mosquitto_sub / mosquitto_pub
// ---------------------------------------------------------------------------------------------

/// One message as `mosquitto_sub` printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubLine {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub payload: String,
}

const MSG_PREFIX: &str = "MSG>|";

/// A running `mosquitto_sub`, subscribed (its SUBACK seen) when returned.
pub struct MosqSub {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl MosqSub {
    /// `args` adds to `-h -p -d -F`; give at least one `-t`.
    pub async fn spawn(addr: SocketAddr, args: &[&str]) -> MosqSub {
        let port = addr.port().to_string();
        let fmt = format!("{MSG_PREFIX}%t|%q|%r|%p");
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &port, "-d"])
            .args(["-F", &fmt])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub runs");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut sub = MosqSub { child, lines };
        within("mosquitto_sub to be subscribed", async {
            loop {
                let line = sub.line().await;
                if line.starts_with("Subscribed (mid") {
                    break;
                }
                assert!(
                    !line.starts_with(MSG_PREFIX),
                    "message before SUBACK: {line}"
                );
            }
        })
        .await;
        sub
    }

    async fn line(&mut self) -> String {
        match self.lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => panic!("mosquitto_sub exited"),
            Err(e) => panic!("reading mosquitto_sub: {e}"),
        }
    }

    /// The next message it printed.
    pub async fn next(&mut self) -> SubLine {
        within("a message at mosquitto_sub", async {
            loop {
                let line = self.line().await;
                if let Some(rest) = line.strip_prefix(MSG_PREFIX) {
                    let mut f = rest.splitn(4, '|');
                    let topic = f.next().unwrap().to_string();
                    let qos = f.next().unwrap().parse().unwrap();
                    let retain = f.next().unwrap() == "1";
                    let payload = f.next().unwrap_or("").to_string();
                    return SubLine {
                        topic,
                        qos,
                        retain,
                        payload,
                    };
                }
            }
        })
        .await
    }

    /// Messages until one on `marker_topic` (excluded).
    pub async fn until(&mut self, marker_topic: &str) -> Vec<SubLine> {
        let mut got = Vec::new();
        loop {
            let m = self.next().await;
            if m.topic == marker_topic {
                return got;
            }
            got.push(m);
        }
    }

    /// Waits for the process to end (after `-C` or a disconnect); returns whether it succeeded.
    pub async fn wait(mut self) -> bool {
        within("mosquitto_sub to exit", self.child.wait())
            .await
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// Runs `mosquitto_pub -h -p ARGS` to completion; returns (success, stderr).
pub async fn mosquitto_pub_status(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let port = addr.port().to_string();
    let out = within(
        "mosquitto_pub to finish",
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_pub runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `mosquitto_pub` and asserts it succeeded.
pub async fn mosquitto_pub(addr: SocketAddr, args: &[&str]) {
    let (ok, err) = mosquitto_pub_status(addr, args).await;
    assert!(ok, "mosquitto_pub {args:?} failed: {err}");
}

// ---------------------------------------------------------------------------------------------
// rumqttc
// ---------------------------------------------------------------------------------------------

pub use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

/// A rumqttc client whose event loop runs in a task, with its events in a channel.
pub struct Rumq {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    pending: VecDeque<rumqttc::Publish>,
    task: tokio::task::JoinHandle<()>,
}

pub fn rumq_options(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    o
}

impl Rumq {
    /// Connects with default options (clean session) and waits for CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> Rumq {
        Rumq::connect_with(rumq_options(addr, id)).await
    }

    pub async fn connect_with(opts: MqttOptions) -> Rumq {
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut c = Rumq {
            client,
            events,
            pending: VecDeque::new(),
            task,
        };
        let ack = c
            .next_incoming("CONNACK", |p| matches!(p, Incoming::ConnAck(_)))
            .await;
        if let Incoming::ConnAck(a) = ack {
            assert_eq!(
                a.code,
                rumqttc::ConnectReturnCode::Success,
                "rumqttc CONNACK"
            );
        }
        c
    }

    /// The next incoming packet `want` accepts; PUBLISHes passed over are kept for later.
    pub async fn next_incoming(
        &mut self,
        what: &str,
        want: impl Fn(&Incoming) -> bool,
    ) -> Incoming {
        within(what, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Event::Incoming(p))) => {
                        if want(&p) {
                            return p;
                        }
                        if let Incoming::Publish(m) = p {
                            self.pending.push_back(m);
                        }
                    }
                    Some(Ok(Event::Outgoing(_))) => {}
                    Some(Err(e)) => panic!("rumqttc connection failed waiting for {what}: {e}"),
                    None => panic!("rumqttc event loop ended waiting for {what}"),
                }
            }
        })
        .await
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        match self
            .next_incoming("SUBACK", |p| matches!(p, Incoming::SubAck(_)))
            .await
        {
            Incoming::SubAck(s) => s.return_codes,
            _ => unreachable!(),
        }
    }

    /// Publishes and, for QoS 1 and 2, waits for the final acknowledgement.
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("publish");
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.next_incoming("PUBACK", |p| matches!(p, Incoming::PubAck(_)))
                    .await;
            }
            QoS::ExactlyOnce => {
                self.next_incoming("PUBCOMP", |p| matches!(p, Incoming::PubComp(_)))
                    .await;
            }
        }
    }

    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        if let Some(m) = self.pending.pop_front() {
            return m;
        }
        match self
            .next_incoming("PUBLISH", |p| matches!(p, Incoming::Publish(_)))
            .await
        {
            Incoming::Publish(m) => m,
            _ => unreachable!(),
        }
    }

    /// PUBLISHes until one on `marker_topic` (excluded).
    pub async fn publishes_until(&mut self, marker_topic: &str) -> Vec<rumqttc::Publish> {
        let mut got = Vec::new();
        loop {
            let m = self.next_publish().await;
            if m.topic == marker_topic {
                return got;
            }
            got.push(m);
        }
    }

    /// Waits for the connection to end with an error (e.g. the broker closed it).
    pub async fn wait_for_error(&mut self) -> String {
        within("the rumqttc connection to fail", async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Event::Incoming(Incoming::Publish(m)))) => self.pending.push_back(m),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return e,
                    None => return "event loop ended".to_string(),
                }
            }
        })
        .await
    }
}

impl Drop for Rumq {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// $SYS
// ---------------------------------------------------------------------------------------------

/// Watches `$SYS/broker/#` and keeps the latest value of each topic.
pub struct SysWatch {
    sub: MosqSub,
    pub latest: HashMap<String, String>,
}

impl SysWatch {
    pub async fn start(addr: SocketAddr) -> SysWatch {
        SysWatch {
            sub: MosqSub::spawn(addr, &["-t", "$SYS/broker/#"]).await,
            latest: HashMap::new(),
        }
    }

    /// Waits until `topic`'s value satisfies `ok`; returns that value.
    pub async fn until(&mut self, topic: &str, ok: impl Fn(&str) -> bool) -> String {
        if let Some(v) = self.latest.get(topic) {
            if ok(v) {
                return v.clone();
            }
        }
        let what = format!("{topic} to reach the expected value");
        within(&what, async {
            loop {
                let m = self.sub.next().await;
                let hit = m.topic == topic && ok(&m.payload);
                self.latest.insert(m.topic.clone(), m.payload.clone());
                if hit {
                    return m.payload;
                }
            }
        })
        .await
    }

    /// Waits until `topic` is published with a number satisfying `ok`.
    pub async fn until_number(&mut self, topic: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let v = self
            .until(topic, |v| number(v).map(&ok).unwrap_or(false))
            .await;
        number(&v).unwrap()
    }

    /// The next published value of `topic`, newer than any seen so far.
    pub async fn next_number(&mut self, topic: &str) -> f64 {
        let what = format!("a new value of {topic}");
        let v = within(&what, async {
            loop {
                let m = self.sub.next().await;
                self.latest.insert(m.topic.clone(), m.payload.clone());
                if m.topic == topic {
                    return m.payload;
                }
            }
        })
        .await;
        number(&v).unwrap_or_else(|| panic!("{topic} is not a number: {v:?}"))
    }
}

/// The leading number of a `$SYS` value: `42`, `3.5` or mosquitto's `12 seconds`.
pub fn number(v: &str) -> Option<f64> {
    v.split_whitespace().next()?.parse().ok()
}

/// The data directory's entries, by name.
pub fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}
