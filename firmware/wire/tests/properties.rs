//! Property tests: chunking never changes the outcome, corruption never panics or is accepted,
//! and every byte is accounted for.
mod common;

use common::*;
use proptest::prelude::*;
use sensorgate_wire::*;

fn arb_header() -> impl Strategy<Value = Header> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(n, b, s)| Header::new(n, b, s))
}

fn arb_quantity() -> impl Strategy<Value = Quantity> {
    any::<u8>().prop_map(Quantity::from_code)
}

fn arb_unit() -> impl Strategy<Value = Unit> {
    any::<u8>().prop_map(Unit::from_code)
}

fn arb_body() -> impl Strategy<Value = Body> {
    let reading =
        (any::<u8>(), any::<i32>(), any::<i8>()).prop_map(|(c, m, e)| Reading::new(c, m, e));
    let sensor = (any::<u8>(), arb_quantity(), arb_unit()).prop_map(|(channel, quantity, unit)| {
        SensorInfo {
            channel,
            quantity,
            unit,
        }
    });
    let frame_ref =
        (any::<u32>(), any::<u32>()).prop_map(|(boot_id, seq)| FrameRef { boot_id, seq });
    prop_oneof![
        (
            any::<[u8; 3]>(),
            any::<u32>(),
            prop::collection::vec(sensor, 0..=MAX_SENSORS)
        )
            .prop_map(|(v, report_interval_s, sensors)| Body::Hello(Hello {
                firmware: FirmwareVersion {
                    major: v[0],
                    minor: v[1],
                    patch: v[2]
                },
                report_interval_s,
                sensors: heapless::Vec::from_slice(&sensors).unwrap(),
            })),
        prop::collection::vec(reading, 1..=MAX_READINGS)
            .prop_map(|r| Body::Readings(Readings::from_slice(&r).unwrap())),
        (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(b, u, d)| Body::Heartbeat(
            Heartbeat {
                battery_mv: b,
                uptime_s: u,
                readings_dropped: d
            }
        )),
        (frame_ref, proptest::option::of(any::<u8>())).prop_map(|(of, nack)| Body::Ack(
            match nack {
                None => Ack::accepted(of),
                Some(code) => Ack::rejected(of, NackReason::from_code(code)),
            }
        )),
        prop_oneof![
            any::<u32>().prop_map(|seconds| Command::SetReportInterval { seconds }),
            any::<u16>().prop_map(|seconds| Command::Identify { seconds }),
            Just(Command::Reboot),
            Just(Command::SendHello),
        ]
        .prop_map(Body::Command),
        (0usize..5, ".{0,60}").prop_map(|(level, text)| {
            let level = [
                LogLevel::Error,
                LogLevel::Warn,
                LogLevel::Info,
                LogLevel::Debug,
                LogLevel::Trace,
            ][level];
            Body::Log(Log::new(level, &text))
        }),
        (
            any::<i16>(),
            any::<i8>(),
            prop::collection::vec(any::<u8>(), 0..=MAX_RELAYED_INNER)
        )
            .prop_map(|(rssi_dbm, snr_db, inner)| Body::Relayed(
                Relayed::new(LinkQuality { rssi_dbm, snr_db }, &inner).unwrap()
            )),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (arb_header(), arb_body()).prop_map(|(h, b)| Frame::new(h, b))
}

/// Splits `stream` at the given (sorted, deduplicated) cut points.
fn split<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for c in cuts {
        out.push(&stream[start..c]);
        start = c;
    }
    out.push(&stream[start..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_of_a_stream_yields_the_same_frames(
        frames in prop::collection::vec(arb_frame(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(encode_vec).collect();
        let mut acc = Accumulator::new();
        let out = feed_chunks(&mut acc, split(&stream, &cuts));
        prop_assert_eq!(acc.pending(), 0);
        let wire_lens: Vec<usize> = frames.iter().map(|f| encode_vec(f).len()).collect();
        prop_assert_eq!(out.iter().map(|d| d.bytes).collect::<Vec<_>>(), wire_lens);
        prop_assert_eq!(frames_of(&out), frames);
    }

    /// Raw-domain errors of 1 to 4 bits are within CRC-32/ISCSI's Hamming distance at these
    /// lengths (see `crc_distance.rs`), so each one must be rejected as a CRC error.
    #[test]
    fn one_to_four_bit_errors_in_a_frame_are_always_detected(
        frame in arb_frame(),
        flips in prop::collection::btree_set(any::<usize>(), 1..=4),
    ) {
        let mut raw = encode_raw_vec(&frame);
        let bits = raw.len() * 8;
        let flips: std::collections::BTreeSet<usize> = flips.into_iter().map(|f| f % bits).collect();
        for &bit in &flips {
            raw[bit / 8] ^= 1 << (bit % 8);
        }
        prop_assert_eq!(decode_raw(&raw), Err(FrameError::Crc));
    }

    /// Bit flips on the wire (stuffing and delimiters included): no panic, every byte counted,
    /// nothing but the original frame is ever accepted, and the next frame survives unless its
    /// delimiter was hit.
    #[test]
    fn bit_flips_on_the_wire_never_panic_or_forge_a_frame(
        frame in arb_frame(),
        next in arb_frame(),
        flips in prop::collection::vec(any::<usize>(), 1..=3),
    ) {
        let mut wire = encode_vec(&frame);
        let bits = wire.len() * 8;
        let mut hit_delimiter = false;
        for f in flips {
            let bit = f % bits;
            wire[bit / 8] ^= 1 << (bit % 8);
            hit_delimiter |= bit / 8 == wire.len() - 1;
        }
        let stream = [wire.clone(), encode_vec(&next)].concat();
        let (out, _) = feed_accounted(&stream);
        let accepted = frames_of(&out);
        for f in &accepted {
            prop_assert!(f == &frame || f == &next, "forged frame {:?}", f);
        }
        if !hit_delimiter {
            prop_assert_eq!(accepted.last(), Some(&next));
        }
    }

    #[test]
    fn random_garbage_never_panics_and_is_fully_accounted(
        garbage in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
        next in arb_frame(),
    ) {
        let mut acc = Accumulator::new();
        let mut out = feed_chunks(&mut acc, split(&garbage, &cuts));
        // A delimiter then a good frame: resynchronised whatever came before.
        let tail = [vec![0], encode_vec(&next)].concat();
        out.extend(acc.feed_iter(&tail));
        let accounted: usize = out.iter().map(|d| d.bytes).sum();
        prop_assert_eq!(accounted + acc.pending(), garbage.len() + tail.len());
        prop_assert_eq!(acc.pending(), 0);
        prop_assert_eq!(out.last().map(|d| d.result.clone()), Some(Ok(next)));
    }

    #[test]
    fn decode_raw_never_panics(raw in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_raw(&raw);
        let mut out = [0u8; MAX_FRAME];
        let _ = unframe(&raw, &mut out);
    }
}
