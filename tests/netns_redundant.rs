//! Redundant gateways with FRR (README "Redundant gateways with FRR"): two
//! crosslink gateways per site, real FRR (zebra, staticd, bgpd, bfdd) on every
//! gateway and on a site router each side, in throwaway network namespaces.
//!
//! ```text
//!                        wan1 198.19.1.0/24 (bridge)
//!  client ── routerA ──┬── gwA1 ═════╦═════ gwB1 ──┬── routerB ── server
//!  .10.2/24   .10.1    │   .11.11    ║      .21.21 │   .20.1      .20.2/24
//!             .11.1/24 └── gwA2 ═════╩═════ gwB2 ──┘   .21.1/24
//!             (bridge)     .11.12  wan2 198.19.2.0/24  .21.22 (bridge)
//! ```
//!
//! Every gateway reaches both gateways of the other site over both interconnects:
//! one crosslink peer (the other site) with four paths, its "partner" (A1-B1,
//! A2-B2) first. A gateway's bgpd announces the other site's prefix to its site
//! router only while that peer's TUN has carrier (a static route via the TUN,
//! tagged, redistributed through a route-map on the tag); a second, untagged
//! static route through the sibling gateway (distance 200) carries what still
//! arrives until the router has heard. Each site router runs eBGP to both
//! gateways with ECMP (`maximum-paths`, L4 hash) and BFD 10 ms x 3 on the
//! sessions (bfdd at real-time priority, as crosslink's BFD thread).
//!
//! Flows are placed by source port (`ip route get` on the site router, L4 hash):
//! out through gwA1 a paced TCP stream (the lab probe's
//! `tcp-send`/`tcp-recv`: the longest gap between two reads, how the connection
//! ended) and a 2000 packet/s UDP probe stream; back through gwB1 (whose first
//! choice is gwA1) another UDP stream. Three cases, each printed
//! as `REPORT redundant case=...`:
//!
//! - `path_loss`: the path gwA1-gwB1 over wan1 is blackholed: crosslink moves to
//!   the next path, no routing change;
//! - `peer_loss`: gwA1 loses every path to site B (both interconnects
//!   blackholed): its TUN carrier goes off, zebra drops the static route, bgpd
//!   withdraws the prefix, routerA keeps only gwA2; gwB1 and gwB2 move their
//!   traffic for site A to gwA2; meanwhile gwA1 passes site B's traffic to gwA2;
//! - `peer_loss_bgp_only`: the same without the backup route (BGP's withdrawal
//!   alone);
//! - `gateway_loss`: gwA1's host dies (its links down, every daemon killed):
//!   routerA's BFD takes the BGP session down, gwB1/gwB2's BFD move to gwA2.
//!
//! Root-only (and packages frr, nftables); without them the test prints a skip line
//! and passes, unless `CROSSLINK_NETNS_REQUIRED=1`. Bounds are generous; the
//! measured figures are the REPORT lines.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crosslink::lab::{self, run, say, terminate, FrrHost};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const RATE: u32 = 2000;
const TAG: &str = "rd";

const CLIENT: &str = "198.19.10.2";
const SERVER: &str = "198.19.20.2";
const SITE_A: &str = "198.19.10.0/24";
const SITE_B: &str = "198.19.20.0/24";
const TUN: &str = "xl-site";

/// A gateway: role (namespace), site, host number on its LAN and on both wans.
#[derive(Clone, Copy)]
struct Gw {
    role: &'static str,
    site: char,
    host: u8,
}

const A1: Gw = Gw {
    role: "a1",
    site: 'a',
    host: 11,
};
const A2: Gw = Gw {
    role: "a2",
    site: 'a',
    host: 12,
};
const B1: Gw = Gw {
    role: "b1",
    site: 'b',
    host: 21,
};
const B2: Gw = Gw {
    role: "b2",
    site: 'b',
    host: 22,
};
const GWS: [Gw; 4] = [A1, A2, B1, B2];

impl Gw {
    fn lan_addr(self) -> String {
        let net = if self.site == 'a' { 11 } else { 21 };
        format!("198.19.{net}.{}", self.host)
    }
    fn wan_addr(self, wan: u8) -> String {
        format!("198.19.{wan}.{}", self.host)
    }
    fn router_addr(self) -> &'static str {
        if self.site == 'a' {
            "198.19.11.1"
        } else {
            "198.19.21.1"
        }
    }
    fn router(self) -> &'static str {
        if self.site == 'a' {
            "ra"
        } else {
            "rb"
        }
    }
    fn asn(self) -> u32 {
        if self.site == 'a' {
            65011
        } else {
            65021
        }
    }
    fn remote_prefix(self) -> &'static str {
        if self.site == 'a' {
            SITE_B
        } else {
            SITE_A
        }
    }
    /// The other site's gateways, the partner first.
    fn remotes(self) -> [Gw; 2] {
        match self.role {
            "a1" => [B1, B2],
            "a2" => [B2, B1],
            "b1" => [A1, A2],
            _ => [A2, A1],
        }
    }
}

fn path_name(remote: Gw, wan: u8) -> String {
    format!("{}-wan{wan}", remote.role)
}

/// The crosslink configuration of a gateway: one peer (the other site), a path
/// to each of its gateways over each interconnect. No `routes`: the route into
/// the TUN is FRR's (a static route that zebra withdraws without carrier).
fn crosslink_config(gw: Gw, socket: &str) -> String {
    let mut text = format!(
        "[gateway]\nname = \"{}\"\ncontrol_socket = \"{socket}\"\n\n\
         [bfd]\ntx_interval = \"10ms\"\nrx_interval = \"10ms\"\nmultiplier = 3\n\n\
         [[peer]]\nname = \"site\"\ntun = \"{TUN}\"\nrevert_hold = \"500ms\"\n",
        gw.role
    );
    let mut prio = 1;
    for remote in gw.remotes() {
        for wan in [1, 2] {
            text += &format!(
                "\n  [[peer.path]]\n  name = \"{}\"\n  local = \"{}:{}\"\n  remote = \"{}:{}\"\n  priority = {prio}\n",
                path_name(remote, wan),
                gw.wan_addr(wan),
                4800 + u16::from(remote.host),
                remote.wan_addr(wan),
                4800 + u16::from(gw.host),
            );
            prio += 1;
        }
    }
    text
}

const BFD_PROFILE: &str = "bfd\n profile fast\n  transmit-interval 10\n  receive-interval 10\n  \
                           detect-multiplier 3\n !\n!\n";

fn neighbor(addr: &str, asn: u32) -> String {
    format!(
        " neighbor {addr} remote-as {asn}\n neighbor {addr} bfd profile fast\n \
         neighbor {addr} timers connect 1\n neighbor {addr} advertisement-interval 0\n"
    )
}

/// The other gateway of the same site.
fn sibling(gw: Gw) -> Gw {
    match gw.role {
        "a1" => A2,
        "a2" => A1,
        "b1" => B2,
        _ => B1,
    }
}

/// The backup static route of a gateway: to the other site through its sibling,
/// for the moments between its own TUN losing carrier and the router hearing of it.
fn backup_route(gw: Gw) -> String {
    format!(
        "ip route {} {} 200",
        gw.remote_prefix(),
        sibling(gw).lan_addr()
    )
}

/// A gateway's frr.conf (configs/redundant-gateway.frr.conf, for this lab). Only
/// the route into the TUN (tag 100) is announced, not the backup via the sibling.
fn gateway_frr(gw: Gw) -> String {
    let router_asn = gw.asn() - 1;
    format!(
        "ip route {} {TUN} tag 100\n{}\n!\nroute-map THROUGH-TUN permit 10\n match tag 100\n!\n\
         {BFD_PROFILE}router bgp {}\n bgp router-id {}\n \
         no bgp ebgp-requires-policy\n bgp graceful-restart-disable\n bgp log-neighbor-changes\n{} !\n \
         address-family ipv4 unicast\n  redistribute static route-map THROUGH-TUN\n exit-address-family\n!\n",
        gw.remote_prefix(),
        backup_route(gw),
        gw.asn(),
        gw.lan_addr(),
        neighbor(gw.router_addr(), router_asn),
    )
}

/// A site router's frr.conf (configs/redundant-router.frr.conf, for this lab).
fn router_frr(site: char) -> String {
    let (gws, asn, id, lan) = if site == 'a' {
        ([A1, A2], 65010, "198.19.11.1", SITE_A)
    } else {
        ([B1, B2], 65020, "198.19.21.1", SITE_B)
    };
    let neighbors: String = gws
        .iter()
        .map(|g| neighbor(&g.lan_addr(), g.asn()))
        .collect();
    format!(
        "{BFD_PROFILE}router bgp {asn}\n bgp router-id {id}\n no bgp ebgp-requires-policy\n \
         bgp graceful-restart-disable\n bgp log-neighbor-changes\n{neighbors} !\n address-family ipv4 unicast\n  \
         network {lan}\n  maximum-paths 4\n exit-address-family\n!\n"
    )
}

// ---------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------

struct Net {
    pid: u32,
    dir: PathBuf,
    namespaces: Vec<String>,
    gateways: Vec<(&'static str, Child)>,
    frr: Vec<(&'static str, FrrHost)>,
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("xl-{TAG}-{pid}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        run(Command::new("chmod").arg("0755").arg(&dir)).unwrap();
        Net {
            pid,
            dir,
            namespaces: Vec::new(),
            gateways: Vec::new(),
            frr: Vec::new(),
        }
    }

    fn ns(&self, role: &str) -> String {
        format!("xl-{TAG}-{}-{role}", self.pid)
    }

    fn add_ns(&mut self, role: &str) {
        let ns = self.ns(role);
        let _ = run(Command::new("ip").args(["netns", "del", &ns]));
        run(Command::new("ip").args(["netns", "add", &ns])).unwrap();
        self.namespaces.push(ns);
        self.sh(
            role,
            "ip link set lo up; \
             sysctl -qw net.ipv4.ip_forward=1 \
               net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
               net.ipv4.conf.all.ignore_routes_with_linkdown=1 \
               net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.default.send_redirects=0 \
               net.ipv4.fib_multipath_hash_policy=1",
        );
    }

    fn sh(&self, role: &str, script: &str) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "sh", "-c"])
            .arg(script))
        .unwrap_or_else(|e| panic!("in {role}: {script}: {e}"))
    }

    /// A veth pair: `dev` in `a`, `peer` in `b`; both up.
    fn veth(&self, a: &str, dev: &str, b: &str, peer: &str) {
        run(Command::new("ip").args([
            "-n",
            &self.ns(a),
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &self.ns(b),
        ]))
        .unwrap();
        self.sh(a, &format!("ip link set {dev} up"));
        self.sh(b, &format!("ip link set {peer} up"));
    }

    fn socket(&self, role: &str) -> String {
        self.dir.join(format!("{role}.sock")).display().to_string()
    }

    fn log(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.log"))
    }

    fn start_gateway(&mut self, gw: Gw) {
        let config = self.dir.join(format!("{}.toml", gw.role));
        fs::write(&config, crosslink_config(gw, &self.socket(gw.role))).unwrap();
        let log = fs::File::create(self.log(gw.role)).unwrap();
        let err = log.try_clone().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(gw.role), BIN, "run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.gateways.push((gw.role, cmd.spawn().unwrap()));
    }

    fn start_frr(&mut self, role: &'static str, daemons: &[&'static str], config: &str) {
        let host = FrrHost::start(&self.ns(role), &self.dir.join(role), daemons)
            .unwrap_or_else(|e| panic!("FRR in {role}: {e}"));
        host.apply(config)
            .unwrap_or_else(|e| panic!("frr.conf of {role}: {e}"));
        self.frr.push((role, host));
    }

    fn status(&self, role: &str) -> Option<Value> {
        lab::status_at(self.socket(role).as_ref()).ok()
    }

    fn check(&mut self) {
        for (role, child) in &mut self.gateways {
            if let Ok(Some(st)) = child.try_wait() {
                let log =
                    fs::read_to_string(self.dir.join(format!("{role}.log"))).unwrap_or_default();
                panic!("gateway {role} exited ({st}):\n{log}");
            }
        }
        for (_, host) in &mut self.frr {
            if let Err(e) = host.check() {
                panic!("{e}");
            }
        }
    }

    /// Polls until `cond` holds; returns how long it took.
    fn wait(&mut self, what: &str, timeout: Duration, cond: impl Fn(&Net) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            self.check();
            if cond(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{what} did not happen within {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (role, host) in &self.frr {
            let show = host
                .vtysh(&["show bgp summary", "show bfd peers brief", "show ip route"])
                .unwrap_or_else(|e| e.to_string());
            out += &format!("---- {role}\n{show}\n");
        }
        for gw in GWS {
            if self.gateways.iter().any(|(r, _)| *r == gw.role) {
                let table = run(Command::new(BIN)
                    .arg("status")
                    .arg("-s")
                    .arg(self.socket(gw.role)))
                .unwrap_or_else(|e| e.to_string());
                out += &format!("---- crosslink {}\n{table}\n", gw.role);
            }
        }
        out
    }

    /// The gateways a router's route to `prefix` goes through (its nexthops).
    fn nexthops(&self, router: &str, prefix: &str) -> Vec<String> {
        let out = self.sh(router, &format!("ip route show {prefix}"));
        out.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect()
    }

    /// Which nexthop `router` picks for a flow (L4 hash).
    fn route_get(
        &self,
        router: &str,
        from: &str,
        to: &str,
        proto: &str,
        sport: u16,
        dport: u16,
    ) -> String {
        // Fails (unreachable) while the router has no route: then no gateway.
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.ns(router), "sh", "-c"])
            .arg(format!(
                "ip route get {to} from {from} iif lan ipproto {proto} sport {sport} dport {dport}"
            )))
        .unwrap_or_default();
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .unwrap_or_default()
    }

    /// A source port whose flow to `dport` the site router sends via `via`. (Its
    /// answers take whichever gateway the far router's hash gives: the kernel's
    /// flow hash is symmetric, so both directions cannot be chosen apart.)
    fn port_via(&self, proto: &str, dport: u16, via: Gw) -> u16 {
        let (from, to) = if via.site == 'a' {
            (CLIENT, SERVER)
        } else {
            (SERVER, CLIENT)
        };
        (20000..22000u16)
            .find(|&p| self.route_get(via.router(), from, to, proto, p, dport) == via.lan_addr())
            .unwrap_or_else(|| {
                panic!(
                    "no {proto} port to {dport} hashes via {}\n{}",
                    via.role,
                    self.diagnostics()
                )
            })
    }

    fn spawn_in(&self, role: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role)]).args(args);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// Starts a `crosslink probe` receiver (`recv` or `tcp-recv`) and waits until it listens.
    fn receiver(&self, role: &str, mode: &str, bind: &str) -> Child {
        let mut child = self
            .spawn_in(
                role,
                &[BIN, "probe", mode, "--bind", bind, "--duration", "60s"],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        assert!(first.starts_with("ready"), "probe {mode}: {first}");
        child
    }

    fn sender(&self, role: &str, mode: &str, to: &str, bind: &str, rate: u32) -> Child {
        self.spawn_in(
            role,
            &[
                BIN,
                "probe",
                mode,
                "--to",
                to,
                "--bind",
                bind,
                "--rate",
                &rate.to_string(),
                "--duration",
                "60s",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
    }

    /// `tx_packets` of a gateway's TUN.
    fn tun_tx(&self, gw: Gw) -> u64 {
        self.tun_counter(gw, "tx_packets")
    }

    fn tun_counter(&self, gw: Gw, counter: &str) -> u64 {
        self.sh(
            gw.role,
            &format!("cat /sys/class/net/{TUN}/statistics/{counter}"),
        )
        .trim()
        .parse()
        .unwrap_or(0)
    }

    /// Drops every packet in and out of `dev` in `role` (optionally only to and
    /// from `addr`); the carrier stays up.
    fn blackhole(&self, role: &str, dev: &str, addr: Option<&str>) {
        let (inm, outm) = match addr {
            Some(a) => (format!("ip saddr {a} "), format!("ip daddr {a} ")),
            None => (String::new(), String::new()),
        };
        self.sh(
            role,
            &format!(
                "nft add table inet xl_{dev}; \
                 nft add chain inet xl_{dev} in '{{ type filter hook prerouting priority -300; }}'; \
                 nft add chain inet xl_{dev} out '{{ type filter hook postrouting priority -300; }}'; \
                 nft add rule inet xl_{dev} in iifname {dev} {inm}drop; \
                 nft add rule inet xl_{dev} out oifname {dev} {outm}drop"
            ),
        );
    }

    fn heal(&self, role: &str, dev: &str) {
        self.sh(
            role,
            &format!("nft delete table inet xl_{dev} 2>/dev/null; true"),
        );
    }

    /// Waits until both routers run ECMP over both of their gateways, every
    /// gateway has its own site's prefix from its router, and every crosslink
    /// path is up.
    fn wait_converged(&mut self, timeout: Duration) -> Duration {
        self.wait(
            "both sites converged (ECMP over both gateways)",
            timeout,
            |n| {
                n.nexthops("ra", SITE_B).len() == 2
                    && n.nexthops("rb", SITE_A).len() == 2
                    && GWS.iter().all(|g| {
                        let own = if g.site == 'a' { SITE_A } else { SITE_B };
                        n.nexthops(g.role, own).len() == 1
                            && n.status(g.role).is_some_and(|s| {
                                s["peers"][0]["paths"].as_array().is_some_and(|p| {
                                    p.len() == 4 && p.iter().all(|p| p["state"] == "up")
                                })
                            })
                    })
            },
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (role, mut child) in std::mem::take(&mut self.gateways) {
            terminate(&mut child, Duration::from_secs(3));
            if panicking {
                let log = fs::read_to_string(self.log(role)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!("---- {role} log (newest first):\n{}", tail.join("\n"));
            }
        }
        for (_, mut host) in std::mem::take(&mut self.frr) {
            host.stop();
        }
        for ns in self.namespaces.iter().rev() {
            if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", ns])) {
                for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                    lab::signal_pid(pid, "KILL");
                }
            }
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        if std::env::var_os("CROSSLINK_LAB_KEEP").is_some() {
            eprintln!("kept {} (CROSSLINK_LAB_KEEP)", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The two sites, converged.
fn build() -> Net {
    let mut net = Net::new();
    for role in ["c", "ra", "a1", "a2", "wan", "b1", "b2", "rb", "s"] {
        net.add_ns(role);
    }
    // Site LANs: a bridge in each router joins it to its gateways (a dead
    // gateway leaves the router's carrier up, as a switch would).
    for (router, addr) in [("ra", "198.19.11.1/24"), ("rb", "198.19.21.1/24")] {
        net.sh(
            router,
            &format!("ip link add br0 type bridge; ip link set br0 up; ip addr add {addr} dev br0"),
        );
    }
    net.sh(
        "wan",
        "for b in br1 br2; do ip link add $b type bridge; ip link set $b up; done",
    );
    for gw in GWS {
        net.veth(gw.role, "lan", gw.router(), gw.role);
        net.sh(gw.router(), &format!("ip link set {} master br0", gw.role));
        let net_no = if gw.site == 'a' { 11 } else { 21 };
        net.sh(
            gw.role,
            &format!("ip addr add 198.19.{net_no}.{}/24 dev lan", gw.host),
        );
        for wan in [1u8, 2] {
            let port = format!("{}w{wan}", gw.role);
            net.veth(gw.role, &format!("wan{wan}"), "wan", &port);
            net.sh("wan", &format!("ip link set {port} master br{wan}"));
            net.sh(
                gw.role,
                &format!("ip addr add {}/24 dev wan{wan}", gw.wan_addr(wan)),
            );
        }
    }
    net.veth("c", "lan", "ra", "lan");
    net.sh(
        "c",
        "ip addr add 198.19.10.2/24 dev lan; ip link set lan mtu 1400; \
         ip route add default via 198.19.10.1",
    );
    net.sh("ra", "ip addr add 198.19.10.1/24 dev lan");
    net.veth("s", "lan", "rb", "lan");
    net.sh(
        "s",
        "ip addr add 198.19.20.2/24 dev lan; ip link set lan mtu 1400; \
         ip route add default via 198.19.20.1",
    );
    net.sh("rb", "ip addr add 198.19.20.1/24 dev lan");

    for gw in GWS {
        net.start_gateway(gw);
    }
    for gw in GWS {
        net.start_frr(gw.role, &lab::FRR_DAEMONS, &gateway_frr(gw));
    }
    net.start_frr("ra", &["zebra", "bfdd", "bgpd"], &router_frr('a'));
    net.start_frr("rb", &["zebra", "bfdd", "bgpd"], &router_frr('b'));
    let took = net.wait_converged(Duration::from_secs(90));
    say(&format!("redundant: both sites converged after {took:?}"));
    net
}

/// One case's traffic: a TCP stream and a UDP stream out through gwA1, and a
/// UDP stream back through gwB1 (whose first choice is gwA1).
struct Traffic {
    tcp: (Child, Child),
    udp: (Child, Child),
    udp_back: (Child, Child),
}

impl Traffic {
    fn start(net: &Net, case: u16) -> Traffic {
        let (tcp_port, udp_port) = (9100 + case, 9000 + case);
        let uport = net.port_via("udp", udp_port, A1);
        let bport = net.port_via("udp", udp_port, B1);
        let udp_recv = net.receiver("s", "recv", &format!("{SERVER}:{udp_port}"));
        let udp_send = net.sender(
            "c",
            "send",
            &format!("{SERVER}:{udp_port}"),
            &format!("{CLIENT}:{uport}"),
            RATE,
        );
        let back_recv = net.receiver("c", "recv", &format!("{CLIENT}:{udp_port}"));
        let back_send = net.sender(
            "s",
            "send",
            &format!("{CLIENT}:{udp_port}"),
            &format!("{SERVER}:{bport}"),
            RATE,
        );
        // A TCP connection's packets carry its socket's random hash, which the
        // router's ECMP uses instead of the ports: connect until one runs
        // through gwA1 (half of them do).
        let mut tcp = None;
        for _ in 0..12 {
            let recv = net.receiver("s", "tcp-recv", &format!("{SERVER}:{tcp_port}"));
            let before = net.tun_counter(A1, "tx_bytes");
            let send = net.sender(
                "c",
                "tcp-send",
                &format!("{SERVER}:{tcp_port}"),
                &format!("{CLIENT}:0"),
                2_000_000,
            );
            std::thread::sleep(Duration::from_millis(400));
            if net.tun_counter(A1, "tx_bytes") - before > 400_000 {
                tcp = Some((send, recv));
                break;
            }
            finish(send, recv);
        }
        let tcp = tcp.expect("no TCP connection of 12 ran through gwA1");
        Traffic {
            tcp,
            udp: (udp_send, udp_recv),
            udp_back: (back_send, back_recv),
        }
    }

    /// Stops the senders; the reports: (tcp sender, tcp receiver, udp, udp back).
    fn stop(self) -> (Value, Value, Value, Value) {
        let (tcp_send, tcp_recv) = finish(self.tcp.0, self.tcp.1);
        let (_, udp) = finish(self.udp.0, self.udp.1);
        let (_, back) = finish(self.udp_back.0, self.udp_back.1);
        (tcp_send, tcp_recv, udp, back)
    }
}

fn output(child: &mut Child) -> Value {
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    serde_json::from_str(out.trim()).unwrap_or(Value::Null)
}

/// Checks that the case's flows run through gwA1: its TUN takes the TCP stream's
/// 2 MB/s (gwA2's only what else hashes there).
fn check_placement(net: &Net) {
    let before = (
        net.tun_counter(A1, "tx_bytes"),
        net.tun_counter(A2, "tx_bytes"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = (
        net.tun_counter(A1, "tx_bytes"),
        net.tun_counter(A2, "tx_bytes"),
    );
    let rate = |a: u64, b: u64| (b - a) as f64 / 0.5 / 1e3;
    let (a1, a2) = (rate(before.0, after.0), rate(before.1, after.1));
    say(&format!(
        "redundant: into the TUN: gwA1 {a1:.0} kB/s, gwA2 {a2:.0} kB/s"
    ));
    assert!(
        a1 > 1000.0,
        "the flows do not run through gwA1: gwA1 {a1:.0} kB/s, gwA2 {a2:.0} kB/s"
    );
}

/// Stops a sender, waits for its receiver; both reports.
fn finish(mut sender: Child, mut receiver: Child) -> (Value, Value) {
    terminate(&mut sender, Duration::from_secs(3));
    let sent = output(&mut sender);
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !matches!(receiver.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(10));
    }
    terminate(&mut receiver, Duration::from_secs(2));
    (sent, output(&mut receiver))
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// A shell loop in a namespace that ends when `ip route show PREFIX` stops
/// matching `pattern` (a route left a gateway or a nexthop left a router), or
/// after 10 s. Started before a cut, it times the cut's routing change without a
/// process spawn per poll.
struct RouteWatch {
    child: Child,
}

impl RouteWatch {
    fn start(net: &Net, role: &str, prefix: &str, pattern: &str) -> RouteWatch {
        let script = format!(
            "end=$(($(date +%s) + 10)); \
             while ip route show {prefix} | grep -q '{pattern}'; do \
               [ $(date +%s) -ge $end ] && exit 1; done; exit 0"
        );
        let child = net
            .spawn_in(role, &["sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        RouteWatch { child }
    }

    /// Milliseconds from `start` until the route changed (None: it did not).
    fn wait(mut self, start: Instant) -> Option<f64> {
        let status = self.child.wait().ok()?;
        status
            .success()
            .then(|| start.elapsed().as_secs_f64() * 1e3)
    }
}

/// BGP sessions the site routers have lost so far (each is a BFD Down or a
/// dead gateway).
fn sessions_dropped(net: &Net) -> u64 {
    ["ra", "rb"]
        .iter()
        .filter_map(|router| net.frr.iter().find(|(r, _)| r == router))
        .map(|(_, host)| {
            let summary = host.json("show bgp summary json");
            summary["ipv4Unicast"]["peers"]
                .as_object()
                .map_or(0, |peers| {
                    peers
                        .values()
                        .map(|p| p["connectionsDropped"].as_u64().unwrap_or(0))
                        .sum()
                })
        })
        .sum()
}

/// `CROSSLINK_NETNS_STRICT=1`: no allowance for machine stalls.
fn strict() -> bool {
    std::env::var("CROSSLINK_NETNS_STRICT").as_deref() == Ok("1")
}

/// A case's figures.
struct Case {
    name: &'static str,
    tcp_gap_ms: f64,
    udp_outage_ms: f64,
    udp_back_ms: f64,
    /// Until gwA1's kernel lost its route into the TUN (zebra's withdrawal).
    gw_route_ms: Option<f64>,
    /// Until routerA's route to site B left gwA1.
    router_ms: Option<f64>,
    /// BGP sessions dropped during the case beyond the one it causes: BFD flaps
    /// of a machine that stalled longer than the detection time.
    spurious_drops: u64,
}

fn report(c: &Case, tcp_send: &Value, tcp_recv: &Value, udp: &Value, back: &Value) {
    let opt = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v:.0}"));
    say(&format!(
        "REPORT redundant case={} tcp_gap_ms={:.0} udp_outage_ms={:.1} udp_back_outage_ms={:.1} \
         udp_lost_ms={:.1} gw_withdraw_ms={} router_switch_ms={} spurious_bgp_drops={} tcp_bytes={} \
         tcp_end={} \
         cmd=\"CROSSLINK_NETNS_REQUIRED=1 cargo test --test netns_redundant -- --nocapture\"",
        c.name,
        c.tcp_gap_ms,
        c.udp_outage_ms,
        c.udp_back_ms,
        num(udp, "lost") * num(udp, "interval_us") / 1e3,
        opt(c.gw_route_ms),
        opt(c.router_ms),
        c.spurious_drops,
        tcp_recv["bytes"],
        tcp_recv["ended_by"],
    ));
    // The TCP connection survives: no reset on either side, every byte sent arrived.
    assert!(
        tcp_send["error"].is_null(),
        "{}: TCP sender: {tcp_send}",
        c.name
    );
    assert_eq!(
        tcp_recv["ended_by"], "eof",
        "{}: TCP receiver: {tcp_recv}",
        c.name
    );
    assert_eq!(
        tcp_send["bytes"], tcp_recv["bytes"],
        "{}: TCP bytes",
        c.name
    );
    assert!(num(tcp_send, "bytes") > 1e6, "{}: TCP: {tcp_send}", c.name);
    for (what, r) in [("udp", udp), ("udp back", back)] {
        assert!(num(r, "received") > 1000.0, "{}: {what}: {r}", c.name);
    }
}

#[test]
fn redundant_gateways_with_frr() {
    if !lab::test_gate(
        "redundant_gateways_with_frr",
        &[
            ("nft", "nftables"),
            ("/usr/lib/frr/bgpd", "frr"),
            ("/usr/lib/frr/bfdd", "frr"),
            ("/usr/lib/frr/staticd", "frr"),
            ("vtysh", "frr"),
            ("chrt", "util-linux"),
        ],
    ) {
        return;
    }
    let mut net = build();

    // ECMP: a flow placed through each gateway of site A is carried by it.
    let via_a1 = net.port_via("udp", 8999, A1);
    let via_a2 = net.port_via("udp", 8999, A2);
    let before = (net.tun_tx(A1), net.tun_tx(A2));
    for port in [via_a1, via_a2] {
        let recv = net.receiver("s", "recv", &format!("{SERVER}:8999"));
        let send = net.sender(
            "c",
            "send",
            &format!("{SERVER}:8999"),
            &format!("{CLIENT}:{port}"),
            1000,
        );
        std::thread::sleep(Duration::from_millis(800));
        let (_, r) = finish(send, recv);
        assert!(
            num(&r, "received") > 500.0,
            "ECMP stream via port {port}: {r}"
        );
    }
    let after = (net.tun_tx(A1), net.tun_tx(A2));
    say(&format!(
        "redundant: ECMP: gwA1 carried {} packets, gwA2 {} packets",
        after.0 - before.0,
        after.1 - before.1
    ));
    assert!(
        after.0 - before.0 > 500 && after.1 - before.1 > 500,
        "ECMP: {before:?} -> {after:?}"
    );

    let mut cases = Vec::new();

    // (c) one path fails: the one gwA1 sends on (gwB1 over wan1, unless path
    // quality has chosen another).
    {
        let drops = sessions_dropped(&net);
        let traffic = Traffic::start(&net, 1);
        std::thread::sleep(Duration::from_millis(500));
        check_placement(&net);
        let status = net.status("a1").unwrap_or_default();
        let active = status["peers"][0]["paths"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["active"] == true))
            .and_then(|p| p["name"].as_str())
            .unwrap_or("b1-wan1")
            .to_string();
        let remote = if active.starts_with("b2") { B2 } else { B1 };
        let wan: u8 = if active.ends_with('2') { 2 } else { 1 };
        say(&format!("redundant: cutting gwA1's active path {active}"));
        net.blackhole("a1", &format!("wan{wan}"), Some(&remote.wan_addr(wan)));
        std::thread::sleep(Duration::from_millis(1500));
        let nexthops = net.nexthops("ra", SITE_B).len();
        let (ts, tr, u, b) = traffic.stop();
        net.heal("a1", &format!("wan{wan}"));
        let case = Case {
            name: "path_loss",
            tcp_gap_ms: num(&tr, "max_gap_ms"),
            udp_outage_ms: num(&u, "longest_outage_ms"),
            udp_back_ms: num(&b, "longest_outage_ms"),
            gw_route_ms: None,
            router_ms: None,
            spurious_drops: sessions_dropped(&net) - drops,
        };
        report(&case, &ts, &tr, &u, &b);
        assert_eq!(nexthops, 2, "a path loss must not change routing");
        cases.push(case);
        net.wait_converged(Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(1000));
    }

    // (b) gwA1 loses every path to site B: first with the backup route through
    // gwA2 (the configuration of configs/), then with BGP's withdrawal alone.
    for (case_no, name) in [(2, "peer_loss"), (4, "peer_loss_bgp_only")] {
        if name == "peer_loss_bgp_only" {
            let host = &net.frr.iter().find(|(r, _)| *r == "a1").unwrap().1;
            let no_backup = format!("no {}", backup_route(A1));
            host.vtysh(&["configure terminal", &no_backup]).unwrap();
        }
        let drops = sessions_dropped(&net);
        let traffic = Traffic::start(&net, case_no);
        std::thread::sleep(Duration::from_millis(500));
        check_placement(&net);
        let gw_watch = RouteWatch::start(&net, "a1", SITE_B, TUN);
        let router_watch = RouteWatch::start(&net, "ra", SITE_B, &A1.lan_addr());
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        net.sh(
            "a1",
            "printf '%s\\n' 'table inet xl_cut {' \
               'chain in { type filter hook prerouting priority -300; iifname { \"wan1\", \"wan2\" } drop; }' \
               'chain out { type filter hook postrouting priority -300; oifname { \"wan1\", \"wan2\" } drop; }' \
               '}' | nft -f -",
        );
        let gw_route_ms = gw_watch.wait(start);
        let router_ms = router_watch.wait(start);
        std::thread::sleep(Duration::from_millis(1500));
        let carrier = net.sh("a1", &format!("ip link show {TUN}"));
        let (ts, tr, u, b) = traffic.stop();
        assert!(
            carrier.contains("NO-CARRIER"),
            "gwA1's TUN kept its carrier: {carrier}"
        );
        let case = Case {
            name,
            tcp_gap_ms: num(&tr, "max_gap_ms"),
            udp_outage_ms: num(&u, "longest_outage_ms"),
            udp_back_ms: num(&b, "longest_outage_ms"),
            gw_route_ms,
            router_ms,
            spurious_drops: sessions_dropped(&net) - drops,
        };
        report(&case, &ts, &tr, &u, &b);
        assert!(
            gw_route_ms.is_some(),
            "zebra on gwA1 kept the route into the TUN"
        );
        assert!(router_ms.is_some(), "routerA kept gwA1 as a nexthop");
        cases.push(case);
        net.sh("a1", "nft delete table inet xl_cut");
        let back = net.wait_converged(Duration::from_secs(60));
        say(&format!(
            "redundant: gwA1 announces site B again {back:?} after the heal"
        ));
        std::thread::sleep(Duration::from_millis(1000));
    }

    // (a) gwA1's host dies: its links go down, every daemon is killed.
    {
        let drops = sessions_dropped(&net);
        let traffic = Traffic::start(&net, 3);
        std::thread::sleep(Duration::from_millis(500));
        check_placement(&net);
        let router_watch = RouteWatch::start(&net, "ra", SITE_B, &A1.lan_addr());
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        net.sh(
            "a1",
            "ip link set lan down; ip link set wan1 down; ip link set wan2 down",
        );
        if let Some(i) = net.gateways.iter().position(|(r, _)| *r == "a1") {
            let (_, mut child) = net.gateways.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(i) = net.frr.iter().position(|(r, _)| *r == "a1") {
            net.frr[i].1.kill();
        }
        let router_ms = router_watch.wait(start);
        std::thread::sleep(Duration::from_millis(1500));
        let (ts, tr, u, b) = traffic.stop();
        let case = Case {
            name: "gateway_loss",
            tcp_gap_ms: num(&tr, "max_gap_ms"),
            udp_outage_ms: num(&u, "longest_outage_ms"),
            udp_back_ms: num(&b, "longest_outage_ms"),
            gw_route_ms: None,
            router_ms,
            spurious_drops: (sessions_dropped(&net) - drops).saturating_sub(1),
        };
        report(&case, &ts, &tr, &u, &b);
        assert!(
            router_ms.is_some(),
            "routerA kept the dead gwA1 as a nexthop"
        );
        cases.push(case);
    }

    // BGP sessions the routers lost (one per gateway death is expected; more are
    // BFD flaps of a loaded machine).
    for router in ["ra", "rb"] {
        let host = &net.frr.iter().find(|(r, _)| *r == router).unwrap().1;
        let summary = host.json("show bgp summary json");
        let dropped: Vec<String> = summary["ipv4Unicast"]["peers"]
            .as_object()
            .map(|peers| {
                peers
                    .iter()
                    .map(|(addr, p)| format!("{addr}:{}", p["connectionsDropped"]))
                    .collect()
            })
            .unwrap_or_default();
        say(&format!(
            "redundant: {router} BGP sessions dropped: {}",
            dropped.join(" ")
        ));
    }

    // Generous bounds (a loaded 2-core machine); the REPORT lines are the figures.
    // A case during which BFD flapped (the machine stalled past the detection
    // time) is reported as a WARNING instead, unless CROSSLINK_NETNS_STRICT=1.
    for c in &cases {
        let bound = if c.name == "path_loss" { 500.0 } else { 1500.0 };
        let within = c.udp_outage_ms < bound && c.udp_back_ms < bound && c.tcp_gap_ms < 3000.0;
        if !within && c.spurious_drops > 0 && !strict() {
            say(&format!(
                "WARNING redundant case={}: outside the bounds with {} spurious BGP session drops \
                 (BFD flaps of a stalled machine); not failing (CROSSLINK_NETNS_STRICT=1 would)",
                c.name, c.spurious_drops
            ));
            continue;
        }
        assert!(
            c.udp_outage_ms < bound,
            "{}: UDP outage {} ms",
            c.name,
            c.udp_outage_ms
        );
        assert!(
            c.udp_back_ms < bound,
            "{}: UDP outage back {} ms",
            c.name,
            c.udp_back_ms
        );
        assert!(
            c.tcp_gap_ms < 3000.0,
            "{}: TCP gap {} ms",
            c.name,
            c.tcp_gap_ms
        );
    }

    // Nothing left behind: no namespace, no daemon, no temp dir.
    let namespaces = net.namespaces.clone();
    let dir = net.dir.clone();
    let mut pids = Vec::new();
    for role in ["ra", "rb", "a2", "b1", "b2"] {
        for daemon in lab::FRR_DAEMONS {
            if let Ok(pid) = fs::read_to_string(dir.join(role).join(format!("{daemon}.pid"))) {
                pids.push(pid.trim().to_string());
            }
        }
    }
    drop(net);
    let listed = run(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for ns in &namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} left behind");
    }
    for pid in pids {
        assert!(
            !PathBuf::from(format!("/proc/{pid}")).exists(),
            "FRR daemon {pid} left behind"
        );
    }
    if std::env::var_os("CROSSLINK_LAB_KEEP").is_none() {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// The FRR examples in configs/ are valid FRR configuration (`vtysh --dryrun`), and
/// the gateway's static route goes into the TUN its crosslink example creates.
#[test]
fn redundant_examples_are_valid_frr_configs() {
    if !lab::tool_gate(
        "redundant_examples_are_valid_frr_configs",
        &[("vtysh", "frr")],
    ) {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    for name in ["redundant-gateway.frr.conf", "redundant-router.frr.conf"] {
        let file = dir.join(name);
        let out = Command::new("vtysh")
            .arg("--dryrun")
            .arg("-f")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = crosslink::config::Config::load(&dir.join("redundant-gateway.toml")).unwrap();
    let peer = &config.peers[0];
    assert!(peer.routes.is_empty(), "the route into the TUN is FRR's");
    let frr = fs::read_to_string(dir.join("redundant-gateway.frr.conf")).unwrap();
    assert!(
        frr.lines()
            .any(|l| l.starts_with("ip route ") && l.contains(&format!(" {} ", peer.tun))),
        "redundant-gateway.frr.conf has no static route via {}",
        peer.tun
    );
}
