//! The inner packet's flow key: what keeps one connection on one path.
//!
//! TCP, UDP, SCTP and UDP-Lite flows are keyed by addresses, protocol and
//! ports; other protocols and IP fragments by addresses and protocol, so
//! every fragment of a datagram follows the same path.

use etherparse::{IpNumber, IpSlice};
use std::net::IpAddr;
use thiserror::Error;

/// Identifies one flow of inner traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Why an inner packet has no flow key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum FlowError {
    #[error("not a well-formed IPv4 or IPv6 packet")]
    Malformed,
}

impl FlowKey {
    /// Reads the flow key of an IPv4 or IPv6 packet.
    ///
    /// An IPv4 packet without IPsec AH, the common case, is read by hand
    /// (the forwarding threads do this for every packet); anything else goes
    /// through the general parser, [`FlowKey::parse_general`], whose result
    /// the hand-written path matches exactly (a fuzz target checks).
    pub fn parse(packet: &[u8]) -> Result<FlowKey, FlowError> {
        match V4::read(packet) {
            Some(v4) => v4.map(V4::key),
            None => Self::parse_general(packet),
        }
    }

    /// The [`FlowKey::hash64`] of a packet's flow key, which is all the
    /// forwarding threads need: for IPv4 computed from the header's bytes
    /// without building the key.
    #[inline]
    pub fn hash_of(packet: &[u8]) -> Result<u64, FlowError> {
        if let Some(v4) = V4::read(packet) {
            return v4.map(|v| hash_v4(v.addrs, v.rest));
        }
        Self::parse_general(packet).map(|k| k.hash64())
    }

    /// Reads the flow key with a full IPv4/IPv6 parser (extension headers
    /// included).
    pub fn parse_general(packet: &[u8]) -> Result<FlowKey, FlowError> {
        let ip = IpSlice::from_slice(packet).map_err(|_| FlowError::Malformed)?;
        let payload = ip.payload();
        let protocol = payload.ip_number;
        let has_ports = !payload.fragmented
            && matches!(
                protocol,
                IpNumber::TCP | IpNumber::UDP | IpNumber::SCTP | IpNumber::UDP_LITE
            );
        let (src_port, dst_port) = match payload.payload.get(..4) {
            Some(p) if has_ports => (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ),
            _ => (0, 0),
        };
        Ok(FlowKey {
            src: ip.source_addr(),
            dst: ip.destination_addr(),
            protocol: protocol.0,
            src_port,
            dst_port,
        })
    }

    /// A well-mixed 64-bit hash of the key, the same in every process.
    ///
    /// IPv4 keys fit in two words and take two folded multiplications (the
    /// forwarding threads hash every packet); IPv6 keys go through the
    /// splitmix64 finaliser word by word.
    pub fn hash64(&self) -> u64 {
        let rest = (u64::from(self.protocol) << 32)
            | (u64::from(self.src_port) << 16)
            | u64::from(self.dst_port);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => hash_v4(
                (u64::from(u32::from(s)) << 32) | u64::from(u32::from(d)),
                rest,
            ),
            (s, d) => {
                let mut h = Mixer::new(rest);
                h.add_bytes(&ip_bytes(s));
                h.add_bytes(&ip_bytes(d));
                h.finish()
            }
        }
    }
}

/// IPsec AH: its header sits between IPv4 and the transport header.
const IPPROTO_AH: u8 = 51;

/// An IPv4 flow key as two words, read straight from the header.
#[derive(Clone, Copy)]
struct V4 {
    /// Source address (high half) and destination address.
    addrs: u64,
    /// Protocol (bits 32..40) and the two ports.
    rest: u64,
}

impl V4 {
    /// The IPv4 fast path. `None` hands the packet to the general parser
    /// (not IPv4, or IPsec AH between IPv4 and the transport header).
    #[inline]
    fn read(p: &[u8]) -> Option<Result<V4, FlowError>> {
        let h: &[u8; 20] = p.get(..20).and_then(|h| h.try_into().ok())?;
        if h[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(h[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
        if ihl < 20 || total < ihl || total > p.len() {
            return Some(Err(FlowError::Malformed));
        }
        let protocol = h[9];
        if protocol == IPPROTO_AH {
            return None;
        }
        // More fragments, or a fragment offset: not the whole datagram.
        let fragmented = (u16::from_be_bytes([h[6], h[7]]) & 0x3fff) != 0;
        let has_ports = !fragmented && matches!(protocol, 6 | 17 | 132 | 136);
        let ports = match p.get(ihl..total).and_then(|l4| l4.get(..4)) {
            Some(l4) if has_ports => u64::from(u32::from_be_bytes([l4[0], l4[1], l4[2], l4[3]])),
            _ => 0,
        };
        let src = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let dst = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        Some(Ok(V4 {
            addrs: (u64::from(src) << 32) | u64::from(dst),
            rest: (u64::from(protocol) << 32) | ports,
        }))
    }

    fn key(self) -> FlowKey {
        FlowKey {
            src: IpAddr::from(((self.addrs >> 32) as u32).to_be_bytes()),
            dst: IpAddr::from((self.addrs as u32).to_be_bytes()),
            protocol: (self.rest >> 32) as u8,
            src_port: (self.rest >> 16) as u16,
            dst_port: self.rest as u16,
        }
    }
}

/// The hash of an IPv4 key: two folded multiplications.
#[inline]
fn hash_v4(addrs: u64, rest: u64) -> u64 {
    let h = folded_mul(addrs ^ 0x243f_6a88_85a3_08d3, rest ^ 0x1319_8a2e_0370_7344);
    folded_mul(h ^ 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89)
}

fn ip_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A small, fast, deterministic hash (multiply-xorshift, as in splitmix64).
struct Mixer(u64);

impl Mixer {
    fn new(seed: u64) -> Self {
        Mixer(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    fn add(&mut self, v: u64) {
        self.0 = mix(self.0 ^ v);
    }
    fn add_bytes(&mut self, b: &[u8; 16]) {
        let (hi, lo) = b.split_at(8);
        let mut w = [0u8; 8];
        w.copy_from_slice(hi);
        self.add(u64::from_le_bytes(w));
        w.copy_from_slice(lo);
        self.add(u64::from_le_bytes(w));
    }
    fn finish(self) -> u64 {
        mix(self.0)
    }
}

/// The 128-bit product of `a` and `b`, its halves XORed: one
/// multiplication that lets every input bit reach the middle bits.
#[inline]
fn folded_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// splitmix64's finaliser: every input bit affects every output bit.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    pub(crate) fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, len: usize) -> Vec<u8> {
        let payload = vec![0xab; len];
        let b = PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, &payload).unwrap();
        out
    }

    #[test]
    fn udp_v4_key() {
        let p = udp4([198, 18, 10, 1], [198, 18, 30, 2], 4000, 5000, 32);
        let k = FlowKey::parse(&p).unwrap();
        assert_eq!(k.src, "198.18.10.1".parse::<IpAddr>().unwrap());
        assert_eq!(k.dst, "198.18.30.2".parse::<IpAddr>().unwrap());
        assert_eq!((k.protocol, k.src_port, k.dst_port), (17, 4000, 5000));
    }

    #[test]
    fn tcp_v6_key() {
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).tcp(1234, 443, 1, 1000);
        let mut p = Vec::new();
        b.write(&mut p, &[1, 2, 3]).unwrap();
        let k = FlowKey::parse(&p).unwrap();
        assert_eq!((k.protocol, k.src_port, k.dst_port), (6, 1234, 443));
        assert!(k.src.is_ipv6());
    }

    #[test]
    fn icmp_keyed_by_addresses() {
        let b = PacketBuilder::ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64).icmpv4_echo_request(1, 1);
        let mut p = Vec::new();
        b.write(&mut p, &[0; 8]).unwrap();
        let k = FlowKey::parse(&p).unwrap();
        assert_eq!((k.protocol, k.src_port, k.dst_port), (1, 0, 0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let p = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1, 2, 8);
        for len in 0..p.len() {
            assert!(FlowKey::parse(&p[..len]).is_err(), "len {len}");
        }
        assert!(FlowKey::parse(&[0x50; 40]).is_err());
    }

    /// Flows that differ in one field only (the usual case: one client,
    /// many source ports) still spread evenly: counted over 16 buckets by
    /// the top and by the bottom bits.
    #[test]
    fn hash_spreads_sequential_ports() {
        for shift in [0u32, 60] {
            let mut buckets = [0u32; 16];
            for port in 0..32_000u16 {
                let k = FlowKey {
                    src: "198.18.10.1".parse().unwrap(),
                    dst: "198.18.30.2".parse().unwrap(),
                    protocol: 6,
                    src_port: 10_000 + port,
                    dst_port: 443,
                };
                buckets[((k.hash64() >> shift) & 15) as usize] += 1;
            }
            for b in buckets {
                assert!((1800..2200).contains(&b), "shift {shift}: {buckets:?}");
            }
        }
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base =
            FlowKey::parse(&udp4([198, 18, 10, 1], [198, 18, 30, 2], 4000, 5000, 1)).unwrap();
        let mut seen = std::collections::HashSet::new();
        seen.insert(base.hash64());
        let mut k = base;
        k.src_port += 1;
        assert!(seen.insert(k.hash64()));
        let mut k = base;
        k.dst_port += 1;
        assert!(seen.insert(k.hash64()));
        let mut k = base;
        k.protocol = 6;
        assert!(seen.insert(k.hash64()));
        let mut k = base;
        k.dst = "198.18.30.3".parse().unwrap();
        assert!(seen.insert(k.hash64()));
        assert_eq!(base.hash64(), base.hash64());
    }
}
