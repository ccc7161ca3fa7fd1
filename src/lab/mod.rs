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
//! (`numgen random`), [`Lab::drop_larger_than`] only the packets above a size (an
//! MTU black hole, nftables `ip length`), [`Lab::delay`] holds one direction's
//! packets for a delay with optional jitter, in order, changeable at run time (a
//! latency step): the kernel has no netem, so an iptables rule queues them
//! (NFQUEUE) to `crosslink relay` ([`relay`]) in gateway A's namespace, which
//! holds each verdict until the packet's release time. [`Lab::heal`] removes all
//! of these; [`Lab::link_down`] sets the veth down; [`Lab::kill_gateway`],
//! [`Lab::reload_gateway`] and [`Lab::write_config`] act on the daemons. Helpers for
//! the benches: [`Lab::start_iperf3`], [`vm_rss_kib`], [`ReferenceTimer`]. [`Drop`] stops the gateways, kills whatever still runs in the
//! namespaces, deletes them and the temp dir; [`Lab::new`] also removes namespaces left
//! by a crashed run (same name, or an `xl-*` name whose process is gone).
//!
//! Test support only: the daemon never depends on it (`tests/architecture.rs`
//! checks). Its rooms: `topology` (hosts, namespaces, links, the gateways'
//! configs), `impair` (faults on a path), `process` (commands in a
//! namespace, the gateways' daemons, the root and tool gates of the tests),
//! `traffic` (probe, iperf3, bench readings), `frr` (FRRouting daemons in a
//! namespace, for the redundant-gateway tests); beside them the programs the
//! tests and the demo run: [`probe`] (the packet-loss probe), [`flood`] (the
//! junk generator of the bad-input tests), [`relay`] (the delaying relay) and
//! [`demo`] (`crosslink demo`). The delay and the large-packet drop act in
//! netfilter, which the fast path's BPF programs pass by: a fast-path lab
//! refuses them.

pub mod demo;
pub mod flood;
pub mod probe;
pub mod relay;

use crate::config::Policy;
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

mod frr;
mod impair;
mod process;
mod topology;
mod traffic;

pub use frr::*;
pub use process::*;
pub use topology::*;
pub use traffic::*;

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

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Short tag in the namespace names (`xl-<tag>-<pid>-a`); keeps parallel labs apart.
    pub tag: String,
    /// The crosslink binary (gateways, `status`, and the traffic probe).
    pub binary: PathBuf,
    /// gw-b's binary when it is another build than `binary`: two builds
    /// compared side by side in one run, under the same host conditions.
    pub binary_b: Option<PathBuf>,
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
    /// Key pairs and a handshake: each gateway gets a private key file
    /// (`<dir>/<gw>.private`) and the other's public key; a `key` is then
    /// mixed in as the pre-shared key.
    pub key_pairs: bool,
    /// Extra environment for the gateway processes (for example
    /// `CROSSLINK_UDP_GSO=0`).
    pub gateway_env: Vec<(String, String)>,
    /// Extra environment for one gateway only, after `gateway_env`.
    pub one_gateway_env: Vec<(Gw, String, String)>,
    /// `fast_path = true` on both gateways' peer ([`crate::io::fastpath`]).
    pub fast_path: bool,
    /// `offload = true` in both gateways' `[bfd]` (the BFD receive offload,
    /// [`crate::io::bfd_offload`]).
    pub bfd_offload: bool,
    /// `[peer.sla]` keys for both gateways' peer (TOML lines, e.g.
    /// `hold = "3s"`); empty: the defaults.
    pub sla: Vec<String>,
    /// Both gateways' peer policy (default `active-backup`).
    pub policy: Policy,
    /// Extra keys for both gateways' peer (TOML lines, e.g.
    /// `reorder_wait = "30ms"`).
    pub peer_extra: Vec<String>,
    /// Extra keys for one path on both gateways (e.g. `rate = "300Mbit/s"`).
    pub path_extra: Vec<(LabPath, String)>,
}

impl LabOptions {
    /// A crosslink lab with BFD 10 ms × 3 and revert_hold 2 s.
    pub fn new(tag: &str, binary: impl Into<PathBuf>) -> Self {
        LabOptions {
            tag: tag.to_string(),
            binary: binary.into(),
            binary_b: None,
            kernel_only: false,
            tx_interval: Duration::from_millis(10),
            rx_interval: Duration::from_millis(10),
            multiplier: 3,
            revert_hold: Duration::from_secs(2),
            bind_interfaces: false,
            key: None,
            key_pairs: false,
            gateway_env: Vec::new(),
            one_gateway_env: Vec::new(),
            fast_path: false,
            bfd_offload: false,
            sla: Vec::new(),
            policy: Policy::ActiveBackup,
            peer_extra: Vec::new(),
            path_extra: Vec::new(),
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

/// The lab. See the module docs.
pub struct Lab {
    opts: LabOptions,
    pid: u32,
    dir: PathBuf,
    namespaces: Vec<String>,
    gateways: Vec<(Gw, Child)>,
    /// The delaying relays ([`Lab::delay`]); behind a lock so that the
    /// faults keep taking `&self`.
    relays: std::sync::Mutex<Vec<relay::RelayProc>>,
    keep_dir: bool,
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
        self.stop_relays();
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
            relays: std::sync::Mutex::new(Vec::new()),
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

    /// Replaces the lines added to the paths' sections of both gateways'
    /// configs, and has the running gateways reload them.
    pub fn set_path_extra(&mut self, extra: Vec<(LabPath, String)>) -> Result<()> {
        self.opts.path_extra = extra;
        for gw in Gw::ALL {
            self.write_config(gw, &self.config_text(gw))?;
            self.reload_gateway(gw)?;
        }
        Ok(())
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
}
