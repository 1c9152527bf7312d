//! The `lines` protocol (placeholder until the decoder lands).

use super::{Decoded, Decoder, NodeId};

/// Where a `lines` port takes the node id from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSource {
    /// Every line comes from this node (one sensor per port).
    Fixed(NodeId),
    /// The value of this key in each line names the node (`node=kitchen temp=21.5`).
    Key(String),
}

pub struct LinesDecoder {
    _node: NodeSource,
}

impl LinesDecoder {
    pub fn new(node: NodeSource) -> Self {
        LinesDecoder { _node: node }
    }
}

impl Decoder for LinesDecoder {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        out.push(Decoded::Ignored { bytes: bytes.len() });
    }
    fn finish(&mut self, _out: &mut Vec<Decoded>) {}
    fn pending(&self) -> usize {
        0
    }
}
