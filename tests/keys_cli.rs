//! `crosslink genkey` and `crosslink pubkey`, run as an operator would.

use std::io::Write;
use std::process::{Command, Stdio};

fn crosslink(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crosslink"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run crosslink");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn genkey_then_pubkey_gives_matching_base64_keys() {
    let (ok, private, _) = crosslink(&["genkey"], "");
    assert!(ok);
    let private = private.trim().to_string();
    assert_eq!(private.len(), 44, "{private}");
    let (ok2, other, _) = crosslink(&["genkey"], "");
    assert!(ok2);
    assert_ne!(other.trim(), private, "two runs drew the same key");
    let (ok, public, _) = crosslink(&["pubkey"], &format!("{private}\n"));
    assert!(ok);
    let public = public.trim();
    assert_eq!(public.len(), 44);
    assert_ne!(public, private);
    // The library agrees, and the public key parses as a peer's `public_key`.
    let key = crosslink::core::keypair::PrivateKey::parse(&private).expect("parses");
    assert_eq!(key.public().to_base64(), public);
    assert!(crosslink::core::keypair::PublicKey::parse(public).is_ok());
    // RFC 7748 section 6.1 (Bob): a fixed vector through the command.
    let (ok, public, _) = crosslink(
        &["pubkey"],
        "XasIfmJKikt54X+Lg4AO5m87sSkmGLb9HC+LJ/+I4Os=\n",
    );
    assert!(ok);
    assert_eq!(
        public.trim(),
        "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="
    );
}

#[test]
fn pubkey_refuses_junk_without_echoing_it() {
    let (ok, out, err) = crosslink(&["pubkey"], "secretsecret\n");
    assert!(!ok);
    assert!(out.is_empty());
    assert!(
        err.contains("44 characters") && !err.contains("secretsecret"),
        "{err}"
    );
}
