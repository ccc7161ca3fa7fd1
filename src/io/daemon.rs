//! `crosslink run`: sets up TUNs, routes and sockets, starts the threads,
//! and tears everything down again on SIGTERM/SIGINT.

use super::{clock, netlink::Netlink, sys, tun, udp};
use crate::config::{Config, ConfigError};
use crate::drop::DropReason;
use crate::engine::{Engine, Event, Forwarding};
use crate::forward::{classify, decapsulate, encapsulate, HEADROOM};
use crate::telemetry::metrics::{self, Metrics, PathLabels};
use crate::telemetry::status::{BfdStatus, PathStatus, PeerStatus, Status};
use crate::telemetry::{control, DropCounters, PathCounters};
use crate::wire::bfd::State;
use crate::{PathId, PeerId};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};
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

/// Largest datagram handled (inner packet plus overlay header).
const BUF_LEN: usize = 65_535 + HEADROOM;
/// Default inner MTU: a 1500-byte underlay less IPv6 + UDP + overlay headers.
const DEFAULT_MTU: u16 = 1500 - 40 - 8 - HEADROOM as u16;
/// Flows idle this long no longer count as active.
const FLOW_IDLE: Duration = Duration::from_secs(30);
const MAX_TRACKED_FLOWS: usize = 1 << 20;

/// Requests to the BFD thread.
enum Command {
    Status(oneshot::Sender<Status>),
    Shutdown(oneshot::Sender<()>),
}

/// The static facts the status document repeats.
struct Meta {
    gateway: String,
    started: Instant,
    peers: Vec<(String, String)>, // tun, policy
    paths: Vec<(u32, u32)>,       // priority, weight
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("crosslink-rt")
        .enable_all()
        .build()?;
    rt.block_on(run_async(config, config_path.to_path_buf()))
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

#[derive(Clone)]
struct CommandLink {
    tx: mpsc::Sender<Command>,
    wake: Arc<UnixStream>,
}

impl CommandLink {
    fn send(&self, cmd: Command) -> bool {
        if self.tx.send(cmd).is_err() {
            return false;
        }
        let _ = (&*self.wake).write_byte();
        true
    }

    async fn status(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Status(tx)) {
            return None;
        }
        rx.await.ok()
    }

    async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Shutdown(tx)) {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

trait WriteByte {
    fn write_byte(self) -> io::Result<()>;
}

impl WriteByte for &UnixStream {
    fn write_byte(self) -> io::Result<()> {
        use std::io::Write;
        let mut s = self;
        s.write_all(&[1]).or_else(|e| match e.kind() {
            io::ErrorKind::WouldBlock => Ok(()),
            _ => Err(e),
        })
    }
}

/// The BFD thread's state.
struct BfdThread {
    engine: Engine,
    tx: Vec<UdpSocket>,
    rx: Vec<(IpAddr, UdpSocket)>,
    commands: mpsc::Receiver<Command>,
    wake: UnixStream,
    forwarding: Arc<ArcSwap<Forwarding>>,
    metrics: Arc<Metrics>,
    counters: Vec<Arc<PathCounters>>,
    drops: Arc<DropCounters>,
    meta: Meta,
}

impl BfdThread {
    fn run(mut self) {
        match sys::set_realtime_priority(50) {
            Ok(()) => info!("BFD thread running at SCHED_FIFO priority 50"),
            Err(e) => {
                warn!(error = %e, "BFD thread could not get real-time priority; running at normal priority")
            }
        }
        let mut fds: Vec<_> = self.rx.iter().map(|(_, s)| s.as_raw_fd()).collect();
        fds.push(self.wake.as_raw_fd());
        let wake_index = fds.len() - 1;
        let mut ready = Vec::new();
        let mut buf = vec![0u8; 2048];
        loop {
            let now = clock::now();
            self.engine.handle_timeout(now);
            self.flush(now, &mut buf);
            let timeout = self
                .engine
                .poll_timeout()
                .map(|t| t.saturating_duration_since(clock::now()));
            if let Err(e) = sys::wait_readable(&fds, timeout, &mut ready) {
                error!(error = %e, "BFD wait failed");
                std::thread::sleep(Duration::from_millis(1));
            }
            for &i in &ready {
                if i == wake_index {
                    if self.handle_commands() {
                        return;
                    }
                } else {
                    self.receive(i, &mut buf);
                }
            }
        }
    }

    /// Sends due control packets, logs events, publishes forwarding.
    fn flush(&mut self, now: Instant, buf: &mut [u8]) {
        while let Some((id, pkt)) = self.engine.poll_transmit(now) {
            let i = usize::from(id.0);
            let (Some(path), Some(sock)) = (self.engine.path(id), self.tx.get(i)) else {
                continue;
            };
            let dst = SocketAddr::new(path.remote.ip(), udp::bfd_port(path.hop));
            match pkt.emit(buf) {
                Ok(n) => {
                    if let Err(e) = sock.send_to(&buf[..n], dst) {
                        debug!(path = %path.name, error = %e, "BFD send failed");
                    }
                }
                Err(e) => error!(error = ?e, "BFD emit failed"),
            }
        }
        while let Some(ev) = self.engine.poll_event() {
            self.on_event(ev);
        }
        if let Some(f) = self.engine.poll_forwarding() {
            for (i, _) in self.engine.paths().iter().enumerate() {
                if let Some(m) = self.metrics.path(i) {
                    m.set_active(self.engine.is_active(PathId(i as u16)));
                }
            }
            self.forwarding.store(f);
        }
    }

    fn on_event(&self, ev: Event) {
        match ev {
            Event::PathState {
                path,
                from,
                to,
                diag,
            } => {
                let Some(p) = self.engine.path(path) else {
                    return;
                };
                let peer = self.engine.peer(p.peer).map_or("?", |(n, _, _)| n);
                info!(peer, path = %p.name, from = from.as_str(), to = to.as_str(), diag = diag.as_str(), "path state");
                if let Some(m) = self.metrics.path(usize::from(path.0)) {
                    m.set_state(from, to);
                    m.set_detection_time(p.session.detection_time());
                    m.set_control_counts(p.control_tx, p.control_rx);
                }
            }
            Event::Failover {
                peer,
                from,
                to,
                detection,
            } => {
                let name = |id: Option<PathId>| {
                    id.and_then(|i| self.engine.path(i))
                        .map_or("none".to_string(), |p| p.name.clone())
                };
                let (from_name, to_name) = (name(from), name(to));
                let peer_name = self.engine.peer(peer).map_or("?", |(n, _, _)| n);
                let flows = from
                    .and_then(|i| self.counters.get(usize::from(i.0)))
                    .map_or(0, |c| c.flows.load(Ordering::Relaxed));
                match detection {
                    Some(d) => {
                        warn!(peer = peer_name, from = %from_name, to = %to_name, detection_ms = d.as_secs_f64() * 1e3, flows, "failover")
                    }
                    None => {
                        info!(peer = peer_name, from = %from_name, to = %to_name, flows, "active path changed")
                    }
                }
                self.metrics
                    .record_failover(usize::from(peer.0), &from_name, &to_name, detection);
            }
            Event::PeerUp { peer, up } => {
                let name = self.engine.peer(peer).map_or("?", |(n, _, _)| n);
                if up {
                    info!(peer = name, "peer up");
                } else {
                    warn!(peer = name, "peer down: no path left");
                }
                self.metrics.set_peer_up(usize::from(peer.0), up);
            }
        }
    }

    fn receive(&mut self, i: usize, buf: &mut [u8]) {
        let Some((local, sock)) = self.rx.get(i) else {
            return;
        };
        loop {
            match sys::recv_with_ttl(sock, buf) {
                Ok(Some(r)) => {
                    let data = &buf[..r.len.min(buf.len())];
                    let now = clock::now();
                    if let Err(reason) = self
                        .engine
                        .handle_bfd_datagram(*local, r.src, r.ttl, data, now)
                    {
                        self.drops.count(reason);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(error = %e, "BFD receive error");
                    return;
                }
            }
        }
    }

    /// Returns true when the thread should exit.
    fn handle_commands(&mut self) -> bool {
        let mut sink = [0u8; 64];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Status(reply) => {
                    let _ = reply.send(self.status());
                }
                Command::Shutdown(reply) => {
                    self.shutdown();
                    let _ = reply.send(());
                    return true;
                }
            }
        }
        false
    }

    /// AdminDown on every path (RFC 5880 §6.8.16), sent a few times since
    /// a single packet may be lost.
    fn shutdown(&mut self) {
        let now = clock::now();
        self.engine.set_admin_down_all(now);
        let mut packets = Vec::new();
        let mut buf = [0u8; 512];
        while let Some((id, pkt)) = self.engine.poll_transmit(now) {
            if let (Some(path), Ok(n)) = (self.engine.path(id), pkt.emit(&mut buf)) {
                let dst = SocketAddr::new(path.remote.ip(), udp::bfd_port(path.hop));
                packets.push((usize::from(id.0), dst, buf[..n].to_vec()));
            }
        }
        for round in 0..3 {
            if round > 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            for (i, dst, bytes) in &packets {
                if let Some(sock) = self.tx.get(*i) {
                    let _ = sock.send_to(bytes, dst);
                }
            }
        }
        while let Some(ev) = self.engine.poll_event() {
            self.on_event(ev);
        }
    }

    fn status(&self) -> Status {
        let mut peers = Vec::new();
        for pi in 0..self.engine.peer_count() {
            let Some((name, up, ids)) = self.engine.peer(PeerId(pi as u16)) else {
                continue;
            };
            let (tun, policy) = self.meta.peers.get(pi).cloned().unwrap_or_default();
            let paths: Vec<PathStatus> =
                ids.iter().filter_map(|&id| self.path_status(id)).collect();
            let active_path = paths.iter().find(|p| p.active).map(|p| p.name.clone());
            peers.push(PeerStatus {
                name: name.to_string(),
                tun,
                up,
                policy,
                active_path,
                paths,
            });
        }
        Status {
            gateway: self.meta.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: clock::now()
                .saturating_duration_since(self.meta.started)
                .as_secs(),
            peers,
        }
    }

    fn path_status(&self, id: PathId) -> Option<PathStatus> {
        let i = usize::from(id.0);
        let p = self.engine.path(id)?;
        let c = self.counters.get(i)?;
        let (priority, weight) = self.meta.paths.get(i).copied().unwrap_or((0, 0));
        let s = &p.session;
        let state = match s.state() {
            State::Up => "up",
            State::Down => "down",
            State::Init => "init",
            State::AdminDown => "admin_down",
        };
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Some(PathStatus {
            name: p.name.clone(),
            state: state.to_string(),
            active: self.engine.is_active(id),
            flows: load(&c.flows),
            local: p.local.to_string(),
            remote: p.remote.to_string(),
            priority,
            weight,
            bfd: BfdStatus {
                local_state: s.state().as_str().to_string(),
                remote_state: s.remote_state().as_str().to_string(),
                local_diag: s.local_diag().as_str().to_string(),
                local_discriminator: s.local_discriminator(),
                remote_discriminator: s.remote_discriminator(),
                tx_interval_us: s.tx_interval().as_micros() as u64,
                detect_time_us: s.detection_time().as_micros() as u64,
                rtt_us: None,
                transitions: s.transitions(),
                last_change_unix: s.last_change().map(clock::unix_seconds),
                control_tx: p.control_tx,
                control_rx: p.control_rx,
            },
            tx_packets: load(&c.tx_packets),
            rx_packets: load(&c.rx_packets),
            tx_bytes: load(&c.tx_bytes),
            rx_bytes: load(&c.rx_bytes),
        })
    }
}

/// A path as the sending thread sees it.
struct PathOut {
    socket: Arc<UdpSocket>,
    remote: SocketAddr,
    counters: Arc<PathCounters>,
    sequence: u64,
}

/// Reads a peer's TUN and sends each packet on its path.
struct TunOut {
    peer: PeerId,
    tun: Arc<SyncDevice>,
    forwarding: Arc<ArcSwap<Forwarding>>,
    paths: Vec<Option<PathOut>>,
    drops: Arc<DropCounters>,
    interrupt: Arc<InterruptEvent>,
    flows: FlowTable,
}

impl TunOut {
    fn run(mut self) {
        let mut buf = vec![0u8; BUF_LEN];
        let mut last_sweep = clock::now();
        loop {
            let n = match self.tun.recv_intr(&mut buf[HEADROOM..], &self.interrupt) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted && self.interrupt.is_trigger() => {
                    return
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(error = %e, "TUN read failed; forwarding for this peer stopped");
                    return;
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
                    self.send(placement.path, &mut buf, n);
                    if let Some(copy) = placement.copy {
                        self.send(copy, &mut buf, n);
                    }
                }
                Err(reason) => self.drops.count(reason),
            }
            if now.saturating_duration_since(last_sweep) >= Duration::from_secs(1) {
                last_sweep = now;
                self.flows.sweep(now, &self.paths);
            }
        }
    }

    fn send(&mut self, id: PathId, buf: &mut [u8], inner_len: usize) {
        let Some(Some(path)) = self.paths.get_mut(usize::from(id.0)) else {
            self.drops.count(DropReason::NoPath);
            return;
        };
        path.sequence += 1;
        match encapsulate(buf, inner_len, path.sequence) {
            Ok(len) => match path.socket.send_to(&buf[..len], path.remote) {
                Ok(_) => path.counters.count_tx(inner_len),
                Err(_) => self.drops.count(DropReason::PathSend),
            },
            Err(reason) => self.drops.count(reason),
        }
    }
}

/// Receives a path's datagrams and writes the inner packets to the TUN.
struct PathIn {
    socket: Arc<UdpSocket>,
    remote: SocketAddr,
    tun: Arc<SyncDevice>,
    counters: Arc<PathCounters>,
    drops: Arc<DropCounters>,
    stop: Arc<AtomicBool>,
}

impl PathIn {
    fn run(self) {
        let mut buf = vec![0u8; BUF_LEN];
        while !self.stop.load(Ordering::Relaxed) {
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
            match decapsulate(&buf[..n]) {
                Ok((_, inner)) => match self.tun.send(inner) {
                    Ok(_) => self.counters.count_rx(inner.len()),
                    Err(_) => self.drops.count(DropReason::TunWrite),
                },
                Err(reason) => self.drops.count(reason),
            }
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
struct FlowTable {
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
