//! The re-planner's online calibration: the engines' own step-time counters, kept per GPU
//! kind for one deployment, fitted to the planner's step-time model once enough steps were
//! seen (`pd_planner::autoplan::fit_online`). Until then the roofline stands.

use std::collections::BTreeMap;

use pd_planner::autoplan::{self as ap, DecodeBucket, OnlineFit, PrefillBucket};
use pd_planner::{Calibration, PrefillSample, StepCost};
use pd_raft::{ClusterState, EngineRole};

use crate::wire::latency::EngineSteps;

/// Steps of each phase needed before a fit is trusted.
pub const MIN_STEPS: f64 = 50.0;
/// Rounds whose steps make the recent fit, preferred once it has enough steps: step times
/// change with what else runs on the host (on a shared machine, the other engines' load).
pub const RECENT_ROUNDS: usize = 6;
/// A decode bucket's sequences sit, on average, at this share of its context bound (the
/// buckets are powers of two: `(max/2, max]`).
pub const CONTEXT_IN_BUCKET: f64 = 0.75;

/// One engine's totals as last seen, and what it measured before a restart.
#[derive(Default)]
struct Engine {
    gpu: String,
    live: Totals,
    retired: Totals,
}

#[derive(Default, Clone)]
struct Totals {
    prefill: BTreeMap<u32, PrefillBucket>,
    decode: BTreeMap<(u32, u32), DecodeBucket>,
}

impl Totals {
    fn of(s: &EngineSteps) -> Totals {
        let mut t = Totals::default();
        for p in &s.prefill {
            t.prefill.insert(
                p.tokens_max,
                PrefillBucket {
                    steps: p.steps as f64,
                    tokens: p.tokens_total as f64,
                    seconds: p.seconds_total,
                },
            );
        }
        for d in &s.decode {
            t.decode.insert(
                (d.batch_max, d.context_tokens_max),
                DecodeBucket {
                    steps: d.steps as f64,
                    sequences: d.sequences_total as f64,
                    seconds: d.seconds_total,
                    context_tokens: f64::from(d.context_tokens_max) * CONTEXT_IN_BUCKET,
                },
            );
        }
        t
    }

    fn steps(&self) -> f64 {
        self.prefill.values().map(|b| b.steps).sum::<f64>()
            + self.decode.values().map(|b| b.steps).sum::<f64>()
    }

    /// `self - before`, bucket by bucket (never below zero).
    fn minus(&self, before: &Totals) -> Totals {
        let mut t = self.clone();
        for (k, b) in &before.prefill {
            if let Some(e) = t.prefill.get_mut(k) {
                e.steps = (e.steps - b.steps).max(0.0);
                e.tokens = (e.tokens - b.tokens).max(0.0);
                e.seconds = (e.seconds - b.seconds).max(0.0);
            }
        }
        for (k, b) in &before.decode {
            if let Some(e) = t.decode.get_mut(k) {
                e.steps = (e.steps - b.steps).max(0.0);
                e.sequences = (e.sequences - b.sequences).max(0.0);
                e.seconds = (e.seconds - b.seconds).max(0.0);
            }
        }
        t
    }

    fn add(&mut self, o: &Totals) {
        for (k, b) in &o.prefill {
            let e = self.prefill.entry(*k).or_default();
            e.steps += b.steps;
            e.tokens += b.tokens;
            e.seconds += b.seconds;
        }
        for (k, b) in &o.decode {
            let e = self.decode.entry(*k).or_default();
            e.steps += b.steps;
            e.sequences += b.sequences;
            e.seconds += b.seconds;
            e.context_tokens = b.context_tokens;
        }
    }
}

/// A deployment's engines' step counters over the coordinator's term, by engine id.
#[derive(Default)]
pub struct StepBook {
    engines: BTreeMap<String, Engine>,
    /// The engines' prefill chunk (tokens per step), where they chunk long prompts: their
    /// steps are then fitted per chunk and the simulator's whole-prompt steps are derived.
    pub chunk_tokens: Option<u32>,
    /// The totals per GPU kind after each of the last rounds, oldest first.
    rounds: std::collections::VecDeque<BTreeMap<String, Totals>>,
}

/// The fit of one GPU kind.
pub struct Fitted {
    pub gpu: String,
    pub fit: OnlineFit,
    /// Engines of each role on that kind.
    pub prefill_engines: u32,
    pub decode_engines: u32,
}

impl StepBook {
    /// Takes the answers' counters of the deployment's engines (an engine that did not answer
    /// keeps its last; one whose counters went back restarted, and what it measured before
    /// is kept).
    pub fn take(&mut self, state: &ClusterState, deployment: &str, answers: &[EngineSteps]) {
        let prefix = format!("{deployment}/");
        for s in answers.iter().filter(|s| s.engine.starts_with(&prefix)) {
            let gpu = gpu_of(state, &s.engine).unwrap_or_else(|| "unknown".into());
            let now = Totals::of(s);
            let e = self.engines.entry(s.engine.clone()).or_default();
            if now.steps() < e.live.steps() {
                let before = std::mem::take(&mut e.live);
                e.retired.add(&before);
            }
            e.gpu = gpu;
            e.live = now;
        }
    }

    /// One fit per GPU kind, with the engines of each role that run on it now: from the last
    /// `RECENT_ROUNDS` rounds' steps once they are enough, else from every step seen. Called
    /// once per round.
    pub fn fit(&mut self, state: &ClusterState, deployment: &str) -> Vec<Fitted> {
        let mut by_gpu: BTreeMap<String, Totals> = BTreeMap::new();
        for e in self.engines.values() {
            let t = by_gpu.entry(e.gpu.clone()).or_default();
            t.add(&e.live);
            t.add(&e.retired);
        }
        self.rounds.push_back(by_gpu.clone());
        if self.rounds.len() > RECENT_ROUNDS + 1 {
            self.rounds.pop_front();
        }
        let oldest = self.rounds.front().cloned().unwrap_or_default();
        by_gpu
            .into_iter()
            .map(|(gpu, all)| {
                let recent = oldest.get(&gpu).map(|o| all.minus(o));
                let fit_of = |t: &Totals| {
                    let p: Vec<PrefillBucket> = t.prefill.values().copied().collect();
                    let d: Vec<DecodeBucket> = t.decode.values().copied().collect();
                    (ap::fit_online(&p, &d, MIN_STEPS), d)
                };
                // The recent steps when they make a fit (enough of them, in enough shapes),
                // else every step seen.
                let (mut fit, d) = match recent.map(|r| fit_of(&r)) {
                    Some((f, d)) if f.calibration.is_some() && phase_ok(&f) => (f, d),
                    _ => fit_of(&all),
                };
                if let (Some(c), Some(chunk)) = (fit.calibration, self.chunk_tokens) {
                    fit.calibration = Some(whole_prompts(c, chunk, &d));
                }
                let count = |role: EngineRole| {
                    state
                        .assignments
                        .values()
                        .filter(|a| a.deployment == deployment && a.role == role)
                        .filter(|a| gpu_of(state, &a.engine).as_deref() == Some(gpu.as_str()))
                        .count() as u32
                };
                Fitted {
                    fit,
                    prefill_engines: count(EngineRole::Prefill),
                    decode_engines: count(EngineRole::Decode),
                    gpu,
                }
            })
            .collect()
    }
}

/// Prompt lengths the whole-prompt model is fitted over.
const WHOLE_PROMPT_TOKENS: [u32; 10] = [16, 64, 128, 256, 512, 768, 1024, 1536, 2048, 4096];

/// The fit of an engine that prefills long prompts in chunks of `chunk` tokens, as the
/// simulator's whole-prompt steps: a prompt of n tokens costs its chunks' steps, each by the
/// per-step fit; the quadratic model is refitted to those sums (the per-step fit alone, taken
/// for a whole prompt, would grow its quadratic term far past what the engine spends).
fn whole_prompts(c: Calibration, chunk: u32, decode: &[DecodeBucket]) -> Calibration {
    let step = |k: f64| {
        c.prefill_base_s + c.prefill_per_token_s * k + c.prefill_per_square_token_s * k * k
    };
    let samples: Vec<PrefillSample> = WHOLE_PROMPT_TOKENS
        .iter()
        .map(|&n| {
            let (full, rest) = (n / chunk.max(1), n % chunk.max(1));
            let seconds = f64::from(full) * step(f64::from(chunk))
                + if rest > 0 { step(f64::from(rest)) } else { 0.0 };
            PrefillSample {
                tokens: f64::from(n),
                seconds,
            }
        })
        .collect();
    let d: Vec<_> = decode.iter().filter_map(DecodeBucket::sample).collect();
    Calibration::fit(&samples, &d).unwrap_or(c)
}

fn phase_ok(f: &OnlineFit) -> bool {
    f.prefill_steps >= MIN_STEPS && f.decode_steps >= MIN_STEPS
}

/// The trusted fit of the GPU kind that runs most engines of `role` (none: the roofline).
pub fn for_role(fits: &[Fitted], role: EngineRole) -> Option<Calibration> {
    fits.iter()
        .filter(|f| f.fit.calibration.is_some())
        .max_by_key(|f| match role {
            EngineRole::Prefill => f.prefill_engines,
            _ => f.decode_engines,
        })
        .and_then(|f| f.fit.calibration)
}

/// A group's step times from the fit, where there is one.
pub fn calibrate(g: &mut pd_planner::WorkerGroup, cal: Option<Calibration>) {
    if let Some(c) = cal {
        g.perf.cost = StepCost::Measured(c);
    }
}

/// The fits as the report shows them.
pub fn report(fits: &[Fitted]) -> Vec<pd_api::AutoplanCalibration> {
    fits.iter()
        .map(|f| pd_api::AutoplanCalibration {
            gpu: f.gpu.clone(),
            prefill_steps: f.fit.prefill_steps,
            decode_steps: f.fit.decode_steps,
            trusted: f.fit.calibration.is_some(),
            why: f.fit.why.clone(),
            coefficients: f.fit.calibration.map(|c| {
                BTreeMap::from([
                    ("prefill_base_s".to_string(), c.prefill_base_s),
                    ("prefill_per_token_s".to_string(), c.prefill_per_token_s),
                    (
                        "prefill_per_square_token_s".to_string(),
                        c.prefill_per_square_token_s,
                    ),
                    ("decode_base_s".to_string(), c.decode_base_s),
                    ("decode_per_seq_s".to_string(), c.decode_per_seq_s),
                    (
                        "decode_per_context_token_s".to_string(),
                        c.decode_per_context_token_s,
                    ),
                ])
            }),
        })
        .collect()
}

/// One line on the step-time model the simulator used, for the decision's notes.
pub fn note(fits: &[Fitted]) -> String {
    if fits.is_empty() {
        return "step times: the roofline (no engine step counters yet)".into();
    }
    fits.iter()
        .map(|f| match (&f.fit.calibration, &f.fit.why) {
            (Some(_), _) => format!(
                "step times on {}: fitted from {:.0} prefill and {:.0} decode steps",
                f.gpu, f.fit.prefill_steps, f.fit.decode_steps
            ),
            (None, why) => format!(
                "step times on {}: the roofline ({})",
                f.gpu,
                why.as_deref().unwrap_or("not fitted")
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The NVML name of the first GPU of an engine (by its assignment).
fn gpu_of(state: &ClusterState, engine: &str) -> Option<String> {
    let a = state.assignments.get(engine)?;
    let node = state.nodes.get(&a.node)?;
    let index = a.gpus.first()?;
    node.gpus
        .iter()
        .find(|g| g.index == *index)
        .map(|g| g.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_engine::{DecodeTiming, PrefillTiming};

    fn steps(engine: &str, prefill_steps: u64, decode_steps: u64) -> EngineSteps {
        EngineSteps {
            engine: engine.into(),
            prefill: [64u32, 256]
                .iter()
                .map(|&n| PrefillTiming {
                    tokens_max: n,
                    steps: prefill_steps,
                    tokens_total: prefill_steps * u64::from(n) * 3 / 4,
                    seconds_total: prefill_steps as f64 * (0.002 + 1e-5 * f64::from(n)),
                })
                .collect(),
            decode: [2u32, 8]
                .iter()
                .map(|&b| DecodeTiming {
                    batch_max: b,
                    context_tokens_max: 128,
                    steps: decode_steps,
                    sequences_total: decode_steps * u64::from(b) * 3 / 4,
                    seconds_total: decode_steps as f64 * (0.001 + 1e-4 * f64::from(b)),
                })
                .collect(),
        }
    }

    #[test]
    fn a_fit_is_trusted_only_past_the_minimum_and_survives_a_restart() {
        let s = ClusterState::default();
        let mut book = StepBook::default();
        book.take(
            &s,
            "m",
            &[steps("m/prefill-0", 10, 10), steps("x/decode-0", 500, 500)],
        );
        let fits = book.fit(&s, "m");
        assert_eq!(
            fits.len(),
            1,
            "another deployment's engines are not counted"
        );
        assert!(fits[0].fit.calibration.is_none());
        assert_eq!(fits[0].fit.prefill_steps, 20.0);
        assert!(for_role(&fits, EngineRole::Prefill).is_none());
        book.take(&s, "m", &[steps("m/prefill-0", 60, 60)]);
        // Restarted: counts from zero again; what it measured before is kept.
        book.take(&s, "m", &[steps("m/prefill-0", 50, 50)]);
        let fits = book.fit(&s, "m");
        // The steps since the first round (200 of the 220) are enough: the recent ones count.
        assert_eq!(fits[0].fit.prefill_steps, 200.0);
        let c = fits[0].fit.calibration.expect("trusted past the minimum");
        // Steps of a bucket hold three quarters of its bound: 1e-5 s per bound token.
        assert!((c.prefill_per_token_s - 1e-5 / 0.75).abs() < 1e-7, "{c:?}");
        assert_eq!(report(&fits)[0].coefficients.as_ref().unwrap().len(), 6);
    }
}
