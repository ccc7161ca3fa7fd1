//! Prometheus metrics. Every series is an atomic (or a few) held here, in
//! the peer's or path's slot; the forwarding threads only touch their own
//! atomics ([`super::PathCounters`], [`super::ReorderCounters`]), which a
//! scrape reads as they are, and the BFD thread sets gauges and counters
//! through the handles of [`Metrics::path`].
//!
//! A scrape renders the text exposition straight from these slots: the
//! label text of each peer and path is escaped once, when it is added, and
//! each line is the family's name, that text and a number. The
//! `metrics-exporter-prometheus` recorder this replaced rebuilt and hashed
//! every series' labels on each scrape: 94-142 ms of CPU for the 68 000
//! lines of 500 peers of two paths (4.5 MB), seconds on a host whose CPUs
//! the BFD threads and the forwarding share; this renders them with about
//! 2 ms (benches/metrics.rs). The exporter has no cheaper way to render
//! the same series, hence this hand-written renderer. Scrapes that come
//! together share renders ([`Metrics::scrape`]).
//!
//! Every configured path's series exist from start-up at 0, histograms
//! included. A reload that removes a peer or path empties its slot, and its
//! series, histograms included, leave `/metrics` at once. A family without
//! a series is not rendered (no failover yet: no `crosslink_failovers_total`).

use super::{DropCounters, PathCounters, ReorderCounters};
use crate::core::drop::DropReason;
use crate::core::wire::bfd::State;
use parking_lot::{Mutex, RwLock};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Each family's HELP text.
const HELP: &[(&str, &str)] = &[
    ("crosslink_build_info", "Build information; always 1."),
    ("crosslink_handshakes_total", "Key-pair handshakes with the peer by result: ok (completed, as initiator or responder), or why a handshake message was dropped or a handshake failed."),
    ("crosslink_handshake_key_age_seconds", "Age of the session keys that seal the peer's traffic now (-1: none)."),
    ("crosslink_peer_up", "1 when the peer has at least one path carrying traffic."),
    ("crosslink_path_up", "1 when the path's BFD session is Up."),
    ("crosslink_reorder_held_total", "Packets of an aggregate sender held behind a gap until it filled or was given up."),
    ("crosslink_reorder_reordered_total", "Held packets delivered in order."),
    ("crosslink_reorder_gave_up_total", "Missing packets given up (lost, or later than the reordering wait)."),
    ("crosslink_reorder_late_total", "Packets that arrived after their gap was given up (delivered late)."),
    ("crosslink_reorder_buffered_packets", "Packets held for reordering now."),
    ("crosslink_fec_parity_packets_total", "Forward-error-correction parity packets, by direction (sent, received)."),
    ("crosslink_fec_recovered_packets_total", "Lost data packets rebuilt from parity."),
    ("crosslink_fec_unrecoverable_packets_total", "Lost data packets of blocks that had too little parity in time (a packet that came later after all stays counted)."),
    ("crosslink_fec_overhead_ratio", "Parity sent per data packet under the code in use (0: no parity)."),
    ("crosslink_path_active", "1 when the path carries the peer's traffic."),
    ("crosslink_path_info", "Path addresses; always 1."),
    ("crosslink_bfd_session_state", "1 for the BFD session's current state."),
    ("crosslink_bfd_session_transitions_total", "BFD session state changes."),
    ("crosslink_bfd_detection_time_seconds", "Negotiated BFD detection time."),
    ("crosslink_bfd_control_packets_sent_total", "BFD control packets sent."),
    ("crosslink_bfd_control_packets_received_total", "BFD control packets accepted."),
    ("crosslink_path_rtt_seconds", "Round-trip time on the path."),
    ("crosslink_path_transmit_packets_total", "Data packets sent on the path."),
    ("crosslink_path_transmit_bytes_total", "Data bytes sent on the path."),
    ("crosslink_path_receive_packets_total", "Data packets received on the path."),
    ("crosslink_path_receive_bytes_total", "Data bytes received on the path."),
    ("crosslink_packets_dropped_total", "Packets dropped, by reason."),
    ("crosslink_failovers_total", "Changes of a peer's active path."),
    ("crosslink_failover_detection_seconds", "Time from the last packet heard on a failed path to its failover."),
    ("crosslink_flows_active", "Flows seen recently on the path."),
    ("crosslink_path_damped", "1 while flap damping holds a recovered path out of service longer than revert_hold."),
    ("crosslink_path_damping_level", "Flap damping level of the path (0: none; the hold is revert_hold x 2^(level-1))."),
    ("crosslink_path_flaps_total", "Times the path lost health (BFD, carrier, address or send errors)."),
    ("crosslink_path_blocked", "1 while a fast signal (carrier or address loss, send error) keeps the path out of service."),
    ("crosslink_config_last_reload_successful", "1 when the last configuration load succeeded."),
    ("crosslink_path_loss_ratio", "Share of the path's packets lost over the last 3 s, per direction (tx: what this gateway sends)."),
    ("crosslink_path_jitter_seconds", "Delay variation of the path's probes (RFC 3550 jitter), per direction."),
    ("crosslink_path_degraded", "1 while the path breaks its service level (loss, rtt, jitter, mtu), whatever the reason."),
    ("crosslink_path_moves_total", "Changes of a peer's active path, by cause (down, up, loss, rtt, jitter, mtu, recovered, removed)."),
];

fn help(name: &str) -> &'static str {
    HELP.iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, h)| *h)
}

/// A counter series (`absolute` never takes it back, as in the `metrics` crate).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn absolute(&self, v: u64) {
        self.0.fetch_max(v, Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A gauge series (an `f64`'s bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// A histogram with fixed buckets: a count per bucket (the last one past
/// every bound) and the sum, recorded lock-free by any thread.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// An RTT histogram no scrape shows (a path without metrics).
    pub fn detached() -> Arc<Histogram> {
        Arc::new(Histogram::new(RTT_BUCKETS))
    }

    pub fn record(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Relaxed);
        }
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |s| {
            Some((f64::from_bits(s) + v).to_bits())
        });
    }
}

/// `v` escaped as a label value.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A sample's value.
#[derive(Clone, Copy)]
enum Num {
    U(u64),
    F(f64),
}

/// Writes one sample: `name_suffix{labels} value`, `labels` being
/// already escaped `k="v"` fragments (empty ones skipped).
fn line(out: &mut String, name: &str, suffix: &str, labels: &[&str], v: Num) {
    out.push_str(name);
    out.push_str(suffix);
    let mut first = true;
    for l in labels.iter().filter(|l| !l.is_empty()) {
        out.push(if first { '{' } else { ',' });
        out.push_str(l);
        first = false;
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    match v {
        Num::U(n) => {
            let _ = write!(out, "{n}");
        }
        Num::F(0.0) => out.push('0'),
        Num::F(1.0) => out.push('1'),
        Num::F(f) if f.is_nan() => out.push_str("NaN"),
        Num::F(f) if f.is_infinite() => out.push_str(if f > 0.0 { "+Inf" } else { "-Inf" }),
        Num::F(f) => {
            let _ = write!(out, "{f}");
        }
    }
    out.push('\n');
}

/// Writes a family: HELP and TYPE, then what `series` writes; nothing at
/// all if it writes no sample.
fn family(out: &mut String, name: &str, kind: &str, series: impl FnOnce(&mut String)) {
    let mark = out.len();
    let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", help(name));
    let body = out.len();
    series(out);
    if out.len() == body {
        out.truncate(mark);
    }
}

/// The `le` label of each bound, and `+Inf`.
fn le_labels(bounds: &[f64]) -> Vec<String> {
    bounds
        .iter()
        .map(|b| format!("le=\"{b}\""))
        .chain(std::iter::once("le=\"+Inf\"".to_string()))
        .collect()
}

/// A histogram's samples: cumulative buckets, sum and count.
fn histogram_lines(out: &mut String, name: &str, labels: &str, h: &Histogram, le: &[String]) {
    let mut total = 0u64;
    for (c, le) in h.counts.iter().zip(le) {
        total = total.saturating_add(c.load(Relaxed));
        line(out, name, "_bucket", &[labels, le], Num::U(total));
    }
    let sum = f64::from_bits(h.sum.load(Relaxed));
    line(out, name, "_sum", &[labels], Num::F(sum));
    line(out, name, "_count", &[labels], Num::U(total));
}

/// The metrics endpoint: listening, but not answering until [`Endpoint::serve`].
///
/// It answers every request on its listener with the exposition (plain
/// HTTP/1.1, one answer per connection), the listener being its own so
/// that an upgrade can hand it over ([`crate::io::upgrade`]): scrapes go
/// on through the handover.
pub struct Endpoint {
    listener: std::net::TcpListener,
}

/// Longest request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8192;

impl Endpoint {
    /// The listener's descriptor (for an upgrade).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts answering scrapes with `metrics` (must be called inside a
    /// tokio runtime). Until then connections wait in the listen queue, so
    /// no scrape ever sees a half-registered gateway.
    pub fn serve(self, metrics: Arc<Metrics>) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "metrics endpoint stopped");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics))
                        .await;
                });
            }
        });
    }
}

/// Reads the request's head and answers with the exposition.
async fn answer(mut stream: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
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
    let (status, body) = if head.starts_with(b"GET ") {
        ("200 OK", Some(metrics.scrape()))
    } else if head.starts_with(b"HEAD ") {
        ("200 OK", None)
    } else {
        ("405 Method Not Allowed", None)
    };
    let body = body.as_deref().map_or("", String::as_str);
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds `listen`, or takes `inherited`, the listener an upgrade handed
/// over.
pub fn install(listen: SocketAddr, inherited: Option<OwnedFd>) -> Result<Endpoint, String> {
    let listener = match inherited {
        Some(fd) => std::net::TcpListener::from(fd),
        None => std::net::TcpListener::bind(listen)
            .map_err(|e| format!("metrics listener on {listen}: {e}"))?,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("metrics listener on {listen}: {e}"))?;
    Ok(Endpoint { listener })
}

/// Series of one path.
pub struct PathMetrics {
    peer: String,
    path: String,
    /// `peer="…",path="…"`, escaped.
    labels: String,
    /// `local="…",remote="…"`, escaped.
    addresses: String,
    counters: Arc<PathCounters>,
    up: Gauge,
    active: Gauge,
    state: [Gauge; 4],
    transitions: [Counter; TRANSITIONS.len()],
    /// Transitions outside [`TRANSITIONS`], should one happen.
    other_transitions: Mutex<Vec<((State, State), u64)>>,
    detection: Gauge,
    control_sent: Counter,
    control_received: Counter,
    pub rtt: Arc<Histogram>,
    damped: Gauge,
    damping_level: Gauge,
    flaps: Counter,
    blocked: Gauge,
    loss: [Gauge; 2],
    jitter: [Gauge; 2],
    degraded: Gauge,
}

/// A key-pair peer's handshake figures.
struct Handshake {
    stats: crate::core::handshake::Stats,
    key_age: f64,
}

struct PeerMetrics {
    name: String,
    /// `peer="…"`, escaped.
    labels: String,
    up: Gauge,
    detection: Histogram,
    moves: [Counter; MOVE_CAUSES.len()],
    /// The lanes' resequencing counters.
    reorder: Option<Arc<ReorderCounters>>,
    fec_overhead: Gauge,
    handshake: Mutex<Option<Handshake>>,
}

/// A failover's labels: peer, from, to.
type FailoverKey = (String, String, String);

/// Everything the daemon exports. Peers and paths are slots indexed by
/// [`crate::PeerId`] / [`crate::PathId`]; a removed one leaves `None`.
pub struct Metrics {
    paths: RwLock<Vec<Option<Arc<PathMetrics>>>>,
    peers: RwLock<Vec<Option<PeerMetrics>>>,
    /// Failovers by (peer, from, to).
    failovers: Mutex<Vec<(FailoverKey, u64)>>,
    drops: [Counter; DropReason::ALL.len()],
    reload_ok: Gauge,
    /// The last render and when it began.
    last: Mutex<Option<(Instant, Arc<String>)>>,
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
    /// The gateway-wide series; peers and paths are added with
    /// [`Metrics::add_peer`] and [`Metrics::add_path`].
    pub fn new() -> Metrics {
        let reload_ok = Gauge::default();
        reload_ok.set(1.0);
        Metrics {
            paths: RwLock::new(Vec::new()),
            peers: RwLock::new(Vec::new()),
            failovers: Mutex::new(Vec::new()),
            drops: Default::default(),
            reload_ok,
            last: Mutex::new(None),
        }
    }

    /// Registers a peer's series at 0.
    pub fn add_peer(&self, id: usize, name: &str) {
        *slot(&mut self.peers.write(), id) = Some(PeerMetrics {
            name: name.to_string(),
            labels: format!("peer=\"{}\"", escape(name)),
            up: Gauge::default(),
            detection: Histogram::new(DETECTION_BUCKETS),
            moves: Default::default(),
            reorder: None,
            fec_overhead: Gauge::default(),
            handshake: Mutex::new(None),
        });
    }

    /// A key-pair peer's handshake counters and key age, copied from its
    /// handshake.
    pub fn set_handshake(
        &self,
        peer: usize,
        stats: &crate::core::handshake::Stats,
        key_age: Option<f64>,
    ) {
        if let Some(Some(p)) = self.peers.read().get(peer) {
            *p.handshake.lock() = Some(Handshake {
                stats: stats.clone(),
                key_age: key_age.unwrap_or(-1.0),
            });
        }
    }

    /// Gives a peer's series its lanes' resequencing counters.
    pub fn set_reorder(&self, id: usize, counters: Option<Arc<ReorderCounters>>) {
        if let Some(Some(p)) = self.peers.write().get_mut(id) {
            p.reorder = counters;
        }
    }

    /// Forgets a peer (its series leave `/metrics`).
    pub fn remove_peer(&self, id: usize) {
        if let Some(p) = self.peers.write().get_mut(id).and_then(Option::take) {
            self.failovers
                .lock()
                .retain(|((peer, _, _), _)| *peer != p.name);
        }
    }

    /// Registers a path's series at 0; `counters` are its forwarding counters.
    pub fn add_path(&self, id: usize, labels: &PathLabels<'_>, counters: Arc<PathCounters>) {
        let m = PathMetrics::new(labels, counters);
        *slot(&mut self.paths.write(), id) = Some(Arc::new(m));
    }

    /// Forgets a path (its series leave `/metrics`).
    pub fn remove_path(&self, id: usize) {
        if let Some(p) = self.paths.write().get_mut(id).and_then(Option::take) {
            self.failovers.lock().retain(|((peer, from, to), _)| {
                *peer != p.peer || (*from != p.path && *to != p.path)
            });
        }
    }

    /// Copies the drop counters (twice a second); the paths' and peers'
    /// forwarding counters are read by each render as they are.
    pub fn sync(&self, drops: &DropCounters) {
        for (r, c) in DropReason::ALL.iter().zip(&self.drops) {
            c.absolute(drops.get(*r));
        }
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
        let mut failovers = self.failovers.lock();
        match failovers
            .iter_mut()
            .find(|((n, f, t), _)| *n == p.name && f == from && t == to)
        {
            Some((_, n)) => *n += 1,
            None => failovers.push(((p.name.clone(), from.to_string(), to.to_string()), 1)),
        }
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

    /// The exposition for a scrape: a render begun after the scrape
    /// asked, or a new one. Scrapes that come while one renders wait for it
    /// and the first of them renders once more for all of them (the one
    /// under way may have begun before something they should see), so
    /// scrapes that come together cost two renders at most, and a scrape
    /// sees everything set before it asked.
    pub fn scrape(&self) -> Arc<String> {
        let asked = Instant::now();
        let mut last = self.last.lock();
        if let Some((at, body)) = last.as_ref() {
            if *at >= asked {
                return body.clone();
            }
        }
        let at = Instant::now();
        let mut body =
            String::with_capacity(last.as_ref().map_or(1 << 16, |(_, b)| b.len() + 4096));
        self.render(&mut body);
        let body = Arc::new(body);
        *last = Some((at, body.clone()));
        body
    }

    /// Appends the text exposition of every series to `out`.
    pub fn render(&self, out: &mut String) {
        self.render_gateway(out);
        self.render_peers(out);
        self.render_paths(out);
    }

    fn render_gateway(&self, out: &mut String) {
        family(out, "crosslink_build_info", "gauge", |o| {
            let version = concat!("version=\"", env!("CARGO_PKG_VERSION"), "\"");
            line(o, "crosslink_build_info", "", &[version], Num::F(1.0));
        });
        family(
            out,
            "crosslink_config_last_reload_successful",
            "gauge",
            |o| {
                let v = self.reload_ok.get();
                line(
                    o,
                    "crosslink_config_last_reload_successful",
                    "",
                    &[],
                    Num::F(v),
                );
            },
        );
        family(out, "crosslink_packets_dropped_total", "counter", |o| {
            for (r, c) in DropReason::ALL.iter().zip(&self.drops) {
                let reason = format!("reason=\"{}\"", r.as_str());
                line(
                    o,
                    "crosslink_packets_dropped_total",
                    "",
                    &[&reason],
                    Num::U(c.get()),
                );
            }
        });
        family(out, "crosslink_failovers_total", "counter", |o| {
            for ((peer, from, to), n) in self.failovers.lock().iter() {
                let l = format!(
                    "peer=\"{}\",from=\"{}\",to=\"{}\"",
                    escape(peer),
                    escape(from),
                    escape(to)
                );
                line(o, "crosslink_failovers_total", "", &[&l], Num::U(*n));
            }
        });
    }

    fn render_peers(&self, out: &mut String) {
        let peers = self.peers.read();
        let peers = || peers.iter().flatten();
        let gauge = |out: &mut String, name: &str, v: &dyn Fn(&PeerMetrics) -> f64| {
            family(out, name, "gauge", |o| {
                for p in peers() {
                    line(o, name, "", &[&p.labels], Num::F(v(p)));
                }
            });
        };
        gauge(out, "crosslink_peer_up", &|p| p.up.get());
        gauge(out, "crosslink_fec_overhead_ratio", &|p| {
            p.fec_overhead.get()
        });
        family(out, "crosslink_path_moves_total", "counter", |o| {
            let causes: Vec<String> = MOVE_CAUSES
                .iter()
                .map(|c| format!("cause=\"{c}\""))
                .collect();
            for p in peers() {
                for (c, cause) in p.moves.iter().zip(&causes) {
                    line(
                        o,
                        "crosslink_path_moves_total",
                        "",
                        &[&p.labels, cause],
                        Num::U(c.get()),
                    );
                }
            }
        });
        let le = le_labels(DETECTION_BUCKETS);
        family(
            out,
            "crosslink_failover_detection_seconds",
            "histogram",
            |o| {
                for p in peers() {
                    histogram_lines(
                        o,
                        "crosslink_failover_detection_seconds",
                        &p.labels,
                        &p.detection,
                        &le,
                    );
                }
            },
        );
        let reorder =
            |out: &mut String, name: &str, kind: &str, v: &dyn Fn(&ReorderCounters) -> u64| {
                family(out, name, kind, |o| {
                    for p in peers() {
                        if let Some(r) = &p.reorder {
                            let n = v(r);
                            line(
                                o,
                                name,
                                "",
                                &[&p.labels],
                                if kind == "gauge" {
                                    Num::F(n as f64)
                                } else {
                                    Num::U(n)
                                },
                            );
                        }
                    }
                });
            };
        reorder(out, "crosslink_reorder_held_total", "counter", &|r| {
            r.held.load(Relaxed)
        });
        reorder(out, "crosslink_reorder_reordered_total", "counter", &|r| {
            r.reordered.load(Relaxed)
        });
        reorder(out, "crosslink_reorder_gave_up_total", "counter", &|r| {
            r.gave_up.load(Relaxed)
        });
        reorder(out, "crosslink_reorder_late_total", "counter", &|r| {
            r.late.load(Relaxed)
        });
        reorder(out, "crosslink_reorder_buffered_packets", "gauge", &|r| {
            r.occupancy.load(Relaxed)
        });
        reorder(
            out,
            "crosslink_fec_recovered_packets_total",
            "counter",
            &|r| r.fec.recovered.load(Relaxed),
        );
        reorder(
            out,
            "crosslink_fec_unrecoverable_packets_total",
            "counter",
            &|r| r.fec.unrecoverable.load(Relaxed),
        );
        family(out, "crosslink_fec_parity_packets_total", "counter", |o| {
            for p in peers() {
                if let Some(r) = &p.reorder {
                    let name = "crosslink_fec_parity_packets_total";
                    let sent = r.fec.parity_sent.load(Relaxed);
                    let received = r.fec.parity_received.load(Relaxed);
                    line(
                        o,
                        name,
                        "",
                        &[&p.labels, "direction=\"sent\""],
                        Num::U(sent),
                    );
                    line(
                        o,
                        name,
                        "",
                        &[&p.labels, "direction=\"received\""],
                        Num::U(received),
                    );
                }
            }
        });
        family(out, "crosslink_handshakes_total", "counter", |o| {
            use crate::core::handshake::Failure;
            let results: Vec<String> = std::iter::once("ok")
                .chain(Failure::ALL.iter().map(|f| f.as_str()))
                .map(|r| format!("result=\"{r}\""))
                .collect();
            for p in peers() {
                if let Some(h) = p.handshake.lock().as_ref() {
                    let counts = std::iter::once(h.stats.completed)
                        .chain(Failure::ALL.iter().map(|f| h.stats.failures(*f)));
                    for (n, result) in counts.zip(&results) {
                        line(
                            o,
                            "crosslink_handshakes_total",
                            "",
                            &[&p.labels, result],
                            Num::U(n),
                        );
                    }
                }
            }
        });
        family(out, "crosslink_handshake_key_age_seconds", "gauge", |o| {
            for p in peers() {
                if let Some(h) = p.handshake.lock().as_ref() {
                    line(
                        o,
                        "crosslink_handshake_key_age_seconds",
                        "",
                        &[&p.labels],
                        Num::F(h.key_age),
                    );
                }
            }
        });
    }

    fn render_paths(&self, out: &mut String) {
        let paths = self.paths.read();
        let paths = || paths.iter().flatten();
        let gauge = |out: &mut String, name: &str, v: &dyn Fn(&PathMetrics) -> f64| {
            family(out, name, "gauge", |o| {
                for p in paths() {
                    line(o, name, "", &[&p.labels], Num::F(v(p)));
                }
            });
        };
        let counter = |out: &mut String, name: &str, v: &dyn Fn(&PathMetrics) -> u64| {
            family(out, name, "counter", |o| {
                for p in paths() {
                    line(o, name, "", &[&p.labels], Num::U(v(p)));
                }
            });
        };
        family(out, "crosslink_path_info", "gauge", |o| {
            for p in paths() {
                line(
                    o,
                    "crosslink_path_info",
                    "",
                    &[&p.labels, &p.addresses],
                    Num::F(1.0),
                );
            }
        });
        gauge(out, "crosslink_path_up", &|p| p.up.get());
        gauge(out, "crosslink_path_active", &|p| p.active.get());
        family(out, "crosslink_bfd_session_state", "gauge", |o| {
            let states: Vec<String> = STATES
                .iter()
                .map(|s| format!("state=\"{}\"", s.as_str()))
                .collect();
            for p in paths() {
                for (g, state) in p.state.iter().zip(&states) {
                    line(
                        o,
                        "crosslink_bfd_session_state",
                        "",
                        &[&p.labels, state],
                        Num::F(g.get()),
                    );
                }
            }
        });
        family(
            out,
            "crosslink_bfd_session_transitions_total",
            "counter",
            |o| {
                let name = "crosslink_bfd_session_transitions_total";
                let label = |(from, to): (State, State)| {
                    format!("from=\"{}\",to=\"{}\"", from.as_str(), to.as_str())
                };
                let known: Vec<String> = TRANSITIONS.iter().map(|t| label(*t)).collect();
                for p in paths() {
                    for (c, t) in p.transitions.iter().zip(&known) {
                        line(o, name, "", &[&p.labels, t], Num::U(c.get()));
                    }
                    for (t, n) in p.other_transitions.lock().iter() {
                        line(o, name, "", &[&p.labels, &label(*t)], Num::U(*n));
                    }
                }
            },
        );
        gauge(out, "crosslink_bfd_detection_time_seconds", &|p| {
            p.detection.get()
        });
        counter(out, "crosslink_bfd_control_packets_sent_total", &|p| {
            p.control_sent.get()
        });
        counter(out, "crosslink_bfd_control_packets_received_total", &|p| {
            p.control_received.get()
        });
        let le = le_labels(RTT_BUCKETS);
        family(out, "crosslink_path_rtt_seconds", "histogram", |o| {
            for p in paths() {
                histogram_lines(o, "crosslink_path_rtt_seconds", &p.labels, &p.rtt, &le);
            }
        });
        counter(out, "crosslink_path_transmit_packets_total", &|p| {
            p.counters.tx_packets.load(Relaxed)
        });
        counter(out, "crosslink_path_transmit_bytes_total", &|p| {
            p.counters.tx_bytes.load(Relaxed)
        });
        counter(out, "crosslink_path_receive_packets_total", &|p| {
            p.counters.rx_packets.load(Relaxed)
        });
        counter(out, "crosslink_path_receive_bytes_total", &|p| {
            p.counters.rx_bytes.load(Relaxed)
        });
        gauge(out, "crosslink_flows_active", &|p| {
            p.counters.flows.load(Relaxed) as f64
        });
        gauge(out, "crosslink_path_damped", &|p| p.damped.get());
        gauge(out, "crosslink_path_damping_level", &|p| {
            p.damping_level.get()
        });
        counter(out, "crosslink_path_flaps_total", &|p| p.flaps.get());
        gauge(out, "crosslink_path_blocked", &|p| p.blocked.get());
        for (name, jitter) in [
            ("crosslink_path_loss_ratio", false),
            ("crosslink_path_jitter_seconds", true),
        ] {
            family(out, name, "gauge", |o| {
                for p in paths() {
                    let pair = if jitter { &p.jitter } else { &p.loss };
                    for (g, d) in pair.iter().zip(["direction=\"tx\"", "direction=\"rx\""]) {
                        line(o, name, "", &[&p.labels, d], Num::F(g.get()));
                    }
                }
            });
        }
        gauge(out, "crosslink_path_degraded", &|p| p.degraded.get());
    }
}

impl PathMetrics {
    fn new(l: &PathLabels<'_>, counters: Arc<PathCounters>) -> PathMetrics {
        let state: [Gauge; 4] = Default::default();
        for (s, g) in STATES.iter().zip(&state) {
            g.set(f64::from(u8::from(*s == State::Down)));
        }
        PathMetrics {
            peer: l.peer.to_string(),
            path: l.path.to_string(),
            labels: format!("peer=\"{}\",path=\"{}\"", escape(l.peer), escape(l.path)),
            addresses: format!(
                "local=\"{}\",remote=\"{}\"",
                escape(&l.local),
                escape(&l.remote)
            ),
            counters,
            up: Gauge::default(),
            active: Gauge::default(),
            state,
            transitions: Default::default(),
            other_transitions: Mutex::new(Vec::new()),
            detection: Gauge::default(),
            control_sent: Counter::default(),
            control_received: Counter::default(),
            rtt: Arc::new(Histogram::new(RTT_BUCKETS)),
            damped: Gauge::default(),
            damping_level: Gauge::default(),
            flaps: Counter::default(),
            blocked: Gauge::default(),
            loss: Default::default(),
            jitter: Default::default(),
            degraded: Gauge::default(),
        }
    }

    /// The path's measured quality (`None`: not measured yet, shown as 0).
    pub fn set_quality(
        &self,
        loss: (Option<f64>, Option<f64>),
        jitter: (Option<Duration>, Option<Duration>),
        degraded: bool,
    ) {
        let [loss_tx, loss_rx] = &self.loss;
        let [jitter_tx, jitter_rx] = &self.jitter;
        loss_tx.set(loss.0.unwrap_or(0.0));
        loss_rx.set(loss.1.unwrap_or(0.0));
        jitter_tx.set(jitter.0.map_or(0.0, |d| d.as_secs_f64()));
        jitter_rx.set(jitter.1.map_or(0.0, |d| d.as_secs_f64()));
        self.degraded.set(f64::from(u8::from(degraded)));
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
        match TRANSITIONS.iter().position(|k| *k == (from, to)) {
            Some(i) => {
                if let Some(c) = self.transitions.get(i) {
                    c.increment(1);
                }
            }
            None => {
                let mut other = self.other_transitions.lock();
                match other.iter_mut().find(|(k, _)| *k == (from, to)) {
                    Some((_, n)) => *n += 1,
                    None => other.push(((from, to), 1)),
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `series` (name and labels) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_family_has_help_and_a_type() {
        for (name, _) in METRICS {
            assert!(!help(name).is_empty(), "no HELP for {name}");
        }
        for (name, h) in HELP {
            assert!(!h.contains(['\\', '\n']), "{name}'s HELP needs escaping");
        }
        let m = Metrics::new();
        m.add_peer(0, "b");
        m.set_reorder(0, Some(Arc::new(ReorderCounters::default())));
        let labels = PathLabels {
            peer: "b",
            path: "l1",
            local: "198.18.0.1:4800".into(),
            remote: "198.18.0.2:4800".into(),
        };
        m.add_path(0, &labels, Arc::new(PathCounters::default()));
        m.record_failover(0, "l1", "l2", None);
        let mut text = String::new();
        m.render(&mut text);
        for (name, kind) in METRICS {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}"
            );
        }
    }

    #[test]
    fn renders_live_values_and_forgets_removed_series() {
        let m = Metrics::new();
        m.add_peer(0, "a\"b");
        let c = Arc::new(PathCounters::default());
        let labels = PathLabels {
            peer: "a\"b",
            path: "l1",
            local: "198.18.0.1:4800".into(),
            remote: "198.18.0.2:4800".into(),
        };
        m.add_path(0, &labels, c.clone());
        c.count_tx(100);
        let p = m.path(0).expect("path");
        p.rtt.record(0.000_7);
        p.rtt.record(2.0);
        p.set_state(State::Down, State::Up);
        p.set_state(State::Up, State::Init);
        m.record_failover(0, "l1", "l2", Some(Duration::from_millis(30)));
        let drops = DropCounters::default();
        drops.count(DropReason::ALL[0]);
        m.sync(&drops);
        let mut text = String::new();
        m.render(&mut text);
        let l = r#"{peer="a\"b",path="l1""#;
        let at = |s: &str| sample(&text, s);
        assert_eq!(
            at(&format!("crosslink_path_transmit_bytes_total{l}}}")),
            Some(100.0)
        );
        let rtt = "crosslink_path_rtt_seconds";
        assert_eq!(at(&format!("{rtt}_bucket{l},le=\"0.0005\"}}")), Some(0.0));
        assert_eq!(at(&format!("{rtt}_bucket{l},le=\"0.001\"}}")), Some(1.0));
        assert_eq!(at(&format!("{rtt}_bucket{l},le=\"1\"}}")), Some(1.0));
        assert_eq!(at(&format!("{rtt}_bucket{l},le=\"+Inf\"}}")), Some(2.0));
        assert_eq!(at(&format!("{rtt}_count{l}}}")), Some(2.0));
        assert_eq!(at(&format!("{rtt}_sum{l}}}")), Some(2.000_7));
        let state = "crosslink_bfd_session_state";
        assert_eq!(at(&format!("{state}{l},state=\"init\"}}")), Some(1.0));
        assert_eq!(at(&format!("{state}{l},state=\"up\"}}")), Some(0.0));
        let tr = "crosslink_bfd_session_transitions_total";
        assert_eq!(at(&format!("{tr}{l},from=\"down\",to=\"up\"}}")), Some(1.0));
        // Not one of RFC 5880's, but counted all the same.
        assert_eq!(at(&format!("{tr}{l},from=\"up\",to=\"init\"}}")), Some(1.0));
        assert_eq!(
            at(r#"crosslink_failovers_total{peer="a\"b",from="l1",to="l2"}"#),
            Some(1.0)
        );
        assert_eq!(
            at(r#"crosslink_failover_detection_seconds_bucket{peer="a\"b",le="0.03"}"#),
            Some(1.0)
        );
        let reason = DropReason::ALL[0].as_str();
        assert_eq!(
            at(&format!(
                "crosslink_packets_dropped_total{{reason=\"{reason}\"}}"
            )),
            Some(1.0)
        );
        assert_eq!(at("crosslink_config_last_reload_successful"), Some(1.0));

        m.remove_path(0);
        m.remove_peer(0);
        let mut text = String::new();
        m.render(&mut text);
        assert!(!text.contains("peer="), "{text}");
        assert!(!text.contains("# TYPE crosslink_path_up"));
        assert!(text.contains("crosslink_build_info{version="));
    }

    #[test]
    fn a_scrape_sees_what_was_set_before_it() {
        let m = Metrics::new();
        let first = m.scrape();
        m.set_reload_ok(false);
        let second = m.scrape();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(
            sample(&second, "crosslink_config_last_reload_successful"),
            Some(0.0)
        );
    }
}
