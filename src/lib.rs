//! crosslink: a userspace failover router for private multicloud links.
//!
//! # Layers
//!
//! ```text
//!  config      TOML -> validated, typed Config (errors name file, line, key)
//!  wire        stateless packet views: overlay header, BFD control packet, inner flow key
//!  bfd         RFC 5880 session state machine (sans-IO: time is an argument)
//!  steer       per-peer path choice: active-backup, balance, duplicate; revert hold,
//!              forced-down paths (carrier, send errors), flap damping
//!  engine      the control plane: sessions + steering -> events, forwarding snapshots
//!  crypto      data-plane AEAD (AES-256-GCM, derived keys), key files, replay window
//!  forward     per-packet work: classify, encapsulate, decapsulate, seal, open
//!  segment     send side: a TUN super-packet -> segments (rewritten headers,
//!              payload left in place)
//!  coalesce    receive side: consecutive TCP segments -> one TUN super-packet
//!  dedup       `duplicate` policy: per-peer sequence window, first copy wins
//!  io          the shell: TUN, sockets, netlink, threads, the clock
//!  telemetry   counters, Prometheus metrics, status document, control socket
//!  lab, probe, demo   the network-namespace lab used by `crosslink demo` and the tests
//!  flood       junk generator for the bad-input tests (hidden `crosslink flood`)
//! ```
//!
//! # A packet's way
//!
//! An application on the gateway host (or behind it) sends to a prefix
//! routed into a peer's TUN. The flow's lane thread (`fwd<n>-*`, one per
//! TUN queue) reads the packet, [`forward::classify`] hashes its flow and
//! asks the peer's current [`steer::Selection`] for a path,
//! [`forward::encapsulate`] puts the overlay header (naming the lane) in
//! front, and the datagram leaves on the path's UDP socket. At the far
//! gateway the kernel hands it to the socket of the lane of that number,
//! whose thread checks the source is the path's configured remote,
//! [`forward::decapsulate`] validates it, and the inner packet is written
//! to that lane's queue of the TUN ([`coalesce`] merges a burst of one TCP
//! flow's segments into one write); the flow's return traffic comes back
//! through the same queue, so both directions of a flow stay with one
//! thread on each gateway. With TUN offloads the kernel hands the lane TCP
//! super-packets of up to 64 KiB, which it classifies once and cuts into
//! MTU-sized segments ([`segment`]), and a path's datagrams leave with UDP
//! GSO and arrive with UDP GRO.
//!
//! Meanwhile the `bfd` thread runs one BFD session per path in the
//! [`engine::Engine`]. When a session leaves Up the engine's steering moves
//! the peer's flows at once and publishes a new forwarding snapshot, which
//! the lanes pick up on their next packet.
#![deny(unsafe_code)]

pub mod config;
pub mod core;
pub mod io;
pub mod lab;
pub mod telemetry;

pub use crate::core::{PathId, PeerId};
