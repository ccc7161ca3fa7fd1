//! What the daemon tells its operator: counters, Prometheus metrics, the
//! status document and the control socket.

pub mod control;
pub mod log;
pub mod metrics;
pub mod status;

use crate::core::drop::DropReason;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Per-path data counters, written by the forwarding threads (relaxed
/// atomics, one cache line per path) and read by status and metrics.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct PathCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub flows: AtomicU64,
    /// Last measured round-trip time in nanoseconds (0: none yet).
    pub rtt_ns: AtomicU64,
    /// The highest data sequence number received (for the far end's loss).
    pub rx_seq_high: AtomicU64,
    /// Receiving lanes in the middle of a turn, with datagrams taken but
    /// not yet counted.
    pub rx_busy: std::sync::atomic::AtomicU32,
    /// Data datagrams numbered by the sending lanes but not yet handed to
    /// the kernel (a lane frames a burst, then sends it).
    pub tx_unsent: AtomicU64,
}

impl PathCounters {
    pub fn count_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }
    /// Data datagrams numbered and not yet sent (0 if the count is off).
    pub fn unsent(&self) -> u64 {
        match self.tx_unsent.load(Relaxed) {
            n if n < 1 << 32 => n,
            _ => 0,
        }
    }
    /// The last round-trip time, if one was measured.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        match self.rtt_ns.load(Relaxed) {
            0 => None,
            ns => Some(std::time::Duration::from_nanos(ns)),
        }
    }
}

/// What a peer's receiving lanes did to put an `aggregate` sender's
/// packets back in order ([`crate::core::reorder`]), summed over the lanes.
#[derive(Debug, Default)]
pub struct ReorderCounters {
    /// Packets held behind a gap.
    pub held: AtomicU64,
    /// Held packets delivered in order once their gap filled.
    pub reordered: AtomicU64,
    /// Missing packets given up.
    pub gave_up: AtomicU64,
    /// Packets that came after their gap was given up (delivered late).
    pub late: AtomicU64,
    /// Packets held now, and their bytes.
    pub occupancy: AtomicU64,
    pub occupancy_bytes: AtomicU64,
    /// What forward error correction did for the peer, both ways.
    pub fec: FecCounters,
}

/// A peer's forward-error-correction counts ([`crate::core::fec`]), summed
/// over its lanes.
#[derive(Debug, Default)]
pub struct FecCounters {
    /// Parity packets sent.
    pub parity_sent: AtomicU64,
    /// Parity packets received and accepted.
    pub parity_received: AtomicU64,
    /// Data packets rebuilt from parity.
    pub recovered: AtomicU64,
    /// Missing data packets of blocks given up (not enough parity in time).
    pub unrecoverable: AtomicU64,
    /// Of those, packets that came later after all.
    pub late_after_give_up: AtomicU64,
    /// Parity dropped as inconsistent.
    pub bad_parity: AtomicU64,
}

/// Dropped packets by reason.
#[derive(Debug, Default)]
pub struct DropCounters([AtomicU64; DropReason::ALL.len()]);

impl DropCounters {
    pub fn count(&self, reason: DropReason) {
        if let Some(c) = self.0.get(reason.index()) {
            c.fetch_add(1, Relaxed);
        }
    }
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.get(reason.index()).map_or(0, |c| c.load(Relaxed))
    }
    /// Adds `n` (what the process this one replaced had counted).
    pub fn add(&self, reason: DropReason, n: u64) {
        if let Some(c) = self.0.get(reason.index()) {
            c.fetch_add(n, Relaxed);
        }
    }
}
