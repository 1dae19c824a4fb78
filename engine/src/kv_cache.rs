//! The paged KV cache: fixed-size blocks of KV rows ([`KvStore`]) and their bookkeeping
//! ([`BlockPool`]): reference counts, prefix caching by chained block hash (see [`crate::hash`]),
//! LRU eviction of unreferenced cached blocks, and KV events.
//!
//! A block holds `block_size` token slots of every layer. A token's row is
//! [kv_heads, head_dim] f32, the same layout the KV export uses. A block is *cached* once all
//! its slots are written and its hash is registered; a cached block whose reference count falls
//! to zero keeps its content and joins the LRU list, from which it is either reused by a prefix
//! hit or evicted (a `Removed` event) when a fresh block is needed.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// The storage of every block: per layer, K and V as `blocks × block_size × row` floats.
pub(crate) struct KvStore {
    block_size: usize,
    head_dim: usize,
    /// Floats per token row: kv_heads × head_dim.
    row: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvStore {
    pub fn new(
        layers: usize,
        blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> KvStore {
        let row = kv_heads * head_dim;
        let n = blocks * block_size * row;
        KvStore {
            block_size,
            head_dim,
            row,
            k: (0..layers).map(|_| vec![0f32; n]).collect(),
            v: (0..layers).map(|_| vec![0f32; n]).collect(),
        }
    }

    fn slot(&self, table: &[u32], pos: usize) -> usize {
        let block = table[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.row
    }

    /// Writes rows for positions `start..start + rows / row` of a sequence.
    pub fn write_rows(&mut self, layer: usize, table: &[u32], start: usize, k: &[f32], v: &[f32]) {
        let n = k.len() / self.row;
        for i in 0..n {
            let s = self.slot(table, start + i);
            let src = i * self.row..(i + 1) * self.row;
            self.k[layer][s..s + self.row].copy_from_slice(&k[src.clone()]);
            self.v[layer][s..s + self.row].copy_from_slice(&v[src]);
        }
    }

    /// Copies rows of positions `start..start + count` out, [count, kv_heads, head_dim].
    pub fn read_rows(
        &self,
        layer: usize,
        table: &[u32],
        start: usize,
        count: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut k = Vec::with_capacity(count * self.row);
        let mut v = Vec::with_capacity(count * self.row);
        for p in start..start + count {
            let s = self.slot(table, p);
            k.extend_from_slice(&self.k[layer][s..s + self.row]);
            v.extend_from_slice(&self.v[layer][s..s + self.row]);
        }
        (k, v)
    }

    /// Gathers positions `0..len` into contiguous [kv_heads, len, head_dim] buffers, the shape
    /// attention multiplies with.
    pub fn gather_head_major(
        &self,
        layer: usize,
        table: &[u32],
        len: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let hd = self.head_dim;
        let heads = self.row / hd;
        let mut k = vec![0f32; len * self.row];
        let mut v = vec![0f32; len * self.row];
        for p in 0..len {
            let s = self.slot(table, p);
            for h in 0..heads {
                let dst = (h * len + p) * hd;
                let src = s + h * hd;
                k[dst..dst + hd].copy_from_slice(&self.k[layer][src..src + hd]);
                v[dst..dst + hd].copy_from_slice(&self.v[layer][src..src + hd]);
            }
        }
        (k, v)
    }
}

/// A change of the set of cached blocks, for prefix-aware routers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEvent {
    /// A full block's KV is now cached under `block_hash`.
    Stored {
        block_hash: u64,
        /// The previous block's hash; `None` for a sequence's first block.
        parent_hash: Option<u64>,
        token_ids: Vec<u32>,
    },
    /// The block cached under `block_hash` was evicted.
    Removed { block_hash: u64 },
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    hash: Option<u64>,
    /// LRU key while unreferenced and cached.
    lru_tick: Option<u64>,
}

/// Block allocation, reference counts and the prefix cache.
pub(crate) struct BlockPool {
    meta: Vec<BlockMeta>,
    /// Blocks without content worth keeping.
    free: Vec<u32>,
    /// Registered hash -> block.
    cached: HashMap<u64, u32>,
    /// Unreferenced cached blocks, oldest first.
    lru: BTreeMap<u64, u32>,
    tick: u64,
    events: Vec<KvEvent>,
    events_max: usize,
    pub events_dropped: u64,
    pub prefix_queries_blocks: u64,
    pub prefix_hits_blocks: u64,
}

impl BlockPool {
    pub fn new(blocks: usize, events_max: usize) -> BlockPool {
        BlockPool {
            meta: vec![BlockMeta::default(); blocks],
            // Popped from the end: hand out low ids first, which reads better in tests and logs.
            free: (0..blocks as u32).rev().collect(),
            cached: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            events: Vec::new(),
            events_max,
            events_dropped: 0,
            prefix_queries_blocks: 0,
            prefix_hits_blocks: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that an allocation can get now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Unreferenced blocks that still hold cached KV.
    pub fn cached_idle(&self) -> usize {
        self.lru.len()
    }

    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    fn push_event(&mut self, e: KvEvent) {
        if self.events.len() >= self.events_max {
            // Bounded: a consumer that never drains loses the oldest events, counted.
            self.events.remove(0);
            self.events_dropped += 1;
        }
        self.events.push(e);
    }

    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// One fresh block with reference count 1, evicting the least recently used cached block
    /// when no free one is left.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = if let Some(id) = self.free.pop() {
            id
        } else {
            let (&tick, &id) = self.lru.iter().next()?;
            self.lru.remove(&tick);
            let m = &mut self.meta[id as usize];
            m.lru_tick = None;
            if let Some(h) = m.hash.take() {
                self.cached.remove(&h);
                self.push_event(KvEvent::Removed { block_hash: h });
            }
            id
        };
        self.meta[id as usize].refs = 1;
        Some(id)
    }

    /// How many leading `hashes` are cached, and how many of those are unreferenced (so that
    /// taking them makes them unavailable to `allocate`). Changes nothing.
    pub fn peek_prefix(&self, hashes: &[u64]) -> (usize, usize) {
        let mut hits = 0;
        let mut idle = 0;
        for h in hashes {
            let Some(&id) = self.cached.get(h) else { break };
            hits += 1;
            if self.meta[id as usize].refs == 0 {
                idle += 1;
            }
        }
        (hits, idle)
    }

    /// The longest run of leading `hashes` that is cached; each hit block gains a reference.
    pub fn match_prefix(&mut self, hashes: &[u64]) -> Vec<u32> {
        self.prefix_queries_blocks += hashes.len() as u64;
        let mut out = Vec::new();
        for h in hashes {
            let Some(&id) = self.cached.get(h) else { break };
            let m = &mut self.meta[id as usize];
            if let Some(t) = m.lru_tick.take() {
                self.lru.remove(&t);
            }
            m.refs += 1;
            out.push(id);
        }
        self.prefix_hits_blocks += out.len() as u64;
        out
    }

    /// Drops one reference; an unreferenced block returns to the free list, or to the LRU list
    /// when it is cached.
    pub fn release(&mut self, id: u32) {
        let m = &mut self.meta[id as usize];
        debug_assert!(m.refs > 0, "release of an unreferenced block {id}");
        m.refs = m.refs.saturating_sub(1);
        if m.refs == 0 {
            if m.hash.is_some() {
                self.tick += 1;
                m.lru_tick = Some(self.tick);
                self.lru.insert(self.tick, id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Registers a full, written block under its hash. When another block already holds that
    /// hash (two sequences computed the same prefix at once), this one stays private.
    pub fn register(&mut self, id: u32, hash: u64, parent: Option<u64>, tokens: &[u32]) {
        if self.cached.contains_key(&hash) || self.meta[id as usize].hash.is_some() {
            return;
        }
        self.cached.insert(hash, id);
        self.meta[id as usize].hash = Some(hash);
        self.push_event(KvEvent::Stored {
            block_hash: hash,
            parent_hash: parent,
            token_ids: tokens.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_reused_then_evicted_oldest_first() {
        let mut p = BlockPool::new(3, 100);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 11, None, &[1]);
        p.register(b, 22, Some(11), &[2]);
        p.release(a);
        p.release(b);
        assert_eq!(p.used(), 0);
        assert_eq!(p.cached_idle(), 2);
        // A prefix hit takes the cached block back out of the LRU list.
        assert_eq!(p.match_prefix(&[11, 99]), vec![a]);
        assert_eq!(p.used(), 1);
        // One free block, then the only evictable block (b) is taken.
        let c = p.allocate().unwrap();
        let d = p.allocate().unwrap();
        assert_ne!(c, a);
        assert_eq!(d, b);
        assert!(p.allocate().is_none());
        let ev = p.take_events();
        assert_eq!(ev.last(), Some(&KvEvent::Removed { block_hash: 22 }));
        assert_eq!(p.match_prefix(&[11, 22]), vec![a]);
    }

    #[test]
    fn duplicate_hash_stays_private() {
        let mut p = BlockPool::new(2, 100);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 5, None, &[]);
        p.register(b, 5, None, &[]);
        p.release(b);
        // b was not cached, so it went straight back to the free list.
        assert_eq!(p.cached_idle(), 0);
        assert_eq!(p.available(), 1);
    }

    #[test]
    fn store_round_trips_rows_across_blocks() {
        let mut s = KvStore::new(1, 4, 2, 2, 2);
        let table = [3u32, 1, 0];
        let k: Vec<f32> = (0..20).map(|x| x as f32).collect();
        let v: Vec<f32> = (0..20).map(|x| -(x as f32)).collect();
        s.write_rows(0, &table, 0, &k, &v);
        let (k2, v2) = s.read_rows(0, &table, 1, 3);
        assert_eq!(k2, k[4..16].to_vec());
        assert_eq!(v2, v[4..16].to_vec());
        let (kh, _) = s.gather_head_major(0, &table, 2);
        // head 0 of tokens 0 and 1, then head 1 of both.
        assert_eq!(kh, vec![0., 1., 4., 5., 2., 3., 6., 7.]);
    }
}
