//! Feeds arbitrary bytes to the MQTT decoder: no input may panic, and every packet decoded must
//! re-encode to the same bytes and decode to the same packet (see `../round_trip.rs`).
#![no_main]

// The codec is compiled in directly rather than through the `sensorgate` crate, so the fuzz
// build needs only `bytes`, `thiserror` and `serde`, not tokio and rustls. The codec depends on
// nothing else in the crate, and must keep it that way.
#[allow(dead_code, unused_imports)]
#[path = "../../src/broker/codec/mod.rs"]
mod codec;
// The outcome it returns is for `tests/codec_corpus.rs`; here only its panics matter.
#[allow(dead_code)]
#[path = "../round_trip.rs"]
mod round_trip;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    round_trip::check(data);
});
