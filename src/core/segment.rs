//! Transmit-side segmentation of TUN super-packets, sans-IO.
//!
//! With offloads, a TUN read yields a virtio-net header and a packet that
//! may be a TCP or UDP "super-packet" of up to 64 KiB, to be cut into
//! segments of `gso_size` payload bytes before it goes on a path (the far
//! gateway merges them again, see [`crate::core::coalesce`]). [`Cut::of`] reads the
//! virtio-net header and says what the packet needs:
//!
//! - nothing ([`Cut::Whole`]);
//! - its transport checksum finished ([`Cut::Finish`], see [`finish_checksum`]):
//!   the kernel left the pseudo-header sum in the checksum field
//!   (`VIRTIO_NET_HDR_F_NEEDS_CSUM`);
//! - cutting ([`Cut::Segments`]): [`Segments::header`] writes one segment's
//!   IP and transport headers into a small buffer (IPv4 total length,
//!   identification and header checksum; IPv6 payload length; TCP sequence
//!   number and flags, or UDP length; the transport checksum over header
//!   and payload) and says where its payload lies in the super-packet.
//!
//! The sending thread sends each segment as two pieces of one datagram,
//! headers and payload, so the payload is never copied in user space: the
//! kernel's copy into the socket buffer is the only one. The rules are the
//! kernel's own (`tcp_gso_segment`, `__udp_gso_segment`): identification
//! counts up from the first segment, CWR stays on the first segment only,
//! FIN and PSH on the last only.

use std::ops::Range;

/// Length of the virtio-net header in front of every TUN packet with
/// offloads (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = 10;
/// Longest IP plus transport header a super-packet may have (IPv6 with
/// extension headers and TCP with full options fit easily).
pub const MAX_HEADERS: usize = 256;

const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr` as the TUN hands it over (host byte order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Whether the packet's transport checksum is known to be good once
    /// [`Cut`] has been done: the kernel left it (or, for a super-packet,
    /// the segments' checksums) to be computed (`NEEDS_CSUM`), or had
    /// verified it (`DATA_VALID`). Otherwise nobody has checked it.
    pub fn checksum_known(&self) -> bool {
        self.flags & (NEEDS_CSUM | DATA_VALID) != 0
    }

    /// Reads the header from the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHeader> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }
}

/// What a packet read from the TUN needs before it can be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Nothing: it is a complete packet.
    Whole,
    /// Its transport checksum, at `start + offset`, is to be finished over
    /// the bytes from `start` on ([`finish_checksum`]).
    Finish { start: usize, offset: usize },
    /// It is to be cut into segments.
    Segments(Segments),
}

/// Why a packet from the TUN cannot be cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// How a super-packet is cut: every segment carries the first `headers`
/// bytes (rewritten) and `size` bytes of payload, the last one the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    v6: bool,
    tcp: bool,
    /// Where the transport header starts.
    transport: usize,
    /// IP plus transport header length.
    headers: usize,
    /// Payload bytes per segment.
    size: usize,
    /// Length of the super-packet.
    total: usize,
    count: usize,
}

impl Cut {
    /// What `packet` (read behind `vnet`) needs.
    pub fn of(vnet: &VnetHeader, packet: &[u8]) -> Result<Cut, Malformed> {
        let gso = vnet.gso_type & !GSO_ECN;
        let start = usize::from(vnet.csum_start);
        let offset = usize::from(vnet.csum_offset);
        if gso == GSO_NONE {
            if vnet.flags & NEEDS_CSUM == 0 {
                return Ok(Cut::Whole);
            }
            if start + offset + 2 > packet.len() {
                return Err(Malformed);
            }
            return Ok(Cut::Finish { start, offset });
        }
        let v6 = match packet.first().map(|b| b >> 4) {
            Some(4) => false,
            Some(6) => true,
            _ => return Err(Malformed),
        };
        let tcp = match (gso, v6) {
            (GSO_TCPV4, false) | (GSO_TCPV6, true) => true,
            (GSO_UDP_L4, _) => false,
            _ => return Err(Malformed),
        };
        let ip_min = if v6 { 40 } else { 20 };
        if vnet.flags & NEEDS_CSUM == 0 || start < ip_min || offset != if tcp { 16 } else { 6 } {
            return Err(Malformed);
        }
        if !v6 && usize::from(packet[0] & 0x0f) * 4 != start {
            return Err(Malformed);
        }
        // The kernel's hdr_len is the linear part of its buffer, not the
        // header length: the headers are worked out from the packet.
        let transport_len = match tcp {
            true => usize::from(packet.get(start + 12).ok_or(Malformed)? >> 4) * 4,
            false => 8,
        };
        let headers = start + transport_len;
        let size = usize::from(vnet.gso_size);
        let transport_min = if tcp { 20 } else { 8 };
        if transport_len < transport_min
            || headers > packet.len()
            || headers > MAX_HEADERS
            || size == 0
        {
            return Err(Malformed);
        }
        if headers + size > usize::from(u16::MAX) + if v6 { 40 } else { 0 } {
            return Err(Malformed);
        }
        let payload = packet.len() - headers;
        Ok(Cut::Segments(Segments {
            v6,
            tcp,
            transport: start,
            headers,
            size,
            total: packet.len(),
            count: payload.div_ceil(size).max(1),
        }))
    }
}

impl Segments {
    /// How many segments the super-packet makes.
    pub fn count(&self) -> usize {
        self.count
    }

    /// IP plus transport header length of every segment.
    pub fn headers(&self) -> usize {
        self.headers
    }

    /// Payload bytes of every segment but the last.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Writes segment `i`'s headers into `out[..self.headers()]` from the
    /// super-packet `packet`, and returns where its payload lies in
    /// `packet`; `None` if `i` is out of range or a buffer too short.
    pub fn header(&self, packet: &[u8], i: usize, out: &mut [u8]) -> Option<Range<usize>> {
        if i >= self.count || packet.len() != self.total {
            return None;
        }
        let from = self.headers + i * self.size;
        let to = (from + self.size).min(self.total);
        let payload = packet.get(from..to)?;
        let out = out.get_mut(..self.headers)?;
        out.copy_from_slice(packet.get(..self.headers)?);
        let seg_len = self.headers + payload.len();
        let t = self.transport;
        let transport_len = seg_len - t;
        if self.v6 {
            out[4..6].copy_from_slice(&((seg_len - 40) as u16).to_be_bytes());
        } else {
            let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(i as u16);
            out[4..6].copy_from_slice(&id.to_be_bytes());
            out[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
            out[10..12].fill(0);
            let sum = !fold(sum(&out[..t], 0));
            out[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let last = i + 1 == self.count;
        let (proto, csum_at) = if self.tcp {
            let seq = u32::from_be_bytes([out[t + 4], out[t + 5], out[t + 6], out[t + 7]])
                .wrapping_add((i * self.size) as u32);
            out[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
            if i > 0 {
                out[t + 13] &= !TCP_CWR;
            }
            if !last {
                out[t + 13] &= !(TCP_FIN | TCP_PSH);
            }
            (6u8, t + 16)
        } else {
            out[t + 4..t + 6].copy_from_slice(&(transport_len as u16).to_be_bytes());
            (17u8, t + 6)
        };
        out[csum_at..csum_at + 2].fill(0);
        let addrs = if self.v6 { &out[8..40] } else { &out[12..20] };
        let pseudo = sum(addrs, 0) + u64::from(proto) + transport_len as u64;
        let mut csum = !fold(sum(payload, sum(&out[t..], pseudo)));
        if !self.tcp && csum == 0 {
            csum = 0xffff;
        }
        out[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
        Some(from..to)
    }
}

/// Finishes the transport checksum of a packet the kernel handed over with
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the field at `start + offset` holds the
/// pseudo-header sum, to which the bytes from `start` on are added.
pub fn finish_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), Malformed> {
    let at = start + offset;
    if at + 2 > packet.len() {
        return Err(Malformed);
    }
    let mut csum = !fold(sum(packet.get(start..).ok_or(Malformed)?, 0));
    // A UDP checksum of 0 means "none": the kernel sends all ones instead.
    if offset == 6 && csum == 0 {
        csum = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

/// The one's-complement sum of `bytes` (big-endian 16-bit words, a last odd
/// byte as the high half) added to `acc`, not folded. `bytes` must start
/// at an even offset of what is summed.
///
/// The bulk is summed as little-endian 32-bit words into four 64-bit
/// accumulators, 16 bytes a step (which the compiler vectorises); byte
/// order only swaps the halves of the folded sum, so swapping back gives
/// the big-endian sum.
pub fn sum(bytes: &[u8], acc: u64) -> u64 {
    let word =
        |w: &[u8], k: usize| u64::from(u32::from_le_bytes([w[k], w[k + 1], w[k + 2], w[k + 3]]));
    let mut lanes = [0u64; 4];
    let mut blocks = bytes.chunks_exact(16);
    for b in &mut blocks {
        for (k, lane) in lanes.iter_mut().enumerate() {
            *lane += word(b, 4 * k);
        }
    }
    let mut words = blocks.remainder().chunks_exact(4);
    let mut bulk: u64 = lanes.iter().sum();
    for w in &mut words {
        bulk += word(w, 0);
    }
    let mut acc = acc + u64::from(fold(bulk).swap_bytes());
    let mut rest = words.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a one's-complement sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// The straightforward one's-complement sum, for comparison.
    fn slow_sum(bytes: &[u8]) -> u16 {
        let mut acc = 0u64;
        for (i, b) in bytes.iter().enumerate() {
            acc += if i % 2 == 0 {
                u64::from(*b) << 8
            } else {
                u64::from(*b)
            };
        }
        fold(acc)
    }

    #[test]
    fn the_fast_sum_equals_the_plain_one_at_every_length() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect();
        for len in 0..data.len() {
            assert_eq!(
                fold(sum(&data[..len], 0)),
                slow_sum(&data[..len]),
                "len {len}"
            );
        }
        let ones = vec![0xffu8; 65_535];
        assert_eq!(fold(sum(&ones, 0)), slow_sum(&ones));
    }

    fn vnet(gso_type: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> VnetHeader {
        VnetHeader {
            flags: NEEDS_CSUM,
            gso_type,
            hdr_len: 0,
            gso_size,
            csum_start,
            csum_offset,
        }
    }

    fn ip_builder(v6: bool) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
        match v6 {
            false => PacketBuilder::ipv4([198, 18, 10, 1], [198, 18, 30, 2], 64),
            true => PacketBuilder::ipv6(
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            ),
        }
    }

    /// A TCP super-packet as the kernel hands it over: lengths of the
    /// whole, the pseudo-header sum in the checksum field.
    fn tcp_super(v6: bool, payload: usize, flags: u8) -> Vec<u8> {
        let b = ip_builder(v6);
        let b = b
            .tcp(40_000, 5201, 0xffff_f000, 1000)
            .ack(77)
            .options(&[etherparse::TcpOptionElement::Timestamp(1, 2)])
            .unwrap();
        let data: Vec<u8> = (0..payload).map(|i| (i * 13 % 256) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &data).unwrap();
        let ip = if v6 { 40 } else { 20 };
        out[ip + 13] = flags;
        if !v6 {
            out[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        }
        set_pseudo(&mut out, v6, 6, ip + 16);
        out
    }

    fn udp_super(v6: bool, payload: usize) -> Vec<u8> {
        let b = ip_builder(v6);
        let data: Vec<u8> = (0..payload).map(|i| (i * 31 % 256) as u8).collect();
        let mut out = Vec::new();
        b.udp(5000, 6000).write(&mut out, &data).unwrap();
        let ip = if v6 { 40 } else { 20 };
        set_pseudo(&mut out, v6, 17, ip + 6);
        out
    }

    fn set_pseudo(p: &mut [u8], v6: bool, proto: u8, at: usize) {
        let ip = if v6 { 40 } else { 20 };
        let addrs = if v6 { &p[8..40] } else { &p[12..20] };
        let pseudo = sum(addrs, 0) + u64::from(proto) + (p.len() - ip) as u64;
        let v = fold(pseudo);
        p[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// Cuts with [`Segments::header`] and with tun-rs's `gso_split`
    /// (another implementation of the same kernel rules) and compares.
    fn same_as_reference(packet: &[u8], v: VnetHeader) -> usize {
        let Cut::Segments(s) = Cut::of(&v, packet).unwrap() else {
            panic!("not cut");
        };
        let mut ours = Vec::new();
        for i in 0..s.count() {
            let mut h = [0u8; MAX_HEADERS];
            let r = s.header(packet, i, &mut h).unwrap();
            let mut seg = h[..s.headers()].to_vec();
            seg.extend_from_slice(&packet[r]);
            ours.push(seg);
        }
        let hdr = tun_rs::VirtioNetHdr {
            flags: v.flags,
            gso_type: v.gso_type,
            hdr_len: s.headers() as u16,
            gso_size: v.gso_size,
            csum_start: v.csum_start,
            csum_offset: v.csum_offset,
        };
        let mut input = packet.to_vec();
        let mut bufs = vec![vec![0u8; 70_000]; 200];
        let mut sizes = vec![0usize; 200];
        let v6 = packet[0] >> 4 == 6;
        let n = tun_rs::gso_split(&mut input, hdr, &mut bufs, &mut sizes, 0, v6).unwrap();
        assert_eq!(n, ours.len());
        for i in 0..n {
            assert_eq!(ours[i], bufs[i][..sizes[i]], "segment {i}");
        }
        n
    }

    #[test]
    fn tcp_super_packets_are_cut_as_the_reference_cuts_them() {
        for v6 in [false, true] {
            let ip = if v6 { 40 } else { 20 };
            let gso = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            for payload in [1, 1403, 1404, 1405, 64_000, 63_000 + 7] {
                for flags in [0x10, 0x18, 0x19, 0x90] {
                    let p = tcp_super(v6, payload, flags);
                    let n = same_as_reference(&p, vnet(gso, 1404, ip, 16));
                    assert_eq!(n, payload.div_ceil(1404));
                }
            }
        }
    }

    #[test]
    fn udp_super_packets_are_cut_as_the_reference_cuts_them() {
        for v6 in [false, true] {
            let ip = if v6 { 40 } else { 20 };
            for payload in [1, 1000, 1001, 30_000] {
                let p = udp_super(v6, payload);
                same_as_reference(&p, vnet(GSO_UDP_L4, 1000, ip, 6));
            }
        }
    }

    /// Every segment keeps the super-packet's DSCP and ECN field (as TSO
    /// does; only CWR is the first segment's alone), so its datagram's
    /// outer header carries them too. IPv4 and IPv6.
    #[test]
    fn segments_keep_the_tos_byte() {
        for v6 in [false, true] {
            let (ip, gso) = if v6 { (40, GSO_TCPV6) } else { (20, GSO_TCPV4) };
            let mut p = tcp_super(v6, 5000, 0x90);
            if v6 {
                p[0] = 0x6b;
                p[1] = (p[1] & 0x0f) | 0xa0; // traffic class 0xb8 | ECT(0)
            } else {
                p[1] = 0xba;
            }
            let Cut::Segments(s) = Cut::of(&vnet(gso, 1404, ip, 16), &p).unwrap() else {
                panic!("not cut");
            };
            for i in 0..s.count() {
                let mut h = [0u8; MAX_HEADERS];
                s.header(&p, i, &mut h).unwrap();
                assert_eq!(
                    crate::core::ecn::inner_tos(&h),
                    Some(0xba),
                    "v6 {v6} segment {i}"
                );
            }
        }
    }

    #[test]
    fn segments_carry_valid_checksums_and_the_right_flags() {
        let p = tcp_super(false, 5000, 0x99); // CWR, ACK, PSH, FIN
        let Cut::Segments(s) = Cut::of(&vnet(GSO_TCPV4, 1404, 20, 16), &p).unwrap() else {
            panic!("not cut");
        };
        assert_eq!(s.count(), 4);
        for i in 0..4 {
            let mut h = [0u8; MAX_HEADERS];
            let r = s.header(&p, i, &mut h).unwrap();
            let mut seg = h[..s.headers()].to_vec();
            seg.extend_from_slice(&p[r]);
            let parsed = etherparse::SlicedPacket::from_ip(&seg).unwrap();
            let Some(etherparse::TransportSlice::Tcp(tcp)) = parsed.transport else {
                panic!("no TCP");
            };
            let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
                panic!("no IPv4");
            };
            assert_eq!(
                ip.header().to_header().calc_header_checksum(),
                ip.header().header_checksum()
            );
            let want = tcp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), want, "segment {i}");
            assert_eq!(tcp.cwr(), i == 0);
            assert_eq!(tcp.fin(), i == 3);
            assert_eq!(tcp.psh(), i == 3);
            assert_eq!(
                ip.header().identification(),
                0xfffeu16.wrapping_add(i as u16)
            );
        }
        assert_eq!(s.header(&p, 4, &mut [0u8; MAX_HEADERS]), None);
        assert_eq!(s.header(&p, 0, &mut [0u8; 10]), None);
    }

    #[test]
    fn a_pending_checksum_is_finished() {
        let mut p = udp_super(false, 333);
        let want = {
            let parsed = etherparse::SlicedPacket::from_ip(&p).unwrap();
            let Some(etherparse::TransportSlice::Udp(u)) = parsed.transport else {
                panic!("no UDP");
            };
            let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
                panic!("no IPv4");
            };
            u.to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                .unwrap()
        };
        let v = vnet(GSO_NONE, 0, 20, 6);
        assert_eq!(
            Cut::of(&v, &p),
            Ok(Cut::Finish {
                start: 20,
                offset: 6
            })
        );
        finish_checksum(&mut p, 20, 6).unwrap();
        assert_eq!(u16::from_be_bytes([p[26], p[27]]), want);
        assert_eq!(finish_checksum(&mut p, 400, 6), Err(Malformed));
        let plain = VnetHeader::default();
        assert_eq!(Cut::of(&plain, &p), Ok(Cut::Whole));
    }

    #[test]
    fn bad_headers_are_refused_not_trusted() {
        let p = tcp_super(false, 3000, 0x10);
        let ok = vnet(GSO_TCPV4, 1404, 20, 16);
        assert!(matches!(Cut::of(&ok, &p), Ok(Cut::Segments(_))));
        for bad in [
            VnetHeader { gso_size: 0, ..ok },
            VnetHeader {
                csum_start: 24,
                ..ok
            },
            VnetHeader {
                csum_start: 10,
                ..ok
            },
            VnetHeader {
                csum_offset: 6,
                ..ok
            },
            VnetHeader {
                gso_type: GSO_TCPV6,
                ..ok
            },
            VnetHeader { gso_type: 3, ..ok },
            VnetHeader { flags: 0, ..ok },
            VnetHeader {
                gso_size: u16::MAX,
                ..ok
            },
        ] {
            assert_eq!(Cut::of(&bad, &p), Err(Malformed), "{bad:?}");
        }
        // A TCP header claiming 8 bytes.
        let mut short = p.clone();
        short[32] = 0x20;
        assert_eq!(Cut::of(&ok, &short), Err(Malformed));
        assert_eq!(Cut::of(&ok, &p[..25]), Err(Malformed));
        assert_eq!(Cut::of(&ok, &[]), Err(Malformed));
        assert_eq!(
            Cut::of(&vnet(GSO_NONE, 0, 20, 16), &p[..30]),
            Err(Malformed)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = crate::core::rng::Rng::new(7);
        for _ in 0..20_000 {
            let len = rng.below(200) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            if let Some(b) = p.first_mut() {
                *b = if rng.below(2) == 0 { 0x45 } else { 0x60 };
            }
            let mut h = [0u8; VNET_HDR_LEN];
            for b in h.iter_mut() {
                *b = rng.below(256) as u8;
            }
            h[1] = [0, 1, 4, 5, 0x81][rng.below(5) as usize];
            h[4] = h[4].max(1);
            let Some(v) = VnetHeader::parse(&h) else {
                continue;
            };
            match Cut::of(&v, &p) {
                Ok(Cut::Segments(s)) => {
                    let mut out = [0u8; MAX_HEADERS];
                    for i in 0..s.count() {
                        assert!(s.header(&p, i, &mut out).is_some());
                    }
                }
                Ok(Cut::Finish { start, offset }) => {
                    assert!(finish_checksum(&mut p, start, offset).is_ok());
                }
                _ => {}
            }
        }
    }
}
