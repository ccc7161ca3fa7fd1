//! QoS and ECN on the underlay, sans-IO: what a data datagram's outer TOS
//! (IPv4) or traffic class (IPv6) byte says, and RFC 6040 (normal mode) at
//! both ends of the overlay.
//!
//! Encapsulation ([`outer_tos`]): the outer ECN field is a copy of the
//! inner one; the outer DSCP is the inner one (`dscp = "inherit"`, as a
//! kernel tunnel's `tos inherit`) or a fixed value.
//!
//! Decapsulation ([`decapsulate`], the RFC's table 4, [`decap_ecn`]): the
//! inner ECN field is rewritten in place as the table says (an ECT packet
//! whose outer header was marked CE on the way becomes CE; an outer ECT(1)
//! turns an inner ECT(0) into ECT(1)), and a Not-ECT packet whose outer
//! header says CE is dropped ([`DropReason::CeOnNotEct`]): its sender
//! cannot react to the mark, and forwarding it unmarked would hide the
//! congestion. The outer ECN bits are outside the overlay header and so
//! outside the AEAD of a sealed peer, as in IPsec: the table applies after
//! the message is opened.

use crate::core::drop::DropReason;

/// ECN codepoints (the low two bits of the TOS / traffic class byte).
pub const NOT_ECT: u8 = 0b00;
pub const ECT1: u8 = 0b01;
pub const ECT0: u8 = 0b10;
pub const CE: u8 = 0b11;
/// The ECN bits of a TOS byte.
pub const ECN_MASK: u8 = 0b11;

/// The DSCP BFD control packets are sent with unless configured: CS6
/// (network control), as routers send BFD.
pub const BFD_DSCP: u8 = 48;

/// The TOS (IPv4) or traffic class (IPv6) byte of an inner IP packet;
/// `None` when it is neither (then nothing is copied).
#[inline]
pub fn inner_tos(inner: &[u8]) -> Option<u8> {
    match inner.first().map(|b| b >> 4) {
        Some(4) => inner.get(1).copied(),
        Some(6) => {
            let (a, b) = (*inner.first()?, *inner.get(1)?);
            Some((a << 4) | (b >> 4))
        }
        _ => None,
    }
}

/// The outer TOS byte of the datagram that carries `inner`: RFC 6040
/// normal mode (the inner ECN field copied) and the DSCP `dscp` (0..=63),
/// or the inner packet's when `None` (inherit).
#[inline]
pub fn outer_tos(inner: &[u8], dscp: Option<u8>) -> u8 {
    let tos = inner_tos(inner).unwrap_or(0);
    match dscp {
        None => tos,
        Some(d) => ((d & 0x3f) << 2) | (tos & ECN_MASK),
    }
}

/// RFC 6040 table 4: the ECN field of the packet leaving the decapsulator,
/// given the arriving inner and outer fields; `None`: drop.
#[inline]
pub fn decap_ecn(inner: u8, outer: u8) -> Option<u8> {
    match (inner & ECN_MASK, outer & ECN_MASK) {
        (NOT_ECT, CE) => None,
        (NOT_ECT, _) => Some(NOT_ECT),
        (CE, _) | (_, CE) => Some(CE),
        (ECT0, ECT1) => Some(ECT1),
        (inner, _) => Some(inner),
    }
}

/// Applies RFC 6040 decapsulation to `inner` in place, for an outer
/// header whose TOS / traffic class byte was `outer`: rewrites the inner
/// ECN field where the table changes it (and the IPv4 header checksum), or
/// says why the packet is dropped. A packet that is not IP is left alone
/// (it is refused elsewhere).
#[inline]
pub fn decapsulate(outer: u8, inner: &mut [u8]) -> Result<(), DropReason> {
    // Outer Not-ECT or ECT(0): the inner field never changes.
    if outer & ECT1 == 0 {
        return Ok(());
    }
    let Some(tos) = inner_tos(inner) else {
        return Ok(());
    };
    let ecn = decap_ecn(tos, outer).ok_or(DropReason::CeOnNotEct)?;
    if ecn != tos & ECN_MASK {
        set_ecn(inner, ecn);
    }
    Ok(())
}

/// Writes `ecn` into the ECN field of IP packet `p` (IPv4: with the
/// header checksum updated incrementally, RFC 1624).
fn set_ecn(p: &mut [u8], ecn: u8) {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            let (Some(&b0), Some(&old)) = (p.first(), p.get(1)) else {
                return;
            };
            let new = (old & !ECN_MASK) | ecn;
            let Some(c) = p.get(10..12) else {
                return;
            };
            let check = u16::from_be_bytes([c[0], c[1]]);
            let (m, m2) = (u16::from_be_bytes([b0, old]), u16::from_be_bytes([b0, new]));
            // HC' = ~(~HC + ~m + m')
            let mut sum = u32::from(!check) + u32::from(!m) + u32::from(m2);
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let check = !(sum as u16);
            p[1] = new;
            p[10..12].copy_from_slice(&check.to_be_bytes());
        }
        Some(6) => {
            if let Some(b) = p.get_mut(1) {
                // The ECN field is bits 4 and 5 of byte 1.
                *b = (*b & !(ECN_MASK << 4)) | (ecn << 4);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::segment::{fold, sum};
    use crate::core::wire::flow::tests::udp4;

    fn ipv4_checksum_ok(p: &[u8]) -> bool {
        fold(sum(&p[..20], 0)) == 0xffff
    }

    fn v4(tos: u8) -> Vec<u8> {
        let mut p = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 32);
        p[1] = tos;
        p[10] = 0;
        p[11] = 0;
        let c = !fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(ipv4_checksum_ok(&p));
        p
    }

    fn v6(tclass: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60 | (tclass >> 4);
        p[1] = (tclass << 4) | 0x0a; // flow label bits stay
        p[2] = 0xbc;
        p[6] = 17;
        p
    }

    /// RFC 6040 figure 4, row by row (inner), column by column (outer).
    #[test]
    fn decapsulation_table() {
        let outers = [NOT_ECT, ECT0, ECT1, CE];
        let table: [(u8, [Option<u8>; 4]); 4] = [
            (NOT_ECT, [Some(NOT_ECT), Some(NOT_ECT), Some(NOT_ECT), None]),
            (ECT0, [Some(ECT0), Some(ECT0), Some(ECT1), Some(CE)]),
            (ECT1, [Some(ECT1), Some(ECT1), Some(ECT1), Some(CE)]),
            (CE, [Some(CE), Some(CE), Some(CE), Some(CE)]),
        ];
        for (inner, row) in table {
            for (outer, want) in outers.iter().zip(row) {
                assert_eq!(
                    decap_ecn(inner, *outer),
                    want,
                    "inner {inner} outer {outer}"
                );
                // The DSCP bits of either byte do not matter.
                assert_eq!(decap_ecn(0xb8 | inner, 0xc0 | *outer), want);
            }
        }
    }

    #[test]
    fn decapsulate_rewrites_ipv4_and_keeps_the_checksum_right() {
        for inner in [NOT_ECT, ECT0, ECT1, CE] {
            for outer in [NOT_ECT, ECT0, ECT1, CE] {
                let mut p = v4(0xb8 | inner);
                let r = decapsulate(0x48 | outer, &mut p);
                match decap_ecn(inner, outer) {
                    None => assert_eq!(r, Err(DropReason::CeOnNotEct)),
                    Some(e) => {
                        assert_eq!(r, Ok(()));
                        assert_eq!(p[1], 0xb8 | e, "inner {inner} outer {outer}");
                        assert!(ipv4_checksum_ok(&p), "inner {inner} outer {outer}");
                    }
                }
            }
        }
    }

    #[test]
    fn decapsulate_rewrites_ipv6_traffic_class_only() {
        let mut p = v6(0xb8 | ECT0);
        decapsulate(CE, &mut p).unwrap();
        assert_eq!(inner_tos(&p), Some(0xb8 | CE));
        assert_eq!((p[0], p[1] & 0x0f, p[2]), (0x6b, 0x0a, 0xbc));
        let mut p = v6(ECT0);
        decapsulate(ECT1, &mut p).unwrap();
        assert_eq!(inner_tos(&p), Some(ECT1));
        let mut p = v6(NOT_ECT);
        assert_eq!(decapsulate(CE, &mut p), Err(DropReason::CeOnNotEct));
    }

    #[test]
    fn decapsulate_leaves_junk_alone() {
        for junk in [&mut [][..], &mut [0x45][..], &mut [0x00, 0xff][..]] {
            assert_eq!(decapsulate(CE, junk), Ok(()));
        }
    }

    #[test]
    fn encapsulation_copies_ecn_and_inherits_or_sets_dscp() {
        assert_eq!(outer_tos(&v4(0xb8), None), 0xb8);
        assert_eq!(outer_tos(&v4(0x02), None), 0x02);
        assert_eq!(outer_tos(&v4(0xbb), Some(8)), 0x23);
        assert_eq!(outer_tos(&v4(0xb8), Some(0)), 0x00);
        assert_eq!(outer_tos(&v6(0xb9), None), 0xb9);
        assert_eq!(outer_tos(&v6(0x03), Some(46)), 0xbb);
        assert_eq!(outer_tos(&[], Some(10)), 40);
        assert_eq!(outer_tos(&[0x10, 0xff], None), 0);
    }
}
