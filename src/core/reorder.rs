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
//!   are the held packets that follow it without a gap;
//! - a packet ahead of a gap is *held* (copied: the receive buffer is
//!   reused) until the gap fills;
//! - a gap is given up, and what is held behind it delivered, as soon as
//!   it cannot fill any more: every path that carried the stream recently
//!   has delivered a later packet (a path keeps its own packets in order,
//!   so the missing one was lost; a path this gateway no longer uses, down
//!   or demoted, does not count: see [`Resequencer::set_live`]), or the
//!   oldest held packet has waited
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

/// A path that delivered nothing of a stream for this long no longer
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
            stats: ReorderStats::default(),
        }
    }

    /// How long a gap may hold packets back.
    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
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
            Offer::Deliver
        } else {
            let k = ahead as usize;
            let full = self.held >= MAX_HELD || self.held_bytes + packet.len() > MAX_HELD_BYTES;
            if k >= MAX_HELD || full {
                // Too far ahead, or no room: give up the oldest gap (or
                // everything before `seq`) and try again.
                self.make_room(i, seq, k < MAX_HELD);
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
                    let mut data = self.spare.pop().unwrap_or_default();
                    data.clear();
                    data.extend_from_slice(packet);
                    *slot = Some(Held {
                        data,
                        checksum_ok,
                        at: now,
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

    /// When a gap is next given up for its wait.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let wait = self.wait();
        self.streams
            .iter()
            .filter_map(|s| s.since)
            .min()
            .map(|t| t + wait)
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
                self.skip_gap(i);
                self.timed_out_at = Some(now);
            }
            self.settle(i, now);
        }
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
                    self.skip_gap(old);
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
            self.release(i);
            let Some(s) = self.streams.get(i) else {
                return;
            };
            if s.count == 0 {
                return;
            }
            let next = s.next;
            let mut any = false;
            let mut all_past = true;
            for (path, high, at) in &s.paths {
                let live = self.live.as_ref().is_none_or(|l| l.contains(path));
                if live && now.saturating_duration_since(*at) < PATH_QUIET {
                    any = true;
                    all_past &= serial_ahead(*high, next) > 0;
                }
            }
            if !(any && all_past) {
                return;
            }
            self.skip_gap(i);
        }
    }

    /// Moves the stream's in-order held packets to `ready` (`held[0]` is
    /// the packet numbered `next`).
    fn release(&mut self, i: usize) {
        let Some(s) = self.streams.get_mut(i) else {
            return;
        };
        while let Some(Some(_)) = s.held.front() {
            if let Some(Some(h)) = s.held.pop_front() {
                s.next = s.next.wrapping_add(1);
                s.count -= 1;
                self.held -= 1;
                self.held_bytes -= h.data.len();
                self.stats.reordered += 1;
                self.ready.push(h);
            }
        }
        s.since = s.held.iter().flatten().map(|h| h.at).next();
        if s.count == 0 {
            s.held.clear();
        }
    }

    /// Gives up the missing packets before the stream's first held one,
    /// and delivers what is then in order.
    fn skip_gap(&mut self, i: usize) {
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
        self.release(i);
    }

    /// Makes room to hold `seq`: `full` (no room left): gives up the
    /// oldest gap of this stream, or of another; else (`seq` too far ahead
    /// to hold) this stream's first gap, or, with nothing held, everything
    /// missing before `seq`.
    fn make_room(&mut self, i: usize, seq: u64, full: bool) {
        let own = self.streams.get(i).map_or(0, |s| s.count);
        if own > 0 {
            self.skip_gap(i);
            return;
        }
        if full {
            let other = (0..self.streams.len())
                .filter(|&j| j != i && self.streams[j].count > 0)
                .min_by_key(|&j| self.streams[j].since);
            if let Some(j) = other {
                self.skip_gap(j);
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

/// `a - b` in serial-number arithmetic (RFC 1982) on 64 bits.
fn serial_ahead(a: u64, b: u64) -> i64 {
    a.wrapping_sub(b) as i64
}

#[cfg(test)]
mod tests;
