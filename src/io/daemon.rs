//! `crosslink run`: sets up TUNs, routes and sockets, starts the threads,
//! and tears everything down again on SIGTERM/SIGINT.
//!
//! Start-up and SIGHUP reload are one mechanism: `Gateway::apply` compares
//! the wanted configuration with what is running, peer by peer and path by
//! path (keyed by name), and changes only the difference. Start-up is the
//! difference from nothing. An unchanged path keeps its BFD session and
//! its sockets; an unchanged peer keeps its TUN. Routes are added and
//! deleted in place; a peer whose other settings changed (TUN, addresses,
//! policy...) is restarted with all its paths; a changed path is restarted
//! alone; a peer whose path set changed gets its lanes restarted with the
//! new path table (a pause of microseconds, nothing dropped: packets wait
//! in the TUN queues and socket buffers).

use super::control_plane::{BfdThread, CommandLink, CommandQueue, Meta, NewPath, Plan};
use super::fastpath::FastPath;
use super::lanes::{
    self, FlowClaims, FlowTable, Lane, LaneReorder, PathIn, PathOut, SharedKeys, TunOut,
};
use super::linkwatch::{self, LinkWatch, WatchedPath};
use super::sys::Doorbell;
use super::{clock, keys, netlink::Netlink, notify, sys, tun, udp};
use crate::config::{Config, ConfigError, PathConfig, PeerConfig, Policy, SlaConfig};
use crate::core::aggregate::Scheduler;
use crate::core::crypto::{self, EchoGuard, ReplayWindow};
use crate::core::dedup::Window;
use crate::core::engine::{check_secret, Engine, Forwarding, Secrets};
use crate::core::forward;
use crate::core::quality::{Prober, Reflector};
use crate::core::wire::flow::mix;
use crate::core::wire::overlay;
use crate::telemetry::metrics::{self, Metrics};
use crate::telemetry::{control, DropCounters, PathCounters, ReorderCounters};
use crate::{PathId, PeerId};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::io;
use std::net::{IpAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};
use tun_rs::SyncDevice;

/// Why the daemon could not run.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Setup(String),
}

/// Underlay MTU assumed for a path whose route cannot be asked (its local
/// address not there yet, say).
const FALLBACK_UNDERLAY_MTU: u32 = 1500;

/// Default inner MTU of a peer: what fits every one of its paths, from
/// the MTU of each path's route (the outgoing interface's, or less if path
/// MTU discovery learnt less) less that path's headers (see
/// [`crate::core::forward::inner_mtu`]); at least the IPv4 minimum of 576 (1280
/// with IPv6 inside), at most 65535.
fn default_mtu(w: &PeerConfig) -> u16 {
    let extended = matches!(w.policy, Policy::Duplicate | Policy::Aggregate);
    let sealed = w.key_file.is_some() || w.public_key.is_some();
    let fits = w
        .paths
        .iter()
        .map(|p| {
            let underlay = sys::route_mtu(p.local, p.remote).unwrap_or_else(|e| {
                warn!(path = %p.name, error = %e, "no route MTU; assuming {FALLBACK_UNDERLAY_MTU}");
                FALLBACK_UNDERLAY_MTU
            });
            forward::inner_mtu(underlay, p.remote.is_ipv6(), extended, sealed)
        })
        .min()
        .unwrap_or_else(|| forward::inner_mtu(FALLBACK_UNDERLAY_MTU, true, extended, sealed));
    let floor = if w.has_ipv6() { 1280 } else { 576 };
    if fits < floor {
        warn!(peer = %w.name, fits, floor, "the paths' MTU leaves less than the minimum inner MTU; inner packets above {fits} bytes will be fragmented on the underlay");
    }
    u16::try_from(fits.max(floor)).unwrap_or(u16::MAX)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    refuse_unsupported(&config)?;
    let secrets = read_secrets(&config)?;
    if let Err(e) = super::sys::lock_memory() {
        tracing::warn!(error = %e, "could not lock memory (needs CAP_IPC_LOCK); paging may delay BFD");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("crosslink-rt")
        .enable_all()
        .build()?;
    rt.block_on(run_async(config, secrets, config_path.to_path_buf()))
}

/// Reads every BFD `auth.secret_file` (RFC 5880 §6.7 keys) and checks it fits its
/// authentication type. Errors name the file; the content is never logged. A
/// trailing line ending is not part of the secret.
fn read_secrets(config: &Config) -> Result<Secrets, DaemonError> {
    let mut secrets = Secrets::new();
    let auths = config
        .peers
        .iter()
        .flat_map(|p| p.paths.iter())
        .filter_map(|p| p.bfd.auth.as_ref());
    for auth in auths {
        let file = &auth.secret_file;
        if !secrets.contains_key(file) {
            let raw = std::fs::read(file).map_err(|e| {
                DaemonError::Setup(format!(
                    "cannot read BFD secret file {}: {e}",
                    file.display()
                ))
            })?;
            secrets.insert(
                file.clone(),
                crate::core::bfd::auth::trim_secret(&raw).to_vec(),
            );
        }
        let secret = secrets.get(file).map_or(&[][..], Vec::as_slice);
        check_secret(auth.auth_type, secret).map_err(|e| {
            DaemonError::Setup(format!(
                "BFD secret file {} for {}: {e}",
                file.display(),
                auth.auth_type.as_str()
            ))
        })?;
    }
    Ok(secrets)
}

/// Whether two path configs differ at most in their BFD timers, which a reload
/// applies in place (Poll Sequence) instead of restarting the path.
fn only_bfd_timers_differ(a: &PathConfig, b: &PathConfig) -> bool {
    let strip = |p: &PathConfig| {
        let mut p = p.clone();
        p.bfd.tx_interval = Duration::ZERO;
        p.bfd.rx_interval = Duration::ZERO;
        p.bfd.multiplier = 0;
        // The service level changes in place too (a running prober keeps
        // its probe interval until the path restarts).
        p.sla = SlaConfig::default();
        // So does the `aggregate` rate (the estimate starts over from it).
        p.rate = None;
        p
    };
    strip(a) == strip(b)
}

/// Settings this build cannot honour (running without them would silently
/// weaken what the operator asked for), and key files that do not hold a
/// key: refused before anything changes.
fn refuse_unsupported(config: &Config) -> Result<(), DaemonError> {
    for peer in &config.peers {
        keys::load(peer).map_err(DaemonError::Setup)?;
        keys::handshake(&config.gateway, peer, clock::now()).map_err(DaemonError::Setup)?;
    }
    Ok(())
}

/// A running path (its sockets are in the peer's lanes).
struct PathRun {
    id: PathId,
    config: PathConfig,
}

/// A running lane: its thread and the doorbell that stops it.
struct LaneRun {
    thread: JoinHandle<Lane>,
    doorbell: Arc<Doorbell>,
}

/// A running peer: its TUN, forwarding lanes and paths.
struct PeerRun {
    id: PeerId,
    config: PeerConfig,
    /// The TUN's MTU.
    mtu: u16,
    /// The TUN's first queue (the device).
    tun: Arc<SyncDevice>,
    ifindex: u32,
    /// How many lanes (TUN queues) the peer has.
    lanes: usize,
    running: Vec<LaneRun>,
    /// The peer's keys, shared with its threads; swapped on reload.
    keys: SharedKeys,
    /// The lanes' state while they are stopped for a change.
    parked: Vec<Lane>,
    paths: Vec<PathRun>,
    /// `duplicate`: the window shared by the receive threads of the paths.
    dedup: Arc<Mutex<Window>>,
    /// What the lanes' resequencers did (packets spread by an `aggregate` sender).
    reorder: Arc<ReorderCounters>,
    /// The kernel fast path on the TUN's egress (`fast_path = true`).
    fast: Option<Arc<FastPath>>,
}

/// What every thread shares.
struct Shared {
    commands: CommandLink,
    forwarding: Arc<ArcSwap<Forwarding>>,
    metrics: Arc<Metrics>,
    drops: Arc<DropCounters>,
    netlink: Netlink,
    stamp_key: u64,
    /// This run's epoch: its start in Unix seconds (see [`crate::core::crypto`]).
    epoch: u32,
}

/// The running gateway, as the shell sees it.
struct Gateway {
    shared: Shared,
    peers: Vec<PeerRun>,
    /// Local addresses with a BFD receive socket (in the BFD thread).
    rx_ips: Vec<IpAddr>,
    /// The carrier and address watch, told about every path change.
    links: Option<LinkWatch>,
}

/// A path to start: opened but not yet known to the engine.
struct Pending {
    peer: String,
    config: PathConfig,
    /// One per lane of the peer, or one that lane 0 reads (see [`open_path`]).
    sockets: Vec<Arc<UdpSocket>>,
    counters: Arc<PathCounters>,
}

async fn run_async(
    config: Config,
    secrets: Secrets,
    config_path: PathBuf,
) -> Result<(), DaemonError> {
    // First of all, so that a second daemon with this configuration stops
    // here, before it touches the TUNs and sockets of the running one.
    let control_path = config.gateway.control_socket.clone();
    let listener = control::bind(&control_path)?;
    let endpoint = match &config.metrics {
        Some(m) => Some(metrics::install(m.listen).map_err(DaemonError::Setup)?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let now = clock::now();
    let seed = u64::from(std::process::id()) ^ (clock::unix_seconds(now) << 20) ^ 0x5eed;
    let nothing = Config {
        peers: Vec::new(),
        ..config.clone()
    };
    let engine = Engine::new(&nothing, now, seed);
    let forwarding = Arc::new(ArcSwap::from_pointee(engine.forwarding()));
    let drops = Arc::new(DropCounters::default());

    // The BFD thread, empty until the first apply.
    let queue = CommandQueue::new();
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let bfd = BfdThread {
        engine,
        tx: Vec::new(),
        rx: Vec::new(),
        commands: queue.clone(),
        wake: wake_rx,
        forwarding: forwarding.clone(),
        metrics: metrics.clone(),
        counters: Vec::new(),
        drops: drops.clone(),
        tuns: Vec::new(),
        fast: Vec::new(),
        reorder: Vec::new(),
        fast_collected: None,
        quality_exported: None,
        io: Default::default(),
        data_tx: Vec::new(),
        peer_keys: Vec::new(),
        meta: Meta {
            gateway: config.gateway.name.clone(),
            started: now,
            peers: Vec::new(),
            paths: Vec::new(),
        },
    };
    let bfd_handle = std::thread::Builder::new()
        .name("bfd".into())
        .spawn(move || bfd.run())?;
    let commands = CommandLink {
        queue,
        wake: Arc::new(wake_tx),
    };
    let mut gw = Gateway {
        shared: Shared {
            commands: commands.clone(),
            forwarding,
            metrics: metrics.clone(),
            drops: drops.clone(),
            netlink: Netlink::connect()?,
            stamp_key: mix(seed ^ 0xec40),
            epoch: clock::unix_seconds(now) as u32,
        },
        peers: Vec::new(),
        rx_ips: Vec::new(),
        links: match linkwatch::spawn(commands.clone()).await {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "no carrier/address watch; failures are detected by BFD only");
                None
            }
        },
    };
    let problems = gw.apply(&config, secrets).await;
    if !problems.is_empty() {
        commands.shutdown().await;
        let _ = bfd_handle.join();
        gw.stop_all();
        let _ = std::fs::remove_file(&control_path);
        return Err(DaemonError::Setup(problems.join("; ")));
    }

    // Metrics, control socket.
    let status_link = commands.clone();
    let control_task = tokio::spawn(control::serve(listener, move || {
        let link = status_link.clone();
        async move { link.status().await }
    }));
    let sync_metrics = metrics.clone();
    let sync_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            sync_metrics.sync(&drops);
        }
    });
    if let (Some(endpoint), Some(m)) = (endpoint, &config.metrics) {
        endpoint.serve();
        info!(listen = %m.listen, "metrics endpoint up");
    }
    let watchdog_task = notify::watchdog_interval().map(|every| {
        let link = commands.clone();
        tokio::spawn(watchdog(link, every))
    });
    info!(gateway = %config.gateway.name, control = %control_path.display(), "crosslink running");
    notify_systemd("READY=1");

    // Signals.
    let mut running = config;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notify_systemd("RELOADING=1");
                if let Some(new) = reload(&config_path, &running, &mut gw).await {
                    running = new;
                }
                notify_systemd("READY=1");
            }
        }
    }

    notify_systemd("STOPPING=1");
    info!("stopping: sending AdminDown on every path");
    commands.shutdown().await;
    let _ = bfd_handle.join();
    gw.stop_all();
    control_task.abort();
    sync_task.abort();
    if let Some(t) = watchdog_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&control_path);
    info!("stopped; TUN devices and their routes removed");
    Ok(())
}

fn notify_systemd(state: &str) {
    if let Err(e) = notify::notify(state) {
        warn!(error = %e, state, "could not notify systemd");
    }
}

/// Pings the systemd watchdog while the BFD thread answers: a wedged
/// control plane stops the pings and systemd restarts the service.
async fn watchdog(link: CommandLink, every: Duration) {
    let mut tick = tokio::time::interval(every / 3);
    loop {
        tick.tick().await;
        let answer = tokio::time::timeout(every / 4, link.status()).await;
        if matches!(answer, Ok(Some(_))) {
            notify_systemd("WATCHDOG=1");
        } else {
            warn!("BFD thread did not answer; withholding the watchdog ping");
        }
    }
}

/// SIGHUP: re-reads the file and applies the difference. An invalid file
/// changes nothing. Returns the new configuration when it was applied.
async fn reload(path: &Path, running: &Config, gw: &mut Gateway) -> Option<Config> {
    let metrics = gw.shared.metrics.clone();
    let loaded = Config::load(path).map_err(DaemonError::from);
    let checked = loaded.and_then(|c| {
        refuse_unsupported(&c)?;
        let secrets = read_secrets(&c)?;
        Ok((c, secrets))
    });
    let (new, secrets) = match checked {
        Ok(new) => new,
        Err(e) => {
            metrics.set_reload_ok(false);
            error!(error = %e, "reload refused; keeping the running configuration");
            return None;
        }
    };
    if new == *running {
        // Key files may have new content under the same names.
        let problems = gw.set_keys(&new).await;
        metrics.set_reload_ok(problems.is_empty());
        if problems.is_empty() {
            info!("reload: configuration unchanged; keys reread");
        } else {
            error!(problems = %problems.join("; "), "reload: keys not reread");
        }
        return Some(new);
    }
    for (what, changed) in [
        ("[gateway]", new.gateway != running.gateway),
        ("[metrics]", new.metrics != running.metrics),
    ] {
        if changed {
            warn!(
                section = what,
                "reload: this section changes only at restart"
            );
        }
    }
    let problems = gw.apply(&new, secrets).await;
    metrics.set_reload_ok(problems.is_empty());
    if problems.is_empty() {
        info!("reload applied");
    } else {
        error!(problems = %problems.join("; "), "reload applied only in part");
    }
    Some(new)
}

/// A peer's own settings, without its paths.
fn bare(peer: &PeerConfig) -> PeerConfig {
    PeerConfig {
        paths: Vec::new(),
        ..peer.clone()
    }
}

/// What must stay the same for a peer to keep running (routes change in place).
/// Keys change in place too ([`Gateway::set_keys`]).
fn restart_key(peer: &PeerConfig) -> PeerConfig {
    PeerConfig {
        routes: Vec::new(),
        // A key-pair peer's `key_file` is its handshake's pre-shared key,
        // read when the peer starts: a change restarts the peer.
        key_file: peer.key_file.clone().filter(|_| peer.public_key.is_some()),
        accept_key_file: None,
        sla: SlaConfig::default(),
        reorder_wait: None,
        ..bare(peer)
    }
}

impl Gateway {
    /// Brings the running gateway to `want`, touching only what differs.
    /// Returns what could not be done (empty: all of it was).
    async fn apply(&mut self, want: &Config, secrets: Secrets) -> Vec<String> {
        let mut plan = Plan {
            secrets,
            ..Plan::default()
        };
        let mut problems = Vec::new();
        // 1. Take out what goes away or changes.
        let mut doomed_peers = Vec::new();
        for mut peer in std::mem::take(&mut self.peers) {
            match want.peers.iter().find(|p| p.name == peer.config.name) {
                Some(w) if restart_key(w) == restart_key(&peer.config) => {
                    if w.reorder_wait != peer.config.reorder_wait {
                        plan.set_reorder_wait.push((peer.id, w.reorder_wait));
                        peer.config.reorder_wait = w.reorder_wait;
                    }
                    if w.routes != peer.config.routes {
                        self.update_routes(&mut peer, &w.routes, &mut problems)
                            .await;
                    }
                    let (keep, gone): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut peer.paths).into_iter().partition(|r| {
                            w.path(&r.config.name)
                                .is_some_and(|n| only_bfd_timers_differ(n, &r.config))
                        });
                    peer.paths = keep;
                    for r in &mut peer.paths {
                        let Some(n) = w.path(&r.config.name) else {
                            continue;
                        };
                        if *n != r.config {
                            let b = &n.bfd;
                            plan.set_timers.push((
                                r.id,
                                b.tx_interval,
                                b.rx_interval,
                                b.multiplier,
                            ));
                            plan.set_sla.push((r.id, n.sla));
                            if n.rate != r.config.rate {
                                plan.set_rates.push((r.id, n.rate));
                            }
                            r.config = n.clone();
                        }
                    }
                    if !gone.is_empty() || peer.paths.len() != w.paths.len() {
                        peer.park();
                    }
                    for r in gone {
                        info!(peer = %w.name, path = %r.config.name, "reload: stopping path");
                        plan.remove_paths.push(r.id);
                        // Closes the path's sockets (they go with the lanes' ends).
                        for lane in &mut peer.parked {
                            let i = usize::from(r.id.0);
                            if let Some(slot) = lane.out.paths.get_mut(i) {
                                *slot = None;
                            }
                            if let Some(slot) = lane.ins.get_mut(i) {
                                *slot = None;
                            }
                        }
                    }
                    self.peers.push(peer);
                }
                _ => {
                    info!(peer = %peer.config.name, "reload: stopping peer");
                    plan.remove_peers.push(peer.id);
                    doomed_peers.push(peer);
                }
            }
        }
        for mut peer in doomed_peers {
            peer.stop();
        }
        // 2. Open what is new.
        let mut pending = Vec::new();
        for w in &want.peers {
            let running = self.peers.iter().position(|p| p.config.name == w.name);
            let index = match running {
                Some(i) => i,
                None => match self.open_peer(w).await {
                    Ok(peer) => {
                        match keys::handshake(&want.gateway, w, clock::now()) {
                            Ok(Some(h)) => {
                                plan.add_handshakes
                                    .push((w.name.clone(), h, peer.keys.clone()));
                            }
                            Ok(None) => {}
                            Err(e) => {
                                problems.push(e);
                                continue;
                            }
                        }
                        plan.add_peers.push(bare(w));
                        plan.add_tuns
                            .push((w.name.clone(), peer.tun.clone(), peer.fast.clone()));
                        plan.add_reorder
                            .push((w.name.clone(), peer.reorder.clone()));
                        self.peers.push(peer);
                        self.peers.len() - 1
                    }
                    Err(e) => {
                        problems.push(format!("peer {}: {e}", w.name));
                        continue;
                    }
                },
            };
            let peer = &mut self.peers[index];
            for path in &w.paths {
                if peer.paths.iter().any(|r| r.config.name == path.name) {
                    continue;
                }
                match open_path(&w.name, path, want, peer.lanes) {
                    Ok((p, bfd_tx)) => {
                        peer.park();
                        let Some(data_tx) = p.sockets.first().cloned() else {
                            problems.push(format!("peer {} path {}: no socket", w.name, path.name));
                            continue;
                        };
                        plan.add_paths.push(NewPath {
                            peer: w.name.clone(),
                            config: path.clone(),
                            bfd_tx,
                            data_tx,
                            counters: p.counters.clone(),
                        });
                        pending.push(p);
                    }
                    Err(e) => problems.push(format!("peer {} path {}: {e}", w.name, path.name)),
                }
            }
        }
        problems.extend(self.set_keys(want).await);
        self.plan_rx(want, &mut plan, &mut problems);
        // 3. Tell the control plane, then start the threads.
        let Some(applied) = self.shared.commands.apply(plan).await else {
            problems.push("the BFD thread is gone".into());
            return problems;
        };
        for (name, id) in applied.peers {
            if let Some(peer) = self.peers.iter_mut().find(|p| p.config.name == name) {
                peer.id = id;
            }
        }
        for p in pending {
            let id = applied
                .paths
                .iter()
                .find(|(peer, path, _)| *peer == p.peer && *path == p.config.name)
                .map(|(_, _, id)| *id);
            match id {
                Some(id) => self.start_path(p, id),
                None => problems.push(format!("path {} was not added", p.config.name)),
            }
        }
        self.peers.retain(|p| p.id != UNASSIGNED);
        for peer in &mut self.peers {
            if let Err(e) = peer.unpark() {
                problems.push(format!("peer {}: {e}", peer.config.name));
            }
        }
        self.watch_links();
        problems
    }

    /// (Re)reads every peer's key files and gives the keys to its threads;
    /// a peer whose files do not load keeps the keys it has. Sealed
    /// traffic starts only once this run's epoch second is over, so that
    /// no later run can reuse it (see [`crate::core::crypto`]).
    async fn set_keys(&mut self, want: &Config) -> Vec<String> {
        let mut problems = Vec::new();
        if want
            .peers
            .iter()
            .any(|p| p.key_file.is_some() && p.public_key.is_none())
        {
            let settled = Duration::from_secs(u64::from(self.shared.epoch) + 1);
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            if let Some(wait) = settled.checked_sub(unix) {
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            }
        }
        for peer in &mut self.peers {
            let Some(w) = want.peers.iter().find(|w| w.name == peer.config.name) else {
                continue;
            };
            if w.public_key.is_some() {
                // Session keys come from the handshake (the BFD thread's);
                // a new peer starts with none.
                if peer.keys.load().is_none() {
                    peer.keys
                        .store(Some(Arc::new(crate::core::crypto::Keys::sessions(
                            None,
                            &[],
                        ))));
                }
                continue;
            }
            match keys::load(w) {
                Ok(k) => {
                    let was = peer.keys.load().is_some();
                    if was != k.is_some() {
                        info!(peer = %w.name, encrypted = k.is_some(), "data-plane keys changed");
                    }
                    peer.keys.store(k.map(Arc::new));
                    peer.config.key_file.clone_from(&w.key_file);
                    peer.config.accept_key_file.clone_from(&w.accept_key_file);
                }
                Err(e) => problems.push(e),
            }
        }
        problems
    }

    /// Tells the carrier and address watch which paths run now.
    fn watch_links(&self) {
        let Some(links) = &self.links else {
            return;
        };
        let paths = self
            .peers
            .iter()
            .flat_map(|peer| peer.paths.iter())
            .map(|r| WatchedPath {
                id: r.id,
                name: r.config.name.clone(),
                interface: r.config.interface.clone(),
                local: r.config.local.ip(),
            })
            .collect();
        links.set_paths(paths);
    }

    /// Adds the routes a reload added to a running peer, and deletes the
    /// ones it removed; the TUN and its sessions stay as they are.
    async fn update_routes(
        &self,
        peer: &mut PeerRun,
        want: &[crate::config::Prefix],
        problems: &mut Vec<String>,
    ) {
        let nl = &self.shared.netlink;
        for r in want.iter().filter(|r| !peer.config.routes.contains(r)) {
            match nl
                .add_route(peer.ifindex, r, peer.config.route_metric)
                .await
            {
                Ok(()) => info!(peer = %peer.config.name, route = %r, "reload: route added"),
                Err(e) => problems.push(format!("peer {}: {e}", peer.config.name)),
            }
        }
        for r in peer.config.routes.iter().filter(|r| !want.contains(r)) {
            match nl
                .del_route(peer.ifindex, r, peer.config.route_metric)
                .await
            {
                Ok(()) => info!(peer = %peer.config.name, route = %r, "reload: route removed"),
                Err(e) => problems.push(format!("peer {}: {e}", peer.config.name)),
            }
        }
        peer.config.routes = want.to_vec();
    }

    /// Opens a new peer's TUN with its addresses and routes.
    async fn open_peer(&self, w: &PeerConfig) -> io::Result<PeerRun> {
        let mtu = w.mtu.unwrap_or_else(|| default_mtu(w));
        let queues = tun::open(&w.tun, mtu, lanes::lanes_wanted())?;
        let queues: Vec<Arc<SyncDevice>> = queues.into_iter().map(Arc::new).collect();
        let Some(dev) = queues.first().cloned() else {
            return Err(io::Error::other("TUN opened without a queue"));
        };
        // A leftover persistent device of this name goes away with us too.
        if let Err(e) = sys::clear_tun_persist(dev.as_ref()) {
            warn!(tun = %w.tun, error = %e, "could not clear the TUN's persist flag");
        }
        let index = dev.if_index()?;
        for a in &w.tun_addresses {
            self.shared.netlink.add_address(index, a).await?;
        }
        for r in &w.routes {
            self.shared
                .netlink
                .add_route(index, r, w.route_metric)
                .await?;
        }
        // No path is up yet: carrier off until the first one is (cloud failover).
        if let Err(e) = sys::set_tun_carrier(dev.as_ref(), false) {
            warn!(tun = %w.tun, error = %e, "could not turn TUN carrier off");
        }
        info!(peer = %w.name, tun = %w.tun, mtu, routes = w.routes.len(), lanes = queues.len(), "TUN up");
        let fast = match w.fast_path {
            false => None,
            true => match FastPath::attach(index) {
                Ok(f) => {
                    info!(peer = %w.name, tun = %w.tun, "fast path attached to the TUN's egress");
                    Some(Arc::new(f))
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "fast_path: could not attach the BPF program to {} (needs Linux 6.6 or later, and CAP_BPF and CAP_NET_ADMIN): {e}",
                            w.tun
                        ),
                    ))
                }
            },
        };
        let keys = SharedKeys::default();
        let instance = (mix(self.shared.stamp_key ^ clock::nanos() ^ 0x6475_706c) >> 32) as u32;
        let peer_sequence = Arc::new(AtomicU64::new(0));
        let reorder_counters = Arc::new(ReorderCounters::default());
        let doorbell = Arc::new(Doorbell::new()?);
        let claims = Arc::new(FlowClaims::new(queues.len()));
        let parked = queues
            .iter()
            .enumerate()
            .map(|(lane, queue)| Lane {
                out: TunOut {
                    peer: UNASSIGNED,
                    lane,
                    tun: queue.clone(),
                    forwarding: self.shared.forwarding.clone(),
                    paths: Vec::new(),
                    drops: self.shared.drops.clone(),
                    flows: FlowTable::new(lane, claims.clone()),
                    keys: keys.clone(),
                    epoch: self.shared.epoch,
                    commands: self.shared.commands.clone(),
                    instance,
                    peer_sequence: peer_sequence.clone(),
                    scheduler: Scheduler::new(),
                    lane_sequence: 0,
                },
                ins: Vec::new(),
                doorbell: doorbell.clone(),
                reorder: Arc::new(Mutex::new(LaneReorder::new(reorder_counters.clone()))),
            })
            .collect();
        Ok(PeerRun {
            keys,
            id: UNASSIGNED,
            mtu,
            config: bare(w),
            tun: dev,
            ifindex: index,
            lanes: queues.len(),
            running: Vec::new(),
            parked,
            paths: Vec::new(),
            dedup: Arc::new(Mutex::new(Window::new())),
            reorder: reorder_counters,
            fast,
        })
    }

    /// BFD receive sockets: one per local address in use.
    fn plan_rx(&mut self, want: &Config, plan: &mut Plan, problems: &mut Vec<String>) {
        let paths: Vec<&PathConfig> = want.peers.iter().flat_map(|p| p.paths.iter()).collect();
        let mut wanted: Vec<IpAddr> = paths.iter().map(|p| p.local.ip()).collect();
        wanted.sort();
        wanted.dedup();
        plan.remove_rx = self
            .rx_ips
            .iter()
            .filter(|ip| !wanted.contains(ip))
            .copied()
            .collect();
        self.rx_ips.retain(|ip| wanted.contains(ip));
        for ip in wanted {
            if self.rx_ips.contains(&ip) {
                continue;
            }
            let on_ip: Vec<_> = paths.iter().filter(|p| p.local.ip() == ip).collect();
            let Some(first) = on_ip.first() else {
                continue;
            };
            let same_if = on_ip.iter().all(|q| q.interface == first.interface);
            let ifname = if same_if {
                first.interface.as_deref()
            } else {
                None
            };
            match udp::bfd_rx_socket(ip, first.bfd.hop, ifname) {
                Ok(sock) => {
                    plan.add_rx.push((ip, sock));
                    self.rx_ips.push(ip);
                }
                Err(e) => problems.push(format!("BFD socket on {ip}: {e}")),
            }
        }
    }

    /// Gives a new path's sockets to its peer's (parked) lanes.
    fn start_path(&mut self, p: Pending, id: PathId) {
        let Some(peer) = self.peers.iter_mut().find(|r| r.config.name == p.peer) else {
            return;
        };
        let rtt = self
            .shared
            .metrics
            .path(usize::from(id.0))
            .map_or_else(::metrics::Histogram::noop, |m| m.rtt.clone());
        let sequence = Arc::new(AtomicU64::new(0));
        let window = Arc::new(Mutex::new(ReplayWindow::default()));
        let i = usize::from(id.0);
        // A large probe is as long as the path's largest data datagram.
        let header = match peer.config.policy {
            Policy::Duplicate | Policy::Aggregate => overlay::MAX_LEN,
            _ => overlay::BASE_LEN,
        };
        let large_probe = usize::from(peer.mtu) + header;
        for lane in &mut peer.parked {
            let k = lane.out.lane;
            let Some(socket) = p.sockets.get(k).or(p.sockets.first()) else {
                continue;
            };
            let slots = i + 1;
            if lane.out.paths.len() < slots {
                lane.out.paths.resize_with(slots, || None);
            }
            if lane.ins.len() < slots {
                lane.ins.resize_with(slots, || None);
            }
            lane.out.paths[i] = Some(PathOut {
                id,
                socket: socket.clone(),
                remote: p.config.remote,
                counters: p.counters.clone(),
                sequence: sequence.clone(),
                salt: crypto::path_salt(p.config.local, p.config.remote),
                last_error_report: None,
                flows_counted: 0,
                dscp: p.config.dscp.fixed(),
            });
            // A path with one socket is read by lane 0 only.
            if p.sockets.get(k).is_none() {
                continue;
            }
            lane.ins[i] = Some(PathIn {
                socket: socket.clone(),
                remote: p.config.remote,
                tun: lane.out.tun.clone(),
                counters: p.counters.clone(),
                drops: self.shared.drops.clone(),
                id,
                prober: (k == 0).then(|| Prober::new(p.config.sla.probe_interval)),
                reflector: Reflector::default(),
                large_probe,
                probe_window: ReplayWindow::default(),
                pending: (0, 0, 0),
                commands: self.shared.commands.clone(),
                rtt: rtt.clone(),
                keys: peer.keys.clone(),
                epoch: self.shared.epoch,
                salt_out: crypto::path_salt(p.config.local, p.config.remote),
                salt_in: crypto::path_salt(p.config.remote, p.config.local),
                window: window.clone(),
                echo_guard: EchoGuard::default(),
                handshake_bucket: crate::core::handshake::TokenBucket::new(
                    lanes::HANDSHAKE_RATE,
                    lanes::HANDSHAKE_RATE,
                ),
                dedup: peer.dedup.clone(),
                reorder: lane.reorder.clone(),
                forwarding: None,
            });
        }
        peer.paths.push(PathRun {
            id,
            config: p.config,
        });
    }

    /// Stops every thread and closes every TUN (which removes its routes).
    fn stop_all(&mut self) {
        for mut peer in std::mem::take(&mut self.peers) {
            peer.stop();
        }
    }
}

/// Not yet given an id by the engine.
const UNASSIGNED: PeerId = PeerId(u16::MAX);

/// Opens a path's data sockets (one per lane, sharing the port, each
/// receiving the datagrams that name its lane; one only, read by lane 0,
/// where the kernel cannot steer by lane) and BFD transmit socket.
fn open_path(
    peer: &str,
    p: &PathConfig,
    want: &Config,
    lanes: usize,
) -> io::Result<(Pending, UdpSocket)> {
    let sockets = match udp::data_sockets(p.local, p.interface.as_deref(), lanes) {
        Ok(s) => s,
        Err(e) if lanes > 1 => {
            warn!(peer, path = %p.name, error = %e, "no socket per lane; lane 0 receives the path");
            udp::data_sockets(p.local, p.interface.as_deref(), 1)?
        }
        Err(e) => return Err(e),
    };
    let index = want
        .peers
        .iter()
        .flat_map(|q| q.paths.iter())
        .position(|q| q.local == p.local)
        .unwrap_or(0);
    let seed = (std::process::id() as u16).wrapping_add((index as u16).wrapping_mul(7919));
    for s in &sockets {
        udp::set_data_qos(s, p.dscp.fixed())?;
    }
    let bfd_tx = udp::bfd_tx_socket(p.local.ip(), p.interface.as_deref(), seed, p.bfd.dscp)?;
    let pending = Pending {
        peer: peer.to_string(),
        config: p.clone(),
        sockets: sockets.into_iter().map(Arc::new).collect(),
        counters: Arc::default(),
    };
    Ok((pending, bfd_tx))
}

impl PeerRun {
    /// Stops the lanes and keeps their state for a restart.
    fn park(&mut self) {
        for lane in &self.running {
            let _ = lane.doorbell.ring();
        }
        for lane in std::mem::take(&mut self.running) {
            if let Ok(l) = lane.thread.join() {
                self.parked.push(l);
            }
        }
    }

    /// (Re)starts the lanes from their parked state.
    fn unpark(&mut self) -> io::Result<()> {
        if self.parked.is_empty() {
            return Ok(());
        }
        let doorbell = Arc::new(Doorbell::new()?);
        for mut lane in std::mem::take(&mut self.parked) {
            lane.doorbell = doorbell.clone();
            lane.out.peer = self.id;
            for p in lane.ins.iter_mut().flatten() {
                p.forwarding = Some((lane.out.forwarding.clone(), self.id));
            }
            let name = format!("fwd{}-{}", lane.out.lane, self.config.name);
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || lane.run())?;
            self.running.push(LaneRun {
                thread,
                doorbell: doorbell.clone(),
            });
        }
        Ok(())
    }

    /// Stops every thread of the peer; dropping it then closes the TUN.
    fn stop(&mut self) {
        self.park();
        self.parked.clear();
    }
}
