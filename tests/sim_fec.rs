//! Forward error correction on a simulated network: the sender's
//! [`Encoder`] and the receiver's [`Decoder`] joined by two paths with a
//! delay, random loss, bursts and deaths, driven by a virtual clock. Parity
//! travels as it does on the wire ([`FecParity::emit`] / [`FecParity::parse`]),
//! on the other path from the data when there is one. No root and no
//! sockets; the same result on every run.

use crosslink::core::fec::{Code, Decoder, Encoder, DEFAULT_HOLD, DEFAULT_WAIT};
use crosslink::core::rng::Rng;
use crosslink::core::wire::overlay::FecParity;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

#[derive(Clone)]
struct PathSpec {
    delay: Duration,
    /// Random loss, per 10 000.
    loss: u64,
    /// Everything sent in [start, start + len) is lost, every `every`.
    burst: Option<(Duration, Duration, Duration)>,
    /// Dead from this time on.
    dies_at: Option<Duration>,
}

fn path(delay_ms: u64, loss: u64) -> PathSpec {
    PathSpec {
        delay: Duration::from_millis(delay_ms),
        loss,
        burst: None,
        dies_at: None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Spread {
    /// Data on path 0 while it lives (then path 1, after `DETECTION`),
    /// parity on the other.
    ActiveBackup,
    /// Data alternately on both paths (`aggregate`), parity on the other
    /// path from the block's last packet.
    Alternate,
}

/// How long the sender takes to notice a dead path (BFD 10 ms x 3).
const DETECTION: Duration = Duration::from_millis(30);

struct Scenario {
    paths: [PathSpec; 2],
    code: Option<Code>,
    spread: Spread,
    pps: u64,
    duration: Duration,
    /// The sender restarts (new instance, open block lost) at this time.
    restart_at: Option<Duration>,
    seed: u64,
}

#[derive(Debug, Default)]
struct Outcome {
    sent: u64,
    lost: u64,
    parity: u64,
    wire_bytes: u64,
    data_bytes: u64,
    rebuilt: u64,
    given_up: u64,
    /// Extra delay of each rebuilt packet: when it was rebuilt less when
    /// it would have arrived.
    extra: Vec<Duration>,
    /// Lost packets sent before/after a given time (for deaths).
    lost_after: BTreeMap<u64, Duration>,
    max_kept: usize,
    pending_at_end: usize,
}

impl Outcome {
    fn loss(&self) -> f64 {
        self.lost as f64 / self.sent as f64
    }
    fn wire_ratio(&self) -> f64 {
        self.wire_bytes as f64 / self.data_bytes as f64
    }
    fn median_extra(&self) -> Duration {
        let mut v = self.extra.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
    fn worst_extra(&self) -> Duration {
        self.extra.iter().max().copied().unwrap_or_default()
    }
}

enum Arrival {
    Data {
        instance: u32,
        seq: u64,
        packet: Vec<u8>,
    },
    Parity(Vec<u8>),
}

fn len_of(seq: u64) -> usize {
    // a mix of full-sized and small packets, as a TCP stream and its acks
    if seq % 3 == 0 {
        80
    } else {
        1400
    }
}

fn packet(instance: u32, seq: u64) -> Vec<u8> {
    let mut p = vec![(seq % 251) as u8; len_of(seq)];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    p[8..12].copy_from_slice(&instance.to_be_bytes());
    p
}

fn lost_on(spec: &PathSpec, at: Duration, rng: &mut Rng) -> bool {
    if spec.dies_at.is_some_and(|d| at >= d) {
        return true;
    }
    if let Some((start, len, every)) = spec.burst {
        if at >= start {
            let phase = (at - start).as_nanos() % every.as_nanos();
            if phase < len.as_nanos() {
                return true;
            }
        }
    }
    rng.below(10_000) < spec.loss
}

fn run(s: &Scenario) -> Outcome {
    let t0 = Instant::now();
    let mut rng = Rng::new(s.seed);
    let mut out = Outcome::default();
    let mut instance = 0x5eed_0001u32;
    let mut enc = s.code.map(|c| Encoder::new(c, DEFAULT_HOLD, instance));
    let mut dec = Decoder::new(DEFAULT_WAIT);
    // (arrival time, order) -> what arrives
    let mut queue: BinaryHeap<Reverse<(Duration, u64)>> = BinaryHeap::new();
    let mut inflight: BTreeMap<u64, Arrival> = BTreeMap::new();
    let mut order = 0u64;
    let mut delivered: BTreeMap<(u32, u64), ()> = BTreeMap::new();
    let mut sent_at: BTreeMap<(u32, u64), Duration> = BTreeMap::new();
    let gap = Duration::from_nanos(1_000_000_000 / s.pps);
    let mut next_send = Duration::ZERO;
    let mut seq = 0u64;
    let mut last_data_path = 0usize;
    let mut restarted = false;
    let mut parity_buf = Vec::new();
    let end = s.duration + Duration::from_millis(500);
    let mut now;
    loop {
        // the next thing to happen: a send, an arrival, a timer
        let mut t = end;
        if next_send < s.duration {
            t = t.min(next_send);
        }
        if let Some(Reverse((at, _))) = queue.peek() {
            t = t.min(*at);
        }
        if let Some(d) = enc.as_ref().and_then(Encoder::deadline) {
            t = t.min(d - t0);
        }
        if let Some(d) = dec.deadline() {
            t = t.min(d.saturating_duration_since(t0));
        }
        if t >= end {
            break;
        }
        now = t;
        let at = t0 + now;
        // arrivals
        while let Some(Reverse((when, o))) = queue.peek().copied() {
            if when > now {
                break;
            }
            queue.pop();
            let mut rebuilt = Vec::new();
            match inflight.remove(&o) {
                Some(Arrival::Data {
                    instance,
                    seq,
                    packet,
                }) if dec.on_data(at, instance, seq, &packet, &mut rebuilt) => {
                    delivered.insert((instance, seq), ());
                }
                Some(Arrival::Data { .. }) => {}
                Some(Arrival::Parity(bytes)) => {
                    let p = FecParity::parse(&bytes).expect("parity parses");
                    dec.on_parity(at, p, &mut rebuilt);
                }
                None => {}
            }
            for r in rebuilt {
                assert_eq!(r.packet, packet(r.instance, r.sequence), "rebuilt exactly");
                assert!(
                    delivered.insert((r.instance, r.sequence), ()).is_none(),
                    "rebuilt a packet that had come"
                );
                if let Some(due) = sent_at.get(&(r.instance, r.sequence)) {
                    out.extra.push(now.saturating_sub(*due));
                }
            }
            out.max_kept = out.max_kept.max(dec.kept());
        }
        dec.poll(at);
        // the sender restarts: the open block and its parity are lost
        if let (Some(r), false) = (s.restart_at, restarted) {
            if now >= r {
                restarted = true;
                instance = instance.wrapping_add(0x100);
                seq = 0;
                enc = s.code.map(|c| Encoder::new(c, DEFAULT_HOLD, instance));
            }
        }
        // a send
        let mut parity = Vec::new();
        if next_send <= now && next_send < s.duration {
            next_send += gap;
            seq += 1;
            let p = packet(instance, seq);
            let dead0 = s.paths[0].dies_at.is_some_and(|d| now >= d + DETECTION);
            let data_path = match s.spread {
                _ if dead0 => 1,
                Spread::ActiveBackup => 0,
                Spread::Alternate => (seq % 2) as usize,
            };
            last_data_path = data_path;
            out.sent += 1;
            out.data_bytes += p.len() as u64;
            out.wire_bytes += p.len() as u64;
            let spec = &s.paths[data_path];
            let due = now + spec.delay;
            sent_at.insert((instance, seq), due);
            if let Some(e) = enc.as_mut() {
                e.push(at, seq, &p, &mut parity);
            }
            if !lost_on(spec, now, &mut rng) {
                order += 1;
                queue.push(Reverse((due, order)));
                inflight.insert(
                    order,
                    Arrival::Data {
                        instance,
                        seq,
                        packet: p,
                    },
                );
            }
        }
        if let Some(e) = enc.as_mut() {
            e.poll(at, &mut parity);
        }
        // parity goes on the other path from the last data packet, unless
        // that one is dead (to the sender's knowledge)
        for p in parity {
            let dead0 = s.paths[0].dies_at.is_some_and(|d| now >= d + DETECTION);
            let pp = if dead0 { 1 } else { 1 - last_data_path };
            parity_buf.resize(p.len(), 0);
            p.emit(&mut parity_buf).expect("room");
            out.parity += 1;
            out.wire_bytes += p.len() as u64;
            let spec = &s.paths[pp];
            if !lost_on(spec, now, &mut rng) {
                order += 1;
                queue.push(Reverse((now + spec.delay, order)));
                inflight.insert(order, Arrival::Parity(parity_buf.clone()));
            }
        }
    }
    for (&(inst, sq), &due) in &sent_at {
        if !delivered.contains_key(&(inst, sq)) {
            out.lost += 1;
            out.lost_after.insert(sq, due);
        }
    }
    let st = dec.stats();
    out.rebuilt = st.recovered;
    out.given_up = st.lost();
    out.pending_at_end = dec.pending();
    out
}

fn scenario(paths: [PathSpec; 2], code: Option<Code>) -> Scenario {
    Scenario {
        paths,
        code,
        spread: Spread::ActiveBackup,
        pps: 2000,
        duration: Duration::from_secs(10),
        restart_at: None,
        seed: 7,
    }
}

fn code(k: u8, m: u8) -> Option<Code> {
    Code::new(k, m)
}

#[test]
fn random_loss_on_both_paths_is_mostly_rebuilt() {
    let lossy = [path(10, 200), path(12, 200)]; // 2 % each
    let plain = run(&scenario(lossy.clone(), None));
    let fec = run(&scenario(lossy, code(10, 2)));
    eprintln!(
        "2 % loss: without FEC {:.3} %, with 10+2 {:.3} % at {:.2}x the bytes; rebuilt {}, extra delay median {:?} worst {:?}",
        plain.loss() * 100.0,
        fec.loss() * 100.0,
        fec.wire_ratio(),
        fec.rebuilt,
        fec.median_extra(),
        fec.worst_extra()
    );
    assert!(plain.loss() > 0.01, "the paths do lose: {}", plain.loss());
    assert!(
        fec.loss() < plain.loss() / 10.0,
        "{} vs {}",
        fec.loss(),
        plain.loss()
    );
    assert!(fec.wire_ratio() < 1.35, "{}", fec.wire_ratio());
    assert!(fec.rebuilt > 200, "{}", fec.rebuilt);
    // every packet lost for good is counted, unless its block's parity
    // was lost too (then the decoder never heard of the block)
    assert!(
        fec.given_up <= fec.lost && fec.lost - fec.given_up <= 3,
        "{} {}",
        fec.lost,
        fec.given_up
    );
    // rebuilt packets come late, but within the decoder's wait (the parity
    // path is 2 ms slower, and a block closes within its hold)
    assert!(
        fec.worst_extra() <= DEFAULT_WAIT + DEFAULT_HOLD,
        "{:?}",
        fec.worst_extra()
    );
    assert!(
        fec.median_extra() < Duration::from_millis(10),
        "{:?}",
        fec.median_extra()
    );
    assert_eq!(fec.pending_at_end, 0);
}

#[test]
fn short_bursts_on_the_data_path_are_repaired_from_the_other() {
    let mut a = path(10, 0);
    // 1 ms lost every 50 ms: two packets at 2000/s
    a.burst = Some((
        Duration::from_millis(7),
        Duration::from_millis(1),
        Duration::from_millis(50),
    ));
    let paths = [a, path(12, 0)];
    let plain = run(&scenario(paths.clone(), None));
    let fec = run(&scenario(paths, code(10, 2)));
    assert!(plain.lost > 300, "{}", plain.lost);
    assert_eq!(
        fec.lost,
        0,
        "{:?}",
        fec.lost_after.keys().take(10).collect::<Vec<_>>()
    );
    assert_eq!(fec.rebuilt, plain.lost);
}

#[test]
fn lost_parity_costs_nothing() {
    // only parity is lost (half of it): no data packet is missing, nothing
    // is rebuilt or given up, and the decoder's memory stays bounded
    let fec = run(&scenario([path(10, 0), path(12, 5000)], code(10, 2)));
    assert_eq!((fec.lost, fec.rebuilt, fec.given_up), (0, 0, 0));
    assert!(fec.parity > 3000);
    assert!(fec.max_kept < 2000, "{}", fec.max_kept);
}

#[test]
fn a_path_dying_mid_block_loses_only_what_cannot_be_rebuilt() {
    let mut a = path(10, 0);
    a.dies_at = Some(Duration::from_millis(2003)); // in the middle of a block
    let fec = run(&scenario([a, path(12, 0)], code(10, 2)));
    // what went to the dead path before the sender noticed is lost (a
    // whole block and more, beyond any parity); nothing else
    let detection_packets = DETECTION.as_millis() as u64 * 2;
    assert!(fec.lost >= detection_packets - 2, "{}", fec.lost);
    assert!(fec.lost <= detection_packets + 12, "{}", fec.lost);
    let first_lost = fec.lost_after.values().min().copied().unwrap();
    let last_lost = fec.lost_after.values().max().copied().unwrap();
    assert!(first_lost >= Duration::from_millis(2003));
    assert!(last_lost <= Duration::from_millis(2003) + DETECTION + Duration::from_millis(11));
    // the blocks cut by the death were given up, not left waiting
    assert_eq!(fec.given_up, fec.lost);
    assert_eq!(fec.pending_at_end, 0);
}

#[test]
fn reordering_between_paths_still_rebuilds() {
    // data spread over a fast and a slow path (15 ms apart), 2 % loss on each
    let mut s = scenario([path(5, 200), path(20, 200)], code(10, 2));
    s.spread = Spread::Alternate;
    let fec = run(&s);
    let mut p = scenario([path(5, 200), path(20, 200)], None);
    p.spread = Spread::Alternate;
    let plain = run(&p);
    assert!(
        fec.loss() < plain.loss() / 5.0,
        "{} vs {}",
        fec.loss(),
        plain.loss()
    );
    assert!(fec.worst_extra() <= DEFAULT_WAIT + DEFAULT_HOLD + Duration::from_millis(15));
}

#[test]
fn a_sender_restart_mid_block_loses_nothing_after_it() {
    let mut s = scenario([path(10, 100), path(12, 100)], code(10, 2));
    s.restart_at = Some(Duration::from_millis(3001));
    let fec = run(&s);
    let plain = run(&scenario([path(10, 100), path(12, 100)], None));
    assert!(
        fec.loss() < plain.loss() / 5.0,
        "{} vs {}",
        fec.loss(),
        plain.loss()
    );
    assert_eq!(fec.pending_at_end, 0);
}

#[test]
fn no_loss_no_rebuilds() {
    let fec = run(&scenario([path(10, 0), path(12, 0)], code(10, 2)));
    assert_eq!((fec.lost, fec.rebuilt, fec.given_up), (0, 0, 0));
    // 10+2 over packets of 80 and 1400 bytes: parity as long as the longest
    let ratio = fec.wire_ratio();
    assert!((1.15..1.35).contains(&ratio), "{ratio}");
}
