//! One handler per CPU: as many handler threads as CPUs this process may
//! use (up to the cap), each pinned to its own, serving every byte.

mod common;

use common::*;
use uffd::Features;
use uffd_pager::{Pager, Region, MAX_HANDLERS_PER_CPU};

fn allowed_cpus(task: &str) -> String {
    let path = format!("/proc/self/task/{task}/status");
    uffd_testkit::proc_status_field(&path, "Cpus_allowed_list")
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {path}"))
}

#[test]
fn a_handler_per_cpu_each_pinned_serves_every_byte() {
    if !uffd_testkit::user_uffd() {
        return;
    }
    const LEN: usize = 8 << 20;
    let uffd = open(Features::empty());
    let memory = anon_registered(&uffd, LEN);
    let (source, want) = pattern_source(LEN, 7);
    // SAFETY: the region is a mapping this test touches only through raw
    // pointers; no Rust reference covers it.
    let pager = unsafe {
        Pager::builder(source)
            .handler_per_cpu(true)
            .name("percpu")
            .start(uffd, vec![Region::new(memory.addr(), LEN as u64, 0, 4096)])
    }
    .unwrap();
    let cpus = rustix::thread::sched_getaffinity(None).unwrap().count() as usize;
    let handlers_wanted = cpus.min(MAX_HANDLERS_PER_CPU);
    // Each handler names and pins itself once it runs: wait for all of them.
    let handlers = || {
        let mut pinned = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().file_name().into_string().unwrap();
            let Ok(comm) = std::fs::read_to_string(format!("/proc/self/task/{task}/comm")) else {
                continue;
            };
            if comm.starts_with("percpu-") {
                pinned.push(allowed_cpus(&task));
            }
        }
        pinned.sort();
        pinned
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut pinned = handlers();
    while (pinned.len() != handlers_wanted || pinned.iter().any(|c| c.parse::<usize>().is_err()))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
        pinned = handlers();
    }
    assert_eq!(pinned.len(), handlers_wanted, "{pinned:?}");
    for cpus in &pinned {
        assert!(
            cpus.parse::<usize>().is_ok(),
            "a handler allowed on {cpus:?}, not on one CPU"
        );
    }
    pinned.dedup();
    assert_eq!(pinned.len(), handlers_wanted, "two handlers share a CPU");
    // Readers on every CPU at once.
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let m = memory.clone();
            std::thread::spawn(move || {
                let mut page = vec![0u8; 4096];
                let mut out = Vec::new();
                for p in (t..LEN / 4096).step_by(4) {
                    m.read(p * 4096, &mut page);
                    out.push((p, page.clone()));
                }
                out
            })
        })
        .collect();
    let got: Vec<_> = bounded("readers served by per-CPU handlers", move || {
        readers
            .into_iter()
            .flat_map(|r| r.join().unwrap())
            .collect()
    });
    for (p, page) in got {
        assert_same(&page, &want[p * 4096..(p + 1) * 4096], &format!("page {p}"));
    }
    let stats = pager.shutdown();
    assert!(stats.faults_missing >= (LEN / 4096) as u64, "{stats:?}");
}
