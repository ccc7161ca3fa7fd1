//! The metrics endpoint as Prometheus sees it, in a network-namespace lab
//! (see `crosslink::lab`): gateway A runs with `[metrics]` on the lab
//! namespace's loopback, and
//!
//! - `promtool check metrics` must find nothing in a scrape, every metric
//!   of the SPEC must be there with HELP and the right TYPE, every path's
//!   series (histograms included) from the first scrape, and the RTT
//!   histogram must fill once the paths are up;
//! - a real Prometheus server (own config and data dir in the lab dir)
//!   scrapes the gateway, and `crosslink_path_up` is read back through its
//!   HTTP query API.
//!
//! Needs root (namespaces), curl, and promtool/prometheus (Debian package
//! `prometheus`); skipped with a message otherwise, unless
//! `CROSSLINK_NETNS_REQUIRED=1`.

mod support;

use crosslink::lab::{Gw, Host, Lab, LabOptions, LabPath};
use crosslink::telemetry::metrics::METRICS;
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const METRICS_PORT: u16 = 9787;

/// One lab at a time (a 2-core machine, millisecond BFD).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gateway A's config with a metrics endpoint on the namespace's loopback.
fn with_metrics(lab: &Lab) -> String {
    let text = lab.config_text(Gw::A);
    text.replacen(
        "\n[bfd]",
        &format!("\n[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n\n[bfd]"),
        1,
    )
}

fn start_lab(tag: &str) -> (Lab, Owned) {
    start_lab_with(tag, &[], &[])
}

fn start_lab_with(tag: &str, args: &[&str], env: &[(&str, String)]) -> (Lab, Owned) {
    let mut lab = Lab::new(LabOptions::new(tag, BIN)).unwrap();
    std::fs::write(lab.config_path(Gw::A), with_metrics(&lab)).unwrap();
    let config = lab.config_path(Gw::A).display().to_string();
    let mut all = vec!["run", "-c", &config];
    all.extend_from_slice(args);
    let gw_a = spawn_in_env(&lab, Host::GwA, BIN, &all, "gw-a.log", env);
    lab.start_gateway(Gw::B).unwrap();
    (lab, gw_a)
}

fn scrape(lab: &Lab) -> Option<String> {
    http_get(
        lab,
        Host::GwA,
        &format!("http://127.0.0.1:{METRICS_PORT}/metrics"),
    )
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), report)
}

fn check_exposition(text: &str) {
    for (name, kind) in METRICS {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not a {kind}"
        );
    }
    for path in ["path1", "path2"] {
        let l = format!("{{peer=\"b\",path=\"{path}\"");
        for series in [
            "crosslink_path_up",
            "crosslink_path_active",
            "crosslink_path_transmit_packets_total",
            "crosslink_flows_active",
            "crosslink_path_rtt_seconds_count",
            "crosslink_bfd_session_transitions_total",
        ] {
            assert!(
                text.contains(&format!("{series}{l}")),
                "{series} for {path} missing"
            );
        }
        assert!(
            text.contains(&format!(
                "crosslink_path_rtt_seconds_bucket{l},le=\"0.001\"}}"
            )),
            "RTT histogram buckets for {path} missing"
        );
    }
    assert!(text.contains("crosslink_failover_detection_seconds_bucket{peer=\"b\",le=\"0.03\"}"));
    assert!(!text.contains("quantile="), "a summary slipped in");
}

#[test]
fn promtool_finds_nothing_and_rtt_is_measured() {
    if !netns_allowed("promtool_finds_nothing_and_rtt_is_measured")
        || !tool_present(
            "promtool_finds_nothing_and_rtt_is_measured",
            "promtool",
            "prometheus",
        )
    {
        return;
    }
    let _serial = serial();
    // Gateway A logs JSON and runs as systemd would run it (notify + watchdog).
    let notify_dir = std::env::temp_dir().join(format!("xl-pt-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&notify_dir);
    std::fs::create_dir_all(&notify_dir).unwrap();
    let notify_path = notify_dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let env = [
        ("NOTIFY_SOCKET", notify_path.display().to_string()),
        ("WATCHDOG_USEC", "600000".to_string()),
    ];
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || {
        // systemd's side: read every notification until STOPPING=1.
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = notify.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let last = m == "STOPPING=1";
            got.push((t0.elapsed(), m));
            if last {
                break;
            }
        }
        got
    });
    let (mut lab, mut gw_a) = start_lab_with("pt", &["--log-format", "json"], &env);
    // The first scrape once a path carries the peer (the failover counter,
    // labelled by the change, exists from the first one, none -> path1):
    // every series is there.
    let first = wait_for(
        "first scrape with a path up",
        Duration::from_secs(10),
        || scrape(&lab).filter(|t| t.contains("crosslink_failovers_total{")),
    );
    check_exposition(&first);
    let (ok, report) = promtool_check(&first);
    say(&format!(
        "promtool check metrics (first scrape, {} lines): {}",
        first.lines().count(),
        if report.trim().is_empty() {
            "no findings"
        } else {
            report.trim()
        }
    ));
    assert!(ok && report.trim().is_empty(), "promtool: {report}");

    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let text = wait_for("RTT samples on both paths", Duration::from_secs(10), || {
        let t = scrape(&lab)?;
        let n1 = sample(
            &t,
            "crosslink_path_rtt_seconds_count{peer=\"b\",path=\"path1\"}",
        )?;
        let n2 = sample(
            &t,
            "crosslink_path_rtt_seconds_count{peer=\"b\",path=\"path2\"}",
        )?;
        (n1 >= 2.0 && n2 >= 2.0).then_some(t)
    });
    check_exposition(&text);
    assert_eq!(
        sample(&text, "crosslink_path_up{peer=\"b\",path=\"path1\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "crosslink_peer_up{peer=\"b\"}"), Some(1.0));
    let (ok, report) = promtool_check(&text);
    say(&format!(
        "promtool check metrics (paths up, {} lines): {}",
        text.lines().count(),
        if report.trim().is_empty() {
            "no findings"
        } else {
            report.trim()
        }
    ));
    assert!(ok && report.trim().is_empty(), "promtool: {report}");

    let status = lab.status(Gw::A).unwrap();
    for p in [LabPath::Path1, LabPath::Path2] {
        let rtt = crosslink::lab::path_status(&status, p)
            .and_then(|s| s["bfd"]["rtt_us"].as_u64())
            .unwrap_or_else(|| panic!("{p}: no rtt_us in status"));
        say(&format!("{p}: status rtt_us = {rtt}"));
        assert!(rtt > 0 && rtt < 1_000_000, "implausible RTT {rtt} us");
    }
    let sum = sample(
        &text,
        "crosslink_path_rtt_seconds_sum{peer=\"b\",path=\"path1\"}",
    )
    .unwrap();
    let count = sample(
        &text,
        "crosslink_path_rtt_seconds_count{peer=\"b\",path=\"path1\"}",
    )
    .unwrap();
    say(&format!(
        "path1 mean RTT from the histogram: {:.1} us over {count} echoes",
        sum / count * 1e6
    ));
    check_table_and_watch(&lab);
    assert!(!gw_a.exited(), "gateway A exited");
    let status = gw_a.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "unclean exit: {status:?}"
    );
    let got = reader.join().unwrap();
    let _ = std::fs::remove_dir_all(&notify_dir);
    let names: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(names.first(), Some(&"READY=1"), "{got:?}");
    assert_eq!(names.last(), Some(&"STOPPING=1"), "{got:?}");
    let pings: Vec<Duration> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    let longest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    say(&format!(
        "sd_notify: READY=1, {} WATCHDOG=1 (longest gap {longest:?}, WatchdogSec 0.6 s), STOPPING=1",
        pings.len()
    ));
    assert!(pings.len() >= 5, "{got:?}");
    assert!(longest < Duration::from_millis(600), "{got:?}");
    check_json_log(&lab);
}

/// `--log-format json`: every line is an object; state changes carry their fields.
fn check_json_log(lab: &Lab) {
    let log = std::fs::read_to_string(lab.dir().join("gw-a.log")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let up = lines
        .iter()
        .find(|v| v["message"] == "path state" && v["to"] == "up")
        .expect("a path state line");
    assert_eq!(up["peer"], "b");
    assert!(
        up["path"].is_string() && up["ts"].is_f64() && up["level"] == "INFO",
        "{up}"
    );
    assert!(lines.iter().any(|v| v["message"] == "peer up"));
    say(&format!("JSON log line: {up}"));
}

/// The human table, and `--watch` redrawing it.
fn check_table_and_watch(lab: &Lab) {
    let sock = lab.socket_path(Gw::A).display().to_string();
    let out = Command::new(BIN)
        .args(["status", "-s", &sock])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    for needed in [
        "peer b",
        "tun xl-b",
        "UP",
        "path1",
        "path2",
        "RTT",
        "198.18.21.1:4800 -> 198.18.21.2:4800",
    ] {
        assert!(table.contains(needed), "{needed} missing from:\n{table}");
    }
    say(&format!("crosslink status:\n{table}"));
    let watch = Command::new(BIN)
        .args(["status", "-s", &sock, "--watch", "--interval", "200ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(900));
    // TERM, not INT: a shell that starts the tests in the background has
    // them ignore SIGINT, and the watch would never end.
    crosslink::lab::signal_pid(watch.id(), "TERM");
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let redraws = text.matches("\x1b[H\x1b[2J").count();
    assert!(
        (2..=8).contains(&redraws),
        "{redraws} redraws in 0.9 s at 200 ms"
    );
    assert_eq!(text.matches("peer b").count(), redraws);
}

#[test]
fn prometheus_scrapes_and_answers_path_up() {
    if !netns_allowed("prometheus_scrapes_and_answers_path_up")
        || !tool_present(
            "prometheus_scrapes_and_answers_path_up",
            "prometheus",
            "prometheus",
        )
    {
        return;
    }
    let _serial = serial();
    let (mut lab, mut gw_a) = start_lab("ps");
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    // Prometheus in the same namespace, on its own port, with its own files.
    let prom_port = 19090;
    let config = lab.dir().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: crosslink\n    static_configs:\n      \
             - targets: ['127.0.0.1:{METRICS_PORT}']\n"
        ),
    )
    .unwrap();
    let data = lab.dir().join("prometheus-data");
    let (c, d) = (config.display().to_string(), data.display().to_string());
    let started = Instant::now();
    let mut prom = spawn_in(
        &lab,
        Host::GwA,
        "prometheus",
        &[
            &format!("--config.file={c}"),
            &format!("--storage.tsdb.path={d}"),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        "prometheus.log",
    );
    let url = format!("http://127.0.0.1:{prom_port}/api/v1/query?query=crosslink_path_up");
    let result = wait_for(
        "crosslink_path_up through Prometheus",
        Duration::from_secs(60),
        || {
            assert!(
                !prom.exited(),
                "prometheus exited: {}",
                std::fs::read_to_string(lab.dir().join("prometheus.log")).unwrap_or_default()
            );
            let body = http_get(&lab, Host::GwA, &url)?;
            let v: Value = serde_json::from_str(&body).ok()?;
            let r = v["data"]["result"].as_array()?.clone();
            (r.len() == 2 && r.iter().all(|s| s["value"][1] == "1")).then_some(r)
        },
    );
    say(&format!(
        "Prometheus answered crosslink_path_up after {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        serde_json::to_string(&result).unwrap()
    ));
    let mut paths: Vec<&str> = result
        .iter()
        .filter_map(|s| s["metric"]["path"].as_str())
        .collect();
    paths.sort();
    assert_eq!(paths, ["path1", "path2"]);
    assert!(result
        .iter()
        .all(|s| s["metric"]["job"] == "crosslink" && s["metric"]["peer"] == "b"));
    // The scrape itself was healthy.
    let up = http_get(
        &lab,
        Host::GwA,
        &format!("http://127.0.0.1:{prom_port}/api/v1/query?query=up"),
    )
    .unwrap();
    assert!(
        up.contains("\"value\":[") && up.contains(",\"1\"]"),
        "scrape target not up: {up}"
    );
    prom.stop();
    assert!(!gw_a.exited(), "gateway A exited");
}
