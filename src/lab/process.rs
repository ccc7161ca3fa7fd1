//! Running things in the lab: commands in a namespace, the gateways'
//! daemons (start, stop, kill, reload, their logs and status), and the gates
//! that skip a test without root or a tool (or fail it where
//! `CROSSLINK_NETNS_REQUIRED=1`).

use super::*;

/// Checks that `ip` and `nft` are installed.
pub fn check_tools() -> Result<()> {
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if find_in_path(tool).is_none() {
            return Err(LabError::MissingTool { tool, package });
        }
    }
    Ok(())
}

pub(super) fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The effective user id, from /proc (no unsafe libc call).
pub fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

pub fn is_root() -> bool {
    effective_uid() == Some(0)
}

/// Whether root-only tests must run here (`CROSSLINK_NETNS_REQUIRED=1`, set
/// by `.ci/run`): then a missing privilege or tool fails the test instead of
/// skipping it.
pub fn netns_required() -> bool {
    std::env::var("CROSSLINK_NETNS_REQUIRED").as_deref() == Ok("1")
}

/// Prints past the test harness's output capture, so the line shows in every run.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether `tool` (a name looked up in PATH, /usr/sbin and /sbin, or a path) exists.
pub fn tool_installed(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).is_file();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(tool).is_file())
}

/// The gate of every root-only test: true when `test` can run (root, and
/// every `(tool, Debian package)` installed). Otherwise it says why and
/// returns false, or panics when [`netns_required`].
pub fn test_gate(test: &str, tools: &[(&str, &str)]) -> bool {
    if !is_root() {
        return skip_or_fail(test, "needs root for network namespaces".to_string());
    }
    tool_gate(test, tools)
}

/// Like [`test_gate`] for tests that need tools but not root.
pub fn tool_gate(test: &str, tools: &[(&str, &str)]) -> bool {
    match tools.iter().find(|(tool, _)| !tool_installed(tool)) {
        None => true,
        Some((tool, package)) => {
            skip_or_fail(test, format!("needs {tool} (Debian package {package})"))
        }
    }
}

pub(super) fn skip_or_fail(test: &str, why: String) -> bool {
    assert!(
        !netns_required(),
        "{test}: {why}, and CROSSLINK_NETNS_REQUIRED=1 makes this a failure"
    );
    say(&format!(
        "SKIPPED {test}: {why} (set CROSSLINK_NETNS_REQUIRED=1 to make this a failure)"
    ));
    false
}

/// Runs a command, returning its stdout; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("cannot run `{shown}`")))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Sends a signal with the shell's `kill` builtin (no unsafe `libc::kill`).
pub fn signal_pid(pid: u32, signal: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            "kill -s \"$1\" \"$2\" 2>/dev/null",
            "sh",
            signal,
            &pid.to_string(),
        ])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`. Returns its exit status.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal_pid(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Asks a gateway for its status over the control socket; `Clone + Send`, so a
/// poller thread can use it while the lab is used elsewhere.
#[derive(Debug, Clone)]
pub struct StatusClient {
    binary: PathBuf,
    socket: PathBuf,
}

impl StatusClient {
    /// Asks over the control socket directly (no process spawned): cheap enough to
    /// poll every few milliseconds.
    pub fn poll(&self) -> Result<Value> {
        status_at(&self.socket)
    }

    /// Runs `crosslink status -s SOCKET`: the human table.
    pub fn table(&self) -> Result<String> {
        run(Command::new(&self.binary)
            .arg("status")
            .arg("-s")
            .arg(&self.socket))
    }

    /// Runs `crosslink status -s SOCKET --json`, the command users and scripts run.
    pub fn status(&self) -> Result<Value> {
        let out = run(Command::new(&self.binary)
            .arg("status")
            .arg("-s")
            .arg(&self.socket)
            .arg("--json"))?;
        serde_json::from_str(&out)
            .map_err(|e| LabError::Other(format!("bad status JSON: {e}: {out:?}")))
    }
}

/// The status JSON of one path of a gateway's (only) peer.
pub fn path_status(status: &Value, path: LabPath) -> Option<&Value> {
    status
        .get("peers")?
        .get(0)?
        .get("paths")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(path.name()))
}

/// `state` of a path ("up", "down", "init", "admin_down"), if present.
pub fn path_state(status: &Value, path: LabPath) -> Option<String> {
    path_status(status, path)?
        .get("state")?
        .as_str()
        .map(str::to_string)
}

pub fn path_active(status: &Value, path: LabPath) -> bool {
    path_status(status, path)
        .and_then(|p| p.get("active"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

pub fn path_counter(status: &Value, path: LabPath, field: &str) -> u64 {
    path_status(status, path)
        .and_then(|p| p.get(field))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

impl Lab {
    /// Starts both gateways (`ip netns exec NS crosslink run -c FILE`, stderr and
    /// stdout to `<dir>/gw-x.log`).
    pub fn start_gateways(&mut self) -> Result<()> {
        for gw in Gw::ALL {
            self.start_gateway(gw)?;
        }
        Ok(())
    }

    pub fn start_gateway(&mut self, gw: Gw) -> Result<()> {
        if self.opts.kernel_only {
            return Err(LabError::Other(
                "kernel-only lab: no gateways to start".into(),
            ));
        }
        if self.gateways.iter().any(|(g, _)| *g == gw) {
            return Ok(());
        }
        let log_path = self.log_path(gw);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let _ = writeln!(log, "---- lab: starting {gw}");
        let err_log = log
            .try_clone()
            .map_err(io_err("duplicating the log file"))?;
        let binary = match (gw, &self.opts.binary_b) {
            (Gw::B, Some(b)) => b,
            _ => &self.opts.binary,
        };
        let mut cmd = self.command_in(gw.host(), binary);
        cmd.envs(self.opts.gateway_env.iter().map(|(k, v)| (k, v)));
        cmd.envs(
            self.opts
                .one_gateway_env
                .iter()
                .filter(|(g, _, _)| *g == gw)
                .map(|(_, k, v)| (k, v)),
        );
        cmd.arg("run")
            .arg("-c")
            .arg(self.config_path(gw))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {gw} ({})", binary.display())))?;
        self.gateways.push((gw, child));
        Ok(())
    }

    /// The process id of a running gateway (`ip netns exec` execs crosslink, so this
    /// is crosslink's own pid), e.g. to read its threads' CPU time in `/proc`.
    pub fn gateway_pid(&self, gw: Gw) -> Option<u32> {
        self.gateways
            .iter()
            .find(|(g, _)| *g == gw)
            .map(|(_, c)| c.id())
    }

    /// Stops a gateway with SIGTERM (SIGKILL after 3 s).
    pub fn stop_gateway(&mut self, gw: Gw) -> Option<ExitStatus> {
        let idx = self.gateways.iter().position(|(g, _)| *g == gw)?;
        let (_, mut child) = self.gateways.remove(idx);
        terminate(&mut child, Duration::from_secs(3))
    }

    /// Kills a gateway with SIGKILL (no clean-up of its own) and reaps it.
    pub fn kill_gateway(&mut self, gw: Gw) -> Option<ExitStatus> {
        let idx = self.gateways.iter().position(|(g, _)| *g == gw)?;
        let (_, mut child) = self.gateways.remove(idx);
        let _ = child.kill();
        child.wait().ok()
    }

    /// Sends SIGHUP to a running gateway: it reloads its config file.
    pub fn reload_gateway(&self, gw: Gw) -> Result<()> {
        match self.gateway_pid(gw) {
            Some(pid) if signal_pid(pid, "HUP") => Ok(()),
            _ => Err(LabError::Other(format!("{gw} is not running"))),
        }
    }

    /// Replaces a gateway's config file (read at the next start or reload).
    pub fn write_config(&self, gw: Gw, text: &str) -> Result<()> {
        let path = self.config_path(gw);
        fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    pub fn stop_gateways(&mut self) {
        for gw in Gw::ALL {
            self.stop_gateway(gw);
        }
    }

    /// Fails if a started gateway has exited.
    pub fn check_gateways(&mut self) -> Result<()> {
        for i in 0..self.gateways.len() {
            let gw = self.gateways[i].0;
            if let Ok(Some(status)) = self.gateways[i].1.try_wait() {
                self.gateways.remove(i);
                return Err(LabError::GatewayExited {
                    gw,
                    status: status.to_string(),
                    log: self.log_tail(gw, 20),
                });
            }
        }
        Ok(())
    }

    /// Packets the TUN of `gw` handed to the lanes (its transmit counter):
    /// with the kernel fast path, what the BPF program did not carry.
    /// `u64::MAX` if it cannot be read.
    pub fn tun_tx_packets(&self, gw: Gw) -> u64 {
        let tun = match gw {
            Gw::A => "xl-b",
            Gw::B => "xl-a",
        };
        let path = format!("/sys/class/net/{tun}/statistics/tx_packets");
        let out = run(self.command_in(gw.host(), "cat").arg(path)).unwrap_or_default();
        out.trim().parse().unwrap_or(u64::MAX)
    }

    /// The last `lines` lines of a gateway's log.
    pub fn log_tail(&self, gw: Gw, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path(gw)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn status_client(&self, gw: Gw) -> StatusClient {
        StatusClient {
            binary: self.opts.binary.clone(),
            socket: self.socket_path(gw),
        }
    }

    /// `crosslink status --json` of a gateway (runs the command).
    pub fn status(&self, gw: Gw) -> Result<Value> {
        self.status_client(gw).status()
    }

    /// The human status table (`crosslink status`).
    pub fn status_table(&self, gw: Gw) -> Result<String> {
        self.status_client(gw).table()
    }

    /// The same document straight from the control socket; for tight polling loops.
    pub fn poll(&self, gw: Gw) -> Result<Value> {
        self.status_client(gw).poll()
    }

    /// Polls both gateways' status until `done` holds for both, or fails after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl FnMut(Gw, &Value) -> bool,
    ) -> Result<()> {
        self.wait_for_every(what, timeout, Duration::from_millis(10), done)
    }

    /// [`wait_for`](Self::wait_for), asking every `pause`: a lab of
    /// hundreds of peers has status documents of megabytes, and asking for
    /// them back to back takes the CPUs the gateways need.
    pub fn wait_for_every(
        &mut self,
        what: &str,
        timeout: Duration,
        pause: Duration,
        mut done: impl FnMut(Gw, &Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_gateways()?;
            let ok = Gw::ALL
                .iter()
                .all(|gw| self.poll(*gw).is_ok_and(|s| done(*gw, &s)));
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                });
            }
            std::thread::sleep(pause);
        }
    }

    /// Waits until both gateways report both paths up and path1 active.
    pub fn wait_paths_up(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for("both paths up on both gateways", timeout, |_, s| {
            LabPath::ALL
                .iter()
                .all(|p| path_state(s, *p).as_deref() == Some("up"))
                && path_active(s, LabPath::Path1)
        })
    }

    /// Waits until every key-pair peer's handshake is established on both
    /// gateways (BFD brings a path up before the first handshake ends, and
    /// a key-pair peer seals nothing until then).
    pub fn wait_handshakes(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for(
            "handshakes established on both gateways",
            timeout,
            |_, s| {
                s["peers"].as_array().is_some_and(|peers| {
                    peers.iter().all(|p| {
                        p.get("handshake")
                            .is_none_or(|h| h.is_null() || h["state"] == "established")
                    })
                })
            },
        )
    }
}

/// A bench knob: the environment variable `name` as a number, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The crosslink binary a bench runs: `CROSSLINK_BIN`, else the release
/// build (`target/release/crosslink`, built now if needed).
pub fn release_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CROSSLINK_BIN") {
        return Ok(p.into());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("crosslink");
    eprintln!("building the release binary (cargo build --release --bin crosslink)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "crosslink"])
        .current_dir(&root)
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() || !bin.is_file() {
        return Err(format!("no release binary at {}", bin.display()));
    }
    Ok(bin)
}

/// The status of the gateway whose control socket is `socket`, asked
/// directly (no process spawned).
pub fn status_at(socket: &Path) -> Result<Value> {
    let status = crate::telemetry::control::request_status(socket)
        .map_err(io_err(format!("status of {}", socket.display())))?;
    serde_json::to_value(status).map_err(|e| LabError::Other(format!("cannot encode status: {e}")))
}

/// The log at `path` once it contains `needle`, or as it is after `within`.
/// The daemon writes its log from a thread of its own, so a line can land a
/// moment after the state change it reports is visible in `status`.
pub fn wait_log(path: &Path, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
