//! Session tests: scripted exchanges at explicit times, packets going through the codec.

use super::*;
use crate::core::bfd::{RxError, SessionEvent};

const MS: Duration = Duration::from_millis(1);
const US: Duration = Duration::from_micros(1);

fn cfg(discr: u32) -> SessionConfig {
    SessionConfig {
        local_discriminator: discr,
        desired_min_tx: 10 * MS,
        required_min_rx: 10 * MS,
        detect_mult: 3,
        passive: false,
    }
}

/// Sends every packet `from` has due at `now` to `to`, through emit and parse.
/// Returns the packets delivered.
fn deliver(from: &mut Session, to: &mut Session, now: Instant) -> Vec<ControlPacket> {
    let mut sent = Vec::new();
    while let Some(pkt) = from.poll_transmit(now) {
        let mut buf = [0u8; 64];
        let n = pkt.emit(&mut buf).expect("emit");
        let parsed = ControlPacket::parse(&buf[..n]).expect("parse");
        assert_eq!(parsed, pkt);
        to.handle_packet(&parsed, now).expect("accepted");
        sent.push(parsed);
        assert!(sent.len() < 10, "transmit loop does not settle");
    }
    sent
}

/// Exchanges packets at `now` until neither side has anything due.
fn settle(a: &mut Session, b: &mut Session, now: Instant) -> Vec<ControlPacket> {
    let mut all = Vec::new();
    for _ in 0..10 {
        let ab = deliver(a, b, now);
        let ba = deliver(b, a, now);
        if ab.is_empty() && ba.is_empty() {
            return all;
        }
        all.extend(ab);
        all.extend(ba);
    }
    panic!("exchange does not settle");
}

fn up_pair(base: Instant) -> (Session, Session) {
    let mut a = Session::new(cfg(1), base, 1);
    let mut b = Session::new(cfg(2), base, 2);
    settle(&mut a, &mut b, base);
    assert!(a.is_up() && b.is_up());
    (a, b)
}

fn packet(state: State, my: u32, your: u32) -> ControlPacket {
    ControlPacket::new(state, my, your, 10_000)
}

fn events(s: &mut Session) -> Vec<(State, State, Diag)> {
    std::iter::from_fn(|| s.poll_event())
        .map(|SessionEvent::StateChange { from, to, diag, .. }| (from, to, diag))
        .collect()
}

/// Drives a fresh session (discriminator 1, peer 2) into `state`.
fn session_in(state: State, now: Instant) -> Session {
    let mut s = Session::new(cfg(1), now, 7);
    match state {
        State::AdminDown => s.set_admin_down(now),
        State::Down => {}
        State::Init => s.handle_packet(&packet(State::Down, 2, 0), now).unwrap(),
        State::Up => s.handle_packet(&packet(State::Init, 2, 1), now).unwrap(),
    }
    assert_eq!(s.state(), state);
    s
}

#[test]
fn three_way_handshake_reaches_up_on_both_sides() {
    let base = Instant::now();
    let mut a = Session::new(cfg(1), base, 1);
    let mut b = Session::new(cfg(2), base + MS, 2);

    // A: Down, your discriminator still unknown.
    let p = a.poll_transmit(base).unwrap();
    assert_eq!((p.state, p.your_discriminator), (State::Down, 0));
    b.handle_packet(&p, base + MS).unwrap();
    assert_eq!(b.state(), State::Init);
    assert_eq!(b.remote_discriminator(), 1);

    // B: Init, echoing A's discriminator.
    let t = base + 2 * MS;
    let p = b.poll_transmit(t).unwrap();
    assert_eq!((p.state, p.your_discriminator), (State::Init, 1));
    assert!(b.poll_transmit(t).is_none());
    a.handle_packet(&p, t).unwrap();
    assert_eq!(a.state(), State::Up);

    // A: Up, polling to leave the slow rate.
    let t = base + 3 * MS;
    let p = a.poll_transmit(t).unwrap();
    assert_eq!(
        (p.state, p.poll, p.desired_min_tx_us),
        (State::Up, true, 10_000)
    );
    b.handle_packet(&p, t).unwrap();
    assert_eq!(b.state(), State::Up);

    // B answers the Poll with a Final, then polls on its own behalf.
    let f = b.poll_transmit(t).unwrap();
    assert!(f.final_ && !f.poll);
    let p = b.poll_transmit(t).unwrap();
    assert!(p.poll && !p.final_ && p.state == State::Up);
    a.handle_packet(&f, t).unwrap();
    assert!(!a.poll_active());
    a.handle_packet(&p, t).unwrap();
    let f = a.poll_transmit(t).unwrap();
    assert!(f.final_);
    b.handle_packet(&f, t).unwrap();
    assert!(!b.poll_active());

    assert_eq!(events(&mut a), [(State::Down, State::Up, Diag::None)]);
    assert_eq!(
        events(&mut b),
        [
            (State::Down, State::Init, Diag::None),
            (State::Init, State::Up, Diag::None)
        ]
    );
    assert_eq!(a.transitions(), 1);
    assert_eq!(b.transitions(), 2);
    assert_eq!(a.last_change(), Some(base + 2 * MS));
    assert_eq!(b.remote_state(), State::Up);
    assert_eq!(a.tx_interval(), 10 * MS);
    assert_eq!(a.detection_time(), 30 * MS);
}

#[test]
fn handshake_through_settle_helper() {
    let base = Instant::now();
    let (a, b) = up_pair(base);
    assert!(!a.poll_active() && !b.poll_active());
    assert_eq!(a.remote_discriminator(), 2);
    assert_eq!(b.remote_discriminator(), 1);
}

#[test]
fn detection_timeout_fires_exactly_at_detection_time() {
    let base = Instant::now();
    let (_a, mut b) = up_pair(base);
    let detect = b.detection_time();
    assert_eq!(detect, 30 * MS);
    assert_eq!(b.poll_timeout().map(|t| t <= base + detect), Some(true));
    events(&mut b);

    b.handle_timeout(base + detect - MS);
    assert_eq!(b.state(), State::Up);
    b.handle_timeout(base + detect - US);
    assert_eq!(b.state(), State::Up);
    b.handle_timeout(base + detect + US);
    assert_eq!(b.state(), State::Down);
    assert_eq!(b.local_diag(), Diag::ControlDetectionExpired);
    assert_eq!(b.remote_discriminator(), 0);
    assert_eq!(
        events(&mut b),
        [(State::Up, State::Down, Diag::ControlDetectionExpired)]
    );
    // The next packet tells the peer why, at the slow rate again.
    let p = b.poll_transmit(base + detect + US).unwrap();
    assert_eq!(
        (p.state, p.diag, p.your_discriminator),
        (State::Down, Diag::ControlDetectionExpired, 0)
    );
    assert_eq!(p.desired_min_tx_us, 1_000_000);
}

#[test]
fn detection_deadline_follows_each_received_packet() {
    let base = Instant::now();
    let (mut a, mut b) = up_pair(base);
    // Periodic packets every ~10 ms keep the session up for a long time.
    let mut now = base;
    for _ in 0..200 {
        now += 5 * MS;
        deliver(&mut a, &mut b, now);
        deliver(&mut b, &mut a, now);
        a.handle_timeout(now);
        b.handle_timeout(now);
    }
    assert!(a.is_up() && b.is_up());
    assert_eq!(a.transitions(), 1);
}

#[test]
fn detection_time_in_init_uses_slow_remote_rate() {
    let base = Instant::now();
    let mut s = session_in(State::Init, base);
    // The peer is not Up, so it advertised... whatever our test packet says: 10 ms.
    assert_eq!(s.detection_time(), 30 * MS);
    s.handle_timeout(base + 30 * MS);
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.local_diag(), Diag::ControlDetectionExpired);
}

#[test]
fn slow_rate_before_up_then_fast_rate_with_poll_final() {
    let base = Instant::now();
    let mut a = Session::new(cfg(1), base, 11);
    let mut b = Session::new(cfg(2), base, 12);

    let p = a.poll_transmit(base).unwrap();
    assert_eq!(p.desired_min_tx_us, 1_000_000);
    assert_eq!(p.required_min_rx_us, 10_000);
    assert_eq!(a.tx_interval(), SLOW_TX_INTERVAL);
    let next = a.poll_timeout().unwrap();
    assert!(
        next >= base + 750 * MS && next <= base + 1000 * MS,
        "{:?}",
        next - base
    );
    assert!(a.poll_transmit(base + 749 * MS).is_none());

    // Nobody hears A's first packet; B comes along 2 s later.
    let t = base + 2000 * MS;
    deliver(&mut b, &mut a, t); // B Down -> A Init
    assert_eq!(a.state(), State::Init);
    let p = a.poll_transmit(t).unwrap();
    assert_eq!(
        (p.state, p.desired_min_tx_us, p.poll),
        (State::Init, 1_000_000, false)
    );
    b.handle_packet(&p, t).unwrap(); // B Up
    assert!(b.is_up() && b.poll_active());
    assert_eq!(b.tx_interval(), 10 * MS);

    let poll = b.poll_transmit(t).unwrap();
    assert!(poll.poll);
    assert_eq!(poll.desired_min_tx_us, 10_000);
    a.handle_packet(&poll, t).unwrap(); // A Up, Final due
    assert!(a.is_up());
    // B's Poll announces its fast rate; until B has our Final it may still send at
    // the slow one, so A keeps the slow detection time for now.
    assert_eq!(a.detection_time(), 3 * SLOW_TX_INTERVAL);
    let fin = a.poll_transmit(t).unwrap();
    assert!(fin.final_ && !fin.poll);
    // B keeps polling until the Final arrives.
    let t2 = t + 10 * MS;
    let again = b.poll_transmit(t2).unwrap();
    assert!(again.poll);
    b.handle_packet(&fin, t2).unwrap();
    assert!(!b.poll_active());
    let t3 = t2 + 10 * MS;
    let p = b.poll_transmit(t3).unwrap();
    assert!(!p.poll);
    // The first packet after B's Poll Sequence: A follows the fast rate.
    a.handle_packet(&p, t3).unwrap();
    assert_eq!(a.detection_time(), 30 * MS);
    // Periodic packets now ~10 ms apart.
    let gap = b.poll_timeout().unwrap() - t3;
    assert!(gap >= 7500 * US && gap <= 10 * MS, "{gap:?}");
}

#[test]
fn slower_timers_take_effect_only_after_final() {
    let base = Instant::now();
    let (mut a, mut b) = up_pair(base);
    let t = base + 5 * MS;
    a.set_timers(100 * MS, 5 * MS, 3, t);
    assert!(a.poll_active());
    // Old, faster TX rate and old, longer RX requirement until the Final.
    assert_eq!(a.tx_interval(), 10 * MS);
    assert_eq!(a.detection_time(), 30 * MS);
    let poll = a.poll_transmit(t).unwrap();
    assert!(poll.poll);
    assert_eq!(
        (poll.desired_min_tx_us, poll.required_min_rx_us),
        (100_000, 5_000)
    );

    b.handle_packet(&poll, t).unwrap();
    // B must slow its detection at once (our new Desired Min TX), and may send faster.
    assert_eq!(b.detection_time(), 300 * MS);
    assert_eq!(b.tx_interval(), 10 * MS);
    let fin = b.poll_transmit(t).unwrap();
    assert!(fin.final_);
    a.handle_packet(&fin, t).unwrap();
    assert!(!a.poll_active());
    assert_eq!(a.tx_interval(), 100 * MS);
    // Our required RX dropped to 5 ms; B's Desired Min TX (10 ms) now dominates.
    assert_eq!(a.detection_time(), 30 * MS);
}

#[test]
fn faster_required_rx_waits_for_final_but_slower_applies_at_once() {
    let base = Instant::now();
    let (mut a, _b) = up_pair(base);
    let mut fin = packet(State::Up, 2, 1);
    fin.final_ = true;
    fin.desired_min_tx_us = 1_000; // peer could send every 1 ms

    a.set_timers(10 * MS, MS, 3, base);
    fin.final_ = false;
    a.handle_packet(&fin, base).unwrap();
    assert_eq!(
        a.detection_time(),
        30 * MS,
        "reduced RX waits for the Final"
    );
    fin.final_ = true;
    a.handle_packet(&fin, base).unwrap();
    assert_eq!(a.detection_time(), 3 * MS);

    a.set_timers(10 * MS, 50 * MS, 3, base);
    assert_eq!(a.detection_time(), 150 * MS, "increased RX applies at once");
}

#[test]
fn jitter_stays_within_75_to_100_percent() {
    for (mult, hi_pct) in [(3u8, 100u64), (1, 90)] {
        let base = Instant::now();
        let mut c = cfg(1);
        c.detect_mult = mult;
        let mut s = Session::new(c, base, 0xfeed);
        let interval = s.tx_interval().as_nanos() as u64;
        let lo = interval * 75 / 100;
        let hi = interval * hi_pct / 100;
        let mut now = base;
        let (mut min, mut max) = (u64::MAX, 0);
        for _ in 0..5000 {
            assert!(s.poll_transmit(now).is_some());
            let next = s.poll_timeout().unwrap();
            let gap = (next - now).as_nanos() as u64;
            assert!(
                gap >= lo && gap <= hi,
                "mult {mult}: {gap} not in {lo}..={hi}"
            );
            min = min.min(gap);
            max = max.max(gap);
            assert!(s.poll_transmit(next - US).is_none());
            now = next;
        }
        // The jitter actually spreads over the allowed range.
        let span = hi - lo;
        assert!(min < lo + span / 20 && max > hi - span / 20, "{min} {max}");
    }
}

#[test]
fn jitter_depends_on_seed() {
    let base = Instant::now();
    let gaps = |seed| {
        let mut s = Session::new(cfg(1), base, seed);
        s.poll_transmit(base);
        s.poll_timeout().unwrap()
    };
    assert_eq!(gaps(5), gaps(5));
    assert_ne!(gaps(5), gaps(6));
}

#[test]
fn first_transmissions_spread_over_the_interval() {
    let base = Instant::now();
    let mut per_ms = [0u32; 10];
    for seed in 0..1000 {
        let mut s = Session::new(cfg(1), base, seed);
        assert_eq!(s.poll_timeout(), Some(base), "due at once when not spread");
        s.spread_first_transmission(base, 10 * MS);
        let due = s.poll_timeout().unwrap();
        let after = due.duration_since(base);
        assert!(after < 10 * MS, "{after:?}");
        let at = usize::try_from(after.as_millis()).unwrap();
        per_ms[at] += 1;
        assert!(s.poll_transmit(due - US).is_none());
        assert_eq!(s.poll_transmit(due).unwrap().state, State::Down);
    }
    // Uniform: 100 a millisecond expected.
    assert!(per_ms.iter().all(|n| (50..=150).contains(n)), "{per_ms:?}");
    // Never past the slow rate's interval.
    let mut s = Session::new(cfg(1), base, 3);
    s.spread_first_transmission(base, Duration::from_secs(5));
    assert!(s.poll_timeout().unwrap() < base + SLOW_TX_INTERVAL);
    // A session that has heard its peer is not held back.
    let mut s = Session::new(cfg(1), base, 1);
    s.handle_packet(&packet(State::Down, 9, 0), base).unwrap();
    let due = s.poll_timeout().unwrap();
    s.spread_first_transmission(base, 10 * MS);
    assert_eq!(s.poll_timeout().unwrap(), due);
}

#[test]
fn remote_admin_down_takes_us_down_with_neighbor_down() {
    let base = Instant::now();
    let (mut a, mut b) = up_pair(base);
    events(&mut a);
    let t = base + MS;
    b.set_admin_down(t);
    let p = b.poll_transmit(t).unwrap();
    assert_eq!((p.state, p.diag.code()), (State::AdminDown, 7));
    a.handle_packet(&p, t).unwrap();
    assert_eq!(a.state(), State::Down);
    assert_eq!(a.local_diag(), Diag::NeighborDown);
    assert!(a.remote_admin_down());
    assert_eq!(
        events(&mut a),
        [(State::Up, State::Down, Diag::NeighborDown)]
    );
    // A stays Down while the peer keeps saying AdminDown.
    a.handle_packet(&p, t + SLOW_TX_INTERVAL).unwrap();
    assert_eq!(a.state(), State::Down);
}

#[test]
fn set_admin_down_sends_admin_down_at_once_and_ignores_packets() {
    let base = Instant::now();
    let (mut a, _b) = up_pair(base);
    events(&mut a);
    let t = base + 3 * MS; // periodic packet not yet due
    a.set_admin_down(t);
    assert_eq!(a.poll_timeout(), Some(t));
    let p = a.poll_transmit(t).unwrap();
    assert_eq!(p.state, State::AdminDown);
    assert_eq!(p.diag, Diag::AdministrativelyDown);
    assert_eq!(p.diag.code(), 7);
    assert!(!p.poll);
    assert_eq!(p.desired_min_tx_us, 1_000_000);
    assert!(a.poll_transmit(t).is_none());
    assert_eq!(
        events(&mut a),
        [(State::Up, State::AdminDown, Diag::AdministrativelyDown)]
    );

    // Packets are discarded while AdminDown (after recording the remote's values).
    let mut p = packet(State::Down, 9, 0);
    p.poll = true;
    assert_eq!(a.handle_packet(&p, t), Err(RxError::LocalAdminDown));
    assert_eq!(a.state(), State::AdminDown);
    assert_eq!(a.remote_discriminator(), 9);
    assert!(a.poll_transmit(t).is_none(), "no Final while AdminDown");

    a.set_admin_up(t + MS);
    assert_eq!((a.state(), a.local_diag()), (State::Down, Diag::None));
    assert_eq!(a.poll_transmit(t + MS).unwrap().state, State::Down);
}

#[test]
fn your_discriminator_zero_with_up_or_init_is_rejected() {
    let base = Instant::now();
    for state in [State::Up, State::Init] {
        let mut s = session_in(State::Down, base);
        let err = s.handle_packet(&packet(state, 2, 0), base).unwrap_err();
        assert_eq!(err, RxError::YourDiscriminatorZeroInUpInit(state));
        assert_eq!(err.reason(), "your_discriminator_zero");
        assert_eq!(s.remote_discriminator(), 0, "nothing recorded");
    }
}

#[test]
fn mismatched_your_discriminator_is_rejected() {
    let base = Instant::now();
    let (mut a, _b) = up_pair(base);
    let err = a
        .handle_packet(&packet(State::Down, 2, 99), base)
        .unwrap_err();
    assert_eq!(
        err,
        RxError::YourDiscriminatorMismatch {
            got: 99,
            expected: 1
        }
    );
    assert_eq!(err.reason(), "your_discriminator_mismatch");
    assert!(a.is_up());
}

#[test]
fn auth_and_poll_final_are_rejected() {
    let base = Instant::now();
    let mut s = session_in(State::Down, base);
    let mut p = packet(State::Down, 2, 0);
    p.auth_present = true;
    assert_eq!(s.handle_packet(&p, base), Err(RxError::AuthMismatch));
    let mut p = packet(State::Down, 2, 0);
    p.poll = true;
    p.final_ = true;
    assert_eq!(s.handle_packet(&p, base), Err(RxError::PollAndFinal));
    let mut p = packet(State::Down, 2, 0);
    p.version = 0;
    assert_eq!(s.handle_packet(&p, base), Err(RxError::BadVersion(0)));
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.remote_discriminator(), 0);
}

#[test]
fn remote_required_min_rx_zero_stops_periodic_transmission() {
    let base = Instant::now();
    let (mut a, _b) = up_pair(base);
    let mut p = packet(State::Up, 2, 1);
    p.required_min_rx_us = 0;
    a.handle_packet(&p, base).unwrap();
    assert_eq!(a.remote_min_rx(), Duration::ZERO);
    for secs in [0, 1, 10] {
        assert!(a.poll_transmit(base + Duration::from_secs(secs)).is_none());
    }
    // Only the detection deadline remains.
    assert_eq!(a.poll_timeout(), Some(base + a.detection_time()));
    // A Poll is still answered with a Final.
    p.poll = true;
    a.handle_packet(&p, base + MS).unwrap();
    let fin = a.poll_transmit(base + MS).unwrap();
    assert!(fin.final_);
    assert!(a.poll_transmit(base + MS).is_none());
    // Transmission resumes once the peer asks for packets again.
    a.handle_packet(&packet(State::Up, 2, 1), base + 2 * MS)
        .unwrap();
    assert!(a.poll_transmit(base + 20 * MS).is_some());
}

/// A packet that fell due while the peer asked for none is due when it asks again,
/// not at that past time: no timer may lie in the past of the packet that set it
/// (found by the `engine` fuzz target).
#[test]
fn resumed_transmission_is_due_now_not_in_the_past() {
    let base = Instant::now();
    let (mut a, _b) = up_pair(base);
    let mut quiet = packet(State::Up, 2, 1);
    quiet.required_min_rx_us = 0;
    a.handle_packet(&quiet, base + MS).unwrap();
    assert!(a.poll_transmit(base + 15 * MS).is_none());
    let later = base + 20 * MS;
    a.handle_packet(&packet(State::Up, 2, 1), later).unwrap();
    let next = a.poll_timeout().expect("a deadline");
    assert!(next >= later, "timer {:?} in the past", later - next);
    assert_eq!(next, later, "the paused packet is due at once");
    assert!(a.poll_transmit(later).is_some());
}

#[test]
fn poll_gets_an_immediate_final() {
    let base = Instant::now();
    let (mut a, _b) = up_pair(base);
    let t = base + MS; // periodic packet not due before base + 7.5 ms
    assert!(a.poll_transmit(t).is_none());
    let mut p = packet(State::Up, 2, 1);
    p.poll = true;
    a.handle_packet(&p, t).unwrap();
    assert_eq!(a.poll_timeout(), Some(t));
    let fin = a.poll_transmit(t).unwrap();
    assert!(fin.final_ && !fin.poll);
    assert_eq!((fin.state, fin.your_discriminator), (State::Up, 2));
    assert!(a.poll_transmit(t).is_none(), "only one Final per Poll");
}

#[test]
fn final_and_own_poll_go_in_separate_packets() {
    let base = Instant::now();
    let (mut a, _b) = up_pair(base);
    a.set_timers(20 * MS, 20 * MS, 3, base);
    let mut p = packet(State::Up, 2, 1);
    p.poll = true;
    a.handle_packet(&p, base).unwrap();
    let first = a.poll_transmit(base).unwrap();
    let second = a.poll_transmit(base).unwrap();
    assert!(first.final_ && !first.poll);
    assert!(second.poll && !second.final_);
}

#[test]
fn passive_session_waits_for_the_peer() {
    let base = Instant::now();
    let mut c = cfg(1);
    c.passive = true;
    let mut s = Session::new(c, base, 3);
    assert!(s.poll_transmit(base).is_none());
    assert!(s.poll_transmit(base + Duration::from_secs(5)).is_none());
    assert_eq!(s.poll_timeout(), None);
    let t = base + Duration::from_secs(6);
    s.handle_packet(&packet(State::Down, 2, 0), t).unwrap();
    let p = s.poll_transmit(t).unwrap();
    assert_eq!((p.state, p.your_discriminator), (State::Init, 2));
    // Peer goes silent: the remote discriminator is forgotten, transmission stops.
    s.handle_timeout(t + s.detection_time());
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.remote_discriminator(), 0);
    assert!(s.poll_transmit(t + Duration::from_secs(10)).is_none());
}

#[test]
fn down_session_forgets_silent_peer_discriminator() {
    let base = Instant::now();
    let mut s = session_in(State::Down, base);
    let mut p = packet(State::Up, 2, 1);
    p.required_min_rx_us = 10_000;
    s.handle_packet(&p, base).unwrap(); // Down + Up: stays Down
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.remote_discriminator(), 2);
    s.handle_timeout(base + 30 * MS);
    assert_eq!(s.remote_discriminator(), 0);
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.transitions(), 0);
}

#[test]
fn state_table_for_all_sixteen_pairs() {
    use State::*;
    // (local, received) -> (new local, diag after, accepted)
    let table = [
        (
            AdminDown,
            AdminDown,
            AdminDown,
            Diag::AdministrativelyDown,
            false,
        ),
        (
            AdminDown,
            Down,
            AdminDown,
            Diag::AdministrativelyDown,
            false,
        ),
        (
            AdminDown,
            Init,
            AdminDown,
            Diag::AdministrativelyDown,
            false,
        ),
        (AdminDown, Up, AdminDown, Diag::AdministrativelyDown, false),
        (Down, AdminDown, Down, Diag::None, true),
        (Down, Down, Init, Diag::None, true),
        (Down, Init, Up, Diag::None, true),
        (Down, Up, Down, Diag::None, true),
        (Init, AdminDown, Down, Diag::NeighborDown, true),
        (Init, Down, Init, Diag::None, true),
        (Init, Init, Up, Diag::None, true),
        (Init, Up, Up, Diag::None, true),
        (Up, AdminDown, Down, Diag::NeighborDown, true),
        (Up, Down, Down, Diag::NeighborDown, true),
        (Up, Init, Up, Diag::None, true),
        (Up, Up, Up, Diag::None, true),
    ];
    assert_eq!(table.len(), 16);
    for (local, received, want, diag, accepted) in table {
        assert_eq!(
            next_state(local, received),
            want,
            "{local:?} + {received:?}"
        );
        let base = Instant::now();
        let mut s = session_in(local, base);
        let before = s.transitions();
        let res = s.handle_packet(&packet(received, 2, 1), base);
        assert_eq!(res.is_ok(), accepted, "{local:?} + {received:?}");
        assert_eq!(s.state(), want, "{local:?} + {received:?}");
        assert_eq!(s.local_diag(), diag, "{local:?} + {received:?}");
        let changed = u64::from(want != local);
        assert_eq!(s.transitions(), before + changed);
    }
}

#[test]
fn rx_error_reasons_are_snake_case() {
    let all = [
        RxError::YourDiscriminatorMismatch {
            got: 1,
            expected: 2,
        },
        RxError::YourDiscriminatorZeroInUpInit(State::Up),
        RxError::AuthMismatch,
        RxError::AuthMissing,
        RxError::Auth(crate::core::bfd::AuthError::BadDigest),
        RxError::PollAndFinal,
        RxError::BadVersion(2),
        RxError::LocalAdminDown,
    ];
    for e in all {
        let r = e.reason();
        assert!(r.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn config_edge_values_are_sanitised() {
    let base = Instant::now();
    let mut s = Session::new(
        SessionConfig {
            local_discriminator: 0,
            desired_min_tx: Duration::ZERO,
            required_min_rx: Duration::ZERO,
            detect_mult: 0,
            passive: false,
        },
        base,
        0,
    );
    let p = s.poll_transmit(base).unwrap();
    assert_eq!(p.my_discriminator, 1);
    assert_eq!(p.detect_mult, 1);
    assert_eq!(p.required_min_rx_us, 0);
    let mut buf = [0u8; 24];
    let n = p.emit(&mut buf).unwrap();
    assert!(ControlPacket::parse(&buf[..n]).is_ok());
}

#[test]
fn extreme_remote_intervals_do_not_panic() {
    let base = Instant::now();
    let mut s = session_in(State::Down, base);
    let mut p = packet(State::Down, 2, 0);
    p.desired_min_tx_us = u32::MAX;
    p.required_min_rx_us = u32::MAX;
    p.detect_mult = u8::MAX;
    s.handle_packet(&p, base).unwrap();
    assert_eq!(
        s.detection_time(),
        Duration::from_micros(u64::from(u32::MAX)) * 255
    );
    s.handle_timeout(base + Duration::from_secs(1));
    let _ = s.poll_transmit(base);
    let _ = s.poll_timeout();
}

// ----- D bit, timers, punctuality -----

/// §6.6/§6.8.7: a peer asking for Demand mode stops our periodic packets once both
/// sides are Up; a Poll from it is still answered, and detection keeps running.
#[test]
fn remote_demand_bit_stops_periodic_transmission_when_both_up() {
    let base = Instant::now();
    let mut s = session_in(State::Up, base);
    while s.poll_transmit(base).is_some() {}
    let mut p = packet(State::Up, 2, 1);
    p.demand = true;
    s.handle_packet(&p, base).unwrap();
    assert!(s.remote_demand());
    // Our own poll (entering Up) is still running: it must finish first.
    let mut fin = p.clone();
    fin.final_ = true;
    s.handle_packet(&fin, base).unwrap();
    assert!(!s.poll_active());
    assert_eq!(s.poll_transmit(base + 50 * MS), None, "no periodic packets");
    let mut poll = p.clone();
    poll.poll = true;
    s.handle_packet(&poll, base + 60 * MS).unwrap();
    let answer = s.poll_transmit(base + 60 * MS).expect("final");
    assert!(answer.final_);
    assert_eq!(s.poll_transmit(base + 200 * MS), None);
    // The peer drops the D bit: periodic transmission resumes.
    s.handle_packet(&packet(State::Up, 2, 1), base + 70 * MS)
        .unwrap();
    assert!(s.poll_transmit(base + 90 * MS).is_some());
}

/// While the peer's Poll announces a faster rate it still sends at the old one until
/// our Final reaches it: the detection time keeps the slower rate until a packet
/// without Poll arrives.
#[test]
fn peer_speeding_up_keeps_slow_detection_until_its_poll_ends() {
    let base = Instant::now();
    let mut s = Session::new(cfg(1), base, 3);
    let mut slow = packet(State::Init, 2, 1);
    slow.desired_min_tx_us = 300_000;
    s.handle_packet(&slow, base).unwrap();
    assert!(s.is_up());
    assert_eq!(s.detection_time(), 900 * MS);
    let mut poll = packet(State::Up, 2, 1);
    poll.poll = true;
    poll.desired_min_tx_us = 20_000;
    s.handle_packet(&poll, base + MS).unwrap();
    assert_eq!(s.detection_time(), 900 * MS, "held during the peer's poll");
    let mut after = packet(State::Up, 2, 1);
    after.desired_min_tx_us = 20_000;
    s.handle_packet(&after, base + 2 * MS).unwrap();
    assert_eq!(s.detection_time(), 60 * MS);
    // Slowing down applies at once (the safe direction).
    let mut slower = poll.clone();
    slower.desired_min_tx_us = 500_000;
    s.handle_packet(&slower, base + 3 * MS).unwrap();
    assert_eq!(s.detection_time(), 1500 * MS);
}

/// §6.8.3: every timer change, in Up, goes through a Poll Sequence; no change, no Poll.
#[test]
fn every_timer_change_polls_and_no_change_does_not() {
    let base = Instant::now();
    let (mut a, mut b) = up_pair(base);
    for (tx, rx, mult) in [
        (20 * MS, 10 * MS, 3),
        (20 * MS, 30 * MS, 3),
        (20 * MS, 30 * MS, 5),
        (5 * MS, 5 * MS, 2),
    ] {
        a.set_timers(tx, rx, mult, base);
        assert!(a.poll_active(), "{tx:?} {rx:?} {mult}");
        let sent = settle(&mut a, &mut b, base);
        assert!(sent.iter().any(|p| p.poll) && sent.iter().any(|p| p.final_));
        assert!(!a.poll_active());
        assert!(a.is_up() && b.is_up());
    }
    let before = a.transitions();
    a.set_timers(5 * MS, 5 * MS, 2, base);
    assert!(!a.poll_active());
    assert_eq!(a.transitions(), before);
}

#[test]
fn max_tx_gap_tracks_sends_while_up() {
    let base = Instant::now();
    let (mut a, mut b) = up_pair(base);
    assert_eq!(a.max_tx_gap(), Duration::ZERO);
    let mut t = base;
    for step in [5, 10, 7, 23, 4] {
        t += step * MS;
        a.transmit_now(t);
        deliver(&mut a, &mut b, t);
    }
    assert_eq!(a.max_tx_gap(), 23 * MS);
}

// ----- events table -----

#[derive(Clone, Copy, Debug)]
enum Ev {
    DetectionExpiry,
    AdminDown,
    AdminUp,
}

/// Every (state, event) pair that is not a received packet: detection time expiry,
/// AdminDown set, AdminDown cleared. Together with the sixteen-pair table above this
/// is the whole state machine.
#[test]
fn state_table_for_every_event() {
    use State::*;
    // (local, event) -> (new local, diag after)
    let table = [
        (
            AdminDown,
            Ev::DetectionExpiry,
            AdminDown,
            Diag::AdministrativelyDown,
        ),
        (
            AdminDown,
            Ev::AdminDown,
            AdminDown,
            Diag::AdministrativelyDown,
        ),
        (AdminDown, Ev::AdminUp, Down, Diag::None),
        (Down, Ev::DetectionExpiry, Down, Diag::None),
        (Down, Ev::AdminDown, AdminDown, Diag::AdministrativelyDown),
        (Down, Ev::AdminUp, Down, Diag::None),
        (
            Init,
            Ev::DetectionExpiry,
            Down,
            Diag::ControlDetectionExpired,
        ),
        (Init, Ev::AdminDown, AdminDown, Diag::AdministrativelyDown),
        (Init, Ev::AdminUp, Init, Diag::None),
        (Up, Ev::DetectionExpiry, Down, Diag::ControlDetectionExpired),
        (Up, Ev::AdminDown, AdminDown, Diag::AdministrativelyDown),
        (Up, Ev::AdminUp, Up, Diag::None),
    ];
    assert_eq!(table.len(), 12);
    for (local, ev, want, diag) in table {
        let base = Instant::now();
        let mut s = session_in(local, base);
        if local == Down {
            // A Down session that heard a peer, so the detection timer is armed.
            s.handle_packet(&packet(State::AdminDown, 2, 1), base)
                .unwrap();
        }
        let before = s.transitions();
        let at = base + Duration::from_secs(5);
        match ev {
            Ev::DetectionExpiry => s.handle_timeout(at),
            Ev::AdminDown => s.set_admin_down(at),
            Ev::AdminUp => s.set_admin_up(at),
        }
        assert_eq!(s.state(), want, "{local:?} + {ev:?}");
        assert_eq!(s.local_diag(), diag, "{local:?} + {ev:?}");
        assert_eq!(s.transitions(), before + u64::from(want != local));
    }
}

// ----- authentication in the session -----

use crate::core::bfd::auth::Auth;
use crate::core::wire::bfd::AuthType;

const ALL_AUTH: [AuthType; 5] = [
    AuthType::SimplePassword,
    AuthType::KeyedMd5,
    AuthType::MeticulousKeyedMd5,
    AuthType::KeyedSha1,
    AuthType::MeticulousKeyedSha1,
];

fn auth_session(discr: u32, kind: AuthType, secret: &[u8], now: Instant) -> Session {
    let mut s = Session::new(cfg(discr), now, u64::from(discr));
    s.set_auth(Some(Auth::new(kind, 1, secret, discr * 1000).unwrap()));
    s
}

/// Delivers through encode (signing) and handle_datagram (verifying).
fn deliver_signed(from: &mut Session, to: &mut Session, now: Instant) -> Vec<Result<(), RxError>> {
    let mut out = Vec::new();
    while let Some(pkt) = from.poll_transmit(now) {
        let mut buf = [0u8; 64];
        let n = from.encode(&pkt, &mut buf).unwrap();
        let parsed = ControlPacket::parse(&buf[..n]).unwrap();
        out.push(to.handle_datagram(&parsed, &buf[..n], now));
        assert!(out.len() < 10);
    }
    out
}

fn settle_signed(a: &mut Session, b: &mut Session, now: Instant) -> Vec<Result<(), RxError>> {
    let mut all = Vec::new();
    for _ in 0..10 {
        let ab = deliver_signed(a, b, now);
        let ba = deliver_signed(b, a, now);
        if ab.is_empty() && ba.is_empty() {
            break;
        }
        all.extend(ab);
        all.extend(ba);
    }
    all
}

#[test]
fn authenticated_sessions_come_up_for_every_type() {
    for kind in ALL_AUTH {
        let base = Instant::now();
        let mut a = auth_session(1, kind, b"s3cret", base);
        let mut b = auth_session(2, kind, b"s3cret", base);
        let results = settle_signed(&mut a, &mut b, base);
        assert!(results.iter().all(Result::is_ok), "{kind:?}: {results:?}");
        assert!(a.is_up() && b.is_up(), "{kind:?}");
        // And they stay up across many packets (sequence numbers advance).
        let mut t = base;
        for _ in 0..50 {
            t += 10 * MS;
            a.handle_timeout(t);
            b.handle_timeout(t);
            assert!(settle_signed(&mut a, &mut b, t).iter().all(Result::is_ok));
        }
        assert!(a.is_up() && b.is_up(), "{kind:?}");
    }
}

#[test]
fn wrong_secret_or_type_never_comes_up() {
    for kind in ALL_AUTH {
        let base = Instant::now();
        let mut a = auth_session(1, kind, b"s3cret", base);
        let mut b = auth_session(2, kind, b"other", base);
        let results = settle_signed(&mut a, &mut b, base);
        assert!(results.iter().all(|r| matches!(r, Err(RxError::Auth(_)))));
        assert_eq!(
            (a.state(), b.state()),
            (State::Down, State::Down),
            "{kind:?}"
        );
    }
    let base = Instant::now();
    let mut a = auth_session(1, AuthType::KeyedMd5, b"s", base);
    let mut b = auth_session(2, AuthType::KeyedSha1, b"s", base);
    settle_signed(&mut a, &mut b, base);
    assert_eq!((a.state(), b.state()), (State::Down, State::Down));
}

/// Fail closed both ways: configured auth refuses packets without the A bit, an
/// unauthenticated session refuses packets with it.
#[test]
fn auth_configured_on_one_side_only_never_comes_up() {
    for kind in ALL_AUTH {
        let base = Instant::now();
        let mut a = auth_session(1, kind, b"s3cret", base);
        let mut b = Session::new(cfg(2), base, 2);
        let results = settle_signed(&mut a, &mut b, base);
        assert!(results.contains(&Err(RxError::AuthMissing)), "{results:?}");
        assert!(results.contains(&Err(RxError::AuthMismatch)), "{results:?}");
        assert_eq!((a.state(), b.state()), (State::Down, State::Down));
    }
    // A keyed session cannot verify a packet handed over without its bytes.
    let base = Instant::now();
    let mut a = auth_session(1, AuthType::KeyedSha1, b"k", base);
    let mut b = auth_session(2, AuthType::KeyedSha1, b"k", base);
    let pkt = b.poll_transmit(base).unwrap();
    assert_eq!(
        a.handle_packet(&pkt, base),
        Err(RxError::Auth(crate::core::bfd::AuthError::NoBytes))
    );
}

#[test]
fn meticulous_replay_is_refused() {
    let base = Instant::now();
    let mut a = auth_session(1, AuthType::MeticulousKeyedSha1, b"k", base);
    let mut b = auth_session(2, AuthType::MeticulousKeyedSha1, b"k", base);
    settle_signed(&mut a, &mut b, base);
    assert!(a.is_up());
    let t = base + 10 * MS;
    b.transmit_now(t);
    let pkt = b.poll_transmit(t).unwrap();
    let mut buf = [0u8; 64];
    let n = b.encode(&pkt, &mut buf).unwrap();
    let parsed = ControlPacket::parse(&buf[..n]).unwrap();
    assert_eq!(a.handle_datagram(&parsed, &buf[..n], t), Ok(()));
    assert!(matches!(
        a.handle_datagram(&parsed, &buf[..n], t),
        Err(RxError::Auth(crate::core::bfd::AuthError::Sequence { .. }))
    ));
}

/// A session restored from a snapshot in a new process is the same
/// session to its peer: no state change on either side, the same
/// discriminators, packets at once and the detection time from the
/// restore.
#[test]
fn restored_session_goes_on_without_the_peer_noticing() {
    let base = Instant::now();
    let (mut a, mut b) = up_pair(base);
    let t = base + 50 * MS;
    settle(&mut a, &mut b, t);
    events(&mut a);
    events(&mut b);
    let snap = a.snapshot();
    assert_eq!(snap.state, State::Up as u8);
    assert_eq!(snap.remote_discr, 2);
    // The new process made its session from the configuration, with
    // another discriminator, Down.
    let later = t + 5 * MS;
    let mut a2 = Session::new(cfg(99), later, 5);
    a2.restore(&snap, later);
    assert!(a2.is_up());
    assert_eq!(a2.local_discriminator(), 1);
    assert_eq!(a2.remote_discriminator(), 2);
    assert_eq!(a2.transitions(), a.transitions());
    assert!(events(&mut a2).is_empty(), "a restore is no state change");
    assert_eq!(a2.detection_deadline(), Some(later + a.detection_time()));
    let sent = deliver(&mut a2, &mut b, later);
    assert_eq!(sent.len(), 1, "one packet due at once");
    assert_eq!(sent[0].state, State::Up);
    assert!(
        !sent[0].poll,
        "nothing to announce: the timers are those in effect"
    );
    assert!(events(&mut b).is_empty(), "the peer saw no change");
    assert!(b.is_up());
    // Its snapshot is the one it was restored from, but for what was sent.
    let mut again = a2.snapshot();
    again.max_tx_gap_us = snap.max_tx_gap_us;
    assert_eq!(again, snap);
}

/// The authentication sequence goes on from where the old process left
/// it: the peer, meticulous, accepts the next packet.
#[test]
fn restored_session_continues_the_auth_sequence() {
    let now = Instant::now();
    let key = |seq| Some(Auth::new(AuthType::MeticulousKeyedSha1, 1, b"secret", seq).unwrap());
    let mut a = Session::new(cfg(1), now, 1);
    a.set_auth(key(1000));
    let snap = {
        let _ = a.poll_transmit_encoded(now);
        let _ = a.poll_transmit_encoded(now + Duration::from_secs(2));
        a.snapshot()
    };
    let (xmit, _, _) = snap.auth_seq.expect("auth sequences");
    assert!(xmit > 1000, "packets were sent: {xmit}");
    let mut a2 = Session::new(cfg(1), now, 2);
    a2.set_auth(key(5));
    a2.restore(&snap, now);
    assert_eq!(a2.snapshot().auth_seq, snap.auth_seq);
    // Without authentication in the snapshot, the configured state stays.
    let mut plain = snap.clone();
    plain.auth_seq = None;
    let mut a3 = Session::new(cfg(1), now, 3);
    a3.set_auth(key(5));
    a3.restore(&plain, now);
    assert_eq!(a3.snapshot().auth_seq, Some((5, 0, false)));
}

/// A steady Up packet is one the offload may take; a Poll, a Final or a
/// packet while not Up is not. A refresh moves the detection deadline
/// exactly as receiving the packet again would, and only while both ends
/// are Up and only forward.
#[test]
fn repeats_of_a_steady_packet_refresh_the_detection_time() {
    let base = Instant::now();
    let (mut a, _) = up_pair(base);
    let steady = packet(State::Up, 2, 1);
    a.handle_packet(&steady, base + MS).expect("accepted");
    assert!(a.takes_repeats_of(&steady));
    let mut poll = steady.clone();
    poll.poll = true;
    assert!(!a.takes_repeats_of(&poll));
    let mut fin = steady.clone();
    fin.final_ = true;
    assert!(!a.takes_repeats_of(&fin));
    assert!(!a.takes_repeats_of(&packet(State::Init, 2, 1)));

    let deadline = a.detection_deadline().expect("armed");
    assert!(a.refresh(base + 9 * MS));
    assert_eq!(a.detection_deadline(), Some(deadline + 8 * MS));
    let mut received = a.clone();
    received
        .handle_packet(&steady, base + 9 * MS)
        .expect("accepted");
    assert_eq!(received.detection_deadline(), a.detection_deadline());
    // Not backwards, not twice for the same time.
    assert!(!a.refresh(base + 5 * MS));
    assert!(!a.refresh(base + 9 * MS));
    // Once the detection time ran out the session is Down: a late repeat
    // brings nothing back.
    let expiry = a.detection_deadline().expect("armed");
    a.handle_timeout(expiry);
    assert_eq!(a.state(), State::Down);
    assert!(!a.refresh(expiry + MS));
    assert!(!a.takes_repeats_of(&steady));
}
