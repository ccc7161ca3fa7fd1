//! The few system calls no crate wraps: receiving a datagram with its IP
//! TTL (for GTSM), waiting on several sockets with a nanosecond timeout,
//! batched datagram receive and send for the forwarding threads (recvmmsg,
//! sendmmsg: one system call per burst instead of per packet),
//! TUN carrier control, real-time scheduling, and steering a reuseport
//! group's datagrams by lane (classic BPF), and what a forwarding lane
//! waits on (a `poll` set, and an `eventfd` doorbell that stops it). This
//! and [`super::fastpath`] (`getifaddrs`, `if_indextoname`) are the only modules
//! with `unsafe`; each block is one libc call on a buffer it owns.
//!
//! Kept rather than `nix` or `quinn-udp`: the lanes' batches keep their
//! headers, iovecs and control buffers allocated across bursts and point
//! the iovecs at payloads where the TUN read left them (a segment goes out
//! as two pieces, never copied), with `UDP_SEGMENT` and the TOS byte per
//! message; wrapping that in another crate's types would change the
//! hottest code for no change in behaviour. Netlink, in contrast, goes
//! through `rtnetlink` (`netlink.rs`, `linkwatch.rs`) and the BPF programs
//! through `aya` (`fastpath.rs`).
#![allow(unsafe_code)]

use crate::core::wire::overlay;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r).map(|_| ())
}

/// Sets the socket's receive buffer to `bytes`, past `net.core.rmem_max`
/// when the process may (`SO_RCVBUFFORCE`, with `CAP_NET_ADMIN`), else as
/// far as that limit allows (`SO_RCVBUF`).
pub fn force_recv_buffer(sock: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes))
}

/// Asks the kernel to report with each datagram how many the socket has
/// dropped so far for a full receive buffer (`SO_RXQ_OVFL`).
pub fn enable_drop_count(sock: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)
}

/// Whether a datagram waits in the socket's receive queue (`FIONREAD`: the
/// length of the next one; an empty datagram reads as none).
pub fn has_queued(sock: &impl AsRawFd) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer to a live one.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    r == 0 && n > 0
}

/// Asks the kernel to report each datagram's TTL / hop limit.
pub fn enable_recv_ttl(sock: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVHOPLIMIT,
            1,
        )
    } else {
        setsockopt_int(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, 1)
    }
}

/// Has an IPv6 UDP socket accept datagrams whose UDP checksum is 0
/// (`UDP_NO_CHECK6_RX`, RFC 6935 and 6936, what Linux's VXLAN calls
/// `udp6zerocsumrx`): the kernel fast path sends no UDP checksum
/// ([`crate::io::fastpath`]), and without this the kernel drops such a
/// datagram before the socket sees it.
pub fn accept_zero_checksum_v6(sock: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(
        sock.as_raw_fd(),
        libc::IPPROTO_UDP,
        libc::UDP_NO_CHECK6_RX,
        1,
    )
}

/// Sets the TOS (IPv4) or traffic class (IPv6) byte of what `sock` sends
/// without a per-message one.
pub fn set_tos(sock: &impl AsRawFd, ipv6: bool, tos: u8) -> io::Result<()> {
    let (level, name) = tos_option(ipv6);
    setsockopt_int(sock.as_raw_fd(), level, name, libc::c_int::from(tos))
}

/// Asks the kernel to report each datagram's TOS / traffic class byte
/// (the outer DSCP and ECN field, see [`RecvBatch::get_mut`]).
pub fn enable_recv_tos(sock: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVTCLASS,
            1,
        )
    } else {
        setsockopt_int(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTOS, 1)
    }
}

/// The socket option (and control message) of the TOS / traffic class.
fn tos_option(ipv6: bool) -> (libc::c_int, libc::c_int) {
    match ipv6 {
        true => (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
        false => (libc::IPPROTO_IP, libc::IP_TOS),
    }
}

/// # Safety
/// `addr` must point at a sockaddr_storage the kernel filled.
unsafe fn sockaddr_to_std(addr: *const libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from((*addr).ss_family) {
        libc::AF_INET => {
            let a = &*(addr as *const libc::sockaddr_in);
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            let a = &*(addr as *const libc::sockaddr_in6);
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Waits until one of `fds` is readable or `timeout` passes. Returns the
/// indexes of the readable ones in `ready`.
pub fn wait_readable(
    fds: &[RawFd],
    timeout: Option<Duration>,
    ready: &mut Vec<usize>,
) -> io::Result<()> {
    ready.clear();
    let mut set = PollSet::default();
    set.watch(fds.iter().copied());
    set.wait(timeout)?;
    ready.extend((0..fds.len()).filter(|&i| set.ready(i)));
    Ok(())
}

/// An `eventfd` doorbell: once rung it stays readable until cleared (a
/// forwarding worker's inbox rings it for each order).
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

    /// Makes the doorbell quiet again (a doorbell that is rung for each
    /// new thing to do, and cleared before the things are taken).
    pub fn clear(&self) {
        self.rung.store(false, Ordering::Relaxed);
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; the eventfd is
        // non-blocking, so an unrung doorbell returns EAGAIN at once.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                size_of::<u64>(),
            )
        };
    }
}

/// Keeps the allocator's threshold for mapping an allocation on its own
/// at 128 KiB for good. glibc raises it, up to 32 MiB, each time such a
/// mapping is freed, after which large buffers (a lane's receive batch,
/// its TUN slots) come from the heap, where a zeroed allocation is cleared
/// by hand and every page of it made resident at once; restarting a peer's
/// lanes frees theirs. Fixed, they stay mapped fresh: their pages cost
/// memory only once packets are written to them. Does nothing but on glibc.
pub fn keep_big_allocations_lazy() {
    #[cfg(target_env = "gnu")]
    // SAFETY: sets an allocator parameter; called before the threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Returns the allocator's free memory to the system (every arena's), so
/// that what starting or reloading many peers allocated for a moment does
/// not stay resident. Does nothing but on glibc.
pub fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: plain call into the allocator, which locks its arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A level-triggered `epoll` set: what a forwarding worker waits on, with
/// the descriptors of every lane it serves, and the BFD thread, with its
/// receive sockets. Level-triggered (unlike `mio`'s edge-triggered
/// registrations) because a lane reads one burst per source and round, and
/// the BFD thread what one wake-up brought, and both rely on being told
/// again about a source not emptied (no read that finds nothing).
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
    /// How many of `events` the last wait filled.
    ready: usize,
    /// `epoll_pwait2` is there (until a call says otherwise).
    pwait2: bool,
}

impl Epoll {
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            ready: 0,
            pwait2: true,
        })
    }

    /// Watches `fd` for input, reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    /// Reports `fd`, already watched, with `token` from now on.
    pub fn modify(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev lives across the call; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `ctl` (Linux before 2.6.9 wanted a non-null event).
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) })
            .map(drop)
    }

    /// Waits until a descriptor is ready or `timeout` passes; an
    /// interrupted wait returns as if it timed out. The timeout has
    /// nanosecond precision (`epoll_pwait2`, Linux 5.11+), or is rounded
    /// up to the millisecond on older kernels.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        let len = self.events.len().min(i32::MAX as usize) as libc::c_int;
        let mut r = if self.pwait2 {
            // SAFETY: the buffer and its length match and live across the
            // call, as does ts; no signal mask (null, size 0).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.fd.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    len,
                    &ts as *const libc::timespec,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            r as libc::c_int
        } else {
            -2
        };
        if r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            self.pwait2 = false;
            r = -2;
        }
        if r == -2 {
            let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: as above.
            r = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), self.events.as_mut_ptr(), len, ms) };
        }
        if r < 0 {
            self.ready = 0;
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            return Ok(());
        }
        self.ready = r as usize;
        Ok(())
    }

    /// The tokens of the descriptors the last wait found ready.
    pub fn ready(&self) -> impl Iterator<Item = u64> + '_ {
        self.events.iter().take(self.ready).map(|e| e.u64)
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

    /// Waits until a descriptor is ready or `timeout` passes (`None`: no
    /// limit); an interrupted wait returns as if it timed out.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        for p in &mut self.fds {
            p.revents = 0;
        }
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: fds and ts live across the call; the length matches.
        let r = unsafe {
            libc::ppoll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                tsp,
                std::ptr::null(),
            )
        };
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

/// Turns a TUN device's carrier on or off (`TUNSETCARRIER`, Linux 4.19+).
/// With the carrier off the kernel treats the device's routes as link-down,
/// so with `net.ipv4.conf.all.ignore_routes_with_linkdown = 1` (and its IPv6
/// twin) a route with a higher metric through another device takes over.
pub fn set_tun_carrier(tun: &impl AsRawFd, on: bool) -> io::Result<()> {
    let value: libc::c_int = on.into();
    // SAFETY: TUNSETCARRIER reads one c_int through the pointer, which
    // points at a live local; the fd is an open TUN device.
    let r = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETCARRIER,
            &value as *const libc::c_int,
        )
    };
    cvt(r).map(|_| ())
}

/// Clears a TUN device's persist flag (TUNSETPERSIST 0), so the device
/// goes away when crosslink closes it: a leftover persistent device of the
/// same name is attached to, and then removed at stop like one of ours.
pub fn clear_tun_persist(tun: &impl AsRawFd) -> io::Result<()> {
    let off: libc::c_ulong = 0;
    // SAFETY: TUNSETPERSIST takes its argument by value (no pointer is
    // dereferenced); the fd is an open TUN device.
    cvt(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, off) }).map(|_| ())
}

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) and context
/// switches (`getrusage(RUSAGE_THREAD)`) so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ThreadUsage {
    /// User and system time.
    pub cpu: Duration,
    /// Switches away from the thread because it waited (a sleep, a system
    /// call that blocked).
    pub voluntary: u64,
    /// Switches away from the thread while it could run (the kernel ran
    /// something else).
    pub involuntary: u64,
}

/// [`ThreadUsage`] of the calling thread, `None` if the kernel refuses.
pub fn thread_usage() -> Option<ThreadUsage> {
    // SAFETY: a zeroed rusage is a valid value, filled by the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage; RUSAGE_THREAD names the calling thread.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return None;
    }
    // The CPU time from the thread's clock: getrusage's lags by up to a
    // scheduler tick while the thread runs.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec, filled by the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return None;
    }
    Some(ThreadUsage {
        cpu: Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        ),
        voluntary: u64::try_from(ru.ru_nvcsw).unwrap_or(0),
        involuntary: u64::try_from(ru.ru_nivcsw).unwrap_or(0),
    })
}

/// Sets the calling thread to SCHED_FIFO at `priority`.
pub fn set_realtime_priority(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: 0 names the calling thread; param is a live struct.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) }).map(|_| ())
}

/// The CPUs this process may run on (empty if the kernel does not say).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, filled by the call.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a live cpu_set_t of `size` bytes; 0 names this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, `set` is live.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: 0 names the calling thread; `set` is live.
    cvt(unsafe { libc::sched_setaffinity(0, size, &set) }).map(|_| ())
}

/// Whether this network namespace has an interface called `name`.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: passes a NUL-terminated string that lives across the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The IP address family of a socket address, for socket options.
pub fn is_v6(ip: IpAddr) -> bool {
    ip.is_ipv6()
}

/// Keeps every page the daemon touches in memory (mlockall with
/// MCL_ONFAULT, so untouched reservations such as thread stacks are not
/// populated up front). A page fault on a paged-out page can stall the BFD
/// thread for longer than a 10 ms interval.
pub fn lock_memory() -> io::Result<()> {
    // SAFETY: plain system call with flag arguments.
    cvt(unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) })
        .map(|_| ())
}

/// Buffers for receiving up to `count` datagrams with one `recvmmsg(2)`:
/// the receive threads take a burst per system call instead of one
/// datagram. The headers point into `data` and `addrs`, which are never
/// resized, and are refilled before every call.
pub struct RecvBatch {
    data: Vec<u8>,
    stride: usize,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per message: room for the `UDP_GRO` and TOS control messages.
    controls: Vec<[u64; 8]>,
    filled: usize,
}

impl RecvBatch {
    /// Room for `count` datagrams of at most `stride` bytes each.
    pub fn new(count: usize, stride: usize) -> RecvBatch {
        let count = count.max(1);
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain data; all-zero is valid.
        let (addr, iov, hdr) = unsafe { (zeroed(), zeroed(), zeroed()) };
        RecvBatch {
            data: vec![0u8; count * stride],
            stride,
            addrs: vec![addr; count],
            iovs: vec![iov; count],
            hdrs: vec![hdr; count],
            controls: vec![[0u64; 8]; count],
            filled: 0,
        }
    }

    /// Waits for at least one datagram (the socket's read timeout applies)
    /// and takes whatever else is queued, up to the batch size. Returns how
    /// many were received.
    pub fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.recv_with(sock, libc::MSG_WAITFORONE)
    }

    /// Takes what is queued, up to the batch size, without waiting
    /// (`WouldBlock` if nothing is).
    pub fn recv_queued(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.recv_with(sock, libc::MSG_DONTWAIT)
    }

    fn recv_with(&mut self, sock: &impl AsRawFd, flags: libc::c_int) -> io::Result<usize> {
        self.filled = 0;
        let base = self.data.as_mut_ptr();
        for (i, (((iov, hdr), addr), control)) in self
            .iovs
            .iter_mut()
            .zip(self.hdrs.iter_mut())
            .zip(self.addrs.iter_mut())
            .zip(self.controls.iter_mut())
            .enumerate()
        {
            // SAFETY: i * stride + stride <= data.len() by construction.
            iov.iov_base = unsafe { base.add(i * self.stride) }.cast();
            iov.iov_len = self.stride;
            hdr.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = size_of::<[u64; 8]>();
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        // SAFETY: every header points at buffers owned by self that outlive the call;
        // vlen is the number of headers.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        self.filled = usize::try_from(cvt(n)?).unwrap_or(0);
        Ok(self.filled)
    }

    /// Message `i` of the last [`RecvBatch::recv`]: its bytes, its source
    /// and, when the kernel coalesced several datagrams into it (UDP GRO,
    /// see [`enable_udp_gro`]), the size they were cut at (every datagram
    /// but the last has this size). `None` past the end, for an unknown
    /// address family, or for a message longer than the buffer (truncated).
    /// Also the TOS / traffic class byte of its IP header (0 when the
    /// socket does not report it, see [`enable_recv_tos`]): the kernel's GRO
    /// merges only datagrams whose TOS bytes are equal, so it is every
    /// datagram's.
    pub fn get_mut(&mut self, i: usize) -> Option<(&mut [u8], SocketAddr, Option<usize>, u8)> {
        if i >= self.filled {
            return None;
        }
        let hdr = self.hdrs.get(i)?;
        if hdr.msg_hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return None;
        }
        let len = (hdr.msg_len as usize).min(self.stride);
        let Controls { segment, tos, .. } = controls(&hdr.msg_hdr);
        let addr = self.addrs.get(i)?;
        // SAFETY: the kernel filled this sockaddr_storage in the last recvmmsg.
        let src = unsafe { sockaddr_to_std(addr) }?;
        let start = i * self.stride;
        let buf = self.data.get_mut(start..start + len)?;
        Some((buf, src, segment, tos))
    }

    /// The receiving socket's cumulative drop count as of message `i`
    /// (with [`enable_drop_count`]; the kernel reports it once it is not
    /// zero).
    pub fn overflow(&self, i: usize) -> Option<u32> {
        if i >= self.filled {
            return None;
        }
        controls(&self.hdrs.get(i)?.msg_hdr).overflow
    }

    /// The TTL / hop limit of message `i` of the last receive, when the
    /// socket reports it ([`enable_recv_ttl`]).
    pub fn ttl(&self, i: usize) -> Option<u8> {
        if i >= self.filled {
            return None;
        }
        controls(&self.hdrs.get(i)?.msg_hdr).ttl
    }

    /// The bytes of message `i` of the last [`RecvBatch::recv`] (what
    /// [`RecvBatch::get_mut`] gave, possibly changed in place since).
    pub fn message(&self, i: usize) -> Option<&[u8]> {
        if i >= self.filled {
            return None;
        }
        let hdr = self.hdrs.get(i)?;
        let len = (hdr.msg_len as usize).min(self.stride);
        let start = i * self.stride;
        self.data.get(start..start + len)
    }
}

/// The MTU of the route from `local` to `remote` as the kernel sees it now
/// (`IP_MTU` / `IPV6_MTU` of a connected UDP socket: the outgoing
/// interface's MTU, or a smaller one learnt by path MTU discovery).
pub fn route_mtu(local: SocketAddr, remote: SocketAddr) -> io::Result<u32> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = remote.is_ipv6();
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    sock.bind(&SocketAddr::new(local.ip(), 0).into())?;
    sock.connect(&remote.into())?;
    let (level, name) = match v6 {
        true => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
        false => (libc::IPPROTO_IP, libc::IP_MTU),
    };
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a live c_int and its size; the kernel writes at most len bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(r)?;
    u32::try_from(value).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// `UDP_GRO` from linux/udp.h (Linux 5.0): receive coalesced datagrams.
const UDP_GRO: libc::c_int = 104;

/// Lets the kernel hand `sock`'s datagrams over coalesced (UDP GRO): a
/// burst from one sender, equal-sized but the last, arrives as one message
/// with the segment size in a control message, and a sender's UDP GSO
/// send is delivered without ever being cut up. Fails on kernels without it.
pub fn enable_udp_gro(sock: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(sock.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1)
}

/// What a received message's control messages say.
#[derive(Default)]
struct Controls {
    /// The `UDP_GRO` segment size, if any.
    segment: Option<usize>,
    /// The TOS / traffic class byte (0 if not reported).
    tos: u8,
    /// The TTL / hop limit, if reported.
    ttl: Option<u8>,
    /// The socket's cumulative count of datagrams dropped for a full
    /// receive buffer (`SO_RXQ_OVFL`), if reported.
    overflow: Option<u32>,
}

fn controls(msg: &libc::msghdr) -> Controls {
    let mut c = Controls::default();
    if msg.msg_control.is_null() || msg.msg_controllen == 0 {
        return c;
    }
    // SAFETY: msg_control/msg_controllen describe the buffer the kernel
    // filled in the last recvmmsg (owned by the batch); CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay within it, and the data is read unaligned, no longer
    // than the message's length says.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            let data = libc::CMSG_DATA(cmsg);
            let int_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize;
            let int = || {
                ((*cmsg).cmsg_len as usize >= int_len)
                    .then(|| std::ptr::read_unaligned(data.cast::<libc::c_int>()))
            };
            if level == libc::SOL_UDP && kind == UDP_GRO {
                c.segment = int()
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|&s| s > 0);
            } else if level == libc::IPPROTO_IP && kind == libc::IP_TOS {
                // One byte (IP_RECVTOS).
                c.tos = std::ptr::read_unaligned(data.cast::<u8>());
            } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_TCLASS {
                c.tos = int().and_then(|v| u8::try_from(v).ok()).unwrap_or(0);
            } else if (level == libc::IPPROTO_IP && kind == libc::IP_TTL)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT)
            {
                c.ttl = int().and_then(|v| u8::try_from(v).ok());
            } else if level == libc::SOL_SOCKET && kind == libc::SO_RXQ_OVFL {
                c.overflow = int().map(|v| v as u32);
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    c
}

/// A datagram to send, in two pieces: `head` (the overlay header, often
/// with the inner headers) and `body` (possibly empty), which may lie in
/// different buffers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Datagram<'a> {
    pub head: &'a [u8],
    pub body: &'a [u8],
    /// The TOS / traffic class byte of its IP header.
    pub tos: u8,
}

impl Datagram<'_> {
    /// Its length on the wire (UDP payload).
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One message of a [`SendBatch::send_messages`] call: `count` datagrams
/// from `first` on; with `segment` set, sent as one UDP GSO message (every
/// datagram but the last exactly `segment` bytes, the last at most that),
/// else `count` is 1; with the TOS / traffic class byte of all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub first: usize,
    pub count: usize,
    pub segment: Option<u16>,
    pub tos: u8,
}

/// Scratch headers for `sendmmsg(2)`: one system call sends a burst of
/// messages (plain datagrams and UDP GSO runs) to one destination.
#[derive(Default)]
pub struct SendBatch {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    /// Per message: room for the `UDP_SEGMENT` and TOS control messages.
    controls: Vec<[u64; 8]>,
    /// Per message: its first iovec and how many.
    spans: Vec<(usize, usize)>,
    /// Whether messages may carry `UDP_SEGMENT` (UDP GSO).
    pub gso: bool,
    /// Scratch for the caller's plan of messages, kept between bursts.
    pub plan: Vec<Message>,
    /// The TOS byte the socket sends with when a message names none (its
    /// `IP_TOS`): a message with this TOS carries no TOS control message
    /// (the kernel's per-message control path costs more than none).
    pub default_tos: u8,
}

impl SendBatch {
    /// Empty scratch; UDP GSO used if `gso`.
    pub fn new(gso: bool) -> SendBatch {
        SendBatch {
            gso,
            ..SendBatch::default()
        }
    }

    /// Sends `messages` (each some of `datagrams`, see [`Message`]) to
    /// `dest` on `sock` with one `sendmmsg`. Returns how many messages were
    /// sent (a prefix), or the error of the first one when none was.
    pub fn send_messages(
        &mut self,
        sock: &impl AsRawFd,
        datagrams: &[Datagram<'_>],
        messages: &[Message],
        dest: SocketAddr,
    ) -> io::Result<usize> {
        let addr = socket2::SockAddr::from(dest);
        // Each message's pieces, as (first iovec, count): the iovecs are all
        // built before any pointer to them is taken.
        self.iovs.clear();
        self.spans.clear();
        for m in messages {
            let part = datagrams
                .get(m.first..m.first + m.count)
                .unwrap_or_default();
            if part.is_empty() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            let first = self.iovs.len();
            for d in part {
                for piece in [d.head, d.body] {
                    if !piece.is_empty() {
                        self.iovs.push(libc::iovec {
                            iov_base: piece.as_ptr() as *mut libc::c_void,
                            iov_len: piece.len(),
                        });
                    }
                }
            }
            self.spans.push((first, self.iovs.len() - first));
        }
        if self.controls.len() < messages.len() {
            self.controls.resize(messages.len(), [0; 8]);
        }
        let v6 = dest.is_ipv6();
        self.hdrs.clear();
        for ((m, control), &(first, count)) in messages
            .iter()
            .zip(self.controls.iter_mut())
            .zip(&self.spans)
        {
            // SAFETY: mmsghdr is plain data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = addr.len();
            // SAFETY: first + count <= iovs.len() by construction.
            h.msg_hdr.msg_iov = unsafe { self.iovs.as_mut_ptr().add(first) };
            h.msg_hdr.msg_iovlen = count;
            let tos = (m.tos != self.default_tos).then_some((v6, m.tos));
            set_controls(&mut h.msg_hdr, control, m.segment, tos)?;
            self.hdrs.push(h);
        }
        // SAFETY: every header points at `addr`, iovecs in `self.iovs` and
        // control buffers in `self.controls` (neither resized after the
        // pointers were taken) and datagrams borrowed for this call; vlen is
        // the number of headers.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                0,
            )
        };
        cvt(n).map(|n| n as usize)
    }
}

/// Puts the control messages of a message into `msg`, using `control` as
/// their buffer: `UDP_SEGMENT` of `segment` if set, and if `tos` is set the
/// TOS (IPv4) or traffic class (IPv6, when `tos.0`) byte `tos.1`.
fn set_controls(
    msg: &mut libc::msghdr,
    control: &mut [u64; 8],
    segment: Option<u16>,
    tos: Option<(bool, u8)>,
) -> io::Result<()> {
    if segment.is_none() && tos.is_none() {
        msg.msg_control = std::ptr::null_mut();
        msg.msg_controllen = 0;
        return Ok(());
    }
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    let (seg_space, tos_space) = unsafe {
        (
            libc::CMSG_SPACE(size_of::<u16>() as u32) as usize,
            libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as usize,
        )
    };
    let space =
        if tos.is_some() { tos_space } else { 0 } + if segment.is_some() { seg_space } else { 0 };
    if space > size_of::<[u64; 8]>() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    control.fill(0);
    msg.msg_controllen = space;
    // SAFETY: the control buffer (64 bytes, 8-aligned) holds `space` bytes
    // (checked above: 24 + 24), so both headers and their data are inside
    // it; CMSG_NXTHDR stays within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        if let Some(segment) = segment {
            if cmsg.is_null() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
        let Some((v6, tos)) = tos else {
            return Ok(());
        };
        if cmsg.is_null() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let (level, kind) = tos_option(v6);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
            libc::c_int::from(tos),
        );
    }
    Ok(())
}

/// `UDP_SEGMENT` from linux/udp.h (Linux 4.18): UDP generic segmentation.
const UDP_SEGMENT: libc::c_int = 103;

/// Whether the kernel can segment UDP sends on `sock` (UDP GSO). Asked with
/// the socket option, because an older kernel silently ignores the
/// per-message control and would send one oversized datagram.
pub fn udp_gso_supported(sock: &impl AsRawFd) -> bool {
    setsockopt_int(sock.as_raw_fd(), libc::SOL_UDP, UDP_SEGMENT, 0).is_ok()
}

/// The most lanes [`steer_by_lane`] can steer: the lane is a 3-bit field.
pub use crate::core::wire::overlay::MAX_LANES;

/// Offset of the overlay header's Flags byte in the UDP payload.
const FLAGS_OFFSET: u32 = overlay::FLAGS_AT as u32;
/// The lane field of the Flags byte: `(flags >> LANE_SHIFT) & LANE_MASK`.
const LANE_SHIFT: u32 = overlay::LANE_SHIFT;
const LANE_MASK: u32 = (overlay::LANE_MASK >> overlay::LANE_SHIFT) as u32;

/// A classic BPF instruction without jump targets.
const fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A classic BPF conditional jump: `jt` / `jf` instructions forward.
const fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The program [`steer_by_lane`] attaches: returns
/// `((payload[3] >> 4) & 7) % lanes`, or 0 for a payload shorter than
/// 4 bytes. For a UDP reuseport group the kernel runs it with the UDP
/// header pulled, so offset 0 and `len` are those of the UDP payload (see
/// the `load_origin_*` tests).
fn lane_program(lanes: u32) -> [libc::sock_filter; 8] {
    use libc::{BPF_A, BPF_ABS, BPF_ALU, BPF_AND, BPF_B, BPF_JGE, BPF_JMP, BPF_K, BPF_LD};
    use libc::{BPF_LEN, BPF_MOD, BPF_RET, BPF_RSH, BPF_W};
    [
        // 0: A = UDP payload length.
        bpf_stmt(BPF_LD | BPF_W | BPF_LEN, 0),
        // 1: no Flags byte: go to 7 (socket 0).
        bpf_jump(BPF_JMP | BPF_JGE | BPF_K, FLAGS_OFFSET + 1, 0, 5),
        // 2: A = Flags.
        bpf_stmt(BPF_LD | BPF_B | BPF_ABS, FLAGS_OFFSET),
        // 3-4: A = lane.
        bpf_stmt(BPF_ALU | BPF_RSH | BPF_K, LANE_SHIFT),
        bpf_stmt(BPF_ALU | BPF_AND | BPF_K, LANE_MASK),
        // 5: A = lane % lanes (lanes >= 1, checked by the caller).
        bpf_stmt(BPF_ALU | BPF_MOD | BPF_K, lanes),
        // 6: the index of the socket in the group.
        bpf_stmt(BPF_RET | BPF_A, 0),
        // 7: too short.
        bpf_stmt(BPF_RET | BPF_K, 0),
    ]
}

/// Attaches `program` to the reuseport group of `sock` (which must have
/// `SO_REUSEPORT` set): the kernel runs it for each datagram and delivers
/// to the socket whose index in the group it returns (an index past the
/// end falls back to the kernel's hash). The kernel copies the program.
fn attach_reuseport_cbpf(sock: &impl AsRawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let prog = libc::sock_fprog {
        len,
        // The kernel only reads through this pointer.
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: passes a pointer to a live sock_fprog and its exact size; the
    // fprog points at `len` instructions of `program`, which outlives the
    // call, and the kernel copies them before returning.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    cvt(r).map(|_| ())
}

/// Makes the kernel pick, for each datagram to `sock`'s reuseport group,
/// the socket of index `lane % lanes`, where the lane is bits 4..=6 of the
/// overlay header's Flags byte (byte 3 of the UDP payload). Datagrams too
/// short to hold the Flags byte go to socket 0.
///
/// A socket's index is the order in which it joined the group (bound);
/// when a socket leaves, the kernel moves the last one into its place.
/// `sock` must be bound with `SO_REUSEPORT`; the program applies to the
/// whole group, including sockets that join later. `lanes` must be
/// 1..=[`MAX_LANES`], else `InvalidInput`.
pub fn steer_by_lane(sock: &impl AsRawFd, lanes: usize) -> io::Result<()> {
    if !(1..=MAX_LANES).contains(&lanes) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("lanes must be 1..={MAX_LANES}, not {lanes}"),
        ));
    }
    let lanes = u32::try_from(lanes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    attach_reuseport_cbpf(sock, &lane_program(lanes))
}

/// What a TUN queue's descriptor says of its device: its name, and whether
/// it was opened with `IFF_VNET_HDR` (offloads) (`TUNGETIFF`).
pub fn tun_info(tun: &impl AsRawFd) -> io::Result<(String, bool)> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq through the pointer, which points
    // at a live local; the fd is open.
    cvt(unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNGETIFF,
            &mut req as *mut libc::ifreq,
        )
    })?;
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let vnet = (libc::c_int::from(flags) & libc::IFF_VNET_HDR) != 0;
    Ok((String::from_utf8_lossy(&name).into_owned(), vnet))
}

/// An interface's MTU and index by name.
pub fn interface_mtu_index(name: &str) -> io::Result<(u16, u32)> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::other("bad interface name"))?;
    // SAFETY: passes a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(c.as_bytes().iter().take(libc::IFNAMSIZ - 1))
    {
        *dst = *src as libc::c_char;
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: SIOCGIFMTU reads the name and writes the MTU in the ifreq the
    // pointer points at, a live local; the fd is an open socket.
    cvt(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFMTU,
            &mut req as *mut libc::ifreq,
        )
    })?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok((u16::try_from(mtu).unwrap_or(u16::MAX), index))
}

/// Sends `data` with `fds` attached (`SCM_RIGHTS`) on a connected datagram
/// socket; blocks as the socket does (its send timeout applies).
pub fn send_with_fds(sock: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words: aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, room for one header
        // and `payload` bytes of data, which CMSG_FIRSTHDR/CMSG_DATA point
        // into; the copy writes exactly `payload` bytes from `fds`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    // SAFETY: msg points at live locals (iov, data, control) for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `sock` to send every datagram with Don't Fragment and never cut it
/// up locally, whatever path MTU the kernel has learnt (`IP_PMTUDISC_PROBE`,
/// or its IPv6 twin): a datagram larger than the outgoing interface's MTU
/// fails with `EMSGSIZE`, and one larger than a hop further on is dropped
/// there. What a path MTU search needs.
pub fn set_pmtu_probe(sock: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    match ipv6 {
        true => setsockopt_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        ),
        false => setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        ),
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
        set.wait(Some(Duration::from_millis(1))).unwrap();
        assert!(!set.ready(0));
        assert!(!bell.is_rung());
        bell.ring().unwrap();
        assert!(bell.is_rung());
        for _ in 0..2 {
            set.wait(Some(Duration::from_secs(5))).unwrap();
            assert!(set.ready(0));
        }
        assert!(!set.ready(1));
    }
    use socket2::{Domain, Protocol, Socket, Type};
    use std::net::UdpSocket;

    const WAIT: Duration = Duration::from_secs(2);

    /// `count` sockets in one reuseport group on `ip` (port 0), in group
    /// order, or `None` if `ip` cannot be bound here.
    fn group(ip: IpAddr, count: usize) -> Option<Vec<UdpSocket>> {
        let mut socks: Vec<UdpSocket> = Vec::new();
        let mut addr = SocketAddr::new(ip, 0);
        for _ in 0..count {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
                .expect("socket");
            s.set_reuse_port(true).expect("SO_REUSEPORT");
            if let Err(e) = s.bind(&addr.into()) {
                assert!(socks.is_empty(), "binding {addr}: {e}");
                println!("skipping {ip}: cannot bind: {e}");
                return None;
            }
            let s: UdpSocket = s.into();
            addr = s.local_addr().expect("local_addr");
            s.set_nonblocking(true).expect("nonblocking");
            socks.push(s);
        }
        Some(socks)
    }

    /// Sends `payload` to the group and returns the index of the socket
    /// that received it (exactly one must).
    fn receiver(socks: &[UdpSocket], payload: &[u8]) -> usize {
        let to = socks[0].local_addr().expect("local_addr");
        let tx = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).expect("sender");
        tx.send_to(payload, to).expect("send");
        let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let mut ready = Vec::new();
        wait_readable(&fds, Some(WAIT), &mut ready).expect("poll");
        assert_eq!(
            ready.len(),
            1,
            "datagram not received by exactly one socket"
        );
        let mut buf = [0u8; 64];
        let (n, _) = socks[ready[0]].recv_from(&mut buf).expect("recv");
        assert_eq!(&buf[..n], payload);
        ready[0]
    }

    /// Which socket gets each payload with `program` attached to a
    /// two-socket group on `ip`.
    fn probe(ip: IpAddr, program: &[libc::sock_filter], payloads: &[&[u8]]) -> Option<Vec<usize>> {
        let socks = group(ip, 2)?;
        attach_reuseport_cbpf(&socks[0], program).expect("attach");
        Some(payloads.iter().map(|p| receiver(&socks, p)).collect())
    }

    fn loopbacks() -> [IpAddr; 2] {
        [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
    }

    /// `ldb [0]; ret a`: the socket is byte 0 of what the program sees. It
    /// follows byte 0 of the UDP payload, not the UDP or IP header.
    #[test]
    fn load_origin_is_udp_payload() {
        let program = [
            bpf_stmt(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0),
            bpf_stmt(libc::BPF_RET | libc::BPF_A, 0),
        ];
        let payloads: [&[u8]; 6] = [&[1, 0], &[0, 1], &[1; 8], &[0; 8], &[1; 20], &[0; 20]];
        for ip in loopbacks() {
            if let Some(got) = probe(ip, &program, &payloads) {
                assert_eq!(got, [1, 0, 1, 0, 1, 0], "{ip}");
            }
        }
    }

    /// `ld len; jeq #12`: the length the program sees is that of the UDP
    /// payload (without the 8-byte UDP header).
    #[test]
    fn load_origin_len_is_udp_payload_len() {
        let program = [
            bpf_stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_LEN, 0),
            bpf_jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 12, 0, 1),
            bpf_stmt(libc::BPF_RET | libc::BPF_K, 1),
            bpf_stmt(libc::BPF_RET | libc::BPF_K, 0),
        ];
        let payloads: [&[u8]; 3] = [&[0; 12], &[0; 4], &[0; 20]];
        for ip in loopbacks() {
            if let Some(got) = probe(ip, &program, &payloads) {
                assert_eq!(got, [1, 0, 0], "{ip}");
            }
        }
    }

    /// Each message leaves with its own TOS / traffic class (plain and UDP
    /// GSO messages), the receiver is told each one's, and the kernel's UDP
    /// GRO never merges datagrams of different TOS bytes into one message.
    #[test]
    fn tos_per_message_is_sent_and_reported() {
        for ip in loopbacks() {
            let v6 = ip.is_ipv6();
            let Ok(rx) = UdpSocket::bind(SocketAddr::new(ip, 0)) else {
                println!("skipping {ip}: cannot bind");
                continue;
            };
            enable_recv_tos(&rx, v6).expect("recv tos");
            let gro = enable_udp_gro(&rx).is_ok();
            rx.set_read_timeout(Some(WAIT)).expect("timeout");
            let tx = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("sender");
            let gso = udp_gso_supported(&tx);
            // Datagrams of 200 bytes whose first byte is the TOS they go with.
            let tos_of = [0x02u8, 0x02, 0x02, 0x03, 0x03, 0xb8, 0x00, 0xc0];
            let bufs: Vec<Vec<u8>> = tos_of.iter().map(|&t| vec![t; 200]).collect();
            let datagrams: Vec<Datagram> = bufs
                .iter()
                .zip(tos_of)
                .map(|(b, tos)| Datagram {
                    head: &b[..20],
                    body: &b[20..],
                    tos,
                })
                .collect();
            let run = |first: usize, count: usize| Message {
                first,
                count,
                segment: (gso && count > 1).then_some(200),
                tos: tos_of[first],
            };
            let messages = if gso {
                vec![run(0, 3), run(3, 2), run(5, 1), run(6, 1), run(7, 1)]
            } else {
                (0..tos_of.len()).map(|i| run(i, 1)).collect()
            };
            let mut batch = SendBatch::new(gso);
            let to = rx.local_addr().expect("local_addr");
            let sent = batch
                .send_messages(&tx, &datagrams, &messages, to)
                .expect("sendmmsg");
            assert_eq!(sent, messages.len(), "{ip}");
            let mut recv = RecvBatch::new(16, 4096);
            let mut got = Vec::new();
            while got.len() < tos_of.len() {
                let n = recv.recv(&rx).expect("recvmmsg");
                for i in 0..n {
                    let (bytes, _, segment, tos) = recv.get_mut(i).expect("message");
                    let segment = segment.unwrap_or(bytes.len());
                    for d in bytes.chunks(segment) {
                        assert_eq!(
                            d[0], tos,
                            "{ip} gro {gro}: datagram in a message of another TOS"
                        );
                        got.push(tos);
                    }
                }
            }
            assert_eq!(got, tos_of, "{ip} gso {gso} gro {gro}");
        }
    }

    #[test]
    fn steer_by_lane_rejects_bad_lane_counts() {
        let socks = group(Ipv4Addr::LOCALHOST.into(), 1).expect("bind 127.0.0.1");
        for lanes in [0, MAX_LANES + 1, 9, usize::MAX] {
            let e = steer_by_lane(&socks[0], lanes).expect_err("bad lane count accepted");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "lanes {lanes}");
        }
        for lanes in 1..=MAX_LANES {
            steer_by_lane(&socks[0], lanes).expect("valid lane count");
        }
    }

    /// Every lane goes to socket `lane % lanes`, whatever the other bits
    /// of the Flags byte; short datagrams go to socket 0.
    #[test]
    fn steer_by_lane_picks_lane_modulo_lanes() {
        for ip in loopbacks() {
            for lanes in [3usize, 8] {
                let Some(socks) = group(ip, lanes) else {
                    continue;
                };
                steer_by_lane(&socks[0], lanes).expect("attach");
                for lane in 0..8u8 {
                    for other in [0x00, 0x01, 0x08, 0x80, 0x89] {
                        let mut buf = [0u8; 16];
                        buf[3] = (lane << 4) | other;
                        let got = receiver(&socks, &buf);
                        assert_eq!(got, usize::from(lane) % lanes, "{ip} lanes {lanes}");
                    }
                }
                for short in [&[][..], &[0x70][..], &[0x70, 0x70, 0x70][..]] {
                    assert_eq!(receiver(&socks, short), 0, "{ip} short {short:?}");
                }
                // Exactly the Flags byte: its lane counts.
                assert_eq!(receiver(&socks, &[0, 0, 0, 0x20]), 2 % lanes, "{ip}");
            }
        }
    }

    #[test]
    fn a_full_receive_buffer_is_counted_and_reported_with_the_next_datagram() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        enable_drop_count(&rx).expect("SO_RXQ_OVFL");
        // The smallest buffer the kernel allows: a few datagrams.
        setsockopt_int(rx.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 1).expect("SO_RCVBUF");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("local_addr");
        for _ in 0..200 {
            tx.send_to(&[0xbf; 100], to).expect("send");
        }
        let mut recv = RecvBatch::new(256, 512);
        let n = recv.recv_queued(&rx).expect("recvmmsg");
        assert!(
            n > 0 && n < 200,
            "{n} of 200 queued: the buffer was not small"
        );
        // Each datagram carries the count as of its own arrival: those
        // queued before the buffer filled carry none.
        assert_eq!(recv.overflow(n - 1), None);
        tx.send_to(&[0xbf; 100], to).expect("send");
        let m = recv.recv_queued(&rx).expect("recvmmsg");
        assert_eq!(m, 1);
        assert_eq!(
            recv.overflow(0),
            Some((200 - n) as u32),
            "{n} received first"
        );
    }
}
