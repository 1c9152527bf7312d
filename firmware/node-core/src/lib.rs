#![cfg_attr(not(test), no_std)]
//! The sensor node's logic without hardware: what to send when, the queue of unacknowledged
//! readings and its retransmission, command handling, the radio duty cycle, and the arithmetic
//! that turns raw sensor registers into readings. The embassy firmware in `firmware/node` only
//! moves bytes and register values between the hardware and these types, so everything here is
//! tested on the host with `cargo test -p sensorgate-node-core`.
//!
//! Time is a plain millisecond count since boot ([`Millis`]); the firmware passes
//! `embassy_time::Instant::now().as_millis()`.

pub mod bridge;
pub mod duty;
pub mod node;
pub mod queue;
pub mod radio;
pub mod sensors;

pub use bridge::{Bridge, BridgeConfig, BridgePoll};
pub use duty::{DutyCycle, LoraParams};
pub use node::{Effect, Node, NodeConfig, Poll, Reply};
pub use queue::{Backoff, UplinkQueue};
pub use radio::{RadioConfig, RadioNode, RadioPoll};

/// Milliseconds since boot.
pub type Millis = u64;

/// Folds the RP2040 flash chip's 64-bit unique id into a 32-bit node id (never 0, which
/// configuration tools treat as "unset").
pub fn node_id_from_unique_id(unique_id: [u8; 8]) -> u32 {
    let hi = u32::from_le_bytes([unique_id[0], unique_id[1], unique_id[2], unique_id[3]]);
    let lo = u32::from_le_bytes([unique_id[4], unique_id[5], unique_id[6], unique_id[7]]);
    match hi ^ lo.rotate_left(16) {
        0 => 1,
        id => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_depends_on_every_unique_id_byte_and_is_never_zero() {
        let base = node_id_from_unique_id([1, 2, 3, 4, 5, 6, 7, 8]);
        for i in 0..8 {
            let mut id = [1, 2, 3, 4, 5, 6, 7, 8];
            id[i] ^= 0x80;
            assert_ne!(node_id_from_unique_id(id), base, "byte {i}");
        }
        assert_ne!(node_id_from_unique_id([0; 8]), 0);
    }
}
