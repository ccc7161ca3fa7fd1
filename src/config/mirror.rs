//! `crosslink check FILE --against FAR`: do two gateways' configurations
//! mirror each other?
//!
//! A peer here matches the peer there that has a path with this path's
//! addresses swapped (its `local` is our `remote` and the other way
//! round); then every path of the pair must have its mirror, and what both
//! ends must agree on must be equal: whether traffic is sealed (and, when
//! both key files can be read here, the key itself), the BFD encapsulation
//! (single or multihop), its authentication, the inner MTU when either sets
//! one, and the policy when either end aggregates (the receiver's
//! resequencing waits for the sender's numbering). BFD timers that differ
//! still work (the session runs at the slower of the two), but are
//! reported, since a mirror was meant. Prefixes routed into the link at
//! both ends would loop and are reported too.

use super::{BfdConfig, Config, PeerConfig, Policy};
use crate::core::keypair::PrivateKey;
use std::path::Path;

/// Every difference between `ours` and `far` that breaks or weakens the
/// link, one line each, naming the keys on both sides. Key files that can
/// be read here are compared too.
pub fn compare(ours: &Config, far: &Config) -> Vec<String> {
    let private = |c: &Config| {
        c.gateway
            .private_key_file
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| PrivateKey::parse(&t).ok())
    };
    compare_with_keys(ours, far, private(ours).as_ref(), private(far).as_ref())
}

/// [`compare`] with each gateway's private key, when known: each side's
/// `public_key` for the other must be the other's.
pub fn compare_with_keys(
    ours: &Config,
    far: &Config,
    our_key: Option<&PrivateKey>,
    far_key: Option<&PrivateKey>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut matched = Vec::new();
    for peer in &ours.peers {
        match far.peers.iter().position(|q| mirrors(peer, q)) {
            Some(i) => {
                matched.push(i);
                let q = &far.peers[i];
                compare_peer(peer, q, &mut out);
                compare_public_keys(peer, q, our_key, far_key, &mut out);
            }
            None => out.push(format!(
                "peer.{}: no peer of {} has a path from {} to {}",
                peer.name,
                far.gateway.name,
                peer.paths
                    .first()
                    .map_or("-".to_string(), |p| p.remote.to_string()),
                peer.paths
                    .first()
                    .map_or("-".to_string(), |p| p.local.to_string()),
            )),
        }
    }
    for (i, q) in far.peers.iter().enumerate() {
        if !matched.contains(&i) {
            out.push(format!(
                "{}'s peer.{}: no peer here ({}) has its mirror",
                far.gateway.name, q.name, ours.gateway.name
            ));
        }
    }
    out
}

fn mirrors(a: &PeerConfig, b: &PeerConfig) -> bool {
    a.paths.iter().any(|p| {
        b.paths
            .iter()
            .any(|q| q.local == p.remote && q.remote == p.local)
    })
}

fn compare_peer(a: &PeerConfig, b: &PeerConfig, out: &mut Vec<String>) {
    let (ka, kb) = (format!("peer.{}", a.name), format!("peer.{}", b.name));
    for p in &a.paths {
        match b
            .paths
            .iter()
            .find(|q| q.local == p.remote && q.remote == p.local)
        {
            Some(q) => compare_bfd(
                &format!("{ka}.path.{}", p.name),
                &p.bfd,
                &format!("{kb}.path.{}", q.name),
                &q.bfd,
                out,
            ),
            None => out.push(format!(
                "{ka}.path.{}: the far peer.{} has no path with local = \"{}\" and remote = \"{}\"",
                p.name, b.name, p.remote, p.local
            )),
        }
    }
    for q in &b.paths {
        if !a
            .paths
            .iter()
            .any(|p| q.local == p.remote && q.remote == p.local)
        {
            out.push(format!(
                "far {kb}.path.{}: no path here with local = \"{}\" and remote = \"{}\"",
                q.name, q.remote, q.local
            ));
        }
    }
    match (&a.key_file, &b.key_file) {
        (Some(_), None) | (None, Some(_)) => out.push(format!(
            "{ka}.key_file / {kb}.key_file: set on one side only (sealed traffic is refused by a clear peer and the other way round)"
        )),
        (Some(x), Some(y)) => {
            if let (Some(x), Some(y)) = (read_key(x), read_key(y)) {
                if x != y {
                    out.push(format!(
                        "{ka}.key_file / {kb}.key_file: the two files hold different keys"
                    ));
                }
            }
        }
        (None, None) => {}
    }
    if (a.policy == Policy::Aggregate) != (b.policy == Policy::Aggregate) {
        out.push(format!(
            "{ka}.policy / {kb}.policy: \"{}\" vs \"{}\" (aggregate at one end only: that end's packets arrive spread over the paths, and the other end's sequence is not kept)",
            a.policy.as_str(),
            b.policy.as_str()
        ));
    }
    if a.mtu != b.mtu && (a.mtu.is_some() || b.mtu.is_some()) {
        out.push(format!(
            "{ka}.mtu / {kb}.mtu: {} vs {} (packets larger than the smaller one are dropped at that end)",
            show(a.mtu),
            show(b.mtu)
        ));
    }
    for r in &a.routes {
        if b.routes
            .iter()
            .any(|s| s.contains(r.addr) || r.contains(s.addr))
        {
            out.push(format!(
                "{ka}.routes / {kb}.routes: {r} is routed into the link at both ends (a loop)"
            ));
        }
    }
}

fn compare_public_keys(
    a: &PeerConfig,
    b: &PeerConfig,
    our_key: Option<&PrivateKey>,
    far_key: Option<&PrivateKey>,
    out: &mut Vec<String>,
) {
    let (ka, kb) = (format!("peer.{}", a.name), format!("peer.{}", b.name));
    match (&a.public_key, &b.public_key) {
        (Some(_), None) | (None, Some(_)) => out.push(format!(
            "{ka}.public_key / {kb}.public_key: set on one side only (one end runs the handshake, the other does not)"
        )),
        (Some(theirs), Some(ours)) => {
            if far_key.is_some_and(|k| k.public() != *theirs) {
                out.push(format!(
                    "{ka}.public_key: not the public key of the far gateway's private_key_file"
                ));
            }
            if our_key.is_some_and(|k| k.public() != *ours) {
                out.push(format!(
                    "far {kb}.public_key: not the public key of this gateway's private_key_file"
                ));
            }
        }
        (None, None) => {}
    }
}

fn compare_bfd(ka: &str, a: &BfdConfig, kb: &str, b: &BfdConfig, out: &mut Vec<String>) {
    let mut differ = |key: &str, x: String, y: String, why: &str| {
        if x != y {
            out.push(format!("{ka}.bfd.{key} / {kb}.bfd.{key}: {x} vs {y}{why}"));
        }
    };
    differ(
        "hop",
        a.hop.as_str().into(),
        b.hop.as_str().into(),
        " (single hop and multihop use different ports: no session)",
    );
    differ(
        "tx_interval",
        super::format_duration(a.tx_interval),
        super::format_duration(b.tx_interval),
        " (works, at the slower of the two)",
    );
    differ(
        "rx_interval",
        super::format_duration(a.rx_interval),
        super::format_duration(b.rx_interval),
        " (works, at the slower of the two)",
    );
    differ(
        "multiplier",
        a.multiplier.to_string(),
        b.multiplier.to_string(),
        " (each end detects with its own)",
    );
    let auth = |c: &BfdConfig| {
        c.auth.as_ref().map_or("none".to_string(), |x| {
            format!("{:?} key {}", x.auth_type, x.key_id)
        })
    };
    differ(
        "auth",
        auth(a),
        auth(b),
        " (sessions with different authentication never come up)",
    );
    if a.passive && b.passive {
        out.push(format!(
            "{ka}.bfd.passive / {kb}.bfd.passive: both passive, no session ever starts"
        ));
    }
}

fn show(v: Option<u16>) -> String {
    v.map_or("auto".to_string(), |m| m.to_string())
}

/// A key file's content, trimmed, when it can be read here.
fn read_key(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}
