//! Chained prefix-block hashes of a prompt, as bytes or as token ids.
//!
//! Hash `i` stands for the whole prefix `[0, (i + 1) * block)`: it is computed from hash `i - 1`
//! and block `i` only, so two prompts share their leading hashes exactly as far as they share
//! whole leading blocks, and one hash-map lookup per block answers "does this engine hold the
//! prefix up to here".
//!
//! The mix is word-wise multiply-rotate (the FxHash step: `h = (rotl(h, 5) ^ word) * K`) over
//! 8-byte little-endian words of the block, seeded with the previous block's hash, and closed by
//! the SplitMix64 finalizer so that every output bit depends on every input bit. It is fast
//! (about one multiply per 8 bytes) and not cryptographic: whoever controls a prompt can craft
//! collisions, which costs at worst a wrongly believed cache hit (a routing preference), never a
//! wrong answer, because engines check their own cache. The prefix index places these hashes in
//! its table with a randomly keyed mix, so that crafted prompts cannot degrade the table.
//!
//! Hashes are deterministic (no per-process key) and meant for one agent's in-memory index;
//! they are not a wire or storage format and may change between releases.

/// Seeds, so that byte and token hashes of the same words differ, and so do different block
/// sizes (digits of pi).
const SEED_BYTES: u64 = 0x243F_6A88_85A3_08D3;
const SEED_TOKENS: u64 = 0x1319_8A2E_0370_7344;
const SEED_STR: u64 = 0xA409_3822_299F_31D0;
/// FxHash's multiplier (2^64 / golden ratio, odd).
const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn absorb(h: u64, word: u64) -> u64 {
    (h.rotate_left(5) ^ word).wrapping_mul(MUL)
}

/// SplitMix64's finalizer: a bijection with full avalanche.
#[inline]
pub(crate) fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn absorb_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = absorb(h, u64::from_le_bytes(w.try_into().expect("chunks of 8")));
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        h = absorb(h, u64::from_le_bytes(last));
    }
    h
}

/// Chained hashes of `prompt` in blocks of `block_bytes` bytes: hash `i` covers bytes
/// `[0, (i + 1) * block_bytes)` (`h_i = mix(h_{i-1}, block_i)`). Only whole blocks are hashed; a
/// trailing partial block has no hash, as an engine caches only full blocks.
///
/// The ingress does not tokenize, so bytes stand in for tokens: choose `block_bytes` as the
/// engine's block size in tokens times the expected bytes per token, so that one hash covers
/// about one engine block (the router counts one hash as `block_tokens` tokens). With
/// `block_bytes == 0` there are no blocks.
pub fn block_hashes(prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    if block_bytes == 0 {
        return Vec::new();
    }
    let mut h = finalize(SEED_BYTES ^ block_bytes as u64);
    prompt
        .chunks_exact(block_bytes)
        .map(|block| {
            h = finalize(absorb_bytes(h, block));
            h
        })
        .collect()
}

/// Chained hashes of token ids in blocks of `block_tokens` tokens, for an ingress that has
/// them; otherwise as [`block_hashes`]. With `block_tokens == 0` there are no blocks.
pub fn token_block_hashes(tokens: &[u32], block_tokens: usize) -> Vec<u64> {
    if block_tokens == 0 {
        return Vec::new();
    }
    let mut h = finalize(SEED_TOKENS ^ block_tokens as u64);
    tokens
        .chunks_exact(block_tokens)
        .map(|block| {
            let mut pairs = block.chunks_exact(2);
            for p in &mut pairs {
                h = absorb(h, u64::from(p[0]) | (u64::from(p[1]) << 32));
            }
            if let [last] = pairs.remainder() {
                h = absorb(h, u64::from(*last));
            }
            h = finalize(h);
            h
        })
        .collect()
}

/// A fast hash of a short name (node, rack), to compare places before comparing strings.
pub(crate) fn str_hash(s: &str) -> u64 {
    finalize(absorb_bytes(SEED_STR ^ s.len() as u64, s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_shares_leading_hashes_only() {
        let a = b"0123456789abcdef0123456789abcdefXXXXXXXXXXXXXXXXYYYYYYYYYYYYYYYYzz".to_vec();
        let mut b = a.clone();
        b[40] = b'!'; // inside block 2 (bytes 32..48)
        let ha = block_hashes(&a, 16);
        let hb = block_hashes(&b, 16);
        assert_eq!(ha.len(), 4, "the trailing 2 bytes are not a whole block");
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        assert_ne!(
            ha[3], hb[3],
            "a later block differs once an earlier one did (chaining)"
        );
    }

    #[test]
    fn chaining_distinguishes_equal_blocks_at_different_positions() {
        let h = block_hashes(&[7u8; 64], 16);
        assert_eq!(h.len(), 4);
        for i in 0..h.len() {
            for j in i + 1..h.len() {
                assert_ne!(h[i], h[j]);
            }
        }
    }

    #[test]
    fn block_size_and_kind_change_the_hashes() {
        let p = [1u8; 64];
        assert_ne!(block_hashes(&p, 16)[0], block_hashes(&p, 32)[0]);
        assert!(block_hashes(&p, 0).is_empty());
        assert!(block_hashes(&p[..15], 16).is_empty());
        let t = [1u32; 16];
        assert_ne!(token_block_hashes(&t, 16)[0], block_hashes(&p, 16)[0]);
    }

    #[test]
    fn token_hashes_chain_like_byte_hashes() {
        let a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        b[35] = 9999;
        let ha = token_block_hashes(&a, 16);
        let hb = token_block_hashes(&b, 16);
        assert_eq!(ha.len(), 3);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        // Odd block sizes hash the last token alone.
        let odd = token_block_hashes(&a, 5);
        assert_eq!(odd.len(), 10);
        assert_eq!(odd, token_block_hashes(&a, 5), "deterministic");
    }
}
