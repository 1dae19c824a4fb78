//! The layout search: tensor parallelism per phase, prefill and decode engine counts (xPyD)
//! and batch limits, disaggregated and colocated, over one or several GPU types.
//!
//! Two stages. The analytic stage rates every engine shape on its own — prefill engines by
//! the request rate at which TTFT still holds at p90 (x engines behind one router as an M/D/c
//! queue), decode engines at the largest batch whose step meets the TPOT target, colocated
//! engines by the share of steps their prompt chunks take — and enumerates every split of
//! every GPU pool between the phases, a few multiplications each. The simulation stage takes
//! the best layout of each of the best few engine-shape mixes per mode, finds by bisection
//! the highest Poisson arrival rate at which 90% of requests meet both targets (the
//! goodput), and improves the winner by local moves while the simulator agrees. The frontier
//! comes from the analytic stage: for each decode batch limit and shape mix, tokens/s/GPU
//! against tokens/s/user, keeping the points nothing beats on both.
//!
//! Per-GPU figures divide by every GPU of the pools that can hold the model, so GPUs a
//! layout leaves idle count against it.

use crate::sim::{Layout, Role, WorkerGroup, simulate_after};
use crate::{
    Dtypes, LengthDist, ModelSpec, PerfModel, PlanError, SimReport, Slo, StepCost, StepLoad,
    Summary, SystemSpec, Workload,
};

/// GPUs of one type that the plan may use.
#[derive(Debug, Clone)]
pub struct GpuPool {
    pub system: SystemSpec,
    pub gpus: u32,
    /// Roofline with efficiency factors, or measured step times (then only TP 1, as measured).
    pub cost: StepCost,
}

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: ModelSpec,
    pub pools: Vec<GpuPool>,
    pub dtypes: Dtypes,
    pub isl: u32,
    pub osl: u32,
    pub slo: Slo,
    /// Seed of the simulated arrivals.
    pub seed: u64,
    /// Only this TP size, for prefill and decode alike (a deployment with one `--tp`); `None`
    /// searches 1, 2, 4 and 8 per phase.
    pub tp: Option<u32>,
}

/// One evaluated layout.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub layout: Layout,
    /// GPUs the layout uses.
    pub gpus: u32,
    /// GPUs of the pools that can hold the model at all: the denominator of the per-GPU
    /// figures, so that GPUs a layout leaves idle count against it.
    pub fleet_gpus: u32,
    /// The goodput: the highest request rate at which 90% of requests met both targets.
    pub request_rate_per_s: f64,
    pub output_tokens_per_s_per_gpu: f64,
    /// 1 / mean TPOT at that rate.
    pub output_tokens_per_s_per_user: f64,
    pub ttft_s: Summary,
    pub tpot_s: Summary,
    pub slo_attainment: f64,
    /// What the analytic stage expected, for comparison.
    pub analytic_output_tokens_per_s_per_gpu: f64,
}

impl Candidate {
    fn groups(&self, role: Role) -> impl Iterator<Item = &WorkerGroup> {
        self.layout.groups.iter().filter(move |g| g.role == role)
    }

    pub fn prefill_workers(&self) -> u32 {
        self.groups(Role::Prefill).map(|g| g.workers).sum()
    }

    pub fn decode_workers(&self) -> u32 {
        self.groups(Role::Decode).map(|g| g.workers).sum()
    }

    pub fn colocated_workers(&self) -> u32 {
        self.groups(Role::Colocated).map(|g| g.workers).sum()
    }

    /// The largest TP of a role (groups of one role share it unless the pools differ).
    pub fn tp(&self, role: Role) -> u32 {
        self.groups(role).map(|g| g.perf.tp).max().unwrap_or(0)
    }

    /// "2P6D", "8 colocated", with the GPU types where several pools are in use.
    pub fn describe(&self) -> String {
        let mut systems: Vec<&str> = self
            .layout
            .groups
            .iter()
            .map(|g| g.system.as_str())
            .collect();
        systems.sort_unstable();
        systems.dedup();
        describe(&self.layout, systems.len() > 1)
    }
}

/// A point on the throughput–interactivity frontier.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontierPoint {
    pub colocated: bool,
    pub layout: String,
    /// GPUs the layout uses.
    pub gpus: u32,
    pub decode_batch: u32,
    pub output_tokens_per_s_per_gpu: f64,
    pub output_tokens_per_s_per_user: f64,
    /// Whether the point meets the TPOT target (every point meets the TTFT target).
    pub meets_tpot: bool,
}

/// The search's answer.
#[derive(Debug, Clone)]
pub struct Plan {
    pub disaggregated: Option<Candidate>,
    pub colocated: Option<Candidate>,
    /// Disaggregated over colocated output tokens/s/GPU, where both exist.
    pub ratio: Option<f64>,
    pub frontier: Vec<FrontierPoint>,
    /// Layouts the analytic stage rated, and simulations run.
    pub layouts_rated: u64,
    pub simulations: u32,
    /// Why a mode or a pool found nothing (model too large, targets out of reach).
    pub notes: Vec<String>,
}

impl Plan {
    /// The layout to deploy: the mode with more output tokens/s/GPU.
    pub fn best(&self) -> Option<&Candidate> {
        match (&self.disaggregated, &self.colocated) {
            (Some(d), Some(c)) if c.output_tokens_per_s_per_gpu > d.output_tokens_per_s_per_gpu => {
                Some(c)
            }
            (Some(d), _) => Some(d),
            (None, c) => c.as_ref(),
        }
    }
}

/// Analytic targets sit below the real ones: p90s and admission waits add to the means.
const TARGET_MARGIN: f64 = 0.9;
/// Average decode occupancy the analytic stage assumes of a batch limit.
const DECODE_OCCUPANCY: f64 = 0.85;
const TP_SIZES: [u32; 4] = [1, 2, 4, 8];
/// Longest prompt + output the planner accepts (beyond any served context length today).
const MAX_SEQUENCE_TOKENS: u64 = 1 << 20;
const MAX_BATCH_LIMIT: u32 = 1024;
const COLOCATED_STEP_TOKENS: [u32; 5] = [1024, 2048, 4096, 8192, 16384];
/// Engines in one simulation; larger layouts are simulated as a proportional slice.
const SIMULATED_ENGINES_MAX: u32 = 64;
/// Layouts per mode that the simulator checks.
const SIMULATED_PER_MODE: usize = 5;
/// Engine-shape mixes per decode batch limit that the frontier considers.
const FRONTIER_MIXES: usize = 16;
/// Rounds of local moves on the best simulated layout of a mode.
const REFINE_ROUNDS_MAX: usize = 4;
/// Small layouts need a long run too: an arrival rate a few percent above capacity shows
/// only as a backlog that grows with time, and must grow past the TTFT target's slack
/// within the measured span to be caught.
const SIM_REQUESTS_MIN: f64 = 2_000.0;
/// Enough for 4 lifetimes of the largest fleets' decode batches (64 engines × 1024).
const SIM_REQUESTS_MAX: f64 = 300_000.0;

/// An engine shape on one pool, rated on its own.
#[derive(Debug, Clone)]
struct Shape {
    pool: usize,
    role: Role,
    tp: u32,
    max_batch: u32,
    max_step_tokens: u32,
    /// Requests per second one engine sustains within the targets.
    requests_per_s_per_engine: f64,
    /// Predicted mean step (decode) or TPOT (colocated).
    tpot_s: f64,
    /// Prefill: for x engines (index x − 1), the rate they sustain together and the step
    /// limit that gives it. Engines behind one balancing router share a queue, so x engines
    /// do more than x times one (M/D/c, not x × M/D/1).
    by_count: Vec<(f64, u32)>,
}

impl Shape {
    /// Requests per second of `x` such engines.
    fn rate(&self, x: u32) -> f64 {
        match self.by_count.get(x as usize - 1) {
            Some((rate, _)) => *rate,
            None => self.requests_per_s_per_engine * x as f64,
        }
    }

    /// The shape as `x` engines run it (prefill: the step limit chosen for x).
    fn for_count(&self, x: u32) -> Shape {
        let mut s = self.clone();
        if let Some(&(rate, tokens)) = self.by_count.get(x as usize - 1) {
            s.requests_per_s_per_engine = rate / x as f64;
            s.max_step_tokens = tokens;
        }
        s
    }
}

/// p90 of the wait in an M/M/c queue: P(W > t) = C·e^{−(cμ−λ)t}, C from Erlang's formula
/// (through the numerically stable Erlang-B recursion).
fn mmc_wait_p90_s(c: u32, lambda: f64, mu: f64) -> f64 {
    let a = lambda / mu;
    let rho = a / c as f64;
    if rho >= 1.0 {
        return f64::INFINITY;
    }
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (k as f64 + a * b);
    }
    let erlang_c = b / (1.0 - rho * (1.0 - b));
    if erlang_c <= 0.1 {
        0.0
    } else {
        (10.0 * erlang_c).ln() / (c as f64 * mu - lambda)
    }
}

/// Deterministic service waits about half as long as exponential service: the simulator's
/// M/D/1 p90 wait is 0.47–0.53 of M/M/1's at ρ from 0.3 to 0.8.
const DETERMINISTIC_WAIT_FACTOR: f64 = 0.5;

/// The highest arrival rate at which c servers of rate μ keep `fixed_s` plus the p90 wait
/// within `target_s` (utilization capped at 0.9); 0 when even an idle system misses it.
fn max_rate_within(c: u32, mu: f64, fixed_s: f64, target_s: f64) -> f64 {
    if fixed_s >= target_s {
        return 0.0;
    }
    let ok = |rho: f64| {
        let lambda = rho * c as f64 * mu;
        fixed_s + DETERMINISTIC_WAIT_FACTOR * mmc_wait_p90_s(c, lambda, mu) <= target_s
    };
    let (mut lo, mut hi) = (0.0, 0.9);
    if ok(hi) {
        return hi * c as f64 * mu;
    }
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo * c as f64 * mu
}

struct Ctx<'a> {
    req: &'a PlanRequest,
    perfs: Vec<Vec<Option<PerfModel>>>,
    /// GPUs of the pools where the model fits at some TP.
    fleet_gpus: u32,
}

impl Ctx<'_> {
    fn perf(&self, pool: usize, tp: u32) -> Option<&PerfModel> {
        let i = TP_SIZES.iter().position(|&t| t == tp)?;
        self.perfs[pool][i].as_ref()
    }
}

/// Searches layouts for `req` and simulates the best few of each mode.
pub fn plan(req: &PlanRequest) -> Result<Plan, PlanError> {
    validate(req)?;
    let mut notes = Vec::new();
    let longest = (req.isl + req.osl) as f64;
    let mut perfs = Vec::new();
    for (i, pool) in req.pools.iter().enumerate() {
        let mut row = Vec::new();
        for tp in TP_SIZES {
            let allowed = tp <= pool.gpus
                && req.tp.is_none_or(|t| t == tp)
                && tp <= pool.system.gpus_per_node
                && (tp == 1 || matches!(pool.cost, StepCost::Roofline(_)));
            let perf = if allowed {
                let p = PerfModel::new(&req.model, &pool.system, req.dtypes, tp, pool.cost)?;
                (p.max_sequences(&req.model, longest) > 0).then_some(p)
            } else {
                None
            };
            row.push(perf);
        }
        if row.iter().all(Option::is_none) {
            notes.push(format!(
                "{} ({} GPUs): {} in {} does not fit with a {}-token sequence at {}",
                pool.system.name,
                req.pools[i].gpus,
                req.model.name,
                req.dtypes.weights,
                longest,
                match req.tp {
                    Some(tp) => format!("TP {tp}"),
                    None => format!("any TP up to {}", pool.system.gpus_per_node.min(pool.gpus)),
                }
            ));
        }
        perfs.push(row);
    }
    let fleet_gpus = req
        .pools
        .iter()
        .zip(&perfs)
        .filter(|(_, row)| row.iter().any(Option::is_some))
        .map(|(p, _)| p.gpus)
        .sum();
    let ctx = Ctx {
        req,
        perfs,
        fleet_gpus,
    };
    let mut rated = 0u64;
    let mut sims = 0u32;

    // Disaggregated.
    let prefill = prefill_shapes(&ctx);
    let decode_best: Vec<Vec<Shape>> = (0..req.pools.len())
        .map(|p| decode_shapes(&ctx, p, None))
        .collect();
    let disagg_layouts =
        enumerate_disaggregated(&ctx, &prefill, &decode_best, SIMULATED_PER_MODE, &mut rated);
    let best_disagg = simulate_best(&ctx, &disagg_layouts, &mut sims)?;
    if best_disagg.is_none() {
        notes.push(if disagg_layouts.is_empty() {
            "disaggregated: no split of the GPUs into prefill and decode engines meets the targets"
                .into()
        } else {
            "disaggregated: no simulated layout met the targets for 90% of requests".into()
        });
    }

    // Colocated.
    let coloc: Vec<Vec<Shape>> = (0..req.pools.len())
        .map(|p| colocated_shapes(&ctx, p, true))
        .collect();
    let coloc_layouts = enumerate_colocated(&ctx, &coloc, SIMULATED_PER_MODE, &mut rated);
    let best_coloc = simulate_best(&ctx, &coloc_layouts, &mut sims)?;
    if best_coloc.is_none() {
        notes.push(if coloc_layouts.is_empty() {
            "colocated: no engine shape meets both targets at once".into()
        } else {
            "colocated: no simulated layout met the targets for 90% of requests".into()
        });
    }

    let frontier = frontier(&ctx, &prefill, &mut rated);
    let ratio = match (&best_disagg, &best_coloc) {
        (Some(d), Some(c)) if c.output_tokens_per_s_per_gpu > 0.0 => {
            Some(d.output_tokens_per_s_per_gpu / c.output_tokens_per_s_per_gpu)
        }
        _ => None,
    };
    Ok(Plan {
        disaggregated: best_disagg,
        colocated: best_coloc,
        ratio,
        frontier,
        layouts_rated: rated,
        simulations: sims,
        notes,
    })
}

/// Simulates the analytic stage's best layouts of one mode, then improves the winner by
/// local moves while the simulator says so: the analytic stage rates each engine on its own,
/// the simulator sees them together.
fn simulate_best(
    ctx: &Ctx,
    layouts: &[Rated],
    sims: &mut u32,
) -> Result<Option<Candidate>, PlanError> {
    let mut best: Option<(Candidate, Vec<(Shape, u32)>)> = None;
    for (shapes, analytic) in layouts.iter().take(SIMULATED_PER_MODE) {
        let to_beat = best.as_ref().map(|(b, _)| b.output_tokens_per_s_per_gpu);
        if let Some(c) = evaluate(ctx, shapes, *analytic, to_beat, sims)?
            && best.as_ref().is_none_or(|(b, _)| better(&c, b))
        {
            best = Some((c, shapes.clone()));
        }
    }
    let key = |groups: &[(Shape, u32)]| -> Vec<(u32, u32, u32)> {
        groups
            .iter()
            .map(|(s, n)| (*n, s.max_batch, s.max_step_tokens))
            .collect()
    };
    let mut seen = Vec::new();
    for _ in 0..REFINE_ROUNDS_MAX {
        let Some((_, groups)) = best.clone() else {
            break;
        };
        seen.push(key(&groups));
        let mut improved = false;
        for n in neighbours(ctx, &groups) {
            if seen.contains(&key(&n)) {
                continue;
            }
            seen.push(key(&n));
            let analytic = analytic_per_gpu(ctx, &n);
            let to_beat = best.as_ref().map(|(b, _)| b.output_tokens_per_s_per_gpu);
            if let Some(c) = evaluate(ctx, &n, analytic, to_beat, sims)?
                && best.as_ref().is_none_or(|(b, _)| better(&c, b))
            {
                best = Some((c, n));
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
    Ok(best.map(|(c, _)| c))
}

fn validate(req: &PlanRequest) -> Result<(), PlanError> {
    if req.pools.is_empty() || req.pools.iter().all(|p| p.gpus == 0) {
        return Err(PlanError::invalid(
            "GPUs",
            "the plan needs at least one GPU",
        ));
    }
    if req.pools.iter().map(|p| p.gpus as u64).sum::<u64>() > 100_000 {
        return Err(PlanError::invalid("GPUs", "more than 100000 GPUs"));
    }
    if req.isl == 0 || req.osl == 0 || req.isl as u64 + req.osl as u64 > MAX_SEQUENCE_TOKENS {
        return Err(PlanError::invalid(
            "ISL/OSL",
            format!(
                "ISL {} + OSL {}: each must be ≥ 1 token, together at most {MAX_SEQUENCE_TOKENS}",
                req.isl, req.osl
            ),
        ));
    }
    if let Some(tp) = req.tp
        && !TP_SIZES.contains(&tp)
    {
        return Err(PlanError::invalid(
            "TP",
            format!("TP {tp}: one of 1, 2, 4 or 8"),
        ));
    }
    let ok = |v: f64| v > 0.0 && v.is_finite();
    if !ok(req.slo.ttft_s) || !ok(req.slo.tpot_s) {
        return Err(PlanError::invalid(
            "targets",
            format!(
                "TTFT {} s and TPOT {} s must be positive",
                req.slo.ttft_s, req.slo.tpot_s
            ),
        ));
    }
    Ok(())
}

fn better(a: &Candidate, b: &Candidate) -> bool {
    (a.output_tokens_per_s_per_gpu, a.request_rate_per_s)
        > (b.output_tokens_per_s_per_gpu, b.request_rate_per_s)
}

/// Prefill engines per (pool, TP), rated for every engine count x: for each prompts-per-step
/// limit, TTFT ≈ step + exposed KV transfer + p90 wait of an M/D/c queue (c = x engines,
/// each serving a batch per step); per x the limit with the highest rate wins.
fn prefill_shapes(ctx: &Ctx) -> Vec<Vec<Shape>> {
    let req = ctx.req;
    let isl = req.isl;
    let ttft = req.slo.ttft_s * TARGET_MARGIN;
    (0..req.pools.len())
        .map(|pool| {
            let mut out = Vec::new();
            for tp in TP_SIZES {
                let Some(perf) = ctx.perf(pool, tp) else {
                    continue;
                };
                let transfer = perf.kv_transfer_s(perf, &req.model, isl as f64);
                let engines = req.pools[pool].gpus / tp;
                let mut by_count = vec![(0.0, isl); engines as usize];
                let mut prompts = 1u32;
                loop {
                    let step = perf.step_s(&StepLoad::prompts(&vec![isl; prompts as usize]));
                    let exposed = (transfer - step).max(transfer / req.model.layers as f64);
                    if step + exposed >= ttft {
                        break;
                    }
                    let mu = prompts as f64 / step;
                    for (i, best) in by_count.iter_mut().enumerate() {
                        let rate = max_rate_within(i as u32 + 1, mu, step + exposed, ttft);
                        if rate > best.0 {
                            *best = (rate, prompts * isl);
                        }
                    }
                    prompts *= 2;
                    if prompts * isl > 32_768 {
                        break;
                    }
                }
                if by_count.first().is_some_and(|b| b.0 > 0.0) {
                    out.push(Shape {
                        pool,
                        role: Role::Prefill,
                        tp,
                        max_batch: 0,
                        max_step_tokens: by_count[0].1,
                        requests_per_s_per_engine: by_count[0].0,
                        tpot_s: 0.0,
                        by_count,
                    });
                }
            }
            out
        })
        .collect()
}

/// Decode engines per TP on one pool. `batch: None`: the largest batch whose step meets the
/// TPOT target (the most throughput within it); `Some(b)`: exactly batch b, target ignored
/// (for the frontier).
fn decode_shapes(ctx: &Ctx, pool: usize, batch: Option<u32>) -> Vec<Shape> {
    let req = ctx.req;
    let context = req.isl as f64 + req.osl as f64 / 2.0;
    let longest = (req.isl + req.osl) as f64;
    let steps = (req.osl.max(2) - 1) as f64;
    let mut out = Vec::new();
    for tp in TP_SIZES {
        let Some(perf) = ctx.perf(pool, tp) else {
            continue;
        };
        let mem = perf.max_sequences(&req.model, longest).min(MAX_BATCH_LIMIT);
        let b = match batch {
            Some(b) if b <= mem => b,
            Some(_) => continue,
            None => {
                let target = req.slo.tpot_s * TARGET_MARGIN;
                if perf.decode_s(1.0, context) > target {
                    continue;
                }
                // Step time grows with the batch: bisect for the largest that meets it.
                let (mut lo, mut hi) = (1u32, mem);
                while lo < hi {
                    let mid = (lo + hi).div_ceil(2);
                    if perf.decode_s(mid as f64, context) <= target {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                lo
            }
        };
        let mean_batch = (b as f64 * DECODE_OCCUPANCY).max(1.0);
        let step = perf.decode_s(mean_batch, context);
        out.push(Shape {
            pool,
            role: Role::Decode,
            tp,
            max_batch: b,
            max_step_tokens: 0,
            requests_per_s_per_engine: mean_batch / (steps * step),
            tpot_s: perf.decode_s(b as f64, context),
            by_count: Vec::new(),
        });
    }
    out
}

/// Colocated engines on one pool: for each TP, batch limit and step budget, the steady state
/// where a share φ = B·ISL/(OSL·chunk) of the steps carries a prompt chunk. TPOT is the mean
/// step; TTFT the chunks a prompt needs plus an M/D/1-style wait with utilization φ.
/// `best_only`: per TP the highest-rate shape that meets both targets; otherwise every shape
/// that meets the TTFT target (for the frontier).
fn colocated_shapes(ctx: &Ctx, pool: usize, best_only: bool) -> Vec<Shape> {
    let req = ctx.req;
    let (isl, osl) = (req.isl as f64, req.osl as f64);
    let context = isl + osl / 2.0;
    let longest = isl + osl;
    let mut out = Vec::new();
    for tp in TP_SIZES {
        let Some(perf) = ctx.perf(pool, tp) else {
            continue;
        };
        let mem = perf.max_sequences(&req.model, longest).min(MAX_BATCH_LIMIT);
        let mut best: Option<Shape> = None;
        let mut b = 1u32;
        while b <= mem {
            for budget in COLOCATED_STEP_TOKENS {
                if budget <= b {
                    continue;
                }
                let chunk = (budget - b) as f64;
                let phi = b as f64 * isl / (osl * chunk);
                if phi >= 0.95 {
                    continue;
                }
                let decode = perf.decode_s(b as f64, context);
                let mut mixed_load = StepLoad::decode(b as f64, b as f64 * context);
                mixed_load.prefill_tokens = chunk;
                mixed_load.prefill_square_tokens = chunk * isl;
                mixed_load.prefill_logits = chunk / isl;
                let mixed = perf.step_s(&mixed_load);
                let tpot = (1.0 - phi) * decode + phi * mixed;
                // A prompt needs its chunks' steps; prompts queue for the prefill share of the
                // steps, a server busy φ of the time, one per engine.
                let service = (isl / chunk).ceil() * mixed;
                let engines = (req.pools[pool].gpus / tp).max(1);
                let wait = DETERMINISTIC_WAIT_FACTOR
                    * mmc_wait_p90_s(engines, engines as f64 * phi / service, 1.0 / service);
                let ttft = service + mixed / 2.0 + wait;
                if ttft > req.slo.ttft_s * TARGET_MARGIN {
                    continue;
                }
                let meets_tpot = tpot <= req.slo.tpot_s * TARGET_MARGIN;
                if best_only && !meets_tpot {
                    continue;
                }
                let shape = Shape {
                    pool,
                    role: Role::Colocated,
                    tp,
                    max_batch: b,
                    max_step_tokens: budget,
                    requests_per_s_per_engine: b as f64 * DECODE_OCCUPANCY
                        / ((osl - 1.0).max(1.0) * tpot),
                    tpot_s: tpot,
                    by_count: Vec::new(),
                };
                if !best_only {
                    out.push(shape);
                } else if best
                    .as_ref()
                    .is_none_or(|s| shape.requests_per_s_per_engine > s.requests_per_s_per_engine)
                {
                    best = Some(shape);
                }
            }
            b = if b < 8 { b * 2 } else { b + b / 2 };
        }
        out.extend(best);
    }
    out
}

/// One pool's share of a disaggregated layout.
#[derive(Debug, Clone)]
struct Split {
    prefill_rate: f64,
    decode_rate: f64,
    gpus: u32,
    groups: Vec<(Shape, u32)>,
}

/// Every way to split one pool between prefill and decode engines (as many engines as fit),
/// without the dominated ones.
fn pool_splits(gpus: u32, prefill: &[Shape], decode: &[Shape]) -> Vec<Split> {
    let mut out = vec![Split {
        prefill_rate: 0.0,
        decode_rate: 0.0,
        gpus: 0,
        groups: Vec::new(),
    }];
    let none: [Option<&Shape>; 1] = [None];
    for p in prefill.iter().map(Some).chain(none) {
        for d in decode.iter().map(Some).chain(none) {
            let x_range = match (p, d) {
                (None, None) => continue,
                (Some(p), None) => gpus / p.tp..=gpus / p.tp,
                (None, Some(_)) => 0..=0,
                (Some(p), Some(_)) => 1..=gpus / p.tp,
            };
            for x in x_range {
                let left = gpus - x * p.map_or(0, |p| p.tp);
                let y = d.map_or(0, |d| left / d.tp);
                if x + y == 0 || (d.is_some() && y == 0) {
                    continue;
                }
                let mut groups = Vec::new();
                if let Some(p) = p {
                    groups.push((p.for_count(x), x));
                }
                if let Some(d) = d {
                    groups.push((d.for_count(y), y));
                }
                out.push(Split {
                    prefill_rate: p.map_or(0.0, |p| p.rate(x)),
                    decode_rate: d.map_or(0.0, |d| d.rate(y)),
                    gpus: x * p.map_or(0, |p| p.tp) + y * d.map_or(0, |d| d.tp),
                    groups,
                });
            }
        }
    }
    // Drop a split when another gives at least both rates on no more GPUs.
    let mut keep = Vec::new();
    for (i, s) in out.iter().enumerate() {
        let dominated = out.iter().enumerate().any(|(j, o)| {
            j != i
                && o.prefill_rate >= s.prefill_rate
                && o.decode_rate >= s.decode_rate
                && o.gpus <= s.gpus
                && (o.prefill_rate > s.prefill_rate
                    || o.decode_rate > s.decode_rate
                    || o.gpus < s.gpus
                    || j < i)
        });
        if !dominated {
            keep.push(s.clone());
        }
    }
    keep
}

type Rated = (Vec<(Shape, u32)>, f64);

/// (analytic output tokens/s/GPU, request rate, engine groups)
type Scored = (f64, f64, Vec<(Shape, u32)>);

/// Keeps the best layout of each engine-shape mix (which pools run which role at which TP),
/// for the `n` best mixes: the simulator then checks distinct shapes rather than the same
/// shapes with one engine more or less.
struct TopN {
    n: usize,
    items: Vec<Scored>,
}

fn signature(groups: &[(Shape, u32)]) -> Vec<(usize, u8, u32)> {
    let mut sig: Vec<(usize, u8, u32)> = groups
        .iter()
        .map(|(s, _)| (s.pool, s.role as u8, s.tp))
        .collect();
    sig.sort_unstable();
    sig
}

impl TopN {
    fn offer(&mut self, score: f64, rate: f64, groups: impl FnOnce() -> Vec<(Shape, u32)>) {
        // Below the n-th best, a layout can neither enter nor improve its mix's entry.
        if self.items.len() >= self.n
            && self
                .items
                .last()
                .is_some_and(|l| (score, rate) <= (l.0, l.1))
        {
            return;
        }
        let groups = groups();
        let sig = signature(&groups);
        match self.items.iter().position(|i| signature(&i.2) == sig) {
            Some(i) if (score, rate) <= (self.items[i].0, self.items[i].1) => return,
            Some(i) => self.items[i] = (score, rate, groups),
            None => self.items.push((score, rate, groups)),
        }
        self.items
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)));
        self.items.truncate(self.n);
    }

    fn into_rated(self) -> Vec<Rated> {
        self.items.into_iter().map(|(s, _, g)| (g, s)).collect()
    }
}

fn enumerate_disaggregated(
    ctx: &Ctx,
    prefill: &[Vec<Shape>],
    decode: &[Vec<Shape>],
    mixes: usize,
    rated: &mut u64,
) -> Vec<Rated> {
    let osl = ctx.req.osl as f64;
    let splits: Vec<Vec<Split>> = ctx
        .req
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| pool_splits(p.gpus, &prefill[i], &decode[i]))
        .collect();
    let mut top = TopN {
        n: mixes,
        items: Vec::new(),
    };
    let mut chosen: Vec<&Split> = Vec::new();
    combine(&splits, &mut chosen, &mut |c: &[&Split]| {
        *rated += 1;
        let p: f64 = c.iter().map(|s| s.prefill_rate).sum();
        let d: f64 = c.iter().map(|s| s.decode_rate).sum();
        let gpus: u32 = c.iter().map(|s| s.gpus).sum();
        if p <= 0.0 || d <= 0.0 || gpus == 0 {
            return;
        }
        let rate = p.min(d);
        top.offer(rate * osl / ctx.fleet_gpus as f64, rate, || {
            c.iter().flat_map(|s| s.groups.iter().cloned()).collect()
        });
    });
    top.into_rated()
}

/// Calls `f` with every choice of one split per pool.
fn combine<'a>(
    splits: &'a [Vec<Split>],
    chosen: &mut Vec<&'a Split>,
    f: &mut dyn FnMut(&[&Split]),
) {
    if chosen.len() == splits.len() {
        f(chosen);
        return;
    }
    for s in &splits[chosen.len()] {
        chosen.push(s);
        combine(splits, chosen, f);
        chosen.pop();
    }
}

/// Colocated layouts: every pool runs as many engines of one shape as fit (or none).
fn enumerate_colocated(
    ctx: &Ctx,
    shapes: &[Vec<Shape>],
    mixes: usize,
    rated: &mut u64,
) -> Vec<Rated> {
    let osl = ctx.req.osl as f64;
    let splits: Vec<Vec<Split>> = ctx
        .req
        .pools
        .iter()
        .enumerate()
        .map(|(i, pool)| {
            let mut v = vec![Split {
                prefill_rate: 0.0,
                decode_rate: 0.0,
                gpus: 0,
                groups: Vec::new(),
            }];
            for s in &shapes[i] {
                let n = pool.gpus / s.tp;
                if n > 0 {
                    v.push(Split {
                        prefill_rate: 0.0,
                        decode_rate: s.requests_per_s_per_engine * n as f64,
                        gpus: n * s.tp,
                        groups: vec![(s.clone(), n)],
                    });
                }
            }
            v
        })
        .collect();
    let mut top = TopN {
        n: mixes,
        items: Vec::new(),
    };
    let mut chosen = Vec::new();
    combine(&splits, &mut chosen, &mut |c: &[&Split]| {
        *rated += 1;
        let rate: f64 = c.iter().map(|s| s.decode_rate).sum();
        let gpus: u32 = c.iter().map(|s| s.gpus).sum();
        if rate <= 0.0 || gpus == 0 {
            return;
        }
        top.offer(rate * osl / ctx.fleet_gpus as f64, rate, || {
            c.iter().flat_map(|s| s.groups.iter().cloned()).collect()
        });
    });
    top.into_rated()
}

/// Layouts next to `groups`. Disaggregated: one or two prefill engines more or fewer in each
/// pool that runs both phases, the decode engines filling what is left. Colocated: the batch
/// limit and the step budget a notch up or down.
fn neighbours(ctx: &Ctx, groups: &[(Shape, u32)]) -> Vec<Vec<(Shape, u32)>> {
    let mut out = Vec::new();
    let longest = (ctx.req.isl + ctx.req.osl) as f64;
    for (i, (c, n)) in groups.iter().enumerate() {
        if c.role != Role::Colocated {
            continue;
        }
        let Some(perf) = ctx.perf(c.pool, c.tp) else {
            continue;
        };
        let mem = perf
            .max_sequences(&ctx.req.model, longest)
            .min(MAX_BATCH_LIMIT);
        let b = c.max_batch;
        for (batch, budget) in [
            (b * 2 / 3, c.max_step_tokens),
            (b * 3 / 2, c.max_step_tokens),
            (b, c.max_step_tokens / 2),
            (b, c.max_step_tokens * 2),
        ] {
            if batch == 0 || batch > mem || budget <= batch || budget > 65_536 {
                continue;
            }
            let mut s = c.clone();
            s.max_batch = batch;
            s.max_step_tokens = budget;
            let mut g = groups.to_vec();
            g[i] = (s, *n);
            out.push(g);
        }
    }
    for (pi, (p, x)) in groups.iter().enumerate() {
        if p.role != Role::Prefill {
            continue;
        }
        let Some(di) = groups
            .iter()
            .position(|(s, _)| s.role == Role::Decode && s.pool == p.pool)
        else {
            continue;
        };
        let d = &groups[di].0;
        let gpus = ctx.req.pools[p.pool].gpus;
        for step in [-2i64, -1, 1, 2] {
            let nx = *x as i64 + step;
            let left = gpus as i64 - nx * p.tp as i64;
            if nx < 1 || left < d.tp as i64 {
                continue;
            }
            let ny = left as u32 / d.tp;
            let mut n = groups.to_vec();
            n[pi] = (p.for_count(nx as u32), nx as u32);
            n[di] = (d.for_count(ny), ny);
            out.push(n);
        }
    }
    out
}

/// The analytic stage's output tokens/s/GPU for a layout (for a colocated shape moved by
/// `neighbours`, its original rate: only a starting point for the simulator).
fn analytic_per_gpu(ctx: &Ctx, groups: &[(Shape, u32)]) -> f64 {
    let sum = |role: Role| -> f64 {
        groups
            .iter()
            .filter(|(s, _)| s.role == role)
            .map(|(s, n)| s.rate(*n))
            .sum()
    };
    let rate = if groups.iter().any(|(s, _)| s.role == Role::Colocated) {
        sum(Role::Colocated)
    } else {
        sum(Role::Prefill).min(sum(Role::Decode))
    };
    rate * ctx.req.osl as f64 / ctx.fleet_gpus as f64
}

fn layout_of(ctx: &Ctx, groups: &[(Shape, u32)]) -> Layout {
    Layout {
        groups: groups
            .iter()
            .map(|(s, n)| WorkerGroup {
                system: ctx.req.pools[s.pool].system.name.clone(),
                role: s.role,
                workers: *n,
                perf: ctx.perf(s.pool, s.tp).expect("rated shapes exist").clone(),
                max_batch: s.max_batch,
                max_step_tokens: s.max_step_tokens,
            })
            .collect(),
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Simulates a layout at rising and falling rates around the analytic estimate and keeps the
/// highest rate at which 90% of requests meet both targets. With `to_beat` (the best
/// output tokens/s/GPU so far), one simulation just above it decides first whether the layout
/// can win at all: most cannot, and they cost one run instead of a bisection.
///
/// Identical engines behind a balancing router behave like independent slices, so the layout
/// is divided by the greatest common divisor of its engine counts (8P24D runs as 1P3D at an
/// eighth of the rate): the per-GPU figures stay, the simulation shrinks. A slice's queues
/// see less pooling than the whole, so this errs on the pessimistic side. A slice of more
/// than `SIMULATED_ENGINES_MAX` engines (fleets beyond 64 GPUs) is scaled down to about that
/// many, each group rounded to the nearest count: its P:D ratio moves by at most a few
/// percent, and the rate scales with the GPUs.
fn evaluate(
    ctx: &Ctx,
    groups: &[(Shape, u32)],
    analytic_per_gpu: f64,
    to_beat: Option<f64>,
    sims: &mut u32,
) -> Result<Option<Candidate>, PlanError> {
    let req = ctx.req;
    let full = layout_of(ctx, groups);
    let g = full.groups.iter().fold(0, |a, w| gcd(a, w.workers)).max(1);
    let mut slice = full.clone();
    for w in &mut slice.groups {
        w.workers /= g;
    }
    let engines: u32 = slice.groups.iter().map(|w| w.workers).sum();
    if engines > SIMULATED_ENGINES_MAX {
        let f = SIMULATED_ENGINES_MAX as f64 / engines as f64;
        for w in &mut slice.groups {
            w.workers = ((w.workers as f64 * f).round() as u32).max(1);
        }
    }
    let gpus = full.gpus();
    // Full-layout rate per simulated rate.
    let scale = gpus as f64 / slice.gpus() as f64;
    let fleet = ctx.fleet_gpus as f64;
    let osl = req.osl as f64;
    let per_gpu_to_rate = |per_gpu: f64| per_gpu * fleet / osl / scale;
    let search = GoodputSearch {
        model: &req.model,
        layout: &slice,
        isl: LengthDist::Fixed(req.isl),
        osl: LengthDist::Fixed(req.osl),
        slo: req.slo,
        seed: req.seed,
    };
    let floor = to_beat.map(|best| per_gpu_to_rate(best * 1.01));
    let Some(good) = search.run(per_gpu_to_rate(analytic_per_gpu), floor, sims)? else {
        return Ok(None);
    };
    let (rate, rep) = good;
    Ok(Some(Candidate {
        request_rate_per_s: rate * scale,
        output_tokens_per_s_per_gpu: rate * scale * osl / fleet,
        output_tokens_per_s_per_user: if rep.tpot_s.mean > 0.0 {
            1.0 / rep.tpot_s.mean
        } else {
            0.0
        },
        ttft_s: rep.ttft_s,
        tpot_s: rep.tpot_s,
        slo_attainment: rep.slo_attainment,
        analytic_output_tokens_per_s_per_gpu: analytic_per_gpu,
        gpus,
        fleet_gpus: ctx.fleet_gpus,
        layout: full,
    }))
}

/// The goodput of one layout: the highest Poisson arrival rate at which 90% of requests
/// meet both targets, found by simulation.
pub struct GoodputSearch<'a> {
    pub model: &'a ModelSpec,
    pub layout: &'a Layout,
    pub isl: LengthDist,
    pub osl: LengthDist,
    pub slo: Slo,
    pub seed: u64,
}

impl GoodputSearch<'_> {
    /// The goodput in requests/s and the simulation at that rate, searching from
    /// `start_rate_per_s` (an estimate); `None` when even much lower rates miss the targets.
    pub fn goodput(&self, start_rate_per_s: f64) -> Result<Option<(f64, SimReport)>, PlanError> {
        let mut sims = 0;
        self.run(start_rate_per_s, None, &mut sims)
    }

    /// One simulation at `rate` requests/s. A request lives at most ttft + OSL·tpot within
    /// the targets; the first such span warms the system up (decode batches fill) and is
    /// not measured, three more are.
    pub fn simulate_at(&self, rate: f64) -> Result<SimReport, PlanError> {
        let lifetime = self.slo.ttft_s + self.osl.mean() * self.slo.tpot_s;
        let n = (4.0 * rate * lifetime).clamp(SIM_REQUESTS_MIN, SIM_REQUESTS_MAX) as u32;
        let requests = Workload::Poisson {
            rate_per_s: rate,
            isl: self.isl.clone(),
            osl: self.osl.clone(),
            requests: n,
            seed: self.seed,
        }
        .requests()?;
        let warmup = lifetime.min(requests.last().map_or(0.0, |r| r.arrival_s) / 4.0);
        simulate_after(self.model, self.layout, &requests, &self.slo, warmup)
    }

    /// Steps by ×1.4 (up) or ×0.6 (down) from `start` until the targets flip, then bisects
    /// 4 times (to within 2%). With `floor`, one run there first: a layout that misses at
    /// the floor is not worth a search (`None`).
    fn run(
        &self,
        start: f64,
        floor: Option<f64>,
        sims: &mut u32,
    ) -> Result<Option<(f64, SimReport)>, PlanError> {
        if !(start > 0.0 && start.is_finite()) {
            return Err(PlanError::invalid(
                "goodput search",
                format!("start rate {start}/s"),
            ));
        }
        let mut run = |rate: f64| {
            *sims += 1;
            self.simulate_at(rate)
        };
        let mut good: Option<(f64, SimReport)> = None;
        let mut bad: Option<f64> = None;
        let mut rate = start;
        if let Some(floor) = floor {
            let rep = run(floor)?;
            if !rep.meets_target() {
                return Ok(None);
            }
            good = Some((floor, rep));
            rate = (floor * 1.4).max(rate);
        }
        for _ in 0..6 {
            let rep = run(rate)?;
            if rep.meets_target() {
                good = Some((rate, rep));
                if bad.is_some() {
                    break;
                }
                rate *= 1.4;
            } else {
                bad = Some(rate);
                if good.is_some() {
                    break;
                }
                rate *= 0.6;
            }
        }
        let Some(mut good) = good else {
            return Ok(None);
        };
        if let Some(mut hi) = bad {
            for _ in 0..4 {
                let mid = (good.0 * hi).sqrt();
                let rep = run(mid)?;
                if rep.meets_target() {
                    good = (mid, rep);
                } else {
                    hi = mid;
                }
            }
        }
        Ok(Some(good))
    }
}

/// "22P (TP2) + 5D (TP4)"; with `systems` (a mixed fleet) each group says its GPU type.
fn describe(layout: &Layout, systems: bool) -> String {
    let parts: Vec<String> = layout
        .groups
        .iter()
        .map(|g| {
            let role = match g.role {
                Role::Prefill => "P",
                Role::Decode => "D",
                Role::Colocated => " colocated",
            };
            let on = if systems {
                format!(" on {}", g.system)
            } else {
                String::new()
            };
            format!("{}{role} (TP{}){on}", g.workers, g.perf.tp)
        })
        .collect();
    parts.join(" + ")
}

/// Output tokens/s/GPU against tokens/s/user as the decode batch limit varies, from the
/// analytic stage; only the points no other point beats on both axes.
fn frontier(ctx: &Ctx, prefill: &[Vec<Shape>], rated: &mut u64) -> Vec<FrontierPoint> {
    let req = ctx.req;
    let mut points = Vec::new();
    let mut batches = vec![1u32];
    while *batches.last().expect("non-empty") < MAX_BATCH_LIMIT {
        let b = *batches.last().expect("non-empty");
        batches.push(if b < 8 { b * 2 } else { b + b / 2 }.min(MAX_BATCH_LIMIT));
    }
    for &b in &batches {
        let decode: Vec<Vec<Shape>> = (0..req.pools.len())
            .map(|p| decode_shapes(ctx, p, Some(b)))
            .collect();
        // Every engine-shape mix gives a point: a wider decode TP is slower per GPU but
        // faster per user.
        for (groups, per_gpu) in
            enumerate_disaggregated(ctx, prefill, &decode, FRONTIER_MIXES, rated)
        {
            let layout = layout_of(ctx, &groups);
            let tpot = groups
                .iter()
                .filter(|(s, _)| s.role == Role::Decode)
                .map(|(s, _)| s.tpot_s)
                .fold(0.0, f64::max);
            points.push(FrontierPoint {
                colocated: false,
                layout: describe(&layout, ctx.req.pools.len() > 1),
                gpus: layout.gpus(),
                decode_batch: b,
                output_tokens_per_s_per_gpu: per_gpu,
                output_tokens_per_s_per_user: 1.0 / tpot,
                meets_tpot: tpot <= req.slo.tpot_s,
            });
        }
    }
    let coloc: Vec<Vec<Shape>> = (0..req.pools.len())
        .map(|p| colocated_shapes(ctx, p, false))
        .collect();
    for &b in &batches {
        let at_b: Vec<Vec<Shape>> = coloc
            .iter()
            .map(|v| v.iter().filter(|s| s.max_batch == b).cloned().collect())
            .collect();
        for (groups, per_gpu) in enumerate_colocated(ctx, &at_b, FRONTIER_MIXES, rated) {
            let layout = layout_of(ctx, &groups);
            let tpot = groups.iter().map(|(s, _)| s.tpot_s).fold(0.0, f64::max);
            points.push(FrontierPoint {
                colocated: true,
                layout: describe(&layout, ctx.req.pools.len() > 1),
                gpus: layout.gpus(),
                decode_batch: b,
                output_tokens_per_s_per_gpu: per_gpu,
                output_tokens_per_s_per_user: 1.0 / tpot,
                meets_tpot: tpot <= req.slo.tpot_s,
            });
        }
    }
    let mut front: Vec<FrontierPoint> = points
        .iter()
        .filter(|p| {
            !points.iter().any(|o| {
                o.output_tokens_per_s_per_gpu >= p.output_tokens_per_s_per_gpu
                    && o.output_tokens_per_s_per_user >= p.output_tokens_per_s_per_user
                    && (o.output_tokens_per_s_per_gpu > p.output_tokens_per_s_per_gpu
                        || o.output_tokens_per_s_per_user > p.output_tokens_per_s_per_user)
            })
        })
        .cloned()
        .collect();
    // Equal points differ only in engines that add nothing (a pool's prefill engines behind a
    // decode bottleneck): keep the one on fewest GPUs.
    front.sort_by(|a, b| {
        a.output_tokens_per_s_per_user
            .total_cmp(&b.output_tokens_per_s_per_user)
            .then(a.gpus.cmp(&b.gpus))
    });
    front.dedup_by(|later, earlier| {
        later.output_tokens_per_s_per_user == earlier.output_tokens_per_s_per_user
            && later.output_tokens_per_s_per_gpu == earlier.output_tokens_per_s_per_gpu
    });
    front
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Calibration, Dtype, Efficiency, find_model, find_system};

    fn pool(name: &str, gpus: u32) -> GpuPool {
        GpuPool {
            system: find_system(name).unwrap(),
            gpus,
            cost: StepCost::Roofline(Efficiency::default()),
        }
    }

    fn request(
        model: &str,
        pools: Vec<GpuPool>,
        isl: u32,
        osl: u32,
        ttft_ms: f64,
        tpot_ms: f64,
    ) -> PlanRequest {
        let model = find_model(model).unwrap();
        PlanRequest {
            dtypes: Dtypes::new(model.native_weights, Dtype::Bf16).unwrap(),
            model,
            pools,
            isl,
            osl,
            slo: Slo {
                ttft_s: ttft_ms / 1e3,
                tpot_s: tpot_ms / 1e3,
            },
            seed: 1,
            tp: None,
        }
    }

    fn check_meets(c: &Candidate, slo: &Slo) {
        assert!(c.slo_attainment >= 0.9, "{}", c.slo_attainment);
        assert!(
            c.ttft_s.p90 <= slo.ttft_s && c.tpot_s.p90 <= slo.tpot_s,
            "{c:?}"
        );
        assert!(c.gpus <= c.fleet_gpus && c.output_tokens_per_s_per_gpu > 0.0);
    }

    #[test]
    fn queueing_formulas_match_closed_forms() {
        // M/M/1: C = ρ, so the p90 wait is ln(10ρ)/(μ − λ).
        let (mu, lambda) = (100.0, 50.0);
        let want = (10.0f64 * 0.5).ln() / (mu - lambda);
        assert!((mmc_wait_p90_s(1, lambda, mu) - want).abs() < 1e-12);
        // Pooling: 8 servers at the same utilization wait far less than one.
        assert!(mmc_wait_p90_s(8, 8.0 * lambda, mu) < want / 4.0);
        assert_eq!(mmc_wait_p90_s(1, mu, mu), f64::INFINITY);
        // The rate search keeps the target: 10 ms service, 15 ms fixed, 40 ms target.
        let rate = max_rate_within(1, mu, 0.015, 0.040);
        let wait = DETERMINISTIC_WAIT_FACTOR * mmc_wait_p90_s(1, rate, mu);
        assert!((0.015 + wait - 0.040).abs() < 1e-6, "{rate} {wait}");
        assert!(max_rate_within(4, mu, 0.015, 0.040) > 4.0 * rate);
        assert_eq!(max_rate_within(1, mu, 0.05, 0.04), 0.0);
    }

    /// A decode engine that holds 16 sequences, 10 ms per step, 50 steps per request, serves
    /// at most 32 requests/s; past that, KV waits for memory and TTFT grows without bound.
    #[test]
    fn goodput_finds_the_capacity_of_a_memory_bound_decode_engine() {
        let model = crate::parse_hf_config(
            "tiny",
            r#"{"hidden_size":256,"num_hidden_layers":4,"num_attention_heads":4,
                "num_key_value_heads":2,"intermediate_size":512,"vocab_size":1024}"#,
        )
        .unwrap();
        let cal = |prefill_base_s: f64, decode_base_s: f64| Calibration {
            prefill_base_s,
            prefill_per_token_s: 0.0,
            prefill_per_square_token_s: 0.0,
            decode_base_s,
            decode_per_seq_s: 0.0,
            decode_per_context_token_s: 0.0,
        };
        let engine = |memory: f64| {
            let host = SystemSpec::measured_host("host", memory, 1e12);
            PerfModel::new(
                &model,
                &host,
                Dtypes::bf16(),
                1,
                StepCost::Measured(cal(1e-3, 0.01)),
            )
            .unwrap()
        };
        let per_seq = model.kv_bytes_for_context(151.0, Dtype::Bf16);
        let weights = model.weight_bytes(Dtype::Bf16);
        let group = |role, perf, max_batch, max_step_tokens| WorkerGroup {
            system: "host".into(),
            role,
            workers: 1,
            perf,
            max_batch,
            max_step_tokens,
        };
        let layout = Layout {
            groups: vec![
                group(Role::Prefill, engine(1e9), 0, 100),
                group(Role::Decode, engine(weights + 16.5 * per_seq), 1000, 0),
            ],
        };
        let search = GoodputSearch {
            model: &model,
            layout: &layout,
            isl: LengthDist::Fixed(100),
            osl: LengthDist::Fixed(51),
            slo: Slo {
                ttft_s: 2.0,
                tpot_s: 0.02,
            },
            seed: 5,
        };
        let capacity = 16.0 / (50.0 * 0.01);
        let (rate, rep) = search.goodput(10.0).unwrap().expect("a goodput");
        assert!(
            rate > 0.8 * capacity && rate < 1.02 * capacity,
            "{rate} vs {capacity}"
        );
        assert!(rep.meets_target());
        assert!(!search.simulate_at(1.1 * capacity).unwrap().meets_target());
    }

    #[test]
    fn plans_both_modes_within_the_targets_with_a_pareto_frontier() {
        let req = request(
            "Llama-3.1-8B",
            vec![pool("h100_sxm", 8)],
            2048,
            256,
            1000.0,
            50.0,
        );
        let plan = plan(&req).unwrap();
        let d = plan.disaggregated.as_ref().expect("a disaggregated layout");
        let c = plan.colocated.as_ref().expect("a colocated layout");
        check_meets(d, &req.slo);
        check_meets(c, &req.slo);
        assert!(d.prefill_workers() >= 1 && d.decode_workers() >= 1);
        assert_eq!(c.prefill_workers() + c.decode_workers(), 0);
        let ratio = d.output_tokens_per_s_per_gpu / c.output_tokens_per_s_per_gpu;
        assert_eq!(plan.ratio, Some(ratio));
        // The per-GPU figure is the goodput: rate × OSL over the fleet.
        assert!((d.output_tokens_per_s_per_gpu - d.request_rate_per_s * 256.0 / 8.0).abs() < 1e-6);
        // An H100 serves a Llama-8B at thousands of output tokens/s, not tens or millions.
        assert!(
            (500.0..20_000.0).contains(&d.output_tokens_per_s_per_gpu),
            "{d:?}"
        );
        // Frontier: faster per user means fewer tokens/s/GPU.
        assert!(plan.frontier.len() >= 3);
        for w in plan.frontier.windows(2) {
            assert!(w[0].output_tokens_per_s_per_user < w[1].output_tokens_per_s_per_user);
            assert!(w[0].output_tokens_per_s_per_gpu > w[1].output_tokens_per_s_per_gpu);
        }
    }

    #[test]
    fn a_mixed_fleet_gives_both_types_work() {
        let req = request(
            "Llama-3.1-70B",
            vec![pool("h100_sxm", 16), pool("a100_sxm", 16)],
            2048,
            512,
            1500.0,
            60.0,
        );
        let plan = plan(&req).unwrap();
        let d = plan.disaggregated.expect("a disaggregated layout");
        check_meets(&d, &req.slo);
        assert_eq!(d.fleet_gpus, 32);
        let systems: Vec<&str> = d.layout.groups.iter().map(|g| g.system.as_str()).collect();
        assert!(
            systems.contains(&"h100_sxm") && systems.contains(&"a100_sxm"),
            "{systems:?}"
        );
    }

    #[test]
    fn a_pool_too_small_for_the_model_is_left_out_with_a_note() {
        // DeepSeek-V3 in fp8 is 671 GB: 8 A100s (640 GB) cannot hold it at any TP.
        let req = request(
            "DeepSeek-V3",
            vec![pool("h200_sxm", 16), pool("a100_sxm", 8)],
            2048,
            256,
            3000.0,
            100.0,
        );
        let plan = plan(&req).unwrap();
        assert!(
            plan.notes.iter().any(|n| n.starts_with("a100_sxm")),
            "{:?}",
            plan.notes
        );
        let best = plan
            .disaggregated
            .or(plan.colocated)
            .expect("a layout on the H200s");
        assert_eq!(best.fleet_gpus, 16);
        assert!(best.layout.groups.iter().all(|g| g.system == "h200_sxm"));
    }

    #[test]
    fn targets_out_of_reach_give_no_layout_and_say_why() {
        let req = request(
            "Llama-3.1-70B",
            vec![pool("h100_sxm", 8)],
            4096,
            256,
            1000.0,
            0.5,
        );
        let plan = plan(&req).unwrap();
        assert!(plan.disaggregated.is_none() && plan.colocated.is_none());
        assert_eq!(plan.ratio, None);
        assert_eq!(plan.notes.len(), 2, "{:?}", plan.notes);
        let mut bad = req.clone();
        bad.pools[0].gpus = 0;
        assert!(matches!(
            plan_err(&bad),
            PlanError::Invalid { field: "GPUs", .. }
        ));
    }

    fn plan_err(req: &PlanRequest) -> PlanError {
        plan(req).unwrap_err()
    }

    #[test]
    fn the_search_is_deterministic_and_fast_at_64_gpus() {
        let req = request(
            "Llama-3.1-8B",
            vec![pool("h100_sxm", 64)],
            4096,
            512,
            1000.0,
            40.0,
        );
        let started = std::time::Instant::now();
        let a = plan(&req).unwrap();
        let elapsed = started.elapsed();
        let b = plan(&req).unwrap();
        let key = |p: &Plan| {
            (
                p.disaggregated
                    .as_ref()
                    .map(|c| (c.describe(), c.output_tokens_per_s_per_gpu)),
                p.colocated
                    .as_ref()
                    .map(|c| (c.describe(), c.output_tokens_per_s_per_gpu)),
                p.frontier.clone(),
            )
        };
        assert_eq!(key(&a), key(&b));
        assert!(elapsed.as_secs_f64() < 5.0, "{elapsed:?}");
    }

    #[test]
    fn plans_for_a_host_known_only_by_its_calibration() {
        // The reference engine on a CPU: no peak figures, step times from measurements.
        let model = crate::parse_hf_config(
            "tiny-llama",
            r#"{"hidden_size":512,"num_hidden_layers":8,"num_attention_heads":8,
                "num_key_value_heads":4,"intermediate_size":1408,"vocab_size":32000}"#,
        )
        .unwrap();
        let cal = Calibration {
            prefill_base_s: 2e-3,
            prefill_per_token_s: 1e-4,
            prefill_per_square_token_s: 1e-8,
            decode_base_s: 8e-3,
            decode_per_seq_s: 5e-4,
            decode_per_context_token_s: 1e-6,
        };
        let req = PlanRequest {
            model,
            pools: vec![GpuPool {
                system: SystemSpec::measured_host("this-cpu", 2e9, 1e9),
                gpus: 4,
                cost: StepCost::Measured(cal),
            }],
            dtypes: Dtypes::bf16(),
            isl: 256,
            osl: 64,
            slo: Slo {
                ttft_s: 1.0,
                tpot_s: 0.05,
            },
            seed: 3,
            tp: None,
        };
        let plan = plan(&req).unwrap();
        let d = plan.disaggregated.expect("a disaggregated layout");
        check_meets(&d, &req.slo);
        assert!(d.layout.groups.iter().all(|g| g.perf.tp == 1));
        assert!(plan.colocated.is_some());
    }

    /// A deployment has one TP: `tp` keeps every engine of both modes at it, and says so when
    /// the model does not fit at that size.
    #[test]
    fn a_fixed_tp_holds_for_every_engine() {
        let mut req = request(
            "Llama-3.1-70B",
            vec![pool("h100_sxm", 16)],
            2048,
            256,
            2000.0,
            50.0,
        );
        req.tp = Some(4);
        let p = plan(&req).unwrap();
        for c in [&p.disaggregated, &p.colocated].into_iter().flatten() {
            assert!(
                c.layout.groups.iter().all(|g| g.perf.tp == 4),
                "{}",
                c.describe()
            );
        }
        assert!(p.best().is_some());
        req.tp = Some(1);
        let p = plan(&req).unwrap();
        assert!(p.best().is_none());
        assert!(
            p.notes.iter().any(|n| n.contains("at TP 1")),
            "{:?}",
            p.notes
        );
        req.tp = Some(3);
        assert!(plan(&req).unwrap_err().to_string().contains("TP 3"));
    }
}
