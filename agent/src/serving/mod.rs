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
pub mod attempt;
mod gauges;
pub mod http_legs;
pub mod ingress;
mod journey;
pub mod legs;
pub mod metrics;
mod remote;
mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pd_openai::{ApiError, FinishReason, Generation, Usage};
use pd_router::{Role, Router, RouterConfig};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::control::ControlPlane;
use crate::coordinator::Coordinator;
use crate::peers::Peers;
use legs::Legs;
use metrics::Metrics;
use view::{OpenCircuit, View};

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

impl ServingConfig {
    /// The serving path's settings from `[serving]`.
    pub fn of(s: &crate::config::ServingSection) -> ServingConfig {
        ServingConfig {
            inflight_max: s.inflight_max as usize,
            body_bytes_max: s.body_bytes_max as usize,
            header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
            connections_max: s.connections_max as usize,
            kv: legs::KvLimits {
                inbox_bytes_max: s.kv_inbox_bytes_max,
                unclaimed: Duration::from_millis(s.kv_unclaimed_ms),
                stall: Duration::from_millis(s.kv_stall_timeout_ms),
                link_floor_bytes_per_s: s.kv_link_floor_mbit_s * 1_000_000 / 8,
                wait: Duration::from_millis(s.request_timeout_ms),
            },
            max_tokens_default: s.max_tokens_default,
            max_tokens_max: s.max_tokens_max,
            request_timeout: Duration::from_millis(s.request_timeout_ms),
            retries: s.retries,
            migrations: s.migrations,
            circuit_open: Duration::from_millis(s.circuit_open_ms),
            view_refresh: Duration::from_millis(s.view_refresh_ms),
            router: RouterConfig {
                policy: s.policy.parse().unwrap_or(pd_router::Policy::Cost),
                short_prompt_tokens: s.short_prompt_tokens,
                ..RouterConfig::default()
            },
        }
    }
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
    /// Shipping the KV, from the first piece to the last acknowledgement (overlaps the
    /// prefill's engine time), and its payload bytes; 0 when no KV was shipped.
    pub kv_us: u64,
    pub kv_bytes: u64,
}

impl Timing {
    /// In agent code: ingress, routing, transport, KV shipping, forwarding.
    pub fn agent_us(&self) -> u64 {
        self.total_us.saturating_sub(self.engine_us)
    }
}

pub struct Serving {
    node: String,
    cfg: ServingConfig,
    control: Arc<ControlPlane>,
    coordinator: Arc<Coordinator>,
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

impl Serving {
    pub fn new(
        cfg: ServingConfig,
        control: Arc<ControlPlane>,
        coordinator: Arc<Coordinator>,
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
            coordinator,
            peers,
            legs,
            metrics,
            view: RwLock::new(Arc::new(View::default())),
            inflight: Mutex::new(HashMap::new()),
            open_circuits: Mutex::new(HashMap::new()),
            kv_moved_counted: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            boot: crate::util::now_unix().max(0) as u64,
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
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                this.journey(generation, tx, received).await;
                drop(admission);
            }
            .instrument(span),
        );
        Ok(rx)
    }
}
