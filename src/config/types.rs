//! The validated, typed configuration that the rest of the daemon reads:
//! every default resolved, every value checked.

use super::*;

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
    /// This gateway's X25519 private key (base64, `crosslink genkey`), for
    /// the peers that have a `public_key`.
    pub private_key_file: Option<PathBuf>,
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
    /// DSCP of the control packets sent (0..=63; default CS6, network
    /// control).
    pub dscp: u8,
    /// Repeated control packets of an Up session are taken in the kernel
    /// by a BPF program (README: BFD receive offload).
    pub offload: bool,
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
            dscp: DEFAULT_BFD_DSCP,
            offload: false,
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
    Aggregate,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::ActiveBackup => "active-backup",
            Policy::Balance => "balance",
            Policy::Duplicate => "duplicate",
            Policy::Aggregate => "aggregate",
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
    /// The far gateway's X25519 public key: the peer's traffic is sealed
    /// under session keys from a handshake (`key_file`, if also set, is
    /// mixed into it as a pre-shared key). Needs `[gateway] private_key_file`.
    pub public_key: Option<crate::core::keypair::PublicKey>,
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
    /// `[peer.sla]`, resolved: the paths' defaults.
    pub sla: SlaConfig,
    /// `aggregate`: how long a receiving lane holds packets behind a gap;
    /// `None` (`"auto"`): from the paths' delay difference
    /// ([`crate::core::aggregate::reorder_wait`]).
    pub reorder_wait: Option<Duration>,
    /// Forward error correction (`fec`, `fec_target_loss`, `fec_max_overhead`).
    pub fec: FecConfig,
    pub paths: Vec<PathConfig>,
}

/// What a peer's `fec` key asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FecMode {
    /// No parity, ever.
    #[default]
    Off,
    /// Parity sized by the measured loss of the peer's paths
    /// ([`crate::core::fec::auto_code`]); none while they lose nothing.
    Auto,
    /// This code whenever the peer has a path (`"10+2"`).
    Fixed(Code),
}

impl fmt::Display for FecMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FecMode::Off => f.write_str("off"),
            FecMode::Auto => f.write_str("auto"),
            FecMode::Fixed(c) => write!(f, "{c}"),
        }
    }
}

/// A peer's forward-error-correction settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FecConfig {
    pub mode: FecMode,
    /// `auto` aims at a residual loss at most this (millionths).
    pub target_loss_ppm: u32,
    /// `auto` adds at most this much parity (millionths of the data).
    pub max_overhead_ppm: u32,
}

impl Default for FecConfig {
    fn default() -> Self {
        FecConfig {
            mode: FecMode::Off,
            target_loss_ppm: DEFAULT_FEC_TARGET_LOSS_PPM,
            max_overhead_ppm: DEFAULT_FEC_MAX_OVERHEAD_PPM,
        }
    }
}

impl FecConfig {
    /// `fec = "off"`.
    pub fn off() -> FecConfig {
        FecConfig {
            mode: FecMode::Off,
            ..FecConfig::default()
        }
    }

    /// The target as a ratio.
    pub fn target_loss(&self) -> f64 {
        f64::from(self.target_loss_ppm) / 1e6
    }

    /// The cap as a ratio.
    pub fn max_overhead(&self) -> f64 {
        f64::from(self.max_overhead_ppm) / 1e6
    }
}

/// `fec_target_loss` unless set: 0.1 %.
pub const DEFAULT_FEC_TARGET_LOSS_PPM: u32 = 1_000;
/// `fec_max_overhead` unless set: 30 %.
pub const DEFAULT_FEC_MAX_OVERHEAD_PPM: u32 = 300_000;

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
    /// The peer's `[peer.sla]` merged with this path's `[peer.path.sla]`.
    pub sla: SlaConfig,
    /// The outer DSCP of the path's data datagrams: this path's `dscp`,
    /// else the peer's, else inherited from each inner packet.
    pub dscp: Dscp,
    /// `aggregate`: the path's rate in bytes per second (`rate =
    /// "300Mbit/s"`), the scheduler's starting estimate and its ceiling,
    /// and the rate the sending gateway paces the path at.
    pub rate: Option<u64>,
}

/// The DSCP written in the outer header of a data datagram (its ECN field
/// always follows the inner packet's, RFC 6040).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dscp {
    /// The inner packet's DSCP (a kernel tunnel's `tos inherit`).
    #[default]
    Inherit,
    /// This value, 0..=63.
    Fixed(u8),
}

impl Dscp {
    /// The fixed value, `None` for inherit.
    pub fn fixed(self) -> Option<u8> {
        match self {
            Dscp::Inherit => None,
            Dscp::Fixed(d) => Some(d),
        }
    }
}

/// The DSCP names accepted besides numbers (RFC 4594, RFC 5865, RFC 8622).
const DSCP_NAMES: [(&str, u8); 24] = [
    ("cs0", 0),
    ("cs1", 8),
    ("cs2", 16),
    ("cs3", 24),
    ("cs4", 32),
    ("cs5", 40),
    ("cs6", 48),
    ("cs7", 56),
    ("af11", 10),
    ("af12", 12),
    ("af13", 14),
    ("af21", 18),
    ("af22", 20),
    ("af23", 22),
    ("af31", 26),
    ("af32", 28),
    ("af33", 30),
    ("af41", 34),
    ("af42", 36),
    ("af43", 38),
    ("ef", 46),
    ("va", 44),
    ("le", 1),
    ("default", 0),
];

const DSCP_HELP: &str =
    "expected \"inherit\", a class name (\"cs0\"..\"cs7\", \"af11\"..\"af43\", \"ef\", \"va\", \"le\") or a number 0..63";

impl FromStr for Dscp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        if name == "inherit" {
            return Ok(Dscp::Inherit);
        }
        if let Some((_, v)) = DSCP_NAMES.iter().find(|(n, _)| *n == name) {
            return Ok(Dscp::Fixed(*v));
        }
        match name.parse::<u8>() {
            Ok(v) if v <= 63 => Ok(Dscp::Fixed(v)),
            _ => Err(format!("invalid DSCP \"{s}\": {DSCP_HELP}")),
        }
    }
}

impl fmt::Display for Dscp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dscp::Inherit => f.write_str("inherit"),
            Dscp::Fixed(d) => write!(f, "{d}"),
        }
    }
}

impl<'de> Deserialize<'de> for Dscp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dscp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"inherit\", a DSCP class name like \"cs6\", or a number 0..63")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dscp, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dscp, E> {
                match u8::try_from(v) {
                    Ok(d) if d <= 63 => Ok(Dscp::Fixed(d)),
                    _ => Err(E::custom(format!("invalid DSCP {v}: {DSCP_HELP}"))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dscp, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V)
    }
}

/// The service level a path must keep to carry traffic (`[peer.sla]`, any
/// key overridable per path in `[peer.path.sla]`); see
/// [`crate::core::quality`] for how it is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlaConfig {
    /// Largest loss ratio in the path's sending direction, in millionths
    /// (`max_loss = "1%"` is 10 000). 1 000 000 turns loss checks off.
    pub max_loss_ppm: u32,
    /// Largest round-trip time (median of the last 300 ms); `None`: no limit.
    pub max_rtt: Option<Duration>,
    /// Largest delay variation in the sending direction (RFC 3550 jitter);
    /// `None`: no limit.
    pub max_jitter: Option<Duration>,
    /// How long a degraded path must have been good before it carries
    /// traffic again (doubled for a path that keeps degrading).
    pub hold: Duration,
    /// Time between two probes on the path.
    pub probe_interval: Duration,
    /// Time between two probes while the peer carries no data (`None`:
    /// `probe_interval` always).
    pub idle_probe_interval: Option<Duration>,
    /// Moves of the peer's traffic for quality (not for failure) allowed in
    /// any minute; further ones wait.
    pub max_moves_per_minute: u32,
}

impl SlaConfig {
    /// The largest loss ratio, 0 to 1.
    pub fn max_loss(&self) -> f64 {
        f64::from(self.max_loss_ppm) / 1e6
    }
}

impl Default for SlaConfig {
    fn default() -> Self {
        SlaConfig {
            max_loss_ppm: DEFAULT_MAX_LOSS_PPM,
            max_rtt: None,
            max_jitter: None,
            hold: DEFAULT_SLA_HOLD,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            idle_probe_interval: None,
            max_moves_per_minute: DEFAULT_MAX_MOVES_PER_MINUTE,
        }
    }
}
