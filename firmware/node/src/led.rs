//! The on-board LED (GPIO25). Codes:
//! - 3 short blinks: booted;
//! - one 30 ms flash: a `Readings` frame was sent;
//! - 4 Hz blinking: identify (the gateway's `Identify` command);
//! - steady on: panic, the watchdog resets the node within 5 s;
//! - 1 s on, 1 s off (LoRa images): the radio does not answer; retried every 10 s.

use embassy_futures::select::{Either, select};
use embassy_rp::gpio::Output;
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::signal::Signal;
use embassy_time::{Instant, Timer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Boot,
    Sent,
    /// Blink until this time (milliseconds since boot).
    Identify {
        until: u64,
    },
    /// The radio does not answer (LoRa images only).
    #[allow(dead_code)]
    Fault,
}

static PATTERN: Signal<CriticalSectionRawMutex, Pattern> = Signal::new();

/// Shows `pattern`, replacing the one showing.
pub fn signal(pattern: Pattern) {
    PATTERN.signal(pattern);
}

#[embassy_executor::task]
pub async fn task(mut led: Output<'static>) {
    let mut identify_until = 0u64;
    loop {
        let pattern = if Instant::now().as_millis() < identify_until {
            match select(PATTERN.wait(), blink(&mut led, 125, 125)).await {
                Either::First(pattern) => pattern,
                Either::Second(()) => continue,
            }
        } else {
            PATTERN.wait().await
        };
        match pattern {
            Pattern::Boot => {
                for _ in 0..3 {
                    blink(&mut led, 100, 100).await;
                }
            }
            // A reading during identify does not interrupt the blinking.
            Pattern::Sent if Instant::now().as_millis() >= identify_until => {
                blink(&mut led, 30, 0).await
            }
            Pattern::Sent => {}
            Pattern::Identify { until } => identify_until = until,
            Pattern::Fault => {
                for _ in 0..3 {
                    blink(&mut led, 1_000, 1_000).await;
                }
            }
        }
    }
}

async fn blink(led: &mut Output<'static>, on_ms: u64, off_ms: u64) {
    led.set_high();
    Timer::after_millis(on_ms).await;
    led.set_low();
    Timer::after_millis(off_ms).await;
}

/// Turns the LED on from the panic handler, where the `Output` is out of reach.
pub fn panic_on() {
    const SIO_GPIO_OUT_SET: *mut u32 = 0xd000_0014 as *mut u32;
    // SAFETY: a write-only set register of the single-cycle IO block; setting bit 25 only
    // drives the LED pin, which `main` configured as an output before any panic can happen.
    unsafe { SIO_GPIO_OUT_SET.write_volatile(1 << 25) };
}
