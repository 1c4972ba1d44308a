//! The in-process 4 KiB fault round trip: a thread touches one missing
//! page, the baseline handler thread reads the message and copies the page
//! in, the thread resumes. Criterion times one touch; each iteration
//! unmaps the page first (MADV_DONTNEED) so it is missing again.

#![deny(unsafe_code)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use criterion::{criterion_main, Criterion};
use uffd::{Mapping, MemoryKind, RegisterMode};
use uffd_bench::baselines::{spawn_baseline_handler, whole, Served};
use uffd_pager::{MemorySource, PageSource};

const PAGES: usize = 256;

fn round_trip(c: &mut Criterion) {
    if uffd::probe().is_err() {
        eprintln!("SKIP: userfaultfd is not available here");
        return;
    }
    let len = (PAGES * 4096) as u64;
    let source: Arc<dyn PageSource> = Arc::new(MemorySource::new(vec![7u8; len as usize]));
    let uffd = Arc::new(
        uffd_bench::workload::in_process_uffd()
            .non_blocking(true)
            .open()
            .expect("opening a userfaultfd"),
    );
    let memory = Mapping::new(MemoryKind::Anon, len as usize).expect("mapping memory");
    uffd.register(memory.addr(), len, RegisterMode::MISSING)
        .expect("registering");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(Served::default());
    let handler = spawn_baseline_handler(&uffd, whole(memory.addr(), len), source, &stop, &served)
        .expect("starting the handler");
    let mut page = 0usize;
    c.bench_function("fault round trip, 4 KiB, baseline handler", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let offset = (page % PAGES) * 4096;
                page += 1;
                memory
                    .advise(offset, 4096, rustix::mm::Advice::LinuxDontNeed)
                    .expect("MADV_DONTNEED");
                let t = std::time::Instant::now();
                std::hint::black_box(memory.read_byte(offset));
                total += t.elapsed();
            }
            total
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    handler.join().expect("handler").expect("handler");
}

// The macro generates an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::round_trip);
}
criterion_main!(group::benches);
