//! Forward error correction of a peer's data packets, sans-IO.
//!
//! When every path to a peer loses packets there is nowhere to steer to;
//! the sender then adds *parity* to its data so that the receiver rebuilds
//! what was lost without waiting for a retransmission. The code is
//! Reed-Solomon (the `reed-solomon-simd` crate): a block of `k` data
//! packets gets `m` parity packets, and any `k` of the `k + m` rebuild all.
//!
//! **Blocks.** A data packet carries the peer-sequence extension of the
//! overlay header ([`crate::core::wire::overlay::PeerSeq`]: the sender's
//! instance and a per-peer number). A block is a run of consecutive
//! numbers `first .. first + k` of one instance, so a data packet needs no
//! block field of its own: its block and index follow from its number and
//! the parity that names `first` and `k`. The [`Encoder`] opens a block
//! with the first packet it is shown and closes it after `k` packets, after
//! [`Encoder::hold`] (a few milliseconds, so that a slow stream is not left
//! unprotected), or at a gap in the numbers (a packet sent without FEC).
//! Data packets are sent as they come, never held back; the parity of a
//! block is computed when it closes and sent after it. A block closed
//! early with `j < k` packets gets `ceil(m * j / k)` parity packets (at
//! least one), the same overhead.
//!
//! **Variable lengths.** Reed-Solomon needs shards of one length. Each
//! packet of a block becomes a shard made of its length (u16, big-endian)
//! followed by the packet, then zeros up to the block's longest packet plus
//! two (rounded up to even, which the crate requires). Parity shards have
//! that length too; a rebuilt shard gives the packet back with its length.
//! The zeros are never sent: a data packet goes out as it is, only the
//! parity is as long as the block's longest packet (plus two bytes).
//!
//! **Receiving.** The [`Decoder`] is shown every data packet that arrives
//! (delivered at once, as without FEC: the decoder only keeps a copy) and
//! every parity packet. While a block misses packets and its parity is not
//! enough yet, the parity waits, at most [`Decoder::wait`] after the first
//! parity of the block arrived; as soon as `k` of the block's `k + m`
//! shards are there, the missing data packets are rebuilt and handed back
//! (late rather than never). A block still short when its wait ends is
//! given up and its missing packets counted as unrecoverable. A block
//! whose data all arrive needs nothing: its parity is dropped. The decoder
//! remembers which numbers it rebuilt, so that an original arriving after
//! its rebuilt copy is reported as a duplicate.
//!
//! Memory is bounded: [`MAX_KEPT`] data copies (and [`MAX_KEPT_BYTES`]),
//! kept at most [`KEEP_FOR`]; [`MAX_PENDING`] blocks waiting for parity
//! or data; [`MAX_STREAMS`] sender instances (a sending lane or a sender
//! restart is a new instance; the least recently seen is forgotten).
//! Nothing from the network can make it panic: a parity packet whose
//! fields disagree with each other or with its block's other parity is
//! dropped and counted ([`FecStats::bad_parity`]).

use crate::core::wire::overlay::FecParity;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Largest number of data packets in a block.
pub const MAX_K: u8 = 64;
/// Largest number of parity packets per block.
pub const MAX_M: u8 = 32;
/// Longest packet a block can carry (a shard holds its length in a u16).
pub const MAX_PACKET: usize = u16::MAX as usize - 2;
/// Data copies a decoder keeps, all streams together.
pub const MAX_KEPT: usize = 4096;
/// Bytes of data copies a decoder keeps, all streams together.
pub const MAX_KEPT_BYTES: usize = 8 << 20;
/// How long a data copy is kept for a parity that may still come.
pub const KEEP_FOR: Duration = Duration::from_millis(300);
/// Blocks waiting for their missing packets, all streams together.
pub const MAX_PENDING: usize = 256;
/// Sender instances remembered.
pub const MAX_STREAMS: usize = 16;
/// How long the encoder keeps a block open by default.
pub const DEFAULT_HOLD: Duration = Duration::from_millis(5);
/// How long the decoder waits for the shards a block misses by default.
/// A rebuild happens as soon as the shards are there, so the wait only
/// bounds how long a block that cannot be rebuilt is kept: long enough for
/// a data packet stuck behind a queue on a slower path.
pub const DEFAULT_WAIT: Duration = Duration::from_millis(100);

/// A block code: `k` data packets, `m` parity packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Code {
    pub k: u8,
    pub m: u8,
}

impl Code {
    /// A code, if `1 <= k <= MAX_K` and `1 <= m <= MAX_M`.
    pub fn new(k: u8, m: u8) -> Option<Code> {
        ((1..=MAX_K).contains(&k) && (1..=MAX_M).contains(&m)).then_some(Code { k, m })
    }

    /// Parity bytes per data byte (`m / k`).
    pub fn overhead(self) -> f64 {
        f64::from(self.m) / f64::from(self.k)
    }

    /// Parses `"k+m"` (as in the configuration: `"10+2"`).
    pub fn parse(s: &str) -> Option<Code> {
        let (k, m) = s.trim().split_once('+')?;
        Code::new(k.trim().parse().ok()?, m.trim().parse().ok()?)
    }

    /// The parity count of a block closed with `j` data packets: the same
    /// overhead as the full block, at least one.
    pub fn parity_for(self, j: u8) -> u8 {
        let m = (u32::from(self.m) * u32::from(j)).div_ceil(u32::from(self.k));
        m.clamp(1, u32::from(self.m)) as u8
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

/// Shard length for a block whose longest packet is `longest` bytes.
fn shard_len(longest: usize) -> usize {
    (longest + 2).next_multiple_of(2)
}

/// Writes `packet` as a shard of `len` bytes into `out` (cleared first).
fn fill_shard(out: &mut Vec<u8>, packet: &[u8], len: usize) {
    out.clear();
    out.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    out.extend_from_slice(packet);
    out.resize(len, 0);
}

/// The packet a shard holds, if its length field fits.
fn unshard(shard: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*shard.first()?, *shard.get(1)?]));
    shard.get(2..2 + len)
}

/// The sending half: groups one instance's numbered data packets into
/// blocks and computes their parity.
#[derive(Debug)]
pub struct Encoder {
    code: Code,
    hold: Duration,
    instance: u32,
    /// Copies of the open block's packets.
    block: Vec<Vec<u8>>,
    /// The open block's first number, and when it opened.
    first: u64,
    opened: Option<Instant>,
    spare: Vec<Vec<u8>>,
    parity_sent: u64,
    blocks: u64,
}

impl Encoder {
    /// An encoder for the packets numbered under `instance`.
    pub fn new(code: Code, hold: Duration, instance: u32) -> Encoder {
        Encoder {
            code,
            hold,
            instance,
            block: Vec::new(),
            first: 0,
            opened: None,
            spare: Vec::new(),
            parity_sent: 0,
            blocks: 0,
        }
    }

    /// The code in use.
    pub fn code(&self) -> Code {
        self.code
    }

    /// How long a block stays open at most.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Parity packets produced since start.
    pub fn parity_sent(&self) -> u64 {
        self.parity_sent
    }

    /// Blocks closed since start.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Changes the code; the open block is closed first (its parity is
    /// appended to `out`).
    pub fn set_code(&mut self, code: Code, out: &mut Vec<FecParity>) {
        if code != self.code {
            self.close(out);
            self.code = code;
        }
    }

    /// Shows the encoder a data packet about to be sent with number
    /// `sequence`. A packet too long for a shard, or a number that does not
    /// follow the open block's, closes the open block; the packet opens or
    /// joins a block (unless too long: it goes unprotected). Parity of any
    /// block that closed is appended to `out`, to be sent after the packet.
    pub fn push(&mut self, now: Instant, sequence: u64, packet: &[u8], out: &mut Vec<FecParity>) {
        // A block past its hold closes before this packet, even if the
        // lane's timer has not fired yet: its losses are not left waiting
        // for more packets.
        if self.deadline().is_some_and(|d| now >= d) {
            self.close(out);
        }
        let next = self.first.wrapping_add(self.block.len() as u64);
        if !self.block.is_empty() && (sequence != next || packet.len() > MAX_PACKET) {
            self.close(out);
        }
        if packet.len() > MAX_PACKET {
            return;
        }
        if self.block.is_empty() {
            self.first = sequence;
            self.opened = Some(now);
        }
        let mut copy = self.spare.pop().unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(packet);
        self.block.push(copy);
        if self.block.len() >= usize::from(self.code.k) {
            self.close(out);
        }
    }

    /// When the open block must close, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.hold)
    }

    /// Closes the open block if its time is up (parity appended to `out`).
    pub fn poll(&mut self, now: Instant, out: &mut Vec<FecParity>) {
        if self.deadline().is_some_and(|d| now >= d) {
            self.close(out);
        }
    }

    /// Closes the open block now, whatever its size.
    pub fn close(&mut self, out: &mut Vec<FecParity>) {
        self.opened = None;
        if self.block.is_empty() {
            return;
        }
        let k = self.block.len() as u8;
        let m = self.code.parity_for(k);
        let len = shard_len(self.block.iter().map(Vec::len).max().unwrap_or(0));
        let mut shards: Vec<Vec<u8>> = Vec::with_capacity(self.block.len());
        for p in &self.block {
            let mut s = Vec::with_capacity(len);
            fill_shard(&mut s, p, len);
            shards.push(s);
        }
        // k and m are within the crate's limits (k + m <= 96) and every
        // shard has the same even, non-zero length: encoding cannot fail;
        // if it did, the block simply goes without parity.
        if let Ok(parity) = reed_solomon_simd::encode(usize::from(k), usize::from(m), &shards) {
            for (index, shard) in parity.into_iter().enumerate() {
                out.push(FecParity {
                    instance: self.instance,
                    first: self.first,
                    k,
                    m,
                    index: index as u8,
                    shard,
                });
            }
            self.parity_sent += u64::from(m);
        }
        self.blocks += 1;
        self.spare.append(&mut self.block);
        self.spare.truncate(usize::from(MAX_K));
    }
}

/// A packet the decoder rebuilt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rebuilt {
    pub instance: u32,
    pub sequence: u64,
    pub packet: Vec<u8>,
    /// How long after the block's first parity it was rebuilt.
    pub waited: Duration,
}

/// Counters, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FecStats {
    /// Parity packets received and accepted.
    pub parity: u64,
    /// Data packets rebuilt from parity.
    pub recovered: u64,
    /// Missing data packets of blocks given up (not enough shards in time).
    /// Never decreases; those that came later after all are counted in
    /// `late_after_give_up` too ([`FecStats::lost`] is the difference).
    pub unrecoverable: u64,
    /// Parity packets dropped because they disagreed with themselves or
    /// their block, or came for a block already complete or given up.
    pub bad_parity: u64,
    /// Parity packets that were not needed (the block's data all came).
    pub unneeded: u64,
    /// Originals that arrived after their rebuilt copy.
    pub late_originals: u64,
    /// Packets counted unrecoverable that came after all (late, not lost).
    pub late_after_give_up: u64,
}

impl FecStats {
    /// Packets given up that never came: `unrecoverable` less the late.
    pub fn lost(&self) -> u64 {
        self.unrecoverable.saturating_sub(self.late_after_give_up)
    }
}

#[derive(Debug)]
struct Pending {
    k: u8,
    m: u8,
    shard_len: usize,
    /// Received parity shards, by index.
    parity: Vec<(u8, Vec<u8>)>,
    since: Instant,
}

#[derive(Debug)]
struct Stream {
    instance: u32,
    /// Copies of data packets by number, with their arrival time.
    kept: BTreeMap<u64, (Vec<u8>, Instant)>,
    /// Blocks waiting, by first number.
    pending: BTreeMap<u64, Pending>,
    /// Numbers rebuilt recently (to report the late original as such).
    rebuilt: VecDeque<u64>,
    /// Numbers given up recently (a late arrival is taken off the count).
    missing: VecDeque<u64>,
    /// Blocks finished (rebuilt, complete or given up) recently.
    done: VecDeque<u64>,
    last: Instant,
}

const REMEMBER: usize = 256;

/// The receiving half: one per peer (all its paths and lanes), or one per
/// receiving lane; see the module docs.
#[derive(Debug)]
pub struct Decoder {
    wait: Duration,
    streams: Vec<Stream>,
    kept: usize,
    kept_bytes: usize,
    pending: usize,
    stats: FecStats,
}

impl Decoder {
    /// A decoder that waits at most `wait` for a block's missing shards.
    pub fn new(wait: Duration) -> Decoder {
        Decoder {
            wait,
            streams: Vec::new(),
            kept: 0,
            kept_bytes: 0,
            pending: 0,
            stats: FecStats::default(),
        }
    }

    /// How long a block waits for its missing shards.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Counters since start.
    pub fn stats(&self) -> FecStats {
        self.stats
    }

    /// Data copies kept now (for tests and status).
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// Blocks waiting now.
    pub fn pending(&self) -> usize {
        self.pending
    }

    fn stream(&mut self, instance: u32, now: Instant) -> usize {
        if let Some(i) = self.streams.iter().position(|s| s.instance == instance) {
            self.streams[i].last = now;
            return i;
        }
        if self.streams.len() >= MAX_STREAMS {
            if let Some(old) = (0..self.streams.len()).min_by_key(|&i| self.streams[i].last) {
                let s = self.streams.swap_remove(old);
                self.forget(&s);
            }
        }
        self.streams.push(Stream {
            instance,
            kept: BTreeMap::new(),
            pending: BTreeMap::new(),
            rebuilt: VecDeque::new(),
            missing: VecDeque::new(),
            done: VecDeque::new(),
            last: now,
        });
        self.streams.len() - 1
    }

    fn forget(&mut self, s: &Stream) {
        self.kept -= s.kept.len();
        self.kept_bytes -= s.kept.values().map(|(p, _)| p.len()).sum::<usize>();
        self.pending -= s.pending.len();
    }

    /// Shows the decoder a data packet that arrived with number `sequence`
    /// of `instance`. Returns `false` when the packet was already rebuilt
    /// (drop this copy). Packets the arrival lets it rebuild are appended
    /// to `out`.
    pub fn on_data(
        &mut self,
        now: Instant,
        instance: u32,
        sequence: u64,
        packet: &[u8],
        out: &mut Vec<Rebuilt>,
    ) -> bool {
        let i = self.stream(instance, now);
        if self.streams[i].rebuilt.contains(&sequence) {
            self.stats.late_originals += 1;
            return false;
        }
        if let Some(at) = self.streams[i].missing.iter().position(|&q| q == sequence) {
            self.streams[i].missing.remove(at);
            self.stats.late_after_give_up += 1;
        }
        if packet.len() > MAX_PACKET || self.streams[i].kept.contains_key(&sequence) {
            return true;
        }
        self.make_room(packet.len());
        let s = &mut self.streams[i];
        s.kept.insert(sequence, (packet.to_vec(), now));
        self.kept += 1;
        self.kept_bytes += packet.len();
        // the pending block this number belongs to, if any
        let block = s
            .pending
            .range(..=sequence)
            .next_back()
            .filter(|(first, p)| sequence.wrapping_sub(**first) < u64::from(p.k))
            .map(|(first, _)| *first);
        if let Some(first) = block {
            self.try_block(i, first, now, out);
        }
        true
    }

    /// Shows the decoder a parity packet. Packets it lets the decoder
    /// rebuild are appended to `out`.
    pub fn on_parity(&mut self, now: Instant, parity: FecParity, out: &mut Vec<Rebuilt>) {
        let FecParity {
            instance,
            first,
            k,
            m,
            index,
            shard,
        } = parity;
        if Code::new(k, m).is_none()
            || index >= m
            || shard.len() < 2
            || shard.len() % 2 != 0
            || shard.len() > shard_len(MAX_PACKET)
            || first.checked_add(u64::from(k)).is_none()
        {
            self.stats.bad_parity += 1;
            return;
        }
        let i = self.stream(instance, now);
        let s = &mut self.streams[i];
        if s.done.contains(&first) {
            self.stats.unneeded += 1;
            return;
        }
        // a block overlapping another one with a different start is a lie
        // (or a restarted sender that kept its instance): drop it
        let overlaps = s
            .pending
            .range(..first.saturating_add(u64::from(k)))
            .next_back()
            .is_some_and(|(f, p)| *f != first && f.saturating_add(u64::from(p.k)) > first);
        if overlaps {
            self.stats.bad_parity += 1;
            return;
        }
        if let Some(p) = s.pending.get_mut(&first) {
            if p.k != k || p.m != m || p.shard_len != shard.len() {
                self.stats.bad_parity += 1;
                return;
            }
            if p.parity.iter().any(|(x, _)| *x == index) {
                self.stats.bad_parity += 1;
                return;
            }
            p.parity.push((index, shard));
        } else {
            if self.pending >= MAX_PENDING {
                self.give_up_oldest();
            }
            let s = &mut self.streams[i];
            s.pending.insert(
                first,
                Pending {
                    k,
                    m,
                    shard_len: shard.len(),
                    parity: vec![(index, shard)],
                    since: now,
                },
            );
            self.pending += 1;
        }
        self.stats.parity += 1;
        self.try_block(i, first, now, out);
    }

    /// When [`Decoder::poll`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        let give_up = self
            .streams
            .iter()
            .flat_map(|s| s.pending.values())
            .map(|p| p.since + self.wait)
            .min();
        let expire = self
            .streams
            .iter()
            .flat_map(|s| s.kept.values().next().map(|(_, t)| *t + KEEP_FOR))
            .min();
        match (give_up, expire) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Gives up the blocks whose wait is over and forgets old data copies.
    pub fn poll(&mut self, now: Instant) {
        for i in 0..self.streams.len() {
            let wait = self.wait;
            let over: Vec<u64> = self.streams[i]
                .pending
                .iter()
                .filter(|(_, p)| now >= p.since + wait)
                .map(|(f, _)| *f)
                .collect();
            for first in over {
                self.give_up(i, first);
            }
            let s = &mut self.streams[i];
            while let Some((&seq, (_, at))) = s.kept.iter().next() {
                if now < *at + KEEP_FOR {
                    break;
                }
                if let Some((p, _)) = s.kept.remove(&seq) {
                    self.kept -= 1;
                    self.kept_bytes -= p.len();
                }
            }
        }
    }

    fn give_up(&mut self, i: usize, first: u64) {
        let s = &mut self.streams[i];
        let Some(p) = s.pending.remove(&first) else {
            return;
        };
        self.pending -= 1;
        for j in 0..u64::from(p.k) {
            let q = first.wrapping_add(j);
            if !s.kept.contains_key(&q) {
                self.stats.unrecoverable += 1;
                remember(&mut s.missing, q);
            }
        }
        remember(&mut s.done, first);
    }

    fn give_up_oldest(&mut self) {
        let oldest = self
            .streams
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.pending.iter().map(move |(f, p)| (p.since, i, *f)))
            .min();
        if let Some((_, i, first)) = oldest {
            self.give_up(i, first);
        }
    }

    fn make_room(&mut self, len: usize) {
        while self.kept > 0 && (self.kept >= MAX_KEPT || self.kept_bytes + len > MAX_KEPT_BYTES) {
            // the oldest copy of all streams goes first
            let oldest = self
                .streams
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.kept.iter().next().map(|(q, (_, t))| (*t, i, *q)))
                .min();
            let Some((_, i, seq)) = oldest else {
                return;
            };
            if let Some((p, _)) = self.streams[i].kept.remove(&seq) {
                self.kept -= 1;
                self.kept_bytes -= p.len();
            }
        }
    }

    /// Rebuilds the block starting at `first` if it can, or drops its
    /// parity if its data all came.
    fn try_block(&mut self, i: usize, first: u64, now: Instant, out: &mut Vec<Rebuilt>) {
        let s = &mut self.streams[i];
        let Some(p) = s.pending.get(&first) else {
            return;
        };
        let k = u64::from(p.k);
        let present: Vec<u64> = (0..k)
            .filter(|j| s.kept.contains_key(&first.wrapping_add(*j)))
            .collect();
        if present.len() as u64 == k {
            if let Some(p) = s.pending.remove(&first) {
                self.pending -= 1;
                self.stats.unneeded += p.parity.len() as u64;
            }
            remember(&mut s.done, first);
            return;
        }
        if present.len() + p.parity.len() < usize::from(p.k) {
            return;
        }
        let Some(p) = s.pending.remove(&first) else {
            return;
        };
        self.pending -= 1;
        remember(&mut s.done, first);
        let mut originals = Vec::with_capacity(present.len());
        for j in &present {
            let Some((packet, _)) = s.kept.get(&first.wrapping_add(*j)) else {
                continue;
            };
            if packet.len() + 2 > p.shard_len {
                // a data packet longer than the block's shards: the parity
                // does not belong to these packets
                self.stats.bad_parity += p.parity.len() as u64;
                return;
            }
            let mut shard = Vec::with_capacity(p.shard_len);
            fill_shard(&mut shard, packet, p.shard_len);
            originals.push((*j as usize, shard));
        }
        let recovery = p.parity.iter().map(|(x, sh)| (usize::from(*x), sh));
        let restored = match reed_solomon_simd::decode(
            usize::from(p.k),
            usize::from(p.m),
            originals,
            recovery,
        ) {
            Ok(r) => r,
            Err(_) => {
                self.stats.bad_parity += p.parity.len() as u64;
                return;
            }
        };
        let missing = p.k as usize - present.len();
        let mut rebuilt = 0;
        for (j, shard) in restored {
            let sequence = first.wrapping_add(j as u64);
            if let Some(packet) = unshard(&shard) {
                out.push(Rebuilt {
                    instance: s.instance,
                    sequence,
                    packet: packet.to_vec(),
                    waited: now.saturating_duration_since(p.since),
                });
                remember(&mut s.rebuilt, sequence);
                rebuilt += 1;
            }
        }
        self.stats.recovered += rebuilt;
        self.stats.unrecoverable += (missing as u64).saturating_sub(rebuilt);
    }
}

fn remember(q: &mut VecDeque<u64>, v: u64) {
    if q.len() >= REMEMBER {
        q.pop_front();
    }
    q.push_back(v);
}

/// The probability that a packet is lost for good under `code` when each
/// packet (data or parity) is lost independently with probability `loss`:
/// it is lost, and more than `m - 1` of the block's other `k + m - 1`
/// packets are lost too.
pub fn residual_loss(code: Code, loss: f64) -> f64 {
    let p = loss.clamp(0.0, 1.0);
    let n = u32::from(code.k) + u32::from(code.m) - 1;
    // P(X >= m) for X ~ Binomial(n, p)
    let mut below = 0.0;
    let mut term = (1.0 - p).powi(n as i32); // P(X = 0)
    for x in 0..u32::from(code.m) {
        below += term;
        // P(X = x + 1) from P(X = x)
        if p < 1.0 {
            term *= f64::from(n - x) / f64::from(x + 1) * p / (1.0 - p);
        } else {
            term = 0.0;
        }
    }
    p * (1.0 - below).max(0.0)
}

/// Block sizes auto mode considers, largest first (a larger block reaches
/// a given residual loss with less overhead, but waits longer to close at
/// low rates; [`Encoder::hold`] bounds that wait).
pub const AUTO_K: [u8; 3] = [20, 10, 5];

/// What auto mode sends, given the measured loss of the peer's paths: no
/// code while the loss is at or below `target` or looks like congestion;
/// otherwise the code of least overhead, at most `max_overhead`, whose
/// [`residual_loss`] is at most `target`; if none reaches it, the one of
/// least residual loss within the cap (if the cap allows any parity).
pub fn auto_code(loss: f64, congested: bool, target: f64, max_overhead: f64) -> Option<Code> {
    if congested || loss.is_nan() || loss <= target {
        return None;
    }
    let mut best_ok: Option<Code> = None;
    let mut best_any: Option<(f64, Code)> = None;
    for k in AUTO_K {
        for m in 1..=MAX_M.min(k) {
            let Some(code) = Code::new(k, m) else {
                continue;
            };
            if code.overhead() > max_overhead + 1e-9 {
                break;
            }
            let r = residual_loss(code, loss);
            if r <= target && best_ok.is_none_or(|b| code.overhead() < b.overhead()) {
                best_ok = Some(code);
            }
            if best_any.is_none_or(|(br, _)| r < br) {
                best_any = Some((r, code));
            }
        }
    }
    best_ok.or(best_any.map(|(_, c)| c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seq as usize * 31 + i * 7) as u8)
            .collect()
    }

    fn encode_block(enc: &mut Encoder, t: Instant, seqs: std::ops::Range<u64>) -> Vec<FecParity> {
        let mut out = Vec::new();
        for s in seqs {
            enc.push(t, s, &packet(s, 40 + (s as usize % 5) * 100), &mut out);
        }
        out
    }

    #[test]
    fn code_parses_and_scales() {
        assert_eq!(Code::parse("10+2"), Some(Code { k: 10, m: 2 }));
        assert_eq!(Code::parse(" 4 + 1 "), Some(Code { k: 4, m: 1 }));
        for bad in ["10", "0+1", "10+0", "65+1", "10+33", "a+b", "+", "10+2+1"] {
            assert_eq!(Code::parse(bad), None, "{bad}");
        }
        let c = Code { k: 10, m: 2 };
        assert_eq!(c.parity_for(10), 2);
        assert_eq!(c.parity_for(5), 1);
        assert_eq!(c.parity_for(1), 1);
        assert_eq!(c.parity_for(6), 2);
        assert_eq!(c.to_string(), "10+2");
    }

    #[test]
    fn block_closes_after_k_and_rebuilds_any_m_losses() {
        let t = Instant::now();
        let code = Code::new(6, 2).unwrap();
        let mut enc = Encoder::new(code, DEFAULT_HOLD, 7);
        let parity = encode_block(&mut enc, t, 100..106);
        assert_eq!(parity.len(), 2);
        assert!(enc.deadline().is_none(), "a full block closes at once");
        assert!(parity
            .iter()
            .all(|p| p.first == 100 && p.k == 6 && p.m == 2));
        // every pair of lost data packets is rebuilt
        for a in 100..106u64 {
            for b in a + 1..106 {
                let mut dec = Decoder::new(DEFAULT_WAIT);
                let mut out = Vec::new();
                for s in 100..106 {
                    if s != a && s != b {
                        assert!(dec.on_data(
                            t,
                            7,
                            s,
                            &packet(s, 40 + (s as usize % 5) * 100),
                            &mut out
                        ));
                    }
                }
                for p in parity.clone() {
                    dec.on_parity(t, p, &mut out);
                }
                let mut got: Vec<_> = out.iter().map(|r| (r.sequence, r.packet.clone())).collect();
                got.sort();
                let want: Vec<_> = [a, b]
                    .iter()
                    .map(|&s| (s, packet(s, 40 + (s as usize % 5) * 100)))
                    .collect();
                assert_eq!(got, want);
                assert_eq!(dec.stats().recovered, 2);
                assert_eq!(dec.pending(), 0);
            }
        }
    }

    #[test]
    fn data_after_parity_completes_the_block() {
        let t = Instant::now();
        let mut enc = Encoder::new(Code::new(4, 1).unwrap(), DEFAULT_HOLD, 1);
        let parity = encode_block(&mut enc, t, 0..4);
        let mut dec = Decoder::new(DEFAULT_WAIT);
        let mut out = Vec::new();
        // parity first (it overtook the data on another path), then 0, 1, 3
        dec.on_parity(t, parity[0].clone(), &mut out);
        assert_eq!(dec.pending(), 1);
        for s in [0u64, 1, 3] {
            dec.on_data(
                t + Duration::from_millis(s),
                1,
                s,
                &packet(s, 40 + s as usize % 5 * 100),
                &mut out,
            );
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].sequence, 2);
        assert_eq!(out[0].packet, packet(2, 240));
        assert_eq!(out[0].waited, Duration::from_millis(3));
        // the original arriving after its rebuilt copy is a duplicate
        assert!(!dec.on_data(t, 1, 2, &packet(2, 240), &mut out));
        assert_eq!(dec.stats().late_originals, 1);
    }

    /// A block whose hold passed closes when the next packet comes, before
    /// the lane's timer does: the packet opens the next block.
    #[test]
    fn an_overdue_block_closes_at_the_next_packet() {
        let t = Instant::now();
        let mut enc = Encoder::new(Code::new(20, 2).unwrap(), DEFAULT_HOLD, 1);
        let mut out = Vec::new();
        for s in 0..3u64 {
            enc.push(t + Duration::from_millis(s), s, &packet(s, 100), &mut out);
        }
        assert!(out.is_empty());
        enc.push(t + DEFAULT_HOLD, 3, &packet(3, 100), &mut out);
        assert!(!out.is_empty(), "the first block's parity");
        assert!(out.iter().all(|p| p.first == 0 && p.k == 3), "{out:?}");
        assert_eq!(enc.blocks(), 1);
        assert_eq!(enc.deadline(), Some(t + DEFAULT_HOLD + DEFAULT_HOLD));
    }

    #[test]
    fn block_with_all_data_drops_its_parity() {
        let t = Instant::now();
        let mut enc = Encoder::new(Code::new(4, 2).unwrap(), DEFAULT_HOLD, 1);
        let parity = encode_block(&mut enc, t, 0..4);
        let mut dec = Decoder::new(DEFAULT_WAIT);
        let mut out = Vec::new();
        for s in 0..4 {
            dec.on_data(t, 1, s, &packet(s, 40 + s as usize % 5 * 100), &mut out);
        }
        for p in parity {
            dec.on_parity(t, p, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(dec.pending(), 0);
        assert_eq!(dec.stats().unneeded, 2);
        assert_eq!(dec.stats().recovered, 0);
    }

    #[test]
    fn too_many_losses_are_given_up_after_the_wait() {
        let t = Instant::now();
        let mut enc = Encoder::new(Code::new(5, 1).unwrap(), DEFAULT_HOLD, 1);
        let parity = encode_block(&mut enc, t, 10..15);
        let mut dec = Decoder::new(Duration::from_millis(20));
        let mut out = Vec::new();
        for s in [10u64, 11, 14] {
            dec.on_data(t, 1, s, &packet(s, 40 + s as usize % 5 * 100), &mut out);
        }
        dec.on_parity(t, parity[0].clone(), &mut out);
        assert!(out.is_empty());
        assert_eq!(dec.deadline(), Some(t + Duration::from_millis(20)));
        dec.poll(t + Duration::from_millis(19));
        assert_eq!(dec.pending(), 1);
        dec.poll(t + Duration::from_millis(20));
        assert_eq!(dec.pending(), 0);
        assert_eq!(dec.stats().unrecoverable, 2);
        // a late data packet of that block is rebuilt from nothing, but it
        // was late, not lost: counted as such
        dec.on_data(
            t + Duration::from_millis(21),
            1,
            12,
            &packet(12, 240),
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(dec.stats().unrecoverable, 2, "counters never go back");
        assert_eq!(dec.stats().late_after_give_up, 1);
        assert_eq!(dec.stats().lost(), 1);
        // nor does late parity
        dec.on_parity(t + Duration::from_millis(21), parity[0].clone(), &mut out);
        assert!(out.is_empty());
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn a_slow_stream_closes_short_blocks_on_time() {
        let t = Instant::now();
        let mut enc = Encoder::new(Code::new(10, 2).unwrap(), Duration::from_millis(5), 3);
        let mut out = Vec::new();
        enc.push(t, 1, &packet(1, 100), &mut out);
        enc.push(t + Duration::from_millis(1), 2, &packet(2, 1400), &mut out);
        enc.push(t + Duration::from_millis(2), 3, &packet(3, 60), &mut out);
        assert!(out.is_empty());
        assert_eq!(enc.deadline(), Some(t + Duration::from_millis(5)));
        enc.poll(t + Duration::from_millis(4), &mut out);
        assert!(out.is_empty());
        enc.poll(t + Duration::from_millis(5), &mut out);
        assert_eq!(out.len(), 1, "3 of 10 packets: one parity");
        assert_eq!((out[0].k, out[0].m, out[0].first), (3, 1, 1));
        assert_eq!(out[0].shard.len(), 1402, "longest packet plus its length");
        // the longest packet is rebuilt from the short ones and the parity
        let mut dec = Decoder::new(DEFAULT_WAIT);
        let mut got = Vec::new();
        dec.on_data(t, 3, 1, &packet(1, 100), &mut got);
        dec.on_data(t, 3, 3, &packet(3, 60), &mut got);
        dec.on_parity(t, out[0].clone(), &mut got);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].packet, packet(2, 1400));
    }

    #[test]
    fn a_gap_in_the_numbers_closes_the_block() {
        let t = Instant::now();
        let mut enc = Encoder::new(Code::new(10, 2).unwrap(), DEFAULT_HOLD, 3);
        let mut out = Vec::new();
        enc.push(t, 1, &packet(1, 100), &mut out);
        enc.push(t, 2, &packet(2, 100), &mut out);
        enc.push(t, 5, &packet(5, 100), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].first, out[0].k), (1, 2));
        enc.close(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[1].first, out[1].k), (5, 1));
        assert_eq!(enc.blocks(), 2);
    }

    #[test]
    fn lying_parity_is_dropped_and_counted() {
        let t = Instant::now();
        let mut enc = Encoder::new(Code::new(4, 2).unwrap(), DEFAULT_HOLD, 1);
        let parity = encode_block(&mut enc, t, 0..4);
        let mut dec = Decoder::new(DEFAULT_WAIT);
        let mut out = Vec::new();
        let mut bad = parity[0].clone();
        bad.index = 2; // index >= m
        dec.on_parity(t, bad, &mut out);
        let mut bad = parity[0].clone();
        bad.shard.pop(); // odd length
        dec.on_parity(t, bad, &mut out);
        let mut bad = parity[0].clone();
        bad.first = u64::MAX - 1; // block past the end of the numbers
        dec.on_parity(t, bad, &mut out);
        assert_eq!(dec.stats().bad_parity, 3);
        assert_eq!(dec.pending(), 0);
        // good parity, then a copy of it, then one disagreeing on m
        dec.on_parity(t, parity[0].clone(), &mut out);
        dec.on_parity(t, parity[0].clone(), &mut out);
        let mut bad = parity[1].clone();
        bad.m = 3;
        dec.on_parity(t, bad, &mut out);
        assert_eq!(dec.stats().bad_parity, 5);
        // an overlapping block with another start
        let mut bad = parity[1].clone();
        bad.first = 2;
        dec.on_parity(t, bad, &mut out);
        assert_eq!(dec.stats().bad_parity, 6);
        assert_eq!(dec.pending(), 1);
        // a data packet longer than the shards: no rebuild, no panic
        for s in 0..3 {
            dec.on_data(t, 1, s, &[0u8; 1000], &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let t = Instant::now();
        let mut dec = Decoder::new(DEFAULT_WAIT);
        let mut out = Vec::new();
        for s in 0..(MAX_KEPT as u64 * 2) {
            dec.on_data(t, (s % 40) as u32, s, &[1u8; 100], &mut out);
        }
        assert!(dec.kept() <= MAX_KEPT);
        for s in 0..(MAX_PENDING as u64 * 2) {
            let p = FecParity {
                instance: 9,
                first: 1_000_000 + s * 10,
                k: 10,
                m: 1,
                index: 0,
                shard: vec![0; 64],
            };
            dec.on_parity(t, p, &mut out);
        }
        assert_eq!(dec.pending(), MAX_PENDING);
        assert_eq!(dec.stats().unrecoverable, MAX_PENDING as u64 * 10);
        dec.poll(t + KEEP_FOR + DEFAULT_WAIT);
        assert_eq!((dec.kept(), dec.pending()), (0, 0));
        assert_eq!(dec.deadline(), None);
    }

    #[test]
    fn residual_loss_matches_the_binomial() {
        // one parity per block of one: lost only if both copies are
        let r = residual_loss(Code::new(1, 1).unwrap(), 0.1);
        assert!((r - 0.01).abs() < 1e-12, "{r}");
        // 2+1 at p: lost and one of the two others lost: p(1-(1-p)^2)
        let p: f64 = 0.05;
        let r = residual_loss(Code::new(2, 1).unwrap(), p);
        assert!((r - p * (1.0 - (1.0 - p).powi(2))).abs() < 1e-12, "{r}");
        assert_eq!(residual_loss(Code::new(10, 2).unwrap(), 0.0), 0.0);
    }

    #[test]
    fn auto_follows_the_loss_within_the_cap() {
        let target = 0.001;
        assert_eq!(auto_code(0.0, false, target, 0.3), None);
        assert_eq!(auto_code(0.0005, false, target, 0.3), None);
        assert_eq!(auto_code(0.05, true, target, 0.3), None, "congestion");
        let mut last = 0.0;
        for loss in [0.005, 0.01, 0.02, 0.05, 0.1] {
            let c = auto_code(loss, false, target, 0.3).unwrap();
            assert!(c.overhead() <= 0.3 + 1e-9, "{loss}: {c}");
            assert!(c.overhead() >= last, "{loss}: {c} cheaper than before");
            last = c.overhead();
            if loss <= 0.05 {
                assert!(residual_loss(c, loss) <= target, "{loss}: {c}");
            }
        }
        assert!(
            auto_code(0.5, false, target, 0.01).is_none(),
            "cap below one parity per block"
        );
    }
}
