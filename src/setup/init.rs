//! `crosslink init`: both gateways' configurations from what the operator
//! knows (the two gateways' names, the prefixes behind each, each path's
//! underlay addresses), written so that they mirror each other exactly:
//! each path's `local` and `remote` swapped, the same BFD timers, the same
//! key, each side routing the other's prefixes into its TUN.
//!
//! [`render`] makes the text (no I/O: tested on its own); [`main`] asks
//! for what is missing on a terminal, makes the key, writes the files and
//! checks them with the parser and [`crate::config::mirror::compare`] before
//! saying they are ready.

use crate::config::{self, mirror, Config, Policy, Prefix};
use crate::core::keypair::PublicKey;
use std::fmt::Write as _;
use std::io::{BufRead, IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// The data port a path gets when its address has none.
pub const DEFAULT_PORT: u16 = 4800;

/// How the two ends authenticate and seal their traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyMode {
    /// A new 32-byte pre-shared key, the same file at both ends.
    Psk,
    /// A key pair per gateway and a handshake: each file names its own
    /// private key file and the far gateway's public key. With
    /// `--far-public-key`, the far gateway keeps the private key it made
    /// with `crosslink genkey` and no secret has to travel.
    Pair,
    /// No key: traffic in the clear (a link that is private end to end
    /// and trusted).
    None,
}

/// `crosslink init`'s flags.
#[derive(Clone, Debug, clap::Args)]
pub struct InitArgs {
    /// This gateway's name.
    #[arg(long)]
    pub name: Option<String>,
    /// The far gateway's name (this gateway's peer).
    #[arg(long)]
    pub peer: Option<String>,
    /// A path, as NAME=LOCAL,REMOTE: its underlay addresses, this
    /// gateway's first (port 4800 unless given, e.g. 192.0.2.1:4801).
    /// Repeat for each path, the preferred first.
    #[arg(long = "path", value_name = "NAME=LOCAL,REMOTE")]
    pub paths: Vec<String>,
    /// A prefix behind this gateway (the far gateway routes it into the
    /// link). Repeat, or separate with commas.
    #[arg(long = "local-prefix", value_name = "PREFIX", value_delimiter = ',')]
    pub local_prefixes: Vec<String>,
    /// A prefix behind the far gateway (routed into the link here).
    #[arg(long = "remote-prefix", value_name = "PREFIX", value_delimiter = ',')]
    pub remote_prefixes: Vec<String>,
    /// BFD transmit and receive interval on every path.
    #[arg(long, default_value = "10ms", value_parser = config::parse_duration)]
    pub bfd_interval: std::time::Duration,
    /// BFD detection multiplier.
    #[arg(long, default_value_t = 3)]
    pub bfd_multiplier: u8,
    /// How the peer's flows use its paths.
    #[arg(long, default_value = "active-backup")]
    pub policy: String,
    /// How traffic is protected.
    #[arg(long, value_enum, default_value = "pair")]
    pub keys: KeyMode,
    /// Where the files are written: this gateway's crosslink.toml and key
    /// file, and a directory PEER/ with the far gateway's.
    #[arg(long, default_value = "/etc/crosslink")]
    pub out: PathBuf,
    /// With `--keys pair`: the far gateway's public key (`crosslink genkey |
    /// tee private.key | crosslink pubkey` there); without it, `init` makes
    /// the far gateway's key pair too.
    #[arg(long, value_name = "BASE64")]
    pub far_public_key: Option<String>,
    /// Where the configurations say the key file is, on each gateway.
    #[arg(long, default_value = "/etc/crosslink")]
    pub install_dir: PathBuf,
    /// This gateway's control socket (default: the daemon's).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// The far gateway's control socket (default: the daemon's).
    #[arg(long)]
    pub far_control_socket: Option<PathBuf>,
    /// Replace files that exist.
    #[arg(long)]
    pub force: bool,
}

/// One path, from this gateway's side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathSpec {
    pub name: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// What both files are made from.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub peer: String,
    pub paths: Vec<PathSpec>,
    pub local_prefixes: Vec<Prefix>,
    pub remote_prefixes: Vec<Prefix>,
    pub bfd_interval: std::time::Duration,
    pub bfd_multiplier: u8,
    pub policy: Policy,
    /// The pre-shared key file's path on each gateway, when sealed with one.
    pub key_file: Option<PathBuf>,
    /// Key pairs: each gateway's private key file (this one's, the far
    /// one's) and public key (this one's, the far one's).
    pub pairs: Option<Pairs>,
    pub control_socket: Option<PathBuf>,
    pub far_control_socket: Option<PathBuf>,
}

/// Both gateways' key files and public keys.
#[derive(Clone, Debug)]
pub struct Pairs {
    pub private_key_file: (PathBuf, PathBuf),
    pub public_key: (PublicKey, PublicKey),
}

/// Parses `NAME=LOCAL,REMOTE`.
pub fn parse_path(text: &str) -> Result<PathSpec, String> {
    let (name, addrs) = text
        .split_once('=')
        .ok_or_else(|| format!("path {text:?}: expected NAME=LOCAL,REMOTE"))?;
    let (local, remote) = addrs
        .split_once(',')
        .ok_or_else(|| format!("path {text:?}: expected NAME=LOCAL,REMOTE"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("path {text:?}: the name is empty"));
    }
    Ok(PathSpec {
        name: name.to_string(),
        local: parse_addr(local.trim())?,
        remote: parse_addr(remote.trim())?,
    })
}

/// An underlay address, with or without port (IPv6 with a port in brackets).
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| format!("{text:?} is not an IP address (with or without :port)"))
}

/// The TUN a peer named `peer` gets: `xl-` and the name, cut to the
/// kernel's 15 characters, anything but letters, digits, `-` and `_`
/// made `-`.
pub fn tun_name(peer: &str) -> String {
    let clean: String = peer
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("xl-{clean}").chars().take(15).collect()
}

fn quoted_list(items: &[Prefix]) -> String {
    let inner: Vec<String> = items.iter().map(|p| format!("\"{p}\"")).collect();
    format!("[{}]", inner.join(", "))
}

/// The configuration of one end: `mirror` false for this gateway, true
/// for the far one (names, prefixes and addresses swapped).
pub fn render(spec: &Spec, mirror: bool) -> String {
    let (me, them) = match mirror {
        false => (&spec.name, &spec.peer),
        true => (&spec.peer, &spec.name),
    };
    let (ours, theirs) = match mirror {
        false => (&spec.local_prefixes, &spec.remote_prefixes),
        true => (&spec.remote_prefixes, &spec.local_prefixes),
    };
    let socket = match mirror {
        false => &spec.control_socket,
        true => &spec.far_control_socket,
    };
    let interval = config::format_duration(spec.bfd_interval);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# crosslink: gateway {me}, linked to {them}.\n\
         # Made by `crosslink init` together with the far gateway's file; the two\n\
         # mirror each other (check with `crosslink check -c THIS --against FAR`).\n\
         # Before going live: `crosslink check --reach -c THIS` (see the README)."
    );
    let _ = writeln!(t, "\n[gateway]\nname = \"{me}\"");
    if let Some(s) = socket {
        let _ = writeln!(t, "control_socket = \"{}\"", s.display());
    }
    if let Some(p) = &spec.pairs {
        let file = if mirror {
            &p.private_key_file.1
        } else {
            &p.private_key_file.0
        };
        let _ = writeln!(
            t,
            "# This gateway's private key (`crosslink genkey`): readable by root only.\n\
             private_key_file = \"{}\"",
            file.display()
        );
    }
    let _ = writeln!(
        t,
        "\n# BFD on every path: a dead path is left after about interval x multiplier.\n\
         [bfd]\ntx_interval = \"{interval}\"\nrx_interval = \"{interval}\"\nmultiplier = {}",
        spec.bfd_multiplier
    );
    let _ = writeln!(
        t,
        "\n[[peer]]\nname = \"{them}\"\ntun = \"{}\"",
        tun_name(them)
    );
    let _ = writeln!(
        t,
        "# Prefixes behind {them}, routed into the TUN here.\nroutes = {}",
        quoted_list(theirs)
    );
    if !ours.is_empty() {
        let _ = writeln!(
            t,
            "# Behind this gateway (routed into the link by {them}): {}",
            quoted_list(ours)
        );
    }
    let _ = writeln!(t, "policy = \"{}\"", spec.policy.as_str());
    if let Some(p) = &spec.pairs {
        let far = if mirror {
            &p.public_key.0
        } else {
            &p.public_key.1
        };
        let _ = writeln!(
            t,
            "# {them}'s public key: the handshake proves it holds the private one.\n\
             public_key = \"{far}\""
        );
    }
    if let Some(k) = &spec.key_file {
        let _ = writeln!(
            t,
            "# The same 32-byte key at both ends: readable by root only.\nkey_file = \"{}\"",
            k.display()
        );
    }
    for p in &spec.paths {
        let (local, remote) = match mirror {
            false => (p.local, p.remote),
            true => (p.remote, p.local),
        };
        let _ = writeln!(
            t,
            "\n  [[peer.path]]\n  name = \"{}\"\n  local = \"{local}\"\n  remote = \"{remote}\"",
            p.name
        );
    }
    t
}

/// Builds the spec from the flags, asking on a terminal for what is missing.
fn spec_from(args: &InitArgs) -> Result<Spec, String> {
    let interactive = std::io::stdin().is_terminal();
    let ask = |what: &str| -> Result<String, String> {
        if !interactive {
            return Err(format!(
                "{what} is missing (give it as a flag; see `crosslink init --help`)"
            ));
        }
        eprint!("{what}: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    };
    let name = match &args.name {
        Some(n) => n.clone(),
        None => ask("This gateway's name (--name)")?,
    };
    let peer = match &args.peer {
        Some(n) => n.clone(),
        None => ask("The far gateway's name (--peer)")?,
    };
    if name.is_empty() || peer.is_empty() || name == peer {
        return Err("--name and --peer must be two different, non-empty names".into());
    }
    let mut paths = args
        .paths
        .iter()
        .map(|p| parse_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    if paths.is_empty() {
        if !interactive {
            return Err("no --path given: at least one NAME=LOCAL,REMOTE".into());
        }
        loop {
            let line =
                ask("A path as NAME=LOCAL,REMOTE, this gateway's address first (empty: done)")?;
            if line.is_empty() {
                break;
            }
            match parse_path(&line) {
                Ok(p) => paths.push(p),
                Err(e) => eprintln!("{e}"),
            }
        }
        if paths.is_empty() {
            return Err("at least one path is needed".into());
        }
    }
    let prefixes = |items: &[String], what: &str| -> Result<Vec<Prefix>, String> {
        let mut list: Vec<String> = items.to_vec();
        if list.is_empty() && interactive {
            list = ask(what)?
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        list.iter()
            .map(|s| {
                s.parse::<Prefix>()
                    .map_err(|e| format!("prefix {s:?}: {e}"))
            })
            .collect()
    };
    let local_prefixes = prefixes(
        &args.local_prefixes,
        "Prefixes behind this gateway, comma-separated (--local-prefix)",
    )?;
    let remote_prefixes = prefixes(
        &args.remote_prefixes,
        "Prefixes behind the far gateway, comma-separated (--remote-prefix)",
    )?;
    let policy = match args.policy.as_str() {
        "active-backup" => Policy::ActiveBackup,
        "balance" => Policy::Balance,
        "duplicate" => Policy::Duplicate,
        "aggregate" => Policy::Aggregate,
        other => {
            return Err(format!(
                "policy {other:?}: expected active-backup, balance, duplicate or aggregate"
            ))
        }
    };
    let key_file = match args.keys {
        KeyMode::Psk => Some(args.install_dir.join(key_file_name(&name, &peer))),
        KeyMode::None | KeyMode::Pair => None,
    };
    if args.far_public_key.is_some() && args.keys != KeyMode::Pair {
        return Err("--far-public-key goes with --keys pair".into());
    }
    Ok(Spec {
        name,
        peer,
        paths,
        local_prefixes,
        remote_prefixes,
        bfd_interval: args.bfd_interval,
        bfd_multiplier: args.bfd_multiplier,
        policy,
        key_file,
        pairs: None,
        control_socket: args.control_socket.clone(),
        far_control_socket: args.far_control_socket.clone(),
    })
}

/// The key file's name: the two gateways' names in order, so both ends
/// call it the same.
pub fn key_file_name(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("{x}--{y}.key")
}

/// A gateway's private key file's name.
pub fn private_name(gateway: &str) -> String {
    format!("{gateway}.private")
}

/// A new pre-shared key, as the key file holds it (64 hex digits).
fn new_key() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    ring::rand::SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
}

fn write_new(path: &Path, text: &str, mode: u32, force: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    opts.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                format!("{} exists (--force replaces it)", path.display())
            }
            _ => format!("{}: {e}", path.display()),
        })
}

/// This gateway's configuration file's name: what the service runs.
pub const CONFIG_NAME: &str = "crosslink.toml";

/// Runs `crosslink init`: writes this gateway's files into `--out` and the
/// far gateway's into `--out/PEER/`, laid out as they go on each gateway
/// (`crosslink.toml` and the key files beside it), and says what to do
/// next. Nothing is written unless both files parse and mirror each other.
pub fn main(args: &InitArgs) -> Result<String, String> {
    let mut spec = spec_from(args)?;
    let here = args.out.clone();
    let there = args.out.join(&spec.peer);
    // Key files to write: (directory, name, content).
    let mut secrets: Vec<(PathBuf, String, zeroize::Zeroizing<String>)> = Vec::new();
    match args.keys {
        KeyMode::Pair => {
            let ours = crate::io::keys::generate_private()?;
            let far_public = match &args.far_public_key {
                Some(text) => {
                    PublicKey::parse(text).map_err(|e| format!("--far-public-key: {e}"))?
                }
                None => {
                    let far = crate::io::keys::generate_private()?;
                    let text = zeroize::Zeroizing::new(far.to_base64() + "\n");
                    secrets.push((there.clone(), private_name(&spec.peer), text));
                    far.public()
                }
            };
            spec.pairs = Some(Pairs {
                private_key_file: (
                    args.install_dir.join(private_name(&spec.name)),
                    args.install_dir.join(private_name(&spec.peer)),
                ),
                public_key: (ours.public(), far_public),
            });
            let text = zeroize::Zeroizing::new(ours.to_base64() + "\n");
            secrets.insert(0, (here.clone(), private_name(&spec.name), text));
        }
        KeyMode::Psk => {
            let name = key_file_name(&spec.name, &spec.peer);
            let key = zeroize::Zeroizing::new(new_key()?);
            secrets.push((here.clone(), name.clone(), key.clone()));
            secrets.push((there.clone(), name, key));
        }
        KeyMode::None => {}
    }
    let ours = render(&spec, false);
    let far = render(&spec, true);
    let a = Config::parse(&ours, &format!("{}.toml", spec.name)).map_err(|e| e.to_string())?;
    let b = Config::parse(&far, &format!("{}.toml", spec.peer)).map_err(|e| e.to_string())?;
    let mismatches = mirror::compare(&a, &b);
    if !mismatches.is_empty() {
        return Err(format!(
            "the two files would not mirror each other: {}",
            mismatches.join("; ")
        ));
    }
    for dir in [&here, &there] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let ours_path = here.join(CONFIG_NAME);
    let far_path = there.join(CONFIG_NAME);
    write_new(&ours_path, &ours, 0o644, args.force)?;
    write_new(&far_path, &far, 0o644, args.force)?;
    for (dir, name, text) in &secrets {
        write_new(&dir.join(name), text, 0o600, args.force)?;
    }
    let listing = |dir: &Path| -> String {
        let mut names = vec![CONFIG_NAME.to_string()];
        names.extend(
            secrets
                .iter()
                .filter(|(d, _, _)| d == dir)
                .map(|(_, n, _)| n.clone()),
        );
        format!("{}/{{{}}}", dir.display(), names.join(","))
    };
    let mut report = format!(
        "wrote {} for this gateway ({})\nwrote {} for {}\n",
        listing(&here),
        spec.name,
        listing(&there),
        spec.peer
    );
    if args.far_public_key.is_some() {
        let _ = writeln!(
            report,
            "{}'s file names {} for its private key: the one made there with `crosslink genkey`",
            spec.peer,
            args.install_dir.join(private_name(&spec.peer)).display()
        );
    }
    let config = args.install_dir.join(CONFIG_NAME);
    let _ = writeln!(
        report,
        "next, here{}: `crosslink check --reach -c {c}`, then `systemctl start crosslink` \
         (or `crosslink run -c {c}`)\n\
         on {}: copy {}/ into {} over a secure channel{}, then the same two commands",
        if here == args.install_dir {
            String::new()
        } else {
            format!(
                " (after copying {} into {})",
                here.display(),
                args.install_dir.display()
            )
        },
        spec.peer,
        there.display(),
        args.install_dir.display(),
        if secrets.iter().any(|(d, _, _)| *d == there) {
            " (it holds a secret key; remove it here afterwards)"
        } else {
            ""
        },
        c = config.display(),
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            name: "aws-gw".into(),
            peer: "gcp-gw".into(),
            paths: vec![
                parse_path("dx=192.0.2.1,192.0.2.2").unwrap(),
                parse_path("vpn=198.51.100.1:4801,203.0.113.1:4802").unwrap(),
            ],
            local_prefixes: vec!["10.0.0.0/16".parse().unwrap()],
            remote_prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            bfd_interval: std::time::Duration::from_millis(20),
            bfd_multiplier: 3,
            policy: Policy::ActiveBackup,
            key_file: Some("/etc/crosslink/aws-gw--gcp-gw.key".into()),
            pairs: None,
            control_socket: None,
            far_control_socket: None,
        }
    }

    #[test]
    fn both_files_parse_and_mirror_each_other() {
        let s = spec();
        let a = Config::parse(&render(&s, false), "a.toml").unwrap();
        let b = Config::parse(&render(&s, true), "b.toml").unwrap();
        assert_eq!(mirror::compare(&a, &b), Vec::<String>::new());
        assert_eq!(a.gateway.name, "aws-gw");
        assert_eq!(b.gateway.name, "gcp-gw");
        let (pa, pb) = (&a.peers[0], &b.peers[0]);
        assert_eq!(pa.name, "gcp-gw");
        assert_eq!(pb.name, "aws-gw");
        assert_eq!(pa.routes, s.remote_prefixes);
        assert_eq!(pb.routes, s.local_prefixes);
        assert_eq!(pa.paths[1].local, "198.51.100.1:4801".parse().unwrap());
        assert_eq!(pb.paths[1].remote, "198.51.100.1:4801".parse().unwrap());
        assert_eq!(pa.paths[0].local.port(), DEFAULT_PORT);
        assert_eq!(pa.key_file, pb.key_file);
        assert_eq!(pa.paths[0].bfd.tx_interval, s.bfd_interval);
    }

    #[test]
    fn a_changed_file_is_reported_key_by_key() {
        let s = spec();
        let a = Config::parse(&render(&s, false), "a.toml").unwrap();
        let far = render(&s, true)
            .replace("multiplier = 3", "multiplier = 5")
            .replace(
                "local = \"203.0.113.1:4802\"",
                "local = \"203.0.113.9:4802\"",
            );
        let b = Config::parse(&far, "b.toml").unwrap();
        let m = mirror::compare(&a, &b);
        assert!(
            m.iter()
                .any(|l| l.contains("bfd.multiplier") && l.contains("3 vs 5")),
            "{m:?}"
        );
        assert!(
            m.iter()
                .any(|l| l.contains("path.vpn") && l.contains("no path")),
            "{m:?}"
        );
        let clear = Config::parse(
            &render(
                &Spec {
                    key_file: None,
                    ..s
                },
                true,
            ),
            "c.toml",
        )
        .unwrap();
        let m = mirror::compare(&a, &clear);
        assert!(
            m.iter()
                .any(|l| l.contains("key_file") && l.contains("one side only")),
            "{m:?}"
        );
    }

    use crate::core::keypair::PrivateKey;

    #[test]
    fn key_pair_files_name_their_own_private_key_and_the_far_public_key() {
        let a_key = PrivateKey::from_bytes([1; 32]);
        let b_key = PrivateKey::from_bytes([2; 32]);
        let s = Spec {
            key_file: None,
            pairs: Some(Pairs {
                private_key_file: ("/k/aws-gw.private".into(), "/k/gcp-gw.private".into()),
                public_key: (a_key.public(), b_key.public()),
            }),
            ..spec()
        };
        let a = Config::parse(&render(&s, false), "a.toml").unwrap();
        let b = Config::parse(&render(&s, true), "b.toml").unwrap();
        assert_eq!(a.gateway.private_key_file, Some("/k/aws-gw.private".into()));
        assert_eq!(b.gateway.private_key_file, Some("/k/gcp-gw.private".into()));
        assert_eq!(a.peers[0].public_key, Some(b_key.public()));
        assert_eq!(b.peers[0].public_key, Some(a_key.public()));
        assert_eq!(a.peers[0].key_file, None);
        assert_eq!(mirror::compare(&a, &b), Vec::<String>::new());
        // A file whose public key is not the far gateway's.
        let wrong = render(&s, true).replace(
            &a_key.public().to_string(),
            &PrivateKey::from_bytes([3; 32]).public().to_string(),
        );
        let c = Config::parse(&wrong, "c.toml").unwrap();
        let m = mirror::compare_with_keys(&a, &c, Some(&a_key), None);
        assert!(m.iter().any(|l| l.contains("public_key")), "{m:?}");
    }

    #[test]
    fn paths_and_tun_names_are_read_strictly() {
        assert!(parse_path("x=1.2.3.4").is_err());
        assert!(parse_path("=1.2.3.4,5.6.7.8").is_err());
        assert!(parse_path("x=1.2.3,5.6.7.8").is_err());
        let v6 = parse_path("v6=[2001:db8::1]:4900,2001:db8::2").unwrap();
        assert_eq!(v6.local.port(), 4900);
        assert_eq!(v6.remote.port(), DEFAULT_PORT);
        assert_eq!(tun_name("a very long gateway name"), "xl-a-very-long-");
        assert_eq!(key_file_name("b", "a"), key_file_name("a", "b"));
    }
}
