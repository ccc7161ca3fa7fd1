//! The overlay header that precedes every inner packet on a path.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +---------------+---------------+---------------+---------------+
//! |  Version (1)  |   Msg type    | Header length |     Flags     |
//! +---------------+---------------+---------------+---------------+
//! |                     Key epoch / reserved (0)                  |
//! +---------------------------------------------------------------+
//! |                                                               |
//! +                  Sequence number (per path)                   +
//! |                                                               |
//! +---------------------------------------------------------------+
//! |        Extensions (Header length - 16 bytes, skipped)         |
//! +---------------------------------------------------------------+
//! |                     Inner IP packet ...                       |
//! ```
//!
//! Extension defined so far, present when flag [`FLAG_PEER_SEQ`] is set
//! (sent under the `duplicate` policy, see [`crate::core::dedup`], and
//! under `aggregate` with [`FLAG_ORDERED`], see [`crate::core::reorder`]),
//! 16 bytes right after the fixed header:
//!
//! ```text
//! +---------------------------------------------------------------+
//! |                  Sender instance (random, u32)                |
//! +---------------------------------------------------------------+
//! |                          Reserved (0)                         |
//! +---------------------------------------------------------------+
//! +            Peer sequence number (per peer, u64)               +
//! +---------------------------------------------------------------+
//! ```
//!
//! Flags: bit 0 ([`FLAG_PEER_SEQ`]) says the extension below follows;
//! bit 1 ([`FLAG_CHECKSUM_OK`]) says the sender vouches for the inner
//! packet's transport checksum (it computed it, cutting a super-packet
//! or finishing what its kernel left to finish, or its kernel had
//! verified it), so that the receiver may merge the packet into a
//! super-packet without checking it again ([`crate::core::coalesce`]); a
//! receiver that does not know it checks, or does not merge;
//! bit 2 ([`FLAG_ORDERED`]) says the peer sequence numbers an `aggregate`
//! stream, spread over several paths: the receiver puts the packets back
//! in order rather than drop copies (a receiver that does not know it drops
//! copies, which an `aggregate` sender never makes, and delivers out of order);
//! bit 3 ([`FLAG_FEC`]) says the peer sequence numbers a stream that
//! forward error correction protects ([`crate::core::fec`]): one sending
//! lane's packets (instance: the sender's plus the lane), never copies, so
//! the receiver feeds them to its FEC decoder rather than to the duplicate
//! window (a receiver that does not know it runs the window, which delivers
//! them all: there are no copies);
//! bits 4 to 6 ([`LANE_MASK`]) carry the sender's lane, 0 to 7: the
//! forwarding thread of the sender that the datagram's flow belongs to.
//! A receiver with several lanes hands the datagram to its own lane of
//! that number (modulo its lane count), so that both directions of a flow
//! stay with one thread on each side ([`crate::io::lanes`]); it
//! changes nothing else, and a receiver that does not know it ignores it.
//! Bit 7 is reserved (0).
//!
//! The format grows without breaking old receivers: the header length
//! says where the inner packet starts, so a newer sender can append
//! extensions (a duplicate-suppression sequence, an authentication tag
//! reference) that an older receiver skips. Flags that a receiver does
//! not know are ignored unless they change the payload's meaning, which
//! is signalled with a new message type instead.

use thiserror::Error;

/// Current overlay version.
pub const VERSION: u8 = 1;
/// Length of the fixed part of the header.
pub const BASE_LEN: usize = 16;
/// Length of the peer-sequence extension.
pub const PEER_SEQ_LEN: usize = 16;
/// The longest header this build writes.
pub const MAX_LEN: usize = BASE_LEN + PEER_SEQ_LEN;
/// Flag: the peer-sequence extension follows the fixed header.
pub const FLAG_PEER_SEQ: u8 = 0x01;
/// Flag: the peer sequence numbers an `aggregate` stream (resequence it).
pub const FLAG_ORDERED: u8 = 0x04;
/// Flag: the sender vouches for the inner packet's transport checksum.
pub const FLAG_CHECKSUM_OK: u8 = 0x02;
/// Flag: the peer sequence numbers a stream protected by FEC parity.
pub const FLAG_FEC: u8 = 0x08;
/// Flags bits holding the sender's lane.
pub const LANE_MASK: u8 = 0x70;
/// Where the lane starts in the flags byte.
pub const LANE_SHIFT: u32 = 4;
/// Lanes the flags can name.
pub const MAX_LANES: usize = 8;
/// Offset of the flags byte in a datagram.
pub const FLAGS_AT: usize = 3;

/// What the datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    /// A plaintext inner IP packet.
    Data = 1,
    /// A round-trip probe: the sequence field carries the sender's
    /// timestamp, opaque to the receiver, which answers with an
    /// [`MsgType::EchoReply`] carrying the same value. No payload.
    EchoRequest = 2,
    /// The answer to an [`MsgType::EchoRequest`].
    EchoReply = 3,
    /// [`MsgType::Data`] sealed with the peer's key: the payload is the
    /// encrypted inner packet followed by a 16-byte tag
    /// ([`crate::core::crypto`]). A distinct type, so that a sealed payload is
    /// never mistaken for a plaintext one or the other way round.
    SealedData = 4,
    /// [`MsgType::EchoRequest`], authenticated (payload: the tag only).
    SealedEchoRequest = 5,
    /// [`MsgType::EchoReply`], authenticated (payload: the tag only).
    SealedEchoReply = 6,
    /// A path-quality probe: the sequence field carries the sender's probe
    /// number (per path, counting up); the payload is a [`ProbeClass`] byte
    /// and padding, so that a large probe is as long as the path's largest
    /// data datagram. The receiver answers each at once with a
    /// [`MsgType::ProbeReply`] carrying the same number and a
    /// [`ProbeReport`] ([`crate::core::quality`]).
    ProbeRequest = 7,
    /// The answer to a [`MsgType::ProbeRequest`]: payload a [`ProbeReport`].
    ProbeReply = 8,
    /// [`MsgType::ProbeRequest`], sealed (payload encrypted, then the tag).
    SealedProbeRequest = 9,
    /// [`MsgType::ProbeReply`], sealed (payload encrypted, then the tag).
    SealedProbeReply = 10,
    /// A key-pair handshake message ([`crate::core::handshake`]): the
    /// sequence field says which (initiation, response, confirm), the
    /// epoch field which session; authenticated by its own means.
    Handshake = 11,
    /// A forward-error-correction parity packet of a block of the peer's
    /// data packets: payload a [`FecParity`] ([`crate::core::fec`]). The
    /// fixed header's sequence field is 0 (parity is not numbered with the
    /// path's data). A receiver that does not know the type drops it as
    /// [`OverlayError::BadType`], and gets the data as without FEC.
    FecParity = 20,
    /// [`MsgType::FecParity`], sealed (payload encrypted, then the tag).
    SealedFecParity = 21,
}

impl MsgType {
    /// Whether the message is sealed with the peer's key.
    pub fn is_sealed(self) -> bool {
        matches!(
            self,
            MsgType::SealedData
                | MsgType::SealedEchoRequest
                | MsgType::SealedEchoReply
                | MsgType::SealedProbeRequest
                | MsgType::SealedProbeReply
                | MsgType::SealedFecParity
        )
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(MsgType::Data),
            2 => Some(MsgType::EchoRequest),
            3 => Some(MsgType::EchoReply),
            4 => Some(MsgType::SealedData),
            5 => Some(MsgType::SealedEchoRequest),
            6 => Some(MsgType::SealedEchoReply),
            7 => Some(MsgType::ProbeRequest),
            8 => Some(MsgType::ProbeReply),
            9 => Some(MsgType::SealedProbeRequest),
            10 => Some(MsgType::SealedProbeReply),
            11 => Some(MsgType::Handshake),
            20 => Some(MsgType::FecParity),
            21 => Some(MsgType::SealedFecParity),
            _ => None,
        }
    }
}

/// Why an overlay datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum OverlayError {
    #[error("datagram shorter than the overlay header")]
    Truncated,
    #[error("unsupported overlay version {0}")]
    BadVersion(u8),
    #[error("unknown overlay message type {0}")]
    BadType(u8),
    #[error("header length field out of range")]
    BadHeaderLength,
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// The per-peer sequence of the `duplicate` policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSeq {
    /// Random per sender start, so a restarted sender is recognised.
    pub instance: u32,
    pub sequence: u64,
}

/// The parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub msg_type: MsgType,
    pub flags: u8,
    pub epoch: u32,
    pub sequence: u64,
    /// The peer-sequence extension, when present.
    pub peer_seq: Option<PeerSeq>,
}

impl Header {
    /// A data header with the given sequence number.
    pub fn data(sequence: u64) -> Self {
        Header {
            msg_type: MsgType::Data,
            flags: 0,
            epoch: 0,
            sequence,
            peer_seq: None,
        }
    }

    /// Adds the peer-sequence extension.
    pub fn with_peer_seq(mut self, peer_seq: PeerSeq) -> Self {
        self.flags |= FLAG_PEER_SEQ;
        self.peer_seq = Some(peer_seq);
        self
    }

    /// Marks the peer sequence as an `aggregate` stream ([`FLAG_ORDERED`]).
    pub fn ordered(mut self) -> Self {
        self.flags |= FLAG_ORDERED;
        self
    }

    /// Whether the peer sequence numbers an `aggregate` stream.
    pub fn is_ordered(&self) -> bool {
        self.flags & FLAG_ORDERED != 0 && self.peer_seq.is_some()
    }

    /// Marks the peer sequence as a stream FEC protects ([`FLAG_FEC`]).
    pub fn fec(mut self) -> Self {
        self.flags |= FLAG_FEC;
        self
    }

    /// Whether the peer sequence numbers a stream FEC protects.
    pub fn is_fec(&self) -> bool {
        self.flags & FLAG_FEC != 0 && self.peer_seq.is_some()
    }

    /// Sets the sender's lane (taken modulo [`MAX_LANES`]).
    pub fn with_lane(mut self, lane: usize) -> Self {
        let lane = (lane % MAX_LANES) as u8;
        self.flags = (self.flags & !LANE_MASK) | (lane << LANE_SHIFT);
        self
    }

    /// Says whether the sender vouches for the inner packet's transport
    /// checksum ([`FLAG_CHECKSUM_OK`]).
    pub fn with_checksum_ok(mut self, ok: bool) -> Self {
        self.flags = match ok {
            true => self.flags | FLAG_CHECKSUM_OK,
            false => self.flags & !FLAG_CHECKSUM_OK,
        };
        self
    }

    /// Whether the sender vouches for the inner packet's transport checksum.
    pub fn checksum_ok(&self) -> bool {
        self.flags & FLAG_CHECKSUM_OK != 0
    }

    /// The sender's lane.
    pub fn lane(&self) -> usize {
        usize::from((self.flags & LANE_MASK) >> LANE_SHIFT)
    }

    /// The header's length on the wire.
    pub fn len(&self) -> usize {
        if self.peer_seq.is_some() {
            MAX_LEN
        } else {
            BASE_LEN
        }
    }

    /// Never: a header has at least its fixed part.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// An echo request or reply carrying `stamp` in the sequence field.
    pub fn echo(msg_type: MsgType, stamp: u64) -> Self {
        Header {
            msg_type,
            flags: 0,
            epoch: 0,
            sequence: stamp,
            peer_seq: None,
        }
    }

    /// Parses the header and returns it with the offset of the payload.
    pub fn parse(buf: &[u8]) -> Result<(Header, usize), OverlayError> {
        let fixed: &[u8; BASE_LEN] = buf
            .get(..BASE_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(OverlayError::Truncated)?;
        if fixed[0] != VERSION {
            return Err(OverlayError::BadVersion(fixed[0]));
        }
        let msg_type = MsgType::from_u8(fixed[1]).ok_or(OverlayError::BadType(fixed[1]))?;
        let hlen = usize::from(fixed[2]);
        if hlen < BASE_LEN || hlen > buf.len() {
            return Err(OverlayError::BadHeaderLength);
        }
        let epoch = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let flags = fixed[3];
        let peer_seq = if flags & FLAG_PEER_SEQ != 0 {
            let ext: &[u8; PEER_SEQ_LEN] = buf
                .get(BASE_LEN..hlen)
                .and_then(|b| b.get(..PEER_SEQ_LEN))
                .and_then(|b| b.try_into().ok())
                .ok_or(OverlayError::BadHeaderLength)?;
            Some(PeerSeq {
                instance: u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]),
                sequence: be_u64(&ext[8..16]),
            })
        } else {
            None
        };
        let header = Header {
            msg_type,
            flags,
            epoch,
            sequence: be_u64(&fixed[8..16]),
            peer_seq,
        };
        Ok((header, hlen))
    }

    /// Writes the header (with its extension, if any) into the first
    /// [`Header::len`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, OverlayError> {
        let len = self.len();
        let head = out.get_mut(..len).ok_or(OverlayError::BufferTooSmall)?;
        head[0] = VERSION;
        head[1] = self.msg_type as u8;
        head[2] = len as u8;
        head[3] = match self.peer_seq {
            Some(_) => self.flags | FLAG_PEER_SEQ,
            None => self.flags & !FLAG_PEER_SEQ,
        };
        head[4..8].copy_from_slice(&self.epoch.to_be_bytes());
        head[8..16].copy_from_slice(&self.sequence.to_be_bytes());
        if let Some(p) = self.peer_seq {
            head[16..20].copy_from_slice(&p.instance.to_be_bytes());
            head[20..24].fill(0);
            head[24..32].copy_from_slice(&p.sequence.to_be_bytes());
        }
        Ok(len)
    }
}

/// Which kind of probe a [`MsgType::ProbeRequest`] is (its first payload
/// byte): the receiver counts each kind apart, so that the loss of large
/// probes alone (an MTU black hole) is told from loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeClass {
    /// A short probe: loss, round trip and delay variation.
    Small = 0,
    /// A probe as long as the path's largest data datagram.
    Large = 1,
}

impl ProbeClass {
    /// The class a request's payload names; an unknown byte counts as
    /// small (a newer sender's class an older receiver does not know).
    pub fn from_payload(payload: &[u8]) -> ProbeClass {
        match payload.first() {
            Some(1) => ProbeClass::Large,
            _ => ProbeClass::Small,
        }
    }
}

/// What the receiver of probes reports in each [`MsgType::ProbeReply`]:
/// cumulative counts of what it received on the path from the prober's
/// side, so that a lost reply loses nothing but its own sample.
///
/// ```text
/// +---------------------------------------------------------------+
/// +           Small probes received (u64, cumulative)             +
/// +---------------------------------------------------------------+
/// +           Large probes received (u64, cumulative)             +
/// +---------------------------------------------------------------+
/// +      Receive time of the request (u64, ns, receiver's clock)  +
/// +---------------------------------------------------------------+
/// +        Data datagrams received on the path (u64, cumulative)  +
/// +---------------------------------------------------------------+
/// +     Highest data sequence number received on the path (u64)   +
/// +---------------------------------------------------------------+
/// |   Length of the request as received (u32)                     |
/// +---------------------------------------------------------------+
/// |     Flags     |                  Reserved (0)                 |
/// +---------------------------------------------------------------+
/// ```
///
/// Only differences between two reports mean anything: the receive time
/// is on the receiver's clock (its delay variation is what counts), and
/// the counts start at the receiver's start.
///
/// Flags: bit 0 ([`ProbeReport::UNSETTLED`]), the data counts are not
/// settled: a receiving lane of the path has been behind the others for
/// a while, so the highest number seen may run ahead of the datagrams
/// counted (see [`crate::core::quality`]). A sender that knows no flag
/// writes 0; a receiver ignores the bits it does not know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeReport {
    pub small_received: u64,
    pub large_received: u64,
    pub received_at_ns: u64,
    pub data_received: u64,
    pub data_seq_high: u64,
    pub request_len: u32,
    /// The data counts are not settled (flag bit 0).
    pub data_unsettled: bool,
}

impl ProbeReport {
    /// Its length on the wire.
    pub const LEN: usize = 48;
    /// Flag bit: the data counts are not settled.
    pub const UNSETTLED: u8 = 1;

    /// Parses a report from a reply's payload (longer payloads: the rest
    /// is a newer sender's and skipped).
    pub fn parse(buf: &[u8]) -> Result<ProbeReport, OverlayError> {
        let b: &[u8; Self::LEN] = buf
            .get(..Self::LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(OverlayError::Truncated)?;
        Ok(ProbeReport {
            small_received: be_u64(&b[0..8]),
            large_received: be_u64(&b[8..16]),
            received_at_ns: be_u64(&b[16..24]),
            data_received: be_u64(&b[24..32]),
            data_seq_high: be_u64(&b[32..40]),
            request_len: u32::from_be_bytes([b[40], b[41], b[42], b[43]]),
            data_unsettled: b[44] & Self::UNSETTLED != 0,
        })
    }

    /// Writes the report into the first [`ProbeReport::LEN`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, OverlayError> {
        let b = out
            .get_mut(..Self::LEN)
            .ok_or(OverlayError::BufferTooSmall)?;
        b[0..8].copy_from_slice(&self.small_received.to_be_bytes());
        b[8..16].copy_from_slice(&self.large_received.to_be_bytes());
        b[16..24].copy_from_slice(&self.received_at_ns.to_be_bytes());
        b[24..32].copy_from_slice(&self.data_received.to_be_bytes());
        b[32..40].copy_from_slice(&self.data_seq_high.to_be_bytes());
        b[40..44].copy_from_slice(&self.request_len.to_be_bytes());
        b[44] = if self.data_unsettled {
            Self::UNSETTLED
        } else {
            0
        };
        b[45..48].fill(0);
        Ok(Self::LEN)
    }
}

/// The payload of a [`MsgType::FecParity`]: which block of which sender
/// the parity protects, and the parity shard ([`crate::core::fec`]).
///
/// ```text
/// +---------------------------------------------------------------+
/// |                 Sender instance (u32, as PeerSeq)             |
/// +---------------------------------------------------------------+
/// +      First peer sequence number of the block (u64)            +
/// +---------------------------------------------------------------+
/// |  k (data, u8) |  m (parity,u8)| Index (< m, u8)| Reserved (0) |
/// +---------------------------------------------------------------+
/// |       Parity shard (even length: 2 + the block's longest) ... |
/// ```
///
/// The block is the data packets numbered `first .. first + k` under the
/// instance (their peer-sequence extension); `index` is this parity's
/// place among the block's `m`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FecParity {
    pub instance: u32,
    pub first: u64,
    pub k: u8,
    pub m: u8,
    pub index: u8,
    pub shard: Vec<u8>,
}

impl FecParity {
    /// Length of the fields before the shard.
    pub const HEAD_LEN: usize = 16;

    /// Parses a parity payload (the shard is copied). Field values are
    /// checked by the decoder, not here.
    pub fn parse(buf: &[u8]) -> Result<FecParity, OverlayError> {
        let h: &[u8; Self::HEAD_LEN] = buf
            .get(..Self::HEAD_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(OverlayError::Truncated)?;
        Ok(FecParity {
            instance: u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
            first: be_u64(&h[4..12]),
            k: h[12],
            m: h[13],
            index: h[14],
            shard: buf.get(Self::HEAD_LEN..).unwrap_or_default().to_vec(),
        })
    }

    /// Its length on the wire.
    pub fn len(&self) -> usize {
        Self::HEAD_LEN + self.shard.len()
    }

    /// Never: the fields come first.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the payload into the first [`FecParity::len`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, OverlayError> {
        let b = out
            .get_mut(..self.len())
            .ok_or(OverlayError::BufferTooSmall)?;
        b[0..4].copy_from_slice(&self.instance.to_be_bytes());
        b[4..12].copy_from_slice(&self.first.to_be_bytes());
        b[12] = self.k;
        b[13] = self.m;
        b[14] = self.index;
        b[15] = 0;
        b[Self::HEAD_LEN..].copy_from_slice(&self.shard);
        Ok(self.len())
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    if let Some(src) = b.get(..8) {
        v.copy_from_slice(src);
    }
    u64::from_be_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_seq_extension_round_trip() {
        let p = PeerSeq {
            instance: 0xdead_beef,
            sequence: u64::MAX - 1,
        };
        let h = Header::data(5).with_peer_seq(p);
        let mut buf = [0u8; 40];
        assert_eq!(h.emit(&mut buf), Ok(MAX_LEN));
        assert_eq!(buf[2] as usize, MAX_LEN);
        let (back, off) = Header::parse(&buf).unwrap();
        assert_eq!(back.peer_seq, Some(p));
        assert_eq!(back.sequence, 5);
        assert_eq!(off, MAX_LEN);
        // Flag set but the header length leaves no room for the extension.
        let mut short = buf;
        short[2] = 24;
        assert_eq!(Header::parse(&short), Err(OverlayError::BadHeaderLength));
        assert_eq!(
            Header::parse(&buf[..MAX_LEN - 1]),
            Err(OverlayError::BadHeaderLength)
        );
        assert_eq!(h.emit(&mut [0u8; 20]), Err(OverlayError::BufferTooSmall));
    }

    #[test]
    fn lane_travels_in_flags_bits_4_to_6() {
        for lane in 0..MAX_LANES {
            let h = Header::data(3)
                .with_peer_seq(PeerSeq {
                    instance: 1,
                    sequence: 2,
                })
                .with_lane(lane);
            let mut buf = [0u8; 40];
            h.emit(&mut buf).unwrap();
            assert_eq!(buf[FLAGS_AT], FLAG_PEER_SEQ | (lane as u8) << 4);
            let (back, _) = Header::parse(&buf).unwrap();
            assert_eq!(back.lane(), lane);
            assert_eq!(back.peer_seq, h.peer_seq);
        }
        // Beyond the field: modulo, never into another bit.
        assert_eq!(Header::data(1).with_lane(9).lane(), 1);
        assert_eq!(Header::data(1).with_lane(9).flags & !LANE_MASK, 0);
        // A header of a sender without lanes is lane 0.
        assert_eq!(Header::data(1).lane(), 0);
    }

    #[test]
    fn the_checksum_vouch_is_bit_1_and_leaves_the_rest_alone() {
        let h = Header::data(3).with_lane(5).with_checksum_ok(true);
        let mut buf = [0u8; 16];
        h.emit(&mut buf).unwrap();
        assert_eq!(buf[FLAGS_AT], FLAG_CHECKSUM_OK | 5 << 4);
        let (back, _) = Header::parse(&buf).unwrap();
        assert!(back.checksum_ok());
        assert_eq!(back.lane(), 5);
        assert_eq!(back.peer_seq, None);
        let off = back.with_checksum_ok(false);
        assert!(!off.checksum_ok());
        assert_eq!(off.lane(), 5);
        assert!(
            !Header::data(1).checksum_ok(),
            "not vouched for unless said"
        );
    }

    #[test]
    fn receiver_that_ignores_the_flag_skips_the_extension() {
        // An older receiver only reads the fixed part and the header length.
        let mut buf = [0u8; 48];
        Header::data(9)
            .with_peer_seq(PeerSeq {
                instance: 1,
                sequence: 2,
            })
            .emit(&mut buf)
            .unwrap();
        assert_eq!(usize::from(buf[2]), 32);
        assert_eq!(be_u64(&buf[8..16]), 9);
    }

    #[test]
    fn round_trip() {
        let h = Header {
            msg_type: MsgType::Data,
            flags: 0x80,
            epoch: 7,
            sequence: 0x0102_0304_0506_0708,
            peer_seq: None,
        };
        let mut buf = [0u8; 40];
        assert_eq!(h.emit(&mut buf), Ok(BASE_LEN));
        let (back, off) = Header::parse(&buf).unwrap();
        assert_eq!(back, h);
        assert_eq!(off, BASE_LEN);
    }

    #[test]
    fn echo_round_trip() {
        let mut buf = [0u8; BASE_LEN];
        Header::echo(MsgType::EchoRequest, 77)
            .emit(&mut buf)
            .unwrap();
        let (h, off) = Header::parse(&buf).unwrap();
        assert_eq!(
            (h.msg_type, h.sequence, off),
            (MsgType::EchoRequest, 77, BASE_LEN)
        );
        buf[1] = 3;
        assert_eq!(Header::parse(&buf).unwrap().0.msg_type, MsgType::EchoReply);
    }

    #[test]
    fn extensions_are_skipped() {
        let mut buf = [0u8; 40];
        Header::data(9).emit(&mut buf).unwrap();
        buf[2] = 24; // a future sender appended 8 bytes of extensions
        let (h, off) = Header::parse(&buf).unwrap();
        assert_eq!(h.sequence, 9);
        assert_eq!(off, 24);
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        let mut good = [0u8; BASE_LEN];
        Header::data(1).emit(&mut good).unwrap();
        for len in 0..BASE_LEN {
            assert_eq!(Header::parse(&good[..len]), Err(OverlayError::Truncated));
        }
        let mut v = good;
        v[0] = 2;
        assert_eq!(Header::parse(&v), Err(OverlayError::BadVersion(2)));
        let mut t = good;
        t[1] = 0;
        assert_eq!(Header::parse(&t), Err(OverlayError::BadType(0)));
        t[1] = 12;
        assert_eq!(Header::parse(&t), Err(OverlayError::BadType(12)));
        t[1] = 11;
        assert_eq!(Header::parse(&t).unwrap().0.msg_type, MsgType::Handshake);
        assert!(!MsgType::Handshake.is_sealed());
        t[1] = 4;
        assert_eq!(Header::parse(&t).unwrap().0.msg_type, MsgType::SealedData);
        assert!(MsgType::SealedData.is_sealed() && !MsgType::Data.is_sealed());
        let mut l = good;
        l[2] = 8;
        assert_eq!(Header::parse(&l), Err(OverlayError::BadHeaderLength));
        l[2] = 17;
        assert_eq!(Header::parse(&l), Err(OverlayError::BadHeaderLength));
        assert_eq!(
            Header::data(1).emit(&mut [0u8; 4]),
            Err(OverlayError::BufferTooSmall)
        );
    }

    #[test]
    fn probe_report_round_trip_and_truncation() {
        let r = ProbeReport {
            small_received: 1,
            large_received: 2,
            received_at_ns: u64::MAX - 3,
            data_received: 4,
            data_seq_high: 5,
            request_len: 1500,
            data_unsettled: false,
        };
        let mut buf = [0xffu8; ProbeReport::LEN + 4];
        assert_eq!(r.emit(&mut buf), Ok(ProbeReport::LEN));
        assert_eq!(ProbeReport::parse(&buf), Ok(r));
        assert_eq!(&buf[44..48], &[0, 0, 0, 0], "flags and reserved are zero");
        let unsettled = ProbeReport {
            data_unsettled: true,
            ..r
        };
        assert_eq!(unsettled.emit(&mut buf), Ok(ProbeReport::LEN));
        assert_eq!(&buf[44..48], &[1, 0, 0, 0]);
        assert_eq!(ProbeReport::parse(&buf), Ok(unsettled));
        // Bits this version does not know are ignored.
        buf[44] = 0xfe;
        buf[47] = 0xff;
        assert_eq!(ProbeReport::parse(&buf), Ok(r));
        assert_eq!(
            ProbeReport::parse(&buf[..ProbeReport::LEN - 1]),
            Err(OverlayError::Truncated)
        );
        assert_eq!(r.emit(&mut [0u8; 10]), Err(OverlayError::BufferTooSmall));
    }

    #[test]
    fn fec_parity_round_trip_and_truncation() {
        let p = FecParity {
            instance: 0xfeed_f00d,
            first: u64::MAX - 9,
            k: 10,
            m: 2,
            index: 1,
            shard: vec![1, 2, 3, 4],
        };
        let mut buf = [0xffu8; 24];
        assert_eq!(p.emit(&mut buf), Ok(20));
        assert_eq!(buf[15], 0, "reserved is zero");
        assert_eq!(FecParity::parse(&buf[..20]), Ok(p.clone()));
        assert_eq!(
            FecParity::parse(&buf[..FecParity::HEAD_LEN - 1]),
            Err(OverlayError::Truncated)
        );
        assert_eq!(
            FecParity::parse(&buf[..FecParity::HEAD_LEN]).map(|p| p.shard.len()),
            Ok(0)
        );
        assert_eq!(p.emit(&mut [0u8; 19]), Err(OverlayError::BufferTooSmall));
        for (t, sealed) in [(20u8, false), (21, true)] {
            let m = MsgType::from_u8(t).unwrap();
            assert_eq!((m as u8, m.is_sealed()), (t, sealed));
        }
    }

    #[test]
    fn probe_types_parse_and_seal_as_their_pairs() {
        for (t, sealed) in [(7u8, false), (8, false), (9, true), (10, true)] {
            let m = MsgType::from_u8(t).unwrap();
            assert_eq!(m as u8, t);
            assert_eq!(m.is_sealed(), sealed);
        }
        assert_eq!(MsgType::from_u8(12), None);
        assert_eq!(ProbeClass::from_payload(&[1, 0]), ProbeClass::Large);
        assert_eq!(ProbeClass::from_payload(&[0]), ProbeClass::Small);
        assert_eq!(ProbeClass::from_payload(&[7]), ProbeClass::Small);
        assert_eq!(ProbeClass::from_payload(&[]), ProbeClass::Small);
    }
}
