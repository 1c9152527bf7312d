//! Exhaustive proof that CRC-32/ISCSI detects every error of up to 4 bits in any frame up to
//! `MAX_RAW` bytes (Hamming distance ≥ 5), using the CRC's linearity: an error pattern goes
//! undetected exactly when the XOR of its bits' syndromes is zero.
use sensorgate_wire::{CRC_LEN, MAX_RAW, checksum};
use std::collections::HashSet;

/// Syndrome of each single-bit error in a codeword of `MAX_RAW` bytes (content + CRC field).
/// Shorter frames are shortened codes of this one, so their distance is at least as large.
fn syndromes() -> Vec<u32> {
    let data_len = MAX_RAW - CRC_LEN;
    let zero = vec![0u8; data_len];
    let base = checksum(&zero);
    let mut out = Vec::with_capacity(MAX_RAW * 8);
    let mut e = zero.clone();
    for bit in 0..data_len * 8 {
        e[bit / 8] ^= 1 << (bit % 8);
        out.push(checksum(&e) ^ base);
        e[bit / 8] ^= 1 << (bit % 8);
    }
    // A flip in the stored (little-endian) CRC field changes the expected value by that bit.
    out.extend((0..32).map(|bit| 1u32 << bit));
    out
}

#[test]
fn every_error_of_up_to_four_bits_is_detected_up_to_max_raw() {
    let s = syndromes();
    assert_eq!(s.len(), MAX_RAW * 8);
    // Weight 1 and 2: every syndrome non-zero and distinct.
    let singles: HashSet<u32> = s.iter().copied().collect();
    assert!(!singles.contains(&0), "a 1-bit error goes undetected");
    assert_eq!(singles.len(), s.len(), "a 2-bit error goes undetected");
    // Weight 3: no pair XOR equals a third single syndrome.
    let mut pairs = Vec::with_capacity(s.len() * s.len() / 2);
    for i in 0..s.len() {
        for j in i + 1..s.len() {
            pairs.push(s[i] ^ s[j]);
        }
    }
    assert!(
        pairs.iter().all(|p| !singles.contains(p)),
        "a 3-bit error goes undetected"
    );
    // Weight 4: no two distinct pairs share a XOR (sharing a bit would mean equal singles).
    pairs.sort_unstable();
    assert!(
        pairs.windows(2).all(|w| w[0] != w[1]),
        "a 4-bit error goes undetected"
    );
}

/// Weight 5 (HD ≥ 6) takes ~10^8 look-ups: run with
/// `cargo test -p sensorgate-wire --release --test crc_distance -- --ignored`.
#[test]
#[ignore]
fn every_error_of_five_bits_is_detected_up_to_max_raw() {
    let s = syndromes();
    let mut pairs = HashSet::with_capacity(s.len() * s.len() / 2);
    for i in 0..s.len() {
        for j in i + 1..s.len() {
            pairs.insert(s[i] ^ s[j]);
        }
    }
    for i in 0..s.len() {
        for j in i + 1..s.len() {
            let ij = s[i] ^ s[j];
            for sk in &s[j + 1..] {
                assert!(!pairs.contains(&(ij ^ sk)), "a 5-bit error goes undetected");
            }
        }
    }
}
