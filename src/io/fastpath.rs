//! The kernel fast path of a cleartext peer (`fast_path = true`).
//!
//! A user-space data plane copies every byte four times (TUN read, UDP
//! send, UDP receive, TUN write); on a 2-CPU gateway that caps one TCP
//! stream at about a third of what kernel forwarding reaches. Most of it
//! does not have to leave the kernel at all. Two BPF programs, written in C
//! in `bpf/fastpath.bpf.c` and compiled into `bpf/fastpath.bpf.o` (which
//! this module embeds), do the work; this module loads and attaches them
//! with aya (tcx, Linux 6.6 or later) and keeps their maps.
//!
//! **Sending** (`xl_encap`, on the egress of the peer's TUN): the program
//! puts the overlay header in front of each packet routed into the TUN and
//! hands it to the active path's interface, before the TUN driver would
//! have queued it for the lanes. A GSO super-packet stays one: the program
//! marks it as a UDP tunnel packet, and the path's interface (or the
//! kernel, in software) cuts it into datagrams, each with the outer headers
//! and the overlay header in front of one inner segment, exactly what a
//! lane would have sent. The far gateway cannot tell them apart from a
//! lane's datagrams, and needs no fast path of its own.
//!
//! What it writes, per packet, by the path's underlay: outer IPv4 (DF, TTL
//! 64, no options) or IPv6 (hop limit 64, no extension headers, the flow
//! label from the flow's hash), UDP from the path's local to its remote
//! port with checksum 0, and the 16-byte overlay header of a
//! [`crate::core::wire::overlay::MsgType::Data`] message with the sequence
//! number 0 (a cleartext receiver does not read it) and the lane bits taken
//! from the flow's hash, so that the far gateway's lanes share the flows.
//! A peer's paths may mix the two families: each path's configuration
//! carries its own.
//!
//! **The zero UDP checksum.** `bpf_skb_adjust_room` cannot ask the
//! kernel's segmentation to fill in the outer UDP checksum of each
//! datagram it cuts from a super-packet, so the program writes none, and
//! the inner packet keeps its own checksums. IPv4 allows that. IPv6 forbids
//! it unless the receiver opts in (RFC 6935, 6936): every IPv6 data socket
//! of crosslink does, with `UDP_NO_CHECK6_RX` ([`crate::io::udp`]), as
//! Linux's VXLAN does with `udp6zerocsumrx`, so the far gateway takes these
//! datagrams whether its own receiving program or its lanes get them. A far
//! gateway of an older crosslink, or a middlebox that drops UDP/IPv6 with a
//! zero checksum, loses them: such a path needs `fast_path = false`.
//!
//! The program does not vouch for checksums
//! ([`crate::core::wire::overlay::FLAG_CHECKSUM_OK`]): a forwarded packet
//! nobody checked may come through it. What it leaves to the lanes (the
//! packet goes on into the TUN, as without a fast path): anything while the
//! peer has no usable path, a packet that is neither IPv4 nor IPv6, and a
//! super-packet so long that the overlay would push it past the 64 KiB an
//! IPv4 total length or an IPv6 payload length can say.
//!
//! **Receiving** (`xl_decap`, on the ingress of each path's interface): a
//! single cleartext data datagram from one of the peer's paths, over IPv4
//! or IPv6, goes into the TUN as if the TUN had received its inner packet,
//! with its offload state. Everything else (a GSO datagram, a sealed or
//! numbered message, an echo, an outer ECN field of ECT(1) or CE, an IPv4
//! fragment, an IPv6 packet with extension headers) goes on to the socket
//! and the lanes.
//!
//! The BFD thread keeps the sending program's configuration (one map
//! entry: the active path's headers and interface) in step with every
//! forwarding snapshot, so a failover moves the fast path as fast as it
//! moves the lanes, and adds the programs' per-path counters (per-CPU maps)
//! to the paths' counters. The receiving program also keeps the highest
//! path sequence number of the datagrams it took: a far end whose lanes
//! number their datagrams weighs the datagrams received against it, and
//! the program takes from the same numbered stream as the lanes. So a
//! path's lane 0 adds the counters too, before it reports its data counts
//! in a probe reply ([`FastPath::try_take`]): the count and the number it
//! reports then cover what both took up to that moment.
//!
//! The layouts of the map values below are the C structs' (`struct
//! config`, `struct rx_key`, `struct rx_path`, `struct counters`, `struct
//! rx_counters`); a test checks their sizes against the object.
//!
//! The one call no crate wraps here is `getifaddrs` (the interface that
//! holds an address), and `if_indextoname`; each `unsafe` block is one call
//! on memory it owns.
#![allow(unsafe_code)]

use crate::telemetry::PathCounters;
use crate::PathId;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// The compiled programs (`bash bpf/build`; CI checks that the committed
/// object is the source's).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/fastpath.bpf.o");

/// Bytes the fast path puts in front of an inner packet over an IPv4
/// underlay: IPv4, UDP, overlay.
pub const OVERHEAD_V4: usize = 20 + 8 + 16;
/// The same over an IPv6 underlay: IPv6, UDP, overlay.
pub const OVERHEAD_V6: usize = 40 + 8 + 16;
/// Paths of one peer the fast path keeps counters for.
pub const MAX_PATHS: usize = crate::config::FAST_PATH_MAX_PATHS;
/// The longest inner packet the program encapsulates over IPv4: the outer
/// total length must still hold the whole.
pub const MAX_INNER_V4: u32 = 65_535 - OVERHEAD_V4 as u32;
/// The same over IPv6: the payload length (UDP's length too) must hold
/// the UDP and overlay headers and the inner packet.
pub const MAX_INNER_V6: u32 = 65_535 - 8 - 16;

/// Layout of a configuration map value (`struct config`, whose C source
/// asserts these offsets).
mod cfg {
    /// u32: in `config`, the mode (0: off, 1: this entry's path, 2: the
    /// table's); in `paths`, 1 when the slot holds a path.
    pub const ENABLED: usize = 0;
    /// u32: the path's interface.
    pub const IFINDEX: usize = 4;
    /// u32: the path's counter slot.
    pub const SLOT: usize = 8;
    /// u32: IPv4, the ones'-complement sum of the outer header with
    /// length 0.
    pub const CSUM_BASE: usize = 12;
    /// The outer headers, [`super::OVERHEAD_V4`] or [`super::OVERHEAD_V6`]
    /// bytes of the [`TEMPLATE_LEN`] there.
    pub const TEMPLATE: usize = 16;
    pub const TEMPLATE_LEN: usize = super::OVERHEAD_V6;
    /// u8: the bits of the inner TOS byte the outer one (IPv6: the traffic
    /// class) keeps (0xff: the DSCP is inherited; 0x03: the ECN field only).
    pub const TOS_MASK: usize = 80;
    /// u8: the bits the outer TOS byte gets besides (a fixed DSCP).
    pub const TOS_SET: usize = 81;
    /// u8: the underlay's family, 4 or 6.
    pub const FAMILY: usize = 82;
    pub const LEN: usize = 88;
}

/// `config`'s mode: the path of the flow's bucket (`balance`).
const MODE_TABLE: u32 = 2;

/// Buckets of the `balance` table (`BUCKETS` in the C source).
pub const BUCKETS: usize = 256;

/// Length of a receive map key: the datagram's source and destination
/// addresses (IPv6, or IPv4-mapped IPv6) and UDP ports, as they lie in the
/// packet.
pub const RX_KEY_LEN: usize = 36;

/// An address as the receive map holds it: IPv6, or IPv4 mapped into it.
fn key_address(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The receive map key of datagrams from `remote` to `local`.
pub fn rx_key(local: SocketAddr, remote: SocketAddr) -> [u8; RX_KEY_LEN] {
    let mut k = [0u8; RX_KEY_LEN];
    k[0..16].copy_from_slice(&key_address(remote.ip()));
    k[16..32].copy_from_slice(&key_address(local.ip()));
    k[32..34].copy_from_slice(&remote.port().to_be_bytes());
    k[34..36].copy_from_slice(&local.port().to_be_bytes());
    k
}

/// Where the fast path sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Everything on one path (the active one).
    One(Route),
    /// `balance`: each flow on the path of its bucket (by the kernel's
    /// flow hash), `buckets[i]` being an index into `routes`.
    Table {
        routes: Vec<Route>,
        buckets: Vec<usize>,
    },
}

/// A path the fast path sends on: both ends of one family ([`route`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub path: PathId,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The outer DSCP; `None`: the inner packet's.
    pub dscp: Option<u8>,
}

/// The configuration value for `route` through interface `ifindex`,
/// counted in `slot`.
pub fn config_value(route: &Route, ifindex: u32, slot: u32) -> [u8; cfg::LEN] {
    let mut v = [0u8; cfg::LEN];
    let mut put = |at: usize, x: u32| v[at..at + 4].copy_from_slice(&x.to_ne_bytes());
    put(cfg::ENABLED, 1);
    put(cfg::IFINDEX, ifindex);
    put(cfg::SLOT, slot);
    // The outer TOS byte is the program's: (inner & mask) | set; the
    // template's is 0.
    let (mask, set) = match route.dscp {
        None => (0xff, 0),
        Some(d) => (crate::core::ecn::ECN_MASK, (d & 0x3f) << 2),
    };
    v[cfg::TOS_MASK] = mask;
    v[cfg::TOS_SET] = set;
    let t = cfg::TEMPLATE;
    let h = &mut v[t..t + cfg::TEMPLATE_LEN];
    // The IP header's length; UDP and the overlay follow. The program
    // fills in the TOS or traffic class (and IPv6's flow label), the
    // lengths and IPv4's header checksum; the UDP checksum stays 0.
    let (ip, family) = match (route.local.ip(), route.remote.ip()) {
        (IpAddr::V4(local), IpAddr::V4(remote)) => {
            h[0] = 0x45;
            h[6] = 0x40; // DF
            h[8] = 64; // TTL
            h[9] = 17; // UDP
            h[12..16].copy_from_slice(&local.octets());
            h[16..20].copy_from_slice(&remote.octets());
            (20, 4)
        }
        (local, remote) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            h[0] = 0x60;
            h[6] = 17; // UDP
            h[7] = 64; // hop limit
            h[8..24].copy_from_slice(&v6(local));
            h[24..40].copy_from_slice(&v6(remote));
            (40, 6)
        }
    };
    h[ip..ip + 2].copy_from_slice(&route.local.port().to_be_bytes());
    h[ip + 2..ip + 4].copy_from_slice(&route.remote.port().to_be_bytes());
    let o = &mut h[ip + 8..];
    o[0] = crate::core::wire::overlay::VERSION;
    o[1] = crate::core::wire::overlay::MsgType::Data as u8;
    o[2] = crate::core::wire::overlay::BASE_LEN as u8;
    if family == 4 {
        let base: u32 = h[..20]
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        v[cfg::CSUM_BASE..cfg::CSUM_BASE + 4].copy_from_slice(&base.to_ne_bytes());
    }
    v[cfg::FAMILY] = family;
    v
}

/// The interface that holds `ip`, if any.
pub(crate) fn interface_of(ip: IpAddr) -> io::Result<Option<u32>> {
    Ok(interface_indexes()?.get(&ip).copied())
}

/// Every local address and the interface that holds it (the first one,
/// if several do), from one `getifaddrs`.
pub(crate) fn interface_indexes() -> io::Result<HashMap<IpAddr, u32>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, which is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = HashMap::new();
    let mut names: HashMap<std::ffi::CString, u32> = HashMap::new();
    let mut p = list;
    while !p.is_null() {
        // SAFETY: `p` walks the list getifaddrs returned, until its end.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null address; its family says which struct it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        if found.contains_key(&ip) {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated name while the list lives.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // One system call per interface, not per address (a hub has
        // thousands of addresses on a few interfaces).
        let index = match names.get(name) {
            Some(&i) => i,
            None => {
                // SAFETY: as above.
                let i = unsafe { libc::if_nametoindex(ifa.ifa_name) };
                names.insert(name.to_owned(), i);
                i
            }
        };
        if index != 0 {
            found.insert(ip, index);
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The name of interface `index`, which aya attaches by.
pub(crate) fn interface_name(index: u32) -> io::Result<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// An aya error as an I/O error, with what was being done; a program the
/// verifier refused says why (the log's last line).
pub(crate) fn aya_error(what: &str, e: impl std::error::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

pub(crate) fn program_error(what: &str, e: ProgramError) -> io::Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let last = log.lines().rev().find(|l| !l.trim().is_empty());
            io::Error::new(
                io_error.kind(),
                format!(
                    "{what}: {io_error}; verifier: {}",
                    last.unwrap_or("(no log)")
                ),
            )
        }
        ProgramError::SyscallError(e) => {
            io::Error::new(e.io_error.kind(), format!("{what}: {}", e.io_error))
        }
        e => aya_error(what, e),
    }
}

/// Per-CPU counters: packets and bytes.
type Counters = PerCpuArray<MapData, [u64; 2]>;
/// The receiving program's per-CPU counters (`struct rx_counters`):
/// packets, bytes, and the highest sequence number.
type RxCounters = PerCpuArray<MapData, [u64; 3]>;
/// Where `struct rx_counters` holds the highest sequence number.
const RX_SEQ_HIGH: usize = 2;

/// The loaded programs and their maps, not attached anywhere yet.
pub struct Programs {
    ebpf: Ebpf,
    config: Array<MapData, [u8; cfg::LEN]>,
    paths: Array<MapData, [u8; cfg::LEN]>,
    table: Array<MapData, [u8; BUCKETS]>,
    tx_stats: Counters,
    rx_paths: BpfHashMap<MapData, [u8; RX_KEY_LEN], [u8; 8]>,
    rx_stats: RxCounters,
}

impl Programs {
    /// Creates the maps (one configuration entry, [`MAX_PATHS`] of the
    /// others) and loads both programs: the kernel's verifier checks them
    /// here. Needs `CAP_BPF` (or root).
    pub fn load() -> io::Result<Programs> {
        let slots = MAX_PATHS as u32;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("paths", slots)
            .map_max_entries("tx_stats", slots)
            .map_max_entries("rx_paths", slots)
            .map_max_entries("rx_stats", slots)
            .load(OBJECT)
            .map_err(|e| aya_error("loading its object", e))?;
        for name in ["xl_encap", "xl_decap"] {
            Self::classifier(&mut ebpf, name)?
                .load()
                .map_err(|e| program_error(name, e))?;
        }
        let mut map = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| io::Error::other(format!("the object has no map {name}")))
        };
        let (config, paths, table, tx_stats, rx_paths, rx_stats) = (
            map("config")?,
            map("paths")?,
            map("table")?,
            map("tx_stats")?,
            map("rx_paths")?,
            map("rx_stats")?,
        );
        let typed = |name: &'static str| move |e| aya_error(name, e);
        Ok(Programs {
            config: Array::try_from(config).map_err(typed("config"))?,
            paths: Array::try_from(paths).map_err(typed("paths"))?,
            table: Array::try_from(table).map_err(typed("table"))?,
            tx_stats: PerCpuArray::try_from(tx_stats).map_err(typed("tx_stats"))?,
            rx_paths: BpfHashMap::try_from(rx_paths).map_err(typed("rx_paths"))?,
            rx_stats: PerCpuArray::try_from(rx_stats).map_err(typed("rx_stats"))?,
            ebpf,
        })
    }

    fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> io::Result<&'a mut SchedClassifier> {
        ebpf.program_mut(name)
            .ok_or_else(|| io::Error::other(format!("the object has no program {name}")))?
            .try_into()
            .map_err(|e| aya_error(name, e))
    }

    /// Attaches program `name` to interface `ifindex` with tcx, after the
    /// programs already there. The link detaches it when dropped.
    fn attach(
        &mut self,
        name: &str,
        ifindex: u32,
        kind: TcAttachType,
    ) -> io::Result<SchedClassifierLink> {
        let interface = interface_name(ifindex)?;
        let prog = Self::classifier(&mut self.ebpf, name)?;
        let id = prog
            .attach_with_options(
                &interface,
                kind,
                TcAttachOptions::TcxOrder(LinkOrder::last()),
            )
            .map_err(|e| program_error(&format!("{name} on {interface}"), e))?;
        prog.take_link(id).map_err(|e| aya_error(name, e))
    }

    /// What the counters of `slot` in `map` add up to over the CPUs.
    fn totals(map: &Counters, slot: u32) -> io::Result<(u64, u64)> {
        let values = map
            .get(&slot, 0)
            .map_err(|e| aya_error("reading its counters", e))?;
        Ok(values.iter().fold((0u64, 0u64), |(p, b), v| {
            (p.wrapping_add(v[0]), b.wrapping_add(v[1]))
        }))
    }

    /// What the receiving program's counters of `slot` add up to over the
    /// CPUs: packets, bytes, and the highest sequence number.
    fn rx_totals(&self, slot: u32) -> io::Result<(u64, u64, u64)> {
        let values = self
            .rx_stats
            .get(&slot, 0)
            .map_err(|e| aya_error("reading its counters", e))?;
        Ok(rx_sum(&values))
    }

    /// Forgets the highest sequence number of `slot` (a path new to the
    /// slot numbers from 1 again); its packets and bytes stay. Done while no
    /// path's datagrams reach the slot.
    fn reset_seq_high(&mut self, slot: u32) -> io::Result<()> {
        let values = self
            .rx_stats
            .get(&slot, 0)
            .map_err(|e| aya_error("reading its counters", e))?;
        let mut values: Vec<[u64; 3]> = values.iter().copied().collect();
        if values.iter().all(|v| v[RX_SEQ_HIGH] == 0) {
            return Ok(());
        }
        for v in &mut values {
            v[RX_SEQ_HIGH] = 0;
        }
        let values = PerCpuValues::try_from(values)?;
        self.rx_stats
            .set(slot, values, 0)
            .map_err(|e| aya_error("resetting its counters", e))
    }
}

/// The receiving program's per-CPU counters summed: packets and bytes
/// added up, the highest sequence number the largest of the CPUs'.
fn rx_sum(values: &[[u64; 3]]) -> (u64, u64, u64) {
    values.iter().fold((0, 0, 0), |(p, b, h), v| {
        (
            p.wrapping_add(v[0]),
            b.wrapping_add(v[1]),
            h.max(v[RX_SEQ_HIGH]),
        )
    })
}

/// A peer's fast path: the programs on its TUN and on its paths'
/// interfaces, and their maps. Dropping it detaches the programs.
pub struct FastPath {
    tun: u32,
    _egress: SchedClassifierLink,
    state: Mutex<State>,
}

struct State {
    progs: Programs,
    plan: Option<Plan>,
    slots: Slots,
    /// Totals already added to the paths' counters, by slot: sent, received.
    seen: HashMap<u32, [(u64, u64); 2]>,
    /// The path whose datagrams the receiving program numbers in each
    /// slot's highest sequence number.
    numbered: HashMap<u32, PathId>,
    /// The receive program's links, by interface.
    ingress: HashMap<u32, SchedClassifierLink>,
    /// The receive map's keys.
    keys: Vec<[u8; RX_KEY_LEN]>,
}

/// Counter slots by path.
#[derive(Default)]
struct Slots(HashMap<PathId, u32>);

impl Slots {
    /// The counter slot of `path`: its own, or the lowest free one. A slot
    /// keeps its totals in `seen` when it passes to another path, so that
    /// each path is counted what moved while it held the slot.
    fn slot(&mut self, path: PathId) -> io::Result<u32> {
        if let Some(&slot) = self.0.get(&path) {
            return Ok(slot);
        }
        let free = (0..MAX_PATHS as u32).find(|s| !self.0.values().any(|v| v == s));
        let slot = free.ok_or_else(|| io::Error::other("too many paths for the fast path"))?;
        self.0.insert(path, slot);
        Ok(slot)
    }

    /// Frees the slots of paths the peer no longer has (a reload removed
    /// them), for the paths a later reload adds.
    fn keep(&mut self, paths: &[Route]) {
        self.0.retain(|id, _| paths.iter().any(|r| r.path == *id));
    }
}

/// What the fast path moved on one path since it was last asked, and the
/// highest sequence number among all it received on the path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_seq_high: u64,
}

impl Moved {
    /// Adds it to the path's counters. The received datagrams and their
    /// highest number go in together, as the lanes count theirs: the far
    /// end's path quality weighs one against the other. The number goes in
    /// first: a reader between the two sees it ahead of the count (a
    /// deficit gone within microseconds, far shorter than the reordering
    /// window that makes one loss), never a count that it does not cover
    /// (a dip that would come back as loss once out of the window).
    pub fn add_to(&self, c: &PathCounters) {
        c.tx_packets.fetch_add(self.tx_packets, Ordering::Relaxed);
        c.tx_bytes.fetch_add(self.tx_bytes, Ordering::Relaxed);
        c.rx_bytes.fetch_add(self.rx_bytes, Ordering::Relaxed);
        c.rx_seq_high.fetch_max(self.rx_seq_high, Ordering::Relaxed);
        c.rx_packets.fetch_add(self.rx_packets, Ordering::Relaxed);
    }
}

impl FastPath {
    /// Loads the programs and attaches the sending one to the egress of
    /// interface `tun` (the peer's TUN), disabled until [`FastPath::set`]
    /// gives it a path; [`FastPath::receive`] attaches the receiving one.
    pub fn attach(tun: u32) -> io::Result<FastPath> {
        let mut progs = Programs::load()?;
        let egress = progs
            .attach("xl_encap", tun, TcAttachType::Egress)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("attaching it to the TUN's egress (tcx): {e}"),
                )
            })?;
        Ok(FastPath {
            tun,
            _egress: egress,
            state: Mutex::new(State {
                progs,
                plan: None,
                slots: Slots::default(),
                seen: HashMap::new(),
                numbered: HashMap::new(),
                ingress: HashMap::new(),
                keys: Vec::new(),
            }),
        })
    }

    /// Sends by `plan` from now on (`None`: hands everything to the
    /// lanes). Writes the maps only when the plan changed, or `force`
    /// (which looks the interfaces up again).
    pub fn set(&self, plan: Option<Plan>, force: bool) -> io::Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        if st.plan == plan && !force {
            return Ok(());
        }
        let result = match &plan {
            None => Ok([0u8; cfg::LEN]),
            Some(Plan::One(r)) => Self::path_value(st, r),
            Some(Plan::Table { routes, buckets }) => Self::table_value(st, routes, buckets),
        };
        // Anything that cannot be carried goes to the lanes.
        let value = match &result {
            Ok(v) => *v,
            Err(_) => [0u8; cfg::LEN],
        };
        st.progs
            .config
            .set(0, value, 0)
            .map_err(|e| aya_error("writing its configuration", e))?;
        st.plan = if result.is_ok() { plan } else { None };
        result.map(|_| ())
    }

    /// The configuration of `r`'s path, through the interface that holds
    /// its local address now.
    fn path_value(st: &mut State, r: &Route) -> io::Result<[u8; cfg::LEN]> {
        let Some(ifindex) = interface_of(r.local.ip())? else {
            // The local address is gone: the lanes' sends fail and tell
            // the BFD thread.
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("no interface holds {}", r.local.ip()),
            ));
        };
        let slot = st.slots.slot(r.path)?;
        Ok(config_value(r, ifindex, slot))
    }

    /// Writes each route's configuration at its slot in `paths`, then the
    /// bucket table (one update), and returns `config`'s value that turns
    /// the table on.
    fn table_value(
        st: &mut State,
        routes: &[Route],
        buckets: &[usize],
    ) -> io::Result<[u8; cfg::LEN]> {
        let mut slots = Vec::with_capacity(routes.len());
        for r in routes {
            let value = Self::path_value(st, r)?;
            let slot = st.slots.slot(r.path)?;
            st.progs
                .paths
                .set(slot, value, 0)
                .map_err(|e| aya_error("writing a path's configuration", e))?;
            slots.push(slot);
        }
        let mut table = [0u8; BUCKETS];
        for (t, &b) in table.iter_mut().zip(buckets) {
            let slot = slots
                .get(b)
                .ok_or_else(|| io::Error::other("a bucket names no path"))?;
            *t = u8::try_from(*slot).map_err(|_| io::Error::other("slot out of range"))?;
        }
        st.progs
            .table
            .set(0, table, 0)
            .map_err(|e| aya_error("writing its bucket table", e))?;
        let mut v = [0u8; cfg::LEN];
        v[cfg::ENABLED..cfg::ENABLED + 4].copy_from_slice(&MODE_TABLE.to_ne_bytes());
        Ok(v)
    }

    /// Receives the datagrams of `paths` (the peer's, all of them) in the
    /// kernel: the receiving program on each one's interface, and each one
    /// in its map. A path whose local address no interface holds is left
    /// to the lanes.
    pub fn receive(&self, paths: &[Route]) -> io::Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        let mut keys = Vec::with_capacity(paths.len());
        let mut result = Ok(());
        for r in paths {
            let Some(ifindex) = interface_of(r.local.ip())? else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(e) = st.ingress.entry(ifindex) {
                match st.progs.attach("xl_decap", ifindex, TcAttachType::Ingress) {
                    Ok(link) => {
                        e.insert(link);
                    }
                    Err(e) => {
                        result = Err(e);
                        continue;
                    }
                }
            }
            let slot = st.slots.slot(r.path)?;
            if st.numbered.get(&slot) != Some(&r.path) {
                // Before the path's datagrams can reach the slot.
                st.progs.reset_seq_high(slot)?;
                st.numbered.insert(slot, r.path);
            }
            let mut value = [0u8; 8];
            value[..4].copy_from_slice(&slot.to_ne_bytes());
            value[4..].copy_from_slice(&self.tun.to_ne_bytes());
            let key = rx_key(r.local, r.remote);
            st.progs
                .rx_paths
                .insert(key, value, 0)
                .map_err(|e| aya_error("adding a path to its receive map", e))?;
            keys.push(key);
        }
        for gone in st.keys.iter().filter(|k| !keys.contains(k)) {
            st.progs
                .rx_paths
                .remove(gone)
                .map_err(|e| aya_error("removing a path from its receive map", e))?;
        }
        st.keys = keys;
        st.slots.keep(paths);
        result
    }

    /// What the programs moved on `path` since the last call.
    pub fn take(&self, path: PathId) -> io::Result<Moved> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::take_locked(&mut guard, path)
    }

    /// [`FastPath::take`] unless another thread is using the maps now
    /// (`None`): for a lane, which must not wait.
    pub fn try_take(&self, path: PathId) -> Option<io::Result<Moved>> {
        let mut guard = match self.state.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(Self::take_locked(&mut guard, path))
    }

    fn take_locked(st: &mut State, path: PathId) -> io::Result<Moved> {
        let Some(&slot) = st.slots.0.get(&path) else {
            return Ok(Moved::default());
        };
        let tx = Programs::totals(&st.progs.tx_stats, slot)?;
        let (rx_packets, rx_bytes, rx_seq_high) = st.progs.rx_totals(slot)?;
        let rx = (rx_packets, rx_bytes);
        // The slot's number is another path's until this one receives on it.
        let rx_seq_high = match st.numbered.get(&slot) {
            Some(&p) if p == path => rx_seq_high,
            _ => 0,
        };
        let seen = st.seen.entry(slot).or_default();
        let moved = Moved {
            tx_packets: tx.0.wrapping_sub(seen[0].0),
            tx_bytes: tx.1.wrapping_sub(seen[0].1),
            rx_packets: rx.0.wrapping_sub(seen[1].0),
            rx_bytes: rx.1.wrapping_sub(seen[1].1),
            rx_seq_high,
        };
        *seen = [tx, rx];
        Ok(moved)
    }
}

/// The route for `local` -> `remote`, when the fast path can carry it
/// (both ends IPv4 or both IPv6, concrete addresses).
pub fn route(
    path: PathId,
    local: SocketAddr,
    remote: SocketAddr,
    dscp: Option<u8>,
) -> Option<Route> {
    let carried = local.is_ipv4() == remote.is_ipv4()
        && !local.ip().is_unspecified()
        && !remote.ip().is_unspecified();
    carried.then_some(Route {
        path,
        local,
        remote,
        dscp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object holds both programs and the six maps, whose key and
    /// value sizes are the ones this module reads and writes (the loader
    /// refuses a typed map of another size, but only when it runs as root).
    #[test]
    fn the_object_has_the_programs_and_maps_this_module_uses() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the object parses");
        let mut programs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        programs.sort_unstable();
        assert_eq!(programs, ["xl_decap", "xl_encap"]);
        assert!(obj.btf.is_some(), "the object has BTF");
        let sizes = |name: &str| {
            let m = obj.maps.get(name).expect(name);
            (m.map_type(), m.key_size() as usize, m.value_size() as usize)
        };
        const HASH: u32 = 1;
        const ARRAY: u32 = 2;
        const PERCPU_ARRAY: u32 = 6;
        assert_eq!(sizes("config"), (ARRAY, 4, cfg::LEN));
        assert_eq!(sizes("paths"), (ARRAY, 4, cfg::LEN));
        assert_eq!(sizes("table"), (ARRAY, 4, BUCKETS));
        assert_eq!(sizes("tx_stats"), (PERCPU_ARRAY, 4, 16));
        assert_eq!(sizes("rx_paths"), (HASH, RX_KEY_LEN, 8));
        assert_eq!(sizes("rx_stats"), (PERCPU_ARRAY, 4, 24));
        assert_eq!(obj.maps.len(), 6);
        assert_eq!(obj.license.to_str(), Ok("GPL"));
    }

    /// The receiving program's counters over the CPUs: packets and bytes
    /// add up, the highest number is the largest any CPU saw (wrapping
    /// sums, as the per-CPU counters wrap).
    #[test]
    fn receive_counters_add_up_and_keep_the_highest_number() {
        assert_eq!(rx_sum(&[]), (0, 0, 0));
        let cpus = [[3, 300, 17], [0, 0, 0], [5, 500, 12]];
        assert_eq!(rx_sum(&cpus), (8, 800, 17));
        assert_eq!(rx_sum(&[[u64::MAX, 1, 1], [2, 1, 9]]), (1, 2, 9));
    }

    /// What the programs moved goes into a path's counters: the sent and
    /// received datagrams and bytes added, the highest number received
    /// never lowered.
    #[test]
    fn what_moved_adds_to_the_path_counters() {
        let c = PathCounters::default();
        c.rx_packets.store(10, Ordering::Relaxed);
        c.rx_seq_high.store(40, Ordering::Relaxed);
        let moved = Moved {
            tx_packets: 1,
            tx_bytes: 100,
            rx_packets: 30,
            rx_bytes: 3000,
            rx_seq_high: 35,
        };
        moved.add_to(&c);
        assert_eq!(c.tx_packets.load(Ordering::Relaxed), 1);
        assert_eq!(c.tx_bytes.load(Ordering::Relaxed), 100);
        assert_eq!(c.rx_packets.load(Ordering::Relaxed), 40);
        assert_eq!(c.rx_bytes.load(Ordering::Relaxed), 3000);
        assert_eq!(c.rx_seq_high.load(Ordering::Relaxed), 40);
        Moved {
            rx_seq_high: 70,
            ..Moved::default()
        }
        .add_to(&c);
        assert_eq!(c.rx_seq_high.load(Ordering::Relaxed), 70);
    }

    #[test]
    fn the_outer_headers_are_what_a_lane_sends() {
        let r = Route {
            path: PathId(0),
            local: "198.18.1.1:4800".parse().unwrap(),
            remote: "198.18.1.2:4801".parse().unwrap(),
            dscp: None,
        };
        let v = config_value(&r, 7, 2);
        assert_eq!(u32::from_ne_bytes(v[4..8].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(v[8..12].try_into().unwrap()), 2);
        // Finish the template as the program does, for a 1000-byte inner packet.
        let inner = 1000u32;
        assert_eq!(v[cfg::FAMILY], 4);
        let mut h = v[16..16 + OVERHEAD_V4].to_vec();
        let total = inner + OVERHEAD_V4 as u32;
        h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let mut s = u32::from_ne_bytes(v[12..16].try_into().unwrap()) + total;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        h[10..12].copy_from_slice(&(!(s as u16)).to_be_bytes());
        h[24..26].copy_from_slice(&((inner + 24) as u16).to_be_bytes());
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&h[..20]).expect("IPv4");
        assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
        assert_eq!(ip.source(), [198, 18, 1, 1]);
        assert_eq!(ip.destination(), [198, 18, 1, 2]);
        assert!(ip.dont_fragment());
        let udp = etherparse::UdpHeaderSlice::from_slice(&h[20..28]).expect("UDP");
        assert_eq!((udp.source_port(), udp.destination_port()), (4800, 4801));
        assert_eq!(usize::from(udp.length()), inner as usize + 24);
        // The overlay header decodes as cleartext data.
        let mut dgram = h[28..].to_vec();
        let inner =
            etherparse::PacketBuilder::ipv4([198, 18, 10, 1], [198, 18, 30, 2], 64).udp(1, 2);
        let mut packet = Vec::new();
        inner.write(&mut packet, &[7; 10]).expect("inner packet");
        dgram.extend_from_slice(&packet);
        let (hdr, rest) = crate::core::forward::decapsulate(&dgram).expect("overlay");
        assert_eq!(hdr.msg_type, crate::core::wire::overlay::MsgType::Data);
        assert_eq!(rest, &packet[..]);
        assert!(!hdr.checksum_ok());
    }

    /// The IPv6 template, finished as the program does: the headers a lane
    /// sends over an IPv6 underlay, but for the UDP checksum (0) and the
    /// flow label (the flow's hash).
    #[test]
    fn the_outer_ipv6_headers_are_what_a_lane_sends() {
        let r = Route {
            path: PathId(0),
            local: "[2001:2:0:21::1]:4800".parse().unwrap(),
            remote: "[2001:2:0:21::2]:4801".parse().unwrap(),
            dscp: Some(10),
        };
        let v = config_value(&r, 7, 2);
        assert_eq!(v[cfg::FAMILY], 6);
        assert_eq!(u32::from_ne_bytes(v[4..8].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(v[8..12].try_into().unwrap()), 2);
        let inner = 1000u32;
        let (tos, label, lane) = (0x2a_u8, 0xabcde_u32, 5u8);
        let mut h = v[16..16 + OVERHEAD_V6].to_vec();
        let payload = (inner + 24) as u16;
        h[0] = 0x60 | tos >> 4;
        h[1] = (tos << 4) | (label >> 16) as u8;
        h[2] = (label >> 8) as u8;
        h[3] = label as u8;
        h[4..6].copy_from_slice(&payload.to_be_bytes());
        h[44..46].copy_from_slice(&payload.to_be_bytes());
        h[48 + 3] |= lane << 4;
        let (ip, rest) = etherparse::Ipv6Header::from_slice(&h).expect("IPv6");
        assert_eq!(ip.traffic_class, tos);
        assert_eq!(ip.flow_label.value(), label);
        assert_eq!(ip.payload_length, payload);
        assert_eq!(ip.next_header, etherparse::IpNumber::UDP);
        assert_eq!(ip.hop_limit, 64);
        assert_eq!(
            std::net::Ipv6Addr::from(ip.source),
            "2001:2:0:21::1".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(
            std::net::Ipv6Addr::from(ip.destination),
            "2001:2:0:21::2".parse::<std::net::Ipv6Addr>().unwrap()
        );
        let udp = etherparse::UdpHeaderSlice::from_slice(rest).expect("UDP");
        assert_eq!((udp.source_port(), udp.destination_port()), (4800, 4801));
        assert_eq!(udp.length(), payload);
        assert_eq!(udp.checksum(), 0);
        let mut dgram = rest[8..].to_vec();
        assert_eq!(dgram.len(), 16);
        let inner = etherparse::PacketBuilder::ipv6(
            [0x20, 1, 0, 2, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0, 2, 0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .udp(1, 2);
        let mut packet = Vec::new();
        inner.write(&mut packet, &[7; 10]).expect("inner packet");
        dgram.extend_from_slice(&packet);
        let (hdr, rest) = crate::core::forward::decapsulate(&dgram).expect("overlay");
        assert_eq!(hdr.msg_type, crate::core::wire::overlay::MsgType::Data);
        assert_eq!(hdr.lane(), usize::from(lane));
        assert_eq!(rest, &packet[..]);
        assert!(!hdr.checksum_ok());
    }

    /// The receive map's key: what the program reads from the packet, an
    /// IPv4 address mapped into IPv6.
    #[test]
    fn receive_keys_hold_either_family() {
        let k = rx_key(
            "198.18.21.2:4800".parse().unwrap(),
            "198.18.21.1:4801".parse().unwrap(),
        );
        assert_eq!(
            k[..16],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 21, 1]
        );
        assert_eq!(
            k[16..32],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 21, 2]
        );
        assert_eq!(k[32..], [0x12, 0xc1, 0x12, 0xc0]);
        let k = rx_key(
            "[2001:2:0:21::2]:4800".parse().unwrap(),
            "[2001:2:0:21::1]:4801".parse().unwrap(),
        );
        let ip = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(k[..16], ip("2001:2:0:21::1"));
        assert_eq!(k[16..32], ip("2001:2:0:21::2"));
        assert_eq!(k[32..], [0x12, 0xc1, 0x12, 0xc0]);
    }

    /// The TOS byte the program writes, `(inner & mask) | set`: the inner
    /// one, or the path's DSCP with the inner ECN field.
    #[test]
    fn the_outer_tos_follows_the_inner_or_the_path() {
        let tos = |dscp: Option<u8>, inner: u8| {
            let r = Route {
                path: PathId(0),
                local: "198.18.1.1:4800".parse().unwrap(),
                remote: "198.18.1.2:4801".parse().unwrap(),
                dscp,
            };
            let v = config_value(&r, 7, 2);
            (inner & v[cfg::TOS_MASK]) | v[cfg::TOS_SET]
        };
        assert_eq!(tos(None, 0xb8), 0xb8);
        assert_eq!(tos(None, 0x03), 0x03);
        assert_eq!(tos(Some(8), 0xb9), 0x21);
        assert_eq!(tos(Some(48), 0x00), 0xc0);
        for inner in [0x00, 0x02, 0xb8, 0xbb] {
            for dscp in [None, Some(10), Some(63)] {
                let inner_packet = [0x45, inner];
                assert_eq!(
                    tos(dscp, inner),
                    crate::core::ecn::outer_tos(&inner_packet, dscp),
                    "same as the lanes"
                );
            }
        }
    }

    #[test]
    fn counter_slots_of_removed_paths_are_reused() {
        let route = |id: u16| Route {
            path: PathId(id),
            local: "198.18.1.1:4800".parse().unwrap(),
            remote: "198.18.1.2:4800".parse().unwrap(),
            dscp: None,
        };
        let mut st = Slots::default();
        assert_eq!(st.slot(PathId(0)).unwrap(), 0);
        assert_eq!(st.slot(PathId(1)).unwrap(), 1);
        assert_eq!(st.slot(PathId(0)).unwrap(), 0);
        // Reloads that replace path 1 again and again, far more often than
        // there are slots: the peer keeps two slots.
        for id in 2..(3 * MAX_PATHS as u16) {
            st.keep(&[route(0), route(id)]);
            assert_eq!(st.slot(PathId(id)).unwrap(), 1, "path {id}");
        }
        // More paths at once than slots: refused.
        for id in 100..100 + MAX_PATHS as u16 - 2 {
            st.slot(PathId(id)).unwrap();
        }
        assert!(st.slot(PathId(999)).is_err());
    }

    #[test]
    fn only_paths_with_concrete_addresses_take_the_fast_path() {
        let id = PathId(1);
        assert!(route(
            id,
            "198.18.1.1:1".parse().unwrap(),
            "198.18.1.2:1".parse().unwrap(),
            None
        )
        .is_some());
        assert!(route(
            id,
            "0.0.0.0:1".parse().unwrap(),
            "198.18.1.2:1".parse().unwrap(),
            None
        )
        .is_none());
        assert!(route(
            id,
            "[2001:db8::1]:1".parse().unwrap(),
            "[2001:db8::2]:1".parse().unwrap(),
            None
        )
        .is_some());
        assert!(route(
            id,
            "[::]:1".parse().unwrap(),
            "[2001:db8::2]:1".parse().unwrap(),
            None
        )
        .is_none());
        assert!(route(
            id,
            "198.18.1.1:1".parse().unwrap(),
            "[2001:db8::2]:1".parse().unwrap(),
            None
        )
        .is_none());
    }
}
