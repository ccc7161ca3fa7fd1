//! Configuration: TOML text -> validated, typed [`Config`].
//!
//! The file format is the one in the product specification (`[gateway]`, `[metrics]`,
//! `[bfd]`, `[[peer]]`, `[[peer.path]]`, `[peer.path.bfd]`). Loading happens in three steps:
//!
//! 1. `toml` deserializes the text (`parse`) into private `Raw*` structs that mirror the file
//!    one to one (`deny_unknown_fields`, so a typo is an error). Values with a syntax of
//!    their own (durations, prefixes, socket addresses, enums) are checked here, by their
//!    `Deserialize` impls, so the error carries the byte span of the offending value.
//! 2. `validate` checks the rules that span several values (ranges, uniqueness, address
//!    families) and resolves defaults, including the per-path BFD settings: the gateway's
//!    `[bfd]` merged key by key with the path's `[peer.path.bfd]`, and builds the
//!    typed [`Config`] (`types`) that the rest of the daemon reads.
//! 3. Any error is turned into a [`ConfigError`] naming file, line and key. Step 1 errors
//!    carry a byte offset, which is mapped back to a key path by walking the span-keeping
//!    `toml_edit::Document` (`parse` too); step 2 errors carry a key path, which is located in the same
//!    document. Array-of-table entries are named by their `name` key when they have one,
//!    so keys read `peer.gcp.path.cci-1.remote` rather than `peer[0].path[0].remote`.
//!
//! Nothing here panics on input: no `unwrap`, no indexing by untrusted numbers.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::core::fec::Code;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Default path of the daemon's control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/crosslink/crosslink.sock";
/// Default BFD desired minimum TX interval and required minimum RX interval.
pub const DEFAULT_BFD_INTERVAL: Duration = Duration::from_millis(10);
/// Default BFD detection multiplier.
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;
/// Default minimum received TTL for multihop BFD (RFC 5883 leaves it to configuration).
pub const DEFAULT_MIN_TTL: u8 = 254;
/// Default DSCP of BFD control packets: CS6 (network control), as routers send BFD.
pub const DEFAULT_BFD_DSCP: u8 = 48;
/// Default time a recovered path must stay up before flows return to it.
pub const DEFAULT_REVERT_HOLD: Duration = Duration::from_secs(2);
/// Default largest loss ratio of a path's sending direction: 1 %, in millionths.
pub const DEFAULT_MAX_LOSS_PPM: u32 = 10_000;
/// Default time a degraded path must stay good before it carries traffic again.
pub const DEFAULT_SLA_HOLD: Duration = Duration::from_secs(10);
/// Default time between two path-quality probes: 100 a second, enough to
/// see a 2 % loss within a second on a path that carries nothing else.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Default moves of a peer's traffic for quality allowed per minute.
pub const DEFAULT_MAX_MOVES_PER_MINUTE: u32 = 6;

const MIN_BFD_INTERVAL: Duration = Duration::from_millis(1);
const MAX_BFD_INTERVAL: Duration = Duration::from_secs(60);
const MAX_REVERT_HOLD: Duration = Duration::from_secs(3600);
/// The longest `reorder_wait` accepted.
const MAX_REORDER_WAIT: Duration = Duration::from_secs(1);
const MIN_MTU_V4: u16 = 576;
const MIN_MTU_V6: u16 = 1280;
/// Linux `IFNAMSIZ` minus the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;
/// Paths a `fast_path` peer may have: the size of the kernel fast path's
/// path maps ([`crate::io::fastpath`]).
pub const FAST_PATH_MAX_PATHS: usize = 32;

pub mod mirror;
mod parse;
#[cfg(test)]
mod tests;
mod types;
mod validate;

use parse::*;
pub use parse::{format_duration, parse_duration};
pub use types::*;
use validate::*;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// A configuration problem, displayed as `FILE:LINE: key: what is wrong`
/// (or `FILE: key: what is wrong` when no line applies, e.g. an I/O error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `peer.gcp.path.cci-1.remote`; `io` or `syntax` for errors
    /// that are not about one key.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}: {}", self.file, line, self.key, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

impl Config {
    /// Reads and parses `path`. Errors name the file as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file_name.clone(),
            line: None,
            key: "io".to_string(),
            message: e.to_string(),
        })?;
        Config::parse(&text, &file_name)
    }

    /// Parses and validates `text`; `file_name` is used in error messages only.
    pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigError> {
        let raw = match toml::from_str::<RawConfig>(text) {
            Ok(raw) => raw,
            Err(e) => return Err(deserialize_error(text, file_name, &e)),
        };
        validate(raw).map_err(|inv| {
            let doc = toml_edit::Document::parse(text).ok();
            let (key, offset) = locate(doc.as_ref(), &inv.path);
            ConfigError {
                file: file_name.to_string(),
                line: offset.map(|o| line_of(text, o)).or(Some(1)),
                key,
                message: inv.message,
            }
        })
    }

    /// What is valid but likely wrong, one line each: a peer route (other
    /// than a default route) that covers a path's far address would route
    /// that path's own datagrams into a TUN, unless the host has a more
    /// specific route to the far address (a connected subnet does).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for peer in &self.peers {
            for route in peer.routes.iter().filter(|r| r.len > 0) {
                for q in &self.peers {
                    for p in q.paths.iter().filter(|p| route.contains(p.remote.ip())) {
                        out.push(format!(
                            "peer.{}.routes: {route} covers {}, the far address of path {} of peer {}: unless this host has a more specific route to it, the path's own datagrams go into the TUN (route only the prefixes behind the far gateway)",
                            peer.name,
                            p.remote.ip(),
                            p.name,
                            q.name
                        ));
                    }
                }
            }
        }
        out
    }

    /// Checks that every referenced secret file (BFD `auth.secret_file`, peer `key_file`)
    /// exists, is a regular file and can be opened for reading. Not part of [`Config::parse`],
    /// so configs can be validated on another host; `crosslink check` and `run` call it.
    /// Each error's `file` is the offending secret file and `key` the config key naming it.
    pub fn check_files(&self) -> Vec<ConfigError> {
        let mut wanted: Vec<(String, &Path)> = Vec::new();
        if let Some(k) = &self.gateway.private_key_file {
            wanted.push(("gateway.private_key_file".into(), k));
        }
        if let Some(auth) = &self.bfd.auth {
            wanted.push(("bfd.auth.secret_file".into(), &auth.secret_file));
        }
        for peer in &self.peers {
            if let Some(k) = &peer.key_file {
                wanted.push((format!("peer.{}.key_file", peer.name), k));
            }
            if let Some(k) = &peer.accept_key_file {
                wanted.push((format!("peer.{}.accept_key_file", peer.name), k));
            }
            for path in &peer.paths {
                if let Some(auth) = &path.bfd.auth {
                    let inherited = self.bfd.auth.as_ref() == Some(auth);
                    if !inherited {
                        let key =
                            format!("peer.{}.path.{}.bfd.auth.secret_file", peer.name, path.name);
                        wanted.push((key, &auth.secret_file));
                    }
                }
            }
        }
        let mut seen = HashSet::new();
        wanted
            .into_iter()
            .filter(|(_, p)| seen.insert(p.to_path_buf()))
            .filter_map(|(key, p)| {
                check_readable(p).err().map(|message| ConfigError {
                    file: p.display().to_string(),
                    line: None,
                    key,
                    message,
                })
            })
            .collect()
    }

    /// A one-screen human summary, printed by `crosslink check`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let g = &self.gateway;
        out.push_str(&format!(
            "gateway {} (control socket {})\n",
            g.name,
            g.control_socket.display()
        ));
        match &self.metrics {
            Some(m) => out.push_str(&format!("metrics http://{}/metrics\n", m.listen)),
            None => out.push_str("metrics disabled\n"),
        }
        out.push_str(&format!("bfd defaults: {}\n", bfd_summary(&self.bfd, None)));
        for peer in &self.peers {
            peer_summary(&mut out, peer, self.bfd.auth.as_ref());
        }
        out
    }

    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }
}

fn check_readable(p: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(p).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    std::fs::File::open(p)
        .map(|_| ())
        .map_err(|e| format!("cannot read: {e}"))
}

fn bfd_summary(b: &BfdConfig, default_auth: Option<&BfdAuthConfig>) -> String {
    let mut s = format!(
        "tx {} rx {} x{}, {} hop",
        format_duration(b.tx_interval),
        format_duration(b.rx_interval),
        b.multiplier,
        b.hop.as_str()
    );
    if b.hop == Hop::Multi {
        s.push_str(&format!(" (min ttl {})", b.min_ttl));
    }
    if b.passive {
        s.push_str(", passive");
    }
    if b.offload {
        s.push_str(", receive offload");
    }
    if let Some(a) = b.auth.as_ref().filter(|&a| Some(a) != default_auth) {
        s.push_str(&format!(", auth {} key {}", a.auth_type.as_str(), a.key_id));
    }
    s
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn peer_summary(out: &mut String, peer: &PeerConfig, default_auth: Option<&BfdAuthConfig>) {
    out.push_str(&format!("\npeer {}: tun {}", peer.name, peer.tun));
    if !peer.tun_addresses.is_empty() {
        out.push_str(&format!(" ({})", join(&peer.tun_addresses)));
    }
    if let Some(mtu) = peer.mtu {
        out.push_str(&format!(" mtu {mtu}"));
    }
    if let Some(metric) = peer.route_metric {
        out.push_str(&format!(" route_metric {metric}"));
    }
    if peer.fast_path {
        out.push_str(" fast_path");
    }
    out.push_str(&format!(
        ", policy {}, revert_hold {}, {}\n",
        peer.policy,
        format_duration(peer.revert_hold),
        if peer.public_key.is_some() && peer.key_file.is_some() {
            "encrypted (handshake with public_key, key_file mixed in)"
        } else if peer.public_key.is_some() {
            "encrypted (handshake with public_key)"
        } else if peer.key_file.is_some() {
            "encrypted"
        } else {
            "no key_file (cleartext)"
        }
    ));
    let routes = if peer.routes.is_empty() {
        "none".to_string()
    } else {
        join(&peer.routes)
    };
    out.push_str(&format!("  routes: {routes}\n"));
    out.push_str(&format!("  sla: {}\n", sla_summary(&peer.sla)));
    for p in &peer.paths {
        let via = p
            .interface
            .as_deref()
            .map(|i| format!(" via {i}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  path {}: {} -> {}{}, priority {}, weight {}, bfd {}\n",
            p.name,
            p.local,
            p.remote,
            via,
            p.priority,
            p.weight,
            bfd_summary(&p.bfd, default_auth)
        ));
        if p.sla != peer.sla {
            out.push_str(&format!("    sla: {}\n", sla_summary(&p.sla)));
        }
    }
}

fn sla_summary(s: &SlaConfig) -> String {
    let limit = |d: Option<Duration>| d.map_or("off".to_string(), format_duration);
    format!(
        "max_loss {}%, max_rtt {}, max_jitter {}, hold {}, probes every {}{}, at most {} moves a minute",
        f64::from(s.max_loss_ppm) / 10_000.0,
        limit(s.max_rtt),
        limit(s.max_jitter),
        format_duration(s.hold),
        format_duration(s.probe_interval),
        s.idle_probe_interval
            .map_or(String::new(), |i| format!(" ({} while idle)", format_duration(i))),
        s.max_moves_per_minute
    )
}
