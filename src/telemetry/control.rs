//! The control socket: a Unix stream socket (mode 0600) where each
//! connection sends one request line and reads one JSON answer.
//!
//! Requests: `status`, whose answer is the [`Status`] document, and
//! `upgrade [BINARY]` (see [`crate::io::upgrade`]), answered with
//! `{"upgraded":{"pid":N,"handover_ms":F}}` once the new process serves,
//! or `{"error":"..."}` with this one still serving.
//!
//! Besides the file mode, every connection's peer credentials
//! (`SO_PEERCRED`) are checked: only root and the daemon's own user are
//! answered, so a socket file made reachable by mistake (a permissive
//! directory, a bind mount) still leaks nothing. At most
//! [`MAX_CLIENTS`] connections are served at a time; more wait in the
//! listen backlog.

use super::status::Status;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Longest request line accepted.
const MAX_REQUEST: usize = 256;
/// Connections served at once.
pub const MAX_CLIENTS: usize = 16;

/// Whether a client with user id `uid` may use the socket of a daemon
/// running as `own`.
pub fn allowed(uid: u32, own: Option<u32>) -> bool {
    uid == 0 || Some(uid) == own
}

/// Binds the control socket, replacing a stale one, with mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running crosslink", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// `upgrade`, passed on to the daemon's main task.
pub struct UpgradeRequest {
    /// The binary to start (`None`: the daemon's own).
    pub binary: Option<PathBuf>,
    /// The new process's pid and how long nobody read, or why not.
    pub reply: tokio::sync::oneshot::Sender<Result<(u32, Duration), String>>,
}

/// The answer to `upgrade`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Upgraded {
    pub pid: u32,
    pub handover_ms: f64,
}

/// Serves requests until the task is dropped; `status` produces the
/// answer; `upgrade` requests go to `upgrades` (refused without it).
pub async fn serve<F, Fut>(
    listener: UnixListener,
    status: F,
    upgrades: Option<tokio::sync::mpsc::Sender<UpgradeRequest>>,
) where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<Status>> + Send,
{
    let own = own_uid();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        match stream.peer_cred() {
            Ok(cred) if allowed(cred.uid(), own) => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    "control socket: refused a client of another user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: no peer credentials; refused");
                continue;
            }
        }
        let status = status.clone();
        let upgrades = upgrades.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(rd.take(MAX_REQUEST as u64));
            let read =
                tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await;
            let request = line.trim();
            let upgrade = request
                .strip_prefix("upgrade")
                .filter(|rest| rest.is_empty() || rest.starts_with(' '))
                .map(str::trim);
            let answer = match (read, request, upgrade) {
                (Ok(Ok(_)), "status", _) => match status().await {
                    Some(s) => serde_json::to_string(&s).unwrap_or_default(),
                    None => r#"{"error":"daemon is shutting down"}"#.to_string(),
                },
                (Ok(Ok(_)), _, Some(binary)) => upgrade_answer(upgrades, binary).await,
                _ => r#"{"error":"unknown request; try \"status\""}"#.to_string(),
            };
            let _ = wr.write_all(answer.as_bytes()).await;
            let _ = wr.write_all(b"\n").await;
            let _ = wr.shutdown().await;
        });
    }
}

/// Runs an `upgrade` request through the daemon's main task.
async fn upgrade_answer(
    upgrades: Option<tokio::sync::mpsc::Sender<UpgradeRequest>>,
    binary: &str,
) -> String {
    let error = |e: &str| serde_json::json!({ "error": e }).to_string();
    let Some(upgrades) = upgrades else {
        return error("this daemon cannot upgrade");
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let req = UpgradeRequest {
        binary: (!binary.is_empty()).then(|| PathBuf::from(binary)),
        reply,
    };
    if upgrades.send(req).await.is_err() {
        return error("daemon is shutting down");
    }
    match answer.await {
        Ok(Ok((pid, took))) => serde_json::json!({
            "upgraded": Upgraded { pid, handover_ms: took.as_secs_f64() * 1e3 }
        })
        .to_string(),
        Ok(Err(e)) => error(&e),
        Err(_) => error("daemon is shutting down"),
    }
}

/// Asks a running daemon to hand over to a new process started from
/// `binary` (its own binary if `None`); the new process's pid and handover
/// time, or the daemon's reason for still serving.
pub fn request_upgrade(path: &Path, binary: Option<&Path>) -> io::Result<Upgraded> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach crosslink at {}: {e} (is the daemon running?)",
                path.display()
            ),
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(90)))?;
    let request = match binary {
        Some(b) => format!("upgrade {}\n", b.display()),
        None => "upgrade\n".to_string(),
    };
    if request.len() > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the binary's path is too long",
        ));
    }
    stream.write_all(request.as_bytes())?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unexpected answer from {}: {e}: {}",
                path.display(),
                body.trim()
            ),
        )
    })?;
    if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
        return Err(io::Error::other(format!(
            "upgrade failed; the running daemon still serves: {e}"
        )));
    }
    v.get("upgraded")
        .cloned()
        .and_then(|u| serde_json::from_value(u).ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer from {}: {}", path.display(), body.trim()),
            )
        })
}

/// Asks a running daemon for its status.
pub fn request_status(path: &Path) -> io::Result<Status> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach crosslink at {}: {e} (is the daemon running?)",
                path.display()
            ),
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"status\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    serde_json::from_str(&body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unexpected answer from {}: {e}: {}",
                path.display(),
                body.trim()
            ),
        )
    })
}

/// The daemon's effective user id: the owner of its /proc entry.
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The default socket path.
pub fn default_path() -> PathBuf {
    PathBuf::from("/run/crosslink/crosslink.sock")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_root_and_own_user() {
        use super::allowed;
        assert!(allowed(0, Some(1000)));
        assert!(allowed(1000, Some(1000)));
        assert!(!allowed(1001, Some(1000)));
        assert!(!allowed(1001, None));
        assert!(allowed(0, None));
    }
}
