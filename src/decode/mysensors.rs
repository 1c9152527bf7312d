//! The MySensors serial API (placeholder until the decoder lands).

use super::{Decoded, Decoder};

#[derive(Default)]
pub struct MySensorsDecoder {}

impl MySensorsDecoder {
    pub fn new() -> Self {
        MySensorsDecoder {}
    }
}

impl Decoder for MySensorsDecoder {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        out.push(Decoded::Ignored { bytes: bytes.len() });
    }
    fn finish(&mut self, _out: &mut Vec<Decoded>) {}
    fn pending(&self) -> usize {
        0
    }
}
