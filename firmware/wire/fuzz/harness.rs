//! The checks run on every fuzz input; shared by the fuzz target and the corpus replay test.

use sensorgate_wire::{Accumulator, MAX_FRAME, MAX_RAW, decode_raw, encode, encode_raw};

/// Feeds `data` to an accumulator in chunks whose sizes come from the first byte, and checks:
/// no panic, every byte accounted for, and every accepted frame re-encodes to an equal frame.
pub fn check_accumulator(data: &[u8]) {
    let (chunk, stream) = match data.split_first() {
        Some((&c, rest)) => (usize::from(c % 64) + 1, rest),
        None => (1, data),
    };
    let mut acc = Accumulator::new();
    let mut accounted = 0usize;
    for piece in stream.chunks(chunk) {
        for decoded in acc.feed_iter(piece) {
            assert!(
                decoded.bytes > 0,
                "an outcome consumes at least its delimiter"
            );
            accounted += decoded.bytes;
            if let Ok(frame) = decoded.result {
                let mut wire = [0u8; MAX_FRAME];
                let wire = encode(&frame, &mut wire).expect("an accepted frame re-encodes");
                let mut raw = [0u8; MAX_RAW];
                let raw = encode_raw(&frame, &mut raw).expect("an accepted frame re-encodes");
                assert_eq!(decode_raw(raw).as_ref(), Ok(&frame));
                assert!(wire.len() <= MAX_FRAME);
            }
        }
    }
    assert_eq!(accounted + acc.pending(), stream.len(), "byte accounting");
    let tail = acc.finish().map_or(0, |(_, bytes)| bytes);
    assert_eq!(
        accounted + tail,
        stream.len(),
        "byte accounting after finish"
    );
}
