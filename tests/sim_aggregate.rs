//! The `aggregate` policy on a simulated network: a sender's scheduler and
//! rate estimators, two paths with a rate, a delay, a queue and loss, and
//! the receiver's resequencer, driven by a virtual clock. No root and no
//! sockets; the same result on every run.
//!
//! The source sends 1500-byte packets at a steady rate just under the sum
//! of the paths' capacities, which it does not know: the estimators start
//! at the default rate and learn from the probes' reports every 10 ms, as
//! the engine does.

use crosslink::core::aggregate::{
    offsets, reorder_wait, Board, Delivery, Estimator, Pick, Scheduler,
};
use crosslink::core::reorder::{Offer, Resequencer};
use crosslink::core::rng::Rng;
use crosslink::PathId;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const LEN: usize = 1500;
const PROBE: Duration = Duration::from_millis(10);
/// BFD 10 ms x 3: a dead path leaves the eligible set this long after.
const DETECTION: Duration = Duration::from_millis(30);

#[derive(Clone)]
struct PathSpec {
    mbit: f64,
    delay_ms: u64,
    /// Random loss after the queue, per mille.
    loss: u64,
    /// Dies (drops everything) at this time from the start.
    dies_at: Option<Duration>,
    /// Its rate is configured (`rate`): the gateway paces it.
    configured: bool,
}

fn spec(mbit: f64, delay_ms: u64) -> PathSpec {
    PathSpec {
        mbit,
        delay_ms,
        loss: 0,
        dies_at: None,
        configured: false,
    }
}

struct SimPath {
    spec: PathSpec,
    rate: f64,
    free_at: Instant,
    seq: u64,
    delivered: u64,
    high: u64,
    sent_packets: u64,
    sent_bytes: u64,
    /// Packets put on the link at their (paced) time: when, and whether the
    /// link lost them; counted as sent once that time has come.
    sends: VecDeque<(Instant, bool)>,
    estimator: Estimator,
}

#[derive(Debug, Default)]
struct Outcome {
    /// Bytes delivered in order or late, over the measured window, per second.
    goodput_mbit: f64,
    offered_mbit: f64,
    /// Share of packets the scheduler gave each path (measured window).
    shares: Vec<f64>,
    lost: u64,
    /// Dropped at the sending gateway: every paced queue full.
    pace_full: u64,
    gave_up: u64,
    late: u64,
    /// Packets delivered out of order (a lower number after a higher one),
    /// and all packets delivered, over the measured window.
    out_of_order: u64,
    delivered: u64,
    /// How long packets were held: median and worst.
    held_median: Duration,
    held_worst: Duration,
    /// Goodput of each 100 ms slot, Mbit/s.
    slots: Vec<f64>,
    /// The final rate estimates, Mbit/s.
    estimates: Vec<f64>,
}

/// The numbers of the packets the resequencer has ready, in order.
fn numbers(reseq: &mut Resequencer) -> Vec<u64> {
    reseq
        .take_ready()
        .map(|h| u64::from_be_bytes(h.data[..8].try_into().unwrap()))
        .collect()
}

/// Packet `number` goes on path `p`'s link at `now`: queued behind what the
/// link holds (at most 20 ms of it, as the lab's shapers), lost or on its
/// way to the far end.
fn enter_link(
    p: &mut SimPath,
    (number, path): (u64, u16),
    now: Instant,
    t0: Instant,
    rng: &mut Rng,
    out: &mut Outcome,
    arrivals: &mut BinaryHeap<Reverse<(Instant, u64, u16)>>,
) {
    let backlog = p.free_at.saturating_duration_since(now).as_secs_f64() * p.rate;
    let limit = p.rate * 0.020;
    let dead = p.spec.dies_at.is_some_and(|d| now >= t0 + d);
    let lost = dead || backlog + LEN as f64 > limit || rng.below(1000) < p.spec.loss;
    if backlog + LEN as f64 <= limit && !dead {
        p.free_at = p.free_at.max(now) + Duration::from_secs_f64(LEN as f64 / p.rate);
    }
    p.sends.push_back((now, lost));
    if lost {
        out.lost += 1;
        return;
    }
    let at = p.free_at + Duration::from_millis(p.spec.delay_ms);
    arrivals.push(Reverse((at, number, path)));
}

fn run(paths: &[PathSpec], load: f64, secs: f64, warmup: f64, seed: u64) -> Outcome {
    let t0 = Instant::now();
    let ids: Vec<PathId> = (0..paths.len() as u16).map(PathId).collect();
    let configured = |s: &PathSpec| s.configured.then_some((s.mbit * 1e6 / 8.0) as u64);
    let board = Board::new(
        &ids.iter()
            .zip(paths)
            .map(|(&id, s)| (id, configured(s)))
            .collect::<Vec<_>>(),
        Duration::from_millis(5),
    );
    for (bp, s) in board.paths.iter().zip(paths) {
        bp.ceiling
            .store(configured(s).unwrap_or(0), Ordering::Relaxed);
    }
    let mut sim: Vec<SimPath> = paths
        .iter()
        .map(|s| SimPath {
            spec: s.clone(),
            rate: s.mbit * 1e6 / 8.0,
            free_at: t0,
            seq: 0,
            delivered: 0,
            high: 0,
            sent_packets: 0,
            sent_bytes: 0,
            sends: VecDeque::new(),
            estimator: Estimator::new(configured(s)),
        })
        .collect();
    let capacity: f64 = paths.iter().map(|p| p.mbit).sum();
    let offered = capacity * load;
    let gap = Duration::from_secs_f64(LEN as f64 * 8.0 / (offered * 1e6));
    let mut rng = Rng::new(seed);
    let mut scheduler = Scheduler::new();
    let mut reseq = Resequencer::new(reorder_wait(&[]));
    // Arrivals at the receiver: (time, packet number, path).
    let mut arrivals: BinaryHeap<Reverse<(Instant, u64, u16)>> = BinaryHeap::new();
    let mut next_send = t0;
    let mut next_probe = t0 + PROBE;
    let end = t0 + Duration::from_secs_f64(secs);
    let from = t0 + Duration::from_secs_f64(warmup);
    let mut out = Outcome {
        offered_mbit: offered,
        shares: vec![0.0; paths.len()],
        slots: vec![0.0; (secs * 10.0).ceil() as usize],
        ..Outcome::default()
    };
    let mut picked = vec![0u64; paths.len()];
    let mut sent_in_window = 0u64;
    let mut delivered_bytes = 0f64;
    let mut last_out: Option<u64> = None;
    let mut held: Vec<(u64, Instant)> = Vec::new();
    let mut holds: Vec<Duration> = Vec::new();
    let mut number = 0u64;
    let mut live: Vec<PathId> = ids.clone();
    let mut deliver = |seq: u64,
                       at: Instant,
                       out: &mut Outcome,
                       held: &mut Vec<(u64, Instant)>,
                       holds: &mut Vec<Duration>| {
        if at >= from {
            delivered_bytes += LEN as f64;
        }
        let slot = (at.saturating_duration_since(t0).as_secs_f64() * 10.0) as usize;
        if let Some(s) = out.slots.get_mut(slot) {
            *s += LEN as f64 * 8.0 * 10.0 / 1e6;
        }
        if at >= from && last_out.is_some_and(|l| seq < l) {
            out.out_of_order += 1;
        }
        if at >= from {
            out.delivered += 1;
        }
        last_out = Some(last_out.map_or(seq, |l| l.max(seq)));
        if let Some(i) = held.iter().position(|&(s, _)| s == seq) {
            let (_, since) = held.swap_remove(i);
            holds.push(at.saturating_duration_since(since));
        }
    };
    // Packets a paced path takes later: (time, packet number, path).
    let mut departures: BinaryHeap<Reverse<(Instant, u64, u16)>> = BinaryHeap::new();
    loop {
        let next_arrival = arrivals.peek().map(|Reverse((t, _, _))| *t);
        let next_departure = departures.peek().map(|Reverse((t, _, _))| *t);
        let next_gap = reseq.poll_timeout();
        let now = [
            Some(next_send),
            Some(next_probe),
            next_arrival,
            next_gap,
            next_departure,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap();
        if now >= end {
            break;
        }
        if next_departure == Some(now) {
            if let Some(Reverse((_, number, path))) = departures.pop() {
                let p = &mut sim[usize::from(path)];
                enter_link(
                    p,
                    (number, path),
                    now,
                    t0,
                    &mut rng,
                    &mut out,
                    &mut arrivals,
                );
            }
            continue;
        }
        if next_gap == Some(now) {
            reseq.handle_timeout(now);
            let ready = numbers(&mut reseq);
            for s in ready {
                deliver(s, now, &mut out, &mut held, &mut holds);
            }
            continue;
        }
        if next_arrival == Some(now) {
            let Some(Reverse((_, seq, path))) = arrivals.pop() else {
                continue;
            };
            let p = &mut sim[usize::from(path)];
            p.delivered += 1;
            let bytes = seq.to_be_bytes();
            match reseq.offer(1, seq, PathId(path), &bytes, true, now) {
                Offer::Deliver | Offer::Late => deliver(seq, now, &mut out, &mut held, &mut holds),
                Offer::Held => held.push((seq, now)),
                Offer::Duplicate => {}
            }
            let ready = numbers(&mut reseq);
            for s in ready {
                deliver(s, now, &mut out, &mut held, &mut holds);
            }
            continue;
        }
        if next_probe == now {
            next_probe = now + PROBE;
            let mut rtts = Vec::new();
            for (i, p) in sim.iter_mut().enumerate() {
                // What has left by now; the far end's highest sequence seen
                // moves when a packet arrives, close enough to count it at
                // sending for the reports.
                while let Some(&(_, lost)) = p.sends.front().filter(|(at, _)| *at <= now) {
                    p.sends.pop_front();
                    p.seq += 1;
                    p.sent_packets += 1;
                    p.sent_bytes += LEN as u64;
                    if !lost {
                        p.high = p.seq;
                    }
                }
                let dead = p.spec.dies_at.is_some_and(|d| now >= t0 + d);
                if dead {
                    continue;
                }
                let queueing = p.free_at.saturating_duration_since(now);
                let rtt = Duration::from_millis(2 * p.spec.delay_ms) + queueing;
                p.estimator.handle(Delivery {
                    at: now,
                    received: p.delivered,
                    seq_high: p.high,
                    sent_bytes: p.sent_bytes,
                    sent_packets: p.sent_packets,
                    rtt,
                    lost: None,
                    lag: Duration::from_millis(50),
                });

                if let (Some(base), Some(d)) = (p.estimator.base_rtt(), p.estimator.delay()) {
                    rtts.push((base, d * 2));
                }
                let bp = &board.paths[i];
                bp.rate.store(p.estimator.rate(), Ordering::Relaxed);
                bp.delay_ns.store(
                    p.estimator.delay().map_or(0, |d| d.as_nanos() as u64),
                    Ordering::Relaxed,
                );
            }
            reseq.set_wait(reorder_wait(&rtts));
            // As the engine publishes them: the working paths' offsets, which
            // the scheduler reads from the board and the receiver holds.
            let bases: Vec<(PathId, Option<Duration>)> = sim
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let dead = p.spec.dies_at.is_some_and(|d| now >= t0 + d + DETECTION);
                    let base = (!dead).then(|| p.estimator.base_rtt()).flatten();
                    (PathId(i as u16), base)
                })
                .collect();
            let offs = offsets(&bases);
            for (id, d) in &offs {
                if let Some(bp) = board.path(*id) {
                    bp.offset_ns.store(d.as_nanos() as u64, Ordering::Relaxed);
                }
            }
            reseq.set_offsets(offs);
            continue;
        }
        // Send the next packet.
        next_send = now + gap;
        // Both gateways' BFD see a dead path within the detection time:
        // the sender stops using it, the receiver stops waiting for it.
        let eligible: Vec<PathId> = ids
            .iter()
            .copied()
            .filter(|id| {
                sim[usize::from(id.0)]
                    .spec
                    .dies_at
                    .is_none_or(|d| now < t0 + d + DETECTION)
            })
            .collect();
        if eligible != live {
            live = eligible.clone();
            reseq.set_live(live.iter().copied(), now);
            let ready = numbers(&mut reseq);
            for s in ready {
                deliver(s, now, &mut out, &mut held, &mut holds);
            }
        }
        // A paced path takes the packet at its pace's time.
        let (path, at) = match scheduler.pick(&board, eligible, LEN, 1, now) {
            Some(Pick::Now(path)) => (path, now),
            Some(Pick::At(path, at)) => (path, at),
            Some(Pick::Full) => {
                out.pace_full += 1;
                continue;
            }
            None => continue,
        };
        number += 1;
        let i = usize::from(path.0);
        if now >= from {
            picked[i] += 1;
            sent_in_window += 1;
        }
        if at > now {
            departures.push(Reverse((at, number, path.0)));
            continue;
        }
        let p = &mut sim[i];
        enter_link(
            p,
            (number, path.0),
            now,
            t0,
            &mut rng,
            &mut out,
            &mut arrivals,
        );
    }
    let window = secs - warmup;
    out.goodput_mbit = delivered_bytes * 8.0 / window / 1e6;
    for (s, n) in out.shares.iter_mut().zip(&picked) {
        *s = *n as f64 / sent_in_window.max(1) as f64;
    }
    let stats = reseq.stats();
    out.gave_up = stats.gave_up;
    out.late = stats.late;
    holds.sort();
    out.held_median = holds.get(holds.len() / 2).copied().unwrap_or_default();
    out.held_worst = holds.last().copied().unwrap_or_default();
    out.estimates = sim
        .iter()
        .map(|p| p.estimator.rate() as f64 * 8.0 / 1e6)
        .collect();
    println!("{out:?}");
    out
}

/// Over the paths' capacity, paced paths (configured rates) lose nothing
/// at their links: the sending gateway holds what a link would take later
/// (within its pace queue) and drops the rest itself; unpaced, the links'
/// 20 ms buffers overflow.
#[test]
fn paced_paths_overflow_at_the_gateway_not_on_the_links() {
    let paced = |mbit, delay_ms| PathSpec {
        configured: true,
        ..spec(mbit, delay_ms)
    };
    let p = run(&[paced(300.0, 5), paced(100.0, 25)], 1.2, 4.0, 1.0, 3);
    let u = run(&[spec(300.0, 5), spec(100.0, 25)], 1.2, 4.0, 1.0, 3);
    assert_eq!(p.lost, 0, "paced: lost on the links");
    assert!(p.pace_full > 0, "paced: nothing dropped at the gateway");
    assert!(u.lost > 0, "unpaced: nothing lost on the links");
    // Pacing counts each datagram's headers: a little under the links' rate.
    assert!(
        p.goodput_mbit > 0.8 * 400.0,
        "paced goodput {:.0} Mbit/s",
        p.goodput_mbit
    );
    assert!((0.7..=0.85).contains(&p.shares[0]), "shares {:?}", p.shares);
    assert!(p.gave_up * 100 < p.delivered, "gave up {}", p.gave_up);
    assert_eq!(p.out_of_order, 0);
}

#[test]
fn equal_paths_carry_the_sum() {
    let o = run(&[spec(300.0, 5), spec(300.0, 5)], 0.9, 4.0, 1.0, 1);
    assert!(
        o.goodput_mbit > 0.95 * o.offered_mbit,
        "goodput {:.0} of {:.0} Mbit/s offered",
        o.goodput_mbit,
        o.offered_mbit
    );
    assert!((0.4..=0.6).contains(&o.shares[0]), "shares {:?}", o.shares);
    assert_eq!(o.out_of_order, 0);
}

#[test]
fn unequal_capacities_share_three_to_one() {
    let o = run(&[spec(300.0, 5), spec(100.0, 5)], 0.9, 5.0, 2.0, 2);
    assert!(
        o.goodput_mbit > 0.9 * o.offered_mbit,
        "goodput {:.0} of {:.0} Mbit/s offered",
        o.goodput_mbit,
        o.offered_mbit
    );
    assert!(
        (0.65..=0.85).contains(&o.shares[0]),
        "shares {:?}",
        o.shares
    );
    assert!(
        o.estimates[1] < 150.0,
        "the slow path's estimate {:?}",
        o.estimates
    );
}

#[test]
fn unequal_delays_use_both_paths_in_order() {
    let o = run(&[spec(300.0, 5), spec(300.0, 25)], 0.9, 4.0, 1.0, 3);
    assert!(
        o.goodput_mbit > 0.95 * o.offered_mbit,
        "goodput {:.0} of {:.0} Mbit/s offered",
        o.goodput_mbit,
        o.offered_mbit
    );
    assert!(o.shares[1] > 0.3, "the slow path carries {:?}", o.shares);
    // What the fast path brings early waits for the slow path's packets,
    // in order, never past the wait (20 ms difference + 5 ms margin, and
    // what late packets added: at most MAX_BOOST).
    assert_eq!(o.out_of_order, 0);
    assert!(
        o.held_worst <= Duration::from_millis(25) + crosslink::core::reorder::MAX_BOOST,
        "held {:?}",
        o.held_worst
    );
}

#[test]
fn random_loss_on_one_path_is_given_up_quickly() {
    let mut lossy = spec(300.0, 5);
    lossy.loss = 10;
    let o = run(&[spec(300.0, 5), lossy], 0.8, 4.0, 1.0, 4);
    assert!(o.gave_up > 0);
    assert!(
        o.goodput_mbit > 0.95 * o.offered_mbit * (1.0 - 0.01),
        "goodput {:.0} of {:.0} Mbit/s offered",
        o.goodput_mbit,
        o.offered_mbit
    );
    // A gap is given up as soon as both paths have passed it (within a run
    // of packets on one path: a millisecond or two), long before the wait
    // runs out.
    assert!(
        o.held_median <= Duration::from_millis(5),
        "median hold {:?}",
        o.held_median
    );
}

#[test]
fn a_path_that_dies_mid_transfer_stalls_nothing() {
    let mut dying = spec(300.0, 5);
    dying.dies_at = Some(Duration::from_secs(2));
    let o = run(&[spec(300.0, 5), dying], 0.9, 4.0, 1.0, 5);
    // 100 ms slots: the slot of the death and every one after carries at
    // least most of the surviving path's rate.
    let after = &o.slots[20..39];
    assert!(
        after.iter().all(|&m| m > 200.0),
        "slots after the death: {after:?}"
    );
    // Nothing waits for the dead path past its detection.
    assert!(
        o.held_worst <= DETECTION + Duration::from_millis(5),
        "held {:?}",
        o.held_worst
    );
}
