//! Engine drivers, in the manner of Nomad's task drivers: the supervisor decides which engines
//! run where and when they restart; a driver knows how to run one kind of engine.
//!
//! - `start` an engine for a spec (its GPUs as `CUDA_VISIBLE_DEVICES`, its socket and log);
//! - `wait`: has it exited (never blocks);
//! - `probe`: is it ready (for the builtin engine: the hello plus a one-token request), and
//!   what it says it is (model and fingerprint: the inspection recorded to verify it later);
//! - `stats`: its load;
//! - `stop` with a grace period, then kill;
//! - `recover`: after an agent restart, take back an engine from its record, verifying its
//!   identity over its socket (not by pid alone).
//!
//! `Capabilities` say what the serving path may do with a driver's engines: whether the agent
//! ships their KV (the builtin engine hands its KV to the agent; vLLM or SGLang move KV
//! themselves) and whether replaying a prompt and the tokens so far continues a stream
//! exactly (which migration needs).
//!
//! Drivers: `builtin` (the reference engine as a child process), `vllm` (vLLM's OpenAI
//! server, reached over HTTP on 127.0.0.1) and, for tests, `fake` (in-memory engines with
//! fault settings, no process).

pub mod builtin;
pub mod fake;
pub mod http;
pub mod vllm;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use pd_raft::EngineRole;
use serde::{Deserialize, Serialize};

use crate::engine::client::EngineClient;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who moves a prefill's KV to the decode engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPath {
    /// The engine hands its KV to the agent, which ships it over QUIC (builtin).
    Agent,
    /// The engine moves its KV itself (NIXL, Mooncake...): the agent only routes.
    Engine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub kv: KvPath,
    /// Sampling is a function of the seed and the token index, so a stream replayed on another
    /// engine continues with the draws it would have used. Its tokens equal the undisturbed
    /// stream's except where a choice was within the replay's rounding of the logits (the
    /// replay computes in other shapes; about 1e-5 relative on the reference engine).
    pub exact_replay: bool,
    /// The engine continues a stream from the prompt and the tokens so far (exactly or not):
    /// migration after the first token is allowed.
    pub resume: bool,
}

/// What the engines of the driver named `driver` (a deployment's `engine`) allow; `None` for
/// a driver this agent does not have.
pub fn capabilities(driver: &str) -> Option<Capabilities> {
    match driver {
        builtin::NAME => Some(builtin::CAPABILITIES),
        vllm::NAME => Some(vllm::CAPABILITIES),
        fake::NAME => Some(fake::CAPABILITIES),
        _ => None,
    }
}

/// One engine to run.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSpec {
    pub engine: String,
    pub deployment: String,
    pub role: EngineRole,
    /// A preset or a model folder on this host.
    pub model: String,
    pub gpus: Vec<u32>,
    pub generation: u64,
    /// `CUDA_VISIBLE_DEVICES`: GPU (or MIG instance) UUIDs.
    pub visible_devices: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The deployment's extra engine arguments (`pdctl deploy --engine-arg`).
    pub engine_args: Vec<String>,
}

/// How a vLLM engine's KV reaches the decode engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvTransport {
    /// pdagent's KV connector hands the KV to the agent, which ships it over QUIC with mutual
    /// TLS, checksummed (`kv::bridge`).
    #[default]
    Agent,
    /// vLLM's NixlConnector: the decode engine pulls the KV from the prefill engine itself.
    Nixl,
}

impl KvTransport {
    pub fn parse(s: &str) -> Option<KvTransport> {
        match s {
            "agent" => Some(KvTransport::Agent),
            "nixl" => Some(KvTransport::Nixl),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvTransport::Agent => "agent",
            KvTransport::Nixl => "nixl",
        }
    }
}

/// An engine that serves HTTP on this host (vLLM's OpenAI server on 127.0.0.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEngine {
    pub port: u16,
    /// How its KV travels (for prefill and decode engines).
    pub kv_transport: KvTransport,
    /// Its tensor-parallel ranks (each ships its own shard of the KV).
    pub tp: u32,
    /// The NIXL side-channel port (one listener for all TP ranks), for prefill and decode
    /// engines.
    pub kv_port: Option<u16>,
    pub kv_ports: u16,
    /// The model name the engine answers to.
    pub served_name: String,
}

/// What an engine says it is: recorded at readiness, checked on recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub model_name: String,
    pub model_fingerprint: u64,
}

/// A running engine.
pub struct Task {
    pub pid: u32,
    /// The engine protocol connection, once connected (serving uses it).
    pub client: Option<Arc<EngineClient>>,
    /// What the engine said it is, once it answered.
    pub identity: Option<Identity>,
    /// Its HTTP server, for engines that serve HTTP (serving uses it).
    pub http: Option<Arc<HttpEngine>>,
    /// KV bytes the engine moved itself (vLLM's NIXL counter), as last sampled by `stats`.
    pub kv_bytes_moved: Arc<std::sync::atomic::AtomicU64>,
    /// Our child process, when this agent started it (not when recovered).
    pub(crate) child: Option<std::process::Child>,
}

impl Task {
    pub fn new(pid: u32) -> Task {
        Task {
            pid,
            client: None,
            identity: None,
            http: None,
            kv_bytes_moved: Arc::default(),
            child: None,
        }
    }
}

/// What survives an agent restart, next to the engine's socket (`<id>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub engine: String,
    pub pid: u32,
    pub generation: u64,
    pub role: EngineRole,
    pub model: String,
    pub gpus: Vec<u32>,
    pub deployment: String,
    /// The driver that started it (absent in records of older agents: builtin).
    #[serde(default = "builtin_name")]
    pub driver: String,
    /// The identity it gave once ready (absent until then, and in older records).
    #[serde(default)]
    pub identity: Option<Identity>,
    /// HTTP engines: their port and first NIXL side-channel port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub kv_port: Option<u16>,
    /// HTTP engines: how their KV travels (absent in older records, which all used NIXL).
    #[serde(default = "nixl")]
    pub kv_transport: KvTransport,
}

fn nixl() -> KvTransport {
    KvTransport::Nixl
}

fn builtin_name() -> String {
    builtin::NAME.to_string()
}

/// Waits until the task's process has exited, at most `grace` (a child is reaped by
/// `try_wait`; a recovered engine is watched by pid).
pub(crate) async fn wait_exit(task: &mut Task, grace: Duration) {
    let until = std::time::Instant::now() + grace;
    loop {
        let gone = match &mut task.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => !builtin::pid_alive(task.pid),
        };
        if gone || std::time::Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Ready to serve.
    Ready,
    /// Not answering yet (still starting).
    NotYet,
    /// Answered, but wrongly.
    Failed(String),
}

/// One kind of engine. Object safe: the supervisor holds `Arc<dyn Driver>` by name.
pub trait Driver: Send + Sync {
    fn name(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// Longest an engine may take from its start to readiness before it is restarted (none:
    /// no bound).
    fn start_timeout(&self) -> Option<Duration> {
        None
    }
    /// Starts the engine (returns once it is launched, not once it is ready).
    fn start(&self, spec: &EngineSpec) -> Result<Task, String>;
    /// Whether the engine has exited, and why (never blocks).
    fn wait(&self, task: &mut Task) -> Option<String>;
    /// Readiness: connects if needed and checks that the engine computes.
    fn probe<'a>(&'a self, spec: &'a EngineSpec, task: &'a mut Task) -> BoxFuture<'a, Probe>;
    /// Its load now, or `None` when it does not answer within `timeout`.
    fn stats<'a>(
        &'a self,
        task: &'a Task,
        timeout: Duration,
    ) -> BoxFuture<'a, Option<pd_engine::EngineStats>>;
    /// Asks it to stop, and kills it after `grace`.
    fn stop<'a>(&'a self, task: Task, grace: Duration) -> BoxFuture<'a, ()>;
    /// Takes back an engine a previous agent started, from its record: it must be alive and
    /// answer on its socket as the recorded role and identity. An engine that fails the check
    /// is killed (when alive) and an error returned.
    fn recover<'a>(
        &'a self,
        spec: &'a EngineSpec,
        record: &'a TaskRecord,
    ) -> BoxFuture<'a, Result<Task, String>>;
}
