//! The `UFFDIO_API` handshake (`test_uffd_api`), through each open path.

use uffd::{sys, OpenPath};

use crate::harness::{CaseResult, Env};
use crate::{ensure, fail, skip};

/// The handshake through `userfaultfd(2)`.
pub fn via_syscall(_env: &Env) -> CaseResult {
    handshake(OpenPath::Syscall)
}

/// The handshake through `/dev/userfaultfd`.
pub fn via_dev(_env: &Env) -> CaseResult {
    handshake(OpenPath::DevNode)
}

/// On one fd: api 0xAB fails, feature bit 63 fails, a normal handshake
/// succeeds (the two failures must not have used up the one-shot API), a
/// second handshake fails.
fn handshake(path: OpenPath) -> CaseResult {
    let flags = (rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NONBLOCK).bits()
        | sys::UFFD_USER_MODE_ONLY;
    let fd = match uffd::open_with(path, flags) {
        Ok(fd) => fd,
        Err(errno) => skip!("cannot open a userfaultfd through {path}: {errno}"),
    };
    let mut arg = sys::uffdio_api {
        api: 0xAB,
        features: 0,
        ioctls: 0,
    };
    ensure!(
        uffd::raw_api(&fd, &mut arg).is_err(),
        "UFFDIO_API with api 0xAB succeeded"
    );
    let mut arg = sys::uffdio_api {
        api: sys::UFFD_API,
        features: 1 << 63,
        ioctls: 0,
    };
    ensure!(
        uffd::raw_api(&fd, &mut arg).is_err(),
        "UFFDIO_API with feature bit 63 succeeded"
    );
    let mut arg = sys::uffdio_api {
        api: sys::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    if let Err(errno) = uffd::raw_api(&fd, &mut arg) {
        fail!("a normal UFFDIO_API after two refused ones failed: {errno}");
    }
    let mut again = sys::uffdio_api {
        api: sys::UFFD_API,
        features: 1,
        ioctls: 0,
    };
    ensure!(
        uffd::raw_api(&fd, &mut again).is_err(),
        "a second UFFDIO_API on an initialised userfaultfd succeeded"
    );
    Ok(format!(
        "{path}: bad api and bit 63 refused, handshake ok (features {:#x}), second handshake refused",
        arg.features
    ))
}
