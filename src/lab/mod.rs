//! A throwaway lab of network namespaces for the demo and the end-to-end tests.
//!
//! ```text
//!  client ──lan── gw-a ══ path1 (198.18.21.0/30) ══ gw-b ──lan── server
//!  .10.1/24     .10.2 ══ path2 (198.18.22.0/30) ══ .30.1     .30.2/24
//! ```
//!
//! Four namespaces named `xl-<tag>-<pid>-{c,a,b,s}`, addresses from 198.18.0.0/15 only,
//! nothing in the root namespace. Gateway A runs crosslink with peer "b" (TUN `xl-b`,
//! route 198.18.30.0/24), gateway B with peer "a" (TUN `xl-a`, route 198.18.10.0/24);
//! path1 has priority 1, path2 priority 2. In kernel-only mode the gateways route to
//! each other over path1 with plain kernel routes (to check the lab and the probe
//! without the daemon).
//!
//! Faults are injected on gateway A: [`Lab::blackhole`] drops every IP packet in and
//! out of a path's veth with nftables (the carrier stays up), [`Lab::drop_one_way`]
//! only one direction, [`Lab::random_loss`] a share of each direction at random
//! (`numgen random`), [`Lab::link_down`] sets the veth down; [`Lab::kill_gateway`],
//! [`Lab::reload_gateway`] and [`Lab::write_config`] act on the daemons. Helpers for
//! the benches: [`Lab::start_iperf3`], [`vm_rss_kib`], [`ReferenceTimer`]. [`Drop`] stops the gateways, kills whatever still runs in the
//! namespaces, deletes them and the temp dir; [`Lab::new`] also removes namespaces left
//! by a crashed run (same name, or an `xl-*` name whose process is gone).

pub mod demo;
pub mod flood;
pub mod probe;

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub type Result<T, E = LabError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{tool}` not found in PATH: install the `{package}` package")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("gateway {gw} exited ({status}); last log lines:\n{log}")]
    GatewayExited { gw: Gw, status: String, log: String },
    #[error("{0}")]
    Other(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// A gateway of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gw {
    A,
    B,
}

impl Gw {
    pub const ALL: [Gw; 2] = [Gw::A, Gw::B];

    pub fn name(self) -> &'static str {
        match self {
            Gw::A => "gw-a",
            Gw::B => "gw-b",
        }
    }

    pub fn host(self) -> Host {
        match self {
            Gw::A => Host::GwA,
            Gw::B => Host::GwB,
        }
    }

    /// The gateway at the other end of the paths.
    pub fn other(self) -> Gw {
        match self {
            Gw::A => Gw::B,
            Gw::B => Gw::A,
        }
    }

    /// The gateway's tunnel address and the far LAN routed into the tunnel
    /// (crosslink's TUN in the lab configs; the other tunnels of the
    /// throughput bench use the same).
    pub fn tunnel(self) -> (&'static str, &'static str) {
        match self {
            Gw::A => ("198.18.99.1/30", "198.18.30.0/24"),
            Gw::B => ("198.18.99.2/30", "198.18.10.0/24"),
        }
    }
}

impl fmt::Display for Gw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One of the two underlay paths between the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabPath {
    Path1,
    Path2,
}

impl LabPath {
    pub const ALL: [LabPath; 2] = [LabPath::Path1, LabPath::Path2];

    /// The path's name in the configs and status, which is also its veth's name.
    pub fn name(self) -> &'static str {
        match self {
            LabPath::Path1 => "path1",
            LabPath::Path2 => "path2",
        }
    }

    fn subnet_octet(self) -> u8 {
        match self {
            LabPath::Path1 => 21,
            LabPath::Path2 => 22,
        }
    }

    /// The path's underlay address on a gateway.
    pub fn addr(self, gw: Gw) -> Ipv4Addr {
        let host = match gw {
            Gw::A => 1,
            Gw::B => 2,
        };
        Ipv4Addr::new(198, 18, self.subnet_octet(), host)
    }

    fn priority(self) -> u32 {
        match self {
            LabPath::Path1 => 1,
            LabPath::Path2 => 2,
        }
    }
}

impl fmt::Display for LabPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A direction of travel on a path, for one-way faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From gateway A to gateway B.
    AToB,
    /// From gateway B to gateway A.
    BToA,
}

/// A namespace of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Client,
    GwA,
    GwB,
    Server,
}

impl Host {
    pub const ALL: [Host; 4] = [Host::Client, Host::GwA, Host::GwB, Host::Server];

    fn suffix(self) -> &'static str {
        match self {
            Host::Client => "c",
            Host::GwA => "a",
            Host::GwB => "b",
            Host::Server => "s",
        }
    }
}

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
pub const GW_A_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
pub const GW_B_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 1);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 2);
/// The UDP port crosslink's data plane uses on every path.
pub const DATA_PORT: u16 = 4800;

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Short tag in the namespace names (`xl-<tag>-<pid>-a`); keeps parallel labs apart.
    pub tag: String,
    /// The crosslink binary (gateways, `status`, and the traffic probe).
    pub binary: PathBuf,
    /// Route gw-a -> gw-b over path1 in the kernel instead of running crosslink.
    pub kernel_only: bool,
    pub tx_interval: Duration,
    pub rx_interval: Duration,
    pub multiplier: u8,
    pub revert_hold: Duration,
    /// Put `interface = "pathN"` on every path (carrier-loss detection).
    pub bind_interfaces: bool,
    /// Seal the data plane with this pre-shared key (the key file's text,
    /// see [`crate::core::crypto::Key::parse`]), written to `<dir>/peer.key`.
    pub key: Option<String>,
    /// Extra environment for the gateway processes (for example
    /// `CROSSLINK_UDP_GSO=0`).
    pub gateway_env: Vec<(String, String)>,
    /// Extra environment for one gateway only, after `gateway_env`.
    pub one_gateway_env: Vec<(Gw, String, String)>,
    /// `fast_path = true` on both gateways' peer ([`crate::io::fastpath`]).
    pub fast_path: bool,
}

impl LabOptions {
    /// A crosslink lab with BFD 10 ms × 3 and revert_hold 2 s.
    pub fn new(tag: &str, binary: impl Into<PathBuf>) -> Self {
        LabOptions {
            tag: tag.to_string(),
            binary: binary.into(),
            kernel_only: false,
            tx_interval: Duration::from_millis(10),
            rx_interval: Duration::from_millis(10),
            multiplier: 3,
            revert_hold: Duration::from_secs(2),
            bind_interfaces: false,
            key: None,
            gateway_env: Vec::new(),
            one_gateway_env: Vec::new(),
            fast_path: false,
        }
    }

    /// A lab routed by the kernel over path1, without crosslink.
    pub fn kernel_only(tag: &str, binary: impl Into<PathBuf>) -> Self {
        LabOptions {
            kernel_only: true,
            ..Self::new(tag, binary)
        }
    }
}

/// Formats a duration the way the config wants it ("10ms", "2s", "1500us").
pub fn config_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us % 1_000_000 == 0 {
        format!("{}s", us / 1_000_000)
    } else if us % 1000 == 0 {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

/// Checks that `ip` and `nft` are installed.
pub fn check_tools() -> Result<()> {
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if find_in_path(tool).is_none() {
            return Err(LabError::MissingTool { tool, package });
        }
    }
    Ok(())
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
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

fn skip_or_fail(test: &str, why: String) -> bool {
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

fn ip(args: &[&str]) -> Result<String> {
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

/// Kills every process in a namespace and deletes it; missing namespaces are fine.
fn remove_netns(name: &str) {
    if !Path::new("/run/netns").join(name).exists() {
        return;
    }
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            signal_pid(pid, "KILL");
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Deletes `xl-<tag>-<pid>-<role>` namespaces whose process no longer exists.
fn sweep_stale_namespaces() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("xl-") {
            continue;
        }
        let mut parts = name.rsplitn(3, '-');
        let (_role, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            remove_netns(&name);
        }
    }
}

/// A running traffic receiver (`crosslink probe recv` in the server namespace).
pub struct ProbeReceiver {
    child: Child,
    stdout: Option<ChildStdout>,
}

impl ProbeReceiver {
    /// Waits for the report (the sender's stop packet ends the receiver); after
    /// `timeout` it is told to stop with SIGTERM.
    pub fn finish(mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = terminate(&mut self.child, Duration::from_secs(3));
        let mut out = String::new();
        if let Some(mut stdout) = self.stdout.take() {
            stdout
                .read_to_string(&mut out)
                .map_err(io_err("reading the probe report"))?;
        }
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
        let status = crate::telemetry::control::request_status(&self.socket)
            .map_err(io_err(format!("status of {}", self.socket.display())))?;
        serde_json::to_value(status)
            .map_err(|e| LabError::Other(format!("cannot encode status: {e}")))
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

/// The lab. See the module docs.
pub struct Lab {
    opts: LabOptions,
    pid: u32,
    dir: PathBuf,
    namespaces: Vec<String>,
    gateways: Vec<(Gw, Child)>,
    keep_dir: bool,
}

impl Lab {
    /// Builds the namespaces, links and addresses (and writes the gateway configs);
    /// gateways are started by [`Lab::start_gateways`].
    pub fn new(opts: LabOptions) -> Result<Lab> {
        if !is_root() {
            return Err(LabError::Other(
                "the lab needs root (network namespaces)".into(),
            ));
        }
        check_tools()?;
        if opts.tag.is_empty() || !opts.tag.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(LabError::Other(format!(
                "lab tag {:?} must be short and alphanumeric",
                opts.tag
            )));
        }
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("xl-{}-{pid}", opts.tag));
        let mut lab = Lab {
            opts,
            pid,
            dir,
            namespaces: Vec::new(),
            gateways: Vec::new(),
            keep_dir: std::env::var_os("CROSSLINK_LAB_KEEP").is_some(),
        };
        sweep_stale_namespaces();
        // A leftover with our own name (a crashed earlier run with a recycled pid).
        for host in Host::ALL {
            remove_netns(&lab.ns(host));
        }
        let _ = fs::remove_dir_all(&lab.dir);
        fs::create_dir_all(&lab.dir).map_err(io_err(format!("creating {}", lab.dir.display())))?;
        lab.build()?;
        if !lab.opts.kernel_only {
            lab.write_configs()?;
        }
        Ok(lab)
    }

    pub fn options(&self) -> &LabOptions {
        &self.opts
    }

    /// The namespace name of a host.
    pub fn ns(&self, host: Host) -> String {
        format!("xl-{}-{}-{}", self.opts.tag, self.pid, host.suffix())
    }

    /// The lab's temp dir (configs, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self, gw: Gw) -> PathBuf {
        self.dir.join(format!("{}.toml", gw.name()))
    }

    pub fn socket_path(&self, gw: Gw) -> PathBuf {
        self.dir.join(format!("{}.sock", gw.name()))
    }

    pub fn log_path(&self, gw: Gw) -> PathBuf {
        self.dir.join(format!("{}.log", gw.name()))
    }

    /// `ip netns exec <ns> <program>`.
    pub fn command_in(&self, host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).arg(program);
        cmd
    }

    /// `ip -n <ns> ARGS` in a host's namespace.
    pub fn ip_in(&self, host: Host, args: &[&str]) -> Result<String> {
        let ns = self.ns(host);
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `sh -c SCRIPT` in a host's namespace.
    pub fn sh_in(&self, host: Host, script: &str) -> Result<String> {
        run(self.command_in(host, "sh").args(["-c", script]))
    }

    fn build(&mut self) -> Result<()> {
        for host in Host::ALL {
            let ns = self.ns(host);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns);
            // Forwarding on, reverse-path filtering off (also for the TUN made later).
            self.sh_in(
                host,
                "echo 1 > /proc/sys/net/ipv4/ip_forward; \
                 echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; \
                 echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter; \
                 echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null; \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null; true",
            )?;
            self.ip_in(host, &["link", "set", "lo", "up"])?;
        }
        let (a, b) = (self.ns(Host::GwA), self.ns(Host::GwB));
        // veth pairs are created straight inside the namespaces: nothing in the root one.
        self.ip_in(
            Host::Client,
            &[
                "link", "add", "lan", "type", "veth", "peer", "name", "lan", "netns", &a,
            ],
        )?;
        for path in LabPath::ALL {
            let name = path.name();
            self.ip_in(
                Host::GwA,
                &[
                    "link", "add", name, "type", "veth", "peer", "name", name, "netns", &b,
                ],
            )?;
        }
        self.ip_in(
            Host::Server,
            &[
                "link", "add", "lan", "type", "veth", "peer", "name", "lan", "netns", &b,
            ],
        )?;
        let addrs: [(Host, &str, String); 8] = [
            (Host::Client, "lan", format!("{CLIENT_ADDR}/24")),
            (Host::GwA, "lan", format!("{GW_A_LAN_ADDR}/24")),
            (
                Host::GwA,
                "path1",
                format!("{}/30", LabPath::Path1.addr(Gw::A)),
            ),
            (
                Host::GwA,
                "path2",
                format!("{}/30", LabPath::Path2.addr(Gw::A)),
            ),
            (
                Host::GwB,
                "path1",
                format!("{}/30", LabPath::Path1.addr(Gw::B)),
            ),
            (
                Host::GwB,
                "path2",
                format!("{}/30", LabPath::Path2.addr(Gw::B)),
            ),
            (Host::GwB, "lan", format!("{GW_B_LAN_ADDR}/24")),
            (Host::Server, "lan", format!("{SERVER_ADDR}/24")),
        ];
        for (host, dev, addr) in &addrs {
            self.ip_in(*host, &["addr", "add", addr, "dev", dev])?;
            self.ip_in(*host, &["link", "set", dev, "up"])?;
        }
        self.sh_in(
            Host::GwA,
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
        )?;
        self.sh_in(
            Host::GwB,
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
        )?;
        self.ip_in(
            Host::Client,
            &["route", "add", "default", "via", &GW_A_LAN_ADDR.to_string()],
        )?;
        self.ip_in(
            Host::Server,
            &["route", "add", "default", "via", &GW_B_LAN_ADDR.to_string()],
        )?;
        if self.opts.kernel_only {
            let p = LabPath::Path1;
            self.ip_in(
                Host::GwA,
                &[
                    "route",
                    "add",
                    "198.18.30.0/24",
                    "via",
                    &p.addr(Gw::B).to_string(),
                ],
            )?;
            self.ip_in(
                Host::GwB,
                &[
                    "route",
                    "add",
                    "198.18.10.0/24",
                    "via",
                    &p.addr(Gw::A).to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// The config file of a gateway.
    pub fn config_text(&self, gw: Gw) -> String {
        let o = &self.opts;
        let (peer, tun) = match gw {
            Gw::A => ("b", "xl-b"),
            Gw::B => ("a", "xl-a"),
        };
        let (tun_addr, route) = gw.tunnel();
        let other = gw.other();
        let mut text = format!(
            "# crosslink lab: {gw} (written by crosslink::lab)\n\
             [gateway]\nname = \"{gw}\"\ncontrol_socket = \"{sock}\"\n\n\
             [bfd]\ntx_interval = \"{tx}\"\nrx_interval = \"{rx}\"\nmultiplier = {mult}\n\n\
             [[peer]]\nname = \"{peer}\"\ntun = \"{tun}\"\ntun_addresses = [\"{tun_addr}\"]\n\
             routes = [\"{route}\"]\npolicy = \"active-backup\"\nrevert_hold = \"{hold}\"\n{key}{fast}",
            sock = self.socket_path(gw).display(),
            fast = if o.fast_path { "fast_path = true\n" } else { "" },
            key = match &o.key {
                Some(_) => format!("key_file = \"{}\"\n", self.key_path().display()),
                None => String::new(),
            },
            tx = config_duration(o.tx_interval),
            rx = config_duration(o.rx_interval),
            mult = o.multiplier,
            hold = config_duration(o.revert_hold),
        );
        for path in LabPath::ALL {
            text.push_str(&format!(
                "\n  [[peer.path]]\n  name = \"{name}\"\n  local = \"{local}:{DATA_PORT}\"\n  \
                 remote = \"{remote}:{DATA_PORT}\"\n  priority = {prio}\n",
                name = path.name(),
                local = path.addr(gw),
                remote = path.addr(other),
                prio = path.priority(),
            ));
            if o.bind_interfaces {
                text.push_str(&format!("  interface = \"{}\"\n", path.name()));
            }
        }
        text
    }

    /// Where the lab's key file is (when [`LabOptions::key`] is set).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("peer.key")
    }

    fn write_configs(&self) -> Result<()> {
        if let Some(key) = &self.opts.key {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let path = self.key_path();
            let _ = fs::remove_file(&path);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(key.as_bytes()))
                .map_err(io_err(format!("writing {}", path.display())))?;
        }
        for gw in Gw::ALL {
            let path = self.config_path(gw);
            fs::write(&path, self.config_text(gw))
                .map_err(io_err(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

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
        let mut cmd = self.command_in(gw.host(), &self.opts.binary);
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
        let child = cmd.spawn().map_err(io_err(format!(
            "starting {gw} ({})",
            self.opts.binary.display()
        )))?;
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

    /// The same document straight from the control socket; for tight polling loops.
    pub fn poll(&self, gw: Gw) -> Result<Value> {
        self.status_client(gw).poll()
    }

    /// Polls both gateways' status until `done` holds for both, or fails after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
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
            std::thread::sleep(Duration::from_millis(10));
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

    fn nft_table(path: LabPath) -> String {
        format!("xl_lab_{}", path.name())
    }

    /// Drops every IP packet in and out of `path`'s veth on gateway A (nftables); the
    /// link keeps its carrier, so only BFD can notice.
    pub fn blackhole(&self, path: LabPath) -> Result<()> {
        self.impair(path, &[Direction::AToB, Direction::BToA], "drop")
    }

    /// Drops the packets of `path` going one way only (filtered on gateway A); [`Lab::heal`]
    /// removes it.
    pub fn drop_one_way(&self, path: LabPath, direction: Direction) -> Result<()> {
        self.impair(path, &[direction], "drop")
    }

    /// Drops `percent` % of `path`'s packets at random in each direction (nftables
    /// `numgen random`); [`Lab::heal`] removes it.
    pub fn random_loss(&self, path: LabPath, percent: u8) -> Result<()> {
        let verdict = format!("numgen random mod 100 < {percent} drop");
        self.impair(path, &[Direction::AToB, Direction::BToA], &verdict)
    }

    /// Replaces `path`'s impairment table on gateway A with one applying `verdict` (an
    /// nftables statement) to the packets of the given directions.
    ///
    /// With the fast path, whose BPF programs send and receive beside the
    /// netfilter hooks, the packets are dropped where the wire would lose
    /// them instead: a root queue of length 0 on the sending gateway's path
    /// device, which every packet leaving it passes (a drop only: other
    /// verdicts are refused).
    fn impair(&self, path: LabPath, directions: &[Direction], verdict: &str) -> Result<()> {
        self.heal(path)?;
        let dev = path.name();
        let table = Self::nft_table(path);
        if self.opts.fast_path {
            if verdict != "drop" {
                return Err(LabError::Other(format!(
                    "a fast-path lab can only drop all of a path's packets, not \"{verdict}\""
                )));
            }
            // Both directions at once (two processes started together), as
            // a cut does: one after the other, the second would start the
            // far end's detection late and lengthen the outage measured.
            let mut children = Vec::new();
            for d in directions {
                let host = match d {
                    Direction::AToB => Host::GwA,
                    Direction::BToA => Host::GwB,
                };
                let child = self
                    .command_in(host, "tc")
                    .args([
                        "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(io_err("running tc"))?;
                children.push((host, child));
            }
            for (host, child) in children {
                let out = child.wait_with_output().map_err(io_err("running tc"))?;
                if !out.status.success() {
                    return Err(LabError::Command {
                        cmd: format!(
                            "tc qdisc replace dev {dev} root pfifo limit 0 (in {})",
                            self.ns(host)
                        ),
                        status: out.status.to_string(),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    });
                }
            }
            return Ok(());
        }
        let mut script = format!("table inet {table} {{\n");
        for d in directions {
            let (chain, hook, dir) = match d {
                Direction::BToA => ("in", "prerouting", "iifname"),
                Direction::AToB => ("post", "postrouting", "oifname"),
            };
            script.push_str(&format!(
                "chain {chain} {{ type filter hook {hook} priority -300; policy accept; \
                 {dir} \"{dev}\" {verdict}; }}\n"
            ));
        }
        script.push_str("}\n");
        self.nft_script(Host::GwA, &script)
    }

    /// Loads an nftables script (`nft -f -`) in a host's namespace.
    pub fn nft_script(&self, host: Host, script: &str) -> Result<()> {
        let mut child = self
            .command_in(host, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("running nft"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(io_err("writing the nft script"))?;
        }
        let out = child.wait_with_output().map_err(io_err("running nft"))?;
        if !out.status.success() {
            return Err(LabError::Command {
                cmd: format!("nft -f - (in {})", self.ns(host)),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Removes the blackhole (or other impairment) on `path` (no error if there was none).
    pub fn heal(&self, path: LabPath) -> Result<()> {
        let table = Self::nft_table(path);
        if self.opts.fast_path {
            for host in [Host::GwA, Host::GwB] {
                // No error when there is no such queue.
                let _ = run(self.command_in(host, "tc").args([
                    "qdisc",
                    "del",
                    "dev",
                    path.name(),
                    "root",
                ]));
            }
        }
        match run(self
            .command_in(Host::GwA, "nft")
            .args(["delete", "table", "inet", &table]))
        {
            Ok(_) => Ok(()),
            Err(LabError::Command { stderr, .. })
                if stderr.contains("No such file") || stderr.contains("does not exist") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sets `path`'s veth down on gateway A (both ends lose carrier).
    pub fn link_down(&self, path: LabPath) -> Result<()> {
        self.ip_in(Host::GwA, &["link", "set", path.name(), "down"])
            .map(drop)
    }

    pub fn link_up(&self, path: LabPath) -> Result<()> {
        self.ip_in(Host::GwA, &["link", "set", path.name(), "up"])
            .map(drop)
    }

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
}

/// A running iperf3 transfer, client -> server through the tunnel.
pub struct Iperf {
    client: Option<Child>,
    server: Child,
}

impl Iperf {
    /// Waits for the client to finish; returns the received rate (bit/s).
    pub fn finish(mut self) -> Option<f64> {
        let out = self.client.take()?.wait_with_output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        if let Some(client) = self.client.as_mut() {
            terminate(client, Duration::from_secs(2));
        }
        terminate(&mut self.server, Duration::from_secs(2));
    }
}

impl Lab {
    /// Starts `iperf3 -s` on the server and `iperf3 -c -P parallel -t secs
    /// -J` on the client (TCP, as fast as it goes).
    pub fn start_iperf3(&self, parallel: u32, secs: u64) -> Result<Iperf> {
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

/// A reference for the platform's timer punctuality: a thread at SCHED_FIFO
/// priority 50 (like crosslink's BFD thread) sleeping 1 ms at a time and
/// recording how late it wakes. What it sees is what the kernel, the
/// hypervisor and the neighbours allow at best; a BFD timeout during a
/// lateness near the detection time is the host's, not crosslink's.
pub struct ReferenceTimer {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    window_us: Arc<AtomicU64>,
    /// Wake-ups later than [`ReferenceTimer::STALL`].
    stalls: Arc<AtomicU64>,
    handle: Option<JoinHandle<bool>>,
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
        let (s, w, win) = (stop.clone(), worst_us.clone(), window_us.clone());
        let st = stalls.clone();
        let handle = std::thread::spawn(move || {
            let fifo = crate::io::sys::set_realtime_priority(50).is_ok();
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
            fifo
        });
        ReferenceTimer {
            stop,
            worst_us,
            window_us,
            stalls,
            handle: Some(handle),
        }
    }

    /// Wake-ups so far later than [`ReferenceTimer::STALL`].
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// The worst lateness since the last call (or the start).
    pub fn take_window(&self) -> Duration {
        Duration::from_micros(self.window_us.swap(0, Ordering::Relaxed))
    }

    /// Stops the thread: the worst lateness of the whole run, and whether
    /// real-time priority was granted.
    pub fn stop(mut self) -> (Duration, bool) {
        self.stop.store(true, Ordering::Relaxed);
        let fifo = self
            .handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or(false);
        (
            Duration::from_micros(self.worst_us.load(Ordering::Relaxed)),
            fifo,
        )
    }
}

impl Drop for ReferenceTimer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (gw, mut child) in std::mem::take(&mut self.gateways) {
            let status = terminate(&mut child, Duration::from_secs(3));
            if panicking {
                eprintln!(
                    "---- {gw} exited: {status:?}; last log lines:\n{}",
                    self.log_tail(gw, 40)
                );
            }
        }
        for ns in std::mem::take(&mut self.namespaces).iter().rev() {
            remove_netns(ns);
        }
        if self.keep_dir {
            eprintln!("lab: kept {} (CROSSLINK_LAB_KEEP)", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
