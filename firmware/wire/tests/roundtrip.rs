//! Every kind survives encode → accumulator, and the size bounds hold.
mod common;

use common::*;
use sensorgate_wire::*;

#[test]
fn every_kind_round_trips_through_the_accumulator() {
    let frames = one_of_each_kind();
    let kinds: std::collections::BTreeSet<u8> = frames.iter().map(|f| f.kind().code()).collect();
    assert_eq!(kinds.len(), FrameKind::ALL.len(), "a sample of every kind");
    for frame in &frames {
        let wire = encode_vec(frame);
        assert_eq!(wire.last(), Some(&0), "ends with the delimiter");
        assert!(!wire[..wire.len() - 1].contains(&0), "no zero inside");
        let (out, pending) = feed_accounted(&wire);
        assert_eq!(pending, 0);
        assert_eq!(
            out,
            vec![Decoded {
                result: Ok(frame.clone()),
                bytes: wire.len()
            }]
        );
    }
}

#[test]
fn every_kind_round_trips_raw() {
    for frame in one_of_each_kind() {
        assert_eq!(decode_raw(&encode_raw_vec(&frame)), Ok(frame));
    }
}

#[test]
fn worst_case_frames_fit_max_raw_and_max_frame() {
    let mut largest = 0;
    for frame in worst_case_of_each_kind() {
        let raw = encode_raw_vec(&frame);
        let wire = encode_vec(&frame);
        assert!(raw.len() <= MAX_RAW, "{:?}: {}", frame.kind(), raw.len());
        assert!(
            wire.len() <= MAX_FRAME,
            "{:?}: {}",
            frame.kind(),
            wire.len()
        );
        largest = largest.max(raw.len());
        let (out, _) = feed_accounted(&wire);
        assert_eq!(frames_of(&out), vec![frame]);
    }
    assert_eq!(largest, MAX_RAW, "MAX_RAW is tight");
}

#[test]
fn any_non_relayed_frame_fits_in_a_relayed_frame() {
    for frame in worst_case_of_each_kind() {
        if frame.kind() != FrameKind::Relayed {
            assert!(encode_raw_vec(&frame).len() <= MAX_RELAYED_INNER);
        }
    }
}

#[test]
fn four_readings_with_worst_case_values_fit_a_60_byte_radio_payload() {
    let worst = readings_frame(
        WORST_HEADER,
        &[
            (255, i32::MIN, i8::MIN),
            (254, i32::MAX, i8::MAX),
            (253, i32::MIN, -1),
            (252, -1_000_000_000, -9),
        ],
    );
    let wire = encode_vec(&worst);
    println!("4-reading worst case: {} bytes on the wire", wire.len());
    assert_eq!(wire.len(), 52);
    assert!(wire.len() <= 60);

    // A realistic frame: small node id, random boot id, a few thousand frames since boot.
    let typical = readings_frame(
        Header::new(12, 0x9C3E_71A5, 4711),
        &[(0, 2137, -2), (1, 456, -1), (2, 101_325, -2), (3, 3012, -3)],
    );
    let typical_len = encode_vec(&typical).len();
    println!("4-reading typical: {typical_len} bytes on the wire");
    assert!(typical_len <= 40);
}

#[test]
fn encode_reports_a_too_small_buffer() {
    let frame = &one_of_each_kind()[1];
    let len = encode_vec(frame).len();
    let mut buf = vec![0u8; len - 1];
    assert_eq!(encode(frame, &mut buf), Err(EncodeError::BufferTooSmall));
    let mut buf = vec![0u8; len];
    assert_eq!(encode(frame, &mut buf).unwrap().len(), len);
}

/// The README's example; if this changes, update `firmware/wire/README.md`.
#[test]
fn readme_example_bytes_are_what_encode_produces() {
    let frame = readings_frame(
        Header::new(7, 0x0001_0203, 42),
        &[(0, 2137, -2), (1, 456, -1)],
    );
    let raw = encode_raw_vec(&frame);
    let wire = encode_vec(&frame);
    println!("raw:  {}", hex(&raw));
    println!("wire: {}", hex(&wire));
    assert_eq!(
        hex(&raw),
        "01 02 07 83 84 04 2a 02 00 b2 21 fe 01 90 07 ff a0 b3 48 64"
    );
    assert_eq!(
        hex(&wire),
        "09 01 02 07 83 84 04 2a 02 0c b2 21 fe 01 90 07 ff a0 b3 48 64 00"
    );
}

#[test]
fn crc_is_crc32_iscsi() {
    assert_eq!(checksum(b"123456789"), 0xE306_9283);
}

#[test]
fn unframe_returns_the_raw_frame_a_bridge_relays() {
    let frame = &one_of_each_kind()[1];
    let mut out = [0u8; MAX_FRAME];
    let raw = unframe(&encode_vec(frame), &mut out).unwrap();
    assert_eq!(raw, encode_raw_vec(frame).as_slice());
    let relayed = Relayed::new(LinkQuality::default(), raw).unwrap();
    assert_eq!(relayed.inner_frame().as_ref(), Ok(frame));
}

#[test]
fn values_print_as_exact_decimals() {
    let cases = [
        ((2137, -2), "21.37"),
        ((-5, -3), "-0.005"),
        ((12, 2), "1200"),
        ((0, 3), "0"),
        ((0, -2), "0.00"),
        ((i32::MIN, 0), "-2147483648"),
        ((101_325, -2), "1013.25"),
        ((7, -1), "0.7"),
    ];
    for ((m, e), text) in cases {
        assert_eq!(Value::new(m, e).to_string(), text);
    }
    assert!((Value::new(2137, -2).to_f64() - 21.37).abs() < 1e-12);
}

#[test]
fn codes_are_stable_and_round_trip() {
    assert_eq!(Quantity::Temperature.code(), 1);
    assert_eq!(Quantity::Co2.device_class(), Some("carbon_dioxide"));
    assert_eq!(Quantity::Temperature.unit(), "°C");
    assert_eq!(Unit::Hectopascal.symbol(), "hPa");
    for q in Quantity::ALL {
        assert_eq!(Quantity::from_code(q.code()), *q);
    }
    for u in Unit::ALL {
        assert_eq!(Unit::from_code(u.code()), *u);
    }
    for r in NackReason::ALL {
        assert_eq!(NackReason::from_code(r.code()), *r);
    }
    assert_eq!(Quantity::from_code(200), Quantity::Other(200));
    for k in FrameKind::ALL {
        assert_eq!(FrameKind::from_code(k.code()), Some(k));
    }
}

#[test]
fn log_text_is_cut_at_a_character_boundary() {
    let log = Log::new(LogLevel::Info, &"é".repeat(40));
    assert_eq!(log.text.len(), MAX_LOG_TEXT);
    let log = Log::new(LogLevel::Info, &format!("x{}", "é".repeat(40)));
    assert_eq!(log.text.len(), MAX_LOG_TEXT - 1);
}
