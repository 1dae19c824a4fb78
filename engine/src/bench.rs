//! The engine benchmark the CLI runs (`pdagent engine bench`): prefill tokens/s and decode
//! tokens/s at several batch sizes, on the engine's own compute pool (one thread unless the
//! config says otherwise), measured around `Engine::step`, prefix caching off.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::EngineConfig;
use crate::engine::{Engine, Prompt, RequestKind};
use crate::error::EngineError;
use crate::sampling::SamplingParams;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchOptions {
    /// Prompt length of the prefill measurement.
    pub prefill_tokens: usize,
    pub prefill_repeats: usize,
    pub decode_batches: Vec<usize>,
    /// Prompt length of each decoding sequence (the context decode attends over).
    pub decode_context_tokens: usize,
    /// Timed decode steps per batch size.
    pub decode_steps: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prefill_tokens: 512,
            prefill_repeats: 3,
            decode_batches: vec![1, 4, 16],
            decode_context_tokens: 128,
            decode_steps: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub model: String,
    pub compute_threads: usize,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    /// Mean time of one prefill of `prefill_tokens` tokens.
    pub prefill_ms: f64,
    pub decode: Vec<DecodeBench>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeBench {
    pub batch: usize,
    pub context_tokens: usize,
    /// Generated tokens per second over the whole batch.
    pub tokens_per_s: f64,
    /// Mean time of one decode step.
    pub step_ms: f64,
}

fn prompt(len: usize, salt: usize) -> Vec<u32> {
    // Distinct byte-range ids per sequence; valid for every vocabulary of 256 ids or more.
    (0..len)
        .map(|i| ((i * 7 + salt * 13 + 1) % 256) as u32)
        .collect()
}

/// Runs the benchmark on a fresh engine built from `cfg` (its batching limits raised to fit).
pub fn bench(cfg: &EngineConfig, opts: &BenchOptions) -> Result<BenchReport, EngineError> {
    let batch_max = opts.decode_batches.iter().copied().max().unwrap_or(1);
    let mut cfg = cfg.clone();
    cfg.prefix_caching = false;
    cfg.running_max = cfg.running_max.max(batch_max);
    cfg.step_tokens_max = cfg
        .step_tokens_max
        .max(opts.prefill_tokens)
        .max(batch_max * opts.decode_context_tokens);
    let per_seq =
        (opts.decode_context_tokens + opts.decode_steps + 2).div_ceil(cfg.block_size_tokens);
    let needed = (batch_max * per_seq).max(opts.prefill_tokens.div_ceil(cfg.block_size_tokens)) + 4;
    cfg.kv_blocks = cfg.kv_blocks.max(needed);
    let mut engine = Engine::new(cfg.clone())?;
    let mut next_id = 0u64;

    let mut prefill_s = 0.0;
    let repeats = opts.prefill_repeats.max(1);
    for r in 0..repeats {
        next_id += 1;
        engine.add_request(
            next_id,
            Prompt::Tokens(prompt(opts.prefill_tokens, r)),
            SamplingParams::greedy(1),
            RequestKind::Generate,
        )?;
        let t0 = Instant::now();
        engine.step();
        prefill_s += t0.elapsed().as_secs_f64();
        while engine.has_work() {
            engine.step();
        }
    }
    let prefill_ms = prefill_s / repeats as f64 * 1e3;

    let mut decode = Vec::new();
    for &batch in &opts.decode_batches {
        let mut sampling = SamplingParams::greedy(opts.decode_steps as u32 + 2);
        sampling.ignore_eos = true;
        for b in 0..batch {
            next_id += 1;
            engine.add_request(
                next_id,
                Prompt::Tokens(prompt(opts.decode_context_tokens, b + 100)),
                sampling.clone(),
                RequestKind::Generate,
            )?;
        }
        // The prefills (one step: the budget holds them all).
        engine.step();
        let t0 = Instant::now();
        for _ in 0..opts.decode_steps {
            engine.step();
        }
        let s = t0.elapsed().as_secs_f64();
        while engine.has_work() {
            engine.step();
        }
        decode.push(DecodeBench {
            batch,
            context_tokens: opts.decode_context_tokens,
            tokens_per_s: (batch * opts.decode_steps) as f64 / s,
            step_ms: s / opts.decode_steps as f64 * 1e3,
        });
    }
    Ok(BenchReport {
        model: engine.model_info().name.clone(),
        compute_threads: cfg.compute_threads,
        prefill_tokens: opts.prefill_tokens,
        prefill_tokens_per_s: opts.prefill_tokens as f64 / (prefill_ms / 1e3),
        prefill_ms,
        decode,
    })
}
