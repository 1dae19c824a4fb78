//! What agents report about the cluster: its nodes, their GPUs' readings, their engines. Agents
//! also send these to each other over the transport (bincode, positional): fields are only
//! appended there, so these shapes change only with a new protocol version.

use std::collections::BTreeMap;

use pd_raft::state::GpuRecord;
use pd_raft::{AdminState, EngineRole, NodeHealth};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    Starting,
    Ready,
    Draining,
    Stopped,
    Failed,
}

/// One engine as its agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineReport {
    pub engine: String,
    pub deployment: String,
    pub node: String,
    pub role: EngineRole,
    pub gpus: Vec<u32>,
    pub state: EngineState,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub generation: u64,
    /// Load as the engine last reported it (ready engines only).
    pub load: EngineLoad,
    /// The driver that runs it.
    pub driver: String,
    /// How long it has been in this state, ms.
    pub state_ms: u64,
    /// Starting: the last line of its log; failed: why, and its log's last lines.
    pub note: String,
    /// HTTP engines: the port it serves on (127.0.0.1) and its first NIXL side-channel port.
    pub port: Option<u16>,
    pub kv_port: Option<u16>,
}

/// An engine's load, sampled by its agent every reconcile pass, for routers on every agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineLoad {
    /// Requests waiting for admission.
    pub queued: u32,
    /// Requests admitted (prefilling, decoding or importing).
    pub running: u32,
    /// Share of the KV blocks referenced by live requests, 0..=1.
    pub kv_usage: f32,
}

/// One GPU's live readings, sent with every liveness report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuTelemetry {
    pub index: u32,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub utilization_gpu_pct: Option<u32>,
    pub memory_used_bytes: u64,
    /// "healthy", "degraded" or "failed", as the node judges it now.
    pub health: String,
}

/// A node's latest report as the coordinator holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeTelemetry {
    pub node: String,
    /// How long ago the coordinator received it.
    pub age_ms: u64,
    pub gpus: Vec<GpuTelemetry>,
}

/// What `pdagent status` shows: one agent's view of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The agent that answered.
    pub node: String,
    /// The coordinator (Raft leader) this agent knows of.
    pub coordinator: Option<String>,
    pub term: u64,
    /// This agent's Raft state: leader, follower, candidate, learner, shutdown.
    pub raft_state: String,
    pub last_applied: Option<u64>,
    /// False until this agent belongs to an initialised cluster.
    pub in_cluster: bool,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub address: String,
    /// "voter", "learner", or "none" (registered but not a Raft member).
    pub raft_role: String,
    pub health: NodeHealth,
    pub admin_state: AdminState,
    pub labels: BTreeMap<String, String>,
    pub gpus: Vec<GpuRecord>,
}
