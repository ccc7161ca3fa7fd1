//! Prometheus metrics. Handles are resolved once, when a peer or path is
//! added; the forwarding threads only touch their own atomics
//! ([`super::PathCounters`]), which [`Metrics::sync`] copies into the
//! exporter twice a second.
//!
//! Every configured path's series exist from start-up at 0, histograms
//! included (the exporter renders a registered histogram with empty
//! buckets). A reload can remove peers and paths; the exporter has no call
//! to delete a series, so counters and gauges are registered with an idle
//! timeout ([`IDLE_TIMEOUT`]) and [`Metrics::sync`] touches every live one
//! each round: a removed path's series stop being touched and disappear
//! from `/metrics` within the timeout. Histograms are not subject to the
//! timeout (a down path records no RTT), so a removed path's histogram
//! stays until restart.

use super::{DropCounters, PathCounters, ReorderCounters};
use crate::core::drop::DropReason;
use crate::core::wire::bfd::State;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

const RTT_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
const DETECTION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
];
const STATES: [State; 4] = [State::AdminDown, State::Down, State::Init, State::Up];
/// The transitions RFC 5880 §6.8.6 allows, pre-registered at 0 per path.
const TRANSITIONS: [(State, State); 9] = [
    (State::Down, State::Init),
    (State::Down, State::Up),
    (State::Init, State::Up),
    (State::Init, State::Down),
    (State::Up, State::Down),
    (State::Down, State::AdminDown),
    (State::Init, State::AdminDown),
    (State::Up, State::AdminDown),
    (State::AdminDown, State::Down),
];
/// Every metric the daemon exports, with its Prometheus type (the SPEC's table).
pub const METRICS: &[(&str, &str)] = &[
    ("crosslink_build_info", "gauge"),
    ("crosslink_peer_up", "gauge"),
    ("crosslink_path_up", "gauge"),
    ("crosslink_path_active", "gauge"),
    ("crosslink_path_info", "gauge"),
    ("crosslink_bfd_session_state", "gauge"),
    ("crosslink_bfd_session_transitions_total", "counter"),
    ("crosslink_bfd_detection_time_seconds", "gauge"),
    ("crosslink_bfd_control_packets_sent_total", "counter"),
    ("crosslink_bfd_control_packets_received_total", "counter"),
    ("crosslink_path_rtt_seconds", "histogram"),
    ("crosslink_path_transmit_packets_total", "counter"),
    ("crosslink_path_transmit_bytes_total", "counter"),
    ("crosslink_path_receive_packets_total", "counter"),
    ("crosslink_path_receive_bytes_total", "counter"),
    ("crosslink_packets_dropped_total", "counter"),
    ("crosslink_failovers_total", "counter"),
    ("crosslink_failover_detection_seconds", "histogram"),
    ("crosslink_flows_active", "gauge"),
    ("crosslink_config_last_reload_successful", "gauge"),
    ("crosslink_path_loss_ratio", "gauge"),
    ("crosslink_path_jitter_seconds", "gauge"),
    ("crosslink_path_degraded", "gauge"),
    ("crosslink_path_moves_total", "counter"),
    ("crosslink_reorder_held_total", "counter"),
    ("crosslink_reorder_reordered_total", "counter"),
    ("crosslink_reorder_gave_up_total", "counter"),
    ("crosslink_reorder_late_total", "counter"),
    ("crosslink_reorder_buffered_packets", "gauge"),
    ("crosslink_fec_parity_packets_total", "counter"),
    ("crosslink_fec_recovered_packets_total", "counter"),
    ("crosslink_fec_unrecoverable_packets_total", "counter"),
    ("crosslink_fec_overhead_ratio", "gauge"),
];

/// The causes of `crosslink_path_moves_total`, registered at 0 per peer.
pub const MOVE_CAUSES: [&str; 8] = [
    "down",
    "up",
    "loss",
    "rtt",
    "jitter",
    "mtu",
    "recovered",
    "removed",
];

/// Counters and gauges not touched for this long leave `/metrics`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The metrics endpoint: listening, but not answering until [`Endpoint::serve`].
///
/// It answers every request on its listener with the exposition (plain
/// HTTP/1.1, one answer per connection), the listener being its own
/// rather than the exporter's so that an upgrade can hand it over
/// ([`crate::io::upgrade`]): scrapes go on through the handover.
pub struct Endpoint {
    handle: PrometheusHandle,
    listener: std::net::TcpListener,
}

/// Longest request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8192;

impl Endpoint {
    /// The listener's descriptor (for an upgrade).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Starts answering scrapes (must be called inside a tokio runtime).
    /// Until then connections wait in the listen queue, so no scrape ever
    /// sees a half-registered gateway.
    pub fn serve(self) {
        let upkeep = self.handle.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "metrics endpoint stopped");
                return;
            }
        };
        let handle = self.handle;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handle = handle.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &handle))
                        .await;
                });
            }
        });
    }
}

/// Reads the request's head and answers with the exposition.
async fn answer(
    mut stream: tokio::net::TcpStream,
    handle: &PrometheusHandle,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            return Ok(());
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let (status, body) = if head.starts_with(b"GET ") || head.starts_with(b"HEAD ") {
        ("200 OK", handle.render())
    } else {
        ("405 Method Not Allowed", String::new())
    };
    let body = if head.starts_with(b"HEAD ") {
        String::new()
    } else {
        body
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Installs the recorder and binds `listen`, or takes `inherited`, the
/// listener an upgrade handed over (must be called inside a tokio
/// runtime, before any handle is resolved).
pub fn install(listen: SocketAddr, inherited: Option<OwnedFd>) -> Result<Endpoint, String> {
    let recorder = PrometheusBuilder::new()
        .idle_timeout(
            MetricKindMask::COUNTER | MetricKindMask::GAUGE,
            Some(IDLE_TIMEOUT),
        )
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
        .map_err(|e| format!("metrics: {e}"))?
        .build_recorder();
    let listener = match inherited {
        Some(fd) => std::net::TcpListener::from(fd),
        None => std::net::TcpListener::bind(listen)
            .map_err(|e| format!("metrics listener on {listen}: {e}"))?,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("metrics listener on {listen}: {e}"))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    describe();
    Ok(Endpoint { handle, listener })
}

fn describe() {
    describe_gauge!("crosslink_build_info", "Build information; always 1.");
    describe_counter!(
        "crosslink_handshakes_total",
        "Key-pair handshakes with the peer by result: ok (completed, as initiator or responder), or why a handshake message was dropped or a handshake failed."
    );
    describe_gauge!(
        "crosslink_handshake_key_age_seconds",
        "Age of the session keys that seal the peer's traffic now (-1: none)."
    );
    describe_gauge!(
        "crosslink_peer_up",
        "1 when the peer has at least one path carrying traffic."
    );
    describe_gauge!("crosslink_path_up", "1 when the path's BFD session is Up.");
    describe_counter!(
        "crosslink_reorder_held_total",
        "Packets of an aggregate sender held behind a gap until it filled or was given up."
    );
    describe_counter!(
        "crosslink_reorder_reordered_total",
        "Held packets delivered in order."
    );
    describe_counter!(
        "crosslink_reorder_gave_up_total",
        "Missing packets given up (lost, or later than the reordering wait)."
    );
    describe_counter!(
        "crosslink_reorder_late_total",
        "Packets that arrived after their gap was given up (delivered late)."
    );
    describe_gauge!(
        "crosslink_reorder_buffered_packets",
        "Packets held for reordering now."
    );
    describe_counter!(
        "crosslink_fec_parity_packets_total",
        "Forward-error-correction parity packets, by direction (sent, received)."
    );
    describe_counter!(
        "crosslink_fec_recovered_packets_total",
        "Lost data packets rebuilt from parity."
    );
    describe_counter!(
        "crosslink_fec_unrecoverable_packets_total",
        "Lost data packets of blocks that had too little parity in time (a packet that came later after all stays counted)."
    );
    describe_gauge!(
        "crosslink_fec_overhead_ratio",
        "Parity sent per data packet under the code in use (0: no parity)."
    );
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
    describe_gauge!(
        "crosslink_path_loss_ratio",
        "Share of the path's packets lost over the last 3 s, per direction (tx: what this gateway sends)."
    );
    describe_gauge!(
        "crosslink_path_jitter_seconds",
        Unit::Seconds,
        "Delay variation of the path's probes (RFC 3550 jitter), per direction."
    );
    describe_gauge!(
        "crosslink_path_degraded",
        "1 while the path breaks its service level (loss, rtt, jitter, mtu), whatever the reason."
    );
    describe_counter!(
        "crosslink_path_moves_total",
        "Changes of a peer's active path, by cause (down, up, loss, rtt, jitter, mtu, recovered, removed)."
    );
}

/// Handles for one path.
pub struct PathMetrics {
    peer: String,
    path: String,
    counters: Arc<PathCounters>,
    info: Gauge,
    up: Gauge,
    active: Gauge,
    state: [Gauge; 4],
    transitions: Vec<((State, State), Counter)>,
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
    loss_tx: Gauge,
    loss_rx: Gauge,
    jitter_tx: Gauge,
    jitter_rx: Gauge,
    degraded: Gauge,
}

struct PeerMetrics {
    name: String,
    up: Gauge,
    detection: Histogram,
    moves: Vec<Counter>,
    /// The lanes' resequencing counters, and their series.
    reorder: Option<(Arc<ReorderCounters>, ReorderMetrics)>,
    fec_overhead: Gauge,
}

struct ReorderMetrics {
    held: Counter,
    reordered: Counter,
    gave_up: Counter,
    late: Counter,
    buffered: Gauge,
    fec_sent: Counter,
    fec_received: Counter,
    fec_recovered: Counter,
    fec_unrecoverable: Counter,
}

/// Everything the daemon exports. Peers and paths are slots indexed by
/// [`crate::PeerId`] / [`crate::PathId`]; a removed one leaves `None`.
pub struct Metrics {
    paths: RwLock<Vec<Option<Arc<PathMetrics>>>>,
    peers: RwLock<Vec<Option<PeerMetrics>>>,
    failovers: Mutex<HashMap<(String, String, String), Counter>>,
    drops: Vec<Counter>,
    build_info: Gauge,
    reload_ok: Gauge,
}

/// A path as metrics need it.
pub struct PathLabels<'a> {
    pub peer: &'a str,
    pub path: &'a str,
    pub local: String,
    pub remote: String,
}

fn slot<T>(v: &mut Vec<Option<T>>, i: usize) -> &mut Option<T> {
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    &mut v[i]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the gateway-wide series; peers and paths are added with
    /// [`Metrics::add_peer`] and [`Metrics::add_path`].
    pub fn new() -> Metrics {
        let build_info = gauge!("crosslink_build_info", "version" => env!("CARGO_PKG_VERSION"));
        build_info.set(1.0);
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
            paths: RwLock::new(Vec::new()),
            peers: RwLock::new(Vec::new()),
            failovers: Mutex::new(HashMap::new()),
            drops,
            build_info,
            reload_ok,
        }
    }

    /// Registers a peer's series at 0.
    pub fn add_peer(&self, id: usize, name: &str) {
        let up = gauge!("crosslink_peer_up", "peer" => name.to_string());
        up.set(0.0);
        let detection =
            histogram!("crosslink_failover_detection_seconds", "peer" => name.to_string());
        let moves = MOVE_CAUSES
            .iter()
            .map(|&cause| {
                let c = counter!("crosslink_path_moves_total", "peer" => name.to_string(), "cause" => cause);
                c.absolute(0);
                c
            })
            .collect();
        let fec_overhead = gauge!("crosslink_fec_overhead_ratio", "peer" => name.to_string());
        fec_overhead.set(0.0);
        *slot(&mut self.peers.write(), id) = Some(PeerMetrics {
            name: name.to_string(),
            up,
            detection,
            moves,
            reorder: None,
            fec_overhead,
        });
    }

    /// A key-pair peer's handshake counters and key age, copied from its
    /// handshake.
    pub fn set_handshake(
        &self,
        peer: &str,
        stats: &crate::core::handshake::Stats,
        key_age: Option<f64>,
    ) {
        use crate::core::handshake::Failure;
        counter!("crosslink_handshakes_total", "peer" => peer.to_string(), "result" => "ok")
            .absolute(stats.completed);
        for f in Failure::ALL {
            counter!("crosslink_handshakes_total", "peer" => peer.to_string(), "result" => f.as_str())
                .absolute(stats.failures(f));
        }
        gauge!("crosslink_handshake_key_age_seconds", "peer" => peer.to_string())
            .set(key_age.unwrap_or(-1.0));
    }

    /// Gives a peer's series its lanes' resequencing counters.
    pub fn set_reorder(&self, id: usize, counters: Option<Arc<ReorderCounters>>) {
        let mut peers = self.peers.write();
        let Some(p) = peers.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        p.reorder = counters.map(|c| {
            let peer = p.name.clone();
            let m = ReorderMetrics {
                held: counter!("crosslink_reorder_held_total", "peer" => peer.clone()),
                reordered: counter!("crosslink_reorder_reordered_total", "peer" => peer.clone()),
                gave_up: counter!("crosslink_reorder_gave_up_total", "peer" => peer.clone()),
                late: counter!("crosslink_reorder_late_total", "peer" => peer.clone()),
                buffered: gauge!("crosslink_reorder_buffered_packets", "peer" => peer.clone()),
                fec_sent: counter!("crosslink_fec_parity_packets_total", "peer" => peer.clone(), "direction" => "sent"),
                fec_received: counter!("crosslink_fec_parity_packets_total", "peer" => peer.clone(), "direction" => "received"),
                fec_recovered: counter!("crosslink_fec_recovered_packets_total", "peer" => peer.clone()),
                fec_unrecoverable: counter!("crosslink_fec_unrecoverable_packets_total", "peer" => peer),
            };
            (c, m)
        });
    }

    /// Forgets a peer (its series leave `/metrics` after [`IDLE_TIMEOUT`]).
    pub fn remove_peer(&self, id: usize) {
        if let Some(p) = self.peers.write().get_mut(id).and_then(Option::take) {
            self.failovers
                .lock()
                .retain(|(peer, _, _), _| *peer != p.name);
        }
    }

    /// Registers a path's series at 0; `counters` are its forwarding counters.
    pub fn add_path(&self, id: usize, labels: &PathLabels<'_>, counters: Arc<PathCounters>) {
        let m = PathMetrics::new(labels, counters);
        *slot(&mut self.paths.write(), id) = Some(Arc::new(m));
    }

    /// Forgets a path (its series leave `/metrics` after [`IDLE_TIMEOUT`]).
    pub fn remove_path(&self, id: usize) {
        if let Some(p) = self.paths.write().get_mut(id).and_then(Option::take) {
            self.failovers.lock().retain(|(peer, from, to), _| {
                *peer != p.peer || (*from != p.path && *to != p.path)
            });
        }
    }

    /// Copies the forwarding threads' counters into the exporter, and
    /// touches every live series so that it is not timed out.
    pub fn sync(&self, drops: &DropCounters) {
        for m in self.paths.read().iter().flatten() {
            m.sync();
        }
        for p in self.peers.read().iter().flatten() {
            p.up.increment(0.0);
            for c in &p.moves {
                c.increment(0);
            }
            if let Some((c, m)) = &p.reorder {
                m.held.absolute(c.held.load(Relaxed));
                m.reordered.absolute(c.reordered.load(Relaxed));
                m.gave_up.absolute(c.gave_up.load(Relaxed));
                m.late.absolute(c.late.load(Relaxed));
                m.buffered.set(c.occupancy.load(Relaxed) as f64);
                m.fec_sent.absolute(c.fec.parity_sent.load(Relaxed));
                m.fec_received.absolute(c.fec.parity_received.load(Relaxed));
                m.fec_recovered.absolute(c.fec.recovered.load(Relaxed));
                m.fec_unrecoverable
                    .absolute(c.fec.unrecoverable.load(Relaxed));
            }
            p.fec_overhead.increment(0.0);
        }
        for c in self.failovers.lock().values() {
            c.increment(0);
        }
        for (r, c) in DropReason::ALL.iter().zip(&self.drops) {
            c.absolute(drops.get(*r));
        }
        self.build_info.set(1.0);
        self.reload_ok.increment(0.0);
    }

    /// A live path's handles.
    pub fn path(&self, i: usize) -> Option<Arc<PathMetrics>> {
        self.paths.read().get(i).cloned().flatten()
    }

    /// The overhead of the peer's FEC code now (0: no parity).
    pub fn set_fec_overhead(&self, peer: usize, ratio: f64) {
        if let Some(Some(p)) = self.peers.read().get(peer) {
            p.fec_overhead.set(ratio);
        }
    }

    pub fn set_peer_up(&self, peer: usize, up: bool) {
        if let Some(Some(p)) = self.peers.read().get(peer) {
            p.up.set(f64::from(u8::from(up)));
        }
    }

    pub fn record_failover(&self, peer: usize, from: &str, to: &str, detection: Option<Duration>) {
        let peers = self.peers.read();
        let Some(Some(p)) = peers.get(peer) else {
            return;
        };
        let key = (p.name.clone(), from.to_string(), to.to_string());
        self.failovers
            .lock()
            .entry(key)
            .or_insert_with(|| {
                counter!("crosslink_failovers_total", "peer" => p.name.clone(), "from" => from.to_string(), "to" => to.to_string())
            })
            .increment(1);
        if let Some(d) = detection {
            p.detection.record(d.as_secs_f64());
        }
    }

    /// A move of the peer's traffic, by cause (one of [`MOVE_CAUSES`]).
    pub fn record_move(&self, peer: usize, cause: &str) {
        let peers = self.peers.read();
        let Some(Some(p)) = peers.get(peer) else {
            return;
        };
        if let Some(c) = MOVE_CAUSES
            .iter()
            .position(|&k| k == cause)
            .and_then(|i| p.moves.get(i))
        {
            c.increment(1);
        }
    }

    pub fn set_reload_ok(&self, ok: bool) {
        self.reload_ok.set(f64::from(u8::from(ok)));
    }
}

impl PathMetrics {
    fn new(l: &PathLabels<'_>, counters: Arc<PathCounters>) -> PathMetrics {
        let (peer, path) = (l.peer.to_string(), l.path.to_string());
        let labels = [("peer", peer.clone()), ("path", path.clone())];
        let info = gauge!("crosslink_path_info", "peer" => peer.clone(), "path" => path.clone(), "local" => l.local.clone(), "remote" => l.remote.clone());
        info.set(1.0);
        let state = STATES.map(|s| {
            let g = gauge!("crosslink_bfd_session_state", "peer" => peer.clone(), "path" => path.clone(), "state" => s.as_str());
            g.set(f64::from(u8::from(s == State::Down)));
            g
        });
        let transitions = TRANSITIONS
            .iter()
            .map(|&(from, to)| {
                let c = counter!(
                    "crosslink_bfd_session_transitions_total",
                    "peer" => peer.clone(), "path" => path.clone(),
                    "from" => from.as_str(), "to" => to.as_str()
                );
                c.absolute(0);
                ((from, to), c)
            })
            .collect();
        let m = PathMetrics {
            info,
            up: gauge!("crosslink_path_up", &labels),
            active: gauge!("crosslink_path_active", &labels),
            state,
            transitions,
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
            loss_tx: gauge!("crosslink_path_loss_ratio", "peer" => peer.clone(), "path" => path.clone(), "direction" => "tx"),
            loss_rx: gauge!("crosslink_path_loss_ratio", "peer" => peer.clone(), "path" => path.clone(), "direction" => "rx"),
            jitter_tx: gauge!("crosslink_path_jitter_seconds", "peer" => peer.clone(), "path" => path.clone(), "direction" => "tx"),
            jitter_rx: gauge!("crosslink_path_jitter_seconds", "peer" => peer.clone(), "path" => path.clone(), "direction" => "rx"),
            degraded: gauge!("crosslink_path_degraded", &labels),
            counters,
            peer,
            path,
        };
        m.up.set(0.0);
        m.active.set(0.0);
        m.detection.set(0.0);
        m.damped.set(0.0);
        m.damping_level.set(0.0);
        m.blocked.set(0.0);
        for g in [
            &m.loss_tx,
            &m.loss_rx,
            &m.jitter_tx,
            &m.jitter_rx,
            &m.degraded,
        ] {
            g.set(0.0);
        }
        m.flaps.absolute(0);
        m.sync();
        m
    }

    /// The path's measured quality (`None`: not measured yet, shown as 0).
    pub fn set_quality(
        &self,
        loss: (Option<f64>, Option<f64>),
        jitter: (Option<Duration>, Option<Duration>),
        degraded: bool,
    ) {
        self.loss_tx.set(loss.0.unwrap_or(0.0));
        self.loss_rx.set(loss.1.unwrap_or(0.0));
        self.jitter_tx
            .set(jitter.0.map_or(0.0, |d| d.as_secs_f64()));
        self.jitter_rx
            .set(jitter.1.map_or(0.0, |d| d.as_secs_f64()));
        self.degraded.set(f64::from(u8::from(degraded)));
    }

    /// Flap damping and fast-signal state of the path.
    pub fn set_damping(&self, flaps: u64, level: u32, damped: bool, blocked: bool) {
        self.flaps.absolute(flaps);
        self.damping_level.set(f64::from(level));
        self.damped.set(f64::from(u8::from(damped)));
        self.blocked.set(f64::from(u8::from(blocked)));
    }

    /// Copies the counters and touches every series.
    fn sync(&self) {
        let c = &self.counters;
        self.tx_packets.absolute(c.tx_packets.load(Relaxed));
        self.tx_bytes.absolute(c.tx_bytes.load(Relaxed));
        self.rx_packets.absolute(c.rx_packets.load(Relaxed));
        self.rx_bytes.absolute(c.rx_bytes.load(Relaxed));
        self.flows.set(c.flows.load(Relaxed) as f64);
        for g in [
            &self.info,
            &self.up,
            &self.active,
            &self.detection,
            &self.damped,
            &self.damping_level,
            &self.blocked,
            &self.loss_tx,
            &self.loss_rx,
            &self.jitter_tx,
            &self.jitter_rx,
            &self.degraded,
        ] {
            g.increment(0.0);
        }
        for g in &self.state {
            g.increment(0.0);
        }
        for c in [&self.control_sent, &self.control_received, &self.flaps] {
            c.increment(0);
        }
        for (_, c) in &self.transitions {
            c.increment(0);
        }
    }

    pub fn set_state(&self, from: State, to: State) {
        for (s, g) in STATES.iter().zip(&self.state) {
            g.set(f64::from(u8::from(*s == to)));
        }
        self.up.set(f64::from(u8::from(to == State::Up)));
        match self.transitions.iter().find(|(k, _)| *k == (from, to)) {
            Some((_, c)) => c.increment(1),
            None => counter!(
                "crosslink_bfd_session_transitions_total",
                "peer" => self.peer.clone(), "path" => self.path.clone(),
                "from" => from.as_str(), "to" => to.as_str()
            )
            .increment(1),
        }
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
