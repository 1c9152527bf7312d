//! Every corruption class is reported, counted to the byte, and the accumulator resyncs on the
//! next delimiter.
mod common;

use common::*;
use sensorgate_wire::*;

fn good(seq: u32) -> (Frame, Vec<u8>) {
    let frame = readings_frame(Header::new(3, 77, seq), &[(0, 2137, -2)]);
    let wire = encode_vec(&frame);
    (frame, wire)
}

/// `bad` between two good frames: returns the outcomes for the bad part, asserting both good
/// frames are recovered intact and every byte is accounted for.
fn between_good_frames(bad: &[u8]) -> Vec<(FrameError, usize)> {
    let (first, first_wire) = good(1);
    let (last, last_wire) = good(2);
    let stream = [first_wire.as_slice(), bad, last_wire.as_slice()].concat();
    let (out, pending) = feed_accounted(&stream);
    assert_eq!(pending, 0);
    assert_eq!(
        frames_of(&out),
        vec![first, last],
        "both good frames recovered"
    );
    assert_eq!(out.first().unwrap().bytes, first_wire.len());
    assert_eq!(out.last().unwrap().bytes, last_wire.len());
    errors_of(&out)
}

/// Re-frames a raw frame whose CRC is made valid again after editing, so the error under test
/// is reached rather than a CRC mismatch.
fn reframe(mut raw: Vec<u8>) -> Vec<u8> {
    let n = raw.len() - CRC_LEN;
    let crc = checksum(&raw[..n]).to_le_bytes();
    raw[n..].copy_from_slice(&crc);
    stuff(&raw)
}

/// COBS stuffing written independently of the crate, plus the delimiter.
fn stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    let mut code_at = 0;
    for &b in raw {
        if b == 0 {
            out[code_at] = (out.len() - code_at) as u8;
            code_at = out.len();
            out.push(0);
        } else {
            out.push(b);
        }
    }
    out[code_at] = (out.len() - code_at) as u8;
    out.push(0);
    out
}

#[test]
fn independent_stuffing_matches_encode() {
    for frame in one_of_each_kind() {
        assert_eq!(stuff(&encode_raw_vec(&frame)), encode_vec(&frame));
    }
}

#[test]
fn a_flipped_bit_is_a_crc_error_and_the_next_frame_survives() {
    let (_, wire) = good(9);
    let mut raw = encode_raw_vec(&good(9).0);
    raw[6] ^= 0x10;
    let bad = stuff(&raw);
    assert_eq!(
        between_good_frames(&bad),
        vec![(FrameError::Crc, bad.len())]
    );
    assert_eq!(bad.len(), wire.len());
}

#[test]
fn a_truncated_frame_is_an_error_of_its_own_length() {
    let (_, wire) = good(9);
    // Cut in the middle of the frame, then the delimiter arrives (sender reset mid-frame).
    let mut cut = wire[..wire.len() / 2].to_vec();
    cut.push(0);
    let errors = between_good_frames(&cut);
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors[0].0, FrameError::Cobs | FrameError::Crc));
    assert_eq!(errors[0].1, cut.len());
    // Too short to hold version, kind and CRC.
    let tiny = stuff(&[1, 2, 3]);
    assert_eq!(
        between_good_frames(&tiny),
        vec![(FrameError::Truncated, tiny.len())]
    );
}

#[test]
fn an_oversize_run_is_skipped_to_the_next_delimiter() {
    let mut junk = vec![0x55u8; MAX_FRAME * 3 + 7];
    junk.push(0);
    assert_eq!(
        between_good_frames(&junk),
        vec![(FrameError::Oversize, junk.len())]
    );
}

#[test]
fn an_oversize_run_fed_byte_by_byte_is_counted_the_same() {
    let (first, first_wire) = good(1);
    let mut stream = first_wire.clone();
    stream.extend(std::iter::repeat_n(0x55u8, 1000));
    stream.push(0);
    stream.extend(&first_wire);
    let mut acc = Accumulator::new();
    let out = feed_chunks(&mut acc, stream.chunks(1));
    assert_eq!(frames_of(&out), vec![first.clone(), first]);
    assert_eq!(errors_of(&out), vec![(FrameError::Oversize, 1001)]);
}

#[test]
fn a_missing_delimiter_loses_two_frames_as_one_counted_error() {
    let (_, a) = good(5);
    let (_, b) = good(6);
    let merged = [&a[..a.len() - 1], b.as_slice()].concat();
    let errors = between_good_frames(&merged);
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors[0].0, FrameError::Cobs | FrameError::Crc));
    assert_eq!(errors[0].1, merged.len());
}

#[test]
fn garbage_between_frames_is_counted_up_to_its_delimiter() {
    let garbage = [0x13, 0x37, 0xFF, 0x42, 0x00];
    let errors = between_good_frames(&garbage);
    assert_eq!(errors.iter().map(|e| e.1).sum::<usize>(), garbage.len());
    assert_eq!(errors.len(), 1);
}

#[test]
fn zero_length_frames_are_counted_one_byte_each() {
    assert_eq!(
        between_good_frames(&[0, 0, 0]),
        vec![(FrameError::Empty, 1); 3]
    );
}

#[test]
fn an_invalid_cobs_code_is_a_cobs_error() {
    // Code 0x09 promises 8 bytes, only 2 follow.
    let bad = [0x09, 0x01, 0x02, 0x00];
    assert_eq!(between_good_frames(&bad), vec![(FrameError::Cobs, 4)]);
}

#[test]
fn an_unknown_protocol_version_is_reported_with_the_version() {
    let mut raw = encode_raw_vec(&good(4).0);
    raw[0] = 2;
    let bad = reframe(raw);
    assert_eq!(
        between_good_frames(&bad),
        vec![(FrameError::UnknownVersion(2), bad.len())]
    );
}

#[test]
fn an_unknown_kind_is_reported_with_its_header() {
    let mut raw = encode_raw_vec(&good(4).0);
    raw[1] = 0x42;
    let bad = reframe(raw);
    assert_eq!(
        between_good_frames(&bad),
        vec![(
            FrameError::UnknownKind {
                kind: 0x42,
                header: Some(Header::new(3, 77, 4))
            },
            bad.len()
        )]
    );
}

#[test]
fn an_unknown_command_keeps_its_header_so_the_node_can_nack_it() {
    let frame = Frame::new(Header::new(3, 1000, 17), Body::Command(Command::Reboot));
    let mut raw = encode_raw_vec(&frame);
    let body_at = raw.len() - CRC_LEN - 1;
    raw[body_at] = 99; // a command variant this build does not know
    let bad = reframe(raw);
    let errors = between_good_frames(&bad);
    assert_eq!(
        errors,
        vec![(
            FrameError::Body {
                kind: FrameKind::Command,
                header: Header::new(3, 1000, 17)
            },
            bad.len()
        )]
    );
    let header = errors[0].0.header().unwrap();
    let nack = Ack::rejected(header.frame_ref(), NackReason::Unsupported);
    assert_eq!(
        nack.of,
        FrameRef {
            boot_id: 1000,
            seq: 17
        }
    );
}

#[test]
fn trailing_bytes_after_a_body_are_rejected() {
    let mut raw = encode_raw_vec(&good(4).0);
    raw.insert(raw.len() - CRC_LEN, 0x01);
    let bad = reframe(raw);
    assert!(matches!(
        between_good_frames(&bad)[..],
        [(FrameError::Body { .. }, _)]
    ));
}

#[test]
fn invalid_utf8_in_a_log_is_a_body_error() {
    let frame = Frame::new(
        Header::new(1, 1, 1),
        Body::Log(Log::new(LogLevel::Info, "ab")),
    );
    let mut raw = encode_raw_vec(&frame);
    let text_at = raw.len() - CRC_LEN - 2;
    raw[text_at] = 0xFF;
    let bad = reframe(raw);
    assert!(matches!(
        between_good_frames(&bad)[..],
        [(
            FrameError::Body {
                kind: FrameKind::Log,
                ..
            },
            _
        )]
    ));
}

#[test]
fn a_stream_ending_inside_a_frame_is_counted_by_finish() {
    let (frame, wire) = good(1);
    let mut acc = Accumulator::new();
    let stream = [wire.as_slice(), &wire[..5]].concat();
    let out = feed_chunks(&mut acc, [stream.as_slice()]);
    assert_eq!(frames_of(&out), vec![frame.clone()]);
    assert_eq!(acc.pending(), 5);
    assert_eq!(acc.finish(), Some((FrameError::Unterminated, 5)));
    assert_eq!(acc.pending(), 0);
    assert_eq!(acc.finish(), None);
    // A fresh start after finish decodes normally.
    let out = feed_chunks(&mut acc, [wire.as_slice()]);
    assert_eq!(frames_of(&out), vec![frame]);
}

#[test]
fn feed_reports_rest_for_postcard_style_loops() {
    let (a, wa) = good(1);
    let (b, wb) = good(2);
    let stream = [wa.as_slice(), &[0], wb.as_slice()].concat();
    let mut acc = Accumulator::new();
    let mut input = stream.as_slice();
    let mut seen = Vec::new();
    loop {
        match acc.feed(input) {
            FeedResult::Consumed => break,
            FeedResult::Frame { frame, bytes, rest } => {
                seen.push((Ok(frame), bytes));
                input = rest;
            }
            FeedResult::Error { error, bytes, rest } => {
                seen.push((Err(error), bytes));
                input = rest;
            }
        }
    }
    assert_eq!(
        seen,
        vec![
            (Ok(a), wa.len()),
            (Err(FrameError::Empty), 1),
            (Ok(b), wb.len())
        ]
    );
}

#[test]
fn a_small_accumulator_reports_large_frames_as_oversize() {
    let (_, wire) = good(1);
    let mut acc = FrameAccumulator::<8>::new();
    let out: Vec<_> = acc.feed_iter(&wire).collect();
    assert_eq!(
        out,
        vec![Decoded {
            result: Err(FrameError::Oversize),
            bytes: wire.len()
        }]
    );
}

#[test]
fn error_names_are_distinct() {
    let errors = [
        FrameError::Empty,
        FrameError::Oversize,
        FrameError::Unterminated,
        FrameError::Cobs,
        FrameError::Truncated,
        FrameError::Crc,
        FrameError::UnknownVersion(2),
        FrameError::UnknownKind {
            kind: 9,
            header: None,
        },
        FrameError::Header,
        FrameError::Body {
            kind: FrameKind::Log,
            header: Header::default(),
        },
    ];
    let names: std::collections::BTreeSet<_> = errors.iter().map(|e| e.name()).collect();
    assert_eq!(names.len(), errors.len());
}
