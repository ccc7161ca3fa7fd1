//! The `aggregate` policy on real sockets (root): one TCP stream through
//! the gateways over two paths shaped with `tc tbf`, against
//! `active-backup` over the same paths in the same run; and a path cut in
//! the middle of the stream.
//!
//! Each case prints a `REPORT aggregate ...` line. The asserts are generous
//! bounds (this machine is shared and noisy); the targets, and the
//! benchmark that measures them (`benches/aggregate.rs`), are in the
//! README (Aggregate).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crosslink::config::Policy;
use crosslink::lab::{self, Lab, LabOptions, LabPath};

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
/// Each path's shaped rate in these tests (Mbit/s): low enough for a
/// loaded 2-core machine to fill both.
const MBIT: u32 = 100;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fixed test key (hex, 32 bytes); the lab is thrown away afterwards.
const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0\n";

fn lab(tag: &str, policy: Policy) -> Lab {
    sealed_lab(tag, policy, false)
}

fn sealed_lab(tag: &str, policy: Policy, sealed: bool) -> Lab {
    lab_with(tag, policy, sealed, Vec::new())
}

fn lab_with(tag: &str, policy: Policy, sealed: bool, path_extra: Vec<(LabPath, String)>) -> Lab {
    let mut opts = LabOptions::new(tag, BIN);
    opts.policy = policy;
    opts.path_extra = path_extra;
    if sealed {
        opts.key = Some(KEY.to_string());
    }
    opts.revert_hold = Duration::from_millis(500);
    let mut lab = Lab::new(opts).unwrap();
    for path in LabPath::ALL {
        lab.shape(path, MBIT).unwrap();
    }
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    lab
}

/// One TCP stream for `secs`: the received rate and each second's, Mbit/s.
fn stream(lab: &Lab, secs: u64) -> (f64, Vec<f64>) {
    let run = lab.start_iperf3(1, secs).unwrap();
    let (total, intervals) = run.finish_intervals().expect("iperf3 report");
    (total / 1e6, intervals.iter().map(|b| b / 1e6).collect())
}

#[test]
fn one_stream_uses_both_shaped_paths() {
    if !lab::test_gate(
        "one_stream_uses_both_shaped_paths",
        &[("iperf3", "iperf3"), ("tc", "iproute2")],
    ) {
        return;
    }
    let _g = serial();
    let mut got = Vec::new();
    for (tag, policy) in [("agab", Policy::ActiveBackup), ("agag", Policy::Aggregate)] {
        let lab = lab(tag, policy);
        let (mbit, _) = stream(&lab, 6);
        let status = lab.poll(lab::Gw::A).unwrap();
        let shares: Vec<String> = LabPath::ALL
            .iter()
            .filter_map(|&p| {
                let a = lab::path_status(&status, p)?.get("aggregate")?;
                Some(format!(
                    "{}: share {:.2} rate {:.0} Mbit/s",
                    p.name(),
                    a.get("share")?.as_f64()?,
                    a.get("rate_bps")?.as_f64()? / 1e6
                ))
            })
            .collect();
        println!(
            "REPORT aggregate one stream policy={policy} paths=2x{MBIT}Mbit/s \
             got={mbit:.0}Mbit/s ratio_to_sum={:.2} [{}]",
            mbit / f64::from(2 * MBIT),
            shares.join("; ")
        );
        got.push(mbit);
    }
    let (ab, ag) = (got[0], got[1]);
    assert!(
        ab < f64::from(MBIT) * 1.1,
        "active-backup {ab:.0} Mbit/s: more than one shaped path?"
    );
    assert!(
        ag > ab * 1.3,
        "aggregate {ag:.0} Mbit/s is not well above active-backup's {ab:.0} Mbit/s"
    );
}

#[test]
fn a_path_cut_does_not_stall_the_stream() {
    if !lab::test_gate(
        "a_path_cut_does_not_stall_the_stream",
        &[("iperf3", "iperf3"), ("tc", "iproute2")],
    ) {
        return;
    }
    let _g = serial();
    let lab = lab("agcut", Policy::Aggregate);
    let run = lab.start_iperf3(1, 8).unwrap();
    // iperf3's client starts half a second after the server.
    std::thread::sleep(Duration::from_millis(500 + 3000));
    lab.blackhole(LabPath::Path1).unwrap();
    let (total, intervals) = run.finish_intervals().expect("iperf3 report");
    let mbit: Vec<f64> = intervals.iter().map(|b| b / 1e6).collect();
    let shown: Vec<String> = mbit.iter().map(|m| format!("{m:.0}")).collect();
    println!(
        "REPORT aggregate path cut at 3 s: per second [{}] Mbit/s, mean {:.0} Mbit/s",
        shown.join(" "),
        total / 1e6
    );
    assert!(mbit.len() >= 7, "intervals: {mbit:?}");
    // The second of the cut, and the ones after it: the stream goes on.
    let after = &mbit[3..];
    assert!(
        after.iter().all(|&m| m > f64::from(MBIT) * 0.2),
        "the stream stalled after the cut: {mbit:?}"
    );
    let last = mbit[mbit.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(
        last > f64::from(MBIT) * 0.6,
        "not back to the surviving path's rate: {mbit:?}"
    );
}

/// What the sending gateway's shaper on `path` dropped (`tc -s qdisc`).
fn shaper_drops(lab: &Lab, path: LabPath) -> u64 {
    let out = lab
        .command_in(lab::Host::GwA, "tc")
        .args(["-s", "qdisc", "show", "dev", path.name()])
        .output()
        .expect("tc -s qdisc");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("dropped ")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// With each path's `rate` configured at its shaper's rate, the sending
/// gateway paces the paths: a UDP stream at 1.5 times their sum fills the
/// gateway's own queue, which drops what it cannot take (`pace_queue`),
/// and the links' shapers are left next to nothing to drop; without
/// `rate`, in the same run, they drop the excess.
#[test]
fn a_paced_stream_leaves_the_shapers_nothing_to_drop() {
    if !lab::test_gate(
        "a_paced_stream_leaves_the_shapers_nothing_to_drop",
        &[("iperf3", "iperf3"), ("tc", "iproute2")],
    ) {
        return;
    }
    let _g = serial();
    let rate = |p| (p, format!("rate = \"{MBIT}Mbit/s\""));
    let mut got = Vec::new();
    for (tag, extra) in [
        ("agpl", Vec::new()),
        ("agpc", LabPath::ALL.into_iter().map(rate).collect()),
    ] {
        let paced = !extra.is_empty();
        let lab = lab_with(tag, Policy::Aggregate, false, extra);
        let offered = format!("{}M", 3 * MBIT);
        let run = lab
            .start_iperf3_with(1, 4, &["-u", "-b", &offered, "-l", "1300"])
            .unwrap();
        let mbit = run.finish().expect("iperf3 report") / 1e6;
        let shapers: u64 = LabPath::ALL.iter().map(|&p| shaper_drops(&lab, p)).sum();
        let status = lab.poll(lab::Gw::A).unwrap();
        let pace_queue = status
            .get("drops")
            .and_then(|d| d.get("pace_queue"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        println!(
            "REPORT aggregate paced={paced} paths=2x{MBIT}Mbit/s udp={}Mbit/s got={mbit:.0}Mbit/s \
             shaper_drops={shapers} pace_queue_drops={pace_queue}",
            3 * MBIT
        );
        got.push((mbit, shapers, pace_queue));
    }
    let ((plain, plain_drops, _), (paced, paced_drops, pace_queue)) = (got[0], got[1]);
    assert!(plain_drops > 0, "unpaced, the shapers dropped nothing");
    assert!(
        paced_drops * 5 < plain_drops,
        "paced, the shapers dropped {paced_drops} (unpaced {plain_drops})"
    );
    assert!(pace_queue > 0, "paced, the gateway's queue dropped nothing");
    assert!(
        paced > f64::from(MBIT) * 1.5 && paced > plain * 0.8,
        "paced {paced:.0} Mbit/s (unpaced {plain:.0})"
    );
}

/// A sealed peer under `aggregate`: the numbered, spread datagrams open and
/// are put back in order like cleartext ones.
#[test]
fn a_sealed_stream_uses_both_paths() {
    if !lab::test_gate(
        "a_sealed_stream_uses_both_paths",
        &[("iperf3", "iperf3"), ("tc", "iproute2")],
    ) {
        return;
    }
    let _g = serial();
    let lab = sealed_lab("agkey", Policy::Aggregate, true);
    let (mbit, _) = stream(&lab, 5);
    let status = lab.poll(lab::Gw::B).unwrap();
    let drops = status.get("drops").cloned().unwrap_or_default();
    println!("REPORT aggregate sealed paths=2x{MBIT}Mbit/s got={mbit:.0}Mbit/s drops={drops}");
    assert!(
        mbit > f64::from(MBIT) * 1.3,
        "sealed aggregate {mbit:.0} Mbit/s is not above one path's {MBIT} Mbit/s"
    );
    for reason in [
        "replayed",
        "auth_failed",
        "seal_mismatch",
        "duplicate",
        "duplicate_stale",
    ] {
        assert!(
            drops.get(reason).is_none(),
            "sealed datagrams refused as {reason}: {drops}"
        );
    }
}
