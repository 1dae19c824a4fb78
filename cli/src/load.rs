//! A load generator for the OpenAI API, for `pdctl demo` and `pdctl bench serve`: streaming
//! completions over plain HTTP/1.1 (one connection per request, as most clients do), each
//! token's arrival timed at the client. Prompts come from a fixed seed, so two runs send the
//! same requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// One request of a workload.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub prompt: String,
    pub max_tokens: u32,
    /// Seconds after the start at which it is sent (open loop); ignored by closed loops.
    pub at_s: f64,
    /// Generate `max_tokens` whatever the model says (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

/// What the client saw of one request.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub ok: bool,
    pub error: Option<String>,
    /// The failure was told with OpenAI's error body (HTTP status, or an SSE error event once
    /// streaming), not a stream cut short.
    pub explicit: bool,
    /// The text streamed.
    pub text: String,
    /// No answer came within the load's bound (see [`open_loop`]).
    pub hung: bool,
    /// Which agent it was sent to.
    pub ingress: usize,
    pub ttft: Duration,
    /// Mean time between tokens after the first (None with one token).
    pub tpot: Option<Duration>,
    pub e2e: Duration,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// A small seeded generator (splitmix64): the same seed gives the same prompts everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "cluster", "engine", "token", "prefill", "decode", "cache", "river", "mountain", "quiet",
    "signal", "garden", "copper", "lantern", "harbor", "meadow", "pattern", "window", "orbit",
    "thunder", "velvet", "summit", "canyon", "ember", "glacier", "marble", "willow", "falcon",
    "compass", "horizon", "beacon",
];

/// Text of about `bytes` bytes (one token per byte with the presets' byte tokenizer).
pub fn text(rng: &mut Rng, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        s.push_str(WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]);
        s.push(' ');
    }
    s.truncate(bytes);
    s
}

/// The demo's mixed workload: `n` requests alternating short prompts (~`short` bytes) and long
/// ones (~`long` bytes; every other long prompt starts with the same shared prefix, as requests
/// with one system prompt do).
pub fn mixed(n: usize, short: usize, long: usize, max_tokens: u32, seed: u64) -> Vec<LoadRequest> {
    let mut rng = Rng::new(seed);
    let shared = text(&mut rng, long / 2);
    (0..n)
        .map(|i| {
            let prompt = if i % 2 == 0 {
                text(&mut rng, short)
            } else if i % 4 == 1 {
                format!("{shared}{}", text(&mut rng, long - long / 2))
            } else {
                text(&mut rng, long)
            };
            LoadRequest {
                ignore_eos: false,
                prompt,
                max_tokens,
                at_s: 0.0,
            }
        })
        .collect()
}

/// `POST /v1/completions` with a JSON body on a new connection (as most clients do).
pub async fn post_completion(
    addr: SocketAddr,
    body: String,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    post_completion_with(addr, body, None).await
}

/// `POST /v1/completions`, with `X-Request-Id` when given.
async fn post_completion_with(
    addr: SocketAddr,
    body: String,
    request_id: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::post("/v1/completions")
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(id) = request_id {
        req = req.header("x-request-id", id);
    }
    let req = req.body(Full::new(Bytes::from(body)))?;
    Ok(sender.send_request(req).await?)
}

/// Sends one streaming completion and times its tokens.
pub async fn one(addr: SocketAddr, model: &str, r: &LoadRequest, seed: u64) -> Outcome {
    let t0 = Instant::now();
    match send(addr, model, r, seed, t0).await {
        Ok(o) => o,
        Err(e) => Outcome {
            ok: false,
            error: Some(format!("{e:#}")),
            e2e: t0.elapsed(),
            ..Outcome::default()
        },
    }
}

/// The streaming completion body the load sends.
pub fn stream_body(model: &str, r: &LoadRequest, seed: u64) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "prompt": r.prompt,
        "max_tokens": r.max_tokens,
        "temperature": 0,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": r.ignore_eos,
    })
}

async fn send(
    addr: SocketAddr,
    model: &str,
    r: &LoadRequest,
    seed: u64,
    t0: Instant,
) -> Result<Outcome> {
    stream_timed(addr, stream_body(model, r, seed), None, t0).await
}

/// A non-streaming `POST /v1/completions` with `X-Request-Id`: the JSON answer.
pub async fn post_with_id(
    addr: SocketAddr,
    body: serde_json::Value,
    request_id: &str,
) -> Result<serde_json::Value> {
    let resp = post_completion_with(addr, body.to_string(), Some(request_id)).await?;
    let status = resp.status();
    let b = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&b));
    }
    Ok(serde_json::from_slice(&b)?)
}

/// `POST /v1/completions` with a streaming `body` (and `X-Request-Id` when given), each token
/// timed from `t0`.
pub async fn stream_timed(
    addr: SocketAddr,
    body: serde_json::Value,
    request_id: Option<&str>,
    t0: Instant,
) -> Result<Outcome> {
    let resp = post_completion_with(addr, body.to_string(), request_id).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let b = body.collect().await?.to_bytes();
        let explicit = serde_json::from_slice::<serde_json::Value>(&b)
            .is_ok_and(|v| v["error"]["message"].is_string());
        return Ok(Outcome {
            error: Some(format!("{status}: {}", String::from_utf8_lossy(&b))),
            explicit,
            e2e: t0.elapsed(),
            ..Outcome::default()
        });
    }
    let mut text = String::new();
    let mut buf = Vec::new();
    let mut first: Option<Duration> = None;
    let mut last = Duration::ZERO;
    let mut usage: Option<(u32, u32)> = None;
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(payload) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if payload == "[DONE]" {
                done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(payload)?;
            if let Some(e) = v.get("error") {
                return Ok(Outcome {
                    error: Some(format!("stream failed: {e}")),
                    explicit: e["message"].is_string(),
                    text,
                    e2e: t0.elapsed(),
                    ..Outcome::default()
                });
            }
            if let Some(t) = v["choices"][0]["text"].as_str() {
                text.push_str(t);
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                usage = Some((
                    u["prompt_tokens"].as_u64().unwrap_or(0) as u32,
                    u["completion_tokens"].as_u64().unwrap_or(0) as u32,
                ));
            }
            // The first chunk with a choice is the first token, even one that ended the
            // sequence with no text.
            if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
                let now = t0.elapsed();
                first.get_or_insert(now);
                if carries_tokens(c) {
                    last = now;
                }
            }
        }
    }
    if !done {
        bail!("the stream ended without [DONE]");
    }
    let (prompt_tokens, output_tokens) = usage.context("no usage in the stream")?;
    let ttft = first.unwrap_or(last);
    // Time per token uses the token count from usage (a stop matcher may hold text back).
    Ok(Outcome {
        ok: true,
        error: None,
        explicit: false,
        text,
        hung: false,
        ingress: 0,
        ttft,
        tpot: (output_tokens > 1).then(|| last.saturating_sub(ttft) / (output_tokens - 1)),
        e2e: t0.elapsed(),
        prompt_tokens,
        output_tokens,
    })
}

/// Whether a streamed completion choice brought output: one still going, or the last one
/// with text (an engine that ran ahead of its reader sends several tokens, and the finish,
/// in one chunk).
fn carries_tokens(choice: &serde_json::Value) -> bool {
    choice["finish_reason"].is_null() || choice["text"].as_str().is_some_and(|t| !t.is_empty())
}

/// Sends `requests` with at most `concurrency` in flight, round-robin over the agents.
pub async fn closed_loop(
    agents: &[SocketAddr],
    model: &str,
    requests: &[LoadRequest],
    concurrency: usize,
    seed: u64,
) -> Vec<Outcome> {
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let agents_n = agents.len();
    let mut tasks = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let permit = slots.clone().acquire_owned().await.expect("open");
        let (addr, model, r) = (agents[i % agents.len()], model.to_string(), r.clone());
        tasks.push(tokio::spawn(async move {
            let mut o = one(addr, &model, &r, seed.wrapping_add(i as u64)).await;
            o.ingress = i % agents_n;
            drop(permit);
            o
        }));
    }
    collect(tasks).await
}

/// Sends each request at its `at_s` (open loop), round-robin over the agents. A request
/// without its end after `give_up` is abandoned and counted as hung.
pub async fn open_loop(
    agents: &[SocketAddr],
    model: &str,
    requests: &[LoadRequest],
    seed: u64,
    give_up: Duration,
) -> Vec<Outcome> {
    let start = tokio::time::Instant::now();
    let agents_n = agents.len();
    let mut tasks = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(r.at_s)).await;
        let (addr, model, r) = (agents[i % agents.len()], model.to_string(), r.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let mut o =
                tokio::time::timeout(give_up, one(addr, &model, &r, seed.wrapping_add(i as u64)))
                    .await
                    .unwrap_or_else(|_| Outcome {
                        error: Some(format!("no end within {} s", give_up.as_secs())),
                        hung: true,
                        e2e: sent.elapsed(),
                        ..Outcome::default()
                    });
            o.ingress = i % agents_n;
            o
        }));
    }
    collect(tasks).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Outcome {
            error: Some(e.to_string()),
            ..Outcome::default()
        }));
    }
    out
}

/// Percentile (nearest rank) of durations in milliseconds.
pub fn percentile_ms(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * ms.len() as f64).ceil() as usize;
    ms[rank.clamp(1, ms.len()) - 1]
}

/// A workload's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    pub output_tokens: u64,
    pub prompt_tokens: u64,
    pub wall_s: f64,
    pub output_tokens_per_s: f64,
    /// A first error, when some failed.
    pub error: Option<String>,
}

pub fn summarize(outcomes: &[Outcome], wall: Duration) -> Summary {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let ttft: Vec<Duration> = ok.iter().map(|o| o.ttft).collect();
    let tpot: Vec<Duration> = ok.iter().filter_map(|o| o.tpot).collect();
    let output_tokens: u64 = ok.iter().map(|o| u64::from(o.output_tokens)).sum();
    Summary {
        requests: outcomes.len(),
        ok: ok.len(),
        failed: outcomes.len() - ok.len(),
        ttft_p50_ms: percentile_ms(&ttft, 50.0),
        ttft_p99_ms: percentile_ms(&ttft, 99.0),
        tpot_p50_ms: percentile_ms(&tpot, 50.0),
        tpot_p99_ms: percentile_ms(&tpot, 99.0),
        output_tokens,
        prompt_tokens: ok.iter().map(|o| u64::from(o.prompt_tokens)).sum(),
        wall_s: wall.as_secs_f64(),
        output_tokens_per_s: output_tokens as f64 / wall.as_secs_f64().max(1e-9),
        error: outcomes.iter().find_map(|o| o.error.clone()),
    }
}

/// One plain GET, for `/metrics` and `/ready`: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&b).into_owned()))
}

/// Sum of a metric family's samples whose series starts with `series` (e.g.
/// `pdagent_kv_bytes_sent_total`), over several `/metrics` bodies.
pub fn metric_sum(bodies: &[String], series: &str) -> f64 {
    bodies
        .iter()
        .flat_map(|b| b.lines())
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Agent time, engine time (ms, from `Server-Timing`) and the client's end-to-end time of
/// each prompt, sent one at a time round-robin over the agents.
pub async fn timed_each(
    agents: &[SocketAddr],
    model: &str,
    prompts: &[String],
    max_tokens: u32,
) -> Result<(Vec<f64>, Vec<f64>, Vec<Duration>)> {
    let (mut agent, mut engine, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    for (i, p) in prompts.iter().enumerate() {
        let (a, e, t) = timed(agents[i % agents.len()], model, p, max_tokens).await?;
        agent.push(a);
        engine.push(e);
        e2e.push(t);
    }
    Ok((agent, engine, e2e))
}

/// One non-streaming completion; returns the agent's `Server-Timing` split (agent ms, engine
/// ms) and the client's end-to-end time.
pub async fn timed(
    addr: SocketAddr,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> Result<(f64, f64, Duration)> {
    let t0 = Instant::now();
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
    })
    .to_string();
    let resp = post_completion(addr, body).await?;
    let status = resp.status();
    let timing = resp
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let b = resp.into_body().collect().await?.to_bytes();
    let e2e = t0.elapsed();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&b));
    }
    let timing = timing.context("no Server-Timing header")?;
    let dur = |name: &str| {
        timing.split(',').map(str::trim).find_map(|p| {
            p.strip_prefix(name)?
                .strip_prefix(";dur=")?
                .parse::<f64>()
                .ok()
        })
    };
    Ok((
        dur("agent").context("no agent duration")?,
        dur("engine").context("no engine duration")?,
        e2e,
    ))
}

/// Poisson arrival times (seconds) of `n` requests at `rate` per second.
pub fn poisson_times(n: usize, rate: f64, rng: &mut Rng) -> Vec<f64> {
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let at = t;
            t += -(1.0 - rng.unit()).ln() / rate;
            at
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_last_chunk_with_all_the_text_carries_tokens() {
        let chunk = |text: &str, finish: serde_json::Value| serde_json::json!({"index": 0, "text": text, "finish_reason": finish});
        // An engine that ran ahead of its reader: all tokens and the finish in one chunk.
        assert!(carries_tokens(&chunk(" the end", "length".into())));
        assert!(carries_tokens(&chunk("a", serde_json::Value::Null)));
        assert!(carries_tokens(&chunk("", serde_json::Value::Null)));
        assert!(!carries_tokens(&chunk("", "stop".into())));
    }

    #[test]
    fn workloads_are_deterministic_and_mixed() {
        let a = mixed(8, 64, 512, 16, 7);
        let b = mixed(8, 64, 512, 16, 7);
        assert_eq!(
            a.iter().map(|r| &r.prompt).collect::<Vec<_>>(),
            b.iter().map(|r| &r.prompt).collect::<Vec<_>>()
        );
        assert_eq!(a[0].prompt.len(), 64);
        assert_eq!(a[1].prompt.len(), 512);
        // Long prompts 1 and 5 share their first half.
        assert_eq!(a[1].prompt[..256], a[5].prompt[..256]);
        assert_ne!(a[1].prompt[..256], a[3].prompt[..256]);
    }

    #[test]
    fn percentiles_and_metric_sums() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        let bodies = vec![
            "# TYPE x_total counter\nx_total{path=\"network\"} 10\nx_total{path=\"host\"} 5\nx_totally 1\n".to_string(),
            "x_total 2\n".to_string(),
        ];
        assert_eq!(metric_sum(&bodies, "x_total"), 17.0);
    }
}
