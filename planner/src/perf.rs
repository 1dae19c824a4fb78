//! The performance model: how long one engine step takes, how much KV fits, how long a KV
//! transfer takes.
//!
//! A step's time is a roofline — the larger of its compute time and its memory time, each at
//! an efficiency below peak — plus tensor-parallel all-reduces over NVLink and a fixed step
//! overhead. Measured step times replace the roofline in two ways: `Efficiency::fit` fits the
//! efficiency factors of a known GPU to them, and `Calibration::fit` fits step times directly,
//! which is all there is for a host without published peaks (the reference engine on a CPU).

use crate::{Dtypes, ModelSpec, PlanError, SystemSpec};

/// Fraction of GPU memory an engine claims (vLLM's `gpu_memory_utilization` default).
pub const MEMORY_UTILIZATION: f64 = 0.9;
/// Memory an engine keeps per GPU for activations, CUDA graphs and the sampler.
pub const ACTIVATION_RESERVE_BYTES: f64 = 2e9;
/// Share of a NIC's line rate a bulk KV transfer reaches (RDMA or striped QUIC).
pub const NETWORK_EFFICIENCY: f64 = 0.8;
/// Fixed cost of one KV transfer: connection lookup, handshake of the block list.
pub const NETWORK_LATENCY_S: f64 = 100e-6;

/// How far below peak an engine runs, and its fixed costs. The defaults follow published
/// measurements: large GEMMs reach 72–86% of peak (derated as AIConfigurator does), decode reaches 60–86%
/// of HBM bandwidth at large batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Efficiency {
    pub prefill_compute: f64,
    pub prefill_memory: f64,
    pub decode_compute: f64,
    pub decode_memory: f64,
    /// Scheduler and launch cost of every step, independent of the model's depth.
    pub prefill_overhead_s: f64,
    pub decode_overhead_s: f64,
    /// Launch cost per layer and step (kernels that CUDA graphs do not hide).
    pub layer_overhead_s: f64,
    /// Share of NVLink bandwidth a ring all-reduce reaches.
    pub nvlink: f64,
    /// Latency of one all-reduce: it dominates at decode's small messages.
    pub allreduce_latency_s: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        Efficiency {
            prefill_compute: 0.65,
            prefill_memory: 0.75,
            decode_compute: 0.5,
            decode_memory: 0.7,
            prefill_overhead_s: 1e-3,
            decode_overhead_s: 0.5e-3,
            layer_overhead_s: 4e-6,
            nvlink: 0.7,
            allreduce_latency_s: 8e-6,
        }
    }
}

impl Efficiency {
    /// Peak everything, no overhead: the pure roofline, for hand-checked tests.
    pub fn ideal() -> Self {
        Efficiency {
            prefill_compute: 1.0,
            prefill_memory: 1.0,
            decode_compute: 1.0,
            decode_memory: 1.0,
            prefill_overhead_s: 0.0,
            decode_overhead_s: 0.0,
            layer_overhead_s: 0.0,
            nvlink: 1.0,
            allreduce_latency_s: 0.0,
        }
    }
}

/// The work of one engine step. Chunked prefill and decode may share a step (colocated).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepLoad {
    /// Prompt tokens computed in this step.
    pub prefill_tokens: f64,
    /// Prompts whose last token is in this step: they need logits.
    pub prefill_logits: f64,
    /// Σ over prompt chunks of c·(2p + c) for c new tokens after p cached ones: t² for a whole
    /// prompt of t tokens, the measure of causal attention work.
    pub prefill_square_tokens: f64,
    /// Sequences that decode one token.
    pub decode_seqs: f64,
    /// Their contexts added up: the keys decode attention reads.
    pub decode_context_tokens: f64,
}

impl StepLoad {
    /// Whole prompts of the given lengths, in one prefill step.
    pub fn prompts(lengths: &[u32]) -> Self {
        let mut s = StepLoad::default();
        for &l in lengths {
            s.add_chunk(l as f64, 0.0, true);
        }
        s
    }

    /// A decode step of `seqs` sequences whose contexts add up to `context_tokens`.
    pub fn decode(seqs: f64, context_tokens: f64) -> Self {
        StepLoad {
            decode_seqs: seqs,
            decode_context_tokens: context_tokens,
            ..StepLoad::default()
        }
    }

    /// `new` prompt tokens after `prefix` cached ones; `last`: the prompt ends here.
    pub fn add_chunk(&mut self, new: f64, prefix: f64, last: bool) {
        self.prefill_tokens += new;
        self.prefill_square_tokens += new * (2.0 * prefix + new);
        if last {
            self.prefill_logits += 1.0;
        }
    }
}

/// A measured prefill-only step (or the mean of a bucket of them, as the reference engine's
/// stats report: `tokens_total / steps`, `seconds_total / steps`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillSample {
    /// Prompt tokens in the step, taken as one prompt (its attention grows as tokens²).
    pub tokens: f64,
    pub seconds: f64,
}

/// A measured decode-only step, or a bucket's mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeSample {
    pub batch: f64,
    /// Mean context (prompt + generated tokens) of the sequences in the batch.
    pub context_tokens: f64,
    pub seconds: f64,
}

/// Distinct values, for the "enough shapes to fit" checks.
fn distinct(values: impl Iterator<Item = f64>) -> usize {
    let mut v: Vec<u64> = values.map(f64::to_bits).collect();
    v.sort_unstable();
    v.dedup();
    v.len()
}

/// Step times fitted to measurements, with no reference to peak figures:
/// prefill = base + per_token·t + per_square_token·t², decode = base + per_seq·B +
/// per_context_token·ΣC. Every coefficient is ≥ 0 (a non-negative least-squares fit on
/// relative errors), so predictions never fall as work grows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub prefill_base_s: f64,
    pub prefill_per_token_s: f64,
    pub prefill_per_square_token_s: f64,
    pub decode_base_s: f64,
    pub decode_per_seq_s: f64,
    pub decode_per_context_token_s: f64,
}

impl Calibration {
    /// Fits both phases. Prefill needs at least two distinct prompt lengths, decode at least
    /// two distinct batch sizes; more shapes let the quadratic and context terms show.
    pub fn fit(prefill: &[PrefillSample], decode: &[DecodeSample]) -> Result<Self, PlanError> {
        let lengths = distinct(prefill.iter().map(|s| s.tokens));
        if lengths < 2 {
            return Err(PlanError::Calibration {
                needed: "prefill samples of at least 2 distinct prompt lengths",
                got: format!("{lengths} distinct"),
            });
        }
        let batches = distinct(decode.iter().map(|s| s.batch));
        if batches < 2 {
            return Err(PlanError::Calibration {
                needed: "decode samples of at least 2 distinct batch sizes",
                got: format!("{batches} distinct"),
            });
        }
        let bad = |v: f64| !(v > 0.0 && v.is_finite());
        if let Some(s) = prefill.iter().find(|s| bad(s.seconds) || bad(s.tokens)) {
            return Err(PlanError::Calibration {
                needed: "positive prefill step times and token counts",
                got: format!("{} s for {} tokens", s.seconds, s.tokens),
            });
        }
        if let Some(s) = decode
            .iter()
            .find(|s| bad(s.seconds) || bad(s.batch) || bad(s.context_tokens))
        {
            return Err(PlanError::Calibration {
                needed: "positive decode step times, batches and contexts",
                got: format!("{} s at batch {}", s.seconds, s.batch),
            });
        }
        let p = nnls_relative(
            &prefill
                .iter()
                .map(|s| ([1.0, s.tokens, s.tokens * s.tokens], s.seconds))
                .collect::<Vec<_>>(),
        );
        let d = nnls_relative(
            &decode
                .iter()
                .map(|s| ([1.0, s.batch, s.batch * s.context_tokens], s.seconds))
                .collect::<Vec<_>>(),
        );
        Ok(Calibration {
            prefill_base_s: p[0],
            prefill_per_token_s: p[1],
            prefill_per_square_token_s: p[2],
            decode_base_s: d[0],
            decode_per_seq_s: d[1],
            decode_per_context_token_s: d[2],
        })
    }

    /// A step's time. A mixed step pays one base cost (the weights are read once) and the
    /// per-token costs of both phases.
    pub fn step_s(&self, load: &StepLoad) -> f64 {
        let prefill = load.prefill_tokens > 0.0;
        let decode = load.decode_seqs > 0.0;
        let base = match (prefill, decode) {
            (true, true) => self.prefill_base_s.max(self.decode_base_s),
            (true, false) => self.prefill_base_s,
            (false, true) => self.decode_base_s,
            (false, false) => return 0.0,
        };
        base + self.prefill_per_token_s * load.prefill_tokens
            + self.prefill_per_square_token_s * load.prefill_square_tokens
            + self.decode_per_seq_s * load.decode_seqs
            + self.decode_per_context_token_s * load.decode_context_tokens
    }
}

/// Non-negative least squares of 3 coefficients, weighting each row by 1/y so that short and
/// long steps count alike. With 3 unknowns the exact answer is the best of the 7 column
/// subsets whose unconstrained solution is non-negative.
fn nnls_relative(rows: &[([f64; 3], f64)]) -> [f64; 3] {
    let mut best = ([0.0; 3], f64::INFINITY);
    for mask in 1u32..8 {
        let cols: Vec<usize> = (0..3).filter(|c| mask & (1 << c) != 0).collect();
        let n = cols.len();
        // Normal equations AᵀA x = Aᵀy on the weighted rows.
        let mut a = vec![vec![0.0; n + 1]; n];
        for (x, y) in rows {
            let w = 1.0 / y;
            for (i, &ci) in cols.iter().enumerate() {
                for (j, &cj) in cols.iter().enumerate() {
                    a[i][j] += x[ci] * w * x[cj] * w;
                }
                a[i][n] += x[ci] * w * y * w;
            }
        }
        let Some(sol) = solve(a) else { continue };
        if sol.iter().any(|v| *v < 0.0 || !v.is_finite()) {
            continue;
        }
        let mut coef = [0.0; 3];
        for (i, &c) in cols.iter().enumerate() {
            coef[c] = sol[i];
        }
        let err: f64 = rows
            .iter()
            .map(|(x, y)| {
                let pred: f64 = (0..3).map(|c| coef[c] * x[c]).sum();
                ((pred - y) / y).powi(2)
            })
            .sum();
        if err < best.1 {
            best = (coef, err);
        }
    }
    best.0
}

/// Gaussian elimination with partial pivoting on an augmented n×(n+1) matrix.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        // Relative to the column's scale: the columns differ by orders of magnitude (1, t, t²).
        let scale = (0..n).map(|i| a[i][col].abs()).fold(0.0, f64::max);
        if a[pivot][col].abs() <= scale * 1e-12 || scale == 0.0 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

/// Where a worker's step times come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepCost {
    /// The roofline over the system's peak figures.
    Roofline(Efficiency),
    /// Fitted step times of this very engine (tensor parallelism included in what was
    /// measured).
    Measured(Calibration),
}

/// One engine: a model on `tp` GPUs of a system. Construction precomputes the per-token
/// constants, so a step costs a handful of multiplications (the simulator calls it for every
/// step).
#[derive(Debug, Clone)]
pub struct PerfModel {
    pub tp: u32,
    pub dtypes: Dtypes,
    pub cost: StepCost,
    layers: f64,
    full_layers: f64,
    sliding: Option<(f64, f64)>,
    hidden: f64,
    linear_flops_per_token: f64,
    head_flops_per_seq: f64,
    prefill_flops_per_pair: f64,
    decode_flops_per_pair: f64,
    always_read_bytes: f64,
    expert_bytes: f64,
    experts: f64,
    /// ln(1 − k/E): the simulator asks for every step, and exp is cheaper than powf.
    ln_untouched_per_token: f64,
    kv_bytes_per_pair: f64,
    kv_bytes_per_token: f64,
    peak_flops_per_s: f64,
    /// Attention runs in the KV cache's format (FlashAttention-3 has fp8 kernels).
    attention_flops_per_s: f64,
    hbm_bytes_per_s: f64,
    nvlink_bytes_per_s: f64,
    network_bytes_per_s: f64,
    kv_share: f64,
    kv_budget_bytes: f64,
    weight_bytes_per_rank: f64,
}

impl PerfModel {
    /// Checks that the worker can exist: TP within one NVLink domain, a roofline only where
    /// the system has peak figures. Whether the weights fit is `kv_budget_bytes() > 0`.
    pub fn new(
        model: &ModelSpec,
        system: &SystemSpec,
        dtypes: Dtypes,
        tp: u32,
        cost: StepCost,
    ) -> Result<Self, PlanError> {
        if tp == 0 || tp > system.gpus_per_node.max(1) {
            return Err(PlanError::invalid(
                "tensor parallelism",
                format!(
                    "TP {tp} on {}: it must be between 1 and the {} GPUs of one NVLink domain",
                    system.name, system.gpus_per_node
                ),
            ));
        }
        if let StepCost::Measured(c) = &cost {
            let coefficients = [
                c.prefill_base_s,
                c.prefill_per_token_s,
                c.prefill_per_square_token_s,
                c.decode_base_s,
                c.decode_per_seq_s,
                c.decode_per_context_token_s,
            ];
            let usable = coefficients.iter().all(|v| v.is_finite() && *v >= 0.0)
                && c.prefill_base_s + c.prefill_per_token_s > 0.0
                && c.decode_base_s + c.decode_per_seq_s > 0.0;
            if !usable {
                return Err(PlanError::Calibration {
                    needed: "finite, non-negative coefficients and steps that take time",
                    got: format!("{c:?}"),
                });
            }
        }
        if matches!(cost, StepCost::Roofline(_)) && !system.has_peaks() {
            return Err(PlanError::invalid(
                "step cost",
                format!(
                    "{} has no peak figures; give it a Calibration of measured step times",
                    system.name
                ),
            ));
        }
        let t = tp as f64;
        let wb = dtypes.weights.bytes();
        let kv_share = model.kv_share_per_rank(tp);
        let per_layer_kv = model.kv_bytes_per_token(dtypes.kv) / model.layers as f64;
        let full = model.layers as f64
            - model
                .sliding_window
                .map_or(0.0, |w| w.layers.min(model.layers) as f64);
        let weight_bytes_per_rank = model.weight_bytes(dtypes.weights) / t;
        let usable = match cost {
            // A measured host's memory is already what the engine may use.
            StepCost::Measured(_) if !system.has_peaks() => system.hbm_bytes,
            _ => system.hbm_bytes * MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES,
        };
        Ok(PerfModel {
            tp,
            dtypes,
            cost,
            layers: model.layers as f64,
            full_layers: full,
            sliding: model
                .sliding_window
                .map(|w| (w.layers.min(model.layers) as f64, w.tokens as f64)),
            hidden: model.hidden_size as f64,
            linear_flops_per_token: 2.0 * model.active_block_params() / t,
            head_flops_per_seq: 2.0 * model.lm_head_params() / t,
            prefill_flops_per_pair: model.prefill_attention_flops_per_pair() / t,
            decode_flops_per_pair: model.decode_attention_flops_per_pair() / t,
            always_read_bytes: (model.always_active_block_params() * wb
                + model.lm_head_params() * 2.0)
                / t,
            expert_bytes: model.routed_expert_params() * wb / t,
            experts: model.moe.as_ref().map_or(0.0, |m| m.experts as f64),
            ln_untouched_per_token: model.moe.as_ref().map_or(0.0, |m| {
                (1.0 - m.experts_per_token as f64 / m.experts as f64).ln()
            }),
            kv_bytes_per_pair: per_layer_kv * kv_share,
            kv_bytes_per_token: model.kv_bytes_per_token(dtypes.kv) * kv_share,
            peak_flops_per_s: system.peak_flops_per_s(dtypes.weights),
            attention_flops_per_s: system.peak_flops_per_s(dtypes.kv),
            hbm_bytes_per_s: system.hbm_bytes_per_s,
            nvlink_bytes_per_s: system.nvlink_bytes_per_s,
            network_bytes_per_s: system.network_bytes_per_s,
            kv_share,
            kv_budget_bytes: usable - weight_bytes_per_rank,
            weight_bytes_per_rank,
        })
    }

    /// Weights each rank holds.
    pub fn weight_bytes_per_rank(&self) -> f64 {
        self.weight_bytes_per_rank
    }

    /// Memory each rank has left for KV after the weights; ≤ 0: the model does not fit.
    pub fn kv_budget_bytes(&self) -> f64 {
        self.kv_budget_bytes
    }

    /// KV bytes one rank stores for a sequence of `context` tokens.
    pub fn kv_bytes_per_rank(&self, model: &ModelSpec, context: f64) -> f64 {
        model.kv_bytes_for_context(context, self.dtypes.kv) * self.kv_share
    }

    /// Tokens of KV the engine can hold (full-attention layers' measure).
    pub fn max_kv_tokens(&self) -> f64 {
        (self.kv_budget_bytes / self.kv_bytes_per_token).max(0.0)
    }

    /// Sequences of `context` tokens that fit at once.
    pub fn max_sequences(&self, model: &ModelSpec, context: f64) -> u32 {
        let per = self.kv_bytes_per_rank(model, context);
        if per <= 0.0 || self.kv_budget_bytes <= 0.0 {
            return 0;
        }
        (self.kv_budget_bytes / per).floor().min(u32::MAX as f64) as u32
    }

    /// (query, key) pairs over all layers implied by a load (sliding layers cap the keys).
    fn pairs(&self, load: &StepLoad) -> (f64, f64) {
        let mut prefill = self.full_layers * load.prefill_square_tokens / 2.0;
        let mut decode = self.full_layers * load.decode_context_tokens;
        if let Some((layers, window)) = self.sliding {
            if load.prefill_tokens > 0.0 {
                let mean_keys = load.prefill_square_tokens / (2.0 * load.prefill_tokens);
                prefill += layers * load.prefill_tokens * mean_keys.min(window);
            }
            if load.decode_seqs > 0.0 {
                let mean_ctx = load.decode_context_tokens / load.decode_seqs;
                decode += layers * load.decode_seqs * mean_ctx.min(window);
            }
        }
        (prefill, decode)
    }

    /// Expected share of routed experts a step reads: each of `tokens` picks k of E experts,
    /// so an expert stays untouched with probability (1 − k/E)^tokens.
    pub fn experts_touched_share(&self, tokens: f64) -> f64 {
        if self.experts <= 0.0 {
            return 0.0;
        }
        1.0 - (self.ln_untouched_per_token * tokens).exp()
    }

    /// The matrix multiplies of a step on one rank: (FLOPs, HBM bytes). Every token of the
    /// step goes through one GEMM per projection, so the weights are read once per step (the
    /// routed experts only where the step's tokens go) and the new tokens' KV is written.
    pub fn gemm_work(&self, load: &StepLoad) -> (f64, f64) {
        let tokens = load.prefill_tokens + load.decode_seqs;
        let flops = self.linear_flops_per_token * tokens
            + self.head_flops_per_seq * (load.prefill_logits + load.decode_seqs);
        let bytes = self.always_read_bytes
            + self.expert_bytes * self.experts_touched_share(tokens)
            + self.kv_bytes_per_token * tokens;
        (flops, bytes)
    }

    /// Attention of a step on one rank: prefill FLOPs (FlashAttention keeps the prompt's KV
    /// on chip, so it is compute only), decode FLOPs and decode KV bytes read from HBM.
    pub fn attention_work(&self, load: &StepLoad) -> (f64, f64, f64) {
        let (pp, dp) = self.pairs(load);
        (
            self.prefill_flops_per_pair * pp,
            self.decode_flops_per_pair * dp,
            self.kv_bytes_per_pair * dp,
        )
    }

    /// Two ring all-reduces of the activations per layer (after attention, after the MLP).
    pub fn allreduce_s(&self, tokens: f64, eff: &Efficiency) -> f64 {
        if self.tp <= 1 {
            return 0.0;
        }
        2.0 * self.layers * (eff.allreduce_latency_s + self.allreduce_wire_s(tokens) / eff.nvlink)
    }

    /// Seconds one engine step takes.
    pub fn step_s(&self, load: &StepLoad) -> f64 {
        let tokens = load.prefill_tokens + load.decode_seqs;
        if tokens <= 0.0 {
            return 0.0;
        }
        match &self.cost {
            StepCost::Measured(c) => c.step_s(load),
            StepCost::Roofline(e) => self
                .roofline_terms(load)
                .seconds(e, load.prefill_tokens > 0.0),
        }
    }

    /// The roofline's parts of a step at peak, for `step_s` and for fitting efficiencies.
    fn roofline_terms(&self, load: &StepLoad) -> RooflineTerms {
        let (gemm_flops, gemm_bytes) = self.gemm_work(load);
        let (prefill_attn, decode_attn, kv_read) = self.attention_work(load);
        let tokens = load.prefill_tokens + load.decode_seqs;
        RooflineTerms {
            gemm_compute_s: gemm_flops / self.peak_flops_per_s,
            gemm_memory_s: gemm_bytes / self.hbm_bytes_per_s,
            prefill_attention_s: prefill_attn / self.attention_flops_per_s,
            decode_attention_compute_s: decode_attn / self.attention_flops_per_s,
            decode_attention_memory_s: kv_read / self.hbm_bytes_per_s,
            allreduces: if self.tp > 1 { 2.0 * self.layers } else { 0.0 },
            allreduce_wire_s: self.allreduce_wire_s(tokens),
            layers: self.layers,
        }
    }

    /// Wire time of one ring all-reduce of `tokens` activations at full NVLink speed.
    fn allreduce_wire_s(&self, tokens: f64) -> f64 {
        if self.tp <= 1 {
            return 0.0;
        }
        let t = self.tp as f64;
        2.0 * (t - 1.0) / t * tokens * self.hidden * 2.0 / self.nvlink_bytes_per_s
    }

    /// A prefill step of whole prompts.
    pub fn prefill_s(&self, lengths: &[u32]) -> f64 {
        self.step_s(&StepLoad::prompts(lengths))
    }

    /// A decode step of `batch` sequences at a mean context of `context` tokens.
    pub fn decode_s(&self, batch: f64, context: f64) -> f64 {
        self.step_s(&StepLoad::decode(batch, batch * context))
    }

    /// Time to move a prompt's KV from this engine to `to` over the hosts' NICs. The senders
    /// split the distinct bytes among their NICs; each receiving rank takes its own shard
    /// (MLA's latent is replicated, so every receiving rank takes the whole cache).
    pub fn kv_transfer_s(&self, to: &PerfModel, model: &ModelSpec, tokens: f64) -> f64 {
        let bytes = model.kv_bytes_for_context(tokens, self.dtypes.kv);
        let send = bytes / self.tp as f64 / self.network_bytes_per_s;
        let recv = bytes * to.kv_share / to.network_bytes_per_s;
        NETWORK_LATENCY_S + send.max(recv) / NETWORK_EFFICIENCY
    }
}

/// A step's roofline parts at peak speed; `seconds` applies the efficiencies.
///
/// Three kernel families run one after another, each at its own roofline: the GEMMs (shared
/// by prefill and decode tokens, so a mixed step reads the weights once), prefill attention
/// (compute-bound) and decode attention (bound by KV reads). Summing them, rather than taking
/// one max over the whole step, keeps a mixed step from hiding decode's KV reads under
/// prefill's compute, which no engine achieves.
#[derive(Debug, Clone, Copy)]
struct RooflineTerms {
    gemm_compute_s: f64,
    gemm_memory_s: f64,
    prefill_attention_s: f64,
    decode_attention_compute_s: f64,
    decode_attention_memory_s: f64,
    allreduces: f64,
    allreduce_wire_s: f64,
    layers: f64,
}

impl RooflineTerms {
    fn seconds(&self, e: &Efficiency, prefill: bool) -> f64 {
        let (gc, gm, over) = if prefill {
            (e.prefill_compute, e.prefill_memory, e.prefill_overhead_s)
        } else {
            (e.decode_compute, e.decode_memory, e.decode_overhead_s)
        };
        (self.gemm_compute_s / gc).max(self.gemm_memory_s / gm)
            + self.prefill_attention_s / e.prefill_compute
            + (self.decode_attention_compute_s / e.decode_compute)
                .max(self.decode_attention_memory_s / e.decode_memory)
            + self.allreduces * (e.allreduce_latency_s + self.allreduce_wire_s / e.nvlink)
            + over
            + self.layers * e.layer_overhead_s
    }

    /// The step's time as `overhead + compute·(1/ec) + memory·(1/em) + comm`, given which
    /// side of each max binds under `e`: the columns of a linear fit of 1/ec and 1/em.
    fn linear_columns(&self, e: &Efficiency, prefill: bool) -> ([f64; 3], f64) {
        let (gc, gm) = if prefill {
            (e.prefill_compute, e.prefill_memory)
        } else {
            (e.decode_compute, e.decode_memory)
        };
        let (mut compute, mut memory) = (0.0, 0.0);
        if self.gemm_compute_s / gc >= self.gemm_memory_s / gm {
            compute += self.gemm_compute_s;
        } else {
            memory += self.gemm_memory_s;
        }
        if prefill {
            compute += self.prefill_attention_s;
        }
        if self.decode_attention_compute_s / gc >= self.decode_attention_memory_s / gm {
            compute += self.decode_attention_compute_s;
        } else {
            memory += self.decode_attention_memory_s;
        }
        let comm = self.allreduces * (e.allreduce_latency_s + self.allreduce_wire_s / e.nvlink);
        ([1.0, compute, memory], comm)
    }
}

impl Efficiency {
    /// Fits each phase's compute and memory efficiency and per-step overhead to measured step
    /// times of `model` on `tp` GPUs of `system` (a known GPU). Once it is known which side of
    /// each roofline max binds, a step's time is linear in (overhead, 1/compute efficiency,
    /// 1/memory efficiency): a non-negative least-squares fit on relative errors, repeated
    /// until the binding sides settle. The result replaces the defaults for every layout of
    /// that system, so other TP sizes and batches extrapolate from measurements. A phase
    /// whose samples never bind one side keeps the default for it; efficiencies stay ≤ 1.
    pub fn fit(
        model: &ModelSpec,
        system: &SystemSpec,
        dtypes: Dtypes,
        tp: u32,
        prefill: &[PrefillSample],
        decode: &[DecodeSample],
    ) -> Result<Self, PlanError> {
        if prefill.is_empty() || decode.is_empty() {
            return Err(PlanError::Calibration {
                needed: "prefill and decode samples",
                got: format!("{} prefill, {} decode", prefill.len(), decode.len()),
            });
        }
        let base = Efficiency {
            layer_overhead_s: 0.0,
            ..Efficiency::default()
        };
        let p = PerfModel::new(model, system, dtypes, tp, StepCost::Roofline(base))?;
        let prefill_terms: Vec<(RooflineTerms, f64)> = prefill
            .iter()
            .map(|s| {
                let mut load = StepLoad::default();
                load.add_chunk(s.tokens, 0.0, true);
                (p.roofline_terms(&load), s.seconds)
            })
            .collect();
        let decode_terms: Vec<(RooflineTerms, f64)> = decode
            .iter()
            .map(|s| {
                let load = StepLoad::decode(s.batch, s.batch * s.context_tokens);
                (p.roofline_terms(&load), s.seconds)
            })
            .collect();
        let mut e = base;
        for _ in 0..8 {
            let before = e;
            let [ov, ic, im] = fit_phase(&prefill_terms, &e, true);
            e.prefill_overhead_s = ov;
            e.prefill_compute = inverse_or(ic, base.prefill_compute);
            e.prefill_memory = inverse_or(im, base.prefill_memory);
            let [ov, ic, im] = fit_phase(&decode_terms, &e, false);
            e.decode_overhead_s = ov;
            e.decode_compute = inverse_or(ic, base.decode_compute);
            e.decode_memory = inverse_or(im, base.decode_memory);
            if e == before {
                break;
            }
        }
        Ok(e)
    }
}

/// 1/x as an efficiency, capped at 1; where the fit left the column out (0), the default.
fn inverse_or(x: f64, default: f64) -> f64 {
    if x > 0.0 { (1.0 / x).min(1.0) } else { default }
}

fn fit_phase(samples: &[(RooflineTerms, f64)], e: &Efficiency, prefill: bool) -> [f64; 3] {
    let rows: Vec<([f64; 3], f64)> = samples
        .iter()
        .filter_map(|(t, seconds)| {
            let (cols, comm) = t.linear_columns(e, prefill);
            // Time left once the (unfitted) all-reduces are taken off.
            let y = seconds - comm;
            (y > 0.0).then_some((cols, y))
        })
        .collect();
    nnls_relative(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dtype, find_model, find_system};

    fn close(a: f64, b: f64, rel: f64) -> bool {
        ((a - b) / b).abs() <= rel
    }

    fn ideal(model: &str, system: &str, tp: u32) -> (ModelSpec, PerfModel) {
        let m = find_model(model).unwrap();
        let s = find_system(system).unwrap();
        let p = PerfModel::new(
            &m,
            &s,
            Dtypes::bf16(),
            tp,
            StepCost::Roofline(Efficiency::ideal()),
        )
        .unwrap();
        (m, p)
    }

    // Llama-3.1-8B by hand: attention 4096·4096·2 + 4096·1024·2 = 41,943,040 and MLP
    // 3·4096·14336 = 176,160,768 per layer, ×32 layers = 6,979,321,856 block weights; LM head
    // 128256·4096 = 525,336,576. KV: 2·8·128·2 bytes = 4096 bytes per token and layer.
    const BLOCK: f64 = 6_979_321_856.0;
    const HEAD: f64 = 525_336_576.0;

    #[test]
    fn decode_step_by_hand_is_weights_plus_kv_over_bandwidth() {
        let (_, p) = ideal("Llama-3.1-8B", "h100_sxm", 1);
        // Batch 1 at 1024 tokens of context: the weights (bf16) and one token's KV written
        // go through the GEMMs' memory side; attention reads 32 layers × 1024 keys × 4096
        // bytes. Both parts are memory-bound by far (15 GFLOP against 989 TFLOP/s).
        let gemm_bytes = (BLOCK + HEAD) * 2.0 + 131_072.0;
        let kv_read = 32.0 * 1024.0 * 4096.0;
        let want = gemm_bytes / 3.35e12 + kv_read / 3.35e12;
        let got = p.decode_s(1.0, 1024.0);
        assert!(close(got, want, 1e-9), "{got} vs {want}");
        assert!(close(got, 4.5205e-3, 1e-4), "{got}");
    }

    #[test]
    fn prefill_step_by_hand_is_compute_bound() {
        let (_, p) = ideal("Llama-3.1-8B", "h100_sxm", 1);
        // 4096 prompt tokens: 2 FLOPs per weight per token, logits for the last token only,
        // causal attention 4·heads·head_dim FLOPs per pair over 32·4096²/2 pairs.
        let gemm = 2.0 * BLOCK * 4096.0 + 2.0 * HEAD;
        let attn = 4.0 * 32.0 * 128.0 * (32.0 * 4096.0 * 4096.0 / 2.0);
        let want = (gemm + attn) / 989e12;
        let got = p.prefill_s(&[4096]);
        assert!(close(got, want, 1e-9), "{got} vs {want}");
        assert!(close(got, 62.2586e-3, 1e-4), "{got}");
        // Two prompts of 2048 do the same GEMM work but half the attention, plus one more
        // set of logits.
        let two = p.prefill_s(&[2048, 2048]);
        let want2 = (2.0 * BLOCK * 4096.0 + 4.0 * HEAD + attn / 2.0) / 989e12;
        assert!(close(two, want2, 1e-9));
    }

    #[test]
    fn tensor_parallel_splits_work_and_adds_all_reduces() {
        let (_, p1) = ideal("Llama-3.1-8B", "h100_sxm", 1);
        let (_, p2) = ideal("Llama-3.1-8B", "h100_sxm", 2);
        // Ideal NVLink: 2 all-reduces × 32 layers of 2·(t−1)/t · 4096·2 bytes at 450 GB/s.
        let ar = 64.0 * (4096.0 * 2.0) / 450e9;
        assert!(close(p2.allreduce_s(1.0, &Efficiency::ideal()), ar, 1e-12));
        assert!(close(
            p2.decode_s(1.0, 1024.0),
            p1.decode_s(1.0, 1024.0) / 2.0 + ar,
            1e-9
        ));
        // With the default latency of 8 µs, a decode step pays 64 × 8 µs in all-reduces.
        let d = Efficiency::default();
        assert!(p2.allreduce_s(1.0, &d) > 64.0 * 8e-6);
    }

    #[test]
    fn moe_decode_reads_only_the_experts_its_batch_touches() {
        let (m, p) = ideal("Qwen3-235B-A22B", "h200_sxm", 8);
        assert!(close(p.experts_touched_share(1.0), 8.0 / 128.0, 1e-12));
        let b64 = 1.0 - (120.0f64 / 128.0).powi(64);
        assert!(close(p.experts_touched_share(64.0), b64, 1e-12));
        // Batch 1 reads the always-active weights and 1/16 of the routed experts.
        let (_, bytes) = p.gemm_work(&StepLoad::decode(1.0, 100.0));
        let always = (m.always_active_block_params() + m.lm_head_params()) * 2.0 / 8.0;
        let experts = m.routed_expert_params() * 2.0 / 8.0 / 16.0;
        let kv_write = m.kv_bytes_per_token(Dtype::Bf16) / 4.0 / 8.0 * 4.0 / 4.0;
        assert!(
            close(bytes, always + experts + kv_write / 1.0, 1e-3),
            "{bytes}"
        );
        // Compute uses the active parameters only: 2·(active block) + 2·head per token.
        let (flops, _) = p.gemm_work(&StepLoad::decode(1.0, 100.0));
        let want = 2.0 * (m.active_block_params() + m.lm_head_params()) / 8.0;
        assert!(close(flops, want, 1e-12));
    }

    #[test]
    fn memory_fit_and_kv_transfer() {
        let m = find_model("Llama-3.1-70B").unwrap();
        let h100 = find_system("h100_sxm").unwrap();
        let cost = StepCost::Roofline(Efficiency::default());
        let tp1 = PerfModel::new(&m, &h100, Dtypes::bf16(), 1, cost).unwrap();
        assert!(
            tp1.kv_budget_bytes() < 0.0,
            "141 GB of weights do not fit 80 GB"
        );
        assert_eq!(tp1.max_sequences(&m, 1000.0), 0);
        let tp4 = PerfModel::new(&m, &h100, Dtypes::bf16(), 4, cost).unwrap();
        assert!(close(m.weight_bytes(Dtype::Bf16), 141.1e9, 0.01));
        // 72 GB usable − 2 GB reserve − 35.3 GB of weights, at 320 KiB/4 per token and rank.
        let budget = 80e9 * 0.9 - 2e9 - m.weight_bytes(Dtype::Bf16) / 4.0;
        assert!(close(tp4.kv_budget_bytes(), budget, 1e-12));
        assert!(close(tp4.max_kv_tokens(), budget / 81_920.0, 1e-12));
        // fp8 KV doubles the tokens.
        let fp8 = Dtypes::new(Dtype::Bf16, Dtype::Fp8).unwrap();
        let tp4_fp8 = PerfModel::new(&m, &h100, fp8, 4, cost).unwrap();
        assert!(close(
            tp4_fp8.max_kv_tokens(),
            2.0 * tp4.max_kv_tokens(),
            1e-12
        ));
        // A 4K prompt's 1.34 GB over 4 NICs of 50 GB/s at 80%, plus the fixed latency.
        let bytes = m.kv_bytes_for_context(4096.0, Dtype::Bf16);
        let want = NETWORK_LATENCY_S + bytes / 4.0 / 50e9 / NETWORK_EFFICIENCY;
        assert!(close(tp4.kv_transfer_s(&tp4, &m, 4096.0), want, 1e-12));
        // TP above the NVLink domain, and a roofline on a host without peaks, are refused.
        assert!(PerfModel::new(&m, &h100, Dtypes::bf16(), 16, cost).is_err());
        let host = SystemSpec::measured_host("cpu", 64e9, 1e9);
        assert!(PerfModel::new(&m, &host, Dtypes::bf16(), 1, cost).is_err());
    }

    #[test]
    fn fp8_weights_use_fp8_peak_where_the_gpu_has_it() {
        let m = find_model("Llama-3.1-8B").unwrap();
        let fp8 = Dtypes::new(Dtype::Fp8, Dtype::Fp8).unwrap();
        let cost = StepCost::Roofline(Efficiency::ideal());
        let prefill = |sys: &str, d: Dtypes| {
            let s = find_system(sys).unwrap();
            PerfModel::new(&m, &s, d, 1, cost)
                .unwrap()
                .prefill_s(&[8192])
        };
        // 8192 tokens are compute-bound in both formats: fp8 GEMMs and fp8 attention run at
        // the fp8 peak (1979 against 989 TFLOP/s on H100).
        let (h_bf16, h_fp8) = (
            prefill("h100_sxm", Dtypes::bf16()),
            prefill("h100_sxm", fp8),
        );
        assert!(
            close(h_fp8, h_bf16 * 989.0 / 1979.0, 1e-9),
            "{h_fp8} {h_bf16}"
        );
        // A100 has no fp8 tensor cores: the same compute time, only fewer bytes.
        let (a_bf16, a_fp8) = (
            prefill("a100_sxm", Dtypes::bf16()),
            prefill("a100_sxm", fp8),
        );
        assert!(close(a_fp8, a_bf16, 1e-9), "{a_fp8} {a_bf16}");
        // Decode is bound by bytes: fp8 halves them everywhere.
        let decode = |sys: &str, d: Dtypes| {
            let s = find_system(sys).unwrap();
            PerfModel::new(&m, &s, d, 1, cost)
                .unwrap()
                .decode_s(32.0, 2048.0)
        };
        let ratio = decode("a100_sxm", fp8) / decode("a100_sxm", Dtypes::bf16());
        // The LM head stays bf16, so a little over a half.
        assert!(ratio > 0.5 && ratio < 0.55, "{ratio}");
    }

    #[test]
    fn calibration_recovers_coefficients_and_never_goes_negative() {
        let truth = Calibration {
            prefill_base_s: 2e-3,
            prefill_per_token_s: 1e-5,
            prefill_per_square_token_s: 2e-9,
            decode_base_s: 1e-2,
            decode_per_seq_s: 1e-4,
            decode_per_context_token_s: 1e-7,
        };
        let prefill: Vec<PrefillSample> = [64.0, 256.0, 1024.0, 2048.0]
            .iter()
            .map(|&t| PrefillSample {
                tokens: t,
                seconds: truth.step_s(&StepLoad::prompts(&[t as u32])),
            })
            .collect();
        let decode: Vec<DecodeSample> = [(1.0, 100.0), (8.0, 500.0), (32.0, 200.0), (16.0, 2000.0)]
            .iter()
            .map(|&(b, c)| DecodeSample {
                batch: b,
                context_tokens: c,
                seconds: truth.step_s(&StepLoad::decode(b, b * c)),
            })
            .collect();
        let fit = Calibration::fit(&prefill, &decode).unwrap();
        for (a, b) in [
            (fit.prefill_base_s, truth.prefill_base_s),
            (fit.prefill_per_token_s, truth.prefill_per_token_s),
            (
                fit.prefill_per_square_token_s,
                truth.prefill_per_square_token_s,
            ),
            (fit.decode_base_s, truth.decode_base_s),
            (fit.decode_per_seq_s, truth.decode_per_seq_s),
            (
                fit.decode_per_context_token_s,
                truth.decode_per_context_token_s,
            ),
        ] {
            assert!(close(a, b, 1e-6), "{a} vs {b}");
        }
        // Concave data would fit a negative t² term; the fit drops it instead.
        let concave: Vec<PrefillSample> = [100.0, 1000.0, 2000.0, 4000.0]
            .iter()
            .map(|&t: &f64| PrefillSample {
                tokens: t,
                seconds: 1e-3 + 1e-5 * t - 4e-10 * t * t,
            })
            .collect();
        let fit = Calibration::fit(&concave, &decode).unwrap();
        assert_eq!(fit.prefill_per_square_token_s, 0.0);
        assert!(fit.prefill_per_token_s > 0.0);
        // Too few shapes are refused with what was missing.
        let one = [prefill[0], prefill[0]];
        assert!(matches!(
            Calibration::fit(&one, &decode),
            Err(PlanError::Calibration { .. })
        ));
    }

    #[test]
    fn efficiency_fit_reproduces_measured_gpu_step_times() {
        let m = find_model("Llama-3.1-8B").unwrap();
        let s = find_system("h100_sxm").unwrap();
        let truth = Efficiency {
            prefill_compute: 0.55,
            decode_memory: 0.62,
            prefill_overhead_s: 3e-3,
            decode_overhead_s: 1.5e-3,
            layer_overhead_s: 0.0,
            ..Efficiency::default()
        };
        let p = PerfModel::new(&m, &s, Dtypes::bf16(), 1, StepCost::Roofline(truth)).unwrap();
        let prefill: Vec<PrefillSample> = [128u32, 512, 2048, 8192]
            .iter()
            .map(|&t| PrefillSample {
                tokens: t as f64,
                seconds: p.prefill_s(&[t]),
            })
            .collect();
        let decode: Vec<DecodeSample> = [
            (1.0, 512.0),
            (16.0, 1024.0),
            (64.0, 2048.0),
            (128.0, 4096.0),
        ]
        .iter()
        .map(|&(b, c)| DecodeSample {
            batch: b,
            context_tokens: c,
            seconds: p.decode_s(b, c),
        })
        .collect();
        let fit = Efficiency::fit(&m, &s, Dtypes::bf16(), 1, &prefill, &decode).unwrap();
        let q = PerfModel::new(&m, &s, Dtypes::bf16(), 1, StepCost::Roofline(fit)).unwrap();
        for x in &prefill {
            assert!(
                close(q.prefill_s(&[x.tokens as u32]), x.seconds, 0.02),
                "{fit:?}"
            );
        }
        for x in &decode {
            assert!(
                close(q.decode_s(x.batch, x.context_tokens), x.seconds, 0.02),
                "{fit:?}"
            );
        }
        // And it extrapolates to shapes it never saw (a batch of 256).
        assert!(close(
            q.decode_s(256.0, 3000.0),
            p.decode_s(256.0, 3000.0),
            0.03
        ));
    }

    #[test]
    fn a_measured_host_is_described_by_its_calibration_alone() {
        let m = crate::parse_hf_config(
            "tiny",
            r#"{"hidden_size":256,"num_hidden_layers":4,"num_attention_heads":4,
                "num_key_value_heads":2,"intermediate_size":512,"vocab_size":1024}"#,
        )
        .unwrap();
        let cal = Calibration {
            prefill_base_s: 1e-3,
            prefill_per_token_s: 2e-5,
            prefill_per_square_token_s: 0.0,
            decode_base_s: 4e-3,
            decode_per_seq_s: 1e-4,
            decode_per_context_token_s: 1e-7,
        };
        let host = SystemSpec::measured_host("this-cpu", 4e9, 1e9);
        let p = PerfModel::new(&m, &host, Dtypes::bf16(), 1, StepCost::Measured(cal)).unwrap();
        assert!(close(p.prefill_s(&[100]), 1e-3 + 2e-3, 1e-12));
        assert!(close(
            p.decode_s(4.0, 50.0),
            4e-3 + 4e-4 + 200.0 * 1e-7,
            1e-12
        ));
        // Its memory is what the engine may use: no GPU reserve taken off.
        assert!(close(
            p.kv_budget_bytes(),
            4e9 - m.weight_bytes(Dtype::Bf16),
            1e-12
        ));
    }
}
