//! The receiving half of a lane ([`PathIn`], one per path): takes the
//! path's datagrams from its configured remote only, parses each once and
//! dispatches on its kind ([`crate::core::forward::receive`]: data to
//! deliver, echo to answer or time), applies the `duplicate` window, and
//! writes what it delivers to the lane's TUN queue ([`TunWriter`], merging
//! one flow's segments into super-packets).

use super::*;

/// Datagrams a receiving thread takes per system call (each buffer holds
/// the largest datagram, [`BUF_LEN`]).
pub(super) const RX_BATCH: usize = 16;
/// How often each path measures its round-trip time.
pub(super) const ECHO_INTERVAL: Duration = Duration::from_secs(1);
/// Replies older than this are ignored.
pub(super) const ECHO_MAX_AGE: Duration = Duration::from_secs(10);

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
pub(super) struct RxState {
    pub(super) batch: sys::RecvBatch,
    pub(super) out: TunWriter,
    /// The inner packets of a burst: (message, range in it, whether the
    /// sender vouched for its checksum, whether it is longer than the TUN's
    /// MTU: a super-packet that came whole).
    pub(super) inner: Vec<(usize, Range<usize>, bool, bool)>,
    /// Room for the burst's packet slices, kept between bursts.
    pub(super) spare: Vec<&'static [u8]>,
    /// Whether the sender vouched for each packet's checksum.
    pub(super) trusted: Vec<bool>,
    /// When the next echo request is due.
    pub(super) next_echo: Instant,
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
            batch: sys::RecvBatch::new(RX_BATCH, BUF_LEN),
            out,
            inner: Vec::with_capacity(RX_BATCH * 64),
            spare: Vec::with_capacity(RX_BATCH * 64),
            trusted: Vec::with_capacity(RX_BATCH * 64),
            next_echo: clock::now(),
        }
    }

    /// Sends an echo request if one is due; returns when the next one is.
    pub(super) fn tick(&mut self, rx: &mut RxState, now: Instant) -> Instant {
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
    pub(super) fn turn(&mut self, rx: &mut RxState) -> usize {
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
        let opener = keys.map(|keys| Opener {
            keys,
            salt: self.salt_in,
            window: &mut self.window,
        });
        match receive(datagram, opener) {
            Ok(Message::Data(header, range)) => self
                .deliverable(header.peer_seq, range.len())
                .then_some((range, header.checksum_ok())),
            Ok(Message::Echo(echo, epoch)) => {
                self.on_echo(echo, epoch, keys.is_some());
                None
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

    /// Answers an echo request, or times the reply to one of ours. A sealed
    /// echo passes the echo guard first (a request must be newer than the
    /// last one, a reply must answer a request we sent).
    fn on_echo(&mut self, echo: Echo, epoch: u32, sealed: bool) {
        match (echo, sealed) {
            (Echo::Request(stamp), false) => self.send_echo(Echo::Reply(stamp)),
            (Echo::Reply(stamp), false) => self.record_rtt(stamp ^ self.stamp_key),
            (Echo::Request(stamp), true) => {
                if self.echo_guard.request(epoch, stamp) {
                    self.send_echo(Echo::Reply(stamp));
                } else {
                    self.drops.count(DropReason::Replayed);
                }
            }
            (Echo::Reply(stamp), true) => {
                if self.echo_guard.reply(stamp) {
                    self.record_rtt(stamp);
                } else {
                    self.drops.count(DropReason::EchoStale);
                }
            }
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
