//! The fuzz targets' harnesses: one function per target, from input bytes to
//! `Ok(())` or the invariant the input broke.
//!
//! Two callers share this file. The AFL++ binaries (`fuzz/src/bin/<target>.rs`,
//! built by `cargo afl build`) turn an `Err` into a panic, which AFL records as a
//! crash. `tests/fuzz.rs` includes this file as a module and replays every file of
//! `fuzz/seeds/<target>/` and `fuzz/corpus/<target>/` through the same function on
//! every `cargo test`, without AFL. So the file uses only what the `crosslink`
//! package itself depends on (`crosslink`, `etherparse`, `tun_rs`).
//!
//! A harness fails on a panic, which includes arithmetic overflow (both builds check
//! it), or on a broken invariant.

use crosslink::config::Config;
use crosslink::core::bfd::{Session, SessionConfig};
use crosslink::core::crypto::{Key, Keys, ReplayWindow};
use crosslink::core::drop::DropReason;
use crosslink::core::engine::Engine;
use crosslink::core::forward::{self, Sealer, HEADROOM};
use crosslink::core::handshake::{self as hs, Handshake, Setup, State};
use crosslink::core::keypair::PrivateKey;
use crosslink::core::wire::bfd::ControlPacket;
use crosslink::core::wire::flow::FlowKey;
use crosslink::core::wire::overlay::{self, Header, PeerSeq, BASE_LEN};
use crosslink::PathId;
use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// What a harness returns: `Err` names the broken invariant.
pub type Outcome = Result<(), String>;

/// A target's harness.
pub type Harness = fn(&[u8]) -> Outcome;

/// Every target by name, as the binaries and the replay test know them.
pub const TARGETS: [(&str, Harness); 12] = [
    ("bfd", bfd),
    ("coalesce", coalesce),
    ("config", config),
    ("engine", engine),
    ("fec", fec),
    ("flow", flow),
    ("handshake", handshake),
    ("overlay", overlay),
    ("quality", quality),
    ("reorder", reorder),
    ("sealed", sealed),
    ("segment", segment),
];

/// The keys the `overlay` and `sealed` targets seal and open with.
pub fn test_keys() -> Keys {
    Keys::new(&Key::from_bytes([7; 32]), Some(&Key::from_bytes([8; 32])))
}

static KEYS: LazyLock<Keys> = LazyLock::new(test_keys);

/// The salt the targets seal with.
pub const SALT: u64 = 3;

/// [`forward::receive`] for a keyed peer, with the salt the targets seal with.
fn open(
    datagram: &mut [u8],
    keys: &Keys,
    window: &mut ReplayWindow,
) -> Result<forward::Message, DropReason> {
    let opener = forward::Opener {
        keys,
        salt: SALT,
        window,
    };
    forward::receive(datagram, Some(opener))
}

/// Overlay datagrams as they arrive: header parse and emit round trip,
/// decapsulation, receive (in the clear, under every outer ECN field) and open.
pub fn overlay(input: &[u8]) -> Outcome {
    if let Ok((h, off)) = Header::parse(input) {
        if off < BASE_LEN || off > input.len() {
            return Err(format!("payload offset {off} out of range"));
        }
        let mut out = [0u8; overlay::MAX_LEN];
        let n = h.emit(&mut out).map_err(|e| e.to_string())?;
        let (back, _) = Header::parse(&out[..n]).map_err(|e| e.to_string())?;
        if back != h {
            return Err(format!("round trip changed {h:?} into {back:?}"));
        }
    }
    if let Ok((_, inner)) = forward::decapsulate(input) {
        if inner.len() > input.len() {
            return Err("inner longer than datagram".into());
        }
    }
    let mut copy = input.to_vec();
    if let Ok(forward::Message::Data(_, r)) = forward::receive(&mut copy, None) {
        if r.end > copy.len() {
            return Err("received range out of bounds".into());
        }
    }
    // RFC 6040 on receive: under any outer ECN field, only the inner
    // ECN bits (and an IPv4 header checksum) may change.
    for outer in 0..4u8 {
        let mut copy = input.to_vec();
        if let Ok(forward::Message::Data(_, r)) = forward::receive_marked(&mut copy, None, outer) {
            for (i, (a, b)) in input.iter().zip(&copy).enumerate() {
                let inner_at = i.wrapping_sub(r.start);
                let may = i >= r.start && (inner_at <= 1 || inner_at == 10 || inner_at == 11);
                if a != b && !may {
                    return Err(format!("outer ECN {outer} changed byte {i}"));
                }
            }
        }
    }
    let mut copy = input.to_vec();
    let mut window = ReplayWindow::default();
    if let Ok(forward::Message::Data(_, r)) = open(&mut copy, &KEYS, &mut window) {
        if r.end > copy.len() {
            return Err("opened range out of bounds".into());
        }
    }
    Ok(())
}

/// The input sealed as an inner packet: it opens to itself when it is an IP
/// packet (and is refused as malformed when not), and any one-bit change of the
/// sealed datagram must not open.
pub fn sealed(input: &[u8]) -> Outcome {
    let keys = &*KEYS;
    let mut buf = vec![0u8; input.len() + HEADROOM + 16];
    buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
    let sealer = Sealer {
        keys,
        epoch: 9,
        salt: SALT,
    };
    let header = Header::data(5).with_peer_seq(PeerSeq {
        instance: 1,
        sequence: input.len() as u64,
    });
    let r = forward::seal_data(&mut buf, input.len(), &header, &sealer)
        .map_err(|e| format!("{e:?}"))?;
    let sealed = buf[r].to_vec();
    let mut window = ReplayWindow::default();
    let mut copy = sealed.clone();
    let opened = open(&mut copy, keys, &mut window);
    let ip = matches!(input.first().map(|b| b >> 4), Some(4) if input.len() >= 20)
        || matches!(input.first().map(|b| b >> 4), Some(6) if input.len() >= 40);
    match (&opened, ip) {
        (Ok(forward::Message::Data(_, r)), true) if copy[r.clone()] == *input => {}
        (Err(DropReason::InnerMalformed), false) => {}
        _ => return Err(format!("sealed input did not open to itself: {opened:?}")),
    }
    // Flip one bit anywhere: must not open.
    let bit = input.iter().map(|&b| usize::from(b)).sum::<usize>() % (sealed.len() * 8);
    let mut bad = sealed.clone();
    bad[bit / 8] ^= 1 << (bit % 8);
    let mut w2 = ReplayWindow::default();
    if let Ok(o) = open(&mut bad, keys, &mut w2) {
        return Err(format!("a one-bit change at {bit} still opened: {o:?}"));
    }
    Ok(())
}

/// A BFD control packet: parse and emit round trip, then four rounds of a
/// session fed the packet (no timer may be set in the past).
pub fn bfd(input: &[u8]) -> Outcome {
    let Ok(p) = ControlPacket::parse(input) else {
        return Ok(());
    };
    let mut out = vec![0u8; p.buffer_len().max(24)];
    if let Ok(n) = p.emit(&mut out) {
        let back = ControlPacket::parse(&out[..n]).map_err(|e| format!("re-parse: {e:?}"))?;
        if back != p {
            return Err(format!("round trip changed {p:?} into {back:?}"));
        }
    }
    let now = Instant::now();
    let mut s = Session::new(
        SessionConfig {
            local_discriminator: p.your_discriminator,
            desired_min_tx: Duration::from_millis(10),
            required_min_rx: Duration::from_millis(10),
            detect_mult: 3,
            passive: false,
        },
        now,
        1,
    );
    let mut t = now;
    for step in 0..4u64 {
        let _ = s.handle_packet(&p, t);
        t += Duration::from_micros(u64::from(p.desired_min_tx_us % 50_000) * step + 1);
        s.handle_timeout(t);
        while s.poll_transmit(t).is_some() {}
        while s.poll_event().is_some() {}
        if let Some(next) = s.poll_timeout() {
            if next < t {
                return Err(format!("timer {next:?} in the past of {t:?}"));
            }
        }
    }
    Ok(())
}

/// An inner packet's flow key: the IPv4 fast path agrees with the general
/// parser, and the direct hash with the key's.
pub fn flow(input: &[u8]) -> Outcome {
    let fast = FlowKey::parse(input);
    let general = FlowKey::parse_general(input);
    if fast != general {
        return Err(format!("fast path {fast:?} but general parser {general:?}"));
    }
    let direct = FlowKey::hash_of(input).ok();
    if direct != fast.as_ref().ok().map(FlowKey::hash64) {
        return Err(format!("hash_of {direct:?} differs from the key's hash"));
    }
    if let Ok(k) = fast {
        let again = FlowKey::parse(input).map_err(|e| format!("{e:?}"))?;
        if again.hash64() != k.hash64() {
            return Err("hash not deterministic".into());
        }
    }
    Ok(())
}

/// The send side's cutting of TUN super-packets (input: a virtio-net header,
/// then the packet): segments tile the payload in order, each a packet of its
/// own length; and where tun-rs's cutter (another implementation of the
/// kernel's rules) accepts the same input, the bytes are the same.
pub fn segment(input: &[u8]) -> Outcome {
    use crosslink::core::segment::{finish_checksum, Cut, VnetHeader, MAX_HEADERS, VNET_HDR_LEN};
    let Some(vnet) = VnetHeader::parse(input) else {
        return Ok(());
    };
    let packet = &input[VNET_HDR_LEN..];
    let segments = match Cut::of(&vnet, packet) {
        Ok(Cut::Segments(s)) => s,
        Ok(Cut::Finish { start, offset }) => {
            let mut p = packet.to_vec();
            return finish_checksum(&mut p, start, offset).map_err(|e| format!("{e:?}"));
        }
        Ok(Cut::Whole) | Err(_) => return Ok(()),
    };
    let mut ours = Vec::new();
    let mut next = segments.headers();
    for i in 0..segments.count() {
        let mut h = [0u8; MAX_HEADERS];
        let r = segments
            .header(packet, i, &mut h)
            .ok_or_else(|| format!("segment {i} of {} refused", segments.count()))?;
        if r.start != next || r.len() > segments.size() {
            return Err(format!("segment {i} payload {r:?} after {next}"));
        }
        next = r.end;
        let mut seg = h[..segments.headers()].to_vec();
        seg.extend_from_slice(&packet[r]);
        if seg[0] >> 4 == 4 && usize::from(u16::from_be_bytes([seg[2], seg[3]])) != seg.len() {
            return Err(format!("segment {i}: IPv4 length field wrong"));
        }
        ours.push(seg);
    }
    if next != packet.len() {
        return Err(format!(
            "segments end at {next}, packet at {}",
            packet.len()
        ));
    }
    let hdr = tun_rs::VirtioNetHdr {
        flags: vnet.flags,
        gso_type: vnet.gso_type,
        hdr_len: segments.headers() as u16,
        gso_size: vnet.gso_size,
        csum_start: vnet.csum_start,
        csum_offset: vnet.csum_offset,
    };
    let mut copy = packet.to_vec();
    let mut bufs = vec![vec![0u8; 70_000]; ours.len().max(1)];
    let mut sizes = vec![0usize; bufs.len()];
    let v6 = packet[0] >> 4 == 6;
    // Without payload the reference makes nothing; ours passes the headers
    // on as one packet.
    let empty = packet.len() == segments.headers();
    let reference = tun_rs::gso_split(&mut copy, hdr, &mut bufs, &mut sizes, 0, v6);
    if let (Ok(n), false) = (reference, empty) {
        if n != ours.len() {
            return Err(format!("{} segments, the reference cut {n}", ours.len()));
        }
        for (i, seg) in ours.iter().enumerate() {
            if seg[..] != bufs[i][..sizes[i]] {
                return Err(format!("segment {i} differs from the reference"));
            }
        }
    }
    Ok(())
}

/// Whether `p` is a TCP segment whose checksum etherparse finds right.
fn tcp_checksum_right(p: &[u8]) -> bool {
    let Ok(parsed) = etherparse::SlicedPacket::from_ip(p) else {
        return false;
    };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = parsed.transport else {
        return false;
    };
    let want = match parsed.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination())
        }
        Some(etherparse::NetSlice::Ipv6(ip)) => {
            tcp.calc_checksum_ipv6(ip.header().source(), ip.header().destination())
        }
        _ => return false,
    };
    want.is_ok_and(|w| w == tcp.checksum())
}

/// Receive-side coalescing (input: a byte of "sender vouched" bits, then
/// packets, each behind a 2-byte big-endian length): the trains take the
/// packets in order, each once; a merged train stays within the IP length
/// limit, asks for TCP segmentation, and holds no packet with a wrong checksum
/// that its sender did not vouch for.
pub fn coalesce(input: &[u8]) -> Outcome {
    use crosslink::core::coalesce::{plan, MAX_TRAIN_HEADER, VNET_HDR_LEN};
    let Some((&vouched, mut rest)) = input.split_first() else {
        return Ok(());
    };
    let mut packets = Vec::new();
    while let [a, b, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len());
        packets.push(&tail[..n]);
        rest = &tail[n..];
    }
    let trusted: Vec<bool> = (0..packets.len())
        .map(|i| vouched & (1 << (i % 8)) != 0)
        .collect();
    let mut trains = Vec::new();
    plan(&packets, &trusted, &mut trains);
    let mut next = 0;
    for t in &trains {
        if t.first != next || t.count == 0 {
            return Err(format!(
                "train at {} of {}, expected at {next}",
                t.first, t.count
            ));
        }
        next += t.count;
        let mut header = [0u8; MAX_TRAIN_HEADER];
        let n = t.header(packets[t.first], &mut header);
        if t.count == 1 {
            if n != VNET_HDR_LEN || header[..n] != [0; VNET_HDR_LEN] {
                return Err("a lone packet is not written as it came".into());
            }
            continue;
        }
        if n <= VNET_HDR_LEN || t.headers + t.payload > 65_535 || header[0] != 1 {
            return Err(format!("train of {} has a bad header ({n} bytes)", t.count));
        }
        for i in t.first..t.first + t.count {
            if !trusted[i] && !tcp_checksum_right(packets[i]) {
                return Err(format!("packet {i}, its checksum wrong, was merged"));
            }
        }
    }
    if next != packets.len() {
        return Err(format!("trains hold {next} of {} packets", packets.len()));
    }
    Ok(())
}

/// A configuration file (bytes read as UTF-8, lossily): parse and validate,
/// then check the files it names.
pub fn config(input: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(input);
    if let Ok(c) = Config::parse(&text, "fuzz.toml") {
        let _ = c.check_files();
    }
    Ok(())
}

/// The configuration of one side of the `engine` target: two paths, 10 ms BFD.
pub fn engine_config(side: u8) -> Config {
    let other = 3 - side;
    let mut text = format!(
        "[gateway]\nname = \"g{side}\"\n[bfd]\ntx_interval = \"10ms\"\nrx_interval = \"10ms\"\n\
         [[peer]]\nname = \"p\"\ntun = \"xl-p\"\nrevert_hold = \"100ms\"\n"
    );
    for n in 1..=2 {
        text.push_str(&format!(
            "[[peer.path]]\nname = \"p{n}\"\nlocal = \"198.18.2{n}.{side}:4800\"\n\
             remote = \"198.18.2{n}.{other}:4800\"\npriority = {n}\n"
        ));
    }
    Config::parse(&text, "fuzz").expect("the engine target's configuration is valid")
}

static ENGINE_CONFIGS: LazyLock<(Config, Config)> =
    LazyLock::new(|| (engine_config(1), engine_config(2)));

/// Delivers what `src` sends to `dst`; `lose` bit i drops path i's packets.
fn exchange(src: &mut Engine, dst: &mut Engine, now: Instant, lose: u8) {
    src.handle_timeout(now);
    while let Some((id, pkt)) = src.poll_transmit(now) {
        if lose & (1 << (id.0 % 8)) != 0 {
            continue;
        }
        let Ok(t) = pkt else { continue };
        let Some(p) = src.path(id) else { continue };
        let from = SocketAddr::new(p.local.ip(), 49152);
        let _ = dst.handle_bfd_datagram(p.remote.ip(), from, Some(255), t.as_bytes(), now);
    }
}

fn check_engine(e: &Engine, now: Instant) -> Outcome {
    if let Some(t) = e.poll_timeout() {
        if t < now {
            return Err(format!("engine timer in the past by {:?}", now - t));
        }
    }
    for (i, p) in e.paths().iter().enumerate() {
        let id = PathId(i as u16);
        if e.is_active(id) && !p.is_up() {
            return Err(format!("path {} is active but not up", p.name));
        }
    }
    if let Some((_, up, ids)) = e.peer(crosslink::PeerId(0)) {
        let any = ids.iter().any(|&id| e.path(id).is_some_and(|p| p.is_up()));
        if up != any {
            return Err(format!("peer up={up} but a path up={any}"));
        }
    }
    Ok(())
}

/// Two engines under a sequence of operations, two bytes each (an operation,
/// its argument): time steps, loss per path and direction, junk and stranger
/// datagrams, admin down. Invariants after every operation: no timer in the
/// past, an active path is up, a peer is up exactly when one of its paths is;
/// after the sequence (unless admin down), a clean 3 s brings every path up.
pub fn engine(input: &[u8]) -> Outcome {
    let (ca, cb) = &*ENGINE_CONFIGS;
    let t0 = Instant::now();
    let mut a = Engine::new(ca, t0, 1);
    let mut b = Engine::new(cb, t0, 2);
    let mut now = t0;
    let mut admin_down = false;
    // Per-direction loss masks (bit i: path i loses everything).
    let (mut lose_ab, mut lose_ba) = (0u8, 0u8);
    let mut bytes = input.iter().copied();
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        match op % 8 {
            0 | 1 => now += Duration::from_micros(u64::from(arg) * 200),
            2 => lose_ab = arg & 3,
            3 => lose_ba = arg & 3,
            4 => now += Duration::from_millis(u64::from(arg) * 10),
            5 => {
                // Junk from a path's remote, with any TTL.
                let len = usize::from(arg % 64);
                let junk: Vec<u8> = bytes.by_ref().take(len).collect();
                let path = &ca.peers[0].paths[usize::from(arg % 2)];
                let from = SocketAddr::new(path.remote.ip(), 49152);
                let ttl = if arg & 0x80 != 0 {
                    Some(255)
                } else {
                    Some(arg)
                };
                let _ = a.handle_bfd_datagram(path.local.ip(), from, ttl, &junk, now);
            }
            6 => {
                let stranger = SocketAddr::new(IpAddr::from([198, 18, 21, 77]), 49152);
                let _ = a.handle_bfd_datagram(
                    ca.peers[0].paths[0].local.ip(),
                    stranger,
                    Some(255),
                    &[0x20, 0x40, 3, 24, 0, 0, 0, 1, 0, 0, 0, 0],
                    now,
                );
            }
            _ => {
                if arg % 16 == 0 {
                    a.set_admin_down_all(now);
                    admin_down = true;
                }
            }
        }
        exchange(&mut a, &mut b, now, lose_ab);
        exchange(&mut b, &mut a, now, lose_ba);
        while a.poll_event().is_some() {}
        while b.poll_event().is_some() {}
        let _ = a.poll_forwarding();
        check_engine(&a, now)?;
        check_engine(&b, now)?;
    }
    if admin_down {
        return Ok(());
    }
    // Liveness: a clean 3 s (slow start is 1 s per packet) converges.
    for _ in 0..600 {
        now += Duration::from_millis(5);
        exchange(&mut a, &mut b, now, 0);
        exchange(&mut b, &mut a, now, 0);
    }
    for e in [&a, &b] {
        if let Some(p) = e.paths().iter().find(|p| !p.is_up()) {
            return Err(format!(
                "path {} not up after a clean 3 s: {:?}",
                p.name,
                p.session.state()
            ));
        }
    }
    Ok(())
}

/// Path quality fed arbitrary probe replies: 49-byte steps, a byte of time
/// (ms) then a report as the far end would send it. Invariants: loss ratios
/// stay in [0, 1], a round trip is never longer than the run, and a judged
/// path's next deadline is never far in the past.
pub fn quality(input: &[u8]) -> Outcome {
    use crosslink::config::SlaConfig;
    use crosslink::core::quality::{DataCounts, Prober, Quality};
    use crosslink::core::wire::overlay::ProbeReport;
    let t0 = Instant::now();
    let sla = SlaConfig {
        max_rtt: Some(Duration::from_millis(5)),
        max_jitter: Some(Duration::from_millis(1)),
        ..SlaConfig::default()
    };
    let mut prober = Prober::new(Duration::from_millis(10));
    let mut q = Quality::new(sla, true);
    let mut now = t0;
    for (i, step) in input.chunks(1 + ProbeReport::LEN).enumerate() {
        now += Duration::from_millis(u64::from(step[0]));
        let Some(probe) = prober.poll_probe(now) else {
            continue;
        };
        let Ok(report) = ProbeReport::parse(&step[1..]) else {
            break;
        };
        let local = DataCounts {
            received: report.data_received ^ i as u64,
            seq_high: report.data_seq_high.rotate_left(7),
            unsettled: step[0] & 0x40 != 0,
            ..DataCounts::default()
        };
        if let Some(sample) = prober.handle_reply(probe.seq, report, local, now) {
            q.handle_sample(&sample);
        }
        q.evaluate(now, step[0] & 0x80 != 0);
        if let Some(t) = q.poll_timeout() {
            if t + Duration::from_secs(3600) < now {
                return Err(format!("deadline {:?} before now", now - t));
            }
        }
        let f = q.figures(now);
        for r in [f.loss_tx, f.loss_rx, f.reorder].into_iter().flatten() {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("ratio {r} out of range: {f:?}"));
            }
        }
        if f.rtt.is_some_and(|r| r > now - t0) {
            return Err(format!("round trip longer than the run: {f:?}"));
        }
        let loss = q.loss_tx(now);
        if !(0.0..=1.0).contains(&loss) {
            return Err(format!("loss_tx {loss}"));
        }
    }
    Ok(())
}

/// `reorder`: the `aggregate` receiver's resequencer under any sequence of
/// packets (streams, numbers near each other or far apart, paths, sizes),
/// time steps, wait changes and path-set changes. Each input is ops of 6
/// bytes: kind, stream, path, time step (0.1 ms units), number offset (i16).
/// Invariants: memory within its bounds, no packet delivered twice, and
/// every packet held is delivered once the waits run out.
pub fn reorder(input: &[u8]) -> Outcome {
    use crosslink::core::reorder::{Offer, Resequencer, MAX_HELD, MAX_HELD_BYTES};
    use std::collections::HashSet;
    let t0 = Instant::now();
    let mut now = t0;
    let mut r = Resequencer::new(Duration::from_millis(5));
    let mut next_id = 0u64;
    let mut held: HashSet<u64> = HashSet::new();
    let mut delivered: HashSet<u64> = HashSet::new();
    let take =
        |r: &mut Resequencer, held: &mut HashSet<u64>, delivered: &mut HashSet<u64>| -> Outcome {
            let ready: Vec<_> = r.take_ready().collect();
            for h in ready {
                let id = h
                    .data
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or("a released packet lost its bytes")?;
                if !delivered.insert(id) {
                    return Err(format!("packet {id} delivered twice"));
                }
                held.remove(&id);
                r.recycle(h);
            }
            Ok(())
        };
    for op in input.chunks_exact(6) {
        now += Duration::from_micros(u64::from(op[3]) * 100);
        let stream = u32::from(op[1] % 3);
        let path = PathId(u16::from(op[2] % 3));
        let offset = i16::from_be_bytes([op[4], op[5]]);
        match op[0] % 8 {
            0..=4 => {
                let seq = 1_000u64.wrapping_add_signed(i64::from(offset));
                let id = next_id;
                next_id += 1;
                let mut packet = vec![0u8; 8 + usize::from(op[0] >> 3) * 64];
                packet[..8].copy_from_slice(&id.to_be_bytes());
                match r.offer(stream, seq, path, &packet, true, now) {
                    Offer::Deliver | Offer::Late => {
                        delivered.insert(id);
                    }
                    Offer::Held => {
                        held.insert(id);
                    }
                    Offer::Duplicate => {}
                }
            }
            5 => r.handle_timeout(now),
            6 => r.set_wait(Duration::from_micros(u64::from(op[4]) * 500)),
            _ => {
                let live: Vec<PathId> = (0..3u16)
                    .filter(|b| op[4] & (1 << b) != 0)
                    .map(PathId)
                    .collect();
                r.set_live(live.iter().copied(), now);
            }
        }
        take(&mut r, &mut held, &mut delivered)?;
        if r.occupancy() > MAX_HELD || r.occupancy_bytes() > MAX_HELD_BYTES {
            return Err(format!(
                "{} packets, {} bytes held",
                r.occupancy(),
                r.occupancy_bytes()
            ));
        }
        if r.occupancy() != held.len() {
            return Err(format!("{} held, {} counted", r.occupancy(), held.len()));
        }
    }
    // Every wait runs out (the longest wait, with what late packets added).
    let end = now + Duration::from_secs(2);
    r.handle_timeout(end);
    take(&mut r, &mut held, &mut delivered)?;
    if !held.is_empty() || r.occupancy() != 0 {
        return Err(format!("{} held packets never delivered", held.len()));
    }
    Ok(())
}

/// The FEC receiver's state ([`crosslink::core::fec::Decoder`]) under data,
/// parity and time in any order. Each input is ops of 8 bytes: kind,
/// stream, number offset (i16), then three bytes whose meaning depends on
/// the kind: data (a length), raw parity (k, m, index, then the shard's
/// length in the last byte: wrong block ids, parity without data,
/// duplicates, lies), a time step, or a true block of a fresh sender
/// (code, which data packets arrive) encoded by the [`crosslink::core::fec::Encoder`].
/// Invariants: memory within its bounds; a true block with no more data
/// missing than it has parity is rebuilt exactly; everything is
/// forgotten once the waits run out.
pub fn fec(input: &[u8]) -> Outcome {
    use crosslink::core::fec::{Code, Decoder, Encoder, KEEP_FOR, MAX_KEPT, MAX_PENDING};
    use crosslink::core::wire::overlay::FecParity;
    let t0 = Instant::now();
    let mut now = t0;
    let wait = Duration::from_millis(20);
    let mut dec = Decoder::new(wait);
    let mut fresh = 1_000u32;
    let mut out = Vec::new();
    for op in input.chunks_exact(8) {
        let instance = u32::from(op[1] % 4);
        let offset = i16::from_be_bytes([op[2], op[3]]);
        let seq = 1_000u64.wrapping_add_signed(i64::from(offset));
        out.clear();
        match op[0] % 4 {
            0 => {
                let mut p = vec![op[4]; usize::from(op[5]) * 8 + 1];
                p[0] = op[1];
                dec.on_data(now, instance, seq, &p, &mut out);
            }
            1 => {
                let parity = FecParity {
                    instance,
                    first: seq,
                    k: op[4],
                    m: op[5],
                    index: op[6],
                    shard: vec![op[1]; usize::from(op[7])],
                };
                dec.on_parity(now, parity, &mut out);
            }
            2 => {
                now += Duration::from_micros(u64::from(op[4]) * 250);
                dec.poll(now);
            }
            _ => {
                // a true block from a sender of its own
                fresh = fresh.wrapping_add(1);
                let k = op[4] % 12 + 1;
                let m = op[5] % 4 + 1;
                let Some(code) = Code::new(k, m) else {
                    return Err(format!("{k}+{m} refused"));
                };
                let mut enc = Encoder::new(code, Duration::from_millis(5), fresh);
                let packets: Vec<Vec<u8>> = (0..u64::from(k))
                    .map(|j| {
                        vec![op[7] ^ j as u8; 1 + (usize::from(op[6]) * (j as usize + 1)) % 300]
                    })
                    .collect();
                let mut parity = Vec::new();
                for (j, p) in packets.iter().enumerate() {
                    enc.push(now, seq.wrapping_add(j as u64), p, &mut parity);
                }
                enc.close(&mut parity);
                let arrive =
                    |j: usize| (u16::from(op[6]) << 8 | u16::from(op[7])) & (1 << (j % 16)) != 0;
                // room enough that no copy of this block is pushed out
                let roomy = dec.kept() + usize::from(k) < MAX_KEPT / 2;
                let mut missing = 0;
                for (j, p) in packets.iter().enumerate() {
                    if arrive(j) {
                        dec.on_data(now, fresh, seq.wrapping_add(j as u64), p, &mut out);
                    } else {
                        missing += 1;
                    }
                }
                for p in parity {
                    dec.on_parity(now, p, &mut out);
                }
                for r in &out {
                    let j = r.sequence.wrapping_sub(seq) as usize;
                    if r.instance != fresh || packets.get(j) != Some(&r.packet) {
                        return Err(format!("block {k}+{m}: packet {j} rebuilt wrong"));
                    }
                }
                // A block whose numbers pass u64::MAX is refused as a lie (a
                // sender numbers from 0 and never gets there): no rebuild.
                let wraps = seq.checked_add(u64::from(k)).is_none();
                if roomy && !wraps && missing <= usize::from(m) && out.len() != missing {
                    return Err(format!(
                        "block {k}+{m}: {missing} missing, {} rebuilt",
                        out.len()
                    ));
                }
            }
        }
        if dec.kept() > MAX_KEPT || dec.pending() > MAX_PENDING {
            return Err(format!("{} kept, {} pending", dec.kept(), dec.pending()));
        }
    }
    dec.poll(now + KEEP_FOR + wait);
    if dec.kept() != 0 || dec.pending() != 0 {
        return Err(format!(
            "{} kept and {} pending after the waits",
            dec.kept(),
            dec.pending()
        ));
    }
    Ok(())
}

/// The handshake target's two gateways: `a` (private key 1) and `b` (2).
pub fn handshake_pair(now: Instant) -> (Handshake, Handshake) {
    let node = |me: u8, other: u8| {
        Handshake::new(
            Setup {
                local: PrivateKey::from_bytes([me; 32]),
                remote: PrivateKey::from_bytes([other; 32]).public(),
                psk: None,
                rekey_after: hs::REKEY_AFTER,
            },
            now,
        )
    };
    (node(1, 2), node(2, 1))
}

/// Handshake messages as gateway `b` receives them from anywhere, with
/// time passing between them. The input is a sequence of records
/// `flags (1) | length (1) | datagram (length)`: flags bit 0 asks for the
/// datagram's MAC to be set right (so that mutations reach the Noise
/// message), the other bits are how many 100 ms pass before it. Invariants:
/// nothing panics, every message `b` sends is a handshake message that
/// parses, and `b` seals exactly when it says it is established (and then
/// has completed a handshake).
pub fn handshake(input: &[u8]) -> Outcome {
    static T0: LazyLock<Instant> = LazyLock::new(Instant::now);
    let mut now = *T0;
    let (_, mut b) = handshake_pair(now);
    let b_public = PrivateKey::from_bytes([2; 32]).public();
    let mut rest = input;
    while let [flags, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let mut datagram = tail[..n].to_vec();
        rest = &tail[n..];
        if flags & 1 == 1 {
            hs::set_mac(&mut datagram, &b_public);
        }
        now += Duration::from_millis(100 * u64::from(flags >> 1));
        b.handle(&datagram, now);
        if b.poll_timeout().is_some_and(|t| t <= now) {
            b.handle_timeout(now);
        }
        while let Some(out) = b.poll_transmit() {
            let (h, _) = Header::parse(&out).map_err(|e| format!("sent a bad header: {e}"))?;
            if h.msg_type != overlay::MsgType::Handshake {
                return Err(format!("sent a {:?}", h.msg_type));
            }
        }
        let keys = b.keys();
        let established = b.state() == State::Established;
        if keys.can_seal() != established {
            return Err(format!(
                "can seal {} in state {:?}",
                keys.can_seal(),
                b.state()
            ));
        }
        if established && b.stats().completed == 0 {
            return Err("established without a completed handshake".into());
        }
    }
    Ok(())
}
