//! crosslink: a userspace failover router for private multicloud links.
//!
//! # Layers
//!
//! Four rooms, and arrows that point one way: the shell and the telemetry
//! use the core and the config; the core uses only the config; nothing of
//! the daemon uses the lab (`tests/architecture.rs` checks all of it).
//!
//! ```text
//!  config/     TOML -> validated, typed Config (errors name file, line, key):
//!              parse (values, raw structures, error locations), validate, types
//!  core/       sans-IO: bytes and the time in, bytes, deadlines and events out;
//!              no sockets, files, threads or clock
//!    wire/       stateless packet views: overlay header, BFD control packet, flow key
//!    bfd/        RFC 5880 session state machine, authentication
//!    steer       per-peer path choice: active-backup, balance, duplicate; revert
//!                hold, forced-down paths (carrier, send errors), flap damping
//!    engine      the control plane: sessions + steering -> events, forwarding snapshots
//!    forward     per-packet work: classify, encapsulate, seal; receive (one parse,
//!                one dispatch on the message kind)
//!    segment     send side: a TUN super-packet -> segments (payload left in place)
//!    coalesce    receive side: consecutive TCP segments -> one TUN super-packet
//!    dedup       `duplicate` policy: per-peer sequence window, first copy wins
//!    crypto      data-plane AEAD (AES-256-GCM, derived keys), replay windows
//!    ecn         outer DSCP/ECN of a datagram: RFC 6040 encapsulation and decapsulation
//!    drop, rng   drop reasons (the metric's label); SplitMix64
//!  io/         the shell: TUN, sockets, netlink, threads, the clock
//!    lanes/      the forwarding threads: send (TUN -> paths), recv (paths -> TUN),
//!                flows (flow table)
//!    fastpath    the BPF fast path for cleartext peers
//!  telemetry/  counters, Prometheus metrics, status document, control socket
//!  lab/        test support: the network-namespace lab (topology, impairments,
//!              processes, traffic), the probe, the junk generator, the demo
//! ```
//!
//! # A packet's way
//!
//! An application on the gateway host (or behind it) sends to a prefix
//! routed into a peer's TUN. The flow's lane thread (`fwd<n>-*`, one per
//! TUN queue, [`io::lanes`]) reads the packet, [`core::forward::classify`]
//! hashes its flow and asks the peer's current [`core::steer::Selection`]
//! for a path, [`core::forward::encapsulate`] puts the overlay header
//! (naming the lane) in front, and the datagram leaves on the path's UDP
//! socket. At the far gateway the kernel hands it to the socket of the lane
//! of that number, whose thread checks the source is the path's configured
//! remote and hands the datagram to [`core::forward::receive`], which
//! parses its header once and says what it is (data, an echo; opened in
//! place for a keyed peer) or why it is dropped; the lane matches on that
//! once, and data is written to that lane's queue of the TUN
//! ([`core::coalesce`] merges a burst of one TCP flow's segments into one
//! write); the flow's return traffic comes back through the same queue, so
//! both directions of a flow stay with one thread on each gateway. With TUN
//! offloads the kernel hands the lane TCP super-packets of up to 64 KiB,
//! which it classifies once and cuts into MTU-sized segments
//! ([`core::segment`]), and a path's datagrams leave with UDP GSO and
//! arrive with UDP GRO.
//!
//! Meanwhile the `bfd` thread runs one BFD session per path in the
//! [`core::engine::Engine`]. When a session leaves Up the engine's steering
//! moves the peer's flows at once and publishes a new forwarding snapshot,
//! which the lanes pick up on their next packet.
#![deny(unsafe_code)]

pub mod config;
pub mod core;
pub mod io;
pub mod lab;
pub mod setup;
pub mod telemetry;

pub use crate::core::{PathId, PeerId};
