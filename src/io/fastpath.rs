//! The kernel fast path of a cleartext peer (`fast_path = true`).
//!
//! A user-space data plane copies every byte four times (TUN read, UDP
//! send, UDP receive, TUN write); on a 2-CPU gateway that caps one TCP
//! stream at about a third of what kernel forwarding reaches. The sending
//! half does not have to leave the kernel at all: a BPF program on the
//! egress hook of the peer's TUN (tcx, Linux 6.6 or later) puts the overlay
//! header in front of each packet routed into the TUN and hands it to the
//! active path's interface, before the TUN driver would have queued it for
//! the lanes. A GSO super-packet stays one: the program marks it as a UDP
//! tunnel packet, and the path's interface (or the kernel, in software)
//! cuts it into datagrams, each with the outer headers and the overlay
//! header in front of one inner segment, exactly what a lane would have
//! sent. The far gateway cannot tell them apart from a lane's datagrams,
//! and needs no fast path of its own.
//!
//! What the program writes, per packet: outer IPv4 (DF, TTL 64, no
//! options), UDP from the path's local to its remote port (checksum 0, as
//! IPv4 allows: the inner packet keeps its own), and the 16-byte overlay
//! header of a [`crate::core::wire::overlay::MsgType::Data`] message with the
//! sequence number 0 (a cleartext receiver does not read it) and the lane
//! bits taken from the flow's hash, so that the far gateway's lanes share
//! the flows. It does not vouch for checksums
//! ([`crate::core::wire::overlay::FLAG_CHECKSUM_OK`]): a forwarded packet nobody
//! checked may come through it.
//!
//! What it leaves to the lanes (the packet goes on into the TUN, as
//! without a fast path): anything while the peer has no usable path, a
//! packet that is neither IPv4 nor IPv6, and a super-packet so long that
//! the overlay would push it past the 64 KiB an IPv4 length can say.
//!
//! The BFD thread keeps the program's configuration (one map entry: the
//! active path's addresses and interface) in step with every forwarding
//! snapshot, so a failover moves the fast path as fast as it moves the
//! lanes, and adds the program's per-path counters (a per-CPU map) to the
//! paths' counters. The receiving half stays in user space (see
//! [`super::lanes`]): the kernel's receive-side offloads make it far
//! cheaper than the sending half, and decapsulating a GSO packet in BPF
//! leaves it marked as a tunnel packet on the kernels of today, which
//! breaks its segmentation further on.
//!
//! The programs are assembled here, at run time, from a few dozen
//! instructions: no compiler, object file or BPF library is needed. Like
//! [`super::sys`], this module makes system calls no crate wraps (`bpf`,
//! `getifaddrs`); each `unsafe` block is one call on memory it owns.
#![allow(unsafe_code)]

use crate::PathId;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Bytes the fast path puts in front of an inner packet: IPv4, UDP, overlay.
pub const OVERHEAD: usize = 20 + 8 + 16;
/// Paths of one peer the fast path keeps counters for.
pub const MAX_PATHS: usize = crate::config::FAST_PATH_MAX_PATHS;
/// The longest inner packet the program encapsulates: the outer IPv4
/// length field must still hold the whole.
pub const MAX_INNER: u32 = 65_535 - OVERHEAD as u32;

/// One BPF instruction, as the kernel reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// A tiny assembler: the instructions the programs below use, and labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const FP: u8 = 10;

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        });
    }
    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.insns.len());
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }
    fn mov_imm(&mut self, d: u8, v: i32) {
        self.op(0xb7, d, 0, 0, v)
    }
    fn mov(&mut self, d: u8, s: u8) {
        self.op(0xbf, d, s, 0, 0)
    }
    fn add_imm(&mut self, d: u8, v: i32) {
        self.op(0x07, d, 0, 0, v)
    }
    fn add(&mut self, d: u8, s: u8) {
        self.op(0x0f, d, s, 0, 0)
    }
    fn mul_imm(&mut self, d: u8, v: i32) {
        self.op(0x27, d, 0, 0, v)
    }
    fn and_imm(&mut self, d: u8, v: i32) {
        self.op(0x57, d, 0, 0, v)
    }
    fn or(&mut self, d: u8, s: u8) {
        self.op(0x4f, d, s, 0, 0)
    }
    fn and(&mut self, d: u8, s: u8) {
        self.op(0x5f, d, s, 0, 0)
    }
    fn lsh_imm(&mut self, d: u8, v: i32) {
        self.op(0x67, d, 0, 0, v)
    }
    fn rsh_imm(&mut self, d: u8, v: i32) {
        self.op(0x77, d, 0, 0, v)
    }
    fn xor_imm(&mut self, d: u8, v: i32) {
        self.op(0xa7, d, 0, 0, v)
    }
    /// To big-endian, 16 bits (on the little-endian hosts this runs on).
    fn be16(&mut self, d: u8) {
        self.op(0xdc, d, 0, 0, 16)
    }
    fn ldx_w(&mut self, d: u8, s: u8, off: i16) {
        self.op(0x61, d, s, off, 0)
    }
    fn ldx_b(&mut self, d: u8, s: u8, off: i16) {
        self.op(0x71, d, s, off, 0)
    }
    fn ldx_dw(&mut self, d: u8, s: u8, off: i16) {
        self.op(0x79, d, s, off, 0)
    }
    fn stx_w(&mut self, d: u8, off: i16, s: u8) {
        self.op(0x63, d, s, off, 0)
    }
    fn stx_h(&mut self, d: u8, off: i16, s: u8) {
        self.op(0x6b, d, s, off, 0)
    }
    fn stx_b(&mut self, d: u8, off: i16, s: u8) {
        self.op(0x73, d, s, off, 0)
    }
    fn ldx_h(&mut self, d: u8, s: u8, off: i16) {
        self.op(0x69, d, s, off, 0)
    }
    fn jgt(&mut self, d: u8, s: u8, to: &'static str) {
        self.jump(0x2d, d, s, 0, to)
    }
    fn stx_dw(&mut self, d: u8, off: i16, s: u8) {
        self.op(0x7b, d, s, off, 0)
    }
    fn st_w(&mut self, d: u8, off: i16, v: i32) {
        self.op(0x62, d, 0, off, v)
    }
    fn ld_imm64(&mut self, d: u8, v: u64) {
        self.op(0x18, d, 0, 0, v as u32 as i32);
        self.op(0, 0, 0, 0, (v >> 32) as u32 as i32);
    }
    /// Loads a map's address (the kernel resolves the descriptor).
    fn ld_map(&mut self, d: u8, fd: RawFd) {
        self.op(0x18, d, 1, 0, fd);
        self.op(0, 0, 0, 0, 0);
    }
    fn call(&mut self, helper: i32) {
        self.op(0x85, 0, 0, 0, helper)
    }
    fn exit(&mut self) {
        self.op(0x95, 0, 0, 0, 0)
    }
    fn jeq_imm(&mut self, d: u8, v: i32, to: &'static str) {
        self.jump(0x15, d, 0, v, to)
    }
    fn jne_imm(&mut self, d: u8, v: i32, to: &'static str) {
        self.jump(0x55, d, 0, v, to)
    }
    fn jgt_imm(&mut self, d: u8, v: i32, to: &'static str) {
        self.jump(0x25, d, 0, v, to)
    }
    /// The program, with every jump resolved; `None` if a label is missing
    /// or out of reach.
    fn finish(mut self) -> Option<Vec<Insn>> {
        for (at, to) in std::mem::take(&mut self.fixups) {
            let target = *self.labels.get(to)?;
            let off = i16::try_from(target as i64 - at as i64 - 1).ok()?;
            self.insns.get_mut(at)?.off = off;
        }
        Some(self.insns)
    }
}

// Kernel helpers (include/uapi/linux/bpf.h).
const MAP_LOOKUP_ELEM: i32 = 1;
const SKB_STORE_BYTES: i32 = 9;
const SKB_LOAD_BYTES: i32 = 26;
const GET_HASH_RECALC: i32 = 34;
const SKB_CHANGE_HEAD: i32 = 43;
const SKB_ADJUST_ROOM: i32 = 50;
const REDIRECT_NEIGH: i32 = 152;
const REDIRECT: i32 = 23;
// `struct __sk_buff` offsets.
const SKB_LEN: i16 = 0;
const SKB_PROTOCOL: i16 = 16;
const SKB_GSO_SEGS: i16 = 164;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
const SKB_GSO_SIZE: i16 = 176;
// tcx verdicts.
const TCX_NEXT: i32 = -1;
const TCX_DROP: i32 = 2;
// bpf_skb_adjust_room.
const ADJ_ROOM_MAC: i32 = 1;
const ADJ_FIXED_GSO: u64 = 1;
const ADJ_ENCAP_L3_IPV4: u64 = 1 << 1;
const ADJ_ENCAP_L4_UDP: u64 = 1 << 4;
const ADJ_DECAP_L3_IPV6: i32 = 1 << 8;
const F_INGRESS: i32 = 1;
const fn adj_encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Layout of the configuration map's one value.
mod cfg {
    /// u32: 1 when a path is set.
    pub const ENABLED: i16 = 0;
    /// u32: the path's interface.
    pub const IFINDEX: i16 = 4;
    /// u32: the path's counter slot.
    pub const SLOT: i16 = 8;
    /// u32: ones'-complement sum of the outer IPv4 header with length 0.
    pub const CSUM_BASE: i16 = 12;
    /// The outer headers, [`super::OVERHEAD`] bytes.
    pub const TEMPLATE: i16 = 16;
    /// u8: the bits of the inner TOS byte the outer one keeps (0xff: the
    /// DSCP is inherited; 0x03: the ECN field only).
    pub const TOS_MASK: i16 = 60;
    /// u8: the bits the outer TOS byte gets besides (a fixed DSCP).
    pub const TOS_SET: i16 = 61;
    pub const LEN: usize = 64;
}

/// The egress program of the TUN: see the module documentation. `config`
/// is the configuration map, `stats` the per-CPU counters (packets and
/// bytes per path slot).
pub fn encap_program(config: RawFd, stats: RawFd) -> Option<Vec<Insn>> {
    let over = OVERHEAD as i32;
    let hdr: i16 = -48; // the outer headers on the stack
    let mut a = Asm::default();
    a.mov(R6, R1);
    // Inner IPv4 or IPv6 only (the protocol, big-endian, in a u32).
    a.ldx_w(R1, R6, SKB_PROTOCOL);
    a.jeq_imm(R1, 0x0008, "ip");
    a.jne_imm(R1, 0xdd86, "pass");
    a.label("ip");
    a.st_w(FP, -4, 0);
    a.mov(R2, FP);
    a.add_imm(R2, -4);
    a.ld_map(R1, config);
    a.call(MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, "pass");
    a.mov(R7, R0);
    a.ldx_w(R1, R7, cfg::ENABLED);
    a.jeq_imm(R1, 0, "pass");
    a.ldx_w(R8, R6, SKB_LEN);
    a.jgt_imm(R8, MAX_INNER as i32, "pass");
    a.ldx_w(R9, R6, SKB_GSO_SEGS);
    a.jne_imm(R9, 0, "segs");
    a.mov_imm(R9, 1);
    a.label("segs");
    // The outer TOS byte (RFC 6040 normal mode): the inner packet's ECN
    // field, and its DSCP or the path's. IPv4: byte 1; IPv6: the traffic
    // class, across bytes 0 and 1.
    a.mov(R1, R6);
    a.mov_imm(R2, 0);
    a.mov(R3, FP);
    a.add_imm(R3, -64);
    a.mov_imm(R4, 2);
    a.call(SKB_LOAD_BYTES);
    a.jne_imm(R0, 0, "pass");
    a.ldx_b(R1, FP, -64);
    a.ldx_b(R2, FP, -63);
    a.mov(R3, R1);
    a.rsh_imm(R3, 4);
    a.jeq_imm(R3, 4, "tos");
    a.lsh_imm(R1, 4);
    a.rsh_imm(R2, 4);
    a.or(R2, R1);
    a.and_imm(R2, 0xff);
    a.label("tos");
    a.ldx_b(R1, R7, cfg::TOS_MASK);
    a.and(R2, R1);
    a.ldx_b(R1, R7, cfg::TOS_SET);
    a.or(R2, R1);
    a.stx_dw(FP, -64, R2);
    // The lane bits, from the flow's hash.
    a.mov(R1, R6);
    a.call(GET_HASH_RECALC);
    a.and_imm(R0, 7);
    a.lsh_imm(R0, 4);
    a.stx_dw(FP, -56, R0);
    a.mov(R1, R6);
    a.mov_imm(R2, over);
    a.mov_imm(R3, ADJ_ROOM_MAC);
    a.ld_imm64(
        R4,
        ADJ_FIXED_GSO | ADJ_ENCAP_L3_IPV4 | ADJ_ENCAP_L4_UDP | adj_encap_l2(16),
    );
    a.call(SKB_ADJUST_ROOM);
    a.jne_imm(R0, 0, "pass");
    // The template to the stack: 5 x 8 + 4 bytes.
    for k in 0..5i16 {
        a.ldx_dw(R1, R7, cfg::TEMPLATE + 8 * k);
        a.stx_dw(FP, hdr + 8 * k, R1);
    }
    a.ldx_w(R1, R7, cfg::TEMPLATE + 40);
    a.stx_w(FP, hdr + 40, R1);
    // The TOS byte (the template's is 0).
    a.ldx_dw(R5, FP, -64);
    a.stx_b(FP, hdr + 1, R5);
    // IPv4 total length and header checksum (the TOS is the low byte of
    // the first 16-bit word).
    a.mov(R1, R8);
    a.add_imm(R1, over);
    a.mov(R2, R1);
    a.be16(R1);
    a.stx_h(FP, hdr + 2, R1);
    a.ldx_w(R3, R7, cfg::CSUM_BASE);
    a.add(R3, R2);
    a.add(R3, R5);
    for _ in 0..2 {
        a.mov(R4, R3);
        a.rsh_imm(R4, 16);
        a.and_imm(R3, 0xffff);
        a.add(R3, R4);
    }
    a.xor_imm(R3, 0xffff);
    a.be16(R3);
    a.stx_h(FP, hdr + 10, R3);
    // UDP length.
    a.mov(R1, R8);
    a.add_imm(R1, over - 20);
    a.be16(R1);
    a.stx_h(FP, hdr + 24, R1);
    // Overlay flags: the lane.
    a.ldx_b(R1, FP, hdr + 31);
    a.ldx_dw(R2, FP, -56);
    a.or(R1, R2);
    a.stx_b(FP, hdr + 31, R1);
    a.mov(R1, R6);
    a.mov_imm(R2, 0);
    a.mov(R3, FP);
    a.add_imm(R3, i32::from(hdr));
    a.mov_imm(R4, over);
    a.mov_imm(R5, 0);
    a.call(SKB_STORE_BYTES);
    a.jne_imm(R0, 0, "drop");
    // Room for the Ethernet header, which the neighbour code fills in.
    a.mov(R1, R6);
    a.mov_imm(R2, 14);
    a.mov_imm(R3, 0);
    a.call(SKB_CHANGE_HEAD);
    a.jne_imm(R0, 0, "drop");
    // Count: datagrams, and their bytes (overlay and inner packet; the
    // inner headers the segmentation repeats are not counted).
    a.ldx_w(R1, R7, cfg::SLOT);
    a.stx_w(FP, -60, R1);
    a.mov(R2, FP);
    a.add_imm(R2, -60);
    a.ld_map(R1, stats);
    a.call(MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, "send");
    a.ldx_dw(R1, R0, 0);
    a.add(R1, R9);
    a.stx_dw(R0, 0, R1);
    a.mov(R2, R9);
    a.mul_imm(R2, 16);
    a.add(R2, R8);
    a.ldx_dw(R1, R0, 8);
    a.add(R1, R2);
    a.stx_dw(R0, 8, R1);
    a.label("send");
    a.ldx_w(R1, R7, cfg::IFINDEX);
    a.mov_imm(R2, 0);
    a.mov_imm(R3, 0);
    a.mov_imm(R4, 0);
    a.call(REDIRECT_NEIGH);
    a.exit();
    a.label("pass");
    a.mov_imm(R0, TCX_NEXT);
    a.exit();
    a.label("drop");
    a.mov_imm(R0, TCX_DROP);
    a.exit();
    a.finish()
}

/// Length of a receive map key: the datagram's IPv4 source and
/// destination addresses and UDP ports, as they lie in the packet.
pub const RX_KEY_LEN: usize = 12;

/// The ingress program of a path's interface: a cleartext data datagram
/// from one of the peer's paths (by addresses and ports, `paths`: key as
/// [`RX_KEY_LEN`], value the path's counter slot and the TUN's interface)
/// that is a single packet goes into the TUN as if the TUN had received
/// its inner packet, with its offload state (a checksum left to the
/// hardware stays so, instead of reaching user space unfinished). A GSO
/// packet, a sealed or numbered message, an echo, a datagram whose outer
/// ECN field is ECT(1) or CE (RFC 6040 decapsulation is left to the
/// lanes), anything else: on to the socket and the lanes.
pub fn decap_program(paths: RawFd, stats: RawFd) -> Option<Vec<Insn>> {
    let mut a = Asm::default();
    a.mov(R6, R1);
    a.ldx_w(R1, R6, SKB_GSO_SIZE);
    a.jne_imm(R1, 0, "pass");
    a.ldx_w(R2, R6, SKB_DATA);
    a.ldx_w(R3, R6, SKB_DATA_END);
    a.mov(R4, R2);
    a.add_imm(R4, 14 + OVERHEAD as i32 + 1);
    a.jgt(R4, R3, "pass");
    a.ldx_h(R4, R2, 12); // EtherType IPv4, big-endian
    a.jne_imm(R4, 0x0008, "pass");
    a.ldx_b(R4, R2, 14); // IPv4 without options
    a.jne_imm(R4, 0x45, "pass");
    a.ldx_b(R4, R2, 23);
    a.jne_imm(R4, 17, "pass");
    // Outer ECN ECT(1) or CE (bit 0 set): the inner packet's ECN field may
    // change (RFC 6040), which the lanes do; Not-ECT and ECT(0) never
    // change it.
    a.ldx_b(R4, R2, 15);
    a.and_imm(R4, 1);
    a.jne_imm(R4, 0, "pass");
    a.ldx_h(R4, R2, 20); // not a fragment
    a.and_imm(R4, 0xff3f);
    a.jne_imm(R4, 0, "pass");
    // Version 1, data, 16-byte header, no peer sequence (little-endian u32).
    a.ldx_w(R4, R2, 42);
    a.and_imm(R4, 0x01ff_ffff);
    a.jne_imm(R4, 0x0010_0101, "pass");
    a.ldx_b(R8, R2, 14 + OVERHEAD as i16);
    a.rsh_imm(R8, 4);
    // The key, to the stack.
    for k in 0..3i16 {
        a.ldx_w(R4, R2, 26 + 4 * k);
        a.stx_w(FP, -16 + 4 * k, R4);
    }
    a.ldx_w(R9, R6, SKB_LEN);
    a.mov(R2, FP);
    a.add_imm(R2, -16);
    a.ld_map(R1, paths);
    a.call(MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, "pass");
    a.mov(R7, R0);
    a.mov_imm(R4, 0);
    a.jeq_imm(R8, 4, "adjust");
    a.jne_imm(R8, 6, "pass");
    a.mov_imm(R4, ADJ_DECAP_L3_IPV6);
    a.label("adjust");
    a.mov(R1, R6);
    a.mov_imm(R2, -(OVERHEAD as i32));
    a.mov_imm(R3, ADJ_ROOM_MAC);
    a.call(SKB_ADJUST_ROOM);
    a.jne_imm(R0, 0, "pass");
    // Count the datagram (overlay and inner packet).
    a.ldx_w(R1, R7, 0);
    a.stx_w(FP, -20, R1);
    a.mov(R2, FP);
    a.add_imm(R2, -20);
    a.ld_map(R1, stats);
    a.call(MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, "deliver");
    a.ldx_dw(R1, R0, 0);
    a.add_imm(R1, 1);
    a.stx_dw(R0, 0, R1);
    a.add_imm(R9, -(14 + 28));
    a.ldx_dw(R1, R0, 8);
    a.add(R1, R9);
    a.stx_dw(R0, 8, R1);
    a.label("deliver");
    a.ldx_w(R1, R7, 4);
    a.mov_imm(R2, F_INGRESS);
    a.call(REDIRECT);
    a.exit();
    a.label("pass");
    a.mov_imm(R0, TCX_NEXT);
    a.exit();
    a.finish()
}

/// The receive map key of datagrams from `remote` to `local`.
pub fn rx_key(local: SocketAddrV4, remote: SocketAddrV4) -> [u8; RX_KEY_LEN] {
    let mut k = [0u8; RX_KEY_LEN];
    k[0..4].copy_from_slice(&remote.ip().octets());
    k[4..8].copy_from_slice(&local.ip().octets());
    k[8..10].copy_from_slice(&remote.port().to_be_bytes());
    k[10..12].copy_from_slice(&local.port().to_be_bytes());
    k
}

/// Where the fast path sends: the active path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub path: PathId,
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// The outer DSCP; `None`: the inner packet's.
    pub dscp: Option<u8>,
}

/// The configuration value for `route` through interface `ifindex`,
/// counted in `slot`.
pub fn config_value(route: &Route, ifindex: u32, slot: u32) -> [u8; cfg::LEN] {
    let mut v = [0u8; cfg::LEN];
    v[0..4].copy_from_slice(&1u32.to_ne_bytes());
    v[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    v[8..12].copy_from_slice(&slot.to_ne_bytes());
    // The outer TOS byte is the program's: (inner & mask) | set; the
    // template's is 0.
    let (mask, set) = match route.dscp {
        None => (0xff, 0),
        Some(d) => (crate::core::ecn::ECN_MASK, (d & 0x3f) << 2),
    };
    v[cfg::TOS_MASK as usize] = mask;
    v[cfg::TOS_SET as usize] = set;
    let t = cfg::TEMPLATE as usize;
    let h = &mut v[t..t + OVERHEAD];
    h[0] = 0x45;
    h[6] = 0x40; // DF
    h[8] = 64; // TTL
    h[9] = 17; // UDP
    h[12..16].copy_from_slice(&route.local.ip().octets());
    h[16..20].copy_from_slice(&route.remote.ip().octets());
    h[20..22].copy_from_slice(&route.local.port().to_be_bytes());
    h[22..24].copy_from_slice(&route.remote.port().to_be_bytes());
    let o = &mut h[28..];
    o[0] = crate::core::wire::overlay::VERSION;
    o[1] = crate::core::wire::overlay::MsgType::Data as u8;
    o[2] = crate::core::wire::overlay::BASE_LEN as u8;
    let base: u32 = h[..20]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    v[12..16].copy_from_slice(&base.to_ne_bytes());
    v
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable `union bpf_attr` prefix of the
    // length given; the kernel reads (and for some commands writes) no more.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    match r {
        r if r < 0 => Err(io::Error::last_os_error()),
        r => Ok(r),
    }
}

fn fd_of(r: i64) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(r).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn put32(a: &mut [u8], at: usize, v: u32) {
    a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(a: &mut [u8], at: usize, v: u64) {
    a[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_LINK_CREATE: libc::c_long = 28;
const MAP_HASH: u32 = 1;
const MAP_ARRAY: u32 = 2;
const MAP_PERCPU_ARRAY: u32 = 6;
const PROG_SCHED_CLS: u32 = 3;
const ATTACH_TCX_INGRESS: u32 = 46;
const ATTACH_TCX_EGRESS: u32 = 47;

fn map_create(kind: u32, key: usize, value: usize, entries: usize) -> io::Result<OwnedFd> {
    let mut a = [0u8; 72];
    put32(&mut a, 0, kind);
    put32(&mut a, 4, key as u32);
    put32(&mut a, 8, value as u32);
    put32(&mut a, 12, entries as u32);
    a[28..28 + 8].copy_from_slice(b"crosslnk");
    fd_of(bpf(BPF_MAP_CREATE, &mut a)?)
}

/// One map element command: `key`, and `value` where the command has one.
fn map_elem(
    cmd: libc::c_long,
    map: &OwnedFd,
    key: &[u8],
    value: Option<*mut u8>,
) -> io::Result<()> {
    let mut a = [0u8; 32];
    put32(&mut a, 0, map.as_raw_fd() as u32);
    put64(&mut a, 8, key.as_ptr() as u64);
    put64(&mut a, 16, value.map_or(0, |v| v as u64));
    bpf(cmd, &mut a).map(|_| ())
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    // The kernel only reads the value of an update.
    map_elem(
        BPF_MAP_UPDATE_ELEM,
        map,
        key,
        Some(value.as_ptr().cast_mut()),
    )
}

fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    map_elem(BPF_MAP_DELETE_ELEM, map, key, None)
}

fn map_lookup(map: &OwnedFd, key: u32, value: &mut [u8]) -> io::Result<()> {
    map_elem(
        BPF_MAP_LOOKUP_ELEM,
        map,
        &key.to_ne_bytes(),
        Some(value.as_mut_ptr()),
    )
}

fn prog_load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = [0u8; 72];
    put32(&mut a, 0, PROG_SCHED_CLS);
    put32(&mut a, 4, insns.len() as u32);
    put64(&mut a, 8, insns.as_ptr() as u64);
    put64(&mut a, 16, license.as_ptr() as u64);
    put32(&mut a, 24, 1);
    put32(&mut a, 28, log.len() as u32);
    put64(&mut a, 32, log.as_mut_ptr() as u64);
    a[48..48 + 11].copy_from_slice(b"xl_fastpath");
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => fd_of(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let log = String::from_utf8_lossy(&log[..end]);
            let last = log.lines().rev().find(|l| !l.trim().is_empty());
            Err(io::Error::new(
                e.kind(),
                format!("{e}; verifier: {}", last.unwrap_or("(no log)")),
            ))
        }
    }
}

fn link_create(prog: &OwnedFd, ifindex: u32, attach: u32) -> io::Result<OwnedFd> {
    let mut a = [0u8; 32];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 4, ifindex);
    put32(&mut a, 8, attach);
    fd_of(bpf(BPF_LINK_CREATE, &mut a)?)
}

/// CPUs the kernel may run (per-CPU map values come one per possible CPU).
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let lo: usize = lo.parse().map_err(io::Error::other)?;
        let hi: usize = hi.parse().map_err(io::Error::other)?;
        n = n.max(hi + 1).max(lo + 1);
    }
    Ok(n.max(1))
}

/// The interface that holds `ip`, if any.
fn interface_of(ip: std::net::Ipv4Addr) -> io::Result<Option<u32>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, which is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut p = list;
    while !p.is_null() {
        // SAFETY: `p` walks the list getifaddrs returned, until its end.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null address; its family says which struct it is.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        if u32::from_be(sin.sin_addr.s_addr) == u32::from(ip) {
            // SAFETY: ifa_name is a NUL-terminated name while the list lives.
            let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
            if index != 0 {
                found = Some(index);
                break;
            }
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// A peer's fast path: the programs on its TUN and on its paths'
/// interfaces, and their maps. Dropping it detaches the programs.
pub struct FastPath {
    tun: u32,
    config: OwnedFd,
    tx_stats: OwnedFd,
    rx_paths: OwnedFd,
    rx_stats: OwnedFd,
    rx_prog: OwnedFd,
    _egress: OwnedFd,
    cpus: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    route: Option<Route>,
    /// Counter slot by path.
    slots: HashMap<PathId, u32>,
    /// Totals already added to the paths' counters, by slot: sent, received.
    seen: HashMap<u32, [(u64, u64); 2]>,
    /// The receive program's links, by interface.
    ingress: HashMap<u32, OwnedFd>,
    /// The receive map's keys.
    keys: Vec<[u8; RX_KEY_LEN]>,
}

impl State {
    /// The counter slot of `path`: its own, or the lowest free one. A slot
    /// keeps its totals in `seen` when it passes to another path, so that
    /// each path is counted what moved while it held the slot.
    fn slot(&mut self, path: PathId) -> io::Result<u32> {
        if let Some(&slot) = self.slots.get(&path) {
            return Ok(slot);
        }
        let free = (0..MAX_PATHS as u32).find(|s| !self.slots.values().any(|v| v == s));
        let slot = free.ok_or_else(|| io::Error::other("too many paths for the fast path"))?;
        self.slots.insert(path, slot);
        Ok(slot)
    }

    /// Frees the slots of paths the peer no longer has (a reload removed
    /// them), for the paths a later reload adds.
    fn keep_slots(&mut self, paths: &[Route]) {
        self.slots
            .retain(|id, _| paths.iter().any(|r| r.path == *id));
    }
}

/// What the fast path moved on one path since it was last asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl FastPath {
    /// Loads the programs and attaches the sending one to the egress of
    /// interface `tun` (the peer's TUN), disabled until [`FastPath::set`]
    /// gives it a path; [`FastPath::receive`] attaches the receiving one.
    pub fn attach(tun: u32) -> io::Result<FastPath> {
        let context = |what: &'static str| {
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let config = map_create(MAP_ARRAY, 4, cfg::LEN, 1).map_err(context("creating its map"))?;
        let tx_stats = map_create(MAP_PERCPU_ARRAY, 4, 16, MAX_PATHS)
            .map_err(context("creating its counters"))?;
        let rx_paths = map_create(MAP_HASH, RX_KEY_LEN, 8, MAX_PATHS)
            .map_err(context("creating its receive map"))?;
        let rx_stats = map_create(MAP_PERCPU_ARRAY, 4, 16, MAX_PATHS)
            .map_err(context("creating its receive counters"))?;
        let assembled = |p: Option<Vec<Insn>>| {
            p.ok_or_else(|| io::Error::other("fast path program did not assemble"))
        };
        let egress = assembled(encap_program(config.as_raw_fd(), tx_stats.as_raw_fd()))?;
        let egress = prog_load(&egress).map_err(context("loading the sending program"))?;
        let ingress = assembled(decap_program(rx_paths.as_raw_fd(), rx_stats.as_raw_fd()))?;
        let rx_prog = prog_load(&ingress).map_err(context("loading the receiving program"))?;
        let link = link_create(&egress, tun, ATTACH_TCX_EGRESS)
            .map_err(context("attaching it to the TUN's egress (tcx)"))?;
        Ok(FastPath {
            tun,
            config,
            tx_stats,
            rx_paths,
            rx_stats,
            rx_prog,
            _egress: link,
            cpus: possible_cpus()?,
            state: Mutex::new(State::default()),
        })
    }

    /// Sends on `route` from now on (`None`: hands everything to the
    /// lanes). Writes the map only when the route changed, or `force`.
    pub fn set(&self, route: Option<Route>, force: bool) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.route == route && !force {
            return Ok(());
        }
        let value = match &route {
            None => [0u8; cfg::LEN],
            Some(r) => {
                let Some(ifindex) = interface_of(*r.local.ip())? else {
                    // The local address is gone: the lanes' sends fail and
                    // tell the BFD thread.
                    map_update(&self.config, &0u32.to_ne_bytes(), &[0u8; cfg::LEN])?;
                    st.route = None;
                    return Err(io::Error::new(
                        io::ErrorKind::AddrNotAvailable,
                        format!("no interface holds {}", r.local.ip()),
                    ));
                };
                let slot = st.slot(r.path)?;
                config_value(r, ifindex, slot)
            }
        };
        map_update(&self.config, &0u32.to_ne_bytes(), &value)?;
        st.route = route;
        Ok(())
    }

    /// Receives the datagrams of `paths` (the peer's, all of them) in the
    /// kernel: the receiving program on each one's interface, and each one
    /// in its map. A path whose local address no interface holds is left
    /// to the lanes.
    pub fn receive(&self, paths: &[Route]) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut keys = Vec::with_capacity(paths.len());
        let mut result = Ok(());
        for r in paths {
            let Some(ifindex) = interface_of(*r.local.ip())? else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(e) = st.ingress.entry(ifindex) {
                match link_create(&self.rx_prog, ifindex, ATTACH_TCX_INGRESS) {
                    Ok(link) => {
                        e.insert(link);
                    }
                    Err(e) => {
                        result = Err(e);
                        continue;
                    }
                }
            }
            let slot = st.slot(r.path)?;
            let mut value = [0u8; 8];
            value[..4].copy_from_slice(&slot.to_ne_bytes());
            value[4..].copy_from_slice(&self.tun.to_ne_bytes());
            let key = rx_key(r.local, r.remote);
            map_update(&self.rx_paths, &key, &value)?;
            keys.push(key);
        }
        for gone in st.keys.iter().filter(|k| !keys.contains(k)) {
            map_delete(&self.rx_paths, gone)?;
        }
        st.keys = keys;
        st.keep_slots(paths);
        result
    }

    fn totals(&self, map: &OwnedFd, slot: u32) -> io::Result<(u64, u64)> {
        let mut values = vec![0u8; 16 * self.cpus];
        map_lookup(map, slot, &mut values)?;
        let (mut packets, mut bytes) = (0u64, 0u64);
        for v in values.chunks_exact(16) {
            let (p, b) = v.split_at(8);
            packets = packets.wrapping_add(u64::from_ne_bytes(p.try_into().unwrap_or_default()));
            bytes = bytes.wrapping_add(u64::from_ne_bytes(b.try_into().unwrap_or_default()));
        }
        Ok((packets, bytes))
    }

    /// What the programs moved on `path` since the last call.
    pub fn take(&self, path: PathId) -> io::Result<Moved> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&slot) = st.slots.get(&path) else {
            return Ok(Moved::default());
        };
        let tx = self.totals(&self.tx_stats, slot)?;
        let rx = self.totals(&self.rx_stats, slot)?;
        let seen = st.seen.entry(slot).or_default();
        let moved = Moved {
            tx_packets: tx.0.wrapping_sub(seen[0].0),
            tx_bytes: tx.1.wrapping_sub(seen[0].1),
            rx_packets: rx.0.wrapping_sub(seen[1].0),
            rx_bytes: rx.1.wrapping_sub(seen[1].1),
        };
        *seen = [tx, rx];
        Ok(moved)
    }
}

/// The route for `local` -> `remote`, when the fast path can carry it
/// (IPv4 on both ends, a concrete local address).
pub fn route(
    path: PathId,
    local: SocketAddr,
    remote: SocketAddr,
    dscp: Option<u8>,
) -> Option<Route> {
    match (local, remote) {
        (SocketAddr::V4(local), SocketAddr::V4(remote))
            if !local.ip().is_unspecified() && !remote.ip().is_unspecified() =>
        {
            Some(Route {
                path,
                local,
                remote,
                dscp,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_assembles_with_every_jump_inside_it() {
        let p = encap_program(3, 4).expect("assembles");
        let n = p.len() as i64;
        for (i, insn) in p.iter().enumerate() {
            let class = insn.code & 0x07;
            let op = insn.code & 0xf0;
            // Jumps other than call and exit land inside the program.
            if class == 0x05 && op != 0x80 && op != 0x90 {
                let to = i as i64 + 1 + i64::from(insn.off);
                assert!((0..n).contains(&to), "jump at {i} to {to} of {n}");
            }
        }
        // It ends in exits, and both map loads name their maps.
        assert_eq!(p.last().map(|i| i.code), Some(0x95));
        let maps: Vec<i32> = p
            .iter()
            .filter(|i| i.code == 0x18 && i.regs >> 4 == 1)
            .map(|i| i.imm)
            .collect();
        assert_eq!(maps, vec![3, 4]);
    }

    #[test]
    fn a_missing_label_is_an_error_not_a_bad_jump() {
        let mut a = Asm::default();
        a.jeq_imm(R0, 0, "nowhere");
        assert!(a.finish().is_none());
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
        let mut h = v[16..16 + OVERHEAD].to_vec();
        let total = inner + OVERHEAD as u32;
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
            (inner & v[cfg::TOS_MASK as usize]) | v[cfg::TOS_SET as usize]
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
        let mut st = State::default();
        assert_eq!(st.slot(PathId(0)).unwrap(), 0);
        assert_eq!(st.slot(PathId(1)).unwrap(), 1);
        assert_eq!(st.slot(PathId(0)).unwrap(), 0);
        // Reloads that replace path 1 again and again, far more often than
        // there are slots: the peer keeps two slots.
        for id in 2..(3 * MAX_PATHS as u16) {
            st.keep_slots(&[route(0), route(id)]);
            assert_eq!(st.slot(PathId(id)).unwrap(), 1, "path {id}");
        }
        // More paths at once than slots: refused.
        for id in 100..100 + MAX_PATHS as u16 - 2 {
            st.slot(PathId(id)).unwrap();
        }
        assert!(st.slot(PathId(999)).is_err());
    }

    #[test]
    fn only_ipv4_paths_with_a_local_address_take_the_fast_path() {
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
        .is_none());
    }
}
