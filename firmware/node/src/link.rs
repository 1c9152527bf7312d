//! The serial link to the gateway: UART0 (feature `transport-uart`) or USB CDC-ACM (feature
//! `transport-usb`). Outgoing frames go through [`OUTBOX`] to a writer task, so a stalled link
//! (USB unplugged) never stalls the main loop; unacknowledged readings are kept by node-core and
//! sent again, so a frame dropped here is not lost. Incoming bytes are reassembled into frames
//! by a reader task and queued in [`INCOMING`].

use embassy_executor::Spawner;
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::channel::Channel;
use heapless::Vec;
use sensorgate_wire::{Accumulator, FeedResult, Frame, FrameError, MAX_FRAME};

#[cfg(all(feature = "transport-uart", feature = "transport-usb"))]
compile_error!(
    "choose one transport: `transport-uart` (default) or `transport-usb` with --no-default-features"
);
#[cfg(not(any(feature = "transport-uart", feature = "transport-usb")))]
compile_error!("choose a transport feature: `transport-uart` or `transport-usb`");

/// One encoded frame, delimiter included.
type Encoded = Vec<u8, MAX_FRAME>;

/// Frames waiting for the writer: a Hello, a Readings and an Ack in one burst fit.
static OUTBOX: Channel<CriticalSectionRawMutex, Encoded, 4> = Channel::new();
/// Decoded frames (or why they did not decode) waiting for the main loop.
static INCOMING: Channel<CriticalSectionRawMutex, Result<Frame, FrameError>, 4> = Channel::new();

/// The sending half, used by the main loop.
pub struct Link {
    _private: (),
}

impl Link {
    /// Queues `frame` for sending; when the link is backed up the frame is dropped.
    pub fn send(&self, frame: &Frame) {
        let mut buf = [0u8; MAX_FRAME];
        let Ok(bytes) = sensorgate_wire::encode(frame, &mut buf) else {
            return; // cannot happen: MAX_FRAME fits every frame
        };
        let Ok(encoded) = Vec::from_slice(bytes) else {
            return;
        };
        if OUTBOX.try_send(encoded).is_err() {
            #[cfg(feature = "defmt")]
            defmt::warn!("link backed up, frame dropped");
        }
    }

    /// Waits until the writer has taken every queued frame.
    pub async fn flushed(&self) {
        while !OUTBOX.is_empty() {
            embassy_time::Timer::after_millis(5).await;
        }
    }
}

/// The next frame from the gateway.
pub async fn receive() -> Result<Frame, FrameError> {
    INCOMING.receive().await
}

/// Feeds received bytes to the accumulator and queues every outcome.
async fn deliver(accumulator: &mut Accumulator, mut input: &[u8]) {
    loop {
        match accumulator.feed(input) {
            FeedResult::Consumed => return,
            FeedResult::Frame { frame, rest, .. } => {
                INCOMING.send(Ok(frame)).await;
                input = rest;
            }
            FeedResult::Error { error, rest, .. } => {
                // A lone delimiter is a sender's flush, not an error worth an answer.
                if error != FrameError::Empty {
                    INCOMING.send(Err(error)).await;
                }
                input = rest;
            }
        }
    }
}

#[cfg(feature = "transport-uart")]
mod transport {
    use super::*;
    use embassy_rp::Peri;
    use embassy_rp::bind_interrupts;
    use embassy_rp::peripherals::{PIN_0, PIN_1, UART0, USB};
    use embassy_rp::uart::{
        BufferedInterruptHandler, BufferedUart, BufferedUartRx, BufferedUartTx, Config,
    };
    use embedded_io_async::{Read, Write};
    use static_cell::StaticCell;

    bind_interrupts!(struct Irqs {
        UART0_IRQ => BufferedInterruptHandler<UART0>;
    });

    pub const BAUD: u32 = 115_200;

    pub struct Pins {
        uart: Peri<'static, UART0>,
        tx: Peri<'static, PIN_0>,
        rx: Peri<'static, PIN_1>,
    }

    impl Pins {
        pub fn take(
            uart: Peri<'static, UART0>,
            tx: Peri<'static, PIN_0>,
            rx: Peri<'static, PIN_1>,
            _usb: Peri<'static, USB>,
        ) -> Self {
            Pins { uart, tx, rx }
        }
    }

    pub fn start(spawner: &Spawner, pins: Pins) -> Link {
        static TX_BUF: StaticCell<[u8; 256]> = StaticCell::new();
        static RX_BUF: StaticCell<[u8; 256]> = StaticCell::new();
        let mut config = Config::default();
        config.baudrate = BAUD;
        let uart = BufferedUart::new(
            pins.uart,
            pins.tx,
            pins.rx,
            Irqs,
            TX_BUF.init([0; 256]),
            RX_BUF.init([0; 256]),
            config,
        );
        let (tx, rx) = uart.split();
        crate::spawn(spawner, writer(tx));
        crate::spawn(spawner, reader(rx));
        Link { _private: () }
    }

    #[embassy_executor::task]
    async fn writer(mut tx: BufferedUartTx) {
        // A lone delimiter first ends any partial frame the gateway saw before our reset.
        let _ = tx.write_all(&[0]).await;
        loop {
            let frame = OUTBOX.receive().await;
            // A UART write only fails on a driver error; the frame is then lost and, if it
            // was a reading, sent again by the retransmission logic.
            let _ = tx.write_all(&frame).await;
            let _ = tx.flush().await;
        }
    }

    #[embassy_executor::task]
    async fn reader(mut rx: BufferedUartRx) {
        let mut accumulator = Accumulator::new();
        let mut buf = [0u8; 64];
        loop {
            match rx.read(&mut buf).await {
                Ok(n) => deliver(&mut accumulator, &buf[..n]).await,
                // Framing, parity or overrun: the partial frame is damaged, start afresh.
                Err(_) => {
                    if let Some((error, _)) = accumulator.finish() {
                        INCOMING.send(Err(error)).await;
                    }
                }
            }
        }
    }
}

#[cfg(feature = "transport-usb")]
mod transport {
    use super::*;
    use embassy_rp::Peri;
    use embassy_rp::bind_interrupts;
    use embassy_rp::peripherals::{PIN_0, PIN_1, UART0, USB};
    use embassy_rp::usb::{Driver, InterruptHandler};
    use embassy_usb::class::cdc_acm::{CdcAcmClass, Receiver, Sender, State};
    use embassy_usb::{Builder, UsbDevice};
    use static_cell::StaticCell;

    bind_interrupts!(struct Irqs {
        USBCTRL_IRQ => InterruptHandler<USB>;
    });

    type UsbDriver = Driver<'static, USB>;
    const PACKET: u16 = 64;

    pub struct Pins {
        usb: Peri<'static, USB>,
    }

    impl Pins {
        pub fn take(
            _uart: Peri<'static, UART0>,
            _tx: Peri<'static, PIN_0>,
            _rx: Peri<'static, PIN_1>,
            usb: Peri<'static, USB>,
        ) -> Self {
            Pins { usb }
        }
    }

    pub fn start(spawner: &Spawner, pins: Pins) -> Link {
        static CONFIG_DESC: StaticCell<[u8; 256]> = StaticCell::new();
        static BOS_DESC: StaticCell<[u8; 64]> = StaticCell::new();
        static MSOS_DESC: StaticCell<[u8; 0]> = StaticCell::new();
        static CONTROL: StaticCell<[u8; 64]> = StaticCell::new();
        static STATE: StaticCell<State> = StaticCell::new();

        let driver = Driver::new(pins.usb, Irqs);
        // pid.codes test VID/PID; replace for a product.
        let mut config = embassy_usb::Config::new(0x1209, 0x0001);
        config.manufacturer = Some("sensorgate");
        config.product = Some("sensorgate node");
        config.max_power = 100;
        let mut builder = Builder::new(
            driver,
            config,
            CONFIG_DESC.init([0; 256]),
            BOS_DESC.init([0; 64]),
            MSOS_DESC.init([0; 0]),
            CONTROL.init([0; 64]),
        );
        let class = CdcAcmClass::new(&mut builder, STATE.init(State::new()), PACKET);
        let (tx, rx) = class.split();
        crate::spawn(spawner, run_usb(builder.build()));
        crate::spawn(spawner, writer(tx));
        crate::spawn(spawner, reader(rx));
        Link { _private: () }
    }

    #[embassy_executor::task]
    async fn run_usb(mut device: UsbDevice<'static, UsbDriver>) {
        device.run().await
    }

    #[embassy_executor::task]
    async fn writer(mut tx: Sender<'static, UsbDriver>) {
        loop {
            tx.wait_connection().await;
            // Frames queued while nobody listened are stale; readings are resent anyway.
            while OUTBOX.try_receive().is_ok() {}
            let _ = tx.write_packet(&[0]).await;
            loop {
                let frame = OUTBOX.receive().await;
                if write_frame(&mut tx, &frame).await.is_err() {
                    break; // disconnected
                }
            }
        }
    }

    async fn write_frame(
        tx: &mut Sender<'static, UsbDriver>,
        frame: &[u8],
    ) -> Result<(), embassy_usb::driver::EndpointError> {
        for packet in frame.chunks(usize::from(PACKET)) {
            tx.write_packet(packet).await?;
        }
        if frame.len() % usize::from(PACKET) == 0 {
            tx.write_packet(&[]).await?; // a short packet ends the transfer
        }
        Ok(())
    }

    #[embassy_executor::task]
    async fn reader(mut rx: Receiver<'static, UsbDriver>) {
        let mut accumulator = Accumulator::new();
        let mut buf = [0u8; PACKET as usize];
        loop {
            rx.wait_connection().await;
            while let Ok(n) = rx.read_packet(&mut buf).await {
                deliver(&mut accumulator, &buf[..n]).await;
            }
            if let Some((error, _)) = accumulator.finish() {
                INCOMING.send(Err(error)).await;
            }
        }
    }
}

pub use transport::{Pins, start};
