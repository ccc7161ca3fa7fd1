//! Duplicate suppression for the `duplicate` policy, sans-IO.
//!
//! Under `duplicate` the sender puts every inner packet on the two best
//! paths, so each arrives twice when both paths work and once when one of
//! them has just failed: a path cut loses nothing, at the price of twice the
//! underlay bandwidth (every byte is carried by both paths) and twice the
//! packets per second on both gateways.
//!
//! To deliver each packet once, the sender numbers the peer's packets with a
//! *per-peer* sequence (the overlay header's per-path sequence cannot tell
//! that two datagrams on different paths are copies of each other), carried
//! in an overlay header extension together with a random *instance* number
//! chosen when the sender starts. The receiver keeps one [`Window`] per
//! peer, shared by the receive threads of all the peer's paths: a sliding
//! bitmap of the last [`WINDOW`] sequence numbers, in the manner of the
//! anti-replay window of RFC 4303 §3.4.3 (IPsec ESP). The first copy is
//! delivered, a second copy is a duplicate, and a number that fell behind
//! the window is too old to tell and is dropped as well (at 100 000
//! packets/s the window covers 40 ms of skew between the two paths).
//!
//! Sequence numbers are compared in serial-number arithmetic (RFC 1982), so
//! the window works across the wrap from `u64::MAX` to 0. A jump forward of
//! more than the window just empties it. A new instance number (the sender
//! restarted and counts from 1 again) resets the window.

/// How many sequence numbers behind the highest one are remembered.
pub const WINDOW: u64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;

/// What to do with a received copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// First copy: deliver it.
    Deliver,
    /// This sequence number was already delivered: drop it.
    Duplicate,
    /// Older than the window: cannot tell, drop it.
    TooOld,
}

/// One peer's receive window.
#[derive(Clone, Debug)]
pub struct Window {
    instance: Option<u32>,
    /// Highest sequence number delivered.
    top: u64,
    /// Bit `k` set: `top - k` was delivered.
    bits: [u64; WORDS],
    duplicates: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            instance: None,
            top: 0,
            bits: [0; WORDS],
            duplicates: 0,
        }
    }
}

impl Window {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks (and records) sequence number `seq` from sender `instance`.
    pub fn check(&mut self, instance: u32, seq: u64) -> Verdict {
        if self.instance != Some(instance) {
            *self = Window {
                instance: Some(instance),
                top: seq,
                duplicates: self.duplicates,
                ..Window::default()
            };
            self.set(0);
            return Verdict::Deliver;
        }
        // RFC 1982 serial-number comparison on 64 bits.
        let ahead = seq.wrapping_sub(self.top) as i64;
        if ahead > 0 {
            self.advance(ahead.unsigned_abs());
            self.top = seq;
            self.set(0);
            return Verdict::Deliver;
        }
        let behind = ahead.unsigned_abs();
        if behind >= WINDOW {
            return Verdict::TooOld;
        }
        if self.get(behind) {
            self.duplicates += 1;
            return Verdict::Duplicate;
        }
        self.set(behind);
        Verdict::Deliver
    }

    /// Duplicates seen so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    fn get(&self, k: u64) -> bool {
        let (w, b) = ((k / 64) as usize, k % 64);
        self.bits.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    fn set(&mut self, k: u64) {
        let (w, b) = ((k / 64) as usize, k % 64);
        if let Some(word) = self.bits.get_mut(w) {
            *word |= 1 << b;
        }
    }

    /// Shifts the bitmap by `n` positions (older numbers move to higher bits).
    fn advance(&mut self, n: u64) {
        if n >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let (words, bits) = ((n / 64) as usize, (n % 64) as u32);
        for i in (0..WORDS).rev() {
            let hi = i
                .checked_sub(words)
                .and_then(|j| self.bits.get(j))
                .copied()
                .unwrap_or(0);
            let lo = i
                .checked_sub(words + 1)
                .and_then(|j| self.bits.get(j))
                .copied()
                .unwrap_or(0);
            self.bits[i] = if bits == 0 {
                hi
            } else {
                (hi << bits) | (lo >> (64 - bits))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    const I: u32 = 7;

    #[test]
    fn in_order_is_delivered_once() {
        let mut w = Window::new();
        for s in 1..=10_000u64 {
            assert_eq!(w.check(I, s), Deliver, "{s}");
            assert_eq!(w.check(I, s), Duplicate, "{s}");
        }
        assert_eq!(w.duplicates(), 10_000);
    }

    #[test]
    fn reordered_copies_are_delivered_once() {
        let mut w = Window::new();
        // Path A delivers 1..=100 late and in reverse; path B in order, ahead.
        for s in 1..=100u64 {
            assert_eq!(w.check(I, s + 100), Deliver);
        }
        for s in (1..=200u64).rev() {
            let want = if s > 100 { Duplicate } else { Deliver };
            assert_eq!(w.check(I, s), want, "{s}");
        }
        for s in 1..=200u64 {
            assert_eq!(w.check(I, s), Duplicate, "{s}");
        }
    }

    #[test]
    fn interleaved_two_paths_with_skew() {
        let mut w = Window::new();
        let mut delivered = 0;
        // Copy on path B arrives 37 packets after the copy on path A.
        for t in 1..=5000u64 {
            if w.check(I, t) == Deliver {
                delivered += 1;
            }
            if t > 37 && w.check(I, t - 37) == Deliver {
                delivered += 1;
            }
        }
        assert_eq!(delivered, 5000);
        assert_eq!(w.duplicates(), 5000 - 37);
    }

    #[test]
    fn older_than_the_window_is_dropped() {
        let mut w = Window::new();
        assert_eq!(w.check(I, 10_000), Deliver);
        assert_eq!(w.check(I, 10_000 - WINDOW + 1), Deliver);
        assert_eq!(w.check(I, 10_000 - WINDOW), TooOld);
        assert_eq!(w.check(I, 1), TooOld);
    }

    #[test]
    fn huge_jump_empties_the_window() {
        let mut w = Window::new();
        for s in 1..=100u64 {
            w.check(I, s);
        }
        let far = 1u64 << 40;
        assert_eq!(w.check(I, far), Deliver);
        assert_eq!(w.check(I, far), Duplicate);
        // Numbers just below the new top were never seen.
        assert_eq!(w.check(I, far - 1), Deliver);
        assert_eq!(w.check(I, far - 100), Deliver);
        assert_eq!(w.check(I, 100), TooOld);
        // A jump of exactly the window keeps nothing either.
        assert_eq!(w.check(I, far + WINDOW), Deliver);
        assert_eq!(w.check(I, far), TooOld);
        assert_eq!(w.check(I, far + 1), Deliver);
    }

    #[test]
    fn shifts_across_word_boundaries() {
        for step in [1u64, 63, 64, 65, 127, 128, 1000, WINDOW - 1] {
            let mut w = Window::new();
            assert_eq!(w.check(I, 1), Deliver);
            assert_eq!(w.check(I, 1 + step), Deliver);
            assert_eq!(w.check(I, 1), Duplicate, "step {step}");
            assert_eq!(w.check(I, 1 + step), Duplicate, "step {step}");
            if step > 1 {
                assert_eq!(w.check(I, 2), Deliver, "step {step}");
            }
        }
    }

    #[test]
    fn wraparound() {
        let mut w = Window::new();
        let start = u64::MAX - 5;
        let seqs: Vec<u64> = (0..12u64).map(|k| start.wrapping_add(k)).collect();
        for &s in &seqs {
            assert_eq!(w.check(I, s), Deliver, "{s}");
        }
        for &s in &seqs {
            assert_eq!(w.check(I, s), Duplicate, "{s}");
        }
        // Across the wrap, u64::MAX is 6 behind 5 and still remembered.
        assert_eq!(w.check(I, u64::MAX), Duplicate);
        assert_eq!(w.check(I, 7), Deliver);
        assert_eq!(w.check(I, 6), Deliver);
    }

    #[test]
    fn new_instance_resets() {
        let mut w = Window::new();
        for s in 1..=5000u64 {
            w.check(I, s);
        }
        // The sender restarted and counts from 1 again.
        assert_eq!(w.check(I + 1, 1), Deliver);
        assert_eq!(w.check(I + 1, 2), Deliver);
        assert_eq!(w.check(I + 1, 1), Duplicate);
    }
}
