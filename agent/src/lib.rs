//! `pdagent`: the cluster agent, one binary on every GPU host.
//!
//! Owns: configuration, the agent's life cycle, systemd notification, the agent's wire
//! messages, the GPU sampler, the OpenAI-compatible ingress and the serving path (routing with
//! `pd-router`, KV shipping, request legs), the engine supervisor and coordinator duties.
//!
//! Must never: hold Raft or planner logic that could be pure; those live in their own crates.

#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod authority;
pub mod autoplan;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod custody;
pub mod driver;
pub mod engine;
pub mod engine_cli;
pub mod enrollment;
pub mod gpus;
pub mod kv;
pub mod logging;
pub mod models;
pub mod notify;
pub mod peers;
pub mod planned;
pub mod reporting;
pub mod serving;
pub mod supervisor;
pub mod util;
pub mod wire;
