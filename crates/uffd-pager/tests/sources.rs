//! Every page source, read directly and served through the pager.

mod common;

use std::sync::Arc;

use common::*;
use uffd::Features;
use uffd_pager::{
    Content, FileMode, FileSource, LayeredSource, MemorySource, PageSource, Pager, Region,
    SourceError, ZeroSource,
};

const LEN: usize = 1 << 20;

/// Serves `source` into fresh memory and returns what a reader sees, with
/// the zero-page count.
fn serve(source: Arc<dyn PageSource>, granule: u64) -> (Vec<u8>, u64) {
    let uffd = open(Features::EVENT_REMOVE);
    let memory = anon_registered(&uffd, LEN);
    // SAFETY: the regions are a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .granule(granule)
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    let got = read_all(&memory, "reading served memory");
    (got, pager.shutdown().pages_zero)
}

#[test]
fn zero_source() {
    let source = ZeroSource::new(LEN as u64);
    let mut buf = [1u8; 4096];
    assert_eq!(source.read_at(0, &mut buf).unwrap(), Content::Zero);
    assert!(matches!(
        source.read_at(LEN as u64, &mut buf),
        Err(SourceError::OutOfRange { .. })
    ));
    if !uffd_testkit::user_uffd() {
        return;
    }
    let (got, zero) = serve(Arc::new(source), 64 << 10);
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(zero, (LEN / 4096) as u64);
}

#[test]
fn memory_source() {
    let bytes = pattern(LEN, 41);
    let source = MemorySource::new(bytes.clone());
    let mapped = source.mapped(4096, 10).unwrap();
    assert_eq!(mapped.as_ptr(), source.bytes()[4096..].as_ptr());
    assert_eq!(mapped.len(), 10);
    assert!(!source.is_known_zero(0, 4096));
    if !uffd_testkit::user_uffd() {
        return;
    }
    let (got, _) = serve(Arc::new(source), 4096);
    assert_same(&got, &bytes, "memory source");
}

fn snapshot_file(tag: &str) -> (std::path::PathBuf, Vec<u8>) {
    // Data, a hole (never written), an explicit zero page, data.
    let mut bytes = pattern(LEN, 43);
    bytes[64 * 4096..128 * 4096].fill(0);
    bytes[200 * 4096..201 * 4096].fill(0);
    let path = std::env::temp_dir().join(format!("uffd-pager-{tag}-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(LEN as u64).unwrap();
    rustix::io::pwrite(&file, &bytes[..64 * 4096], 0).unwrap();
    rustix::io::pwrite(&file, &bytes[128 * 4096..], 128 * 4096).unwrap();
    (path, bytes)
}

#[test]
fn file_source_pread_and_mmap() {
    for mode in [FileMode::Pread, FileMode::Mmap] {
        let (path, bytes) = snapshot_file(&format!("{mode:?}"));
        let source = FileSource::open(&path, mode).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut buf = vec![7u8; 4096];
        assert_eq!(
            source.read_at(70 * 4096, &mut buf).unwrap(),
            Content::Zero,
            "hole"
        );
        assert_eq!(source.read_at(0, &mut buf).unwrap(), Content::Data);
        assert_eq!(&buf[..], &bytes[..4096]);
        assert_eq!(source.mapped(0, 4096).is_some(), mode == FileMode::Mmap);
        // The hole is known zero in both modes; the explicit zero page
        // only where the file was scanned at open (mmap mode).
        assert!(source.is_known_zero(64 * 4096, 64 * 4096));
        assert_eq!(
            source.is_known_zero(200 * 4096, 4096),
            mode == FileMode::Mmap
        );
        assert!(!source.is_known_zero(0, 4096));
        assert!(!source.is_known_zero(199 * 4096, 8192));
        if !uffd_testkit::user_uffd() {
            return;
        }
        let (got, zero) = serve(Arc::new(source), 64 << 10);
        assert_same(&got, &bytes, "file source");
        // The 64 hole pages and the explicit zero page were mapped as zero pages.
        assert_eq!(zero, 65, "{mode:?}");
    }
}

#[test]
fn layered_source_prefers_the_overlay() {
    let base = pattern(LEN, 47);
    let overlay = pattern(LEN, 53);
    let ranges = vec![4096..3 * 4096, 100 * 4096..101 * 4096];
    let source = LayeredSource::new(
        Arc::new(MemorySource::new(base.clone())),
        Arc::new(MemorySource::new(overlay.clone())),
        ranges.clone(),
    );
    let mut want = base.clone();
    for r in &ranges {
        want[r.start as usize..r.end as usize]
            .copy_from_slice(&overlay[r.start as usize..r.end as usize]);
    }
    // A read across both layers.
    let mut buf = vec![0u8; 4 * 4096];
    assert_eq!(source.read_at(0, &mut buf).unwrap(), Content::Data);
    assert_eq!(&buf[..], &want[..4 * 4096]);
    // A layer over zeros: the zero base still reads as zero in a mixed read.
    let over_zero = LayeredSource::new(
        Arc::new(ZeroSource::new(LEN as u64)),
        Arc::new(MemorySource::new(overlay.clone())),
        vec![4096..2 * 4096, 10 * 4096..11 * 4096],
    );
    let mut buf = vec![0xFFu8; 3 * 4096];
    over_zero.read_at(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert_eq!(&buf[4096..8192], &overlay[4096..8192]);
    if !uffd_testkit::user_uffd() {
        return;
    }
    let (got, _) = serve(Arc::new(source), 64 << 10);
    assert_same(&got, &want, "layered source");
}

#[test]
fn a_file_that_shrinks_reports_its_real_size() {
    for mode in [FileMode::Pread, FileMode::Mmap] {
        let path =
            std::env::temp_dir().join(format!("uffd-pager-shrink-{mode:?}-{}", std::process::id()));
        std::fs::write(&path, pattern(LEN, 47)).unwrap();
        let source = FileSource::open(&path, mode).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8192)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        match source.read_at(16384, &mut buf) {
            Err(uffd_pager::SourceError::OutOfRange { offset, size, .. }) => {
                assert_eq!((offset, size), (16384, 8192), "{mode:?}");
            }
            other => panic!("{mode:?}: a read past the new end gave {other:?}"),
        }
        // What is left still reads.
        assert_eq!(source.read_at(4096, &mut buf).unwrap(), Content::Data);
    }
}

#[test]
fn only_regular_files_are_sources() {
    let dir = std::env::temp_dir();
    for mode in [FileMode::Pread, FileMode::Mmap] {
        let e = FileSource::open(&dir, mode).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
