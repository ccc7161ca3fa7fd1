//! Forward error correction against random loss on every path: a 2000
//! packet/s stream from the client to the server while both paths lose
//! 1, 2, 5 or 10 % of their packets at random (nftables `numgen`, both
//! directions, on gateway A), for `active-backup` without FEC, `duplicate`
//! and `active-backup` with `fec = "auto"`, side by side in one run.
//!
//! For each case: the stream's loss (what the receiver missed) and the
//! bytes gateway A put on the paths per byte of the stream (data and
//! parity or copies, overlay headers not counted), median of the runs; and
//! for FEC what gateway B rebuilt and gave up.
//!
//! Run as root: `cargo bench --bench fec`. Knobs: `XL_BENCH_RUNS` (default
//! 3), `XL_BENCH_SECONDS` per stream (default 8), `XL_BENCH_LOSSES` (comma
//! list of percentages; default 1,2,5,10), `CROSSLINK_BIN` (default
//! `target/release/crosslink`, built if missing). Without root it says why
//! and exits 0.

use crosslink::lab::{self, Gw, Lab, LabOptions, LabPath};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const PORT: u16 = 9330;
const RATE: u32 = 2000;
/// The stream's packets as the TUN sees them: IPv4, UDP and the lab
/// sender's 64-byte payload.
const INNER_LEN: f64 = 20.0 + 8.0 + 64.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    Duplicate,
    FecAuto,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Plain, Mode::Duplicate, Mode::FecAuto];

    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "active-backup",
            Mode::Duplicate => "duplicate",
            Mode::FecAuto => "fec auto",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Run {
    lost_pct: f64,
    wire_ratio: f64,
    rebuilt: u64,
    given_up: u64,
    code: String,
}

fn tx_bytes(s: &Value) -> u64 {
    LabPath::ALL
        .into_iter()
        .map(|p| lab::path_counter(s, p, "tx_bytes"))
        .sum()
}

fn one(bin: &Path, mode: Mode, loss: u8, secs: u64, tag: &str) -> lab::Result<Run> {
    let mut opts = LabOptions::new(tag, bin);
    match mode {
        Mode::Plain => opts.peer_extra = vec!["fec = \"off\"".into()],
        Mode::Duplicate => opts.policy = crosslink::config::Policy::Duplicate,
        Mode::FecAuto => opts.peer_extra = vec!["fec = \"auto\"".into()],
    }
    let mut lab = Lab::new(opts)?;
    lab.start_gateways()?;
    lab.wait_paths_up(Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_secs(3));
    for p in LabPath::ALL {
        lab.random_loss(p, loss)?;
    }
    // the loss is measured (3 s window) before the stream is
    let warm = lab.start_sender(PORT + 1, RATE, Duration::from_secs(4))?;
    std::thread::sleep(Duration::from_secs(4));
    let _ = warm.stop();
    let before = tx_bytes(&lab.poll(Gw::A)?);
    let receiver = lab.start_receiver(PORT, Duration::from_secs(secs + 10))?;
    let sender = lab.start_sender(PORT, RATE, Duration::from_secs(secs + 10))?;
    std::thread::sleep(Duration::from_secs(secs));
    let sent = sender.stop()?;
    let report = receiver.finish(Duration::from_secs(3))?;
    let a = lab.poll(Gw::A)?;
    let b = lab.poll(Gw::B)?;
    let lost = report["lost"].as_f64().unwrap_or(f64::NAN);
    let received = report["received"].as_f64().unwrap_or(f64::NAN);
    let count = sent["sent"].as_f64().unwrap_or(f64::NAN);
    let stream_bytes = count * INNER_LEN;
    let wire = (tx_bytes(&a) - before) as f64;
    let fec = &b["peers"][0]["fec"];
    Ok(Run {
        lost_pct: 100.0 * lost / (lost + received),
        wire_ratio: wire / stream_bytes,
        rebuilt: fec["recovered"].as_u64().unwrap_or(0),
        given_up: fec["unrecoverable"].as_u64().unwrap_or(0),
        code: a["peers"][0]["fec"]["code"]
            .as_str()
            .unwrap_or("-")
            .to_string(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("fec: a benchmark; run it with `cargo bench --bench fec`");
        return;
    }
    if !lab::is_root() {
        println!("fec bench skipped: needs root (network namespaces)");
        return;
    }
    let bin = match lab::release_binary() {
        Ok(b) => b,
        Err(e) => {
            println!("fec bench failed: {e}");
            std::process::exit(1);
        }
    };
    let runs = lab::env_num("XL_BENCH_RUNS", 3).max(1) as usize;
    let secs = lab::env_num("XL_BENCH_SECONDS", 8).max(4);
    let losses: Vec<u8> = std::env::var("XL_BENCH_LOSSES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 5, 10]);
    println!(
        "fec bench: {RATE} packet/s for {secs} s, random loss on both paths, median of {runs}"
    );
    println!("| loss | mode | stream loss | wire bytes / stream bytes | code (gw-a, end) | rebuilt | given up |");
    println!("|---|---|---|---|---|---|---|");
    for loss in losses {
        for mode in Mode::ALL {
            let mut all = Vec::new();
            for r in 0..runs {
                let tag = format!("fb{loss}{}{r}", mode as u8);
                match one(&bin, mode, loss, secs, &tag) {
                    Ok(run) => all.push(run),
                    Err(e) => println!("{loss} % {}: run {r} failed: {e}", mode.name()),
                }
            }
            if all.is_empty() {
                continue;
            }
            let lost = median(all.iter().map(|r| r.lost_pct).collect());
            let wire = median(all.iter().map(|r| r.wire_ratio).collect());
            let rebuilt = median(all.iter().map(|r| r.rebuilt as f64).collect());
            let given_up = median(all.iter().map(|r| r.given_up as f64).collect());
            let codes: Vec<&str> = all.iter().map(|r| r.code.as_str()).collect();
            println!(
                "| {loss} % | {} | {lost:.3} % | {wire:.2} | {} | {rebuilt:.0} | {given_up:.0} |",
                mode.name(),
                codes.join(" "),
            );
        }
    }
}
