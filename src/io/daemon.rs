//! `crosslink run`: sets up TUNs, routes and sockets, starts the threads,
//! and tears everything down again on SIGTERM/SIGINT.

use super::control_plane::{BfdThread, Command, CommandLink, Meta};
use super::data_plane::{FlowTable, PathIn, PathOut, TunOut};
use super::linkwatch::{self, WatchedPath};
use super::{clock, netlink::Netlink, sys, tun, udp};
use crate::config::{Config, ConfigError};
use crate::dedup::Window;
use crate::engine::Engine;
use crate::forward::HEADROOM;
use crate::telemetry::metrics::{self, Metrics, PathLabels};
use crate::telemetry::{control, DropCounters, PathCounters};
use crate::wire::flow::mix;
use crate::PathId;
use crate::PeerId;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("crosslink-rt")
        .enable_all()
        .build()?;
    rt.block_on(run_async(config, config_path.to_path_buf()))
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
        for path in &peer.paths {
            if path.bfd.auth.is_some() {
                return Err(DaemonError::Setup(format!(
                    "peer {} path {}: bfd.auth: BFD authentication is not available in this version",
                    peer.name, path.name
                )));
            }
        }
    }
    Ok(())
}

struct PeerIo {
    tun: Arc<SyncDevice>,
}

async fn run_async(config: Config, config_path: PathBuf) -> Result<(), DaemonError> {
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
            netlink.add_route(index, r, peer.route_metric).await?;
        }
        // No path is up yet: carrier off until the first one is (cloud failover).
        if let Err(e) = sys::set_tun_carrier(&dev, false) {
            warn!(tun = %peer.tun, error = %e, "could not turn TUN carrier off");
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
    let engine = Engine::new(&config, now, seed);
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
        tuns: peers.iter().map(|p| p.tun.clone()).collect(),
    };
    let bfd_handle = std::thread::Builder::new()
        .name("bfd".into())
        .spawn(move || bfd.run())?;
    let commands = CommandLink {
        tx: cmd_tx,
        wake: Arc::new(wake_tx),
    };
    let watched = paths
        .iter()
        .enumerate()
        .map(|(i, p)| WatchedPath {
            id: PathId(i as u16),
            name: p.name.clone(),
            interface: p.interface.clone(),
            local: p.local.ip(),
        })
        .collect();
    if let Err(e) = linkwatch::spawn(watched, commands.clone()).await {
        warn!(error = %e, "no carrier/address watch; failures are detected by BFD only");
    }
    let instance_seed = mix(seed ^ 0x6475_706c);

    // The forwarding threads.
    let stop = Arc::new(AtomicBool::new(false));
    let interrupt = Arc::new(InterruptEvent::new()?);
    let mut threads = Vec::new();
    let mut path_index = 0usize;
    for (pi, peer) in config.peers.iter().enumerate() {
        let mut out: Vec<Option<PathOut>> = (0..paths.len()).map(|_| None).collect();
        let dedup = Arc::new(Mutex::new(Window::new()));
        for (k, p) in peer.paths.iter().enumerate() {
            let gi = path_index + k;
            out[gi] = Some(PathOut {
                id: PathId(gi as u16),
                socket: data_sockets[gi].clone(),
                remote: p.remote,
                counters: counters[gi].clone(),
                sequence: 0,
                last_error_report: None,
            });
            let rx = PathIn {
                socket: data_sockets[gi].clone(),
                remote: p.remote,
                tun: peers[pi].tun.clone(),
                counters: counters[gi].clone(),
                drops: drops.clone(),
                stop: stop.clone(),
                dedup: dedup.clone(),
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
            commands: commands.clone(),
            instance: (mix(instance_seed ^ pi as u64) >> 32) as u32,
            peer_sequence: 0,
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
            _ = hup.recv() => reload(&config_path, &config, &metrics),
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

/// SIGHUP: validate the new file. Applying a changed config in place
/// (without disturbing unchanged peers) is not implemented yet, so a valid
/// but different file is reported and left for a restart.
fn reload(path: &Path, running: &Config, metrics: &Metrics) {
    match Config::load(path) {
        Err(e) => {
            metrics.set_reload_ok(false);
            error!(error = %e, "reload refused; keeping the running configuration");
        }
        Ok(new) if new == *running => {
            metrics.set_reload_ok(true);
            info!("reload: configuration unchanged");
        }
        Ok(_) => {
            metrics.set_reload_ok(true);
            warn!(
                "reload: the new configuration is valid but differs; restart crosslink to apply it"
            );
        }
    }
}
