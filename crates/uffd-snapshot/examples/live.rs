//! A live snapshot of memory a thread keeps writing, then a delta of what
//! was written since t0: `cargo run --release -p uffd-snapshot --example
//! live DIR`, then restore with
//! `uffd serve --mem-file DIR/base.mem --layer DIR/d1 --socket S`.

use std::sync::atomic::{AtomicBool, Ordering};

use uffd::{Mapping, MemoryKind};
use uffd_snapshot::{write_delta, DirtyTracker, LiveSnapshot, Region, SnapshotOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".".into()));
    let memory = Mapping::new(MemoryKind::Anon, 64 << 20)?;
    let region = Region::of(&memory);
    let stop = AtomicBool::new(false);
    let (report, mut tracker) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                memory.write_byte((i * 4096 * 7) % memory.len(), i as u8 | 1);
                i += 1;
            }
        });
        // arm() walks the page tables with the writer running; t0 is
        // protect(), which protects again only what the writer wrote
        // meanwhile (a real program holds its writers across it for an
        // image of one instant). After t0 a write to a page not saved yet
        // waits for that page only. With track_writes, pages written after
        // t0 are recorded for the first delta.
        let options = SnapshotOptions::new().track_writes(true);
        let armed = LiveSnapshot::prepare(&[region], &dir.join("base.mem"), options)?.arm()?;
        let running = armed.protect()?;
        running.wait_saved(None);
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        // No writer runs between the snapshot's tracking and the tracker's.
        let stopped = running.stop()?;
        let tracker = DirtyTracker::new(&[region])?;
        Ok::<_, uffd_snapshot::Error>((stopped.commit()?, tracker))
    })?;
    println!(
        "base.mem: {} bytes of data, t0 took {:?}, {} pages saved on a write fault",
        report.data_bytes, report.protect_time, report.saved_on_fault
    );
    memory.write_byte(4096, 42);
    let mut written = report.written.clone();
    written.extend(tracker.written_image_ranges()?);
    let stats = write_delta(&[region], &written, &dir.join("d1"))?;
    println!(
        "d1: {} pages written since t0 ({} tracker)",
        stats.data_pages + stats.zero_pages,
        tracker.mode().name()
    );
    Ok(())
}
