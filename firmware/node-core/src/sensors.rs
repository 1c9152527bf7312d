//! Raw sensor values to readings, in integer arithmetic (the RP2040 has no FPU). The firmware
//! reads registers; these functions give the calibrated value as a wire [`Value`](sensorgate_wire::Value).

pub mod bme280;
pub mod ds18b20;
pub mod rp2040;

/// Channel numbers this firmware uses in `Hello` and `Readings`.
pub mod channel {
    /// RP2040 internal temperature sensor (ADC input 4).
    pub const CHIP_TEMPERATURE: u8 = 0;
    pub const BME280_TEMPERATURE: u8 = 1;
    pub const BME280_HUMIDITY: u8 = 2;
    pub const BME280_PRESSURE: u8 = 3;
    pub const DS18B20_TEMPERATURE: u8 = 4;
}

/// `n / d` rounded to nearest, halves away from zero (`d > 0`).
pub(crate) fn div_round(n: i64, d: i64) -> i64 {
    if n >= 0 {
        (n + d / 2) / d
    } else {
        (n - d / 2) / d
    }
}
