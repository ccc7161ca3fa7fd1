//! BFD punctuality under data-plane load (a benchmark, not a timed test).
//!
//! Builds the netns lab (client - gw-a - path1/path2 - gw-b - server, see
//! `crosslink::lab`), runs both gateways with BFD at the chosen interval x 3, saturates
//! the tunnel with iperf3 (TCP, 4 streams, client -> server) for the chosen time and
//! reports, per gateway and path:
//!
//! * the largest gap between two control packets sent while Up (`bfd.max_tx_gap_us`
//!   in the status JSON, measured by the BFD thread with the time of each send);
//! * false session downs (the `bfd.failures` counter: no path is faulted, so every
//!   Up -> Down is false);
//! * the BFD thread's CPU time (utime + stime of the `bfd` task in /proc) per session;
//! * as a baseline, the worst wake-up lateness of a bare SCHED_FIFO thread in this
//!   process sleeping 1 ms at a time during the same run: what the platform (kernel,
//!   hypervisor, neighbours) allows at best. A tx gap above interval + that lateness
//!   would be crosslink's own fault.
//!
//! Usage (root): `cargo bench --bench bfd_punctuality -- [--secs 60] [--intervals 10,5,3]
//! [--load iperf3|probe|none]`. Without iperf3 it falls back to the built-in probe at a
//! high packet rate. Not root: prints why and exits successfully (it is a benchmark).
//! Under `cargo test --all-targets` (no `--bench` argument) it does nothing.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crosslink::lab::{self, Gw, Host, Lab, LabOptions, LabPath, SERVER_ADDR};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");

struct Args {
    secs: u64,
    intervals_ms: Vec<f64>,
    load: String,
}

fn parse_args() -> Args {
    let mut args = Args {
        secs: 60,
        intervals_ms: vec![10.0],
        load: "iperf3".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => args.secs = it.next().and_then(|v| v.parse().ok()).unwrap_or(60),
            "--intervals" => {
                args.intervals_ms = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|v| v.trim().parse().ok())
                    .collect();
            }
            "--load" => args.load = it.next().unwrap_or_else(|| "iperf3".into()),
            _ => {} // `cargo bench` passes --bench; ignore what we do not know.
        }
    }
    if let Ok(v) = std::env::var("BFD_BENCH_SECS") {
        args.secs = v.parse().unwrap_or(args.secs);
    }
    args
}

/// utime + stime of the gateway's `bfd` thread, in seconds.
fn bfd_thread_cpu(pid: u32) -> Option<f64> {
    let ticks = clock_ticks();
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "bfd" {
            continue;
        }
        let stat = fs::read_to_string(task.path().join("stat")).ok()?;
        let after = stat.rsplit_once(") ")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        return Some((utime + stime) / ticks);
    }
    None
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn bfd(status: &Value, path: LabPath, key: &str) -> u64 {
    lab::path_status(status, path)
        .and_then(|p| p.pointer(&format!("/bfd/{key}")))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// The load: an iperf3 transfer, or the built-in probe at a high rate.
enum Load {
    Iperf(lab::Iperf),
    Probe(Vec<Child>),
    None,
}

/// Starts the load.
fn start_load(lab: &Lab, load: &str, secs: u64) -> Load {
    match load {
        "iperf3" => Load::Iperf(lab.start_iperf3(4, secs).expect("iperf3")),
        "probe" => {
            let _ = lab.start_receiver(9100, Duration::from_secs(secs + 5));
            // The receiver is dropped (killed) with the lab; only the load matters.
            let sender = lab
                .command_in(Host::Client, BIN)
                .args(["probe", "send", "--to", &format!("{SERVER_ADDR}:9100")])
                .args(["--rate", "200000", "--duration", &format!("{secs}s")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("probe send");
            Load::Probe(vec![sender])
        }
        _ => Load::None,
    }
}

fn run_one(interval_ms: f64, args: &Args, load: &str) -> bool {
    let interval = Duration::from_secs_f64(interval_ms / 1e3);
    let mut opts = LabOptions::new("bp", BIN);
    opts.tx_interval = interval;
    opts.rx_interval = interval;
    opts.multiplier = 3;
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(15))
        .expect("paths up");
    let pids: Vec<(Gw, u32)> = Gw::ALL
        .iter()
        .filter_map(|&g| lab.gateway_pid(g).map(|p| (g, p)))
        .collect();
    let before: Vec<Value> = Gw::ALL
        .iter()
        .map(|&g| lab.status(g).expect("status"))
        .collect();
    let cpu0: Vec<Option<f64>> = pids.iter().map(|(_, p)| bfd_thread_cpu(*p)).collect();
    let sleeper = lab::ReferenceTimer::start();
    let start = Instant::now();
    let procs = start_load(&lab, load, args.secs);
    // Watch for the whole run (and notice a dead gateway early).
    while start.elapsed() < Duration::from_secs(args.secs) {
        std::thread::sleep(Duration::from_secs(1));
        lab.check_gateways().expect("gateways alive");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (worst_wake, fifo) = sleeper.stop();
    let cpu1: Vec<Option<f64>> = pids.iter().map(|(_, p)| bfd_thread_cpu(*p)).collect();
    let after: Vec<Value> = Gw::ALL
        .iter()
        .map(|&g| lab.status(g).expect("status"))
        .collect();
    let rate = match procs {
        Load::Iperf(iperf) => iperf.finish(),
        Load::Probe(children) => {
            for mut p in children {
                let _ = lab::terminate(&mut p, Duration::from_secs(2));
            }
            None
        }
        Load::None => None,
    };
    let mut clean = true;
    println!(
        "\ninterval {interval_ms} ms x 3, load {load} for {:.0} s{}",
        elapsed,
        rate.map_or(String::new(), |r| format!(
            ", iperf3 {:.0} Mbit/s through the tunnel",
            r / 1e6
        ))
    );
    println!(
        "REPORT bfd_punctuality interval={interval_ms}ms baseline: a bare {} thread sleeping \
         1 ms overslept by up to {:.2} ms during the run",
        if fifo {
            "SCHED_FIFO"
        } else {
            "normal-priority"
        },
        worst_wake.as_secs_f64() * 1e3
    );
    for (i, gw) in Gw::ALL.iter().enumerate() {
        let sessions = LabPath::ALL.len() as f64;
        let cpu = match (
            cpu0.get(i).copied().flatten(),
            cpu1.get(i).copied().flatten(),
        ) {
            (Some(a), Some(b)) => format!(
                "{:.3} ms CPU per session per second ({:.3} % of a core)",
                (b - a) / sessions / elapsed * 1e3,
                (b - a) / sessions / elapsed * 100.0
            ),
            _ => "bfd thread CPU unavailable".into(),
        };
        for path in LabPath::ALL {
            let gap = bfd(&after[i], path, "max_tx_gap_us");
            let false_downs = bfd(&after[i], path, "failures") - bfd(&before[i], path, "failures");
            let transitions =
                bfd(&after[i], path, "transitions") - bfd(&before[i], path, "transitions");
            let ratio = gap as f64 / (interval_ms * 1e3);
            clean &= false_downs == 0 && transitions == 0;
            println!(
                "REPORT bfd_punctuality interval={interval_ms}ms {gw} {path}: largest tx gap \
                 {:.2} ms ({ratio:.2} x interval), false downs {false_downs}, transitions \
                 {transitions}; {cpu}",
                gap as f64 / 1e3
            );
        }
    }
    clean
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without
    // it, where a minutes-long lab run is not wanted.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bfd_punctuality: a benchmark; run it with `cargo bench --bench bfd_punctuality`");
        return;
    }
    let args = parse_args();
    if !lab::is_root() {
        println!("bfd_punctuality: skipped, needs root for the network-namespace lab");
        return;
    }
    let load = if args.load == "iperf3" && !has("iperf3") {
        println!("iperf3 not found; using the built-in probe as load");
        "probe".to_string()
    } else {
        args.load.clone()
    };
    let mut lowest_clean = None;
    for &iv in &args.intervals_ms {
        if run_one(iv, &args, &load) {
            lowest_clean = Some(lowest_clean.map_or(iv, |l: f64| l.min(iv)));
        }
    }
    if let Some(l) = lowest_clean {
        println!(
            "\nREPORT bfd_punctuality lowest interval with zero false downs over {} s of load: {l} ms",
            args.secs
        );
    } else {
        println!("\nREPORT bfd_punctuality no tested interval was free of false downs");
    }
}
