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
//! - `duplicate`: every packet goes to the two best eligible paths.

use crate::config::Policy;
use crate::wire::flow::mix;
use crate::PathId;
use std::time::{Duration, Instant};

/// One path as the steering sees it.
#[derive(Clone, Debug)]
struct Slot {
    id: PathId,
    priority: u32,
    weight: u32,
    healthy: bool,
    eligible_at: Option<Instant>,
    eligible: bool,
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
            })
            .collect();
        Steering {
            policy,
            revert_hold,
            slots,
            active: None,
        }
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
        let slot = self.slots.iter_mut().find(|s| s.id == id)?;
        if slot.healthy == healthy {
            return None;
        }
        slot.healthy = healthy;
        if !healthy {
            slot.eligible = false;
            slot.eligible_at = None;
        } else if !any_eligible || self.revert_hold.is_zero() {
            slot.eligible = true;
        } else {
            slot.eligible_at = Some(now + self.revert_hold);
        }
        self.recompute()
    }

    /// Promotes paths whose hold has expired.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Change> {
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
        self.slots.iter().filter_map(|s| s.eligible_at).min()
    }

    fn recompute(&mut self) -> Option<Change> {
        let best = self.ranked().first().copied();
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

    /// Eligible paths, best first (priority, then configuration order).
    fn ranked(&self) -> Vec<PathId> {
        let mut v: Vec<(u32, usize, PathId)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.eligible)
            .map(|(i, s)| (s.priority, i, s.id))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, _, id)| id).collect()
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
            .filter_map(|id| self.slots.iter().find(|s| s.id == *id))
            .map(|s| (s.id, s.weight))
            .collect();
        Selection {
            policy: self.policy,
            active: self.active,
            eligible,
        }
    }
}

/// A snapshot of one peer's steering, read by the forwarding threads.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub policy: Policy,
    pub active: Option<PathId>,
    /// Eligible paths with their weights, best first.
    pub eligible: Vec<(PathId, u32)>,
}

impl Selection {
    /// The path for a flow, or `None` when the peer has no usable path.
    pub fn select(&self, flow_hash: u64) -> Option<PathId> {
        match self.policy {
            Policy::Balance => self.rendezvous(flow_hash),
            Policy::ActiveBackup | Policy::Duplicate => self.active,
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
    fn rendezvous(&self, flow_hash: u64) -> Option<PathId> {
        let mut best: Option<(f64, PathId)> = None;
        for &(id, weight) in &self.eligible {
            let h = mix(flow_hash ^ (u64::from(id.0) << 48 | u64::from(id.0)));
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
        // A flap during the hold restarts it.
        assert_eq!(
            s.handle_path_health(A, false, t1 + Duration::from_millis(500)),
            None
        );
        assert_eq!(
            s.handle_path_health(A, true, t1 + Duration::from_millis(600)),
            None
        );
        assert_eq!(s.handle_timeout(t1 + Duration::from_millis(2100)), None);
        assert_eq!(
            s.handle_timeout(t1 + Duration::from_millis(2600)),
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
}
