//! The `sensorgate` command: parse the command line, set up logging, load the configuration and
//! hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sensorgate::config::{self, ValidConfig};

mod monitor;
mod outbox_cmd;
mod selftest;

/// sysexits(3) codes, so service managers and scripts can tell failures apart.
mod exit {
    pub const USAGE: u8 = 64;
    pub const NOINPUT: u8 = 66;
    pub const SOFTWARE: u8 = 70;
    pub const OSERR: u8 = 71;
    pub const CANTCREAT: u8 = 73;
    pub const IOERR: u8 = 74;
    pub const CONFIG: u8 = 78;
}

#[derive(Parser)]
#[command(
    name = "sensorgate",
    version,
    about = "IoT gateway: serial sensor frames to MQTT, with its own broker and a durable uplink",
    long_about = "sensorgate reads sensor frames from serial ports, maps them to MQTT topics, serves \
                  them on its own MQTT broker and forwards them to an upstream broker through a \
                  durable on-disk outbox.\n\nWith no configuration file, `sensorgate run` starts a \
                  local broker on 127.0.0.1:1883 with its data under $STATE_DIRECTORY or \
                  ./sensorgate-data."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default configuration needs no file).
    Run {
        /// Configuration file (TOML); see config/gateway.toml for a commented example.
        #[arg(short, long, env = "SENSORGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit: 0 if it is valid, 78 with the reason if not.
    CheckConfig {
        /// Configuration file to check.
        file: PathBuf,
    },
    /// Show a running gateway's ports, nodes, uplink and broker counters.
    ///
    /// Reads the retained status topics from the gateway's broker, as any MQTT client could.
    Status {
        /// The gateway's broker.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// User name, when the broker requires a password ($SENSORGATE_PASSWORD holds it).
        #[arg(long)]
        user: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Add or update a user in a password file (PBKDF2-SHA512, Mosquitto's `$7$` format).
    ///
    /// Reads the password from standard input (one line).
    Passwd {
        /// The password file; created if missing.
        file: PathBuf,
        /// The user name.
        user: String,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
    },
    /// Run the gateway with simulated sensor nodes: a first look without hardware.
    ///
    /// Three nodes (living room, greenhouse, garden) speak the real frame format over
    /// pseudo-terminals; the broker serves their readings under `sensors/#`.
    Demo {
        /// Address of the demo's MQTT broker (loopback only).
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: std::net::SocketAddr,
        /// Keep state here instead of a temporary directory removed at exit.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How many simulated nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How often each node reports, e.g. `2s`, `500ms`.
        #[arg(long, default_value = "2s", value_parser = duration)]
        period: std::time::Duration,
    },
    /// Show what waits in the outbox for the upstream: depth, bytes, oldest age, drop counters; `dump` lists
    /// the records. Reads without changing anything, so it is safe while the gateway runs.
    Outbox {
        /// `dump` to list the records.
        #[arg(value_parser = ["dump"])]
        action: Option<String>,
        /// The gateway's configuration (for its data directory).
        #[arg(short, long, env = "SENSORGATE_CONFIG")]
        config: Option<PathBuf>,
        /// The outbox directory itself (default: <data-dir>/outbox).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// At most this many records with `dump`.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show what a serial port says, decoded, one line per frame or error.
    Monitor {
        /// The serial device, e.g. /dev/ttyACM0 or /dev/serial/by-id/...
        port: PathBuf,
        /// sensorgate, lines or mysensors.
        #[arg(long, default_value = "sensorgate", value_parser = monitor::parse_protocol)]
        protocol: sensorgate::decode::Protocol,
        #[arg(long, default_value_t = config::defaults::BAUD)]
        baud: u32,
        /// Also print the raw bytes of each frame, error and ignored byte.
        #[arg(long)]
        hex: bool,
    },
    /// Check that this build works on this machine, without hardware or network: exit 0 if
    /// every check passes, 1 if one fails.
    ///
    /// Encodes and decodes a sensor frame, starts the gateway in a temporary directory (broker
    /// on a free loopback port, persistence and an outbox on), publishes and receives over MQTT,
    /// reads the outbox back from disk and restarts to find the retained message again.
    SelfTest,
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "write a duration such as 2s or 500ms".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let config = match config {
                Some(path) => match config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("sensorgate: invalid configuration\n{e}");
                        return ExitCode::from(exit::CONFIG);
                    }
                },
                None => config::embedded_default(),
            };
            init_tracing(&config);
            run(config)
        }
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok (gateway {}, {} listener(s), data in {})",
                    file.display(),
                    c.gateway_id,
                    c.broker.listeners.len(),
                    c.data_dir.display()
                );
                // Not errors: the gateway starts without them and reads them again on every
                // connection attempt. But a check is where a typo should show up first.
                if let Some(up) = &c.upstream
                    && let Err(e) = sensorgate::uplink::credentials(up)
                {
                    eprintln!(
                        "warning: {e}; the gateway runs, but the uplink will not connect until this is fixed"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(exit::CONFIG)
            }
        },
        Command::Passwd { file, user, delete } => passwd(&file, &user, delete),
        Command::Status {
            host,
            port,
            user,
            timeout,
        } => status(&host, port, user, timeout),
        Command::Outbox {
            action,
            config,
            dir,
            limit,
        } => {
            let dir = match dir {
                Some(d) => d,
                None => {
                    let config = match config {
                        Some(path) => match config::load(&path) {
                            Ok(c) => c,
                            Err(e) => {
                                eprintln!("{e}");
                                return ExitCode::from(exit::CONFIG);
                            }
                        },
                        None => config::embedded_default(),
                    };
                    config.data_dir.join("outbox")
                }
            };
            if !dir.exists() {
                eprintln!(
                    "sensorgate outbox: {} does not exist (no upstream configured yet?)",
                    dir.display()
                );
                return ExitCode::from(exit::NOINPUT);
            }
            match sensorgate::outbox::inspect(&dir) {
                Ok(i) => {
                    let now = sensorgate::ingest::now_ms();
                    match action.as_deref() {
                        Some("dump") => print!("{}", outbox_cmd::dump(&i, limit)),
                        _ => print!("{}", outbox_cmd::summary(&dir, &i, now)),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sensorgate outbox: {e}");
                    ExitCode::from(exit::NOINPUT)
                }
            }
        }
        Command::Demo {
            listen,
            data_dir,
            nodes,
            period,
        } => {
            init_tracing(&config::embedded_default());
            demo(sensorgate::demo::DemoOptions {
                listen,
                data_dir,
                nodes,
                period,
                ..Default::default()
            })
        }
        Command::Monitor {
            port,
            protocol,
            baud,
            hex,
        } => monitor(monitor::port_config(port, protocol, baud), hex),
        Command::SelfTest => {
            // Quiet unless asked: the report is the output; RUST_LOG=debug shows the gateway's log.
            if std::env::var_os("RUST_LOG").is_some() {
                init_tracing(&config::embedded_default());
            }
            if selftest::run(&mut std::io::stdout().lock()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("sensorgate: cannot start the async runtime: {e}");
            ExitCode::from(exit::SOFTWARE)
        })
}

fn demo(opts: sensorgate::demo::DemoOptions) -> ExitCode {
    use sensorgate::demo::DemoError;
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(sensorgate::demo::run_demo(
        opts,
        sensorgate::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sensorgate demo: {e}");
            ExitCode::from(match e {
                DemoError::NotLoopback(_) | DemoError::NodeCount => exit::USAGE,
                DemoError::Pty(_) => exit::OSERR,
                DemoError::TempDir { .. }
                | DemoError::Gateway(
                    sensorgate::Error::Bind { .. } | sensorgate::Error::DataDir { .. },
                ) => exit::CANTCREAT,
                _ => exit::SOFTWARE,
            })
        }
    }
}

fn monitor(port: config::PortConfig, hex: bool) -> ExitCode {
    use std::io::IsTerminal;
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    let style = monitor::Style {
        colour: stdout.is_terminal(),
        hex,
    };
    let mut out = stdout.lock();
    match runtime.block_on(monitor::run(
        port,
        style,
        &mut out,
        sensorgate::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sensorgate monitor: {e}");
            ExitCode::from(match e {
                monitor::MonitorError::Open { .. } => exit::NOINPUT,
                _ => exit::IOERR,
            })
        }
    }
}

fn init_tracing(config: &ValidConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(config.log_level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(config: ValidConfig) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(sensorgate::run(config, sensorgate::shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(match e {
                sensorgate::Error::Bind { .. } | sensorgate::Error::DataDir { .. } => {
                    exit::CANTCREAT
                }
                _ => exit::SOFTWARE,
            })
        }
    }
}

fn status(host: &str, port: u16, user: Option<String>, timeout: u64) -> ExitCode {
    const UNAVAILABLE: u8 = 69;
    let credentials = user.map(|u| (u, std::env::var("SENSORGATE_PASSWORD").unwrap_or_default()));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sensorgate status: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let timeout = std::time::Duration::from_secs(timeout.max(1));
    match runtime.block_on(sensorgate::status::fetch(host, port, credentials, timeout)) {
        Ok(snapshot) => {
            print!(
                "{}",
                sensorgate::status::render(&snapshot, sensorgate::ingest::now_ms())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sensorgate status: {e}");
            ExitCode::from(UNAVAILABLE)
        }
    }
}

fn passwd(file: &std::path::Path, user: &str, delete: bool) -> ExitCode {
    use sensorgate::broker::auth::PasswordFile;
    let mut pw = match PasswordFile::load_or_empty(file) {
        Ok(pw) => pw,
        Err(e) => {
            eprintln!("sensorgate passwd: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    if delete {
        if !pw.remove(user) {
            eprintln!("sensorgate passwd: no user `{user}` in {}", file.display());
            return ExitCode::from(exit::USAGE);
        }
    } else {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err()
            || line.trim_end_matches(['\r', '\n']).is_empty()
        {
            eprintln!(
                "sensorgate passwd: give the password on standard input, e.g. `echo secret | sensorgate passwd FILE USER`"
            );
            return ExitCode::from(exit::USAGE);
        }
        if let Err(e) = pw.set(user, line.trim_end_matches(['\r', '\n'])) {
            eprintln!("sensorgate passwd: {e}");
            return ExitCode::from(exit::USAGE);
        }
    }
    match pw.save(file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sensorgate passwd: cannot write {}: {e}", file.display());
            ExitCode::from(exit::CANTCREAT)
        }
    }
}
