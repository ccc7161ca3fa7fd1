//! The I/O shell: the only code with file descriptors, sockets, threads
//! and the clock. It moves bytes between the world and the sans-IO core.
//!
//! Threads of a running gateway:
//! - `bfd`: owns the [`crate::engine::Engine`] and every BFD socket; waits
//!   in `ppoll` for the next control packet or deadline, runs at SCHED_FIFO
//!   where permitted, and publishes each new forwarding snapshot.
//! - `tun-<peer>`: reads the peer's TUN, places each packet on a path and
//!   sends it (see [`crate::forward`]).
//! - `rx-<path>`: receives a path's datagrams and writes them to the TUN;
//!   answers the peer's echo requests and measures the path's RTT.
//! - the tokio runtime: signals (SIGHUP reload, see [`daemon`]), the
//!   control socket, netlink (including the carrier and address watch,
//!   [`linkwatch`]), metrics, systemd notifications ([`notify`]).
//!
//! A reload starts and stops `rx-<path>` threads for added and removed
//! paths, and restarts a peer's `tun-<peer>` thread when its path set
//! changed; the `bfd` thread applies the change to the engine in one step.

pub mod clock;
pub mod control_plane;
pub mod daemon;
pub mod data_plane;
pub mod keys;
pub mod linkwatch;
pub mod netlink;
pub mod notify;
pub mod sys;
pub mod tun;
pub mod udp;
pub mod wake;
