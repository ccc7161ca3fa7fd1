//! The `/metrics` exposition of a large gateway, without network
//! namespaces: N peers (default 500) of two paths each are registered
//! through [`Metrics`] as the daemon registers them (peer, its lanes'
//! resequencing counters, two paths; every session brought Up, one path
//! active, a few RTT samples, quality figures), then it reports, median of
//! `--runs` (default 11):
//!
//! * `sync`: one [`Metrics::sync`] (the copy of the forwarding counters into
//!   the exporter, twice a second);
//! * `render`: producing the scrape body ([`Metrics::render`]), its size
//!   and the process's CPU time (user + system) per render;
//! * `scrape`: one HTTP GET of `/metrics` on loopback from a client thread
//!   in this process, until the last byte, the bytes on the wire, and the
//!   process's CPU time per scrape (server and client);
//! * `scrape, 4 at once`: four clients scraping together, until the last
//!   one is done.
//!
//! Usage: `cargo bench --bench metrics [-- --peers 500 --runs 11 --dump
//! FILE]` (`--dump` writes one scrape body to FILE). Under
//! `cargo test --all-targets` (no `--bench` argument) it does nothing.

use crosslink::telemetry::metrics::{self, Endpoint, Metrics, PathLabels};
use crosslink::telemetry::{DropCounters, PathCounters, ReorderCounters};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    peers: usize,
    runs: usize,
    dump: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        peers: 500,
        runs: 11,
        dump: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--peers" => a.peers = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.peers),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.runs),
            "--dump" => a.dump = it.next(),
            _ => {}
        }
    }
    a.runs = a.runs.max(1);
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The process's CPU time so far (user + system), from getrusage.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// One GET of /metrics (with the head Prometheus sends): the seconds until
/// the connection closed, and the bytes of the answer (head and body).
fn scrape(addr: SocketAddr) -> Option<(f64, usize)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain;version=0.0.4\r\n\
          Accept-Encoding: gzip\r\n\r\n",
    )
    .ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return None;
    }
    Some((t.elapsed().as_secs_f64(), answer.len()))
}

fn register(m: &Metrics, peers: usize) -> Vec<Arc<PathCounters>> {
    let mut counters = Vec::new();
    for i in 0..peers {
        let name = format!("p{i}");
        m.add_peer(i, &name);
        m.set_reorder(i, Some(Arc::new(ReorderCounters::default())));
        for p in 0..2usize {
            let id = 2 * i + p;
            let c = Arc::new(PathCounters::default());
            let path = format!("l{}", p + 1);
            let labels = PathLabels {
                peer: &name,
                path: &path,
                local: format!("198.18.{}.{}:4800", i / 250, i % 250 + 1),
                remote: format!("198.19.{}.{}:4800", i / 250, i % 250 + 1),
            };
            m.add_path(id, &labels, c.clone());
            counters.push(c);
            if let Some(pm) = m.path(id) {
                use crosslink::core::wire::bfd::State;
                pm.set_state(State::Down, State::Init);
                pm.set_state(State::Init, State::Up);
                pm.set_active(p == 0);
                pm.set_detection_time(Duration::from_millis(30));
                pm.set_control_counts(1000, 1000);
                for k in 0..20u32 {
                    pm.rtt.record(0.000_2 + f64::from(k) * 0.000_01);
                }
                pm.set_quality((Some(0.0), Some(0.0)), (None, None), false);
                pm.set_damping(0, 0, false, false);
            }
        }
        m.set_peer_up(i, true);
    }
    counters
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let endpoint: Endpoint =
        metrics::install("127.0.0.1:0".parse().expect("address"), None).expect("recorder");
    let addr = endpoint.local_addr().expect("listener address");
    let m = Arc::new(Metrics::new());
    let drops = DropCounters::default();
    let t = Instant::now();
    let counters = register(&m, args.peers);
    let registered = t.elapsed();
    m.sync(&drops);

    let mut sync = Vec::new();
    for r in 0..args.runs {
        for (k, c) in counters.iter().enumerate() {
            c.count_tx(100 + r + k);
        }
        let t = Instant::now();
        m.sync(&drops);
        sync.push(t.elapsed().as_secs_f64());
    }

    let mut render = Vec::new();
    let mut size = 0;
    let cpu = cpu_time();
    for _ in 0..args.runs {
        let t = Instant::now();
        let mut body = String::new();
        m.render(&mut body);
        render.push(t.elapsed().as_secs_f64());
        size = body.len();
    }
    let render_cpu = (cpu_time() - cpu).as_secs_f64() / args.runs as f64;
    let body = m.scrape();
    let lines = body.lines().count();
    if let Some(path) = &args.dump {
        std::fs::write(path, body.as_bytes()).expect("dump");
    }

    endpoint.serve(m.clone());
    let mut alone = Vec::new();
    let mut wire = 0;
    let cpu = cpu_time();
    for _ in 0..args.runs {
        if let Some((s, n)) = scrape(addr) {
            alone.push(s);
            wire = n;
        }
    }
    let scrape_cpu = (cpu_time() - cpu).as_secs_f64() / args.runs as f64;

    let mut together = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let clients: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(move || scrape(addr)))
            .collect();
        let ok = clients
            .into_iter()
            .all(|c| c.join().ok().flatten().is_some());
        if ok {
            together.push(t.elapsed().as_secs_f64());
        }
    }

    let ms = |s: f64| s * 1000.0;
    println!(
        "metrics bench: {} peers x 2 paths, {} series lines, registered in {:.0} ms",
        args.peers,
        lines,
        ms(registered.as_secs_f64())
    );
    println!(
        "  sync                    {:8.2} ms (median of {})",
        ms(median(sync)),
        args.runs
    );
    println!(
        "  render                  {:8.2} ms, {:.2} MB, CPU {:.1} ms per render",
        ms(median(render)),
        size as f64 / 1e6,
        ms(render_cpu)
    );
    println!(
        "  scrape                  {:8.2} ms, {:.2} MB on the wire, CPU {:.1} ms per scrape",
        ms(median(alone)),
        wire as f64 / 1e6,
        ms(scrape_cpu)
    );
    println!(
        "  scrape, 4 at once       {:8.2} ms until the last answer",
        ms(median(together))
    );
}
