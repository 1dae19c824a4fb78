//! `pd-api`: the admin API's vocabulary, shared by the agent that serves it and by `pdctl`,
//! which reads every answer through these types, so that a renamed field is a compile error
//! rather than a blank column.
//!
//! Owns: the request bodies and answers of the admin API (JSON), the error body, and the
//! reports agents make about the cluster (`cluster`), which the admin API passes on.
//!
//! Must never: do IO, or depend on the agent.

#![forbid(unsafe_code)]

pub mod cluster;

use std::collections::BTreeMap;

use pd_raft::{Assignment, Deployment, ModelHosts};
use serde::{Deserialize, Serialize};

pub use cluster::{
    EngineLoad, EngineReport, EngineState, GpuTelemetry, NodeStatus, NodeTelemetry, StatusReport,
};
/// The replicated state's own types that answers carry.
pub use pd_raft::state::GpuRecord;
pub use pd_raft::{
    AdminState, AutoplanEvent, AutoplanMode, AutoplanMove, AutoplanScore, AutoplanSetting,
    EngineRole, Layout, NodeHealth,
};

/// Every error: `{"error": {"message", "code"}}` with a 4xx or 5xx status; a write sent to an
/// agent that is not the coordinator (`421 not_coordinator`) also names the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
}

/// `GET /v1/status`: the cluster as the answering agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The agent that answered.
    pub node: String,
    /// The coordinator (Raft leader) it knows of.
    pub coordinator: Option<String>,
    pub term: u64,
    /// Its Raft state: leader, follower, candidate, learner, shutdown.
    pub raft_state: String,
    pub last_applied: Option<u64>,
    /// False until it belongs to an initialised cluster.
    pub in_cluster: bool,
    pub nodes: Vec<NodeView>,
    /// Why the cluster has fewer Raft voters than it wants, when it has.
    pub voters_short: Option<String>,
}

/// One node in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub status: NodeStatus,
    /// Its GPUs' latest readings as the coordinator heard them (`None`: not heard from).
    pub telemetry: Option<NodeReadings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReadings {
    /// How long ago the coordinator received them.
    pub age_ms: u64,
    pub gpus: Vec<GpuTelemetry>,
}

impl Status {
    /// `report` with each node's readings from `telemetry` and the voter shortage.
    pub fn of(
        report: StatusReport,
        telemetry: &[NodeTelemetry],
        voters_short: Option<String>,
    ) -> Status {
        let nodes = report
            .nodes
            .into_iter()
            .map(|status| NodeView {
                telemetry: telemetry
                    .iter()
                    .find(|t| t.node == status.name)
                    .map(|t| NodeReadings {
                        age_ms: t.age_ms,
                        gpus: t.gpus.clone(),
                    }),
                status,
            })
            .collect();
        Status {
            node: report.node,
            coordinator: report.coordinator,
            term: report.term,
            raft_state: report.raft_state,
            last_applied: report.last_applied,
            in_cluster: report.in_cluster,
            nodes,
            voters_short,
        }
    }
}

/// `GET /v1/engines`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Engines {
    pub engines: Vec<EngineReport>,
}

/// `GET /v1/deployments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployments {
    pub deployments: Vec<DeploymentView>,
    /// Agents that did not answer for the measured latencies (the figures lack theirs).
    pub measured_without: Vec<String>,
}

/// One deployment with its engines, its plan and what was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    #[serde(flatten)]
    pub deployment: Deployment,
    pub engines: Vec<Assignment>,
    /// Every engine of its layout has a place.
    pub placed: bool,
    /// The planner's prediction, for a planned layout.
    pub plan: Option<Plan>,
    pub measured: Measured,
    /// Where its model folder was found, when it names one.
    pub model_hosts: Option<ModelHosts>,
    pub engine_args: Vec<String>,
    /// Its re-planning setting.
    #[serde(default = "autoplan_off")]
    pub autoplan: pd_raft::AutoplanSetting,
}

fn autoplan_off() -> pd_raft::AutoplanSetting {
    pd_raft::AutoplanSetting::mode(pd_raft::AutoplanMode::Off)
}

/// What the planner chose and predicted for a planned deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub layout: Layout,
    /// How the planner describes the layout, e.g. `1P (TP1) + 2D (TP1)`.
    pub describe: String,
    /// The GPUs it planned over, `type:count` joined by commas.
    pub gpus: String,
    pub isl: u32,
    pub osl: u32,
    pub planned_at: u64,
    pub predicted: Predicted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Predicted {
    pub request_rate_per_s: f64,
    pub output_tokens_per_s_per_gpu: f64,
    pub output_tokens_per_s_per_user: f64,
    pub ttft_ms_mean: f64,
    pub ttft_ms_p90: f64,
    pub tpot_ms_mean: f64,
    pub tpot_ms_p90: f64,
    /// Share of simulated requests within both targets.
    pub slo_attainment: f64,
}

impl Plan {
    /// The plan as the replicated state records it (integers), in the API's units.
    pub fn of(p: &pd_raft::PlanRecord) -> Plan {
        let ms = |us: u64| us as f64 / 1e3;
        let per = |milli: u64| milli as f64 / 1e3;
        Plan {
            layout: p.layout,
            describe: p.describe.clone(),
            gpus: p.gpus.clone(),
            isl: p.isl,
            osl: p.osl,
            planned_at: p.planned_at,
            predicted: Predicted {
                request_rate_per_s: per(p.request_rate_milli),
                output_tokens_per_s_per_gpu: per(p.output_tokens_per_s_per_gpu_milli),
                output_tokens_per_s_per_user: per(p.output_tokens_per_s_per_user_milli),
                ttft_ms_mean: ms(p.ttft_mean_us),
                ttft_ms_p90: ms(p.ttft_p90_us),
                tpot_ms_mean: ms(p.tpot_mean_us),
                tpot_ms_p90: ms(p.tpot_p90_us),
                slo_attainment: p.slo_attainment_ppm as f64 / 1e6,
            },
        }
    }
}

/// What the agents' ingresses measured for a deployment, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub requests: u64,
    pub ttft_ms_mean: Option<f64>,
    pub ttft_ms_p90: Option<f64>,
    pub tpot_ms_mean: Option<f64>,
    pub tpot_ms_p90: Option<f64>,
}

/// The body of `POST /v1/deployments` and of `PUT /v1/deployments/{name}/layout` (there only
/// the engine counts).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployRequest {
    pub name: String,
    /// The engine driver (`builtin` when empty).
    pub engine: String,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tp: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub colocated: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpot_ms: Option<u32>,
    /// "planned": the planner chooses the engine counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isl: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub osl: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    /// The checkpoint fingerprint the model folder must have on a host (default: the one most
    /// hosts that have the folder agree on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
    /// Extra arguments for every engine of the deployment (vllm).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub engine_args: Vec<String>,
    /// vllm: how the KV goes from prefill to decode engine, `agent` (pdagent's connector, over
    /// the agents' QUIC with mutual TLS) or `nixl` (vLLM's NixlConnector). Default: `agent`
    /// where the agent taking the deployment stages vLLM's KV in host memory
    /// (`drivers.vllm.kv_buffer_device = "cpu"`), `nixl` on GPU hosts. Kept with the engine
    /// arguments as `--kv-transport=...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transport: Option<String>,
    /// Re-planning: mode and bounds (`max_gpus` above also bounds it). Default: `advise` for a
    /// planned layout, `off` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoplan: Option<AutoplanRequest>,
}

/// The answer to `POST /v1/deployments` (201).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub created: String,
    /// Where the model folder was found (a deployment that names a folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_hosts: Option<ModelHosts>,
    /// The nodes without a matching copy, with why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_missing: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_args: Option<Vec<String>>,
}

/// `GET /v1/deployments/{name}/routable`: whether every agent's router would route to all
/// of the deployment's engines now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routable {
    pub deployment: String,
    pub engines_wanted: u32,
    /// Each agent with an API that answered sees every engine, and every agent answered.
    pub every_agent: bool,
    pub nodes: Vec<RoutableNode>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutableNode {
    pub node: String,
    /// Engines its router would choose (`None`: it did not answer).
    pub engines: Option<u32>,
    /// Whether it serves the OpenAI API.
    pub api: Option<bool>,
}

/// `GET /v1/autoplan` (answered by the coordinator): the latest re-planning decision of each
/// planned deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Autoplan {
    pub deployments: Vec<AutoplanReport>,
}

/// One deployment's latest window and what the re-planner made of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoplanReport {
    pub deployment: String,
    /// `advise`: decisions are recorded, never carried out.
    pub mode: String,
    /// The window's number in this coordinator's term (0: none decided yet).
    pub window: u64,
    pub seconds: f64,
    pub requests: u64,
    pub rate_per_s: f64,
    /// Finished requests judged against the targets, and those within both.
    pub judged: u64,
    pub within_slo: u64,
    pub engines_reporting: u32,
    pub engines_total: u32,
    /// The layout in force, e.g. `1P2D`.
    pub layout: String,
    /// The best move (`keep`, `flip-decode-to-prefill`, ...) and the layout it leads to.
    pub best: String,
    pub best_layout: String,
    /// Whether the rules allow the best move now.
    pub allowed: bool,
    pub reason: String,
    pub candidates: Vec<AutoplanCandidate>,
    pub notes: Vec<String>,
    /// When it was decided (unix seconds).
    pub decided_unix: i64,
    /// The move made with this decision (mode `on`), e.g. `flip node-3 to prefill`.
    #[serde(default)]
    pub moved: Option<String>,
    /// The step-time model the simulator used, per GPU kind: fitted from the engines' own
    /// step counters once enough steps were seen, else the roofline.
    #[serde(default)]
    pub calibration: Vec<AutoplanCalibration>,
}

/// The step-time model fitted online from one GPU kind's engines of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoplanCalibration {
    /// The GPUs' name as NVML gives it.
    pub gpu: String,
    /// Steps measured so far (prefill-only and decode-only steps).
    pub prefill_steps: f64,
    pub decode_steps: f64,
    /// Whether the simulator uses the fit (else the roofline stands, `why` says why).
    pub trusted: bool,
    pub why: Option<String>,
    /// The fitted coefficients (seconds): prefill = base + per_token·n + per_square_token·n²;
    /// decode = base + per_seq·b + per_context_token·(b·context).
    pub coefficients: Option<BTreeMap<String, f64>>,
}

/// `PUT /v1/deployments/{name}/autoplan`, and the re-planning part of a deploy request: the
/// mode and the bounds the coordinator moves within (absent: the default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoplanRequest {
    /// `on`, `advise` or `off`.
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_gpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    /// Prefill engines per decode engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pd_ratio_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pd_ratio_max: Option<f64>,
    /// The predicted goodput gain a move must exceed (0.10: 10%).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Windows after a move during which no other move is made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_windows: Option<u32>,
    /// How far a forecast of SLO attainment may miss what was measured and still count as
    /// right (0.15: 15 points).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast_tolerance: Option<f64>,
}

impl AutoplanRequest {
    /// The replicated setting, or the field that is wrong.
    pub fn setting(&self) -> Result<pd_raft::AutoplanSetting, String> {
        let mode = pd_raft::AutoplanMode::parse(&self.mode)
            .ok_or_else(|| format!("mode {:?}: one of on, advise, off", self.mode))?;
        let milli = |field: &str, v: Option<f64>, max: f64| -> Result<Option<u32>, String> {
            match v {
                None => Ok(None),
                Some(v) if !v.is_finite() || v < 0.0 => {
                    Err(format!("{field}: {v} is negative or not a number"))
                }
                Some(v) if v > max => Err(format!("{field}: {v} is above {max}")),
                Some(v) => Ok(Some((v * 1000.0).round() as u32)),
            }
        };
        let ratio_min = milli("pd_ratio_min", self.pd_ratio_min, 1000.0)?;
        let ratio_max = milli("pd_ratio_max", self.pd_ratio_max, 1000.0)?;
        for (field, v) in [("pd_ratio_min", ratio_min), ("pd_ratio_max", ratio_max)] {
            if v == Some(0) {
                return Err(format!("{field}: at least 0.001"));
            }
        }
        if self.min_gpus == Some(0) {
            return Err("min_gpus: at least 1".into());
        }
        let s = pd_raft::AutoplanSetting {
            mode,
            min_gpus: self.min_gpus,
            max_gpus: self.max_gpus,
            pd_ratio_min_milli: ratio_min,
            pd_ratio_max_milli: ratio_max,
            gain_threshold_milli: milli("threshold", self.threshold, 10.0)?,
            cooldown_windows: self.cooldown_windows,
            forecast_tolerance_milli: milli("forecast_tolerance", self.forecast_tolerance, 1.0)?,
        };
        s.validate()?;
        Ok(s)
    }
}

/// `GET /v1/events[?deployment=NAME]`: the re-planner's recorded decisions, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Events {
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub deployment: String,
    #[serde(flatten)]
    pub decision: pd_raft::AutoplanEvent,
}

/// A candidate layout and its predicted SLO attainment at the window's load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoplanCandidate {
    pub action: String,
    pub layout: String,
    pub attainment: Option<f64>,
    pub goodput_rps: Option<f64>,
    /// Why it could not be scored.
    pub error: Option<String>,
}

/// What a write changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// False when the cluster already was as asked.
    pub changed: bool,
}

/// The body of `PUT /v1/nodes/{node}/labels/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelRequest {
    pub value: String,
}

/// The body of `POST /v1/nodes/{node}/flip`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlipRequest {
    /// "prefill" or "decode".
    pub role: String,
}

/// The answer to a flip: the engines now on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flipped {
    pub changed: bool,
    pub engines: Vec<FlippedEngine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlippedEngine {
    pub engine: String,
    pub role: String,
    pub gpus: Vec<u32>,
    pub generation: u64,
}

/// The body of `POST /v1/apikeys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyRequest {
    pub name: String,
}

/// The answer to `POST /v1/apikeys`: the only time the key itself is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyCreated {
    pub id: String,
    pub name: String,
    pub key: String,
    pub created_unix: i64,
}

/// `GET /v1/apikeys`: the keys without their secrets or hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeys {
    pub api_keys: Vec<ApiKeyInfo>,
    /// Whether the OpenAI API asks for a key.
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    pub created_unix: i64,
}

/// The body of `PUT /v1/apikeys/required`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequiredRequest {
    pub required: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status answer keeps the node's own fields at its top level beside `telemetry`, as
    /// `pdctl status -o json` has always shown them.
    #[test]
    fn node_views_flatten_their_status() {
        let v = NodeView {
            status: NodeStatus {
                name: "node-1".into(),
                address: "127.0.0.1:7400".into(),
                raft_role: "voter".into(),
                health: pd_raft::NodeHealth::Ready,
                admin_state: pd_raft::AdminState::Active,
                labels: BTreeMap::new(),
                gpus: Vec::new(),
            },
            telemetry: None,
        };
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["name"], "node-1");
        assert_eq!(json["health"], "ready");
        assert!(json["telemetry"].is_null());
        let back: NodeView = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
    }

    /// An unknown field in a request body is refused, not ignored.
    #[test]
    fn request_bodies_refuse_unknown_fields() {
        let e = serde_json::from_str::<DeployRequest>(r#"{"name": "d", "replicas": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("replicas"), "{e}");
        let d: DeployRequest =
            serde_json::from_str(r#"{"name": "d", "prefill": 1, "decode": 2}"#).unwrap();
        assert_eq!((d.prefill, d.decode, d.colocated), (Some(1), Some(2), None));
    }

    /// The error body names the coordinator only on a redirect.
    #[test]
    fn errors_name_the_coordinator_only_when_redirecting() {
        let plain = ErrorBody {
            error: ErrorDetail {
                message: "no".into(),
                code: "conflict".into(),
                coordinator: None,
            },
        };
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json["error"].get("coordinator").is_none(), "{json}");
        let back: ErrorBody = serde_json::from_str(
            r#"{"error": {"message": "m", "code": "not_coordinator", "coordinator": "node-2"}}"#,
        )
        .unwrap();
        assert_eq!(back.error.coordinator.as_deref(), Some("node-2"));
    }
}
