//! Bad input while traffic flows, in a network-namespace lab (see
//! `crosslink::lab`) with a sealed data plane: gw-a floods gw-b's data
//! port and BFD port with random, truncated, oversized, plaintext,
//! wrong-key, stale, replayed and stranger datagrams (`crosslink flood`,
//! among them BFD control packets forged from a stranger's address with
//! the session's own discriminators and state Down,
//! raw sockets, bounded in count and rate) while a 1000 packet/s stream
//! flows from the client to the server through both gateways.
//!
//! Checked: both daemons stay up, no path changes state, the stream loses
//! nothing, and gw-b counted every junk datagram under the reason it was
//! built for (`drops` in the status, the same counters as
//! `crosslink_packets_dropped_total{reason}`).
//!
//! Root only: skipped with a message otherwise, unless
//! `CROSSLINK_NETNS_REQUIRED=1`.

mod support;

use crosslink::core::wire::bfd::{ControlPacket, Diag, State};
use crosslink::lab::{self, Gw, Host, Lab, LabOptions, LabPath, DATA_PORT};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use support::{netns_allowed, say, spawn_in, Owned, BIN};

#[path = "support/pcap.rs"]
mod pcap;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PORT: u16 = 9000;
const RATE: u32 = 1000;
/// Junk datagrams per second per flood process.
const FLOOD_RATE: u64 = 4000;
/// A stranger on path1's subnet (no such host exists; rp_filter is off in the lab).
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 21, 77);

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn random_key_hex() -> String {
    use std::io::Read;
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut k))
        .unwrap();
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn drops(status: &Value) -> BTreeMap<String, u64> {
    status["drops"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Every path's (name, state, transitions) on a gateway.
fn path_states(lab: &Lab, gw: Gw) -> Vec<(String, String, u64)> {
    let s = lab.status(gw).unwrap();
    LabPath::ALL
        .iter()
        .map(|&p| {
            let ps = lab::path_status(&s, p).cloned().unwrap_or(Value::Null);
            (
                p.name().to_string(),
                ps["state"].as_str().unwrap_or("?").to_string(),
                ps["bfd"]["transitions"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// One flood: what to send and which drop reason must count it.
struct Flood {
    kind: &'static str,
    from: String,
    to: String,
    ttl: u8,
    count: u64,
    reason: &'static str,
}

fn run_floods(lab: &Lab, floods: &[Flood], extra: &[&str]) -> u64 {
    let mut sent = 0;
    for f in floods {
        let mut cmd = lab.command_in(Host::GwA, BIN);
        cmd.args([
            "flood", "send", "--kind", f.kind, "--from", &f.from, "--to", &f.to,
        ])
        .args(["--ttl", &f.ttl.to_string(), "--count", &f.count.to_string()])
        .args(["--rate", &FLOOD_RATE.to_string()])
        .args(extra);
        let out = lab::run(&mut cmd).unwrap_or_else(|e| panic!("flood {}: {e}", f.kind));
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["sent"].as_u64(), Some(f.count), "flood {}: {out}", f.kind);
        sent += f.count;
    }
    sent
}

/// The lab of these tests: detection at 250 ms rather than 30 ms (BFD
/// 50 ms x 5). They are about junk, and the box they run on is a loaded
/// 2-core machine where other work can starve a 10 ms x 3 session without
/// any flood.
fn options(tag: &str) -> LabOptions {
    let mut opts = LabOptions::new(tag, BIN);
    opts.tx_interval = Duration::from_millis(50);
    opts.rx_interval = Duration::from_millis(50);
    opts.multiplier = 5;
    opts
}

#[test]
fn junk_on_data_and_bfd_ports_is_dropped_and_counted_while_traffic_flows() {
    if !netns_allowed("junk_on_data_and_bfd_ports_is_dropped_and_counted_while_traffic_flows") {
        return;
    }
    let _serial = serial();
    let mut opts = options("bad");
    opts.key = Some(format!("{}\n", random_key_hex()));
    // The capture below reads datagrams off a raw socket, which sees a UDP
    // GSO send as one packet: send each datagram on its own.
    opts.gateway_env = vec![("CROSSLINK_UDP_GSO".into(), "0".into())];
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();

    let receiver = lab.start_receiver(PORT, Duration::from_secs(120)).unwrap();
    let sender = lab
        .start_sender(PORT, RATE, Duration::from_secs(120))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));

    // Real sealed datagrams gw-b received from gw-a on path1, for replaying.
    let capture = lab.dir().join("captured.bin");
    let mut cap = lab.command_in(Host::GwB, BIN);
    cap.args(["flood", "capture", "--port", &DATA_PORT.to_string()])
        .args(["--from", &LabPath::Path1.addr(Gw::A).to_string()])
        .args([
            "--msg-type",
            "4",
            "--count",
            "200",
            "--timeout",
            "5s",
            "--out",
        ])
        .arg(&capture);
    let out = lab::run(&mut cap).unwrap();
    assert!(out.contains("\"captured\": 200"), "capture: {out}");

    let states_before = [path_states(&lab, Gw::A), path_states(&lab, Gw::B)];
    let before = drops(&lab.status(Gw::B).unwrap());
    let a1 = LabPath::Path1.addr(Gw::A);
    let b1 = LabPath::Path1.addr(Gw::B);
    let data_to = format!("{b1}:{DATA_PORT}");
    let bfd_to = format!("{b1}:3784");
    let right = format!("{a1}:{DATA_PORT}");
    let fl = |kind, from: &str, to: &str, ttl, count, reason| Flood {
        kind,
        from: from.to_string(),
        to: to.to_string(),
        ttl,
        count,
        reason,
    };
    let data_floods = [
        fl("random", &right, &data_to, 64, 3000, "overlay_unsupported"),
        fl("truncated", &right, &data_to, 64, 2000, "overlay_malformed"),
        fl("oversized", &right, &data_to, 64, 1000, "auth_failed"),
        fl("plain", &right, &data_to, 64, 1000, "seal_mismatch"),
        fl("wrong-key", &right, &data_to, 64, 2000, "auth_failed"),
        fl(
            "random",
            &format!("{STRANGER}:{DATA_PORT}"),
            &data_to,
            64,
            1000,
            "unknown_source",
        ),
        fl(
            "plain",
            &format!("{a1}:4999"),
            &data_to,
            64,
            1000,
            "unknown_source",
        ),
    ];
    let key_floods = [fl("stale", &right, &data_to, 64, 1000, "replayed")];
    let replay_floods = [fl("replay", &right, &data_to, 64, 1000, "replayed")];
    let bfd_from = format!("{a1}:49152");
    let bfd_floods = [
        fl("bfd-random", &bfd_from, &bfd_to, 255, 2000, "bfd_malformed"),
        fl(
            "bfd-truncated",
            &bfd_from,
            &bfd_to,
            255,
            1000,
            "bfd_malformed",
        ),
        fl(
            "bfd-wrong-disc",
            &bfd_from,
            &bfd_to,
            255,
            1000,
            "bfd_rejected",
        ),
        fl("bfd-wrong-disc", &bfd_from, &bfd_to, 64, 1000, "bfd_ttl"),
        fl(
            "bfd-random",
            &format!("{STRANGER}:49152"),
            &bfd_to,
            255,
            1000,
            "bfd_unknown_session",
        ),
    ];
    // A second host on path1's subnet forging gw-a's control packets: the
    // session's discriminators, state Down. Accepted, each would take the
    // path down (RFC 5881 §4: only the session's remote address counts).
    let forged = lab.dir().join("forged-bfd.bin");
    write_forged_down(&lab, &forged);
    let forged_floods = [fl(
        "replay",
        &format!("{STRANGER}:49152"),
        &bfd_to,
        255,
        40,
        "bfd_wrong_source",
    )];
    let forged_arg = ["--replay", forged.to_str().unwrap()];
    let started = Instant::now();
    let flood_from_ms = unix_ms();
    let mut sent = 0;
    std::thread::scope(|s| {
        let bfd = s.spawn(|| {
            run_floods(&lab, &bfd_floods, &[]) + run_floods(&lab, &forged_floods, &forged_arg)
        });
        sent += run_floods(&lab, &data_floods, &[]);
        let key = lab.key_path();
        sent += run_floods(&lab, &key_floods, &["--key", key.to_str().unwrap()]);
        sent += run_floods(
            &lab,
            &replay_floods,
            &["--replay", capture.to_str().unwrap()],
        );
        sent += bfd.join().unwrap();
    });
    let flood_time = started.elapsed();
    let flood_to_ms = unix_ms();
    std::thread::sleep(Duration::from_millis(1500));
    lab.check_gateways().unwrap();
    let after = drops(&lab.status(Gw::B).unwrap());
    let states_after = [path_states(&lab, Gw::A), path_states(&lab, Gw::B)];

    let stream = sender.stop().unwrap();
    let report = receiver.finish(Duration::from_secs(5)).unwrap();
    let num = |k: &str| report.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);

    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for f in data_floods
        .iter()
        .chain(&key_floods)
        .chain(&replay_floods)
        .chain(&bfd_floods)
        .chain(&forged_floods)
    {
        *expected.entry(f.reason).or_default() += f.count;
    }
    // Packets lost in outages that began while the flood ran (or up to
    // half a second after): the loss the flood could have caused.
    let first = num("first_packet_unix_ms");
    let lost_in_flood: u64 = report["outages"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|o| {
                    let at = first + o["start_ms"].as_f64().unwrap_or(f64::NAN);
                    at >= flood_from_ms - 100.0 && at <= flood_to_ms + 500.0
                })
                .map(|o| o["packets"].as_u64().unwrap_or(u64::MAX))
                .sum()
        })
        .unwrap_or(u64::MAX);
    let mut lines = Vec::new();
    let mut mismatches = Vec::new();
    for (reason, want) in &expected {
        let got =
            after.get(*reason).copied().unwrap_or(0) - before.get(*reason).copied().unwrap_or(0);
        lines.push(format!("{reason}=+{got}/{want}"));
        if got != *want {
            mismatches.push(format!("{reason}: counted +{got}, sent {want}"));
        }
    }
    say(&format!(
        "badinput: junk sent={sent} in {:.1}s (2 flood processes, {FLOOD_RATE}/s each); counted: {}; \
         stream sent={} lost={} (during the flood: {lost_in_flood}) duplicates={} longest_outage_ms={}; \
         drops before={before:?} after={after:?}",
        flood_time.as_secs_f64(),
        lines.join(" "),
        num("sent"),
        num("lost"),
        num("duplicates"),
        num("longest_outage_ms"),
    ));
    let _ = stream;
    assert!(
        mismatches.is_empty(),
        "junk not counted as expected: {mismatches:?}"
    );
    for (b, a) in states_before.iter().zip(&states_after) {
        assert_eq!(b, a, "a path changed state during the flood");
        assert!(a.iter().all(|(_, s, _)| s == "up"), "paths not up: {a:?}");
    }
    // Other reasons (legitimate traffic) stay where they were.
    for (reason, n) in &after {
        if !expected.contains_key(reason.as_str()) {
            assert_eq!(before.get(reason), Some(n), "unexpected drops: {reason}");
        }
    }
    assert!(num("sent") >= 5000.0, "stream too short: {report}");
    // A tiny bound, not zero: this runs on a loaded 2-core machine where
    // stalls unrelated to the flood happen (seen: a 15 ms outage before
    // the flood began). 10 packets is 10 ms of the stream.
    assert!(
        lost_in_flood <= 10,
        "the stream lost {lost_in_flood} packets during the flood: {report}"
    );
    assert_eq!(
        num("duplicates"),
        0.0,
        "a replay reached the server: {report}"
    );
}

/// A capture file (for `flood send --kind replay`) holding one BFD control
/// packet with gw-b's path1 session's discriminators and state Down.
fn write_forged_down(lab: &Lab, file: &std::path::Path) {
    let s = lab.status(Gw::B).unwrap();
    let p = lab::path_status(&s, LabPath::Path1).unwrap();
    let disc = |k: &str| {
        p["bfd"][k]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&d| d != 0)
            .unwrap_or_else(|| panic!("no {k} in {p}"))
    };
    let pkt = ControlPacket {
        version: 1,
        diag: Diag::None,
        state: State::Down,
        poll: false,
        final_: false,
        control_plane_independent: false,
        auth_present: false,
        demand: false,
        multipoint: false,
        detect_mult: 5,
        my_discriminator: disc("remote_discriminator"),
        your_discriminator: disc("local_discriminator"),
        desired_min_tx_us: 50_000,
        required_min_rx_us: 50_000,
        required_min_echo_rx_us: 0,
        auth: None,
    };
    let mut buf = [0u8; 64];
    let n = pkt.emit(&mut buf).unwrap();
    let mut out = u32::try_from(n).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(&buf[..n]);
    std::fs::write(file, out).unwrap();
}

/// With the BFD receive offload on, a second host on path1's subnet
/// replays gw-a's own control packet, byte for byte, to gw-b. The program
/// takes only repeats from the session's remote address: each copy goes
/// to the socket, which drops and counts it (`bfd_wrong_source`), and when
/// gw-a's real packets stop the copies do not keep the session alive: gw-b
/// detects path1 down, and brings it back up when they return.
#[test]
fn the_receive_offload_does_not_take_a_strangers_copies() {
    if !netns_allowed("the_receive_offload_does_not_take_a_strangers_copies") {
        return;
    }
    let _serial = serial();
    let mut opts = options("bado");
    opts.bfd_offload = true;
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let offloaded = |lab: &Lab| {
        let s = lab.status(Gw::B).unwrap();
        lab::path_status(&s, LabPath::Path1).is_some_and(|p| p["bfd"]["offloaded"] == true)
    };
    let until = Instant::now() + Duration::from_secs(5);
    while !offloaded(&lab) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(offloaded(&lab), "gw-b's path1 session not offloaded");

    // gw-a's control packet as it reaches gw-b (tcpdump reads the device
    // before the program drops the packet).
    let (a1, b1) = (LabPath::Path1.addr(Gw::A), LabPath::Path1.addr(Gw::B));
    let pcap_file = lab.dir().join("bfd.pcap");
    let out = lab
        .command_in(Host::GwB, "timeout")
        .args(["10", "tcpdump", "-i", "path1", "-n", "-c", "3", "-w"])
        .arg(&pcap_file)
        .arg(format!("udp dst port 3784 and src host {a1}"))
        .output()
        .expect("tcpdump");
    assert!(out.status.success(), "tcpdump: {out:?}");
    let captured = pcap::read_pcap(&std::fs::read(&pcap_file).unwrap());
    let packet = captured
        .last()
        .expect("a control packet captured")
        .payload
        .clone();
    assert_eq!(packet.len(), 24, "gw-a's control packet: {packet:02x?}");
    assert_eq!(
        packet[1] >> 6,
        State::Up as u8,
        "not an Up packet: {packet:02x?}"
    );
    assert!(
        captured.iter().all(|c| c.payload == packet),
        "gw-a's packets are not all the same: {captured:?}"
    );
    let copies = lab.dir().join("copies.bin");
    let mut file = u32::try_from(packet.len()).unwrap().to_be_bytes().to_vec();
    file.extend_from_slice(&packet);
    std::fs::write(&copies, file).unwrap();
    let flood = |count: u64, rate: u64| {
        let mut cmd = lab.command_in(Host::GwA, BIN);
        cmd.args(["flood", "send", "--kind", "replay", "--replay"])
            .arg(&copies)
            .args(["--from", &format!("{STRANGER}:49152")])
            .args(["--to", &format!("{b1}:3784"), "--ttl", "255"])
            .args(["--count", &count.to_string(), "--rate", &rate.to_string()]);
        let out = lab::run(&mut cmd).unwrap_or_else(|e| panic!("flood: {e}"));
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["sent"].as_u64(), Some(count), "flood: {out}");
    };

    // The copies alone, while the session runs.
    let states_before = path_states(&lab, Gw::B);
    let before = count(&lab, Gw::B, "bfd_wrong_source");
    flood(400, FLOOD_RATE);
    std::thread::sleep(Duration::from_millis(300));
    let counted = count(&lab, Gw::B, "bfd_wrong_source") - before;
    println!("REPORT offload copies from a stranger: 400 sent, {counted} counted bfd_wrong_source");
    assert_eq!(
        counted, 400,
        "a stranger's copies were taken by the program"
    );
    assert_eq!(
        path_states(&lab, Gw::B),
        states_before,
        "a path changed state"
    );
    assert!(offloaded(&lab), "the copies disarmed the session");

    // gw-a's real packets stop (its own address only: the stranger's
    // copies still pass) while the copies come at the session's rate.
    let table = format!(
        "table inet xl_lab_forge {{\n chain post {{ type filter hook postrouting priority -300; policy accept; \
         oifname \"path1\" ip saddr {a1} udp dport 3784 drop; }}\n}}\n"
    );
    let before = count(&lab, Gw::B, "bfd_wrong_source");
    lab.nft_script(Host::GwA, &table).unwrap();
    let cut = Instant::now();
    // 100 a second for 2 s: eight detection times.
    flood(200, 100);
    let s = lab.status(Gw::B).unwrap();
    let p1 = lab::path_status(&s, LabPath::Path1)
        .cloned()
        .unwrap_or(Value::Null);
    let down = p1["state"].as_str() != Some("up");
    let counted = count(&lab, Gw::B, "bfd_wrong_source") - before;
    println!(
        "REPORT offload cut under copies: path1 on gw-b {} after {:.0} ms; {counted} copies counted bfd_wrong_source",
        p1["state"].as_str().unwrap_or("?"),
        cut.elapsed().as_secs_f64() * 1e3
    );
    lab.nft_script(Host::GwA, "delete table inet xl_lab_forge\n")
        .unwrap();
    assert!(down, "a stranger's copies kept a dead session up: {p1}");
    assert_eq!(counted, 200, "copies taken during the cut");
    assert!(
        p1["bfd"]["transitions"].as_u64().unwrap_or(0) > states_before[0].2,
        "no transition on path1: {p1}"
    );
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    lab.check_gateways().unwrap();
}

fn write_key(path: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, random_key_hex().as_bytes()))
        .unwrap();
}

fn set_keys(lab: &Lab, gw: Gw, send: &std::path::Path, accept: Option<&std::path::Path>) {
    let text = lab.config_text(gw);
    let old = format!("key_file = \"{}\"\n", lab.key_path().display());
    assert!(text.contains(&old), "lab config has no key_file line");
    let mut new = format!("key_file = \"{}\"\n", send.display());
    if let Some(a) = accept {
        new.push_str(&format!("accept_key_file = \"{}\"\n", a.display()));
    }
    std::fs::write(lab.config_path(gw), text.replacen(&old, &new, 1)).unwrap();
}

fn hup(gw: &Owned) {
    assert!(
        lab::signal_pid(gw.pid(), "HUP"),
        "cannot signal {}",
        gw.pid()
    );
    std::thread::sleep(Duration::from_millis(700));
}

fn count(lab: &Lab, gw: Gw, reason: &str) -> u64 {
    drops(&lab.status(gw).unwrap())
        .get(reason)
        .copied()
        .unwrap_or(0)
}

/// The documented two-step key rotation under a running stream: nothing
/// lost, nothing refused, and the retired key is refused afterwards.
#[test]
fn key_rotation_drops_nothing_and_retires_the_old_key() {
    if !netns_allowed("key_rotation_drops_nothing_and_retires_the_old_key") {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("rot", BIN);
    opts.tx_interval = Duration::from_millis(50);
    opts.rx_interval = Duration::from_millis(50);
    opts.multiplier = 5;
    opts.key = Some(format!("{}\n", random_key_hex()));
    let mut lab = Lab::new(opts).unwrap();
    let mut gws = Vec::new();
    for gw in Gw::ALL {
        let cfg = lab.config_path(gw).display().to_string();
        let log = format!("{}.log", gw.name());
        gws.push(spawn_in(&lab, gw.host(), BIN, &["run", "-c", &cfg], &log));
    }
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let old = lab.key_path();
    let new = lab.dir().join("new.key");
    write_key(&new);

    let receiver = lab.start_receiver(PORT, Duration::from_secs(60)).unwrap();
    let sender = lab
        .start_sender(PORT, RATE, Duration::from_secs(60))
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let refused = |lab: &Lab| {
        Gw::ALL
            .iter()
            .map(|&g| count(lab, g, "auth_failed") + count(lab, g, "seal_mismatch"))
            .sum::<u64>()
    };
    let refused_before = refused(&lab);
    // 1. Both accept the new key.
    for (i, gw) in Gw::ALL.iter().enumerate() {
        set_keys(&lab, *gw, &old, Some(&new));
        hup(&gws[i]);
    }
    // 2. One side after the other sends with the new key.
    for (i, gw) in Gw::ALL.iter().enumerate() {
        set_keys(&lab, *gw, &new, Some(&old));
        hup(&gws[i]);
    }
    // 3. The old key is retired.
    for (i, gw) in Gw::ALL.iter().enumerate() {
        set_keys(&lab, *gw, &new, None);
        hup(&gws[i]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let refused_during = refused(&lab) - refused_before;
    let _ = sender.stop();
    let report = receiver.finish(Duration::from_secs(3)).unwrap();

    // Traffic sealed with the retired key is refused now.
    let before = count(&lab, Gw::B, "auth_failed");
    let a1 = LabPath::Path1.addr(Gw::A);
    let b1 = LabPath::Path1.addr(Gw::B);
    let mut cmd = lab.command_in(Host::GwA, BIN);
    cmd.args(["flood", "send", "--kind", "forged", "--count", "200"])
        .args(["--from", &format!("{a1}:{DATA_PORT}")])
        .args(["--to", &format!("{b1}:{DATA_PORT}")])
        .arg("--key")
        .arg(&old);
    lab::run(&mut cmd).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let old_refused = count(&lab, Gw::B, "auth_failed") - before;
    lab.check_gateways().unwrap();
    let up = Gw::ALL
        .iter()
        .all(|&g| path_states(&lab, g).iter().all(|(_, s, _)| s == "up"));
    say(&format!(
        "key rotation: stream sent={} lost={} longest_outage_ms={}; refused during rotation={refused_during}; \
         retired key: {old_refused}/200 refused; paths up={up}",
        report["sent"], report["lost"], report["longest_outage_ms"]
    ));
    assert!(report["sent"].as_u64().unwrap_or(0) >= 3000, "{report}");
    assert_eq!(
        report["lost"], 0,
        "packets lost across the rotation: {report}"
    );
    assert_eq!(refused_during, 0, "packets refused during the rotation");
    assert_eq!(old_refused, 200, "the retired key still opens packets");
    assert!(up, "a path is down after the rotation");
}

/// `duplicate` with a key: both copies are sealed (the second from a
/// plaintext copy), both open, and the peer-sequence extension (which the
/// tag covers) lets the receiver keep exactly one.
#[test]
fn sealed_duplicate_policy_delivers_each_packet_once() {
    if !netns_allowed("sealed_duplicate_policy_delivers_each_packet_once") {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("sdup", BIN);
    // The second path carries copies only once eligible: after revert_hold.
    opts.revert_hold = Duration::from_millis(200);
    opts.tx_interval = Duration::from_millis(50);
    opts.rx_interval = Duration::from_millis(50);
    opts.multiplier = 5;
    opts.key = Some(format!("{}\n", random_key_hex()));
    let mut lab = Lab::new(opts).unwrap();
    let mut gws = Vec::new();
    for gw in Gw::ALL {
        let text = lab.config_text(gw);
        assert!(
            text.contains("policy = \"active-backup\""),
            "lab config changed shape"
        );
        let text = text.replacen("policy = \"active-backup\"", "policy = \"duplicate\"", 1);
        std::fs::write(lab.config_path(gw), text).unwrap();
        let cfg = lab.config_path(gw).display().to_string();
        let log = format!("{}.log", gw.name());
        gws.push(spawn_in(&lab, gw.host(), BIN, &["run", "-c", &cfg], &log));
    }
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = drops(&lab.status(Gw::B).unwrap());
    let receiver = lab.start_receiver(PORT, Duration::from_secs(30)).unwrap();
    let sender = lab
        .start_sender(PORT, RATE, Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _ = sender.stop();
    let report = receiver.finish(Duration::from_secs(3)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = drops(&lab.status(Gw::B).unwrap());
    let grew = |r: &str| after.get(r).copied().unwrap_or(0) - before.get(r).copied().unwrap_or(0);
    let sent = report["sent"].as_u64().unwrap_or(0);
    say(&format!(
        "sealed duplicate: stream sent={sent} lost={} duplicates={}; gw-b second copies dropped={}, \
         auth_failed={} replayed={} seal_mismatch={}",
        report["lost"],
        report["duplicates"],
        grew("duplicate"),
        grew("auth_failed"),
        grew("replayed"),
        grew("seal_mismatch"),
    ));
    assert!(sent >= 2000, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert!(
        grew("duplicate") >= sent * 9 / 10,
        "second copies did not arrive sealed and authenticated"
    );
    for r in ["auth_failed", "replayed", "seal_mismatch"] {
        assert_eq!(grew(r), 0, "{r} grew");
    }
}

/// The control socket answers root and the daemon's own user only, even
/// when its file mode would let anyone connect (SO_PEERCRED).
#[test]
fn control_socket_refuses_other_users() {
    if !netns_allowed("control_socket_refuses_other_users") {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new(LabOptions::new("cred", BIN)).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let sock = lab.socket_path(Gw::A);
    // Open the file mode (and the lab directory) wide: only the credential check is left.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir_mode = std::fs::metadata(lab.dir()).unwrap().permissions().mode();
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BIN,
            "status",
            "--json",
            "-s",
        ])
        .arg(&sock)
        .output()
        .expect("setpriv (util-linux)");
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(dir_mode)).unwrap();
    let as_root = lab.status(Gw::A);
    let err = String::from_utf8_lossy(&as_nobody.stderr);
    say(&format!(
        "control socket: uid 65534 -> exit {:?}, stderr {:?}; root -> {}",
        as_nobody.status.code(),
        err.trim(),
        if as_root.is_ok() {
            "answered"
        } else {
            "refused"
        }
    ));
    assert!(!as_nobody.status.success(), "another user got an answer");
    assert!(as_nobody.stdout.is_empty(), "another user got output");
    assert!(
        !err.contains("Permission denied"),
        "the file mode, not the credential check, refused: {err}"
    );
    assert!(as_root.is_ok(), "root was refused");
}
