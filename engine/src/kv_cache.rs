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
    /// While cached: the block's tokens, and the cached block (id, registration) its KV was
    /// computed after (`None` for a sequence's first block). A hit compares both, so reuse
    /// never rests on the hash alone: a block is reused only after a prefix of the same
    /// tokens, all the way to the sequence's start.
    tokens: Vec<u32>,
    parent: Option<(u32, u64)>,
    /// Which registration this is (ids are reused after eviction).
    registration: u64,
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
    registrations: u64,
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
            registrations: 0,
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
            m.tokens = Vec::new();
            m.parent = None;
            if let Some(h) = m.hash.take() {
                self.cached.remove(&h);
                self.push_event(KvEvent::Removed { block_hash: h });
            }
            id
        };
        self.meta[id as usize].refs = 1;
        Some(id)
    }

    /// The cached blocks that hold the leading blocks of `tokens` (`hashes` are their chained
    /// hashes, one per full block of `block_size`): looked up by hash, and taken only when
    /// the block's tokens and the block it followed are the ones asked for.
    fn walk(&self, hashes: &[u64], tokens: &[u32], block_size: usize) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        let mut parent = None;
        for (i, h) in hashes.iter().enumerate() {
            let Some(&id) = self.cached.get(h) else { break };
            let m = &self.meta[id as usize];
            let want = tokens.get(i * block_size..(i + 1) * block_size);
            if want != Some(m.tokens.as_slice()) || m.parent != parent {
                break;
            }
            parent = Some((id, m.registration));
            out.push(id);
        }
        out
    }

    /// How many leading blocks of `tokens` are cached (see `walk`), and how many of those are
    /// unreferenced (so that taking them makes them unavailable to `allocate`). Changes
    /// nothing.
    pub fn peek_prefix(&self, hashes: &[u64], tokens: &[u32], block_size: usize) -> (usize, usize) {
        let hit = self.walk(hashes, tokens, block_size);
        let idle = hit
            .iter()
            .filter(|id| self.meta[**id as usize].refs == 0)
            .count();
        (hit.len(), idle)
    }

    /// The longest run of leading blocks of `tokens` that is cached (see `walk`); each hit
    /// block gains a reference.
    pub fn match_prefix(&mut self, hashes: &[u64], tokens: &[u32], block_size: usize) -> Vec<u32> {
        self.prefix_queries_blocks += hashes.len() as u64;
        let out = self.walk(hashes, tokens, block_size);
        for &id in &out {
            let m = &mut self.meta[id as usize];
            if let Some(t) = m.lru_tick.take() {
                self.lru.remove(&t);
            }
            m.refs += 1;
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

    /// Registers a full, written block under its hash, after `parent_block` (the sequence's
    /// previous block; `None` for its first). It stays private when another block already
    /// holds that hash (the same prefix computed twice at once, or a collision) or when its
    /// parent block is not cached itself (no lookup could verify the chain through it).
    pub fn register(
        &mut self,
        id: u32,
        hash: u64,
        parent: Option<u64>,
        parent_block: Option<u32>,
        tokens: &[u32],
    ) {
        if self.cached.contains_key(&hash) || self.meta[id as usize].hash.is_some() {
            return;
        }
        let parent_link = match parent_block {
            None => None,
            Some(p) => {
                let pm = &self.meta[p as usize];
                match (pm.hash, parent) {
                    (Some(ph), Some(want)) if ph == want && self.cached.get(&ph) == Some(&p) => {
                        Some((p, pm.registration))
                    }
                    _ => return,
                }
            }
        };
        self.registrations += 1;
        self.cached.insert(hash, id);
        let m = &mut self.meta[id as usize];
        m.hash = Some(hash);
        m.tokens = tokens.to_vec();
        m.parent = parent_link;
        m.registration = self.registrations;
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
        p.register(a, 11, None, None, &[1]);
        p.register(b, 22, Some(11), Some(a), &[2]);
        p.release(a);
        p.release(b);
        assert_eq!(p.used(), 0);
        assert_eq!(p.cached_idle(), 2);
        // A prefix hit takes the cached block back out of the LRU list.
        assert_eq!(p.match_prefix(&[11, 99], &[1, 3], 1), vec![a]);
        assert_eq!(p.used(), 1);
        // One free block, then the only evictable block (b) is taken.
        let c = p.allocate().unwrap();
        let d = p.allocate().unwrap();
        assert_ne!(c, a);
        assert_eq!(d, b);
        assert!(p.allocate().is_none());
        let ev = p.take_events();
        assert_eq!(ev.last(), Some(&KvEvent::Removed { block_hash: 22 }));
        assert_eq!(p.match_prefix(&[11, 22], &[1, 2], 1), vec![a]);
    }

    #[test]
    fn duplicate_hash_stays_private() {
        let mut p = BlockPool::new(2, 100);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 5, None, None, &[]);
        p.register(b, 5, None, None, &[]);
        p.release(b);
        // b was not cached, so it went straight back to the free list.
        assert_eq!(p.cached_idle(), 0);
        assert_eq!(p.available(), 1);
    }

    /// Forced collisions: every block hashes the same (or an attacker found two prefixes with
    /// one hash). A lookup reuses nothing that was computed over other tokens.
    #[test]
    fn a_colliding_hash_never_hands_out_another_prompts_kv() {
        let mut p = BlockPool::new(8, 100);
        // The attacker's two blocks [9, 9] [5, 6] under hashes 1 and 2.
        let a0 = p.allocate().unwrap();
        let a1 = p.allocate().unwrap();
        p.register(a0, 1, None, None, &[9, 9]);
        p.register(a1, 2, Some(1), Some(a0), &[5, 6]);
        // The victim's prompt [1, 2] [5, 6] collides with both hashes.
        let victim = [1, 2, 5, 6];
        assert_eq!(p.peek_prefix(&[1, 2], &victim, 2), (0, 0));
        assert!(p.match_prefix(&[1, 2], &victim, 2).is_empty());
        // The attacker's own prompt still hits.
        assert_eq!(p.match_prefix(&[1, 2], &[9, 9, 5, 6], 2), vec![a0, a1]);
    }

    /// The other order: the victim's first block is cached, then the attacker computes a
    /// colliding first block (kept private: the hash is taken) and a second block after it.
    /// That second block must not be reused after the victim's first block.
    #[test]
    fn a_block_computed_after_a_colliding_prefix_is_not_reused() {
        let mut p = BlockPool::new(8, 100);
        let v0 = p.allocate().unwrap();
        p.register(v0, 1, None, None, &[1, 2]);
        let a0 = p.allocate().unwrap();
        let a1 = p.allocate().unwrap();
        p.register(a0, 1, None, None, &[9, 9]); // private: hash 1 is taken
        p.register(a1, 2, Some(1), Some(a0), &[5, 6]); // private: its parent is not cached
        assert_eq!(p.match_prefix(&[1, 2], &[1, 2, 5, 6], 2), vec![v0]);
        // A child is reused only after the very registration it followed: once its parent's
        // id is evicted and registered anew, the child's chain is broken (a miss, never a
        // guess).
        let mut p = BlockPool::new(2, 100);
        let x0 = p.allocate().unwrap();
        let x1 = p.allocate().unwrap();
        p.register(x0, 1, None, None, &[1, 2]);
        p.register(x1, 2, Some(1), Some(x0), &[5, 6]);
        p.release(x0);
        p.release(x1);
        let y = p.allocate().unwrap();
        assert_eq!(y, x0, "the oldest idle block is evicted");
        p.register(y, 1, None, None, &[1, 2]);
        assert_eq!(p.match_prefix(&[1, 2], &[1, 2, 5, 6], 2), vec![y]);
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
