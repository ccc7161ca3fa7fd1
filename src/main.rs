//! The `crosslink` command.

use clap::{Parser, Subcommand};
use crosslink::config::{self, Config};
use crosslink::io::daemon;
use crosslink::telemetry::control;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "crosslink",
    version,
    about = "Userspace failover router for private multicloud links"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Run {
        /// Configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Log line format: `text`, or `json` (one object per line).
        #[arg(long, env = "CROSSLINK_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a configuration file without applying it.
    Check {
        /// Configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show the running daemon's peers and paths.
    Status {
        /// Control socket of the daemon.
        #[arg(short, long, default_value = "/run/crosslink/crosslink.sock")]
        socket: PathBuf,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
        /// Redraw the table until interrupted (Ctrl-C).
        #[arg(short, long)]
        watch: bool,
        /// Time between redraws with --watch.
        #[arg(long, default_value = "1s", value_parser = config::parse_duration)]
        interval: std::time::Duration,
    },
    /// Build a throwaway lab, fail a path and show the failover (needs root).
    Demo(crosslink::lab::demo::DemoArgs),
    /// Traffic probe used by the demo and the tests.
    #[command(hide = true)]
    Probe(crosslink::lab::probe::ProbeArgs),
    /// Junk generator used by the bad-input tests.
    #[command(hide = true)]
    Flood(crosslink::lab::flood::FloodArgs),
    /// Delaying relay (NFQUEUE) used by the lab's path-quality tests.
    #[command(hide = true)]
    Relay(crosslink::lab::relay::RelayArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => {
            init_logging(log_format);
            match daemon::run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("crosslink: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => check(&config),
        Command::Status {
            socket,
            json,
            watch: false,
            ..
        } => status(&socket, json),
        Command::Status {
            socket, interval, ..
        } => watch(&socket, interval),
        Command::Demo(args) => code(crosslink::lab::demo::main(args)),
        Command::Probe(args) => code(crosslink::lab::probe::main(args)),
        Command::Flood(args) => code(crosslink::lab::flood::main(args)),
        Command::Relay(args) => code(crosslink::lab::relay::main(args)),
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Colour only
/// on a terminal, so journald and files get plain lines; `json` gives one
/// object per line for log shippers.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .event_format(crosslink::telemetry::log::JsonLines)
            .init(),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            let problems = cfg.check_files();
            for p in &problems {
                eprintln!("{p}");
            }
            print!("{}", cfg.summary());
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `status --watch`: clear the screen and redraw every `interval`; a
/// daemon that goes away is shown, not fatal. Ctrl-C ends it.
fn watch(socket: &std::path::Path, interval: std::time::Duration) -> ExitCode {
    use std::io::Write;
    let interval = interval.max(std::time::Duration::from_millis(100));
    loop {
        let body = match control::request_status(socket) {
            Ok(s) => s.table(now_unix()),
            Err(e) => format!("crosslink: {e}\n"),
        };
        let mut out = std::io::stdout().lock();
        // Home, clear screen, then the table.
        if write!(
            out,
            "\x1b[H\x1b[2J{body}\n(every {interval:?}; Ctrl-C to quit)\n"
        )
        .and_then(|()| out.flush())
        .is_err()
        {
            return ExitCode::SUCCESS;
        }
        drop(out);
        std::thread::sleep(interval);
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn status(socket: &std::path::Path, json: bool) -> ExitCode {
    match control::request_status(socket) {
        Ok(s) if json => match serde_json::to_string_pretty(&s) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("crosslink: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(s) => {
            print!("{}", s.table(now_unix()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crosslink: {e}");
            ExitCode::FAILURE
        }
    }
}
