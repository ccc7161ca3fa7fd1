//! X25519 key pairs for the handshake, sans-IO.
//!
//! Keys are written as `wg` writes them: the standard base64 (44
//! characters, padded) of 32 bytes. `crosslink genkey` prints a private
//! key, `crosslink pubkey` reads one on standard input and prints its
//! public key. A gateway names its own private key in
//! `[gateway] private_key_file`; each peer names the far gateway's public
//! key in `public_key`.
//!
//! A private key is any 32 bytes; X25519 clamps it when it is used
//! (RFC 7748 section 5), so generating one is drawing 32 random bytes. The
//! caller draws them (the core does no I/O): see
//! [`crate::io::keys::generate_private`]. The public key is the clamped
//! scalar times the curve's base point. Private keys are zeroed when
//! dropped and never printed by `Debug`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use curve25519_dalek::montgomery::MontgomeryPoint;
use std::fmt;
use thiserror::Error;
use zeroize::Zeroize;

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a key's text was refused. Never includes the text.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum KeyPairError {
    #[error("expected the base64 of 32 bytes (44 characters); found {0} characters")]
    BadLength(usize),
    #[error("not valid base64")]
    BadEncoding,
    #[error("base64 decodes to {0} bytes; a key has exactly 32")]
    WrongSize(usize),
    #[error("the all-zero public key is not a key")]
    Zero,
}

/// Decodes the base64 of exactly 32 bytes, surrounding whitespace ignored.
fn decode(text: &str) -> Result<[u8; KEY_LEN], KeyPairError> {
    let t = text.trim();
    if t.len() != 44 {
        return Err(KeyPairError::BadLength(t.chars().count()));
    }
    let mut buf = [0u8; 33];
    let n = STANDARD
        .decode_slice(t.as_bytes(), &mut buf)
        .map_err(|_| KeyPairError::BadEncoding);
    let out = match n {
        Ok(KEY_LEN) => {
            let mut out = [0u8; KEY_LEN];
            out.copy_from_slice(&buf[..KEY_LEN]);
            Ok(out)
        }
        Ok(n) => Err(KeyPairError::WrongSize(n)),
        Err(e) => Err(e),
    };
    buf.zeroize();
    out
}

/// A gateway's X25519 private key.
#[derive(Clone)]
pub struct PrivateKey([u8; KEY_LEN]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PrivateKey {
    /// A private key from 32 random bytes (any 32 bytes are a key).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> PrivateKey {
        PrivateKey(bytes)
    }

    /// Parses the base64 form (a private key file's one line).
    pub fn parse(text: &str) -> Result<PrivateKey, KeyPairError> {
        decode(text).map(PrivateKey)
    }

    /// The raw bytes, for the handshake.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The base64 form, as `crosslink genkey` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(MontgomeryPoint::mul_base_clamped(self.0).to_bytes())
    }
}

/// A gateway's X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl PublicKey {
    /// A public key from its raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> PublicKey {
        PublicKey(bytes)
    }

    /// Parses the base64 form; the all-zero point is refused.
    pub fn parse(text: &str) -> Result<PublicKey, KeyPairError> {
        let bytes = decode(text)?;
        if bytes == [0u8; KEY_LEN] {
            return Err(KeyPairError::Zero);
        }
        Ok(PublicKey(bytes))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let k = PrivateKey::from_bytes(private);
        assert_eq!(k.public().as_bytes(), &public);
        let text = k.to_base64();
        assert_eq!(text.len(), 44);
        let again = PrivateKey::parse(&format!("  {text}\n")).unwrap();
        assert_eq!(again.public(), k.public());
        let p = PublicKey::parse(&k.public().to_base64()).unwrap();
        assert_eq!(p, k.public());
    }

    #[test]
    fn refuses_bad_text_without_echoing_it() {
        assert_eq!(
            PublicKey::parse("secretsecret"),
            Err(KeyPairError::BadLength(12))
        );
        let bad = "!".repeat(44);
        let e = PrivateKey::parse(&bad).unwrap_err();
        assert_eq!(e, KeyPairError::BadEncoding);
        assert!(!e.to_string().contains('!'));
        // 44 characters that decode to 31 bytes (two padding characters).
        let short = format!("{}==", "A".repeat(42));
        assert_eq!(PublicKey::parse(&short), Err(KeyPairError::WrongSize(31)));
        let zero = STANDARD.encode([0u8; 32]);
        assert_eq!(PublicKey::parse(&zero), Err(KeyPairError::Zero));
        assert!(format!("{:?}", PrivateKey::from_bytes([7; 32])).contains("redacted"));
    }

    fn hex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
