//! The I/O shell: the only code with file descriptors, sockets, threads
//! and the clock. It moves bytes between the world and the sans-IO core.
//!
//! Threads of a running gateway:
//! - `bfd`: owns the [`crate::engine::Engine`] and every BFD socket; waits
//!   in `ppoll` for the next control packet or deadline, runs at SCHED_FIFO
//!   where permitted, and publishes each new forwarding snapshot.
//! - `tun-<peer>`: reads the peer's TUN, places each packet on a path and
//!   sends it (see [`crate::forward`]).
//! - `rx-<path>`: receives a path's datagrams and writes them to the TUN.
//! - the tokio runtime: signals, the control socket, netlink (including the
//!   carrier and address watch, [`linkwatch`]), metrics.

pub mod clock;
pub mod control_plane;
pub mod daemon;
pub mod data_plane;
pub mod linkwatch;
pub mod netlink;
pub mod sys;
pub mod tun;
pub mod udp;
