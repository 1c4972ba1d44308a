//! The one synthetic snapshot generator, and reproducible page orders.

use std::fs::File;
use std::path::{Path, PathBuf};

/// A synthetic snapshot file, removed on drop.
#[derive(Debug)]
pub struct Snapshot {
    /// Where it is.
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: u64,
    /// How many of its 4 KiB pages are all zero.
    pub zero_pages: u64,
    _held: crate::leftovers::Held,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// xorshift64: reproducible orders and contents without a dependency.
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Writes a snapshot of `len` bytes: runs of zero pages (left as holes,
/// as a sparse snapshot has them) between runs of data pages, plus scattered
/// all-zero pages written explicitly (as a dense snapshot has them). Every
/// data page starts with its own offset, so a misplaced page is caught.
pub fn make_snapshot(dir: &Path, len: u64, zero_percent: u8) -> std::io::Result<Snapshot> {
    let path = dir.join(format!("uffd-demo-{}.snap", std::process::id()));
    let held = crate::leftovers::path(&path);
    let file = File::create(&path)?;
    file.set_len(len)?;
    let mut snapshot = Snapshot {
        path,
        len,
        zero_pages: 0,
        _held: held,
    };
    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ len;
    let chunk = 2u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut offset = 0;
    // 80% of the zero share as whole zero 64 KiB blocks, the rest as
    // single zero pages among the data blocks, with the single-page odds
    // chosen so the expected share is exactly `zero_percent`:
    // 0.8p + (1 - 0.8p)q = p. Each choice is a randomized rounding of
    // what is owed so far, so the share is exact to a block or a page
    // while the places stay random.
    let p = f64::from(zero_percent.min(100)) / 100.0;
    let (mut block_owed, mut page_owed) = (0i64, 0i64);
    let owed_choice = |owed: &mut i64, odds: u64, rng: &mut u64| {
        *owed += odds as i64;
        let yes = *owed > (xorshift(rng) % 1024) as i64;
        if yes {
            *owed -= 1024;
        }
        yes
    };
    let block_odds = (0.8 * p * 1024.0).round() as u64;
    let page_odds = if p >= 1.0 {
        1024
    } else {
        (0.2 * p / (1.0 - 0.8 * p) * 1024.0).round() as u64
    };
    while offset < len {
        let this = chunk.min(len - offset);
        let mut any_data = false;
        // Decide per 64 KiB block: mostly zero runs, some single zero pages.
        for block in (0..this).step_by(64 << 10) {
            let zero_block = owed_choice(&mut block_owed, block_odds, &mut rng);
            for page in (block..(block + (64 << 10)).min(this)).step_by(4096) {
                let p = &mut buf[page as usize..page as usize + 4096];
                if zero_block || owed_choice(&mut page_owed, page_odds, &mut rng) {
                    p.fill(0);
                    snapshot.zero_pages += 1;
                    continue;
                }
                any_data = true;
                for w in p.chunks_exact_mut(8) {
                    w.copy_from_slice(&xorshift(&mut rng).to_ne_bytes());
                }
                p[..8].copy_from_slice(&(offset + page).to_ne_bytes());
            }
        }
        if any_data {
            // Write data blocks only; zero 64 KiB blocks stay holes.
            let mut b = 0;
            while b < this {
                let end = (b + (64 << 10)).min(this);
                let block = &buf[b as usize..end as usize];
                if !uffd_pager::source::is_zero(block) {
                    rustix::io::pwrite(&file, block, offset + b)?;
                }
                b = end;
            }
        }
        offset += this;
    }
    Ok(snapshot)
}
/// A permutation of `0..n` from a fixed seed (same order in every run).
pub fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut rng = seed | 1;
    for i in (1..v.len()).rev() {
        let j = (xorshift(&mut rng) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}
/// Writes `pages` as decimal page numbers, one per line: the
/// `--touch-list` format of `uffd-standin-vmm`.
pub fn write_page_list(path: &Path, pages: &[u64]) -> std::io::Result<()> {
    let mut text = String::with_capacity(pages.len() * 8);
    for p in pages {
        text.push_str(&p.to_string());
        text.push('\n');
    }
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zero_share_is_the_one_asked_for() {
        let dir = std::env::temp_dir();
        for percent in [0u8, 30, 70, 100] {
            let len = 64u64 << 20;
            let s = make_snapshot(&dir, len, percent).unwrap();
            let share = s.zero_pages as f64 * 100.0 / (len / 4096) as f64;
            let _ = std::fs::remove_file(&s.path);
            assert!(
                (share - f64::from(percent)).abs() < 0.5,
                "asked for {percent}% zero pages, got {share:.1}%"
            );
        }
    }
}
