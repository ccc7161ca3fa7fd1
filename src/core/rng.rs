//! A tiny deterministic PRNG (SplitMix64), seeded by the caller. Not
//! cryptographic: it spreads BFD transmissions in time (RFC 5880 §6.8.7)
//! and drives the junk generator of the bad-input tests.
//!
//! Kept rather than `rand` or `fastrand`: the core takes no dependency
//! outside its short pure list (`tests/architecture.rs`), each BFD session
//! owns a seeded generator so that the simulated-network tests replay
//! exactly, and SplitMix64 is the finaliser the flow hash already uses:
//! twenty lines, where a crate would bring its own seeding and feature set.

use crate::core::wire::flow::mix;

/// SplitMix64: every output is the splitmix finaliser of a counter.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        let out = mix(self.state);
        self.state = self.state.wrapping_add(GOLDEN);
        out
    }

    /// A value in `lo..=hi` (`lo` when `hi <= lo`). The modulo bias is
    /// negligible for the ranges used (nanoseconds of an interval).
    pub fn in_range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(n) => lo + self.next_u64() % n,
            None => self.next_u64(),
        }
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// An index in `0..n` (0 when `n` is 0).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_range_and_is_deterministic() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..1000 {
            let v = a.in_range(75, 100);
            assert!((75..=100).contains(&v));
            assert_eq!(v, b.in_range(75, 100));
            assert!(a.below(7) < 7);
            b.below(7);
        }
        assert_eq!(a.in_range(5, 5), 5);
        assert_eq!(a.in_range(9, 3), 9);
        let _ = a.in_range(0, u64::MAX);
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn is_splitmix64() {
        // The reference SplitMix64 sequence for seed 0.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn fill_covers_partial_chunks() {
        let mut buf = [0u8; 13];
        Rng::new(7).fill(&mut buf);
        assert!(buf[8..].iter().any(|&b| b != 0));
    }
}
