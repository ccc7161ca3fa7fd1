//! Why a packet was dropped: one enum, which also labels
//! `crosslink_packets_dropped_total{reason}`.

/// Every reason a packet can be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Overlay datagram shorter than its header, or a bad header length.
    OverlayMalformed,
    /// Overlay version or message type this build does not speak.
    OverlayUnsupported,
    /// Datagram from an address and port that is not the path's remote.
    UnknownSource,
    /// Inner packet that is not well-formed IPv4 or IPv6.
    InnerMalformed,
    /// The peer has no path up.
    NoPath,
    /// Inner packet larger than the path can carry.
    TooBig,
    /// Writing to the TUN device failed.
    TunWrite,
    /// Sending on the path's socket failed.
    PathSend,
    /// BFD control packet that does not parse.
    BfdMalformed,
    /// BFD control packet refused by the session's reception rules.
    BfdRejected,
    /// Single-hop BFD packet with TTL other than 255, or multihop below min_ttl.
    BfdTtl,
    /// BFD packet from an address with no configured session.
    BfdUnknownSession,
    /// BFD packet carrying a session's discriminator but coming from another
    /// address than the session's remote, or arriving on another local
    /// address (RFC 5881 §4, RFC 5883 §4: forged or misdirected).
    BfdWrongSource,
    /// BFD packet failing authentication: A bit absent while configured, present
    /// while not, wrong type, key, digest or sequence number (RFC 5880 §6.7).
    BfdAuth,
    /// BFD packets the kernel dropped because the BFD thread's receive
    /// buffer was full (the thread fell behind): counted from the socket's
    /// drop count (`SO_RXQ_OVFL`), never seen by the daemon.
    BfdOverflow,
    /// `duplicate` policy: the second copy of a packet already delivered.
    Duplicate,
    /// `duplicate` policy: a packet too far behind the sequence window to tell.
    DuplicateStale,
    /// Echo reply whose stamp is not one we sent recently.
    EchoStale,
    /// Sealed message whose tag does not verify under the peer's keys.
    AuthFailed,
    /// Sealed data already received, older than the replay window, or
    /// from a run of the sender before its previous one.
    Replayed,
    /// Plaintext message for a peer with a key, or sealed message for a
    /// peer without one.
    SealMismatch,
    /// A data packet that is not ECN-capable (Not-ECT) whose outer header
    /// arrived marked CE: RFC 6040 drops it (its sender could not react
    /// to the congestion mark).
    CeOnNotEct,
    /// Key-pair peer (`public_key`) without a completed handshake: nothing
    /// can be sealed yet.
    NoSession,
    /// Handshake messages on a path beyond what its receiver passes on to
    /// the handshake (a flood; the handshake has its own limit too).
    HandshakeRateLimited,
    /// `aggregate` with a configured `rate`: the packet would have waited
    /// past [`crate::core::aggregate::PACE_QUEUE`] for its path's pace
    /// (the gateway's own shaper queue is full).
    PaceQueue,
}

impl DropReason {
    /// All reasons, for pre-registering metrics at 0.
    pub const ALL: [DropReason; 25] = [
        DropReason::OverlayMalformed,
        DropReason::OverlayUnsupported,
        DropReason::UnknownSource,
        DropReason::InnerMalformed,
        DropReason::NoPath,
        DropReason::TooBig,
        DropReason::TunWrite,
        DropReason::PathSend,
        DropReason::BfdMalformed,
        DropReason::BfdRejected,
        DropReason::BfdTtl,
        DropReason::BfdUnknownSession,
        DropReason::BfdWrongSource,
        DropReason::BfdAuth,
        DropReason::BfdOverflow,
        DropReason::Duplicate,
        DropReason::DuplicateStale,
        DropReason::EchoStale,
        DropReason::AuthFailed,
        DropReason::Replayed,
        DropReason::SealMismatch,
        DropReason::CeOnNotEct,
        DropReason::NoSession,
        DropReason::HandshakeRateLimited,
        DropReason::PaceQueue,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::OverlayMalformed => "overlay_malformed",
            DropReason::OverlayUnsupported => "overlay_unsupported",
            DropReason::UnknownSource => "unknown_source",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::NoPath => "no_path",
            DropReason::TooBig => "too_big",
            DropReason::TunWrite => "tun_write",
            DropReason::PathSend => "path_send",
            DropReason::BfdMalformed => "bfd_malformed",
            DropReason::BfdRejected => "bfd_rejected",
            DropReason::BfdTtl => "bfd_ttl",
            DropReason::BfdUnknownSession => "bfd_unknown_session",
            DropReason::BfdWrongSource => "bfd_wrong_source",
            DropReason::BfdAuth => "bfd_auth",
            DropReason::BfdOverflow => "bfd_overflow",
            DropReason::Duplicate => "duplicate",
            DropReason::DuplicateStale => "duplicate_stale",
            DropReason::EchoStale => "echo_stale",
            DropReason::AuthFailed => "auth_failed",
            DropReason::Replayed => "replayed",
            DropReason::SealMismatch => "seal_mismatch",
            DropReason::CeOnNotEct => "ce_on_not_ect",
            DropReason::NoSession => "no_session",
            DropReason::HandshakeRateLimited => "handshake_rate_limited",
            DropReason::PaceQueue => "pace_queue",
        }
    }

    /// Position in [`DropReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_complete_and_ordered() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let labels: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
