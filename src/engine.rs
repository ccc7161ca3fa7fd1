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

use crate::bfd::{Auth, KeyError, Session, SessionConfig, SessionEvent, Transmit};
use crate::config::{BfdAuthType, BfdConfig, Config, Hop, Policy};
use crate::drop::DropReason;
use crate::steer::{Selection, Steering};
use crate::wire::bfd::{AuthType, ControlPacket, Diag, EmitError, State};
use crate::wire::flow::mix;
use crate::{PathId, PeerId};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// BFD secrets by file name, read by the shell (the engine does no I/O).
pub type Secrets = HashMap<PathBuf, Vec<u8>>;

/// Why an engine cannot be built.
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
}

/// What the data plane needs to place packets: one selection per peer,
/// indexed by [`PeerId`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Forwarding {
    pub peers: Vec<Selection>,
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
    },
    /// A peer gained its first usable path, or lost its last.
    PeerUp { peer: PeerId, up: bool },
}

struct PeerCore {
    name: String,
    steering: Steering,
    paths: Vec<PathId>,
    up: bool,
}

/// Per-path control state.
pub struct PathCore {
    pub peer: PeerId,
    pub name: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub hop: Hop,
    pub min_ttl: u8,
    pub session: Session,
    last_rx: Option<Instant>,
    down_since: Option<Instant>,
    pub control_tx: u64,
    pub control_rx: u64,
    /// Up -> not Up changes that were failures (detection expiry, or the peer saying
    /// Down); administrative changes (AdminDown either way) are not counted.
    pub failures: u64,
    /// Times the peer took the session down administratively.
    pub remote_admin_downs: u64,
}

impl PathCore {
    /// Whether BFD says the path works.
    pub fn is_up(&self) -> bool {
        self.session.state() == State::Up
    }
}

/// The gateway's control plane.
pub struct Engine {
    peers: Vec<PeerCore>,
    paths: Vec<PathCore>,
    events: VecDeque<Event>,
    dirty: bool,
    next_tx: usize,
}

impl Engine {
    /// Builds sessions and steering for a validated config. `secrets` holds the
    /// content of every `auth.secret_file` the config names; a path whose secret is
    /// missing or unusable is an error (authentication fails closed).
    pub fn new(
        config: &Config,
        secrets: &Secrets,
        now: Instant,
        seed: u64,
    ) -> Result<Engine, EngineError> {
        let mut engine = Engine {
            peers: Vec::new(),
            paths: Vec::new(),
            events: VecDeque::new(),
            dirty: true,
            next_tx: 0,
        };
        for (pi, peer) in config.peers.iter().enumerate() {
            let peer_id = PeerId(pi as u16);
            let mut ids = Vec::new();
            let mut steer_paths = Vec::new();
            for path in &peer.paths {
                let id = PathId(engine.paths.len() as u16);
                let disc = engine.unique_discriminator(seed);
                let mut session = Session::new(
                    session_config(&path.bfd, disc),
                    now,
                    mix(seed ^ u64::from(disc)),
                );
                let initial_seq = (mix(seed ^ u64::from(disc) ^ 0xa17) >> 32) as u32;
                session.set_auth(path_auth(&path.name, &path.bfd, secrets, initial_seq)?);
                engine.paths.push(PathCore {
                    peer: peer_id,
                    name: path.name.clone(),
                    local: path.local,
                    remote: path.remote,
                    hop: path.bfd.hop,
                    min_ttl: path.bfd.min_ttl,
                    session,
                    last_rx: None,
                    down_since: Some(now),
                    control_tx: 0,
                    control_rx: 0,
                    failures: 0,
                    remote_admin_downs: 0,
                });
                ids.push(id);
                steer_paths.push((id, path.priority, path.weight));
            }
            engine.peers.push(PeerCore {
                name: peer.name.clone(),
                steering: Steering::new(peer.policy, peer.revert_hold, &steer_paths),
                paths: ids,
                up: false,
            });
        }
        Ok(engine)
    }

    fn unique_discriminator(&self, seed: u64) -> u32 {
        let mut n = self.paths.len() as u64;
        loop {
            let d = (mix(seed.wrapping_add(n)) >> 32) as u32;
            if d != 0
                && !self
                    .paths
                    .iter()
                    .any(|p| p.session.local_discriminator() == d)
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
        let id = self
            .path_by_addresses(local_ip, src.ip())
            .ok_or(DropReason::BfdUnknownSession)?;
        let path = &mut self.paths[usize::from(id.0)];
        if let Some(ttl) = ttl {
            // RFC 5881 §5 (GTSM): single hop must arrive with TTL 255.
            let floor = match path.hop {
                Hop::Single => 255,
                Hop::Multi => path.min_ttl,
            };
            if ttl < floor {
                return Err(DropReason::BfdTtl);
            }
        }
        let packet = ControlPacket::parse(data).map_err(|_| DropReason::BfdMalformed)?;
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
        Ok(id)
    }

    fn path_by_addresses(&self, local: IpAddr, remote: IpAddr) -> Option<PathId> {
        self.paths
            .iter()
            .position(|p| p.local.ip() == local && p.remote.ip() == remote)
            .map(|i| PathId(i as u16))
    }

    /// Runs every timer that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.paths.len() {
            if self.paths[i]
                .session
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.paths[i].session.handle_timeout(now);
                self.drain_session(PathId(i as u16), now);
            }
        }
        for pi in 0..self.peers.len() {
            if let Some(change) = self.peers[pi].steering.handle_timeout(now) {
                self.on_steering_change(PeerId(pi as u16), change.from, change.to, None);
            }
        }
    }

    fn drain_session(&mut self, id: PathId, now: Instant) {
        while let Some(SessionEvent::StateChange { from, to, diag, .. }) =
            self.paths[usize::from(id.0)].session.poll_event()
        {
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
            }
            let peer = path.peer;
            let change = self.peers[usize::from(peer.0)].steering.handle_path_health(
                id,
                to == State::Up,
                now,
            );
            if let Some(change) = change {
                self.on_steering_change(peer, change.from, change.to, detection);
            }
        }
    }

    fn on_steering_change(
        &mut self,
        peer: PeerId,
        from: Option<PathId>,
        to: Option<PathId>,
        detection: Option<Duration>,
    ) {
        self.dirty = true;
        self.events.push_back(Event::Failover {
            peer,
            from,
            to,
            detection,
        });
        let core = &mut self.peers[usize::from(peer.0)];
        let up = to.is_some();
        if up != core.up {
            core.up = up;
            self.events.push_back(Event::PeerUp { peer, up });
        }
    }

    /// The earliest time `handle_timeout` has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let sessions = self.paths.iter().filter_map(|p| p.session.poll_timeout());
        let steering = self.peers.iter().filter_map(|p| p.steering.poll_timeout());
        sessions.chain(steering).min()
    }

    /// The next control packet due, encoded (and signed), with the path to send it
    /// on. A packet that cannot be encoded is reported as `Err` and not counted.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(PathId, Result<Transmit, EmitError>)> {
        let n = self.paths.len();
        for k in 0..n {
            let i = (self.next_tx + k) % n;
            if let Some(out) = self.paths[i].session.poll_transmit_encoded(now) {
                self.next_tx = (i + 1) % n;
                if out.is_ok() {
                    self.paths[i].control_tx += 1;
                }
                return Some((PathId(i as u16), out));
            }
        }
        None
    }

    /// Changes a path's BFD timers; a Poll Sequence announces them (RFC 5880 §6.8.3).
    pub fn set_timers(
        &mut self,
        id: PathId,
        tx: Duration,
        rx: Duration,
        multiplier: u8,
        now: Instant,
    ) -> bool {
        let Some(path) = self.paths.get_mut(usize::from(id.0)) else {
            return false;
        };
        path.session.set_timers(tx, rx, multiplier, now);
        self.drain_session(id, now);
        true
    }

    /// Applies the BFD timers of `config` to the running sessions with the same peer
    /// and path names (a reload). Returns the paths whose timers changed.
    pub fn apply_timers(&mut self, config: &Config, now: Instant) -> Vec<PathId> {
        let mut changed = Vec::new();
        for peer in &config.peers {
            for p in &peer.paths {
                let Some(id) = self.path_by_name(&peer.name, &p.name) else {
                    continue;
                };
                let s = &self.paths[usize::from(id.0)].session;
                let before = (s.configured_timers(), s.detect_mult());
                let b = &p.bfd;
                self.set_timers(id, b.tx_interval, b.rx_interval, b.multiplier, now);
                let s = &self.paths[usize::from(id.0)].session;
                if (s.configured_timers(), s.detect_mult()) != before {
                    changed.push(id);
                }
            }
        }
        changed
    }

    fn path_by_name(&self, peer: &str, path: &str) -> Option<PathId> {
        self.paths
            .iter()
            .position(|p| p.name == path && self.peers[usize::from(p.peer.0)].name == peer)
            .map(|i| PathId(i as u16))
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
            peers: self.peers.iter().map(|p| p.steering.selection()).collect(),
        }
    }

    /// Takes every session administratively down (clean shutdown, RFC 5880 §6.8.16).
    pub fn set_admin_down_all(&mut self, now: Instant) {
        for i in 0..self.paths.len() {
            self.paths[i].session.set_admin_down(now);
            self.drain_session(PathId(i as u16), now);
        }
    }

    /// Makes every AdminDown session send its AdminDown again at `now` (shutdown
    /// repeats it, since a single packet may be lost).
    pub fn repeat_admin_down(&mut self, now: Instant) {
        for p in &mut self.paths {
            if p.session.state() == State::AdminDown {
                p.session.transmit_now(now);
            }
        }
    }

    /// All paths, indexed by [`PathId`].
    pub fn paths(&self) -> &[PathCore] {
        &self.paths
    }

    /// A path by id.
    pub fn path(&self, id: PathId) -> Option<&PathCore> {
        self.paths.get(usize::from(id.0))
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// A peer's name, whether it has a usable path, and its paths.
    pub fn peer(&self, id: PeerId) -> Option<(&str, bool, &[PathId])> {
        self.peers
            .get(usize::from(id.0))
            .map(|p| (p.name.as_str(), p.up, p.paths.as_slice()))
    }

    /// Whether the path is the one carrying the peer's traffic (or, for
    /// `balance` and `duplicate`, one of those carrying it).
    pub fn is_active(&self, id: PathId) -> bool {
        let Some(path) = self.path(id) else {
            return false;
        };
        let Some(peer) = self.peers.get(usize::from(path.peer.0)) else {
            return false;
        };
        match peer.steering.selection().policy {
            Policy::ActiveBackup => peer.steering.active() == Some(id),
            Policy::Balance => peer.steering.is_eligible(id),
            Policy::Duplicate => {
                let sel = peer.steering.selection();
                sel.active == Some(id) || sel.duplicate_path() == Some(id)
            }
        }
    }
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
        let a = Engine::new(&config(1, auth), &secrets(sa), t0, 1).unwrap();
        let b = Engine::new(&config(2, auth), &secrets(sb), t0, 2).unwrap();
        (a, b)
    }

    #[test]
    fn missing_or_oversized_secret_is_an_error() {
        let t0 = Instant::now();
        let cfg = config(1, Some("keyed-md5"));
        assert!(matches!(
            Engine::new(&cfg, &Secrets::new(), t0, 1),
            Err(EngineError::MissingSecret { .. })
        ));
        assert!(matches!(
            Engine::new(&cfg, &secrets(&[b'x'; 17]), t0, 1),
            Err(EngineError::BadSecret { .. })
        ));
        let e = Engine::new(&cfg, &Secrets::new(), t0, 1).err().unwrap();
        assert!(e.to_string().contains("/k"));
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
            Event::PathState { to: State::Down, administrative: true, .. }
        )));
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Failover { detection: None, .. })));
        // A silent peer, by contrast, is a failure with a detection time.
        let (mut a, mut b) = pair(None, b"", b"", t0);
        exchange(&mut a, &mut b, t0);
        let late = t0 + Duration::from_millis(200);
        a.handle_timeout(late);
        assert_eq!(a.paths()[0].failures, 1);
        let events: Vec<Event> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Failover { detection: Some(_), .. })));
    }

    #[test]
    fn apply_timers_polls_without_a_flap() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(None, b"", b"", t0);
        exchange(&mut a, &mut b, t0);
        let before = a.paths()[0].session.transitions();
        let mut cfg = config(1, None);
        cfg.peers[0].paths[0].bfd.tx_interval = Duration::from_millis(50);
        let changed = a.apply_timers(&cfg, t0);
        assert_eq!(changed, vec![PathId(0)]);
        assert!(a.paths()[0].session.poll_active());
        exchange(&mut a, &mut b, t0);
        assert!(!a.paths()[0].session.poll_active());
        assert_eq!(a.paths()[0].session.transitions(), before);
        assert!(a.apply_timers(&cfg, t0).is_empty(), "unchanged: no poll");
    }
}
