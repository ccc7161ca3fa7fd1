//! Per-packet cost of the data plane: parse + steer + encapsulate, and
//! decapsulate, at several packet sizes and flow counts; sealing and
//! opening; a steering snapshot; cutting a TUN super-packet.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crosslink::config::Policy;
use crosslink::core::crypto::{Key, Keys, ReplayWindow};
use crosslink::core::forward::{
    classify, decapsulate, encapsulate, receive, seal_data, Opener, Sealer, HEADROOM, TRAILER,
};
use crosslink::core::steer::Selection;
use crosslink::core::wire::overlay::Header;
use crosslink::PathId;
use etherparse::PacketBuilder;
use std::hint::black_box;

fn packet(flow: u32, size: usize) -> Vec<u8> {
    let src = [198, 18, (flow >> 16) as u8, (flow >> 8) as u8];
    let b = PacketBuilder::ipv4(src, [198, 19, 0, 1], 64).udp(1024 + (flow & 0xff) as u16, 5000);
    let payload = vec![0u8; size.saturating_sub(28)];
    let mut out = Vec::new();
    b.write(&mut out, &payload).expect("builds");
    out
}

/// Three eligible paths; `weighted` gives the third twice the weight.
fn selection(policy: Policy, weighted: bool) -> Selection {
    let third = if weighted { 2 } else { 1 };
    Selection::new(
        policy,
        Some(PathId(0)),
        vec![(PathId(0), 1), (PathId(1), 1), (PathId(2), third)],
    )
}

fn outbound(c: &mut Criterion) {
    let mut g = c.benchmark_group("outbound");
    for size in [64usize, 576, 1400, 9000] {
        for flows in [1_000u32, 100_000, 1_000_000] {
            // A ring of 1024 distinct packets standing for `flows` flows.
            let step = (flows / 1024).max(1);
            let pkts: Vec<Vec<u8>> = (0..1024).map(|i| packet(i * step, size)).collect();
            let mut bufs: Vec<Vec<u8>> = pkts
                .iter()
                .map(|p| {
                    let mut b = vec![0u8; HEADROOM + p.len()];
                    b[HEADROOM..].copy_from_slice(p);
                    b
                })
                .collect();
            let cases = [
                (Policy::ActiveBackup, false, "active-backup"),
                (Policy::Balance, false, "balance"),
                (Policy::Balance, true, "balance-weighted"),
            ];
            for (policy, weighted, name) in cases {
                let sel = selection(policy, weighted);
                g.throughput(Throughput::Elements(1));
                let id = BenchmarkId::new(format!("{name}/{size}B"), flows);
                let mut i = 0usize;
                g.bench_function(id, |b| {
                    b.iter(|| {
                        i = (i + 1) & 1023;
                        let buf = &mut bufs[i];
                        let inner_len = buf.len() - HEADROOM;
                        let place = classify(&sel, &buf[HEADROOM..]).expect("placed");
                        let n = encapsulate(buf, inner_len, &Header::data(i as u64)).expect("fits");
                        black_box((place, n))
                    })
                });
            }
        }
    }
    g.finish();
}

fn inbound(c: &mut Criterion) {
    let mut g = c.benchmark_group("inbound");
    for size in [64usize, 576, 1400, 9000] {
        let p = packet(7, size);
        let mut buf = vec![0u8; HEADROOM + p.len()];
        buf[HEADROOM..].copy_from_slice(&p);
        let r = encapsulate(&mut buf, p.len(), &Header::data(1)).expect("fits");
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("decapsulate", size), |b| {
            b.iter(|| {
                black_box(decapsulate(black_box(&buf[r.clone()])).map(|(_, inner)| inner.len()))
            })
        });
    }
    g.finish();
}

/// Sealing and opening (AES-256-GCM) a data packet, per packet.
fn sealed(c: &mut Criterion) {
    let mut g = c.benchmark_group("sealed");
    let keys = Keys::new(&Key::from_bytes([7; 32]), None);
    let sealer = Sealer {
        keys: &keys,
        epoch: 1,
        salt: 42,
    };
    for size in [64usize, 1400, 9000] {
        let p = packet(7, size);
        let mut buf = vec![0u8; HEADROOM + p.len() + TRAILER];
        g.throughput(Throughput::Bytes(size as u64));
        let mut seq = 0u64;
        g.bench_function(BenchmarkId::new("seal", size), |b| {
            b.iter(|| {
                seq += 1;
                buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
                black_box(seal_data(&mut buf, p.len(), &Header::data(seq), &sealer).is_ok())
            })
        });
        let mut sealed: Vec<Vec<u8>> = (1..=1024u64)
            .map(|s| {
                buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
                let r = seal_data(&mut buf, p.len(), &Header::data(s), &sealer).expect("fits");
                buf[r].to_vec()
            })
            .collect();
        let originals = sealed.clone();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("open", size), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                sealed[i].copy_from_slice(&originals[i]);
                // A fresh window each time: the bench measures the cipher,
                // not replay refusals.
                let mut window = ReplayWindow::default();
                let opener = Opener {
                    keys: &keys,
                    salt: 42,
                    window: &mut window,
                };
                black_box(receive(&mut sealed[i], Some(opener)).is_ok())
            })
        });
    }
    g.finish();
}

/// What a change of a weighted `balance` peer costs the BFD thread: the
/// snapshot with its bucket table.
fn snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    for weighted in [false, true] {
        let name = if weighted {
            "balance-weighted"
        } else {
            "balance"
        };
        g.bench_function(name, |b| {
            b.iter(|| black_box(selection(Policy::Balance, weighted)))
        });
    }
    g.finish();
}

/// Cutting a 64 KiB TCP super-packet into 1404-byte segments: headers and
/// checksums of all segments (the payload is not copied), next to the
/// same with tun-rs's cutter, which copies each segment out.
fn segment(c: &mut Criterion) {
    use crosslink::core::segment::{Cut, VnetHeader, MAX_HEADERS};
    let b = PacketBuilder::ipv4([198, 18, 10, 1], [198, 18, 30, 2], 64)
        .tcp(40_000, 5201, 1, 1000)
        .ack(1);
    let mut packet = Vec::new();
    b.write(&mut packet, &vec![7u8; 46 * 1404]).expect("builds");
    let vnet = VnetHeader {
        flags: 1,
        gso_type: 1,
        hdr_len: 40,
        gso_size: 1404,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut g = c.benchmark_group("segment");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("cut-64k", |bench| {
        let mut h = [0u8; MAX_HEADERS];
        bench.iter(|| {
            let Ok(Cut::Segments(s)) = Cut::of(&vnet, black_box(&packet)) else {
                panic!("not cut");
            };
            for i in 0..s.count() {
                black_box(s.header(&packet, i, &mut h));
            }
        })
    });
    g.bench_function("tun-rs-gso-split-64k", |bench| {
        let hdr = tun_rs::VirtioNetHdr {
            flags: vnet.flags,
            gso_type: vnet.gso_type,
            hdr_len: vnet.hdr_len,
            gso_size: vnet.gso_size,
            csum_start: vnet.csum_start,
            csum_offset: vnet.csum_offset,
        };
        let mut input = packet.clone();
        let mut bufs = vec![vec![0u8; 1500]; 64];
        let mut sizes = vec![0usize; 64];
        bench.iter(|| {
            black_box(tun_rs::gso_split(
                &mut input, hdr, &mut bufs, &mut sizes, 0, false,
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, outbound, inbound, sealed, snapshot, segment);
criterion_main!(benches);
