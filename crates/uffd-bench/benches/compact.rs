//! `cargo bench -p uffd-bench`: one collection of a 32 MiB demo heap per
//! iteration, per mode, timed from the pause to the last page installed
//! (building, marking and verifying the heap are not timed). `uffd compact
//! bench` reports stalls and throughput beside it.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use uffd_bench::compact::{run_cycle, CycleConfig};
use uffd_compact::Mode;

fn compaction(c: &mut Criterion) {
    if let Err(e) = uffd::probe() {
        if e.is_denied() {
            eprintln!("SKIP: userfaultfd is denied here: {e}");
            return;
        }
    }
    let mut group = c.benchmark_group("compact-32MiB");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    for mode in Mode::ALL {
        group.bench_function(mode.name(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let mut cfg = CycleConfig::new(mode, 32);
                    cfg.warmup = Duration::from_millis(20);
                    cfg.seed = i;
                    let cycle = run_cycle(&cfg).expect("collection");
                    assert!(cycle.checksum_ok, "{mode}: checksum mismatch");
                    total += Duration::from_secs_f64(cycle.compaction_ms / 1e3);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, compaction);
criterion_main!(benches);
