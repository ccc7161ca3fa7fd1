//! `crosslink probe`: a fixed-rate UDP traffic probe for the lab, the demo and the
//! netns tests (a hidden subcommand).
//!
//! `probe send` paces datagrams with absolute deadlines (`start + seq × interval`, so
//! late packets never shift the ones after them), each carrying its sequence number,
//! its send time and the sender's interval. `probe recv` collects them and prints one
//! JSON report: how many were sent (from the sender's stop packet, else the highest
//! sequence seen), received, lost, duplicated and reordered, every run of consecutive
//! missing sequence numbers (an outage, `run × interval` long) and the largest gap
//! between two arrivals. Both stop on SIGTERM/SIGINT; the sender then sends a few stop
//! packets, which end the receiver too.
//!
//! Sender and receiver share a clock in the lab, so the receiver also reports one-way
//! latencies: the median of the packets that arrived in order, and how much later than
//! that median the packets came that arrived after a higher sequence number (*late*:
//! rebuilt from FEC parity, or a copy from a slower path), median, 90th percentile and
//! worst. Latencies are kept for the first [`LATENCY_SAMPLES`] packets of each kind
//! (the worst late one over all of them), so the receiver's memory stays bounded.
//!
//! `probe tcp-send` writes a paced TCP byte stream (a chunk every 500 µs, from a
//! chosen source port if asked, so a test can place the flow on one ECMP nexthop);
//! `probe tcp-recv` accepts one connection and reports the bytes read, the longest
//! gap between two reads, and how the connection ended (`eof` when the sender closed
//! it cleanly, `error` on a reset).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Payload magic: "XLPB".
const MAGIC: [u8; 4] = *b"XLPB";
const KIND_DATA: u8 = 0;
const KIND_STOP: u8 = 1;
/// Header length; payloads are padded up to `--size`.
pub const HEADER_LEN: usize = 40;
/// Sequence numbers above this are ignored (bounds the receiver's memory).
const MAX_SEQ: u64 = 50_000_000;
/// Outages listed individually in the report (enough for a few seconds of
/// random loss at 1000 packets/s, so each can be attributed by its time).
const MAX_LISTED_OUTAGES: usize = 2000;
/// Latencies kept per kind (in order, late): 8 MiB each at most, some nine
/// minutes of in-order packets at 2000 packets/s.
pub const LATENCY_SAMPLES: usize = 1 << 20;

#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    #[command(subcommand)]
    pub mode: ProbeMode,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ProbeMode {
    /// Send a fixed-rate UDP stream.
    Send(SendArgs),
    /// Receive the stream and print a JSON report.
    Recv(RecvArgs),
    /// Send a paced TCP byte stream (one connection).
    TcpSend(TcpSendArgs),
    /// Accept one TCP connection, read it and print a JSON report (the longest
    /// gap between two reads, how the connection ended).
    TcpRecv(TcpRecvArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TcpSendArgs {
    /// Destination address, IP:PORT.
    #[arg(long)]
    pub to: SocketAddr,
    /// Bytes per second.
    #[arg(long, default_value_t = 2_000_000)]
    pub rate: u32,
    /// How long to send ("10s"); stops earlier on SIGTERM/SIGINT.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Local address to bind, IP:PORT (a fixed port picks the flow's hash).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TcpRecvArgs {
    /// Address to listen on, IP:PORT.
    #[arg(long, default_value = "0.0.0.0:9100")]
    pub bind: SocketAddr,
    /// Give up after this long ("30s").
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    /// Destination address, IP:PORT.
    #[arg(long)]
    pub to: SocketAddr,
    /// Packets per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// How long to send ("10s", "500ms"); stops earlier on SIGTERM/SIGINT.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// UDP payload size in bytes (at least 40).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Local address to bind, IP:PORT.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RecvArgs {
    /// Address to listen on, IP:PORT.
    #[arg(long, default_value = "0.0.0.0:9000")]
    pub bind: SocketAddr,
    /// Give up after this long ("30s"), even without the sender's stop packet.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
}

/// Parses "10ms", "2s", "1.5s", "250us", "1m"; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 10ms, 2s"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "m" | "min" => value * 60.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Entry point of `crosslink probe`; returns the process exit code.
pub fn main(args: ProbeArgs) -> i32 {
    let stop = match stop_flag_on_signals() {
        Ok(flag) => flag,
        Err(e) => {
            eprintln!("probe: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let result = match args.mode {
        ProbeMode::Send(a) => send(&a, &stop).map(|r| print_json(&r)),
        ProbeMode::Recv(a) => recv(&a, &stop).map(|r| print_json(&r)),
        ProbeMode::TcpSend(a) => tcp_send(&a, &stop).map(|r| print_json(&r)),
        ProbeMode::TcpRecv(a) => tcp_recv(&a, &stop).map(|r| print_json(&r)),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("probe: {e}");
            1
        }
    }
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("probe: cannot encode report: {e}"),
    }
}

/// A flag set by SIGTERM or SIGINT (handled on a small tokio thread: no unsafe code).
pub fn stop_flag_on_signals() -> io::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let flag = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let setter = flag.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    setter.store(true, Ordering::SeqCst);
                }
            })
        })?;
    Ok(flag)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One decoded probe datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub stop: bool,
    pub seq: u64,
    pub sent_unix_ns: u64,
    pub interval_ns: u64,
    /// In a stop packet: how many data packets were sent.
    pub total: u64,
}

impl Datagram {
    pub fn encode(&self, buf: &mut [u8]) -> usize {
        if buf.len() < HEADER_LEN {
            return 0;
        }
        buf[..4].copy_from_slice(&MAGIC);
        buf[4] = if self.stop { KIND_STOP } else { KIND_DATA };
        buf[5..8].fill(0);
        buf[8..16].copy_from_slice(&self.seq.to_be_bytes());
        buf[16..24].copy_from_slice(&self.sent_unix_ns.to_be_bytes());
        buf[24..32].copy_from_slice(&self.interval_ns.to_be_bytes());
        buf[32..40].copy_from_slice(&self.total.to_be_bytes());
        HEADER_LEN
    }

    pub fn decode(buf: &[u8]) -> Option<Datagram> {
        let field = |at: usize| -> Option<u64> {
            let bytes: [u8; 8] = buf.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        };
        if buf.get(..4)? != MAGIC {
            return None;
        }
        let stop = match *buf.get(4)? {
            KIND_DATA => false,
            KIND_STOP => true,
            _ => return None,
        };
        Some(Datagram {
            stop,
            seq: field(8)?,
            sent_unix_ns: field(16)?,
            interval_ns: field(24)?,
            total: field(32)?,
        })
    }
}

/// What `probe send` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub sent: u64,
    pub send_errors: u64,
    pub first_error: Option<String>,
    pub rate_pps: u32,
    pub interval_us: f64,
    pub elapsed_ms: f64,
    /// The latest a packet left after its deadline.
    pub max_late_us: f64,
    /// Which packet that was.
    pub max_late_seq: u64,
    /// Packets that left more than 1 ms after their deadline.
    pub late_over_1ms: u64,
    pub stopped_by: &'static str,
}

/// Sleeps until `deadline`: coarse sleep, then a busy-wait for the last ~150 µs.
fn pace_until(deadline: Instant) {
    const SPIN: Duration = Duration::from_micros(150);
    let now = Instant::now();
    if deadline > now + SPIN {
        std::thread::sleep(deadline - now - SPIN);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

pub fn send(args: &SendArgs, stop: &AtomicBool) -> io::Result<SendReport> {
    if args.rate == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--rate must be > 0",
        ));
    }
    let socket = UdpSocket::bind(args.bind)?;
    let interval_ns = 1_000_000_000u64 / u64::from(args.rate);
    let mut buf = vec![0u8; args.size.max(HEADER_LEN)];
    let start = Instant::now();
    let mut report = SendReport {
        sent: 0,
        send_errors: 0,
        first_error: None,
        rate_pps: args.rate,
        interval_us: interval_ns as f64 / 1e3,
        elapsed_ms: 0.0,
        max_late_us: 0.0,
        max_late_seq: 0,
        late_over_1ms: 0,
        stopped_by: "duration",
    };
    let mut max_late = Duration::ZERO;
    for seq in 0u64.. {
        let deadline = start + Duration::from_nanos(interval_ns.saturating_mul(seq));
        if deadline.duration_since(start) >= args.duration {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            report.stopped_by = "signal";
            break;
        }
        pace_until(deadline);
        let late = Instant::now().saturating_duration_since(deadline);
        if late > max_late {
            max_late = late;
            report.max_late_seq = seq;
        }
        if late > Duration::from_millis(1) {
            report.late_over_1ms += 1;
        }
        let dgram = Datagram {
            stop: false,
            seq,
            sent_unix_ns: unix_ns(),
            interval_ns,
            total: 0,
        };
        dgram.encode(&mut buf);
        report.sent = seq + 1;
        if let Err(e) = socket.send_to(&buf, args.to) {
            // A route may vanish while every path is down: count it and go on.
            report.send_errors += 1;
            report.first_error.get_or_insert_with(|| e.to_string());
        }
    }
    report.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    report.max_late_us = max_late.as_secs_f64() * 1e6;
    let stop_dgram = Datagram {
        stop: true,
        seq: report.sent,
        sent_unix_ns: unix_ns(),
        interval_ns,
        total: report.sent,
    };
    stop_dgram.encode(&mut buf);
    for _ in 0..5 {
        let _ = socket.send_to(&buf, args.to);
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(report)
}

/// One run of consecutive missing sequence numbers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outage {
    pub first_seq: u64,
    pub packets: u64,
    /// `packets × interval`.
    pub ms: f64,
    /// When its first missing packet was due, relative to the first packet (seq 0).
    pub start_ms: f64,
}

/// What `probe recv` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RecvReport {
    /// Packets the sender sent: from its stop packet, else highest sequence + 1.
    pub sent: u64,
    pub sent_source: &'static str,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    pub reordered: u64,
    pub interval_us: f64,
    pub rate_pps: f64,
    /// The longest run of consecutive missing sequence numbers.
    pub longest_missing_run: u64,
    /// `longest_missing_run × interval`.
    pub longest_outage_ms: f64,
    /// When the longest outage started, relative to the first packet (seq 0).
    pub longest_outage_start_ms: Option<f64>,
    pub outage_count: u64,
    /// The first outages, in sequence order.
    pub outages: Vec<Outage>,
    /// The largest gap between two consecutive arrivals.
    pub max_gap_ms: f64,
    /// When that gap started, relative to the first arrival.
    pub max_gap_at_ms: Option<f64>,
    /// Wall-clock send time of seq 0 (Unix ms), to line the report up with other clocks.
    pub first_packet_unix_ms: Option<f64>,
    pub latency_min_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    /// The median one-way latency of the packets that arrived in order (no
    /// higher sequence number before them).
    pub latency_median_ms: Option<f64>,
    /// Packets that arrived after a higher sequence number (each also counted in
    /// `reordered`): rebuilt from parity, or from a slower path.
    pub late_count: u64,
    /// How much later than `latency_median_ms` the late packets arrived: median,
    /// 90th percentile and worst (the median and percentile of the first
    /// [`LATENCY_SAMPLES`]).
    pub late_extra_ms_median: Option<f64>,
    pub late_extra_ms_p90: Option<f64>,
    pub late_extra_ms_max: Option<f64>,
    pub stopped_by: &'static str,
}

/// The receiver's bookkeeping, kept apart from the socket so it can be unit-tested.
#[derive(Debug, Default)]
pub struct Collector {
    seen: Vec<u8>,
    received: u64,
    duplicates: u64,
    reordered: u64,
    highest: Option<u64>,
    interval_ns: u64,
    stop_total: Option<u64>,
    first_arrival: Option<Instant>,
    last_arrival: Option<Instant>,
    max_gap: Duration,
    max_gap_at: Option<Duration>,
    seq0_unix_ns: Option<u64>,
    latency_min_ns: Option<i128>,
    latency_max_ns: Option<i128>,
    /// One-way latencies (ns) of the first in-order packets.
    in_order_latency_ns: Vec<i64>,
    /// One-way latencies (ns) of the first late packets.
    late_latency_ns: Vec<i64>,
    late_count: u64,
    late_latency_max_ns: Option<i64>,
}

impl Collector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one datagram; returns true when it was the sender's stop packet.
    pub fn handle(&mut self, d: &Datagram, now: Instant, now_unix_ns: u64) -> bool {
        if d.interval_ns > 0 {
            self.interval_ns = d.interval_ns;
        }
        if d.stop {
            self.stop_total = Some(d.total.min(MAX_SEQ));
            return true;
        }
        if d.seq >= MAX_SEQ {
            return false;
        }
        self.on_arrival(now);
        let idx = usize::try_from(d.seq).unwrap_or(usize::MAX);
        if idx >= self.seen.len() {
            self.seen.resize(idx + 1, 0);
        }
        if self.seen[idx] != 0 {
            self.duplicates += 1;
            return false;
        }
        self.seen[idx] = 1;
        self.received += 1;
        let late = self.highest.is_some_and(|h| d.seq < h);
        if late {
            self.reordered += 1;
        }
        self.highest = Some(self.highest.map_or(d.seq, |h| h.max(d.seq)));
        let offset = d.interval_ns.saturating_mul(d.seq);
        self.seq0_unix_ns
            .get_or_insert(d.sent_unix_ns.saturating_sub(offset));
        let latency = i128::from(now_unix_ns) - i128::from(d.sent_unix_ns);
        self.latency_min_ns = Some(self.latency_min_ns.map_or(latency, |m| m.min(latency)));
        self.latency_max_ns = Some(self.latency_max_ns.map_or(latency, |m| m.max(latency)));
        let latency =
            i64::try_from(latency).unwrap_or(if latency < 0 { i64::MIN } else { i64::MAX });
        if late {
            self.late_count += 1;
            self.late_latency_max_ns =
                Some(self.late_latency_max_ns.map_or(latency, |m| m.max(latency)));
            if self.late_latency_ns.len() < LATENCY_SAMPLES {
                self.late_latency_ns.push(latency);
            }
        } else if self.in_order_latency_ns.len() < LATENCY_SAMPLES {
            self.in_order_latency_ns.push(latency);
        }
        false
    }

    fn on_arrival(&mut self, now: Instant) {
        let first = *self.first_arrival.get_or_insert(now);
        if let Some(last) = self.last_arrival {
            let gap = now.saturating_duration_since(last);
            if gap > self.max_gap {
                self.max_gap = gap;
                self.max_gap_at = Some(last.saturating_duration_since(first));
            }
        }
        self.last_arrival = Some(now);
    }

    pub fn report(&self, stopped_by: &'static str) -> RecvReport {
        let (sent, sent_source) = match (self.stop_total, self.highest) {
            (Some(total), _) => (total, "stop_packet"),
            (None, Some(h)) => (h + 1, "highest_seq"),
            (None, None) => (0, "none"),
        };
        let interval_ms = self.interval_ns as f64 / 1e6;
        let outages = self.outages(sent, interval_ms);
        let longest = outages.iter().max_by(|a, b| {
            a.packets
                .cmp(&b.packets)
                .then(b.first_seq.cmp(&a.first_seq))
        });
        let lost = sent.saturating_sub(self.received);
        let base = quantile(&self.in_order_latency_ns, 0.5);
        let extra = |q: Option<i64>| -> Option<f64> { Some((q? as f64 - base? as f64) / 1e6) };
        RecvReport {
            sent,
            sent_source,
            received: self.received,
            lost,
            loss_pct: if sent > 0 {
                lost as f64 * 100.0 / sent as f64
            } else {
                0.0
            },
            duplicates: self.duplicates,
            reordered: self.reordered,
            interval_us: self.interval_ns as f64 / 1e3,
            rate_pps: if self.interval_ns > 0 {
                1e9 / self.interval_ns as f64
            } else {
                0.0
            },
            longest_missing_run: longest.map_or(0, |o| o.packets),
            longest_outage_ms: longest.map_or(0.0, |o| o.ms),
            longest_outage_start_ms: longest.map(|o| o.start_ms),
            outage_count: outages.len() as u64,
            outages: outages.iter().take(MAX_LISTED_OUTAGES).cloned().collect(),
            max_gap_ms: self.max_gap.as_secs_f64() * 1e3,
            max_gap_at_ms: self.max_gap_at.map(|d| d.as_secs_f64() * 1e3),
            first_packet_unix_ms: self.seq0_unix_ns.map(|ns| ns as f64 / 1e6),
            latency_min_ms: self.latency_min_ns.map(|ns| ns as f64 / 1e6),
            latency_max_ms: self.latency_max_ns.map(|ns| ns as f64 / 1e6),
            latency_median_ms: base.map(|ns| ns as f64 / 1e6),
            late_count: self.late_count,
            late_extra_ms_median: extra(quantile(&self.late_latency_ns, 0.5)),
            late_extra_ms_p90: extra(quantile(&self.late_latency_ns, 0.9)),
            late_extra_ms_max: extra(self.late_latency_max_ns),
            stopped_by,
        }
    }

    /// Runs of missing sequence numbers in `0..sent`.
    fn outages(&self, sent: u64, interval_ms: f64) -> Vec<Outage> {
        let mut out = Vec::new();
        let mut run_start: Option<u64> = None;
        for seq in 0..=sent {
            let idx = usize::try_from(seq).unwrap_or(usize::MAX);
            let missing = seq < sent && self.seen.get(idx).copied().unwrap_or(0) == 0;
            match (missing, run_start) {
                (true, None) => run_start = Some(seq),
                (false, Some(first)) => {
                    let packets = seq - first;
                    out.push(Outage {
                        first_seq: first,
                        packets,
                        ms: packets as f64 * interval_ms,
                        start_ms: first as f64 * interval_ms,
                    });
                    run_start = None;
                }
                _ => {}
            }
        }
        out
    }
}

/// The `q` quantile (0..=1, nearest rank) of `values`; `None` when empty.
fn quantile(values: &[i64], q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    let rank = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    let (_, x, _) = v.select_nth_unstable(rank);
    Some(*x)
}

pub fn recv(args: &RecvArgs, stop: &AtomicBool) -> io::Result<RecvReport> {
    let socket = UdpSocket::bind(args.bind)?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    // The lab waits for this line before it starts the sender.
    eprintln!("ready {}", socket.local_addr()?);
    let end = Instant::now() + args.duration;
    let mut collector = Collector::new();
    let mut buf = vec![0u8; 65_536];
    let stopped_by = loop {
        if stop.load(Ordering::Relaxed) {
            break "signal";
        }
        if Instant::now() >= end {
            break "duration";
        }
        match socket.recv_from(&mut buf) {
            Ok((n, _from)) => {
                let now = Instant::now();
                let Some(d) = buf.get(..n).and_then(Datagram::decode) else {
                    continue;
                };
                if collector.handle(&d, now, unix_ns()) {
                    break "stop_packet";
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    Ok(collector.report(stopped_by))
}

/// What `probe tcp-send` prints.
#[derive(Debug, Clone, Serialize)]
pub struct TcpSendReport {
    pub bytes: u64,
    pub elapsed_ms: f64,
    /// The write error that ended the stream (a reset), if any.
    pub error: Option<String>,
    pub stopped_by: &'static str,
}

/// Chunks of a paced TCP stream: one every 500 µs.
const TCP_CHUNK_INTERVAL: Duration = Duration::from_micros(500);

pub fn tcp_send(args: &TcpSendArgs, stop: &AtomicBool) -> io::Result<TcpSendReport> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(args.to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&args.bind.into())?;
    socket.connect_timeout(&args.to.into(), Duration::from_secs(5))?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_nodelay(true)?;
    let per_chunk = (u64::from(args.rate) * 500 / 1_000_000).max(1) as usize;
    let chunk = vec![0x5au8; per_chunk];
    let start = Instant::now();
    let mut report = TcpSendReport {
        bytes: 0,
        elapsed_ms: 0.0,
        error: None,
        stopped_by: "duration",
    };
    for n in 0u32.. {
        let deadline = start + TCP_CHUNK_INTERVAL * n;
        if deadline.duration_since(start) >= args.duration {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            report.stopped_by = "signal";
            break;
        }
        pace_until(deadline);
        if let Err(e) = io::Write::write_all(&mut stream, &chunk) {
            report.error = Some(e.to_string());
            report.stopped_by = "error";
            break;
        }
        report.bytes += chunk.len() as u64;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    report.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// What `probe tcp-recv` prints.
#[derive(Debug, Clone, Serialize)]
pub struct TcpRecvReport {
    pub bytes: u64,
    /// The longest time between two reads that returned data.
    pub max_gap_ms: f64,
    /// When that gap started, relative to the first byte.
    pub max_gap_at_ms: Option<f64>,
    pub elapsed_ms: f64,
    /// "eof" (the sender closed cleanly), "error" (a reset), "signal" or "duration".
    pub ended_by: &'static str,
    pub error: Option<String>,
}

pub fn tcp_recv(args: &TcpRecvArgs, stop: &AtomicBool) -> io::Result<TcpRecvReport> {
    let listener = std::net::TcpListener::bind(args.bind)?;
    listener.set_nonblocking(true)?;
    eprintln!("ready {}", listener.local_addr()?);
    let end = Instant::now() + args.duration;
    let mut report = TcpRecvReport {
        bytes: 0,
        max_gap_ms: 0.0,
        max_gap_at_ms: None,
        elapsed_ms: 0.0,
        ended_by: "duration",
        error: None,
    };
    let mut stream = loop {
        if stop.load(Ordering::Relaxed) {
            report.ended_by = "signal";
            return Ok(report);
        }
        if Instant::now() >= end {
            return Ok(report);
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut buf = vec![0u8; 65_536];
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    let mut max_gap = Duration::ZERO;
    report.ended_by = loop {
        if stop.load(Ordering::Relaxed) {
            break "signal";
        }
        if Instant::now() >= end {
            break "duration";
        }
        match io::Read::read(&mut stream, &mut buf) {
            Ok(0) => break "eof",
            Ok(n) => {
                let now = Instant::now();
                let f = *first.get_or_insert(now);
                if let Some(l) = last {
                    let gap = now.saturating_duration_since(l);
                    if gap > max_gap {
                        max_gap = gap;
                        report.max_gap_at_ms =
                            Some(l.saturating_duration_since(f).as_secs_f64() * 1e3);
                    }
                }
                last = Some(now);
                report.bytes += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                report.error = Some(e.to_string());
                break "error";
            }
        }
    };
    report.max_gap_ms = max_gap.as_secs_f64() * 1e3;
    report.elapsed_ms = first.map_or(0.0, |f| f.elapsed().as_secs_f64() * 1e3);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u64) -> Datagram {
        Datagram {
            stop: false,
            seq,
            sent_unix_ns: 1_000_000_000 + seq * 1_000_000,
            interval_ns: 1_000_000,
            total: 0,
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn datagram_round_trips_and_rejects_garbage() {
        let d = data(42);
        let mut buf = [0u8; 64];
        assert_eq!(d.encode(&mut buf), HEADER_LEN);
        assert_eq!(Datagram::decode(&buf), Some(d));
        assert_eq!(Datagram::decode(&buf[..20]), None);
        buf[0] = b'Y';
        assert_eq!(Datagram::decode(&buf), None);
    }

    #[test]
    fn collector_finds_longest_outage_duplicates_and_reordering() {
        let mut c = Collector::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        // 0..10 arrive, 10..40 lost, 40..50 arrive, 52 before 51, 55 twice, 56..60 lost
        let mut order: Vec<u64> = (0..10).chain(40..51).collect();
        order.extend([52, 51, 53, 54, 55, 55]);
        for (i, seq) in order.iter().enumerate() {
            c.handle(
                &data(*seq),
                t0 + ms * (*seq as u32) + ms * (i as u32 % 2),
                0,
            );
        }
        let stop = Datagram {
            stop: true,
            total: 60,
            ..data(60)
        };
        assert!(c.handle(&stop, t0 + ms * 60, 0));
        let r = c.report("stop_packet");
        assert_eq!(r.sent, 60);
        assert_eq!(r.received, 26);
        assert_eq!(r.lost, 34);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.reordered, 1);
        assert_eq!(r.longest_missing_run, 30);
        assert!((r.longest_outage_ms - 30.0).abs() < 1e-9);
        assert_eq!(r.longest_outage_start_ms, Some(10.0));
        assert_eq!(r.outage_count, 2);
        assert_eq!(
            r.outages[1],
            Outage {
                first_seq: 56,
                packets: 4,
                ms: 4.0,
                start_ms: 56.0
            }
        );
        assert!(r.max_gap_ms >= 29.0, "{}", r.max_gap_ms);
        assert_eq!(r.first_packet_unix_ms, Some(1000.0));
    }

    #[test]
    fn collector_reports_how_late_the_late_packets_came() {
        let mut c = Collector::new();
        let t0 = Instant::now();
        // 0..20 sent 1 ms apart, each 2 ms on its way; 5 comes after 9, 8 ms
        // late, and 12 after 14, 4 ms late; 15 twice
        let on_time = |seq: u64| 1_000_000_000 + seq * 1_000_000 + 2_000_000;
        let mut arrivals: Vec<(u64, u64)> = (0..20)
            .filter(|s| ![5, 12].contains(s))
            .map(|s| (s, on_time(s)))
            .collect();
        arrivals.insert(9, (5, on_time(5) + 8_000_000));
        arrivals.insert(14, (12, on_time(12) + 4_000_000));
        arrivals.push((15, on_time(15) + 9_000_000));
        for (seq, at) in arrivals {
            c.handle(&data(seq), t0, at);
        }
        let r = c.report("duration");
        assert_eq!((r.received, r.duplicates), (20, 1));
        assert_eq!((r.reordered, r.late_count), (2, 2));
        assert_eq!(r.latency_median_ms, Some(2.0));
        assert_eq!(r.late_extra_ms_median, Some(8.0));
        assert_eq!(r.late_extra_ms_max, Some(8.0));
        assert_eq!(quantile(&[3, 1, 2], 0.0), Some(1));
        assert_eq!(quantile(&[3, 1, 2], 0.5), Some(2));
        assert_eq!(quantile(&[], 0.5), None);

        let none = Collector::new().report("duration");
        assert_eq!(none.late_count, 0);
        assert_eq!(none.late_extra_ms_median, None);
        assert_eq!(none.latency_median_ms, None);
    }

    #[test]
    fn collector_without_stop_packet_uses_highest_sequence() {
        let mut c = Collector::new();
        let now = Instant::now();
        for seq in [0, 1, 3] {
            c.handle(&data(seq), now, 0);
        }
        let r = c.report("duration");
        assert_eq!((r.sent, r.sent_source, r.lost), (4, "highest_seq", 1));
        assert!(!c.handle(
            &Datagram {
                seq: MAX_SEQ + 1,
                ..data(0)
            },
            now,
            0
        ));
    }
}
