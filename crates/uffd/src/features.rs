//! Feature bits, register modes and ioctl masks, with the kernel's names.

use core::fmt;

use crate::sys;

bitflags::bitflags! {
    /// `UFFD_FEATURE_*`: what a userfaultfd can report or do.
    ///
    /// Request features with [`crate::OpenOptions::features`]; learn what the
    /// kernel supports with [`crate::probe`]. Display prints the kernel's
    /// names (without the `UFFD_FEATURE_` prefix) joined by `|`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Write-protect faults are reported (Linux 5.7).
        const PAGEFAULT_FLAG_WP = 1 << 0;
        /// A fork of the registered process delivers a new uffd for the child
        /// (Linux 4.11). Needs CAP_SYS_PTRACE.
        const EVENT_FORK = 1 << 1;
        /// `mremap` of a registered range is reported (Linux 4.11).
        const EVENT_REMAP = 1 << 2;
        /// `MADV_REMOVE`/`MADV_DONTNEED` of a registered range is reported (Linux 4.11).
        const EVENT_REMOVE = 1 << 3;
        /// Missing faults on hugetlbfs (Linux 4.11).
        const MISSING_HUGETLBFS = 1 << 4;
        /// Missing faults on shmem (Linux 4.11).
        const MISSING_SHMEM = 1 << 5;
        /// `munmap` of a registered range is reported (Linux 4.11).
        const EVENT_UNMAP = 1 << 6;
        /// Faults raise SIGBUS in the faulting thread instead of a message (Linux 4.14).
        const SIGBUS = 1 << 7;
        /// Page-fault messages carry the faulting thread's id (Linux 4.14).
        const THREAD_ID = 1 << 8;
        /// Minor faults on hugetlbfs (Linux 5.13).
        const MINOR_HUGETLBFS = 1 << 9;
        /// Minor faults on shmem (Linux 5.14).
        const MINOR_SHMEM = 1 << 10;
        /// Fault addresses are not masked to the page (Linux 5.18).
        const EXACT_ADDRESS = 1 << 11;
        /// Write-protect on hugetlbfs and shmem (Linux 5.19).
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        /// Write-protect markers on unpopulated anonymous PTEs (Linux 6.4).
        const WP_UNPOPULATED = 1 << 13;
        /// `UFFDIO_POISON` (Linux 6.6).
        const POISON = 1 << 14;
        /// Write-protect resolved by the kernel without messages (Linux 6.7).
        const WP_ASYNC = 1 << 15;
        /// `UFFDIO_MOVE` (Linux 6.8).
        const MOVE = 1 << 16;
    }
}

/// The kernel's names for each feature bit, in bit order.
const FEATURE_NAMES: [(Features, &str); 17] = [
    (Features::PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (Features::EVENT_FORK, "EVENT_FORK"),
    (Features::EVENT_REMAP, "EVENT_REMAP"),
    (Features::EVENT_REMOVE, "EVENT_REMOVE"),
    (Features::MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (Features::MISSING_SHMEM, "MISSING_SHMEM"),
    (Features::EVENT_UNMAP, "EVENT_UNMAP"),
    (Features::SIGBUS, "SIGBUS"),
    (Features::THREAD_ID, "THREAD_ID"),
    (Features::MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (Features::MINOR_SHMEM, "MINOR_SHMEM"),
    (Features::EXACT_ADDRESS, "EXACT_ADDRESS"),
    (Features::WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (Features::WP_UNPOPULATED, "WP_UNPOPULATED"),
    (Features::POISON, "POISON"),
    (Features::WP_ASYNC, "WP_ASYNC"),
    (Features::MOVE, "MOVE"),
];

impl Features {
    /// Every feature this crate knows, with the kernel's name, in bit order.
    pub fn named() -> impl Iterator<Item = (Features, &'static str)> {
        FEATURE_NAMES.iter().copied()
    }

    /// The kernel's name of a single feature bit, `None` for a set of several
    /// bits or an unknown bit.
    pub fn name(self) -> Option<&'static str> {
        FEATURE_NAMES
            .iter()
            .find(|(f, _)| *f == self)
            .map(|(_, name)| *name)
    }

    /// Looks a feature up by the kernel's name, with or without the
    /// `UFFD_FEATURE_` prefix, ignoring case.
    pub fn from_kernel_name(name: &str) -> Option<Features> {
        let name = name.trim();
        let bare = name
            .get(..13)
            .filter(|p| p.eq_ignore_ascii_case("UFFD_FEATURE_"))
            .map_or(name, |_| &name[13..]);
        FEATURE_NAMES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(bare))
            .map(|(f, _)| *f)
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_names(
            f,
            self.bits(),
            FEATURE_NAMES.iter().map(|(b, n)| (b.bits(), *n)),
        )
    }
}

bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults a registered range reports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct RegisterMode: u64 {
        /// Faults on pages that are not present.
        const MISSING = sys::UFFDIO_REGISTER_MODE_MISSING;
        /// Writes to write-protected pages.
        const WP = sys::UFFDIO_REGISTER_MODE_WP;
        /// Faults on pages present in the page cache but not mapped (shmem, hugetlbfs).
        const MINOR = sys::UFFDIO_REGISTER_MODE_MINOR;
    }
}

impl fmt::Display for RegisterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::MISSING.bits(), "MISSING"),
            (Self::WP.bits(), "WP"),
            (Self::MINOR.bits(), "MINOR"),
        ];
        write_names(f, self.bits(), names.into_iter())
    }
}

bitflags::bitflags! {
    /// A mask of ioctls, as `UFFDIO_API` and `UFFDIO_REGISTER` report them:
    /// bit `n` is the ioctl whose request number is `n`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`
        const REGISTER = 1 << sys::NR_REGISTER;
        /// `UFFDIO_UNREGISTER`
        const UNREGISTER = 1 << sys::NR_UNREGISTER;
        /// `UFFDIO_WAKE`
        const WAKE = 1 << sys::NR_WAKE;
        /// `UFFDIO_COPY`
        const COPY = 1 << sys::NR_COPY;
        /// `UFFDIO_ZEROPAGE`
        const ZEROPAGE = 1 << sys::NR_ZEROPAGE;
        /// `UFFDIO_MOVE`
        const MOVE = 1 << sys::NR_MOVE;
        /// `UFFDIO_WRITEPROTECT`
        const WRITEPROTECT = 1 << sys::NR_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`
        const CONTINUE = 1 << sys::NR_CONTINUE;
        /// `UFFDIO_POISON`
        const POISON = 1 << sys::NR_POISON;
        /// `UFFDIO_API`
        const API = 1 << sys::NR_API;
    }
}

const IOCTL_NAMES: [(Ioctls, &str); 10] = [
    (Ioctls::API, "API"),
    (Ioctls::REGISTER, "REGISTER"),
    (Ioctls::UNREGISTER, "UNREGISTER"),
    (Ioctls::WAKE, "WAKE"),
    (Ioctls::COPY, "COPY"),
    (Ioctls::ZEROPAGE, "ZEROPAGE"),
    (Ioctls::MOVE, "MOVE"),
    (Ioctls::WRITEPROTECT, "WRITEPROTECT"),
    (Ioctls::CONTINUE, "CONTINUE"),
    (Ioctls::POISON, "POISON"),
];

impl Ioctls {
    /// The names (without `UFFDIO_`) of the ioctls in this mask.
    pub fn names(self) -> Vec<&'static str> {
        IOCTL_NAMES
            .iter()
            .filter(|(i, _)| self.contains(*i))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl fmt::Display for Ioctls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_names(
            f,
            self.bits(),
            IOCTL_NAMES.iter().map(|(b, n)| (b.bits(), *n)),
        )
    }
}

/// Writes `A|B|0x40` for the named bits set in `bits` and any unnamed rest.
fn write_names(
    f: &mut fmt::Formatter<'_>,
    bits: u64,
    names: impl Iterator<Item = (u64, &'static str)>,
) -> fmt::Result {
    let mut rest = bits;
    let mut first = true;
    for (bit, name) in names {
        if bits & bit != 0 {
            if !first {
                f.write_str("|")?;
            }
            f.write_str(name)?;
            first = false;
            rest &= !bit;
        }
    }
    if rest != 0 {
        if !first {
            f.write_str("|")?;
        }
        write!(f, "{rest:#x}")?;
    } else if first {
        f.write_str("(none)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seventeen_features_with_distinct_bits_in_order() {
        let all: Vec<_> = Features::named().collect();
        assert_eq!(all.len(), 17);
        for (i, (f, _)) in all.iter().enumerate() {
            assert_eq!(f.bits(), 1 << i);
        }
        assert_eq!(Features::all().bits(), (1 << 17) - 1);
    }

    #[test]
    fn features_match_linux_raw_sys() {
        use linux_raw_sys::general as g;
        assert_eq!(Features::MOVE.bits(), u64::from(g::UFFD_FEATURE_MOVE));
        assert_eq!(
            Features::WP_ASYNC.bits(),
            u64::from(g::UFFD_FEATURE_WP_ASYNC)
        );
        assert_eq!(Features::POISON.bits(), u64::from(g::UFFD_FEATURE_POISON));
        assert_eq!(Features::SIGBUS.bits(), u64::from(g::UFFD_FEATURE_SIGBUS));
        assert_eq!(
            Features::MINOR_SHMEM.bits(),
            u64::from(g::UFFD_FEATURE_MINOR_SHMEM)
        );
    }

    #[test]
    fn names_round_trip() {
        for (f, name) in Features::named() {
            assert_eq!(f.name(), Some(name));
            assert_eq!(Features::from_kernel_name(name), Some(f));
            assert_eq!(
                Features::from_kernel_name(&format!("UFFD_FEATURE_{name}")),
                Some(f)
            );
            assert_eq!(Features::from_kernel_name(&name.to_lowercase()), Some(f));
        }
        assert_eq!(Features::from_kernel_name("NOPE"), None);
        assert_eq!((Features::MOVE | Features::SIGBUS).name(), None);
    }

    #[test]
    fn display_lists_names_and_unknown_bits() {
        assert_eq!(
            (Features::MOVE | Features::SIGBUS).to_string(),
            "SIGBUS|MOVE"
        );
        assert_eq!(Features::empty().to_string(), "(none)");
        assert_eq!(
            Features::from_bits_retain(Features::POISON.bits() | 1 << 40).to_string(),
            "POISON|0x10000000000"
        );
        assert_eq!((Ioctls::COPY | Ioctls::WAKE).to_string(), "WAKE|COPY");
        assert_eq!(
            (RegisterMode::MISSING | RegisterMode::WP).to_string(),
            "MISSING|WP"
        );
    }

    #[test]
    fn ioctl_bits_are_request_numbers() {
        assert_eq!(Ioctls::API.bits(), 1 << 0x3F);
        assert_eq!(Ioctls::POISON.bits(), 1 << 8);
        assert_eq!(
            (Ioctls::COPY | Ioctls::CONTINUE).names(),
            vec!["COPY", "CONTINUE"]
        );
    }
}
