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
    /// Validate a configuration file without applying it; with --reach,
    /// test its paths to the far gateway; with --against, compare it with
    /// the far gateway's file.
    Check {
        /// Configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// The far gateway's configuration: report every key where the two
        /// files do not mirror each other.
        #[arg(long, value_name = "FILE")]
        against: Option<PathBuf>,
        /// Probe every path to the far gateway (answer, round trip, loss,
        /// path MTU) without touching a running daemon's TUNs or routes.
        #[arg(long)]
        reach: bool,
        /// How long --reach tests the paths.
        #[arg(long, default_value = "2s", value_parser = config::parse_duration)]
        duration: std::time::Duration,
        /// Print --reach's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write both gateways' configurations (and their key) from the two
    /// names, the prefixes and each path's addresses; asks on a terminal
    /// for what the flags leave out.
    Init(crosslink::setup::init::InitArgs),
    /// Print a new X25519 private key (base64) for `[gateway] private_key_file`.
    Genkey,
    /// Read a private key on standard input and print its public key (base64),
    /// the far gateway's `public_key` for this one.
    Pubkey,
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
    /// Hand the running daemon's TUNs, sockets and sessions to a new process
    /// (a new binary, or a configuration a reload cannot apply) without
    /// losing a packet; prints the new process's pid.
    Upgrade {
        /// Control socket of the daemon.
        #[arg(short, long, default_value = "/run/crosslink/crosslink.sock")]
        socket: PathBuf,
        /// Take the control socket from this configuration instead (the
        /// daemon's own file: a package's maintainer script knows no more).
        #[arg(short, long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The binary to start (default: the daemon's own path, where a
        /// package upgrade puts the new one).
        #[arg(long)]
        binary: Option<PathBuf>,
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
    /// Print a shell completion script (e.g. `crosslink completions bash`).
    Completions {
        /// Shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout.
    #[command(hide = true)]
    Man,
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
            let _log = init_logging(log_format);
            match daemon::run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("crosslink: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check {
            config,
            against,
            reach,
            duration,
            json,
        } => check(&config, against.as_deref(), reach.then_some(duration), json),
        Command::Genkey => genkey(),
        Command::Pubkey => pubkey(),
        Command::Status {
            socket,
            json,
            watch: false,
            ..
        } => status(&socket, json),
        Command::Status {
            socket, interval, ..
        } => watch(&socket, interval),
        Command::Upgrade {
            socket,
            config,
            binary,
        } => upgrade(&socket, config.as_deref(), binary.as_deref()),
        Command::Init(args) => match crosslink::setup::init::main(&args) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("crosslink init: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => code(crosslink::lab::demo::main(args)),
        Command::Probe(args) => code(crosslink::lab::probe::main(args)),
        Command::Flood(args) => code(crosslink::lab::flood::main(args)),
        Command::Relay(args) => code(crosslink::lab::relay::main(args)),
        Command::Completions { shell } => print_doc(Ok(completions(shell))),
        Command::Man => print_doc(man_page()),
    }
}

fn upgrade(
    socket: &std::path::Path,
    config: Option<&std::path::Path>,
    binary: Option<&std::path::Path>,
) -> ExitCode {
    let socket = match config.map(Config::load) {
        None => socket.to_path_buf(),
        Some(Ok(cfg)) => cfg.gateway.control_socket,
        Some(Err(e)) => {
            eprintln!("crosslink: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A relative path would be resolved in the daemon's directory.
    let binary = binary.map(|b| std::path::absolute(b).unwrap_or_else(|_| b.to_path_buf()));
    match control::request_upgrade(&socket, binary.as_deref()) {
        Ok(u) => {
            println!(
                "upgraded: new pid {} (handover {:.2} ms)",
                u.pid, u.handover_ms
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crosslink: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `crosslink genkey`: a private key on standard output, as `wg genkey`.
fn genkey() -> ExitCode {
    match crosslink::io::keys::generate_private() {
        Ok(key) => {
            println!("{}", key.to_base64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crosslink: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `crosslink pubkey`: the public key of the private key on standard input.
fn pubkey() -> ExitCode {
    use std::io::Read;
    use zeroize::Zeroize;
    let mut text = String::new();
    let read = std::io::stdin().take(4096).read_to_string(&mut text);
    let key = match read {
        Ok(_) => crosslink::core::keypair::PrivateKey::parse(&text).map_err(|e| e.to_string()),
        Err(e) => Err(format!("reading standard input: {e}")),
    };
    text.zeroize();
    match key {
        Ok(key) => {
            println!("{}", key.public());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crosslink: private key on standard input: {e}");
            ExitCode::FAILURE
        }
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Colour only
/// on a terminal, so journald and files get plain lines; `json` gives one
/// object per line for log shippers.
///
/// The lines are written by a thread of their own (`log`): a thread that
/// logs hands its line over without a lock another thread may hold. The
/// BFD thread runs at real-time priority; waiting for stderr's lock behind
/// a preempted thread stalled it for hundreds of milliseconds on a busy
/// host, longer than a detection time. Should the writer fall 128 000
/// lines behind, lines are dropped rather than waited for. Keep the guard
/// until exit: dropping it writes what is queued.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .thread_name("log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
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
    guard
}

fn check(
    path: &std::path::Path,
    against: Option<&std::path::Path>,
    reach: Option<std::time::Duration>,
    json: bool,
) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let problems = cfg.check_files();
    for p in &problems {
        eprintln!("{p}");
    }
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    let mut ok = problems.is_empty();
    if !json {
        print!("{}", cfg.summary());
    }
    if let Some(other) = against {
        match Config::load(other) {
            Ok(far) => {
                let mismatches = config::mirror::compare(&cfg, &far);
                for m in &mismatches {
                    eprintln!("mismatch: {m}");
                }
                if mismatches.is_empty() && !json {
                    println!("{} mirrors {}", path.display(), other.display());
                }
                ok &= mismatches.is_empty();
            }
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if let Some(duration) = reach {
        let reports = crosslink::setup::reach::check(&cfg, duration);
        if json {
            match serde_json::to_string_pretty(&reports) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("crosslink: {e}"),
            }
        } else {
            print!("{}", crosslink::setup::reach::table(&reports));
        }
        ok &= reports.iter().all(|r| r.ok());
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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

/// The command line as users see it: `Cli` without its hidden subcommands
/// (the test helpers and `man`), which clap_complete would otherwise offer.
/// Subcommands come unbuilt, so each can still be adjusted (see `man_page`).
fn public_command() -> clap::Command {
    let full = <Cli as clap::CommandFactory>::command();
    let mut cmd = clap::Command::new("crosslink")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    cmd
}

/// `crosslink completions SHELL`: the completion script for `shell`.
fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut public_command(), "crosslink", &mut out);
    out
}

/// `crosslink man`: crosslink(1) in roff, from the same clap definition as
/// `--help`. One page: each command is a subsection of COMMANDS with its own
/// synopsis and options (clap_mangen alone would refer to a page per
/// command); the prose sections are written here.
fn man_page() -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let man = clap_mangen::Man::new(public_command());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    out.extend_from_slice(MAN_DESCRIPTION.as_bytes());
    man.render_options_section(&mut out)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in public_command().get_subcommands() {
        let name = format!("crosslink {}", sub.get_name());
        let sub = sub.clone().bin_name(name.clone()).disable_help_flag(true);
        let page = clap_mangen::Man::new(sub);
        let mut part = Vec::new();
        page.render_description_section(&mut part)?;
        writeln!(part, ".PP")?;
        page.render_synopsis_section(&mut part)?;
        page.render_options_section(&mut part)?;
        writeln!(out, ".SS \"{name}\"")?;
        // Under COMMANDS the parts are paragraphs, not sections.
        for line in String::from_utf8_lossy(&part).lines() {
            if !line.starts_with(".SH") {
                writeln!(out, "{line}")?;
            }
        }
    }
    out.extend_from_slice(MAN_TRAILER.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

fn print_doc(doc: std::io::Result<Vec<u8>>) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match doc.and_then(|d| stdout.write_all(&d).and_then(|()| stdout.flush())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crosslink: {e}");
            ExitCode::FAILURE
        }
    }
}

const MAN_DESCRIPTION: &str = r#".SH DESCRIPTION
crosslink runs on a gateway host at each end of several private paths between two
sites (a cloud interconnect, a VLAN attachment) and keeps the traffic between them
flowing when one path dies.
For each remote site (a \fIpeer\fR) it creates a TUN interface into which the kernel
routes that peer's prefixes, carries each packet to the peer's gateway over one of
several \fIpaths\fR in UDP, and checks every path with BFD (RFC 5880, 5881, 5883).
When a path fails, its flows move to a surviving path within the BFD detection time.
.PP
The configuration is one TOML file.
\fBcrosslink check\fR validates it without applying it;
\fBcrosslink run\fR runs the daemon, normally under systemd (\fB\%crosslink.service\fR).
"#;

const MAN_TRAILER: &str = r#".SH SIGNALS
.TP
.B SIGHUP
Re-read the configuration file and apply only the difference.
An invalid file is refused and the running configuration kept.
.TP
.BR SIGTERM ", " SIGINT
Send BFD AdminDown on every path, remove the TUN devices with their routes, and exit.
.SH ENVIRONMENT
.TP
.B RUST_LOG
Log filter of \fBcrosslink run\fR: \fBinfo\fR (the default), \fBdebug\fR, \fBwarn\fR, ...
.SH FILES
.TP
.I /etc/crosslink/crosslink.toml
The configuration that \fB\%crosslink.service\fR runs.
The Debian package installs an example beside it,
\fI/etc/crosslink/crosslink.toml.example\fR, and does not start the service.
.TP
.I /run/crosslink/crosslink.sock
Default control socket (mode 0600), asked by \fBcrosslink status\fR;
\fB\%control_socket\fR in \fB[gateway]\fR moves it.
.TP
.I /usr/share/crosslink/
Grafana dashboard and Prometheus alert rules (Debian package).
.SH EXIT STATUS
0 on success, 1 on failure: for \fBcheck\fR, a file that does not parse or validate,
or a file it names (a key) that cannot be read.
.SH SEE ALSO
.BR systemctl (1),
.BR journalctl (1),
and \fI/usr/share/doc/crosslink/README.md\fR
(configuration keys, reload, metrics, encryption).
"#;

#[cfg(test)]
mod doc_tests {
    use super::{completions, man_page, public_command, Cli};
    use clap::CommandFactory;

    #[test]
    fn command_definitions_are_consistent() {
        Cli::command().debug_assert();
        public_command().debug_assert();
    }

    /// Each public command is a subsection with its options; hidden ones are absent.
    #[test]
    fn man_page_documents_every_command_and_option() {
        let page = String::from_utf8(man_page().expect("rendered")).expect("utf-8");
        assert!(page.contains("\n.TH crosslink 1 "), "{page}");
        assert_eq!(page.matches(".TH ").count(), 1, "{page}");
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "COMMANDS",
            "FILES",
            "SEE ALSO",
        ] {
            assert!(
                page.contains(&format!(".SH {section}\n")),
                "no {section}:\n{page}"
            );
        }
        // Only the sections above and the fixed ones: no SYNOPSIS or OPTIONS
        // heading of a command's own page left in the middle of COMMANDS.
        assert_eq!(page.matches(".SH SYNOPSIS").count(), 1, "{page}");
        assert_eq!(page.matches(".SH OPTIONS").count(), 1, "{page}");
        let mut commands = 0;
        for sub in Cli::command().get_subcommands() {
            let heading = format!(".SS \"crosslink {}\"\n", sub.get_name());
            assert_eq!(page.contains(&heading), !sub.is_hide_set(), "{heading}");
            if sub.is_hide_set() {
                continue;
            }
            commands += 1;
            let synopsis = format!("\\fBcrosslink {}\\fR", sub.get_name());
            assert!(page.contains(&synopsis), "no {synopsis}:\n{page}");
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let name = match arg.get_long() {
                    Some(long) => format!("\\-\\-{}", long.replace('-', "\\-")),
                    None => arg.get_id().as_str().to_uppercase(),
                };
                assert!(
                    page.contains(&name),
                    "crosslink {}: no {name}",
                    sub.get_name()
                );
            }
        }
        assert!(commands >= 5, "{commands} commands");
        assert!(page.contains("CROSSLINK_LOG_FORMAT"), "{page}");
    }

    #[test]
    fn completions_offer_the_public_commands_and_options() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completions(shell)).expect("utf-8");
            // (fish names options without their dashes)
            for word in [
                "status",
                "run",
                "check",
                "init",
                "reach",
                "against",
                "demo",
                "completions",
                "config",
                "watch",
            ] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
            for hidden in ["probe", "flood"] {
                assert!(!script.contains(hidden), "{shell}: offers {hidden}");
            }
        }
        let bash = String::from_utf8(completions(Shell::Bash)).expect("utf-8");
        assert!(bash.contains("complete -F _crosslink"), "{bash}");
        assert!(bash.contains("crosslink,status)"), "{bash}");
        assert!(!bash.contains("crosslink,man)"), "{bash}");
    }
}
