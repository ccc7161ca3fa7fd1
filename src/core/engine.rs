//! The control plane of one gateway, sans-IO: every path's BFD session,
//! every peer's steering, and the events between them.
//!
//! The shell feeds it received BFD datagrams (`handle_bfd_datagram`) and
//! the passing of time (`handle_timeout`), and drains what it produces:
//! control packets to send (`poll_transmit`), the next deadline
//! (`poll_timeout`), state changes and failovers (`poll_event`), and a new
//! forwarding snapshot for the data plane whenever steering changed
//! (`poll_forwarding`). It reads no clock and touches no socket, so the
//! same code runs in the daemon and in the simulated-network tests.
//!
//! # Fast failure signals
//!
//! BFD needs its detection time (3 × 10 ms at best) to notice a failure.
//! Two local signals are faster, and the shell reports them:
//!
//! - [`Engine::handle_link_event`]: the path's underlay interface lost its
//!   carrier (or was set down), or the path's local address went away. The
//!   path leaves service at once, like a BFD Down. It is *blocked* until the
//!   link is back **and** a BFD control packet has been received on the
//!   path with the session Up after that: a link that comes back is not
//!   trusted before BFD has seen the far end again.
//! - [`Engine::handle_send_error`]: sending on the path failed with an
//!   error that means the underlay cannot reach the far end now
//!   (ENETUNREACH, EHOSTUNREACH, ENETDOWN...). The path is *suspect*: out
//!   of service at once, until a BFD transmission on it has succeeded again
//!   ([`Engine::handle_send_ok`]) and a BFD control packet has been
//!   received after that with the session Up. A suspect path keeps running
//!   BFD, so it re-probes itself at the BFD rate.
//!
//! A path is *healthy* for steering when its session is Up and it is not
//! blocked; every loss of health counts as a flap for flap damping.
//!
//! Peers and paths can be added and removed while running (configuration
//! reload). Their ids are slots that are never reused: a removed path or
//! peer stays behind as a *retired* tombstone, so an id held anywhere in
//! the shell (a forwarding table, a metric handle) can never come to mean
//! a different path. Unchanged paths keep their sessions untouched.

use crate::config::{
    BfdAuthType, BfdConfig, Config, FecConfig, FecMode, Hop, PathConfig, PeerConfig, Policy,
    SlaConfig,
};
use crate::core::aggregate::{nanos, offsets, reorder_wait, Board, Delivery, Estimator};
use crate::core::bfd::{Auth, Deadlines, KeyError, Session, SessionConfig, SessionEvent, Transmit};
use crate::core::drop::DropReason;
use crate::core::fec::{auto_code, Code};
use crate::core::handshake::{Handshake, HandshakeExport};
use crate::core::quality::{Quality, Reason, Sample, Transition, VerdictExport};
use crate::core::steer::{Damping, Selection, SlotExport, Steering};
use crate::core::wire::bfd::{AuthType, ControlPacket, Diag, EmitError, State};
use crate::core::wire::flow::mix;
use crate::{PathId, PeerId};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// BFD secrets by file name, read by the shell (the engine does no I/O).
pub type Secrets = HashMap<PathBuf, Vec<u8>>;

/// Why a path's BFD authentication cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A path has BFD authentication configured but its secret was not supplied.
    #[error("path {path}: BFD secret {} was not loaded", file.display())]
    MissingSecret { path: String, file: PathBuf },
    /// The secret does not fit the authentication type.
    #[error("path {path}: BFD secret {}: {source}", file.display())]
    BadSecret {
        path: String,
        file: PathBuf,
        source: KeyError,
    },
    /// A session handed over by an upgrade could not be taken over.
    #[error("{0}")]
    Restore(String),
}

/// What the data plane needs to place packets: one selection per peer,
/// indexed by [`PeerId`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Forwarding {
    pub peers: Vec<Selection>,
}

/// The length of a control packet without authentication: what the
/// receive offload takes.
pub const OFFLOAD_PACKET_LEN: usize = 24;

/// What the BFD receive offload is to take in the kernel
/// ([`Engine::poll_offload`]; README: BFD receive offload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadChange {
    /// Take repeats of `packet` for the path's session (replaces what it
    /// took before).
    Arm {
        path: PathId,
        packet: [u8; OFFLOAD_PACKET_LEN],
    },
    /// Take nothing more for it: every packet goes to the socket again.
    Disarm(PathId),
}

impl OffloadChange {
    pub fn path(&self) -> PathId {
        match *self {
            OffloadChange::Arm { path, .. } | OffloadChange::Disarm(path) => path,
        }
    }
}

/// Something that happened, for logs and metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A path's BFD session changed state.
    PathState {
        path: PathId,
        from: State,
        to: State,
        diag: Diag,
        /// The change was administrative (the peer said AdminDown, or we did),
        /// not a failure: no detection, no failure count.
        administrative: bool,
    },
    /// A peer's active path changed.
    Failover {
        peer: PeerId,
        from: Option<PathId>,
        to: Option<PathId>,
        /// Time from the last control packet heard on the failed path to
        /// the moment it was declared down (failures only).
        detection: Option<Duration>,
        /// What moved the traffic.
        cause: MoveCause,
    },
    /// A path's quality verdict changed (degraded, or good again), with the
    /// figures that made it.
    Quality {
        path: PathId,
        transition: Transition,
    },
    /// A peer gained its first usable path, or lost its last.
    PeerUp { peer: PeerId, up: bool },
    /// A fast failure signal blocked a path, or the block was lifted.
    PathBlock {
        path: PathId,
        cause: Option<BlockCause>,
    },
    /// A peer's forward-error-correction code changed (`None`: no parity),
    /// with the measured loss and the congestion verdict that made it.
    Fec {
        peer: PeerId,
        from: Option<Code>,
        to: Option<Code>,
        loss: f64,
        congested: bool,
    },
}

/// How long `auto` keeps a code after the loss says a lighter one would
/// do: loss comes and goes, and flapping codes help nobody.
pub const FEC_LOWER_AFTER: Duration = Duration::from_secs(5);

/// What moved a peer's traffic from one path to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoveCause {
    /// A path failed (BFD, carrier, address, send errors).
    Down,
    /// A path came (back) into service.
    Up,
    /// A path was degraded, for this reason.
    Degraded(Reason),
    /// A degraded path was good again for its hold.
    Recovered,
    /// A path was removed by a reload.
    Removed,
}

impl MoveCause {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveCause::Down => "down",
            MoveCause::Up => "up",
            MoveCause::Degraded(r) => r.as_str(),
            MoveCause::Recovered => "recovered",
            MoveCause::Removed => "removed",
        }
    }
}

/// Why a path is out of service although BFD may still say Up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockCause {
    /// The underlay interface lost carrier or the local address.
    Link,
    /// Sending on the path failed (network or host unreachable).
    SendError,
}

impl BlockCause {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockCause::Link => "link_down",
            BlockCause::SendError => "send_error",
        }
    }
}

/// A path blocked by a fast signal; `ready` once the signal has cleared
/// (link up again, or a send succeeded), after which the next BFD packet
/// received with the session Up lifts the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    cause: BlockCause,
    ready: bool,
}

struct PeerCore {
    name: String,
    /// The kernel fast path numbers no data datagram (quality from probes).
    fast_path: bool,
    steering: Steering,
    paths: Vec<PathId>,
    up: bool,
    retired: bool,
    /// `reorder_wait`, if configured (else from the paths' round trips).
    reorder_wait: Option<Duration>,
    fec: FecConfig,
    /// The code in use, and since when `auto` would have sent less.
    fec_code: Option<Code>,
    fec_lighter_since: Option<Instant>,
}

/// A path's control state as it leaves this process for the one that
/// takes over (an upgrade): named by peer and path, since the new process
/// numbers its paths itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathExport {
    pub peer: String,
    pub path: String,
    pub session: crate::core::bfd::Snapshot,
    pub control_tx: u64,
    pub control_rx: u64,
    pub failures: u64,
    pub remote_admin_downs: u64,
    /// Where the path stood in its peer's steering, and its quality
    /// verdict (absent from a process before they were handed over).
    #[serde(default)]
    pub steering: Option<SlotExport>,
    #[serde(default)]
    pub quality: Option<VerdictExport>,
}

/// Per-path control state.
pub struct PathCore {
    pub peer: PeerId,
    pub name: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub hop: Hop,
    pub min_ttl: u8,
    /// The outer DSCP of its data datagrams; `None`: the inner packet's.
    pub dscp: Option<u8>,
    pub session: Session,
    last_rx: Option<Instant>,
    down_since: Option<Instant>,
    block: Option<Block>,
    pub control_tx: u64,
    pub control_rx: u64,
    /// Up -> not Up changes that were failures (detection expiry, or the peer saying
    /// Down); administrative changes (AdminDown either way) are not counted.
    pub failures: u64,
    /// Times the peer took the session down administratively.
    pub remote_admin_downs: u64,
    /// The path's measured quality and verdict.
    pub quality: Quality,
    /// Its rate and delay as `aggregate` sees them.
    pub estimate: Estimator,
    /// Its configured `rate` (bytes per second).
    pub rate: Option<u64>,
    /// `bfd.offload`: repeats may be taken by the receive offload.
    offload: bool,
    /// The packet whose repeats the offload takes now, if it does.
    offloaded: Option<[u8; OFFLOAD_PACKET_LEN]>,
    /// The detection deadline for which the shell was last asked to read
    /// the offload's time of the last repeat ([`Engine::poll_refresh`]),
    /// and whether it answered ([`Engine::handle_bfd_refresh`]).
    refresh_asked: Option<Instant>,
    refresh_answered: bool,
    retired: bool,
}

impl PathCore {
    /// Whether BFD says the path works.
    pub fn is_up(&self) -> bool {
        self.session.state() == State::Up
    }

    /// Whether the path may carry traffic: BFD Up and no fast signal against it.
    pub fn is_healthy(&self) -> bool {
        self.is_up() && self.block.is_none()
    }

    /// Why a fast signal keeps the path out of service, if one does.
    pub fn blocked(&self) -> Option<BlockCause> {
        self.block.map(|b| b.cause)
    }

    /// Whether the receive offload takes the session's repeats now.
    pub fn is_offloaded(&self) -> bool {
        self.offloaded.is_some()
    }

    /// Whether the path was removed by a reload (its slot is a tombstone).
    pub fn is_retired(&self) -> bool {
        self.retired
    }
}

/// The gateway's control plane.
pub struct Engine {
    peers: Vec<PeerCore>,
    paths: Vec<PathCore>,
    events: VecDeque<Event>,
    dirty: bool,
    seed: u64,
    /// BFD secrets (RFC 5880 §6.7 keys) by file, for paths with `auth`.
    secrets: Secrets,
    /// Live paths by local discriminator: RFC 5880 §6.3 demultiplexing.
    by_discriminator: HashMap<u32, PathId>,
    /// Live paths by (local, remote) address, for packets with Your
    /// Discriminator 0 (the first of several with the same addresses).
    by_addresses: HashMap<(IpAddr, IpAddr), PathId>,
    /// Every path's and peer's next deadline (see [`timer_key`]): the
    /// timers run without a scan of every session.
    timers: Deadlines,
    /// Paths with a control packet due, in the order they fell due.
    ready_tx: VecDeque<PathId>,
    /// By path slot: whether it is in `ready_tx`.
    in_ready: Vec<bool>,
    /// Scratch for the keys due in one `handle_timeout`.
    due_keys: Vec<usize>,
    /// The handshakes of the peers with a `public_key`.
    handshakes: HashMap<PeerId, Handshake>,
    /// What the receive offload is to take, in order.
    offload_changes: VecDeque<OffloadChange>,
    /// Offloaded paths whose detection time ran out: the shell reads when
    /// the last repeat arrived before the session may expire.
    refreshes: VecDeque<PathId>,
}

/// The key of a path's (even) or a peer's (odd) deadline in [`Engine::timers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerKey {
    Path(usize),
    Peer(usize),
}

fn timer_key(k: TimerKey) -> usize {
    match k {
        TimerKey::Path(i) => 2 * i,
        TimerKey::Peer(i) => 2 * i + 1,
    }
}

fn timer_of(key: usize) -> TimerKey {
    match key % 2 {
        0 => TimerKey::Path(key / 2),
        _ => TimerKey::Peer(key / 2),
    }
}

impl Engine {
    /// Builds sessions and steering for a validated config.
    pub fn new(config: &Config, now: Instant, seed: u64) -> Engine {
        let mut engine = Engine {
            peers: Vec::new(),
            paths: Vec::new(),
            events: VecDeque::new(),
            dirty: true,
            seed,
            secrets: Secrets::new(),
            by_discriminator: HashMap::new(),
            by_addresses: HashMap::new(),
            timers: Deadlines::new(),
            ready_tx: VecDeque::new(),
            in_ready: Vec::new(),
            due_keys: Vec::new(),
            handshakes: HashMap::new(),
            offload_changes: VecDeque::new(),
            refreshes: VecDeque::new(),
        };
        for peer in &config.peers {
            engine.add_peer(peer, now);
        }
        engine
    }

    /// Adds a peer with its paths (their sessions start Down) in the next
    /// free slot. Returns `None` when the id space is exhausted.
    pub fn add_peer(&mut self, peer: &PeerConfig, now: Instant) -> Option<PeerId> {
        let id = PeerId(u16::try_from(self.peers.len()).ok()?);
        let mut steering = Steering::new(peer.policy, peer.revert_hold, &[]);
        steering.set_max_moves(peer.sla.max_moves_per_minute);
        self.peers.push(PeerCore {
            name: peer.name.clone(),
            fast_path: peer.fast_path,
            steering,
            paths: Vec::new(),
            up: false,
            retired: false,
            reorder_wait: peer.reorder_wait,
            fec: peer.fec,
            fec_code: None,
            fec_lighter_since: None,
        });
        for path in &peer.paths {
            self.add_path(id, path, now)?;
        }
        self.decide_fec(id, now);
        self.dirty = true;
        self.reschedule_peer(id);
        Some(id)
    }

    /// Adds (or replaces) BFD secrets, by file name. Call before adding paths whose
    /// `auth` names those files.
    pub fn set_secrets(&mut self, secrets: Secrets) {
        self.secrets.extend(secrets);
    }

    /// The authentication a path would get, or why it cannot: a path configured
    /// with `auth` whose secret is missing or unusable is never added (fail closed).
    pub fn check_path_auth(&self, path: &PathConfig) -> Result<(), EngineError> {
        path_auth(&path.name, &path.bfd, &self.secrets, 0).map(drop)
    }

    /// Adds a path to a live peer; its session starts Down. `None` when the id
    /// space is exhausted or the path's BFD secret is missing or unusable
    /// ([`check_path_auth`](Self::check_path_auth) says which).
    pub fn add_path(&mut self, peer: PeerId, path: &PathConfig, now: Instant) -> Option<PathId> {
        let id = PathId(u16::try_from(self.paths.len()).ok()?);
        let disc = self.unique_discriminator(self.seed);
        let initial_seq = (mix(self.seed ^ u64::from(disc) ^ 0xa17) >> 32) as u32;
        let auth = path_auth(&path.name, &path.bfd, &self.secrets, initial_seq).ok()?;
        let core = self
            .peers
            .get_mut(usize::from(peer.0))
            .filter(|p| !p.retired)?;
        core.steering.add_path(id, path.priority, path.weight);
        core.paths.push(id);
        let quality = Quality::new(path.sla, !core.fast_path);
        let mut session = Session::new(
            session_config(&path.bfd, disc),
            now,
            mix(self.seed ^ u64::from(disc)),
        );
        session.set_auth(auth);
        let live = self.paths.iter().filter(|p| !p.retired).count();
        session.spread_first_transmission(now, first_tx_window(path.bfd.tx_interval, live));
        self.paths.push(PathCore {
            peer,
            name: path.name.clone(),
            local: path.local,
            remote: path.remote,
            hop: path.bfd.hop,
            min_ttl: path.bfd.min_ttl,
            dscp: path.dscp.fixed(),
            session,
            last_rx: None,
            down_since: Some(now),
            block: None,
            control_tx: 0,
            control_rx: 0,
            failures: 0,
            remote_admin_downs: 0,
            quality,
            estimate: Estimator::new(path.rate),
            rate: path.rate,
            offload: path.bfd.offload,
            offloaded: None,
            refresh_asked: None,
            refresh_answered: false,
            retired: false,
        });
        self.new_board(peer);
        self.in_ready.push(false);
        self.by_discriminator.insert(disc, id);
        self.by_addresses
            .entry((path.local.ip(), path.remote.ip()))
            .or_insert(id);
        self.dirty = true;
        self.reschedule(id);
        Some(id)
    }

    /// Gives the peer a new [`Board`] for its current paths (estimates
    /// kept).
    fn new_board(&mut self, peer: PeerId) {
        let Some(core) = self.peers.get(usize::from(peer.0)) else {
            return;
        };
        let paths: Vec<(PathId, Option<u64>)> = core
            .paths
            .iter()
            .filter_map(|&id| {
                let p = self.paths.get(usize::from(id.0))?;
                Some((id, Some(p.estimate.rate())))
            })
            .collect();
        let wait = self.wait_of(peer);
        let board = Arc::new(Board::new(&paths, wait));
        for bp in &board.paths {
            let Some(p) = self.paths.get(usize::from(bp.id.0)) else {
                continue;
            };
            if let Some(d) = p.estimate.delay() {
                bp.delay_ns.store(nanos(d), Ordering::Relaxed);
            }
            bp.ceiling.store(p.rate.unwrap_or(0), Ordering::Relaxed);
        }
        self.publish_offsets(peer, &board);
        if let Some(core) = self.peers.get_mut(usize::from(peer.0)) {
            core.steering.set_board(board);
        }
    }

    /// Publishes how long the receiving lanes hold each of the peer's
    /// paths' packets ([`crate::core::aggregate::offsets`]), from its
    /// working paths' base round trips.
    fn publish_offsets(&self, peer: PeerId, board: &Board) {
        let Some(core) = self.peers.get(usize::from(peer.0)) else {
            return;
        };
        let bases: Vec<(PathId, Option<Duration>)> = core
            .paths
            .iter()
            .filter_map(|&id| {
                let p = self.paths.get(usize::from(id.0))?;
                Some((id, p.is_healthy().then(|| p.estimate.base_rtt()).flatten()))
            })
            .collect();
        for (id, d) in offsets(&bases) {
            if let Some(bp) = board.path(id) {
                bp.offset_ns.store(nanos(d), Ordering::Relaxed);
            }
        }
    }

    /// The peer's reordering wait: configured, or from its working paths'
    /// round trips.
    fn wait_of(&self, peer: PeerId) -> Duration {
        let Some(core) = self.peers.get(usize::from(peer.0)) else {
            return reorder_wait(&[]);
        };
        if let Some(w) = core.reorder_wait {
            return w;
        }
        let rtts: Vec<(Duration, Duration)> = core
            .paths
            .iter()
            .filter_map(|&id| self.paths.get(usize::from(id.0)))
            .filter(|p| p.is_healthy())
            .filter_map(|p| {
                let smoothed = p.estimate.delay()? * 2;
                Some((p.estimate.base_rtt().unwrap_or(smoothed), smoothed))
            })
            .collect();
        reorder_wait(&rtts)
    }

    /// The peer's path estimates, as the forwarding threads read them.
    pub fn board(&self, peer: PeerId) -> Option<&Arc<Board>> {
        self.peers.get(usize::from(peer.0))?.steering.board()
    }

    /// Removes a path: its flows move at once (like a failure, but with no
    /// detection time), its session goes AdminDown (RFC 5880 §6.8.16) and
    /// the slot is retired. Returns the AdminDown packet (encoded and signed) for
    /// the shell to send, since a retired path transmits nothing more.
    pub fn remove_path(&mut self, id: PathId, now: Instant) -> Option<Transmit> {
        let path = self.paths.get(usize::from(id.0)).filter(|p| !p.retired)?;
        let peer = path.peer;
        let core = self.peers.get_mut(usize::from(peer.0))?;
        core.paths.retain(|p| *p != id);
        if let Some(change) = core.steering.remove_path(id) {
            self.on_steering_change(peer, change.from, change.to, None, MoveCause::Removed);
        }
        self.new_board(peer);
        self.dirty = true;
        self.disarm(id);
        let path = self.paths.get_mut(usize::from(id.0))?;
        path.session.set_admin_down(now);
        let packet = path.session.poll_transmit_encoded(now).and_then(Result::ok);
        path.retired = true;
        let (disc, addrs) = (
            path.session.local_discriminator(),
            (path.local.ip(), path.remote.ip()),
        );
        self.by_discriminator.remove(&disc);
        if self.by_addresses.get(&addrs) == Some(&id) {
            self.by_addresses.remove(&addrs);
            let next = self
                .paths
                .iter()
                .position(|p| !p.retired && (p.local.ip(), p.remote.ip()) == addrs);
            if let Some(i) = next {
                self.by_addresses.insert(addrs, PathId(i as u16));
            }
        }
        self.drain_session(id, now);
        self.reschedule_peer(peer);
        self.settle();
        packet
    }

    /// Removes a peer and every path of it; returns the AdminDown packets.
    pub fn remove_peer(&mut self, id: PeerId, now: Instant) -> Vec<(PathId, Transmit)> {
        let Some(core) = self.peers.get(usize::from(id.0)).filter(|p| !p.retired) else {
            return Vec::new();
        };
        let paths = core.paths.clone();
        let packets = paths
            .into_iter()
            .filter_map(|p| self.remove_path(p, now).map(|pkt| (p, pkt)))
            .collect();
        if let Some(core) = self.peers.get_mut(usize::from(id.0)) {
            core.retired = true;
        }
        self.handshakes.remove(&id);
        self.dirty = true;
        self.settle();
        packets
    }

    /// A live peer by name.
    pub fn peer_by_name(&self, name: &str) -> Option<PeerId> {
        self.peers
            .iter()
            .position(|p| !p.retired && p.name == name)
            .map(|i| PeerId(i as u16))
    }

    /// A live path of a peer by name.
    pub fn path_by_name(&self, peer: PeerId, name: &str) -> Option<PathId> {
        let core = self.peers.get(usize::from(peer.0))?;
        core.paths
            .iter()
            .copied()
            .find(|id| self.path(*id).is_some_and(|p| p.name == name))
    }

    /// Every live path's session and counters, for the process that takes
    /// over (an upgrade; see [`PathExport`]).
    pub fn export_sessions(&self, now: Instant) -> Vec<PathExport> {
        self.paths
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.retired)
            .filter_map(|(i, p)| {
                let id = PathId(i as u16);
                let peer = self.peers.get(usize::from(p.peer.0))?;
                Some(PathExport {
                    peer: peer.name.clone(),
                    path: p.name.clone(),
                    session: p.session.snapshot(),
                    control_tx: p.control_tx,
                    control_rx: p.control_rx,
                    failures: p.failures,
                    remote_admin_downs: p.remote_admin_downs,
                    steering: peer.steering.export_path(id, now),
                    quality: Some(p.quality.export_verdict(now)),
                })
            })
            .collect()
    }

    /// Gives path `id` the session and counters of `from` (the same path in
    /// the process this one replaces): the peer sees the same session go on.
    /// Refused, with the path left as it was, when the discriminator is
    /// another live path's.
    pub fn restore_session(
        &mut self,
        id: PathId,
        from: &PathExport,
        now: Instant,
    ) -> Result<(), EngineError> {
        let i = usize::from(id.0);
        let Some(path) = self.paths.get(i).filter(|p| !p.retired) else {
            return Err(EngineError::Restore(format!("no path {}", from.path)));
        };
        let old = path.session.local_discriminator();
        let new = from.session.local_discr;
        if new != old && self.by_discriminator.contains_key(&new) {
            return Err(EngineError::Restore(format!(
                "path {}: discriminator {new} is another path's",
                from.path
            )));
        }
        let path = &mut self.paths[i];
        path.session.restore(&from.session, now);
        while path.session.poll_event().is_some() {}
        path.control_tx = path.control_tx.max(from.control_tx);
        path.control_rx = path.control_rx.max(from.control_rx);
        path.failures = path.failures.max(from.failures);
        path.remote_admin_downs = path.remote_admin_downs.max(from.remote_admin_downs);
        let up = path.is_up();
        path.last_rx = up.then_some(now);
        path.down_since = (!up).then_some(now);
        let new = path.session.local_discriminator();
        self.by_discriminator.remove(&old);
        self.by_discriminator.insert(new, id);
        self.update_health(id, now, None);
        self.dirty = true;
        self.reschedule(id);
        self.settle();
        Ok(())
    }

    /// After every [`Engine::restore_session`] of a handover: each path's
    /// quality verdict and place in its peer's steering, as the old process
    /// had them, so that flows stay where they were (a path in its revert
    /// hold or demoted for its quality does not take traffic back because
    /// the process changed). Quiet: what moves here moved in no network.
    pub fn restore_steering(&mut self, from: &[(PathId, PathExport)], now: Instant) {
        let mut peers = Vec::new();
        for (id, e) in from {
            let Some(path) = self.paths.get_mut(usize::from(id.0)).filter(|p| !p.retired) else {
                continue;
            };
            if let Some(q) = &e.quality {
                path.quality.import_verdict(q, now);
            }
            let peer = path.peer;
            if let (Some(slot), Some(core)) = (&e.steering, self.peers.get_mut(usize::from(peer.0)))
            {
                core.steering.import_path(*id, slot, now);
                if !peers.contains(&peer) {
                    peers.push(peer);
                }
            }
        }
        for peer in peers {
            if let Some(core) = self.peers.get_mut(usize::from(peer.0)) {
                let _ = core.steering.settle();
                let _ = core.steering.take_changed();
                self.dirty = true;
            }
        }
        for (id, _) in from {
            self.reschedule(*id);
        }
        self.settle();
    }

    fn unique_discriminator(&self, seed: u64) -> u32 {
        let mut n = self.paths.len() as u64;
        // The low 16 bits are the path's slot, the rest random: the BFD
        // receive offload keeps a session at the slot these bits name
        // (see crate::io::bfd_offload).
        let slot = (self.paths.len() & 0xffff) as u32;
        loop {
            let d = ((mix(seed.wrapping_add(n)) >> 32) as u32 & 0xffff_0000) | slot;
            // Retired paths' discriminators stay unused too.
            if d != 0
                && !self.by_discriminator.contains_key(&d)
                && !self
                    .paths
                    .iter()
                    .any(|p| p.retired && p.session.local_discriminator() == d)
            {
                return d;
            }
            n += 0x1_0000;
        }
    }

    /// A control packet arrived on `local_ip` from `src` with IP TTL `ttl`.
    pub fn handle_bfd_datagram(
        &mut self,
        local_ip: IpAddr,
        src: SocketAddr,
        ttl: Option<u8>,
        data: &[u8],
        now: Instant,
    ) -> Result<PathId, DropReason> {
        // RFC 5880 §6.3: a nonzero Your Discriminator selects the session;
        // it must then also be the session's addresses (RFC 5881 §4: the
        // remote system's address, received on the local one), or the packet
        // is forged or misdirected. Without one (Your Discriminator 0, or
        // one that is no session's), the addresses select it, and the
        // session's own checks refuse a wrong discriminator.
        let parsed = ControlPacket::parse(data).ok();
        let by_discriminator = parsed
            .as_ref()
            .filter(|p| p.your_discriminator != 0)
            .and_then(|p| self.by_discriminator.get(&p.your_discriminator).copied());
        let id = match by_discriminator {
            Some(id) => {
                let p = &self.paths[usize::from(id.0)];
                if p.local.ip() != local_ip || p.remote.ip() != src.ip() {
                    return Err(DropReason::BfdWrongSource);
                }
                id
            }
            None => self
                .path_by_addresses(local_ip, src.ip())
                .ok_or(DropReason::BfdUnknownSession)?,
        };
        let path = &mut self.paths[usize::from(id.0)];
        // RFC 5881 §5 (GTSM): single hop must arrive with TTL 255;
        // RFC 5883 §5: multihop at least min_ttl. A packet whose TTL the
        // shell could not learn fails closed.
        let floor = match path.hop {
            Hop::Single => 255,
            Hop::Multi => path.min_ttl,
        };
        if ttl.unwrap_or(0) < floor {
            return Err(DropReason::BfdTtl);
        }
        let packet = parsed.ok_or(DropReason::BfdMalformed)?;
        // The bytes the Length field covers: what a keyed digest is computed over.
        let raw = data.get(..wire_len(data)).unwrap_or(data);
        path.session
            .handle_datagram(&packet, raw, now)
            .map_err(|e| {
                if e.is_auth() {
                    DropReason::BfdAuth
                } else {
                    DropReason::BfdRejected
                }
            })?;
        path.control_rx += 1;
        path.last_rx = Some(now);
        self.drain_session(id, now);
        self.offload_after(id, &packet, raw);
        self.maybe_unblock(id, now);
        self.reschedule(id);
        Ok(id)
    }

    /// After the session took `packet` (`raw`): the offload takes its
    /// repeats when the session is steady, and nothing otherwise.
    fn offload_after(&mut self, id: PathId, packet: &ControlPacket, raw: &[u8]) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)) else {
            return;
        };
        if !path.offload {
            return;
        }
        let steady = <[u8; OFFLOAD_PACKET_LEN]>::try_from(raw)
            .ok()
            .filter(|_| path.session.takes_repeats_of(packet));
        match (steady, path.offloaded) {
            (Some(new), Some(old)) if new == old => {}
            (Some(new), _) => {
                path.offloaded = Some(new);
                path.refresh_asked = None;
                self.offload_changes.push_back(OffloadChange::Arm {
                    path: id,
                    packet: new,
                });
            }
            (None, Some(_)) => self.disarm(id),
            (None, None) => {}
        }
    }

    /// The offload takes nothing more for the path.
    fn disarm(&mut self, id: PathId) {
        if let Some(path) = self.paths.get_mut(usize::from(id.0)) {
            if path.offloaded.take().is_some() {
                path.refresh_asked = None;
                self.offload_changes.push_back(OffloadChange::Disarm(id));
            }
        }
    }

    /// `bfd.offload` of a running path changed: on, its session is armed
    /// by its next steady packet; off, it is disarmed now.
    pub fn set_offload(&mut self, id: PathId, on: bool) {
        if let Some(p) = self.paths.get_mut(usize::from(id.0)) {
            p.offload = on;
        }
        if !on {
            self.disarm(id);
        }
    }

    /// Offloads nothing for `path` (for every path: `None`) from now on,
    /// with no [`OffloadChange`]: the shell could not arm it, or has no
    /// offload.
    pub fn stop_offload(&mut self, path: Option<PathId>) {
        for (i, p) in self.paths.iter_mut().enumerate() {
            if path.is_none_or(|id| usize::from(id.0) == i) {
                p.offload = false;
                p.offloaded = None;
                p.refresh_asked = None;
            }
        }
        self.offload_changes
            .retain(|c| path.is_some_and(|id| c.path() != id));
    }

    /// Forgets what the offload takes, with no [`OffloadChange`]: the shell
    /// cleared it (a hand-off). Steady paths are armed again by their next
    /// packet.
    pub fn forget_offload(&mut self) {
        for p in &mut self.paths {
            p.offloaded = None;
            p.refresh_asked = None;
        }
        self.offload_changes.clear();
    }

    /// What the receive offload is to take or give back next.
    pub fn poll_offload(&mut self) -> Option<OffloadChange> {
        self.offload_changes.pop_front()
    }

    /// An offloaded path whose detection time ran out: the shell reads the
    /// time of its last repeat, reports it with
    /// [`handle_bfd_refresh`](Self::handle_bfd_refresh) (also when there is
    /// nothing to report) and runs the timers again. A path that was asked
    /// for a deadline, answered, and not moved past it expires at the next
    /// [`handle_timeout`](Self::handle_timeout); until the answer it waits
    /// (at most one more detection time).
    pub fn poll_refresh(&mut self) -> Option<PathId> {
        self.refreshes.pop_front()
    }

    /// The receive offload took `packets` repeats for the path since the
    /// last report, the last at `last`: they count as received, and the
    /// last one's time is the session's last reception (also when the
    /// path was just disarmed: the shell reports what was taken until
    /// then).
    pub fn handle_bfd_refresh(&mut self, id: PathId, last: Option<Instant>, packets: u64) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)).filter(|p| !p.retired) else {
            return;
        };
        path.control_rx = path.control_rx.saturating_add(packets);
        path.refresh_answered = true;
        // Also after a disarm: the session's own guards (both ends Up, a
        // later time) keep a repeat of an older state from counting.
        let Some(at) = last else {
            return;
        };
        if path.session.refresh(at) {
            path.last_rx = Some(at);
            self.reschedule(id);
        }
    }

    /// Lifts a ready block once BFD has seen the far end (session Up).
    fn maybe_unblock(&mut self, id: PathId, now: Instant) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)) else {
            return;
        };
        if path.block.is_some_and(|b| b.ready) && path.is_up() {
            path.block = None;
            self.events.push_back(Event::PathBlock {
                path: id,
                cause: None,
            });
            self.update_health(id, now, None);
        }
    }

    /// The path's underlay interface or local address came or went.
    pub fn handle_link_event(&mut self, id: PathId, up: bool, now: Instant) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)).filter(|p| !p.retired) else {
            return;
        };
        if up {
            if let Some(b) = path.block.as_mut().filter(|b| b.cause == BlockCause::Link) {
                b.ready = true;
            }
            return;
        }
        if path
            .block
            .is_some_and(|b| b.cause == BlockCause::Link && !b.ready)
        {
            return;
        }
        self.block(id, BlockCause::Link, now);
        self.reschedule(id);
    }

    /// Sending on the path failed with a reachability error.
    pub fn handle_send_error(&mut self, id: PathId, now: Instant) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)).filter(|p| !p.retired) else {
            return;
        };
        match path.block.as_mut() {
            Some(b) if b.cause == BlockCause::Link => {}
            Some(b) => b.ready = false,
            None => self.block(id, BlockCause::SendError, now),
        }
        self.reschedule(id);
    }

    /// A BFD control packet went out on the path.
    pub fn handle_send_ok(&mut self, id: PathId) {
        if let Some(b) = self
            .paths
            .get_mut(usize::from(id.0))
            .and_then(|p| p.block.as_mut())
            .filter(|b| b.cause == BlockCause::SendError)
        {
            b.ready = true;
        }
    }

    fn block(&mut self, id: PathId, cause: BlockCause, now: Instant) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)) else {
            return;
        };
        path.block = Some(Block {
            cause,
            ready: false,
        });
        let detection = path
            .is_up()
            .then(|| path.last_rx.map(|t| now.saturating_duration_since(t)))
            .flatten();
        self.events.push_back(Event::PathBlock {
            path: id,
            cause: Some(cause),
        });
        self.update_health(id, now, detection);
    }

    /// Tells the peer's steering whether the path is healthy now.
    fn update_health(&mut self, id: PathId, now: Instant, detection: Option<Duration>) {
        let Some(path) = self.paths.get(usize::from(id.0)) else {
            return;
        };
        let (peer, healthy) = (path.peer, path.is_healthy());
        let Some(core) = self.peers.get_mut(usize::from(peer.0)) else {
            return;
        };
        let change = core.steering.handle_path_health(id, healthy, now);
        self.dirty |= core.steering.take_changed();
        if let Some(change) = change {
            let cause = if healthy {
                MoveCause::Up
            } else {
                MoveCause::Down
            };
            self.on_steering_change(peer, change.from, change.to, detection, cause);
        }
    }

    /// A probe's reply on the path (from the shell's prober): measured,
    /// then judged.
    pub fn handle_quality_sample(&mut self, id: PathId, sample: &Sample, now: Instant) {
        let Some(path) = self
            .paths
            .get_mut(usize::from(id.0))
            .filter(|p| !p.retired && p.is_up())
        else {
            return;
        };
        path.quality.handle_sample(sample);
        path.estimate.handle(Delivery {
            at: sample.received_at,
            received: sample.report.data_received,
            seq_high: sample.report.data_seq_high,
            sent_bytes: sample.local.sent_bytes,
            sent_packets: sample.local.sent_packets,
            rtt: sample.received_at.saturating_duration_since(sample.sent_at),
            lost: path.quality.data_lost_tx(),
            lag: path.quality.data_confirm_lag(),
        });
        let (peer, rate, delay) = (path.peer, path.estimate.rate(), path.estimate.delay());
        let wait = self.wait_of(peer);
        if let Some(board) = self.board(peer) {
            if let Some(bp) = board.path(id) {
                bp.rate.store(rate, Ordering::Relaxed);
                bp.delay_ns.store(delay.map_or(0, nanos), Ordering::Relaxed);
            }
            board.wait_ns.store(nanos(wait), Ordering::Relaxed);
            self.publish_offsets(peer, board);
        }
        self.judge(id, now);
        self.decide_fec(peer, now);
        self.reschedule(id);
    }

    /// A kept peer's new FEC settings (configuration reload), applied in
    /// place.
    pub fn set_fec(&mut self, peer: PeerId, fec: FecConfig, now: Instant) {
        if let Some(core) = self.peers.get_mut(usize::from(peer.0)) {
            core.fec = fec;
            core.fec_lighter_since = None;
        }
        self.decide_fec(peer, now);
    }

    /// The peer's FEC code now, and the highest loss (sending direction,
    /// last 3 s) among the paths that carry its traffic.
    pub fn fec(&self, peer: PeerId, now: Instant) -> (FecConfig, Option<Code>, f64) {
        let Some(core) = self.peers.get(usize::from(peer.0)) else {
            return (FecConfig::off(), None, 0.0);
        };
        (core.fec, core.fec_code, self.fec_inputs(peer, now).0)
    }

    /// The highest loss of the paths carrying the peer's traffic (the
    /// active one, or every eligible one under a policy that spreads), and
    /// whether any of them is congested: it queues under our own data (the
    /// estimator's verdict) and its median round trip of the last 300 ms
    /// is still above its base by a queue.
    fn fec_inputs(&self, peer: PeerId, now: Instant) -> (f64, bool) {
        let Some(core) = self.peers.get(usize::from(peer.0)) else {
            return (0.0, false);
        };
        let sel = core.steering.selection();
        let carrying: Vec<PathId> = match sel.policy {
            Policy::ActiveBackup => sel.active.into_iter().collect(),
            _ => sel.eligible.iter().map(|&(id, _)| id).collect(),
        };
        let mut loss: f64 = 0.0;
        let mut congested = false;
        for id in carrying {
            if let Some(p) = self.paths.get(usize::from(id.0)) {
                let f = p.quality.figures(now);
                loss = loss.max(f.loss_tx.unwrap_or(0.0));
                // a queue under our own data (a probe came back late behind
                // it lately) that the median round trip still shows: one
                // late probe (a descheduled thread) is not congestion; or
                // loss that came while our data loaded the path
                congested |= (p.estimate.queue_congested(now)
                    && f.rtt.is_some_and(|rtt| p.estimate.queued(rtt)))
                    || p.estimate.load_congested(now);
            }
        }
        (loss, congested)
    }

    /// Chooses the peer's code from its settings and, in `auto`, from the
    /// measured loss (see [`crate::core::fec::auto_code`]): a heavier code
    /// at once, a lighter one (or none) once the loss has allowed it for
    /// [`FEC_LOWER_AFTER`]. Never under `duplicate`.
    fn decide_fec(&mut self, peer: PeerId, now: Instant) {
        let (loss, congested) = self.fec_inputs(peer, now);
        let Some(core) = self.peers.get_mut(usize::from(peer.0)) else {
            return;
        };
        let policy = core.steering.selection().policy;
        let want = match core.fec.mode {
            _ if policy == Policy::Duplicate || core.fast_path => None,
            FecMode::Off => None,
            FecMode::Fixed(code) => Some(code),
            FecMode::Auto => auto_code(
                loss,
                congested,
                core.fec.target_loss(),
                core.fec.max_overhead(),
            ),
        };
        let overhead = |c: Option<Code>| c.map_or(0.0, Code::overhead);
        let lighter = overhead(want) < overhead(core.fec_code);
        let apply = match core.fec.mode {
            FecMode::Auto if lighter => {
                let since = *core.fec_lighter_since.get_or_insert(now);
                now.saturating_duration_since(since) >= FEC_LOWER_AFTER
            }
            _ => true,
        };
        if !lighter {
            core.fec_lighter_since = None;
        }
        // in auto, a code of the same overhead is no change worth a flap
        let same = core.fec.mode == FecMode::Auto
            && want.is_some()
            && core.fec_code.is_some()
            && overhead(want) == overhead(core.fec_code);
        if !apply || want == core.fec_code || same {
            return;
        }
        let from = std::mem::replace(&mut core.fec_code, want);
        core.fec_lighter_since = None;
        self.dirty = true;
        self.events.push_back(Event::Fec {
            peer,
            from,
            to: want,
            loss,
            congested,
        });
    }

    /// Judges a path's quality; a new verdict goes to the steering.
    fn judge(&mut self, id: PathId, now: Instant) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)) else {
            return;
        };
        // Loss behind a queue that the path's own data built is congestion
        // (TCP and the `aggregate` scheduler handle it), not a sick path:
        // measured and reported, but the path is not degraded for it.
        let congested = path.estimate.congested(now);
        let Some(transition) = path.quality.evaluate(now, congested) else {
            return;
        };
        let (peer, loss) = (path.peer, path.quality.loss_tx(now));
        let degraded = path.quality.degraded();
        self.events.push_back(Event::Quality {
            path: id,
            transition,
        });
        let Some(core) = self.peers.get_mut(usize::from(peer.0)) else {
            return;
        };
        let change = core
            .steering
            .handle_path_quality(id, degraded.is_some(), loss, now);
        self.dirty |= core.steering.take_changed();
        if let Some(change) = change {
            let cause = degraded.map_or(MoveCause::Recovered, MoveCause::Degraded);
            self.on_steering_change(peer, change.from, change.to, None, cause);
        }
    }

    fn path_by_addresses(&self, local: IpAddr, remote: IpAddr) -> Option<PathId> {
        self.by_addresses.get(&(local, remote)).copied()
    }

    /// Runs every timer that is due: each path and peer whose deadline
    /// has come, once (what falls due again at once waits for the next
    /// call). Paths with a control packet due join the transmit queue.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut keys = std::mem::take(&mut self.due_keys);
        keys.clear();
        while let Some(k) = self.timers.pop_due(now) {
            keys.push(k);
        }
        for &k in &keys {
            match timer_of(k) {
                TimerKey::Path(i) => self.run_path_timers(i, now),
                TimerKey::Peer(pi) => self.run_peer_timers(pi, now),
            }
        }
        self.due_keys = keys;
        for hs in self.handshakes.values_mut() {
            if hs.poll_timeout().is_some_and(|t| t <= now) {
                hs.handle_timeout(now);
            }
        }
        self.settle();
    }

    fn run_path_timers(&mut self, i: usize, now: Instant) {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        let Some(path) = self.paths.get_mut(i).filter(|p| !p.retired) else {
            return;
        };
        let id = PathId(i as u16);
        let deadline = path.session.detection_deadline();
        // Only a detection or a quality verdict can move the peer's
        // steering deadline; a transmission, the common case, leaves it
        // be (the peer's deadline is its steering's: a scan of its paths).
        let mut steering = false;
        if due(deadline) {
            // The offload may have taken what came since: ask first, and
            // wait for the answer (a shell that never answers gets one
            // more detection time).
            let offloaded = path.offloaded.is_some();
            let waited = deadline
                .and_then(|d| d.checked_add(path.session.detection_time()))
                .is_some_and(|limit| now >= limit);
            let waiting = offloaded && !path.refresh_answered && !waited;
            if offloaded && path.refresh_asked != deadline {
                path.refresh_asked = deadline;
                path.refresh_answered = false;
                self.refreshes.push_back(id);
            } else if !waiting {
                path.session.handle_timeout(now);
                self.drain_session(id, now);
                steering = true;
            }
        }
        if due(self.paths[i].quality.poll_timeout()) {
            self.judge(id, now);
            steering = true;
        }
        // What is still due is a transmission (a detection expiry clears
        // its deadline).
        if !self.in_ready[i] && due(self.paths[i].session.poll_timeout()) {
            self.in_ready[i] = true;
            self.ready_tx.push_back(id);
        }
        if steering {
            self.reschedule(id);
        } else {
            self.schedule_path(i);
        }
    }

    fn run_peer_timers(&mut self, pi: usize, now: Instant) {
        let Some(core) = self.peers.get_mut(pi).filter(|p| !p.retired) else {
            return;
        };
        let change = core.steering.handle_timeout(now);
        self.dirty |= core.steering.take_changed();
        if let Some(change) = change {
            let cause = match change.to.is_some_and(|to| !self.is_degraded(to)) {
                true => MoveCause::Up,
                false => MoveCause::Recovered,
            };
            self.on_steering_change(PeerId(pi as u16), change.from, change.to, None, cause);
        }
        self.reschedule_peer(PeerId(pi as u16));
    }

    /// When a path next has timer work: its session's (a transmission, or
    /// detection when one is already queued) or its quality verdict's.
    fn path_deadline(&self, i: usize) -> Option<Instant> {
        path_deadline(&self.paths, &self.in_ready, i)
    }

    fn peer_deadline(&self, pi: usize) -> Option<Instant> {
        peer_deadline(&self.peers, pi)
    }

    /// Makes sure the path's (and its peer's) next deadline is scheduled:
    /// called after anything that may have moved it.
    fn reschedule(&mut self, id: PathId) {
        let i = usize::from(id.0);
        self.schedule_path(i);
        if let Some(peer) = self.paths.get(i).map(|p| p.peer) {
            self.reschedule_peer(peer);
        }
    }

    /// The path's own deadline only (its peer's is unchanged).
    fn schedule_path(&mut self, i: usize) {
        let at = self.path_deadline(i);
        self.timers.schedule(timer_key(TimerKey::Path(i)), at);
    }

    fn reschedule_peer(&mut self, peer: PeerId) {
        let pi = usize::from(peer.0);
        let at = self.peer_deadline(pi);
        self.timers.schedule(timer_key(TimerKey::Peer(pi)), at);
    }

    /// Makes [`Engine::poll_timeout`] exact (drops superseded deadlines).
    fn settle(&mut self) {
        let (paths, peers) = (&self.paths, &self.peers);
        let in_ready = &self.in_ready;
        self.timers.settle(|k| match timer_of(k) {
            TimerKey::Path(i) => path_deadline(paths, in_ready, i),
            TimerKey::Peer(pi) => peer_deadline(peers, pi),
        });
    }

    /// Whether the path is degraded in its peer's ranking.
    fn is_degraded(&self, id: PathId) -> bool {
        self.path(id)
            .and_then(|p| self.peers.get(usize::from(p.peer.0)))
            .is_some_and(|peer| peer.steering.is_degraded(id))
    }

    fn drain_session(&mut self, id: PathId, now: Instant) {
        while let Some(SessionEvent::StateChange { from, to, diag, .. }) =
            self.paths[usize::from(id.0)].session.poll_event()
        {
            // The repeats of a packet taken in another state are not
            // repeats any more.
            self.disarm(id);
            let path = &mut self.paths[usize::from(id.0)];
            // RFC 5880 §6.8.6: a received AdminDown takes the session Down with diag 3;
            // it is the peer's decision, not a failure.
            let administrative = to == State::AdminDown
                || from == State::AdminDown
                || (to == State::Down && path.session.remote_admin_down());
            if from == State::Up && to != State::Up {
                if administrative {
                    path.remote_admin_downs += u64::from(to == State::Down);
                } else {
                    path.failures += 1;
                }
            }
            self.events.push_back(Event::PathState {
                path: id,
                from,
                to,
                diag,
                administrative,
            });
            // Only a silent path has a detection time; a neighbor that says
            // it is down (or administratively down) is not a detection.
            let detection = (from == State::Up && diag == Diag::ControlDetectionExpired)
                .then(|| path.last_rx.map(|t| now.saturating_duration_since(t)))
                .flatten();
            if to == State::Up {
                path.down_since = None;
            } else if path.down_since.is_none() {
                path.down_since = Some(now);
                // What is measured after the path comes back is not
                // comparable with what came before.
                path.quality.rebase();
                path.estimate.rebase();
            }
            self.update_health(id, now, detection);
        }
    }

    fn on_steering_change(
        &mut self,
        peer: PeerId,
        from: Option<PathId>,
        to: Option<PathId>,
        detection: Option<Duration>,
        cause: MoveCause,
    ) {
        self.dirty = true;
        self.events.push_back(Event::Failover {
            peer,
            from,
            to,
            detection,
            cause,
        });
        let core = &mut self.peers[usize::from(peer.0)];
        let up = to.is_some();
        if up != core.up {
            core.up = up;
            self.events.push_back(Event::PeerUp { peer, up });
        }
    }

    /// The earliest time `handle_timeout` has work (a control packet
    /// already due is `poll_transmit`'s: drain that first). Without a scan:
    /// the earliest of the scheduled deadlines.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let handshakes = self.handshakes.values().filter_map(Handshake::poll_timeout);
        self.timers.next().into_iter().chain(handshakes).min()
    }

    /// Gives a peer with a `public_key` its handshake (it initiates at the
    /// next timeout), or takes it away.
    pub fn set_handshake(&mut self, peer: PeerId, handshake: Option<Handshake>) {
        match handshake {
            Some(h) => self.handshakes.insert(peer, h),
            None => self.handshakes.remove(&peer),
        };
    }

    /// A handshake datagram received on a path (from its remote).
    pub fn handle_handshake(&mut self, path: PathId, datagram: &[u8], now: Instant) {
        let Some(peer) = self.path(path).filter(|p| !p.retired).map(|p| p.peer) else {
            return;
        };
        if let Some(hs) = self.handshakes.get_mut(&peer) {
            hs.handle(datagram, now);
        }
    }

    /// The data plane opened a message of a key-pair peer, received on
    /// `path`, under a session that awaited its confirm
    /// ([`Handshake::confirm_by_use`]).
    pub fn handle_session_used(&mut self, path: PathId, epoch: u32) {
        let Some(peer) = self.path(path).filter(|p| !p.retired).map(|p| p.peer) else {
            return;
        };
        if let Some(hs) = self.handshakes.get_mut(&peer) {
            hs.confirm_by_use(epoch);
        }
    }

    /// A handshake datagram to send, and the path to send it on: one of the
    /// peer's healthy paths, else one whose BFD is Up, else any of its paths
    /// (a handshake does not wait for BFD).
    pub fn poll_handshake(&mut self) -> Option<(PathId, Vec<u8>)> {
        loop {
            let peer = self
                .handshakes
                .iter()
                .filter(|(_, h)| h.has_transmit())
                .map(|(id, _)| *id)
                .min()?;
            let paths = self
                .peers
                .get(usize::from(peer.0))
                .map(|p| p.paths.as_slice())
                .unwrap_or_default();
            let live = |p: &&PathId| self.path(**p).is_some_and(|c| !c.retired);
            let pick = paths
                .iter()
                .filter(live)
                .find(|p| self.path(**p).is_some_and(PathCore::is_healthy))
                .or_else(|| {
                    paths
                        .iter()
                        .filter(live)
                        .find(|p| self.path(**p).is_some_and(PathCore::is_up))
                })
                .or_else(|| paths.iter().find(live))
                .copied();
            let datagram = self.handshakes.get_mut(&peer)?.poll_transmit()?;
            // Without a path the message is dropped (the handshake retries).
            if let Some(path) = pick {
                return Some((path, datagram));
            }
        }
    }

    /// New data-plane keys of a key-pair peer.
    pub fn poll_keys(&mut self) -> Option<(PeerId, crate::core::crypto::Keys)> {
        self.handshakes
            .iter_mut()
            .find_map(|(id, hs)| hs.poll_keys().map(|k| (*id, k)))
    }

    /// The running count of datagrams sent to a key-pair peer, over all its
    /// paths (each one sealed), for its handshake's rekey by message count.
    pub fn note_peer_sent(&mut self, peer: PeerId, total: u64) {
        if let Some(hs) = self.handshakes.get_mut(&peer) {
            hs.note_sent_total(total);
        }
    }

    /// Every key-pair peer's handshake state, by peer name, for a new
    /// process (`crosslink upgrade`).
    pub fn export_handshakes(&self, now: Instant) -> Vec<(String, HandshakeExport)> {
        let mut out: Vec<(String, HandshakeExport)> = self
            .handshakes
            .iter()
            .filter_map(|(id, hs)| Some((self.peer(*id)?.0.to_string(), hs.export(now))))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Takes over a handshake state the old process exported; false if the
    /// peer has no handshake here or another identity (it starts afresh).
    pub fn import_handshake(&mut self, peer: PeerId, e: &HandshakeExport, now: Instant) -> bool {
        self.handshakes
            .get_mut(&peer)
            .is_some_and(|hs| hs.import(e, now))
    }

    /// A key-pair peer's handshake (state, key age, counters).
    pub fn handshake(&self, peer: PeerId) -> Option<&Handshake> {
        self.handshakes.get(&peer)
    }

    /// The next control packet due, with the path to send it on, in the
    /// order they fell due. Runs the timers due at `now` first when none
    /// is queued. A packet that cannot be encoded is reported as `Err` and
    /// not counted.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(PathId, Result<Transmit, EmitError>)> {
        if self.ready_tx.is_empty() {
            self.handle_timeout(now);
        }
        while let Some(id) = self.ready_tx.pop_front() {
            let i = usize::from(id.0);
            self.in_ready[i] = false;
            let Some(path) = self.paths.get_mut(i).filter(|p| !p.retired) else {
                continue;
            };
            let out = path.session.poll_transmit_encoded(now);
            if out.as_ref().is_some_and(Result::is_ok) {
                path.control_tx += 1;
            }
            // A transmission leaves the peer's steering deadline be (see
            // `run_path_timers`): only the path's own moves.
            self.schedule_path(i);
            if let Some(out) = out {
                return Some((id, out));
            }
        }
        self.settle();
        None
    }

    /// Changes a live path's BFD timers in place; a Poll Sequence announces them
    /// (RFC 5880 §6.8.3), so the session stays Up. Returns whether anything changed.
    pub fn set_timers(
        &mut self,
        id: PathId,
        tx: Duration,
        rx: Duration,
        multiplier: u8,
        now: Instant,
    ) -> bool {
        let Some(path) = self.paths.get_mut(usize::from(id.0)).filter(|p| !p.retired) else {
            return false;
        };
        let before = (path.session.configured_timers(), path.session.detect_mult());
        path.session.set_timers(tx, rx, multiplier, now);
        let after = (path.session.configured_timers(), path.session.detect_mult());
        self.drain_session(id, now);
        self.reschedule(id);
        before != after
    }

    /// A kept path's new `rate` (configuration reload): its estimate starts
    /// over from it.
    pub fn set_rate(&mut self, id: PathId, rate: Option<u64>) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)) else {
            return;
        };
        path.rate = rate;
        path.estimate = Estimator::new(rate);
        let (peer, start) = (path.peer, path.estimate.rate());
        if let Some(bp) = self.board(peer).and_then(|b| b.path(id)) {
            bp.rate.store(start, Ordering::Relaxed);
            bp.ceiling.store(rate.unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// A kept peer's new `reorder_wait` (configuration reload).
    pub fn set_reorder_wait(&mut self, peer: PeerId, wait: Option<Duration>) {
        let Some(core) = self.peers.get_mut(usize::from(peer.0)) else {
            return;
        };
        core.reorder_wait = wait;
        let wait = self.wait_of(peer);
        if let Some(board) = self.board(peer) {
            board.wait_ns.store(nanos(wait), Ordering::Relaxed);
        }
    }

    /// A kept path's new service level (configuration reload), applied in
    /// place; its peer's move cap comes with it.
    pub fn set_sla(&mut self, id: PathId, sla: SlaConfig) {
        let Some(path) = self.paths.get_mut(usize::from(id.0)).filter(|p| !p.retired) else {
            return;
        };
        path.quality.set_sla(sla);
        if let Some(core) = self.peers.get_mut(usize::from(path.peer.0)) {
            core.steering.set_max_moves(sla.max_moves_per_minute);
        }
        self.reschedule(id);
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A new snapshot for the data plane, when steering changed since the last call.
    pub fn poll_forwarding(&mut self) -> Option<Arc<Forwarding>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(Arc::new(self.forwarding()))
    }

    /// The data plane's view now.
    pub fn forwarding(&self) -> Forwarding {
        Forwarding {
            peers: self
                .peers
                .iter()
                .map(|p| {
                    let mut sel = p.steering.selection();
                    sel.fec = p.fec_code;
                    sel
                })
                .collect(),
        }
    }

    /// Takes every session administratively down (clean shutdown, RFC 5880 §6.8.16).
    pub fn set_admin_down_all(&mut self, now: Instant) {
        for i in 0..self.paths.len() {
            if self.paths[i].retired {
                continue;
            }
            self.paths[i].session.set_admin_down(now);
            self.drain_session(PathId(i as u16), now);
            self.reschedule(PathId(i as u16));
        }
    }

    /// All path slots, indexed by [`PathId`], retired ones included
    /// (see [`PathCore::is_retired`]).
    pub fn paths(&self) -> &[PathCore] {
        &self.paths
    }

    /// A path by id.
    pub fn path(&self, id: PathId) -> Option<&PathCore> {
        self.paths.get(usize::from(id.0))
    }

    /// A path's flap damping.
    pub fn damping(&self, id: PathId) -> Option<Damping> {
        let path = self.path(id)?;
        self.peers
            .get(usize::from(path.peer.0))?
            .steering
            .damping(id)
    }

    /// Number of peer slots, retired ones included.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// A live peer's name, whether it has a usable path, and its paths.
    pub fn peer(&self, id: PeerId) -> Option<(&str, bool, &[PathId])> {
        self.peers
            .get(usize::from(id.0))
            .filter(|p| !p.retired)
            .map(|p| (p.name.as_str(), p.up, p.paths.as_slice()))
    }

    /// Whether the path is the one carrying the peer's traffic (or, for
    /// `balance` and `duplicate`, one of those carrying it).
    pub fn is_active(&self, id: PathId) -> bool {
        let Some(path) = self.path(id).filter(|p| !p.retired) else {
            return false;
        };
        let Some(peer) = self.peers.get(usize::from(path.peer.0)) else {
            return false;
        };
        match peer.steering.policy() {
            Policy::ActiveBackup => peer.steering.active() == Some(id),
            Policy::Balance => peer.steering.is_eligible(id),
            Policy::Aggregate => peer.steering.is_eligible(id) && !peer.steering.is_demoted(id),
            Policy::Duplicate => {
                let sel = peer.steering.selection();
                sel.active == Some(id) || sel.duplicate_path() == Some(id)
            }
        }
    }
}

/// Path `i`'s next deadline (see [`Engine::path_deadline`]); a free
/// function so that [`Engine::settle`] can use it while it borrows the
/// timers.
fn path_deadline(paths: &[PathCore], in_ready: &[bool], i: usize) -> Option<Instant> {
    let p = paths.get(i).filter(|p| !p.retired)?;
    let session = match in_ready.get(i).copied().unwrap_or(false) {
        true => p.session.detection_deadline(),
        false => p.session.poll_timeout(),
    };
    [session, p.quality.poll_timeout()]
        .into_iter()
        .flatten()
        .min()
}

/// Peer `pi`'s next steering deadline.
fn peer_deadline(peers: &[PeerCore], pi: usize) -> Option<Instant> {
    peers
        .get(pi)
        .filter(|p| !p.retired)?
        .steering
        .poll_timeout()
}

/// The Length field of a datagram that parsed (so it is at least 24).
fn wire_len(data: &[u8]) -> usize {
    data.get(3).map_or(data.len(), |&l| usize::from(l))
}

fn auth_type(t: BfdAuthType) -> AuthType {
    match t {
        BfdAuthType::SimplePassword => AuthType::SimplePassword,
        BfdAuthType::KeyedMd5 => AuthType::KeyedMd5,
        BfdAuthType::MeticulousKeyedMd5 => AuthType::MeticulousKeyedMd5,
        BfdAuthType::KeyedSha1 => AuthType::KeyedSha1,
        BfdAuthType::MeticulousKeyedSha1 => AuthType::MeticulousKeyedSha1,
    }
}

/// Checks a secret against an authentication type, naming the file on error.
pub fn check_secret(auth_type_cfg: BfdAuthType, secret: &[u8]) -> Result<(), KeyError> {
    Auth::new(auth_type(auth_type_cfg), 0, secret, 0).map(drop)
}

fn path_auth(
    path: &str,
    bfd: &BfdConfig,
    secrets: &Secrets,
    initial_seq: u32,
) -> Result<Option<Auth>, EngineError> {
    let Some(a) = &bfd.auth else {
        return Ok(None);
    };
    let secret = secrets
        .get(&a.secret_file)
        .ok_or_else(|| EngineError::MissingSecret {
            path: path.to_string(),
            file: a.secret_file.clone(),
        })?;
    Auth::new(auth_type(a.auth_type), a.key_id, secret, initial_seq)
        .map(Some)
        .map_err(|source| EngineError::BadSecret {
            path: path.to_string(),
            file: a.secret_file.clone(),
            source,
        })
}

/// The share of a new session's first-packet window per session: bringing
/// one Up (its packets either way, the state changes, the Poll Sequence)
/// takes each end a few tens of microseconds of a small host's CPU, so at
/// ten a millisecond a bring-up of any size keeps well under one CPU.
const FIRST_TX_PER_SESSION: Duration = Duration::from_micros(100);

/// Over how long a new session's first packet is spread
/// ([`Session::spread_first_transmission`]) when the engine already has
/// `sessions`: its transmit interval, or longer when the sessions are so
/// many that one interval would hold all of their bring-ups (1000 sessions:
/// 100 ms, about ten a millisecond).
fn first_tx_window(tx_interval: Duration, sessions: usize) -> Duration {
    let sessions = u32::try_from(sessions).unwrap_or(u32::MAX);
    tx_interval.max(FIRST_TX_PER_SESSION.saturating_mul(sessions))
}

fn session_config(bfd: &BfdConfig, local_discriminator: u32) -> SessionConfig {
    SessionConfig {
        local_discriminator,
        desired_min_tx: bfd.tx_interval,
        required_min_rx: bfd.rx_interval,
        detect_mult: bfd.multiplier,
        passive: bfd.passive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(side: u8, paths: &[u8]) -> Config {
        let other = 3 - side;
        let mut text = format!(
            "[gateway]\nname = \"g{side}\"\n[bfd]\ntx_interval = \"10ms\"\nrx_interval = \"10ms\"\n\
             [[peer]]\nname = \"p\"\ntun = \"xl-p\"\nrevert_hold = \"1s\"\n"
        );
        for n in paths {
            text.push_str(&format!(
                "[[peer.path]]\nname = \"p{n}\"\nlocal = \"198.18.2{n}.{side}:4800\"\n\
                 remote = \"198.18.2{n}.{other}:4800\"\npriority = {n}\n"
            ));
        }
        Config::parse(&text, "test").expect("valid")
    }

    /// Runs `src`'s timers and delivers what it sends to `dst` at once
    /// (packets for paths `dst` no longer has are refused and ignored).
    fn exchange(src: &mut Engine, dst: &mut Engine, now: Instant) {
        src.handle_timeout(now);
        while let Some((id, out)) = src.poll_transmit(now) {
            deliver(src, dst, id, out.expect("encode").as_bytes(), now);
        }
    }

    fn deliver(src: &Engine, dst: &mut Engine, id: PathId, bytes: &[u8], now: Instant) {
        let p = src.path(id).expect("path");
        let from = SocketAddr::new(p.local.ip(), 49152);
        let _ = dst.handle_bfd_datagram(p.remote.ip(), from, Some(255), bytes, now);
    }

    fn run(a: &mut Engine, b: &mut Engine, t0: Instant, from_ms: u64, to_ms: u64) {
        for ms in from_ms..to_ms {
            let now = t0 + Duration::from_millis(ms);
            exchange(a, b, now);
            exchange(b, a, now);
        }
    }

    /// An offloaded session whose detection time runs out is asked about
    /// and waits for the shell's answer, however many times the timers
    /// run meanwhile (a reload's flush runs them too); answered with a
    /// later repeat it stays Up, answered with nothing it expires. A
    /// shell that never answers gets one more detection time.
    #[test]
    fn an_offloaded_session_waits_for_the_answer_before_it_expires() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Gateway a (offload on) with its path Up for 3 s; from then on b's
        // packets are "taken by the offload": a hears nothing directly.
        let up = || {
            let mut cfg_a = config(1, &[1]);
            cfg_a.peers[0].paths[0].bfd.offload = true;
            let mut a = Engine::new(&cfg_a, t0, 1);
            let mut b = Engine::new(&config(2, &[1]), t0, 2);
            run(&mut a, &mut b, t0, 0, 3000);
            let p = id(&a, "p1");
            assert!(a.path(p).expect("path").is_up());
            assert!(a.path(p).expect("path").is_offloaded(), "armed when steady");
            (a, p)
        };
        let deadline = |a: &Engine, p: PathId| {
            a.path(p)
                .and_then(|p| p.session.detection_deadline())
                .expect("armed")
        };
        let (mut a, p) = up();
        assert!(matches!(a.poll_offload(), Some(OffloadChange::Arm { path, .. }) if path == p));
        let first = deadline(&a, p);
        let d_ms = first.duration_since(t0).as_millis() as u64 + 1;
        a.handle_timeout(ms(d_ms));
        assert_eq!(a.poll_refresh(), Some(p));
        assert_eq!(a.poll_refresh(), None, "asked once");
        // The timers run again before the answer: still Up.
        a.handle_timeout(ms(d_ms + 1));
        let _ = a.poll_transmit(ms(d_ms + 2));
        assert!(
            a.path(p).expect("path").is_up(),
            "expired before the answer"
        );
        // Answered: the offload took a repeat 5 ms ago.
        a.handle_bfd_refresh(p, Some(ms(d_ms - 5)), 3);
        a.handle_timeout(ms(d_ms + 2));
        assert!(a.path(p).expect("path").is_up());
        assert!(deadline(&a, p) > first);
        assert!(a.path(p).expect("path").control_rx > 0);
        // Next deadline: answered with nothing new, it expires.
        let d_ms = deadline(&a, p).duration_since(t0).as_millis() as u64 + 1;
        a.handle_timeout(ms(d_ms));
        assert_eq!(a.poll_refresh(), Some(p));
        a.handle_bfd_refresh(p, None, 0);
        a.handle_timeout(ms(d_ms));
        assert!(!a.path(p).expect("path").is_up(), "expired once answered");
        assert_eq!(a.poll_offload(), Some(OffloadChange::Disarm(p)));

        // Turned off by a reload: the session goes on from the last repeat
        // the shell read when it disarmed, not from its own last packet.
        let (mut a, p) = up();
        let _ = a.poll_offload();
        let first = deadline(&a, p);
        a.set_offload(p, false);
        assert_eq!(a.poll_offload(), Some(OffloadChange::Disarm(p)));
        assert!(!a.path(p).expect("path").is_offloaded());
        a.handle_bfd_refresh(p, Some(first - Duration::from_millis(1)), 20);
        a.handle_timeout(first);
        assert!(a.path(p).expect("path").is_up(), "expired after the disarm");
        assert_eq!(a.poll_refresh(), None, "no question once disarmed");

        // A shell that never answers: expiry one detection time late.
        let (mut a, p) = up();
        let first = deadline(&a, p);
        let detect = a.path(p).expect("path").session.detection_time();
        a.handle_timeout(first);
        assert_eq!(a.poll_refresh(), Some(p));
        a.handle_timeout(first + detect - Duration::from_millis(1));
        assert!(a.path(p).expect("path").is_up());
        a.handle_timeout(first + detect);
        assert!(!a.path(p).expect("path").is_up());
    }

    fn id(e: &Engine, name: &str) -> PathId {
        let peer = e.peer_by_name("p").expect("peer");
        e.path_by_name(peer, name).expect("path")
    }

    fn snapshot(e: &Engine, name: &str) -> (u32, u64, State) {
        let s = &e.path(id(e, name)).expect("path").session;
        (s.local_discriminator(), s.transitions(), s.state())
    }

    impl Engine {
        /// What `poll_timeout` was before the deadlines: a scan of every
        /// session, quality verdict and steering.
        fn scan_timeout(&self) -> Option<Instant> {
            let live = self.paths.iter().filter(|p| !p.retired);
            let sessions = live.clone().filter_map(|p| p.session.poll_timeout());
            let quality = live.filter_map(|p| p.quality.poll_timeout());
            let steering = self
                .peers
                .iter()
                .filter(|p| !p.retired)
                .filter_map(|p| p.steering.poll_timeout());
            sessions.chain(steering).chain(quality).min()
        }
    }

    /// An upgrade while a recovered path waits out its revert hold: the
    /// new process (a fresh engine given the old one's sessions) keeps the
    /// flows on the backup path and reverts when the old one would have,
    /// not at once; without the steering handed over it would revert at
    /// once.
    #[test]
    fn an_upgrade_keeps_flows_where_they_were() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut a = Engine::new(&config(1, &[1, 2]), t0, 1);
        let mut b = Engine::new(&config(2, &[1, 2]), t0, 2);
        run(&mut a, &mut b, t0, 0, 3000);
        assert!(a.is_active(id(&a, "p1")));
        a.handle_link_event(id(&a, "p1"), false, at(3000));
        run(&mut a, &mut b, t0, 3000, 3100);
        a.handle_link_event(id(&a, "p1"), true, at(3100));
        run(&mut a, &mut b, t0, 3100, 3300);
        assert!(a.is_active(id(&a, "p2")), "p1 waits out its hold");
        let exported = a.export_sessions(at(3300));
        let take_over = |steering: bool| {
            let mut n = Engine::new(&config(1, &[1, 2]), at(3300), 3);
            let mut restored = Vec::new();
            for e in &exported {
                let pid = id(&n, &e.path);
                n.restore_session(pid, e, at(3300)).expect("restore");
                restored.push((pid, e.clone()));
            }
            if steering {
                n.restore_steering(&restored, at(3300));
            }
            n
        };
        let bare = take_over(false);
        assert!(bare.is_active(id(&bare, "p1")), "the control: p1 at once");
        let mut n = take_over(true);
        assert!(n.is_active(id(&n, "p2")));
        assert!(!n.is_active(id(&n, "p1")));
        assert_eq!(
            n.damping(id(&n, "p1")).map(|d| d.flaps),
            a.damping(id(&a, "p1")).map(|d| d.flaps)
        );
        run(&mut n, &mut b, t0, 3300, 4050);
        assert!(n.is_active(id(&n, "p2")), "still in its hold at 4.05 s");
        run(&mut n, &mut b, t0, 4050, 4200);
        assert!(
            n.is_active(id(&n, "p1")),
            "reverted once the hold ended at 4.1 s"
        );
    }

    #[test]
    fn the_first_packets_window_grows_with_the_sessions() {
        let ms = Duration::from_millis;
        assert_eq!(first_tx_window(ms(10), 0), ms(10));
        assert_eq!(first_tx_window(ms(10), 50), ms(10));
        assert_eq!(first_tx_window(ms(10), 1000), ms(100));
        assert_eq!(first_tx_window(ms(300), 1000), ms(300));
    }

    /// Sessions added together do not send their first packets in one burst.
    #[test]
    fn sessions_added_together_start_spread_over_their_interval() {
        let t0 = Instant::now();
        let paths: Vec<u8> = (0..50).collect();
        let mut a = Engine::new(&config(1, &paths), t0, 7);
        let mut sent_at = Vec::new();
        for us in (0..=10_000u64).step_by(100) {
            let now = t0 + Duration::from_micros(us);
            while let Some((_, t)) = a.poll_transmit(now) {
                assert!(t.is_ok());
                sent_at.push(us);
            }
        }
        assert_eq!(sent_at.len(), 50, "each session sends its first packet");
        let at_once = sent_at.iter().filter(|&&us| us == 0).count();
        assert!(at_once <= 5, "{at_once} of 50 sent at the start");
        let first_half = sent_at.iter().filter(|&&us| us < 5_000).count();
        assert!((10..=40).contains(&first_half), "{first_half} in 0-5 ms");
    }

    /// The scheduled deadlines are exactly what a scan of every timer
    /// finds, through start-up, a link loss, a path's removal and
    /// addition, new timers and a peer's removal.
    #[test]
    fn deadlines_match_a_scan_of_every_timer() {
        let t0 = Instant::now();
        let mut a = Engine::new(&config(1, &[1, 2]), t0, 1);
        let mut b = Engine::new(&config(2, &[1, 2]), t0, 2);
        let check = |e: &Engine, at: u64| {
            assert_eq!(e.poll_timeout(), e.scan_timeout(), "at {at} ms");
        };
        let mut steps = 0;
        for ms in 0..4000u64 {
            let now = t0 + Duration::from_millis(ms);
            match ms {
                1000 => a.handle_link_event(id(&a, "p1"), false, now),
                1200 => a.handle_link_event(id(&a, "p1"), true, now),
                1500 => {
                    a.remove_path(id(&a, "p2"), now);
                }
                2000 => {
                    let peer = a.peer_by_name("p").expect("peer");
                    a.add_path(peer, &config(1, &[2]).peers[0].paths[0], now);
                }
                2500 => {
                    let p1 = id(&a, "p1");
                    let ms5 = Duration::from_millis(5);
                    a.set_timers(p1, ms5, ms5, 4, now);
                }
                _ => {}
            }
            // A wakeup at the deadline or every millisecond, whichever
            // comes first: both are exercised.
            exchange(&mut a, &mut b, now);
            exchange(&mut b, &mut a, now);
            check(&a, ms);
            check(&b, ms);
            steps += 1;
        }
        assert_eq!(steps, 4000);
        assert_eq!(snapshot(&a, "p1").2, State::Up, "p1 back after the link");
        assert!(
            a.timers.len() <= 4 * (a.paths.len() + a.peers.len()),
            "{} entries for {} paths",
            a.timers.len(),
            a.paths.len()
        );
        let now = t0 + Duration::from_millis(4000);
        a.remove_peer(a.peer_by_name("p").expect("peer"), now);
        assert_eq!(a.poll_timeout(), None);
    }

    /// RFC 5880 §6.3 and RFC 5881 §4: a packet with a session's
    /// discriminators is that session's only from the session's remote
    /// address, received on its local address.
    #[test]
    fn forged_source_with_the_sessions_discriminators_is_dropped() {
        let t0 = Instant::now();
        let mut a = Engine::new(&config(1, &[1, 2]), t0, 1);
        let mut b = Engine::new(&config(2, &[1, 2]), t0, 2);
        run(&mut a, &mut b, t0, 0, 1000);
        let (ap1, bp1) = (id(&a, "p1"), id(&b, "p1"));
        let sa = &a.path(ap1).expect("path").session;
        let sb = &b.path(bp1).expect("path").session;
        assert_eq!(sb.state(), State::Up);
        let forged = ControlPacket {
            state: State::Down,
            my_discriminator: sa.local_discriminator(),
            your_discriminator: sb.local_discriminator(),
            ..ControlPacket::parse(
                a.paths[usize::from(ap1.0)]
                    .session
                    .clone()
                    .poll_transmit_encoded(t0 + Duration::from_secs(2))
                    .expect("due")
                    .expect("encodes")
                    .as_bytes(),
            )
            .expect("parses")
        };
        let mut buf = [0u8; 64];
        let n = forged.emit(&mut buf).expect("emit");
        let bytes = &buf[..n];
        let now = t0 + Duration::from_millis(1000);
        let b_local = b.path(bp1).expect("path").local.ip();
        let a_ip = a.path(ap1).expect("path").local.ip();
        let stranger = SocketAddr::new("198.18.21.77".parse().expect("ip"), 49152);
        for (local, src) in [
            (b_local, stranger),
            // The right source, on another of b's addresses (p2's).
            (
                b.path(id(&b, "p2")).expect("path").local.ip(),
                SocketAddr::new(a_ip, 49152),
            ),
        ] {
            let got = b.handle_bfd_datagram(local, src, Some(255), bytes, now);
            assert_eq!(got, Err(DropReason::BfdWrongSource), "{local} <- {src}");
        }
        assert_eq!(b.path(bp1).expect("path").session.state(), State::Up);
        // From the real remote it is the session's, and takes it down.
        let real = SocketAddr::new(a_ip, 49152);
        assert_eq!(
            b.handle_bfd_datagram(b_local, real, Some(255), bytes, now),
            Ok(bp1)
        );
        assert_eq!(b.path(bp1).expect("path").session.state(), State::Down);
    }

    #[test]
    fn reload_swaps_a_path_without_touching_the_other() {
        let t0 = Instant::now();
        let mut a = Engine::new(&config(1, &[1, 2]), t0, 1);
        let mut b = Engine::new(&config(2, &[1, 2]), t0, 2);
        run(&mut a, &mut b, t0, 0, 3000);
        let p1 = id(&a, "p1");
        assert_eq!(a.forwarding().peers[0].active, Some(p1));
        let before = (snapshot(&a, "p1"), snapshot(&b, "p1"));
        assert_eq!(before.0 .2, State::Up);
        while a.poll_event().is_some() {}

        // Both sides drop p2 and add p3, as a reload would.
        let now = t0 + Duration::from_millis(3000);
        let p2 = id(&a, "p2");
        let admin_down = a.remove_path(p2, now).expect("AdminDown packet");
        let parsed = ControlPacket::parse(admin_down.as_bytes()).expect("parses");
        assert_eq!(parsed.state, State::AdminDown);
        deliver(&a, &mut b, p2, admin_down.as_bytes(), now);
        assert_eq!(snapshot(&b, "p2").2, State::Down, "b heard the AdminDown");
        b.remove_path(id(&b, "p2"), now).expect("AdminDown packet");
        assert!(a.path(p2).is_some_and(PathCore::is_retired));
        assert!(a.path_by_name(PeerId(0), "p2").is_none());
        let peer = a.peer_by_name("p").expect("peer");
        let new = config(1, &[3]).peers[0].paths[0].clone();
        let p3 = a.add_path(peer, &new, now).expect("added");
        assert_eq!(p3, PathId(2), "ids are never reused");
        let new_b = config(2, &[3]).peers[0].paths[0].clone();
        b.add_path(b.peer_by_name("p").expect("peer"), &new_b, now)
            .expect("added");
        run(&mut a, &mut b, t0, 3000, 6000);

        assert_eq!(snapshot(&a, "p3").2, State::Up);
        assert_eq!((snapshot(&a, "p1"), snapshot(&b, "p1")), before);
        assert_eq!(a.forwarding().peers[0].active, Some(p1));
        while let Some(ev) = a.poll_event() {
            assert!(
                !matches!(ev, Event::Failover { .. } | Event::PeerUp { .. }),
                "{ev:?}"
            );
        }
        // The retired slot sends nothing and is not active.
        assert!(!a.is_active(p2));
        let (_, _, ids) = a.peer(peer).expect("peer");
        assert_eq!(ids, [p1, p3]);
    }

    #[test]
    fn removing_a_peer_sends_admin_down_and_empties_its_selection() {
        let t0 = Instant::now();
        let mut a = Engine::new(&config(1, &[1, 2]), t0, 1);
        let mut b = Engine::new(&config(2, &[1, 2]), t0, 2);
        run(&mut a, &mut b, t0, 0, 3000);
        while a.poll_event().is_some() {}
        let now = t0 + Duration::from_millis(3000);
        let peer = a.peer_by_name("p").expect("peer");
        let packets = a.remove_peer(peer, now);
        assert_eq!(packets.len(), 2);
        assert!(packets.iter().all(|(_, p)| {
            ControlPacket::parse(p.as_bytes()).is_ok_and(|c| c.state == State::AdminDown)
        }));
        assert!(a.peer(peer).is_none() && a.peer_by_name("p").is_none());
        assert_eq!(a.forwarding().peers[0].active, None);
        let events: Vec<Event> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(
            events.contains(&Event::PeerUp { peer, up: false }),
            "{events:?}"
        );
        assert_eq!(a.poll_timeout(), None, "nothing left to run");
        // A peer of the same name can come back, in a new slot.
        let again = a.add_peer(&config(1, &[1]).peers[0], now).expect("added");
        assert_eq!(again, PeerId(1));
        run(&mut a, &mut b, t0, 3000, 5000);
        assert!(a.forwarding().peers[1].active.is_some());
    }
}

#[cfg(test)]
mod handshake_tests {
    use super::*;
    use crate::core::crypto::MessageId;
    use crate::core::handshake::{Setup, State as HsState, REKEY_AFTER};
    use crate::core::keypair::PrivateKey;

    fn engine(side: u8, now: Instant) -> Engine {
        let other = 3 - side;
        let text = format!(
            "[gateway]\nname = \"g{side}\"\n[[peer]]\nname = \"p\"\ntun = \"xl-p\"\n\
             [[peer.path]]\nname = \"p1\"\nlocal = \"198.18.21.{side}:4800\"\n\
             remote = \"198.18.21.{other}:4800\"\n\
             [[peer.path]]\nname = \"p2\"\nlocal = \"198.18.22.{side}:4800\"\n\
             remote = \"198.18.22.{other}:4800\"\n"
        );
        let config = Config::parse(&text, "test").expect("valid");
        let mut e = Engine::new(&config, now, u64::from(side));
        e.set_handshake(
            PeerId(0),
            Some(Handshake::new(
                Setup {
                    local: PrivateKey::from_bytes([side; 32]),
                    remote: PrivateKey::from_bytes([other; 32]).public(),
                    psk: None,
                    rekey_after: REKEY_AFTER,
                },
                now,
            )),
        );
        e
    }

    /// The engine starts each key-pair peer's handshake, sends its messages
    /// on the peer's paths and hands out keys that the other side opens.
    #[test]
    fn engines_run_the_handshake_over_the_peers_paths() {
        let now = Instant::now();
        let mut a = engine(1, now);
        let mut b = engine(2, now);
        assert!(a.poll_timeout().is_some_and(|t| t <= now));
        let mut keys = [None, None];
        for step in 0..10u64 {
            let t = now + Duration::from_millis(step);
            let mut engines = [a, b];
            for k in [0usize, 1] {
                let [x, y] = &mut engines;
                let (from, to) = if k == 0 { (x, y) } else { (y, x) };
                from.handle_timeout(t);
                while let Some((path, d)) = from.poll_handshake() {
                    assert!(from.path(path).is_some_and(|p| p.peer == PeerId(0)));
                    to.handle_handshake(path, &d, t);
                }
                while let Some((peer, ks)) = from.poll_keys() {
                    assert_eq!(peer, PeerId(0));
                    keys[k] = Some(ks);
                }
            }
            [a, b] = engines;
        }
        for e in [&a, &b] {
            assert_eq!(
                e.handshake(PeerId(0)).map(|h| h.state()),
                Some(HsState::Established)
            );
        }
        let (Some(ka), Some(kb)) = (&keys[0], &keys[1]) else {
            panic!("no keys published");
        };
        let id = MessageId {
            epoch: ka.session_epoch().expect("a seals"),
            msg_type: 4,
            salt: 1,
            sequence: 1,
        };
        let mut payload = *b"inner";
        let tag = ka.seal(&id, b"h", &mut payload);
        assert!(kb.open(&id, b"h", &mut payload, &tag).is_ok());
        assert_eq!(&payload, b"inner");
        // A removed peer's handshake goes with it.
        a.remove_peer(PeerId(0), now);
        assert!(a.handshake(PeerId(0)).is_none());
    }
}

#[cfg(test)]
mod auth_and_admin_tests {
    use super::*;

    fn config(side: u8, auth: Option<&str>) -> Config {
        let other = 3 - side;
        let auth = auth.map_or(String::new(), |t| {
            format!("auth = {{ type = \"{t}\", key_id = 3, secret_file = \"/k\" }}\n")
        });
        let text = format!(
            "[gateway]\nname = \"g{side}\"\ncontrol_socket = \"/nonexistent.sock\"\n\
             [bfd]\ntx_interval = \"10ms\"\nrx_interval = \"10ms\"\nmultiplier = 3\n{auth}\
             [[peer]]\nname = \"p\"\ntun = \"xl-p\"\n  [[peer.path]]\n  name = \"p1\"\n  \
             local = \"198.18.21.{side}:4800\"\n  remote = \"198.18.21.{other}:4800\"\n"
        );
        Config::parse(&text, "test").unwrap()
    }

    fn secrets(secret: &[u8]) -> Secrets {
        Secrets::from([(PathBuf::from("/k"), secret.to_vec())])
    }

    /// An engine whose sessions were added one interval before `t0`, so
    /// that each has its first packet due by then (see
    /// [`Session::spread_first_transmission`]).
    fn engine(side: u8, auth: Option<&str>, secret: &[u8], t0: Instant) -> Engine {
        let t0 = t0.checked_sub(Duration::from_millis(10)).unwrap_or(t0);
        let mut e = Engine::new(
            &Config {
                peers: Vec::new(),
                ..config(side, auth)
            },
            t0,
            1,
        );
        e.set_secrets(secrets(secret));
        for peer in &config(side, auth).peers {
            e.add_peer(peer, t0);
        }
        e
    }

    fn ip(side: u8) -> IpAddr {
        format!("198.18.21.{side}").parse().unwrap()
    }

    /// Sends what `from` has due at `now` to `to` (on `to`'s side `side`).
    fn deliver(from: &mut Engine, to: &mut Engine, side: u8, now: Instant) -> Vec<DropReason> {
        from.handle_timeout(now);
        let mut out = Vec::new();
        while let Some((_, t)) = from.poll_transmit(now) {
            out.push(t.unwrap().as_bytes().to_vec());
        }
        let src = SocketAddr::new(ip(3 - side), 49152);
        out.iter()
            .filter_map(|bytes| {
                to.handle_bfd_datagram(ip(side), src, Some(255), bytes, now)
                    .err()
            })
            .collect()
    }

    /// Delivers every due packet both ways at `now`; returns drop reasons seen.
    fn exchange(a: &mut Engine, b: &mut Engine, now: Instant) -> Vec<DropReason> {
        let mut drops = Vec::new();
        for _ in 0..6 {
            drops.extend(deliver(a, b, 2, now));
            drops.extend(deliver(b, a, 1, now));
        }
        drops
    }

    fn pair(auth: Option<&str>, sa: &[u8], sb: &[u8], t0: Instant) -> (Engine, Engine) {
        (engine(1, auth, sa, t0), engine(2, auth, sb, t0))
    }

    #[test]
    fn missing_or_oversized_secret_refuses_the_path() {
        let t0 = Instant::now();
        let cfg = config(1, Some("keyed-md5"));
        let path = &cfg.peers[0].paths[0];
        let mut e = Engine::new(
            &Config {
                peers: Vec::new(),
                ..cfg.clone()
            },
            t0,
            1,
        );
        let peer = e.add_peer(
            &PeerConfig {
                paths: Vec::new(),
                ..cfg.peers[0].clone()
            },
            t0,
        );
        let peer = peer.unwrap();
        assert!(matches!(
            e.check_path_auth(path),
            Err(EngineError::MissingSecret { .. })
        ));
        assert!(e
            .check_path_auth(path)
            .unwrap_err()
            .to_string()
            .contains("/k"));
        assert_eq!(e.add_path(peer, path, t0), None, "fail closed");
        e.set_secrets(secrets(&[b'x'; 17]));
        assert!(matches!(
            e.check_path_auth(path),
            Err(EngineError::BadSecret { .. })
        ));
        assert_eq!(e.add_path(peer, path, t0), None);
        e.set_secrets(secrets(b"fine"));
        assert!(e.check_path_auth(path).is_ok());
        assert!(e.add_path(peer, path, t0).is_some());
        assert!(check_secret(BfdAuthType::KeyedSha1, &[1; 20]).is_ok());
        assert!(check_secret(BfdAuthType::KeyedMd5, &[1; 20]).is_err());
    }

    #[test]
    fn authenticated_engines_come_up_and_wrong_key_is_dropped_as_auth() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(Some("meticulous-keyed-sha1"), b"key", b"key", t0);
        assert!(exchange(&mut a, &mut b, t0).is_empty());
        assert!(a.paths()[0].is_up() && b.paths()[0].is_up());
        let (mut a, mut b) = pair(Some("meticulous-keyed-sha1"), b"key", b"yek", t0);
        let drops = exchange(&mut a, &mut b, t0);
        assert!(!drops.is_empty() && drops.iter().all(|d| *d == DropReason::BfdAuth));
        assert!(!a.paths()[0].is_up() && !b.paths()[0].is_up());
        // One side without auth: never Up either, and counted as auth drops.
        let mut c = engine(2, None, b"", t0);
        let mut a = engine(1, Some("keyed-sha1"), b"key", t0);
        let drops = exchange(&mut a, &mut c, t0);
        assert!(!drops.is_empty() && drops.iter().all(|d| *d == DropReason::BfdAuth));
        assert!(!a.paths()[0].is_up() && !c.paths()[0].is_up());
    }

    /// A received AdminDown takes the path out of service without a failure: no
    /// detection time in the failover event, no failure count.
    #[test]
    fn remote_admin_down_is_not_a_failure() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(None, b"", b"", t0);
        exchange(&mut a, &mut b, t0);
        assert!(a.paths()[0].is_up());
        while a.poll_event().is_some() {}
        let t1 = t0 + Duration::from_millis(5);
        b.set_admin_down_all(t1);
        exchange(&mut a, &mut b, t1);
        assert!(!a.paths()[0].is_up());
        assert!(!a.is_active(PathId(0)));
        assert_eq!(a.paths()[0].failures, 0);
        assert_eq!(a.paths()[0].remote_admin_downs, 1);
        let events: Vec<Event> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(events.iter().any(|e| matches!(
            e,
            Event::PathState {
                to: State::Down,
                administrative: true,
                ..
            }
        )));
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Failover {
                detection: None,
                ..
            }
        )));
        // A silent peer, by contrast, is a failure with a detection time.
        let (mut a, mut b) = pair(None, b"", b"", t0);
        exchange(&mut a, &mut b, t0);
        let late = t0 + Duration::from_millis(200);
        a.handle_timeout(late);
        assert_eq!(a.paths()[0].failures, 1);
        let events: Vec<Event> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Failover {
                detection: Some(_),
                ..
            }
        )));
    }

    #[test]
    fn set_timers_polls_without_a_flap() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(None, b"", b"", t0);
        exchange(&mut a, &mut b, t0);
        let before = a.paths()[0].session.transitions();
        let ms = Duration::from_millis;
        assert!(a.set_timers(PathId(0), ms(50), ms(10), 3, t0));
        assert!(a.paths()[0].session.poll_active());
        exchange(&mut a, &mut b, t0);
        assert!(!a.paths()[0].session.poll_active());
        assert_eq!(a.paths()[0].session.transitions(), before);
        assert!(!a.set_timers(PathId(0), ms(50), ms(10), 3, t0), "unchanged");
        assert!(
            !a.set_timers(PathId(9), ms(50), ms(10), 3, t0),
            "no such path"
        );
    }
}
