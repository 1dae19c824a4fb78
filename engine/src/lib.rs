//! `pd-engine`: the built-in reference engine.
//!
//! Owns: the model (a Llama-architecture decoder on CPU), tokenizers, the paged KV cache with
//! prefix caching, the continuous-batching scheduler and the KV export/import format. Must
//! never: open sockets or know about the cluster.

#![forbid(unsafe_code)]
