//! A lab of many peers (shared by tests/netns_scale.rs and benches/scale.rs):
//! the two gateways of `crosslink::lab`, each with N peers of two paths.
//! Peer i's path `l1` runs over the lab's `path1` link, `l2` over `path2`,
//! each between its own pair of addresses (single-hop BFD tells sessions
//! apart by their addresses before the discriminators are known, RFC 5881
//! section 3): 198.19.0.0/17 on path1 and 198.19.128.0/17 on path2, inside
//! the lab's 198.18.0.0/15.
#![allow(dead_code)]

use crosslink::lab::{config_duration, Gw, Host, Lab, LabOptions};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Peers the address plan holds (four addresses per peer in a /17).
pub const MAX_PEERS: usize = 8000;

/// gw's address of peer `i` on path `p` (1 or 2).
pub fn addr(gw: Gw, i: usize, p: u8) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 19, if p == 1 { 0 } else { 128 }, 0));
    let host = match gw {
        Gw::A => 1,
        Gw::B => 2,
    };
    Ipv4Addr::from(base + 4 * i as u32 + host)
}

/// The metrics port of each gateway (inside its namespace).
pub const METRICS_PORT: u16 = 9787;

pub struct ScaleLab {
    pub lab: Lab,
    pub peers: usize,
    /// `bfd.offload` on every path.
    pub offload: bool,
    /// When the gateways were started.
    pub started: Option<Instant>,
}

/// The config text of `gw` with `peers` peers; `changed` peer gets path
/// `l2`'s priority 3 instead of 2 (a reload that touches one peer).
/// `XL_SCALE_PROBE_MS` sets every peer's quality probe interval (the
/// default: 10 ms), `XL_SCALE_IDLE_PROBE_MS` its idle probe interval (the
/// default: none); `offload` sets `bfd.offload` (the BFD receive offload).
pub fn config_text(
    lab: &Lab,
    gw: Gw,
    peers: usize,
    changed: Option<usize>,
    offload: bool,
) -> String {
    let ms = |var: &str, key: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| format!("  {key} = \"{ms}ms\"\n"))
            .unwrap_or_default()
    };
    let keys = ms("XL_SCALE_PROBE_MS", "probe_interval")
        + &ms("XL_SCALE_IDLE_PROBE_MS", "idle_probe_interval");
    let probe = if keys.is_empty() {
        keys
    } else {
        format!("  [peer.sla]\n{keys}")
    };
    let o = lab.options();
    let mut t = format!(
        "[gateway]\nname = \"{gw}\"\ncontrol_socket = \"{sock}\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n\n\
         [bfd]\ntx_interval = \"{tx}\"\nrx_interval = \"{rx}\"\nmultiplier = {m}\n\
         offload = {offload}\n",
        sock = lab.socket_path(gw).display(),
        tx = config_duration(o.tx_interval),
        rx = config_duration(o.rx_interval),
        m = o.multiplier,
    );
    let other = gw.other();
    for i in 0..peers {
        t.push_str(&format!(
            "\n[[peer]]\nname = \"p{i}\"\ntun = \"xl{i}\"\nrevert_hold = \"2s\"\n{probe}"
        ));
        for p in [1u8, 2] {
            let prio = match (p, changed == Some(i)) {
                (1, _) => 1,
                (_, false) => 2,
                (_, true) => 3,
            };
            t.push_str(&format!(
                "  [[peer.path]]\n  name = \"l{p}\"\n  local = \"{}:4800\"\n  \
                 remote = \"{}:4800\"\n  priority = {prio}\n",
                addr(gw, i, p),
                addr(other, i, p),
            ));
        }
    }
    t
}

impl ScaleLab {
    /// Builds the lab (namespaces, links, 4 addresses per peer) and writes
    /// the configs; the gateways are started by [`ScaleLab::start`].
    /// With the BFD receive offload when `XL_SCALE_OFFLOAD=1`.
    pub fn new(tag: &str, bin: &str, peers: usize, interval: Duration, mult: u8) -> ScaleLab {
        ScaleLab::pair(tag, bin, None, peers, interval, mult)
    }

    /// The same with gw-b running `bin_b` when given (two builds side by
    /// side).
    pub fn pair(
        tag: &str,
        bin: &str,
        bin_b: Option<&str>,
        peers: usize,
        interval: Duration,
        mult: u8,
    ) -> ScaleLab {
        let offload = std::env::var("XL_SCALE_OFFLOAD").is_ok_and(|v| v == "1");
        let mut opts = LabOptions::new(tag, bin);
        opts.binary_b = bin_b.map(Into::into);
        ScaleLab::build(opts, peers, interval, mult, offload)
    }

    /// The same, with `bfd.offload` as given.
    pub fn with_offload(
        tag: &str,
        bin: &str,
        peers: usize,
        interval: Duration,
        mult: u8,
        offload: bool,
    ) -> ScaleLab {
        ScaleLab::build(LabOptions::new(tag, bin), peers, interval, mult, offload)
    }

    fn build(
        mut opts: LabOptions,
        peers: usize,
        interval: Duration,
        mult: u8,
        offload: bool,
    ) -> ScaleLab {
        assert!(peers <= MAX_PEERS);
        opts.tx_interval = interval;
        opts.rx_interval = interval;
        opts.multiplier = mult;
        let lab = Lab::new(opts).expect("lab");
        for gw in Gw::ALL {
            let mut batch = String::new();
            for i in 0..peers {
                for p in [1u8, 2] {
                    batch.push_str(&format!("addr add {}/17 dev path{p}\n", addr(gw, i, p)));
                }
            }
            let file = lab.dir().join(format!("addrs-{gw}.batch"));
            std::fs::write(&file, batch).expect("write batch");
            lab.ip_in(gw.host(), &["-batch", file.to_str().expect("utf-8 path")])
                .expect("addresses");
            let text = config_text(&lab, gw, peers, None, offload);
            lab.write_config(gw, &text).expect("config");
        }
        // The far gateway's addresses as permanent neighbours: with 2N
        // addresses on each side, resolved entries pass the kernel's
        // neighbour table limits (gc_thresh2 512, gc_thresh3 1024, shared by
        // every namespace), which then drops packets ("neighbor table
        // overflow") and churns entries. Permanent entries are not counted
        // against them (Linux 4.19+), and no host-wide setting changes.
        for gw in Gw::ALL {
            let other = gw.other();
            let mut batch = String::new();
            for p in [1u8, 2] {
                let dev = format!("path{p}");
                let mac = lab
                    .ip_in(other.host(), &["-j", "link", "show", "dev", &dev])
                    .ok()
                    .and_then(|out| serde_json::from_str::<Value>(&out).ok())
                    .and_then(|v| v[0]["address"].as_str().map(str::to_string))
                    .expect("the far gateway's path MAC");
                for i in 0..peers {
                    batch.push_str(&format!(
                        "neigh replace {} lladdr {mac} dev {dev} nud permanent\n",
                        addr(other, i, p)
                    ));
                }
            }
            let file = lab.dir().join(format!("neigh-{gw}.batch"));
            std::fs::write(&file, batch).expect("write batch");
            lab.ip_in(gw.host(), &["-batch", file.to_str().expect("utf-8 path")])
                .expect("neighbours");
        }
        ScaleLab {
            lab,
            peers,
            offload,
            started: None,
        }
    }

    pub fn start(&mut self) {
        self.started = Some(Instant::now());
        self.lab.start_gateways().expect("start gateways");
    }

    /// Waits until every path of every peer is up on both gateways;
    /// returns the time since [`ScaleLab::start`].
    pub fn wait_all_up(&mut self, timeout: Duration) -> Result<Duration, String> {
        let want = 2 * self.peers;
        let t0 = self.started.unwrap_or_else(Instant::now);
        // Every 200 ms: at N = 500 a document is 4.5 MB, and asking both
        // gateways for one back to back (each 20-60 ms to build, send and
        // parse) kept both CPUs full while the sessions came up.
        self.lab
            .wait_for_every(
                "every path up",
                timeout,
                Duration::from_millis(200),
                |_, s| count_paths(s, |p| p["state"] == "up") == want,
            )
            .map_err(|e| e.to_string())?;
        Ok(t0.elapsed())
    }
}

/// Paths of a status document for which `f` holds.
pub fn count_paths(status: &Value, mut f: impl FnMut(&Value) -> bool) -> usize {
    paths(status).filter(|p| f(p)).count()
}

/// Every path of every peer: (peer name, path).
pub fn paths(status: &Value) -> impl Iterator<Item = &Value> {
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|peer| peer["paths"].as_array().into_iter().flatten())
}

/// A figure of each path, by "peer/path" (paths without it left out).
fn by_path(status: &Value, figure: impl Fn(&Value) -> Option<u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for peer in status["peers"].as_array().into_iter().flatten() {
        let name = peer["name"].as_str().unwrap_or("?");
        for p in peer["paths"].as_array().into_iter().flatten() {
            if let Some(v) = figure(p) {
                let path = p["name"].as_str().unwrap_or("?");
                out.insert(format!("{name}/{path}"), v);
            }
        }
    }
    out
}

/// BFD failures (Up -> Down not administrative) by "peer/path".
pub fn failures(status: &Value) -> BTreeMap<String, u64> {
    by_path(status, |p| {
        Some(p["bfd"]["failures"].as_u64().unwrap_or(u64::MAX))
    })
}

/// The worst transmit gap of any Up session, in µs.
pub fn worst_tx_gap_us(status: &Value) -> u64 {
    tx_gaps(status).into_values().max().unwrap_or(0)
}

/// Each Up session's worst transmit gap so far, in µs, by "peer/path".
pub fn tx_gaps(status: &Value) -> BTreeMap<String, u64> {
    by_path(status, |p| p["bfd"]["max_tx_gap_us"].as_u64())
}

/// The worst transmit gap that happened between two status documents: a
/// session's worst can only grow, so one that grew had it in between
/// (0 when none grew: every gap in between was at most the earlier worst).
pub fn worst_tx_gap_between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| *v > b))
        .map(|(_, v)| *v)
        .max()
        .unwrap_or(0)
}

/// Sum over both maps of how much each entry grew.
pub fn grown(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Vec<String> {
    after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| *v > b))
        .map(|(k, v)| format!("{k}:+{}", v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

/// The process's threads: (count, the tid of the thread named `name`).
pub fn threads(pid: u32, name: &str) -> (usize, Option<u32>) {
    let mut count = 0;
    let mut found = None;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            count += 1;
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                found = t.file_name().to_str().and_then(|s| s.parse().ok());
            }
        }
    }
    (count, found)
}

/// CPU seconds (user + system) a thread has used.
pub fn thread_cpu(pid: u32, tid: u32) -> Option<f64> {
    stat_cpu(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// CPU seconds the whole process used so far (every thread's utime and
/// stime).
pub fn process_cpu(pid: u32) -> Option<f64> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// utime + stime of a `stat` file, in seconds.
fn stat_cpu(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let after = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the comm.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// VmRSS in MB.
pub fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Seconds a `curl` of the gateway's /metrics took (its own `time_total`)
/// and the size of the answer.
pub fn scrape(lab: &Lab, gw: Gw) -> Option<(f64, usize)> {
    let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
    let out = lab
        .command_in(gw.host(), "curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total} %{size_download}",
        ])
        .arg(&url)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Seconds one status document straight from the control socket takes.
pub fn status_latency(lab: &Lab, gw: Gw) -> Option<f64> {
    let t = Instant::now();
    lab.poll(gw).ok()?;
    Some(t.elapsed().as_secs_f64())
}

/// The median of some samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn host(gw: Gw) -> Host {
    gw.host()
}
