//! The RP2040's own analogue inputs: the internal temperature sensor (ADC input 4) and VSYS,
//! which the Pico feeds to GPIO29 (ADC input 3) through a 1/3 divider.

use sensorgate_wire::Value;

use super::div_round;

/// ADC reference voltage on the Pico (3V3 rail) in microvolts.
pub const ADC_VREF_UV: i64 = 3_300_000;
/// Full scale of the 12-bit ADC.
pub const ADC_FULL_SCALE: i64 = 4096;

/// The temperature in hundredths of a degree Celsius for a raw ADC input 4 sample, by the
/// RP2040 datasheet's formula `T = 27 - (V - 0.706) / 0.001721` (section 4.9.5).
pub fn chip_temperature_centi(raw: u16) -> i32 {
    // T·100 = 2700 - (raw·Vref/4096 - 0.706 V)·100 / 1.721 mV, all in µV over 4096.
    let numerator = (i64::from(raw & 0x0fff) * ADC_VREF_UV - 706_000 * ADC_FULL_SCALE) * 100;
    (2700 - div_round(numerator, 1721 * ADC_FULL_SCALE)) as i32
}

/// [`chip_temperature_centi`] as a wire value in °C.
pub fn chip_temperature(raw: u16) -> Value {
    Value::new(chip_temperature_centi(raw), -2)
}

/// The raw sample the sensor gives at `centi` hundredths of a degree: the inverse of
/// [`chip_temperature_centi`], used by tests and the emulator harness.
pub fn chip_temperature_raw(centi: i32) -> u16 {
    // V(µV) = 706000 - (T - 27)·1721, raw = V·4096/Vref.
    let uv = 706_000 - div_round((i64::from(centi) - 2700) * 1721, 100);
    div_round(uv * ADC_FULL_SCALE, ADC_VREF_UV).clamp(0, 4095) as u16
}

/// VSYS in millivolts for a raw ADC input 3 sample (the Pico's 1/3 divider).
pub fn vsys_millivolts(raw: u16) -> u16 {
    div_round(
        i64::from(raw & 0x0fff) * 3 * ADC_VREF_UV / 1000,
        ADC_FULL_SCALE,
    ) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_27_degrees_the_sensor_reads_706_millivolts() {
        // 0.706 V · 4096 / 3.3 V = 876.2
        assert_eq!(chip_temperature_raw(2700), 876);
        let t = chip_temperature_centi(876);
        assert!((2680..=2720).contains(&t), "{t}"); // within half an ADC step
    }

    #[test]
    fn the_conversion_falls_with_voltage_about_half_a_degree_per_step() {
        let step = chip_temperature_centi(880) - chip_temperature_centi(881);
        assert_eq!(step, 47); // 0.806 mV per step / 1.721 mV per degree
    }

    #[test]
    fn raw_and_temperature_round_trip_within_one_adc_step() {
        for centi in (-2000..=8000).step_by(37) {
            let back = chip_temperature_centi(chip_temperature_raw(centi));
            assert!((back - centi).abs() <= 24, "{centi} -> {back}");
        }
    }

    #[test]
    fn vsys_scales_by_the_divider() {
        assert_eq!(vsys_millivolts(0), 0);
        assert_eq!(vsys_millivolts(2068), 4998); // USB-powered Pico, about 5 V
        assert_eq!(vsys_millivolts(4095), 9898);
    }
}
