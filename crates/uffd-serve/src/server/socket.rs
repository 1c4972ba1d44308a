//! The socket paths the server owns: never removing anything but a stale
//! socket of its own kind, and only its own socket at exit.

use super::*;

/// Binds `<socket>.takeover`, replacing a stale one.
pub(super) fn bind_takeover(socket: &Path) -> Result<OwnedFd, ServerError> {
    let path = takeover::takeover_path(socket);
    remove_stale_socket(&path)?;
    listen_then_publish(&path, takeover::listen)
        .map_err(|source| ServerError::Bind { path, source })
}

/// Binds and listens at a name of its own beside `path`, and only then
/// links the socket to `path`. A socket is bound before it listens, and a
/// client connecting in between is refused (ECONNREFUSED): one that
/// connects as soon as the path appears, as an orchestrator that waits
/// for the file and then starts the VMM does, failed about 1 time in 50
/// here. The link fails if something appeared at `path` meanwhile.
pub(super) fn listen_then_publish<T>(
    path: &Path,
    listen: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".{}.new", std::process::id()));
    let staged = PathBuf::from(staged);
    // A socket address holds at most 107 bytes of path: where the longer
    // name does not fit, bind in place as before.
    if staged.as_os_str().len() > 107 {
        return listen(path);
    }
    // Left by an earlier process with this pid that died here.
    remove_own_socket(&staged);
    let listening = listen(&staged).inspect_err(|_| remove_own_socket(&staged))?;
    let published = std::fs::hard_link(&staged, path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another socket was bound at this path meanwhile",
            )
        } else {
            e
        }
    });
    let _ = std::fs::remove_file(&staged);
    published.map(|()| listening)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

    /// Binds at `at`, waits, then listens: the window a client must never
    /// see.
    fn slow_listen(at: &Path) -> std::io::Result<OwnedFd> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(at)?)?;
        std::thread::sleep(Duration::from_millis(50));
        rustix::net::listen(&fd, 8)?;
        Ok(fd)
    }

    #[test]
    fn a_client_that_connects_when_the_path_appears_is_never_refused() {
        let dir = uffd_testkit::Scratch::new("publish");
        let path = dir.path("sock");
        let watcher = {
            let path = path.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !path.exists() {
                    assert!(Instant::now() < deadline, "the socket never appeared");
                    std::hint::spin_loop();
                }
                UnixStream::connect(&path).map(drop)
            })
        };
        let _listening = listen_then_publish(&path, slow_listen).unwrap();
        watcher
            .join()
            .unwrap()
            .expect("connected as soon as it appeared");
        // Only the published name is left.
        let names: Vec<_> = std::fs::read_dir(dir.dir()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn publishing_over_a_socket_that_appeared_meanwhile_fails_and_leaves_it() {
        let dir = uffd_testkit::Scratch::new("publish-taken");
        let path = dir.path("sock");
        let other = UnixListener::bind(&path).unwrap();
        let err = listen_then_publish(&path, slow_listen).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        // The other socket still answers; the staged name is gone.
        UnixStream::connect(&path).unwrap();
        drop(other);
        assert_eq!(std::fs::read_dir(dir.dir()).unwrap().count(), 1);
    }

    #[test]
    fn a_path_with_no_room_for_the_staged_name_is_bound_in_place() {
        let dir = uffd_testkit::Scratch::new("publish-long");
        let room = 107 - dir.dir().as_os_str().len() - 1;
        let path = dir.path(&"s".repeat(room));
        assert_eq!(path.as_os_str().len(), 107);
        let _listening = listen_then_publish(&path, slow_listen).unwrap();
        UnixStream::connect(&path).unwrap();
    }
}
