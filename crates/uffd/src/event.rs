//! Reading and decoding userfaultfd messages.

#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::error::{Errno, Error};
use crate::features::{Features, Ioctls};
use crate::sys;
use crate::uffd::Uffd;

bitflags::bitflags! {
    /// `UFFD_PAGEFAULT_FLAG_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PagefaultFlags: u64 {
        /// The access was a write.
        const WRITE = 1;
        /// The page is write-protected (a WP fault).
        const WP = 2;
        /// The page is in the page cache but not mapped (a minor fault).
        const MINOR = 4;
    }
}

/// Which kind of fault a page-fault message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The page is not present: resolve with COPY, ZEROPAGE, MOVE or POISON.
    Missing,
    /// A write to a write-protected page: resolve with WRITEPROTECT mode 0.
    WriteProtect,
    /// The page is in the page cache but not mapped: resolve with CONTINUE.
    Minor,
}

/// A page fault waiting to be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pagefault {
    /// The faulting address: page aligned unless EXACT_ADDRESS was enabled.
    pub address: u64,
    /// The raw flags.
    pub flags: PagefaultFlags,
    /// The faulting thread, when THREAD_ID was enabled.
    pub thread_id: Option<u32>,
}

impl Pagefault {
    /// What kind of fault this is.
    pub fn kind(&self) -> FaultKind {
        if self.flags.contains(PagefaultFlags::WP) {
            FaultKind::WriteProtect
        } else if self.flags.contains(PagefaultFlags::MINOR) {
            FaultKind::Minor
        } else {
            FaultKind::Missing
        }
    }

    /// Whether the access was a write.
    pub fn is_write(&self) -> bool {
        self.flags.contains(PagefaultFlags::WRITE)
    }

    /// The start of the page of size `page_size` holding the address.
    pub fn page(&self, page_size: u64) -> u64 {
        self.address & !(page_size - 1)
    }
}

/// One userfaultfd message, decoded. Owns any fd the kernel sent.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted and waits (`UFFD_EVENT_PAGEFAULT`).
    Pagefault(Pagefault),
    /// The registered process forked; `uffd` serves the child's copy of the
    /// registered ranges, with the parent's features (`UFFD_EVENT_FORK`).
    Fork {
        /// The child's userfaultfd, now owned by the reader.
        uffd: Uffd,
    },
    /// `mremap` moved a registered range (`UFFD_EVENT_REMAP`).
    Remap {
        /// The old start.
        from: u64,
        /// The new start.
        to: u64,
        /// The old length.
        len: u64,
    },
    /// `MADV_REMOVE`/`MADV_DONTNEED` dropped pages (`UFFD_EVENT_REMOVE`):
    /// they are missing again and read as zero if served by the kernel.
    Remove {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
    },
    /// `munmap` removed part of a registered range (`UFFD_EVENT_UNMAP`).
    Unmap {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
    },
    /// A message type this crate does not know (a newer kernel, or bytes
    /// that are not a message). Reported in its place among the others,
    /// never dropped; there is nothing to resolve.
    Unknown {
        /// The message's event byte.
        code: u8,
    },
}

/// A message as the kernel laid it out, with the fork fd still raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Message {
    Pagefault(Pagefault),
    Fork { fd: RawFd },
    Remap { from: u64, to: u64, len: u64 },
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
}

fn u64_at(raw: &[u8; sys::MSG_SIZE], offset: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&raw[offset..offset + 8]);
    u64::from_ne_bytes(bytes)
}

fn u32_at(raw: &[u8; sys::MSG_SIZE], offset: usize) -> u32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&raw[offset..offset + 4]);
    u32::from_ne_bytes(bytes)
}

/// Decodes one 32-byte `struct uffd_msg`: event at byte 0, the union at 8.
pub(crate) fn decode(raw: &[u8; sys::MSG_SIZE], features: Features) -> Result<Message, Error> {
    const ARG: usize = 8;
    Ok(match raw[0] {
        sys::UFFD_EVENT_PAGEFAULT => Message::Pagefault(Pagefault {
            flags: PagefaultFlags::from_bits_retain(u64_at(raw, ARG)),
            address: u64_at(raw, ARG + 8),
            thread_id: features
                .contains(Features::THREAD_ID)
                .then(|| u32_at(raw, ARG + 16)),
        }),
        sys::UFFD_EVENT_FORK => Message::Fork {
            fd: u32_at(raw, ARG) as RawFd,
        },
        sys::UFFD_EVENT_REMAP => Message::Remap {
            from: u64_at(raw, ARG),
            to: u64_at(raw, ARG + 8),
            len: u64_at(raw, ARG + 16),
        },
        sys::UFFD_EVENT_REMOVE => Message::Remove {
            start: u64_at(raw, ARG),
            end: u64_at(raw, ARG + 8),
        },
        sys::UFFD_EVENT_UNMAP => Message::Unmap {
            start: u64_at(raw, ARG),
            end: u64_at(raw, ARG + 8),
        },
        other => return Err(Error::UnknownEvent(other)),
    })
}

/// A reusable buffer for reading many messages with one `read(2)`.
#[derive(Debug)]
pub struct EventBuffer {
    raw: Vec<[u8; sys::MSG_SIZE]>,
    events: Vec<Event>,
}

impl Default for EventBuffer {
    fn default() -> Self {
        Self::new(64)
    }
}

impl EventBuffer {
    /// Room for `capacity` messages per read (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            raw: vec![[0; sys::MSG_SIZE]; capacity],
            events: Vec::with_capacity(capacity),
        }
    }

    /// How many messages one read can return.
    pub fn capacity(&self) -> usize {
        self.raw.len()
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn events_mut(&mut self) -> &mut Vec<Event> {
        &mut self.events
    }

    pub(crate) fn fill_from(&mut self, uffd: &Uffd) -> Result<&mut Vec<Event>, Error> {
        self.events.clear();
        let bytes: &mut [u8] = self.raw.as_flattened_mut();
        let n = loop {
            match rustix::io::read(uffd, &mut *bytes) {
                Ok(n) => break n,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(&mut self.events),
                Err(errno) => return Err(Error::Read(errno)),
            }
        };
        let count = n / sys::MSG_SIZE;
        decode_all(&self.raw[..count], uffd.features(), &mut self.events);
        Ok(&mut self.events)
    }
}

/// Decodes every message, in order: an unknown one is reported in its
/// place and the rest (a fork fd among them) still taken.
fn decode_all(raw: &[[u8; sys::MSG_SIZE]], features: Features, events: &mut Vec<Event>) {
    for raw in raw {
        events.push(match decode(raw, features) {
            Ok(message) => adopt(message, features),
            Err(Error::UnknownEvent(code)) => Event::Unknown { code },
            Err(_) => Event::Unknown { code: raw[0] },
        });
    }
}

/// Takes ownership of any fd in the message.
fn adopt(message: Message, features: Features) -> Event {
    match message {
        Message::Pagefault(fault) => Event::Pagefault(fault),
        Message::Fork { fd } => {
            // SAFETY: the kernel installed this fd in our table for the
            // reader of the FORK message, which is us, exactly once.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Event::Fork {
                uffd: Uffd::from_parts(
                    fd,
                    features,
                    Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER,
                    None,
                ),
            }
        }
        Message::Remap { from, to, len } => Event::Remap { from, to, len },
        Message::Remove { start, end } => Event::Remove { start, end },
        Message::Unmap { start, end } => Event::Unmap { start, end },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any 32 bytes the kernel (or a corrupted read) hands over decode
        /// to a message or to UnknownEvent, never a panic; the fields are
        /// the words at their offsets.
        #[test]
        fn any_message_decodes_or_is_unknown(
            raw in proptest::array::uniform32(proptest::prelude::any::<u8>()),
            thread_id in proptest::prelude::any::<bool>(),
        ) {
            let features = if thread_id { Features::THREAD_ID } else { Features::empty() };
            let word = |i: usize| u64::from_ne_bytes(raw[8 + 8 * i..16 + 8 * i].try_into().unwrap());
            match decode(&raw, features) {
                Ok(Message::Pagefault(f)) => {
                    proptest::prop_assert_eq!(raw[0], sys::UFFD_EVENT_PAGEFAULT);
                    proptest::prop_assert_eq!(f.address, word(1));
                    proptest::prop_assert_eq!(f.thread_id.is_some(), thread_id);
                    let _ = (f.kind(), f.page(4096), f.page(2 << 20));
                }
                Ok(Message::Remap { from, to, len }) => {
                    proptest::prop_assert_eq!((from, to, len), (word(0), word(1), word(2)));
                }
                Ok(Message::Remove { start, end } | Message::Unmap { start, end }) => {
                    proptest::prop_assert_eq!((start, end), (word(0), word(1)));
                }
                Ok(Message::Fork { .. }) => proptest::prop_assert_eq!(raw[0], sys::UFFD_EVENT_FORK),
                Err(Error::UnknownEvent(e)) => proptest::prop_assert_eq!(e, raw[0]),
                Err(other) => proptest::prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }

    fn msg(event: u8, words: [u64; 3]) -> [u8; 32] {
        let mut raw = [0u8; 32];
        raw[0] = event;
        for (i, w) in words.iter().enumerate() {
            raw[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        raw
    }

    #[test]
    fn pagefault_with_and_without_thread_id() {
        let raw = msg(0x12, [3, 0x7f00_0000_1234, 4242]);
        let m = decode(&raw, Features::THREAD_ID).unwrap();
        let Message::Pagefault(f) = m else {
            panic!("{m:?}")
        };
        assert_eq!(f.address, 0x7f00_0000_1234);
        assert_eq!(f.flags, PagefaultFlags::WRITE | PagefaultFlags::WP);
        assert_eq!(f.kind(), FaultKind::WriteProtect);
        assert!(f.is_write());
        assert_eq!(f.thread_id, Some(4242));
        assert_eq!(f.page(4096), 0x7f00_0000_1000);

        let Message::Pagefault(f) = decode(&raw, Features::empty()).unwrap() else {
            unreachable!()
        };
        assert_eq!(f.thread_id, None);
    }

    #[test]
    fn fault_kinds() {
        let kind = |flags| {
            let Message::Pagefault(f) =
                decode(&msg(0x12, [flags, 0, 0]), Features::empty()).unwrap()
            else {
                unreachable!()
            };
            f.kind()
        };
        assert_eq!(kind(0), FaultKind::Missing);
        assert_eq!(kind(1), FaultKind::Missing);
        assert_eq!(kind(4), FaultKind::Minor);
        assert_eq!(kind(2), FaultKind::WriteProtect);
    }

    #[test]
    fn non_cooperative_events() {
        assert_eq!(
            decode(&msg(0x13, [7, 0, 0]), Features::empty()).unwrap(),
            Message::Fork { fd: 7 }
        );
        assert_eq!(
            decode(&msg(0x14, [0x1000, 0x9000, 0x2000]), Features::empty()).unwrap(),
            Message::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        assert_eq!(
            decode(&msg(0x15, [0x1000, 0x3000, 0]), Features::empty()).unwrap(),
            Message::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            decode(&msg(0x16, [0x4000, 0x5000, 0]), Features::empty()).unwrap(),
            Message::Unmap {
                start: 0x4000,
                end: 0x5000
            }
        );
    }

    #[test]
    fn unknown_event_is_an_error() {
        assert!(matches!(
            decode(&msg(0x99, [0; 3]), Features::empty()),
            Err(Error::UnknownEvent(0x99))
        ));
    }

    #[test]
    fn an_unknown_message_among_others_is_reported_in_its_place() {
        let raw = [
            msg(0x12, [0, 0x1000, 0]),
            msg(0x99, [0; 3]),
            msg(0x15, [0x2000, 0x3000, 0]),
        ];
        let mut events = Vec::new();
        decode_all(&raw, Features::empty(), &mut events);
        assert!(matches!(
            events.as_slice(),
            [
                Event::Pagefault(_),
                Event::Unknown { code: 0x99 },
                Event::Remove {
                    start: 0x2000,
                    end: 0x3000
                }
            ]
        ));
    }

    #[test]
    fn events_are_send() {
        fn is_send<T: Send>() {}
        is_send::<Event>();
        is_send::<Uffd>();
    }

    #[test]
    fn layout_matches_the_kernel_struct() {
        use core::mem::offset_of;
        assert_eq!(offset_of!(sys::uffd_msg, arg), 8);
        assert_eq!(core::mem::size_of::<sys::uffd_msg>(), 32);
    }
}
