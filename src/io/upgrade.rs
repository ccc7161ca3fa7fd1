//! `crosslink upgrade`: the running daemon hands its TUNs, sockets and
//! state to a new process (a new binary, or the same one with a
//! configuration a reload cannot apply) without a packet lost or a BFD
//! session disturbed.
//!
//! The exchange, on a socket pair between the two processes (one JSON
//! line per message, each with the format's [`VERSION`]):
//!
//! 1. The old process starts the new one (`run` with its own arguments)
//!    with every descriptor it hands over left open across `exec`: each
//!    TUN queue, each path's data and BFD sockets, the BFD receive
//!    sockets, and the listeners of the control socket and the metrics
//!    endpoint. The [`Inheritance`]
//!    message says which descriptor is which. The same open files, not
//!    copies: what is queued in them stays there for the new process.
//! 2. The new process loads its configuration, checks it against what it
//!    inherited, and builds its gateway from the inherited descriptors
//!    (opening only what the configuration added); its BFD thread and
//!    lanes wait. It answers [`Reply::Prepared`], or [`Reply::Failed`] and
//!    exits: the old process never stopped.
//! 3. The old process stops its lanes and freezes its BFD thread (it
//!    neither sends nor receives from then on) and sends the
//!    [`Takeover`]: every BFD session's state (discriminators, states,
//!    timers, authentication sequence numbers), every path's counters,
//!    sequence numbers and replay state, and every key-pair peer's
//!    handshake sessions with their keys (the socket pair is the only
//!    place they go).
//! 4. The new process takes the sessions over, starts its BFD thread and
//!    lanes, and answers [`Reply::Serving`]. The old process exits without
//!    a word to the peers (no AdminDown) and without removing anything:
//!    the TUNs, their routes and the control socket belong to the new one.
//!
//! Between 3 and 4 nobody reads: packets wait in the socket buffers and
//! TUN queues, which both processes share. Should the new process fail
//! or fall silent there, the old one carries on from where it stopped
//! (and stops the new one).
//!
//! Descriptors go across `exec` rather than over the socket with
//! `SCM_RIGHTS`: the new process is the old one's child, so inheriting
//! them needs no message of variable size and no descriptor limit per
//! message, and the numbers in the [`Inheritance`] stay valid.
//!
//! The state format is versioned: a process refuses a message of
//! another [`VERSION`] (an upgrade across a format change, or a
//! downgrade to a build that predates it), naming both versions, and the
//! old process keeps serving.
//!
//! Descriptor flags are set with libc's `fcntl` (std has no call for
//! `FD_CLOEXEC`): each `unsafe` block is that one call.
#![allow(unsafe_code)]

use crate::core::crypto::ReplayWindow;
use crate::core::engine::PathExport;
use crate::core::handshake::HandshakeExport;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;
use zeroize::Zeroize;

/// The newest version of the state format this build reads and writes.
/// Version 2 added the handshake state of key-pair peers
/// ([`Takeover::handshakes`]); the lanes' replay state
/// ([`PathData::window`] and what follows it) came with it, as optional
/// fields a version-1 reader ignores.
pub const VERSION: u32 = 2;
/// The oldest version this build reads, and the one it writes where the
/// newer one is not needed: an upgrade from the previous release works,
/// and a downgrade to it is refused only where it cannot work (a
/// key-pair peer's sessions, which a version-1 build cannot take).
pub const OLDEST: u32 = 1;

/// The environment variable that tells a new process which descriptor is
/// its end of the socket pair (and that it is taking over).
pub const ENV_FD: &str = "CROSSLINK_UPGRADE_FD";

/// Longest message accepted (a handover of thousands of paths fits).
const MAX_MESSAGE: u64 = 64 << 20;

/// Why a handover message was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "handover state format version {found}; this build reads versions {OLDEST} to {VERSION}"
    )]
    Version { found: u32 },
    #[error("handover state truncated or malformed: {0}")]
    Malformed(String),
}

/// Message 1, old to new: the descriptors handed over, and what the old
/// process knew of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inheritance {
    pub version: u32,
    pub old_pid: u32,
    /// The old process's epoch (see [`crate::core::crypto`]): the new one
    /// takes a later one.
    pub epoch: u32,
    /// The control socket's path and listener.
    pub control: Option<(PathBuf, RawFd)>,
    /// The metrics endpoint's address and listener.
    pub metrics: Option<(SocketAddr, RawFd)>,
    pub peers: Vec<PeerFds>,
    /// BFD receive sockets by local address.
    pub rx: Vec<(IpAddr, RawFd)>,
    /// The names the old process has in systemd's descriptor store: the
    /// new one takes them all out at its first store, so that what it does
    /// not use (a path the new configuration dropped) does not stay there.
    #[serde(default)]
    pub stored: Vec<String>,
}

/// A peer's TUN and paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFds {
    pub name: String,
    pub tun: String,
    pub mtu: u16,
    pub ifindex: u32,
    /// The queues carry virtio-net headers (offloads).
    pub offload: bool,
    /// One per lane.
    pub queues: Vec<RawFd>,
    /// Its routes and their metric as installed (text form).
    pub routes: Vec<String>,
    pub route_metric: Option<u32>,
    pub paths: Vec<PathFds>,
}

/// A path's sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathFds {
    pub name: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub interface: Option<String>,
    /// One per lane, or one that lane 0 reads.
    pub data: Vec<RawFd>,
    pub bfd_tx: RawFd,
}

/// Message 2, old to new, once the old process has stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    pub version: u32,
    pub sessions: Vec<PathExport>,
    pub paths: Vec<PathData>,
    pub peers: Vec<PeerData>,
    /// Packets dropped, by reason (the labels of
    /// `crosslink_packets_dropped_total`).
    #[serde(default)]
    pub drops: Vec<(String, u64)>,
    /// Each key-pair peer's handshake, by peer name: its sessions and
    /// their keys (version 2).
    #[serde(default)]
    pub handshakes: Vec<(String, HandshakeExport)>,
}

impl Takeover {
    /// The version this message needs: 2 with handshake state, else 1.
    pub fn needed_version(&self) -> u32 {
        if self.handshakes.is_empty() {
            OLDEST
        } else {
            VERSION
        }
    }
}

/// A path's data-plane figures, so that counters do not go back and the
/// far end sees its sequence numbers go on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathData {
    pub peer: String,
    pub path: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_seq_high: u64,
    /// The path's last data sequence number.
    pub sequence: u64,
    /// The replay window of the path's data (sealed peers), as it was.
    #[serde(default)]
    pub window: Option<ReplayWindow>,
    /// The newest probe request any lane answered, and the newest echo
    /// request (sealed peers): the new lanes answer none at or below them,
    /// so that no reply is sealed twice under one nonce.
    #[serde(default)]
    pub probes_seen: Option<(u32, u64)>,
    #[serde(default)]
    pub echo_seen: Option<(u32, u64)>,
    /// The last probe sequence number sent (the next probe's nonce is
    /// above it).
    #[serde(default)]
    pub probe_seq: u64,
    /// How long the old process still sends what its lanes held for the
    /// path's pace (`aggregate` with `rate`), in µs; the new process's
    /// pace for the path starts after it.
    #[serde(default)]
    pub pace_backlog_us: u64,
}

/// A peer's sender identity and sequence (`duplicate`, `aggregate`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerData {
    pub name: String,
    pub instance: u32,
    pub sequence: u64,
}

/// New to old.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Prepared {
        version: u32,
        pid: u32,
        /// The newest state version the new process reads (absent from a
        /// version-1 build: 1), so that the old one refuses a downgrade
        /// it cannot make before it stops anything.
        #[serde(default = "oldest")]
        reads: u32,
    },
    Serving {
        version: u32,
        pid: u32,
    },
    Failed {
        version: u32,
        error: String,
    },
}

fn oldest() -> u32 {
    OLDEST
}

#[derive(Deserialize)]
struct Versioned {
    version: u32,
}

/// One message as a line.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Reads a message: its version first, so that another format is named
/// as such rather than reported as garbage.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, StateError> {
    let v: Versioned =
        serde_json::from_slice(line).map_err(|e| StateError::Malformed(e.to_string()))?;
    if !(OLDEST..=VERSION).contains(&v.version) {
        return Err(StateError::Version { found: v.version });
    }
    serde_json::from_slice(line).map_err(|e| StateError::Malformed(e.to_string()))
}

/// The next message from a stream (its read timeout applies).
pub fn read_message<T: for<'de> Deserialize<'de>>(reader: &mut impl BufRead) -> io::Result<T> {
    let mut line = Vec::new();
    match reader.take(MAX_MESSAGE).read_until(b'\n', &mut line) {
        // A process that exits with the message unread resets the pair.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => line.clear(),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other process closed the handover",
        ));
    }
    let msg = decode(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
    // A takeover carries session keys: none left behind in this buffer.
    line.zeroize();
    msg
}

/// Writes one message (and wipes its encoding: a takeover carries session
/// keys).
pub fn write_message<T: Serialize>(mut stream: &UnixStream, msg: &T) -> io::Result<()> {
    let mut line = encode(msg);
    let written = stream.write_all(&line);
    line.zeroize();
    written
}

/// The process taking over: its end of the socket pair and what it inherits.
pub struct Incoming {
    pub stream: UnixStream,
    pub reader: BufReader<UnixStream>,
    pub inheritance: Inheritance,
}

impl Incoming {
    /// The handover this process was started for, if any: `$CROSSLINK_UPGRADE_FD`
    /// names its end of the socket pair, where the [`Inheritance`] waits.
    pub fn from_env() -> io::Result<Option<Incoming>> {
        let Some(raw) = std::env::var_os(ENV_FD) else {
            return Ok(None);
        };
        std::env::remove_var(ENV_FD);
        let fd: RawFd = raw
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("{ENV_FD} is not a descriptor number")))?;
        let owned = inherited(fd)?;
        let stream = UnixStream::from(owned);
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let inheritance = match read_message(&mut reader) {
            Ok(i) => i,
            Err(e) => {
                // Another format (a downgrade, say): the old process says why.
                let _ = write_message(
                    &stream,
                    &Reply::Failed {
                        version: VERSION,
                        error: e.to_string(),
                    },
                );
                return Err(e);
            }
        };
        Ok(Some(Incoming {
            stream,
            reader,
            inheritance,
        }))
    }
}

/// Takes ownership of an inherited descriptor, after checking it is open
/// (a number that names nothing would otherwise be closed by accident
/// later, or worse, name something else).
pub fn inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor's flags; an invalid number
    // gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if fd < 0 || flags < 0 {
        return Err(io::Error::other(format!(
            "inherited descriptor {fd} is not open"
        )));
    }
    // SAFETY: the descriptor is open, and was given to this process for it
    // alone (the old process keeps only its own copy); nothing else in this
    // process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not inherited again by anything this process starts.
    // SAFETY: F_SETFD sets the flags of the open descriptor.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Leaves `fds` open across `exec` in a child about to start (called
/// between fork and exec: only async-signal-safe calls, no allocation).
pub fn keep_open_across_exec(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl is async-signal-safe; F_SETFD 0 clears FD_CLOEXEC on
        // a descriptor the parent holds open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts `cmd` with `fds` left open in the child (and only there).
pub fn spawn_keeping(
    cmd: &mut std::process::Command,
    fds: Vec<RawFd>,
) -> io::Result<std::process::Child> {
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls fcntl (async-signal-safe) on descriptors the parent holds open;
    // `fds` was allocated before the fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || keep_open_across_exec(&fds));
    }
    cmd.spawn()
}

/// Every descriptor an [`Inheritance`] names.
pub fn descriptors(inh: &Inheritance) -> Vec<RawFd> {
    let mut fds = Vec::new();
    fds.extend(inh.control.iter().map(|(_, fd)| *fd));
    fds.extend(inh.metrics.iter().map(|(_, fd)| *fd));
    fds.extend(inh.rx.iter().map(|(_, fd)| *fd));
    for p in &inh.peers {
        fds.extend(&p.queues);
        for path in &p.paths {
            fds.extend(&path.data);
            fds.push(path.bfd_tx);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bfd::Snapshot;
    use crate::core::quality::VerdictExport;
    use crate::core::steer::SlotExport;

    fn takeover() -> Takeover {
        Takeover {
            version: VERSION,
            sessions: vec![PathExport {
                peer: "site-b".into(),
                path: "path1".into(),
                session: Snapshot {
                    local_discr: 0x1234_5678,
                    state: 3,
                    local_diag: 0,
                    remote_discr: 0x9abc_def0,
                    remote_state: 3,
                    remote_diag: 0,
                    remote_min_rx_us: 10_000,
                    remote_desired_min_tx_us: 10_000,
                    remote_detect_tx_us: 10_000,
                    remote_detect_mult: 3,
                    remote_demand: false,
                    in_effect_tx_us: 10_000,
                    in_effect_rx_us: 10_000,
                    poll_active: false,
                    transitions: 3,
                    max_tx_gap_us: 9_000,
                    auth_seq: Some((77, 41, true)),
                },
                control_tx: 1000,
                control_rx: 999,
                failures: 1,
                remote_admin_downs: 0,
                steering: Some(SlotExport {
                    eligible: false,
                    eligible_in_ns: Some(1_500_000_000),
                    level: 2,
                    ..SlotExport::default()
                }),
                quality: Some(VerdictExport {
                    degraded: Some("loss".into()),
                    level: 1,
                    ..VerdictExport::default()
                }),
            }],
            paths: vec![PathData {
                peer: "site-b".into(),
                path: "path1".into(),
                tx_packets: 5,
                tx_bytes: 500,
                rx_packets: 6,
                rx_bytes: 600,
                rx_seq_high: 6,
                sequence: 5,
                window: Some(ReplayWindow::seen_up_to(3, 6)),
                probes_seen: Some((3, 40)),
                echo_seen: None,
                probe_seq: 41,
                pace_backlog_us: 12_000,
            }],
            peers: vec![PeerData {
                name: "site-b".into(),
                instance: 0xdead_beef,
                sequence: 17,
            }],
            drops: vec![("replayed".into(), 3)],
            handshakes: vec![(
                "site-b".into(),
                HandshakeExport {
                    next_epoch: 4,
                    completed: 3,
                    ..HandshakeExport::default()
                },
            )],
        }
    }

    #[test]
    fn round_trip() {
        let t = takeover();
        let line = encode(&t);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(decode::<Takeover>(&line), Ok(t));
        let inh = Inheritance {
            version: VERSION,
            old_pid: 42,
            epoch: 1_700_000_000,
            control: Some(("/run/crosslink/crosslink.sock".into(), 3)),
            metrics: Some(("127.0.0.1:9477".parse().unwrap(), 10)),
            peers: vec![PeerFds {
                name: "site-b".into(),
                tun: "xl-b".into(),
                mtu: 1400,
                ifindex: 7,
                offload: true,
                queues: vec![4, 5],
                routes: vec!["198.18.2.0/24".into()],
                route_metric: Some(100),
                paths: vec![PathFds {
                    name: "path1".into(),
                    local: "198.18.0.1:4789".parse().unwrap(),
                    remote: "198.18.0.2:4789".parse().unwrap(),
                    interface: None,
                    data: vec![6, 7],
                    bfd_tx: 8,
                }],
            }],
            rx: vec![("198.18.0.1".parse().unwrap(), 9)],
            stored: vec!["tun/xl-b/0".into()],
        };
        let back: Inheritance = decode(&encode(&inh)).unwrap();
        assert_eq!(descriptors(&back), vec![3, 10, 9, 4, 5, 6, 7, 8]);
        assert_eq!(back, inh);
    }

    /// The previous release's takeover (version 1: no handshakes, no
    /// replay state) is read, with those left empty; this build writes
    /// version 1 unless it hands over a handshake, which a version-1
    /// build would drop, so that such a downgrade is refused instead.
    #[test]
    fn the_previous_format_is_read_and_written_where_it_will_do() {
        let mut t = takeover();
        assert_eq!(t.needed_version(), VERSION);
        t.handshakes.clear();
        assert_eq!(t.needed_version(), OLDEST);
        t.version = OLDEST;
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&t)).unwrap();
        v.as_object_mut().unwrap().remove("handshakes");
        for p in v["paths"].as_array_mut().unwrap() {
            for k in ["window", "probes_seen", "echo_seen", "probe_seq"] {
                p.as_object_mut().unwrap().remove(k);
            }
        }
        for p in v["sessions"].as_array_mut().unwrap() {
            for k in ["steering", "quality"] {
                p.as_object_mut().unwrap().remove(k);
            }
        }
        let old = serde_json::to_vec(&v).unwrap();
        let back: Takeover = decode(&old).unwrap();
        assert_eq!(back.paths[0].window, None);
        assert_eq!(back.paths[0].probe_seq, 0);
        assert_eq!(back.paths[0].sequence, t.paths[0].sequence);
        assert_eq!(back.sessions[0].session, t.sessions[0].session);
        assert_eq!(back.sessions[0].steering, None);
        assert_eq!(back.sessions[0].quality, None);
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let mut t = takeover();
        t.version = VERSION + 1;
        assert_eq!(
            decode::<Takeover>(&encode(&t)),
            Err(StateError::Version { found: VERSION + 1 })
        );
        let e = decode::<Takeover>(&encode(&t)).unwrap_err().to_string();
        assert!(e.contains(&format!("version {}", VERSION + 1)), "{e}");
        assert!(
            e.contains(&format!("reads versions {OLDEST} to {VERSION}")),
            "{e}"
        );
        t.version = OLDEST - 1;
        assert!(decode::<Takeover>(&encode(&t)).is_err());
        // A message from a format before versions.
        assert!(matches!(
            decode::<Takeover>(b"{\"sessions\":[]}\n"),
            Err(StateError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_input_is_refused() {
        let line = encode(&takeover());
        for cut in [0, 1, line.len() / 3, line.len() / 2, line.len() - 2] {
            let r = decode::<Takeover>(&line[..cut]);
            assert!(
                matches!(r, Err(StateError::Malformed(_))),
                "cut at {cut}: {r:?}"
            );
        }
        // Right version, wrong shape.
        assert!(matches!(
            decode::<Takeover>(format!("{{\"version\":{VERSION},\"sessions\":7}}").as_bytes()),
            Err(StateError::Malformed(_))
        ));
    }

    #[test]
    fn a_previous_release_says_it_reads_version_1() {
        let r: Reply = decode(b"{\"reply\":\"prepared\",\"version\":1,\"pid\":9}\n").unwrap();
        assert_eq!(
            r,
            Reply::Prepared {
                version: 1,
                pid: 9,
                reads: 1
            }
        );
    }

    #[test]
    fn messages_follow_each_other_on_one_stream() {
        let (a, b) = UnixStream::pair().unwrap();
        let r1 = Reply::Prepared {
            version: VERSION,
            pid: 7,
            reads: VERSION,
        };
        let r2 = Reply::Serving {
            version: VERSION,
            pid: 7,
        };
        write_message(&a, &r1).unwrap();
        write_message(&a, &r2).unwrap();
        drop(a);
        let mut b = BufReader::new(b);
        assert_eq!(read_message::<Reply>(&mut b).unwrap(), r1);
        assert_eq!(read_message::<Reply>(&mut b).unwrap(), r2);
        let eof = read_message::<Reply>(&mut b).unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
    }
}
