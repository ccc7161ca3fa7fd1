//! Deadlines of many timers, earliest first, without a scan of every timer.
//!
//! A binary heap of `(deadline, key)` with lazy deletion: each key (a small
//! integer, e.g. a path slot) remembers the one entry that counts for it,
//! the earliest it was given since it last fired. Moving a deadline later
//! pushes nothing: the old, earlier entry fires, the owner finds nothing due
//! and schedules the real deadline. Moving it earlier pushes a new entry;
//! the older one is skipped when it surfaces. The heap holds at most a few
//! entries per key, and every operation is O(log n) in their number.
//!
//! Time is an argument, as everywhere in the core.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
    /// By key: the deadline of its live entry.
    scheduled: Vec<Option<Instant>>,
}

impl Deadlines {
    pub fn new() -> Deadlines {
        Deadlines::default()
    }

    /// Makes sure `key` fires no later than `at` (nothing when `at` is `None`).
    pub fn schedule(&mut self, key: usize, at: Option<Instant>) {
        let Some(at) = at else {
            return;
        };
        if self.scheduled.len() <= key {
            self.scheduled.resize(key + 1, None);
        }
        if self.scheduled[key].is_none_or(|s| at < s) {
            self.scheduled[key] = Some(at);
            self.heap.push(Reverse((at, key)));
        }
    }

    /// The next key whose entry is due at `now`, which is cleared: the
    /// caller handles the key and schedules its next deadline.
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        while let Some(&Reverse((at, key))) = self.heap.peek() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if self.scheduled.get(key).copied().flatten() == Some(at) {
                self.scheduled[key] = None;
                return Some(key);
            }
        }
        None
    }

    /// The earliest live entry: no key is due before it (it may fire early,
    /// see [`Deadlines::settle`]).
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|r| r.0 .0)
    }

    /// Drops stale entries from the top and moves an entry whose key's real
    /// deadline (`due`) is later, so that [`Deadlines::next`] is exact.
    pub fn settle(&mut self, mut due: impl FnMut(usize) -> Option<Instant>) {
        while let Some(&Reverse((at, key))) = self.heap.peek() {
            if self.scheduled.get(key).copied().flatten() != Some(at) {
                self.heap.pop();
                continue;
            }
            match due(key) {
                Some(real) if real <= at => return,
                real => {
                    self.heap.pop();
                    self.scheduled[key] = None;
                    self.schedule(key, real);
                }
            }
        }
    }

    /// Entries in the heap, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_order_and_skips_superseded_entries() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Deadlines::new();
        d.schedule(3, Some(ms(30)));
        d.schedule(1, Some(ms(10)));
        d.schedule(2, Some(ms(20)));
        // Later: ignored (the earlier entry counts); earlier: replaces.
        d.schedule(1, Some(ms(40)));
        d.schedule(3, Some(ms(5)));
        d.schedule(4, None);
        assert_eq!(d.next(), Some(ms(5)));
        assert_eq!(d.pop_due(ms(4)), None);
        let mut fired = Vec::new();
        while let Some(k) = d.pop_due(ms(100)) {
            fired.push(k);
        }
        // Key 3's entry at 30 ms was superseded by the one at 5 ms.
        assert_eq!(fired, [3, 1, 2]);
        assert!(d.is_empty());
    }

    #[test]
    fn settle_makes_next_exact() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Deadlines::new();
        d.schedule(0, Some(ms(10)));
        d.schedule(1, Some(ms(20)));
        // Key 0 really fires at 50 now, key 1 at 20.
        d.settle(|k| Some(if k == 0 { ms(50) } else { ms(20) }));
        assert_eq!(d.next(), Some(ms(20)));
        assert_eq!(d.pop_due(ms(20)), Some(1));
        assert_eq!(d.pop_due(ms(49)), None);
        assert_eq!(d.pop_due(ms(50)), Some(0));
        // A key with nothing left is dropped.
        d.schedule(2, Some(ms(60)));
        d.settle(|_| None);
        assert_eq!(d.next(), None);
    }
}
