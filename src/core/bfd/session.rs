//! One BFD session: RFC 5880 §6 state machine, timers and Poll/Final, asynchronous mode.
//!
//! Timer bookkeeping follows §6.8.3. Three sets of intervals exist:
//!
//! * **configured**: what the operator asked for (`SessionConfig`, `set_timers`);
//! * **advertised**: what goes on the wire: the configured values, except that Desired
//!   Min TX is at least one second while the session is not Up ("slow rate");
//! * **in effect**: what this side actually uses for its transmit interval and its
//!   detection time. While a Poll Sequence is running it is the *safer* of the old and
//!   the new values (the faster TX rate, the longer RX requirement), so that neither
//!   side declares the other dead while it is still adopting the change; the Final that
//!   ends the Poll Sequence makes the advertised values take effect.
//!
//! The state machine itself is [`next_state`], a pure function of (local state, received
//! state) that a test enumerates for all sixteen pairs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::auth::Auth;
use super::{RxError, SessionEvent};
use crate::core::rng::Rng;
use crate::core::wire::bfd::{ControlPacket, Diag, EmitError, State, BFD_VERSION, MAX_PACKET_LEN};

/// The minimum Desired Min TX Interval advertised while the session is not Up (§6.8.3).
pub const SLOW_TX_INTERVAL: Duration = Duration::from_secs(1);

/// The smallest Desired Min TX Interval we advertise; zero is reserved (§4.1).
const MIN_DESIRED_TX: Duration = Duration::from_micros(1);

/// Static parameters of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// bfd.LocalDiscr. Must be nonzero and unique on this system; zero is replaced by 1.
    pub local_discriminator: u32,
    /// bfd.DesiredMinTxInterval once Up (at least 1 s is advertised while not Up).
    pub desired_min_tx: Duration,
    /// bfd.RequiredMinRxInterval. Zero asks the peer not to send periodic packets.
    pub required_min_rx: Duration,
    /// bfd.DetectMult. Zero is treated as 1.
    pub detect_mult: u8,
    /// Passive role (§6.1): do not transmit until the peer has been heard.
    pub passive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timers {
    desired_min_tx: Duration,
    required_min_rx: Duration,
}

impl Timers {
    /// The safe combination while a Poll Sequence moves from `self` to `new` (§6.8.3):
    /// transmit at the faster rate and expect packets at the slower one.
    fn during_poll(self, new: Timers) -> Timers {
        Timers {
            desired_min_tx: self.desired_min_tx.min(new.desired_min_tx),
            required_min_rx: self.required_min_rx.max(new.required_min_rx),
        }
    }
}

/// What we last heard from the peer (bfd.Remote* variables, §6.8.1).
#[derive(Clone, Copy, Debug)]
struct Remote {
    discr: u32,
    state: State,
    diag: Diag,
    /// bfd.RemoteMinRxInterval; initialised to 1 µs as §6.8.1 requires ("1").
    min_rx: Duration,
    desired_min_tx: Duration,
    /// The remote Desired Min TX used for the detection time. While the peer's Poll
    /// Sequence announces a *faster* rate it still sends at the old one until it sees
    /// our Final, so the slower value is kept until a packet without Poll arrives.
    detect_tx: Duration,
    detect_mult: u8,
    /// bfd.RemoteDemandMode (§6.8.1): the D bit of the last packet.
    demand: bool,
}

impl Remote {
    fn unknown() -> Remote {
        Remote {
            discr: 0,
            state: State::Down,
            diag: Diag::None,
            min_rx: Duration::from_micros(1),
            desired_min_tx: Duration::ZERO,
            detect_tx: Duration::ZERO,
            detect_mult: 0,
            demand: false,
        }
    }
}

/// A sans-IO BFD session (asynchronous mode). See the module docs of [`crate::core::bfd`].
#[derive(Clone, Debug)]
pub struct Session {
    local_discr: u32,
    passive: bool,
    detect_mult: u8,
    configured: Timers,
    in_effect: Timers,
    state: State,
    local_diag: Diag,
    remote: Remote,
    poll_active: bool,
    /// When a Final answering the peer's Poll became due (§6.8.7: "as soon as
    /// practicable, without respect to the transmission timer").
    final_due: Option<Instant>,
    /// Next periodic transmission; moved to "now" by state changes and new polls.
    next_tx: Option<Instant>,
    last_rx: Option<Instant>,
    transitions: u64,
    last_change: Option<Instant>,
    /// Last transmission while Up, and the largest gap between two of them.
    last_tx_up: Option<Instant>,
    max_tx_gap: Duration,
    events: VecDeque<SessionEvent>,
    rng: Rng,
    /// bfd.AuthType and friends; `None` is bfd.AuthType = 0.
    auth: Option<Auth>,
}

/// What a session carries into the process that replaces this one (an
/// upgrade, see `crate::io::upgrade`), so that the peer notices nothing:
/// the discriminators, both states, the timers in effect and the
/// authentication sequence numbers. Instants are not carried (one
/// process's clock readings mean nothing in the data of another): the
/// imported session counts its detection time and its next transmission
/// from the import. Durations are in microseconds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub local_discr: u32,
    /// The state's wire code (§4.1).
    pub state: u8,
    pub local_diag: u8,
    pub remote_discr: u32,
    pub remote_state: u8,
    pub remote_diag: u8,
    pub remote_min_rx_us: u64,
    pub remote_desired_min_tx_us: u64,
    pub remote_detect_tx_us: u64,
    pub remote_detect_mult: u8,
    pub remote_demand: bool,
    pub in_effect_tx_us: u64,
    pub in_effect_rx_us: u64,
    pub poll_active: bool,
    pub transitions: u64,
    pub max_tx_gap_us: u64,
    /// bfd.XmitAuthSeq, bfd.RcvAuthSeq and bfd.AuthSeqKnown, with authentication.
    pub auth_seq: Option<(u32, u32, bool)>,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// An encoded Control packet ready to send (signed when authentication is on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    bytes: [u8; MAX_PACKET_LEN],
    len: usize,
}

impl Transmit {
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }
}

fn to_us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn from_us(us: u32) -> Duration {
    Duration::from_micros(u64::from(us))
}

impl Session {
    /// A new session in state Down that transmits at `now` (unless passive).
    /// `seed` drives the transmit jitter; give each session a different one.
    pub fn new(cfg: SessionConfig, now: Instant, seed: u64) -> Session {
        let configured = Timers {
            desired_min_tx: cfg.desired_min_tx.max(MIN_DESIRED_TX),
            required_min_rx: cfg.required_min_rx,
        };
        let mut session = Session {
            local_discr: cfg.local_discriminator.max(1),
            passive: cfg.passive,
            detect_mult: cfg.detect_mult.max(1),
            configured,
            in_effect: configured,
            state: State::Down,
            local_diag: Diag::None,
            remote: Remote::unknown(),
            poll_active: false,
            final_due: None,
            next_tx: Some(now),
            last_rx: None,
            transitions: 0,
            last_change: None,
            last_tx_up: None,
            max_tx_gap: Duration::ZERO,
            events: VecDeque::new(),
            rng: Rng::new(seed),
            auth: None,
        };
        session.in_effect = session.advertised();
        session
    }

    /// Moves the first transmission of a new session from `now` to a random
    /// point of the next `window` (at most the slow rate's one second, the
    /// interval of a session that is not Up). Sessions created together (a
    /// gateway's start, a reload that adds many peers) would otherwise send,
    /// come Up and run their Poll Sequences in step, each interval's work
    /// one burst that holds up the sessions already keeping their pace;
    /// spread from the first packet, the exchanges that bring them Up
    /// answer each other spread as well. A session that has heard its peer
    /// already is left as it is.
    pub fn spread_first_transmission(&mut self, now: Instant, window: Duration) {
        // (A known remote discriminator always comes with `last_rx`.)
        if self.state != State::Down || self.last_rx.is_some() {
            return;
        }
        let spread = window.min(SLOW_TX_INTERVAL);
        let ns = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
        let offset = Duration::from_nanos(self.rng.below(ns));
        self.next_tx = now.checked_add(offset).or(Some(now));
    }

    /// Turns authentication on (§6.7) or off. With it on, only packets that carry a
    /// valid auth section of the configured type and key are accepted — the session
    /// cannot come Up without it — and every packet sent is signed.
    pub fn set_auth(&mut self, auth: Option<Auth>) {
        self.auth = auth;
    }

    /// Whether authentication is configured (bfd.AuthType nonzero).
    pub fn auth_enabled(&self) -> bool {
        self.auth.is_some()
    }

    /// The session's state for the process that takes over (see [`Snapshot`]).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            local_discr: self.local_discr,
            state: self.state as u8,
            local_diag: self.local_diag.code(),
            remote_discr: self.remote.discr,
            remote_state: self.remote.state as u8,
            remote_diag: self.remote.diag.code(),
            remote_min_rx_us: us(self.remote.min_rx),
            remote_desired_min_tx_us: us(self.remote.desired_min_tx),
            remote_detect_tx_us: us(self.remote.detect_tx),
            remote_detect_mult: self.remote.detect_mult,
            remote_demand: self.remote.demand,
            in_effect_tx_us: us(self.in_effect.desired_min_tx),
            in_effect_rx_us: us(self.in_effect.required_min_rx),
            poll_active: self.poll_active,
            transitions: self.transitions,
            max_tx_gap_us: us(self.max_tx_gap),
            auth_seq: self.auth.as_ref().map(Auth::sequences),
        }
    }

    /// Takes over the state of the session `snap` was taken from, in place
    /// of this one's (made from the configuration: its configured timers,
    /// detection multiplier and key stay). The detection time and the next
    /// transmission count from `now`; should the configured timers differ
    /// from those in effect while Up, a Poll Sequence announces them, as
    /// a reload would. Authentication sequence numbers are taken when
    /// both have authentication.
    pub fn restore(&mut self, snap: &Snapshot, now: Instant) {
        let micros = Duration::from_micros;
        self.local_discr = snap.local_discr.max(1);
        self.state = State::from_bits(snap.state);
        self.local_diag = Diag::from_u8(snap.local_diag);
        self.remote = Remote {
            discr: snap.remote_discr,
            state: State::from_bits(snap.remote_state),
            diag: Diag::from_u8(snap.remote_diag),
            min_rx: micros(snap.remote_min_rx_us),
            desired_min_tx: micros(snap.remote_desired_min_tx_us),
            detect_tx: micros(snap.remote_detect_tx_us),
            detect_mult: snap.remote_detect_mult,
            demand: snap.remote_demand,
        };
        self.in_effect = Timers {
            desired_min_tx: micros(snap.in_effect_tx_us).max(MIN_DESIRED_TX),
            required_min_rx: micros(snap.in_effect_rx_us),
        };
        self.poll_active = snap.poll_active;
        self.transitions = snap.transitions;
        self.max_tx_gap = micros(snap.max_tx_gap_us);
        self.last_rx = (self.remote.discr != 0).then_some(now);
        self.last_change = Some(now);
        self.last_tx_up = None;
        self.final_due = None;
        self.next_tx = Some(now);
        if let (Some(auth), Some((xmit, rcv, known))) = (self.auth.as_mut(), snap.auth_seq) {
            auth.set_sequences(xmit, rcv, known);
        }
        match self.state {
            State::Up if self.advertised() != self.in_effect && !self.poll_active => {
                self.start_poll(now);
            }
            State::Up => {}
            _ => self.in_effect = self.advertised(),
        }
    }

    // ----- inputs -----

    /// Processes a received, parsed Control packet (RFC 5880 §6.8.6, in the RFC's order).
    /// On `Err` the packet was discarded; the error names why (for the drop counter).
    /// [`RxError::LocalAdminDown`] is the one case where the remote's parameters were
    /// still recorded, as the RFC orders.
    ///
    /// Without the packet's bytes a keyed digest cannot be checked, so a session with
    /// keyed authentication refuses everything here; use
    /// [`handle_datagram`](Self::handle_datagram).
    pub fn handle_packet(&mut self, pkt: &ControlPacket, now: Instant) -> Result<(), RxError> {
        self.receive(pkt, None, now)
    }

    /// Processes a received packet given both parsed and as bytes (the bytes are
    /// needed to verify keyed MD5/SHA1 digests, §6.7.3–§6.7.4).
    pub fn handle_datagram(
        &mut self,
        pkt: &ControlPacket,
        raw: &[u8],
        now: Instant,
    ) -> Result<(), RxError> {
        self.receive(pkt, Some(raw), now)
    }

    fn receive(
        &mut self,
        pkt: &ControlPacket,
        raw: Option<&[u8]>,
        now: Instant,
    ) -> Result<(), RxError> {
        self.check_packet(pkt)?;
        self.authenticate(pkt, raw, now)?;
        let could_transmit = self.may_transmit_periodic();
        self.record_remote(pkt, now);
        // Periodic transmission resumes (the peer asks for packets again, or leaves
        // Demand mode): a packet that fell due while it was paused is due now, not at
        // that past time.
        if !could_transmit && self.may_transmit_periodic() {
            self.next_tx = self.next_tx.map(|due| due.max(now));
        }
        // "If a Poll Sequence is being transmitted by the local system and the Final
        // (F) bit in the received packet is set, the Poll Sequence MUST be terminated"
        // — and only now do the new intervals take effect (§6.8.3).
        if pkt.final_ && self.poll_active {
            self.poll_active = false;
            self.in_effect = self.advertised();
        }
        // "Update the transmit interval as described in section 6.8.2."
        self.pull_next_tx_forward(now);
        // "If bfd.SessionState is AdminDown, discard the packet."
        if self.state == State::AdminDown {
            return Err(RxError::LocalAdminDown);
        }
        self.on_remote_state(pkt.state, now);
        // "If the Poll (P) bit is set, send a BFD Control packet to the remote system
        // with the Poll (P) bit clear, and the Final (F) bit set."
        if pkt.poll {
            self.final_due = Some(now);
        }
        Ok(())
    }

    /// Session-dependent validity checks (§6.8.6); the codec did the rest.
    fn check_packet(&self, pkt: &ControlPacket) -> Result<(), RxError> {
        if pkt.version != BFD_VERSION {
            return Err(RxError::BadVersion(pkt.version));
        }
        if pkt.your_discriminator != 0 && pkt.your_discriminator != self.local_discr {
            return Err(RxError::YourDiscriminatorMismatch {
                got: pkt.your_discriminator,
                expected: self.local_discr,
            });
        }
        // "If the Your Discriminator field is zero and the State field is not Down or
        // AdminDown, the packet MUST be discarded."
        if pkt.your_discriminator == 0 && matches!(pkt.state, State::Init | State::Up) {
            return Err(RxError::YourDiscriminatorZeroInUpInit(pkt.state));
        }
        // §6.5: "A BFD Control packet MUST NOT have both the Poll (P) and Final (F)
        // bits set." Such a packet is malformed; discarding it is the safe reading.
        if pkt.poll && pkt.final_ {
            return Err(RxError::PollAndFinal);
        }
        Ok(())
    }

    /// "If the A bit is set and no authentication is in use (bfd.AuthType is zero),
    /// the packet MUST be discarded. If the A bit is clear and authentication is in
    /// use, the packet MUST be discarded. If the A bit is set, the packet MUST be
    /// authenticated under the rules of section 6.7" (§6.8.6).
    fn authenticate(
        &mut self,
        pkt: &ControlPacket,
        raw: Option<&[u8]>,
        now: Instant,
    ) -> Result<(), RxError> {
        let detection_time = self.detection_time();
        match (&mut self.auth, &pkt.auth) {
            (None, None) if !pkt.auth_present => Ok(()),
            (None, _) => Err(RxError::AuthMismatch),
            (Some(_), None) => Err(RxError::AuthMissing),
            (Some(auth), Some(section)) => auth
                .verify(section, raw, pkt.detect_mult, detection_time, now)
                .map_err(RxError::Auth),
        }
    }

    fn record_remote(&mut self, pkt: &ControlPacket, now: Instant) {
        let desired_min_tx = from_us(pkt.desired_min_tx_us);
        let detect_tx = if pkt.poll {
            desired_min_tx.max(self.remote.detect_tx)
        } else {
            desired_min_tx
        };
        self.remote = Remote {
            discr: pkt.my_discriminator,
            state: pkt.state,
            diag: pkt.diag,
            min_rx: from_us(pkt.required_min_rx_us),
            desired_min_tx,
            detect_tx,
            detect_mult: pkt.detect_mult,
            demand: pkt.demand,
        };
        self.last_rx = Some(now);
    }

    /// The state machine of §6.8.6 (and the diagram of §6.2).
    fn on_remote_state(&mut self, remote: State, now: Instant) {
        let next = next_state(self.state, remote);
        if next == self.state {
            return;
        }
        let diag = match next {
            State::Down => Diag::NeighborDown,
            State::Up => Diag::None,
            State::Init | State::AdminDown => self.local_diag,
        };
        self.transition(next, diag, now);
    }

    /// Detection time expiry (§6.8.4). Transmission deadlines need no call here:
    /// [`poll_transmit`](Self::poll_transmit) handles them.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.detection_deadline() else {
            return;
        };
        if now < deadline {
            return;
        }
        // bfd.RemoteDiscr: "If a period of a Detection Time passes without the receipt
        // of a valid, authenticated BFD packet from the remote system, this variable
        // MUST be set to zero."
        self.last_rx = None;
        self.remote.discr = 0;
        self.remote.state = State::Down;
        self.remote.demand = false;
        if matches!(self.state, State::Init | State::Up) {
            self.transition(State::Down, Diag::ControlDetectionExpired, now);
        }
    }

    /// Takes the session administratively down (§6.8.16): state AdminDown, diag 7, and a
    /// packet is due at once. Packets keep flowing at the slow rate so the peer learns
    /// of it.
    pub fn set_admin_down(&mut self, now: Instant) {
        if self.state != State::AdminDown {
            self.transition(State::AdminDown, Diag::AdministrativelyDown, now);
        }
    }

    /// Leaves AdminDown for Down (diag cleared). No effect in other states.
    pub fn set_admin_up(&mut self, now: Instant) {
        if self.state == State::AdminDown {
            self.transition(State::Down, Diag::None, now);
        }
    }

    /// Changes the local timers (§6.8.3): "If either bfd.DesiredMinTxInterval is changed
    /// or bfd.RequiredMinRxInterval is changed, a Poll Sequence MUST be initiated".
    /// While Up the old, safer values stay in effect until the peer's Final; in the
    /// other states the new values apply at once (the Poll still announces them when
    /// a peer is there to answer). `detect_mult` zero is treated as 1;
    /// `desired_min_tx` zero as 1 µs. Nothing happens when nothing changed.
    pub fn set_timers(
        &mut self,
        desired_min_tx: Duration,
        required_min_rx: Duration,
        detect_mult: u8,
        now: Instant,
    ) {
        let configured = Timers {
            desired_min_tx: desired_min_tx.max(MIN_DESIRED_TX),
            required_min_rx,
        };
        let detect_mult = detect_mult.max(1);
        if configured == self.configured && detect_mult == self.detect_mult {
            return;
        }
        self.configured = configured;
        self.detect_mult = detect_mult;
        match self.state {
            State::Up => self.start_poll(now),
            State::AdminDown => self.in_effect = self.advertised(),
            State::Down | State::Init => {
                self.in_effect = self.advertised();
                self.poll_active = self.remote.discr != 0;
            }
        }
        self.pull_next_tx_forward(now);
    }

    /// Makes a periodic packet due at `now` (e.g. to repeat an AdminDown).
    pub fn transmit_now(&mut self, now: Instant) {
        self.next_tx = Some(now);
    }

    // ----- outputs -----

    /// The earliest time at which [`handle_timeout`](Self::handle_timeout) or
    /// [`poll_transmit`](Self::poll_transmit) has work: a due Final, the next periodic
    /// transmission (when transmitting is allowed) or the detection deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let tx = if self.may_transmit_periodic() {
            self.next_tx
        } else {
            None
        };
        [self.final_due, tx, self.detection_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next packet to send, if one is due at `now`: first a Final answering the
    /// peer's Poll, then a periodic packet (with Poll set while our Poll Sequence runs).
    /// Call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<ControlPacket> {
        let pkt = self.next_packet(now)?;
        if self.state == State::Up {
            if let Some(last) = self.last_tx_up {
                self.max_tx_gap = self.max_tx_gap.max(now.saturating_duration_since(last));
            }
            self.last_tx_up = Some(now);
        } else {
            self.last_tx_up = None;
        }
        Some(pkt)
    }

    /// [`poll_transmit`](Self::poll_transmit), encoded and signed.
    pub fn poll_transmit_encoded(&mut self, now: Instant) -> Option<Result<Transmit, EmitError>> {
        let pkt = self.poll_transmit(now)?;
        let mut t = Transmit {
            bytes: [0; MAX_PACKET_LEN],
            len: 0,
        };
        Some(self.encode(&pkt, &mut t.bytes).map(|len| {
            t.len = len;
            t
        }))
    }

    /// Writes a packet from [`poll_transmit`](Self::poll_transmit) into `out` and, with
    /// authentication on, signs it (§6.7). Returns the length.
    pub fn encode(&self, pkt: &ControlPacket, out: &mut [u8]) -> Result<usize, EmitError> {
        let n = pkt.emit(out)?;
        if let Some(auth) = &self.auth {
            let bytes = out.get_mut(..n).ok_or(EmitError::BufferTooSmall)?;
            if !auth.seal(bytes) {
                return Err(EmitError::BadAuth);
            }
        }
        Ok(n)
    }

    fn next_packet(&mut self, now: Instant) -> Option<ControlPacket> {
        if self.final_due.take().is_some() {
            return Some(self.build_packet(false, true));
        }
        if !self.may_transmit_periodic() {
            return None;
        }
        match self.next_tx {
            Some(due) if now >= due => {
                let gap = self.jittered_interval();
                self.next_tx = now.checked_add(gap);
                Some(self.build_packet(self.poll_active, false))
            }
            _ => None,
        }
    }

    /// The next state-change event, oldest first.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    // ----- accessors -----

    pub fn state(&self) -> State {
        self.state
    }

    pub fn remote_state(&self) -> State {
        self.remote.state
    }

    pub fn local_diag(&self) -> Diag {
        self.local_diag
    }

    /// The diagnostic of the peer's last packet.
    pub fn remote_diag(&self) -> Diag {
        self.remote.diag
    }

    /// The largest gap between two consecutive packets sent while Up (including
    /// Finals), measured with the `now` of the transmit calls: how punctual the
    /// driver loop is.
    pub fn max_tx_gap(&self) -> Duration {
        self.max_tx_gap
    }

    /// Whether the peer asked for Demand mode (D bit) in its last packet.
    pub fn remote_demand(&self) -> bool {
        self.remote.demand
    }

    /// bfd.RemoteDiscr; 0 while unknown.
    pub fn remote_discriminator(&self) -> u32 {
        self.remote.discr
    }

    pub fn local_discriminator(&self) -> u32 {
        self.local_discr
    }

    /// Detection time (§6.8.4, asynchronous mode): the remote Detect Mult times the
    /// larger of our RequiredMinRxInterval (in effect) and the remote's last Desired
    /// Min TX Interval. Zero until the peer has been heard.
    pub fn detection_time(&self) -> Duration {
        let interval = self.in_effect.required_min_rx.max(self.remote.detect_tx);
        interval.saturating_mul(u32::from(self.remote.detect_mult))
    }

    /// The negotiated transmit interval before jitter (§6.8.7): the larger of our
    /// Desired Min TX (in effect) and the remote's Required Min RX.
    pub fn tx_interval(&self) -> Duration {
        self.in_effect.desired_min_tx.max(self.remote.min_rx)
    }

    /// Desired Min TX Interval as currently advertised (≥ 1 s while not Up).
    pub fn advertised_desired_min_tx(&self) -> Duration {
        self.advertised().desired_min_tx
    }

    /// The remote's last Desired Min TX Interval (0 until heard).
    pub fn remote_desired_min_tx(&self) -> Duration {
        self.remote.desired_min_tx
    }

    /// The remote's last Required Min RX Interval (1 µs until heard).
    pub fn remote_min_rx(&self) -> Duration {
        self.remote.min_rx
    }

    /// The remote's last Detect Mult (0 until heard).
    pub fn remote_detect_mult(&self) -> u8 {
        self.remote.detect_mult
    }

    /// The configured (Desired Min TX, Required Min RX), as last set.
    pub fn configured_timers(&self) -> (Duration, Duration) {
        (
            self.configured.desired_min_tx,
            self.configured.required_min_rx,
        )
    }

    pub fn detect_mult(&self) -> u8 {
        self.detect_mult
    }

    /// Number of local state changes so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    pub fn last_change(&self) -> Option<Instant> {
        self.last_change
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// The peer's last packet said AdminDown.
    pub fn remote_admin_down(&self) -> bool {
        self.remote.state == State::AdminDown
    }

    /// Our Poll Sequence is running (packets carry P until the peer's Final).
    pub fn poll_active(&self) -> bool {
        self.poll_active
    }

    /// Whether `pkt`, which this session just took, is one it would take
    /// again with no effect but on its detection timer: both ends Up, no
    /// Poll, Final or Demand bit, no authentication (a keyed packet's
    /// sequence number moves). Such a packet repeated may be taken by the
    /// receive offload and reported with [`refresh`](Self::refresh).
    pub fn takes_repeats_of(&self, pkt: &ControlPacket) -> bool {
        self.state == State::Up
            && pkt.state == State::Up
            && self.remote.state == State::Up
            && !pkt.poll
            && !pkt.final_
            && !pkt.demand
            && !pkt.auth_present
            && self.auth.is_none()
    }

    /// A repeat of the last packet arrived at `at` (the receive offload
    /// took it): what receiving it would have done, given that the state
    /// machine stays where it is, which is the time of the last reception.
    /// Nothing unless both ends are Up and `at` is later than the last
    /// reception; says whether it moved the detection deadline.
    pub fn refresh(&mut self, at: Instant) -> bool {
        let steady = self.state == State::Up
            && self.remote.state == State::Up
            && !self.remote.demand
            && self.auth.is_none();
        if !steady || self.last_rx.is_none_or(|last| at <= last) {
            return false;
        }
        self.last_rx = Some(at);
        true
    }

    // ----- internals -----

    fn advertised(&self) -> Timers {
        let desired_min_tx = if self.state == State::Up {
            self.configured.desired_min_tx
        } else {
            self.configured.desired_min_tx.max(SLOW_TX_INTERVAL)
        };
        Timers {
            desired_min_tx,
            required_min_rx: self.configured.required_min_rx,
        }
    }

    fn transition(&mut self, to: State, diag: Diag, now: Instant) {
        let from = self.state;
        self.state = to;
        self.local_diag = diag;
        self.transitions = self.transitions.saturating_add(1);
        self.last_change = Some(now);
        if to == State::Up {
            // Leaving the slow rate changes Desired Min TX: announce it with a Poll.
            if self.advertised() != self.in_effect {
                self.start_poll(now);
            }
        } else {
            self.poll_active = false;
            self.in_effect = self.advertised();
        }
        // Tell the peer about the new state at once.
        self.next_tx = Some(now);
        self.events.push_back(SessionEvent::StateChange {
            from,
            to,
            diag,
            at: now,
        });
    }

    fn start_poll(&mut self, now: Instant) {
        self.poll_active = true;
        self.in_effect = self.in_effect.during_poll(self.advertised());
        self.next_tx = Some(now);
    }

    /// §6.8.7: "A system MUST NOT periodically transmit BFD Control packets if
    /// bfd.RemoteDiscr is zero and the system is taking the Passive role", nor "if
    /// bfd.RemoteMinRxInterval is zero", nor "if Demand mode is active on the remote
    /// system (bfd.RemoteDemandMode is 1, bfd.SessionState is Up, and
    /// bfd.RemoteSessionState is Up) and a Poll Sequence is not being transmitted".
    fn may_transmit_periodic(&self) -> bool {
        let passive_and_unheard = self.passive && self.remote.discr == 0;
        let remote_demand = self.remote.demand
            && self.state == State::Up
            && self.remote.state == State::Up
            && !self.poll_active;
        !passive_and_unheard && !self.remote.min_rx.is_zero() && !remote_demand
    }

    /// When the detection time runs out (§6.8.4), if it is armed.
    pub fn detection_deadline(&self) -> Option<Instant> {
        let last = self.last_rx?;
        let armed = matches!(self.state, State::Init | State::Up) || self.remote.discr != 0;
        if armed {
            last.checked_add(self.detection_time())
        } else {
            None
        }
    }

    /// When the transmit interval shrinks, do not wait out the old, longer one.
    fn pull_next_tx_forward(&mut self, now: Instant) {
        let Some(latest) = now.checked_add(self.tx_interval()) else {
            return;
        };
        if self.next_tx.is_none_or(|due| due > latest) {
            let gap = self.jittered_interval();
            self.next_tx = now.checked_add(gap);
        }
    }

    /// §6.8.7: the interval reduced by a random 0–25 % (10–25 % when Detect Mult is 1).
    fn jittered_interval(&mut self) -> Duration {
        let full = u64::try_from(self.tx_interval().as_nanos()).unwrap_or(u64::MAX);
        let lo = scale(full, 75);
        let hi = if self.detect_mult == 1 {
            scale(full, 90)
        } else {
            full
        };
        Duration::from_nanos(self.rng.in_range(lo, hi))
    }

    fn build_packet(&mut self, poll: bool, final_: bool) -> ControlPacket {
        let adv = self.advertised();
        let auth = self.auth.as_mut().map(Auth::next_section);
        ControlPacket {
            version: BFD_VERSION,
            diag: self.local_diag,
            state: self.state,
            poll,
            final_,
            control_plane_independent: false,
            auth_present: auth.is_some(),
            demand: false,
            multipoint: false,
            detect_mult: self.detect_mult,
            my_discriminator: self.local_discr,
            your_discriminator: self.remote.discr,
            desired_min_tx_us: to_us(adv.desired_min_tx),
            required_min_rx_us: to_us(adv.required_min_rx),
            required_min_echo_rx_us: 0,
            auth,
        }
    }
}

/// `value * percent / 100` without overflow.
fn scale(value: u64, percent: u64) -> u64 {
    u64::try_from(u128::from(value) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

/// The reception state machine of RFC 5880 §6.8.6 for a session that is not AdminDown
/// (an AdminDown session discards packets before reaching it):
///
/// ```text
/// If received state is AdminDown
///     If bfd.SessionState is not Down: Set bfd.LocalDiag to 3, bfd.SessionState to Down
/// Else
///     If bfd.SessionState is Down
///         If received State is Down: Set bfd.SessionState to Init
///         Else if received State is Init: Set bfd.SessionState to Up
///     Else if bfd.SessionState is Init
///         If received State is Init or Up: Set bfd.SessionState to Up
///     Else (bfd.SessionState is Up)
///         If received State is Down: Set bfd.LocalDiag to 3, bfd.SessionState to Down
/// ```
///
/// Note that Down does *not* go Up on a received Up (§6.2 diagram: DOWN loops on "UP"):
/// a peer still Up from an earlier incarnation of the session must first go Down.
pub fn next_state(local: State, received: State) -> State {
    use State::*;
    match (local, received) {
        (AdminDown, _) => AdminDown,
        (Down, AdminDown) => Down,
        (_, AdminDown) => Down,
        (Down, Down) => Init,
        (Down, Init) => Up,
        (Down, Up) => Down,
        (Init, Down) => Init,
        (Init, Init | Up) => Up,
        (Up, Down) => Down,
        (Up, Init | Up) => Up,
    }
}

#[cfg(test)]
mod tests;
