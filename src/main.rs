//! The `crosslink` command.

use clap::{Parser, Subcommand};
use crosslink::config::Config;
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
    },
    /// Build a throwaway lab, fail a path and show the failover (needs root).
    Demo(crosslink::demo::DemoArgs),
    /// Traffic probe used by the demo and the tests.
    #[command(hide = true)]
    Probe(crosslink::probe::ProbeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            init_logging();
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
        Command::Status { socket, json } => status(&socket, json),
        Command::Demo(args) => code(crosslink::demo::main(args)),
        Command::Probe(args) => code(crosslink::probe::main(args)),
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            print!("{}", s.table(now));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crosslink: {e}");
            ExitCode::FAILURE
        }
    }
}
