//! The forwarding threads.
//!
//! `tun-<peer>` ([`TunOut`]) reads the peer's TUN into a buffer at offset
//! [`HEADROOM`], asks the current forwarding snapshot where the flow goes
//! ([`classify`]), writes the overlay header in front ([`encapsulate`]) and
//! sends the datagram on the path's socket. `rx-<path>` ([`PathIn`]) takes
//! datagrams from the path's configured remote only, validates them
//! ([`decapsulate`]) and writes the inner packet to the TUN; it also
//! answers the peer's echo requests and, once a second, sends its own to
//! measure the path's round-trip time ([`crate::forward::Echo`]).
//!
//! For a peer with a key, both threads read the peer's [`Keys`] from a
//! shared [`ArcSwapOption`] on every packet (a reload swaps it without
//! stopping anything) and use the sealed messages ([`seal_data`],
//! [`seal_echo`], [`open`]); each `rx-*` thread owns its path's replay
//! window.
//!
//! Under `duplicate` the sending thread numbers the peer's packets (one
//! counter per peer, next to a random instance number) and the receive
//! threads of all the peer's paths share one [`Window`] behind a mutex,
//! held only for the bitmap check: the first copy is written to the TUN,
//! the second is dropped and counted as `duplicate`.
//!
//! A send that fails because the underlay cannot reach the far end is
//! reported to the BFD thread (at most once per path every
//! [`SEND_ERROR_REPORT_INTERVAL`]), which marks the path suspect.

use super::control_plane::{Command, CommandLink};
use super::{clock, udp};
use crate::config::Policy;
use crate::crypto::{EchoGuard, Keys, ReplayWindow};
use crate::dedup::{Verdict, Window};
use crate::drop::DropReason;
use crate::engine::Forwarding;
use crate::forward::{
    classify, decapsulate, echo_rtt, emit_echo, encapsulate, open, parse_echo, seal_data,
    seal_echo, Echo, Opened, Sealer, HEADROOM, TRAILER,
};
use crate::telemetry::{DropCounters, PathCounters};
use crate::wire::overlay::{Header, PeerSeq};
use crate::{PathId, PeerId};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error};
use tun_rs::{InterruptEvent, SyncDevice};

/// Largest datagram handled (inner packet plus overlay header).
pub const BUF_LEN: usize = 65_535 + HEADROOM + TRAILER;

/// A peer's keys as the forwarding threads share them; `None`: cleartext.
pub type SharedKeys = Arc<ArcSwapOption<Keys>>;
/// Flows idle this long no longer count as active.
const FLOW_IDLE: Duration = Duration::from_secs(30);
const MAX_TRACKED_FLOWS: usize = 1 << 20;
/// Send errors on one path are reported to the BFD thread at most this often.
pub const SEND_ERROR_REPORT_INTERVAL: Duration = Duration::from_millis(5);
/// How often idle flows are expired and per-path flow counts published.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often each path measures its round-trip time.
const ECHO_INTERVAL: Duration = Duration::from_secs(1);
/// Replies older than this are ignored.
const ECHO_MAX_AGE: Duration = Duration::from_secs(10);

/// A path as the sending thread sees it.
pub struct PathOut {
    pub id: PathId,
    pub socket: Arc<UdpSocket>,
    pub remote: SocketAddr,
    pub counters: Arc<PathCounters>,
    pub sequence: u64,
    pub last_error_report: Option<Instant>,
    /// [`crate::crypto::path_salt`] of (local, remote).
    pub salt: u64,
}

/// Reads a peer's TUN and sends each packet on its path.
pub struct TunOut {
    pub peer: PeerId,
    pub tun: Arc<SyncDevice>,
    pub forwarding: Arc<ArcSwap<Forwarding>>,
    pub paths: Vec<Option<PathOut>>,
    pub drops: Arc<DropCounters>,
    pub interrupt: Arc<InterruptEvent>,
    pub flows: FlowTable,
    /// Where send errors are reported.
    pub commands: CommandLink,
    /// `duplicate`: this sender's instance number and the peer's last sequence.
    pub instance: u32,
    pub peer_sequence: u64,
    pub keys: SharedKeys,
    /// This run's epoch (see [`crate::crypto`]).
    pub epoch: u32,
}

impl TunOut {
    /// Forwards until interrupted; gives itself back so that a reload can
    /// restart it with a changed path table (sequence numbers kept).
    pub fn run(mut self) -> TunOut {
        let mut buf = vec![0u8; BUF_LEN];
        // A second copy (duplicate policy) of a sealed packet is sealed
        // from this plaintext copy.
        let mut spare = vec![0u8; BUF_LEN];
        let mut last_sweep = clock::now();
        loop {
            let read = self.tun.recv_intr_timeout(
                &mut buf[HEADROOM..BUF_LEN - TRAILER],
                &self.interrupt,
                Some(SWEEP_EVERY),
            );
            let n = match read {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    last_sweep = clock::now();
                    self.flows.sweep(last_sweep, &self.paths);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted && self.interrupt.is_trigger() => {
                    return self
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(error = %e, "TUN read failed; forwarding for this peer stopped");
                    return self;
                }
            };
            let now = clock::now();
            let forwarding = self.forwarding.load();
            let Some(selection) = forwarding.peers.get(usize::from(self.peer.0)) else {
                continue;
            };
            match classify(selection, &buf[HEADROOM..HEADROOM + n]) {
                Ok(placement) => {
                    self.flows.touch(placement.flow_hash, placement.path, now);
                    let peer_seq = (selection.policy == Policy::Duplicate).then(|| {
                        self.peer_sequence = self.peer_sequence.wrapping_add(1);
                        PeerSeq {
                            instance: self.instance,
                            sequence: self.peer_sequence,
                        }
                    });
                    let keys = self.keys.load_full();
                    let keys = keys.as_deref();
                    if let Some(copy) = placement.copy {
                        let len = HEADROOM + n;
                        spare[..len].copy_from_slice(&buf[..len]);
                        self.send(copy, &mut spare, n, peer_seq, keys, now);
                    }
                    self.send(placement.path, &mut buf, n, peer_seq, keys, now);
                }
                Err(reason) => self.drops.count(reason),
            }
            if now.saturating_duration_since(last_sweep) >= SWEEP_EVERY {
                last_sweep = now;
                self.flows.sweep(now, &self.paths);
            }
        }
    }

    fn send(
        &mut self,
        id: PathId,
        buf: &mut [u8],
        inner_len: usize,
        peer_seq: Option<PeerSeq>,
        keys: Option<&Keys>,
        now: Instant,
    ) {
        let Some(Some(path)) = self.paths.get_mut(usize::from(id.0)) else {
            self.drops.count(DropReason::NoPath);
            return;
        };
        path.sequence += 1;
        let mut header = Header::data(path.sequence);
        if let Some(p) = peer_seq {
            header = header.with_peer_seq(p);
        }
        let framed = match keys {
            Some(keys) => {
                let sealer = Sealer {
                    keys,
                    epoch: self.epoch,
                    salt: path.salt,
                };
                seal_data(buf, inner_len, &header, &sealer)
            }
            None => encapsulate(buf, inner_len, &header),
        };
        let range = match framed {
            Ok(r) => r,
            Err(reason) => return self.drops.count(reason),
        };
        let Some(datagram) = buf.get(range) else {
            return self.drops.count(DropReason::TooBig);
        };
        match path.socket.send_to(datagram, path.remote) {
            Ok(_) => path.counters.count_tx(inner_len),
            Err(e) => {
                self.drops.count(DropReason::PathSend);
                if udp::is_reachability_error(&e) && path.report_due(now) {
                    self.commands.send(Command::SendError(path.id));
                }
            }
        }
    }
}

impl PathOut {
    fn report_due(&mut self, now: Instant) -> bool {
        let due = self
            .last_error_report
            .is_none_or(|t| now.saturating_duration_since(t) >= SEND_ERROR_REPORT_INTERVAL);
        if due {
            self.last_error_report = Some(now);
        }
        due
    }
}

/// Receives a path's datagrams and writes the inner packets to the TUN.
pub struct PathIn {
    pub socket: Arc<UdpSocket>,
    pub remote: SocketAddr,
    pub tun: Arc<SyncDevice>,
    pub counters: Arc<PathCounters>,
    pub drops: Arc<DropCounters>,
    pub stop: Arc<AtomicBool>,
    /// The peer's duplicate-suppression window, shared by its paths.
    pub dedup: Arc<Mutex<Window>>,
    /// Where measured round-trip times go.
    pub rtt: metrics::Histogram,
    /// XORed into echo stamps, so that a forged reply does not decode to a
    /// plausible send time.
    pub stamp_key: u64,
    pub keys: SharedKeys,
    pub epoch: u32,
    /// [`crate::crypto::path_salt`] of (local, remote), for what we send.
    pub salt_out: u64,
    /// [`crate::crypto::path_salt`] of (remote, local), for what we receive.
    pub salt_in: u64,
    pub window: ReplayWindow,
    pub echo_guard: EchoGuard,
}

impl PathIn {
    pub fn run(mut self) {
        let mut buf = vec![0u8; BUF_LEN];
        let mut next_echo = clock::now();
        while !self.stop.load(Ordering::Relaxed) {
            let now = clock::now();
            if now >= next_echo {
                next_echo = now + ECHO_INTERVAL;
                // Sealed stamps need no obscuring, and must increase (EchoGuard).
                let stamp = match self.keys.load().is_some() {
                    true => clock::nanos(),
                    false => clock::nanos() ^ self.stamp_key,
                };
                self.echo_guard.sent(stamp);
                self.send_echo(Echo::Request(stamp));
            }
            let (n, src) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    debug!(error = %e, "path receive error");
                    continue;
                }
            };
            if src != self.remote {
                self.drops.count(DropReason::UnknownSource);
                continue;
            }
            if let Some(keys) = self.keys.load_full() {
                if let Some(datagram) = buf.get_mut(..n) {
                    self.receive_sealed(&keys, datagram);
                }
                continue;
            }
            let Some(datagram) = buf.get(..n) else {
                continue;
            };
            if let Some(echo) = parse_echo(datagram) {
                self.on_echo(echo);
                continue;
            }
            match decapsulate(datagram) {
                Ok((header, inner)) => self.deliver(header.peer_seq, inner),
                Err(reason) => self.drops.count(reason),
            }
        }
    }

    fn deliver(&self, peer_seq: Option<PeerSeq>, inner: &[u8]) {
        self.counters.count_rx(inner.len());
        if let Some(p) = peer_seq {
            match self.dedup.lock().check(p.instance, p.sequence) {
                Verdict::Deliver => {}
                Verdict::Duplicate => return self.drops.count(DropReason::Duplicate),
                Verdict::TooOld => return self.drops.count(DropReason::DuplicateStale),
            }
        }
        if self.tun.send(inner).is_err() {
            self.drops.count(DropReason::TunWrite);
        }
    }
}

impl PathIn {
    fn receive_sealed(&mut self, keys: &Keys, datagram: &mut [u8]) {
        match open(datagram, keys, self.salt_in, &mut self.window) {
            Ok(Opened::Data(header, range)) => {
                let inner = datagram.get(range).unwrap_or_default();
                self.deliver(header.peer_seq, inner);
            }
            Ok(Opened::Echo(Echo::Request(stamp), epoch)) => {
                if self.echo_guard.request(epoch, stamp) {
                    self.send_echo(Echo::Reply(stamp));
                } else {
                    self.drops.count(DropReason::Replayed);
                }
            }
            Ok(Opened::Echo(Echo::Reply(stamp), _)) => {
                if self.echo_guard.reply(stamp) {
                    self.record_rtt(stamp);
                } else {
                    self.drops.count(DropReason::EchoStale);
                }
            }
            Err(reason) => self.drops.count(reason),
        }
    }

    fn send_echo(&self, echo: Echo) {
        let mut msg = [0u8; HEADROOM + TRAILER];
        let keys = self.keys.load_full();
        let framed = match keys.as_deref() {
            Some(keys) => {
                let sealer = Sealer {
                    keys,
                    epoch: self.epoch,
                    salt: self.salt_out,
                };
                seal_echo(echo, &mut msg, &sealer)
            }
            None => emit_echo(echo, &mut msg),
        };
        if let Ok(n) = framed {
            if self.socket.send_to(&msg[..n], self.remote).is_err() {
                self.drops.count(DropReason::PathSend);
            }
        }
    }

    fn on_echo(&self, echo: Echo) {
        match echo {
            Echo::Request(stamp) => self.send_echo(Echo::Reply(stamp)),
            Echo::Reply(stamp) => self.record_rtt(stamp ^ self.stamp_key),
        }
    }

    /// Records the round trip of a reply to the request stamped `sent`.
    fn record_rtt(&self, sent: u64) {
        let max = ECHO_MAX_AGE.as_nanos() as u64;
        match echo_rtt(sent, clock::nanos(), max) {
            Some(ns) => {
                self.counters.rtt_ns.store(ns.max(1), Ordering::Relaxed);
                self.rtt.record(Duration::from_nanos(ns).as_secs_f64());
            }
            None => self.drops.count(DropReason::EchoStale),
        }
    }
}

/// Hasher for keys that are already well-mixed 64-bit hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Recently seen flows per path, for `flows` in status and metrics.
#[derive(Default)]
pub struct FlowTable {
    flows: HashMap<u64, (PathId, Instant), BuildHasherDefault<PassThrough>>,
}

impl FlowTable {
    fn touch(&mut self, hash: u64, path: PathId, now: Instant) {
        if self.flows.len() < MAX_TRACKED_FLOWS || self.flows.contains_key(&hash) {
            self.flows.insert(hash, (path, now));
        }
    }

    fn sweep(&mut self, now: Instant, paths: &[Option<PathOut>]) {
        self.flows
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < FLOW_IDLE);
        let mut per_path = vec![0u64; paths.len()];
        for (path, _) in self.flows.values() {
            if let Some(c) = per_path.get_mut(usize::from(path.0)) {
                *c += 1;
            }
        }
        for (p, n) in paths.iter().zip(per_path) {
            if let Some(p) = p {
                p.counters.flows.store(n, Ordering::Relaxed);
            }
        }
    }
}
