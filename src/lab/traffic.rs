//! Traffic and measurement in the lab: the probe's sender and receiver,
//! iperf3 transfers, and the readings of the benches (a thread's CPU ticks,
//! a process's memory, a reference timer that sees the machine stall).

use super::*;

/// A running traffic receiver (`crosslink probe recv` in the server namespace).
pub struct ProbeReceiver {
    child: Child,
    stdout: Option<ChildStdout>,
}

impl ProbeReceiver {
    /// Waits for the report (the sender's stop packet ends the receiver); after
    /// `timeout` it is told to stop with SIGTERM.
    pub fn finish(mut self, timeout: Duration) -> Result<Value> {
        // Read while the receiver writes: a report longer than the pipe's
        // buffer (64 KiB: a thousand outages and more) would otherwise keep
        // it from exiting.
        let reader = self.stdout.take().map(|mut stdout| {
            std::thread::spawn(move || {
                let mut out = String::new();
                stdout.read_to_string(&mut out).map(|_| out)
            })
        });
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = terminate(&mut self.child, Duration::from_secs(3));
        let out = match reader.map(std::thread::JoinHandle::join) {
            Some(Ok(read)) => read.map_err(io_err("reading the probe report"))?,
            Some(Err(_)) => {
                return Err(LabError::Other("the probe report's reader panicked".into()))
            }
            None => String::new(),
        };
        serde_json::from_str(out.trim())
            .map_err(|e| LabError::Other(format!("bad probe report ({status:?}): {e}: {out:?}")))
    }
}

impl Drop for ProbeReceiver {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(1));
    }
}

/// A running traffic sender (`crosslink probe send` in the client namespace).
pub struct ProbeSender {
    child: Child,
}

impl ProbeSender {
    /// Stops the stream now (the sender then sends its stop packets) and returns its
    /// own report.
    pub fn stop(mut self) -> Result<Value> {
        terminate(&mut self.child, Duration::from_secs(3));
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout
                .read_to_string(&mut out)
                .map_err(io_err("reading the sender report"))?;
        }
        serde_json::from_str(out.trim())
            .map_err(|e| LabError::Other(format!("bad sender report: {e}: {out:?}")))
    }
}

impl Drop for ProbeSender {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(1));
    }
}

/// A running iperf3 transfer, client -> server through the tunnel.
pub struct Iperf {
    client: Option<Child>,
    server: Child,
}

impl Iperf {
    /// Waits for the client to finish; returns the received rate (bit/s).
    pub fn finish(self) -> Option<f64> {
        self.finish_intervals().map(|(total, _)| total)
    }

    /// Waits for the client to finish; returns the received rate (bit/s)
    /// and the sending rate of each reporting interval (one second unless
    /// asked otherwise).
    pub fn finish_intervals(mut self) -> Option<(f64, Vec<f64>)> {
        let out = self.client.take()?.wait_with_output().ok()?;
        iperf_report(&out.stdout)
    }
}

/// What an `iperf3 -J` client printed: the received rate (bit/s) and the
/// sending rate of each reporting interval.
pub fn iperf_report(json: &[u8]) -> Option<(f64, Vec<f64>)> {
    let v: Value = serde_json::from_slice(json).ok()?;
    let total = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)?;
    let intervals = v
        .get("intervals")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| i.pointer("/sum/bits_per_second").and_then(Value::as_f64))
                .collect()
        })
        .unwrap_or_default();
    Some((total, intervals))
}

impl Drop for Iperf {
    fn drop(&mut self) {
        if let Some(client) = self.client.as_mut() {
            terminate(client, Duration::from_secs(2));
        }
        terminate(&mut self.server, Duration::from_secs(2));
    }
}

/// CPU time (user and system, in clock ticks) of each thread of process
/// `pid` whose name starts with `prefix`, by thread name.
pub fn thread_ticks(pid: u32, prefix: &str) -> Vec<(String, u64)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64)> = tasks
        .flatten()
        .filter_map(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).ok()?;
            let comm = comm.trim().to_string();
            if !comm.starts_with(prefix) {
                return None;
            }
            let stat = fs::read_to_string(t.path().join("stat")).ok()?;
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((comm, ticks))
        })
        .collect();
    out.sort();
    out
}

/// Resident memory of a process (`VmRSS` in /proc/PID/status), in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A counter of /proc/net/snmp's text (`group` `Udp`, `name`
/// `InDatagrams`): each group is a line of names and a line of values.
pub fn snmp_counter(snmp: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}: ");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// A reference for the platform's timer punctuality: one thread pinned to
/// each CPU the process may use, at SCHED_FIFO priority 51 (just above
/// crosslink's BFD thread, so that it measures the host and not the BFD
/// threads it shares the CPU with), sleeping 1 ms at a time and recording
/// how late it wakes. What it sees is what the kernel, the hypervisor and
/// the neighbours allow at best; a BFD timeout during a lateness near the
/// detection time is the host's, not crosslink's. One thread per CPU: a
/// hypervisor that stops one virtual CPU for tens of milliseconds (steal
/// time) stalls the BFD thread running there, which one unpinned thread on
/// the other CPU would not see.
pub struct ReferenceTimer {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    window_us: Arc<AtomicU64>,
    /// Wake-ups later than [`ReferenceTimer::STALL`].
    stalls: Arc<AtomicU64>,
    handles: Vec<JoinHandle<bool>>,
}

impl ReferenceTimer {
    /// A lateness that counts as a stall: two thirds of the 30 ms detection
    /// time of BFD at 10 ms x 3, enough to make a session miss its deadline.
    pub const STALL: Duration = Duration::from_millis(20);

    pub fn start() -> ReferenceTimer {
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let window_us = Arc::new(AtomicU64::new(0));
        let stalls = Arc::new(AtomicU64::new(0));
        let mut cpus: Vec<Option<usize>> = crate::io::sys::allowed_cpus()
            .into_iter()
            .map(Some)
            .collect();
        if cpus.is_empty() {
            cpus.push(None);
        }
        let handles = cpus
            .into_iter()
            .map(|cpu| {
                let (s, w, win) = (stop.clone(), worst_us.clone(), window_us.clone());
                let st = stalls.clone();
                std::thread::spawn(move || {
                    let pinned = cpu.is_none_or(|c| crate::io::sys::pin_to_cpu(c).is_ok());
                    let fifo = crate::io::sys::set_realtime_priority(51).is_ok();
                    let step = Duration::from_millis(1);
                    while !s.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        std::thread::sleep(step);
                        let late = t.elapsed().saturating_sub(step).as_micros() as u64;
                        w.fetch_max(late, Ordering::Relaxed);
                        win.fetch_max(late, Ordering::Relaxed);
                        if late >= Self::STALL.as_micros() as u64 {
                            st.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    fifo && pinned
                })
            })
            .collect();
        ReferenceTimer {
            stop,
            worst_us,
            window_us,
            stalls,
            handles,
        }
    }

    /// Wake-ups so far later than [`ReferenceTimer::STALL`], on any CPU.
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// The worst lateness on any CPU since the last call (or the start).
    pub fn take_window(&self) -> Duration {
        Duration::from_micros(self.window_us.swap(0, Ordering::Relaxed))
    }

    /// Stops the threads: the worst lateness of the whole run on any CPU,
    /// and whether every thread got its CPU and real-time priority.
    pub fn stop(mut self) -> (Duration, bool) {
        self.stop.store(true, Ordering::Relaxed);
        let granted = self
            .handles
            .drain(..)
            .all(|h| h.join().ok().unwrap_or(false));
        (
            Duration::from_micros(self.worst_us.load(Ordering::Relaxed)),
            granted,
        )
    }
}

/// Time the hypervisor gave no CPU to this machine's CPUs (steal, from
/// /proc/stat), each CPU's, in milliseconds since boot; compare two reads.
pub fn steal_ms() -> Vec<u64> {
    // USER_HZ, the unit of /proc/stat, is 100 on Linux.
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .filter_map(|l| l.split_whitespace().nth(8)?.parse::<u64>().ok())
        .map(|ticks| ticks * 10)
        .collect()
}

impl Drop for ReferenceTimer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Lab {
    /// Starts `crosslink probe recv` on the server on `port` and waits until it listens.
    pub fn start_receiver(&self, port: u16, max_duration: Duration) -> Result<ProbeReceiver> {
        self.start_receiver_at(
            Host::Server,
            SocketAddr::from((SERVER_ADDR, port)),
            max_duration,
        )
    }

    /// Starts `crosslink probe recv` in `host` on `bind` and waits until it listens.
    pub fn start_receiver_at(
        &self,
        host: Host,
        bind: SocketAddr,
        max_duration: Duration,
    ) -> Result<ProbeReceiver> {
        let mut cmd = self.command_in(host, &self.opts.binary);
        cmd.args(["probe", "recv", "--bind"])
            .arg(bind.to_string())
            .arg("--duration")
            .arg(format!("{}ms", max_duration.as_millis()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(io_err("starting probe recv"))?;
        let stdout = child.stdout.take();
        let mut receiver = ProbeReceiver { child, stdout };
        let Some(stderr) = receiver.child.stderr.take() else {
            return Err(LabError::Other("probe recv: no stderr pipe".into()));
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            let mut told = false;
            for line in lines.by_ref().map_while(|l| l.ok()) {
                if !told && line.starts_with("ready") {
                    told = true;
                    let _ = tx.send(Ok(()));
                } else if !told {
                    let _ = tx.send(Err(line));
                    told = true;
                } else {
                    eprintln!("probe recv: {line}");
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(receiver),
            Ok(Err(line)) => Err(LabError::Other(format!("probe recv failed: {line}"))),
            Err(_) => Err(LabError::Timeout {
                what: "probe recv to listen".into(),
                after: Duration::from_secs(5),
            }),
        }
    }

    /// Starts `crosslink probe send` on the client towards the server's `port`.
    pub fn start_sender(
        &self,
        port: u16,
        rate: u32,
        max_duration: Duration,
    ) -> Result<ProbeSender> {
        let to = SocketAddr::from((SERVER_ADDR, port));
        self.start_sender_from(Host::Client, to, rate, max_duration)
    }

    /// Starts `crosslink probe send` in `host` towards `to`.
    pub fn start_sender_from(
        &self,
        host: Host,
        to: SocketAddr,
        rate: u32,
        max_duration: Duration,
    ) -> Result<ProbeSender> {
        let mut cmd = self.command_in(host, &self.opts.binary);
        cmd.args(["probe", "send", "--to"])
            .arg(to.to_string())
            .arg("--rate")
            .arg(rate.to_string())
            .arg("--duration")
            .arg(format!("{}ms", max_duration.as_millis()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(io_err("starting probe send"))?;
        Ok(ProbeSender { child })
    }

    /// Starts `iperf3 -s` on the server and `iperf3 -c -P parallel -t secs
    /// -J` on the client (TCP, as fast as it goes).
    pub fn start_iperf3(&self, parallel: u32, secs: u64) -> Result<Iperf> {
        self.start_iperf3_with(parallel, secs, &[])
    }

    /// [`Self::start_iperf3`] with more client arguments (`-u -b 300M`: a
    /// UDP stream at 300 Mbit/s).
    pub fn start_iperf3_with(&self, parallel: u32, secs: u64, extra: &[&str]) -> Result<Iperf> {
        let mut server = self.command_in(Host::Server, "iperf3");
        server
            .args(["-s", "-1", "-p", "5201", "-B", &SERVER_ADDR.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut server, 0);
        let server = server.spawn().map_err(io_err("starting iperf3 -s"))?;
        std::thread::sleep(Duration::from_millis(500));
        let mut client = self.command_in(Host::Client, "iperf3");
        client
            .args(["-c", &SERVER_ADDR.to_string(), "-p", "5201", "-J"])
            .args(["-P", &parallel.to_string(), "-t", &secs.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut client, 0);
        let client = client.spawn().map_err(io_err("starting iperf3 -c"))?;
        Ok(Iperf {
            client: Some(client),
            server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_counter_reads_a_group_s_value_by_name() {
        let snmp = "Icmp: InMsgs InErrors InEchos\nIcmp: 7 0 5\n\
                    Udp: InDatagrams NoPorts\nUdp: 1234 2\n";
        assert_eq!(snmp_counter(snmp, "Udp", "InDatagrams"), Some(1234));
        assert_eq!(snmp_counter(snmp, "Icmp", "InEchos"), Some(5));
        assert_eq!(snmp_counter(snmp, "Udp", "InEchos"), None);
        assert_eq!(snmp_counter(snmp, "Tcp", "InSegs"), None);
    }
}
