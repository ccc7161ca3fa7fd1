//! The receiving half of a lane ([`PathIn`], one per path): takes the
//! path's datagrams from its configured remote only, parses each once and
//! dispatches on its kind ([`crate::core::forward::receive`]: data to
//! deliver, a probe or an echo to answer, the reply to one of our probes),
//! applies the `duplicate` window, and writes what it delivers to the lane's
//! TUN queue ([`TunWriter`], merging one flow's segments into
//! super-packets).
//!
//! Lane 0's end of each path also probes it ([`crate::core::quality`]): it
//! sends what its [`Prober`] says when it is due, answers the far end's
//! probes from its [`Reflector`], and hands each reply's sample to the BFD
//! thread, whose engine judges the path.

use super::*;
use crate::core::handshake::TokenBucket;
use crate::io::fastpath::FastPath;

/// Datagrams a receiving thread takes per system call (each buffer holds
/// the largest datagram, [`BUF_LEN`]).
pub(super) const RX_BATCH: usize = 16;
/// How long a lane that does not probe sleeps between ticks.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// UDP GRO is asked for unless `CROSSLINK_UDP_GRO=0` (then every datagram
/// arrives as a message of its own, as on a kernel without it).
pub(super) fn udp_gro_wanted() -> bool {
    std::env::var("CROSSLINK_UDP_GRO").map_or(true, |v| v != "0")
}

/// A lane's receiving end of a path: takes the datagrams of the lane's
/// socket and writes the inner packets to the lane's TUN queue.
pub struct PathIn {
    /// The lane's socket of the path.
    pub socket: Arc<UdpSocket>,
    /// The path's sockets of the other lanes (whether they hold datagrams
    /// not yet counted: see `PathIn::data_counts`).
    pub siblings: Vec<Arc<UdpSocket>>,
    /// The path's data counts when last every lane had counted all it
    /// had received.
    pub settled: Option<(Instant, DataCounts)>,
    /// Whether this lane is in a turn (counted in the path's `rx_busy`).
    pub in_turn: bool,
    pub remote: SocketAddr,
    /// The lane's queue of the peer's TUN.
    pub tun: Arc<SyncDevice>,
    pub counters: Arc<PathCounters>,
    pub drops: Arc<DropCounters>,
    /// The path's id, for the samples sent to the BFD thread.
    pub id: PathId,
    /// This end's probes, when it is the one that probes the path (lane 0).
    pub prober: Option<Prober>,
    /// Answers the far end's probes (they name lane 0, so lane 0's does).
    pub reflector: Reflector,
    /// The length of a large probe (the path's largest data datagram,
    /// without a tag).
    pub large_probe: usize,
    /// Sealed probe requests pass this window (a replayed one is not
    /// answered: it would count as received).
    pub probe_window: ReplayWindow,
    /// Data received in this turn, not yet added to `counters`: packets,
    /// bytes, the highest sequence number (one atomic update per burst,
    /// not per datagram).
    pub pending: (u64, u64, u64),
    /// Where probe samples go (the BFD thread).
    pub commands: CommandLink,
    /// The peer's duplicate-suppression window, shared by its paths.
    pub dedup: Arc<Mutex<Window>>,
    /// The lane's resequencer (`aggregate` senders), shared by its ends
    /// of the paths.
    pub reorder: Arc<Mutex<LaneReorder>>,
    /// The peer's path estimates (the reordering wait), from the snapshot.
    pub forwarding: Option<(Arc<ArcSwap<Forwarding>>, PeerId)>,
    /// Where measured round-trip times go.
    pub rtt: Arc<crate::telemetry::metrics::Histogram>,
    pub keys: SharedKeys,
    pub epoch: u32,
    /// [`crate::core::crypto::path_salt`] of (local, remote), for what we send.
    pub salt_out: u64,
    /// [`crate::core::crypto::path_salt`] of (remote, local), for what we receive.
    pub salt_in: u64,
    /// The path's replay window, shared by the peer's lanes.
    pub window: Arc<Mutex<ReplayWindow>>,
    pub echo_guard: EchoGuard,
    /// FEC parity received in this datagram, for the lane's decoder (and
    /// whether it protects an `aggregate` stream).
    pub parity_in: Vec<(FecParity, bool)>,
    /// Handshake messages passed on to the BFD thread.
    pub handshake_bucket: TokenBucket,
    /// The peer's kernel fast path (`fast_path`), whose receiving program
    /// takes some of the path's data before the lanes see it: what it took
    /// counts with the lanes' when this end reports its data counts.
    pub fast: Option<Arc<FastPath>>,
}

/// Handshake messages a path's receiver passes on per second (and in a
/// burst): well above what a handshake needs, far below what would keep
/// the BFD thread busy.
pub const HANDSHAKE_RATE: u32 = 50;

/// How long the received counts of a moment when every lane of the path had
/// counted all it had stand in for the current ones ([`PathIn::data_counts`]).
const SETTLED_FOR: Duration = Duration::from_millis(250);

/// What a lane's receiving end of a path works with between turns:
/// buffers allocated once.
pub(super) struct RxState {
    pub(super) out: TunWriter,
    /// The inner packets of a burst: (message, range in it, whether the
    /// sender vouched for its checksum, whether it is longer than the TUN's
    /// MTU: a super-packet that came whole).
    pub(super) inner: Vec<(usize, Range<usize>, bool, bool)>,
    /// Room for the burst's packet slices, kept between bursts.
    pub(super) spare: Vec<&'static [u8]>,
    /// Whether the sender vouched for each packet's checksum.
    pub(super) trusted: Vec<bool>,
    /// A probe or probe reply being framed.
    pub(super) probe: Vec<u8>,
}

impl PathIn {
    /// Asks for UDP GRO, allocates the buffers and says which offloads this
    /// end uses.
    pub(super) fn start(&self) -> RxState {
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
            out,
            // Grown by the first bursts and kept: an idle peer's are empty.
            inner: Vec::new(),
            spare: Vec::new(),
            trusted: Vec::new(),
            probe: vec![0; (self.large_probe + TRAILER).max(HEADROOM + TRAILER + ProbeReport::LEN)],
        }
    }

    /// Sends a probe if one is due; returns when the next one is.
    /// `traffic`: the peer's data count (see [`Prober::note_traffic`]).
    pub(super) fn tick(
        &mut self,
        rx: &mut RxState,
        now: Instant,
        traffic: impl Fn() -> u64,
    ) -> Instant {
        let Some(prober) = self.prober.as_mut() else {
            return now + IDLE_TICK;
        };
        if prober.poll_timeout().is_none_or(|t| t <= now) {
            prober.note_traffic(traffic(), now);
        }
        let due = prober.poll_probe(now);
        let next = prober.poll_timeout().unwrap_or(now + IDLE_TICK);
        if let Some(p) = due {
            let len = match p.class {
                ProbeClass::Small => 0,
                ProbeClass::Large => self.large_probe,
            };
            let keys = self.keys.load_full();
            let sealer = keys.as_deref().map(|keys| Sealer {
                keys,
                epoch: self.epoch,
                salt: self.salt_out,
            });
            let len = len + sealer.map_or(0, |_| TRAILER);
            if let Ok(n) = emit_probe(p.seq, p.class, len, &mut rx.probe, sealer.as_ref()) {
                self.send(&rx.probe[..n]);
            }
        }
        next
    }

    fn send(&self, datagram: &[u8]) {
        if self.socket.send_to(datagram, self.remote).is_err() {
            self.drops.count(DropReason::PathSend);
        }
    }

    /// Takes what the socket holds (a burst per `recvmmsg` into `batch`,
    /// without waiting) and writes the inner packets to the TUN. The batch
    /// is the worker's, lent to each lane in turn: nothing in it outlives
    /// the turn (what the resequencer holds is copied).
    pub(super) fn turn(&mut self, rx: &mut RxState, batch: &mut sys::RecvBatch) -> usize {
        let RxState {
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
        if n > 0 {
            self.counters.rx_busy.fetch_add(1, Ordering::Relaxed);
            self.in_turn = true;
        }
        let keys = self.keys.load_full();
        inner.clear();
        let now = clock::now();
        // Taken at the first packet of an `aggregate` stream, for the burst.
        let reorder = self.reorder.clone();
        let mut held: Option<parking_lot::MutexGuard<'_, LaneReorder>> = None;
        let mut released: Vec<Held> = Vec::new();
        let mut rebuilt: Vec<(Rebuilt, bool)> = Vec::new();
        for i in 0..n {
            let Some((message, src, segment, tos)) = batch.get_mut(i) else {
                self.drops.count(DropReason::TooBig);
                continue;
            };
            // A coalesced message holds datagrams of `segment` bytes
            // (the last may be shorter), all from one source and with one
            // outer TOS byte; the inner packets are opened in place.
            if message.is_empty() {
                // An empty datagram is junk too, and counted as such.
                let _ = self.receive(message, src, tos, keys.as_deref());
            }
            let segment = segment.unwrap_or(message.len()).max(1);
            for (k, datagram) in message.chunks_mut(segment).enumerate() {
                let received = self.receive(datagram, src, tos, keys.as_deref());
                if !self.parity_in.is_empty() {
                    let guard = held.get_or_insert_with(|| {
                        let mut g = reorder.lock();
                        self.steer(&mut g.r, now);
                        g
                    });
                    for (parity, ordered) in self.parity_in.drain(..) {
                        let mut out = Vec::new();
                        guard.fec.on_parity(now, parity, &mut out);
                        rebuilt.extend(out.into_iter().map(|r| (r, ordered)));
                    }
                    take_rebuilt(guard, &mut rebuilt, self.id, &mut released, inner, now);
                }
                let Some((r, checksum_ok, numbered)) = received else {
                    continue;
                };
                let at = k * segment;
                if let Some(n) = numbered {
                    let guard = held.get_or_insert_with(|| {
                        let mut g = reorder.lock();
                        self.steer(&mut g.r, now);
                        g
                    });
                    // What a path leaving released goes first (only the
                    // first time: after that nothing waits between offers).
                    take_released(&mut guard.r, &mut released, inner);
                    let packet = datagram.get(r.clone()).unwrap_or_default();
                    if n.fec {
                        let mut out = Vec::new();
                        let fresh = guard.fec.on_data(now, n.instance, n.seq, packet, &mut out);
                        rebuilt.extend(out.into_iter().map(|r| (r, n.ordered)));
                        if !fresh {
                            // its rebuilt copy went out already
                            self.drops.count(DropReason::Duplicate);
                            take_rebuilt(guard, &mut rebuilt, self.id, &mut released, inner, now);
                            continue;
                        }
                    }
                    let deliver = match n.ordered {
                        true => matches!(
                            guard
                                .r
                                .offer(n.instance, n.seq, self.id, packet, checksum_ok, now),
                            Offer::Deliver | Offer::Late
                        ),
                        false => true,
                    };
                    if deliver {
                        let whole = r.len() > out.mtu;
                        inner.push((i, at + r.start..at + r.end, checksum_ok, whole));
                    }
                    take_released(&mut guard.r, &mut released, inner);
                    take_rebuilt(guard, &mut rebuilt, self.id, &mut released, inner, now);
                    continue;
                }
                let whole = r.len() > out.mtu;
                inner.push((i, at + r.start..at + r.end, checksum_ok, whole));
            }
        }
        self.flush_counts();
        if std::mem::take(&mut self.in_turn) {
            self.counters.rx_busy.fetch_sub(1, Ordering::Relaxed);
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
        // In order: the packets before a whole super-packet (or packets
        // released by the resequencer), then it (or them).
        let mut start = 0;
        for (k, (i, range, ok, whole)) in inner.iter().enumerate() {
            if *i == RELEASED {
                let before = packets.get(start..k).unwrap_or_default();
                out.write(
                    &self.tun,
                    before,
                    trusted.get(start..k).unwrap_or_default(),
                    &self.drops,
                );
                write_released(
                    out,
                    &self.tun,
                    released.get(range.clone()).unwrap_or_default(),
                    &self.drops,
                );
                start = k + 1;
            } else if let (true, Some(p)) = (whole, packets.get(k)) {
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
        if let Some(mut g) = held {
            for h in released {
                g.r.recycle(h);
            }
            if g.fec.deadline().is_some_and(|d| d <= now) {
                g.fec.poll(now);
            }
            g.publish();
        }
        n
    }

    /// Gives the resequencer the peer's reordering wait and the paths in
    /// use now, from the snapshot.
    fn steer(&self, r: &mut Resequencer, now: Instant) {
        let Some((forwarding, peer)) = self.forwarding.as_ref() else {
            return;
        };
        let f = forwarding.load();
        let Some(sel) = f.peers.get(usize::from(peer.0)) else {
            return;
        };
        if let Some(b) = sel.board.as_ref() {
            r.set_wait(b.0.wait());
            r.set_offsets(b.0.paths.iter().map(|p| {
                (
                    p.id,
                    Duration::from_nanos(p.offset_ns.load(Ordering::Relaxed)),
                )
            }));
        }
        r.set_live(sel.eligible.iter().map(|&(id, _)| id), now);
    }

    /// Gives up the gaps that waited their bound and writes what they held
    /// back to the TUN.
    pub(super) fn give_up_gaps(&mut self, rx: &mut RxState, now: Instant) {
        let reorder = self.reorder.clone();
        let mut g = reorder.lock();
        self.steer(&mut g.r, now);
        g.r.handle_timeout(now);
        if g.fec.deadline().is_some_and(|d| d <= now) {
            g.fec.poll(now);
        }
        let released: Vec<Held> = g.r.take_ready().collect();
        write_released(&mut rx.out, &self.tun, &released, &self.drops);
        for h in released {
            g.r.recycle(h);
        }
        g.publish();
    }

    /// Validates one datagram, whose outer IP header had the TOS byte
    /// `tos`: the inner packet's range in it (its ECN field as RFC 6040
    /// says), if it is data to deliver, and whether the sender vouched for
    /// its checksum (echo messages are answered here).
    fn receive(
        &mut self,
        datagram: &mut [u8],
        src: SocketAddr,
        tos: u8,
        keys: Option<&Keys>,
    ) -> Option<Inner> {
        if src != self.remote {
            self.drops.count(DropReason::UnknownSource);
            return None;
        }
        let opener = keys.map(|keys| Opener {
            keys,
            salt: self.salt_in,
            window: &mut self.window,
        });
        // A session that awaits its confirm (rare: just after a handshake)
        // is confirmed by any message that opens under it, probes included,
        // so that a peer whose confirms were all lost still gets there.
        let awaiting = keys
            .filter(|k| k.awaits_confirm())
            .and_then(|_| Header::parse(datagram).ok())
            .map(|(h, _)| h.epoch);
        let received = receive_marked(datagram, opener, tos);
        if let (Some(epoch), Ok(_), Some(k)) = (awaiting, &received, keys) {
            if k.first_use(epoch) {
                self.commands.send(Command::SessionUsed(self.id, epoch));
            }
        }
        match received {
            Ok(Message::Data(header, range)) => {
                let numbered = header
                    .peer_seq
                    .filter(|_| header.is_ordered() || header.is_fec())
                    .map(|p| Numbered {
                        instance: p.instance,
                        seq: p.sequence,
                        ordered: header.is_ordered(),
                        fec: header.is_fec(),
                    });
                self.deliverable(&header, range.len()).then_some((
                    range,
                    header.checksum_ok(),
                    numbered,
                ))
            }
            Ok(Message::Echo(echo, epoch)) => {
                self.on_echo(echo, epoch, keys.is_some());
                None
            }
            Ok(Message::Probe {
                seq,
                class,
                len,
                epoch,
            }) => {
                self.on_probe(seq, class, len, epoch, keys);
                None
            }
            Ok(Message::ProbeReply { seq, report }) => {
                self.on_probe_reply(seq, report);
                None
            }
            Ok(Message::Parity(header, parity)) => {
                // numbered with the path's data: counted with them
                self.count_data(header.sequence, parity.len());
                self.parity_in.push((parity, header.is_ordered()));
                None
            }
            Ok(Message::Handshake) => {
                self.on_handshake(datagram, keys);
                None
            }
            Err(reason) => {
                if reason == DropReason::CeOnNotEct {
                    // Data that came over the path (opened and
                    // authenticated first) and is refused only for its
                    // ECN marks: the path delivered it, so it counts as
                    // received, or the far end's quality would read the
                    // refusal as the path's loss. Its bytes: the inner
                    // packet's, between the header and the tag.
                    if let Ok((header, hlen)) = Header::parse(datagram) {
                        let tag = if keys.is_some() { TRAILER } else { 0 };
                        let len = datagram.len().saturating_sub(hlen + tag);
                        self.count_data(header.sequence, len);
                    }
                }
                self.drops.count(reason);
                None
            }
        }
    }

    /// Counts a datagram of the path's data (data, parity, or data refused
    /// for its ECN marks alone) with path sequence number `sequence` and
    /// `bytes` of payload, into the turn's pending counts.
    fn count_data(&mut self, sequence: u64, bytes: usize) {
        let (packets, total, high) = &mut self.pending;
        *packets += 1;
        *total += bytes as u64;
        *high = (*high).max(sequence);
    }

    /// Counts a data packet and applies the duplicate window: whether it
    /// goes to the TUN.
    fn deliverable(&mut self, header: &Header, len: usize) -> bool {
        self.count_data(header.sequence, len);
        if let Some(p) = header
            .peer_seq
            .filter(|_| !header.is_ordered() && !header.is_fec())
        {
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
            self.send(&msg[..n]);
        }
    }

    /// Answers an echo request (older gateways measure round trips with
    /// them; this one probes instead, so a reply answers nothing of ours).
    /// A sealed request passes the echo guard first (it must be newer than
    /// the last one).
    fn on_echo(&mut self, echo: Echo, epoch: u32, sealed: bool) {
        match (echo, sealed) {
            (Echo::Request(stamp), false) => self.send_echo(Echo::Reply(stamp)),
            (Echo::Request(stamp), true) => {
                if self.echo_guard.request(epoch, stamp) {
                    self.send_echo(Echo::Reply(stamp));
                } else {
                    self.drops.count(DropReason::Replayed);
                }
            }
            (Echo::Reply(_), _) => self.drops.count(DropReason::EchoStale),
        }
    }

    /// Hands a handshake message to the BFD thread, whose engine runs the
    /// peer's handshake; a peer without a `public_key` takes none. At most
    /// [`HANDSHAKE_RATE`] a second go on: a flood stops here.
    fn on_handshake(&mut self, datagram: &[u8], keys: Option<&Keys>) {
        if !keys.is_some_and(Keys::is_session) {
            self.drops.count(DropReason::SealMismatch);
            return;
        }
        if !self.handshake_bucket.take(clock::now()) {
            self.drops.count(DropReason::HandshakeRateLimited);
            return;
        }
        self.commands
            .send(Command::Handshake(self.id, datagram.into()));
    }

    /// Adds the turn's data to the path's counters.
    fn flush_counts(&mut self) {
        let (packets, bytes, high) = std::mem::take(&mut self.pending);
        if packets > 0 {
            self.counters
                .rx_packets
                .fetch_add(packets, Ordering::Relaxed);
            self.counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.counters.rx_seq_high.fetch_max(high, Ordering::Relaxed);
        }
    }

    /// Adds what the peer's fast path moved on the path to its counters, if
    /// it has one: whether the counters now hold all it received (false
    /// when its maps are busy with the BFD thread, or unreadable).
    fn take_fast(&self) -> bool {
        let Some(fast) = self.fast.as_ref() else {
            return true;
        };
        match fast.try_take(self.id) {
            Some(Ok(moved)) => {
                moved.add_to(&self.counters);
                true
            }
            // (The BFD thread's reading of them logs why.)
            Some(Err(_)) | None => false,
        }
    }

    /// The path's data counts, as the far end's probes report them.
    ///
    /// The sending lanes number a path's datagrams from one counter, each
    /// lane's go to its own receiving lane, and a lane counts what it took
    /// at the end of its turn. While another lane of the path is behind
    /// (in a turn, or with datagrams waiting in its socket: a lane waiting
    /// for a core), the highest number seen runs ahead of the datagrams
    /// counted by as many as that lane holds, which would read as loss.
    /// So while one is behind, the received counts are those of the last
    /// moment when none was, up to [`SETTLED_FOR`] old. Past that (a lane
    /// starved of CPU, or one that always has datagrams waiting on a busy
    /// host) the counts go as they are, marked unsettled: the far end's
    /// quality confirms no loss from them, and judges the path by its
    /// probes and by settled counts only.
    ///
    /// With a kernel fast path, its receiving program takes the path's
    /// data datagrams that it can (each counted, with its number, in the
    /// program's counters) and leaves the others to the lanes (datagrams
    /// marked ECT(1) or CE, coalesced ones, ...): both take from the one
    /// numbered stream, so the counts reported are both together, the
    /// program's read now. Counts taken while the program's cannot be read
    /// at once are behind too.
    fn data_counts(&mut self) -> DataCounts {
        self.flush_counts();
        let fast_read = self.take_fast();
        let now = clock::now();
        let current = DataCounts {
            received: self.counters.rx_packets.load(Ordering::Relaxed),
            seq_high: self.counters.rx_seq_high.load(Ordering::Relaxed),
            sent_packets: self.counters.tx_packets.load(Ordering::Relaxed),
            sent_bytes: self.counters.tx_bytes.load(Ordering::Relaxed),
            unsent: self.counters.unsent(),
            unsettled: false,
        };
        let busy = self.counters.rx_busy.load(Ordering::Relaxed);
        let others_busy = busy > u32::from(self.in_turn);
        let behind =
            !fast_read || others_busy || self.siblings.iter().any(|s| sys::has_queued(s.as_ref()));
        if !behind {
            self.settled = Some((now, current));
            return current;
        }
        match self.settled {
            Some((at, settled)) if now.saturating_duration_since(at) <= SETTLED_FOR => DataCounts {
                received: settled.received,
                seq_high: settled.seq_high,
                ..current
            },
            _ => DataCounts {
                unsettled: true,
                ..current
            },
        }
    }

    /// Answers a probe at once with what this end received. A sealed one
    /// must be new (its number past the path's probe window).
    fn on_probe(
        &mut self,
        seq: u64,
        class: ProbeClass,
        len: usize,
        epoch: u32,
        keys: Option<&Keys>,
    ) {
        if keys.is_some() {
            if self.probe_window.check(epoch, seq).is_err() {
                self.drops.count(DropReason::Replayed);
                return;
            }
            self.probe_window.commit(epoch, seq);
        }
        let data = self.data_counts();
        let report = self.reflector.reflect(class, len, clock::nanos(), data);
        let sealer = keys.map(|keys| Sealer {
            keys,
            epoch: self.epoch,
            salt: self.salt_out,
        });
        let mut msg = [0u8; HEADROOM + ProbeReport::LEN + TRAILER];
        if let Ok(n) = emit_probe_reply(seq, &report, &mut msg, sealer.as_ref()) {
            self.send(&msg[..n]);
        }
    }

    /// A reply to one of our probes: its round trip to the metrics, its
    /// sample to the BFD thread.
    fn on_probe_reply(&mut self, seq: u64, report: ProbeReport) {
        let local = self.data_counts();
        let Some(prober) = self.prober.as_mut() else {
            self.drops.count(DropReason::EchoStale);
            return;
        };
        let now = clock::now();
        let Some(sample) = prober.handle_reply(seq, report, local, now) else {
            self.drops.count(DropReason::EchoStale);
            return;
        };
        let rtt = now.saturating_duration_since(sample.sent_at);
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        self.counters.rtt_ns.store(ns.max(1), Ordering::Relaxed);
        self.rtt.record(rtt.as_secs_f64());
        self.commands
            .send(Command::Quality(self.id, Box::new(sample)));
    }
}

/// A data packet to deliver: its range in the datagram, whether its sender
/// vouched for its checksum, and its `aggregate` stream and number.
type Inner = (Range<usize>, bool, Option<Numbered>);

/// A data packet's place in a numbered stream: `aggregate`'s (resequenced)
/// or one that FEC protects (or both).
#[derive(Clone, Copy, Debug)]
struct Numbered {
    instance: u32,
    seq: u64,
    ordered: bool,
    fec: bool,
}

/// Hands the packets the FEC decoder rebuilt to the burst: an `aggregate`
/// stream's through the resequencer, the others straight to the released
/// packets (written where they stand in the burst).
fn take_rebuilt(
    g: &mut LaneReorder,
    rebuilt: &mut Vec<(Rebuilt, bool)>,
    id: PathId,
    released: &mut Vec<Held>,
    inner: &mut Vec<(usize, Range<usize>, bool, bool)>,
    now: Instant,
) {
    for (r, ordered) in rebuilt.drain(..) {
        let deliver = !ordered
            || matches!(
                g.r.offer(r.instance, r.sequence, id, &r.packet, false, now),
                Offer::Deliver | Offer::Late
            );
        if deliver {
            let from = released.len();
            released.push(Held {
                data: r.packet,
                checksum_ok: false,
                at: now,
                due: now,
            });
            inner.push((RELEASED, from..released.len(), false, false));
        }
        if ordered {
            take_released(&mut g.r, released, inner);
        }
    }
}

/// Marks an entry of a burst's packets that stands for packets the
/// resequencer released (their range in the burst's released packets).
const RELEASED: usize = usize::MAX;

/// Moves what the resequencer has ready to `released`, marked in the
/// burst's `inner` list where it is to be written.
fn take_released(
    r: &mut Resequencer,
    released: &mut Vec<Held>,
    inner: &mut Vec<(usize, Range<usize>, bool, bool)>,
) {
    if r.has_ready() {
        let from = released.len();
        released.extend(r.take_ready());
        inner.push((RELEASED, from..released.len(), false, false));
    }
}

/// Writes packets the resequencer released, in order (merged where they
/// can be, like a burst's).
fn write_released(out: &mut TunWriter, tun: &SyncDevice, released: &[Held], drops: &DropCounters) {
    let mut start = 0;
    let flush = |out: &mut TunWriter, group: &[Held]| {
        let packets: Vec<&[u8]> = group.iter().map(|h| h.data.as_slice()).collect();
        let trusted: Vec<bool> = group.iter().map(|h| h.checksum_ok).collect();
        out.write(tun, &packets, &trusted, drops);
    };
    for (k, h) in released.iter().enumerate() {
        if h.data.len() > out.mtu {
            flush(out, released.get(start..k).unwrap_or_default());
            out.write_whole(tun, &h.data, h.checksum_ok, drops);
            start = k + 1;
        }
    }
    flush(out, released.get(start..).unwrap_or_default());
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
pub(super) struct TunWriter {
    pub(super) offload: bool,
    /// The TUN's MTU.
    pub(super) mtu: usize,
    pub(super) trains: Vec<Train>,
    pub(super) header: [u8; MAX_TRAIN_HEADER],
    /// The pieces of one `writev`, kept empty between writes (see [`recycle_iov`]).
    pub(super) iov: Vec<IoSlice<'static>>,
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
