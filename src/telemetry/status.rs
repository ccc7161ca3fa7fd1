//! The status document (`crosslink status --json`) and its human table.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub gateway: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub peers: Vec<PeerStatus>,
    /// Packets dropped since start, by reason (the labels of
    /// `crosslink_packets_dropped_total`); reasons at zero are left out.
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
    /// How long the BFD thread was kept from its work, since start
    /// (absent from older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd_thread: Option<BfdThreadStatus>,
}

/// The BFD thread's own view of the host: a session's transmit gap over
/// twice its interval with a worst here near it was the host's doing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BfdThreadStatus {
    /// Times it was held 10 ms or more: a wake-up that late, a stretch of
    /// work that long, or that long off its CPU in one.
    pub stalls: u64,
    /// The latest wake-up past its deadline, microseconds.
    pub worst_late_us: u64,
    /// The longest time off its CPU in a stretch of work while it could
    /// run (the kernel ran something else: a higher-priority thread, or
    /// the share the scheduler keeps for normal threads), microseconds.
    pub worst_preempted_us: u64,
    /// The longest time off its CPU in a stretch of work while it waited
    /// in a system call, microseconds.
    pub worst_blocked_us: u64,
    /// The longest time its clock stood still in a stretch of work without
    /// a switch: the hypervisor took the virtual CPU, microseconds.
    #[serde(default)]
    pub worst_stolen_us: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub tun: String,
    pub up: bool,
    pub policy: String,
    pub active_path: Option<String>,
    pub paths: Vec<PathStatus>,
    /// Packets an `aggregate` sender spread over the paths, put back in
    /// order by this gateway's lanes (absent when none ever came).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<ReorderStatus>,
    /// Forward error correction (absent when it is off and never did
    /// anything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fec: Option<FecStatus>,
    /// The key-pair handshake (peers with a `public_key` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake: Option<HandshakeStatus>,
}

/// A key-pair peer's handshake (`crate::core::handshake`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HandshakeStatus {
    /// `idle`, `initiating` or `established`.
    pub state: String,
    /// Age of the keys that seal now, seconds (absent without a session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_age_s: Option<u64>,
    /// Handshakes completed since start.
    pub completed: u64,
    /// Of them, those that replaced a session (every one but the first).
    pub rekeys: u64,
    /// Handshake messages dropped or handshakes failed, by reason.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub failures: std::collections::BTreeMap<String, u64>,
}

/// A peer's forward error correction (`crate::core::fec`): the setting,
/// the code in use and what it did, summed over the lanes since start.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FecStatus {
    /// `auto`, `off` or the fixed code (`10+2`).
    pub mode: String,
    /// The code in use now (`none`: no parity).
    pub code: String,
    /// Parity per data packet under that code.
    pub overhead_ratio: f64,
    /// The highest loss (sending direction) of the paths carrying the
    /// peer's traffic, which `auto` sizes the code by.
    pub loss: f64,
    pub parity_sent: u64,
    pub parity_received: u64,
    /// Lost packets rebuilt from parity.
    pub recovered: u64,
    /// Lost packets of blocks given up (too little parity in time).
    pub unrecoverable: u64,
    /// Parity dropped because it disagreed with itself or its block.
    #[serde(default)]
    pub bad_parity: u64,
}

/// A peer's resequencing (`crate::core::reorder`), summed over its lanes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReorderStatus {
    /// Packets held behind a gap, since start.
    pub held: u64,
    /// Held packets delivered in order once their gap filled.
    pub reordered: u64,
    /// Missing packets given up (lost, or later than the wait).
    pub gave_up: u64,
    /// Packets that came after their gap was given up (delivered late).
    pub late: u64,
    /// Held now.
    pub buffered_packets: u64,
    pub buffered_bytes: u64,
    /// How long a gap may hold packets back, microseconds.
    pub wait_us: u64,
}

/// A path under `aggregate`: its share of the packets the lanes sent (a
/// super-packet counts once) and what the scheduler believes of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AggregateStatus {
    pub share: f64,
    /// Estimated rate, bits per second.
    pub rate_bps: u64,
    /// Estimated one-way delay (half the smoothed round trip), microseconds.
    pub delay_us: u64,
    /// The rate the sending gateway paces the path at (a configured `rate`,
    /// or the estimate when lower), bits per second; `None`: not paced.
    #[serde(default)]
    pub pace_bps: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PathStatus {
    pub name: String,
    pub state: String,
    pub active: bool,
    pub flows: u64,
    pub local: String,
    pub remote: String,
    pub priority: u32,
    pub weight: u32,
    pub bfd: BfdStatus,
    /// A fast signal keeping the path out of service: "link_down" or "send_error".
    #[serde(default)]
    pub blocked: Option<String>,
    /// Times the path lost health since start.
    #[serde(default)]
    pub flaps: u64,
    /// Flap damping level (0: none).
    #[serde(default)]
    pub damping_level: u32,
    /// While damped: when the path may carry traffic again.
    #[serde(default)]
    pub damped_until_unix: Option<u64>,
    /// What the path's probes and data measure, and the verdict.
    #[serde(default)]
    pub quality: QualityStatus,
    /// Under `aggregate` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateStatus>,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A path's quality (see `crate::core::quality`): loss ratios over the last
/// 3 s per direction (tx: what this gateway sends), the median round trip
/// of the probes, their delay variation each way, the share of replies that
/// came out of order, and whether the path breaks its service level.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct QualityStatus {
    pub loss_ratio_tx: Option<f64>,
    pub loss_ratio_rx: Option<f64>,
    pub rtt_us: Option<u64>,
    /// Sending direction.
    pub jitter_us: Option<u64>,
    #[serde(default)]
    pub jitter_rx_us: Option<u64>,
    #[serde(default)]
    pub reorder_ratio: Option<f64>,
    pub degraded: bool,
    /// "loss", "rtt", "jitter" or "mtu" while degraded.
    pub degraded_reason: Option<String>,
    /// The interval the path is probed at now: `probe_interval`, or
    /// `idle_probe_interval` while the peer carries no data.
    #[serde(default)]
    pub probe_interval_us: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BfdStatus {
    pub local_state: String,
    pub remote_state: String,
    pub local_diag: String,
    /// The diagnostic in the peer's last packet.
    #[serde(default)]
    pub remote_diag: String,
    /// Largest gap between two control packets sent while Up, in microseconds.
    #[serde(default)]
    pub max_tx_gap_us: u64,
    /// Whether RFC 5880 authentication is configured on the session.
    #[serde(default)]
    pub auth: bool,
    /// Up -> Down changes that were failures (not administrative).
    #[serde(default)]
    pub failures: u64,
    /// Times the peer took the session down with AdminDown (not failures).
    #[serde(default)]
    pub remote_admin_downs: u64,
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    pub tx_interval_us: u64,
    pub detect_time_us: u64,
    pub rtt_us: Option<u64>,
    pub transitions: u64,
    pub last_change_unix: Option<u64>,
    pub control_tx: u64,
    /// Control packets received, those the receive offload took included.
    pub control_rx: u64,
    /// The receive offload takes the session's repeated packets now
    /// (`bfd.offload`, both ends Up).
    #[serde(default)]
    pub offloaded: bool,
}

impl Status {
    /// The human table: one block per peer, one row per path.
    pub fn table(&self, now_unix: u64) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "gateway {} (crosslink {}), up {}",
            self.gateway,
            self.version,
            human_age(self.uptime_seconds)
        );
        for peer in &self.peers {
            let _ = writeln!(
                s,
                "\npeer {}  tun {}  {}  policy {}",
                peer.name,
                peer.tun,
                if peer.up { "UP" } else { "DOWN" },
                peer.policy
            );
            let _ = writeln!(
                s,
                "  {:<14} {:<16} {:<6} {:>5} {:>9} {:>13} {:>8} {:>9} {:>10} {:>10}  LOCAL -> REMOTE",
                "PATH",
                "STATE",
                "ACTIVE",
                "FLOWS",
                "RTT",
                "LOSS TX/RX",
                "DETECT",
                "CHANGED",
                "TX PKTS",
                "RX PKTS",
            );
            for p in &peer.paths {
                let rtt = p
                    .quality
                    .rtt_us
                    .or(p.bfd.rtt_us)
                    .map_or("-".to_string(), micros);
                let loss = format!(
                    "{}/{}",
                    percent(p.quality.loss_ratio_tx),
                    percent(p.quality.loss_ratio_rx)
                );
                let changed = p.bfd.last_change_unix.map_or("-".to_string(), |t| {
                    format!("{} ago", human_age(now_unix.saturating_sub(t)))
                });
                let state = if let Some(cause) = &p.blocked {
                    format!("{} ({cause})", p.state)
                } else if let Some(reason) = &p.quality.degraded_reason {
                    format!("{} ({reason})", p.state)
                } else if p.damped_until_unix.is_some() {
                    format!("{} (damped)", p.state)
                } else if p.bfd.local_diag != "none" && p.state != "up" {
                    format!("{} ({})", p.state, short_diag(&p.bfd.local_diag))
                } else {
                    p.state.clone()
                };
                let _ = writeln!(
                    s,
                    "  {:<14} {:<16} {:<6} {:>5} {:>9} {:>13} {:>8} {:>9} {:>10} {:>10}  {} -> {}",
                    p.name,
                    state,
                    if p.active { "*" } else { "" },
                    p.flows,
                    rtt,
                    loss,
                    micros(p.bfd.detect_time_us),
                    changed,
                    p.tx_packets,
                    p.rx_packets,
                    p.local,
                    p.remote
                );
            }
            let spread: Vec<String> = peer
                .paths
                .iter()
                .filter_map(|p| {
                    let a = p.aggregate.as_ref()?;
                    let paced = a
                        .pace_bps
                        .map(|b| format!(", paced at {}", rate(b)))
                        .unwrap_or_default();
                    Some(format!(
                        "{} {:.0}% at {} ({} one way{paced})",
                        p.name,
                        a.share * 100.0,
                        rate(a.rate_bps),
                        micros(a.delay_us)
                    ))
                })
                .collect();
            if !spread.is_empty() {
                let _ = writeln!(s, "  aggregate: {}", spread.join(", "));
            }
            if let Some(h) = &peer.handshake {
                let age = h
                    .keys_age_s
                    .map_or_else(|| "no keys".to_string(), |a| format!("keys {a}s old"));
                let fails: Vec<String> =
                    h.failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let fails = match fails.is_empty() {
                    true => String::new(),
                    false => format!(", failures: {}", fails.join(", ")),
                };
                let _ = writeln!(
                    s,
                    "  handshake: {}, {age}, {} completed{fails}",
                    h.state, h.completed
                );
            }
            if let Some(r) = &peer.reorder {
                let _ = writeln!(
                    s,
                    "  reorder: held {}, reordered {}, gave up {}, late {}, buffered {}, wait {}",
                    r.held,
                    r.reordered,
                    r.gave_up,
                    r.late,
                    r.buffered_packets,
                    micros(r.wait_us)
                );
            }
            if let Some(f) = &peer.fec {
                let _ = writeln!(
                    s,
                    "  fec: {} (code {}, overhead {:.0}%, loss {:.2}%), parity sent {}, received {}, rebuilt {}, given up {}",
                    f.mode,
                    f.code,
                    f.overhead_ratio * 100.0,
                    f.loss * 100.0,
                    f.parity_sent,
                    f.parity_received,
                    f.recovered,
                    f.unrecoverable
                );
            }
        }
        s
    }
}

fn short_diag(d: &str) -> &str {
    match d {
        "control_detection_expired" => "timeout",
        "neighbor_down" => "nbr down",
        "admin_down" => "admin",
        other => other,
    }
}

fn percent(ratio: Option<f64>) -> String {
    match ratio {
        None => "-".to_string(),
        Some(0.0) => "0%".to_string(),
        Some(r) if r < 0.001 => "<0.1%".to_string(),
        Some(r) => format!("{:.1}%", r * 100.0),
    }
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{}ms", us / 1000)
    } else if us >= 1000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{us}us")
    }
}

fn rate(bps: u64) -> String {
    match bps {
        b if b >= 10_000_000_000 => format!("{} Gbit/s", b / 1_000_000_000),
        b if b >= 1_000_000_000 => format!("{:.1} Gbit/s", b as f64 / 1e9),
        b => format!("{} Mbit/s", b / 1_000_000),
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Status {
        Status {
            drops: Default::default(),
            bfd_thread: None,
            gateway: "onprem-1".into(),
            version: "0.1.0".into(),
            uptime_seconds: 75,
            peers: vec![PeerStatus {
                name: "gcp".into(),
                tun: "xl-gcp".into(),
                up: true,
                policy: "active-backup".into(),
                active_path: Some("cci-1".into()),
                reorder: None,
                fec: None,
                handshake: None,
                paths: vec![PathStatus {
                    name: "cci-1".into(),
                    state: "up".into(),
                    active: true,
                    flows: 12,
                    local: "192.0.2.1:4800".into(),
                    remote: "192.0.2.2:4800".into(),
                    priority: 1,
                    weight: 1,
                    bfd: BfdStatus {
                        local_state: "up".into(),
                        remote_state: "up".into(),
                        local_diag: "none".into(),
                        remote_diag: "none".into(),
                        max_tx_gap_us: 10_500,
                        auth: false,
                        failures: 0,
                        remote_admin_downs: 0,
                        local_discriminator: 1,
                        remote_discriminator: 2,
                        tx_interval_us: 10_000,
                        detect_time_us: 30_000,
                        rtt_us: Some(180),
                        transitions: 3,
                        last_change_unix: Some(1_790_000_000),
                        control_tx: 10,
                        control_rx: 9,
                        offloaded: false,
                    },
                    blocked: None,
                    flaps: 2,
                    damping_level: 1,
                    damped_until_unix: None,
                    aggregate: None,
                    quality: QualityStatus {
                        loss_ratio_tx: Some(0.052),
                        loss_ratio_rx: Some(0.0),
                        rtt_us: Some(180),
                        jitter_us: Some(20),
                        jitter_rx_us: Some(15),
                        reorder_ratio: Some(0.0),
                        degraded: true,
                        degraded_reason: Some("loss".into()),
                        probe_interval_us: Some(10_000),
                    },
                    tx_packets: 1000,
                    rx_packets: 998,
                    tx_bytes: 0,
                    rx_bytes: 0,
                }],
            }],
        }
    }

    #[test]
    fn json_has_the_spec_fields() {
        let v = serde_json::to_value(sample()).unwrap();
        for k in ["gateway", "version", "peers"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        let peer = &v["peers"][0];
        for k in ["name", "tun", "up", "policy", "paths"] {
            assert!(peer.get(k).is_some(), "{k}");
        }
        let path = &peer["paths"][0];
        for k in [
            "name",
            "state",
            "active",
            "flows",
            "local",
            "remote",
            "bfd",
            "tx_packets",
            "rx_packets",
            "tx_bytes",
            "rx_bytes",
            "blocked",
            "flaps",
            "damping_level",
            "damped_until_unix",
            "quality",
        ] {
            assert!(path.get(k).is_some(), "{k}");
        }
        for k in [
            "loss_ratio_tx",
            "loss_ratio_rx",
            "rtt_us",
            "jitter_us",
            "degraded",
            "degraded_reason",
        ] {
            assert!(path["quality"].get(k).is_some(), "quality.{k}");
        }
        for k in [
            "local_state",
            "remote_state",
            "local_diag",
            "tx_interval_us",
            "detect_time_us",
            "rtt_us",
            "transitions",
            "last_change_unix",
        ] {
            assert!(path["bfd"].get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn table_shows_each_path() {
        let t = sample().table(1_790_000_060);
        assert!(t.contains("peer gcp"));
        assert!(t.contains("cci-1"));
        assert!(t.contains("60s ago"));
        assert!(t.contains("30ms"));
        assert!(t.contains("up (loss)"), "{t}");
        assert!(t.contains("5.2%/0%"), "{t}");
        assert!(!t.contains("aggregate:"), "{t}");
    }

    #[test]
    fn table_shows_the_spread_and_the_reordering() {
        let mut st = sample();
        let peer = &mut st.peers[0];
        peer.policy = "aggregate".into();
        peer.paths[0].aggregate = Some(AggregateStatus {
            share: 0.74,
            rate_bps: 300_000_000,
            delay_us: 2500,
            pace_bps: Some(280_000_000),
        });
        peer.reorder = Some(ReorderStatus {
            held: 120,
            reordered: 118,
            gave_up: 2,
            late: 1,
            buffered_packets: 0,
            buffered_bytes: 0,
            wait_us: 5000,
        });
        let t = st.table(1_790_000_060);
        assert!(
            t.contains("aggregate: cci-1 74% at 300 Mbit/s (2.5ms one way, paced at 280 Mbit/s)"),
            "{t}"
        );
        assert!(
            t.contains("reorder: held 120, reordered 118, gave up 2, late 1"),
            "{t}"
        );
    }
}
