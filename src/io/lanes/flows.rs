//! The flows a lane has seen: the per-path `flows` counts, and the claims by
//! which a flow that moved to another lane is counted by that lane only.

use super::*;

/// Flows idle this long no longer count as active.
pub(super) const FLOW_IDLE: Duration = Duration::from_secs(30);

pub(super) const MAX_TRACKED_FLOWS: usize = 1 << 20;
/// Hasher for keys that are already well-mixed 64-bit hashes.
#[derive(Default)]
pub(super) struct PassThrough(u64);

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

/// Recently seen flows per path, for `flows` in status and metrics: a
/// lane's share (the flows it sent from its TUN queue in the last
/// `FLOW_IDLE`).
///
/// A flow that moves to another lane (it meets a gateway with another lane
/// count, see [`Lane`]) would be counted by both lanes until it went idle
/// on the one it left. So a lane that sees a flow for the first time tells
/// the peer's other lanes ([`FlowClaims`]), and at its next sweep a lane
/// forgets every flow another lane took after it did.
pub struct FlowTable {
    /// Flow hash -> (path, last seen, first seen by this lane).
    pub(super) flows: HashMap<u64, (PathId, Instant, Instant), BuildHasherDefault<PassThrough>>,
    pub(super) lane: usize,
    pub(super) claims: Arc<FlowClaims>,
    /// Claims taken from this lane's inbox at a sweep (kept for its room).
    pub(super) taken: Vec<(u64, Instant)>,
}

impl FlowTable {
    /// The table of lane `lane`, telling the other lanes through `claims`.
    pub fn new(lane: usize, claims: Arc<FlowClaims>) -> FlowTable {
        FlowTable {
            flows: HashMap::default(),
            lane,
            claims,
            taken: Vec::new(),
        }
    }

    pub(super) fn touch(&mut self, hash: u64, path: PathId, now: Instant) {
        let room = self.flows.len() < MAX_TRACKED_FLOWS;
        match self.flows.entry(hash) {
            Entry::Occupied(mut e) => {
                let (p, seen, _) = e.get_mut();
                *p = path;
                *seen = now;
            }
            Entry::Vacant(e) if room => {
                e.insert((path, now, now));
                self.claims.claim(self.lane, hash, now);
            }
            Entry::Vacant(_) => {}
        }
    }

    /// Forgets idle flows and flows other lanes took since, and adds this
    /// lane's change in active flows to each path's count (the lanes of a
    /// peer share the counters).
    pub(super) fn sweep(&mut self, now: Instant, paths: &mut [PathOut]) {
        self.claims.take(self.lane, &mut self.taken);
        for (hash, at) in self.taken.drain(..) {
            if self
                .flows
                .get(&hash)
                .is_some_and(|(_, _, since)| *since < at)
            {
                self.flows.remove(&hash);
            }
        }
        self.flows
            .retain(|_, (_, seen, _)| now.saturating_duration_since(*seen) < FLOW_IDLE);
        for p in paths.iter_mut() {
            let n = self
                .flows
                .values()
                .filter(|(path, _, _)| *path == p.id)
                .count() as u64;
            let before = std::mem::replace(&mut p.flows_counted, n);
            if n >= before {
                p.counters.flows.fetch_add(n - before, Ordering::Relaxed);
            } else {
                p.counters.flows.fetch_sub(before - n, Ordering::Relaxed);
            }
        }
    }
}

/// The flows each lane of a peer newly took, for the other lanes (see
/// [`FlowTable`]): one inbox per lane, filled by the others when they see
/// a flow for the first time (not per packet) and emptied at the lane's
/// sweep, once a second.
pub struct FlowClaims {
    pub(super) inboxes: Vec<Mutex<Vec<(u64, Instant)>>>,
}

impl FlowClaims {
    /// Inboxes for `lanes` lanes.
    pub fn new(lanes: usize) -> FlowClaims {
        FlowClaims {
            inboxes: (0..lanes).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Lane `lane` took flow `hash` at `at`. An inbox that is full (its
    /// lane is stopped) drops the claim: the flow is then counted twice
    /// until idle, which is all that is lost.
    fn claim(&self, lane: usize, hash: u64, at: Instant) {
        for (i, inbox) in self.inboxes.iter().enumerate() {
            if i != lane {
                let mut inbox = inbox.lock();
                if inbox.len() < MAX_TRACKED_FLOWS {
                    inbox.push((hash, at));
                }
            }
        }
    }

    /// Moves lane `lane`'s inbox into `into`.
    fn take(&self, lane: usize, into: &mut Vec<(u64, Instant)>) {
        if let Some(inbox) = self.inboxes.get(lane) {
            into.append(&mut inbox.lock());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_that_moves_lanes_is_counted_by_the_lane_it_moved_to() {
        let claims = Arc::new(FlowClaims::new(2));
        let mut lanes = [
            FlowTable::new(0, claims.clone()),
            FlowTable::new(1, claims.clone()),
        ];
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let (moving, staying, later) = (1u64, 2u64, 3u64);
        lanes[0].touch(moving, PathId(0), at(0));
        lanes[0].touch(staying, PathId(0), at(0));
        // The first flow moves to lane 1, after which lane 0 sweeps first.
        lanes[1].touch(moving, PathId(0), at(10));
        lanes[0].touch(moving, PathId(0), at(11));
        for lane in &mut lanes {
            lane.sweep(at(20), &mut []);
        }
        assert!(!lanes[0].flows.contains_key(&moving), "lane 0 lets it go");
        assert!(lanes[1].flows.contains_key(&moving), "lane 1 keeps it");
        assert!(lanes[0].flows.contains_key(&staying));
        // A flow that a lane took after another lane's claim is kept.
        lanes[0].touch(later, PathId(0), at(30));
        lanes[1].touch(later, PathId(0), at(40));
        lanes[1].sweep(at(50), &mut []);
        lanes[0].sweep(at(50), &mut []);
        let owners = lanes
            .iter()
            .filter(|l| l.flows.contains_key(&later))
            .count();
        assert_eq!(owners, 1);
        assert!(lanes[1].flows.contains_key(&later));
        // Nothing is claimed twice once the tables agree.
        for lane in &mut lanes {
            lane.sweep(at(60), &mut []);
        }
        let total: usize = lanes.iter().map(|l| l.flows.len()).sum();
        assert_eq!(total, 3);
    }
}
