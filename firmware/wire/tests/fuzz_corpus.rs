//! Replays the fuzz seed corpus through the fuzz target's checks, and can regenerate it.
mod common;

#[path = "../fuzz/harness.rs"]
mod harness;

use common::*;
use sensorgate_wire::*;
use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/accumulator")
}

#[test]
fn every_corpus_file_passes_the_fuzz_checks() {
    let mut count = 0;
    for entry in std::fs::read_dir(corpus_dir()).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        harness::check_accumulator(&data);
        count += 1;
    }
    assert!(count >= 30, "found only {count} corpus files");
}

/// The seed inputs: the first byte picks the chunk size, the rest is the stream.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let all = one_of_each_kind();
    for (i, frame) in all.iter().enumerate() {
        let name = format!("kind-{i:02}-{}", frame.kind().name());
        seeds.push((name, [vec![63], encode_vec(frame)].concat()));
    }
    for (i, frame) in worst_case_of_each_kind().iter().enumerate() {
        let name = format!("worst-{i:02}-{}", frame.kind().name());
        seeds.push((name, [vec![7], encode_vec(frame)].concat()));
    }
    let stream: Vec<u8> = all.iter().flat_map(encode_vec).collect();
    for chunk in [0u8, 1, 4, 16] {
        seeds.push((
            format!("stream-chunk-{chunk}"),
            [vec![chunk], stream.clone()].concat(),
        ));
    }
    let good = encode_vec(&all[1]);
    let mut flipped = good.clone();
    flipped[5] ^= 0x04;
    seeds.push((
        "crc-flip".into(),
        [vec![63], flipped, good.clone()].concat(),
    ));
    seeds.push((
        "truncated".into(),
        [vec![63], good[..8].to_vec(), vec![0], good.clone()].concat(),
    ));
    seeds.push((
        "missing-delimiter".into(),
        [vec![63], good[..good.len() - 1].to_vec(), good.clone()].concat(),
    ));
    seeds.push(("empty-frames".into(), vec![63, 0, 0, 0, 0]));
    seeds.push((
        "oversize".into(),
        [vec![63], vec![0x55; 300], vec![0], good.clone()].concat(),
    ));
    seeds.push((
        "garbage".into(),
        [vec![3], vec![0xFF, 0x13, 0x00, 0x37, 0x42], good.clone()].concat(),
    ));
    seeds.push(("cobs-bad-code".into(), vec![63, 0x09, 0x01, 0x02, 0x00]));
    let mut raw = encode_raw_vec(&all[1]);
    raw[0] = 2;
    let n = raw.len() - CRC_LEN;
    let crc = checksum(&raw[..n]).to_le_bytes();
    raw[n..].copy_from_slice(&crc);
    let cobs = cobs_stuff(&raw);
    seeds.push(("unknown-version".into(), [vec![63], cobs].concat()));
    raw[0] = PROTOCOL_VERSION;
    raw[1] = 0x42;
    let crc = checksum(&raw[..n]).to_le_bytes();
    raw[n..].copy_from_slice(&crc);
    let cobs = cobs_stuff(&raw);
    seeds.push(("unknown-kind".into(), [vec![63], cobs].concat()));
    seeds.push((
        "unterminated".into(),
        [vec![63], good[..10].to_vec()].concat(),
    ));
    seeds.push(("nothing".into(), vec![]));
    seeds
}

/// COBS stuffing plus delimiter, for raw frames `encode` would not produce.
fn cobs_stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    let mut code_at = 0;
    for &b in raw {
        if b == 0 {
            out[code_at] = (out.len() - code_at) as u8;
            code_at = out.len();
            out.push(0);
        } else {
            out.push(b);
        }
    }
    out[code_at] = (out.len() - code_at) as u8;
    out.push(0);
    out
}

/// Rewrites the seed corpus: `cargo test -p sensorgate-wire --test fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn regenerate_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seeds() {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
