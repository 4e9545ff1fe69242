//! The client listener's Unix-domain socket (`proxy.unix_socket_dir`).
//!
//! The socket is named as PostgreSQL names its own, `.s.PGSQL.<port>`, so
//! libpq and every driver that takes a socket directory as the host find
//! it. A file left by a pgnear that did not shut down is replaced; a
//! socket that another server still answers on is not, and neither is
//! a file that is not a socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// A bound socket; its file is removed when this is dropped.
#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UnixSocket {
    /// Binds `path` with permission bits `mode`.
    pub fn bind(path: &Path, mode: u32) -> io::Result<UnixSocket> {
        clear_stale(path)?;
        let listener = UnixListener::bind(path)?;
        // From here on the file is ours, and dropping the socket removes it.
        let socket = UnixSocket { listener, path: path.to_path_buf() };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes a socket file nobody answers on; refuses a live socket or a
/// file of another kind.
fn clear_stale(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, "another server is listening on this socket")),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgnear-unix-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[tokio::test]
    async fn binds_with_its_mode_and_removes_its_file_when_dropped() {
        let dir = scratch("mode");
        let path = dir.join(".s.PGSQL.6432");
        let socket = UnixSocket::bind(&path, 0o660).expect("bind");
        let mode = std::fs::metadata(&path).expect("socket file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(socket);
        assert!(!path.exists(), "the socket file is removed");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[tokio::test]
    async fn replaces_a_dead_socket_but_not_a_live_one_or_another_file() {
        let dir = scratch("stale");
        let path = dir.join(".s.PGSQL.6432");
        // A socket file whose server is gone: bound, then its listener
        // dropped without removing the file.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind the stale socket"));
        assert!(path.exists());
        let live = UnixSocket::bind(&path, 0o777).expect("a stale socket is replaced");
        let error = UnixSocket::bind(&path, 0o777).expect_err("a live socket is kept");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse, "{error}");
        assert!(path.exists(), "the live socket's file is left alone");
        drop(live);

        std::fs::write(&path, "not a socket").expect("a plain file");
        let error = UnixSocket::bind(&path, 0o777).expect_err("a plain file is kept");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists, "{error}");
        assert_eq!(std::fs::read_to_string(&path).expect("the file"), "not a socket");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
