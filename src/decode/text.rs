//! Shared by the text decoders (`lines`, `mysensors`): bounded line framing and number parsing.
//!
//! [`LineBuffer`] holds at most `max` bytes. A line longer than that is dropped as it arrives and reported once,
//! with its full length, when its `\n` comes, so the decoder resynchronises on the next line.

/// One framed line, or an over-long one that was discarded.
pub(super) enum Line<'a> {
    /// A line without its `\n` (a `\r` before it is removed too); `bytes` includes the line end.
    Complete { text: &'a [u8], bytes: usize },
    /// A line of more than `max` bytes before its `\n`; `bytes` includes the line end.
    TooLong { bytes: usize },
}

pub(super) struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    /// Bytes of an over-long line discarded so far; non-zero means "skipping to the next `\n`".
    skipped: usize,
}

impl LineBuffer {
    pub(super) fn new(max: usize) -> Self {
        LineBuffer {
            buf: Vec::new(),
            max,
            skipped: 0,
        }
    }

    /// Bytes held for the unterminated line (buffered or skipped).
    pub(super) fn pending(&self) -> usize {
        self.buf.len() + self.skipped
    }

    /// Feeds a chunk, calling `on_line` once per line that ends in it.
    pub(super) fn feed(&mut self, mut bytes: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let (part, ends) = match newline {
                Some(i) => (bytes.get(..i).unwrap_or_default(), true),
                None => (bytes, false),
            };
            bytes = match newline {
                Some(i) => bytes.get(i + 1..).unwrap_or_default(),
                None => &[],
            };
            if self.skipped == 0 && self.buf.len() + part.len() <= self.max {
                self.buf.extend_from_slice(part);
            } else {
                self.skipped += self.buf.len() + part.len();
                self.buf.clear();
            }
            if !ends {
                continue;
            }
            if self.skipped > 0 {
                let bytes = self.skipped + 1;
                self.skipped = 0;
                on_line(Line::TooLong { bytes });
            } else {
                let bytes = self.buf.len() + 1;
                let text = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
                on_line(Line::Complete { text, bytes });
                self.buf.clear();
            }
        }
    }

    /// The stream ended: the bytes of an unterminated line, if any, now given up.
    pub(super) fn finish(&mut self) -> Option<usize> {
        let n = self.pending();
        self.buf.clear();
        self.skipped = 0;
        (n > 0).then_some(n)
    }
}

/// How much of a bad line an error detail quotes.
const QUOTE_CHARS: usize = 80;

/// The start of a line for an error detail, Debug-quoted and cut at a character boundary.
pub(super) fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

/// A decimal number as a sender wrote it: its value and the decimal places it was given with.
///
/// Only digits, sign, `.` and an exponent are accepted, so `inf`, `NaN` and `0x10` are not
/// numbers; values that overflow `f64` are refused. `decimals` is `None` for a whole number
/// (`48`, `2.5e1`), like the sensorgate decoder.
pub(super) fn parse_number(text: &str) -> Option<(f64, Option<u8>)> {
    let text = text.trim();
    let has_digit = text.bytes().any(|b| b.is_ascii_digit());
    let allowed = |b: u8| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E');
    if !has_digit || !text.bytes().all(allowed) {
        return None;
    }
    let value: f64 = text.parse().ok().filter(|v: &f64| v.is_finite())?;
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (text.get(..i)?, text.get(i + 1..)?.parse::<i64>().ok()?),
        None => (text, 0),
    };
    let fraction = mantissa.split_once('.').map_or(0, |(_, f)| f.len());
    let fraction = i64::try_from(fraction).ok()?;
    let decimals = fraction.saturating_sub(exponent);
    let decimals = (decimals > 0).then(|| u8::try_from(decimals).unwrap_or(u8::MAX));
    Some((value, decimals))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(max: usize, chunks: &[&[u8]]) -> (Vec<Result<Vec<u8>, usize>>, usize) {
        let mut lb = LineBuffer::new(max);
        let mut got = Vec::new();
        for c in chunks {
            lb.feed(c, |l| {
                got.push(match l {
                    Line::Complete { text, .. } => Ok(text.to_vec()),
                    Line::TooLong { bytes } => Err(bytes),
                })
            });
        }
        (got, lb.pending())
    }

    #[test]
    fn numbers_keep_the_decimal_places_they_were_written_with() {
        assert_eq!(parse_number("21.50"), Some((21.5, Some(2))));
        assert_eq!(parse_number("-3.0"), Some((-3.0, Some(1))));
        assert_eq!(parse_number("48"), Some((48.0, None)));
        assert_eq!(parse_number("2.15e1"), Some((21.5, Some(1))));
        assert_eq!(parse_number("5E-3"), Some((0.005, Some(3))));
        assert_eq!(parse_number(" 7 "), Some((7.0, None)));
    }

    #[test]
    fn non_finite_and_non_decimal_text_is_not_a_number() {
        for text in [
            "",
            "nan",
            "NaN",
            "inf",
            "-infinity",
            "1e999",
            "0x10",
            "1,5",
            "12abc",
            "-",
            ".",
            "e5",
            "1e",
            "1.2.3",
        ] {
            assert_eq!(parse_number(text), None, "{text:?}");
        }
    }

    #[test]
    fn lf_and_crlf_lines_are_split_without_their_line_ends() {
        let (got, pending) = lines(16, &[b"a\r\nb\n\nc"]);
        assert_eq!(got, vec![Ok(b"a".to_vec()), Ok(b"b".to_vec()), Ok(vec![])]);
        assert_eq!(pending, 1);
    }

    #[test]
    fn a_line_over_the_limit_is_reported_once_with_all_its_bytes() {
        let (got, pending) = lines(4, &[b"12", b"345", b"67\nok\n"]);
        assert_eq!(got, vec![Err(8), Ok(b"ok".to_vec())]);
        assert_eq!(pending, 0);
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_kept() {
        let (got, _) = lines(4, &[b"1234\n12345\n"]);
        assert_eq!(got, vec![Ok(b"1234".to_vec()), Err(6)]);
    }

    #[test]
    fn the_buffer_never_grows_past_the_limit() {
        let mut lb = LineBuffer::new(8);
        for _ in 0..1000 {
            lb.feed(b"xxxxxxx", |_| panic!("no line ends here"));
            assert!(lb.buf.len() <= 8);
        }
        assert_eq!(lb.pending(), 7000);
        assert_eq!(lb.finish(), Some(7000));
        assert_eq!(lb.pending(), 0);
    }
}
