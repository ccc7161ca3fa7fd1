//! Path quality, sans-IO: how every path performs in each direction, all
//! the time, and whether it is good enough to carry traffic.
//!
//! BFD tells a live path from a dead one. The failures that cost most on
//! private cloud links are partial: a path that loses a few percent of its
//! packets, one whose latency jumps, one that drops only large packets (an
//! MTU black hole). BFD stays Up through all of them. This module measures
//! them and judges each path against its service level
//! ([`crate::config::SlaConfig`]); the steering ([`crate::core::steer`])
//! takes a *degraded* path out of service while a better one exists.
//!
//! # Measuring
//!
//! Each path's receiving lane 0 runs a [`Prober`]: every `probe_interval`
//! (10 ms by default; `idle_probe_interval`, if set, while the peer carries
//! no data) it sends a probe request, every tenth one as long as the path's
//! largest data datagram. The far end's [`Reflector`] answers
//! each at once with a [`ProbeReport`]: cumulative counts of the small and
//! large probes and of the data datagrams it received on the path, the
//! highest data sequence number it saw, and when the request arrived (its
//! own clock). A reply becomes a [`Sample`] for the path's [`Quality`],
//! which the engine owns. Counts are cumulative so that a lost reply loses
//! only its own sample; between two samples (unless no reply came for five
//! probe intervals: a stall of one of the hosts, or a total loss that BFD
//! judges, whose losses are not a share of packets lost):
//!
//! - **loss, sending direction**: probes sent against probes the far end
//!   received, and data datagrams numbered against those it received (on a
//!   busy path thousands of samples a second: a brownout is seen in
//!   milliseconds, not seconds);
//! - **loss, receiving direction**: replies the far end sent against those
//!   received, and the local data counters (highest sequence against count);
//! - **round-trip time**: reply time less send time;
//! - **delay variation** each way (RFC 3550 section 6.4.1 jitter): the far
//!   end's receive stamps against our send times, our receive times
//!   against its stamps (no synchronised clocks needed: only differences);
//! - **large packets**: large probes sent against received;
//! - **reordering**: replies that arrive after a later one.
//!
//! Per-packet work in the data plane is one more counter (the highest data
//! sequence received); everything else is per probe, outside the data path.
//! The kernel fast path numbers nothing (its data datagrams carry sequence
//! 0), so for a `fast_path` peer loss comes from the probes alone. Its
//! receiving program counts what it takes, with the highest number, in
//! the counts its lanes report ([`DataCounts`]).
//!
//! # Judging
//!
//! A path is **degraded** as soon as one of these holds (quick to leave):
//!
//! - *loss*: over the last 100 ms, 300 ms, 1 s or 3 s, at least
//!   [`MIN_LOST`] packets lost and the lower bound of the loss ratio's
//!   Wilson score interval at z = 3 (99.87 % one-sided) above `max_loss`.
//!   The bound makes a short, lucky run of losses on a good path count for
//!   nothing (0.1 % random loss never trips a 1 % threshold) while 5 % on a
//!   2000 packet/s path trips it within about 100 ms of the loss being
//!   counted. A data datagram counts as lost only once it has stayed
//!   missing for the path's reordering window (see `DataLoss`).
//! - *mtu*: the last [`MTU_RUN`] large probes were lost while small ones
//!   passed (and then a loss seen with no small probe lost is an MTU loss);
//! - *rtt*: the median round trip of the last 300 ms above `max_rtt`;
//! - *jitter*: the sending direction's jitter above `max_jitter`.
//!
//! It is **good again** only after every measure has stayed good, with a
//! margin (loss at most half of `max_loss` over 3 s, round trip and jitter
//! at most 90 % of theirs, large probes passing), for `hold` (10 s by
//! default), doubled each time the path degrades again within
//! [`FLAP_WINDOW`] of its last recovery, up to 8 times (slow to come back).
//! The steering adds the rest: a margin before a move, a cap on moves per
//! minute, and no move when every path is as bad.

use crate::config::SlaConfig;
use crate::core::wire::overlay::{ProbeClass, ProbeReport};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Every this many probes, one is large.
pub const LARGE_EVERY: u64 = 10;
/// Probes remembered for their replies: 2.56 s at the default interval
/// (10 ms), long past any use of a later reply; 12 KiB per path.
const RING: usize = 256;
/// Loss is counted in buckets of this length.
const BUCKET: Duration = Duration::from_millis(50);
/// The windows, in buckets, over which loss may degrade a path.
const TRIGGER_WINDOWS: [usize; 4] = [2, 6, 20, 60];
/// The longest of them (3 s): a loss stays in a trigger window this long.
pub const LOSS_HORIZON: Duration =
    BUCKET.saturating_mul(TRIGGER_WINDOWS[TRIGGER_WINDOWS.len() - 1] as u32);
/// The window, in buckets, over which a recovering path's loss is judged
/// and the status reports loss.
const GOOD_WINDOW: usize = 60;
/// The reordering window of the data counts ([`DataLoss`]): how long a
/// data datagram must stay missing to be lost (and over at least
/// [`CONFIRM_SAMPLES`] samples).
const REORDER_START: Duration = Duration::from_millis(200);
const REORDER_MIN: Duration = Duration::from_millis(50);
const REORDER_MAX: Duration = Duration::from_secs(1);
/// Traffic with nothing late for this long shrinks the window.
const REORDER_CALM: Duration = Duration::from_secs(2);
const CONFIRM_SAMPLES: usize = 3;
/// Fewest packets lost before loss may degrade a path.
pub const MIN_LOST: u64 = 3;
/// The z of the Wilson bound (one-sided 99.87 %).
const Z: f64 = 3.0;
/// Large probes lost in a row that make an MTU black hole.
pub const MTU_RUN: u64 = 3;
/// The round trip is the median of this recent window...
const RTT_WINDOW: Duration = Duration::from_millis(300);
/// ... of at least this many samples.
const RTT_MIN_SAMPLES: usize = 3;
/// A path that degrades again this soon after recovering is flapping.
pub const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// The hold of a flapping path doubles up to `2^MAX_LEVEL` times.
const MAX_LEVEL: u32 = 3;
/// The largest count believed between two samples (16 million packets:
/// far more than any path carries between two probes); a report past it is
/// a new baseline.
const MAX_DELTA: u64 = 1 << 24;
/// Replies that stop for this many probe intervals (and at least
/// [`MIN_STALL`]) are a stall, not loss.
const STALL_INTERVALS: u32 = 5;
const MIN_STALL: Duration = Duration::from_millis(50);
/// Jitter samples before jitter may degrade a path.
const JITTER_MIN_SAMPLES: u64 = 16;
/// A peer whose data count has not moved for this long is idle (see
/// [`Prober::note_traffic`]). Longer than the kernel fast path's counters
/// take to reach the lanes' (every 500 ms), so that a busy fast-path peer
/// is never taken for an idle one.
pub const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Why a path is degraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Loss,
    Rtt,
    Jitter,
    Mtu,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Loss => "loss",
            Reason::Rtt => "rtt",
            Reason::Jitter => "jitter",
            Reason::Mtu => "mtu",
        }
    }

    /// The reason [`Reason::as_str`] names.
    pub fn parse(name: &str) -> Option<Reason> {
        [Reason::Loss, Reason::Rtt, Reason::Jitter, Reason::Mtu]
            .into_iter()
            .find(|r| r.as_str() == name)
    }
}

/// A path's quality verdict handed to a new process
/// ([`Quality::export_verdict`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerdictExport {
    /// The reason it is degraded for, if it is.
    pub degraded: Option<String>,
    /// How long it has been good since, while degraded.
    pub good_for_ns: Option<u64>,
    pub level: u32,
    pub recovered_ago_ns: Option<u64>,
}

/// A probe to send now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub seq: u64,
    pub class: ProbeClass,
}

/// Data datagrams received on a path, as the lanes count them (with what
/// a kernel fast path's receiving program took).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataCounts {
    pub received: u64,
    /// The highest data sequence number received.
    pub seq_high: u64,
    /// Data datagrams and bytes (inner) sent on the path, for the
    /// `aggregate` policy's rate estimate ([`crate::core::aggregate`]).
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// Data datagrams this end has numbered but not sent yet: the far end
    /// cannot have them, whatever the numbers it saw (a sending lane
    /// frames a burst before it sends it, and another lane's later
    /// numbers may be there first).
    pub unsent: u64,
    /// The counts are not settled: a receiving lane of the path has been
    /// behind the others for longer than the lanes wait for it, so the
    /// highest number seen may run ahead of the datagrams counted by as
    /// many as that lane holds. A deficit seen in such counts confirms no
    /// loss (see `DataLoss`).
    pub unsettled: bool,
}

#[derive(Clone, Copy, Debug)]
struct Sent {
    seq: u64,
    at: Instant,
    class: ProbeClass,
    /// Small and large probes sent up to and including this one.
    small_sent: u64,
    large_sent: u64,
    /// The interval the prober was probing at when it sent this one.
    interval: Duration,
}

/// What one probe's reply tells: its own timing, and cumulative counts of
/// both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub seq: u64,
    pub class: ProbeClass,
    pub sent_at: Instant,
    pub received_at: Instant,
    /// Small and large probes sent up to and including this one.
    pub small_sent: u64,
    pub large_sent: u64,
    /// Replies received up to and including this one.
    pub replies: u64,
    /// The interval the prober was probing at when it sent this probe
    /// (`probe_interval`, or `idle_probe_interval` while the peer is idle).
    pub interval: Duration,
    /// The far end's counts when it answered.
    pub report: ProbeReport,
    /// This end's data counts for the path when the reply arrived.
    pub local: DataCounts,
}

/// The sending end of a path's probes (sans-IO: the shell sends what
/// [`Prober::poll_probe`] says and hands back each reply).
#[derive(Clone, Debug)]
pub struct Prober {
    interval: Duration,
    /// The interval while the peer carries no data (`None`: always
    /// `interval`).
    idle_interval: Option<Duration>,
    /// The peer's traffic count last seen, and when it last changed.
    traffic: u64,
    active_at: Option<Instant>,
    next_at: Option<Instant>,
    seq: u64,
    small_sent: u64,
    large_sent: u64,
    replies: u64,
    ring: Vec<Option<Sent>>,
}

impl Prober {
    pub fn new(interval: Duration) -> Prober {
        Prober {
            interval: interval.max(Duration::from_micros(100)),
            idle_interval: None,
            traffic: 0,
            active_at: None,
            next_at: None,
            seq: 0,
            small_sent: 0,
            large_sent: 0,
            replies: 0,
            ring: vec![None; RING],
        }
    }

    /// Probes every `idle` instead while the peer carries no data: see
    /// [`Prober::note_traffic`]. Never more often than the busy interval.
    pub fn with_idle_interval(mut self, idle: Option<Duration>) -> Prober {
        self.idle_interval = idle.map(|d| d.max(self.interval));
        self
    }

    /// The peer's data count (datagrams both ways, over all its paths: any
    /// number that grows with its traffic) at `now`. A peer whose count has
    /// not moved for [`IDLE_AFTER`] is idle, and its paths are probed
    /// every idle interval; the first change brings the busy interval back
    /// (from the next probe: at most one idle interval later).
    pub fn note_traffic(&mut self, count: u64, now: Instant) {
        if count != self.traffic || self.active_at.is_none() {
            self.traffic = count;
            self.active_at = Some(now);
        }
    }

    /// The interval the prober probes at now.
    fn current_interval(&self, now: Instant) -> Duration {
        match self.idle_interval {
            Some(idle)
                if self
                    .active_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= IDLE_AFTER) =>
            {
                idle
            }
            _ => self.interval,
        }
    }

    /// The probe to send now, if one is due. A late call sends one probe,
    /// not a burst to catch up.
    pub fn poll_probe(&mut self, now: Instant) -> Option<Probe> {
        if self.next_at.is_some_and(|t| now < t) {
            return None;
        }
        let interval = self.current_interval(now);
        self.next_at = Some(match self.next_at {
            Some(t) if now.saturating_duration_since(t) < interval => t + interval,
            _ => now + interval,
        });
        self.seq += 1;
        let class = if self.seq % LARGE_EVERY == 0 {
            self.large_sent += 1;
            ProbeClass::Large
        } else {
            self.small_sent += 1;
            ProbeClass::Small
        };
        let slot = (self.seq % RING as u64) as usize;
        if let Some(s) = self.ring.get_mut(slot) {
            *s = Some(Sent {
                seq: self.seq,
                at: now,
                class,
                small_sent: self.small_sent,
                large_sent: self.large_sent,
                interval,
            });
        }
        Some(Probe {
            seq: self.seq,
            class,
        })
    }

    /// When the next probe is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_at
    }

    /// The last probe's sequence number (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Numbers the next probes above `seq` (a new process taking over
    /// from one that probed up to it: under sealed sessions a probe's
    /// number is its nonce).
    pub fn continue_after(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// A reply to probe `seq` arrived at `now`: the sample it makes, or
    /// `None` for a reply to no probe of ours (unknown, answered already,
    /// or older than the probes remembered).
    pub fn handle_reply(
        &mut self,
        seq: u64,
        report: ProbeReport,
        local: DataCounts,
        now: Instant,
    ) -> Option<Sample> {
        let slot = self.ring.get_mut((seq % RING as u64) as usize)?;
        let sent = slot.take_if(|s| s.seq == seq)?;
        self.replies += 1;
        Some(Sample {
            seq,
            class: sent.class,
            sent_at: sent.at,
            received_at: now,
            small_sent: sent.small_sent,
            large_sent: sent.large_sent,
            replies: self.replies,
            interval: sent.interval,
            report,
            local,
        })
    }
}

/// The answering end of a path's probes: counts what it received and
/// reports it in each reply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reflector {
    small: u64,
    large: u64,
}

impl Reflector {
    /// The report for a request of `class` and `len` bytes received at
    /// `now_ns` (this end's clock), with the path's data counts.
    pub fn reflect(
        &mut self,
        class: ProbeClass,
        len: usize,
        now_ns: u64,
        data: DataCounts,
    ) -> ProbeReport {
        match class {
            ProbeClass::Small => self.small += 1,
            ProbeClass::Large => self.large += 1,
        }
        ProbeReport {
            small_received: self.small,
            large_received: self.large,
            received_at_ns: now_ns,
            data_received: data.received,
            data_seq_high: data.seq_high,
            request_len: u32::try_from(len).unwrap_or(u32::MAX),
            data_unsettled: data.unsettled,
        }
    }
}

/// Packets expected and lost in one bucket of time. Losses are signed: a
/// packet late past its sample (reordered) counts as lost in one and found
/// in the next, and the counts are cumulative, so sums over a window come
/// out right.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    start: Option<Instant>,
    /// Sending direction: data and small probes.
    tx_expected: u64,
    tx_lost: i64,
    /// Of which small probes alone.
    probe_lost: i64,
    /// Receiving direction: replies and local data.
    rx_expected: u64,
    rx_lost: i64,
}

/// Sums over the last buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sums {
    tx_expected: u64,
    tx_lost: u64,
    probe_lost: u64,
    rx_expected: u64,
    rx_lost: u64,
}

/// A path's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Good,
    Degraded {
        reason: Reason,
        /// Since when every measure has been good (with margin).
        good_since: Option<Instant>,
    },
}

/// A change of a path's verdict.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transition {
    Degraded(Reason, Figures),
    Recovered(Figures),
}

/// A path's measured figures, for status, metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// Loss ratios over the last 3 s, `None` before anything was measured.
    pub loss_tx: Option<f64>,
    pub loss_rx: Option<f64>,
    /// Median round trip of the last 300 ms (or the last one measured).
    pub rtt: Option<Duration>,
    /// RFC 3550 jitter, each way.
    pub jitter_tx: Option<Duration>,
    pub jitter_rx: Option<Duration>,
    /// Replies that came after a later one, as a share of replies.
    pub reorder: Option<f64>,
    /// Large probes lost in a row (an MTU black hole shows here).
    pub large_lost_run: u64,
    /// The interval the last answered probe was sent at (the busy or the
    /// idle one).
    pub probe_interval: Option<Duration>,
    /// What tripped a loss verdict (with [`Transition::Degraded`] for
    /// loss only), for the log.
    pub trip: Option<LossTrip>,
}

/// The loss that degraded a path: the shortest trigger window whose loss
/// was past the bound, and what it held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossTrip {
    pub window: Duration,
    /// Packets of the sending direction lost and expected in it...
    pub lost: u64,
    pub expected: u64,
    /// ... and of those lost, the probes (the rest are data datagrams).
    pub probes_lost: u64,
}

impl std::fmt::Display for LossTrip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} in {} ms ({} probes, {} data)",
            self.lost,
            self.expected,
            self.window.as_millis(),
            self.probes_lost,
            self.lost.saturating_sub(self.probes_lost)
        )
    }
}

/// One path's quality: the estimates and the verdict (sans-IO; the engine
/// owns one per path and feeds it samples).
#[derive(Clone, Debug)]
pub struct Quality {
    sla: SlaConfig,
    /// Whether data sequence numbers count (not with the kernel fast path).
    data_counts: bool,
    /// Data loss of the sending and the receiving direction.
    data_loss: (DataLoss, DataLoss),
    last: Option<Sample>,
    buckets: VecDeque<Bucket>,
    rtts: VecDeque<(Instant, Duration)>,
    jitter_tx: f64,
    jitter_rx: f64,
    jitter_samples: u64,
    large_lost_run: u64,
    large_seen: bool,
    replies: u64,
    reordered: u64,
    state: State,
    level: u32,
    recovered_at: Option<Instant>,
}

/// The lower bound of the Wilson score interval of `lost` in `n` at z = 3.
pub fn wilson_lower(lost: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    let p = lost.min(n as u64) as f64 / n;
    let z2 = Z * Z;
    let centre = p + z2 / (2.0 * n);
    let spread = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - spread) / (1.0 + z2 / n)).max(0.0)
}

/// RFC 3550 section 6.4.1: `J += (|D| - J) / 16`.
fn jitter_step(j: f64, d: f64) -> f64 {
    j + (d.abs() - j) / 16.0
}

/// Nanoseconds from `a` to `b`, negative when `b` is earlier.
fn signed_nanos(a: Instant, b: Instant) -> f64 {
    if b >= a {
        b.duration_since(a).as_nanos() as f64
    } else {
        -(a.duration_since(b).as_nanos() as f64)
    }
}

/// Data datagrams of one direction, counted as lost only once they stay
/// missing.
///
/// The far end reports the highest sequence number it saw and how many
/// datagrams it received. The deficit between the two is not loss alone:
/// the sending lanes number from one counter but send in their own turns,
/// each from its own CPU (and a host's per-CPU queues, or a NIC's per-CPU
/// transmit queues, deliver in their own time), and the receiving lanes
/// count in their turns; so the deficit jumps whenever one lane runs ahead
/// of another (hundreds of datagrams on a busy path), then falls back.
/// Datagrams the sender numbered but has not sent yet are left out of it
/// ([`DataCounts::unsent`]).
///
/// A datagram is lost when the deficit stays: the loss counted is the
/// least deficit of the samples of the last *reordering window* (and at
/// least the last [`CONFIRM_SAMPLES`]), so a jump shorter than the window
/// counts for nothing, and a real loss counts that much late. As in TCP's
/// RACK (RFC 8985), the window learns from the path: each time the deficit
/// falls back (datagrams turned up late), it grows to a quarter more than
/// how long the deficit stood above its new level (up to
/// [`REORDER_MAX`]); after every [`REORDER_CALM`] of traffic with nothing
/// late it halves, down to [`REORDER_MIN`]. It starts at
/// [`REORDER_START`]: a path's first seconds of traffic are judged
/// cautiously, before it has shown how little it reorders.
#[derive(Clone, Debug)]
struct DataLoss {
    /// Whether the direction has a baseline: after a rebase, the first
    /// interval in which data arrives again is one (the sequence numbers
    /// lost while the path was down must not count as loss once it is
    /// back).
    armed: bool,
    /// Numbered less received since the baseline.
    deficit: i64,
    /// The deficit (less what was unsent) after each sample of the last
    /// [`REORDER_MAX`].
    recent: VecDeque<(Instant, i64)>,
    /// The deficit counted as loss so far.
    confirmed: i64,
    /// How long a deficit must stand to be loss.
    window: Duration,
    /// Since when traffic has flowed with nothing late.
    calm_since: Option<Instant>,
    /// Datagrams expected while the receiver's counts were unsettled: they
    /// count once settled counts can tell how many of them were lost, so
    /// that they never dilute the probes' loss meanwhile.
    held: u64,
}

impl Default for DataLoss {
    fn default() -> DataLoss {
        DataLoss {
            armed: false,
            deficit: 0,
            recent: VecDeque::new(),
            confirmed: 0,
            window: REORDER_START,
            calm_since: None,
            held: 0,
        }
    }
}

impl DataLoss {
    /// Takes one interval's (numbered, received) counts, what the sender
    /// has numbered but not sent yet, and whether the receiver's counts
    /// were settled: the datagrams expected and the loss it confirms
    /// (negative when datagrams counted lost turned up after all), once the
    /// direction has a baseline.
    fn step(
        &mut self,
        delta: Option<(u64, u64)>,
        unsent: u64,
        unsettled: bool,
        now: Instant,
    ) -> Option<(u64, i64)> {
        let (expected, got) = delta?;
        if !self.armed {
            if got > 0 {
                *self = DataLoss {
                    armed: true,
                    ..DataLoss::default()
                };
            }
            return None;
        }
        // Far more received than numbered: sequence numbers that do not
        // count (a sender whose kernel fast path numbers nothing).
        let owed = u64::try_from(self.deficit.max(0)).unwrap_or(0);
        if got
            > expected
                .saturating_mul(2)
                .saturating_add(16)
                .saturating_add(owed)
        {
            return None;
        }
        // Both are at most MAX_DELTA (checked by the caller): no overflow.
        self.deficit += expected as i64 - got as i64;
        // Datagrams not sent yet are not missing; but some of them may be
        // numbered past what the far end had seen, so they explain at most
        // the deficit above what is counted lost already (never a dip below
        // it, which would come back as loss once out of the window).
        let unsent = i64::try_from(unsent.min(MAX_DELTA)).unwrap_or(0);
        let excess = (self.deficit - self.confirmed).max(0);
        let d = self.deficit - unsent.min(excess);
        self.learn(d, expected > 0, now);
        self.recent.push_back((now, d));
        while self.recent.len() > CONFIRM_SAMPLES
            && self
                .recent
                .front()
                .is_some_and(|&(t, _)| now.saturating_duration_since(t) > REORDER_MAX)
        {
            self.recent.pop_front();
        }
        // Until the baseline has CONFIRM_SAMPLES samples, it counts too.
        let baseline = (self.recent.len() < CONFIRM_SAMPLES).then_some(0);
        let window = self.window;
        let in_window: Vec<i64> = self
            .recent
            .iter()
            .rev()
            .enumerate()
            .take_while(|&(i, &(t, _))| {
                i < CONFIRM_SAMPLES || now.saturating_duration_since(t) <= window
            })
            .map(|(_, &(_, d))| d)
            .collect();
        let mut confirmed = in_window.into_iter().chain(baseline).min().unwrap_or(d);
        let mut expected = expected;
        if unsettled {
            // A lane of the receiver is behind: its deficit may be what
            // that lane holds, for as long as it stays behind. Such counts
            // confirm no new loss (datagrams turning up still count), and
            // what they expect waits for counts that can tell.
            confirmed = confirmed.min(self.confirmed);
            self.held = self.held.saturating_add(expected).min(MAX_DELTA);
            expected = 0;
        } else {
            expected = expected.saturating_add(std::mem::take(&mut self.held));
        }
        let lost = confirmed - self.confirmed;
        self.confirmed = confirmed;
        Some((expected, lost))
    }

    /// Adjusts the reordering window to deficit `d`, before it is recorded.
    fn learn(&mut self, d: i64, traffic: bool, now: Instant) {
        let fell = self.recent.back().is_some_and(|&(_, last)| d < last);
        if fell {
            // How long the deficit stood above `d`: back to the last
            // sample at or below it (or all the history there is).
            let since = self
                .recent
                .iter()
                .rev()
                .find(|&&(_, x)| x <= d)
                .or(self.recent.front())
                .map_or(now, |&(t, _)| t);
            let stood = now.saturating_duration_since(since);
            self.window = self.window.max((stood + stood / 4).min(REORDER_MAX));
            self.calm_since = Some(now);
            return;
        }
        if !traffic {
            return;
        }
        let since = *self.calm_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= REORDER_CALM {
            self.window = (self.window / 2).max(REORDER_MIN);
            self.calm_since = Some(now);
        }
    }
}

fn ratio(lost: u64, expected: u64) -> Option<f64> {
    (expected > 0).then(|| lost.min(expected) as f64 / expected as f64)
}

impl Quality {
    /// `data_counts`: the path's data datagrams carry sequence numbers
    /// that count (false for a kernel fast-path peer).
    pub fn new(sla: SlaConfig, data_counts: bool) -> Quality {
        Quality {
            sla,
            data_counts,
            data_loss: Default::default(),
            last: None,
            buckets: VecDeque::new(),
            rtts: VecDeque::new(),
            jitter_tx: 0.0,
            jitter_rx: 0.0,
            jitter_samples: 0,
            large_lost_run: 0,
            large_seen: false,
            replies: 0,
            reordered: 0,
            state: State::Good,
            level: 0,
            recovered_at: None,
        }
    }

    /// A new service level (configuration reload); the measurements stay.
    pub fn set_sla(&mut self, sla: SlaConfig) {
        self.sla = sla;
    }

    pub fn sla(&self) -> &SlaConfig {
        &self.sla
    }

    /// Forgets the baselines and history (the path went down: what comes
    /// after is not comparable); the verdict stays.
    pub fn rebase(&mut self) {
        self.last = None;
        self.data_loss = Default::default();
        self.buckets.clear();
        self.rtts.clear();
        self.jitter_samples = 0;
        self.large_lost_run = 0;
        if let State::Degraded { reason, .. } = self.state {
            self.state = State::Degraded {
                reason,
                good_since: None,
            };
        }
    }

    /// Data datagrams of the sending direction counted lost since the
    /// data counts' baseline (once a datagram stayed missing for the
    /// reordering window), or `None` without one (no data yet, or numbers
    /// that do not count).
    /// How long a data loss of the sending direction waits to be
    /// confirmed now (its reordering window).
    pub fn data_confirm_lag(&self) -> Duration {
        self.data_loss.0.window
    }

    pub fn data_lost_tx(&self) -> Option<i64> {
        let d = &self.data_loss.0;
        (self.data_counts && d.armed).then_some(d.confirmed)
    }

    /// Why the path is degraded, if it is.
    pub fn degraded(&self) -> Option<Reason> {
        match self.state {
            State::Good => None,
            State::Degraded { reason, .. } => Some(reason),
        }
    }

    /// The bucket for time `now`, opened if needed; old ones dropped.
    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        let keep = (self.sla.hold.as_millis() / BUCKET.as_millis()).max(GOOD_WINDOW as u128 + 2);
        let fresh = self
            .buckets
            .back()
            .and_then(|b| b.start)
            .is_none_or(|s| now.saturating_duration_since(s) >= BUCKET);
        if fresh {
            self.buckets.push_back(Bucket {
                start: Some(now),
                ..Bucket::default()
            });
            while self.buckets.len() as u128 > keep {
                self.buckets.pop_front();
            }
        }
        self.buckets
            .back_mut()
            .expect("a bucket was just pushed or exists")
    }

    /// Sums of the last `n` buckets that lie within `n` bucket lengths of
    /// `now`.
    fn sums(&self, now: Instant, n: usize) -> Sums {
        let span = BUCKET * n as u32;
        let (mut tx, mut tx_lost, mut probe_lost, mut rx, mut rx_lost) = (0, 0i64, 0i64, 0, 0i64);
        for b in self.buckets.iter().rev() {
            if b.start
                .is_none_or(|t| now.saturating_duration_since(t) >= span)
            {
                break;
            }
            tx += b.tx_expected;
            tx_lost += b.tx_lost;
            probe_lost += b.probe_lost;
            rx += b.rx_expected;
            rx_lost += b.rx_lost;
        }
        let clamp = |lost: i64, of: u64| (lost.max(0) as u64).min(of);
        Sums {
            tx_expected: tx,
            tx_lost: clamp(tx_lost, tx),
            probe_lost: clamp(probe_lost, tx),
            rx_expected: rx,
            rx_lost: clamp(rx_lost, rx),
        }
    }

    /// Takes in one probe's sample.
    pub fn handle_sample(&mut self, s: &Sample) {
        let now = s.received_at;
        self.replies += 1;
        let rtt = s.received_at.saturating_duration_since(s.sent_at);
        self.rtts.push_back((now, rtt));
        while self
            .rtts
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > RTT_WINDOW * 4)
            && self.rtts.len() > RTT_MIN_SAMPLES
        {
            self.rtts.pop_front();
        }
        let Some(prev) = self.last else {
            self.last = Some(*s);
            return;
        };
        if s.seq <= prev.seq {
            self.reordered += 1;
            return;
        }
        // A gap with no reply for many probe intervals is a stall (of this
        // host, the far one, or a total loss that BFD is there to judge),
        // not a share of packets lost: what it lost is not loss accounting's.
        let gap = s.received_at.saturating_duration_since(prev.received_at);
        let interval = s.interval.max(prev.interval);
        if gap > (interval * STALL_INTERVALS).max(MIN_STALL) {
            // The data counts start again from here too: what the stall
            // hid (losses, or datagrams counted lost before it that came
            // after all) is in neither direction's accounting.
            self.data_loss = Default::default();
            self.last = Some(*s);
            return;
        }
        let (r, p) = (&s.report, &prev.report);
        let deltas = (
            s.small_sent.checked_sub(prev.small_sent),
            s.large_sent.checked_sub(prev.large_sent),
            s.replies.checked_sub(prev.replies),
            r.small_received.checked_sub(p.small_received),
            r.large_received.checked_sub(p.large_received),
        );
        let (Some(small_sent), Some(large_sent), Some(replies), Some(small_got), Some(large_got)) =
            deltas
        else {
            // The far end restarted (its counts went back): a new baseline.
            self.last = Some(*s);
            return;
        };
        if [small_sent, large_sent, replies, small_got, large_got]
            .iter()
            .any(|&d| d > MAX_DELTA)
        {
            // Counts no path could make between two probes: not believed.
            self.last = Some(*s);
            return;
        }
        let data_tx = self.data_delta(
            (r.data_seq_high, r.data_received),
            (p.data_seq_high, p.data_received),
        );
        let data_rx = self.data_delta(
            (s.local.seq_high, s.local.received),
            (prev.local.seq_high, prev.local.received),
        );
        let data_tx = self
            .data_loss
            .0
            .step(data_tx, s.local.unsent, r.data_unsettled, now);
        let data_rx = self.data_loss.1.step(data_rx, 0, s.local.unsettled, now);
        // Every delta is at most MAX_DELTA, so none of this overflows.
        let signed = |a: u64, b: u64| a as i64 - b as i64;
        let small_lost = signed(small_sent, small_got);
        let answered = small_got + large_got;
        let b = self.bucket(now);
        b.probe_lost = b.probe_lost.saturating_add(small_lost);
        b.tx_expected = b.tx_expected.saturating_add(small_sent);
        b.tx_lost = b.tx_lost.saturating_add(small_lost);
        b.rx_expected = b.rx_expected.saturating_add(answered);
        b.rx_lost = b.rx_lost.saturating_add(signed(answered, replies));
        if let Some((expected, lost)) = data_tx {
            b.tx_expected = b.tx_expected.saturating_add(expected);
            b.tx_lost = b.tx_lost.saturating_add(lost);
        }
        if let Some((expected, lost)) = data_rx {
            b.rx_expected = b.rx_expected.saturating_add(expected);
            b.rx_lost = b.rx_lost.saturating_add(lost);
        }
        if large_sent > 0 {
            if large_got == 0 {
                self.large_lost_run += large_sent;
            } else {
                self.large_lost_run = 0;
                self.large_seen = true;
            }
        }
        // Delay variation, each way (only between consecutive probes).
        if s.seq == prev.seq + 1 {
            let far = r.received_at_ns as f64 - p.received_at_ns as f64;
            let d_tx = far - signed_nanos(prev.sent_at, s.sent_at);
            let d_rx = signed_nanos(prev.received_at, s.received_at) - far;
            // A difference past 10 s is no delay variation (a far end's
            // clock step): bounded so that it cannot swamp the estimate.
            let bound = |d: f64| (d / 1e9).clamp(-10.0, 10.0);
            self.jitter_tx = jitter_step(self.jitter_tx, bound(d_tx));
            self.jitter_rx = jitter_step(self.jitter_rx, bound(d_rx));
            self.jitter_samples += 1;
        }
        self.last = Some(*s);
    }

    /// (numbered, received) data datagrams between two (highest sequence,
    /// count) readings, when they make sense (neither went back, neither
    /// jumped past what a path carries between two probes).
    fn data_delta(&self, now: (u64, u64), before: (u64, u64)) -> Option<(u64, u64)> {
        if !self.data_counts {
            return None;
        }
        let expected = now.0.checked_sub(before.0)?;
        let got = now.1.checked_sub(before.1)?;
        (expected <= MAX_DELTA && got <= MAX_DELTA).then_some((expected, got))
    }

    /// The median round trip of the recent `window`.
    fn rtt_median(&self, now: Instant, window: Duration) -> Option<Duration> {
        let mut v: Vec<Duration> = self
            .rtts
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= window)
            .map(|&(_, r)| r)
            .collect();
        if v.len() < RTT_MIN_SAMPLES {
            return None;
        }
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    /// What degrades the path now, if anything (MTU before loss, so that
    /// the losses of a black hole are named for it).
    fn trigger(&self, now: Instant, congested: bool) -> Option<Reason> {
        if self.large_lost_run >= MTU_RUN {
            return Some(Reason::Mtu);
        }
        if self.loss_trip(now).is_some() {
            // Large probes lost while no small one was for a second:
            // the losses are large packets', an MTU black hole.
            if self.large_lost_run >= 2 && self.sums(now, 20).probe_lost == 0 {
                return Some(Reason::Mtu);
            }
            // Loss behind a queue of the path's own data is congestion
            // (TCP's signal, the `aggregate` scheduler's to handle), not
            // a sick path.
            if !congested {
                return Some(Reason::Loss);
            }
        }
        if let (Some(max), Some(rtt)) = (self.sla.max_rtt, self.rtt_median(now, RTT_WINDOW)) {
            if rtt > max {
                return Some(Reason::Rtt);
            }
        }
        if let Some(max) = self.sla.max_jitter {
            if self.jitter_samples >= JITTER_MIN_SAMPLES && self.jitter_tx > max.as_secs_f64() {
                return Some(Reason::Jitter);
            }
        }
        None
    }

    /// The shortest trigger window whose loss is past the bound: at least
    /// [`MIN_LOST`] lost and the Wilson lower bound above `max_loss`.
    fn loss_trip(&self, now: Instant) -> Option<LossTrip> {
        let max_loss = self.sla.max_loss();
        TRIGGER_WINDOWS.into_iter().find_map(|n| {
            let s = self.sums(now, n);
            (s.tx_lost >= MIN_LOST && wilson_lower(s.tx_lost, s.tx_expected) > max_loss).then(
                || LossTrip {
                    window: BUCKET * n as u32,
                    lost: s.tx_lost,
                    expected: s.tx_expected,
                    probes_lost: s.probe_lost.min(s.tx_lost),
                },
            )
        })
    }

    /// Whether every measure is good with margin (a degraded path's way
    /// back).
    fn good_with_margin(&self, now: Instant, reason: Reason) -> bool {
        let s = self.sums(now, GOOD_WINDOW);
        let loss_ok =
            ratio(s.tx_lost, s.tx_expected).is_none_or(|l| l <= self.sla.max_loss() / 2.0);
        let rtt_ok = match (
            self.sla.max_rtt,
            self.rtt_median(now, Duration::from_secs(1)),
        ) {
            (Some(max), Some(rtt)) => rtt.as_secs_f64() <= max.as_secs_f64() * 0.9,
            (Some(_), None) => reason != Reason::Rtt,
            (None, _) => true,
        };
        let jitter_ok = self
            .sla
            .max_jitter
            .is_none_or(|max| self.jitter_tx <= max.as_secs_f64() * 0.9);
        let mtu_ok = reason != Reason::Mtu || (self.large_lost_run == 0 && self.large_seen);
        loss_ok && rtt_ok && jitter_ok && mtu_ok
    }

    /// The verdict and its hold, for a new process (an upgrade): the
    /// estimates start afresh there, the verdict does not.
    pub fn export_verdict(&self, now: Instant) -> VerdictExport {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let (degraded, good_for_ns) = match self.state {
            State::Good => (None, None),
            State::Degraded { reason, good_since } => (
                Some(reason.as_str().to_string()),
                good_since.map(|t| ns(now.saturating_duration_since(t))),
            ),
        };
        VerdictExport {
            degraded,
            good_for_ns,
            level: self.level,
            recovered_ago_ns: self
                .recovered_at
                .map(|t| ns(now.saturating_duration_since(t))),
        }
    }

    /// Takes over the old process's verdict: a degraded path stays
    /// degraded until it has been good for its hold (counted on from where
    /// the old process was), as if the process had not changed.
    pub fn import_verdict(&mut self, e: &VerdictExport, now: Instant) {
        let ago = |ns: u64| now.checked_sub(Duration::from_nanos(ns));
        self.level = e.level.min(MAX_LEVEL + 1);
        self.recovered_at = e.recovered_ago_ns.and_then(ago);
        self.state = match e.degraded.as_deref().and_then(Reason::parse) {
            None => State::Good,
            Some(reason) => State::Degraded {
                reason,
                good_since: e.good_for_ns.and_then(ago),
            },
        };
    }

    /// The hold a degraded path waits out now.
    fn hold(&self) -> Duration {
        self.sla
            .hold
            .saturating_mul(1 << self.level.saturating_sub(1).min(MAX_LEVEL))
    }

    /// Judges the path at `now`; a change of verdict, if any. `congested`:
    /// the path queues under its own data now (see
    /// [`crate::core::aggregate::Estimator::congested`]), so that its loss
    /// does not make it degraded (nor keeps it so: a degraded path still
    /// needs its loss low with margin to come back).
    pub fn evaluate(&mut self, now: Instant, congested: bool) -> Option<Transition> {
        match self.state {
            State::Good => {
                let reason = self.trigger(now, congested)?;
                let flapping = self
                    .recovered_at
                    .is_some_and(|t| now.saturating_duration_since(t) < FLAP_WINDOW);
                self.level = if flapping {
                    (self.level + 1).min(MAX_LEVEL + 1)
                } else {
                    1
                };
                if reason == Reason::Mtu {
                    self.large_seen = false;
                }
                self.state = State::Degraded {
                    reason,
                    good_since: None,
                };
                let mut figures = self.figures(now);
                if reason == Reason::Loss {
                    figures.trip = self.loss_trip(now);
                }
                Some(Transition::Degraded(reason, figures))
            }
            State::Degraded { reason, good_since } => {
                let good =
                    self.trigger(now, congested).is_none() && self.good_with_margin(now, reason);
                if !good {
                    self.state = State::Degraded {
                        reason,
                        good_since: None,
                    };
                    return None;
                }
                let since = good_since.unwrap_or(now);
                if now.saturating_duration_since(since) >= self.hold() {
                    self.state = State::Good;
                    self.recovered_at = Some(now);
                    return Some(Transition::Recovered(self.figures(now)));
                }
                self.state = State::Degraded {
                    reason,
                    good_since: Some(since),
                };
                None
            }
        }
    }

    /// When [`Quality::evaluate`] next has work without a new sample (a
    /// recovering path's hold ending).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Degraded {
                good_since: Some(t),
                ..
            } => Some(t + self.hold()),
            _ => None,
        }
    }

    /// The sending direction's loss ratio over the last second (the
    /// steering's margin compares paths by it).
    pub fn loss_tx(&self, now: Instant) -> f64 {
        let s = self.sums(now, 20);
        ratio(s.tx_lost, s.tx_expected).unwrap_or(0.0)
    }

    /// The measured figures.
    pub fn figures(&self, now: Instant) -> Figures {
        let s = self.sums(now, GOOD_WINDOW);
        let jitter = |j: f64| {
            (self.jitter_samples > 0).then(|| Duration::from_secs_f64(j.clamp(0.0, 3600.0)))
        };
        Figures {
            loss_tx: ratio(s.tx_lost, s.tx_expected),
            loss_rx: ratio(s.rx_lost, s.rx_expected),
            rtt: self
                .rtt_median(now, RTT_WINDOW)
                .or_else(|| self.rtts.back().map(|&(_, r)| r)),
            jitter_tx: jitter(self.jitter_tx),
            jitter_rx: jitter(self.jitter_rx),
            reorder: (self.replies > 0).then(|| self.reordered as f64 / self.replies as f64),
            large_lost_run: self.large_lost_run,
            probe_interval: self.last.map(|s| s.interval),
            trip: None,
        }
    }
}

#[cfg(test)]
mod tests;
