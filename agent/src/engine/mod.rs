//! The built-in reference engine as a process of this binary, and the agent's side of it.
//!
//! - `serve` — the engine process (`pdagent engine serve`): the engine protocol on a unix
//!   socket, one compute thread, test fault knobs behind `--test-faults`.
//! - `client` — `EngineClient` (connect, hello, requests routed by id, stats, KV events) and
//!   `EngineProcess` (spawn `pdagent engine serve`).

pub mod client;
pub mod serve;
