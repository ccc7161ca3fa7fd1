//! End-to-end tests in a throwaway network-namespace lab (see `crosslink::lab`): real
//! crosslink gateways, real veth paths, a real 1000 packet/s UDP stream.
//!
//! They need root. Without it they print a skip message and pass, unless
//! `CROSSLINK_NETNS_REQUIRED=1` (set by `.ci/run`), where not being root is a failure.
//! They run one at a time (a 2-core machine, millisecond timing).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crosslink::lab::{self, Gw, Host, Lab, LabOptions, LabPath};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const PORT: u16 = 9000;
const RATE: u32 = 1000;

static SERIAL: Mutex<()> = Mutex::new(());

/// CROSSLINK_NETNS_STRICT=1: spurious BFD flaps (machine stalls) fail the test.
fn strict() -> bool {
    std::env::var("CROSSLINK_NETNS_STRICT").as_deref() == Ok("1")
}

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_until(
    lab: &mut Lab,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Instant {
    let end = Instant::now() + timeout;
    loop {
        lab.check_gateways().unwrap();
        if let Ok(status) = lab.poll(Gw::A) {
            if cond(&status) {
                return Instant::now();
            }
        }
        assert!(
            Instant::now() < end,
            "gw-a: {what} did not happen within {timeout:?}; status: {}",
            lab.status(Gw::A)
                .map_or_else(|e| e.to_string(), |s| s.to_string())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Data packets sent by gw-a on each path during `over`.
fn tx_growth(lab: &Lab, over: Duration) -> (u64, u64) {
    let before = lab.poll(Gw::A).unwrap();
    std::thread::sleep(over);
    let after = lab.poll(Gw::A).unwrap();
    let grew = |p| {
        lab::path_counter(&after, p, "tx_packets").saturating_sub(lab::path_counter(
            &before,
            p,
            "tx_packets",
        ))
    };
    (grew(LabPath::Path1), grew(LabPath::Path2))
}

fn path1_state(s: &Value) -> Option<String> {
    lab::path_state(s, LabPath::Path1)
}

#[test]
fn failover_on_blackhole_and_revert_after_hold() {
    if !lab::test_gate("failover_on_blackhole_and_revert_after_hold", &[]) {
        return;
    }
    failover_on_blackhole(false);
}

/// The same with the kernel fast path on both gateways
/// ([`crosslink::io::fastpath`]): the BPF programs carry the stream (the
/// TUN's own transmit counter stays still: the lanes never see it), their
/// counters reach the status, and a failover moves them with the lanes.
#[test]
fn fast_path_fails_over_on_blackhole_and_reverts() {
    if !lab::test_gate("fast_path_fails_over_on_blackhole_and_reverts", &[]) {
        return;
    }
    failover_on_blackhole(true);
}

/// The kernel's verifier accepts both fast-path programs as compiled
/// (`bpf/fastpath.bpf.o`), with their maps at the daemon's sizes: a program
/// the verifier refuses fails here with the verifier's last word, not in a
/// lab.
#[test]
fn fast_path_programs_pass_the_verifier() {
    if !lab::test_gate("fast_path_programs_pass_the_verifier", &[]) {
        return;
    }
    let progs = crosslink::io::fastpath::Programs::load();
    assert!(
        progs.is_ok(),
        "{}",
        progs.err().map(|e| e.to_string()).unwrap_or_default()
    );
}

/// `balance` through the kernel fast path: eight TCP flows spread over
/// both paths by the programs' bucket table (the lanes see almost none of
/// them), and a blackholed path's buckets move to the other path.
#[test]
fn fast_path_balances_flows_and_fails_over() {
    if !lab::test_gate(
        "fast_path_balances_flows_and_fails_over",
        &[("iperf3", "iperf3")],
    ) {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("fastbal", BIN);
    opts.fast_path = true;
    opts.policy = crosslink::config::Policy::Balance;
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    wait_until(&mut lab, "both paths up", Duration::from_secs(15), |s| {
        LabPath::ALL
            .iter()
            .all(|&p| lab::path_state(s, p).as_deref() == Some("up"))
    });
    // Both ends must see both paths up before the flows start.
    std::thread::sleep(Duration::from_millis(500));
    let tun_before = lab.tun_tx_packets(Gw::A);
    // 16 flows: with 8, all of them hash to one path once in 128 runs.
    let iperf = lab.start_iperf3(16, 4).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (p1, p2) = tx_growth(&lab, Duration::from_secs(1));
    let rate = iperf.finish().unwrap_or(0.0);
    let through_lanes = lab.tun_tx_packets(Gw::A).saturating_sub(tun_before);
    lab::say(&format!(
        "REPORT fast path balance: 16 TCP flows at {:.0} Mbit/s, gw-a sent path1 +{p1} path2 +{p2} datagrams in 1 s, {through_lanes} packets through the lanes",
        rate / 1e6
    ));
    assert!(rate > 0.0, "iperf3 moved nothing");
    let total = p1 + p2;
    assert!(total > 1000, "too little traffic: {p1} + {p2}");
    assert!(
        p1 * 20 > total && p2 * 20 > total,
        "both paths should carry flows: path1 +{p1}, path2 +{p2}"
    );
    // The fast path carried the flows, not the lanes (a few packets may
    // come before the table is written, and TCP's first packets of each flow).
    assert!(
        through_lanes * 10 < total,
        "the lanes carried {through_lanes} of the flows' packets"
    );

    // A blackholed path: its buckets move to the other path.
    lab.blackhole(LabPath::Path1).unwrap();
    wait_until(&mut lab, "path1 down", Duration::from_secs(3), |s| {
        lab::path_state(s, LabPath::Path1).as_deref() != Some("up")
    });
    let iperf = lab.start_iperf3(8, 3).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let (p1, p2) = tx_growth(&lab, Duration::from_secs(1));
    let rate = iperf.finish().unwrap_or(0.0);
    lab::say(&format!(
        "REPORT fast path balance, path1 blackholed: {:.0} Mbit/s, path1 +{p1} path2 +{p2} in 1 s",
        rate / 1e6
    ));
    assert!(p2 > 1000, "path2 should carry every flow: +{p2}");
    assert!(p1 <= 50, "path1 should be unused while down: +{p1}");
    assert!(rate > 0.0);
}

fn failover_on_blackhole(fast: bool) {
    let _serial = serial();
    let hold = Duration::from_secs(1);
    let mut opts = LabOptions::new(if fast { "ffo" } else { "fo" }, BIN);
    opts.revert_hold = hold;
    opts.fast_path = fast;
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let tun_before = lab.tun_tx_packets(Gw::A);

    let path2_transitions = |lab: &Lab| {
        Gw::ALL.map(|gw| {
            lab::path_status(&lab.poll(gw).unwrap(), LabPath::Path2)
                .and_then(|p| p.pointer("/bfd/transitions"))
                .and_then(Value::as_u64)
        })
    };
    let path2_before = path2_transitions(&lab);
    let receiver = lab.start_receiver(PORT, Duration::from_secs(60)).unwrap();
    let sender = lab
        .start_sender(PORT, RATE, Duration::from_secs(60))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (p1, p2) = tx_growth(&lab, Duration::from_secs(1));
    eprintln!("before the cut: gw-a tx path1 +{p1}, path2 +{p2} in 1 s");
    let flapped_before_cut = path2_transitions(&lab) != path2_before;
    assert!(
        p1 >= 800 || (flapped_before_cut && !strict()),
        "path1 should carry the stream before the cut: +{p1}"
    );
    assert!(
        p2 <= 50 || (flapped_before_cut && !strict()),
        "path2 should be idle before the cut: +{p2}; gw-a: {}",
        lab.poll(Gw::A)
            .map_or_else(|e| e.to_string(), |s| s.to_string())
    );

    lab.blackhole(LabPath::Path1).unwrap();
    let cut = Instant::now();
    let moved = wait_until(&mut lab, "failover to path2", Duration::from_secs(2), |s| {
        path1_state(s).as_deref() != Some("up") && lab::path_active(s, LabPath::Path2)
    });
    let failover_ms = moved.duration_since(cut).as_millis();
    std::thread::sleep(Duration::from_millis(200));
    let (p1, p2) = tx_growth(&lab, Duration::from_secs(1));
    eprintln!("during the cut: gw-a tx path1 +{p1}, path2 +{p2} in 1 s");
    assert!(
        p2 >= 800,
        "path2 should carry the stream during the cut: +{p2}"
    );
    assert!(p1 <= 50, "path1 should be unused while down: +{p1}");

    lab.heal(LabPath::Path1).unwrap();
    let up = wait_until(&mut lab, "path1 up again", Duration::from_secs(5), |s| {
        path1_state(s).as_deref() == Some("up")
    });
    let back = wait_until(
        &mut lab,
        "revert to path1",
        hold + Duration::from_secs(3),
        |s| lab::path_active(s, LabPath::Path1),
    );
    let held = back.duration_since(up);
    std::thread::sleep(Duration::from_millis(200));
    let (p1, p2) = tx_growth(&lab, Duration::from_secs(1));
    eprintln!("after the revert: gw-a tx path1 +{p1}, path2 +{p2} in 1 s");

    let sent = sender.stop().unwrap();
    let report = receiver.finish(Duration::from_secs(3)).unwrap();
    let num = |k: &str| report.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let tun_after = lab.tun_tx_packets(Gw::A);
    lab::say(&format!(
        "netns failover{}: outage_ms={} lost={} sent={} reordered={} duplicates={} \
         max_gap_ms={:.1} failover_seen_ms={failover_ms} revert_after_up_ms={} \
         sender_max_late_us={} tun_tx={}",
        if fast { " (fast path)" } else { "" },
        num("longest_outage_ms"),
        num("lost"),
        num("sent"),
        num("reordered"),
        num("duplicates"),
        num("max_gap_ms"),
        held.as_millis(),
        sent.get("max_late_us")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        tun_after.saturating_sub(tun_before),
    ));
    eprintln!("probe report: {report}\nsender report: {sent}");
    if fast {
        let log = lab::wait_log(
            &lab.log_path(Gw::A),
            "fast path attached",
            Duration::from_secs(3),
        );
        assert!(log.contains("fast path attached"), "gw-a: {log}");
        // A few packets may reach the lanes before the first path is up.
        let through_lanes = tun_after.saturating_sub(tun_before);
        assert!(
            through_lanes < 100,
            "the lanes carried {through_lanes} packets of the stream, not the fast path"
        );
    } else {
        assert!(
            tun_after.saturating_sub(tun_before) >= 3000,
            "the lanes should carry the stream: {tun_before} -> {tun_after}"
        );
    }
    // path2 is never touched: any BFD transition on it is a spurious flap, seen when
    // the whole machine stalls for longer than the 30 ms detection time (both daemons
    // time out at the same instant). A flap of both paths makes path1 eligible at once
    // (no other path is), so the revert timing below is then meaningless: checked only
    // without flaps, or always with CROSSLINK_NETNS_STRICT=1.
    let path2_after = path2_transitions(&lab);
    let flapped = path2_after != path2_before;
    if flapped {
        lab::say(&format!(
            "WARNING netns failover: spurious BFD flaps on the untouched path2 \
             (transitions gw-a, gw-b: {path2_before:?} -> {path2_after:?}); \
             revert-timing checks skipped (see the gateway logs)"
        ));
    }
    assert!(
        !flapped || !strict(),
        "path2 flapped although it was never touched: {path2_before:?} -> {path2_after:?}"
    );
    // After spurious flaps, flap damping holds path1 back longer than
    // revert_hold (by design), so it may not carry the stream yet.
    assert!(
        p1 >= 800 || flapped,
        "path1 should carry the stream after the revert: +{p1}"
    );
    assert!(
        p2 <= 50 || flapped,
        "path2 should stop carrying after the revert: +{p2}"
    );
    assert!(
        // slack for status polling and scheduling on a loaded 2-core machine
        held >= hold.saturating_sub(Duration::from_millis(250)) || flapped,
        "traffic returned to path1 {held:?} after it came up, before revert_hold {hold:?}"
    );
    assert!(num("sent") >= 3000.0, "the stream was too short: {report}");
    assert!(
        num("longest_outage_ms") < 200.0,
        "outage {} ms is not < 200 ms at BFD 10 ms x 3: {report}",
        num("longest_outage_ms")
    );
}

fn assert_fields(gw: Gw, status: &Value) {
    let has = |v: &Value, key: &str| {
        assert!(v.get(key).is_some(), "{gw}: status lacks `{key}` in {v}");
    };
    for key in ["gateway", "version", "peers"] {
        has(status, key);
    }
    let peer = &status["peers"][0];
    for key in ["name", "tun", "up", "policy", "paths"] {
        has(peer, key);
    }
    let (name, tun) = match gw {
        Gw::A => ("b", "xl-b"),
        Gw::B => ("a", "xl-a"),
    };
    assert_eq!(status["gateway"], gw.name());
    assert_eq!(peer["name"], name);
    assert_eq!(peer["tun"], tun);
    assert_eq!(peer["up"], true);
    assert_eq!(peer["policy"], "active-backup");
    let paths = peer["paths"].as_array().expect("paths is an array");
    assert_eq!(paths.len(), 2, "{gw}: {status}");
    for path in paths {
        for key in [
            "name",
            "state",
            "active",
            "flows",
            "local",
            "remote",
            "bfd",
            "tx_packets",
            "rx_packets",
            "tx_bytes",
            "rx_bytes",
        ] {
            has(path, key);
        }
        for key in [
            "local_state",
            "remote_state",
            "local_diag",
            "remote_diag",
            "max_tx_gap_us",
            "tx_interval_us",
            "detect_time_us",
            "rtt_us",
            "transitions",
            "last_change_unix",
        ] {
            has(&path["bfd"], key);
        }
        assert_eq!(path["state"], "up", "{gw}: {path}");
        assert_eq!(path["bfd"]["local_state"], "up", "{gw}: {path}");
        assert_eq!(path["bfd"]["remote_state"], "up", "{gw}: {path}");
        assert_eq!(path["bfd"]["detect_time_us"], 30_000, "{gw}: {path}");
        for key in ["tx_packets", "rx_packets", "tx_bytes", "rx_bytes", "flows"] {
            assert!(path[key].is_u64(), "{gw}: `{key}` is not a count: {path}");
        }
    }
    let p1 = lab::path_status(status, LabPath::Path1).expect("path1 listed");
    let other = match gw {
        Gw::A => Gw::B,
        Gw::B => Gw::A,
    };
    assert_eq!(
        p1["local"],
        format!("{}:{}", LabPath::Path1.addr(gw), lab::DATA_PORT)
    );
    assert_eq!(
        p1["remote"],
        format!("{}:{}", LabPath::Path1.addr(other), lab::DATA_PORT)
    );
    assert_eq!(
        p1["active"], true,
        "{gw}: path1 (priority 1) should be active"
    );
    assert!(
        !lab::path_active(status, LabPath::Path2),
        "{gw}: path2 should be idle"
    );
}

#[test]
fn gateways_come_up_and_status_has_the_spec_fields() {
    if !lab::test_gate("gateways_come_up_and_status_has_the_spec_fields", &[]) {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new(LabOptions::new("st", BIN)).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    for gw in Gw::ALL {
        assert_fields(gw, &lab.status(gw).unwrap());
    }
    let human = lab::run(
        std::process::Command::new(BIN)
            .arg("status")
            .arg("-s")
            .arg(lab.socket_path(Gw::A)),
    )
    .unwrap();
    assert!(
        human.contains("path1"),
        "human status lacks path1:\n{human}"
    );
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_tun() {
    if !lab::test_gate("sigterm_stops_cleanly_and_removes_the_tun", &[]) {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new(LabOptions::new("sd", BIN)).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let tun_exists = |lab: &Lab| {
        lab.command_in(Host::GwA, "ip")
            .args(["link", "show", "xl-b"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        tun_exists(&lab),
        "gw-a should have its TUN xl-b while running"
    );
    let status = lab.stop_gateway(Gw::A).expect("gw-a was running");
    assert!(status.success(), "gw-a exited with {status} on SIGTERM");
    assert!(!tun_exists(&lab), "gw-a left its TUN xl-b behind");
}

/// The lab and the probe themselves, without crosslink: kernel routing over path1,
/// a 250 ms blackhole must show up as a ~250 ms outage.
#[test]
fn kernel_only_lab_measures_a_blackhole() {
    if !lab::test_gate("kernel_only_lab_measures_a_blackhole", &[]) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new(LabOptions::kernel_only("ko", BIN)).unwrap();
    let receiver = lab.start_receiver(PORT, Duration::from_secs(20)).unwrap();
    let sender = lab
        .start_sender(PORT, RATE, Duration::from_secs(20))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.blackhole(LabPath::Path1).unwrap();
    std::thread::sleep(Duration::from_millis(250));
    lab.heal(LabPath::Path1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    sender.stop().unwrap();
    let report = receiver.finish(Duration::from_secs(3)).unwrap();
    let outage = report["longest_outage_ms"].as_f64().unwrap();
    lab::say(&format!(
        "netns kernel-only blackhole: outage_ms={outage} (cut for 250 ms)"
    ));
    assert_eq!(report["outage_count"], 1, "{report}");
    assert!((230.0..400.0).contains(&outage), "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert!(report["sent"].as_u64().unwrap() >= 1000, "{report}");
}

/// The TUN's MTU follows from the paths (1500-byte IPv4 veths: 1500 less 20
/// IPv4, 8 UDP and 16 overlay bytes), and an inner packet above it gets
/// ICMP "fragmentation needed" from the gateway while one at it crosses.
#[test]
fn inner_mtu_follows_the_paths_and_too_big_gets_icmp() {
    if !lab::test_gate(
        "inner_mtu_follows_the_paths_and_too_big_gets_icmp",
        &[("ping", "iputils-ping")],
    ) {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new(LabOptions::new("mtu", BIN)).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let link = lab::run(
        lab.command_in(Host::GwA, "ip")
            .args(["-j", "link", "show", "xl-b"]),
    )
    .unwrap();
    let link: Value = serde_json::from_str(&link).unwrap();
    let mtu = link[0]["mtu"].as_u64().unwrap();
    assert_eq!(mtu, 1500 - 20 - 8 - 16, "TUN MTU");
    let server = lab::SERVER_ADDR.to_string();
    let ping = |size: u64| {
        lab.command_in(Host::Client, "ping")
            .args(["-n", "-c", "1", "-W", "2", "-M", "do", "-s"])
            .arg((size - 28).to_string())
            .arg(&server)
            .output()
            .unwrap()
    };
    let fits = ping(mtu);
    assert!(
        fits.status.success(),
        "a {mtu}-byte packet should cross: {}",
        String::from_utf8_lossy(&fits.stdout)
    );
    let too_big = ping(mtu + 1);
    let text = String::from_utf8_lossy(&too_big.stdout).to_string()
        + &String::from_utf8_lossy(&too_big.stderr);
    assert!(
        !too_big.status.success(),
        "{} bytes crossed: {text}",
        mtu + 1
    );
    assert!(
        text.contains(&format!("mtu = {mtu}")) || text.contains(&format!("mtu={mtu}")),
        "expected ICMP fragmentation needed naming mtu {mtu}: {text}"
    );
    println!(
        "netns mtu: TUN mtu={mtu}; {} bytes crossed, {} bytes got: {}",
        mtu,
        mtu + 1,
        text.lines()
            .find(|l| l.contains("mtu"))
            .unwrap_or("")
            .trim()
    );
}

/// Bytes of the deterministic stream [`tcp_role`] sends: a xorshift
/// sequence, so that a byte lost, doubled, reordered or corrupted on the
/// way changes the digest.
fn stream_bytes(n: usize) -> impl Iterator<Item = u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 24) as u8
    })
}

/// FNV-1a over the bytes.
fn digest(acc: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(acc, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Not a test on its own: the TCP end of [`tcp_stream_crosses_intact`],
/// run by that test inside a namespace (`XL_TCP_ROLE=server|client`).
#[test]
fn tcp_role() {
    use std::io::{Read, Write};
    let Ok(role) = std::env::var("XL_TCP_ROLE") else {
        return;
    };
    let addr = std::env::var("XL_TCP_ADDR").unwrap();
    let total: usize = std::env::var("XL_TCP_BYTES").unwrap().parse().unwrap();
    if role == "server" {
        let listener = std::net::TcpListener::bind(&addr).unwrap();
        println!("listening");
        let (mut s, _) = listener.accept().unwrap();
        let (mut got, mut h, mut buf) = (0usize, FNV_START, vec![0u8; 1 << 16]);
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n;
            h = digest(h, &buf[..n]);
        }
        println!("XL_TCP received={got} digest={h:016x}");
    } else {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let data: Vec<u8> = stream_bytes(total).collect();
        for chunk in data.chunks(128 * 1024) {
            s.write_all(chunk).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
}

/// Not a test on its own: sends the bursts of
/// [`damaged_segments_stay_damaged`] from the client's namespace
/// (`XL_RAW_BURSTS` bursts of `XL_RAW_SEGMENTS` consecutive TCP segments
/// of one flow to the server, segment `XL_RAW_DAMAGED` of each with a
/// payload bit flipped after its checksum was computed).
#[test]
fn raw_role() {
    let Ok(bursts) = std::env::var("XL_RAW_BURSTS") else {
        return;
    };
    let bursts: u16 = bursts.parse().unwrap();
    let segments: u32 = std::env::var("XL_RAW_SEGMENTS").unwrap().parse().unwrap();
    let damaged: u32 = std::env::var("XL_RAW_DAMAGED").unwrap().parse().unwrap();
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .unwrap();
    let to = socket2::SockAddr::from(std::net::SocketAddrV4::new(lab::SERVER_ADDR, 0));
    const LEN: u32 = 1000;
    for b in 0..bursts {
        let packets: Vec<Vec<u8>> = (0..segments)
            .map(|i| {
                let payload: Vec<u8> = (0..LEN).map(|k| (k + i) as u8).collect();
                let mut p = Vec::new();
                etherparse::PacketBuilder::ipv4(
                    lab::CLIENT_ADDR.octets(),
                    lab::SERVER_ADDR.octets(),
                    64,
                )
                .tcp(40_000 + b, 5998, 1_000_000 + i * LEN, 1000)
                .ack(1)
                .write(&mut p, &payload)
                .unwrap();
                if i == damaged {
                    *p.last_mut().unwrap() ^= 0x10;
                }
                p
            })
            .collect();
        for p in &packets {
            raw.send_to(p, &to).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("XL_RAW sent");
}

/// The server namespace's TCP checksum error count (`InCsumErrors`).
fn tcp_checksum_errors(lab: &Lab) -> u64 {
    let snmp = lab::run(lab.command_in(Host::Server, "cat").arg("/proc/net/snmp")).unwrap();
    lab::snmp_counter(&snmp, "Tcp", "InCsumErrors")
        .unwrap_or_else(|| panic!("no Tcp InCsumErrors in /proc/net/snmp: {snmp}"))
}

/// A TCP segment damaged before it reaches crosslink stays damaged: the far
/// gateway merges consecutive segments into one super-packet whose checksum
/// the kernel computes afresh, so a segment whose checksum nobody vouched
/// for is checked before it is merged, and a bad one is written alone, as
/// it came, for the receiving host to drop. The client sends bursts of
/// consecutive segments of one flow (raw packets, so no kernel vouches for
/// them) with one segment damaged in each; every damaged one must reach
/// the server's TCP as a checksum error, in the clear, sealed and through
/// the kernel fast path.
#[test]
fn damaged_segments_stay_damaged() {
    if !lab::test_gate("damaged_segments_stay_damaged", &[]) {
        return;
    }
    let _serial = serial();
    const BURSTS: u64 = 40;
    const KEY: &str = "8d1e0c3a7b2d94e8a16c0f3b2e7d5a9c4b8e1f60d2c3a5b7e9f1d3c5a7b9e1f3";
    let exe = std::env::current_exe().unwrap();
    // (key, key pairs and a handshake, kernel fast path)
    for (key, pairs, fast) in [
        (None, false, false),
        (Some(KEY), false, false),
        (None, true, false),
        (None, false, true),
    ] {
        let mut opts = LabOptions::new("csum", BIN);
        opts.key = key.map(str::to_string);
        opts.key_pairs = pairs;
        opts.fast_path = fast;
        let mut lab = Lab::new(opts).unwrap();
        lab.start_gateways().unwrap();
        lab.wait_paths_up(Duration::from_secs(15)).unwrap();
        lab.wait_handshakes(Duration::from_secs(10)).unwrap();
        let before = tcp_checksum_errors(&lab);
        let out = lab::run(
            lab.command_in(Host::Client, &exe)
                .args(["--exact", "raw_role", "--nocapture", "--test-threads=1"])
                .env("XL_RAW_BURSTS", BURSTS.to_string())
                .env("XL_RAW_SEGMENTS", "8")
                .env("XL_RAW_DAMAGED", "3"),
        )
        .unwrap();
        assert!(out.contains("XL_RAW sent"), "raw sender: {out}");
        // Everything was sent before the role returned; give the far side a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let counted = loop {
            let n = tcp_checksum_errors(&lab) - before;
            if n >= BURSTS || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let drops = &lab.status(Gw::B).unwrap()["drops"];
        println!(
            "netns csum: sealed={} key pairs={pairs} fast path={fast} {counted} of {BURSTS} damaged segments reached the server as checksum errors; gw-b drops {drops}",
            key.is_some() || pairs
        );
        assert_eq!(
            counted,
            BURSTS,
            "sealed={} key pairs={pairs} fast path={fast}: damaged segments were passed as good",
            key.is_some() || pairs
        );
        lab.check_gateways().unwrap();
    }
}

/// A bulk TCP transfer through the tunnel arrives byte for byte, in the
/// clear and sealed: the TUN super-packets are cut into segments with
/// their own headers and checksums on one side, merged again on the other
/// ([`crosslink::core::segment`], [`crosslink::core::coalesce`]), and nothing is
/// dropped as malformed on the way. The same holds with each offload the
/// kernel might lack turned off: no TUN offloads, no UDP GSO, no UDP GRO,
/// and none at all; and between gateways with different lane counts (3 and
/// 1), where the flow's two directions settle on the lanes the datagrams
/// name.
#[test]
fn tcp_stream_crosses_intact() {
    if !lab::test_gate("tcp_stream_crosses_intact", &[]) {
        return;
    }
    let _serial = serial();
    const BYTES: usize = 48 << 20;
    const KEY: &str = "8d1e0c3a7b2d94e8a16c0f3b2e7d5a9c4b8e1f60d2c3a5b7e9f1d3c5a7b9e1f3";
    let want = digest(FNV_START, &stream_bytes(BYTES).collect::<Vec<u8>>());
    let exe = std::env::current_exe().unwrap();
    // (key, key pairs and a handshake (the key mixed in), offloads turned off with their CROSSLINK_* variable, lanes of
    // gw-a and gw-b: None for the default, the kernel fast path)
    type Variant<'a> = (Option<&'a str>, bool, &'a [&'a str], Option<(u8, u8)>, bool);
    let variants: [Variant; 10] = [
        (None, false, &[], None, false),
        (Some(KEY), false, &[], None, false),
        (None, false, &["TUN_OFFLOAD"], None, false),
        (Some(KEY), false, &["UDP_GSO"], None, false),
        (None, false, &["UDP_GRO"], None, false),
        (
            Some(KEY),
            false,
            &["TUN_OFFLOAD", "UDP_GSO", "UDP_GRO"],
            None,
            false,
        ),
        (Some(KEY), false, &[], Some((3, 1)), false),
        (None, false, &[], None, true),
        (None, true, &[], None, false),
        (Some(KEY), true, &[], Some((3, 1)), false),
    ];
    for (key, pairs, off, lanes, fast) in variants {
        let mut opts = LabOptions::new("tcp", BIN);
        opts.key = key.map(str::to_string);
        opts.key_pairs = pairs;
        opts.fast_path = fast;
        opts.gateway_env = off
            .iter()
            .map(|v| (format!("CROSSLINK_{v}"), "0".to_string()))
            .collect();
        if let Some((a, b)) = lanes {
            for (gw, n) in [(Gw::A, a), (Gw::B, b)] {
                opts.one_gateway_env
                    .push((gw, "CROSSLINK_LANES".into(), n.to_string()));
            }
        }
        let tun_offload = !off.contains(&"TUN_OFFLOAD")
            && std::env::var("CROSSLINK_TUN_OFFLOAD").as_deref() != Ok("0");
        let mut lab = Lab::new(opts).unwrap();
        lab.start_gateways().unwrap();
        lab.wait_paths_up(Duration::from_secs(15)).unwrap();
        lab.wait_handshakes(Duration::from_secs(10)).unwrap();
        let tun_before = Gw::ALL.map(|gw| lab.tun_tx_packets(gw));
        let addr = format!("{}:5999", lab::SERVER_ADDR);
        let role = |host: Host, role: &str| {
            let mut c = lab.command_in(host, &exe);
            c.args(["--exact", "tcp_role", "--nocapture", "--test-threads=1"])
                .env("XL_TCP_ROLE", role)
                .env("XL_TCP_ADDR", &addr)
                .env("XL_TCP_BYTES", BYTES.to_string())
                .stdout(std::process::Stdio::piped());
            c
        };
        let server = role(Host::Server, "server").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let client = role(Host::Client, "client").output().unwrap();
        assert!(client.status.success(), "client: {client:?}");
        let out = server.wait_with_output_timeout();
        let seconds = started.elapsed().as_secs_f64();
        let line = out
            .lines()
            .find(|l| l.starts_with("XL_TCP "))
            .unwrap_or_else(|| panic!("server said: {out}"))
            .to_string();
        assert_eq!(
            line,
            format!("XL_TCP received={BYTES} digest={want:016x}"),
            "sealed={} key pairs={pairs} off={off:?} lanes={lanes:?} fast={fast}",
            key.is_some() || pairs
        );
        // With the fast path, the TUNs hand the lanes (almost) nothing:
        // the stream's 35 000 segments and their acknowledgements go
        // through the BPF programs.
        let through_lanes = Gw::ALL.map(|gw| lab.tun_tx_packets(gw));
        let through_lanes = [0, 1].map(|i| through_lanes[i].saturating_sub(tun_before[i]));
        if fast {
            assert!(
                through_lanes.iter().all(|&n| n < 100),
                "the lanes carried {through_lanes:?} packets (gw-a, gw-b)"
            );
        } else {
            assert!(
                through_lanes[0] > 100,
                "gw-a's lanes carried {through_lanes:?}"
            );
        }
        if let Some((a, b)) = lanes {
            for (gw, n) in [(Gw::A, a), (Gw::B, b)] {
                let log = std::fs::read_to_string(lab.log_path(gw)).unwrap_or_default();
                assert!(
                    log.contains(&format!("lanes={n}")),
                    "{gw}: not {n} lanes: {log}"
                );
            }
            // The stream's one flow moved to the lane it came back on
            // (unless it started there): gw-a counts it once, not once per
            // lane it used, as soon as its lanes have swept (every second).
            let flows = |s: &Value| -> u64 {
                s["peers"][0]["paths"]
                    .as_array()
                    .map(|ps| ps.iter().filter_map(|p| p["flows"].as_u64()).sum())
                    .unwrap_or(0)
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            let counted = loop {
                let n = flows(&lab.status(Gw::A).unwrap());
                if n == 1 || Instant::now() > deadline {
                    break n;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            assert_eq!(counted, 1, "gw-a's flows over {a} lanes");
        }
        let drops = &lab.status(Gw::B).unwrap()["drops"];
        for reason in ["inner_malformed", "too_big", "tun_write"] {
            assert!(
                drops.get(reason).is_none(),
                "gw-b dropped {reason} (off: {off:?}): {drops}"
            );
        }
        let drops = &lab.status(Gw::A).unwrap()["drops"];
        for reason in ["inner_malformed", "too_big", "path_send"] {
            assert!(
                drops.get(reason).is_none(),
                "gw-a dropped {reason} (off: {off:?}): {drops}"
            );
        }
        let link = lab::run(
            lab.command_in(Host::GwA, "ip")
                .args(["-d", "link", "show", "xl-b"]),
        )
        .unwrap();
        assert_eq!(
            link.contains("vnet_hdr on"),
            tun_offload,
            "TUN offloads wanted: {tun_offload}; {link}"
        );
        // Each gateway says which offloads its threads use.
        let gso = !off.contains(&"UDP_GSO");
        let gro = !off.contains(&"UDP_GRO");
        for gw in [Gw::A, Gw::B] {
            let log = std::fs::read_to_string(lab.log_path(gw)).unwrap_or_default();
            let said = |what: &str, fields: &str| {
                log.lines().any(|l| l.contains(what) && l.contains(fields))
            };
            assert!(
                said(
                    "sending from the TUN",
                    &format!("tun_offloads={tun_offload} udp_gso={gso}")
                ),
                "{gw}: no sending line with offloads {tun_offload}/{gso}: {log}"
            );
            assert!(
                said(
                    "receiving into the TUN",
                    &format!("udp_gro={gro} tun_offloads={tun_offload}")
                ),
                "{gw}: no receiving line with GRO {gro}: {log}"
            );
        }
        println!(
            "netns tcp: {} MiB crossed intact (sealed={}, TUN offloads={}, off: {off:?}, \
             lanes: {lanes:?}, fast path: {fast}, key pairs: {pairs}) in {seconds:.2} s",
            BYTES >> 20,
            key.is_some() || pairs,
            link.contains("vnet_hdr on")
        );
    }
}

/// Forwarding lanes: one TCP stream is carried by one lane on each
/// gateway, the lane of the same number on both (each datagram names its
/// sender's lane and the far gateway's sockets hand it to that lane; the
/// TUN keeps the flow's return traffic in the queue of the lane that wrote
/// it), so the other lane stays idle; sixteen streams keep every lane busy.
/// Measured as the CPU time of the lane threads (`fwd<lane>-<peer>`).
#[test]
fn lanes_keep_a_flow_on_one_thread_and_spread_many() {
    if !lab::test_gate(
        "lanes_keep_a_flow_on_one_thread_and_spread_many",
        &[("iperf3", "iperf3")],
    ) {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("lanes", BIN);
    opts.gateway_env = vec![("CROSSLINK_LANES".into(), "2".into())];
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    // The forwarding workers (`fwd0`, `fwd1`: lane k of every peer runs
    // on worker k) start with the daemon.
    for gw in [Gw::A, Gw::B] {
        let pid = lab.gateway_pid(gw).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lab::thread_ticks(pid, "fwd").len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Per gateway, the CPU ticks of lanes 0 and 1 while `parallel` streams run.
    let lane_work = |lab: &Lab, parallel: u32| -> Vec<[u64; 2]> {
        let ticks = |gw: Gw| -> [u64; 2] {
            let pid = lab.gateway_pid(gw).unwrap();
            let t = lab::thread_ticks(pid, "fwd");
            let lane = |k: usize| {
                t.iter()
                    .find(|(name, _)| *name == format!("fwd{k}"))
                    .map(|(_, v)| *v)
                    .unwrap_or_else(|| panic!("{gw}: no lane {k} thread in {t:?}"))
            };
            [lane(0), lane(1)]
        };
        let before = [ticks(Gw::A), ticks(Gw::B)];
        // parallel 0: no stream, the lanes' own work (probes, timers) alone.
        let rate = if parallel == 0 {
            std::thread::sleep(Duration::from_secs(3));
            0.0
        } else {
            let rate = lab
                .start_iperf3(parallel, 3)
                .unwrap()
                .finish()
                .unwrap_or(0.0);
            assert!(rate > 0.0, "iperf3 -P {parallel} moved nothing");
            rate
        };
        let after = [ticks(Gw::A), ticks(Gw::B)];
        let work: Vec<[u64; 2]> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| [a[0] - b[0], a[1] - b[1]])
            .collect();
        println!(
            "netns lanes: {parallel} stream(s) at {:.2} Gbit/s; lane CPU ticks gw-a {:?} gw-b {:?}",
            rate / 1e9,
            work[0],
            work[1]
        );
        work
    };
    // What each lane does with no traffic at all (its probes, its timers),
    // taken off what it does while the stream runs: on the receiving
    // gateway a stream's lane is cheap (GRO), and the idle lane's own work
    // is not the stream's.
    let idle = lane_work(&lab, 0);
    let one: Vec<[u64; 2]> = lane_work(&lab, 1)
        .iter()
        .zip(&idle)
        .map(|(w, i)| [w[0].saturating_sub(i[0]), w[1].saturating_sub(i[1])])
        .collect();
    println!("netns lanes: idle {idle:?}, one stream less idle {one:?}");
    let busy: Vec<usize> = one
        .iter()
        .map(|w| if w[0] >= w[1] { 0 } else { 1 })
        .collect();
    for (gw, (w, &b)) in [Gw::A, Gw::B].iter().zip(one.iter().zip(&busy)) {
        assert!(w[b] >= 20, "{gw}: the stream's lane barely ran: {w:?}");
        assert!(
            w[1 - b] * 10 <= w[b] + 30,
            "{gw}: one stream kept two lanes busy: {w:?}"
        );
    }
    assert_eq!(busy[0], busy[1], "the stream took different lanes: {one:?}");
    let many = lane_work(&lab, 16);
    for (gw, w) in [Gw::A, Gw::B].iter().zip(&many) {
        let total = w[0] + w[1];
        assert!(
            w[0] * 100 >= total * 3 && w[1] * 100 >= total * 3,
            "{gw}: sixteen streams left a lane idle: {w:?}"
        );
    }
}

/// A second daemon on a gateway is refused before it touches anything of
/// the running one: with the same configuration by the control socket,
/// with another control socket by the TUN (a multiqueue TUN would let it
/// attach more queues and silently take a share of the traffic). The
/// running gateway's paths stay up and it keeps forwarding.
#[test]
fn a_second_daemon_is_refused_and_disturbs_nothing() {
    if !lab::test_gate("a_second_daemon_is_refused_and_disturbs_nothing", &[]) {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("dup", BIN);
    opts.gateway_env = vec![("CROSSLINK_LANES".into(), "2".into())];
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    // The log is written by a thread of its own: let the start-up's lines land.
    std::thread::sleep(Duration::from_secs(1));
    let log_before = std::fs::read_to_string(lab.log_path(Gw::A)).unwrap_or_default();
    let config = std::fs::read_to_string(lab.config_path(Gw::A)).unwrap();
    let other_socket = lab.dir().join("second.sock");
    let other = config.replace(
        &format!("control_socket = \"{}\"", lab.socket_path(Gw::A).display()),
        &format!("control_socket = \"{}\"", other_socket.display()),
    );
    assert_ne!(other, config, "control socket line not found in {config}");
    let other_path = lab.dir().join("second.toml");
    std::fs::write(&other_path, other).unwrap();
    for (path, says) in [
        (lab.config_path(Gw::A), "is in use by a running crosslink"),
        (other_path, "is another crosslink using it?"),
    ] {
        let mut cmd = lab.command_in(Host::GwA, BIN);
        cmd.arg("run")
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        while child.try_wait().unwrap().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second daemon ran: {text}");
        assert!(
            text.contains(says),
            "not refused for the right reason: {text}"
        );
        assert!(!other_socket.exists(), "the refused daemon left its socket");
    }
    // The running gateway saw nothing: no path changed, and it forwards.
    std::thread::sleep(Duration::from_millis(300));
    let log_after = std::fs::read_to_string(lab.log_path(Gw::A)).unwrap_or_default();
    let news = log_after.get(log_before.len()..).unwrap_or_default();
    assert!(
        !news.contains("path state"),
        "the running gateway's paths changed: {news}"
    );
    let receiver = lab.start_receiver(5998, Duration::from_secs(20)).unwrap();
    let sender = lab
        .start_sender(5998, 500, Duration::from_secs(20))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    sender.stop().unwrap();
    let report = receiver.finish(Duration::from_secs(5)).unwrap();
    assert_eq!(report["lost"].as_u64(), Some(0), "{report}");
    assert!(report["received"].as_u64().unwrap_or(0) > 0, "{report}");
}

trait WaitOutput {
    fn wait_with_output_timeout(self) -> String;
}

impl WaitOutput for std::process::Child {
    /// The child's stdout once it exits (killed after 60 s).
    fn wait_with_output_timeout(mut self) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        while self.try_wait().unwrap().is_none() {
            if Instant::now() > end {
                let _ = self.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = self.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
