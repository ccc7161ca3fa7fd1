//! The control socket: a Unix stream socket (mode 0600) where each
//! connection sends one request line and reads one JSON answer.
//!
//! Requests: `status`. The answer is the [`Status`] document.
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

/// Serves requests until the task is dropped; `status` produces the answer.
pub async fn serve<F, Fut>(listener: UnixListener, status: F)
where
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
        tokio::spawn(async move {
            let _permit = permit;
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(rd.take(MAX_REQUEST as u64));
            let read =
                tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await;
            let answer = match (read, line.trim()) {
                (Ok(Ok(_)), "status") => match status().await {
                    Some(s) => serde_json::to_string(&s).unwrap_or_default(),
                    None => r#"{"error":"daemon is shutting down"}"#.to_string(),
                },
                _ => r#"{"error":"unknown request; try \"status\""}"#.to_string(),
            };
            let _ = wr.write_all(answer.as_bytes()).await;
            let _ = wr.write_all(b"\n").await;
            let _ = wr.shutdown().await;
        });
    }
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
