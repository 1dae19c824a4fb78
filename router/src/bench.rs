//! A micro-benchmark of one routing decision (`route` + `record_decision`) against a realistic
//! index, timed with the caller's clock so that this crate never reads one.
//!
//! Setup: 16 prefill and 16 decode engines on 8 nodes in 2 racks; 300 system prompts of
//! 256–1024 bytes shared by prompts of 1–4 KiB (random user text after the system prompt);
//! 16-byte blocks, so 64–256 blocks per prompt; the index filled to its bound of 100 000 entries
//! before timing starts. Each timed decision sees fresh random load on every engine. Prompt
//! generation and hashing are not timed.

use crate::{Candidate, Policy, Role, Router, RouterConfig, SplitMix64, block_hashes};

/// What [`run`] measured. Times are in the caller's clock units (nanoseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// The policy timed.
    pub policy: Policy,
    /// Timed decisions.
    pub decisions: usize,
    /// Median time of one decision.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Slowest decision.
    pub max_ns: u64,
    /// Index entries when timing ended.
    pub index_entries: usize,
    /// Candidate engines.
    pub engines: usize,
}

const PREFILL_ENGINES: usize = 16;
const DECODE_ENGINES: usize = 16;
const NODES: usize = 8;
const SYSTEM_PROMPTS: usize = 300;
const BLOCK_BYTES: usize = 16;
const INDEX_ENTRIES: usize = 100_000;
/// Bound on the requests used to fill the index (it fills in about a thousand).
const WARMUP_REQUESTS_MAX: usize = 20_000;

/// Times `decisions` decisions with the cost policy; see the module docs.
pub fn run(decisions: usize, seed: u64, now: impl FnMut() -> u64) -> BenchReport {
    run_with(Policy::Cost, decisions, seed, now)
}

/// As [`run`], with another policy (round-robin is the baseline: it skips the cost search).
pub fn run_with(
    policy: Policy,
    decisions: usize,
    seed: u64,
    mut now: impl FnMut() -> u64,
) -> BenchReport {
    let mut rng = SplitMix64(seed);
    let mut router = Router::new(RouterConfig {
        policy,
        index_entries_max: INDEX_ENTRIES,
        seed,
        ..RouterConfig::default()
    });
    let mut candidates = engines();
    let system: Vec<Vec<u8>> = (0..SYSTEM_PROMPTS)
        .map(|_| {
            let n = 256 + rng.below(769);
            text(&mut rng, n)
        })
        .collect();

    let request = |rng: &mut SplitMix64| {
        let mut prompt = system[rng.below(SYSTEM_PROMPTS)].clone();
        let total = 1024 + rng.below(3073);
        let tail = text(rng, total.saturating_sub(prompt.len()));
        prompt.extend_from_slice(&tail);
        let tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        (block_hashes(&prompt, BLOCK_BYTES), tokens)
    };

    let mut warmup = 0;
    while router.index_len() < INDEX_ENTRIES && warmup < WARMUP_REQUESTS_MAX {
        let (blocks, tokens) = request(&mut rng);
        randomize_load(&mut rng, &mut candidates);
        let d = router
            .route(&blocks, tokens, &candidates)
            .expect("engines are available");
        router.record_decision(&d, &candidates, &blocks);
        warmup += 1;
    }

    let mut times = Vec::with_capacity(decisions);
    for _ in 0..decisions {
        let (blocks, tokens) = request(&mut rng);
        randomize_load(&mut rng, &mut candidates);
        let start = now();
        let d = router
            .route(&blocks, tokens, &candidates)
            .expect("engines are available");
        router.record_decision(&d, &candidates, &blocks);
        let end = now();
        times.push(end.saturating_sub(start));
    }
    times.sort_unstable();
    let at = |per_mille: usize| {
        times.get((times.len() * per_mille / 1000).min(times.len().saturating_sub(1)))
    };
    BenchReport {
        policy,
        decisions,
        p50_ns: at(500).copied().unwrap_or(0),
        p99_ns: at(990).copied().unwrap_or(0),
        p999_ns: at(999).copied().unwrap_or(0),
        max_ns: times.last().copied().unwrap_or(0),
        index_entries: router.index_len(),
        engines: candidates.len(),
    }
}

fn engines() -> Vec<Candidate> {
    let roles = (0..PREFILL_ENGINES)
        .map(|i| (Role::Prefill, i))
        .chain((0..DECODE_ENGINES).map(|i| (Role::Decode, i)));
    roles
        .map(|(role, i)| {
            let node = i % NODES;
            let kind = if role == Role::Prefill {
                "prefill"
            } else {
                "decode"
            };
            Candidate {
                engine: format!("bench/{kind}-{i}"),
                node: format!("node-{node}"),
                rack: Some(format!("rack-{}", node * 2 / NODES)),
                role,
                queued: 0,
                running: 0,
                kv_usage: 0.0,
                inflight: 0,
                available: true,
            }
        })
        .collect()
}

fn randomize_load(rng: &mut SplitMix64, candidates: &mut [Candidate]) {
    for c in candidates {
        c.queued = rng.below(4) as u32;
        c.running = rng.below(if c.role == Role::Decode { 64 } else { 4 }) as u32;
        c.inflight = rng.below(3) as u32;
        c.kv_usage = rng.below(95) as f32 / 100.0;
    }
}

/// Printable random bytes.
fn text(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    (0..n).map(|_| b' ' + rng.below(95) as u8).collect()
}
