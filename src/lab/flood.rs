//! `crosslink flood` (hidden): junk generator for the bad-input tests.
//!
//! Sends a bounded number of crafted datagrams at a bounded rate from any
//! source address and TTL, through a raw IPv4 socket (needs root, and is
//! only ever run inside a lab namespace). Each [`Kind`] is built to be
//! dropped for one known reason, so a test can check that the receiving
//! gateway counted every one of them. `capture` records datagrams a
//! gateway really received, for `--kind replay`.

use crate::core::crypto::{self, Key, Keys};
use crate::core::forward::{seal_data, Sealer, HEADROOM};
use crate::core::rng::Rng;
use crate::core::wire::bfd::{ControlPacket, State};
use crate::core::wire::overlay::Header;
use crate::lab::probe::parse_duration;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct FloodArgs {
    #[command(subcommand)]
    pub mode: FloodMode,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum FloodMode {
    /// Send crafted datagrams; prints {"sent": N}.
    Send(SendArgs),
    /// Record the UDP payloads arriving at a port (a copy; the owner still
    /// gets them); prints {"captured": N}.
    Capture(CaptureArgs),
}

/// What to send.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Overlay: random bytes, 16..1400 long, version byte never 1.
    Random,
    /// Overlay: 0..15 bytes.
    Truncated,
    /// Overlay: a sealed-data header and 1400..1450 bytes of junk (a full-MTU datagram).
    Oversized,
    /// Overlay: a well-formed plaintext data message (for a keyed peer).
    Plain,
    /// Overlay: sealed with a random key.
    WrongKey,
    /// Overlay: sealed with the right key (`--key`) but epoch 1, long gone.
    Stale,
    /// Overlay: sealed with the key in `--key`, newest possible epoch (for
    /// checking that a retired key is refused).
    Forged,
    /// Overlay: datagrams from a `capture` file, as they were.
    Replay,
    /// Overlay: a handshake initiation's header and length, random inside
    /// (a handshake flood: a wrong MAC where it gets that far).
    Handshake,
    /// BFD: random bytes, 24..200 long, version bits never 1.
    BfdRandom,
    /// BFD: 0..23 bytes.
    BfdTruncated,
    /// BFD: well-formed, with a random (wrong) Your Discriminator.
    BfdWrongDisc,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Source address written into the packets, IP:PORT.
    #[arg(long)]
    pub from: SocketAddrV4,
    /// Destination, IP:PORT.
    #[arg(long)]
    pub to: SocketAddrV4,
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Packets per second.
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    #[arg(long, default_value_t = 64)]
    pub ttl: u8,
    /// The peer's key file (`stale`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// A capture file (`replay`).
    #[arg(long)]
    pub replay: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CaptureArgs {
    /// Destination port to record.
    #[arg(long)]
    pub port: u16,
    /// Source address to record.
    #[arg(long)]
    pub from: Ipv4Addr,
    /// Record only overlay messages of this type (4: sealed data).
    #[arg(long)]
    pub msg_type: Option<u8>,
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn main(args: FloodArgs) -> i32 {
    let result = match args.mode {
        FloodMode::Send(a) => send(&a).map(|n| format!("{{\"sent\": {n}}}")),
        FloodMode::Capture(a) => capture(&a).map(|n| format!("{{\"captured\": {n}}}")),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("flood: {e}");
            1
        }
    }
}

fn send(a: &SendArgs) -> Result<u64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seed = crate::core::wire::flow::mix(u64::from(std::process::id()) ^ now.as_nanos() as u64);
    let mut rng = Rng::new(seed);
    let replay = match (&a.kind, &a.replay) {
        (Kind::Replay, Some(p)) => read_capture(p)?,
        (Kind::Replay, None) => return Err("--kind replay needs --replay FILE".into()),
        _ => Vec::new(),
    };
    let right = match (&a.kind, &a.key) {
        (Kind::Stale | Kind::Forged, Some(p)) => Some(crate::io::keys::read(p)?),
        (Kind::Stale | Kind::Forged, None) => return Err("this kind needs --key FILE".into()),
        _ => None,
    };
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .map_err(|e| format!("raw socket (root needed): {e}"))?;
    let to: SocketAddr = SocketAddr::V4(SocketAddrV4::new(*a.to.ip(), 0));
    let gap = Duration::from_nanos(1_000_000_000 / a.rate.max(1));
    let start = Instant::now();
    let mut payload = vec![0u8; 2048];
    let mut sent = 0;
    for i in 0..a.count {
        let len = match a.kind {
            Kind::Replay => {
                let Some(d) = replay.get((i as usize) % replay.len().max(1)) else {
                    break;
                };
                payload[..d.len()].copy_from_slice(d);
                d.len()
            }
            _ => craft(a, &mut rng, right.as_ref(), &mut payload),
        };
        let packet = ipv4_udp(a.from, a.to, a.ttl, &payload[..len]);
        sock.send_to(&packet, &to.into())
            .map_err(|e| format!("send: {e}"))?;
        sent += 1;
        // Pace: never ahead of the rate.
        let due = start + gap * (i as u32 + 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

/// One junk payload of the wanted kind; returns its length.
fn craft(a: &SendArgs, rng: &mut Rng, right: Option<&Key>, out: &mut [u8]) -> usize {
    match a.kind {
        Kind::Random => {
            let len = 16 + rng.below(1385) as usize;
            rng.fill(&mut out[..len]);
            if out[0] == crate::core::wire::overlay::VERSION {
                out[0] = 0xee;
            }
            len
        }
        Kind::Truncated => {
            let len = rng.below(16) as usize;
            rng.fill(&mut out[..len]);
            len
        }
        Kind::Oversized => {
            let len = 1400 + rng.below(50) as usize;
            rng.fill(&mut out[..len]);
            sealed_header(out, rng.next_u64(), u32::MAX);
            len
        }
        Kind::Plain => {
            let inner = 40;
            inner_ipv4(&mut out[HEADROOM..HEADROOM + inner]);
            let header = Header::data(rng.next_u64());
            let framed = crate::core::forward::encapsulate(out, inner, &header);
            to_front(out, framed)
        }
        Kind::WrongKey | Kind::Stale | Kind::Forged => {
            let mut k = [0u8; 32];
            rng.fill(&mut k);
            let key = match right {
                Some(r) => r.clone(),
                None => Key::from_bytes(k),
            };
            let keys = Keys::new(&key, None);
            let epoch = if a.kind == Kind::Stale { 1 } else { u32::MAX };
            let salt = crypto::path_salt(SocketAddr::V4(a.from), SocketAddr::V4(a.to));
            let inner = 40;
            inner_ipv4(&mut out[HEADROOM..HEADROOM + inner]);
            let sealer = Sealer {
                keys: &keys,
                epoch,
                salt,
            };
            let header = Header::data(1 + rng.below(1 << 40));
            let framed = seal_data(out, inner, &header, &sealer);
            to_front(out, framed)
        }
        Kind::Replay => 0,
        Kind::Handshake => {
            use crate::core::wire::overlay::{MsgType, BASE_LEN};
            let len = crate::core::handshake::INIT_LEN;
            rng.fill(&mut out[BASE_LEN..len]);
            let header = Header::echo(MsgType::Handshake, 1);
            let _ = header.emit(out);
            len
        }
        Kind::BfdRandom => {
            let len = 24 + rng.below(177) as usize;
            rng.fill(&mut out[..len]);
            if out[0] >> 5 == 1 {
                out[0] = (2 << 5) | (out[0] & 0x1f);
            }
            len
        }
        Kind::BfdTruncated => {
            let len = rng.below(24) as usize;
            rng.fill(&mut out[..len]);
            len
        }
        Kind::BfdWrongDisc => bfd_wrong_disc(rng, out),
    }
}

/// Moves a framed datagram to the start of `out`; returns its length.
fn to_front(
    out: &mut [u8],
    framed: Result<std::ops::Range<usize>, crate::core::drop::DropReason>,
) -> usize {
    match framed {
        Ok(r) => {
            let len = r.len();
            out.copy_within(r, 0);
            len
        }
        Err(_) => 0,
    }
}

fn sealed_header(out: &mut [u8], sequence: u64, epoch: u32) {
    let h = Header {
        msg_type: crate::core::wire::overlay::MsgType::SealedData,
        flags: 0,
        epoch,
        sequence: sequence >> 8,
        peer_seq: None,
    };
    let _ = h.emit(out);
}

/// A BFD packet that parses but matches no session: Your Discriminator is
/// random (never 0, which would be demultiplexed by address).
fn bfd_wrong_disc(rng: &mut Rng, out: &mut [u8]) -> usize {
    let my = (rng.next_u64() as u32) | 1;
    let your = (rng.next_u64() as u32) | 1;
    let p = ControlPacket::new(State::Up, my, your, 10_000);
    p.emit(out).unwrap_or(0)
}

/// A minimal IPv4/UDP packet (198.18.10.1 -> 198.18.30.2) as inner payload.
fn inner_ipv4(out: &mut [u8]) {
    out.fill(0);
    let len = out.len() as u16;
    out[0] = 0x45;
    out[2..4].copy_from_slice(&len.to_be_bytes());
    out[8] = 64;
    out[9] = 17;
    out[12..16].copy_from_slice(&[198, 18, 10, 1]);
    out[16..20].copy_from_slice(&[198, 18, 30, 2]);
    out[20..22].copy_from_slice(&1u16.to_be_bytes());
    out[22..24].copy_from_slice(&9u16.to_be_bytes());
    out[24..26].copy_from_slice(&(len - 20).to_be_bytes());
}

/// An IPv4 header (the kernel fills in the checksum and ID) and a UDP
/// header (checksum 0: none) in front of `payload`.
fn ipv4_udp(from: SocketAddrV4, to: SocketAddrV4, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = ttl;
    p[9] = 17;
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    p[20..22].copy_from_slice(&from.port().to_be_bytes());
    p[22..24].copy_from_slice(&to.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

fn capture(a: &CaptureArgs) -> Result<u64, String> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .map_err(|e| format!("raw socket (root needed): {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let end = Instant::now() + a.timeout;
    let mut file = std::fs::File::create(&a.out).map_err(|e| e.to_string())?;
    let mut bytes = [0u8; 2048];
    let mut n = 0;
    while n < a.count && Instant::now() < end {
        let Ok(len) = (&sock).read(&mut bytes) else {
            continue;
        };
        let bytes = &bytes[..len];
        let Some(payload) = udp_payload(bytes, a.from, a.port) else {
            continue;
        };
        if a.msg_type.is_some_and(|t| payload.get(1) != Some(&t)) {
            continue;
        }
        let l = payload.len() as u32;
        file.write_all(&l.to_be_bytes())
            .and_then(|()| file.write_all(payload))
            .map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

/// The UDP payload of an IPv4 packet from `from` to `port`.
fn udp_payload(ip: &[u8], from: Ipv4Addr, port: u16) -> Option<&[u8]> {
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.get(9) != Some(&17) || ip.get(12..16)? != from.octets() {
        return None;
    }
    let udp = ip.get(ihl..)?;
    let dport = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    (dport == port).then(|| udp.get(8..)).flatten()
}

fn read_capture(path: &PathBuf) -> Result<Vec<Vec<u8>>, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let l = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(d) = rest.get(4..4 + l) else { break };
        out.push(d.to_vec());
        rest = &rest[4 + l..];
    }
    if out.is_empty() {
        return Err(format!("{}: no datagrams", path.display()));
    }
    Ok(out)
}
