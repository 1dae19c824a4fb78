//! The serving path: every agent's OpenAI-compatible ingress, its router, and the legs of a
//! request on the agents that own the engines.
//!
//! A request's journey (the coordinator is never on it):
//! 1. The ingress ([`ingress`]) parses and validates the body (`pd-openai`), finds the
//!    deployment named by `model`, and takes an in-flight slot (bounded: 429 when full).
//! 2. The router (`pd-router`) picks engines from this agent's view of the cluster's engines
//!    (refreshed from the coordinator's engine reports: state and load), the requests this
//!    agent has in flight on each, and an approximate prefix index of what it sent where.
//! 3. Disaggregated: a prefill leg on the prefill engine's agent ([`legs`]) ships the KV piece
//!    by piece straight to the decode engine's agent while the engine computes, then seals the
//!    shipment there; the decode leg, opened at the same time, imports the KV and streams the
//!    rest. The first token goes to the client once the prefill's KV is sealed (until then the
//!    request can still be retried on another pair). Colocated (or a short prompt on a decode
//!    engine alone): one generate leg. Legs on this agent's own engines run as local tasks,
//!    others through a streaming RPC over the transport.
//! 4. Text passes the stop-sequence matcher and goes out as SSE chunks or one JSON body. A
//!    client that goes away drops the legs, which cancel their engine requests at once.
//!
//! Before any token reached the client, a leg that fails in a way another engine may not
//! (engine gone, busy, KV transfer cut) is retried on other engines, a bounded number of times.

pub mod apikey;
pub mod http_legs;
pub mod ingress;
pub mod legs;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pd_engine::{FinishReason as EngineFinish, Prompt, SamplingParams};
use pd_openai::{ApiError, FinishReason, Generation, PromptInput, StopMatcher, Usage};
use pd_router::{Candidate, Decision, DecisionKind, Role, Router, RouterConfig};
use pd_transport::ResponseStream;
use tokio::sync::{Semaphore, mpsc};

use crate::control::ControlPlane;
use crate::peers::Peers;
use crate::supervisor::EngineState;
use crate::wire::{AgentRequest, AgentResponse};
use legs::{DecodeLeg, EngineKvDecodeLeg, Failure, GenerateLeg, Leg, Legs, PrefillLeg, ServeEvent};
use metrics::Metrics;

/// A request slot of this agent's API (`Serving::admit`), held until the request's answer
/// ends.
pub struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.metrics.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The serving settings (from the `[serving]` section).
#[derive(Debug, Clone)]
pub struct ServingConfig {
    pub inflight_max: usize,
    pub body_bytes_max: usize,
    /// Bound on a request's head (and a kept-alive connection's idle time).
    pub header_read_timeout: Duration,
    /// Bound on a request's body.
    pub body_read_timeout: Duration,
    /// Connections open at once.
    pub connections_max: usize,
    /// Bounds of the KV path.
    pub kv: legs::KvLimits,
    pub max_tokens_default: u32,
    pub max_tokens_max: u32,
    pub request_timeout: Duration,
    /// Tries on other engines before the first token, after the first one failed.
    pub retries: u32,
    /// Moves to another engine after the first token, the request replayed there.
    pub migrations: u32,
    /// How long an engine that failed a leg is not chosen by this agent's router.
    pub circuit_open: Duration,
    pub view_refresh: Duration,
    pub router: RouterConfig,
}

/// What the ingress sends the client, in order: text, then exactly one `Done` or `Error`.
#[derive(Debug)]
pub enum Out {
    /// The first token is known (its text may be empty or held back by a stop matcher);
    /// `route` names the engines that produced it (see [`Emitter::route`]).
    FirstToken {
        route: String,
    },
    Text(String),
    Done {
        finish: FinishReason,
        usage: Usage,
        timing: Timing,
        /// Every engine that produced the output, migrations included.
        route: String,
    },
    Error(ApiError),
}

/// Where a finished request's time went (microseconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// From the request's arrival to its end.
    pub total_us: u64,
    /// In engines: from each leg's submission to its engine's last reply.
    pub engine_us: u64,
}

impl Timing {
    /// In agent code: ingress, routing, transport, KV shipping, forwarding.
    pub fn agent_us(&self) -> u64 {
        self.total_us.saturating_sub(self.engine_us)
    }
}

/// One deployment as this agent's router sees it.
#[derive(Debug, Clone, Default)]
struct ModelView {
    created: u64,
    candidates: Vec<Candidate>,
    /// The deployment's driver continues a stream from the prompt and the tokens so far:
    /// migration is allowed.
    resume: bool,
    /// Its engines move their own KV (vLLM's two-step flow).
    engine_kv: bool,
}

#[derive(Debug, Default)]
struct View {
    models: BTreeMap<String, ModelView>,
    /// SHA-256 (hex) of the cluster's API keys.
    api_keys: std::collections::HashSet<String>,
    /// Whether a key is asked for (the cluster's `api_keys_required`).
    keys_required: bool,
    /// Each engine's incarnation (node, pid, restarts), to tell a restarted engine from the
    /// one that failed.
    incarnations: HashMap<String, Incarnation>,
}

type Incarnation = (String, Option<u32>, u32);

/// An engine that failed a leg: not chosen until `until`, or until another incarnation of it
/// is ready (restarted, or placed on another host).
struct OpenCircuit {
    until: Instant,
    failed: Option<Incarnation>,
}

pub struct Serving {
    node: String,
    cfg: ServingConfig,
    control: Arc<ControlPlane>,
    peers: Arc<Peers>,
    pub legs: Arc<Legs>,
    pub metrics: Arc<Metrics>,
    router: Mutex<Router>,
    view: RwLock<Arc<View>>,
    /// Requests this agent has in flight per engine.
    inflight: Mutex<HashMap<String, u32>>,
    /// Engines that failed a leg, not chosen until the instant.
    open_circuits: Mutex<HashMap<String, OpenCircuit>>,
    slots: Arc<Semaphore>,
    /// The engine-moved KV bytes already counted, per engine of this host.
    kv_moved_counted: Mutex<HashMap<String, u64>>,
    seq: AtomicU64,
    /// Unix seconds at start, for ids and `created`.
    boot: u64,
}

/// Why one attempt on one pair ended without the request's end.
struct AttemptFail {
    failure: Failure,
    message: String,
    /// The engine that failed.
    engine: String,
}

/// Counts a request on an engine while it lives.
struct InflightGuard<'a> {
    serving: &'a Serving,
    engine: String,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut m = self
            .serving
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.engine) {
            *n = n.saturating_sub(1);
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Serving {
    pub fn new(
        cfg: ServingConfig,
        control: Arc<ControlPlane>,
        peers: Arc<Peers>,
        legs: Arc<Legs>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Serving {
            node: control.node_name().to_string(),
            slots: Arc::new(Semaphore::new(cfg.inflight_max)),
            router: Mutex::new(Router::new(cfg.router.clone())),
            cfg,
            control,
            peers,
            legs,
            metrics,
            view: RwLock::new(Arc::new(View::default())),
            inflight: Mutex::new(HashMap::new()),
            open_circuits: Mutex::new(HashMap::new()),
            kv_moved_counted: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            boot: unix_now(),
        })
    }

    pub fn config(&self) -> &ServingConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Keeps the view of the cluster's engines fresh, and drops KV shipments nobody claimed.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.cfg.view_refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.refresh().await;
                this.count_engine_kv();
                this.legs.inbox.sweep(this.cfg.kv.unclaimed);
            }
        })
    }

    /// Adds what this host's engines moved themselves since the last look (vLLM's NIXL bytes,
    /// counted by the engine that pulls them) to `pdagent_kv_bytes_received_total{path="engine"}`.
    fn count_engine_kv(&self) {
        let now = self.legs.supervisor().engine_kv_moved();
        let mut seen = self
            .kv_moved_counted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (engine, total) in &now {
            let before = seen.insert(engine.clone(), *total).unwrap_or(0);
            // A restarted engine counts from zero again.
            let delta = if *total >= before {
                total - before
            } else {
                *total
            };
            if delta > 0 {
                self.metrics.kv_bytes_received.add(&["engine"], delta);
            }
        }
    }

    async fn refresh(&self) {
        let state = self.control.state_snapshot();
        let engines = self.control.cluster_engines().await;
        let mut models: BTreeMap<String, ModelView> = state
            .deployments
            .values()
            .map(|d| {
                (
                    d.name.clone(),
                    ModelView {
                        created: self.boot,
                        candidates: Vec::new(),
                        resume: crate::driver::capabilities(&d.engine).is_some_and(|c| c.resume),
                        engine_kv: crate::driver::capabilities(&d.engine)
                            .is_some_and(|c| c.kv == crate::driver::KvPath::Engine),
                    },
                )
            })
            .collect();
        let mut incarnations = HashMap::new();
        let mut ready_again = Vec::new();
        for e in engines {
            let incarnation = (e.node.clone(), e.pid, e.restarts);
            if e.state == EngineState::Ready {
                ready_again.push((e.engine.clone(), incarnation.clone()));
            }
            incarnations.insert(e.engine.clone(), incarnation);
            let Some(m) = models.get_mut(&e.deployment) else {
                continue;
            };
            let rack = state
                .nodes
                .get(&e.node)
                .and_then(|n| n.labels.get("rack").cloned());
            m.candidates.push(Candidate {
                engine: e.engine.clone(),
                node: e.node.clone(),
                rack,
                role: match e.role {
                    pd_raft::EngineRole::Prefill => Role::Prefill,
                    pd_raft::EngineRole::Decode => Role::Decode,
                    pd_raft::EngineRole::Both => Role::Both,
                },
                queued: e.load.queued,
                running: e.load.running,
                kv_usage: e.load.kv_usage,
                inflight: 0,
                available: e.state == EngineState::Ready,
            });
        }
        let api_keys = state
            .api_keys
            .values()
            .map(|k| k.sha256_hex.clone())
            .collect();
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(View {
            models,
            api_keys,
            keys_required: state.api_keys_required,
            incarnations,
        });
        // An engine that failed and is ready again as another incarnation is taken back now.
        let mut open = self.open_circuits.lock().unwrap_or_else(|p| p.into_inner());
        for (engine, incarnation) in ready_again {
            if open
                .get(&engine)
                .is_some_and(|c| c.failed.as_ref().is_some_and(|f| *f != incarnation))
            {
                tracing::info!(%engine, "the engine is ready again: chosen again");
                open.remove(&engine);
            }
        }
    }

    /// How many of `deployment`'s engines this agent's router would choose now: ready, and
    /// their circuits closed.
    pub fn routable(&self, deployment: &str) -> u32 {
        let view = self.view();
        let Some(m) = view.models.get(deployment) else {
            return 0;
        };
        let open = self.open_circuits.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.candidates
            .iter()
            .filter(|c| c.available && open.get(&c.engine).is_none_or(|o| o.until <= now))
            .count() as u32
    }

    fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks a request's `Authorization` header against the cluster's keys, when it asks for
    /// one (from its first key on, until `pdctl apikey require no`).
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        let view = self.view();
        if !view.keys_required {
            return Ok(());
        }
        let Some(key) = authorization.and_then(apikey::bearer) else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>` (pdctl apikey create).",
            ));
        };
        if view.api_keys.contains(&apikey::hash(key)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "Incorrect API key provided (unknown or revoked).",
            ))
        }
    }

    /// The deployments clients may name, with when this agent first served them.
    pub fn models(&self) -> Vec<(String, u64)> {
        self.view()
            .models
            .iter()
            .map(|(n, m)| (n.clone(), m.created))
            .collect()
    }

    /// Whether some deployment can serve a request now: a ready prefill and decode engine,
    /// or a ready colocated one.
    pub fn ready(&self) -> bool {
        self.view().models.values().any(|m| {
            let has = |r: Role| m.candidates.iter().any(|c| c.available && c.role == r);
            (has(Role::Prefill) && has(Role::Decode)) || has(Role::Both)
        })
    }

    /// A fresh id for a request (`X-Request-Id` when the client sent none) or a shipment.
    pub fn new_id(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write(self.node.as_bytes());
        h.write_u64(self.boot);
        h.finish()
    }

    /// Takes one of this agent's `inflight_max` request slots, from a request's first byte
    /// (before its body is read) until its answer ends; refused (429) when none is free.
    pub fn admit(&self) -> Result<Admission, ApiError> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::overloaded(
                format!(
                    "this agent is serving {} requests, its limit; retry shortly",
                    self.cfg.inflight_max
                ),
                1,
            )
        })?;
        self.metrics.inflight.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            _permit: permit,
            metrics: self.metrics.clone(),
        })
    }

    /// Starts serving a validated request under its admission. Errors that come before any
    /// work (unknown model) are returned; everything after arrives on the channel.
    pub fn start(
        self: &Arc<Self>,
        generation: Generation,
        received: Instant,
        admission: Admission,
    ) -> Result<mpsc::Receiver<Out>, ApiError> {
        if !self.view().models.contains_key(&generation.model) {
            return Err(ApiError::model_not_found(&generation.model));
        }
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            this.journey(generation, tx, received).await;
            drop(admission);
        });
        Ok(rx)
    }

    async fn journey(&self, g: Generation, tx: mpsc::Sender<Out>, t0: Instant) {
        let mut emit = Emitter::new(&g, tx.clone(), t0);
        let outcome = tokio::select! {
            r = self.serve(&g, &mut emit) => r,
            _ = tx.closed() => Err(Ended::Disconnected),
            _ = tokio::time::sleep(self.cfg.request_timeout) => Err(Ended::Error(ApiError::timeout(
                format!("the request did not finish within {} s", self.cfg.request_timeout.as_secs()),
            ))),
        };
        let model = g.model.as_str();
        let label = match &outcome {
            Ok(_) => "ok",
            Err(Ended::Disconnected) => "cancelled",
            Err(Ended::Error(e)) if e.status < 500 => "rejected",
            Err(Ended::Error(_)) => "error",
        };
        self.metrics.requests.inc(&[model, label]);
        match outcome {
            Ok((finish, usage)) => {
                if let Some(first) = emit.first_at {
                    self.metrics.ttft.observe(model, first.as_secs_f64());
                    if usage.completion_tokens > 1
                        && let Some(last) = emit.last_at
                    {
                        let tpot =
                            (last - first).as_secs_f64() / f64::from(usage.completion_tokens - 1);
                        self.metrics.tpot.observe(model, tpot);
                    }
                }
                self.metrics.e2e.observe(model, t0.elapsed().as_secs_f64());
                self.metrics
                    .prompt_tokens
                    .add(&[model], u64::from(usage.prompt_tokens));
                self.metrics
                    .generation_tokens
                    .add(&[model], u64::from(usage.completion_tokens));
                let tail = emit.stop.finish();
                if !tail.is_empty() {
                    let _ = send_bounded(&tx, Out::Text(tail)).await;
                }
                let timing = Timing {
                    total_us: t0.elapsed().as_micros() as u64,
                    engine_us: emit.engine_us,
                };
                self.metrics
                    .agent_time
                    .observe(model, timing.agent_us() as f64 / 1e6);
                let _ = send_bounded(
                    &tx,
                    Out::Done {
                        finish,
                        usage,
                        timing,
                        route: emit.route.clone(),
                    },
                )
                .await;
            }
            Err(Ended::Error(e)) => {
                let _ = send_bounded(&tx, Out::Error(e)).await;
            }
            Err(Ended::Disconnected) => {}
        }
    }

    fn sampling(&self, g: &Generation) -> SamplingParams {
        SamplingParams {
            temperature: g.temperature,
            top_p: g.top_p,
            seed: g.seed.unwrap_or_else(|| self.new_id()),
            max_tokens: g.max_tokens.unwrap_or(self.cfg.max_tokens_default).max(1),
            ..SamplingParams::default()
        }
    }

    /// Tries pairs until one serves the request or the error is final.
    async fn serve(
        &self,
        g: &Generation,
        emit: &mut Emitter,
    ) -> Result<(FinishReason, Usage), Ended> {
        let prompt = match &g.prompt {
            PromptInput::Text(t) => Prompt::Text(t.clone()),
            PromptInput::Tokens(t) => Prompt::Tokens(t.clone()),
            PromptInput::Chat(m) => Prompt::Chat(
                m.iter()
                    .map(|m| pd_engine::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            ),
        };
        let (blocks, prompt_tokens) = prefix_blocks(&prompt, self.cfg.router.block_tokens);
        let sampling = self.sampling(g);
        let mut excluded: Vec<String> = Vec::new();
        let (mut retries, mut migrations) = (0, 0);
        let mut previous: Option<AttemptFail> = None;
        loop {
            let (decision, candidates) =
                match self.route(&g.model, &blocks, prompt_tokens, &excluded) {
                    Ok(r) => r,
                    // Nothing left to retry on: the failure that made us retry says more.
                    Err(e) => return Err(previous.map_or(e, |f| Ended::Error(api_error(&f)))),
                };
            // One token needs no decode engine's KV: the decode engine computes it alone
            // (nothing shipped, no decode slot reserved for nothing).
            let kind = match decision.kind {
                DecisionKind::Disaggregated if sampling.max_tokens <= 1 => DecisionKind::DecodeOnly,
                k => k,
            };
            let result = if emit.started() {
                // A move after the first token: a decode-capable engine recomputes the prompt
                // and the tokens so far, and continues.
                self.metrics.routing.inc(&["migration"]);
                let e = &candidates[decision.decode];
                self.generate(e, &prompt, &sampling, emit).await
            } else {
                self.metrics.routing.inc(&[kind.as_str()]);
                match kind {
                    DecisionKind::Disaggregated => {
                        let p = &candidates[decision.prefill.expect("a prefill engine")];
                        let d = &candidates[decision.decode];
                        if self
                            .view()
                            .models
                            .get(&g.model)
                            .is_some_and(|m| m.engine_kv)
                        {
                            self.engine_kv(p, d, &prompt, &sampling, emit).await
                        } else {
                            self.disaggregated(p, d, &prompt, &sampling, emit).await
                        }
                    }
                    DecisionKind::Colocated | DecisionKind::DecodeOnly => {
                        let e = &candidates[decision.decode];
                        self.generate(e, &prompt, &sampling, emit).await
                    }
                }
            };
            match result {
                Ok(done) => return Ok(done),
                Err(Attempt::Stopped(done)) => return Ok(done),
                Err(Attempt::Failed(f)) => {
                    // An engine that died or a host that cannot be reached is not chosen for a
                    // while; an engine its agent does not (yet) call ready is only skipped by
                    // this request's retries (the view catches up within a refresh).
                    if matches!(f.failure, Failure::EngineLost | Failure::Unreachable) {
                        self.open_circuit(&f.engine);
                    }
                    // Before the first token the request is tried again on other engines; after
                    // it, moved to another engine that replays the prompt and the tokens so far
                    // (sampling depends only on the seed and the output index: exact).
                    // Only where the driver replays exactly.
                    let (used, limit, what) = if emit.started() {
                        let resume = self.view().models.get(&g.model).is_some_and(|m| m.resume);
                        let limit = if resume { self.cfg.migrations } else { 0 };
                        (&mut migrations, limit, "migration")
                    } else {
                        (&mut retries, self.cfg.retries, "retry")
                    };
                    if f.failure.retryable() && *used < limit {
                        *used += 1;
                        tracing::info!(engine = %f.engine, failure = ?f.failure, error = %f.message, tokens_so_far = emit.ids.len(), "{what}: the request goes on on other engines");
                        self.metrics.recoveries.inc(&[&g.model, what]);
                        excluded.push(f.engine.clone());
                        previous = Some(f);
                        continue;
                    }
                    return Err(Ended::Error(api_error(&f)));
                }
            }
        }
    }

    fn open_circuit(&self, engine: &str) {
        let failed = self.view().incarnations.get(engine).cloned();
        self.open_circuits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                engine.to_string(),
                OpenCircuit {
                    until: Instant::now() + self.cfg.circuit_open,
                    failed,
                },
            );
        self.router
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget_engine(engine);
    }

    fn route(
        &self,
        model: &str,
        blocks: &[u64],
        prompt_tokens: u32,
        excluded: &[String],
    ) -> Result<(Decision, Vec<Candidate>), Ended> {
        let view = self.view();
        let Some(m) = view.models.get(model) else {
            return Err(Ended::Error(ApiError::model_not_found(model)));
        };
        let mut candidates = m.candidates.clone();
        {
            let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let mut open = self.open_circuits.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            open.retain(|_, c| c.until > now);
            for c in &mut candidates {
                c.inflight = inflight.get(&c.engine).copied().unwrap_or(0);
                if open.contains_key(&c.engine) || excluded.contains(&c.engine) {
                    c.available = false;
                }
            }
        }
        let mut router = self.router.lock().unwrap_or_else(|p| p.into_inner());
        let decision = router
            .route(blocks, prompt_tokens, &candidates)
            .map_err(|e| {
                Ended::Error(ApiError::unavailable(
                    format!("deployment {model} cannot serve now: {e}"),
                    Some(1),
                ))
            })?;
        router.record_decision(&decision, &candidates, blocks);
        Ok((decision, candidates))
    }

    fn count(&self, engine: &str) -> InflightGuard<'_> {
        *self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(engine.to_string())
            .or_insert(0) += 1;
        InflightGuard {
            serving: self,
            engine: engine.to_string(),
        }
    }

    /// Opens a leg on the agent of `c`'s engine: a local task or a streaming RPC.
    async fn open_leg(&self, c: &Candidate, leg: Leg) -> Result<LegStream, AttemptFail> {
        let fail = |failure, message: String| AttemptFail {
            failure,
            message,
            engine: c.engine.clone(),
        };
        if c.node == self.node {
            let (tx, rx) = mpsc::channel(256);
            let legs = self.legs.clone();
            tokio::spawn(async move { legs.run(leg, tx).await });
            return Ok(LegStream::Local(rx));
        }
        let addr = self.control.node_address(&c.node).ok_or_else(|| {
            fail(
                Failure::Unreachable,
                format!("node {} is not in the cluster", c.node),
            )
        })?;
        let open = async {
            let conn = self.peers.connection(&c.node, addr).await?;
            conn.call_stream::<_, AgentResponse>(&AgentRequest::Serve(leg))
                .await
        };
        match tokio::time::timeout(LEG_OPEN_TIMEOUT, open).await {
            Ok(Ok(s)) => Ok(LegStream::remote(s, self.control.clone(), c.node.clone())),
            Ok(Err(e)) => Err(fail(
                Failure::Unreachable,
                format!("cannot reach node {}: {e}", c.node),
            )),
            Err(_) => Err(fail(
                Failure::Unreachable,
                format!("node {} did not answer within {LEG_OPEN_TIMEOUT:?}", c.node),
            )),
        }
    }

    async fn disaggregated(
        &self,
        p: &Candidate,
        d: &Candidate,
        prompt: &Prompt,
        sampling: &SamplingParams,
        emit: &mut Emitter,
    ) -> Result<(FinishReason, Usage), Attempt> {
        let _pg = self.count(&p.engine);
        let _dg = self.count(&d.engine);
        let shipment = self.new_id();
        let (pre, dec) = tokio::join!(
            self.open_leg(
                p,
                Leg::Prefill(PrefillLeg {
                    engine: p.engine.clone(),
                    prompt: prompt.clone(),
                    sampling: sampling.clone(),
                    decode_node: d.node.clone(),
                    shipment,
                }),
            ),
            self.open_leg(
                d,
                Leg::Decode(DecodeLeg {
                    engine: d.engine.clone(),
                    shipment,
                    sampling: sampling.clone(),
                }),
            )
        );
        let (mut pre, mut dec) = (pre?, dec?);
        let mut early = Vec::new();
        let prompt_len = loop {
            // The decode leg says nothing until its KV is sealed, unless it fails first (its
            // engine gone or not ready): then this pair is given up while still retryable.
            let ev = tokio::select! {
                ev = pre.next(&p.engine) => ev?,
                ev = dec.next(&d.engine) => match ev? {
                    ServeEvent::Failed { failure, message } => {
                        return Err(Attempt::Failed(AttemptFail {
                            failure,
                            message,
                            engine: d.engine.clone(),
                        }));
                    }
                    // The decode may start before the prefill leg's report reaches us.
                    other => {
                        early.push(other);
                        continue;
                    }
                },
            };
            match ev {
                ServeEvent::Prefilled {
                    first_token,
                    text,
                    prompt_tokens,
                    pieces,
                    kv_bytes,
                    kv_ms,
                    engine_us,
                    ..
                } => {
                    emit.engine_us += engine_us;
                    emit.serving_from(format!(
                        "{}@{} -> {}@{}",
                        p.engine, p.node, d.engine, d.node
                    ));
                    let path = if p.node == d.node { "host" } else { "network" };
                    self.metrics.kv_transfer.observe(path, kv_ms / 1e3);
                    tracing::debug!(shipment, pieces, kv_bytes, kv_ms, "prefill done");
                    if emit.token(first_token, &text).await {
                        return Err(Attempt::Stopped(emit.stopped(prompt_tokens)));
                    }
                    break prompt_tokens;
                }
                ServeEvent::Failed { failure, message } => {
                    // A KV transfer that failed is more likely the decode side's (its host
                    // unreachable, its inbox refusing): exclude that engine on a retry.
                    let engine = if failure == Failure::KvTransfer {
                        d.engine.clone()
                    } else {
                        p.engine.clone()
                    };
                    return Err(Attempt::Failed(AttemptFail {
                        failure,
                        message,
                        engine,
                    }));
                }
                _ => {}
            }
        };
        drop(pre);
        drop(_pg);
        self.follow(&mut dec, early, &d.engine, emit, prompt_len)
            .await
    }

    /// Disaggregated on engines that move their own KV: the prefill engine computes the
    /// prompt and keeps its KV; what it answers (`kv_transfer_params`) goes with the request to
    /// the decode engine, which pulls the KV and streams every token.
    async fn engine_kv(
        &self,
        p: &Candidate,
        d: &Candidate,
        prompt: &Prompt,
        sampling: &SamplingParams,
        emit: &mut Emitter,
    ) -> Result<(FinishReason, Usage), Attempt> {
        let _pg = self.count(&p.engine);
        let _dg = self.count(&d.engine);
        let shipment = self.new_id();
        let mut pre = self
            .open_leg(
                p,
                Leg::Prefill(PrefillLeg {
                    engine: p.engine.clone(),
                    prompt: prompt.clone(),
                    sampling: sampling.clone(),
                    decode_node: d.node.clone(),
                    shipment,
                }),
            )
            .await?;
        let (params, prompt_len) = loop {
            match pre.next(&p.engine).await? {
                ServeEvent::KvParams {
                    params,
                    prompt_tokens,
                    engine_us,
                } => {
                    emit.engine_us += engine_us;
                    break (params, prompt_tokens);
                }
                ServeEvent::Failed { failure, message } => {
                    return Err(Attempt::Failed(AttemptFail {
                        failure,
                        message,
                        engine: p.engine.clone(),
                    }));
                }
                _ => {}
            }
        };
        drop(pre);
        drop(_pg);
        let mut dec = self
            .open_leg(
                d,
                Leg::EngineKvDecode(EngineKvDecodeLeg {
                    generate: GenerateLeg {
                        engine: d.engine.clone(),
                        prompt: prompt.clone(),
                        sampling: sampling.clone(),
                        resume: Vec::new(),
                    },
                    kv_transfer_params: params,
                    request_id: http_legs::request_id(shipment),
                }),
            )
            .await?;
        emit.serving_from(format!(
            "{}@{} -> {}@{}",
            p.engine, p.node, d.engine, d.node
        ));
        self.follow(&mut dec, Vec::new(), &d.engine, emit, prompt_len)
            .await
    }

    async fn generate(
        &self,
        e: &Candidate,
        prompt: &Prompt,
        sampling: &SamplingParams,
        emit: &mut Emitter,
    ) -> Result<(FinishReason, Usage), Attempt> {
        let _g = self.count(&e.engine);
        let mut leg = self
            .open_leg(
                e,
                Leg::Generate(GenerateLeg {
                    engine: e.engine.clone(),
                    prompt: prompt.clone(),
                    sampling: sampling.clone(),
                    resume: emit.ids.clone(),
                }),
            )
            .await?;
        emit.serving_from(format!("{}@{}", e.engine, e.node));
        self.follow(&mut leg, Vec::new(), &e.engine, emit, 0).await
    }

    /// Streams a decode or generate leg's tokens to the client until its end.
    async fn follow(
        &self,
        leg: &mut LegStream,
        early: Vec<ServeEvent>,
        engine: &str,
        emit: &mut Emitter,
        mut prompt_len: u32,
    ) -> Result<(FinishReason, Usage), Attempt> {
        let mut early = early.into_iter();
        loop {
            let ev = match early.next() {
                Some(ev) => ev,
                None => leg.next(engine).await?,
            };
            match ev {
                ServeEvent::Admitted { prompt_tokens } => prompt_len = prompt_tokens,
                // Tokens the client has (a decode leg re-sends the prefill's first token; a
                // resumed leg starts after the tokens so far) are not sent twice.
                ServeEvent::Token { index, .. } if (index as usize) < emit.ids.len() => {}
                ServeEvent::Token { index, .. } if index as usize > emit.ids.len() => {
                    return Err(Attempt::Failed(AttemptFail {
                        failure: Failure::Internal,
                        message: format!(
                            "token {index} came after token {}: a gap in the stream",
                            emit.ids.len()
                        ),
                        engine: engine.to_string(),
                    }));
                }
                ServeEvent::Token { token, text, .. } => {
                    if emit.token(token, &text).await {
                        return Err(Attempt::Stopped(emit.stopped(prompt_len)));
                    }
                }
                ServeEvent::Finished {
                    reason,
                    prompt_tokens,
                    engine_us,
                    ..
                } => {
                    emit.engine_us += engine_us;
                    let finish = match reason {
                        EngineFinish::Length => FinishReason::Length,
                        _ => FinishReason::Stop,
                    };
                    return Ok((finish, emit.usage(prompt_tokens.max(prompt_len))));
                }
                ServeEvent::Failed { failure, message } => {
                    return Err(Attempt::Failed(AttemptFail {
                        failure,
                        message,
                        engine: engine.to_string(),
                    }));
                }
                ServeEvent::Prefilled { .. } | ServeEvent::KvParams { .. } => {}
            }
        }
    }
}

/// How long a request's last answer may wait for a client that stopped reading.
const TERMINAL_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a request's last answer unless the client has stopped reading for
/// `TERMINAL_SEND_TIMEOUT` (the request's slot must come back either way).
async fn send_bounded(tx: &mpsc::Sender<Out>, out: Out) -> bool {
    matches!(
        tokio::time::timeout(TERMINAL_SEND_TIMEOUT, tx.send(out)).await,
        Ok(Ok(()))
    )
}

/// Load of this host's engines, read at `/metrics` time.
fn engine_gauges(s: &Serving) -> Vec<metrics::GaugeSample> {
    let engines = s.control.local_engines();
    let series = |f: fn(&crate::supervisor::EngineReport) -> f64| {
        engines
            .iter()
            .map(|e| (vec![e.engine.clone()], f(e)))
            .collect()
    };
    let view = s.view();
    let seen: Vec<(Vec<String>, f64)> = view
        .models
        .values()
        .flat_map(|m| m.candidates.iter())
        .map(|c| (vec![c.engine.clone()], f64::from(c.queued + c.running)))
        .collect();
    let mut out = vec![
        metrics::GaugeSample {
            name: "pdagent_router_engine_load",
            help: "Requests queued or running in each engine of the cluster, as this agent's router last saw them (reported by the engine's agent).",
            labels: &["engine"],
            values: seen,
            counter: false,
        },
        metrics::GaugeSample {
            name: "pdagent_engine_queue_depth",
            help: "Requests waiting for admission in each engine of this host.",
            labels: &["engine"],
            values: series(|e| f64::from(e.load.queued)),
            counter: false,
        },
        metrics::GaugeSample {
            name: "pdagent_engine_running_requests",
            help: "Requests admitted in each engine of this host.",
            labels: &["engine"],
            values: series(|e| f64::from(e.load.running)),
            counter: false,
        },
        metrics::GaugeSample {
            name: "pdagent_engine_kv_usage_ratio",
            help: "Share of each engine's KV blocks held by live requests.",
            labels: &["engine"],
            values: series(|e| f64::from(e.load.kv_usage)),
            counter: false,
        },
    ];
    out.extend(step_timings(&s.legs.supervisor().engine_stats()));
    out
}

/// The step times each engine of this host measured (its totals since it started), for
/// calibrating the planner (`pdctl bench calibrate`) or a dashboard: prefill-only steps by
/// tokens in the step, decode-only steps by batch and mean context, both bucketed by powers
/// of two (`le` bounds).
fn step_timings(stats: &HashMap<String, pd_engine::EngineStats>) -> Vec<metrics::GaugeSample> {
    let mut p = [Vec::new(), Vec::new(), Vec::new()];
    let mut d = [Vec::new(), Vec::new(), Vec::new()];
    for (engine, s) in stats {
        for t in &s.prefill_timings {
            let l = vec![engine.clone(), t.tokens_max.to_string()];
            p[0].push((l.clone(), t.steps as f64));
            p[1].push((l.clone(), t.tokens_total as f64));
            p[2].push((l, t.seconds_total));
        }
        for t in &s.decode_timings {
            let l = vec![
                engine.clone(),
                t.batch_max.to_string(),
                t.context_tokens_max.to_string(),
            ];
            d[0].push((l.clone(), t.steps as f64));
            d[1].push((l.clone(), t.sequences_total as f64));
            d[2].push((l, t.seconds_total));
        }
    }
    let [p_steps, p_tokens, p_seconds] = p;
    let [d_steps, d_seqs, d_seconds] = d;
    const P: &[&str] = &["engine", "tokens_max"];
    const D: &[&str] = &["engine", "batch_max", "context_tokens_max"];
    let c = |name, help, labels, values| metrics::GaugeSample {
        name,
        help,
        labels,
        values,
        counter: true,
    };
    vec![
        c(
            "pdagent_engine_prefill_steps_total",
            "Prefill-only steps of each engine of this host, by tokens in the step (bucket upper bound).",
            P,
            p_steps,
        ),
        c(
            "pdagent_engine_prefill_step_tokens_total",
            "Prompt tokens computed in those steps.",
            P,
            p_tokens,
        ),
        c(
            "pdagent_engine_prefill_step_seconds_total",
            "Time spent in those steps.",
            P,
            p_seconds,
        ),
        c(
            "pdagent_engine_decode_steps_total",
            "Decode-only steps of each engine of this host, by batch and mean context (bucket upper bounds).",
            D,
            d_steps,
        ),
        c(
            "pdagent_engine_decode_step_sequences_total",
            "Sequences decoded in those steps.",
            D,
            d_seqs,
        ),
        c(
            "pdagent_engine_decode_step_seconds_total",
            "Time spent in those steps.",
            D,
            d_seconds,
        ),
    ]
}

/// Bound on opening a leg on another agent (connecting included).
const LEG_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

enum Attempt {
    /// A stop sequence ended the request.
    Stopped((FinishReason, Usage)),
    Failed(AttemptFail),
}

impl From<AttemptFail> for Attempt {
    fn from(f: AttemptFail) -> Self {
        Attempt::Failed(f)
    }
}

enum Ended {
    Disconnected,
    Error(ApiError),
}

fn api_error(f: &AttemptFail) -> ApiError {
    match f.failure {
        Failure::BadRequest => ApiError::bad_request(&f.message, None),
        Failure::PromptTooLong => ApiError::bad_request(&f.message, Some("prompt")),
        Failure::Busy => ApiError::overloaded(format!("engines are full: {}", f.message), 1),
        Failure::NoEngine | Failure::EngineLost | Failure::KvTransfer | Failure::Unreachable => {
            ApiError::unavailable(
                format!("engine {} failed: {}", f.engine, f.message),
                Some(1),
            )
        }
        Failure::Internal => ApiError::internal(format!("engine {}: {}", f.engine, f.message)),
    }
}

/// A leg's events, from a local task or (through a forwarding task) another agent; reading
/// it is cancel-safe, and dropping it cancels the leg.
enum LegStream {
    Local(mpsc::Receiver<ServeEvent>),
    Remote(mpsc::Receiver<Result<ServeEvent, (Failure, String)>>),
}

/// How often a remote leg checks its node's health while waiting.
const LEG_HEALTH_CHECK: Duration = Duration::from_millis(250);
/// A remote leg silent this long while its node misses heartbeats (suspect) is given up.
const LEG_SILENT_ON_SUSPECT: Duration = Duration::from_secs(1);

impl LegStream {
    /// Forwards a remote leg's events into a channel; when the channel's reader goes away the
    /// stream is dropped, which tells the remote agent to cancel the leg. A node that died
    /// sends nothing, not even a close: the leg is given up as soon as the coordinator marks
    /// the node down, or suspect while the leg is silent, instead of after the transport's
    /// idle timeout.
    fn remote(
        mut s: ResponseStream<AgentResponse>,
        control: Arc<ControlPlane>,
        node: String,
    ) -> LegStream {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut check = tokio::time::interval(LEG_HEALTH_CHECK);
            let mut heard = Instant::now();
            loop {
                let item = tokio::select! {
                    item = s.next() => item,
                    _ = tx.closed() => return,
                    _ = check.tick() => {
                        let health = control.node_health(&node);
                        let silent = heard.elapsed() >= LEG_SILENT_ON_SUSPECT;
                        let gone = match health {
                            Some(pd_raft::NodeHealth::Down) | None => true,
                            Some(pd_raft::NodeHealth::Suspect) => silent,
                            _ => false,
                        };
                        if gone {
                            let why = format!("node {node} stopped answering heartbeats ({health:?})");
                            let _ = tx.send(Err((Failure::Unreachable, why))).await;
                            return;
                        }
                        continue;
                    }
                };
                heard = Instant::now();
                let ev = match item {
                    Ok(Some(AgentResponse::Serve(ev))) => Ok(ev),
                    Ok(Some(other)) => {
                        Err((Failure::Internal, format!("unexpected answer {other:?}")))
                    }
                    Ok(None) => return,
                    Err(e) => Err((Failure::EngineLost, format!("the engine's agent: {e}"))),
                };
                let end = ev.is_err();
                if tx.send(ev).await.is_err() || end {
                    return;
                }
            }
        });
        LegStream::Remote(rx)
    }

    async fn next(&mut self, engine: &str) -> Result<ServeEvent, AttemptFail> {
        let fail = |failure, message: String| AttemptFail {
            failure,
            message,
            engine: engine.to_string(),
        };
        let ended = || {
            fail(
                Failure::EngineLost,
                "the leg ended without an answer".into(),
            )
        };
        match self {
            LegStream::Local(rx) => rx.recv().await.ok_or_else(ended),
            LegStream::Remote(rx) => match rx.recv().await {
                Some(Ok(ev)) => Ok(ev),
                Some(Err((failure, why))) => Err(fail(failure, why)),
                None => Err(ended()),
            },
        }
    }
}

/// Hashes of the prompt's prefix blocks for the router, and its length in tokens (bytes for
/// text: the ingress does not tokenize).
fn prefix_blocks(prompt: &Prompt, block_tokens: u32) -> (Vec<u64>, u32) {
    let bt = block_tokens.max(1) as usize;
    match prompt {
        Prompt::Tokens(t) => (pd_router::token_block_hashes(t, bt), t.len() as u32),
        Prompt::Text(t) => (pd_router::block_hashes(t.as_bytes(), bt), t.len() as u32),
        Prompt::Chat(m) => {
            let mut text = String::new();
            for x in m {
                text.push_str(&x.role);
                text.push('\n');
                text.push_str(&x.content);
                text.push('\n');
            }
            (
                pd_router::block_hashes(text.as_bytes(), bt),
                text.len() as u32,
            )
        }
    }
}

/// Text to the client through the stop matcher; counts tokens and times them.
struct Emitter {
    tx: mpsc::Sender<Out>,
    stop: StopMatcher,
    t0: Instant,
    /// The output token ids sent so far (replayed when the request moves to another engine).
    ids: Vec<u32>,
    /// The engines serving the request, `engine@node`: `prefill -> decode` when
    /// disaggregated, and ` => engine@node` appended for each migration.
    route: String,
    first_at: Option<Duration>,
    last_at: Option<Duration>,
    /// Time in engines so far (see [`Timing`]).
    engine_us: u64,
}

impl Emitter {
    fn new(g: &Generation, tx: mpsc::Sender<Out>, t0: Instant) -> Self {
        Emitter {
            tx,
            stop: StopMatcher::new(&g.stop),
            t0,
            ids: Vec::new(),
            route: String::new(),
            first_at: None,
            last_at: None,
            engine_us: 0,
        }
    }

    /// Records the engines of the attempt now streaming (before its first token).
    fn serving_from(&mut self, engines: String) {
        if self.started() {
            self.route.push_str(" => ");
            self.route.push_str(&engines);
        } else {
            self.route = engines;
        }
    }

    /// Whether anything reached the client (then no transparent retry).
    fn started(&self) -> bool {
        !self.ids.is_empty()
    }

    /// One token's text; true when a stop sequence ended the request.
    async fn token(&mut self, id: u32, text: &str) -> bool {
        let now = self.t0.elapsed();
        if self.first_at.is_none() {
            self.first_at = Some(now);
            let _ = self
                .tx
                .send(Out::FirstToken {
                    route: self.route.clone(),
                })
                .await;
        }
        self.last_at = Some(now);
        self.ids.push(id);
        let (out, stopped) = self.stop.push(text);
        if !out.is_empty() {
            let _ = self.tx.send(Out::Text(out)).await;
        }
        stopped
    }

    fn usage(&self, prompt_tokens: u32) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens: self.ids.len() as u32,
        }
    }

    fn stopped(&self, prompt_tokens: u32) -> (FinishReason, Usage) {
        (FinishReason::Stop, self.usage(prompt_tokens))
    }
}
