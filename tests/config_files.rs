//! Every shipped example in `config/` loads, and every fixture fails or passes as it says.

use std::path::{Path, PathBuf};

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_example_in_config_loads() {
    let files = toml_files(&root().join("config"));
    assert!(
        files.len() >= 2,
        "expected the shipped examples, found {files:?}"
    );
    for f in files {
        if let Err(e) = sensorgate::config::load(&f) {
            panic!("{} does not load:\n{e}", f.display());
        }
    }
}

#[test]
fn valid_fixtures_load() {
    let files = toml_files(&root().join("tests/fixtures/config/valid"));
    assert!(files.len() >= 2, "found {files:?}");
    for f in files {
        if let Err(e) = sensorgate::config::load(&f) {
            panic!("{} should be valid:\n{e}", f.display());
        }
    }
}

/// Each invalid fixture starts with `# expect: line N[, key K]`.
#[test]
fn invalid_fixtures_fail_at_the_line_and_key_they_name() {
    let files = toml_files(&root().join("tests/fixtures/config/invalid"));
    assert!(files.len() >= 7, "found {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", f.display()));
        let mut line = None;
        let mut key = None;
        for part in expect.split(", ") {
            if let Some(n) = part.strip_prefix("line ") {
                line = n.parse::<usize>().ok();
            } else if let Some(k) = part.strip_prefix("key ") {
                key = Some(k.to_string());
            }
        }
        let err = match sensorgate::config::load(&f) {
            Ok(_) => panic!("{} should be invalid", f.display()),
            Err(e) => e,
        };
        assert_eq!(err.line, line, "{}: {err}", f.display());
        if key.is_some() {
            assert_eq!(err.key, key, "{}: {err}", f.display());
        }
        let shown = err.to_string();
        assert!(
            shown.starts_with(&f.display().to_string()),
            "the message names the file: {shown}"
        );
        assert!(
            shown.contains("hint:") || key.is_none(),
            "a located error gives a hint: {shown}"
        );
    }
}
