//! The I/O shell: the only code with file descriptors, sockets, threads
//! and the clock. It moves bytes between the world and the sans-IO core.
//!
//! Threads of a running gateway:
//! - `bfd`: owns the [`crate::core::engine::Engine`] and every BFD socket; waits
//!   in `epoll` for the next control packet or deadline, sends what is due
//!   in one io_uring submission ([`bfd_tx`]), runs at SCHED_FIFO where
//!   permitted, and publishes each new forwarding snapshot.
//! - `fwd<n>-<peer>`: lane `n` of the peer ([`lanes::Lane`]; one per
//!   CPU, at most 4, or `CROSSLINK_LANES`): reads its queue of the peer's
//!   TUN, places each packet on a path and sends it (see
//!   [`crate::core::forward`]), and receives the datagrams of every path that name
//!   its lane and writes them to the same queue; lane 0 also answers the
//!   peer's echo requests and measures each path's RTT.
//! - the tokio runtime: signals (SIGHUP reload, see [`daemon`]), the
//!   control socket, netlink (including the carrier and address watch,
//!   [`linkwatch`]), metrics, systemd notifications ([`notify`]).
//!
//! A peer with `fast_path` also has two BPF programs in the kernel
//! ([`fastpath`]), on its TUN's egress and its paths' interfaces' ingress,
//! which carry its cleartext traffic without a thread; the `bfd` thread
//! steers them with every forwarding snapshot. Paths with `bfd.offload`
//! have a third on their interfaces' ingress ([`bfd_offload`]), which
//! takes the repeated control packets of Up sessions and leaves the `bfd`
//! thread their arrival times in shared memory.
//!
//! A reload restarts a peer's lanes when its path set changed (opening
//! and closing the sockets of added and removed paths in between, and
//! keeping sequence numbers, replay windows and flows); the `bfd` thread
//! applies the change to the engine in one step.
//!
//! `crosslink upgrade` hands all of it to a new process ([`upgrade`]): the
//! TUN queues and sockets as they are, the BFD sessions and the data
//! plane's counters as state; the `bfd` thread and lanes of each process
//! wait while the other one runs.

pub mod bfd_offload;
pub mod bfd_tx;
pub mod clock;
pub mod control_plane;
pub mod daemon;
pub mod fastpath;
pub mod keys;
pub mod lanes;
pub mod linkwatch;
pub mod netlink;
pub mod notify;
pub mod sys;
pub mod tun;
pub mod udp;
pub mod upgrade;
