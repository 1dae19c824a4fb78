//! `pdctl bench calibrate`: does the planner predict the reference engine on this machine?
//!
//! On a local cluster of two agents (one fixture GPU each) running one prefill and one decode
//! engine of a preset:
//! 1. calibration: prompts of 48, 112, 240 and 352 bytes with 32 output tokens, first one at a
//!    time (every prefill step one whole prompt), then closed loops at concurrency 2, 4 and 8
//!    (decode batches); the engines' measured step times (the
//!    `pdagent_engine_{prefill,decode}_step_*` counters of `/metrics`) fit the planner's
//!    `Calibration`: prefill from the first phase, decode from both;
//! 2. a different workload (448-byte prompts, 24 output tokens): its capacity measured with a
//!    closed loop at concurrency 8, then `reps` open-loop Poisson runs at half that rate;
//! 3. for each run, the planner's simulator replays the same arrivals and lengths through a
//!    1 prefill + 1 decode layout with the calibrated step times, and predicts mean TTFT and
//!    mean TPOT, compared with what the client measured.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pd_planner::autoplan::{DecodeBucket, PrefillBucket};
use pd_planner::{
    Calibration, DecodeSample, Dtypes, Layout, PerfModel, PrefillSample, Request, Role, Slo,
    StepCost, SystemSpec, WorkerGroup,
};
use serde::Serialize;
use serde_json::json;

use crate::demo::deploy_ready;
use crate::load::{self, LoadRequest, Rng};

const SEED: u64 = 11;
const CAL_PROMPT_BYTES: [usize; 4] = [48, 112, 240, 352];
const CAL_MAX_TOKENS: u32 = 32;
/// Prefill samples come from one request at a time (each step one whole prompt, as the fit
/// assumes); decode samples from every phase, batches growing with the concurrency.
const CAL_PREFILL_REPEATS: usize = 2;
const CAL_CONCURRENCY: [usize; 3] = [2, 4, 8];
const CAL_REQUESTS_PER_CONCURRENCY: usize = 3;
const PROMPT_BYTES: usize = 448;
const MAX_TOKENS: u32 = 24;
const CAPACITY_CONCURRENCY: usize = 8;
const CAPACITY_REQUESTS: usize = 16;
/// The engines' limits (`EngineConfig` defaults): tokens per step, sequences decoding at once.
const STEP_TOKENS_MAX: u32 = 512;
const RUNNING_MAX: u32 = 64;
/// A decode bucket's mean context is in (max/2, max]: taken as 3/4 of its bound.
const CONTEXT_IN_BUCKET: f64 = 0.75;
/// The agents sample their engines' stats once a reconcile pass (200 ms on local clusters):
/// the counters are read until two reads this far apart agree, for at most `STATS_WAIT`.
const STATS_SETTLE: Duration = Duration::from_millis(500);
const STATS_WAIT: Duration = Duration::from_secs(15);
/// What "within" means for the check.
const TOLERANCE: f64 = 0.15;

#[derive(Debug, Serialize)]
pub struct Run {
    pub requests: usize,
    pub failed: usize,
    pub measured_ttft_ms: f64,
    pub predicted_ttft_ms: f64,
    pub measured_tpot_ms: f64,
    pub predicted_tpot_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct CalibrateReport {
    pub model: String,
    pub layout: String,
    pub calibration_workload: String,
    pub workload: String,
    pub prefill_samples: usize,
    pub decode_samples: usize,
    /// Fitted step-time coefficients (seconds): prefill a + b·t + c·t², decode d + e·B + f·B·C.
    pub calibration: BTreeMap<String, f64>,
    pub capacity_per_s: f64,
    pub rate_per_s: f64,
    pub runs: Vec<Run>,
    pub measured_ttft_ms: f64,
    pub predicted_ttft_ms: f64,
    pub measured_tpot_ms: f64,
    pub predicted_tpot_ms: f64,
    /// predicted / measured − 1.
    pub ttft_error: f64,
    pub tpot_error: f64,
    pub within_tolerance: bool,
    pub tolerance: f64,
}

pub fn run(model: &str, requests: usize, reps: usize, json_out: bool) -> Result<CalibrateReport> {
    crate::demo::find_pdagent()?;
    let preset = match model {
        "tiny" => pd_engine::Preset::Tiny,
        "small" => pd_engine::Preset::Small,
        other => bail!("--model {other}: tiny or small"),
    };
    if !(8..=10_000).contains(&requests) || !(1..=20).contains(&reps) {
        bail!("--requests must be between 8 and 10000, --reps between 1 and 20");
    }
    let say = |s: String| {
        if !json_out {
            eprintln!("{s}");
        }
    };
    crate::local::with_cluster("bench-calibrate", 2, 1, |dir, api_port| {
        measure(dir, api_port, preset, requests, reps, &say)
    })
}

/// `series{labels} value` lines of one family, summed over agents by label set.
fn family(bodies: &[String], name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in bodies.iter().flat_map(|b| b.lines()) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some((labels, value)) = rest.strip_prefix('{').and_then(|r| r.rsplit_once("} ")) else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(labels.to_string()).or_insert(0.0) += v;
        }
    }
    out
}

/// One label's value out of `k="v",k2="v2"`.
fn label(labels: &str, key: &str) -> Option<f64> {
    labels
        .split(',')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
        .and_then(|v| v.trim_end_matches('"').parse().ok())
}

/// The engines' step times as the planner's samples (one per bucket with steps).
fn samples(bodies: &[String]) -> (Vec<PrefillSample>, Vec<DecodeSample>) {
    let steps = family(bodies, "pdagent_engine_prefill_steps_total");
    let tokens = family(bodies, "pdagent_engine_prefill_step_tokens_total");
    let secs = family(bodies, "pdagent_engine_prefill_step_seconds_total");
    let prefill = steps
        .iter()
        .filter_map(|(l, n)| {
            PrefillBucket {
                steps: *n,
                tokens: *tokens.get(l)?,
                seconds: *secs.get(l)?,
            }
            .sample()
        })
        .collect();
    let steps = family(bodies, "pdagent_engine_decode_steps_total");
    let seqs = family(bodies, "pdagent_engine_decode_step_sequences_total");
    let secs = family(bodies, "pdagent_engine_decode_step_seconds_total");
    let decode = steps
        .iter()
        .filter_map(|(l, n)| {
            DecodeBucket {
                steps: *n,
                sequences: *seqs.get(l)?,
                seconds: *secs.get(l)?,
                context_tokens: label(l, "context_tokens_max")? * CONTEXT_IN_BUCKET,
            }
            .sample()
        })
        .collect();
    (prefill, decode)
}

fn mean_ms(v: impl Iterator<Item = Duration>) -> f64 {
    let (sum, n) = v.fold((0.0, 0usize), |(s, n), d| (s + d.as_secs_f64(), n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 * 1e3 }
}

fn measure(
    dir: &std::path::Path,
    api_port: u16,
    preset: pd_engine::Preset,
    requests: usize,
    reps: usize,
    say: &dyn Fn(String),
) -> Result<CalibrateReport> {
    let name = preset.name();
    let crate::demo::Session { client, rt, agents } = crate::demo::session(dir, 2, api_port)?;
    deploy_ready(
        &client,
        &rt,
        name,
        name,
        json!({"prefill": 1, "decode": 1}),
        2,
        &agents,
    )?;
    let scrape = |rt: &tokio::runtime::Runtime| -> Result<Vec<String>> {
        agents
            .iter()
            .map(|a| rt.block_on(load::get(*a, "/metrics")).map(|(_, body)| body))
            .collect()
    };
    // The step counters once the agents have sampled the engines after the last request.
    let settled = |rt: &tokio::runtime::Runtime| -> Result<Vec<String>> {
        let until = Instant::now() + STATS_WAIT;
        let mut last = samples(&scrape(rt)?);
        loop {
            std::thread::sleep(STATS_SETTLE);
            let bodies = scrape(rt)?;
            let now = samples(&bodies);
            if now == last || Instant::now() >= until {
                return Ok(bodies);
            }
            last = now;
        }
    };

    // 1. Calibration: one request at a time for prefill step times, then closed loops at
    // rising concurrency for decode batches.
    let mut rng = Rng::new(SEED);
    let reqs: Vec<LoadRequest> = (0..CAL_PREFILL_REPEATS)
        .flat_map(|_| CAL_PROMPT_BYTES)
        .map(|bytes| LoadRequest {
            ignore_eos: false,
            prompt: load::text(&mut rng, bytes),
            max_tokens: CAL_MAX_TOKENS,
            at_s: 0.0,
        })
        .collect();
    say(format!(
        "calibration: {} requests one at a time (prefill step times)",
        reqs.len()
    ));
    let out = rt.block_on(load::closed_loop(&agents, name, &reqs, 1, SEED));
    if let Some(e) = out.iter().find_map(|o| o.error.clone()) {
        bail!("calibration run failed: {e}");
    }
    let (prefill, _) = samples(&settled(&rt)?);
    for c in CAL_CONCURRENCY {
        let reqs: Vec<LoadRequest> = (0..CAL_REQUESTS_PER_CONCURRENCY * c)
            .map(|i| LoadRequest {
                ignore_eos: false,
                prompt: load::text(&mut rng, CAL_PROMPT_BYTES[i % CAL_PROMPT_BYTES.len()]),
                max_tokens: CAL_MAX_TOKENS,
                at_s: 0.0,
            })
            .collect();
        say(format!(
            "calibration: {} requests at concurrency {c}",
            reqs.len()
        ));
        let out = rt.block_on(load::closed_loop(&agents, name, &reqs, c, SEED));
        if let Some(e) = out.iter().find_map(|o| o.error.clone()) {
            bail!("calibration run failed: {e}");
        }
    }
    let (_, decode) = samples(&settled(&rt)?);
    let cal = Calibration::fit(&prefill, &decode).context("fitting the step times")?;
    say(format!(
        "calibrated from {} prefill and {} decode buckets: prefill {:.2} ms + {:.3} ms/token, decode {:.2} ms + {:.3} ms/sequence",
        prefill.len(),
        decode.len(),
        cal.prefill_base_s * 1e3,
        cal.prefill_per_token_s * 1e3,
        cal.decode_base_s * 1e3,
        cal.decode_per_seq_s * 1e3
    ));

    // The layout as the planner sees it.
    let spec = pd_planner::parse_hf_config(
        name,
        &pd_engine::ModelConfig::preset(preset)
            .to_hf_json()
            .to_string(),
    )?;
    let host = SystemSpec::measured_host("this-cpu", 8e9, 1e9);
    let perf = PerfModel::new(&spec, &host, Dtypes::bf16(), 1, StepCost::Measured(cal))?;
    let group = |role| WorkerGroup {
        system: host.name.clone(),
        role,
        workers: 1,
        perf: perf.clone(),
        max_batch: RUNNING_MAX,
        max_step_tokens: STEP_TOKENS_MAX,
    };
    let layout = Layout {
        groups: vec![group(Role::Prefill), group(Role::Decode)],
    };

    // 2. The other workload's capacity, then runs at half of it.
    let fresh = |rng: &mut Rng, n: usize| -> Vec<LoadRequest> {
        (0..n)
            .map(|_| LoadRequest {
                ignore_eos: false,
                prompt: load::text(rng, PROMPT_BYTES),
                max_tokens: MAX_TOKENS,
                at_s: 0.0,
            })
            .collect()
    };
    say(format!(
        "capacity: {CAPACITY_REQUESTS} requests of {PROMPT_BYTES} bytes → {MAX_TOKENS} tokens at concurrency {CAPACITY_CONCURRENCY}"
    ));
    let reqs = fresh(&mut rng, CAPACITY_REQUESTS);
    let t = Instant::now();
    let out = rt.block_on(load::closed_loop(
        &agents,
        name,
        &reqs,
        CAPACITY_CONCURRENCY,
        SEED,
    ));
    if let Some(e) = out.iter().find_map(|o| o.error.clone()) {
        bail!("capacity run failed: {e}");
    }
    let capacity = CAPACITY_REQUESTS as f64 / t.elapsed().as_secs_f64();
    let rate = capacity / 2.0;
    let mut runs = Vec::new();
    for rep in 0..reps {
        say(format!(
            "run {}/{reps}: {requests} requests at {rate:.2}/s (half of {capacity:.2}/s)",
            rep + 1
        ));
        let times = load::poisson_times(requests, rate, &mut Rng::new(SEED + 1 + rep as u64));
        let reqs: Vec<LoadRequest> = fresh(&mut rng, requests)
            .into_iter()
            .zip(times)
            .map(|(r, at_s)| LoadRequest { at_s, ..r })
            .collect();
        let out = rt.block_on(load::open_loop(
            &agents,
            name,
            &reqs,
            SEED,
            Duration::from_secs(300),
        ));
        let ok: Vec<&load::Outcome> = out.iter().filter(|o| o.ok).collect();
        if ok.len() < requests / 2 {
            bail!(
                "run {} failed: {} of {requests} requests ended well",
                rep + 1,
                ok.len()
            );
        }
        // The simulator replays the same arrivals and lengths.
        let trace: Vec<Request> = reqs
            .iter()
            .zip(&out)
            .filter(|(_, o)| o.ok)
            .map(|(r, o)| Request {
                arrival_s: r.at_s,
                isl: o.prompt_tokens.max(1),
                osl: o.output_tokens.max(1),
            })
            .collect();
        let slo = Slo {
            ttft_s: 60.0,
            tpot_s: 60.0,
        };
        let sim = pd_planner::simulate(&spec, &layout, &trace, &slo)?;
        runs.push(Run {
            requests,
            failed: requests - ok.len(),
            measured_ttft_ms: mean_ms(ok.iter().map(|o| o.ttft)),
            predicted_ttft_ms: sim.ttft_s.mean * 1e3,
            measured_tpot_ms: mean_ms(ok.iter().filter_map(|o| o.tpot)),
            predicted_tpot_ms: sim.tpot_s.mean * 1e3,
        });
    }
    let avg = |f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    let (mt, pt) = (avg(|r| r.measured_ttft_ms), avg(|r| r.predicted_ttft_ms));
    let (mp, pp) = (avg(|r| r.measured_tpot_ms), avg(|r| r.predicted_tpot_ms));
    let ttft_error = pt / mt.max(1e-9) - 1.0;
    let tpot_error = pp / mp.max(1e-9) - 1.0;
    Ok(CalibrateReport {
        model: name.to_string(),
        layout: "1 prefill + 1 decode engine, one compute thread each".into(),
        calibration_workload: format!(
            "prompts of {CAL_PROMPT_BYTES:?} bytes, {CAL_MAX_TOKENS} output tokens, one at a time then closed loops at concurrency {CAL_CONCURRENCY:?}"
        ),
        workload: format!(
            "prompts of {PROMPT_BYTES} bytes, {MAX_TOKENS} output tokens, Poisson arrivals at half the measured capacity"
        ),
        prefill_samples: prefill.len(),
        decode_samples: decode.len(),
        calibration: BTreeMap::from([
            ("prefill_base_s".into(), cal.prefill_base_s),
            ("prefill_per_token_s".into(), cal.prefill_per_token_s),
            (
                "prefill_per_square_token_s".into(),
                cal.prefill_per_square_token_s,
            ),
            ("decode_base_s".into(), cal.decode_base_s),
            ("decode_per_seq_s".into(), cal.decode_per_seq_s),
            (
                "decode_per_context_token_s".into(),
                cal.decode_per_context_token_s,
            ),
        ]),
        capacity_per_s: capacity,
        rate_per_s: rate,
        runs,
        measured_ttft_ms: mt,
        predicted_ttft_ms: pt,
        measured_tpot_ms: mp,
        predicted_tpot_ms: pp,
        ttft_error,
        tpot_error,
        within_tolerance: ttft_error.abs() <= TOLERANCE && tpot_error.abs() <= TOLERANCE,
        tolerance: TOLERANCE,
    })
}

pub fn print(r: &CalibrateReport) {
    println!(
        "planner calibration check: {} on this machine, {}",
        r.model, r.layout
    );
    println!("calibrated on: {}", r.calibration_workload);
    println!("predicted for: {}", r.workload);
    println!(
        "capacity {:.2} requests/s, runs at {:.2}/s",
        r.capacity_per_s, r.rate_per_s
    );
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>10}",
        "run", "TTFT meas", "TTFT pred", "TPOT meas", "TPOT pred"
    );
    for (i, run) in r.runs.iter().enumerate() {
        println!(
            "{:<6} {:>7.1} ms {:>7.1} ms {:>7.2} ms {:>7.2} ms",
            i + 1,
            run.measured_ttft_ms,
            run.predicted_ttft_ms,
            run.measured_tpot_ms,
            run.predicted_tpot_ms
        );
    }
    println!(
        "mean   {:>7.1} ms {:>7.1} ms {:>7.2} ms {:>7.2} ms",
        r.measured_ttft_ms, r.predicted_ttft_ms, r.measured_tpot_ms, r.predicted_tpot_ms
    );
    println!(
        "predicted / measured: TTFT {:.3}, TPOT {:.3} ({} ±{:.0}%)",
        1.0 + r.ttft_error,
        1.0 + r.tpot_error,
        if r.within_tolerance {
            "within"
        } else {
            "NOT within"
        },
        r.tolerance * 100.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two agents' `/metrics`: series add up by label set; buckets become per-step means.
    #[test]
    fn step_counters_become_planner_samples() {
        let a = "\
# TYPE pdagent_engine_prefill_steps_total counter
pdagent_engine_prefill_steps_total{engine=\"m/prefill-0\",tokens_max=\"128\"} 4
pdagent_engine_prefill_step_tokens_total{engine=\"m/prefill-0\",tokens_max=\"128\"} 400
pdagent_engine_prefill_step_seconds_total{engine=\"m/prefill-0\",tokens_max=\"128\"} 0.2
pdagent_engine_prefill_steps_total{engine=\"m/prefill-0\",tokens_max=\"512\"} 0
pdagent_engine_decode_steps_total{engine=\"m/decode-0\",batch_max=\"4\",context_tokens_max=\"256\"} 10
pdagent_engine_decode_step_sequences_total{engine=\"m/decode-0\",batch_max=\"4\",context_tokens_max=\"256\"} 35
pdagent_engine_decode_step_seconds_total{engine=\"m/decode-0\",batch_max=\"4\",context_tokens_max=\"256\"} 0.05
pdagent_engine_decode_steps_total_other 7
"
        .to_string();
        let b = "pdagent_engine_prefill_steps_total{engine=\"m/prefill-0\",tokens_max=\"128\"} 1\n\
pdagent_engine_prefill_step_tokens_total{engine=\"m/prefill-0\",tokens_max=\"128\"} 100\n\
pdagent_engine_prefill_step_seconds_total{engine=\"m/prefill-0\",tokens_max=\"128\"} 0.05\n"
            .to_string();
        let (p, d) = samples(&[a, b]);
        // 5 steps, 500 tokens, 0.25 s; the empty bucket is left out.
        assert_eq!(p.len(), 1);
        assert!((p[0].tokens - 100.0).abs() < 1e-9 && (p[0].seconds - 0.05).abs() < 1e-9);
        assert_eq!(d.len(), 1);
        assert!((d[0].batch - 3.5).abs() < 1e-9);
        assert!((d[0].context_tokens - 192.0).abs() < 1e-9);
        assert!((d[0].seconds - 0.005).abs() < 1e-9);
        assert_eq!(
            label("engine=\"x\",batch_max=\"8\"", "batch_max"),
            Some(8.0)
        );
        assert_eq!(label("engine=\"x\"", "batch_max"), None);
    }
}
