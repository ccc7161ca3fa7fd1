//! Throughput of the data plane against kernel forwarding, in one run and one
//! topology: the netns lab of [`crosslink::lab`] (client - gw-a - path1 -
//! gw-b - server), routed once by the kernel (`kernel_only`), once through
//! crosslink in cleartext, once through crosslink with a key, once with key
//! pairs (session keys from the handshake) and, if
//! `boringtun-cli` is installed (`cargo install boringtun-cli`), once through
//! a userspace WireGuard tunnel between the gateways (see `boringtun.rs`), and
//! once through the kernel's own UDP tunnel, VXLAN (see `vxlan.rs`): the
//! reference for what UDP encapsulation costs when nothing leaves the kernel.
//!
//! For each it measures, with iperf3: one TCP stream, 8 TCP streams (`-P 8`)
//! and small-packet UDP (`-u -l 64 -b 0`, packets per second delivered), and
//! prints each figure as min/median/max over the runs and as a ratio of the
//! medians to kernel forwarding. The modes are interleaved run by run so
//! that a change in the machine's load hits all of them alike.
//!
//! It also prints what each test cost in CPU time, all CPUs together (from
//! `/proc/stat`, so the end hosts' share is in it as it is in kernel
//! forwarding's): microseconds per 64 KiB delivered for TCP, per packet
//! delivered for UDP, and as a multiple of kernel forwarding's cost. On a
//! shared machine this moves far less from run to run than the throughput,
//! and where the CPUs are the limit, the throughput ratio is about the
//! inverse of the cost ratio.
//!
//! Run as root: `cargo bench --bench throughput`. Knobs (environment):
//! `XL_BENCH_RUNS` (default 3), `XL_BENCH_SECONDS` per test (default 5),
//! `XL_BENCH_MODES` (comma list of kernel,plain,fast,keyed,pairs,boringtun,vxlan; default all
//! available), `XL_BENCH_COMPARE` (a second crosslink binary measured
//! alongside), `XL_BENCH_ALT_SLA` (`[peer.sla]` lines separated by `;`,
//! e.g. `probe_interval = "10s"`: each crosslink mode measured again with
//! them, as `(alt)`, to see what a setting costs), `CROSSLINK_BIN` (default `target/release/crosslink`, built if
//! missing), `XL_BENCH_BORINGTUN` (the `boringtun-cli` to use; default from
//! PATH or `~/.cargo/bin`). Not root or no iperf3: prints why and exits 0;
//! no boringtun: says so and measures the other modes.

#[path = "throughput/boringtun.rs"]
mod boringtun;
#[path = "throughput/vxlan.rs"]
mod vxlan;

use crosslink::lab::{self, Host, Lab, LabOptions, SERVER_ADDR};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A fixed bench key (hex, 32 bytes); the lab is thrown away afterwards.
const BENCH_KEY: &str = "5f1e0c3a7b2d94e8a16c0f3b2e7d5a9c4b8e1f60d2c3a5b7e9f1d3c5a7b9e1f3";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kernel,
    Plain,
    Fast,
    Keyed,
    /// Key pairs and the handshake (session keys).
    Pairs,
    Boringtun,
    Vxlan,
}

/// What forwards between the gateways, and with which binary (crosslink,
/// or `boringtun-cli` for [`Kind::Boringtun`]).
#[derive(Clone)]
struct Mode {
    kind: Kind,
    name: String,
    bin: PathBuf,
    /// `[peer.sla]` lines for the gateways.
    sla: Vec<String>,
}

#[derive(Clone, Copy)]
enum Test {
    Tcp1,
    Tcp8,
    Udp64,
}

/// One test's outcome: its figure (Gbit/s or kpps) and the CPU time it
/// took per unit delivered (µs per 64 KiB, or per packet).
#[derive(Clone, Copy)]
struct Figure {
    rate: f64,
    cost: f64,
}

impl Figure {
    const FAILED: Figure = Figure {
        rate: f64::NAN,
        cost: f64::NAN,
    };
}

impl Test {
    const ALL: [Test; 3] = [Test::Tcp1, Test::Tcp8, Test::Udp64];

    fn cost_name(self) -> &'static str {
        match self {
            Test::Tcp1 => "tcp x1 (CPU us per 64 KiB)",
            Test::Tcp8 => "tcp x8 (CPU us per 64 KiB)",
            Test::Udp64 => "udp 64B (CPU us per packet)",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Test::Tcp1 => "tcp x1 (Gbit/s)",
            Test::Tcp8 => "tcp x8 (Gbit/s)",
            Test::Udp64 => "udp 64B (kpps)",
        }
    }

    fn args(self) -> Vec<&'static str> {
        match self {
            Test::Tcp1 => vec![],
            Test::Tcp8 => vec!["-P", "8"],
            Test::Udp64 => vec!["-u", "-l", "64", "-b", "0"],
        }
    }
}

/// The modes to measure; with `XL_BENCH_COMPARE=<other crosslink binary>`
/// the crosslink modes are measured with that binary too (before/after).
/// The boringtun mode is skipped, with a line saying so, when
/// `boringtun-cli` is not installed.
fn modes(bin: &std::path::Path) -> Vec<Mode> {
    let wanted = std::env::var("XL_BENCH_MODES")
        .unwrap_or_else(|_| "kernel,plain,fast,keyed,pairs,boringtun,vxlan".into());
    let other = std::env::var_os("XL_BENCH_COMPARE").map(PathBuf::from);
    let alt_sla: Option<Vec<String>> = std::env::var("XL_BENCH_ALT_SLA")
        .ok()
        .map(|v| v.split(';').map(|l| l.trim().to_string()).collect());
    let mut out = Vec::new();
    for m in wanted.split(',') {
        let (kind, name) = match m.trim() {
            "kernel" => (Kind::Kernel, "kernel"),
            "plain" => (Kind::Plain, "crosslink"),
            "fast" => (Kind::Fast, "crosslink fast path"),
            "keyed" => (Kind::Keyed, "crosslink+key"),
            "pairs" => (Kind::Pairs, "crosslink+key pairs"),
            "boringtun" => (Kind::Boringtun, "boringtun"),
            "vxlan" => (Kind::Vxlan, "kernel vxlan"),
            other => {
                eprintln!("unknown mode {other:?} ignored");
                continue;
            }
        };
        let mode_bin = if kind == Kind::Boringtun {
            match boringtun::find() {
                Ok(b) => b,
                Err(why) => {
                    println!(
                        "boringtun: not installed (cargo install boringtun-cli), skipped ({why})"
                    );
                    continue;
                }
            }
        } else {
            bin.into()
        };
        out.push(Mode {
            kind,
            name: name.into(),
            bin: mode_bin.clone(),
            sla: Vec::new(),
        });
        let crosslink = matches!(kind, Kind::Plain | Kind::Fast | Kind::Keyed | Kind::Pairs);
        if let (Some(o), true) = (&other, crosslink) {
            out.push(Mode {
                kind,
                name: format!("{name}(cmp)"),
                bin: o.clone(),
                sla: Vec::new(),
            });
        }
        if let (Some(lines), true) = (&alt_sla, crosslink) {
            out.push(Mode {
                kind,
                name: format!("{name}(alt)"),
                bin: mode_bin,
                sla: lines.clone(),
            });
        }
    }
    out
}

/// Sets up one lab in `mode` and measures every test once.
fn measure(mode: &Mode, seconds: u64) -> Result<Vec<Figure>, String> {
    let mut opts = match mode.kind {
        Kind::Kernel | Kind::Boringtun | Kind::Vxlan => LabOptions::kernel_only("tp", &mode.bin),
        Kind::Plain | Kind::Fast | Kind::Keyed | Kind::Pairs => LabOptions::new("tp", &mode.bin),
    };
    opts.fast_path = mode.kind == Kind::Fast;
    opts.sla = mode.sla.clone();
    // Slow BFD: the bench is about forwarding, not detection.
    opts.tx_interval = Duration::from_millis(100);
    opts.rx_interval = Duration::from_millis(100);
    if mode.kind == Kind::Keyed {
        opts.key = Some(BENCH_KEY.into());
    }
    opts.key_pairs = mode.kind == Kind::Pairs;
    let mut lab = Lab::new(opts).map_err(|e| e.to_string())?;
    // Declared after the lab, so dropped (processes stopped, sockets
    // removed) before the lab deletes the namespaces, on every return.
    let tunnel = match mode.kind {
        Kind::Kernel => None,
        Kind::Vxlan => {
            vxlan::start(&lab)?;
            None
        }
        Kind::Boringtun => Some(boringtun::Tunnel::start(&lab, &mode.bin)?),
        Kind::Plain | Kind::Fast | Kind::Keyed | Kind::Pairs => {
            lab.start_gateways().map_err(|e| e.to_string())?;
            lab.wait_paths_up(Duration::from_secs(20))
                .map_err(|e| e.to_string())?;
            if mode.kind == Kind::Pairs {
                lab.wait_for("handshakes", Duration::from_secs(10), |_, s| {
                    s["peers"][0]["handshake"]["state"] == "established"
                })
                .map_err(|e| e.to_string())?;
            }
            None
        }
    };
    let mut server = lab
        .command_in(Host::Server, "iperf3")
        .args(["-s", "-B", &SERVER_ADDR.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting iperf3 -s: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let mut out = Vec::new();
    for test in Test::ALL {
        let r = run_client(&lab, test, seconds);
        out.push(r.unwrap_or_else(|e| {
            eprintln!("{} {}: {e}", mode.name, test.name());
            Figure::FAILED
        }));
    }
    lab::terminate(&mut server, Duration::from_secs(2));
    if let Some(t) = &tunnel {
        check_tunnel_carried(t)?;
    }
    if mode.kind == Kind::Vxlan {
        let sent = vxlan::tx_bytes(&lab)?;
        if sent < 1_000_000 {
            return Err(format!("only {sent} bytes went through the VXLAN tunnel"));
        }
    }
    Ok(out)
}

/// Fails unless at least 1 MB went into the WireGuard tunnel: the figures
/// are then the tunnel's, not the kernel's route over path1.
fn check_tunnel_carried(t: &boringtun::Tunnel) -> Result<(), String> {
    let sent = t.tx_bytes()?;
    if sent < 1_000_000 {
        return Err(format!(
            "only {sent} bytes went through the WireGuard tunnel"
        ));
    }
    Ok(())
}

/// CPU time spent so far by all CPUs, in seconds (`/proc/stat`: user,
/// nice, system, irq, softirq and steal; not idle or I/O wait).
fn cpu_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz.max(1) as f64
}

fn run_client(lab: &Lab, test: Test, seconds: u64) -> Result<Figure, String> {
    let t = seconds.to_string();
    let limit = (seconds + 20).to_string();
    let busy = cpu_busy();
    let text = lab::run(
        lab.command_in(Host::Client, "timeout")
            .args([limit.as_str(), "iperf3", "-c", &SERVER_ADDR.to_string()])
            .args(["-t", &t, "-J", "--connect-timeout", "3000"])
            .args(test.args()),
    )
    .map_err(|e| e.to_string())?;
    let cpu = cpu_busy() - busy;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    let end = &v["end"];
    match test {
        Test::Tcp1 | Test::Tcp8 => {
            let sum = &end["sum_received"];
            match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
                (Some(bps), Some(bytes)) => Ok(Figure {
                    rate: bps / 1e9,
                    cost: cpu * 1e6 / (bytes / 65536.0),
                }),
                _ => Err(format!("no sum_received in {end}")),
            }
        }
        Test::Udp64 => {
            // Delivered packets: the receiver's count if reported, else sent - lost.
            let sum = if end["sum_received"]["packets"].is_u64() {
                &end["sum_received"]
            } else {
                &end["sum"]
            };
            let packets = sum["packets"].as_f64().unwrap_or(f64::NAN);
            let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
            let secs = sum["seconds"].as_f64().unwrap_or(f64::NAN);
            let pps = (packets - lost) / secs;
            if pps.is_finite() {
                Ok(Figure {
                    rate: pps / 1e3,
                    cost: cpu * 1e6 / (packets - lost),
                })
            } else {
                Err(format!("no UDP sum in {end}"))
            }
        }
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (s[0], median, s[n - 1])
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary
    // without it, where a minutes-long lab run is not wanted.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: a benchmark; run it with `cargo bench --bench throughput`");
        return;
    }
    if !lab::is_root() {
        println!("throughput bench skipped: needs root (network namespaces)");
        return;
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        println!("throughput bench skipped: iperf3 not installed (apt-get install iperf3)");
        return;
    }
    if let Err(e) = lab::check_tools() {
        println!("throughput bench skipped: {e}");
        return;
    }
    let bin = match lab::release_binary() {
        Ok(b) => b,
        Err(e) => {
            println!("throughput bench failed: {e}");
            std::process::exit(1);
        }
    };
    let runs = lab::env_num("XL_BENCH_RUNS", 3).max(1);
    let seconds = lab::env_num("XL_BENCH_SECONDS", 5).max(1);
    let modes = modes(&bin);
    println!(
        "throughput: {runs} runs x {seconds} s per test, binary {}, {} CPUs, load {}",
        bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    // results[mode][test] = one figure per run.
    let mut results = vec![vec![Vec::new(); Test::ALL.len()]; modes.len()];
    for run in 1..=runs {
        for (m, mode) in modes.iter().enumerate() {
            match measure(mode, seconds) {
                Ok(figures) => {
                    let shown: Vec<String> = figures
                        .iter()
                        .map(|f| format!("{:.3} ({:.1} us)", f.rate, f.cost))
                        .collect();
                    eprintln!("run {run} {:<19} {}", mode.name, shown.join("  "));
                    for (t, f) in figures.into_iter().enumerate() {
                        results[m][t].push(f);
                    }
                }
                Err(e) => eprintln!("run {run} {}: lab failed: {e}", mode.name),
            }
        }
    }
    println!("load at the end: {}", loadavg());
    let kernel = modes.iter().position(|m| m.kind == Kind::Kernel);
    // One figure of every run of mode `m` in test `t`.
    let column = |m: usize, t: usize, figure: fn(&Figure) -> f64| -> Vec<f64> {
        results[m][t].iter().map(figure).collect()
    };
    for (t, test) in Test::ALL.iter().enumerate() {
        table(test.name(), &modes, kernel, |m| column(m, t, |f| f.rate));
    }
    for (t, test) in Test::ALL.iter().enumerate() {
        table(test.cost_name(), &modes, kernel, |m| {
            column(m, t, |f| f.cost)
        });
    }
}

/// Prints one figure of every mode: min/median/max over the runs, and the
/// median as a multiple of kernel forwarding's.
fn table(name: &str, modes: &[Mode], kernel: Option<usize>, figures: impl Fn(usize) -> Vec<f64>) {
    println!("{name}");
    for (m, mode) in modes.iter().enumerate() {
        let (min, med, max) = stats(&figures(m));
        let ratio = kernel
            .map(|k| {
                let (_, kmed, _) = stats(&figures(k));
                format!("{:.3} x kernel", med / kmed)
            })
            .unwrap_or_default();
        println!(
            "  {:<19} min {min:>9.3}  median {med:>9.3}  max {max:>9.3}   {ratio}",
            mode.name
        );
    }
}
