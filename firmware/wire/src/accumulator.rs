//! Splits a byte stream into frames on 0x00 delimiters, with exact byte accounting.

use crate::codec::{FrameError, cobs_decode_in_place, decode_raw};
use crate::frame::Frame;

/// The outcome of one [`FrameAccumulator::feed`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FeedResult<'a> {
    /// All input was taken; no frame is complete yet (the bytes wait in the accumulator,
    /// see [`FrameAccumulator::pending`]).
    Consumed,
    /// A frame ended and decoded. `bytes` is its length on the wire including the delimiter,
    /// counting bytes from earlier `feed` calls; `rest` is the input not yet looked at.
    Frame {
        frame: Frame,
        bytes: usize,
        rest: &'a [u8],
    },
    /// A frame ended but is not valid; `bytes` were consumed for it, delimiter included.
    Error {
        error: FrameError,
        bytes: usize,
        rest: &'a [u8],
    },
}

/// One frame or error, with the number of bytes it accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Decoded {
    pub result: Result<Frame, FrameError>,
    /// Bytes on the wire this outcome accounts for, delimiter included.
    pub bytes: usize,
}

/// Reassembles frames from arbitrary chunks of a byte stream.
///
/// `N` is the largest stuffed frame (without delimiter) it keeps; [`crate::MAX_FRAME`] fits any
/// frame of this format. Longer runs are skipped up to the next delimiter and reported as
/// [`FrameError::Oversize`]. Every byte fed ends up in exactly one `Frame` or `Error` outcome,
/// or is still [`pending`](Self::pending): the sum of all outcome `bytes` plus `pending()`
/// equals the number of bytes fed.
#[derive(Debug, Clone)]
pub struct FrameAccumulator<const N: usize> {
    buf: [u8; N],
    /// Bytes stored in `buf`.
    len: usize,
    /// Bytes of the current frame seen so far, stored or skipped.
    pending: usize,
    overflowed: bool,
}

impl<const N: usize> Default for FrameAccumulator<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameAccumulator<N> {
    pub const fn new() -> Self {
        FrameAccumulator {
            buf: [0; N],
            len: 0,
            pending: 0,
            overflowed: false,
        }
    }

    /// Bytes received for a frame that has not ended yet (not yet in any outcome).
    pub const fn pending(&self) -> usize {
        self.pending
    }

    /// Takes bytes up to and including the next delimiter and reports what they were.
    /// Call again with `rest` until it returns [`FeedResult::Consumed`].
    pub fn feed<'a>(&mut self, input: &'a [u8]) -> FeedResult<'a> {
        let Some(end) = input.iter().position(|&b| b == 0) else {
            self.store(input);
            return FeedResult::Consumed;
        };
        self.store(&input[..end]);
        let bytes = self.pending.saturating_add(1);
        let rest = &input[end + 1..];
        let result = self.finish_frame();
        match result {
            Ok(frame) => FeedResult::Frame { frame, bytes, rest },
            Err(error) => FeedResult::Error { error, bytes, rest },
        }
    }

    /// Iterates over every outcome in `input`; bytes after the last delimiter stay pending.
    /// Drain the iterator: input it has not reached is not fed.
    pub fn feed_iter<'s, 'a>(&'s mut self, input: &'a [u8]) -> FeedIter<'s, 'a, N> {
        FeedIter { acc: self, input }
    }

    /// Ends the stream (port closed, reader restarted): a partial frame becomes
    /// [`FrameError::Unterminated`] with its byte count, so it is counted too.
    pub fn finish(&mut self) -> Option<(FrameError, usize)> {
        let pending = self.pending;
        self.reset();
        (pending > 0).then_some((FrameError::Unterminated, pending))
    }

    fn reset(&mut self) {
        self.len = 0;
        self.pending = 0;
        self.overflowed = false;
    }

    fn store(&mut self, bytes: &[u8]) {
        self.pending = self.pending.saturating_add(bytes.len());
        if self.overflowed {
            return;
        }
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflowed = true,
        }
    }

    fn finish_frame(&mut self) -> Result<Frame, FrameError> {
        let (len, overflowed) = (self.len, self.overflowed);
        self.reset();
        if overflowed {
            return Err(FrameError::Oversize);
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        let raw_len = cobs_decode_in_place(&mut self.buf[..len]).ok_or(FrameError::Cobs)?;
        decode_raw(&self.buf[..raw_len])
    }
}

/// Iterator returned by [`FrameAccumulator::feed_iter`].
pub struct FeedIter<'s, 'a, const N: usize> {
    acc: &'s mut FrameAccumulator<N>,
    input: &'a [u8],
}

impl<const N: usize> Iterator for FeedIter<'_, '_, N> {
    type Item = Decoded;

    fn next(&mut self) -> Option<Decoded> {
        if self.input.is_empty() {
            return None;
        }
        match self.acc.feed(self.input) {
            FeedResult::Consumed => {
                self.input = &[];
                None
            }
            FeedResult::Frame { frame, bytes, rest } => {
                self.input = rest;
                Some(Decoded {
                    result: Ok(frame),
                    bytes,
                })
            }
            FeedResult::Error { error, bytes, rest } => {
                self.input = rest;
                Some(Decoded {
                    result: Err(error),
                    bytes,
                })
            }
        }
    }
}
