//! A process restoring its own memory post-copy into shmem: the memory is
//! a memfd registered MISSING|MINOR; the page server's push lands pages in
//! the page cache through an alias with no ioctl; touching a page that is
//! there costs one CONTINUE; only the rest go over the demand channel.
//! (The page server runs in this process on loopback, serving a buffer; in
//! production it is `uffd page-server --push` on another host.)
//!
//! ```text
//! cargo run --release -p uffd-remote --example own_shmem
//! ```

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_pager::{MemorySource, PageSource};
use uffd_remote::{PageServer, PageServerConfig, ShmemDestination, ShmemOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const LEN: usize = 64 << 20;
    // The "source host": a page server for 64 MiB of known bytes.
    let image: Vec<u8> = (0..LEN).map(|i| (i / 4096 % 251) as u8 | 1).collect();
    let served: Arc<dyn PageSource> = Arc::new(MemorySource::new(image.clone()));
    let server = PageServer::bind(
        "127.0.0.1:0",
        served,
        1,
        PageServerConfig {
            push: true,
            ..PageServerConfig::default()
        },
    )?;
    let addr = server.local_addr()?.to_string();
    let stop = server.handle();
    let serving = std::thread::spawn(move || server.run());

    let started = Instant::now();
    let dest = ShmemDestination::start(&addr, ShmemOptions::default())?;
    let memory = dest.memory();
    // The workload starts at once: its first half is touched while the
    // push is still landing pages (some faults ask, most find the page),
    // then it waits a little and reads the rest, which is all there.
    let mut page = vec![0u8; 4096];
    let pages = LEN / 4096;
    for p in (0..pages / 2).rev() {
        memory.read(p * 4096, &mut page);
        assert_eq!(page, image[p * 4096..(p + 1) * 4096], "page {p}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while dest.landed_pages() < pages as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    for p in pages / 2..pages {
        memory.read(p * 4096, &mut page);
        assert_eq!(page, image[p * 4096..(p + 1) * 4096], "page {p}");
    }
    let elapsed = started.elapsed();
    let r = dest.remote_stats();
    let (pushed, demanded, asked) = (
        r.pages_landed_pushed.load(Relaxed),
        r.pages_landed_demand.load(Relaxed),
        r.demand_pages.load(Relaxed),
    );
    let stats = dest.shutdown();
    println!(
        "read back {} MiB from {addr} in {:.3} s, every byte right: {pushed} pages landed \
         from the push (no ioctl), {demanded} from demand reads ({asked} asked for), \
         {} mapped with CONTINUE ({} minor faults, {} missing); {:?}",
        LEN >> 20,
        elapsed.as_secs_f64(),
        stats.pages_continued + stats.pages_zero,
        stats.faults_minor,
        stats.faults_missing,
        stats.latency
    );
    stop.stop();
    serving.join().expect("the page server thread")?;
    Ok(())
}
