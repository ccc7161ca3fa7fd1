//! Deadlines of many timers, without a scan of every timer.
//!
//! A timer wheel: 256 slots of 262 µs (2^18 ns) cover the next 67 ms, which
//! holds what a BFD thread schedules all the time (transmissions every few
//! ms, detection times of tens of ms); a deadline further out goes to a
//! binary heap beside it (slow sessions, hold-downs), which stays small.
//! Scheduling into the wheel is a push onto its slot's list, and taking
//! what is due a pop from it: a slot before now's is due whole, now's is
//! scanned (at 1000 sessions at 10 ms a slot holds about 30 entries). What
//! falls due together comes out in no set order: the engine handles it
//! together. The binary heap this replaced paid a sift over thousands of
//! entries for each of the 100 000 pops a second (6 % of the BFD thread;
//! 489 against 327 ns of the core's work per control packet sent,
//! `cargo bench --bench bfd_core`).
//!
//! Lazy deletion: each key (a small integer, e.g. a path slot) remembers
//! the one entry that counts for it, the earliest it was given since it
//! last fired. Moving a deadline later pushes nothing: the old, earlier
//! entry fires, the owner finds nothing due and schedules the real
//! deadline. Moving it earlier pushes a new entry; the older one is skipped
//! when it surfaces.
//!
//! Kept here rather than taken from a crate: the core takes no dependency
//! outside its short pure list (`tests/architecture.rs`), time is an
//! argument (the wheel counts from the first deadline it is given, it
//! reads no clock), and the lazy deletion above is what the engine's
//! deadlines need; the timer-wheel crates own their timers' payloads and
//! cancel by handle instead.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// log2 of a slot's width in nanoseconds (262 µs).
const SLOT_SHIFT: u32 = 18;
const SLOTS: usize = 256;
const WORDS: usize = SLOTS / 64;
/// The tick of the first deadline given: ticks before it count down from
/// here (2^40 ticks are 9 years).
const ORIGIN_TICK: u64 = 1 << 40;

#[derive(Debug, Default)]
pub struct Deadlines {
    /// [`ORIGIN_TICK`] starts here (the first deadline given).
    origin: Option<Instant>,
    /// No wheel entry is in a tick before this one; every wheel entry's
    /// tick is below `cursor + SLOTS` (its slot is `tick % SLOTS`). An entry
    /// given for an earlier tick is put in the cursor's. The cursor follows
    /// the time [`Deadlines::pop_due`] is given, never ahead of it (so only
    /// what is already due is ever put in an earlier tick's slot), and
    /// stops at the first slot that holds entries; until the first call,
    /// everything goes to `far`.
    cursor: u64,
    slots: Vec<Vec<(Instant, usize)>>,
    /// Slots that hold entries.
    occupied: [u64; WORDS],
    in_wheel: usize,
    /// Entries beyond the wheel's reach when given.
    far: BinaryHeap<Reverse<(Instant, usize)>>,
    /// By key: the deadline of its live entry.
    scheduled: Vec<Option<Instant>>,
}

fn set(bits: &mut [u64; WORDS], slot: usize, on: bool) {
    match on {
        true => bits[slot / 64] |= 1 << (slot % 64),
        false => bits[slot / 64] &= !(1 << (slot % 64)),
    }
}

/// The wheel's slot of a tick.
fn slot_of(tick: u64) -> usize {
    (tick % SLOTS as u64) as usize
}

/// Where an entry is.
#[derive(Clone, Copy)]
enum Source {
    /// In the wheel's slot at this tick, at this index.
    Wheel(u64, usize),
    Far,
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
            self.insert(at, key);
        }
    }

    /// The tick `at` falls in: [`ORIGIN_TICK`] and on from the first
    /// deadline given, down to 0 before it.
    fn tick(&self, at: Instant) -> u64 {
        let Some(origin) = self.origin else {
            return ORIGIN_TICK;
        };
        let ns =
            |d: Duration| d.as_secs().saturating_mul(1_000_000_000) + u64::from(d.subsec_nanos());
        match at.checked_duration_since(origin) {
            Some(d) => ORIGIN_TICK.saturating_add(ns(d) >> SLOT_SHIFT),
            None => ORIGIN_TICK.saturating_sub(ns(origin - at).div_ceil(1 << SLOT_SHIFT)),
        }
    }

    fn insert(&mut self, at: Instant, key: usize) {
        self.origin.get_or_insert(at);
        let tick = self.tick(at).max(self.cursor);
        if tick - self.cursor >= SLOTS as u64 {
            self.far.push(Reverse((at, key)));
            return;
        }
        if self.slots.is_empty() {
            self.slots.resize_with(SLOTS, Vec::new);
        }
        let slot = slot_of(tick);
        self.slots[slot].push((at, key));
        set(&mut self.occupied, slot, true);
        self.in_wheel += 1;
    }

    /// The tick of the first slot at or after the cursor that holds entries.
    fn first_occupied(&self) -> Option<u64> {
        if self.in_wheel == 0 {
            return None;
        }
        let start = slot_of(self.cursor);
        let (word, shift) = (start / 64, start % 64);
        // The start's word from the start on, the other words in turn,
        // then the start's word before the start.
        let masked = |k: usize| -> (usize, u64) {
            let w = (word + k) % WORDS;
            let bits = self.occupied[w];
            match k {
                0 => (w, bits & (!0u64 << shift)),
                k if k == WORDS => (w, bits & !(!0u64 << shift)),
                _ => (w, bits),
            }
        };
        (0..=WORDS).find_map(|k| {
            let (w, bits) = masked(k);
            (bits != 0).then(|| {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                self.cursor + ((slot + SLOTS - start) % SLOTS) as u64
            })
        })
    }

    fn slot(&self, tick: u64) -> &Vec<(Instant, usize)> {
        &self.slots[slot_of(tick)]
    }

    /// The earliest entry, live or stale, and where it is. Every entry of
    /// the first occupied slot is earlier than any of a later slot (one
    /// given for a tick before the cursor's is in the cursor's slot).
    fn earliest(&self) -> Option<((Instant, usize), Source)> {
        let wheel = self.first_occupied().and_then(|tick| {
            let list = self.slot(tick);
            let (i, e) = list.iter().enumerate().min_by_key(|(_, e)| **e)?;
            Some((*e, Source::Wheel(tick, i)))
        });
        let far = self.far.peek().map(|r| (r.0, Source::Far));
        match (wheel, far) {
            (Some(w), Some(f)) if f.0 < w.0 => Some(f),
            (Some(w), _) => Some(w),
            (None, f) => f,
        }
    }

    /// Takes an entry out.
    fn remove(&mut self, source: Source) -> Option<(Instant, usize)> {
        match source {
            Source::Far => self.far.pop().map(|r| r.0),
            Source::Wheel(tick, i) => {
                let slot = slot_of(tick);
                let list = &mut self.slots[slot];
                let e = (i < list.len()).then(|| list.swap_remove(i))?;
                self.in_wheel -= 1;
                if list.is_empty() {
                    set(&mut self.occupied, slot, false);
                }
                Some(e)
            }
        }
    }

    fn is_live(&self, (at, key): (Instant, usize)) -> bool {
        self.scheduled.get(key).copied().flatten() == Some(at)
    }

    /// A key whose entry is due at `now`, which is cleared: the caller
    /// handles the key and schedules its next deadline. Called until it
    /// gives `None`, it gives every key due at `now` once, in no set order
    /// (the engine handles them together).
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        // Nothing given yet: no origin to count now's tick from.
        self.origin?;
        let tnow = self.tick(now);
        loop {
            let source = match self.far.peek() {
                Some(r) if r.0 .0 <= now => Source::Far,
                _ => {
                    let Some(tick) = self.first_occupied() else {
                        self.cursor = self.cursor.max(tnow);
                        return None;
                    };
                    self.cursor = tick.min(tnow).max(self.cursor);
                    let list = self.slot(tick);
                    // A slot before now's holds nothing later than now.
                    let i = match tick < tnow {
                        true => list.len().checked_sub(1),
                        false => list.iter().rposition(|e| e.0 <= now),
                    }?;
                    Source::Wheel(tick, i)
                }
            };
            let entry = self.remove(source)?;
            if self.is_live(entry) {
                self.scheduled[entry.1] = None;
                return Some(entry.1);
            }
        }
    }

    /// The earliest entry: no key is due before it (it may fire early, see
    /// [`Deadlines::settle`]).
    pub fn next(&self) -> Option<Instant> {
        self.earliest().map(|((at, _), _)| at)
    }

    /// Drops stale entries from the front and moves an entry whose key's
    /// real deadline (`due`) is later, so that [`Deadlines::next`] is exact.
    pub fn settle(&mut self, mut due: impl FnMut(usize) -> Option<Instant>) {
        while let Some((entry, source)) = self.earliest() {
            if !self.is_live(entry) {
                self.remove(source);
                continue;
            }
            let (at, key) = entry;
            match due(key) {
                Some(real) if real <= at => return,
                real => {
                    self.remove(source);
                    self.scheduled[key] = None;
                    self.schedule(key, real);
                }
            }
        }
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.in_wheel + self.far.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rng::Rng;
    use std::time::Duration;

    /// The binary heap with lazy deletion that the wheel replaced: the
    /// reference for what comes out, and in what order.
    #[derive(Default)]
    struct Reference {
        heap: BinaryHeap<Reverse<(Instant, usize)>>,
        scheduled: Vec<Option<Instant>>,
    }

    impl Reference {
        fn schedule(&mut self, key: usize, at: Option<Instant>) {
            let Some(at) = at else { return };
            if self.scheduled.len() <= key {
                self.scheduled.resize(key + 1, None);
            }
            if self.scheduled[key].is_none_or(|s| at < s) {
                self.scheduled[key] = Some(at);
                self.heap.push(Reverse((at, key)));
            }
        }

        fn live(&self, at: Instant, key: usize) -> bool {
            self.scheduled.get(key).copied().flatten() == Some(at)
        }

        fn pop_due(&mut self, now: Instant) -> Option<usize> {
            while let Some(&Reverse((at, key))) = self.heap.peek() {
                if at > now {
                    return None;
                }
                self.heap.pop();
                if self.live(at, key) {
                    self.scheduled[key] = None;
                    return Some(key);
                }
            }
            None
        }

        fn settle(&mut self, mut due: impl FnMut(usize) -> Option<Instant>) {
            while let Some(&Reverse((at, key))) = self.heap.peek() {
                if !self.live(at, key) {
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

        fn next(&self) -> Option<Instant> {
            self.heap.peek().map(|r| r.0 .0)
        }
    }

    /// Random schedules, moves earlier and later, deadlines in the past,
    /// within a slot, across the wheel's turn and far beyond it, with time
    /// going on in steps small and large: at each time the same keys come
    /// out as from the heap, each once, and `next` agrees at every step.
    #[test]
    fn the_wheel_fires_what_the_heap_fired() {
        let t0 = Instant::now();
        for seed in 0..40 {
            let mut rng = Rng::new(seed);
            let (mut wheel, mut heap) = (Deadlines::new(), Reference::default());
            let mut now = t0 + Duration::from_micros(rng.below(1_000_000));
            // The real deadline of each key, as `settle` asks it.
            let mut real: Vec<Option<Instant>> = vec![None; 64];
            let mut fired = 0;
            for _ in 0..3000 {
                for _ in 0..rng.in_range(0, 6) {
                    let key = rng.index(real.len());
                    let us = match rng.below(10) {
                        0 => None,
                        1 => Some(-(rng.below(5000) as i64)),
                        2..=6 => Some(rng.below(12_000) as i64),
                        7 | 8 => Some(rng.below(80_000) as i64),
                        _ => Some(rng.below(3_000_000) as i64),
                    };
                    let at = us.map(|us| match us < 0 {
                        true => now - Duration::from_micros(us.unsigned_abs()),
                        false => now + Duration::from_micros(us as u64),
                    });
                    real[key] = at;
                    wheel.schedule(key, at);
                    heap.schedule(key, at);
                }
                assert_eq!(wheel.next(), heap.next(), "seed {seed}");
                now += Duration::from_micros(match rng.below(20) {
                    0 => rng.below(200_000),
                    _ => rng.below(1500),
                });
                let (mut w, mut h) = (Vec::new(), Vec::new());
                while let Some(key) = wheel.pop_due(now) {
                    w.push(key);
                }
                while let Some(key) = heap.pop_due(now) {
                    h.push(key);
                }
                // Each key once; the order within a call is free.
                let n = w.len();
                w.sort_unstable();
                w.dedup();
                assert_eq!(w.len(), n, "seed {seed}: a key twice");
                h.sort_unstable();
                assert_eq!(w, h, "seed {seed}");
                for key in w {
                    fired += 1;
                    real[key] = None;
                }
                if rng.below(3) == 0 {
                    wheel.settle(|k| real[k]);
                    heap.settle(|k| real[k]);
                }
                assert_eq!(wheel.next(), heap.next(), "seed {seed}");
                assert_eq!(wheel.len(), heap.heap.len(), "seed {seed}");
            }
            assert!(fired > 1000, "seed {seed}: only {fired} fired");
        }
    }

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
