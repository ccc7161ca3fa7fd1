//! The data plane's per-packet work, sans-IO.
//!
//! Outbound, a forwarding thread reads an inner packet from the peer's TUN
//! straight into a buffer at offset [`HEADROOM`], asks [`classify`] which
//! path carries its flow, writes the overlay header right in front of it
//! with [`encapsulate`] and sends header and packet to the path's remote. No
//! copy and no allocation happen per packet. The headroom is sized for the
//! longest header (with the `duplicate` policy's peer-sequence extension);
//! a shorter header simply starts later in the buffer.
//!
//! Inbound, a path's receive thread checks the datagram came from the
//! path's configured remote, and [`decapsulate`] validates the overlay
//! header and the inner IP header before the inner packet is written to
//! the peer's TUN.
//!
//! Besides data, a path carries echo messages that measure its round-trip
//! time: once a second the path's receive thread sends an
//! [`Echo::Request`] stamped with its own clock, the peer answers with an
//! [`Echo::Reply`] carrying the stamp back, and [`echo_rtt`] turns the
//! stamp into a round-trip time. The stamp is opaque to the peer; the
//! shell chooses (and may obscure) it, so this module stays clock-free.

use crate::drop::DropReason;
use crate::steer::Selection;
use crate::wire::flow::FlowKey;
use crate::wire::overlay::{Header, MsgType, OverlayError, MAX_LEN};
use crate::PathId;
use std::ops::Range;

/// Bytes reserved in front of the inner packet for the overlay header.
pub const HEADROOM: usize = MAX_LEN;

/// Where an outbound packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub path: PathId,
    /// A second copy's path (`duplicate` policy).
    pub copy: Option<PathId>,
    pub flow_hash: u64,
}

/// Chooses the path for an inner packet.
pub fn classify(selection: &Selection, inner: &[u8]) -> Result<Placement, DropReason> {
    let key = FlowKey::parse(inner).map_err(|_| DropReason::InnerMalformed)?;
    let flow_hash = key.hash64();
    let path = selection.select(flow_hash).ok_or(DropReason::NoPath)?;
    Ok(Placement {
        path,
        copy: selection.duplicate_path(),
        flow_hash,
    })
}

/// Writes `header` into the end of `buf[..HEADROOM]`, right in front of
/// the inner packet that sits at `buf[HEADROOM..HEADROOM + inner_len]`.
/// Returns where the datagram lies in `buf`.
pub fn encapsulate(
    buf: &mut [u8],
    inner_len: usize,
    header: &Header,
) -> Result<Range<usize>, DropReason> {
    let end = HEADROOM + inner_len;
    if end > buf.len() {
        return Err(DropReason::TooBig);
    }
    let start = HEADROOM
        .checked_sub(header.len())
        .ok_or(DropReason::TooBig)?;
    header
        .emit(&mut buf[start..HEADROOM])
        .map_err(|_| DropReason::TooBig)?;
    Ok(start..end)
}

/// Validates a received datagram and returns its header and inner packet.
pub fn decapsulate(datagram: &[u8]) -> Result<(Header, &[u8]), DropReason> {
    let (header, offset) = Header::parse(datagram).map_err(|e| match e {
        OverlayError::BadVersion(_) | OverlayError::BadType(_) => DropReason::OverlayUnsupported,
        _ => DropReason::OverlayMalformed,
    })?;
    if header.msg_type != MsgType::Data {
        return Err(DropReason::OverlayUnsupported);
    }
    let inner = datagram.get(offset..).ok_or(DropReason::OverlayMalformed)?;
    check_inner(inner)?;
    Ok((header, inner))
}

/// An echo message received on a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// The peer asks for a reply carrying this stamp.
    Request(u64),
    /// The peer answers a request we stamped with this value.
    Reply(u64),
}

/// Recognises an echo message; `None` for data and for anything malformed,
/// which [`decapsulate`] judges and counts.
pub fn parse_echo(datagram: &[u8]) -> Option<Echo> {
    match Header::parse(datagram) {
        Ok((h, _)) if h.msg_type == MsgType::EchoRequest => Some(Echo::Request(h.sequence)),
        Ok((h, _)) if h.msg_type == MsgType::EchoReply => Some(Echo::Reply(h.sequence)),
        _ => None,
    }
}

/// Writes an echo message into `out`; returns its length.
pub fn emit_echo(echo: Echo, out: &mut [u8]) -> Result<usize, DropReason> {
    let header = match echo {
        Echo::Request(stamp) => Header::echo(MsgType::EchoRequest, stamp),
        Echo::Reply(stamp) => Header::echo(MsgType::EchoReply, stamp),
    };
    header.emit(out).map_err(|_| DropReason::TooBig)
}

/// The round trip of a reply stamped `sent` and received at `now` (both in
/// the shell's nanoseconds). A stamp from the future or older than
/// `max_age` is not ours (or too stale to mean anything): `None`.
pub fn echo_rtt(sent: u64, now: u64, max_age: u64) -> Option<u64> {
    let rtt = now.checked_sub(sent)?;
    (rtt <= max_age).then_some(rtt)
}

/// A cheap sanity check of an inner packet: IP version and minimum header.
fn check_inner(inner: &[u8]) -> Result<(), DropReason> {
    let ok = match inner.first().map(|b| b >> 4) {
        Some(4) => inner.len() >= 20,
        Some(6) => inner.len() >= 40,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(DropReason::InnerMalformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::wire::flow::tests::udp4;

    fn sel(active: Option<PathId>) -> Selection {
        Selection {
            policy: Policy::ActiveBackup,
            active,
            eligible: active.map(|a| vec![(a, 1)]).unwrap_or_default(),
        }
    }

    #[test]
    fn encap_decap_round_trip() {
        let inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 100);
        let mut buf = vec![0u8; 2048];
        buf[HEADROOM..HEADROOM + inner.len()].copy_from_slice(&inner);
        let r = encapsulate(&mut buf, inner.len(), &Header::data(42)).unwrap();
        assert_eq!(r, HEADROOM - 16..inner.len() + HEADROOM);
        let (h, back) = decapsulate(&buf[r]).unwrap();
        assert_eq!(h.sequence, 42);
        assert_eq!(h.peer_seq, None);
        assert_eq!(back, &inner[..]);
    }

    #[test]
    fn encap_decap_with_peer_sequence() {
        use crate::wire::overlay::PeerSeq;
        let inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 100);
        let mut buf = vec![0u8; 2048];
        buf[HEADROOM..HEADROOM + inner.len()].copy_from_slice(&inner);
        let ps = PeerSeq {
            instance: 3,
            sequence: 77,
        };
        let r = encapsulate(&mut buf, inner.len(), &Header::data(1).with_peer_seq(ps)).unwrap();
        assert_eq!(r, 0..inner.len() + HEADROOM);
        let (h, back) = decapsulate(&buf[r]).unwrap();
        assert_eq!(h.peer_seq, Some(ps));
        assert_eq!(back, &inner[..]);
    }

    #[test]
    fn classify_follows_selection() {
        let inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 10);
        assert_eq!(
            classify(&sel(Some(PathId(3))), &inner).unwrap().path,
            PathId(3)
        );
        assert_eq!(classify(&sel(None), &inner), Err(DropReason::NoPath));
        assert_eq!(
            classify(&sel(Some(PathId(0))), &[0x45, 0, 0]),
            Err(DropReason::InnerMalformed)
        );
    }

    #[test]
    fn decap_rejects_junk() {
        assert_eq!(decapsulate(&[]).unwrap_err(), DropReason::OverlayMalformed);
        assert_eq!(
            decapsulate(&[9; 64]).unwrap_err(),
            DropReason::OverlayUnsupported
        );
        let mut buf = [0u8; 80];
        let r = encapsulate(&mut buf, 48, &Header::data(1)).unwrap();
        let d = &mut buf[r];
        // Header fine, inner is zeros: not IP.
        assert_eq!(decapsulate(d).unwrap_err(), DropReason::InnerMalformed);
        d[16] = 0x45;
        assert!(decapsulate(d).is_ok());
        assert_eq!(
            decapsulate(&d[..16 + 10]).unwrap_err(),
            DropReason::InnerMalformed
        );
    }

    #[test]
    fn echo_messages() {
        let mut buf = [0u8; 64];
        let n = emit_echo(Echo::Request(123), &mut buf).unwrap();
        assert_eq!(n, crate::wire::overlay::BASE_LEN);
        assert_eq!(parse_echo(&buf[..n]), Some(Echo::Request(123)));
        // An echo is not data.
        assert_eq!(
            decapsulate(&buf[..n]).unwrap_err(),
            DropReason::OverlayUnsupported
        );
        let n = emit_echo(Echo::Reply(9), &mut buf).unwrap();
        assert_eq!(parse_echo(&buf[..n]), Some(Echo::Reply(9)));
        assert_eq!(parse_echo(&buf[..3]), None);
        let r = encapsulate(&mut buf, 20, &Header::data(5)).unwrap();
        assert_eq!(parse_echo(&buf[r]), None);
        assert_eq!(
            emit_echo(Echo::Reply(1), &mut [0u8; 4]),
            Err(DropReason::TooBig)
        );
    }

    #[test]
    fn echo_rtt_bounds() {
        assert_eq!(echo_rtt(1_000, 1_500, 10_000), Some(500));
        assert_eq!(echo_rtt(2_000, 1_500, 10_000), None);
        assert_eq!(echo_rtt(0, 20_000, 10_000), None);
    }

    #[test]
    fn encap_refuses_overflow() {
        let mut buf = [0u8; 48];
        assert_eq!(
            encapsulate(&mut buf, 17, &Header::data(0)),
            Err(DropReason::TooBig)
        );
    }
}
