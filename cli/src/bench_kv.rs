//! `pdctl bench kv --engine vllm`: vLLM's KV from prefill to decode engine through NIXL
//! (`--kv-transport nixl`, the engines move it) and through the agents (`--kv-transport
//! agent`: pdagent's connector, QUIC with mutual TLS, checksummed), on a local cluster of its
//! own (two agents, one fixture GPU each, the `tiny` preset exported as a checkpoint). The
//! same prompts, short and long, in the same order, one request at a time (so that each
//! request's share of the counters is known), through the decode host's agent:
//! - KV transfer time per request: NIXL's own (`vllm:nixl_xfer_time_seconds`, the decode
//!   engine's reads) and the agents' (`pdagent_kv_transfer_seconds`: from the first piece the
//!   prefill engine handed out to the decode host's acknowledgement of the last, so it runs
//!   alongside the prefill's compute, layer by layer);
//! - exposed KV time per request, what the request waited on its KV beyond the prefill's
//!   compute: all of NIXL's reads (they begin once the prefill is done), and for the agents
//!   the time from the prefill engine's answer to its KV being whole on the decode host
//!   (`pdagent_kv_tail_seconds`) plus the decode connector's read of it from its agent
//!   (`pdagent_kv_wait_seconds`);
//! - effective GB/s: the request's KV bytes over the transfer time;
//! - TTFT at the client;
//!
//! median and p90 of each, per prompt kind, and agent/NIXL ratios. NIXL runs over TCP
//! (`UCX_TLS=tcp`), the comparison the agents' path must win on hosts without RDMA. At most
//! two vLLM engines run at once: the NIXL pair first, then the agents' pair.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;

use crate::bench_vllm::{pct, with_tiny_vllm_cluster};
use crate::demo::{deploy_ready, undeploy_gone};
use crate::load::{self, LoadRequest, Rng};
use crate::local::VllmLocal;

const NAME: &str = "kvbench";
const SEED: u64 = 23;
/// Prompt sizes in bytes of the load's random text (about one token per byte with this tokenizer).
const SHORT_BYTES: usize = 100;
const LONG_BYTES: usize = 900;
const MAX_TOKENS: u32 = 8;
/// Float32 KV (as the model's weights), as the vLLM tests run it.
const ENGINE_ARGS: &[&str] = &[
    "--max-model-len=1024",
    "--max-num-seqs=8",
    "--enforce-eager",
    "--dtype=float32",
];

/// Figures of one prompt kind on one path.
#[derive(Debug, Clone, Serialize)]
pub struct KindFigures {
    pub kind: String,
    pub requests: usize,
    pub prompt_tokens_mean: f64,
    pub kv_bytes_mean: f64,
    pub kv_ms_p50: f64,
    pub kv_ms_p90: f64,
    pub exposed_ms_p50: f64,
    pub exposed_ms_p90: f64,
    pub gbps_p50: f64,
    pub gbps_p90: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p90: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathFigures {
    pub transport: String,
    pub kinds: Vec<KindFigures>,
}

/// Agent path over NIXL, per prompt kind (below 1 for times: the agents are faster; above 1
/// for GB/s).
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub kind: String,
    pub kv_ms_p50: f64,
    pub exposed_ms_p50: f64,
    pub exposed_ms_p90: f64,
    pub gbps_p50: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p90: f64,
}

#[derive(Debug, Serialize)]
pub struct KvBenchReport {
    pub model: String,
    pub requests_per_kind: usize,
    pub paths: Vec<PathFigures>,
    pub agent_over_nixl: Vec<Ratios>,
}

pub fn run(requests: usize, vllm: &VllmLocal, json_out: bool) -> Result<KvBenchReport> {
    if !(2..=1000).contains(&requests) {
        bail!("--requests must be between 2 and 1000");
    }
    let say = |s: String| {
        if !json_out {
            eprintln!("{s}");
        }
    };
    // NIXL over TCP: what a cluster without RDMA gets.
    let mut vllm = vllm.clone();
    if !vllm.vllm_env.iter().any(|e| e.starts_with("UCX_TLS=")) {
        vllm.vllm_env.push("UCX_TLS=tcp,self".into());
    }
    with_tiny_vllm_cluster("bench-kv", &vllm, |dir, api_port, model| {
        measure(dir, api_port, model, requests, &say)
    })
}

/// A series' value in a Prometheus text body (0 when absent), summed over its label sets
/// when `series` names none.
fn series(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Where a path's per-request KV time, bytes and exposed time are counted (the exposed time
/// is the sum of its series).
struct Counters {
    addr: SocketAddr,
    time: &'static str,
    count: &'static str,
    bytes: &'static str,
    exposed: &'static [&'static str],
}

/// One reading of a path's counters.
#[derive(Debug, Clone, Copy)]
struct Reading {
    time: f64,
    count: f64,
    bytes: f64,
    exposed: f64,
}

impl Counters {
    fn read(&self, rt: &tokio::runtime::Runtime) -> Result<Reading> {
        let (status, body) = rt.block_on(load::get(self.addr, "/metrics"))?;
        if status != 200 {
            bail!("/metrics on {} answered {status}", self.addr);
        }
        Ok(Reading {
            time: series(&body, self.time),
            count: series(&body, self.count),
            bytes: series(&body, self.bytes),
            exposed: self.exposed.iter().map(|s| series(&body, s)).sum(),
        })
    }
}

/// The decode engine's HTTP port and node.
fn decode_engine(
    client: &crate::client::AdminClient,
    rt: &tokio::runtime::Runtime,
) -> Result<(u16, String)> {
    let v: pd_api::Engines = rt.block_on(client.get("/v1/engines"))?;
    v.engines
        .iter()
        .find(|e| e.deployment == NAME && e.role == pd_api::EngineRole::Decode)
        .and_then(|e| Some((e.port?, e.node.clone())))
        .with_context(|| format!("no decode engine port in {:?}", v.engines))
}

fn measure(
    dir: &std::path::Path,
    api_port: u16,
    model: &std::path::Path,
    requests: usize,
    say: &dyn Fn(String),
) -> Result<KvBenchReport> {
    let crate::demo::Session { client, rt, agents } = crate::demo::session(dir, 2, api_port)?;
    let model_s = model.to_string_lossy().into_owned();
    // The same prompts on both paths, each seen once per path (no prefix-cache hits).
    let mut rng = Rng::new(SEED);
    let kinds: Vec<(&str, Vec<LoadRequest>)> = [("short", SHORT_BYTES), ("long", LONG_BYTES)]
        .into_iter()
        .map(|(kind, bytes)| {
            let reqs = (0..requests + 1)
                .map(|_| LoadRequest {
                    ignore_eos: false,
                    prompt: load::text(&mut rng, bytes),
                    max_tokens: MAX_TOKENS,
                    at_s: 0.0,
                })
                .collect();
            (kind, reqs)
        })
        .collect();
    let mut paths = Vec::new();
    for transport in ["nixl", "agent"] {
        say(format!(
            "deploying a vLLM prefill/decode pair with --kv-transport {transport}"
        ));
        deploy_ready(
            &client,
            &rt,
            NAME,
            &model_s,
            json!({"engine": "vllm", "engine_args": ENGINE_ARGS, "kv_transport": transport, "prefill": 1, "decode": 1}),
            2,
            &agents,
        )?;
        let (dport, dnode) = decode_engine(&client, &rt)?;
        let k: usize = dnode
            .trim_start_matches("node-")
            .parse()
            .context("node name")?;
        let via = agents[k - 1];
        let counters = match transport {
            "nixl" => Counters {
                addr: SocketAddr::from(([127, 0, 0, 1], dport)),
                time: "vllm:nixl_xfer_time_seconds_sum",
                count: "vllm:nixl_xfer_time_seconds_count",
                bytes: "vllm:nixl_bytes_transferred_sum",
                exposed: &["vllm:nixl_xfer_time_seconds_sum"],
            },
            _ => Counters {
                addr: via,
                time: "pdagent_kv_transfer_seconds_sum{path=\"network\"}",
                count: "pdagent_kv_transfer_seconds_count{path=\"network\"}",
                bytes: "pdagent_kv_shipment_bytes_sum{path=\"network\"}",
                exposed: &[
                    "pdagent_kv_tail_seconds_sum{path=\"network\"}",
                    "pdagent_kv_wait_seconds_sum{path=\"network\"}",
                ],
            },
        };
        let mut figures = Vec::new();
        for (kind, reqs) in &kinds {
            say(format!(
                "  {transport}: {} {kind} prompts, one at a time",
                reqs.len() - 1
            ));
            // The first of each kind warms the path (allocations, first transfers).
            let (mut kv_ms, mut exposed, mut gbps, mut ttft, mut tokens, mut bytes_all) = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            for (i, r) in reqs.iter().enumerate() {
                let before = counters.read(&rt)?;
                let o = rt.block_on(load::one(via, NAME, r, SEED + i as u64));
                if let Some(e) = &o.error {
                    bail!("{transport}: {kind} request {i} failed: {e}");
                }
                // The engines' counters may lag the answer by a step: wait for this request's.
                let until = Instant::now() + Duration::from_secs(10);
                let after = loop {
                    let a = counters.read(&rt)?;
                    if a.count > before.count || Instant::now() > until {
                        break a;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                if after.count <= before.count {
                    bail!(
                        "{transport}: {kind} request {i} moved no KV ({} did not change)",
                        counters.count
                    );
                }
                if i == 0 {
                    continue;
                }
                let (secs, b) = (after.time - before.time, after.bytes - before.bytes);
                kv_ms.push(secs * 1e3);
                exposed.push((after.exposed - before.exposed) * 1e3);
                gbps.push(if secs > 0.0 { b / secs / 1e9 } else { 0.0 });
                bytes_all.push(b);
                ttft.push(o.ttft.as_secs_f64() * 1e3);
                tokens.push(f64::from(o.prompt_tokens));
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            figures.push(KindFigures {
                kind: kind.to_string(),
                requests: kv_ms.len(),
                prompt_tokens_mean: mean(&tokens),
                kv_bytes_mean: mean(&bytes_all),
                kv_ms_p50: pct(&kv_ms, 50.0),
                kv_ms_p90: pct(&kv_ms, 90.0),
                exposed_ms_p50: pct(&exposed, 50.0),
                exposed_ms_p90: pct(&exposed, 90.0),
                gbps_p50: pct(&gbps, 50.0),
                gbps_p90: pct(&gbps, 90.0),
                ttft_ms_p50: pct(&ttft, 50.0),
                ttft_ms_p90: pct(&ttft, 90.0),
            });
        }
        undeploy_gone(&client, &rt, NAME)?;
        paths.push(PathFigures {
            transport: transport.to_string(),
            kinds: figures,
        });
    }
    let ratio = |a: f64, b: f64| a / b.max(1e-12);
    let agent_over_nixl = paths[0]
        .kinds
        .iter()
        .zip(&paths[1].kinds)
        .map(|(n, a)| Ratios {
            kind: n.kind.clone(),
            kv_ms_p50: ratio(a.kv_ms_p50, n.kv_ms_p50),
            exposed_ms_p50: ratio(a.exposed_ms_p50, n.exposed_ms_p50),
            exposed_ms_p90: ratio(a.exposed_ms_p90, n.exposed_ms_p90),
            gbps_p50: ratio(a.gbps_p50, n.gbps_p50),
            ttft_ms_p50: ratio(a.ttft_ms_p50, n.ttft_ms_p50),
            ttft_ms_p90: ratio(a.ttft_ms_p90, n.ttft_ms_p90),
        })
        .collect();
    Ok(KvBenchReport {
        model: "tiny (exported checkpoint, float32 KV: 2048 bytes per token)".into(),
        requests_per_kind: requests,
        paths,
        agent_over_nixl,
    })
}

pub fn print(r: &KvBenchReport) {
    println!(
        "vLLM KV, prefill host to decode host, one request at a time ({}, {} requests per kind):",
        r.model, r.requests_per_kind
    );
    for p in &r.paths {
        for k in &p.kinds {
            println!(
                "  {:<6} {:<5} {:>5.0} tokens {:>8.0} B   KV p50 {:>7.2} ms p90 {:>7.2} ms   exposed p50 {:>7.2} ms p90 {:>7.2} ms   {:>6.3} GB/s p50 ({:.3} p90)   TTFT p50 {:>7.1} ms p90 {:>7.1} ms",
                p.transport,
                k.kind,
                k.prompt_tokens_mean,
                k.kv_bytes_mean,
                k.kv_ms_p50,
                k.kv_ms_p90,
                k.exposed_ms_p50,
                k.exposed_ms_p90,
                k.gbps_p50,
                k.gbps_p90,
                k.ttft_ms_p50,
                k.ttft_ms_p90
            );
        }
    }
    for x in &r.agent_over_nixl {
        println!(
            "agent / nixl, {}: KV time p50 {:.2}, exposed KV time p50 {:.2} p90 {:.2}, GB/s p50 {:.2}, TTFT p50 {:.2} p90 {:.2}",
            x.kind,
            x.kv_ms_p50,
            x.exposed_ms_p50,
            x.exposed_ms_p90,
            x.gbps_p50,
            x.ttft_ms_p50,
            x.ttft_ms_p90
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_read_with_and_without_labels() {
        let body = "vllm:nixl_bytes_transferred_sum{engine=\"0\",model_name=\"m\"} 1024.0\n\
                    pdagent_kv_transfer_seconds_sum{path=\"network\"} 0.5\n\
                    pdagent_kv_transfer_seconds_sum{path=\"host\"} 0.25\n";
        assert_eq!(series(body, "vllm:nixl_bytes_transferred_sum"), 1024.0);
        assert_eq!(
            series(body, "pdagent_kv_transfer_seconds_sum{path=\"network\"}"),
            0.5
        );
        assert_eq!(series(body, "pdagent_kv_transfer_seconds_sum"), 0.75);
        assert_eq!(series(body, "absent"), 0.0);
        assert_eq!(pct(&[3.0, 1.0, 2.0], 50.0), 2.0);
    }
}
