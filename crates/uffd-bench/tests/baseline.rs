//! The baseline handler serves what the file holds, behind the real
//! server and handshake, with the VMM's memory touched from several
//! threads at once (so EEXIST and its wake happen).

use std::sync::Arc;
use std::time::Duration;

use uffd::{Mapping, MemoryKind};
use uffd_bench::baselines::OneByOneEngine;
use uffd_pager::{FileMode, FileSource, PageSource};
use uffd_serve::server::{Server, ServerConfig};
use uffd_serve::vmm::HandOver;
use uffd_testkit::{page_pattern, snapshot_file, vmm_uffd, Scratch};

#[test]
fn the_baseline_serves_every_page_from_the_file() {
    if !vmm_uffd() {
        return;
    }
    let dir = Scratch::new("bench-baseline");
    let len = 4u64 << 20;
    let mem = dir.path("mem");
    snapshot_file(&mem, len);
    let source: Arc<dyn PageSource> = Arc::new(FileSource::open(&mem, FileMode::Mmap).unwrap());
    let socket = dir.path("sock");
    let server = Server::bind(
        ServerConfig {
            socket: socket.clone(),
            file_len: len,
            allow_uid: None,
            record: None,
            stats_json: None,
            handshake_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            max_connections: 4,
            source_identity: None,
        },
        Arc::new(OneByOneEngine::new(source)),
    )
    .unwrap();
    let handle = server.handle();
    let stats = server.stats();
    let runner = std::thread::spawn(move || server.run());
    let guest = Mapping::new(MemoryKind::Anon, len as usize).unwrap();
    let handed = HandOver::new(&socket)
        .region(guest.addr(), len, 0, 4096)
        .send()
        .unwrap();
    let pages = (len / 4096) as usize;
    // Every thread touches every page: most faults race with another.
    std::thread::scope(|s| {
        for t in 0..4 {
            let guest = &guest;
            s.spawn(move || {
                for i in 0..pages {
                    let p = (i * 7 + t * 13) % pages;
                    std::hint::black_box(guest.read_byte(p * 4096));
                }
            });
        }
    });
    let mut want = vec![0u8; 4096];
    let mut got = vec![0u8; 4096];
    for i in 0..pages {
        page_pattern(i, &mut want);
        guest.read(i * 4096, &mut got);
        assert_eq!(want, got, "page {i}");
    }
    handle.shutdown();
    runner.join().unwrap().unwrap();
    drop(handed);
    let report = stats.reports().pop().expect("the VM was reported");
    assert!(report.engine.faults >= pages as u64, "{report:?}");
    assert_eq!(report.engine.installed_bytes, len);
}
