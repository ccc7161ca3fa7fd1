//! First link (root): a link built from `crosslink init`'s files alone
//! passes traffic, and `crosslink check --reach` names a blocked path, a
//! path whose MTU is too small, a far end that is not there, and a key
//! that does not match.
//!
//! Each case prints a `REPORT setup ...` line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crosslink::lab::{self, Gw, Host, Lab, LabOptions, LabPath, DATA_PORT};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const TOOLS: [(&str, &str); 2] = [("ip", "iproute2"), ("nft", "nftables")];

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `crosslink init` for the lab's two gateways, into `<lab dir>/init`
/// (gw-b's files in `init/gw-b/`; both gateways share the lab's file
/// system, so gw-b's key file paths name `init/`, where the pre-shared key
/// is the same file): returns the paths of gw-a's and gw-b's files.
fn init(lab: &Lab, keys: &str) -> (PathBuf, PathBuf) {
    let out = lab.dir().join("init");
    let mut cmd = Command::new(BIN);
    cmd.arg("init")
        .args(["--name", "gw-a", "--peer", "gw-b"])
        .args(["--local-prefix", "198.18.10.0/24"])
        .args(["--remote-prefix", "198.18.30.0/24"])
        .args(["--keys", keys])
        .arg("--out")
        .arg(&out)
        .arg("--install-dir")
        .arg(&out)
        .arg("--control-socket")
        .arg(lab.socket_path(Gw::A))
        .arg("--far-control-socket")
        .arg(lab.socket_path(Gw::B));
    for p in LabPath::ALL {
        cmd.arg("--path").arg(format!(
            "{}={}:{DATA_PORT},{}:{DATA_PORT}",
            p.name(),
            p.addr(Gw::A),
            p.addr(Gw::B)
        ));
    }
    let done = cmd.output().unwrap();
    let said = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "init failed: {said}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    lab::say(&format!("init said:\n{said}"));
    (
        out.join("crosslink.toml"),
        out.join("gw-b").join("crosslink.toml"),
    )
}

/// `crosslink check --reach --json` in `host`'s namespace.
fn reach(lab: &Lab, host: Host, config: &Path, duration: &str) -> Command {
    let mut cmd = lab.command_in(host, BIN);
    cmd.args(["check", "--reach", "--json", "--duration", duration, "-c"])
        .arg(config);
    cmd
}

/// Runs a reach check and returns its per-path reports, its exit status
/// and how long it took.
fn run_reach(lab: &Lab, host: Host, config: &Path) -> (Vec<Value>, bool, Duration) {
    run_reach_for(lab, host, config, "2s")
}

/// [`run_reach`] with a reach window of `duration`.
fn run_reach_for(
    lab: &Lab,
    host: Host,
    config: &Path,
    duration: &str,
) -> (Vec<Value>, bool, Duration) {
    let start = Instant::now();
    let out = reach(lab, host, config, duration).output().unwrap();
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let json: Vec<Value> = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (json, out.status.success(), took)
}

/// [`run_reach`] in gw-a's namespace while gw-b runs a check of its own
/// (started first, so that it answers).
fn run_reach_with_far_check(lab: &Lab, ours: &Path, far: &Path) -> (Vec<Value>, bool, Duration) {
    run_reach_with_far_check_for(lab, ours, far, 2)
}

/// [`run_reach_with_far_check`] with a reach window of `secs` seconds (the
/// far check runs 4 s longer).
fn run_reach_with_far_check_for(
    lab: &Lab,
    ours: &Path,
    far: &Path,
    secs: u64,
) -> (Vec<Value>, bool, Duration) {
    let mut check = reach(lab, Host::GwB, far, &format!("{}s", secs + 4))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let done = run_reach_for(lab, Host::GwA, ours, &format!("{secs}s"));
    let _ = check.wait();
    done
}

/// Every path's report has `verdict`.
fn assert_every_path(reports: &[Value], verdict: &str) {
    for p in LabPath::ALL {
        assert_eq!(path(reports, p)["verdict"], verdict, "{reports:?}");
    }
}

fn path(reports: &[Value], p: LabPath) -> &Value {
    reports
        .iter()
        .find(|r| r["path"] == p.name())
        .unwrap_or_else(|| panic!("no report for {}: {reports:?}", p.name()))
}

#[test]
fn a_link_from_init_files_alone_carries_traffic() {
    if !lab::test_gate("a_link_from_init_files_alone_carries_traffic", &TOOLS) {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new(LabOptions::new("init", BIN)).unwrap();
    // The default: a key pair per gateway and the handshake.
    let (a, b) = init(&lab, "pair");
    let dir = lab.dir().join("init");
    std::fs::copy(
        dir.join("gw-b").join("gw-b.private"),
        dir.join("gw-b.private"),
    )
    .unwrap();
    let check = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&a)
        .arg("--against")
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for (gw, file) in [(Gw::A, &a), (Gw::B, &b)] {
        lab.write_config(gw, &std::fs::read_to_string(file).unwrap())
            .unwrap();
    }
    let started = Instant::now();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let up = started.elapsed();
    let established = |s: &Value| s["peers"][0]["handshake"]["state"] == "established";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = lab.poll(Gw::A).unwrap();
    while !established(&status) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        status = lab.poll(Gw::A).unwrap();
    }
    assert_eq!(status["peers"][0]["name"], "gw-b", "{status}");
    assert_eq!(status["peers"][0]["tun"], "xl-gw-b", "{status}");
    assert_eq!(
        status["peers"][0]["handshake"]["state"], "established",
        "{status}"
    );
    let receiver = lab.start_receiver(5997, Duration::from_secs(20)).unwrap();
    let sender = lab
        .start_sender(5997, 1000, Duration::from_secs(20))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    sender.stop().unwrap();
    let report = receiver.finish(Duration::from_secs(5)).unwrap();
    let received = report["received"].as_u64().unwrap_or(0);
    assert!(received >= 1000, "{report}");
    assert_eq!(report["lost"].as_u64(), Some(0), "{report}");
    lab::say(&format!(
        "REPORT setup init: two files and two key pairs from one `crosslink init`, handshake established, both paths up {up:?} after start, {received} packets through, none lost"
    ));
}

#[test]
fn reach_names_a_blocked_path_and_a_small_mtu() {
    if !lab::test_gate("reach_names_a_blocked_path_and_a_small_mtu", &TOOLS) {
        return;
    }
    let _g = serial();
    let lab = Lab::new(LabOptions::new("reach", BIN)).unwrap();
    let (a, b) = init(&lab, "psk");

    // Nothing runs at the far end: the far host refuses.
    let (r, ok, took) = run_reach(&lab, Host::GwA, &a);
    assert!(!ok);
    assert_every_path(&r, "refused");
    lab::say(&format!(
        "REPORT setup reach: far end not there -> both paths 'refused' in {took:?}"
    ));

    // The far end runs its own check; path2 is blackholed, path1 drops
    // what is larger than 1300 bytes (an MTU black hole).
    lab.blackhole(LabPath::Path2).unwrap();
    lab.drop_larger_than(LabPath::Path1, 1300).unwrap();
    let (r, ok, took) = run_reach_with_far_check(&lab, &a, &b);
    assert!(!ok, "{r:?}");
    let p1 = path(&r, LabPath::Path1);
    let p2 = path(&r, LabPath::Path2);
    assert_eq!(p1["verdict"], "answered", "{p1}");
    assert_eq!(p1["path_mtu"], 1300, "{p1}");
    assert!(p1["detail"].is_string());
    assert_eq!(p2["verdict"], "no_answer", "{p2}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    lab::say(&format!(
        "REPORT setup reach: blocked path2 -> {}, path1 with a 1300-byte black hole -> path MTU {} (needs {}), rtt {} ms, in {took:?}",
        p2["verdict"], p1["path_mtu"], p1["needed_mtu"], p1["rtt_ms_median"]
    ));

    // Healed, against a running far daemon.
    lab.heal(LabPath::Path1).unwrap();
    lab.heal(LabPath::Path2).unwrap();
    let mut lab = lab;
    lab.write_config(Gw::B, &std::fs::read_to_string(&b).unwrap())
        .unwrap();
    lab.start_gateway(Gw::B).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (r, ok, took) = run_reach(&lab, Host::GwA, &a);
    assert!(ok, "{r:?}");
    for p in LabPath::ALL {
        assert_eq!(path(&r, p)["verdict"], "answered", "{r:?}");
        assert_eq!(path(&r, p)["path_mtu"], 1500, "{r:?}");
    }
    lab::say(&format!(
        "REPORT setup reach: far daemon running -> both paths answered, path MTU 1500, in {took:?}"
    ));

    // Another key here than there: the far check says it cannot open ours.
    lab.stop_gateway(Gw::B);
    let key = lab.dir().join("init").join("gw-a--gw-b.key");
    let other = lab.dir().join("other.key");
    std::fs::write(&other, "11".repeat(32)).unwrap();
    let a_text = std::fs::read_to_string(&a)
        .unwrap()
        .replace(&key.display().to_string(), &other.display().to_string());
    let a2 = lab.dir().join("a-other-key.toml");
    std::fs::write(&a2, a_text).unwrap();
    let (r, ok, _) = run_reach_with_far_check(&lab, &a2, &b);
    assert!(!ok);
    assert_every_path(&r, "key_mismatch");
    lab::say("REPORT setup reach: another key at one end -> both paths 'key_mismatch'");
}

/// A key-pair peer: the reach check runs a handshake of its own (with a
/// far check, or with the far daemon) before it seals a probe; a far end
/// that holds another key pair says so.
#[test]
fn reach_runs_the_handshake_of_a_key_pair_peer() {
    if !lab::test_gate("reach_runs_the_handshake_of_a_key_pair_peer", &TOOLS) {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new(LabOptions::new("reachkp", BIN)).unwrap();
    let (a, b) = init(&lab, "pair");
    // Both gateways read their key files from `init/` (the lab shares one
    // file system): gw-b's private key goes where its file says.
    let dir = lab.dir().join("init");
    std::fs::copy(
        dir.join("gw-b").join("gw-b.private"),
        dir.join("gw-b.private"),
    )
    .unwrap();

    // A longer window than the other cases: the handshake comes first,
    // and a lost initiation is sent again only after a second.
    let (r, ok, took) = run_reach_with_far_check_for(&lab, &a, &b, 4);
    assert!(ok, "{r:?}");
    assert_every_path(&r, "answered");
    lab::say(&format!(
        "REPORT setup reach (key pairs): a far check answers after a handshake on both paths, in {took:?}"
    ));

    lab.write_config(Gw::B, &std::fs::read_to_string(&b).unwrap())
        .unwrap();
    lab.start_gateway(Gw::B).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The same longer window: path1 had no answer within 2 s once, in a
    // full test run.
    let (r, ok, took) = run_reach_for(&lab, Host::GwA, &a, "4s");
    assert!(ok, "{r:?}");
    assert_every_path(&r, "answered");
    lab::say(&format!(
        "REPORT setup reach (key pairs): the far daemon answers after a handshake, in {took:?}"
    ));
    lab.stop_gateway(Gw::B);

    // gw-a with another private key than the one gw-b's file names.
    let other = dir.join("other.private");
    let key = Command::new(BIN).arg("genkey").output().unwrap().stdout;
    std::fs::write(&other, key).unwrap();
    let a_text = std::fs::read_to_string(&a).unwrap().replace(
        &dir.join("gw-a.private").display().to_string(),
        &other.display().to_string(),
    );
    let a2 = lab.dir().join("a-other.toml");
    std::fs::write(&a2, a_text).unwrap();
    let (r, ok, _) = run_reach_with_far_check(&lab, &a2, &b);
    assert!(!ok);
    assert_every_path(&r, "key_mismatch");
    lab::say("REPORT setup reach (key pairs): another private key at one end -> both paths 'key_mismatch'");
}
