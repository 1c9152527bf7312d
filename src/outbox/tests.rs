//! Behaviour of the outbox through its API, including crash and corruption cases.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::format::{self, Body, DataBody};
use super::recovery::{self, segment_path};
use super::*;

/// Commits at once so tests run fast; small segments exercise rolling.
pub(super) fn fast_config() -> OutboxConfig {
    OutboxConfig {
        commit_delay: Duration::ZERO,
        ack_commit_delay: Duration::ZERO,
        ..OutboxConfig::default()
    }
}

pub(super) fn record(n: u64) -> Record {
    Record {
        topic: format!("site/node{}/temp", n % 3),
        payload: Bytes::from(format!("reading {n}")),
        qos: Qos::AtLeastOnce,
        retain: false,
        timestamp_ms: 1_700_000_000_000 + n,
    }
}

fn open(dir: &Path, config: OutboxConfig) -> (Outbox, RecoveryReport) {
    Outbox::open(dir, config).expect("open")
}

fn all_pending(outbox: &Outbox) -> Vec<Pending> {
    outbox
        .cursor()
        .next_batch_blocking(usize::MAX)
        .expect("read")
}

fn pending_ids(outbox: &Outbox) -> Vec<u64> {
    all_pending(outbox).into_iter().map(|p| p.id).collect()
}

fn append_n(outbox: &Outbox, range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    range
        .map(|n| outbox.append(record(n)).wait().expect("append"))
        .collect()
}

fn segment_files(dir: &Path) -> Vec<u64> {
    recovery::list_segments(dir).expect("list")
}

/// The frames of one segment with their offsets.
fn frames(path: &Path) -> Vec<(u64, usize, Body)> {
    let buf = std::fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut p = 0;
    while let format::Scan::Frame { body, len } = format::scan(&buf[p..]) {
        out.push((p as u64, len, body));
        p += len;
    }
    out
}

fn frame_len(n: u64) -> u64 {
    let r = record(n);
    format::data_frame_len(&r.topic, r.payload.len(), &[]) as u64
}

#[test]
fn appended_records_come_back_in_id_order_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, report) = open(dir.path(), fast_config());
    assert_eq!(report.pending, 0);
    assert_eq!(append_n(&outbox, 1..=5), vec![1, 2, 3, 4, 5]);
    outbox.close().wait().unwrap();

    let (outbox, report) = open(dir.path(), fast_config());
    assert_eq!(report.pending, 5);
    assert_eq!(report.next_id, 6);
    let pending = all_pending(&outbox);
    assert_eq!(pending.len(), 5);
    for (i, p) in pending.iter().enumerate() {
        assert_eq!(p.id, i as u64 + 1);
        assert_eq!(p.record, record(i as u64 + 1));
    }
}

#[test]
fn acknowledged_records_are_not_delivered_again_after_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    append_n(&outbox, 1..=5);
    assert!(outbox.ack(2));
    assert!(outbox.ack(4));
    assert!(!outbox.ack(4), "a second ack finds nothing");
    assert_eq!(pending_ids(&outbox), vec![1, 3, 5]);
    outbox.close().wait().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    assert_eq!(pending_ids(&outbox), vec![1, 3, 5]);
}

#[test]
fn reader_skips_a_torn_final_record() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    append_n(&outbox, 1..=3);
    outbox.crash();

    // A fourth record whose write was cut short by the crash.
    let last = inspect(dir.path()).unwrap().segments.pop().unwrap();
    let mut torn = Vec::new();
    format::encode_data(
        &mut torn,
        &DataBody {
            id: 4,
            timestamp_ms: 0,
            qos: 1,
            retain: false,
            state: vec![],
            topic: "t".into(),
            payload: Bytes::from_static(b"never acknowledged to its producer"),
        },
    );
    torn.truncate(torn.len() / 2);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last.path)
        .unwrap();
    f.write_all_at(&torn, last.data_end).unwrap();
    drop(f);

    let (outbox, report) = open(dir.path(), fast_config());
    // Trailing zeros of the torn write look like preallocated space and are not counted.
    let nonzero = torn.iter().rposition(|&b| b != 0).unwrap() + 1;
    assert_eq!(report.torn_tail_bytes, nonzero as u64);
    assert_eq!(report.corrupt_skipped, 0);
    assert_eq!(pending_ids(&outbox), vec![1, 2, 3]);
    assert_eq!(outbox.append(record(4)).wait().unwrap(), 4);
    outbox.close().wait().unwrap();

    // The torn bytes were cleared, so they are not mistaken for corruption later.
    let (outbox, report) = open(dir.path(), fast_config());
    assert_eq!((report.torn_tail_bytes, report.corrupt_skipped), (0, 0));
    assert_eq!(pending_ids(&outbox), vec![1, 2, 3, 4]);
}

#[test]
fn a_corrupt_middle_record_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    append_n(&outbox, 1..=5);
    outbox.close().wait().unwrap();

    let path = segment_path(dir.path(), segment_files(dir.path())[0]);
    let (offset, len, _) = frames(&path)
        .into_iter()
        .find(|(_, _, b)| matches!(b, Body::Data(d) if d.id == 3))
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"X", offset + len as u64 - 2).unwrap(); // a flipped payload byte
    drop(f);

    let (outbox, report) = open(dir.path(), fast_config());
    assert_eq!(report.corrupt_skipped, 1);
    assert_eq!(report.corrupt_bytes, len as u64);
    assert_eq!(outbox.stats().corrupt_skipped, 1);
    assert_eq!(pending_ids(&outbox), vec![1, 2, 4, 5]);
}

#[test]
fn a_deleted_checkpoint_redelivers_rather_than_loses() {
    // Acknowledgements live in Ack frames and in the Snapshot at the head of each segment.
    // Wiping all of them is the worst case of a lost checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        segment_bytes: 5 * frame_len(1),
        ..fast_config()
    };
    let (outbox, _) = open(dir.path(), config.clone());
    append_n(&outbox, 1..=12);
    for id in [1, 2, 5, 9] {
        assert!(outbox.ack(id));
    }
    outbox.close().wait().unwrap();
    let before = inspect(dir.path()).unwrap();
    let kept: Vec<u64> = before.pending.iter().map(|p| p.id).collect();
    assert_eq!(kept, vec![3, 4, 6, 7, 8, 10, 11, 12]);

    let mut wiped = 0;
    for number in segment_files(dir.path()) {
        let path = segment_path(dir.path(), number);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for (offset, len, body) in frames(&path) {
            if matches!(body, Body::Ack(..) | Body::Snapshot(_)) {
                f.write_all_at(&vec![0u8; len], offset).unwrap();
                wiped += 1;
            }
        }
    }
    assert!(wiped >= 2);

    let (outbox, report) = open(dir.path(), config);
    let ids = pending_ids(&outbox);
    assert!(
        kept.iter().all(|id| ids.contains(id)),
        "nothing pending is lost: {ids:?}"
    );
    assert!(ids.len() > kept.len(), "some acked records come back");
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert!(report.corrupt_skipped > 0);
    assert!(outbox.append(record(13)).wait().unwrap() > 12);
}

#[test]
fn released_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    let mut r = record(1);
    r.qos = Qos::ExactlyOnce;
    let a = outbox.append(r.clone()).wait().unwrap();
    let b = outbox.append(r).wait().unwrap();
    outbox.set_packet_id(a, 7).wait().unwrap();
    outbox.mark_released(a).wait().unwrap();
    outbox.set_packet_id(b, 8).wait().unwrap();
    outbox.crash();

    let (outbox, _) = open(dir.path(), fast_config());
    let pending = all_pending(&outbox);
    assert_eq!(
        pending
            .iter()
            .map(|p| (p.id, p.packet_id, p.released))
            .collect::<Vec<_>>(),
        vec![(a, Some(7), true), (b, Some(8), false)]
    );
    assert!(matches!(
        outbox.mark_released(99).wait(),
        Err(OutboxError::UnknownId(99))
    ));
}

#[test]
fn released_state_survives_when_the_segment_holding_it_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        segment_bytes: 3 * frame_len(1),
        ..fast_config()
    };
    let (outbox, _) = open(dir.path(), config.clone());
    let mut r = record(1);
    r.qos = Qos::ExactlyOnce;
    let a = outbox.append(r).wait().unwrap();
    let others = append_n(&outbox, 2..=4);
    outbox.set_packet_id(a, 300).wait().unwrap();
    outbox.mark_released(a).wait().unwrap();
    let more = append_n(&outbox, 5..=12);
    for id in others.into_iter().chain(more) {
        outbox.ack(id);
    }
    outbox.close().wait().unwrap();
    // Only the segment of `a` and the newest remain; the Released frame went with its segment.
    let segments = segment_files(dir.path());
    assert_eq!(segments.len(), 2, "{segments:?}");
    let released_frames = segments
        .iter()
        .flat_map(|n| frames(&segment_path(dir.path(), *n)))
        .filter(|(_, _, b)| matches!(b, Body::Released(_)))
        .count();
    assert_eq!(released_frames, 0);

    let (outbox, _) = open(dir.path(), config);
    let pending = all_pending(&outbox);
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].id, pending[0].packet_id, pending[0].released),
        (a, Some(300), true)
    );
}

#[test]
fn companion_state_is_recovered_with_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    let id = outbox
        .append_with_state(
            record(1),
            &[("inbound/client-a", b"pkid=5"), ("node/7", b"boot=3 seq=9")],
        )
        .wait()
        .unwrap();
    outbox.put_state("node/7", b"boot=3 seq=10").wait().unwrap();
    assert!(matches!(
        outbox.put_state("", b"x").wait(),
        Err(OutboxError::InvalidKey(_))
    ));
    outbox.crash();

    let (outbox, report) = open(dir.path(), fast_config());
    assert_eq!(report.state_keys, 2);
    assert_eq!(pending_ids(&outbox), vec![id]);
    assert_eq!(
        outbox.state("inbound/client-a").as_deref(),
        Some(&b"pkid=5"[..])
    );
    assert_eq!(
        outbox.state("node/7").as_deref(),
        Some(&b"boot=3 seq=10"[..])
    );
}

#[test]
fn companion_state_of_a_torn_record_is_absent_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    outbox
        .append_with_state(record(1), &[("node/7", b"seq=1")])
        .wait()
        .unwrap();
    outbox
        .append_with_state(record(2), &[("node/7", b"seq=2")])
        .wait()
        .unwrap();
    outbox.crash();
    // Cut the second record anywhere: its state must not survive without it.
    let path = segment_path(dir.path(), segment_files(dir.path())[0]);
    let (offset, len, _) = frames(&path).pop().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&vec![0u8; len / 3], offset + (len - len / 3) as u64)
        .unwrap();
    drop(f);
    let (outbox, _) = open(dir.path(), fast_config());
    assert_eq!(pending_ids(&outbox), vec![1]);
    assert_eq!(outbox.state("node/7").as_deref(), Some(&b"seq=1"[..]));
}

fn quota_config(policy: FullPolicy) -> OutboxConfig {
    OutboxConfig {
        max_bytes: 3 * frame_len(1),
        when_full: policy,
        ..fast_config()
    }
}

#[test]
fn drop_oldest_drops_the_oldest_records_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = quota_config(FullPolicy::DropOldest);
    let (outbox, _) = open(dir.path(), config.clone());
    assert_eq!(append_n(&outbox, 1..=5), vec![1, 2, 3, 4, 5]);
    assert_eq!(pending_ids(&outbox), vec![3, 4, 5]);
    let stats = outbox.stats();
    assert_eq!((stats.dropped_oldest, stats.dropped_newest), (2, 0));
    assert_eq!(stats.bytes, 3 * frame_len(1));
    outbox.close().wait().unwrap();
    let (outbox, _) = open(dir.path(), config);
    assert_eq!(pending_ids(&outbox), vec![3, 4, 5], "drops are durable");
}

#[test]
fn drop_newest_hands_the_new_record_back_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), quota_config(FullPolicy::DropNewest));
    append_n(&outbox, 1..=3);
    for n in 4..=5 {
        match outbox.append(record(n)).wait() {
            Err(AppendError::Full(r)) => assert_eq!(r, record(n)),
            other => panic!("expected Full, got {other:?}"),
        }
    }
    assert_eq!(pending_ids(&outbox), vec![1, 2, 3]);
    assert_eq!(outbox.stats().dropped_newest, 2);
    assert!(outbox.ack(1));
    assert_eq!(outbox.append(record(6)).wait().unwrap(), 4);
    assert_eq!(pending_ids(&outbox), vec![2, 3, 4]);
}

#[test]
fn block_makes_the_append_wait_for_space_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), quota_config(FullPolicy::Block));
    append_n(&outbox, 1..=3);
    let fourth = outbox.append(record(4));
    let fifth = outbox.append(record(5));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(outbox.stats().blocked, 2);
    assert_eq!(pending_ids(&outbox), vec![1, 2, 3]);
    assert!(outbox.ack(2));
    assert_eq!(fourth.wait().unwrap(), 4);
    assert_eq!(outbox.stats().blocked, 1);
    assert!(outbox.ack(1));
    assert_eq!(fifth.wait().unwrap(), 5);
    assert_eq!(pending_ids(&outbox), vec![3, 4, 5]);
    let s = outbox.stats();
    assert_eq!((s.dropped_oldest, s.dropped_newest, s.blocked), (0, 0, 0));
}

#[test]
fn a_blocked_append_gets_its_record_back_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), quota_config(FullPolicy::Block));
    append_n(&outbox, 1..=3);
    let fourth = outbox.append(record(4));
    outbox.close().wait().unwrap();
    match fourth.wait() {
        Err(AppendError::Closed(r)) => assert_eq!(r, record(4)),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[test]
fn a_record_larger_than_the_quota_is_refused_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = quota_config(FullPolicy::DropOldest);
    config.max_bytes = 10;
    let (outbox, _) = open(dir.path(), config);
    assert!(matches!(
        outbox.append(record(1)).wait(),
        Err(AppendError::TooLarge { .. })
    ));
    let s = outbox.stats();
    assert_eq!((s.dropped_too_large, s.dropped_newest), (1, 0));
}

#[test]
fn expired_records_are_dropped_oldest_first_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    append_n(&outbox, 1..=5); // timestamps base+1 ..= base+5
    let now = 1_700_000_000_000 + 3 + 60_000;
    let expired = outbox.inner.lock().expire(now, Duration::from_secs(60));
    assert_eq!(expired, 2);
    assert_eq!(pending_ids(&outbox), vec![3, 4, 5]);
    assert_eq!(outbox.stats().expired, 2);
    outbox.close().wait().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    assert_eq!(pending_ids(&outbox), vec![3, 4, 5]);
}

#[test]
fn the_writer_expires_old_records_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        max_age: Some(Duration::from_secs(3600)),
        ..fast_config()
    };
    let (outbox, _) = open(dir.path(), config);
    let mut old = record(1);
    old.timestamp_ms = now_ms() - 7_200_000;
    let mut fresh = record(2);
    fresh.timestamp_ms = now_ms();
    outbox.append(old).wait().unwrap();
    let id = outbox.append(fresh).wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while outbox.stats().expired == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(outbox.stats().expired, 1);
    assert_eq!(pending_ids(&outbox), vec![id]);
}

#[test]
fn fully_acknowledged_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        segment_bytes: 4 * frame_len(1),
        ..fast_config()
    };
    let (outbox, _) = open(dir.path(), config);
    let ids = append_n(&outbox, 1..=20);
    assert!(segment_files(dir.path()).len() >= 5);
    for id in &ids[..10] {
        outbox.ack(*id);
    }
    outbox.flush().wait().unwrap();
    let left = segment_files(dir.path()).len();
    assert!(left < 5 + 2, "segments of ids 1..=10 are gone: {left} left");
    assert_eq!(pending_ids(&outbox), (11..=20).collect::<Vec<_>>());
    for id in &ids[10..] {
        outbox.ack(*id);
    }
    outbox.flush().wait().unwrap();
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "only the active segment"
    );
    assert_eq!(outbox.stats().segments, 1);
}

#[test]
fn ids_stay_monotonic_across_restarts_even_when_all_segments_were_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        segment_bytes: 2 * frame_len(1),
        ..fast_config()
    };
    let mut last = 0;
    for round in 0..4 {
        let (outbox, report) = open(dir.path(), config.clone());
        assert_eq!(report.pending, 0);
        assert!(report.next_id > last, "round {round}");
        for n in 0..5 {
            let id = outbox.append(record(n)).wait().unwrap();
            assert!(id > last);
            last = id;
            outbox.ack(id);
        }
        outbox.close().wait().unwrap();
        // Every segment that held a data record is gone; the newest holds only state.
        for number in segment_files(dir.path()) {
            let path = segment_path(dir.path(), number);
            let data = frames(&path)
                .into_iter()
                .filter(|(_, _, b)| matches!(b, Body::Data(_)))
                .count();
            assert!(data <= 2, "round {round}: {data} data frames left");
        }
    }
    assert_eq!(last, 20);
}

#[test]
fn a_failed_write_hands_the_record_back_and_keeps_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        segment_bytes: 2 * frame_len(1),
        ..fast_config()
    };
    let (outbox, _) = open(dir.path(), config.clone());
    append_n(&outbox, 1..=2);
    // The next segment cannot be created: its name is taken by a directory.
    let next = segment_files(dir.path()).last().unwrap() + 1;
    let blocker = segment_path(dir.path(), next);
    std::fs::create_dir(&blocker).unwrap();
    match outbox.append(record(3)).wait() {
        Err(e @ AppendError::Io { .. }) => {
            assert!(e.to_string().contains("cannot write outbox file"), "{e}");
            assert_eq!(e.into_record(), Some(record(3)));
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(outbox.stats().write_errors, 1);
    std::fs::remove_dir(&blocker).unwrap();
    let id = outbox.append(record(3)).wait().unwrap();
    assert!(id > 3, "the failed id is not reused: {id}");
    outbox.close().wait().unwrap();
    let (outbox, report) = open(dir.path(), config);
    assert_eq!(pending_ids(&outbox), vec![1, 2, id]);
    assert_eq!(report.corrupt_skipped, 0);
}

#[test]
fn opening_an_unusable_directory_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let err = Outbox::open(file.join("outbox"), fast_config()).unwrap_err();
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[test]
fn inspect_reads_everything_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    append_n(&outbox, 1..=3);
    outbox.ack(2);
    outbox.put_state("k", b"v").wait().unwrap(); // also makes the ack durable
    outbox.crash();
    let path = segment_path(dir.path(), segment_files(dir.path())[0]);
    let data_end = inspect(dir.path()).unwrap().segments[0].data_end;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"SGOB\x40\x01", data_end).unwrap();
    drop(f);
    let before = std::fs::read(&path).unwrap();

    let seen = inspect(dir.path()).unwrap();
    assert_eq!(seen.report.torn_tail_bytes, 6);
    assert_eq!(seen.pending.len(), 2);
    assert_eq!(seen.pending[1].record, record(3));
    assert_eq!(
        seen.state,
        vec![("k".to_string(), Bytes::from_static(b"v"))]
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(inspect(dir.path().join("missing")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_share_commits_and_a_cursor_sees_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        commit_delay: Duration::from_millis(5),
        ..OutboxConfig::default()
    };
    let (outbox, _) = Outbox::open(dir.path(), config).unwrap();
    let mut cursor = outbox.cursor();
    let waiter = tokio::spawn(async move {
        cursor.wait_for_more().await;
        let mut seen = Vec::new();
        while seen.len() < 200 {
            let batch = cursor.next_batch(64).await.unwrap();
            if batch.is_empty() {
                cursor.wait_for_more().await;
            }
            seen.extend(batch.into_iter().map(|p| p.id));
        }
        seen
    });
    let mut tasks = Vec::new();
    for t in 0..20u64 {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..10 {
                ids.push(outbox.append(record(t * 10 + n)).await.unwrap());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "per-producer order");
        ids.extend(mine);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=200).collect::<Vec<_>>());
    assert_eq!(waiter.await.unwrap(), (1..=200).collect::<Vec<_>>());
    assert!(outbox.stats().commits < 200, "{:?}", outbox.stats());
    outbox.close().await.unwrap();
}

#[test]
fn a_cursor_reads_runs_across_segments_and_skips_a_record_damaged_since_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        segment_bytes: 4 * frame_len(1),
        ..fast_config()
    };
    let (outbox, _) = open(dir.path(), config);
    append_n(&outbox, 1..=12);
    assert!(segment_files(dir.path()).len() >= 3);
    let mut cursor = outbox.cursor();
    let ids = |b: Vec<Pending>| b.into_iter().map(|p| p.id).collect::<Vec<_>>();
    // Five records: a run in one segment, then the start of the next.
    assert_eq!(
        ids(cursor.next_batch_blocking(5).unwrap()),
        vec![1, 2, 3, 4, 5]
    );

    // Record 7, ahead of the cursor, is damaged on disk while the outbox runs.
    let (path, offset, len) = segment_files(dir.path())
        .into_iter()
        .map(|n| segment_path(dir.path(), n))
        .find_map(|path| {
            frames(&path)
                .into_iter()
                .find(|(_, _, b)| matches!(b, Body::Data(d) if d.id == 7))
                .map(|(offset, len, _)| (path.clone(), offset, len))
        })
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"X", offset + len as u64 - 2).unwrap();
    drop(f);
    assert_eq!(
        ids(cursor.next_batch_blocking(5).unwrap()),
        vec![6, 8, 9, 10],
        "the damaged record is dropped, its neighbours in the same read are not"
    );
    assert_eq!(outbox.stats().corrupt_skipped, 1);

    // The segments the cursor has open are deleted once acknowledged; reading goes on.
    for id in [1, 2, 3, 4, 5, 6, 8, 9, 10] {
        assert!(outbox.ack(id));
    }
    outbox.flush().wait().unwrap();
    assert_eq!(ids(cursor.next_batch_blocking(5).unwrap()), vec![11, 12]);
    assert!(cursor.next_batch_blocking(5).unwrap().is_empty());
}

#[test]
fn drop_oldest_never_drops_a_released_record_and_drops_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = quota_config(FullPolicy::DropOldest);
    let (outbox, _) = open(dir.path(), config.clone());
    append_n(&outbox, 1..=3);
    // Release one, append one: 2 goes rather than released 1, then 4 rather than 1 and 3.
    for (release, n, after, dropped) in [(1, 4, [1, 3, 4], 1), (3, 5, [1, 3, 5], 2)] {
        outbox.mark_released(release).wait().unwrap();
        assert_eq!(outbox.append(record(n)).wait().unwrap(), n);
        assert_eq!(pending_ids(&outbox), after);
        assert_eq!(outbox.stats().dropped_oldest, dropped);
    }
    outbox.close().wait().unwrap();
    let (outbox, _) = open(dir.path(), config);
    let p = all_pending(&outbox);
    let released: Vec<(u64, bool)> = p.iter().map(|p| (p.id, p.released)).collect();
    assert_eq!(released, vec![(1, true), (3, true), (5, false)]);
    assert_eq!(
        outbox.stats().dropped_oldest,
        2,
        "counters survive a restart"
    );
}

#[test]
fn drop_oldest_with_only_released_records_left_drops_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), quota_config(FullPolicy::DropOldest));
    append_n(&outbox, 1..=3);
    for id in 1..=3 {
        outbox.mark_released(id).wait().unwrap();
    }
    assert_eq!(outbox.append(record(4)).wait().unwrap(), 4);
    assert_eq!(
        pending_ids(&outbox),
        vec![1, 2, 3],
        "4 is the oldest droppable"
    );
    let s = outbox.stats();
    assert_eq!((s.dropped_oldest, s.bytes), (1, 3 * frame_len(1)));
}

#[test]
fn expiry_never_drops_a_released_record() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    append_n(&outbox, 1..=5); // timestamps base+1 ..= base+5
    outbox.mark_released(1).wait().unwrap();
    outbox.mark_released(3).wait().unwrap();
    let now = 1_700_000_000_000 + 5 + 60_000; // 1 to 4 are too old
    let expired = outbox.inner.lock().expire(now, Duration::from_secs(60));
    assert_eq!(expired, 2);
    assert_eq!(pending_ids(&outbox), vec![1, 3, 5]);
    assert_eq!(outbox.stats().expired, 2);
}

#[test]
fn every_kind_of_drop_is_counted_and_the_counters_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = quota_config(FullPolicy::DropNewest);
    config.max_bytes = 3 * frame_len(1);
    let (outbox, _) = open(dir.path(), config.clone());
    append_n(&outbox, 1..=3);
    assert!(matches!(
        outbox.append(record(4)).wait(),
        Err(AppendError::Full(_))
    ));
    let mut long_topic = record(5);
    long_topic.topic = "t".repeat(70_000);
    assert!(matches!(
        outbox.append(long_topic).wait(),
        Err(AppendError::Invalid { .. })
    ));
    let reserved: &[(&str, &[u8])] = &[("$outbox/drops", b"x")];
    match outbox.append_with_state(record(6), reserved).wait() {
        Err(AppendError::Invalid { record: r, .. }) => assert_eq!(r, record(6)),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let mut big = record(7);
    big.payload = Bytes::from(vec![0; 4 * frame_len(1) as usize]);
    assert!(matches!(
        outbox.append(big).wait(),
        Err(AppendError::TooLarge { .. })
    ));
    let want = DropCounters {
        oldest: 0,
        newest: 1,
        expired: 0,
        too_large: 1,
        invalid: 2,
    };
    let s = outbox.stats();
    assert_eq!(
        (s.dropped_newest, s.dropped_too_large, s.dropped_invalid),
        (1, 1, 2)
    );
    assert!(
        outbox.states().is_empty(),
        "the counters' key is not user state"
    );
    outbox.close().wait().unwrap();
    assert_eq!(inspect(dir.path()).unwrap().drops, want);
    assert!(inspect(dir.path()).unwrap().state.is_empty());
    let (outbox, report) = open(dir.path(), config);
    assert_eq!(report.state_keys, 0);
    let s = outbox.stats();
    assert_eq!(
        (s.dropped_newest, s.dropped_too_large, s.dropped_invalid),
        (1, 1, 2)
    );
    assert!(outbox.put_state("$outbox/drops", b"0").wait().is_err());
}

#[test]
fn drop_counters_decode_from_shorter_or_longer_values() {
    let c = DropCounters {
        oldest: 1,
        newest: 2,
        expired: 3,
        too_large: 4,
        invalid: 5,
    };
    assert_eq!(DropCounters::decode(&c.encode()), c);
    let mut longer = c.encode().to_vec();
    longer.extend_from_slice(&9u64.to_le_bytes());
    assert_eq!(DropCounters::decode(&longer), c);
    let short = DropCounters::decode(&c.encode()[..16]);
    assert_eq!((short.oldest, short.newest, short.invalid), (1, 2, 0));
    assert_eq!(DropCounters::decode(b"junk"), DropCounters::default());
}

#[test]
fn drop_warnings_come_once_per_kind_per_period_with_the_count_since_the_last() {
    let mut log = DropLog::default();
    let t0 = Instant::now();
    assert_eq!(
        log.record(DropKind::Oldest, 1, t0),
        Some(1),
        "the first at once"
    );
    for _ in 0..999 {
        assert_eq!(
            log.record(DropKind::Oldest, 1, t0 + Duration::from_secs(1)),
            None
        );
    }
    assert_eq!(
        log.record(DropKind::Newest, 1, t0),
        Some(1),
        "kinds are apart"
    );
    assert!(log.due(t0 + Duration::from_secs(9), false).is_empty());
    assert_eq!(
        log.due(t0 + DROP_LOG_PERIOD, false),
        vec![(DropKind::Oldest, 999)],
        "the held-back count, once its period passed"
    );
    assert_eq!(log.record(DropKind::Oldest, 2, t0 + DROP_LOG_PERIOD), None);
    assert_eq!(
        log.due(t0 + DROP_LOG_PERIOD, true),
        vec![(DropKind::Oldest, 2)]
    );
    assert!(log.due(t0 + DROP_LOG_PERIOD * 5, true).is_empty());
}

/// Polls a future once without a runtime's help: `Pending` means it waits for an event.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    Pin::new(f).poll(&mut cx)
}

/// A hang guard for awaits that must complete, not a synchronisation.
async fn completes<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what} never completed"))
}

#[tokio::test]
async fn a_producer_beyond_the_block_queue_bound_waits_until_an_ack_frees_room() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), quota_config(FullPolicy::Block));
    // A quarter of a three-record quota: one waiting record reaches the bound.
    assert_eq!(outbox.block_queue_bytes(), 3 * frame_len(1) / 4);
    for n in 1..=3 {
        outbox.append(record(n)).await.unwrap();
    }
    let mut fourth = outbox.append(record(4));
    assert!(
        poll_once(&mut fourth).is_pending(),
        "no space for the fourth"
    );
    assert_eq!(outbox.stats().blocked_bytes, frame_len(4));

    // The next producer is held before its append, so nothing more is buffered.
    let mut producer = Box::pin({
        let outbox = outbox.clone();
        async move {
            outbox.wait_for_room(record_size(&record(5))).await;
            outbox.append(record(5)).await
        }
    });
    assert!(poll_once(&mut producer).is_pending());
    let s = outbox.stats();
    assert_eq!((s.blocked, s.depth, s.queued), (1, 3, 0), "{s:?}");

    assert!(outbox.ack(1), "the upstream acknowledges the oldest");
    assert_eq!(completes("the fourth", fourth).await.unwrap(), 4);
    // The producer gets past the gate; its record then waits for space in turn.
    let mut fifth = Box::pin(completes("the producer", producer));
    assert!(poll_once(&mut fifth).is_pending());
    assert!(outbox.ack(2));
    assert_eq!(fifth.await.unwrap(), 5);
    assert_eq!(pending_ids(&outbox), vec![3, 4, 5]);
    let s = outbox.stats();
    assert_eq!((s.blocked, s.blocked_bytes, s.dropped_newest), (0, 0, 0));
}

#[tokio::test]
async fn producers_waiting_for_room_are_released_when_the_outbox_closes() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), quota_config(FullPolicy::Block));
    for n in 1..=3 {
        outbox.append(record(n)).await.unwrap();
    }
    let fourth = outbox.append(record(4));
    let mut waiting = Box::pin({
        let outbox = outbox.clone();
        async move { outbox.wait_for_room(frame_len(5)).await }
    });
    assert!(poll_once(&mut waiting).is_pending());
    outbox.clone().close().await.unwrap();
    completes("the waiting producer", waiting).await;
    assert!(matches!(fourth.await, Err(AppendError::Closed(_))));
}

#[test]
fn the_block_queue_bound_is_a_quarter_of_the_quota_up_to_4_mib() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = open(dir.path(), fast_config());
    assert_eq!(outbox.block_queue_bytes(), BLOCK_QUEUE_MAX);
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        max_bytes: 64 * 1024,
        ..fast_config()
    };
    let (outbox, _) = open(dir.path(), config);
    assert_eq!(outbox.block_queue_bytes(), 16 * 1024);
}

/// `put_state_now` does not wait out the group-commit delay (here an hour); `put_state` does.
#[tokio::test]
async fn put_state_now_commits_without_the_group_commit_delay() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        commit_delay: Duration::from_secs(3600),
        ack_commit_delay: Duration::from_secs(3600),
        ..OutboxConfig::default()
    };
    let (outbox, _) = open(dir.path(), config);
    let mut waiting = std::pin::pin!(outbox.put_state("later", b"1"));
    assert!(
        poll_once(&mut waiting).is_pending(),
        "put_state committed at once"
    );
    completes("put_state_now", outbox.put_state_now("now", b"2"))
        .await
        .expect("committed");
    assert_eq!(outbox.state("now").as_deref(), Some(&b"2"[..]));
    // Queued before it, so committed with it.
    completes("the earlier put_state", waiting)
        .await
        .expect("committed");
}
