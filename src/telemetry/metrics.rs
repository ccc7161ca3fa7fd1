//! Prometheus metrics. Handles are resolved once at start-up; the
//! forwarding threads only touch their own atomics ([`super::PathCounters`]),
//! which [`Metrics::sync`] copies into the exporter every scrape interval.

use super::{DropCounters, PathCounters};
use crate::drop::DropReason;
use crate::wire::bfd::State;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

const RTT_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
const DETECTION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
];
const STATES: [State; 4] = [State::AdminDown, State::Down, State::Init, State::Up];

/// Starts the exporter on `listen` (must be called inside a tokio runtime).
pub fn install(listen: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            Matcher::Full("crosslink_path_rtt_seconds".into()),
            RTT_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("crosslink_failover_detection_seconds".into()),
                DETECTION_BUCKETS,
            )
        })
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("metrics listener on {listen}: {e}"))?;
    describe();
    Ok(())
}

fn describe() {
    describe_gauge!("crosslink_build_info", "Build information; always 1.");
    describe_gauge!(
        "crosslink_peer_up",
        "1 when the peer has at least one path carrying traffic."
    );
    describe_gauge!("crosslink_path_up", "1 when the path's BFD session is Up.");
    describe_gauge!(
        "crosslink_path_active",
        "1 when the path carries the peer's traffic."
    );
    describe_gauge!("crosslink_path_info", "Path addresses; always 1.");
    describe_gauge!(
        "crosslink_bfd_session_state",
        "1 for the BFD session's current state."
    );
    describe_counter!(
        "crosslink_bfd_session_transitions_total",
        "BFD session state changes."
    );
    describe_gauge!(
        "crosslink_bfd_detection_time_seconds",
        Unit::Seconds,
        "Negotiated BFD detection time."
    );
    describe_counter!(
        "crosslink_bfd_control_packets_sent_total",
        "BFD control packets sent."
    );
    describe_counter!(
        "crosslink_bfd_control_packets_received_total",
        "BFD control packets accepted."
    );
    describe_histogram!(
        "crosslink_path_rtt_seconds",
        Unit::Seconds,
        "Round-trip time on the path."
    );
    describe_counter!(
        "crosslink_path_transmit_packets_total",
        "Data packets sent on the path."
    );
    describe_counter!(
        "crosslink_path_transmit_bytes_total",
        Unit::Bytes,
        "Data bytes sent on the path."
    );
    describe_counter!(
        "crosslink_path_receive_packets_total",
        "Data packets received on the path."
    );
    describe_counter!(
        "crosslink_path_receive_bytes_total",
        Unit::Bytes,
        "Data bytes received on the path."
    );
    describe_counter!(
        "crosslink_packets_dropped_total",
        "Packets dropped, by reason."
    );
    describe_counter!(
        "crosslink_failovers_total",
        "Changes of a peer's active path."
    );
    describe_histogram!(
        "crosslink_failover_detection_seconds",
        Unit::Seconds,
        "Time from the last packet heard on a failed path to its failover."
    );
    describe_gauge!("crosslink_flows_active", "Flows seen recently on the path.");
    describe_gauge!(
        "crosslink_path_damped",
        "1 while flap damping holds a recovered path out of service longer than revert_hold."
    );
    describe_gauge!(
        "crosslink_path_damping_level",
        "Flap damping level of the path (0: none; the hold is revert_hold x 2^(level-1))."
    );
    describe_counter!(
        "crosslink_path_flaps_total",
        "Times the path lost health (BFD, carrier, address or send errors)."
    );
    describe_gauge!(
        "crosslink_path_blocked",
        "1 while a fast signal (carrier or address loss, send error) keeps the path out of service."
    );
    describe_gauge!(
        "crosslink_config_last_reload_successful",
        "1 when the last configuration load succeeded."
    );
}

/// Handles for one path.
pub struct PathMetrics {
    peer: String,
    path: String,
    up: Gauge,
    active: Gauge,
    state: [Gauge; 4],
    detection: Gauge,
    control_sent: Counter,
    control_received: Counter,
    pub rtt: Histogram,
    tx_packets: Counter,
    tx_bytes: Counter,
    rx_packets: Counter,
    rx_bytes: Counter,
    flows: Gauge,
    damped: Gauge,
    damping_level: Gauge,
    flaps: Counter,
    blocked: Gauge,
}

/// Everything the daemon exports.
pub struct Metrics {
    paths: Vec<PathMetrics>,
    peers: Vec<(String, Gauge, Histogram)>,
    drops: Vec<Counter>,
    reload_ok: Gauge,
}

/// A path as metrics need it.
pub struct PathLabels<'a> {
    pub peer: &'a str,
    pub path: &'a str,
    pub local: String,
    pub remote: String,
}

impl Metrics {
    /// Registers every series at its initial value.
    pub fn new(peers: &[&str], paths: &[PathLabels<'_>]) -> Metrics {
        gauge!("crosslink_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let peers = peers
            .iter()
            .map(|p| {
                let up = gauge!("crosslink_peer_up", "peer" => p.to_string());
                up.set(0.0);
                let det =
                    histogram!("crosslink_failover_detection_seconds", "peer" => p.to_string());
                (p.to_string(), up, det)
            })
            .collect();
        let paths = paths.iter().map(PathMetrics::new).collect();
        let drops = DropReason::ALL
            .iter()
            .map(|r| {
                let c = counter!("crosslink_packets_dropped_total", "reason" => r.as_str());
                c.absolute(0);
                c
            })
            .collect();
        let reload_ok = gauge!("crosslink_config_last_reload_successful");
        reload_ok.set(1.0);
        Metrics {
            paths,
            peers,
            drops,
            reload_ok,
        }
    }

    /// Copies the forwarding threads' counters into the exporter.
    pub fn sync(&self, counters: &[std::sync::Arc<PathCounters>], drops: &DropCounters) {
        for (m, c) in self.paths.iter().zip(counters) {
            m.tx_packets.absolute(c.tx_packets.load(Relaxed));
            m.tx_bytes.absolute(c.tx_bytes.load(Relaxed));
            m.rx_packets.absolute(c.rx_packets.load(Relaxed));
            m.rx_bytes.absolute(c.rx_bytes.load(Relaxed));
            m.flows.set(c.flows.load(Relaxed) as f64);
        }
        for (r, c) in DropReason::ALL.iter().zip(&self.drops) {
            c.absolute(drops.get(*r));
        }
    }

    pub fn path(&self, i: usize) -> Option<&PathMetrics> {
        self.paths.get(i)
    }

    pub fn set_peer_up(&self, peer: usize, up: bool) {
        if let Some((_, g, _)) = self.peers.get(peer) {
            g.set(f64::from(u8::from(up)));
        }
    }

    pub fn record_failover(&self, peer: usize, from: &str, to: &str, detection: Option<Duration>) {
        if let Some((name, _, det)) = self.peers.get(peer) {
            counter!("crosslink_failovers_total", "peer" => name.clone(), "from" => from.to_string(), "to" => to.to_string())
                .increment(1);
            if let Some(d) = detection {
                det.record(d.as_secs_f64());
            }
        }
    }

    pub fn set_reload_ok(&self, ok: bool) {
        self.reload_ok.set(f64::from(u8::from(ok)));
    }
}

impl PathMetrics {
    fn new(l: &PathLabels<'_>) -> PathMetrics {
        let (peer, path) = (l.peer.to_string(), l.path.to_string());
        let labels = [("peer", peer.clone()), ("path", path.clone())];
        gauge!("crosslink_path_info", "peer" => peer.clone(), "path" => path.clone(), "local" => l.local.clone(), "remote" => l.remote.clone()).set(1.0);
        let state = STATES.map(|s| {
            let g = gauge!("crosslink_bfd_session_state", "peer" => peer.clone(), "path" => path.clone(), "state" => s.as_str());
            g.set(f64::from(u8::from(s == State::Down)));
            g
        });
        let m = PathMetrics {
            up: gauge!("crosslink_path_up", &labels),
            active: gauge!("crosslink_path_active", &labels),
            state,
            detection: gauge!("crosslink_bfd_detection_time_seconds", &labels),
            control_sent: counter!("crosslink_bfd_control_packets_sent_total", &labels),
            control_received: counter!("crosslink_bfd_control_packets_received_total", &labels),
            rtt: histogram!("crosslink_path_rtt_seconds", &labels),
            tx_packets: counter!("crosslink_path_transmit_packets_total", &labels),
            tx_bytes: counter!("crosslink_path_transmit_bytes_total", &labels),
            rx_packets: counter!("crosslink_path_receive_packets_total", &labels),
            rx_bytes: counter!("crosslink_path_receive_bytes_total", &labels),
            flows: gauge!("crosslink_flows_active", &labels),
            damped: gauge!("crosslink_path_damped", &labels),
            damping_level: gauge!("crosslink_path_damping_level", &labels),
            flaps: counter!("crosslink_path_flaps_total", &labels),
            blocked: gauge!("crosslink_path_blocked", &labels),
            peer,
            path,
        };
        m.up.set(0.0);
        m.active.set(0.0);
        m.detection.set(0.0);
        for c in [
            &m.control_sent,
            &m.control_received,
            &m.tx_packets,
            &m.tx_bytes,
            &m.rx_packets,
            &m.rx_bytes,
            &m.flaps,
        ] {
            c.absolute(0);
        }
        m.flows.set(0.0);
        m.damped.set(0.0);
        m.damping_level.set(0.0);
        m.blocked.set(0.0);
        m
    }

    /// Flap damping and fast-signal state of the path.
    pub fn set_damping(&self, flaps: u64, level: u32, damped: bool, blocked: bool) {
        self.flaps.absolute(flaps);
        self.damping_level.set(f64::from(level));
        self.damped.set(f64::from(u8::from(damped)));
        self.blocked.set(f64::from(u8::from(blocked)));
    }

    pub fn set_state(&self, from: State, to: State) {
        for (s, g) in STATES.iter().zip(&self.state) {
            g.set(f64::from(u8::from(*s == to)));
        }
        self.up.set(f64::from(u8::from(to == State::Up)));
        counter!(
            "crosslink_bfd_session_transitions_total",
            "peer" => self.peer.clone(), "path" => self.path.clone(),
            "from" => from.as_str(), "to" => to.as_str()
        )
        .increment(1);
    }

    pub fn set_active(&self, active: bool) {
        self.active.set(f64::from(u8::from(active)));
    }

    pub fn set_detection_time(&self, d: Duration) {
        self.detection.set(d.as_secs_f64());
    }

    pub fn set_control_counts(&self, sent: u64, received: u64) {
        self.control_sent.absolute(sent);
        self.control_received.absolute(received);
    }
}
