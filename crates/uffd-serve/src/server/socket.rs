//! The socket paths the server owns: never removing anything but a stale
//! socket of its own kind, and only its own socket at exit.

use super::*;

/// Binds `<socket>.takeover`, replacing a stale one.
pub(super) fn bind_takeover(socket: &Path) -> Result<OwnedFd, ServerError> {
    let path = takeover::takeover_path(socket);
    remove_stale_socket(&path)?;
    takeover::listen(&path).map_err(|source| ServerError::Bind { path, source })
}

/// Removes a socket file left by a server that died, so that binding can
/// succeed. Only a socket that nobody answers on is removed; anything else
/// at the path (a file, a directory, a live server's socket) is refused.
pub(super) fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let file_type = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !file_type.is_socket() {
        let what = if file_type.is_file() {
            "a regular file"
        } else if file_type.is_dir() {
            "a directory"
        } else if file_type.is_symlink() {
            "a symbolic link"
        } else {
            "a special file"
        };
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
            what,
        });
    }
    let answers = match UnixStream::connect(path) {
        Ok(_) => true,
        // A SOCK_SEQPACKET socket (a takeover socket) refuses a stream.
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => takeover::connect(path).is_ok(),
        Err(_) => false,
    };
    if answers {
        return Err(ServerError::InUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes the socket this server listened on, and nothing else: if the
/// path was replaced by something other than a socket meanwhile, it stays.
pub(super) fn remove_own_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}
