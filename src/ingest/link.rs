//! One open serial device, read in one of two ways depending on how busy it is.
//!
//! - **Watched** (a quiet port: a node reporting every few seconds or minutes): the descriptor
//!   is registered with the reactor for readability only, and a frame is read the moment it
//!   arrives.
//! - **Polled** (a busy port: reads less than [`BUSY_GAP`] apart): the descriptor is taken out
//!   of the reactor and read on a shared [`Clock`] every [`TICK`], so a port streaming 480
//!   frames a second costs one wake-up per tick instead of one per frame, and every busy port
//!   of the gateway wakes on the same tick. A frame on a busy port waits at most [`TICK`]
//!   before it is read (nodes wait seconds for their acknowledgement). After [`QUIET_TICKS`]
//!   ticks without a byte the port goes back to being watched.
//!
//! Writes (acknowledgements, commands) are collected and written in one `write(2)` per turn;
//! when the device cannot take them yet they are retried on the next tick.
//!
//! Taking a busy descriptor out of epoll matters: registered, the kernel wakes the reactor on
//! every chunk that arrives, whether or not anyone reads it.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use mio_serial::SerialStream;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, MissedTickBehavior};

/// The polling period of busy ports: what a frame on a busy port may wait before it is read.
pub const TICK: Duration = Duration::from_millis(100);
/// Reads closer together than this make a port busy (50 frames a second and more; a node
/// sending a few frames a second stays watched, each frame read at once).
pub const BUSY_GAP: Duration = Duration::from_millis(20);
/// Ticks without input before a polled port is watched again.
pub const QUIET_TICKS: u32 = 10;
/// Pending output beyond this is discarded (the other side stopped reading): acknowledgements
/// and commands are repeated by their senders, so nothing is lost but time.
pub const MAX_PENDING_OUT: usize = 64 * 1024;

pub struct Link {
    io: Io,
    clock: Clock,
    /// Bytes to write, oldest first.
    out: Vec<u8>,
    /// When the last read returned data.
    last_data: Option<Instant>,
    /// Polled ticks in a row without input.
    quiet_ticks: u32,
    /// The last polled read filled half the buffer: read again without waiting for the tick.
    more_waiting: bool,
}

enum Io {
    Watched(AsyncFd<SerialStream>),
    Polled(SerialStream, watch::Receiver<u64>),
    /// Only while switching.
    Gone,
}

/// What one turn of [`Link::read`] produced.
pub enum Input {
    /// `n` bytes are in the buffer.
    Data(usize),
    /// Nothing this time (a polled tick without input, or a spurious wake-up).
    Nothing,
}

/// The tick of busy ports: one timer for all of them, which runs only while some port is
/// polled. Every port of a gateway shares one (a timer per port would have each port take the
/// timer wheel's lock every tick, and all at the same moment).
#[derive(Clone)]
pub struct Clock {
    inner: Arc<ClockInner>,
}

struct ClockInner {
    tick: watch::Sender<u64>,
    /// Wakes the ticker when a port subscribes, and when the clock is dropped.
    wanted: Arc<Notify>,
}

impl Drop for ClockInner {
    fn drop(&mut self) {
        self.wanted.notify_one();
    }
}

impl Clock {
    /// Starts the ticker task; it ends when the last clone of the clock is dropped.
    pub fn start() -> Clock {
        let wanted = Arc::new(Notify::new());
        let inner = Arc::new(ClockInner {
            tick: watch::channel(0).0,
            wanted: wanted.clone(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let idle = inner.tick.receiver_count() == 0;
                drop(inner);
                if idle {
                    // A subscription made since the count was read left a permit.
                    wanted.notified().await;
                    continue;
                }
                interval.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.tick.send_modify(|t| *t = t.wrapping_add(1));
            }
        });
        Clock { inner }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        let rx = self.inner.tick.subscribe();
        self.inner.wanted.notify_one();
        rx
    }
}

impl Link {
    /// Starts watched. Must be called within the runtime.
    pub fn new(stream: SerialStream, clock: Clock) -> io::Result<Link> {
        Ok(Link {
            io: Io::Watched(watch(stream)?),
            clock,
            out: Vec::new(),
            last_data: None,
            quiet_ticks: 0,
            more_waiting: false,
        })
    }

    pub fn is_polled(&self) -> bool {
        matches!(self.io, Io::Polled(..))
    }

    /// Queues bytes to write; false when they were discarded because too much is pending.
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.out.len() + bytes.len() > MAX_PENDING_OUT {
            return false;
        }
        self.out.extend_from_slice(bytes);
        true
    }

    /// Writes what it can of the pending output without waiting.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let written = match &mut self.io {
                Io::Watched(fd) => fd.get_mut().write(&self.out),
                Io::Polled(s, _) => s.write(&self.out),
                Io::Gone => return Ok(()),
            };
            match written {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "device took nothing",
                    ));
                }
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits for input and reads one buffer of it. Watched: until bytes arrive (or the pending
    /// output is due for a retry). Polled: until the next tick.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<Input> {
        match &mut self.io {
            Io::Watched(fd) => {
                let mut guard = if self.out.is_empty() {
                    fd.readable_mut().await?
                } else {
                    // Output is waiting for room: retry it on the tick while watching input.
                    tokio::select! {
                        guard = fd.readable_mut() => guard?,
                        _ = tokio::time::sleep(TICK) => return Ok(Input::Nothing),
                    }
                };
                let n = match guard.try_io(|s| s.get_mut().read(buf)) {
                    Ok(r) => r?,
                    Err(_would_block) => return Ok(Input::Nothing),
                };
                if n == 0 {
                    return Err(end_of_stream());
                }
                let now = Instant::now();
                let busy = self
                    .last_data
                    .is_some_and(|t| now.saturating_duration_since(t) < BUSY_GAP);
                self.last_data = Some(now);
                if busy {
                    self.switch(true)?;
                }
                Ok(Input::Data(n))
            }
            Io::Polled(stream, tick) => {
                // A well-filled buffer last time means more is waiting: read on without
                // sleeping (after the caller wrote its acknowledgements).
                if self.more_waiting {
                    tokio::task::yield_now().await;
                } else if tick.changed().await.is_err() {
                    return Err(io::Error::other("the gateway is stopping"));
                }
                match stream.read(buf) {
                    Ok(0) => Err(end_of_stream()),
                    Ok(n) => {
                        self.last_data = Some(Instant::now());
                        self.quiet_ticks = 0;
                        // Half a buffer in one tick is far beyond any UART (115,200 baud
                        // is 115 bytes per tick): a fast USB device or a backlog; read on.
                        self.more_waiting = n >= buf.len() / 2;
                        Ok(Input::Data(n))
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        self.more_waiting = false;
                        self.quiet_ticks += 1;
                        if self.quiet_ticks >= QUIET_TICKS {
                            self.switch(false)?;
                        }
                        Ok(Input::Nothing)
                    }
                    Err(e) => Err(e),
                }
            }
            Io::Gone => Err(io::Error::other("port closed")),
        }
    }

    /// To polled (`true`) or watched (`false`).
    fn switch(&mut self, polled: bool) -> io::Result<()> {
        self.io = match std::mem::replace(&mut self.io, Io::Gone) {
            Io::Watched(fd) if polled => {
                tracing::trace!("busy port: polled every {TICK:?}");
                let mut tick = self.clock.subscribe();
                tick.mark_unchanged();
                Io::Polled(fd.into_inner(), tick)
            }
            Io::Polled(s, _) if !polled => {
                tracing::trace!("quiet port: watched");
                self.quiet_ticks = 0;
                // Registering reports input that arrived meanwhile at once.
                Io::Watched(watch(s)?)
            }
            io => io,
        };
        Ok(())
    }
}

/// Registers the device with the reactor, for readability only: registered for writability
/// too, the reactor would be woken each time the other side reads what we wrote.
fn watch(stream: SerialStream) -> io::Result<AsyncFd<SerialStream>> {
    // SAFETY: `SerialStream` owns its descriptor (it closes it on drop and never replaces it),
    // so `as_raw_fd` returns the same open descriptor for as long as the `AsyncFd` owns the
    // stream, which is until `into_inner` (in `switch`) or drop: what `register_with_interest`
    // requires.
    Ok(unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE) }?)
}

fn end_of_stream() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream")
}
