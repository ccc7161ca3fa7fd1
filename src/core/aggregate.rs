//! The `aggregate` policy's sending half: which path each packet takes,
//! and what the gateway knows of each path's capacity and delay, sans-IO.
//!
//! Under `aggregate` every flow of the peer uses every eligible path that
//! is not demoted (degraded or down paths carry nothing, as under the
//! other policies). A sending lane asks its [`Scheduler`] for each packet
//! (or each super-packet, whose segments stay together: one UDP GSO send)
//! which path gets it there first: the *earliest expected arrival* over
//! the paths, each path modelled as a queue that drains at the path's
//! estimated rate behind its one-way delay and its [`offsets`] (the
//! receiver holds a shorter path's packets by the difference to the
//! longest, so only the queues tell the paths apart), no queue past
//! [`QUEUE_BUDGET`] while another path's is within it. A faster path takes
//! more, and a path that has just failed is out of the set at the next
//! snapshot (BFD, carrier, send errors and quality all publish one).
//!
//! Each path's rate is learned by its [`Estimator`] from the path-quality
//! probes' reports (what the far end received, every probe interval):
//! when its queueing delay rises while it carries at least 30 % of its
//! estimate (or it loses more than 5 %), what it delivered is its capacity
//! (but the estimate at most halves per period); when it carries
//! nearly its estimate without either, the estimate grows by a quarter
//! every period (not within [`GROW_HOLD`] of a congestion that lowered
//! it), and in a period without congestion it is at least what the path
//! delivered. A configured `rate` is the starting point and a ceiling,
//! and makes the path *paced* ([`BoardPath::pace_rate`]): the sending gateway
//! shapes it to that rate, its own queue (at most [`PACE_QUEUE`]) in front
//! of the link, and the scheduler's queue for it is the pace's.
//! The estimates, the delays and the receivers' reordering wait are
//! published through a per-peer [`Board`] of atomics, so the forwarding
//! threads read them without a new snapshot.

use crate::PathId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The rate assumed of a path with no configured rate, until measured
/// (bytes per second: 100 Mbit/s). Low on purpose: an estimate is raised
/// to what the path delivers in every [`ESTIMATE_PERIOD`] without
/// congestion, and grows by a quarter while the path carries most of it,
/// and a path first read from its queue is read at what it delivered, so a
/// low start is soon corrected either way, while a high one would make
/// every path look idle to the model.
pub const DEFAULT_RATE: u64 = 12_500_000;
/// The lowest estimate (bytes per second: 1 Mbit/s).
pub const MIN_RATE: u64 = 125_000;
/// The highest estimate (bytes per second: 100 Gbit/s).
pub const MAX_RATE: u64 = 12_500_000_000;
/// How often an estimate is revised.
pub const ESTIMATE_PERIOD: Duration = Duration::from_millis(100);
/// The shortest and longest automatic reordering wait.
pub const MIN_WAIT: Duration = Duration::from_millis(5);
pub const MAX_WAIT: Duration = Duration::from_millis(200);
/// The automatic wait's margin over the paths' delay difference.
pub const WAIT_MARGIN: Duration = Duration::from_millis(5);
/// How long a queue seen behind a probe marks the path as congested: a
/// little longer than a loss stays in path quality's windows, so that
/// what the queue lost is out of them before the queue is forgotten.
pub const CONGESTION_MEMORY: Duration =
    crate::core::quality::LOSS_HORIZON.saturating_add(Duration::from_millis(500));
/// How long a queue must stand before it marks the path congested: the
/// probes that came back behind it, one after another with none in
/// between that did not, arrived over at least this span. A host that
/// stalls (the far end's or ours) holds back every probe in flight, but
/// they all come back at once when it resumes: no span, no congestion.
pub const QUEUE_CONFIRM: Duration = Duration::from_millis(100);
/// How long probes must keep coming back above the base round trip by a
/// queue, with none of our data on the path, before the base is taken to
/// have risen (a route that got longer): without it the path would read as
/// queueing under our data for as long as the old base is remembered (ten
/// seconds), and its estimate could only fall or stand still meanwhile.
pub const BASE_MOVED: Duration = Duration::from_millis(200);
/// The model's queue of a path never holds more than this much time.
const MAX_BACKLOG: f64 = 0.5;
/// A path is *loaded* while it carries at least this share of its
/// estimate (the share at which the estimate grows), as it stood in the
/// last period that lost nothing: heavy loss cuts the estimate to what
/// got through, and a sick path must not read as loaded by the load it
/// still carries after that. A probe that comes back behind a queue while
/// our data is on the path marks it loaded too.
pub const LOADED: f64 = 0.7;
/// How long after the path was last loaded a loss confirmed by its
/// quality may still be the load's, beyond the time path quality takes to
/// confirm it ([`Delivery::lag`]: its reordering window, 50 ms to 1 s).
pub const LOAD_MEMORY: Duration = Duration::from_millis(200);

/// One path as the forwarding threads see it under `aggregate`.
#[derive(Debug)]
pub struct BoardPath {
    pub id: PathId,
    /// Estimated rate, bytes per second.
    pub rate: AtomicU64,
    /// Estimated one-way delay, nanoseconds.
    pub delay_ns: AtomicU64,
    /// How long the receiver holds this path's packets so that they come
    /// out as late as the longest path's ([`offsets`]), nanoseconds.
    pub offset_ns: AtomicU64,
    /// Packets (super-packets count once) the lanes sent on it.
    pub picked: AtomicU64,
    /// The configured `rate` (bytes per second), 0 if none: the path is
    /// then *paced*, see [`BoardPath::pace_rate`].
    pub ceiling: AtomicU64,
    /// A paced path's pace: when it is next free, in nanoseconds since
    /// the board's epoch (shared by the peer's lanes).
    pub free_ns: AtomicU64,
}

/// A peer's paths' estimates, written by the BFD thread's engine and read
/// by the lanes.
#[derive(Debug)]
pub struct Board {
    pub paths: Vec<BoardPath>,
    /// How long a receiving lane holds packets behind a gap, nanoseconds.
    pub wait_ns: AtomicU64,
    /// What the paths' paces count from: the first time a lane paced a
    /// packet (the core has no clock of its own).
    epoch: OnceLock<Instant>,
}

impl Board {
    /// A board for `paths` (id, configured rate in bytes per second).
    pub fn new(paths: &[(PathId, Option<u64>)], wait: Duration) -> Board {
        Board {
            paths: paths
                .iter()
                .map(|&(id, rate)| BoardPath {
                    id,
                    rate: AtomicU64::new(rate.unwrap_or(DEFAULT_RATE)),
                    delay_ns: AtomicU64::new(0),
                    offset_ns: AtomicU64::new(0),
                    picked: AtomicU64::new(0),
                    ceiling: AtomicU64::new(0),
                    free_ns: AtomicU64::new(0),
                })
                .collect(),
            wait_ns: AtomicU64::new(nanos(wait)),
            epoch: OnceLock::new(),
        }
    }

    /// `now` in nanoseconds since the board's epoch: a second before the
    /// first call (so that an idle path's burst is there from the start).
    fn since_epoch(&self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_init(|| now);
        nanos(now.saturating_duration_since(epoch)).saturating_add(1_000_000_000)
    }

    pub fn path(&self, id: PathId) -> Option<&BoardPath> {
        self.paths.iter().find(|p| p.id == id)
    }

    /// Starts path `id`'s pace no earlier than `until` (seen at `now`):
    /// the process an upgrade replaced still sends what it held for the
    /// path until then, and the two together must not pass its rate.
    pub fn defer_pace(&self, id: PathId, until: Instant, now: Instant) {
        let Some(p) = self.path(id) else {
            return;
        };
        let at = self
            .since_epoch(now)
            .saturating_add(nanos(until.saturating_duration_since(now)));
        p.free_ns.fetch_max(at, Ordering::Relaxed);
    }

    pub fn wait(&self) -> Duration {
        Duration::from_nanos(self.wait_ns.load(Ordering::Relaxed))
    }
}

impl BoardPath {
    /// The rate a paced path is sent at (bytes per second, counted as
    /// [`wire_len`] counts them): its configured `rate`, or its estimate
    /// when that is lower (the path measured slower, say shared with other
    /// traffic). `None`: not paced.
    pub fn pace_rate(&self) -> Option<u64> {
        let ceiling = self.ceiling.load(Ordering::Relaxed);
        (ceiling > 0).then(|| ceiling.min(self.rate.load(Ordering::Relaxed)).max(MIN_RATE))
    }

    /// How long what is already paced on the path still waits at `now`.
    fn paced_queue(&self, now_ns: u64) -> Duration {
        Duration::from_nanos(self.free_ns.load(Ordering::Relaxed).saturating_sub(now_ns))
    }

    /// Reserves `wire` bytes of the path's pace at `now_ns` (at `rate`):
    /// when they may leave, in nanoseconds since the epoch, or `None` when
    /// they would wait more than [`PACE_QUEUE`]. A path idle for a while
    /// may send [`PACE_BURST`] worth at once.
    fn pace(&self, now_ns: u64, wire: u64, rate: u64) -> Option<u64> {
        let cost = wire.saturating_mul(1_000_000_000) / rate.max(1);
        let earliest = now_ns.saturating_sub(nanos(PACE_BURST));
        let limit = now_ns.saturating_add(nanos(PACE_QUEUE));
        let mut start = 0;
        self.free_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free| {
                start = free.max(earliest);
                (start <= limit).then(|| start.saturating_add(cost))
            })
            .ok()
            .map(|_| start.max(now_ns))
    }
}

/// The most a packet waits for its path's pace at the sending gateway: the
/// depth of the gateway's own queue in front of a paced path. A shaper
/// holds a burst the link's own buffer could not (a cloud link's policer
/// holds none), so that one TCP flow's slow start over paths whose
/// buffers are short against the flow's round trip ends near the paths'
/// capacity instead of at the first overflow: a slow start's queue peaks
/// at about half its window, and CUBIC grows back slowly after a loss.
pub const PACE_QUEUE: Duration = Duration::from_millis(50);
/// What a paced path idle for a while may send at once: below the burst a
/// shaper on the link takes (19 KB, a dozen packets, at 300 Mbit/s).
pub const PACE_BURST: Duration = Duration::from_micros(500);
/// What a datagram adds to its inner packet on the wire, as pacing counts
/// it: the overlay header and seal (up to 48 bytes), UDP and IPv6 (48) and
/// an Ethernet frame's header (14), rounded up. Counting a little more
/// than an IPv4 path sends keeps a paced path under a link shaped at its
/// configured rate.
pub const WIRE_OVERHEAD: usize = 110;

/// The bytes of `len` inner bytes sent as `datagrams` datagrams, as
/// pacing counts them.
pub fn wire_len(len: usize, datagrams: usize) -> u64 {
    (len as u64).saturating_add((datagrams.max(1) * WIRE_OVERHEAD) as u64)
}

/// Where [`Scheduler::pick`] put a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// On this path, now.
    Now(PathId),
    /// On this paced path, at this time (its pace is taken).
    At(PathId, Instant),
    /// Nowhere: every path it could take is paced and its queue is full.
    Full,
}

impl Pick {
    pub fn path(self) -> Option<PathId> {
        match self {
            Pick::Now(id) | Pick::At(id, _) => Some(id),
            Pick::Full => None,
        }
    }
}

/// A duration in nanoseconds, saturating (as the board stores it).
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A packet stays on the path the last one took unless another gets it
/// there this much sooner (or, every queue past [`QUEUE_BUDGET`], has this
/// much less queued): runs of packets on one path, fewer of them ahead of
/// a gap at the receiver (each one held there is copied).
pub const STICK: Duration = Duration::from_millis(1);

/// The most queue the model lets build on a path while another path's
/// queue is within it: past it the packet goes to the path that gets it
/// there first among those still within, even if that path's delay is
/// longer (the receiver puts the packets back in order). Earliest arrival
/// alone would fill a short path's queue up to the delay difference before
/// it used a longer path, and a bottleneck that buffers less than that
/// (a shaper, a policer) drops what the model thinks is only queued.
pub const QUEUE_BUDGET: Duration = Duration::from_millis(5);

/// A sending lane's model of each path's queue.
#[derive(Clone, Debug, Default)]
pub struct Scheduler {
    queues: Vec<Queue>,
    /// The path the last packet took.
    last: Option<PathId>,
}

#[derive(Clone, Copy, Debug)]
struct Queue {
    id: PathId,
    /// Bytes the model has queued on the path.
    backlog: f64,
    at: Instant,
}

impl Scheduler {
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    /// The path among `eligible` (of `board`) where `len` bytes sent now
    /// (as `datagrams` datagrams) arrive first; queues them there. On a
    /// paced path ([`BoardPath::pace_rate`]) the queue is the pace's own,
    /// shared by the peer's lanes, and the packet is given a time to leave.
    pub fn pick(
        &mut self,
        board: &Board,
        eligible: impl IntoIterator<Item = PathId>,
        len: usize,
        datagrams: usize,
        now: Instant,
    ) -> Option<Pick> {
        // The earliest arrival among the paths whose queue is within the
        // budget; when every queue is over it, the shortest queue (so that
        // the queues grow together, and none overflows while another has
        // room).
        let mut best: Option<(f64, usize, PathId)> = None;
        let mut best_any: Option<(f64, usize, PathId)> = None;
        let mut stay: Option<(f64, usize, PathId)> = None;
        let mut stay_any: Option<(f64, usize, PathId)> = None;
        let budget = QUEUE_BUDGET.as_secs_f64();
        let mut now_ns = None;
        let wire = wire_len(len, datagrams);
        for id in eligible {
            let Some(p) = board.path(id) else {
                continue;
            };
            // The receiver holds a shorter path's packets by the difference
            // of the base delays: only the queues tell the paths apart.
            let delay = (p.delay_ns.load(Ordering::Relaxed) + p.offset_ns.load(Ordering::Relaxed))
                as f64
                / 1e9;
            let q = match self.queues.iter().position(|q| q.id == id) {
                Some(q) => q,
                None => {
                    self.queues.push(Queue {
                        id,
                        backlog: 0.0,
                        at: now,
                    });
                    self.queues.len() - 1
                }
            };
            let Some(queue) = self.queues.get_mut(q) else {
                continue;
            };
            let (queued, arrival) = match p.pace_rate() {
                Some(rate) => {
                    let t = *now_ns.get_or_insert_with(|| board.since_epoch(now));
                    let queued = p.paced_queue(t).as_secs_f64();
                    (queued, delay + queued + wire as f64 / rate as f64)
                }
                None => {
                    let rate = p.rate.load(Ordering::Relaxed).max(MIN_RATE) as f64;
                    let drained = now.saturating_duration_since(queue.at).as_secs_f64() * rate;
                    queue.backlog = (queue.backlog - drained).clamp(0.0, rate * MAX_BACKLOG);
                    queue.at = now;
                    let queued = queue.backlog / rate;
                    (queued, delay + (queue.backlog + len as f64) / rate)
                }
            };
            let within = queued <= budget;
            if best_any.is_none_or(|(b, _, _)| queued < b) {
                best_any = Some((queued, q, id));
            }
            if within && best.is_none_or(|(b, _, _)| arrival < b) {
                best = Some((arrival, q, id));
            }
            if self.last == Some(id) {
                stay_any = Some((queued, q, id));
                if within {
                    stay = Some((arrival, q, id));
                }
            }
        }
        // Runs of packets on one path either way: within the budget, the
        // last path's arrival may be a little later than the best; over
        // it, its queue a little longer than the shortest (packet by packet
        // to the shortest queue would alternate the paths at every packet,
        // and hold half of them at the receiver).
        let (best, stay) = match best {
            Some(b) => (b, stay),
            None => (best_any?, stay_any),
        };
        let (_, q, id) = match stay {
            Some(s) if s.0 <= best.0 + STICK.as_secs_f64() => s,
            _ => best,
        };
        let p = board.path(id)?;
        let pick = match p.pace_rate() {
            Some(rate) => {
                let t = *now_ns.get_or_insert_with(|| board.since_epoch(now));
                match p.pace(t, wire, rate) {
                    Some(at) if at <= t => Pick::Now(id),
                    Some(at) => Pick::At(id, now + Duration::from_nanos(at - t)),
                    None => return Some(Pick::Full),
                }
            }
            None => {
                if let Some(queue) = self.queues.get_mut(q) {
                    queue.backlog += len as f64;
                }
                Pick::Now(id)
            }
        };
        self.last = Some(id);
        p.picked.fetch_add(1, Ordering::Relaxed);
        Some(pick)
    }
}

/// What one probe report says about the data on a path: cumulative
/// counts, as [`crate::core::quality::Sample`] carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub at: Instant,
    /// Data datagrams the far end received on the path.
    pub received: u64,
    /// The highest data sequence number it received (what we had sent).
    pub seq_high: u64,
    /// Data bytes and datagrams this end sent on the path.
    pub sent_bytes: u64,
    pub sent_packets: u64,
    /// The probe's round trip.
    pub rtt: Duration,
    /// Data datagrams counted lost so far by the path's quality (which
    /// tells a lane running late from a loss: see its reordering window);
    /// `None`: the far end's numbered less received, as they are.
    pub lost: Option<i64>,
    /// How long path quality waits before it confirms a loss (its
    /// reordering window): a loss confirmed now may be that much older.
    pub lag: Duration,
}

/// Why an estimate changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revision {
    /// The path lost packets or queued: its capacity is what it delivered.
    Congested,
    /// It carried nearly its estimate cleanly (the estimate grows by a
    /// quarter), or delivered more than it without congestion (the
    /// estimate is raised to that).
    Grown,
}

/// One path's rate and delay estimate.
#[derive(Clone, Debug)]
pub struct Estimator {
    /// Configured ceiling (bytes per second).
    ceiling: Option<u64>,
    rate: u64,
    /// The start of the current period.
    start: Option<Delivery>,
    last: Option<Delivery>,
    /// Smoothed one-way delay and the lowest round trip seen lately.
    delay: Option<Duration>,
    rtt_min: Option<(Duration, Instant)>,
    /// When a probe last came back late behind a queue that had stood
    /// for [`QUEUE_CONFIRM`] while the path carried data.
    queued_at: Option<Instant>,
    /// When the first probe of the present run of queued probes came back.
    queue_from: Option<Instant>,
    /// The present run of probes that came back above the base with none of
    /// our data on the path: when its first came back, and its lowest round
    /// trip ([`BASE_MOVED`]).
    idle_high: Option<(Instant, Duration)>,
    /// When the path was last seen loaded ([`LOADED`]).
    loaded_at: Option<Instant>,
    /// When a loss was last confirmed while the path was loaded.
    load_lost_at: Option<Instant>,
    /// The path lost with no load to explain it since it was last
    /// loaded without loss.
    sick: bool,
    /// The estimate at the end of the last period that lost nothing.
    clean_rate: u64,
    /// The last period's sending rate over the rate that makes the path
    /// loaded (1.0 and above: loaded).
    load: f64,
    /// The most any probe of the present period stood above the base.
    period_queue: Duration,
    /// When congestion last lowered the estimate ([`GROW_HOLD`]).
    cut_at: Option<Instant>,
}

impl Estimator {
    pub fn new(ceiling: Option<u64>) -> Estimator {
        Estimator {
            ceiling,
            rate: ceiling.unwrap_or(DEFAULT_RATE),
            start: None,
            last: None,
            delay: None,
            rtt_min: None,
            queued_at: None,
            queue_from: None,
            idle_high: None,
            loaded_at: None,
            load_lost_at: None,
            sick: false,
            clean_rate: ceiling.unwrap_or(DEFAULT_RATE),
            load: 0.0,
            period_queue: Duration::ZERO,
            cut_at: None,
        }
    }

    /// Whether the path is congested by its own data now: its losses are
    /// then congestion, which TCP and the scheduler handle, not a sick
    /// path. Either it queues under its data ([`Estimator::queue_congested`]),
    /// or it lost while loaded ([`Estimator::load_congested`]).
    pub fn congested(&self, now: Instant) -> bool {
        self.queue_congested(now) || self.load_congested(now)
    }

    /// A queue stood under the path's own data for [`QUEUE_CONFIRM`]
    /// within [`CONGESTION_MEMORY`].
    pub fn queue_congested(&self, now: Instant) -> bool {
        self.queued_at
            .is_some_and(|t| now.saturating_duration_since(t) < CONGESTION_MEMORY)
    }

    /// A loss was confirmed within [`CONGESTION_MEMORY`] while the path
    /// carried at least [`LOADED`] of its estimate (or had within
    /// [`LOAD_MEMORY`]), and the path has not lost since while unloaded.
    /// What a shaper or a policer without a queue drops, and what a short
    /// queue drops in bursts shorter than [`QUEUE_CONFIRM`], reads as
    /// congestion this way. A sick path does not: a flow that loses backs
    /// off and the path loses on, unloaded; and a steady load leaves a
    /// path unloaded once its estimate has grown past it.
    pub fn load_congested(&self, now: Instant) -> bool {
        !self.sick
            && self
                .load_lost_at
                .is_some_and(|t| now.saturating_duration_since(t) < CONGESTION_MEMORY)
    }

    /// The last period's load: its sending rate over [`LOADED`] of the
    /// estimate (1.0 and above: loaded), for the logs.
    pub fn load(&self) -> f64 {
        self.load
    }

    /// Estimated rate, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Estimated one-way delay (half the smoothed round trip).
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// The path's own round trip: the lowest of the last ten seconds.
    pub fn base_rtt(&self) -> Option<Duration> {
        self.rtt_min.map(|(m, _)| m)
    }

    /// Whether `rtt` stands above the base round trip by a queue (more
    /// than [`queue_margin`]: the rule that marks [`Estimator::congested`]).
    pub fn queued(&self, rtt: Duration) -> bool {
        self.base_rtt().is_some_and(|m| rtt > m + queue_margin(m))
    }

    /// Forgets the period in progress (the path went down: its counts
    /// restart with the far end's).
    pub fn rebase(&mut self) {
        self.start = None;
        self.last = None;
    }

    /// Takes one probe report; revises the estimate once a period.
    pub fn handle(&mut self, d: Delivery) -> Option<Revision> {
        let half = d.rtt / 2;
        self.delay = Some(match self.delay {
            Some(old) => (old * 7 + half) / 8,
            None => half,
        });
        // The lowest round trip of the last ten seconds: the path's own delay.
        let stale = self
            .rtt_min
            .is_some_and(|(_, at)| d.at.saturating_duration_since(at) > Duration::from_secs(10));
        if stale || self.rtt_min.is_none_or(|(m, _)| d.rtt <= m) {
            self.rtt_min = Some((d.rtt, d.at));
        }
        let queue = |m: Duration| d.rtt > m + queue_margin(m);
        if let Some((m, _)) = self.rtt_min {
            self.period_queue = self.period_queue.max(d.rtt.saturating_sub(m));
        }
        // Probes that come back late while none of our data is on the path
        // see no queue of ours: after BASE_MOVED of them the path's own
        // delay has risen (a longer route): the base is the lowest of them.
        let idle = self.last.is_some_and(|l| d.sent_packets == l.sent_packets);
        match (idle, self.rtt_min) {
            (true, Some((m, _))) if d.rtt > m + BASE_SLACK => {
                let (from, low) = self
                    .idle_high
                    .map_or((d.at, d.rtt), |(from, low)| (from, low.min(d.rtt)));
                if d.at.saturating_duration_since(from) >= BASE_MOVED {
                    self.rtt_min = Some((low, d.at));
                    self.idle_high = None;
                } else {
                    self.idle_high = Some((from, low));
                }
            }
            _ => self.idle_high = None,
        }
        if let (Some(last), Some((m, _))) = (self.last, self.rtt_min) {
            if d.sent_packets > last.sent_packets && queue(m) {
                // A queue under our data: the path is loaded, whatever the
                // estimate says (one that overshot reads the load as light,
                // and what the queue then drops as a sick path's loss).
                self.loaded_at = Some(d.at);
                let from = *self.queue_from.get_or_insert(d.at);
                if d.at.saturating_duration_since(from) >= QUEUE_CONFIRM {
                    self.queued_at = Some(d.at);
                }
            } else {
                self.queue_from = None;
            }
        }
        if let Some(last) = self.last {
            if d.received < last.received
                || d.seq_high < last.seq_high
                || d.sent_packets < last.sent_packets
            {
                // The far end restarted: start again.
                self.start = None;
            }
        }
        // A loss confirmed now, as path quality counts them.
        let new_loss = matches!(
            (d.lost, self.last.and_then(|l| l.lost)),
            (Some(now), Some(then)) if now > then
        );
        self.last = Some(d);
        let Some(start) = self.start else {
            self.start = Some(d);
            return None;
        };
        let dt = d.at.saturating_duration_since(start.at);
        // The period so far loads the path (judged once it is half gone).
        let load_ref = LOADED * self.rate.max(self.clean_rate) as f64;
        if dt >= ESTIMATE_PERIOD / 2 {
            let bytes = d.sent_bytes.saturating_sub(start.sent_bytes) as f64;
            if bytes / dt.as_secs_f64() >= load_ref {
                self.loaded_at = Some(d.at);
            }
        }
        let loaded = self
            .loaded_at
            .is_some_and(|t| d.at.saturating_duration_since(t) <= LOAD_MEMORY + d.lag);
        if new_loss && loaded && !self.sick {
            self.load_lost_at = Some(d.at);
        }
        if dt < ESTIMATE_PERIOD {
            return None;
        }
        self.start = Some(d);
        let period_queue = std::mem::take(&mut self.period_queue);
        let sent = d.seq_high.saturating_sub(start.seq_high);
        let (delivered, lost) = match (d.lost, start.lost) {
            (Some(now), Some(then)) => {
                let lost = u64::try_from(now.saturating_sub(then))
                    .unwrap_or(0)
                    .min(sent);
                (sent - lost, lost)
            }
            _ => {
                let delivered = d.received.saturating_sub(start.received);
                (delivered, sent.saturating_sub(delivered))
            }
        };
        let bytes = d.sent_bytes.saturating_sub(start.sent_bytes);
        let packets = d.sent_packets.saturating_sub(start.sent_packets);
        if packets == 0 || sent == 0 {
            return None;
        }
        let mean = bytes as f64 / packets as f64;
        let secs = dt.as_secs_f64();
        let sent_rate = bytes as f64 / secs;
        self.load = sent_rate / load_ref.max(1.0);
        if lost == 0 {
            self.clean_rate = self.rate;
        }
        if lost == 0 && sent_rate >= load_ref {
            self.sick = false;
        } else if lost > 0 && !loaded {
            // It loses with no load to explain it (a sick path under a
            // flow that backed off): not congestion, until a loaded period
            // goes by without loss.
            self.load_lost_at = None;
            self.sick = true;
        }
        let delivered_rate = delivered as f64 * mean / secs;
        let queued = self.rtt_min.is_some_and(|(m, _)| queue(m));
        // Loss alone reads as a full path only when it is heavy: a few
        // percent without a queue is a sick path (path quality's to judge),
        // not a capacity; a shaper's queue shows in the round trip first.
        let lossy = lost >= 10 && lost * 20 > sent;
        let ceiling = self.ceiling.unwrap_or(MAX_RATE);
        // A queue on a path we load lightly is not our doing (or it is
        // draining): the delay estimate already steers load away from it,
        // and no capacity can be read from it.
        let ours = lossy || sent_rate >= 0.3 * self.rate as f64;
        if (lossy || queued) && ours {
            // What got through is the capacity, but never less than half
            // the estimate in one period: a queue that drains slowly after
            // the load moved away must not spiral the estimate down. A
            // queue alone raises it only when the path delivered more than
            // twice the estimate, and by a quarter: what the far end counts
            // in a period behind a queue includes what queued before it (a
            // shaped path read up to 1.25 times its rate), but an estimate
            // that far below what the path carries is wrong (a host whose
            // probes always wait behind its busy CPU would otherwise never
            // grow one, and hold it at a fraction of the path). Heavy loss,
            // a policer's, reads as what got through.
            let floor = self.rate / 2;
            let got = delivered_rate as u64;
            let got = match got {
                _ if lossy => got,
                g if g / 2 > self.rate => g.min(self.rate.saturating_add(self.rate / 4)),
                g => g.min(self.rate),
            };
            let rate = got.max(floor).clamp(MIN_RATE, ceiling);
            if rate < self.rate {
                self.cut_at = Some(d.at);
            }
            self.rate = rate;
            return Some(Revision::Congested);
        }
        // A path grows by a quarter only while no probe of the period stood
        // behind a queue: an estimate below the path's rate leaves the real
        // queue shorter than the model's, one at the rate or past it does
        // not, and growing that one would fill the path's buffer before the
        // queue confirms. What the path delivered in a period that did not
        // read as congested, it can carry: an estimate below that is raised
        // to it, queue or not (a slow start doubles every round trip, far
        // faster than a quarter a period, and estimates left behind it at
        // different distances split its load unevenly; on a host whose CPU
        // is the bottleneck, the path that carries the load is then seen to
        // carry it, and keeps it).
        let mut grown = self.rate;
        let held = self
            .cut_at
            .is_some_and(|t| d.at.saturating_duration_since(t) < GROW_HOLD);
        if sent_rate >= 0.7 * self.rate as f64 && period_queue <= GROW_QUEUE && !held {
            grown = grown.saturating_add(grown / 4);
        }
        let grown = grown.max(delivered_rate as u64).clamp(MIN_RATE, ceiling);
        if grown > self.rate {
            self.rate = grown;
            return Some(Revision::Grown);
        }
        None
    }
}

/// How long after congestion lowered an estimate (to what the path
/// delivered: a measure of its capacity) the estimate does not grow by a
/// quarter on speculation. What the path delivers cleanly still raises it.
/// Growing at once would put it a quarter over the path's rate in the next
/// period: while the load is below the sum of the estimates, the scheduler
/// keeps runs on the path with the earliest arrival, and one whose
/// estimate is over its rate is the first to fill; its real queue grows
/// while the model's does not, and the stream loses there with room on
/// the other path.
pub const GROW_HOLD: Duration = Duration::from_secs(1);

/// How far above the base round trip a probe must come back to read as a
/// queue: 5 ms (a descheduled thread, a host's jitter), and a tenth of the
/// base (a long path's own jitter). Less than the buffer of most
/// bottlenecks, so a queue shows before the buffer overflows.
pub fn queue_margin(base: Duration) -> Duration {
    Duration::from_millis(5) + base / 10
}

/// The most queue a probe may stand behind in a period whose load grows
/// the estimate (a host's jitter).
pub const GROW_QUEUE: Duration = Duration::from_millis(3);

/// How far above the base round trip the probes of a path that carries
/// none of our data must keep coming back for [`BASE_MOVED`] before the
/// base rises to them.
pub const BASE_SLACK: Duration = Duration::from_millis(1);

/// How long the receiver holds each path's packets, from the paths' base
/// round trips (`None`: not measured yet, no hold): half the difference
/// between the longest base and the path's (the one-way difference, the
/// paths taken as symmetric), at most [`MAX_WAIT`], none under
/// [`MIN_OFFSET`]. Every packet of the peer then comes out as late as over
/// the longest path (see
/// [`crate::core::reorder::Resequencer::set_offsets`]).
pub fn offsets(bases: &[(PathId, Option<Duration>)]) -> Vec<(PathId, Duration)> {
    let longest = bases.iter().filter_map(|(_, b)| *b).max();
    bases
        .iter()
        .map(|&(id, b)| {
            let d = match (longest, b) {
                (Some(l), Some(b)) => ((l - b) / 2).min(MAX_WAIT),
                _ => Duration::ZERO,
            };
            (id, if d < MIN_OFFSET { Duration::ZERO } else { d })
        })
        .collect()
}

/// The smallest offset: paths whose one-way delays differ by less are
/// taken as equal (their packets are not held for it; the resequencer
/// puts what they reorder back in order, and holding every packet of the
/// shorter one would cost a copy each for nothing a flow would notice).
pub const MIN_OFFSET: Duration = Duration::from_millis(1);

/// The automatic reordering wait for paths with these round trips (each
/// path's base and smoothed round trip): the spread of the paths' one-way
/// delays plus [`WAIT_MARGIN`], within [`MIN_WAIT`]..=[`MAX_WAIT`]. A
/// path's one-way delay is half its base (the paths taken as symmetric)
/// plus all of its queue (the smoothed round trip over the base): the
/// queue stands in the direction our data goes, not half in each.
pub fn reorder_wait(rtts: &[(Duration, Duration)]) -> Duration {
    let one_way = rtts
        .iter()
        .map(|&(base, smoothed)| base / 2 + smoothed.saturating_sub(base));
    let (Some(lo), Some(hi)) = (one_way.clone().min(), one_way.max()) else {
        return MIN_WAIT;
    };
    (hi - lo + WAIT_MARGIN).clamp(MIN_WAIT, MAX_WAIT)
}

#[cfg(test)]
mod tests;
