//! The `vxlan` mode of the throughput bench: the kernel's own UDP tunnel
//! (VXLAN, RFC 7348) between the gateways over path1, as the reference for
//! what UDP encapsulation costs when nothing leaves the kernel.
//!
//! The lab is built kernel-only; then each gateway gets a VXLAN device
//! (`xlvx`, VNI 1, UDP port 4789, local and remote set to the path1
//! addresses, so no multicast), the same inner addresses as crosslink's TUN
//! (198.18.99.1/30 and .2/30) and, in place of the kernel-only lab's route
//! over path1, a route to the far LAN via the far end's tunnel address. The
//! device lives in the gateway's namespace and goes with it.
//!
//! VXLAN carries Ethernet frames, so it adds 50 bytes where crosslink adds
//! its overlay header; the inner MTU is 1450 either way within a few bytes.

use crosslink::lab::{self, Gw, Lab, LabPath};

/// The device name (one per namespace).
const DEV: &str = "xlvx";

/// Builds the tunnel on both gateways and routes the LANs into it. `Err`
/// says why (for example a kernel built without VXLAN).
pub fn start(lab: &Lab) -> Result<(), String> {
    for gw in Gw::ALL {
        let ip = |args: &[&str]| -> Result<(), String> {
            lab::run(lab.command_in(gw.host(), "ip").args(args))
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let local = LabPath::Path1.addr(gw).to_string();
        let remote = LabPath::Path1.addr(gw.other()).to_string();
        let (addr, far_lan) = gw.tunnel();
        let (peer_addr, _) = gw.other().tunnel();
        let via = peer_addr.split('/').next().unwrap_or(peer_addr);
        ip(&[
            "link", "add", DEV, "type", "vxlan", "id", "1", "local", &local, "remote", &remote,
            "dstport", "4789", "dev", "path1",
        ])
        .map_err(|e| format!("no VXLAN device: {e}"))?;
        ip(&["addr", "add", addr, "dev", DEV])?;
        ip(&["link", "set", DEV, "up"])?;
        ip(&["route", "replace", far_lan, "via", via, "dev", DEV])?;
    }
    Ok(())
}

/// Bytes gw-a sent into the tunnel so far: proof that the measured traffic
/// went through VXLAN and not over the plain route.
pub fn tx_bytes(lab: &Lab) -> Result<u64, String> {
    let text = lab::run(
        lab.command_in(Gw::A.host(), "cat")
            .arg(format!("/sys/class/net/{DEV}/statistics/tx_bytes")),
    )
    .map_err(|e| e.to_string())?;
    text.trim()
        .parse()
        .map_err(|e| format!("tx_bytes {text:?}: {e}"))
}
