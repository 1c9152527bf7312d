//! The shipped unit file passes `systemd-analyze verify` and scores an exposure of at most 2.0 in
//! `systemd-analyze security`. Both read the unit file alone (`--offline=true` for security, since
//! systemd 252), so they run without a running systemd. They are skipped, saying so, only where
//! `systemd-analyze` itself is missing (Debian: `apt-get install systemd`).

use std::path::PathBuf;
use std::process::Command;

/// The most exposure the unit may have (0 = fully sandboxed, 10 = none).
const MAX_EXPOSURE: f64 = 2.0;

fn systemd_analyze() -> Option<PathBuf> {
    let found = Command::new("systemd-analyze").arg("--version").output();
    match found {
        Ok(out) if out.status.success() => Some(PathBuf::from("systemd-analyze")),
        _ => {
            eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
            None
        }
    }
}

/// The unit, with ExecStart= pointing at the binary under test so `verify` finds it.
fn unit_under_test(dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd/sensorgate.service"),
    )
    .unwrap();
    let path = dir.join("sensorgate.service");
    std::fs::write(
        &path,
        text.replace("/usr/bin/sensorgate", env!("CARGO_BIN_EXE_sensorgate")),
    )
    .unwrap();
    path
}

#[test]
fn the_unit_file_verifies_cleanly() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    let about_us: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("sensorgate.service"))
        .collect();
    assert!(about_us.is_empty(), "verify complains: {about_us:?}");
}

#[test]
fn the_unit_file_has_an_exposure_of_at_most_two() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for sensorgate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= MAX_EXPOSURE, "exposure {exposure}:\n{text}");
}

#[test]
fn the_unit_runs_as_a_notify_service_with_the_watchdog_and_a_config_check() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd/sensorgate.service"),
    )
    .unwrap();
    for line in [
        "Type=notify",
        "ExecStartPre=/usr/bin/sensorgate check-config /etc/sensorgate/gateway.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "User=sensorgate",
        "SupplementaryGroups=dialout",
        "StateDirectory=sensorgate",
        "ConfigurationDirectory=sensorgate",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyUSB rw",
        "DeviceAllow=char-ttyACM rw",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}`");
    }
    let watchdog = text
        .lines()
        .find_map(|l| l.strip_prefix("WatchdogSec="))
        .and_then(sensorgate::config::parse_duration)
        .expect("WatchdogSec= set");
    // The pipeline check allows 3 x sys-interval (10 s by default) without a tick.
    assert!(
        watchdog > std::time::Duration::from_secs(30),
        "{watchdog:?}"
    );
}
