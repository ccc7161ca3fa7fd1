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
}

impl MsgType {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(MsgType::Data),
            2 => Some(MsgType::EchoRequest),
            3 => Some(MsgType::EchoReply),
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

/// The parsed fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub msg_type: MsgType,
    pub flags: u8,
    pub epoch: u32,
    pub sequence: u64,
}

impl Header {
    /// A data header with the given sequence number.
    pub fn data(sequence: u64) -> Self {
        Header {
            msg_type: MsgType::Data,
            flags: 0,
            epoch: 0,
            sequence,
        }
    }

    /// An echo request or reply carrying `stamp` in the sequence field.
    pub fn echo(msg_type: MsgType, stamp: u64) -> Self {
        Header {
            msg_type,
            flags: 0,
            epoch: 0,
            sequence: stamp,
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
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&fixed[8..16]);
        let header = Header {
            msg_type,
            flags: fixed[3],
            epoch,
            sequence: u64::from_be_bytes(seq),
        };
        Ok((header, hlen))
    }

    /// Writes the fixed header into the first [`BASE_LEN`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, OverlayError> {
        let fixed = out
            .get_mut(..BASE_LEN)
            .ok_or(OverlayError::BufferTooSmall)?;
        fixed[0] = VERSION;
        fixed[1] = self.msg_type as u8;
        fixed[2] = BASE_LEN as u8;
        fixed[3] = self.flags;
        fixed[4..8].copy_from_slice(&self.epoch.to_be_bytes());
        fixed[8..16].copy_from_slice(&self.sequence.to_be_bytes());
        Ok(BASE_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header {
            msg_type: MsgType::Data,
            flags: 0x80,
            epoch: 7,
            sequence: 0x0102_0304_0506_0708,
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
        t[1] = 9;
        assert_eq!(Header::parse(&t), Err(OverlayError::BadType(9)));
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
}
