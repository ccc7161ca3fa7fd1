//! A tiny deterministic PRNG for transmit jitter (SplitMix64). Not cryptographic: it
//! only spreads transmissions in time (RFC 5880 §6.8.7), seeded by the caller.

#[derive(Clone, Debug)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `lo..=hi` (`lo` when `hi <= lo`). The modulo bias is negligible for
    /// the ranges used here (nanoseconds of an interval).
    pub(crate) fn in_range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(n) => lo + self.next_u64() % n,
            None => self.next_u64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_range_and_is_deterministic() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..1000 {
            let v = a.in_range(75, 100);
            assert!((75..=100).contains(&v));
            assert_eq!(v, b.in_range(75, 100));
        }
        assert_eq!(a.in_range(5, 5), 5);
        assert_eq!(a.in_range(9, 3), 9);
        let _ = a.in_range(0, u64::MAX);
    }
}
