//! Socket set-up: one data socket per path, and the BFD sockets.

use super::sys;
use crate::config::Hop;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

/// RFC 5881 single-hop BFD control port.
pub const BFD_SINGLE_HOP_PORT: u16 = 3784;
/// RFC 5883 multihop BFD control port.
pub const BFD_MULTI_HOP_PORT: u16 = 4784;
const SOCKET_BUFFER: usize = 4 << 20;

fn udp_socket(addr: &SocketAddr, interface: Option<&str>) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(*addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if let Some(ifname) = interface {
        sock.bind_device(Some(ifname.as_bytes()))
            .map_err(|e| io::Error::new(e.kind(), format!("binding to interface {ifname}: {e}")))?;
    }
    Ok(sock)
}

fn with_context(e: io::Error, what: &str, addr: &SocketAddr) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {addr}: {e}"))
}

/// The data socket of a path, bound to its `local` address.
pub fn data_socket(local: SocketAddr, interface: Option<&str>) -> io::Result<UdpSocket> {
    let sock = udp_socket(&local, interface)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&local.into())
        .map_err(|e| with_context(e, "binding data socket", &local))?;
    Ok(sock.into())
}

/// The port BFD listens on for `hop`.
pub fn bfd_port(hop: Hop) -> u16 {
    match hop {
        Hop::Single => BFD_SINGLE_HOP_PORT,
        Hop::Multi => BFD_MULTI_HOP_PORT,
    }
}

/// The socket receiving BFD control packets on `local` (RFC 5881 §4).
pub fn bfd_rx_socket(local: IpAddr, hop: Hop, interface: Option<&str>) -> io::Result<UdpSocket> {
    let addr = SocketAddr::new(local, bfd_port(hop));
    let sock = udp_socket(&addr, interface)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .map_err(|e| with_context(e, "binding BFD socket", &addr))?;
    let sock: UdpSocket = sock.into();
    sys::enable_recv_ttl(&sock, local.is_ipv6())?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A path's BFD transmit socket: source port in 49152-65535 (RFC 5881 §4),
/// TTL / hop limit 255.
pub fn bfd_tx_socket(local: IpAddr, interface: Option<&str>, seed: u16) -> io::Result<UdpSocket> {
    const FIRST: u16 = 49152;
    const COUNT: u16 = 16384;
    let mut last = None;
    for k in 0..256u16 {
        let port = FIRST + (seed.wrapping_add(k.wrapping_mul(97)) % COUNT);
        let addr = SocketAddr::new(local, port);
        let sock = udp_socket(&addr, interface)?;
        if local.is_ipv6() {
            sock.set_unicast_hops_v6(255)?;
        } else {
            sock.set_ttl_v4(255)?;
        }
        match sock.bind(&addr.into()) {
            Ok(()) => {
                let sock: UdpSocket = sock.into();
                sock.set_nonblocking(true)?;
                return Ok(sock);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(with_context(e, "binding BFD source", &addr)),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free BFD source port")))
}

/// Whether a send error means the underlay cannot reach the far end right
/// now (no route, interface down, address gone), as opposed to a transient
/// local condition such as a full socket buffer.
pub fn is_reachability_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EADDRNOTAVAIL)
    )
}
