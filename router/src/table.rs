//! A hash table from block hash to index entry with steady latency.
//!
//! std's `HashMap` deletes with tombstones and, once they fill its spare capacity under the
//! constant insert-and-evict traffic of a full index, rehashes the whole table in place: an
//! O(entries) pause on whichever routing decision triggers it. This table uses linear probing with
//! backward-shift deletion instead, so there are no tombstones and a full index never rehashes;
//! it only doubles while filling (load factor at most 1/2). Keys are block hashes derived from
//! prompts, so buckets are placed by a keyed folded multiply (the mix of foldhash and aHash:
//! the 128-bit product of `key ^ k0` and `k1`, high half xor low half) with keys drawn from
//! std's `RandomState`: without the keys, crafted prompts cannot aim at one probe run. It costs a
//! nanosecond or two where SipHash costs about twenty, and every block of a request is hashed.

use std::hash::{BuildHasher, RandomState};

const EMPTY: u32 = u32::MAX;
const CAPACITY_MIN: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    key: u64,
    /// The value; `EMPTY` marks a free bucket.
    value: u32,
    /// Where `key` hashes to (kept so that deletion need not rehash).
    home: u32,
}

const FREE: Bucket = Bucket {
    key: 0,
    value: EMPTY,
    home: 0,
};

#[derive(Debug)]
pub(crate) struct BlockTable {
    buckets: Box<[Bucket]>,
    mask: usize,
    len: usize,
    k0: u64,
    k1: u64,
}

impl BlockTable {
    pub(crate) fn new() -> Self {
        let keys = RandomState::new();
        BlockTable {
            buckets: vec![FREE; CAPACITY_MIN].into_boxed_slice(),
            mask: CAPACITY_MIN - 1,
            len: 0,
            k0: keys.hash_one(0x243F_6A88_85A3_08D3_u64),
            k1: keys.hash_one(0x1319_8A2E_0370_7344_u64) | 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn home(&self, key: u64) -> usize {
        let product = u128::from(key ^ self.k0) * u128::from(self.k1);
        ((product >> 64) as u64 ^ product as u64) as usize & self.mask
    }

    /// The bucket holding `key`, or the free bucket that ends its probe run; and `key`'s home.
    fn find(&self, key: u64) -> (usize, bool, usize) {
        let home = self.home(key);
        let mut i = home;
        loop {
            let b = &self.buckets[i];
            if b.value == EMPTY {
                return (i, false, home);
            }
            if b.key == key {
                return (i, true, home);
            }
            i = (i + 1) & self.mask;
        }
    }

    pub(crate) fn get(&self, key: u64) -> Option<u32> {
        match self.find(key) {
            (i, true, _) => Some(self.buckets[i].value),
            _ => None,
        }
    }

    /// Inserts or replaces.
    pub(crate) fn insert(&mut self, key: u64, value: u32) {
        debug_assert_ne!(value, EMPTY);
        if (self.len + 1) * 2 > self.buckets.len() {
            self.grow();
        }
        let (i, found, home) = self.find(key);
        if !found {
            self.len += 1;
        }
        self.buckets[i] = Bucket {
            key,
            value,
            home: home as u32,
        };
    }

    pub(crate) fn remove(&mut self, key: u64) -> Option<u32> {
        let (mut hole, found, _) = self.find(key);
        if !found {
            return None;
        }
        let value = self.buckets[hole].value;
        self.len -= 1;
        // Shift back every later member of the run that may move into the hole (its home is
        // not cyclically within (hole, j]), so that no lookup stops early at the gap.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let b = self.buckets[j];
            if b.value == EMPTY {
                break;
            }
            let from_home = j.wrapping_sub(b.home as usize) & self.mask;
            let from_hole = j.wrapping_sub(hole) & self.mask;
            if from_home >= from_hole {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = FREE;
        Some(value)
    }

    fn grow(&mut self) {
        let capacity = self.buckets.len() * 2;
        assert!(
            capacity as u64 <= 1 << 32,
            "block table beyond 2^32 buckets"
        );
        let old = std::mem::replace(&mut self.buckets, vec![FREE; capacity].into_boxed_slice());
        self.mask = capacity - 1;
        self.len = 0;
        for b in old.iter().filter(|b| b.value != EMPTY) {
            self.insert(b.key, b.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn agrees_with_a_hash_map_under_churn() {
        let mut t = BlockTable::new();
        let mut m = HashMap::new();
        let mut x = 3u64;
        for step in 0..200_000u32 {
            x = crate::hash::finalize(x);
            // Few distinct keys so that runs collide, inserts replace and removes hit.
            let key = x % 3000;
            if (x >> 40).is_multiple_of(3) {
                assert_eq!(t.remove(key), m.remove(&key), "step {step}");
            } else {
                t.insert(key, step);
                m.insert(key, step);
            }
            assert_eq!(t.len(), m.len());
            if step.is_multiple_of(1000) {
                for k in 0..3000 {
                    assert_eq!(t.get(k), m.get(&k).copied(), "step {step} key {k}");
                }
            }
        }
        assert!(
            t.buckets.len() <= 8192,
            "never more than twice the peak length, rounded up"
        );
    }
}
