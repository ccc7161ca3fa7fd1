use super::*;

const A: PathId = PathId(0);
const B: PathId = PathId(1);

fn board(rates: &[(PathId, u64)], delays_ms: &[u64]) -> Board {
    let paths: Vec<(PathId, Option<u64>)> = rates.iter().map(|&(id, r)| (id, Some(r))).collect();
    let b = Board::new(&paths, MIN_WAIT);
    for (p, d) in b.paths.iter().zip(delays_ms) {
        p.delay_ns.store(d * 1_000_000, Ordering::Relaxed);
    }
    b
}

/// Sends `total` bytes in packets of 1500 at `offered` bytes/s; the bytes
/// each path got.
fn run(b: &Board, offered: f64, total: usize) -> (f64, f64) {
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    let (mut a, mut bb) = (0.0, 0.0);
    let mut sent = 0usize;
    while sent < total {
        let now = t0 + Duration::from_secs_f64(sent as f64 / offered);
        match s.pick(b, [A, B], 1500, 1, now).and_then(Pick::path) {
            Some(A) => a += 1500.0,
            Some(_) => bb += 1500.0,
            None => panic!("no path"),
        }
        sent += 1500;
    }
    (a, bb)
}

#[test]
fn equal_paths_share_equally() {
    let b = board(&[(A, 37_500_000), (B, 37_500_000)], &[5, 5]);
    let (a, bb) = run(&b, 75_000_000.0, 75_000_000);
    let share = a / (a + bb);
    assert!((0.48..=0.52).contains(&share), "share {share}");
}

#[test]
fn shares_follow_the_rates() {
    let b = board(&[(A, 37_500_000), (B, 12_500_000)], &[5, 5]);
    let (a, bb) = run(&b, 50_000_000.0, 50_000_000);
    let share = a / (a + bb);
    assert!((0.72..=0.78).contains(&share), "share {share}");
}

#[test]
fn a_light_load_takes_the_shorter_delay_only() {
    let b = board(&[(A, 37_500_000), (B, 37_500_000)], &[5, 25]);
    // 10 % of one path: the fast path's queue never reaches 20 ms.
    let (a, bb) = run(&b, 3_750_000.0, 3_750_000);
    assert_eq!(bb, 0.0, "{a} on A");
}

#[test]
fn a_full_load_uses_both_paths_despite_the_delays() {
    let b = board(&[(A, 37_500_000), (B, 37_500_000)], &[5, 25]);
    let (a, bb) = run(&b, 75_000_000.0, 150_000_000);
    let share = a / (a + bb);
    assert!((0.45..=0.6).contains(&share), "share {share}");
}

#[test]
fn only_eligible_paths_are_picked() {
    let b = board(&[(A, 37_500_000), (B, 37_500_000)], &[5, 5]);
    let mut s = Scheduler::new();
    let now = Instant::now();
    for _ in 0..100 {
        assert_eq!(s.pick(&b, [B], 1500, 1, now), Some(Pick::Now(B)));
    }
    assert_eq!(s.pick(&b, [], 1500, 1, now), None);
    assert_eq!(
        b.path(B).map(|p| p.picked.load(Ordering::Relaxed)),
        Some(100)
    );
}

fn delivery(at: Instant, received: u64, seq: u64, pkts: u64, rtt_ms: u64) -> Delivery {
    Delivery {
        at,
        received,
        seq_high: seq,
        sent_bytes: pkts * 1000,
        sent_packets: pkts,
        rtt: Duration::from_millis(rtt_ms),
        lost: None,
        lag: Duration::from_millis(50),
    }
}

#[test]
fn a_lossy_busy_path_is_estimated_at_what_it_delivered() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    assert_eq!(e.handle(delivery(t, 0, 0, 0, 2)), None);
    // 100 ms: 40 000 sent, 36 000 delivered (10 % dropped by a policer).
    let r = e.handle(delivery(t + ESTIMATE_PERIOD, 36_000, 40_000, 40_000, 2));
    assert_eq!(r, Some(Revision::Congested));
    // 36 000 packets of 1000 bytes in 0.1 s.
    assert_eq!(e.rate(), 360_000_000);
}

#[test]
fn datagrams_of_a_lane_running_late_are_not_loss() {
    // The far end saw numbers 10 % ahead of what it received (another
    // lane's datagrams still on their way), but the path's quality counted
    // nothing lost: no capacity is read from it.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    let late = |at, received, seq, pkts, lost| Delivery {
        lost: Some(lost),
        ..delivery(at, received, seq, pkts, 2)
    };
    assert_eq!(e.handle(late(t, 0, 0, 0, 0)), None);
    let r = e.handle(late(t + ESTIMATE_PERIOD, 36_000, 40_000, 40_000, 0));
    assert_ne!(r, Some(Revision::Congested));
    assert!(e.rate() >= DEFAULT_RATE, "{}", e.rate());
    // What it counted lost is: 10 % of the next period.
    let r = e.handle(late(t + ESTIMATE_PERIOD * 2, 80_000, 80_000, 80_000, 4_000));
    assert_eq!(r, Some(Revision::Congested));
    assert_eq!(e.rate(), 360_000_000);
}

#[test]
fn a_queue_building_up_reads_as_congestion() {
    // Starting at 100 Mbit/s (12.5 MB/s), 10 MB/s delivered behind a queue.
    let mut e = Estimator::new(Some(12_500_000));
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    let r = e.handle(delivery(t + ESTIMATE_PERIOD, 1000, 1000, 1000, 20));
    assert_eq!(r, Some(Revision::Congested));
    assert_eq!(e.rate(), 10_000_000);
}

#[test]
fn the_estimate_at_most_halves_per_period_and_ignores_light_use() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    // 40 MB/s sent, a tenth of it delivered behind a queue: half the
    // estimate at most.
    let r = e.handle(delivery(t + ESTIMATE_PERIOD, 400, 4000, 4000, 30));
    assert_eq!(r, Some(Revision::Congested));
    assert_eq!(e.rate(), DEFAULT_RATE / 2);
    // Still behind the queue: halves again, no further.
    let r = e.handle(delivery(t + ESTIMATE_PERIOD * 2, 450, 4100, 4100, 30));
    assert_eq!(r, Some(Revision::Congested));
    assert_eq!(e.rate(), DEFAULT_RATE / 4);
}

#[test]
fn light_random_loss_is_not_a_capacity() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    // 2 % lost, no queue: the estimate stays.
    let r = e.handle(delivery(t + ESTIMATE_PERIOD, 9800, 10_000, 10_000, 2));
    assert_ne!(r, Some(Revision::Congested));
    assert!(e.rate() >= DEFAULT_RATE);
}

#[test]
fn a_clean_path_near_its_estimate_grows_up_to_the_ceiling() {
    let mut e = Estimator::new(Some(20_000_000));
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    // Sending 18 MB/s (0.9 of the ceiling), nothing lost.
    let r = e.handle(delivery(t + ESTIMATE_PERIOD, 1800, 1800, 1800, 2));
    assert_eq!(r, None, "at its ceiling already");
    assert_eq!(e.rate(), 20_000_000, "never above the ceiling");
    let mut e = Estimator::new(None);
    e.handle(delivery(t, 0, 0, 0, 2));
    e.handle(delivery(t + ESTIMATE_PERIOD, 36_000, 40_000, 40_000, 2));
    let before = e.rate();
    let r = e.handle(delivery(t + ESTIMATE_PERIOD * 2, 72_000, 76_000, 76_000, 2));
    assert_eq!(r, Some(Revision::Grown));
    assert_eq!(e.rate(), before + before / 4);
}

#[test]
fn what_a_path_delivers_cleanly_raises_its_estimate_to_it() {
    // A slow start: 100 Mbit/s estimated, and the path delivers 250 Mbit/s
    // (3125 datagrams of 1000 bytes in 100 ms) without loss: the estimate
    // is 250 at once, not a quarter more than 100.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    let r = e.handle(delivery(t + ESTIMATE_PERIOD, 3125, 3125, 3125, 2));
    assert_eq!(r, Some(Revision::Grown));
    assert_eq!(e.rate(), 31_250_000);
    // Probes 4 ms over the base: not a queue that marks congestion, but
    // no room to grow by a quarter either. Delivering 500 Mbit/s cleanly
    // still raises the estimate to that, and only to that.
    let r = e.handle(delivery(t + ESTIMATE_PERIOD * 2, 9375, 9375, 9375, 6));
    assert_eq!(r, Some(Revision::Grown));
    assert_eq!(e.rate(), 62_500_000);
    let r = e.handle(delivery(t + ESTIMATE_PERIOD * 3, 15_625, 15_625, 15_625, 6));
    assert_eq!(r, None);
    assert_eq!(e.rate(), 62_500_000);
    // What a period that lost a little delivered counts too (100 of
    // 12 500 lost: under the 5 % that reads as a full path).
    let mut e = Estimator::new(None);
    e.handle(delivery(t, 0, 0, 0, 6));
    e.handle(delivery(t + ESTIMATE_PERIOD, 12_400, 12_500, 12_500, 6));
    assert_eq!(e.rate(), 124_000_000);
    // Never past a configured ceiling.
    let mut e = Estimator::new(Some(20_000_000));
    e.handle(delivery(t, 0, 0, 0, 6));
    e.handle(delivery(t + ESTIMATE_PERIOD, 2500, 2500, 2500, 6));
    assert_eq!(e.rate(), 20_000_000);
}

#[test]
fn an_estimate_cut_by_congestion_waits_before_growing_again() {
    // 300 MB/s delivered cleanly, then 250 behind a queue: 250 is the
    // path's capacity. Carrying 220 cleanly afterwards would grow the
    // estimate by a quarter, past that capacity: not for GROW_HOLD.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    e.handle(delivery(t + ESTIMATE_PERIOD, 30_000, 30_000, 30_000, 2));
    assert_eq!(e.rate(), 300_000_000);
    let cut = t + ESTIMATE_PERIOD * 2;
    let r = e.handle(delivery(cut, 55_000, 55_000, 55_000, 20));
    assert_eq!(r, Some(Revision::Congested));
    assert_eq!(e.rate(), 250_000_000);
    let mut n = 55_000;
    let mut at = cut;
    while at + ESTIMATE_PERIOD * 2 < cut + GROW_HOLD {
        at += ESTIMATE_PERIOD;
        n += 22_000;
        assert_eq!(e.handle(delivery(at, n, n, n, 2)), None);
        assert_eq!(e.rate(), 250_000_000);
    }
    // What it delivers cleanly still raises it meanwhile.
    at += ESTIMATE_PERIOD / 2;
    n += 13_000;
    assert_eq!(e.handle(delivery(at, n, n, n, 2)), None);
    at += ESTIMATE_PERIOD / 2;
    n += 13_000;
    assert_eq!(e.handle(delivery(at, n, n, n, 2)), Some(Revision::Grown));
    assert_eq!(e.rate(), 260_000_000);
    // Once the hold is over, the quarter's growth again.
    at += ESTIMATE_PERIOD;
    n += 22_000;
    assert!(at >= cut + GROW_HOLD);
    assert_eq!(e.handle(delivery(at, n, n, n, 2)), Some(Revision::Grown));
    assert_eq!(e.rate(), 325_000_000);
}

#[test]
fn an_idle_path_keeps_its_estimate() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    assert_eq!(e.handle(delivery(t + ESTIMATE_PERIOD, 0, 0, 0, 2)), None);
    assert_eq!(e.rate(), DEFAULT_RATE);
}

#[test]
fn the_wait_covers_the_delay_difference() {
    let ms = Duration::from_millis;
    let same = |rtt| (rtt, rtt);
    assert_eq!(reorder_wait(&[]), MIN_WAIT);
    assert_eq!(
        reorder_wait(&[same(ms(1)), same(ms(1))]),
        WAIT_MARGIN.max(MIN_WAIT)
    );
    // 5 ms and 25 ms one way: round trips 10 and 50 ms.
    assert_eq!(
        reorder_wait(&[same(ms(10)), same(ms(50))]),
        ms(20) + WAIT_MARGIN
    );
    assert_eq!(reorder_wait(&[same(ms(1)), same(ms(2000))]), MAX_WAIT);
    // Equal paths, one behind a 10 ms queue: its packets come 10 ms later
    // one way (the queue is in our data's direction, not half of it).
    assert_eq!(
        reorder_wait(&[(ms(10), ms(20)), same(ms(10))]),
        ms(10) + WAIT_MARGIN
    );
}

#[test]
fn a_queue_under_its_own_data_marks_the_path_congested_for_a_while() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    e.handle(delivery(t + PROBE, 100, 100, 100, 2));
    assert!(!e.congested(t + PROBE));
    // The round trip jumps while data flows: a queue of our own, once it
    // has stood for QUEUE_CONFIRM.
    let mut at = t + PROBE;
    let mut n = 1;
    let first = at + PROBE;
    while at < first + QUEUE_CONFIRM {
        at += PROBE;
        n += 1;
        e.handle(delivery(at, n * 100, n * 100, n * 100, 25));
        assert_eq!(
            e.congested(at),
            at >= first + QUEUE_CONFIRM,
            "at {:?}",
            at - t
        );
    }
    // Once it stood for QUEUE_CONFIRM, for CONGESTION_MEMORY.
    assert!(e.congested(at + CONGESTION_MEMORY - PROBE));
    assert!(!e.congested(at + CONGESTION_MEMORY));
}

#[test]
fn late_probes_that_come_back_together_are_a_stall_not_a_queue() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    e.handle(delivery(t + PROBE, 100, 100, 100, 2));
    // The host stalls for 300 ms: the 30 probes sent meanwhile all come
    // back when it resumes, late by up to the stall, then the path is
    // quick again. Data was flowing the whole time.
    let resume = t + PROBE + Duration::from_millis(300);
    let mut n = 1;
    for late in (1..=30u64).rev() {
        n += 1;
        e.handle(delivery(resume, n * 100, n * 100, n * 100, 2 + late * 10));
    }
    for i in 1..=50u32 {
        n += 1;
        e.handle(delivery(resume + PROBE * i, n * 100, n * 100, n * 100, 2));
    }
    for i in 0..=50u32 {
        assert!(!e.congested(resume + PROBE * i));
    }
    // A queue broken by one quick probe starts over.
    let mut at = resume + PROBE * 50;
    for i in 0..18u64 {
        at += PROBE;
        n += 1;
        let rtt = if i == 8 { 2 } else { 25 };
        e.handle(delivery(at, n * 100, n * 100, n * 100, rtt));
        assert!(!e.congested(at), "probe {i}");
    }
}

#[test]
fn a_slow_probe_without_data_is_not_congestion() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    e.handle(delivery(t + PROBE, 0, 0, 0, 2));
    // Nothing sent: a longer round trip is the path's, not our queue.
    e.handle(delivery(t + PROBE * 2, 0, 0, 0, 40));
    assert!(!e.congested(t + PROBE * 2));
}

const PROBE: Duration = Duration::from_millis(10);

/// A path at `rate` bytes/s (its ceiling) carrying `share` of it in 1000-byte
/// datagrams, reported every PROBE; `lost(i)`: the datagrams path quality
/// has confirmed lost by report `i`. Whether it reads as congested after
/// each report.
fn loaded_run(share: f64, reports: u32, lost: impl Fn(u32) -> i64) -> Vec<bool> {
    let rate = 12_500_000u64;
    let mut e = Estimator::new(Some(rate));
    let t = Instant::now();
    let per_probe = (rate as f64 * share * PROBE.as_secs_f64() / 1000.0) as u64;
    (0..=reports)
        .map(|i| {
            let at = t + PROBE * i;
            let sent = u64::from(i) * per_probe;
            let lost = lost(i);
            e.handle(Delivery {
                lost: Some(lost),
                ..delivery(at, sent - lost as u64, sent, sent, 2)
            });
            e.congested(at)
        })
        .collect()
}

#[test]
fn loss_while_the_path_is_loaded_is_congestion_without_a_queue() {
    // A policer (or a short queue) drops 3 datagrams at 0.5 s while the
    // path carries 90 % of its estimate: no queue shows in the round trip.
    let v = loaded_run(0.9, 500, |i| if i >= 50 { 3 } else { 0 });
    assert!(!v[49], "nothing lost yet");
    assert!(v[50], "the loss at load is congestion");
    let memory = (CONGESTION_MEMORY.as_millis() / PROBE.as_millis()) as usize;
    assert!(v[50 + memory - 1], "remembered for CONGESTION_MEMORY");
    assert!(!v[50 + memory], "then forgotten");
}

#[test]
fn loss_on_a_lightly_loaded_path_is_not_congestion() {
    // The same loss while the path carries a tenth of its estimate.
    let v = loaded_run(0.1, 200, |i| if i >= 50 { 3 } else { 0 });
    assert!(v.iter().all(|&c| !c));
}

#[test]
fn a_steady_load_on_a_path_that_sickens_is_not_congestion() {
    // A steady load (2.5 MB/s, not congestion-controlled) on a path with
    // no ceiling, 5 % lost from 3 s on: the estimate has grown past the
    // load by then, so the path is not loaded and the loss is its own.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    let (mut sent, mut lost) = (0u64, 0u64);
    for i in 0..=500u32 {
        let at = t + PROBE * i;
        if i > 0 {
            sent += 25;
        }
        if i > 300 && i % 4 == 0 {
            lost += 5;
        }
        e.handle(Delivery {
            lost: Some(lost as i64),
            ..delivery(at, sent - lost, sent, sent, 2)
        });
        assert!(!e.congested(at), "report {i}, estimate {}", e.rate());
    }
}

#[test]
fn loss_that_goes_on_once_the_load_backed_off_is_the_paths_own() {
    // 5 % lost from 0.5 s on: a TCP stream loading the path backs off at
    // once (to a tenth of the estimate), the loss goes on. Congestion at
    // first, the path's own within LOAD_MEMORY, the confirmation lag and two periods.
    let rate = 12_500_000u64;
    let mut e = Estimator::new(Some(rate));
    let t = Instant::now();
    let (mut sent, mut lost) = (0u64, 0u64);
    let mut congested = Vec::new();
    for i in 0..=150u32 {
        let at = t + PROBE * i;
        let share = if i <= 55 { 0.9 } else { 0.1 };
        let n = (rate as f64 * share * PROBE.as_secs_f64() / 1000.0) as u64;
        if i > 0 {
            sent += n;
        }
        if i > 50 {
            lost += n.div_ceil(20);
        }
        e.handle(Delivery {
            lost: Some(lost as i64),
            ..delivery(at, sent - lost, sent, sent, 2)
        });
        congested.push(e.congested(at));
    }
    let on: Vec<usize> = (0..congested.len()).filter(|&i| congested[i]).collect();
    assert!(congested[52], "the first losses came at load: {on:?}");
    let by = 55
        + ((LOAD_MEMORY + Duration::from_millis(50) + ESTIMATE_PERIOD * 2).as_millis()
            / PROBE.as_millis()) as usize;
    assert!(!congested[by], "still congested at report {by}: {on:?}");
    assert!(congested[by..].iter().all(|&c| !c));
}

#[test]
fn a_longer_route_seen_without_our_data_moves_the_base() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 1));
    e.handle(delivery(t + PROBE, 0, 0, 0, 1));
    assert_eq!(e.base_rtt(), Some(Duration::from_millis(1)));
    // The route gets longer: 50 ms, still no data of ours.
    let mut at = t + PROBE;
    let mut k = 0;
    while at < t + PROBE * 2 + BASE_MOVED {
        at += PROBE;
        k += 1;
        // One probe of the run a little quicker: the lowest is the base.
        let rtt = if k == 3 { 49 } else { 50 };
        e.handle(delivery(at, 0, 0, 0, rtt));
    }
    assert_eq!(e.base_rtt(), Some(Duration::from_millis(49)));
    // Data at the new delay is no queue: a path that carries nearly its
    // estimate grows rather than being read at what it delivered.
    let mut n = 0;
    let start = e.rate();
    for _ in 0..30 {
        at += PROBE;
        n += 1_250;
        e.handle(delivery(at, n, n, n, 50));
        assert!(!e.congested(at));
    }
    assert!(e.rate() > start, "{} <= {start}", e.rate());
}

#[test]
fn a_queue_under_our_data_does_not_move_the_base() {
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 1));
    // 500 ms of probes behind a 40 ms queue, data going out all along.
    let mut n = 0;
    for i in 1..=50 {
        n += 1_000;
        e.handle(delivery(t + PROBE * i, n, n, n, 40));
    }
    assert_eq!(e.base_rtt(), Some(Duration::from_millis(1)));
    assert!(e.congested(t + PROBE * 50));
    // Idle, but for less than BASE_MOVED: the base stays.
    let mut at = t + PROBE * 50;
    while at + PROBE < t + PROBE * 50 + BASE_MOVED {
        at += PROBE;
        e.handle(delivery(at, n, n, n, 30));
    }
    assert_eq!(e.base_rtt(), Some(Duration::from_millis(1)));
}

#[test]
fn offsets_bring_every_path_to_the_longest_delay() {
    let got = offsets(&[
        (A, Some(Duration::from_millis(10))),
        (B, Some(Duration::from_millis(50))),
        (PathId(2), None),
    ]);
    assert_eq!(
        got,
        vec![
            (A, Duration::from_millis(20)),
            (B, Duration::ZERO),
            (PathId(2), Duration::ZERO)
        ]
    );
    // Never more than the longest wait.
    let far = offsets(&[
        (A, Some(Duration::from_millis(1))),
        (B, Some(Duration::from_secs(2))),
    ]);
    assert_eq!(far[0], (A, MAX_WAIT));
}

#[test]
fn with_the_delays_evened_out_a_load_shares_by_rate() {
    // 5 ms and 25 ms one way, the receiver holding A's packets 20 ms: only
    // the queues tell the paths apart, and a load a little over one path's
    // rate is shared rather than queued on A up to the difference.
    let b = board(&[(A, 37_500_000), (B, 37_500_000)], &[5, 25]);
    if let Some(p) = b.path(A) {
        p.offset_ns.store(20_000_000, Ordering::Relaxed);
    }
    let (a, bb) = run(&b, 45_000_000.0, 90_000_000);
    let share = a / (a + bb);
    assert!((0.45..=0.55).contains(&share), "share {share}");
}

#[test]
fn a_queue_never_raises_the_estimate() {
    // 100 Mbit/s estimated; the far end counted 200 Mbit/s in a period
    // behind a queue (what queued before it came through): still 100.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    let r = e.handle(delivery(t + ESTIMATE_PERIOD, 2_500, 2_500, 2_500, 30));
    assert_eq!(r, Some(Revision::Congested));
    assert_eq!(e.rate(), DEFAULT_RATE);
}

#[test]
fn a_path_whose_probes_stand_behind_a_queue_does_not_grow() {
    // Loaded at its estimate without loss, probes 4 ms over the base: not
    // a queue that marks congestion (the margin is 5 ms), but no room to
    // grow either.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    let mut n = 0;
    for i in 1..=30 {
        // 125 datagrams of 1000 bytes every 10 ms: 12.5 MB/s.
        n += 125;
        let r = e.handle(delivery(t + PROBE * i, n, n, n, 6));
        assert_ne!(r, Some(Revision::Grown));
    }
    assert_eq!(e.rate(), DEFAULT_RATE);
}

#[test]
fn loss_right_after_a_queue_under_our_data_is_congestion() {
    // The estimate is far above what the path carries (it overshot), so
    // the load reads as light; but a probe came back behind a queue while
    // our data was on it, and what is lost just after is the queue's.
    let mut e = Estimator::new(Some(125_000_000));
    let t = Instant::now();
    let d = |at, pkts, rtt, lost| Delivery {
        lost: Some(lost),
        ..delivery(at, pkts, pkts, pkts, rtt)
    };
    e.handle(d(t, 0, 2, 0));
    e.handle(d(t + PROBE, 100, 30, 0));
    e.handle(d(t + PROBE * 2, 150, 3, 20));
    assert!(e.load_congested(t + PROBE * 2));
    assert!(e.congested(t + PROBE * 2));
}

#[test]
fn a_route_a_little_longer_moves_the_base_too() {
    // 3 ms longer: less than the queue margin, but the base still moves.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 10));
    let mut at = t;
    while at < t + PROBE * 2 + BASE_MOVED {
        at += PROBE;
        e.handle(delivery(at, 0, 0, 0, 13));
    }
    assert_eq!(e.base_rtt(), Some(Duration::from_millis(13)));
}

#[test]
fn paths_within_a_millisecond_have_no_offset() {
    let got = offsets(&[
        (A, Some(Duration::from_micros(100))),
        (B, Some(Duration::from_micros(1_500))),
    ]);
    assert_eq!(got, vec![(A, Duration::ZERO), (B, Duration::ZERO)]);
}

/// A board whose paths are paced at their configured rates.
fn paced(rates: &[(PathId, u64)], delays_ms: &[u64]) -> Board {
    let b = board(rates, delays_ms);
    for (p, &(_, r)) in b.paths.iter().zip(rates) {
        p.ceiling.store(r, Ordering::Relaxed);
    }
    b
}

#[test]
fn a_paced_path_spaces_a_burst_and_refuses_past_its_queue() {
    // 12.5 MB/s: a 1500-byte packet counts 1610 bytes, 128.8 us.
    let b = paced(&[(A, 12_500_000)], &[5]);
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    let cost = Duration::from_nanos(wire_len(1500, 1) * 1_000_000_000 / 12_500_000);
    let mut dues = Vec::new();
    let full = loop {
        match s.pick(&b, [A], 1500, 1, t0) {
            Some(Pick::Now(_)) => dues.push(t0),
            Some(Pick::At(_, at)) => dues.push(at),
            Some(Pick::Full) => break dues.len(),
            None => panic!("no path"),
        }
        assert!(dues.len() < 10_000, "never full");
    };
    // The idle path sends its burst's worth at once, then one packet's
    // time apart, up to the queue's depth.
    let burst = (nanos(PACE_BURST) / nanos(cost)) as usize;
    assert!(
        dues.iter().take(burst).all(|&d| d == t0),
        "{:?}",
        &dues[..burst + 2]
    );
    for w in dues[burst + 1..].windows(2) {
        assert_eq!(w[1] - w[0], cost);
    }
    let last = *dues.last().unwrap() - t0;
    assert!(
        last <= PACE_QUEUE && last + cost * 2 > PACE_QUEUE,
        "{last:?}"
    );
    let expected = ((PACE_QUEUE + PACE_BURST).as_nanos() / cost.as_nanos()) as usize;
    assert!(
        full.abs_diff(expected) <= 2,
        "{full} held, {expected} expected"
    );
    // Once the queue has drained a packet's time, one more fits.
    assert!(matches!(
        s.pick(&b, [A], 1500, 1, t0 + cost),
        Some(Pick::At(..))
    ));
    assert_eq!(s.pick(&b, [A], 1500, 1, t0 + cost), Some(Pick::Full));
}

#[test]
fn paced_paths_share_a_load_by_their_rates_and_a_lower_estimate_paces() {
    let b = paced(&[(A, 37_500_000), (B, 12_500_000)], &[5, 25]);
    // 1.2 times the sum offered: both paced queues full, shares by rate.
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    let (mut on, mut full) = ([0u64; 2], 0u64);
    let offered = 60_000_000.0;
    for k in 0..100_000u64 {
        let now = t0 + Duration::from_secs_f64(k as f64 * 1500.0 / offered);
        match s.pick(&b, [A, B], 1500, 1, now).map(|p| (p, p.path())) {
            Some((_, Some(id))) => on[usize::from(id.0)] += 1,
            Some((Pick::Full, None)) => full += 1,
            other => panic!("{other:?}"),
        }
    }
    let share = on[0] as f64 / (on[0] + on[1]) as f64;
    assert!((0.72..=0.78).contains(&share), "share {share}");
    assert!(full > 0, "1.2 times the sum taken whole");
    // The estimate below the configured rate is the pace; no ceiling, no pace.
    let p = b.path(A).unwrap();
    p.rate.store(1_000_000, Ordering::Relaxed);
    assert_eq!(p.pace_rate(), Some(1_000_000));
    p.ceiling.store(0, Ordering::Relaxed);
    assert_eq!(p.pace_rate(), None);
}

#[test]
fn over_the_budget_packets_go_in_runs_not_one_by_one() {
    let b = board(&[(A, 37_500_000), (B, 37_500_000)], &[5, 5]);
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    // Twice the sum offered: both queues soon past the budget.
    let offered = 150_000_000.0;
    let (mut on_a, mut switches, mut last) = (0u32, 0u32, None);
    for k in 0..20_000u32 {
        let now = t0 + Duration::from_secs_f64(f64::from(k) * 1500.0 / offered);
        let id = s.pick(&b, [A, B], 1500, 1, now).and_then(Pick::path);
        if k < 10_000 {
            continue;
        }
        on_a += u32::from(id == Some(A));
        switches += u32::from(last.is_some() && id != last);
        last = id;
    }
    // A millisecond of a path's rate is 25 packets.
    assert!(
        switches < 10_000 / 15,
        "{switches} switches in 10000 packets"
    );
    assert!((4_500..=5_500).contains(&on_a), "{on_a} of 10000 on A");
}

#[test]
fn a_queue_raises_an_estimate_only_far_below_what_the_path_delivers() {
    // 100 Mbit/s estimated; behind a queue the far end counts 800 Mbit/s
    // period after period (a busy host's probes always wait): the estimate
    // grows by a quarter a period while under half of it, then stops.
    let mut e = Estimator::new(None);
    let t = Instant::now();
    e.handle(delivery(t, 0, 0, 0, 2));
    let mut n = 0;
    let mut rates = Vec::new();
    for i in 1..=15 {
        n += 10_000;
        e.handle(delivery(t + ESTIMATE_PERIOD * i, n, n, n, 30));
        rates.push(e.rate());
    }
    assert_eq!(rates[0], DEFAULT_RATE + DEFAULT_RATE / 4);
    assert!(rates.windows(2).all(|w| w[1] >= w[0]), "{rates:?}");
    let last = *rates.last().unwrap();
    assert!(
        (50_000_000..=100_000_000).contains(&last),
        "{last} for 100 MB/s delivered"
    );
}

#[test]
fn a_deferred_pace_starts_after_what_the_old_process_holds() {
    // 12.5 MB/s; an upgrade's old process still sends 20 ms of the path's
    // pace: the first packet of the new one waits for it, and the 50 ms
    // queue counts what the old one holds (full 30 ms after the start).
    let b = paced(&[(A, 12_500_000)], &[5]);
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    let until = t0 + Duration::from_millis(20);
    b.defer_pace(A, until, t0);
    match s.pick(&b, [A], 1500, 1, t0) {
        Some(Pick::At(_, at)) => assert_eq!(at, until),
        other => panic!("not deferred: {other:?}"),
    }
    // A later, shorter deferral (another lane's copy of the same news)
    // moves nothing back.
    b.defer_pace(A, t0 + Duration::from_millis(5), t0);
    let mut last = until;
    let full = loop {
        match s.pick(&b, [A], 1500, 1, t0) {
            Some(Pick::At(_, at)) => {
                assert!(at > last);
                last = at;
            }
            Some(Pick::Full) => break last - t0,
            other => panic!("{other:?}"),
        }
    };
    assert!(
        full <= PACE_QUEUE && full + Duration::from_millis(1) > PACE_QUEUE,
        "{full:?}"
    );
    // An unknown path: nothing happens.
    b.defer_pace(PathId(99), until, t0);
}
