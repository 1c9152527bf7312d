//! The `sensorgate` command line: exit codes and messages users and scripts rely on.

use std::io::Write;
use std::process::{Command, Stdio};

fn sensorgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sensorgate"))
}

#[test]
fn check_config_accepts_a_valid_file() {
    let out = sensorgate()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/broker-only.toml"),
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

/// A missing password file does not stop the gateway (it is read on every connection
/// attempt), so `check-config` accepts the file, and warns.
#[test]
fn check_config_warns_about_an_unreadable_upstream_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    let missing = dir.path().join("missing.pw");
    std::fs::write(
        &path,
        format!(
            "[upstream]\nurl = \"mqtt://broker.example.com\"\nusername = \"gw\"\npassword-file = {:?}\n",
            missing.display().to_string()
        ),
    )
    .unwrap();
    let out = sensorgate()
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains("missing.pw"),
        "{err}"
    );
}

#[test]
fn check_config_rejects_a_bad_file_with_ex_config_and_a_located_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, "[broker]\nmax-inflight = 0\n").unwrap();
    let out = sensorgate()
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gw.toml:2"), "{err}");
    assert!(err.contains("broker.max-inflight"), "{err}");
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn run_with_a_bad_file_exits_with_ex_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, "[brokr]\n").unwrap();
    let out = sensorgate()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
}

#[test]
fn passwd_adds_a_user_that_the_file_then_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    let mut child = sensorgate()
        .arg("passwd")
        .arg(&path)
        .arg("alice")
        .stdin(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"correct horse\n")
        .unwrap();
    assert!(child.wait().expect("exits").success());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("alice:$7$"), "{text}");
    let pw = sensorgate::broker::auth::PasswordFile::load(&path).unwrap();
    assert!(pw.verify("alice", b"correct horse"));
    assert!(!pw.verify("alice", b"correct horse\n"));
}

#[test]
fn version_and_help_read_well() {
    let out = sensorgate().arg("--version").output().expect("runs");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sensorgate "));
    let out = sensorgate().arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check-config", "passwd", "self-test"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn outbox_shows_depth_and_drops_and_dumps_records_without_changing_them() {
    use sensorgate::outbox::{AppendError, FullPolicy, Outbox, OutboxConfig, Qos, Record};
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("outbox");
    {
        let record = |i: usize, qos| Record {
            topic: format!("site/gw/t{i}"),
            payload: bytes::Bytes::from(format!("{i}.5")),
            qos,
            retain: false,
            timestamp_ms: 1_764_250_000_000,
        };
        let config = OutboxConfig {
            max_bytes: 4096,
            when_full: FullPolicy::DropNewest,
            ..Default::default()
        };
        let (outbox, _) = Outbox::open(&ob, config).unwrap();
        for i in 0..3 {
            let qos = if i == 1 {
                Qos::ExactlyOnce
            } else {
                Qos::AtLeastOnce
            };
            outbox.append(record(i, qos)).wait().unwrap();
        }
        outbox.mark_released(2).wait().unwrap();
        // Two refused as invalid, one too large, and two refused by drop-newest.
        let mut long = record(3, Qos::AtLeastOnce);
        long.topic = "t".repeat(70_000);
        let refused = outbox.append(long).wait();
        assert!(matches!(refused, Err(AppendError::Invalid { .. })));
        let refused = outbox.append_with_state(record(4, Qos::AtLeastOnce), &[("", b"")]);
        assert!(matches!(refused.wait(), Err(AppendError::Invalid { .. })));
        let mut big = record(5, Qos::AtLeastOnce);
        big.payload = bytes::Bytes::from(vec![b'x'; 5000]);
        assert!(matches!(
            outbox.append(big).wait(),
            Err(AppendError::TooLarge { .. })
        ));
        let mut n = 0;
        while n < 2 {
            let mut r = record(6, Qos::AtLeastOnce);
            r.payload = bytes::Bytes::from(vec![b'y'; 1000]);
            if let Err(AppendError::Full(_)) = outbox.append(r).wait() {
                n += 1;
            }
        }
        outbox.close().wait().unwrap();
    }
    let before: Vec<_> = std::fs::read_dir(&ob)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    let out = sensorgate()
        .arg("outbox")
        .arg("--dir")
        .arg(&ob)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("records       6"), "{text}");
    assert!(
        text.contains("dropped       oldest 0, newest 2, expired 0, too-large 1, invalid 2"),
        "{text}"
    );
    let out = sensorgate()
        .args(["outbox", "dump", "--dir"])
        .arg(&ob)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("site/gw/t2 = 2.5"), "{text}");
    let released: Vec<(&str, &str)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((*cols.first()?, *cols.get(3)?))
        })
        .collect();
    assert_eq!(
        &released[..3],
        &[("1", "-"), ("2", "yes"), ("3", "-")],
        "the released column:\n{text}"
    );
    assert!(
        text.lines().next().is_some_and(|h| h.contains("released")),
        "{text}"
    );
    assert!(text.contains("2025-11-27 13:26:40.000"), "{text}");
    let after: Vec<_> = std::fs::read_dir(&ob)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert_eq!(before, after, "inspecting changes nothing");
}

#[test]
fn outbox_of_a_missing_directory_is_a_clear_error() {
    let out = sensorgate()
        .args(["outbox", "--dir", "/nonexistent/outbox"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(66));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/outbox"));
}

#[test]
fn self_test_passes_every_check_and_says_so() {
    let out = sensorgate().arg("self-test").output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in ["wire", "gateway", "mqtt", "durable", "outbox", "restart"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("PASS") && l.contains(check)),
            "no PASS line for {check}:\n{text}"
        );
    }
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains("6 passed, 0 failed"), "{text}");
}
