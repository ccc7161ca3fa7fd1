//! `crosslink demo`: the newcomer's first run.
//!
//! Builds the throwaway namespace lab of [`crate::lab`], starts two crosslink gateways
//! (this very binary) with two paths between them, sends a 1000 packet/s UDP stream
//! from the client to the server, blackholes the active path, heals it, and prints a
//! timeline (its own actions, and every path state / active-path change seen by polling
//! both gateways' status every ~5 ms) with the loss window measured by the traffic
//! probe. Everything it made is removed at the end, on error, and on Ctrl-C / SIGTERM.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::lab::probe::parse_duration;
use crate::lab::{self, Gw, Lab, LabOptions, LabPath, StatusClient};

/// UDP port of the demo's traffic stream on the server.
const PROBE_PORT: u16 = 9000;
/// How often the timeline polls each gateway's status.
const POLL_EVERY: Duration = Duration::from_millis(5);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// BFD transmit and receive interval on both paths.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub tx_interval: Duration,
    /// BFD detection multiplier: a path is down after this many missed intervals.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..))]
    pub multiplier: u8,
    /// How long a recovered path must stay up before traffic returns to it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub revert_hold: Duration,
    /// Traffic rate, packets per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// How long path1 stays broken.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub outage: Duration,
    /// Break path1 by taking its link down instead of silently dropping its packets.
    #[arg(long)]
    pub link_down: bool,
    /// Carry on when a step does not happen in time, instead of stopping there.
    #[arg(long)]
    pub keep_going: bool,
    /// Keep the lab running at the end, until Ctrl-C, to look around in it.
    #[arg(long)]
    pub hold: bool,
}

/// Entry point of `crosslink demo`; returns the process exit code.
pub fn main(args: DemoArgs) -> i32 {
    if !lab::is_root() {
        eprintln!(
            "crosslink demo needs root: it creates network namespaces, veth links and TUN \
             devices.\nRun it as: sudo {} demo",
            std::env::current_exe().map_or("crosslink".into(), |p| p.display().to_string())
        );
        return 2;
    }
    if let Err(e) = lab::check_tools() {
        eprintln!("crosslink demo: {e} (e.g. apt-get install iproute2 nftables)");
        return 2;
    }
    let binary = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("crosslink demo: cannot find my own binary: {e}");
            return 2;
        }
    };
    let stop = match crate::lab::probe::stop_flag_on_signals() {
        Ok(flag) => flag,
        Err(e) => {
            eprintln!("crosslink demo: cannot install signal handlers: {e}");
            return 2;
        }
    };
    let mut demo = Demo::new(args, stop);
    let outcome = demo.run(binary);
    demo.finish(outcome)
}

/// Why the demo stopped early.
enum Halt {
    Interrupted,
    Failed(String),
    /// A gateway exited; the message already has its log.
    GatewayExited(String),
}

impl From<lab::LabError> for Halt {
    fn from(e: lab::LabError) -> Self {
        match e {
            lab::LabError::GatewayExited { .. } => Halt::GatewayExited(e.to_string()),
            _ => Halt::Failed(e.to_string()),
        }
    }
}

/// What the status poller has seen of one path of one gateway.
#[derive(Debug, Clone, PartialEq)]
struct PathView {
    state: String,
    active: bool,
    /// BFD state transitions so far: shows flaps quicker than the poll.
    transitions: u64,
}

fn path_view(status: &Value, path: LabPath) -> Option<PathView> {
    Some(PathView {
        state: lab::path_state(status, path)?,
        active: lab::path_active(status, path),
        transitions: lab::path_status(status, path)?
            .pointer("/bfd/transitions")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// The timeline and the poller's latest status, shared with the poller thread.
struct Timeline {
    t0: Instant,
    t0_unix_ms: f64,
    latest: Mutex<[Option<Value>; 2]>,
    marks: Mutex<Vec<(String, Duration)>>,
    halt: AtomicBool,
}

impl Timeline {
    fn at(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Prints one timeline line.
    fn event(&self, who: &str, text: &str) -> Duration {
        let at = self.at();
        println!("  t+{:>6} ms  {who:<6} {text}", at.as_millis());
        let _ = std::io::stdout().flush();
        at
    }

    /// Remembers when something happened, for the summary.
    fn mark(&self, key: &str, at: Duration) {
        if let Ok(mut marks) = self.marks.lock() {
            if !marks.iter().any(|(k, _)| k == key) {
                marks.push((key.to_string(), at));
            }
        }
    }

    fn mark_of(&self, key: &str) -> Option<Duration> {
        let marks = self.marks.lock().ok()?;
        marks.iter().find(|(k, _)| k == key).map(|(_, at)| *at)
    }

    fn latest(&self, gw: Gw) -> Option<Value> {
        let latest = self.latest.lock().ok()?;
        latest[gw_index(gw)].clone()
    }
}

fn gw_index(gw: Gw) -> usize {
    match gw {
        Gw::A => 0,
        Gw::B => 1,
    }
}

/// Polls both gateways every ~5 ms and prints each path state or active-path change.
fn poll_status(timeline: Arc<Timeline>, clients: [StatusClient; 2]) {
    let mut seen: [[Option<PathView>; 2]; 2] = Default::default();
    while !timeline.halt.load(Ordering::Relaxed) {
        for gw in Gw::ALL {
            let Ok(status) = clients[gw_index(gw)].poll() else {
                continue;
            };
            for (pi, path) in LabPath::ALL.into_iter().enumerate() {
                let Some(view) = path_view(&status, path) else {
                    continue;
                };
                let before = seen[gw_index(gw)][pi].replace(view.clone());
                report_change(&timeline, gw, path, before.as_ref(), &view, &status);
            }
            if let Ok(mut latest) = timeline.latest.lock() {
                latest[gw_index(gw)] = Some(status);
            }
        }
        std::thread::sleep(POLL_EVERY);
    }
}

fn report_change(
    timeline: &Timeline,
    gw: Gw,
    path: LabPath,
    before: Option<&PathView>,
    now: &PathView,
    status: &Value,
) {
    let Some(before) = before else {
        return;
    };
    if before.state != now.state {
        let diag = lab::path_status(status, path)
            .and_then(|p| p.pointer("/bfd/local_diag"))
            .and_then(Value::as_str)
            .filter(|d| *d != "none" && now.state != "up")
            .map(|d| format!(" (BFD diag: {d})"))
            .unwrap_or_default();
        let at = timeline.event(
            gw.name(),
            &format!("{path}: {} -> {}{diag}", before.state, now.state),
        );
        timeline.mark(&format!("{gw}:{path}:{}", now.state), at);
    } else if now.transitions > before.transitions {
        timeline.event(
            gw.name(),
            &format!(
                "{path}: flapped ({} BFD state changes between two polls, back to {})",
                now.transitions - before.transitions,
                now.state
            ),
        );
    }
    if !before.active && now.active {
        let at = timeline.event(gw.name(), &format!("traffic now on {path}"));
        timeline.mark(&format!("{gw}:{path}:active"), at);
    }
}

struct Demo {
    args: DemoArgs,
    stop: Arc<AtomicBool>,
    timeline: Arc<Timeline>,
    lab: Option<Lab>,
    poller: Option<std::thread::JoinHandle<()>>,
    report: Option<Value>,
    problems: Vec<String>,
}

impl Demo {
    fn new(args: DemoArgs, stop: Arc<AtomicBool>) -> Self {
        let t0_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        Demo {
            args,
            stop,
            timeline: Arc::new(Timeline {
                t0: Instant::now(),
                t0_unix_ms,
                latest: Mutex::new([None, None]),
                marks: Mutex::new(Vec::new()),
                halt: AtomicBool::new(false),
            }),
            lab: None,
            poller: None,
            report: None,
            problems: Vec::new(),
        }
    }

    fn detect_time(&self) -> Duration {
        self.args.tx_interval * u32::from(self.args.multiplier)
    }

    fn intro(&self) {
        let a = &self.args;
        println!("crosslink demo: two gateways, two paths, one failure.\n");
        println!("  client ── gw-a ══ path1 (priority 1, preferred) ══ gw-b ── server");
        println!("                 ══ path2 (priority 2, backup)    ══");
        println!(
            "\n  Each path is watched by BFD every {} x {}: a silent path is declared down \
             after {} ms.",
            lab::config_duration(a.tx_interval),
            a.multiplier,
            self.detect_time().as_millis()
        );
        println!(
            "  The client sends {} UDP packets/s to the server through the gateways; we \
             break path1,\n  watch traffic move to path2, heal path1, and see traffic return \
             after revert_hold = {}.\n",
            a.rate,
            lab::config_duration(a.revert_hold)
        );
    }

    /// Sleeps, waking early on Ctrl-C.
    fn sleep(&self, d: Duration) -> Result<(), Halt> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Halt::Interrupted);
            }
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(10)));
        }
        Ok(())
    }

    /// Waits until gateway A's status (as last polled) satisfies `cond`; a timeout is a
    /// problem, fatal unless --keep-going.
    fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Result<bool, Halt> {
        let end = Instant::now() + timeout;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Halt::Interrupted);
            }
            if self.timeline.latest(Gw::A).is_some_and(|s| cond(&s)) {
                return Ok(true);
            }
            if let Some(lab) = self.lab.as_mut() {
                lab.check_gateways()?;
            }
            if Instant::now() >= end {
                let problem = format!("{what} did not happen within {timeout:?}");
                if !self.args.keep_going {
                    return Err(Halt::Failed(problem));
                }
                self.timeline
                    .event("demo", &format!("!! {problem}; carrying on"));
                self.problems.push(problem);
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn lab(&mut self) -> Result<&mut Lab, Halt> {
        self.lab
            .as_mut()
            .ok_or_else(|| Halt::Failed("the lab is gone".into()))
    }

    fn run(&mut self, binary: std::path::PathBuf) -> Result<(), Halt> {
        self.intro();
        let tl = self.timeline.clone();
        let mut opts = LabOptions::new("demo", binary);
        opts.tx_interval = self.args.tx_interval;
        opts.rx_interval = self.args.tx_interval;
        opts.multiplier = self.args.multiplier;
        opts.revert_hold = self.args.revert_hold;
        opts.bind_interfaces = self.args.link_down;
        let lab = Lab::new(opts)?;
        tl.event(
            "demo",
            &format!(
                "lab built: namespaces {}{{c,a,b,s}}, files in {}",
                lab.ns(lab::Host::Client).trim_end_matches('c'),
                lab.dir().display()
            ),
        );
        self.lab = Some(lab);
        self.sleep(Duration::ZERO)?;
        self.lab()?.start_gateways()?;
        tl.event("demo", "started crosslink on gw-a and gw-b");
        self.wait_up()?;
        tl.event("demo", "BFD is up on both paths; gw-a sends on path1");
        self.start_poller()?;

        let total = self.args.outage + self.args.revert_hold + Duration::from_secs(30);
        let rate = self.args.rate;
        let lab = self.lab()?;
        let receiver = lab.start_receiver(PROBE_PORT, total)?;
        let sender = lab.start_sender(PROBE_PORT, rate, total)?;
        tl.event(
            "demo",
            &format!(
                "traffic started: client -> server, {} packets/s",
                self.args.rate
            ),
        );
        self.sleep(Duration::from_secs(2))?;

        let cut = self.break_path()?;
        let detect = self.detect_time();
        self.expect(
            "failover to path2",
            detect * 10 + Duration::from_secs(2),
            |s| {
                lab::path_state(s, LabPath::Path1).as_deref() != Some("up")
                    && lab::path_active(s, LabPath::Path2)
            },
        )?;
        self.sleep((cut + self.args.outage).saturating_sub(tl.at()))?;

        self.heal_path()?;
        self.expect("path1 back up", Duration::from_secs(5), |s| {
            lab::path_state(s, LabPath::Path1).as_deref() == Some("up")
        })?;
        self.expect(
            "revert to path1",
            self.args.revert_hold + Duration::from_secs(5),
            |s| lab::path_active(s, LabPath::Path1),
        )?;
        self.sleep(Duration::from_secs(1))?;

        let _ = sender.stop();
        tl.event("demo", "traffic stopped");
        self.report = Some(receiver.finish(Duration::from_secs(3))?);
        Ok(())
    }

    fn wait_up(&mut self) -> Result<(), Halt> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            self.sleep(Duration::from_millis(20))?;
            let lab = self.lab()?;
            lab.check_gateways()?;
            let up = Gw::ALL.iter().all(|gw| {
                lab.poll(*gw).is_ok_and(|s| {
                    LabPath::ALL
                        .iter()
                        .all(|p| lab::path_state(&s, *p).as_deref() == Some("up"))
                        && lab::path_active(&s, LabPath::Path1)
                })
            });
            if up {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(Halt::Failed(
                    "BFD did not come up on both paths within 15 s".into(),
                ));
            }
        }
    }

    fn start_poller(&mut self) -> Result<(), Halt> {
        let lab = self.lab()?;
        let clients = [lab.status_client(Gw::A), lab.status_client(Gw::B)];
        let tl = self.timeline.clone();
        let handle = std::thread::Builder::new()
            .name("status-poller".into())
            .spawn(move || poll_status(tl, clients))
            .map_err(|e| Halt::Failed(format!("cannot start the status poller: {e}")))?;
        self.poller = Some(handle);
        // Let the poller see the starting state, so later changes are reported.
        let end = Instant::now() + Duration::from_secs(2);
        while self.timeline.latest(Gw::A).is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn break_path(&mut self) -> Result<Duration, Halt> {
        let link_down = self.args.link_down;
        let lab = self.lab()?;
        let (result, text) = if link_down {
            (lab.link_down(LabPath::Path1), "path1 link set down on gw-a")
        } else {
            (
                lab.blackhole(LabPath::Path1),
                "path1 cut: gw-a now drops every packet on it (link stays up)",
            )
        };
        result?;
        let at = self.timeline.event("demo", &format!(">> {text}"));
        self.timeline.mark("cut", at);
        Ok(at)
    }

    fn heal_path(&mut self) -> Result<(), Halt> {
        let link_down = self.args.link_down;
        let lab = self.lab()?;
        if link_down {
            lab.link_up(LabPath::Path1)?;
        } else {
            lab.heal(LabPath::Path1)?;
        }
        let at = self.timeline.event("demo", ">> path1 healed");
        self.timeline.mark("heal", at);
        Ok(())
    }

    fn summary(&self) {
        let tl = &self.timeline;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("\nWhat happened");
        if let (Some(cut), Some(down)) = (tl.mark_of("cut"), tl.mark_of("gw-a:path1:down")) {
            println!(
                "  gw-a declared path1 down {:.0} ms after the cut (BFD detection time {} ms; \
                 status polled every ~{} ms)",
                ms(down.saturating_sub(cut)),
                self.detect_time().as_millis(),
                POLL_EVERY.as_millis()
            );
        }
        if let (Some(cut), Some(moved)) = (tl.mark_of("cut"), tl.mark_of("gw-a:path2:active")) {
            println!(
                "  traffic moved to path2 {:.0} ms after the cut",
                ms(moved.saturating_sub(cut))
            );
        }
        if let (Some(up), Some(back)) =
            (tl.mark_of("gw-a:path1:up"), tl.mark_of("gw-a:path1:active"))
        {
            println!(
                "  path1 came back; traffic returned to it {:.1} s later (revert_hold {})",
                back.saturating_sub(up).as_secs_f64(),
                lab::config_duration(self.args.revert_hold)
            );
        }
        if let Some(r) = &self.report {
            self.print_loss(r);
        }
    }

    fn print_loss(&self, r: &Value) {
        let num = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let start = r.get("longest_outage_start_ms").and_then(Value::as_f64);
        let first = r.get("first_packet_unix_ms").and_then(Value::as_f64);
        let when = match (start, first) {
            (Some(s), Some(f)) => {
                format!(", starting at t+{:.0} ms", f - self.timeline.t0_unix_ms + s)
            }
            _ => String::new(),
        };
        println!(
            "  loss window: {:.0} ms (longest run of lost packets{when})",
            num("longest_outage_ms")
        );
        println!(
            "  packets: {:.0} sent, {:.0} received, {:.0} lost, {:.0} reordered, {:.0} duplicated; \
             largest gap between arrivals {:.1} ms",
            num("sent"),
            num("received"),
            num("lost"),
            num("reordered"),
            num("duplicates"),
            num("max_gap_ms")
        );
    }

    fn finish(&mut self, outcome: Result<(), Halt>) -> i32 {
        self.timeline.halt.store(true, Ordering::Relaxed);
        if let Some(handle) = self.poller.take() {
            let _ = handle.join();
        }
        let mut code = 0;
        match &outcome {
            Ok(()) => self.summary(),
            Err(Halt::Interrupted) => {
                println!("\ninterrupted: cleaning up");
                code = 130;
            }
            Err(Halt::Failed(why)) => {
                println!("\nThe demo stopped: {why}");
                if let Some(lab) = &self.lab {
                    for gw in Gw::ALL {
                        let tail = lab.log_tail(gw, 15);
                        if !tail.is_empty() {
                            println!("\n  last lines of {gw}'s log:\n{tail}");
                        }
                    }
                }
                code = 1;
            }
            Err(Halt::GatewayExited(why)) => {
                println!("\nThe demo stopped: {why}");
                code = 1;
            }
        }
        if !self.problems.is_empty() {
            println!("\nProblems:");
            for p in &self.problems {
                println!("  - {p}");
            }
            code = 1;
        }
        if self.args.hold && outcome.is_ok() {
            self.hold();
        }
        if let Some(lab) = self.lab.take() {
            drop(lab);
            println!("\nlab removed (namespaces, links, gateways, temp files).");
        }
        code
    }

    fn hold(&self) {
        let Some(lab) = &self.lab else {
            return;
        };
        let exe = std::env::current_exe().map_or("crosslink".into(), |p| p.display().to_string());
        println!("\nThe lab is still running. Try, in another shell:");
        println!("  {exe} status -s {}", lab.socket_path(Gw::A).display());
        println!("  ip netns exec {} ip route", lab.ns(lab::Host::GwA));
        println!("  less {}", lab.log_path(Gw::A).display());
        println!("Press Ctrl-C to remove it.");
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
