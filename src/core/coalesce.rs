//! Receive-side coalescing of TCP segments into super-packets, sans-IO.
//!
//! A path's receiving thread gets, per received message (UDP GRO), a run of
//! datagrams that usually are consecutive segments of one TCP flow: the
//! far gateway read them from its TUN as one super-packet and cut them at
//! the MSS. Handing them to the local TUN one by one would make the kernel
//! route, forward and deliver each 1.4 KiB piece; handed over as one
//! packet with a virtio-net header asking for segmentation offload, the
//! stack does that work once per 64 KiB, as it does for its own GRO.
//!
//! [`plan`] groups the inner packets (in arrival order) into [`Train`]s:
//! segments that Linux's own TCP GRO would merge (same addresses, ports,
//! IP and TCP header fields, consecutive sequence numbers, equal sizes
//! but the last, only ACK set with PSH allowed on the last, and a correct
//! TCP checksum). The checksum matters because a train's checksum is
//! computed afresh by the kernel: a segment damaged before it reached the
//! far gateway must not have its damage vouched for. So a segment joins a
//! train only if its checksum is good: known good (the far gateway computed
//! it, or its kernel had verified it, and said so in the overlay header,
//! see [`crate::core::wire::overlay::FLAG_CHECKSUM_OK`]) or checked here, as
//! Linux's GRO checks it. A damaged one is written alone, as it came, and
//! the receiving host drops it. [`Train::header`]
//! writes what goes in front of the train's payloads: the virtio-net
//! header, then the first segment's IP and TCP headers with the lengths of
//! the whole, a fresh IPv4 header checksum, and the TCP checksum field
//! holding the pseudo-header sum so that the kernel finishes it
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`). The payloads themselves are never
//! copied: the shell writes header and payload slices with one `writev`.
//! Anything else (a lone segment, other protocols) is a train of one,
//! written as it came, behind an all-zero virtio-net header.

pub use crate::core::segment::VNET_HDR_LEN;
use crate::core::segment::{fold, sum};
/// Longest header [`Train::header`] writes: virtio-net header, IPv6 (the
/// longer of the IP headers accepted) and TCP with full options.
pub const MAX_TRAIN_HEADER: usize = VNET_HDR_LEN + 40 + 60;

const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const TCP_FIN: u8 = 0x01;

/// Consecutive packets written to the TUN as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Train {
    /// Index of the first packet.
    pub first: usize,
    /// Number of packets (1: written as it is).
    pub count: usize,
    /// IP plus TCP header length of each packet.
    pub headers: usize,
    /// Payload bytes of every packet but the last (the segment size).
    pub segment: usize,
    /// Payload bytes of all packets.
    pub payload: usize,
    /// The last packet has PSH set.
    pub push: bool,
}

/// What [`plan`] needs to know of a TCP segment.
#[derive(Clone, Copy)]
struct Segment {
    v6: bool,
    ip_len: usize,
    tcp_len: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    id: u16,
    dont_fragment: bool,
}

impl Segment {
    /// A TCP segment with payload, without IP options or extension headers
    /// and with exact lengths; `None` for anything else.
    fn parse(p: &[u8]) -> Option<Segment> {
        let (v6, ip_len, id, dont_fragment) = match p.first()? >> 4 {
            4 => {
                let h = p.get(..20)?;
                let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
                let fragment = u16::from_be_bytes([h[6], h[7]]);
                if h[0] != 0x45 || h[9] != 6 || total != p.len() || fragment & 0x3fff != 0 {
                    return None;
                }
                let id = u16::from_be_bytes([h[4], h[5]]);
                (false, 20, id, fragment & 0x4000 != 0)
            }
            6 => {
                let h = p.get(..40)?;
                let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
                if h[6] != 6 || payload + 40 != p.len() {
                    return None;
                }
                (true, 40, 0, true)
            }
            _ => return None,
        };
        let tcp = p.get(ip_len..)?;
        let tcp_len = usize::from(tcp.get(12)? >> 4) * 4;
        if tcp_len < 20 || tcp.len() <= tcp_len {
            return None;
        }
        Some(Segment {
            v6,
            ip_len,
            tcp_len,
            payload: tcp.len() - tcp_len,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            flags: tcp[13],
            id,
            dont_fragment,
        })
    }
}

/// Whether `next` continues the train whose last packet is `prev`.
fn continues(prev: &[u8], p: &Segment, next: &[u8], n: &Segment, train: &Train) -> bool {
    if n.v6 != p.v6 || n.tcp_len != p.tcp_len || p.flags != TCP_ACK {
        return false;
    }
    if !(n.flags == TCP_ACK || n.flags == TCP_ACK | TCP_PSH) {
        return false;
    }
    // Every segment but the last is full-sized; the last may be shorter.
    if p.payload != train.segment || n.payload > train.segment {
        return false;
    }
    if n.seq != p.seq.wrapping_add(p.payload as u32) {
        return false;
    }
    let total = train.headers + train.payload + n.payload;
    let limit = if p.v6 { 65_535 + 40 } else { 65_535 };
    if total > limit {
        return false;
    }
    same_headers(prev, p, next)
}

/// The IP and TCP headers agree in everything but lengths, checksums,
/// IPv4 identification (which must count up unless DF is set), sequence
/// number and flags.
fn same_headers(prev: &[u8], p: &Segment, next: &[u8]) -> bool {
    let ip_same = if p.v6 {
        prev.get(..4) == next.get(..4) && prev.get(6..40) == next.get(6..40)
    } else {
        let id_ok = match (prev.get(6), next.get(6)) {
            (Some(a), Some(b)) if a == b => {
                let next_id = u16::from_be_bytes([next[4], next[5]]);
                p.dont_fragment || next_id == p.id.wrapping_add(1)
            }
            _ => false,
        };
        id_ok
            && prev.get(..2) == next.get(..2)
            && prev.get(8..10) == next.get(8..10)
            && prev.get(12..20) == next.get(12..20)
    };
    let (a, b) = (p.ip_len, p.ip_len + p.tcp_len);
    let tcp_same = prev.get(a..a + 4) == next.get(a..a + 4)
        && prev.get(a + 8..a + 13) == next.get(a + 8..a + 13)
        && prev.get(a + 14..a + 16) == next.get(a + 14..a + 16)
        && prev.get(a + 18..b) == next.get(a + 18..b);
    ip_same && tcp_same
}

/// Whether the TCP checksum of segment `p` (parsed as `s`) is correct.
fn checksum_ok(p: &[u8], s: &Segment) -> bool {
    let addrs = if s.v6 { p.get(8..40) } else { p.get(12..20) };
    match (addrs, p.get(s.ip_len..)) {
        (Some(addrs), Some(tcp)) => {
            let pseudo = sum(addrs, 0) + 6 + tcp.len() as u64;
            fold(sum(tcp, pseudo)) == 0xffff
        }
        _ => false,
    }
}

/// Whether the TCP checksum field of segment `p` (parsed as `s`) holds
/// only the pseudo-header sum: the checksum was left for an offload to
/// finish (`CHECKSUM_PARTIAL`), as a super-packet's is until it is cut.
fn checksum_left_to_offload(p: &[u8], s: &Segment) -> bool {
    let addrs = if s.v6 { p.get(8..40) } else { p.get(12..20) };
    let field = p.get(s.ip_len + 16..s.ip_len + 18);
    match (addrs, field) {
        (Some(addrs), Some(f)) => {
            let tcp_len = (p.len() - s.ip_len) as u64;
            u16::from_be_bytes([f[0], f[1]]) == fold(sum(addrs, 0) + 6 + tcp_len)
        }
        _ => false,
    }
}

/// Groups `packets` into trains, in order, into `out` (cleared first).
/// `trusted[i]` says that packet `i`'s checksum is known to be good (the
/// sender vouched for it); the others' are checked before they join a
/// train (only then: a packet that stays alone is not checked).
pub fn plan(packets: &[&[u8]], trusted: &[bool], out: &mut Vec<Train>) {
    out.clear();
    let good = |i: usize, p: &[u8], s: &Segment| {
        trusted.get(i).copied().unwrap_or(false) || checksum_ok(p, s)
    };
    // The last packet, if the next may join its train, and whether the
    // train's first packet is good (`None`: not checked yet). Each packet
    // is checked at most once.
    let mut last: Option<(usize, Segment)> = None;
    let mut first_good: Option<bool> = None;
    for (i, &pkt) in packets.iter().enumerate() {
        let seg = Segment::parse(pkt);
        let mut checked = None;
        if let (Some(train), Some((prev_i, prev)), Some(s)) = (out.last_mut(), last, seg) {
            let prev_pkt = packets.get(prev_i).copied().unwrap_or_default();
            if train.count > 0
                && continues(prev_pkt, &prev, pkt, &s, train)
                && *first_good.get_or_insert_with(|| good(prev_i, prev_pkt, &prev))
            {
                if good(i, pkt, &s) {
                    train.count += 1;
                    train.payload += s.payload;
                    train.push = s.flags & TCP_PSH != 0;
                    last = Some((i, s));
                    continue;
                }
                checked = Some(false);
            }
        }
        first_good = checked;
        out.push(match seg {
            Some(s) => Train {
                first: i,
                count: 1,
                headers: s.ip_len + s.tcp_len,
                segment: s.payload,
                payload: s.payload,
                push: s.flags & TCP_PSH != 0,
            },
            None => Train {
                first: i,
                count: 1,
                headers: 0,
                segment: 0,
                payload: pkt.len(),
                push: false,
            },
        });
        last = seg.map(|s| (i, s));
    }
}

impl Train {
    /// A TCP super-packet longer than `mtu` that arrived whole (a far
    /// fast path, [`crate::io::fastpath`], sends it as one UDP tunnel
    /// packet, and nothing on the way cut it: a veth pair, a virtual NIC
    /// passing offloads through), as the train of the segments that fit
    /// `mtu`: [`Train::header`] then writes the virtio-net header that has
    /// the kernel cut it, and the packet's payload follows. `None` if it is
    /// not such a packet.
    ///
    /// Its checksum is recomputed by the kernel, so, as for merging, it
    /// must be known good (`trusted`: the sender vouched for it), or be
    /// checked here, or have been left for an offload to finish (the field
    /// holds the pseudo-header sum), as a super-packet's is.
    pub fn whole(packet: &[u8], mtu: usize, trusted: bool) -> Option<Train> {
        let s = Segment::parse(packet)?;
        let headers = s.ip_len + s.tcp_len;
        let segment = mtu.checked_sub(headers).filter(|&n| n > 0)?;
        // ACK with PSH or FIN, which segmentation leaves on the last
        // segment only; not CWR, which would need the ECN segmentation type.
        if packet.len() <= mtu || s.flags & !(TCP_PSH | TCP_FIN) != TCP_ACK {
            return None;
        }
        if !(trusted || checksum_left_to_offload(packet, &s) || checksum_ok(packet, &s)) {
            return None;
        }
        Some(Train {
            first: 0,
            count: s.payload.div_ceil(segment),
            headers,
            segment,
            payload: s.payload,
            push: s.flags & TCP_PSH != 0,
        })
    }

    /// Writes the train's header into `out` from its first packet: for a
    /// train of one, an all-zero virtio-net header (the packet follows
    /// whole); for more, the virtio-net header asking for TCP segmentation
    /// and the merged IP and TCP headers (the payloads follow). Returns
    /// the header's length; 0 if `out` is too short or `first` is not the
    /// train's first packet.
    pub fn header(&self, first: &[u8], out: &mut [u8]) -> usize {
        if self.count < 2 {
            return match out.get_mut(..VNET_HDR_LEN) {
                Some(h) => {
                    h.fill(0);
                    VNET_HDR_LEN
                }
                None => 0,
            };
        }
        let Some(seg) = Segment::parse(first) else {
            return 0;
        };
        let len = VNET_HDR_LEN + self.headers;
        let (Some(out), Some(src)) = (out.get_mut(..len), first.get(..self.headers)) else {
            return 0;
        };
        let (vnet, ip) = out.split_at_mut(VNET_HDR_LEN);
        ip.copy_from_slice(src);
        let tcp_total = seg.tcp_len + self.payload;
        let gso_type = if seg.v6 {
            ip[4..6].copy_from_slice(&(tcp_total as u16).to_be_bytes());
            GSO_TCPV6
        } else {
            let total = (seg.ip_len + tcp_total) as u16;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[10..12].fill(0);
            let sum = !fold(sum(&ip[..20], 0));
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            GSO_TCPV4
        };
        let t = seg.ip_len;
        if self.push {
            ip[t + 13] |= TCP_PSH;
        }
        // The pseudo-header sum, not complemented: the kernel adds the TCP
        // header and payload and complements (CHECKSUM_PARTIAL).
        let addrs = if seg.v6 { &ip[8..40] } else { &ip[12..20] };
        let pseudo = sum(addrs, 0) + 6 + tcp_total as u64;
        ip[t + 16..t + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
        vnet[0] = NEEDS_CSUM;
        vnet[1] = gso_type;
        vnet[2..4].copy_from_slice(&(self.headers as u16).to_ne_bytes());
        vnet[4..6].copy_from_slice(&(self.segment as u16).to_ne_bytes());
        vnet[6..8].copy_from_slice(&(seg.ip_len as u16).to_ne_bytes());
        vnet[8..10].copy_from_slice(&16u16.to_ne_bytes());
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// A TCP/IPv4 segment of `len` payload bytes at `seq` (payload bytes
    /// are the low byte of their sequence number).
    fn seg4(seq: u32, len: usize, id: u16, psh: bool) -> Vec<u8> {
        let b = PacketBuilder::ipv4([198, 18, 10, 1], [198, 18, 30, 2], 63)
            .tcp(40_000, 5201, seq, 1000)
            .ack(77);
        let b = if psh { b.psh() } else { b };
        let payload: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        // Give the ids, and clear DF: ids must then count up.
        out[4..6].copy_from_slice(&id.to_be_bytes());
        out[6] &= !0x40;
        out[10..12].fill(0);
        let sum = !fold(sum(&out[..20], 0));
        out[10..12].copy_from_slice(&sum.to_be_bytes());
        out
    }

    fn seg6(seq: u32, len: usize) -> Vec<u8> {
        let b = PacketBuilder::ipv6(
            [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            63,
        )
        .tcp(40_000, 5201, seq, 1000)
        .ack(77);
        let payload: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        out
    }

    /// What the kernel would do with a train: cut it back into segments
    /// (headers from the train header, lengths and sequence numbers
    /// advanced) and compute the checksum it was asked for.
    fn resegment(header: &[u8], payloads: &[u8]) -> Vec<Vec<u8>> {
        let vnet = &header[..VNET_HDR_LEN];
        let hdr_len = usize::from(u16::from_ne_bytes([vnet[2], vnet[3]]));
        let gso = usize::from(u16::from_ne_bytes([vnet[4], vnet[5]]));
        let ip_len = usize::from(u16::from_ne_bytes([vnet[6], vnet[7]]));
        let template = &header[VNET_HDR_LEN..VNET_HDR_LEN + hdr_len];
        let v6 = template[0] >> 4 == 6;
        let seq0 = u32::from_be_bytes(template[ip_len + 4..ip_len + 8].try_into().unwrap());
        let id0 = u16::from_be_bytes([template[4], template[5]]);
        payloads
            .chunks(gso)
            .enumerate()
            .map(|(i, chunk)| {
                let mut p = template.to_vec();
                p.extend_from_slice(chunk);
                let seq = seq0.wrapping_add((i * gso) as u32);
                p[ip_len + 4..ip_len + 8].copy_from_slice(&seq.to_be_bytes());
                if (i + 1) * gso < payloads.len() {
                    p[ip_len + 13] &= !TCP_PSH;
                }
                if v6 {
                    let l = (p.len() - 40) as u16;
                    p[4..6].copy_from_slice(&l.to_be_bytes());
                } else {
                    let total = p.len() as u16;
                    p[2..4].copy_from_slice(&total.to_be_bytes());
                    p[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
                    p[10..12].fill(0);
                    let s = !fold(sum(&p[..20], 0));
                    p[10..12].copy_from_slice(&s.to_be_bytes());
                }
                let tcp_len = p.len() - ip_len;
                let addrs = if v6 { &p[8..40] } else { &p[12..20] };
                let pseudo = sum(addrs, 0) + 6 + tcp_len as u64;
                p[ip_len + 16..ip_len + 18].fill(0);
                let s = !fold(sum(&p[ip_len..], pseudo));
                p[ip_len + 16..ip_len + 18].copy_from_slice(&s.to_be_bytes());
                p
            })
            .collect()
    }

    #[test]
    fn a_whole_super_packet_is_cut_at_the_mtu() {
        let mtu = 1456;
        let whole = seg4(1000, 5000, 7, true);
        let t = Train::whole(&whole, mtu, false).expect("a TCP super-packet");
        assert_eq!((t.segment, t.count, t.headers), (mtu - 40, 4, 40));
        let mut hdr = [0u8; MAX_TRAIN_HEADER];
        let n = t.header(&whole, &mut hdr);
        assert_eq!(hdr[1], GSO_TCPV4);
        let back = resegment(&hdr[..n], &whole[t.headers..]);
        let want: Vec<Vec<u8>> = (0..4u16)
            .map(|i| {
                let seq = 1000 + u32::from(i) * 1416;
                let len = if i == 3 { 5000 - 3 * 1416 } else { 1416 };
                seg4(seq, len, 7 + i, i == 3)
            })
            .collect();
        assert_eq!(back, want);
        // With its checksum left to an offload (the pseudo-header sum), as a
        // fast path sends it: cut all the same.
        let mut partial = whole.clone();
        let pseudo = fold(sum(&partial[12..20], 0) + 6 + (partial.len() - 20) as u64);
        partial[36..38].copy_from_slice(&pseudo.to_be_bytes());
        assert_eq!(Train::whole(&partial, mtu, false), Some(t));
        // A damaged one is left as it is (the kernel would vouch for it by
        // computing its checksum afresh), unless its sender vouched for it.
        let mut damaged = whole.clone();
        *damaged.last_mut().unwrap() ^= 0x10;
        assert!(Train::whole(&damaged, mtu, false).is_none());
        assert!(Train::whole(&damaged, mtu, true).is_some());
        // One that fits, and anything but a TCP segment with ACK, stays as it is.
        assert!(Train::whole(&seg4(0, 1000, 1, false), mtu, true).is_none());
        let mut syn = whole.clone();
        syn[20 + 13] |= 0x02;
        assert!(Train::whole(&syn, mtu, true).is_none());
        assert!(Train::whole(&whole[..20], mtu, true).is_none());
        assert!(Train::whole(&whole, 30, true).is_none());
    }

    /// As Linux's GRO refuses to, a train never mixes ECN codepoints: a
    /// segment whose ECN field a decapsulation set to CE (RFC 6040) starts
    /// a train of its own, so its mark reaches the receiver; so does the
    /// segment after it. IPv4 and IPv6.
    #[test]
    fn trains_do_not_mix_ecn_codepoints() {
        let mut segs: Vec<Vec<u8>> = (0..5u16)
            .map(|i| seg4(u32::from(i) * 1000, 1000, i + 1, false))
            .collect();
        for s in &mut segs {
            s[1] = crate::core::ecn::ECT0;
        }
        let mut ce = segs.clone();
        crate::core::ecn::decapsulate(crate::core::ecn::CE, &mut ce[2]).unwrap();
        assert_eq!(ce[2][1], crate::core::ecn::CE);
        let pkts: Vec<&[u8]> = ce.iter().map(|s| &s[..]).collect();
        let mut trains = Vec::new();
        plan(&pkts, &[true; 5], &mut trains);
        let counts: Vec<usize> = trains.iter().map(|t| t.count).collect();
        assert_eq!(counts, [2, 1, 2]);
        let pkts: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        plan(&pkts, &[true; 5], &mut trains);
        assert_eq!(trains.len(), 1, "same ECN: one train");
        let mut v6: Vec<Vec<u8>> = (0..3u32).map(|i| seg6(i * 1000, 1000)).collect();
        for s in &mut v6 {
            s[1] |= crate::core::ecn::ECT0 << 4;
        }
        crate::core::ecn::decapsulate(crate::core::ecn::CE, &mut v6[1]).unwrap();
        let pkts: Vec<&[u8]> = v6.iter().map(|s| &s[..]).collect();
        plan(&pkts, &[true; 3], &mut trains);
        let counts: Vec<usize> = trains.iter().map(|t| t.count).collect();
        assert_eq!(counts, [1, 1, 1]);
    }

    fn check_round_trip(segs: &[Vec<u8>], want_counts: &[usize]) {
        let pkts: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        let mut trains = Vec::new();
        plan(&pkts, &[], &mut trains);
        let counts: Vec<usize> = trains.iter().map(|t| t.count).collect();
        assert_eq!(counts, want_counts);
        let mut back = Vec::new();
        for t in &trains {
            let mut hdr = [0u8; MAX_TRAIN_HEADER];
            let n = t.header(pkts[t.first], &mut hdr);
            assert!(n >= VNET_HDR_LEN);
            if t.count == 1 {
                assert_eq!(hdr[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
                back.push(pkts[t.first].to_vec());
                continue;
            }
            let mut payloads = Vec::new();
            for p in &pkts[t.first..t.first + t.count] {
                payloads.extend_from_slice(&p[t.headers..]);
            }
            assert_eq!(payloads.len(), t.payload);
            back.extend(resegment(&hdr[..n], &payloads));
        }
        assert_eq!(
            back, segs,
            "segments differ after coalescing and cutting again"
        );
    }

    #[test]
    fn consecutive_segments_make_one_train_that_cuts_back_exactly() {
        let segs: Vec<Vec<u8>> = (0..5u32)
            .map(|i| seg4(1000 + i * 1400, 1400, 7 + i as u16, false))
            .chain([seg4(1000 + 5 * 1400, 300, 12, true)])
            .collect();
        check_round_trip(&segs, &[6]);
    }

    #[test]
    fn ipv6_segments_coalesce() {
        let segs: Vec<Vec<u8>> = (0..4u32).map(|i| seg6(5 + i * 1200, 1200)).collect();
        check_round_trip(&segs, &[4]);
    }

    #[test]
    fn breaks_on_gaps_flags_sizes_and_other_flows() {
        // A sequence gap.
        let segs = vec![seg4(0, 100, 1, false), seg4(200, 100, 2, false)];
        check_round_trip(&segs, &[1, 1]);
        // PSH ends a train.
        let segs = vec![
            seg4(0, 100, 1, true),
            seg4(100, 100, 2, false),
            seg4(200, 100, 3, false),
        ];
        check_round_trip(&segs, &[1, 2]);
        // A short segment ends a train; a bigger one cannot follow it.
        let segs = vec![
            seg4(0, 100, 1, false),
            seg4(100, 50, 2, false),
            seg4(150, 100, 3, false),
        ];
        check_round_trip(&segs, &[2, 1]);
        // IPv4 ids must count up (DF is not set here).
        let segs = vec![seg4(0, 100, 1, false), seg4(100, 100, 9, false)];
        check_round_trip(&segs, &[1, 1]);
        // Another flow (port), a pure ACK, and not TCP at all.
        let mut other = seg4(100, 100, 2, false);
        other[20] ^= 1;
        let ack = seg4(100, 0, 2, false);
        let udp = crate::core::wire::flow::tests::udp4([198, 18, 0, 1], [198, 18, 0, 2], 1, 2, 30);
        let segs = [seg4(0, 100, 1, false), other, ack, udp];
        let pkts: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        let mut trains = Vec::new();
        plan(&pkts, &[], &mut trains);
        assert_eq!(
            trains.iter().map(|t| t.count).collect::<Vec<_>>(),
            [1, 1, 1, 1]
        );
    }

    /// `p` with one payload bit flipped (its checksum now wrong).
    fn damaged(mut p: Vec<u8>) -> Vec<u8> {
        if let Some(b) = p.last_mut() {
            *b ^= 0x10;
        }
        p
    }

    #[test]
    fn a_damaged_segment_is_not_merged_unless_vouched_for() {
        let segs: Vec<Vec<u8>> = (0..5u32)
            .map(|i| {
                let s = seg4(i * 100, 100, i as u16, false);
                if i == 2 {
                    damaged(s)
                } else {
                    s
                }
            })
            .collect();
        let pkts: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        let mut trains = Vec::new();
        // Checked here: the damaged one goes alone, as it came.
        plan(&pkts, &[], &mut trains);
        let shape: Vec<(usize, usize)> = trains.iter().map(|t| (t.first, t.count)).collect();
        assert_eq!(shape, [(0, 2), (2, 1), (3, 2)]);
        let mut hdr = [0u8; MAX_TRAIN_HEADER];
        assert_eq!(trains[1].header(pkts[2], &mut hdr), VNET_HDR_LEN);
        assert_eq!(
            hdr[..VNET_HDR_LEN],
            [0; VNET_HDR_LEN],
            "no checksum asked for"
        );
        // A damaged first segment does not start a train either.
        plan(&pkts[2..], &[], &mut trains);
        let shape: Vec<(usize, usize)> = trains.iter().map(|t| (t.first, t.count)).collect();
        assert_eq!(shape, [(0, 1), (1, 2)]);
        // Vouched for by the sender: not checked again, merged.
        plan(&pkts, &[true; 5], &mut trains);
        assert_eq!(trains.iter().map(|t| t.count).collect::<Vec<_>>(), [5]);
        // IPv6 alike.
        let segs = [seg6(0, 100), damaged(seg6(100, 100)), seg6(200, 100)];
        let pkts: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        plan(&pkts, &[], &mut trains);
        assert_eq!(
            trains.iter().map(|t| t.count).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        plan(&pkts, &[false, true, false], &mut trains);
        assert_eq!(trains.iter().map(|t| t.count).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn never_grows_past_the_ip_length_limit() {
        let segs: Vec<Vec<u8>> = (0..50u32)
            .map(|i| seg4(i * 1400, 1400, i as u16, false))
            .collect();
        let pkts: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
        let mut trains = Vec::new();
        plan(&pkts, &[], &mut trains);
        assert!(trains.iter().all(|t| t.headers + t.payload <= 65_535));
        assert_eq!(trains.iter().map(|t| t.count).sum::<usize>(), 50);
        assert_eq!(trains.len(), 2);
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = crate::core::rng::Rng::new(5);
        let base = seg4(0, 64, 1, false);
        for _ in 0..20_000 {
            let mut p = base.clone();
            let cut = rng.below(p.len() as u64 + 1) as usize;
            p.truncate(cut);
            if let Some(b) = p.get_mut(rng.below(64) as usize) {
                *b = rng.next_u64() as u8;
            }
            let pkts = [&base[..], &p[..], &p[..]];
            let mut trains = Vec::new();
            plan(&pkts, &[], &mut trains);
            for t in &trains {
                let mut hdr = [0u8; MAX_TRAIN_HEADER];
                let _ = t.header(pkts[t.first], &mut hdr);
            }
        }
    }
}
