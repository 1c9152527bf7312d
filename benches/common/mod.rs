//! What the benchmarks share: report formatting, the machine's facts, child processes'
//! counters from `/proc`, and where mosquitto lives. Each bench uses a part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

/// Runs a bench's `run` and prints its Markdown report, or the error and exit status 1.
pub fn report(name: &str, run: impl FnOnce() -> Result<String>) {
    match run() {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("{name} bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `1234567` as `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// The filesystem type of the mount that holds `dir`, from `/proc/self/mountinfo`.
pub fn filesystem(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount) = fields.get(4) else { continue };
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let fstype = fields.get(dash + 1).unwrap_or(&"?");
        let source = fields.get(dash + 2).unwrap_or(&"?");
        if dir.starts_with(mount) && best.as_ref().is_none_or(|(len, _)| mount.len() >= *len) {
            best = Some((mount.len(), format!("{fstype} ({source} on {mount})")));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, s)| s)
}

/// Debian's mosquitto binary (in `/usr/sbin`, which a user's `PATH` often lacks), or one on
/// `PATH`.
pub fn mosquitto_exe() -> Result<PathBuf> {
    let candidates = [
        Path::new("/usr/sbin/mosquitto"),
        Path::new("/usr/local/sbin/mosquitto"),
    ];
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        return Ok(p.to_path_buf());
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("mosquitto"))
                .find(|p| p.exists())
        })
        .ok_or_else(|| anyhow!("mosquitto not found: apt-get install -y mosquitto"))
}

/// `mosquitto 2.0.11`, from `mosquitto -h`.
pub fn mosquitto_version(exe: &Path) -> String {
    Command::new(exe)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .next()
                .and_then(|l| l.strip_prefix("mosquitto version "))
                .map(|v| format!("mosquitto {}", v.trim()))
        })
        .unwrap_or_else(|| "mosquitto".into())
}

/// One numeric field (`key:` as it appears, e.g. `write_bytes:`) of `/proc/<pid>/<file>`.
pub fn proc_field(pid: u32, file: &str, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/{file}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {key} in {path}"))
}

/// User plus system CPU time of process `pid` so far, all threads, at clock-tick resolution.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("malformed {path}"))
    };
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// Voluntary context switches summed over the threads of `pid`: each is a sleep in
/// `epoll_wait` or another blocking call.
pub fn sleeps(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
        let path = task?.path().join("status");
        // A thread can end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// What a process has spent so far: CPU time, `read(2)` and `write(2)` calls (`syscr` and
/// `syscw` of `/proc/<pid>/io`, which do not count `recv`/`send`) and sleeps.
#[derive(Clone, Copy, Default)]
pub struct Usage {
    pub cpu: Duration,
    pub reads: u64,
    pub writes: u64,
    pub sleeps: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Result<Usage> {
        Ok(Usage {
            cpu: cpu_time(pid)?,
            reads: proc_field(pid, "io", "syscr:")?,
            writes: proc_field(pid, "io", "syscw:")?,
            sleeps: sleeps(pid)?,
        })
    }

    /// Per message: CPU time, with `calls` the read and write calls, and sleeps.
    pub fn per_msg(&self, msgs: u64, calls: bool) -> String {
        let n = msgs.max(1) as f64;
        let calls = if calls {
            format!(
                "{:.2} read(2), {:.2} write(2), ",
                self.reads as f64 / n,
                self.writes as f64 / n
            )
        } else {
            String::new()
        };
        format!(
            "{:.1} µs CPU, {calls}{:.3} sleeps",
            self.cpu.as_secs_f64() * 1e6 / n,
            self.sleeps as f64 / n
        )
    }
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(o.cpu),
            reads: self.reads.saturating_sub(o.reads),
            writes: self.writes.saturating_sub(o.writes),
            sleeps: self.sleeps.saturating_sub(o.sleeps),
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            cpu: self.cpu + o.cpu,
            reads: self.reads + o.reads,
            writes: self.writes + o.writes,
            sleeps: self.sleeps + o.sleeps,
        }
    }
}
