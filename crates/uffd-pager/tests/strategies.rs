//! Each resolution strategy installs exactly the source's bytes.

mod common;

use std::sync::Arc;

use common::*;
use uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd};
use uffd_pager::{MemorySource, Pager, Prefetch, Region, Strategy, WaitMode};

const LEN: usize = 4 << 20;

fn copy_with_granule(granule: u64) {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, LEN);
    let (source, bytes) = pattern_source(LEN, granule);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .granule(granule)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .expect("start pager");
    let got = read_all(&memory, "reading lazily restored memory");
    assert_same(&got, &bytes, "copy");
    let stats = pager.shutdown();
    assert_eq!(stats.pages_copied, (LEN / 4096) as u64, "{stats:?}");
    assert!(stats.faults_missing >= (LEN as u64 / granule), "{stats:?}");
    assert!(stats.faults_missing <= (LEN / 4096) as u64, "{stats:?}");
}

#[test]
fn copy_4k() {
    copy_with_granule(4096);
}

#[test]
fn copy_64k_granules() {
    copy_with_granule(64 << 10);
}

#[test]
fn copy_2m_granules() {
    copy_with_granule(2 << 20);
}

#[test]
fn zero_pages_are_mapped_without_copying() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    // Every other 64 KiB block is zero.
    let mut bytes = pattern(LEN, 3);
    for block in bytes.chunks_mut(64 << 10).step_by(2) {
        block.fill(0);
    }
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::new(MemorySource::new(bytes.clone())))
            .granule(64 << 10)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    assert_same(&read_all(&memory, "reading"), &bytes, "zero mix");
    let stats = pager.shutdown();
    assert_eq!(stats.pages_zero, (LEN / 4096 / 2) as u64, "{stats:?}");
    assert_eq!(stats.pages_copied, (LEN / 4096 / 2) as u64, "{stats:?}");
}

#[test]
fn move_from_staging() {
    if !uffd_testkit::user_uffd() || !features(Features::MOVE).contains(Features::MOVE) {
        uffd_testkit::skip(uffd_testkit::Need::Feature, format_args!("no UFFDIO_MOVE"));
        return;
    }
    for granule in [4096u64, 64 << 10, 2 << 20] {
        let uffd = open(Features::MOVE);
        // 2 MiB aligned so whole huge pages can move.
        let target = Arc::new(uffd::Mapping::new(uffd::MemoryKind::Anon, LEN).unwrap());
        uffd.register(target.addr(), LEN as u64, RegisterMode::MISSING)
            .unwrap();
        let (source, bytes) = pattern_source(LEN, 7 + granule);
        // SAFETY: the regions are a mapping this test touches only through raw
        // pointers; no Rust reference covers it.
        let pager = unsafe {
            Pager::builder(source)
                .strategy(Strategy::Move)
                .granule(granule)
                .start(uffd, vec![Region::new(target.addr(), LEN as u64, 0, 4096)])
        }
        .unwrap();
        let t = Arc::clone(&target);
        let got = bounded("reading moved memory", move || {
            let mut buf = vec![0u8; LEN];
            // SAFETY: the mapping is LEN bytes long; contents come from the pager.
            unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), buf.as_mut_ptr(), LEN) };
            buf
        });
        assert_same(&got, &bytes, "move");
        let stats = pager.shutdown();
        assert_eq!(
            stats.pages_moved,
            (LEN / 4096) as u64,
            "granule {granule}: {stats:?}"
        );
    }
}

/// A MINOR_SHMEM userfaultfd and a `LEN`-byte shmem mapping, not yet
/// registered; None (after saying why) when either is not available.
fn minor_shmem() -> Option<(Uffd, Arc<Mapping>)> {
    if !uffd_testkit::user_uffd() {
        return None;
    }
    let uffd = open(Features::MINOR_SHMEM);
    if !uffd.features().contains(Features::MINOR_SHMEM) {
        uffd_testkit::skip(uffd_testkit::Need::Feature, format_args!("no MINOR_SHMEM"));
        return None;
    }
    Some((
        uffd,
        Arc::new(Mapping::new(MemoryKind::Shmem, LEN).unwrap()),
    ))
}

#[test]
fn minor_continue_on_shmem_through_the_alias() {
    let Some((uffd, memory)) = minor_shmem() else {
        return;
    };
    // Put every page in the page cache (zeroed) so that each first access
    // is a minor fault.
    rustix::fs::fallocate(
        memory.file().unwrap(),
        rustix::fs::FallocateFlags::empty(),
        0,
        LEN as u64,
    )
    .unwrap();
    uffd.register(memory.addr(), LEN as u64, RegisterMode::MINOR)
        .unwrap();
    let (source, bytes) = pattern_source(LEN, 11);
    // SAFETY: the alias lives as long as `memory`, which outlives the pager,
    // and is not referenced while the pager runs.
    let region = unsafe {
        Region::new(memory.addr(), LEN as u64, 0, 4096).with_alias(memory.alias_ptr().unwrap())
    };
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .strategy(Strategy::Continue)
            .granule(64 << 10)
            .start(uffd, vec![region])
    }
    .unwrap();
    assert_same(&read_all(&memory, "reading shmem"), &bytes, "continue");
    let stats = pager.shutdown();
    assert_eq!(stats.pages_continued, (LEN / 4096) as u64, "{stats:?}");
    assert!(stats.faults_minor > 0, "{stats:?}");
}

/// A source that must never be read (content in place).
#[derive(Debug)]
struct UnreadableSource(u64);

impl uffd_pager::PageSource for UnreadableSource {
    fn len(&self) -> u64 {
        self.0
    }
    fn read_at(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<uffd_pager::Content, uffd_pager::SourceError> {
        Err(uffd_pager::SourceError::Failed {
            offset,
            len: buf.len() as u64,
            source: std::io::Error::other("content_in_place must not read the source"),
        })
    }
    fn describe(&self) -> String {
        "unreadable".into()
    }
}

#[test]
fn minor_continue_with_content_in_place_maps_without_copying() {
    let Some((uffd, memory)) = minor_shmem() else {
        return;
    };
    // The snapshot is already in the memfd's page cache, zero pages included.
    let mut bytes = pattern(LEN, 21);
    for page in bytes.chunks_mut(4096).step_by(3) {
        page.fill(0);
    }
    memory.write_alias(0, &bytes);
    // Holes inside readahead windows: 64 KiB at 1 MiB and one page at 2 MiB
    // + 8 KiB are not in the page cache and must read as zeros.
    for (at, len) in [(1 << 20, 64 << 10), ((2 << 20) + 8192, 4096)] {
        bytes[at..at + len].fill(0);
        rustix::fs::fallocate(
            memory.file().unwrap(),
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            at as u64,
            len as u64,
        )
        .unwrap();
    }
    uffd.register(memory.addr(), LEN as u64, RegisterMode::MINOR)
        .unwrap();
    // SAFETY: the alias lives as long as `memory`, which outlives the pager,
    // and is not referenced while the pager runs.
    let region = unsafe {
        Region::new(memory.addr(), LEN as u64, 0, 4096).with_alias(memory.alias_ptr().unwrap())
    };
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(Arc::new(UnreadableSource(LEN as u64)))
            .strategy(Strategy::Continue)
            .content_in_place(true)
            .granule(64 << 10)
            .prefetch(Prefetch::Readahead { max_bytes: 2 << 20 })
            .start(uffd, vec![region])
    }
    .unwrap();
    assert_same(&read_all(&memory, "reading shmem"), &bytes, "in place");
    let stats = pager.shutdown();
    assert!(stats.pages_continued > 0, "{stats:?}");
    assert_eq!(stats.pages_written_through_alias, 0, "{stats:?}");
    assert_eq!(stats.poisoned, 0, "{stats:?}");
}

#[test]
fn content_in_place_needs_continue() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let memory = uffd::Mapping::new(uffd::MemoryKind::Anon, 1 << 20).unwrap();
    let uffd = open(Features::empty());
    let (source, _) = pattern_source(1 << 20, 1);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let r = unsafe {
        Pager::builder(source)
            .content_in_place(true)
            .start(uffd, vec![Region::new(memory.addr(), 1 << 20, 0, 4096)])
    };
    assert!(r.is_err(), "content_in_place with Copy must be refused");
}

#[test]
fn hugetlb_2m_pages_by_copy_and_by_continue() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let reservation = match uffd::HugepageReservation::reserve(4) {
        Ok(r) => r,
        Err(e) => {
            uffd_testkit::skip(uffd_testkit::Need::Hugetlb, e);
            return;
        }
    };
    let len = 4 << 20;
    // COPY into private hugetlb memory.
    {
        let uffd = open(Features::MISSING_HUGETLBFS);
        let memory = Arc::new(Mapping::new(MemoryKind::HugetlbPrivate, len).unwrap());
        uffd.register(memory.addr(), len as u64, RegisterMode::MISSING)
            .unwrap();
        let mut bytes = pattern(len, 5);
        bytes[..2 << 20].fill(0); // one zero huge page
                                  // SAFETY: the regions are a mapping this test touches only through raw
                                  // pointers; no Rust reference covers it.
        let pager = unsafe {
            Pager::builder(Arc::new(MemorySource::new(bytes.clone()))).start(
                uffd,
                vec![Region::new(memory.addr(), len as u64, 0, 2 << 20)],
            )
        }
        .unwrap();
        assert_same(
            &read_all(&memory, "reading hugetlb"),
            &bytes,
            "hugetlb copy",
        );
        let stats = pager.shutdown();
        assert_eq!((stats.pages_copied, stats.pages_zero), (1, 1), "{stats:?}");
    }
    // CONTINUE on shared hugetlb: content written through the alias.
    {
        let uffd = open(Features::MINOR_HUGETLBFS);
        let memory = Arc::new(Mapping::new(MemoryKind::Hugetlb, 2 << 20).unwrap());
        // Populate the page cache through the alias so access is a minor fault.
        memory.write_alias(0, &[0]);
        uffd.register(memory.addr(), 2 << 20, RegisterMode::MINOR)
            .unwrap();
        let bytes = pattern(2 << 20, 9);
        // SAFETY: the alias outlives the pager and nothing references it.
        let region = unsafe {
            Region::new(memory.addr(), 2 << 20, 0, 2 << 20).with_alias(memory.alias_ptr().unwrap())
        };
        // SAFETY: the regions are a mapping this test touches only through raw
        // pointers; no Rust reference covers it.
        let pager = unsafe {
            Pager::builder(Arc::new(MemorySource::new(bytes.clone())))
                .strategy(Strategy::Continue)
                .start(uffd, vec![region])
        }
        .unwrap();
        assert_same(
            &read_all(&memory, "reading hugetlb shared"),
            &bytes,
            "hugetlb continue",
        );
        let stats = pager.shutdown();
        assert_eq!(stats.pages_continued, 1, "{stats:?}");
    }
    drop(reservation);
}

#[test]
fn copy_wp_tracks_dirty_pages() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::PAGEFAULT_FLAG_WP);
    if !uffd.features().contains(Features::PAGEFAULT_FLAG_WP) {
        uffd_testkit::skip(
            uffd_testkit::Need::Feature,
            format_args!("no write-protect support"),
        );
        return;
    }
    let memory = Arc::new(Mapping::new(MemoryKind::Anon, LEN).unwrap());
    uffd.register(
        memory.addr(),
        LEN as u64,
        RegisterMode::MISSING | RegisterMode::WP,
    )
    .unwrap();
    let (source, bytes) = pattern_source(LEN, 13);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .strategy(Strategy::CopyWp)
            .wait(WaitMode::Spin(std::time::Duration::from_micros(20)))
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    assert_same(&read_all(&memory, "reading"), &bytes, "copy-wp");
    let m = Arc::clone(&memory);
    bounded("writing pages 3 and 700", move || {
        m.write_byte(3 * 4096 + 1, 0xAB);
        m.write_byte(700 * 4096, 0xCD);
    });
    let dirty = pager.dirty_pages();
    let base = memory.addr();
    assert_eq!(dirty, vec![base + 3 * 4096, base + 700 * 4096]);
    assert_eq!(memory.read_byte(3 * 4096 + 1), 0xAB);
    let stats = pager.shutdown();
    assert_eq!(stats.pages_dirtied, 2, "{stats:?}");
    assert_eq!(stats.faults_wp, 2, "{stats:?}");
}

#[test]
fn many_threads_on_one_page_are_served_once() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    // 64 KiB aligned, so the two touched pages share one granule.
    let memory = Arc::new(uffd::Mapping::new(uffd::MemoryKind::Anon, 64 << 10).unwrap());
    uffd.register(memory.addr(), 64 << 10, RegisterMode::MISSING)
        .unwrap();
    let (source, bytes) = pattern_source(64 << 10, 17);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .threads(2)
            .granule(64 << 10)
            .prefetch(Prefetch::None)
            .start(uffd, vec![Region::new(memory.addr(), 64 << 10, 0, 4096)])
    }
    .unwrap();
    let m = Arc::clone(&memory);
    let values = bounded("8 threads reading the same pages", move || {
        let readers: Vec<_> = (0..8)
            .map(|t| {
                let m = Arc::clone(&m);
                // SAFETY: inside the 64 KiB mapping; a volatile read faults.
                std::thread::spawn(move || unsafe {
                    m.as_ptr().add((t % 2) * 4096 + 8).read_volatile()
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (t, v) in values.iter().enumerate() {
        assert_eq!(*v, bytes[(t % 2) * 4096 + 8]);
    }
    let stats = pager.shutdown();
    // One granule: installed exactly once, whatever the number of messages.
    assert_eq!(stats.pages_copied, 16, "{stats:?}");
}
