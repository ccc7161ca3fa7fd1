//! `crosslink check --reach`: probes every path of a configuration to the
//! far gateway for a couple of seconds, before it carries traffic, and
//! says per path whether the far end answered (and if not, the likely
//! cause), the round trip, the loss and the largest datagram that gets
//! through.
//!
//! It speaks the overlay's own probe messages
//! ([`crate::core::wire::overlay::MsgType::ProbeRequest`]),
//! sealed with the peer's key when it has a `key_file`, from the path's
//! configured local address and port: exactly what the far daemon expects
//! from this gateway, so a running far daemon answers it. It never touches
//! a TUN or a route. While it probes it also answers the far side's
//! probes, so that when neither daemon runs yet, `crosslink check --reach`
//! run at both ends at once (within the probing time of each other)
//! checks the paths in both directions. What the far side needs: its
//! daemon running with the mirror configuration, or a `check --reach` of
//! its own, and the path's UDP port let through.
//!
//! Causes are told apart by what comes back:
//! - an ICMP port unreachable (`ECONNREFUSED` on the connected socket):
//!   the far host is there but nothing listens on the path's port;
//! - a send error `ENETUNREACH`/`EHOSTUNREACH`: no route on this host;
//! - a bind error `EADDRNOTAVAIL`: the local address is not on this host;
//! - a far `check --reach` that cannot open our probe (another key, or a
//!   key on one side only) answers with a clear echo reply that says so; a
//!   far daemon stays silent instead (it answers nothing it cannot
//!   authenticate, like WireGuard), so silence means blocked on the way or
//!   a key the far daemon refuses (its `crosslink_dropped_packets_total`
//!   with reason `auth_failed` or `seal_mismatch` then grows).
//!
//! When a daemon already holds the local port here, probes go from
//! another port of the same address; the far daemon drops those (it
//! accepts a path's datagrams only from the configured address and port),
//! so only a far `check --reach` or the ICMP causes can then answer.
//!
//! The path MTU: probes of chosen sizes go out with Don't Fragment and no
//! local fragmentation ([`sys::set_pmtu_probe`]); the far end reports the
//! length it received; a few rounds of sizes spread between the largest
//! answered and the smallest unanswered close in on the largest IP packet
//! that gets through. It is compared with what the peer's TUN MTU needs:
//! the configured `mtu` plus the overlay's headers, or, without one, the
//! outgoing interface's MTU (from which the daemon sizes the TUN).

use crate::config::{Config, Policy};
use crate::core::crypto::{self, Keys, ReplayWindow};
use crate::core::forward::{self, emit_echo, emit_probe, emit_probe_reply, Echo, Message};
use crate::core::forward::{Opener, Sealer, HEADROOM, TRAILER};
use crate::core::handshake::Handshake;
use crate::core::wire::overlay::{ProbeClass, ProbeReport, BASE_LEN};
use crate::io::{clock, keys, sys};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Small probes: one every this long.
const SMALL_EVERY: Duration = Duration::from_millis(20);
/// How long a round of the MTU search waits for its answers.
const MTU_ROUND: Duration = Duration::from_millis(150);
/// Sizes tried per round of the MTU search (each sent twice).
const MTU_POINTS: u32 = 7;
/// Answers to probes sent in the last this long are not waited for, and
/// those probes do not count as lost.
const GRACE: Duration = Duration::from_millis(300);
/// The stamp of a clear echo reply that says "your probe did not open here".
const KEY_REFUSED: u64 = u64::MAX;
/// Largest datagram handled.
const BUF: usize = 65_536;
/// The MTU search looks no higher (jumbo frames; a cloud attachment's
/// largest is 9001 bytes): a larger interface MTU (loopback) is taken as
/// this.
const MAX_MTU: u32 = 9216;

/// A key-pair peer's handshake, shared by its paths' checks: what it
/// sends goes out on every path (a blocked one must not hold it up).
struct SharedHandshake {
    hs: Handshake,
    /// Datagrams each path has still to send, by path index.
    outbox: Vec<Vec<Vec<u8>>>,
}

type Shared = Arc<Mutex<SharedHandshake>>;

/// What a path's check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The far end answered our probes.
    Answered,
    /// The far host said nothing listens on the path's port.
    Refused,
    /// The far end answered but could not open our probes: the keys differ.
    KeyMismatch,
    /// No route to the far address from here.
    NoRoute,
    /// The peer's key file cannot be read.
    KeyFile,
    /// The local address is not on this host (or cannot be bound).
    LocalAddress,
    /// Nothing came back.
    NoAnswer,
}

/// One path's report.
#[derive(Clone, Debug, Serialize)]
pub struct PathReach {
    pub peer: String,
    pub path: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub verdict: Verdict,
    /// The verdict in words, with what to do about it.
    pub detail: String,
    /// Probes were sent from another port than the configured one (a
    /// daemon holds it here).
    pub other_port: bool,
    pub small_sent: u32,
    pub small_answered: u32,
    pub loss_percent: Option<f64>,
    pub rtt_ms_min: Option<f64>,
    pub rtt_ms_median: Option<f64>,
    /// The largest IP packet (underlay) that reached the far end.
    pub path_mtu: Option<u32>,
    /// The IP packet size the peer's TUN MTU needs on this path.
    pub needed_mtu: u32,
    /// The inner MTU this path can carry (what `mtu` on the peer may be).
    pub fits_inner_mtu: Option<u32>,
    /// Time from the start of the check to this path's verdict.
    pub took_ms: u64,
}

impl PathReach {
    /// The report of a path nothing was learnt about yet.
    fn blank(verdict: Verdict, detail: String, needed_mtu: u32) -> PathReach {
        PathReach {
            peer: String::new(),
            path: String::new(),
            local: SocketAddr::from(([0, 0, 0, 0], 0)),
            remote: SocketAddr::from(([0, 0, 0, 0], 0)),
            verdict,
            detail,
            other_port: false,
            small_sent: 0,
            small_answered: 0,
            loss_percent: None,
            rtt_ms_min: None,
            rtt_ms_median: None,
            path_mtu: None,
            needed_mtu,
            fits_inner_mtu: None,
            took_ms: 0,
        }
    }

    /// The report of `path` of `peer`, which could not be probed.
    fn unreached(
        peer: &str,
        path: &crate::config::PathConfig,
        verdict: Verdict,
        detail: String,
        needed_mtu: u32,
    ) -> PathReach {
        PathReach {
            peer: peer.to_string(),
            path: path.name.clone(),
            local: path.local,
            remote: path.remote,
            ..PathReach::blank(verdict, detail, needed_mtu)
        }
    }

    /// Whether the path is ready to carry the peer's traffic.
    pub fn ok(&self) -> bool {
        self.verdict == Verdict::Answered && self.path_mtu.is_some_and(|m| m >= self.needed_mtu)
    }
}

/// Probes every path of every peer of `config` at once for `duration`.
pub fn check(config: &Config, duration: Duration) -> Vec<PathReach> {
    let start = Instant::now();
    let mut jobs = Vec::new();
    for peer in &config.peers {
        let keys = match keys::load(peer) {
            Ok(k) => k,
            Err(e) => {
                for p in &peer.paths {
                    jobs.push(Err(PathReach::unreached(
                        &peer.name,
                        p,
                        Verdict::KeyFile,
                        format!("KEY FILE: {e}"),
                        0,
                    )));
                }
                continue;
            }
        };
        // A key-pair peer's paths share one handshake, as the far daemon
        // has one per peer: its messages go out on every path.
        let shared = match peer.public_key.is_some() {
            true => match keys::handshake(&config.gateway, peer, Instant::now()) {
                Ok(Some(hs)) => Some(Arc::new(Mutex::new(SharedHandshake {
                    hs,
                    outbox: vec![Vec::new(); peer.paths.len()],
                }))),
                Ok(None) => None,
                Err(e) => {
                    for p in &peer.paths {
                        jobs.push(Err(PathReach::unreached(
                            &peer.name,
                            p,
                            Verdict::KeyFile,
                            format!("KEY FILE: {e}"),
                            0,
                        )));
                    }
                    continue;
                }
            },
            false => None,
        };
        let extended = matches!(peer.policy, Policy::Duplicate | Policy::Aggregate);
        for (index, p) in peer.paths.iter().enumerate() {
            let v6 = p.remote.is_ipv6();
            let fec = peer.fec.mode != crate::config::FecMode::Off;
            let overhead = forward::inner_mtu(0x10000, v6, extended, keys.is_some(), fec);
            let overhead = 0x10000 - overhead;
            let needed = match peer.mtu {
                Some(m) => u32::from(m) + overhead,
                None => sys::route_mtu(p.local, p.remote)
                    .unwrap_or(1500)
                    .min(MAX_MTU),
            };
            let probe = Probe {
                peer: peer.name.clone(),
                path: p.name.clone(),
                local: p.local,
                remote: p.remote,
                interface: p.interface.clone(),
                keys: keys.clone(),
                pair: shared.clone().map(|h| (h, index)),
                needed,
                overhead,
            };
            jobs.push(Ok(std::thread::spawn(move || probe.run(start, duration))));
        }
    }
    jobs.into_iter()
        .filter_map(|j| match j {
            Ok(handle) => handle.join().ok(),
            Err(done) => Some(done),
        })
        .collect()
}

/// The table `check --reach` prints.
pub fn table(reports: &[PathReach]) -> String {
    let mut out = String::new();
    for r in reports {
        let mark = if r.ok() { "ok  " } else { "FAIL" };
        out.push_str(&format!(
            "{mark} peer {} path {} {} -> {}: {}\n",
            r.peer, r.path, r.local, r.remote, r.detail
        ));
        if r.verdict == Verdict::Answered {
            let rtt = r
                .rtt_ms_median
                .zip(r.rtt_ms_min)
                .map_or("-".to_string(), |(m, lo)| {
                    format!("{m:.2} ms median, {lo:.2} ms min")
                });
            let loss = r
                .loss_percent
                .map_or("-".to_string(), |l| format!("{l:.1} %"));
            out.push_str(&format!(
                "     rtt {rtt}, loss {loss} ({} of {} small probes answered)\n",
                r.small_answered, r.small_sent
            ));
            match (r.path_mtu, r.fits_inner_mtu) {
                (Some(m), Some(inner)) if m >= r.needed_mtu => out.push_str(&format!(
                    "     path MTU {m} bytes: fits the {} the peer's TUN needs (inner MTU up to {inner})\n",
                    r.needed_mtu
                )),
                (Some(m), Some(inner)) => out.push_str(&format!(
                    "     path MTU {m} bytes: TOO SMALL for the {} the peer's TUN needs; larger packets are lost on the way: set `mtu = {inner}` on the peer at both ends\n",
                    r.needed_mtu
                )),
                _ => out.push_str("     path MTU unknown\n"),
            }
        }
    }
    out
}

struct Probe {
    peer: String,
    path: String,
    local: SocketAddr,
    remote: SocketAddr,
    interface: Option<String>,
    keys: Option<Keys>,
    /// A key-pair peer: the handshake its paths share (the check's own,
    /// run before it seals a probe), and this path's index in it.
    pair: Option<(Shared, usize)>,
    needed: u32,
    /// Bytes of IP, UDP and overlay headers (and tag) around an inner packet.
    overhead: u32,
}

/// What was sent: per sequence number, the IP size and when.
struct Sent {
    size: u32,
    at: Instant,
    small: bool,
}

impl Probe {
    fn report(&self, verdict: Verdict, detail: String, start: Instant) -> PathReach {
        PathReach {
            peer: self.peer.clone(),
            path: self.path.clone(),
            local: self.local,
            remote: self.remote,
            took_ms: start.elapsed().as_millis() as u64,
            ..PathReach::blank(verdict, detail, self.needed)
        }
    }

    fn ip_header(&self) -> u32 {
        if self.remote.is_ipv6() {
            40
        } else {
            20
        }
    }

    fn run(self, start: Instant, duration: Duration) -> PathReach {
        let (sock, other_port) = match self.bind() {
            Ok(s) => s,
            Err(e) => {
                let detail = format!(
                    "LOCAL ADDRESS: cannot bind {}: {e} (is the address on this host?)",
                    self.local
                );
                return self.report(Verdict::LocalAddress, detail, start);
            }
        };
        let bound = sock.local_addr().unwrap_or(self.local);
        // Sealed probes carry an epoch, the start second of their sender's
        // run; like the daemon, send none before that second is over, so no
        // other run of this gateway shares it (see `crate::core::crypto`).
        let epoch = clock::unix_seconds(Instant::now());
        if self.keys.is_some() && self.pair.is_none() {
            let settled = Duration::from_secs(epoch + 1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or(settled);
            std::thread::sleep(settled.saturating_sub(now));
        }
        let mut s = Session {
            probe: &self,
            keys: self.keys.clone(),
            handshake: self.pair.clone(),
            sock,
            epoch: epoch as u32,
            salt_out: crypto::path_salt(bound, self.remote),
            salt_in: crypto::path_salt(self.remote, bound),
            window: ReplayWindow::default(),
            seq: 0,
            sent: HashMap::new(),
            rtts: Vec::new(),
            small_sent: 0,
            small_answered: 0,
            refused: false,
            no_route: None,
            key_refused: false,
            mtu_lo: 0,
            mtu_hi: 0,
            round: Vec::new(),
            round_answers: 0,
            first_answer: None,
            last_answer: None,
            round_opened: Instant::now(),
            last_request: None,
        };
        s.mtu_hi = sys::route_mtu(bound, self.remote)
            .unwrap_or(1500)
            .min(MAX_MTU)
            + 1;
        let probing = Instant::now();
        let end = probing + duration;
        let mut next_small = probing;
        let mut next_round = probing;
        let mut buf = vec![0u8; BUF];
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            s.drive_handshake(now);
            let sealable = s.keys.as_ref().is_none_or(Keys::can_seal);
            if now >= next_small && now + GRACE < end && sealable {
                s.send_small(now);
                next_small = now + SMALL_EVERY;
            }
            if now >= next_round && sealable {
                s.close_round();
                if s.mtu_hi > s.mtu_lo + 1 && now + MTU_ROUND < end {
                    s.open_round(now);
                }
                next_round = now + MTU_ROUND;
            }
            s.receive(&mut buf);
            // Stop early once the answer is complete: the far end answered
            // and the MTU search has closed in.
            let settled = s.small_answered >= 10 && s.mtu_hi <= s.mtu_lo + 1;
            let silent = s.first_answer.is_none() && s.no_route.is_some();
            let serving = s
                .last_request
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(250));
            if ((settled && !serving) || silent)
                && now.duration_since(probing) >= Duration::from_millis(500)
            {
                break;
            }
        }
        s.close_round();
        let mut r = self.report(Verdict::NoAnswer, String::new(), start);
        r.other_port = other_port;
        r.small_sent = s.small_sent;
        r.small_answered = s.small_answered;
        // Lost: small probes sent once the far end was there, and not
        // answered within the grace time.
        if let (Some(first), Some(last)) = (s.first_answer, s.last_answer) {
            let lost = s
                .sent
                .values()
                .filter(|x| x.small && x.at >= first && x.at <= last)
                .count() as u32;
            let counted = lost + s.small_answered;
            r.loss_percent = Some(100.0 * f64::from(lost) / f64::from(counted.max(1)));
        }
        s.rtts.sort_by(f64::total_cmp);
        r.rtt_ms_min = s.rtts.first().copied();
        r.rtt_ms_median = s.rtts.get(s.rtts.len() / 2).copied();
        let note = if other_port {
            format!(
                " (port {} is in use here, so probes went from port {}; a far daemon drops those: stop the daemon here to check through it)",
                self.local.port(),
                bound.port()
            )
        } else {
            String::new()
        };
        if s.mtu_lo > 0 {
            r.path_mtu = Some(s.mtu_lo);
            r.fits_inner_mtu = Some(s.mtu_lo.saturating_sub(self.overhead));
        }
        let answered_any = s.small_answered > 0 || s.mtu_lo > 0;
        (r.verdict, r.detail) = if answered_any {
            (Verdict::Answered, "answered".to_string())
        } else if s.key_refused {
            (
                Verdict::KeyMismatch,
                "KEY MISMATCH: the far end answered but cannot open our probes (another key, or a key on one side only)".to_string(),
            )
        } else if s.refused {
            (
                Verdict::Refused,
                format!("REFUSED: the far host says nothing listens on port {}: start crosslink there, or run `crosslink check --reach` there at the same time", self.remote.port()),
            )
        } else if let Some(e) = s.no_route {
            (
                Verdict::NoRoute,
                format!("NO ROUTE from {} to {}: {e}", bound.ip(), self.remote.ip()),
            )
        } else {
            (
                Verdict::NoAnswer,
                format!(
                    "NO ANSWER in {} ms: blocked on the way (firewall, security group, ACL), the far side not running crosslink or `check --reach`, or a far daemon that refuses our key{}",
                    duration.as_millis(),
                    if self.keys.is_some() || self.pair.is_some() { "" } else { " (or wants one)" }
                ),
            )
        };
        r.detail.push_str(&note);
        r.took_ms = start.elapsed().as_millis() as u64;
        r
    }

    /// A socket on the configured local address and port, or on another
    /// port of that address when the port is taken.
    fn bind(&self) -> io::Result<(UdpSocket, bool)> {
        let make = |addr: SocketAddr| -> io::Result<UdpSocket> {
            let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            if addr.is_ipv6() {
                sock.set_only_v6(true)?;
            }
            if let Some(ifname) = &self.interface {
                sock.bind_device(Some(ifname.as_bytes()))?;
            }
            // Room for a round of large probes and their answers.
            sock.set_recv_buffer_size(4 << 20)?;
            sock.bind(&addr.into())?;
            sock.connect(&self.remote.into())?;
            let sock: UdpSocket = sock.into();
            sys::set_pmtu_probe(&sock, addr.is_ipv6())?;
            sock.set_read_timeout(Some(Duration::from_millis(5)))?;
            Ok(sock)
        };
        match make(self.local) {
            Ok(s) => Ok((s, false)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                make(SocketAddr::new(self.local.ip(), 0)).map(|s| (s, true))
            }
            Err(e) => Err(e),
        }
    }
}

/// One path's probing state.
struct Session<'a> {
    probe: &'a Probe,
    /// What seals: the pre-shared key's, or the handshake's session once
    /// it completed.
    keys: Option<Keys>,
    /// A key-pair peer's handshake, run by the check itself, and this
    /// path's index in its outbox.
    handshake: Option<(Shared, usize)>,
    sock: UdpSocket,
    epoch: u32,
    salt_out: u64,
    salt_in: u64,
    window: ReplayWindow,
    seq: u64,
    sent: HashMap<u64, Sent>,
    rtts: Vec<f64>,
    small_sent: u32,
    small_answered: u32,
    refused: bool,
    no_route: Option<io::Error>,
    key_refused: bool,
    /// The largest IP size answered (0: none yet).
    mtu_lo: u32,
    /// The smallest IP size known not to pass.
    mtu_hi: u32,
    /// Sizes of the MTU round in flight.
    round: Vec<u32>,
    /// Answers that came while the round was in flight: a round with none
    /// says nothing about sizes (the far end was not there yet).
    round_answers: u32,
    /// When the first answered probe was sent: probes sent before do not
    /// count as lost.
    first_answer: Option<Instant>,
    /// When the last answered probe was sent: probes sent after it are
    /// not counted (the far side may have stopped, as a far check does).
    last_answer: Option<Instant>,
    /// When the MTU round in flight was sent.
    round_opened: Instant,
    /// When the far side's last probe came (it is checking too: keep
    /// answering).
    last_request: Option<Instant>,
}

impl Session<'_> {
    fn sealer(&self) -> Option<Sealer<'_>> {
        self.keys.as_ref().map(|keys| Sealer {
            keys,
            epoch: self.epoch,
            salt: self.salt_out,
        })
    }

    /// Runs the handshake's timers, puts what it sends in every path's
    /// outbox and sends this path's; takes its session keys once it has
    /// some.
    fn drive_handshake(&mut self, now: Instant) {
        let Some((shared, index)) = self.handshake.clone() else {
            return;
        };
        let (out, keys) = {
            let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
            g.hs.handle_timeout(now);
            while let Some(d) = g.hs.poll_transmit() {
                for o in g.outbox.iter_mut() {
                    o.push(d.clone());
                }
            }
            let out = g
                .outbox
                .get_mut(index)
                .map(std::mem::take)
                .unwrap_or_default();
            let keys = g.hs.keys();
            (out, keys)
        };
        for d in out {
            if let Err(e) = self.sock.send(&d) {
                self.note_error(e);
            }
        }
        let changed = self.keys.as_ref().map(Keys::session_epoch) != Some(keys.session_epoch());
        if keys.can_seal() && changed {
            self.keys = Some(keys);
        }
    }

    /// A handshake message, for a key-pair peer's handshake: true when
    /// `datagram` was one. One the handshake refuses for its keys (a MAC
    /// or a static key that is not the configured one) gets the far check
    /// the clear "did not open here" answer.
    fn on_handshake(&mut self, datagram: &[u8]) -> bool {
        use crate::core::handshake::Failure;
        use crate::core::wire::overlay::{Header, MsgType};
        let is_handshake =
            Header::parse(datagram).is_ok_and(|(h, _)| h.msg_type == MsgType::Handshake);
        if !is_handshake {
            return false;
        }
        let Some((shared, _)) = self.handshake.clone() else {
            self.refuse(datagram);
            return true;
        };
        let refused = {
            let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
            let count = |h: &Handshake| {
                [Failure::BadMac, Failure::UnknownKey, Failure::Decrypt]
                    .iter()
                    .map(|f| h.stats().failures(*f))
                    .sum::<u64>()
            };
            let before = count(&g.hs);
            g.hs.handle(datagram, Instant::now());
            count(&g.hs) > before
        };
        if refused {
            let mut msg = [0u8; HEADROOM];
            if let Ok(n) = emit_echo(Echo::Reply(KEY_REFUSED), &mut msg) {
                let _ = self.sock.send(msg.get(..n).unwrap_or_default());
            }
        }
        self.drive_handshake(Instant::now());
        true
    }

    /// Sends one probe whose IP packet is `size` bytes; false when it is
    /// too big to leave this host (`EMSGSIZE`).
    fn send_probe(&mut self, size: u32, small: bool, now: Instant) -> bool {
        let datagram = size.saturating_sub(self.probe.ip_header() + 8) as usize;
        let mut msg = vec![0u8; datagram.max(HEADROOM + TRAILER + 1)];
        let sealer = self.sealer();
        let Ok(n) = emit_probe(
            self.seq,
            ProbeClass::Small,
            datagram,
            &mut msg,
            sealer.as_ref(),
        ) else {
            return true;
        };
        let sent = self.sock.send(msg.get(..n).unwrap_or_default());
        let seq = self.seq;
        self.seq += 1;
        match sent {
            Ok(_) => {
                self.sent.insert(
                    seq,
                    Sent {
                        size: (n as u32) + self.probe.ip_header() + 8,
                        at: now,
                        small,
                    },
                );
                true
            }
            Err(e) => {
                let too_big = e.raw_os_error() == Some(libc::EMSGSIZE);
                self.note_error(e);
                !too_big
            }
        }
    }

    fn note_error(&mut self, e: io::Error) {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => self.refused = true,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL) => {
                self.no_route = Some(e);
            }
            _ => {}
        }
    }

    fn send_small(&mut self, now: Instant) {
        let size = self.probe.ip_header()
            + 8
            + BASE_LEN as u32
            + if self.keys.is_some() {
                TRAILER as u32
            } else {
                0
            }
            + 1;
        self.small_sent += 1;
        self.send_probe(size, true, now);
    }

    /// Sizes spread over what is still unknown, each sent twice.
    fn open_round(&mut self, now: Instant) {
        let lo = self
            .mtu_lo
            .max(self.probe.ip_header() + 8 + HEADROOM as u32);
        let hi = self.mtu_hi;
        if hi <= lo + 1 {
            return;
        }
        let mut sizes: Vec<u32> = (1..=MTU_POINTS)
            .map(|i| lo + (hi - lo) * i / (MTU_POINTS + 1))
            .chain([hi - 1])
            .filter(|&s| s > lo && s < hi)
            .collect();
        sizes.dedup();
        for &size in &sizes {
            for _ in 0..2 {
                if !self.send_probe(size, false, now) {
                    // Too big to leave this host: the interface's MTU is below.
                    self.mtu_hi = self.mtu_hi.min(size);
                }
            }
        }
        self.round = sizes;
        self.round_opened = now;
    }

    /// Learns from the round in flight: its unanswered sizes above the
    /// largest answered one bound the MTU from above.
    fn close_round(&mut self) {
        // Sizes unanswered count only if the far end was there when they
        // were sent (an answer to a probe sent no later came back).
        if self.round_answers > 0 && self.first_answer.is_some_and(|f| f <= self.round_opened) {
            for &size in &self.round {
                if size > self.mtu_lo {
                    self.mtu_hi = self.mtu_hi.min(size);
                }
            }
        }
        self.round.clear();
        self.round_answers = 0;
        if self.mtu_hi <= self.mtu_lo {
            self.mtu_hi = self.mtu_lo + 1;
        }
    }

    /// Reads what has come (answers, and the far side's own probes, which
    /// are answered).
    fn receive(&mut self, buf: &mut [u8]) {
        loop {
            let n = match self.sock.recv(buf) {
                Ok(n) => n,
                Err(e) => {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        self.note_error(e);
                    }
                    return;
                }
            };
            let Some(datagram) = buf.get_mut(..n) else {
                return;
            };
            if self.on_handshake(datagram) {
                continue;
            }
            let keys = self.keys.clone();
            let opener = keys.as_ref().map(|keys| Opener {
                keys,
                salt: self.salt_in,
                window: &mut self.window,
            });
            match forward::receive(datagram, opener) {
                Ok(Message::ProbeReply { seq, report }) => self.on_reply(seq, report),
                Ok(Message::Probe { seq, len, .. }) => {
                    self.last_request = Some(Instant::now());
                    self.answer_probe(seq, len);
                }
                Ok(Message::Echo(Echo::Request(stamp), _)) => self.answer_echo(stamp),
                Ok(Message::Echo(Echo::Reply(_), _)) => self.key_refused = true,
                Ok(Message::Data(..) | Message::Parity(..) | Message::Handshake) => {}
                Err(_) => {
                    self.key_refused |= self.is_refusal(datagram);
                    self.refuse(datagram);
                }
            }
        }
    }

    fn on_reply(&mut self, seq: u64, report: ProbeReport) {
        let Some(sent) = self.sent.remove(&seq) else {
            return;
        };
        self.round_answers += 1;
        self.first_answer.get_or_insert(sent.at);
        self.last_answer = self.last_answer.max(Some(sent.at));
        // The size the far end saw, in IP bytes (it reports the datagram).
        let size = (report.request_len + self.probe.ip_header() + 8).max(sent.size);
        if sent.small {
            self.small_answered += 1;
            self.rtts.push(sent.at.elapsed().as_secs_f64() * 1000.0);
        }
        if size > self.mtu_lo && size < 0x10000 {
            self.mtu_lo = size;
        }
    }

    fn answer_probe(&mut self, seq: u64, len: usize) {
        let report = ProbeReport {
            small_received: 0,
            large_received: 0,
            received_at_ns: clock::nanos(),
            data_received: 0,
            data_seq_high: 0,
            request_len: len as u32,
            data_unsettled: false,
        };
        let mut msg = [0u8; HEADROOM + ProbeReport::LEN + TRAILER];
        let sealer = self.sealer();
        if let Ok(n) = emit_probe_reply(seq, &report, &mut msg, sealer.as_ref()) {
            let _ = self.sock.send(msg.get(..n).unwrap_or_default());
        }
    }

    fn answer_echo(&mut self, stamp: u64) {
        let mut msg = [0u8; HEADROOM + TRAILER];
        let sealer = self.sealer();
        let n = match sealer {
            Some(s) => forward::seal_echo(Echo::Reply(stamp), &mut msg, &s),
            None => emit_echo(Echo::Reply(stamp), &mut msg),
        };
        if let Ok(n) = n {
            let _ = self.sock.send(msg.get(..n).unwrap_or_default());
        }
    }

    /// Whether a datagram we could not open is the far check's "your
    /// probe did not open here" (a clear echo reply).
    fn is_refusal(&self, datagram: &[u8]) -> bool {
        let mut copy = datagram.to_vec();
        matches!(
            forward::receive(&mut copy, None),
            Ok(Message::Echo(Echo::Reply(KEY_REFUSED), _))
        )
    }

    /// Tells the far check that its request did not open here (another key,
    /// or a key on one side only), in the clear so that it can read it. An
    /// answer no larger than the request, to a datagram from the path's
    /// own far address: no amplification, and nothing secret in it.
    fn refuse(&mut self, datagram: &[u8]) {
        let mut copy = datagram.to_vec();
        let request = match forward::receive(&mut copy, None) {
            Ok(Message::Probe { .. } | Message::Echo(Echo::Request(_), _)) => true,
            Ok(_) => false,
            // Sealed requests do not open without the key: read the type.
            Err(_) => {
                use crate::core::wire::overlay::{Header, MsgType};
                Header::parse(datagram).is_ok_and(|(h, _)| {
                    matches!(
                        h.msg_type,
                        MsgType::SealedProbeRequest
                            | MsgType::SealedEchoRequest
                            | MsgType::Handshake
                    )
                })
            }
        };
        if request {
            let mut msg = [0u8; HEADROOM];
            if let Ok(n) = emit_echo(Echo::Reply(KEY_REFUSED), &mut msg) {
                let _ = self.sock.send(msg.get(..n).unwrap_or_default());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_ok_only_when_answered_with_room_for_the_tun() {
        let mut r = PathReach {
            peer: "p".into(),
            path: "a".into(),
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            verdict: Verdict::Answered,
            detail: String::new(),
            other_port: false,
            small_sent: 10,
            small_answered: 10,
            loss_percent: Some(0.0),
            rtt_ms_min: Some(0.1),
            rtt_ms_median: Some(0.2),
            path_mtu: Some(1500),
            needed_mtu: 1500,
            fits_inner_mtu: Some(1436),
            took_ms: 1,
        };
        assert!(r.ok());
        r.path_mtu = Some(1400);
        assert!(!r.ok());
        assert!(table(std::slice::from_ref(&r)).contains("TOO SMALL"));
        r.path_mtu = Some(1500);
        r.verdict = Verdict::NoAnswer;
        assert!(!r.ok());
    }
}
