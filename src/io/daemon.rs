//! `crosslink run`: sets up TUNs, routes and sockets, starts the threads,
//! and tears everything down again on SIGTERM/SIGINT.

use super::control_plane::{BfdThread, Command, CommandLink, Meta};
use super::data_plane::{FlowTable, PathIn, PathOut, TunOut};
use super::{clock, netlink::Netlink, tun, udp};
use crate::config::{Config, ConfigError};
use crate::engine::{Engine, Secrets};
use crate::forward::HEADROOM;
use crate::telemetry::metrics::{self, Metrics, PathLabels};
use crate::telemetry::{control, DropCounters, PathCounters};
use crate::PeerId;
use arc_swap::ArcSwap;
use std::io;
use std::net::{IpAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};
use tun_rs::{InterruptEvent, SyncDevice};

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

/// Default inner MTU: a 1500-byte underlay less IPv6 + UDP + overlay headers.
const DEFAULT_MTU: u16 = 1500 - 40 - 8 - HEADROOM as u16;

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    refuse_unsupported(&config)?;
    let secrets = read_secrets(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("crosslink-rt")
        .enable_all()
        .build()?;
    rt.block_on(run_async(config, secrets, config_path.to_path_buf()))
}

/// Reads every BFD `auth.secret_file` once, at start (RFC 5880 §6.7 keys). The error
/// names the file; the content is never logged.
fn read_secrets(config: &Config) -> Result<Secrets, DaemonError> {
    let mut secrets = Secrets::new();
    let files = config
        .peers
        .iter()
        .flat_map(|p| p.paths.iter())
        .filter_map(|p| p.bfd.auth.as_ref())
        .map(|a| a.secret_file.clone());
    for file in files {
        if secrets.contains_key(&file) {
            continue;
        }
        let raw = std::fs::read(&file).map_err(|e| {
            DaemonError::Setup(format!(
                "cannot read BFD secret file {}: {e}",
                file.display()
            ))
        })?;
        let secret = crate::bfd::auth::trim_secret(&raw).to_vec();
        secrets.insert(file, secret);
    }
    Ok(secrets)
}

/// Settings this build parses but cannot honour yet. Running without them
/// would silently weaken what the operator asked for, so refuse instead.
fn refuse_unsupported(config: &Config) -> Result<(), DaemonError> {
    for peer in &config.peers {
        if peer.key_file.is_some() {
            return Err(DaemonError::Setup(format!(
                "peer {}: key_file: data-plane encryption is not available in this version; remove key_file to run unencrypted",
                peer.name
            )));
        }
    }
    Ok(())
}

struct PeerIo {
    tun: Arc<SyncDevice>,
}

async fn run_async(
    config: Config,
    secrets: Secrets,
    config_path: PathBuf,
) -> Result<(), DaemonError> {
    if let Some(m) = &config.metrics {
        metrics::install(m.listen).map_err(DaemonError::Setup)?;
        info!(listen = %m.listen, "metrics endpoint up");
    }
    let peer_names: Vec<&str> = config.peers.iter().map(|p| p.name.as_str()).collect();
    let labels: Vec<PathLabels<'_>> = config
        .peers
        .iter()
        .flat_map(|peer| {
            peer.paths.iter().map(move |p| PathLabels {
                peer: &peer.name,
                path: &p.name,
                local: p.local.to_string(),
                remote: p.remote.to_string(),
            })
        })
        .collect();
    let metrics = Arc::new(Metrics::new(&peer_names, &labels));

    let netlink = Netlink::connect()?;
    let mut peers = Vec::new();
    for peer in &config.peers {
        let mtu = peer.mtu.unwrap_or(DEFAULT_MTU);
        let dev = tun::open(&peer.tun, mtu)?;
        let index = dev.if_index()?;
        for a in &peer.tun_addresses {
            netlink.add_address(index, a).await?;
        }
        for r in &peer.routes {
            netlink.add_route(index, r).await?;
        }
        info!(peer = %peer.name, tun = %peer.tun, mtu, routes = peer.routes.len(), "TUN up");
        peers.push(PeerIo { tun: Arc::new(dev) });
    }

    let paths: Vec<_> = config.peers.iter().flat_map(|p| p.paths.iter()).collect();
    let mut data_sockets = Vec::new();
    let mut bfd_tx = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let sock = udp::data_socket(p.local, p.interface.as_deref())?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        data_sockets.push(Arc::new(sock));
        let seed = (std::process::id() as u16).wrapping_add(i as u16 * 7919);
        bfd_tx.push(udp::bfd_tx_socket(
            p.local.ip(),
            p.interface.as_deref(),
            seed,
        )?);
    }
    let mut bfd_rx: Vec<(IpAddr, UdpSocket)> = Vec::new();
    for p in &paths {
        if bfd_rx.iter().any(|(ip, _)| *ip == p.local.ip()) {
            continue;
        }
        let same_if = paths
            .iter()
            .filter(|q| q.local.ip() == p.local.ip())
            .all(|q| q.interface == p.interface);
        let ifname = if same_if {
            p.interface.as_deref()
        } else {
            None
        };
        bfd_rx.push((
            p.local.ip(),
            udp::bfd_rx_socket(p.local.ip(), p.bfd.hop, ifname)?,
        ));
    }

    let now = clock::now();
    let seed = u64::from(std::process::id()) ^ (clock::unix_seconds(now) << 20) ^ 0x5eed;
    let engine =
        Engine::new(&config, &secrets, now, seed).map_err(|e| DaemonError::Setup(e.to_string()))?;
    drop(secrets);
    let forwarding = Arc::new(ArcSwap::from_pointee(engine.forwarding()));
    let counters: Vec<Arc<PathCounters>> = paths.iter().map(|_| Arc::default()).collect();
    let drops = Arc::new(DropCounters::default());
    let meta = Meta {
        gateway: config.gateway.name.clone(),
        started: now,
        peers: config
            .peers
            .iter()
            .map(|p| (p.tun.clone(), p.policy.as_str().to_string()))
            .collect(),
        paths: paths.iter().map(|p| (p.priority, p.weight)).collect(),
    };

    // The BFD thread.
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let bfd = BfdThread {
        engine,
        tx: bfd_tx,
        rx: bfd_rx,
        commands: cmd_rx,
        wake: wake_rx,
        forwarding: forwarding.clone(),
        metrics: metrics.clone(),
        counters: counters.clone(),
        drops: drops.clone(),
        meta,
    };
    let bfd_handle = std::thread::Builder::new()
        .name("bfd".into())
        .spawn(move || bfd.run())?;
    let commands = CommandLink {
        tx: cmd_tx,
        wake: Arc::new(wake_tx),
    };

    // The forwarding threads.
    let stop = Arc::new(AtomicBool::new(false));
    let interrupt = Arc::new(InterruptEvent::new()?);
    let mut threads = Vec::new();
    let mut path_index = 0usize;
    for (pi, peer) in config.peers.iter().enumerate() {
        let mut out: Vec<Option<PathOut>> = (0..paths.len()).map(|_| None).collect();
        for (k, p) in peer.paths.iter().enumerate() {
            let gi = path_index + k;
            out[gi] = Some(PathOut {
                socket: data_sockets[gi].clone(),
                remote: p.remote,
                counters: counters[gi].clone(),
                sequence: 0,
            });
            let rx = PathIn {
                socket: data_sockets[gi].clone(),
                remote: p.remote,
                tun: peers[pi].tun.clone(),
                counters: counters[gi].clone(),
                drops: drops.clone(),
                stop: stop.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("rx-{}", p.name))
                    .spawn(move || rx.run())?,
            );
        }
        path_index += peer.paths.len();
        let tx = TunOut {
            peer: PeerId(pi as u16),
            tun: peers[pi].tun.clone(),
            forwarding: forwarding.clone(),
            paths: out,
            drops: drops.clone(),
            interrupt: interrupt.clone(),
            flows: FlowTable::default(),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("tun-{}", peer.name))
                .spawn(move || tx.run())?,
        );
    }

    // Control socket and metrics upkeep.
    let control_path = config.gateway.control_socket.clone();
    let listener = control::bind(&control_path)?;
    let status_link = commands.clone();
    let control_task = tokio::spawn(control::serve(listener, move || {
        let link = status_link.clone();
        async move { link.status().await }
    }));
    let sync_metrics = metrics.clone();
    let sync_counters = counters.clone();
    let sync_drops = drops.clone();
    let sync_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            sync_metrics.sync(&sync_counters, &sync_drops);
        }
    });
    info!(gateway = %config.gateway.name, control = %control_path.display(), "crosslink running");

    // Signals.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&config_path, &config, &metrics, &commands).await,
        }
    }

    info!("stopping: sending AdminDown on every path");
    commands.shutdown().await;
    let _ = bfd_handle.join();
    stop.store(true, Ordering::Relaxed);
    let _ = interrupt.trigger();
    for t in threads {
        let _ = t.join();
    }
    control_task.abort();
    sync_task.abort();
    let _ = std::fs::remove_file(&control_path);
    drop(peers);
    info!("stopped; TUN devices and their routes removed");
    Ok(())
}

/// SIGHUP: validate the new file and apply changed BFD timers in place (each
/// change goes through a Poll Sequence, RFC 5880 §6.8.3, so sessions stay Up).
/// Other changes are not applied in place yet: they are reported and left for
/// a restart.
async fn reload(path: &Path, running: &Config, metrics: &Metrics, commands: &CommandLink) {
    if let Ok(new) = Config::load(path) {
        let changed = commands.set_timers(new).await;
        if changed > 0 {
            info!(
                paths = changed,
                "reload: BFD timers applied with a poll sequence"
            );
        }
    }
    match Config::load(path) {
        Err(e) => {
            metrics.set_reload_ok(false);
            error!(error = %e, "reload refused; keeping the running configuration");
        }
        Ok(new) if new == *running || same_but_bfd_timers(&new, running) => {
            metrics.set_reload_ok(true);
            info!("reload: nothing else to apply");
        }
        Ok(_) => {
            metrics.set_reload_ok(true);
            warn!(
                "reload: the new configuration is valid but differs; restart crosslink to apply it"
            );
        }
    }
}

/// Whether two configs differ at most in BFD timers (which reload applies).
fn same_but_bfd_timers(a: &Config, b: &Config) -> bool {
    let strip = |c: &Config| {
        let mut c = c.clone();
        for p in c.peers.iter_mut().flat_map(|p| p.paths.iter_mut()) {
            p.bfd.tx_interval = Duration::ZERO;
            p.bfd.rx_interval = Duration::ZERO;
            p.bfd.multiplier = 0;
        }
        c.bfd.tx_interval = Duration::ZERO;
        c.bfd.rx_interval = Duration::ZERO;
        c.bfd.multiplier = 0;
        c
    };
    strip(a) == strip(b)
}
