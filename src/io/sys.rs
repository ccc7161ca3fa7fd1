//! The few system calls no crate wraps: receiving a datagram with its IP
//! TTL (for GTSM), waiting on several sockets with a nanosecond timeout,
//! TUN carrier control, and real-time scheduling. This is the only module
//! with `unsafe`; each block is one libc call on a buffer it owns.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
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

/// One received datagram.
pub struct Received {
    pub len: usize,
    pub src: SocketAddr,
    pub ttl: Option<u8>,
}

/// `recvmsg` without blocking, returning the source and the IP TTL.
/// `Ok(None)` when nothing is queued.
pub fn recv_with_ttl(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Option<Received>> {
    let mut addr: MaybeUninit<libc::sockaddr_storage> = MaybeUninit::zeroed();
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = addr.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: fd is a live socket, msg points at buffers owned by this frame.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled `addr` up to msg_namelen.
    let src = unsafe { sockaddr_to_std(addr.as_ptr()) }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown address family"))?;
    let mut ttl = None;
    // SAFETY: CMSG_* walk the control buffer the kernel filled, bounded by msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let is_ttl = (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_TTL)
                || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_HOPLIMIT);
            if is_ttl {
                let v: libc::c_int = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                ttl = u8::try_from(v).ok();
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Some(Received {
        len: n as usize,
        src,
        ttl,
    }))
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
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: pfds and ts live across the call; the length matches.
    let r = unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            tsp,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(e);
    }
    for (i, p) in pfds.iter().enumerate() {
        if p.revents != 0 {
            ready.push(i);
        }
    }
    Ok(())
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

/// Sets the calling thread to SCHED_FIFO at `priority`.
pub fn set_realtime_priority(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: 0 names the calling thread; param is a live struct.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) }).map(|_| ())
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
