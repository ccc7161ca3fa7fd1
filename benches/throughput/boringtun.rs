//! The `boringtun` mode of the throughput bench: a userspace WireGuard
//! tunnel (`boringtun-cli`) between the gateways over path1, as a reference
//! for what another userspace tunnel forwards in the same lab.
//!
//! The lab is built kernel-only; then each gateway runs `boringtun-cli` in
//! the foreground on a TUN named `xlbt<pid><a|b>`, is configured over its
//! UAPI socket (`/var/run/wireguard/<ifname>.sock`, the cross-platform
//! userspace protocol: `set=1` / `get=1` key=value lines ended by an empty
//! line) and gets the same inner addresses as crosslink's TUN
//! (198.18.99.1/30 and .2/30). The kernel's routes over path1 to the far LAN
//! are replaced by routes into the tunnel, so client -> server traffic goes
//! gw-a -> wg -> path1 -> wg -> gw-b exactly as it goes through crosslink's
//! TUN in the crosslink modes. Nothing needs `wg` (wireguard-tools): the
//! keys are fixed and spoken to the UAPI socket directly.
//!
//! [`Tunnel`]'s `Drop` stops both processes and removes their sockets;
//! [`Tunnel::start`] also removes sockets left by a crashed bench.

use crosslink::lab::{self, Gw, Host, Lab, LabPath};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Where boringtun puts its UAPI sockets (fixed in boringtun).
const SOCK_DIR: &str = "/var/run/wireguard";
/// Prefix of the interface names (and so of the socket names).
const IF_PREFIX: &str = "xlbt";
/// The WireGuard UDP port on both gateways.
const WG_PORT: u16 = 51820;
/// The usual WireGuard inner MTU over a 1500-byte underlay (1500 - IPv6 - UDP
/// - WireGuard header and tag).
const WG_MTU: &str = "1420";

/// Fixed x25519 test keys (hex): the key pairs of RFC 7748 section 6.1
/// ("Alice" for gw-a, "Bob" for gw-b). The lab is thrown away afterwards.
fn keys(gw: Gw) -> (&'static str, &'static str) {
    match gw {
        Gw::A => (
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        ),
        Gw::B => (
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
            "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        ),
    }
}

/// `boringtun-cli` to use: `XL_BENCH_BORINGTUN`, else PATH, else
/// `~/.cargo/bin`. `Err` says where it was looked for.
pub fn find() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("XL_BENCH_BORINGTUN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("XL_BENCH_BORINGTUN={} is not a file", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin"));
    std::env::split_paths(&path)
        .chain(home)
        .map(|d| d.join("boringtun-cli"))
        .find(|p| p.is_file())
        .ok_or_else(|| "not in PATH nor in ~/.cargo/bin".to_string())
}

/// Both gateways' boringtun processes; `Drop` stops them and removes the sockets.
pub struct Tunnel {
    children: Vec<Child>,
    sockets: Vec<PathBuf>,
    logs: Vec<PathBuf>,
}

impl Tunnel {
    /// Starts and configures the tunnel in a kernel-only `lab`, routes the
    /// LANs into it and waits for the handshake.
    pub fn start(lab: &Lab, bin: &Path) -> Result<Tunnel, String> {
        sweep_stale_sockets();
        let mut t = Tunnel {
            children: Vec::new(),
            sockets: Vec::new(),
            logs: Vec::new(),
        };
        for gw in Gw::ALL {
            t.spawn(lab, gw, bin)?;
        }
        for (i, gw) in Gw::ALL.into_iter().enumerate() {
            t.wait_socket(i)?;
            t.configure(lab, gw)
                .map_err(|e| format!("{gw}: {e}{}", t.log_tail(i)))?;
        }
        t.wait_handshake(lab, Duration::from_secs(10))?;
        Ok(t)
    }

    fn spawn(&mut self, lab: &Lab, gw: Gw, bin: &Path) -> Result<(), String> {
        let name = ifname(gw);
        let log_path = lab.dir().join(format!("boringtun-{}.log", gw.name()));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = lab.command_in(gw.host(), bin);
        cmd.args(["--foreground", "--disable-drop-privileges", &name])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // Registered before it can fail, so Drop removes a socket made anyway.
        self.sockets.push(socket_path(&name));
        self.logs.push(log_path);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        self.children.push(child);
        Ok(())
    }

    fn wait_socket(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.sockets[i].exists() {
            if let Ok(Some(status)) = self.children[i].try_wait() {
                return Err(format!("boringtun exited ({status}){}", self.log_tail(i)));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no UAPI socket {} after 10 s{}",
                    self.sockets[i].display(),
                    self.log_tail(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Keys, port, peer over path1 (UAPI; the peer's allowed IPs are its
    /// tunnel address and the far LAN), then the interface's address, MTU
    /// and the route to the far LAN.
    fn configure(&self, lab: &Lab, gw: Gw) -> Result<(), String> {
        let (private, _) = keys(gw);
        let (_, peer_public) = keys(gw.other());
        let (addr, far_lan) = gw.tunnel();
        let (peer_addr, _) = gw.other().tunnel();
        let peer_host = peer_addr.split('/').next().unwrap_or(peer_addr);
        let set = format!(
            "set=1\nprivate_key={private}\nlisten_port={WG_PORT}\nreplace_peers=true\n\
             public_key={peer_public}\nendpoint={}:{WG_PORT}\nreplace_allowed_ips=true\n\
             allowed_ip={peer_host}/32\nallowed_ip={}\n\n",
            LabPath::Path1.addr(gw.other()),
            far_lan,
        );
        let answer = uapi(&socket_path(&ifname(gw)), &set)?;
        if !answer.lines().any(|l| l == "errno=0") {
            return Err(format!("UAPI set refused: {answer:?}"));
        }
        let dev = ifname(gw);
        let ip = |args: &[&str]| -> Result<(), String> {
            lab::run(lab.command_in(gw.host(), "ip").args(args))
                .map(drop)
                .map_err(|e| e.to_string())
        };
        ip(&["addr", "add", addr, "dev", &dev])?;
        ip(&["link", "set", &dev, "mtu", WG_MTU, "up"])?;
        // Replaces the kernel-only lab's route over path1.
        ip(&["route", "replace", far_lan, "dev", &dev])
    }

    /// Pokes the tunnel from gw-a (one UDP datagram to gw-b's tunnel address)
    /// until gw-a's UAPI reports a handshake.
    fn wait_handshake(&self, lab: &Lab, timeout: Duration) -> Result<(), String> {
        let (peer, _) = Gw::B.tunnel();
        let peer = peer.split('/').next().unwrap_or(peer);
        let poke = format!("echo poke > /dev/udp/{peer}/9");
        let deadline = Instant::now() + timeout;
        loop {
            let _ = lab::run(lab.command_in(Host::GwA, "bash").args(["-c", &poke]));
            std::thread::sleep(Duration::from_millis(200));
            let state = uapi(&self.sockets[0], "get=1\n\n")?;
            if state
                .lines()
                .any(|l| l.starts_with("last_handshake_time_sec="))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no WireGuard handshake after {timeout:?}; gw-a: {state:?}{}{}",
                    self.log_tail(0),
                    self.log_tail(1)
                ));
            }
        }
    }

    /// Bytes gw-a sent into the tunnel so far (UAPI `tx_bytes`): proof that
    /// the measured traffic went through WireGuard.
    pub fn tx_bytes(&self) -> Result<u64, String> {
        let state = uapi(&self.sockets[0], "get=1\n\n")?;
        state
            .lines()
            .find_map(|l| l.strip_prefix("tx_bytes="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no tx_bytes in {state:?}"))
    }

    fn log_tail(&self, i: usize) -> String {
        let text = self
            .logs
            .get(i)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\n  boringtun log:\n{tail}")
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for child in &mut self.children {
            lab::terminate(child, Duration::from_secs(2));
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// `xlbt<pid><a|b>`: unique per bench process (at most 12 of the 15
/// characters Linux allows), and the socket name tells whose it is.
fn ifname(gw: Gw) -> String {
    let side = match gw {
        Gw::A => 'a',
        Gw::B => 'b',
    };
    format!("{IF_PREFIX}{}{side}", std::process::id())
}

fn socket_path(ifname: &str) -> PathBuf {
    Path::new(SOCK_DIR).join(format!("{ifname}.sock"))
}

/// Removes `xlbt<pid><x>.sock` sockets whose bench process is gone (a run
/// killed before its Drop guards; its namespaces are swept by the lab).
fn sweep_stale_sockets() {
    let Ok(entries) = std::fs::read_dir(SOCK_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(IF_PREFIX)
            .and_then(|r| r.strip_suffix(".sock"))
            .and_then(|r| r.get(..r.len().saturating_sub(1)))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// One UAPI exchange: sends `request` (ending in an empty line) and returns
/// the answer up to its empty line.
fn uapi(socket: &Path, request: &str) -> Result<String, String> {
    let what = |e: std::io::Error| format!("UAPI {}: {e}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(what)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(what)?;
    stream.write_all(request.as_bytes()).map_err(what)?;
    let mut answer = String::new();
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(what)?;
        if line.is_empty() {
            break;
        }
        answer.push_str(&line);
        answer.push('\n');
    }
    Ok(answer)
}
