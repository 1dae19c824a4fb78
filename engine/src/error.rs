//! The engine's one error type. Messages say what failed, with what input, and what to do.

use std::path::PathBuf;

use crate::kv_format::KvFormatError;

/// Everything the engine refuses or fails at. External input (requests, KV bytes, checkpoint
/// files) never panics the engine: it comes back as one of these.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid engine config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error(
        "checkpoint {path}: {reason}; a checkpoint directory needs config.json, *.safetensors and tokenizer.json of a Llama-family model"
    )]
    Checkpoint { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("request {id}: the prompt is empty; send at least one token")]
    EmptyPrompt { id: u64 },
    #[error(
        "request {id}: prompt of {prompt_tokens} tokens does not fit the context of {context_tokens_max} tokens (at least one token must be generated); shorten the prompt"
    )]
    PromptTooLong {
        id: u64,
        prompt_tokens: usize,
        context_tokens_max: usize,
    },
    #[error("request {id}: token id {token} is outside the vocabulary of {vocab_size} ids")]
    TokenOutOfRange {
        id: u64,
        token: u32,
        vocab_size: usize,
    },
    #[error("request {id}: invalid sampling parameter `{field}`: {reason}")]
    Sampling {
        id: u64,
        field: &'static str,
        reason: String,
    },
    #[error(
        "request {id}: the engine's queue holds {queue_max} waiting requests already; retry later or on another engine"
    )]
    QueueFull { id: u64, queue_max: usize },
    #[error(
        "request {id}: this engine already runs {running_max} requests (running_max); decode it on another engine or retry later"
    )]
    DecodeSlotsFull { id: u64, running_max: usize },
    #[error("request {id} already exists in this engine; use a fresh request id")]
    DuplicateRequest { id: u64 },
    #[error("request {id} is not known to this engine (finished, cancelled or never added)")]
    UnknownRequest { id: u64 },
    #[error(
        "request {id}: needs {needed_blocks} KV blocks but the cache holds {total_blocks} in all; raise kv_blocks or shorten the prompt"
    )]
    KvCacheTooSmall {
        id: u64,
        needed_blocks: usize,
        total_blocks: usize,
    },
    #[error(
        "request {id}: needs {needed_blocks} free KV blocks to import, {free_blocks} are free now; retry later or on another decode engine"
    )]
    KvCacheFull {
        id: u64,
        needed_blocks: usize,
        free_blocks: usize,
    },
    #[error("request {id}: refused KV: {source}")]
    Kv {
        id: u64,
        #[source]
        source: KvFormatError,
    },
    #[error("request {id}: KV import is not complete ({reason})")]
    ImportIncomplete { id: u64, reason: String },
    #[error("tensor computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    #[error("cannot start the compute thread pool of {threads} threads: {reason}")]
    ThreadPool { threads: usize, reason: String },
}
