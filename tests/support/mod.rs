//! Helpers shared by the netns operations tests (tests/prometheus.rs,
//! tests/reload.rs): the root check, a gateway this test owns, and HTTP
//! inside a lab namespace (curl).
#![allow(dead_code)]

pub use crosslink::lab::say;
use crosslink::lab::{self, Host, Lab};

/// True when the test can run (root); says why and returns false otherwise.
pub fn netns_allowed(test: &str) -> bool {
    lab::test_gate(test, &[])
}

/// Whether `tool` (from Debian `package`) is installed; see [`lab::tool_gate`].
pub fn tool_present(test: &str, tool: &str, package: &str) -> bool {
    lab::tool_gate(test, &[(tool, package)])
}
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_crosslink");

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Owned(pub Option<Child>);

impl Owned {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.0
            .take()
            .and_then(|mut c| lab::terminate(&mut c, Duration::from_secs(3)))
    }
    pub fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `program args` in `host`'s namespace, output to `log`.
pub fn spawn_in(lab: &Lab, host: Host, program: &str, args: &[&str], log: &str) -> Owned {
    spawn_in_env(lab, host, program, args, log, &[])
}

/// [`spawn_in`] with extra environment variables.
pub fn spawn_in_env(
    lab: &Lab,
    host: Host,
    program: &str,
    args: &[&str],
    log: &str,
    env: &[(&str, String)],
) -> Owned {
    let file = std::fs::File::create(lab.dir().join(log)).unwrap();
    let err = file.try_clone().unwrap();
    let mut cmd = lab.command_in(host, program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    Owned(Some(cmd.spawn().unwrap()))
}

/// `curl -sf URL` inside `host`'s namespace.
pub fn http_get(lab: &Lab, host: Host, url: &str) -> Option<String> {
    let out = lab
        .command_in(host, "curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` every 100 ms until it gives a value, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the first sample of `series` (name plus label matchers
/// in exposition order, e.g. `crosslink_path_up{peer="b",path="path1"}`).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}
