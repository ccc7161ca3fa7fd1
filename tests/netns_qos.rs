//! QoS and ECN on the underlay, on real sockets (root; `tcpdump`, `nft`,
//! `ping`): a capture of path1 on gateway B shows the outer TOS byte of
//! BFD and data datagrams, and a CE mark set on the path (nftables
//! `ip ecn set ce` on gateway A's output) reaches the inner packet at the
//! server (RFC 6040), while a Not-ECT packet so marked is dropped and
//! counted (`ce_on_not_ect`).
//!
//! Gateway A keeps the defaults (BFD CS6, data DSCP inherited); gateway B
//! sends BFD as CS5 (`[bfd] dscp = "cs5"`) and its data as AF11
//! (`[[peer]] dscp = "af11"`). Four cases: lanes in the clear, sealed
//! (the outer header is outside the AEAD), and gateway B on the kernel
//! fast path (its sending program marks the replies; its receiving
//! program leaves datagrams marked CE to the lanes), and both gateways on
//! the fast path (gateway A's sending program inherits the inner TOS byte;
//! no path mark: what it redirects passes netfilter by). Path quality
//! runs with the default service level throughout, and no case may degrade
//! a path: the refused Not-ECT packets count as received, and a fast-path
//! receiver's counts hold what its program took. Each prints a
//! `REPORT qos <case>` line. A TCP stream with ECN through the lanes'
//! offloads, with CE marks on the path, prints `REPORT qos tcp`.

use std::collections::BTreeMap;
use std::fs;
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crosslink::lab::{self, Gw, Host, Lab, LabOptions, LabPath, CLIENT_ADDR, SERVER_ADDR};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const TOOLS: &[(&str, &str)] = &[
    ("tcpdump", "tcpdump"),
    ("nft", "nftables"),
    ("ping", "iputils-ping"),
];
/// Pings per phase.
const COUNT: usize = 10;
/// Gateway B's data DSCP (AF11) and BFD DSCP (CS5).
const B_DSCP: u8 = 10;
const B_BFD_TOS: u8 = 40 << 2;

#[path = "support/pcap.rs"]
mod pcap;
use pcap::{read_pcap, Captured};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `tcpdump` writing path1's UDP traffic on gateway B to a file.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(lab: &Lab) -> Capture {
        let file = lab.dir().join("path1.pcap");
        let mut child = lab
            .command_in(Host::GwB, "tcpdump")
            .args(["-i", "path1", "-n", "-U", "-s", "160", "-w"])
            .arg(&file)
            .arg("udp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        // It says "listening on" once the capture runs.
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 512];
            let mut seen = String::new();
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                if seen.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("tcpdump did not start");
        Capture { child, file }
    }

    fn stop(mut self) -> Vec<Captured> {
        // Time to write what it has read (it may lag on a busy machine).
        std::thread::sleep(Duration::from_secs(1));
        lab::signal_pid(self.child.id(), "INT");
        let _ = self.child.wait();
        read_pcap(&fs::read(&self.file).expect("pcap file"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Pings the server from the client: `count` packets of `size` bytes with
/// TOS `tos`; returns how many replies came.
fn ping(lab: &Lab, tos: u8, size: usize, count: usize) -> usize {
    let out = lab
        .command_in(Host::Client, "ping")
        .args(["-n", "-q", "-W", "1", "-i", "0.05"])
        .args(["-c", &count.to_string()])
        .args(["-s", &size.to_string()])
        .args(["-Q", &format!("0x{tos:02x}")])
        .arg(SERVER_ADDR.to_string())
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|p| p.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn nft_counter(lab: &Lab, host: Host, table: &str, name: &str) -> u64 {
    let out = lab
        .sh_in(host, &format!("nft list counter inet {table} {name}"))
        .expect("nft list counter");
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn drops(status: &Value, reason: &str) -> u64 {
    status["drops"][reason].as_u64().unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Plain,
    Sealed,
    /// Gateway B on the kernel fast path.
    Fast,
    /// Both gateways on the fast path: gateway A's sending program
    /// inherits the inner TOS byte. Path marks are not tested (what the
    /// sending program redirects passes netfilter by).
    FastBoth,
}

fn run_case(case: Case) {
    let name = format!("{case:?}").to_lowercase();
    let mut opts = LabOptions::new(&format!("qos{name}"), BIN);
    if case == Case::Sealed {
        opts.key = Some("ab".repeat(32));
    }
    opts.fast_path = case == Case::FastBoth;
    let mark_ce = case != Case::FastBoth;
    let mut lab = Lab::new(opts).unwrap();
    // Gateway B: BFD as CS5, data as AF11 (and on the fast path).
    let mut b =
        lab.config_text(Gw::B)
            .replacen("multiplier = 3\n", "multiplier = 3\ndscp = \"cs5\"\n", 1);
    let fast = if case == Case::Fast {
        "fast_path = true\n"
    } else {
        ""
    };
    b = b.replacen(
        "tun = \"xl-a\"\n",
        &format!("tun = \"xl-a\"\ndscp = \"af11\"\n{fast}"),
        1,
    );
    assert!(b.contains("dscp = \"cs5\"") && b.contains("dscp = \"af11\""));
    lab.write_config(Gw::B, &b).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(20)).unwrap();
    // The inner packets' ECN field as the server gets them.
    lab.nft_script(
        Host::Server,
        &format!(
            "table inet xlqos {{\n counter ce {{}}\n counter ect0 {{}}\n \
             chain input {{ type filter hook input priority 0; policy accept;\n  \
             ip saddr {CLIENT_ADDR} icmp type echo-request ip ecn ce counter name \"ce\"\n  \
             ip saddr {CLIENT_ADDR} icmp type echo-request ip ecn ect0 counter name \"ect0\"\n }}\n}}\n"
        ),
    )
    .unwrap();
    // What gateway B's TUN handed to the lanes (the fast path takes the
    // replies before the TUN queues them).
    let tun_tx_of = |host: Host, tun: &str| -> u64 {
        lab.sh_in(
            host,
            &format!("cat /sys/class/net/{tun}/statistics/tx_packets"),
        )
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    };
    let tun_tx = || tun_tx_of(Host::GwB, "xl-a");
    let tun_tx_before = tun_tx();
    let a_tun_tx_before = tun_tx_of(Host::GwA, "xl-b");
    let capture = Capture::start(&lab);
    // 1. DSCP and ECN copied from the inner packets: EF, then ECT(0).
    let ef = ping(&lab, 0xb8, 300, COUNT);
    let ect = ping(&lab, 0x02, 400, COUNT);
    // 2. Path1 marks congestion: CE on every data datagram from gateway A.
    let b_addr = LabPath::Path1.addr(Gw::B);
    if mark_ce {
        lab.nft_script(
        Host::GwA,
        &format!(
            "table inet xlce {{\n chain out {{ type filter hook output priority 0; policy accept;\n  \
             ip daddr {b_addr} udp dport {port} ip ecn set ce\n }}\n}}\n",
            port = lab::DATA_PORT
        ),
    )
    .unwrap();
    }
    let before = drops(&lab.status(Gw::B).unwrap(), "ce_on_not_ect");
    let (ce, not_ect) = match mark_ce {
        true => (
            ping(&lab, 0x02, 500, COUNT),
            ping(&lab, 0x00, 600, COUNT / 2),
        ),
        false => (0, 0),
    };
    let packets = capture.stop();
    let tun_tx_grew = tun_tx() - tun_tx_before;
    let a_tun_tx_grew = tun_tx_of(Host::GwA, "xl-b") - a_tun_tx_before;
    let dropped = drops(&lab.status(Gw::B).unwrap(), "ce_on_not_ect") - before;
    let server_ce = nft_counter(&lab, Host::Server, "xlqos", "ce");
    let server_ect0 = nft_counter(&lab, Host::Server, "xlqos", "ect0");
    // Path quality stays on: the marks and the refusals are no loss.
    let degraded = |gw: Gw| lab.log_tail(gw, 100_000).matches("path degraded").count();
    let (a_degraded, b_degraded) = (degraded(Gw::A), degraded(Gw::B));

    // What the capture saw, by kind: (source gateway, what) -> TOS bytes.
    let a_addr = LabPath::Path1.addr(Gw::A).octets();
    let tag = if case == Case::Sealed { 16 } else { 0 };
    let data_len = |size: usize| 16 + 28 + size + tag;
    let mut seen: BTreeMap<(&str, String), Vec<u8>> = BTreeMap::new();
    let mut inner_ecn_ok = true;
    for p in &packets {
        let from = if p.src == a_addr { "a" } else { "b" };
        // A UDP GSO send (a lane that read two pings in one turn, on a
        // busy machine) crosses the veth whole: k datagrams in one packet.
        let (what, k) = match p.dport {
            3784 => ("bfd".to_string(), 1),
            d if d == lab::DATA_PORT => {
                match [300, 400, 500, 600]
                    .into_iter()
                    .find(|&s| p.payload_len % data_len(s) == 0)
                {
                    Some(s) => (format!("ping{s}"), p.payload_len / data_len(s)),
                    None => continue,
                }
            }
            _ => continue,
        };
        // In the clear the inner header is readable: its ECN field is the
        // outer one's (RFC 6040 normal mode copies it) unless the path
        // marked CE on the way.
        if case != Case::Sealed && what.starts_with("ping") {
            if let Some(inner) = p.payload.get(16..18) {
                let marked = p.src == a_addr && (what == "ping500" || what == "ping600");
                if !marked && inner[1] & 3 != p.tos & 3 {
                    inner_ecn_ok = false;
                }
            }
        }
        seen.entry((from, what))
            .or_default()
            .extend(std::iter::repeat_n(p.tos, k));
    }
    let summary: Vec<String> = seen
        .iter()
        .map(|((from, what), tos)| {
            let mut kinds: Vec<u8> = tos.clone();
            kinds.sort_unstable();
            kinds.dedup();
            let kinds: Vec<String> = kinds.iter().map(|t| format!("0x{t:02x}")).collect();
            format!("{from}>{what} {}x[{}]", tos.len(), kinds.join(","))
        })
        .collect();
    lab::say(&format!(
        "REPORT qos {name}: path1 capture on gw-b: {}; replies ef {ef}/{COUNT} ect0 {ect}/{COUNT} \
         ect0+ce {ce}/{COUNT} not-ect+ce {not_ect}/{}; server saw ce {server_ce} ect0 {server_ect0}; \
         gw-b ce_on_not_ect +{dropped}, gw-b TUN to the lanes +{tun_tx_grew}, gw-a +{a_tun_tx_grew}; \
         paths degraded: gw-a {a_degraded}, gw-b {b_degraded}",
        summary.join(", "),
        COUNT / 2
    ));

    let all = |from: &'static str, what: &str, want: &dyn Fn(u8) -> bool, min: usize| {
        let tos = seen
            .get(&(from, what.to_string()))
            .cloned()
            .unwrap_or_default();
        assert!(
            tos.len() >= min,
            "{name}: {from}>{what}: {} captured, want at least {min}",
            tos.len()
        );
        assert!(
            tos.iter().all(|t| want(*t)),
            "{name}: {from}>{what}: TOS bytes {tos:02x?}"
        );
    };
    if matches!(case, Case::Fast | Case::FastBoth) {
        assert!(
            tun_tx_grew < 5,
            "{name}: gateway B's replies went through its TUN ({tun_tx_grew}), not the fast path"
        );
    } else {
        assert!(tun_tx_grew >= 25, "{name}: TUN counter moved {tun_tx_grew}");
    }
    if case == Case::FastBoth {
        assert!(
            a_tun_tx_grew < 5,
            "{name}: gateway A's pings went through its TUN ({a_tun_tx_grew}), not the fast path"
        );
    }
    // BFD: CS6 by default, CS5 as configured on B.
    all("a", "bfd", &|t| t == 0xc0, 20);
    all("b", "bfd", &|t| t == B_BFD_TOS, 20);
    // Data from A: the inner TOS byte, DSCP and ECN, then marked CE.
    all("a", "ping300", &|t| t == 0xb8, COUNT / 2);
    all("a", "ping400", &|t| t == 0x02, COUNT / 2);
    // Data from B: AF11, whatever the inner DSCP (the replies').
    for what in ["ping300", "ping400"] {
        all("b", what, &|t| t >> 2 == B_DSCP, COUNT / 2);
    }
    assert!(
        inner_ecn_ok,
        "{name}: an outer ECN field differs from the inner one"
    );
    assert!(ef >= COUNT - 1 && ect >= COUNT - 1, "{name}: pings lost");
    assert_eq!(
        (a_degraded, b_degraded),
        (0, 0),
        "{name}: a path was degraded (gw-a, gw-b)"
    );
    if !mark_ce {
        assert!(
            server_ect0 >= (COUNT - 1) as u64 && server_ce == 0,
            "{name}: server saw {server_ect0} ECT(0), {server_ce} CE"
        );
        return;
    }
    all("a", "ping500", &|t| t == 0x03, COUNT / 2);
    all("a", "ping600", &|t| t == 0x03, COUNT / 4);
    all("b", "ping500", &|t| t >> 2 == B_DSCP, COUNT / 2);
    // Nothing lost but the Not-ECT packets marked CE, which are counted.
    assert!(ce >= COUNT - 1, "{name}: ECT(0) pings marked CE were lost");
    assert_eq!(not_ect, 0, "{name}: a Not-ECT packet marked CE got through");
    assert!(
        dropped >= (COUNT / 2) as u64,
        "{name}: ce_on_not_ect grew by {dropped}"
    );
    // The server got the CE mark on the inner packets, and ECT(0) unmarked before.
    assert!(
        server_ce >= (COUNT - 1) as u64,
        "{name}: server saw {server_ce} CE packets"
    );
    assert!(
        server_ect0 >= (COUNT - 1) as u64 && server_ect0 <= COUNT as u64,
        "{name}: server saw {server_ect0} ECT(0) packets"
    );
}

#[test]
fn qos_and_ecn_on_the_underlay_lanes() {
    if !lab::test_gate("qos_and_ecn_on_the_underlay_lanes", TOOLS) {
        return;
    }
    let _serial = serial();
    run_case(Case::Plain);
}

#[test]
fn qos_and_ecn_on_the_underlay_sealed() {
    if !lab::test_gate("qos_and_ecn_on_the_underlay_sealed", TOOLS) {
        return;
    }
    let _serial = serial();
    run_case(Case::Sealed);
}

#[test]
fn qos_and_ecn_on_the_underlay_fast_path_both_ends() {
    if !lab::test_gate("qos_and_ecn_on_the_underlay_fast_path_both_ends", TOOLS) {
        return;
    }
    let _serial = serial();
    run_case(Case::FastBoth);
}

#[test]
fn qos_and_ecn_on_the_underlay_fast_path() {
    if !lab::test_gate("qos_and_ecn_on_the_underlay_fast_path", TOOLS) {
        return;
    }
    let _serial = serial();
    run_case(Case::Fast);
}

/// A TCP stream with ECN (both ends `tcp_ecn = 1`) through the lanes with
/// their offloads (TUN super-packets cut into segments, UDP GSO and GRO,
/// segments merged back into super-packets): path1 marks CE on one send of
/// data in fifty (not the handshake: Linux gives up ECN when it has to
/// send its SYN again); the marks reach the server's TCP, whose ECE
/// reaches the client, and the stream goes on. (Retransmissions are
/// Not-ECT, RFC 3168: one marked CE is dropped and counted.)
#[test]
fn ecn_marks_reach_a_tcp_stream_through_the_offloads() {
    let test = "ecn_marks_reach_a_tcp_stream_through_the_offloads";
    if !lab::test_gate(test, &[("nft", "nftables"), ("iperf3", "iperf3")]) {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new(LabOptions::new("qostcp", BIN)).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(20)).unwrap();
    for host in [Host::Client, Host::Server] {
        lab.sh_in(host, "echo 1 > /proc/sys/net/ipv4/tcp_ecn")
            .unwrap();
    }
    lab.nft_script(
        Host::Server,
        &format!(
            "table inet xlqos {{\n counter ce {{}}\n counter ect0 {{}}\n \
             chain input {{ type filter hook input priority 0; policy accept;\n  \
             ip saddr {CLIENT_ADDR} tcp dport 5201 ip ecn ce counter name \"ce\"\n  \
             ip saddr {CLIENT_ADDR} tcp dport 5201 ip ecn ect0 counter name \"ect0\"\n }}\n}}\n"
        ),
    )
    .unwrap();
    lab.nft_script(
        Host::Client,
        &format!(
            "table inet xlqos {{\n counter ece {{}}\n \
             chain input {{ type filter hook input priority 0; policy accept;\n  \
             ip saddr {SERVER_ADDR} tcp sport 5201 tcp flags & ecn == ecn counter name \"ece\"\n }}\n}}\n"
        ),
    )
    .unwrap();
    lab.nft_script(
        Host::GwA,
        &format!(
            "table inet xlce {{\n chain out {{ type filter hook output priority 0; policy accept;\n  \
             ip daddr {b} udp dport {port} udp length > 500 numgen random mod 50 == 0 ip ecn set ce\n }}\n}}\n",
            b = LabPath::Path1.addr(Gw::B),
            port = lab::DATA_PORT
        ),
    )
    .unwrap();
    let rate = lab.start_iperf3(1, 3).unwrap().finish().unwrap_or(0.0);
    let ce = nft_counter(&lab, Host::Server, "xlqos", "ce");
    let ect0 = nft_counter(&lab, Host::Server, "xlqos", "ect0");
    let ece = nft_counter(&lab, Host::Client, "xlqos", "ece");
    let status = lab.status(Gw::B).unwrap();
    lab::say(&format!(
        "REPORT qos tcp: one ECN stream at {:.2} Gbit/s with 1 in 50 sends marked CE on path1: \
         server got {ce} CE and {ect0} ECT(0) packets (after merging), the client {ece} ACKs \
         with ECE; gw-b ce_on_not_ect {}",
        rate / 1e9,
        drops(&status, "ce_on_not_ect")
    ));
    assert!(rate > 0.0, "the stream moved nothing");
    assert!(ect0 > 0, "no ECT(0) segment reached the server");
    assert!(ce > 0, "no CE mark reached the server");
    assert!(ece > 0, "the client never saw ECE");
}
