//! Legs on engines that serve OpenAI HTTP and move their own KV (vLLM with NixlConnector):
//! the agent only translates between the serving path's events and the engine's HTTP API.
//!
//! - Prefill: the request with `max_tokens` 1, not streaming, and `kv_transfer_params`
//!   asking for a remote decode; the engine's answer carries the `kv_transfer_params` a decode
//!   engine needs, which go back to the ingress as opaque JSON (`ServeEvent::KvParams`). With
//!   pdagent's connector the agent ships the KV meanwhile (`Legs::agent_kv_prefill`).
//! - Decode: the request again, streaming, with those `kv_transfer_params` and the same
//!   `X-Request-Id`; the decode engine pulls the KV (NIXL) or takes it from its agent
//!   (pdagent's connector), and streams every output token.
//! - Generate: the request on one engine (colocated, a short prompt on a decode engine, or a
//!   stream moved after its first token: the prompt is tokenized by the engine and sent as
//!   token ids with the tokens the client already has).
//!
//! Each output token becomes a `ServeEvent::Token` with its id (`return_token_ids`); dropping
//! the leg drops the HTTP request, and vLLM aborts a request whose client went away.

use std::time::Instant;

use pd_engine::{FinishReason, Prompt, SamplingParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::driver::HttpEngine;
use crate::driver::http;
use crate::wire::legs::{Failure, GenerateLeg, PrefillLeg, ServeEvent};

/// Ends a leg with a failure.
pub struct HttpFail(pub Failure, pub String);

type Events = mpsc::Sender<ServeEvent>;

/// The `X-Request-Id` of a disaggregated request's two legs.
pub fn request_id(shipment: u64) -> String {
    format!("pd-{}", crate::kv::bridge::shipment_hex(shipment))
}

/// The OpenAI body for `prompt` and `sampling` on `engine`, and its path.
fn body(engine: &HttpEngine, prompt: &Prompt, sampling: &SamplingParams) -> (&'static str, Value) {
    let mut b = json!({
        "model": engine.served_name,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        // vLLM takes a signed 64-bit seed.
        "seed": sampling.seed & (i64::MAX as u64),
        "return_token_ids": true,
    });
    if sampling.ignore_eos {
        b["ignore_eos"] = json!(true);
    }
    if !sampling.stop_token_ids.is_empty() {
        b["stop_token_ids"] = json!(sampling.stop_token_ids);
    }
    let path = match prompt {
        Prompt::Text(t) => {
            b["prompt"] = json!(t);
            "/v1/completions"
        }
        Prompt::Tokens(t) => {
            b["prompt"] = json!(t);
            "/v1/completions"
        }
        Prompt::Chat(m) => {
            b["messages"] = m
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            b["max_completion_tokens"] = json!(sampling.max_tokens);
            "/v1/chat/completions"
        }
    };
    (path, b)
}

/// What an error answer means for the request.
fn failure_of(a: &http::Answer) -> HttpFail {
    let message = a
        .json()
        .ok()
        .and_then(|v| {
            v["error"]["message"]
                .as_str()
                .or(v["message"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| a.text());
    let failure = match a.status {
        0 => Failure::EngineLost,
        400 | 422 if message.contains("context length") || message.contains("too long") => {
            Failure::PromptTooLong
        }
        400 | 422 => Failure::BadRequest,
        404 => Failure::NoEngine,
        429 | 503 => Failure::Busy,
        _ => Failure::EngineLost,
    };
    HttpFail(
        failure,
        format!("the engine answered {}: {message}", a.status),
    )
}

/// What a prefill engine answered.
pub struct Prefilled {
    /// Its `kv_transfer_params`, for the decode engine.
    pub params: Value,
    pub prompt_tokens: u32,
    /// From the request's submission to the engine until its answer was read.
    pub engine_us: u64,
}

/// The `kv_transfer_params` that ask NixlConnector for a remote decode.
pub fn nixl_params() -> Value {
    json!({
        "do_remote_decode": true,
        "do_remote_prefill": false,
        "remote_engine_id": null,
        "remote_block_ids": null,
        "remote_host": null,
        "remote_port": null,
    })
}

/// Prefill: computes the prompt's KV with `kv_params` telling the engine's connector where it
/// goes. `None` when the reader went away (the request was dropped, which aborts it in the
/// engine).
pub async fn prefill(
    engine: &HttpEngine,
    leg: &PrefillLeg,
    kv_params: Value,
    tx: &Events,
) -> Result<Option<Prefilled>, HttpFail> {
    let sampling = SamplingParams {
        max_tokens: 1,
        ..leg.sampling.clone()
    };
    let (path, mut b) = body(engine, &leg.prompt, &sampling);
    b["stream"] = json!(false);
    b["kv_transfer_params"] = kv_params;
    let id = request_id(leg.shipment);
    let headers = [("x-request-id", id.as_str())];
    let submitted = Instant::now();
    let answer = tokio::select! {
        a = http::post_json(engine.port, path, &headers, &b) => a,
        _ = tx.closed() => return Ok(None),
    };
    let a = answer.map_err(|e| HttpFail(Failure::EngineLost, e))?;
    if a.status != 200 {
        return Err(failure_of(&a));
    }
    let v = a
        .json()
        .map_err(|e| HttpFail(Failure::Internal, format!("the prefill engine: {e}")))?;
    let params = v["kv_transfer_params"].clone();
    if !params.is_object() {
        return Err(HttpFail(
            Failure::Internal,
            "the prefill engine gave no kv_transfer_params (is its KV connector configured?)"
                .into(),
        ));
    }
    Ok(Some(Prefilled {
        params,
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32,
        engine_us: submitted.elapsed().as_micros() as u64,
    }))
}

/// Tells the ingress what the decode engine needs; false when it went away.
pub async fn send_params(p: Prefilled, tx: &Events) -> bool {
    tx.send(ServeEvent::KvParams {
        params: p.params.to_string(),
        prompt_tokens: p.prompt_tokens,
        engine_us: p.engine_us,
    })
    .await
    .is_ok()
}

/// Generates on one engine, streaming: a plain request, a decode with the prefill's
/// `kv_transfer_params` (and its request id), or a resumed stream (`leg.resume`). Ok(false)
/// when the reader went away.
pub async fn generate(
    engine: &HttpEngine,
    leg: GenerateLeg,
    remote: Option<(String, String)>,
    tx: &Events,
) -> Result<bool, HttpFail> {
    let submitted = Instant::now();
    let resumed = leg.resume.len() as u32;
    let (path, mut b) = if leg.resume.is_empty() {
        body(engine, &leg.prompt, &leg.sampling)
    } else {
        // The prompt as the engine tokenizes it, then the tokens the client already has.
        let mut ids = tokenize(engine, &leg.prompt).await?;
        ids.extend_from_slice(&leg.resume);
        let sampling = SamplingParams {
            max_tokens: leg.sampling.max_tokens.saturating_sub(resumed).max(1),
            ..leg.sampling.clone()
        };
        body(engine, &Prompt::Tokens(ids), &sampling)
    };
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let mut headers = Vec::new();
    if let Some((params, id)) = &remote {
        b["kv_transfer_params"] = serde_json::from_str(params).map_err(|e| {
            HttpFail(
                Failure::Internal,
                format!("kv_transfer_params are not JSON: {e}"),
            )
        })?;
        headers.push(("x-request-id", id.as_str()));
    }
    let mut events = tokio::select! {
        r = http::post_events(engine.port, path, &headers, &b) => r.map_err(|a| failure_of(&a))?,
        _ = tx.closed() => return Ok(false),
    };
    let mut index = resumed;
    let mut finish: Option<FinishReason> = None;
    let mut prompt_tokens = 0u32;
    loop {
        let data = tokio::select! {
            d = events.next() => d.map_err(|e| HttpFail(Failure::EngineLost, e))?,
            _ = tx.closed() => return Ok(false),
        };
        let Some(data) = data else {
            return Err(HttpFail(
                Failure::EngineLost,
                "the engine's stream ended without [DONE]".into(),
            ));
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).map_err(|e| {
            HttpFail(
                Failure::Internal,
                format!("an event that is not JSON ({e}): {data}"),
            )
        })?;
        if let Some(e) = v.get("error") {
            let message = e["message"].as_str().unwrap_or("unknown error").to_string();
            return Err(HttpFail(
                Failure::EngineLost,
                format!("the engine failed mid-stream: {message}"),
            ));
        }
        if let Some(p) = v["usage"]["prompt_tokens"].as_u64() {
            prompt_tokens = p as u32;
        }
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        // Completions give the prompt's ids in the first chunk's choice, chat at the top.
        if let Some(p) = choice["prompt_token_ids"]
            .as_array()
            .or(v["prompt_token_ids"].as_array())
            && prompt_tokens == 0
        {
            prompt_tokens = p.len() as u32;
            let _ = tx.send(ServeEvent::Admitted { prompt_tokens }).await;
        }
        let text = choice["text"]
            .as_str()
            .or(choice["delta"]["content"].as_str())
            .unwrap_or_default();
        let ids: Vec<u32> = choice["token_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() && !text.is_empty() {
            return Err(HttpFail(
                Failure::Internal,
                "the engine sent text without token ids (return_token_ids unsupported?)".into(),
            ));
        }
        // A chunk may carry several tokens: the text goes with the first.
        for (k, token) in ids.iter().enumerate() {
            let ev = ServeEvent::Token {
                index,
                token: *token,
                text: if k == 0 {
                    text.to_string()
                } else {
                    String::new()
                },
            };
            index += 1;
            if tx.send(ev).await.is_err() {
                return Ok(false);
            }
        }
        match choice["finish_reason"].as_str() {
            Some("length") => finish = Some(FinishReason::Length),
            Some("abort") => {
                return Err(HttpFail(
                    Failure::EngineLost,
                    "the engine aborted the request".into(),
                ));
            }
            Some(_) => finish = Some(FinishReason::Stop),
            None => {}
        }
    }
    let Some(reason) = finish else {
        return Err(HttpFail(
            Failure::EngineLost,
            "the engine's stream ended without a finish reason".into(),
        ));
    };
    let _ = tx
        .send(ServeEvent::Finished {
            reason,
            prompt_tokens: prompt_tokens.saturating_sub(resumed),
            prompt_tokens_cached: 0,
            output_tokens: index,
            engine_us: submitted.elapsed().as_micros() as u64,
        })
        .await;
    Ok(true)
}

/// The prompt's token ids as the engine makes them (`/tokenize`, chat template applied).
async fn tokenize(engine: &HttpEngine, prompt: &Prompt) -> Result<Vec<u32>, HttpFail> {
    let b = match prompt {
        Prompt::Tokens(t) => return Ok(t.clone()),
        Prompt::Text(t) => json!({"model": engine.served_name, "prompt": t}),
        Prompt::Chat(m) => json!({
            "model": engine.served_name,
            "messages": m.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "add_generation_prompt": true,
        }),
    };
    let a = http::post_json(engine.port, "/tokenize", &[], &b)
        .await
        .map_err(|e| HttpFail(Failure::EngineLost, e))?;
    if a.status != 200 {
        return Err(failure_of(&a));
    }
    let v = a
        .json()
        .map_err(|e| HttpFail(Failure::Internal, format!("/tokenize: {e}")))?;
    v["tokens"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .ok_or_else(|| HttpFail(Failure::Internal, format!("/tokenize answered {v}")))
}
