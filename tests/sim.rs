//! Failover on a simulated network: two gateways' engines joined by two
//! paths with latency, driven by a virtual clock. No root, no sockets, and
//! the same result on every run, so the bounds here can be tight.

use crosslink::config::Config;
use crosslink::core::engine::{Engine, Event, Forwarding, MoveCause, OffloadChange};
use crosslink::core::forward::{classify, decapsulate, encapsulate, HEADROOM};
use crosslink::core::quality::{DataCounts, Prober, Reason, Reflector};
use crosslink::core::rng::Rng;
use crosslink::core::wire::overlay::Header;
use crosslink::PathId;
use etherparse::PacketBuilder;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn gateway_with(
    name: &str,
    peer: &str,
    side: u8,
    hold: &str,
    tx: &str,
    mult: u8,
    offload: bool,
) -> Config {
    let other = 3 - side;
    let text = format!(
        r#"
[gateway]
name = "{name}"
control_socket = "/nonexistent/{name}.sock"

[bfd]
tx_interval = "{tx}"
rx_interval = "{tx}"
multiplier = {mult}
offload = {offload}

[[peer]]
name = "{peer}"
tun = "xl-{peer}"
revert_hold = "{hold}"

  [[peer.path]]
  name = "p1"
  local = "198.18.21.{side}:4800"
  remote = "198.18.21.{other}:4800"
  priority = 1

  [[peer.path]]
  name = "p2"
  local = "198.18.22.{side}:4800"
  remote = "198.18.22.{other}:4800"
  priority = 2
"#
    );
    Config::parse(&text, name).expect("test config is valid")
}

/// A control packet or data datagram in flight.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Duration,
    to_b: bool,
    path: u16,
    bfd: bool,
    bytes: Vec<u8>,
}

struct Sim {
    t0: Instant,
    now: Duration,
    a: Engine,
    b: Engine,
    fwd_a: Arc<Forwarding>,
    latency: Duration,
    /// Per path: blackholed (both directions).
    cut: [bool; 2],
    queue: BinaryHeap<Reverse<InFlight>>,
    events_a: Vec<(Duration, Event)>,
    received: Vec<(u64, u16)>,
    /// Per path: the share of data and probes lost each way (a brownout
    /// that BFD survives).
    brownout: [f64; 2],
    rng: Rng,
    /// A's probers and B's reflectors, per path; A's data numbered per
    /// path, and what B received of it.
    probers: [Prober; 2],
    reflectors: [Reflector; 2],
    path_seq: [u64; 2],
    at_b: [DataCounts; 2],
    /// The receive offload of each side's kernel (A, B), per path, and
    /// the control packets delivered in all and taken by it.
    kernel: [[Taken; 2]; 2],
    bfd_delivered: u64,
    bfd_taken: u64,
}

/// A simulated receive offload of one path: the packet it takes repeats
/// of, when it took the last and how many (reported: how many of them
/// the engine was told of).
#[derive(Clone, Copy, Default)]
struct Taken {
    packet: Option<[u8; 24]>,
    last: Option<Duration>,
    count: u64,
    reported: u64,
}

/// Applies what the engine asks of its offload, as the BFD thread does
/// (what was taken under an old packet is counted first).
fn apply_offload(eng: &mut Engine, kernel: &mut [Taken; 2]) {
    while let Some(change) = eng.poll_offload() {
        let k = &mut kernel[usize::from(change.path().0)];
        let pending = k.count - k.reported;
        if pending > 0 {
            eng.handle_bfd_refresh(change.path(), None, pending);
        }
        *k = match change {
            OffloadChange::Arm { packet, .. } => Taken {
                packet: Some(packet),
                ..Taken::default()
            },
            OffloadChange::Disarm(_) => Taken::default(),
        };
    }
}

fn local_ip(path: u16, side: u8) -> IpAddr {
    format!("198.18.2{}.{}", path + 1, side).parse().unwrap()
}

impl Sim {
    /// Gateway A's first move of its traffic from path 1 to path 2 after
    /// `after`: when, its detection time and its cause.
    fn first_move_off_path_1(
        &self,
        after: Duration,
    ) -> Option<(Duration, Option<Duration>, MoveCause)> {
        self.events_a.iter().find_map(|(t, e)| match e {
            Event::Failover {
                from: Some(PathId(0)),
                to: Some(PathId(1)),
                detection,
                cause,
                ..
            } if *t > after => Some((*t, *detection, *cause)),
            _ => None,
        })
    }

    fn new(hold: &str, tx: &str, mult: u8) -> Sim {
        Sim::with_offload(hold, tx, mult, false)
    }

    /// Both gateways with `bfd.offload` as given.
    fn with_offload(hold: &str, tx: &str, mult: u8, offload: bool) -> Sim {
        let t0 = Instant::now();
        let a = Engine::new(&gateway_with("a", "b", 1, hold, tx, mult, offload), t0, 1);
        let b = Engine::new(&gateway_with("b", "a", 2, hold, tx, mult, offload), t0, 2);
        let fwd_a = Arc::new(a.forwarding());
        Sim {
            t0,
            now: Duration::ZERO,
            a,
            b,
            fwd_a,
            latency: Duration::from_micros(200),
            cut: [false; 2],
            queue: BinaryHeap::new(),
            events_a: Vec::new(),
            received: Vec::new(),
            brownout: [0.0; 2],
            rng: Rng::new(7),
            probers: [0, 1].map(|_| Prober::new(Duration::from_millis(10))),
            reflectors: [Reflector::default(); 2],
            path_seq: [0; 2],
            at_b: [DataCounts::default(); 2],
            kernel: [[Taken::default(); 2]; 2],
            bfd_delivered: 0,
            bfd_taken: 0,
        }
    }

    fn lost(&mut self, path: usize) -> bool {
        let p = self.brownout[path];
        self.cut[path] || (p > 0.0 && (self.rng.below(1_000_000) as f64) < p * 1e6)
    }

    /// A's probes on both paths that are due, answered at once by B's
    /// reflectors (losses each way as the brownout says); each reply's
    /// sample goes to A's engine.
    fn probe(&mut self) {
        let now = self.instant();
        for i in 0..2 {
            let Some(p) = self.probers[i].poll_probe(now) else {
                continue;
            };
            if self.lost(i) {
                continue;
            }
            let ns = self.now.as_nanos() as u64;
            let report = self.reflectors[i].reflect(p.class, 64, ns, self.at_b[i]);
            if self.lost(i) {
                continue;
            }
            let sample = self.probers[i].handle_reply(p.seq, report, DataCounts::default(), now);
            if let Some(sample) = sample {
                self.a.handle_quality_sample(PathId(i as u16), &sample, now);
            }
        }
    }

    fn instant(&self) -> Instant {
        self.t0 + self.now
    }

    /// Runs both engines' timers and transmissions at the current time.
    fn step_engines(&mut self) {
        let now = self.instant();
        for to_b in [true, false] {
            let (eng, kernel) = match to_b {
                true => (&mut self.a, &mut self.kernel[0]),
                false => (&mut self.b, &mut self.kernel[1]),
            };
            eng.handle_timeout(now);
            // Offloaded sessions whose detection time ran out: what the
            // offload took, then the timers again (the BFD thread's order).
            let mut asked = false;
            while let Some(id) = eng.poll_refresh() {
                asked = true;
                let k = &mut kernel[usize::from(id.0)];
                let new = k.count - k.reported;
                k.reported = k.count;
                eng.handle_bfd_refresh(id, k.last.map(|d| self.t0 + d), new);
            }
            if asked {
                eng.handle_timeout(now);
            }
            apply_offload(eng, kernel);
            let mut out = Vec::new();
            while let Some((id, pkt)) = eng.poll_transmit(now) {
                out.push((id.0, pkt.unwrap().as_bytes().to_vec()));
            }
            for (path, bytes) in out {
                if !self.cut[usize::from(path)] {
                    self.queue.push(Reverse(InFlight {
                        at: self.now + self.latency,
                        to_b,
                        path,
                        bfd: true,
                        bytes,
                    }));
                }
            }
        }
        while let Some(ev) = self.a.poll_event() {
            self.events_a.push((self.now, ev));
        }
        while self.b.poll_event().is_some() {}
        if let Some(f) = self.a.poll_forwarding() {
            self.fwd_a = f;
        }
        let _ = self.b.poll_forwarding();
    }

    fn deliver(&mut self, m: InFlight) {
        let now = self.instant();
        let side = if m.to_b { 2 } else { 1 };
        let src = SocketAddr::new(local_ip(m.path, 3 - side), 49152);
        if m.bfd {
            self.bfd_delivered += 1;
            let (eng, kernel) = match m.to_b {
                true => (&mut self.b, &mut self.kernel[1]),
                false => (&mut self.a, &mut self.kernel[0]),
            };
            let k = &mut kernel[usize::from(m.path)];
            if k.packet.is_some_and(|p| p[..] == m.bytes[..]) {
                k.last = Some(self.now);
                k.count += 1;
                self.bfd_taken += 1;
                return;
            }
            eng.handle_bfd_datagram(local_ip(m.path, side), src, Some(255), &m.bytes, now)
                .expect("control packet accepted");
            apply_offload(eng, kernel);
        } else if let Ok((_, inner)) = decapsulate(&m.bytes) {
            let seq = u64::from_be_bytes(inner[28..36].try_into().unwrap());
            self.received.push((seq, m.path));
        }
    }

    /// Sends data packet `seq` from A's side through its current selection.
    fn send_data(&mut self, seq: u64) {
        let b = PacketBuilder::ipv4([198, 18, 10, 1], [198, 18, 30, 2], 64).udp(4000, 5000);
        let mut inner = Vec::new();
        b.write(&mut inner, &seq.to_be_bytes()).unwrap();
        let sel = &self.fwd_a.peers[0];
        let Ok(place) = classify(sel, &inner) else {
            return;
        };
        let mut buf = vec![0u8; HEADROOM + inner.len()];
        buf[HEADROOM..].copy_from_slice(&inner);
        let i = usize::from(place.path.0);
        self.path_seq[i] += 1;
        let range = encapsulate(&mut buf, inner.len(), &Header::data(self.path_seq[i])).unwrap();
        let buf = buf[range].to_vec();
        if self.lost(i) {
            return;
        }
        self.at_b[i].received += 1;
        self.at_b[i].seq_high = self.path_seq[i];
        {
            self.queue.push(Reverse(InFlight {
                at: self.now + self.latency,
                to_b: true,
                path: place.path.0,
                bfd: false,
                bytes: buf,
            }));
        }
    }

    /// Advances virtual time to `until`, sending one data packet per
    /// millisecond when `stream` is set.
    fn run_until(&mut self, until: Duration, stream: bool) {
        loop {
            self.step_engines();
            let next_engine = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .map(|t| t.saturating_duration_since(self.t0))
                .min()
                .unwrap_or(Duration::MAX);
            let next_msg = self.queue.peek().map_or(Duration::MAX, |m| m.0.at);
            let next_data = if stream {
                Duration::from_millis(self.now.as_millis() as u64 + 1)
            } else {
                Duration::MAX
            };
            let next_probe = self
                .probers
                .iter()
                .filter_map(|p| p.poll_timeout())
                .map(|t| t.saturating_duration_since(self.t0))
                .min()
                .unwrap_or(Duration::ZERO);
            let next = next_engine
                .min(next_msg)
                .min(next_probe)
                .max(self.now + Duration::from_nanos(1))
                .min(next_data);
            if next > until {
                self.now = until;
                return;
            }
            self.now = next;
            while self.queue.peek().is_some_and(|m| m.0.at <= self.now) {
                let m = self.queue.pop().unwrap().0;
                self.deliver(m);
            }
            if self.now >= next_probe {
                self.probe();
            }
            if stream && self.now == next_data {
                self.send_data(self.now.as_millis() as u64);
            }
        }
    }

    fn active(&self) -> Option<PathId> {
        self.fwd_a.peers[0].active
    }
}

fn longest_gap(received: &[(u64, u16)], from: u64, to: u64) -> u64 {
    let mut seqs: Vec<u64> = received
        .iter()
        .map(|r| r.0)
        .filter(|s| (from..to).contains(s))
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut prev = from;
    let mut gap = 0;
    for s in seqs.iter().copied().chain(std::iter::once(to)) {
        gap = gap.max(s.saturating_sub(prev + 1));
        prev = s;
    }
    gap
}

#[test]
fn sessions_come_up_and_primary_carries_traffic() {
    let mut sim = Sim::new("1s", "10ms", 3);
    sim.run_until(Duration::from_secs(5), false);
    assert_eq!(sim.active(), Some(PathId(0)));
    assert!(sim.a.paths().iter().all(|p| p.is_up()));
    assert!(sim.b.paths().iter().all(|p| p.is_up()));
}

#[test]
fn blackhole_fails_over_within_detection_time_and_reverts_after_hold() {
    let mut sim = Sim::new("1s", "10ms", 3);
    sim.run_until(Duration::from_secs(5), false);
    assert_eq!(sim.active(), Some(PathId(0)));
    // Stream for a second, then cut path 1 in both directions.
    sim.run_until(Duration::from_secs(6), true);
    let cut_at = sim.now;
    sim.cut[0] = true;
    sim.run_until(Duration::from_secs(7), true);
    assert_eq!(sim.active(), Some(PathId(1)));
    let outage = longest_gap(&sim.received, 5_001, 7_000);
    let failover = sim
        .first_move_off_path_1(cut_at)
        .map(|(t, detection, _)| (t - cut_at, detection))
        .expect("a failover event");
    println!(
        "sim failover at 10ms x 3: outage {outage} ms, failover {:?} after the cut, detection {:?}",
        failover.0, failover.1
    );
    // Detection time is 3 x 10 ms after the last packet heard, which came at
    // most one (jittered) interval before the cut.
    assert!((20..=32).contains(&outage), "outage {outage} ms");
    assert!(failover.0 <= Duration::from_millis(31), "{:?}", failover.0);
    // Heal: path 1 comes back, but only carries traffic after revert_hold.
    sim.cut[0] = false;
    let healed = sim.now;
    sim.run_until(healed + Duration::from_millis(900), true);
    assert_eq!(sim.active(), Some(PathId(1)), "reverted before the hold");
    sim.run_until(healed + Duration::from_millis(3500), true);
    assert_eq!(
        sim.active(),
        Some(PathId(0)),
        "did not revert after the hold"
    );
    let tail_paths: Vec<u16> = sim.received.iter().rev().take(100).map(|r| r.1).collect();
    assert!(tail_paths.iter().all(|&p| p == 0));
    // The revert itself loses nothing.
    let end = sim.now.as_millis() as u64;
    assert_eq!(
        missing(&sim.received, healed.as_millis() as u64 + 1, end - 1),
        Vec::<u64>::new()
    );
}

/// The BFD receive offload takes the repeats of steady sessions and
/// changes nothing else: the same run with and without it (sessions up, a
/// stream, path 1 cut and healed) gives the same events at the same times,
/// failover detection included, and the same packets delivered.
#[test]
fn the_receive_offload_takes_repeats_and_changes_no_outcome() {
    let run = |offload: bool| {
        let mut sim = Sim::with_offload("1s", "10ms", 3, offload);
        sim.run_until(Duration::from_secs(5), false);
        sim.run_until(Duration::from_secs(6), true);
        sim.cut[0] = true;
        sim.run_until(Duration::from_secs(7), true);
        sim.cut[0] = false;
        sim.run_until(Duration::from_millis(10_500), true);
        let events: Vec<String> = sim
            .events_a
            .iter()
            .map(|(t, e)| format!("{t:?} {e:?}"))
            .collect();
        // Counted, and taken but not read yet.
        let rx: Vec<u64> = sim
            .a
            .paths()
            .iter()
            .zip(&sim.kernel[0])
            .map(|(p, k)| p.control_rx + k.count - k.reported)
            .collect();
        (
            events,
            sim.received.clone(),
            rx,
            sim.bfd_delivered,
            sim.bfd_taken,
        )
    };
    let (events, received, rx, delivered, taken) = run(false);
    let (events_on, received_on, rx_on, delivered_on, taken_on) = run(true);
    println!(
        "offload: {taken_on} of {delivered_on} control packets taken; {} events",
        events_on.len()
    );
    assert_eq!(taken, 0);
    assert!(
        taken_on * 10 >= delivered_on * 9,
        "the offload took {taken_on} of {delivered_on}"
    );
    assert!(events.iter().any(|e| e.contains("Failover")));
    assert_eq!(events_on, events);
    assert_eq!(received_on, received);
    assert_eq!(delivered_on, delivered);
    // What the offload took counts as received.
    assert_eq!(rx_on, rx);
}

#[test]
fn slower_timers_detect_proportionally_later() {
    let mut sim = Sim::new("1s", "50ms", 3);
    sim.run_until(Duration::from_secs(8), false);
    assert_eq!(sim.active(), Some(PathId(0)));
    sim.run_until(Duration::from_secs(9), true);
    sim.cut[0] = true;
    sim.run_until(Duration::from_secs(10), true);
    let outage = longest_gap(&sim.received, 8_001, 10_000);
    println!("sim failover at 50ms x 3: outage {outage} ms");
    assert!((100..=160).contains(&outage), "outage {outage} ms");
}

#[test]
fn losing_every_path_takes_the_peer_down() {
    let mut sim = Sim::new("1s", "10ms", 3);
    sim.run_until(Duration::from_secs(5), false);
    sim.cut = [true, true];
    sim.run_until(Duration::from_secs(6), false);
    assert_eq!(sim.active(), None);
    assert!(sim
        .events_a
        .iter()
        .any(|(_, e)| matches!(e, Event::PeerUp { up: false, .. })));
    sim.cut = [false, true];
    sim.run_until(Duration::from_secs(9), false);
    assert_eq!(sim.active(), Some(PathId(0)));
}

fn missing(received: &[(u64, u16)], from: u64, to: u64) -> Vec<u64> {
    let got: std::collections::HashSet<u64> = received.iter().map(|r| r.0).collect();
    (from..to).filter(|s| !got.contains(s)).collect()
}

#[test]
fn carrier_loss_fails_over_at_once_and_returns_only_after_bfd() {
    use crosslink::core::engine::BlockCause;
    let mut sim = Sim::new("1s", "10ms", 3);
    sim.run_until(Duration::from_secs(5), false);
    sim.run_until(Duration::from_secs(6), true);
    // The veth loses carrier: packets stop and the link watch reports it.
    sim.cut[0] = true;
    let now = sim.instant();
    sim.a.handle_link_event(PathId(0), false, now);
    sim.step_engines();
    assert_eq!(sim.active(), Some(PathId(1)), "no immediate failover");
    assert_eq!(
        sim.a.path(PathId(0)).unwrap().blocked(),
        Some(BlockCause::Link)
    );
    sim.run_until(Duration::from_secs(7), true);
    let outage = longest_gap(&sim.received, 5_001, 7_000);
    println!("sim carrier loss: outage {outage} ms");
    assert!(outage <= 2, "outage {outage} ms");
    // Carrier back, but BFD on path 0 is down: the path stays blocked until
    // BFD is Up again and a packet was heard, then waits out the hold.
    let now = sim.instant();
    sim.a.handle_link_event(PathId(0), true, now);
    sim.step_engines();
    assert!(sim.a.path(PathId(0)).unwrap().blocked().is_some());
    sim.cut[0] = false;
    let mut t = Duration::from_secs(7);
    while sim.a.path(PathId(0)).unwrap().blocked().is_some() {
        assert!(!sim.a.path(PathId(0)).unwrap().is_healthy());
        t += Duration::from_millis(10);
        assert!(t < Duration::from_secs(12), "block never lifted");
        sim.run_until(t, true);
    }
    assert!(sim.a.path(PathId(0)).unwrap().is_up());
    assert_eq!(sim.active(), Some(PathId(1)), "reverted before the hold");
    sim.run_until(t + Duration::from_millis(1100), true);
    assert_eq!(sim.active(), Some(PathId(0)));
}

#[test]
fn send_errors_make_a_path_suspect_until_bfd_works_again() {
    use crosslink::core::engine::BlockCause;
    let mut sim = Sim::new("1s", "10ms", 3);
    sim.run_until(Duration::from_secs(5), false);
    let now = sim.instant();
    sim.a.handle_send_error(PathId(0), now);
    sim.step_engines();
    assert_eq!(sim.active(), Some(PathId(1)));
    assert_eq!(
        sim.a.path(PathId(0)).unwrap().blocked(),
        Some(BlockCause::SendError)
    );
    // BFD packets still arrive, but no send has succeeded yet: still suspect.
    sim.run_until(Duration::from_secs(5) + Duration::from_millis(100), false);
    assert!(sim.a.path(PathId(0)).unwrap().blocked().is_some());
    // A BFD send succeeds, then the next packet from the far end clears it.
    sim.a.handle_send_ok(PathId(0));
    sim.run_until(Duration::from_secs(5) + Duration::from_millis(200), false);
    assert_eq!(sim.a.path(PathId(0)).unwrap().blocked(), None);
    sim.run_until(Duration::from_secs(8), false);
    assert_eq!(sim.active(), Some(PathId(0)));
}

#[test]
fn a_brownout_moves_the_stream_off_and_back_after_the_hold() {
    let mut sim = Sim::new("1s", "10ms", 3);
    sim.run_until(Duration::from_secs(5), false);
    // Six seconds of calm traffic: the path's reordering window is down
    // to its least (50 ms) when the brownout comes.
    sim.run_until(Duration::from_secs(11), true);
    assert_eq!(sim.active(), Some(PathId(0)));
    // 5 % of path 1's data and probes lost each way; BFD survives.
    sim.brownout[0] = 0.05;
    let start = sim.now;
    sim.run_until(Duration::from_secs(13), true);
    assert_eq!(sim.active(), Some(PathId(1)));
    assert!(sim.a.paths()[0].is_up(), "BFD kept path 1 up");
    let moved = sim
        .first_move_off_path_1(Duration::ZERO)
        .map(|(t, _, cause)| (t, cause))
        .expect("moved off path 1");
    assert_eq!(moved.1, MoveCause::Degraded(Reason::Loss));
    let after = moved.0 - start;
    assert!(after <= Duration::from_millis(300), "left after {after:?}");
    // The brownout ends: path 1 carries the stream again once it has been
    // good for the hold (10 s), not before.
    sim.brownout[0] = 0.0;
    let healed = sim.now;
    sim.run_until(healed + Duration::from_secs(9), true);
    assert_eq!(sim.active(), Some(PathId(1)), "back before the hold");
    sim.run_until(healed + Duration::from_secs(15), true);
    assert_eq!(sim.active(), Some(PathId(0)));
    let back = sim.events_a.iter().rev().find_map(|(_, e)| match e {
        Event::Failover {
            to: Some(PathId(0)),
            cause,
            ..
        } => Some(*cause),
        _ => None,
    });
    assert_eq!(back, Some(MoveCause::Recovered));
}

#[test]
fn auto_fec_follows_the_loss_of_every_path() {
    let mut sim = Sim::new("1s", "10ms", 3);
    let auto = crosslink::config::FecConfig {
        mode: crosslink::config::FecMode::Auto,
        ..Default::default()
    };
    sim.a.set_fec(crosslink::PeerId(0), auto, sim.instant());
    sim.run_until(Duration::from_secs(5), false);
    sim.run_until(Duration::from_secs(6), true);
    assert_eq!(sim.fwd_a.peers[0].fec, None, "no loss, no parity");
    // 3 % lost on both paths: nowhere to move to, parity instead
    sim.brownout = [0.03, 0.03];
    let lossy = sim.now;
    sim.run_until(lossy + Duration::from_secs(3), true);
    let code = sim.fwd_a.peers[0].fec.expect("parity under 3 % loss");
    assert!(
        code.overhead() > 0.05 && code.overhead() <= 0.3 + 1e-9,
        "{code}"
    );
    let changes: Vec<_> = sim
        .events_a
        .iter()
        .filter_map(|(t, e)| match e {
            Event::Fec { to, loss, .. } => Some((*t, *to, *loss)),
            _ => None,
        })
        .collect();
    assert!(!changes.is_empty() && changes.len() <= 6, "{changes:?}");
    assert!(changes.iter().all(|(t, _, l)| *t >= lossy && *l > 0.001));
    // the loss ends: the code stays for the hold, then goes
    sim.brownout = [0.0; 2];
    let healed = sim.now;
    sim.run_until(healed + Duration::from_secs(4), true);
    assert!(sim.fwd_a.peers[0].fec.is_some(), "dropped before the hold");
    sim.run_until(healed + Duration::from_secs(14), true);
    assert_eq!(sim.fwd_a.peers[0].fec, None, "{:?}", sim.events_a.last());
}
