//! `sensorgate outbox` and `sensorgate outbox dump`: what is waiting to go upstream, read
//! without modifying the outbox (safe while the gateway runs).

use std::fmt::Write as _;
use std::path::Path;

use sensorgate::outbox::{Inspection, Qos};

/// The summary: depth, bytes, oldest record's age, drop counters, damage found.
pub fn summary(dir: &Path, i: &Inspection, now_ms: u64) -> String {
    let r = &i.report;
    let mut s = String::new();
    let _ = writeln!(s, "outbox        {}", dir.display());
    let _ = writeln!(s, "records       {}", r.pending);
    let _ = writeln!(s, "bytes         {}", r.pending_bytes);
    let age = r
        .oldest_timestamp_ms
        .map(|t| human_age(now_ms.saturating_sub(t) / 1000));
    let _ = writeln!(s, "oldest        {}", age.as_deref().unwrap_or("-"));
    let _ = writeln!(s, "segments      {}", r.segments);
    let _ = writeln!(s, "next id       {}", r.next_id);
    let _ = writeln!(s, "state keys    {}", r.state_keys);
    let drops: Vec<String> = i
        .drops
        .by_kind()
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    let _ = writeln!(s, "dropped       {}", drops.join(", "));
    let _ = writeln!(
        s,
        "damaged       {} region(s), {} byte(s); torn tail {} byte(s)",
        r.corrupt_skipped, r.corrupt_bytes, r.torn_tail_bytes
    );
    s
}

/// One line per pending record, oldest first.
pub fn dump(i: &Inspection, limit: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>10}  {:<3}  {:<6}  {:<8}  {:<24}  topic = payload",
        "id", "qos", "retain", "released", "accepted (UTC)"
    );
    for p in i.pending.iter().take(limit) {
        let qos = match p.record.qos {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        };
        // PUBREC committed: resumes with PUBREL only. The packet id is derived from the record
        // id by the uplink, not stored, so there is none to show.
        let released = match (p.record.qos, p.released) {
            (_, true) => "yes",
            (Qos::ExactlyOnce, false) => "no",
            _ => "-",
        };
        let _ = writeln!(
            s,
            "{:>10}  {:<3}  {:<6}  {:<8}  {:<24}  {} = {}",
            p.id,
            qos,
            if p.record.retain { "yes" } else { "no" },
            released,
            utc(p.record.timestamp_ms),
            p.record.topic,
            printable(&p.record.payload)
        );
    }
    if i.pending.len() > limit {
        let _ = writeln!(s, "... and {} more (use --limit)", i.pending.len() - limit);
    }
    s
}

fn printable(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(t) if !t.chars().any(char::is_control) => {
            if t.len() > 80 {
                format!(
                    "{}…",
                    &t[..t.char_indices().nth(80).map_or(t.len(), |(i, _)| i)]
                )
            } else {
                t.to_string()
            }
        }
        _ => {
            let hex: Vec<String> = payload
                .iter()
                .take(32)
                .map(|b| format!("{b:02x}"))
                .collect();
            format!(
                "0x{}{}",
                hex.join(""),
                if payload.len() > 32 { "…" } else { "" }
            )
        }
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// `YYYY-MM-DD hh:mm:ss.mmm` in UTC, from unix milliseconds (civil-from-days).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let tod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_764_250_000_123), "2025-11-27 13:26:40.123");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn payloads_print_as_text_or_hex() {
        assert_eq!(printable(b"21.5"), "21.5");
        assert_eq!(printable(&[0, 1, 255]), "0x0001ff");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(human_age(5), "5 s ago");
        assert_eq!(human_age(600), "10 min ago");
        assert_eq!(human_age(86_400 * 3), "3 days ago");
    }
}
