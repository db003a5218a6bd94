//! The device-resident source cache: what the backend uploaded of each
//! source tensor ([`SourceKey`]), kept in device memory so that a later box
//! copy reading the same bytes (a range several destination files need, a
//! replicated tensor, a LoRA factor every shard of a weight uses) is served
//! on the device instead of crossing host→device again.
//!
//! # Rule
//!
//! * An entry is a dense box of one source tensor, in the source's dtype,
//!   exactly as the source stores it (no cast: one upload serves copies to
//!   any dtype). A copy's source box is split into the parts already cached
//!   (served from their entries, on the device) and the rest, which is
//!   uploaded as new entries. Entries of one key never overlap, so a byte is
//!   uploaded once as long as its entry lives: per byte, not only in total.
//! * Entries hold at most `budget` bytes (device blocks as allocated). To
//!   make room, the least recently used entries are evicted; a byte is
//!   uploaded again only if its entry was evicted, i.e. only when the bytes
//!   a job reads on the device exceed the budget. A part larger than the
//!   whole budget is not cached (it streams through the staging buffers).
//! * When a device allocation fails (out of memory), every entry is dropped
//!   before the pool is trimmed: the cache yields to the job's buffers.
//! * A job's entries go when it ends ([`SourceCache::forget`]).

use std::collections::{BTreeMap, HashMap};

use super::pool::Block;
use crate::backend::SourceKey;

/// A box of a tensor: corner and extent per axis (source axis order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Region {
    pub lo: Vec<u64>,
    pub len: Vec<u64>,
}

impl Region {
    pub fn elements(&self) -> u64 {
        self.len.iter().product()
    }

    /// The common part of two boxes of the same tensor.
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let mut out = self.clone();
        for a in 0..self.lo.len() {
            let lo = self.lo[a].max(other.lo[a]);
            let hi = (self.lo[a] + self.len[a]).min(other.lo[a] + other.len[a]);
            if hi <= lo {
                return None;
            }
            out.lo[a] = lo;
            out.len[a] = hi - lo;
        }
        Some(out)
    }

    /// `self` minus `other`, as disjoint boxes (at most two per axis).
    pub fn subtract(&self, other: &Region) -> Vec<Region> {
        if self.intersect(other).is_none() {
            return vec![self.clone()];
        }
        let mut out = Vec::new();
        let mut rest = self.clone();
        for a in 0..self.lo.len() {
            let (lo, hi) = (rest.lo[a], rest.lo[a] + rest.len[a]);
            let (olo, ohi) = (other.lo[a], other.lo[a] + other.len[a]);
            if lo < olo {
                let mut below = rest.clone();
                below.len[a] = olo - lo;
                out.push(below);
            }
            if ohi < hi {
                let mut above = rest.clone();
                above.lo[a] = ohi;
                above.len[a] = hi - ohi;
                out.push(above);
            }
            rest.lo[a] = lo.max(olo);
            rest.len[a] = hi.min(ohi) - rest.lo[a];
        }
        out
    }
}

/// One cached box and its device copy.
struct Entry {
    key: SourceKey,
    region: Region,
    block: Block,
    /// Position in the recency order (`SourceCache::lru`).
    stamp: u64,
}

/// What the cache did, for [`super::AscendStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes uploaded into the cache (each a first upload unless evicted).
    pub uploaded_bytes: u64,
    /// Source bytes of box copies served from cached entries.
    pub hit_bytes: u64,
    /// Device bytes of entries evicted to stay within the budget or dropped
    /// on out of memory (blocks as allocated: rounded up).
    pub evicted_bytes: u64,
    /// Source bytes uploaded without caching (a part larger than the budget,
    /// or no device memory for it).
    pub uncached_bytes: u64,
    /// Device bytes held now.
    pub held_bytes: u64,
    /// The budget in bytes.
    pub budget_bytes: u64,
}

/// The parts of a source box: served from entries, or to upload.
pub(crate) struct Lookup {
    /// (entry id, entry's region, the part it serves).
    pub hits: Vec<(u64, Region, Region)>,
    pub misses: Vec<Region>,
}

pub(crate) struct SourceCache {
    budget: usize,
    held: usize,
    /// Next entry id and recency stamp.
    next: u64,
    by_key: HashMap<SourceKey, Vec<u64>>,
    entries: HashMap<u64, Entry>,
    /// Recency order: stamp → entry id, oldest first.
    lru: BTreeMap<u64, u64>,
    /// The entry a device copy is being enqueued from: [`SourceCache::clear`]
    /// (on out of memory, in the middle of that copy) keeps it.
    pub in_use: Option<u64>,
    pub stats: CacheStats,
}

impl SourceCache {
    pub fn new(budget: usize) -> SourceCache {
        SourceCache {
            budget,
            held: 0,
            next: 0,
            by_key: HashMap::new(),
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            in_use: None,
            stats: CacheStats {
                budget_bytes: budget as u64,
                ..CacheStats::default()
            },
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    fn tick(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Splits `need` into the parts cached under `key` and the rest.
    pub fn lookup(&mut self, key: &SourceKey, need: &Region, es: u64) -> Lookup {
        let mut out = Lookup {
            hits: Vec::new(),
            misses: vec![need.clone()],
        };
        let ids = self.by_key.get(key).cloned().unwrap_or_default();
        for id in ids {
            let stamp = self.tick();
            let e = self.entries.get_mut(&id).expect("indexed entry");
            let mut rest = Vec::new();
            let mut used = false;
            for m in std::mem::take(&mut out.misses) {
                match m.intersect(&e.region) {
                    Some(part) => {
                        used = true;
                        self.stats.hit_bytes += part.elements() * es;
                        out.hits.push((id, e.region.clone(), part));
                        rest.extend(m.subtract(&e.region));
                    }
                    None => rest.push(m),
                }
            }
            if used {
                self.lru.remove(&e.stamp);
                e.stamp = stamp;
                self.lru.insert(stamp, id);
            }
            out.misses = rest;
            if out.misses.is_empty() {
                break;
            }
        }
        out
    }

    /// Evicts least recently used entries until `bytes` more fit; `false`
    /// when they cannot (larger than the budget). Evicted blocks go back to
    /// the pool: work already enqueued on the compute stream still reads
    /// them first (the pool's ordering rule), and the copy stream waits for
    /// that work before it writes a block again (`source.rs`).
    pub fn make_room(&mut self, bytes: usize) -> bool {
        if bytes > self.budget {
            return false;
        }
        while self.held + bytes > self.budget {
            let Some((_, id)) = self.lru.pop_first() else {
                return false;
            };
            let n = self.remove(id);
            self.stats.evicted_bytes += n as u64;
        }
        true
    }

    /// The device address of entry `id`, if it is still cached.
    pub fn ptr(&self, id: u64) -> Option<*mut std::ffi::c_void> {
        self.entries.get(&id).map(|e| e.block.mem().ptr())
    }

    /// Adds an entry; its id.
    pub fn insert(&mut self, key: &SourceKey, region: Region, block: Block, bytes: usize) -> u64 {
        let (id, stamp) = (self.tick(), self.tick());
        self.held += block.mem().len();
        self.stats.held_bytes = self.held as u64;
        self.stats.uploaded_bytes += bytes as u64;
        self.by_key.entry(key.clone()).or_default().push(id);
        self.lru.insert(stamp, id);
        self.entries.insert(
            id,
            Entry {
                key: key.clone(),
                region,
                block,
                stamp,
            },
        );
        id
    }

    /// Removes entry `id` (not its recency stamp); its device bytes.
    fn remove(&mut self, id: u64) -> usize {
        let e = self.entries.remove(&id).expect("indexed entry");
        if let Some(ids) = self.by_key.get_mut(&e.key) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_key.remove(&e.key);
            }
        }
        let n = e.block.mem().len();
        self.held -= n;
        self.stats.held_bytes = self.held as u64;
        n
    }

    /// Drops every entry of job `job` (its run ended).
    pub fn forget(&mut self, job: u64) {
        let ids: Vec<u64> = self
            .by_key
            .iter()
            .filter(|(k, _)| k.job == job)
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        for id in ids {
            let stamp = self.entries[&id].stamp;
            self.lru.remove(&stamp);
            self.remove(id);
        }
    }

    /// Drops every entry but the one in use (out of device memory).
    pub fn clear(&mut self) {
        let ids: Vec<(u64, u64)> = self.lru.iter().map(|(s, i)| (*s, *i)).collect();
        for (stamp, id) in ids {
            if Some(id) != self.in_use {
                self.lru.remove(&stamp);
                let n = self.remove(id);
                self.stats.evicted_bytes += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(lo: &[u64], len: &[u64]) -> Region {
        Region {
            lo: lo.to_vec(),
            len: len.to_vec(),
        }
    }

    /// Every point of `a` is in exactly one of `parts` ∪ (a ∩ b), and no
    /// point of a part is in `b`.
    #[test]
    fn subtract_partitions_the_rest() {
        let cases = [
            (r(&[0, 0], &[6, 8]), r(&[2, 3], &[2, 2])),
            (r(&[0, 0], &[6, 8]), r(&[0, 0], &[6, 8])),
            (r(&[1, 1], &[4, 4]), r(&[0, 3], &[9, 9])),
            (r(&[0, 0], &[3, 3]), r(&[5, 5], &[1, 1])),
            (r(&[0, 0, 0], &[3, 4, 5]), r(&[1, 0, 2], &[1, 9, 1])),
            (r(&[], &[]), r(&[], &[])),
        ];
        for (a, b) in cases {
            let parts = a.subtract(&b);
            let inside = |x: &Region, p: &[u64]| {
                (0..p.len()).all(|d| p[d] >= x.lo[d] && p[d] < x.lo[d] + x.len[d])
            };
            let n = a.lo.len();
            for i in 0..a.elements() {
                let mut p = vec![0u64; n];
                let mut rest = i;
                for d in (0..n).rev() {
                    p[d] = a.lo[d] + rest % a.len[d];
                    rest /= a.len[d];
                }
                let k =
                    parts.iter().filter(|x| inside(x, &p)).count() + usize::from(inside(&b, &p));
                assert_eq!(k, 1, "{a:?} - {b:?} at {p:?}: {parts:?}");
            }
            let covered: u64 = parts.iter().map(Region::elements).sum::<u64>()
                + a.intersect(&b).map_or(0, |x| x.elements());
            assert_eq!(covered, a.elements());
        }
    }
}
