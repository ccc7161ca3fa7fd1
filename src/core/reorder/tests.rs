use super::*;

const A: PathId = PathId(0);
const B: PathId = PathId(1);

fn t0() -> Instant {
    Instant::now()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Offers a packet whose payload is its number; returns what came out, in
/// order (the packet itself if delivered, then what was ready).
fn offer(r: &mut Resequencer, seq: u64, path: PathId, now: Instant) -> Vec<u64> {
    let bytes = seq.to_be_bytes();
    let mut out = Vec::new();
    match r.offer(7, seq, path, &bytes, true, now) {
        Offer::Deliver | Offer::Late => out.push(seq),
        Offer::Held | Offer::Duplicate => {}
    }
    out.extend(ready(r));
    out
}

fn ready(r: &mut Resequencer) -> Vec<u64> {
    let got: Vec<Held> = r.take_ready().collect();
    got.into_iter()
        .map(|h| {
            let n = u64::from_be_bytes(h.data.as_slice().try_into().unwrap());
            r.recycle(h);
            n
        })
        .collect()
}

#[test]
fn in_order_packets_pass_at_once() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    for seq in 100..110 {
        assert_eq!(offer(&mut r, seq, A, now), vec![seq]);
    }
    assert_eq!(r.stats(), ReorderStats::default());
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn a_packet_ahead_waits_for_the_gap_to_fill() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    assert_eq!(offer(&mut r, 1, A, now), vec![1]);
    assert_eq!(offer(&mut r, 2, B, now), vec![2]);
    // 4 and 5 come over A before 3 over the slower B.
    assert_eq!(offer(&mut r, 4, A, now), Vec::<u64>::new());
    assert_eq!(offer(&mut r, 5, A, now), Vec::<u64>::new());
    assert_eq!(r.occupancy(), 2);
    assert_eq!(r.occupancy_bytes(), 16);
    assert_eq!(r.poll_timeout(), Some(now + ms(20)));
    assert_eq!(offer(&mut r, 3, B, now + ms(3)), vec![3, 4, 5]);
    assert_eq!(r.occupancy(), 0);
    assert_eq!(r.occupancy_bytes(), 0);
    assert_eq!(r.stats().held, 2);
    assert_eq!(r.stats().reordered, 2);
    assert_eq!(r.stats().gave_up, 0);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn on_one_path_a_gap_is_a_loss() {
    // Each path keeps its packets in order: with one path carrying the
    // stream, a packet behind a gap means the gap's packet was lost.
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    offer(&mut r, 1, A, now);
    assert_eq!(offer(&mut r, 3, A, now), vec![3]);
    assert_eq!(r.stats().gave_up, 1);
    assert_eq!(r.occupancy(), 0);
}

#[test]
fn a_gap_is_given_up_after_the_wait() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    offer(&mut r, 1, A, now);
    offer(&mut r, 1, B, now); // B has carried the stream (a late copy)
    assert!(offer(&mut r, 3, A, now + ms(1)).is_empty());
    r.handle_timeout(now + ms(20));
    assert!(ready(&mut r).is_empty(), "not before the wait is over");
    r.handle_timeout(now + ms(21));
    assert_eq!(ready(&mut r), vec![3]);
    assert_eq!(r.stats().gave_up, 1);
    // The lost packet turns up after all: delivered, late.
    assert_eq!(offer(&mut r, 2, B, now + ms(30)), vec![2]);
    assert_eq!(r.stats().late, 1 + 1);
}

#[test]
fn a_gap_every_path_has_passed_is_given_up_at_once() {
    let mut r = Resequencer::new(ms(50));
    let now = t0();
    offer(&mut r, 1, A, now);
    offer(&mut r, 2, B, now);
    // 3 was sent on A and lost; 4 comes on A, 5 on B: both paths are past 3.
    assert!(offer(&mut r, 4, A, now).is_empty());
    assert_eq!(offer(&mut r, 5, B, now), vec![4, 5]);
    assert_eq!(r.stats().gave_up, 1);
}

#[test]
fn a_quiet_path_does_not_hold_a_gap() {
    let mut r = Resequencer::new(ms(50));
    let now = t0();
    offer(&mut r, 1, B, now);
    // B died; from now on only A carries the stream.
    let later = now + PATH_QUIET + ms(1);
    offer(&mut r, 2, A, later);
    assert_eq!(offer(&mut r, 4, A, later), vec![4]);
    assert_eq!(r.stats().gave_up, 1);
}

#[test]
fn copies_of_a_held_packet_are_dropped() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    offer(&mut r, 1, A, now);
    offer(&mut r, 2, B, now);
    let bytes = [0u8; 8];
    assert_eq!(r.offer(7, 4, A, &bytes, true, now), Offer::Held);
    assert_eq!(r.offer(7, 4, B, &bytes, true, now), Offer::Duplicate);
    assert_eq!(r.stats().duplicates, 1);
    assert_eq!(r.occupancy(), 1);
}

#[test]
fn streams_are_independent() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    let p = [0u8; 4];
    assert_eq!(r.offer(1, 10, A, &p, true, now), Offer::Deliver);
    assert_eq!(r.offer(1, 11, B, &p, true, now), Offer::Deliver);
    assert_eq!(r.offer(2, 500, A, &p, true, now), Offer::Deliver);
    assert_eq!(r.offer(1, 13, A, &p, true, now), Offer::Held);
    assert_eq!(r.offer(2, 501, A, &p, true, now), Offer::Deliver);
    assert_eq!(
        r.take_ready().count(),
        0,
        "stream 2 does not release stream 1"
    );
    assert_eq!(r.offer(1, 12, B, &p, true, now), Offer::Deliver);
    assert_eq!(r.take_ready().count(), 1);
}

#[test]
fn memory_is_bounded() {
    let mut r = Resequencer::new(ms(1000));
    let now = t0();
    let big = vec![0u8; 64 * 1024];
    r.offer(1, 0, A, &big, true, now);
    r.offer(1, 0, B, &big, true, now);
    // 1 never comes; far more than the bound arrives behind it.
    for seq in 2..2 + MAX_HELD as u64 * 2 {
        r.offer(1, seq, A, &big, true, now);
        assert!(r.occupancy_bytes() <= MAX_HELD_BYTES);
        assert!(r.occupancy() <= MAX_HELD);
        let _ = r.take_ready().count();
    }
    assert!(r.stats().gave_up >= 1);
}

#[test]
fn a_jump_far_ahead_gives_up_the_gap() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    offer(&mut r, 1, A, now);
    offer(&mut r, 1, B, now);
    let far = 2 + MAX_HELD as u64 + 10;
    assert_eq!(offer(&mut r, far, A, now), vec![far]);
    assert_eq!(offer(&mut r, far + 1, A, now), vec![far + 1]);
    assert_eq!(r.stats().gave_up, far - 2);
}

#[test]
fn numbers_wrap() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    offer(&mut r, u64::MAX - 1, A, now);
    offer(&mut r, u64::MAX - 1, B, now);
    assert!(offer(&mut r, 0, A, now).is_empty());
    assert_eq!(offer(&mut r, u64::MAX, B, now), vec![u64::MAX, 0]);
}

#[test]
fn many_streams_forget_the_oldest_and_deliver_what_it_held() {
    let mut r = Resequencer::new(ms(20));
    let now = t0();
    let p = [0u8; 4];
    r.offer(0, 1, A, &p, true, now);
    r.offer(0, 1, B, &p, true, now);
    assert_eq!(r.offer(0, 3, A, &p, true, now), Offer::Held);
    for s in 1..=MAX_STREAMS as u32 {
        r.offer(s, 1, A, &p, true, now + ms(u64::from(s)));
    }
    assert_eq!(r.occupancy(), 0);
    assert_eq!(r.take_ready().count(), 1);
}

#[test]
fn a_live_path_that_has_not_carried_the_stream_yet_holds_a_gap() {
    // The sender spreads onto B only once A is loaded: B's first packet
    // comes after later-numbered ones on A.
    let mut r = Resequencer::new(ms(30));
    let now = t0();
    r.set_live([A, B], now);
    assert_eq!(offer(&mut r, 1, A, now), vec![1]);
    assert!(
        offer(&mut r, 3, A, now + ms(1)).is_empty(),
        "B may still bring 2"
    );
    assert!(offer(&mut r, 4, A, now + ms(2)).is_empty());
    assert_eq!(offer(&mut r, 2, B, now + ms(20)), vec![2, 3, 4]);
    assert_eq!(r.stats().gave_up, 0);
    assert_eq!(r.stats().late, 0);
    // Once both are past a gap, it is a loss at once.
    assert_eq!(offer(&mut r, 6, B, now + ms(21)), Vec::<u64>::new());
    assert_eq!(offer(&mut r, 7, A, now + ms(22)), vec![6, 7]);
    assert_eq!(r.stats().gave_up, 1);
}

#[test]
fn a_path_that_left_the_live_set_holds_nothing() {
    let mut r = Resequencer::new(ms(50));
    let now = t0();
    r.set_live([A, B], now);
    offer(&mut r, 1, A, now);
    assert!(offer(&mut r, 3, A, now).is_empty());
    // B fails: the gap cannot fill any more.
    r.set_live([A], now + ms(1));
    assert_eq!(ready(&mut r), vec![3]);
    assert_eq!(r.stats().gave_up, 1);
}

#[test]
fn a_shorter_paths_packets_come_out_as_late_as_the_longer_ones() {
    // A is 20 ms shorter one way than B.
    let mut r = Resequencer::new(ms(30));
    let now = t0();
    r.set_offsets([(A, ms(20)), (B, Duration::ZERO)]);
    assert!(offer(&mut r, 1, A, now).is_empty(), "held for A's offset");
    assert_eq!(r.poll_timeout(), Some(now + ms(20)));
    // In order from B, but behind 1: it waits its turn.
    assert!(offer(&mut r, 2, B, now + ms(5)).is_empty());
    r.handle_timeout(now + ms(19));
    assert!(ready(&mut r).is_empty(), "not before A's offset has run");
    r.handle_timeout(now + ms(20));
    assert_eq!(ready(&mut r), vec![1, 2]);
    assert_eq!(r.occupancy(), 0);
    // Nothing delayed: a packet from B goes out at once.
    assert_eq!(offer(&mut r, 3, B, now + ms(30)), vec![3]);
    assert_eq!(r.poll_timeout(), None);
    // A packet held behind a gap keeps its path's offset once released.
    assert!(offer(&mut r, 5, A, now + ms(40)).is_empty());
    assert_eq!(offer(&mut r, 4, B, now + ms(45)), vec![4]);
    r.handle_timeout(now + ms(59));
    assert!(ready(&mut r).is_empty());
    r.handle_timeout(now + ms(60));
    assert_eq!(ready(&mut r), vec![5]);
    assert_eq!(r.stats().gave_up, 0);
}

#[test]
fn delayed_packets_give_way_when_memory_runs_out() {
    let mut r = Resequencer::new(ms(30));
    let now = t0();
    r.set_offsets([(A, ms(20))]);
    let mut out = Vec::new();
    for seq in 1..=(MAX_HELD as u64 + 10) {
        out.extend(offer(&mut r, seq, A, now));
    }
    assert!(r.occupancy() <= MAX_HELD, "{}", r.occupancy());
    r.handle_timeout(now + ms(20));
    out.extend(ready(&mut r));
    let want: Vec<u64> = (1..=(MAX_HELD as u64 + 10)).collect();
    assert_eq!(out, want, "every packet, in order");
    assert_eq!(r.stats().gave_up, 0);
}
