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
//! path's configured remote and hands it to [`receive`], which parses the
//! overlay header once and dispatches on the message type: a [`Message`]
//! says what the datagram is (data, with the inner IP header checked
//! before the inner packet is written to the peer's TUN; an echo), or a
//! [`DropReason`] why it is refused. [`decapsulate`] is the same for
//! plaintext data alone.
//!
//! Besides data, a path carries its own measurements: probes and their
//! replies ([`emit_probe`], [`emit_probe_reply`], [`Message::Probe`],
//! [`Message::ProbeReply`]; what they measure is [`crate::core::quality`]'s),
//! and the echo requests of older gateways, which are answered
//! ([`Echo::Reply`] carries the request's stamp back).
//!
//! A peer with a key uses the sealed variants instead: [`seal_data`] and
//! [`seal_echo`] encrypt and authenticate in place (the header, with any
//! extension, is the associated data; the tag goes after the payload,
//! [`TRAILER`] bytes), and [`receive`] with an [`Opener`] checks the
//! replay window, authenticates and decrypts in place. Plaintext
//! and sealed messages have distinct types, so a keyed peer refuses
//! plaintext and an unkeyed one refuses sealed messages
//! ([`DropReason::SealMismatch`]).

use crate::core::crypto::{Keys, MessageId, Replays, TAG_LEN};
use crate::core::drop::DropReason;
use crate::core::ecn;
use crate::core::steer::Selection;
use crate::core::wire::flow::FlowKey;
use crate::core::wire::overlay::{
    FecParity, Header, MsgType, OverlayError, ProbeClass, ProbeReport, BASE_LEN, MAX_LEN,
};
use crate::PathId;
use std::ops::Range;

/// Bytes reserved in front of the inner packet for the overlay header.
pub const HEADROOM: usize = MAX_LEN;
/// Bytes a sealed message carries after its payload (the tag).
pub const TRAILER: usize = TAG_LEN;

/// What a sender seals with on one path.
#[derive(Clone, Copy, Debug)]
pub struct Sealer<'a> {
    pub keys: &'a Keys,
    /// The sender's epoch (see [`crate::core::crypto`]); with session keys
    /// the session's epoch is used instead ([`Sealer::epoch`]).
    pub epoch: u32,
    /// [`crate::core::crypto::path_salt`] of (local, remote).
    pub salt: u64,
}

impl Sealer<'_> {
    /// The epoch sealed messages carry: the current session's with session
    /// keys, the sender's run epoch with a pre-shared key.
    pub fn epoch(&self) -> u32 {
        self.keys.session_epoch().unwrap_or(self.epoch)
    }

    /// Nothing can be sealed yet (a key-pair peer before its first handshake).
    fn ready(&self) -> Result<(), DropReason> {
        match self.keys.can_seal() {
            true => Ok(()),
            false => Err(DropReason::NoSession),
        }
    }
}

/// Where an outbound packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub path: PathId,
    /// A second copy's path (`duplicate` policy).
    pub copy: Option<PathId>,
    pub flow_hash: u64,
}

/// The largest inner packet that fits a path whose underlay MTU is
/// `underlay` bytes: less the underlay's IP header (IPv4 or IPv6), UDP, the
/// overlay header (with the peer-sequence extension if `extended`) and the
/// tag when sealed. With `fec`, the datagram to fit is the parity of a
/// block of such packets: the fixed header, the parity fields and a shard
/// (the packet and its length), two bytes more than an extended data
/// datagram.
pub fn inner_mtu(underlay: u32, underlay_v6: bool, extended: bool, sealed: bool, fec: bool) -> u32 {
    let ip = if underlay_v6 { 40 } else { 20 };
    let overlay = match (fec, extended) {
        (true, _) => BASE_LEN + FecParity::HEAD_LEN + 2,
        (false, true) => HEADROOM,
        (false, false) => BASE_LEN,
    };
    let tag = if sealed { TRAILER } else { 0 };
    underlay.saturating_sub((ip + 8 + overlay + tag) as u32)
}

/// Chooses the path for an inner packet.
#[inline]
pub fn classify(selection: &Selection, inner: &[u8]) -> Result<Placement, DropReason> {
    let flow_hash = FlowKey::hash_of(inner).map_err(|_| DropReason::InnerMalformed)?;
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

/// The overlay header of a received datagram and its length, or why the
/// datagram is refused.
fn parse(datagram: &[u8]) -> Result<(Header, usize), DropReason> {
    Header::parse(datagram).map_err(|e| match e {
        OverlayError::BadVersion(_) | OverlayError::BadType(_) => DropReason::OverlayUnsupported,
        _ => DropReason::OverlayMalformed,
    })
}

/// A message received on a path, parsed once: one variant per kind of
/// message, each with what the receiver needs of it. Kinds to come
/// (quality feedback, probes, parity, handshake) are variants of their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// An inner packet to deliver: the header, and the packet's range in
    /// the datagram (decrypted in place when it came sealed).
    Data(Header, Range<usize>),
    /// An echo message and the sender's epoch (for
    /// [`crate::core::crypto::EchoGuard`]; 0 in the clear).
    Echo(Echo, u32),
    /// A path-quality probe to answer at once: its number, its class, the
    /// datagram's length and the sender's epoch (0 in the clear).
    Probe {
        seq: u64,
        class: ProbeClass,
        len: usize,
        epoch: u32,
    },
    /// The answer to one of our probes: its number and the far end's report.
    ProbeReply { seq: u64, report: ProbeReport },
    /// Forward-error-correction parity for the peer's data
    /// ([`crate::core::fec`]): the header (its sequence is the path's, as
    /// data's) and the parity, opened and parsed.
    Parity(Header, FecParity),
    /// A key-pair handshake message, for the peer's handshake
    /// ([`crate::core::handshake`]), which authenticates it by its own
    /// means; the whole datagram is the message.
    Handshake,
}

/// What a receiver of a keyed peer opens sealed messages with on one path.
pub struct Opener<'a> {
    pub keys: &'a Keys,
    /// [`crate::core::crypto::path_salt`] of (remote, local).
    pub salt: u64,
    /// The path's replay window, which moves only for data that
    /// authenticates.
    pub window: &'a mut dyn Replays,
}

/// The one entry for a datagram received on a path: parses the overlay
/// header once and dispatches on the message type. Without an `opener` (a
/// peer in the clear) only plaintext messages are accepted; with one (a
/// keyed peer) only sealed ones, which are checked against the replay
/// window (data), authenticated and decrypted in place.
pub fn receive(datagram: &mut [u8], opener: Option<Opener<'_>>) -> Result<Message, DropReason> {
    receive_marked(datagram, opener, 0)
}

/// [`receive`] of a datagram whose outer IP header carried the TOS (IPv4)
/// or traffic class (IPv6) byte `outer_tos`: the inner packet of data
/// (opened first, when sealed: the outer header is not authenticated) has
/// its ECN field rewritten in place as RFC 6040 says
/// ([`crate::core::ecn::decapsulate`]), or is refused
/// ([`DropReason::CeOnNotEct`]).
pub fn receive_marked(
    datagram: &mut [u8],
    opener: Option<Opener<'_>>,
    outer_tos: u8,
) -> Result<Message, DropReason> {
    let (header, hlen) = parse(datagram)?;
    if header.msg_type == MsgType::Handshake {
        return Ok(Message::Handshake);
    }
    let message = match opener {
        None => receive_clear(datagram, header, hlen),
        Some(opener) => receive_sealed(datagram, header, hlen, opener),
    }?;
    if let Message::Data(_, range) = &message {
        let inner = datagram
            .get_mut(range.clone())
            .ok_or(DropReason::OverlayMalformed)?;
        ecn::decapsulate(outer_tos, inner)?;
    }
    Ok(message)
}

/// Validates a received plaintext data datagram and returns its header
/// and inner packet: [`receive`] in the clear, for data only.
pub fn decapsulate(datagram: &[u8]) -> Result<(Header, &[u8]), DropReason> {
    let (header, hlen) = parse(datagram)?;
    match receive_clear(datagram, header, hlen)? {
        Message::Data(header, range) => {
            let inner = datagram.get(range).ok_or(DropReason::OverlayMalformed)?;
            Ok((header, inner))
        }
        Message::Echo(..)
        | Message::Probe { .. }
        | Message::ProbeReply { .. }
        | Message::Parity(..)
        | Message::Handshake => Err(DropReason::OverlayUnsupported),
    }
}

fn receive_clear(datagram: &[u8], header: Header, hlen: usize) -> Result<Message, DropReason> {
    match header.msg_type {
        MsgType::Data => {
            let inner = datagram.get(hlen..).ok_or(DropReason::OverlayMalformed)?;
            check_inner(inner)?;
            Ok(Message::Data(header, hlen..datagram.len()))
        }
        MsgType::EchoRequest => Ok(Message::Echo(Echo::Request(header.sequence), header.epoch)),
        MsgType::EchoReply => Ok(Message::Echo(Echo::Reply(header.sequence), header.epoch)),
        MsgType::ProbeRequest | MsgType::ProbeReply => {
            let payload = datagram.get(hlen..).ok_or(DropReason::OverlayMalformed)?;
            probe_message(&header, payload, datagram.len())
        }
        MsgType::FecParity => {
            let payload = datagram.get(hlen..).ok_or(DropReason::OverlayMalformed)?;
            let parity = FecParity::parse(payload).map_err(|_| DropReason::OverlayMalformed)?;
            Ok(Message::Parity(header, parity))
        }
        MsgType::SealedData
        | MsgType::SealedEchoRequest
        | MsgType::SealedEchoReply
        | MsgType::SealedProbeRequest
        | MsgType::SealedProbeReply
        | MsgType::SealedFecParity => Err(DropReason::SealMismatch),
        MsgType::Handshake => Ok(Message::Handshake),
    }
}

/// The probe message `header` and its (opened) `payload` carry; `len` is
/// the datagram's length as received.
fn probe_message(header: &Header, payload: &[u8], len: usize) -> Result<Message, DropReason> {
    match header.msg_type {
        MsgType::ProbeRequest | MsgType::SealedProbeRequest => Ok(Message::Probe {
            seq: header.sequence,
            class: ProbeClass::from_payload(payload),
            len,
            epoch: header.epoch,
        }),
        _ => {
            let report = ProbeReport::parse(payload).map_err(|_| DropReason::OverlayMalformed)?;
            Ok(Message::ProbeReply {
                seq: header.sequence,
                report,
            })
        }
    }
}

/// An echo message received on a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// The peer asks for a reply carrying this stamp.
    Request(u64),
    /// The peer answers a request we stamped with this value.
    Reply(u64),
}

/// Writes an echo message into `out`; returns its length.
pub fn emit_echo(echo: Echo, out: &mut [u8]) -> Result<usize, DropReason> {
    let header = match echo {
        Echo::Request(stamp) => Header::echo(MsgType::EchoRequest, stamp),
        Echo::Reply(stamp) => Header::echo(MsgType::EchoReply, stamp),
    };
    header.emit(out).map_err(|_| DropReason::TooBig)
}

/// Writes a probe request into `out`: `len` bytes in all (at least the
/// header and the class byte; padding after it), sealed (then `len` less
/// the tag is the header and payload) when a `sealer` is given. Returns
/// its length.
pub fn emit_probe(
    seq: u64,
    class: ProbeClass,
    len: usize,
    out: &mut [u8],
    sealer: Option<&Sealer>,
) -> Result<usize, DropReason> {
    let trailer = if sealer.is_some() { TRAILER } else { 0 };
    let payload_len = len.saturating_sub(BASE_LEN + trailer).max(1);
    emit_control(
        (MsgType::ProbeRequest, MsgType::SealedProbeRequest),
        seq,
        payload_len,
        |p| {
            p.fill(0);
            if let Some(b) = p.first_mut() {
                *b = class as u8;
            }
        },
        out,
        sealer,
    )
}

/// Writes the reply to probe `seq`, carrying `report`, into `out`; sealed
/// when a `sealer` is given. Returns its length.
pub fn emit_probe_reply(
    seq: u64,
    report: &ProbeReport,
    out: &mut [u8],
    sealer: Option<&Sealer>,
) -> Result<usize, DropReason> {
    emit_control(
        (MsgType::ProbeReply, MsgType::SealedProbeReply),
        seq,
        ProbeReport::LEN,
        |p| {
            let _ = report.emit(p);
        },
        out,
        sealer,
    )
}

/// Frames a message of the path's own (probe) traffic: header, a payload
/// of `payload_len` bytes that `fill` writes, and with a `sealer` the tag
/// (the cleartext type of `types` in the clear, the sealed one otherwise).
fn emit_control(
    types: (MsgType, MsgType),
    seq: u64,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
    out: &mut [u8],
    sealer: Option<&Sealer>,
) -> Result<usize, DropReason> {
    let header = Header {
        msg_type: if sealer.is_some() { types.1 } else { types.0 },
        epoch: sealer.map_or(0, Sealer::epoch),
        ..Header::echo(types.0, seq)
    };
    if let Some(s) = sealer {
        s.ready()?;
    }
    let hlen = header.len();
    let trailer = if sealer.is_some() { TRAILER } else { 0 };
    let total = hlen + payload_len + trailer;
    let datagram = out.get_mut(..total).ok_or(DropReason::TooBig)?;
    header.emit(datagram).map_err(|_| DropReason::TooBig)?;
    fill(&mut datagram[hlen..hlen + payload_len]);
    if let Some(sealer) = sealer {
        seal_in_place(datagram, &header, hlen, sealer)?;
    }
    Ok(total)
}

/// Like [`encapsulate`], sealed: writes `header` as a
/// [`MsgType::SealedData`] message of the sealer's epoch in front of the
/// inner packet at `buf[HEADROOM..HEADROOM + inner_len]`, encrypts the
/// packet in place and appends the tag. Returns where the datagram lies.
pub fn seal_data(
    buf: &mut [u8],
    inner_len: usize,
    header: &Header,
    sealer: &Sealer,
) -> Result<Range<usize>, DropReason> {
    sealer.ready()?;
    let header = Header {
        msg_type: MsgType::SealedData,
        epoch: sealer.epoch(),
        ..*header
    };
    let range = encapsulate(buf, inner_len, &header)?;
    let total = range.end + TRAILER;
    let datagram = buf.get_mut(range.start..total).ok_or(DropReason::TooBig)?;
    seal_in_place(datagram, &header, HEADROOM - range.start, sealer)?;
    Ok(range.start..total)
}

/// Writes a parity datagram into `out`: numbered `sequence` on its path
/// (taken from the path's data sequence, so that a sealed one never
/// reuses a nonce), from `lane`, flagged [`FLAG_ORDERED`] when it protects
/// an `aggregate` stream (what it rebuilds goes to the resequencer),
/// sealed when a `sealer` is given. Returns its length.
///
/// [`FLAG_ORDERED`]: crate::core::wire::overlay::FLAG_ORDERED
pub fn emit_parity(
    parity: &FecParity,
    sequence: u64,
    lane: usize,
    ordered: bool,
    out: &mut [u8],
    sealer: Option<&Sealer>,
) -> Result<usize, DropReason> {
    let mut header = Header {
        msg_type: match sealer {
            Some(_) => MsgType::SealedFecParity,
            None => MsgType::FecParity,
        },
        epoch: sealer.map_or(0, |s| s.epoch),
        ..Header::echo(MsgType::FecParity, sequence).with_lane(lane)
    };
    if ordered {
        header.flags |= crate::core::wire::overlay::FLAG_ORDERED;
    }
    let hlen = header.len();
    let trailer = if sealer.is_some() { TRAILER } else { 0 };
    let total = hlen + parity.len() + trailer;
    let datagram = out.get_mut(..total).ok_or(DropReason::TooBig)?;
    header.emit(datagram).map_err(|_| DropReason::TooBig)?;
    parity
        .emit(&mut datagram[hlen..])
        .map_err(|_| DropReason::TooBig)?;
    if let Some(sealer) = sealer {
        seal_in_place(datagram, &header, hlen, sealer)?;
    }
    Ok(total)
}

/// Writes a sealed echo message into `out`; returns its length.
pub fn seal_echo(echo: Echo, out: &mut [u8], sealer: &Sealer) -> Result<usize, DropReason> {
    let (msg_type, stamp) = match echo {
        Echo::Request(s) => (MsgType::SealedEchoRequest, s),
        Echo::Reply(s) => (MsgType::SealedEchoReply, s),
    };
    sealer.ready()?;
    let header = Header {
        epoch: sealer.epoch(),
        ..Header::echo(msg_type, stamp)
    };
    let hlen = header.len();
    let total = hlen + TRAILER;
    let datagram = out.get_mut(..total).ok_or(DropReason::TooBig)?;
    header.emit(datagram).map_err(|_| DropReason::TooBig)?;
    seal_in_place(datagram, &header, hlen, sealer)?;
    Ok(total)
}

/// Seals `datagram = header (hlen) | payload | room for the tag`, the
/// header already written.
fn seal_in_place(
    datagram: &mut [u8],
    header: &Header,
    hlen: usize,
    sealer: &Sealer,
) -> Result<(), DropReason> {
    let id = MessageId {
        epoch: header.epoch,
        msg_type: header.msg_type as u8,
        salt: sealer.salt,
        sequence: header.sequence,
    };
    let body_end = datagram
        .len()
        .checked_sub(TRAILER)
        .filter(|&e| e >= hlen)
        .ok_or(DropReason::TooBig)?;
    let (head, rest) = datagram.split_at_mut(hlen);
    let (payload, tail) = rest.split_at_mut(body_end - hlen);
    let tag = sealer.keys.seal(&id, head, payload);
    tail.copy_from_slice(&tag);
    Ok(())
}

/// Checks the replay window (data), authenticates and decrypts in place a
/// message from a keyed peer, whose header `parse` read.
fn receive_sealed(
    datagram: &mut [u8],
    header: Header,
    hlen: usize,
    opener: Opener<'_>,
) -> Result<Message, DropReason> {
    if !header.msg_type.is_sealed() {
        return Err(DropReason::SealMismatch);
    }
    let end = datagram
        .len()
        .checked_sub(TRAILER)
        .filter(|&e| e >= hlen)
        .ok_or(DropReason::OverlayMalformed)?;
    // parity is numbered with the path's data, and replay-checked alike
    let is_data = matches!(
        header.msg_type,
        MsgType::SealedData | MsgType::SealedFecParity
    );
    if is_data {
        opener
            .window
            .check(header.epoch, header.sequence)
            .map_err(|_| DropReason::Replayed)?;
    }
    let id = MessageId {
        epoch: header.epoch,
        msg_type: header.msg_type as u8,
        salt: opener.salt,
        sequence: header.sequence,
    };
    let len = datagram.len();
    let (head, rest) = datagram.split_at_mut(hlen);
    let (payload, tail) = rest.split_at_mut(end - hlen);
    let tag: &[u8; TRAILER] = (&*tail)
        .try_into()
        .map_err(|_| DropReason::OverlayMalformed)?;
    opener
        .keys
        .open(&id, head, payload, tag)
        .map_err(|_| DropReason::AuthFailed)?;
    match header.msg_type {
        MsgType::SealedEchoRequest => {
            Ok(Message::Echo(Echo::Request(header.sequence), header.epoch))
        }
        MsgType::SealedEchoReply => Ok(Message::Echo(Echo::Reply(header.sequence), header.epoch)),
        MsgType::SealedProbeRequest | MsgType::SealedProbeReply => {
            probe_message(&header, payload, len)
        }
        MsgType::SealedFecParity => {
            opener.window.commit(header.epoch, header.sequence);
            let parity = FecParity::parse(payload).map_err(|_| DropReason::OverlayMalformed)?;
            Ok(Message::Parity(header, parity))
        }
        _ if is_data => {
            opener.window.commit(header.epoch, header.sequence);
            check_inner(payload)?;
            Ok(Message::Data(header, hlen..end))
        }
        _ => Err(DropReason::OverlayUnsupported),
    }
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
    use crate::core::crypto::ReplayWindow;
    use crate::core::wire::flow::tests::udp4;
    use crate::core::wire::overlay::PeerSeq;

    /// [`receive`] for a keyed peer.
    fn open(
        datagram: &mut [u8],
        keys: &Keys,
        salt: u64,
        window: &mut dyn Replays,
    ) -> Result<Message, DropReason> {
        receive(datagram, Some(Opener { keys, salt, window }))
    }

    /// The echo message [`receive`] sees in the clear, if it is one.
    fn parse_echo(datagram: &[u8]) -> Option<Echo> {
        match receive(&mut datagram.to_vec(), None) {
            Ok(Message::Echo(echo, _)) => Some(echo),
            _ => None,
        }
    }

    fn sel(active: Option<PathId>) -> Selection {
        Selection::new(
            Policy::ActiveBackup,
            active,
            active.map(|a| vec![(a, 1)]).unwrap_or_default(),
        )
    }

    #[test]
    fn inner_mtu_subtracts_every_header() {
        assert_eq!(
            inner_mtu(1500, false, false, false, false),
            1500 - 20 - 8 - 16
        );
        assert_eq!(
            inner_mtu(1500, true, false, false, false),
            1500 - 40 - 8 - 16
        );
        assert_eq!(
            inner_mtu(9001, false, true, true, false),
            9001 - 20 - 8 - 32 - 16
        );
        assert_eq!(inner_mtu(10, true, true, true, false), 0);
        // FEC: the parity of a full-sized packet must fit too
        let mtu = inner_mtu(1500, false, false, false, true) as usize;
        let parity = FecParity {
            instance: 1,
            first: 1,
            k: 1,
            m: 1,
            index: 0,
            shard: vec![0; mtu + 2],
        };
        assert_eq!(20 + 8 + BASE_LEN + parity.len(), 1500);
        assert!(
            mtu + 20 + 8 + HEADROOM <= 1500,
            "and the data with the extension"
        );
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
        use crate::core::wire::overlay::PeerSeq;
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
        assert_eq!(n, crate::core::wire::overlay::BASE_LEN);
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

    fn keys(b: u8) -> Keys {
        Keys::new(&crate::core::crypto::Key::from_bytes([b; 32]), None)
    }

    fn sealed(seq: u64, epoch: u32, k: &Keys, salt: u64) -> Vec<u8> {
        let inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 64);
        let mut buf = vec![0u8; 256];
        buf[HEADROOM..HEADROOM + inner.len()].copy_from_slice(&inner);
        let sealer = Sealer {
            keys: k,
            epoch,
            salt,
        };
        let r = seal_data(&mut buf, inner.len(), &Header::data(seq), &sealer).unwrap();
        assert_eq!(r.len(), BASE_LEN + inner.len() + TRAILER);
        assert_ne!(&buf[HEADROOM..HEADROOM + inner.len()], &inner[..]);
        buf[r].to_vec()
    }

    #[test]
    fn lanes_sharing_a_window_refuse_what_either_has_seen() {
        let k = keys(1);
        let shared = std::sync::Arc::new(parking_lot::Mutex::new(ReplayWindow::default()));
        let (mut lane0, mut lane1) = (shared.clone(), shared);
        // Lane 0 receives epoch 9 traffic; lane 1 has received nothing.
        assert!(open(&mut sealed(1, 9, &k, 5), &k, 5, &mut lane0).is_ok());
        assert!(open(&mut sealed(2, 9, &k, 5), &k, 5, &mut lane1).is_ok());
        // A replay, and a datagram of an older epoch, are refused on the
        // lane that never saw the original or the newer epoch.
        for (seq, epoch) in [(1, 9), (2, 9), (50, 8)] {
            let mut d = sealed(seq, epoch, &k, 5);
            assert_eq!(
                open(&mut d, &k, 5, &mut lane1),
                Err(DropReason::Replayed),
                "{seq}/{epoch}"
            );
        }
    }

    #[test]
    fn seal_open_data() {
        let k = keys(1);
        let inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 64);
        let mut w = ReplayWindow::default();
        let mut d = sealed(1, 9, &k, 5);
        let Message::Data(h, r) = open(&mut d, &k, 5, &mut w).unwrap() else {
            panic!("not data")
        };
        assert_eq!(&d[r], &inner[..]);
        assert_eq!(
            (h.msg_type, h.sequence, h.epoch),
            (MsgType::SealedData, 1, 9)
        );
        // Replayed, wrong key, wrong path salt, tampered header.
        let mut again = sealed(1, 9, &k, 5);
        assert_eq!(open(&mut again, &k, 5, &mut w), Err(DropReason::Replayed));
        let mut d2 = sealed(2, 9, &keys(2), 5);
        assert_eq!(open(&mut d2, &k, 5, &mut w), Err(DropReason::AuthFailed));
        let mut d3 = sealed(3, 9, &k, 5);
        assert_eq!(open(&mut d3, &k, 6, &mut w), Err(DropReason::AuthFailed));
        d3[3] ^= 0x80; // flags are authenticated too
        assert_eq!(open(&mut d3, &k, 5, &mut w), Err(DropReason::AuthFailed));
        // A forgery did not consume sequence 2 or 3.
        let mut ok = sealed(3, 9, &k, 5);
        assert!(open(&mut ok, &k, 5, &mut w).is_ok());
        // Truncated: shorter than header + tag.
        let mut short = sealed(4, 9, &k, 5);
        assert_eq!(
            open(&mut short[..BASE_LEN + 3], &k, 5, &mut w),
            Err(DropReason::OverlayMalformed)
        );
        assert_eq!(
            open(&mut short[..BASE_LEN + TRAILER], &k, 5, &mut w),
            Err(DropReason::AuthFailed)
        );
    }

    #[test]
    fn sealed_and_plaintext_never_mix() {
        let k = keys(1);
        let mut w = ReplayWindow::default();
        let inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 64);
        let mut buf = vec![0u8; HEADROOM + inner.len()];
        buf[HEADROOM..].copy_from_slice(&inner);
        let r = encapsulate(&mut buf, inner.len(), &Header::data(1)).unwrap();
        let mut plain = buf[r].to_vec();
        assert_eq!(
            open(&mut plain, &k, 0, &mut w),
            Err(DropReason::SealMismatch)
        );
        let mut e = [0u8; 64];
        let n = emit_echo(Echo::Request(1), &mut e).unwrap();
        assert_eq!(
            open(&mut e[..n], &k, 0, &mut w),
            Err(DropReason::SealMismatch)
        );
        let d = sealed(1, 1, &k, 0);
        assert_eq!(decapsulate(&d).unwrap_err(), DropReason::SealMismatch);
        assert_eq!(parse_echo(&d), None);
    }

    #[test]
    fn parity_clear_and_sealed() {
        let parity = FecParity {
            instance: 4,
            first: 100,
            k: 10,
            m: 2,
            index: 1,
            shard: vec![9; 66],
        };
        let mut out = [0u8; 256];
        let n = emit_parity(&parity, 42, 3, true, &mut out, None).unwrap();
        assert_eq!(n, BASE_LEN + FecParity::HEAD_LEN + 66);
        let Ok(Message::Parity(h, back)) = receive(&mut out[..n], None) else {
            panic!("not parity")
        };
        assert_eq!(
            (h.msg_type, h.sequence, h.lane()),
            (MsgType::FecParity, 42, 3)
        );
        assert_eq!(back, parity);
        assert_eq!(
            decapsulate(&out[..n]).unwrap_err(),
            DropReason::OverlayUnsupported,
            "parity is not data"
        );
        // sealed: opened, replay-checked with the path's data, authenticated
        let k = keys(5);
        let mut w = ReplayWindow::default();
        let sealer = Sealer {
            keys: &k,
            epoch: 2,
            salt: 7,
        };
        let n = emit_parity(&parity, 43, 0, false, &mut out, Some(&sealer)).unwrap();
        assert_eq!(n, BASE_LEN + FecParity::HEAD_LEN + 66 + TRAILER);
        assert_ne!(&out[BASE_LEN + FecParity::HEAD_LEN..][..66], &[9; 66][..]);
        let mut copy = out;
        let Ok(Message::Parity(h, back)) = open(&mut out[..n], &k, 7, &mut w) else {
            panic!("not parity")
        };
        assert_eq!((h.msg_type, h.sequence), (MsgType::SealedFecParity, 43));
        assert_eq!(back, parity);
        assert_eq!(
            open(&mut { copy }[..n], &k, 7, &mut w),
            Err(DropReason::Replayed)
        );
        assert_eq!(receive(&mut copy[..n], None), Err(DropReason::SealMismatch));
        // a data datagram of the same number is a replay too
        assert_eq!(
            open(&mut sealed(43, 2, &k, 7), &k, 7, &mut w),
            Err(DropReason::Replayed)
        );
        let n = emit_parity(&parity, 44, 0, false, &mut out, Some(&sealer)).unwrap();
        out[BASE_LEN + 2] ^= 1; // the parity fields are authenticated
        assert_eq!(
            open(&mut out[..n], &k, 7, &mut w),
            Err(DropReason::AuthFailed)
        );
        assert_eq!(
            emit_parity(&parity, 1, 0, false, &mut [0u8; 40], None),
            Err(DropReason::TooBig)
        );
    }

    #[test]
    fn sealed_echo() {
        let k = keys(7);
        let mut w = ReplayWindow::default();
        let sealer = Sealer {
            keys: &k,
            epoch: 3,
            salt: 11,
        };
        let mut out = [0u8; 64];
        let n = seal_echo(Echo::Reply(77), &mut out, &sealer).unwrap();
        assert_eq!(n, BASE_LEN + TRAILER);
        assert_eq!(parse_echo(&out[..n]), None);
        assert_eq!(
            open(&mut out[..n], &k, 11, &mut w),
            Ok(Message::Echo(Echo::Reply(77), 3))
        );
        out[8] ^= 1; // the stamp is authenticated
        assert_eq!(
            open(&mut out[..n], &k, 11, &mut w),
            Err(DropReason::AuthFailed)
        );
        assert_eq!(
            seal_echo(Echo::Request(1), &mut [0u8; 20], &sealer),
            Err(DropReason::TooBig)
        );
    }

    #[test]
    fn sealed_with_peer_seq_extension() {
        let k = keys(3);
        let inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 64);
        let mut buf = vec![0u8; 256];
        buf[HEADROOM..HEADROOM + inner.len()].copy_from_slice(&inner);
        let sealer = Sealer {
            keys: &k,
            epoch: 2,
            salt: 1,
        };
        let ps = PeerSeq {
            instance: 4,
            sequence: 77,
        };
        let header = Header::data(1).with_peer_seq(ps);
        let r = seal_data(&mut buf, inner.len(), &header, &sealer).unwrap();
        let mut d = buf[r].to_vec();
        // The extension is authenticated too.
        let mut bad = d.clone();
        bad[BASE_LEN + 15] ^= 1;
        let mut w = ReplayWindow::default();
        assert_eq!(open(&mut bad, &k, 1, &mut w), Err(DropReason::AuthFailed));
        let Ok(Message::Data(h, range)) = open(&mut d, &k, 1, &mut w) else {
            panic!("does not open")
        };
        assert_eq!(h.peer_seq, Some(ps));
        assert_eq!(&d[range], &inner[..]);
    }

    /// RFC 6040 on receive: a CE mark on the outer header reaches an ECT
    /// inner packet, clear or sealed (after opening); a Not-ECT one is
    /// refused; echoes are not touched.
    #[test]
    fn receive_applies_the_outer_ecn() {
        let frame = |tos: u8| {
            let mut inner = udp4([198, 18, 10, 1], [198, 18, 30, 2], 1000, 2000, 64);
            inner[1] = tos;
            let mut buf = vec![0u8; HEADROOM + inner.len()];
            buf[HEADROOM..].copy_from_slice(&inner);
            let r = encapsulate(&mut buf, inner.len(), &Header::data(1)).unwrap();
            buf[r].to_vec()
        };
        let mut d = frame(0xb8 | ecn::ECT0);
        let Ok(Message::Data(_, r)) = receive_marked(&mut d, None, 0x03) else {
            panic!("not data")
        };
        assert_eq!(d[r.start + 1], 0xb8 | ecn::CE);
        let mut d = frame(0xb8 | ecn::ECT0);
        let Ok(Message::Data(_, r)) = receive_marked(&mut d, None, 0xba) else {
            panic!("not data")
        };
        assert_eq!(d[r.start + 1], 0xb8 | ecn::ECT0);
        let mut d = frame(0x00);
        assert_eq!(
            receive_marked(&mut d, None, ecn::CE),
            Err(DropReason::CeOnNotEct)
        );
        let mut e = [0u8; 64];
        let n = emit_echo(Echo::Request(1), &mut e).unwrap();
        assert!(receive_marked(&mut e[..n], None, ecn::CE).is_ok());
        // Sealed: the mark applies to the opened packet.
        let k = keys(4);
        let mut w = ReplayWindow::default();
        let mut s = sealed(1, 9, &k, 5);
        let opener = Opener {
            keys: &k,
            salt: 5,
            window: &mut w,
        };
        assert_eq!(
            receive_marked(&mut s, Some(opener), ecn::CE),
            Err(DropReason::CeOnNotEct)
        );
        let mut s = sealed(2, 9, &k, 5);
        let opener = Opener {
            keys: &k,
            salt: 5,
            window: &mut w,
        };
        assert!(matches!(
            receive_marked(&mut s, Some(opener), ecn::ECT0),
            Ok(Message::Data(..))
        ));
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
