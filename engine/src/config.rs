//! The engine's configuration: one serde struct with defaults and `validate()`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// A built-in model with fixed shapes and seeded weights (see `ModelConfig::preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// For tests: 4 layers, hidden 256, 8 query heads, 2 KV heads, tied embeddings.
    Tiny,
    /// For demos: 8 layers, hidden 512, 8 query heads, 2 KV heads, untied lm_head.
    Small,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        }
    }
}

/// Which weights to run: a preset or a local Llama-family checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSpec {
    Preset(Preset),
    Dir(PathBuf),
}

impl ModelSpec {
    /// `tiny` or `small` name a preset; anything else is a checkpoint directory path.
    pub fn parse(s: &str) -> ModelSpec {
        match s {
            "tiny" => ModelSpec::Preset(Preset::Tiny),
            "small" => ModelSpec::Preset(Preset::Small),
            other => ModelSpec::Dir(PathBuf::from(other)),
        }
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec::Preset(Preset::Tiny)
    }
}

/// Engine settings. Every bound has a name with its unit last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    pub model: ModelSpec,
    /// Seed of the preset weights (ignored for checkpoints). The same seed gives bit-identical
    /// weights on every machine.
    pub weights_seed: u64,
    /// Tokens per KV block; part of the KV layout and of the block hashes.
    pub block_size_tokens: usize,
    /// KV blocks in the paged cache (memory = blocks × block size × per-token KV bytes).
    pub kv_blocks: usize,
    /// Token budget of one step (decode tokens + prefill chunk tokens).
    pub step_tokens_max: usize,
    /// Sequences running at once (decoding or in prefill).
    pub running_max: usize,
    /// Requests waiting for admission; `add_request` refuses more.
    pub queue_max: usize,
    /// Threads that compute one step. 1 by default: engines share a host's cores, and the
    /// planner calibrates from single-thread step times.
    pub compute_threads: usize,
    /// Reuse cached KV blocks of identical prefixes.
    pub prefix_caching: bool,
    /// Override of the model's context limit in tokens (0 = the model's own).
    pub context_tokens_max: usize,
    /// Tests only: block hashes are ANDed with this mask (`u64::MAX`, the default, keeps
    /// them whole; 0 makes every block collide). Reuse must never depend on the hash alone.
    #[doc(hidden)]
    pub test_block_hash_mask: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: ModelSpec::default(),
            weights_seed: 0,
            block_size_tokens: 16,
            kv_blocks: 1024,
            step_tokens_max: 512,
            running_max: 64,
            queue_max: 1024,
            compute_threads: 1,
            prefix_caching: true,
            context_tokens_max: 0,
            test_block_hash_mask: u64::MAX,
        }
    }
}

impl EngineConfig {
    /// A default config for a preset.
    pub fn preset(preset: Preset) -> EngineConfig {
        EngineConfig {
            model: ModelSpec::Preset(preset),
            ..EngineConfig::default()
        }
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &'static str, reason: &str| EngineError::Config {
            field,
            reason: reason.to_string(),
        };
        if self.block_size_tokens == 0 || self.block_size_tokens > 1024 {
            return Err(bad("block_size_tokens", "must be between 1 and 1024"));
        }
        if self.kv_blocks < 2 {
            return Err(bad("kv_blocks", "must be at least 2"));
        }
        if self.running_max == 0 {
            return Err(bad("running_max", "must be at least 1"));
        }
        if self.step_tokens_max < self.running_max {
            return Err(bad(
                "step_tokens_max",
                "must be at least running_max, so that every running decode fits one step",
            ));
        }
        if self.compute_threads == 0 || self.compute_threads > 256 {
            return Err(bad("compute_threads", "must be between 1 and 256"));
        }
        if self.queue_max == 0 {
            return Err(bad("queue_max", "must be at least 1"));
        }
        Ok(())
    }
}
