//! The `sensorgate` command: parse the command line, set up logging, load the configuration and
//! hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sensorgate::config::{self, ValidConfig};

/// sysexits(3) codes, so service managers and scripts can tell failures apart.
mod exit {
    pub const USAGE: u8 = 64;
    pub const SOFTWARE: u8 = 70;
    pub const CANTCREAT: u8 = 73;
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sensorgate: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
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
