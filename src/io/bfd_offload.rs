//! The BFD receive offload (`bfd.offload = true`).
//!
//! A session that is Up on both ends receives the same control packet
//! every interval, and each one costs the gateway the kernel's whole UDP
//! receive path (routing, socket lookup, queueing, a wake-up of the BFD
//! thread, `recvmmsg`) to learn one thing: the time it arrived. At 1000
//! sessions at 10 ms that is 100 000 packets a second, most of a core on a
//! small gateway. The BPF program in `bpf/bfdrx.bpf.c` (compiled into
//! `bpf/bfdrx.bpf.o`, which this module embeds) runs on the ingress of
//! each offloaded path's interface (tcx, Linux 6.6 or later) and takes a
//! repeat of the packet the session last processed: same 24 bytes, same
//! addresses and interface, TTL at its floor. It writes the arrival time
//! and a count in the session's map entry and drops the packet. Everything
//! else (a changed field, a Poll or Final, authentication, another source)
//! goes on to the socket as without the program.
//!
//! The engine decides what is taken ([`OffloadChange`]): it arms a path
//! after its session processed a packet that changes nothing when repeated
//! (both ends Up, no Poll, Final or Demand bit, no authentication) and
//! disarms it at any state change. When an armed session's detection time
//! runs out, the engine asks ([`Engine::poll_refresh`]) and the BFD thread
//! reads the entry with [`Offload::read`] before the session may expire. So
//! the detection time is exactly what it is without the offload: only the
//! last repeat's time, taken by the kernel, is read later.
//!
//! The map is an array of 65 536 slots, one per possible path slot: a
//! session sits at the slot its local discriminator's low 16 bits name
//! (the engine gives each path such a discriminator). The BFD thread maps
//! the array into its memory (`BPF_F_MMAPABLE`) and arms, disarms and reads
//! a session with plain loads and stores, no system call: at 1000 sessions
//! the reads at detection deadlines alone were 40 000 map lookups a second.
//! A slot's layout is the C `struct session` (whose source asserts its
//! offsets), in [`entry`].
//!
//! [`OffloadChange`]: crate::core::engine::OffloadChange
//! [`Engine::poll_refresh`]: crate::core::engine::Engine::poll_refresh
//!
//! What no crate wraps here: `clock_gettime` (the kernel's clock, to place
//! the program's times) and the shared mapping of the map (aya 0.14 has no
//! `mmap` of a map), each `unsafe` block one call or one access inside the
//! mapping.
#![allow(unsafe_code)]

use super::clock;
use super::fastpath::{aya_error, interface_indexes, interface_name, program_error};
use crate::config::Config;
use crate::PathId;
use aya::maps::MapData;
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/bfdrx.bpf.o");

const PROGRAM: &str = "xl_bfd_rx";
const MAP: &str = "sessions";

/// Layout of a `sessions` slot (`struct session`).
pub mod entry {
    /// u32: the packets' Your Discriminator; 0: the slot takes nothing.
    /// Written last when a slot is armed, first when it is cleared.
    pub const DISCR: usize = 0;
    /// u32: the interface it must arrive on; 0: any.
    pub const IFINDEX: usize = 4;
    /// The control packet taken as a repeat.
    pub const PACKET: usize = 8;
    pub const PACKET_LEN: usize = crate::core::engine::OFFLOAD_PACKET_LEN;
    /// The remote address, IPv4 as IPv4-mapped IPv6 (16 bytes).
    pub const SADDR: usize = 32;
    /// The local address (16 bytes).
    pub const DADDR: usize = 48;
    /// u8: the least TTL or hop limit.
    pub const MIN_TTL: usize = 64;
    /// u64 (written by the program): CLOCK_MONOTONIC ns of the last repeat.
    pub const LAST_NS: usize = 72;
    /// u64 (written by the program): repeats taken.
    pub const PACKETS: usize = 80;
    pub const LEN: usize = 88;
    /// Slots of the array: one per possible low 16 bits of a discriminator.
    pub const SLOTS: usize = 1 << 16;
}

/// The slot of a session with local discriminator `discriminator`.
pub fn slot_of(discriminator: u32) -> usize {
    (discriminator & 0xffff) as usize
}

/// What the offload takes for one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arm {
    /// The session's local discriminator (the packets' Your Discriminator).
    pub discriminator: u32,
    pub local: IpAddr,
    pub remote: IpAddr,
    /// Single hop: the packets must arrive on the local address's
    /// interface; multihop: on any.
    pub single_hop: bool,
    pub min_ttl: u8,
    pub packet: [u8; entry::PACKET_LEN],
}

/// The slot's bytes for `arm` on interface `ifindex` (0: any), with the
/// discriminator, no time and no count.
pub fn entry_value(arm: &Arm, ifindex: u32) -> [u8; entry::LEN] {
    let mut v = [0u8; entry::LEN];
    v[entry::DISCR..entry::DISCR + 4].copy_from_slice(&arm.discriminator.to_ne_bytes());
    v[entry::PACKET..entry::PACKET + entry::PACKET_LEN].copy_from_slice(&arm.packet);
    v[entry::SADDR..entry::SADDR + 16].copy_from_slice(&mapped(arm.remote));
    v[entry::DADDR..entry::DADDR + 16].copy_from_slice(&mapped(arm.local));
    v[entry::IFINDEX..entry::IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    v[entry::MIN_TTL] = arm.min_ttl;
    v
}

/// An address as the program compares it: IPv6, or IPv4-mapped IPv6.
fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Loads the offload and attaches it where each path of `config` that
/// asks for it (`bfd.offload`) receives, before the BFD thread starts;
/// `None` when no path asks, or when it cannot be loaded (said: those
/// sessions then receive every packet through the socket).
pub fn prepare(config: &Config) -> Option<Offload> {
    let locals: Vec<IpAddr> = config
        .peers
        .iter()
        .flat_map(|p| &p.paths)
        .filter(|p| p.bfd.offload)
        .map(|p| p.local.ip())
        .collect();
    if locals.is_empty() {
        return None;
    }
    let mut offload = match Offload::load() {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "BFD receive offload unavailable; every control packet goes through the socket");
            return None;
        }
    };
    for ip in locals {
        if let Err(e) = offload.attach_for(ip) {
            tracing::warn!(local = %ip, error = %e, "BFD receive offload not attached");
        }
    }
    tracing::info!("BFD receive offload loaded");
    Some(offload)
}

/// The array, mapped into this process (shared with the program).
struct Slots {
    base: std::ptr::NonNull<u8>,
}

// SAFETY: the mapping is plain shared memory owned by this value; the
// BFD thread that owns the offload is the only one touching it here.
unsafe impl Send for Slots {}

impl Slots {
    const BYTES: usize = entry::SLOTS * entry::LEN;

    fn map(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Slots> {
        use std::os::fd::AsRawFd;
        // SAFETY: a new shared mapping of the map's memory (the kernel
        // sizes an mmapable array's memory to at least its entries), which
        // nothing else in this process refers to.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::other(format!(
                "mapping its session array: {}",
                io::Error::last_os_error()
            )));
        }
        let base = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mapping its session array: null"))?;
        Ok(Slots { base })
    }

    /// The address of field `at` of slot `slot`.
    fn field(&self, slot: usize, at: usize) -> *mut u8 {
        debug_assert!(slot < entry::SLOTS && at < entry::LEN);
        // SAFETY: inside the mapping: slot < SLOTS, at < LEN.
        unsafe { self.base.as_ptr().add(slot * entry::LEN + at) }
    }

    fn discr(&self, slot: usize) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: a 4-aligned u32 inside the mapping (slots are 8-aligned,
        // the field at 0), which lives as long as `self`.
        unsafe {
            &*self
                .field(slot, entry::DISCR)
                .cast::<std::sync::atomic::AtomicU32>()
        }
    }

    fn counter(&self, slot: usize, at: usize) -> u64 {
        // SAFETY: an 8-aligned u64 inside the mapping, written by the
        // program (a plain store or an atomic add): read as an atomic.
        let a = unsafe { &*self.field(slot, at).cast::<std::sync::atomic::AtomicU64>() };
        a.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Arms `slot` with `value`: the slot first takes nothing (its
    /// discriminator 0), then gets the rest, then the discriminator. A
    /// packet the program compares meanwhile fails a check and goes on
    /// to the socket.
    fn write(&self, slot: usize, value: &[u8; entry::LEN]) {
        use std::sync::atomic::Ordering;
        self.discr(slot).store(0, Ordering::Release);
        for at in (entry::IFINDEX..entry::LEN).step_by(4) {
            let mut word = [0u8; 4];
            word.copy_from_slice(&value[at..at + 4]);
            // SAFETY: 4-aligned words inside the mapping, stored as atomics
            // (the program may read them at any time).
            let w = unsafe { &*self.field(slot, at).cast::<std::sync::atomic::AtomicU32>() };
            w.store(u32::from_ne_bytes(word), Ordering::Relaxed);
        }
        let mut d = [0u8; 4];
        d.copy_from_slice(&value[entry::DISCR..entry::DISCR + 4]);
        self.discr(slot)
            .store(u32::from_ne_bytes(d), Ordering::Release);
    }

    fn clear(&self, slot: usize) {
        self.discr(slot)
            .store(0, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::BYTES) };
    }
}

/// An armed session.
struct Armed {
    discriminator: u32,
    /// Repeats already reported.
    counted: u64,
}

/// The loaded program, its array, where it is attached and what it takes.
pub struct Offload {
    // Field order: the mapping goes before the program and its map.
    slots: Slots,
    ebpf: Ebpf,
    /// The map (kept open: the mapping is of its memory).
    _map: MapData,
    /// By interface: the program's link there (kept until the process
    /// ends: with nothing armed, it passes every packet on).
    links: HashMap<u32, SchedClassifierLink>,
    /// The interface of each local address, as last read (reading them
    /// all costs a dump of every address: done at start and on a miss).
    interfaces: HashMap<IpAddr, u32>,
    armed: HashMap<PathId, Armed>,
    /// By slot: the path armed there.
    by_slot: HashMap<usize, PathId>,
}

impl Offload {
    /// Creates the map and loads the program (the kernel's verifier checks
    /// it here), and maps the map. Needs `CAP_BPF` (or root).
    pub fn load() -> io::Result<Offload> {
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| aya_error("loading its object", e))?;
        classifier(&mut ebpf)?
            .load()
            .map_err(|e| program_error(PROGRAM, e))?;
        let map = match ebpf.take_map(MAP) {
            Some(aya::maps::Map::Array(m)) => m,
            _ => return Err(io::Error::other(format!("the object has no array {MAP}"))),
        };
        let slots = {
            use std::os::fd::AsFd;
            Slots::map(map.fd().as_fd())?
        };
        Ok(Offload {
            slots,
            ebpf,
            _map: map,
            links: HashMap::new(),
            interfaces: HashMap::new(),
            armed: HashMap::new(),
            by_slot: HashMap::new(),
        })
    }

    /// Takes repeats of `arm.packet` for `path` from now on (replacing what
    /// it took for it; the repeats taken before are returned, to be
    /// counted). Attaches the program to the local address's interface
    /// first if it is not there. Refused when another session holds the
    /// slot (a discriminator taken over from an older process).
    pub fn arm(&mut self, path: PathId, arm: &Arm) -> io::Result<u64> {
        let slot = slot_of(arm.discriminator);
        if let Some(&other) = self.by_slot.get(&slot).filter(|&&p| p != path) {
            return Err(io::Error::other(format!(
                "its discriminator's slot {slot} is path {}'s",
                other.0
            )));
        }
        let ifindex = self.interface_of(arm.local)?;
        let (_, earlier) = self.disarm(path);
        self.attach(ifindex)?;
        let value = entry_value(arm, if arm.single_hop { ifindex } else { 0 });
        self.slots.write(slot, &value);
        self.by_slot.insert(slot, path);
        self.armed.insert(
            path,
            Armed {
                discriminator: arm.discriminator,
                counted: 0,
            },
        );
        Ok(earlier)
    }

    /// Takes nothing more for `path`; returns the time of the last repeat
    /// and the repeats taken since the last report (a session still Up
    /// goes on from that time: its detection time must not count from
    /// the last packet it received itself).
    pub fn disarm(&mut self, path: PathId) -> (Option<Instant>, u64) {
        let Some(a) = self.armed.remove(&path) else {
            return (None, 0);
        };
        let slot = slot_of(a.discriminator);
        self.slots.clear(slot);
        self.by_slot.remove(&slot);
        let packets = self
            .slots
            .counter(slot, entry::PACKETS)
            .saturating_sub(a.counted);
        let last = match self.slots.counter(slot, entry::LAST_NS) {
            0 => None,
            ns => instant_of(ns),
        };
        (last, packets)
    }

    /// Takes nothing more for any session (a hand-off, a stop): every
    /// packet goes to the sockets again.
    /// Returns, for each session, what [`disarm`](Self::disarm) returns.
    pub fn clear(&mut self) -> Vec<(PathId, Option<Instant>, u64)> {
        let paths: Vec<PathId> = self.armed.keys().copied().collect();
        paths
            .into_iter()
            .map(|path| {
                let (last, packets) = self.disarm(path);
                (path, last, packets)
            })
            .collect()
    }

    /// The time of the last repeat taken for `path` (`None` before the
    /// first), and how many were taken since the last call; `None` when
    /// it is not armed.
    pub fn read(&mut self, path: PathId) -> Option<(Option<Instant>, u64)> {
        let a = self.armed.get_mut(&path)?;
        let slot = slot_of(a.discriminator);
        let total = self.slots.counter(slot, entry::PACKETS);
        let new = total.saturating_sub(a.counted);
        a.counted = total;
        let last = match self.slots.counter(slot, entry::LAST_NS) {
            0 => None,
            ns => instant_of(ns),
        };
        Some((last, new))
    }

    /// Attaches the program to the interface that holds `local`, unless
    /// it is there: done for each offloaded path before the BFD thread
    /// starts, so that arming a session later costs a few stores.
    pub fn attach_for(&mut self, local: IpAddr) -> io::Result<()> {
        let ifindex = self.interface_of(local)?;
        self.attach(ifindex)
    }

    fn interface_of(&mut self, local: IpAddr) -> io::Result<u32> {
        if let Some(&i) = self.interfaces.get(&local) {
            return Ok(i);
        }
        self.interfaces = interface_indexes()?;
        self.interfaces.get(&local).copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface holds {local}"),
            )
        })
    }

    fn attach(&mut self, ifindex: u32) -> io::Result<()> {
        if self.links.contains_key(&ifindex) {
            return Ok(());
        }
        let interface = interface_name(ifindex)?;
        let prog = classifier(&mut self.ebpf)?;
        let id = prog
            .attach_with_options(
                &interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| program_error(&format!("{PROGRAM} on {interface}"), e))?;
        let link = prog.take_link(id).map_err(|e| aya_error(PROGRAM, e))?;
        tracing::info!(%interface, "BFD receive offload attached");
        self.links.insert(ifindex, link);
        Ok(())
    }
}

fn classifier(ebpf: &mut Ebpf) -> io::Result<&mut SchedClassifier> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| io::Error::other(format!("the object has no program {PROGRAM}")))?
        .try_into()
        .map_err(|e| aya_error(PROGRAM, e))
}

/// CLOCK_MONOTONIC nanoseconds (the program's `bpf_ktime_get_ns`) as an
/// [`Instant`] (the same clock on Linux); `None` if it lies in the future
/// or before the clock's start.
fn instant_of(ns: u64) -> Option<Instant> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec it is given.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = clock::now();
    if r != 0 {
        return None;
    }
    let mono = u64::try_from(ts.tv_sec)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(ts.tv_nsec).ok()?)?;
    now.checked_sub(Duration::from_nanos(mono.checked_sub(ns)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u64_at(v: &[u8; entry::LEN], at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[at..at + 8]);
        u64::from_ne_bytes(b)
    }

    /// The object holds the program and its map, of the sizes this module
    /// reads and writes.
    #[test]
    fn the_object_has_the_program_and_map_this_module_uses() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the object parses");
        let programs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        assert_eq!(programs, [PROGRAM]);
        let m = obj.maps.get(MAP).expect(MAP);
        const ARRAY: u32 = 2;
        assert_eq!(
            (m.map_type(), m.key_size() as usize, m.value_size() as usize),
            (ARRAY, 4, entry::LEN)
        );
        assert_eq!(m.max_entries() as usize, entry::SLOTS);
        const BPF_F_MMAPABLE: u32 = 1 << 10;
        assert_eq!(m.map_flags() & BPF_F_MMAPABLE, BPF_F_MMAPABLE);
        assert_eq!(obj.maps.len(), 1);
        assert_eq!(obj.license.to_str(), Ok("GPL"));
    }

    /// A map value holds the packet, both addresses (IPv4 mapped), the
    /// interface and the TTL floor where the C struct has them, and no
    /// time or count yet.
    #[test]
    fn an_entry_is_laid_out_as_the_program_reads_it() {
        let arm = Arm {
            discriminator: 7,
            local: "198.18.0.1".parse().unwrap(),
            remote: "198.18.0.2".parse().unwrap(),
            single_hop: true,
            min_ttl: 255,
            packet: [0xab; entry::PACKET_LEN],
        };
        let v = entry_value(&arm, 9);
        assert_eq!(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]), 7);
        assert_eq!(u32::from_ne_bytes([v[4], v[5], v[6], v[7]]), 9);
        assert_eq!(&v[8..32], &[0xab; 24]);
        let mapped = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(&v[32..48], &mapped("::ffff:198.18.0.2"));
        assert_eq!(&v[48..64], &mapped("::ffff:198.18.0.1"));
        assert_eq!(v[64], 255);
        assert_eq!(slot_of(0x1234_abcd), 0xabcd);
        assert_eq!(u64_at(&v, entry::LAST_NS), 0);
        assert_eq!(u64_at(&v, entry::PACKETS), 0);
    }

    /// A kernel time from just now is an instant just before now; one
    /// from the future is none.
    #[test]
    fn kernel_times_become_instants() {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: as in instant_of.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        assert_eq!(r, 0);
        let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let before = Instant::now();
        let at = instant_of(ns.saturating_sub(5_000_000)).expect("a past time");
        assert!(at < before, "5 ms ago is before now");
        assert!(before.duration_since(at) < Duration::from_millis(500));
        assert_eq!(instant_of(ns + 3_600_000_000_000), None);
    }
}
