//! The built-in reference engine as a process of this binary, and the agent's side of it.
//!
//! - `serve` — the engine process (`pdagent engine serve`): the engine protocol on a unix
//!   socket, one compute thread, test fault knobs behind `--test-faults`.
//! - `client` — `EngineClient` (connect, hello, requests routed by id, stats, KV events) and
//!   `EngineProcess` (spawn `pdagent engine serve`).
//! - `kv_ship` — KV pieces over QUIC bulk streams: `KvSender` on the prefill side, `KvInbox`
//!   on the decode side.
//! - `generate` — `pdagent engine generate`, monolithic or disaggregated.

pub mod cli;
pub mod client;
pub mod generate;
pub mod kv_ship;
pub mod serve;
