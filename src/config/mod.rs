//! Configuration: TOML text -> validated, typed [`Config`].
//!
//! The file format is the one in the product specification (`[gateway]`, `[metrics]`,
//! `[bfd]`, `[[peer]]`, `[[peer.path]]`, `[peer.path.bfd]`). Loading happens in three steps:
//!
//! 1. `toml` deserializes the text into private `Raw*` structs that mirror the file
//!    one to one (`deny_unknown_fields`, so a typo is an error). Values with a syntax of
//!    their own (durations, prefixes, socket addresses, enums) are checked here, by their
//!    `Deserialize` impls, so the error carries the byte span of the offending value.
//! 2. `validate` checks the rules that span several values (ranges, uniqueness, address
//!    families) and resolves defaults, including the per-path BFD settings: the gateway's
//!    `[bfd]` merged key by key with the path's `[peer.path.bfd]`.
//! 3. Any error is turned into a [`ConfigError`] naming file, line and key. Step 1 errors
//!    carry a byte offset, which is mapped back to a key path by walking the span-keeping
//!    `toml_edit::Document`; step 2 errors carry a key path, which is located in the same
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
/// Default time a recovered path must stay up before flows return to it.
pub const DEFAULT_REVERT_HOLD: Duration = Duration::from_secs(2);

const MIN_BFD_INTERVAL: Duration = Duration::from_millis(1);
const MAX_BFD_INTERVAL: Duration = Duration::from_secs(60);
const MAX_REVERT_HOLD: Duration = Duration::from_secs(3600);
const MIN_MTU_V4: u16 = 576;
const MIN_MTU_V6: u16 = 1280;
/// Linux `IFNAMSIZ` minus the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;

// ---------------------------------------------------------------------------------------
// Public, validated types
// ---------------------------------------------------------------------------------------

/// A validated configuration, with every default resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub gateway: GatewayConfig,
    /// `None` when the `[metrics]` table is absent: no metrics endpoint.
    pub metrics: Option<MetricsConfig>,
    /// The gateway-wide `[bfd]` defaults, resolved. Each path carries its own merged copy.
    pub bfd: BfdConfig,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub name: String,
    pub control_socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// BFD encapsulation: RFC 5881 single hop (UDP 3784, TTL 255) or RFC 5883 multihop (UDP 4784).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hop {
    #[default]
    Single,
    Multi,
}

impl Hop {
    pub fn as_str(self) -> &'static str {
        match self {
            Hop::Single => "single",
            Hop::Multi => "multi",
        }
    }

    /// The BFD control packet destination port for this mode.
    pub fn udp_port(self) -> u16 {
        match self {
            Hop::Single => 3784,
            Hop::Multi => 4784,
        }
    }
}

/// RFC 5880 section 4.1 authentication types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BfdAuthType {
    SimplePassword,
    KeyedMd5,
    MeticulousKeyedMd5,
    KeyedSha1,
    MeticulousKeyedSha1,
}

impl BfdAuthType {
    pub fn as_str(self) -> &'static str {
        match self {
            BfdAuthType::SimplePassword => "simple-password",
            BfdAuthType::KeyedMd5 => "keyed-md5",
            BfdAuthType::MeticulousKeyedMd5 => "meticulous-keyed-md5",
            BfdAuthType::KeyedSha1 => "keyed-sha1",
            BfdAuthType::MeticulousKeyedSha1 => "meticulous-keyed-sha1",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdAuthConfig {
    pub auth_type: BfdAuthType,
    pub key_id: u8,
    /// Not read at parse time; see [`Config::check_files`].
    pub secret_file: PathBuf,
}

/// Resolved BFD session parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdConfig {
    /// Desired Min TX Interval.
    pub tx_interval: Duration,
    /// Required Min RX Interval.
    pub rx_interval: Duration,
    /// Detect Mult.
    pub multiplier: u8,
    pub hop: Hop,
    /// Passive role (RFC 5880 section 6.1): wait for the remote system to speak first.
    pub passive: bool,
    /// Multihop only: minimum TTL accepted on received control packets.
    pub min_ttl: u8,
    pub auth: Option<BfdAuthConfig>,
}

impl Default for BfdConfig {
    fn default() -> Self {
        BfdConfig {
            tx_interval: DEFAULT_BFD_INTERVAL,
            rx_interval: DEFAULT_BFD_INTERVAL,
            multiplier: DEFAULT_BFD_MULTIPLIER,
            hop: Hop::Single,
            passive: false,
            min_ttl: DEFAULT_MIN_TTL,
            auth: None,
        }
    }
}

/// How a peer's flows are spread over its paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    #[default]
    ActiveBackup,
    Balance,
    Duplicate,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::ActiveBackup => "active-backup",
            Policy::Balance => "balance",
            Policy::Duplicate => "duplicate",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IP prefix such as `10.20.0.0/16` or `fd00::/64`. Parsing checks the length against
/// the family but allows host bits (an interface address keeps them); routes are checked
/// with [`Prefix::is_network`] during validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// The family's maximum length: 32 or 128.
    pub fn max_len(addr: IpAddr) -> u8 {
        match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The prefix with its host bits cleared.
    pub fn network(&self) -> Prefix {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Prefix {
            addr,
            len: self.len,
        }
    }

    /// True when no host bits are set.
    pub fn is_network(&self) -> bool {
        self.network().addr == self.addr
    }

    /// True when `addr` is inside this prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let other = Prefix {
            addr,
            len: self.len,
        };
        addr.is_ipv4() == self.addr.is_ipv4() && other.network().addr == self.network().addr
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("invalid prefix \"{s}\": expected ADDRESS/LENGTH, e.g. \"10.20.0.0/16\" or \"fd00::/64\"")
        };
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let max = Prefix::max_len(addr);
        match len.parse::<u8>() {
            Ok(len) if len <= max => Ok(Prefix { addr, len }),
            _ => Err(format!(
                "invalid prefix \"{s}\": length must be 0..={max} for this address family"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Prefix>::new(
            "a prefix string like \"10.20.0.0/16\"",
        ))
    }
}

/// One remote site or cloud, reached through its own TUN over one or more paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub tun: String,
    pub tun_addresses: Vec<Prefix>,
    pub routes: Vec<Prefix>,
    pub policy: Policy,
    pub revert_hold: Duration,
    pub key_file: Option<PathBuf>,
    /// A second key accepted on receive (never used to send), for key
    /// rotation; requires `key_file`.
    pub accept_key_file: Option<PathBuf>,
    /// Inner MTU override for the TUN.
    pub mtu: Option<u16>,
    /// Metric (priority) of the routes installed via the TUN; `None` leaves
    /// the kernel default (0). A lower metric wins, so the same prefix can be
    /// routed through two peers, the second one as a backup that takes over
    /// when the first peer's TUN loses carrier.
    pub route_metric: Option<u32>,
    /// Send through the kernel fast path ([`crate::io::fastpath`]) rather
    /// than the lanes, when a path is up.
    pub fast_path: bool,
    pub paths: Vec<PathConfig>,
}

impl PeerConfig {
    /// True when any TUN address or route is IPv6.
    pub fn has_ipv6(&self) -> bool {
        self.tun_addresses
            .iter()
            .chain(&self.routes)
            .any(Prefix::is_ipv6)
    }

    pub fn path(&self, name: &str) -> Option<&PathConfig> {
        self.paths.iter().find(|p| p.name == name)
    }
}

/// One pair of underlay endpoints, with its BFD session parameters resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathConfig {
    pub name: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub interface: Option<String>,
    /// Active-backup: lowest healthy wins. Defaults to the 1-based position in the peer.
    pub priority: u32,
    /// Balance: share of new flows. At least 1.
    pub weight: u32,
    /// Gateway `[bfd]` merged with this path's `[peer.path.bfd]`, key by key.
    pub bfd: BfdConfig,
}

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

    /// Checks that every referenced secret file (BFD `auth.secret_file`, peer `key_file`)
    /// exists, is a regular file and can be opened for reading. Not part of [`Config::parse`],
    /// so configs can be validated on another host; `crosslink check` and `run` call it.
    /// Each error's `file` is the offending secret file and `key` the config key naming it.
    pub fn check_files(&self) -> Vec<ConfigError> {
        let mut wanted: Vec<(String, &Path)> = Vec::new();
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
        if peer.key_file.is_some() {
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
    }
}

// ---------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------

const DURATION_HELP: &str =
    "write a whole number with a unit: \"500us\", \"10ms\", \"2s\", \"1m\" (units: us, ms, s, m, h)";

/// Parses `"500us"`, `"10ms"`, `"2s"`, `"1m"`, `"1h"` (also `"µs"`). A whole number and a
/// unit, no spaces; bare numbers and unknown units are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    if num.is_empty() {
        return Err(format!("invalid duration \"{s}\": {DURATION_HELP}"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\": number too large"))?;
    let micros_per_unit: u64 = match unit {
        "us" | "µs" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "" => {
            return Err(format!(
                "invalid duration \"{s}\": missing unit; {DURATION_HELP}"
            ))
        }
        _ => {
            return Err(format!(
                "invalid duration \"{s}\": unknown unit \"{unit}\"; {DURATION_HELP}"
            ))
        }
    };
    n.checked_mul(micros_per_unit)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("invalid duration \"{s}\": too large"))
}

/// Formats a duration in the largest unit that represents it exactly (`"10ms"`, `"2s"`).
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        if d.is_zero() {
            return "0s".into();
        }
        return format!("{}ns", d.as_nanos());
    }
    if d.as_nanos() % 1_000 != 0 {
        return format!("{}ns", d.as_nanos());
    }
    for (per, unit) in [
        (3_600_000_000, "h"),
        (60_000_000, "m"),
        (1_000_000, "s"),
        (1_000, "ms"),
    ] {
        if us % per == 0 {
            return format!("{}{unit}", us / per);
        }
    }
    format!("{us}us")
}

/// A duration as written in the file.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor)
    }
}

struct DurVisitor;

impl Visitor<'_> for DurVisitor {
    type Value = Dur;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string like \"10ms\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
        parse_duration(v).map(Dur).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
        Err(E::custom(format!(
            "a duration needs a unit: write \"{v}ms\" or \"{v}s\", not {v}"
        )))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
        Err(E::custom(format!(
            "a duration needs a unit: write \"{v}ms\" or \"{v}s\", not {v}"
        )))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
        Err(E::custom(format!(
            "a duration needs a unit and a whole number: write e.g. \"500ms\", not {v}"
        )))
    }
}

// ---------------------------------------------------------------------------------------
// Raw (as written) structures
// ---------------------------------------------------------------------------------------

/// Deserializes any `FromStr<Err = String>` type from a TOML string.
struct FromStrVisitor<T> {
    expecting: &'static str,
    _t: std::marker::PhantomData<T>,
}

impl<T> FromStrVisitor<T> {
    fn new(expecting: &'static str) -> Self {
        FromStrVisitor {
            expecting,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: FromStr<Err = String>> Visitor<'_> for FromStrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

/// A socket address as written: `"192.0.2.1:4800"` or `"[2001:db8::1]:4800"`.
#[derive(Debug, Clone, Copy)]
struct Addr(SocketAddr);

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Addr).map_err(|_| {
            format!(
                "invalid socket address \"{s}\": expected IP:PORT, e.g. \"192.0.2.1:4800\" or \"[2001:db8::1]:4800\" (host names are not resolved)"
            )
        })
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Addr>::new(
            "a socket address string like \"192.0.2.1:4800\"",
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    bfd: RawBfd,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    name: String,
    control_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Addr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBfd {
    tx_interval: Option<Dur>,
    rx_interval: Option<Dur>,
    multiplier: Option<u8>,
    hop: Option<Hop>,
    passive: Option<bool>,
    min_ttl: Option<u8>,
    auth: Option<RawAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(rename = "type")]
    auth_type: BfdAuthType,
    key_id: u8,
    secret_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    tun: String,
    #[serde(default)]
    tun_addresses: Vec<Prefix>,
    #[serde(default)]
    routes: Vec<Prefix>,
    #[serde(default)]
    policy: Policy,
    revert_hold: Option<Dur>,
    key_file: Option<PathBuf>,
    accept_key_file: Option<PathBuf>,
    mtu: Option<u16>,
    route_metric: Option<u32>,
    #[serde(default)]
    fast_path: bool,
    #[serde(default)]
    path: Vec<RawPath>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPath {
    name: String,
    local: Addr,
    remote: Addr,
    interface: Option<String>,
    priority: Option<u32>,
    weight: Option<u32>,
    bfd: Option<RawBfd>,
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn k(key: &str) -> Seg {
    Seg::Key(key.to_string())
}

/// A validation failure, before it is located in the document.
#[derive(Debug)]
struct Invalid {
    path: Vec<Seg>,
    message: String,
}

type VResult<T> = Result<T, Invalid>;

fn invalid<T>(base: &[Seg], tail: &[Seg], message: impl Into<String>) -> VResult<T> {
    let mut path = base.to_vec();
    path.extend_from_slice(tail);
    Err(Invalid {
        path,
        message: message.into(),
    })
}

fn validate(raw: RawConfig) -> VResult<Config> {
    let gateway = validate_gateway(raw.gateway)?;
    let metrics = raw.metrics.map(|m| MetricsConfig { listen: m.listen.0 });
    let bfd = merge_bfd(&BfdConfig::default(), &raw.bfd, &[k("bfd")])?;
    if raw.peer.is_empty() {
        return invalid(&[], &[k("peer")], "at least one [[peer]] is required");
    }
    let peers = raw
        .peer
        .into_iter()
        .enumerate()
        .map(|(i, p)| validate_peer(p, &[k("peer"), Seg::Index(i)], &bfd))
        .collect::<VResult<Vec<_>>>()?;
    check_unique_peers(&peers)?;
    check_unique_underlay(&peers)?;
    Ok(Config {
        gateway,
        metrics,
        bfd,
        peers,
    })
}

fn validate_gateway(g: RawGateway) -> VResult<GatewayConfig> {
    let at = [k("gateway")];
    if g.name.trim().is_empty() {
        return invalid(&at, &[k("name")], "must not be empty");
    }
    let control_socket = g
        .control_socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET));
    if control_socket.as_os_str().is_empty() {
        return invalid(&at, &[k("control_socket")], "must not be empty");
    }
    Ok(GatewayConfig {
        name: g.name,
        control_socket,
    })
}

/// `base` with every key present in `over` replaced, each value checked where it is written.
fn merge_bfd(base: &BfdConfig, over: &RawBfd, at: &[Seg]) -> VResult<BfdConfig> {
    let mut b = base.clone();
    for (key, value, slot) in [
        ("tx_interval", over.tx_interval, &mut b.tx_interval),
        ("rx_interval", over.rx_interval, &mut b.rx_interval),
    ] {
        if let Some(Dur(d)) = value {
            if !(MIN_BFD_INTERVAL..=MAX_BFD_INTERVAL).contains(&d) {
                let msg = format!(
                    "{} is out of range: must be between 1ms and 60s",
                    format_duration(d)
                );
                return invalid(at, &[k(key)], msg);
            }
            *slot = d;
        }
    }
    if let Some(m) = over.multiplier {
        if m == 0 {
            return invalid(at, &[k("multiplier")], "must be between 1 and 255");
        }
        b.multiplier = m;
    }
    if let Some(t) = over.min_ttl {
        if t == 0 {
            return invalid(at, &[k("min_ttl")], "must be between 1 and 255");
        }
        b.min_ttl = t;
    }
    if let Some(h) = over.hop {
        b.hop = h;
    }
    if let Some(p) = over.passive {
        b.passive = p;
    }
    if let Some(a) = &over.auth {
        if a.secret_file.as_os_str().is_empty() {
            return invalid(at, &[k("auth"), k("secret_file")], "must not be empty");
        }
        b.auth = Some(BfdAuthConfig {
            auth_type: a.auth_type,
            key_id: a.key_id,
            secret_file: a.secret_file.clone(),
        });
    }
    Ok(b)
}

fn check_ifname(name: &str, at: &[Seg], key: &str) -> VResult<()> {
    let problem = if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "interface name \"{name}\" is {} bytes long; Linux allows at most {MAX_IFNAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some(format!("\"{name}\" is not a valid interface name"))
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some(format!(
            "interface name \"{name}\" must not contain '/', ':' or whitespace"
        ))
    } else {
        None
    };
    match problem {
        Some(msg) => invalid(at, &[k(key)], msg),
        None => Ok(()),
    }
}

fn validate_peer(p: RawPeer, at: &[Seg], gw_bfd: &BfdConfig) -> VResult<PeerConfig> {
    if p.name.trim().is_empty() {
        return invalid(at, &[k("name")], "must not be empty");
    }
    check_ifname(&p.tun, at, "tun")?;
    check_routes(&p.routes, at)?;
    let revert_hold = p.revert_hold.map_or(DEFAULT_REVERT_HOLD, |d| d.0);
    if revert_hold > MAX_REVERT_HOLD {
        let msg = format!("{} is too long: at most 1h", format_duration(revert_hold));
        return invalid(at, &[k("revert_hold")], msg);
    }
    if let Some(kf) = &p.key_file {
        if kf.as_os_str().is_empty() {
            return invalid(at, &[k("key_file")], "must not be empty");
        }
    }
    if let Some(kf) = &p.accept_key_file {
        if kf.as_os_str().is_empty() {
            return invalid(at, &[k("accept_key_file")], "must not be empty");
        }
        if p.key_file.is_none() {
            return invalid(at, &[k("accept_key_file")], "needs key_file");
        }
    }
    let has_v6 = p.tun_addresses.iter().chain(&p.routes).any(Prefix::is_ipv6);
    if let Some(mtu) = p.mtu {
        let min = if has_v6 { MIN_MTU_V6 } else { MIN_MTU_V4 };
        if mtu < min {
            let why = if has_v6 { " (IPv6 is configured)" } else { "" };
            return invalid(
                at,
                &[k("mtu")],
                format!("{mtu} is too small: at least {min}{why}"),
            );
        }
    }
    if p.path.is_empty() {
        return invalid(at, &[k("path")], "at least one [[peer.path]] is required");
    }
    let paths = p
        .path
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let mut pat = at.to_vec();
            pat.extend([k("path"), Seg::Index(i)]);
            validate_path(raw, &pat, i, gw_bfd)
        })
        .collect::<VResult<Vec<_>>>()?;
    let mut names = HashSet::new();
    for (i, path) in paths.iter().enumerate() {
        if !names.insert(path.name.as_str()) {
            let msg = format!("duplicate path name \"{}\" in this peer", path.name);
            return invalid(at, &[k("path"), Seg::Index(i), k("name")], msg);
        }
    }
    if p.fast_path {
        check_fast_path(p.key_file.is_some(), p.policy, &paths, at)?;
    }
    Ok(PeerConfig {
        name: p.name,
        tun: p.tun,
        tun_addresses: p.tun_addresses,
        routes: p.routes,
        policy: p.policy,
        revert_hold,
        key_file: p.key_file,
        accept_key_file: p.accept_key_file,
        mtu: p.mtu,
        route_metric: p.route_metric,
        fast_path: p.fast_path,
        paths,
    })
}

/// What the kernel fast path can carry: cleartext, one active path at a
/// time, IPv4 underlay from a concrete local address.
fn check_fast_path(keyed: bool, policy: Policy, paths: &[PathConfig], at: &[Seg]) -> VResult<()> {
    let why = if keyed {
        Some("needs a cleartext peer (no key_file): sealing stays in user space".to_string())
    } else if policy != Policy::ActiveBackup {
        Some(format!(
            "needs policy \"active-backup\" (this peer's is \"{policy}\")"
        ))
    } else if paths.len() > crate::io::fastpath::MAX_PATHS {
        Some(format!(
            "carries at most {} paths per peer",
            crate::io::fastpath::MAX_PATHS
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return invalid(at, &[k("fast_path")], why);
    }
    for (i, path) in paths.iter().enumerate() {
        if !path.local.is_ipv4() || path.local.ip().is_unspecified() {
            let msg = format!(
                "fast_path needs an IPv4 underlay from a concrete local address, not {}",
                path.local
            );
            return invalid(at, &[k("path"), Seg::Index(i), k("local")], msg);
        }
    }
    Ok(())
}

fn check_routes(routes: &[Prefix], at: &[Seg]) -> VResult<()> {
    let mut seen = HashSet::new();
    for (i, r) in routes.iter().enumerate() {
        let here = [k("routes"), Seg::Index(i)];
        if !r.is_network() {
            let msg = format!("route {r} has host bits set; did you mean {}?", r.network());
            return invalid(at, &here, msg);
        }
        if !seen.insert(*r) {
            return invalid(at, &here, format!("route {r} is listed twice"));
        }
    }
    Ok(())
}

fn validate_path(p: RawPath, at: &[Seg], index: usize, gw_bfd: &BfdConfig) -> VResult<PathConfig> {
    if p.name.trim().is_empty() {
        return invalid(at, &[k("name")], "must not be empty");
    }
    let (local, remote) = (p.local.0, p.remote.0);
    if local.is_ipv4() != remote.is_ipv4() {
        let msg = format!("{remote} and local {local} are not the same address family");
        return invalid(at, &[k("remote")], msg);
    }
    if local.port() == 0 {
        return invalid(at, &[k("local")], "port must not be 0");
    }
    if remote.ip().is_unspecified() {
        return invalid(
            at,
            &[k("remote")],
            format!("{} is not a usable remote address", remote.ip()),
        );
    }
    if remote.port() == 0 {
        return invalid(at, &[k("remote")], "port must not be 0");
    }
    if let Some(ifname) = &p.interface {
        check_ifname(ifname, at, "interface")?;
    }
    let weight = p.weight.unwrap_or(1);
    if weight == 0 {
        return invalid(at, &[k("weight")], "must be at least 1");
    }
    let default_priority = u32::try_from(index).unwrap_or(u32::MAX).saturating_add(1);
    let bfd = match &p.bfd {
        Some(over) => {
            let mut bat = at.to_vec();
            bat.push(k("bfd"));
            merge_bfd(gw_bfd, over, &bat)?
        }
        None => gw_bfd.clone(),
    };
    Ok(PathConfig {
        name: p.name,
        local,
        remote,
        interface: p.interface,
        priority: p.priority.unwrap_or(default_priority),
        weight,
        bfd,
    })
}

fn check_unique_peers(peers: &[PeerConfig]) -> VResult<()> {
    let mut names = HashSet::new();
    let mut tuns = HashMap::new();
    for (i, p) in peers.iter().enumerate() {
        let at = [k("peer"), Seg::Index(i)];
        if !names.insert(p.name.as_str()) {
            return invalid(
                &at,
                &[k("name")],
                format!("duplicate peer name \"{}\"", p.name),
            );
        }
        if let Some(other) = tuns.insert(p.tun.as_str(), p.name.as_str()) {
            let msg = format!("tun \"{}\" is already used by peer \"{other}\"", p.tun);
            return invalid(&at, &[k("tun")], msg);
        }
    }
    Ok(())
}

/// No two paths share a local socket, nor a (local IP, remote IP) pair: the BFD session
/// is identified by those addresses, so such paths could not be told apart.
fn check_unique_underlay(peers: &[PeerConfig]) -> VResult<()> {
    let mut locals: HashMap<SocketAddr, (&str, &str)> = HashMap::new();
    let mut pairs: HashMap<(IpAddr, IpAddr), (&str, &str)> = HashMap::new();
    for (pi, peer) in peers.iter().enumerate() {
        for (i, path) in peer.paths.iter().enumerate() {
            let at = [k("peer"), Seg::Index(pi), k("path"), Seg::Index(i)];
            let me = (peer.name.as_str(), path.name.as_str());
            if let Some((op, opath)) = locals.insert(path.local, me) {
                let msg = format!(
                    "{} is already the local address of path \"{opath}\" of peer \"{op}\"",
                    path.local
                );
                return invalid(&at, &[k("local")], msg);
            }
            if let Some((op, opath)) = pairs.insert((path.local.ip(), path.remote.ip()), me) {
                let msg = format!(
                    "path \"{opath}\" of peer \"{op}\" already runs between {} and {}; BFD could not tell the two apart",
                    path.local.ip(),
                    path.remote.ip()
                );
                return invalid(&at, &[k("remote")], msg);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Locating errors: byte offsets <-> key paths, via toml_edit's spans
// ---------------------------------------------------------------------------------------

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()
        .get(..end)
        .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
        + 1
}

fn deserialize_error(text: &str, file_name: &str, e: &toml::de::Error) -> ConfigError {
    let span = e.span();
    let mut message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let spanned = span.as_ref().and_then(|s| text.get(s.clone()));
    if let Some(what) = spanned.filter(|w| !w.is_empty() && w.len() <= 64 && !w.contains('\n')) {
        if message == "duplicate key" {
            message = format!("duplicate key `{what}`");
        }
    }
    let doc = toml_edit::Document::parse(text).ok();
    let key = match (&doc, &span) {
        (Some(doc), Some(span)) => {
            let mut path = Vec::new();
            find_offset(doc.as_table(), span.start, &mut path);
            if let Some(missing) = missing_field(&message) {
                path.push(k(missing));
            }
            render_key(Some(doc), &path)
        }
        (Some(doc), None) => match missing_field(&message) {
            Some(missing) => render_key(Some(doc), &[k(missing)]),
            None => "syntax".to_string(),
        },
        (None, _) => "syntax".to_string(),
    };
    ConfigError {
        file: file_name.to_string(),
        line: Some(span.map_or(1, |s| line_of(text, s.start))),
        key,
        message,
    }
}

/// `missing field `name`` -> `name`.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split('`')
        .next()
        .filter(|s| !s.is_empty())
}

fn contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && (offset < s.end || s.is_empty() && s.start == offset))
}

/// Appends to `path` the key path of the deepest key, value or table header containing
/// `offset`. Returns whether anything was found.
fn find_offset(table: &dyn toml_edit::TableLike, offset: usize, path: &mut Vec<Seg>) -> bool {
    for (name, item) in table.iter() {
        path.push(k(name));
        let key_span = table.key(name).and_then(toml_edit::Key::span);
        if contains(key_span, offset) || find_in_item(item, offset, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn find_in_item(item: &toml_edit::Item, offset: usize, path: &mut Vec<Seg>) -> bool {
    use toml_edit::Item;
    match item {
        Item::Value(v) => find_in_value(v, offset, path),
        Item::Table(t) => find_offset(t, offset, path) || contains(t.span(), offset),
        Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if find_offset(t, offset, path) || contains(t.span(), offset) {
                    return true;
                }
                path.pop();
            }
            false
        }
        Item::None => false,
    }
}

fn find_in_value(v: &toml_edit::Value, offset: usize, path: &mut Vec<Seg>) -> bool {
    use toml_edit::Value;
    if !contains(v.span(), offset) {
        return false;
    }
    match v {
        Value::InlineTable(t) => {
            find_offset(t, offset, path);
        }
        Value::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                if find_in_value(e, offset, path) {
                    return true;
                }
                path.pop();
            }
        }
        _ => {}
    }
    true
}

/// Follows `path` through the document. Returns the rendered key and the byte offset of
/// the deepest part of the path that exists in the file (the key itself, or else the
/// nearest enclosing table's header).
fn locate(doc: Option<&toml_edit::Document<&str>>, path: &[Seg]) -> (String, Option<usize>) {
    let key = render_key(doc, path);
    let Some(doc) = doc else {
        return (key, None);
    };
    let mut offset = None;
    let mut node = Node::Item(doc.as_item());
    for seg in path {
        let Some((next, span)) = node.child(seg) else {
            break;
        };
        if let Some(s) = span {
            offset = Some(s.start);
        }
        node = next;
    }
    (key, offset)
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
    /// An array-of-tables entry.
    Table(&'a toml_edit::Table),
}

impl<'a> Node<'a> {
    fn table_like(self) -> Option<&'a dyn toml_edit::TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
            Node::Table(t) => Some(t as &dyn toml_edit::TableLike),
        }
    }

    fn array_get(self, i: usize) -> Option<(Node<'a>, Option<Range<usize>>)> {
        use toml_edit::{Item, Value};
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(i).map(|t| (Node::Table(t), t.span())),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(i).map(|v| (Node::Value(v), v.span()))
            }
            _ => None,
        }
    }

    /// The child at `seg` and the span that best locates it.
    fn child(self, seg: &Seg) -> Option<(Node<'a>, Option<Range<usize>>)> {
        match seg {
            Seg::Key(key) => {
                let (kk, item) = self.table_like()?.get_key_value(key)?;
                let span = kk.span().or_else(|| item.span());
                Some((Node::Item(item), span))
            }
            Seg::Index(i) => self.array_get(*i),
        }
    }

    /// The `name` of an array-of-tables entry, when it is a plain string.
    fn entry_name(self) -> Option<&'a str> {
        self.table_like()?.get("name")?.as_str()
    }
}

/// Renders a key path: keys joined by dots, array-of-tables entries by their `name`
/// (`peer.gcp.path.cci-1.remote`), other indexes as `[i]` (`peer.gcp.routes[1]`).
fn render_key(doc: Option<&toml_edit::Document<&str>>, path: &[Seg]) -> String {
    let mut out = String::new();
    let mut node = doc.map(|d| Node::Item(d.as_item()));
    for seg in path {
        let next = node.and_then(|n| n.child(seg)).map(|(n, _)| n);
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&quote_key(key));
            }
            Seg::Index(i) => match next.and_then(Node::entry_name).filter(|n| is_bare(n)) {
                Some(name) => {
                    out.push('.');
                    out.push_str(name);
                }
                None => out.push_str(&format!("[{i}]")),
            },
        }
        node = next;
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

fn is_bare(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn quote_key(key: &str) -> String {
    if is_bare(key) {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two peers, three paths; line numbers matter to the tests below.
    const BASE: &str = r#"[gateway]
name = "gw"

[[peer]]
name = "gcp"
tun = "xl-gcp"

  [[peer.path]]
  name = "cci-1"
  local = "192.0.2.1:4800"
  remote = "192.0.2.2:4800"

  [[peer.path]]
  name = "cci-2"
  local = "198.51.100.1:4800"
  remote = "198.51.100.2:4800"

[[peer]]
name = "aws"
tun = "xl-aws"

  [[peer.path]]
  name = "dx-1"
  local = "203.0.113.1:4800"
  remote = "203.0.113.2:4800"
"#;

    fn ok(text: &str) -> Config {
        match Config::parse(text, "t.toml") {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got {e}\n{text}"),
        }
    }

    fn err(text: &str) -> ConfigError {
        match Config::parse(text, "t.toml") {
            Ok(c) => panic!("expected an error, got {c:#?}\n{text}"),
            Err(e) => e,
        }
    }

    /// Replaces the first occurrence of `from` in BASE, which must exist.
    fn base_with(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "BASE has no {from:?}");
        BASE.replacen(from, to, 1)
    }

    fn assert_err(text: &str, line: usize, key: &str, needle: &str) -> ConfigError {
        let e = err(text);
        assert_eq!(e.file, "t.toml", "{e}");
        assert_eq!(e.line, Some(line), "{e}");
        assert_eq!(e.key, key, "{e}");
        assert!(
            e.message.contains(needle),
            "message {:?} lacks {needle:?}",
            e.message
        );
        e
    }

    fn only_path(c: &Config) -> &PathConfig {
        match c.peers.first().and_then(|p| p.paths.first()) {
            Some(p) => p,
            None => panic!("no path"),
        }
    }

    // --- defaults and merging ------------------------------------------------------

    #[test]
    fn defaults_are_applied() {
        let c = ok(BASE);
        assert_eq!(c.gateway.name, "gw");
        assert_eq!(
            c.gateway.control_socket,
            PathBuf::from("/run/crosslink/crosslink.sock")
        );
        assert_eq!(c.metrics, None);
        assert_eq!(c.bfd, BfdConfig::default());
        assert_eq!(c.bfd.tx_interval, Duration::from_millis(10));
        assert_eq!(c.bfd.rx_interval, Duration::from_millis(10));
        assert_eq!(c.bfd.multiplier, 3);
        assert_eq!(c.bfd.hop, Hop::Single);
        assert!(!c.bfd.passive);
        assert_eq!(c.bfd.min_ttl, 254);
        assert_eq!(c.bfd.auth, None);
        assert_eq!(c.peers.len(), 2);
        let gcp = &c.peers[0];
        assert_eq!(gcp.policy, Policy::ActiveBackup);
        assert_eq!(gcp.revert_hold, Duration::from_secs(2));
        assert_eq!(gcp.key_file, None);
        assert_eq!(gcp.mtu, None);
        assert!(gcp.routes.is_empty() && gcp.tun_addresses.is_empty());
        let prio: Vec<u32> = gcp.paths.iter().map(|p| p.priority).collect();
        assert_eq!(prio, [1, 2]);
        assert!(gcp
            .paths
            .iter()
            .all(|p| p.weight == 1 && p.interface.is_none()));
        assert!(gcp.paths.iter().all(|p| p.bfd == c.bfd));
        assert_eq!(
            c.peers[1].paths[0].priority, 1,
            "priority counts within the peer"
        );
    }

    #[test]
    fn all_keys_are_read() {
        let text = r#"
[gateway]
name = "onprem-1"
control_socket = "/tmp/x.sock"
[metrics]
listen = "[::1]:9000"
[bfd]
tx_interval = "20ms"
rx_interval = "30ms"
multiplier = 4
hop = "multi"
passive = true
min_ttl = 250
auth = { type = "keyed-md5", key_id = 7, secret_file = "/etc/crosslink/bfd.key" }
[[peer]]
name = "p"
tun = "xl-p"
tun_addresses = ["169.254.77.1/30", "fd00::1/64"]
routes = ["10.20.0.0/16", "fd00:20::/48"]
policy = "duplicate"
revert_hold = "1m"
key_file = "/etc/crosslink/p.key"
mtu = 1400
  [[peer.path]]
  name = "x"
  local = "[2001:db8::1]:4800"
  remote = "[2001:db8::2]:4801"
  interface = "eth0.101"
  priority = 10
  weight = 3
"#;
        let c = ok(text);
        assert_eq!(c.gateway.control_socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.metrics.as_ref().map(|m| m.listen.port()), Some(9000));
        let b = &c.bfd;
        assert_eq!(b.tx_interval, Duration::from_millis(20));
        assert_eq!(b.rx_interval, Duration::from_millis(30));
        assert_eq!(
            (b.multiplier, b.hop, b.passive, b.min_ttl),
            (4, Hop::Multi, true, 250)
        );
        let auth = b.auth.as_ref().map(|a| (a.auth_type, a.key_id));
        assert_eq!(auth, Some((BfdAuthType::KeyedMd5, 7)));
        let p = &c.peers[0];
        assert_eq!(p.policy, Policy::Duplicate);
        assert_eq!(p.revert_hold, Duration::from_secs(60));
        assert_eq!(p.mtu, Some(1400));
        assert_eq!(p.key_file, Some(PathBuf::from("/etc/crosslink/p.key")));
        assert_eq!(p.tun_addresses[1].to_string(), "fd00::1/64");
        assert_eq!(p.routes[1].to_string(), "fd00:20::/48");
        let path = only_path(&c);
        assert_eq!(path.interface.as_deref(), Some("eth0.101"));
        assert_eq!((path.priority, path.weight), (10, 3));
        assert_eq!(path.remote.port(), 4801);
        assert_eq!(&path.bfd, b);
    }

    #[test]
    fn path_bfd_overrides_merge_key_by_key() {
        let text = base_with(
            "[gateway]\nname = \"gw\"\n",
            "[gateway]\nname = \"gw\"\n[bfd]\ntx_interval = \"20ms\"\nmultiplier = 5\nauth = { type = \"keyed-sha1\", key_id = 1, secret_file = \"/a\" }\n",
        )
        .replacen(
            "  remote = \"192.0.2.2:4800\"\n",
            "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  rx_interval = \"2ms\"\n  hop = \"multi\"\n  min_ttl = 200\n  auth = { type = \"meticulous-keyed-sha1\", key_id = 9, secret_file = \"/b\" }\n",
            1,
        );
        let c = ok(&text);
        let p0 = &c.peers[0].paths[0];
        assert_eq!(p0.bfd.tx_interval, Duration::from_millis(20), "inherited");
        assert_eq!(p0.bfd.rx_interval, Duration::from_millis(2), "overridden");
        assert_eq!(p0.bfd.multiplier, 5, "inherited");
        assert_eq!(p0.bfd.hop, Hop::Multi);
        assert_eq!(p0.bfd.min_ttl, 200);
        let auth = p0
            .bfd
            .auth
            .as_ref()
            .map(|a| (a.auth_type, a.key_id, a.secret_file.clone()));
        assert_eq!(
            auth,
            Some((BfdAuthType::MeticulousKeyedSha1, 9, PathBuf::from("/b")))
        );
        let p1 = &c.peers[0].paths[1];
        assert_eq!(
            p1.bfd, c.bfd,
            "paths without overrides get the gateway defaults"
        );
        assert_eq!(c.bfd.rx_interval, Duration::from_millis(10));
        assert_eq!(c.bfd.hop, Hop::Single);
    }

    #[test]
    fn enum_strings() {
        for (s, want) in [
            ("simple-password", BfdAuthType::SimplePassword),
            ("keyed-md5", BfdAuthType::KeyedMd5),
            ("meticulous-keyed-md5", BfdAuthType::MeticulousKeyedMd5),
            ("keyed-sha1", BfdAuthType::KeyedSha1),
            ("meticulous-keyed-sha1", BfdAuthType::MeticulousKeyedSha1),
        ] {
            let text = base_with(
                "name = \"gw\"\n",
                &format!("name = \"gw\"\n[bfd]\nauth = {{ type = \"{s}\", key_id = 1, secret_file = \"/k\" }}\n"),
            );
            let c = ok(&text);
            assert_eq!(c.bfd.auth.map(|a| a.auth_type), Some(want));
            assert_eq!(want.as_str(), s);
        }
        for (s, want) in [
            ("active-backup", Policy::ActiveBackup),
            ("balance", Policy::Balance),
            ("duplicate", Policy::Duplicate),
        ] {
            let c = ok(&base_with(
                "tun = \"xl-gcp\"\n",
                &format!("tun = \"xl-gcp\"\npolicy = \"{s}\"\n"),
            ));
            assert_eq!(c.peers[0].policy, want);
            assert_eq!(want.as_str(), s);
        }
        assert_eq!(Hop::Single.as_str(), "single");
        assert_eq!(Hop::Multi.udp_port(), 4784);
        let text = base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\npolicy = \"round-robin\"\n",
        );
        let e = assert_err(&text, 7, "peer.gcp.policy", "unknown variant `round-robin`");
        assert!(
            e.message.contains("active-backup"),
            "lists the choices: {e}"
        );
    }

    // --- durations ----------------------------------------------------------------

    #[test]
    fn duration_table() {
        let good = [
            ("500us", Duration::from_micros(500)),
            ("1µs", Duration::from_micros(1)),
            ("10ms", Duration::from_millis(10)),
            ("0ms", Duration::ZERO),
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("007ms", Duration::from_millis(7)),
        ];
        for (s, want) in good {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        let bad = [
            ("10", "missing unit"),
            ("", "whole number with a unit"),
            ("ms", "whole number with a unit"),
            ("10 ms", "unknown unit \" ms\""),
            ("10sec", "unknown unit \"sec\""),
            ("10d", "unknown unit \"d\""),
            ("1.5s", "unknown unit \".5s\""),
            ("-1s", "whole number with a unit"),
            ("99999999999999999999s", "too large"),
            ("18446744073709551615h", "too large"),
        ];
        for (s, needle) in bad {
            match parse_duration(s) {
                Ok(d) => panic!("{s:?} parsed as {d:?}"),
                Err(e) => assert!(e.contains(needle), "{s:?}: {e:?} lacks {needle:?}"),
            }
        }
    }

    #[test]
    fn duration_formatting_round_trips() {
        for s in ["500us", "10ms", "1500ms", "2s", "90s", "1m", "1h", "0s"] {
            let d = parse_duration(s).unwrap_or_default();
            assert_eq!(format_duration(d), s);
        }
        assert_eq!(format_duration(Duration::from_nanos(1500)), "1500ns");
    }

    #[test]
    fn bad_duration_is_reported_at_its_line() {
        let text = base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\nrevert_hold = \"2 seconds\"\n",
        );
        assert_err(
            &text,
            7,
            "peer.gcp.revert_hold",
            "invalid duration \"2 seconds\"",
        );
        let text = base_with(
            "name = \"gw\"\n",
            "name = \"gw\"\n[bfd]\ntx_interval = 10\n",
        );
        assert_err(&text, 4, "bfd.tx_interval", "needs a unit");
        let text = base_with(
            "name = \"gw\"\n",
            "name = \"gw\"\n[bfd]\nrx_interval = \"10fortnights\"\n",
        );
        assert_err(&text, 4, "bfd.rx_interval", "unknown unit");
        let text = base_with(
            "name = \"gw\"\n",
            "name = \"gw\"\n[bfd]\nrx_interval = 0.5\n",
        );
        assert_err(&text, 4, "bfd.rx_interval", "needs a unit");
    }

    // --- line numbers for deserialize errors --------------------------------------

    #[test]
    fn unknown_top_level_key() {
        let text = format!("# top-level keys come before any table\nbogus = 1\n{BASE}");
        let e = assert_err(&text, 2, "bogus", "unknown field `bogus`");
        assert_eq!(e.to_string().split(": ").next(), Some("t.toml:2"));
        // After the last table, a key belongs to that table (TOML rules).
        let text = format!("{BASE}bogus = 1\n");
        assert_err(
            &text,
            26,
            "peer.aws.path.dx-1.bogus",
            "unknown field `bogus`",
        );
        let text = format!("{BASE}\n[extra]\nx = 1\n");
        assert_err(&text, 27, "extra", "unknown field `extra`");
    }

    #[test]
    fn unknown_key_in_path() {
        let text = base_with(
            "  remote = \"198.51.100.2:4800\"\n",
            "  remote = \"198.51.100.2:4800\"\n  prio = 3\n",
        );
        let e = assert_err(
            &text,
            17,
            "peer.gcp.path.cci-2.prio",
            "unknown field `prio`",
        );
        assert_eq!(
            e.to_string(),
            format!("t.toml:17: peer.gcp.path.cci-2.prio: {}", e.message)
        );
    }

    #[test]
    fn unknown_key_in_other_tables() {
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\nnmae = \"x\"\n");
        assert_err(&text, 3, "gateway.nmae", "unknown field `nmae`");
        let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\nroute = []\n");
        assert_err(&text, 7, "peer.gcp.route", "unknown field `route`");
        let text = base_with(
            "name = \"gw\"\n",
            "name = \"gw\"\n[bfd]\ninterval = \"1s\"\n",
        );
        assert_err(&text, 4, "bfd.interval", "unknown field `interval`");
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 1, secret_file = \"/k\", key = \"s\" }\n");
        assert_err(&text, 4, "bfd.auth.key", "unknown field `key`");
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"\n",
            "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  tx = \"1ms\"\n",
        );
        assert_err(
            &text,
            13,
            "peer.gcp.path.cci-1.bfd.tx",
            "unknown field `tx`",
        );
    }

    #[test]
    fn missing_and_mistyped_keys() {
        let text = base_with("  name = \"cci-2\"\n", "");
        assert_err(&text, 13, "peer.gcp.path[1].name", "missing field `name`");
        let text = base_with("tun = \"xl-gcp\"\n", "");
        assert_err(&text, 4, "peer.gcp.tun", "missing field `tun`");
        let text = BASE.replacen("[gateway]\nname = \"gw\"\n", "", 1);
        let e = err(&text);
        assert_eq!(e.key, "gateway", "{e}");
        assert!(e.line.is_some());
        let text = base_with("name = \"gw\"\n", "name = 7\n");
        assert_err(&text, 2, "gateway.name", "invalid type");
        let text = base_with(
            "name = \"gw\"\n",
            "name = \"gw\"\n[bfd]\nmultiplier = 256\n",
        );
        assert_err(&text, 4, "bfd.multiplier", "expected u8");
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nhop = \"two\"\n");
        assert_err(&text, 4, "bfd.hop", "unknown variant `two`");
    }

    #[test]
    fn syntax_error_names_line() {
        let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\n");
        let e = err(&text);
        assert_eq!(e.line, Some(6), "{e}");
        assert_eq!(e.key, "syntax");
        assert!(!e.message.contains('\n'));
        let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\ntun = \"xl-x\"\n");
        let e = err(&text);
        assert_eq!(e.line, Some(7), "{e}");
        assert_eq!(e.message, "duplicate key `tun`");
    }

    #[test]
    fn bad_remote_address() {
        let text = base_with(
            "  remote = \"198.51.100.2:4800\"\n",
            "  remote = \"198.51.100.2\"\n",
        );
        assert_err(
            &text,
            16,
            "peer.gcp.path.cci-2.remote",
            "invalid socket address \"198.51.100.2\"",
        );
        let text = base_with(
            "  remote = \"198.51.100.2:4800\"\n",
            "  remote = \"gw.example.com:4800\"\n",
        );
        assert_err(&text, 16, "peer.gcp.path.cci-2.remote", "IP:PORT");
        let text = base_with(
            "  local = \"192.0.2.1:4800\"\n",
            "  local = \"192.0.2.300:4800\"\n",
        );
        assert_err(
            &text,
            10,
            "peer.gcp.path.cci-1.local",
            "invalid socket address",
        );
    }

    #[test]
    fn bad_prefix_syntax() {
        let text = base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\nroutes = [\"10.0.0.0/8\",\n  \"10.1.0.0\"]\n",
        );
        assert_err(&text, 8, "peer.gcp.routes[1]", "expected ADDRESS/LENGTH");
        for p in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/-1",
            "10.0.0.0/",
            "x/8",
            "10.0.0.0/+8",
        ] {
            assert!(p.parse::<Prefix>().is_err(), "{p}");
        }
        let text = base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\ntun_addresses = [\"169.254.1.1/40\"]\n",
        );
        assert_err(&text, 7, "peer.gcp.tun_addresses[0]", "0..=32");
    }

    // --- semantic validation: every rule, with its line and key -------------------

    #[test]
    fn gateway_name_must_not_be_empty() {
        assert_err(
            &base_with("name = \"gw\"", "name = \"\""),
            2,
            "gateway.name",
            "must not be empty",
        );
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\ncontrol_socket = \"\"\n");
        assert_err(&text, 3, "gateway.control_socket", "must not be empty");
    }

    #[test]
    fn at_least_one_peer() {
        let e = err("[gateway]\nname = \"gw\"\n");
        assert_eq!((e.line, e.key.as_str()), (Some(1), "peer"));
        assert!(e.message.contains("at least one [[peer]]"));
    }

    #[test]
    fn at_least_one_path() {
        let text = "[gateway]\nname = \"gw\"\n\n[[peer]]\nname = \"gcp\"\ntun = \"xl-gcp\"\n";
        assert_err(text, 4, "peer.gcp.path", "at least one [[peer.path]]");
    }

    #[test]
    fn peer_and_path_names_must_not_be_empty() {
        assert_err(
            &base_with("name = \"gcp\"", "name = \" \""),
            5,
            "peer[0].name",
            "must not be empty",
        );
        assert_err(
            &base_with("name = \"cci-1\"", "name = \"\""),
            9,
            "peer.gcp.path[0].name",
            "must not be empty",
        );
    }

    #[test]
    fn duplicate_peer_name() {
        let text = base_with("name = \"aws\"", "name = \"gcp\"");
        assert_err(&text, 19, "peer.gcp.name", "duplicate peer name \"gcp\"");
    }

    #[test]
    fn duplicate_tun() {
        let text = base_with("tun = \"xl-aws\"", "tun = \"xl-gcp\"");
        assert_err(&text, 20, "peer.aws.tun", "already used by peer \"gcp\"");
    }

    #[test]
    fn tun_name_rules() {
        for (tun, needle) in [
            ("", "must not be empty"),
            ("xl-0123456789abc", "at most 15"),
            ("xl/gcp", "must not contain"),
            ("xl gcp", "must not contain"),
            ("xl:gcp", "must not contain"),
            ("..", "not a valid interface name"),
        ] {
            let text = base_with("tun = \"xl-gcp\"", &format!("tun = \"{tun}\""));
            assert_err(&text, 6, "peer.gcp.tun", needle);
        }
        ok(&base_with("tun = \"xl-gcp\"", "tun = \"xl-0123456789ab\""));
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"\n",
            "  remote = \"192.0.2.2:4800\"\n  interface = \"vlan 101\"\n",
        );
        assert_err(
            &text,
            12,
            "peer.gcp.path.cci-1.interface",
            "must not contain",
        );
    }

    #[test]
    fn duplicate_path_name() {
        let text = base_with("name = \"cci-2\"", "name = \"cci-1\"");
        assert_err(
            &text,
            14,
            "peer.gcp.path.cci-1.name",
            "duplicate path name \"cci-1\"",
        );
        // The same path name under another peer is fine.
        ok(&base_with("name = \"dx-1\"", "name = \"cci-1\""));
    }

    #[test]
    fn mixed_address_families() {
        let text = base_with(
            "  remote = \"198.51.100.2:4800\"",
            "  remote = \"[2001:db8::2]:4800\"",
        );
        assert_err(
            &text,
            16,
            "peer.gcp.path.cci-2.remote",
            "not the same address family",
        );
    }

    #[test]
    fn ports_and_unspecified_remote() {
        let text = base_with("  local = \"192.0.2.1:4800\"", "  local = \"192.0.2.1:0\"");
        assert_err(&text, 10, "peer.gcp.path.cci-1.local", "port must not be 0");
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"",
            "  remote = \"192.0.2.2:0\"",
        );
        assert_err(
            &text,
            11,
            "peer.gcp.path.cci-1.remote",
            "port must not be 0",
        );
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"",
            "  remote = \"0.0.0.0:4800\"",
        );
        assert_err(
            &text,
            11,
            "peer.gcp.path.cci-1.remote",
            "not a usable remote address",
        );
        let text = base_with("  remote = \"192.0.2.2:4800\"", "  remote = \"[::]:4800\"").replacen(
            "  local = \"192.0.2.1:4800\"",
            "  local = \"[2001:db8::1]:4800\"",
            1,
        );
        assert_err(
            &text,
            11,
            "peer.gcp.path.cci-1.remote",
            "not a usable remote address",
        );
    }

    #[test]
    fn local_socket_is_unique_across_peers() {
        let text = base_with(
            "  local = \"203.0.113.1:4800\"",
            "  local = \"192.0.2.1:4800\"",
        );
        assert_err(
            &text,
            24,
            "peer.aws.path.dx-1.local",
            "path \"cci-1\" of peer \"gcp\"",
        );
        // Same IP on another port towards another remote is fine.
        ok(&base_with(
            "  local = \"203.0.113.1:4800\"",
            "  local = \"192.0.2.1:4801\"",
        ));
    }

    #[test]
    fn address_pair_is_unique() {
        let text = base_with(
            "  local = \"203.0.113.1:4800\"",
            "  local = \"192.0.2.1:4801\"",
        )
        .replacen(
            "  remote = \"203.0.113.2:4800\"",
            "  remote = \"192.0.2.2:4801\"",
            1,
        );
        assert_err(
            &text,
            25,
            "peer.aws.path.dx-1.remote",
            "BFD could not tell the two apart",
        );
    }

    #[test]
    fn bfd_interval_range() {
        for (v, good) in [
            ("999us", false),
            ("1ms", true),
            ("60s", true),
            ("61s", false),
            ("1m", true),
            ("0ms", false),
        ] {
            let text = base_with(
                "name = \"gw\"\n",
                &format!("name = \"gw\"\n[bfd]\ntx_interval = \"{v}\"\n"),
            );
            if good {
                ok(&text);
            } else {
                assert_err(&text, 4, "bfd.tx_interval", "between 1ms and 60s");
            }
        }
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"\n",
            "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  rx_interval = \"500us\"\n",
        );
        assert_err(
            &text,
            13,
            "peer.gcp.path.cci-1.bfd.rx_interval",
            "between 1ms and 60s",
        );
    }

    #[test]
    fn multiplier_and_min_ttl_range() {
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nmultiplier = 0\n");
        assert_err(&text, 4, "bfd.multiplier", "between 1 and 255");
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nmin_ttl = 0\n");
        assert_err(&text, 4, "bfd.min_ttl", "between 1 and 255");
        let text = base_with(
            "name = \"gw\"\n",
            "name = \"gw\"\n[bfd]\nmin_ttl = 255\nmultiplier = 255\n",
        );
        ok(&text);
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"\n",
            "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  multiplier = 0\n",
        );
        assert_err(
            &text,
            13,
            "peer.gcp.path.cci-1.bfd.multiplier",
            "between 1 and 255",
        );
    }

    #[test]
    fn revert_hold_limit() {
        ok(&base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\nrevert_hold = \"1h\"\n",
        ));
        ok(&base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\nrevert_hold = \"0s\"\n",
        ));
        let text = base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\nrevert_hold = \"61m\"\n",
        );
        assert_err(&text, 7, "peer.gcp.revert_hold", "at most 1h");
    }

    #[test]
    fn weight_at_least_one() {
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"\n",
            "  remote = \"192.0.2.2:4800\"\n  weight = 0\n",
        );
        assert_err(&text, 12, "peer.gcp.path.cci-1.weight", "at least 1");
        let text = base_with(
            "  remote = \"192.0.2.2:4800\"\n",
            "  remote = \"192.0.2.2:4800\"\n  weight = -1\n",
        );
        assert_err(&text, 12, "peer.gcp.path.cci-1.weight", "u32");
    }

    #[test]
    fn fast_path_only_where_the_kernel_can_carry_it() {
        let with =
            |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
        let c = ok(&with("fast_path = true\n"));
        assert!(c.peers[0].fast_path);
        assert!(!c.peers[1].fast_path);
        assert!(Config::summary(&c).contains("fast_path"));
        assert!(!ok(&with("")).peers[0].fast_path);
        assert_err(
            &with("fast_path = true\nkey_file = \"/k\"\n"),
            7,
            "peer.gcp.fast_path",
            "cleartext",
        );
        assert_err(
            &with("fast_path = true\npolicy = \"balance\"\n"),
            7,
            "peer.gcp.fast_path",
            "active-backup",
        );
        let v6 = with("fast_path = true\n")
            .replace("192.0.2.1:4800", "[2001:db8::1]:4800")
            .replace("192.0.2.2:4800", "[2001:db8::2]:4800");
        assert_err(&v6, 11, "peer.gcp.path.cci-1.local", "IPv4");
        let any = with("fast_path = true\n").replace("192.0.2.1:4800", "0.0.0.0:4800");
        assert_err(
            &any,
            11,
            "peer.gcp.path.cci-1.local",
            "concrete local address",
        );
    }

    #[test]
    fn route_metric() {
        let with =
            |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
        let c = ok(&with("route_metric = 200\n"));
        assert_eq!(c.peers[0].route_metric, Some(200));
        assert!(Config::summary(&c).contains("route_metric 200"));
        let c = ok(&with(""));
        assert_eq!(c.peers[0].route_metric, None);
        assert_err(
            &with("route_metric = -1\n"),
            7,
            "peer.gcp.route_metric",
            "u32",
        );
        assert_err(
            &with("route_metric = \"low\"\n"),
            7,
            "peer.gcp.route_metric",
            "",
        );
    }

    #[test]
    fn mtu_range() {
        let with =
            |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
        ok(&with("mtu = 576\n"));
        ok(&with("mtu = 65535\n"));
        assert_err(&with("mtu = 575\n"), 7, "peer.gcp.mtu", "at least 576");
        assert_err(&with("mtu = 65536\n"), 7, "peer.gcp.mtu", "u16");
        assert_err(
            &with("routes = [\"fd00::/64\"]\nmtu = 1279\n"),
            8,
            "peer.gcp.mtu",
            "at least 1280 (IPv6",
        );
        assert_err(
            &with("tun_addresses = [\"fd00::1/64\"]\nmtu = 1000\n"),
            8,
            "peer.gcp.mtu",
            "at least 1280",
        );
        ok(&with("routes = [\"fd00::/64\"]\nmtu = 1280\n"));
    }

    #[test]
    fn routes_must_be_networks() {
        let with =
            |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
        let e = assert_err(
            &with("routes = [\"10.20.0.0/16\", \"10.30.0.1/16\"]\n"),
            7,
            "peer.gcp.routes[1]",
            "host bits",
        );
        assert!(e.message.contains("did you mean 10.30.0.0/16"), "{e}");
        assert_err(
            &with("routes = [\"fd00::1/64\"]\n"),
            7,
            "peer.gcp.routes[0]",
            "did you mean fd00::/64",
        );
        assert_err(
            &with("routes = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n"),
            7,
            "peer.gcp.routes[1]",
            "listed twice",
        );
        // Host bits are fine on interface addresses, and the same route may go via two peers.
        let c = ok(&with(
            "tun_addresses = [\"169.254.77.1/30\"]\nroutes = [\"0.0.0.0/0\", \"10.9.9.9/32\"]\n",
        )
        .replacen(
            "tun = \"xl-aws\"\n",
            "tun = \"xl-aws\"\nroutes = [\"0.0.0.0/0\"]\n",
            1,
        ));
        assert_eq!(c.peers[0].tun_addresses[0].to_string(), "169.254.77.1/30");
    }

    #[test]
    fn metrics_listen() {
        let text = base_with(
            "name = \"gw\"\n",
            "name = \"gw\"\n[metrics]\nlisten = \"localhost:9787\"\n",
        );
        assert_err(&text, 4, "metrics.listen", "invalid socket address");
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[metrics]\n");
        assert_err(&text, 3, "metrics.listen", "missing field `listen`");
    }

    #[test]
    fn auth_secret_file_and_key_file_must_not_be_empty() {
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 1, secret_file = \"\" }\n");
        assert_err(&text, 4, "bfd.auth.secret_file", "must not be empty");
        let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\nkey_file = \"\"\n");
        assert_err(&text, 7, "peer.gcp.key_file", "must not be empty");
        let text = base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\naccept_key_file = \"/k2\"\n",
        );
        assert_err(&text, 7, "peer.gcp.accept_key_file", "needs key_file");
        let text = base_with(
            "tun = \"xl-gcp\"\n",
            "tun = \"xl-gcp\"\nkey_file = \"/k1\"\naccept_key_file = \"/k2\"\n",
        );
        let c = Config::parse(&text, "t.toml").unwrap();
        let gcp = c.peers.iter().find(|p| p.name == "gcp").unwrap();
        assert_eq!(gcp.accept_key_file, Some(PathBuf::from("/k2")));
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 256, secret_file = \"/k\" }\n");
        assert_err(&text, 4, "bfd.auth.key_id", "u8");
    }

    #[test]
    fn check_files_reports_missing_and_accepts_readable() {
        let dir =
            std::env::temp_dir().join(format!("crosslink-config-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let present = dir.join("bfd.key");
        assert!(std::fs::write(&present, "secret").is_ok());
        let missing = dir.join("missing.key");
        let text = base_with(
            "name = \"gw\"\n",
            &format!(
                "name = \"gw\"\n[bfd]\nauth = {{ type = \"keyed-sha1\", key_id = 1, secret_file = \"{}\" }}\n",
                present.display()
            ),
        )
        .replacen("tun = \"xl-aws\"\n", &format!("tun = \"xl-aws\"\nkey_file = \"{}\"\n", missing.display()), 1)
        .replacen("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\nkey_file = \"{}\"\n", dir.display()), 1);
        let errors = ok(&text).check_files();
        let _ = std::fs::remove_dir_all(&dir);
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["peer.gcp.key_file", "peer.aws.key_file"],
            "{errors:?}"
        );
        assert!(errors[0].message.contains("not a regular file"));
        assert!(errors[1].message.contains("cannot read"));
        assert_eq!(errors[1].file, missing.display().to_string());
        assert!(ok(BASE).check_files().is_empty());
    }

    #[test]
    fn load_reports_io_errors_without_line() {
        let e = match Config::load(Path::new("/nonexistent/crosslink.toml")) {
            Ok(_) => panic!("loaded a missing file"),
            Err(e) => e,
        };
        assert_eq!(e.line, None);
        assert_eq!(e.key, "io");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/crosslink.toml: io: "),
            "{e}"
        );
    }

    #[test]
    fn error_display_format() {
        let e = ConfigError {
            file: "a.toml".into(),
            line: Some(3),
            key: "peer.gcp.tun".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "a.toml:3: peer.gcp.tun: bad");
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(!boxed.to_string().is_empty());
    }

    #[test]
    fn odd_names_are_quoted_or_indexed() {
        let text = base_with("name = \"gcp\"", "name = \"g c p\"").replacen(
            "tun = \"xl-gcp\"",
            "tun = \"xl gcp\"",
            1,
        );
        assert_err(&text, 6, "peer[0].tun", "must not contain");
    }

    #[test]
    fn prefix_helpers() {
        let p: Prefix = match "10.1.2.3/8".parse() {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert!(!p.is_network());
        assert_eq!(p.network().to_string(), "10.0.0.0/8");
        assert!(p.contains("10.200.0.1".parse().unwrap_or(p.addr)));
        assert!(!p.contains("11.0.0.1".parse().unwrap_or(p.addr)));
        for s in ["0.0.0.0/0", "::/0", "10.0.0.1/32", "2001:db8::1/128"] {
            let p: Result<Prefix, _> = s.parse();
            assert_eq!(
                p.map(|p| (p.is_network(), p.to_string())),
                Ok((true, s.to_string()))
            );
        }
    }

    #[test]
    fn summary_mentions_everything() {
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[metrics]\nlisten = \"127.0.0.1:9787\"\n")
            .replacen("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\nroutes = [\"10.20.0.0/16\"]\nrevert_hold = \"3s\"\npolicy = \"balance\"\n", 1);
        let s = ok(&text).summary();
        for needle in [
            "gateway gw",
            "127.0.0.1:9787",
            "bfd defaults: tx 10ms rx 10ms x3, single hop",
            "peer gcp: tun xl-gcp",
            "policy balance",
            "revert_hold 3s",
            "routes: 10.20.0.0/16",
            "path cci-1: 192.0.2.1:4800 -> 192.0.2.2:4800, priority 1, weight 1, bfd tx 10ms rx 10ms x3, single hop",
            "path dx-1:",
        ] {
            assert!(s.contains(needle), "summary lacks {needle:?}:\n{s}");
        }
        assert!(s.lines().count() < 25);
    }

    #[test]
    fn truncated_or_mangled_input_never_panics() {
        let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 1, secret_file = \"/k\" }\n");
        for (i, _) in text.char_indices() {
            let mangled = format!("{}\"]{}", &text[..i], &text[i..]);
            for t in [&text[..i], mangled.as_str()] {
                if let Err(e) = Config::parse(t, "t.toml") {
                    assert!(e.line.is_some() && !e.key.is_empty(), "{e}");
                }
            }
        }
    }
}
