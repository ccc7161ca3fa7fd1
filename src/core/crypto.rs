//! Data-plane authenticated encryption, sans-IO.
//!
//! A peer with a `key_file` seals every overlay message (data and echo)
//! with AES-256-GCM under keys derived from a pre-shared 32-byte key. Each
//! sender run, message kind and path direction gets its own AES key, so
//! the 96-bit GCM nonce need only carry the sequence number the overlay
//! header already has:
//!
//! ```text
//!  message key = HKDF-SHA256(salt = "crosslink overlay AES-256-GCM v1",
//!                            key = pre-shared key,
//!                            info = epoch (4) | message type (1) | path salt (8))
//!  nonce       = 0 (4) | sequence (8)
//! ```
//!
//! - `epoch` is the sender's start time in Unix seconds, carried in the
//!   header's epoch field. The daemon does not send sealed traffic before
//!   that second is over, so two runs of one gateway never share an epoch
//!   (as long as the wall clock does not step back across a restart).
//! - `message type` tells data from echo requests and replies, whose
//!   number spaces (the per-path counter, echo stamps strictly increasing
//!   within a run) would otherwise meet.
//! - `path salt` ([`path_salt`]) hashes the sender's (local, remote) socket
//!   addresses: every path and each of its two directions has its own.
//!
//! So no (key, nonce) pair ever repeats. Deriving a key takes a few
//! microseconds; each forwarding thread keeps the few it uses in a small
//! cache, so a packet costs one AES-GCM pass (ring's assembly, AES-NI and
//! carry-less multiplication: several GB/s per core).
//!
//! The datagram is `header | ciphertext | tag (16)`; the header (with any
//! extensions) is the associated data, so nothing in it can be altered.
//! Sealing and opening work in place on the caller's buffer.
//!
//! Key rotation: a peer holds a sending key and optionally one more key
//! that is accepted on receive ([`Keys`]). Receivers try the sending key
//! first, then the other. See the README's "Key rotation" for the
//! two-step procedure that changes keys without dropping a packet.
//!
//! Replay: each path's receiver keeps a [`ReplayWindow`] of the last
//! [`WINDOW`] sequence numbers of the sender's current epoch (RFC 4303
//! section 3.4.3 describes the same sliding-window idea for IPsec), and
//! of its previous one: packets the sender's previous run sent just before
//! a newer epoch's first arrived (on another lane, say, across an
//! upgrade) are still taken, each once.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use ring::hkdf;
use std::cell::RefCell;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;
use zeroize::Zeroize;

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of the authentication tag appended to a sealed message.
pub const TAG_LEN: usize = 16;
/// Width of the replay window in sequence numbers.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// A pre-shared key. Never printed: `Debug` shows only that it exists.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Why a key file's content was refused. Never includes the content.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error(
        "expected one line with 64 hex digits or the base64 of 32 bytes; found {0} characters"
    )]
    BadLength(usize),
    #[error("not valid hex or base64")]
    BadEncoding,
    #[error("base64 decodes to {0} bytes; a key has exactly 32")]
    WrongSize(usize),
}

impl Key {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// Parses a key file: one line, surrounding whitespace ignored, either
    /// 64 hexadecimal digits or standard base64 (44 characters, padded) of
    /// exactly 32 bytes.
    pub fn parse(text: &str) -> Result<Key, KeyError> {
        let t = text.trim();
        let mut out = [0u8; KEY_LEN];
        if t.len() == 2 * KEY_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            for (o, pair) in out.iter_mut().zip(t.as_bytes().chunks_exact(2)) {
                *o = (hex_val(pair[0]) << 4) | hex_val(pair[1]);
            }
            return Ok(Key(out));
        }
        if t.len() != 44 {
            return Err(KeyError::BadLength(t.chars().count()));
        }
        let n = base64_decode(t.as_bytes(), &mut out)?;
        if n != KEY_LEN {
            out.zeroize();
            return Err(KeyError::WrongSize(n));
        }
        Ok(Key(out))
    }

    /// The raw bytes (the handshake mixes a `key_file` in as its pre-shared key).
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0
    }

    /// The HKDF pseudo-random key all message keys are expanded from.
    fn prk(&self) -> hkdf::Prk {
        hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(&self.0)
    }
}

/// The HKDF salt: names the construction, so keys never meet another use.
const KDF_SALT: &[u8] = b"crosslink overlay AES-256-GCM v1";

/// One direction's AES-256-GCM key for one sender run and message type.
struct MessageKey(LessSafeKey);

impl MessageKey {
    fn derive(prk: &hkdf::Prk, epoch: u32, msg_type: u8, salt: u64) -> Option<MessageKey> {
        let mut info = [0u8; 13];
        info[..4].copy_from_slice(&epoch.to_be_bytes());
        info[4] = msg_type;
        info[5..].copy_from_slice(&salt.to_be_bytes());
        let parts: [&[u8]; 1] = [&info];
        let okm = prk.expand(&parts, &AES_256_GCM).ok()?;
        let key = UnboundKey::from(okm);
        Some(MessageKey(LessSafeKey::new(key)))
    }

    fn nonce(sequence: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&sequence.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    fn seal(&self, sequence: u64, aad: &[u8], payload: &mut [u8]) -> Option<[u8; TAG_LEN]> {
        let tag = self
            .0
            .seal_in_place_separate_tag(Self::nonce(sequence), Aad::from(aad), payload)
            .ok()?;
        tag.as_ref().try_into().ok()
    }

    /// On failure the payload is overwritten.
    fn open(&self, sequence: u64, aad: &[u8], payload: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        let nonce = Self::nonce(sequence);
        self.0
            .open_in_place_separate_tag(nonce, Aad::from(aad), Tag::from(*tag), payload, 0..)
            .is_ok()
    }
}

/// Which message key: whose (a [`Keys`] by its number, and its sending or
/// accepted key), and for what.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Slot {
    keys: u64,
    accept: bool,
    epoch: u32,
    msg_type: u8,
    salt: u64,
}

/// Message keys a thread has used lately (a thread seals or opens for a
/// handful of paths, types and epochs).
const CACHED: usize = 32;

thread_local! {
    static CACHE: RefCell<Vec<(Slot, MessageKey)>> = const { RefCell::new(Vec::new()) };
    /// A copy of the ciphertext while a second key is tried.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the message key for `slot`, derived from `prk` on a miss.
fn with_key<R>(slot: Slot, prk: &hkdf::Prk, f: impl FnOnce(&MessageKey) -> R) -> Option<R> {
    CACHE.with_borrow_mut(|cache| {
        if let Some(i) = cache.iter().position(|(s, _)| *s == slot) {
            return cache.get(i).map(|(_, k)| f(k));
        }
        let key = MessageKey::derive(prk, slot.epoch, slot.msg_type, slot.salt)?;
        if cache.len() >= CACHED {
            cache.remove(0);
        }
        let out = f(&key);
        cache.push((slot, key));
        Some(out)
    })
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

fn b64_val(b: u8) -> Option<u32> {
    let v = match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes padded standard base64 into `out`; returns the byte count.
fn base64_decode(text: &[u8], out: &mut [u8]) -> Result<usize, KeyError> {
    if text.len() % 4 != 0 {
        return Err(KeyError::BadEncoding);
    }
    let mut n = 0;
    let quads = text.len() / 4;
    for (q, quad) in text.chunks_exact(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return Err(KeyError::BadEncoding);
        }
        let mut acc = 0u32;
        for &b in &quad[..4 - pad] {
            acc = (acc << 6) | b64_val(b).ok_or(KeyError::BadEncoding)?;
        }
        acc <<= 6 * pad as u32;
        let bytes = acc.to_be_bytes();
        for &b in &bytes[1..4 - pad] {
            *out.get_mut(n).ok_or(KeyError::WrongSize(n + 1))? = b;
            n += 1;
        }
    }
    Ok(n)
}

/// A peer's keys: the one it seals with and, during a rotation, one more
/// that it also accepts.
#[derive(Clone)]
pub struct Keys {
    /// Tells this set from every other in the threads' key caches (a set
    /// loaded at reload gets a new number even if it sits at the address
    /// of a freed one).
    id: u64,
    send: hkdf::Prk,
    accept: Option<hkdf::Prk>,
    /// Handshake mode ([`Keys::sessions`]): the epoch the header carries
    /// when sealing with `send`, and the receive keys by epoch.
    sessions: Option<Sessions>,
}

/// The session keys of a peer with a `public_key`.
#[derive(Clone)]
struct Sessions {
    /// The far side's epoch for the current session (what this side puts
    /// in the header), `None` before the first handshake completes.
    send_epoch: Option<u32>,
    /// Keys accepted on receive, by this side's epoch: the current session,
    /// the previous one during its overlap, and sessions the far side
    /// started that await confirmation.
    recv: Vec<(u32, hkdf::Prk)>,
    /// The epochs of `recv` that await confirmation, each with whether a
    /// message it opened was reported ([`Keys::first_use`]).
    unconfirmed: Arc<Vec<(u32, AtomicBool)>>,
}

/// One session's two directions as a handshake gives them: raw 32-byte
/// transport keys and the epochs naming them in headers.
pub struct SessionKeys {
    /// This side's epoch: the far side seals with `recv` under it.
    pub recv_epoch: u32,
    pub recv: [u8; KEY_LEN],
    /// The far side's epoch: this side seals with `send` under it.
    pub send_epoch: u32,
    pub send: [u8; KEY_LEN],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("recv_epoch", &self.recv_epoch)
            .field("send_epoch", &self.send_epoch)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionKeys {
    fn drop(&mut self) {
        self.recv.zeroize();
        self.send.zeroize();
    }
}

/// The HKDF salt of session keys: a handshake's transport key is the input
/// key material, in place of the pre-shared key.
const SESSION_SALT: &[u8] = b"crosslink session AES-256-GCM v1";

fn session_prk(key: &[u8; KEY_LEN]) -> hkdf::Prk {
    hkdf::Salt::new(hkdf::HKDF_SHA256, SESSION_SALT).extract(key)
}

/// Numbers for [`Keys::id`].
static NEXT_KEYS_ID: AtomicU64 = AtomicU64::new(1);

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("send", &"<redacted>")
            .field("accept", &self.accept.as_ref().map(|_| "<redacted>"))
            .field(
                "sessions",
                &self
                    .sessions
                    .as_ref()
                    .map(|s| (s.send_epoch, s.recv.iter().map(|r| r.0).collect::<Vec<_>>())),
            )
            .finish()
    }
}

/// What one sealed message is: whose, which kind, which sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageId {
    /// The sender's epoch.
    pub epoch: u32,
    /// The overlay message type (sealed data, echo request, echo reply).
    pub msg_type: u8,
    /// [`path_salt`] of the sender's (local, remote).
    pub salt: u64,
    /// The path sequence number, or the echo stamp.
    pub sequence: u64,
}

impl Keys {
    pub fn new(send: &Key, accept: Option<&Key>) -> Keys {
        Keys {
            id: NEXT_KEYS_ID.fetch_add(1, Ordering::Relaxed),
            send: send.prk(),
            accept: accept.map(Key::prk),
            sessions: None,
        }
    }

    /// Handshake mode: seal with `send` (the current session; `None`
    /// before the first one), open what any of `recv` sealed, each
    /// identified by the header's epoch. The message keys are derived as in
    /// the pre-shared mode, with the session's transport key in place of
    /// the pre-shared key (and a salt of their own), so each message kind
    /// and path direction still has its own key and the nonce is still the
    /// sequence number; a session's keys are fresh, so sequence numbers may
    /// start again under them.
    pub fn sessions(send: Option<&SessionKeys>, recv: &[&SessionKeys]) -> Keys {
        Keys::sessions_awaiting(send, recv, &[])
    }

    /// [`Keys::sessions`], with `unconfirmed` (epochs among `recv`'s) the
    /// sessions the far side started that await its confirm: a message that
    /// opens under one of them confirms it as well as the confirm would
    /// (only the holder of the session's keys can seal it), and
    /// [`Keys::first_use`] says so once.
    pub fn sessions_awaiting(
        send: Option<&SessionKeys>,
        recv: &[&SessionKeys],
        unconfirmed: &[u32],
    ) -> Keys {
        let send_prk = send.map(|s| session_prk(&s.send));
        Keys {
            id: NEXT_KEYS_ID.fetch_add(1, Ordering::Relaxed),
            // Never used without a session (see `seal`); any key will do.
            send: send_prk
                .clone()
                .unwrap_or_else(|| session_prk(&[0u8; KEY_LEN])),
            accept: None,
            sessions: Some(Sessions {
                send_epoch: send.map(|s| s.send_epoch),
                recv: recv
                    .iter()
                    .map(|s| (s.recv_epoch, session_prk(&s.recv)))
                    .collect(),
                unconfirmed: Arc::new(
                    unconfirmed
                        .iter()
                        .map(|&e| (e, AtomicBool::new(false)))
                        .collect(),
                ),
            }),
        }
    }

    /// Whether any session awaits its confirm (then [`Keys::first_use`]
    /// is worth asking).
    pub fn awaits_confirm(&self) -> bool {
        self.sessions.as_ref().is_some_and(|s| {
            s.unconfirmed
                .iter()
                .any(|(_, r)| !r.load(Ordering::Relaxed))
        })
    }

    /// True the first time a message sealed under `epoch`, a session that
    /// awaits confirmation, was opened (the caller tells the handshake, which
    /// takes the session as confirmed): false for any other epoch, and after
    /// the first time.
    pub fn first_use(&self, epoch: u32) -> bool {
        let Some(s) = &self.sessions else {
            return false;
        };
        s.unconfirmed
            .iter()
            .find(|(e, _)| *e == epoch)
            .is_some_and(|(_, reported)| !reported.swap(true, Ordering::Relaxed))
    }

    /// The epoch sealed messages must carry: `Some` in handshake mode
    /// (the current session's), `None` in the pre-shared mode (the
    /// sender's run epoch). [`Keys::can_seal`] says whether there is one.
    pub fn session_epoch(&self) -> Option<u32> {
        self.sessions.as_ref().and_then(|s| s.send_epoch)
    }

    /// Whether messages can be sealed: always with a pre-shared key, once
    /// a handshake completed in handshake mode.
    pub fn can_seal(&self) -> bool {
        self.sessions
            .as_ref()
            .is_none_or(|s| s.send_epoch.is_some())
    }

    /// Whether these are session keys (a peer with a `public_key`).
    pub fn is_session(&self) -> bool {
        self.sessions.is_some()
    }

    fn slot(&self, m: &MessageId, accept: bool) -> Slot {
        Slot {
            keys: self.id,
            accept,
            epoch: m.epoch,
            msg_type: m.msg_type,
            salt: m.salt,
        }
    }

    /// Encrypts `payload` in place and returns the tag to append.
    pub fn seal(&self, m: &MessageId, aad: &[u8], payload: &mut [u8]) -> [u8; TAG_LEN] {
        // Fails only for payloads beyond what GCM allows, or in handshake
        // mode without a session or with another epoch than the session's;
        // an all-zero tag then fails to open.
        if let Some(s) = &self.sessions {
            if s.send_epoch != Some(m.epoch) {
                return [0; TAG_LEN];
            }
        }
        with_key(self.slot(m, false), &self.send, |k| {
            k.seal(m.sequence, aad, payload)
        })
        .flatten()
        .unwrap_or([0; TAG_LEN])
    }

    /// Checks the tag and decrypts `payload` in place, under the sending
    /// key and then the accepted one. On failure the payload's content is
    /// unspecified (the message is dropped anyway).
    pub fn open(
        &self,
        m: &MessageId,
        aad: &[u8],
        payload: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        let try_key = |accept: bool, prk: &hkdf::Prk, payload: &mut [u8]| {
            with_key(self.slot(m, accept), prk, |k| {
                k.open(m.sequence, aad, payload, tag)
            })
            .unwrap_or(false)
        };
        if let Some(sessions) = &self.sessions {
            // The header's epoch names the session (this side's number).
            let Some((_, prk)) = sessions.recv.iter().find(|(e, _)| *e == m.epoch) else {
                return Err(OpenError);
            };
            return match try_key(true, prk, payload) {
                true => Ok(()),
                false => Err(OpenError),
            };
        }
        let Some(accept) = &self.accept else {
            return match try_key(false, &self.send, payload) {
                true => Ok(()),
                false => Err(OpenError),
            };
        };
        // A failed attempt overwrites the payload: keep the ciphertext for
        // the second key (only during a key rotation).
        SCRATCH.with_borrow_mut(|copy| {
            copy.clear();
            copy.extend_from_slice(payload);
            if try_key(false, &self.send, payload) {
                return Ok(());
            }
            payload.copy_from_slice(copy);
            match try_key(true, accept, payload) {
                true => Ok(()),
                false => Err(OpenError),
            }
        })
    }
}

/// The message did not authenticate under any of the peer's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenError;

/// The nonce salt of messages sent from `from` to `to`: FNV-1a over both
/// socket addresses, so each path and direction has its own nonce space.
pub fn path_salt(from: SocketAddr, to: SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for a in [from, to] {
        match a.ip() {
            IpAddr::V4(v4) => eat(&v4.octets()),
            IpAddr::V6(v6) => eat(&v6.octets()),
        }
        eat(&a.port().to_be_bytes());
    }
    h
}

/// Why the replay window refused a sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Seen before.
    Duplicate,
    /// Older than the window.
    TooOld,
    /// From an earlier run of the sender than the one the window follows.
    StaleEpoch,
}

/// The sequence numbers recently accepted on a path, for one epoch of
/// the sender. [`ReplayWindow::check`] before authenticating (cheap
/// rejection), [`ReplayWindow::commit`] after, so forged packets never
/// move the window.
///
/// When the epoch moves on, the previous epoch's window is kept beside the
/// new one, so that messages of the previous epoch still in flight (sent
/// just before a rekey, or on a slower path) are accepted once each; any
/// older epoch is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplayWindow {
    epoch: u32,
    /// Highest accepted sequence; 0 means none yet (senders start at 1).
    top: u64,
    /// Bit `i` (word i / 64, bit i % 64) set: `top - i` was accepted.
    bits: [u64; WORDS],
    /// The previous epoch's window (its own `previous` empty).
    previous: Option<Box<ReplayWindow>>,
}

impl ReplayWindow {
    /// The newest `(epoch, sequence)` accepted ((0, 0): none).
    pub fn newest(&self) -> (u32, u64) {
        (self.epoch, self.top)
    }

    /// A window that has seen every sequence number of `epoch` up to
    /// `top`, and no earlier epoch: what a receiver that cannot tell
    /// which of them it accepted (several windows merged, across an
    /// upgrade) must assume, so that nothing it answered is answered
    /// twice.
    pub fn seen_up_to(epoch: u32, top: u64) -> ReplayWindow {
        ReplayWindow {
            epoch,
            top,
            bits: [u64::MAX; WORDS],
            previous: None,
        }
    }

    /// Whether `(epoch, sequence)` may be new.
    pub fn check(&self, epoch: u32, sequence: u64) -> Result<(), Replay> {
        if epoch < self.epoch {
            return match &self.previous {
                Some(p) if p.epoch == epoch => p.check(epoch, sequence),
                _ => Err(Replay::StaleEpoch),
            };
        }
        if epoch > self.epoch || sequence > self.top {
            return Ok(());
        }
        let age = self.top - sequence;
        if age >= WINDOW {
            return Err(Replay::TooOld);
        }
        if self.bit(age) {
            Err(Replay::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Records an authenticated `(epoch, sequence)`; call only after
    /// [`ReplayWindow::check`] passed and the message opened.
    pub fn commit(&mut self, epoch: u32, sequence: u64) {
        if epoch < self.epoch {
            if let Some(p) = self.previous.as_mut().filter(|p| p.epoch == epoch) {
                p.commit(epoch, sequence);
            }
            return;
        }
        if epoch > self.epoch {
            let mut old = std::mem::replace(
                self,
                ReplayWindow {
                    epoch,
                    ..ReplayWindow::default()
                },
            );
            old.previous = None;
            self.previous = Some(Box::new(old));
        }
        if sequence > self.top {
            self.shift(sequence - self.top);
            self.top = sequence;
        }
        let age = self.top - sequence;
        if age < WINDOW {
            self.bits[(age / 64) as usize] |= 1 << (age % 64);
        }
    }

    fn bit(&self, age: u64) -> bool {
        self.bits[(age / 64) as usize] & (1 << (age % 64)) != 0
    }

    /// Ages every entry by `by`.
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        for i in (0..WORDS).rev() {
            let src = i.checked_sub(words);
            let hi = src.map_or(0, |s| self.bits[s] << bits);
            let lo = match (src.and_then(|s| s.checked_sub(1)), bits) {
                (Some(s), b) if b > 0 => self.bits[s] >> (64 - b),
                _ => 0,
            };
            self.bits[i] = hi | lo;
        }
    }
}

/// Where [`crate::core::forward::receive`] checks and records a path's sequence
/// numbers: a window of one receiver, or one shared by the lanes that
/// receive the path (each datagram, identified by its authenticated lane,
/// always reaches the same lane, so the check and the commit of one
/// datagram never race with those of the same datagram).
pub trait Replays {
    /// [`ReplayWindow::check`].
    fn check(&self, epoch: u32, sequence: u64) -> Result<(), Replay>;
    /// [`ReplayWindow::commit`].
    fn commit(&mut self, epoch: u32, sequence: u64);
}

impl Replays for ReplayWindow {
    fn check(&self, epoch: u32, sequence: u64) -> Result<(), Replay> {
        ReplayWindow::check(self, epoch, sequence)
    }

    fn commit(&mut self, epoch: u32, sequence: u64) {
        ReplayWindow::commit(self, epoch, sequence);
    }
}

impl Replays for std::sync::Arc<parking_lot::Mutex<ReplayWindow>> {
    fn check(&self, epoch: u32, sequence: u64) -> Result<(), Replay> {
        self.lock().check(epoch, sequence)
    }

    fn commit(&mut self, epoch: u32, sequence: u64) {
        self.lock().commit(epoch, sequence);
    }
}

/// Replay protection for the sealed echo requests that older gateways
/// send, whose sequence field is a stamp rather than a counter: a request
/// must carry a newer (epoch, stamp) than any request accepted before
/// (senders stamp with a clock that only moves forward). This gateway
/// probes instead ([`crate::core::quality`]) and sends no echo requests.
#[derive(Clone, Debug, Default)]
pub struct EchoGuard {
    last_request: Option<(u32, u64)>,
}

impl EchoGuard {
    /// A guard that has accepted requests up to `last` (handed over
    /// across an upgrade).
    pub fn after(last: Option<(u32, u64)>) -> EchoGuard {
        EchoGuard { last_request: last }
    }

    /// The newest request accepted.
    pub fn last(&self) -> Option<(u32, u64)> {
        self.last_request
    }

    /// An authenticated request arrived: true if it is new (and answer it).
    pub fn request(&mut self, epoch: u32, stamp: u64) -> bool {
        let fresh = self.last_request.is_none_or(|last| (epoch, stamp) > last);
        if fresh {
            self.last_request = Some((epoch, stamp));
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn key(b: u8) -> Key {
        Key::from_bytes([b; KEY_LEN])
    }

    #[test]
    fn key_file_formats() {
        let k = Key::parse(&format!("  {HEX}\n")).unwrap();
        assert_eq!(k.0[31], 0x1f);
        let b64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert_eq!(Key::parse(b64).unwrap().0, k.0);
        assert_eq!(Key::parse(&HEX[..62]).unwrap_err(), KeyError::BadLength(62));
        assert_eq!(Key::parse("").unwrap_err(), KeyError::BadLength(0));
        let short_b64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwd"; // 40 chars
        assert!(Key::parse(short_b64).is_err());
        let b64_33 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g"; // 33 bytes, 44 chars
        assert_eq!(Key::parse(b64_33).unwrap_err(), KeyError::WrongSize(33));
        assert_eq!(
            Key::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh*=").unwrap_err(),
            KeyError::BadEncoding
        );
        let text = format!("{:?} {:?}", k, Keys::new(&k, Some(&k)));
        assert!(!text.contains("1f") && text.contains("redacted"), "{text}");
    }

    fn id(epoch: u32, msg_type: u8, salt: u64, sequence: u64) -> MessageId {
        MessageId {
            epoch,
            msg_type,
            salt,
            sequence,
        }
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let keys = Keys::new(&key(1), None);
        let n = id(7, 4, 99, 1);
        let mut msg = *b"hello, inner packet";
        let tag = keys.seal(&n, b"hdr", &mut msg);
        assert_ne!(&msg, b"hello, inner packet");
        let mut copy = msg;
        keys.open(&n, b"hdr", &mut copy, &tag).unwrap();
        assert_eq!(&copy, b"hello, inner packet");
        // Wrong AAD, epoch, type, salt, sequence, tag, ciphertext, key: all refused.
        let mut c = msg;
        assert_eq!(keys.open(&n, b"hdX", &mut c, &tag), Err(OpenError));
        for wrong in [
            id(8, 4, 99, 1),
            id(7, 5, 99, 1),
            id(7, 4, 98, 1),
            id(7, 4, 99, 2),
        ] {
            let mut c = msg;
            assert!(keys.open(&wrong, b"hdr", &mut c, &tag).is_err());
        }
        let mut bad_tag = tag;
        bad_tag[0] ^= 1;
        let mut c = msg;
        assert!(keys.open(&n, b"hdr", &mut c, &bad_tag).is_err());
        let mut c = msg;
        c[3] ^= 0x40;
        assert!(keys.open(&n, b"hdr", &mut c, &tag).is_err());
        // The untampered message still opens.
        let mut c = msg;
        assert!(keys.open(&n, b"hdr", &mut c, &tag).is_ok());
        let other = Keys::new(&key(2), None);
        let mut c = msg;
        assert!(other.open(&n, b"hdr", &mut c, &tag).is_err());
    }

    /// Every (epoch, type, salt) has its own key: the same plaintext and
    /// sequence number give unrelated ciphertexts (no keystream reuse
    /// across paths, directions, kinds or runs).
    #[test]
    fn every_direction_kind_and_run_has_its_own_key() {
        let keys = Keys::new(&key(4), None);
        let mut seen = std::collections::HashSet::new();
        for m in [
            id(1, 4, 10, 5),
            id(2, 4, 10, 5),
            id(1, 5, 10, 5),
            id(1, 4, 11, 5),
        ] {
            let mut buf = [0u8; 32];
            let tag = keys.seal(&m, b"", &mut buf);
            assert!(seen.insert((buf, tag)), "{m:?}");
        }
    }

    /// Deterministic: a known key and message give fixed bytes (a change
    /// of the construction breaks compatibility between gateways and must
    /// be deliberate).
    #[test]
    fn known_answer() {
        let keys = Keys::new(&key(9), None);
        let mut buf = *b"crosslink";
        let tag = keys.seal(&id(0x6000_0000, 4, 0xabcd, 1 << 40), b"header", &mut buf);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(hex(&buf), KNOWN_CIPHERTEXT);
        assert_eq!(hex(&tag), KNOWN_TAG);
    }

    /// The message key is HKDF-SHA256 (RFC 5869) as written: computed
    /// here from HMAC directly, it opens what [`Keys::seal`] sealed.
    #[test]
    fn derivation_is_rfc5869_hkdf() {
        use ring::hmac;
        let psk = [9u8; 32];
        let m = id(0x6000_0000, 4, 0xabcd, 1 << 40);
        let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, KDF_SALT), &psk);
        let mut info = Vec::new();
        info.extend_from_slice(&m.epoch.to_be_bytes());
        info.push(m.msg_type);
        info.extend_from_slice(&m.salt.to_be_bytes());
        info.push(1);
        let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &info);
        let aes = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, okm.as_ref()).unwrap());
        let keys = Keys::new(&Key::from_bytes(psk), None);
        let mut buf = *b"independent";
        let tag = keys.seal(&m, b"aad", &mut buf);
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&m.sequence.to_be_bytes());
        aes.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"aad"),
            Tag::from(tag),
            &mut buf,
            0..,
        )
        .unwrap();
        assert_eq!(&buf, b"independent");
    }

    #[test]
    fn many_keys_in_one_thread_stay_correct() {
        // More (epoch, salt) pairs than the cache holds, interleaved.
        let keys = Keys::new(&key(5), None);
        for round in 0..3u64 {
            for salt in 0..(2 * CACHED as u64) {
                let m = id(3, 4, salt, round);
                let mut buf = *b"payload";
                let tag = keys.seal(&m, b"h", &mut buf);
                keys.open(&m, b"h", &mut buf, &tag).unwrap();
                assert_eq!(&buf, b"payload");
            }
        }
    }

    #[test]
    fn rotation_accepts_both_keys() {
        let old = Keys::new(&key(1), None);
        let new = Keys::new(&key(2), None);
        // Mid-rotation receiver: sends with new, accepts old too.
        let rx = Keys::new(&key(2), Some(&key(1)));
        let n = id(1, 4, 0, 1);
        for sender in [&old, &new] {
            let mut m = *b"data";
            let tag = sender.seal(&n, b"", &mut m);
            rx.open(&n, b"", &mut m, &tag).unwrap();
            assert_eq!(&m, b"data");
        }
        let mut m = *b"data";
        let tag = Keys::new(&key(3), None).seal(&n, b"", &mut m);
        assert!(rx.open(&n, b"", &mut m, &tag).is_err());
    }

    #[test]
    fn salts_differ_per_path_and_direction() {
        let a: SocketAddr = "198.18.1.1:4000".parse().unwrap();
        let b: SocketAddr = "198.18.1.2:4000".parse().unwrap();
        let c: SocketAddr = "198.18.2.1:4000".parse().unwrap();
        let d: SocketAddr = "198.18.2.2:4000".parse().unwrap();
        let salts = [
            path_salt(a, b),
            path_salt(b, a),
            path_salt(c, d),
            path_salt(d, c),
        ];
        let set: std::collections::HashSet<_> = salts.iter().collect();
        assert_eq!(set.len(), 4);
    }

    const KNOWN_CIPHERTEXT: &str = "bb4b4e4e119b24dd60";
    const KNOWN_TAG: &str = "29e8a4b5edc8d5308c1da5d4085a5379";

    fn accept(w: &mut ReplayWindow, epoch: u32, seq: u64) -> Result<(), Replay> {
        w.check(epoch, seq)?;
        w.commit(epoch, seq);
        Ok(())
    }

    #[test]
    fn window_in_order_and_duplicates() {
        let mut w = ReplayWindow::default();
        for s in 1..=3000 {
            assert_eq!(accept(&mut w, 5, s), Ok(()));
        }
        assert_eq!(accept(&mut w, 5, 3000), Err(Replay::Duplicate));
        assert_eq!(accept(&mut w, 5, 2000), Err(Replay::Duplicate));
        assert_eq!(accept(&mut w, 5, 3000 - 1024), Err(Replay::TooOld));
        assert_eq!(accept(&mut w, 5, 1), Err(Replay::TooOld));
    }

    #[test]
    fn window_reordered() {
        let mut w = ReplayWindow::default();
        for s in [10, 8, 9, 1, 300, 200, 299, 5] {
            assert_eq!(accept(&mut w, 1, s), Ok(()), "seq {s}");
        }
        for s in [10, 8, 9, 1, 300, 200, 299, 5] {
            assert_eq!(accept(&mut w, 1, s), Err(Replay::Duplicate), "seq {s}");
        }
        assert_eq!(accept(&mut w, 1, 2), Ok(()));
        // Edges of the window: 300 - 1023 is inside, 300 - 1024 is not.
        let mut w = ReplayWindow::default();
        accept(&mut w, 1, 2000).unwrap();
        assert_eq!(accept(&mut w, 1, 2000 - 1023), Ok(()));
        assert_eq!(accept(&mut w, 1, 2000 - 1023), Err(Replay::Duplicate));
        assert_eq!(accept(&mut w, 1, 2000 - 1024), Err(Replay::TooOld));
    }

    #[test]
    fn window_jump_and_shift_across_words() {
        let mut w = ReplayWindow::default();
        accept(&mut w, 1, 5).unwrap();
        accept(&mut w, 1, 70).unwrap(); // shift 65: crosses a word
        assert_eq!(accept(&mut w, 1, 5), Err(Replay::Duplicate));
        assert_eq!(accept(&mut w, 1, 6), Ok(()));
        accept(&mut w, 1, 1_000_000).unwrap(); // jump past the window
        assert_eq!(accept(&mut w, 1, 70), Err(Replay::TooOld));
        assert_eq!(accept(&mut w, 1, 999_999), Ok(()));
        assert_eq!(accept(&mut w, 1, 1_000_000), Err(Replay::Duplicate));
        // Every shift amount keeps exactly the accepted set.
        for by in 1..200u64 {
            let mut w = ReplayWindow::default();
            accept(&mut w, 1, 100).unwrap();
            accept(&mut w, 1, 100 + by).unwrap();
            for s in 1..100 + by {
                let want = if s == 100 {
                    Err(Replay::Duplicate)
                } else {
                    Ok(())
                };
                assert_eq!(w.check(1, s), want, "by {by} seq {s}");
            }
        }
    }

    #[test]
    fn echo_guard() {
        let mut g = EchoGuard::default();
        assert!(g.request(5, 100));
        assert!(!g.request(5, 100), "replayed request");
        assert!(!g.request(5, 99), "older request");
        assert!(g.request(5, 101));
        assert!(g.request(6, 1), "peer restarted");
        assert!(!g.request(5, 1_000_000), "earlier run");
    }

    #[test]
    fn window_epoch_change() {
        let mut w = ReplayWindow::default();
        accept(&mut w, 100, 50).unwrap();
        // The sender restarted: a newer epoch starts afresh at 1.
        assert_eq!(accept(&mut w, 101, 1), Ok(()));
        assert_eq!(accept(&mut w, 101, 1), Err(Replay::Duplicate));
        // The previous epoch's packets still in flight are accepted once...
        assert_eq!(accept(&mut w, 100, 51), Ok(()));
        assert_eq!(accept(&mut w, 100, 51), Err(Replay::Duplicate));
        assert_eq!(accept(&mut w, 100, 50), Err(Replay::Duplicate));
        // ...and after one more epoch they are refused.
        assert_eq!(accept(&mut w, 102, 1), Ok(()));
        assert_eq!(accept(&mut w, 100, 52), Err(Replay::StaleEpoch));
        assert_eq!(accept(&mut w, 101, 3), Ok(()));
        assert_eq!(accept(&mut w, 101, 1), Err(Replay::Duplicate));
        // A forged newer epoch that never authenticated does not move the window.
        assert_eq!(w.check(999, 1), Ok(()));
        assert_eq!(accept(&mut w, 102, 2), Ok(()));
        assert_eq!(accept(&mut w, 101, 4), Ok(()));
    }

    /// Across an upgrade: a window handed over decides as before; windows
    /// that cannot be handed over exactly become a floor that refuses
    /// everything at or below the newest number any of them took.
    #[test]
    fn windows_handed_over() {
        let mut w = ReplayWindow::default();
        accept(&mut w, 7, 10).unwrap();
        accept(&mut w, 8, 5).unwrap();
        accept(&mut w, 8, 3).unwrap();
        let json = serde_json::to_string(&w).unwrap();
        let mut back: ReplayWindow = serde_json::from_str(&json).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.newest(), (8, 5));
        assert_eq!(accept(&mut back, 8, 3), Err(Replay::Duplicate));
        assert_eq!(accept(&mut back, 8, 4), Ok(()));
        assert_eq!(accept(&mut back, 7, 10), Err(Replay::Duplicate));
        assert_eq!(accept(&mut back, 7, 9), Ok(()));
        let mut floor = ReplayWindow::seen_up_to(8, 5);
        for seq in [1, 4, 5] {
            assert_eq!(accept(&mut floor, 8, seq), Err(Replay::Duplicate));
        }
        assert_eq!(accept(&mut floor, 7, 11), Err(Replay::StaleEpoch));
        assert_eq!(accept(&mut floor, 8, 6), Ok(()));
        assert_eq!(accept(&mut floor, 9, 1), Ok(()));
        let g = EchoGuard::after(Some((8, 5)));
        assert_eq!(g.last(), Some((8, 5)));
        let mut g = g;
        assert!(!g.request(8, 5) && g.request(8, 6));
    }
}
