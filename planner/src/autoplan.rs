//! Re-planning a running disaggregated deployment from what one window measured: which single
//! move (flip one engine's role, add or remove one engine, or keep) the evidence supports.
//! The coordinator's loop gathers the window and keeps the history; this module decides,
//! purely (no clock, no IO): the same window, layout, bounds and history give the same
//! decision.
//!
//! The rules, in the order they are checked:
//! 1. a window shorter than nine tenths of the interval (a new coordinator's first, partial
//!    one) or with fewer than half of the engines reporting is not acted on;
//! 2. every candidate reachable in one move within the bounds is scored with the predicted SLO
//!    goodput at the window's measured rate and lengths (requests per second that meet both
//!    targets); the best one must beat keeping the layout by more than `gain_threshold`;
//! 3. after a move the deployment cools down for `cooldown_windows` windows;
//! 4. the model must have been right: its prediction for the layout in force must have been
//!    within `forecast_tolerance` of the measured SLO attainment in this window and the
//!    `track_record - 1` before it (a planner whose forecasts miss does not get to act).
//!
//! A decision that may act only says so: whether it is carried out is the deployment's mode
//! (`on` acts, `advise` records).

use crate::{
    Calibration, DecodeSample, Layout, LengthDist, ModelSpec, PlanError, PrefillSample, Request,
    Role, Slo, WorkerGroup, Workload, simulate_after,
};

/// How many engines of each role a disaggregated deployment runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub prefill: u32,
    pub decode: u32,
}

impl Split {
    pub fn engines(&self) -> u32 {
        self.prefill + self.decode
    }

    /// Prefill engines per decode engine.
    pub fn ratio(&self) -> f64 {
        self.prefill as f64 / self.decode.max(1) as f64
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}P{}D", self.prefill, self.decode)
    }
}

/// A token-length histogram as the agents keep it: (upper bound of the bucket in tokens,
/// requests in it), bounds ascending; `u32::MAX` is the overflow bucket.
pub type LengthHistogram = Vec<(u32, u64)>;

/// What one window measured over a deployment's agents.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// How long it lasted (s).
    pub seconds: f64,
    /// Requests that arrived in it.
    pub arrivals: u64,
    pub isl: LengthHistogram,
    pub osl: LengthHistogram,
    /// Requests that finished in it, and those of them within both SLOs.
    pub finished: u64,
    pub within_slo: u64,
    /// The deployment's engines whose agents answered, of all of them.
    pub engines_reporting: u32,
    pub engines_total: u32,
}

impl Window {
    /// Arrivals per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.arrivals as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Share of finished requests within both SLOs (none when nothing finished).
    pub fn attainment(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.within_slo as f64 / self.finished as f64)
    }
}

/// What the moves may not cross.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// GPUs of one engine (its TP).
    pub gpus_per_engine: u32,
    pub min_gpus: u32,
    pub max_gpus: u32,
    /// GPUs free for this deployment now (an engine added needs `gpus_per_engine` of them).
    pub free_gpus: u32,
    /// Prefill engines per decode engine.
    pub pd_ratio_min: f64,
    pub pd_ratio_max: f64,
}

impl Bounds {
    /// Refuses bounds that allow nothing or make no sense, naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.gpus_per_engine == 0 {
            return Err(PlanError::invalid("gpus_per_engine", "0: it must be ≥ 1"));
        }
        if self.min_gpus > self.max_gpus {
            return Err(PlanError::invalid(
                "min_gpus",
                format!("{} is above max_gpus {}", self.min_gpus, self.max_gpus),
            ));
        }
        let ratio_ok = |r: f64| r.is_finite() && r > 0.0;
        if !ratio_ok(self.pd_ratio_min) {
            return Err(PlanError::invalid(
                "pd_ratio_min",
                format!("{}: it must be a positive number", self.pd_ratio_min),
            ));
        }
        if !ratio_ok(self.pd_ratio_max) {
            return Err(PlanError::invalid(
                "pd_ratio_max",
                format!("{}: it must be a positive number", self.pd_ratio_max),
            ));
        }
        if self.pd_ratio_min > self.pd_ratio_max {
            return Err(PlanError::invalid(
                "pd_ratio_min",
                format!(
                    "{} is above pd_ratio_max {}",
                    self.pd_ratio_min, self.pd_ratio_max
                ),
            ));
        }
        Ok(())
    }

    fn allow(&self, s: Split) -> bool {
        let gpus = s.engines() * self.gpus_per_engine;
        // Rounding: a ratio on the bound is inside it.
        let r = s.ratio();
        s.prefill >= 1
            && s.decode >= 1
            && (self.min_gpus..=self.max_gpus).contains(&gpus)
            && r >= self.pd_ratio_min - 1e-9
            && r <= self.pd_ratio_max + 1e-9
    }
}

/// How eagerly the loop acts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The loop's interval (s); a window shorter than nine tenths of it is partial.
    pub interval_s: f64,
    /// Predicted goodput gain over keeping the layout needed to move (0.10: 10%).
    pub gain_threshold: f64,
    /// Largest miss (absolute, in SLO attainment) of a forecast that still counts as right.
    pub forecast_tolerance: f64,
    /// Windows after a move in which no other move is made.
    pub cooldown_windows: u32,
    /// Consecutive windows, this one included, whose forecasts must have been right.
    pub track_record: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval_s: 15.0,
            gain_threshold: 0.10,
            forecast_tolerance: 0.15,
            cooldown_windows: 2,
            track_record: 2,
        }
    }
}

/// Shortest and longest loop interval (s).
pub const INTERVAL_S_MIN: f64 = 5.0;
pub const INTERVAL_S_MAX: f64 = 600.0;

impl Policy {
    /// Refuses a policy out of bounds, naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        if !(INTERVAL_S_MIN..=INTERVAL_S_MAX).contains(&self.interval_s) {
            return Err(PlanError::invalid(
                "interval",
                format!(
                    "{} s: it must be between {INTERVAL_S_MIN} and {INTERVAL_S_MAX} s",
                    self.interval_s
                ),
            ));
        }
        if !(self.gain_threshold >= 0.0 && self.gain_threshold.is_finite()) {
            return Err(PlanError::invalid(
                "gain_threshold",
                format!("{}: it must be ≥ 0", self.gain_threshold),
            ));
        }
        if !(0.0..=1.0).contains(&self.forecast_tolerance) {
            return Err(PlanError::invalid(
                "forecast_tolerance",
                format!("{}: it must be between 0 and 1", self.forecast_tolerance),
            ));
        }
        if self.track_record == 0 {
            return Err(PlanError::invalid("track_record", "0: it must be ≥ 1"));
        }
        Ok(())
    }
}

/// One engine's change of role, one engine more or less, or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    Keep,
    /// One engine from the first role to the second (a host's role flip).
    Flip {
        from: Role,
        to: Role,
    },
    AddEngine(Role),
    RemoveEngine(Role),
}

impl Move {
    /// The split after the move (`None`: it cannot be made from `s`).
    pub fn apply(self, s: Split) -> Option<Split> {
        let add = |s: Split, r: Role, n: i64| -> Option<Split> {
            let (p, d) = (s.prefill as i64, s.decode as i64);
            let (p, d) = match r {
                Role::Prefill => (p + n, d),
                Role::Decode => (p, d + n),
                Role::Colocated => return None,
            };
            Some(Split {
                prefill: u32::try_from(p).ok()?,
                decode: u32::try_from(d).ok()?,
            })
        };
        match self {
            Move::Keep => Some(s),
            Move::Flip { from, to } if from != to => add(add(s, from, -1)?, to, 1),
            Move::Flip { .. } => None,
            Move::AddEngine(r) => add(s, r, 1),
            Move::RemoveEngine(r) => add(s, r, -1),
        }
    }

    /// A short name, for events and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Move::Keep => "keep",
            Move::Flip {
                from: Role::Prefill,
                ..
            } => "flip-prefill-to-decode",
            Move::Flip { .. } => "flip-decode-to-prefill",
            Move::AddEngine(Role::Prefill) => "add-prefill",
            Move::AddEngine(_) => "add-decode",
            Move::RemoveEngine(Role::Prefill) => "remove-prefill",
            Move::RemoveEngine(_) => "remove-decode",
        }
    }

    /// Every move considered, keeping first.
    pub const ALL: [Move; 7] = [
        Move::Keep,
        Move::Flip {
            from: Role::Prefill,
            to: Role::Decode,
        },
        Move::Flip {
            from: Role::Decode,
            to: Role::Prefill,
        },
        Move::AddEngine(Role::Prefill),
        Move::AddEngine(Role::Decode),
        Move::RemoveEngine(Role::Prefill),
        Move::RemoveEngine(Role::Decode),
    ];

    /// GPUs the move needs beyond what the deployment holds.
    fn new_gpus(self, bounds: &Bounds) -> u32 {
        match self {
            Move::AddEngine(_) => bounds.gpus_per_engine,
            _ => 0,
        }
    }
}

/// What the model predicts for a split at the window's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Share of requests within both SLOs.
    pub attainment: f64,
    /// Requests per second within both SLOs: the measured rate × `attainment`.
    pub goodput_rps: f64,
}

/// A candidate and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub mv: Move,
    pub split: Split,
    /// `Err`: the model could not score it (the reason), e.g. a prompt that does not fit.
    pub prediction: Result<Prediction, String>,
}

/// Why a decision acts or not.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// The window is shorter than nine tenths of the interval.
    PartialWindow { seconds: f64, interval_s: f64 },
    /// Fewer than half of the engines reported.
    TooFewReports { reporting: u32, total: u32 },
    /// No request arrived: nothing to plan for.
    NoTraffic,
    /// The layout in force could not be scored.
    Unscored { why: String },
    /// No candidate beats keeping the layout by the threshold (`gain`: the best one's).
    GainBelowThreshold { gain: f64, threshold: f64 },
    /// A move was made this few windows ago.
    CoolingDown {
        windows_since_move: u64,
        cooldown: u32,
    },
    /// The model's forecasts missed (or there are too few of them to judge).
    ForecastsMissed { detail: String },
    /// The best candidate beats keeping by `gain`, and the rules allow it.
    Gain { gain: f64 },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::PartialWindow {
                seconds,
                interval_s,
            } => write!(
                f,
                "a partial window ({seconds:.1} s of {interval_s:.0} s): not acted on"
            ),
            Reason::TooFewReports { reporting, total } => write!(
                f,
                "only {reporting} of {total} engines reported: fewer than half, not acted on"
            ),
            Reason::NoTraffic => write!(f, "no requests in the window"),
            Reason::Unscored { why } => write!(f, "the layout in force could not be scored: {why}"),
            Reason::GainBelowThreshold { gain, threshold } => write!(
                f,
                "the best move gains {:.1}% predicted goodput, below the {:.0}% threshold",
                gain * 100.0,
                threshold * 100.0
            ),
            Reason::CoolingDown {
                windows_since_move,
                cooldown,
            } => write!(
                f,
                "cooling down: the last move was {windows_since_move} window(s) ago, {cooldown} must pass"
            ),
            Reason::ForecastsMissed { detail } => write!(f, "forecasts not trusted: {detail}"),
            Reason::Gain { gain } if gain.is_infinite() => write!(
                f,
                "predicted goodput gain: the layout in force keeps no request within the SLOs, the move some"
            ),
            Reason::Gain { gain } => write!(f, "predicted goodput gain {:.1}%", gain * 100.0),
        }
    }
}

/// One window as the loop remembers it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Past {
    pub index: u64,
    /// The model's prediction of the SLO attainment of the layout in force, and what was
    /// measured.
    pub predicted: Option<f64>,
    pub measured: Option<f64>,
    /// A move was made at the end of it.
    pub moved: bool,
}

/// What the loop decided at the end of window `index`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub index: u64,
    pub current: Split,
    /// The best candidate (`Keep` when nothing beats the layout in force).
    pub best: Move,
    /// Whether the rules allow making `best` now (the deployment's mode decides whether it is
    /// made).
    pub act: bool,
    pub reason: Reason,
    /// Every candidate scored, keeping first.
    pub candidates: Vec<Scored>,
    /// What the decision knew it lacked (missing reports, unscored candidates).
    pub notes: Vec<String>,
    /// This window as the history should remember it (`moved` set when `act` is carried out).
    pub past: Past,
}

/// Decides at the end of window `index`. `score` predicts a split's SLO attainment at the
/// window's load (see `SimScorer`); `history` holds earlier windows, oldest first.
pub fn decide(
    index: u64,
    window: &Window,
    current: Split,
    bounds: &Bounds,
    policy: &Policy,
    history: &[Past],
    mut score: impl FnMut(Split) -> Result<f64, PlanError>,
) -> Decision {
    let mut notes = Vec::new();
    if window.engines_reporting < window.engines_total {
        notes.push(format!(
            "{} of {} engines reported; decided on what they measured",
            window.engines_reporting, window.engines_total
        ));
    }
    let rate = window.rate();
    let measured = window.attainment();
    let mut candidates = Vec::new();
    if window.arrivals > 0 {
        for mv in Move::ALL {
            let Some(split) = mv.apply(current) else {
                continue;
            };
            if mv != Move::Keep && (!bounds.allow(split) || mv.new_gpus(bounds) > bounds.free_gpus)
            {
                continue;
            }
            let prediction = score(split)
                .map(|a| Prediction {
                    attainment: a,
                    goodput_rps: rate * a,
                })
                .map_err(|e| e.to_string());
            if let Err(why) = &prediction {
                notes.push(format!("{} ({split}) not scored: {why}", mv.name()));
            }
            candidates.push(Scored {
                mv,
                split,
                prediction,
            });
        }
    }
    let keep = candidates
        .first()
        .and_then(|c| c.prediction.as_ref().ok())
        .copied();
    let past = Past {
        index,
        predicted: keep.map(|p| p.attainment),
        measured,
        moved: false,
    };
    // The best scored candidate; keeping wins ties (a move must earn its disruption).
    let mut best = (Move::Keep, keep.map_or(0.0, |p| p.goodput_rps));
    for c in &candidates {
        if let Ok(p) = &c.prediction
            && p.goodput_rps > best.1 * (1.0 + 1e-9)
        {
            best = (c.mv, p.goodput_rps);
        }
    }
    let decision = |best: Move, act: bool, reason: Reason, candidates, notes| Decision {
        index,
        current,
        best,
        act,
        reason,
        candidates,
        notes,
        past,
    };
    let interval = policy.interval_s;
    if window.seconds < 0.9 * interval {
        let reason = Reason::PartialWindow {
            seconds: window.seconds,
            interval_s: interval,
        };
        return decision(best.0, false, reason, candidates, notes);
    }
    if window.engines_reporting * 2 < window.engines_total {
        let reason = Reason::TooFewReports {
            reporting: window.engines_reporting,
            total: window.engines_total,
        };
        return decision(best.0, false, reason, candidates, notes);
    }
    if window.arrivals == 0 {
        return decision(Move::Keep, false, Reason::NoTraffic, candidates, notes);
    }
    let Some(keep) = keep else {
        let why = candidates
            .first()
            .and_then(|c| c.prediction.clone().err())
            .unwrap_or_default();
        return decision(
            Move::Keep,
            false,
            Reason::Unscored { why },
            candidates,
            notes,
        );
    };
    let gain = if keep.goodput_rps > 0.0 {
        best.1 / keep.goodput_rps - 1.0
    } else if best.1 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    if best.0 == Move::Keep || gain <= policy.gain_threshold {
        let reason = Reason::GainBelowThreshold {
            gain: gain.max(0.0),
            threshold: policy.gain_threshold,
        };
        return decision(best.0, false, reason, candidates, notes);
    }
    if let Some(last) = history.iter().rev().find(|p| p.moved) {
        let since = index.saturating_sub(last.index);
        if since <= u64::from(policy.cooldown_windows) {
            let reason = Reason::CoolingDown {
                windows_since_move: since,
                cooldown: policy.cooldown_windows,
            };
            return decision(best.0, false, reason, candidates, notes);
        }
    }
    if let Err(detail) = track_record(&past, history, policy) {
        let reason = Reason::ForecastsMissed { detail };
        return decision(best.0, false, reason, candidates, notes);
    }
    decision(best.0, true, Reason::Gain { gain }, candidates, notes)
}

/// Whether the forecasts of this window and the `track_record - 1` before it (consecutive,
/// each with a forecast and finished requests) were, on average, within the tolerance of what
/// was measured. The windows are pooled: one window of a few requests measures its attainment
/// coarsely, and a queue that builds or drains makes a window differ from the steady state the
/// simulator predicts, while a model that is wrong stays wrong over several.
fn track_record(this: &Past, history: &[Past], policy: &Policy) -> Result<(), String> {
    let wanted = policy.track_record as usize;
    let windows: Vec<&Past> = std::iter::once(this)
        .chain(history.iter().rev())
        .take(wanted)
        .collect();
    let mut pairs = Vec::new();
    for (k, p) in windows.iter().enumerate() {
        if k > 0 && windows[k - 1].index != p.index + 1 {
            return Err(format!(
                "window {} is missing from the history (a new coordinator starts its record afresh)",
                p.index + 1
            ));
        }
        match (p.predicted, p.measured) {
            (Some(f), Some(m)) => pairs.push((f, m)),
            _ => {
                return Err(format!(
                    "window {}: no forecast or no finished request to check it against",
                    p.index
                ));
            }
        }
    }
    if windows.len() < wanted {
        return Err(format!(
            "{} window(s) of forecasts checked, {wanted} needed",
            windows.len()
        ));
    }
    let n = pairs.len() as f64;
    let f = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let m = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    if (f - m).abs() <= policy.forecast_tolerance + 1e-9 {
        return Ok(());
    }
    let first = windows.last().map_or(this.index, |p| p.index);
    let span = if first == this.index {
        format!("window {first}")
    } else {
        format!("windows {first} to {}", this.index)
    };
    Err(format!(
        "{span}: predicted {:.0}% of requests within the SLOs, measured {:.0}% (tolerance {:.0} points)",
        f * 100.0,
        m * 100.0,
        policy.forecast_tolerance * 100.0
    ))
}

/// Scores splits with the planner's simulator: the deployment's engines as `prefill` and
/// `decode` groups (their step-time models: the roofline, or a calibration fitted to the
/// engines' own step times), requests drawn from the window's rate and length histograms.
pub struct SimScorer<'a> {
    pub model: &'a ModelSpec,
    pub prefill: WorkerGroup,
    pub decode: WorkerGroup,
    pub slo: Slo,
    /// Requests simulated per score; the first fifth warm the system up and are not measured.
    pub requests: u32,
    pub seed: u64,
}

impl SimScorer<'_> {
    /// The window's load as simulated requests (the same for every split scored).
    pub fn requests_for(&self, window: &Window) -> Result<Vec<Request>, PlanError> {
        Workload::Poisson {
            rate_per_s: window.rate(),
            isl: empirical(&window.isl, "ISL histogram")?,
            osl: empirical(&window.osl, "OSL histogram")?,
            requests: self.requests,
            seed: self.seed,
        }
        .requests()
    }

    /// The SLO attainment of `split` on `requests`.
    pub fn attainment(&self, split: Split, requests: &[Request]) -> Result<f64, PlanError> {
        let group = |g: &WorkerGroup, workers: u32| WorkerGroup {
            workers,
            ..g.clone()
        };
        let layout = Layout {
            groups: vec![
                group(&self.prefill, split.prefill),
                group(&self.decode, split.decode),
            ],
        };
        let warmup = requests
            .get(requests.len() / 5)
            .map_or(0.0, |r| r.arrival_s);
        Ok(simulate_after(self.model, &layout, requests, &self.slo, warmup)?.slo_attainment)
    }
}

/// Draws from a histogram: each bucket's midpoint (the overflow bucket: its lower bound),
/// as many times as the bucket's share of at most 1000 draws (at least once when not empty).
pub fn empirical(h: &LengthHistogram, field: &'static str) -> Result<LengthDist, PlanError> {
    let total: u64 = h.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return Err(PlanError::invalid(field, "no requests in it"));
    }
    let mut out = Vec::new();
    let mut lower = 0u32;
    for &(upper, n) in h {
        if upper < lower {
            return Err(PlanError::invalid(field, "bucket bounds must ascend"));
        }
        if n > 0 {
            let value = if upper == u32::MAX {
                lower.max(1)
            } else {
                (lower / 2 + upper / 2 + (lower % 2 + upper % 2) / 2).max(1)
            };
            let copies = ((n as f64 / total as f64) * 1000.0).round().max(1.0) as usize;
            out.extend(std::iter::repeat_n(value, copies));
        }
        lower = upper;
    }
    Ok(LengthDist::Empirical(out))
}

/// One bucket of an engine's prefill-only step counters (`pdagent_engine_prefill_steps_total`,
/// `..._step_tokens_total`, `..._step_seconds_total` of one `tokens_max`), over some span.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PrefillBucket {
    pub steps: f64,
    pub tokens: f64,
    pub seconds: f64,
}

/// One bucket of an engine's decode-only step counters, and the context its label stands for.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecodeBucket {
    pub steps: f64,
    pub sequences: f64,
    pub seconds: f64,
    /// Mean context tokens of a sequence in the bucket (from its `context_tokens_max`).
    pub context_tokens: f64,
}

impl PrefillBucket {
    /// The bucket's mean step (none without steps).
    pub fn sample(&self) -> Option<PrefillSample> {
        (self.steps > 0.0).then(|| PrefillSample {
            tokens: self.tokens / self.steps,
            seconds: self.seconds / self.steps,
        })
    }
}

impl DecodeBucket {
    pub fn sample(&self) -> Option<DecodeSample> {
        (self.steps > 0.0).then(|| DecodeSample {
            batch: self.sequences / self.steps,
            context_tokens: self.context_tokens,
            seconds: self.seconds / self.steps,
        })
    }
}

/// The step-time model of one engine kind on one GPU kind, fitted online.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineFit {
    /// `Some`: fitted and trusted; `None`: the roofline stands (`why` says why).
    pub calibration: Option<Calibration>,
    pub why: Option<String>,
    pub prefill_steps: f64,
    pub decode_steps: f64,
}

/// Fits the step-time model to an engine kind's counters (accumulated over the windows seen),
/// trusted only with at least `min_steps` steps of each phase and the shapes the fit needs.
pub fn fit_online(prefill: &[PrefillBucket], decode: &[DecodeBucket], min_steps: f64) -> OnlineFit {
    let prefill_steps: f64 = prefill.iter().map(|b| b.steps).sum();
    let decode_steps: f64 = decode.iter().map(|b| b.steps).sum();
    let untrusted = |why: String| OnlineFit {
        calibration: None,
        why: Some(why),
        prefill_steps,
        decode_steps,
    };
    if prefill_steps < min_steps || decode_steps < min_steps {
        return untrusted(format!(
            "{prefill_steps} prefill and {decode_steps} decode steps measured, {min_steps} of each needed"
        ));
    }
    let p: Vec<PrefillSample> = prefill.iter().filter_map(PrefillBucket::sample).collect();
    let d: Vec<DecodeSample> = decode.iter().filter_map(DecodeBucket::sample).collect();
    match Calibration::fit(&p, &d) {
        Ok(c) => OnlineFit {
            calibration: Some(c),
            why: None,
            prefill_steps,
            decode_steps,
        },
        Err(e) => untrusted(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
