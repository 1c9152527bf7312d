//! sensorgate LoRa sensor node for the Raspberry Pi Pico (RP2040) with an RFM95W (SX1276).
//!
//! Wiring (Pico pin numbers in brackets):
//! - RFM95W on SPI1: SCK GPIO10 [14], MOSI GPIO11 [15], MISO GPIO12 [16], NSS GPIO13 [17],
//!   RESET GPIO14 [19], DIO0 GPIO15 [20], 3V3 [36], GND [38]; an antenna for the band on ANT.
//! - Sensors as on the wired node: BME280 (optional) on I2C0 GPIO4 SDA [6] / GPIO5 SCL [7],
//!   DS18B20 (optional) on GPIO22 [29] with a 4.7 kΩ pull-up; internal temperature sensor,
//!   VSYS/3 on GPIO29 and the LED on GPIO25 need no wiring.
//!
//! Frames go over the air to a `lora-bridge`; the protocol, the duty cycle and the listen
//! window after each uplink are `sensorgate_node_core::RadioNode`'s. Only built in CI (no
//! radio hardware there).

#![no_std]
#![no_main]

#[allow(dead_code)] // the wired node's settings; this image uses the node id and interval
#[path = "../config.rs"]
mod config;
#[path = "../led.rs"]
mod led;
#[path = "../onewire.rs"]
mod onewire;
#[path = "../radio.rs"]
mod radio;
#[path = "../rt.rs"]
mod rt;
#[path = "../sensors.rs"]
mod sensors;

use embassy_executor::Spawner;
use embassy_rp::clocks::RoscRng;
use embassy_rp::gpio::{Level, Output};
use embassy_rp::watchdog::Watchdog;
use embassy_time::{Duration, Instant, Timer};
use radio::{MAX_PACKET, Radio, Role, SETTINGS};
use rt::{WATCHDOG_TIMEOUT, now, spawn};
use sensorgate_node_core::{Backoff, Effect, Node, NodeConfig, RadioConfig, RadioNode, RadioPoll};

#[cfg(feature = "defmt")]
use defmt_rtt as _;

/// A radio node reports its supply every ten minutes: airtime is scarce.
const HEARTBEAT_INTERVAL_S: u32 = 600;
/// Retransmissions 10 s, 20 s, 40 s … 5 min after the last time on air (plus jitter).
const BACKOFF: Backoff = Backoff {
    first_ms: 10_000,
    max_ms: 300_000,
};
/// A transmission that has not ended this long after its computed time on air failed.
const TX_MARGIN: Duration = Duration::from_secs(1);
/// How often a radio that did not answer is tried again.
const RADIO_RETRY: Duration = Duration::from_secs(10);
/// A `Reboot` waits this long at most for its `Ack` to get airtime.
const REBOOT_GRACE_MS: u64 = 60_000;
/// `SENSORGATE_LORA_ALWAYS_LISTEN=1`: listen whenever idle (mains power), so the bridge may
/// send at any time; otherwise only in the window after each uplink (battery).
const ALWAYS_LISTEN: bool = match option_env!("SENSORGATE_LORA_ALWAYS_LISTEN") {
    Some(value) => matches!(value.as_bytes(), b"1"),
    None => false,
};

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_rp::init(Default::default());

    let mut watchdog = Watchdog::new(p.WATCHDOG);
    let boot_count = rt::start_watchdog(&mut watchdog);

    let led = Output::new(p.PIN_25, Level::Low);
    spawn(&spawner, led::task(led));
    led::signal(led::Pattern::Boot);

    let node_id = config::node_id(p.FLASH);
    let boot_id = RoscRng.next_u32() ^ boot_count.rotate_left(16) ^ boot_count;

    let mut sensors = sensors::Sensors::start(
        &spawner,
        sensors::Peripherals {
            adc: p.ADC,
            temp_sensor: p.ADC_TEMP_SENSOR,
            vsys: p.PIN_29,
            i2c: p.I2C0,
            sda: p.PIN_4,
            scl: p.PIN_5,
            onewire: p.PIN_22,
        },
    )
    .await;

    let mut pins = Some(radio::Pins {
        spi: p.SPI1,
        sck: p.PIN_10,
        mosi: p.PIN_11,
        miso: p.PIN_12,
        nss: p.PIN_13,
        reset: p.PIN_14,
        dio0: p.PIN_15,
        tx_dma: p.DMA_CH0,
        rx_dma: p.DMA_CH1,
    });
    let mut radio = loop {
        watchdog.feed(WATCHDOG_TIMEOUT);
        // The pins are moved into the driver once; a radio that does not answer at boot is
        // retried by a watchdog reset, which starts from fresh peripherals.
        let Some(pins) = pins.take() else {
            wait_for_reset().await
        };
        match Radio::new(pins, Role::Node).await {
            Ok(radio) => break radio,
            Err(_error) => {
                #[cfg(feature = "defmt")]
                defmt::error!("radio: {}", _error);
                led::signal(led::Pattern::Fault);
                rt::sleep_until(&mut watchdog, Instant::now() + RADIO_RETRY).await;
            }
        }
    };

    let node = Node::new(
        NodeConfig {
            node_id,
            boot_id,
            firmware: config::FIRMWARE,
            report_interval_s: config::report_interval_s(),
            heartbeat_interval_s: HEARTBEAT_INTERVAL_S,
            sensors: sensors.announced(),
            backoff: BACKOFF,
        },
        now(),
    );
    let mut node = RadioNode::new(
        node,
        RadioConfig {
            lora: SETTINGS.lora,
            duty: SETTINGS.duty_cycle(),
            rx_window_ms: SETTINGS.rx_window_ms,
            always_listen: ALWAYS_LISTEN,
            ..RadioConfig::EU868
        },
    );
    #[cfg(feature = "defmt")]
    defmt::info!("lora node {=u32:x} boot {=u32:x}", node_id, boot_id);

    let mut reboot_at: Option<u64> = None;
    let mut buf = [0u8; MAX_PACKET];
    loop {
        watchdog.feed(WATCHDOG_TIMEOUT);
        if let Some(deadline) = reboot_at
            && (node.tx_idle() || now() >= deadline)
        {
            Timer::after_millis(10).await;
            watchdog.trigger_reset();
        }
        match node.poll(now()) {
            RadioPoll::Transmit(payload) => {
                let airtime = Duration::from_micros(SETTINGS.lora.airtime_us(payload.len()));
                let deadline = Instant::now() + airtime + TX_MARGIN;
                match rt::feeding(&mut watchdog, deadline, radio.transmit(&payload)).await {
                    Some(Ok(())) => {
                        node.transmitted(now());
                        led::signal(led::Pattern::Sent);
                    }
                    _ => node.transmit_failed(now()),
                }
            }
            RadioPoll::Measure => {
                let readings = sensors.measure().await;
                node.readings(readings, now());
            }
            RadioPoll::Heartbeat => {
                let supply_mv = sensors.supply_millivolts().await;
                node.heartbeat(supply_mv, now());
            }
            RadioPoll::Listen { until } => {
                let deadline = Instant::from_millis(until);
                let received = rt::feeding(&mut watchdog, deadline, radio.receive(&mut buf)).await;
                // Nothing before the deadline, or a reception error (CRC, radio): listen on.
                if let Some(Ok((len, _))) = received {
                    match node.received(&buf[..len.min(buf.len())], now()) {
                        Effect::None => {}
                        Effect::Identify { until } => led::signal(led::Pattern::Identify { until }),
                        Effect::Reboot => reboot_at = Some(now() + REBOOT_GRACE_MS),
                    }
                }
            }
            RadioPoll::Sleep { until } => {
                // A radio that fails to sleep only costs current; the next use reconfigures it.
                let _ = radio.sleep().await;
                rt::sleep_until(&mut watchdog, Instant::from_millis(until)).await;
            }
        }
    }
}

/// Stops feeding the watchdog, which resets the chip.
async fn wait_for_reset() -> ! {
    loop {
        Timer::after_secs(1).await;
    }
}
