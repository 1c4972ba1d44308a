//! A stand-in VMM: does at restore exactly what Firecracker does with the
//! `Uffd` memory backend, then checks every byte the guest would see.
//!
//! 1. maps guest memory (anonymous, or 2 MiB hugetlb), possibly as several
//!    regions at consecutive offsets of the memory file;
//! 2. hands it to the server (`uffd_serve::vmm::HandOver`);
//! 3. touches every page from several threads, in random order;
//! 4. balloons some pages (`MADV_DONTNEED`, which the server sees as REMOVE);
//! 5. verifies every byte: ballooned pages read as zero, every other page
//!    equals the memory file.
//!
//! Prints one JSON line and exits 0 when every byte matched, 1 on a
//! mismatch, 2 when it could not set up.
//!
//! `--pace-us N` waits N microseconds between touches, so the VM keeps
//! faulting for a while (a test restarts the server meanwhile).
//!
//! `--touch-list FILE` touches exactly the pages listed there (decimal
//! page numbers, one per line), in that order, split into one contiguous
//! share per thread, and verifies only those pages (and any ballooned):
//! `uffd serve bench` replays a recorded working set this way, and the
//! reported `touch_seconds` is its restore-to-done.
//!
//! The report times every touch too: `touch_p50_us`, `touch_p99_us` and
//! `touch_max_us`, over all threads (a touch of a missing page is one
//! fault, end to end, as the guest sees it).
//!
//! `--pause-before-verify` prints `touched` on its own line after step 4 and
//! waits for a line on stdin before verifying: a test stops the server
//! meanwhile and checks that the guest runs on without it.
//!
//! ```text
//! uffd-standin-vmm --socket S --mem-file F [--size BYTES] [--regions N]
//!     [--threads N] [--hugetlb] [--balloon-every N] [--touch-percent P]
//!     [--touch-list FILE] [--pace-us N] [--pause-before-verify]
//! ```

#![deny(unsafe_code)]

use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use uffd::{Mapping, MemoryKind};
use uffd_serve::vmm::HandOver;

struct Options {
    socket: String,
    mem_file: String,
    size: Option<u64>,
    regions: u64,
    threads: usize,
    hugetlb: bool,
    balloon_every: u64,
    touch_percent: u64,
    touch_list: Option<String>,
    pace_us: u64,
    pause_before_verify: bool,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        socket: String::new(),
        mem_file: String::new(),
        size: None,
        regions: 1,
        threads: 4,
        hugetlb: false,
        balloon_every: 0,
        touch_percent: 100,
        touch_list: None,
        pace_us: 0,
        pause_before_verify: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--socket" => o.socket = value()?,
            "--mem-file" => o.mem_file = value()?,
            "--size" => o.size = Some(number(value()?)?),
            "--regions" => o.regions = number(value()?)?.max(1),
            "--threads" => o.threads = number(value()?)?.max(1) as usize,
            "--hugetlb" => o.hugetlb = true,
            "--balloon-every" => o.balloon_every = number(value()?)?,
            "--touch-percent" => o.touch_percent = number(value()?)?.clamp(1, 100),
            "--touch-list" => o.touch_list = Some(value()?),
            "--pace-us" => o.pace_us = number(value()?)?,
            "--pause-before-verify" => o.pause_before_verify = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.socket.is_empty() || o.mem_file.is_empty() {
        return Err("--socket and --mem-file are required".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("uffd-standin-vmm: {e}");
            ExitCode::from(2)
        }
    }
}

/// xorshift64*: reproducible page orders without a dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn run() -> Result<bool, String> {
    let o = parse()?;
    let file = std::fs::File::open(&o.mem_file).map_err(|e| format!("{}: {e}", o.mem_file))?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let kind = if o.hugetlb {
        MemoryKind::HugetlbPrivate
    } else {
        MemoryKind::Anon
    };
    let page = kind.page_size() as u64;
    let size = o.size.unwrap_or(file_len);
    let per_region = (size / o.regions) / page * page;
    if per_region == 0 {
        return Err(format!(
            "{size} bytes cannot make {} regions of {page}-byte pages",
            o.regions
        ));
    }
    let mut mappings = Vec::new();
    let mut handover = HandOver::new(&o.socket);
    for r in 0..o.regions {
        let m = Mapping::new(kind, per_region as usize).map_err(|e| e.to_string())?;
        handover = handover.region(m.addr(), per_region, r * per_region, page);
        mappings.push(m);
    }
    let started = Instant::now();
    let memory = handover.send().map_err(|e| e.to_string())?;
    let pages_per_region = per_region / page;
    let total_pages = pages_per_region * o.regions;

    // Touch pages from several threads in random order (a read of one byte
    // per page, as a vCPU's first access would be).
    // A touch list replaces the random order: no shuffle of every page
    // then (on a 4 GiB VM that alone takes longer than a first fault).
    let order = match &o.touch_list {
        Some(path) => read_touch_list(path, total_pages)?,
        None => {
            let mut order: Vec<u64> = (0..total_pages).collect();
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            for i in (1..order.len()).rev() {
                let j = (next_random(&mut seed) % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
            order.truncate(((total_pages * o.touch_percent).div_ceil(100)) as usize);
            order
        }
    };
    let touched = AtomicU64::new(0);
    // Each touch timed on its own: a clock read (the vDSO, tens of
    // nanoseconds) is nothing next to a fault.
    let mut touch_us: Vec<f64> = std::thread::scope(|s| {
        let threads: Vec<_> = order
            .chunks(order.len().div_ceil(o.threads).max(1))
            .map(|chunk| {
                let (mappings, touched) = (&mappings, &touched);
                let pace = std::time::Duration::from_micros(o.pace_us);
                s.spawn(move || {
                    let mut times = Vec::with_capacity(chunk.len());
                    for &p in chunk {
                        if !pace.is_zero() {
                            std::thread::sleep(pace);
                        }
                        let m = &mappings[(p / pages_per_region) as usize];
                        let offset = ((p % pages_per_region) * page) as usize;
                        let t = Instant::now();
                        std::hint::black_box(
                            m.read_byte(offset + (p as usize * 7) % page as usize),
                        );
                        times.push(t.elapsed().as_secs_f64() * 1e6);
                        touched.fetch_add(1, Relaxed);
                    }
                    times
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a touching thread panicked"))
            .collect()
    });
    let touch_seconds = started.elapsed().as_secs_f64();
    touch_us.sort_unstable_by(f64::total_cmp);
    // Nearest rank; 0 when nothing was touched.
    let touch_percentile = |p: f64| {
        let rank = ((p / 100.0 * touch_us.len() as f64).ceil() as usize).max(1);
        touch_us.get(rank - 1).copied().unwrap_or(0.0)
    };

    // Balloon: drop every n-th page, touched or not.
    let mut ballooned = 0u64;
    if o.balloon_every > 0 {
        for p in (0..total_pages).step_by(o.balloon_every as usize) {
            let m = &mappings[(p / pages_per_region) as usize];
            let offset = ((p % pages_per_region) * page) as usize;
            m.advise(offset, page as usize, rustix::mm::Advice::LinuxDontNeed)
                .map_err(|e| format!("balloon MADV_DONTNEED: {e}"))?;
            ballooned += 1;
        }
    }

    if o.pause_before_verify {
        use std::io::{BufRead, Write};
        let mut out = std::io::stdout().lock();
        writeln!(out, "touched")
            .and_then(|()| out.flush())
            .map_err(|e| format!("writing to stdout: {e}"))?;
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("waiting on stdin: {e}"))?;
    }

    // Verify every byte, from several threads.
    let mismatched = AtomicU64::new(0);
    let first_bad = std::sync::Mutex::new(None::<String>);
    let all: Vec<u64> = match &o.touch_list {
        Some(_) => {
            let mut pages = order.clone();
            if o.balloon_every > 0 {
                pages.extend((0..total_pages).step_by(o.balloon_every as usize));
                pages.sort_unstable();
                pages.dedup();
            }
            pages
        }
        None => (0..total_pages).collect(),
    };
    std::thread::scope(|s| {
        for chunk in all.chunks(all.len().div_ceil(o.threads)) {
            let (mappings, file, mismatched, first_bad) =
                (&mappings, &file, &mismatched, &first_bad);
            let balloon_every = o.balloon_every;
            s.spawn(move || {
                let mut want = vec![0u8; page as usize];
                let mut got = vec![0u8; page as usize];
                for &p in chunk {
                    let region = p / pages_per_region;
                    let offset = (p % pages_per_region) * page;
                    let file_offset = region * per_region + offset;
                    let is_ballooned = balloon_every > 0 && p % balloon_every == 0;
                    if is_ballooned {
                        want.fill(0);
                    } else if let Err(e) = file.read_exact_at(&mut want, file_offset) {
                        *first_bad.lock().unwrap() = Some(format!("reading the memory file: {e}"));
                        mismatched.fetch_add(1, Relaxed);
                        continue;
                    }
                    mappings[region as usize].read(offset as usize, &mut got);
                    if want != got {
                        let at = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(0);
                        first_bad.lock().unwrap().get_or_insert(format!(
                            "page {p} (region {region}, file offset {file_offset:#x}{}) differs at byte {at}: want {:#04x}, got {:#04x}",
                            if is_ballooned { ", ballooned" } else { "" },
                            want[at],
                            got[at]
                        ));
                        mismatched.fetch_add(1, Relaxed);
                    }
                }
            });
        }
    });
    let mismatched = mismatched.into_inner();
    let verified = all.len();
    let report = serde_json::json!({
        "pid": std::process::id(),
        "page_size": page,
        "regions": o.regions,
        "pages": total_pages,
        "touched": touched.into_inner(),
        "ballooned": ballooned,
        "verified_pages": verified,
        "mismatched_pages": mismatched,
        "first_mismatch": first_bad.into_inner().unwrap(),
        "touch_seconds": touch_seconds,
        "touch_p50_us": touch_percentile(50.0),
        "touch_p99_us": touch_percentile(99.0),
        "touch_max_us": touch_us.last().copied().unwrap_or(0.0),
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{report}");
    drop(memory);
    Ok(mismatched == 0)
}

/// Reads `--touch-list`: one page number per line, each below `pages`.
fn read_touch_list(path: &str, pages: u64) -> Result<Vec<u64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--touch-list {path}: {e}"))?;
    let mut list = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let p: u64 = line
            .parse()
            .map_err(|e| format!("--touch-list {path}, line {}: {e}", n + 1))?;
        if p >= pages {
            return Err(format!(
                "--touch-list {path}, line {}: page {p} is beyond the guest's {pages} pages",
                n + 1
            ));
        }
        list.push(p);
    }
    if list.is_empty() {
        return Err(format!("--touch-list {path} lists no page"));
    }
    Ok(list)
}
