//! Reading a peer's key files (format in [`crate::core::crypto::Key::parse`]).
//!
//! A key file should be readable by the daemon's user only; one that the
//! group or others can read still works, with a warning, so that a
//! permissions slip does not take a link down. Neither the key nor any
//! part of the file's content is ever logged or put in an error.

use crate::config::{GatewayConfig, PeerConfig};
use crate::core::crypto::{Key, Keys};
use crate::core::handshake::{Handshake, Setup, REKEY_AFTER};
use crate::core::keypair::{self, PrivateKey};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::warn;
use zeroize::Zeroize;

/// Longest key file read: a key line plus generous whitespace.
const MAX_FILE: u64 = 4096;

/// The peer's keys, `None` when it has no `key_file`.
///
/// A peer with a `public_key` gets its keys from its handshake
/// ([`handshake`]); here it gets session keys without a session.
pub fn load(peer: &PeerConfig) -> Result<Option<Keys>, String> {
    if peer.public_key.is_some() {
        return Ok(Some(Keys::sessions(None, &[])));
    }
    let Some(send) = &peer.key_file else {
        return Ok(None);
    };
    let send = read(send).map_err(|e| format!("peer {}: key_file: {e}", peer.name))?;
    let accept = match &peer.accept_key_file {
        Some(p) => Some(read(p).map_err(|e| format!("peer {}: accept_key_file: {e}", peer.name))?),
        None => None,
    };
    Ok(Some(Keys::new(&send, accept.as_ref())))
}

/// The handshake of a peer with a `public_key`: this gateway's private key
/// (`[gateway] private_key_file`), the peer's public key and, from its
/// `key_file`, the pre-shared key to mix in. `None` for other peers.
pub fn handshake(
    gateway: &GatewayConfig,
    peer: &PeerConfig,
    now: Instant,
) -> Result<Option<Handshake>, String> {
    let Some(remote) = peer.public_key else {
        return Ok(None);
    };
    let Some(file) = &gateway.private_key_file else {
        return Err(format!(
            "peer {}: public_key needs [gateway] private_key_file",
            peer.name
        ));
    };
    let local = read_private(file).map_err(|e| format!("gateway private_key_file: {e}"))?;
    let psk = match &peer.key_file {
        Some(p) => Some(
            read(p)
                .map_err(|e| format!("peer {}: key_file: {e}", peer.name))?
                .to_bytes(),
        ),
        None => None,
    };
    let mut handshake = Handshake::new(
        Setup {
            local,
            remote,
            psk,
            rekey_after: rekey_after(),
        },
        now,
    );
    if let Some(n) = env_num("CROSSLINK_REKEY_AFTER_MESSAGES") {
        handshake.set_rekey_after_messages(n);
    }
    Ok(Some(handshake))
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// The rekey interval: [`REKEY_AFTER`], or `CROSSLINK_REKEY_AFTER` seconds
/// (at least 1; for the tests that watch many rekeys, as
/// `CROSSLINK_REKEY_AFTER_MESSAGES` is for the rekey by message count).
fn rekey_after() -> Duration {
    env_num("CROSSLINK_REKEY_AFTER")
        .filter(|&s| s >= 1)
        .map_or(REKEY_AFTER, Duration::from_secs)
}

/// Reads and parses one key file.
pub fn read(path: &Path) -> Result<Key, String> {
    read_with(path, |t| Key::parse(t).map_err(|e| e.to_string()))
}

/// Reads and parses a private key file (`[gateway] private_key_file`:
/// the base64 line `crosslink genkey` prints).
pub fn read_private(path: &Path) -> Result<PrivateKey, String> {
    read_with(path, |t| PrivateKey::parse(t).map_err(|e| e.to_string()))
}

/// A new private key: 32 bytes from the system's random source.
pub fn generate_private() -> Result<PrivateKey, String> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; keypair::KEY_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    let key = PrivateKey::from_bytes(bytes);
    bytes.zeroize();
    Ok(key)
}

/// Reads a key file with the size and permission checks, and parses it.
fn read_with<T>(path: &Path, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(format!(
            "{}: not a regular file of at most {MAX_FILE} bytes",
            path.display()
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        warn!(
            file = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            "key file is readable by group or others; chmod 600 it"
        );
    }
    let mut text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let key = parse(&text);
    text.zeroize();
    key.map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_refuses_without_echoing_content() {
        let dir = std::env::temp_dir().join(format!("crosslink-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.key");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(&good).is_ok());
        let bad = dir.join("bad.key");
        std::fs::write(&bad, "secretsecret").unwrap();
        let e = read(&bad).unwrap_err();
        assert!(
            e.contains("found 12 characters") && !e.contains("secret"),
            "{e}"
        );
        let e = read_private(&bad).unwrap_err();
        assert!(
            e.contains("found 12 characters") && !e.contains("secret"),
            "{e}"
        );
        let private = generate_private().unwrap();
        let pk = dir.join("private.key");
        std::fs::write(&pk, format!("{}\n", private.to_base64())).unwrap();
        assert_eq!(read_private(&pk).unwrap().public(), private.public());
        assert_ne!(generate_private().unwrap().public(), private.public());
        let e = read(&dir.join("missing.key")).unwrap_err();
        assert!(e.contains("missing.key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
