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
//!
//! `crosslink upgrade` ([`super::upgrade`]) builds a new process's gateway
//! the same way, from what the old process handed over: `apply` takes an
//! inherited TUN or socket where one fits instead of opening one.

use super::control_plane::{BfdThread, CommandLink, CommandQueue, Frozen, Meta, NewPath, Plan};
use super::fastpath::FastPath;
use super::lanes::{
    self, FlowClaims, FlowTable, Lane, LaneReorder, Paced, PathIn, PathOut, Serving, SharedKeys,
    Stopping, TunOut, Workers,
};
use super::linkwatch::{self, LinkWatch, WatchedPath};
use super::tun::Queue as SyncDevice;
use super::upgrade::{self, Incoming, Inheritance, PathData, PeerData, Reply, Takeover};
use super::{clock, keys, netlink::Netlink, notify, sys, tun, udp};
use crate::config::{
    Config, ConfigError, FecConfig, FecMode, PathConfig, PeerConfig, Policy, SlaConfig,
};
use crate::core::aggregate::{Scheduler, PACE_QUEUE};
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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

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
    let fec = w.fec.mode != crate::config::FecMode::Off;
    let fits = w
        .paths
        .iter()
        .map(|p| {
            let underlay = sys::route_mtu(p.local, p.remote).unwrap_or_else(|e| {
                warn!(path = %p.name, error = %e, "no route MTU; assuming {FALLBACK_UNDERLAY_MTU}");
                FALLBACK_UNDERLAY_MTU
            });
            forward::inner_mtu(underlay, p.remote.is_ipv6(), extended, sealed, fec)
        })
        .min()
        .unwrap_or_else(|| forward::inner_mtu(FALLBACK_UNDERLAY_MTU, true, extended, sealed, fec));
    let floor = if w.has_ipv6() { 1280 } else { 576 };
    if fits < floor {
        warn!(peer = %w.name, fits, floor, "the paths' MTU leaves less than the minimum inner MTU; inner packets above {fits} bytes will be fragmented on the underlay");
    }
    u16::try_from(fits.max(floor)).unwrap_or(u16::MAX)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<(), DaemonError> {
    sys::keep_big_allocations_lazy();
    // Started by `crosslink upgrade` to take over from a running daemon?
    let incoming = Incoming::from_env()
        .map_err(|e| DaemonError::Setup(format!("taking over from the running daemon: {e}")))?;
    let answer = incoming.as_ref().and_then(|i| i.stream.try_clone().ok());
    let result = run_with(config_path, incoming);
    if let (Err(e), Some(stream)) = (&result, answer) {
        // The old process is still serving; it reports this to the operator.
        let _ = upgrade::write_message(
            &stream,
            &Reply::Failed {
                version: upgrade::OLDEST,
                error: e.to_string(),
            },
        );
    }
    result
}

fn run_with(config_path: &Path, incoming: Option<Incoming>) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    refuse_unsupported(&config)?;
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let secrets = read_secrets(&config)?;
    if let Err(e) = super::sys::lock_memory() {
        tracing::warn!(error = %e, "could not lock memory (needs CAP_IPC_LOCK); paging may delay BFD");
    }
    // Before the runtime's threads run: reading LISTEN_* clears them.
    let stored = match incoming {
        None => Inherited::from_fd_store(&config),
        Some(_) => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("crosslink-rt")
        .enable_all()
        .build()?;
    rt.block_on(run_async(
        config,
        secrets,
        config_path.to_path_buf(),
        incoming,
        stored,
    ))
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
        // And the BFD receive offload (armed again by the next packet).
        p.bfd.offload = false;
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
    /// Its data sockets' and BFD transmit socket's descriptors (the
    /// sockets are the lanes' and the BFD thread's), for an upgrade.
    data_fds: Vec<RawFd>,
    bfd_fd: RawFd,
}

/// A running peer: its TUN, forwarding lanes and paths.
struct PeerRun {
    id: PeerId,
    config: PeerConfig,
    /// The TUN's MTU.
    mtu: u16,
    /// The TUN's first queue (the device).
    tun: Arc<SyncDevice>,
    /// Every queue, the first included (one per lane).
    queues: Vec<Arc<SyncDevice>>,
    ifindex: u32,
    /// How many lanes (TUN queues) the peer has.
    lanes: usize,
    /// Its lanes being served by the forwarding workers.
    running: Vec<Serving>,
    /// The forwarding workers.
    workers: Arc<Workers>,
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
    /// The forwarding threads, serving every peer's lanes.
    workers: Arc<Workers>,
    /// Local addresses with a BFD receive socket (in the BFD thread), and
    /// the socket's descriptor.
    rx_ips: Vec<(IpAddr, RawFd)>,
    /// What an upgrade handed over and is not in use yet.
    inherited: Option<Inherited>,
    /// Paths (peer, path) running on handed-over sockets.
    adopted: Vec<(String, String)>,
    /// Lanes stay parked after [`Gateway::apply`] (a process taking over).
    hold_lanes: bool,
    /// What is in systemd's descriptor store: name, descriptor, identity
    /// (see [`Gateway::store_tuns`]).
    stored: Vec<(String, RawFd, u64)>,
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
    bfd_fd: RawFd,
}

async fn run_async(
    config: Config,
    secrets: Secrets,
    config_path: PathBuf,
    incoming: Option<Incoming>,
    stored: Option<Inherited>,
) -> Result<(), DaemonError> {
    // The binary to start on an upgrade, unless told otherwise: this one's
    // path as it is now (once the file is replaced, /proc/self/exe names
    // the old, deleted one).
    let own_binary = std::env::current_exe().ok();
    let mut inherited = match &incoming {
        Some(i) => Some(Inherited::take(&i.inheritance)?),
        // A restart by systemd: the TUNs it kept for us.
        None => stored,
    };
    // First of all, so that a second daemon with this configuration stops
    // here, before it touches the TUNs and sockets of the running one.
    let control_path = config.gateway.control_socket.clone();
    let listener = match inherited
        .as_mut()
        .and_then(|i| i.take_control(&control_path))
    {
        Some(fd) => {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)?
        }
        None => control::bind(&control_path)?,
    };
    let control_fd = listener.as_raw_fd();
    let endpoint = match &config.metrics {
        Some(m) => {
            let handed = inherited.as_mut().and_then(|i| i.take_metrics(m.listen));
            Some(metrics::install(m.listen, handed).map_err(DaemonError::Setup)?)
        }
        None => None,
    };
    let metrics_fd = endpoint
        .as_ref()
        .zip(config.metrics.as_ref())
        .map(|(e, m)| (m.listen, e.listener_fd()));
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
        // A process taking over waits for the old one's sessions.
        held: incoming.is_some(),
        data_tx: Vec::new(),
        peer_keys: Vec::new(),
        offload: crate::io::bfd_offload::prepare(&config),
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
            // After the old process's (a sealed nonce is never reused).
            epoch: (clock::unix_seconds(now) as u32).max(
                incoming
                    .as_ref()
                    .map_or(0, |i| i.inheritance.epoch.saturating_add(1)),
            ),
        },
        peers: Vec::new(),
        // As many workers as a peer has lanes by default: one per CPU.
        workers: Arc::new(Workers::start(lanes::lanes_wanted())?),
        rx_ips: Vec::new(),
        hold_lanes: incoming.is_some(),
        // What systemd holds for us: taken out at the first store (see
        // `Inherited::store_names`).
        stored: match (&incoming, &inherited) {
            (Some(i), _) => i.inheritance.stored.clone(),
            (None, Some(i)) => i.store_names.clone(),
            (None, None) => Vec::new(),
        }
        .into_iter()
        .map(|n| (n, -1, 0))
        .collect(),
        inherited,
        adopted: Vec::new(),
        links: match linkwatch::spawn(commands.clone()).await {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "no carrier/address watch; failures are detected by BFD only");
                None
            }
        },
    };
    let problems = gw.apply(&config, secrets).await;
    // What the configuration no longer has is closed (the old process's
    // copies close with it).
    gw.inherited = None;
    // Starting many peers allocates and frees much (each path added
    // restarts its peer's lanes).
    sys::give_back_freed_memory();
    if !problems.is_empty() {
        if incoming.is_some() {
            // Nothing was sent on the handed-over sockets; the old process
            // still serves, and the TUNs, routes and socket file are its.
            return Err(DaemonError::Setup(problems.join("; ")));
        }
        commands.shutdown().await;
        let _ = bfd_handle.join();
        gw.stop_all();
        let _ = std::fs::remove_file(&control_path);
        return Err(DaemonError::Setup(problems.join("; ")));
    }
    if let Some(incoming) = incoming {
        take_over(&mut gw, incoming)
            .await
            .map_err(|e| DaemonError::Setup(format!("taking over: {e}")))?;
    }

    // Metrics, control socket.
    let status_link = commands.clone();
    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::channel(1);
    let control_task = tokio::spawn(control::serve(
        listener,
        move || {
            let link = status_link.clone();
            async move { link.status().await }
        },
        Some(upgrade_tx),
    ));
    let sync_metrics = metrics.clone();
    let sync_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            sync_metrics.sync(&drops);
        }
    });
    if let (Some(endpoint), Some(m)) = (endpoint, &config.metrics) {
        endpoint.serve(metrics.clone());
        info!(listen = %m.listen, "metrics endpoint up");
    }
    let watchdog_task = notify::watchdog_interval().map(|every| {
        let link = commands.clone();
        tokio::spawn(watchdog(link, every))
    });
    info!(gateway = %config.gateway.name, control = %control_path.display(), "crosslink running");
    notify_systemd("READY=1");
    gw.store_tuns();

    // Signals.
    let mut running = config;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut handed_over = false;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(req) = upgrade_rx.recv() => {
                let req: control::UpgradeRequest = req;
                let Some(binary) = req.binary.clone().or_else(|| own_binary.clone()) else {
                    let _ = req.reply.send(Err("cannot tell this binary's path; give --binary".into()));
                    continue;
                };
                info!(binary = %binary.display(), "upgrade: starting the new process");
                let listeners = Listeners {
                    control: (control_path.clone(), control_fd),
                    metrics: metrics_fd,
                };
                match hand_over(&mut gw, &binary, listeners).await {
                    Ok(done) => {
                        info!(pid = done.pid, handover_ms = done.handover.as_secs_f64() * 1e3, "upgrade: the new process serves; exiting");
                        let _ = req.reply.send(Ok((done.pid, done.handover)));
                        handed_over = true;
                        break;
                    }
                    Err(e) => {
                        error!(error = %e, "upgrade failed; still serving");
                        let _ = req.reply.send(Err(e));
                    }
                }
            }
            _ = hup.recv() => {
                notify_systemd("RELOADING=1");
                if let Some(new) = reload(&config_path, &running, &mut gw).await {
                    running = new;
                }
                gw.store_tuns();
                notify_systemd("READY=1");
            }
        }
    }

    if handed_over {
        // What the lanes held for their paced paths goes out at its time
        // (the new process's pace for each path starts after it).
        blocking(|| gw.send_held());
        // The answer to `crosslink upgrade` is on its way from the control
        // task; then go without a word: the sessions, TUNs, routes and
        // socket file are the new process's now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        control_task.abort();
        sync_task.abort();
        if let Some(t) = watchdog_task {
            t.abort();
        }
        return Ok(());
    }
    // A clean stop removes the TUNs: systemd must not keep them.
    gw.unstore_tuns();
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
        let answer = tokio::time::timeout(every / 4, link.ping()).await;
        if matches!(answer, Ok(true)) {
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
                "reload: this section changes only at restart or `crosslink upgrade`"
            );
        }
    }
    let problems = gw.apply(&new, secrets).await;
    sys::give_back_freed_memory();
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
        // in place, but for FEC's turning on or off: the TUN's MTU
        // leaves room for parity only when it is on
        fec: match peer.fec.mode {
            FecMode::Off => FecConfig::off(),
            _ => FecConfig {
                mode: FecMode::Auto,
                ..FecConfig::default()
            },
        },
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
                    if w.fec != peer.config.fec {
                        plan.set_fec.push((peer.id, w.fec));
                        peer.config.fec = w.fec;
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
                            if n.bfd.offload != r.config.bfd.offload {
                                plan.set_offload.push((r.id, n.bfd.offload));
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
                            lane.out.paths.retain(|o| o.id != r.id);
                            lane.ins.retain(|i| i.id != r.id);
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
            for path in &w.paths {
                let lanes = self.peers[index].lanes;
                if self.peers[index]
                    .paths
                    .iter()
                    .any(|r| r.config.name == path.name)
                {
                    continue;
                }
                let handed = self
                    .inherited
                    .as_mut()
                    .and_then(|i| i.take_path(&w.name, path));
                let opened = match handed {
                    Some(h) => {
                        info!(peer = %w.name, path = %path.name, sockets = h.data.len(), "path sockets taken over");
                        self.adopted.push((w.name.clone(), path.name.clone()));
                        Ok(h.into_pending(&w.name, path))
                    }
                    None => open_path(&w.name, path, want, lanes),
                };
                let peer = &mut self.peers[index];
                match opened {
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
        for peer in self.peers.iter_mut().filter(|_| !self.hold_lanes) {
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
                tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
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
    async fn open_peer(&mut self, w: &PeerConfig) -> io::Result<PeerRun> {
        let handed = self.inherited.as_mut().and_then(|i| i.take_peer(w));
        if let Some(h) = handed {
            return self.adopt_peer(w, h).await;
        }
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
        self.peer_run(w, queues, mtu, index)
    }

    /// A peer on a TUN handed over by an upgrade: its addresses are there,
    /// and its routes are those of the old configuration, brought to this
    /// one's in place; its carrier is left as it is.
    async fn adopt_peer(&mut self, w: &PeerConfig, h: InheritedPeer) -> io::Result<PeerRun> {
        let (mtu, index) = (h.meta.mtu, h.meta.ifindex);
        let queues: Vec<Arc<SyncDevice>> = h
            .queues
            .into_iter()
            .map(|fd| Arc::new(SyncDevice::adopt(fd, h.meta.offload, mtu, index)))
            .collect();
        if w.mtu.is_some_and(|m| m != mtu) {
            warn!(peer = %w.name, mtu, "upgrade: the TUN keeps its MTU; a new `mtu` applies at the next restart");
        }
        let nl = &self.shared.netlink;
        let had: Vec<crate::config::Prefix> = h
            .meta
            .routes
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect();
        for r in had
            .iter()
            .filter(|r| !w.routes.contains(r) || h.meta.route_metric != w.route_metric)
        {
            if let Err(e) = nl.del_route(index, r, h.meta.route_metric).await {
                warn!(peer = %w.name, route = %r, error = %e, "upgrade: could not remove a route");
            }
        }
        for r in w
            .routes
            .iter()
            .filter(|r| !had.contains(r) || h.meta.route_metric != w.route_metric)
        {
            nl.add_route(index, r, w.route_metric).await?;
        }
        if h.restarted {
            // Kept by systemd while no process ran: its sessions start over.
            if let Some(q) = queues.first() {
                if let Err(e) = sys::set_tun_carrier(q.as_ref(), false) {
                    warn!(tun = %w.tun, error = %e, "could not turn TUN carrier off");
                }
            }
        }
        info!(peer = %w.name, tun = %w.tun, mtu, lanes = queues.len(), from_fd_store = h.restarted, "TUN taken over");
        self.peer_run(w, queues, mtu, index)
    }

    /// The running peer on its TUN's queues (lanes parked, paths to come).
    fn peer_run(
        &self,
        w: &PeerConfig,
        queues: Vec<Arc<SyncDevice>>,
        mtu: u16,
        index: u32,
    ) -> io::Result<PeerRun> {
        let Some(dev) = queues.first().cloned() else {
            return Err(io::Error::other("TUN without a queue"));
        };
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
                    fec: None,
                    fec_out: Vec::new(),
                    fec_last_path: None,
                    fec_counters: reorder_counters.clone(),
                    gso_cap: usize::MAX,
                    paced: Paced::default(),
                    pace_after: Vec::new(),
                },
                ins: Vec::new(),
                reorder: Arc::new(Mutex::new(LaneReorder::new(reorder_counters.clone()))),
            })
            .collect();
        Ok(PeerRun {
            keys,
            id: UNASSIGNED,
            mtu,
            config: bare(w),
            tun: dev,
            queues: queues.clone(),
            ifindex: index,
            lanes: queues.len(),
            running: Vec::new(),
            workers: self.workers.clone(),
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
            .map(|(ip, _)| *ip)
            .filter(|ip| !wanted.contains(ip))
            .collect();
        self.rx_ips.retain(|(ip, _)| wanted.contains(ip));
        for ip in wanted {
            if self.rx_ips.iter().any(|(have, _)| *have == ip) {
                continue;
            }
            if let Some(fd) = self.inherited.as_mut().and_then(|i| i.take_rx(ip)) {
                let sock = UdpSocket::from(fd);
                self.rx_ips.push((ip, sock.as_raw_fd()));
                plan.add_rx.push((ip, sock));
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
                    self.rx_ips.push((ip, sock.as_raw_fd()));
                    plan.add_rx.push((ip, sock));
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
            .map_or_else(crate::telemetry::metrics::Histogram::detached, |m| {
                m.rtt.clone()
            });
        let sequence = Arc::new(AtomicU64::new(0));
        let window = Arc::new(Mutex::new(ReplayWindow::default()));
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
            lane.out.paths.retain(|o| o.id != id);
            lane.ins.retain(|i| i.id != id);
            lane.out.paths.push(PathOut {
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
            lane.ins.push(PathIn {
                socket: socket.clone(),
                siblings: p
                    .sockets
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != k)
                    .map(|(_, s)| s.clone())
                    .collect(),
                settled: None,
                in_turn: false,
                remote: p.config.remote,
                tun: lane.out.tun.clone(),
                counters: p.counters.clone(),
                drops: self.shared.drops.clone(),
                id,
                prober: (k == 0).then(|| {
                    Prober::new(p.config.sla.probe_interval)
                        .with_idle_interval(p.config.sla.idle_probe_interval)
                }),
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
                parity_in: Vec::new(),
                handshake_bucket: crate::core::handshake::TokenBucket::new(
                    lanes::HANDSHAKE_RATE,
                    lanes::HANDSHAKE_RATE,
                ),
                dedup: peer.dedup.clone(),
                reorder: lane.reorder.clone(),
                forwarding: None,
                fast: peer.fast.clone(),
            });
        }
        peer.paths.push(PathRun {
            id,
            config: p.config,
            data_fds: p.sockets.iter().map(|s| s.as_raw_fd()).collect(),
            bfd_fd: p.bfd_fd,
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
        bfd_fd: bfd_tx.as_raw_fd(),
    };
    Ok((pending, bfd_tx))
}

impl PeerRun {
    /// Stops the lanes and keeps their state for a restart.
    fn park(&mut self) {
        let stopping = self.park_begin();
        self.park_end(stopping);
    }

    /// Asks the workers for the lanes back (see [`PeerRun::park_end`]).
    fn park_begin(&mut self) -> Vec<Stopping> {
        std::mem::take(&mut self.running)
            .into_iter()
            .map(Serving::stop)
            .collect()
    }

    /// Keeps the lanes given back, for a restart.
    fn park_end(&mut self, stopping: Vec<Stopping>) {
        for s in stopping {
            if let Some(l) = s.wait() {
                self.parked.push(l);
            }
        }
    }

    /// (Re)starts the lanes from their parked state.
    fn unpark(&mut self) -> io::Result<()> {
        for mut lane in std::mem::take(&mut self.parked) {
            lane.out.peer = self.id;
            for p in &mut lane.ins {
                p.forwarding = Some((lane.out.forwarding.clone(), self.id));
            }
            self.running.push(self.workers.serve(lane)?);
        }
        Ok(())
    }

    /// Stops every thread of the peer; dropping it then closes the TUN.
    fn stop(&mut self) {
        self.park();
        self.parked.clear();
    }
}

/// What an upgrade handed over, owned by this process, until the
/// gateway takes it into use ([`Gateway::apply`]); what is left is closed.
#[derive(Default)]
struct Inherited {
    control: Option<(PathBuf, OwnedFd)>,
    metrics: Option<(std::net::SocketAddr, OwnedFd)>,
    peers: Vec<InheritedPeer>,
    paths: Vec<(String, InheritedPath)>,
    rx: Vec<(IpAddr, OwnedFd)>,
    /// The names systemd passed descriptors under (a restart from its
    /// store): the first store of this process takes them all out before it
    /// puts in what it uses, so that no stale socket stays bound there.
    store_names: Vec<String>,
}

struct InheritedPeer {
    meta: upgrade::PeerFds,
    queues: Vec<OwnedFd>,
    /// From systemd's descriptor store after a crash, not from an upgrade.
    restarted: bool,
}

struct InheritedPath {
    meta: upgrade::PathFds,
    data: Vec<OwnedFd>,
    bfd_tx: OwnedFd,
}

impl Inherited {
    /// Owns every descriptor the [`Inheritance`] names; fails if one is not open.
    fn take(inh: &Inheritance) -> Result<Inherited, DaemonError> {
        let own = |fd: RawFd| {
            upgrade::inherited(fd).map_err(|e| DaemonError::Setup(format!("taking over: {e}")))
        };
        let mut out = Inherited::default();
        if let Some((path, fd)) = &inh.control {
            out.control = Some((path.clone(), own(*fd)?));
        }
        if let Some((addr, fd)) = &inh.metrics {
            out.metrics = Some((*addr, own(*fd)?));
        }
        for (ip, fd) in &inh.rx {
            out.rx.push((*ip, own(*fd)?));
        }
        for p in &inh.peers {
            let queues = p
                .queues
                .iter()
                .map(|fd| own(*fd))
                .collect::<Result<_, _>>()?;
            for path in &p.paths {
                let data = path
                    .data
                    .iter()
                    .map(|fd| own(*fd))
                    .collect::<Result<_, _>>()?;
                let bfd_tx = own(path.bfd_tx)?;
                out.paths.push((
                    p.name.clone(),
                    InheritedPath {
                        meta: path.clone(),
                        data,
                        bfd_tx,
                    },
                ));
            }
            let mut meta = p.clone();
            meta.paths.clear();
            out.peers.push(InheritedPeer {
                meta,
                queues,
                restarted: false,
            });
        }
        Ok(out)
    }

    /// The TUN queues and sockets systemd kept in the service's descriptor
    /// store (`FDSTORE=1`, see [`Gateway::store_tuns`]) and passed back at
    /// this start (`LISTEN_FDS`, `LISTEN_FDNAMES`), for the peers and paths
    /// of `config` they fit: a TUN by its device name, a path's sockets by
    /// the address they are bound to and their interface, a BFD receive
    /// socket by its address. Descriptors that fit nothing are closed.
    fn from_fd_store(config: &Config) -> Option<Inherited> {
        let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
        let count: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        if pid != std::process::id() || count <= 0 {
            return None;
        }
        let mut queues: Vec<(String, usize, OwnedFd)> = Vec::new();
        // (peer, path) -> data sockets by lane, BFD transmit socket
        let mut data: Vec<(String, String, usize, OwnedFd)> = Vec::new();
        let mut bfd: Vec<(String, String, OwnedFd)> = Vec::new();
        let mut out = Inherited::default();
        for (i, name) in (0..count).zip(names.split(':').chain(std::iter::repeat(""))) {
            let Ok(fd) = upgrade::inherited(3 + i) else {
                continue;
            };
            if !name.is_empty() && !out.store_names.iter().any(|n| n == name) {
                out.store_names.push(name.to_string());
            }
            let parts: Vec<&str> = name.split('/').collect();
            match parts.as_slice() {
                ["tun", tun, k] => {
                    if let Ok(k) = k.parse() {
                        queues.push((tun.to_string(), k, fd));
                    }
                }
                ["data", peer, path, k] => {
                    if let Ok(k) = k.parse() {
                        data.push((peer.to_string(), path.to_string(), k, fd));
                    }
                }
                ["bfd", peer, path] => bfd.push((peer.to_string(), path.to_string(), fd)),
                // (peer and path names as `store_label` writes them)
                ["rx", _] => {
                    if let Some(addr) = bound_to(&fd) {
                        out.rx.push((addr.ip(), fd));
                    }
                }
                _ => {}
            }
        }
        queues.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        data.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
        for w in &config.peers {
            for p in &w.paths {
                let (peer_label, path_label) = (store_label(&w.name), store_label(&p.name));
                let ours = |peer: &str, path: &str| peer == peer_label && path == path_label;
                let Some(b) = bfd.iter().position(|(peer, path, _)| ours(peer, path)) else {
                    continue;
                };
                let (_, _, bfd_tx) = bfd.swap_remove(b);
                let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut data)
                    .into_iter()
                    .partition(|(peer, path, _, _)| ours(peer, path));
                data = rest;
                let socks: Vec<OwnedFd> = mine.into_iter().map(|(_, _, _, fd)| fd).collect();
                // The same address and interface, or the path opens anew.
                let fits = !socks.is_empty()
                    && socks
                        .iter()
                        .all(|fd| bound_to(fd) == Some(p.local) && bound_device(fd) == p.interface);
                if !fits {
                    warn!(peer = %w.name, path = %p.name, "the stored sockets are bound elsewhere; opening new ones");
                    continue;
                }
                out.paths.push((
                    w.name.clone(),
                    InheritedPath {
                        meta: upgrade::PathFds {
                            name: p.name.clone(),
                            local: p.local,
                            remote: p.remote,
                            interface: p.interface.clone(),
                            data: Vec::new(),
                            bfd_tx: -1,
                        },
                        data: socks,
                        bfd_tx,
                    },
                ));
            }
            let mine: Vec<OwnedFd> = queues
                .iter()
                .position(|(t, _, _)| *t == w.tun)
                .map(|_| {
                    let (m, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut queues)
                        .into_iter()
                        .partition(|(t, _, _)| *t == w.tun);
                    queues = rest;
                    m.into_iter().map(|(_, _, fd)| fd).collect()
                })
                .unwrap_or_default();
            let Some(first) = mine.first() else {
                continue;
            };
            let info = sys::tun_info(first).and_then(|(dev, offload)| {
                let (mtu, ifindex) = sys::interface_mtu_index(&dev)?;
                Ok((dev, offload, mtu, ifindex))
            });
            match info {
                Ok((dev, offload, mtu, ifindex)) if dev == w.tun => out.peers.push(InheritedPeer {
                    meta: upgrade::PeerFds {
                        name: w.name.clone(),
                        tun: w.tun.clone(),
                        mtu,
                        ifindex,
                        offload,
                        queues: Vec::new(),
                        routes: w.routes.iter().map(ToString::to_string).collect(),
                        route_metric: w.route_metric,
                        paths: Vec::new(),
                    },
                    queues: mine,
                    restarted: true,
                }),
                Ok((dev, ..)) => {
                    warn!(tun = %w.tun, device = %dev, "the stored TUN is another device; not used")
                }
                Err(e) => warn!(tun = %w.tun, error = %e, "the stored TUN is unusable"),
            }
        }
        Some(out)
    }

    /// The control socket's listener, if it is still at `path`.
    fn take_control(&mut self, path: &Path) -> Option<OwnedFd> {
        match self.control.take() {
            Some((p, fd)) if p == path => Some(fd),
            _ => None,
        }
    }

    /// The metrics endpoint's listener, if it is still on `addr`.
    fn take_metrics(&mut self, addr: std::net::SocketAddr) -> Option<OwnedFd> {
        match self.metrics.take() {
            Some((a, fd)) if a == addr => Some(fd),
            _ => None,
        }
    }

    /// The peer's TUN, if the old process had it under the same TUN name.
    fn take_peer(&mut self, w: &PeerConfig) -> Option<InheritedPeer> {
        let i = self
            .peers
            .iter()
            .position(|p| p.meta.name == w.name && p.meta.tun == w.tun && !p.queues.is_empty())?;
        Some(self.peers.swap_remove(i))
    }

    /// The path's sockets, if the old process had it on the same addresses.
    fn take_path(&mut self, peer: &str, p: &PathConfig) -> Option<InheritedPath> {
        let i = self.paths.iter().position(|(owner, h)| {
            owner == peer
                && h.meta.name == p.name
                && h.meta.local == p.local
                && h.meta.remote == p.remote
                && h.meta.interface == p.interface
                && !h.data.is_empty()
        })?;
        Some(self.paths.swap_remove(i).1)
    }

    fn take_rx(&mut self, ip: IpAddr) -> Option<OwnedFd> {
        let i = self.rx.iter().position(|(have, _)| *have == ip)?;
        Some(self.rx.swap_remove(i).1)
    }
}

impl InheritedPath {
    /// The path to start, on its handed-over sockets (an older process's
    /// IPv6 data sockets taught to accept a zero UDP checksum, as new ones
    /// are).
    fn into_pending(self, peer: &str, p: &PathConfig) -> (Pending, UdpSocket) {
        let bfd_tx = UdpSocket::from(self.bfd_tx);
        let sockets: Vec<Arc<UdpSocket>> = self
            .data
            .into_iter()
            .map(|fd| Arc::new(UdpSocket::from(fd)))
            .collect();
        if p.local.is_ipv6() {
            for s in &sockets {
                if let Err(e) = sys::accept_zero_checksum_v6(s.as_ref()) {
                    warn!(peer, path = %p.name, error = %e, "upgrade: the data socket keeps refusing a zero UDP checksum");
                }
            }
        }
        let pending = Pending {
            peer: peer.to_string(),
            config: p.clone(),
            sockets,
            counters: Arc::default(),
            bfd_fd: bfd_tx.as_raw_fd(),
        };
        (pending, bfd_tx)
    }
}

/// The listeners an upgrade hands over, with what they listen on.
struct Listeners {
    control: (PathBuf, RawFd),
    metrics: Option<(std::net::SocketAddr, RawFd)>,
}

/// A handover that worked: the new process and how long nobody read.
#[derive(Clone, Copy, Debug)]
pub struct HandedOver {
    pub pid: u32,
    /// From this process's lanes stopping to the new one's answer that it
    /// serves (an upper bound of the time nobody read).
    pub handover: Duration,
}

impl Gateway {
    /// The descriptors to hand over, and what the new process must know of them.
    fn inheritance(&self, listeners: Listeners) -> Inheritance {
        Inheritance {
            version: upgrade::OLDEST,
            old_pid: std::process::id(),
            epoch: self.shared.epoch,
            control: Some(listeners.control),
            metrics: listeners.metrics,
            rx: self.rx_ips.clone(),
            stored: self.stored.iter().map(|s| s.0.clone()).collect(),
            peers: self
                .peers
                .iter()
                .map(|p| upgrade::PeerFds {
                    name: p.config.name.clone(),
                    tun: p.config.tun.clone(),
                    mtu: p.mtu,
                    ifindex: p.ifindex,
                    offload: p.tun.tcp_gso(),
                    queues: p.queues.iter().map(|q| q.as_raw_fd()).collect(),
                    routes: p.config.routes.iter().map(ToString::to_string).collect(),
                    route_metric: p.config.route_metric,
                    paths: p
                        .paths
                        .iter()
                        .map(|r| upgrade::PathFds {
                            name: r.config.name.clone(),
                            local: r.config.local,
                            remote: r.config.remote,
                            interface: r.config.interface.clone(),
                            data: r.data_fds.clone(),
                            bfd_tx: r.bfd_fd,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The data plane's counters and sequence numbers (lanes parked).
    fn export_data(&self) -> (Vec<PathData>, Vec<PeerData>) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = clock::now();
        let mut paths = Vec::new();
        let mut peers = Vec::new();
        for peer in &self.peers {
            let Some(lane) = peer.parked.first() else {
                continue;
            };
            peers.push(PeerData {
                name: peer.config.name.clone(),
                instance: lane.out.instance,
                sequence: lane.out.peer_sequence.load(Relaxed),
            });
            for r in &peer.paths {
                let Some(out) = lane.out.paths.iter().find(|o| o.id == r.id) else {
                    continue;
                };
                let c = &out.counters;
                let ins = || {
                    peer.parked
                        .iter()
                        .filter_map(|l| l.ins.iter().find(|i| i.id == r.id))
                };
                paths.push(PathData {
                    peer: peer.config.name.clone(),
                    path: r.config.name.clone(),
                    tx_packets: c.tx_packets.load(Relaxed),
                    tx_bytes: c.tx_bytes.load(Relaxed),
                    rx_packets: c.rx_packets.load(Relaxed),
                    rx_bytes: c.rx_bytes.load(Relaxed),
                    rx_seq_high: c.rx_seq_high.load(Relaxed),
                    sequence: out.sequence.load(Relaxed),
                    window: ins().next().map(|i| i.window.lock().clone()),
                    probes_seen: ins().map(|i| i.probe_window.newest()).max(),
                    echo_seen: ins().filter_map(|i| i.echo_guard.last()).max(),
                    probe_seq: ins()
                        .filter_map(|i| i.prober.as_ref().map(Prober::last_seq))
                        .max()
                        .unwrap_or(0),
                    pace_backlog_us: peer
                        .parked
                        .iter()
                        .flat_map(|l| l.out.pace_backlog())
                        .filter(|(id, _)| *id == r.id)
                        .map(|(_, due)| due.saturating_duration_since(now).as_micros())
                        .max()
                        .map_or(0, |us| u64::try_from(us).unwrap_or(u64::MAX)),
                });
            }
        }
        (paths, peers)
    }

    /// Takes over the old process's counters and sequence numbers (lanes
    /// parked): counters go on from where they were, and the far end sees
    /// the same sender's sequence go on.
    fn import_data(&mut self, t: &Takeover) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = clock::now();
        for peer in &mut self.peers {
            if let Some(d) = t.peers.iter().find(|d| d.name == peer.config.name) {
                for lane in &mut peer.parked {
                    lane.out.instance = d.instance;
                }
                if let Some(lane) = peer.parked.first() {
                    lane.out.peer_sequence.fetch_max(d.sequence, Relaxed);
                }
            }
            for r in &peer.paths {
                let Some(d) = t
                    .paths
                    .iter()
                    .find(|d| d.peer == peer.config.name && d.path == r.config.name)
                else {
                    continue;
                };
                let first = peer.parked.first();
                if let Some(out) = first.and_then(|l| l.out.paths.iter().find(|o| o.id == r.id)) {
                    let c = &out.counters;
                    c.tx_packets.fetch_add(d.tx_packets, Relaxed);
                    c.tx_bytes.fetch_add(d.tx_bytes, Relaxed);
                    c.rx_packets.fetch_add(d.rx_packets, Relaxed);
                    c.rx_bytes.fetch_add(d.rx_bytes, Relaxed);
                    c.rx_seq_high.fetch_max(d.rx_seq_high, Relaxed);
                    out.sequence.fetch_max(d.sequence, Relaxed);
                }
                // The old process sends what it held for the path's pace
                // until then: this one's pace for it starts after that.
                if d.pace_backlog_us > 0 {
                    let until = now + Duration::from_micros(d.pace_backlog_us);
                    for lane in &mut peer.parked {
                        lane.out.pace_after.push((r.id, until));
                    }
                }
                // The receiving side's replay state: nothing the old lanes
                // took is taken again, and nothing they answered is answered
                // again (a reply's nonce is the request's number).
                for lane in &mut peer.parked {
                    let Some(pin) = lane.ins.iter_mut().find(|i| i.id == r.id) else {
                        continue;
                    };
                    if let Some(w) = &d.window {
                        *pin.window.lock() = w.clone();
                    }
                    if let Some((epoch, top)) = d.probes_seen {
                        pin.probe_window = ReplayWindow::seen_up_to(epoch, top);
                    }
                    if d.echo_seen.is_some() {
                        pin.echo_guard = EchoGuard::after(d.echo_seen);
                    }
                    if let Some(p) = pin.prober.as_mut() {
                        p.continue_after(d.probe_seq);
                    }
                }
            }
        }
    }

    /// Keeps every TUN queue and socket in systemd's descriptor store
    /// (`FDSTORE=1`; the unit allows it with `FileDescriptorStoreMax`), and
    /// takes out those gone, so that a restart after a crash finds the
    /// TUNs, with their addresses and routes, and the sockets, with what
    /// they had queued, still there ([`Inherited::from_fd_store`]). Names:
    /// `tun/<tun>/<queue>`, `data/<peer>/<path>/<lane>`,
    /// `bfd/<peer>/<path>` and `rx/<n>` (a BFD receive socket; its address
    /// is the socket's own). Each entry is known by its name, descriptor and
    /// identity (the TUN's device index, the socket's inode), so that a
    /// descriptor number reused by a reload is stored anew. Outside
    /// systemd, nothing.
    fn store_tuns(&mut self) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let inode = |fd: RawFd| -> u64 {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/self/fd/{fd}")).map_or(0, |m| m.ino())
        };
        let mut now: Vec<(String, RawFd, u64)> = Vec::new();
        for p in &self.peers {
            for (i, q) in p.queues.iter().enumerate() {
                now.push((
                    format!("tun/{}/{i}", p.config.tun),
                    q.as_raw_fd(),
                    u64::from(p.ifindex),
                ));
            }
            for r in &p.paths {
                let (peer, path) = (store_label(&p.config.name), store_label(&r.config.name));
                for (k, &fd) in r.data_fds.iter().enumerate() {
                    now.push((format!("data/{peer}/{path}/{k}"), fd, inode(fd)));
                }
                let name = format!("bfd/{peer}/{path}");
                now.push((name, r.bfd_fd, inode(r.bfd_fd)));
            }
        }
        for (k, (_, fd)) in self.rx_ips.iter().enumerate() {
            now.push((format!("rx/{k}"), *fd, inode(*fd)));
        }
        for gone in self.stored.iter().filter(|s| !now.contains(s)) {
            remove_stored(&gone.0);
        }
        for new in now.iter().filter(|n| !self.stored.contains(n)) {
            let state = format!("FDSTORE=1\nFDNAME={}", new.0);
            if let Err(e) = notify::notify_with_fds(&state, &[new.1]) {
                warn!(name = %new.0, error = %e, "could not give systemd a descriptor to keep");
            }
        }
        self.stored = now;
    }

    /// Takes every TUN queue and socket out of systemd's descriptor store.
    fn unstore_tuns(&mut self) {
        for s in std::mem::take(&mut self.stored) {
            remove_stored(&s.0);
        }
    }

    /// Sends what the parked lanes hold for their paced paths, each
    /// datagram at its time (at most [`PACE_QUEUE`] ahead, and a little
    /// more for a late wake-up); what is still held then is dropped.
    fn send_held(&mut self) {
        let limit = clock::now() + PACE_QUEUE + Duration::from_millis(20);
        let mut batch = sys::SendBatch::new(false);
        let mut sent = 0usize;
        loop {
            let now = clock::now();
            let next = self
                .peers
                .iter_mut()
                .flat_map(|p| p.parked.iter_mut())
                .filter_map(|l| {
                    let before = l.out.paced.len();
                    let next = l.out.send_held(&mut batch, now);
                    sent += before - l.out.paced.len();
                    next
                })
                .min();
            let Some(next) = next.filter(|_| now < limit) else {
                break;
            };
            std::thread::sleep(next.saturating_duration_since(clock::now()));
        }
        if sent > 0 {
            info!(
                datagrams = sent,
                "upgrade: sent what the lanes held for their pace"
            );
        }
    }

    /// Parks every peer's lanes, asking every worker at once.
    fn park_all(&mut self) {
        let stopping: Vec<Vec<Stopping>> = self.peers.iter_mut().map(PeerRun::park_begin).collect();
        for (peer, s) in self.peers.iter_mut().zip(stopping) {
            peer.park_end(s);
        }
    }

    fn unpark_all(&mut self) {
        for peer in &mut self.peers {
            if let Err(e) = peer.unpark() {
                error!(peer = %peer.config.name, error = %e, "could not restart the lanes");
            }
        }
    }
}

/// A peer's or path's name as it goes into a descriptor's name in the
/// store: names are free text, and systemd's descriptor names are printable
/// ASCII without `:` (and `/` separates the parts here), so any other byte
/// is written `%XX`.
fn store_label(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The address a stored socket is bound to.
fn bound_to(fd: &OwnedFd) -> Option<std::net::SocketAddr> {
    socket2::SockRef::from(fd).local_addr().ok()?.as_socket()
}

/// The interface a stored socket is bound to (`SO_BINDTODEVICE`).
fn bound_device(fd: &OwnedFd) -> Option<String> {
    let dev = socket2::SockRef::from(fd).device().ok()??;
    String::from_utf8(dev).ok()
}

fn remove_stored(name: &str) {
    notify_systemd(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
}

/// Blocking socket work (the handover's messages) off the runtime's
/// other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `crosslink upgrade`, in the running daemon: starts `binary`, hands it
/// everything and stops, or, if anything fails, carries on serving (see
/// [`upgrade`]).
async fn hand_over(
    gw: &mut Gateway,
    binary: &Path,
    listeners: Listeners,
) -> Result<HandedOver, String> {
    let inh = gw.inheritance(listeners);
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    let mut fds = upgrade::descriptors(&inh);
    fds.push(theirs.as_raw_fd());
    let mut cmd = std::process::Command::new(binary);
    cmd.args(std::env::args_os().skip(1))
        .env(upgrade::ENV_FD, theirs.as_raw_fd().to_string())
        // The watchdog is the new process's from its start.
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null());
    let mut child = upgrade::spawn_keeping(&mut cmd, fds)
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    drop(theirs);
    let pid = child.id();
    let give_up = |child: &mut std::process::Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        why
    };
    let mut reader = match ours.try_clone() {
        Ok(s) => std::io::BufReader::new(s),
        Err(e) => return Err(give_up(&mut child, format!("socket pair: {e}"))),
    };
    // 1-2: the new process prepares.
    let prepared = blocking(|| {
        ours.set_read_timeout(Some(Duration::from_secs(30)))?;
        upgrade::write_message(&ours, &inh)?;
        upgrade::read_message::<Reply>(&mut reader)
    });
    let reads = match prepared {
        Ok(Reply::Prepared { reads, .. }) => reads,
        Ok(Reply::Failed { error, .. }) => {
            return Err(give_up(
                &mut child,
                format!("the new process refused: {error}"),
            ))
        }
        Ok(other) => {
            return Err(give_up(
                &mut child,
                format!("the new process answered out of turn: {other:?}"),
            ))
        }
        Err(e) => {
            let status = match child.try_wait() {
                Ok(Some(s)) => format!(" ({s})"),
                _ => String::new(),
            };
            return Err(give_up(
                &mut child,
                format!("the new process did not get ready{status}: {e}"),
            ));
        }
    };
    if reads < upgrade::VERSION {
        if let Some(p) = gw.peers.iter().find(|p| p.config.public_key.is_some()) {
            return Err(give_up(
                &mut child,
                format!(
                    "the new binary reads handover state up to version {reads}, and peer {}'s \
                     handshake sessions need version {}: it cannot take them over (a downgrade \
                     across the handshake handover); restart instead",
                    p.config.name,
                    upgrade::VERSION
                ),
            ));
        }
    }
    // 3: stop, and hand over the state.
    let stopped = std::time::Instant::now();
    gw.park_all();
    let parked = stopped.elapsed();
    let Some(frozen) = gw.shared.commands.freeze().await else {
        gw.unpark_all();
        return Err(give_up(&mut child, "the BFD thread is gone".into()));
    };
    let (paths, peers) = gw.export_data();
    let drops = crate::core::drop::DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), gw.shared.drops.get(*r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut takeover = Takeover {
        version: upgrade::OLDEST,
        sessions: frozen.sessions,
        paths,
        peers,
        drops,
        handshakes: frozen.handshakes,
    };
    takeover.version = takeover.needed_version();
    // 4: the new process serves.
    let serving = blocking(|| {
        ours.set_read_timeout(Some(Duration::from_secs(5)))?;
        upgrade::write_message(&ours, &takeover)?;
        upgrade::read_message::<Reply>(&mut reader)
    });
    let handover = stopped.elapsed();
    info!(
        park_ms = parked.as_secs_f64() * 1e3,
        handover_ms = handover.as_secs_f64() * 1e3,
        "upgrade: lanes parked, state handed over"
    );
    match serving {
        Ok(Reply::Serving { pid: new, .. }) if new == pid => {
            // Our fast-path programs go now (their links close), so that
            // the new process's, attached behind them and configured,
            // carry and count from here rather than once this one exits.
            for peer in &mut gw.peers {
                peer.fast = None;
            }
            Ok(HandedOver { pid, handover })
        }
        other => {
            let why = match other {
                Ok(Reply::Failed { error, .. }) => error,
                Ok(r) => format!("answered out of turn: {r:?}"),
                Err(e) => e.to_string(),
            };
            let why = give_up(
                &mut child,
                format!("the new process did not take over: {why}"),
            );
            gw.shared.commands.send(super::control_plane::Command::Thaw);
            gw.unpark_all();
            Err(why)
        }
    }
}

/// The new process's side of an upgrade, once its gateway is built on
/// what it inherited: tells the old process, takes the state it sends
/// when it has stopped, and starts. Returns this process's id.
async fn take_over(gw: &mut Gateway, mut incoming: Incoming) -> Result<u32, String> {
    let pid = std::process::id();
    let mut takeover = blocking(|| {
        upgrade::write_message(
            &incoming.stream,
            &Reply::Prepared {
                version: upgrade::OLDEST,
                pid,
                reads: upgrade::VERSION,
            },
        )?;
        incoming
            .stream
            .set_read_timeout(Some(Duration::from_secs(30)))?;
        upgrade::read_message::<Takeover>(&mut incoming.reader)
    })
    .map_err(|e| e.to_string())?;
    let sessions = takeover
        .sessions
        .iter()
        .filter(|s| {
            gw.adopted
                .iter()
                .any(|(peer, path)| *peer == s.peer && *path == s.path)
        })
        .cloned()
        .collect();
    let frozen = Frozen {
        sessions,
        handshakes: std::mem::take(&mut takeover.handshakes),
    };
    let problems = gw
        .shared
        .commands
        .restore(frozen)
        .await
        .ok_or("the BFD thread is gone")?;
    for p in problems {
        warn!(problem = %p, "upgrade: a session starts over");
    }
    gw.import_data(&takeover);
    for (name, n) in &takeover.drops {
        // A reason this build does not know is left out.
        if let Some(r) = crate::core::drop::DropReason::ALL
            .iter()
            .find(|r| r.as_str() == name)
        {
            gw.shared.drops.add(*r, *n);
        }
    }
    gw.hold_lanes = false;
    gw.unpark_all();
    // Before the old process hears of it and exits: under systemd, the
    // service's main process is this one from now on.
    notify_systemd(&format!("MAINPID={pid}"));
    upgrade::write_message(
        &incoming.stream,
        &Reply::Serving {
            version: upgrade::OLDEST,
            pid,
        },
    )
    .map_err(|e| e.to_string())?;
    info!(
        from = incoming.inheritance.old_pid,
        sessions = takeover.sessions.len(),
        "upgrade: took over"
    );
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::store_label;

    /// Names in the descriptor store: printable, without `:`, and `/` only
    /// between their parts; distinct names stay distinct.
    #[test]
    fn store_labels() {
        assert_eq!(store_label("gcp-eu_1.a"), "gcp-eu_1.a");
        assert_eq!(store_label("a/b:c d"), "a%2Fb%3Ac%20d");
        assert_eq!(store_label("é"), "%C3%A9");
        assert_ne!(store_label("a/b"), store_label("a%2Fb"));
        for name in ["a/b:c", "x y", "%", "\u{7f}"] {
            let l = store_label(name);
            assert!(
                l.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b':' && b != b'/'),
                "{l}"
            );
        }
    }
}
