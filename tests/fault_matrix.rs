//! The fault matrix: every way a path or a gateway fails, each injected into
//! the netns lab of `crosslink::lab` (client - gw-a - path1/path2 - gw-b -
//! server; active-backup, BFD 20 ms x 3, revert_hold 200 ms, data sealed with
//! a key) while a 1000 packet/s probe stream runs each way through the tunnel.
//!
//! For each fault it measures the outage (ms of traffic lost, from the probe
//! reports, attributed to the fault by time) and the recovery (how long until
//! traffic is back where it was, and what the way back lost), prints one
//! `REPORT fault_matrix` line and, after every test, the table of the rows so
//! far (with `--test-threads=1` the last one is the whole matrix). Bounds are
//! generous: this is a loaded 2-core machine whose stalls of 15-40 ms can
//! flap a 60 ms BFD session. Such a spurious flap (a transition on a path no
//! fault touched) is printed as a WARNING and relaxes the timing bounds,
//! unless `CROSSLINK_NETNS_STRICT=1`.
//!
//! Run: `CROSSLINK_NETNS_REQUIRED=1 cargo test --test fault_matrix -- --test-threads=1`
//! (root; without root the tests skip unless `CROSSLINK_NETNS_REQUIRED=1`).

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crosslink::lab::{
    self, say, Direction, Gw, Host, Lab, LabOptions, LabPath, ProbeReceiver, ProbeSender,
    CLIENT_ADDR, SERVER_ADDR,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const RATE: u32 = 1000;
const KEY: &str = "8c1f3e5a7b9d2c4e6f8a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e";
const HOLD: Duration = Duration::from_millis(200);
const P1: LabPath = LabPath::Path1;
const P2: LabPath = LabPath::Path2;

static SERIAL: Mutex<()> = Mutex::new(());
static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn strict() -> bool {
    std::env::var("CROSSLINK_NETNS_STRICT").as_deref() == Ok("1")
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------
// The matrix table
// ---------------------------------------------------------------------------

/// One line of the matrix.
#[derive(Clone, Debug, Default)]
struct Row {
    fault: String,
    /// Traffic lost because of the fault, client -> server and back (ms).
    outage_fwd_ms: f64,
    outage_rev_ms: f64,
    /// From the end of the fault (or the restart) until traffic is back where it was.
    recovery_ms: f64,
    /// Traffic lost on the way back (both directions, ms).
    recovery_lost_ms: f64,
    notes: String,
}

fn record(row: Row) {
    say(&format!(
        "REPORT fault_matrix fault={} outage_fwd_ms={:.0} outage_rev_ms={:.0} recovery_ms={:.0} \
         recovery_lost_ms={:.0} {}",
        row.fault,
        row.outage_fwd_ms,
        row.outage_rev_ms,
        row.recovery_ms,
        row.recovery_lost_ms,
        row.notes
    ));
    let mut rows = ROWS.lock().unwrap_or_else(|e| e.into_inner());
    rows.push(row);
    let mut table = format!(
        "MATRIX (BFD 20 ms x 3, revert_hold 200 ms, {RATE} pps each way)\n\
         {:<26} {:>10} {:>10} {:>11} {:>12}  notes\n",
        "fault", "out fwd ms", "out rev ms", "recovery ms", "rec lost ms"
    );
    for r in rows.iter() {
        table.push_str(&format!(
            "{:<26} {:>10.0} {:>10.0} {:>11.0} {:>12.0}  {}\n",
            r.fault, r.outage_fwd_ms, r.outage_rev_ms, r.recovery_ms, r.recovery_lost_ms, r.notes
        ));
    }
    say(&table);
}

// ---------------------------------------------------------------------------
// The lab, its status, the streams
// ---------------------------------------------------------------------------

fn matrix_lab(tag: &str) -> Lab {
    let mut opts = LabOptions::new(tag, BIN);
    opts.tx_interval = Duration::from_millis(20);
    opts.rx_interval = Duration::from_millis(20);
    opts.multiplier = 3;
    opts.revert_hold = HOLD;
    opts.key = Some(KEY.to_string());
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(20)).unwrap();
    lab
}

fn allowed(test: &str) -> bool {
    lab::test_gate(test, &[("nft", "nftables")])
}

fn state(s: &Value, p: LabPath) -> String {
    lab::path_state(s, p).unwrap_or_default()
}

fn bfd_str(s: &Value, p: LabPath, key: &str) -> String {
    lab::path_status(s, p)
        .and_then(|v| v.pointer(&format!("/bfd/{key}")))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn path_u64(s: &Value, p: LabPath, pointer: &str) -> u64 {
    lab::path_status(s, p)
        .and_then(|v| v.pointer(pointer))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// BFD transitions of `p` on both gateways.
fn transitions(lab: &Lab, p: LabPath) -> [u64; 2] {
    Gw::ALL.map(|gw| {
        lab.poll(gw)
            .map_or(0, |s| path_u64(&s, p, "/bfd/transitions"))
    })
}

/// Polls both gateways until `cond` holds on both; returns when, or panics.
fn wait_both(lab: &mut Lab, what: &str, timeout: Duration, cond: impl Fn(&Value) -> bool) {
    if let Err(e) = lab.wait_for(what, timeout, |_, s| cond(s)) {
        let now: Vec<String> = Gw::ALL
            .iter()
            .map(|g| {
                lab.poll(*g)
                    .map_or_else(|e| e.to_string(), |s| s.to_string())
            })
            .collect();
        panic!("{e}; status: {now:?}");
    }
}

fn on_backup(s: &Value) -> bool {
    state(s, P1) != "up" && lab::path_active(s, P2)
}

fn on_primary(s: &Value) -> bool {
    state(s, P1) == "up" && lab::path_active(s, P1)
}

/// A probe stream each way: client -> server (fwd) and server -> client (rev).
struct Streams {
    fwd: (ProbeSender, ProbeReceiver),
    rev: (ProbeSender, ProbeReceiver),
}

struct Reports {
    fwd: Value,
    rev: Value,
}

impl Streams {
    fn start(lab: &Lab) -> Streams {
        let max = Duration::from_secs(90);
        let to_server = SocketAddr::from((SERVER_ADDR, 9000));
        let to_client = SocketAddr::from((CLIENT_ADDR, 9001));
        let fwd_rx = lab.start_receiver_at(Host::Server, to_server, max).unwrap();
        let rev_rx = lab.start_receiver_at(Host::Client, to_client, max).unwrap();
        let fwd_tx = lab
            .start_sender_from(Host::Client, to_server, RATE, max)
            .unwrap();
        let rev_tx = lab
            .start_sender_from(Host::Server, to_client, RATE, max)
            .unwrap();
        Streams {
            fwd: (fwd_tx, fwd_rx),
            rev: (rev_tx, rev_rx),
        }
    }

    fn stop(self) -> Reports {
        let finish = |(tx, rx): (ProbeSender, ProbeReceiver)| {
            let _ = tx.stop();
            rx.finish(Duration::from_secs(3)).unwrap()
        };
        Reports {
            fwd: finish(self.fwd),
            rev: finish(self.rev),
        }
    }
}

/// The outages of a probe report as (start, end) in Unix ms.
fn outages(report: &Value) -> Vec<(f64, f64)> {
    let base = num(report, "first_packet_unix_ms");
    let listed = report["outages"].as_array().map_or(0, Vec::len);
    assert!(
        num(report, "outage_count") <= listed as f64,
        "the probe listed only {listed} outages: {}",
        num(report, "outage_count")
    );
    report["outages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|o| {
                    let start = base + num(o, "start_ms");
                    (start, start + num(o, "ms"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Traffic lost (ms) in outages that started in `[from, to)` (Unix ms; a few
/// ms of slack before `from` for packets already in flight).
fn lost_between(report: &Value, from: f64, to: f64) -> f64 {
    outages(report)
        .iter()
        .filter(|(s, _)| *s >= from - 5.0 && *s < to)
        .fold(0.0, |sum, (s, e)| sum + (e - s))
}

/// When traffic flowed again after the outage that covers (or follows) `t`.
fn resumed_after(report: &Value, t: f64) -> Option<f64> {
    outages(report)
        .iter()
        .filter(|(s, e)| *e >= t && *s <= t + 60_000.0)
        .map(|(_, e)| *e)
        .next()
}

/// Whether a path no fault touched changed state (a machine stall): says so.
fn stalled(lab: &Lab, untouched: LabPath, before: [u64; 2], test: &str) -> bool {
    let after = transitions(lab, untouched);
    let flapped = after != before;
    if flapped {
        say(&format!(
            "WARNING {test}: spurious BFD flaps on the untouched {untouched} \
             (transitions gw-a, gw-b: {before:?} -> {after:?}): a machine stall; \
             timing bounds relaxed"
        ));
    }
    assert!(
        !flapped || !strict(),
        "{untouched} flapped although no fault touched it"
    );
    flapped
}

// ---------------------------------------------------------------------------
// Cut the active path, heal it
// ---------------------------------------------------------------------------

type Fault<'a> = &'a dyn Fn(&mut Lab);

/// Cuts path1 (the active path) with `cut`, waits until both gateways carry
/// both directions on path2, looks at both gateways' status with `inspect`
/// (returns notes for the row), heals with `heal` and waits until both are
/// back on path1. Returns the row, after the generous bounds are checked.
fn cut_and_heal(
    lab: &mut Lab,
    fault: &str,
    cut: Fault,
    heal: Fault,
    inspect: &dyn Fn(&Value, &Value) -> String,
) -> Row {
    let untouched = transitions(lab, P2);
    let streams = Streams::start(lab);
    std::thread::sleep(Duration::from_millis(500));
    let t_cut = unix_ms();
    let cut_at = Instant::now();
    cut(lab);
    wait_both(lab, "failover to path2", Duration::from_secs(5), on_backup);
    let detect_ms = ms_since(cut_at);
    let (a, b) = (lab.poll(Gw::A).unwrap(), lab.poll(Gw::B).unwrap());
    let notes = inspect(&a, &b);
    std::thread::sleep(Duration::from_millis(500));
    let t_heal = unix_ms();
    let heal_at = Instant::now();
    heal(lab);
    wait_both(lab, "back on path1", Duration::from_secs(15), on_primary);
    let recovery_ms = ms_since(heal_at);
    std::thread::sleep(Duration::from_millis(300));
    let r = streams.stop();
    let row = Row {
        fault: fault.to_string(),
        outage_fwd_ms: lost_between(&r.fwd, t_cut, t_heal),
        outage_rev_ms: lost_between(&r.rev, t_cut, t_heal),
        recovery_ms,
        recovery_lost_ms: lost_between(&r.fwd, t_heal, f64::MAX)
            + lost_between(&r.rev, t_heal, f64::MAX),
        notes: format!("both_on_backup_after_ms={detect_ms:.0} {notes}"),
    };
    let stall = stalled(lab, P2, untouched, fault);
    for rep in [&r.fwd, &r.rev] {
        assert!(num(rep, "received") > 1000.0, "{fault}: stream: {rep}");
    }
    for o in [row.outage_fwd_ms, row.outage_rev_ms] {
        assert!(
            o < 600.0 || (stall && !strict()),
            "{fault}: outage {o} ms at BFD 20 ms x 3: {row:?}"
        );
    }
    assert!(
        row.recovery_lost_ms < 200.0 || (stall && !strict()),
        "{fault}: the way back lost {} ms: {row:?}",
        row.recovery_lost_ms
    );
    row
}

fn no_notes(_: &Value, _: &Value) -> String {
    String::new()
}

#[test]
fn f1_blackhole() {
    if !allowed("f1_blackhole") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmbh");
    let row = cut_and_heal(
        &mut lab,
        "blackhole",
        &|l| l.blackhole(P1).unwrap(),
        &|l| l.heal(P1).unwrap(),
        &no_notes,
    );
    record(row);
}

#[test]
fn f2_carrier_loss() {
    if !allowed("f2_carrier_loss") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmcl");
    let row = cut_and_heal(
        &mut lab,
        "carrier_loss",
        &|l| l.link_down(P1).unwrap(),
        &|l| l.link_up(P1).unwrap(),
        &|a, _| {
            format!(
                "blocked={}",
                lab::path_status(a, P1).map_or(Value::Null, |p| p["blocked"].clone())
            )
        },
    );
    record(row);
}

/// One-way loss: the side that stops receiving times out (diag
/// control_detection_expired); the other learns it from the state in the
/// packets it still receives (diag neighbor_down). Both must agree.
fn one_way(direction: Direction, fault: &str, tag: &str) {
    let mut lab = matrix_lab(tag);
    let (deaf, told) = match direction {
        Direction::AToB => (Gw::B, Gw::A),
        Direction::BToA => (Gw::A, Gw::B),
    };
    let row = cut_and_heal(
        &mut lab,
        fault,
        &|l| l.drop_one_way(P1, direction).unwrap(),
        &|l| l.heal(P1).unwrap(),
        &|a, b| {
            let s = |gw: Gw| if gw == Gw::A { a } else { b };
            let diag = |gw: Gw| bfd_str(s(gw), P1, "local_diag");
            assert_eq!(
                diag(deaf),
                "control_detection_expired",
                "{fault}: {deaf} stopped receiving: {}",
                s(deaf)
            );
            for gw in Gw::ALL {
                assert_ne!(state(s(gw), P1), "up", "{fault}: {gw} disagrees: {}", s(gw));
            }
            format!(
                "{deaf}:{}/{} {told}:{}/{}",
                state(s(deaf), P1),
                diag(deaf),
                state(s(told), P1),
                diag(told)
            )
        },
    );
    record(row);
}

#[test]
fn f3a_one_way_loss_a_to_b() {
    if !allowed("f3a_one_way_loss_a_to_b") {
        return;
    }
    let _s = serial();
    one_way(Direction::AToB, "one_way_a_to_b", "fmab");
}

#[test]
fn f3b_one_way_loss_b_to_a() {
    if !allowed("f3b_one_way_loss_b_to_a") {
        return;
    }
    let _s = serial();
    one_way(Direction::BToA, "one_way_b_to_a", "fmba");
}

#[test]
fn f8b_address_removed_and_readded() {
    if !allowed("f8b_address_removed_and_readded") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmar");
    let addr = format!("{}/30", P1.addr(Gw::A));
    let row = cut_and_heal(
        &mut lab,
        "address_removed_readded",
        &|l| {
            drop(
                l.ip_in(Host::GwA, &["addr", "del", &addr, "dev", "path1"])
                    .unwrap(),
            )
        },
        &|l| {
            drop(
                l.ip_in(Host::GwA, &["addr", "add", &addr, "dev", "path1"])
                    .unwrap(),
            )
        },
        &|a, _| {
            let p = lab::path_status(a, P1).map_or(Value::Null, |p| p["blocked"].clone());
            format!("blocked={p}")
        },
    );
    // The sockets bound to the address carry data again: both ways on path1.
    let (a0, b0) = (lab.poll(Gw::A).unwrap(), lab.poll(Gw::B).unwrap());
    let streams = Streams::start(&lab);
    std::thread::sleep(Duration::from_millis(1000));
    let r = streams.stop();
    let (a1, b1) = (lab.poll(Gw::A).unwrap(), lab.poll(Gw::B).unwrap());
    let grew = |s0: &Value, s1: &Value, k: &str| {
        path_u64(s1, P1, &format!("/{k}")).saturating_sub(path_u64(s0, P1, &format!("/{k}")))
    };
    let (tx_a, rx_a) = (grew(&a0, &a1, "tx_packets"), grew(&a0, &a1, "rx_packets"));
    assert!(
        tx_a > 500 && rx_a > 500,
        "after the re-add gw-a's path1 sockets should work: tx +{tx_a} rx +{rx_a}"
    );
    assert!(grew(&b0, &b1, "rx_packets") > 500, "gw-b path1 rx: {b1}");
    for rep in [&r.fwd, &r.rev] {
        assert!(num(rep, "received") > 500.0, "{rep}");
    }
    record(row);
}

// ---------------------------------------------------------------------------
// Random loss and flapping
// ---------------------------------------------------------------------------

fn damping(s: &Value, p: LabPath) -> (u64, u64) {
    (path_u64(s, p, "/flaps"), path_u64(s, p, "/damping_level"))
}

/// Loss in % of what was sent, and lost packets, of a report.
fn loss_pct(r: &Value) -> f64 {
    100.0 * num(r, "lost") / num(r, "sent").max(1.0)
}

/// Runs `impair` (which returns when the impaired period is over), heals
/// path1 and measures until both gateways are back on it. Returns the row
/// and the two stream reports.
fn impaired_period(lab: &mut Lab, fault: &str, secs: f64, impair: Fault) -> (Row, Reports) {
    let before = transitions(lab, P1);
    let streams = Streams::start(lab);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = unix_ms();
    impair(lab);
    let t_heal = unix_ms();
    let (a, b) = (lab.poll(Gw::A).unwrap(), lab.poll(Gw::B).unwrap());
    lab.heal(P1).unwrap();
    let healed = Instant::now();
    // The damped hold is at most revert_hold x 2^5 = 6.4 s.
    wait_both(lab, "back on path1", Duration::from_secs(15), on_primary);
    let recovery_ms = ms_since(healed);
    std::thread::sleep(Duration::from_millis(300));
    let r = streams.stop();
    let after = transitions(lab, P1);
    let (fa, la) = damping(&a, P1);
    let (fb, lb) = damping(&b, P1);
    let row = Row {
        fault: fault.to_string(),
        outage_fwd_ms: lost_between(&r.fwd, t0, t_heal),
        outage_rev_ms: lost_between(&r.rev, t0, t_heal),
        recovery_ms,
        recovery_lost_ms: lost_between(&r.fwd, t_heal, f64::MAX)
            + lost_between(&r.rev, t_heal, f64::MAX),
        notes: format!(
            "over_s={secs:.1} stream_loss_fwd={:.1}% stream_loss_rev={:.1}% path1_transitions a={} b={} \
             flaps a={fa} b={fb} damping_level a={la} b={lb} path1_active_at_heal a={} b={}",
            loss_pct(&r.fwd),
            loss_pct(&r.rev),
            after[0] - before[0],
            after[1] - before[1],
            u64::from(lab::path_active(&a, P1)),
            u64::from(lab::path_active(&b, P1)),
        ),
    };
    (row, r)
}

#[test]
fn f4_random_loss_30_percent() {
    if !allowed("f4_random_loss_30_percent") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmrl");
    let secs = 8.0;
    let untouched = transitions(&lab, P2);
    let (row, r) = impaired_period(&mut lab, "random_loss_30pct", secs, &|l| {
        l.random_loss(P1, 30).unwrap();
        std::thread::sleep(Duration::from_secs_f64(secs));
    });
    let stall = stalled(&lab, P2, untouched, "random_loss_30pct");
    // Lost in the impaired period only (the streams also ran before and after).
    let lost_fwd = 100.0 * row.outage_fwd_ms / (secs * 1e3);
    let lost_rev = 100.0 * row.outage_rev_ms / (secs * 1e3);
    say(&format!(
        "REPORT fault_matrix random_loss_30pct impaired_period_loss fwd={lost_fwd:.1}% \
         rev={lost_rev:.1}% (30% if traffic had stayed on path1); longest outage fwd {} ms \
         rev {} ms",
        num(&r.fwd, "longest_outage_ms"),
        num(&r.rev, "longest_outage_ms")
    ));
    let s = lab.poll(Gw::A).unwrap();
    assert!(
        damping(&s, P1).0 >= 1,
        "30% loss never took path1 down: {s}"
    );
    for l in [lost_fwd, lost_rev] {
        assert!(
            l < 15.0 || (stall && !strict()),
            "traffic stayed on the lossy path: {l:.1}% lost; {row:?}"
        );
    }
    record(row);
}

/// path1 flaps: each time BFD has it up again, it stays up for 200 ms and is then
/// blackholed for 200 ms. A session that is not Up sends one control packet a
/// second (RFC 5880 section 6.8.3), so with a fixed 200 ms on/off rhythm whether
/// path1 came back between cuts would be down to luck; waiting for it makes every
/// cut a flap.
#[test]
fn f5_flapping() {
    if !allowed("f5_flapping") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmfl");
    let secs = 5.0;
    let untouched = transitions(&lab, P2);
    let (row, _r) = impaired_period(&mut lab, "flapping_200ms", secs, &|l| {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            l.blackhole(P1).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() >= end {
                // impaired_period heals the last cut.
                break;
            }
            l.heal(P1).unwrap();
            l.wait_for(
                "path1 up again after a heal",
                Duration::from_secs(5),
                |_, s| state(s, P1) == "up",
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let s = lab.poll(Gw::A).unwrap();
    let (flaps, level) = damping(&s, P1);
    assert!(flaps >= 3, "path1 should have flapped: {s}");
    let stall = stalled(&lab, P2, untouched, "flapping_200ms");
    // Following path1 through every cut would lose about 60 ms per cut;
    // settled on path2, only the first cut costs anything.
    for o in [row.outage_fwd_ms, row.outage_rev_ms] {
        assert!(
            o < 400.0 || (stall && !strict()),
            "traffic did not settle on path2: {o} ms lost: {row:?}"
        );
    }
    // After the flapping, path1 returns by itself, after the damped hold
    // (at most revert_hold x 32), not before.
    let hold = crosslink::core::steer::damped_hold(HOLD, level as u32).as_secs_f64() * 1e3;
    say(&format!(
        "REPORT fault_matrix flapping_200ms damped_hold_ms={hold:.0} back_after_ms={:.0}",
        row.recovery_ms
    ));
    assert!(row.recovery_ms < 12_000.0, "{row:?}");
    assert!(
        row.recovery_ms > hold - 250.0 || (stall && !strict()),
        "path1 came back before its damped hold ({hold} ms): {row:?}"
    );
    record(row);
}

// ---------------------------------------------------------------------------
// Daemons killed and restarted
// ---------------------------------------------------------------------------

fn tun_name(gw: Gw) -> &'static str {
    match gw {
        Gw::A => "xl-b",
        Gw::B => "xl-a",
    }
}

fn routed_prefix(gw: Gw) -> &'static str {
    match gw {
        Gw::A => "198.18.30.0/24",
        Gw::B => "198.18.10.0/24",
    }
}

fn tun_exists(lab: &Lab, gw: Gw) -> bool {
    lab.ip_in(gw.host(), &["link", "show", tun_name(gw)])
        .is_ok()
}

fn route_exists(lab: &Lab, gw: Gw) -> bool {
    lab.ip_in(gw.host(), &["route", "show", routed_prefix(gw)])
        .is_ok_and(|o| !o.trim().is_empty())
}

/// What is left of a stopped gateway: TUN, route, control socket file.
fn leftovers(lab: &Lab, gw: Gw) -> String {
    format!(
        "tun={} route={} socket={}",
        tun_exists(lab, gw),
        route_exists(lab, gw),
        lab.socket_path(gw).exists()
    )
}

/// Stops `victim` (SIGKILL, or SIGTERM when `clean`), checks what it left,
/// runs `before_start`, starts it again and measures until traffic flows again.
fn restart(lab: &mut Lab, fault: &str, victim: Gw, clean: bool, before_start: Fault) -> Row {
    let streams = Streams::start(lab);
    std::thread::sleep(Duration::from_millis(500));
    let t_stop = unix_ms();
    let stopped_at = Instant::now();
    if clean {
        let st = lab.stop_gateway(victim).unwrap();
        assert!(st.success(), "{victim} did not stop cleanly: {st}");
    } else {
        lab.kill_gateway(victim).unwrap();
    }
    let left = leftovers(lab, victim);
    if clean {
        assert!(
            !tun_exists(lab, victim)
                && !route_exists(lab, victim)
                && !lab.socket_path(victim).exists(),
            "{fault}: a clean stop left {left}"
        );
    }
    let other = if victim == Gw::A { Gw::B } else { Gw::A };
    // The survivor sees the peer go: both paths down (AdminDown after a clean stop).
    let end = Instant::now() + Duration::from_secs(5);
    let mut survivor_saw = String::new();
    while Instant::now() < end {
        let s = lab.poll(other).unwrap();
        if LabPath::ALL.iter().all(|p| state(&s, *p) != "up") {
            survivor_saw = format!(
                "{other}_down_after_ms={:.0} {other}_diag={}",
                ms_since(stopped_at),
                bfd_str(&s, P1, "local_diag")
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!survivor_saw.is_empty(), "{other} never saw {victim} go");
    std::thread::sleep(Duration::from_millis(500));
    before_start(lab);
    let t_start = unix_ms();
    let started = Instant::now();
    lab.start_gateway(victim).unwrap();
    lab.wait_paths_up(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{fault}: {e}; {victim} log:\n{}", lab.log_tail(victim, 20)));
    let paths_up_ms = ms_since(started);
    assert!(
        tun_exists(lab, victim) && route_exists(lab, victim),
        "{fault}: TUN/route not recreated"
    );
    std::thread::sleep(Duration::from_millis(500));
    let r = streams.stop();
    let resumed = |rep: &Value| resumed_after(rep, t_stop).map_or(f64::NAN, |e| e - t_start);
    let row = Row {
        fault: fault.to_string(),
        outage_fwd_ms: lost_between(&r.fwd, t_stop, f64::MAX),
        outage_rev_ms: lost_between(&r.rev, t_stop, f64::MAX),
        recovery_ms: resumed(&r.fwd).max(resumed(&r.rev)),
        recovery_lost_ms: lost_between(&r.fwd, t_start + paths_up_ms, f64::MAX)
            + lost_between(&r.rev, t_start + paths_up_ms, f64::MAX),
        notes: format!(
            "down_for_ms={:.0} left_behind: {left} {survivor_saw} paths_up_after_start_ms={paths_up_ms:.0}",
            t_start - t_stop
        ),
    };
    for rep in [&r.fwd, &r.rev] {
        assert!(num(rep, "received") > 500.0, "{fault}: {rep}");
    }
    // Traffic flows again soon after the restart, without manual action.
    assert!(
        row.recovery_ms < 10_000.0,
        "{fault}: traffic resumed {} ms after the restart: {row:?}",
        row.recovery_ms
    );
    row
}

#[test]
fn f6_peer_killed_and_restarted() {
    if !allowed("f6_peer_killed_and_restarted") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmpk");
    let row = restart(&mut lab, "peer_sigkill_restart", Gw::B, false, &|_| ());
    record(row);
}

#[test]
fn f7a_local_clean_restart() {
    if !allowed("f7a_local_clean_restart") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmlr");
    let row = restart(&mut lab, "local_sigterm_restart", Gw::A, true, &|_| ());
    record(row);
}

#[test]
fn f7b_local_killed_and_restarted() {
    if !allowed("f7b_local_killed_and_restarted") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmlk");
    // Worse than what SIGKILL leaves (the kernel removes crosslink's own
    // TUN with its last descriptor): a persistent device of the same name,
    // left by someone else. crosslink takes it over and removes it at stop.
    let leftover = |l: &mut Lab| {
        let tun = tun_name(Gw::A);
        l.ip_in(Host::GwA, &["tuntap", "add", "dev", tun, "mode", "tun"])
            .unwrap();
        l.ip_in(Host::GwA, &["addr", "add", "198.18.98.1/30", "dev", tun])
            .unwrap();
    };
    let row = restart(&mut lab, "local_sigkill_restart", Gw::A, false, &leftover);
    let st = lab.stop_gateway(Gw::A).unwrap();
    assert!(st.success(), "gw-a did not stop cleanly: {st}");
    let left = leftovers(&lab, Gw::A);
    assert_eq!(left, "tun=false route=false socket=false", "after the stop");
    record(row);
}

// ---------------------------------------------------------------------------
// Underlay renumbered
// ---------------------------------------------------------------------------

#[test]
fn f8a_underlay_renumbered_and_reloaded() {
    if !allowed("f8a_underlay_renumbered_and_reloaded") {
        return;
    }
    let _s = serial();
    let mut lab = matrix_lab("fmrn");
    // path1 moves from 198.18.21.0/30 to 198.18.25.0/30 on both gateways
    // (gw-a's local and gw-b's remote change, and the other way round).
    let new = |gw: Gw| match gw {
        Gw::A => "198.18.25.1",
        Gw::B => "198.18.25.2",
    };
    let untouched = transitions(&lab, P2);
    let streams = Streams::start(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let t_cut = unix_ms();
    let cut_at = Instant::now();
    for gw in Gw::ALL {
        let old = format!("{}/30", P1.addr(gw));
        lab.ip_in(gw.host(), &["addr", "del", &old, "dev", "path1"])
            .unwrap();
        let add = format!("{}/30", new(gw));
        lab.ip_in(gw.host(), &["addr", "add", &add, "dev", "path1"])
            .unwrap();
    }
    for gw in Gw::ALL {
        let mut text = lab.config_text(gw);
        for g in Gw::ALL {
            text = text.replace(&format!("{}:", P1.addr(g)), &format!("{}:", new(g)));
        }
        lab.write_config(gw, &text).unwrap();
        lab.reload_gateway(gw).unwrap();
    }
    let reloaded_ms = ms_since(cut_at);
    wait_both(
        &mut lab,
        "path1 up at its new addresses",
        Duration::from_secs(10),
        |s| {
            on_primary(s)
                && lab::path_status(s, P1)
                    .and_then(|p| p["local"].as_str())
                    .is_some_and(|l| l.starts_with("198.18.25."))
        },
    );
    let back_ms = ms_since(cut_at);
    std::thread::sleep(Duration::from_millis(300));
    let r = streams.stop();
    let stall = stalled(&lab, P2, untouched, "underlay_renumbered");
    let row = Row {
        fault: "underlay_renumbered".into(),
        outage_fwd_ms: lost_between(&r.fwd, t_cut, f64::MAX),
        outage_rev_ms: lost_between(&r.rev, t_cut, f64::MAX),
        recovery_ms: back_ms,
        recovery_lost_ms: 0.0,
        notes: format!("reload_sent_after_ms={reloaded_ms:.0} (recovery: from renumbering to path1 active again)"),
    };
    // path2 carried the traffic meanwhile.
    for o in [row.outage_fwd_ms, row.outage_rev_ms] {
        assert!(o < 600.0 || (stall && !strict()), "{row:?}");
    }
    record(row);
}
