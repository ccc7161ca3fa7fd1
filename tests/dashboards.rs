//! The deployment files under `configs/` stay in step with the metrics:
//! every Grafana expression and alert rule names a metric the daemon
//! exports, and `promtool check rules` accepts the alert rules and (as
//! recording rules) every dashboard expression.
//!
//! promtool comes from the Debian package `prometheus`. Without it the
//! promtool checks print a skip line, unless `CROSSLINK_NETNS_REQUIRED=1`
//! (set by `.ci/run`), where a missing promtool is a failure.

use crosslink::telemetry::metrics::METRICS;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

/// The promtool binary, or `None` (after saying so) when the check is skipped.
fn promtool(test: &str) -> Option<&'static str> {
    crosslink::lab::tool_gate(test, &[("promtool", "prometheus")]).then_some("promtool")
}

/// Every `crosslink_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("crosslink_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Whether a series name belongs to an exported metric (histograms add
/// `_bucket`, `_sum`, `_count`).
fn is_exported(name: &str) -> bool {
    METRICS.iter().any(|(m, kind)| {
        name == *m
            || (*kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(m)))
    })
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

fn dashboard_exprs() -> Vec<String> {
    let path = configs().join("grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("configs/grafana-dashboard.json");
    let doc: Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&doc, &mut exprs);
    exprs
}

#[test]
fn dashboard_expressions_name_exported_metrics() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 10, "too few expressions: {exprs:?}");
    let mut seen = std::collections::HashSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(
            !names.is_empty(),
            "expression names no crosslink metric: {e}"
        );
        for n in names {
            assert!(is_exported(&n), "dashboard uses unknown metric {n} in: {e}");
            seen.insert(n);
        }
    }
    // The panels the operator needs: state, failovers, RTT, traffic, drops.
    for needed in [
        "crosslink_path_up",
        "crosslink_failovers_total",
        "crosslink_path_rtt_seconds_bucket",
        "crosslink_path_transmit_bytes_total",
        "crosslink_packets_dropped_total",
    ] {
        assert!(seen.contains(needed), "no panel uses {needed}");
    }
}

#[test]
fn alert_rules_name_exported_metrics() {
    let text = std::fs::read_to_string(configs().join("prometheus-alerts.yml")).unwrap();
    let exprs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert!(exprs.len() >= 4, "too few rules");
    for e in exprs {
        for n in metric_names(e) {
            assert!(is_exported(&n), "alert uses unknown metric {n} in: {e}");
        }
    }
    for alert in [
        "CrosslinkPathDown",
        "CrosslinkPathFlapping",
        "CrosslinkPeerDown",
        "CrosslinkReloadFailed",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert} missing");
    }
}

#[test]
fn promtool_accepts_alert_rules() {
    let Some(tool) = promtool("promtool_accepts_alert_rules") else {
        return;
    };
    let out = Command::new(tool)
        .args(["check", "rules"])
        .arg(configs().join("prometheus-alerts.yml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    crosslink::lab::say(&format!(
        "promtool check rules prometheus-alerts.yml: {}",
        text.trim()
    ));
    assert!(out.status.success(), "{text}");
}

/// Dashboard expressions are valid PromQL: promtool parses them as
/// recording rules (Grafana's variables replaced by plain values).
#[test]
fn promtool_parses_dashboard_expressions() {
    let Some(tool) = promtool("promtool_parses_dashboard_expressions") else {
        return;
    };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs().iter().enumerate() {
        let plain = e
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$peer", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&plain).unwrap()
        ));
    }
    let path = std::env::temp_dir().join(format!("xl-dash-{}.yml", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    let out = Command::new(tool)
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    crosslink::lab::say(&format!(
        "promtool check rules (dashboard expressions): {}",
        text.trim()
    ));
    assert!(out.status.success(), "{text}");
}

#[test]
fn name_extraction() {
    assert_eq!(
        metric_names("rate(crosslink_a_total[1m]) / crosslink_b"),
        vec!["crosslink_a_total", "crosslink_b"]
    );
    assert!(is_exported("crosslink_path_rtt_seconds_bucket"));
    assert!(!is_exported("crosslink_path_up_bucket"));
    assert!(!is_exported("crosslink_nonexistent"));
}

/// The systemd unit: the directives the daemon relies on, and
/// `systemd-analyze verify` (when installed) has nothing to say.
#[test]
fn systemd_unit_is_complete_and_verifies() {
    let text = std::fs::read_to_string(configs().join("crosslink.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
        "DeviceAllow=/dev/net/tun rw",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RuntimeDirectory=crosslink",
        "ExecReload=",
        // the BFD thread's batched sends
        "SystemCallFilter=io_uring_setup",
    ] {
        assert!(
            text.contains(needed),
            "{needed} missing from crosslink.service"
        );
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        crosslink::lab::say("SKIPPED systemd-analyze verify: systemd-analyze not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("xl-unit-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let unit = dir.join("crosslink.service");
    let local = text.replace("/usr/local/bin/crosslink", env!("CARGO_BIN_EXE_crosslink"));
    std::fs::write(&unit, local).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("crosslink.service"))
        .collect();
    crosslink::lab::say(&format!(
        "systemd-analyze verify crosslink.service: {}",
        if findings.is_empty() {
            "no findings"
        } else {
            "findings"
        }
    ));
    assert!(findings.is_empty(), "{report}");
}
