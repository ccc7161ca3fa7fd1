//! BFD interoperability with the routers operators already run: FRRouting's bfdd
//! (Debian `frr`) and BIRD 2 (Debian `bird2`).
//!
//! Each test builds two network namespaces joined by a veth pair:
//!
//! ```text
//!  xl-<tag>-<pid>-x (crosslink) 198.18.41.1/30 ── v0 ── 198.18.41.2/30 xl-<tag>-<pid>-r (router)
//! ```
//!
//! crosslink runs with one peer whose only path's remote is the router: the router is a
//! BFD-only endpoint (no data plane needed). The router runs from a private temp dir
//! (its own config, pid file, vty/control socket), never the system's /etc/frr or
//! running services. Every check of "Up" is made from the router's own view
//! (`vtysh -c 'show bfd peers json'`, `birdc show bfd sessions`) as well as
//! crosslink's status.
//!
//! Root-only: without root the tests print a skip line and pass, unless
//! `CROSSLINK_NETNS_REQUIRED=1`, where that is a failure (as in `.ci/run`). Timing bounds
//! are generous (a loaded 2-core machine); measured figures are printed as `REPORT`
//! lines.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crosslink::lab;
use crosslink::telemetry::control::request_status;
use crosslink::telemetry::status::{BfdStatus, Status};

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const XL_ADDR: &str = "198.18.41.1";
const PEER_ADDR: &str = "198.18.41.2";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const FRR_TOOLS: [(&str, &str); 2] = [("/usr/lib/frr/bfdd", "frr"), ("/usr/bin/vtysh", "frr")];
const BIRD_TOOLS: [(&str, &str); 2] = [("/usr/sbin/bird", "bird2"), ("/usr/sbin/birdc", "bird2")];

fn run(cmd: &mut Command) -> String {
    lab::run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

// ----- topology and crosslink -----

/// Crosslink's side of a test: its BFD settings.
#[derive(Clone)]
struct XlBfd {
    interval_ms: u64,
    multiplier: u8,
    /// (type, key id, secret)
    auth: Option<(&'static str, u8, &'static str)>,
    multihop: bool,
    passive: bool,
}

impl XlBfd {
    fn plain(interval_ms: u64) -> XlBfd {
        XlBfd {
            interval_ms,
            multiplier: 3,
            auth: None,
            multihop: false,
            passive: false,
        }
    }
}

struct Topo {
    tag: String,
    dir: PathBuf,
    crosslink: Option<Child>,
    router: Option<Child>,
    namespaces: Vec<String>,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let pid = std::process::id();
        let tag = format!("xl-{tag}-{pid}");
        let dir = std::env::temp_dir().join(&tag);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // The router daemons drop privileges (bfdd runs as `frr`): let them in.
        run(Command::new("chmod").arg("0777").arg(&dir));
        let mut topo = Topo {
            tag,
            dir,
            crosslink: None,
            router: None,
            namespaces: Vec::new(),
        };
        for side in ["x", "r"] {
            let ns = format!("{}-{side}", topo.tag);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run(Command::new("ip").args(["netns", "add", &ns]));
            topo.namespaces.push(ns);
        }
        let (x, r) = (topo.ns("x"), topo.ns("r"));
        run(Command::new("ip").args([
            "-n", &x, "link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns", &r,
        ]));
        for (ns, addr) in [(&x, XL_ADDR), (&r, PEER_ADDR)] {
            run(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                "v0",
            ]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "v0", "up"]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        }
        topo
    }

    fn ns(&self, side: &str) -> String {
        format!("{}-{side}", self.tag)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn in_ns(&self, side: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(side), program]);
        cmd
    }

    fn xl_config(&self, b: &XlBfd) -> String {
        let mut bfd = format!(
            "tx_interval = \"{i}ms\"\nrx_interval = \"{i}ms\"\nmultiplier = {m}\n",
            i = b.interval_ms,
            m = b.multiplier
        );
        if let Some((kind, id, secret)) = b.auth {
            let file = self.path("xl.secret");
            fs::write(&file, format!("{secret}\n")).unwrap();
            bfd.push_str(&format!(
                "auth = {{ type = \"{kind}\", key_id = {id}, secret_file = \"{}\" }}\n",
                file.display()
            ));
        }
        if b.multihop {
            bfd.push_str("hop = \"multi\"\nmin_ttl = 250\n");
        }
        if b.passive {
            bfd.push_str("passive = true\n");
        }
        format!(
            "[gateway]\nname = \"xl\"\ncontrol_socket = \"{sock}\"\n\n[bfd]\n{bfd}\n\
             [[peer]]\nname = \"router\"\ntun = \"xl-r\"\ntun_addresses = [\"198.18.99.1/30\"]\n\
             routes = [\"198.18.98.0/24\"]\n\n  [[peer.path]]\n  name = \"p1\"\n  \
             local = \"{XL_ADDR}:4800\"\n  remote = \"{PEER_ADDR}:4800\"\n",
            sock = self.path("xl.sock").display(),
        )
    }

    fn start_crosslink(&mut self, b: &XlBfd) {
        let conf = self.path("xl.toml");
        fs::write(&conf, self.xl_config(b)).unwrap();
        let log = fs::File::create(self.path("xl.log")).unwrap();
        let child = self
            .in_ns("x", BIN)
            .args(["run", "-c"])
            .arg(&conf)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.crosslink = Some(child);
        self.wait("crosslink control socket", ms(10_000), |t| {
            request_status(&t.path("xl.sock")).is_ok()
        });
    }

    /// Rewrites crosslink's config with new timers and sends SIGHUP (reload applies
    /// BFD timers in place).
    fn reload_crosslink(&self, b: &XlBfd) {
        fs::write(self.path("xl.toml"), self.xl_config(b)).unwrap();
        let pid = self.crosslink.as_ref().unwrap().id();
        assert!(lab::signal_pid(pid, "HUP"));
    }

    fn xl_log(&self) -> String {
        fs::read_to_string(self.path("xl.log")).unwrap_or_default()
    }

    /// crosslink's log once it has `needle` (its lines land from a writer thread).
    fn xl_log_with(&self, needle: &str) -> String {
        lab::wait_log(&self.path("xl.log"), needle, Duration::from_secs(3))
    }

    fn xl(&self) -> BfdStatus {
        self.xl_status().peers[0].paths[0].bfd.clone()
    }

    fn xl_status(&self) -> Status {
        request_status(&self.path("xl.sock"))
            .unwrap_or_else(|e| panic!("status: {e}\ncrosslink log:\n{}", self.xl_log()))
    }

    fn wait(&self, what: &str, timeout: Duration, cond: impl Fn(&Topo) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if cond(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{what}: not within {timeout:?}\ncrosslink log:\n{}\nrouter log:\n{}",
                self.xl_log(),
                fs::read_to_string(self.path("router.log")).unwrap_or_default()
            );
            std::thread::sleep(ms(5));
        }
    }

    fn stop_router_hard(&mut self) {
        if let Some(mut c) = self.router.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        if let Some(mut c) = self.crosslink.take() {
            let _ = lab::terminate(&mut c, Duration::from_secs(3));
        }
        self.stop_router_hard();
        for ns in &self.namespaces {
            // Whatever still runs in the namespace (router helpers) goes with it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::env::var_os("CROSSLINK_KEEP_INTEROP_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ----- FRR -----

struct Frr;

impl Frr {
    fn peer_line(multihop: bool) -> String {
        if multihop {
            format!("peer {XL_ADDR} multihop local-address {PEER_ADDR}")
        } else {
            format!("peer {XL_ADDR} local-address {PEER_ADDR}")
        }
    }

    fn start(t: &mut Topo, interval_ms: u64, multihop: bool, passive: bool) {
        let conf = format!(
            "bfd\n {}\n  receive-interval {interval_ms}\n  transmit-interval {interval_ms}\n  \
             detect-multiplier 3\n{}  no shutdown\n !\n!\n",
            Frr::peer_line(multihop),
            if passive { "  passive-mode\n" } else { "" }
        );
        let file = t.path("bfdd.conf");
        fs::write(&file, conf).unwrap();
        let log = fs::File::create(t.path("router.log")).unwrap();
        let dir = t.dir.display().to_string();
        let child = t
            .in_ns("r", "/usr/lib/frr/bfdd")
            .arg("-f")
            .arg(&file)
            .args(["-i", &format!("{dir}/bfdd.pid"), "--vty_socket", &dir])
            .args(["-z", &format!("{dir}/zserv.api"), "--bfdctl"])
            .arg(format!("{dir}/bfdd.sock"))
            .args(["-P", "0", "-u", "frr", "-g", "frr", "--log", "stdout"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        t.router = Some(child);
        t.wait("bfdd vty socket", ms(10_000), |t| {
            t.path("bfdd.vty").exists()
        });
    }

    fn vtysh(t: &Topo, cmds: &[&str]) -> String {
        let mut cmd = t.in_ns("r", "vtysh");
        cmd.arg("--vty_socket").arg(&t.dir).args(["-d", "bfdd"]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        run(&mut cmd)
    }

    fn configure(t: &Topo, multihop: bool, lines: &[&str]) {
        let peer = Frr::peer_line(multihop);
        let mut cmds = vec!["configure terminal", "bfd", peer.as_str()];
        cmds.extend_from_slice(lines);
        Frr::vtysh(t, &cmds);
    }

    /// The peer entry for crosslink from `show bfd peers json`.
    fn peer(t: &Topo) -> serde_json::Value {
        let out = Frr::vtysh(t, &["show bfd peers json"]);
        let all: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        all.as_array()
            .and_then(|a| a.iter().find(|p| p["peer"] == XL_ADDR).cloned())
            .unwrap_or_default()
    }
}

// ----- BIRD -----

struct Bird;

impl Bird {
    fn conf(interval_ms: u64, auth: Option<(&str, u8, &str)>, multihop: bool) -> String {
        let auth = match auth {
            Some((kind, id, secret)) => {
                format!("    authentication {kind};\n    password \"{secret}\" {{ id {id}; }};\n")
            }
            None => String::new(),
        };
        let (block, neighbor) = if multihop {
            (
                "multihop",
                format!("neighbor {XL_ADDR} local {PEER_ADDR} multihop yes;"),
            )
        } else {
            (
                "interface \"v0\"",
                format!("neighbor {XL_ADDR} local {PEER_ADDR};"),
            )
        };
        format!(
            "router id {PEER_ADDR};\nprotocol device {{}}\nprotocol bfd bfd1 {{\n  {block} {{\n    \
             interval {interval_ms} ms;\n    multiplier 3;\n{auth}  }};\n  {neighbor}\n}}\n"
        )
    }

    fn start(t: &mut Topo, conf: &str) {
        let file = t.path("bird.conf");
        fs::write(&file, conf).unwrap();
        let log = fs::File::create(t.path("router.log")).unwrap();
        let child = t
            .in_ns("r", "/usr/sbin/bird")
            .arg("-f")
            .arg("-c")
            .arg(&file)
            .arg("-s")
            .arg(t.path("bird.ctl"))
            .arg("-P")
            .arg(t.path("bird.pid"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        t.router = Some(child);
        t.wait("bird control socket", ms(10_000), |t| {
            Bird::birdc_try(t, &["show", "status"]).is_some()
        });
    }

    fn birdc_try(t: &Topo, args: &[&str]) -> Option<String> {
        lab::run(
            t.in_ns("r", "birdc")
                .arg("-s")
                .arg(t.path("bird.ctl"))
                .args(args),
        )
        .ok()
    }

    fn birdc(t: &Topo, args: &[&str]) -> String {
        Bird::birdc_try(t, args).unwrap_or_else(|| panic!("birdc {args:?} failed"))
    }

    /// (state, interval in ms) of crosslink's session in `show bfd sessions`.
    fn session(t: &Topo) -> Option<(String, f64)> {
        let out = Bird::birdc_try(t, &["show", "bfd", "sessions"])?;
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [ip, _iface, state, _since, interval, ..] if *ip == XL_ADDR => {
                    Some((state.to_string(), interval.parse::<f64>().ok()? * 1e3))
                }
                _ => None,
            }
        })
    }

    fn reconfigure(t: &Topo, conf: &str) {
        fs::write(t.path("bird.conf"), conf).unwrap();
        let out = Bird::birdc(t, &["configure"]);
        assert!(out.contains("Reconfigured"), "{out}");
    }
}

// ----- shared checks -----

fn xl_up(t: &Topo) -> bool {
    let b = t.xl();
    b.local_state == "up" && b.remote_state == "up"
}

/// Stops the router hard (SIGKILL: no AdminDown) and checks crosslink's path goes
/// down within a generous bound of the detection time, counted as a failure.
fn check_stop(t: &mut Topo, who: &str) {
    let before = t.xl();
    let detect = Duration::from_micros(before.detect_time_us);
    t.stop_router_hard();
    let took = t.wait(
        "crosslink path down after the router stopped",
        detect + ms(2000),
        |t| t.xl().local_state == "down",
    );
    let after = t.xl();
    assert_eq!(after.local_diag, "control_detection_expired");
    assert_eq!(after.failures, before.failures + 1);
    let log = t.xl_log_with("failover");
    let detection = log
        .lines()
        .rev()
        .find(|l| l.contains("failover"))
        .and_then(|l| l.split("detection_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    lab::say(&format!(
        "REPORT interop {who}: peer stopped -> crosslink path down after {took:?} as seen \
         by polling (detection time {detect:?}, crosslink's own detection_ms={detection})"
    ));
}

// ----- FRR tests -----

fn frr_scenario(interval_ms: u64) {
    let _g = serial();
    let who = format!("frr {interval_ms}ms x3");
    let mut t = Topo::new(&format!("frr{interval_ms}"));
    Frr::start(&mut t, interval_ms, false, false);
    t.start_crosslink(&XlBfd::plain(interval_ms));
    let up = t.wait("Up on both sides", ms(10_000), |t| {
        xl_up(t) && Frr::peer(t)["status"] == "up"
    });
    let peer = Frr::peer(&t);
    let xl = t.xl();
    assert_eq!(peer["remote-id"], xl.local_discriminator, "{peer}");
    assert_eq!(peer["id"], xl.remote_discriminator, "{peer}");
    assert_eq!(xl.tx_interval_us, interval_ms * 1000);
    lab::say(&format!(
        "REPORT interop {who}: Up on both sides after {up:?} (FRR view: {})",
        peer["status"]
    ));

    // A timer change on FRR's side: a Poll Sequence, no flap.
    let new = interval_ms * 2;
    let before = t.xl();
    Frr::configure(
        &t,
        false,
        &[
            &format!("transmit-interval {new}"),
            &format!("receive-interval {new}"),
        ],
    );
    t.wait("crosslink follows FRR's new timers", ms(5000), |t| {
        t.xl().tx_interval_us == new * 1000 && t.xl().detect_time_us == 3 * new * 1000
    });
    std::thread::sleep(ms(3 * new));
    let after = t.xl();
    assert_eq!(
        after.transitions, before.transitions,
        "flap on FRR's timer change"
    );
    assert_eq!(Frr::peer(&t)["status"], "up");

    // A timer change on crosslink's side (SIGHUP reload): FRR sees it, no flap.
    let mut b = XlBfd::plain(interval_ms);
    b.interval_ms = interval_ms * 3 / 2;
    t.reload_crosslink(&b);
    t.wait("FRR sees crosslink's new timers", ms(5000), |t| {
        Frr::peer(t)["remote-transmit-interval"] == b.interval_ms
            && Frr::peer(t)["remote-receive-interval"] == b.interval_ms
    });
    std::thread::sleep(ms(3 * new));
    assert_eq!(
        t.xl().transitions,
        before.transitions,
        "flap on our timer change"
    );
    assert_eq!(Frr::peer(&t)["status"], "up");
    assert!(t
        .xl_log_with("BFD timers applied with a poll sequence")
        .contains("BFD timers applied with a poll sequence"));
    lab::say(&format!("REPORT interop {who}: timer changes on both sides via poll/final, no flap (transitions {})", before.transitions));

    // FRR's AdminDown: out of service, not a failure.
    let before = t.xl();
    Frr::configure(&t, false, &["shutdown"]);
    let took = t.wait("path down after FRR shutdown", ms(3000), |t| {
        t.xl().local_state == "down"
    });
    let after = t.xl();
    assert_eq!(
        after.failures, before.failures,
        "AdminDown counted as a failure"
    );
    assert_eq!(after.remote_admin_downs, before.remote_admin_downs + 1);
    assert!(!t.xl_status().peers[0].paths[0].active);
    assert!(t
        .xl_log_with("administrative, not a failure")
        .contains("administrative, not a failure"));
    lab::say(&format!("REPORT interop {who}: FRR shutdown (AdminDown) -> path down in {took:?}, failures unchanged ({})", after.failures));
    Frr::configure(&t, false, &["no shutdown"]);
    t.wait("Up again after no shutdown", ms(10_000), |t| {
        xl_up(t) && Frr::peer(t)["status"] == "up"
    });

    check_stop(&mut t, &who);
}

#[test]
fn frr_20ms() {
    if lab::test_gate("frr_20ms", &FRR_TOOLS) {
        frr_scenario(20);
    }
}

#[test]
fn frr_300ms() {
    if lab::test_gate("frr_300ms", &FRR_TOOLS) {
        frr_scenario(300);
    }
}

/// RFC 5883 multihop (UDP 4784) with crosslink passive: FRR starts the session.
#[test]
fn frr_multihop_with_crosslink_passive() {
    if !lab::test_gate("frr_multihop_with_crosslink_passive", &FRR_TOOLS) {
        return;
    }
    let _g = serial();
    let mut t = Topo::new("frrmh");
    let mut b = XlBfd::plain(50);
    b.multihop = true;
    b.passive = true;
    Frr::start(&mut t, 50, true, false);
    t.start_crosslink(&b);
    let up = t.wait("multihop Up on both sides", ms(10_000), |t| {
        xl_up(t) && Frr::peer(t)["status"] == "up"
    });
    assert_eq!(Frr::peer(&t)["multihop"], true);
    lab::say(&format!(
        "REPORT interop frr multihop 50ms x3, crosslink passive: Up after {up:?}"
    ));
    check_stop(&mut t, "frr multihop 50ms x3");
}

/// A passive crosslink and a passive FRR never start a session (§6.1): nobody speaks.
#[test]
fn passive_waits_for_the_peer() {
    if !lab::test_gate("passive_waits_for_the_peer", &FRR_TOOLS) {
        return;
    }
    let _g = serial();
    let mut t = Topo::new("frrpas");
    let mut b = XlBfd::plain(50);
    b.passive = true;
    Frr::start(&mut t, 50, false, true);
    t.start_crosslink(&b);
    std::thread::sleep(ms(2500));
    assert_eq!(t.xl().control_tx, 0, "passive crosslink transmitted first");
    assert_ne!(Frr::peer(&t)["status"], "up");
    // FRR turns active: the session comes up.
    Frr::configure(&t, false, &["no passive-mode"]);
    t.wait("Up once FRR is active", ms(10_000), |t| {
        xl_up(t) && Frr::peer(t)["status"] == "up"
    });
}

// ----- BIRD tests -----

fn bird_scenario(interval_ms: u64) {
    let _g = serial();
    let who = format!("bird {interval_ms}ms x3");
    let mut t = Topo::new(&format!("bird{interval_ms}"));
    Bird::start(&mut t, &Bird::conf(interval_ms, None, false));
    t.start_crosslink(&XlBfd::plain(interval_ms));
    let up = t.wait("Up on both sides", ms(10_000), |t| {
        xl_up(t) && Bird::session(t).is_some_and(|(s, _)| s == "Up")
    });
    lab::say(&format!(
        "REPORT interop {who}: Up on both sides after {up:?} (BIRD view: {:?})",
        Bird::session(&t)
    ));

    // BIRD changes its timers (reconfigure): poll sequence, no flap.
    let new = interval_ms * 2;
    let before = t.xl();
    Bird::reconfigure(&t, &Bird::conf(new, None, false));
    t.wait("crosslink follows BIRD's new timers", ms(5000), |t| {
        t.xl().tx_interval_us == new * 1000 && t.xl().detect_time_us == 3 * new * 1000
    });
    std::thread::sleep(ms(3 * new));
    assert_eq!(
        t.xl().transitions,
        before.transitions,
        "flap on BIRD's timer change"
    );
    assert_eq!(Bird::session(&t).map(|s| s.0).as_deref(), Some("Up"));

    // crosslink changes its timers (SIGHUP): BIRD's interval follows, no flap.
    let mut b = XlBfd::plain(interval_ms);
    b.interval_ms = new * 3 / 2;
    t.reload_crosslink(&b);
    // BIRD's "Interval" is its own TX interval: max(its desired TX, our required RX).
    t.wait("BIRD sees crosslink's new required RX", ms(5000), |t| {
        Bird::session(t).is_some_and(|(_, i)| (i - b.interval_ms as f64).abs() < 0.5)
    });
    std::thread::sleep(ms(3 * new));
    assert_eq!(
        t.xl().transitions,
        before.transitions,
        "flap on our timer change"
    );
    assert_eq!(Bird::session(&t).map(|s| s.0).as_deref(), Some("Up"));
    lab::say(&format!(
        "REPORT interop {who}: timer changes on both sides via poll/final, no flap"
    ));

    check_stop(&mut t, &who);
}

#[test]
fn bird_20ms() {
    if lab::test_gate("bird_20ms", &BIRD_TOOLS) {
        bird_scenario(20);
    }
}

#[test]
fn bird_300ms() {
    if lab::test_gate("bird_300ms", &BIRD_TOOLS) {
        bird_scenario(300);
    }
}

/// Every authentication type BIRD offers, against crosslink's; then a wrong secret
/// must keep the session down (fail closed).
#[test]
fn bird_authentication_every_type() {
    if !lab::test_gate("bird_authentication_every_type", &BIRD_TOOLS) {
        return;
    }
    let _g = serial();
    let types = [
        ("simple", "simple-password"),
        ("keyed md5", "keyed-md5"),
        ("meticulous keyed md5", "meticulous-keyed-md5"),
        ("keyed sha1", "keyed-sha1"),
        ("meticulous keyed sha1", "meticulous-keyed-sha1"),
    ];
    for (i, (bird_kind, xl_kind)) in types.iter().enumerate() {
        let mut t = Topo::new(&format!("auth{i}"));
        let secret = "Xl-bfd-s3cret";
        Bird::start(&mut t, &Bird::conf(20, Some((bird_kind, 7, secret)), false));
        let mut b = XlBfd::plain(20);
        b.auth = Some((xl_kind, 7, secret));
        t.start_crosslink(&b);
        let up = t.wait(&format!("{xl_kind}: Up on both sides"), ms(10_000), |t| {
            xl_up(t) && Bird::session(t).is_some_and(|(s, _)| s == "Up")
        });
        assert!(t.xl().auth);
        // Stays up over many sequence numbers.
        std::thread::sleep(ms(1500));
        assert_eq!(t.xl().transitions, 1, "{xl_kind}: flapped");
        assert!(!t.xl_log().contains(secret), "secret in the log");
        lab::say(&format!("REPORT interop bird 20ms x3 auth {xl_kind}: Up on both sides after {up:?}, stable 1.5 s"));
    }
    // Wrong secret: never Up, on either side.
    let mut t = Topo::new("authbad");
    Bird::start(
        &mut t,
        &Bird::conf(20, Some(("meticulous keyed sha1", 7, "right")), false),
    );
    let mut b = XlBfd::plain(20);
    b.auth = Some(("meticulous-keyed-sha1", 7, "wrong"));
    t.start_crosslink(&b);
    std::thread::sleep(ms(3000));
    assert_eq!(t.xl().local_state, "down");
    assert_eq!(t.xl().transitions, 0);
    assert_ne!(Bird::session(&t).map(|s| s.0).as_deref(), Some("Up"));
    // No authentication on crosslink's side against BIRD with it: never Up either.
    drop(t);
    let mut t = Topo::new("authnone");
    Bird::start(
        &mut t,
        &Bird::conf(20, Some(("keyed sha1", 7, "right")), false),
    );
    t.start_crosslink(&XlBfd::plain(20));
    std::thread::sleep(ms(3000));
    assert_eq!(t.xl().transitions, 0);
    assert_ne!(Bird::session(&t).map(|s| s.0).as_deref(), Some("Up"));
}

/// The secret file is read at start; a missing one is a clear error naming it.
#[test]
fn unreadable_secret_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("xl-secret-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such-secret");
    let conf = dir.join("xl.toml");
    fs::write(
        &conf,
        format!(
            "[gateway]\nname = \"xl\"\ncontrol_socket = \"{}\"\n[bfd]\n\
             auth = {{ type = \"keyed-sha1\", key_id = 1, secret_file = \"{}\" }}\n\
             [[peer]]\nname = \"r\"\ntun = \"xl-r\"\n  [[peer.path]]\n  name = \"p1\"\n  \
             local = \"127.0.0.1:4800\"\n  remote = \"127.0.0.2:4800\"\n",
            dir.join("xl.sock").display(),
            missing.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("secret"), "{err}");
}
