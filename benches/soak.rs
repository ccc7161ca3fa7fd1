//! Soak: a long saturating TCP transfer through the tunnel, to show that
//! nothing degrades with time (a benchmark run by hand, not part of CI).
//!
//! Builds the netns lab of `crosslink::lab` (client - gw-a - path1/path2 -
//! gw-b - server, active-backup, data sealed with a key), runs both gateways
//! with BFD at 10 ms x 3, and pushes iperf3 TCP (4 streams, client -> server)
//! through the tunnel for the whole run. It reports:
//!
//! * false path downs: BFD session failures and transitions on both paths of
//!   both gateways (no fault is injected, so every one is false);
//! * resident memory (VmRSS) of both daemons at the start, every minute and
//!   at the end, and its growth;
//! * the iperf3 throughput and every drop counter of both gateways;
//! * the worst wake-up lateness, per minute and overall, of a reference
//!   SCHED_FIFO thread sleeping 1 ms at a time in this process: on a host
//!   that stalls for longer than the 30 ms detection time, false downs in
//!   the same minute are the host's, not crosslink's. Wake-ups later than
//!   20 ms (two thirds of the detection time) are counted as stalls.
//!
//! Usage (root): `cargo bench --bench soak` (10 minutes), or
//! `XL_SOAK_SECS=120 cargo bench --bench soak`, or `cargo bench --bench soak
//! -- --secs 120`; `XL_SOAK_INTERVAL_MS` changes the BFD interval (default
//! 10). Not root or no iperf3: says why and exits 0. Under `cargo test
//! --all-targets` (no `--bench` argument) it does nothing.

use std::time::{Duration, Instant};

use crosslink::lab::{self, Gw, Lab, LabOptions, LabPath};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
/// A fixed key for the throwaway lab (hex, 32 bytes).
const KEY: &str = "3a5c7e9f1b2d4f6a8c0e2a4c6e8f0b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a1c3e";

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn soak_secs() -> u64 {
    let mut secs = env_num("XL_SOAK_SECS").unwrap_or(600);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--secs" {
            secs = args.next().and_then(|v| v.parse().ok()).unwrap_or(secs);
        }
    }
    secs.max(10)
}

fn bfd(status: &Value, path: LabPath, key: &str) -> u64 {
    lab::path_status(status, path)
        .and_then(|p| p.pointer(&format!("/bfd/{key}")))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// (failures, transitions) summed over both paths of a status.
fn downs(status: &Value) -> (u64, u64) {
    LabPath::ALL.iter().fold((0, 0), |(f, t), p| {
        (
            f + bfd(status, *p, "failures"),
            t + bfd(status, *p, "transitions"),
        )
    })
}

fn rss(lab: &Lab) -> [u64; 2] {
    Gw::ALL.map(|gw| lab.gateway_pid(gw).and_then(lab::vm_rss_kib).unwrap_or(0))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: a benchmark; run it with `cargo bench --bench soak`");
        return;
    }
    if !lab::is_root() {
        println!("soak: skipped, needs root for the network-namespace lab");
        return;
    }
    if !lab::tool_installed("iperf3") {
        println!("soak: skipped, needs iperf3 (Debian package iperf3)");
        return;
    }
    let secs = soak_secs();
    let interval = Duration::from_millis(env_num("XL_SOAK_INTERVAL_MS").unwrap_or(10));
    let mut opts = LabOptions::new("soak", BIN);
    opts.tx_interval = interval;
    opts.rx_interval = interval;
    opts.multiplier = 3;
    opts.key = Some(KEY.to_string());
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .expect("paths up");
    let before: Vec<Value> = Gw::ALL
        .iter()
        .map(|&g| lab.poll(g).expect("status"))
        .collect();
    let rss0 = rss(&lab);
    println!(
        "soak: {secs} s of iperf3 -P 4 through the tunnel, BFD {} ms x 3, both paths up",
        interval.as_millis()
    );
    println!("REPORT soak t=0s rss_kib gw-a={} gw-b={}", rss0[0], rss0[1]);
    let timer = lab::ReferenceTimer::start();
    let start = Instant::now();
    let iperf = lab.start_iperf3(4, secs).expect("iperf3");
    let mut last = before.clone();
    let mut last_stalls = 0;
    let mut next = Duration::from_secs(60);
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        lab.check_gateways().expect("gateways alive");
        if start.elapsed() < next {
            continue;
        }
        next += Duration::from_secs(60);
        let now: Vec<Value> = Gw::ALL
            .iter()
            .map(|&g| lab.poll(g).expect("status"))
            .collect();
        let r = rss(&lab);
        let d: Vec<(u64, u64)> = (0..2)
            .map(|i| {
                let (f0, t0) = downs(&last[i]);
                let (f1, t1) = downs(&now[i]);
                (f1 - f0, t1 - t0)
            })
            .collect();
        println!(
            "REPORT soak t={}s rss_kib gw-a={} gw-b={} false_downs_this_minute gw-a={} gw-b={} \
             transitions gw-a={} gw-b={} reference_timer_worst_late_ms={:.2} \
             reference_timer_stalls_over_{}ms={}",
            start.elapsed().as_secs(),
            r[0],
            r[1],
            d[0].0,
            d[1].0,
            d[0].1,
            d[1].1,
            timer.take_window().as_secs_f64() * 1e3,
            lab::ReferenceTimer::STALL.as_millis(),
            timer.stalls() - last_stalls,
        );
        last = now;
        last_stalls = timer.stalls();
    }
    let rate = iperf.finish();
    let elapsed = start.elapsed().as_secs_f64();
    let stalls = timer.stalls();
    let (worst, fifo) = timer.stop();
    let after: Vec<Value> = Gw::ALL
        .iter()
        .map(|&g| lab.poll(g).expect("status"))
        .collect();
    let rss1 = rss(&lab);
    println!(
        "\nREPORT soak duration_s={elapsed:.0} iperf3_mbit_s={}",
        rate.map_or("n/a".into(), |r| format!("{:.0}", r / 1e6))
    );
    let mut false_downs = 0;
    for (i, gw) in Gw::ALL.iter().enumerate() {
        for p in LabPath::ALL {
            let f = bfd(&after[i], p, "failures") - bfd(&before[i], p, "failures");
            let t = bfd(&after[i], p, "transitions") - bfd(&before[i], p, "transitions");
            false_downs += f;
            println!(
                "REPORT soak {gw} {p}: false_downs={f} transitions={t} max_tx_gap_ms={:.2} \
                 tx_packets={}",
                bfd(&after[i], p, "max_tx_gap_us") as f64 / 1e3,
                lab::path_counter(&after[i], p, "tx_packets"),
            );
        }
        println!(
            "REPORT soak {gw} rss_kib start={} end={} growth_kib={} drops={}",
            rss0[i],
            rss1[i],
            rss1[i] as i64 - rss0[i] as i64,
            after[i]["drops"]
        );
    }
    println!(
        "REPORT soak false_downs_total={false_downs} reference_timer ({}) worst_late_ms={:.2} \
         stalls_over_{}ms={stalls}",
        if fifo {
            "SCHED_FIFO"
        } else {
            "normal priority"
        },
        worst.as_secs_f64() * 1e3,
        lab::ReferenceTimer::STALL.as_millis(),
    );
}
