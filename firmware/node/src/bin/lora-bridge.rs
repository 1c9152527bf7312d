//! sensorgate radio-to-serial bridge for the Raspberry Pi Pico (RP2040) with an RFM95W
//! (SX1276): relays LoRa nodes' frames to the gateway over USB CDC-ACM, wrapped in `Relayed`
//! with their RSSI and SNR, and sends the gateway's `Ack`s and `Command`s over the air when
//! their node listens.
//!
//! Wiring (Pico pin numbers in brackets):
//! - RFM95W on SPI1: SCK GPIO10 [14], MOSI GPIO11 [15], MISO GPIO12 [16], NSS GPIO13 [17],
//!   RESET GPIO14 [19], DIO0 GPIO15 [20], 3V3 [36], GND [38]; an antenna for the band on ANT.
//! - USB to the gateway (power and frames). The LED on GPIO25 needs no wiring.
//!
//! The relaying, queueing and duty-cycle logic is `sensorgate_node_core::Bridge`'s. Only built
//! in CI (no radio hardware there).

#![no_std]
#![no_main]

#[allow(dead_code)] // the wired node's settings; this image uses the node id only
#[path = "../config.rs"]
mod config;
#[path = "../led.rs"]
mod led;
#[path = "../link.rs"]
mod link;
#[path = "../radio.rs"]
mod radio;
#[path = "../rt.rs"]
mod rt;

use embassy_executor::Spawner;
use embassy_futures::select::{Either, select};
use embassy_rp::clocks::RoscRng;
use embassy_rp::gpio::{Level, Output};
use embassy_rp::watchdog::Watchdog;
use embassy_time::{Duration, Instant, Timer};
use radio::{MAX_PACKET, Radio, Role, SETTINGS};
use rt::{WATCHDOG_TIMEOUT, now, spawn};
use sensorgate_node_core::bridge::{self, Bridge, BridgeConfig, BridgePoll};
use sensorgate_node_core::{Effect, Reply};
use sensorgate_wire::{Frame, FrameError, LinkQuality};

#[cfg(feature = "defmt")]
use defmt_rtt as _;

const HEARTBEAT_INTERVAL_S: u32 = 60;
/// A node needs this long after its uplink to listen; the bridge waits before answering.
const TURNAROUND_MS: u64 = 20;
/// A downlink whose node stays silent this long is dropped (counted in the Heartbeat).
const DOWNLINK_TTL_MS: u64 = 15 * 60 * 1000;
/// A transmission that has not ended this long after its computed time on air failed.
const TX_MARGIN: Duration = Duration::from_secs(1);
/// How long a radio that does not answer at boot is given before the watchdog reset retries.
const RADIO_RETRY: Duration = Duration::from_secs(10);
/// Nodes that always listen (mains powered), e.g. `SENSORGATE_LORA_ALWAYS_LISTENING=0x17,0x2A`.
const ALWAYS_LISTENING: &str = match option_env!("SENSORGATE_LORA_ALWAYS_LISTENING") {
    Some(list) => list,
    None => "",
};

/// Something happened while the bridge was listening.
enum Event {
    Radio(Result<(usize, LinkQuality), lora_phy::mod_params::RadioError>),
    Serial(Result<Frame, FrameError>),
    Timeout,
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_rp::init(Default::default());

    let mut watchdog = Watchdog::new(p.WATCHDOG);
    let boot_count = rt::start_watchdog(&mut watchdog);

    let led = Output::new(p.PIN_25, Level::Low);
    spawn(&spawner, led::task(led));
    led::signal(led::Pattern::Boot);

    let bridge_id = config::node_id(p.FLASH);
    let boot_id = RoscRng.next_u32() ^ boot_count.rotate_left(16) ^ boot_count;
    let link = link::start(&spawner, link::Pins::take(p.UART0, p.PIN_0, p.PIN_1, p.USB));

    let pins = radio::Pins {
        spi: p.SPI1,
        sck: p.PIN_10,
        mosi: p.PIN_11,
        miso: p.PIN_12,
        nss: p.PIN_13,
        reset: p.PIN_14,
        dio0: p.PIN_15,
        tx_dma: p.DMA_CH0,
        rx_dma: p.DMA_CH1,
    };
    let mut radio = match Radio::new(pins, Role::Bridge).await {
        Ok(radio) => radio,
        Err(_error) => {
            #[cfg(feature = "defmt")]
            defmt::error!("radio: {}", _error);
            // Blink, then let the watchdog reset the chip and try again from scratch.
            led::signal(led::Pattern::Fault);
            rt::sleep_until(&mut watchdog, Instant::now() + RADIO_RETRY).await;
            loop {
                Timer::after_secs(1).await;
            }
        }
    };

    let always_listening = bridge::parse_node_ids(ALWAYS_LISTENING).unwrap_or_else(|| {
        // A malformed list: no node is taken as always listening (they still get their
        // downlinks in the window after each uplink).
        led::signal(led::Pattern::Fault);
        Default::default()
    });
    let mut bridge = Bridge::new(
        BridgeConfig {
            bridge_id,
            boot_id,
            firmware: config::FIRMWARE,
            lora: SETTINGS.lora,
            duty: SETTINGS.duty_cycle(),
            rx_window_ms: SETTINGS.rx_window_ms,
            turnaround_ms: TURNAROUND_MS,
            always_listening,
            downlink_ttl_ms: DOWNLINK_TTL_MS,
            heartbeat_interval_s: HEARTBEAT_INTERVAL_S,
        },
        now(),
    );
    #[cfg(feature = "defmt")]
    defmt::info!("lora bridge {=u32:x} boot {=u32:x}", bridge_id, boot_id);

    let mut buf = [0u8; MAX_PACKET];
    loop {
        watchdog.feed(WATCHDOG_TIMEOUT);
        match bridge.poll(now()) {
            BridgePoll::Serial(frame) => link.send(&frame),
            BridgePoll::Transmit { payload, .. } => {
                let airtime = Duration::from_micros(SETTINGS.lora.airtime_us(payload.len()));
                let deadline = Instant::now() + airtime + TX_MARGIN;
                match rt::feeding(&mut watchdog, deadline, radio.transmit(&payload)).await {
                    Some(Ok(())) => bridge.transmitted(now()),
                    _ => bridge.transmit_failed(now()),
                }
            }
            BridgePoll::Listen { until } => {
                let deadline = Instant::from_millis(until);
                let either = select(radio.receive(&mut buf), link::receive());
                let event = match rt::feeding(&mut watchdog, deadline, either).await {
                    Some(Either::First(received)) => Event::Radio(received),
                    Some(Either::Second(incoming)) => Event::Serial(incoming),
                    None => Event::Timeout,
                };
                match event {
                    Event::Radio(Ok((len, quality))) => {
                        let packet = &buf[..len.min(buf.len())];
                        if let Some(relayed) = bridge.on_radio(packet, quality, now()) {
                            link.send(&relayed);
                            led::signal(led::Pattern::Sent);
                        }
                    }
                    // A CRC error or a radio hiccup: the next receive reconfigures it.
                    Event::Radio(Err(_)) => {}
                    Event::Serial(Ok(frame)) => {
                        let reply = bridge.on_serial(&frame, now());
                        carry_out(reply, &link, &mut watchdog).await;
                    }
                    Event::Serial(Err(error)) => {
                        let reply = bridge.on_serial_error(&error);
                        carry_out(reply, &link, &mut watchdog).await;
                    }
                    Event::Timeout => {}
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
