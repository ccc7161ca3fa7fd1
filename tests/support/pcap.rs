//! The IPv4/UDP datagrams of a pcap file that `tcpdump -w` wrote from an
//! Ethernet device (shared by the netns tests that read captures).
#![allow(dead_code)]

/// One captured IPv4/UDP datagram.
#[derive(Debug, Clone)]
pub struct Captured {
    pub src: [u8; 4],
    pub tos: u8,
    pub dport: u16,
    /// UDP payload length (from the UDP header).
    pub payload_len: usize,
    /// The captured bytes of the UDP payload (snap length permitting).
    pub payload: Vec<u8>,
}

/// The IPv4/UDP datagrams of a pcap file of an Ethernet capture.
pub fn read_pcap(bytes: &[u8]) -> Vec<Captured> {
    let mut out = Vec::new();
    if bytes.len() < 24 {
        return out;
    }
    let le = match bytes[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    assert_eq!(u32_at(bytes, 20), 1, "link type is not Ethernet");
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let incl = u32_at(bytes, at + 8) as usize;
        let Some(frame) = bytes.get(at + 16..at + 16 + incl) else {
            break;
        };
        at += 16 + incl;
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        let udp = &ip[ihl..];
        out.push(Captured {
            src: [ip[12], ip[13], ip[14], ip[15]],
            tos: ip[1],
            dport: u16::from_be_bytes([udp[2], udp[3]]),
            payload_len: usize::from(u16::from_be_bytes([udp[4], udp[5]])).saturating_sub(8),
            payload: udp[8..].to_vec(),
        });
    }
    out
}
