//! The prefix index: which engines are believed to hold which prefix blocks.
//!
//! One entry per block hash (see [`crate::block_hashes`]), holding the set of engine slots that
//! were sent a request with that block. Engines get small integer slots (reused after
//! [`PrefixIndex::forget`]) so that an entry's engine set is a fixed 256-bit set and the overlap
//! of every candidate is found in one walk over the request's blocks: intersect the set of
//! engines still matching with each block's set, and stop when it is empty.
//!
//! Bound: at most `entries_max` entries, evicted least recently recorded first. Recency is an
//! intrusive doubly linked list over a slab of entries, so a touch and an eviction are O(1) and
//! there is no periodic sweep (no latency spikes). [`PrefixIndex::record`] touches a request's
//! blocks from last to first, so its leading blocks are the most recent and eviction trims
//! prefixes from their tails: a surviving entry is almost always reachable from block 0.
//! At most [`ENGINE_SLOTS_MAX`] engines have slots; recording an engine beyond that forgets the
//! engine least recently recorded.

use std::collections::HashMap;

use crate::table::BlockTable;

/// How many engines the index tracks at once (one router serves one deployment; beyond this the
/// engine least recently recorded is forgotten).
pub const ENGINE_SLOTS_MAX: usize = 256;
/// Largest `index_entries_max` (2^30 entries, about 80 GiB of index; its table stays within 2^32 buckets).
pub const INDEX_ENTRIES_MAX: usize = 1 << 30;
const WORDS: usize = ENGINE_SLOTS_MAX / 64;
const NIL: u32 = u32::MAX;

/// A set of engine slots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SlotSet([u64; WORDS]);

impl SlotSet {
    pub(crate) const EMPTY: SlotSet = SlotSet([0; WORDS]);

    pub(crate) fn insert(&mut self, slot: u32) {
        self.0[slot as usize / 64] |= 1 << (slot % 64);
    }

    fn remove(&mut self, slot: u32) {
        self.0[slot as usize / 64] &= !(1 << (slot % 64));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn union_with(&mut self, other: &SlotSet) {
        for (w, o) in self.0.iter_mut().zip(other.0) {
            *w |= o;
        }
    }

    fn and(&self, other: &SlotSet) -> SlotSet {
        SlotSet(std::array::from_fn(|i| self.0[i] & other.0[i]))
    }

    fn and_not(&self, other: &SlotSet) -> SlotSet {
        SlotSet(std::array::from_fn(|i| self.0[i] & !other.0[i]))
    }

    fn for_each(&self, mut f: impl FnMut(usize)) {
        for (i, &w) in self.0.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                f(i * 64 + w.trailing_zeros() as usize);
                w &= w - 1;
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    hash: u64,
    engines: SlotSet,
    /// Towards the most recently recorded (`NIL` at the head).
    newer: u32,
    /// Towards the least recently recorded (`NIL` at the tail).
    older: u32,
}

#[derive(Debug)]
pub(crate) struct PrefixIndex {
    entries_max: usize,
    /// Block hash -> position in `slab`.
    by_hash: BlockTable,
    slab: Vec<Entry>,
    free_entries: Vec<u32>,
    /// Most recently recorded entry.
    head: u32,
    /// Least recently recorded entry, evicted first.
    tail: u32,
    slot_of: HashMap<String, u32>,
    /// Slot -> engine name (`None`: free).
    engine_of: Vec<Option<String>>,
    /// Slot -> value of `records` at the engine's last record, to pick a slot to reclaim.
    recorded_at: Vec<u64>,
    free_slots: Vec<u32>,
    records: u64,
}

impl PrefixIndex {
    pub(crate) fn new(entries_max: usize) -> Self {
        assert!(
            (1..=INDEX_ENTRIES_MAX).contains(&entries_max),
            "entries_max out of range"
        );
        PrefixIndex {
            entries_max,
            by_hash: BlockTable::new(),
            slab: Vec::new(),
            free_entries: Vec::new(),
            head: NIL,
            tail: NIL,
            slot_of: HashMap::new(),
            engine_of: Vec::new(),
            recorded_at: Vec::new(),
            free_slots: Vec::new(),
            records: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub(crate) fn engines(&self) -> usize {
        self.slot_of.len()
    }

    pub(crate) fn slot(&self, engine: &str) -> Option<u32> {
        self.slot_of.get(engine).copied()
    }

    /// For each slot in `engines`, how many leading `blocks` it holds, written to `depth[slot]`
    /// (other positions are left alone). One map lookup per block, stopping at the first block
    /// that none of `engines` holds.
    pub(crate) fn leading_matches(
        &self,
        blocks: &[u64],
        engines: SlotSet,
        depth: &mut [u32; ENGINE_SLOTS_MAX],
    ) {
        let mut live = engines;
        for (i, hash) in blocks.iter().enumerate() {
            if live.is_empty() {
                return;
            }
            let held = match self.by_hash.get(*hash) {
                Some(e) => self.slab[e as usize].engines,
                None => SlotSet::EMPTY,
            };
            let still = live.and(&held);
            live.and_not(&still).for_each(|s| depth[s] = i as u32);
            live = still;
        }
        let all = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
        live.for_each(|s| depth[s] = all);
    }

    /// How many leading `blocks` `engine` holds.
    pub(crate) fn overlap(&self, engine: &str, blocks: &[u64]) -> u32 {
        let Some(slot) = self.slot(engine) else {
            return 0;
        };
        let mut set = SlotSet::EMPTY;
        set.insert(slot);
        let mut depth = [0; ENGINE_SLOTS_MAX];
        self.leading_matches(blocks, set, &mut depth);
        depth[slot as usize]
    }

    /// Remembers that each of `engines` holds `blocks` (one pass for all); they become the most
    /// recently recorded entries, the first block most recent of all.
    pub(crate) fn record(&mut self, engines: &[&str], blocks: &[u64]) {
        if blocks.is_empty() || engines.is_empty() {
            return;
        }
        self.records += 1;
        let mut set = SlotSet::EMPTY;
        for engine in engines {
            let slot = self.slot_or_assign(engine);
            // Marked at once, so that the next engine of this call cannot reclaim the slot.
            self.recorded_at[slot as usize] = self.records;
            set.insert(slot);
        }
        for &hash in blocks.iter().rev() {
            let e = match self.by_hash.get(hash) {
                Some(e) => {
                    self.unlink(e);
                    e
                }
                None => {
                    if self.by_hash.len() >= self.entries_max {
                        self.evict_oldest();
                    }
                    let e = self.alloc(hash);
                    self.by_hash.insert(hash, e);
                    e
                }
            };
            self.slab[e as usize].engines.union_with(&set);
            self.push_newest(e);
        }
    }

    /// Forgets `engine`: clears it from every entry (O(entries); engines come and go rarely)
    /// and frees its slot. Entries no engine holds any more are dropped.
    pub(crate) fn forget(&mut self, engine: &str) {
        let Some(slot) = self.slot_of.remove(engine) else {
            return;
        };
        self.engine_of[slot as usize] = None;
        self.free_slots.push(slot);
        let mut e = self.head;
        while e != NIL {
            let next = self.slab[e as usize].older;
            let entry = &mut self.slab[e as usize];
            entry.engines.remove(slot);
            if entry.engines.is_empty() {
                let hash = entry.hash;
                self.unlink(e);
                self.by_hash.remove(hash);
                self.free_entries.push(e);
            }
            e = next;
        }
    }

    fn slot_or_assign(&mut self, engine: &str) -> u32 {
        if let Some(slot) = self.slot(engine) {
            return slot;
        }
        let slot = if let Some(slot) = self.free_slots.pop() {
            slot
        } else if self.engine_of.len() < ENGINE_SLOTS_MAX {
            self.engine_of.push(None);
            self.recorded_at.push(0);
            (self.engine_of.len() - 1) as u32
        } else {
            // Every slot is taken: reclaim the engine least recently recorded.
            let (oldest, _) = self
                .recorded_at
                .iter()
                .enumerate()
                .min_by_key(|(_, at)| **at)
                .expect("ENGINE_SLOTS_MAX > 0");
            let name = self.engine_of[oldest].clone().expect("all slots are taken");
            self.forget(&name);
            self.free_slots.pop().expect("forget freed a slot")
        };
        self.slot_of.insert(engine.to_owned(), slot);
        self.engine_of[slot as usize] = Some(engine.to_owned());
        slot
    }

    fn alloc(&mut self, hash: u64) -> u32 {
        let entry = Entry {
            hash,
            engines: SlotSet::EMPTY,
            newer: NIL,
            older: NIL,
        };
        if let Some(e) = self.free_entries.pop() {
            self.slab[e as usize] = entry;
            e
        } else {
            self.slab.push(entry);
            (self.slab.len() - 1) as u32
        }
    }

    fn evict_oldest(&mut self) {
        let e = self.tail;
        debug_assert_ne!(e, NIL, "evicting from an empty index");
        if e == NIL {
            return;
        }
        self.unlink(e);
        self.by_hash.remove(self.slab[e as usize].hash);
        self.free_entries.push(e);
    }

    fn unlink(&mut self, e: u32) {
        let (newer, older) = {
            let entry = &self.slab[e as usize];
            (entry.newer, entry.older)
        };
        if newer == NIL {
            self.head = older;
        } else {
            self.slab[newer as usize].older = older;
        }
        if older == NIL {
            self.tail = newer;
        } else {
            self.slab[older as usize].newer = newer;
        }
        let entry = &mut self.slab[e as usize];
        entry.newer = NIL;
        entry.older = NIL;
    }

    fn push_newest(&mut self, e: u32) {
        let old_head = self.head;
        {
            let entry = &mut self.slab[e as usize];
            entry.newer = NIL;
            entry.older = old_head;
        }
        if old_head == NIL {
            self.tail = e;
        } else {
            self.slab[old_head as usize].newer = e;
        }
        self.head = e;
    }

    /// Checks the list, the map and the slab agree (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut n = 0;
        let mut e = self.head;
        let mut newer = NIL;
        while e != NIL {
            let entry = &self.slab[e as usize];
            assert_eq!(entry.newer, newer);
            assert_eq!(self.by_hash.get(entry.hash), Some(e));
            assert!(!entry.engines.is_empty());
            n += 1;
            newer = e;
            e = entry.older;
        }
        assert_eq!(self.tail, newer);
        assert_eq!(n, self.by_hash.len());
        assert!(n <= self.entries_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(from: u64, n: u64) -> Vec<u64> {
        (from..from + n).collect()
    }

    #[test]
    fn bound_is_respected_and_leading_blocks_survive() {
        let mut ix = PrefixIndex::new(100);
        let b = blocks(0, 1000);
        ix.record(&["e"], &b);
        ix.check();
        assert_eq!(ix.len(), 100);
        assert_eq!(ix.overlap("e", &b), 100, "the first 100 blocks are kept");
    }

    #[test]
    fn least_recently_recorded_is_evicted_first() {
        let mut ix = PrefixIndex::new(20);
        let a = blocks(0, 10);
        let b = blocks(100, 10);
        let c = blocks(200, 10);
        ix.record(&["e"], &a);
        ix.record(&["e"], &b);
        ix.record(&["e"], &a); // a is now more recent than b
        ix.record(&["e"], &c); // evicts b
        ix.check();
        assert_eq!(ix.overlap("e", &a), 10);
        assert_eq!(ix.overlap("e", &b), 0);
        assert_eq!(ix.overlap("e", &c), 10);
    }

    #[test]
    fn one_walk_gives_every_engines_depth() {
        let mut ix = PrefixIndex::new(1000);
        let b = blocks(0, 50);
        ix.record(&["a"], &b[..10]);
        ix.record(&["b"], &b[..30]);
        ix.record(&["c"], &b);
        ix.record(&["d"], &blocks(500, 5));
        let mut set = SlotSet::EMPTY;
        for e in ["a", "b", "c", "d"] {
            set.insert(ix.slot(e).unwrap());
        }
        let mut depth = [u32::MAX; ENGINE_SLOTS_MAX];
        ix.leading_matches(&b, set, &mut depth);
        let d = |e: &str| depth[ix.slot(e).unwrap() as usize];
        assert_eq!((d("a"), d("b"), d("c"), d("d")), (10, 30, 50, 0));
        // A hole in the middle ends the prefix, even if later blocks are held.
        let mut holey = b.clone();
        holey[20] = 9999;
        assert_eq!(ix.overlap("c", &holey), 20);
    }

    #[test]
    fn forget_clears_and_reuses_the_slot() {
        let mut ix = PrefixIndex::new(1000);
        ix.record(&["a"], &blocks(0, 10));
        ix.record(&["b"], &blocks(5, 10));
        let slot_a = ix.slot("a").unwrap();
        ix.forget("a");
        ix.check();
        assert_eq!(ix.len(), 10, "b's blocks stay");
        assert_eq!(ix.overlap("a", &blocks(0, 10)), 0);
        assert_eq!(ix.overlap("b", &blocks(5, 10)), 10);
        ix.record(&["c"], &blocks(0, 3));
        assert_eq!(ix.slot("c"), Some(slot_a));
        assert_eq!(ix.engines(), 2);
        ix.forget("nobody");
        ix.check();
    }

    #[test]
    fn beyond_the_slot_limit_the_least_recent_engine_is_forgotten() {
        let mut ix = PrefixIndex::new(10_000);
        for i in 0..ENGINE_SLOTS_MAX {
            ix.record(&[&format!("e{i}")], &[i as u64]);
        }
        ix.record(&["e0"], &[0]); // e1 is now the least recently recorded
        ix.record(&["new"], &[7777]);
        ix.check();
        assert_eq!(ix.engines(), ENGINE_SLOTS_MAX);
        assert_eq!(ix.slot("e1"), None);
        assert_eq!(ix.overlap("e0", &[0]), 1);
        assert_eq!(ix.overlap("new", &[7777]), 1);
    }

    #[test]
    fn random_operations_keep_the_structure_consistent() {
        let mut ix = PrefixIndex::new(64);
        let mut x = 1u64;
        for _ in 0..5000 {
            x = crate::hash::finalize(x);
            let engine = format!("e{}", x % 5);
            match (x >> 8) % 10 {
                0 => ix.forget(&engine),
                _ => {
                    let start = (x >> 16) % 100;
                    ix.record(&[&engine], &blocks(start, (x >> 32) % 40));
                }
            }
            ix.check();
        }
    }
}
