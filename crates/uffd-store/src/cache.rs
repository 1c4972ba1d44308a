//! The host-wide chunk cache's bookkeeping: least-recently-used order by
//! weight (bytes), for the memory tier (holding the bytes) and the disk
//! tier (holding file sizes).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::manifest::ChunkHash;

/// Entries by recency, bounded by the sum of their weights.
#[derive(Debug)]
pub(crate) struct Lru<V> {
    slots: HashMap<ChunkHash, Slot<V>>,
    order: BTreeMap<u64, ChunkHash>,
    tick: u64,
    used: u64,
    capacity: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    weight: u64,
    tick: u64,
}

impl<V: Clone> Lru<V> {
    pub(crate) fn new(capacity: u64) -> Lru<V> {
        Lru {
            slots: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            used: 0,
            capacity,
        }
    }

    /// True when `key` is held (its recency unchanged).
    pub(crate) fn contains(&self, key: &ChunkHash) -> bool {
        self.slots.contains_key(key)
    }

    /// The value for `key`, now the most recently used.
    pub(crate) fn get(&mut self, key: &ChunkHash) -> Option<V> {
        self.tick += 1;
        let slot = self.slots.get_mut(key)?;
        self.order.remove(&slot.tick);
        slot.tick = self.tick;
        self.order.insert(self.tick, *key);
        Some(slot.value.clone())
    }

    /// Inserts (or refreshes) `key`, then evicts the least recently used
    /// entries until the weights fit; returns what was evicted. An entry
    /// heavier than the whole capacity is not kept.
    pub(crate) fn insert(&mut self, key: ChunkHash, value: V, weight: u64) -> Vec<(ChunkHash, V)> {
        self.remove(&key);
        if weight > self.capacity {
            return Vec::new();
        }
        self.tick += 1;
        self.slots.insert(
            key,
            Slot {
                value,
                weight,
                tick: self.tick,
            },
        );
        self.order.insert(self.tick, key);
        self.used += weight;
        let mut evicted = Vec::new();
        while self.used > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.slots.remove(&oldest) {
                self.used -= slot.weight;
                evicted.push((oldest, slot.value));
            }
        }
        evicted
    }

    /// Forgets `key`.
    pub(crate) fn remove(&mut self, key: &ChunkHash) -> Option<V> {
        let slot = self.slots.remove(key)?;
        self.order.remove(&slot.tick);
        self.used -= slot.weight;
        Some(slot.value)
    }

    /// The sum of the weights held.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

/// The chunks a cache directory holds, oldest first (by modification
/// time), with their sizes: files named by 64 hex digits. Anything else
/// (temporary files of a write that was cut short) is removed.
pub(crate) fn scan_dir(dir: &Path) -> std::io::Result<Vec<(ChunkHash, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        match name.to_str().and_then(ChunkHash::from_hex) {
            Some(hash) => found.push((meta.modified()?, hash, meta.len())),
            None if name.to_string_lossy().ends_with(".tmp") => {
                let _ = std::fs::remove_file(entry.path());
            }
            None => {}
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, h, len)| (h, len)).collect())
}

/// Where chunk `hash` lives in cache directory `dir`.
pub(crate) fn chunk_file(dir: &Path, hash: &ChunkHash) -> PathBuf {
    dir.join(hash.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> ChunkHash {
        ChunkHash([n; 32])
    }

    #[test]
    fn evicts_least_recently_used_by_weight() {
        let mut lru = Lru::new(10);
        assert!(lru.insert(h(1), 1, 4).is_empty());
        assert!(lru.insert(h(2), 2, 4).is_empty());
        assert_eq!(lru.get(&h(1)), Some(1), "1 is now the most recent");
        let evicted = lru.insert(h(3), 3, 4);
        assert_eq!(evicted, vec![(h(2), 2)]);
        assert_eq!(lru.used(), 8);
        assert!(lru.insert(h(4), 4, 11).is_empty(), "too heavy to keep");
        assert_eq!(lru.get(&h(4)), None);
        assert_eq!(lru.len(), 2);
        assert_eq!(lru.remove(&h(1)), Some(1));
        assert_eq!(lru.used(), 4);
    }
}
