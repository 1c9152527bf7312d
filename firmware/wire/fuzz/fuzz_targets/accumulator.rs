#![no_main]
//! Arbitrary bytes, in arbitrary chunks, into the frame accumulator.

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::check_accumulator(data));
