//! The real `sensorgate` binary under a stand-in for systemd: a Unix datagram socket named by
//! `NOTIFY_SOCKET` receives READY=1, STATUS= and WATCHDOG=1; `sensorgate status` and the
//! Prometheus endpoint read the running gateway. Every wait is for an event, with a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

struct Running {
    child: Child,
    mqtt: String,
    metrics: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary and reads its log until both listeners are announced.
fn start(
    dir: &std::path::Path,
    socket: &std::path::Path,
    watchdog_usec: &str,
    extra: &str,
) -> Running {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "gateway-id = \"test-gw\"\ndata-dir = {:?}\n[broker]\nsys-interval = \"100ms\"\n\
             [[broker.listener]]\nbind = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", watchdog_usec)
        .env("RUST_LOG", "info")
        .env_remove("WATCHDOG_PID")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sensorgate runs");
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let (mut mqtt, mut metrics) = (None, None);
    let mut line = String::new();
    while mqtt.is_none() || metrics.is_none() {
        line.clear();
        if log.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("sensorgate exited before listening");
        }
        let addr = line.split("addr=").nth(1).map(|a| a.trim().to_string());
        if line.contains("MQTT broker listening") {
            mqtt = addr;
        } else if line.contains("Prometheus metrics") {
            metrics = addr;
        }
    }
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    Running {
        child,
        mqtt: mqtt.unwrap(),
        metrics: metrics.unwrap(),
    }
}

/// Receives datagrams until `pred` holds for one, or the deadline passes.
fn receive_until(socket: &UnixDatagram, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + DEADLINE;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        socket.set_read_timeout(Some(left)).unwrap();
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if pred(&msg) {
            return msg;
        }
    }
}

#[test]
fn the_gateway_tells_systemd_it_is_ready_and_pings_the_watchdog_while_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    // 400 ms: pings every 200 ms, so a few arrive quickly. The port's device is missing, so
    // the port task keeps retrying and the pipeline keeps running and ticking.
    let missing = dir.path().join("ttyUSB-unplugged");
    let port = format!(
        "[[port]]\nname = \"usb0\"\npath = {:?}\n",
        missing.display().to_string()
    );
    let mut gw = start(dir.path(), &path, "400000", &port);

    let ready = receive_until(&socket, "READY=1", |m| m.lines().any(|l| l == "READY=1"));
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("READY=1 comes with a STATUS= line");
    assert_eq!(
        status,
        "0/0 nodes online, 0/1 ports open, uplink not-configured"
    );

    for i in 0..5 {
        receive_until(&socket, &format!("watchdog ping {i}"), |m| {
            m.lines().any(|l| l == "WATCHDOG=1")
        });
    }

    // SIGTERM: systemd's stop.
    let pid = gw.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    receive_until(&socket, "STOPPING=1", |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    let end = Instant::now() + DEADLINE;
    let code = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "sensorgate did not exit after SIGTERM"
        );
        std::thread::yield_now();
    };
    assert!(code.success(), "{code:?}");
}

#[test]
fn sensorgate_status_and_the_metrics_endpoint_read_a_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let gw = start(dir.path(), &path, "0", "");
    receive_until(&socket, "READY=1", |m| m.lines().any(|l| l == "READY=1"));

    let port = gw.mqtt.rsplit(':').next().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["status", "--port", port])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("gateway  test-gw (online, sensorgate "),
        "{text}"
    );
    assert!(text.contains("uplink   not-configured\n"), "{text}");
    assert!(text.contains("no serial ports configured"), "{text}");
    assert!(text.contains("no nodes heard yet"), "{text}");

    let mut http = std::net::TcpStream::connect(&gw.metrics).unwrap();
    http.set_read_timeout(Some(DEADLINE)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    http.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(
        reply.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{reply}"
    );
    assert!(
        reply.contains("\nsensorgate_broker_clients_connected "),
        "{reply}"
    );
    assert!(reply.contains("\nsensorgate_nodes 0\n"), "{reply}");

    let mut other = std::net::TcpStream::connect(&gw.metrics).unwrap();
    other.set_read_timeout(Some(DEADLINE)).unwrap();
    other.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    other.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}

#[test]
fn status_against_no_broker_fails_with_ex_unavailable() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["status", "--port", &port, "--timeout", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the broker"));
}
