//! TUN devices: one per peer, layer 3, no packet information header.
//!
//! Where the kernel allows, a TUN is opened with offloads (`IFF_VNET_HDR`
//! and `TUNSETOFFLOAD` with checksum, TSO and, from Linux 6.2, USO): the
//! kernel then hands over TCP and UDP "super-packets" of up to 64 KiB with
//! a virtio-net header saying how to cut them, and takes such packets back
//! with the same header, so that the stacks on both sides do their
//! per-packet work once per 64 KiB instead of once per 1.4 KiB. The
//! sending threads cut super-packets with [`crate::core::segment`]; the
//! receiving threads merge what arrives with [`crate::core::coalesce`]. A
//! kernel that refuses the offloads gets a plain TUN, and
//! `CROSSLINK_TUN_OFFLOAD=0` asks for one.
//!
//! A peer with several forwarding lanes gets a multiqueue TUN, one queue
//! per lane ([`crate::io::lanes::Lane`]). The kernel puts each flow's
//! packets in the queue that last wrote packets of the same flow (either
//! direction), and otherwise spreads flows by hash.
//!
//! Every queue's descriptor is non-blocking: a lane waits for it with
//! `poll`, then reads what is queued without a poll per packet.
//!
//! A [`Queue`] reads and writes its descriptor with libc (`read`,
//! `write`, `writev`): each `unsafe` block is one call on a buffer it
//! borrows.
#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use tracing::warn;
use tun_rs::{DeviceBuilder, SyncDevice};

/// One queue of a peer's TUN device: its descriptor, and what the lanes
/// need to know about it.
///
/// tun-rs opens the device; its own type is not kept, because it cannot
/// take over a descriptor opened with offloads (`IFF_VNET_HDR`), which an
/// upgrade must ([`crate::io::upgrade`]): the new process gets the very
/// descriptors of the old one, so that nothing queued in them is lost.
/// Reading and writing a queue is plain `read`/`write`/`writev`, which is
/// all tun-rs did for a queue without packet information.
#[derive(Debug)]
pub struct Queue {
    fd: OwnedFd,
    /// Opened with `IFF_VNET_HDR` and offloads: every packet carries a
    /// virtio-net header (see the module docs).
    offload: bool,
    mtu: u16,
    index: u32,
}

impl Queue {
    /// Wraps a queue tun-rs opened.
    fn from_device(dev: SyncDevice, mtu: u16) -> io::Result<Queue> {
        let offload = dev.tcp_gso();
        let index = dev.if_index()?;
        // SAFETY: into_raw_fd hands over the device's open descriptor, which
        // nothing else owns from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(dev.into_raw_fd()) };
        Ok(Queue {
            fd,
            offload,
            mtu,
            index,
        })
    }

    /// A queue handed over by the process this one replaces, with what that
    /// process knew of it.
    pub fn adopt(fd: OwnedFd, offload: bool, mtu: u16, index: u32) -> Queue {
        Queue {
            fd,
            offload,
            mtu,
            index,
        }
    }

    /// Whether packets carry a virtio-net header (TCP and UDP super-packets).
    pub fn tcp_gso(&self) -> bool {
        self.offload
    }

    pub fn mtu(&self) -> io::Result<u16> {
        Ok(self.mtu)
    }

    pub fn if_index(&self) -> io::Result<u32> {
        Ok(self.index)
    }

    /// Reads one packet (the queue is non-blocking).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read writes at most buf.len() bytes into buf, a live
        // mutable slice; the descriptor is open while self lives.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one packet.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: write reads buf.len() bytes from buf, a live slice.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one packet given in pieces.
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: IoSlice is ABI-compatible with struct iovec (std guarantees
        // it on Unix); writev reads `count` of them, all live borrowed slices.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), bufs.as_ptr().cast(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Queue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Creates (and brings up) the TUN device `name`, with offloads if the
/// kernel has them and they are not turned off, and with `queues` queues
/// (one per forwarding lane; fewer if the kernel refuses, at least one).
/// The first queue is the device's main descriptor.
pub fn open(name: &str, mtu: u16, queues: usize) -> io::Result<Vec<Queue>> {
    open_devices(name, mtu, queues)?
        .into_iter()
        .map(|d| Queue::from_device(d, mtu))
        .collect()
}

fn open_devices(name: &str, mtu: u16, queues: usize) -> io::Result<Vec<SyncDevice>> {
    if queues > 1 && super::sys::interface_exists(name) {
        // Taken over with one queue: a leftover device nobody holds can be,
        // one that a process holds cannot (a multiqueue TUN would take
        // another queue, silently sharing the traffic of, say, a second
        // crosslink).
        warn!(
            tun = name,
            "the TUN device exists already; taking it over with one lane"
        );
        return open_devices(name, mtu, 1).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{e} (the device exists: is another crosslink using it?)"),
            )
        });
    }
    let wanted = std::env::var("CROSSLINK_TUN_OFFLOAD").map_or(true, |v| v != "0");
    let multi = queues > 1;
    let first = match wanted {
        true => build(name, mtu, true, multi).or_else(|e| {
            warn!(tun = name, error = %e, "TUN offloads unavailable; plain TUN");
            build(name, mtu, false, multi)
        }),
        false => build(name, mtu, false, multi),
    };
    let first = match first {
        Ok(dev) => dev,
        Err(e) if multi => {
            warn!(tun = name, error = %e, "multiqueue TUN unavailable; one forwarding lane");
            return open_devices(name, mtu, 1);
        }
        Err(e) => return Err(e),
    };
    let mut devs = Vec::with_capacity(queues);
    for _ in 1..queues {
        match first
            .try_clone()
            .and_then(|q| q.set_nonblocking(true).map(|()| q))
        {
            Ok(q) => devs.push(q),
            Err(e) => {
                warn!(tun = name, error = %e, queues = devs.len() + 1, "could not open every TUN queue");
                break;
            }
        }
    }
    devs.insert(0, first);
    Ok(devs)
}

fn build(name: &str, mtu: u16, offload: bool, multi_queue: bool) -> io::Result<SyncDevice> {
    DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .packet_information(false)
        .with(|b| {
            b.offload(offload);
            b.multi_queue(multi_queue);
        })
        .enable(true)
        .build_sync()
        .and_then(|dev| dev.set_nonblocking(true).map(|()| dev))
        .map_err(|e| io::Error::new(e.kind(), format!("creating TUN device {name}: {e}")))
}
