//! The forwarding threads: the lanes.
//!
//! A peer has one [`Lane`] per queue of its (multiqueue) TUN, each a
//! thread `fwd<n>-<peer>` that carries both directions of its flows: the
//! kernel puts a flow's packets in the queue that last wrote packets of
//! the same flow, and the far gateway hands each datagram to the lane it
//! names (see [`Lane`]). A lane has two halves.
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
//! only, validates them ([`decapsulate`]) and writes the inner packet to
//! the lane's TUN queue; lane 0 also answers the peer's echo requests and,
//! once a second, sends its own to measure the path's round-trip time
//! ([`crate::core::forward::Echo`]).
//!
//! For a peer with a key, the lanes read the peer's [`Keys`] from a shared
//! [`ArcSwapOption`] on every turn (a reload swaps it without stopping
//! anything) and use the sealed messages ([`seal_data`], [`seal_echo`],
//! [`open`]). A path's sequence numbers (the nonces) come from one counter
//! that its lanes share, and its replay window is shared too (behind a
//! mutex held for the check and for the commit, not for the decryption).
//!
//! Under `duplicate` the lanes number the peer's packets (one counter per
//! peer, next to a random instance number) and the receiving halves share
//! one [`Window`] behind a mutex, held only for the bitmap check: the first
//! copy is written to the TUN, the second is dropped and counted as
//! `duplicate`.
//!
//! Both directions work in bursts to save system calls (the time goes to
//! the kernel's per-packet work, not to ours): a turn reads what the TUN
//! queue holds, up to [`TX_SUPERS`] super-packets (or [`TX_BATCH`] packets
//! on a plain TUN), and sends each path's datagrams with one `sendmmsg`, a
//! run of equal-sized ones as one UDP GSO message (`UDP_SEGMENT`: one pass
//! down the stack) where the kernel has it; and takes up to [`RX_BATCH`]
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
use super::sys::{Doorbell, PollSet};
use super::{clock, sys, udp};
use crate::config::Policy;
use crate::core::coalesce::{self, Train, MAX_TRAIN_HEADER};
use crate::core::crypto::{EchoGuard, Keys, ReplayWindow};
use crate::core::dedup::{Verdict, Window};
use crate::core::drop::DropReason;
use crate::core::engine::Forwarding;
use crate::core::forward::{
    classify, decapsulate, echo_rtt, emit_echo, encapsulate, open, parse_echo, seal_data,
    seal_echo, Echo, Opened, Placement, Sealer, HEADROOM, TRAILER,
};
use crate::core::segment::{finish_checksum, Cut, VnetHeader, MAX_HEADERS, VNET_HDR_LEN};
use crate::core::wire::overlay::{Header, PeerSeq, MAX_LANES};
use crate::telemetry::{DropCounters, PathCounters};
use crate::{PathId, PeerId};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info};
use tun_rs::SyncDevice;

/// Largest datagram handled (inner packet plus overlay header).
pub const BUF_LEN: usize = 65_535 + HEADROOM + TRAILER;

/// A peer's keys as the forwarding threads share them; `None`: cleartext.
pub type SharedKeys = Arc<ArcSwapOption<Keys>>;
/// Flows idle this long no longer count as active.
const FLOW_IDLE: Duration = Duration::from_secs(30);
const MAX_TRACKED_FLOWS: usize = 1 << 20;
/// Send errors on one path are reported to the BFD thread at most this often.
pub const SEND_ERROR_REPORT_INTERVAL: Duration = Duration::from_millis(5);
/// Packets a sending thread reads from a plain TUN and sends per turn.
const TX_BATCH: usize = 16;
/// Slots of a sending thread on a TUN with offloads (a burst of
/// super-packets cut at a small MSS can make more; see
/// [`TunOut::cut_and_stage`]).
const TX_SEGMENTS: usize = 256;
/// A busy lane looks at its idle sources (with a `poll` that does not
/// wait) once per this many rounds, and otherwise reads only those that
/// gave something in the last round.
const POLL_EVERY: u32 = 4;
/// Datagrams a receiving thread takes per system call (each buffer holds
/// the largest datagram, [`BUF_LEN`]).
const RX_BATCH: usize = 16;
/// How often idle flows are expired and per-path flow counts published.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often each path measures its round-trip time.
const ECHO_INTERVAL: Duration = Duration::from_secs(1);
/// Replies older than this are ignored.
const ECHO_MAX_AGE: Duration = Duration::from_secs(10);

/// A path as a lane's sending half sees it.
pub struct PathOut {
    pub id: PathId,
    /// The lane's socket of the path (any of them may send).
    pub socket: Arc<UdpSocket>,
    pub remote: SocketAddr,
    pub counters: Arc<PathCounters>,
    /// The path's last sequence number, shared by the peer's lanes (the
    /// nonce of a sealed datagram: never twice).
    pub sequence: Arc<AtomicU64>,
    pub last_error_report: Option<Instant>,
    /// [`crate::core::crypto::path_salt`] of (local, remote).
    pub salt: u64,
    /// The flows this lane counted on the path at its last sweep (its share
    /// of `counters.flows`).
    pub flows_counted: u64,
}

/// The sending half of a lane: reads the lane's TUN queue and sends each
/// packet on its path.
pub struct TunOut {
    pub peer: PeerId,
    /// This lane's number, written in every data header ([`Header::with_lane`]).
    pub lane: usize,
    /// This lane's queue of the peer's TUN.
    pub tun: Arc<SyncDevice>,
    pub forwarding: Arc<ArcSwap<Forwarding>>,
    pub paths: Vec<Option<PathOut>>,
    pub drops: Arc<DropCounters>,
    pub flows: FlowTable,
    /// Where send errors are reported.
    pub commands: CommandLink,
    /// `duplicate`: this sender's instance number and the peer's last
    /// sequence (shared by the peer's lanes).
    pub instance: u32,
    pub peer_sequence: Arc<AtomicU64>,
    pub keys: SharedKeys,
    /// This run's epoch (see [`crate::core::crypto`]).
    pub epoch: u32,
}

/// One framed datagram of a burst, waiting to be sent: `range` of slot
/// `slot` (overlay header, inner packet or its headers), then, when the
/// payload was left where it was read, `body` of super-packet `body.0`.
struct Pending {
    path: PathId,
    slot: usize,
    range: Range<usize>,
    body: Option<(usize, Range<usize>)>,
    inner_len: usize,
}

/// A packet of a burst as it goes to [`TunOut::stage`]: what is already in
/// its slot at [`HEADROOM`] (`in_slot` bytes: the whole packet, or the
/// headers of a segment) and, for a segment, where its payload lies.
struct Staged {
    slot: usize,
    in_slot: usize,
    body: Option<(usize, Range<usize>)>,
    /// Its transport checksum is known to be good ([`Read`]).
    checksum_ok: bool,
}

/// A forwarding lane of a peer: one thread that reads its queue of the
/// peer's TUN and sends on the paths ([`TunOut`]), and receives on its
/// socket of every path and writes to the same queue ([`PathIn`]).
///
/// Both directions of a flow stay with one lane: the TUN puts a flow's
/// packets in the queue that last wrote the flow's packets (the kernel's
/// automatic steering, by a hash that is the same both ways), and every
/// datagram names its sender's lane, by which the far gateway's sockets
/// hand it to the lane of the same number ([`crate::io::udp::data_sockets`]).
/// So a TCP acknowledgement that writing a burst to the TUN produces is
/// waiting in the lane's queue when the write returns, and goes out without
/// waking another thread. A flow that first meets a gateway with another
/// lane count moves once, to the lane its datagrams come back on, and stays.
///
/// While there is traffic the lane reads again, without a `poll`, the
/// sources (its TUN queue, its sockets) that gave something in the last
/// round, and looks at the others with a `poll` that does not wait every
/// [`POLL_EVERY`] rounds; once a round finds nothing it sleeps in `poll`
/// until a source, a timer or the doorbell wakes it.
pub struct Lane {
    pub out: TunOut,
    /// This lane's end of each path, by path id (`None`: no such path, or
    /// the path has one socket, which lane 0 reads).
    pub ins: Vec<Option<PathIn>>,
    /// Rung to stop the lane.
    pub doorbell: Arc<Doorbell>,
}

impl Lane {
    /// Forwards until the doorbell rings; gives itself back so that a
    /// reload can restart it with a changed path table (sequence numbers,
    /// replay windows and flows kept).
    ///
    /// Each round takes one burst from each source that is ready or was
    /// in the last round.
    pub fn run(mut self) -> Lane {
        let mut tx = self.out.start();
        let mut rx: Vec<Option<RxState>> = self
            .ins
            .iter()
            .map(|p| p.as_ref().map(PathIn::start))
            .collect();
        let present: Vec<usize> = (0..self.ins.len())
            .filter(|&i| self.ins.get(i).is_some_and(Option::is_some))
            .collect();
        let mut set = PollSet::default();
        set.watch(
            [self.doorbell.as_raw_fd(), self.out.tun.as_raw_fd()]
                .into_iter()
                .chain(present.iter().filter_map(|&i| {
                    let p = self.ins.get(i)?.as_ref()?;
                    Some(p.socket.as_raw_fd())
                })),
        );
        let mut next_sweep = clock::now() + SWEEP_EVERY;
        // Sources (0: the TUN queue, 1 + k: socket k) that gave something
        // in the last round, and rounds since the last poll.
        let sources = 1 + present.len();
        let mut hot = vec![false; sources];
        let mut unpolled = 0;
        loop {
            let now = clock::now();
            if now >= next_sweep {
                next_sweep = now + SWEEP_EVERY;
                self.out.flows.sweep(now, &mut self.out.paths);
            }
            let mut next = next_sweep;
            for (p, r) in self.ins.iter_mut().zip(rx.iter_mut()) {
                if let (Some(p), Some(r)) = (p, r) {
                    next = next.min(p.tick(r, now));
                }
            }
            let busy = hot.contains(&true);
            if !busy || unpolled >= POLL_EVERY {
                // Idle: sleep until something is ready. Busy: look (without
                // waiting) at the sources that gave nothing last round too.
                let wait = match busy {
                    true => Duration::ZERO,
                    false => next.saturating_duration_since(now),
                };
                if let Err(e) = set.wait(Some(wait)) {
                    error!(error = %e, "poll failed; forwarding for this lane stopped");
                    return self;
                }
                if set.ready(0) || self.doorbell.is_rung() {
                    return self;
                }
                for (i, h) in hot.iter_mut().enumerate() {
                    *h = *h || set.ready(1 + i);
                }
                unpolled = 0;
            } else {
                unpolled += 1;
            }
            // Sockets first: what a write to the TUN makes the local stack
            // send back (a TCP acknowledgement, the next data a sender had
            // waiting for one) is in the TUN queue when the write returns,
            // and leaves in the same round.
            let mut wrote = false;
            for (k, &i) in present.iter().enumerate() {
                let Some(h) = hot.get_mut(1 + k).filter(|h| **h) else {
                    continue;
                };
                if let (Some(Some(p)), Some(Some(r))) = (self.ins.get_mut(i), rx.get_mut(i)) {
                    *h = p.turn(r) > 0;
                    wrote |= *h;
                }
            }
            if wrote || hot.first().copied().unwrap_or(false) {
                match self.out.turn(&mut tx) {
                    Ok(n) => hot[0] = n > 0,
                    Err(e) => {
                        error!(error = %e, "TUN read failed; forwarding for this lane stopped");
                        return self;
                    }
                }
            }
        }
    }
}

/// What a lane's sending half works with between turns: buffers allocated
/// once.
struct TxState {
    reader: TunReader,
    /// A second copy (duplicate policy) of a sealed packet is sealed
    /// from this plaintext copy.
    spare: Vec<u8>,
    pending: Vec<Pending>,
    batch: sys::SendBatch,
}

impl TunOut {
    /// Allocates the buffers of the sending half and says which offloads it
    /// uses.
    fn start(&self) -> TxState {
        let reader = TunReader::new(&self.tun);
        let gso = udp_gso_wanted()
            && self
                .paths
                .iter()
                .flatten()
                .all(|p| sys::udp_gso_supported(p.socket.as_ref()));
        info!(
            thread = std::thread::current().name().unwrap_or(""),
            lane = self.lane,
            tun_offloads = reader.offload,
            udp_gso = gso,
            "sending from the TUN"
        );
        TxState {
            spare: vec![0u8; reader.slot_len],
            pending: Vec::with_capacity(reader.slots.len()),
            batch: sys::SendBatch::new(gso),
            reader,
        }
    }

    /// Takes whatever the TUN queue holds ([`TunReader::fill`]), frames it
    /// all and sends each path's run of datagrams together
    /// ([`Self::transmit`]). Only a failing device is an error.
    fn turn(&mut self, tx: &mut TxState) -> io::Result<usize> {
        let TxState {
            reader,
            spare,
            pending,
            batch,
        } = tx;
        let count = reader.fill(&self.tun, &self.drops)?;
        if count == 0 {
            return Ok(0);
        }
        let now = clock::now();
        let forwarding = self.forwarding.load_full();
        let peer = forwarding.peers.get(usize::from(self.peer.0));
        let turn = Turn {
            duplicate: peer.is_some_and(|p| p.policy == Policy::Duplicate),
            forwarding,
            keys: self.keys.load_full(),
            now,
        };
        for r in 0..count {
            match reader.reads.get(r).copied() {
                Some(Read::Super(s, cut, checksum_ok)) => {
                    let read = (s, cut, checksum_ok);
                    self.cut_and_stage(reader, read, &turn, spare, pending, batch);
                }
                Some(Read::Slot(slot, len, checksum_ok)) => {
                    let staged = Staged {
                        slot,
                        in_slot: len,
                        body: None,
                        checksum_ok,
                    };
                    let inner = reader
                        .slots
                        .get(slot)
                        .and_then(|b| b.get(HEADROOM..HEADROOM + len));
                    let Some(placement) = self.place(&turn, inner.unwrap_or_default()) else {
                        continue;
                    };
                    self.stage(reader, staged, &placement, &turn, spare, pending, batch);
                }
                None => break,
            }
        }
        self.flush(pending, reader, batch, now);
        Ok(count)
    }

    /// Where the flow of `inner` goes (counted and `None` if nowhere).
    fn place(&mut self, turn: &Turn, inner: &[u8]) -> Option<Placement> {
        let selection = turn.forwarding.peers.get(usize::from(self.peer.0))?;
        match classify(selection, inner) {
            Ok(p) => {
                self.flows.touch(p.flow_hash, p.path, turn.now);
                Some(p)
            }
            Err(reason) => {
                self.drops.count(reason);
                None
            }
        }
    }

    /// Cuts super-packet `s` of the reader as `cut` says and stages
    /// its packets (their checksums known good or not, as
    /// [`Read::Super`] says). A cleartext, single-copy segment keeps its
    /// payload where it was read: only its headers go to a slot.
    fn cut_and_stage(
        &mut self,
        reader: &mut TunReader,
        (s, cut, checksum_ok): (usize, Cut, bool),
        turn: &Turn,
        spare: &mut [u8],
        pending: &mut Vec<Pending>,
        batch: &mut sys::SendBatch,
    ) {
        let Some(packet) = reader.packet(s) else {
            return;
        };
        let Some(placement) = self.place(turn, packet) else {
            return;
        };
        let inline = turn.keys.is_some() || placement.copy.is_some();
        let count = match cut {
            Cut::Segments(segments) => segments.count(),
            _ => 1,
        };
        for i in 0..count {
            if reader.used == reader.slots.len() {
                // Out of slots: send what is framed, then reuse them (not
                // those of this turn's whole packets, still to be staged).
                self.flush(pending, reader, batch, turn.now);
                reader.used = reader.whole;
            }
            let Some(staged) = reader.put(s, cut, i, inline, checksum_ok) else {
                self.drops.count(DropReason::TooBig);
                continue;
            };
            self.stage(reader, staged, &placement, turn, spare, pending, batch);
        }
    }

    /// Frames a staged packet for its path (and, under `duplicate`, sends
    /// the second copy at once) and queues it.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        reader: &mut TunReader,
        staged: Staged,
        placement: &Placement,
        turn: &Turn,
        spare: &mut [u8],
        pending: &mut Vec<Pending>,
        batch: &mut sys::SendBatch,
    ) {
        let keys = turn.keys.as_deref();
        // What the packet's headers say on every path; `frame` adds the
        // path's sequence number and the lane.
        let mut header = Header::data(0).with_checksum_ok(staged.checksum_ok);
        if turn.duplicate {
            header = header.with_peer_seq(PeerSeq {
                instance: self.instance,
                sequence: self.peer_sequence.fetch_add(1, Ordering::Relaxed) + 1,
            });
        }
        let body_len = staged.body.as_ref().map_or(0, |(_, r)| r.len());
        let inner_len = staged.in_slot + body_len;
        let Some(buf) = reader.slots.get_mut(staged.slot) else {
            return;
        };
        if let Some(copy) = placement.copy {
            // Staged inline (see cut_and_stage): the whole packet is in the slot.
            let whole = HEADROOM + staged.in_slot;
            if let (Some(to), Some(from)) = (spare.get_mut(..whole), buf.get(..whole)) {
                to.copy_from_slice(from);
                if let Some(range) = self.frame(copy, spare, staged.in_slot, header, keys) {
                    let d = [sys::Datagram {
                        head: spare.get(range).unwrap_or_default(),
                        body: &[],
                    }];
                    self.transmit(copy, &d, &[inner_len], batch, turn.now);
                }
            }
        }
        if let Some(range) = self.frame(placement.path, buf, staged.in_slot, header, keys) {
            pending.push(Pending {
                path: placement.path,
                slot: staged.slot,
                range,
                body: staged.body,
                inner_len,
            });
        }
    }

    /// Writes `header` with path `id`'s next sequence number and this
    /// lane (and seals) in place in front of the `in_slot` bytes at
    /// `buf[HEADROOM..]`: the framed range of `buf`, or `None` (counted)
    /// when it cannot be sent.
    fn frame(
        &mut self,
        id: PathId,
        buf: &mut [u8],
        in_slot: usize,
        header: Header,
        keys: Option<&Keys>,
    ) -> Option<Range<usize>> {
        let Some(Some(path)) = self.paths.get_mut(usize::from(id.0)) else {
            self.drops.count(DropReason::NoPath);
            return None;
        };
        let header = Header {
            sequence: path.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            ..header.with_lane(self.lane)
        };
        let framed = match keys {
            Some(keys) => {
                let sealer = Sealer {
                    keys,
                    epoch: self.epoch,
                    salt: path.salt,
                };
                seal_data(buf, in_slot, &header, &sealer)
            }
            None => encapsulate(buf, in_slot, &header),
        };
        match framed {
            Ok(range) if range.end <= buf.len() => Some(range),
            Ok(_) => {
                self.drops.count(DropReason::TooBig);
                None
            }
            Err(reason) => {
                self.drops.count(reason);
                None
            }
        }
    }

    /// Sends the burst in order, run by run of datagrams on the same path
    /// (a flow keeps one path, so its packets keep their order).
    fn flush(
        &mut self,
        pending: &mut Vec<Pending>,
        reader: &TunReader,
        batch: &mut sys::SendBatch,
        now: Instant,
    ) {
        let mut datagrams = [sys::Datagram::default(); SEND_RUN];
        let mut lens = [0usize; SEND_RUN];
        let mut start = 0;
        while let Some(head) = pending.get(start) {
            let path = head.path;
            let run = pending[start..]
                .iter()
                .take(SEND_RUN)
                .take_while(|p| p.path == path)
                .count();
            for (k, p) in pending[start..start + run].iter().enumerate() {
                let head = reader
                    .slots
                    .get(p.slot)
                    .and_then(|b| b.get(p.range.clone()));
                let body = p.body.as_ref().and_then(|(s, r)| {
                    let packet = reader.packet(*s)?;
                    packet.get(r.clone())
                });
                datagrams[k] = sys::Datagram {
                    head: head.unwrap_or_default(),
                    body: body.unwrap_or_default(),
                };
                lens[k] = p.inner_len;
            }
            self.transmit(path, &datagrams[..run], &lens[..run], batch, now);
            start += run;
        }
        pending.clear();
    }

    /// Sends datagrams (inner lengths `lens`) on path `id` with one
    /// `sendmmsg` where it can: runs of equal size as UDP GSO messages
    /// ([`plan_messages`]), the rest one datagram per message. A message the
    /// kernel refuses is counted and skipped; an `EINVAL` on a GSO message
    /// (say a segment above the device MTU) sends that run plainly, and a
    /// kernel or device without UDP GSO turns it off for good.
    fn transmit(
        &mut self,
        id: PathId,
        datagrams: &[sys::Datagram<'_>],
        lens: &[usize],
        batch: &mut sys::SendBatch,
        now: Instant,
    ) {
        let Some(Some(path)) = self.paths.get_mut(usize::from(id.0)) else {
            return;
        };
        // The plan's vector is kept in the batch between calls.
        let mut messages = std::mem::take(&mut batch.plan);
        plan_messages(datagrams, batch.gso, &mut messages);
        let mut next = 0;
        while next < messages.len() {
            let todo = &messages[next..];
            let socket = path.socket.as_ref();
            match batch.send_messages(socket, datagrams, todo, path.remote) {
                Ok(sent) => {
                    for m in todo.iter().take(sent) {
                        for len in lens.iter().skip(m.first).take(m.count) {
                            path.counters.count_tx(*len);
                        }
                    }
                    next += sent.max(1).min(todo.len());
                    if sent == 0 {
                        // Nothing sent and no error: count the first as lost.
                        self.drops.count(DropReason::PathSend);
                    }
                }
                Err(e) => {
                    let Some(failed) = todo.first().copied() else {
                        break;
                    };
                    if failed.segment.is_some() && gso_unusable(&e) {
                        // Not on this kernel or device: plain sends from now on.
                        batch.gso = false;
                        let remaining = messages.len() - next;
                        split_plainly(&mut messages, next, remaining);
                        continue;
                    }
                    if failed.segment.is_some() && e.raw_os_error() == Some(libc::EINVAL) {
                        split_plainly(&mut messages, next, 1);
                        continue;
                    }
                    next += 1;
                    for _ in 0..failed.count {
                        self.drops.count(DropReason::PathSend);
                    }
                    if udp::is_reachability_error(&e) && path.report_due(now) {
                        self.commands.send(Command::SendError(path.id));
                    }
                }
            }
        }
        batch.plan = messages;
    }
}

/// Groups `datagrams` into the messages of one `sendmmsg`: with `gso`,
/// each run [`gso_run`] finds becomes one UDP GSO message; everything
/// else is a message of one datagram.
fn plan_messages(datagrams: &[sys::Datagram<'_>], gso: bool, out: &mut Vec<sys::Message>) {
    out.clear();
    let mut first = 0;
    while let Some(rest) = datagrams.get(first..).filter(|r| !r.is_empty()) {
        let run = if gso { gso_run(rest) } else { 0 };
        let message = match run {
            2.. => sys::Message {
                first,
                count: run,
                segment: rest.first().map(|d| d.len() as u16),
            },
            _ => sys::Message {
                first,
                count: 1,
                segment: None,
            },
        };
        out.push(message);
        first += message.count;
    }
}

/// Replaces the `count` messages from `at` on by one plain message per
/// datagram.
fn split_plainly(messages: &mut Vec<sys::Message>, at: usize, count: usize) {
    let end = (at + count).min(messages.len());
    let plain: Vec<sys::Message> = messages
        .get(at..end)
        .unwrap_or_default()
        .iter()
        .flat_map(|m| {
            (m.first..m.first + m.count).map(|first| sys::Message {
                first,
                count: 1,
                segment: None,
            })
        })
        .collect();
    messages.splice(at..end, plain);
}

/// Most bytes one UDP GSO send carries (the IP length field's limit, with
/// room for the headers).
const GSO_MAX_BYTES: usize = 65_000;
/// Most datagrams one UDP GSO send carries (the kernel's `UDP_MAX_SEGMENTS`
/// was 64 before Linux 6.9).
const GSO_MAX_SEGMENTS: usize = 64;
/// Datagrams handed to one [`TunOut::transmit`] call: a whole burst, so
/// that no UDP GSO run is cut in two.
const SEND_RUN: usize = TX_SEGMENTS;
/// Super-packets a sending thread on a TUN with offloads reads per turn.
const TX_SUPERS: usize = 4;
/// Payloads shorter than this are copied next to their headers rather
/// than sent from where they were read (a second piece costs more than
/// the copy).
const INLINE_BELOW: usize = 256;

/// What one turn of a sending thread works with: the forwarding snapshot
/// and keys as they were when the burst was read.
struct Turn {
    forwarding: Arc<Forwarding>,
    /// The peer's policy is `duplicate`: packets carry a peer sequence.
    duplicate: bool,
    keys: Option<Arc<Keys>>,
    now: Instant,
}

/// One read of a turn: a super-packet left where it was read (offloads;
/// with what it needs, its checksum already finished), or a whole packet
/// in a slot at [`HEADROOM`] (slot, length); with whether its transport
/// checksum (or its segments', once cut) is known to be good
/// ([`VnetHeader::checksum_known`]; never on a plain TUN).
#[derive(Clone, Copy, Debug)]
enum Read {
    Super(usize, Cut, bool),
    Slot(usize, usize, bool),
}

/// Where a sending thread reads its TUN into and frames its datagrams:
/// buffers allocated once.
///
/// On a TUN with offloads, each read (a virtio-net header and a packet)
/// goes into one of `supers`. A super-packet stays there, and
/// [`TunReader::put`] stages its segments in `slots` one by one: only the
/// rewritten headers, unless asked to copy the payload too. A whole packet
/// (small-packet traffic, acknowledgements) is moved to a slot at once, so
/// that a turn can take up to half the slots of them while still holding
/// [`TX_SUPERS`] super-packets. On a plain TUN each read goes straight into
/// a slot at [`HEADROOM`]. A slot has room for the overlay header in front,
/// a whole packet of the MTU and the tag behind.
struct TunReader {
    offload: bool,
    supers: Vec<Vec<u8>>,
    super_lens: Vec<usize>,
    slots: Vec<Vec<u8>>,
    slot_len: usize,
    /// This turn's reads, in order.
    reads: Vec<Read>,
    /// Slots taken so far in this turn.
    used: usize,
    /// Slots holding this turn's whole packets (the first ones).
    whole: usize,
}

impl TunReader {
    fn new(tun: &SyncDevice) -> TunReader {
        let offload = tun.tcp_gso();
        let mtu = tun.mtu().map_or(usize::from(u16::MAX), usize::from);
        let (slot_len, count, supers) = if offload {
            (
                HEADROOM + mtu.max(MAX_HEADERS) + TRAILER + 64,
                TX_SEGMENTS,
                TX_SUPERS,
            )
        } else {
            (BUF_LEN, TX_BATCH, 0)
        };
        TunReader {
            offload,
            supers: (0..supers)
                .map(|_| vec![0u8; VNET_HDR_LEN + usize::from(u16::MAX)])
                .collect(),
            super_lens: vec![0; supers],
            slots: (0..count).map(|_| vec![0u8; slot_len]).collect(),
            slot_len,
            reads: Vec::with_capacity(count),
            used: 0,
            whole: 0,
        }
    }

    /// Reads what the (non-blocking) TUN holds, as long as there is room
    /// (see [`TunReader`]); returns how many reads there were. A packet
    /// handed over malformed is counted and skipped; only a failing device
    /// is an error.
    fn fill(&mut self, tun: &SyncDevice, drops: &DropCounters) -> io::Result<usize> {
        self.reads.clear();
        self.used = 0;
        let mut supers = 0;
        loop {
            let room = match self.offload {
                true => supers < self.supers.len() && self.used < self.slots.len() / 2,
                false => self.used < self.slots.len(),
            };
            if !room {
                break;
            }
            let buf = match self.offload {
                true => self.supers.get_mut(supers).map(|b| b.as_mut_slice()),
                false => self
                    .slots
                    .get_mut(self.used)
                    .and_then(|b| b.get_mut(HEADROOM..)),
            };
            let Some(buf) = buf else {
                break;
            };
            match tun.recv(buf) {
                Ok(n) if !self.offload => {
                    self.reads.push(Read::Slot(self.used, n, false));
                    self.used += 1;
                }
                Ok(n) => match self.keep(supers, n) {
                    Ok(true) => supers += 1,
                    Ok(false) => {}
                    Err(reason) => drops.count(reason),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if !self.reads.is_empty() => {
                    debug!(error = %e, "TUN read failed");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.whole = self.used;
        Ok(self.reads.len())
    }

    /// Files the `n` bytes just read into super-packet buffer `s`: a whole
    /// packet that fits a slot moves to the next one (its checksum
    /// finished if the kernel left that to us); anything else stays, as a
    /// super-packet (returns true: the buffer is taken).
    fn keep(&mut self, s: usize, n: usize) -> Result<bool, DropReason> {
        let raw = self
            .supers
            .get_mut(s)
            .and_then(|b| b.get_mut(..n))
            .filter(|r| r.len() > VNET_HDR_LEN)
            .ok_or(DropReason::InnerMalformed)?;
        let vnet = VnetHeader::parse(raw).ok_or(DropReason::InnerMalformed)?;
        let packet = raw
            .get_mut(VNET_HDR_LEN..)
            .ok_or(DropReason::InnerMalformed)?;
        let room = self.slot_len - HEADROOM - TRAILER;
        let known = vnet.checksum_known();
        let cut = match Cut::of(&vnet, packet).map_err(|_| DropReason::InnerMalformed)? {
            Cut::Finish { start, offset } => {
                finish_checksum(packet, start, offset).map_err(|_| DropReason::InnerMalformed)?;
                Cut::Whole
            }
            cut => cut,
        };
        match cut {
            Cut::Segments(_) => {}
            _ if packet.len() > room => {}
            _ => {
                let slot = self
                    .slots
                    .get_mut(self.used)
                    .and_then(|b| b.get_mut(HEADROOM..HEADROOM + packet.len()))
                    .ok_or(DropReason::TooBig)?;
                slot.copy_from_slice(packet);
                self.reads.push(Read::Slot(self.used, packet.len(), known));
                self.used += 1;
                return Ok(false);
            }
        }
        if let Some(l) = self.super_lens.get_mut(s) {
            *l = n;
        }
        // Segments get checksums computed here.
        let checksum_ok = known || matches!(cut, Cut::Segments(_));
        self.reads.push(Read::Super(s, cut, checksum_ok));
        Ok(true)
    }

    /// The packet of read `s` (behind its virtio-net header).
    fn packet(&self, s: usize) -> Option<&[u8]> {
        super_packet(&self.supers, &self.super_lens, s)
    }

    /// Stages packet `i` of read `s` (cut as `cut`) in the next free slot:
    /// its headers (the whole packet, if it is not a segment or `inline`)
    /// at [`HEADROOM`], the rest left in place. `None` if it does not fit.
    fn put(
        &mut self,
        s: usize,
        cut: Cut,
        i: usize,
        inline: bool,
        checksum_ok: bool,
    ) -> Option<Staged> {
        let slot_index = self.used;
        // Borrowed apart from the slots, which are written.
        let packet = super_packet(&self.supers, &self.super_lens, s)?;
        let slot = self.slots.get_mut(slot_index)?.get_mut(HEADROOM..)?;
        let (headers, body) = match cut {
            Cut::Segments(segments) => {
                let body = segments.header(packet, i, slot)?;
                (segments.headers(), body)
            }
            _ => (0, 0..packet.len()),
        };
        let staged = if inline || body.len() <= INLINE_BELOW {
            let payload = packet.get(body)?;
            slot.get_mut(headers..headers + payload.len())?
                .copy_from_slice(payload);
            Staged {
                slot: slot_index,
                in_slot: headers + payload.len(),
                body: None,
                checksum_ok,
            }
        } else {
            Staged {
                slot: slot_index,
                in_slot: headers,
                body: Some((s, body)),
                checksum_ok,
            }
        };
        self.used += 1;
        Some(staged)
    }
}

/// The packet in super-packet buffer `s` (behind its virtio-net header).
fn super_packet<'a>(supers: &'a [Vec<u8>], lens: &[usize], s: usize) -> Option<&'a [u8]> {
    supers.get(s)?.get(VNET_HDR_LEN..*lens.get(s)?)
}

/// How many datagrams at the start of `rest` can go as one UDP GSO send:
/// a run of one size, plus one shorter last datagram (0 or 1: not worth it).
fn gso_run(rest: &[sys::Datagram<'_>]) -> usize {
    let Some(size) = rest.first().map(|d| d.len()) else {
        return 0;
    };
    if size == 0 || size > usize::from(u16::MAX) {
        return 0;
    }
    let most = (GSO_MAX_BYTES / size).min(GSO_MAX_SEGMENTS).min(rest.len());
    let mut run = rest
        .iter()
        .take(most)
        .take_while(|d| d.len() == size)
        .count();
    if run < most
        && rest
            .get(run)
            .is_some_and(|d| !d.is_empty() && d.len() < size)
    {
        run += 1;
    }
    if run < 2 {
        0
    } else {
        run
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

/// UDP GSO is used unless `CROSSLINK_UDP_GSO=0` (then every datagram is a
/// packet of its own on the underlay, as with kernels without it).
fn udp_gso_wanted() -> bool {
    std::env::var("CROSSLINK_UDP_GSO").map_or(true, |v| v != "0")
}

/// UDP GRO is asked for unless `CROSSLINK_UDP_GRO=0` (then every datagram
/// arrives as a message of its own, as on a kernel without it).
fn udp_gro_wanted() -> bool {
    std::env::var("CROSSLINK_UDP_GRO").map_or(true, |v| v != "0")
}

/// Errors saying UDP GSO does not work here at all.
fn gso_unusable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
    )
}

impl PathOut {
    fn report_due(&mut self, now: Instant) -> bool {
        let due = self
            .last_error_report
            .is_none_or(|t| now.saturating_duration_since(t) >= SEND_ERROR_REPORT_INTERVAL);
        if due {
            self.last_error_report = Some(now);
        }
        due
    }
}

/// A lane's receiving end of a path: takes the datagrams of the lane's
/// socket and writes the inner packets to the lane's TUN queue.
pub struct PathIn {
    /// The lane's socket of the path.
    pub socket: Arc<UdpSocket>,
    pub remote: SocketAddr,
    /// The lane's queue of the peer's TUN.
    pub tun: Arc<SyncDevice>,
    pub counters: Arc<PathCounters>,
    pub drops: Arc<DropCounters>,
    /// Whether this end measures the path's round-trip time (one lane does).
    pub probe: bool,
    /// The peer's duplicate-suppression window, shared by its paths.
    pub dedup: Arc<Mutex<Window>>,
    /// Where measured round-trip times go.
    pub rtt: metrics::Histogram,
    /// XORed into echo stamps, so that a forged reply does not decode to a
    /// plausible send time.
    pub stamp_key: u64,
    pub keys: SharedKeys,
    pub epoch: u32,
    /// [`crate::core::crypto::path_salt`] of (local, remote), for what we send.
    pub salt_out: u64,
    /// [`crate::core::crypto::path_salt`] of (remote, local), for what we receive.
    pub salt_in: u64,
    /// The path's replay window, shared by the peer's lanes.
    pub window: Arc<Mutex<ReplayWindow>>,
    pub echo_guard: EchoGuard,
}

/// What a lane's receiving end of a path works with between turns:
/// buffers allocated once.
struct RxState {
    batch: sys::RecvBatch,
    out: TunWriter,
    /// The inner packets of a burst: (message, range in it, whether the
    /// sender vouched for its checksum, whether it is longer than the TUN's
    /// MTU: a super-packet that came whole).
    inner: Vec<(usize, Range<usize>, bool, bool)>,
    /// Room for the burst's packet slices, kept between bursts.
    spare: Vec<&'static [u8]>,
    /// Whether the sender vouched for each packet's checksum.
    trusted: Vec<bool>,
    /// When the next echo request is due.
    next_echo: Instant,
}

impl PathIn {
    /// Asks for UDP GRO, allocates the buffers and says which offloads this
    /// end uses.
    fn start(&self) -> RxState {
        let out = TunWriter::new(&self.tun);
        let gro = match udp_gro_wanted() {
            false => false,
            true => match sys::enable_udp_gro(self.socket.as_ref()) {
                Ok(()) => true,
                Err(e) => {
                    debug!(error = %e, "UDP GRO unavailable; datagrams arrive one by one");
                    false
                }
            },
        };
        info!(
            thread = std::thread::current().name().unwrap_or(""),
            remote = %self.remote,
            udp_gro = gro,
            tun_offloads = out.offload,
            "receiving into the TUN"
        );
        RxState {
            batch: sys::RecvBatch::new(RX_BATCH, BUF_LEN),
            out,
            inner: Vec::with_capacity(RX_BATCH * 64),
            spare: Vec::with_capacity(RX_BATCH * 64),
            trusted: Vec::with_capacity(RX_BATCH * 64),
            next_echo: clock::now(),
        }
    }

    /// Sends an echo request if one is due; returns when the next one is.
    fn tick(&mut self, rx: &mut RxState, now: Instant) -> Instant {
        if self.probe && now >= rx.next_echo {
            rx.next_echo = now + ECHO_INTERVAL;
            // Sealed stamps need no obscuring, and must increase (EchoGuard).
            let stamp = match self.keys.load().is_some() {
                true => clock::nanos(),
                false => clock::nanos() ^ self.stamp_key,
            };
            self.echo_guard.sent(stamp);
            self.send_echo(Echo::Request(stamp));
        }
        match self.probe {
            true => rx.next_echo,
            false => now + ECHO_INTERVAL,
        }
    }

    /// Takes what the socket holds (a burst per `recvmmsg`, without
    /// waiting) and writes the inner packets to the TUN.
    fn turn(&mut self, rx: &mut RxState) -> usize {
        let RxState {
            batch,
            out,
            inner,
            spare,
            trusted,
            ..
        } = rx;
        let n = match batch.recv_queued(self.socket.as_ref()) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return 0
            }
            Err(e) => {
                debug!(error = %e, "path receive error");
                return 0;
            }
        };
        let keys = self.keys.load_full();
        inner.clear();
        for i in 0..n {
            let Some((message, src, segment)) = batch.get_mut(i) else {
                self.drops.count(DropReason::TooBig);
                continue;
            };
            // A coalesced message holds datagrams of `segment` bytes
            // (the last may be shorter), all from one source; the inner
            // packets are opened in place.
            if message.is_empty() {
                // An empty datagram is junk too, and counted as such.
                let _ = self.receive(message, src, keys.as_deref());
            }
            let segment = segment.unwrap_or(message.len()).max(1);
            for (k, datagram) in message.chunks_mut(segment).enumerate() {
                if let Some((r, checksum_ok)) = self.receive(datagram, src, keys.as_deref()) {
                    let at = k * segment;
                    let whole = r.len() > out.mtu;
                    inner.push((i, at + r.start..at + r.end, checksum_ok, whole));
                }
            }
        }
        // The whole burst is written together: a far super-packet sent
        // as two messages (UDP GSO stops at 64 KiB of datagrams, headers
        // included) goes back into the TUN as one.
        let mut packets = std::mem::take(spare);
        packets.extend(inner.iter().map(|(i, r, _, _)| {
            let message = batch.message(*i).unwrap_or_default();
            message.get(r.clone()).unwrap_or_default()
        }));
        trusted.clear();
        trusted.extend(inner.iter().map(|(_, _, ok, _)| *ok));
        // In order: the packets before a whole super-packet, then it.
        let mut start = 0;
        for (k, (_, _, ok, whole)) in inner.iter().enumerate() {
            if let (true, Some(p)) = (whole, packets.get(k)) {
                let before = packets.get(start..k).unwrap_or_default();
                out.write(
                    &self.tun,
                    before,
                    trusted.get(start..k).unwrap_or_default(),
                    &self.drops,
                );
                out.write_whole(&self.tun, p, *ok, &self.drops);
                start = k + 1;
            }
        }
        let rest = packets.get(start..).unwrap_or_default();
        out.write(
            &self.tun,
            rest,
            trusted.get(start..).unwrap_or_default(),
            &self.drops,
        );
        *spare = recycle(packets);
        n
    }

    /// Validates one datagram: the inner packet's range in it, if it is
    /// data to deliver, and whether the sender vouched for its checksum
    /// (echo messages are answered here).
    fn receive(
        &mut self,
        datagram: &mut [u8],
        src: SocketAddr,
        keys: Option<&Keys>,
    ) -> Option<(Range<usize>, bool)> {
        if src != self.remote {
            self.drops.count(DropReason::UnknownSource);
            return None;
        }
        if let Some(keys) = keys {
            return self.receive_sealed(keys, datagram);
        }
        if let Some(echo) = parse_echo(datagram) {
            self.on_echo(echo);
            return None;
        }
        match decapsulate(datagram) {
            Ok((header, inner)) => {
                let start = datagram.len() - inner.len();
                let end = datagram.len();
                self.deliverable(header.peer_seq, inner.len())
                    .then_some((start..end, header.checksum_ok()))
            }
            Err(reason) => {
                self.drops.count(reason);
                None
            }
        }
    }

    /// Counts a data packet and applies the duplicate window: whether it
    /// goes to the TUN.
    fn deliverable(&self, peer_seq: Option<PeerSeq>, len: usize) -> bool {
        self.counters.count_rx(len);
        if let Some(p) = peer_seq {
            match self.dedup.lock().check(p.instance, p.sequence) {
                Verdict::Deliver => {}
                Verdict::Duplicate => {
                    self.drops.count(DropReason::Duplicate);
                    return false;
                }
                Verdict::TooOld => {
                    self.drops.count(DropReason::DuplicateStale);
                    return false;
                }
            }
        }
        true
    }
}

/// How a receiving thread writes inner packets to its peer's TUN.
///
/// With offloads, the packets of one received message (with UDP GRO, up to
/// 64 KiB of datagrams from one sender, typically one flow's burst) are
/// grouped by [`coalesce::plan`]: consecutive segments of a TCP flow go to
/// the TUN as one super-packet (one `writev` of the merged headers and the
/// payloads where they lie, so one pass up the stack per 64 KiB and no
/// copy), anything else one by one behind an all-zero virtio-net header.
/// Without offloads, each packet is written as it is.
struct TunWriter {
    offload: bool,
    /// The TUN's MTU.
    mtu: usize,
    trains: Vec<Train>,
    header: [u8; MAX_TRAIN_HEADER],
    /// The pieces of one `writev`, kept empty between writes (see [`recycle_iov`]).
    iov: Vec<IoSlice<'static>>,
}

impl TunWriter {
    fn new(tun: &SyncDevice) -> TunWriter {
        TunWriter {
            offload: tun.tcp_gso(),
            mtu: tun.mtu().map_or(usize::from(u16::MAX), usize::from),
            trains: Vec::new(),
            header: [0; MAX_TRAIN_HEADER],
            iov: Vec::new(),
        }
    }

    /// Writes `packets` (in order); `trusted` says which ones' checksums
    /// their sender vouched for.
    fn write(
        &mut self,
        tun: &SyncDevice,
        packets: &[&[u8]],
        trusted: &[bool],
        drops: &DropCounters,
    ) {
        match packets {
            [] => {}
            // Plain TUN, or one packet (small-packet traffic): nothing to
            // merge and no planning.
            _ if !self.offload => {
                for p in packets {
                    if tun.send(p).is_err() {
                        drops.count(DropReason::TunWrite);
                    }
                }
            }
            [one] => {
                let zero = [0u8; VNET_HDR_LEN];
                let iov = [IoSlice::new(&zero), IoSlice::new(one)];
                if tun.send_vectored(&iov).is_err() {
                    drops.count(DropReason::TunWrite);
                }
            }
            _ => self.write_trains(tun, packets, trusted, drops),
        }
    }

    /// Writes one packet longer than the TUN's MTU: a super-packet that
    /// arrived whole, with the virtio-net header that has the kernel cut
    /// it at the MTU (see [`Train::whole`]; `trusted`: its sender vouched
    /// for its checksum).
    fn write_whole(
        &mut self,
        tun: &SyncDevice,
        packet: &[u8],
        trusted: bool,
        drops: &DropCounters,
    ) {
        let train = match self.offload {
            true => Train::whole(packet, self.mtu, trusted),
            false => None,
        };
        let Some(t) = train else {
            // Not a TCP super-packet the TUN can take (or a damaged one): as
            // it is, which the kernel answers as too big for the route on.
            return self.write(tun, &[packet], &[trusted], drops);
        };
        let n = t.header(packet, &mut self.header);
        let payload = packet.get(t.headers..).unwrap_or_default();
        let iov = [
            IoSlice::new(self.header.get(..n).unwrap_or_default()),
            IoSlice::new(payload),
        ];
        if n == 0 || tun.send_vectored(&iov).is_err() {
            drops.count(DropReason::TunWrite);
        }
    }

    /// Writes `packets` as [`coalesce::plan`] groups them, a `writev` per train.
    fn write_trains(
        &mut self,
        tun: &SyncDevice,
        packets: &[&[u8]],
        trusted: &[bool],
        drops: &DropCounters,
    ) {
        coalesce::plan(packets, trusted, &mut self.trains);
        for t in &self.trains {
            let Some(first) = packets.get(t.first) else {
                continue;
            };
            let n = t.header(first, &mut self.header);
            if n == 0 {
                drops.count(DropReason::InnerMalformed);
                continue;
            }
            let train = packets.get(t.first..t.first + t.count).unwrap_or_default();
            let mut iov = std::mem::take(&mut self.iov);
            iov.push(IoSlice::new(self.header.get(..n).unwrap_or_default()));
            let skip = if t.count > 1 { t.headers } else { 0 };
            iov.extend(
                train
                    .iter()
                    .map(|p| IoSlice::new(p.get(skip..).unwrap_or_default())),
            );
            if tun.send_vectored(&iov).is_err() {
                for _ in 0..t.count {
                    drops.count(DropReason::TunWrite);
                }
            }
            self.iov = recycle_iov(iov);
        }
    }
}

impl PathIn {
    fn receive_sealed(&mut self, keys: &Keys, datagram: &mut [u8]) -> Option<(Range<usize>, bool)> {
        match open(datagram, keys, self.salt_in, &mut self.window) {
            Ok(Opened::Data(header, range)) => {
                let deliver = self.deliverable(header.peer_seq, range.len());
                return deliver.then_some((range, header.checksum_ok()));
            }
            Ok(Opened::Echo(Echo::Request(stamp), epoch)) => {
                if self.echo_guard.request(epoch, stamp) {
                    self.send_echo(Echo::Reply(stamp));
                } else {
                    self.drops.count(DropReason::Replayed);
                }
            }
            Ok(Opened::Echo(Echo::Reply(stamp), _)) => {
                if self.echo_guard.reply(stamp) {
                    self.record_rtt(stamp);
                } else {
                    self.drops.count(DropReason::EchoStale);
                }
            }
            Err(reason) => self.drops.count(reason),
        }
        None
    }

    fn send_echo(&self, echo: Echo) {
        let mut msg = [0u8; HEADROOM + TRAILER];
        let keys = self.keys.load_full();
        let framed = match keys.as_deref() {
            Some(keys) => {
                let sealer = Sealer {
                    keys,
                    epoch: self.epoch,
                    salt: self.salt_out,
                };
                seal_echo(echo, &mut msg, &sealer)
            }
            None => emit_echo(echo, &mut msg),
        };
        if let Ok(n) = framed {
            if self.socket.send_to(&msg[..n], self.remote).is_err() {
                self.drops.count(DropReason::PathSend);
            }
        }
    }

    fn on_echo(&self, echo: Echo) {
        match echo {
            Echo::Request(stamp) => self.send_echo(Echo::Reply(stamp)),
            Echo::Reply(stamp) => self.record_rtt(stamp ^ self.stamp_key),
        }
    }

    /// Records the round trip of a reply to the request stamped `sent`.
    fn record_rtt(&self, sent: u64) {
        let max = ECHO_MAX_AGE.as_nanos() as u64;
        match echo_rtt(sent, clock::nanos(), max) {
            Some(ns) => {
                self.counters.rtt_ns.store(ns.max(1), Ordering::Relaxed);
                self.rtt.record(Duration::from_nanos(ns).as_secs_f64());
            }
            None => self.drops.count(DropReason::EchoStale),
        }
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

/// Hasher for keys that are already well-mixed 64-bit hashes.
#[derive(Default)]
struct PassThrough(u64);

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
/// [`FLOW_IDLE`]).
///
/// A flow that moves to another lane (it meets a gateway with another lane
/// count, see [`Lane`]) would be counted by both lanes until it went idle
/// on the one it left. So a lane that sees a flow for the first time tells
/// the peer's other lanes ([`FlowClaims`]), and at its next sweep a lane
/// forgets every flow another lane took after it did.
pub struct FlowTable {
    /// Flow hash -> (path, last seen, first seen by this lane).
    flows: HashMap<u64, (PathId, Instant, Instant), BuildHasherDefault<PassThrough>>,
    lane: usize,
    claims: Arc<FlowClaims>,
    /// Claims taken from this lane's inbox at a sweep (kept for its room).
    taken: Vec<(u64, Instant)>,
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

    fn touch(&mut self, hash: u64, path: PathId, now: Instant) {
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
    fn sweep(&mut self, now: Instant, paths: &mut [Option<PathOut>]) {
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
        let mut per_path = vec![0u64; paths.len()];
        for (path, _, _) in self.flows.values() {
            if let Some(c) = per_path.get_mut(usize::from(path.0)) {
                *c += 1;
            }
        }
        for (p, n) in paths.iter_mut().zip(per_path) {
            if let Some(p) = p {
                let before = std::mem::replace(&mut p.flows_counted, n);
                if n >= before {
                    p.counters.flows.fetch_add(n - before, Ordering::Relaxed);
                } else {
                    p.counters.flows.fetch_sub(before - n, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The flows each lane of a peer newly took, for the other lanes (see
/// [`FlowTable`]): one inbox per lane, filled by the others when they see
/// a flow for the first time (not per packet) and emptied at the lane's
/// sweep, once a second.
pub struct FlowClaims {
    inboxes: Vec<Mutex<Vec<(u64, Instant)>>>,
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

    fn sizes(lens: &[usize]) -> Vec<Vec<u8>> {
        lens.iter().map(|&n| vec![0u8; n]).collect()
    }

    fn plan(lens: &[usize], gso: bool) -> Vec<(usize, usize, Option<u16>)> {
        let bufs = sizes(lens);
        // Headers and bodies in pieces, as the sending thread has them.
        let datagrams: Vec<sys::Datagram> = bufs
            .iter()
            .map(|b| sys::Datagram {
                head: &b[..b.len().min(60)],
                body: &b[b.len().min(60)..],
            })
            .collect();
        let mut out = Vec::new();
        plan_messages(&datagrams, gso, &mut out);
        out.iter().map(|m| (m.first, m.count, m.segment)).collect()
    }

    #[test]
    fn a_super_packet_goes_as_gso_runs_of_at_most_64_kib() {
        // 46 segments of 1500 bytes and a short last one: 43 fit in 65,000 bytes.
        let mut lens = vec![1500; 46];
        lens.push(700);
        assert_eq!(
            plan(&lens, true),
            vec![(0, 43, Some(1500)), (43, 4, Some(1500))]
        );
    }

    #[test]
    fn a_lone_small_datagram_does_not_stop_the_runs_behind_it() {
        let lens = [80, 1500, 1500, 1500, 90, 1500, 1500];
        assert_eq!(
            plan(&lens, true),
            vec![(0, 1, None), (1, 4, Some(1500)), (5, 2, Some(1500))]
        );
    }

    #[test]
    fn without_gso_every_datagram_is_a_message() {
        let lens = [1500, 1500, 700];
        assert_eq!(
            plan(&lens, false),
            vec![(0, 1, None), (1, 1, None), (2, 1, None)]
        );
        assert!(plan(&[], true).is_empty());
    }

    #[test]
    fn a_refused_run_is_sent_plainly() {
        let mut messages = vec![
            sys::Message {
                first: 0,
                count: 1,
                segment: None,
            },
            sys::Message {
                first: 1,
                count: 3,
                segment: Some(1500),
            },
            sys::Message {
                first: 4,
                count: 2,
                segment: Some(900),
            },
        ];
        split_plainly(&mut messages, 1, 1);
        let got: Vec<_> = messages
            .iter()
            .map(|m| (m.first, m.count, m.segment))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 1, None),
                (1, 1, None),
                (2, 1, None),
                (3, 1, None),
                (4, 2, Some(900))
            ]
        );
        split_plainly(&mut messages, 4, 10);
        assert_eq!(messages.len(), 6);
        assert!(messages.iter().all(|m| m.count == 1 && m.segment.is_none()));
    }

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
