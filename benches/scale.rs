//! Scale: many peers of two paths each between the two gateways of the
//! netns lab (see tests/support/scale.rs for the address plan), BFD at
//! 10 ms x 3 on every path, no data traffic. For each N it reports:
//!
//! * the time from starting both gateways until every session is Up on both;
//! * the BFD thread's CPU (utime + stime of the thread named `bfd`, from
//!   /proc/<pid>/task/<tid>/stat) over a quiet window, per gateway, and
//!   the whole process's (its workers answer and send the quality probes);
//! * the daemon's threads and resident memory (VmRSS);
//! * the worst transmit gap of any session since it came Up, and the worst
//!   one in the window (`max_tx_gap_us` of the status, measured by the BFD
//!   thread while the session is Up: a session whose worst grew in the
//!   window had its new worst there), beside the worst
//!   wake-up lateness of a reference SCHED_FIFO thread sleeping 1 ms at a
//!   time in the bench (`lab::ReferenceTimer`, one per CPU, as the soak
//!   bench reports: what the host allowed at best), and the time the
//!   hypervisor took from each CPU in the window (steal, /proc/stat), and
//!   both again since the gateways started (the bring-up included, over
//!   which the worst gap since Up is measured), and the BFD thread's own
//!   view (the status's `bfd_thread`: its latest wake-up, and its longest
//!   time off the CPU in work, preempted, in a system call or stolen);
//! * false downs: BFD failures (Up -> Down that is not administrative) of
//!   any session since start, and during the window (no fault is injected),
//!   and the BFD packets each gateway's kernel dropped for a full receive
//!   buffer (`bfd_overflow`);
//! * the worst transmit gap of gw-a's sessions while its status is polled
//!   back to back for 3 s (the document is built on the BFD thread);
//! * the latency of one status document from the control socket, of
//!   `crosslink status` (the table, a process of its own), and of a
//!   /metrics scrape (curl's own time_total);
//! * a reload that changes one peer: time until "reload applied" is logged,
//!   and whether any other session moved;
//! * the failover of one peer's path while all the others run: gw-b's
//!   address of the last peer's path l1 is deleted (a secondary address:
//!   deleting a subnet's primary one takes every secondary with it), and
//!   gw-a's detection time is read from its `failover` log line; no other
//!   session may fail.
//!
//! Usage (root): `cargo bench --bench scale -- --peers 50,200 [--secs 30]
//! [--interval-ms 10] [--bin PATH] [--bin-b PATH]` (`--bin` runs another
//! crosslink binary, e.g. an older build, for comparison; `--bin-b` runs
//! that one on gw-b only, so that two builds share one run and the same
//! host conditions: with veths each gateway's BFD thread also pays the
//! other's receive, the same program on both; `XL_SCALE_OFFLOAD=1` turns on the
//! BFD receive offload, `bfd.offload`). Not root: says why and exits 0.
//! Under `cargo test --all-targets` (no `--bench` argument) it does nothing.

#[path = "../tests/support/scale.rs"]
mod scale;

use crosslink::lab::{Gw, LabOptions};
use scale::{ScaleLab, METRICS_PORT};
use std::time::{Duration, Instant};

struct Args {
    peers: Vec<usize>,
    secs: u64,
    interval: Duration,
    bin: String,
    bin_b: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        peers: vec![50, 200],
        secs: 30,
        interval: Duration::from_millis(10),
        bin: env!("CARGO_BIN_EXE_crosslink").to_string(),
        bin_b: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--peers" => {
                if let Some(v) = it.next() {
                    a.peers = v.split(',').filter_map(|n| n.trim().parse().ok()).collect();
                }
            }
            "--secs" => a.secs = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.secs),
            "--interval-ms" => {
                if let Some(ms) = it.next().and_then(|v| v.parse().ok()) {
                    a.interval = Duration::from_millis(ms);
                }
            }
            "--bin" => a.bin = it.next().unwrap_or(a.bin),
            "--bin-b" => a.bin_b = it.next(),
            _ => {}
        }
    }
    a
}

/// Seconds from now until `needle` appears in the gateway's log more
/// often than `before` times (or `None` after `timeout`).
fn wait_log(
    lab: &crosslink::lab::Lab,
    gw: Gw,
    needle: &str,
    before: usize,
    timeout: Duration,
) -> Option<f64> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let log = std::fs::read_to_string(lab.log_path(gw)).unwrap_or_default();
        if log.matches(needle).count() > before {
            return Some(t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn run_one(n: usize, args: &Args) {
    let ms = args.interval.as_millis();
    let mut s = ScaleLab::pair(
        "scale",
        &args.bin,
        args.bin_b.as_deref(),
        n,
        args.interval,
        3,
    );
    // The host from the start, bring-up included (the worst gap since Up
    // is measured from there), beside the window's own (below).
    let timer_all = crosslink::lab::ReferenceTimer::start();
    let steal_all0 = crosslink::lab::steal_ms();
    s.start();
    let up = match s.wait_all_up(Duration::from_secs(60 + n as u64 / 5)) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => {
            println!("scale N={n}: not every session came up: {e}");
            return;
        }
    };
    let pids: Vec<u32> = Gw::ALL
        .iter()
        .filter_map(|&g| s.lab.gateway_pid(g))
        .collect();
    let bfd_tids: Vec<Option<u32>> = pids.iter().map(|&p| scale::threads(p, "bfd").1).collect();
    let cpu = |i: usize| bfd_tids[i].and_then(|t| scale::thread_cpu(pids[i], t));
    let st = |g| status_of(&s.lab, g);
    let start = [st(Gw::A), st(Gw::B)];
    let f_start = [scale::failures(&start[0]), scale::failures(&start[1])];
    let gaps_start = [scale::tx_gaps(&start[0]), scale::tx_gaps(&start[1])];
    let all = |i: usize| scale::process_cpu(pids[i]);
    let cpu0: Vec<Option<f64>> = (0..pids.len()).map(cpu).collect();
    let all0: Vec<Option<f64>> = (0..pids.len()).map(all).collect();
    let timer = crosslink::lab::ReferenceTimer::start();
    let steal0 = crosslink::lab::steal_ms();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.secs));
    let host_stalls = timer.stalls();
    let (host_worst, _) = timer.stop();
    let steal_now = crosslink::lab::steal_ms();
    let since = |from: &[u64]| -> Vec<u64> {
        steal_now
            .iter()
            .zip(from)
            .map(|(b, a)| b.saturating_sub(*a))
            .collect()
    };
    let steal = since(&steal0);
    let steal_all = since(&steal_all0);
    let (host_all_worst, _) = timer_all.stop();
    let cpu1: Vec<Option<f64>> = (0..pids.len()).map(cpu).collect();
    let all1: Vec<Option<f64>> = (0..pids.len()).map(all).collect();
    let window = t0.elapsed().as_secs_f64();
    let status = [st(Gw::A), st(Gw::B)];
    let f_end = [scale::failures(&status[0]), scale::failures(&status[1])];
    let offloaded: Vec<usize> = status
        .iter()
        .map(|s| scale::count_paths(s, |p| p["bfd"]["offloaded"] == true))
        .collect();
    // CPU seconds used over the window, as a share of one CPU.
    let share = |before: &[Option<f64>], after: &[Option<f64>]| -> Vec<String> {
        before
            .iter()
            .zip(after)
            .map(|pair| match pair {
                (Some(a), Some(b)) => format!("{:.1}%", (b - a) / window * 100.0),
                _ => "?".into(),
            })
            .collect()
    };
    let cpu_pct = share(&cpu0, &cpu1);
    let all_pct = share(&all0, &all1);
    let threads: Vec<usize> = pids.iter().map(|&p| scale::threads(p, "bfd").0).collect();
    let rss: Vec<String> = pids
        .iter()
        .map(|&p| scale::rss_mb(p).map_or("?".into(), |m| format!("{m:.0}MB")))
        .collect();
    // Per gateway, in ms.
    let gap: Vec<String> = status
        .iter()
        .map(|st| format!("{:.1}", scale::worst_tx_gap_us(st) as f64 / 1e3))
        .collect();
    // "-": no session's worst grew in between.
    let grown_ms = |us: u64| match us {
        0 => "-".to_string(),
        us => format!("{:.1}", us as f64 / 1e3),
    };
    let gap_window: Vec<String> = (0..2)
        .map(|g| scale::worst_tx_gap_between(&gaps_start[g], &scale::tx_gaps(&status[g])))
        .map(grown_ms)
        .collect();
    // The BFD thread's own view of the host since start (absent from
    // older builds): late wake-ups, time off its CPU in work.
    let held: Vec<String> = status
        .iter()
        .map(|st| {
            let t = &st["bfd_thread"];
            let ms = |k: &str| {
                t[k].as_u64()
                    .map_or("?".into(), |us| format!("{:.1}", us as f64 / 1e3))
            };
            format!(
                "late {}, preempted {}, blocked {}, stolen {} ms, {} stalls",
                ms("worst_late_us"),
                ms("worst_preempted_us"),
                ms("worst_blocked_us"),
                ms("worst_stolen_us"),
                t["stalls"].as_u64().map_or("?".into(), |n| n.to_string())
            )
        })
        .collect();
    let downs_total: u64 = f_end.iter().flat_map(|m| m.values()).sum();
    let downs_window: usize = (0..2)
        .map(|g| scale::grown(&f_start[g], &f_end[g]).len())
        .sum();
    let status_ms = scale::median(
        (0..5)
            .filter_map(|_| scale::status_latency(&s.lab, Gw::A))
            .map(|x| x * 1e3)
            .collect(),
    );
    let table_ms = scale::median(
        (0..3)
            .filter_map(|_| {
                let t = Instant::now();
                s.lab.status_table(Gw::A).ok()?;
                Some(t.elapsed().as_secs_f64() * 1e3)
            })
            .collect(),
    );
    let scrapes: Vec<(f64, usize)> = (0..3)
        .filter_map(|_| scale::scrape(&s.lab, Gw::A))
        .collect();
    let scrape_ms = scale::median(scrapes.iter().map(|x| x.0 * 1e3).collect());
    let scrape_kb = scrapes.first().map_or(0, |x| x.1) / 1024;

    // The status polled back to back: its document is built on the BFD
    // thread, and what falls due meanwhile must still go out on time.
    let polled0 = scale::tx_gaps(&st(Gw::A));
    let polled_from = Instant::now();
    let mut polls = 0;
    while polled_from.elapsed() < Duration::from_secs(3) {
        polls += usize::from(s.lab.poll(Gw::A).is_ok());
    }
    let polled_gap = scale::worst_tx_gap_between(&polled0, &scale::tx_gaps(&st(Gw::A)));

    // A reload that changes the last peer only.
    let before_reload = scale::failures(&status_of(&s.lab, Gw::A));
    let transitions = |v: &serde_json::Value| -> Vec<u64> {
        scale::paths(v)
            .map(|p| p["bfd"]["transitions"].as_u64().unwrap_or(0))
            .collect()
    };
    let tr0 = transitions(&status_of(&s.lab, Gw::A));
    let applied = std::fs::read_to_string(s.lab.log_path(Gw::A))
        .unwrap_or_default()
        .matches("reload applied")
        .count();
    let text = scale::config_text(&s.lab, Gw::A, n, Some(n - 1), s.offload);
    s.lab.write_config(Gw::A, &text).expect("config");
    s.lab.reload_gateway(Gw::A).expect("reload");
    let reload_s = wait_log(
        &s.lab,
        Gw::A,
        "reload applied",
        applied,
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(300));
    let tr1 = transitions(&status_of(&s.lab, Gw::A));
    let moved = tr0.iter().zip(&tr1).filter(|(a, b)| a != b).count();
    let reload_downs = scale::grown(&before_reload, &scale::failures(&status_of(&s.lab, Gw::A)));

    // One peer's path fails while the others run.
    let failovers = std::fs::read_to_string(s.lab.log_path(Gw::A))
        .unwrap_or_default()
        .matches("failover")
        .count();
    let before_fail = [scale::failures(&st(Gw::A)), scale::failures(&st(Gw::B))];
    let victim = format!("{}/17", scale::addr(Gw::B, n - 1, 1));
    s.lab
        .ip_in(Gw::B.host(), &["addr", "del", &victim, "dev", "path1"])
        .expect("addr del");
    let seen = wait_log(&s.lab, Gw::A, "failover", failovers, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let log = std::fs::read_to_string(s.lab.log_path(Gw::A)).unwrap_or_default();
    let detection = log
        .lines()
        .filter(|l| l.contains("failover") && l.contains(&format!("peer=\"p{}\"", n - 1)))
        .filter_map(|l| l.split("detection_ms=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .next_back();
    let after_fail = [scale::failures(&st(Gw::A)), scale::failures(&st(Gw::B))];
    // BFD packets the kernel dropped for a full receive buffer, since start
    // (0 when none; absent from older builds' status).
    let overflow: Vec<u64> = Gw::ALL
        .iter()
        .map(|&g| st(g)["drops"]["bfd_overflow"].as_u64().unwrap_or(0))
        .collect();
    let others: Vec<String> = (0..2)
        .flat_map(|g| scale::grown(&before_fail[g], &after_fail[g]))
        .filter(|k| !k.starts_with(&format!("p{}/l1:", n - 1)))
        .collect();

    println!(
        "scale N={n} ({sessions} sessions per gateway, BFD {ms} ms x 3, {bin}; \
         receive offload {offload}: {offloaded:?} sessions offloaded at the window's end):\n  \
         all up after {up:.2}s; BFD thread CPU over {window:.0}s: gw-a {ca} gw-b {cb} \
         (whole process: {pa}, {pb}); threads {threads:?}; RSS {rss:?}\n  \
         worst tx gap since Up (gw-a, gw-b) {gap:?} ms, in the window {gap_window:?} ms \
         (-: none over the earlier worst); false downs: {downs_total} since start, {downs_window} in the window; \
         host in the window: worst wake-up lateness {host_ms:.1} ms, {host_stalls} over {stall_ms} ms, \
         steal {steal:?} ms per CPU; host since start: worst lateness {host_all_ms:.1} ms, steal {steal_all:?} ms; \
         BFD thread held off since start (worst): gw-a {held_a}; gw-b {held_b}; \
         BFD receive buffer drops since start {overflow:?}\n  \
         gw-a's status polled back to back for 3 s ({polls} documents): worst tx gap of gw-a {polled} ms \
         (-: none over the earlier worst)\n  \
         status (socket) {status_ms:.1} ms, `crosslink status` {table_ms:.1} ms, /metrics scrape {scrape_ms:.1} ms ({scrape_kb} KB)\n  \
         reload of one peer: applied after {reload}, {moved} sessions of gw-a changed state, failures {reload_downs}\n  \
         one path failed (p{last}/l1): gw-a {det} (seen after {seen}), other sessions failed: {others}",
        sessions = 2 * n,
        offload = if s.offload { "on" } else { "off" },
        last = n - 1,
        reload_downs = brief(&reload_downs),
        polled = grown_ms(polled_gap),
        others = brief(&others),
        bin = match &args.bin_b {
            Some(b) => format!("gw-a {}, gw-b {b}", args.bin),
            None => args.bin.clone(),
        },
        ca = cpu_pct.first().map_or("?", String::as_str),
        cb = cpu_pct.get(1).map_or("?", String::as_str),
        pa = all_pct.first().map_or("?", String::as_str),
        pb = all_pct.get(1).map_or("?", String::as_str),
        host_ms = host_worst.as_secs_f64() * 1e3,
        host_all_ms = host_all_worst.as_secs_f64() * 1e3,
        held_a = held.first().map_or("?", String::as_str),
        held_b = held.get(1).map_or("?", String::as_str),
        stall_ms = crosslink::lab::ReferenceTimer::STALL.as_millis(),
        reload = reload_s.map_or("never".into(), |x| format!("{:.0} ms", x * 1e3)),
        det = detection.map_or("no failover logged".into(), |d| format!("detection {d:.1} ms")),
        seen = seen.map_or("never".into(), |x| format!("{:.0} ms", x * 1e3)),
    );
    let _ = METRICS_PORT;
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !crosslink::lab::is_root() {
        println!("scale bench: needs root (network namespaces); skipped");
        return;
    }
    let _ = LabOptions::new("x", "x");
    let args = parse_args();
    for &n in &args.peers {
        run_one(n, &args);
    }
}

/// A list of sessions, its first few only when it is long.
fn brief(v: &[String]) -> String {
    const SHOWN: usize = 8;
    match v.len() {
        0..=SHOWN => format!("{v:?}"),
        n => format!("{n}, first {:?}", &v[..SHOWN]),
    }
}

/// A gateway's status document; asked again (up to 10 times) when a loaded
/// host makes the control socket's read time out.
fn status_of(lab: &crosslink::lab::Lab, gw: Gw) -> serde_json::Value {
    let mut last = None;
    for _ in 0..10 {
        match lab.poll(gw) {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("status of {gw}: {last:?}")
}
