//! The admin API's deployment routes: listing (with what the agents measured), creating
//! (model folders looked for on every host, the planner for a planned layout, a fit check),
//! scaling, deleting, and whether every agent routes to a deployment's engines.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use pd_api::{
    Changed, Created, DeployRequest, DeploymentView, Deployments, Engines, Measured, Plan,
    Routable, RoutableNode,
};
use pd_raft::{Command, Layout};

use crate::wire::latency::ModelLatency;
use crate::wire::{AgentRequest, AgentResponse};

use super::{
    AdminCtx, ApiError, Ctx, ENGINES_TIMEOUT, LATENCIES_TIMEOUT, PLANNED_ISL_DEFAULT,
    PLANNED_OSL_DEFAULT, WriteError, apply_error, ask_other_agents, done,
};

/// The engine counts a request asks for.
fn layout_of(body: &DeployRequest) -> Result<Layout, ApiError> {
    let bad = |m: &str| ApiError(StatusCode::BAD_REQUEST, "invalid_layout", m.to_string());
    match (body.prefill, body.decode, body.colocated) {
        (Some(prefill), Some(decode), None) => Ok(Layout::Disaggregated { prefill, decode }),
        (None, None, Some(engines)) => Ok(Layout::Colocated { engines }),
        _ => Err(bad(
            "give either prefill and decode (engine counts), or colocated (an engine count)",
        )),
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

pub(super) async fn engines(State(ctx): Ctx) -> Json<Engines> {
    let engines = ctx
        .coordinator
        .cluster_engines_within(ENGINES_TIMEOUT)
        .await;
    Json(Engines { engines })
}

/// The coordinator's latest re-planning decisions (`pdctl autoplan`); another agent names
/// the coordinator (`421`), which holds them.
pub(super) async fn autoplan(State(ctx): Ctx) -> Result<Json<pd_api::Autoplan>, WriteError> {
    ctx.redirect_early()?;
    match ctx.autoplan.reports() {
        Some(deployments) => Ok(Json(pd_api::Autoplan { deployments })),
        None => Err(WriteError::Api(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_coordinator",
            "no coordinator holds re-planning decisions yet (an election, or a coordinator's first round)".into(),
        ))),
    }
}

/// Whether every agent's router would route to all of a deployment's engines now (what
/// `pdctl deploy --wait` waits for after the engines are ready): per node (not down), the
/// engines its router would choose and whether it serves the OpenAI API; `every_agent` is
/// true when each agent with an API that answered sees every engine, and every agent answered.
pub(super) async fn routable(
    State(ctx): Ctx,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Routable>, ApiError> {
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
    let nodes: Vec<RoutableNode> = answers
        .into_iter()
        .map(|(node, got)| match got {
            Some(AgentResponse::Routable { engines, api }) => {
                every &= !api || engines >= wanted;
                RoutableNode {
                    node,
                    engines: Some(engines),
                    api: Some(api),
                }
            }
            _ => {
                every = false;
                RoutableNode {
                    node,
                    engines: None,
                    api: None,
                }
            }
        })
        .collect();
    Ok(Json(Routable {
        deployment: name,
        engines_wanted: wanted,
        every_agent: every,
        nodes,
    }))
}

/// Bound on asking one agent what it would route to.
const ROUTABLE_TIMEOUT: Duration = Duration::from_secs(2);

/// TTFT and TPOT per model over every agent that answers within `LATENCIES_TIMEOUT`.
async fn cluster_latencies(
    ctx: &AdminCtx,
    s: &pd_raft::ClusterState,
) -> (BTreeMap<String, ModelLatency>, Vec<String>) {
    let me = ctx.control.node_name().to_string();
    let mut answers: Vec<(String, Option<Vec<ModelLatency>>)> =
        ask_other_agents(ctx, s, AgentRequest::Latencies, LATENCIES_TIMEOUT)
            .await
            .into_iter()
            .map(|(node, got)| match got {
                Some(AgentResponse::Latencies(l)) => (node, Some(l)),
                _ => (node, None),
            })
            .collect();
    answers.push((me, Some(ctx.metrics.latencies())));
    let mut by_model: BTreeMap<String, ModelLatency> = BTreeMap::new();
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
fn measured(l: Option<&ModelLatency>) -> Measured {
    let Some(l) = l else {
        return Measured::default();
    };
    let ms = |v: Option<f64>| v.map(|s| s * 1e3);
    Measured {
        requests: l.ttft.count,
        ttft_ms_mean: ms(l.ttft.mean()),
        ttft_ms_p90: ms(l.ttft.quantile(0.9)),
        tpot_ms_mean: ms(l.tpot.mean()),
        tpot_ms_p90: ms(l.tpot.quantile(0.9)),
    }
}

pub(super) async fn deployments(State(ctx): Ctx) -> Json<Deployments> {
    let s = ctx.control.state_snapshot();
    let (latencies, silent) = cluster_latencies(&ctx, &s).await;
    let deployments = s
        .deployments
        .values()
        .map(|d| {
            let engines: Vec<pd_raft::Assignment> = s
                .assignments
                .values()
                .filter(|a| a.deployment == d.name)
                .cloned()
                .collect();
            DeploymentView {
                placed: engines.len() as u32 == d.layout.engine_count(),
                engines,
                plan: s.plans.get(&d.name).map(Plan::of),
                measured: measured(latencies.get(&d.name)),
                model_hosts: s.model_hosts.get(&d.name).cloned(),
                engine_args: s.engine_args.get(&d.name).cloned().unwrap_or_default(),
                autoplan: s.autoplan_setting(&d.name),
                deployment: d.clone(),
            }
        })
        .collect();
    Json(Deployments {
        deployments,
        measured_without: silent,
    })
}

pub(super) async fn create_deployment(
    State(ctx): Ctx,
    Json(body): Json<DeployRequest>,
) -> Result<(StatusCode, Json<Created>), WriteError> {
    // Checked here first, so an agent that must send the write on does not look at every
    // host's model folder and run the planner for nothing.
    ctx.redirect_early()?;
    let engine = if body.engine.is_empty() {
        "builtin".to_string()
    } else {
        body.engine.clone()
    };
    let tp = body.tp.unwrap_or(1);
    let autoplan = match &body.autoplan {
        Some(a) => Some(autoplan_setting(
            a,
            body.layout.as_deref() == Some("planned"),
            body.ttft_ms.is_some() && body.tpot_ms.is_some(),
        )?),
        None => None,
    };
    let bad_args = |m: String| ApiError(StatusCode::BAD_REQUEST, "invalid_engine_args", m);
    let mut body = body;
    match engine.as_str() {
        crate::driver::vllm::NAME => {
            body.engine_args = crate::driver::vllm::with_kv_transport(
                &body.engine_args,
                body.kv_transport.as_deref(),
                ctx.kv_transport_default,
            )
            .map_err(bad_args)?;
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
        _ if body.kv_transport.is_some() => {
            return Err(WriteError::from(bad_args(format!(
                "--kv-transport is for the vllm engine (the {engine} engine's KV always goes through its agents)"
            ))));
        }
        _ if !body.engine_args.is_empty() => {
            return Err(WriteError::from(bad_args(format!(
                "the {engine} engine takes no engine arguments"
            ))));
        }
        _ => {}
    }
    let mut answer = Created {
        created: body.name.clone(),
        ..Created::default()
    };
    // A model folder must be on the hosts: placement uses only those with a matching copy.
    let model_hosts = if crate::models::is_preset(&body.model) || body.model.is_empty() {
        None
    } else {
        let (hosts, missing) = model_hosts(&ctx, &body).await?;
        answer.model_hosts = Some(hosts.clone());
        answer.model_missing = Some(missing);
        Some(hosts)
    };
    let (layout, plan) = match body.layout.as_deref() {
        None => (layout_of(&body)?, None),
        Some("planned") => {
            let plan = plan_layout(&ctx, &body, tp, model_hosts.as_ref()).await?;
            answer.plan = Some(Plan::of(&plan));
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
        answer.engine_args = Some(body.engine_args.clone());
        Command::CreateDeploymentWithArgs {
            create: Box::new(cmd),
            engine_args: body.engine_args.clone(),
        }
    };
    check_fit(&ctx, &cmd, &body.name)?;
    ctx.write(cmd).await?;
    if let Some(setting) = autoplan {
        ctx.write(Command::SetAutoplan {
            deployment: body.name.clone(),
            setting,
        })
        .await?;
    }
    Ok((StatusCode::CREATED, Json(answer)))
}

/// A re-planning request as the replicated setting, refused with the field named. A mode
/// other than `off` needs a planned deployment with both targets: the simulator models its
/// engines from the plan and judges requests against the targets.
fn autoplan_setting(
    req: &pd_api::AutoplanRequest,
    planned: bool,
    targets: bool,
) -> Result<pd_raft::AutoplanSetting, ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, "invalid_autoplan", m);
    let setting = req.setting().map_err(bad)?;
    if setting.mode != pd_raft::AutoplanMode::Off && !(planned && targets) {
        return Err(bad(format!(
            "autoplan {}: re-planning needs a planned deployment with both targets (--layout planned --ttft-ms --tpot-ms): the simulator models its engines from the plan",
            setting.mode.name()
        )));
    }
    Ok(setting)
}

/// `PUT /v1/deployments/{name}/autoplan`: the deployment's re-planning mode and bounds.
pub(super) async fn set_autoplan(
    State(ctx): Ctx,
    UrlPath(name): UrlPath<String>,
    Json(body): Json<pd_api::AutoplanRequest>,
) -> Result<Json<Changed>, WriteError> {
    let s = ctx.control.state_snapshot();
    let Some(d) = s.deployments.get(&name) else {
        return Err(WriteError::from(ApiError(
            StatusCode::NOT_FOUND,
            "unknown_deployment",
            format!("unknown deployment {name:?}"),
        )));
    };
    let setting = autoplan_setting(
        &body,
        s.plans.contains_key(&name),
        d.ttft_ms.is_some() && d.tpot_ms.is_some(),
    )?;
    ctx.write(Command::SetAutoplan {
        deployment: name,
        setting,
    })
    .await
    .map(done)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    deployment: Option<String>,
}

/// `GET /v1/events[?deployment=NAME]`: the re-planner's recorded decisions (from this agent's
/// copy of the replicated state), oldest first.
pub(super) async fn events(
    State(ctx): Ctx,
    axum::extract::Query(q): axum::extract::Query<EventsQuery>,
) -> Result<Json<pd_api::Events>, ApiError> {
    ctx.control.read_state(|s| {
        if let Some(d) = &q.deployment
            && !s.deployments.contains_key(d)
        {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                "unknown_deployment",
                format!("unknown deployment {d:?}"),
            ));
        }
        let mut events: Vec<pd_api::Event> = s
            .autoplan_events
            .iter()
            .filter(|(name, _)| q.deployment.as_ref().is_none_or(|d| d == *name))
            .flat_map(|(name, es)| {
                es.iter().map(|e| pd_api::Event {
                    deployment: name.clone(),
                    decision: e.clone(),
                })
            })
            .collect();
        events.sort_by_key(|e| (e.decision.decided_unix, e.decision.window));
        Ok(Json(pd_api::Events { events }))
    })
}

/// Bound on one agent's look at a model folder.
const MODEL_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks every node that is not down whether it has the model folder and its checkpoint
/// fingerprint. The hosts are those whose copy has the expected fingerprint (given, or the one
/// most copies agree on); the others are returned with why not. None: refused, saying why.
async fn model_hosts(
    ctx: &AdminCtx,
    body: &DeployRequest,
) -> Result<(pd_raft::ModelHosts, BTreeMap<String, String>), ApiError> {
    let s = ctx.control.state_snapshot();
    let me = ctx.control.node_name().to_string();
    let mut asks = tokio::task::JoinSet::new();
    for n in s.nodes.values() {
        if n.health == pd_raft::NodeHealth::Down {
            continue;
        }
        let (name, address, model) = (n.name.clone(), n.address.clone(), body.model.clone());
        let addr = n.socket_addr();
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
            let got = match addr {
                Some(addr) => match peers.call(&name, addr, &req, MODEL_CHECK_TIMEOUT).await {
                    Ok(AgentResponse::ModelCheck(c)) => Ok(c),
                    Ok(_) => Err("an unexpected answer".to_string()),
                    Err(e) => Err(e.to_string()),
                },
                None => Err(format!("its recorded address {address:?} is not ip:port")),
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
    body: &DeployRequest,
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

pub(super) async fn delete_deployment(
    State(ctx): Ctx,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Changed>, WriteError> {
    ctx.write(Command::DeleteDeployment { name })
        .await
        .map(done)
}

pub(super) async fn scale_deployment(
    State(ctx): Ctx,
    UrlPath(name): UrlPath<String>,
    Json(body): Json<DeployRequest>,
) -> Result<Json<Changed>, WriteError> {
    let cmd = Command::ScaleDeployment {
        name: name.clone(),
        layout: layout_of(&body)?,
    };
    check_fit(&ctx, &cmd, &name)?;
    ctx.write(cmd).await.map(done)
}
