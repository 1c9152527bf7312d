//! Replays the fuzz corpus, the committed regression inputs and any local fuzz artifacts through
//! the fuzz target's own check (`fuzz/round_trip.rs`), so they stay tests without nightly.
//!
//! Files named `valid-*` must decode completely; files named `malformed-*` must be refused.
//! Other names (inputs the fuzzer added, crashers) only have to pass the check.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

mod codec {
    pub use sensorgate::broker::codec::*;
}
#[path = "../fuzz/round_trip.rs"]
mod round_trip;

use round_trip::End;

/// The seed corpus alone holds this many files; fewer means a wrong path.
const MIN_FILES: usize = 50;

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn packet_kind(packet: &codec::Packet) -> &'static str {
    use codec::Packet::*;
    match packet {
        Connect(_) => "CONNECT",
        ConnAck(_) => "CONNACK",
        Publish(_) => "PUBLISH",
        PubAck(_) => "PUBACK",
        PubRec(_) => "PUBREC",
        PubRel(_) => "PUBREL",
        PubComp(_) => "PUBCOMP",
        Subscribe(_) => "SUBSCRIBE",
        SubAck(_) => "SUBACK",
        Unsubscribe(_) => "UNSUBSCRIBE",
        UnsubAck(_) => "UNSUBACK",
        PingReq => "PINGREQ",
        PingResp => "PINGRESP",
        Disconnect => "DISCONNECT",
    }
}

#[test]
fn every_corpus_regression_and_artifact_input_passes_the_fuzz_check() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files_in(&fuzz.join("corpus/mqtt_decode"));
    assert!(
        corpus.len() >= MIN_FILES,
        "found {} corpus files in {}, expected at least {MIN_FILES}",
        corpus.len(),
        fuzz.display()
    );
    let mut files = corpus;
    files.extend(files_in(&fuzz.join("regressions/mqtt_decode")));
    files.extend(files_in(&fuzz.join("artifacts/mqtt_decode")));

    let mut kinds = BTreeSet::new();
    let (mut valid, mut malformed) = (0, 0);
    for path in &files {
        let input = std::fs::read(path).expect("readable input");
        let outcome = round_trip::check(&input);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("valid-") {
            assert_eq!(outcome.end, End::Consumed, "{name}: {outcome:?}");
            assert!(!outcome.packets.is_empty(), "{name}: no packet");
            kinds.extend(outcome.packets.iter().map(packet_kind));
            valid += 1;
        } else if name.starts_with("malformed-") {
            assert!(
                matches!(outcome.end, End::Error(_)),
                "{name} was not refused: {outcome:?}"
            );
            malformed += 1;
        }
    }
    assert_eq!(
        kinds.len(),
        14,
        "valid inputs cover every packet type: {kinds:?}"
    );
    assert!(
        valid >= 20 && malformed >= 30,
        "{valid} valid, {malformed} malformed"
    );
}
