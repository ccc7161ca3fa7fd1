//! The configuration's tests: every rule, default and error message, with the
//! file line and key each error names.

use super::*;

/// Two peers, three paths; line numbers matter to the tests below.
const BASE: &str = r#"[gateway]
name = "gw"

[[peer]]
name = "gcp"
tun = "xl-gcp"

  [[peer.path]]
  name = "cci-1"
  local = "192.0.2.1:4800"
  remote = "192.0.2.2:4800"

  [[peer.path]]
  name = "cci-2"
  local = "198.51.100.1:4800"
  remote = "198.51.100.2:4800"

[[peer]]
name = "aws"
tun = "xl-aws"

  [[peer.path]]
  name = "dx-1"
  local = "203.0.113.1:4800"
  remote = "203.0.113.2:4800"
"#;

fn ok(text: &str) -> Config {
    match Config::parse(text, "t.toml") {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got {e}\n{text}"),
    }
}

fn err(text: &str) -> ConfigError {
    match Config::parse(text, "t.toml") {
        Ok(c) => panic!("expected an error, got {c:#?}\n{text}"),
        Err(e) => e,
    }
}

/// Replaces the first occurrence of `from` in BASE, which must exist.
fn base_with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "BASE has no {from:?}");
    BASE.replacen(from, to, 1)
}

fn assert_err(text: &str, line: usize, key: &str, needle: &str) -> ConfigError {
    let e = err(text);
    assert_eq!(e.file, "t.toml", "{e}");
    assert_eq!(e.line, Some(line), "{e}");
    assert_eq!(e.key, key, "{e}");
    assert!(
        e.message.contains(needle),
        "message {:?} lacks {needle:?}",
        e.message
    );
    e
}

fn only_path(c: &Config) -> &PathConfig {
    match c.peers.first().and_then(|p| p.paths.first()) {
        Some(p) => p,
        None => panic!("no path"),
    }
}

// --- defaults and merging ------------------------------------------------------

#[test]
fn defaults_are_applied() {
    let c = ok(BASE);
    assert_eq!(c.gateway.name, "gw");
    assert_eq!(
        c.gateway.control_socket,
        PathBuf::from("/run/crosslink/crosslink.sock")
    );
    assert_eq!(c.metrics, None);
    assert_eq!(c.bfd, BfdConfig::default());
    assert_eq!(c.bfd.tx_interval, Duration::from_millis(10));
    assert_eq!(c.bfd.rx_interval, Duration::from_millis(10));
    assert_eq!(c.bfd.multiplier, 3);
    assert_eq!(c.bfd.hop, Hop::Single);
    assert!(!c.bfd.passive);
    assert_eq!(c.bfd.min_ttl, 254);
    assert_eq!(c.bfd.auth, None);
    assert_eq!(c.peers.len(), 2);
    let gcp = &c.peers[0];
    assert_eq!(gcp.policy, Policy::ActiveBackup);
    assert_eq!(gcp.revert_hold, Duration::from_secs(2));
    assert_eq!(gcp.key_file, None);
    assert_eq!(gcp.mtu, None);
    assert!(gcp.routes.is_empty() && gcp.tun_addresses.is_empty());
    let prio: Vec<u32> = gcp.paths.iter().map(|p| p.priority).collect();
    assert_eq!(prio, [1, 2]);
    assert!(gcp
        .paths
        .iter()
        .all(|p| p.weight == 1 && p.interface.is_none()));
    assert!(gcp.paths.iter().all(|p| p.bfd == c.bfd));
    assert_eq!(
        c.peers[1].paths[0].priority, 1,
        "priority counts within the peer"
    );
}

#[test]
fn all_keys_are_read() {
    let text = r#"
[gateway]
name = "onprem-1"
control_socket = "/tmp/x.sock"
[metrics]
listen = "[::1]:9000"
[bfd]
tx_interval = "20ms"
rx_interval = "30ms"
multiplier = 4
hop = "multi"
passive = true
min_ttl = 250
auth = { type = "keyed-md5", key_id = 7, secret_file = "/etc/crosslink/bfd.key" }
[[peer]]
name = "p"
tun = "xl-p"
tun_addresses = ["169.254.77.1/30", "fd00::1/64"]
routes = ["10.20.0.0/16", "fd00:20::/48"]
policy = "duplicate"
revert_hold = "1m"
key_file = "/etc/crosslink/p.key"
mtu = 1400
  [[peer.path]]
  name = "x"
  local = "[2001:db8::1]:4800"
  remote = "[2001:db8::2]:4801"
  interface = "eth0.101"
  priority = 10
  weight = 3
"#;
    let c = ok(text);
    assert_eq!(c.gateway.control_socket, PathBuf::from("/tmp/x.sock"));
    assert_eq!(c.metrics.as_ref().map(|m| m.listen.port()), Some(9000));
    let b = &c.bfd;
    assert_eq!(b.tx_interval, Duration::from_millis(20));
    assert_eq!(b.rx_interval, Duration::from_millis(30));
    assert_eq!(
        (b.multiplier, b.hop, b.passive, b.min_ttl),
        (4, Hop::Multi, true, 250)
    );
    let auth = b.auth.as_ref().map(|a| (a.auth_type, a.key_id));
    assert_eq!(auth, Some((BfdAuthType::KeyedMd5, 7)));
    let p = &c.peers[0];
    assert_eq!(p.policy, Policy::Duplicate);
    assert_eq!(p.revert_hold, Duration::from_secs(60));
    assert_eq!(p.mtu, Some(1400));
    assert_eq!(p.key_file, Some(PathBuf::from("/etc/crosslink/p.key")));
    assert_eq!(p.tun_addresses[1].to_string(), "fd00::1/64");
    assert_eq!(p.routes[1].to_string(), "fd00:20::/48");
    let path = only_path(&c);
    assert_eq!(path.interface.as_deref(), Some("eth0.101"));
    assert_eq!((path.priority, path.weight), (10, 3));
    assert_eq!(path.remote.port(), 4801);
    assert_eq!(&path.bfd, b);
}

#[test]
fn path_bfd_overrides_merge_key_by_key() {
    let text = base_with(
        "[gateway]\nname = \"gw\"\n",
        "[gateway]\nname = \"gw\"\n[bfd]\ntx_interval = \"20ms\"\nmultiplier = 5\nauth = { type = \"keyed-sha1\", key_id = 1, secret_file = \"/a\" }\n",
    )
    .replacen(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  rx_interval = \"2ms\"\n  hop = \"multi\"\n  min_ttl = 200\n  auth = { type = \"meticulous-keyed-sha1\", key_id = 9, secret_file = \"/b\" }\n",
        1,
    );
    let c = ok(&text);
    let p0 = &c.peers[0].paths[0];
    assert_eq!(p0.bfd.tx_interval, Duration::from_millis(20), "inherited");
    assert_eq!(p0.bfd.rx_interval, Duration::from_millis(2), "overridden");
    assert_eq!(p0.bfd.multiplier, 5, "inherited");
    assert_eq!(p0.bfd.hop, Hop::Multi);
    assert_eq!(p0.bfd.min_ttl, 200);
    let auth = p0
        .bfd
        .auth
        .as_ref()
        .map(|a| (a.auth_type, a.key_id, a.secret_file.clone()));
    assert_eq!(
        auth,
        Some((BfdAuthType::MeticulousKeyedSha1, 9, PathBuf::from("/b")))
    );
    let p1 = &c.peers[0].paths[1];
    assert_eq!(
        p1.bfd, c.bfd,
        "paths without overrides get the gateway defaults"
    );
    assert_eq!(c.bfd.rx_interval, Duration::from_millis(10));
    assert_eq!(c.bfd.hop, Hop::Single);
}

#[test]
fn enum_strings() {
    for (s, want) in [
        ("simple-password", BfdAuthType::SimplePassword),
        ("keyed-md5", BfdAuthType::KeyedMd5),
        ("meticulous-keyed-md5", BfdAuthType::MeticulousKeyedMd5),
        ("keyed-sha1", BfdAuthType::KeyedSha1),
        ("meticulous-keyed-sha1", BfdAuthType::MeticulousKeyedSha1),
    ] {
        let text = base_with(
            "name = \"gw\"\n",
            &format!("name = \"gw\"\n[bfd]\nauth = {{ type = \"{s}\", key_id = 1, secret_file = \"/k\" }}\n"),
        );
        let c = ok(&text);
        assert_eq!(c.bfd.auth.map(|a| a.auth_type), Some(want));
        assert_eq!(want.as_str(), s);
    }
    for (s, want) in [
        ("active-backup", Policy::ActiveBackup),
        ("balance", Policy::Balance),
        ("duplicate", Policy::Duplicate),
    ] {
        let c = ok(&base_with(
            "tun = \"xl-gcp\"\n",
            &format!("tun = \"xl-gcp\"\npolicy = \"{s}\"\n"),
        ));
        assert_eq!(c.peers[0].policy, want);
        assert_eq!(want.as_str(), s);
    }
    assert_eq!(Hop::Single.as_str(), "single");
    assert_eq!(Hop::Multi.udp_port(), 4784);
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\npolicy = \"round-robin\"\n",
    );
    let e = assert_err(&text, 7, "peer.gcp.policy", "unknown variant `round-robin`");
    assert!(
        e.message.contains("active-backup"),
        "lists the choices: {e}"
    );
}

// --- durations ----------------------------------------------------------------

#[test]
fn duration_table() {
    let good = [
        ("500us", Duration::from_micros(500)),
        ("1µs", Duration::from_micros(1)),
        ("10ms", Duration::from_millis(10)),
        ("0ms", Duration::ZERO),
        ("2s", Duration::from_secs(2)),
        ("1m", Duration::from_secs(60)),
        ("1h", Duration::from_secs(3600)),
        ("007ms", Duration::from_millis(7)),
    ];
    for (s, want) in good {
        assert_eq!(parse_duration(s), Ok(want), "{s}");
    }
    let bad = [
        ("10", "missing unit"),
        ("", "whole number with a unit"),
        ("ms", "whole number with a unit"),
        ("10 ms", "unknown unit \" ms\""),
        ("10sec", "unknown unit \"sec\""),
        ("10d", "unknown unit \"d\""),
        ("1.5s", "unknown unit \".5s\""),
        ("-1s", "whole number with a unit"),
        ("99999999999999999999s", "too large"),
        ("18446744073709551615h", "too large"),
    ];
    for (s, needle) in bad {
        match parse_duration(s) {
            Ok(d) => panic!("{s:?} parsed as {d:?}"),
            Err(e) => assert!(e.contains(needle), "{s:?}: {e:?} lacks {needle:?}"),
        }
    }
}

#[test]
fn duration_formatting_round_trips() {
    for s in ["500us", "10ms", "1500ms", "2s", "90s", "1m", "1h", "0s"] {
        let d = parse_duration(s).unwrap_or_default();
        assert_eq!(format_duration(d), s);
    }
    assert_eq!(format_duration(Duration::from_nanos(1500)), "1500ns");
}

#[test]
fn bad_duration_is_reported_at_its_line() {
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\nrevert_hold = \"2 seconds\"\n",
    );
    assert_err(
        &text,
        7,
        "peer.gcp.revert_hold",
        "invalid duration \"2 seconds\"",
    );
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\ntx_interval = 10\n",
    );
    assert_err(&text, 4, "bfd.tx_interval", "needs a unit");
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\nrx_interval = \"10fortnights\"\n",
    );
    assert_err(&text, 4, "bfd.rx_interval", "unknown unit");
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\nrx_interval = 0.5\n",
    );
    assert_err(&text, 4, "bfd.rx_interval", "needs a unit");
}

// --- line numbers for deserialize errors --------------------------------------

#[test]
fn unknown_top_level_key() {
    let text = format!("# top-level keys come before any table\nbogus = 1\n{BASE}");
    let e = assert_err(&text, 2, "bogus", "unknown field `bogus`");
    assert_eq!(e.to_string().split(": ").next(), Some("t.toml:2"));
    // After the last table, a key belongs to that table (TOML rules).
    let text = format!("{BASE}bogus = 1\n");
    assert_err(
        &text,
        26,
        "peer.aws.path.dx-1.bogus",
        "unknown field `bogus`",
    );
    let text = format!("{BASE}\n[extra]\nx = 1\n");
    assert_err(&text, 27, "extra", "unknown field `extra`");
}

#[test]
fn unknown_key_in_path() {
    let text = base_with(
        "  remote = \"198.51.100.2:4800\"\n",
        "  remote = \"198.51.100.2:4800\"\n  prio = 3\n",
    );
    let e = assert_err(
        &text,
        17,
        "peer.gcp.path.cci-2.prio",
        "unknown field `prio`",
    );
    assert_eq!(
        e.to_string(),
        format!("t.toml:17: peer.gcp.path.cci-2.prio: {}", e.message)
    );
}

#[test]
fn unknown_key_in_other_tables() {
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\nnmae = \"x\"\n");
    assert_err(&text, 3, "gateway.nmae", "unknown field `nmae`");
    let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\nroute = []\n");
    assert_err(&text, 7, "peer.gcp.route", "unknown field `route`");
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\ninterval = \"1s\"\n",
    );
    assert_err(&text, 4, "bfd.interval", "unknown field `interval`");
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 1, secret_file = \"/k\", key = \"s\" }\n");
    assert_err(&text, 4, "bfd.auth.key", "unknown field `key`");
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  tx = \"1ms\"\n",
    );
    assert_err(
        &text,
        13,
        "peer.gcp.path.cci-1.bfd.tx",
        "unknown field `tx`",
    );
}

#[test]
fn missing_and_mistyped_keys() {
    let text = base_with("  name = \"cci-2\"\n", "");
    assert_err(&text, 13, "peer.gcp.path[1].name", "missing field `name`");
    let text = base_with("tun = \"xl-gcp\"\n", "");
    assert_err(&text, 4, "peer.gcp.tun", "missing field `tun`");
    let text = BASE.replacen("[gateway]\nname = \"gw\"\n", "", 1);
    let e = err(&text);
    assert_eq!(e.key, "gateway", "{e}");
    assert!(e.line.is_some());
    let text = base_with("name = \"gw\"\n", "name = 7\n");
    assert_err(&text, 2, "gateway.name", "invalid type");
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\nmultiplier = 256\n",
    );
    assert_err(&text, 4, "bfd.multiplier", "expected u8");
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nhop = \"two\"\n");
    assert_err(&text, 4, "bfd.hop", "unknown variant `two`");
}

#[test]
fn syntax_error_names_line() {
    let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\n");
    let e = err(&text);
    assert_eq!(e.line, Some(6), "{e}");
    assert_eq!(e.key, "syntax");
    assert!(!e.message.contains('\n'));
    let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\ntun = \"xl-x\"\n");
    let e = err(&text);
    assert_eq!(e.line, Some(7), "{e}");
    assert_eq!(e.message, "duplicate key `tun`");
}

#[test]
fn bad_remote_address() {
    let text = base_with(
        "  remote = \"198.51.100.2:4800\"\n",
        "  remote = \"198.51.100.2\"\n",
    );
    assert_err(
        &text,
        16,
        "peer.gcp.path.cci-2.remote",
        "invalid socket address \"198.51.100.2\"",
    );
    let text = base_with(
        "  remote = \"198.51.100.2:4800\"\n",
        "  remote = \"gw.example.com:4800\"\n",
    );
    assert_err(&text, 16, "peer.gcp.path.cci-2.remote", "IP:PORT");
    let text = base_with(
        "  local = \"192.0.2.1:4800\"\n",
        "  local = \"192.0.2.300:4800\"\n",
    );
    assert_err(
        &text,
        10,
        "peer.gcp.path.cci-1.local",
        "invalid socket address",
    );
}

#[test]
fn bad_prefix_syntax() {
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\nroutes = [\"10.0.0.0/8\",\n  \"10.1.0.0\"]\n",
    );
    assert_err(&text, 8, "peer.gcp.routes[1]", "expected ADDRESS/LENGTH");
    for p in [
        "10.0.0.0/33",
        "fd00::/129",
        "10.0.0.0/-1",
        "10.0.0.0/",
        "x/8",
        "10.0.0.0/+8",
    ] {
        assert!(p.parse::<Prefix>().is_err(), "{p}");
    }
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\ntun_addresses = [\"169.254.1.1/40\"]\n",
    );
    assert_err(&text, 7, "peer.gcp.tun_addresses[0]", "0..=32");
}

// --- semantic validation: every rule, with its line and key -------------------

#[test]
fn gateway_name_must_not_be_empty() {
    assert_err(
        &base_with("name = \"gw\"", "name = \"\""),
        2,
        "gateway.name",
        "must not be empty",
    );
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\ncontrol_socket = \"\"\n");
    assert_err(&text, 3, "gateway.control_socket", "must not be empty");
}

#[test]
fn at_least_one_peer() {
    let e = err("[gateway]\nname = \"gw\"\n");
    assert_eq!((e.line, e.key.as_str()), (Some(1), "peer"));
    assert!(e.message.contains("at least one [[peer]]"));
}

#[test]
fn at_least_one_path() {
    let text = "[gateway]\nname = \"gw\"\n\n[[peer]]\nname = \"gcp\"\ntun = \"xl-gcp\"\n";
    assert_err(text, 4, "peer.gcp.path", "at least one [[peer.path]]");
}

#[test]
fn peer_and_path_names_must_not_be_empty() {
    assert_err(
        &base_with("name = \"gcp\"", "name = \" \""),
        5,
        "peer[0].name",
        "must not be empty",
    );
    assert_err(
        &base_with("name = \"cci-1\"", "name = \"\""),
        9,
        "peer.gcp.path[0].name",
        "must not be empty",
    );
}

#[test]
fn duplicate_peer_name() {
    let text = base_with("name = \"aws\"", "name = \"gcp\"");
    assert_err(&text, 19, "peer.gcp.name", "duplicate peer name \"gcp\"");
}

#[test]
fn duplicate_tun() {
    let text = base_with("tun = \"xl-aws\"", "tun = \"xl-gcp\"");
    assert_err(&text, 20, "peer.aws.tun", "already used by peer \"gcp\"");
}

#[test]
fn tun_name_rules() {
    for (tun, needle) in [
        ("", "must not be empty"),
        ("xl-0123456789abc", "at most 15"),
        ("xl/gcp", "must not contain"),
        ("xl gcp", "must not contain"),
        ("xl:gcp", "must not contain"),
        ("..", "not a valid interface name"),
    ] {
        let text = base_with("tun = \"xl-gcp\"", &format!("tun = \"{tun}\""));
        assert_err(&text, 6, "peer.gcp.tun", needle);
    }
    ok(&base_with("tun = \"xl-gcp\"", "tun = \"xl-0123456789ab\""));
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  interface = \"vlan 101\"\n",
    );
    assert_err(
        &text,
        12,
        "peer.gcp.path.cci-1.interface",
        "must not contain",
    );
}

#[test]
fn duplicate_path_name() {
    let text = base_with("name = \"cci-2\"", "name = \"cci-1\"");
    assert_err(
        &text,
        14,
        "peer.gcp.path.cci-1.name",
        "duplicate path name \"cci-1\"",
    );
    // The same path name under another peer is fine.
    ok(&base_with("name = \"dx-1\"", "name = \"cci-1\""));
}

#[test]
fn mixed_address_families() {
    let text = base_with(
        "  remote = \"198.51.100.2:4800\"",
        "  remote = \"[2001:db8::2]:4800\"",
    );
    assert_err(
        &text,
        16,
        "peer.gcp.path.cci-2.remote",
        "not the same address family",
    );
}

#[test]
fn ports_and_unspecified_remote() {
    let text = base_with("  local = \"192.0.2.1:4800\"", "  local = \"192.0.2.1:0\"");
    assert_err(&text, 10, "peer.gcp.path.cci-1.local", "port must not be 0");
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"",
        "  remote = \"192.0.2.2:0\"",
    );
    assert_err(
        &text,
        11,
        "peer.gcp.path.cci-1.remote",
        "port must not be 0",
    );
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"",
        "  remote = \"0.0.0.0:4800\"",
    );
    assert_err(
        &text,
        11,
        "peer.gcp.path.cci-1.remote",
        "not a usable remote address",
    );
    let text = base_with("  remote = \"192.0.2.2:4800\"", "  remote = \"[::]:4800\"").replacen(
        "  local = \"192.0.2.1:4800\"",
        "  local = \"[2001:db8::1]:4800\"",
        1,
    );
    assert_err(
        &text,
        11,
        "peer.gcp.path.cci-1.remote",
        "not a usable remote address",
    );
}

#[test]
fn local_socket_is_unique_across_peers() {
    let text = base_with(
        "  local = \"203.0.113.1:4800\"",
        "  local = \"192.0.2.1:4800\"",
    );
    assert_err(
        &text,
        24,
        "peer.aws.path.dx-1.local",
        "path \"cci-1\" of peer \"gcp\"",
    );
    // Same IP on another port towards another remote is fine.
    ok(&base_with(
        "  local = \"203.0.113.1:4800\"",
        "  local = \"192.0.2.1:4801\"",
    ));
}

#[test]
fn address_pair_is_unique() {
    let text = base_with(
        "  local = \"203.0.113.1:4800\"",
        "  local = \"192.0.2.1:4801\"",
    )
    .replacen(
        "  remote = \"203.0.113.2:4800\"",
        "  remote = \"192.0.2.2:4801\"",
        1,
    );
    assert_err(
        &text,
        25,
        "peer.aws.path.dx-1.remote",
        "BFD could not tell the two apart",
    );
}

#[test]
fn bfd_interval_range() {
    for (v, good) in [
        ("999us", false),
        ("1ms", true),
        ("60s", true),
        ("61s", false),
        ("1m", true),
        ("0ms", false),
    ] {
        let text = base_with(
            "name = \"gw\"\n",
            &format!("name = \"gw\"\n[bfd]\ntx_interval = \"{v}\"\n"),
        );
        if good {
            ok(&text);
        } else {
            assert_err(&text, 4, "bfd.tx_interval", "between 1ms and 60s");
        }
    }
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  rx_interval = \"500us\"\n",
    );
    assert_err(
        &text,
        13,
        "peer.gcp.path.cci-1.bfd.rx_interval",
        "between 1ms and 60s",
    );
}

#[test]
fn multiplier_and_min_ttl_range() {
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nmultiplier = 0\n");
    assert_err(&text, 4, "bfd.multiplier", "between 1 and 255");
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nmin_ttl = 0\n");
    assert_err(&text, 4, "bfd.min_ttl", "between 1 and 255");
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\nmin_ttl = 255\nmultiplier = 255\n",
    );
    ok(&text);
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  [peer.path.bfd]\n  multiplier = 0\n",
    );
    assert_err(
        &text,
        13,
        "peer.gcp.path.cci-1.bfd.multiplier",
        "between 1 and 255",
    );
}

#[test]
fn revert_hold_limit() {
    ok(&base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\nrevert_hold = \"1h\"\n",
    ));
    ok(&base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\nrevert_hold = \"0s\"\n",
    ));
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\nrevert_hold = \"61m\"\n",
    );
    assert_err(&text, 7, "peer.gcp.revert_hold", "at most 1h");
}

#[test]
fn weight_at_least_one() {
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  weight = 0\n",
    );
    assert_err(&text, 12, "peer.gcp.path.cci-1.weight", "at least 1");
    let text = base_with(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  weight = -1\n",
    );
    assert_err(&text, 12, "peer.gcp.path.cci-1.weight", "u32");
}

#[test]
fn fast_path_only_where_the_kernel_can_carry_it() {
    let with = |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
    let c = ok(&with("fast_path = true\n"));
    assert!(c.peers[0].fast_path);
    assert!(!c.peers[1].fast_path);
    // the fast path sends no parity: FEC is off unless said, and refused
    assert_eq!(c.peers[0].fec.mode, FecMode::Off);
    assert_eq!(c.peers[1].fec.mode, FecMode::Off);
    for fec in ["auto", "10+2"] {
        let e = err(&with(&format!("fast_path = true\nfec = \"{fec}\"\n")));
        assert_eq!(e.key, "peer.gcp.fec", "{e}");
        assert!(e.message.contains("fast path"), "{e}");
    }
    assert_eq!(
        ok(&with("fast_path = true\nfec = \"off\"\n")).peers[0]
            .fec
            .mode,
        FecMode::Off
    );
    assert!(Config::summary(&c).contains("fast_path"));
    assert!(!ok(&with("")).peers[0].fast_path);
    assert_err(
        &with("fast_path = true\nkey_file = \"/k\"\n"),
        7,
        "peer.gcp.fast_path",
        "cleartext",
    );
    assert_err(
        &with("fast_path = true\npolicy = \"aggregate\"\n"),
        7,
        "peer.gcp.fast_path",
        "active-backup\" or \"balance",
    );
    assert!(ok(&with("fast_path = true\npolicy = \"balance\"\n")).peers[0].fast_path);
    // An IPv6 underlay: cci-1 over IPv6, cci-2 still over IPv4 (a peer
    // whose paths mix the families).
    let v6 = with("fast_path = true\n")
        .replace("192.0.2.1:4800", "[2001:db8::1]:4800")
        .replace("192.0.2.2:4800", "[2001:db8::2]:4800");
    let c = ok(&v6);
    assert!(c.peers[0].fast_path);
    assert!(c.peers[0].paths[0].local.is_ipv6());
    assert!(c.peers[0].paths[1].local.is_ipv4());
    let v6_balance = v6.replace(
        "fast_path = true\n",
        "fast_path = true\npolicy = \"balance\"\n",
    );
    assert!(ok(&v6_balance).peers[0].fast_path);
    let any = with("fast_path = true\n").replace("192.0.2.1:4800", "0.0.0.0:4800");
    assert_err(
        &any,
        11,
        "peer.gcp.path.cci-1.local",
        "concrete local address",
    );
    let any6 = v6.replace("[2001:db8::1]:4800", "[::]:4800");
    assert_err(
        &any6,
        11,
        "peer.gcp.path.cci-1.local",
        "concrete local address",
    );
}

#[test]
fn route_metric() {
    let with = |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
    let c = ok(&with("route_metric = 200\n"));
    assert_eq!(c.peers[0].route_metric, Some(200));
    assert!(Config::summary(&c).contains("route_metric 200"));
    let c = ok(&with(""));
    assert_eq!(c.peers[0].route_metric, None);
    assert_err(
        &with("route_metric = -1\n"),
        7,
        "peer.gcp.route_metric",
        "u32",
    );
    assert_err(
        &with("route_metric = \"low\"\n"),
        7,
        "peer.gcp.route_metric",
        "",
    );
}

#[test]
fn mtu_range() {
    let with = |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
    ok(&with("mtu = 576\n"));
    ok(&with("mtu = 65535\n"));
    assert_err(&with("mtu = 575\n"), 7, "peer.gcp.mtu", "at least 576");
    assert_err(&with("mtu = 65536\n"), 7, "peer.gcp.mtu", "u16");
    assert_err(
        &with("routes = [\"fd00::/64\"]\nmtu = 1279\n"),
        8,
        "peer.gcp.mtu",
        "at least 1280 (IPv6",
    );
    assert_err(
        &with("tun_addresses = [\"fd00::1/64\"]\nmtu = 1000\n"),
        8,
        "peer.gcp.mtu",
        "at least 1280",
    );
    ok(&with("routes = [\"fd00::/64\"]\nmtu = 1280\n"));
}

#[test]
fn routes_must_be_networks() {
    let with = |extra: &str| base_with("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\n{extra}"));
    let e = assert_err(
        &with("routes = [\"10.20.0.0/16\", \"10.30.0.1/16\"]\n"),
        7,
        "peer.gcp.routes[1]",
        "host bits",
    );
    assert!(e.message.contains("did you mean 10.30.0.0/16"), "{e}");
    assert_err(
        &with("routes = [\"fd00::1/64\"]\n"),
        7,
        "peer.gcp.routes[0]",
        "did you mean fd00::/64",
    );
    assert_err(
        &with("routes = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n"),
        7,
        "peer.gcp.routes[1]",
        "listed twice",
    );
    // Host bits are fine on interface addresses, and the same route may go via two peers.
    let c = ok(&with(
        "tun_addresses = [\"169.254.77.1/30\"]\nroutes = [\"0.0.0.0/0\", \"10.9.9.9/32\"]\n",
    )
    .replacen(
        "tun = \"xl-aws\"\n",
        "tun = \"xl-aws\"\nroutes = [\"0.0.0.0/0\"]\n",
        1,
    ));
    assert_eq!(c.peers[0].tun_addresses[0].to_string(), "169.254.77.1/30");
}

#[test]
fn metrics_listen() {
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[metrics]\nlisten = \"localhost:9787\"\n",
    );
    assert_err(&text, 4, "metrics.listen", "invalid socket address");
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[metrics]\n");
    assert_err(&text, 3, "metrics.listen", "missing field `listen`");
}

#[test]
fn auth_secret_file_and_key_file_must_not_be_empty() {
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 1, secret_file = \"\" }\n",
    );
    assert_err(&text, 4, "bfd.auth.secret_file", "must not be empty");
    let text = base_with("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\nkey_file = \"\"\n");
    assert_err(&text, 7, "peer.gcp.key_file", "must not be empty");
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\naccept_key_file = \"/k2\"\n",
    );
    assert_err(&text, 7, "peer.gcp.accept_key_file", "needs key_file");
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\nkey_file = \"/k1\"\naccept_key_file = \"/k2\"\n",
    );
    let c = Config::parse(&text, "t.toml").unwrap();
    let gcp = c.peers.iter().find(|p| p.name == "gcp").unwrap();
    assert_eq!(gcp.accept_key_file, Some(PathBuf::from("/k2")));
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 256, secret_file = \"/k\" }\n");
    assert_err(&text, 4, "bfd.auth.key_id", "u8");
}

#[test]
fn check_files_reports_missing_and_accepts_readable() {
    let dir = std::env::temp_dir().join(format!("crosslink-config-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let present = dir.join("bfd.key");
    assert!(std::fs::write(&present, "secret").is_ok());
    let missing = dir.join("missing.key");
    let text = base_with(
        "name = \"gw\"\n",
        &format!(
            "name = \"gw\"\n[bfd]\nauth = {{ type = \"keyed-sha1\", key_id = 1, secret_file = \"{}\" }}\n",
            present.display()
        ),
    )
    .replacen("tun = \"xl-aws\"\n", &format!("tun = \"xl-aws\"\nkey_file = \"{}\"\n", missing.display()), 1)
    .replacen("tun = \"xl-gcp\"\n", &format!("tun = \"xl-gcp\"\nkey_file = \"{}\"\n", dir.display()), 1);
    let errors = ok(&text).check_files();
    let _ = std::fs::remove_dir_all(&dir);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["peer.gcp.key_file", "peer.aws.key_file"],
        "{errors:?}"
    );
    assert!(errors[0].message.contains("not a regular file"));
    assert!(errors[1].message.contains("cannot read"));
    assert_eq!(errors[1].file, missing.display().to_string());
    assert!(ok(BASE).check_files().is_empty());
}

#[test]
fn load_reports_io_errors_without_line() {
    let e = match Config::load(Path::new("/nonexistent/crosslink.toml")) {
        Ok(_) => panic!("loaded a missing file"),
        Err(e) => e,
    };
    assert_eq!(e.line, None);
    assert_eq!(e.key, "io");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/crosslink.toml: io: "),
        "{e}"
    );
}

#[test]
fn error_display_format() {
    let e = ConfigError {
        file: "a.toml".into(),
        line: Some(3),
        key: "peer.gcp.tun".into(),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "a.toml:3: peer.gcp.tun: bad");
    let boxed: Box<dyn std::error::Error> = Box::new(e);
    assert!(!boxed.to_string().is_empty());
}

#[test]
fn odd_names_are_quoted_or_indexed() {
    let text = base_with("name = \"gcp\"", "name = \"g c p\"").replacen(
        "tun = \"xl-gcp\"",
        "tun = \"xl gcp\"",
        1,
    );
    assert_err(&text, 6, "peer[0].tun", "must not contain");
}

#[test]
fn prefix_helpers() {
    let p: Prefix = match "10.1.2.3/8".parse() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert!(!p.is_network());
    assert_eq!(p.network().to_string(), "10.0.0.0/8");
    assert!(p.contains("10.200.0.1".parse().unwrap_or(p.addr)));
    assert!(!p.contains("11.0.0.1".parse().unwrap_or(p.addr)));
    for s in ["0.0.0.0/0", "::/0", "10.0.0.1/32", "2001:db8::1/128"] {
        let p: Result<Prefix, _> = s.parse();
        assert_eq!(
            p.map(|p| (p.is_network(), p.to_string())),
            Ok((true, s.to_string()))
        );
    }
}

#[test]
fn summary_mentions_everything() {
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[metrics]\nlisten = \"127.0.0.1:9787\"\n")
        .replacen("tun = \"xl-gcp\"\n", "tun = \"xl-gcp\"\nroutes = [\"10.20.0.0/16\"]\nrevert_hold = \"3s\"\npolicy = \"balance\"\n", 1);
    let s = ok(&text).summary();
    for needle in [
        "gateway gw",
        "127.0.0.1:9787",
        "bfd defaults: tx 10ms rx 10ms x3, single hop",
        "peer gcp: tun xl-gcp",
        "policy balance",
        "revert_hold 3s",
        "routes: 10.20.0.0/16",
        "path cci-1: 192.0.2.1:4800 -> 192.0.2.2:4800, priority 1, weight 1, bfd tx 10ms rx 10ms x3, single hop",
        "path dx-1:",
    ] {
        assert!(s.contains(needle), "summary lacks {needle:?}:\n{s}");
    }
    assert!(s.lines().count() < 25);
}

#[test]
fn truncated_or_mangled_input_never_panics() {
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\nauth = { type = \"keyed-md5\", key_id = 1, secret_file = \"/k\" }\n",
    );
    for (i, _) in text.char_indices() {
        let mangled = format!("{}\"]{}", &text[..i], &text[i..]);
        for t in [&text[..i], mangled.as_str()] {
            if let Err(e) = Config::parse(t, "t.toml") {
                assert!(e.line.is_some() && !e.key.is_empty(), "{e}");
            }
        }
    }
}

// --- path quality: [peer.sla] and [peer.path.sla] --------------------------------

#[test]
fn sla_defaults_and_per_path_overrides() {
    let c = ok(BASE);
    assert!(c.peers[0]
        .paths
        .iter()
        .all(|p| p.sla == SlaConfig::default()));
    let d = SlaConfig::default();
    assert_eq!(d.max_loss_ppm, 10_000, "1 %");
    assert_eq!((d.max_rtt, d.max_jitter), (None, None));
    assert_eq!(d.hold, Duration::from_secs(10));
    assert_eq!(d.probe_interval, Duration::from_millis(10));
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\n\n[peer.sla]\nmax_loss = \"0.5%\"\nmax_rtt = \"50ms\"\nhold = \"30s\"\nmax_moves_per_minute = 2\n",
    )
    .replacen(
        "  name = \"cci-1\"\n",
        "  name = \"cci-1\"\n  sla = { max_rtt = \"off\", max_jitter = \"5ms\", max_loss = \"2%\" }\n",
        1,
    );
    let c = ok(&text);
    let gcp = &c.peers[0];
    assert_eq!(gcp.sla.max_loss_ppm, 5_000);
    assert_eq!(gcp.sla.max_moves_per_minute, 2);
    let (one, two) = (&gcp.paths[0].sla, &gcp.paths[1].sla);
    assert_eq!(one.max_loss_ppm, 20_000);
    assert_eq!(one.max_rtt, None, "\"off\" lifts the peer's limit");
    assert_eq!(one.max_jitter, Some(Duration::from_millis(5)));
    assert_eq!(one.hold, Duration::from_secs(30), "the rest from the peer");
    assert_eq!(two.max_rtt, Some(Duration::from_millis(50)));
    assert_eq!(two.max_loss_ppm, 5_000);
    assert_eq!(c.peers[1].paths[0].sla, SlaConfig::default(), "per peer");
    assert_eq!(d.idle_probe_interval, None, "idle peers probed as often");
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\n\n[peer.sla]\nidle_probe_interval = \"500ms\"\n",
    )
    .replacen(
        "  name = \"cci-1\"\n",
        "  name = \"cci-1\"\n  sla = { idle_probe_interval = \"off\" }\n",
        1,
    );
    let c = ok(&text);
    let (one, two) = (&c.peers[0].paths[0].sla, &c.peers[0].paths[1].sla);
    assert_eq!(one.idle_probe_interval, None, "\"off\" at the path");
    assert_eq!(two.idle_probe_interval, Some(Duration::from_millis(500)));
}

#[test]
fn sla_errors_name_the_key() {
    let peer_sla = |line: &str| {
        base_with(
            "tun = \"xl-gcp\"\n",
            &format!("tun = \"xl-gcp\"\n\n[peer.sla]\n{line}\n"),
        )
    };
    assert_err(
        &peer_sla("max_loss = \"1\""),
        9,
        "peer.gcp.sla.max_loss",
        "percentage",
    );
    assert_err(
        &peer_sla("max_loss = \"120%\""),
        9,
        "peer.gcp.sla.max_loss",
        "percentage",
    );
    assert_err(
        &peer_sla("max_loss = \"0%\""),
        9,
        "peer.gcp.sla.max_loss",
        "more than 0%",
    );
    assert_err(
        &peer_sla("max_rtt = \"0ms\""),
        9,
        "peer.gcp.sla.max_rtt",
        "more than 0",
    );
    assert_err(
        &peer_sla("max_rtt = \"soon\""),
        9,
        "peer.gcp.sla.max_rtt",
        "\"off\"",
    );
    assert_err(
        &peer_sla("probe_interval = \"1m\""),
        9,
        "peer.gcp.sla.probe_interval",
        "between 1ms and 10s",
    );
    assert_err(
        &peer_sla("idle_probe_interval = \"5ms\""),
        9,
        "peer.gcp.sla.idle_probe_interval",
        "shorter than probe_interval (10ms)",
    );
    assert_err(
        &peer_sla("idle_probe_interval = \"1m\""),
        9,
        "peer.gcp.sla.idle_probe_interval",
        "at most 10s",
    );
    assert_err(
        &peer_sla("hold = \"2h\""),
        9,
        "peer.gcp.sla.hold",
        "at most 1h",
    );
    assert_err(
        &peer_sla("max_los = \"1%\""),
        9,
        "peer.gcp.sla.max_los",
        "unknown field",
    );
    let path_moves = base_with(
        "  name = \"cci-1\"\n",
        "  name = \"cci-1\"\n  sla = { max_moves_per_minute = 3 }\n",
    );
    let e = err(&path_moves);
    assert_eq!(e.key, "peer.gcp.path.cci-1.sla.max_moves_per_minute", "{e}");
    assert!(e.message.contains("peer setting"), "{e}");
}

// --- QoS: dscp -----------------------------------------------------------------

#[test]
fn dscp_defaults_bfd_cs6_and_data_inherit() {
    let c = ok(BASE);
    assert_eq!(c.bfd.dscp, 48);
    for p in c.peers.iter().flat_map(|p| &p.paths) {
        assert_eq!(p.dscp, Dscp::Inherit);
        assert_eq!(p.bfd.dscp, 48);
    }
}

#[test]
fn dscp_by_name_number_peer_and_path() {
    let text = base_with("[gateway]", "[bfd]\ndscp = \"cs5\"\n\n[gateway]");
    let text = text.replacen(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\ndscp = \"af41\"\n",
        1,
    );
    let text = text.replacen(
        "  remote = \"198.51.100.2:4800\"\n",
        "  remote = \"198.51.100.2:4800\"\n  dscp = 46\n  [peer.path.bfd]\n  dscp = 0\n",
        1,
    );
    let text = text.replacen("tun = \"xl-aws\"\n", "tun = \"xl-aws\"\ndscp = \"EF\"\n", 1);
    let text = text.replacen(
        "  remote = \"203.0.113.2:4800\"\n",
        "  remote = \"203.0.113.2:4800\"\n  dscp = \"inherit\"\n",
        1,
    );
    let c = ok(&text);
    assert_eq!(c.bfd.dscp, 40);
    let gcp = &c.peers[0];
    assert_eq!(gcp.paths[0].dscp, Dscp::Fixed(34));
    assert_eq!(gcp.paths[0].bfd.dscp, 40);
    assert_eq!(gcp.paths[1].dscp, Dscp::Fixed(46));
    assert_eq!(gcp.paths[1].bfd.dscp, 0);
    assert_eq!(c.peers[1].paths[0].dscp, Dscp::Inherit);
}

#[test]
fn dscp_errors_name_the_key() {
    let bad = base_with("[gateway]", "[bfd]\ndscp = 64\n\n[gateway]");
    assert_err(&bad, 2, "bfd.dscp", "invalid DSCP 64");
    let bad = base_with("[gateway]", "[bfd]\ndscp = \"cs8\"\n\n[gateway]");
    assert_err(&bad, 2, "bfd.dscp", "invalid DSCP \"cs8\"");
    let bad = base_with("[gateway]", "[bfd]\ndscp = \"inherit\"\n\n[gateway]");
    assert_err(&bad, 2, "bfd.dscp", "no inner packet");
    let bad = base_with(
        "  remote = \"192.0.2.2:4800\"\n",
        "  remote = \"192.0.2.2:4800\"\n  dscp = -1\n",
    );
    assert_err(&bad, 12, "peer.gcp.path.cci-1.dscp", "invalid DSCP -1");
}

// --- aggregate: policy, rate, reorder_wait ------------------------------------------

#[test]
fn aggregate_policy_rate_and_reorder_wait() {
    let text = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\npolicy = \"aggregate\"\nreorder_wait = \"30ms\"\n",
    )
    .replacen(
        "name = \"cci-1\"\n",
        "name = \"cci-1\"\n  rate = \"300Mbit/s\"\n",
        1,
    )
    .replacen(
        "name = \"cci-2\"\n",
        "name = \"cci-2\"\n  rate = \"1.5Gbit/s\"\n",
        1,
    );
    let c = ok(&text);
    let gcp = &c.peers[0];
    assert_eq!(gcp.policy, Policy::Aggregate);
    assert_eq!(gcp.policy.as_str(), "aggregate");
    assert_eq!(gcp.reorder_wait, Some(Duration::from_millis(30)));
    assert_eq!(gcp.paths[0].rate, Some(37_500_000));
    assert_eq!(gcp.paths[1].rate, Some(187_500_000));
    // Defaults: the wait is automatic and no rate is assumed.
    let aws = &c.peers[1];
    assert_eq!(aws.reorder_wait, None);
    assert_eq!(aws.paths[0].rate, None);
    let auto = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\nreorder_wait = \"auto\"\n",
    );
    assert_eq!(ok(&auto).peers[0].reorder_wait, None);
    for (rate, bytes) in [
        ("800kbit/s", 100_000),
        ("10 Mbit/s", 1_250_000),
        ("8000bit/s", 1000),
    ] {
        let t = BASE.replacen(
            "name = \"dx-1\"\n",
            &format!("name = \"dx-1\"\n  rate = \"{rate}\"\n"),
            1,
        );
        assert_eq!(ok(&t).peers[1].paths[0].rate, Some(bytes), "{rate}");
    }
}

#[test]
fn bad_rates_and_waits_are_refused_with_their_key() {
    for rate in ["300", "300Mbps", "fast", "-1Mbit/s", "0bit/s", "2000Gbit/s"] {
        let t = BASE.replacen(
            "name = \"dx-1\"\n",
            &format!("name = \"dx-1\"\n  rate = \"{rate}\"\n"),
            1,
        );
        let e = err(&t);
        assert!(e.key.ends_with("rate"), "{rate}: {e}");
        assert!(e.message.contains("rate"), "{rate}: {e}");
    }
    for wait in ["0ms", "2s", "soon"] {
        let t = base_with(
            "tun = \"xl-gcp\"\n",
            &format!("tun = \"xl-gcp\"\nreorder_wait = \"{wait}\"\n"),
        );
        let e = err(&t);
        assert_eq!(e.key, "peer.gcp.reorder_wait", "{wait}: {e}");
    }
}

#[test]
fn a_route_that_covers_a_paths_far_address_is_warned_about() {
    let c = ok(&base_with(
        "tun = \"xl-aws\"\n",
        "tun = \"xl-aws\"\nroutes = [\"0.0.0.0/0\", \"10.0.0.0/8\", \"198.51.100.0/24\"]\n",
    ));
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("198.51.100.2") && w[0].contains("cci-2"),
        "{w:?}"
    );
}

#[test]
fn public_key_is_validated_and_needs_the_gateways_private_key() {
    let public = crate::core::keypair::PrivateKey::from_bytes([9; 32]).public();
    let with_key = format!("tun = \"xl-gcp\"\npublic_key = \"{public}\"\n");
    let text = base_with("tun = \"xl-gcp\"\n", &with_key);
    assert_err(
        &text,
        7,
        "peer.gcp.public_key",
        "needs [gateway] private_key_file",
    );
    let text = text.replacen(
        "name = \"gw\"\n",
        "name = \"gw\"\nprivate_key_file = \"/etc/crosslink/private.key\"\n",
        1,
    );
    let c = ok(&text);
    assert_eq!(
        c.gateway.private_key_file,
        Some(PathBuf::from("/etc/crosslink/private.key"))
    );
    let gcp = c.peers.iter().find(|p| p.name == "gcp").unwrap();
    assert_eq!(gcp.public_key, Some(public));
    assert!(
        c.summary().contains("handshake with public_key"),
        "{}",
        c.summary()
    );
    let aws = c.peers.iter().find(|p| p.name == "aws").unwrap();
    assert_eq!(aws.public_key, None);
    // A pre-shared key may be mixed in; a second accepted key makes no sense.
    let psk = text.replacen("public_key", "key_file = \"/k\"\npublic_key", 1);
    assert_eq!(ok(&psk).peers[0].key_file, Some(PathBuf::from("/k")));
    let rot = psk.replacen("public_key", "accept_key_file = \"/k2\"\npublic_key", 1);
    assert_err(&rot, 9, "peer.gcp.accept_key_file", "not with public_key");
    // Bad key text: refused without echoing it.
    let bad = text.replacen(&public.to_base64(), "secretsecret", 1);
    let e = assert_err(&bad, 8, "peer.gcp.public_key", "found 12 characters");
    assert!(!e.message.contains("secretsecret"));
    let empty = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\nprivate_key_file = \"\"\n",
    );
    assert_err(&empty, 3, "gateway.private_key_file", "must not be empty");
    // The kernel fast path cannot seal.
    let fast = text.replacen("public_key", "fast_path = true\npublic_key", 1);
    assert_err(&fast, 8, "peer.gcp.fast_path", "no key_file or public_key");
}

#[test]
fn check_files_covers_the_private_key_file() {
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\nprivate_key_file = \"/nonexistent/private.key\"\n",
    );
    let errors = ok(&text).check_files();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key, "gateway.private_key_file");
}

// --- forward error correction ---------------------------------------------------------

#[test]
fn fec_modes_targets_and_caps() {
    let c = ok(BASE);
    assert_eq!(c.peers[0].fec, FecConfig::default());
    assert_eq!(c.peers[0].fec.mode, FecMode::Off);
    assert!((c.peers[0].fec.target_loss() - 0.001).abs() < 1e-12);
    assert!((c.peers[0].fec.max_overhead() - 0.3).abs() < 1e-12);
    for (value, mode) in [
        ("off", FecMode::Off),
        ("auto", FecMode::Auto),
        ("10+2", FecMode::Fixed(Code::new(10, 2).unwrap())),
        ("4+1", FecMode::Fixed(Code::new(4, 1).unwrap())),
    ] {
        let t = base_with(
            "tun = \"xl-gcp\"\n",
            &format!(
                "tun = \"xl-gcp\"\nfec = \"{value}\"\nfec_target_loss = \"0.5%\"\nfec_max_overhead = \"20%\"\n"
            ),
        );
        let fec = ok(&t).peers[0].fec;
        assert_eq!(fec.mode, mode, "{value}");
        assert_eq!(fec.mode.to_string(), value);
        assert_eq!(
            (fec.target_loss_ppm, fec.max_overhead_ppm),
            (5_000, 200_000)
        );
    }
}

#[test]
fn fec_that_cannot_work_is_refused_with_its_key() {
    for (extra, key) in [
        ("fec = \"10\"", "fec"),
        ("fec = \"0+2\"", "fec"),
        ("fec = \"10+33\"", "fec"),
        ("fec = \"always\"", "fec"),
        ("policy = \"duplicate\"\nfec = \"10+2\"", "fec"),
        ("fec_target_loss = \"0%\"", "fec_target_loss"),
        ("fec_target_loss = \"100%\"", "fec_target_loss"),
        ("fec_max_overhead = \"150%\"", "fec_max_overhead"),
    ] {
        let t = base_with(
            "tun = \"xl-gcp\"\n",
            &format!("tun = \"xl-gcp\"\n{extra}\n"),
        );
        let e = err(&t);
        assert_eq!(e.key, format!("peer.gcp.{key}"), "{extra}: {e}");
    }
    // duplicate with auto is fine: auto sends nothing under duplicate
    let t = base_with(
        "tun = \"xl-gcp\"\n",
        "tun = \"xl-gcp\"\npolicy = \"duplicate\"\nfec = \"auto\"\n",
    );
    assert_eq!(ok(&t).peers[0].fec.mode, FecMode::Auto);
}

/// `bfd.offload` is read at every level and refused with authentication,
/// whose packets never repeat.
#[test]
fn bfd_offload_is_read_and_refused_with_auth() {
    let text = base_with("name = \"gw\"\n", "name = \"gw\"\n[bfd]\noffload = true\n");
    let c = ok(&text);
    assert!(c.bfd.offload);
    assert!(c.peers[0].paths.iter().all(|p| p.bfd.offload));
    assert!(!ok(BASE).bfd.offload, "off by default");
    let text = base_with(
        "name = \"gw\"\n",
        "name = \"gw\"\n[bfd]\noffload = true\nauth = { type = \"keyed-sha1\", key_id = 1, secret_file = \"/k\" }\n",
    );
    assert_err(&text, 4, "bfd.offload", "authenticated");
}
