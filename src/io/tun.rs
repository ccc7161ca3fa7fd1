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

use std::io;
use tracing::warn;
use tun_rs::{DeviceBuilder, SyncDevice};

/// Creates (and brings up) the TUN device `name`, with offloads if the
/// kernel has them and they are not turned off, and with `queues` queues
/// (one per forwarding lane; fewer if the kernel refuses, at least one).
/// The first queue is the device's main descriptor.
pub fn open(name: &str, mtu: u16, queues: usize) -> io::Result<Vec<SyncDevice>> {
    if queues > 1 && super::sys::interface_exists(name) {
        // Taken over with one queue: a leftover device nobody holds can be,
        // one that a process holds cannot (a multiqueue TUN would take
        // another queue, silently sharing the traffic of, say, a second
        // crosslink).
        warn!(
            tun = name,
            "the TUN device exists already; taking it over with one lane"
        );
        return open(name, mtu, 1).map_err(|e| {
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
            return open(name, mtu, 1);
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
