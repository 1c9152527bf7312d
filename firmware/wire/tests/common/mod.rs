//! Frames and helpers shared by the wire crate's tests.
#![allow(dead_code)]

use sensorgate_wire::*;

/// A realistic frame of every kind.
pub fn one_of_each_kind() -> Vec<Frame> {
    let h = |seq| Header::new(7, 0x5EED_B007, seq);
    let inner = encode_raw_vec(&readings_frame(Header::new(9, 1, 2), &[(0, 2137, -2)]));
    vec![
        Frame::new(
            h(1),
            Body::Hello(Hello {
                firmware: FirmwareVersion {
                    major: 0,
                    minor: 3,
                    patch: 1,
                },
                report_interval_s: 60,
                sensors: heapless::Vec::from_slice(&[
                    SensorInfo {
                        channel: 0,
                        quantity: Quantity::Temperature,
                        unit: Unit::DegreeCelsius,
                    },
                    SensorInfo {
                        channel: 1,
                        quantity: Quantity::Humidity,
                        unit: Unit::PercentRh,
                    },
                ])
                .unwrap(),
            }),
        ),
        readings_frame(h(2), &[(0, 2137, -2), (1, 456, -1)]),
        Frame::new(
            h(3),
            Body::Heartbeat(Heartbeat {
                battery_mv: 3012,
                uptime_s: 86_400,
                readings_dropped: 0,
            }),
        ),
        Frame::new(
            h(4),
            Body::Ack(Ack::accepted(FrameRef {
                boot_id: 0x5EED_B007,
                seq: 2,
            })),
        ),
        Frame::new(
            h(5),
            Body::Ack(Ack::rejected(
                FrameRef { boot_id: 1, seq: 9 },
                NackReason::StorageFull,
            )),
        ),
        Frame::new(
            h(6),
            Body::Command(Command::SetReportInterval { seconds: 300 }),
        ),
        Frame::new(h(7), Body::Command(Command::Identify { seconds: 10 })),
        Frame::new(h(8), Body::Command(Command::Reboot)),
        Frame::new(h(9), Body::Command(Command::SendHello)),
        Frame::new(
            h(10),
            Body::Log(Log::new(LogLevel::Warn, "sht31: i2c nack, retrying")),
        ),
        Frame::new(
            h(11),
            Body::Relayed(
                Relayed::new(
                    LinkQuality {
                        rssi_dbm: -97,
                        snr_db: -6,
                    },
                    &inner,
                )
                .unwrap(),
            ),
        ),
    ]
}

pub fn readings_frame(header: Header, readings: &[(u8, i32, i8)]) -> Frame {
    let readings: Vec<Reading> = readings
        .iter()
        .map(|&(c, m, e)| Reading::new(c, m, e))
        .collect();
    Frame::new(
        header,
        Body::Readings(Readings::from_slice(&readings).unwrap()),
    )
}

/// The largest header postcard can produce: every varint at its 5-byte maximum.
pub const WORST_HEADER: Header = Header::new(u32::MAX, u32::MAX, u32::MAX);

/// The worst case (largest encoding) of every kind.
pub fn worst_case_of_each_kind() -> Vec<Frame> {
    let worst_reading = Reading::new(255, i32::MIN, i8::MIN);
    let worst_inner = encode_raw_vec(&Frame::new(
        WORST_HEADER,
        Body::Readings(Readings::from_slice(&[worst_reading; MAX_READINGS]).unwrap()),
    ));
    let mut inner = worst_inner.clone();
    inner.resize(MAX_RELAYED_INNER, 0xAA);
    let sensor = SensorInfo {
        channel: 255,
        quantity: Quantity::Other(255),
        unit: Unit::Other(255),
    };
    let bodies = vec![
        Body::Hello(Hello {
            firmware: FirmwareVersion {
                major: 255,
                minor: 255,
                patch: 255,
            },
            report_interval_s: u32::MAX,
            sensors: heapless::Vec::from_slice(&[sensor; MAX_SENSORS]).unwrap(),
        }),
        Body::Readings(Readings::from_slice(&[worst_reading; MAX_READINGS]).unwrap()),
        Body::Heartbeat(Heartbeat {
            battery_mv: u16::MAX,
            uptime_s: u32::MAX,
            readings_dropped: u32::MAX,
        }),
        Body::Ack(Ack::rejected(
            FrameRef {
                boot_id: u32::MAX,
                seq: u32::MAX,
            },
            NackReason::Other(255),
        )),
        Body::Command(Command::SetReportInterval { seconds: u32::MAX }),
        Body::Log(Log::new(LogLevel::Trace, &"\u{10FFFF}".repeat(20))),
        Body::Relayed(
            Relayed::new(
                LinkQuality {
                    rssi_dbm: i16::MIN,
                    snr_db: i8::MIN,
                },
                &inner,
            )
            .unwrap(),
        ),
    ];
    bodies
        .into_iter()
        .map(|b| Frame::new(WORST_HEADER, b))
        .collect()
}

pub fn encode_vec(frame: &Frame) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    encode(frame, &mut buf).unwrap().to_vec()
}

pub fn encode_raw_vec(frame: &Frame) -> Vec<u8> {
    let mut buf = [0u8; MAX_RAW];
    encode_raw(frame, &mut buf).unwrap().to_vec()
}

/// Feeds `chunks` in order, then returns every outcome and the bytes still pending.
pub fn feed_chunks<'c>(
    acc: &mut Accumulator,
    chunks: impl IntoIterator<Item = &'c [u8]>,
) -> Vec<Decoded> {
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend(acc.feed_iter(chunk));
    }
    out
}

/// Feeds one stream whole, asserting that outcomes plus pending bytes account for every byte.
pub fn feed_accounted(stream: &[u8]) -> (Vec<Decoded>, usize) {
    let mut acc = Accumulator::new();
    let out = feed_chunks(&mut acc, [stream]);
    let accounted: usize = out.iter().map(|d| d.bytes).sum();
    assert_eq!(accounted + acc.pending(), stream.len(), "byte accounting");
    (out, acc.pending())
}

pub fn frames_of(out: &[Decoded]) -> Vec<Frame> {
    out.iter().filter_map(|d| d.result.clone().ok()).collect()
}

pub fn errors_of(out: &[Decoded]) -> Vec<(FrameError, usize)> {
    out.iter()
        .filter_map(|d| d.result.clone().err().map(|e| (e, d.bytes)))
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
