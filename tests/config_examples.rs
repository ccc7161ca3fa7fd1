//! Every example under `configs/` must parse and validate, so the examples never rot.

use std::path::{Path, PathBuf};

use crosslink::config::Config;

fn example_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_parses() {
    let files = example_files();
    assert!(
        files.len() >= 3,
        "expected at least 3 example configs, found {files:?}"
    );
    let mut failures = Vec::new();
    for file in &files {
        match Config::load(file) {
            Ok(config) => {
                assert!(!config.peers.is_empty(), "{}: no peers", file.display());
                assert!(!config.summary().is_empty());
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "invalid example configs:\n{}",
        failures.join("\n")
    );
}

#[test]
fn two_path_examples_mirror_each_other() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let (Ok(a), Ok(b)) = (
        Config::load(&dir.join("two-path-a.toml")),
        Config::load(&dir.join("two-path-b.toml")),
    ) else {
        panic!("two-path-a.toml and two-path-b.toml must both parse");
    };
    let (Some(pa), Some(pb)) = (a.peers.first(), b.peers.first()) else {
        panic!("each two-path example needs a peer");
    };
    assert_eq!(pa.paths.len(), pb.paths.len());
    for (x, y) in pa.paths.iter().zip(&pb.paths) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.local, y.remote);
        assert_eq!(x.remote, y.local);
        assert_eq!(x.priority, y.priority);
    }
    assert_eq!(pa.routes.len(), 1);
    assert_eq!(pb.routes.len(), 1);
}

#[test]
fn cloud_failover_example_prefers_aws_and_backs_up_via_gcp() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let onprem = Config::load(&dir.join("cloud-onprem.toml")).expect("cloud-onprem.toml");
    let aws = onprem
        .peers
        .iter()
        .find(|p| p.name == "aws")
        .expect("aws peer");
    let gcp = onprem
        .peers
        .iter()
        .find(|p| p.name == "gcp")
        .expect("gcp peer");
    assert_eq!(
        aws.routes, gcp.routes,
        "both clouds must route the same prefix"
    );
    assert!(aws.route_metric < gcp.route_metric);
    for (file, peer) in [("cloud-aws.toml", aws), ("cloud-gcp.toml", gcp)] {
        let far = Config::load(&dir.join(file)).expect(file);
        let back = &far.peers[0];
        for p in &peer.paths {
            let q = back.path(&p.name).expect("same path names at both ends");
            assert_eq!(
                (p.local, p.remote),
                (q.remote, q.local),
                "{file}: {}",
                p.name
            );
        }
    }
}

#[test]
fn mirrored_examples_mirror_each_other_and_nothing_is_warned_about() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    for (a, b) in [
        ("two-path-a.toml", "two-path-b.toml"),
        ("aws-gcp-aws.toml", "aws-gcp-gcp.toml"),
    ] {
        let load = |f: &str| Config::load(&dir.join(f)).unwrap_or_else(|e| panic!("{e}"));
        let (x, y) = (load(a), load(b));
        let both = crosslink::config::mirror::compare(&x, &y);
        assert!(both.is_empty(), "{a} vs {b}: {both:?}");
        assert!(crosslink::config::mirror::compare(&y, &x).is_empty());
    }
    for file in example_files() {
        let c = Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.warnings().is_empty(),
            "{}: {:?}",
            file.display(),
            c.warnings()
        );
    }
    // The cloud example: the VPN fallback path is checked more slowly, and
    // the inner MTU fits the smallest path (the VPN's 1399 bytes, sealed).
    let aws = Config::load(&dir.join("aws-gcp-aws.toml")).unwrap_or_else(|e| panic!("{e}"));
    let peer = &aws.peers[0];
    let vpn = peer
        .paths
        .iter()
        .find(|p| p.name == "vpn")
        .expect("vpn path");
    assert!(vpn.bfd.tx_interval > peer.paths[0].bfd.tx_interval);
    assert_eq!(
        u32::from(peer.mtu.expect("mtu")),
        crosslink::core::forward::inner_mtu(1399, false, false, true, false)
    );
}
