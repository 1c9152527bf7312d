//! DS18B20 1-Wire thermometer: the scratchpad it returns after a conversion, and the Maxim
//! CRC-8 that guards it (and the ROM code).

/// 1-Wire ROM commands and function commands the firmware uses.
pub const SKIP_ROM: u8 = 0xCC;
pub const CONVERT_T: u8 = 0x44;
pub const READ_SCRATCHPAD: u8 = 0xBE;
/// Worst-case 12-bit conversion time.
pub const CONVERSION_MS: u64 = 750;

/// Why a scratchpad was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScratchpadError {
    /// CRC mismatch: a bus error or a missing pull-up.
    Crc,
    /// All ones (no device answered) or all zeros (bus held low): no working device.
    NoDevice,
}

/// Dallas/Maxim CRC-8 (x⁸ + x⁵ + x⁴ + 1, reflected), as the DS18B20 computes it.
pub fn crc8(bytes: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &byte in bytes {
        let mut b = byte;
        for _ in 0..8 {
            let mix = (crc ^ b) & 1;
            crc >>= 1;
            if mix != 0 {
                crc ^= 0x8C;
            }
            b >>= 1;
        }
    }
    crc
}

/// The temperature in hundredths of a degree from a 9-byte scratchpad (12-bit resolution).
pub fn temperature_centi(scratchpad: &[u8; 9]) -> Result<i32, ScratchpadError> {
    if scratchpad.iter().all(|&b| b == 0xFF) || scratchpad.iter().all(|&b| b == 0) {
        return Err(ScratchpadError::NoDevice);
    }
    if crc8(&scratchpad[..8]) != scratchpad[8] {
        return Err(ScratchpadError::Crc);
    }
    let sixteenths = i16::from_le_bytes([scratchpad[0], scratchpad[1]]);
    Ok(super::div_round(i64::from(sixteenths) * 100, 16) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratchpad(lsb: u8, msb: u8) -> [u8; 9] {
        let mut s = [lsb, msb, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10, 0];
        s[8] = crc8(&s[..8]);
        s
    }

    #[test]
    fn crc8_matches_the_maxim_application_note_example() {
        // ROM code 02 1C B8 01 00 00 00 with CRC A2 (Maxim AN27).
        assert_eq!(crc8(&[0x02, 0x1C, 0xB8, 0x01, 0x00, 0x00, 0x00]), 0xA2);
        assert_eq!(crc8(&[0x02, 0x1C, 0xB8, 0x01, 0x00, 0x00, 0x00, 0xA2]), 0);
    }

    #[test]
    fn datasheet_temperatures_decode() {
        assert_eq!(temperature_centi(&scratchpad(0x91, 0x01)), Ok(2506)); // +25.0625
        assert_eq!(temperature_centi(&scratchpad(0x5E, 0xFF)), Ok(-1013)); // -10.125
        assert_eq!(temperature_centi(&scratchpad(0xD0, 0x07)), Ok(12500)); // +125
        assert_eq!(temperature_centi(&scratchpad(0x90, 0xFC)), Ok(-5500)); // -55
    }

    #[test]
    fn a_corrupt_or_absent_scratchpad_is_refused() {
        let mut s = scratchpad(0x91, 0x01);
        s[0] ^= 1;
        assert_eq!(temperature_centi(&s), Err(ScratchpadError::Crc));
        assert_eq!(
            temperature_centi(&[0xFF; 9]),
            Err(ScratchpadError::NoDevice)
        );
    }
}
