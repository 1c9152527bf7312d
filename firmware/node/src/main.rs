//! sensorgate wired sensor node for the Raspberry Pi Pico (RP2040).
//!
//! Wiring (Pico pin numbers in brackets):
//! - frames over UART0 (feature `transport-uart`, default): GPIO0 TX [1] → gateway RX,
//!   GPIO1 RX [2] ← gateway TX, GND [3]; 115200 8N1, 3.3 V levels. Or over the USB port as a
//!   CDC-ACM serial device (feature `transport-usb`).
//! - BME280 (optional) on I2C0: GPIO4 SDA [6], GPIO5 SCL [7], 3V3 [36], GND; address 0x76 or 0x77.
//! - DS18B20 (optional) data on GPIO22 [29] with a 4.7 kΩ pull-up to 3V3 [36], GND.
//! - The internal temperature sensor (ADC4), VSYS/3 on GPIO29 (ADC3) and the LED on GPIO25 need
//!   no wiring.
//!
//! All protocol logic lives in `sensorgate-node-core`; this file connects it to the hardware.

#![no_std]
#![no_main]

mod config;
mod led;
mod link;
mod onewire;
mod sensors;

use embassy_executor::{SpawnError, SpawnToken, Spawner};
use embassy_futures::select::{Either, select};
use embassy_rp::clocks::RoscRng;
use embassy_rp::gpio::{Level, Output};
use embassy_rp::watchdog::Watchdog;
use embassy_time::{Duration, Instant, Timer};
use sensorgate_node_core::{Effect, Node, NodeConfig, Poll, Reply};

#[cfg(feature = "defmt")]
use defmt_rtt as _;

/// The watchdog resets the chip if the main loop stalls this long (the RP2040 maximum is ~8.3 s).
const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(5);
/// The main loop wakes at least this often to feed the watchdog.
const WATCHDOG_FEED: Duration = Duration::from_secs(1);
/// Watchdog scratch register that counts boots since power-on (it survives watchdog resets).
const BOOT_COUNT_SCRATCH: usize = 0;

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_rp::init(Default::default());

    let mut watchdog = Watchdog::new(p.WATCHDOG);
    let boot_count = watchdog.get_scratch(BOOT_COUNT_SCRATCH).wrapping_add(1);
    watchdog.set_scratch(BOOT_COUNT_SCRATCH, boot_count);
    watchdog.start(WATCHDOG_TIMEOUT);

    let led = Output::new(p.PIN_25, Level::Low);
    spawn(&spawner, led::task(led));
    led::signal(led::Pattern::Boot);

    let node_id = config::node_id(p.FLASH);
    // Random from the ring oscillator, mixed with the boot counter so that two boots differ
    // even where ROSC jitter is poor.
    let boot_id = RoscRng.next_u32() ^ boot_count.rotate_left(16) ^ boot_count;

    let link = link::start(&spawner, link::Pins::take(p.UART0, p.PIN_0, p.PIN_1, p.USB));
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

    let mut node = Node::new(
        NodeConfig {
            node_id,
            boot_id,
            firmware: config::FIRMWARE,
            report_interval_s: config::report_interval_s(),
            heartbeat_interval_s: config::HEARTBEAT_INTERVAL_S,
            sensors: sensors.announced(),
            backoff: Default::default(),
        },
        now(),
    );
    #[cfg(feature = "defmt")]
    defmt::info!("node {=u32:x} boot {=u32:x}", node_id, boot_id);

    loop {
        watchdog.feed(WATCHDOG_TIMEOUT);
        match node.poll(now()) {
            Poll::Send(frame) => link.send(&frame),
            Poll::Measure => {
                let readings = sensors.measure().await;
                let frame = node.readings(readings, now());
                link.send(&frame);
                led::signal(led::Pattern::Sent);
            }
            Poll::Heartbeat => {
                let supply_mv = sensors.supply_millivolts().await;
                link.send(&node.heartbeat(supply_mv, now()));
            }
            Poll::Idle { until } => {
                let wake = Instant::from_millis(until).min(Instant::now() + WATCHDOG_FEED);
                if let Either::First(incoming) = select(link::receive(), Timer::at(wake)).await {
                    let reply = match incoming {
                        Ok(frame) => node.on_frame(&frame, now()),
                        Err(error) => node.on_frame_error(&error),
                    };
                    carry_out(reply, &link, &mut watchdog).await;
                }
            }
        }
    }
}

async fn carry_out(reply: Reply, link: &link::Link, watchdog: &mut Watchdog) {
    if let Some(frame) = reply.frame {
        link.send(&frame);
    }
    match reply.effect {
        Effect::None => {}
        Effect::Identify { until } => led::signal(led::Pattern::Identify { until }),
        Effect::Reboot => {
            // Let the Ack leave before the reset.
            link.flushed().await;
            Timer::after_millis(50).await;
            watchdog.trigger_reset();
        }
    }
}

fn now() -> u64 {
    Instant::now().as_millis()
}

/// Spawns a task; the pools are sized for one instance each, so this fails only on a
/// programming error, which the panic handler turns into a watchdog reset.
fn spawn<S>(spawner: &Spawner, token: Result<SpawnToken<S>, SpawnError>) {
    match token {
        Ok(token) => spawner.spawn(token),
        Err(_) => panic!("task spawned twice"),
    }
}

/// On panic: LED on, stop; the watchdog resets the chip within [`WATCHDOG_TIMEOUT`].
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    #[cfg(feature = "defmt")]
    defmt::error!("panic: {}", defmt::Display2Format(_info));
    led::panic_on();
    loop {
        cortex_m::asm::wfe();
    }
}
