//! The admin API that `pdctl` speaks: JSON over HTTP/1.1, served on HTTPS with mutual TLS
//! (only the admin certificate from `pdctl cluster init` is accepted) and on a local unix
//! socket that only the agent's user can open. Any agent answers reads from its replicated
//! state. Writes are applied only by the coordinator, which checks the caller's credential
//! itself: another agent answers `421 not_coordinator` naming it (`error.coordinator`), and
//! `pdctl` sends the write there. A local socket on a host that is not the coordinator may
//! only cordon or drain that host (`authority`).
//!
//! Routes:
//! - `GET /v1/status` — the cluster as this agent sees it (`voters_short` says why it has
//!   fewer Raft voters than it wants, when it has).
//! - `PUT /v1/nodes/{node}/labels/{key}` with `{"value": "..."}`; `DELETE` removes the label.
//! - `POST /v1/nodes/{node}/cordon`, `/uncordon`, `/drain`, `/flip` (`{"role": "prefill" |
//!   "decode"}`: the node's engines change role, see `Command::FlipNode`).
//! - `DELETE /v1/nodes/{node}` — remove the node from the cluster.
//! - `GET /v1/engines` — every assigned engine with its state as its agent reports it.
//! - `GET /v1/deployments` (each with its engines, the planner's prediction for a planned
//!   layout, and the TTFT and TPOT the agents measured); `POST /v1/deployments` with
//!   `{"name", "engine", "model", "tp", "prefill", "decode" | "colocated", "ttft_ms",
//!   "tpot_ms"}`, or `"layout": "planned"` with the targets and optional `"isl"`, `"osl"`,
//!   `"max_gpus"` (the planner sizes it on the free GPUs; see `planned`), and optionally
//!   `"model_fingerprint"`. A model folder is looked for on every node (`models`): engines go
//!   only where a copy matches (409 `model_not_found` when none does). Refused with 409
//!   `does_not_fit` and what is missing when the engines cannot all be placed now;
//!   `DELETE /v1/deployments/{name}`; `PUT /v1/deployments/{name}/layout` with `{"prefill",
//!   "decode"}` or `{"colocated"}`; `GET /v1/deployments/{name}/routable`: whether every
//!   agent's router would route to all of its engines now (`pdctl deploy --wait`).
//! - `GET /v1/apikeys` (ids, names, creation times); `POST /v1/apikeys` with `{"name"}`
//!   answers the new key once (only its SHA-256 is stored) and from then on the OpenAI API
//!   asks for a key; `DELETE /v1/apikeys/{id}`; `PUT /v1/apikeys/required` with
//!   `{"required": bool}` (revoking keys never opens the API, only this does).
//!
//! Errors are `{"error": {"message": ..., "code": ...}}` with a 4xx or 5xx status.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use pd_raft::{AdminState, Applied, ApplyError, Command, Layout};
use pd_transport::{Endpoint, PeerIdentity};
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::control::{ControlPlane, SubmitError};
use crate::peers::Peers;
use crate::wire::{AgentRequest, AgentResponse};

/// Bound on a TLS handshake from an admin client.
const ADMIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AdminCtx {
    pub control: Arc<ControlPlane>,
    pub coordinator: Arc<crate::coordinator::Coordinator>,
    pub peers: Arc<Peers>,
    /// This agent's serving metrics (the other agents' are asked for).
    pub metrics: Arc<crate::serving::metrics::Metrics>,
    /// `node.models_dir`: where this host's relative model names are.
    pub models_dir: std::path::PathBuf,
    /// This agent's serving path (what its router would choose).
    pub serving: Arc<crate::serving::Serving>,
    /// This agent serves the OpenAI API.
    pub api: bool,
    /// Serving the local unix socket (rather than HTTPS with the admin certificate): on a
    /// host that is not the coordinator it may write only what this node may say about
    /// itself (`authority`).
    pub local: bool,
}

/// Workload a planned layout is sized for when the deployment names none.
pub const PLANNED_ISL_DEFAULT: u32 = 1024;
pub const PLANNED_OSL_DEFAULT: u32 = 256;
/// Bound on asking the coordinator for every node's engines.
const ENGINES_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on asking one agent for its measured latencies.
const LATENCIES_TIMEOUT: Duration = Duration::from_secs(2);

/// An API error: status, code and message.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"message": self.2, "code": self.1}})),
        )
            .into_response()
    }
}

/// A write this agent may not apply: `421 not_coordinator`, naming the coordinator whose
/// admin API takes it (`error.coordinator`; `pdctl` sends the write there).
struct NotCoordinator {
    coordinator: String,
    message: String,
}

impl IntoResponse for NotCoordinator {
    fn into_response(self) -> Response {
        (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({"error": {
                "message": self.message,
                "code": "not_coordinator",
                "coordinator": self.coordinator,
            }})),
        )
            .into_response()
    }
}

/// A refused admin write.
enum WriteError {
    Api(ApiError),
    Elsewhere(NotCoordinator),
}

impl From<ApiError> for WriteError {
    fn from(e: ApiError) -> Self {
        WriteError::Api(e)
    }
}

impl IntoResponse for WriteError {
    fn into_response(self) -> Response {
        match self {
            WriteError::Api(e) => e.into_response(),
            WriteError::Elsewhere(e) => e.into_response(),
        }
    }
}

fn apply_error(e: ApplyError) -> ApiError {
    match e {
        ApplyError::UnknownNode(_) => {
            ApiError(StatusCode::NOT_FOUND, "unknown_node", e.to_string())
        }
        ApplyError::BadLabel { .. } | ApplyError::TooManyLabels { .. } => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_label", e.to_string())
        }
        ApplyError::NameTaken { .. } | ApplyError::IdTaken { .. } | ApplyError::Refused(_) => {
            ApiError(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        ApplyError::UnknownDeployment(_) => {
            ApiError(StatusCode::NOT_FOUND, "unknown_deployment", e.to_string())
        }
        ApplyError::DeploymentExists(_) => {
            ApiError(StatusCode::CONFLICT, "deployment_exists", e.to_string())
        }
        ApplyError::BadDeployment(_) => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_deployment", e.to_string())
        }
        ApplyError::BadApiKey(_) => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_api_key", e.to_string())
        }
        ApplyError::UnknownApiKey(_) => {
            ApiError(StatusCode::NOT_FOUND, "unknown_api_key", e.to_string())
        }
    }
}

/// The body of `POST /v1/apikeys`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ApiKeyBody {
    name: String,
}

/// Makes a key, stores only its hash, and answers the key itself: the only time it is shown.
async fn create_api_key(
    State(ctx): Ctx,
    Json(body): Json<ApiKeyBody>,
) -> Result<Json<serde_json::Value>, WriteError> {
    let (id, key, hash) = crate::serving::apikey::generate()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no_randomness", e))?;
    let created_unix = crate::util::now_unix();
    ctx.write(Command::CreateApiKey {
        id: id.clone(),
        name: body.name.clone(),
        sha256_hex: hash,
        created_unix,
    })
    .await?;
    Ok(Json(
        json!({"id": id, "name": body.name, "key": key, "created_unix": created_unix}),
    ))
}

/// The keys, without their secrets or hashes.
async fn api_keys(State(ctx): Ctx) -> Json<serde_json::Value> {
    let s = ctx.control.state_snapshot();
    let keys: Vec<serde_json::Value> = s
        .api_keys
        .values()
        .map(|k| json!({"id": k.id, "name": k.name, "created_unix": k.created_unix}))
        .collect();
    Json(json!({ "api_keys": keys, "required": s.api_keys_required }))
}

/// The body of `PUT /v1/apikeys/required`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequiredBody {
    required: bool,
}

async fn require_api_keys(
    State(ctx): Ctx,
    Json(body): Json<RequiredBody>,
) -> Result<Json<serde_json::Value>, WriteError> {
    ctx.write(Command::RequireApiKeys {
        required: body.required,
    })
    .await
    .map(done)
}

async fn revoke_api_key(
    State(ctx): Ctx,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, WriteError> {
    ctx.write(Command::RevokeApiKey { id }).await.map(done)
}

/// The body of `POST /v1/deployments` and `PUT /v1/deployments/{name}/layout`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct DeployBody {
    name: String,
    engine: String,
    model: String,
    tp: Option<u32>,
    prefill: Option<u32>,
    decode: Option<u32>,
    colocated: Option<u32>,
    ttft_ms: Option<u32>,
    tpot_ms: Option<u32>,
    /// "planned": the planner chooses the engine counts.
    layout: Option<String>,
    isl: Option<u32>,
    osl: Option<u32>,
    max_gpus: Option<u32>,
    /// The checkpoint fingerprint the model folder must have on a host (default: the one most
    /// hosts that have the folder agree on).
    model_fingerprint: Option<String>,
    /// Extra arguments for every engine of the deployment (vllm).
    engine_args: Vec<String>,
}

impl DeployBody {
    fn layout(&self) -> Result<Layout, ApiError> {
        let bad = |m: &str| ApiError(StatusCode::BAD_REQUEST, "invalid_layout", m.to_string());
        match (self.prefill, self.decode, self.colocated) {
            (Some(prefill), Some(decode), None) => Ok(Layout::Disaggregated { prefill, decode }),
            (None, None, Some(engines)) => Ok(Layout::Colocated { engines }),
            _ => Err(bad(
                "give either prefill and decode (engine counts), or colocated (an engine count)",
            )),
        }
    }
}

/// Whether a deployment with this layout would fit the cluster now (with the state as it is).
fn check_fit(ctx: &AdminCtx, cmd: &Command, name: &str) -> Result<(), ApiError> {
    let mut state = ctx.control.state_snapshot();
    state.apply(u64::MAX, cmd).map_err(apply_error)?;
    // Scaling re-places this deployment's engines; the others keep their GPUs.
    pd_raft::placement::place(&state, name)
        .map_err(|e| ApiError(StatusCode::CONFLICT, "does_not_fit", e.to_string()))?;
    Ok(())
}

async fn engines(State(ctx): Ctx) -> Json<serde_json::Value> {
    let engines = ctx
        .coordinator
        .cluster_engines_within(ENGINES_TIMEOUT)
        .await;
    Json(json!({ "engines": engines }))
}

/// Asks every other agent not recorded down, at once; each answer (or `None`: no answer
/// within `timeout`) by node.
async fn ask_other_agents(
    ctx: &AdminCtx,
    s: &pd_raft::ClusterState,
    req: AgentRequest,
    timeout: Duration,
) -> Vec<(String, Option<AgentResponse>)> {
    let me = ctx.control.node_name();
    let req = Arc::new(req);
    let mut asks = tokio::task::JoinSet::new();
    for n in s.nodes.values() {
        if n.name == me || n.health == pd_raft::NodeHealth::Down {
            continue;
        }
        let (name, address, peers) = (n.name.clone(), n.address.clone(), ctx.peers.clone());
        let req = req.clone();
        asks.spawn(async move {
            let got = match address.parse::<SocketAddr>() {
                Ok(addr) => peers.call(&name, addr, &req, timeout).await.ok(),
                Err(_) => None,
            };
            (name, got)
        });
    }
    asks.join_all().await
}

/// Whether every agent's router would route to all of a deployment's engines now (what
/// `pdctl deploy --wait` waits for after the engines are ready): per node (not down), the
/// engines its router would choose and whether it serves the OpenAI API; `every_agent` is
/// true when each agent with an API that answered sees every engine, and every agent answered.
async fn routable(
    State(ctx): Ctx,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let s = ctx.control.state_snapshot();
    let Some(d) = s.deployments.get(&name) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_deployment",
            format!("unknown deployment {name:?}"),
        ));
    };
    let wanted = d.layout.engine_count();
    let req = AgentRequest::Routable {
        deployment: name.clone(),
    };
    let mut answers = ask_other_agents(&ctx, &s, req, ROUTABLE_TIMEOUT).await;
    answers.push((
        ctx.control.node_name().to_string(),
        Some(AgentResponse::Routable {
            engines: ctx.serving.routable(&name),
            api: ctx.api,
        }),
    ));
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut every = true;
    let nodes: Vec<serde_json::Value> = answers
        .into_iter()
        .map(|(node, got)| match got {
            Some(AgentResponse::Routable { engines, api }) => {
                every &= !api || engines >= wanted;
                json!({"node": node, "engines": engines, "api": api})
            }
            _ => {
                every = false;
                json!({"node": node, "engines": null, "api": null})
            }
        })
        .collect();
    Ok(Json(
        json!({"deployment": name, "engines_wanted": wanted, "every_agent": every, "nodes": nodes}),
    ))
}

/// Bound on asking one agent what it would route to.
const ROUTABLE_TIMEOUT: Duration = Duration::from_secs(2);

/// TTFT and TPOT per model over every agent that answers within `LATENCIES_TIMEOUT`.
async fn cluster_latencies(
    ctx: &AdminCtx,
    s: &pd_raft::ClusterState,
) -> (
    BTreeMap<String, crate::wire::latency::ModelLatency>,
    Vec<String>,
) {
    let me = ctx.control.node_name().to_string();
    let mut answers: Vec<(String, Option<Vec<crate::wire::latency::ModelLatency>>)> =
        ask_other_agents(ctx, s, AgentRequest::Latencies, LATENCIES_TIMEOUT)
            .await
            .into_iter()
            .map(|(node, got)| match got {
                Some(AgentResponse::Latencies(l)) => (node, Some(l)),
                _ => (node, None),
            })
            .collect();
    answers.push((me, Some(ctx.metrics.latencies())));
    let mut by_model: BTreeMap<String, crate::wire::latency::ModelLatency> = BTreeMap::new();
    let mut silent = Vec::new();
    for (node, got) in answers {
        let Some(list) = got else {
            silent.push(node);
            continue;
        };
        for l in list {
            match by_model.get_mut(&l.model) {
                Some(sum) => {
                    sum.ttft.merge(&l.ttft);
                    sum.tpot.merge(&l.tpot);
                }
                None => {
                    by_model.insert(l.model.clone(), l);
                }
            }
        }
    }
    (by_model, silent)
}

/// What the agents measured for one model, in milliseconds.
fn measured_json(l: Option<&crate::wire::latency::ModelLatency>) -> serde_json::Value {
    let Some(l) = l else {
        return json!({"requests": 0});
    };
    let ms = |v: Option<f64>| v.map(|s| s * 1e3);
    json!({
        "requests": l.ttft.count,
        "ttft_ms_mean": ms(l.ttft.mean()),
        "ttft_ms_p90": ms(l.ttft.quantile(0.9)),
        "tpot_ms_mean": ms(l.tpot.mean()),
        "tpot_ms_p90": ms(l.tpot.quantile(0.9)),
    })
}

async fn deployments(State(ctx): Ctx) -> Json<serde_json::Value> {
    let s = ctx.control.state_snapshot();
    let (latencies, silent) = cluster_latencies(&ctx, &s).await;
    let list: Vec<serde_json::Value> = s
        .deployments
        .values()
        .map(|d| {
            let engines: Vec<&pd_raft::Assignment> = s
                .assignments
                .values()
                .filter(|a| a.deployment == d.name)
                .collect();
            let mut v = serde_json::to_value(d).unwrap_or_default();
            v["engines"] = serde_json::to_value(&engines).unwrap_or_default();
            v["placed"] = json!(engines.len() as u32 == d.layout.engine_count());
            v["plan"] = s
                .plans
                .get(&d.name)
                .map(crate::planned::plan_json)
                .unwrap_or(serde_json::Value::Null);
            v["measured"] = measured_json(latencies.get(&d.name));
            v["model_hosts"] = s
                .model_hosts
                .get(&d.name)
                .map(|h| json!(h))
                .unwrap_or(serde_json::Value::Null);
            v["engine_args"] = json!(s.engine_args.get(&d.name).cloned().unwrap_or_default());
            v
        })
        .collect();
    Json(json!({ "deployments": list, "measured_without": silent }))
}

async fn create_deployment(
    State(ctx): Ctx,
    Json(body): Json<DeployBody>,
) -> Result<(StatusCode, Json<serde_json::Value>), WriteError> {
    // Checked here first, so an agent that must send the write on does not look at every
    // host's model folder and run the planner for nothing.
    ctx.redirect_early()?;
    let engine = if body.engine.is_empty() {
        "builtin".to_string()
    } else {
        body.engine.clone()
    };
    let tp = body.tp.unwrap_or(1);
    let bad_args = |m: String| ApiError(StatusCode::BAD_REQUEST, "invalid_engine_args", m);
    match engine.as_str() {
        crate::driver::vllm::NAME => {
            crate::driver::vllm::check_engine_args(&body.engine_args).map_err(bad_args)?;
            if crate::models::is_preset(&body.model) {
                return Err(WriteError::from(ApiError(
                    StatusCode::BAD_REQUEST,
                    "invalid_model",
                    format!(
                        "vllm serves a model folder, not the builtin preset {:?}: write one with `pdagent engine export --model {} --out DIR` on each host",
                        body.model, body.model
                    ),
                )));
            }
        }
        _ if !body.engine_args.is_empty() => {
            return Err(WriteError::from(bad_args(format!(
                "the {engine} engine takes no engine arguments"
            ))));
        }
        _ => {}
    }
    let mut answer = json!({"created": body.name});
    // A model folder must be on the hosts: placement uses only those with a matching copy.
    let model_hosts = if crate::models::is_preset(&body.model) || body.model.is_empty() {
        None
    } else {
        let (hosts, missing) = model_hosts(&ctx, &body).await?;
        answer["model_hosts"] = json!(hosts);
        answer["model_missing"] = json!(missing);
        Some(hosts)
    };
    let (layout, plan) = match body.layout.as_deref() {
        None => (body.layout()?, None),
        Some("planned") => {
            let plan = plan_layout(&ctx, &body, tp, model_hosts.as_ref()).await?;
            answer["plan"] = crate::planned::plan_json(&plan);
            (plan.layout, Some(plan))
        }
        Some(other) => {
            return Err(WriteError::from(ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_layout",
                format!(
                    "layout {other:?}: \"planned\" is the only named layout; otherwise give engine counts"
                ),
            )));
        }
    };
    let cmd = if plan.is_none() && model_hosts.is_none() {
        Command::CreateDeployment {
            name: body.name.clone(),
            engine,
            model: body.model.clone(),
            tp,
            ttft_ms: body.ttft_ms,
            tpot_ms: body.tpot_ms,
            layout,
        }
    } else {
        Command::CreateCheckedDeployment {
            name: body.name.clone(),
            engine,
            model: body.model.clone(),
            tp,
            ttft_ms: body.ttft_ms,
            tpot_ms: body.tpot_ms,
            layout,
            plan,
            model_hosts,
        }
    };
    let cmd = if body.engine_args.is_empty() {
        cmd
    } else {
        answer["engine_args"] = json!(body.engine_args);
        Command::CreateDeploymentWithArgs {
            create: Box::new(cmd),
            engine_args: body.engine_args.clone(),
        }
    };
    check_fit(&ctx, &cmd, &body.name)?;
    ctx.write(cmd).await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

/// Bound on one agent's look at a model folder.
const MODEL_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks every node that is not down whether it has the model folder and its checkpoint
/// fingerprint. The hosts are those whose copy has the expected fingerprint (given, or the one
/// most copies agree on); the others are returned with why not. None: refused, saying why.
async fn model_hosts(
    ctx: &AdminCtx,
    body: &DeployBody,
) -> Result<(pd_raft::ModelHosts, BTreeMap<String, String>), ApiError> {
    let s = ctx.control.state_snapshot();
    let me = ctx.control.node_name().to_string();
    let mut asks = tokio::task::JoinSet::new();
    for n in s.nodes.values() {
        if n.health == pd_raft::NodeHealth::Down {
            continue;
        }
        let (name, address, model) = (n.name.clone(), n.address.clone(), body.model.clone());
        if name == me {
            let dir = ctx.models_dir.clone();
            asks.spawn(async move {
                let c = tokio::task::spawn_blocking(move || crate::models::check(&dir, &model))
                    .await
                    .map_err(|e| e.to_string());
                (name, c)
            });
            continue;
        }
        let peers = ctx.peers.clone();
        asks.spawn(async move {
            let req = AgentRequest::CheckModel { model };
            let got = match address.parse::<SocketAddr>() {
                Ok(addr) => match peers.call(&name, addr, &req, MODEL_CHECK_TIMEOUT).await {
                    Ok(AgentResponse::ModelCheck(c)) => Ok(c),
                    Ok(_) => Err("an unexpected answer".to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            (name, got)
        });
    }
    let answers = asks.join_all().await;
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    let mut missing: BTreeMap<String, String> = BTreeMap::new();
    for (node, got) in answers {
        match got {
            Ok(c) => match c.fingerprint {
                Some(f) => {
                    found.insert(node, f);
                }
                None => {
                    missing.insert(node, c.why.unwrap_or_default());
                }
            },
            Err(e) => {
                missing.insert(node, format!("did not answer: {e}"));
            }
        }
    }
    let conflict = |m: String| ApiError(StatusCode::CONFLICT, "model_not_found", m);
    let expected = match &body.model_fingerprint {
        Some(f) => f.to_ascii_lowercase(),
        None => {
            let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
            for f in found.values() {
                *votes.entry(f.as_str()).or_default() += 1;
            }
            let most = votes.values().copied().max().unwrap_or(0);
            let top: Vec<&str> = votes
                .iter()
                .filter(|(_, n)| **n == most)
                .map(|(f, _)| *f)
                .collect();
            match top.as_slice() {
                [] => String::new(),
                [one] => one.to_string(),
                _ => {
                    let list: Vec<String> =
                        found.iter().map(|(n, f)| format!("{n}: {f}")).collect();
                    return Err(conflict(format!(
                        "model {}: the hosts' copies differ as many against as many ({}); give the one to use with --model-fingerprint",
                        body.model,
                        list.join(", ")
                    )));
                }
            }
        }
    };
    for (node, f) in &found {
        if *f != expected {
            missing.insert(
                node.clone(),
                format!("its copy has fingerprint {f}, not {expected}"),
            );
        }
    }
    found.retain(|_, f| *f == expected);
    if found.is_empty() {
        let list: Vec<String> = missing.iter().map(|(n, w)| format!("{n}: {w}")).collect();
        return Err(conflict(format!(
            "model {}: no node has it{}",
            body.model,
            if list.is_empty() {
                String::new()
            } else {
                format!(" ({})", list.join("; "))
            }
        )));
    }
    Ok((
        pd_raft::ModelHosts {
            fingerprint: expected,
            nodes: found.into_keys().collect(),
        },
        missing,
    ))
}

/// Runs the planner for a `"layout": "planned"` deployment (on a blocking thread: a plan
/// simulates for up to about a second).
async fn plan_layout(
    ctx: &AdminCtx,
    body: &DeployBody,
    tp: u32,
    hosts: Option<&pd_raft::ModelHosts>,
) -> Result<pd_raft::PlanRecord, ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, "invalid_layout", m);
    if body.prefill.is_some() || body.decode.is_some() || body.colocated.is_some() {
        return Err(bad(
            "a planned layout takes no engine counts (the planner chooses them)".into(),
        ));
    }
    let (Some(ttft_ms), Some(tpot_ms)) = (body.ttft_ms, body.tpot_ms) else {
        return Err(bad(
            "a planned layout needs ttft_ms and tpot_ms (the targets it is sized for)".into(),
        ));
    };
    if ttft_ms == 0 || tpot_ms == 0 || body.max_gpus == Some(0) {
        return Err(bad(
            "ttft_ms, tpot_ms and max_gpus must be at least 1".into()
        ));
    }
    let want = crate::planned::PlannedDeploy {
        model: body.model.clone(),
        tp,
        ttft_ms,
        tpot_ms,
        isl: body.isl.unwrap_or(PLANNED_ISL_DEFAULT),
        osl: body.osl.unwrap_or(PLANNED_OSL_DEFAULT),
        max_gpus: body.max_gpus,
        hosts: hosts.map(|h| h.nodes.clone()),
    };
    let state = ctx.control.state_snapshot();
    let planned = tokio::task::spawn_blocking(move || crate::planned::plan(&state, &want))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("planner: {e}"),
            )
        })?;
    planned.map_err(|e| match e {
        crate::planned::PlanRefusal::Input(m) => bad(m),
        crate::planned::PlanRefusal::NoFit(m) => ApiError(StatusCode::CONFLICT, "does_not_fit", m),
    })
}

async fn delete_deployment(
    State(ctx): Ctx,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, WriteError> {
    ctx.write(Command::DeleteDeployment { name })
        .await
        .map(done)
}

async fn scale_deployment(
    State(ctx): Ctx,
    UrlPath(name): UrlPath<String>,
    Json(body): Json<DeployBody>,
) -> Result<Json<serde_json::Value>, WriteError> {
    let cmd = Command::ScaleDeployment {
        name: name.clone(),
        layout: body.layout()?,
    };
    check_fit(&ctx, &cmd, &name)?;
    ctx.write(cmd).await.map(done)
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::NoCoordinator => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_coordinator",
            e.to_string(),
        ),
        e => ApiError(
            StatusCode::BAD_GATEWAY,
            "coordinator_unreachable",
            e.to_string(),
        ),
    }
}

impl AdminCtx {
    /// A write that only the admin may make, sent to an agent that is not the coordinator:
    /// refused at once, naming the coordinator (as `write` would, after the checks).
    fn redirect_early(&self) -> Result<(), WriteError> {
        let me = self.control.node_name();
        match self.control.coordinator() {
            Some(c) if c.name != me => Err(WriteError::Elsewhere(self.elsewhere(c.name))),
            _ => Ok(()),
        }
    }

    fn elsewhere(&self, coordinator: String) -> NotCoordinator {
        let me = self.control.node_name();
        let message = if self.local {
            format!(
                "{me} is not the coordinator: its local socket may only cordon or drain {me}; \
                 other changes need the admin credential at the coordinator's admin API ({coordinator})"
            )
        } else {
            format!(
                "{me} is not the coordinator: admin changes are applied by the coordinator, \
                 {coordinator}; send them to its admin API"
            )
        };
        NotCoordinator {
            coordinator,
            message,
        }
    }

    /// Applies `cmd` when this agent is the coordinator (the caller's credential was checked
    /// here: the admin certificate, or this host's local socket). Elsewhere it is not
    /// forwarded on the caller's word: the answer names the coordinator, except for what the
    /// local socket may say about this node itself, which goes to the coordinator as this
    /// node's own proposal (`authority`).
    async fn write(&self, cmd: Command) -> Result<Applied, WriteError> {
        let coordinator = match self.control.propose_or_redirect(cmd.clone()).await {
            Ok(Ok(Ok(a))) => return Ok(a),
            Ok(Ok(Err(e))) => return Err(apply_error(e).into()),
            Ok(Err(coordinator)) => coordinator,
            Err(e) => return Err(submit_error(e).into()),
        };
        let me = self.control.node_name();
        if self.local && crate::authority::node_may_propose(me, &cmd).is_ok() {
            return match self.control.submit(cmd).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(apply_error(e).into()),
                Err(e) => Err(submit_error(e).into()),
            };
        }
        Err(WriteError::Elsewhere(self.elsewhere(coordinator)))
    }
}

type Ctx = State<Arc<AdminCtx>>;

/// The status, with each node's latest GPU telemetry (`telemetry`: `age_ms` and `gpus`, or
/// null when the coordinator has not heard from the node).
async fn status(State(ctx): Ctx) -> Json<serde_json::Value> {
    let report = ctx.control.status();
    let telemetry = ctx.coordinator.cluster_telemetry().await;
    let mut v = serde_json::to_value(&report).unwrap_or_else(|_| json!({}));
    v["voters_short"] = json!(ctx.coordinator.voters_short());
    if let Some(nodes) = v["nodes"].as_array_mut() {
        for n in nodes {
            let t = telemetry
                .iter()
                .find(|t| n["name"] == t.node.as_str())
                .map(|t| json!({"age_ms": t.age_ms, "gpus": t.gpus}));
            n["telemetry"] = t.unwrap_or(serde_json::Value::Null);
        }
    }
    Json(v)
}

#[derive(Deserialize)]
struct LabelBody {
    value: String,
}

fn done(a: Applied) -> Json<serde_json::Value> {
    Json(json!({"changed": a != Applied::Unchanged}))
}

async fn set_label(
    State(ctx): Ctx,
    UrlPath((node, key)): UrlPath<(String, String)>,
    Json(body): Json<LabelBody>,
) -> Result<Json<serde_json::Value>, WriteError> {
    ctx.write(Command::SetLabel {
        node,
        key,
        value: Some(body.value),
    })
    .await
    .map(done)
}

async fn delete_label(
    State(ctx): Ctx,
    UrlPath((node, key)): UrlPath<(String, String)>,
) -> Result<Json<serde_json::Value>, WriteError> {
    ctx.write(Command::SetLabel {
        node,
        key,
        value: None,
    })
    .await
    .map(done)
}

async fn set_admin_state(
    ctx: &AdminCtx,
    node: String,
    state: AdminState,
) -> Result<Json<serde_json::Value>, WriteError> {
    ctx.write(Command::SetAdminState { node, state })
        .await
        .map(done)
}

async fn cordon(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<serde_json::Value>, WriteError> {
    set_admin_state(&ctx, node, AdminState::Cordoned).await
}

async fn uncordon(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<serde_json::Value>, WriteError> {
    set_admin_state(&ctx, node, AdminState::Active).await
}

async fn drain(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<serde_json::Value>, WriteError> {
    set_admin_state(&ctx, node, AdminState::Draining).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FlipBody {
    role: String,
}

/// The node's engines change role; answers with the engines now on the node.
async fn flip(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
    Json(body): Json<FlipBody>,
) -> Result<Json<serde_json::Value>, WriteError> {
    let role = match body.role.as_str() {
        "prefill" => pd_raft::EngineRole::Prefill,
        "decode" => pd_raft::EngineRole::Decode,
        other => {
            return Err(WriteError::from(ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_role",
                format!("role {other:?}: a node flips to \"prefill\" or \"decode\""),
            )));
        }
    };
    ctx.write(Command::FlipNode {
        node: node.clone(),
        role,
    })
    .await?;
    let state = ctx.control.state_snapshot();
    let engines: Vec<serde_json::Value> = state
        .assignments
        .values()
        .filter(|a| a.node == node)
        .map(|a| json!({"engine": a.engine, "role": a.role.to_string(), "gpus": a.gpus, "generation": a.generation}))
        .collect();
    Ok(Json(json!({"changed": true, "engines": engines})))
}

async fn remove(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<serde_json::Value>, WriteError> {
    ctx.write(Command::RemoveNode {
        node,
        cert_serial: None,
    })
    .await
    .map(done)
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such admin route".into(),
    )
}

pub fn router(ctx: Arc<AdminCtx>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/nodes/{node}/labels/{key}",
            put(set_label).delete(delete_label),
        )
        .route("/v1/nodes/{node}/cordon", post(cordon))
        .route("/v1/nodes/{node}/uncordon", post(uncordon))
        .route("/v1/nodes/{node}/drain", post(drain))
        .route("/v1/nodes/{node}/flip", post(flip))
        .route("/v1/nodes/{node}", axum::routing::delete(remove))
        .route("/v1/deployments", get(deployments).post(create_deployment))
        .route("/v1/engines", get(engines))
        .route(
            "/v1/deployments/{name}",
            axum::routing::delete(delete_deployment),
        )
        .route("/v1/deployments/{name}/layout", put(scale_deployment))
        .route("/v1/deployments/{name}/routable", get(routable))
        .route("/v1/apikeys", get(api_keys).post(create_api_key))
        .route("/v1/apikeys/required", put(require_api_keys))
        .route("/v1/apikeys/{id}", axum::routing::delete(revoke_api_key))
        .fallback(not_found)
        .with_state(ctx)
}

/// A router that refuses everything: served to TLS clients that are not the admin.
fn forbidden(who: String) -> Router {
    Router::new().fallback(move || {
        let who = who.clone();
        async move {
            ApiError(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{who} may not use the admin API: it needs the admin credential"),
            )
        }
    })
}

/// Serves the admin API on HTTPS at `addr`. Binds before returning, so a taken port is an
/// error at start.
pub async fn serve_https(
    addr: SocketAddr,
    endpoint: &Endpoint,
    router: Router,
) -> anyhow::Result<SocketAddr> {
    // Built per connection from the endpoint's current identity, so a renewed certificate is
    // served without a restart (an admin connection is rare; building a config is cheap).
    let acceptor_now = {
        let endpoint = endpoint.clone();
        move || -> anyhow::Result<tokio_rustls::TlsAcceptor> {
            let mut tls = endpoint.identity().server_config()?;
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
        }
    };
    acceptor_now()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the admin API on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                continue;
            };
            let acceptor = match acceptor_now() {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin API: no usable certificate");
                    continue;
                }
            };
            let router = router.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(ADMIN_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        warn!(%remote, error = %e, "refused admin connection");
                        return;
                    }
                    Err(_) => {
                        warn!(%remote, "refused admin connection: TLS handshake timed out");
                        return;
                    }
                };
                let who = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| pd_transport::pki::cert_info(leaf).ok())
                    .map(|i| i.identity);
                let app = match who {
                    Some(PeerIdentity::Admin) => router,
                    Some(other) => forbidden(other.to_string()),
                    None => forbidden("an unidentified client".into()),
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let io = hyper_util::rt::TokioIo::new(tls);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(%remote, error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(bound)
}

/// Serves the admin API on a unix socket that only this user may open (mode 0600).
pub async fn serve_unix(path: &Path, router: Router) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A socket left by a previous run; refuse to remove anything else.
        let meta = std::fs::symlink_metadata(path)?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "admin API on the local socket");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            warn!(error = %e, "admin socket stopped");
        }
    });
    Ok(())
}
