//! The lab's shape: its hosts, gateways and paths, the namespaces, links and
//! addresses that make them, and the gateways' configuration files.

use super::*;

/// A gateway of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gw {
    A,
    B,
}

impl Gw {
    pub const ALL: [Gw; 2] = [Gw::A, Gw::B];

    pub fn name(self) -> &'static str {
        match self {
            Gw::A => "gw-a",
            Gw::B => "gw-b",
        }
    }

    pub fn host(self) -> Host {
        match self {
            Gw::A => Host::GwA,
            Gw::B => Host::GwB,
        }
    }

    /// The gateway at the other end of the paths.
    pub fn other(self) -> Gw {
        match self {
            Gw::A => Gw::B,
            Gw::B => Gw::A,
        }
    }

    /// The gateway's tunnel address and the far LAN routed into the tunnel
    /// (crosslink's TUN in the lab configs; the other tunnels of the
    /// throughput bench use the same).
    pub fn tunnel(self) -> (&'static str, &'static str) {
        match self {
            Gw::A => ("198.18.99.1/30", "198.18.30.0/24"),
            Gw::B => ("198.18.99.2/30", "198.18.10.0/24"),
        }
    }
}

/// One of the two underlay paths between the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabPath {
    Path1,
    Path2,
}

impl LabPath {
    pub const ALL: [LabPath; 2] = [LabPath::Path1, LabPath::Path2];

    /// The path's name in the configs and status, which is also its veth's name.
    pub fn name(self) -> &'static str {
        match self {
            LabPath::Path1 => "path1",
            LabPath::Path2 => "path2",
        }
    }

    fn subnet_octet(self) -> u8 {
        match self {
            LabPath::Path1 => 21,
            LabPath::Path2 => 22,
        }
    }

    /// The path's underlay address on a gateway.
    pub fn addr(self, gw: Gw) -> Ipv4Addr {
        let host = match gw {
            Gw::A => 1,
            Gw::B => 2,
        };
        Ipv4Addr::new(198, 18, self.subnet_octet(), host)
    }

    fn priority(self) -> u32 {
        match self {
            LabPath::Path1 => 1,
            LabPath::Path2 => 2,
        }
    }
}

/// A direction of travel on a path, for one-way faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From gateway A to gateway B.
    AToB,
    /// From gateway B to gateway A.
    BToA,
}

/// A namespace of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Client,
    GwA,
    GwB,
    Server,
}

impl Host {
    pub const ALL: [Host; 4] = [Host::Client, Host::GwA, Host::GwB, Host::Server];

    pub(super) fn suffix(self) -> &'static str {
        match self {
            Host::Client => "c",
            Host::GwA => "a",
            Host::GwB => "b",
            Host::Server => "s",
        }
    }
}

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);

pub const GW_A_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);

pub const GW_B_LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 1);

pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 2);

/// The UDP port crosslink's data plane uses on every path.
pub const DATA_PORT: u16 = 4800;

/// Kills every process in a namespace and deletes it; missing namespaces are fine.
pub(super) fn remove_netns(name: &str) {
    if !Path::new("/run/netns").join(name).exists() {
        return;
    }
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            signal_pid(pid, "KILL");
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Deletes `xl-<tag>-<pid>-<role>` namespaces whose process no longer exists.
pub(super) fn sweep_stale_namespaces() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("xl-") {
            continue;
        }
        let mut parts = name.rsplitn(3, '-');
        let (_role, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            remove_netns(&name);
        }
    }
}

impl Lab {
    pub(super) fn build(&mut self) -> Result<()> {
        for host in Host::ALL {
            let ns = self.ns(host);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns);
            // Forwarding on, reverse-path filtering off (also for the TUN made later).
            self.sh_in(
                host,
                "echo 1 > /proc/sys/net/ipv4/ip_forward; \
                 echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; \
                 echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter; \
                 echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null; \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null; true",
            )?;
            self.ip_in(host, &["link", "set", "lo", "up"])?;
        }
        let (a, b) = (self.ns(Host::GwA), self.ns(Host::GwB));
        // veth pairs are created straight inside the namespaces: nothing in the root one.
        self.ip_in(
            Host::Client,
            &[
                "link", "add", "lan", "type", "veth", "peer", "name", "lan", "netns", &a,
            ],
        )?;
        for path in LabPath::ALL {
            let name = path.name();
            self.ip_in(
                Host::GwA,
                &[
                    "link", "add", name, "type", "veth", "peer", "name", name, "netns", &b,
                ],
            )?;
        }
        self.ip_in(
            Host::Server,
            &[
                "link", "add", "lan", "type", "veth", "peer", "name", "lan", "netns", &b,
            ],
        )?;
        let addrs: [(Host, &str, String); 8] = [
            (Host::Client, "lan", format!("{CLIENT_ADDR}/24")),
            (Host::GwA, "lan", format!("{GW_A_LAN_ADDR}/24")),
            (
                Host::GwA,
                "path1",
                format!("{}/30", LabPath::Path1.addr(Gw::A)),
            ),
            (
                Host::GwA,
                "path2",
                format!("{}/30", LabPath::Path2.addr(Gw::A)),
            ),
            (
                Host::GwB,
                "path1",
                format!("{}/30", LabPath::Path1.addr(Gw::B)),
            ),
            (
                Host::GwB,
                "path2",
                format!("{}/30", LabPath::Path2.addr(Gw::B)),
            ),
            (Host::GwB, "lan", format!("{GW_B_LAN_ADDR}/24")),
            (Host::Server, "lan", format!("{SERVER_ADDR}/24")),
        ];
        for (host, dev, addr) in &addrs {
            self.ip_in(*host, &["addr", "add", addr, "dev", dev])?;
            self.ip_in(*host, &["link", "set", dev, "up"])?;
        }
        self.sh_in(
            Host::GwA,
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
        )?;
        self.sh_in(
            Host::GwB,
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
        )?;
        self.ip_in(
            Host::Client,
            &["route", "add", "default", "via", &GW_A_LAN_ADDR.to_string()],
        )?;
        self.ip_in(
            Host::Server,
            &["route", "add", "default", "via", &GW_B_LAN_ADDR.to_string()],
        )?;
        if self.opts.kernel_only {
            let p = LabPath::Path1;
            self.ip_in(
                Host::GwA,
                &[
                    "route",
                    "add",
                    "198.18.30.0/24",
                    "via",
                    &p.addr(Gw::B).to_string(),
                ],
            )?;
            self.ip_in(
                Host::GwB,
                &[
                    "route",
                    "add",
                    "198.18.10.0/24",
                    "via",
                    &p.addr(Gw::A).to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// The config file of a gateway.
    pub fn config_text(&self, gw: Gw) -> String {
        let o = &self.opts;
        let (peer, tun) = match gw {
            Gw::A => ("b", "xl-b"),
            Gw::B => ("a", "xl-a"),
        };
        let (tun_addr, route) = gw.tunnel();
        let other = gw.other();
        let mut text = format!(
            "# crosslink lab: {gw} (written by crosslink::lab)\n\
             [gateway]\nname = \"{gw}\"\ncontrol_socket = \"{sock}\"\n{private}\n\
             [bfd]\ntx_interval = \"{tx}\"\nrx_interval = \"{rx}\"\nmultiplier = {mult}\n{offload}\n\
             [[peer]]\nname = \"{peer}\"\ntun = \"{tun}\"\ntun_addresses = [\"{tun_addr}\"]\n\
             routes = [\"{route}\"]\npolicy = \"{policy}\"\nrevert_hold = \"{hold}\"\n{key}{public}{fast}",
            policy = o.policy,
            sock = self.socket_path(gw).display(),
            offload = if o.bfd_offload {
                "offload = true\n"
            } else {
                ""
            },
            fast = if o.fast_path {
                "fast_path = true\n"
            } else {
                ""
            },
            private = match o.key_pairs {
                true => format!(
                    "private_key_file = \"{}\"\n",
                    self.private_key_path(gw).display()
                ),
                false => String::new(),
            },
            public = match o.key_pairs {
                true => format!("public_key = \"{}\"\n", self.private_key(other).public()),
                false => String::new(),
            },
            key = match &o.key {
                Some(_) => format!("key_file = \"{}\"\n", self.key_path().display()),
                None => String::new(),
            },
            tx = config_duration(o.tx_interval),
            rx = config_duration(o.rx_interval),
            mult = o.multiplier,
            hold = config_duration(o.revert_hold),
        );
        for line in &o.peer_extra {
            text.push_str(&format!("{line}\n"));
        }
        if !o.sla.is_empty() {
            text.push_str("\n  [peer.sla]\n");
            for line in &o.sla {
                text.push_str(&format!("  {line}\n"));
            }
        }
        for path in LabPath::ALL {
            text.push_str(&format!(
                "\n  [[peer.path]]\n  name = \"{name}\"\n  local = \"{local}:{DATA_PORT}\"\n  \
                 remote = \"{remote}:{DATA_PORT}\"\n  priority = {prio}\n",
                name = path.name(),
                local = path.addr(gw),
                remote = path.addr(other),
                prio = path.priority(),
            ));
            if o.bind_interfaces {
                text.push_str(&format!("  interface = \"{}\"\n", path.name()));
            }
            for (_, line) in o.path_extra.iter().filter(|(p, _)| *p == path) {
                text.push_str(&format!("  {line}\n"));
            }
        }
        text
    }

    /// Where the lab's key file is (when [`LabOptions::key`] is set).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("peer.key")
    }

    /// A gateway's private key file (when [`LabOptions::key_pairs`] is set).
    pub fn private_key_path(&self, gw: Gw) -> PathBuf {
        self.dir.join(format!("{gw}.private"))
    }

    /// A gateway's private key: a hash of the lab's folder and the
    /// gateway, so each lab has its own and both configs agree.
    pub fn private_key(&self, gw: Gw) -> crate::core::keypair::PrivateKey {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"crosslink lab private key");
        ctx.update(self.dir.to_string_lossy().as_bytes());
        ctx.update(gw.to_string().as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(ctx.finish().as_ref());
        crate::core::keypair::PrivateKey::from_bytes(bytes)
    }

    pub(super) fn write_configs(&self) -> Result<()> {
        if self.opts.key_pairs {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            for gw in Gw::ALL {
                let path = self.private_key_path(gw);
                let _ = fs::remove_file(&path);
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .and_then(|mut f| writeln!(f, "{}", self.private_key(gw).to_base64()))
                    .map_err(io_err(format!("writing {}", path.display())))?;
            }
        }
        if let Some(key) = &self.opts.key {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let path = self.key_path();
            let _ = fs::remove_file(&path);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(key.as_bytes()))
                .map_err(io_err(format!("writing {}", path.display())))?;
        }
        for gw in Gw::ALL {
            let path = self.config_path(gw);
            fs::write(&path, self.config_text(gw))
                .map_err(io_err(format!("writing {}", path.display())))?;
        }
        Ok(())
    }
}

impl fmt::Display for Gw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for LabPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
