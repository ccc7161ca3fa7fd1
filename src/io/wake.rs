//! What a forwarding lane waits on: its descriptors, and a doorbell that
//! the daemon rings to stop it. Thin wrappers of `eventfd` and `poll`,
//! like [`super::sys`] the only other place with `unsafe`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// An `eventfd` that, once rung, stays readable: the lane's stop signal.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    /// Set when rung: a lane busy with traffic checks it without a poll.
    rung: AtomicBool,
}

impl Doorbell {
    pub fn new() -> io::Result<Doorbell> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Doorbell {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            rung: AtomicBool::new(false),
        })
    }

    /// Makes the doorbell readable (for good).
    pub fn ring(&self) -> io::Result<()> {
        self.rung.store(true, Ordering::Relaxed);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        let r = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                size_of::<u64>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Doorbell {
    /// Whether the doorbell was rung (no system call).
    pub fn is_rung(&self) -> bool {
        self.rung.load(Ordering::Relaxed)
    }
}

impl AsRawFd for Doorbell {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A `poll` set kept between calls (no allocation per wait).
#[derive(Default)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
}

impl PollSet {
    /// Replaces the set with `fds`, each watched for input.
    pub fn watch(&mut self, fds: impl IntoIterator<Item = RawFd>) {
        self.fds.clear();
        self.fds.extend(fds.into_iter().map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
    }

    /// Waits until a descriptor is ready or `timeout` (rounded up to whole
    /// milliseconds) passes; an interrupted wait returns as if it timed out.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        for p in &mut self.fds {
            p.revents = 0;
        }
        // Rounded up: a timer due in 0.4 ms is not polled for 0 ms.
        let ms = libc::c_int::try_from(timeout.as_nanos().div_ceil(1_000_000))
            .unwrap_or(libc::c_int::MAX);
        // SAFETY: fds is a live array of fds.len() pollfd structures.
        let r = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether descriptor `i` (in [`PollSet::watch`] order) is ready: readable,
    /// or in error (which the next read reports).
    pub fn ready(&self, i: usize) -> bool {
        self.fds.get(i).is_some_and(|p| p.revents != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rung_doorbell_stays_readable() {
        let bell = Doorbell::new().unwrap();
        let mut set = PollSet::default();
        set.watch([bell.as_raw_fd()]);
        set.wait(Duration::from_millis(1)).unwrap();
        assert!(!set.ready(0));
        assert!(!bell.is_rung());
        bell.ring().unwrap();
        assert!(bell.is_rung());
        for _ in 0..2 {
            set.wait(Duration::from_secs(5)).unwrap();
            assert!(set.ready(0));
        }
        assert!(!set.ready(1));
    }
}
