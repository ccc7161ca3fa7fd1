//! The forwarding threads: the lanes.
//!
//! A peer has one [`Lane`] per queue of its (multiqueue) TUN, which
//! carries both directions of its flows: the kernel puts a flow's packets
//! in the queue that last wrote packets of the same flow, and the far
//! gateway hands each datagram to the lane it names (see [`Lane`]). A lane
//! has two halves, each in a file of its own: `send.rs` and `recv.rs`;
//! `flows.rs` keeps the flows it has seen. The lanes run on a fixed set of
//! threads, the [`Workers`] (`worker.rs`): lane `k` of every peer on worker
//! `k`, so the threads do not grow with the number of peers.
//!
//! The sending half ([`TunOut`]) reads the lane's TUN queue, asks the
//! current forwarding snapshot where the flow goes ([`classify`]), writes
//! the overlay header in front ([`encapsulate`]) and sends the datagram on
//! the path's socket. On a TUN with offloads a read may be a super-packet,
//! classified once and cut into segments ([`crate::core::segment`]); in the
//! clear each segment goes out as two pieces, its headers (in a slot, behind
//! [`HEADROOM`] for the overlay header) and its payload where it was read,
//! so no payload byte is copied in user space. Sealing works in place, so a
//! sealed segment is copied into its slot first. The receiving half, one
//! [`PathIn`] per path, takes datagrams from the path's configured remote
//! only, parses each once and dispatches on what it is ([`receive_marked`]: data,
//! an echo, or why it is dropped) and writes the inner packets to the
//! lane's TUN queue; lane 0 also answers the peer's echo requests and,
//! once a second, sends its own to measure the path's round-trip time
//! ([`crate::core::forward::Echo`]).
//!
//! For a peer with a key, the lanes read the peer's [`Keys`] from a shared
//! [`ArcSwapOption`] on every turn (a reload swaps it without stopping
//! anything) and use the sealed messages ([`seal_data`], [`seal_echo`],
//! and [`receive_marked`] with an [`Opener`]). A path's sequence numbers (the nonces) come from one counter
//! that its lanes share, and its replay window is shared too (behind a
//! mutex held for the check and for the commit, not for the decryption).
//!
//! Under `duplicate` the lanes number the peer's packets (one counter per
//! peer, next to a random instance number) and the receiving halves share
//! one [`Window`] behind a mutex, held only for the bitmap check: the first
//! copy is written to the TUN, the second is dropped and counted as
//! `duplicate`.
//!
//! Under `aggregate` each sending lane numbers its own packets (its
//! instance number is the peer's plus the lane's) and asks its
//! [`Scheduler`] which path each packet, or each super-packet whole, takes;
//! each receiving lane keeps one [`Resequencer`] ([`LaneReorder`]) for the
//! streams that reach it, shared by its ends of the paths (a mutex taken
//! once per burst, never contended: one thread uses it), and writes what
//! it holds back when a gap fills or is given up.
//!
//! Both directions work in bursts to save system calls (the time goes to
//! the kernel's per-packet work, not to ours): a turn reads what the TUN
//! queue holds, up to `TX_SUPERS` super-packets (or `TX_BATCH` packets
//! on a plain TUN), and sends each path's datagrams with one `sendmmsg`, a
//! run of equal-sized ones as one UDP GSO message (`UDP_SEGMENT`: one pass
//! down the stack) where the kernel has it; and takes up to `RX_BATCH`
//! messages per `recvmmsg` from each path and writes what they hold to the
//! TUN together, merging one flow's segments across messages
//! ([`coalesce`]). Buffers are allocated once per lane. The sending half
//! vouches, in the overlay header, for the checksums it computed (cutting)
//! or its kernel computed or verified; the receiving half merges a segment
//! nobody vouched for only once it has checked it, because the kernel
//! computes a merged packet's checksum afresh.
//!
//! A send that fails because the underlay cannot reach the far end is
//! reported to the BFD thread (at most once per path every
//! [`SEND_ERROR_REPORT_INTERVAL`]), which marks the path suspect.

use super::control_plane::{Command, CommandLink};
use super::{clock, sys, udp};
use crate::config::Policy;
use crate::core::aggregate::{Pick, Scheduler};
use crate::core::coalesce::{self, Train, MAX_TRAIN_HEADER};
use crate::core::crypto::{EchoGuard, Keys, ReplayWindow};
use crate::core::dedup::{Verdict, Window};
use crate::core::drop::DropReason;
use crate::core::ecn::outer_tos;
use crate::core::engine::Forwarding;
use crate::core::fec::{Code, Decoder, Encoder, FecStats, Rebuilt, DEFAULT_HOLD};
use crate::core::forward::{
    classify, emit_echo, emit_parity, emit_probe, emit_probe_reply, encapsulate, receive_marked,
    seal_data, seal_echo, Echo, Message, Opener, Placement, Sealer, HEADROOM, TRAILER,
};
use crate::core::quality::{DataCounts, Prober, Reflector};
use crate::core::reorder::{Held, Offer, ReorderStats, Resequencer};
use crate::core::segment::{finish_checksum, Cut, VnetHeader, MAX_HEADERS, VNET_HDR_LEN};
use crate::core::wire::overlay::{FecParity, Header, PeerSeq, ProbeClass, ProbeReport, MAX_LANES};
use crate::telemetry::{DropCounters, PathCounters, ReorderCounters};
use crate::{PathId, PeerId};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info};
// A TUN queue (the lanes keep the name tun-rs gave the type).
use super::tun::Queue as SyncDevice;

mod flows;
mod pace;
mod recv;
mod send;
mod worker;

pub use flows::{FlowClaims, FlowTable};
pub use pace::Paced;
pub use recv::{PathIn, HANDSHAKE_RATE};
pub use send::{PathOut, TunOut, SEND_ERROR_REPORT_INTERVAL};
pub use worker::{Serving, Stopping, Workers};

/// Largest datagram handled (inner packet plus overlay header).
pub const BUF_LEN: usize = 65_535 + HEADROOM + TRAILER;

/// A peer's keys as the forwarding threads share them; `None`: cleartext.
pub type SharedKeys = Arc<ArcSwapOption<Keys>>;
/// A busy lane looks at its idle sources (with a `poll` that does not
/// wait) once per this many rounds, and otherwise reads only those that
/// gave something in the last round.
const POLL_EVERY: u32 = 4;
/// How often idle flows are expired and per-path flow counts published.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A forwarding lane of a peer: it reads its queue of the peer's TUN and
/// sends on the paths ([`TunOut`]), and receives on its socket of every
/// path and writes to the same queue ([`PathIn`]).
///
/// Both directions of a flow stay with one lane: the TUN puts a flow's
/// packets in the queue that last wrote the flow's packets (the kernel's
/// automatic steering, by a hash that is the same both ways), and every
/// datagram names its sender's lane, by which the far gateway's sockets
/// hand it to the lane of the same number ([`crate::io::udp::data_sockets`]).
/// So a TCP acknowledgement that writing a burst to the TUN produces is
/// waiting in the lane's queue when the write returns, and goes out without
/// waking another thread (a lane runs on one worker). A flow that first
/// meets a gateway with another lane count moves once, to the lane its
/// datagrams come back on, and stays.
///
/// While there is traffic its worker reads again, without a wait, the
/// sources (its TUN queue, its sockets) that gave something in the last
/// round, and looks at the others with a wait that does not wait every
/// `POLL_EVERY` rounds; once a round finds nothing anywhere it sleeps in
/// `epoll` until a source, a timer or an order wakes it.
pub struct Lane {
    pub out: TunOut,
    /// This lane's end of each path it reads (a path with one socket is
    /// read by lane 0 only). A short list, not a table by path id: a table
    /// by id would grow with every peer's paths in every lane.
    pub ins: Vec<PathIn>,
    /// The lane's resequencer, shared by its ends of the paths.
    pub reorder: Arc<Mutex<LaneReorder>>,
}

/// A receiving lane's [`Resequencer`], and what of its counts the peer's
/// [`ReorderCounters`] have.
pub struct LaneReorder {
    pub r: Resequencer,
    /// The lane's FEC decoder (the parity of a sending lane comes to the
    /// receiving lane of the same number, as its data do).
    pub fec: Decoder,
    counters: Arc<ReorderCounters>,
    published: ReorderStats,
    fec_published: FecStats,
    occupancy: (usize, usize),
}

impl LaneReorder {
    pub fn new(counters: Arc<ReorderCounters>) -> LaneReorder {
        LaneReorder {
            r: Resequencer::new(crate::core::aggregate::MIN_WAIT),
            fec: Decoder::new(crate::core::fec::DEFAULT_WAIT),
            counters,
            published: ReorderStats::default(),
            fec_published: FecStats::default(),
            occupancy: (0, 0),
        }
    }

    /// Adds what changed since the last call to the peer's counters.
    fn publish(&mut self) {
        let fec = self.fec.stats();
        if fec != self.fec_published {
            let (c, was) = (&self.counters.fec, self.fec_published);
            c.parity_received
                .fetch_add(fec.parity.saturating_sub(was.parity), Ordering::Relaxed);
            c.recovered.fetch_add(
                fec.recovered.saturating_sub(was.recovered),
                Ordering::Relaxed,
            );
            c.unrecoverable.fetch_add(
                fec.unrecoverable.saturating_sub(was.unrecoverable),
                Ordering::Relaxed,
            );
            c.late_after_give_up.fetch_add(
                fec.late_after_give_up
                    .saturating_sub(was.late_after_give_up),
                Ordering::Relaxed,
            );
            c.bad_parity.fetch_add(
                fec.bad_parity.saturating_sub(was.bad_parity),
                Ordering::Relaxed,
            );
            self.fec_published = fec;
        }
        let now = self.r.stats();
        if now != self.published {
            let c = &self.counters;
            let was = self.published;
            c.held.fetch_add(now.held - was.held, Ordering::Relaxed);
            c.reordered
                .fetch_add(now.reordered - was.reordered, Ordering::Relaxed);
            c.gave_up
                .fetch_add(now.gave_up - was.gave_up, Ordering::Relaxed);
            c.late.fetch_add(now.late - was.late, Ordering::Relaxed);
            self.published = now;
        }
        let occ = (self.r.occupancy(), self.r.occupancy_bytes());
        if occ != self.occupancy {
            let c = &self.counters;
            c.occupancy.fetch_add(occ.0 as u64, Ordering::Relaxed);
            c.occupancy
                .fetch_sub(self.occupancy.0 as u64, Ordering::Relaxed);
            c.occupancy_bytes.fetch_add(occ.1 as u64, Ordering::Relaxed);
            c.occupancy_bytes
                .fetch_sub(self.occupancy.1 as u64, Ordering::Relaxed);
            self.occupancy = occ;
        }
    }
}

impl Drop for LaneReorder {
    fn drop(&mut self) {
        let c = &self.counters;
        c.occupancy
            .fetch_sub(self.occupancy.0 as u64, Ordering::Relaxed);
        c.occupancy_bytes
            .fetch_sub(self.occupancy.1 as u64, Ordering::Relaxed);
    }
}

/// Forwarding lanes per peer: `CROSSLINK_LANES` (1 to
/// [`crate::core::wire::overlay::MAX_LANES`]) if set, else one per CPU, at most
/// [`DEFAULT_MAX_LANES`].
pub fn lanes_wanted() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    lanes_from(std::env::var("CROSSLINK_LANES").ok().as_deref(), cpus)
}

/// Lanes a peer gets by default on a machine with many CPUs.
pub const DEFAULT_MAX_LANES: usize = 4;

fn lanes_from(var: Option<&str>, cpus: usize) -> usize {
    match var.and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(n) => n.clamp(1, MAX_LANES),
        None => cpus.clamp(1, DEFAULT_MAX_LANES),
    }
}

/// An emptied vector of borrowed slices, with its allocation, made free
/// of the borrow (collecting from an empty iterator of the same layout
/// reuses the allocation).
fn recycle(mut v: Vec<&[u8]>) -> Vec<&'static [u8]> {
    v.clear();
    v.into_iter().map(|_| -> &'static [u8] { &[] }).collect()
}

/// [`recycle`] for the pieces of a `writev`.
fn recycle_iov(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'static>> {
    v.clear();
    v.into_iter().map(|_| IoSlice::new(&[])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_follow_the_cpus_or_the_variable() {
        assert_eq!(lanes_from(None, 1), 1);
        assert_eq!(lanes_from(None, 2), 2);
        assert_eq!(lanes_from(None, 64), DEFAULT_MAX_LANES);
        assert_eq!(lanes_from(Some("3"), 2), 3);
        assert_eq!(lanes_from(Some("0"), 2), 1);
        assert_eq!(lanes_from(Some("99"), 2), MAX_LANES);
        assert_eq!(lanes_from(Some("many"), 2), 2);
    }

    #[test]
    fn recycled_vectors_keep_their_room() {
        let data = vec![1u8; 10];
        let mut v: Vec<&[u8]> = Vec::with_capacity(100);
        v.push(&data);
        let kept = recycle(v);
        assert!(kept.is_empty());
        assert!(kept.capacity() >= 100);
        let mut iov = Vec::with_capacity(100);
        iov.push(IoSlice::new(&data));
        let at = iov.as_ptr() as usize;
        let kept = recycle_iov(iov);
        assert!(kept.is_empty());
        assert!(kept.capacity() >= 100);
        assert_eq!(kept.as_ptr() as usize, at, "the allocation is reused");
    }
}
