//! BFD authentication (RFC 5880 §6.7), sans-IO.
//!
//! Why a module of its own: the keyed types hash the *wire bytes* of the whole packet
//! with the key written into the Digest field (§6.7.3, §6.7.4). That is the RFC's
//! construction — a plain digest over packet-plus-key, not HMAC — so both signing and
//! verifying work on bytes, after the codec has done its part. The sequence-number
//! bookkeeping (bfd.XmitAuthSeq, bfd.RcvAuthSeq, bfd.AuthSeqKnown, §6.8.1) lives here
//! too, so the session only asks "sign this" and "is this authentic".
//!
//! The secret never leaves this module: it is not printed by `Debug`, and
//! [`Auth::seal`] is the only place it is copied into a packet (and, for the keyed
//! types, immediately overwritten by the digest).

use std::fmt;
use std::time::{Duration, Instant};

use md5::{Digest as _, Md5};
use sha1::Sha1;

use crate::core::wire::bfd::{AuthSection, AuthType, HEADER_LEN};

/// Digest field offset inside a packet with a keyed auth section (§4.3, §4.4):
/// header, then Type, Len, Key ID, Reserved, Sequence Number.
const DIGEST_AT: usize = HEADER_LEN + 8;
const MD5_LEN: usize = 16;
const SHA1_LEN: usize = 20;
/// Longest packet we authenticate: header plus the SHA1 section.
const MAX_LEN: usize = HEADER_LEN + 8 + SHA1_LEN;

/// Why a configured secret cannot be used with its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the secret is empty")]
    Empty,
    #[error("the secret is {len} bytes; {kind} allows at most {max}")]
    TooLong {
        len: usize,
        max: usize,
        kind: &'static str,
    },
}

/// Why an authenticated packet was refused (labels for the drop counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AuthError {
    /// Auth Type differs from bfd.AuthType.
    #[error("auth type {0} differs from the configured type")]
    WrongType(u8),
    /// Key ID is not the configured one.
    #[error("key id {0} is not configured")]
    WrongKeyId(u8),
    /// Password or digest does not match.
    #[error("password or digest mismatch")]
    BadDigest,
    /// Sequence number outside the accepted window (replay or too far ahead).
    #[error("sequence number {got} outside the window after {last}")]
    Sequence { got: u32, last: u32 },
    /// The packet's bytes were not available to recompute the digest.
    #[error("raw packet bytes unavailable for digest check")]
    NoBytes,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::WrongType(_) => "auth_wrong_type",
            AuthError::WrongKeyId(_) => "auth_wrong_key_id",
            AuthError::BadDigest => "auth_bad_digest",
            AuthError::Sequence { .. } => "auth_sequence",
            AuthError::NoBytes => "auth_no_bytes",
        }
    }
}

/// One session's authentication state: bfd.AuthType, the key (bfd.AuthKey with its
/// Key ID), bfd.XmitAuthSeq, bfd.RcvAuthSeq and bfd.AuthSeqKnown.
#[derive(Clone)]
pub struct Auth {
    kind: AuthType,
    key_id: u8,
    secret: Vec<u8>,
    xmit_seq: u32,
    rcv_seq: u32,
    seq_known: bool,
    last_accepted: Option<Instant>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("kind", &self.kind)
            .field("key_id", &self.key_id)
            .field("secret", &"<redacted>")
            .field("xmit_seq", &self.xmit_seq)
            .field("rcv_seq", &self.rcv_seq)
            .field("seq_known", &self.seq_known)
            .finish()
    }
}

/// Largest secret for each type: 16 bytes password (§4.2), 16 bytes MD5 key (§4.3),
/// 20 bytes SHA1 key (§4.4).
fn max_secret(kind: AuthType) -> usize {
    match kind {
        AuthType::SimplePassword | AuthType::KeyedMd5 | AuthType::MeticulousKeyedMd5 => MD5_LEN,
        AuthType::KeyedSha1 | AuthType::MeticulousKeyedSha1 => SHA1_LEN,
    }
}

fn kind_name(kind: AuthType) -> &'static str {
    match kind {
        AuthType::SimplePassword => "simple password",
        AuthType::KeyedMd5 => "keyed MD5",
        AuthType::MeticulousKeyedMd5 => "meticulous keyed MD5",
        AuthType::KeyedSha1 => "keyed SHA1",
        AuthType::MeticulousKeyedSha1 => "meticulous keyed SHA1",
    }
}

fn meticulous(kind: AuthType) -> bool {
    matches!(
        kind,
        AuthType::MeticulousKeyedMd5 | AuthType::MeticulousKeyedSha1
    )
}

fn digest_len(kind: AuthType) -> usize {
    match kind {
        AuthType::SimplePassword => 0,
        AuthType::KeyedMd5 | AuthType::MeticulousKeyedMd5 => MD5_LEN,
        AuthType::KeyedSha1 | AuthType::MeticulousKeyedSha1 => SHA1_LEN,
    }
}

/// Strips one trailing line ending from a secret read from a file, so that
/// `echo secret > file` works; every other byte counts.
pub fn trim_secret(raw: &[u8]) -> &[u8] {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    raw.strip_suffix(b"\r").unwrap_or(raw)
}

impl Auth {
    /// A new authentication state. `initial_seq` is bfd.XmitAuthSeq's start value,
    /// which §6.8.1 wants random.
    pub fn new(
        kind: AuthType,
        key_id: u8,
        secret: &[u8],
        initial_seq: u32,
    ) -> Result<Auth, KeyError> {
        if secret.is_empty() {
            return Err(KeyError::Empty);
        }
        let max = max_secret(kind);
        if secret.len() > max {
            return Err(KeyError::TooLong {
                len: secret.len(),
                max,
                kind: kind_name(kind),
            });
        }
        Ok(Auth {
            kind,
            key_id,
            secret: secret.to_vec(),
            xmit_seq: initial_seq,
            rcv_seq: 0,
            seq_known: false,
            last_accepted: None,
        })
    }

    /// bfd.XmitAuthSeq, bfd.RcvAuthSeq and bfd.AuthSeqKnown.
    pub fn sequences(&self) -> (u32, u32, bool) {
        (self.xmit_seq, self.rcv_seq, self.seq_known)
    }

    /// Takes over the sequence numbers of the session this one replaces
    /// (an upgrade): the next packet sent continues its sequence.
    pub fn set_sequences(&mut self, xmit: u32, rcv: u32, known: bool) {
        self.xmit_seq = xmit;
        self.rcv_seq = rcv;
        self.seq_known = known;
    }

    pub fn kind(&self) -> AuthType {
        self.kind
    }

    /// The auth section for the next packet. The digest slot holds zeros: the real
    /// digest is written by [`seal`](Self::seal) over the emitted bytes.
    ///
    /// §6.7.3/§6.7.4: the meticulous types increment bfd.XmitAuthSeq for every
    /// packet; for the non-meticulous ones the RFC allows it ("MAY"), and we do it
    /// too, which keeps a replayed packet from staying valid for long.
    pub fn next_section(&mut self) -> AuthSection {
        if self.kind == AuthType::SimplePassword {
            return AuthSection {
                auth_type: self.kind as u8,
                key_id: self.key_id,
                sequence: 0,
                data: self.secret.clone(),
            };
        }
        let sequence = self.xmit_seq;
        self.xmit_seq = self.xmit_seq.wrapping_add(1);
        AuthSection {
            auth_type: self.kind as u8,
            key_id: self.key_id,
            sequence,
            data: vec![0; digest_len(self.kind)],
        }
    }

    /// Writes the digest into an emitted packet (§6.7.3, §6.7.4 transmission): the
    /// key, zero-padded to the digest size, goes into the Digest field, the digest
    /// is computed over the whole packet (its Length bytes) and replaces the key.
    /// Simple password needs nothing. Returns false if `packet` is not shaped like
    /// a packet with this type's auth section (nothing is written then).
    pub fn seal(&self, packet: &mut [u8]) -> bool {
        let dlen = digest_len(self.kind);
        if dlen == 0 {
            return true;
        }
        let Some(slot) = packet.get_mut(DIGEST_AT..DIGEST_AT + dlen) else {
            return false;
        };
        slot.fill(0);
        slot[..self.secret.len()].copy_from_slice(&self.secret);
        let digest = hash(self.kind, packet);
        if let Some(slot) = packet.get_mut(DIGEST_AT..DIGEST_AT + dlen) {
            slot.copy_from_slice(&digest[..dlen]);
        }
        true
    }

    /// Authenticates a received packet (§6.7.2–§6.7.4 reception). `section` is the
    /// parsed auth section, `raw` the packet's bytes (up to its Length field), needed
    /// for the keyed types. `detect_mult` is the packet's Detect Mult, which sizes
    /// the sequence window. On success the receive sequence state is updated.
    pub fn verify(
        &mut self,
        section: &AuthSection,
        raw: Option<&[u8]>,
        detect_mult: u8,
        detection_time: Duration,
        now: Instant,
    ) -> Result<(), AuthError> {
        if section.auth_type != self.kind as u8 {
            return Err(AuthError::WrongType(section.auth_type));
        }
        if section.key_id != self.key_id {
            return Err(AuthError::WrongKeyId(section.key_id));
        }
        if self.kind == AuthType::SimplePassword {
            return if ct_eq(&section.data, &self.secret) {
                self.last_accepted = Some(now);
                Ok(())
            } else {
                Err(AuthError::BadDigest)
            };
        }
        self.forget_stale_sequence(detection_time, now);
        if self.seq_known {
            self.check_window(section.sequence, detect_mult)?;
        }
        let raw = raw.ok_or(AuthError::NoBytes)?;
        if !self.digest_matches(raw, &section.data) {
            return Err(AuthError::BadDigest);
        }
        self.rcv_seq = section.sequence;
        self.seq_known = true;
        self.last_accepted = Some(now);
        Ok(())
    }

    /// §6.8.1: bfd.AuthSeqKnown "MUST be set to zero ... if no packets have been
    /// received on this session for at least twice the Detection Time".
    fn forget_stale_sequence(&mut self, detection_time: Duration, now: Instant) {
        let Some(last) = self.last_accepted else {
            return;
        };
        if detection_time.is_zero() {
            return;
        }
        if now.saturating_duration_since(last) >= detection_time.saturating_mul(2) {
            self.seq_known = false;
        }
    }

    /// The window of §6.7.3: RcvAuthSeq .. RcvAuthSeq + 3 × Detect Mult inclusive for
    /// the keyed types, starting at RcvAuthSeq + 1 for the meticulous ones, in
    /// circular 32-bit arithmetic.
    fn check_window(&self, got: u32, detect_mult: u8) -> Result<(), AuthError> {
        let ahead = got.wrapping_sub(self.rcv_seq);
        let span = 3 * u32::from(detect_mult);
        let lowest = u32::from(meticulous(self.kind));
        if ahead < lowest || ahead > span {
            return Err(AuthError::Sequence {
                got,
                last: self.rcv_seq,
            });
        }
        Ok(())
    }

    fn digest_matches(&self, raw: &[u8], received: &[u8]) -> bool {
        let dlen = digest_len(self.kind);
        let mut copy = [0u8; MAX_LEN];
        let Some(copy) = copy.get_mut(..raw.len()) else {
            return false;
        };
        copy.copy_from_slice(raw);
        let Some(slot) = copy.get_mut(DIGEST_AT..DIGEST_AT + dlen) else {
            return false;
        };
        slot.fill(0);
        slot[..self.secret.len()].copy_from_slice(&self.secret);
        let digest = hash(self.kind, copy);
        ct_eq(&digest[..dlen], received)
    }
}

/// MD5 or SHA1 of `bytes`, in a 20-byte buffer (MD5 uses the first 16).
fn hash(kind: AuthType, bytes: &[u8]) -> [u8; SHA1_LEN] {
    let mut out = [0u8; SHA1_LEN];
    match kind {
        AuthType::KeyedSha1 | AuthType::MeticulousKeyedSha1 => {
            out.copy_from_slice(&Sha1::digest(bytes));
        }
        _ => out[..MD5_LEN].copy_from_slice(&Md5::digest(bytes)),
    }
    out
}

/// Equality without an early exit, so timing does not reveal the matching prefix.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;
