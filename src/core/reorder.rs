//! The `aggregate` policy's receiving half: puts one sender's packets back
//! in order, sans-IO.
//!
//! Under `aggregate` a sending lane numbers its packets (the overlay's
//! peer-sequence extension, with [`crate::core::wire::overlay::FLAG_ORDERED`])
//! and spreads them over every good path. The paths differ in delay, so the
//! packets arrive out of order; TCP takes reordering for loss, so the
//! receiver puts them back in order before the TUN sees them.
//!
//! Each sending lane is one *stream* (its instance number), numbered from
//! its start; the receiving lane keeps one [`Resequencer`] for all the
//! streams that reach it (a flow stays on one lane at each end, so the
//! packets of one flow are in one stream). For each stream:
//!
//! - a packet with the next expected number is delivered at once, and so
//!   are the held packets that follow it without a gap, once their path's
//!   *offset* has run (see [`Resequencer::set_offsets`]: the shorter paths'
//!   packets wait out the difference to the longest one's delay, and a
//!   packet never passes one before it);
//! - a packet ahead of a gap is *held* (copied: the receive buffer is
//!   reused) until the gap fills;
//! - a gap is given up, and what is held behind it delivered, as soon as
//!   it cannot fill any more: every path in use has delivered a later
//!   packet (a path keeps its own packets in order, so the missing one was
//!   lost; a path this gateway no longer uses, down or demoted, does not
//!   count, and one that has not carried the stream yet does: see
//!   [`Resequencer::set_live`]; with no paths known, those that carried the
//!   stream within [`PATH_QUIET`]), or the oldest held packet has waited
//!   `wait` (a bound derived from the paths' delay difference, see
//!   [`crate::core::aggregate::reorder_wait`]), or the held packets reach
//!   [`MAX_HELD`] packets or [`MAX_HELD_BYTES`];
//! - a packet behind the next expected number (its gap was given up) is
//!   delivered anyway, late: TCP takes a late packet better than a lost one.
//!   A late packet also says the wait was too short for these paths now
//!   (their queues differ more than their base delays): the wait grows by
//!   how late it was (up to [`MAX_BOOST`]), and the growth halves every
//!   second without a late packet, as TCP's RACK widens its reordering
//!   window when it sees a spurious retransmission.
//!
//! Memory is bounded per receiving lane: [`MAX_HELD`] packets and
//! [`MAX_HELD_BYTES`] over all its streams, [`MAX_STREAMS`] streams (the
//! least recently used is forgotten first).

use crate::PathId;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most packets held per receiving lane.
pub const MAX_HELD: usize = 4096;
/// Most bytes held per receiving lane.
pub const MAX_HELD_BYTES: usize = 16 << 20;
/// Streams (sending lanes, sender restarts) remembered per receiving lane.
pub const MAX_STREAMS: usize = 16;
/// The most a late packet lengthens the wait.
pub const MAX_BOOST: Duration = Duration::from_millis(50);
/// The growth of the wait halves each time this passes without a late packet.
pub const BOOST_HALF_LIFE: Duration = Duration::from_secs(1);

/// With the paths in use not known ([`Resequencer::set_live`] not called),
/// a path that delivered nothing of a stream for this long no longer
/// counts when deciding that a gap is lost.
pub const PATH_QUIET: Duration = Duration::from_millis(100);

/// What to do with an offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// In order: write it now, then whatever [`Resequencer::take_ready`] gives.
    Deliver,
    /// Ahead of a gap: copied and held.
    Held,
    /// Behind the next expected number (its gap was given up): write it now.
    Late,
    /// Already held: drop it.
    Duplicate,
}

/// A held packet, and what came with it.
#[derive(Clone, Debug)]
pub struct Held {
    pub data: Vec<u8>,
    /// The sender vouched for its checksum.
    pub checksum_ok: bool,
    /// When it arrived.
    pub at: Instant,
    /// When it may go out: its arrival plus its path's offset (see
    /// [`Resequencer::set_offsets`]).
    pub due: Instant,
}

/// Counters, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReorderStats {
    /// Packets that arrived ahead of a gap and were held.
    pub held: u64,
    /// Held packets delivered because their gap filled (delivered in order).
    pub reordered: u64,
    /// Missing packets given up (a gap released without them).
    pub gave_up: u64,
    /// Packets that arrived after their gap was given up.
    pub late: u64,
    /// Copies of a held packet, dropped.
    pub duplicates: u64,
}

#[derive(Clone, Debug)]
struct Stream {
    instance: u32,
    /// The next number expected.
    next: u64,
    /// `held[k]`: the packet numbered `next + k`, if held (`held[0]` never
    /// is: the next packet is delivered when it comes).
    held: VecDeque<Option<Held>>,
    count: usize,
    /// When the oldest packet now held arrived.
    since: Option<Instant>,
    /// Each path's highest number delivered, and when.
    paths: Vec<(PathId, u64, Instant)>,
    last: Instant,
}

/// One receiving lane's resequencing state (see the module docs).
#[derive(Debug)]
pub struct Resequencer {
    streams: Vec<Stream>,
    ready: Vec<Held>,
    spare: Vec<Vec<u8>>,
    held: usize,
    held_bytes: usize,
    wait: Duration,
    /// What late packets added to the wait, and when it was last raised
    /// or halved.
    boost: Duration,
    boost_at: Option<Instant>,
    /// When a gap was last given up for its wait.
    timed_out_at: Option<Instant>,
    /// The paths in use (`None`: all); a gap never waits for another.
    live: Option<Vec<PathId>>,
    /// How long each path's packets are held after they arrive, so that
    /// every path's packets come out as late as the longest path's.
    offsets: Vec<(PathId, Duration)>,
    /// In-order packets whose offset has not run out, oldest first (their
    /// `due` times never decrease: a packet waits behind those before it).
    delayed: VecDeque<Held>,
    stats: ReorderStats,
}

impl Resequencer {
    pub fn new(wait: Duration) -> Resequencer {
        Resequencer {
            streams: Vec::new(),
            ready: Vec::new(),
            spare: Vec::new(),
            held: 0,
            held_bytes: 0,
            wait,
            boost: Duration::ZERO,
            boost_at: None,
            timed_out_at: None,
            live: None,
            offsets: Vec::new(),
            delayed: VecDeque::new(),
            stats: ReorderStats::default(),
        }
    }

    /// How long a gap may hold packets back.
    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    /// How long each path's packets are held once in order: the difference
    /// between the longest path's one-way delay and theirs (see
    /// [`crate::core::aggregate::offsets`]). A flow then sees one delay
    /// whichever paths carry it, the longest path's, from its first packet:
    /// TCP's slow start, which ends when the round trip rises (HyStart), is
    /// not cut short when the sender starts to use a longer path, and the
    /// flow's window grows to the sum of the paths' capacity. A path not
    /// named has none.
    pub fn set_offsets<I>(&mut self, offsets: I)
    where
        I: IntoIterator<Item = (PathId, Duration)>,
    {
        self.offsets.clear();
        self.offsets
            .extend(offsets.into_iter().filter(|(_, d)| !d.is_zero()));
    }

    fn offset(&self, path: PathId) -> Duration {
        self.offsets
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(Duration::ZERO, |(_, d)| *d)
    }

    /// Puts an in-order packet (its own buffer) where it goes out: ready
    /// now, or behind the delayed ones until its due time.
    fn forward(&mut self, h: Held, now: Instant) {
        Out {
            ready: &mut self.ready,
            delayed: &mut self.delayed,
            held: &mut self.held,
            held_bytes: &mut self.held_bytes,
        }
        .forward(h, now);
    }

    /// Moves the delayed packets whose time has come to `ready`; with
    /// `all`, every one (no room left).
    fn flush_delayed(&mut self, now: Instant, all: bool) {
        while let Some(h) = self.delayed.front() {
            if !all && h.due > now {
                break;
            }
            if let Some(h) = self.delayed.pop_front() {
                self.held -= 1;
                self.held_bytes -= h.data.len();
                self.ready.push(h);
            }
        }
    }

    /// The paths that carry the peer's traffic now (BFD Up, not demoted):
    /// a path that left them (it failed) delivers nothing more, so no gap
    /// waits for it. What this releases becomes ready.
    pub fn set_live<I>(&mut self, live: I, now: Instant)
    where
        I: IntoIterator<Item = PathId>,
        I::IntoIter: Clone,
    {
        let live = live.into_iter();
        if self
            .live
            .as_ref()
            .is_some_and(|l| l.iter().copied().eq(live.clone()))
        {
            return;
        }
        self.live = Some(live.collect());
        for i in 0..self.streams.len() {
            self.settle(i, now);
        }
    }

    /// The wait now: the bound set, and what late packets added.
    pub fn wait(&self) -> Duration {
        self.wait + self.boost
    }

    pub fn stats(&self) -> ReorderStats {
        self.stats
    }

    /// Packets held now.
    pub fn occupancy(&self) -> usize {
        self.held
    }

    /// Bytes held now.
    pub fn occupancy_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Offers packet `seq` of stream `instance`, received on `path`.
    pub fn offer(
        &mut self,
        instance: u32,
        seq: u64,
        path: PathId,
        packet: &[u8],
        checksum_ok: bool,
        now: Instant,
    ) -> Offer {
        let offset = self.offset(path);
        if self.held >= MAX_HELD || self.held_bytes + packet.len() > MAX_HELD_BYTES {
            // No room: what is only delayed goes out first.
            self.flush_delayed(now, true);
        }
        let i = self.stream(instance, seq, now);
        let Some(s) = self.streams.get_mut(i) else {
            return Offer::Late;
        };
        s.last = now;
        match s.paths.iter_mut().find(|(p, _, _)| *p == path) {
            Some(e) => {
                if serial_ahead(seq, e.1) > 0 {
                    e.1 = seq;
                }
                e.2 = now;
            }
            None => s.paths.push((path, seq, now)),
        }
        let ahead = serial_ahead(seq, s.next);
        let verdict = if ahead < 0 {
            self.stats.late += 1;
            self.on_late(now);
            Offer::Late
        } else if ahead == 0 {
            s.next = s.next.wrapping_add(1);
            // The (empty) slot of the number just delivered.
            s.held.pop_front();
            if self.delayed.is_empty() && offset.is_zero() {
                Offer::Deliver
            } else {
                // Its path's offset, or packets delayed before it: copied
                // and delayed.
                let h = Held {
                    data: copy_of(&mut self.spare, packet),
                    checksum_ok,
                    at: now,
                    due: now + offset,
                };
                self.forward(h, now);
                Offer::Held
            }
        } else {
            let k = ahead as usize;
            let full = self.held >= MAX_HELD || self.held_bytes + packet.len() > MAX_HELD_BYTES;
            if k >= MAX_HELD || full {
                // Too far ahead, or no room: give up the oldest gap (or
                // everything before `seq`) and try again.
                self.make_room(i, seq, k < MAX_HELD, now);
                return self.offer(instance, seq, path, packet, checksum_ok, now);
            }
            if s.held.len() <= k {
                s.held.resize(k + 1, None);
            }
            match s.held.get_mut(k) {
                Some(Some(_)) => {
                    self.stats.duplicates += 1;
                    return Offer::Duplicate;
                }
                Some(slot) => {
                    *slot = Some(Held {
                        data: copy_of(&mut self.spare, packet),
                        checksum_ok,
                        at: now,
                        due: now + offset,
                    });
                }
                None => return Offer::Late,
            }
            s.count += 1;
            s.since.get_or_insert(now);
            self.held += 1;
            self.held_bytes += packet.len();
            self.stats.held += 1;
            Offer::Held
        };
        self.settle(i, now);
        verdict
    }

    /// Held packets now in order, to write after the packet just offered
    /// (in this order). Give the buffers back with [`Self::recycle`].
    pub fn take_ready(&mut self) -> std::vec::Drain<'_, Held> {
        self.ready.drain(..)
    }

    /// Whether packets are waiting in [`Self::take_ready`].
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Returns a written packet's buffer for reuse.
    pub fn recycle(&mut self, held: Held) {
        if self.spare.len() < 256 {
            self.spare.push(held.data);
        }
    }

    /// When a gap is next given up for its wait, or a delayed packet is
    /// due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let wait = self.wait();
        let gap = self
            .streams
            .iter()
            .filter_map(|s| s.since)
            .min()
            .map(|t| t + wait);
        let due = self.delayed.front().map(|h| h.due);
        match (gap, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A late packet: if a gap was given up for its wait lately, the wait
    /// grows by how late this one came (a bit more).
    fn on_late(&mut self, now: Instant) {
        let Some(at) = self.timed_out_at else {
            return;
        };
        let late = now.saturating_duration_since(at);
        if late > BOOST_HALF_LIFE {
            return;
        }
        self.boost = (self.boost + late + late / 4).min(MAX_BOOST);
        self.boost_at = Some(now);
    }

    /// Halves the wait's growth for each [`BOOST_HALF_LIFE`] without a late
    /// packet.
    fn decay(&mut self, now: Instant) {
        let Some(at) = self.boost_at else {
            return;
        };
        if now.saturating_duration_since(at) >= BOOST_HALF_LIFE {
            self.boost /= 2;
            self.boost_at = (!self.boost.is_zero()).then_some(now);
        }
    }

    /// Gives up the gaps that waited their bound; what they held becomes
    /// ready.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.decay(now);
        let wait = self.wait();
        for i in 0..self.streams.len() {
            while self
                .streams
                .get(i)
                .and_then(|s| s.since)
                .is_some_and(|t| now.saturating_duration_since(t) >= wait)
            {
                self.skip_gap(i, now);
                self.timed_out_at = Some(now);
            }
            self.settle(i, now);
        }
        self.flush_delayed(now, false);
    }

    /// The stream for `instance` (a new one starts at `seq`).
    fn stream(&mut self, instance: u32, seq: u64, now: Instant) -> usize {
        if let Some(i) = self.streams.iter().position(|s| s.instance == instance) {
            return i;
        }
        if self.streams.len() >= MAX_STREAMS {
            // Forget the least recently used stream, delivering what it held.
            if let Some(old) = (0..self.streams.len()).min_by_key(|&i| self.streams[i].last) {
                while self.streams.get(old).is_some_and(|s| s.count > 0) {
                    self.skip_gap(old, now);
                }
                self.streams.swap_remove(old);
            }
        }
        self.streams.push(Stream {
            instance,
            next: seq,
            held: VecDeque::new(),
            count: 0,
            since: None,
            paths: Vec::new(),
            last: now,
        });
        self.streams.len() - 1
    }

    /// Delivers what is in order, and gives up gaps that cannot fill any
    /// more (every recent path is past them).
    fn settle(&mut self, i: usize, now: Instant) {
        loop {
            self.release(i, now);
            let Some(s) = self.streams.get(i) else {
                return;
            };
            if s.count == 0 {
                return;
            }
            let next = s.next;
            let past = |path: &PathId| {
                s.paths
                    .iter()
                    .any(|(p, high, _)| p == path && serial_ahead(*high, next) > 0)
            };
            let gone = match &self.live {
                // Every path in use must be past the gap, including one that
                // has not carried this stream yet, or not lately: the sender
                // spreads a flow onto a longer path only once the shorter
                // one is loaded, and the first packets it sends there come
                // after later-numbered ones on the shorter path.
                Some(live) => !live.is_empty() && live.iter().all(past),
                // Paths not known: those that carried the stream lately.
                None => {
                    let mut recent = s
                        .paths
                        .iter()
                        .filter(|(_, _, at)| now.saturating_duration_since(*at) < PATH_QUIET)
                        .peekable();
                    recent.peek().is_some() && recent.all(|(p, _, _)| past(p))
                }
            };
            if !gone {
                return;
            }
            self.skip_gap(i, now);
        }
    }

    /// Moves the stream's in-order held packets to `ready` (`held[0]` is
    /// the packet numbered `next`).
    fn release(&mut self, i: usize, now: Instant) {
        let Some(s) = self.streams.get_mut(i) else {
            return;
        };
        let mut out = Out {
            ready: &mut self.ready,
            delayed: &mut self.delayed,
            held: &mut self.held,
            held_bytes: &mut self.held_bytes,
        };
        while let Some(Some(_)) = s.held.front() {
            if let Some(Some(h)) = s.held.pop_front() {
                s.next = s.next.wrapping_add(1);
                s.count -= 1;
                *out.held -= 1;
                *out.held_bytes -= h.data.len();
                self.stats.reordered += 1;
                out.forward(h, now);
            }
        }
        s.since = s.held.iter().flatten().map(|h| h.at).next();
        if s.count == 0 {
            s.held.clear();
        }
    }

    /// Gives up the missing packets before the stream's first held one,
    /// and delivers what is then in order.
    fn skip_gap(&mut self, i: usize, now: Instant) {
        let Some(s) = self.streams.get_mut(i) else {
            return;
        };
        if s.count == 0 {
            return;
        }
        let mut missing = 0;
        while let Some(None) = s.held.front() {
            s.held.pop_front();
            s.next = s.next.wrapping_add(1);
            missing += 1;
        }
        self.stats.gave_up += missing;
        self.release(i, now);
    }

    /// Makes room to hold `seq`: `full` (no room left): gives up the
    /// oldest gap of this stream, or of another; else (`seq` too far ahead
    /// to hold) this stream's first gap, or, with nothing held, everything
    /// missing before `seq`.
    fn make_room(&mut self, i: usize, seq: u64, full: bool, now: Instant) {
        let own = self.streams.get(i).map_or(0, |s| s.count);
        if own > 0 {
            self.skip_gap(i, now);
            return;
        }
        if full {
            let other = (0..self.streams.len())
                .filter(|&j| j != i && self.streams[j].count > 0)
                .min_by_key(|&j| self.streams[j].since);
            if let Some(j) = other {
                self.skip_gap(j, now);
                return;
            }
        }
        let Some(s) = self.streams.get_mut(i) else {
            return;
        };
        let gap = serial_ahead(seq, s.next).max(0) as u64;
        s.next = seq;
        s.held.clear();
        self.stats.gave_up += gap;
    }
}

/// A copy of `packet` in a spare buffer (the receive buffer is reused).
fn copy_of(spare: &mut Vec<Vec<u8>>, packet: &[u8]) -> Vec<u8> {
    let mut data = spare.pop().unwrap_or_default();
    data.clear();
    data.extend_from_slice(packet);
    data
}

/// Where in-order packets go: the resequencer's outputs and its memory
/// count, borrowed apart from its streams.
struct Out<'a> {
    ready: &'a mut Vec<Held>,
    delayed: &'a mut VecDeque<Held>,
    held: &'a mut usize,
    held_bytes: &'a mut usize,
}

impl Out<'_> {
    fn forward(&mut self, h: Held, now: Instant) {
        if self.delayed.is_empty() && h.due <= now {
            self.ready.push(h);
            return;
        }
        let due = self.delayed.back().map_or(h.due, |b| b.due.max(h.due));
        *self.held += 1;
        *self.held_bytes += h.data.len();
        self.delayed.push_back(Held { due, ..h });
    }
}

/// `a - b` in serial-number arithmetic (RFC 1982) on 64 bits.
fn serial_ahead(a: u64, b: u64) -> i64 {
    a.wrapping_sub(b) as i64
}

#[cfg(test)]
mod tests;
