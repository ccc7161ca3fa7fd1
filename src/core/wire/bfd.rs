//! BFD Control packet codec (RFC 5880 §4.1, authentication sections §4.2–§4.4).
//!
//! [`ControlPacket::parse`] performs the packet-level checks of §6.8.6 (version, length,
//! detect multiplier, multipoint, my discriminator, auth section shape). The checks that
//! need session context (your discriminator, state, authentication) belong to
//! [`crate::core::bfd::Session::handle_packet`].
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Vers |  Diag   |Sta|P|F|C|A|D|M|  Detect Mult  |    Length     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       My Discriminator                        |
//! |                      Your Discriminator                       |
//! |                    Desired Min TX Interval                    |
//! |                   Required Min RX Interval                    |
//! |                 Required Min Echo RX Interval                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   Auth Type   |   Auth Len    |    Authentication Data...     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Nothing here panics on input: every read goes through a length-checked slice.

/// The protocol version this codec speaks (RFC 5880 §4.1).
pub const BFD_VERSION: u8 = 1;
/// Length of the mandatory section.
pub const HEADER_LEN: usize = 24;
/// Largest packet this codec emits (header + keyed SHA1 auth section).
pub const MAX_PACKET_LEN: usize = HEADER_LEN + SHA1_AUTH_LEN;

const MD5_AUTH_LEN: usize = 24;
const SHA1_AUTH_LEN: usize = 28;
const MD5_DIGEST_LEN: usize = 16;
const SHA1_DIGEST_LEN: usize = 20;
const MAX_PASSWORD_LEN: usize = 16;

const FLAG_POLL: u8 = 0x20;
const FLAG_FINAL: u8 = 0x10;
const FLAG_CPI: u8 = 0x08;
const FLAG_AUTH: u8 = 0x04;
const FLAG_DEMAND: u8 = 0x02;
const FLAG_MULTIPOINT: u8 = 0x01;

/// Session state as carried in the `Sta` field (RFC 5880 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    /// Every state, in wire order.
    pub const ALL: [State; 4] = [State::AdminDown, State::Down, State::Init, State::Up];

    /// Decodes the two-bit field; only the low two bits of `bits` are used.
    pub fn from_bits(bits: u8) -> State {
        match bits & 0x3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    /// Snake-case label used in status output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::AdminDown => "admin_down",
            State::Down => "down",
            State::Init => "init",
            State::Up => "up",
        }
    }
}

/// Diagnostic code (RFC 5880 §4.1). Codes 9–31 are kept as `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Diag {
    None,
    ControlDetectionExpired,
    EchoFailed,
    NeighborDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    Unknown(u8),
}

impl Diag {
    /// Decodes a diagnostic code (the low five bits on the wire).
    pub fn from_u8(code: u8) -> Diag {
        match code {
            0 => Diag::None,
            1 => Diag::ControlDetectionExpired,
            2 => Diag::EchoFailed,
            3 => Diag::NeighborDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            other => Diag::Unknown(other),
        }
    }

    /// The numeric code.
    pub fn code(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::ControlDetectionExpired => 1,
            Diag::EchoFailed => 2,
            Diag::NeighborDown => 3,
            Diag::ForwardingPlaneReset => 4,
            Diag::PathDown => 5,
            Diag::ConcatenatedPathDown => 6,
            Diag::AdministrativelyDown => 7,
            Diag::ReverseConcatenatedPathDown => 8,
            Diag::Unknown(code) => code,
        }
    }

    /// Snake-case label used in status output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Diag::None => "none",
            Diag::ControlDetectionExpired => "control_detection_expired",
            Diag::EchoFailed => "echo_failed",
            Diag::NeighborDown => "neighbor_down",
            Diag::ForwardingPlaneReset => "forwarding_plane_reset",
            Diag::PathDown => "path_down",
            Diag::ConcatenatedPathDown => "concatenated_path_down",
            Diag::AdministrativelyDown => "admin_down",
            Diag::ReverseConcatenatedPathDown => "reverse_concatenated_path_down",
            Diag::Unknown(_) => "unknown",
        }
    }
}

/// Authentication types (RFC 5880 §4.1, Auth Type field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthType {
    SimplePassword = 1,
    KeyedMd5 = 2,
    MeticulousKeyedMd5 = 3,
    KeyedSha1 = 4,
    MeticulousKeyedSha1 = 5,
}

impl AuthType {
    /// Decodes the Auth Type field; reserved values give `None`.
    pub fn from_u8(value: u8) -> Option<AuthType> {
        match value {
            1 => Some(AuthType::SimplePassword),
            2 => Some(AuthType::KeyedMd5),
            3 => Some(AuthType::MeticulousKeyedMd5),
            4 => Some(AuthType::KeyedSha1),
            5 => Some(AuthType::MeticulousKeyedSha1),
            _ => None,
        }
    }

    /// Whether this type carries a sequence number (every type but the password).
    pub fn has_sequence(self) -> bool {
        self != AuthType::SimplePassword
    }
}

/// An authentication section, parsed but not verified. `data` is the password
/// (§4.2) or the digest (§4.3, §4.4) exactly as received, so a verifier can
/// recompute the digest over the original packet bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthSection {
    pub auth_type: u8,
    pub key_id: u8,
    /// Sequence number; 0 for simple password.
    pub sequence: u32,
    /// Password (1–16 bytes) or digest (16 bytes MD5, 20 bytes SHA1).
    pub data: Vec<u8>,
}

impl AuthSection {
    /// The Auth Len field for this section, or `None` if the section is malformed
    /// (reserved type, or data of the wrong size for the type).
    pub fn wire_len(&self) -> Option<usize> {
        let len = self.data.len();
        match AuthType::from_u8(self.auth_type)? {
            AuthType::SimplePassword if (1..=MAX_PASSWORD_LEN).contains(&len) => Some(3 + len),
            AuthType::KeyedMd5 | AuthType::MeticulousKeyedMd5 if len == MD5_DIGEST_LEN => {
                Some(MD5_AUTH_LEN)
            }
            AuthType::KeyedSha1 | AuthType::MeticulousKeyedSha1 if len == SHA1_DIGEST_LEN => {
                Some(SHA1_AUTH_LEN)
            }
            _ => None,
        }
    }

    /// Parses an auth section from `sec` (everything after the mandatory header, up to
    /// the Length field).
    fn parse(sec: &[u8]) -> Result<AuthSection, ParseError> {
        let (auth_type, auth_len) = match sec {
            [t, l, ..] => (*t, usize::from(*l)),
            _ => return Err(ParseError::BadAuth),
        };
        let body = sec.get(..auth_len).ok_or(ParseError::BadAuth)?;
        let kind = AuthType::from_u8(auth_type).ok_or(ParseError::BadAuth)?;
        let section = match (kind, body) {
            // §4.2: Type, Len, Key ID, Password (1..16).
            (AuthType::SimplePassword, [_, _, key_id, password @ ..])
                if (1..=MAX_PASSWORD_LEN).contains(&password.len()) =>
            {
                AuthSection {
                    auth_type,
                    key_id: *key_id,
                    sequence: 0,
                    data: password.to_vec(),
                }
            }
            // §4.3 / §4.4: Type, Len, Key ID, Reserved, Sequence (4), Digest.
            (_, [_, _, key_id, _reserved, s0, s1, s2, s3, digest @ ..])
                if kind.has_sequence() && Some(auth_len) == Self::keyed_len(kind) =>
            {
                AuthSection {
                    auth_type,
                    key_id: *key_id,
                    sequence: u32::from_be_bytes([*s0, *s1, *s2, *s3]),
                    data: digest.to_vec(),
                }
            }
            _ => return Err(ParseError::BadAuth),
        };
        Ok(section)
    }

    fn keyed_len(kind: AuthType) -> Option<usize> {
        match kind {
            AuthType::SimplePassword => None,
            AuthType::KeyedMd5 | AuthType::MeticulousKeyedMd5 => Some(MD5_AUTH_LEN),
            AuthType::KeyedSha1 | AuthType::MeticulousKeyedSha1 => Some(SHA1_AUTH_LEN),
        }
    }

    /// Writes the section into `out` (exactly `wire_len()` bytes).
    fn emit(&self, out: &mut [u8]) -> Result<(), EmitError> {
        let len = self.wire_len().ok_or(EmitError::BadAuth)?;
        let mut sec = [0u8; SHA1_AUTH_LEN];
        let len_byte = u8::try_from(len).map_err(|_| EmitError::BadAuth)?;
        sec[0] = self.auth_type;
        sec[1] = len_byte;
        sec[2] = self.key_id;
        let data_at = if self.auth_type == AuthType::SimplePassword as u8 {
            3
        } else {
            // sec[3] is reserved and stays zero.
            sec[4..8].copy_from_slice(&self.sequence.to_be_bytes());
            8
        };
        sec.get_mut(data_at..len)
            .ok_or(EmitError::BadAuth)?
            .copy_from_slice(&self.data);
        out.get_mut(..len)
            .ok_or(EmitError::BufferTooSmall)?
            .copy_from_slice(sec.get(..len).ok_or(EmitError::BadAuth)?);
        Ok(())
    }
}

/// A parsed BFD Control packet (RFC 5880 §4.1). Intervals are in microseconds, as on
/// the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ControlPacket {
    pub version: u8,
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    pub control_plane_independent: bool,
    pub auth_present: bool,
    pub demand: bool,
    pub multipoint: bool,
    pub detect_mult: u8,
    pub my_discriminator: u32,
    pub your_discriminator: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub required_min_echo_rx_us: u32,
    pub auth: Option<AuthSection>,
}

/// Why a received datagram is not a valid BFD Control packet (RFC 5880 §6.8.6, the
/// session-independent checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    #[error("packet shorter than the 24-byte mandatory section")]
    Truncated,
    #[error("unsupported BFD version {0}")]
    BadVersion(u8),
    #[error("length field is inconsistent with the packet")]
    BadLength,
    #[error("detect multiplier is zero")]
    ZeroDetectMult,
    #[error("multipoint bit is set")]
    Multipoint,
    #[error("my discriminator is zero")]
    ZeroMyDiscriminator,
    #[error("malformed authentication section")]
    BadAuth,
}

impl ParseError {
    /// Snake-case label for the drop-reason metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::BadVersion(_) => "bad_version",
            ParseError::BadLength => "bad_length",
            ParseError::ZeroDetectMult => "zero_detect_mult",
            ParseError::Multipoint => "multipoint",
            ParseError::ZeroMyDiscriminator => "zero_my_discriminator",
            ParseError::BadAuth => "bad_auth",
        }
    }
}

/// Why a [`ControlPacket`] cannot be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum EmitError {
    #[error("output buffer too small")]
    BufferTooSmall,
    #[error("auth_present does not match whether an auth section is given")]
    AuthFlagMismatch,
    #[error("malformed authentication section")]
    BadAuth,
    #[error("version or diagnostic does not fit its wire field")]
    FieldOutOfRange,
}

impl EmitError {
    /// Snake-case label.
    pub fn reason(&self) -> &'static str {
        match self {
            EmitError::BufferTooSmall => "buffer_too_small",
            EmitError::AuthFlagMismatch => "auth_flag_mismatch",
            EmitError::BadAuth => "bad_auth",
            EmitError::FieldOutOfRange => "field_out_of_range",
        }
    }
}

fn be32(bytes: [u8; 4]) -> u32 {
    u32::from_be_bytes(bytes)
}

impl ControlPacket {
    /// A version 1 packet in `state` between the two discriminators, with
    /// `interval_us` as both desired minimum TX and required minimum RX
    /// interval, detect multiplier 3, no flags, no echo and no
    /// authentication; change other fields with struct update syntax.
    pub fn new(
        state: State,
        my_discriminator: u32,
        your_discriminator: u32,
        interval_us: u32,
    ) -> ControlPacket {
        ControlPacket {
            version: BFD_VERSION,
            diag: Diag::None,
            state,
            poll: false,
            final_: false,
            control_plane_independent: false,
            auth_present: false,
            demand: false,
            multipoint: false,
            detect_mult: 3,
            my_discriminator,
            your_discriminator,
            desired_min_tx_us: interval_us,
            required_min_rx_us: interval_us,
            required_min_echo_rx_us: 0,
            auth: None,
        }
    }

    /// Parses and validates a Control packet. Bytes beyond the Length field are ignored.
    pub fn parse(buf: &[u8]) -> Result<ControlPacket, ParseError> {
        let h: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(ParseError::Truncated)?;
        let version = h[0] >> 5;
        if version != BFD_VERSION {
            return Err(ParseError::BadVersion(version));
        }
        let flags = h[1];
        let auth_present = flags & FLAG_AUTH != 0;
        let length = usize::from(h[3]);
        let min_len = if auth_present {
            HEADER_LEN + 2
        } else {
            HEADER_LEN
        };
        if length < min_len || length > buf.len() {
            return Err(ParseError::BadLength);
        }
        let detect_mult = h[2];
        if detect_mult == 0 {
            return Err(ParseError::ZeroDetectMult);
        }
        if flags & FLAG_MULTIPOINT != 0 {
            return Err(ParseError::Multipoint);
        }
        let my_discriminator = be32([h[4], h[5], h[6], h[7]]);
        if my_discriminator == 0 {
            return Err(ParseError::ZeroMyDiscriminator);
        }
        let auth = if auth_present {
            let sec = buf.get(HEADER_LEN..length).ok_or(ParseError::BadLength)?;
            Some(AuthSection::parse(sec)?)
        } else {
            None
        };
        Ok(ControlPacket {
            version,
            diag: Diag::from_u8(h[0] & 0x1f),
            state: State::from_bits(flags >> 6),
            poll: flags & FLAG_POLL != 0,
            final_: flags & FLAG_FINAL != 0,
            control_plane_independent: flags & FLAG_CPI != 0,
            auth_present,
            demand: flags & FLAG_DEMAND != 0,
            multipoint: false,
            detect_mult,
            my_discriminator,
            your_discriminator: be32([h[8], h[9], h[10], h[11]]),
            desired_min_tx_us: be32([h[12], h[13], h[14], h[15]]),
            required_min_rx_us: be32([h[16], h[17], h[18], h[19]]),
            required_min_echo_rx_us: be32([h[20], h[21], h[22], h[23]]),
            auth,
        })
    }

    /// Bytes [`emit`](Self::emit) writes: 24 plus the auth section, if any.
    /// A malformed auth section counts as absent here; `emit` rejects it.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN
            + self
                .auth
                .as_ref()
                .and_then(AuthSection::wire_len)
                .unwrap_or(0)
    }

    /// Writes the packet into `out` and returns its length. The Length field and the
    /// A bit are derived from `auth`; `auth_present` must agree with it.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        if self.auth_present != self.auth.is_some() {
            return Err(EmitError::AuthFlagMismatch);
        }
        let auth_len = match &self.auth {
            Some(a) => a.wire_len().ok_or(EmitError::BadAuth)?,
            None => 0,
        };
        let total = HEADER_LEN + auth_len;
        let diag = self.diag.code();
        if self.version > 7 || diag > 0x1f {
            return Err(EmitError::FieldOutOfRange);
        }
        let out = out.get_mut(..total).ok_or(EmitError::BufferTooSmall)?;
        let (head, tail) = out.split_at_mut(HEADER_LEN);
        let mut h = [0u8; HEADER_LEN];
        h[0] = (self.version << 5) | diag;
        h[1] = ((self.state as u8) << 6) | self.flag_bits();
        h[2] = self.detect_mult;
        h[3] = u8::try_from(total).map_err(|_| EmitError::BadAuth)?;
        h[4..8].copy_from_slice(&self.my_discriminator.to_be_bytes());
        h[8..12].copy_from_slice(&self.your_discriminator.to_be_bytes());
        h[12..16].copy_from_slice(&self.desired_min_tx_us.to_be_bytes());
        h[16..20].copy_from_slice(&self.required_min_rx_us.to_be_bytes());
        h[20..24].copy_from_slice(&self.required_min_echo_rx_us.to_be_bytes());
        head.copy_from_slice(&h);
        if let Some(auth) = &self.auth {
            auth.emit(tail)?;
        }
        Ok(total)
    }

    fn flag_bits(&self) -> u8 {
        [
            (self.poll, FLAG_POLL),
            (self.final_, FLAG_FINAL),
            (self.control_plane_independent, FLAG_CPI),
            (self.auth.is_some(), FLAG_AUTH),
            (self.demand, FLAG_DEMAND),
            (self.multipoint, FLAG_MULTIPOINT),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .fold(0, |acc, (_, bit)| acc | bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ControlPacket {
        ControlPacket {
            version: BFD_VERSION,
            diag: Diag::NeighborDown,
            state: State::Init,
            poll: true,
            final_: false,
            control_plane_independent: true,
            auth_present: false,
            demand: false,
            multipoint: false,
            detect_mult: 3,
            my_discriminator: 0x1122_3344,
            your_discriminator: 0x5566_7788,
            desired_min_tx_us: 10_000,
            required_min_rx_us: 20_000,
            required_min_echo_rx_us: 0,
            auth: None,
        }
    }

    fn with_auth(auth_type: AuthType, data_len: usize) -> ControlPacket {
        let mut p = sample();
        p.auth_present = true;
        p.auth = Some(AuthSection {
            auth_type: auth_type as u8,
            key_id: 7,
            sequence: if auth_type.has_sequence() {
                0xdead_beef
            } else {
                0
            },
            data: (1..=data_len as u8).collect(),
        });
        p
    }

    fn encode(p: &ControlPacket) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let n = p.emit(&mut buf).unwrap();
        assert_eq!(n, p.buffer_len());
        buf[..n].to_vec()
    }

    #[test]
    fn round_trip_without_auth() {
        let p = sample();
        let bytes = encode(&p);
        assert_eq!(bytes.len(), 24);
        assert_eq!(
            bytes,
            [
                0x23, 0xa8, 3, 24, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0, 0, 0x27,
                0x10, 0, 0, 0x4e, 0x20, 0, 0, 0, 0
            ]
        );
        assert_eq!(ControlPacket::parse(&bytes).unwrap(), p);
    }

    #[test]
    fn round_trip_every_state_diag_and_flag() {
        for state in State::ALL {
            for code in 0..32u8 {
                for flags in 0..32u8 {
                    let mut p = sample();
                    p.state = state;
                    p.diag = Diag::from_u8(code);
                    p.poll = flags & 1 != 0;
                    p.final_ = flags & 2 != 0;
                    p.control_plane_independent = flags & 4 != 0;
                    p.demand = flags & 8 != 0;
                    p.required_min_echo_rx_us = u32::from(flags);
                    let bytes = encode(&p);
                    assert_eq!(ControlPacket::parse(&bytes).unwrap(), p);
                }
            }
        }
    }

    #[test]
    fn round_trip_with_each_auth_type() {
        let cases = [
            (AuthType::SimplePassword, 1, 28),
            (AuthType::SimplePassword, 16, 43),
            (AuthType::KeyedMd5, 16, 48),
            (AuthType::MeticulousKeyedMd5, 16, 48),
            (AuthType::KeyedSha1, 20, 52),
            (AuthType::MeticulousKeyedSha1, 20, 52),
        ];
        for (kind, data_len, total) in cases {
            let p = with_auth(kind, data_len);
            let bytes = encode(&p);
            assert_eq!(bytes.len(), total, "{kind:?}");
            assert_eq!(bytes[1] & FLAG_AUTH, FLAG_AUTH);
            assert_eq!(usize::from(bytes[3]), total);
            assert_eq!(usize::from(bytes[25]), total - 24);
            assert_eq!(ControlPacket::parse(&bytes).unwrap(), p, "{kind:?}");
        }
    }

    #[test]
    fn sha1_auth_layout() {
        let bytes = encode(&with_auth(AuthType::MeticulousKeyedSha1, 20));
        assert_eq!(&bytes[24..32], &[5, 28, 7, 0, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(bytes[32], 1);
        assert_eq!(bytes[51], 20);
    }

    #[test]
    fn trailing_bytes_beyond_length_are_ignored() {
        let p = sample();
        let mut bytes = encode(&p);
        bytes.extend_from_slice(&[0xff; 10]);
        assert_eq!(ControlPacket::parse(&bytes).unwrap(), p);
    }

    #[test]
    fn truncated_inputs_never_panic() {
        let bytes = encode(&with_auth(AuthType::KeyedSha1, 20));
        for len in 0..HEADER_LEN {
            assert_eq!(
                ControlPacket::parse(&bytes[..len]),
                Err(ParseError::Truncated),
                "len {len}"
            );
        }
        // Longer but shorter than the Length field: a length error, never a panic.
        for len in HEADER_LEN..bytes.len() {
            assert_eq!(
                ControlPacket::parse(&bytes[..len]),
                Err(ParseError::BadLength)
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Deterministic pseudo-random sweep over short buffers.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 60) as usize;
            let mut buf: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if let Some(b) = buf.get_mut(0) {
                *b = (*b & 0x1f) | 0x20; // mostly version 1, to get past the first check
            }
            if let Some(b) = buf.get_mut(3) {
                *b = (len as u8).min(*b);
            }
            let _ = ControlPacket::parse(&buf);
        }
    }

    fn bytes_with(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = encode(&sample());
        f(&mut b);
        b
    }

    #[test]
    fn every_parse_error() {
        let cases: Vec<(Vec<u8>, ParseError)> = vec![
            (vec![0x20; 23], ParseError::Truncated),
            (bytes_with(|b| b[0] = 0x43), ParseError::BadVersion(2)),
            (bytes_with(|b| b[0] = 0x03), ParseError::BadVersion(0)),
            (bytes_with(|b| b[3] = 23), ParseError::BadLength),
            (bytes_with(|b| b[3] = 25), ParseError::BadLength),
            (bytes_with(|b| b[3] = 0), ParseError::BadLength),
            // A bit set but Length 24 (< 26).
            (bytes_with(|b| b[1] |= FLAG_AUTH), ParseError::BadLength),
            (bytes_with(|b| b[2] = 0), ParseError::ZeroDetectMult),
            (
                bytes_with(|b| b[1] |= FLAG_MULTIPOINT),
                ParseError::Multipoint,
            ),
            (
                bytes_with(|b| b[4..8].fill(0)),
                ParseError::ZeroMyDiscriminator,
            ),
            // A bit set, Length 26, Auth Type 0 (reserved).
            (
                bytes_with(|b| {
                    b[1] |= FLAG_AUTH;
                    b[3] = 26;
                    b.extend_from_slice(&[0, 2]);
                }),
                ParseError::BadAuth,
            ),
        ];
        for (bytes, want) in cases {
            let got = ControlPacket::parse(&bytes);
            assert_eq!(got, Err(want), "{bytes:02x?}");
            assert!(!want.reason().is_empty());
        }
    }

    #[test]
    fn malformed_auth_sections() {
        let good = encode(&with_auth(AuthType::KeyedMd5, 16));
        let pw = encode(&with_auth(AuthType::SimplePassword, 4));
        let cases: Vec<Vec<u8>> = vec![
            // Auth Len claims more than Length allows.
            {
                let mut b = good.clone();
                b[25] = 30;
                b
            },
            // MD5 with SHA1's length.
            {
                let mut b = good.clone();
                b[25] = 28;
                b.extend_from_slice(&[0; 4]);
                b[3] = 52;
                b
            },
            // Reserved auth type 6.
            {
                let mut b = good.clone();
                b[24] = 6;
                b
            },
            // Password with zero bytes (Auth Len 3).
            {
                let mut b = pw.clone();
                b[25] = 3;
                b
            },
            // Password Auth Len 2 (no key id).
            {
                let mut b = pw.clone();
                b[25] = 2;
                b
            },
            // Password longer than 16 bytes.
            {
                let mut b = pw[..24].to_vec();
                b.extend_from_slice(&[1, 20, 1]);
                b.extend_from_slice(&[b'x'; 17]);
                b[3] = b.len() as u8;
                b
            },
        ];
        for bytes in cases {
            assert_eq!(
                ControlPacket::parse(&bytes),
                Err(ParseError::BadAuth),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn parse_error_reasons_are_snake_case() {
        let all = [
            ParseError::Truncated,
            ParseError::BadVersion(0),
            ParseError::BadLength,
            ParseError::ZeroDetectMult,
            ParseError::Multipoint,
            ParseError::ZeroMyDiscriminator,
            ParseError::BadAuth,
        ];
        let labels: Vec<_> = all.iter().map(ParseError::reason).collect();
        assert_eq!(
            labels,
            [
                "truncated",
                "bad_version",
                "bad_length",
                "zero_detect_mult",
                "multipoint",
                "zero_my_discriminator",
                "bad_auth"
            ]
        );
    }

    #[test]
    fn emit_errors() {
        let mut buf = [0u8; 64];
        assert_eq!(
            sample().emit(&mut buf[..23]),
            Err(EmitError::BufferTooSmall)
        );
        assert_eq!(
            with_auth(AuthType::KeyedSha1, 20).emit(&mut buf[..51]),
            Err(EmitError::BufferTooSmall)
        );
        let mut p = sample();
        p.auth_present = true;
        assert_eq!(p.emit(&mut buf), Err(EmitError::AuthFlagMismatch));
        assert_eq!(
            with_auth(AuthType::KeyedSha1, 16).emit(&mut buf),
            Err(EmitError::BadAuth)
        );
        assert_eq!(
            with_auth(AuthType::SimplePassword, 17).emit(&mut buf),
            Err(EmitError::BadAuth)
        );
        let mut p = sample();
        p.diag = Diag::Unknown(40);
        assert_eq!(p.emit(&mut buf), Err(EmitError::FieldOutOfRange));
        let mut p = sample();
        p.version = 8;
        assert_eq!(p.emit(&mut buf), Err(EmitError::FieldOutOfRange));
    }

    #[test]
    fn labels() {
        assert_eq!(State::AdminDown.as_str(), "admin_down");
        assert_eq!(State::Up.as_str(), "up");
        assert_eq!(Diag::None.as_str(), "none");
        assert_eq!(
            Diag::ControlDetectionExpired.as_str(),
            "control_detection_expired"
        );
        assert_eq!(Diag::NeighborDown.as_str(), "neighbor_down");
        assert_eq!(Diag::AdministrativelyDown.as_str(), "admin_down");
        for code in 0..32 {
            assert_eq!(Diag::from_u8(code).code(), code);
        }
        assert_eq!(Diag::from_u8(9), Diag::Unknown(9));
    }
}
