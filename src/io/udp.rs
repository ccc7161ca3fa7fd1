//! Socket set-up: the data sockets of a path (one, or one per lane sharing
//! its port), and the BFD sockets.

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
    let sock = bind_data_socket(local, interface, false)?;
    Ok(sock.into())
}

/// `lanes` data sockets of a path, all bound to its `local` address, with
/// the kernel steering each datagram to socket `lane % lanes` by the lane
/// in its overlay header ([`sys::steer_by_lane`]): socket k of the result
/// receives lane k. With `lanes == 1`, the one socket [`data_socket`]
/// gives (no `SO_REUSEPORT`). With port 0 the first socket gets a free
/// port and the others join it there. `lanes` must be
/// 1..=[`sys::MAX_LANES`], else `InvalidInput`.
///
/// The sockets must stay open together: when one closes, the kernel moves
/// the last socket of the group into its place and the lanes no longer
/// match. Another socket of the same user already bound to `local` with
/// `SO_REUSEPORT` would share the group and shift the indexes.
pub fn data_sockets(
    local: SocketAddr,
    interface: Option<&str>,
    lanes: usize,
) -> io::Result<Vec<UdpSocket>> {
    if !(1..=sys::MAX_LANES).contains(&lanes) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("lanes must be 1..={}, not {lanes}", sys::MAX_LANES),
        ));
    }
    if lanes == 1 {
        return data_socket(local, interface).map(|s| vec![s]);
    }
    // Bind order is group order, which is the index the filter returns.
    let first = bind_data_socket(local, interface, true)?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "data socket not IP"))?;
    let rest = (1..lanes)
        .map(|_| bind_data_socket(bound, interface, true))
        .collect::<io::Result<Vec<_>>>()?;
    // Attached once every socket has joined, to the whole group.
    sys::steer_by_lane(&first, lanes)
        .map_err(|e| with_context(e, "steering lanes of data socket", &bound))?;
    Ok(std::iter::once(first)
        .chain(rest)
        .map(UdpSocket::from)
        .collect())
}

/// A data socket bound to `local`, with `SO_REUSEPORT` set first if
/// `reuse_port`. Over IPv6 it accepts datagrams without a UDP checksum
/// ([`sys::accept_zero_checksum_v6`]), which a far gateway's kernel fast
/// path sends.
fn bind_data_socket(
    local: SocketAddr,
    interface: Option<&str>,
    reuse_port: bool,
) -> io::Result<Socket> {
    let sock = udp_socket(&local, interface)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if local.is_ipv6() {
        sys::accept_zero_checksum_v6(&sock)
            .map_err(|e| with_context(e, "accepting a zero UDP checksum on data socket", &local))?;
    }
    sock.bind(&local.into())
        .map_err(|e| with_context(e, "binding data socket", &local))?;
    Ok(sock)
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
    // One socket takes every session's packets on this address: 100 000
    // a second at 1000 sessions of 10 ms. The default buffer (about 200
    // KiB, a few hundred small datagrams) holds 2 to 3 ms of them, so a
    // BFD thread a few milliseconds late would drop packets of many
    // sessions at once. 4 MiB holds about 40 ms at 1000 sessions, more
    // than a detection time. Best effort: without it BFD still runs.
    let _ = sys::force_recv_buffer(&sock, BFD_RX_BUFFER);
    // What it drops all the same is counted (`bfd_overflow`).
    let _ = sys::enable_drop_count(&sock);
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// The receive buffer of a BFD receive socket.
const BFD_RX_BUFFER: usize = 4 << 20;

/// Readies a path's data socket for QoS and ECN: the kernel reports each
/// datagram's TOS / traffic class (the outer ECN field, for RFC 6040
/// decapsulation), and what the socket sends without a per-message TOS
/// (probes, echoes) carries `dscp` (0 when the path inherits the inner
/// packets' DSCP).
pub fn set_data_qos(sock: &UdpSocket, dscp: Option<u8>) -> io::Result<()> {
    let v6 = sock.local_addr()?.is_ipv6();
    sys::enable_recv_tos(sock, v6)?;
    sys::set_tos(sock, v6, (dscp.unwrap_or(0) & 0x3f) << 2)
}

/// A path's BFD transmit socket: source port in 49152-65535 (RFC 5881 §4),
/// TTL / hop limit 255, its packets marked with `dscp` (RFC 5881 and 5883
/// leave it to the operator; routers send BFD as CS6, network control).
pub fn bfd_tx_socket(
    local: IpAddr,
    interface: Option<&str>,
    seed: u16,
    dscp: u8,
) -> io::Result<UdpSocket> {
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
        sys::set_tos(&sock, local.is_ipv6(), (dscp & 0x3f) << 2)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    /// Datagrams sent per lane.
    const PER_LANE: u8 = 3;

    /// `data_sockets(ip:0, None, lanes)`, or `None` (with a message) if
    /// `ip` cannot be bound here.
    fn open(ip: IpAddr, lanes: usize) -> Option<Vec<UdpSocket>> {
        if let Err(e) = UdpSocket::bind(SocketAddr::new(ip, 0)) {
            println!("skipping {ip}: cannot bind: {e}");
            return None;
        }
        let socks = data_sockets(SocketAddr::new(ip, 0), None, lanes).expect("data_sockets");
        assert_eq!(socks.len(), lanes);
        for s in &socks {
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("read timeout");
        }
        Some(socks)
    }

    /// A 16-byte overlay-header-like datagram of `lane`, numbered `seq`;
    /// the Flags byte also carries bit 0 and the reserved bits 3 and 7.
    fn datagram(lane: u8, seq: u8) -> [u8; 16] {
        let mut buf = [0u8; 16];
        buf[0] = lane;
        buf[1] = seq;
        buf[3] = (lane << 4) | if seq % 2 == 0 { 0x01 } else { 0x89 };
        buf
    }

    /// Sends every lane's datagrams to `lanes` data sockets on `ip` and
    /// checks socket k receives exactly those of the lanes `l` with
    /// `l % lanes == k`.
    fn check_steering(ip: IpAddr, lanes: usize) {
        let Some(socks) = open(ip, lanes) else { return };
        let to = socks[0].local_addr().expect("local_addr");
        assert_ne!(to.port(), 0);
        for s in &socks {
            assert_eq!(s.local_addr().expect("local_addr"), to);
        }
        let tx = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("sender");
        for seq in 0..PER_LANE {
            for lane in 0..8u8 {
                tx.send_to(&datagram(lane, seq), to).expect("send");
            }
        }
        for (k, sock) in socks.iter().enumerate() {
            let mut want: Vec<[u8; 16]> = (0..8u8)
                .filter(|&lane| usize::from(lane) % lanes == k)
                .flat_map(|lane| (0..PER_LANE).map(move |seq| datagram(lane, seq)))
                .collect();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            for _ in 0..want.len() {
                let (n, _) = sock
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("{ip} lanes {lanes}: socket {k}: {e}"));
                got.push(<[u8; 16]>::try_from(&buf[..n]).expect("16 bytes"));
            }
            sock.set_nonblocking(true).expect("nonblocking");
            let extra = sock.recv_from(&mut buf);
            assert!(
                extra.is_err(),
                "{ip} lanes {lanes}: socket {k} got an extra {:?}",
                &buf[..4]
            );
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "{ip} lanes {lanes}: socket {k}");
        }
    }

    #[test]
    fn data_sockets_steer_lanes_ipv4() {
        check_steering(Ipv4Addr::LOCALHOST.into(), 2);
        check_steering(Ipv4Addr::LOCALHOST.into(), 4);
    }

    #[test]
    fn data_sockets_steer_lanes_ipv6() {
        check_steering(Ipv6Addr::LOCALHOST.into(), 2);
        check_steering(Ipv6Addr::LOCALHOST.into(), 4);
    }

    /// A datagram too short for the Flags byte is still delivered.
    #[test]
    fn data_sockets_deliver_short_datagrams() {
        for ip in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            Ipv6Addr::LOCALHOST.into(),
        ] {
            let Some(socks) = open(ip, 4) else { continue };
            let to = socks[0].local_addr().expect("local_addr");
            let tx = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("sender");
            tx.send_to(&[0x70, 0x70], to).expect("send");
            let fds: Vec<_> = socks.iter().map(|s| s.as_raw_fd()).collect();
            let mut ready = Vec::new();
            sys::wait_readable(&fds, Some(Duration::from_secs(2)), &mut ready).expect("poll");
            assert_eq!(ready, [0], "{ip}: 2-byte datagram not on socket 0 alone");
            let mut buf = [0u8; 16];
            let (n, _) = socks[0].recv_from(&mut buf).expect("recv");
            assert_eq!(&buf[..n], [0x70, 0x70]);
        }
    }

    #[test]
    fn data_sockets_one_lane_is_plain_data_socket() {
        let socks = open(Ipv4Addr::LOCALHOST.into(), 1).expect("bind 127.0.0.1");
        let to = socks[0].local_addr().expect("local_addr");
        // Without SO_REUSEPORT the port cannot be shared.
        let again = bind_data_socket(to, None, true);
        assert_eq!(
            again.map(drop).map_err(|e| e.kind()),
            Err(io::ErrorKind::AddrInUse)
        );
    }

    /// BFD control packets leave with the configured DSCP (CS6 by
    /// default), IPv4 and IPv6; a data socket sends probes with its
    /// path's fixed DSCP and reports what arrives.
    #[test]
    fn bfd_and_data_sockets_are_marked() {
        for ip in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            Ipv6Addr::LOCALHOST.into(),
        ] {
            let Ok(rx) = UdpSocket::bind(SocketAddr::new(ip, 0)) else {
                println!("skipping {ip}: cannot bind");
                continue;
            };
            set_data_qos(&rx, None).expect("data socket QoS");
            rx.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let to = rx.local_addr().expect("local_addr");
            let bfd = bfd_tx_socket(ip, None, 7, 48).expect("BFD socket");
            bfd.send_to(b"bfd", to).expect("send");
            let data = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("data");
            set_data_qos(&data, Some(10)).expect("data socket QoS");
            data.send_to(b"probe", to).expect("send");
            let mut batch = sys::RecvBatch::new(4, 64);
            let mut got = Vec::new();
            while got.len() < 2 {
                let n = batch.recv(&rx).expect("recv");
                for i in 0..n {
                    let (bytes, _, _, tos) = batch.get_mut(i).expect("message");
                    got.push((bytes.to_vec(), tos));
                }
            }
            assert_eq!(
                got,
                vec![(b"bfd".to_vec(), 0xc0), (b"probe".to_vec(), 0x28)],
                "{ip}"
            );
        }
    }

    #[test]
    fn data_sockets_reject_bad_lane_counts() {
        let any = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0);
        for lanes in [0, 9] {
            let e = data_sockets(any, None, lanes).expect_err("bad lane count accepted");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "lanes {lanes}");
        }
    }
}
