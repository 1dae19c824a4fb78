//! This agent's view of the cluster's engines for routing: refreshed from the coordinator's
//! engine reports, with the requests this agent has in flight on each and the circuits of
//! engines that failed a leg; and the router's choice over it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use pd_engine::Prompt;
use pd_openai::ApiError;
use pd_router::{Candidate, Decision, Role};

use crate::util::{Unpoisoned, UnpoisonedRw};
use crate::wire::EngineState;

use super::Serving;
use super::attempt::Ended;

/// One deployment as this agent's router sees it.
#[derive(Debug, Clone, Default)]
pub(super) struct ModelView {
    pub(super) created: u64,
    pub(super) candidates: Vec<Candidate>,
    /// The deployment's driver continues a stream from the prompt and the tokens so far:
    /// migration is allowed.
    pub(super) resume: bool,
    /// Its engines move their own KV (vLLM's two-step flow).
    pub(super) engine_kv: bool,
}

#[derive(Debug, Default)]
pub(super) struct View {
    pub(super) models: BTreeMap<String, ModelView>,
    /// SHA-256 (hex) of the cluster's API keys.
    pub(super) api_keys: std::collections::HashSet<String>,
    /// Whether a key is asked for (the cluster's `api_keys_required`).
    pub(super) keys_required: bool,
    /// Each engine's incarnation (node, pid, restarts), to tell a restarted engine from the
    /// one that failed.
    pub(super) incarnations: HashMap<String, Incarnation>,
}

pub(super) type Incarnation = (String, Option<u32>, u32);

/// An engine that failed a leg: not chosen until `until`, or until another incarnation of it
/// is ready (restarted, or placed on another host).
pub(super) struct OpenCircuit {
    pub(super) until: Instant,
    pub(super) failed: Option<Incarnation>,
}

/// Counts a request on an engine while it lives.
pub(super) struct InflightGuard<'a> {
    pub(super) serving: &'a Serving,
    pub(super) engine: String,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut m = self.serving.inflight.locked();
        if let Some(n) = m.get_mut(&self.engine) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Serving {
    pub(super) async fn refresh(&self) {
        let state = self.control.state_snapshot();
        let engines = self.coordinator.cluster_engines().await;
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
        // An engine that is gone or another process now (restarted, or a deployment made again
        // under the same ids) holds none of what the router believed it cached.
        let stale: Vec<String> = self
            .view()
            .incarnations
            .iter()
            .filter(|(engine, was)| incarnations.get(*engine) != Some(*was))
            .map(|(engine, _)| engine.clone())
            .collect();
        if !stale.is_empty() {
            let mut router = self.router.locked();
            for engine in &stale {
                router.forget_engine(engine);
            }
        }
        *self.view.write_locked() = Arc::new(View {
            models,
            api_keys,
            keys_required: state.api_keys_required,
            incarnations,
        });
        // An engine that failed and is ready again as another incarnation is taken back now.
        let mut open = self.open_circuits.locked();
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
        let open = self.open_circuits.locked();
        let now = Instant::now();
        m.candidates
            .iter()
            .filter(|c| c.available && open.get(&c.engine).is_none_or(|o| o.until <= now))
            .count() as u32
    }

    pub(super) fn view(&self) -> Arc<View> {
        self.view.read_locked().clone()
    }

    pub(super) fn open_circuit(&self, engine: &str) {
        let failed = self.view().incarnations.get(engine).cloned();
        self.open_circuits.locked().insert(
            engine.to_string(),
            OpenCircuit {
                until: Instant::now() + self.cfg.circuit_open,
                failed,
            },
        );
        self.router.locked().forget_engine(engine);
    }

    pub(super) fn route(
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
            let inflight = self.inflight.locked();
            let mut open = self.open_circuits.locked();
            let now = Instant::now();
            open.retain(|_, c| c.until > now);
            for c in &mut candidates {
                c.inflight = inflight.get(&c.engine).copied().unwrap_or(0);
                if open.contains_key(&c.engine) || excluded.contains(&c.engine) {
                    c.available = false;
                }
            }
        }
        let mut router = self.router.locked();
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

    pub(super) fn count(&self, engine: &str) -> InflightGuard<'_> {
        *self
            .inflight
            .locked()
            .entry(engine.to_string())
            .or_insert(0) += 1;
        InflightGuard {
            serving: self,
            engine: engine.to_string(),
        }
    }
}

/// Hashes of the prompt's prefix blocks for the router, and its length in tokens (bytes for
/// text: the ingress does not tokenize).
pub(super) fn prefix_blocks(prompt: &Prompt, block_tokens: u32) -> (Vec<u64>, u32) {
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
