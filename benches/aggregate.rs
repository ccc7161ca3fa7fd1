//! One TCP stream over two paths: each policy against the sum of the
//! paths' shaped rates, and kernel MPTCP over the same paths as the
//! reference, in one run.
//!
//! The netns lab of [`crosslink::lab`] (client - gw-a - path1/path2 -
//! gw-b - server); each path shaped with `tc tbf` on both gateways
//! ([`Lab::shape`]) and, for the delay case, delayed each way by the lab's
//! relay ([`Lab::delay`]: the kernel here has no netem). Scenarios:
//!
//! - `equal`: 2 x 300 Mbit/s;
//! - `unequal`: 300 + 100 Mbit/s;
//! - `delays`: 2 x 300 Mbit/s, 5 ms and 25 ms one way;
//! - `unshaped`: the lab's virtual links as they are (CPU bound: does
//!   `aggregate` cost anything for nothing?);
//! - `cut`: 2 x 300 Mbit/s, path1 blackholed (nftables drop, carrier up) 3 s
//!   into the stream: the throughput of each 100 ms around the cut, the
//!   time until the stream is back to 80 % of the surviving path's rate, and
//!   the data missing against that rate (in milliseconds of it).
//!
//! For each scenario and policy (`active-backup`, `balance`, `aggregate`,
//! `aggregate+rate`: `aggregate` with each path's `rate` set to its shaped
//! rate, so that the sending gateway paces it, and `mptcp`: `mptcpize run iperf3` between the two gateways' own path
//! addresses, no crosslink, the second subflow on path2 from the server's
//! announced address), one `iperf3` TCP stream (CUBIC), median of the runs.
//! Every lab host's TCP buffers go up to 16 MB (`tcp_wmem`, `tcp_rmem`), as
//! on any host tuned for this bandwidth-delay product: the default 4 MB
//! send buffer keeps about 2.5 MB in flight, which one stream that sees
//! the longer path's round trip (55 ms) fills at 370 Mbit/s.
//!
//! Run as root: `cargo bench --bench aggregate`. Knobs: `XL_BENCH_RUNS`
//! (default 3), `XL_BENCH_SECONDS` per stream (default 8),
//! `XL_BENCH_SCENARIOS` (comma list; default all), `XL_BENCH_POLICIES`
//! (comma list; default all), `CROSSLINK_BIN` (default
//! `target/release/crosslink`, built if missing), `XL_BENCH_TRACE=1`
//! (every 100 ms of a stream's first 3 s: what gw-a sent on each path, its
//! estimate and its delay, from gw-a's status). Without root or iperf3 it
//! says why and exits 0; without `mptcpize` (Debian package `mptcpize`) it
//! says so and measures the rest.

use crosslink::config::Policy;
use crosslink::lab::{self, Direction, Gw, Host, Lab, LabOptions, LabPath, SERVER_ADDR};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Equal,
    Unequal,
    Delays,
    Unshaped,
    Cut,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Equal,
        Scenario::Unequal,
        Scenario::Delays,
        Scenario::Unshaped,
        Scenario::Cut,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Equal => "equal",
            Scenario::Unequal => "unequal",
            Scenario::Delays => "delays",
            Scenario::Unshaped => "unshaped",
            Scenario::Cut => "cut",
        }
    }

    /// Each path's rate (Mbit/s), `None`: unshaped.
    fn rates(self) -> Option<[u32; 2]> {
        match self {
            Scenario::Equal | Scenario::Delays | Scenario::Cut => Some([300, 300]),
            Scenario::Unequal => Some([300, 100]),
            Scenario::Unshaped => None,
        }
    }

    /// Each path's one-way delay.
    fn delays(self) -> [Duration; 2] {
        match self {
            Scenario::Delays => [Duration::from_millis(5), Duration::from_millis(25)],
            _ => [Duration::ZERO; 2],
        }
    }

    /// The sum of the shaped rates (Mbit/s).
    fn sum(self) -> Option<f64> {
        self.rates().map(|r| f64::from(r[0] + r[1]))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Policy(Policy),
    /// `aggregate` with each path's `rate` configured: paced.
    Paced,
    Mptcp,
}

impl Who {
    fn name(self) -> String {
        match self {
            Who::Policy(p) => p.to_string(),
            Who::Paced => "aggregate+rate".into(),
            Who::Mptcp => "mptcp".into(),
        }
    }
}

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
}

/// Shapes and delays the lab's paths for `s` (undoing the last scenario's).
fn set_up(lab: &Lab, s: Scenario) -> lab::Result<()> {
    for (i, path) in LabPath::ALL.into_iter().enumerate() {
        lab.heal(path)?;
        match s.rates() {
            Some(r) => lab.shape(path, r[i])?,
            None => lab.unshape(path)?,
        }
        let d = s.delays()[i];
        if !d.is_zero() {
            for dir in [Direction::AToB, Direction::BToA] {
                lab.delay(path, dir, d, Duration::ZERO)?;
            }
        }
    }
    Ok(())
}

/// One iperf3 TCP stream from `client` to `server_addr` (server in
/// `server`), reports every `interval`: the mean rate and each interval's
/// (Mbit/s). `wrap`: run both ends under `mptcpize run`.
fn stream(
    lab: &Lab,
    (client, server, server_addr): (Host, Host, String),
    secs: u64,
    interval: &str,
    wrap: bool,
    during: impl FnOnce(),
) -> Option<(f64, Vec<f64>)> {
    let prog = |host: Host| {
        let mut c = if wrap {
            let mut c = lab.command_in(host, "mptcpize");
            c.args(["run", "iperf3"]);
            c
        } else {
            lab.command_in(host, "iperf3")
        };
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c
    };
    let mut srv = prog(server);
    srv.args(["-s", "-1", "-p", "5202"]);
    if !wrap {
        srv.args(["-B", &server_addr]);
    }
    // (An MPTCP server listens on every address: a subflow that joins on
    // another address of the server needs a listener there.)
    srv.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut srv = srv.spawn().ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let mut cli = prog(client);
    cli.args(["-c", &server_addr, "-p", "5202", "-J", "-C", "cubic"])
        .args(["-t", &secs.to_string(), "-i", interval])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let cli = cli.spawn().ok()?;
    during();
    let out = cli.wait_with_output().ok();
    lab::terminate(&mut srv, Duration::from_secs(2));
    let (total, intervals) = lab::iperf_report(&out?.stdout)?;
    let mbit = intervals.iter().map(|b| b / 1e6).collect();
    Some((total / 1e6, mbit))
}

/// Every lab host's TCP buffers up to 16 MB (why: see the module docs).
fn tune_tcp(lab: &Lab) -> lab::Result<()> {
    for host in Host::ALL {
        lab.sh_in(
            host,
            "sysctl -qw net.ipv4.tcp_wmem='4096 16384 16777216' net.ipv4.tcp_rmem='4096 131072 16777216'",
        )?;
    }
    Ok(())
}

fn crosslink_lab(bin: &PathBuf, policy: Policy, run: usize) -> lab::Result<Lab> {
    let mut opts = LabOptions::new(&format!("agg{run}"), bin);
    opts.policy = policy;
    opts.revert_hold = Duration::from_millis(500);
    let mut lab = Lab::new(opts)?;
    tune_tcp(&lab)?;
    lab.start_gateways()?;
    lab.wait_paths_up(Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_secs(1));
    Ok(lab)
}

/// A lab without crosslink whose gateways speak MPTCP to each other over
/// both paths: the server gateway announces its path2 address.
fn mptcp_lab(bin: &PathBuf, run: usize) -> lab::Result<Lab> {
    let lab = Lab::new(LabOptions::kernel_only(&format!("mpt{run}"), bin))?;
    tune_tcp(&lab)?;
    for host in [Host::GwA, Host::GwB] {
        lab.ip_in(
            host,
            &[
                "mptcp",
                "limits",
                "set",
                "subflow",
                "4",
                "add_addr_accepted",
                "4",
            ],
        )?;
    }
    let b2 = LabPath::Path2.addr(Gw::B).to_string();
    lab.ip_in(
        Host::GwB,
        &["mptcp", "endpoint", "add", &b2, "dev", "path2", "signal"],
    )?;
    Ok(lab)
}

/// The cut: from the 100 ms intervals, the time from the cut until the
/// stream carries 80 % of `survivor` again, and what it missed against
/// `survivor` meanwhile (in ms of that rate).
fn dip(intervals: &[f64], cut_at: usize, survivor: f64) -> (f64, f64) {
    let mut back = None;
    let mut missing = 0.0;
    for (k, &m) in intervals.iter().enumerate().skip(cut_at) {
        if m >= 0.8 * survivor {
            back = Some(k);
            break;
        }
        missing += (survivor - m).max(0.0) / survivor * 100.0;
    }
    let back_ms = back.map_or(f64::NAN, |k| (k - cut_at) as f64 * 100.0);
    (back_ms, missing)
}

/// Under `aggregate`: the receiving gateway's resequencing counters and the
/// sender's view of the paths (share, estimated rate), since the lab began.
fn reorder_line(lab: &Lab, w: Who) -> String {
    let policy = match w {
        Who::Policy(p) => p,
        Who::Paced => Policy::Aggregate,
        Who::Mptcp => return String::new(),
    };
    let (Ok(a), Ok(b)) = (lab.poll(Gw::A), lab.poll(Gw::B)) else {
        return String::new();
    };
    if policy != Policy::Aggregate {
        let active: Vec<String> = LabPath::ALL
            .iter()
            .filter(|&&p| lab::path_active(&a, p))
            .map(|p| p.name().to_string())
            .collect();
        let degraded: Vec<String> = LabPath::ALL
            .iter()
            .filter(|&&p| {
                lab::path_status(&a, p)
                    .and_then(|s| s.pointer("/quality/degraded"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            })
            .map(|p| p.name().to_string())
            .collect();
        return format!(
            " (gw-a active: {}; degraded: {})",
            active.join(" "),
            degraded.join(" ")
        );
    }
    let peer = |s: &Value| s.pointer("/peers/0").cloned().unwrap_or(Value::Null);
    let r = peer(&b).get("reorder").cloned().unwrap_or(Value::Null);
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    let paths: Vec<String> = LabPath::ALL
        .iter()
        .filter_map(|&p| {
            let g = lab::path_status(&a, p)?.get("aggregate")?;
            Some(format!(
                "{} {:.2} at {:.0} Mbit/s",
                p.name(),
                g.get("share")?.as_f64()?,
                g.get("rate_bps")?.as_f64()? / 1e6
            ))
        })
        .collect();
    format!(
        " (gw-b held {} gave_up {} late {}, wait {} us; gw-a: {})",
        n("held"),
        n("gave_up"),
        n("late"),
        n("wait_us"),
        paths.join(", ")
    )
}

/// `XL_BENCH_TRACE=1`: every 100 ms for the stream's first 3 s, what
/// gw-a sent on each path in Mbit/s and its estimate (from its status).
fn trace_paths(lab: &Lab) {
    let started = std::time::Instant::now();
    let mut last: Vec<u64> = vec![0; LabPath::ALL.len()];
    let mut at = started;
    while started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(a) = lab.status(Gw::A) else {
            continue;
        };
        let dt = at.elapsed().as_secs_f64();
        at = std::time::Instant::now();
        let mut line = format!("  t {:4.1} s:", started.elapsed().as_secs_f64());
        for (i, &p) in LabPath::ALL.iter().enumerate() {
            let Some(s) = lab::path_status(&a, p) else {
                continue;
            };
            let bytes = s.get("tx_bytes").and_then(Value::as_u64).unwrap_or(0);
            let sent = bytes.saturating_sub(last[i]) as f64 * 8.0 / dt / 1e6;
            last[i] = bytes;
            let est = s
                .pointer("/aggregate/rate_bps")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
                / 1e6;
            let delay = s
                .pointer("/aggregate/delay_us")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
                / 1e3;
            line += &format!(" {} {sent:5.0} (est {est:4.0}, {delay:4.1} ms)", p.name());
        }
        println!("{line}");
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("aggregate: a benchmark; run it with `cargo bench --bench aggregate`");
        return;
    }
    if !lab::is_root() {
        println!("aggregate bench skipped: needs root (network namespaces)");
        return;
    }
    for (tool, pkg) in [
        ("iperf3", "iperf3"),
        ("tc", "iproute2"),
        ("iptables", "iptables"),
    ] {
        if !lab::tool_installed(tool) {
            println!("aggregate bench skipped: {tool} not installed (apt-get install {pkg})");
            return;
        }
    }
    let bin = match lab::release_binary() {
        Ok(b) => b,
        Err(e) => {
            println!("aggregate bench failed: {e}");
            std::process::exit(1);
        }
    };
    let runs = lab::env_num("XL_BENCH_RUNS", 3).max(1) as usize;
    let secs = lab::env_num("XL_BENCH_SECONDS", 8).max(4);
    let scenarios: Vec<Scenario> = match env_list("XL_BENCH_SCENARIOS") {
        Some(l) => Scenario::ALL
            .into_iter()
            .filter(|s| l.iter().any(|n| n == s.name()))
            .collect(),
        None => Scenario::ALL.to_vec(),
    };
    let mut who = vec![
        Who::Policy(Policy::ActiveBackup),
        Who::Policy(Policy::Balance),
        Who::Policy(Policy::Aggregate),
        Who::Paced,
    ];
    if lab::tool_installed("mptcpize") {
        who.push(Who::Mptcp);
    } else {
        println!("mptcp reference skipped: mptcpize not installed (apt-get install mptcpize)");
    }
    if let Some(l) = env_list("XL_BENCH_POLICIES") {
        who.retain(|w| l.contains(&w.name()));
    }
    println!(
        "aggregate: {runs} runs x {secs} s per stream, one TCP stream (cubic), binary {}",
        bin.display()
    );
    let trace = std::env::var("XL_BENCH_TRACE").is_ok_and(|v| v == "1");
    // results[scenario][who] = per-run (Mbit/s, cut: back ms, cut: missing ms)
    let mut results: Vec<Vec<Vec<(f64, f64, f64)>>> =
        vec![vec![Vec::new(); who.len()]; scenarios.len()];
    for run in 0..runs {
        // Interleaved: each run measures every policy on every scenario,
        // so that a change in the machine's load hits all alike.
        for (wi, &w) in who.iter().enumerate() {
            let lab = match w {
                Who::Policy(p) => crosslink_lab(&bin, p, run),
                Who::Paced => crosslink_lab(&bin, Policy::Aggregate, run),
                Who::Mptcp => mptcp_lab(&bin, run),
            };
            let mut lab = match lab {
                Ok(l) => l,
                Err(e) => {
                    println!("{}: lab failed: {e}", w.name());
                    continue;
                }
            };
            for (si, &s) in scenarios.iter().enumerate() {
                if let Err(e) = set_up(&lab, s) {
                    println!("{} {}: set-up failed: {e}", s.name(), w.name());
                    continue;
                }
                if w == Who::Paced {
                    let rates = LabPath::ALL
                        .into_iter()
                        .zip(s.rates().unwrap_or_default())
                        .filter(|(_, r)| *r > 0)
                        .map(|(p, r)| (p, format!("rate = \"{r}Mbit/s\"")))
                        .collect();
                    if let Err(e) = lab.set_path_extra(rates) {
                        println!("{} {}: rates not set: {e}", s.name(), w.name());
                        continue;
                    }
                }
                // Let the estimates settle to the new paths.
                std::thread::sleep(Duration::from_millis(500));
                let ends = match w {
                    Who::Policy(_) | Who::Paced => {
                        (Host::Client, Host::Server, SERVER_ADDR.to_string())
                    }
                    Who::Mptcp => (Host::GwA, Host::GwB, LabPath::Path1.addr(Gw::B).to_string()),
                };
                let cut = s == Scenario::Cut;
                let got = stream(
                    &lab,
                    ends,
                    secs,
                    if cut { "0.1" } else { "1" },
                    w == Who::Mptcp,
                    || {
                        if cut {
                            std::thread::sleep(Duration::from_millis(3000));
                            let _ = lab.blackhole(LabPath::Path1);
                        } else if trace && w != Who::Mptcp {
                            trace_paths(&lab);
                        }
                    },
                );
                let Some((mbit, intervals)) = got else {
                    println!("{} {}: no iperf3 report", s.name(), w.name());
                    continue;
                };
                let (back, missing) = if cut {
                    // The client starts 0.5 s after the server; the cut
                    // comes 3 s after the client was started.
                    dip(&intervals, 30, 300.0)
                } else {
                    (f64::NAN, f64::NAN)
                };
                if cut {
                    let around: Vec<String> = intervals
                        .iter()
                        .skip(27)
                        .take(15)
                        .map(|m| format!("{m:.0}"))
                        .collect();
                    println!(
                        "run {run} {} {}: {mbit:.0} Mbit/s; per 100 ms from 0.3 s before the cut: [{}]; back to 80 % of 300 after {back:.0} ms, {missing:.0} ms of the survivor's rate missing",
                        s.name(),
                        w.name(),
                        around.join(" ")
                    );
                } else {
                    let each: Vec<String> = intervals.iter().map(|m| format!("{m:.0}")).collect();
                    println!(
                        "run {run} {} {}: {mbit:.0} Mbit/s (each second: [{}]){}",
                        s.name(),
                        w.name(),
                        each.join(" "),
                        reorder_line(&lab, w)
                    );
                }
                results[si][wi].push((mbit, back, missing));
            }
        }
    }
    println!(
        "\nmedian of {runs} runs, one TCP stream (Mbit/s; ratio to the sum of the shaped rates):"
    );
    let mut header = format!("{:<10} {:>6}", "scenario", "sum");
    for w in &who {
        header.push_str(&format!(" {:>18}", w.name()));
    }
    println!("{header}");
    for (si, s) in scenarios.iter().enumerate() {
        let sum = s.sum();
        let mut line = format!(
            "{:<10} {:>6}",
            s.name(),
            sum.map_or("-".into(), |v| format!("{v:.0}"))
        );
        for per_run in &results[si] {
            let mut v: Vec<f64> = per_run.iter().map(|r| r.0).collect();
            if v.is_empty() {
                line.push_str(&format!(" {:>18}", "-"));
                continue;
            }
            let m = median(&mut v);
            let cell = match sum {
                Some(sum) => format!("{m:.0} ({:.2})", m / sum),
                None => format!("{m:.0}"),
            };
            line.push_str(&format!(" {cell:>18}"));
        }
        println!("{line}");
        if *s == Scenario::Cut {
            let mut l = format!("{:<10} {:>6}", "cut: back", "ms");
            let mut m2 = format!("{:<10} {:>6}", "cut: lost", "ms");
            for per_run in &results[si] {
                let mut b: Vec<f64> = per_run.iter().map(|r| r.1).collect();
                let mut m: Vec<f64> = per_run.iter().map(|r| r.2).collect();
                l.push_str(&format!(" {:>18}", format!("{:.0}", median(&mut b))));
                m2.push_str(&format!(" {:>18}", format!("{:.0}", median(&mut m))));
            }
            println!("{l}");
            println!("{m2}");
        }
    }
}
