//! The BFD thread: owns the [`Engine`] and every BFD socket, waits in
//! `epoll` for the next control packet or deadline, sends what is due,
//! logs and exports events, and publishes forwarding snapshots.
//!
//! Its cost does not grow with the number of sessions per wakeup: a
//! level-triggered `epoll` set ([`sys::Epoll`]) reports only the sockets
//! that have packets (no scan of every socket), each is read with one
//! `recvmmsg`, the engine keeps its deadlines in a heap (no scan of every
//! session), and from `COALESCE_FROM` sessions on the thread wakes at most
//! once per `COALESCE`, handling together what arrived and what fell due
//! meanwhile. The thread never waits
//! for anything but its sockets and its next deadline: what can block in
//! the kernel, such as a TUN's carrier (which takes the kernel's global
//! rtnl lock, busy for hundreds of milliseconds when many interfaces
//! change at once), is done by a helper thread, `bfd-helper`. Log lines
//! go through the `log` thread
//! (see `main.rs`), and commands wait in a [`CommandQueue`] the thread
//! only ever tries to lock: a real-time thread waiting for, or spinning
//! on, something a preempted normal thread holds stalls for as long as
//! that thread is kept off the CPU.
//!
//! Other threads reach it through [`CommandLink`]: a queue plus one byte
//! on a socket pair that wakes the `epoll` (when the queue was empty).
//! Besides status and shutdown,
//! that carries the fast failure signals: link and address events from
//! [`super::linkwatch`] and send errors from the forwarding threads. When a
//! peer loses its last usable path the thread turns the peer's TUN carrier
//! off, and on again with the first healthy path (cloud failover: a route
//! with a higher metric through another peer's TUN takes over meanwhile).
//!
//! A configuration reload reaches it as one [`Plan`]: the paths and peers
//! to remove (AdminDown is sent on each, a few times, before its socket
//! closes) and those to add, with sockets the shell has already opened.
//! Everything else in the engine is left as it was.

use super::bfd_offload::{self, Offload};
use super::bfd_tx::{Sent, TxQueue};
use super::fastpath::{self, FastPath};
use super::lanes::SharedKeys;
use super::tun::Queue as SyncDevice;
use super::{clock, sys, udp};
use crate::config::{FecMode, PathConfig, PeerConfig, SlaConfig};
use crate::core::bfd::Transmit;
use crate::core::drop::DropReason;
use crate::core::engine::MoveCause;
use crate::core::engine::{Engine, Event, Forwarding, OffloadChange, PathExport, Secrets};
use crate::core::fec::Code;
use crate::core::handshake::{Failure, Handshake, HandshakeExport};
use crate::core::quality::{Sample, Transition};
use crate::core::wire::bfd::State;
use crate::telemetry::metrics::{Metrics, PathLabels};
use crate::telemetry::status::{
    AggregateStatus, BfdStatus, BfdThreadStatus, FecStatus, HandshakeStatus, PathStatus,
    PeerStatus, QualityStatus, ReorderStatus, Status,
};
use crate::telemetry::{DropCounters, PathCounters, ReorderCounters};
use crate::{PathId, PeerId};
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

/// Requests to the BFD thread.
pub enum Command {
    Status(oneshot::Sender<Status>),
    /// Answers at once: the thread is alive (the systemd watchdog's ping,
    /// which needs no status document built).
    Ping(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
    /// The path's underlay interface (carrier, admin state) or local
    /// address came (`up`) or went.
    Link {
        path: PathId,
        up: bool,
    },
    /// Sending on the path failed with a reachability error.
    SendError(PathId),
    /// A probe's reply came back on the path (from its lane 0).
    Quality(PathId, Box<Sample>),
    /// A key-pair handshake message came on the path, from its remote.
    Handshake(PathId, Box<[u8]>),
    /// A message came on the path sealed under a session that awaited its
    /// confirm (this side's epoch).
    SessionUsed(PathId, u32),
    Apply(Box<Plan>, oneshot::Sender<Applied>),
    /// An upgrade: stop sending and receiving (the sessions stay as they
    /// are, for the new process) and answer with every BFD session's and
    /// every handshake's state.
    Freeze(oneshot::Sender<Frozen>),
    /// The upgrade failed: carry on from where [`Command::Freeze`] stopped.
    Thaw,
    /// An upgrade, in the new process: take over the old process's
    /// sessions, then start sending and receiving. Answers with what could
    /// not be taken over.
    Restore(Frozen, oneshot::Sender<Vec<String>>),
}

/// What the BFD thread hands to a new process: every BFD session, and
/// every key-pair peer's handshake (by peer name).
#[derive(Debug, Default)]
pub struct Frozen {
    pub sessions: Vec<PathExport>,
    pub handshakes: Vec<(String, HandshakeExport)>,
}

/// A path to add, with its opened BFD transmit socket.
pub struct NewPath {
    pub peer: String,
    pub config: PathConfig,
    pub bfd_tx: UdpSocket,
    /// A socket of the path's data plane (lane 0's), for handshake messages.
    pub data_tx: Arc<UdpSocket>,
    pub counters: Arc<PathCounters>,
}

/// A change of configuration, in the order it is applied: removals first.
#[derive(Default)]
pub struct Plan {
    pub remove_paths: Vec<PathId>,
    pub remove_peers: Vec<PeerId>,
    /// Peers to add (their `paths` are ignored: see `add_paths`).
    pub add_peers: Vec<PeerConfig>,
    pub add_paths: Vec<NewPath>,
    /// BFD receive sockets for local addresses that had none.
    pub add_rx: Vec<(IpAddr, UdpSocket)>,
    /// Local addresses no live path uses any more.
    pub remove_rx: Vec<IpAddr>,
    /// Paths kept running whose BFD timers changed: (id, tx, rx, multiplier),
    /// applied in place with a Poll Sequence (RFC 5880 §6.8.3).
    pub set_timers: Vec<(PathId, Duration, Duration, u8)>,
    /// Paths kept running whose service level changed.
    pub set_sla: Vec<(PathId, SlaConfig)>,
    /// Paths kept running whose `aggregate` rate changed.
    pub set_rates: Vec<(PathId, Option<u64>)>,
    /// Paths kept running whose `bfd.offload` changed.
    pub set_offload: Vec<(PathId, bool)>,
    /// Peers kept running whose `reorder_wait` changed.
    pub set_reorder_wait: Vec<(PeerId, Option<Duration>)>,
    /// Peers kept running whose FEC settings changed.
    pub set_fec: Vec<(PeerId, crate::config::FecConfig)>,
    /// BFD secrets (file -> content) for the paths added.
    pub secrets: Secrets,
    /// The TUN of each added peer, by peer name, for carrier control, and
    /// its fast path if it has one.
    pub add_tuns: Vec<(String, Arc<SyncDevice>, Option<Arc<FastPath>>)>,
    /// The new peers' resequencing counters (their lanes').
    pub add_reorder: Vec<(String, Arc<ReorderCounters>)>,
    /// The new key-pair peers' handshakes, and where their keys go.
    pub add_handshakes: Vec<(String, Handshake, SharedKeys)>,
}

/// The ids the engine gave to what a [`Plan`] added.
#[derive(Debug, Default)]
pub struct Applied {
    pub peers: Vec<(String, PeerId)>,
    pub paths: Vec<(String, String, PathId)>,
}

/// The static facts the status document repeats, by id slot.
pub struct Meta {
    pub gateway: String,
    pub started: Instant,
    pub peers: Vec<Option<(String, String)>>, // tun, policy
    pub paths: Vec<Option<(u32, u32)>>,       // priority, weight
}

/// The commands waiting for the BFD thread. Senders (normal-priority
/// threads) take the lock; the BFD thread only ever tries it and, when a
/// sender holds it, leaves the commands for a millisecond later. A
/// channel would not do: its receiver spins on a message whose sender was
/// preempted halfway through writing it, and a real-time thread spinning
/// keeps that sender off its CPU (seen: BFD stalled for hundreds of
/// milliseconds, every session down, on a busy 2-core host).
#[derive(Default)]
pub struct CommandQueue {
    queue: parking_lot::Mutex<Vec<Command>>,
    closed: std::sync::atomic::AtomicBool,
}

impl CommandQueue {
    pub fn new() -> Arc<CommandQueue> {
        Arc::new(CommandQueue::default())
    }

    /// Queues a command: `None` once the BFD thread has exited, else
    /// whether the queue was empty (only then does the thread need waking:
    /// it reads its wake socket dry before it takes the queue, so a
    /// command queued behind another is taken with it).
    fn push(&self, cmd: Command) -> Option<bool> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.queue.lock();
        let first = q.is_empty();
        q.push(cmd);
        Some(first)
    }

    /// What is queued, or `None` when a sender holds the lock right now.
    fn try_take(&self, into: &mut Vec<Command>) -> Option<()> {
        let mut q = self.queue.try_lock()?;
        into.append(&mut q);
        Some(())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.queue.lock().clear();
    }
}

#[derive(Clone)]
pub struct CommandLink {
    pub queue: Arc<CommandQueue>,
    pub wake: Arc<UnixStream>,
}

impl CommandLink {
    /// Queues a command and wakes the BFD thread; false when it has exited.
    /// A command queued behind others wakes nothing: the lanes queue a
    /// quality sample per probe (tens of thousands a second with hundreds
    /// of paths), and one wake-up takes them all.
    pub fn send(&self, cmd: Command) -> bool {
        match self.queue.push(cmd) {
            None => false,
            Some(first) => {
                if first {
                    let _ = (&*self.wake).write_byte();
                }
                true
            }
        }
    }

    pub async fn status(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Status(tx)) {
            return None;
        }
        rx.await.ok()
    }

    /// Whether the BFD thread answers its commands.
    pub async fn ping(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Ping(tx)) && rx.await.is_ok()
    }

    pub async fn apply(&self, plan: Plan) -> Option<Applied> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Apply(Box::new(plan), tx)) {
            return None;
        }
        rx.await.ok()
    }

    /// Stops the thread's sending and receiving; the sessions' state.
    pub async fn freeze(&self) -> Option<Frozen> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Freeze(tx)) {
            return None;
        }
        rx.await.ok()
    }

    /// Takes over sessions and starts sending and receiving; what failed.
    pub async fn restore(&self, state: Frozen) -> Option<Vec<String>> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Restore(state, tx)) {
            return None;
        }
        rx.await.ok()
    }

    pub async fn shutdown(&self) {
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

/// A path's BFD transmit socket, connected to the far end's BFD port
/// when it could be: the kernel then keeps the route with the socket
/// instead of looking it up for every packet (and checks it is still
/// valid): at 1000 sessions in the scale bench the thread took 77-85 % of
/// a core connected, 88-92 % unconnected, side by side. A socket
/// that could not connect (no route yet when the path was added) sends
/// with the address each time.
pub struct TxSocket {
    sock: UdpSocket,
    connected: bool,
}

impl TxSocket {
    /// Connects `sock` to `dst` if it can.
    fn new(sock: UdpSocket, dst: SocketAddr) -> TxSocket {
        let connected = match sock.connect(dst) {
            Ok(()) => true,
            Err(e) => {
                debug!(%dst, error = %e, "BFD socket not connected; sending with the address");
                false
            }
        };
        TxSocket { sock, connected }
    }

    fn send(&self, data: &[u8], dst: SocketAddr) -> io::Result<usize> {
        if self.connected {
            self.sock.send(data)
        } else {
            self.sock.send_to(data, dst)
        }
    }
}

/// The BFD thread's state.
pub struct BfdThread {
    pub engine: Engine,
    /// BFD transmit sockets by [`PathId`] (`None` once removed).
    pub tx: Vec<Option<TxSocket>>,
    pub rx: Vec<(IpAddr, UdpSocket)>,
    pub commands: Arc<CommandQueue>,
    pub wake: UnixStream,
    pub forwarding: Arc<ArcSwap<Forwarding>>,
    pub metrics: Arc<Metrics>,
    /// Forwarding counters by [`PathId`].
    pub counters: Vec<Option<Arc<PathCounters>>>,
    pub drops: Arc<DropCounters>,
    pub meta: Meta,
    /// Each peer's TUN, indexed by [`PeerId`], for carrier control. Weak:
    /// the shell's peer owns it, and a peer restarted under the same TUN
    /// name must have let go of its device before the new one is made.
    pub tuns: Vec<Option<Weak<SyncDevice>>>,
    /// Each peer's fast path, indexed by [`PeerId`]: steered with every
    /// forwarding snapshot, its counters added to the paths'. Weak, like
    /// `tuns`: its programs go with the peer.
    pub fast: Vec<Option<Weak<FastPath>>>,
    /// Each peer's lanes' resequencing counters, indexed by [`PeerId`].
    pub reorder: Vec<Option<Arc<ReorderCounters>>>,
    /// When the fast paths' counters were last collected.
    pub fast_collected: Option<Instant>,
    /// When the paths' quality was last copied to the metrics.
    pub quality_exported: Option<Instant>,
    /// What the thread sets up for itself when it starts.
    pub io: Io,
    /// Neither sending nor receiving nor running timers, only taking
    /// commands: a process being replaced, after [`Command::Freeze`], or
    /// the new one until [`Command::Restore`].
    pub held: bool,
    /// Data-plane sockets by [`PathId`], for handshake messages.
    pub data_tx: Vec<Option<Arc<UdpSocket>>>,
    /// Key-pair peers' keys by [`PeerId`], published as handshakes complete.
    pub peer_keys: Vec<Option<SharedKeys>>,
    /// The BFD receive offload, when a path asks for it and it loaded.
    pub offload: Option<Offload>,
}

/// The BFD thread's own machinery, made when it starts.
#[derive(Default)]
pub struct Io {
    /// Requests to the `bfd-helper` thread.
    helper: Option<mpsc::Sender<HelperRequest>>,
    /// Whether any peer has a fast path (kept up to date by `apply`).
    any_fast: bool,
    /// The receive sockets' descriptors registered with the poll.
    registered: HashSet<RawFd>,
    /// The receive sockets need registering again (a reload changed them).
    rx_changed: bool,
    /// How long the thread was kept from its work (the status's
    /// `bfd_thread`): `stalls` counts wake-ups [`STALL`] or more after
    /// their deadline, work that long, and that long off the CPU in work.
    held: BfdThreadStatus,
    /// Commands were left in the queue (a sender held its lock).
    commands_left: bool,
    /// Commands taken from the queue, being handled.
    pending: Vec<Command>,
    /// Each receive socket's drop count (`SO_RXQ_OVFL`) as last seen.
    overflow: HashMap<RawFd, u32>,
    /// A path asked for the receive offload, which is not loaded (said
    /// once).
    offload_said: bool,
    /// The control packets' sends, batched (io_uring) when it can.
    tx_queue: TxQueue,
    /// Sends completed, waiting to be told to the engine.
    sent: Vec<Sent>,
}

/// A wake-up this late, or work this long, is logged: sessions at 10 ms
/// x 3 do not survive many of them.
const STALL: Duration = Duration::from_millis(10);

/// How soon commands left in the queue are tried again.
const RETRY: Duration = Duration::from_millis(1);

impl Io {
    fn note_busy(&mut self, what: &str, from: Instant, to: Instant) {
        let busy = to.saturating_duration_since(from);
        if busy >= STALL {
            self.held.stalls += 1;
            warn!(
                busy_ms = busy.as_secs_f64() * 1e3,
                what, "BFD thread busy for long"
            );
        }
    }

    /// A wake-up `late` past its deadline.
    fn note_late(&mut self, late: Duration) {
        self.held.worst_late_us = self.held.worst_late_us.max(micros(late));
        if late >= STALL {
            self.held.stalls += 1;
            warn!(
                late_ms = late.as_secs_f64() * 1e3,
                "BFD thread woke late (the host did not run it)"
            );
        }
    }

    /// A stretch of work from `from` to `to`, the thread's usage `before`
    /// it (the thread's own pauses and waits are not in a stretch): the
    /// time it was off its CPU meanwhile, preempted, waiting in a system
    /// call or stopped by the hypervisor.
    fn note_off_cpu(&mut self, (from, to): (Instant, Instant), before: Option<sys::ThreadUsage>) {
        let (Some(a), Some(b)) = (before, sys::thread_usage()) else {
            return;
        };
        let off = to
            .saturating_duration_since(from)
            .saturating_sub(b.cpu.saturating_sub(a.cpu));
        // Switched away while it could run, or because it waited; with
        // neither, its clock stopped without a switch: the hypervisor
        // took the virtual CPU (steal).
        let (worst, why) = if b.involuntary > a.involuntary {
            (&mut self.held.worst_preempted_us, "preempted")
        } else if b.voluntary > a.voluntary {
            (&mut self.held.worst_blocked_us, "waiting in a system call")
        } else {
            (
                &mut self.held.worst_stolen_us,
                "CPU taken by the hypervisor",
            )
        };
        *worst = (*worst).max(micros(off));
        if off >= STALL {
            self.held.stalls += 1;
            warn!(
                off_ms = off.as_secs_f64() * 1e3,
                why, "BFD thread kept off its CPU while working"
            );
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Work the BFD thread leaves to the `bfd-helper` thread.
enum HelperRequest {
    /// A TUN's carrier to set.
    Carrier {
        peer: String,
        tun: Weak<SyncDevice>,
        up: bool,
    },
}

/// The poll token of the wake-up socket; the receive sockets' tokens are
/// their index in [`BfdThread::rx`].
const WAKE: u64 = u64::MAX;
/// Most datagrams one `recvmmsg` takes from a receive socket (one system
/// call per ready socket and wake-up, whether one session or hundreds share
/// its address).
const RX_BATCH: usize = 64;
/// From this many sessions on, the BFD thread wakes at most once per
/// [`COALESCE`]: with hundreds of sessions at 10 ms a packet arrives every
/// few microseconds, and waking for each (a wait, a switch, one packet)
/// cost about a third of the thread's time at 400 sessions. What arrives or
/// falls due meanwhile is handled together, at most that much later: far
/// inside the 75-100 % transmit jitter and the detection time.
const COALESCE_FROM: usize = 64;
const COALESCE: Duration = Duration::from_micros(500);
/// Peers of a status document built between two looks at the timers
/// (about 8 µs a peer of two paths: a slice is well under the
/// [`COALESCE`] pause). A whole document of 500 peers took 2-7 ms, all of
/// it added to the transmit gap of whatever fell due meanwhile.
const STATUS_SLICE: usize = 16;
/// Events handled between two looks at the timers (an event is a log line,
/// an offload arming: some microseconds each).
const CATCH_UP_EVERY: usize = 32;

/// Does, in the order asked, what the BFD thread must not wait for: TUN
/// carriers (the ioctl takes the kernel's rtnl lock, which other work, on
/// this or any network namespace of the host, may hold for a long time).
fn spawn_helper_thread() -> io::Result<mpsc::Sender<HelperRequest>> {
    let (tx, rx) = mpsc::channel::<HelperRequest>();
    std::thread::Builder::new()
        .name("bfd-helper".into())
        .spawn(move || {
            for req in rx {
                let HelperRequest::Carrier { peer, tun, up } = req;
                let Some(tun) = tun.upgrade() else {
                    continue;
                };
                match sys::set_tun_carrier(&*tun, up) {
                    Ok(()) => info!(peer = %peer, carrier = up, "TUN carrier set"),
                    Err(e) => warn!(peer = %peer, error = %e, "could not set TUN carrier"),
                }
            }
        })?;
    Ok(tx)
}

/// How often the paths' quality figures are copied to the metrics.
const QUALITY_EXPORT_INTERVAL: Duration = Duration::from_millis(500);

/// How often the fast paths' counters are added to the paths' (and their
/// interfaces looked up again).
const FAST_PATH_INTERVAL: Duration = Duration::from_millis(500);

impl BfdThread {
    pub fn run(mut self) {
        // Before the real-time priority, which threads inherit: the
        // helper waits for the kernel, at normal priority.
        match spawn_helper_thread() {
            Ok(tx) => self.io.helper = Some(tx),
            Err(e) => error!(error = %e, "no helper thread; TUN carrier is not controlled"),
        }
        match sys::set_realtime_priority(50) {
            Ok(()) => info!("BFD thread running at SCHED_FIFO priority 50"),
            Err(e) => {
                warn!(error = %e, "BFD thread could not get real-time priority; running at normal priority")
            }
        }
        let mut poll = match sys::Epoll::new(1024) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "BFD thread cannot poll; BFD stopped");
                return;
            }
        };
        if let Err(e) = poll.add(self.wake.as_raw_fd(), WAKE) {
            error!(error = %e, "BFD thread cannot poll its commands; BFD stopped");
            return;
        }
        self.register_rx(&poll);
        // Before any path: each is registered with it as it is added.
        self.io.tx_queue = TxQueue::new();
        let mut batch = sys::RecvBatch::new(RX_BATCH, 512);
        let mut woke = clock::now();
        let mut usage = sys::thread_usage();
        loop {
            // Two stretches of work, told apart by the pause: receiving and
            // commands (from the wake-up), then timers and sends.
            if self.engine.paths().len() >= COALESCE_FROM {
                let t = clock::now();
                if let Some(rest) = COALESCE.checked_sub(t.saturating_duration_since(woke)) {
                    self.io.note_off_cpu((woke, t), usage);
                    std::thread::sleep(rest);
                    woke = clock::now();
                    usage = sys::thread_usage();
                }
            }
            let now = clock::now();
            if !self.held {
                self.run_timers(now);
                self.flush(now);
            }
            let mut timeout = self
                .engine
                .poll_timeout()
                .filter(|_| !self.held)
                .map(|t| t.saturating_duration_since(clock::now()));
            if self.io.commands_left {
                timeout = Some(timeout.map_or(RETRY, |t| t.min(RETRY)));
            }
            let before_wait = clock::now();
            self.io.note_busy("timers and sends", now, before_wait);
            self.io.note_off_cpu((woke, before_wait), usage);
            // No deadline: a day (the commands' socket wakes it).
            if let Err(e) = poll.wait(timeout.unwrap_or(Duration::from_secs(86_400))) {
                error!(error = %e, "BFD wait failed");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            woke = clock::now();
            usage = sys::thread_usage();
            if let Some(late) =
                timeout.and_then(|t| woke.saturating_duration_since(before_wait).checked_sub(t))
            {
                self.io.note_late(late);
            }
            if self.io.commands_left && self.handle_commands() {
                self.commands.close();
                return;
            }
            // Readiness is level-triggered: a socket is read for what one
            // wake-up brought, and reported again if it holds more.
            for token in poll.ready() {
                let t = clock::now();
                if token == WAKE {
                    if self.handle_commands() {
                        self.commands.close();
                        return;
                    }
                    self.io.note_busy("commands", t, clock::now());
                } else if !self.held {
                    self.receive(token as usize, &mut batch);
                    self.io.note_busy("receiving", t, clock::now());
                }
            }
            if std::mem::take(&mut self.io.rx_changed) {
                self.register_rx(&poll);
            }
            self.io
                .note_busy("receiving and commands", woke, clock::now());
        }
    }

    /// (Re-)registers every receive socket under its index (what arrived
    /// before is reported by the next wait: the set is level-triggered), or
    /// none while held.
    fn register_rx(&mut self, poll: &sys::Epoll) {
        let mut now_registered = HashSet::new();
        if self.held {
            // Nothing is read while held (what queues is the next
            // process's): a level-triggered set would report it forever.
            for &fd in &self.io.registered {
                let _ = poll.remove(fd);
            }
            self.io.registered = now_registered;
            return;
        }
        for (i, (ip, sock)) in self.rx.iter().enumerate() {
            let fd = sock.as_raw_fd();
            let token = i as u64;
            let r = match self.io.registered.contains(&fd) {
                true => poll.modify(fd, token).or_else(|_| poll.add(fd, token)),
                false => poll.add(fd, token),
            };
            match r {
                Ok(()) => {
                    now_registered.insert(fd);
                }
                Err(e) => error!(local = %ip, error = %e, "BFD receive socket not polled"),
            }
        }
        self.io.registered = now_registered;
    }

    /// Reads, for each offloaded session whose detection time ran out,
    /// when the offload took its last repeat (see [`bfd_offload`]); says
    /// whether any was asked.
    fn refresh_offloaded(&mut self) -> bool {
        let mut any = false;
        while let Some(id) = self.engine.poll_refresh() {
            any = true;
            // Answered whatever there is to read: the session waits for it.
            let (last, packets) = self
                .offload
                .as_mut()
                .and_then(|o| o.read(id))
                .unwrap_or((None, 0));
            self.engine.handle_bfd_refresh(id, last, packets);
        }
        any
    }

    /// Whether the receive offload is loaded. It is loaded before the
    /// thread starts ([`bfd_offload::prepare`]): the verifier takes tens of
    /// milliseconds, which sessions at 10 ms x 3 do not survive. A reload
    /// that asks for it first gets it at the next start (said once).
    fn load_offload(&mut self) -> bool {
        if self.offload.is_some() {
            return true;
        }
        if !self.io.offload_said {
            self.io.offload_said = true;
            warn!("BFD receive offload not loaded at start (unavailable, or first asked for by a reload); every control packet goes through the socket");
        }
        self.engine.stop_offload(None);
        false
    }

    /// Arms and disarms the receive offload as the engine asks.
    fn apply_offload(&mut self) {
        while let Some(change) = self.engine.poll_offload() {
            if self.offload.is_none() && matches!(change, OffloadChange::Disarm(_)) {
                continue;
            }
            if !self.load_offload() {
                return;
            }
            let Some(offload) = self.offload.as_mut() else {
                return;
            };
            let (id, last, done) = match change {
                OffloadChange::Arm { path, packet } => {
                    let Some(p) = self.engine.path(path) else {
                        continue;
                    };
                    let single_hop = p.hop == crate::config::Hop::Single;
                    let arm = bfd_offload::Arm {
                        discriminator: p.session.local_discriminator(),
                        local: p.local.ip(),
                        remote: p.remote.ip(),
                        single_hop,
                        min_ttl: if single_hop { 255 } else { p.min_ttl },
                        packet,
                    };
                    let done = offload.arm(path, &arm);
                    if let Err(e) = &done {
                        warn!(path = %p.name, error = %e, "BFD receive offload not armed; the path's packets go through the socket");
                        self.engine.stop_offload(Some(path));
                    }
                    (path, None, done)
                }
                OffloadChange::Disarm(path) => {
                    let (last, packets) = offload.disarm(path);
                    (path, last, Ok(packets))
                }
            };
            match done {
                Ok(packets) if packets > 0 || last.is_some() => {
                    self.engine.handle_bfd_refresh(id, last, packets)
                }
                Ok(_) => {}
                Err(e) => debug!(error = %e, "BFD receive offload change failed"),
            }
        }
    }

    /// Every offloaded session's last repeat read, and the offload cleared
    /// (a hand-off: the next process receives every packet).
    fn clear_offload(&mut self) {
        let Some(offload) = self.offload.as_mut() else {
            return;
        };
        for (id, last, packets) in offload.clear() {
            self.engine.handle_bfd_refresh(id, last, packets);
        }
        self.engine.forget_offload();
    }

    /// Sends due control packets, logs events, publishes forwarding.
    fn flush(&mut self, now: Instant) {
        self.apply_offload();
        self.send_due(now);
        self.flush_handshakes();
        let mut any = false;
        let mut handled = 0usize;
        while let Some(ev) = self.engine.poll_event() {
            any = true;
            self.on_event(ev);
            // Hundreds of sessions coming up together make as many events
            // (log lines, offload arming): what falls due meanwhile is sent.
            handled += 1;
            if handled % CATCH_UP_EVERY == 0 {
                self.catch_up();
            }
        }
        if let Some(f) = self.engine.poll_forwarding() {
            any = true;
            for (i, p) in self.engine.paths().iter().enumerate() {
                if p.is_retired() {
                    continue;
                }
                if let Some(m) = self.metrics.path(i) {
                    m.set_active(self.engine.is_active(PathId(i as u16)));
                }
            }
            self.steer_fast_paths(&f, false);
            self.forwarding.store(f);
            self.fast_paths_receive();
        }
        if self.io.any_fast
            && self
                .fast_collected
                .is_none_or(|t| now.saturating_duration_since(t) >= FAST_PATH_INTERVAL)
        {
            self.fast_collected = Some(now);
            self.collect_fast_paths();
            let f = self.forwarding.load_full();
            self.steer_fast_paths(&f, true);
            self.fast_paths_receive();
        }
        if any {
            self.export_damping();
        }
        if self
            .quality_exported
            .is_none_or(|t| now.saturating_duration_since(t) >= QUALITY_EXPORT_INTERVAL)
        {
            self.quality_exported = Some(now);
            self.export_quality(now);
            self.note_sent();
        }
    }

    /// Sends every control packet due at `now` (one submission).
    fn send_due(&mut self, now: Instant) {
        while let Some((id, out)) = self.engine.poll_transmit(now) {
            let i = usize::from(id.0);
            let (Some(path), Some(Some(sock))) = (self.engine.path(id), self.tx.get(i)) else {
                continue;
            };
            let data = match &out {
                Ok(t) => t.as_bytes(),
                Err(e) => {
                    error!(error = ?e, "BFD emit failed");
                    continue;
                }
            };
            let queued = sock.connected
                && self
                    .io
                    .tx_queue
                    .push(id, sock.sock.as_raw_fd(), data, &mut self.io.sent);
            if !queued {
                let dst = SocketAddr::new(path.remote.ip(), udp::bfd_port(path.hop));
                let r = sock.send(data, dst);
                self.io.sent.push((id, r));
            }
        }
        self.io.tx_queue.submit(&mut self.io.sent);
        let mut sent = std::mem::take(&mut self.io.sent);
        for (id, r) in sent.drain(..) {
            self.sent(id, r, now);
        }
        self.io.sent = sent;
    }

    /// Runs the timers and sends what fell due while the thread is in the
    /// middle of a long piece of work (a status document of hundreds of
    /// peers, a burst of events or of received packets), so that work
    /// delays no transmission by more than a slice of it. Events the
    /// timers raise wait for the next [`flush`](Self::flush).
    fn catch_up(&mut self) {
        if self.held {
            return;
        }
        let now = clock::now();
        if self.engine.poll_timeout().is_none_or(|t| t > now) {
            return;
        }
        self.run_timers(now);
        self.send_due(now);
    }

    /// The engine's timers, and again once the offload has answered for
    /// the sessions whose detection time ran out.
    fn run_timers(&mut self, now: Instant) {
        self.engine.handle_timeout(now);
        if self.refresh_offloaded() {
            // The sessions the offload kept alive are not due.
            self.engine.handle_timeout(now);
        }
    }

    /// Tells the engine how a control packet's send went.
    fn sent(&mut self, id: PathId, r: io::Result<usize>, now: Instant) {
        match r {
            Ok(_) => self.engine.handle_send_ok(id),
            Err(e) => {
                if let Some(path) = self.engine.path(id) {
                    debug!(path = %path.name, error = %e, "BFD send failed");
                }
                if udp::is_reachability_error(&e) {
                    self.engine.handle_send_error(id, now);
                }
            }
        }
    }

    /// Datagrams sent to a peer over all its paths so far (the lanes' and
    /// the fast path's counts).
    fn sent_to(&self, peer: PeerId) -> u64 {
        let paths = self
            .engine
            .peer(peer)
            .map(|(_, _, p)| p)
            .unwrap_or_default();
        paths
            .iter()
            .filter_map(|id| self.counters.get(usize::from(id.0))?.as_ref())
            .map(|c| c.tx_packets.load(Ordering::Relaxed))
            .fold(0u64, u64::saturating_add)
    }

    /// Tells each key-pair peer's handshake what was sent to it (its rekey
    /// by message count).
    fn note_sent(&mut self) {
        for pi in 0..self.engine.peer_count() {
            let id = PeerId(pi as u16);
            if self.engine.handshake(id).is_some() {
                let sent = self.sent_to(id);
                self.engine.note_peer_sent(id, sent);
            }
        }
    }

    /// Each path's quality figures to its gauges.
    fn export_quality(&self, now: Instant) {
        for pi in 0..self.engine.peer_count() {
            let id = PeerId(pi as u16);
            if let Some(h) = self.engine.handshake(id) {
                let age = h.key_age(now).map(|a| a.as_secs_f64());
                self.metrics.set_handshake(pi, h.stats(), age);
            }
        }
        for (i, p) in self.engine.paths().iter().enumerate() {
            if p.is_retired() {
                continue;
            }
            if let Some(m) = self.metrics.path(i) {
                let f = p.quality.figures(now);
                m.set_quality(
                    (f.loss_tx, f.loss_rx),
                    (f.jitter_tx, f.jitter_rx),
                    p.quality.degraded().is_some(),
                );
            }
        }
    }

    fn export_damping(&self) {
        for (i, p) in self.engine.paths().iter().enumerate() {
            let (Some(m), Some(d)) = (self.metrics.path(i), self.engine.damping(PathId(i as u16)))
            else {
                continue;
            };
            m.set_damping(d.flaps, d.level, d.until.is_some(), p.blocked().is_some());
        }
    }

    /// The peers that have a fast path, with it.
    fn fast_paths(&self) -> impl Iterator<Item = (PeerId, Arc<FastPath>)> + '_ {
        self.fast.iter().enumerate().filter_map(|(i, f)| {
            let f = f.as_ref()?.upgrade()?;
            Some((PeerId(i as u16), f))
        })
    }

    /// Where a fast path sends on path `id`, if it can.
    fn fast_route(&self, id: PathId) -> Option<fastpath::Route> {
        let p = self.engine.path(id)?;
        fastpath::route(id, p.local, p.remote, p.dscp)
    }

    /// Where a peer's fast path sends under its steering `sel`: the active
    /// path, or under `balance` over several paths each bucket's path
    /// (`None`, the lanes carry everything, when a path of it cannot be
    /// carried).
    fn fast_plan(&self, sel: &crate::core::steer::Selection) -> Option<fastpath::Plan> {
        if let Some(table) = sel.bucket_paths(fastpath::BUCKETS) {
            let ids: Vec<PathId> = sel.eligible.iter().map(|&(id, _)| id).collect();
            let routes: Vec<fastpath::Route> =
                ids.iter().filter_map(|&id| self.fast_route(id)).collect();
            if routes.len() != ids.len() {
                return None;
            }
            let buckets = table
                .iter()
                .map(|p| ids.iter().position(|id| id == p))
                .collect::<Option<Vec<usize>>>()?;
            return Some(fastpath::Plan::Table { routes, buckets });
        }
        sel.active
            .and_then(|id| self.fast_route(id))
            .map(fastpath::Plan::One)
    }

    /// Points each fast path at its peer's active path (or at none: the
    /// lanes take everything). `force` writes the sending program's
    /// configuration even if the path did not change, with its interface
    /// looked up again.
    fn steer_fast_paths(&self, f: &Forwarding, force: bool) {
        for (peer, fast) in self.fast_paths() {
            let plan = f
                .peers
                .get(usize::from(peer.0))
                .and_then(|s| self.fast_plan(s));
            let name = self.engine.peer(peer).map_or("?", |(n, _, _)| n);
            match fast.set(plan, force) {
                Ok(()) => {}
                // The periodic look-up repeats the error every time: logged
                // when the forwarding changes only.
                Err(e) if force => debug!(peer = name, error = %e, "fast path not steered"),
                Err(e) => {
                    warn!(peer = name, error = %e, "fast path not steered; the lanes carry the traffic")
                }
            }
        }
    }

    /// Has each fast path receive on all its peer's paths (their
    /// interfaces looked up again).
    fn fast_paths_receive(&self) {
        for (peer, fast) in self.fast_paths() {
            let Some((name, _, ids)) = self.engine.peer(peer) else {
                continue;
            };
            let paths: Vec<_> = ids.iter().filter_map(|&id| self.fast_route(id)).collect();
            if let Err(e) = fast.receive(&paths) {
                debug!(peer = name, error = %e, "fast path not receiving on every path; the lanes receive the rest");
            }
        }
    }

    /// Adds what the fast paths moved to the paths' counters (lane 0 of a
    /// path adds what they received before it answers a probe, too).
    fn collect_fast_paths(&self) {
        for (peer, fast) in self.fast_paths() {
            let Some((_, _, paths)) = self.engine.peer(peer) else {
                continue;
            };
            for &id in paths {
                let Some(Some(c)) = self.counters.get(usize::from(id.0)) else {
                    continue;
                };
                match fast.take(id) {
                    Ok(m) => m.add_to(c),
                    Err(e) => debug!(error = %e, "fast path counters unreadable"),
                }
            }
        }
    }

    /// Cloud failover: carrier follows whether the peer has a usable path.
    /// Set by the `bfd-helper` thread, in order.
    fn set_carrier(&self, peer: PeerId, up: bool) {
        let Some(tun) = self.tuns.get(usize::from(peer.0)).cloned().flatten() else {
            return;
        };
        let name = self.engine.peer(peer).map_or("?", |(n, _, _)| n);
        if let Some(tx) = &self.io.helper {
            let req = HelperRequest::Carrier {
                peer: name.to_string(),
                tun,
                up,
            };
            if tx.send(req).is_err() {
                warn!(peer = name, "helper thread gone; TUN carrier not set");
            }
        }
    }

    fn on_event(&self, ev: Event) {
        match ev {
            Event::PathState {
                path,
                from,
                to,
                diag,
                administrative,
            } => {
                let Some(p) = self.engine.path(path) else {
                    return;
                };
                let peer = self.engine.peer(p.peer).map_or("?", |(n, _, _)| n);
                let remote_diag = p.session.remote_diag().as_str();
                if administrative {
                    info!(peer, path = %p.name, from = from.as_str(), to = to.as_str(), diag = diag.as_str(), remote_diag, "path state (administrative, not a failure)");
                } else {
                    info!(peer, path = %p.name, from = from.as_str(), to = to.as_str(), diag = diag.as_str(), remote_diag, "path state");
                }
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
                cause,
            } => {
                let name = |id: Option<PathId>| {
                    id.and_then(|i| self.engine.path(i))
                        .map_or("none".to_string(), |p| p.name.clone())
                };
                let (from_name, to_name) = (name(from), name(to));
                let peer_name = self.engine.peer(peer).map_or("?", |(n, _, _)| n);
                let flows = from
                    .and_then(|i| self.counters.get(usize::from(i.0)))
                    .and_then(Option::as_ref)
                    .map_or(0, |c| c.flows.load(Ordering::Relaxed));
                let cause_name = cause.as_str();
                match (detection, cause) {
                    (Some(d), _) => {
                        warn!(peer = peer_name, from = %from_name, to = %to_name, detection_ms = d.as_secs_f64() * 1e3, flows, cause = cause_name, "failover")
                    }
                    (None, MoveCause::Degraded(_)) => {
                        warn!(peer = peer_name, from = %from_name, to = %to_name, flows, cause = cause_name, "traffic moved off a degraded path")
                    }
                    (None, _) => {
                        info!(peer = peer_name, from = %from_name, to = %to_name, flows, cause = cause_name, "active path changed")
                    }
                }
                self.metrics
                    .record_failover(usize::from(peer.0), &from_name, &to_name, detection);
                self.metrics.record_move(usize::from(peer.0), cause_name);
            }
            Event::PeerUp { peer, up } => {
                let name = self.engine.peer(peer).map_or("?", |(n, _, _)| n);
                if up {
                    info!(peer = name, "peer up");
                } else {
                    warn!(peer = name, "peer down: no path left");
                }
                self.metrics.set_peer_up(usize::from(peer.0), up);
                self.set_carrier(peer, up);
            }
            Event::Quality { path, transition } => {
                let Some(p) = self.engine.path(path) else {
                    return;
                };
                let peer = self.engine.peer(p.peer).map_or("?", |(n, _, _)| n);
                let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
                let pct = |r: Option<f64>| r.map_or(-1.0, |r| r * 100.0);
                match transition {
                    Transition::Degraded(reason, f) => {
                        // What tripped a loss verdict: the figures above are
                        // over 3 s, a trip may be over 100 ms.
                        let tripped = f.trip.map_or_else(|| "-".to_string(), |t| t.to_string());
                        warn!(peer, path = %p.name, reason = reason.as_str(), loss_tx_pct = pct(f.loss_tx), loss_rx_pct = pct(f.loss_rx), rtt_ms = ms(f.rtt), jitter_ms = ms(f.jitter_tx), large_probes_lost = f.large_lost_run, tripped_by = %tripped, load = format!("{:.2}", p.estimate.load()), congested = p.estimate.congested(clock::now()), "path degraded")
                    }
                    Transition::Recovered(f) => {
                        info!(peer, path = %p.name, loss_tx_pct = pct(f.loss_tx), loss_rx_pct = pct(f.loss_rx), rtt_ms = ms(f.rtt), jitter_ms = ms(f.jitter_tx), "path quality good again")
                    }
                }
                self.export_quality(clock::now());
            }
            Event::PathBlock { path, cause } => {
                let Some(p) = self.engine.path(path) else {
                    return;
                };
                let peer = self.engine.peer(p.peer).map_or("?", |(n, _, _)| n);
                match cause {
                    Some(c) => {
                        warn!(peer, path = %p.name, cause = c.as_str(), "path out of service")
                    }
                    None => info!(peer, path = %p.name, "path back in service"),
                }
            }
            Event::Fec {
                peer,
                from,
                to,
                loss,
                congested,
            } => {
                let name = self.engine.peer(peer).map_or("?", |(n, _, _)| n);
                let code =
                    |c: Option<Code>| c.map_or_else(|| "none".to_string(), |c| c.to_string());
                let overhead_pct = to.map_or(0.0, Code::overhead) * 100.0;
                let why = if congested {
                    "the loss looks like congestion"
                } else if to.is_none() {
                    "the loss is below the target"
                } else {
                    "sized by the measured loss"
                };
                info!(peer = name, from = %code(from), to = %code(to), overhead_pct, loss_pct = loss * 100.0, congested, why, "forward error correction changed");
                self.metrics
                    .set_fec_overhead(usize::from(peer.0), to.map_or(0.0, Code::overhead));
            }
        }
    }

    fn receive(&mut self, i: usize, batch: &mut sys::RecvBatch) {
        loop {
            // Looked up again for each batch: the catch-up between two
            // batches borrows the thread whole (it leaves the sockets be).
            let Some((local, sock)) = self.rx.get(i) else {
                return;
            };
            let local = *local;
            let n = match batch.recv_queued(sock) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "BFD receive error");
                    return;
                }
            };
            let now = clock::now();
            // The socket's drops, as of the batch's last datagram.
            if let Some(total) = n.checked_sub(1).and_then(|last| batch.overflow(last)) {
                let seen = self.io.overflow.insert(sock.as_raw_fd(), total);
                // A count below the last one seen is a new socket's (a
                // reload reused the descriptor): all of it is new.
                let new = seen.map_or(total, |s| total.checked_sub(s).unwrap_or(total));
                if new > 0 {
                    self.drops.add(DropReason::BfdOverflow, u64::from(new));
                }
            }
            for k in 0..n {
                let ttl = batch.ttl(k);
                // A message longer than the buffer (no BFD packet is) or
                // of an unknown family.
                let Some((data, src, _, _)) = batch.get_mut(k) else {
                    self.drops.count(DropReason::BfdMalformed);
                    continue;
                };
                if let Err(reason) = self.engine.handle_bfd_datagram(local, src, ttl, data, now) {
                    self.drops.count(reason);
                }
            }
            // A full batch: more may be queued (level-triggered, the next
            // wait would say so too, but only after the coalescing pause).
            if n < RX_BATCH {
                return;
            }
            self.catch_up();
        }
    }

    /// Returns true when the thread should exit: at `Shutdown`, or once
    /// every sender is gone (the process is exiting, an old one after an
    /// upgrade included: its wake-up socket would read as ready for ever).
    fn handle_commands(&mut self) -> bool {
        let mut sink = [0u8; 64];
        let mut senders_gone = false;
        loop {
            match (&self.wake).read(&mut sink) {
                Ok(0) => {
                    senders_gone = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut pending = std::mem::take(&mut self.io.pending);
        self.io.commands_left = self.commands.try_take(&mut pending).is_none();
        for cmd in pending.drain(..) {
            let t = clock::now();
            let kind = match &cmd {
                Command::Status(_) => "status",
                Command::Ping(_) => "ping",
                Command::Shutdown(_) => "shutdown",
                Command::Link { .. } => "link",
                Command::SendError(_) => "send error",
                Command::Quality(..) => "quality sample",
                Command::Handshake(..) | Command::SessionUsed(..) => "handshake",
                Command::Apply(..) => "reload",
                Command::Freeze(_) | Command::Thaw | Command::Restore(..) => "upgrade",
            };
            self.io.note_busy(kind, t, t);
            match cmd {
                Command::Status(reply) => {
                    self.collect_fast_paths();
                    let _ = reply.send(self.status());
                }
                Command::Ping(reply) => {
                    let _ = reply.send(());
                }
                Command::Shutdown(reply) => {
                    self.shutdown();
                    let _ = reply.send(());
                    return true;
                }
                Command::Link { path, up } => {
                    self.engine.handle_link_event(path, up, clock::now());
                }
                Command::SendError(path) => {
                    self.engine.handle_send_error(path, clock::now());
                }
                Command::Quality(path, sample) => {
                    self.engine
                        .handle_quality_sample(path, &sample, clock::now());
                }
                Command::Handshake(path, datagram) => {
                    let now = clock::now();
                    self.engine.handle_handshake(path, &datagram, now);
                    self.flush(now);
                }
                Command::SessionUsed(path, epoch) => {
                    self.engine.handle_session_used(path, epoch);
                    self.flush(clock::now());
                }
                Command::Apply(plan, reply) => {
                    let applied = self.apply(*plan);
                    let _ = reply.send(applied);
                }
                Command::Freeze(reply) => {
                    self.held = true;
                    self.io.rx_changed = true;
                    self.clear_offload();
                    // What the fast paths moved so far goes into the
                    // counters handed over. Their programs forward on
                    // until this process exits (their links close with
                    // it): what they move meanwhile is not counted.
                    self.collect_fast_paths();
                    let _ = reply.send(Frozen {
                        sessions: self.engine.export_sessions(clock::now()),
                        handshakes: self.engine.export_handshakes(clock::now()),
                    });
                }
                Command::Thaw => self.resume(),
                Command::Restore(state, reply) => {
                    let now = clock::now();
                    let mut problems = Vec::new();
                    let mut restored = Vec::new();
                    for s in state.sessions {
                        let id = self
                            .engine
                            .peer_by_name(&s.peer)
                            .and_then(|peer| self.engine.path_by_name(peer, &s.path));
                        // A path the new configuration no longer has.
                        let Some(id) = id else {
                            continue;
                        };
                        match self.engine.restore_session(id, &s, now) {
                            Ok(()) => restored.push((id, s)),
                            Err(e) => problems.push(e.to_string()),
                        }
                    }
                    self.engine.restore_steering(&restored, now);
                    for (name, hs) in &state.handshakes {
                        let taken = self
                            .engine
                            .peer_by_name(name)
                            .is_some_and(|peer| self.engine.import_handshake(peer, hs, now));
                        if !taken {
                            problems.push(format!(
                                "peer {name}: its handshake starts afresh (no longer a key-pair \
                                 peer, or other keys)"
                            ));
                        }
                    }
                    // The data plane's keys before the lanes start.
                    self.flush_handshakes();
                    self.resume();
                    // The fast paths' programs (attached behind the old
                    // process's, which run first until it exits) get their
                    // configuration before the old process is told to go.
                    self.flush(now);
                    if self.io.any_fast {
                        let f = self.forwarding.load_full();
                        self.steer_fast_paths(&f, true);
                        self.fast_paths_receive();
                    }
                    let _ = reply.send(problems);
                }
            }
            self.io.note_busy(kind, t, clock::now());
            self.catch_up();
        }
        self.io.pending = pending;
        if senders_gone {
            debug!("BFD thread: every command sender is gone; stopping");
        }
        senders_gone
    }

    /// Sends and receives again; what arrived meanwhile is read at once.
    fn resume(&mut self) {
        self.held = false;
        self.io.rx_changed = true;
    }

    /// AdminDown on every path (RFC 5880 §6.8.16), sent a few times since
    /// a single packet may be lost.
    fn shutdown(&mut self) {
        let now = clock::now();
        self.engine.set_admin_down_all(now);
        let mut packets = Vec::new();
        while let Some((id, out)) = self.engine.poll_transmit(now) {
            if let Ok(t) = out {
                packets.push((id, t));
            }
        }
        self.send_final(&packets, Duration::from_millis(5));
        while let Some(ev) = self.engine.poll_event() {
            self.on_event(ev);
        }
    }

    /// Sends last packets (AdminDown) three times, `spacing` apart (no
    /// spacing on reload, where the other sessions must keep their slots).
    /// The copies are identical: with meticulous authentication the peer accepts
    /// the first that arrives and drops the others as replays, which is harmless.
    fn send_final(&self, packets: &[(PathId, Transmit)], spacing: Duration) {
        let mut wire = Vec::new();
        for (id, t) in packets {
            if let Some(path) = self.engine.path(*id) {
                let dst = SocketAddr::new(path.remote.ip(), udp::bfd_port(path.hop));
                wire.push((usize::from(id.0), dst, t.as_bytes().to_vec()));
            }
        }
        for round in 0..3 {
            if round > 0 && !spacing.is_zero() {
                std::thread::sleep(spacing);
            }
            for (i, dst, bytes) in &wire {
                if let Some(Some(sock)) = self.tx.get(*i) {
                    let _ = sock.send(bytes, *dst);
                }
            }
        }
    }

    /// Applies a reload [`Plan`]: removals (AdminDown sent), then additions.
    /// Sends the handshakes' messages on the data sockets of their paths and
    /// gives new session keys to the peers' lanes.
    fn flush_handshakes(&mut self) {
        while let Some((id, datagram)) = self.engine.poll_handshake() {
            let (Some(path), Some(Some(sock))) =
                (self.engine.path(id), self.data_tx.get(usize::from(id.0)))
            else {
                continue;
            };
            if let Err(e) = sock.send_to(&datagram, path.remote) {
                debug!(path = %path.name, error = %e, "handshake send failed");
            }
        }
        while let Some((peer, keys)) = self.engine.poll_keys() {
            if let Some(Some(shared)) = self.peer_keys.get(usize::from(peer.0)) {
                let epoch = keys.session_epoch();
                let name = self.engine.peer(peer).map_or("?", |p| p.0);
                debug!(peer = %name, send_epoch = ?epoch, "session keys changed");
                shared.store(Some(Arc::new(keys)));
            }
        }
    }

    fn apply(&mut self, plan: Plan) -> Applied {
        let now = clock::now();
        let mut finals = Vec::new();
        for id in plan.remove_paths {
            self.metrics.remove_path(usize::from(id.0));
            if let Some(pkt) = self.engine.remove_path(id, now) {
                finals.push((id, pkt));
            }
        }
        for id in plan.remove_peers {
            self.metrics.remove_peer(usize::from(id.0));
            if let Some(t) = self.tuns.get_mut(usize::from(id.0)) {
                *t = None;
            }
            if let Some(t) = self.fast.get_mut(usize::from(id.0)) {
                *t = None;
            }
            if let Some(k) = self.peer_keys.get_mut(usize::from(id.0)) {
                *k = None;
            }
            let paths = self.engine.peer(id).map(|(_, _, p)| p.to_vec());
            for path in paths.unwrap_or_default() {
                self.metrics.remove_path(usize::from(path.0));
            }
            finals.extend(self.engine.remove_peer(id, now));
        }
        self.send_final(&finals, Duration::ZERO);
        for (id, _) in &finals {
            if let Some(slot) = self.tx.get_mut(usize::from(id.0)) {
                *slot = None;
                self.io.tx_queue.set_socket(*id, None);
            }
            if let Some(slot) = self.data_tx.get_mut(usize::from(id.0)) {
                *slot = None;
            }
        }
        self.io.rx_changed |= !plan.remove_rx.is_empty() || !plan.add_rx.is_empty();
        self.rx.retain(|(ip, _)| !plan.remove_rx.contains(ip));
        self.rx.extend(plan.add_rx);
        for (id, tx, rx, mult) in plan.set_timers {
            if self.engine.set_timers(id, tx, rx, mult, now) {
                let name = self.engine.path(id).map_or("?", |p| p.name.as_str());
                info!(path = %name, tx_us = tx.as_micros() as u64, rx_us = rx.as_micros() as u64, multiplier = mult, "BFD timers applied with a poll sequence");
            }
        }
        for (id, rate) in plan.set_rates {
            self.engine.set_rate(id, rate);
        }
        for (id, on) in plan.set_offload {
            self.engine.set_offload(id, on);
        }
        // Before any timer runs: a session no longer offloaded goes on from
        // its last repeat.
        self.apply_offload();
        for (id, fec) in plan.set_fec {
            self.engine.set_fec(id, fec, now);
        }
        for (id, wait) in plan.set_reorder_wait {
            self.engine.set_reorder_wait(id, wait);
        }
        for (id, sla) in plan.set_sla {
            self.engine.set_sla(id, sla);
        }
        self.engine.set_secrets(plan.secrets);
        let mut applied = Applied::default();
        for peer in &plan.add_peers {
            let (tun, fast) = plan
                .add_tuns
                .iter()
                .find(|(name, _, _)| *name == peer.name)
                .map(|(_, t, f)| (Some(t.clone()), f.clone()))
                .unwrap_or_default();
            let reorder = plan
                .add_reorder
                .iter()
                .find(|(name, _)| *name == peer.name)
                .map(|(_, r)| r.clone());
            self.add_peer(peer, tun, fast, now, &mut applied);
            if let Some(id) = applied
                .peers
                .last()
                .filter(|(n, _)| *n == peer.name)
                .map(|p| p.1)
            {
                self.metrics.set_reorder(usize::from(id.0), reorder.clone());
                *slot(&mut self.reorder, usize::from(id.0)) = reorder;
            }
        }
        for (name, handshake, keys) in plan.add_handshakes {
            let Some(id) = self.engine.peer_by_name(&name) else {
                continue;
            };
            self.engine.set_handshake(id, Some(handshake));
            *slot(&mut self.peer_keys, usize::from(id.0)) = Some(keys);
        }
        for path in plan.add_paths {
            self.add_path(path, now, &mut applied);
        }
        self.io.any_fast = self.fast.iter().any(Option::is_some);
        if !self.held {
            self.flush(now);
        } else if self.io.any_fast {
            // A process taking over: the receiving programs go on the
            // paths' interfaces now (behind the old process's, which take
            // everything until it exits), not in the handover, when the
            // thread should be reading BFD again at once.
            self.fast_paths_receive();
        }
        applied
    }

    fn add_peer(
        &mut self,
        peer: &PeerConfig,
        tun: Option<Arc<SyncDevice>>,
        fast: Option<Arc<FastPath>>,
        now: Instant,
        applied: &mut Applied,
    ) {
        let bare = PeerConfig {
            paths: Vec::new(),
            ..peer.clone()
        };
        let Some(id) = self.engine.add_peer(&bare, now) else {
            error!(peer = %peer.name, "too many peers; not added");
            return;
        };
        self.metrics.add_peer(usize::from(id.0), &peer.name);
        *slot(&mut self.tuns, usize::from(id.0)) = tun.as_ref().map(Arc::downgrade);
        *slot(&mut self.fast, usize::from(id.0)) = fast.as_ref().map(Arc::downgrade);
        *slot(&mut self.meta.peers, usize::from(id.0)) =
            Some((peer.tun.clone(), peer.policy.as_str().to_string()));
        applied.peers.push((peer.name.clone(), id));
    }

    fn add_path(&mut self, new: NewPath, now: Instant, applied: &mut Applied) {
        let c = &new.config;
        let Some(peer) = self.engine.peer_by_name(&new.peer) else {
            error!(peer = %new.peer, path = %c.name, "path added to an unknown peer");
            return;
        };
        if let Err(e) = self.engine.check_path_auth(c) {
            error!(peer = %new.peer, path = %c.name, error = %e, "path not added");
            return;
        }
        let Some(id) = self.engine.add_path(peer, c, now) else {
            error!(peer = %new.peer, path = %c.name, "too many paths; not added");
            return;
        };
        let i = usize::from(id.0);
        let labels = PathLabels {
            peer: &new.peer,
            path: &c.name,
            local: c.local.to_string(),
            remote: c.remote.to_string(),
        };
        self.metrics.add_path(i, &labels, new.counters.clone());
        if let Some(p) = self.engine.path(id) {
            let dst = SocketAddr::new(p.remote.ip(), udp::bfd_port(p.hop));
            let sock = TxSocket::new(new.bfd_tx, dst);
            self.io.tx_queue.set_socket(id, Some(sock.sock.as_raw_fd()));
            *slot(&mut self.tx, i) = Some(sock);
        }
        *slot(&mut self.data_tx, i) = Some(new.data_tx);
        *slot(&mut self.counters, i) = Some(new.counters);
        *slot(&mut self.meta.paths, i) = Some((c.priority, c.weight));
        applied.paths.push((new.peer, c.name.clone(), id));
    }

    /// The status document, built a few peers at a time: with hundreds
    /// of peers it takes milliseconds, and what falls due meanwhile is sent
    /// between the slices ([`catch_up`](Self::catch_up)).
    fn status(&mut self) -> Status {
        let mut peers = Vec::new();
        for pi in 0..self.engine.peer_count() {
            if let Some(peer) = self.peer_status(pi) {
                peers.push(peer);
            }
            if (pi + 1) % STATUS_SLICE == 0 {
                self.catch_up();
            }
        }
        Status {
            gateway: self.meta.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: clock::now()
                .saturating_duration_since(self.meta.started)
                .as_secs(),
            peers,
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r.as_str().to_string(), self.drops.get(r)))
                .filter(|&(_, n)| n > 0)
                .collect(),
            bfd_thread: Some(self.io.held.clone()),
        }
    }

    fn peer_status(&self, pi: usize) -> Option<PeerStatus> {
        let (name, up, ids) = self.engine.peer(PeerId(pi as u16))?;
        let (tun, policy) = self
            .meta
            .peers
            .get(pi)
            .cloned()
            .flatten()
            .unwrap_or_default();
        let paths: Vec<PathStatus> = ids.iter().filter_map(|&id| self.path_status(id)).collect();
        let active_path = paths.iter().find(|p| p.active).map(|p| p.name.clone());
        let reorder = self.reorder_status(PeerId(pi as u16));
        let fec = self.fec_status(PeerId(pi as u16));
        let now = clock::now();
        let handshake = self.engine.handshake(PeerId(pi as u16)).map(|h| {
            let stats = h.stats();
            HandshakeStatus {
                state: h.state().as_str().to_string(),
                keys_age_s: h.key_age(now).map(|a| a.as_secs()),
                completed: stats.completed,
                rekeys: stats.completed.saturating_sub(1),
                failures: Failure::ALL
                    .iter()
                    .map(|f| (f.as_str().to_string(), stats.failures(*f)))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
            }
        });
        Some(PeerStatus {
            name: name.to_string(),
            tun,
            up,
            policy,
            active_path,
            paths,
            reorder,
            fec,
            handshake,
        })
    }

    fn path_status(&self, id: PathId) -> Option<PathStatus> {
        let i = usize::from(id.0);
        let p = self.engine.path(id)?;
        let c = self.counters.get(i)?.as_ref()?;
        let (priority, weight) = self.meta.paths.get(i).copied().flatten().unwrap_or((0, 0));
        let s = &p.session;
        let state = match s.state() {
            _ if p.blocked().is_some() => "down",
            State::Up => "up",
            State::Down => "down",
            State::Init => "init",
            State::AdminDown => "admin_down",
        };
        let damping = self.engine.damping(id);
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
                remote_diag: s.remote_diag().as_str().to_string(),
                max_tx_gap_us: s.max_tx_gap().as_micros() as u64,
                auth: s.auth_enabled(),
                failures: p.failures,
                remote_admin_downs: p.remote_admin_downs,
                local_discriminator: s.local_discriminator(),
                remote_discriminator: s.remote_discriminator(),
                tx_interval_us: s.tx_interval().as_micros() as u64,
                detect_time_us: s.detection_time().as_micros() as u64,
                rtt_us: c.rtt().map(|d| d.as_micros() as u64),
                transitions: s.transitions(),
                last_change_unix: s.last_change().map(clock::unix_seconds),
                control_tx: p.control_tx,
                control_rx: p.control_rx,
                offloaded: p.is_offloaded(),
            },
            blocked: p.blocked().map(|b| b.as_str().to_string()),
            flaps: damping.map_or(0, |d| d.flaps),
            damping_level: damping.map_or(0, |d| d.level),
            damped_until_unix: damping.and_then(|d| d.until).map(clock::unix_seconds),
            quality: self.quality_status(id),
            aggregate: self.aggregate_status(id),
            tx_packets: load(&c.tx_packets),
            rx_packets: load(&c.rx_packets),
            tx_bytes: load(&c.tx_bytes),
            rx_bytes: load(&c.rx_bytes),
        })
    }
}

impl BfdThread {
    /// The peer's FEC setting, code and counts (none when it is off and
    /// never did anything).
    fn fec_status(&self, peer: PeerId) -> Option<FecStatus> {
        let (config, code, loss) = self.engine.fec(peer, clock::now());
        let c = self.reorder.get(usize::from(peer.0))?.as_ref()?;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let f = &c.fec;
        let counts = [
            load(&f.parity_sent),
            load(&f.parity_received),
            load(&f.recovered),
            load(&f.unrecoverable).saturating_sub(load(&f.late_after_give_up)),
        ];
        if config.mode == FecMode::Off && counts.iter().all(|&n| n == 0) {
            return None;
        }
        Some(FecStatus {
            mode: config.mode.to_string(),
            code: code.map_or_else(|| "none".to_string(), |c| c.to_string()),
            overhead_ratio: code.map_or(0.0, Code::overhead),
            loss,
            parity_sent: counts[0],
            parity_received: counts[1],
            recovered: counts[2],
            unrecoverable: counts[3],
            bad_parity: load(&f.bad_parity),
        })
    }

    /// What the peer's lanes did to put spread packets back in order (a
    /// peer that never received any shows none).
    fn reorder_status(&self, peer: PeerId) -> Option<ReorderStatus> {
        let c = self.reorder.get(usize::from(peer.0))?.as_ref()?;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let board = self.engine.board(peer);
        let wait = board.map_or(Duration::ZERO, |b| b.wait());
        let policy_aggregate = self
            .meta
            .peers
            .get(usize::from(peer.0))
            .and_then(|p| p.as_ref())
            .is_some_and(|(_, pol)| pol == "aggregate");
        let held = load(&c.held);
        if held == 0 && load(&c.late) == 0 && !policy_aggregate {
            return None;
        }
        Some(ReorderStatus {
            held,
            reordered: load(&c.reordered),
            gave_up: load(&c.gave_up),
            late: load(&c.late),
            buffered_packets: load(&c.occupancy),
            buffered_bytes: load(&c.occupancy_bytes),
            wait_us: u64::try_from(wait.as_micros()).unwrap_or(u64::MAX),
        })
    }

    /// Under `aggregate`: the path's share of the packets sent, and its
    /// estimated rate and one-way delay.
    fn aggregate_status(&self, id: PathId) -> Option<AggregateStatus> {
        let p = self.engine.path(id)?;
        let aggregate = self
            .meta
            .peers
            .get(usize::from(p.peer.0))
            .and_then(|m| m.as_ref())
            .is_some_and(|(_, pol)| pol == "aggregate");
        if !aggregate {
            return None;
        }
        let board = self.engine.board(p.peer)?;
        let total: u64 = board
            .paths
            .iter()
            .map(|b| b.picked.load(Ordering::Relaxed))
            .sum();
        let bp = board.path(id)?;
        let picked = bp.picked.load(Ordering::Relaxed);
        Some(AggregateStatus {
            share: if total == 0 {
                0.0
            } else {
                picked as f64 / total as f64
            },
            rate_bps: bp.rate.load(Ordering::Relaxed).saturating_mul(8),
            delay_us: bp.delay_ns.load(Ordering::Relaxed) / 1000,
            pace_bps: bp.pace_rate().map(|r| r.saturating_mul(8)),
        })
    }

    fn quality_status(&self, id: PathId) -> QualityStatus {
        let Some(p) = self.engine.path(id) else {
            return QualityStatus::default();
        };
        let f = p.quality.figures(clock::now());
        let us = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let reason = p.quality.degraded();
        QualityStatus {
            loss_ratio_tx: f.loss_tx,
            loss_ratio_rx: f.loss_rx,
            rtt_us: us(f.rtt),
            jitter_us: us(f.jitter_tx),
            jitter_rx_us: us(f.jitter_rx),
            reorder_ratio: f.reorder,
            degraded: reason.is_some(),
            degraded_reason: reason.map(|r| r.as_str().to_string()),
            probe_interval_us: us(f.probe_interval),
        }
    }
}

fn slot<T>(v: &mut Vec<Option<T>>, i: usize) -> &mut Option<T> {
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    &mut v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The time off the CPU in a stretch of work is told from the
    /// thread's own CPU time: a wait in a system call counts (as waiting,
    /// not preempted), work on the CPU does not.
    #[test]
    fn time_off_the_cpu_in_work_is_measured() {
        let mut io = Io::default();
        let ms = Duration::from_millis;
        // Waiting 30 ms in a system call.
        let (from, before) = (clock::now(), sys::thread_usage());
        std::thread::sleep(ms(30));
        io.note_off_cpu((from, clock::now()), before);
        assert!(io.held.worst_blocked_us >= 25_000, "{:?}", io.held);
        assert_eq!(io.held.stalls, 1);
        // 30 ms of work on the CPU (a loaded host may take some of it).
        let mut busy_io = Io::default();
        let (from, before) = (clock::now(), sys::thread_usage());
        let mut x = 0u64;
        while clock::now().saturating_duration_since(from) < ms(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        busy_io.note_off_cpu((from, clock::now()), before);
        let h = &busy_io.held;
        assert!(
            h.worst_blocked_us + h.worst_preempted_us + h.worst_stolen_us < 25_000,
            "{h:?}"
        );
        // A late wake-up.
        io.note_late(ms(12));
        assert_eq!(io.held.worst_late_us, 12_000);
        assert_eq!(io.held.stalls, 2);
    }
}
