//! Runtime helpers shared by the LoRa images: task spawning, the clock, the watchdog's
//! settings and the panic handler (the wired node's `main.rs` has its own copies).

use embassy_executor::{SpawnError, SpawnToken, Spawner};
use embassy_futures::select::{Either, select};
use embassy_rp::watchdog::Watchdog;
use embassy_time::{Duration, Instant, Timer};

/// The watchdog resets the chip if the main loop stalls this long (the RP2040 maximum is ~8.3 s).
pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(5);
/// The main loop wakes at least this often to feed the watchdog.
pub const WATCHDOG_FEED: Duration = Duration::from_secs(1);
/// Watchdog scratch register that counts boots since power-on (it survives watchdog resets).
const BOOT_COUNT_SCRATCH: usize = 0;

/// Starts the watchdog and returns it with the number of boots since power-on.
pub fn start_watchdog(watchdog: &mut Watchdog) -> u32 {
    let boot_count = watchdog.get_scratch(BOOT_COUNT_SCRATCH).wrapping_add(1);
    watchdog.set_scratch(BOOT_COUNT_SCRATCH, boot_count);
    watchdog.start(WATCHDOG_TIMEOUT);
    boot_count
}

/// Milliseconds since boot.
pub fn now() -> u64 {
    Instant::now().as_millis()
}

/// Runs `future` to completion while feeding the watchdog, or gives up at `deadline`
/// (`None`). For waits that may outlast the watchdog, such as a packet seconds long on air.
pub async fn feeding<F: Future>(
    watchdog: &mut Watchdog,
    deadline: Instant,
    future: F,
) -> Option<F::Output> {
    let mut future = core::pin::pin!(future);
    loop {
        let wake = deadline.min(Instant::now() + WATCHDOG_FEED);
        match select(future.as_mut(), Timer::at(wake)).await {
            Either::First(output) => return Some(output),
            Either::Second(()) => {
                watchdog.feed(WATCHDOG_TIMEOUT);
                if Instant::now() >= deadline {
                    return None;
                }
            }
        }
    }
}

/// Waits until `deadline`, feeding the watchdog.
pub async fn sleep_until(watchdog: &mut Watchdog, deadline: Instant) {
    feeding(watchdog, deadline, core::future::pending::<()>()).await;
}

/// Spawns a task; the pools are sized for one instance each, so this fails only on a
/// programming error, which the panic handler turns into a watchdog reset.
pub fn spawn<S>(spawner: &Spawner, token: Result<SpawnToken<S>, SpawnError>) {
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
    crate::led::panic_on();
    loop {
        cortex_m::asm::wfe();
    }
}
