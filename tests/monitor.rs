//! `sensorgate monitor`: the binary reads a pseudo-terminal and prints what it decodes.

use std::process::Stdio;
use std::time::Duration;

use sensorgate_wire as wire;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_serial::{SerialPort, SerialStream};

const WAIT: Duration = Duration::from_secs(10);

fn frame(seq: u32, body: wire::Body) -> Vec<u8> {
    let f = wire::Frame::new(wire::Header::new(42, 0xb007, seq), body);
    let mut buf = [0u8; wire::MAX_FRAME];
    wire::encode(&f, &mut buf).expect("encodes").to_vec()
}

fn hello() -> wire::Body {
    let mut sensors = wire::heapless::Vec::new();
    let _ = sensors.push(wire::SensorInfo {
        channel: 0,
        quantity: wire::Quantity::Temperature,
        unit: wire::Unit::DegreeCelsius,
    });
    wire::Body::Hello(wire::Hello {
        firmware: wire::FirmwareVersion {
            major: 1,
            minor: 4,
            patch: 2,
        },
        report_interval_s: 30,
        sensors,
    })
}

fn readings(mantissa: i32) -> wire::Body {
    wire::Body::Readings(
        wire::Readings::from_slice(&[wire::Reading::new(0, mantissa, -2)]).unwrap(),
    )
}

#[tokio::test]
async fn monitor_prints_frames_and_errors_without_colour_when_piped() {
    let (mut master, slave) = SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("slave path");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["monitor", &path, "--hex"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runs");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, stderr.next_line())
        .await
        .expect("the monitor says it is monitoring")
        .unwrap()
        .unwrap_or_default();
    assert!(ready.contains(&path), "{ready}");

    let mut corrupt = frame(3, readings(2250));
    corrupt[5] ^= 0x10;
    let mut stream = frame(1, hello());
    stream.extend(frame(2, readings(2137)));
    stream.extend(&corrupt);
    stream.extend(b"\x13\x37 line noise\x00");
    stream.extend(frame(4, readings(2201)));
    master.write_all(&stream).await.unwrap();

    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("22.01")) {
        let line = tokio::time::timeout(WAIT, stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("timed out; so far: {lines:#?}"))
            .unwrap()
            .expect("monitor still running");
        lines.push(line);
    }
    let text = lines.join("\n");
    assert!(!text.contains('\x1b'), "no colour when piped:\n{text}");
    let find = |what: &str| {
        lines
            .iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line with `{what}` in:\n{text}"))
    };
    let hello_at = find("hello");
    assert!(lines[hello_at].contains("node 42"), "{text}");
    assert!(lines[hello_at].contains("firmware 1.4.2"), "{text}");
    let reading_at = find("ch0 temperature=21.37 °C");
    assert!(lines[reading_at].contains("node 42"), "{text}");
    let crc_at = find("error      crc:");
    assert!(find("error      framing") > crc_at, "{text}");
    assert!(find("22.01") > crc_at, "{text}");
    // --hex: the bytes of the good reading follow its line.
    let expected_hex: Vec<String> = frame(2, readings(2137))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        lines[reading_at + 1].trim(),
        expected_hex.join(" "),
        "{text}"
    );

    // Ctrl-C ends the monitor with success.
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits on SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_port_that_cannot_be_opened_is_named_with_ex_noinput() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["monitor", "/dev/nonexistent-sensorgate-tty"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(66), "EX_NOINPUT");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/dev/nonexistent-sensorgate-tty"), "{err}");
}
