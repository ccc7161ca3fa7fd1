//! The daemon's one clock.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Monotonic now.
pub fn now() -> Instant {
    Instant::now()
}

/// Seconds since the Unix epoch for an instant (past or future).
pub fn unix_seconds(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now();
    let t = if at <= now {
        wall.checked_sub(now.saturating_duration_since(at))
    } else {
        wall.checked_add(at.saturating_duration_since(now))
    };
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Monotonic nanoseconds since the first call in this process: the echo
/// messages' timestamps.
pub fn nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(Instant::now().saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}
