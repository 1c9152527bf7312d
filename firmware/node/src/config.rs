//! Build-time configuration. Set at `cargo build` time:
//! - `SENSORGATE_NODE_ID`: the node id (decimal or `0x` hex); default: from the flash unique id.
//! - `SENSORGATE_INTERVAL_S`: seconds between readings (default 60); the gateway can change it
//!   at run time with a `SetReportInterval` command (not kept across reboots).

use embassy_rp::Peri;
use embassy_rp::flash::{Blocking, Flash};
use embassy_rp::peripherals::FLASH;
use sensorgate_wire::FirmwareVersion;

pub const FIRMWARE: FirmwareVersion = FirmwareVersion {
    major: parse_u8(env!("CARGO_PKG_VERSION_MAJOR")),
    minor: parse_u8(env!("CARGO_PKG_VERSION_MINOR")),
    patch: parse_u8(env!("CARGO_PKG_VERSION_PATCH")),
};

pub const DEFAULT_INTERVAL_S: u32 = 60;
/// The node id of the `emulator` build (0x00C0FFEE).
pub const EMULATOR_NODE_ID: u32 = 0x00C0_FFEE;
pub const HEARTBEAT_INTERVAL_S: u32 = 60;
/// The Pico's flash size.
const FLASH_SIZE: usize = 2 * 1024 * 1024;

/// The configured node id, else one derived from the flash chip's unique id.
pub fn node_id(flash: Peri<'static, FLASH>) -> u32 {
    if let Some(id) = option_env!("SENSORGATE_NODE_ID").and_then(parse_u32) {
        return id;
    }
    // The emulator has no boot ROM to read the flash id with: a fixed, recognisable id.
    if cfg!(feature = "emulator") {
        return EMULATOR_NODE_ID;
    }
    let mut flash: Flash<'_, FLASH, Blocking, FLASH_SIZE> = Flash::new_blocking(flash);
    let mut uid = [0u8; 8];
    match flash.blocking_unique_id(&mut uid) {
        Ok(()) => sensorgate_node_core::node_id_from_unique_id(uid),
        // Cannot read the id: fall back to a fixed id the gateway will show as a duplicate.
        Err(_) => 1,
    }
}

pub fn report_interval_s() -> u32 {
    option_env!("SENSORGATE_INTERVAL_S")
        .and_then(parse_u32)
        .filter(|&s| s > 0)
        .unwrap_or(DEFAULT_INTERVAL_S)
}

/// Parses decimal or `0x`-prefixed hexadecimal.
fn parse_u32(text: &str) -> Option<u32> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

const fn parse_u8(text: &str) -> u8 {
    let bytes = text.as_bytes();
    let mut value = 0u8;
    let mut i = 0;
    while i < bytes.len() {
        value = value * 10 + (bytes[i] - b'0');
        i += 1;
    }
    value
}
