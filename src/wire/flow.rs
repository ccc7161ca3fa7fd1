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
    pub fn parse(packet: &[u8]) -> Result<FlowKey, FlowError> {
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
    pub fn hash64(&self) -> u64 {
        let mut h = Mixer::new(u64::from(self.protocol));
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                h.add((u64::from(u32::from(s)) << 32) | u64::from(u32::from(d)));
            }
            (s, d) => {
                h.add_bytes(&ip_bytes(s));
                h.add_bytes(&ip_bytes(d));
            }
        }
        h.add((u64::from(self.src_port) << 16) | u64::from(self.dst_port));
        h.finish()
    }
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
