//! BFD sessions (RFC 5880), sans-IO.
//!
//! A [`Session`] is a pure state machine for one BFD session in asynchronous mode. It
//! never reads a clock, opens a socket or sleeps: the shell feeds it
//!
//! * received, already parsed packets: [`Session::handle_packet`] (RFC 5880 §6.8.6),
//! * the passage of time: [`Session::handle_timeout`] when [`Session::poll_timeout`] is
//!   reached (detection time expiry, §6.8.4),
//! * operator actions: [`Session::set_admin_down`], [`Session::set_admin_up`],
//!   [`Session::set_timers`],
//!
//! and drains its outputs with [`Session::poll_transmit`] (packets to send, §6.8.7) and
//! [`Session::poll_event`] (state changes). A driver loop looks like:
//!
//! ```text
//! loop {
//!     while let Some(pkt) = session.poll_transmit(now) { send(pkt) }
//!     while let Some(ev) = session.poll_event() { report(ev) }
//!     wait until session.poll_timeout() or a packet arrives
//!     on packet: session.handle_packet(&pkt, now)
//!     on deadline: session.handle_timeout(now)
//! }
//! ```
//!
//! Authentication (§6.7) is in [`auth`]: a session given an [`Auth`] signs what it
//! sends ([`Session::encode`]) and accepts only packets that verify
//! ([`Session::handle_datagram`]); a session without one refuses packets with the A bit.
//!
//! Not supported: Demand mode on our side (we never set the D bit; a peer's D bit is
//! honoured as §6.6 says: we stop periodic transmission while both sides are Up), and
//! the Echo function (we advertise Required Min Echo RX = 0).

pub mod auth;
pub mod deadlines;
mod session;

use std::time::Instant;

pub use crate::core::wire::bfd::{Diag, State};
pub use auth::{Auth, AuthError, KeyError};
pub use deadlines::Deadlines;
pub use session::{next_state, Session, SessionConfig, Snapshot, Transmit, SLOW_TX_INTERVAL};

/// Something the shell should know about; drained with [`Session::poll_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The local session state changed; `diag` is the local diagnostic after the change.
    StateChange {
        from: State,
        to: State,
        diag: Diag,
        at: Instant,
    },
}

/// Why [`Session::handle_packet`] discarded a packet (RFC 5880 §6.8.6). The same values
/// label the drop-reason metric through [`RxError::reason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RxError {
    /// Your Discriminator is nonzero and is not ours.
    #[error("your discriminator {got} does not match local discriminator {expected}")]
    YourDiscriminatorMismatch { got: u32, expected: u32 },
    /// Your Discriminator is zero but the State field is Init or Up.
    #[error("your discriminator is zero while the packet's state is {0:?}")]
    YourDiscriminatorZeroInUpInit(State),
    /// The A bit is set but no authentication is configured.
    #[error("authentication present but not configured")]
    AuthMismatch,
    /// Authentication is configured but the A bit is clear.
    #[error("authentication configured but absent from the packet")]
    AuthMissing,
    /// The authentication section did not verify (§6.7).
    #[error("authentication failed: {0}")]
    Auth(AuthError),
    /// Both Poll and Final are set (forbidden by §6.5).
    #[error("poll and final bits both set")]
    PollAndFinal,
    /// The packet's version is not 1 (only when a packet was built by hand).
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// Our session is AdminDown: the remote's parameters were recorded, the packet is
    /// otherwise ignored (§6.8.6, "If bfd.SessionState is AdminDown, discard").
    #[error("local session is administratively down")]
    LocalAdminDown,
}

impl RxError {
    /// Whether this is an authentication failure (counted apart from other drops).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            RxError::AuthMismatch | RxError::AuthMissing | RxError::Auth(_)
        )
    }

    /// Snake-case label for the drop-reason metric.
    pub fn reason(&self) -> &'static str {
        match self {
            RxError::YourDiscriminatorMismatch { .. } => "your_discriminator_mismatch",
            RxError::YourDiscriminatorZeroInUpInit(_) => "your_discriminator_zero",
            RxError::AuthMismatch => "auth_mismatch",
            RxError::AuthMissing => "auth_missing",
            RxError::Auth(e) => e.reason(),
            RxError::PollAndFinal => "poll_and_final",
            RxError::BadVersion(_) => "bad_version",
            RxError::LocalAdminDown => "local_admin_down",
        }
    }
}
