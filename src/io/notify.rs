//! systemd readiness and watchdog notifications (`sd_notify(3)`), spoken
//! directly: one datagram on the Unix socket named by `$NOTIFY_SOCKET`.
//! Outside systemd (no variable) every call is a no-op.
//!
//! Kept rather than the `sd-notify` crate: the protocol is one datagram,
//! this is 40 lines of safe std (abstract socket names included), and it
//! sends without blocking (a manager that stops reading must never stall
//! the daemon's runtime, where the watchdog ping and reloads run); the
//! crate would add a dependency and remove no code worth removing.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`, `WATCHDOG=1`, `STOPPING=1`) to the
/// service manager. Returns whether a manager was there to tell.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = socket_address(path.as_encoded_bytes())?;
    let sock = UnixDatagram::unbound()?;
    // Never block the daemon on a manager that does not read.
    sock.set_nonblocking(true)?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Sends `state` with descriptors attached (`FDSTORE=1`: systemd keeps
/// them for the service's next start, see `sd_pid_notify_with_fds(3)`).
pub fn notify_with_fds(state: &str, fds: &[std::os::fd::RawFd]) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = socket_address(path.as_encoded_bytes())?;
    let sock = UnixDatagram::unbound()?;
    // A store sends one message per descriptor, many at once (a start, a
    // reload): more than the manager's socket queues (net.unix.max_dgram_qlen,
    // 10 by default). So each waits for room, for a short while, instead of
    // failing at once.
    sock.set_write_timeout(Some(STORE_WAIT))?;
    sock.connect_addr(&addr)?;
    super::sys::send_with_fds(&sock, state.as_bytes(), fds)?;
    Ok(true)
}

/// How long a descriptor for the store waits for room in the manager's
/// queue.
const STORE_WAIT: Duration = Duration::from_millis(500);

/// `@name` is a Linux abstract socket; anything else is a file path.
fn socket_address(raw: &[u8]) -> io::Result<SocketAddr> {
    match raw.split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        Some(_) => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(raw))
        }
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is empty",
        )),
    }
}

/// The watchdog period systemd expects pings within (`$WATCHDOG_USEC`),
/// when it is meant for this process (`$WATCHDOG_PID`, if set).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(socket_address(b"").is_err());
        let a = socket_address(b"/run/systemd/notify").unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let b = socket_address(b"@abstract").unwrap();
        assert!(b.as_pathname().is_none());
    }

    #[test]
    fn sends_one_datagram() {
        let dir = std::env::temp_dir().join(format!("xl-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let addr = socket_address(path.as_os_str().as_encoded_bytes()).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        sock.send_to_addr(b"READY=1", &addr).unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
