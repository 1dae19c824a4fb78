//! `pd-engine`: the built-in reference engine.
//!
//! Owns: the model (a Llama-architecture decoder on CPU, built on candle), tokenizers and the
//! incremental detokenizer, the paged KV cache with prefix caching, the continuous-batching
//! scheduler, the KV export/import format (`KV_FORMAT.md`) and the engine protocol's message
//! types (`PROTOCOL.md`). Must never: open sockets, spawn processes or know about the cluster;
//! the agent frames the protocol messages and moves the KV bytes.
//!
//! Entry points: [`Engine`] (driven by a server loop: `add_request`, `import_*`, `step`,
//! `cancel`, `stats`), [`bench()`] for the CLI, [`protocol`] for the wire types.

#![forbid(unsafe_code)]

mod bench;
mod config;
mod engine;
mod error;
pub mod hash;
pub mod kv_cache;
pub mod kv_format;
mod model;
pub mod protocol;
mod sampling;
mod stats;
mod tokenizer;

pub use bench::{BenchOptions, BenchReport, DecodeBench, bench};
pub use config::{EngineConfig, ModelSpec, Preset};
pub use engine::{
    CONTEXT_TOKENS_DEFAULT_MAX, Engine, EngineEvent, FinishReason, Prompt, RequestId, RequestKind,
};
pub use error::EngineError;
pub use kv_cache::KvEvent;
pub use kv_format::{KV_HEADER_BYTES, KvFormatError, KvGeometry, KvHeader, KvPiece};
pub use model::{ModelConfig, ModelInfo, RopeScaling, save_preset_checkpoint};
pub use sampling::SamplingParams;
pub use stats::{DecodeTiming, EngineStats, PrefillTiming, StepSample};
pub use tokenizer::{ChatMessage, DEFAULT_CHAT_TEMPLATE, Detokenizer, Tokenizer};
