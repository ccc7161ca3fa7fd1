//! The fuzz targets' committed inputs, replayed on every `cargo test`.
//!
//! The targets fuzz under AFL++ (`fuzz/`, README "Fuzzing"); their harnesses live in
//! `fuzz/src/lib.rs`, which this test includes as a module, so that the same function
//! an AFL binary runs is run here on every file of `fuzz/seeds/<target>/` (hand-made
//! inputs and the regression inputs of fixed bugs, `regress-*`) and
//! `fuzz/corpus/<target>/` (the corpus AFL grew, minimised with `cargo afl cmin`).
//! Nothing here needs AFL installed. A failing input is named with its hex.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use crosslink::core::bfd::State;
use crosslink::core::forward::{self, Sealer, HEADROOM};
use crosslink::core::wire::bfd::ControlPacket;
use crosslink::core::wire::overlay::{Header, PeerSeq, ProbeClass, ProbeReport, BASE_LEN};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every seed and corpus input of `target` through its harness; fails naming
/// each input that breaks an invariant or panics.
fn replay(target: &str) {
    let (_, run) = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let seeds = inputs("seeds", target);
    let corpus = inputs("corpus", target);
    assert!(!seeds.is_empty(), "fuzz {target}: no seed inputs");
    assert!(!corpus.is_empty(), "fuzz {target}: no corpus");
    let mut failures = Vec::new();
    for file in seeds.iter().chain(&corpus) {
        let input = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let why = match catch_unwind(AssertUnwindSafe(|| run(&input))) {
            Ok(Ok(())) => continue,
            Ok(Err(why)) => why,
            Err(_) => "panicked".to_string(),
        };
        let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
        failures.push(format!("{}: {why}\n  hex: {hex}", file.display()));
    }
    assert!(
        failures.is_empty(),
        "fuzz {target}: {} of {} inputs fail:\n{}",
        failures.len(),
        seeds.len() + corpus.len(),
        failures.join("\n")
    );
    eprintln!(
        "fuzz {target}: {} seeds and {} corpus inputs pass",
        seeds.len(),
        corpus.len()
    );
}

macro_rules! replay_tests {
    ($($target:ident),*) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*

        /// Every target has a replay test, an AFL binary, seeds and a corpus, and
        /// nothing else lies under `fuzz/seeds/` or `fuzz/corpus/`.
        #[test]
        fn every_target_replayed() {
            let mut tested = vec![$(stringify!($target)),*];
            tested.sort();
            let known: Vec<&str> = harness::TARGETS.iter().map(|(name, _)| *name).collect();
            assert_eq!(tested, known, "replay tests and harness::TARGETS differ");
            let names = |dir: PathBuf, suffix: &str| -> Vec<String> {
                let mut v: Vec<String> = std::fs::read_dir(&dir)
                    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                    .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
                    .filter_map(|n| n.strip_suffix(suffix).map(str::to_owned))
                    .collect();
                v.sort();
                v
            };
            for (dir, suffix) in [("seeds", ""), ("corpus", ""), ("src/bin", ".rs")] {
                assert_eq!(names(fuzz_dir().join(dir), suffix), known, "fuzz/{dir}");
            }
        }
    };
}

replay_tests!(
    bfd, coalesce, config, engine, fec, flow, handshake, overlay, quality, reorder, sealed, segment
);

/// Writes the hand-made seeds into `fuzz/seeds/` (run by hand after changing an input
/// format: `cargo test --test fuzz write_seeds -- --ignored`). Regression inputs
/// (`regress-*`) are committed as they were found, not written here.
#[test]
#[ignore]
fn write_seeds() {
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    // handshake: a real exchange between the harness's two gateways, as
    // records (flags, length, datagram) of what b receives.
    {
        let t0 = std::time::Instant::now();
        let (mut a, mut b) = harness::handshake_pair(t0);
        let record = |flags: u8, d: &[u8]| {
            let mut r = vec![flags, d.len() as u8];
            r.extend_from_slice(d);
            r
        };
        a.handle_timeout(t0);
        let init = a.poll_transmit().unwrap();
        put("handshake", "init", &record(0, &init));
        b.handle(&init, t0);
        let response = b.poll_transmit().unwrap();
        a.handle(&response, t0);
        let confirm = a.poll_transmit().unwrap();
        let mut all = record(0, &init);
        all.extend(record(0, &confirm));
        all.extend(record(0, &init));
        all.extend(record(2, &confirm));
        put("handshake", "exchange", &all);
        put("handshake", "init-late", &record(255, &init));
        // b's response as if it came to b (wrong direction), and a mutated
        // init with its MAC set right.
        let mut bent = init.clone();
        bent[40] ^= 0x55;
        let mut odd = record(0, &response);
        odd.extend(record(1, &bent));
        put("handshake", "odd", &odd);
    }
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
    let keys = harness::test_keys();
    let sealer = Sealer {
        keys: &keys,
        epoch: 9,
        salt: harness::SALT,
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
        data_unsettled: false,
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
            data_unsettled: (12..18).contains(&i),
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

    // fec: ops of 8 bytes (kind, stream, number offset, three arguments)
    let op = |kind: u8, stream: u8, off: i16, a: [u8; 4]| {
        let mut v = vec![kind, stream];
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&a);
        v
    };
    let cat = |ops: &[Vec<u8>]| ops.concat();
    put(
        "fec",
        "true-block",
        &cat(&[
            op(3, 0, 0, [9, 1, 0xff, 0xfb]),
            op(3, 0, 20, [4, 3, 0x0f, 0x05]),
            op(2, 0, 0, [200, 0, 0, 0]),
        ]),
    );
    put(
        "fec",
        "parity-without-data",
        &cat(&[
            op(1, 1, 5, [10, 2, 0, 64]),
            op(1, 1, 5, [10, 2, 1, 64]),
            op(2, 0, 0, [255, 0, 0, 0]),
        ]),
    );
    put(
        "fec",
        "wrong-block-ids",
        &cat(&[
            op(0, 2, 0, [7, 10, 0, 0]),
            op(1, 2, -3, [10, 2, 0, 82]),
            op(1, 2, 0, [10, 2, 5, 82]),
            op(1, 2, 2, [0, 1, 0, 82]),
        ]),
    );
    put(
        "fec",
        "duplicate-parity",
        &cat(&[
            op(1, 0, 0, [4, 2, 0, 20]),
            op(1, 0, 0, [4, 2, 0, 20]),
            op(1, 0, 0, [4, 3, 1, 20]),
            op(0, 0, 1, [1, 2, 0, 0]),
        ]),
    );
}
