//! The sans-IO core: everything that decides, and nothing that waits.
//!
//! Packet views, the BFD state machine, steering, the control-plane engine
//! and the per-packet work take bytes and the time as arguments and give
//! bytes, deadlines and events back. They never open a socket or a file,
//! start a thread, read the clock or call into the shell ([`crate::io`]),
//! the telemetry or the lab; `tests/architecture.rs` fails the build's
//! tests when they do. So failover and steering are tested on a simulated
//! network with a virtual clock (`tests/sim.rs`), and the shell around
//! them stays thin.

pub mod aggregate;
pub mod bfd;
pub mod coalesce;
pub mod crypto;
pub mod dedup;
pub mod drop;
pub mod ecn;
pub mod engine;
pub mod fec;
pub mod forward;
pub mod handshake;
pub mod keypair;
pub mod quality;
pub mod reorder;
pub mod rng;
pub mod segment;
pub mod steer;
pub mod wire;

/// A peer's index in the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u16);

/// A path's index among all the gateway's paths, in configuration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u16);
