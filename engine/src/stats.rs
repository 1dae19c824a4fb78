//! Counters and measured step times, for the agent's metrics and the planner's calibration.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Samples kept in [`EngineStats::recent_steps`].
pub const RECENT_STEPS_MAX: usize = 128;

/// A snapshot of the engine's load and measured speed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Requests waiting for admission.
    pub queue_depth: usize,
    /// Requests admitted (prefilling or decoding).
    pub running: usize,
    /// KV imports begun but not complete.
    pub importing: usize,
    pub kv_block_size_tokens: usize,
    pub kv_blocks_total: usize,
    /// Blocks referenced by live requests.
    pub kv_blocks_used: usize,
    /// Blocks an allocation can take now (free plus cached-but-unreferenced).
    pub kv_blocks_free: usize,
    /// Unreferenced blocks still holding cached prefixes (part of `kv_blocks_free`).
    pub kv_blocks_cached: usize,
    pub prefix_cache_queries_blocks: u64,
    pub prefix_cache_hits_blocks: u64,
    pub prompt_tokens_computed_total: u64,
    pub prompt_tokens_cached_total: u64,
    pub prompt_tokens_imported_total: u64,
    pub generated_tokens_total: u64,
    pub steps_total: u64,
    pub preemptions_total: u64,
    pub kv_events_dropped_total: u64,
    /// Threads of the pool the last step ran on (observed inside it, not copied from the
    /// config).
    pub compute_threads: usize,
    /// Steps that only prefilled, bucketed by tokens in the step.
    pub prefill_timings: Vec<PrefillTiming>,
    /// Steps that only decoded, bucketed by batch size and mean context.
    pub decode_timings: Vec<DecodeTiming>,
    /// The latest steps of any kind, oldest first.
    pub recent_steps: Vec<StepSample>,
}

/// Prefill-only steps with `tokens_max / 2 < tokens <= tokens_max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillTiming {
    pub tokens_max: u32,
    pub steps: u64,
    pub tokens_total: u64,
    pub seconds_total: f64,
}

/// Decode-only steps with batch size in `(batch_max / 2, batch_max]` and mean context in
/// `(context_tokens_max / 2, context_tokens_max]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeTiming {
    pub batch_max: u32,
    pub context_tokens_max: u32,
    pub steps: u64,
    pub sequences_total: u64,
    pub seconds_total: f64,
}

/// One step as measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSample {
    pub prefill_tokens: u32,
    pub decode_sequences: u32,
    /// Sum of the decoding sequences' context lengths.
    pub decode_context_tokens: u64,
    pub seconds: f64,
}

#[derive(Default)]
pub(crate) struct StepTimes {
    prefill: BTreeMap<u32, PrefillTiming>,
    decode: BTreeMap<(u32, u32), DecodeTiming>,
    recent: VecDeque<StepSample>,
}

impl StepTimes {
    pub fn record(&mut self, s: StepSample) {
        if s.decode_sequences == 0 && s.prefill_tokens > 0 {
            let key = s.prefill_tokens.next_power_of_two();
            let e = self.prefill.entry(key).or_insert(PrefillTiming {
                tokens_max: key,
                steps: 0,
                tokens_total: 0,
                seconds_total: 0.0,
            });
            e.steps += 1;
            e.tokens_total += u64::from(s.prefill_tokens);
            e.seconds_total += s.seconds;
        } else if s.prefill_tokens == 0 && s.decode_sequences > 0 {
            let batch = s.decode_sequences.next_power_of_two();
            let mean = s.decode_context_tokens / u64::from(s.decode_sequences);
            let ctx = u32::try_from(mean)
                .unwrap_or(u32::MAX)
                .max(1)
                .next_power_of_two();
            let e = self.decode.entry((batch, ctx)).or_insert(DecodeTiming {
                batch_max: batch,
                context_tokens_max: ctx,
                steps: 0,
                sequences_total: 0,
                seconds_total: 0.0,
            });
            e.steps += 1;
            e.sequences_total += u64::from(s.decode_sequences);
            e.seconds_total += s.seconds;
        }
        if self.recent.len() >= RECENT_STEPS_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back(s);
    }

    pub fn fill(&self, out: &mut EngineStats) {
        out.prefill_timings = self.prefill.values().cloned().collect();
        out.decode_timings = self.decode.values().cloned().collect();
        out.recent_steps = self.recent.iter().cloned().collect();
    }
}
