//! A request's life on its ingress agent: route, open the legs, stream the tokens through the
//! stop matcher, and on a failure ask the attempt policy (`attempt`) whether to retry, move
//! or end; exactly one `Done` or `Error` ends every answer.

use std::time::{Duration, Instant};

use pd_engine::{FinishReason as EngineFinish, Prompt, SamplingParams};
use pd_openai::{ApiError, FinishReason, Generation, PromptInput, StopMatcher, Usage};
use pd_router::{Candidate, Engines};
use tokio::sync::mpsc;

use crate::wire::legs::{
    DecodeLeg, EngineKvDecodeLeg, Failure, GenerateLeg, Leg, PrefillLeg, ServeEvent,
};

use super::attempt::{
    AttemptFail, Attempts, Ended, Next, opens_circuit, retry_excluded_when_alone,
};
use super::remote::LegStream;
use super::view::prefix_blocks;
use super::{Out, Serving, Timing, http_legs};

impl Serving {
    pub(super) async fn journey(&self, g: Generation, tx: mpsc::Sender<Out>, t0: Instant) {
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
                let mut tpot = None;
                if let Some(first) = emit.first_at {
                    self.metrics.ttft.observe(model, first.as_secs_f64());
                    if usage.completion_tokens > 1
                        && let Some(last) = emit.last_at
                    {
                        let t =
                            (last - first).as_secs_f64() / f64::from(usage.completion_tokens - 1);
                        self.metrics.tpot.observe(model, t);
                        tpot = Some(t);
                    }
                }
                self.metrics
                    .prompt_len
                    .observe(model, f64::from(usage.prompt_tokens));
                self.metrics
                    .output_len
                    .observe(model, f64::from(usage.completion_tokens));
                let targets = self.control.read_state(|s| {
                    let d = s.deployments.get(model)?;
                    Some((d.ttft_ms?, d.tpot_ms?))
                });
                if let Some(targets) = targets {
                    let result = if within_slo(emit.first_at, tpot, targets) {
                        "within"
                    } else {
                        "missed"
                    };
                    self.metrics.slo.inc(&[model, result]);
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
                    kv_us: emit.kv.map_or(0, |k| (k.ms * 1e3) as u64),
                    kv_bytes: emit.kv.map_or(0, |k| k.bytes),
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
            ignore_eos: g.ignore_eos,
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
        let mut attempts = Attempts::new(self.cfg.retries, self.cfg.migrations);
        let mut previous: Option<AttemptFail> = None;
        let mut second_chance = true;
        loop {
            let (decision, candidates) =
                match self.route(&g.model, &blocks, prompt_tokens, &excluded) {
                    Ok(r) => r,
                    // Only the engines that failed are left: after a KV transfer failure they
                    // get one more try (see `retry_excluded_when_alone`).
                    Err(_)
                        if second_chance
                            && !excluded.is_empty()
                            && previous
                                .as_ref()
                                .is_some_and(|f| retry_excluded_when_alone(f.failure)) =>
                    {
                        second_chance = false;
                        excluded.clear();
                        continue;
                    }
                    // Nothing left to retry on: the failure that made us retry says more.
                    Err(e) => return Err(previous.map_or(e, |f| Ended::Error(api_error(&f)))),
                };
            // One token needs no decode engine's KV: the decode engine computes it alone
            // (nothing shipped, no decode slot reserved for nothing).
            let engines = match decision.engines {
                Engines::Disaggregated { decode, .. } if sampling.max_tokens <= 1 => {
                    Engines::DecodeOnly { decode }
                }
                e => e,
            };
            let result = if emit.started() {
                // A move after the first token: a decode-capable engine recomputes the prompt
                // and the tokens so far, and continues.
                self.metrics.routing.inc(&["migration"]);
                let e = &candidates[decision.decode()];
                self.generate(e, &prompt, &sampling, emit).await
            } else {
                self.metrics.routing.inc(&[engines.kind().as_str()]);
                match engines {
                    Engines::Disaggregated { prefill, decode } => {
                        let (p, d) = (&candidates[prefill], &candidates[decode]);
                        let engine_kv = self
                            .view()
                            .models
                            .get(&g.model)
                            .is_some_and(|m| m.engine_kv);
                        if engine_kv {
                            self.engine_kv(p, d, &prompt, &sampling, emit).await
                        } else {
                            self.disaggregated(p, d, &prompt, &sampling, emit).await
                        }
                    }
                    Engines::DecodeOnly { decode: e } | Engines::Colocated { engine: e } => {
                        self.generate(&candidates[e], &prompt, &sampling, emit)
                            .await
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
                    if opens_circuit(f.failure) {
                        self.open_circuit(&f.engine);
                    }
                    let replay_exact = self.view().models.get(&g.model).is_some_and(|m| m.resume);
                    match attempts.after(f.failure, emit.started(), replay_exact) {
                        Next::Fail => return Err(Ended::Error(api_error(&f))),
                        next => {
                            let what = next.label();
                            tracing::info!(engine = %f.engine, failure = ?f.failure, error = %f.message, tokens_so_far = emit.ids.len(), "{what}: the request goes on on other engines");
                            self.metrics.recoveries.inc(&[&g.model, what]);
                            excluded.push(f.engine.clone());
                            previous = Some(f);
                        }
                    }
                }
            }
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
            self.open_leg(p, prefill_leg(p, d, prompt, sampling, shipment)),
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
                    let path = if p.node == d.node { "host" } else { "network" };
                    self.kv_shipped(emit, path, pieces, kv_bytes, kv_ms);
                    emit.serving_from(pair_route(p, d, emit.kv));
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
        tracing::info!(shipment = %crate::kv::bridge::shipment_hex(shipment), prefill = %p.engine, decode = %d.engine, "disaggregated attempt");
        let mut pre = self
            .open_leg(p, prefill_leg(p, d, prompt, sampling, shipment))
            .await?;
        let (params, prompt_len) = loop {
            match pre.next(&p.engine).await? {
                ServeEvent::KvShipped {
                    pieces,
                    kv_bytes,
                    kv_ms,
                    tail_ms,
                    network,
                } => {
                    let path = if network { "network" } else { "host" };
                    self.kv_shipped(emit, path, pieces, kv_bytes, kv_ms);
                    self.metrics.kv_tail.observe(path, tail_ms / 1e3);
                }
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
        emit.serving_from(pair_route(p, d, emit.kv));
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
                ServeEvent::Prefilled { .. }
                | ServeEvent::KvParams { .. }
                | ServeEvent::KvShipped { .. } => {}
            }
        }
    }
}

/// The route of a disaggregated attempt: `prefill@node -> decode@node`, with what its KV
/// shipment moved between them when the agent shipped it (`-[kv B bytes, N pieces, T ms]->`).
fn pair_route(p: &Candidate, d: &Candidate, kv: Option<KvTotals>) -> String {
    match kv {
        Some(k) => format!(
            "{}@{} -[kv {} bytes, {} pieces, {:.1} ms]-> {}@{}",
            p.engine, p.node, k.bytes, k.pieces, k.ms, d.engine, d.node
        ),
        None => format!("{}@{} -> {}@{}", p.engine, p.node, d.engine, d.node),
    }
}

/// What a request's KV shipment moved.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct KvTotals {
    pub bytes: u64,
    pub pieces: u64,
    pub ms: f64,
}

impl Serving {
    /// Records a shipment of an attempt: the request's totals, and the histograms.
    fn kv_shipped(&self, emit: &mut Emitter, path: &str, pieces: u64, bytes: u64, ms: f64) {
        emit.kv = Some(KvTotals { bytes, pieces, ms });
        self.metrics.kv_transfer.observe(path, ms / 1e3);
        self.metrics.kv_shipment_bytes.observe(path, bytes as f64);
        if ms > 0.0 {
            self.metrics
                .kv_throughput
                .observe(path, bytes as f64 / (ms / 1e3));
        }
    }
}

/// The prefill leg of a disaggregated attempt: `p` computes the prompt for `d`'s host.
fn prefill_leg(
    p: &Candidate,
    d: &Candidate,
    prompt: &Prompt,
    sampling: &SamplingParams,
    shipment: u64,
) -> Leg {
    Leg::Prefill(PrefillLeg {
        engine: p.engine.clone(),
        prompt: prompt.clone(),
        sampling: sampling.clone(),
        decode_node: d.node.clone(),
        shipment,
    })
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

pub(super) enum Attempt {
    /// A stop sequence ended the request.
    Stopped((FinishReason, Usage)),
    Failed(AttemptFail),
}

impl From<AttemptFail> for Attempt {
    fn from(f: AttemptFail) -> Self {
        Attempt::Failed(f)
    }
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

/// Text to the client through the stop matcher; counts tokens and times them.
pub(super) struct Emitter {
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
    /// The KV shipment of the attempt that streams.
    kv: Option<KvTotals>,
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
            kv: None,
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

/// Whether a finished request met both targets (`(ttft_ms, tpot_ms)`): its first token within
/// the TTFT target (none at all misses it) and its mean time per output token after the first
/// within the TPOT target (a request of one token has none, and meets it).
pub(super) fn within_slo(
    first: Option<Duration>,
    tpot_s: Option<f64>,
    targets: (u32, u32),
) -> bool {
    let (ttft_ms, tpot_ms) = targets;
    first.is_some_and(|f| f.as_secs_f64() * 1e3 <= f64::from(ttft_ms))
        && tpot_s.is_none_or(|t| t * 1e3 <= f64::from(tpot_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_meets_its_targets_only_when_it_meets_both() {
        let ms = Duration::from_millis;
        let targets = (500, 50);
        assert!(within_slo(Some(ms(500)), Some(0.050), targets));
        assert!(!within_slo(Some(ms(501)), Some(0.010), targets));
        assert!(!within_slo(Some(ms(100)), Some(0.051), targets));
        // One output token: no time per token to miss.
        assert!(within_slo(Some(ms(100)), None, targets));
        // No first token recorded: missed.
        assert!(!within_slo(None, None, targets));
    }
}
