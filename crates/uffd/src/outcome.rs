//! What a resolving ioctl did, normalised from the kernel's several encodings.

use crate::error::Errno;

/// The result of one resolving ioctl (`COPY`, `ZEROPAGE`, `CONTINUE`,
/// `POISON`, `MOVE`, `WRITEPROTECT`): what happened and so what to do next.
///
/// The kernel reports progress in the request's result field and the
/// outcome in the errno, with several encodings for the same situation; this
/// enum is the one place they are told apart:
///
/// | errno  | result field            | outcome                      |
/// |--------|-------------------------|------------------------------|
/// | none   | `len`                   | [`Outcome::Complete`]        |
/// | EAGAIN | `0 < n < len`           | [`Outcome::Partial`]         |
/// | EAGAIN | `0` (untouched) or `-EAGAIN` | [`Outcome::RetryAfterEvents`] |
/// | EEXIST | `-EEXIST`               | [`Outcome::AlreadyPresent`]  |
/// | ESRCH  | untouched               | [`Outcome::TargetGone`]      |
///
/// Any other errno is an [`crate::Error::Ioctl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "an outcome says whether the range was resolved; ignoring it can hang a faulting thread"]
pub enum Outcome {
    /// The whole range was resolved (and woken unless DONTWAKE was asked).
    Complete {
        /// The length of the range.
        bytes: u64,
    },
    /// The first `bytes` were resolved (and woken unless DONTWAKE); the
    /// kernel stopped before the end. Continue from `start + bytes`.
    Partial {
        /// How much was resolved.
        bytes: u64,
    },
    /// Nothing was done because a non-cooperative event (REMOVE, REMAP,
    /// UNMAP, FORK) is queued and unread. Read and apply the events, then
    /// retry the same request.
    RetryAfterEvents,
    /// The first page of the range is already populated. The faulting thread
    /// may still be asleep: wake the range (see [`crate::Uffd::wake`]).
    AlreadyPresent,
    /// The process that owns the memory has exited.
    TargetGone,
}

impl Outcome {
    /// Decodes an ioctl's errno and result field for a request of `len` bytes.
    ///
    /// `field` is the value of the result field after the call, which the
    /// caller must have initialised to 0 beforehand so that "untouched" reads
    /// as 0.
    pub fn from_kernel(result: Result<(), Errno>, field: i64, len: u64) -> Result<Outcome, Errno> {
        match result {
            Ok(()) => Ok(Outcome::Complete { bytes: len }),
            Err(Errno::AGAIN) => match u64::try_from(field) {
                Ok(done) if done > 0 && done < len => Ok(Outcome::Partial { bytes: done }),
                // A count of len with EAGAIN does not happen; treat it as done
                // rather than loop.
                Ok(done) if done >= len && len > 0 => Ok(Outcome::Complete { bytes: len }),
                _ => Ok(Outcome::RetryAfterEvents),
            },
            Err(Errno::EXIST) => Ok(Outcome::AlreadyPresent),
            Err(Errno::SRCH) => Ok(Outcome::TargetGone),
            Err(errno) => Err(errno),
        }
    }

    /// Bytes resolved by this call.
    pub fn bytes(self) -> u64 {
        match self {
            Outcome::Complete { bytes } | Outcome::Partial { bytes } => bytes,
            _ => 0,
        }
    }
}

/// The result of resolving a whole range with the `*_all` helpers of
/// [`crate::Uffd`]: they continue after partial progress, skip (and wake)
/// pages that are already present, and stop at the first pending event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a resolution may ask the caller to drain events and call again"]
pub enum Resolved {
    /// Every page in the range is present now.
    Complete {
        /// Bytes this call installed.
        installed: u64,
        /// Bytes that were present already (those pages were woken).
        existing: u64,
    },
    /// A non-cooperative event is pending. Read and apply events, then call
    /// again for the rest of the range, starting at `start + done`.
    RetryAfterEvents {
        /// Bytes of the range dealt with (installed or already present).
        done: u64,
    },
    /// The process that owns the memory has exited.
    TargetGone,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: u64 = 4 * 4096;

    #[test]
    fn success_is_complete() {
        assert_eq!(
            Outcome::from_kernel(Ok(()), LEN as i64, LEN),
            Ok(Outcome::Complete { bytes: LEN })
        );
    }

    #[test]
    fn eagain_in_all_three_encodings() {
        // 1. Early mmap_changing check: the field is never written.
        assert_eq!(
            Outcome::from_kernel(Err(Errno::AGAIN), 0, LEN),
            Ok(Outcome::RetryAfterEvents)
        );
        // 2. The fill loop saw mmap_changing: the field holds -EAGAIN.
        assert_eq!(
            Outcome::from_kernel(
                Err(Errno::AGAIN),
                -i64::from(Errno::AGAIN.raw_os_error()),
                LEN
            ),
            Ok(Outcome::RetryAfterEvents)
        );
        // 3. Some pages were done before the kernel stopped.
        assert_eq!(
            Outcome::from_kernel(Err(Errno::AGAIN), 8192, LEN),
            Ok(Outcome::Partial { bytes: 8192 })
        );
    }

    #[test]
    fn negative_fields_never_become_huge_counts() {
        for errno in [Errno::EXIST, Errno::AGAIN, Errno::NOENT, Errno::FAULT] {
            let field = -i64::from(errno.raw_os_error());
            if let Ok(outcome) = Outcome::from_kernel(Err(errno), field, LEN) {
                assert!(outcome.bytes() <= LEN, "{errno:?} gave {outcome:?}");
            }
        }
    }

    #[test]
    fn eexist_esrch_and_errors() {
        assert_eq!(
            Outcome::from_kernel(Err(Errno::EXIST), -17, LEN),
            Ok(Outcome::AlreadyPresent)
        );
        assert_eq!(
            Outcome::from_kernel(Err(Errno::SRCH), 0, LEN),
            Ok(Outcome::TargetGone)
        );
        assert_eq!(
            Outcome::from_kernel(Err(Errno::NOENT), -2, LEN),
            Err(Errno::NOENT)
        );
        assert_eq!(
            Outcome::from_kernel(Err(Errno::FAULT), -14, LEN),
            Err(Errno::FAULT)
        );
    }

    #[test]
    fn bytes_of_each_outcome() {
        assert_eq!(Outcome::Partial { bytes: 3 }.bytes(), 3);
        assert_eq!(Outcome::RetryAfterEvents.bytes(), 0);
        assert_eq!(Outcome::AlreadyPresent.bytes(), 0);
        assert_eq!(Outcome::TargetGone.bytes(), 0);
    }
}
