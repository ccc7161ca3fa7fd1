//! The BFD core's own cost at scale: two gateways' engines (`core::engine`)
//! with N peers of two paths each, BFD 10 ms x 3, joined in memory with a
//! fixed 200 µs one-way latency, driven by a virtual clock in steps of
//! 500 µs (the BFD thread wakes at most once per 500 µs at scale, so each
//! step's due sessions are handled together, as there). No kernel, no
//! sockets: what it measures is crosslink's own work per control packet
//! (timers and their deadline structure, the state machine, building the
//! packets, the offload's arming), the part the scale bench's profile puts
//! at about a quarter of the BFD thread. With the receive offload (the
//! default) the far side's kernel takes the repeats, as the simulated
//! network of `tests/sim.rs` does; `--no-offload` gives every packet to
//! the engine.
//!
//! Each run brings every session Up, waits 5 simulated seconds, then
//! measures `--secs` simulated seconds: the thread CPU time both engines
//! took, per gateway as a share of one core at real time, and per control
//! packet sent. A session that goes down from Up at any time, start-up
//! included, fails the run (the in-memory network loses nothing, so any
//! down is the core's fault).
//! Prints the median of `--runs` runs.
//!
//! Usage: `cargo bench --bench bfd_core -- [--peers 500] [--secs 10]
//! [--runs 5] [--no-offload]`. Under `cargo test --all-targets` (no
//! `--bench` argument) it does nothing.

use crosslink::config::Config;
use crosslink::core::bfd::State;
use crosslink::core::engine::{Engine, Event, OffloadChange};
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_micros(500);
const LATENCY: Duration = Duration::from_micros(200);

/// Gateway `side`'s (1 or 2) address of peer `i` on path `p` (0 or 1):
/// one /30 per peer and path in 198.19.0.0/16.
fn addr(side: u8, i: usize, p: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 19, if p == 0 { 0 } else { 128 }, 0));
    Ipv4Addr::from(base + 4 * i as u32 + u32::from(side))
}

fn config(side: u8, peers: usize, offload: bool) -> Config {
    let mut t = format!(
        "[gateway]\nname = \"gw{side}\"\ncontrol_socket = \"/nonexistent/gw{side}.sock\"\n\n\
         [bfd]\ntx_interval = \"10ms\"\nrx_interval = \"10ms\"\nmultiplier = 3\n\
         offload = {offload}\n"
    );
    for i in 0..peers {
        t.push_str(&format!(
            "\n[[peer]]\nname = \"p{i}\"\ntun = \"xl{i}\"\n  [peer.sla]\n  idle_probe_interval = \"1s\"\n"
        ));
        for p in 0..2 {
            t.push_str(&format!(
                "  [[peer.path]]\n  name = \"l{p}\"\n  local = \"{}:4800\"\n  remote = \"{}:4800\"\n  priority = {}\n",
                addr(side, i, p),
                addr(3 - side, i, p),
                p + 1
            ));
        }
    }
    Config::parse(&t, "bench").expect("bench config is valid")
}

/// One path's simulated receive offload: the packet it takes repeats of,
/// when it took the last, and how many the engine has not been told of.
#[derive(Clone, Copy, Default)]
struct Taken {
    packet: Option<[u8; 24]>,
    last: Option<Instant>,
    pending: u64,
}

struct Gateway {
    side: u8,
    engine: Engine,
    kernel: Vec<Taken>,
    /// Control packets on their way to this gateway: (arrival, path, bytes).
    inbound: VecDeque<(Instant, u16, Vec<u8>)>,
    sent: u64,
    downs: u64,
    up: usize,
}

impl Gateway {
    fn new(side: u8, peers: usize, offload: bool, t0: Instant) -> Gateway {
        Gateway {
            side,
            engine: Engine::new(&config(side, peers, offload), t0, u64::from(side)),
            kernel: vec![Taken::default(); 2 * peers],
            inbound: VecDeque::new(),
            sent: 0,
            downs: 0,
            up: 0,
        }
    }

    /// What the engine asks of its offload, as the BFD thread applies it.
    fn apply_offload(&mut self) {
        while let Some(change) = self.engine.poll_offload() {
            let k = &mut self.kernel[usize::from(change.path().0)];
            if k.pending > 0 {
                self.engine
                    .handle_bfd_refresh(change.path(), None, std::mem::take(&mut k.pending));
            }
            *k = match change {
                OffloadChange::Arm { packet, .. } => Taken {
                    packet: Some(packet),
                    ..Taken::default()
                },
                OffloadChange::Disarm(_) => Taken::default(),
            };
        }
    }

    /// One wake-up of the BFD thread at `now`: what arrived, the timers,
    /// the offload's answers; returns what it sends.
    fn step(&mut self, now: Instant, out: &mut Vec<(u16, Vec<u8>)>) {
        while self.inbound.front().is_some_and(|m| m.0 <= now) {
            let Some((_, path, bytes)) = self.inbound.pop_front() else {
                break;
            };
            let k = &mut self.kernel[usize::from(path)];
            if k.packet.is_some_and(|p| p[..] == bytes[..]) {
                k.last = Some(now);
                k.pending += 1;
                continue;
            }
            let (i, p) = (usize::from(path) / 2, usize::from(path) % 2);
            let local = IpAddr::V4(addr(self.side, i, p));
            let src = SocketAddr::new(IpAddr::V4(addr(3 - self.side, i, p)), 49152);
            let _ = self
                .engine
                .handle_bfd_datagram(local, src, Some(255), &bytes, now);
            self.apply_offload();
        }
        self.engine.handle_timeout(now);
        let mut asked = false;
        while let Some(id) = self.engine.poll_refresh() {
            asked = true;
            let k = &mut self.kernel[usize::from(id.0)];
            let new = std::mem::take(&mut k.pending);
            self.engine.handle_bfd_refresh(id, k.last, new);
        }
        if asked {
            self.engine.handle_timeout(now);
        }
        self.apply_offload();
        while let Some((id, pkt)) = self.engine.poll_transmit(now) {
            if let Ok(pkt) = pkt {
                out.push((id.0, pkt.as_bytes().to_vec()));
                self.sent += 1;
            }
        }
        while let Some(ev) = self.engine.poll_event() {
            if let Event::PathState {
                from,
                to,
                administrative: false,
                ..
            } = ev
            {
                if to == State::Up {
                    self.up += 1;
                } else if from == State::Up {
                    self.up -= 1;
                    self.downs += 1;
                }
            }
        }
        while self.engine.poll_forwarding().is_some() {}
    }
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Run {
    /// Per gateway, share of a core at real time.
    core_share: f64,
    ns_per_packet: f64,
    packets_per_s: f64,
    downs: u64,
}

fn run(peers: usize, secs: u64, offload: bool) -> Result<Run, String> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut gw = [
        Gateway::new(1, peers, offload, t0),
        Gateway::new(2, peers, offload, t0),
    ];
    let mut out = Vec::new();
    let mut step = |gw: &mut [Gateway; 2], now: Instant| {
        for s in 0..2 {
            out.clear();
            gw[s].step(now, &mut out);
            let other = &mut gw[1 - s];
            for (path, bytes) in out.drain(..) {
                other.inbound.push_back((now + LATENCY, path, bytes));
            }
        }
    };
    let sessions = 2 * peers;
    let limit = now + Duration::from_secs(30);
    while gw.iter().any(|g| g.up < sessions) {
        if now > limit {
            return Err(format!(
                "sessions Up after 30 s: {} and {} of {sessions}",
                gw[0].up, gw[1].up
            ));
        }
        now += STEP;
        step(&mut gw, now);
    }
    let settle = now + Duration::from_secs(5);
    while now < settle {
        now += STEP;
        step(&mut gw, now);
    }
    let sent0 = gw[0].sent + gw[1].sent;
    let end = now + Duration::from_secs(secs);
    let cpu0 = thread_cpu();
    while now < end {
        now += STEP;
        step(&mut gw, now);
    }
    let cpu = thread_cpu().saturating_sub(cpu0).as_secs_f64();
    let sent = (gw[0].sent + gw[1].sent - sent0) as f64;
    Ok(Run {
        core_share: cpu / 2.0 / secs as f64,
        ns_per_packet: cpu * 1e9 / sent.max(1.0),
        packets_per_s: sent / 2.0 / secs as f64,
        downs: gw[0].downs + gw[1].downs,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let value = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let peers = value("--peers", 500) as usize;
    let secs = value("--secs", 10).max(1);
    let runs = value("--runs", 5).max(1);
    let offload = !args.iter().any(|a| a == "--no-offload");
    let mut results = Vec::new();
    for _ in 0..runs {
        match run(peers, secs, offload) {
            Ok(r) if r.downs == 0 => results.push(r),
            Ok(r) => {
                eprintln!("bfd_core: {} sessions went down", r.downs);
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("bfd_core: {e}");
                std::process::exit(1);
            }
        }
    }
    let share = median(results.iter().map(|r| r.core_share).collect());
    let per = median(results.iter().map(|r| r.ns_per_packet).collect());
    let pps = median(results.iter().map(|r| r.packets_per_s).collect());
    println!(
        "bfd_core N={peers} ({} sessions per gateway, BFD 10 ms x 3, offload {offload}): \
         {:.1} % of a core per gateway, {per:.0} ns per control packet sent \
         ({pps:.0} packets/s per gateway; median of {runs} runs of {secs} simulated s; \
         runs: {})",
        2 * peers,
        share * 100.0,
        results
            .iter()
            .map(|r| format!("{:.1}", r.core_share * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
