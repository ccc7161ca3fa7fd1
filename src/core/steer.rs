//! Which path carries a peer's flows: the failover policy, sans-IO.
//!
//! A path is *healthy* while its BFD session is Up. A healthy path becomes
//! *eligible* to carry traffic either at once, when the peer has no eligible
//! path at all (start-up, or every other path has failed), or after it has
//! stayed healthy for `revert_hold`. The hold keeps a recovering path from
//! pulling traffic back while it may still be flapping; a failure, in
//! contrast, takes effect immediately.
//!
//! - `active-backup`: every flow goes to the eligible path with the lowest
//!   priority number (ties broken by configuration order).
//! - `balance`: flows are spread by weighted rendezvous hashing over the
//!   eligible paths. A flow's path depends only on its hash and the eligible
//!   set, so no per-flow state is kept (a million flows cost nothing), a
//!   failed path's flows move while every other flow stays put, and when a
//!   path becomes eligible again (after `revert_hold`) it takes back the
//!   flows that hash to it.
//! - `duplicate`: every packet goes to the two best eligible paths (the
//!   receiver keeps the first copy, see [`crate::core::dedup`]).
//! - `aggregate`: every flow uses every eligible path that is not demoted,
//!   packet by packet, as the sending lane's [`crate::core::aggregate::Scheduler`]
//!   places them; the receiver puts them back in order
//!   ([`crate::core::reorder`]).
//!
//! Recovery under `balance` is a deliberate choice: rendezvous hashing is
//! stateless, so when a path becomes eligible again it takes back exactly
//! the flows that hash to it (those that had moved away when it failed, and
//! no others). Those flows move twice (away at the failure, back after the
//! hold); in exchange no flow table is needed and the placement is the same
//! on every restart. A flow that must never move back can use
//! `active-backup` on its own peer.
//!
//! Health comes from BFD and, in the engine, from faster signals (carrier
//! or address loss on the underlay interface, send errors): the engine
//! reports the combination as one `healthy` bit.
//!
//! # Quality
//!
//! A healthy path may still be *degraded* ([`crate::core::quality`]: too
//! much loss, a round trip or jitter past its limit, an MTU black hole). A
//! degraded path is *demoted* when an eligible path that is not degraded
//! and loses at most half as much exists (the margin: no move to a path
//! nearly as bad): the paths better by that margin come first, demoted
//! paths after all others (`active-backup` and `duplicate` use the best
//! ones first) and `balance` leaves them out.
//! When no path is better by that margin (every path as bad), nothing
//! moves: the active path stays first. Quality moves are capped per
//! minute (`max_moves_per_minute`); a change past the cap waits until the
//! oldest move of the last minute is a minute old. Failures are never
//! capped.
//!
//! # Flap damping
//!
//! A path that fails again and again would pull traffic back and forth on
//! every recovery. Each failure of a healthy path is a *flap* and raises
//! the path's damping level by one (at most [`MAX_DAMP_LEVEL`]); before
//! that, the level drops by one for every [`STABLE_PERIOD`] the path had
//! stayed healthy, so a path that behaves is forgiven. A recovering path
//! then waits `revert_hold × 2^(level-1)` instead of `revert_hold` before it
//! carries traffic again: 1, 2, 4, ... 32 times the hold, bounded by
//! `revert_hold × 2^(MAX_DAMP_LEVEL-1)`. With `revert_hold = 0` there is no
//! hold and hence no damping. Damping never costs connectivity: when a
//! peer has no eligible path at all, the first healthy one is used at once,
//! damped or not.

use crate::config::Policy;
use crate::core::aggregate::Board;
use crate::core::fec::Code;
use crate::core::wire::flow::mix;
use crate::PathId;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The highest damping level: the hold is at most `revert_hold × 2^(MAX_DAMP_LEVEL-1)`.
pub const MAX_DAMP_LEVEL: u32 = 6;
/// Each period of uninterrupted health forgives one damping level.
pub const STABLE_PERIOD: Duration = Duration::from_secs(30);

/// One path as the steering sees it.
#[derive(Clone, Debug)]
struct Slot {
    id: PathId,
    priority: u32,
    weight: u32,
    healthy: bool,
    eligible_at: Option<Instant>,
    eligible: bool,
    healthy_since: Option<Instant>,
    level: u32,
    flaps: u64,
    /// The quality verdict as last reported, and as applied to the ranking
    /// (they differ while the move cap holds a change back).
    degraded: bool,
    applied: bool,
    /// The path's sending loss ratio, for the margin.
    loss: f64,
}

/// A path's steering state handed to a new process
/// ([`Steering::export_path`]): instants as durations from the handover.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotExport {
    pub eligible: bool,
    pub eligible_in_ns: Option<u64>,
    pub healthy_for_ns: Option<u64>,
    pub level: u32,
    pub flaps: u64,
    pub degraded: bool,
    pub applied: bool,
}

/// How long a quality move counts against the cap.
pub const MOVE_WINDOW: Duration = Duration::from_secs(60);

/// A path's flap damping, for status and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damping {
    /// Failures of the path while healthy, since start.
    pub flaps: u64,
    /// Current damping level (0: none).
    pub level: u32,
    /// When a damped path may carry traffic again (only while the hold is
    /// longer than `revert_hold`).
    pub until: Option<Instant>,
}

impl Slot {
    /// Records a failure of a healthy path: forgive one level per
    /// [`STABLE_PERIOD`] of health, then raise the level by one.
    fn flap(&mut self, now: Instant) {
        let stable = self
            .healthy_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let forgiven = (stable.as_secs() / STABLE_PERIOD.as_secs()).min(u64::from(u32::MAX));
        self.level = self
            .level
            .saturating_sub(forgiven as u32)
            .saturating_add(1)
            .min(MAX_DAMP_LEVEL);
        self.flaps += 1;
        self.healthy_since = None;
    }
}

/// The hold before a recovered path at damping `level` carries traffic.
pub fn damped_hold(revert_hold: Duration, level: u32) -> Duration {
    let exp = level.clamp(1, MAX_DAMP_LEVEL) - 1;
    revert_hold.saturating_mul(1 << exp)
}

/// The active path changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: Option<PathId>,
    pub to: Option<PathId>,
}

/// Per-peer path choice.
#[derive(Clone, Debug)]
pub struct Steering {
    policy: Policy,
    revert_hold: Duration,
    slots: Vec<Slot>,
    active: Option<PathId>,
    /// The eligible set last published, best first, with whether each is
    /// demoted.
    published: Vec<(PathId, bool)>,
    changed: bool,
    /// Quality moves allowed per [`MOVE_WINDOW`], and when the last ones were.
    max_moves: u32,
    moves: VecDeque<Instant>,
    /// A quality verdict waits for the cap.
    pending: bool,
    /// The paths' estimates (rates, delays, the reordering wait), shared
    /// with the forwarding threads.
    board: Option<BoardRef>,
}

/// A [`Board`] in a snapshot (snapshots compare equal when they share it).
#[derive(Clone, Debug)]
pub struct BoardRef(pub Arc<Board>);

impl PartialEq for BoardRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Steering {
    /// `paths` lists (id, priority, weight) in configuration order.
    pub fn new(policy: Policy, revert_hold: Duration, paths: &[(PathId, u32, u32)]) -> Self {
        let slots = paths
            .iter()
            .map(|&(id, priority, weight)| Slot {
                id,
                priority,
                weight: weight.max(1),
                healthy: false,
                eligible_at: None,
                eligible: false,
                healthy_since: None,
                level: 0,
                flaps: 0,
                degraded: false,
                applied: false,
                loss: 0.0,
            })
            .collect();
        Steering {
            policy,
            revert_hold,
            slots,
            active: None,
            published: Vec::new(),
            changed: false,
            max_moves: u32::MAX,
            moves: VecDeque::new(),
            pending: false,
            board: None,
        }
    }

    /// Shares the paths' estimates with the forwarding threads (a new
    /// board when the path set changes).
    pub fn set_board(&mut self, board: Arc<Board>) {
        self.board = Some(BoardRef(board));
        self.changed = true;
    }

    /// The board the snapshots carry.
    pub fn board(&self) -> Option<&Arc<Board>> {
        self.board.as_ref().map(|b| &b.0)
    }

    /// Caps the moves for quality in any minute (`max_moves_per_minute`).
    pub fn set_max_moves(&mut self, per_minute: u32) {
        self.max_moves = per_minute;
    }

    /// A path's quality verdict: degraded or not, and its sending loss
    /// ratio (the margin compares paths by it).
    pub fn handle_path_quality(
        &mut self,
        id: PathId,
        degraded: bool,
        loss: f64,
        now: Instant,
    ) -> Option<Change> {
        let slot = self.slots.iter_mut().find(|s| s.id == id)?;
        slot.loss = loss;
        if slot.degraded == degraded {
            return None;
        }
        slot.degraded = degraded;
        self.apply_quality(now)
    }

    /// Applies the reported quality verdicts to the ranking, unless that
    /// moves traffic and the cap is reached.
    fn apply_quality(&mut self, now: Instant) -> Option<Change> {
        while self
            .moves
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= MOVE_WINDOW)
        {
            self.moves.pop_front();
        }
        let before: Vec<bool> = self.slots.iter().map(|s| s.applied).collect();
        for s in &mut self.slots {
            s.applied = s.degraded;
        }
        if self.ranked() == self.published {
            self.pending = false;
            return None;
        }
        if self.moves.len() >= self.max_moves as usize {
            for (s, b) in self.slots.iter_mut().zip(before) {
                s.applied = b;
            }
            self.pending = true;
            return None;
        }
        self.pending = false;
        self.moves.push_back(now);
        self.recompute()
    }

    /// Whether the selection (the eligible set, not just the active path)
    /// changed since the last call: `balance` and `duplicate` use every
    /// eligible path, so the data plane needs a new snapshot then too.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// A new path (configuration reload); it starts unhealthy, so nothing
    /// moves until its session comes up.
    pub fn add_path(&mut self, id: PathId, priority: u32, weight: u32) {
        if self.slots.iter().any(|s| s.id == id) {
            return;
        }
        self.slots.push(Slot {
            id,
            priority,
            weight: weight.max(1),
            healthy: false,
            eligible_at: None,
            eligible: false,
            healthy_since: None,
            level: 0,
            flaps: 0,
            degraded: false,
            applied: false,
            loss: 0.0,
        });
    }

    /// A path was removed (configuration reload): its flows move as if it
    /// had failed; the other paths' flows stay where they are.
    pub fn remove_path(&mut self, id: PathId) -> Option<Change> {
        let before = self.slots.len();
        self.slots.retain(|s| s.id != id);
        if self.slots.len() == before {
            return None;
        }
        self.promote_if_alone();
        self.recompute()
    }

    /// A path's health changed (BFD Up, or not).
    pub fn handle_path_health(
        &mut self,
        id: PathId,
        healthy: bool,
        now: Instant,
    ) -> Option<Change> {
        let any_eligible = self.slots.iter().any(|s| s.eligible && s.id != id);
        let hold = self.revert_hold;
        let slot = self.slots.iter_mut().find(|s| s.id == id)?;
        if slot.healthy == healthy {
            return None;
        }
        slot.healthy = healthy;
        if !healthy {
            slot.flap(now);
            slot.eligible = false;
            slot.eligible_at = None;
        } else {
            slot.healthy_since = Some(now);
            let hold = damped_hold(hold, slot.level);
            if !any_eligible || hold.is_zero() {
                slot.eligible = true;
            } else {
                slot.eligible_at = Some(now + hold);
            }
        }
        if !healthy {
            self.promote_if_alone();
        }
        self.recompute()
    }

    /// When no path is eligible, the best healthy path waiting out its hold
    /// is taken at once: holding it would only cost connectivity.
    fn promote_if_alone(&mut self) {
        if self.slots.iter().any(|s| s.eligible) {
            return;
        }
        let best = self
            .slots
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.healthy && s.eligible_at.is_some())
            .min_by_key(|(i, s)| (s.priority, *i));
        if let Some((_, slot)) = best {
            slot.eligible = true;
            slot.eligible_at = None;
        }
    }

    /// A path's flap damping state.
    pub fn damping(&self, id: PathId) -> Option<Damping> {
        let s = self.slots.iter().find(|s| s.id == id)?;
        let damped = s.level > 1;
        Some(Damping {
            flaps: s.flaps,
            level: s.level,
            until: s.eligible_at.filter(|_| damped),
        })
    }

    /// What a new process needs to place flows as this one does (an
    /// upgrade): the path's eligibility and the hold it waits out, its
    /// damping, and the quality verdict as reported and as applied.
    pub fn export_path(&self, id: PathId, now: Instant) -> Option<SlotExport> {
        let s = self.slots.iter().find(|s| s.id == id)?;
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Some(SlotExport {
            eligible: s.eligible,
            eligible_in_ns: s.eligible_at.map(|t| ns(t.saturating_duration_since(now))),
            healthy_for_ns: s
                .healthy_since
                .map(|t| ns(now.saturating_duration_since(t))),
            level: s.level,
            flaps: s.flaps,
            degraded: s.degraded,
            applied: s.applied,
        })
    }

    /// Takes over a path's state from the old process, where this process
    /// sees the path healthy too (a session that did not survive the
    /// handover starts over as it is). Call [`Steering::settle`] once every
    /// path is taken over.
    pub fn import_path(&mut self, id: PathId, e: &SlotExport, now: Instant) {
        let Some(s) = self.slots.iter_mut().find(|s| s.id == id) else {
            return;
        };
        s.level = e.level;
        s.flaps = s.flaps.max(e.flaps);
        s.degraded = e.degraded;
        s.applied = e.applied;
        if !s.healthy {
            return;
        }
        s.eligible = e.eligible;
        s.eligible_at = match (e.eligible, e.eligible_in_ns) {
            (false, Some(ns)) => Some(now + Duration::from_nanos(ns)),
            (false, None) => Some(now),
            (true, _) => None,
        };
        s.healthy_since = e
            .healthy_for_ns
            .and_then(|ns| now.checked_sub(Duration::from_nanos(ns)))
            .or(s.healthy_since);
    }

    /// After [`Steering::import_path`]: the ranking from the imported state
    /// (a peer left without an eligible path takes its best healthy one).
    pub fn settle(&mut self) -> Option<Change> {
        self.promote_if_alone();
        self.recompute()
    }

    /// Promotes paths whose hold has expired, and applies a quality
    /// verdict that waited for the cap.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Change> {
        if self.pending && self.poll_timeout().is_some_and(|t| t <= now) {
            if let Some(change) = self.apply_quality(now) {
                return Some(change);
            }
        }
        let mut promoted = false;
        for s in &mut self.slots {
            if let Some(at) = s.eligible_at {
                if at <= now {
                    s.eligible_at = None;
                    s.eligible = true;
                    promoted = true;
                }
            }
        }
        if promoted {
            self.recompute()
        } else {
            None
        }
    }

    /// When [`Steering::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let cap = self
            .moves
            .front()
            .filter(|_| self.pending)
            .map(|&t| t + MOVE_WINDOW);
        self.slots
            .iter()
            .filter_map(|s| s.eligible_at)
            .chain(cap)
            .min()
    }

    fn recompute(&mut self) -> Option<Change> {
        let ranked = self.ranked();
        if ranked != self.published {
            self.published = ranked;
            self.changed = true;
        }
        let best = self.published.first().map(|&(id, _)| id);
        if best == self.active {
            return None;
        }
        let change = Change {
            from: self.active,
            to: best,
        };
        self.active = best;
        Some(change)
    }

    /// The peer's policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Eligible paths, best first, each with whether it is demoted:
    /// paths not demoted first, then by priority and configuration order.
    /// When some eligible path is degraded but none is demoted (no path is
    /// better by the margin), the active path stays first: nothing moves.
    fn ranked(&self) -> Vec<(PathId, bool)> {
        let eligible: Vec<(usize, &Slot)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.eligible)
            .collect();
        let better = |o: &Slot, than: &Slot| !o.applied && o.loss <= than.loss * 0.5;
        let demoted: Vec<bool> = eligible
            .iter()
            .map(|(_, s)| s.applied && eligible.iter().any(|(_, o)| better(o, s)))
            .collect();
        // A path better by the margin than a demoted one goes before one
        // that is merely not degraded.
        let fallback = |s: &Slot| {
            demoted.iter().any(|d| *d)
                && !eligible
                    .iter()
                    .zip(&demoted)
                    .any(|((_, d), &is)| is && better(s, d))
        };
        let mut v: Vec<(bool, bool, bool, u32, usize, PathId)> = eligible
            .iter()
            .zip(&demoted)
            .map(|(&(i, s), &d)| (d, !d && fallback(s), false, s.priority, i, s.id))
            .collect();
        let stay = !demoted.iter().any(|d| *d) && eligible.iter().any(|(_, s)| s.applied);
        if stay {
            for r in &mut v {
                r.2 = Some(r.5) != self.active;
            }
        }
        v.sort_unstable_by_key(|&(d, f, not_active, prio, i, _)| (d, f, not_active, prio, i));
        v.into_iter().map(|(d, _, _, _, _, id)| (id, d)).collect()
    }

    /// Whether the path is demoted now (a better path exists: `balance` and
    /// `aggregate` leave it out).
    pub fn is_demoted(&self, id: PathId) -> bool {
        self.published.iter().any(|&(p, d)| p == id && d)
    }

    /// Whether the path is degraded in the ranking now.
    pub fn is_degraded(&self, id: PathId) -> bool {
        self.slots.iter().any(|s| s.id == id && s.applied)
    }

    /// The best eligible path (all traffic, for `active-backup`).
    pub fn active(&self) -> Option<PathId> {
        self.active
    }

    /// Whether a path may carry traffic now.
    pub fn is_eligible(&self, id: PathId) -> bool {
        self.slots.iter().any(|s| s.id == id && s.eligible)
    }

    /// The immutable view the data plane uses to place packets.
    pub fn selection(&self) -> Selection {
        let ranked = self.ranked();
        let eligible = ranked
            .iter()
            .filter(|&&(_, demoted)| {
                !(demoted && matches!(self.policy, Policy::Balance | Policy::Aggregate))
            })
            .filter_map(|(id, _)| self.slots.iter().find(|s| s.id == *id))
            .map(|s| (s.id, s.weight))
            .collect();
        let mut sel = Selection::new(self.policy, self.active, eligible);
        sel.board = self.board.clone();
        sel
    }
}

/// Buckets of the weighted `balance` table: flows are spread over this
/// many buckets by the top bits of their hash.
const BUCKETS: usize = 4096;
const BUCKET_SHIFT: u32 = 64 - BUCKETS.trailing_zeros();

/// A snapshot of one peer's steering, read by the forwarding threads.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub policy: Policy,
    pub active: Option<PathId>,
    /// Eligible paths with their weights, best first.
    pub eligible: Vec<(PathId, u32)>,
    /// `balance` over several paths: each bucket's path, chosen by
    /// (weighted) rendezvous hashing of the bucket's number when the
    /// snapshot is built, so that the forwarding threads look a flow's path
    /// up instead of hashing it once per path (and, with unequal weights,
    /// taking a logarithm per path) for every packet. A path that leaves or
    /// joins moves only its own buckets, as rendezvous hashing moves only
    /// its own flows.
    buckets: Option<Arc<[PathId]>>,
    /// The peer's path estimates (`aggregate`'s scheduler, every receiver's
    /// reordering wait).
    pub board: Option<BoardRef>,
    /// The forward-error-correction code the senders use now (`None`: no
    /// parity), chosen by the engine ([`crate::core::fec`]).
    pub fec: Option<Code>,
}

impl Selection {
    /// A snapshot; builds the bucket table for `balance` over several paths.
    pub fn new(policy: Policy, active: Option<PathId>, eligible: Vec<(PathId, u32)>) -> Selection {
        let mut sel = Selection {
            policy,
            active,
            eligible,
            buckets: None,
            board: None,
            fec: None,
        };
        if policy == Policy::Balance && sel.eligible.len() > 1 {
            let table: Option<Vec<PathId>> = (0..BUCKETS as u64)
                .map(|b| sel.rendezvous(mix(b)))
                .collect();
            sel.buckets = table.map(Arc::from);
        }
        sel
    }

    /// The path for a flow, or `None` when the peer has no usable path.
    #[inline]
    pub fn select(&self, flow_hash: u64) -> Option<PathId> {
        match self.policy {
            Policy::Balance => match &self.buckets {
                Some(table) => table.get((flow_hash >> BUCKET_SHIFT) as usize).copied(),
                None => self.rendezvous(flow_hash),
            },
            // `aggregate` places packet by packet (the lanes' scheduler);
            // this is its path for what is placed per flow.
            Policy::ActiveBackup | Policy::Duplicate | Policy::Aggregate => self.active,
        }
    }

    /// `balance` over several paths: the path of each of `n` buckets, by
    /// the same weighted rendezvous hashing as the lanes' own table (the
    /// kernel fast path's table, whose flows are bucketed by the kernel's
    /// hash). `None` for any other steering.
    pub fn bucket_paths(&self, n: usize) -> Option<Vec<PathId>> {
        if self.policy != Policy::Balance || self.eligible.len() < 2 {
            return None;
        }
        (0..n as u64).map(|b| self.rendezvous(mix(b))).collect()
    }

    /// The paths `aggregate` spreads over (none: place per flow, with
    /// [`Self::select`]).
    pub fn spread(&self) -> Option<(&Board, impl Iterator<Item = PathId> + '_)> {
        match (self.policy, &self.board) {
            (Policy::Aggregate, Some(b)) if self.eligible.len() > 1 => {
                Some((b.0.as_ref(), self.eligible.iter().map(|&(id, _)| id)))
            }
            _ => None,
        }
    }

    /// The second copy's path under `duplicate`, if there is one.
    pub fn duplicate_path(&self) -> Option<PathId> {
        match self.policy {
            Policy::Duplicate => self.eligible.get(1).map(|&(id, _)| id),
            _ => None,
        }
    }

    /// Weighted rendezvous hashing: the path with the highest
    /// `weight / -ln(u)` wins, `u` uniform in (0, 1) from (flow, path).
    ///
    /// With equal weights the score grows with `u` alone, so the path with
    /// the highest hash wins and no logarithm is needed (the same choice).
    fn rendezvous(&self, flow_hash: u64) -> Option<PathId> {
        let score_of = |id: PathId| mix(flow_hash ^ (u64::from(id.0) << 48 | u64::from(id.0)));
        let first = self.eligible.first().map(|&(_, w)| w);
        if self.eligible.iter().all(|&(_, w)| Some(w) == first) {
            let mut best: Option<(u64, PathId)> = None;
            for &(id, _) in &self.eligible {
                let score = score_of(id) >> 11;
                if best.is_none_or(|(b, _)| score > b) {
                    best = Some((score, id));
                }
            }
            return best.map(|(_, id)| id);
        }
        self.rendezvous_weighted(flow_hash)
    }

    /// [`Self::rendezvous`] with the logarithm, for any weights.
    fn rendezvous_weighted(&self, flow_hash: u64) -> Option<PathId> {
        let score_of = |id: PathId| mix(flow_hash ^ (u64::from(id.0) << 48 | u64::from(id.0)));
        let mut best: Option<(f64, PathId)> = None;
        for &(id, weight) in &self.eligible {
            let h = score_of(id);
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = f64::from(weight) / -u.ln();
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, id));
            }
        }
        best.map(|(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path's bucket table: every bucket on an eligible path, in
    /// shares that follow the weights; none but for `balance` over several.
    #[test]
    fn bucket_paths_follow_the_weights() {
        let sel = Selection::new(
            Policy::Balance,
            Some(PathId(0)),
            vec![(PathId(0), 3), (PathId(1), 1)],
        );
        let table = sel.bucket_paths(256).expect("a table");
        assert_eq!(table.len(), 256);
        let first = table.iter().filter(|&&p| p == PathId(0)).count();
        assert!(
            (160..=220).contains(&first),
            "{first} of 256 on the weight-3 path"
        );
        assert!(table.iter().all(|p| [PathId(0), PathId(1)].contains(p)));
        let one = Selection::new(Policy::Balance, Some(PathId(0)), vec![(PathId(0), 1)]);
        assert_eq!(one.bucket_paths(256), None);
        let ab = Selection::new(
            Policy::ActiveBackup,
            Some(PathId(0)),
            vec![(PathId(0), 1), (PathId(1), 1)],
        );
        assert_eq!(ab.bucket_paths(256), None);
    }

    /// Unequal weights go through the bucket table: shares follow the
    /// weights, and removing a path moves only the flows it carried.
    #[test]
    fn weighted_table_keeps_shares_and_moves_only_the_lost_path() {
        let all = Selection::new(Policy::Balance, Some(A), vec![(A, 1), (B, 1), (C, 2)]);
        let without_b = Selection::new(Policy::Balance, Some(A), vec![(A, 1), (C, 2)]);
        let mut count = [0u32; 3];
        for flow in 0..40_000u64 {
            let h = mix(flow);
            let p = all.select(h).unwrap();
            count[usize::from(p.0)] += 1;
            let q = without_b.select(h).unwrap();
            if p != B {
                assert_eq!(p, q, "flow {flow} moved off a path that stayed");
            }
        }
        // Expected 10k / 10k / 20k, within 5 %.
        for (n, want) in count.iter().zip([10_000u32, 10_000, 20_000]) {
            assert!(n.abs_diff(want) < want / 20, "{count:?}");
        }
    }

    #[test]
    fn equal_weights_choose_as_the_weighted_formula() {
        for weight in [1, 5] {
            let sel = Selection::new(
                Policy::Balance,
                Some(PathId(2)),
                vec![
                    (PathId(2), weight),
                    (PathId(0), weight),
                    (PathId(7), weight),
                ],
            );
            for flow in 0..20_000u64 {
                let h = mix(flow);
                assert_eq!(sel.rendezvous(h), sel.rendezvous_weighted(h), "flow {flow}");
            }
        }
    }

    const A: PathId = PathId(0);
    const B: PathId = PathId(1);
    const C: PathId = PathId(2);

    fn ab(hold_ms: u64) -> Steering {
        Steering::new(
            Policy::ActiveBackup,
            Duration::from_millis(hold_ms),
            &[(A, 1, 1), (B, 2, 1)],
        )
    }

    #[test]
    fn reload_adds_and_removes_paths_without_moving_others() {
        let t0 = Instant::now();
        let mut s = ab(2000);
        s.handle_path_health(A, true, t0);
        s.handle_path_health(B, true, t0);
        assert_eq!(s.active(), Some(A));
        // A new path with a better priority starts unhealthy: nothing moves.
        s.add_path(C, 0, 1);
        assert_eq!(s.active(), Some(A));
        // Removing the backup does not touch the active path.
        assert_eq!(s.remove_path(B), None);
        assert_eq!(s.active(), Some(A));
        // Removing the active one moves its flows at once.
        assert_eq!(
            s.remove_path(A),
            Some(Change {
                from: Some(A),
                to: None
            })
        );
        assert_eq!(s.remove_path(A), None);
        // The new path, once healthy, takes over at once (nothing else eligible).
        assert_eq!(
            s.handle_path_health(C, true, t0),
            Some(Change {
                from: None,
                to: Some(C)
            })
        );
    }

    #[test]
    fn first_healthy_path_is_active_at_once() {
        let t0 = Instant::now();
        let mut s = ab(2000);
        assert_eq!(s.active(), None);
        assert_eq!(
            s.handle_path_health(B, true, t0),
            Some(Change {
                from: None,
                to: Some(B)
            })
        );
        // The primary arriving later waits out the hold.
        assert_eq!(s.handle_path_health(A, true, t0), None);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(2000)));
        assert_eq!(s.handle_timeout(t0 + Duration::from_millis(1999)), None);
        assert_eq!(
            s.handle_timeout(t0 + Duration::from_millis(2000)),
            Some(Change {
                from: Some(B),
                to: Some(A)
            })
        );
    }

    #[test]
    fn failure_moves_at_once_and_recovery_waits_for_hold() {
        let t0 = Instant::now();
        let mut s = ab(2000);
        s.handle_path_health(A, true, t0);
        s.handle_path_health(B, true, t0);
        assert_eq!(s.active(), Some(A));
        s.handle_timeout(t0 + Duration::from_secs(3));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            s.handle_path_health(A, false, t1),
            Some(Change {
                from: Some(A),
                to: Some(B)
            })
        );
        assert_eq!(
            s.handle_path_health(A, true, t1 + Duration::from_millis(100)),
            None
        );
        assert_eq!(s.active(), Some(B));
        // A flap during the hold restarts it, doubled by flap damping.
        assert_eq!(
            s.handle_path_health(A, false, t1 + Duration::from_millis(500)),
            None
        );
        assert_eq!(
            s.handle_path_health(A, true, t1 + Duration::from_millis(600)),
            None
        );
        assert_eq!(s.handle_timeout(t1 + Duration::from_millis(2600)), None);
        assert_eq!(s.handle_timeout(t1 + Duration::from_millis(4599)), None);
        assert_eq!(
            s.handle_timeout(t1 + Duration::from_millis(4600)),
            Some(Change {
                from: Some(B),
                to: Some(A)
            })
        );
    }

    #[test]
    fn all_down_then_any_up_is_immediate() {
        let t0 = Instant::now();
        let mut s = ab(2000);
        s.handle_path_health(A, true, t0);
        assert_eq!(
            s.handle_path_health(A, false, t0),
            Some(Change {
                from: Some(A),
                to: None
            })
        );
        assert_eq!(s.selection().select(1), None);
        assert_eq!(
            s.handle_path_health(B, true, t0),
            Some(Change {
                from: None,
                to: Some(B)
            })
        );
    }

    #[test]
    fn zero_hold_reverts_immediately() {
        let t0 = Instant::now();
        let mut s = ab(0);
        s.handle_path_health(B, true, t0);
        assert_eq!(
            s.handle_path_health(A, true, t0),
            Some(Change {
                from: Some(B),
                to: Some(A)
            })
        );
    }

    #[test]
    fn balance_moves_only_the_failed_paths_flows() {
        let t0 = Instant::now();
        let mut s = Steering::new(
            Policy::Balance,
            Duration::ZERO,
            &[(A, 1, 1), (B, 1, 1), (C, 1, 2)],
        );
        for p in [A, B, C] {
            s.handle_path_health(p, true, t0);
        }
        let before = s.selection();
        let placed: Vec<_> = (0..4000u64)
            .map(|f| before.select(mix(f)).unwrap())
            .collect();
        let count = |p| placed.iter().filter(|&&x| x == p).count();
        // Weights 1:1:2 -> about 1000:1000:2000.
        assert!((800..1200).contains(&count(A)), "{}", count(A));
        assert!((1700..2300).contains(&count(C)), "{}", count(C));
        s.handle_path_health(B, false, t0);
        let after = s.selection();
        for (f, was) in placed.iter().enumerate() {
            let now = after.select(mix(f as u64)).unwrap();
            if *was != B {
                assert_eq!(now, *was, "flow {f} moved although its path is healthy");
            } else {
                assert_ne!(now, B);
            }
        }
    }

    #[test]
    fn a_second_eligible_path_is_a_selection_change() {
        let t0 = Instant::now();
        let mut s = Steering::new(Policy::Duplicate, ms(100), &[(A, 1, 1), (B, 2, 1)]);
        s.handle_path_health(A, true, t0);
        assert!(s.take_changed());
        assert!(!s.take_changed());
        // B waits out the hold; when it joins, the active path stays A but
        // the selection (the copy's path) changes.
        assert_eq!(s.handle_path_health(B, true, t0), None);
        assert!(!s.take_changed());
        assert_eq!(s.handle_timeout(t0 + ms(100)), None);
        assert!(s.take_changed());
        assert_eq!(s.selection().duplicate_path(), Some(B));
        assert_eq!(s.handle_path_health(B, false, t0 + ms(200)), None);
        assert!(s.take_changed());
        assert_eq!(s.selection().duplicate_path(), None);
    }

    #[test]
    fn duplicate_uses_the_two_best() {
        let t0 = Instant::now();
        let mut s = Steering::new(
            Policy::Duplicate,
            Duration::ZERO,
            &[(A, 3, 1), (B, 1, 1), (C, 2, 1)],
        );
        for p in [A, B, C] {
            s.handle_path_health(p, true, t0);
        }
        let sel = s.selection();
        assert_eq!(sel.select(7), Some(B));
        assert_eq!(sel.duplicate_path(), Some(C));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Fails and recovers A at `t`; returns when A would be eligible again.
    fn flap_a(s: &mut Steering, t: Instant) -> Instant {
        s.handle_path_health(A, false, t);
        s.handle_path_health(A, true, t + ms(10));
        s.poll_timeout().unwrap()
    }

    #[test]
    fn damping_doubles_the_hold_up_to_a_bound() {
        let t0 = Instant::now();
        let mut s = ab(1000);
        s.handle_path_health(A, true, t0);
        s.handle_path_health(B, true, t0);
        assert_eq!(s.active(), Some(A));
        let mut t = t0 + ms(100);
        let mut holds = Vec::new();
        for _ in 0..8 {
            let at = flap_a(&mut s, t);
            holds.push(at.duration_since(t + ms(10)).as_millis());
            t += ms(100);
        }
        assert_eq!(
            holds,
            vec![1000, 2000, 4000, 8000, 16000, 32000, 32000, 32000]
        );
        let d = s.damping(A).unwrap();
        assert_eq!(d.flaps, 8);
        assert_eq!(d.level, MAX_DAMP_LEVEL);
        assert_eq!(d.until, s.poll_timeout());
        assert_eq!(s.active(), Some(B));
        // The hold runs out: A carries traffic again, no longer shown as damped.
        let back = s.poll_timeout().unwrap();
        assert_eq!(s.handle_timeout(back - ms(1)), None);
        assert_eq!(
            s.handle_timeout(back),
            Some(Change {
                from: Some(B),
                to: Some(A)
            })
        );
        assert_eq!(s.damping(A).unwrap().until, None);
    }

    #[test]
    fn damping_decays_while_stable() {
        let t0 = Instant::now();
        let mut s = ab(1000);
        s.handle_path_health(A, true, t0);
        s.handle_path_health(B, true, t0);
        let mut t = t0 + ms(100);
        for _ in 0..6 {
            flap_a(&mut s, t);
            t += ms(100);
        }
        assert_eq!(s.damping(A).unwrap().level, 6);
        // A stays healthy for three stable periods (counted from its recovery).
        let recovered = t - ms(100) + ms(10);
        let t = recovered + STABLE_PERIOD * 3;
        let at = flap_a(&mut s, t);
        // 6 - 3 + 1 = level 4: 8 x the hold.
        assert_eq!(s.damping(A).unwrap().level, 4);
        assert_eq!(at.duration_since(t + ms(10)), ms(8000));
        // A long stable run forgives everything: back to the plain hold.
        let t = t + ms(10) + STABLE_PERIOD * 100;
        let at = flap_a(&mut s, t);
        assert_eq!(s.damping(A).unwrap().level, 1);
        assert_eq!(at.duration_since(t + ms(10)), ms(1000));
        assert_eq!(s.damping(A).unwrap().until, None);
    }

    #[test]
    fn damping_never_costs_connectivity() {
        let t0 = Instant::now();
        let mut s = ab(1000);
        s.handle_path_health(A, true, t0);
        s.handle_path_health(B, true, t0);
        let mut t = t0 + ms(100);
        for _ in 0..4 {
            flap_a(&mut s, t);
            t += ms(100);
        }
        assert!(s.damping(A).unwrap().until.is_some());
        assert_eq!(s.active(), Some(B));
        // B fails while A waits out its damping: A is taken at once.
        assert_eq!(
            s.handle_path_health(B, false, t),
            Some(Change {
                from: Some(B),
                to: Some(A)
            })
        );
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn removing_the_only_eligible_path_takes_a_held_one_at_once() {
        let t0 = Instant::now();
        let mut s = ab(1000);
        s.handle_path_health(A, true, t0);
        s.handle_path_health(B, true, t0);
        assert_eq!(s.active(), Some(A));
        assert!(s.poll_timeout().is_some(), "B waits out its hold");
        assert_eq!(
            s.remove_path(A),
            Some(Change {
                from: Some(A),
                to: Some(B)
            })
        );
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn zero_hold_means_no_damping() {
        let t0 = Instant::now();
        let mut s = ab(0);
        s.handle_path_health(A, true, t0);
        s.handle_path_health(B, true, t0);
        for k in 0..10u64 {
            let t = t0 + ms(10 * k);
            s.handle_path_health(A, false, t);
            s.handle_path_health(A, true, t);
            assert_eq!(s.active(), Some(A));
        }
    }

    /// Three healthy, eligible paths under `policy`.
    fn three_up(policy: Policy, t0: Instant) -> Steering {
        let mut s = Steering::new(policy, Duration::ZERO, &[(A, 1, 1), (B, 2, 1), (C, 3, 1)]);
        for id in [A, B, C] {
            s.handle_path_health(id, true, t0);
        }
        s
    }

    #[test]
    fn a_degraded_active_path_gives_way_to_the_best_good_one() {
        let t0 = Instant::now();
        let mut s = three_up(Policy::ActiveBackup, t0);
        assert_eq!(s.active(), Some(A));
        let change = s.handle_path_quality(A, true, 0.05, t0);
        assert_eq!(
            change,
            Some(Change {
                from: Some(A),
                to: Some(B)
            })
        );
        assert!(s.is_degraded(A));
        // Good again: back to the best priority.
        let change = s.handle_path_quality(A, false, 0.0, t0 + Duration::from_secs(1));
        assert_eq!(
            change,
            Some(Change {
                from: Some(B),
                to: Some(A)
            })
        );
    }

    #[test]
    fn no_move_to_a_path_that_is_not_better_by_the_margin() {
        let t0 = Instant::now();
        let mut s = three_up(Policy::ActiveBackup, t0);
        // B and C lose 3 % and 4 % without being degraded; A is degraded at 5 %.
        s.handle_path_quality(B, false, 0.03, t0);
        s.handle_path_quality(C, false, 0.04, t0);
        assert_eq!(s.handle_path_quality(A, true, 0.05, t0), None);
        assert_eq!(s.active(), Some(A));
        // C clears up: it is better by the margin, so the traffic goes there.
        s.handle_path_quality(C, false, 0.0, t0);
        assert_eq!(
            s.handle_path_quality(A, true, 0.05, t0),
            None,
            "no new verdict"
        );
        assert_eq!(s.active(), Some(A), "a loss figure alone moves nothing");
        s.handle_path_quality(A, false, 0.05, t0);
        let change = s.handle_path_quality(A, true, 0.05, t0);
        assert_eq!(
            change,
            Some(Change {
                from: Some(A),
                to: Some(C)
            })
        );
    }

    #[test]
    fn when_every_path_is_degraded_nothing_moves() {
        let t0 = Instant::now();
        let mut s = three_up(Policy::ActiveBackup, t0);
        s.handle_path_quality(A, true, 0.05, t0);
        assert_eq!(s.active(), Some(B));
        s.handle_path_quality(C, true, 0.05, t0);
        // B degrades too: every path is as bad, B keeps the traffic.
        assert_eq!(s.handle_path_quality(B, true, 0.05, t0), None);
        assert_eq!(s.active(), Some(B));
        // A recovers: it takes the traffic back.
        let change = s.handle_path_quality(A, false, 0.0, t0);
        assert_eq!(
            change,
            Some(Change {
                from: Some(B),
                to: Some(A)
            })
        );
    }

    #[test]
    fn quality_moves_are_capped_per_minute_and_failures_are_not() {
        let t0 = Instant::now();
        let mut s = three_up(Policy::ActiveBackup, t0);
        s.set_max_moves(2);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(s.handle_path_quality(A, true, 0.05, at(0)).is_some());
        assert!(s.handle_path_quality(A, false, 0.0, at(10)).is_some());
        // The third quality move within a minute waits.
        assert_eq!(s.handle_path_quality(A, true, 0.05, at(20)), None);
        assert_eq!(s.active(), Some(A));
        assert_eq!(s.poll_timeout(), Some(at(60_000)));
        // A failure is not capped (and ranks with the verdicts applied so far).
        let change = s.handle_path_health(A, false, at(30));
        assert_eq!(
            change,
            Some(Change {
                from: Some(A),
                to: Some(B)
            })
        );
        s.handle_path_health(A, true, at(40));
        assert_eq!(s.active(), Some(A), "no hold: A is back");
        // Once the first move is a minute old, the waiting verdict applies.
        assert_eq!(s.handle_timeout(at(59_999)), None);
        let change = s.handle_timeout(at(60_000));
        assert_eq!(
            change,
            Some(Change {
                from: Some(A),
                to: Some(B)
            })
        );
    }

    #[test]
    fn balance_leaves_degraded_paths_out_and_duplicate_uses_them_last() {
        let t0 = Instant::now();
        let mut s = three_up(Policy::Balance, t0);
        s.handle_path_quality(B, true, 0.05, t0);
        let sel = s.selection();
        assert_eq!(sel.eligible, vec![(A, 1), (C, 1)]);
        for flow in 0..1000u64 {
            assert_ne!(sel.select(mix(flow)), Some(B));
        }
        let mut s = three_up(Policy::Duplicate, t0);
        s.handle_path_quality(A, true, 0.05, t0);
        let sel = s.selection();
        assert_eq!((sel.active, sel.duplicate_path()), (Some(B), Some(C)));
        s.handle_path_quality(C, true, 0.05, t0);
        let sel = s.selection();
        assert_eq!((sel.active, sel.duplicate_path()), (Some(B), Some(A)));
    }
}
