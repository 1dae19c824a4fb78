//! `pdctl bench serve`: the serving path measured on a local cluster of two agents (one
//! fixture GPU each) with the `tiny` preset, fixed seeds:
//! 1. agent time: at concurrency 1, the time a request spends outside engines (ingress,
//!    routing, transport, KV shipping, forwarding) from the agents' `Server-Timing` split, for
//!    colocated and disaggregated serving, against the client's end-to-end time;
//! 2. routing: one routing decision (route + record) with a realistic prefix index, cost policy
//!    against round-robin;
//! 3. a request-rate sweep, disaggregated (1 prefill + 1 decode engine) against colocated (2
//!    engines) on the same cores: SLO attainment at each rate and goodput (the highest rate at
//!    which at least 90% of requests meet both SLOs). The SLOs are fixed before the sweep by a
//!    stated rule: 4 x the unloaded TTFT p90 and 4 x the unloaded TPOT p90, measured on the
//!    colocated layout at concurrency 1 with the sweep's workload.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::json;

use crate::demo::{deploy_ready, ingress, undeploy_gone};
use crate::load::{self, LoadRequest, Rng};

const MODEL: &str = "tiny";
const SEED: u64 = 7;
const OVERHEAD_REQUESTS: usize = 100;
const SWEEP_SHORT_BYTES: usize = 128;
const SWEEP_LONG_BYTES: usize = 1024;
const SWEEP_MAX_TOKENS: u32 = 48;
const RATE_FACTORS: [f64; 5] = [0.15, 0.3, 0.5, 0.75, 1.0];
const TTFT_SLO_FACTOR: f64 = 4.0;
const TPOT_SLO_FACTOR: f64 = 4.0;
const ATTAINMENT_GOAL: f64 = 0.9;

#[derive(Debug, Serialize)]
pub struct AgentTime {
    pub layout: String,
    pub requests: usize,
    pub agent_p50_ms: f64,
    pub agent_p99_ms: f64,
    pub engine_p50_ms: f64,
    pub e2e_p50_ms: f64,
    /// Agent time over client end-to-end time, at the median.
    pub agent_share_p50: f64,
}

#[derive(Debug, Serialize)]
pub struct Routing {
    pub decisions: usize,
    pub index_entries: usize,
    pub engines: usize,
    pub cost_p50_us: f64,
    pub cost_p99_us: f64,
    pub round_robin_p50_us: f64,
    pub round_robin_p99_us: f64,
    /// Cost p99 over round-robin p99.
    pub ratio_p99: f64,
}

#[derive(Debug, Serialize)]
pub struct SweepPoint {
    pub rate_per_s: f64,
    pub attainment: f64,
    pub ttft_p50_ms: f64,
    pub tpot_p50_ms: f64,
    pub output_tokens_per_s: f64,
    pub failed: usize,
}

#[derive(Debug, Serialize)]
pub struct Sweep {
    pub layout: String,
    pub points: Vec<SweepPoint>,
    /// Highest swept rate with attainment >= 90% (0 if none).
    pub goodput_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ServeReport {
    pub model: String,
    pub agent_time: Vec<AgentTime>,
    pub routing: Routing,
    pub slo_rule: String,
    pub ttft_slo_ms: f64,
    pub tpot_slo_ms: f64,
    pub requests_per_point: usize,
    pub sweep: Vec<Sweep>,
    /// Disaggregated goodput over colocated goodput.
    pub goodput_ratio: f64,
}

pub fn run(requests: usize, json_out: bool) -> Result<ServeReport> {
    crate::demo::find_pdagent()?;
    if !(4..=10_000).contains(&requests) {
        bail!("--requests must be between 4 and 10000");
    }
    let say = |s: String| {
        if !json_out {
            eprintln!("{s}");
        }
    };
    crate::local::with_cluster("bench-serve", 2, 1, |dir, api_port| {
        measure(dir, api_port, requests, &say)
    })
}

fn measure(
    dir: &std::path::Path,
    api_port: u16,
    requests: usize,
    say: &dyn Fn(String),
) -> Result<ServeReport> {
    let client = crate::client::AdminClient::from_config(&dir.join("pdctl.toml"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let agents = ingress(2, api_port);

    // 1. Agent time at concurrency 1.
    let mut agent_time = Vec::new();
    let mut rng = Rng::new(SEED);
    let prompts: Vec<String> = (0..OVERHEAD_REQUESTS)
        .map(|_| load::text(&mut rng, 64))
        .collect();
    for (layout, body, engines) in [
        ("colocated 1", json!({"colocated": 1}), 1),
        ("disaggregated 1P+1D", json!({"prefill": 1, "decode": 1}), 2),
    ] {
        say(format!(
            "agent time, {layout}: {OVERHEAD_REQUESTS} requests at concurrency 1"
        ));
        deploy_ready(&client, &rt, MODEL, MODEL, body, engines, &agents)?;
        let (agent, engine, e2e) = rt.block_on(load::timed_each(&agents, MODEL, &prompts, 8))?;
        let ms = |v: Vec<f64>| -> Vec<Duration> {
            v.into_iter()
                .map(|x| Duration::from_secs_f64(x / 1e3))
                .collect()
        };
        let (agent, engine) = (ms(agent), ms(engine));
        let p50 = |v: &[Duration]| load::percentile_ms(v, 50.0);
        agent_time.push(AgentTime {
            layout: layout.to_string(),
            requests: OVERHEAD_REQUESTS,
            agent_p50_ms: p50(&agent),
            agent_p99_ms: load::percentile_ms(&agent, 99.0),
            engine_p50_ms: p50(&engine),
            e2e_p50_ms: p50(&e2e),
            agent_share_p50: p50(&agent) / p50(&e2e).max(1e-9),
        });
        undeploy_gone(&client, &rt, MODEL)?;
    }

    // 2. Routing decisions.
    say("routing: 20000 decisions, 100k-entry prefix index, 32 engines".to_string());
    let clock = Instant::now();
    let now = || clock.elapsed().as_nanos() as u64;
    let cost = pd_router::bench::run_with(pd_router::Policy::Cost, 20_000, SEED, now);
    let rr = pd_router::bench::run_with(pd_router::Policy::RoundRobin, 20_000, SEED, now);
    let routing = Routing {
        decisions: cost.decisions,
        index_entries: cost.index_entries,
        engines: cost.engines,
        cost_p50_us: cost.p50_ns as f64 / 1e3,
        cost_p99_us: cost.p99_ns as f64 / 1e3,
        round_robin_p50_us: rr.p50_ns as f64 / 1e3,
        round_robin_p99_us: rr.p99_ns as f64 / 1e3,
        ratio_p99: cost.p99_ns as f64 / (rr.p99_ns.max(1)) as f64,
    };

    // 3. The sweep: SLOs from the unloaded colocated run, then both layouts at each rate.
    // New prompts for every run (the same shape and seeds on every invocation): a prompt an
    // engine has seen before would be a prefix-cache hit.
    let workload = |k: u64| {
        load::mixed(
            requests,
            SWEEP_SHORT_BYTES,
            SWEEP_LONG_BYTES,
            SWEEP_MAX_TOKENS,
            SEED + k,
        )
    };
    deploy_ready(
        &client,
        &rt,
        MODEL,
        MODEL,
        json!({"colocated": 2}),
        2,
        &agents,
    )?;
    say("SLOs: the sweep's workload at concurrency 1 on colocated 2".to_string());
    let unloaded = rt.block_on(load::closed_loop(&agents, MODEL, &workload(0), 1, SEED));
    if let Some(e) = unloaded.iter().find_map(|o| o.error.clone()) {
        bail!("unloaded run failed: {e}");
    }
    let ttft: Vec<Duration> = unloaded.iter().map(|o| o.ttft).collect();
    let tpot: Vec<Duration> = unloaded.iter().filter_map(|o| o.tpot).collect();
    let e2e_mean =
        unloaded.iter().map(|o| o.e2e.as_secs_f64()).sum::<f64>() / unloaded.len() as f64;
    let ttft_slo_ms = TTFT_SLO_FACTOR * load::percentile_ms(&ttft, 90.0);
    let tpot_slo_ms = TPOT_SLO_FACTOR * load::percentile_ms(&tpot, 90.0);
    // Two engines each serving one request at a time.
    let capacity = 2.0 / e2e_mean.max(1e-6);
    let mut sweep = Vec::new();
    for (layout, body) in [
        ("colocated 2", json!({"colocated": 2})),
        ("disaggregated 1P+1D", json!({"prefill": 1, "decode": 1})),
    ] {
        if layout.starts_with("disaggregated") {
            undeploy_gone(&client, &rt, MODEL)?;
            deploy_ready(&client, &rt, MODEL, MODEL, body, 2, &agents)?;
        }
        let mut points = Vec::new();
        for (k, f) in RATE_FACTORS.into_iter().enumerate() {
            let rate = f * capacity;
            say(format!(
                "sweep, {layout}: {requests} requests at {rate:.2}/s"
            ));
            let mut rng = Rng::new(SEED);
            let times = load::poisson_times(requests, rate, &mut rng);
            let reqs: Vec<LoadRequest> = workload(1 + k as u64)
                .iter()
                .zip(times)
                .map(|(r, at_s)| LoadRequest { at_s, ..r.clone() })
                .collect();
            let t = Instant::now();
            let out = rt.block_on(load::open_loop(
                &agents,
                MODEL,
                &reqs,
                SEED,
                Duration::from_secs(600),
            ));
            let s = load::summarize(&out, t.elapsed());
            let met = out
                .iter()
                .filter(|o| {
                    o.ok && o.ttft.as_secs_f64() * 1e3 <= ttft_slo_ms
                        && o.tpot.is_none_or(|p| p.as_secs_f64() * 1e3 <= tpot_slo_ms)
                })
                .count();
            points.push(SweepPoint {
                rate_per_s: rate,
                attainment: met as f64 / out.len() as f64,
                ttft_p50_ms: s.ttft_p50_ms,
                tpot_p50_ms: s.tpot_p50_ms,
                output_tokens_per_s: s.output_tokens_per_s,
                failed: s.failed,
            });
        }
        let goodput_per_s = points
            .iter()
            .filter(|p| p.attainment >= ATTAINMENT_GOAL)
            .map(|p| p.rate_per_s)
            .fold(0.0, f64::max);
        sweep.push(Sweep {
            layout: layout.to_string(),
            points,
            goodput_per_s,
        });
    }
    undeploy_gone(&client, &rt, MODEL)?;
    let goodput_ratio = sweep[1].goodput_per_s / sweep[0].goodput_per_s.max(1e-9);
    Ok(ServeReport {
        model: MODEL.to_string(),
        agent_time,
        routing,
        slo_rule: format!(
            "TTFT <= {TTFT_SLO_FACTOR} x and TPOT <= {TPOT_SLO_FACTOR} x the unloaded p90 (colocated 2, concurrency 1, the sweep's workload)"
        ),
        ttft_slo_ms,
        tpot_slo_ms,
        requests_per_point: requests,
        sweep,
        goodput_ratio,
    })
}

pub fn print(r: &ServeReport) {
    println!(
        "agent time per request at concurrency 1 ({}; ingress, routing, transport, KV shipping, forwarding; engines excluded):",
        r.model
    );
    for a in &r.agent_time {
        println!(
            "  {:<22} agent p50 {:.3} ms  p99 {:.3} ms   (engine p50 {:.2} ms, end-to-end p50 {:.2} ms, agent share {:.1}%)",
            a.layout,
            a.agent_p50_ms,
            a.agent_p99_ms,
            a.engine_p50_ms,
            a.e2e_p50_ms,
            100.0 * a.agent_share_p50
        );
    }
    let g = &r.routing;
    println!(
        "routing decision ({} entries, {} engines): cost p50 {:.1} us p99 {:.1} us; round-robin p50 {:.1} us p99 {:.1} us; ratio p99 {:.2}",
        g.index_entries,
        g.engines,
        g.cost_p50_us,
        g.cost_p99_us,
        g.round_robin_p50_us,
        g.round_robin_p99_us,
        g.ratio_p99
    );
    println!(
        "SLOs: TTFT {:.0} ms, TPOT {:.1} ms ({})",
        r.ttft_slo_ms, r.tpot_slo_ms, r.slo_rule
    );
    println!(
        "{:>10}  {:>24}  {:>24}",
        "rate/s", r.sweep[0].layout, r.sweep[1].layout
    );
    for (a, b) in r.sweep[0].points.iter().zip(&r.sweep[1].points) {
        let cell = |p: &SweepPoint| {
            format!(
                "{:>5.0}% ttft {:>5.0} tpot {:>5.1}",
                100.0 * p.attainment,
                p.ttft_p50_ms,
                p.tpot_p50_ms
            )
        };
        println!("{:>10.2}  {:>24}  {:>24}", a.rate_per_s, cell(a), cell(b));
    }
    println!(
        "goodput (>= 90% within both SLOs): {} {:.2}/s, {} {:.2}/s; ratio disaggregated/colocated {:.2}",
        r.sweep[0].layout,
        r.sweep[0].goodput_per_s,
        r.sweep[1].layout,
        r.sweep[1].goodput_per_s,
        r.goodput_ratio
    );
}
