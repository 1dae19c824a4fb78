//! The agent's messages between agents. Variants are only appended, never renumbered or
//! changed: a new need gets a new variant (bincode encodes the variant index).

use pd_raft::network::{RaftRequest, RaftResponse};
use pd_raft::{Command, CommandResult, RaftPeer};
use serde::{Deserialize, Serialize};

pub mod kv;
pub mod latency;
pub mod legs;
pub mod models;

// What agents report about the cluster is also what the admin API passes on: those types are
// the admin API's (`pd-api`), encoded here as they are.
pub use pd_api::cluster::{
    EngineLoad, EngineReport, EngineState, GpuTelemetry, NodeStatus, NodeTelemetry, StatusReport,
};

#[derive(Debug, Serialize, Deserialize)]
pub enum AgentRequest {
    /// Liveness and round-trip check.
    Ping { nonce: u64 },
    /// A Raft RPC from a peer.
    Raft(RaftRequest),
    /// A host asks to join the cluster (its certificate must name `name`).
    Join { name: String, address: String },
    /// A change to the replicated state, for the coordinator.
    Propose(Command),
    /// This agent's view of the cluster.
    Status,
    /// Liveness report to the coordinator (never written to the log).
    Heartbeat { node: String },
    /// A host's enrollment with a join token, forwarded by the agent it reached to the
    /// coordinator (which holds the CA key).
    Enroll {
        token: String,
        node: String,
        csr_pem: String,
    },
    /// A node asks for a renewed certificate for its own name (a new key pair's request).
    Renew { csr_pem: String },
    /// A voter without the CA key asks the coordinator for it (see `custody`).
    FetchCaKey,
    /// Liveness report with the node's GPU telemetry (replaces `Heartbeat`; never written to
    /// the log).
    Report {
        node: String,
        gpus: Vec<GpuTelemetry>,
    },
    /// The latest telemetry the coordinator received from every node.
    Telemetry,
    /// Liveness report with GPU telemetry and the node's engines (replaces `Report`).
    NodeReport {
        node: String,
        gpus: Vec<GpuTelemetry>,
        engines: Vec<EngineReport>,
    },
    /// The engines of every node, as last reported to the coordinator.
    Engines,
    /// One leg of a request on an engine of the receiving agent (a streaming RPC answered
    /// with `Serve` events).
    Serve(legs::Leg),
    /// A prefill host tells a decode host that a KV shipment is whole.
    KvSeal(kv::Seal),
    /// The TTFT and TPOT this agent's ingress measured, per model.
    Latencies,
    /// Whether this host has a deployment's model folder, and its checkpoint fingerprint.
    CheckModel { model: String },
    /// A direct command from the coordinator of Raft term `term`; refused by an agent that has
    /// seen a newer term (`control::fence_directive`).
    Directive { term: u64, directive: Directive },
    /// How many of a deployment's engines this agent's router would choose now.
    Routable { deployment: String },
    /// The last entry of this agent's Raft log (voters compare before campaigning).
    LogTip,
    /// What this agent's ingress counted per model (the coordinator's re-planning).
    Workload,
    /// The step times this host's engines measured (the re-planner's online calibration).
    StepTimes,
}

impl AgentRequest {
    /// Requests only agents make, with what anyone else is told; `None`: any peer of the
    /// cluster may ask (each handler checks what it needs beyond that).
    pub fn agents_only(&self) -> Option<&'static str> {
        match self {
            AgentRequest::Raft(_) | AgentRequest::LogTip => Some("only agents speak Raft"),
            AgentRequest::Serve(_) => Some("only agents send request legs"),
            AgentRequest::KvSeal(_) => Some("only agents ship KV"),
            _ => None,
        }
    }
}

/// What a coordinator may tell an agent directly, outside the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Directive {
    /// The log holds a change to this node's engines at or before `index`: once this agent has
    /// applied it, reconcile now rather than at the next pass.
    Reconcile { index: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AgentResponse {
    Pong {
        node: String,
        nonce: u64,
        protocol_version: u16,
        uptime_ms: u64,
    },
    Raft(RaftResponse),
    Joined {
        coordinator: String,
    },
    Proposed(CommandResult),
    /// Ask the coordinator instead (if one is known).
    NotCoordinator {
        coordinator: Option<RaftPeer>,
    },
    Status(StatusReport),
    HeartbeatAck,
    Certificate {
        cert_pem: String,
        ca_pem: String,
    },
    CaKey {
        key_pem: String,
    },
    EnrollRefused {
        reason: String,
        retryable: bool,
    },
    Telemetry(Vec<NodeTelemetry>),
    Engines(Vec<EngineReport>),
    /// One event of a `Serve` stream.
    Serve(legs::ServeEvent),
    KvSealed,
    Latencies(Vec<latency::ModelLatency>),
    ModelCheck(models::ModelCheck),
    /// A directive was carried out.
    DirectiveDone,
    /// A directive was refused: `why` says (a stale term names the newer one seen).
    DirectiveRefused {
        seen_term: u64,
        why: String,
    },
    /// The answer to `Routable`: ready engines in this agent's router view (circuits closed),
    /// and whether this agent serves the OpenAI API.
    Routable {
        engines: u32,
        api: bool,
    },
    LogTip(Option<openraft::LogId<u64>>),
    Workload(Vec<latency::ModelWorkload>),
    StepTimes(Vec<latency::EngineSteps>),
}

/// What an agent answers a peer whose node was removed from the cluster (the peer, reading
/// it, gives up the CA key: `custody::keep_custody`).
pub fn removal_message(node: &str) -> String {
    format!("node {node} was removed from the cluster")
}

/// Whether a peer's refusal `msg` says that this node (`me`) was removed.
pub fn is_removal(msg: &str, me: &pd_transport::PeerIdentity) -> bool {
    msg == removal_message(me.name())
}
