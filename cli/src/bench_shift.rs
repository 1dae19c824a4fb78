//! `pdctl bench shift`: the coordinator's re-planning against a workload that changes shape.
//! A local cluster of `--nodes` agents (one fixture GPU each) serves the `tiny` preset with the
//! reference engine; the same arrivals (fixed seed, Poisson) run in phases, each a mix:
//! `decode` (short prompts, long outputs) or `prefill` (long prompts, short outputs). Runs:
//! - every static disaggregated layout of `--nodes` engines, over all phases, the layout kept
//!   (mode off): per phase, the best of them is (c), the reference;
//! - (a): the static layout best for phase 1 (from those runs), kept for the whole run;
//! - (b): the same start with `--autoplan on`: the coordinator flips and scales as it judges.
//!
//! Each run is preceded by a warm-up of mixed requests (not counted) so that the engines'
//! step counters hold both phases' shapes. Per phase it prints the share of requests within
//! both targets (judged at the client: TTFT and mean TPOT), TTFT and TPOT p90, failures, the
//! layouts in force and every move with its time; then (b)/(a) in requests within both
//! targets over the run, (b)/(c), and the moves per phase.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::json;

use crate::demo::{Session, undeploy_gone};
use crate::load::{self, LoadRequest, Outcome, Rng};

const MODEL: &str = "tiny";
const SEED: u64 = 11;
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// A request without its end after this long counts as hung (failed).
const GIVE_UP: Duration = Duration::from_secs(120);

/// The benchmark's settings (the flags).
#[derive(Debug, Clone, Serialize)]
pub struct ShiftOptions {
    pub nodes: usize,
    /// `decode` or `prefill`, in order.
    pub phases: Vec<String>,
    pub phase_s: f64,
    pub warmup_s: f64,
    pub decode_rate: f64,
    pub prefill_rate: f64,
    /// Prompt bytes (the preset's tokenizer is bytes): each request's prompt is drawn
    /// uniformly within ±50% of it.
    pub short_prompt: usize,
    pub long_prompt: usize,
    pub short_output: u32,
    pub long_output: u32,
    pub ttft_ms: u32,
    pub tpot_ms: u32,
    /// The re-planner's gain threshold and cool-down for run (b) (None: the defaults).
    pub threshold: Option<f64>,
    pub cooldown: Option<u32>,
    /// Skip the static runs: only the autoplan run, from this split (prefill, decode).
    pub autoplan_only: Option<(u32, u32)>,
}

impl ShiftOptions {
    pub fn validate(&self) -> Result<()> {
        if self.nodes < 2 {
            bail!("--nodes: at least 2 (one prefill and one decode engine)");
        }
        if self.phases.is_empty() {
            bail!("--phases: at least one of decode, prefill");
        }
        if let Some(p) = self
            .phases
            .iter()
            .find(|p| !matches!(p.as_str(), "decode" | "prefill"))
        {
            bail!("--phases: {p:?} is neither decode nor prefill");
        }
        if !(self.phase_s >= 10.0 && self.phase_s <= 3600.0) {
            bail!("--phase-s: 10 to 3600");
        }
        for (f, r) in [
            ("--decode-rate", self.decode_rate),
            ("--prefill-rate", self.prefill_rate),
        ] {
            if !(r > 0.0 && r <= 100.0) {
                bail!("{f}: above 0, at most 100 requests per second");
            }
        }
        if self.short_prompt == 0 || self.long_prompt == 0 || self.short_output == 0 {
            bail!("prompt and output lengths: at least 1");
        }
        Ok(())
    }

    fn mix(&self, phase: &str) -> (usize, u32, f64) {
        match phase {
            "prefill" => (self.long_prompt, self.short_output, self.prefill_rate),
            _ => (self.short_prompt, self.long_output, self.decode_rate),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub phase: String,
    pub requests: usize,
    pub within: usize,
    pub failed: usize,
    pub ttft_p90_ms: f64,
    pub tpot_p90_ms: f64,
    /// Layouts in force during the phase, in order.
    pub layouts: Vec<String>,
    /// Moves made during the phase: (seconds since the run's start, what).
    pub moves: Vec<(f64, String)>,
}

impl PhaseResult {
    /// The layouts in force and the moves, e.g. `1P3D → 2P2D; flip node-2 to prefill at 76 s`.
    fn course(&self) -> String {
        let moves: String = self
            .moves
            .iter()
            .map(|(t, m)| format!("; {m} at {t:.0} s"))
            .collect();
        format!("{}{moves}", self.layouts.join(" → "))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// `static 2P2D`, `autoplan from 1P3D`.
    pub name: String,
    pub phases: Vec<PhaseResult>,
}

impl RunResult {
    fn within(&self) -> usize {
        self.phases.iter().map(|p| p.within).sum()
    }
}

#[derive(Debug, Serialize)]
pub struct ShiftReport {
    pub options: ShiftOptions,
    /// Every static layout's run, then (b).
    pub statics: Vec<RunResult>,
    pub autoplan: RunResult,
    /// The static run best for phase 1: (a).
    pub baseline: String,
    /// Per phase, the static layout best for it: (c).
    pub best_static: Vec<String>,
    pub within_a: usize,
    pub within_b: usize,
    pub within_c: usize,
    pub requests: usize,
    /// (b)/(a) and (b)/(c), in requests within both targets over the run.
    pub ratio_b_a: f64,
    pub ratio_b_c: f64,
    pub failed_b: usize,
}

/// The same arrivals for every run: per phase, Poisson at its rate, prompts within ±50% of
/// the mix's length.
fn workload(o: &ShiftOptions) -> Vec<Vec<LoadRequest>> {
    let mut rng = Rng::new(SEED);
    o.phases
        .iter()
        .map(|phase| {
            let (prompt, output, rate) = o.mix(phase);
            let n = (rate * o.phase_s).round().max(1.0) as usize;
            let times = load::poisson_times(n, rate, &mut rng);
            times
                .into_iter()
                .filter(|t| *t < o.phase_s)
                .map(|at_s| {
                    let bytes = ((prompt as f64) * (0.5 + rng.unit())).round().max(1.0) as usize;
                    LoadRequest {
                        ignore_eos: true,
                        prompt: load::text(&mut rng, bytes),
                        max_tokens: output,
                        at_s,
                    }
                })
                .collect()
        })
        .collect()
}

/// Mixed requests for the warm-up, at the mean of the two rates.
fn warmup(o: &ShiftOptions) -> Vec<LoadRequest> {
    let mut rng = Rng::new(SEED ^ 0xA5A5);
    let rate = (o.decode_rate + o.prefill_rate) / 2.0;
    let n = (rate * o.warmup_s).round() as usize;
    load::poisson_times(n, rate, &mut rng)
        .into_iter()
        .enumerate()
        .map(|(i, at_s)| {
            let phase = if i % 2 == 0 { "decode" } else { "prefill" };
            let (prompt, output, _) = o.mix(phase);
            let bytes = ((prompt as f64) * (0.5 + rng.unit())).round().max(1.0) as usize;
            LoadRequest {
                ignore_eos: true,
                prompt: load::text(&mut rng, bytes),
                max_tokens: output,
                at_s,
            }
        })
        .collect()
}

/// Every disaggregated split of `n` engines.
fn splits(n: usize) -> Vec<(u32, u32)> {
    (1..n as u32).map(|p| (p, n as u32 - p)).collect()
}

/// `1P3D` as (1, 3).
pub fn parse_split(s: &str) -> Result<(u32, u32)> {
    let bad = || anyhow::anyhow!("{s:?}: a layout like 1P3D");
    let (p, d) = s
        .to_ascii_uppercase()
        .split_once('P')
        .map(|(p, d)| (p.to_string(), d.to_string()))
        .ok_or_else(bad)?;
    let d = d.strip_suffix('D').ok_or_else(bad)?;
    let (p, d): (u32, u32) = (p.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
    if p == 0 || d == 0 {
        return Err(bad());
    }
    Ok((p, d))
}

fn split_name((p, d): (u32, u32)) -> String {
    format!("{p}P{d}D")
}

pub fn run(o: &ShiftOptions, json_out: bool) -> Result<ShiftReport> {
    o.validate()?;
    let say = |s: String| {
        if !json_out {
            eprintln!("{s}");
        }
    };
    let phases = workload(o);
    let total: usize = phases.iter().map(Vec::len).sum();
    say(format!(
        "bench shift: {} agents, phases {} of {:.0} s, {total} requests; targets TTFT {} ms, TPOT {} ms",
        o.nodes,
        o.phases.join(","),
        o.phase_s,
        o.ttft_ms,
        o.tpot_ms
    ));
    crate::local::with_cluster("bench-shift", o.nodes, 1, |dir, api_port| {
        let s = crate::demo::session(dir, o.nodes, api_port)?;
        if let Some(start) = o.autoplan_only {
            say(format!("autoplan on from {}:", split_name(start)));
            let b = one_run(&s, o, &phases, "shift-autoplan", start, "on", &say)?;
            return Ok(ShiftReport {
                options: o.clone(),
                baseline: String::new(),
                best_static: Vec::new(),
                within_a: 0,
                within_b: b.within(),
                within_c: 0,
                requests: total,
                ratio_b_a: f64::NAN,
                ratio_b_c: f64::NAN,
                failed_b: b.phases.iter().map(|p| p.failed).sum(),
                statics: Vec::new(),
                autoplan: b,
            });
        }
        let mut statics = Vec::new();
        for (k, split) in splits(o.nodes).into_iter().enumerate() {
            let name = format!("shift-static-{k}");
            say(format!("static {}:", split_name(split)));
            let r = one_run(&s, o, &phases, &name, split, "off", &say)?;
            statics.push(RunResult {
                name: format!("static {}", split_name(split)),
                ..r
            });
        }
        let best_for = |i: usize| -> usize {
            (0..statics.len())
                .max_by_key(|&k| (statics[k].phases[i].within, usize::MAX - k))
                .expect("a static run")
        };
        let a = best_for(0);
        let start = splits(o.nodes)[a];
        say(format!("autoplan on from {}:", split_name(start)));
        let b = one_run(&s, o, &phases, "shift-autoplan", start, "on", &say)?;
        let b = RunResult {
            name: format!("autoplan from {}", split_name(start)),
            ..b
        };
        let best_static: Vec<usize> = (0..phases.len()).map(best_for).collect();
        let within_c = best_static
            .iter()
            .enumerate()
            .map(|(i, &k)| statics[k].phases[i].within)
            .sum();
        let (within_a, within_b) = (statics[a].within(), b.within());
        let ratio = |x: usize, y: usize| {
            if y == 0 {
                f64::NAN
            } else {
                x as f64 / y as f64
            }
        };
        Ok(ShiftReport {
            options: o.clone(),
            baseline: statics[a].name.clone(),
            best_static: best_static
                .iter()
                .map(|&k| statics[k].name.clone())
                .collect(),
            within_a,
            within_b,
            within_c,
            requests: total,
            ratio_b_a: ratio(within_b, within_a),
            ratio_b_c: ratio(within_b, within_c),
            failed_b: b.phases.iter().map(|p| p.failed).sum(),
            statics,
            autoplan: b,
        })
    })
}

/// One run: deploy (planned for phase 1's shape, then scaled to `start`), warm up, the phases,
/// the moves read back from the recorded decisions, undeploy.
fn one_run(
    s: &Session,
    o: &ShiftOptions,
    phases: &[Vec<LoadRequest>],
    name: &str,
    start: (u32, u32),
    mode: &str,
    say: &dyn Fn(String),
) -> Result<RunResult> {
    let Session { client, rt, agents } = s;
    let (isl, osl, _) = o.mix(&o.phases[0]);
    let mut autoplan = json!({"mode": mode});
    if mode == "on" {
        if let Some(t) = o.threshold {
            autoplan["threshold"] = json!(t);
        }
        if let Some(c) = o.cooldown {
            autoplan["cooldown_windows"] = json!(c);
        }
    }
    let body = json!({
        "name": name, "engine": "builtin", "model": MODEL, "tp": 1,
        "layout": "planned", "isl": isl, "osl": osl, "max_gpus": o.nodes,
        "ttft_ms": o.ttft_ms, "tpot_ms": o.tpot_ms, "autoplan": autoplan,
    });
    rt.block_on(client.send::<_, pd_api::Created>("POST", "/v1/deployments", Some(&body)))?;
    let layout = json!({"prefill": start.0, "decode": start.1});
    rt.block_on(client.send::<_, pd_api::Changed>(
        "PUT",
        &format!("/v1/deployments/{name}/layout"),
        Some(&layout),
    ))?;
    crate::wait_engines_ready(client, name, o.nodes, READY_TIMEOUT)?;
    let warm = warmup(o);
    if !warm.is_empty() {
        rt.block_on(load::open_loop(agents, name, &warm, SEED, GIVE_UP));
    }
    let t0_unix = now_unix_f();
    let t0 = Instant::now();
    let mut results = Vec::new();
    for (i, reqs) in phases.iter().enumerate() {
        let phase_start = t0 + Duration::from_secs_f64(o.phase_s * i as f64);
        let now = Instant::now();
        if phase_start > now {
            std::thread::sleep(phase_start - now);
        }
        // Phase i's arrivals, from its start; the next phase starts on time even if some of
        // these are still running (they are counted in this phase).
        let handle = {
            let (agents, name, reqs) = (agents.clone(), name.to_string(), reqs.clone());
            rt.spawn(async move { load::open_loop(&agents, &name, &reqs, SEED, GIVE_UP).await })
        };
        results.push(handle);
    }
    let mut outcomes = Vec::new();
    for h in results {
        outcomes.push(rt.block_on(h)?);
    }
    let events: pd_api::Events =
        rt.block_on(client.get(&format!("/v1/events?deployment={name}")))?;
    if mode == "on" {
        for e in &events.events {
            let d = &e.decision;
            say(format!(
                "    window {:>3} at {:>5.0} s: {} {:>4} requests, {:>3} of {:>3} within, best {} ({}){}",
                d.window,
                d.decided_unix as f64 - t0_unix,
                crate::autoplan::layout_name(&d.layout),
                d.requests,
                d.within_slo,
                d.finished,
                d.best,
                d.reason,
                d.moved
                    .as_ref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
        }
    }
    let mut layout_now = split_name(start);
    let mut out = Vec::new();
    for (i, os) in outcomes.iter().enumerate() {
        let (from, to) = (o.phase_s * i as f64, o.phase_s * (i + 1) as f64);
        let mut layouts = vec![layout_now.clone()];
        let mut moves = Vec::new();
        for e in &events.events {
            let at = e.decision.decided_unix as f64 - t0_unix;
            let last = i + 1 == outcomes.len();
            if at < from || (at >= to && !last) {
                continue;
            }
            if let Some(m) = &e.decision.moved {
                moves.push((at, m.to_string()));
                layout_now = after(&e.decision.layout, m);
                layouts.push(layout_now.clone());
            }
        }
        let r = judge(&o.phases[i], os, o, layouts, moves);
        say(format!(
            "  phase {} {:<7}: {:>4} requests, {:>5.1}% within both targets, TTFT p90 {:>7.0} ms, TPOT p90 {:>6.1} ms, {} failed, layout {}",
            i + 1,
            r.phase,
            r.requests,
            pct(r.within, r.requests),
            r.ttft_p90_ms,
            r.tpot_p90_ms,
            r.failed,
            r.course(),
        ));
        out.push(r);
    }
    undeploy_gone(client, rt, name)?;
    Ok(RunResult {
        name: name.to_string(),
        phases: out,
    })
}

/// The layout after a move from `layout`.
fn after(layout: &pd_api::Layout, m: &pd_api::AutoplanMove) -> String {
    let (p, d) = match layout {
        pd_api::Layout::Disaggregated { prefill, decode } => (*prefill, *decode),
        pd_api::Layout::Colocated { .. } => return crate::autoplan::layout_name(layout),
    };
    match m {
        pd_api::AutoplanMove::Flip {
            role: pd_api::EngineRole::Prefill,
            ..
        } => split_name((p + 1, d.saturating_sub(1))),
        pd_api::AutoplanMove::Flip { .. } => split_name((p.saturating_sub(1), d + 1)),
        pd_api::AutoplanMove::Scale { layout } => crate::autoplan::layout_name(layout),
    }
}

fn judge(
    phase: &str,
    os: &[Outcome],
    o: &ShiftOptions,
    layouts: Vec<String>,
    moves: Vec<(f64, String)>,
) -> PhaseResult {
    let ttft = Duration::from_millis(u64::from(o.ttft_ms));
    let tpot = Duration::from_millis(u64::from(o.tpot_ms));
    let ok: Vec<&Outcome> = os.iter().filter(|x| x.ok).collect();
    let within = ok
        .iter()
        .filter(|x| x.ttft <= ttft && x.tpot.is_none_or(|t| t <= tpot))
        .count();
    let ttfts: Vec<Duration> = ok.iter().map(|x| x.ttft).collect();
    let tpots: Vec<Duration> = ok.iter().filter_map(|x| x.tpot).collect();
    PhaseResult {
        phase: phase.to_string(),
        requests: os.len(),
        within,
        failed: os.len() - ok.len(),
        ttft_p90_ms: load::percentile_ms(&ttfts, 90.0),
        tpot_p90_ms: load::percentile_ms(&tpots, 90.0),
        layouts,
        moves,
    }
}

fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

fn now_unix_f() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub fn print(r: &ShiftReport) {
    println!(
        "bench shift: {} agents, phases {} of {:.0} s, {} requests, targets TTFT {} ms / TPOT {} ms",
        r.options.nodes,
        r.options.phases.join(","),
        r.options.phase_s,
        r.requests,
        r.options.ttft_ms,
        r.options.tpot_ms
    );
    println!(
        "{:<22} {:>5} {:<8} {:>8} {:>10} {:>10} {:>6}  LAYOUT / MOVES",
        "RUN", "PHASE", "MIX", "WITHIN", "TTFT p90", "TPOT p90", "FAILED"
    );
    for run in r.statics.iter().chain(std::iter::once(&r.autoplan)) {
        for (i, p) in run.phases.iter().enumerate() {
            println!(
                "{:<22} {:>5} {:<8} {:>7.1}% {:>8.0}ms {:>8.1}ms {:>6}  {}",
                run.name,
                i + 1,
                p.phase,
                pct(p.within, p.requests),
                p.ttft_p90_ms,
                p.tpot_p90_ms,
                p.failed,
                p.course(),
            );
        }
    }
    let moves: Vec<String> = r
        .autoplan
        .phases
        .iter()
        .map(|p| p.moves.len().to_string())
        .collect();
    println!(
        "(a) {} kept: {} of {} within both targets; (b) {}: {}; (c) best static per phase ({}): {}",
        r.baseline,
        r.within_a,
        r.requests,
        r.autoplan.name,
        r.within_b,
        r.best_static.join(", "),
        r.within_c
    );
    println!(
        "(b)/(a) = {:.2}, (b)/(c) = {:.2}; moves per phase: {}; failed requests under autoplan: {}",
        r.ratio_b_a,
        r.ratio_b_c,
        moves.join(", "),
        r.failed_b
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ShiftOptions {
        ShiftOptions {
            nodes: 4,
            phases: vec!["decode".into(), "prefill".into(), "decode".into()],
            phase_s: 60.0,
            warmup_s: 20.0,
            decode_rate: 2.0,
            prefill_rate: 2.0,
            short_prompt: 64,
            long_prompt: 1000,
            short_output: 4,
            long_output: 64,
            ttft_ms: 1000,
            tpot_ms: 100,
            threshold: None,
            cooldown: None,
            autoplan_only: None,
        }
    }

    #[test]
    fn every_run_gets_the_same_arrivals_shaped_by_phase() {
        let o = opts();
        let a = workload(&o);
        let b = workload(&o);
        assert_eq!(a.len(), 3);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.len(), y.len());
            assert!(
                x.iter()
                    .zip(y)
                    .all(|(p, q)| p.prompt == q.prompt && p.at_s == q.at_s)
            );
        }
        assert!(
            a[0].iter()
                .all(|r| r.max_tokens == 64 && r.prompt.len() <= 96)
        );
        assert!(
            a[1].iter()
                .all(|r| r.max_tokens == 4 && r.prompt.len() >= 500)
        );
        assert!(a[1].iter().all(|r| r.at_s < 60.0));
        assert_eq!(splits(4), vec![(1, 3), (2, 2), (3, 1)]);
    }

    #[test]
    fn bad_options_are_refused_naming_the_flag() {
        let mut o = opts();
        o.phases = vec!["both".into()];
        assert!(o.validate().unwrap_err().to_string().contains("--phases"));
        let mut o = opts();
        o.decode_rate = 0.0;
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("--decode-rate")
        );
        let mut o = opts();
        o.nodes = 1;
        assert!(o.validate().unwrap_err().to_string().contains("--nodes"));
    }
}
