//! TUN devices: one per peer, layer 3, no packet information header.
//!
//! Where the kernel allows, a TUN is opened with offloads (`IFF_VNET_HDR`
//! and `TUNSETOFFLOAD` with checksum, TSO and, from Linux 6.2, USO): the
//! kernel then hands over TCP and UDP "super-packets" of up to 64 KiB with
//! a virtio-net header saying how to cut them, and takes such packets back
//! with the same header, so that the stacks on both sides do their
//! per-packet work once per 64 KiB instead of once per 1.4 KiB. The
//! sending threads cut super-packets with [`crate::segment`]; the
//! receiving threads merge what arrives with [`crate::coalesce`]. A
//! kernel that refuses the offloads gets a plain TUN, and
//! `CROSSLINK_TUN_OFFLOAD=0` asks for one.
//!
//! The descriptor is non-blocking: the sending thread waits for the first
//! packet of a burst with an interruptible poll and then reads what else is
//! queued without a poll per packet.

use std::io;
use tracing::warn;
use tun_rs::{DeviceBuilder, SyncDevice};

/// Creates (and brings up) the TUN device `name`, with offloads if the
/// kernel has them and they are not turned off.
pub fn open(name: &str, mtu: u16) -> io::Result<SyncDevice> {
    let wanted = std::env::var("CROSSLINK_TUN_OFFLOAD").map_or(true, |v| v != "0");
    if wanted {
        match build(name, mtu, true) {
            Ok(dev) => return Ok(dev),
            Err(e) => warn!(tun = name, error = %e, "TUN offloads unavailable; plain TUN"),
        }
    }
    build(name, mtu, false)
}

fn build(name: &str, mtu: u16, offload: bool) -> io::Result<SyncDevice> {
    DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .packet_information(false)
        .with(|b| {
            b.offload(offload);
        })
        .enable(true)
        .build_sync()
        .and_then(|dev| dev.set_nonblocking(true).map(|()| dev))
        .map_err(|e| io::Error::new(e.kind(), format!("creating TUN device {name}: {e}")))
}
