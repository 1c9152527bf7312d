//! Runs the real node firmware in the rp2040js emulator (`firmware/harness`) and talks to it over
//! its UART0 as the gateway would: the frames must decode with `sensorgate-wire`, carry the
//! temperature set in the emulated ADC, be retransmitted until acknowledged, and commands must be
//! answered with `Ack` — including one the firmware cannot decode, and a reboot.
//!
//! Needs the emulator image and the harness, which `firmware/build.sh` prepares; so it is ignored
//! by a plain `cargo test`. Run it with `firmware/test-emulated.sh`, or after `firmware/build.sh`:
//! `cargo test -p sensorgate-node-core --test emulated_node -- --ignored`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use sensorgate_wire::{
    Accumulator, Ack, AckStatus, Body, Command, FeedResult, Frame, FrameRef, Header, NackReason,
};

/// Node id the emulator image is built with (`SENSORGATE_NODE_ID` in firmware/build.sh).
const NODE_ID: u32 = 0x00C0_FFEE;
const GATEWAY_BOOT: u32 = 0x6A7E;
/// Temperature set in the emulated ADC, and what one ADC step (0.47 °C) plus rounding allows.
const TEMPERATURE_C: f64 = 23.5;
const TOLERANCE_C: f64 = 0.5;
/// Generous, for a loaded CI machine: the emulator runs at wall-clock pace.
const TIMEOUT: Duration = Duration::from_secs(20);

struct EmulatedNode {
    child: Child,
    stdin: ChildStdin,
    frames: Receiver<Frame>,
    next_seq: u32,
}

impl EmulatedNode {
    fn start() -> Self {
        let firmware = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let elf = std::env::var_os("SENSORGATE_NODE_ELF")
            .map(PathBuf::from)
            .unwrap_or_else(|| firmware.join("node/target/images/sensorgate-node-emu.elf"));
        assert!(
            elf.exists(),
            "{} is missing: run firmware/build.sh first",
            elf.display()
        );
        let mut child = Process::new("node")
            .arg(firmware.join("harness/run-node.js"))
            .arg("--elf")
            .arg(&elf)
            .args(["--temp", &TEMPERATURE_C.to_string(), "--exit-after", "120"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node (Node.js) with firmware/harness/run-node.js");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, frames) = channel();
        std::thread::spawn(move || {
            let mut accumulator = Accumulator::new();
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                let mut input = &buf[..n];
                loop {
                    match accumulator.feed(input) {
                        FeedResult::Consumed => break,
                        FeedResult::Frame { frame, rest, .. } => {
                            eprintln!("node → {frame:?}");
                            if tx.send(frame).is_err() {
                                return;
                            }
                            input = rest;
                        }
                        FeedResult::Error { error, rest, .. } => {
                            // The node's boot flush is a lone delimiter; anything else is a bug.
                            assert_eq!(
                                error,
                                sensorgate_wire::FrameError::Empty,
                                "bad bytes from node"
                            );
                            input = rest;
                        }
                    }
                }
            }
        });
        EmulatedNode {
            child,
            stdin,
            frames,
            next_seq: 1,
        }
    }

    /// The next frame that `wanted` accepts; other frames (heartbeats, retransmissions) are skipped.
    fn expect<T>(&self, what: &str, mut wanted: impl FnMut(&Frame) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.frames.recv_timeout(left) {
                Ok(frame) => {
                    if let Some(found) = wanted(&frame) {
                        return found;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {what} from the node within {TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!("harness ended before {what}"),
            }
        }
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Sends a gateway frame; returns the reference an `Ack` to it must carry.
    fn send(&mut self, body: Body) -> FrameRef {
        let header = Header::new(NODE_ID, GATEWAY_BOOT, self.next_seq);
        self.next_seq += 1;
        let mut buf = [0u8; sensorgate_wire::MAX_FRAME];
        let bytes = sensorgate_wire::encode(&Frame::new(header, body), &mut buf)
            .unwrap()
            .to_vec();
        self.send_bytes(&bytes);
        header.frame_ref()
    }

    fn expect_ack(&self, of: FrameRef) -> AckStatus {
        self.expect("Ack", |f| match &f.body {
            Body::Ack(Ack { of: acked, status }) if *acked == of => Some(*status),
            _ => None,
        })
    }
}

impl Drop for EmulatedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// COBS-stuffs `raw` and appends the delimiter (to send a frame the wire crate would not encode).
fn cobs_frame(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    let mut code_at = 0;
    for &byte in raw {
        if byte != 0 {
            out.push(byte);
        }
        if byte == 0 || out.len() - code_at == 0xFF {
            out[code_at] = (out.len() - code_at) as u8;
            code_at = out.len();
            out.push(0);
        }
    }
    out[code_at] = (out.len() - code_at) as u8;
    out.push(0);
    out
}

#[test]
#[ignore = "needs firmware/build.sh; run with firmware/test-emulated.sh"]
fn emulated_node_reports_retransmits_and_answers_commands() {
    let mut node = EmulatedNode::start();

    // Boot: Hello first, announcing the internal temperature sensor.
    let boot_id = node.expect("Hello", |f| match &f.body {
        Body::Hello(hello) => {
            assert_eq!(f.header.node_id, NODE_ID);
            assert!(!hello.sensors.is_empty());
            Some(f.header.boot_id)
        }
        _ => None,
    });

    // Readings with the ADC temperature, within conversion rounding.
    let (readings_seq, celsius) = node.expect("Readings", |f| match &f.body {
        Body::Readings(r) => Some((f.header.seq, r.readings.first()?.value.to_f64())),
        _ => None,
    });
    assert!(
        (celsius - TEMPERATURE_C).abs() <= TOLERANCE_C,
        "node reported {celsius} °C, emulated ADC was set to {TEMPERATURE_C} °C"
    );

    // Not acknowledged: the same frame comes again (same boot id and seq).
    node.expect("retransmitted Readings", |f| {
        (matches!(f.body, Body::Readings(_)) && f.header.seq == readings_seq).then(|| {
            assert_eq!(f.header.boot_id, boot_id);
        })
    });
    node.send(Body::Ack(Ack::accepted(FrameRef {
        boot_id,
        seq: readings_seq,
    })));

    // Commands are answered with Ack.
    let of = node.send(Body::Command(Command::SetReportInterval { seconds: 30 }));
    assert_eq!(node.expect_ack(of), AckStatus::Accepted);
    let of = node.send(Body::Command(Command::SetReportInterval { seconds: 0 }));
    assert_eq!(
        node.expect_ack(of),
        AckStatus::Rejected(NackReason::InvalidArgument)
    );
    let of = node.send(Body::Command(Command::Identify { seconds: 3 }));
    assert_eq!(node.expect_ack(of), AckStatus::Accepted);

    // A command this firmware cannot decode (a future variant) gets a negative Ack, not silence.
    let header = Header::new(NODE_ID, GATEWAY_BOOT, 500);
    let mut buf = [0u8; sensorgate_wire::MAX_RAW];
    let raw = sensorgate_wire::encode_raw(
        &Frame::new(header, Body::Command(Command::Reboot)),
        &mut buf,
    )
    .unwrap();
    let mut future = raw[..raw.len() - sensorgate_wire::CRC_LEN].to_vec();
    *future.last_mut().unwrap() = 99; // the Command variant index
    let crc = sensorgate_wire::checksum(&future).to_le_bytes();
    future.extend_from_slice(&crc);
    node.send_bytes(&cobs_frame(&future));
    assert_eq!(
        node.expect_ack(header.frame_ref()),
        AckStatus::Rejected(NackReason::Unsupported)
    );

    // Reboot: acknowledged, then the node boots again with a new boot id and says Hello.
    let of = node.send(Body::Command(Command::Reboot));
    assert_eq!(node.expect_ack(of), AckStatus::Accepted);
    let new_boot = node.expect("Hello after reboot", |f| {
        matches!(f.body, Body::Hello(_)).then_some(f.header.boot_id)
    });
    assert_ne!(new_boot, boot_id, "a reboot must change the boot id");
}

#[test]
fn cobs_helper_matches_the_wire_crate() {
    let frame = Frame::new(
        Header::new(1, 2, 3),
        Body::Command(Command::Identify { seconds: 0 }),
    );
    let mut raw = [0u8; sensorgate_wire::MAX_RAW];
    let raw = sensorgate_wire::encode_raw(&frame, &mut raw).unwrap();
    let mut encoded = [0u8; sensorgate_wire::MAX_FRAME];
    let encoded = sensorgate_wire::encode(&frame, &mut encoded).unwrap();
    assert_eq!(cobs_frame(raw), encoded);
}
