//! `crosslink relay`: a delaying relay for the lab (a hidden subcommand), and
//! [`Lab::delay`], which puts one on a path, at the receiving gateway.
//!
//! The kernel has no netem here, so delay is made in userspace: an iptables
//! rule in the *receiving* gateway's namespace hands a path's packets to an
//! NFQUEUE as they arrive (`-t mangle -A PREROUTING -i pathN -j NFQUEUE
//! --queue-num Q`: on gateway B for A to B, on gateway A for B to A; the
//! pre-routing hook sees the gateway's UDP datagrams and BFD packets as well
//! as anything forwarded, as in the kernel-only lab). The relay bound to that
//! queue copies only the packets' metadata, never their bytes, and holds each
//! packet's verdict until its release time, then accepts it unchanged: the
//! packet itself waits in the kernel. Super-packets (GSO) are queued whole,
//! not cut into segments first (`NFQA_CFG_F_GSO`).
//!
//! Why at the receiver: a packet held on its sender's egress stays charged
//! to the sending socket meanwhile, and TCP's small-queue limit (about a
//! millisecond of its rate) then stops a sender on that host after a
//! millisecond's worth: a TCP stream of gateway A's own through 25 ms on
//! A's egress ran at 2 Mbit/s here, against 281 Mbit/s with the same delay
//! at B's ingress (the path shaped to 300 Mbit/s). A packet that crosses
//! the veth is no longer its sender's. The receive offload's BPF program
//! (`offload = true`) takes BFD control packets before netfilter sees them,
//! so with it on BFD itself is not delayed.
//!
//! Release time: arrival + delay + a jitter drawn uniformly from
//! `[-jitter, +jitter]` (never before arrival), and, unless `--reorder`, no
//! earlier than the packet before it (`max(previous release, arrival +
//! delay ± jitter)`), so a direction stays in order as on a real link; with
//! jitter that makes the mean delay somewhat larger than `delay`. Arrival is
//! when the relay reads the packet, woken by epoll as the kernel queues it;
//! it sleeps until the next release (whole milliseconds in epoll, the last
//! fraction in a precise sleep), and idle it sleeps.
//!
//! Commands on stdin, one a line, change the settings at run time; a packet
//! already held keeps its release time, a later one gets the new settings
//! (so a step down does not reorder: it waits behind the packets still held).
//! `delay 30ms`, `jitter 5ms`, `delay 30ms jitter 5ms` (both at once),
//! `reorder on|off`, `stats`. Every line is answered with one JSON line on
//! stdout: the settings and counters, or `{"error": ...}`. Stdin's end,
//! SIGTERM and SIGINT stop the relay: it accepts every packet it holds, in
//! order, and prints its counters.
//!
//! If the relay dies (killed), packets that reach the queue are dropped, not
//! passed undelayed: no `--queue-bypass`, and no fail-open when the queue is
//! full. A path whose relay is gone looks cut, which a test sees, rather than
//! silently losing its delay. [`Lab::heal`] takes the rule out before it stops
//! the relay, so healing loses nothing.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::io::{self, BufRead};
use std::os::fd::RawFd;
use std::process::ChildStdin;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::Serialize;

use super::probe::{parse_duration, stop_flag_on_signals};
use super::*;

/// The kernel queue's length: packets waiting for their verdict, held ones
/// included. 2000 packet/s held 1 s fit twice.
pub const DEFAULT_MAX_LEN: u32 = 4096;

/// The largest delay or jitter accepted.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// The NFQUEUE number to serve.
    #[arg(long)]
    pub queue: u16,
    /// Delay added to every packet ("30ms").
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub delay: Duration,
    /// Each packet's delay varies by up to this much either way ("5ms").
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub jitter: Duration,
    /// Let jitter reorder packets (by default a packet never leaves before the
    /// one ahead of it).
    #[arg(long)]
    pub reorder: bool,
    /// The kernel queue's length (packets awaiting a verdict, held ones too).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    pub max_len: u32,
}

/// The relay's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub delay: Duration,
    pub jitter: Duration,
    pub reorder: bool,
}

/// A line of stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayCommand {
    /// New delay and/or jitter (whichever is given).
    Set {
        delay: Option<Duration>,
        jitter: Option<Duration>,
    },
    Reorder(bool),
    Stats,
}

/// Parses a command line: `delay D`, `jitter D` (in either order, one or
/// both), `reorder on|off`, `stats`.
pub fn parse_command(line: &str) -> Result<RelayCommand, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => Ok(RelayCommand::Stats),
        ["reorder", "on"] => Ok(RelayCommand::Reorder(true)),
        ["reorder", "off"] => Ok(RelayCommand::Reorder(false)),
        [] => Err("empty command".into()),
        _ => {
            let (mut delay, mut jitter) = (None, None);
            for pair in words.chunks(2) {
                let [key, value] = pair else {
                    return Err(format!("{line:?}: expected `delay D`, `jitter D`"));
                };
                let d = parse_duration(value)?;
                if d > MAX_DELAY {
                    return Err(format!("{value} is more than {MAX_DELAY:?}"));
                }
                let slot = match *key {
                    "delay" => &mut delay,
                    "jitter" => &mut jitter,
                    other => return Err(format!("unknown command {other:?}")),
                };
                if slot.replace(d).is_some() {
                    return Err(format!("{key} given twice in {line:?}"));
                }
            }
            Ok(RelayCommand::Set { delay, jitter })
        }
    }
}

/// When each packet goes: the release times of one direction.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub settings: Settings,
    last: Option<Instant>,
    rng: u64,
}

impl Schedule {
    pub fn new(settings: Settings, seed: u64) -> Self {
        Schedule {
            settings,
            last: None,
            // xorshift must not start at 0
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The release time of a packet that arrived at `arrival`.
    pub fn release_at(&mut self, arrival: Instant) -> Instant {
        let Settings {
            delay,
            jitter,
            reorder,
        } = self.settings;
        let mut hold = delay;
        if !jitter.is_zero() {
            let span = u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX / 4);
            let draw = self.next_random() % (2 * span + 1);
            hold = if draw >= span {
                hold + Duration::from_nanos(draw - span)
            } else {
                hold.saturating_sub(Duration::from_nanos(span - draw))
            };
        }
        let target = arrival + hold;
        let release = match self.last {
            Some(last) if !reorder => target.max(last),
            _ => target,
        };
        self.last = Some(self.last.map_or(release, |l| l.max(release)));
        release
    }
}

/// A packet whose verdict waits (the packet itself waits in the kernel).
struct Held {
    release: Instant,
    seq: u64,
    msg: nfq::Message,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.release, self.seq) == (other.release, other.seq)
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    /// Reversed: the heap's top is the earliest release (then the earliest
    /// arrival).
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.release, other.seq).cmp(&(self.release, self.seq))
    }
}

/// The counters and settings printed after every command and at the end.
#[derive(Debug, Clone, Serialize)]
pub struct RelayStats {
    pub queue: u16,
    pub delay_us: u64,
    pub jitter_us: u64,
    pub reorder: bool,
    /// Packets read from the queue.
    pub received: u64,
    /// Packets accepted (after their hold).
    pub released: u64,
    /// Packets held now.
    pub held: usize,
    pub max_held: usize,
    /// Failed queue reads and verdicts.
    pub errors: u64,
    pub stopping: bool,
}

struct Relay {
    queue_num: u16,
    schedule: Schedule,
    held: BinaryHeap<Held>,
    seq: u64,
    released: u64,
    max_held: usize,
    errors: u64,
}

impl Relay {
    fn stats(&self, stopping: bool) -> RelayStats {
        let s = self.schedule.settings;
        RelayStats {
            queue: self.queue_num,
            delay_us: u64::try_from(s.delay.as_micros()).unwrap_or(u64::MAX),
            jitter_us: u64::try_from(s.jitter.as_micros()).unwrap_or(u64::MAX),
            reorder: s.reorder,
            received: self.seq,
            released: self.released,
            held: self.held.len(),
            max_held: self.max_held,
            errors: self.errors,
            stopping,
        }
    }

    /// Reads every packet waiting in the queue.
    fn take_arrivals(&mut self, queue: &mut nfq::Queue) {
        loop {
            match queue.recv() {
                Ok(msg) => {
                    let release = self.schedule.release_at(Instant::now());
                    self.held.push(Held {
                        release,
                        seq: self.seq,
                        msg,
                    });
                    self.seq += 1;
                    self.max_held = self.max_held.max(self.held.len());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.errors += 1;
                    if self.errors <= 10 {
                        eprintln!("relay: reading queue {}: {e}", self.queue_num);
                    }
                    return;
                }
            }
        }
    }

    /// Accepts the packets due by `now` (all of them if `None`), in order.
    fn release(&mut self, queue: &mut nfq::Queue, now: Option<Instant>) {
        loop {
            match (self.held.peek(), now) {
                (Some(top), Some(now)) if top.release > now => return,
                (None, _) => return,
                _ => {}
            }
            let Some(mut held) = self.held.pop() else {
                return;
            };
            held.msg.set_verdict(nfq::Verdict::Accept);
            match queue.verdict(held.msg) {
                Ok(()) => self.released += 1,
                Err(e) => {
                    self.errors += 1;
                    if self.errors <= 10 {
                        eprintln!("relay: verdict on queue {}: {e}", self.queue_num);
                    }
                }
            }
        }
    }

    fn next_release(&self) -> Option<Instant> {
        self.held.peek().map(|h| h.release)
    }

    /// Applies a command line; the answer to print.
    fn command(&mut self, line: &str) -> String {
        let answer = match parse_command(line) {
            Ok(RelayCommand::Set { delay, jitter }) => {
                let s = &mut self.schedule.settings;
                s.delay = delay.unwrap_or(s.delay);
                s.jitter = jitter.unwrap_or(s.jitter);
                serde_json::to_value(self.stats(false))
            }
            Ok(RelayCommand::Reorder(on)) => {
                self.schedule.settings.reorder = on;
                serde_json::to_value(self.stats(false))
            }
            Ok(RelayCommand::Stats) => serde_json::to_value(self.stats(false)),
            Err(e) => Ok(serde_json::json!({ "error": e })),
        };
        answer.map_or_else(
            |e| format!("{{\"error\":\"cannot encode: {e}\"}}"),
            |v| v.to_string(),
        )
    }
}

/// Entry point of `crosslink relay`; returns the process exit code.
pub fn main(args: RelayArgs) -> i32 {
    match serve(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("relay: queue {}: {e}", args.queue);
            1
        }
    }
}

fn serve(args: &RelayArgs) -> io::Result<()> {
    if args.delay > MAX_DELAY || args.jitter > MAX_DELAY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("delay and jitter are limited to {MAX_DELAY:?}"),
        ));
    }
    let n = args.queue;
    let with =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let mut queue = nfq::Queue::open().map_err(with("opening a netfilter queue socket"))?;
    queue.bind(n).map_err(with("binding the queue"))?;
    // Metadata only: the packet stays in the kernel and is accepted unchanged.
    queue.set_copy_range(n, 0).map_err(with("copy range"))?;
    queue
        .set_queue_max_len(n, args.max_len)
        .map_err(with("queue length"))?;
    queue.set_fail_open(n, false).map_err(with("fail-open"))?;
    queue.set_recv_gso(n, true).map_err(with("gso"))?;
    queue.set_nonblocking(true);
    let socket = queue_socket_fd().map_err(with("finding the queue's socket"))?;

    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32)
        ^ u64::from(n);
    let mut relay = Relay {
        queue_num: n,
        schedule: Schedule::new(
            Settings {
                delay: args.delay,
                jitter: args.jitter,
                reorder: args.reorder,
            },
            seed,
        ),
        held: BinaryHeap::new(),
        seq: 0,
        released: 0,
        max_held: 0,
        errors: 0,
    };
    let served = relay_loop(&mut relay, &mut queue, socket);
    // Whatever ended the loop, nothing stays held.
    relay.take_arrivals(&mut queue);
    relay.release(&mut queue, None);
    if let Err(e) = queue.unbind(n) {
        eprintln!("relay: unbinding queue {n}: {e}");
    }
    match serde_json::to_string(&relay.stats(true)) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("relay: cannot encode the counters: {e}"),
    }
    served
}

/// The longest wait without a look at the stop flag (SIGTERM, SIGINT).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Reads the queue when the kernel has packets for it (epoll), releases each
/// held one at its time, and answers stdin's commands; returns on stdin's
/// end, SIGTERM or SIGINT.
fn relay_loop(relay: &mut Relay, queue: &mut nfq::Queue, socket: RawFd) -> io::Result<()> {
    const QUEUE: mio::Token = mio::Token(0);
    const WAKE: mio::Token = mio::Token(1);
    let stop = stop_flag_on_signals()?;
    let mut poll = mio::Poll::new()?;
    poll.registry().register(
        &mut mio::unix::SourceFd(&socket),
        QUEUE,
        mio::Interest::READABLE,
    )?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
    let (tx, lines) = mpsc::channel::<Option<String>>();
    std::thread::Builder::new()
        .name("relay-stdin".into())
        .spawn(move || {
            // Bytes that are not UTF-8 make a line no command matches (an
            // error answer), not the end of the relay.
            let mut stdin = io::stdin().lock();
            let mut buf = Vec::new();
            while matches!(stdin.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                if tx.send(Some(line)).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
            let _ = tx.send(None);
            let _ = waker.wake();
        })?;
    let mut events = mio::Events::with_capacity(8);
    eprintln!("ready queue={}", relay.queue_num);
    loop {
        relay.take_arrivals(queue);
        relay.release(queue, Some(Instant::now()));
        loop {
            match lines.try_recv() {
                Ok(Some(line)) => println!("{}", relay.command(&line)),
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let wait = relay.next_release().map_or(IDLE_WAIT, |t| {
            t.saturating_duration_since(Instant::now()).min(IDLE_WAIT)
        });
        // epoll counts whole milliseconds: wait that long at most, and the
        // last fraction with a precise sleep (arrivals then wait for it).
        if wait < Duration::from_millis(1) {
            std::thread::sleep(wait);
            continue;
        }
        let whole_ms = Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(100));
        match poll.poll(&mut events, Some(whole_ms)) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
            _ => {}
        }
    }
}

/// The descriptor of the process's one `NETLINK_NETFILTER` socket: nfq
/// keeps its socket to itself, so the relay finds it among its own
/// descriptors (`/proc/self/fd`) by the inodes the namespace's netlink
/// table (`/proc/self/net/netlink`) lists for protocol 12.
fn queue_socket_fd() -> io::Result<RawFd> {
    const NETLINK_NETFILTER: &str = "12";
    let table = fs::read_to_string("/proc/self/net/netlink")?;
    let mut rows = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>());
    let header = rows.next().unwrap_or_default();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (Some(eth), Some(inode)) = (column("Eth"), column("Inode")) else {
        return Err(io::Error::other(format!(
            "unexpected /proc/self/net/netlink header {header:?}"
        )));
    };
    let inodes: Vec<&str> = rows
        .filter(|row| row.get(eth) == Some(&NETLINK_NETFILTER))
        .filter_map(|row| row.get(inode).copied())
        .collect();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc/self/fd")?.flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let Some(socket) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        else {
            continue;
        };
        if inodes.contains(&socket) {
            if let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() {
                found.push(fd);
            }
        }
    }
    match found.as_slice() {
        [fd] => Ok(*fd),
        other => Err(io::Error::other(format!(
            "expected one netfilter netlink socket among the process's descriptors, found {}",
            other.len()
        ))),
    }
}

/// The NFQUEUE number of a path's relay in one direction: path1 11 (A to B)
/// and 12 (B to A), path2 21 and 22.
pub fn queue_number(path: LabPath, direction: Direction) -> u16 {
    let p = match path {
        LabPath::Path1 => 10,
        LabPath::Path2 => 20,
    };
    match direction {
        Direction::AToB => p + 1,
        Direction::BToA => p + 2,
    }
}

/// The gateway whose namespace holds a direction's rule and relay: the
/// receiving one (see the module docs).
fn relay_host(direction: Direction) -> Host {
    match direction {
        Direction::AToB => Host::GwB,
        Direction::BToA => Host::GwA,
    }
}

/// The iptables rule (after `-A` or `-D`, in the mangle table of
/// [`relay_host`]'s namespace) that queues a path's packets of one direction
/// as they arrive.
fn rule(path: LabPath, direction: Direction) -> Vec<String> {
    [
        "PREROUTING",
        "-i",
        path.name(),
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue_number(path, direction).to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A relay process of the lab.
pub(super) struct RelayProc {
    path: LabPath,
    direction: Direction,
    child: Child,
    stdin: Option<ChildStdin>,
    replies: mpsc::Receiver<String>,
}

impl RelayProc {
    /// Sends a command line and returns the relay's answer.
    fn ask(&mut self, line: &str) -> Result<Value> {
        let what = format!("relay {} {:?}", self.path, self.direction);
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(LabError::Other(format!("{what}: already stopped")));
        };
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(io_err(format!("{what}: sending {line:?}")))?;
        let timeout = Duration::from_secs(5);
        let reply = self
            .replies
            .recv_timeout(timeout)
            .map_err(|_| LabError::Timeout {
                what: format!("{what} to answer {line:?}"),
                after: timeout,
            })?;
        let value: Value = serde_json::from_str(&reply)
            .map_err(|e| LabError::Other(format!("{what}: bad answer {reply:?}: {e}")))?;
        match value.get("error") {
            Some(e) => Err(LabError::Other(format!("{what}: {line:?}: {e}"))),
            None => Ok(value),
        }
    }

    /// Closes its stdin (it accepts what it holds and exits); SIGTERM, then
    /// SIGKILL, if it does not.
    fn shut(&mut self) -> Option<ExitStatus> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        terminate(&mut self.child, Duration::from_secs(1))
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.shut();
    }
}

impl Lab {
    /// Delays `path`'s packets going `direction` by `delay`, varied by up to
    /// `jitter` either way, without reordering them: starts a relay for that
    /// path and direction on the receiving gateway (`crosslink relay`, see
    /// the module docs) and queues the packets to it, or changes the running
    /// relay's settings at once, losing nothing (a latency step). [`Lab::heal`]
    /// removes it; [`Lab::blackhole`] and the other nftables faults combine
    /// with it. Refused in a fast-path lab, whose packets pass netfilter by.
    pub fn delay(
        &self,
        path: LabPath,
        direction: Direction,
        delay: Duration,
        jitter: Duration,
    ) -> Result<()> {
        if self.opts.fast_path {
            return Err(LabError::Other(
                "a fast-path lab cannot delay a path: its BPF programs send and receive \
                 beside netfilter, where the relay's queue is"
                    .into(),
            ));
        }
        if delay > MAX_DELAY || jitter > MAX_DELAY {
            return Err(LabError::Other(format!(
                "delay {delay:?} or jitter {jitter:?} above {MAX_DELAY:?}"
            )));
        }
        let settings = format!(
            "delay {}us jitter {}us",
            delay.as_micros(),
            jitter.as_micros()
        );
        let mut relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(relay) = relays
            .iter_mut()
            .find(|r| r.path == path && r.direction == direction)
        {
            return relay.ask(&settings).map(drop);
        }
        if find_in_path("iptables").is_none() {
            return Err(LabError::MissingTool {
                tool: "iptables",
                package: "iptables",
            });
        }
        let mut relay = self.start_relay(path, direction, delay, jitter)?;
        // Check it answers before traffic is queued to it.
        relay.ask(&settings)?;
        self.queue_rule("-A", path, direction)?;
        relays.push(relay);
        Ok(())
    }

    fn start_relay(
        &self,
        path: LabPath,
        direction: Direction,
        delay: Duration,
        jitter: Duration,
    ) -> Result<RelayProc> {
        let queue = queue_number(path, direction);
        // The relay stands for a wire: at real-time priority (below the
        // gateways' BFD threads), so that a busy machine does not stretch
        // the delay past a BFD detection time. Without `chrt`, as it is.
        let mut cmd = if tool_installed("chrt") {
            let mut c = self.command_in(relay_host(direction), "chrt");
            c.args(["-f", "40"]).arg(&self.opts.binary);
            c
        } else {
            self.command_in(relay_host(direction), &self.opts.binary)
        };
        cmd.args(["relay", "--queue", &queue.to_string()])
            .arg("--delay")
            .arg(format!("{}us", delay.as_micros()))
            .arg("--jitter")
            .arg(format!("{}us", jitter.as_micros()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(io_err("starting crosslink relay"))?;
        let stdin = child.stdin.take();
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Other("relay: no stdout or stderr pipe".into()));
        };
        let (reply_tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if reply_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let relay = RelayProc {
            path,
            direction,
            child,
            stdin,
            replies,
        };
        let (ready_tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if !told {
                    told = true;
                    let _ = ready_tx.send(line);
                } else {
                    eprintln!("relay {path} {direction:?}: {line}");
                }
            }
        });
        let timeout = Duration::from_secs(5);
        match ready.recv_timeout(timeout) {
            Ok(line) if line.starts_with("ready") => Ok(relay),
            Ok(line) => Err(LabError::Other(format!("relay failed: {line}"))),
            Err(_) => Err(LabError::Timeout {
                what: "the relay to bind its queue".into(),
                after: timeout,
            }),
        }
    }

    /// The counters and settings of the relay on `path` going `direction`
    /// (JSON: `delay_us`, `jitter_us`, `received`, `released`, `held`,
    /// `max_held`, `errors`); an error if there is none.
    pub fn relay_stats(&self, path: LabPath, direction: Direction) -> Result<Value> {
        self.relay_command(path, direction, "stats")
    }

    /// Sends a command line to the relay on `path` going `direction` (see
    /// the module docs: `reorder on`, `jitter 2ms`, ...) and returns its
    /// answer; a refused command is an error, and the relay goes on.
    pub fn relay_command(&self, path: LabPath, direction: Direction, line: &str) -> Result<Value> {
        if line.contains('\n') {
            return Err(LabError::Other(format!("one line at a time: {line:?}")));
        }
        let mut relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        match relays
            .iter_mut()
            .find(|r| r.path == path && r.direction == direction)
        {
            Some(relay) => relay.ask(line),
            None => Err(LabError::Other(format!("no relay on {path} {direction:?}"))),
        }
    }

    /// The process id of the relay on `path` going `direction`, if one runs
    /// (to kill it in a test of what its death does).
    pub fn relay_pid(&self, path: LabPath, direction: Direction) -> Option<u32> {
        let relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        relays
            .iter()
            .find(|r| r.path == path && r.direction == direction)
            .map(|r| r.child.id())
    }

    /// Removes `path`'s relays: the iptables rules first (so nothing more
    /// is queued), then the relays, which accept what they hold as they stop.
    pub(super) fn remove_relays(&self, path: LabPath) -> Result<()> {
        let mine: Vec<RelayProc> = {
            let mut relays = self.relays.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, others) = std::mem::take(&mut *relays)
                .into_iter()
                .partition(|r| r.path == path);
            *relays = others;
            mine
        };
        let mut result = Ok(());
        for mut relay in mine {
            if let Err(e) = self.queue_rule("-D", relay.path, relay.direction) {
                if result.is_ok() {
                    result = Err(e);
                }
            }
            relay.shut();
        }
        result
    }

    /// Adds (`-A`) or deletes (`-D`) the rule that queues `path`'s packets
    /// going `direction` to its relay.
    fn queue_rule(&self, op: &str, path: LabPath, direction: Direction) -> Result<()> {
        let mut args = vec!["-w".to_string(), "-t".into(), "mangle".into(), op.into()];
        args.extend(rule(path, direction));
        run(self
            .command_in(relay_host(direction), "iptables")
            .args(&args))
        .map(drop)
    }

    /// Stops every relay (the namespace's removal takes the rules).
    pub(super) fn stop_relays(&mut self) {
        let relays = std::mem::take(self.relays.get_mut().unwrap_or_else(|e| e.into_inner()));
        for mut relay in relays {
            relay.shut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(delay_ms: u64, jitter_ms: u64, reorder: bool) -> Settings {
        Settings {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            reorder,
        }
    }

    #[test]
    fn commands_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_command("delay 30ms"),
            Ok(RelayCommand::Set {
                delay: Some(Duration::from_millis(30)),
                jitter: None
            })
        );
        assert_eq!(
            parse_command(" jitter 2ms  delay 1.5ms "),
            Ok(RelayCommand::Set {
                delay: Some(Duration::from_micros(1500)),
                jitter: Some(Duration::from_millis(2))
            })
        );
        assert_eq!(parse_command("stats"), Ok(RelayCommand::Stats));
        assert_eq!(parse_command("reorder on"), Ok(RelayCommand::Reorder(true)));
        for bad in [
            "",
            "delay",
            "delay 3 parsecs",
            "delay -1ms",
            "delay 1ms delay 2ms",
            "speed 3ms",
            "delay 11s",
            "reorder maybe",
            "stats now",
            "delay 1e999s",
            "\u{0}\u{ff}",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_constant_delay_shifts_every_packet() {
        let t0 = Instant::now();
        let mut s = Schedule::new(settings(30, 0, false), 7);
        for i in 0..10 {
            let at = t0 + Duration::from_millis(i * 3);
            assert_eq!(s.release_at(at), at + Duration::from_millis(30));
        }
    }

    #[test]
    fn jitter_stays_in_its_bounds_and_never_reorders_unless_asked() {
        let t0 = Instant::now();
        let mut s = Schedule::new(settings(30, 10, false), 12345);
        let mut last = t0;
        let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
        for i in 0..2000 {
            let at = t0 + Duration::from_micros(i * 500);
            let r = s.release_at(at);
            assert!(r >= last, "packet {i} released before the one ahead");
            last = r;
            let held = r - at;
            min = min.min(held);
            max = max.max(held);
        }
        // At 2000 packet/s the FIFO rule lifts the low draws; the spread shows.
        assert!(min >= Duration::from_millis(20), "{min:?}");
        assert!(max <= Duration::from_millis(40), "{max:?}");
        assert!(max - min >= Duration::from_millis(2), "{min:?}..{max:?}");

        let mut s = Schedule::new(settings(30, 10, true), 12345);
        let releases: Vec<Instant> = (0..2000)
            .map(|i| s.release_at(t0 + Duration::from_micros(i * 500)))
            .collect();
        assert!(
            releases.windows(2).any(|w| w[1] < w[0]),
            "reorder on, yet nothing was reordered"
        );
        for (i, r) in releases.iter().enumerate() {
            let at = t0 + Duration::from_micros(i as u64 * 500);
            assert!(*r >= at + Duration::from_millis(20) && *r <= at + Duration::from_millis(40));
        }
    }

    #[test]
    fn a_step_down_waits_behind_the_packets_held() {
        let t0 = Instant::now();
        let mut s = Schedule::new(settings(30, 0, false), 1);
        let first = s.release_at(t0);
        s.settings.delay = Duration::ZERO;
        let second = s.release_at(t0 + Duration::from_millis(1));
        assert_eq!(second, first, "the second packet overtook the first");
        let later = t0 + Duration::from_millis(50);
        assert_eq!(s.release_at(later), later);
    }

    #[test]
    fn queue_numbers_differ_per_path_and_direction() {
        let mut all: Vec<u16> = LabPath::ALL
            .iter()
            .flat_map(|p| [Direction::AToB, Direction::BToA].map(|d| queue_number(*p, d)))
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4);
    }
}
