//! Hash functions that other processes must be able to recompute: the chained block hash
//! (prefix caching, KV events, router overlap) and the model fingerprint.
//!
//! **Block hash** (`BLOCK_HASH_FUNCTION` = `fnv1a64-chained-u32le-v1`): FNV-1a 64
//! (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`) over the bytes
//! `parent_hash as u64 little-endian (8 bytes)` followed by each token id of the block as
//! `u32 little-endian (4 bytes)`. The first block of a sequence uses `parent_hash = 0`. Only
//! full blocks (exactly `block_size` tokens) are hashed. A router with the token ids and the
//! block size computes the same hashes with [`block_hashes`].

/// The name of the block hash function, as announced in the protocol's hello.
pub const BLOCK_HASH_FUNCTION: &str = "fnv1a64-chained-u32le-v1";

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 over `bytes`, continuing from `state` (start with [`fnv1a64_start`]).
pub fn fnv1a64_update(mut state: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        state ^= u64::from(*b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// The FNV-1a 64 offset basis.
pub fn fnv1a64_start() -> u64 {
    FNV_OFFSET
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_update(FNV_OFFSET, bytes)
}

/// The hash of one full block given its parent's hash (0 for the first block).
pub fn block_hash(parent_hash: u64, tokens: &[u32]) -> u64 {
    let mut h = fnv1a64_update(FNV_OFFSET, &parent_hash.to_le_bytes());
    for t in tokens {
        h = fnv1a64_update(h, &t.to_le_bytes());
    }
    h
}

/// The chained hashes of every full block of `tokens`, in order.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut parent = 0u64;
    if block_size == 0 {
        return out;
    }
    for block in tokens.chunks_exact(block_size) {
        parent = block_hash(parent, block);
        out.push(parent);
    }
    out
}

/// A word-at-a-time hash for large weight buffers: FNV-1a over 32-bit words instead of bytes
/// (four times fewer multiplies; the fingerprint only needs to tell models apart, not to
/// resist an adversary).
pub(crate) fn fnv1a64_words(mut state: u64, words: impl Iterator<Item = u32>) -> u64 {
    for w in words {
        state ^= u64::from(w);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn block_hashes_chain_and_skip_partial_blocks() {
        let tokens: Vec<u32> = (0..40).collect();
        let h = block_hashes(&tokens, 16);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0], block_hash(0, &tokens[0..16]));
        assert_eq!(h[1], block_hash(h[0], &tokens[16..32]));
        // The same block content under a different parent hashes differently.
        assert_ne!(block_hash(0, &tokens[16..32]), h[1]);
        // The byte layout is the documented one.
        let mut bytes = 0u64.to_le_bytes().to_vec();
        for t in &tokens[0..16] {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(h[0], fnv1a64(&bytes));
    }
}
