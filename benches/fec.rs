//! Forward error correction against random loss on every path, in two
//! parts, side by side in one run (`XL_BENCH_PARTS`, default `stream,tcp`):
//!
//! - `stream`: a 2000 packet/s stream from the client to the server while
//!   both paths lose 1, 2, 5 or 10 % of their packets at random (nftables
//!   `numgen`, both directions, on gateway A), for `active-backup` without
//!   FEC, `duplicate` and `active-backup` with `fec = "auto"`. For each case:
//!   the stream's loss (what the receiver missed) and the bytes gateway A put
//!   on the paths per byte of the stream (data and parity or copies, overlay
//!   headers not counted), median of the runs; for FEC what gateway B rebuilt
//!   and gave up; and the one-way latency the receiver measured (sender and
//!   receiver share the host's clock): the median of the packets that
//!   arrived in order, and how much later than that the *late* packets came
//!   (those that arrived after a higher sequence number: under FEC the
//!   rebuilt ones, the paths here do not reorder), median of the runs'
//!   medians and 90th percentiles, and the worst of all runs.
//! - `tcp`: one TCP stream (iperf3, CUBIC) from the client to the server
//!   with both paths shaped to 300 Mbit/s (`tc tbf` on both gateways) and
//!   losing 1, 2 or 5 % at random, for the same three modes: Mbit/s
//!   received, TCP retransmissions and the bytes gateway A put on the paths
//!   per byte the stream sent, median of the runs; for FEC the parity
//!   gateway A sent per data datagram and the codes it used (sampled once a
//!   second during the streams, all runs). Each run sets one lab up per mode
//!   and goes through the loss rates in rising order in it (heavier codes
//!   are taken at once, lighter ones only after 5 s); before each stream a
//!   4 s packet stream lets `auto` measure the loss.
//!
//! Run as root: `cargo bench --bench fec`. Knobs: `XL_BENCH_PARTS` (comma
//! list of `stream`, `tcp`), `XL_BENCH_RUNS` (default 3), `XL_BENCH_SECONDS`
//! per packet stream (default 8), `XL_BENCH_LOSSES` (the packet stream's
//! comma list of percentages; default 1,2,5,10), `XL_BENCH_TCP_SECONDS` per
//! TCP stream (default 5), `XL_BENCH_TCP_LOSSES` (default 1,2,5),
//! `XL_BENCH_TCP_MBIT` (each path's rate; default 300), `CROSSLINK_BIN`
//! (default `target/release/crosslink`, built if missing). Without root it
//! says why and exits 0; without iperf3 or tc it says so and skips `tcp`.
//!
//! What FEC costs when it is off (unshaped, no loss) is the throughput
//! bench's to measure, against a binary from before FEC:
//! `XL_BENCH_COMPARE=/path/to/old/crosslink cargo bench --bench throughput`.

use crosslink::lab::{self, Gw, Host, Lab, LabOptions, LabPath, SERVER_ADDR};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const PORT: u16 = 9330;
const RATE: u32 = 2000;
/// The stream's packets as the TUN sees them: IPv4, UDP and the lab
/// sender's 64-byte payload.
const INNER_LEN: f64 = 20.0 + 8.0 + 64.0;
/// The TCP part's iperf3 port.
const IPERF_PORT: u16 = 5203;

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

    /// A lab's options for this mode.
    fn options(self, tag: &str, bin: &Path) -> LabOptions {
        let mut opts = LabOptions::new(tag, bin);
        match self {
            Mode::Plain => opts.peer_extra = vec!["fec = \"off\"".into()],
            Mode::Duplicate => opts.policy = crosslink::config::Policy::Duplicate,
            Mode::FecAuto => opts.peer_extra = vec!["fec = \"auto\"".into()],
        }
        opts
    }
}

#[derive(Debug, Default, Clone)]
struct Run {
    lost_pct: f64,
    wire_ratio: f64,
    rebuilt: u64,
    given_up: u64,
    code: String,
    /// The receiver's one-way latency of in-order packets (median, ms).
    latency_ms: Option<f64>,
    /// Packets that arrived after a higher sequence number.
    late: u64,
    /// How much later than `latency_ms` they came (ms): median, p90, worst.
    late_median: Option<f64>,
    late_p90: Option<f64>,
    late_max: Option<f64>,
}

fn tx_bytes(s: &Value) -> u64 {
    LabPath::ALL
        .into_iter()
        .map(|p| lab::path_counter(s, p, "tx_bytes"))
        .sum()
}

fn tx_packets(s: &Value) -> u64 {
    LabPath::ALL
        .into_iter()
        .map(|p| lab::path_counter(s, p, "tx_packets"))
        .sum()
}

fn fec_of(s: &Value) -> &Value {
    &s["peers"][0]["fec"]
}

/// Lets `auto` measure the loss: a packet stream of its own for 4 s.
fn warm_up(lab: &Lab) -> lab::Result<()> {
    let warm = lab.start_sender(PORT + 1, RATE, Duration::from_secs(4))?;
    std::thread::sleep(Duration::from_secs(4));
    let _ = warm.stop();
    Ok(())
}

fn one(bin: &Path, mode: Mode, loss: u8, secs: u64, tag: &str) -> lab::Result<Run> {
    let mut lab = Lab::new(mode.options(tag, bin))?;
    lab.start_gateways()?;
    lab.wait_paths_up(Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_secs(3));
    for p in LabPath::ALL {
        lab.random_loss(p, loss)?;
    }
    // the loss is measured (3 s window) before the stream is
    warm_up(&lab)?;
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
    let fec = fec_of(&b);
    Ok(Run {
        lost_pct: 100.0 * lost / (lost + received),
        wire_ratio: wire / stream_bytes,
        rebuilt: fec["recovered"].as_u64().unwrap_or(0),
        given_up: fec["unrecoverable"].as_u64().unwrap_or(0),
        code: fec_of(&a)["code"].as_str().unwrap_or("-").to_string(),
        latency_ms: report["latency_median_ms"].as_f64(),
        late: report["late_count"].as_u64().unwrap_or(0),
        late_median: report["late_extra_ms_median"].as_f64(),
        late_p90: report["late_extra_ms_p90"].as_f64(),
        late_max: report["late_extra_ms_max"].as_f64(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of the values present, `-` when there is none.
fn median_ms(v: impl Iterator<Item = Option<f64>>) -> String {
    let v: Vec<f64> = v.flatten().collect();
    if v.is_empty() {
        return "-".into();
    }
    format!("{:.2}", median(v))
}

fn max_ms(v: impl Iterator<Item = Option<f64>>) -> String {
    v.flatten()
        .max_by(|a, b| a.total_cmp(b))
        .map_or_else(|| "-".into(), |m| format!("{m:.2}"))
}

fn losses(name: &str, default: &[u8]) -> Vec<u8> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn stream_part(bin: &Path, runs: usize) {
    let secs = lab::env_num("XL_BENCH_SECONDS", 8).max(4);
    let losses = losses("XL_BENCH_LOSSES", &[1, 2, 5, 10]);
    println!(
        "fec bench, stream: {RATE} packet/s for {secs} s, random loss on both paths, median of {runs}"
    );
    println!("(latency: one-way, in-order packets' median; late: packets that arrived after a higher sequence number, how much later than that median, ms: median / p90 of the runs' medians and p90s, worst of all runs)");
    println!("| loss | mode | stream loss | wire bytes / stream bytes | code (gw-a, end) | rebuilt | given up | latency ms | late packets | late extra ms median / p90 / worst |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for loss in losses {
        for mode in Mode::ALL {
            let mut all = Vec::new();
            for r in 0..runs {
                let tag = format!("fb{loss}{}{r}", mode as u8);
                match one(bin, mode, loss, secs, &tag) {
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
            let late = median(all.iter().map(|r| r.late as f64).collect());
            let codes: Vec<&str> = all.iter().map(|r| r.code.as_str()).collect();
            println!(
                "| {loss} % | {} | {lost:.3} % | {wire:.2} | {} | {rebuilt:.0} | {given_up:.0} | {} | {late:.0} | {} / {} / {} |",
                mode.name(),
                codes.join(" "),
                median_ms(all.iter().map(|r| r.latency_ms)),
                median_ms(all.iter().map(|r| r.late_median)),
                median_ms(all.iter().map(|r| r.late_p90)),
                max_ms(all.iter().map(|r| r.late_max)),
            );
        }
    }
}

/// One TCP stream's figures.
#[derive(Debug, Default, Clone)]
struct TcpRun {
    mbit: f64,
    retransmits: f64,
    /// Bytes gateway A put on the paths per byte iperf3 sent.
    wire_ratio: f64,
    /// Parity gateway A sent per data datagram.
    parity_ratio: f64,
    /// Gateway A's FEC code, once a second during the stream.
    codes: Vec<String>,
}

/// One iperf3 TCP stream (CUBIC) from the client to the server for `secs`,
/// gateway A's FEC code sampled once a second meanwhile; the client's JSON.
fn iperf_stream(lab: &Lab, secs: u64) -> Result<(Value, Vec<String>), String> {
    let mut srv = lab.command_in(Host::Server, "iperf3");
    srv.args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
        .args(["-B", &SERVER_ADDR.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut srv, 0);
    let mut srv = srv
        .spawn()
        .map_err(|e| format!("starting iperf3 -s: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut cli = lab.command_in(Host::Client, "iperf3");
    cli.args([
        "-c",
        &SERVER_ADDR.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
    ])
    .args(["-J", "-C", "cubic", "-t", &secs.to_string()])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cli, 0);
    let cli = match cli.spawn() {
        Ok(c) => c,
        Err(e) => {
            lab::terminate(&mut srv, Duration::from_secs(2));
            return Err(format!("starting iperf3 -c: {e}"));
        }
    };
    let (out, codes) = std::thread::scope(|s| {
        let waiting = s.spawn(move || cli.wait_with_output());
        let mut codes = Vec::new();
        while !waiting.is_finished() {
            std::thread::sleep(Duration::from_secs(1));
            if waiting.is_finished() {
                break;
            }
            if let Ok(a) = lab.poll(Gw::A) {
                codes.push(fec_of(&a)["code"].as_str().unwrap_or("-").to_string());
            }
        }
        (waiting.join(), codes)
    });
    lab::terminate(&mut srv, Duration::from_secs(2));
    let out = match out {
        Ok(Ok(o)) => o,
        _ => return Err("iperf3 -c did not finish".into()),
    };
    let json: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 -c printed no report: {e}"))?;
    if let Some(e) = json.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {e}"));
    }
    Ok((json, codes))
}

/// One lab for `mode`, both paths shaped to `mbit` Mbit/s. BFD at 10 ms x 5:
/// a full token bucket's queue (20 ms) and a lost control packet together
/// must not fail a path by BFD.
fn tcp_lab(bin: &Path, mode: Mode, mbit: u32, tag: &str) -> lab::Result<Lab> {
    let mut opts = mode.options(tag, bin);
    opts.multiplier = 5;
    let mut lab = Lab::new(opts)?;
    lab.start_gateways()?;
    lab.wait_paths_up(Duration::from_secs(15))?;
    for p in LabPath::ALL {
        lab.shape(p, mbit)?;
    }
    std::thread::sleep(Duration::from_secs(3));
    Ok(lab)
}

fn tcp_one(lab: &Lab, loss: u8, secs: u64) -> Result<TcpRun, String> {
    for p in LabPath::ALL {
        lab.heal(p).map_err(|e| e.to_string())?;
        lab.random_loss(p, loss).map_err(|e| e.to_string())?;
    }
    warm_up(lab).map_err(|e| e.to_string())?;
    let before = lab.poll(Gw::A).map_err(|e| e.to_string())?;
    let (json, codes) = iperf_stream(lab, secs)?;
    let after = lab.poll(Gw::A).map_err(|e| e.to_string())?;
    let num = |ptr: &str| json.pointer(ptr).and_then(Value::as_f64);
    let mbit = num("/end/sum_received/bits_per_second").ok_or("no received rate")? / 1e6;
    let sent_bytes = num("/end/sum_sent/bytes").ok_or("no sent bytes")?;
    let parity = |s: &Value| fec_of(s)["parity_sent"].as_u64().unwrap_or(0);
    let parity_sent = parity(&after).saturating_sub(parity(&before));
    let datagrams = tx_packets(&after).saturating_sub(tx_packets(&before));
    let data = datagrams.saturating_sub(parity_sent).max(1);
    Ok(TcpRun {
        mbit,
        retransmits: num("/end/sum_sent/retransmits").unwrap_or(f64::NAN),
        wire_ratio: tx_bytes(&after).saturating_sub(tx_bytes(&before)) as f64 / sent_bytes,
        parity_ratio: parity_sent as f64 / data as f64,
        codes,
    })
}

fn tcp_part(bin: &Path, runs: usize) {
    for (tool, pkg) in [("iperf3", "iperf3"), ("tc", "iproute2")] {
        if !lab::tool_installed(tool) {
            println!("fec bench, tcp: skipped, {tool} not installed (apt-get install {pkg})");
            return;
        }
    }
    let secs = lab::env_num("XL_BENCH_TCP_SECONDS", 5).max(2);
    let mbit = u32::try_from(lab::env_num("XL_BENCH_TCP_MBIT", 300).max(1)).unwrap_or(300);
    let mut losses = losses("XL_BENCH_TCP_LOSSES", &[1, 2, 5]);
    losses.sort_unstable();
    losses.dedup();
    println!(
        "fec bench, tcp: one TCP stream (iperf3, cubic) for {secs} s, both paths shaped to {mbit} Mbit/s and losing at random, median of {runs}"
    );
    // results[loss][mode] = the runs' figures
    let mut results: Vec<Vec<Vec<TcpRun>>> = vec![vec![Vec::new(); Mode::ALL.len()]; losses.len()];
    for r in 0..runs {
        // Interleaved: each run measures every mode, so that a change in
        // the machine's load hits all alike.
        for (mi, mode) in Mode::ALL.into_iter().enumerate() {
            let tag = format!("ft{}{r}", mode as u8);
            let lab = match tcp_lab(bin, mode, mbit, &tag) {
                Ok(l) => l,
                Err(e) => {
                    println!("tcp {}: run {r}: lab failed: {e}", mode.name());
                    continue;
                }
            };
            for (li, &loss) in losses.iter().enumerate() {
                match tcp_one(&lab, loss, secs) {
                    Ok(run) => {
                        println!(
                            "run {r} {loss} % {}: {:.0} Mbit/s, {:.0} retransmits, wire {:.3}, parity/data {:.3}, codes [{}]",
                            mode.name(),
                            run.mbit,
                            run.retransmits,
                            run.wire_ratio,
                            run.parity_ratio,
                            run.codes.join(" ")
                        );
                        results[li][mi].push(run);
                    }
                    Err(e) => println!("tcp {loss} % {}: run {r} failed: {e}", mode.name()),
                }
            }
        }
    }
    println!("| loss | mode | Mbit/s | retransmits | wire bytes / TCP bytes | parity / data datagram | codes during the streams (samples) |");
    println!("|---|---|---|---|---|---|---|");
    for (li, loss) in losses.iter().enumerate() {
        for (mi, mode) in Mode::ALL.into_iter().enumerate() {
            let all = &results[li][mi];
            if all.is_empty() {
                continue;
            }
            let mut codes: BTreeMap<&str, usize> = BTreeMap::new();
            for c in all.iter().flat_map(|r| r.codes.iter()) {
                *codes.entry(c.as_str()).or_default() += 1;
            }
            let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c} x{n}")).collect();
            println!(
                "| {loss} % | {} | {:.0} | {:.0} | {:.3} | {:.3} | {} |",
                mode.name(),
                median(all.iter().map(|r| r.mbit).collect()),
                median(all.iter().map(|r| r.retransmits).collect()),
                median(all.iter().map(|r| r.wire_ratio).collect()),
                median(all.iter().map(|r| r.parity_ratio).collect()),
                codes.join(", "),
            );
        }
    }
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
    let parts: Vec<String> = std::env::var("XL_BENCH_PARTS")
        .unwrap_or_else(|_| "stream,tcp".into())
        .split(',')
        .map(|p| p.trim().to_string())
        .collect();
    for p in &parts {
        if !["stream", "tcp"].contains(&p.as_str()) {
            eprintln!("unknown part {p:?} ignored (stream, tcp)");
        }
    }
    let bin = match lab::release_binary() {
        Ok(b) => b,
        Err(e) => {
            println!("fec bench failed: {e}");
            std::process::exit(1);
        }
    };
    let runs = lab::env_num("XL_BENCH_RUNS", 3).max(1) as usize;
    println!("fec bench: binary {}", bin.display());
    let start = std::time::Instant::now();
    if parts.iter().any(|p| p == "stream") {
        stream_part(&bin, runs);
    }
    if parts.iter().any(|p| p == "tcp") {
        tcp_part(&bin, runs);
    }
    println!("fec bench: {:.0} s", start.elapsed().as_secs_f64());
}
