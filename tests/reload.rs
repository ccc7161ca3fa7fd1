//! SIGHUP reload in a network-namespace lab (see `crosslink::lab`), with a
//! 1000 packet/s stream running across it:
//!
//! 1. path2 is removed and a new path3 added (both gateways), and gw-a's
//!    peer gets one more route: path1 keeps its BFD session (same
//!    discriminator, no transition), keeps its flows (no packet lost),
//!    path3 comes up, path2 leaves status and metrics, the route appears;
//! 2. a broken file is refused: nothing changes and
//!    `crosslink_config_last_reload_successful` drops to 0;
//! 3. a peer-level change (its TUN name) restarts that peer: the old TUN
//!    is gone, the new one exists, the far side saw AdminDown.
//!
//! Needs root and curl; skipped with a message otherwise, unless
//! `CROSSLINK_NETNS_REQUIRED=1`.

mod support;

use crosslink::lab::{self, Gw, Host, Lab, LabOptions};
use serde_json::Value;
use std::time::Duration;
use support::*;

const METRICS_PORT: u16 = 9787;
const STREAM_PORT: u16 = 9000;

fn path3_addr(gw: Gw) -> &'static str {
    match gw {
        Gw::A => "198.18.77.1",
        Gw::B => "198.18.77.2",
    }
}

/// The lab's config, with metrics on gw-a, and with path2 replaced by path3.
fn config(lab: &Lab, gw: Gw, swap_paths: bool) -> String {
    let mut text = lab.config_text(gw);
    if gw == Gw::A {
        text = text.replacen(
            "\n[bfd]",
            &format!("\n[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n\n[bfd]"),
            1,
        );
    }
    if swap_paths && gw == Gw::A {
        // A route added in the same reload: applied in place, no restart.
        text = text.replacen(
            "routes = [\"198.18.30.0/24\"]",
            "routes = [\"198.18.30.0/24\", \"198.18.31.0/24\"]",
            1,
        );
        assert!(text.contains("198.18.31.0/24"), "lab config changed shape");
    }
    if swap_paths {
        let start = text.find("  name = \"path2\"").expect("path2 in config");
        let other = match gw {
            Gw::A => Gw::B,
            Gw::B => Gw::A,
        };
        text.truncate(start);
        text.push_str(&format!(
            "  name = \"path3\"\n  local = \"{}:4800\"\n  remote = \"{}:4800\"\n  priority = 3\n",
            path3_addr(gw),
            path3_addr(other)
        ));
    }
    text
}

fn names(status: &Value) -> Vec<String> {
    status["peers"][0]["paths"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn path<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["peers"][0]["paths"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

fn bfd_field(status: &Value, name: &str, field: &str) -> u64 {
    path(status, name)
        .and_then(|p| p["bfd"][field].as_u64())
        .unwrap_or_else(|| panic!("{name}.bfd.{field} missing: {status}"))
}

fn scrape(lab: &Lab) -> String {
    http_get(
        lab,
        Host::GwA,
        &format!("http://127.0.0.1:{METRICS_PORT}/metrics"),
    )
    .unwrap_or_default()
}

fn hup(gw: &Owned) {
    assert!(
        lab::signal_pid(gw.pid(), "HUP"),
        "cannot signal {}",
        gw.pid()
    );
}

#[test]
fn reload_applies_only_the_difference() {
    if !netns_allowed("reload_applies_only_the_difference")
        || !tool_present("reload_applies_only_the_difference", "curl", "curl")
    {
        return;
    }
    // Relaxed BFD timing (250 ms detection): what is checked here is that a
    // reload leaves sessions alone, not how fast they detect, and a loaded
    // machine should not fake a flap.
    let mut opts = LabOptions::new("rl", BIN);
    opts.tx_interval = Duration::from_millis(50);
    opts.rx_interval = opts.tx_interval;
    opts.multiplier = 5;
    let mut lab = Lab::new(opts).unwrap();
    let mut gws = Vec::new();
    for gw in Gw::ALL {
        std::fs::write(lab.config_path(gw), config(&lab, gw, false)).unwrap();
        let cfg = lab.config_path(gw).display().to_string();
        let log = format!("{}.log", gw.name());
        gws.push(spawn_in(&lab, gw.host(), BIN, &["run", "-c", &cfg], &log));
    }
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let before: Vec<Value> = Gw::ALL.iter().map(|g| lab.status(*g).unwrap()).collect();

    // path3's underlay: a second subnet on the path2 veth.
    for gw in Gw::ALL {
        let ns = lab.ns(gw.host());
        let addr = format!("{}/30", path3_addr(gw));
        lab::run(
            std::process::Command::new("ip")
                .args(["-n", &ns, "addr", "add", &addr, "dev", "path2"]),
        )
        .unwrap();
    }

    // 1. Swap path2 for path3 under a running stream.
    let receiver = lab
        .start_receiver(STREAM_PORT, Duration::from_secs(60))
        .unwrap();
    let sender = lab
        .start_sender(STREAM_PORT, 1000, Duration::from_secs(60))
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    for (i, gw) in Gw::ALL.iter().enumerate() {
        std::fs::write(lab.config_path(*gw), config(&lab, *gw, true)).unwrap();
        hup(&gws[i]);
    }
    lab.wait_for("path3 up, path2 gone", Duration::from_secs(15), |_, s| {
        names(s) == ["path1", "path3"] && path(s, "path3").is_some_and(|p| p["state"] == "up")
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let _ = sender.stop();
    let report = receiver.finish(Duration::from_secs(3)).unwrap();
    say(&format!("stream across the reload: {report}"));
    assert!(report["sent"].as_u64().unwrap_or(0) >= 1000, "{report}");
    assert_eq!(
        report["lost"], 0,
        "packets lost across the reload: {report}"
    );

    for (i, gw) in Gw::ALL.iter().enumerate() {
        let after = lab.status(*gw).unwrap();
        for field in ["local_discriminator", "remote_discriminator", "transitions"] {
            assert_eq!(
                bfd_field(&before[i], "path1", field),
                bfd_field(&after, "path1", field),
                "{gw}: path1 {field} changed by the reload"
            );
        }
        assert_eq!(path(&after, "path1").unwrap()["active"], true, "{gw}");
        say(&format!(
            "{gw}: path1 discriminator {} and transitions {} unchanged; path3 up",
            bfd_field(&after, "path1", "local_discriminator"),
            bfd_field(&after, "path1", "transitions")
        ));
    }
    let ns = lab.ns(Host::GwA);
    let routes =
        lab::run(std::process::Command::new("ip").args(["-n", &ns, "route", "show"])).unwrap();
    assert!(
        routes.contains("198.18.31.0/24 dev xl-b"),
        "added route missing: {routes}"
    );
    let m = scrape(&lab);
    assert_eq!(
        sample(&m, "crosslink_config_last_reload_successful"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "crosslink_path_up{peer=\"b\",path=\"path3\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "crosslink_bfd_session_transitions_total{peer=\"b\",path=\"path1\",from=\"up\",to=\"down\"}"),
        Some(0.0)
    );
    wait_for(
        "path2's series to leave /metrics",
        Duration::from_secs(30),
        || (!scrape(&lab).contains("crosslink_path_up{peer=\"b\",path=\"path2\"}")).then_some(()),
    );

    // 2. A broken file is refused and changes nothing.
    let good = lab.status(Gw::A).unwrap();
    std::fs::write(
        lab.config_path(Gw::A),
        "[gateway]\nname = \"gw-a\"\nbogus = 1\n",
    )
    .unwrap();
    hup(&gws[0]);
    wait_for(
        "reload failure in the metric",
        Duration::from_secs(5),
        || {
            (sample(&scrape(&lab), "crosslink_config_last_reload_successful") == Some(0.0))
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = lab.status(Gw::A).unwrap();
    assert_eq!(names(&after), ["path1", "path3"]);
    for p in ["path1", "path3"] {
        assert_eq!(
            bfd_field(&good, p, "local_discriminator"),
            bfd_field(&after, p, "local_discriminator")
        );
        assert_eq!(
            bfd_field(&good, p, "transitions"),
            bfd_field(&after, p, "transitions")
        );
    }
    let log = lab::wait_log(
        &lab.dir().join("gw-a.log"),
        "reload refused",
        Duration::from_secs(3),
    );
    assert!(log.contains("reload refused"), "no refusal logged");
    say("broken file: refused, crosslink_config_last_reload_successful 0, nothing changed");

    // 3. A peer-level change restarts the peer: new TUN, old one gone.
    let b_before = bfd_field(&lab.status(Gw::B).unwrap(), "path1", "transitions");
    let renamed = config(&lab, Gw::A, true).replace("tun = \"xl-b\"", "tun = \"xl-b2\"");
    std::fs::write(lab.config_path(Gw::A), renamed).unwrap();
    hup(&gws[0]);
    lab.wait_for(
        "paths up after the peer restart",
        Duration::from_secs(15),
        |gw, s| {
            let tun_ok = gw == Gw::B || s["peers"][0]["tun"] == "xl-b2";
            tun_ok
                && ["path1", "path3"]
                    .iter()
                    .all(|p| path(s, p).is_some_and(|x| x["state"] == "up"))
        },
    )
    .unwrap();
    let ns = lab.ns(Host::GwA);
    let links =
        lab::run(std::process::Command::new("ip").args(["-n", &ns, "-o", "link", "show"])).unwrap();
    assert!(links.contains("xl-b2"), "new TUN missing: {links}");
    assert!(!links.contains("xl-b:"), "old TUN still there: {links}");
    let routes =
        lab::run(std::process::Command::new("ip").args(["-n", &ns, "route", "show"])).unwrap();
    assert!(
        routes.contains("dev xl-b2"),
        "route not moved to the new TUN: {routes}"
    );
    let b_after = bfd_field(&lab.status(Gw::B).unwrap(), "path1", "transitions");
    assert!(
        b_after >= b_before + 2,
        "gw-b saw no AdminDown/Up: {b_before} -> {b_after}"
    );
    let m = scrape(&lab);
    assert_eq!(
        sample(&m, "crosslink_config_last_reload_successful"),
        Some(1.0)
    );
    say(&format!(
        "peer restart: TUN xl-b -> xl-b2, gw-b path1 transitions {b_before} -> {b_after}"
    ));

    // 3b. A peer-level change that keeps the TUN's name (here its MTU)
    // restarts the peer too: the old device must be gone before the new
    // one is made under the same name.
    let remtu = config(&lab, Gw::A, true).replace("tun = \"xl-b\"", "tun = \"xl-b2\"\nmtu = 1400");
    std::fs::write(lab.config_path(Gw::A), remtu).unwrap();
    hup(&gws[0]);
    let tun_mtu = || {
        lab::run(std::process::Command::new("ip").args(["-n", &ns, "-o", "link", "show", "xl-b2"]))
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !tun_mtu().contains("mtu 1400") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        tun_mtu().contains("mtu 1400"),
        "TUN not remade with the new MTU: {}",
        tun_mtu()
    );
    lab.wait_for(
        "paths up after the restart under the same TUN name",
        Duration::from_secs(15),
        |_, s| {
            ["path1", "path3"]
                .iter()
                .all(|p| path(s, p).is_some_and(|x| x["state"] == "up"))
        },
    )
    .unwrap();
    let routes =
        lab::run(std::process::Command::new("ip").args(["-n", &ns, "route", "show"])).unwrap();
    assert!(
        routes.contains("dev xl-b2"),
        "route lost in the restart: {routes}"
    );
    let m = scrape(&lab);
    assert_eq!(
        sample(&m, "crosslink_config_last_reload_successful"),
        Some(1.0),
        "the restart under the same TUN name was not applied in full"
    );
    say("peer restart under the same TUN name (mtu 1400): TUN remade, paths up");

    // 4. A clean stop: AdminDown on every path, TUN and routes gone.
    let status = gws[0].stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "unclean exit: {status:?}"
    );
    let b = lab.status(Gw::B).unwrap();
    for p in ["path1", "path3"] {
        let bfd = &path(&b, p).unwrap()["bfd"];
        assert_eq!(bfd["remote_state"], "admin_down", "gw-b {p}: {bfd}");
        assert_eq!(bfd["local_diag"], "neighbor_down", "gw-b {p}: {bfd}");
    }
    let links =
        lab::run(std::process::Command::new("ip").args(["-n", &ns, "-o", "link", "show"])).unwrap();
    assert!(!links.contains("xl-b2"), "TUN left after stop: {links}");
    let routes =
        lab::run(std::process::Command::new("ip").args(["-n", &ns, "route", "show"])).unwrap();
    assert!(
        !routes.contains("198.18.30.0/24"),
        "route left after stop: {routes}"
    );
    assert!(
        !routes.contains("198.18.31.0/24"),
        "route left after stop: {routes}"
    );
    say("clean stop: gw-b saw AdminDown on path1 and path3; TUN and route gone");
    let status = gws[1].stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "unclean exit: {status:?}"
    );
}
