//! TUN devices: one per peer, layer 3, no packet information header.
//!
//! The descriptor is non-blocking: the sending thread waits for the first
//! packet of a burst with an interruptible poll and then reads what else is
//! queued without a poll per packet.

use std::io;
use tun_rs::{DeviceBuilder, SyncDevice};

/// Creates (and brings up) the TUN device `name`.
pub fn open(name: &str, mtu: u16) -> io::Result<SyncDevice> {
    DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .packet_information(false)
        .enable(true)
        .build_sync()
        .and_then(|dev| dev.set_nonblocking(true).map(|()| dev))
        .map_err(|e| io::Error::new(e.kind(), format!("creating TUN device {name}: {e}")))
}
