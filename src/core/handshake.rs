//! The key-pair handshake of a peer with a `public_key`, sans-IO.
//!
//! Two gateways that know each other's X25519 public key agree on fresh
//! session keys with the Noise framework's IK pattern (IKpsk2 when the
//! peer also has a `key_file`: the pre-shared key is mixed in as in
//! WireGuard), run by the `snow` crate:
//!
//! ```text
//!  Noise_IK_25519_ChaChaPoly_BLAKE2s      (no key_file)
//!  Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s  (key_file mixed in)
//!  prologue "crosslink handshake v1"
//! ```
//!
//! Either side may initiate. Three messages, each an overlay datagram of
//! type [`MsgType::Handshake`] on any path of the peer (the header's
//! `sequence` says which message, its `epoch` which session it belongs to):
//!
//! ```text
//!  initiation  (1)  noise message 1 (payload: initiator's epoch)  | mac (32)
//!  response    (2)  noise message 2 (payload: responder's epoch)  | mac (32)
//!                   header epoch: the initiator's epoch
//!  confirm     (3)  tag (32): HMAC of the header under the new session
//!                   header epoch: the responder's epoch
//! ```
//!
//! **Epochs, not clocks.** Each side numbers the sessions it receives with
//! a counter of its own run (1, 2, ...), and tells the other side in the
//! handshake: the far side seals with the session's key under that epoch,
//! and this side finds the key and the replay window by it
//! ([`crate::core::crypto::Keys::sessions`]). Session keys come from the
//! two ephemeral keys of the handshake, so they are new on every run and
//! never depend on the wall clock; sequence numbers may start again under
//! them.
//!
//! **Replay.** WireGuard stamps its initiation with the wall-clock time
//! (TAI64N) and a responder refuses one not newer than the last: that ties
//! replay protection to a clock that can step back across a restart.
//! Here freshness comes from the responder instead: a response carries
//! the responder's new ephemeral key, and the responder sends with a
//! session only once the initiator has proved (the confirm, a MAC under
//! the session's keys) that it holds the initiator's ephemeral secret, which
//! a replayed initiation lacks. A replayed initiation therefore costs its
//! Diffie-Hellman work and yields a session that is never used (dropped
//! after [`CONFIRM_WAIT`]); initiations whose ephemeral key was already
//! seen in this run are refused before that work. A replayed response
//! does not match the initiator's ephemeral key and fails to decrypt; a
//! replayed confirm finds its session confirmed already.
//!
//! A session waiting for its confirm is already accepted on receive (the
//! initiator seals under it as soon as it has the response); the initiator
//! sends the confirm three times, a second apart. When both sides initiate
//! at once, the side with the greater public key keeps its initiation and
//! the other gives its own up and answers, so one handshake results.
//!
//! **Binding.** The responder's static key is the configured
//! `public_key` (IK: the initiator encrypts to it), and the initiator's
//! static key, which the responder learns from message 1, must be the
//! configured `public_key` too: a stranger with the right addresses gets
//! nowhere. The optional pre-shared key is mixed in after the second
//! message's DH (psk2). The prologue binds the protocol version.
//!
//! **Rekey.** The initiator of the current session starts a new handshake
//! when the session is [`REKEY_AFTER`] old (the responder, so that one side
//! does it, [`REKEY_AFTER`] / 12 later) or has sealed [`REKEY_AFTER_MESSAGES`]
//! messages: far below AES-GCM's limits (every message key is further
//! bound to one path direction and message kind, and its nonce is the
//! sequence number). The previous session stays accepted on receive until
//! a newer session replaces it or it is [`REJECT_AFTER`] old, so messages
//! in flight across the change are not lost; a session older than
//! [`REJECT_AFTER`] seals nothing.
//!
//! **Retries.** An initiation that gets no answer is retried with a new
//! ephemeral key after [`RETRY_FIRST`], doubling up to [`RETRY_MAX`], as
//! long as the peer needs keys.
//!
//! **Floods.** A message passes two checks before any public-key work: its
//! MAC (keyed by a hash of the receiver's public key, as WireGuard's
//! `mac1`: one HMAC, so junk from anyone who does not know the public key
//! is dropped at once), and a token bucket ([`BUCKET_RATE`] per second,
//! [`BUCKET_BURST`] deep) per peer. The shell accepts handshake messages
//! only from a path's configured remote address, and each path's receiver
//! passes at most `HANDSHAKE_RATE` (50) a second on to the
//! control plane.
//!
//! The ephemeral keys are drawn by `snow` from the system's random source
//! (the one place the core draws randomness it is not handed).

use crate::core::crypto::SessionKeys;
use crate::core::keypair::{PrivateKey, PublicKey};
use crate::core::wire::overlay::{Header, MsgType, BASE_LEN};
use ring::{digest, hmac};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use zeroize::Zeroize;

/// Age of a session at which its initiator starts a new handshake.
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// Age after which a session neither seals nor opens anything (1.5 times
/// [`REKEY_AFTER`]; the responder rekeys 1/12 of [`REKEY_AFTER`] after the
/// initiator, if the initiator did not).
pub const REJECT_AFTER: Duration = Duration::from_secs(180);
/// Messages sealed under one session before a rekey starts. The shell
/// reports what it sent to the peer ([`Handshake::note_sent_total`]: the
/// daemon adds up the peer's paths' datagram counters twice a second).
/// Rekeying on time comes first below about 35 million datagrams a second.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 32;
/// First wait for a response before an initiation is sent again.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between initiations.
pub const RETRY_MAX: Duration = Duration::from_secs(16);
/// An initiation of ours this old when the far side's arrives (and ours is
/// the one kept) is sent again at once: the far side may have started
/// after it. Younger, the two crossed on the way, and the far side answers
/// ours.
pub const RESEND_ON_CROSS: Duration = Duration::from_millis(200);
/// How long a responder keeps a session waiting for its confirm.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(10);
/// Confirms the initiator sends (the first at once, then one per second).
const CONFIRMS: u8 = 3;
/// Handshake messages accepted per second per peer, sustained.
pub const BUCKET_RATE: u32 = 20;
/// ... and in a burst.
pub const BUCKET_BURST: u32 = 20;
/// Sessions awaiting their confirm at once (the oldest goes first).
const MAX_UNCONFIRMED: usize = 4;
/// Initiation ephemeral keys remembered to refuse replays.
const SEEN_EPHEMERALS: usize = 256;

const PROLOGUE: &[u8] = b"crosslink handshake v1";
const PATTERN_IK: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PATTERN_IKPSK2: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const MAC_LEN: usize = 32;
const MAC_LABEL: &[u8] = b"crosslink handshake mac v1";
const CONFIRM_LABEL: &[u8] = b"crosslink handshake confirm v1";
/// Noise message 1 of IK with a 4-byte payload: e, s (+tag), payload (+tag).
const INIT_NOISE_LEN: usize = 32 + 32 + 16 + 4 + 16;
/// Noise message 2: e, payload (+tag).
const RESPONSE_NOISE_LEN: usize = 32 + 4 + 16;
/// Length of each message on the wire.
pub const INIT_LEN: usize = BASE_LEN + INIT_NOISE_LEN + MAC_LEN;
pub const RESPONSE_LEN: usize = BASE_LEN + RESPONSE_NOISE_LEN + MAC_LEN;
pub const CONFIRM_LEN: usize = BASE_LEN + MAC_LEN;

const KIND_INIT: u64 = 1;
const KIND_RESPONSE: u64 = 2;
const KIND_CONFIRM: u64 = 3;

/// Why a handshake message was dropped or a handshake failed: the
/// metric's `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// Not a handshake message of the expected length and kind.
    Malformed,
    /// Its MAC does not match (junk, or sent to another public key).
    BadMac,
    /// Over the token bucket's rate.
    RateLimited,
    /// The Noise message did not decrypt (wrong keys, pre-shared key
    /// mismatch, altered).
    Decrypt,
    /// The initiator's static key is not the peer's `public_key`.
    UnknownKey,
    /// An initiation seen before, a response to no initiation in flight, a
    /// confirm for no waiting session.
    Replayed,
    /// No response to an initiation in time (it is retried).
    Timeout,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::BadMac => "bad_mac",
            Failure::RateLimited => "rate_limited",
            Failure::Decrypt => "decrypt",
            Failure::UnknownKey => "unknown_key",
            Failure::Replayed => "replayed",
            Failure::Timeout => "timeout",
        }
    }

    pub const ALL: [Failure; 7] = [
        Failure::Malformed,
        Failure::BadMac,
        Failure::RateLimited,
        Failure::Decrypt,
        Failure::UnknownKey,
        Failure::Replayed,
        Failure::Timeout,
    ];
}

/// What the status shows of a peer's handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No session and no initiation in flight.
    Idle,
    /// An initiation is in flight (attempt number) and no session is usable.
    Initiating(u32),
    /// A session seals.
    Established,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Initiating(_) => "initiating",
            State::Established => "established",
        }
    }
}

/// Counters for the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Handshakes completed (as initiator or responder).
    pub completed: u64,
    /// Failures by reason, in the order of [`Failure::ALL`].
    pub failures: [u64; 7],
}

impl Stats {
    pub fn failures(&self, f: Failure) -> u64 {
        Failure::ALL
            .iter()
            .position(|x| *x == f)
            .map_or(0, |i| self.failures[i])
    }
}

/// One session's keys and bookkeeping.
struct Session {
    keys: SessionKeys,
    established: Instant,
    /// This side initiated it (and so rekeys it first).
    initiator: bool,
    /// Messages this side sealed under it (reported by the shell).
    sealed: u64,
}

/// An initiation in flight.
struct Initiation {
    noise: snow::HandshakeState,
    epoch: u32,
    attempt: u32,
    /// When it was last sent, and what.
    sent_at: Instant,
    datagram: Vec<u8>,
    /// When it is sent again (with a new ephemeral key) if unanswered.
    retry_at: Instant,
}

/// A responder's session waiting for its confirm.
struct Unconfirmed {
    session: Session,
    confirm_key: hmac::Key,
    until: Instant,
}

/// The initiator's confirms still to send.
struct Confirming {
    datagram: Vec<u8>,
    left: u8,
    next: Instant,
}

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: None,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = self
            .at
            .map_or(Duration::MAX, |at| now.saturating_duration_since(at));
        let refill = elapsed.as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        if self.at.is_none_or(|at| now > at) {
            self.at = Some(now);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Configuration of one peer's handshake.
pub struct Setup {
    pub local: PrivateKey,
    pub remote: PublicKey,
    /// The peer's `key_file`, mixed in (IKpsk2).
    pub psk: Option<[u8; 32]>,
    /// [`REKEY_AFTER`], unless a test wants it shorter (the previous and
    /// current sessions then expire after 1.5 times this, and the responder
    /// rekeys 1/12 of it after the initiator).
    pub rekey_after: Duration,
}

/// One peer's handshake state machine. Feed it received handshake
/// datagrams ([`Handshake::handle`]) and the time
/// ([`Handshake::handle_timeout`]); drain datagrams to send
/// ([`Handshake::poll_transmit`], on any up path of the peer) and new keys
/// for the data plane ([`Handshake::poll_keys`]).
pub struct Handshake {
    local: PrivateKey,
    remote: PublicKey,
    psk: Option<[u8; 32]>,
    /// MAC key for messages this side receives (hash of its own public key)
    /// and for those it sends (of the far side's).
    mac_in: hmac::Key,
    mac_out: hmac::Key,
    next_epoch: u32,
    initiation: Option<Initiation>,
    /// The epoch of an initiation given up when both sides initiated.
    yielded: Option<u32>,
    unconfirmed: VecDeque<Unconfirmed>,
    confirming: Option<Confirming>,
    current: Option<Session>,
    previous: Option<Session>,
    seen: VecDeque<[u8; 32]>,
    bucket: TokenBucket,
    transmit: VecDeque<Vec<u8>>,
    keys_changed: bool,
    /// Whether the peer wants keys (a peer starts one at once).
    active: bool,
    rekey_after: Duration,
    rekey_after_messages: u64,
    reject_after: Duration,
    created: Instant,
    stats: Stats,
    /// The shell's running count of datagrams sent to the peer when it was
    /// last reported ([`Handshake::note_sent_total`]).
    sent_total: Option<u64>,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Some(p) = self.psk.as_mut() {
            p.zeroize();
        }
    }
}

fn mac_key(public: &PublicKey) -> hmac::Key {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(MAC_LABEL);
    ctx.update(public.as_bytes());
    hmac::Key::new(hmac::HMAC_SHA256, ctx.finish().as_ref())
}

fn mac(key: &hmac::Key, data: &[u8]) -> [u8; MAC_LEN] {
    let tag = hmac::sign(key, data);
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The confirm's key, from the initiator-to-responder transport key.
fn confirm_key(i_to_r: &[u8; 32]) -> hmac::Key {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(CONFIRM_LABEL);
    ctx.update(i_to_r);
    hmac::Key::new(hmac::HMAC_SHA256, ctx.finish().as_ref())
}

fn header(kind: u64, epoch: u32) -> [u8; BASE_LEN] {
    let mut out = [0u8; BASE_LEN];
    let h = Header {
        epoch,
        ..Header::echo(MsgType::Handshake, kind)
    };
    // A fixed header always fits its own length.
    let _ = h.emit(&mut out);
    out
}

/// Sets the MAC of an initiation or response `datagram` as a sender to
/// the gateway with public key `to` would (for the fuzz harness, which
/// mutates messages and would otherwise never get past the MAC).
pub fn set_mac(datagram: &mut [u8], to: &PublicKey) {
    if let Some(split) = datagram.len().checked_sub(MAC_LEN) {
        let tag = mac(&mac_key(to), &datagram[..split]);
        datagram[split..].copy_from_slice(&tag);
    }
}

impl Handshake {
    /// A peer's handshake; it initiates at the first
    /// [`Handshake::handle_timeout`].
    pub fn new(setup: Setup, now: Instant) -> Handshake {
        let mac_in = mac_key(&setup.local.public());
        let mac_out = mac_key(&setup.remote);
        Handshake {
            local: setup.local,
            remote: setup.remote,
            psk: setup.psk,
            mac_in,
            mac_out,
            next_epoch: 1,
            initiation: None,
            yielded: None,
            unconfirmed: VecDeque::new(),
            confirming: None,
            current: None,
            previous: None,
            seen: VecDeque::new(),
            bucket: TokenBucket::new(BUCKET_RATE, BUCKET_BURST),
            transmit: VecDeque::new(),
            keys_changed: false,
            active: true,
            rekey_after: setup.rekey_after,
            rekey_after_messages: REKEY_AFTER_MESSAGES,
            reject_after: setup.rekey_after.saturating_mul(3) / 2,
            created: now,
            stats: Stats::default(),
            sent_total: None,
        }
    }

    fn builder(&self) -> Option<snow::Builder<'_>> {
        let pattern = if self.psk.is_some() {
            PATTERN_IKPSK2
        } else {
            PATTERN_IK
        };
        let params = pattern.parse().ok()?;
        let mut b = snow::Builder::new(params)
            .prologue(PROLOGUE)
            .ok()?
            .local_private_key(self.local.as_bytes())
            .ok()?;
        if let Some(psk) = &self.psk {
            b = b.psk(2, psk).ok()?;
        }
        Some(b)
    }

    fn take_epoch(&mut self) -> u32 {
        let e = self.next_epoch;
        self.next_epoch = self.next_epoch.wrapping_add(1).max(1);
        e
    }

    /// Sends a new initiation (a new ephemeral key and epoch).
    fn initiate(&mut self, now: Instant) {
        let attempt = self
            .initiation
            .as_ref()
            .map_or(1, |i| i.attempt.saturating_add(1));
        let epoch = self.take_epoch();
        let Some(mut noise) = self
            .builder()
            .and_then(|b| b.remote_public_key(self.remote.as_bytes()).ok())
            .and_then(|b| b.build_initiator().ok())
        else {
            return;
        };
        let mut out = vec![0u8; INIT_LEN];
        out[..BASE_LEN].copy_from_slice(&header(KIND_INIT, 0));
        let Ok(n) = noise.write_message(&epoch.to_be_bytes(), &mut out[BASE_LEN..]) else {
            return;
        };
        if n != INIT_NOISE_LEN {
            return;
        }
        let tag = mac(&self.mac_out, &out[..BASE_LEN + n]);
        out[BASE_LEN + n..].copy_from_slice(&tag);
        let wait = RETRY_FIRST
            .saturating_mul(1 << (attempt - 1).min(8))
            .min(RETRY_MAX);
        self.initiation = Some(Initiation {
            noise,
            epoch,
            attempt,
            sent_at: now,
            datagram: out.clone(),
            retry_at: now + wait,
        });
        self.transmit.push_back(out);
    }

    /// A handshake datagram received on one of the peer's paths (the shell
    /// checked its source is the path's remote). Bad input is dropped and
    /// counted.
    pub fn handle(&mut self, datagram: &[u8], now: Instant) {
        if let Err(f) = self.handle_inner(datagram, now) {
            self.fail(f);
        }
    }

    fn fail(&mut self, f: Failure) {
        if let Some(i) = Failure::ALL.iter().position(|x| *x == f) {
            self.stats.failures[i] += 1;
        }
    }

    fn handle_inner(&mut self, datagram: &[u8], now: Instant) -> Result<(), Failure> {
        let (h, hlen) = Header::parse(datagram).map_err(|_| Failure::Malformed)?;
        if h.msg_type != MsgType::Handshake || hlen != BASE_LEN {
            return Err(Failure::Malformed);
        }
        match (h.sequence, datagram.len()) {
            (KIND_INIT, INIT_LEN) => self.on_init(datagram, now),
            (KIND_RESPONSE, RESPONSE_LEN) => self.on_response(datagram, h.epoch, now),
            (KIND_CONFIRM, CONFIRM_LEN) => self.on_confirm(datagram, h.epoch),
            _ => Err(Failure::Malformed),
        }
    }

    /// Checks the MAC at the end of `datagram` and the token bucket.
    fn admit(&mut self, datagram: &[u8], now: Instant) -> Result<(), Failure> {
        let (body, tag) = datagram.split_at(datagram.len() - MAC_LEN);
        if hmac::verify(&self.mac_in, body, tag).is_err() {
            return Err(Failure::BadMac);
        }
        if !self.bucket.take(now) {
            return Err(Failure::RateLimited);
        }
        Ok(())
    }

    fn on_init(&mut self, datagram: &[u8], now: Instant) -> Result<(), Failure> {
        self.admit(datagram, now)?;
        let noise_msg = &datagram[BASE_LEN..BASE_LEN + INIT_NOISE_LEN];
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(&noise_msg[..32]);
        if self.seen.contains(&ephemeral) {
            return Err(Failure::Replayed);
        }
        let mut noise = self
            .builder()
            .and_then(|b| b.build_responder().ok())
            .ok_or(Failure::Decrypt)?;
        let mut payload = [0u8; 64];
        let n = noise
            .read_message(noise_msg, &mut payload)
            .map_err(|_| Failure::Decrypt)?;
        if noise.get_remote_static() != Some(self.remote.as_bytes().as_slice()) {
            return Err(Failure::UnknownKey);
        }
        let peer_epoch = match payload.get(..n).and_then(|p| <[u8; 4]>::try_from(p).ok()) {
            Some(b) => u32::from_be_bytes(b),
            None => return Err(Failure::Malformed),
        };
        if self.seen.len() >= SEEN_EPHEMERALS {
            self.seen.pop_front();
        }
        self.seen.push_back(ephemeral);
        if self.initiation.is_some() {
            // Both sides initiated at once: one handshake is enough, and
            // two would make each side send under another session. The side
            // with the greater public key keeps its own (the other answers
            // it); the other drops its own and answers this one.
            if self.local.public().as_bytes() > self.remote.as_bytes() {
                // Ours, sent a while ago, may never have reached the far
                // side (started after it): sent again now, not at its
                // retry, which backs off to RETRY_MAX. The same datagram:
                // if it did arrive (a slow path), the far side refuses the
                // copy as seen, and the answer on its way still matches.
                if let Some(i) = self.initiation.as_mut() {
                    if now.saturating_duration_since(i.sent_at) >= RESEND_ON_CROSS {
                        i.sent_at = now;
                        self.transmit.push_back(i.datagram.clone());
                    }
                }
                return Ok(());
            }
            self.yielded = self.initiation.take().map(|i| i.epoch);
        }
        let epoch = self.take_epoch();
        let mut out = vec![0u8; RESPONSE_LEN];
        out[..BASE_LEN].copy_from_slice(&header(KIND_RESPONSE, peer_epoch));
        let n = noise
            .write_message(&epoch.to_be_bytes(), &mut out[BASE_LEN..])
            .map_err(|_| Failure::Decrypt)?;
        if n != RESPONSE_NOISE_LEN {
            return Err(Failure::Malformed);
        }
        let tag = mac(&self.mac_out, &out[..BASE_LEN + n]);
        out[BASE_LEN + n..].copy_from_slice(&tag);
        // Split: (initiator to responder, responder to initiator).
        let (mut i_to_r, mut r_to_i) = noise.dangerously_get_raw_split();
        let session = Session {
            keys: SessionKeys {
                recv_epoch: epoch,
                recv: i_to_r,
                send_epoch: peer_epoch,
                send: r_to_i,
            },
            established: now,
            initiator: false,
            sealed: 0,
        };
        let confirm_key = confirm_key(&i_to_r);
        i_to_r.zeroize();
        r_to_i.zeroize();
        if self.unconfirmed.len() >= MAX_UNCONFIRMED {
            self.unconfirmed.pop_front();
        }
        self.unconfirmed.push_back(Unconfirmed {
            session,
            confirm_key,
            until: now + CONFIRM_WAIT,
        });
        // The initiator may seal under it as soon as it has the response.
        self.keys_changed = true;
        self.transmit.push_back(out);
        Ok(())
    }

    fn on_response(&mut self, datagram: &[u8], epoch: u32, now: Instant) -> Result<(), Failure> {
        if self.yielded == Some(epoch) {
            // The answer to an initiation given up for the far side's.
            return Ok(());
        }
        if self.initiation.as_ref().is_none_or(|i| i.epoch != epoch) {
            return Err(Failure::Replayed);
        }
        self.admit(datagram, now)?;
        let Some(mut init) = self.initiation.take() else {
            return Err(Failure::Replayed);
        };
        let mut payload = [0u8; 64];
        let read = init.noise.read_message(
            &datagram[BASE_LEN..BASE_LEN + RESPONSE_NOISE_LEN],
            &mut payload,
        );
        let n = match read {
            Ok(n) => n,
            Err(_) => {
                // A forged or replayed response: keep waiting for the real one
                // (snow's state is spent; retry starts a new one on time).
                self.initiation = Some(init);
                if let Some(i) = self.initiation.as_mut() {
                    // Rebuild at the next retry.
                    i.retry_at = i.retry_at.min(now + RETRY_FIRST);
                }
                return Err(Failure::Decrypt);
            }
        };
        let peer_epoch = match payload.get(..n).and_then(|p| <[u8; 4]>::try_from(p).ok()) {
            Some(b) => u32::from_be_bytes(b),
            None => return Err(Failure::Malformed),
        };
        let (mut i_to_r, mut r_to_i) = init.noise.dangerously_get_raw_split();
        let ck = confirm_key(&i_to_r);
        let session = Session {
            keys: SessionKeys {
                recv_epoch: init.epoch,
                recv: r_to_i,
                send_epoch: peer_epoch,
                send: i_to_r,
            },
            established: now,
            initiator: true,
            sealed: 0,
        };
        i_to_r.zeroize();
        r_to_i.zeroize();
        let mut confirm = vec![0u8; CONFIRM_LEN];
        confirm[..BASE_LEN].copy_from_slice(&header(KIND_CONFIRM, peer_epoch));
        let tag = mac(&ck, &confirm[..BASE_LEN]);
        confirm[BASE_LEN..].copy_from_slice(&tag);
        self.transmit.push_back(confirm.clone());
        self.confirming = Some(Confirming {
            datagram: confirm,
            left: CONFIRMS - 1,
            next: now + Duration::from_secs(1),
        });
        self.install(session);
        Ok(())
    }

    /// The data plane opened a message sealed under `epoch`, a session
    /// that awaits its confirm ([`crate::core::crypto::Keys::first_use`]):
    /// only the far side, holding the session's keys, could have sealed it,
    /// so it confirms the session as the confirm message would (as
    /// WireGuard's responder takes its first data message). The confirms
    /// may all have been lost; without this the responder would give the
    /// session up after [`CONFIRM_WAIT`] while the initiator seals with it.
    pub fn confirm_by_use(&mut self, epoch: u32) {
        if let Some(i) = self
            .unconfirmed
            .iter()
            .position(|u| u.session.keys.recv_epoch == epoch)
        {
            if let Some(u) = self.unconfirmed.remove(i) {
                self.install(u.session);
            }
        }
    }

    fn on_confirm(&mut self, datagram: &[u8], epoch: u32) -> Result<(), Failure> {
        let Some(i) = self
            .unconfirmed
            .iter()
            .position(|u| u.session.keys.recv_epoch == epoch)
        else {
            let known = self
                .current
                .iter()
                .chain(self.previous.iter())
                .any(|s| s.keys.recv_epoch == epoch && !s.initiator);
            // The initiator's repeats of a confirm already taken.
            return if known {
                Ok(())
            } else {
                Err(Failure::Replayed)
            };
        };
        let (body, tag) = datagram.split_at(BASE_LEN);
        let ok = self
            .unconfirmed
            .get(i)
            .is_some_and(|u| hmac::verify(&u.confirm_key, body, tag).is_ok());
        if !ok {
            return Err(Failure::Decrypt);
        }
        if let Some(u) = self.unconfirmed.remove(i) {
            self.install(u.session);
        }
        Ok(())
    }

    /// Makes `session` the current one (if it is newer), the current one
    /// the previous.
    fn install(&mut self, session: Session) {
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.established > session.established)
        {
            // An older session confirmed late: receive only.
            self.previous = Some(session);
        } else {
            self.previous = self.current.replace(session);
        }
        self.stats.completed += 1;
        self.keys_changed = true;
    }

    /// Counts messages sealed under the current session (for the rekey by
    /// message count).
    pub fn note_sealed(&mut self, messages: u64) {
        if let Some(c) = self.current.as_mut() {
            c.sealed = c.sealed.saturating_add(messages);
        }
    }

    /// Rekeys after `n` messages instead of [`REKEY_AFTER_MESSAGES`] (at
    /// least 1; for the tests that watch the rule work).
    pub fn set_rekey_after_messages(&mut self, n: u64) {
        self.rekey_after_messages = n.max(1);
    }

    /// Takes the shell's running count of datagrams sent to the peer (every
    /// one of them sealed) and counts what it sent since the last report
    /// as sealed under the current session. A count that went back (a path
    /// replaced, its counters new) only sets the new base. Messages sealed
    /// under the previous session just before a change are counted on the
    /// new one: the count errs on the side of an earlier rekey.
    pub fn note_sent_total(&mut self, total: u64) {
        let since = self.sent_total.map_or(0, |last| total.saturating_sub(last));
        self.sent_total = Some(total);
        self.note_sealed(since);
    }

    /// Advances timers: retries, rekeys, expiries.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Expiries.
        if self
            .previous
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.established) >= self.reject_after)
        {
            self.previous = None;
            self.keys_changed = true;
        }
        if self
            .current
            .as_ref()
            .is_some_and(|c| now.saturating_duration_since(c.established) >= self.reject_after)
        {
            self.current = None;
            self.keys_changed = true;
        }
        let before = self.unconfirmed.len();
        self.unconfirmed.retain(|u| u.until > now);
        if self.unconfirmed.len() != before {
            self.keys_changed = true;
        }
        if let Some(c) = self.confirming.as_mut() {
            if c.left > 0 && now >= c.next {
                c.left -= 1;
                c.next = now + Duration::from_secs(1);
                self.transmit.push_back(c.datagram.clone());
            }
            if c.left == 0 {
                self.confirming = None;
            }
        }
        if !self.active {
            return;
        }
        match &self.initiation {
            Some(i) if now >= i.retry_at => {
                self.fail(Failure::Timeout);
                self.initiate(now);
            }
            Some(_) => {}
            None if self.needs_rekey(now) => self.initiate(now),
            None => {}
        }
    }

    fn needs_rekey(&self, now: Instant) -> bool {
        let Some(c) = &self.current else {
            return true;
        };
        let age = now.saturating_duration_since(c.established);
        let due = if c.initiator {
            self.rekey_after
        } else {
            self.rekey_after + self.rekey_after / 12
        };
        age >= due || c.sealed >= self.rekey_after_messages
    }

    /// The next time [`Handshake::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(p) = &self.previous {
            at(p.established + self.reject_after);
        }
        if let Some(c) = &self.current {
            at(c.established + self.reject_after);
            if self.active && self.initiation.is_none() && c.sealed >= self.rekey_after_messages {
                at(c.established);
            }
            if self.active && self.initiation.is_none() {
                let due = if c.initiator {
                    self.rekey_after
                } else {
                    self.rekey_after + self.rekey_after / 12
                };
                at(c.established + due);
            }
        }
        if let Some(u) = self.unconfirmed.front() {
            at(u.until);
        }
        if let Some(c) = &self.confirming {
            at(c.next);
        }
        if let Some(i) = &self.initiation {
            at(i.retry_at);
        } else if self.active && self.current.is_none() {
            // Start at once (or as soon as building a handshake works).
            at(self.created);
        }
        t
    }

    /// Whether a datagram waits for [`Handshake::poll_transmit`].
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// A datagram to send on any up path of the peer.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// New keys for the data plane, when they changed.
    pub fn poll_keys(&mut self) -> Option<crate::core::crypto::Keys> {
        if !std::mem::take(&mut self.keys_changed) {
            return None;
        }
        Some(self.keys())
    }

    /// The data plane's keys now: seal with the current session, open
    /// with it, the previous one and those awaiting confirmation.
    pub fn keys(&self) -> crate::core::crypto::Keys {
        let send = self.current.as_ref().map(|c| &c.keys);
        let recv: Vec<&SessionKeys> = self
            .current
            .iter()
            .chain(self.previous.iter())
            .map(|s| &s.keys)
            .chain(self.unconfirmed.iter().map(|u| &u.session.keys))
            .collect();
        let awaiting: Vec<u32> = self
            .unconfirmed
            .iter()
            .map(|u| u.session.keys.recv_epoch)
            .collect();
        crate::core::crypto::Keys::sessions_awaiting(send, &recv, &awaiting)
    }

    pub fn state(&self) -> State {
        match (&self.current, &self.initiation) {
            (Some(_), _) => State::Established,
            (None, Some(i)) => State::Initiating(i.attempt),
            (None, None) => State::Idle,
        }
    }

    /// Age of the current session's keys.
    pub fn key_age(&self, now: Instant) -> Option<Duration> {
        self.current
            .as_ref()
            .map(|c| now.saturating_duration_since(c.established))
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The far side's public key.
    pub fn remote(&self) -> &PublicKey {
        &self.remote
    }

    /// What a new process needs to carry on with this handshake's
    /// sessions across an upgrade (`crosslink upgrade`): the sessions
    /// (current, previous, awaiting confirmation) with their keys and
    /// ages, the confirms still to send, the next epoch, the ephemeral
    /// keys seen and the counters. An initiation in flight is not carried
    /// (its Noise state cannot be); the new process starts another when
    /// one is due.
    pub fn export(&self, now: Instant) -> HandshakeExport {
        let session = |s: &Session| SessionExport {
            recv_epoch: s.keys.recv_epoch,
            recv: s.keys.recv,
            send_epoch: s.keys.send_epoch,
            send: s.keys.send,
            age_ns: nanos(now.saturating_duration_since(s.established)),
            initiator: s.initiator,
            sealed: s.sealed,
        };
        HandshakeExport {
            local: *self.local.public().as_bytes(),
            remote: *self.remote.as_bytes(),
            next_epoch: self.next_epoch,
            current: self.current.as_ref().map(session),
            previous: self.previous.as_ref().map(session),
            unconfirmed: self
                .unconfirmed
                .iter()
                .map(|u| UnconfirmedExport {
                    session: session(&u.session),
                    left_ns: nanos(u.until.saturating_duration_since(now)),
                })
                .collect(),
            confirming: self.confirming.as_ref().map(|c| ConfirmingExport {
                datagram: c.datagram.clone(),
                left: c.left,
                next_ns: nanos(c.next.saturating_duration_since(now)),
            }),
            seen: self.seen.iter().copied().collect(),
            completed: self.stats.completed,
            failures: self.stats.failures,
        }
    }

    /// Takes over what [`Handshake::export`] gave in the old process, if
    /// both public keys are still the configured ones (false, and nothing
    /// taken, if not: the handshake starts afresh). The data plane's keys
    /// are ready at once ([`Handshake::poll_keys`]).
    pub fn import(&mut self, e: &HandshakeExport, now: Instant) -> bool {
        if e.local != *self.local.public().as_bytes() || e.remote != *self.remote.as_bytes() {
            return false;
        }
        let session = |s: &SessionExport| Session {
            keys: SessionKeys {
                recv_epoch: s.recv_epoch,
                recv: s.recv,
                send_epoch: s.send_epoch,
                send: s.send,
            },
            established: now
                .checked_sub(Duration::from_nanos(s.age_ns))
                .unwrap_or(now),
            initiator: s.initiator,
            sealed: s.sealed,
        };
        // Never name a new session with an epoch the old process used.
        let used = e
            .current
            .iter()
            .chain(e.previous.iter())
            .chain(e.unconfirmed.iter().map(|u| &u.session))
            .map(|s| s.recv_epoch)
            .max()
            .unwrap_or(0);
        self.next_epoch = self
            .next_epoch
            .max(e.next_epoch)
            .max(used.saturating_add(1));
        self.initiation = None;
        self.current = e.current.as_ref().map(session);
        self.previous = e.previous.as_ref().map(session);
        self.unconfirmed = e
            .unconfirmed
            .iter()
            .take(MAX_UNCONFIRMED)
            .map(|u| Unconfirmed {
                session: session(&u.session),
                confirm_key: confirm_key(&u.session.recv),
                until: now + Duration::from_nanos(u.left_ns),
            })
            .collect();
        self.confirming = e.confirming.as_ref().map(|c| Confirming {
            datagram: c.datagram.clone(),
            left: c.left.min(CONFIRMS),
            next: now + Duration::from_nanos(c.next_ns),
        });
        self.seen = e
            .seen
            .iter()
            .rev()
            .take(SEEN_EPHEMERALS)
            .rev()
            .copied()
            .collect();
        self.stats.completed = e.completed;
        self.stats.failures = e.failures;
        self.keys_changed = true;
        true
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A handshake's state handed to a new process ([`Handshake::export`]).
/// It holds session keys: it only ever crosses the socket pair between
/// the old process and the new one.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandshakeExport {
    /// This side's and the far side's public keys.
    pub local: [u8; 32],
    pub remote: [u8; 32],
    pub next_epoch: u32,
    pub current: Option<SessionExport>,
    pub previous: Option<SessionExport>,
    pub unconfirmed: Vec<UnconfirmedExport>,
    pub confirming: Option<ConfirmingExport>,
    pub seen: Vec<[u8; 32]>,
    pub completed: u64,
    pub failures: [u64; 7],
}

/// One session of a [`HandshakeExport`]: its keys, and its age instead of
/// an instant (which means nothing in another process).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionExport {
    pub recv_epoch: u32,
    pub recv: [u8; 32],
    pub send_epoch: u32,
    pub send: [u8; 32],
    pub age_ns: u64,
    pub initiator: bool,
    pub sealed: u64,
}

impl std::fmt::Debug for SessionExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionExport")
            .field("recv_epoch", &self.recv_epoch)
            .field("send_epoch", &self.send_epoch)
            .field("age_ns", &self.age_ns)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionExport {
    fn drop(&mut self) {
        self.recv.zeroize();
        self.send.zeroize();
    }
}

/// A responder's session awaiting its confirm, and how much longer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnconfirmedExport {
    pub session: SessionExport,
    pub left_ns: u64,
}

/// The initiator's confirms still to send.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfirmingExport {
    pub datagram: Vec<u8>,
    pub left: u8,
    pub next_ns: u64,
}

#[cfg(test)]
mod tests {
    //! Two handshakes on a simulated network with a virtual clock.

    use super::*;
    use crate::core::crypto::{Keys, MessageId};

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_bytes([n; 32])
    }

    fn pair(psk: Option<[u8; 32]>, t0: Instant) -> [Handshake; 2] {
        let a = Handshake::new(
            Setup {
                local: key(1),
                remote: key(2).public(),
                psk,
                rekey_after: REKEY_AFTER,
            },
            t0,
        );
        let b = Handshake::new(
            Setup {
                local: key(2),
                remote: key(1).public(),
                psk,
                rekey_after: REKEY_AFTER,
            },
            t0,
        );
        [a, b]
    }

    /// What the network does to one datagram from node `from`: delivery
    /// delays (none: lost; two: duplicated).
    type Policy<'a> = dyn FnMut(usize, &[u8], Instant) -> Vec<Duration> + 'a;

    struct Net {
        now: Instant,
        /// (deliver at, to, datagram)
        queue: Vec<(Instant, usize, Vec<u8>)>,
        /// Everything sent, for replays.
        log: Vec<(usize, Vec<u8>)>,
    }

    impl Net {
        fn new(t0: Instant) -> Net {
            Net {
                now: t0,
                queue: Vec::new(),
                log: Vec::new(),
            }
        }

        /// Runs both nodes for `d` in 1 ms steps.
        fn run(&mut self, nodes: &mut [Handshake; 2], d: Duration, policy: &mut Policy<'_>) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(1);
                self.tick(nodes, policy);
            }
        }

        fn tick(&mut self, nodes: &mut [Handshake; 2], policy: &mut Policy<'_>) {
            let now = self.now;
            let mut due = Vec::new();
            self.queue.retain(|(at, to, d)| {
                if *at <= now {
                    due.push((*to, d.clone()));
                    false
                } else {
                    true
                }
            });
            for (to, d) in due {
                nodes[to].handle(&d, now);
            }
            for (i, n) in nodes.iter_mut().enumerate() {
                if n.poll_timeout().is_some_and(|t| t <= now) {
                    n.handle_timeout(now);
                }
                while let Some(d) = n.poll_transmit() {
                    self.log.push((i, d.clone()));
                    for delay in policy(i, &d, now) {
                        self.queue.push((now + delay, 1 - i, d.clone()));
                    }
                }
                let _ = n.poll_keys();
            }
        }
    }

    fn perfect(_: usize, _: &[u8], _: Instant) -> Vec<Duration> {
        vec![Duration::from_millis(5)]
    }

    /// Seals a data message from `from` and opens it at `to`, with the
    /// keys each would publish now.
    fn carries(from: &Handshake, to: &Handshake, seq: u64) -> bool {
        seal_open(&from.keys(), &to.keys(), seq)
    }

    fn seal_open(from: &Keys, to: &Keys, seq: u64) -> bool {
        let Some(epoch) = from.session_epoch() else {
            return false;
        };
        let id = MessageId {
            epoch,
            msg_type: 4,
            salt: 7,
            sequence: seq,
        };
        let mut payload = *b"an inner packet!";
        let tag = from.seal(&id, b"hdr", &mut payload);
        to.open(&id, b"hdr", &mut payload, &tag).is_ok() && &payload == b"an inner packet!"
    }

    fn established(nodes: &[Handshake; 2]) -> bool {
        nodes.iter().all(|n| n.state() == State::Established)
    }

    #[test]
    fn both_ends_agree_on_keys_with_and_without_psk() {
        for psk in [None, Some([9u8; 32])] {
            let t0 = Instant::now();
            let mut nodes = pair(psk, t0);
            assert_eq!(nodes[0].state(), State::Idle);
            let mut net = Net::new(t0);
            net.run(&mut nodes, Duration::from_millis(100), &mut perfect);
            assert!(established(&nodes));
            assert!(carries(&nodes[0], &nodes[1], 1));
            assert!(carries(&nodes[1], &nodes[0], 1));
            assert!(nodes[0].stats().completed >= 1);
            assert_eq!(nodes[0].stats().failures, [0; 7]);
            assert_eq!(
                nodes[0].key_age(net.now),
                Some(net.now - nodes[0].current.as_ref().unwrap().established)
            );
        }
    }

    /// The side whose initiation is kept on a cross has been retrying
    /// alone for 40 s (its retries backed off towards RETRY_MAX) when the
    /// far side starts: the far side's first initiation brings a new one of
    /// ours at once, not at our next retry.
    #[test]
    fn a_far_side_that_starts_late_gets_keys_at_once() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let early = usize::from(key(1).public().as_bytes() < key(2).public().as_bytes());
        let late = 1 - early;
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_secs(40), &mut |_, _, _| vec![]);
        assert!(!established(&nodes));
        let [a, b] = pair(None, net.now);
        nodes[late] = if late == 0 { a } else { b };
        net.run(&mut nodes, Duration::from_millis(200), &mut perfect);
        assert!(
            established(&nodes),
            "no keys 200 ms after the far side started"
        );
        assert!(carries(&nodes[0], &nodes[1], 1));
        assert!(carries(&nodes[1], &nodes[0], 1));
        // Initiations that cross on the way: the one kept is not sent again.
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_millis(100), &mut perfect);
        assert!(established(&nodes));
        let kept = net
            .log
            .iter()
            .filter(|(from, d)| *from == early && d.len() == INIT_LEN)
            .count();
        assert_eq!(kept, 1);
    }

    /// B as a new process would start it, given what the old B exported.
    fn taken_over(old: &Handshake, now: Instant) -> Handshake {
        let mut new = Handshake::new(
            Setup {
                local: key(2),
                remote: key(1).public(),
                psk: None,
                rekey_after: REKEY_AFTER,
            },
            now,
        );
        let e = old.export(now);
        let json = serde_json::to_string(&e).unwrap();
        let back: HandshakeExport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
        assert!(new.import(&back, now));
        new
    }

    /// An upgrade at any moment of a handshake (before it, between its
    /// messages, with a session awaiting its confirm, after it, after a
    /// rekey): the new process seals and opens exactly as the old one
    /// would have, and the two sides go on with keys that work both ways.
    #[test]
    fn a_new_process_carries_on_with_the_sessions() {
        for swap_ms in (0..20).chain([300, 125_000]) {
            let t0 = Instant::now();
            let mut nodes = pair(None, t0);
            let mut net = Net::new(t0);
            net.run(&mut nodes, Duration::from_millis(swap_ms), &mut perfect);
            let completed = nodes[1].stats().completed;
            let new = taken_over(&nodes[1], net.now);
            assert_eq!(new.stats().completed, completed);
            for seq in [1, 2] {
                assert_eq!(
                    carries(&nodes[0], &new, seq),
                    carries(&nodes[0], &nodes[1], seq),
                    "at {swap_ms} ms"
                );
                assert_eq!(
                    carries(&new, &nodes[0], seq),
                    carries(&nodes[1], &nodes[0], seq),
                    "at {swap_ms} ms"
                );
            }
            let old = std::mem::replace(&mut nodes[1], new);
            // Never a session named with an epoch the old process used.
            let used = old
                .current
                .iter()
                .chain(old.previous.iter())
                .chain(old.unconfirmed.iter().map(|u| &u.session))
                .map(|s| s.keys.recv_epoch)
                .max()
                .unwrap_or(0);
            assert!(nodes[1].next_epoch > used, "at {swap_ms} ms");
            net.run(&mut nodes, Duration::from_secs(3), &mut perfect);
            assert!(established(&nodes), "at {swap_ms} ms");
            assert!(carries(&nodes[0], &nodes[1], 3), "at {swap_ms} ms");
            assert!(carries(&nodes[1], &nodes[0], 3), "at {swap_ms} ms");
            // Another identity takes nothing.
            let mut stranger = Handshake::new(
                Setup {
                    local: key(3),
                    remote: key(1).public(),
                    psk: None,
                    rekey_after: REKEY_AFTER,
                },
                net.now,
            );
            assert!(!stranger.import(&old.export(net.now), net.now));
            assert_eq!(stranger.state(), State::Idle);
            // With the session already there, the new process needs none.
            if old.state() == State::Established && old.unconfirmed.is_empty() {
                assert_eq!(nodes[1].stats().completed, completed, "at {swap_ms} ms");
            }
        }
    }

    /// Every confirm of every handshake lost: the responder never gets one,
    /// and would give each session up after `CONFIRM_WAIT` while the
    /// initiator seals with it. The messages that flow anyway (data, or the
    /// paths' probes, every probe interval) confirm it instead: the first one
    /// that opens under the awaiting session (`Keys::first_use`) is passed
    /// to `confirm_by_use`, as the lanes do. Both directions then work at
    /// every moment, across rekeys.
    #[test]
    fn all_confirms_lost() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        let mut no_confirms = |_: usize, d: &[u8], _: Instant| {
            if d.len() == CONFIRM_LEN {
                Vec::new()
            } else {
                vec![Duration::from_millis(5)]
            }
        };
        let mut seq = 0;
        let mut checked = 0;
        for secs in [1, 5, 15, 60, 130, 200, 400] {
            while net.now < t0 + Duration::from_secs(secs) {
                net.run(&mut nodes, Duration::from_millis(100), &mut no_confirms);
                // A message each way every 100 ms, as the probes do.
                for (from, to) in [(0, 1), (1, 0)] {
                    seq += 1;
                    let (keys_from, keys_to) = (nodes[from].keys(), nodes[to].keys());
                    let Some(epoch) = keys_from.session_epoch() else {
                        continue;
                    };
                    if seal_open(&keys_from, &keys_to, seq) && keys_to.first_use(epoch) {
                        nodes[to].confirm_by_use(epoch);
                    }
                }
            }
            seq += 1;
            let both = carries(&nodes[0], &nodes[1], seq) && carries(&nodes[1], &nodes[0], seq);
            assert!(
                both,
                "after {secs} s without confirms: {:?} {:?}",
                nodes[0].state(),
                nodes[1].state()
            );
            checked += 1;
        }
        assert_eq!(checked, 7);
        // Rekeys happened (every 120 s), each confirmed by use alone.
        assert!(nodes[0].stats().completed + nodes[1].stats().completed >= 6);
    }

    #[test]
    fn psk_mismatch_and_wrong_public_keys_get_nowhere() {
        let t0 = Instant::now();
        // Pre-shared keys differ.
        let mut nodes = pair(Some([1; 32]), t0);
        nodes[1].psk = Some([2; 32]);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_secs(5), &mut perfect);
        assert!(nodes.iter().all(|n| n.state() != State::Established));
        assert!(nodes[1].stats().failures(Failure::Decrypt) > 0);
        // A stranger (key 3) that knows B's public key: its initiation
        // passes the MAC but its static key is not A's.
        let mut nodes = pair(None, t0);
        nodes[0] = Handshake::new(
            Setup {
                local: key(3),
                remote: key(2).public(),
                psk: None,
                rekey_after: REKEY_AFTER,
            },
            t0,
        );
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_secs(5), &mut perfect);
        assert_ne!(nodes[1].state(), State::Established);
        assert!(nodes[1].stats().failures(Failure::UnknownKey) > 0);
        // B configured with the wrong public key for A: its initiations go
        // to a key A does not have (bad MAC at A), and A's are refused.
        let mut nodes = pair(None, t0);
        nodes[1] = Handshake::new(
            Setup {
                local: key(2),
                remote: key(4).public(),
                psk: None,
                rekey_after: REKEY_AFTER,
            },
            t0,
        );
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_secs(5), &mut perfect);
        assert!(nodes.iter().all(|n| n.state() != State::Established));
        assert!(nodes[0].stats().failures(Failure::BadMac) > 0);
        assert!(nodes[1].stats().failures(Failure::UnknownKey) > 0);
        assert!(!carries(&nodes[0], &nodes[1], 1));
    }

    #[test]
    fn lost_messages_are_retried_with_backoff() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        // The first 6 datagrams are lost, whichever way.
        let mut lost = 0;
        let mut policy = |_: usize, _: &[u8], _: Instant| {
            lost += 1;
            if lost <= 6 {
                vec![]
            } else {
                vec![Duration::from_millis(5)]
            }
        };
        net.run(&mut nodes, Duration::from_secs(30), &mut policy);
        assert!(established(&nodes));
        assert!(carries(&nodes[0], &nodes[1], 1) && carries(&nodes[1], &nodes[0], 1));
        let timeouts = nodes[0].stats().failures(Failure::Timeout)
            + nodes[1].stats().failures(Failure::Timeout);
        assert!(
            timeouts >= 1,
            "{:?} {:?}",
            nodes[0].stats(),
            nodes[1].stats()
        );
        // Backoff: initiations of one side in the first 30 s while nobody
        // answers stay few (1, 2, 4, 8, 16 s apart).
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_secs(60), &mut |_, _, _| vec![]);
        let sent = net.log.iter().filter(|(i, _)| *i == 0).count();
        assert!((5..=9).contains(&sent), "{sent} initiations in 60 s");
        assert_eq!(nodes[0].state(), State::Initiating(sent as u32));
    }

    #[test]
    fn delayed_duplicated_and_replayed_messages_do_no_harm() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        // Every datagram twice, the copy 700 ms late.
        let mut dup = |_: usize, _: &[u8], _: Instant| {
            vec![Duration::from_millis(300), Duration::from_millis(1000)]
        };
        net.run(&mut nodes, Duration::from_secs(3), &mut dup);
        assert!(established(&nodes));
        assert!(carries(&nodes[0], &nodes[1], 1) && carries(&nodes[1], &nodes[0], 1));
        let replayed = nodes[0].stats().failures(Failure::Replayed)
            + nodes[1].stats().failures(Failure::Replayed);
        assert!(replayed > 0);
        // An attacker replays everything it recorded, much later: nothing
        // changes the keys in use.
        let before = (
            nodes[0].keys().session_epoch(),
            nodes[1].keys().session_epoch(),
        );
        let log = net.log.clone();
        for (from, d) in &log {
            nodes[1 - from].handle(d, net.now);
        }
        net.run(&mut nodes, Duration::from_secs(11), &mut perfect);
        assert_eq!(
            (
                nodes[0].keys().session_epoch(),
                nodes[1].keys().session_epoch()
            ),
            before
        );
        assert!(carries(&nodes[0], &nodes[1], 2) && carries(&nodes[1], &nodes[0], 2));
        // A responder that restarted has forgotten the ephemeral keys it saw:
        // a replayed initiation costs it the work of a response, but the
        // session waits for a confirm that never comes and is dropped.
        let t1 = net.now;
        let mut fresh = pair(None, t1);
        let init = log
            .iter()
            .find(|(from, d)| *from == 0 && d.len() == INIT_LEN)
            .map(|x| x.1.clone())
            .unwrap();
        fresh[1].handle(&init, t1);
        assert_eq!(fresh[1].unconfirmed.len(), 1);
        assert!(fresh[1].current.is_none());
        fresh[1].handle_timeout(t1 + CONFIRM_WAIT);
        assert!(fresh[1].unconfirmed.is_empty());
    }

    #[test]
    fn rekey_under_load_loses_no_message() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        assert!(established(&nodes));
        // One message each way every 2 ms (500/s per direction), each
        // opened 5 ms after it was sealed, with the keys published then,
        // for 10 minutes: several rekeys.
        let mut in_flight: Vec<(Instant, usize, Keys, u64)> = Vec::new();
        let mut sent = [0u64; 2];
        let mut lost = 0;
        let mut epochs = std::collections::BTreeSet::new();
        let end = net.now + Duration::from_secs(600);
        while net.now < end {
            net.run(&mut nodes, Duration::from_millis(1), &mut perfect);
            let now = net.now;
            if now.duration_since(t0).as_millis() % 2 == 0 {
                for i in 0..2 {
                    sent[i] += 1;
                    let k = nodes[i].keys();
                    epochs.insert((i, k.session_epoch()));
                    in_flight.push((now + Duration::from_millis(5), i, k, sent[i]));
                }
            }
            let (due, rest): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|m| m.0 <= now);
            in_flight = rest;
            for (_, from, k, seq) in due {
                if !seal_open(&k, &nodes[1 - from].keys(), seq) {
                    lost += 1;
                }
            }
        }
        assert_eq!(lost, 0, "of {sent:?}");
        // 600 s at a rekey every 120-130 s: at least 4 sessions per side.
        assert!(epochs.len() >= 8, "{epochs:?}");
        assert_eq!(nodes[0].stats().failures, [0; 7]);
    }

    #[test]
    fn rekey_by_message_count() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        let before = nodes[0].keys().session_epoch();
        nodes[0].note_sealed(REKEY_AFTER_MESSAGES);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        assert_ne!(nodes[0].keys().session_epoch(), before);
        assert!(carries(&nodes[0], &nodes[1], 1) && carries(&nodes[1], &nodes[0], 1));
    }

    /// The shell reports a running count of datagrams sent: only what was
    /// sent since the last report counts, the first report is a base, and
    /// a count that went back (counters of a replaced path) is a new base.
    #[test]
    fn rekey_by_the_shells_running_count() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        let before = nodes[0].keys().session_epoch();
        // A daemon that had sent a great deal before this session.
        nodes[0].note_sent_total(10 * REKEY_AFTER_MESSAGES);
        nodes[0].note_sent_total(10 * REKEY_AFTER_MESSAGES + REKEY_AFTER_MESSAGES / 2);
        nodes[0].note_sent_total(5);
        nodes[0].note_sent_total(5 + REKEY_AFTER_MESSAGES / 2 - 1);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        assert_eq!(nodes[0].keys().session_epoch(), before, "one message short");
        nodes[0].note_sent_total(5 + REKEY_AFTER_MESSAGES / 2 + 1);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        assert_ne!(nodes[0].keys().session_epoch(), before);
        assert!(carries(&nodes[0], &nodes[1], 1) && carries(&nodes[1], &nodes[0], 1));
        // The new session starts its count afresh.
        let after = nodes[0].keys().session_epoch();
        nodes[0].note_sent_total(5 + REKEY_AFTER_MESSAGES);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        assert_eq!(nodes[0].keys().session_epoch(), after);
    }

    #[test]
    fn one_side_restarting_recovers_at_once() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_secs(30), &mut perfect);
        assert!(established(&nodes));
        // B restarts: a new run with its epochs counting from 1 again.
        nodes[1] = Handshake::new(
            Setup {
                local: key(2),
                remote: key(1).public(),
                psk: None,
                rekey_after: REKEY_AFTER,
            },
            net.now,
        );
        assert!(!carries(&nodes[0], &nodes[1], 1));
        net.run(&mut nodes, Duration::from_millis(100), &mut perfect);
        assert!(established(&nodes));
        assert!(carries(&nodes[0], &nodes[1], 1) && carries(&nodes[1], &nodes[0], 1));
    }

    #[test]
    fn clock_steps_expire_sessions_and_a_new_one_follows() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        assert!(established(&nodes));
        // The host slept for an hour (the monotonic clock jumped): the old
        // session is past REJECT_AFTER and seals nothing.
        net.now += Duration::from_secs(3600);
        nodes[0].handle_timeout(net.now);
        assert!(nodes[0].keys().session_epoch().is_none() || nodes[0].initiation.is_some());
        net.run(&mut nodes, Duration::from_millis(100), &mut perfect);
        assert!(established(&nodes));
        assert!(carries(&nodes[0], &nodes[1], 1) && carries(&nodes[1], &nodes[0], 1));
        // A time from before (a shell bug) changes nothing and panics not.
        let back = t0;
        nodes[0].handle_timeout(back);
        assert!(nodes[0].key_age(back).is_some());
        assert!(carries(&nodes[0], &nodes[1], 2));
    }

    #[test]
    fn floods_are_dropped_before_public_key_work() {
        let t0 = Instant::now();
        let mut nodes = pair(None, t0);
        let mut net = Net::new(t0);
        net.run(&mut nodes, Duration::from_millis(50), &mut perfect);
        let init = net
            .log
            .iter()
            .find(|(from, d)| *from == 0 && d.len() == INIT_LEN)
            .map(|x| x.1.clone())
            .unwrap();
        // Junk of every kind and length: malformed or bad MAC, no DH.
        let mut junk = init.clone();
        junk[40] ^= 1;
        let [_, spare] = pair(None, t0);
        let mut b = std::mem::replace(&mut nodes[1], spare);
        for _ in 0..1000 {
            b.handle(&junk, net.now);
            b.handle(&init[..50], net.now);
        }
        assert_eq!(b.stats().failures(Failure::BadMac), 1000);
        assert_eq!(b.stats().failures(Failure::Malformed), 1000);
        // Initiations with a valid MAC (made by someone who knows B's
        // public key): at most the bucket's worth per second get work.
        let mut flood = Handshake::new(
            Setup {
                local: key(5),
                remote: key(2).public(),
                psk: None,
                rekey_after: REKEY_AFTER,
            },
            t0,
        );
        let mut valid = Vec::new();
        for _ in 0..200 {
            flood.initiation = None;
            flood.initiate(net.now);
            valid.push(flood.poll_transmit().unwrap());
        }
        let start = b.stats().clone();
        for d in &valid {
            b.handle(d, net.now + Duration::from_millis(500));
        }
        let limited =
            b.stats().failures(Failure::RateLimited) - start.failures(Failure::RateLimited);
        let worked = b.stats().failures(Failure::UnknownKey) - start.failures(Failure::UnknownKey);
        assert!(worked <= u64::from(BUCKET_BURST) + 1, "{worked} handled");
        assert_eq!(limited + worked, 200);
        // The real peer still gets through once the flood stops.
        nodes[1] = b;
        net.run(&mut nodes, Duration::from_secs(20), &mut perfect);
        assert!(carries(&nodes[0], &nodes[1], 9) && carries(&nodes[1], &nodes[0], 9));
    }
}
