//! A process restoring its own memory post-copy: anonymous memory of this
//! process, registered MISSING, served by a pager whose source is a page
//! server (here one started in this process on loopback, serving a
//! buffer; in production `uffd page-server` on another host).
//!
//! ```text
//! cargo run --release -p uffd-remote --example own_memory
//! ```

use std::sync::Arc;

use uffd::{Mapping, MemoryKind, OpenOptions, RegisterMode};
use uffd_pager::{AsyncSource, MemorySource, PageSource, Pager, Region};
use uffd_remote::{PageServer, PageServerConfig, RemoteConfig, RemoteSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const LEN: usize = 64 << 20;
    // The "source host": a page server for 64 MiB of known bytes.
    let image: Vec<u8> = (0..LEN).map(|i| (i / 4096 % 251) as u8).collect();
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

    // The destination: fresh memory, filled from the network on first
    // touch (and by the push meanwhile).
    let remote = RemoteSource::connect(&addr, RemoteConfig::default())?;
    let source: Arc<dyn PageSource> = Arc::new(AsyncSource::new(Arc::new(remote))?);
    let memory = Mapping::new(MemoryKind::Anon, LEN)?;
    let uffd = OpenOptions::new().user_mode_only(true).open()?;
    let regions = vec![Region::new(memory.addr(), LEN as u64, 0, 4096)];
    uffd_pager::register(&uffd, &regions, RegisterMode::MISSING)?;
    let builder = Pager::builder(source).threads(1);
    // SAFETY: `memory` is touched only through raw copies (Mapping hands
    // out no references), so nothing relies on what its missing pages hold.
    let pager = unsafe { builder.start(uffd, regions) }?;

    let started = std::time::Instant::now();
    let mut page = vec![0u8; 4096];
    for p in (0..LEN / 4096).rev() {
        memory.read(p * 4096, &mut page);
        assert_eq!(page, image[p * 4096..(p + 1) * 4096], "page {p}");
    }
    println!(
        "read back {} MiB from {addr} in {:.3} s, every byte right; {:?}",
        LEN >> 20,
        started.elapsed().as_secs_f64(),
        pager.shutdown().latency
    );
    stop.stop();
    serving.join().expect("the page server thread")?;
    Ok(())
}
