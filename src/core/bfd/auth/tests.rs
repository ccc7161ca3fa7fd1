//! Authentication tests. Expected digests are computed here from the RFC's
//! construction (packet bytes built by hand, key in the Digest field), independently
//! of the codec and of `seal`; two of them are also fixed reference values computed
//! with another MD5/SHA1 implementation.

use super::*;
use crate::core::wire::bfd::{ControlPacket, State};

const T0: Duration = Duration::from_millis(0);
const DETECT: Duration = Duration::from_millis(30);

/// A hand-built Up packet from discriminator 1 to 2, 10 ms / 10 ms, with the auth
/// section header of `kind` and `digest_field` in the digest slot.
fn hand_packet(kind: AuthType, key_id: u8, seq: u32, digest_field: &[u8]) -> Vec<u8> {
    let section_len = 8 + digest_field.len();
    let mut b = vec![0x20, 0xc0 | 0x04, 3, (24 + section_len) as u8];
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&2u32.to_be_bytes());
    b.extend_from_slice(&10_000u32.to_be_bytes());
    b.extend_from_slice(&10_000u32.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&[kind as u8, section_len as u8, key_id, 0]);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(digest_field);
    b
}

fn padded(secret: &[u8], len: usize) -> Vec<u8> {
    let mut k = secret.to_vec();
    k.resize(len, 0);
    k
}

/// The RFC construction, step by step: key (zero-padded) in the digest field,
/// digest over the whole packet, digest replaces the key.
fn reference_sealed(kind: AuthType, key_id: u8, seq: u32, secret: &[u8]) -> Vec<u8> {
    let dlen = if matches!(kind, AuthType::KeyedSha1 | AuthType::MeticulousKeyedSha1) {
        20
    } else {
        16
    };
    let with_key = hand_packet(kind, key_id, seq, &padded(secret, dlen));
    let digest: Vec<u8> = if dlen == 20 {
        Sha1::digest(&with_key).to_vec()
    } else {
        Md5::digest(&with_key).to_vec()
    };
    hand_packet(kind, key_id, seq, &digest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What our own path produces: codec emit of a packet with `section`, then seal.
fn our_sealed(auth: &mut Auth) -> Vec<u8> {
    let section = auth.next_section();
    let pkt = ControlPacket {
        auth_present: true,
        auth: Some(section),
        ..ControlPacket::new(State::Up, 1, 2, 10_000)
    };
    let mut buf = [0u8; 64];
    let n = pkt.emit(&mut buf).unwrap();
    assert!(auth.seal(&mut buf[..n]));
    buf[..n].to_vec()
}

const KEYED: [AuthType; 4] = [
    AuthType::KeyedMd5,
    AuthType::MeticulousKeyedMd5,
    AuthType::KeyedSha1,
    AuthType::MeticulousKeyedSha1,
];

#[test]
fn fixed_reference_vectors() {
    // Computed with Python's hashlib over the same hand-built packets.
    let md5 = reference_sealed(AuthType::KeyedMd5, 5, 0x0102_0304, b"secret");
    assert_eq!(hex(&md5[32..]), "394f3922e9f5b451ffeb261309c2f11e");
    let sha1 = reference_sealed(AuthType::KeyedSha1, 5, 0x0102_0304, b"secret");
    assert_eq!(hex(&sha1[32..]), "1dd49b31fff60504c153a01186817caff0a9c94a");
}

#[test]
fn seal_follows_the_rfc_construction_for_every_keyed_type() {
    for kind in KEYED {
        for secret in [&b"k"[..], b"secret", &[0xa5; 16]] {
            let mut auth = Auth::new(kind, 9, secret, 0xffff_fffe).unwrap();
            let ours = our_sealed(&mut auth);
            assert_eq!(
                ours,
                reference_sealed(kind, 9, 0xffff_fffe, secret),
                "{kind:?}"
            );
            // The key itself is never on the wire.
            assert!(!ours.windows(secret.len()).any(|w| w == secret) || secret.len() == 1);
        }
    }
    let mut sha = Auth::new(AuthType::KeyedSha1, 1, &[7; 20], 0).unwrap();
    assert_eq!(
        our_sealed(&mut sha),
        reference_sealed(AuthType::KeyedSha1, 1, 0, &[7; 20])
    );
}

#[test]
fn sequence_increments_and_wraps() {
    let mut auth = Auth::new(AuthType::MeticulousKeyedSha1, 1, b"x", u32::MAX).unwrap();
    let seqs: Vec<u32> = (0..3).map(|_| auth.next_section().sequence).collect();
    assert_eq!(seqs, [u32::MAX, 0, 1]);
}

fn verify_bytes(auth: &mut Auth, bytes: &[u8], at: Duration) -> Result<(), AuthError> {
    let pkt = ControlPacket::parse(bytes).unwrap();
    let base = Instant::now();
    auth.verify(
        pkt.auth.as_ref().unwrap(),
        Some(bytes),
        pkt.detect_mult,
        DETECT,
        base + at,
    )
}

#[test]
fn verify_accepts_reference_packets_and_rejects_tampering() {
    for kind in KEYED {
        let mut rx = Auth::new(kind, 9, b"secret", 0).unwrap();
        let good = reference_sealed(kind, 9, 100, b"secret");
        assert_eq!(verify_bytes(&mut rx, &good, T0), Ok(()), "{kind:?}");
        // Any flipped bit in the header or the digest fails.
        for at in [1, 7, 12, 35, good.len() - 1] {
            let mut bad = reference_sealed(kind, 9, 101, b"secret");
            bad[at] ^= 0x10;
            if ControlPacket::parse(&bad).is_ok() {
                assert_eq!(
                    verify_bytes(&mut rx, &bad, T0),
                    Err(AuthError::BadDigest),
                    "{kind:?} byte {at}"
                );
            }
        }
        let wrong_key = reference_sealed(kind, 9, 102, b"secreT");
        assert_eq!(
            verify_bytes(&mut rx, &wrong_key, T0),
            Err(AuthError::BadDigest)
        );
        let wrong_id = reference_sealed(kind, 8, 102, b"secret");
        assert_eq!(
            verify_bytes(&mut rx, &wrong_id, T0),
            Err(AuthError::WrongKeyId(8))
        );
        let mut fresh = Auth::new(kind, 9, b"secret", 0).unwrap();
        assert_eq!(
            fresh.verify(
                &ControlPacket::parse(&good).unwrap().auth.unwrap(),
                None,
                3,
                DETECT,
                Instant::now()
            ),
            Err(AuthError::NoBytes)
        );
    }
}

#[test]
fn wrong_type_is_rejected() {
    let mut rx = Auth::new(AuthType::KeyedMd5, 9, b"secret", 0).unwrap();
    let sha = reference_sealed(AuthType::KeyedSha1, 9, 1, b"secret");
    assert_eq!(
        verify_bytes(&mut rx, &sha, T0),
        Err(AuthError::WrongType(4))
    );
    let met = reference_sealed(AuthType::MeticulousKeyedMd5, 9, 1, b"secret");
    assert_eq!(
        verify_bytes(&mut rx, &met, T0),
        Err(AuthError::WrongType(3))
    );
}

/// §6.7.3: keyed accepts RcvAuthSeq..=RcvAuthSeq+3*DetectMult, meticulous starts
/// at RcvAuthSeq+1; circular arithmetic.
#[test]
fn sequence_windows_as_written() {
    for (kind, lowest) in [
        (AuthType::KeyedMd5, 0u32),
        (AuthType::KeyedSha1, 0),
        (AuthType::MeticulousKeyedMd5, 1),
        (AuthType::MeticulousKeyedSha1, 1),
    ] {
        for start in [5u32, u32::MAX - 3] {
            for offset in [0u32, 1, 5, 9, 10, u32::MAX] {
                let mut rx = Auth::new(kind, 1, b"k", 0).unwrap();
                // First packet: any sequence number is accepted (AuthSeqKnown = 0).
                let first = reference_sealed(kind, 1, start, b"k");
                assert_eq!(verify_bytes(&mut rx, &first, T0), Ok(()));
                let next = reference_sealed(kind, 1, start.wrapping_add(offset), b"k");
                let want_ok = offset >= lowest && offset <= 9; // Detect Mult 3
                let got = verify_bytes(&mut rx, &next, Duration::from_millis(10));
                assert_eq!(got.is_ok(), want_ok, "{kind:?} start {start} +{offset}");
            }
        }
    }
}

#[test]
fn sequence_knowledge_expires_after_twice_the_detection_time() {
    let kind = AuthType::MeticulousKeyedMd5;
    let mut rx = Auth::new(kind, 1, b"k", 0).unwrap();
    assert!(verify_bytes(&mut rx, &reference_sealed(kind, 1, 1000, b"k"), T0).is_ok());
    // A restarted peer with a new random sequence: refused while the old one is known...
    let restarted = reference_sealed(kind, 1, 7, b"k");
    assert!(verify_bytes(&mut rx, &restarted, Duration::from_millis(59)).is_err());
    // ...accepted once 2 x detection time passed without a valid packet.
    assert!(verify_bytes(&mut rx, &restarted, Duration::from_millis(60)).is_ok());
    // And the replayed packet is a replay now.
    assert!(verify_bytes(&mut rx, &restarted, Duration::from_millis(61)).is_err());
}

#[test]
fn simple_password() {
    let mut tx = Auth::new(AuthType::SimplePassword, 3, b"hunter2", 0).unwrap();
    let section = tx.next_section();
    assert_eq!((section.auth_type, section.key_id), (1, 3));
    assert_eq!(section.data, b"hunter2");
    let mut rx = Auth::new(AuthType::SimplePassword, 3, b"hunter2", 0).unwrap();
    let now = Instant::now();
    assert_eq!(rx.verify(&section, None, 3, DETECT, now), Ok(()));
    let mut wrong = section.clone();
    wrong.data = b"hunter3".to_vec();
    assert_eq!(
        rx.verify(&wrong, None, 3, DETECT, now),
        Err(AuthError::BadDigest)
    );
    let mut prefix = section.clone();
    prefix.data = b"hunter".to_vec();
    assert_eq!(
        rx.verify(&prefix, None, 3, DETECT, now),
        Err(AuthError::BadDigest)
    );
    let mut id = section;
    id.key_id = 4;
    assert_eq!(
        rx.verify(&id, None, 3, DETECT, now),
        Err(AuthError::WrongKeyId(4))
    );
}

#[test]
fn key_sizes_are_checked() {
    assert_eq!(
        Auth::new(AuthType::KeyedMd5, 1, b"", 0).err(),
        Some(KeyError::Empty)
    );
    assert!(Auth::new(AuthType::KeyedMd5, 1, &[1; 16], 0).is_ok());
    assert!(matches!(
        Auth::new(AuthType::KeyedMd5, 1, &[1; 17], 0),
        Err(KeyError::TooLong { max: 16, .. })
    ));
    assert!(Auth::new(AuthType::SimplePassword, 1, &[1; 16], 0).is_ok());
    assert!(Auth::new(AuthType::SimplePassword, 1, &[1; 17], 0).is_err());
    assert!(Auth::new(AuthType::KeyedSha1, 1, &[1; 20], 0).is_ok());
    assert!(Auth::new(AuthType::MeticulousKeyedSha1, 1, &[1; 21], 0).is_err());
}

#[test]
fn debug_never_shows_the_secret() {
    let auth = Auth::new(AuthType::KeyedSha1, 1, b"topsecret", 0).unwrap();
    assert!(!format!("{auth:?}").contains("topsecret"));
}

#[test]
fn trim_secret_strips_one_line_ending() {
    assert_eq!(trim_secret(b"abc\n"), b"abc");
    assert_eq!(trim_secret(b"abc\r\n"), b"abc");
    assert_eq!(trim_secret(b"abc\n\n"), b"abc\n");
    assert_eq!(trim_secret(b" abc "), b" abc ");
}

#[test]
fn short_or_foreign_bytes_never_panic() {
    let mut rx = Auth::new(AuthType::KeyedSha1, 1, b"k", 0).unwrap();
    let section = AuthSection {
        auth_type: AuthType::KeyedSha1 as u8,
        key_id: 1,
        sequence: 0,
        data: vec![0; 20],
    };
    for len in [0, 10, 40, 200] {
        let bytes = vec![0u8; len];
        assert!(rx
            .verify(&section, Some(&bytes), 3, DETECT, Instant::now())
            .is_err());
        let mut b = bytes.clone();
        let _ = rx.seal(&mut b);
    }
}
