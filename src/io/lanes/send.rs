//! The sending half of a lane ([`TunOut`]): reads the lane's TUN queue
//! (super-packets on a TUN with offloads, [`TunReader`]), places each packet
//! on its flow's path, cuts super-packets into segments, frames them behind
//! the overlay header (sealed for a keyed peer) and sends each path's burst
//! with one `sendmmsg`, runs of equal-sized datagrams as UDP GSO messages.

use super::*;

/// Send errors on one path are reported to the BFD thread at most this often.
pub const SEND_ERROR_REPORT_INTERVAL: Duration = Duration::from_millis(5);
/// Packets a sending thread reads from a plain TUN and sends per turn.
pub(super) const TX_BATCH: usize = 16;
/// Slots of a sending thread on a TUN with offloads (a burst of
/// super-packets cut at a small MSS can make more; see
/// [`TunOut::cut_and_stage`]).
pub(super) const TX_SEGMENTS: usize = 256;
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
    /// The outer DSCP of its data datagrams; `None`: the inner packet's.
    pub dscp: Option<u8>,
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
    /// The peer's paths (a few: found by a look along the list).
    pub paths: Vec<PathOut>,
    pub drops: Arc<DropCounters>,
    pub flows: FlowTable,
    /// Where send errors are reported.
    pub commands: CommandLink,
    /// `duplicate`: this sender's instance number and the peer's last
    /// sequence (shared by the peer's lanes).
    pub instance: u32,
    pub peer_sequence: Arc<AtomicU64>,
    /// `aggregate`: where each packet goes, and this lane's last number
    /// (its stream's instance number is `instance + lane`).
    pub scheduler: Scheduler,
    pub lane_sequence: u64,
    pub keys: SharedKeys,
    /// This run's epoch (see [`crate::core::crypto`]).
    pub epoch: u32,
    /// Forward error correction, while the peer's snapshot names a code:
    /// the lane's encoder (its stream is the lane's numbering, as under
    /// `aggregate`), the parity waiting to be sent, the path of the last
    /// data packet (parity goes on another one when there is one) and the
    /// peer's counters.
    pub fec: Option<Encoder>,
    pub fec_out: Vec<FecParity>,
    pub fec_last_path: Option<PathId>,
    pub fec_counters: Arc<ReorderCounters>,
    /// Datagrams waiting for their paced path's time (`aggregate` with a
    /// configured `rate`).
    pub paced: Paced,
    /// After an upgrade, in the new process: until when the old process
    /// still sends what it held for each paced path. Applied to the
    /// peer's board ([`Board::defer_pace`](crate::core::aggregate::Board::defer_pace)) by the first packet placed.
    pub pace_after: Vec<(PathId, Instant)>,
    /// Most datagrams per UDP GSO send: `GSO_MAX_SEGMENTS` (64), or 1 under
    /// FEC: a train is dropped whole inside the sending host (a full
    /// queue, a filter that sees it before it is cut), a burst that a
    /// short block's parity cannot repair.
    pub gso_cap: usize,
}

/// One framed datagram of a burst, waiting to be sent: `range` of slot
/// `slot` (overlay header, inner packet or its headers), then, when the
/// payload was left where it was read, `body` of super-packet `body.0`.
pub(super) struct Pending {
    pub(super) path: PathId,
    pub(super) slot: usize,
    pub(super) range: Range<usize>,
    pub(super) body: Option<(usize, Range<usize>)>,
    pub(super) inner_len: usize,
    /// The outer TOS / traffic class byte ([`outer_tos`]).
    pub(super) tos: u8,
    /// When its paced path may take it (`None`: now).
    pub(super) due: Option<Instant>,
}

/// A packet of a burst as it goes to [`TunOut::stage`]: what is already in
/// its slot at [`HEADROOM`] (`in_slot` bytes: the whole packet, or the
/// headers of a segment) and, for a segment, where its payload lies.
pub(super) struct Staged {
    pub(super) slot: usize,
    pub(super) in_slot: usize,
    pub(super) body: Option<(usize, Range<usize>)>,
    /// Its transport checksum is known to be good ([`Read`]).
    pub(super) checksum_ok: bool,
    /// When its paced path may take it (`None`: now).
    pub(super) due: Option<Instant>,
}

/// What a lane's sending half works with between turns: buffers allocated
/// once.
pub(super) struct TxState {
    pub(super) reader: TunReader,
    /// A second copy (duplicate policy) of a sealed packet is sealed
    /// from this plaintext copy.
    pub(super) spare: Vec<u8>,
    pub(super) pending: Vec<Pending>,
    pub(super) batch: sys::SendBatch,
    /// A parity datagram being framed.
    pub(super) parity: Vec<u8>,
}

impl TunOut {
    fn path(&self, id: PathId) -> Option<&PathOut> {
        self.paths.iter().find(|p| p.id == id)
    }

    /// Allocates the buffers of the sending half and says which offloads it
    /// uses.
    pub(super) fn start(&self) -> TxState {
        let reader = TunReader::new(&self.tun);
        let gso = udp_gso_wanted()
            && self
                .paths
                .iter()
                .all(|p| sys::udp_gso_supported(p.socket.as_ref()));
        info!(
            thread = std::thread::current().name().unwrap_or(""),
            lane = self.lane,
            tun_offloads = reader.offload,
            udp_gso = gso,
            "sending from the TUN"
        );
        TxState {
            parity: Vec::new(),
            spare: vec![0u8; reader.slot_len],
            pending: Vec::with_capacity(reader.slots.len()),
            batch: sys::SendBatch::new(gso),
            reader,
        }
    }

    /// Takes whatever the TUN queue holds ([`TunReader::fill`]), frames it
    /// all and sends each path's run of datagrams together
    /// ([`Self::transmit`]). Only a failing device is an error.
    pub(super) fn turn(&mut self, tx: &mut TxState) -> io::Result<usize> {
        let TxState {
            reader,
            spare,
            pending,
            batch,
            parity,
        } = tx;
        let count = reader.fill(&self.tun, &self.drops)?;
        if count == 0 {
            return Ok(0);
        }
        let now = clock::now();
        let forwarding = self.forwarding.load_full();
        let peer = forwarding.peers.get(usize::from(self.peer.0));
        let duplicate = peer.is_some_and(|p| p.policy == Policy::Duplicate);
        let fec = peer.and_then(|p| p.fec).filter(|_| !duplicate);
        self.set_fec(fec, now);
        self.gso_cap = fec.map_or(GSO_MAX_SEGMENTS, |_| 1);
        let turn = Turn {
            duplicate,
            aggregate: peer.is_some_and(|p| p.policy == Policy::Aggregate),
            fec: fec.is_some(),
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
                    let inner = reader
                        .slots
                        .get(slot)
                        .and_then(|b| b.get(HEADROOM..HEADROOM + len));
                    let Some((placement, due)) = self.place(&turn, inner.unwrap_or_default(), 1)
                    else {
                        continue;
                    };
                    let staged = Staged {
                        slot,
                        in_slot: len,
                        body: None,
                        checksum_ok,
                        due,
                    };
                    self.stage(reader, staged, &placement, &turn, spare, pending, batch);
                }
                None => break,
            }
        }
        self.flush(pending, reader, batch, now);
        self.send_parity(&turn, parity, batch);
        Ok(count)
    }

    /// Follows the snapshot's code: a new encoder, a changed code (the
    /// open block closes with the old one) or none (the open block closes).
    fn set_fec(&mut self, code: Option<Code>, now: Instant) {
        match (code, self.fec.as_mut()) {
            (Some(code), Some(enc)) => enc.set_code(code, &mut self.fec_out),
            (Some(code), None) => {
                let instance = self.instance.wrapping_add(self.lane as u32);
                self.fec = Some(Encoder::new(code, DEFAULT_HOLD, instance));
            }
            (None, Some(enc)) => {
                enc.close(&mut self.fec_out);
                self.fec = None;
            }
            (None, None) => {}
        }
        let _ = now;
    }

    /// When the open FEC block must close, if one is open.
    pub(super) fn fec_deadline(&self) -> Option<Instant> {
        self.fec.as_ref().and_then(Encoder::deadline)
    }

    /// Closes the open FEC block if its time is up, and sends its parity.
    pub(super) fn fec_tick(&mut self, tx: &mut TxState, now: Instant) {
        if let Some(enc) = self.fec.as_mut() {
            enc.poll(now, &mut self.fec_out);
        }
        if self.fec_out.is_empty() {
            return;
        }
        let turn = Turn {
            duplicate: false,
            aggregate: false,
            fec: true,
            forwarding: self.forwarding.load_full(),
            keys: self.keys.load_full(),
            now,
        };
        self.send_parity(&turn, &mut tx.parity, &mut tx.batch);
    }

    /// Frames and sends the parity waiting in `fec_out`, each on the best
    /// path other than the last data packet's (the same one when it is
    /// the only one), numbered and sealed as data are.
    fn send_parity(&mut self, turn: &Turn, buf: &mut Vec<u8>, batch: &mut sys::SendBatch) {
        if self.fec_out.is_empty() {
            return;
        }
        // Allocated at the first parity: a lane that never codes keeps
        // none (memory per peer).
        if buf.len() < BUF_LEN {
            buf.resize(BUF_LEN, 0);
        }
        let sel = turn.forwarding.peers.get(usize::from(self.peer.0));
        let ordered = sel.is_some_and(|s| s.policy == Policy::Aggregate);
        let last = self.fec_last_path;
        let path = sel.and_then(|s| {
            s.eligible
                .iter()
                .map(|&(id, _)| id)
                .find(|id| Some(*id) != last)
                .or(last)
        });
        let parities = std::mem::take(&mut self.fec_out);
        let Some(id) = path else {
            return;
        };
        let keys = turn.keys.as_deref();
        for p in &parities {
            let Some(out) = self.path(id) else {
                self.drops.count(DropReason::NoPath);
                continue;
            };
            let sequence = out.sequence.fetch_add(1, Ordering::Relaxed) + 1;
            let sealer = keys.map(|keys| Sealer {
                keys,
                epoch: self.epoch,
                salt: out.salt,
            });
            let tos = outer_tos(&[], out.dscp);
            match emit_parity(p, sequence, self.lane, ordered, buf, sealer.as_ref()) {
                Ok(n) => {
                    let d = [sys::Datagram {
                        head: buf.get(..n).unwrap_or_default(),
                        body: &[],
                        tos,
                    }];
                    self.transmit(id, &d, &[p.shard.len()], false, batch, turn.now);
                    self.fec_counters
                        .fec
                        .parity_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(reason) => self.drops.count(reason),
            }
        }
        self.fec_out = parities;
        self.fec_out.clear();
    }

    /// Where the flow of `inner` (sent as `datagrams` datagrams) goes,
    /// and when its paced path takes it (counted and `None` if nowhere).
    fn place(
        &mut self,
        turn: &Turn,
        inner: &[u8],
        datagrams: usize,
    ) -> Option<(Placement, Option<Instant>)> {
        let selection = turn.forwarding.peers.get(usize::from(self.peer.0))?;
        match classify(selection, inner) {
            Ok(mut p) => {
                let mut due = None;
                if let Some((board, paths)) = selection.spread() {
                    for (id, until) in self.pace_after.drain(..) {
                        board.defer_pace(id, until, turn.now);
                    }
                    // `aggregate`: this packet (a super-packet: all of it)
                    // goes where it arrives first.
                    match self
                        .scheduler
                        .pick(board, paths, inner.len(), datagrams, turn.now)
                    {
                        Some(Pick::Now(path)) => p.path = path,
                        Some(Pick::At(path, at)) => (p.path, due) = (path, Some(at)),
                        Some(Pick::Full) => {
                            self.drops.count(DropReason::PaceQueue);
                            return None;
                        }
                        None => {}
                    }
                }
                self.flows.touch(p.flow_hash, p.path, turn.now);
                Some((p, due))
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
        let count = match cut {
            Cut::Segments(segments) => segments.count(),
            _ => 1,
        };
        let Some((placement, due)) = self.place(turn, packet, count) else {
            return;
        };
        // Sealing works in place, a copy is sealed from the plaintext and
        // the FEC encoder keeps a copy: all need the whole packet in a slot.
        let inline = turn.keys.is_some() || placement.copy.is_some() || turn.fec;
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
            let staged = Staged { due, ..staged };
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
        } else if turn.aggregate || turn.fec {
            self.lane_sequence = self.lane_sequence.wrapping_add(1);
            header = header.with_peer_seq(PeerSeq {
                instance: self.instance.wrapping_add(self.lane as u32),
                sequence: self.lane_sequence,
            });
            if turn.aggregate {
                header = header.ordered();
            }
            if turn.fec {
                header = header.fec();
            }
        }
        let body_len = staged.body.as_ref().map_or(0, |(_, r)| r.len());
        let inner_len = staged.in_slot + body_len;
        let Some(buf) = reader.slots.get_mut(staged.slot) else {
            return;
        };
        // The inner packet's headers are in the slot (read before sealing).
        let inner = buf
            .get(HEADROOM..HEADROOM + staged.in_slot)
            .unwrap_or_default();
        if let (true, Some(enc)) = (turn.fec && staged.body.is_none(), self.fec.as_mut()) {
            // the whole packet is in the slot (staged inline for FEC)
            enc.push(turn.now, self.lane_sequence, inner, &mut self.fec_out);
            self.fec_last_path = Some(placement.path);
        }
        let tos_on = |id: PathId| {
            let dscp = self.path(id).and_then(|p| p.dscp);
            outer_tos(inner, dscp)
        };
        let tos = tos_on(placement.path);
        let copy_tos = placement.copy.map(tos_on);
        if let Some(copy) = placement.copy {
            // Staged inline (see cut_and_stage): the whole packet is in the slot.
            let whole = HEADROOM + staged.in_slot;
            if let (Some(to), Some(from)) = (spare.get_mut(..whole), buf.get(..whole)) {
                to.copy_from_slice(from);
                if let Some(range) = self.frame(copy, spare, staged.in_slot, header, keys) {
                    let d = [sys::Datagram {
                        head: spare.get(range).unwrap_or_default(),
                        body: &[],
                        tos: copy_tos.unwrap_or(tos),
                    }];
                    self.transmit(copy, &d, &[inner_len], true, batch, turn.now);
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
                tos,
                due: staged.due,
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
        let Some(path) = self.paths.iter_mut().find(|p| p.id == id) else {
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
            Ok(range) if range.end <= buf.len() => {
                // numbered, not sent: until `transmit`
                path.counters.tx_unsent.fetch_add(1, Ordering::Relaxed);
                Some(range)
            }
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
    /// (a flow keeps one path, so its packets keep their order); what a
    /// paced path takes later is held ([`Paced`]), behind what it already
    /// holds.
    fn flush(
        &mut self,
        pending: &mut Vec<Pending>,
        reader: &TunReader,
        batch: &mut sys::SendBatch,
        now: Instant,
    ) {
        self.release(batch, now);
        if pending.iter().any(|p| p.due.is_some()) {
            self.hold_later(pending, reader, now);
        }
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
                    tos: p.tos,
                };
                lens[k] = p.inner_len;
            }
            self.transmit(path, &datagrams[..run], &lens[..run], true, batch, now);
            start += run;
        }
        pending.clear();
    }

    /// Moves the datagrams of `pending` that their paced path takes later
    /// into [`Self::paced`] (a copy: the reader's slots are reused).
    fn hold_later(&mut self, pending: &mut Vec<Pending>, reader: &TunReader, now: Instant) {
        let by = now + pace::PACE_SLACK;
        let mut full = 0u64;
        pending.retain(|p| {
            let Some(due) = p.due.filter(|d| *d > by) else {
                return true;
            };
            let head = reader
                .slots
                .get(p.slot)
                .and_then(|b| b.get(p.range.clone()));
            let body = p
                .body
                .as_ref()
                .and_then(|(s, r)| reader.packet(*s)?.get(r.clone()));
            let data = (head.unwrap_or_default(), body.unwrap_or_default());
            if !self.paced.hold(p.path, due, data, p.inner_len, p.tos) {
                full += 1;
                if let Some(path) = self.paths.iter().find(|o| o.id == p.path) {
                    path.counters.tx_unsent.fetch_sub(1, Ordering::Relaxed);
                }
            }
            false
        });
        for _ in 0..full {
            self.drops.count(DropReason::PaceQueue);
        }
    }

    /// Sends what [`Self::paced`] holds that is due by `now`.
    fn release(&mut self, batch: &mut sys::SendBatch, now: Instant) {
        if self.paced.is_empty() {
            return;
        }
        let mut paced = std::mem::take(&mut self.paced);
        paced.release(now, |id, datagrams, lens| {
            self.transmit(id, datagrams, lens, true, batch, now);
        });
        self.paced = paced;
    }

    /// Per path, when the last datagram held for it is due (see
    /// [`Self::pace_after`]).
    pub fn pace_backlog(&self) -> impl Iterator<Item = (PathId, Instant)> + '_ {
        self.paced.backlog()
    }

    /// Sends what is held for the paced paths, each datagram at its time,
    /// with `batch`; returns when the next one is due (`None`: nothing is
    /// left). For a lane no worker runs: the process an upgrade replaced
    /// sends what its parked lanes held before it exits.
    pub fn send_held(&mut self, batch: &mut sys::SendBatch, now: Instant) -> Option<Instant> {
        self.release(batch, now);
        self.paced.next_due()
    }

    /// When the first held datagram is due.
    pub(super) fn pace_deadline(&self) -> Option<Instant> {
        self.paced.next_due()
    }

    /// Sends the held datagrams due by `now`.
    pub(super) fn pace_tick(&mut self, tx: &mut TxState, now: Instant) {
        self.release(&mut tx.batch, now);
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
        framed: bool,
        batch: &mut sys::SendBatch,
        now: Instant,
    ) {
        let Some(path) = self.paths.iter_mut().find(|p| p.id == id) else {
            return;
        };
        // The plan's vector is kept in the batch between calls.
        let mut messages = std::mem::take(&mut batch.plan);
        // What the path's socket sends without a TOS control message
        // ([`crate::io::udp::set_data_qos`]).
        batch.default_tos = path.dscp.map_or(0, |d| (d & 0x3f) << 2);
        plan_messages(datagrams, batch.gso, self.gso_cap, &mut messages);
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
        if framed {
            // sent, or dropped and counted: no longer waiting
            path.counters
                .tx_unsent
                .fetch_sub(datagrams.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Groups `datagrams` into the messages of one `sendmmsg`: with `gso`,
/// each run [`gso_run`] finds (at most `cap` datagrams) becomes one UDP GSO
/// message; everything
/// else is a message of one datagram.
pub(super) fn plan_messages(
    datagrams: &[sys::Datagram<'_>],
    gso: bool,
    cap: usize,
    out: &mut Vec<sys::Message>,
) {
    out.clear();
    let mut first = 0;
    while let Some(rest) = datagrams.get(first..).filter(|r| !r.is_empty()) {
        let run = if gso { gso_run(rest, cap) } else { 0 };
        let message = match run {
            2.. => sys::Message {
                first,
                count: run,
                segment: rest.first().map(|d| d.len() as u16),
                tos: rest.first().map_or(0, |d| d.tos),
            },
            _ => sys::Message {
                first,
                count: 1,
                segment: None,
                tos: rest.first().map_or(0, |d| d.tos),
            },
        };
        out.push(message);
        first += message.count;
    }
}

/// Replaces the `count` messages from `at` on by one plain message per
/// datagram.
pub(super) fn split_plainly(messages: &mut Vec<sys::Message>, at: usize, count: usize) {
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
                tos: m.tos,
            })
        })
        .collect();
    messages.splice(at..end, plain);
}

/// Most bytes one UDP GSO send carries (the IP length field's limit, with
/// room for the headers).
pub(super) const GSO_MAX_BYTES: usize = 65_000;
/// Most datagrams one UDP GSO send carries (the kernel's `UDP_MAX_SEGMENTS`
/// was 64 before Linux 6.9).
pub(super) const GSO_MAX_SEGMENTS: usize = 64;
/// Datagrams handed to one [`TunOut::transmit`] call: a whole burst, so
/// that no UDP GSO run is cut in two.
pub(super) const SEND_RUN: usize = TX_SEGMENTS;
/// Super-packets a sending thread on a TUN with offloads reads per turn.
pub(super) const TX_SUPERS: usize = 4;
/// Payloads shorter than this are copied next to their headers rather
/// than sent from where they were read (a second piece costs more than
/// the copy).
pub(super) const INLINE_BELOW: usize = 256;

/// What one turn of a sending thread works with: the forwarding snapshot
/// and keys as they were when the burst was read.
pub(super) struct Turn {
    pub(super) forwarding: Arc<Forwarding>,
    /// The peer's policy is `duplicate`: packets carry a peer sequence.
    pub(super) duplicate: bool,
    /// The peer's policy is `aggregate`: packets carry the lane's sequence.
    pub(super) aggregate: bool,
    /// The peer's snapshot names a FEC code: packets carry the lane's
    /// sequence and the lane's encoder sees them.
    pub(super) fec: bool,
    pub(super) keys: Option<Arc<Keys>>,
    pub(super) now: Instant,
}

/// One read of a turn: a super-packet left where it was read (offloads;
/// with what it needs, its checksum already finished), or a whole packet
/// in a slot at [`HEADROOM`] (slot, length); with whether its transport
/// checksum (or its segments', once cut) is known to be good
/// ([`VnetHeader::checksum_known`]; never on a plain TUN).
#[derive(Clone, Copy, Debug)]
pub(super) enum Read {
    Super(usize, Cut, bool),
    Slot(usize, usize, bool),
}

/// Equal buffers cut from one allocation.
///
/// One allocation rather than one per buffer: a large zeroed allocation
/// is mapped fresh by the allocator (see [`crate::io::sys::keep_big_allocations_lazy`])
/// and its pages are only made resident when a packet is written to them,
/// so the buffers of a lane that carries little cost little memory; a
/// small one is zeroed by hand, every page of it at once.
pub(super) struct Chunks {
    data: Vec<u8>,
    len: usize,
}

impl Chunks {
    pub(super) fn new(count: usize, len: usize) -> Chunks {
        Chunks {
            data: vec![0u8; count * len],
            len,
        }
    }

    /// How many buffers there are.
    pub(super) fn len(&self) -> usize {
        match self.len {
            0 => 0,
            n => self.data.len() / n,
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<&[u8]> {
        self.data
            .get(i.checked_mul(self.len)?..(i + 1).checked_mul(self.len)?)
    }

    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let at = i.checked_mul(self.len)?..(i + 1).checked_mul(self.len)?;
        self.data.get_mut(at)
    }
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
pub(super) struct TunReader {
    pub(super) offload: bool,
    pub(super) supers: Chunks,
    pub(super) super_lens: Vec<usize>,
    pub(super) slots: Chunks,
    pub(super) slot_len: usize,
    /// This turn's reads, in order.
    pub(super) reads: Vec<Read>,
    /// Slots taken so far in this turn.
    pub(super) used: usize,
    /// Slots holding this turn's whole packets (the first ones).
    pub(super) whole: usize,
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
            supers: Chunks::new(supers, VNET_HDR_LEN + usize::from(u16::MAX)),
            super_lens: vec![0; supers],
            slots: Chunks::new(count, slot_len),
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
                true => self.supers.get_mut(supers),
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
                due: None,
            }
        } else {
            Staged {
                slot: slot_index,
                in_slot: headers,
                body: Some((s, body)),
                checksum_ok,
                due: None,
            }
        };
        self.used += 1;
        Some(staged)
    }
}

/// The packet in super-packet buffer `s` (behind its virtio-net header).
pub(super) fn super_packet<'a>(supers: &'a Chunks, lens: &[usize], s: usize) -> Option<&'a [u8]> {
    supers.get(s)?.get(VNET_HDR_LEN..*lens.get(s)?)
}

/// How many datagrams at the start of `rest` can go as one UDP GSO send:
/// a run of one size and one TOS byte (one GSO send has one IP header to
/// copy), plus one shorter last datagram (0 or 1: not worth it).
pub(super) fn gso_run(rest: &[sys::Datagram<'_>], cap: usize) -> usize {
    let Some((size, tos)) = rest.first().map(|d| (d.len(), d.tos)) else {
        return 0;
    };
    if size == 0 || size > usize::from(u16::MAX) {
        return 0;
    }
    let most = (GSO_MAX_BYTES / size)
        .min(GSO_MAX_SEGMENTS)
        .min(cap)
        .min(rest.len());
    let mut run = rest
        .iter()
        .take(most)
        .take_while(|d| d.len() == size && d.tos == tos)
        .count();
    if run < most
        && rest
            .get(run)
            .is_some_and(|d| !d.is_empty() && d.len() < size && d.tos == tos)
    {
        run += 1;
    }
    if run < 2 {
        0
    } else {
        run
    }
}

/// UDP GSO is used unless `CROSSLINK_UDP_GSO=0` (then every datagram is a
/// packet of its own on the underlay, as with kernels without it).
pub(super) fn udp_gso_wanted() -> bool {
    std::env::var("CROSSLINK_UDP_GSO").map_or(true, |v| v != "0")
}

/// Errors saying UDP GSO does not work here at all.
pub(super) fn gso_unusable(e: &io::Error) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(lens: &[usize]) -> Vec<Vec<u8>> {
        lens.iter().map(|&n| vec![0u8; n]).collect()
    }

    fn plan(lens: &[usize], gso: bool) -> Vec<(usize, usize, Option<u16>)> {
        plan_tos(lens, &vec![0; lens.len()], gso)
            .into_iter()
            .map(|(f, c, s, _)| (f, c, s))
            .collect()
    }

    fn plan_tos(lens: &[usize], tos: &[u8], gso: bool) -> Vec<(usize, usize, Option<u16>, u8)> {
        let bufs = sizes(lens);
        // Headers and bodies in pieces, as the sending thread has them.
        let datagrams: Vec<sys::Datagram> = bufs
            .iter()
            .zip(tos)
            .map(|(b, &tos)| sys::Datagram {
                head: &b[..b.len().min(60)],
                body: &b[b.len().min(60)..],
                tos,
            })
            .collect();
        let mut out = Vec::new();
        plan_messages(&datagrams, gso, GSO_MAX_SEGMENTS, &mut out);
        out.iter()
            .map(|m| (m.first, m.count, m.segment, m.tos))
            .collect()
    }

    /// One GSO send has one outer header: a run stops where the TOS byte
    /// (the inner DSCP or ECN copied out) changes.
    #[test]
    fn a_gso_run_keeps_one_tos() {
        let lens = [1500, 1500, 1500, 1500, 1500, 700];
        let tos = [0x02, 0x02, 0x03, 0x03, 0x03, 0x02];
        assert_eq!(
            plan_tos(&lens, &tos, true),
            vec![
                (0, 2, Some(1500), 0x02),
                (2, 3, Some(1500), 0x03),
                (5, 1, None, 0x02)
            ]
        );
        let tos = [0xb8; 6];
        assert_eq!(plan_tos(&lens, &tos, true), vec![(0, 6, Some(1500), 0xb8)]);
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
                tos: 0,
            },
            sys::Message {
                first: 1,
                count: 3,
                segment: Some(1500),
                tos: 0,
            },
            sys::Message {
                first: 4,
                count: 2,
                segment: Some(900),
                tos: 0,
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
}
