//! The node's sensors: the RP2040 temperature sensor and VSYS on the ADC (always there), a
//! BME280 on I2C0 and a DS18B20 on GPIO22 (used when found at boot). Register values are
//! turned into readings by `sensorgate_node_core::sensors`.

use embassy_executor::Spawner;
use embassy_rp::Peri;
use embassy_rp::adc::{self, Adc, Async};
use embassy_rp::bind_interrupts;
use embassy_rp::gpio::Pull;
use embassy_rp::i2c::{self, I2c};
use embassy_rp::peripherals::{ADC, ADC_TEMP_SENSOR, I2C0, PIN_4, PIN_5, PIN_22, PIN_29};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::mutex::Mutex;
use embassy_time::{Duration, Timer, with_timeout};
use heapless::Vec;
use sensorgate_node_core::sensors::{bme280, channel, rp2040};
use sensorgate_wire::{MAX_SENSORS, Quantity, Reading, Readings, SensorInfo, Unit, Value};

use crate::onewire;

bind_interrupts!(struct Irqs {
    ADC_IRQ_FIFO => adc::InterruptHandler;
    I2C0_IRQ => i2c::InterruptHandler<I2C0>;
});

/// An I²C transaction that takes longer than this means no (working) device.
const I2C_TIMEOUT: Duration = Duration::from_millis(50);

pub struct Peripherals {
    pub adc: Peri<'static, ADC>,
    pub temp_sensor: Peri<'static, ADC_TEMP_SENSOR>,
    pub vsys: Peri<'static, PIN_29>,
    pub i2c: Peri<'static, I2C0>,
    pub sda: Peri<'static, PIN_4>,
    pub scl: Peri<'static, PIN_5>,
    pub onewire: Peri<'static, PIN_22>,
}

struct Bme280 {
    i2c: I2c<'static, I2C0, i2c::Async>,
    address: u8,
    calibration: bme280::Calibration,
}

pub struct Sensors {
    adc: Adc<'static, Async>,
    temp_sensor: adc::Channel<'static>,
    vsys: adc::Channel<'static>,
    bme280: Option<Bme280>,
    ds18b20: bool,
}

/// The DS18B20's latest temperature in hundredths of a degree, from its own task (a
/// conversion takes 750 ms, longer than the main loop may wait).
static DS18B20_LATEST: Mutex<CriticalSectionRawMutex, Option<i32>> = Mutex::new(None);

impl Sensors {
    /// Sets up the ADC and probes for the optional sensors.
    pub async fn start(spawner: &Spawner, p: Peripherals) -> Self {
        let adc = Adc::new(p.adc, Irqs, adc::Config::default());
        let temp_sensor = adc::Channel::new_temp_sensor(p.temp_sensor);
        let vsys = adc::Channel::new_pin(p.vsys, Pull::None);

        let mut config = i2c::Config::default();
        config.frequency = 100_000;
        let i2c = I2c::new_async(p.i2c, p.scl, p.sda, Irqs, config);
        let bme280 = probe_bme280(i2c).await;

        let mut bus = onewire::OneWire::new(p.onewire);
        let ds18b20 = bus.reset();
        if ds18b20 {
            crate::spawn(spawner, ds18b20_task(bus));
        }
        Sensors {
            adc,
            temp_sensor,
            vsys,
            bme280,
            ds18b20,
        }
    }

    /// The channels announced in `Hello`.
    pub fn announced(&self) -> Vec<SensorInfo, MAX_SENSORS> {
        let mut sensors = Vec::new();
        let mut add = |channel, quantity: Quantity, unit| {
            let _ = sensors.push(SensorInfo {
                channel,
                quantity,
                unit,
            });
        };
        add(
            channel::CHIP_TEMPERATURE,
            Quantity::Temperature,
            Unit::DegreeCelsius,
        );
        if self.bme280.is_some() {
            add(
                channel::BME280_TEMPERATURE,
                Quantity::Temperature,
                Unit::DegreeCelsius,
            );
            add(
                channel::BME280_HUMIDITY,
                Quantity::Humidity,
                Unit::PercentRh,
            );
            add(
                channel::BME280_PRESSURE,
                Quantity::Pressure,
                Unit::Hectopascal,
            );
        }
        if self.ds18b20 {
            add(
                channel::DS18B20_TEMPERATURE,
                Quantity::Temperature,
                Unit::DegreeCelsius,
            );
        }
        sensors
    }

    /// One reading per working channel; a sensor that fails this time is left out.
    pub async fn measure(&mut self) -> Readings {
        let mut readings = Readings::default();
        let mut add = |channel, value: Value| {
            let _ = readings.readings.push(Reading { channel, value });
        };
        if let Ok(raw) = self.adc.read(&mut self.temp_sensor).await {
            add(channel::CHIP_TEMPERATURE, rp2040::chip_temperature(raw));
        }
        if let Some(bme) = self.bme280.as_mut()
            && let Some(m) = bme.measure().await
        {
            add(
                channel::BME280_TEMPERATURE,
                Value::new(m.temperature_centi, -2),
            );
            add(
                channel::BME280_HUMIDITY,
                Value::new(m.humidity_centi as i32, -2),
            );
            add(
                channel::BME280_PRESSURE,
                Value::new(m.pressure_pa as i32, -2),
            );
        }
        if self.ds18b20
            && let Some(centi) = *DS18B20_LATEST.lock().await
        {
            add(channel::DS18B20_TEMPERATURE, Value::new(centi, -2));
        }
        readings
    }

    /// VSYS in millivolts (0 if the ADC fails).
    pub async fn supply_millivolts(&mut self) -> u16 {
        match self.adc.read(&mut self.vsys).await {
            Ok(raw) => rp2040::vsys_millivolts(raw),
            Err(_) => 0,
        }
    }
}

async fn probe_bme280(mut i2c: I2c<'static, I2C0, i2c::Async>) -> Option<Bme280> {
    for address in [bme280::ADDRESS, bme280::ADDRESS_ALT] {
        let mut id = [0u8];
        let probe = i2c.write_read_async(address, [bme280::REG_CHIP_ID], &mut id);
        if !matches!(with_timeout(I2C_TIMEOUT, probe).await, Ok(Ok(()))) || id[0] != bme280::CHIP_ID
        {
            continue;
        }
        let mut block0 = [0u8; bme280::CALIB_00_LEN];
        let mut block1 = [0u8; bme280::CALIB_26_LEN];
        let calibration = async {
            i2c.write_read_async(address, [bme280::REG_CALIB_00], &mut block0)
                .await?;
            i2c.write_read_async(address, [bme280::REG_CALIB_26], &mut block1)
                .await
        };
        if let Ok(Ok(())) = with_timeout(I2C_TIMEOUT, calibration).await {
            return Some(Bme280 {
                i2c,
                address,
                calibration: bme280::Calibration::parse(&block0, &block1),
            });
        }
    }
    None
}

impl Bme280 {
    /// One forced-mode measurement; `None` on a bus error or timeout.
    async fn measure(&mut self) -> Option<bme280::Measurement> {
        let address = self.address;
        let start = async {
            // ctrl_hum takes effect on the following ctrl_meas write.
            self.i2c
                .write_async(address, [bme280::REG_CTRL_HUM, bme280::CTRL_HUM_OSRS_1])
                .await?;
            self.i2c
                .write_async(
                    address,
                    [bme280::REG_CTRL_MEAS, bme280::CTRL_MEAS_FORCED_1X],
                )
                .await
        };
        with_timeout(I2C_TIMEOUT, start).await.ok()?.ok()?;
        Timer::after_millis(bme280::MEASURE_MS).await;
        let mut data = [0u8; bme280::DATA_LEN];
        let read = self
            .i2c
            .write_read_async(address, [bme280::REG_DATA], &mut data);
        with_timeout(I2C_TIMEOUT, read).await.ok()?.ok()?;
        let raw = bme280::RawSample::parse(&data);
        Some(bme280::compensate(&self.calibration, &raw))
    }
}

#[embassy_executor::task]
async fn ds18b20_task(mut bus: onewire::OneWire) {
    use sensorgate_node_core::sensors::ds18b20;
    loop {
        let mut value = None;
        if bus.reset() {
            bus.write_byte(ds18b20::SKIP_ROM);
            bus.write_byte(ds18b20::CONVERT_T);
            Timer::after_millis(ds18b20::CONVERSION_MS).await;
            if bus.reset() {
                bus.write_byte(ds18b20::SKIP_ROM);
                bus.write_byte(ds18b20::READ_SCRATCHPAD);
                let mut scratchpad = [0u8; 9];
                for byte in scratchpad.iter_mut() {
                    *byte = bus.read_byte();
                }
                value = ds18b20::temperature_centi(&scratchpad).ok();
            }
        }
        *DS18B20_LATEST.lock().await = value;
        Timer::after_secs(5).await;
    }
}
