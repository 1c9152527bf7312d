//! The LoRa radio: an RFM95W (Semtech SX1276) on SPI1, driven by `lora-phy`. Used by the
//! `lora-node` and `lora-bridge` images.
//!
//! Wiring (Pico pin numbers in brackets):
//! - SCK GPIO10 [14], MOSI GPIO11 [15], MISO GPIO12 [16], NSS GPIO13 [17] (SPI1, 8 MHz)
//! - RESET GPIO14 [19], DIO0 GPIO15 [20] (TxDone / RxDone interrupt)
//! - 3V3 [36] to VIN/3.3V, GND [38]; an 868 MHz antenna (8.2 cm wire) on ANT.
//!
//! Radio settings are fixed at build time (see [`SETTINGS`] and `firmware/README.md`).
//! Uplinks (node → bridge) use normal IQ and downlinks (bridge → node) inverted IQ, as in
//! LoRaWAN: nodes do not hear each other, bridges do not hear each other's downlinks.

use embassy_embedded_hal::shared_bus::asynch::spi::SpiDevice;
use embassy_rp::gpio::{Input, Level, Output, Pull};
use embassy_rp::peripherals::{
    DMA_CH0, DMA_CH1, PIN_10, PIN_11, PIN_12, PIN_13, PIN_14, PIN_15, SPI1,
};
use embassy_rp::{Peri, bind_interrupts, dma, spi};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use embassy_sync::mutex::Mutex;
use embassy_time::Delay;
use lora_phy::iv::GenericSx127xInterfaceVariant;
use lora_phy::mod_params::{
    Bandwidth, CodingRate, ModulationParams, PacketParams, RadioError, SpreadingFactor,
};
use lora_phy::sx127x::{self, Sx127x, Sx1276};
use lora_phy::{LoRa, RxMode};
use sensorgate_node_core::{DutyCycle, LoraParams};
use sensorgate_wire::LinkQuality;
use static_cell::StaticCell;

bind_interrupts!(struct Irqs {
    DMA_IRQ_0 => dma::InterruptHandler<DMA_CH0>, dma::InterruptHandler<DMA_CH1>;
});

/// Largest packet the SX1276 can hold; frames are at most `MAX_FRAME` (108) bytes.
pub const MAX_PACKET: usize = 255;

/// Which way this device talks: sets the IQ polarity of transmission and reception.
#[allow(dead_code)] // each image uses one
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Node,
    Bridge,
}

/// Build-time radio settings. Environment variables at `cargo build` time:
/// `SENSORGATE_LORA_FREQ_HZ` (868100000), `SENSORGATE_LORA_SF` (7), `SENSORGATE_LORA_BW_HZ`
/// (125000), `SENSORGATE_LORA_CR` (1 = 4/5 .. 4 = 4/8), `SENSORGATE_LORA_TX_DBM` (14),
/// `SENSORGATE_LORA_DUTY_PER_MILLE` (10 = 1 %), `SENSORGATE_LORA_RX_WINDOW_MS` (2000).
pub struct Settings {
    pub frequency_hz: u32,
    pub lora: LoraParams,
    pub tx_power_dbm: i32,
    pub duty_per_mille: u32,
    pub rx_window_ms: u64,
}

pub const SETTINGS: Settings = Settings {
    frequency_hz: env_u32(option_env!("SENSORGATE_LORA_FREQ_HZ"), 868_100_000),
    lora: LoraParams {
        spreading_factor: env_u32(option_env!("SENSORGATE_LORA_SF"), 7) as u8,
        bandwidth_hz: env_u32(option_env!("SENSORGATE_LORA_BW_HZ"), 125_000),
        coding_rate: env_u32(option_env!("SENSORGATE_LORA_CR"), 1) as u8,
        ..LoraParams::SF7_BW125
    },
    tx_power_dbm: env_u32(option_env!("SENSORGATE_LORA_TX_DBM"), 14) as i32,
    duty_per_mille: env_u32(option_env!("SENSORGATE_LORA_DUTY_PER_MILLE"), 10),
    rx_window_ms: env_u32(option_env!("SENSORGATE_LORA_RX_WINDOW_MS"), 2_000) as u64,
};

// A bad setting fails the build, not the radio in the field.
const _: () = {
    if let Err(message) = SETTINGS.lora.check() {
        panic!("{}", message);
    }
    if SETTINGS.frequency_hz < 137_000_000 || SETTINGS.frequency_hz > 1_020_000_000 {
        panic!("SENSORGATE_LORA_FREQ_HZ is outside the SX1276's 137-1020 MHz");
    }
    if SETTINGS.tx_power_dbm < 2 || SETTINGS.tx_power_dbm > 20 {
        panic!("SENSORGATE_LORA_TX_DBM must be 2..=20 (PA_BOOST)");
    }
    if SETTINGS.duty_per_mille == 0 || SETTINGS.duty_per_mille > 1000 {
        panic!("SENSORGATE_LORA_DUTY_PER_MILLE must be 1..=1000");
    }
};

impl Settings {
    /// The airtime budget: the duty cycle with a burst of a tenth of an hour's allowance.
    pub const fn duty_cycle(&self) -> DutyCycle {
        DutyCycle::new(self.duty_per_mille, self.duty_per_mille as u64 * 360_000)
    }
}

/// Parses a decimal build-time setting; a malformed value fails the build.
const fn env_u32(value: Option<&str>, default: u32) -> u32 {
    let Some(text) = value else {
        return default;
    };
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        panic!("an empty SENSORGATE_LORA_* setting");
    }
    let mut value: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let digit = bytes[i];
        if digit < b'0' || digit > b'9' {
            panic!("a SENSORGATE_LORA_* setting is not a decimal number");
        }
        value = match value.checked_mul(10) {
            Some(v) => match v.checked_add((digit - b'0') as u32) {
                Some(v) => v,
                None => panic!("a SENSORGATE_LORA_* setting is too large"),
            },
            None => panic!("a SENSORGATE_LORA_* setting is too large"),
        };
        i += 1;
    }
    value
}

pub struct Pins {
    pub spi: Peri<'static, SPI1>,
    pub sck: Peri<'static, PIN_10>,
    pub mosi: Peri<'static, PIN_11>,
    pub miso: Peri<'static, PIN_12>,
    pub nss: Peri<'static, PIN_13>,
    pub reset: Peri<'static, PIN_14>,
    pub dio0: Peri<'static, PIN_15>,
    pub tx_dma: Peri<'static, DMA_CH0>,
    pub rx_dma: Peri<'static, DMA_CH1>,
}

type Bus = Mutex<NoopRawMutex, spi::Spi<'static, SPI1, spi::Async>>;
type Chip = Sx127x<
    SpiDevice<'static, NoopRawMutex, spi::Spi<'static, SPI1, spi::Async>, Output<'static>>,
    GenericSx127xInterfaceVariant<Output<'static>, Input<'static>>,
    Sx1276,
>;

/// The radio, configured for [`SETTINGS`].
pub struct Radio {
    lora: LoRa<Chip, Delay>,
    modulation: ModulationParams,
    tx_params: PacketParams,
    rx_params: PacketParams,
}

impl Radio {
    /// Resets and configures the SX1276. Fails if it does not answer (not wired, no power).
    pub async fn new(pins: Pins, role: Role) -> Result<Self, RadioError> {
        static BUS: StaticCell<Bus> = StaticCell::new();
        let mut config = spi::Config::default();
        config.frequency = 8_000_000;
        let spi = spi::Spi::new(
            pins.spi,
            pins.sck,
            pins.mosi,
            pins.miso,
            pins.tx_dma,
            pins.rx_dma,
            Irqs,
            config,
        );
        let bus = BUS.init(Mutex::new(spi));
        let nss = Output::new(pins.nss, Level::High);
        let reset = Output::new(pins.reset, Level::High);
        let dio0 = Input::new(pins.dio0, Pull::Down);
        let iv = GenericSx127xInterfaceVariant::new(reset, dio0, None, None)?;
        let chip = Sx127x::new(
            SpiDevice::new(bus, nss),
            iv,
            sx127x::Config {
                chip: Sx1276,
                tcxo_used: false,
                // The RFM95 brings out PA_BOOST only.
                tx_boost: true,
                rx_boost: false,
            },
        );
        // `false`: the private sync word 0x12, so LoRaWAN gateways ignore our packets.
        let mut lora = LoRa::new(chip, false, Delay).await?;
        let s = &SETTINGS;
        let modulation = lora.create_modulation_params(
            spreading_factor(s.lora.spreading_factor),
            bandwidth(s.lora.bandwidth_hz),
            coding_rate(s.lora.coding_rate),
            s.frequency_hz,
        )?;
        let (tx_inverted, rx_inverted) = match role {
            Role::Node => (false, true),
            Role::Bridge => (true, false),
        };
        let preamble = s.lora.preamble_symbols;
        let tx_params =
            lora.create_tx_packet_params(preamble, false, true, tx_inverted, &modulation)?;
        let rx_params = lora.create_rx_packet_params(
            preamble,
            false,
            MAX_PACKET as u8,
            true,
            rx_inverted,
            &modulation,
        )?;
        Ok(Radio {
            lora,
            modulation,
            tx_params,
            rx_params,
        })
    }

    /// Sends one packet and waits until it has left (TxDone).
    pub async fn transmit(&mut self, payload: &[u8]) -> Result<(), RadioError> {
        self.lora
            .prepare_for_tx(
                &self.modulation,
                &mut self.tx_params,
                SETTINGS.tx_power_dbm,
                payload,
            )
            .await?;
        self.lora.tx().await
    }

    /// Receives one packet into `buf`. Runs until a packet arrives: cancel it (drop the
    /// future) to stop listening; the next call reconfigures the radio.
    pub async fn receive(&mut self, buf: &mut [u8]) -> Result<(usize, LinkQuality), RadioError> {
        self.lora
            .prepare_for_rx(RxMode::Continuous, &self.modulation, &self.rx_params)
            .await?;
        let (len, status) = self.lora.rx(&self.rx_params, buf).await?;
        let link = LinkQuality {
            rssi_dbm: status.rssi,
            snr_db: status.snr.clamp(i16::from(i8::MIN), i16::from(i8::MAX)) as i8,
        };
        Ok((usize::from(len), link))
    }

    /// Puts the radio to sleep (about 1 µA) until the next transmit or receive.
    #[allow(dead_code)] // the bridge always listens
    pub async fn sleep(&mut self) -> Result<(), RadioError> {
        self.lora.sleep(true).await
    }
}

const fn spreading_factor(sf: u8) -> SpreadingFactor {
    match sf {
        8 => SpreadingFactor::_8,
        9 => SpreadingFactor::_9,
        10 => SpreadingFactor::_10,
        11 => SpreadingFactor::_11,
        12 => SpreadingFactor::_12,
        _ => SpreadingFactor::_7, // `LoraParams::check` allows 7..=12 only
    }
}

const fn bandwidth(hz: u32) -> Bandwidth {
    match hz {
        250_000 => Bandwidth::_250KHz,
        500_000 => Bandwidth::_500KHz,
        _ => Bandwidth::_125KHz,
    }
}

const fn coding_rate(cr: u8) -> CodingRate {
    match cr {
        2 => CodingRate::_4_6,
        3 => CodingRate::_4_7,
        4 => CodingRate::_4_8,
        _ => CodingRate::_4_5,
    }
}
