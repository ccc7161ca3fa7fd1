//! Forward error correction on real sockets (root): a 2000 packet/s stream
//! from the client to the server while both paths lose packets at random
//! (nftables `numgen`, both directions, on gateway A), with FEC off (the
//! default) and `auto`.
//!
//! Prints a `REPORT fec ...` line per case: the stream's loss, and what
//! gateway A's status says of FEC. The asserts are generous bounds (this
//! machine is shared and noisy); the figures are in the README (Forward
//! error correction) and come from `cargo bench --bench fec`.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crosslink::lab::{self, Gw, Lab, LabOptions, LabPath};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crosslink");
const PORT: u16 = 9310;
const RATE: u32 = 2000;
const LOSS_PCT: u8 = 5;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn fec_status(s: &Value) -> Value {
    s["peers"][0].get("fec").cloned().unwrap_or(Value::Null)
}

/// The stream's loss (%) over `secs` seconds with `percent` % random loss
/// on both paths, and gateway A's FEC status at the end.
fn lossy_stream(fec: &str, tag: &str, secs: u64) -> (f64, Value) {
    lossy_stream_with(fec, tag, secs, |_| {})
}

/// [`lossy_stream`] in a lab that `adjust` changes first.
fn lossy_stream_with(
    fec: &str,
    tag: &str,
    secs: u64,
    adjust: impl FnOnce(&mut LabOptions),
) -> (f64, Value) {
    let mut opts = LabOptions::new(tag, BIN);
    opts.peer_extra = vec![format!("fec = \"{fec}\"")];
    adjust(&mut opts);
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    lab.random_loss(LabPath::Path1, LOSS_PCT).unwrap();
    lab.random_loss(LabPath::Path2, LOSS_PCT).unwrap();
    // the loss is measured (3 s window) before the stream is
    let warm = lab
        .start_sender(PORT + 1, RATE, Duration::from_secs(4))
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let _ = warm.stop();
    let receiver = lab
        .start_receiver(PORT, Duration::from_secs(secs + 10))
        .unwrap();
    let sender = lab
        .start_sender(PORT, RATE, Duration::from_secs(secs + 10))
        .unwrap();
    std::thread::sleep(Duration::from_secs(secs));
    let sent = sender.stop().unwrap();
    let report = receiver.finish(Duration::from_secs(3)).unwrap();
    let status = lab.poll(Gw::A).unwrap();
    let lost = report["lost"].as_f64().unwrap_or(f64::NAN);
    let received = report["received"].as_f64().unwrap_or(f64::NAN);
    let lost_pct = 100.0 * lost / (lost + received);
    let fec_a = fec_status(&status);
    let status_b = lab.poll(Gw::B).unwrap_or_default();
    let fec_b = fec_status(&status_b);
    lab::say(&format!("REPORT fec gw-b drops: {}", status_b["drops"]));
    lab::say(&format!(
        "REPORT fec random_loss_pct={LOSS_PCT} fec={fec} stream_lost_pct={lost_pct:.3} sent={} gw_a_fec={fec_a} gw_b_fec={fec_b} cmd=\"cargo test --test netns_fec\"",
        sent["sent"],
    ));
    let log = lab.log_tail(Gw::A, 400);
    let changes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("forward error correction changed"))
        .collect();
    lab::say(&format!(
        "REPORT fec code changes on gw-a: {}",
        changes.len()
    ));
    if std::env::var("CROSSLINK_FEC_LOG").is_ok() {
        for l in &changes {
            eprintln!("{l}");
        }
    }
    (lost_pct, fec_b_or(fec_a, fec_b))
}

/// Gateway A's status says what it sends; B's what it rebuilt. Both, as
/// one object.
/// A lab whose peers run `fec = "auto"`, paths up.
fn auto_lab(tag: &str) -> Lab {
    let mut opts = LabOptions::new(tag, BIN);
    opts.peer_extra = vec!["fec = \"auto\"".into()];
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    lab
}

/// Gateway A's FEC code, once a second for `secs` seconds.
fn codes_each_second(lab: &Lab, secs: u32) -> Vec<String> {
    let mut codes = Vec::new();
    for _ in 0..secs {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(s) = lab.poll(Gw::A) {
            codes.push(fec_status(&s)["code"].as_str().unwrap_or("?").to_string());
        }
    }
    codes
}

fn fec_b_or(a: Value, b: Value) -> Value {
    serde_json::json!({ "a": a, "b": b })
}

#[test]
fn fec_cuts_a_random_loss_on_every_path() {
    if !lab::test_gate("fec_cuts_a_random_loss_on_every_path", &[]) {
        return;
    }
    let _serial = serial();
    let (off, off_status) = lossy_stream("off", "fecoff", 6);
    let (auto, auto_status) = lossy_stream("auto", "fecauto", 6);
    assert!(off > 2.0, "5 % loss on both paths, FEC off: {off} %");
    assert!(
        off_status["a"].is_null(),
        "fec = off shows nothing: {off_status}"
    );
    let a = &auto_status["a"];
    let b = &auto_status["b"];
    assert_ne!(a["code"], "none", "auto sends parity at 5 %: {a}");
    assert!(a["parity_sent"].as_u64().unwrap_or(0) > 100, "{a}");
    assert!(b["recovered"].as_u64().unwrap_or(0) > 100, "{b}");
    // the code auto picks at 5 % leaves ~0.1 % in theory; this shared
    // machine's stalls (a thread descheduled for tens of milliseconds)
    // lose runs no code repairs, hence the generous bound
    assert!(
        auto < off / 2.0,
        "auto cut the stream's loss from {off:.2} % to {auto:.2} % only"
    );
}

/// A path congested by crosslink's own traffic (one TCP stream into a
/// 100 Mbit/s token bucket: the loss is its queue's) gets no parity from
/// `auto`: parity would only add to the queue.
#[test]
fn auto_adds_no_parity_to_a_congested_path() {
    if !lab::test_gate(
        "auto_adds_no_parity_to_a_congested_path",
        &[("iperf3", "iperf3"), ("tc", "iproute2")],
    ) {
        return;
    }
    let _serial = serial();
    let lab = auto_lab("feccong");
    std::thread::sleep(Duration::from_secs(3));
    for p in LabPath::ALL {
        lab.shape(p, 100).unwrap();
    }
    let iperf = lab.start_iperf3(1, 8).unwrap();
    let codes = codes_each_second(&lab, 8);
    let mbit = iperf.finish().map_or(f64::NAN, |bps| bps / 1e6);
    let s = lab.poll(Gw::A).unwrap();
    let fec = fec_status(&s);
    let sent = fec["parity_sent"].as_u64().unwrap_or(0);
    let loss = lab::path_status(&s, LabPath::Path1)
        .and_then(|p| p.get("quality"))
        .cloned()
        .unwrap_or_default();
    lab::say(&format!(
        "REPORT fec congested tcp_mbit={mbit:.0} codes={codes:?} parity_sent={sent} path1_quality={loss} cmd=\"cargo test --test netns_fec\""
    ));
    assert!(mbit > 30.0, "the stream ran: {mbit} Mbit/s");
    // a stray code for a moment before the queue shows is tolerated; a
    // code held through the stream is not
    let coded = codes.iter().filter(|c| c.as_str() != "none").count();
    assert!(
        coded <= 2,
        "auto coded a congested path: {codes:?} (gw-a fec: {fec})"
    );
}

/// Sealed parity (a keyed peer) and `aggregate` (rebuilt packets go
/// through the resequencer) rebuild as well: a fixed code, 5 % random loss
/// on both paths.
#[test]
fn sealed_and_aggregate_peers_rebuild_too() {
    if !lab::test_gate("sealed_and_aggregate_peers_rebuild_too", &[]) {
        return;
    }
    let _serial = serial();
    let key: String = (0..32).map(|i| format!("{:02x}", i * 7 + 3)).collect();
    let (sealed, s) = lossy_stream_with("10+3", "fecseal", 5, |o| {
        o.key = Some(format!("{key}\n"));
    });
    assert!(
        s["b"]["recovered"].as_u64().unwrap_or(0) > 100,
        "sealed: {s}"
    );
    assert_eq!(s["b"]["bad_parity"].as_u64(), Some(0), "sealed: {s}");
    assert!(sealed < 1.5, "sealed: {sealed:.2} % lost");
    let (spread, s) = lossy_stream_with("10+3", "fecaggr", 5, |o| {
        o.policy = crosslink::config::Policy::Aggregate;
    });
    assert!(
        s["b"]["recovered"].as_u64().unwrap_or(0) > 100,
        "aggregate: {s}"
    );
    assert!(spread < 1.5, "aggregate: {spread:.2} % lost");
}

/// A reload changes the code in place: the new one is in use at once, and
/// the peer keeps running (its paths stay up, nothing is lost).
#[test]
fn a_reload_changes_the_code_in_place() {
    if !lab::test_gate("a_reload_changes_the_code_in_place", &[]) {
        return;
    }
    let _serial = serial();
    let mut opts = LabOptions::new("fecrel", BIN);
    opts.peer_extra = vec!["fec = \"10+2\"".into()];
    let mut lab = Lab::new(opts).unwrap();
    lab.start_gateways().unwrap();
    lab.wait_paths_up(Duration::from_secs(15)).unwrap();
    let code = |lab: &Lab| {
        lab.poll(Gw::A)
            .map(|s| fec_status(&s)["code"].as_str().unwrap_or("?").to_string())
            .unwrap_or_default()
    };
    assert_eq!(code(&lab), "10+2");
    let receiver = lab.start_receiver(PORT, Duration::from_secs(20)).unwrap();
    let sender = lab
        .start_sender(PORT, RATE, Duration::from_secs(20))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let text = lab
        .config_text(Gw::A)
        .replace("fec = \"10+2\"", "fec = \"4+1\"");
    assert!(text.contains("fec = \"4+1\""), "{text}");
    lab.write_config(Gw::A, &text).unwrap();
    lab.reload_gateway(Gw::A).unwrap();
    let mut now = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        now = code(&lab);
        if now == "4+1" {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let _ = sender.stop().unwrap();
    let report = receiver.finish(Duration::from_secs(3)).unwrap();
    lab::say(&format!(
        "REPORT fec reload code_after={now} lost={} cmd=\"cargo test --test netns_fec\"",
        report["lost"]
    ));
    assert_eq!(now, "4+1");
    assert_eq!(report["lost"].as_u64(), Some(0), "{report}");
    let s = lab.poll(Gw::A).unwrap();
    assert!(lab::path_active(&s, LabPath::Path1), "{s}");
}

/// Sixteen TCP streams on clean, unshaped paths, with `auto` on: the
/// gateways run at their CPU limit and their lanes fall out of step (the
/// far end sees a lane's later numbers before another's earlier ones), which
/// is reordering, not loss. `auto` must send (next to) no parity, and the
/// streams must keep their rate.
#[test]
fn auto_adds_no_parity_to_many_streams_on_clean_paths() {
    if !lab::test_gate(
        "auto_adds_no_parity_to_many_streams_on_clean_paths",
        &[("iperf3", "iperf3")],
    ) {
        return;
    }
    let _serial = serial();
    let lab = auto_lab("fecmany");
    std::thread::sleep(Duration::from_secs(2));
    let iperf = lab.start_iperf3(16, 8).unwrap();
    let codes = codes_each_second(&lab, 8);
    let mbit = iperf.finish().map_or(f64::NAN, |bps| bps / 1e6);
    let (a, b) = (lab.poll(Gw::A).unwrap(), lab.poll(Gw::B).unwrap());
    let parity = |s: &Value| fec_status(s)["parity_sent"].as_u64().unwrap_or(0);
    let data = |s: &Value| {
        LabPath::ALL
            .iter()
            .filter_map(|&p| lab::path_status(s, p)?.get("tx_packets")?.as_u64())
            .sum::<u64>()
    };
    let degradations: usize = Gw::ALL
        .iter()
        .map(|&gw| lab.log_tail(gw, 100_000).matches("path degraded").count())
        .sum();
    lab::say(&format!(
        "REPORT fec many_streams streams=16 tcp_mbit={mbit:.0} codes={codes:?} parity_sent_a={} of {} parity_sent_b={} of {} degradations={degradations} cmd=\"cargo test --test netns_fec\"",
        parity(&a),
        data(&a),
        parity(&b),
        data(&b),
    ));
    assert!(mbit > 100.0, "the streams ran: {mbit} Mbit/s");
    let coded = codes.iter().filter(|c| c.as_str() != "none").count();
    assert!(coded <= 2, "auto coded clean paths: {codes:?}");
    // The streams' direction: no parity. The ACK direction (gateway B,
    // its lanes idle while A's are at their CPU limit) still reads a late
    // lane as loss now and then (5 % parity once in about ten runs): a
    // known limit, bounded here, not hidden.
    for (gw, s, most_pct) in [(Gw::A, &a, 1), (Gw::B, &b, 10)] {
        assert!(
            parity(s) * 100 <= data(s).max(1) * most_pct,
            "{gw}: parity on clean paths: {} of {} datagrams",
            parity(s),
            data(s)
        );
    }
}
