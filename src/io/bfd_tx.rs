//! The BFD thread's transmissions, batched: every control packet one
//! wake-up has due goes to the kernel in a single `io_uring_enter`, each
//! on its own path's connected socket.
//!
//! At 1000 sessions of 10 ms a gateway sends 100 000 control packets a
//! second, one `send` system call each, and the send path was most of the
//! BFD thread's time. `sendmmsg` batches only on one socket, and one
//! unconnected socket for every session pays a route lookup per packet,
//! which connecting the sockets had saved (see [`super::control_plane`]'s
//! `TxSocket`). io_uring keeps the sockets and batches the calls: on this
//! project's 2-CPU test VM, 1000 connected sockets over veth took 2.2 µs a
//! packet in batches of 50 against 2.7 µs with one `send` each.
//!
//! Where io_uring is not there (an old kernel, `kernel.io_uring_disabled`,
//! a seccomp profile that forbids it) the thread sends one call at a
//! time, as before; the log says so once.
//!
//! The one `unsafe` block hands the kernel a pointer into a buffer this
//! queue keeps until the send's completion: the `io-uring` crate leaves
//! that promise to its caller.
#![allow(unsafe_code)]

use crate::PathId;
use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use tracing::{info, warn};

/// Submission queue entries: more than one wake-up has due at 1000
/// sessions (about 50 per 500 µs); a larger burst (after a stall) is
/// submitted in several rounds.
const ENTRIES: u32 = 256;

/// The longest control packet: 24 bytes and the longest authentication
/// section (keyed SHA1, 28 bytes), RFC 5880 section 4.
pub const MAX_PACKET: usize = 52;

/// What one send became: the path and the result of its call.
pub type Sent = (PathId, io::Result<usize>);

pub struct TxQueue {
    ring: Option<IoUring>,
    /// Copies of the queued packets, by slot, kept until the kernel has
    /// completed their sends (one that could not complete at once is
    /// finished later by the kernel, which reads the copy then).
    bufs: Vec<[u8; MAX_PACKET]>,
    /// The path of each slot's packet, `None` when the slot is free.
    owners: Vec<Option<PathId>>,
    free: Vec<usize>,
    /// Each path's socket in the ring's table of registered files, by
    /// [`PathId`] (`true`: registered). A registered socket spares the
    /// kernel a descriptor lookup and reference per send (`fget`: 6 % of
    /// the thread's time at 1000 sessions without it).
    fixed: Vec<bool>,
    /// Size of the registered table (0: none).
    table: u32,
}

impl TxQueue {
    /// A queue on io_uring, or one that sends each packet at once when the
    /// kernel refuses io_uring (logged).
    pub fn new() -> TxQueue {
        match IoUring::new(ENTRIES) {
            Ok(ring) => {
                info!("BFD sends batched through io_uring");
                TxQueue::with_ring(Some(ring))
            }
            Err(e) => {
                warn!(error = %e, "no io_uring; BFD sends one system call per packet");
                TxQueue::with_ring(None)
            }
        }
    }

    /// A queue that sends each packet at once (no io_uring).
    pub fn direct() -> TxQueue {
        TxQueue::with_ring(None)
    }

    fn with_ring(ring: Option<IoUring>) -> TxQueue {
        let n = if ring.is_some() { ENTRIES as usize } else { 0 };
        // A table for every path id there can be, or a smaller one where
        // the limit of open files is lower (the kernel counts the table
        // against it); without one, sends name their descriptor.
        let table = ring.as_ref().map_or(0, |r| {
            [1u32 << 16, 1 << 12, 1 << 10]
                .into_iter()
                .find(|&n| r.submitter().register_files_sparse(n).is_ok())
                .unwrap_or(0)
        });
        TxQueue {
            ring,
            bufs: vec![[0; MAX_PACKET]; n],
            owners: vec![None; n],
            free: (0..n).rev().collect(),
            fixed: Vec::new(),
            table,
        }
    }

    /// Puts path `id`'s transmit socket in the table of registered files,
    /// or takes it out (`None`): called whenever the path's socket is set
    /// or dropped, so the table never holds a closed path's socket (it
    /// would keep it open, and a reused descriptor number would not be
    /// the same socket).
    pub fn set_socket(&mut self, id: PathId, fd: Option<RawFd>) {
        let i = usize::from(id.0);
        let Some(ring) = self.ring.as_ref() else {
            return;
        };
        if i >= self.table as usize {
            return;
        }
        if self.fixed.len() <= i {
            self.fixed.resize(i + 1, false);
        }
        let was = self.fixed[i];
        if fd.is_none() && !was {
            return;
        }
        match ring
            .submitter()
            .register_files_update(u32::from(id.0), &[fd.unwrap_or(-1)])
        {
            Ok(_) => self.fixed[i] = fd.is_some(),
            Err(e) => {
                // Not registered: its sends name the descriptor.
                warn!(error = %e, "io_uring file registration failed");
                self.fixed[i] = false;
            }
        }
    }

    pub fn is_batched(&self) -> bool {
        self.ring.is_some()
    }

    /// Queues `data` for the connected socket `fd`. `false` when it cannot
    /// be queued (no io_uring, no free slot, too long): the caller sends
    /// it itself. A full submission queue is submitted first, its results
    /// added to `done`.
    pub fn push(&mut self, id: PathId, fd: RawFd, data: &[u8], done: &mut Vec<Sent>) -> bool {
        if data.len() > MAX_PACKET {
            return false;
        }
        if self.ring.as_mut().is_some_and(|r| r.submission().is_full()) {
            self.submit(done);
        }
        let Some(ring) = self.ring.as_mut() else {
            return false;
        };
        let Some(slot) = self.free.pop() else {
            return false;
        };
        self.bufs[slot][..data.len()].copy_from_slice(data);
        let (ptr, len) = (self.bufs[slot].as_ptr(), data.len() as u32);
        let entry = if self.fixed.get(usize::from(id.0)).copied().unwrap_or(false) {
            opcode::Send::new(types::Fixed(u32::from(id.0)), ptr, len)
        } else {
            opcode::Send::new(types::Fd(fd), ptr, len)
        }
        .flags(libc::MSG_DONTWAIT)
        .build()
        .user_data(slot as u64);
        // SAFETY: the entry points into `self.bufs[slot]`, which is not
        // written again until the slot comes back to `free`, which only
        // its completion does; `bufs` never grows or moves (its length is
        // fixed in `with_ring`); the queue outlives the ring's operations
        // (`Drop` waits for them).
        if unsafe { ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return false;
        }
        self.owners[slot] = Some(id);
        true
    }

    /// Hands what is queued to the kernel in one call and adds the result
    /// of every send that has completed to `done`.
    pub fn submit(&mut self, done: &mut Vec<Sent>) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if !ring.submission().is_empty() {
            if let Err(e) = ring.submit() {
                // The entries stay queued; the next submission tries again.
                warn!(error = %e, "io_uring submission failed");
            }
        }
        for cqe in ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(id) = self.owners.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let r = cqe.result();
            done.push((
                id,
                if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as usize)
                },
            ));
        }
    }

    /// Sends not completed yet (queued or in the kernel).
    pub fn in_flight(&self) -> usize {
        self.bufs.len() - self.free.len()
    }
}

impl Default for TxQueue {
    fn default() -> TxQueue {
        TxQueue::direct()
    }
}

impl Drop for TxQueue {
    /// Waits (briefly) for the sends the kernel still holds: they read the
    /// buffers this frees.
    fn drop(&mut self) {
        let mut done = Vec::new();
        for _ in 0..100 {
            self.submit(&mut done);
            if self.in_flight() == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The kernel still holds sends (blocked sockets): keep the buffers
        // rather than free memory it may read.
        std::mem::forget(std::mem::take(&mut self.bufs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        tx.connect(rx.local_addr().expect("addr")).expect("connect");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        (tx, rx)
    }

    /// A queue on io_uring; `None` (said) where the kernel has none, which
    /// fails where the tests must run in full (`CROSSLINK_NETNS_REQUIRED`,
    /// as CI sets).
    fn batched() -> Option<TxQueue> {
        let q = TxQueue::new();
        if q.is_batched() {
            return Some(q);
        }
        assert!(
            std::env::var_os("CROSSLINK_NETNS_REQUIRED").is_none(),
            "io_uring is required here"
        );
        eprintln!("io_uring not available here: batching not tested");
        None
    }

    /// Every queued packet goes out on its own socket, each send is
    /// reported under its path, and the slots come back.
    #[test]
    fn batched_sends_reach_each_socket_and_report_each_path() {
        let Some(mut q) = batched() else {
            return;
        };
        let socks: Vec<_> = (0..300).map(|_| pair()).collect();
        let mut done = Vec::new();
        for (i, (tx, _)) in socks.iter().enumerate() {
            let data = [i as u8, (i >> 8) as u8, 0xbf];
            assert!(q.push(PathId(i as u16), tx.as_raw_fd(), &data, &mut done));
        }
        q.submit(&mut done);
        assert_eq!(
            done.len(),
            300,
            "every send completed (more than one round)"
        );
        let mut paths: Vec<u16> = done.iter().map(|(id, _)| id.0).collect();
        paths.sort_unstable();
        assert_eq!(paths, (0..300).collect::<Vec<u16>>());
        assert!(done.iter().all(|(_, r)| matches!(r, Ok(3))));
        for (i, (_, rx)) in socks.iter().enumerate() {
            let mut buf = [0u8; 16];
            let n = rx.recv(&mut buf).expect("received");
            assert_eq!(&buf[..n], &[i as u8, (i >> 8) as u8, 0xbf]);
        }
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free.len(), ENTRIES as usize);
    }

    /// A registered socket carries its path's sends, and taking it out of
    /// the table lets it go: its port can be bound again once it is
    /// closed.
    #[test]
    fn a_registered_socket_sends_and_is_let_go() {
        let Some(mut q) = batched() else {
            return;
        };
        assert!(q.table > 0, "a table of registered files");
        let (tx, rx) = pair();
        let port = tx.local_addr().expect("addr");
        let id = PathId(3);
        q.set_socket(id, Some(tx.as_raw_fd()));
        assert!(q.fixed[3]);
        let mut done = Vec::new();
        // The descriptor given is not used for a registered path.
        assert!(q.push(id, -1, &[9, 9], &mut done));
        q.submit(&mut done);
        assert!(matches!(done.as_slice(), [(PathId(3), Ok(2))]), "{done:?}");
        let mut buf = [0u8; 4];
        assert_eq!(rx.recv(&mut buf).expect("received"), 2);
        q.set_socket(id, None);
        assert!(!q.fixed[3]);
        drop(tx);
        UdpSocket::bind(port).expect("the port is free again");
    }

    /// A send that fails is reported with its error, under its path.
    #[test]
    fn a_failed_send_is_reported_with_its_error() {
        let Some(mut q) = batched() else {
            return;
        };
        // An unconnected socket cannot `send`: EDESTADDRREQ.
        let lone = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut done = Vec::new();
        assert!(q.push(PathId(7), lone.as_raw_fd(), &[1, 2, 3], &mut done));
        q.submit(&mut done);
        assert_eq!(done.len(), 1);
        let (id, r) = &done[0];
        assert_eq!(*id, PathId(7));
        let e = r.as_ref().expect_err("failed");
        assert_eq!(e.raw_os_error(), Some(libc::EDESTADDRREQ));
    }

    /// Without io_uring nothing is queued: the caller sends.
    #[test]
    fn a_direct_queue_takes_nothing() {
        let mut q = TxQueue::direct();
        let (tx, _rx) = pair();
        let mut done = Vec::new();
        assert!(!q.push(PathId(0), tx.as_raw_fd(), &[1], &mut done));
        assert!(!q.push(PathId(0), tx.as_raw_fd(), &[0; MAX_PACKET + 1], &mut done));
        q.submit(&mut done);
        assert!(done.is_empty());
    }
}
