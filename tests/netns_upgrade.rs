//! `crosslink upgrade` in a throwaway network-namespace lab (see
//! `crosslink::lab`): a gateway hands its TUN, sockets and BFD sessions to
//! a new process while a 5000 packet/s stream flows through it, and
//! nothing may be lost, duplicated, or seen by the far end.
//!
//! They need root. Without it they print a skip message and pass, unless
//! `CROSSLINK_NETNS_REQUIRED=1` (set by `.ci/run`).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crosslink::lab::{self, Gw, Host, Lab, LabOptions, LabPath};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const PORT: u16 = 9000;
const RATE: u32 = 5000;
const METRICS_PORT: u16 = 9477;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Processes an upgrade started: not the lab's children (their parent,
/// the old daemon, has exited), so stopped here, before the lab goes.
#[derive(Default)]
struct Adopted(Vec<u32>);

impl Drop for Adopted {
    fn drop(&mut self) {
        for &pid in &self.0 {
            lab::signal_pid(pid, "TERM");
        }
        for &pid in &self.0 {
            wait_gone(pid, Duration::from_secs(5));
        }
    }
}

/// Whether process `pid` is running (neither gone nor a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The probe stream through the gateways: its receiver and sender.
fn start_stream(lab: &Lab) -> (lab::ProbeReceiver, lab::ProbeSender) {
    let rx = lab
        .start_receiver(PORT, Duration::from_secs(60))
        .expect("receiver");
    let tx = lab
        .start_sender(PORT, RATE, Duration::from_secs(60))
        .expect("sender");
    (rx, tx)
}

/// CROSSLINK_NETNS_STRICT=1: losses outside the upgrades (machine stalls)
/// fail the test too.
fn strict() -> bool {
    std::env::var("CROSSLINK_NETNS_STRICT").as_deref() == Ok("1")
}

/// The receiver's outages that overlap one of `windows` (Unix ms, from
/// an upgrade command's start to its end, widened by 20 ms each side (packets in flight)):
/// the packets lost to upgrades, and those lost otherwise.
fn losses(report: &Value, windows: &[(f64, f64)]) -> (u64, u64) {
    let first = report
        .get("first_packet_unix_ms")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let (mut during, mut other) = (0, 0);
    for o in report
        .get("outages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let start = first + o.get("start_ms").and_then(Value::as_f64).unwrap_or(0.0);
        let end = start + o.get("ms").and_then(Value::as_f64).unwrap_or(0.0);
        let packets = o.get("packets").and_then(Value::as_u64).unwrap_or(0);
        if windows
            .iter()
            .any(|(a, b)| start <= b + 20.0 && end >= a - 20.0)
        {
            during += packets;
        } else {
            other += packets;
        }
    }
    (during, other)
}

/// The process's open descriptors once settled: the least of ten counts
/// over half a second (a status or metrics connection just served may be
/// open for a moment longer; a leaked descriptor stays).
fn open_fds(pid: u32) -> usize {
    (0..10)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        })
        .min()
        .unwrap_or(0)
}

/// The pid serving a gateway's control socket.
fn serving_pid(lab: &Lab, gw: Gw) -> Option<u32> {
    let out = lab
        .sh_in(
            gw.host(),
            &format!("ss -xlpn | grep -F '{}'", lab.socket_path(gw).display()),
        )
        .ok()?;
    let at = out.find("pid=")? + 4;
    out[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Runs `crosslink upgrade` for `gw` (gateway A's by its control socket,
/// B's by its configuration file, as the Debian postinst does); the new
/// pid and handover time, or the command's error output.
fn upgrade(lab: &Lab, gw: Gw, binary: Option<&Path>) -> Result<(u32, f64), String> {
    let mut cmd = lab.command_in(gw.host(), BIN);
    cmd.arg("upgrade");
    match gw {
        Gw::A => cmd.arg("-s").arg(lab.socket_path(gw)),
        Gw::B => cmd.arg("-c").arg(lab.config_path(gw)),
    };
    if let Some(b) = binary {
        cmd.arg("--binary").arg(b);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        return Err(format!("{}{stderr}", stdout));
    }
    // "upgraded: new pid N (handover X ms)"
    let pid = stdout
        .split("new pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("unexpected output: {stdout}"))?;
    let ms = stdout
        .split("(handover ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("unexpected output: {stdout}"))?;
    Ok((pid, ms))
}

/// Upgrades `gw`, checks that the old process went and the new one
/// serves, and takes the old one off the lab's books.
fn upgrade_ok(lab: &mut Lab, adopted: &mut Adopted, gw: Gw, old: u32) -> (u32, f64) {
    let (pid, ms) = upgrade(lab, gw, None)
        .unwrap_or_else(|e| panic!("{gw}: upgrade failed: {e}\n{}", lab.log_tail(gw, 30)));
    assert_ne!(pid, old);
    adopted.0.push(pid);
    assert!(
        wait_gone(old, Duration::from_secs(5)),
        "{gw}: the old process {old} is still there"
    );
    assert!(alive(pid), "{gw}: the new process {pid} is not running");
    // The lab started the first process: reap it (it exited by itself).
    if lab.gateway_pid(gw) == Some(old) {
        lab.stop_gateway(gw);
    }
    assert_eq!(
        serving_pid(lab, gw),
        Some(pid),
        "{gw}: the control socket is not the new process's"
    );
    (pid, ms)
}

fn path1(s: &Value) -> Value {
    lab::path_status(s, LabPath::Path1)
        .cloned()
        .unwrap_or(Value::Null)
}

fn num(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr).and_then(Value::as_u64).unwrap_or(0)
}

/// The far end's view of its sessions: transitions and failures of both paths.
fn bfd_history(s: &Value) -> Vec<(u64, u64)> {
    LabPath::ALL
        .iter()
        .map(|p| {
            let st = lab::path_status(s, *p).cloned().unwrap_or(Value::Null);
            (num(&st, "/bfd/transitions"), num(&st, "/bfd/failures"))
        })
        .collect()
}

/// gw-a's `crosslink_path_transmit_packets_total` of path1, scraped.
fn scraped_tx(lab: &Lab) -> Option<f64> {
    let out = lab
        .command_in(Host::GwA, "curl")
        .args(["-sf", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{METRICS_PORT}/metrics"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find(|l| {
            l.starts_with("crosslink_path_transmit_packets_total{") && l.contains("path=\"path1\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn tuns(lab: &Lab, host: Host) -> usize {
    lab.ip_in(host, &["-o", "link", "show", "type", "tun"])
        .map_or(0, |o| o.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Both gateways upgraded in turn, twice each, under a 5000 packet/s
/// stream: no packet lost or duplicated, the far end's sessions never
/// leave Up, counters go on, the old processes go and nothing leaks. The
/// last upgrade also changes the `[gateway]` section.
#[test]
fn upgrade_under_traffic_loses_nothing() {
    if !lab::test_gate("upgrade_under_traffic_loses_nothing", &[]) {
        return;
    }
    upgrade_under_traffic("upg", false);
}

/// The same with the BFD receive offload on both gateways: the old
/// process clears its sessions from the shared array at the hand-off, the
/// new one loads its own program and arms its sessions again, and no
/// session on either side changes state.
#[test]
fn offloaded_upgrade_loses_nothing() {
    if !lab::test_gate("offloaded_upgrade_loses_nothing", &[]) {
        return;
    }
    upgrade_under_traffic("upgo", true);
}

/// Whether every path of `s` has its session in the offload.
fn all_offloaded(s: &Value) -> bool {
    LabPath::ALL
        .iter()
        .all(|&p| lab::path_status(s, p).is_some_and(|x| x["bfd"]["offloaded"] == true))
}

/// Whether `f` holds within `timeout` (tried every 50 ms).
fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn upgrade_under_traffic(tag: &str, offload: bool) {
    let _serial = serial();
    let mut opts = LabOptions::new(tag, BIN);
    opts.bfd_offload = offload;
    let mut lab = Lab::new(opts).expect("lab");
    // gw-a with a metrics endpoint, which the upgrades hand over too.
    let with_metrics = lab.config_text(Gw::A).replacen(
        "\n[bfd]",
        &format!("\n[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n\n[bfd]"),
        1,
    );
    assert!(
        with_metrics.contains("[metrics]"),
        "the lab's config changed form"
    );
    lab.write_config(Gw::A, &with_metrics).expect("config");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    if offload {
        for gw in Gw::ALL {
            let armed = wait_for(Duration::from_secs(5), || {
                all_offloaded(&lab.poll(gw).expect("status"))
            });
            assert!(
                armed,
                "{gw}: sessions not offloaded\n{}",
                lab.log_tail(gw, 30)
            );
        }
    }
    let mut adopted = Adopted::default();
    let mut pids = [
        lab.gateway_pid(Gw::A).expect("gw-a pid"),
        lab.gateway_pid(Gw::B).expect("gw-b pid"),
    ];
    let tuns_before = (tuns(&lab, Host::GwA), tuns(&lab, Host::GwB));

    let (rx, tx) = start_stream(&lab);
    std::thread::sleep(Duration::from_millis(1500));

    let mut handovers = Vec::new();
    let mut windows = Vec::new();
    let mut fds_after = Vec::new();
    for round in 0..2 {
        for (i, gw) in Gw::ALL.into_iter().enumerate() {
            let other = gw.other();
            let far_before = bfd_history(&lab.poll(other).expect("far status"));
            let before = lab.poll(gw).expect("status");
            let scraped_before = (gw == Gw::A).then(|| scraped_tx(&lab)).flatten();
            if round == 1 && gw == Gw::B {
                // A change a reload cannot apply.
                let text = lab
                    .config_text(gw)
                    .replace("name = \"gw-b\"", "name = \"gw-b2\"");
                assert!(
                    text.contains("gw-b2"),
                    "the lab's gateway name changed form"
                );
                lab.write_config(gw, &text).expect("config");
            }
            let started = unix_ms();
            let (pid, ms) = upgrade_ok(&mut lab, &mut adopted, gw, pids[i]);
            windows.push((started, unix_ms()));
            pids[i] = pid;
            handovers.push(ms);
            println!("REPORT upgrade round={round} gw={gw} new_pid={pid} handover_ms={ms:.3}");
            std::thread::sleep(Duration::from_millis(700));
            let after = lab.poll(gw).expect("status after");
            for p in LabPath::ALL {
                assert_eq!(
                    lab::path_state(&after, p).as_deref(),
                    Some("up"),
                    "{gw}: {p} not up after the upgrade: {after}"
                );
            }
            for field in ["tx_packets", "rx_packets", "tx_bytes", "rx_bytes"] {
                let (b, a) = (
                    num(&path1(&before), &format!("/{field}")),
                    num(&path1(&after), &format!("/{field}")),
                );
                assert!(a >= b, "{gw}: path1 {field} went back: {b} -> {a}");
            }
            if let Some(drops) = before.get("drops").and_then(Value::as_object) {
                for (reason, n) in drops {
                    let a = num(&after, &format!("/drops/{reason}"));
                    assert!(
                        a >= n.as_u64().unwrap_or(0),
                        "{gw}: drops {reason} went back: {n} -> {a}"
                    );
                }
            }
            assert_eq!(
                num(&path1(&after), "/bfd/local_discriminator"),
                num(&path1(&before), "/bfd/local_discriminator"),
                "{gw}: path1's session is not the same"
            );
            let far_after = bfd_history(&lab.poll(other).expect("far status"));
            assert_eq!(
                far_after, far_before,
                "{other}: its BFD sessions changed state during {gw}'s upgrade"
            );
            if round == 1 && gw == Gw::B {
                assert_eq!(after.get("gateway").and_then(Value::as_str), Some("gw-b2"));
            }
            if offload {
                // The new process arms its sessions again.
                let armed = wait_for(Duration::from_secs(5), || {
                    all_offloaded(&lab.poll(gw).expect("status"))
                });
                assert!(armed, "{gw}: sessions not offloaded after the upgrade");
                println!("REPORT upgrade offload round={round} gw={gw} rearmed=true");
            }
            if gw == Gw::A {
                let scraped = scraped_tx(&lab);
                println!("REPORT upgrade metrics path1 tx_packets before={scraped_before:?} after={scraped:?}");
                let (Some(b), Some(a)) = (scraped_before, scraped) else {
                    panic!(
                        "{gw}: metrics not scraped: before {scraped_before:?}, after {scraped:?}"
                    );
                };
                assert!(a >= b, "{gw}: the scraped counter went back: {b} -> {a}");
            }
            fds_after.push((gw, pid, open_fds(pid)));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let sent = tx.stop().expect("sender report");
    let report = rx.finish(Duration::from_secs(5)).expect("receiver report");
    let lost = report
        .get("lost")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let dups = report
        .get("duplicates")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let received = report.get("received").and_then(Value::as_u64).unwrap_or(0);
    let worst = handovers.iter().copied().fold(0.0, f64::max);
    let (during, other) = losses(&report, &windows);
    println!(
        "REPORT upgrade stream rate={RATE}pps sent={} received={received} lost={lost} lost_during_upgrades={during} lost_otherwise={other} duplicates={dups} max_gap_ms={} upgrades={} worst_handover_ms={worst:.3}",
        report.get("sent").and_then(Value::as_u64).unwrap_or(0),
        report.get("max_gap_ms").and_then(Value::as_f64).unwrap_or(-1.0),
        handovers.len(),
    );
    let _ = sent;
    assert!(
        received > u64::from(RATE),
        "the stream did not flow: {report}"
    );
    assert_eq!(during, 0, "packets lost across the upgrades: {report}");
    if strict() {
        assert_eq!(lost, 0, "packets lost: {report}");
    }
    assert_eq!(dups, 0, "packets duplicated across the upgrades: {report}");
    // Nothing leaked: one TUN per gateway, and a second upgrade leaves the
    // new process with as many descriptors as the first did.
    assert_eq!((tuns(&lab, Host::GwA), tuns(&lab, Host::GwB)), tuns_before);
    for gw in Gw::ALL {
        let counts: Vec<usize> = fds_after
            .iter()
            .filter(|(g, _, _)| *g == gw)
            .map(|(_, _, n)| *n)
            .collect();
        assert!(
            counts.windows(2).all(|w| w[1] <= w[0]),
            "{gw}: descriptors grew from one upgrade to the next: {counts:?}"
        );
    }
}

/// An upgrade that cannot work (no such binary, a binary that is not
/// crosslink, a configuration the new process refuses) leaves the old
/// process serving, with nothing lost.
#[test]
fn failed_upgrade_leaves_the_old_process_serving() {
    if !lab::test_gate("failed_upgrade_leaves_the_old_process_serving", &[]) {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new(LabOptions::new("upf", BIN)).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let pid = lab.gateway_pid(Gw::A).expect("pid");
    let far_before = bfd_history(&lab.poll(Gw::B).expect("far status"));
    let (rx, tx) = start_stream(&lab);
    std::thread::sleep(Duration::from_millis(500));

    let started = unix_ms();
    let missing = upgrade(&lab, Gw::A, Some(Path::new("/nonexistent/crosslink")))
        .expect_err("an upgrade to a missing binary worked");
    assert!(missing.contains("cannot start"), "{missing}");
    let not_crosslink = upgrade(&lab, Gw::A, Some(Path::new("/bin/true")))
        .expect_err("an upgrade to /bin/true worked");
    assert!(
        not_crosslink.contains("did not get ready"),
        "{not_crosslink}"
    );
    let good = lab.config_text(Gw::A);
    lab.write_config(Gw::A, &format!("{good}\n[[peer]]\nname = 7\n"))
        .expect("config");
    let bad_config =
        upgrade(&lab, Gw::A, None).expect_err("an upgrade with a broken config worked");
    assert!(bad_config.contains("refused"), "{bad_config}");
    lab.write_config(Gw::A, &good).expect("config");
    let windows = [(started, unix_ms())];
    for e in [&missing, &not_crosslink, &bad_config] {
        println!("REPORT upgrade refused: {}", e.trim());
    }

    std::thread::sleep(Duration::from_millis(500));
    lab.check_gateways().expect("the old process exited");
    assert_eq!(serving_pid(&lab, Gw::A), Some(pid));
    let status = lab.poll(Gw::A).expect("status");
    for p in LabPath::ALL {
        assert_eq!(
            lab::path_state(&status, p).as_deref(),
            Some("up"),
            "{status}"
        );
    }
    assert_eq!(
        bfd_history(&lab.poll(Gw::B).expect("far status")),
        far_before
    );
    let _ = tx.stop();
    let report = rx.finish(Duration::from_secs(5)).expect("receiver report");
    let lost = report
        .get("lost")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let (during, _) = losses(&report, &windows);
    println!("REPORT failed upgrades: stream lost={lost} lost_during_upgrades={during}");
    assert_eq!(during, 0, "{report}");
    if strict() {
        assert_eq!(lost, 0, "{report}");
    }
    assert_eq!(tuns(&lab, Host::GwA), 1);
}

/// The same with a sealed data plane, with a pre-shared key (the new
/// process seals under a later epoch, and the far end takes its packets
/// from the first one) and with key pairs (the new process carries on
/// with the handshake's sessions and their keys: no new handshake, and
/// the far end refuses nothing as replayed or forged).
#[test]
fn sealed_upgrade_loses_nothing() {
    if !lab::test_gate("sealed_upgrade_loses_nothing", &[]) {
        return;
    }
    let _serial = serial();
    for key_pairs in [false, true] {
        sealed_upgrade(key_pairs);
    }
}

fn handshakes_completed(s: &Value) -> u64 {
    s["peers"][0]["handshake"]["completed"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

fn sealed_upgrade(key_pairs: bool) {
    let mut opts = LabOptions::new(if key_pairs { "upk" } else { "ups" }, BIN);
    if key_pairs {
        opts.key_pairs = true;
    } else {
        opts.key =
            Some("5e1d0c3a7b2d94e8a16c0f3b2e7d5a9c4b8e1f60d2c3a5b7e9f1d3c5a7b9e1f3\n".into());
    }
    let mode = if key_pairs { "key pairs" } else { "key" };
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    if key_pairs {
        lab.wait_handshakes(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    }
    let mut adopted = Adopted::default();
    let (rx, tx) = start_stream(&lab);
    // Sealed traffic starts once the daemon's epoch second is over.
    std::thread::sleep(Duration::from_millis(1500));
    let mut windows = Vec::new();
    let mut slowest: f64 = 0.0;
    for gw in Gw::ALL {
        let far = lab.poll(gw.other()).expect("far status");
        let far_before = bfd_history(&far);
        let far_handshakes = handshakes_completed(&far);
        let own_handshakes = handshakes_completed(&lab.poll(gw).expect("status"));
        let old = lab.gateway_pid(gw).expect("pid");
        let started = unix_ms();
        let (pid, ms) = upgrade_ok(&mut lab, &mut adopted, gw, old);
        windows.push((started, unix_ms()));
        slowest = slowest.max(ms);
        println!("REPORT sealed upgrade ({mode}) gw={gw} new_pid={pid} handover_ms={ms:.3}");
        std::thread::sleep(Duration::from_millis(700));
        let far = lab.poll(gw.other()).expect("far status");
        assert_eq!(
            bfd_history(&far),
            far_before,
            "{}: its sessions changed during {gw}'s upgrade",
            gw.other()
        );
        if key_pairs {
            // The sessions went over with their keys: nobody ran a handshake.
            assert_eq!(handshakes_completed(&far), far_handshakes, "{far}");
            let own = lab.poll(gw).expect("status");
            assert_eq!(handshakes_completed(&own), own_handshakes, "{own}");
            assert_eq!(
                own["peers"][0]["handshake"]["state"], "established",
                "{own}"
            );
        }
    }
    let _ = tx.stop();
    let report = rx.finish(Duration::from_secs(5)).expect("receiver report");
    let lost = report
        .get("lost")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let dups = report
        .get("duplicates")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let (during, other) = losses(&report, &windows);
    println!(
        "REPORT sealed upgrade ({mode}) stream received={} lost={lost} lost_during_upgrades={during} lost_otherwise={other} duplicates={dups}",
        report.get("received").and_then(Value::as_u64).unwrap_or(0)
    );
    let drops: Vec<Value> = Gw::ALL
        .iter()
        .map(|gw| lab.poll(*gw).map_or(Value::Null, |s| s["drops"].clone()))
        .collect();
    // A handover the loaded host stretched past 50 ms (usually 1-4 ms) has
    // lost a few sealed packets (7 of 25 000 in one run with 76 ms): reported,
    // and a failure only with CROSSLINK_NETNS_STRICT=1.
    if slowest < 50.0 || strict() {
        assert_eq!(during, 0, "{report}; drops: {drops:?}");
    } else if during > 0 {
        println!(
            "REPORT sealed upgrade ({mode}): {during} lost during a handover of {slowest:.1} ms (a stalled host); drops: {drops:?}"
        );
    }
    if strict() {
        assert_eq!(lost, 0, "{report}");
    }
    assert_eq!(dups, 0, "{report}");
    // Nothing the new processes sealed was refused by the far ends.
    for d in &drops {
        for reason in ["auth_failed", "replayed", "no_session"] {
            assert_eq!(d[reason], Value::Null, "{mode}: {drops:?}");
        }
    }
}

/// A peer with the kernel fast path: the new process attaches its programs
/// behind the old one's (which carry on forwarding while both processes
/// stop reading) and configures them before the old process exits, taking
/// its programs with it. The stream loses nothing, and the fast path, not
/// the lanes, carries it before, across and after each upgrade.
#[test]
fn fast_path_upgrade_loses_nothing() {
    if !lab::test_gate("fast_path_upgrade_loses_nothing", &[]) {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("upx", BIN);
    opts.fast_path = true;
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let mut adopted = Adopted::default();
    let tx_before = lab::path_counter(
        &lab.poll(Gw::A).expect("status"),
        LabPath::Path1,
        "tx_packets",
    );
    let (rx, tx) = start_stream(&lab);
    std::thread::sleep(Duration::from_millis(1000));
    let lanes_before = Gw::ALL.map(|gw| lab.tun_tx_packets(gw));
    let mut windows = Vec::new();
    for gw in Gw::ALL {
        let far_before = bfd_history(&lab.poll(gw.other()).expect("far status"));
        let old = lab.gateway_pid(gw).expect("pid");
        let started = unix_ms();
        let (pid, ms) = upgrade_ok(&mut lab, &mut adopted, gw, old);
        windows.push((started, unix_ms()));
        println!("REPORT fast path upgrade gw={gw} new_pid={pid} handover_ms={ms:.3}");
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            bfd_history(&lab.poll(gw.other()).expect("far status")),
            far_before,
            "{}: its sessions changed during {gw}'s upgrade\n{}",
            gw.other(),
            lab.log_tail(gw, 30)
        );
    }
    // After both upgrades: the new processes' programs carry the stream.
    let after_upgrades = Gw::ALL.map(|gw| lab.tun_tx_packets(gw));
    std::thread::sleep(Duration::from_millis(1000));
    let _ = tx.stop();
    let report = rx.finish(Duration::from_secs(5)).expect("receiver report");
    let lanes_after = Gw::ALL.map(|gw| lab.tun_tx_packets(gw));
    // The programs' counters reach the paths' every 500 ms.
    std::thread::sleep(Duration::from_millis(700));
    let tx_after = lab::path_counter(
        &lab.poll(Gw::A).expect("status"),
        LabPath::Path1,
        "tx_packets",
    );
    let lanes: Vec<u64> = (0..2)
        .map(|i| lanes_after[i].saturating_sub(lanes_before[i]))
        .collect();
    let lanes_since: Vec<u64> = (0..2)
        .map(|i| lanes_after[i].saturating_sub(after_upgrades[i]))
        .collect();
    let lost = report
        .get("lost")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let received = report.get("received").and_then(Value::as_u64).unwrap_or(0);
    let (during, other) = losses(&report, &windows);
    println!(
        "REPORT fast path upgrade stream received={received} lost={lost} lost_during_upgrades={during} lost_otherwise={other} through_lanes={lanes:?} (after the upgrades {lanes_since:?}) path1_tx={}",
        tx_after.saturating_sub(tx_before)
    );
    assert_eq!(during, 0, "{report}");
    if strict() {
        assert_eq!(lost, 0, "{report}");
    }
    assert!(
        lanes_since.iter().all(|&n| n < 100),
        "the lanes carried {lanes_since:?} packets after the upgrades, not the fast path"
    );
    // The programs' counters reach the status through the upgrades.
    let counted = tx_after.saturating_sub(tx_before);
    assert!(
        counted >= received * 9 / 10,
        "path1 counted {counted} of {received}"
    );
    lab.check_gateways().expect("a gateway exited");
}

/// An upgrade while path1 is browned out (10 % loss, demoted for its
/// quality, the stream on path2): the new process keeps path1 demoted and
/// the stream where it was, instead of trying the sick path again until
/// its own measurements condemn it; path1 takes the stream back only once
/// the loss has ended and the hold has passed.
#[test]
fn an_upgrade_keeps_a_sick_path_demoted() {
    if !lab::test_gate("an_upgrade_keeps_a_sick_path_demoted", &[]) {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("upq", BIN);
    opts.sla = vec!["hold = \"3s\"".into()];
    opts.multiplier = 5;
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    // path2 is eligible once up for revert_hold.
    std::thread::sleep(Duration::from_secs(3));
    let mut adopted = Adopted::default();
    let (rx, tx) = start_stream(&lab);
    lab.random_loss(LabPath::Path1, 10).expect("loss");
    let degraded = |s: &Value| {
        lab::path_status(s, LabPath::Path1)
            .and_then(|p| p.get("quality"))
            .and_then(|q| q.get("degraded"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    lab.wait_for("path1 demoted", Duration::from_secs(5), |gw, s| {
        gw == Gw::B || (degraded(s) && lab::path_active(s, LabPath::Path2))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let old = lab.gateway_pid(Gw::A).expect("pid");
    let (_, ms) = upgrade_ok(&mut lab, &mut adopted, Gw::A, old);
    // Watch gw-a's choice for the next second, every 10 ms.
    let started = Instant::now();
    let mut on_path1 = 0;
    let mut polls = 0;
    let mut still_degraded = true;
    while started.elapsed() < Duration::from_secs(1) {
        if let Ok(s) = lab.poll(Gw::A) {
            polls += 1;
            if lab::path_active(&s, LabPath::Path1) {
                on_path1 += 1;
            }
            still_degraded &= degraded(&s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "REPORT upgrade during a brownout: handover_ms={ms:.3} path1 active in {on_path1} of {polls} polls in the second after, still degraded={still_degraded}"
    );
    assert_eq!(
        on_path1,
        0,
        "the new process tried the sick path again\n{}",
        lab.log_tail(Gw::A, 30)
    );
    assert!(still_degraded, "{}", lab.log_tail(Gw::A, 30));
    // The loss ends: path1 takes the stream back after the hold.
    lab.heal(LabPath::Path1).expect("heal");
    lab.wait_for("path1 back", Duration::from_secs(15), |gw, s| {
        gw == Gw::B || (!degraded(s) && lab::path_active(s, LabPath::Path1))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let _ = tx.stop();
    let _ = rx.finish(Duration::from_secs(5));
}

/// Upgrades across releases, with the previous release's binary
/// (`XL_PREVIOUS_BIN`): a sealed lab (pre-shared key) started on the
/// previous release is upgraded to this build gateway by gateway, then
/// gw-a back to the previous release (a version-1 handover both ways)
/// under the 5000 packet/s stream: nothing lost, the far end's sessions
/// untouched. Then with key pairs, on this build: a downgrade to the
/// previous release (which cannot take a handshake's sessions) is refused
/// before anything stops, and the old process serves on. Run:
/// `XL_PREVIOUS_BIN=<binary> cargo test --test netns_upgrade across_releases -- --ignored`.
#[test]
#[ignore = "needs the previous release's binary in XL_PREVIOUS_BIN"]
fn upgrades_across_releases() {
    let prev =
        std::env::var("XL_PREVIOUS_BIN").expect("XL_PREVIOUS_BIN: the previous release's binary");
    let prev = Path::new(&prev);
    let this = Path::new(BIN);
    let _serial = serial();
    let mut opts = LabOptions::new("upr", prev);
    opts.key = Some("5e1d0c3a7b2d94e8a16c0f3b2e7d5a9c4b8e1f60d2c3a5b7e9f1d3c5a7b9e1f3\n".into());
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let mut adopted = Adopted::default();
    let (rx, tx) = start_stream(&lab);
    std::thread::sleep(Duration::from_millis(1500));
    let mut windows = Vec::new();
    for (gw, to, what) in [
        (Gw::A, this, "previous -> this"),
        (Gw::B, this, "previous -> this"),
        (Gw::A, prev, "this -> previous"),
    ] {
        let far_before = bfd_history(&lab.poll(gw.other()).expect("far status"));
        let old = serving_pid(&lab, gw).expect("serving pid");
        let started = unix_ms();
        let (pid, ms) = upgrade(&lab, gw, Some(to))
            .unwrap_or_else(|e| panic!("{gw} {what}: {e}\n{}", lab.log_tail(gw, 30)));
        windows.push((started, unix_ms()));
        adopted.0.push(pid);
        assert!(
            wait_gone(old, Duration::from_secs(5)),
            "{gw}: {old} still there"
        );
        if lab.gateway_pid(gw) == Some(old) {
            lab.stop_gateway(gw);
        }
        println!("REPORT upgrade across releases gw={gw} {what} new_pid={pid} handover_ms={ms:.3}");
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            bfd_history(&lab.poll(gw.other()).expect("far status")),
            far_before,
            "{}: its sessions changed during {gw}'s upgrade ({what})",
            gw.other()
        );
    }
    let _ = tx.stop();
    let report = rx.finish(Duration::from_secs(5)).expect("receiver report");
    let (during, other) = losses(&report, &windows);
    println!(
        "REPORT upgrade across releases stream received={} lost_during_upgrades={during} lost_otherwise={other} duplicates={}",
        report["received"], report["duplicates"]
    );
    assert_eq!(during, 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    drop(adopted);
    drop(lab);

    let mut opts = LabOptions::new("uprk", BIN);
    opts.key_pairs = true;
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    lab.wait_handshakes(Duration::from_secs(10))
        .expect("handshakes");
    let old = lab.gateway_pid(Gw::A).expect("pid");
    let far_before = bfd_history(&lab.poll(Gw::B).expect("far status"));
    let e = upgrade(&lab, Gw::A, Some(prev)).expect_err("a downgrade with key pairs was made");
    println!("REPORT downgrade refused: {}", e.trim());
    assert!(e.contains("version"), "{e}");
    assert_eq!(serving_pid(&lab, Gw::A), Some(old));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        bfd_history(&lab.poll(Gw::B).expect("far status")),
        far_before
    );
    lab.check_gateways().expect("the old process exited");
}

/// A TCP stream (iperf3, 100 ms intervals) through an upgrade of each
/// gateway: the stream goes on, and the dip is reported (`REPORT upgrade
/// tcp`: the intervals under half the median rate, in milliseconds).
#[test]
fn tcp_stream_through_upgrades() {
    if !lab::tool_gate("tcp_stream_through_upgrades", &[("iperf3", "iperf3")]) {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new(LabOptions::new("upt", BIN)).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let mut adopted = Adopted::default();
    let server_addr = lab::SERVER_ADDR.to_string();
    let mut server = lab.command_in(Host::Server, "iperf3");
    server
        .args(["-s", "-1", "-p", "5202", "-B", &server_addr])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut server = server.spawn().expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(500));
    let mut client = lab.command_in(Host::Client, "iperf3");
    client
        .args([
            "-c",
            &server_addr,
            "-p",
            "5202",
            "-J",
            "-i",
            "0.1",
            "-t",
            "4",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let client = client.spawn().expect("iperf3 -c");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let rcvbuf_errors = |lab: &Lab| -> Vec<u64> {
        Gw::ALL
            .iter()
            .map(|gw| {
                lab.sh_in(
                    gw.host(),
                    "nstat -az UdpRcvbufErrors | awk '/UdpRcvbufErrors/ {print $2}'",
                )
                .ok()
                .and_then(|o| o.trim().parse().ok())
                .unwrap_or(0)
            })
            .collect()
    };
    let errors_before = rcvbuf_errors(&lab);
    let mut upgrades = Vec::new();
    for gw in Gw::ALL {
        let old = lab.gateway_pid(gw).expect("pid");
        let at = t0.elapsed().as_secs_f64();
        let (_, ms) = upgrade_ok(&mut lab, &mut adopted, gw, old);
        upgrades.push(format!("{gw} at {at:.2} s handover {ms:.1} ms"));
        std::thread::sleep(Duration::from_millis(800));
    }
    let errors_after = rcvbuf_errors(&lab);
    let out = client.wait_with_output().expect("iperf3 -c output");
    let retransmits = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            v.pointer("/end/sum_sent/retransmits")
                .and_then(Value::as_u64)
        })
        .unwrap_or(0);
    let _ = server.kill();
    let _ = server.wait();
    let (total, intervals) = lab::iperf_report(&out.stdout).expect("iperf3 report");
    // The first second is TCP's (and the lab's) warm-up; both upgrades
    // come after it.
    let steady: Vec<f64> = intervals.iter().skip(10).copied().collect();
    let mut sorted = steady.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let dip_ms = 100 * steady.iter().filter(|r| **r < median / 2.0).count();
    let lowest = sorted.first().copied().unwrap_or(0.0);
    let dips: Vec<String> = intervals
        .iter()
        .enumerate()
        .skip(10)
        .filter(|(_, r)| **r < median / 2.0)
        .map(|(i, r)| {
            format!(
                "{:.1}-{:.1} s: {:.0} Mbit/s",
                i as f64 / 10.0,
                (i + 1) as f64 / 10.0,
                r / 1e6
            )
        })
        .collect();
    println!(
        "REPORT upgrade tcp upgrades=2 total_mbit={:.0} median_mbit={:.0} lowest_interval_mbit={:.0} dip_ms={dip_ms} (100 ms intervals under half the median, both upgrades together) retransmits={retransmits} udp_rcvbuf_errors={:?} upgrades={upgrades:?} dips={dips:?}",
        total / 1e6,
        median / 1e6,
        lowest / 1e6,
        errors_after
            .iter()
            .zip(&errors_before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect::<Vec<_>>(),
    );
    assert!(
        total > 0.0 && intervals.len() >= 30,
        "the transfer did not run: {intervals:?}"
    );
    // Generous: two upgrades must not stall TCP for a retransmission timeout.
    assert!(dip_ms <= 1000, "TCP stalled for {dip_ms} ms: {intervals:?}");
}

/// systemd's descriptor store, played by the test: what the daemon gave it
/// with `FDSTORE=1` (by name), taken out with `FDSTOREREMOVE=1`.
struct FdStore {
    path: std::path::PathBuf,
    fds: std::sync::Arc<Mutex<Vec<(String, std::os::fd::OwnedFd)>>>,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FdStore {
    /// The names of what the store holds, in the order stored.
    fn names(&self) -> Vec<String> {
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn bind(path: std::path::PathBuf) -> FdStore {
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
        let fds = std::sync::Arc::new(Mutex::new(Vec::new()));
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, r) = (fds.clone(), ready.clone());
        std::thread::spawn(move || loop {
            let Some((text, got)) = recv_with_fds(&sock) else {
                return;
            };
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(str::to_string)
            };
            let name = field("FDNAME=").unwrap_or_default();
            let mut store = f.lock().unwrap_or_else(|e| e.into_inner());
            if text.lines().any(|l| l == "FDSTORE=1") {
                for fd in got {
                    store.push((name.clone(), fd));
                }
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                store.retain(|(n, _)| *n != name);
            }
            if text.lines().any(|l| l == "READY=1") {
                r.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        FdStore { path, fds, ready }
    }
}

impl Drop for FdStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One notification and the descriptors that came with it.
fn recv_with_fds(
    sock: &std::os::unix::net::UnixDatagram,
) -> Option<(String, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = [0u8; 4096];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; the pointers set below are to live
    // locals, and the kernel writes at most their lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: as above; MSG_CMSG_CLOEXEC keeps the descriptors out of children.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return None;
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(
                        data.add(i).read_unaligned(),
                    ));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let text = String::from_utf8_lossy(&buf[..n as usize]).to_string();
    Some((text, fds))
}

fn routes_via(lab: &Lab, dev: &str) -> String {
    lab.ip_in(Host::GwA, &["route", "show", "dev", dev])
        .unwrap_or_default()
}

/// A crash (SIGKILL) and a restart by the service manager: the TUN kept
/// in the descriptor store stays, with its routes, while no process runs,
/// and the restarted daemon takes it back. The stream's outage is
/// reported (the sessions start over: RFC 5880's slow start bounds it).
#[test]
fn crash_restart_keeps_the_tun_from_the_fd_store() {
    if !lab::test_gate("crash_restart_keeps_the_tun_from_the_fd_store", &[]) {
        return;
    }
    let _serial = serial();
    let notify = std::env::temp_dir().join(format!("xl-upk-notify-{}.sock", std::process::id()));
    let store = FdStore::bind(notify.clone());
    let mut opts = LabOptions::new("upk", BIN);
    opts.one_gateway_env
        .push((Gw::A, "NOTIFY_SOCKET".into(), notify.display().to_string()));
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let deadline = Instant::now() + Duration::from_secs(5);
    // The TUN's queues, each path's data sockets (one per lane) and BFD
    // socket, and the BFD receive sockets: READY=1, then the descriptors,
    // in messages of their own (wait for all of them, not the first).
    let kinds = [
        "tun/xl-b/",
        "data/b/path1/",
        "data/b/path2/",
        "bfd/b/path1",
        "bfd/b/path2",
        "rx/",
    ];
    let stored_all = || {
        let names = store.names();
        kinds.iter().all(|k| names.iter().any(|n| n.starts_with(k)))
    };
    while (!store.ready.load(std::sync::atomic::Ordering::Relaxed) || !stored_all())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stored: Vec<String> = store.names();
    for kind in kinds {
        assert!(
            stored.iter().any(|n| n.starts_with(kind)),
            "the daemon stored {stored:?}, nothing {kind}"
        );
    }
    assert!(
        stored.iter().all(|n| ["tun/", "data/", "bfd/", "rx/"]
            .iter()
            .any(|k| n.starts_with(k))),
        "the daemon stored {stored:?}"
    );
    // The stored sockets, by inode: the restarted daemon must hold these.
    let socket_inodes: Vec<u64> = {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        store
            .fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(n, _)| !n.starts_with("tun/"))
            .filter_map(|(_, fd)| {
                std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .ok()
                    .map(|m| m.ino())
            })
            .collect()
    };
    let routes = routes_via(&lab, "xl-b");
    assert!(!routes.trim().is_empty(), "no route via the TUN");

    let (rx, tx) = start_stream(&lab);
    std::thread::sleep(Duration::from_millis(1000));
    lab.kill_gateway(Gw::A);
    std::thread::sleep(Duration::from_millis(300));
    let during = routes_via(&lab, "xl-b");
    assert_eq!(
        during, routes,
        "the TUN's routes changed while no daemon ran"
    );

    // The restart, as systemd does it: the stored descriptors from 3 on,
    // LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (the shell's pid, which exec keeps).
    let (names, fds): (Vec<String>, Vec<i32>) = store
        .fds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(n, fd)| {
            use std::os::fd::AsRawFd;
            // SAFETY: F_DUPFD_CLOEXEC copies an open descriptor to one >= 100.
            (n.clone(), unsafe {
                libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100)
            })
        })
        .unzip();
    assert!(fds.iter().all(|fd| *fd >= 100));
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(lab.log_path(Gw::A))
        .expect("log");
    let err_log = log.try_clone().expect("log");
    let mut cmd = lab.command_in(Host::GwA, "sh");
    cmd.arg("-c")
        .arg(format!(
            "export LISTEN_PID=$$; exec {BIN} run -c {}",
            lab.config_path(Gw::A).display()
        ))
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("NOTIFY_SOCKET", &notify)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err_log);
    let moved = fds.clone();
    // SAFETY: between fork and exec only dup2 (async-signal-safe) on
    // descriptors open in the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            for (i, fd) in moved.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let restarted_at = Instant::now();
    let mut restarted = cmd.spawn().expect("restart");
    for fd in fds {
        // SAFETY: closes the copy made above.
        unsafe { libc::close(fd) };
    }
    let up = (|| {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(s) = lab.poll(Gw::A) {
                if lab::path_state(&s, LabPath::Path1).as_deref() == Some("up") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })();
    let up_after = restarted_at.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    let _ = tx.stop();
    let report = rx.finish(Duration::from_secs(5)).expect("receiver report");
    let after = routes_via(&lab, "xl-b");
    let log_text = lab::wait_log(
        &lab.log_path(Gw::A),
        "from_fd_store=true",
        Duration::from_secs(2),
    );
    let tuns_running = tuns(&lab, Host::GwA);
    // The sockets the restarted daemon holds: those it stored before.
    let held: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", restarted.id()))
        .map(|d| {
            use std::os::unix::fs::MetadataExt;
            d.filter_map(|e| std::fs::metadata(e.ok()?.path()).ok().map(|m| m.ino()))
                .collect()
        })
        .unwrap_or_default();
    let kept = socket_inodes.iter().filter(|i| held.contains(i)).count();
    // What the store holds now: each name once (the restarted daemon took
    // out what it was given before it stored what it uses).
    // (the store reads the notifications on a thread of its own: wait for
    // the daemon's first store to have landed)
    let read_store = || -> (Vec<String>, Vec<String>) {
        let all = store.names();
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        (all, unique)
    };
    let end = Instant::now() + Duration::from_secs(3);
    let (mut now_stored, mut unique) = read_store();
    while unique.len() < stored.len() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        (now_stored, unique) = read_store();
    }
    // A clean stop takes the TUN out of the store: it goes.
    lab::signal_pid(restarted.id(), "TERM");
    let _ = restarted.wait();
    // The store reads the daemon's last notifications on a thread of its own.
    let end = Instant::now() + Duration::from_secs(3);
    let mut left = usize::MAX;
    while left > 0 && Instant::now() < end {
        left = store.fds.lock().unwrap_or_else(|e| e.into_inner()).len();
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let outage = report
        .get("longest_outage_ms")
        .and_then(Value::as_f64)
        .unwrap_or(-1.0);
    println!(
        "REPORT crash restart (SIGKILL, restarted 300 ms later with the stored TUN and sockets): routes kept={} sockets kept={kept} of {} path1 up {:.0} ms after the restart; stream outage_ms={outage:.0} lost={}",
        during == routes,
        socket_inodes.len(),
        up_after.as_secs_f64() * 1e3,
        report.get("lost").and_then(Value::as_u64).unwrap_or(0)
    );
    assert!(
        up,
        "path1 did not come up after the restart\n{}",
        lab.log_tail(Gw::A, 30)
    );
    assert!(
        log_text.contains("from_fd_store=true"),
        "the TUN was not taken from the store"
    );
    assert_eq!(after, routes, "the TUN's routes changed across the restart");
    assert_eq!(unique.len(), now_stored.len(), "{now_stored:?}");
    assert_eq!(
        unique.len(),
        stored.len(),
        "{now_stored:?} after {stored:?}\n{}",
        lab.log_tail(Gw::A, 60)
    );
    assert_eq!(
        kept,
        socket_inodes.len(),
        "the restarted daemon opened new sockets\n{}",
        lab.log_tail(Gw::A, 30)
    );
    assert_eq!(tuns_running, 1);
    assert_eq!(left, 0, "a clean stop left descriptors in the store");
    assert_eq!(tuns(&lab, Host::GwA), 0, "the TUN outlived a clean stop");
}

/// Each path's `rate` in the paced upgrade, and the stream's rate: 64-byte
/// probes are 92-byte inner packets, paced as 202 bytes each (with the
/// tunnel's overhead), so two 2 Mbit/s paths take about 2475 a second. The
/// stream's 3000 keep the lanes' pace queues full: each upgrade of gw-a
/// finds about 50 ms of both paths' pace held (some 120 datagrams).
const PACED_MBIT: u32 = 2;
const PACED_RATE: u32 = 3000;

/// `aggregate` with `rate` on both paths: what gw-a's lanes hold for their
/// paths' pace when an upgrade parks them is sent by the old process at
/// its time, and the new process's pace starts after it. Every packet the
/// stream lost is one a gateway refused and counted (`pace_queue`, the
/// excess over the paces); before, each upgrade lost what was held.
#[test]
fn a_paced_upgrade_sends_what_was_held() {
    if !lab::test_gate("a_paced_upgrade_sends_what_was_held", &[]) {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("upace", BIN);
    opts.policy = crosslink::config::Policy::Aggregate;
    opts.path_extra = LabPath::ALL
        .iter()
        .map(|&p| (p, format!("rate = \"{PACED_MBIT}Mbit/s\"")))
        .collect();
    let mut lab = Lab::new(opts).expect("lab");
    lab.start_gateways().expect("gateways");
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail(Gw::A, 30)));
    let mut adopted = Adopted::default();
    let mut pid = lab.gateway_pid(Gw::A).expect("gw-a pid");
    let rx = lab
        .start_receiver(PORT, Duration::from_secs(60))
        .expect("receiver");
    let tx = lab
        .start_sender(PORT, PACED_RATE, Duration::from_secs(60))
        .expect("sender");
    std::thread::sleep(Duration::from_millis(1500));
    for round in 0..3 {
        let (new, ms) = upgrade_ok(&mut lab, &mut adopted, Gw::A, pid);
        pid = new;
        println!("REPORT paced upgrade round={round} new_pid={pid} handover_ms={ms:.3}");
        std::thread::sleep(Duration::from_millis(700));
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = tx.stop().expect("sender report");
    let report = rx.finish(Duration::from_secs(5)).expect("receiver report");
    let lost = report
        .get("lost")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let received = report.get("received").and_then(Value::as_u64).unwrap_or(0);
    // Every drop the gateways counted (handed over across the upgrades).
    let drops = |gw: Gw| -> (u64, u64) {
        let s = lab.poll(gw).expect("status");
        let all = s
            .get("drops")
            .and_then(Value::as_object)
            .map_or(0, |d| d.values().filter_map(Value::as_u64).sum());
        (all, num(&s, "/drops/pace_queue"))
    };
    let ((a_all, refused), (b_all, _)) = (drops(Gw::A), drops(Gw::B));
    // What the old processes sent for their pace after they parked.
    let held: u64 = lab
        .log_tail(Gw::A, 100_000)
        .lines()
        .filter(|l| l.contains("sent what the lanes held"))
        .filter_map(|l| l.split("datagrams=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let unexplained = lost.saturating_sub(a_all + b_all);
    println!(
        "REPORT paced upgrade stream={PACED_RATE}pps paths=2x{PACED_MBIT}Mbit/s received={received} \
         lost={lost} pace_queue={refused} drops_a={a_all} drops_b={b_all} \
         held_and_sent_by_old_processes={held} lost_unexplained={unexplained}"
    );
    assert!(
        received > u64::from(PACED_RATE),
        "the stream did not flow: {report}"
    );
    assert!(
        refused > 0,
        "the stream never filled the pace: nothing was held"
    );
    assert!(
        held > 0,
        "no old process had anything held to send\n{}",
        lab.log_tail(Gw::A, 40)
    );
    // Lost beyond what the gateways counted: what an upgrade threw away.
    assert!(
        unexplained <= 20,
        "{unexplained} packets lost that no gateway counted (held at an upgrade?): {report}"
    );
}
