//! `pdctl bench serve --engine vllm`: what pdagent adds to vLLM's disaggregated serving, on a
//! local cluster of two agents (one fixture GPU each) running a NIXL prefill/decode pair of the
//! `tiny` preset exported as a checkpoint (`pdagent engine export`), fixed seeds:
//! 1. agent time: non-streaming requests at concurrency 1 through pdagent, the agents'
//!    `Server-Timing` split (the time outside engines: ingress, routing, transport, relaying);
//! 2. paired: request by request, the same kind of streaming request through pdagent and as
//!    vLLM's two-step flow sent straight to the same two engines (prefill with `max_tokens` 1
//!    and `do_remote_decode`, then decode with its `kv_transfer_params`), alternating which
//!    goes first, each with a prompt of its own (no prefix-cache hits); the median and p90 of
//!    the paired differences of TTFT and end-to-end time (NIXL's progress threads spin a core
//!    per engine here, so single requests are noisy: only paired differences over many
//!    requests say something);
//! 3. TTFT and TPOT of the disaggregated pair (pdagent's side of step 2) against one colocated
//!    vLLM engine on the same machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::demo::{deploy_ready, undeploy_gone};
use crate::load::{self, LoadRequest, Outcome, Rng};
use crate::local::VllmLocal;

const NAME: &str = "bench";
const SEED: u64 = 11;
const PROMPT_BYTES: usize = 400;
const MAX_TOKENS: u32 = 24;
/// Engine flags that fit a 2-core machine.
const ENGINE_ARGS: &[&str] = &[
    "--max-model-len=1024",
    "--max-num-seqs=8",
    "--enforce-eager",
];

#[derive(Debug, Serialize)]
pub struct Paired {
    pub pairs: usize,
    pub pdagent_ttft_p50_ms: f64,
    pub direct_ttft_p50_ms: f64,
    /// pdagent minus direct, per pair.
    pub ttft_diff_p50_ms: f64,
    pub ttft_diff_p90_ms: f64,
    pub e2e_diff_p50_ms: f64,
    pub e2e_diff_p90_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct LayoutTimes {
    pub layout: String,
    pub requests: usize,
    /// At the client.
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    /// Mean time per output token as the agents measured it (every token counts, also those
    /// whose text is held back: this model's random weights emit many partial UTF-8 bytes,
    /// so the client sees text in bursts).
    pub tpot_mean_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct VllmServeReport {
    pub model: String,
    pub requests: usize,
    pub agent_p50_ms: f64,
    pub agent_p99_ms: f64,
    pub engine_p50_ms: f64,
    pub e2e_p50_ms: f64,
    pub paired: Paired,
    pub layouts: Vec<LayoutTimes>,
    /// Disaggregated over colocated: TTFT p50, and mean TPOT.
    pub ttft_ratio: f64,
    pub tpot_ratio: f64,
}

pub fn run(requests: usize, vllm: &VllmLocal, json_out: bool) -> Result<VllmServeReport> {
    if !(4..=10_000).contains(&requests) {
        bail!("--requests must be between 4 and 10000");
    }
    let say = |s: String| {
        if !json_out {
            eprintln!("{s}");
        }
    };
    with_tiny_vllm_cluster("bench-vllm", vllm, |dir, api_port, model| {
        measure(dir, api_port, model, requests, &say)
    })
}

/// Runs `f` on a local cluster of two agents (one fixture GPU each) that run vLLM as `vllm`
/// says, with the `tiny` preset exported as a checkpoint (`f` gets the cluster's folder, its
/// API port and the checkpoint's folder).
pub(crate) fn with_tiny_vllm_cluster<T>(
    name: &str,
    vllm: &VllmLocal,
    f: impl FnOnce(&std::path::Path, u16, &std::path::Path) -> Result<T>,
) -> Result<T> {
    let pdagent = crate::demo::find_pdagent()?;
    if vllm.vllm_command.is_none() {
        bail!(
            "--vllm-command is needed: vLLM's OpenAI server as one argv string, e.g. \"/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server\" (tests/setup.sh installs vLLM's CPU build into target/vllm-venv)"
        );
    }
    crate::local::with_cluster_vllm(name, 2, 1, vllm, |dir, api_port| {
        let model = dir.join("models/tiny");
        let out = std::process::Command::new(&pdagent)
            .args(["engine", "export", "--model", "tiny", "--out"])
            .arg(&model)
            .output()?;
        if !out.status.success() {
            bail!(
                "pdagent engine export: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        f(dir, api_port, &model)
    })
}

/// Percentile of signed values (nearest rank).
pub(crate) fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    let k = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[k.clamp(1, s.len()) - 1]
}

/// The agents' `pdagent_time_per_output_token_seconds` sum and count for the model, added
/// over the agents.
fn tpot_sums(rt: &tokio::runtime::Runtime, agents: &[SocketAddr]) -> (f64, f64) {
    let series = |body: &str, suffix: &str| {
        let key = format!("pdagent_time_per_output_token_seconds_{suffix}{{model=\"{NAME}\"}}");
        body.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    crate::demo::metrics(rt, agents)
        .iter()
        .fold((0.0, 0.0), |(s, c), b| {
            (s + series(b, "sum"), c + series(b, "count"))
        })
}

fn minus(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 - b.0, a.1 - b.1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The HTTP ports of the deployment's prefill and decode engines (`pdctl engines`).
fn engine_ports(
    client: &crate::client::AdminClient,
    rt: &tokio::runtime::Runtime,
) -> Result<(u16, u16)> {
    let v: pd_api::Engines = rt.block_on(client.get("/v1/engines"))?;
    let port = |role: pd_api::EngineRole| -> Result<u16> {
        v.engines
            .iter()
            .find(|e| e.deployment == NAME && e.role == role)
            .and_then(|e| e.port)
            .with_context(|| format!("no {role} engine port in {:?}", v.engines))
    };
    Ok((
        port(pd_api::EngineRole::Prefill)?,
        port(pd_api::EngineRole::Decode)?,
    ))
}

/// vLLM's two-step flow sent straight to the engines: prefill (not streaming, one token,
/// `do_remote_decode`), then decode with the prefill's `kv_transfer_params`, streaming; timed
/// from before the prefill.
async fn direct(prefill: u16, decode: u16, r: &LoadRequest, seed: u64) -> Result<Outcome> {
    let t0 = Instant::now();
    let id = format!("bench-{seed:x}");
    let mut body = load::stream_body(NAME, r, seed);
    body["stream"] = json!(false);
    body["max_tokens"] = json!(1);
    body.as_object_mut().map(|o| o.remove("stream_options"));
    body["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
    let resp = load::post_with_id(SocketAddr::from(([127, 0, 0, 1], prefill)), body, &id).await?;
    let params = resp["kv_transfer_params"].clone();
    if !params.is_object() {
        bail!("the prefill engine gave no kv_transfer_params: {resp}");
    }
    let mut body = load::stream_body(NAME, r, seed);
    body["kv_transfer_params"] = params;
    load::stream_timed(
        SocketAddr::from(([127, 0, 0, 1], decode)),
        body,
        Some(&id),
        t0,
    )
    .await
}

fn measure(
    dir: &std::path::Path,
    api_port: u16,
    model: &std::path::Path,
    requests: usize,
    say: &dyn Fn(String),
) -> Result<VllmServeReport> {
    let crate::demo::Session { client, rt, agents } = crate::demo::session(dir, 2, api_port)?;
    let model_s = model.to_string_lossy().into_owned();
    let layout = |l: Value| {
        let mut b = json!({"engine": "vllm", "engine_args": ENGINE_ARGS, "kv_transport": "nixl"});
        for (k, v) in l.as_object().into_iter().flatten() {
            b[k] = v.clone();
        }
        b
    };
    say("deploying a vLLM prefill/decode pair (NixlConnector, KV in host memory)".into());
    deploy_ready(
        &client,
        &rt,
        NAME,
        &model_s,
        layout(json!({"prefill": 1, "decode": 1})),
        2,
        &agents,
    )?;
    let (prefill, decode) = engine_ports(&client, &rt)?;
    let mut rng = Rng::new(SEED);
    let mut prompt = || LoadRequest {
        ignore_eos: false,
        prompt: load::text(&mut rng, PROMPT_BYTES),
        max_tokens: MAX_TOKENS,
        at_s: 0.0,
    };
    // Warm both paths (first requests compile and allocate).
    for k in 0..2 {
        rt.block_on(load::one(agents[0], NAME, &prompt(), k));
        rt.block_on(direct(prefill, decode, &prompt(), 100 + k))?;
    }

    say(format!(
        "1. agent time: {requests} requests at concurrency 1"
    ));
    let prompts: Vec<String> = (0..requests).map(|_| prompt().prompt).collect();
    let (agent, engine, e2e) = rt.block_on(load::timed_each(&agents, NAME, &prompts, 8))?;
    let e2e: Vec<f64> = e2e.into_iter().map(ms).collect();

    say(format!(
        "2. {requests} pairs: through pdagent and straight to the engines, alternating"
    ));
    let (mut via, mut straight) = (Vec::new(), Vec::new());
    let tpot_before = tpot_sums(&rt, &agents);
    for i in 0..requests {
        let (a, b) = (prompt(), prompt());
        let seed = 1000 + i as u64;
        let run_via = || rt.block_on(load::one(agents[i % 2], NAME, &a, seed));
        let run_direct = || rt.block_on(direct(prefill, decode, &b, seed));
        let (v, d) = if i % 2 == 0 {
            let v = run_via();
            (v, run_direct()?)
        } else {
            let d = run_direct()?;
            (run_via(), d)
        };
        if let Some(e) = v.error.as_ref().or(d.error.as_ref()) {
            bail!("pair {i} failed: {e}");
        }
        via.push(v);
        straight.push(d);
    }
    let diff = |f: fn(&Outcome) -> Duration| -> Vec<f64> {
        via.iter()
            .zip(&straight)
            .map(|(v, d)| ms(f(v)) - ms(f(d)))
            .collect()
    };
    let (ttft_d, e2e_d) = (diff(|o| o.ttft), diff(|o| o.e2e));
    let p50_of = |v: &[Outcome], f: fn(&Outcome) -> Option<Duration>| {
        pct(&v.iter().filter_map(f).map(ms).collect::<Vec<_>>(), 50.0)
    };
    let paired = Paired {
        pairs: requests,
        pdagent_ttft_p50_ms: p50_of(&via, |o| Some(o.ttft)),
        direct_ttft_p50_ms: p50_of(&straight, |o| Some(o.ttft)),
        ttft_diff_p50_ms: pct(&ttft_d, 50.0),
        ttft_diff_p90_ms: pct(&ttft_d, 90.0),
        e2e_diff_p50_ms: pct(&e2e_d, 50.0),
        e2e_diff_p90_ms: pct(&e2e_d, 90.0),
    };
    let times = |layout: &str, o: &[Outcome], tpot: (f64, f64)| {
        let ttft: Vec<f64> = o.iter().map(|o| ms(o.ttft)).collect();
        LayoutTimes {
            layout: layout.to_string(),
            requests: o.len(),
            ttft_p50_ms: pct(&ttft, 50.0),
            ttft_p90_ms: pct(&ttft, 90.0),
            tpot_mean_ms: 1e3 * tpot.0 / tpot.1.max(1.0),
        }
    };
    let disaggregated = times(
        "disaggregated 1P+1D",
        &via,
        minus(tpot_sums(&rt, &agents), tpot_before),
    );

    say(format!(
        "3. {requests} requests on one colocated vLLM engine"
    ));
    undeploy_gone(&client, &rt, NAME)?;
    deploy_ready(
        &client,
        &rt,
        NAME,
        &model_s,
        layout(json!({"colocated": 1})),
        1,
        &agents,
    )?;
    rt.block_on(load::one(agents[0], NAME, &prompt(), 7));
    let tpot_before = tpot_sums(&rt, &agents);
    let mut co = Vec::new();
    for i in 0..requests {
        let o = rt.block_on(load::one(agents[i % 2], NAME, &prompt(), 2000 + i as u64));
        if let Some(e) = &o.error {
            bail!("colocated request {i} failed: {e}");
        }
        co.push(o);
    }
    let colocated = times(
        "colocated 1",
        &co,
        minus(tpot_sums(&rt, &agents), tpot_before),
    );
    undeploy_gone(&client, &rt, NAME)?;
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    Ok(VllmServeReport {
        model: "tiny (exported checkpoint)".into(),
        requests,
        agent_p50_ms: pct(&agent, 50.0),
        agent_p99_ms: pct(&agent, 99.0),
        engine_p50_ms: pct(&engine, 50.0),
        e2e_p50_ms: pct(&e2e, 50.0),
        paired,
        ttft_ratio: ratio(disaggregated.ttft_p50_ms, colocated.ttft_p50_ms),
        tpot_ratio: ratio(disaggregated.tpot_mean_ms, colocated.tpot_mean_ms),
        layouts: vec![disaggregated, colocated],
    })
}

pub fn print(r: &VllmServeReport) {
    println!(
        "agent time per request at concurrency 1 (vLLM 1P+1D, {}; ingress, routing, transport, relaying; engines excluded):",
        r.model
    );
    println!(
        "  agent p50 {:.3} ms  p99 {:.3} ms   (engine p50 {:.1} ms, end-to-end p50 {:.1} ms, {} requests)",
        r.agent_p50_ms, r.agent_p99_ms, r.engine_p50_ms, r.e2e_p50_ms, r.requests
    );
    let p = &r.paired;
    println!(
        "paired, through pdagent minus straight to the engines ({} pairs): TTFT median {:+.1} ms p90 {:+.1} ms; end-to-end median {:+.1} ms p90 {:+.1} ms (TTFT p50 {:.1} ms through pdagent, {:.1} ms direct)",
        p.pairs,
        p.ttft_diff_p50_ms,
        p.ttft_diff_p90_ms,
        p.e2e_diff_p50_ms,
        p.e2e_diff_p90_ms,
        p.pdagent_ttft_p50_ms,
        p.direct_ttft_p50_ms
    );
    for l in &r.layouts {
        println!(
            "  {:<22} TTFT p50 {:>7.1} ms p90 {:>7.1} ms   TPOT mean {:>6.2} ms ({} requests)",
            l.layout, l.ttft_p50_ms, l.ttft_p90_ms, l.tpot_mean_ms, l.requests
        );
    }
    println!(
        "disaggregated / colocated: TTFT p50 {:.2}, TPOT mean {:.2}",
        r.ttft_ratio, r.tpot_ratio
    );
}
