//! Bosch BME280 (temperature, humidity, pressure on I²C): register map, calibration parsing
//! and the datasheet's integer compensation formulas (BST-BME280-DS002, section 4.2.3).

/// I²C address with SDO to GND; 0x77 with SDO to VDDIO.
pub const ADDRESS: u8 = 0x76;
pub const ADDRESS_ALT: u8 = 0x77;
pub const REG_CHIP_ID: u8 = 0xD0;
pub const CHIP_ID: u8 = 0x60;
pub const REG_CALIB_00: u8 = 0x88;
pub const CALIB_00_LEN: usize = 26;
pub const REG_CALIB_26: u8 = 0xE1;
pub const CALIB_26_LEN: usize = 7;
pub const REG_CTRL_HUM: u8 = 0xF2;
pub const REG_CTRL_MEAS: u8 = 0xF4;
pub const REG_DATA: u8 = 0xF7;
pub const DATA_LEN: usize = 8;
/// Humidity oversampling ×1.
pub const CTRL_HUM_OSRS_1: u8 = 0b001;
/// Temperature ×1, pressure ×1, forced mode (one measurement, then sleep).
pub const CTRL_MEAS_FORCED_1X: u8 = (0b001 << 5) | (0b001 << 2) | 0b01;
/// Measurement time at ×1 oversampling of all three, rounded up (datasheet 9.1: 9.3 ms max).
pub const MEASURE_MS: u64 = 10;

/// The factory calibration words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Calibration {
    pub t1: u16,
    pub t2: i16,
    pub t3: i16,
    pub p1: u16,
    pub p2: i16,
    pub p3: i16,
    pub p4: i16,
    pub p5: i16,
    pub p6: i16,
    pub p7: i16,
    pub p8: i16,
    pub p9: i16,
    pub h1: u8,
    pub h2: i16,
    pub h3: u8,
    pub h4: i16,
    pub h5: i16,
    pub h6: i8,
}

impl Calibration {
    /// Parses the two calibration blocks read from 0x88..=0xA1 and 0xE1..=0xE7.
    pub fn parse(block0: &[u8; CALIB_00_LEN], block1: &[u8; CALIB_26_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([block0[i], block0[i + 1]]);
        let s = |i: usize| u(i) as i16;
        Calibration {
            t1: u(0),
            t2: s(2),
            t3: s(4),
            p1: u(6),
            p2: s(8),
            p3: s(10),
            p4: s(12),
            p5: s(14),
            p6: s(16),
            p7: s(18),
            p8: s(20),
            p9: s(22),
            h1: block0[25],
            h2: i16::from_le_bytes([block1[0], block1[1]]),
            h3: block1[2],
            // 12-bit signed values split across nibbles of 0xE4..0xE6.
            h4: ((i16::from(block1[3] as i8)) << 4) | i16::from(block1[4] & 0x0F),
            h5: ((i16::from(block1[5] as i8)) << 4) | i16::from(block1[4] >> 4),
            h6: block1[6] as i8,
        }
    }
}

/// Raw ADC values from one burst read of 0xF7..=0xFE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSample {
    pub pressure: i32,
    pub temperature: i32,
    pub humidity: i32,
}

impl RawSample {
    pub fn parse(data: &[u8; DATA_LEN]) -> Self {
        let twenty = |i: usize| {
            (i32::from(data[i]) << 12)
                | (i32::from(data[i + 1]) << 4)
                | (i32::from(data[i + 2]) >> 4)
        };
        RawSample {
            pressure: twenty(0),
            temperature: twenty(3),
            humidity: (i32::from(data[6]) << 8) | i32::from(data[7]),
        }
    }
}

/// A compensated measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Hundredths of a degree Celsius.
    pub temperature_centi: i32,
    /// Pascals (equivalently hundredths of a hectopascal).
    pub pressure_pa: u32,
    /// Hundredths of a percent relative humidity.
    pub humidity_centi: u32,
}

/// Applies the datasheet's compensation to a raw sample.
pub fn compensate(cal: &Calibration, raw: &RawSample) -> Measurement {
    let (temperature_centi, t_fine) = temperature(cal, raw.temperature);
    let pressure_q24_8 = pressure(cal, raw.pressure, t_fine);
    let humidity_q22_10 = humidity(cal, raw.humidity, t_fine);
    Measurement {
        temperature_centi,
        pressure_pa: pressure_q24_8 / 256,
        humidity_centi: ((u64::from(humidity_q22_10) * 100 + 512) / 1024) as u32,
    }
}

/// Temperature in 0.01 °C and the `t_fine` value the other two formulas need.
fn temperature(cal: &Calibration, adc_t: i32) -> (i32, i32) {
    let t1 = i32::from(cal.t1);
    let var1 = (((adc_t >> 3) - (t1 << 1)) * i32::from(cal.t2)) >> 11;
    let d = (adc_t >> 4) - t1;
    let var2 = (((d * d) >> 12) * i32::from(cal.t3)) >> 14;
    let t_fine = var1 + var2;
    ((t_fine * 5 + 128) >> 8, t_fine)
}

/// Pressure in Pa as Q24.8 (64-bit variant).
fn pressure(cal: &Calibration, adc_p: i32, t_fine: i32) -> u32 {
    let mut var1 = i64::from(t_fine) - 128_000;
    let mut var2 = var1 * var1 * i64::from(cal.p6);
    var2 += (var1 * i64::from(cal.p5)) << 17;
    var2 += i64::from(cal.p4) << 35;
    var1 = ((var1 * var1 * i64::from(cal.p3)) >> 8) + ((var1 * i64::from(cal.p2)) << 12);
    var1 = (((1i64 << 47) + var1) * i64::from(cal.p1)) >> 33;
    if var1 == 0 {
        return 0; // avoids a division by zero with blank calibration
    }
    let mut p = 1_048_576 - i64::from(adc_p);
    p = (((p << 31) - var2) * 3125) / var1;
    let var1 = (i64::from(cal.p9) * (p >> 13) * (p >> 13)) >> 25;
    let var2 = (i64::from(cal.p8) * p) >> 19;
    (((p + var1 + var2) >> 8) + (i64::from(cal.p7) << 4)).clamp(0, i64::from(u32::MAX)) as u32
}

/// Relative humidity in %RH as Q22.10.
fn humidity(cal: &Calibration, adc_h: i32, t_fine: i32) -> u32 {
    let v = t_fine - 76_800;
    let a = ((adc_h << 14) - (i32::from(cal.h4) << 20) - (i32::from(cal.h5) * v) + 16_384) >> 15;
    let b = ((((((v * i32::from(cal.h6)) >> 10) * (((v * i32::from(cal.h3)) >> 11) + 32_768))
        >> 10)
        + 2_097_152)
        * i32::from(cal.h2)
        + 8_192)
        >> 14;
    let mut x = a * b;
    x -= ((((x >> 15) * (x >> 15)) >> 7) * i32::from(cal.h1)) >> 4;
    (x.clamp(0, 419_430_400) >> 12) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of the Bosch BMP280/BME280 datasheets (temperature and pressure).
    fn datasheet_calibration() -> Calibration {
        Calibration {
            t1: 27504,
            t2: 26435,
            t3: -1000,
            p1: 36477,
            p2: -10685,
            p3: 3024,
            p4: 2855,
            p5: 140,
            p6: -7,
            p7: 15500,
            p8: -14600,
            p9: 6000,
            h1: 75,
            h2: 362,
            h3: 0,
            h4: 313,
            h5: 50,
            h6: 30,
        }
    }

    #[test]
    fn the_datasheet_example_gives_25_08_degrees_and_100653_pascal() {
        let cal = datasheet_calibration();
        let (t, t_fine) = temperature(&cal, 519_888);
        assert_eq!(t, 2508);
        assert_eq!(t_fine, 128_422);
        assert_eq!(pressure(&cal, 415_148, t_fine) / 256, 100_653);
    }

    /// The datasheet's floating-point humidity formula, as an oracle for the integer one.
    fn humidity_float(cal: &Calibration, adc_h: i32, t_fine: i32) -> f64 {
        let v = f64::from(t_fine) - 76_800.0;
        let mut h = (f64::from(adc_h)
            - (f64::from(cal.h4) * 64.0 + f64::from(cal.h5) / 16_384.0 * v))
            * (f64::from(cal.h2) / 65_536.0
                * (1.0
                    + f64::from(cal.h6) / 67_108_864.0
                        * v
                        * (1.0 + f64::from(cal.h3) / 67_108_864.0 * v)));
        h *= 1.0 - f64::from(cal.h1) * h / 524_288.0;
        h.clamp(0.0, 100.0)
    }

    #[test]
    fn integer_humidity_agrees_with_the_float_formula() {
        let cal = datasheet_calibration();
        for adc_h in (20_000..40_000).step_by(997) {
            for t_fine in [90_000, 128_422, 150_000] {
                let int = f64::from(humidity(&cal, adc_h, t_fine)) / 1024.0;
                let float = humidity_float(&cal, adc_h, t_fine);
                assert!(
                    (int - float).abs() < 0.05,
                    "adc_h {adc_h}: {int} vs {float}"
                );
            }
        }
    }

    #[test]
    fn calibration_and_data_blocks_parse_little_endian_and_nibble_packed() {
        let mut b0 = [0u8; CALIB_00_LEN];
        b0[0..2].copy_from_slice(&27504u16.to_le_bytes());
        b0[2..4].copy_from_slice(&26435i16.to_le_bytes());
        b0[4..6].copy_from_slice(&(-1000i16).to_le_bytes());
        b0[25] = 75;
        // H4 = 0x139 (313), H5 = -0x32 (-50 as 12-bit: 0xFCE).
        let b1 = [0x6A, 0x01, 0x00, 0x13, 0xE9, 0xFC, 0x1E];
        let cal = Calibration::parse(&b0, &b1);
        assert_eq!((cal.t1, cal.t2, cal.t3, cal.h1), (27504, 26435, -1000, 75));
        assert_eq!(
            (cal.h2, cal.h3, cal.h4, cal.h5, cal.h6),
            (362, 0, 313, -50, 30)
        );

        let raw = RawSample::parse(&[0x65, 0x5A, 0xC0, 0x7E, 0xED, 0x00, 0x75, 0x30]);
        assert_eq!(
            raw,
            RawSample {
                pressure: 415_148,
                temperature: 519_888,
                humidity: 30_000
            }
        );
    }

    #[test]
    fn compensate_reports_hundredths() {
        let cal = datasheet_calibration();
        let m = compensate(
            &cal,
            &RawSample {
                pressure: 415_148,
                temperature: 519_888,
                humidity: 30_000,
            },
        );
        assert_eq!(m.temperature_centi, 2508);
        assert_eq!(m.pressure_pa, 100_653);
        assert!(m.humidity_centi > 0 && m.humidity_centi <= 10_000);
    }
}
