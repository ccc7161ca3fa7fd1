//! TUN devices: one per peer, layer 3, no packet information header.

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
        .map_err(|e| io::Error::new(e.kind(), format!("creating TUN device {name}: {e}")))
}
