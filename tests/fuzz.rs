//! Fuzzing on the stable toolchain: a self-contained, coverage-less fuzzer.
//!
//! Every target first replays its seed corpus (`fuzz/corpus/<target>/`,
//! committed, small files), then mutates corpus entries with a fast
//! PRNG-driven mutator (bit flips, interesting values, insertions,
//! deletions, splices, truncation) for `CROSSLINK_FUZZ_SECS` seconds
//! (default 1; `.ci/run` uses 20). A target fails on a panic, which
//! includes arithmetic overflow in these debug builds, or on a broken
//! invariant; the input is written to `fuzz/crashes/<target>-<hash>` and
//! its hex printed, so that it can be added to the corpus once fixed.
//!
//! Reproduce one input: `CROSSLINK_FUZZ_INPUT=path cargo test --test fuzz <target>`.
//! Each target prints one line: `fuzz <target>: N executions in S s (corpus C)`.

use crosslink::config::Config;
use crosslink::core::bfd::{Session, SessionConfig, State};
use crosslink::core::crypto::{Key, Keys, ReplayWindow};
use crosslink::core::engine::Engine;
use crosslink::core::forward::{self, Sealer, HEADROOM};
use crosslink::core::rng::Rng;
use crosslink::core::wire::bfd::ControlPacket;
use crosslink::core::wire::flow::FlowKey;
use crosslink::core::wire::overlay::{self, Header, PeerSeq, ProbeClass, ProbeReport, BASE_LEN};
use crosslink::PathId;
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAX_LEN: usize = 4096;
const INTERESTING: [u8; 10] = [0, 1, 2, 0x7f, 0x80, 0xff, 16, 24, 64, 255 - 16];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let rounds = 1 + rng.index(4);
    for _ in 0..rounds {
        let len = input.len();
        match rng.index(9) {
            0 if len > 0 => {
                let i = rng.index(len);
                input[i] ^= 1 << rng.index(8);
            }
            1 if len > 0 => {
                let i = rng.index(len);
                input[i] = INTERESTING[rng.index(INTERESTING.len())];
            }
            2 if len > 0 => {
                let i = rng.index(len);
                input[i] = rng.next_u64() as u8;
            }
            3 if len < MAX_LEN => {
                let i = rng.index(len + 1);
                let n = 1 + rng.index(16);
                for _ in 0..n {
                    input.insert(i, rng.next_u64() as u8);
                }
            }
            4 if len > 0 => {
                let i = rng.index(len);
                let n = 1 + rng.index((len - i).min(16));
                input.drain(i..i + n);
            }
            5 => input.truncate(rng.index(len + 1)),
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.index(corpus.len())];
                let at = rng.index(len + 1);
                let from = rng.index(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            7 if len >= 2 => {
                // Big-endian 16/32-bit fields: set one to a boundary value.
                let i = rng.index(len - 1);
                let v: u16 = [0, 1, 0xffff, 0x8000, len as u16][rng.index(5)];
                input[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            _ => {
                if len > 0 {
                    let i = rng.index(len);
                    let j = rng.index(len);
                    input.swap(i, j);
                }
            }
        }
        input.truncate(MAX_LEN);
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn load_corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn seconds() -> f64 {
    std::env::var("CROSSLINK_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn fail(target: &str, input: &[u8], why: &str) -> ! {
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/crashes");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{target}-{hash:016x}"));
    let _ = std::fs::write(&file, input);
    let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
    panic!(
        "fuzz {target}: {why}\ninput ({} bytes) saved to {}\nhex: {hex}",
        input.len(),
        file.display()
    );
}

/// Replays the corpus, then fuzzes `body` until the time is up.
fn fuzz(target: &str, body: impl Fn(&[u8]) -> Result<(), String>) {
    let run = |input: &[u8]| match catch_unwind(AssertUnwindSafe(|| body(input))) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => fail(target, input, &why),
        Err(_) => fail(target, input, "panicked"),
    };
    if let Ok(one) = std::env::var("CROSSLINK_FUZZ_INPUT") {
        run(&std::fs::read(one).unwrap());
        return;
    }
    let corpus = load_corpus(target);
    assert!(!corpus.is_empty(), "fuzz {target}: empty seed corpus");
    // Quiet panic messages from caught panics would flood the output.
    for input in &corpus {
        run(input);
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ target.len() as u64;
    let mut rng = Rng::new(seed);
    let budget = Duration::from_secs_f64(seconds());
    let start = Instant::now();
    let mut execs = corpus.len() as u64;
    let mut input = Vec::with_capacity(MAX_LEN);
    while start.elapsed() < budget {
        for _ in 0..64 {
            input.clear();
            input.extend_from_slice(&corpus[rng.index(corpus.len())]);
            mutate(&mut rng, &mut input, &corpus);
            run(&input);
            execs += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {target}: {execs} executions in {secs:.1} s ({:.0}/s, corpus {}, seed {seed:#x})",
        execs as f64 / secs,
        corpus.len()
    );
}

fn test_keys() -> Keys {
    Keys::new(&Key::from_bytes([7; 32]), Some(&Key::from_bytes([8; 32])))
}

#[test]
fn overlay() {
    let keys = test_keys();
    fuzz("overlay", |input| {
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
            if let Ok(forward::Message::Data(_, r)) =
                forward::receive_marked(&mut copy, None, outer)
            {
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
        if let Ok(forward::Message::Data(_, r)) = open(&mut copy, &keys, &mut window) {
            if r.end > copy.len() {
                return Err("opened range out of bounds".into());
            }
        }
        Ok(())
    });
}

/// [`forward::receive`] for a keyed peer, with the salt the targets seal with.
fn open(
    datagram: &mut [u8],
    keys: &Keys,
    window: &mut ReplayWindow,
) -> Result<forward::Message, crosslink::core::drop::DropReason> {
    let opener = forward::Opener {
        keys,
        salt: 3,
        window,
    };
    forward::receive(datagram, Some(opener))
}

/// Sealed datagrams that open, mutated: nothing but the original opens.
#[test]
fn sealed() {
    let keys = test_keys();
    fuzz("sealed", |input| {
        let mut buf = vec![0u8; input.len() + HEADROOM + 16];
        buf[HEADROOM..HEADROOM + input.len()].copy_from_slice(input);
        let sealer = Sealer {
            keys: &keys,
            epoch: 9,
            salt: 3,
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
        let opened = open(&mut copy, &keys, &mut window);
        let ip = matches!(input.first().map(|b| b >> 4), Some(4) if input.len() >= 20)
            || matches!(input.first().map(|b| b >> 4), Some(6) if input.len() >= 40);
        match (&opened, ip) {
            (Ok(forward::Message::Data(_, r)), true) if copy[r.clone()] == *input => {}
            (Err(crosslink::core::drop::DropReason::InnerMalformed), false) => {}
            _ => return Err(format!("sealed input did not open to itself: {opened:?}")),
        }
        // Flip one bit anywhere: must not open.
        let bit = input.iter().map(|&b| usize::from(b)).sum::<usize>() % (sealed.len() * 8);
        let mut bad = sealed.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let mut w2 = ReplayWindow::default();
        if let Ok(o) = open(&mut bad, &keys, &mut w2) {
            return Err(format!("a one-bit change at {bit} still opened: {o:?}"));
        }
        Ok(())
    });
}

#[test]
fn bfd_packet() {
    let now = Instant::now();
    fuzz("bfd", |input| {
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
    });
}

#[test]
fn flow_key() {
    fuzz("flow", |input| {
        let fast = FlowKey::parse(input);
        // The IPv4 fast path must agree with the general parser exactly.
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
    });
}

/// The send side's cutting of TUN super-packets (input: a virtio-net
/// header, then the packet): never panics; segments tile the payload in
/// order, each a packet of its own length; and where tun-rs's cutter
/// (another implementation of the kernel's rules) accepts the same input,
/// the bytes are the same.
#[test]
fn segment() {
    use crosslink::core::segment::{finish_checksum, Cut, VnetHeader, MAX_HEADERS, VNET_HDR_LEN};
    fuzz("segment", |input| {
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
        // Without payload the reference makes nothing; ours passes the
        // headers on as one packet.
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
    });
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
/// packets, each behind a 2-byte big-endian length): never panics; the
/// trains take the packets in order, each once; a merged train stays
/// within the IP length limit, asks for TCP segmentation, and holds no
/// packet with a wrong checksum that its sender did not vouch for.
#[test]
fn coalesce() {
    use crosslink::core::coalesce::{plan, MAX_TRAIN_HEADER, VNET_HDR_LEN};
    fuzz("coalesce", |input| {
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
    });
}

#[test]
fn config() {
    fuzz("config", |input| {
        let text = String::from_utf8_lossy(input);
        if let Ok(c) = Config::parse(&text, "fuzz.toml") {
            let _ = c.check_files();
        }
        Ok(())
    });
}

fn engine_config(side: u8) -> Config {
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
    Config::parse(&text, "fuzz").expect("valid")
}

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

fn check_engine(e: &Engine, now: Instant) -> Result<(), String> {
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

/// Two engines, random operations from the input: time steps, loss per
/// path and direction, junk and replayed datagrams, admin down. After the
/// sequence, a clean second must bring every path up again.
#[test]
fn engine_sequences() {
    let (ca, cb) = (engine_config(1), engine_config(2));
    fuzz("engine", |input| {
        let t0 = Instant::now();
        let mut a = Engine::new(&ca, t0, 1);
        let mut b = Engine::new(&cb, t0, 2);
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
        let _ = State::Up;
        Ok(())
    });
}

/// Path quality fed arbitrary probe replies: 49-byte steps, a byte of time
/// (ms) then a report as the far end would send it. Invariants: nothing
/// panics, loss ratios stay in [0, 1], a round trip is never longer than
/// the run, and a judged path's next deadline is never in the past.
#[test]
fn quality() {
    use crosslink::config::SlaConfig;
    use crosslink::core::quality::{DataCounts, Prober, Quality};
    use crosslink::core::wire::overlay::ProbeReport;
    fuzz("quality", |input| {
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
                ..DataCounts::default()
            };
            if let Some(sample) = prober.handle_reply(probe.seq, report, local, now) {
                q.handle_sample(&sample);
            }
            q.evaluate(now);
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
    });
}

/// Writes the seed corpus (run once by hand: `cargo test --test fuzz write_seeds -- --ignored`).
#[test]
#[ignore]
fn write_seeds() {
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let udp4 = {
        let mut p = vec![0u8; 48];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&48u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 18, 10, 1]);
        p[16..20].copy_from_slice(&[198, 18, 30, 2]);
        p[20..22].copy_from_slice(&1000u16.to_be_bytes());
        p[22..24].copy_from_slice(&2000u16.to_be_bytes());
        p[24..26].copy_from_slice(&28u16.to_be_bytes());
        p
    };
    let mut tcp6 = vec![0u8; 60];
    tcp6[0] = 0x60;
    tcp6[4..6].copy_from_slice(&20u16.to_be_bytes());
    tcp6[6] = 6;
    tcp6[7] = 64;
    tcp6[8] = 0x20;
    tcp6[24] = 0x20;
    tcp6[40..42].copy_from_slice(&443u16.to_be_bytes());
    let mut frag4 = udp4.clone();
    frag4[6] = 0x20; // more fragments
    put("flow", "udp4", &udp4);
    put("flow", "tcp6", &tcp6);
    put("flow", "frag4", &frag4);
    put("flow", "icmp4", &{
        let mut p = udp4.clone();
        p[9] = 1;
        p
    });

    let mut buf = vec![0u8; HEADROOM + udp4.len()];
    buf[HEADROOM..].copy_from_slice(&udp4);
    let r = forward::encapsulate(&mut buf, udp4.len(), &Header::data(1)).unwrap();
    let data = buf[r].to_vec();
    put("overlay", "data", &data);
    let dup = Header::data(2).with_peer_seq(PeerSeq {
        instance: 7,
        sequence: 3,
    });
    let r = forward::encapsulate(&mut buf, udp4.len(), &dup).unwrap();
    put("overlay", "peer-seq", &buf[r]);
    let mut echo = [0u8; BASE_LEN];
    forward::emit_echo(forward::Echo::Request(42), &mut echo).unwrap();
    put("overlay", "echo", &echo);
    let keys = test_keys();
    let sealer = Sealer {
        keys: &keys,
        epoch: 9,
        salt: 3,
    };
    let mut sealed = vec![0u8; HEADROOM + udp4.len() + 16];
    sealed[HEADROOM..HEADROOM + udp4.len()].copy_from_slice(&udp4);
    let r = forward::seal_data(&mut sealed, udp4.len(), &Header::data(5), &sealer).unwrap();
    put("overlay", "sealed", &sealed[r]);
    sealed[HEADROOM..HEADROOM + udp4.len()].copy_from_slice(&udp4);
    let r = forward::seal_data(&mut sealed, udp4.len(), &dup, &sealer).unwrap();
    put("overlay", "sealed-peer-seq", &sealed[r]);
    let mut ext = data.clone();
    ext[2] = 24;
    ext.splice(16..16, [0u8; 8]);
    put("overlay", "extension", &ext);
    let mut probe = vec![0u8; 1200];
    let n = forward::emit_probe(9, ProbeClass::Large, 1200, &mut probe, None).unwrap();
    put("overlay", "probe", &probe[..n]);
    let report = ProbeReport {
        small_received: 90,
        large_received: 10,
        received_at_ns: 1_000_000,
        data_received: 2000,
        data_seq_high: 2010,
        request_len: 64,
    };
    let mut reply = vec![0u8; 128];
    let n = forward::emit_probe_reply(9, &report, &mut reply, Some(&sealer)).unwrap();
    put("overlay", "sealed-probe-reply", &reply[..n]);
    // quality: steps of a time byte and a report, counting up; then a
    // lossy stretch and a far end that restarts.
    let mut steps = Vec::new();
    for i in 0..40u64 {
        let r = ProbeReport {
            small_received: i - i / 10 - i / 7,
            large_received: i / 10,
            received_at_ns: i * 10_000_000 + (i % 3) * 400_000,
            data_received: i * 19,
            data_seq_high: i * 20,
            request_len: if i % 10 == 0 { 1472 } else { 17 },
        };
        steps.push(10u8);
        let mut b = [0u8; ProbeReport::LEN];
        r.emit(&mut b).unwrap();
        steps.extend_from_slice(&b);
    }
    put("quality", "lossy", &steps);
    let mut restart = steps.clone();
    restart.extend_from_slice(&[10u8]);
    restart.extend_from_slice(&[0u8; ProbeReport::LEN]);
    put("quality", "restart", &restart);
    // segment: virtio-net header (host order) + packet.
    let vnet = |gso_type: u8, gso_size: u16, start: u16, offset: u16| {
        let mut h = vec![1u8, gso_type];
        for v in [0u16, gso_size, start, offset] {
            h.extend_from_slice(&v.to_ne_bytes());
        }
        h
    };
    let tcp4_super = {
        let mut p = vec![0u8; 40 + 3000];
        p[0] = 0x45;
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 18, 10, 1]);
        p[16..20].copy_from_slice(&[198, 18, 30, 2]);
        p[32] = 0x50;
        p[33] = 0x18;
        p
    };
    let mut seed = vnet(1, 1000, 20, 16);
    seed.extend_from_slice(&tcp4_super);
    put("segment", "tcp4", &seed);
    let mut tcp6_super = vec![0u8; 60 + 2500];
    tcp6_super[0] = 0x60;
    let len6 = (tcp6_super.len() - 40) as u16;
    tcp6_super[4..6].copy_from_slice(&len6.to_be_bytes());
    tcp6_super[6] = 6;
    tcp6_super[52] = 0x50;
    tcp6_super[53] = 0x10;
    let mut seed = vnet(4, 1200, 40, 16);
    seed.extend_from_slice(&tcp6_super);
    put("segment", "tcp6", &seed);
    let mut udp4_super = udp4.clone();
    udp4_super.resize(28 + 900, 7);
    let len4 = udp4_super.len() as u16;
    udp4_super[2..4].copy_from_slice(&len4.to_be_bytes());
    udp4_super[24..26].copy_from_slice(&(len4 - 20).to_be_bytes());
    let mut seed = vnet(5, 300, 20, 6);
    seed.extend_from_slice(&udp4_super);
    put("segment", "udp4", &seed);
    let mut seed = vnet(0, 0, 20, 6);
    seed.extend_from_slice(&udp4);
    put("segment", "csum", &seed);
    // coalesce: a byte of vouched-for bits, then length-prefixed packets:
    // consecutive segments of one flow, IPv4 and IPv6, one damaged.
    let segment = |v6: bool, seq: u32, damage: bool| {
        let b = if v6 {
            etherparse::PacketBuilder::ipv6([0x20; 16], [0x21; 16], 64)
        } else {
            etherparse::PacketBuilder::ipv4([198, 18, 10, 1], [198, 18, 30, 2], 64)
        };
        let payload = vec![seq as u8; 100];
        let mut p = Vec::new();
        b.tcp(40_000, 5201, seq, 1000)
            .ack(1)
            .write(&mut p, &payload)
            .unwrap();
        if damage {
            *p.last_mut().unwrap() ^= 1;
        }
        p
    };
    for (name, v6, vouched) in [
        ("tcp4", false, 0u8),
        ("tcp6", true, 0),
        ("vouched", false, 0xff),
    ] {
        let mut seed = vec![vouched];
        for i in 0..5u32 {
            let p = segment(v6, i * 100, i == 2);
            seed.extend_from_slice(&(p.len() as u16).to_be_bytes());
            seed.extend_from_slice(&p);
        }
        put("coalesce", name, &seed);
    }
    put("sealed", "udp4", &udp4);
    put("sealed", "tcp6", &tcp6);
    put("sealed", "empty", &[]);

    let pkt = ControlPacket {
        desired_min_tx_us: 1_000_000,
        ..ControlPacket::new(State::Down, 0x1111, 0, 10_000)
    };
    for (name, state, your, poll) in [
        ("down", State::Down, 0, false),
        ("init", State::Init, 0x2222, false),
        ("up-poll", State::Up, 0x2222, true),
        ("admindown", State::AdminDown, 0x2222, false),
    ] {
        let p = ControlPacket {
            state,
            your_discriminator: your,
            poll,
            ..pkt.clone()
        };
        let mut out = [0u8; 64];
        let n = p.emit(&mut out).unwrap();
        put("bfd", name, &out[..n]);
    }
    let mut auth = [0u8; 64];
    let n = pkt.emit(&mut auth).unwrap();
    let mut a = auth[..n].to_vec();
    a[1] |= 0x04; // A bit
    a.extend_from_slice(&[1, 5, 1, b's', b'e', b'c']);
    a[3] = a.len() as u8;
    put("bfd", "auth-simple", &a);

    let cfg_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    if let Ok(d) = std::fs::read_dir(&cfg_dir) {
        for e in d.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml") {
                let text = std::fs::read(&p).unwrap();
                if text.len() < 6000 {
                    put("config", &p.file_name().unwrap().to_string_lossy(), &text);
                }
            }
        }
    }
    put(
        "config",
        "keys.toml",
        b"[gateway]\nname = \"g\"\n[[peer]]\nname = \"p\"\ntun = \"xl-p\"\nkey_file = \"/k\"\naccept_key_file = \"/k2\"\n[[peer.path]]\nname = \"a\"\nlocal = \"198.18.21.1:4800\"\nremote = \"198.18.21.2:4800\"\n",
    );
    // Engine op sequences: converge; lose path 1; junk; time jumps.
    put(
        "engine",
        "converge",
        &[0, 50, 4, 100, 0, 50, 4, 100, 0, 50, 4, 100],
    );
    put(
        "engine",
        "lossy",
        &[4, 100, 2, 1, 0, 200, 4, 20, 3, 2, 4, 50, 2, 0, 4, 100],
    );
    put(
        "engine",
        "junk",
        &[
            5, 0x8c, 0x20, 0xc0, 3, 24, 0, 0, 0, 1, 0, 0, 0, 0, 6, 0, 5, 12,
        ],
    );
    put("engine", "admin", &[2, 0, 3, 0, 7, 16, 2, 0, 3, 0]);
}
