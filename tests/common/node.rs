//! The node side of the serial tests: a pseudo-terminal standing in for a node's serial port,
//! frames encoded with the wire crate the firmware uses, and a reader of what the gateway
//! writes back.

use std::path::Path;

use sensorgate_wire as wire;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_serial::{SerialPort, SerialStream};

/// A pseudo-terminal: the test writes to `master`; the gateway opens `link`, a symlink to the
/// slave side, the way `/dev/serial/by-id/...` links name USB adapters. The slave is kept open
/// so the port outlives a gateway that closes it (or is killed).
pub struct Pty {
    pub master: SerialStream,
    pub slave: SerialStream,
}

pub fn pty_at(link: &Path) -> Pty {
    let (master, slave) = SerialStream::pair().expect("pseudo-terminal pair");
    let target = slave.name().expect("slave has a path");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&target, link).expect("symlink");
    Pty { master, slave }
}

/// One encoded frame, delimiter included.
pub fn frame(node: u32, boot: u32, seq: u32, body: wire::Body) -> Vec<u8> {
    let f = wire::Frame::new(wire::Header::new(node, boot, seq), body);
    let mut buf = [0u8; wire::MAX_FRAME];
    wire::encode(&f, &mut buf).expect("encodes").to_vec()
}

/// A `Hello` announcing a temperature sensor on channel 0 and humidity on channel 1.
pub fn hello() -> wire::Body {
    let mut sensors = wire::heapless::Vec::new();
    let _ = sensors.push(wire::SensorInfo {
        channel: 0,
        quantity: wire::Quantity::Temperature,
        unit: wire::Unit::DegreeCelsius,
    });
    let _ = sensors.push(wire::SensorInfo {
        channel: 1,
        quantity: wire::Quantity::Humidity,
        unit: wire::Unit::PercentRh,
    });
    wire::Body::Hello(wire::Hello {
        firmware: wire::FirmwareVersion {
            major: 1,
            minor: 2,
            patch: 3,
        },
        report_interval_s: 60,
        sensors,
    })
}

/// `Readings` of `(channel, mantissa, exponent)`.
pub fn readings(values: &[(u8, i32, i8)]) -> wire::Body {
    let list: Vec<wire::Reading> = values
        .iter()
        .map(|&(c, m, e)| wire::Reading::new(c, m, e))
        .collect();
    wire::Body::Readings(wire::Readings::from_slice(&list).expect("fits"))
}

/// Decodes every frame the gateway writes to `port` and sends it on `out`, until the port
/// fails or `out` is closed. Undecodable bytes are skipped, as a node would.
pub async fn read_frames(
    mut port: impl AsyncRead + Unpin,
    out: mpsc::UnboundedSender<wire::Frame>,
) {
    let mut acc = wire::Accumulator::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match port.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for d in acc.feed_iter(&buf[..n]) {
            if let Ok(f) = d.result {
                if out.send(f).is_err() {
                    return;
                }
            }
        }
    }
}
