//! Step 2 of loading: the rules that span several values (ranges,
//! uniqueness, address families), and the defaults they resolve, such as
//! each path's BFD settings merged key by key over the gateway's `[bfd]`.

use super::*;
use crate::core::keypair::PublicKey;

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

pub(super) fn k(key: &str) -> Seg {
    Seg::Key(key.to_string())
}

/// A validation failure, before it is located in the document.
#[derive(Debug)]
pub(super) struct Invalid {
    pub(super) path: Vec<Seg>,
    pub(super) message: String,
}

pub(super) type VResult<T> = Result<T, Invalid>;

pub(super) fn invalid<T>(base: &[Seg], tail: &[Seg], message: impl Into<String>) -> VResult<T> {
    let mut path = base.to_vec();
    path.extend_from_slice(tail);
    Err(Invalid {
        path,
        message: message.into(),
    })
}

pub(super) fn validate(raw: RawConfig) -> VResult<Config> {
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
    if gateway.private_key_file.is_none() {
        if let Some(i) = peers.iter().position(|p| p.public_key.is_some()) {
            return invalid(
                &[k("peer"), Seg::Index(i)],
                &[k("public_key")],
                "needs [gateway] private_key_file (this gateway's key, from `crosslink genkey`)",
            );
        }
    }
    check_unique_underlay(&peers)?;
    Ok(Config {
        gateway,
        metrics,
        bfd,
        peers,
    })
}

pub(super) fn validate_gateway(g: RawGateway) -> VResult<GatewayConfig> {
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
    if let Some(f) = &g.private_key_file {
        if f.as_os_str().is_empty() {
            return invalid(&at, &[k("private_key_file")], "must not be empty");
        }
    }
    Ok(GatewayConfig {
        name: g.name,
        control_socket,
        private_key_file: g.private_key_file,
    })
}

/// `base` with every key present in `over` replaced, each value checked where it is written.
pub(super) fn merge_bfd(base: &BfdConfig, over: &RawBfd, at: &[Seg]) -> VResult<BfdConfig> {
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
    match over.dscp {
        Some(Dscp::Fixed(d)) => b.dscp = d,
        Some(Dscp::Inherit) => {
            return invalid(
                at,
                &[k("dscp")],
                "a BFD control packet has no inner packet to inherit from: give a class such as \"cs6\" or a number 0..63",
            )
        }
        None => {}
    }
    if let Some(p) = over.passive {
        b.passive = p;
    }
    if let Some(o) = over.offload {
        b.offload = o;
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
    if b.offload && b.auth.is_some() {
        return invalid(
            at,
            &[k("offload")],
            "cannot offload an authenticated session: its packets never repeat (the sequence number moves); drop `offload` or `auth`",
        );
    }
    Ok(b)
}

/// `base` with the keys `over` sets; `path_level`: per-path overrides,
/// which may not set the peer-wide `max_moves_per_minute`.
pub(super) fn merge_sla(
    base: &SlaConfig,
    over: &RawSla,
    at: &[Seg],
    path_level: bool,
) -> VResult<SlaConfig> {
    let mut sla = *base;
    if let Some(Percent(ppm)) = over.max_loss {
        if ppm == 0 {
            return invalid(
                at,
                &[k("max_loss")],
                "must be more than 0% (\"100%\" turns loss checks off)",
            );
        }
        sla.max_loss_ppm = ppm;
    }
    if let Some(Limit(l)) = over.max_rtt {
        if l.is_some_and(|d| d.is_zero()) {
            return invalid(at, &[k("max_rtt")], "must be more than 0 (or \"off\")");
        }
        sla.max_rtt = l;
    }
    if let Some(Limit(l)) = over.max_jitter {
        if l.is_some_and(|d| d.is_zero()) {
            return invalid(at, &[k("max_jitter")], "must be more than 0 (or \"off\")");
        }
        sla.max_jitter = l;
    }
    if let Some(Dur(h)) = over.hold {
        if h > MAX_REVERT_HOLD {
            let msg = format!("{} is too long: at most 1h", format_duration(h));
            return invalid(at, &[k("hold")], msg);
        }
        sla.hold = h;
    }
    if let Some(Dur(i)) = over.probe_interval {
        if !(MIN_BFD_INTERVAL..=Duration::from_secs(10)).contains(&i) {
            let msg = format!(
                "{} is out of range: must be between 1ms and 10s",
                format_duration(i)
            );
            return invalid(at, &[k("probe_interval")], msg);
        }
        sla.probe_interval = i;
    }
    if let Some(Limit(l)) = over.idle_probe_interval {
        if let Some(i) = l.filter(|&i| i > Duration::from_secs(10)) {
            let msg = format!("{} is too long: at most 10s", format_duration(i));
            return invalid(at, &[k("idle_probe_interval")], msg);
        }
        sla.idle_probe_interval = l;
    }
    if let Some(i) = sla.idle_probe_interval {
        if i < sla.probe_interval {
            let msg = format!(
                "{} is shorter than probe_interval ({}): an idle peer is probed less often, not more",
                format_duration(i),
                format_duration(sla.probe_interval)
            );
            return invalid(at, &[k("idle_probe_interval")], msg);
        }
    }
    if let Some(m) = over.max_moves_per_minute {
        if path_level {
            return invalid(
                at,
                &[k("max_moves_per_minute")],
                "is a peer setting: set it in [peer.sla]",
            );
        }
        sla.max_moves_per_minute = m;
    }
    Ok(sla)
}

pub(super) fn check_ifname(name: &str, at: &[Seg], key: &str) -> VResult<()> {
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

pub(super) fn validate_peer(p: RawPeer, at: &[Seg], gw_bfd: &BfdConfig) -> VResult<PeerConfig> {
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
    let public_key = match &p.public_key {
        Some(text) => match PublicKey::parse(text) {
            Ok(key) => Some(key),
            Err(e) => return invalid(at, &[k("public_key")], e.to_string()),
        },
        None => None,
    };
    if public_key.is_some() && p.accept_key_file.is_some() {
        return invalid(
            at,
            &[k("accept_key_file")],
            "not with public_key: session keys change by themselves (key_file is the pre-shared key mixed into the handshake)",
        );
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
    let sla = match &p.sla {
        Some(over) => {
            let mut sat = at.to_vec();
            sat.push(k("sla"));
            merge_sla(&SlaConfig::default(), over, &sat, false)?
        }
        None => SlaConfig::default(),
    };
    let fec = validate_fec(&p, at)?;
    let paths = p
        .path
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let mut pat = at.to_vec();
            pat.extend([k("path"), Seg::Index(i)]);
            validate_path(raw, &pat, i, gw_bfd, &sla, p.dscp.unwrap_or_default())
        })
        .collect::<VResult<Vec<_>>>()?;
    let mut names = HashSet::new();
    for (i, path) in paths.iter().enumerate() {
        if !names.insert(path.name.as_str()) {
            let msg = format!("duplicate path name \"{}\" in this peer", path.name);
            return invalid(at, &[k("path"), Seg::Index(i), k("name")], msg);
        }
    }
    let reorder_wait = p.reorder_wait.and_then(|w| w.0);
    if let Some(w) = reorder_wait {
        if w.is_zero() || w > MAX_REORDER_WAIT {
            let msg = format!(
                "{} is out of range: more than 0 and at most 1s (or \"auto\")",
                format_duration(w)
            );
            return invalid(at, &[k("reorder_wait")], msg);
        }
    }
    if p.fast_path {
        check_fast_path(
            p.key_file.is_some() || public_key.is_some(),
            p.policy,
            &paths,
            at,
        )?;
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
        public_key,
        mtu: p.mtu,
        route_metric: p.route_metric,
        fast_path: p.fast_path,
        sla,
        reorder_wait,
        fec,
        paths,
    })
}

/// `fec`, `fec_target_loss`, `fec_max_overhead`: `off` unless said. A
/// fast-path peer has no FEC (the kernel fast path sends no parity):
/// anything but `off` is refused.
pub(super) fn validate_fec(p: &RawPeer, at: &[Seg]) -> VResult<FecConfig> {
    let mode = match p.fec.as_deref().map(str::trim) {
        None | Some("off") => FecMode::Off,
        Some("auto") => FecMode::Auto,
        Some(code) => match Code::parse(code) {
            Some(c) => FecMode::Fixed(c),
            None => {
                let msg = format!(
                    "invalid value \"{code}\": expected \"auto\", \"off\" or a code \"k+m\" \
                     (1 to {} data packets, 1 to {} parity packets, e.g. \"10+2\")",
                    crate::core::fec::MAX_K,
                    crate::core::fec::MAX_M
                );
                return invalid(at, &[k("fec")], msg);
            }
        },
    };
    if mode != FecMode::Off && p.fast_path {
        let msg = "the kernel fast path sends no parity: set fec = \"off\" or fast_path = false";
        return invalid(at, &[k("fec")], msg);
    }
    if matches!(mode, FecMode::Fixed(_)) && p.policy == Policy::Duplicate {
        let msg = "`duplicate` already sends every packet twice: use \"off\" or \"auto\"";
        return invalid(at, &[k("fec")], msg);
    }
    let target_loss_ppm = p
        .fec_target_loss
        .map_or(DEFAULT_FEC_TARGET_LOSS_PPM, |Percent(v)| v);
    if target_loss_ppm == 0 || target_loss_ppm >= 1_000_000 {
        return invalid(
            at,
            &[k("fec_target_loss")],
            "must be more than 0% and less than 100%",
        );
    }
    let max_overhead_ppm = p
        .fec_max_overhead
        .map_or(DEFAULT_FEC_MAX_OVERHEAD_PPM, |Percent(v)| v);
    Ok(FecConfig {
        mode,
        target_loss_ppm,
        max_overhead_ppm,
    })
}

/// What the kernel fast path can carry: cleartext, `active-backup` or
/// `balance`, an IPv4 or IPv6 underlay (each path its own) from a concrete
/// local address.
pub(super) fn check_fast_path(
    keyed: bool,
    policy: Policy,
    paths: &[PathConfig],
    at: &[Seg],
) -> VResult<()> {
    let why = if keyed {
        Some(
            "needs a cleartext peer (no key_file or public_key): sealing stays in user space"
                .to_string(),
        )
    } else if !matches!(policy, Policy::ActiveBackup | Policy::Balance) {
        Some(format!(
            "needs policy \"active-backup\" or \"balance\" (this peer's is \"{policy}\")"
        ))
    } else if paths.len() > FAST_PATH_MAX_PATHS {
        Some(format!(
            "carries at most {} paths per peer",
            FAST_PATH_MAX_PATHS
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return invalid(at, &[k("fast_path")], why);
    }
    for (i, path) in paths.iter().enumerate() {
        if path.local.ip().is_unspecified() {
            let msg = format!(
                "fast_path needs a concrete local address (the interface that holds it carries \
                 the path), not {}",
                path.local
            );
            return invalid(at, &[k("path"), Seg::Index(i), k("local")], msg);
        }
    }
    Ok(())
}

pub(super) fn check_routes(routes: &[Prefix], at: &[Seg]) -> VResult<()> {
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

pub(super) fn validate_path(
    p: RawPath,
    at: &[Seg],
    index: usize,
    gw_bfd: &BfdConfig,
    peer_sla: &SlaConfig,
    peer_dscp: Dscp,
) -> VResult<PathConfig> {
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
    let sla = match &p.sla {
        Some(over) => {
            let mut sat = at.to_vec();
            sat.push(k("sla"));
            merge_sla(peer_sla, over, &sat, true)?
        }
        None => *peer_sla,
    };
    Ok(PathConfig {
        name: p.name,
        local,
        remote,
        interface: p.interface,
        priority: p.priority.unwrap_or(default_priority),
        weight,
        bfd,
        sla,
        dscp: p.dscp.unwrap_or(peer_dscp),
        rate: p.rate.map(|r| r.0),
    })
}

pub(super) fn check_unique_peers(peers: &[PeerConfig]) -> VResult<()> {
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
pub(super) fn check_unique_underlay(peers: &[PeerConfig]) -> VResult<()> {
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
