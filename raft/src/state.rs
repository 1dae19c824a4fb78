//! `ClusterState`: the replicated state, changed only by `apply`, which is pure (no IO, no
//! clock): the same commands in the same order give the same state on every agent. Invalid
//! commands are refused deterministically (`ApplyError`) and change nothing.
//!
//! Heartbeats and load do not come through here: only changes of state do.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

mod autoplan;
pub use autoplan::*;

/// Version of the replicated state's shape. An agent refuses a snapshot or log with a newer
/// schema than it knows.
pub const SCHEMA_VERSION: u32 = 4;
/// Bounds on what one command may carry.
pub const LABELS_PER_NODE_MAX: usize = 64;
pub const LABEL_BYTES_MAX: usize = 253;
/// Certificates remembered per node (for revocation on removal); the oldest are forgotten
/// first. A node renews at two thirds of a lifetime, so it never holds more than two live ones.
pub const CERTIFICATES_PER_NODE_MAX: usize = 8;

/// Liveness as the coordinator judges it from heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    Ready,
    Suspect,
    Down,
}

/// What the operator wants of a node, independent of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Active,
    Cordoned,
    Draining,
}

/// A GPU as the cluster records it (telemetry stays out of the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    /// "healthy", "degraded" or "failed".
    pub health: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// The Raft node id.
    pub id: u64,
    /// Transport address (IP:port).
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub gpus: Vec<GpuRecord>,
    pub health: NodeHealth,
    pub admin_state: AdminState,
    /// Log index of the command that registered it.
    pub registered_at: u64,
}

impl NodeRecord {
    /// Its transport address as a socket address (`None` when what was recorded is not
    /// `ip:port`).
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.address.parse().ok()
    }
}

/// Deployment names: DNS labels, so they can name engines and model ids alike.
pub const DEPLOYMENT_NAME_BYTES_MAX: usize = 63;
/// Engines one deployment may ask for.
pub const ENGINES_PER_DEPLOYMENT_MAX: u32 = 256;

/// How a deployment's engines are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `prefill` engines that only prefill and `decode` engines that only decode.
    Disaggregated { prefill: u32, decode: u32 },
    /// `engines` engines that do both.
    Colocated { engines: u32 },
}

impl Layout {
    /// The engines this layout asks for, as (role, count).
    pub fn engines(&self) -> Vec<(EngineRole, u32)> {
        match *self {
            Layout::Disaggregated { prefill, decode } => {
                vec![(EngineRole::Prefill, prefill), (EngineRole::Decode, decode)]
            }
            Layout::Colocated { engines } => vec![(EngineRole::Both, engines)],
        }
    }

    pub fn engine_count(&self) -> u32 {
        self.engines().iter().map(|(_, n)| n).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineRole {
    Prefill,
    Decode,
    Both,
}

impl std::fmt::Display for EngineRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineRole::Prefill => "prefill",
            EngineRole::Decode => "decode",
            EngineRole::Both => "both",
        })
    }
}

/// What the operator asked to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Also the model id clients ask for.
    pub name: String,
    /// Engine driver: "builtin" (more later).
    pub engine: String,
    /// A preset name or a model folder on the hosts.
    pub model: String,
    /// GPUs per engine.
    pub tp: u32,
    pub ttft_ms: Option<u32>,
    pub tpot_ms: Option<u32>,
    pub layout: Layout,
    /// Log index of the command that created it.
    pub created_at: u64,
}

/// One engine of a deployment on one node's GPUs. Agents reconcile their engines with the
/// assignments that name them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// `<deployment>/<role>-<k>`: stable while the engine keeps its place.
    pub engine: String,
    pub deployment: String,
    pub role: EngineRole,
    pub node: String,
    /// GPU indexes on that node.
    pub gpus: Vec<u32>,
    /// Log index that wrote this assignment: the fencing token (an agent ignores anything
    /// older than what it acted on).
    pub generation: u64,
}

/// What the planner predicted for a deployment whose layout it chose (`--layout planned`),
/// kept beside the deployment so that operators see the prediction next to what is measured.
/// Figures are integers (the replicated state holds no floats, so that every agent's copy
/// compares equal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// The layout the planner chose. The deployment's own layout may differ later, after a
    /// scale or a flip.
    pub layout: Layout,
    /// The workload planned for: prompt and output tokens per request.
    pub isl: u32,
    pub osl: u32,
    /// The GPUs it planned over, as `type:count` joined by commas (`h100_sxm:8`).
    pub gpus: String,
    /// How the planner describes the layout, e.g. `1P (TP1) + 2D (TP1)`.
    pub describe: String,
    /// The simulated layout at the highest request rate at which 90% of requests meet both
    /// targets.
    pub request_rate_milli: u64,
    pub output_tokens_per_s_per_gpu_milli: u64,
    pub output_tokens_per_s_per_user_milli: u64,
    pub ttft_mean_us: u64,
    pub ttft_p90_us: u64,
    pub tpot_mean_us: u64,
    pub tpot_p90_us: u64,
    /// Share of simulated requests within both targets, in parts per million.
    pub slo_attainment_ppm: u32,
    /// Log index of the command that recorded it.
    pub planned_at: u64,
}

/// Longest `PlanRecord` text field.
pub const PLAN_TEXT_BYTES_MAX: usize = 1024;

/// Where a deployment's model folder was found, with the fingerprint it should have, when the
/// deployment was created: its engines are placed only on these nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelHosts {
    /// The checkpoint fingerprint (hex) every host's copy had to match.
    pub fingerprint: String,
    pub nodes: BTreeSet<String>,
}

/// A change to the cluster. Variants are only appended, never renumbered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegisterNode {
        name: String,
        id: u64,
        address: String,
        labels: BTreeMap<String, String>,
    },
    SetLabel {
        node: String,
        key: String,
        value: Option<String>,
    },
    SetHealth {
        node: String,
        health: NodeHealth,
    },
    SetAdminState {
        node: String,
        state: AdminState,
    },
    SetGpus {
        node: String,
        gpus: Vec<GpuRecord>,
    },
    /// Removes a node and revokes its certificate (by serial).
    RemoveNode {
        node: String,
        cert_serial: Option<String>,
    },
    /// A host enrolled with a join token under a name no registered node holds: its first
    /// certificate. A removed node's name becomes usable again this way.
    EnrollNode {
        node: String,
        id: u64,
        cert_serial: String,
        not_after_unix: i64,
    },
    /// A registered node's certificate (renewed, or issued offline and reported by the node),
    /// remembered so that removing the node revokes it.
    RecordCertificate {
        node: String,
        cert_serial: String,
        not_after_unix: i64,
    },
    CreateDeployment {
        name: String,
        engine: String,
        model: String,
        tp: u32,
        ttft_ms: Option<u32>,
        tpot_ms: Option<u32>,
        layout: Layout,
    },
    /// Removes a deployment and its assignments.
    DeleteDeployment {
        name: String,
    },
    ScaleDeployment {
        name: String,
        layout: Layout,
    },
    /// The coordinator's placement of a deployment's engines: replaces its assignments.
    /// Entries whose engine, node and GPUs are unchanged keep their generation.
    SetAssignments {
        deployment: String,
        assignments: Vec<Placed>,
    },
    /// An API key for the OpenAI API, by the SHA-256 of its secret (the secret itself is
    /// shown once to whoever created it and never stored).
    CreateApiKey {
        id: String,
        name: String,
        sha256_hex: String,
        created_unix: i64,
    },
    RevokeApiKey {
        id: String,
    },
    /// Whether the OpenAI API asks for a key. Creating a key turns it on; revoking keys never
    /// turns it off (revoking the last key must not open the API): only this does.
    RequireApiKeys {
        required: bool,
    },
    /// The node's engines of disaggregated deployments change role (to `role`, prefill or
    /// decode): each keeps its node and GPUs under an id of the new role, and its deployment's
    /// counts move with it. The node's agent drains the old engines (running requests finish)
    /// and starts the new ones once their GPUs are free. Refused when a deployment would be
    /// left without an engine of the other role.
    FlipNode {
        node: String,
        role: EngineRole,
    },
    /// `CreateDeployment` with what the agent that took it checked: the planner's record when
    /// the planner chose the layout (`plan.layout` is then `layout`), and the nodes that hold
    /// the model folder with the expected fingerprint (placement uses only those). Both are
    /// kept beside the deployment until it is deleted.
    CreateCheckedDeployment {
        name: String,
        engine: String,
        model: String,
        tp: u32,
        ttft_ms: Option<u32>,
        tpot_ms: Option<u32>,
        layout: Layout,
        plan: Option<PlanRecord>,
        model_hosts: Option<ModelHosts>,
    },
    /// A deployment whose engines take extra arguments (`pdctl deploy --engine-arg`): `create`
    /// is a `CreateDeployment` or `CreateCheckedDeployment`, applied as it is, and the arguments
    /// are kept beside the deployment (schema 3). Refused whole if either part is.
    CreateDeploymentWithArgs {
        create: Box<Command>,
        engine_args: Vec<String>,
    },
    /// A deployment's re-planning mode and bounds (`pdctl autoplan NAME on|advise|off`).
    SetAutoplan {
        deployment: String,
        setting: AutoplanSetting,
    },
    /// One decision of the coordinator's re-planner, kept with the deployment (schema 4);
    /// its move, if it made one, is applied with it or the whole command is refused: refused
    /// unless the deployment's mode is `on` and its layout is still the one decided on.
    RecordAutoplan {
        deployment: String,
        event: AutoplanEvent,
    },
}

impl Command {
    /// The variant's name, for messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RegisterNode { .. } => "RegisterNode",
            Command::SetLabel { .. } => "SetLabel",
            Command::SetHealth { .. } => "SetHealth",
            Command::SetAdminState { .. } => "SetAdminState",
            Command::SetGpus { .. } => "SetGpus",
            Command::RemoveNode { .. } => "RemoveNode",
            Command::EnrollNode { .. } => "EnrollNode",
            Command::RecordCertificate { .. } => "RecordCertificate",
            Command::CreateDeployment { .. } => "CreateDeployment",
            Command::DeleteDeployment { .. } => "DeleteDeployment",
            Command::ScaleDeployment { .. } => "ScaleDeployment",
            Command::SetAssignments { .. } => "SetAssignments",
            Command::CreateApiKey { .. } => "CreateApiKey",
            Command::RevokeApiKey { .. } => "RevokeApiKey",
            Command::RequireApiKeys { .. } => "RequireApiKeys",
            Command::FlipNode { .. } => "FlipNode",
            Command::CreateCheckedDeployment { .. } => "CreateCheckedDeployment",
            Command::CreateDeploymentWithArgs { .. } => "CreateDeploymentWithArgs",
            Command::SetAutoplan { .. } => "SetAutoplan",
            Command::RecordAutoplan { .. } => "RecordAutoplan",
        }
    }
}

/// Bounds on a deployment's extra engine arguments.
pub const ENGINE_ARGS_MAX: usize = 64;
pub const ENGINE_ARG_BYTES_MAX: usize = 1024;

/// The index `k` of an engine id `<deployment>/<role>-<k>`.
pub fn engine_index(engine: &str) -> Option<u32> {
    engine.rsplit_once('-')?.1.parse().ok()
}

/// Bounds on API keys.
pub const API_KEYS_MAX: usize = 10_000;
pub const API_KEY_NAME_BYTES_MAX: usize = 128;

/// An API key of the OpenAI API. Once a cluster has one, every agent's API asks for a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// SHA-256 of the whole key, lowercase hex.
    pub sha256_hex: String,
    pub created_unix: i64,
}

/// One engine's place, as the coordinator proposes it (the generation is set when applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub engine: String,
    pub role: EngineRole,
    pub node: String,
    pub gpus: Vec<u32>,
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Nothing to report (also: a blank or membership entry).
    Done,
    /// The command changed nothing (it asked for the state that already was).
    Unchanged,
    Registered {
        id: u64,
    },
    Removed {
        id: u64,
    },
}

/// A command refused by the state machine; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    #[error("node {name:?} is already registered with id {id}")]
    NameTaken { name: String, id: u64 },
    #[error("node id {id} already belongs to {name:?}")]
    IdTaken { id: u64, name: String },
    #[error("invalid label {key:?}: {why}")]
    BadLabel { key: String, why: String },
    #[error("node {node:?} has {count} labels, the limit is {LABELS_PER_NODE_MAX}")]
    TooManyLabels { node: String, count: usize },
    #[error("unknown deployment {0:?}")]
    UnknownDeployment(String),
    #[error("a deployment named {0:?} exists already")]
    DeploymentExists(String),
    #[error("invalid deployment: {0}")]
    BadDeployment(String),
    #[error("invalid API key: {0}")]
    BadApiKey(String),
    #[error("unknown API key {0:?}")]
    UnknownApiKey(String),
    /// Refused by the coordinator before it reached the log.
    #[error("{0}")]
    Refused(String),
}

/// The response carried back to the proposer through Raft.
pub type CommandResult = Result<Applied, ApplyError>;

/// Encoded with bincode, which is positional: a field added or changed is a new schema (with
/// a frozen copy of the old shape to read it), never a `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub schema_version: u32,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Serials of revoked certificates (hex).
    pub revoked_serials: BTreeSet<String>,
    /// Ids of removed nodes: refused until the name enrolls again with a join token.
    pub retired_ids: BTreeSet<u64>,
    /// Known certificates per node name: serial (hex) -> expiry (unix seconds).
    pub certificates: BTreeMap<String, BTreeMap<String, i64>>,
    pub deployments: BTreeMap<String, Deployment>,
    /// By engine id.
    pub assignments: BTreeMap<String, Assignment>,
    /// By key id.
    pub api_keys: BTreeMap<String, ApiKey>,
    /// Whether the OpenAI API asks for a key (see `Command::RequireApiKeys`).
    pub api_keys_required: bool,
    /// The planner's record of each `--layout planned` deployment, by deployment name.
    /// (Schema 2.)
    pub plans: BTreeMap<String, PlanRecord>,
    /// Where each deployment with a model folder may run, by deployment name. (Schema 2.)
    pub model_hosts: BTreeMap<String, ModelHosts>,
    /// Extra arguments for the engines of a deployment, by deployment name (`pdctl deploy
    /// --engine-arg`). (Schema 3.)
    pub engine_args: BTreeMap<String, Vec<String>>,
    /// Each deployment's re-planning setting, where one was set (schema 4; see
    /// `autoplan_setting` for the default).
    pub autoplan: BTreeMap<String, AutoplanSetting>,
    /// The re-planner's latest decisions per deployment, oldest first (schema 4).
    pub autoplan_events: BTreeMap<String, Vec<AutoplanEvent>>,
}

/// `ClusterState` as schema 3 stored it (before the re-planner's settings and decisions).
/// Frozen: never change it.
#[derive(Deserialize)]
pub(crate) struct ClusterStateV3 {
    #[allow(dead_code)]
    schema_version: u32,
    nodes: BTreeMap<String, NodeRecord>,
    revoked_serials: BTreeSet<String>,
    retired_ids: BTreeSet<u64>,
    certificates: BTreeMap<String, BTreeMap<String, i64>>,
    deployments: BTreeMap<String, Deployment>,
    assignments: BTreeMap<String, Assignment>,
    api_keys: BTreeMap<String, ApiKey>,
    api_keys_required: bool,
    plans: BTreeMap<String, PlanRecord>,
    model_hosts: BTreeMap<String, ModelHosts>,
    engine_args: BTreeMap<String, Vec<String>>,
}

impl From<ClusterStateV3> for ClusterState {
    fn from(v3: ClusterStateV3) -> ClusterState {
        ClusterState {
            schema_version: SCHEMA_VERSION,
            nodes: v3.nodes,
            revoked_serials: v3.revoked_serials,
            retired_ids: v3.retired_ids,
            certificates: v3.certificates,
            deployments: v3.deployments,
            assignments: v3.assignments,
            api_keys: v3.api_keys,
            api_keys_required: v3.api_keys_required,
            plans: v3.plans,
            model_hosts: v3.model_hosts,
            engine_args: v3.engine_args,
            autoplan: BTreeMap::new(),
            autoplan_events: BTreeMap::new(),
        }
    }
}

/// `ClusterState` as schema 2 stored it (before `engine_args`). Frozen: never change it.
#[derive(Deserialize)]
pub(crate) struct ClusterStateV2 {
    #[allow(dead_code)]
    schema_version: u32,
    nodes: BTreeMap<String, NodeRecord>,
    revoked_serials: BTreeSet<String>,
    retired_ids: BTreeSet<u64>,
    certificates: BTreeMap<String, BTreeMap<String, i64>>,
    deployments: BTreeMap<String, Deployment>,
    assignments: BTreeMap<String, Assignment>,
    api_keys: BTreeMap<String, ApiKey>,
    api_keys_required: bool,
    plans: BTreeMap<String, PlanRecord>,
    model_hosts: BTreeMap<String, ModelHosts>,
}

impl From<ClusterStateV2> for ClusterState {
    fn from(v2: ClusterStateV2) -> ClusterState {
        ClusterState {
            schema_version: SCHEMA_VERSION,
            nodes: v2.nodes,
            revoked_serials: v2.revoked_serials,
            retired_ids: v2.retired_ids,
            certificates: v2.certificates,
            deployments: v2.deployments,
            assignments: v2.assignments,
            api_keys: v2.api_keys,
            api_keys_required: v2.api_keys_required,
            plans: v2.plans,
            model_hosts: v2.model_hosts,
            engine_args: BTreeMap::new(),
            autoplan: BTreeMap::new(),
            autoplan_events: BTreeMap::new(),
        }
    }
}

/// `ClusterState` as schema 1 stored it (before `plans`): an upgraded agent reads the
/// snapshots its previous version wrote through this. Frozen: never change it.
#[derive(Deserialize)]
pub(crate) struct ClusterStateV1 {
    #[allow(dead_code)]
    schema_version: u32,
    nodes: BTreeMap<String, NodeRecord>,
    revoked_serials: BTreeSet<String>,
    retired_ids: BTreeSet<u64>,
    certificates: BTreeMap<String, BTreeMap<String, i64>>,
    deployments: BTreeMap<String, Deployment>,
    assignments: BTreeMap<String, Assignment>,
    api_keys: BTreeMap<String, ApiKey>,
    api_keys_required: bool,
}

impl From<ClusterStateV1> for ClusterState {
    fn from(v1: ClusterStateV1) -> ClusterState {
        ClusterState {
            schema_version: SCHEMA_VERSION,
            nodes: v1.nodes,
            revoked_serials: v1.revoked_serials,
            retired_ids: v1.retired_ids,
            certificates: v1.certificates,
            deployments: v1.deployments,
            assignments: v1.assignments,
            api_keys: v1.api_keys,
            api_keys_required: v1.api_keys_required,
            plans: BTreeMap::new(),
            model_hosts: BTreeMap::new(),
            engine_args: BTreeMap::new(),
            autoplan: BTreeMap::new(),
            autoplan_events: BTreeMap::new(),
        }
    }
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            schema_version: SCHEMA_VERSION,
            nodes: BTreeMap::new(),
            revoked_serials: BTreeSet::new(),
            retired_ids: BTreeSet::new(),
            certificates: BTreeMap::new(),
            deployments: BTreeMap::new(),
            assignments: BTreeMap::new(),
            api_keys: BTreeMap::new(),
            api_keys_required: false,
            plans: BTreeMap::new(),
            model_hosts: BTreeMap::new(),
            engine_args: BTreeMap::new(),
            autoplan: BTreeMap::new(),
            autoplan_events: BTreeMap::new(),
        }
    }
}

fn check_deployment(
    name: &str,
    engine: &str,
    model: &str,
    tp: u32,
    layout: &Layout,
) -> Result<(), ApplyError> {
    let bad = |why: String| Err(ApplyError::BadDeployment(why));
    let label = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if name.is_empty()
        || name.len() > DEPLOYMENT_NAME_BYTES_MAX
        || !name.chars().all(label)
        || name.starts_with(['-', '.'])
    {
        return bad(format!(
            "name {name:?}: 1 to {DEPLOYMENT_NAME_BYTES_MAX} of a-z, 0-9, '-', '.', not starting with '-' or '.'"
        ));
    }
    if !ENGINES.contains(&engine) {
        return bad(format!(
            "engine {engine:?}: one of {} (sglang is not available yet)",
            ENGINES.join(", ")
        ));
    }
    if model.is_empty() || model.len() > 4096 {
        return bad("model must name a preset or a folder".into());
    }
    if !(1..=8).contains(&tp) {
        return bad(format!("tp {tp}: between 1 and 8 GPUs per engine"));
    }
    let n = layout.engine_count();
    if n == 0 || n > ENGINES_PER_DEPLOYMENT_MAX {
        return bad(format!(
            "{n} engines: between 1 and {ENGINES_PER_DEPLOYMENT_MAX}"
        ));
    }
    if let Layout::Disaggregated { prefill, decode } = layout
        && (*prefill == 0 || *decode == 0)
    {
        return bad(
            "a disaggregated layout needs at least one prefill and one decode engine".into(),
        );
    }
    Ok(())
}

/// The engine drivers a deployment may name.
pub const ENGINES: &[&str] = &["builtin", "vllm"];

fn check_engine_args(args: &[String]) -> Result<(), ApplyError> {
    if args.len() > ENGINE_ARGS_MAX {
        return Err(ApplyError::BadDeployment(format!(
            "{} engine arguments: at most {ENGINE_ARGS_MAX}",
            args.len()
        )));
    }
    if let Some(a) = args
        .iter()
        .find(|a| a.is_empty() || a.len() > ENGINE_ARG_BYTES_MAX || a.contains('\0'))
    {
        return Err(ApplyError::BadDeployment(format!(
            "engine argument {a:?}: 1 to {ENGINE_ARG_BYTES_MAX} bytes, no NUL"
        )));
    }
    Ok(())
}

fn check_label(key: &str, value: Option<&str>) -> Result<(), ApplyError> {
    let bad = |why: &str| {
        Err(ApplyError::BadLabel {
            key: key.to_string(),
            why: why.to_string(),
        })
    };
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
    if key.is_empty() || key.len() > LABEL_BYTES_MAX || !key.chars().all(ok_char) {
        return bad("keys are 1 to 253 of a-z, A-Z, 0-9, '-', '_', '.', '/'");
    }
    if value.is_some_and(|v| v.len() > LABEL_BYTES_MAX || !v.chars().all(ok_char)) {
        return bad("values are at most 253 of a-z, A-Z, 0-9, '-', '_', '.', '/'");
    }
    Ok(())
}

impl ClusterState {
    pub fn node(&self, name: &str) -> Result<&NodeRecord, ApplyError> {
        self.nodes
            .get(name)
            .ok_or_else(|| ApplyError::UnknownNode(name.to_string()))
    }

    /// See [`Command::FlipNode`]; `only`: the engines of that deployment alone.
    fn flip_node(
        &mut self,
        node: &str,
        role: EngineRole,
        index: u64,
        only: Option<&str>,
    ) -> Result<Applied, ApplyError> {
        self.node(node)?;
        let from = match role {
            EngineRole::Prefill => EngineRole::Decode,
            EngineRole::Decode => EngineRole::Prefill,
            EngineRole::Both => {
                return Err(ApplyError::Refused(
                    "a node flips to prefill or to decode".into(),
                ));
            }
        };
        let mut flips: BTreeMap<String, Vec<Assignment>> = BTreeMap::new();
        for a in self.assignments.values() {
            if a.node == node && a.role == from && only.is_none_or(|d| a.deployment == d) {
                flips
                    .entry(a.deployment.clone())
                    .or_default()
                    .push(a.clone());
            }
        }
        if flips.is_empty() {
            return Err(ApplyError::Refused(format!(
                "node {node} runs no {from} engine to flip"
            )));
        }
        // Check every deployment before changing any.
        let mut layouts = BTreeMap::new();
        for (dep, engines) in &flips {
            let d = self
                .deployments
                .get(dep)
                .ok_or_else(|| ApplyError::UnknownDeployment(dep.clone()))?;
            let Layout::Disaggregated { prefill, decode } = d.layout else {
                continue;
            };
            let m = engines.len() as u32;
            let layout = match role {
                EngineRole::Prefill => Layout::Disaggregated {
                    prefill: prefill + m,
                    decode: decode.saturating_sub(m),
                },
                _ => Layout::Disaggregated {
                    prefill: prefill.saturating_sub(m),
                    decode: decode + m,
                },
            };
            if let Layout::Disaggregated { prefill: 0, .. }
            | Layout::Disaggregated { decode: 0, .. } = layout
            {
                return Err(ApplyError::Refused(format!(
                    "flipping {node} would leave {dep} without a {from} engine; scale it first (pdctl scale {dep} --prefill P --decode D)"
                )));
            }
            layouts.insert(dep.clone(), layout);
        }
        for (dep, layout) in layouts {
            let mut taken: BTreeSet<u32> = self
                .assignments
                .values()
                .filter(|a| a.deployment == dep && a.role == role)
                .filter_map(|a| engine_index(&a.engine))
                .collect();
            for old in &flips[&dep] {
                let k = (0..).find(|k| !taken.contains(k)).expect("a free index");
                taken.insert(k);
                let engine = format!("{dep}/{role}-{k}");
                self.assignments.remove(&old.engine);
                self.assignments.insert(
                    engine.clone(),
                    Assignment {
                        engine,
                        role,
                        generation: index,
                        ..old.clone()
                    },
                );
            }
            self.deployments.get_mut(&dep).expect("checked").layout = layout;
        }
        Ok(Applied::Done)
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut NodeRecord, ApplyError> {
        self.nodes
            .get_mut(name)
            .ok_or_else(|| ApplyError::UnknownNode(name.to_string()))
    }

    /// Whether the node with this id was removed from the cluster.
    fn create_deployment(&mut self, d: Deployment) -> CommandResult {
        check_deployment(&d.name, &d.engine, &d.model, d.tp, &d.layout)?;
        if self.deployments.contains_key(&d.name) {
            return Err(ApplyError::DeploymentExists(d.name));
        }
        self.deployments.insert(d.name.clone(), d);
        Ok(Applied::Done)
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.retired_ids.contains(&id)
    }

    pub fn node_by_id(&self, id: u64) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.id == id)
    }

    fn remember_certificate(&mut self, node: &str, serial: &str, not_after_unix: i64) {
        let certs = self.certificates.entry(node.to_string()).or_default();
        certs.insert(serial.to_ascii_lowercase(), not_after_unix);
        while certs.len() > CERTIFICATES_PER_NODE_MAX {
            let oldest = certs
                .iter()
                .min_by_key(|(serial, exp)| (**exp, (*serial).clone()))
                .map(|(s, _)| s.clone());
            if let Some(s) = oldest {
                certs.remove(&s);
            }
        }
    }

    /// Whether a certificate serial (hex) was revoked.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.revoked_serials
            .contains(&serial_hex.to_ascii_lowercase())
    }

    /// Applies one command at log index `index`. Pure: no IO, no clock.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> CommandResult {
        match cmd {
            Command::RegisterNode {
                name,
                id,
                address,
                labels,
            } => {
                for (k, v) in labels {
                    check_label(k, Some(v))?;
                }
                if labels.len() > LABELS_PER_NODE_MAX {
                    return Err(ApplyError::TooManyLabels {
                        node: name.clone(),
                        count: labels.len(),
                    });
                }
                if let Some(n) = self.nodes.get(name) {
                    if n.id == *id {
                        // A re-registration (e.g. after a restart) refreshes the address.
                        let n = self.node_mut(name)?;
                        if n.address == *address {
                            return Ok(Applied::Unchanged);
                        }
                        n.address = address.clone();
                        return Ok(Applied::Registered { id: *id });
                    }
                    return Err(ApplyError::NameTaken {
                        name: name.clone(),
                        id: n.id,
                    });
                }
                if let Some(other) = self.node_by_id(*id) {
                    return Err(ApplyError::IdTaken {
                        id: *id,
                        name: other.name.clone(),
                    });
                }
                if self.retired_ids.contains(id) {
                    return Err(ApplyError::IdTaken {
                        id: *id,
                        name: "(removed node)".into(),
                    });
                }
                self.nodes.insert(
                    name.clone(),
                    NodeRecord {
                        name: name.clone(),
                        id: *id,
                        address: address.clone(),
                        labels: labels.clone(),
                        gpus: Vec::new(),
                        health: NodeHealth::Ready,
                        admin_state: AdminState::Active,
                        registered_at: index,
                    },
                );
                Ok(Applied::Registered { id: *id })
            }
            Command::SetLabel { node, key, value } => {
                check_label(key, value.as_deref())?;
                let n = self.node_mut(node)?;
                let before = n.labels.get(key).cloned();
                if before == *value {
                    return Ok(Applied::Unchanged);
                }
                match value {
                    Some(v) => {
                        if before.is_none() && n.labels.len() >= LABELS_PER_NODE_MAX {
                            return Err(ApplyError::TooManyLabels {
                                node: node.clone(),
                                count: n.labels.len() + 1,
                            });
                        }
                        n.labels.insert(key.clone(), v.clone());
                    }
                    None => {
                        n.labels.remove(key);
                    }
                }
                Ok(Applied::Done)
            }
            Command::SetHealth { node, health } => {
                let n = self.node_mut(node)?;
                if n.health == *health {
                    return Ok(Applied::Unchanged);
                }
                n.health = *health;
                Ok(Applied::Done)
            }
            Command::SetAdminState { node, state } => {
                let n = self.node_mut(node)?;
                if n.admin_state == *state {
                    return Ok(Applied::Unchanged);
                }
                n.admin_state = *state;
                Ok(Applied::Done)
            }
            Command::SetGpus { node, gpus } => {
                let n = self.node_mut(node)?;
                if n.gpus == *gpus {
                    return Ok(Applied::Unchanged);
                }
                n.gpus = gpus.clone();
                Ok(Applied::Done)
            }
            Command::RemoveNode { node, cert_serial } => {
                let n = self
                    .nodes
                    .remove(node)
                    .ok_or_else(|| ApplyError::UnknownNode(node.clone()))?;
                self.retired_ids.insert(n.id);
                if let Some(s) = cert_serial {
                    self.revoked_serials.insert(s.to_ascii_lowercase());
                }
                if let Some(certs) = self.certificates.remove(node) {
                    self.revoked_serials.extend(certs.into_keys());
                }
                // Its engines are gone with it; the coordinator places them again.
                self.assignments.retain(|_, a| a.node != *node);
                Ok(Applied::Removed { id: n.id })
            }
            Command::EnrollNode {
                node,
                id,
                cert_serial,
                not_after_unix,
            } => {
                if let Some(n) = self.nodes.get(node) {
                    return Err(ApplyError::NameTaken {
                        name: node.clone(),
                        id: n.id,
                    });
                }
                self.retired_ids.remove(id);
                self.remember_certificate(node, cert_serial, *not_after_unix);
                Ok(Applied::Done)
            }
            Command::CreateDeployment {
                name,
                engine,
                model,
                tp,
                ttft_ms,
                tpot_ms,
                layout,
            } => {
                let d = Deployment {
                    name: name.clone(),
                    engine: engine.clone(),
                    model: model.clone(),
                    tp: *tp,
                    ttft_ms: *ttft_ms,
                    tpot_ms: *tpot_ms,
                    layout: *layout,
                    created_at: index,
                };
                self.create_deployment(d)
            }
            Command::CreateCheckedDeployment {
                name,
                engine,
                model,
                tp,
                ttft_ms,
                tpot_ms,
                layout,
                plan,
                model_hosts,
            } => {
                let bad = |why: String| Err(ApplyError::BadDeployment(why));
                if let Some(plan) = plan {
                    if ttft_ms.is_none() || tpot_ms.is_none() {
                        return bad("a planned layout needs TTFT and TPOT targets".into());
                    }
                    if plan.layout != *layout {
                        return bad("the layout is not the plan's".into());
                    }
                    if plan.gpus.len() > PLAN_TEXT_BYTES_MAX
                        || plan.describe.len() > PLAN_TEXT_BYTES_MAX
                    {
                        return bad(format!("plan text over {PLAN_TEXT_BYTES_MAX} bytes"));
                    }
                }
                if let Some(h) = model_hosts {
                    if h.nodes.is_empty() {
                        return bad(format!("model {model}: no node has it"));
                    }
                    if h.fingerprint.len() > 64 || h.nodes.len() > 100_000 {
                        return bad("model hosts out of bounds".into());
                    }
                }
                let d = Deployment {
                    name: name.clone(),
                    engine: engine.clone(),
                    model: model.clone(),
                    tp: *tp,
                    ttft_ms: *ttft_ms,
                    tpot_ms: *tpot_ms,
                    layout: *layout,
                    created_at: index,
                };
                self.create_deployment(d)?;
                if let Some(plan) = plan {
                    let plan = PlanRecord {
                        planned_at: index,
                        ..plan.clone()
                    };
                    self.plans.insert(name.clone(), plan);
                }
                if let Some(h) = model_hosts {
                    self.model_hosts.insert(name.clone(), h.clone());
                }
                Ok(Applied::Done)
            }
            Command::CreateDeploymentWithArgs {
                create,
                engine_args,
            } => {
                check_engine_args(engine_args)?;
                let name = match create.as_ref() {
                    Command::CreateDeployment { name, .. }
                    | Command::CreateCheckedDeployment { name, .. } => name.clone(),
                    _ => {
                        return Err(ApplyError::BadDeployment(
                            "engine arguments come with a deployment's creation".into(),
                        ));
                    }
                };
                // A refused creation changes nothing; after it, nothing here can fail.
                self.apply(index, create)?;
                if !engine_args.is_empty() {
                    self.engine_args.insert(name, engine_args.clone());
                }
                Ok(Applied::Done)
            }
            Command::DeleteDeployment { name } => {
                self.deployments
                    .remove(name)
                    .ok_or_else(|| ApplyError::UnknownDeployment(name.clone()))?;
                self.assignments.retain(|_, a| a.deployment != *name);
                self.plans.remove(name);
                self.model_hosts.remove(name);
                self.engine_args.remove(name);
                self.autoplan.remove(name);
                self.autoplan_events.remove(name);
                Ok(Applied::Done)
            }
            Command::ScaleDeployment { name, layout } => {
                let d = self
                    .deployments
                    .get(name)
                    .ok_or_else(|| ApplyError::UnknownDeployment(name.clone()))?;
                check_deployment(name, &d.engine, &d.model, d.tp, layout)?;
                if d.layout == *layout {
                    return Ok(Applied::Unchanged);
                }
                self.deployments.get_mut(name).expect("present").layout = *layout;
                Ok(Applied::Done)
            }
            Command::CreateApiKey {
                id,
                name,
                sha256_hex,
                created_unix,
            } => {
                let hex_ok = |h: &str, n: usize| {
                    h.len() == n
                        && h.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                };
                if !hex_ok(id, 8) {
                    return Err(ApplyError::BadApiKey(
                        "the id is 8 lowercase hex digits".into(),
                    ));
                }
                if !hex_ok(sha256_hex, 64) {
                    return Err(ApplyError::BadApiKey(
                        "the hash is 64 lowercase hex digits (SHA-256)".into(),
                    ));
                }
                if name.len() > API_KEY_NAME_BYTES_MAX || name.chars().any(char::is_control) {
                    return Err(ApplyError::BadApiKey(format!(
                        "the name is at most {API_KEY_NAME_BYTES_MAX} bytes without control characters"
                    )));
                }
                if self.api_keys.contains_key(id) {
                    return Err(ApplyError::BadApiKey(format!("id {id} exists already")));
                }
                if self.api_keys.len() >= API_KEYS_MAX {
                    return Err(ApplyError::BadApiKey(format!(
                        "the cluster holds {API_KEYS_MAX} keys, the limit"
                    )));
                }
                self.api_keys.insert(
                    id.clone(),
                    ApiKey {
                        id: id.clone(),
                        name: name.clone(),
                        sha256_hex: sha256_hex.clone(),
                        created_unix: *created_unix,
                    },
                );
                self.api_keys_required = true;
                Ok(Applied::Done)
            }
            Command::RequireApiKeys { required } => {
                if self.api_keys_required == *required {
                    return Ok(Applied::Unchanged);
                }
                self.api_keys_required = *required;
                Ok(Applied::Done)
            }
            Command::RevokeApiKey { id } => {
                self.api_keys
                    .remove(id)
                    .ok_or_else(|| ApplyError::UnknownApiKey(id.clone()))?;
                Ok(Applied::Done)
            }
            Command::SetAssignments {
                deployment,
                assignments,
            } => {
                if !self.deployments.contains_key(deployment) {
                    return Err(ApplyError::UnknownDeployment(deployment.clone()));
                }
                // One GPU never runs two engines: check against other deployments' engines and
                // within the new set.
                let mut taken: BTreeSet<(String, u32)> = self
                    .assignments
                    .values()
                    .filter(|a| a.deployment != *deployment)
                    .flat_map(|a| a.gpus.iter().map(|g| (a.node.clone(), *g)))
                    .collect();
                for p in assignments {
                    if !p.engine.starts_with(&format!("{deployment}/")) {
                        return Err(ApplyError::BadDeployment(format!(
                            "engine {} does not belong to {deployment}",
                            p.engine
                        )));
                    }
                    self.node(&p.node)?;
                    for g in &p.gpus {
                        if !taken.insert((p.node.clone(), *g)) {
                            return Err(ApplyError::BadDeployment(format!(
                                "GPU {g} of {} would run two engines",
                                p.node
                            )));
                        }
                    }
                }
                let before: BTreeMap<String, Assignment> = self
                    .assignments
                    .iter()
                    .filter(|(_, a)| a.deployment == *deployment)
                    .map(|(k, a)| (k.clone(), a.clone()))
                    .collect();
                let next: BTreeMap<String, Assignment> = assignments
                    .iter()
                    .map(|p| {
                        let kept = before
                            .get(&p.engine)
                            .filter(|a| a.node == p.node && a.gpus == p.gpus && a.role == p.role);
                        let a = Assignment {
                            engine: p.engine.clone(),
                            deployment: deployment.clone(),
                            role: p.role,
                            node: p.node.clone(),
                            gpus: p.gpus.clone(),
                            generation: kept.map_or(index, |a| a.generation),
                        };
                        (p.engine.clone(), a)
                    })
                    .collect();
                if next == before {
                    return Ok(Applied::Unchanged);
                }
                self.assignments.retain(|_, a| a.deployment != *deployment);
                self.assignments.extend(next);
                Ok(Applied::Done)
            }
            Command::FlipNode { node, role } => self.flip_node(node, *role, index, None),
            Command::SetAutoplan {
                deployment,
                setting,
            } => self.set_autoplan(deployment, setting),
            Command::RecordAutoplan { deployment, event } => {
                self.record_autoplan(index, deployment, event)
            }
            Command::RecordCertificate {
                node,
                cert_serial,
                not_after_unix,
            } => {
                self.node(node)?;
                if self
                    .certificates
                    .get(node)
                    .is_some_and(|c| c.contains_key(&cert_serial.to_ascii_lowercase()))
                {
                    return Ok(Applied::Unchanged);
                }
                self.remember_certificate(node, cert_serial, *not_after_unix);
                Ok(Applied::Done)
            }
        }
    }
}

#[cfg(test)]
mod api_key_tests {
    use super::*;

    fn create(id: &str, hash: &str) -> Command {
        Command::CreateApiKey {
            id: id.into(),
            name: "ci".into(),
            sha256_hex: hash.into(),
            created_unix: 1,
        }
    }

    #[test]
    fn api_keys_are_created_checked_and_revoked() {
        let mut s = ClusterState::default();
        let h = "ab".repeat(32);
        assert_eq!(s.apply(1, &create("0123abcd", &h)), Ok(Applied::Done));
        assert!(matches!(
            s.apply(2, &create("0123abcd", &h)),
            Err(ApplyError::BadApiKey(_))
        ));
        assert!(matches!(
            s.apply(3, &create("XYZ", &h)),
            Err(ApplyError::BadApiKey(_))
        ));
        assert!(matches!(
            s.apply(4, &create("0123abce", "zz")),
            Err(ApplyError::BadApiKey(_))
        ));
        assert_eq!(s.api_keys["0123abcd"].sha256_hex, h);
        let revoke = Command::RevokeApiKey {
            id: "0123abcd".into(),
        };
        assert!(s.api_keys_required);
        assert_eq!(s.apply(5, &revoke), Ok(Applied::Done));
        assert!(s.api_keys.is_empty());
        // Revoking the last key keeps the API closed; only an explicit command opens it.
        assert!(s.api_keys_required);
        let open = Command::RequireApiKeys { required: false };
        assert_eq!(s.apply(7, &open), Ok(Applied::Done));
        assert!(!s.api_keys_required);
        assert_eq!(s.apply(8, &open), Ok(Applied::Unchanged));
        assert!(matches!(
            s.apply(6, &revoke),
            Err(ApplyError::UnknownApiKey(_))
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, id: u64) -> Command {
        Command::RegisterNode {
            name: name.into(),
            id,
            address: format!("127.0.0.{id}:7400"),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn register_label_health_admin_remove() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(1, &reg("node-1", 1)),
            Ok(Applied::Registered { id: 1 })
        );
        assert_eq!(s.apply(2, &reg("node-1", 1)), Ok(Applied::Unchanged));
        assert_eq!(
            s.apply(3, &reg("node-1", 9)),
            Err(ApplyError::NameTaken {
                name: "node-1".into(),
                id: 1
            })
        );
        assert_eq!(
            s.apply(4, &reg("node-2", 1)),
            Err(ApplyError::IdTaken {
                id: 1,
                name: "node-1".into()
            })
        );
        let label = Command::SetLabel {
            node: "node-1".into(),
            key: "rack".into(),
            value: Some("r1".into()),
        };
        assert_eq!(s.apply(5, &label), Ok(Applied::Done));
        assert_eq!(s.apply(6, &label), Ok(Applied::Unchanged));
        assert_eq!(s.nodes["node-1"].labels["rack"], "r1");
        let bad = Command::SetLabel {
            node: "node-1".into(),
            key: "a b".into(),
            value: None,
        };
        assert!(matches!(s.apply(7, &bad), Err(ApplyError::BadLabel { .. })));
        let h = Command::SetHealth {
            node: "node-1".into(),
            health: NodeHealth::Suspect,
        };
        assert_eq!(s.apply(8, &h), Ok(Applied::Done));
        let a = Command::SetAdminState {
            node: "node-1".into(),
            state: AdminState::Cordoned,
        };
        assert_eq!(s.apply(9, &a), Ok(Applied::Done));
        assert_eq!(s.nodes["node-1"].health, NodeHealth::Suspect);
        assert_eq!(s.nodes["node-1"].admin_state, AdminState::Cordoned);
        let unknown = Command::SetHealth {
            node: "node-9".into(),
            health: NodeHealth::Down,
        };
        assert_eq!(
            s.apply(10, &unknown),
            Err(ApplyError::UnknownNode("node-9".into()))
        );
        let rm = Command::RemoveNode {
            node: "node-1".into(),
            cert_serial: Some("ABCD".into()),
        };
        assert_eq!(s.apply(11, &rm), Ok(Applied::Removed { id: 1 }));
        assert!(s.revoked_serials.contains("abcd"));
        // A removed node's id is never reused.
        assert!(matches!(
            s.apply(12, &reg("node-3", 1)),
            Err(ApplyError::IdTaken { .. })
        ));
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("node-1", 1)).unwrap();
        let before = s.clone();
        let cmds = [
            reg("node-1", 2),
            reg("node-2", 1),
            Command::SetLabel {
                node: "node-1".into(),
                key: String::new(),
                value: Some("x".into()),
            },
            Command::SetGpus {
                node: "nope".into(),
                gpus: vec![],
            },
            Command::RemoveNode {
                node: "nope".into(),
                cert_serial: None,
            },
        ];
        for c in &cmds {
            assert!(s.apply(2, c).is_err(), "{c:?}");
            assert_eq!(s, before, "{c:?} changed the state");
        }
    }

    #[test]
    fn same_commands_same_state() {
        let cmds: Vec<Command> = (1..=20)
            .flat_map(|i| {
                vec![
                    reg(&format!("n{}", i % 7), i % 7 + 1),
                    Command::SetLabel {
                        node: format!("n{}", i % 5),
                        key: "k".into(),
                        value: Some(format!("v{i}")),
                    },
                    Command::SetHealth {
                        node: format!("n{}", i % 3),
                        health: NodeHealth::Down,
                    },
                ]
            })
            .collect();
        let run = || {
            let mut s = ClusterState::default();
            let out: Vec<_> = cmds
                .iter()
                .enumerate()
                .map(|(i, c)| s.apply(i as u64, c))
                .collect();
            (s, out)
        };
        assert_eq!(run(), run());
    }

    /// Removing a node revokes every certificate the cluster knows it by; enrolling the name
    /// again with a token lifts the refusal of the name but not of the old certificates.
    #[test]
    fn enroll_record_remove_revokes_and_reenroll() {
        let mut s = ClusterState::default();
        let enroll = |serial: &str| Command::EnrollNode {
            node: "node-2".into(),
            id: 2,
            cert_serial: serial.into(),
            not_after_unix: 100,
        };
        assert_eq!(s.apply(1, &enroll("AA")), Ok(Applied::Done));
        s.apply(2, &reg("node-2", 2)).unwrap();
        // A registered name cannot be enrolled again (a token is no licence to impersonate).
        assert!(matches!(
            s.apply(3, &enroll("bb")),
            Err(ApplyError::NameTaken { .. })
        ));
        let record = |serial: &str, exp| Command::RecordCertificate {
            node: "node-2".into(),
            cert_serial: serial.into(),
            not_after_unix: exp,
        };
        assert_eq!(s.apply(4, &record("cc", 200)), Ok(Applied::Done));
        assert_eq!(s.apply(5, &record("CC", 200)), Ok(Applied::Unchanged));
        assert!(matches!(
            s.apply(
                6,
                &Command::RecordCertificate {
                    node: "ghost".into(),
                    cert_serial: "dd".into(),
                    not_after_unix: 1
                }
            ),
            Err(ApplyError::UnknownNode(_))
        ));
        s.apply(
            7,
            &Command::RemoveNode {
                node: "node-2".into(),
                cert_serial: None,
            },
        )
        .unwrap();
        assert!(s.is_revoked("aa") && s.is_revoked("cc"));
        assert!(s.is_removed(2));
        assert_eq!(s.apply(8, &enroll("ee")), Ok(Applied::Done));
        assert!(!s.is_removed(2));
        assert!(s.is_revoked("aa") && !s.is_revoked("ee"));
    }

    /// The certificates remembered per node are bounded; the oldest go first.
    #[test]
    fn certificates_per_node_are_bounded() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("n", 1)).unwrap();
        for i in 0..(CERTIFICATES_PER_NODE_MAX as i64 + 3) {
            s.apply(
                2 + i as u64,
                &Command::RecordCertificate {
                    node: "n".into(),
                    cert_serial: format!("{i:02x}"),
                    not_after_unix: 1000 + i,
                },
            )
            .unwrap();
        }
        let certs = &s.certificates["n"];
        assert_eq!(certs.len(), CERTIFICATES_PER_NODE_MAX);
        assert!(!certs.contains_key("00") && certs.contains_key("0a"));
    }
}
