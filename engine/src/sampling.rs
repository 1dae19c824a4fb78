//! Token selection: greedy at temperature 0, otherwise seeded temperature/top-p sampling.
//!
//! The random draw for the i-th generated token depends only on `(seed, i)`, not on a stream
//! of earlier draws, so a decode engine that continues a request another engine prefilled
//! picks the same tokens as one engine doing both.

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// How a request picks and stops generating tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    pub top_p: f32,
    pub seed: u64,
    /// Tokens to generate at most, the first included.
    pub max_tokens: u32,
    /// Extra ids that end generation (the model's EOS ids always do, unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        }
    }

    pub(crate) fn validate(&self, id: u64) -> Result<(), EngineError> {
        let bad = |field, reason: &str| EngineError::Sampling {
            id,
            field,
            reason: reason.to_string(),
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad("temperature", "must be a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", "must be in (0, 1]"));
        }
        if self.max_tokens == 0 {
            return Err(bad("max_tokens", "must be at least 1"));
        }
        Ok(())
    }
}

/// Picks the token at output index `index` from `logits`.
pub(crate) fn sample(logits: &[f32], p: &SamplingParams, index: u32) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / f64::from(p.temperature);
    let max = logits
        .iter()
        .filter(|x| x.is_finite())
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    if !max.is_finite() {
        return argmax(logits);
    }
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let w = if x.is_finite() {
                ((f64::from(x) - max) * inv_t).exp()
            } else {
                0.0
            };
            (i as u32, w)
        })
        .collect();
    // Highest first; equal weights by id so the order is total and machine-independent.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|x| x.1).sum();
    let mut kept = 0usize;
    let mut mass = 0.0;
    for (_, w) in &probs {
        kept += 1;
        mass += w / total;
        if mass >= f64::from(p.top_p) {
            break;
        }
    }
    probs.truncate(kept.max(1));
    let kept_total: f64 = probs.iter().map(|x| x.1).sum();
    let u = uniform(p.seed, index) * kept_total;
    let mut acc = 0.0;
    for (id, w) in &probs {
        acc += w;
        if u < acc {
            return *id;
        }
    }
    probs.last().map(|x| x.0).unwrap_or(0)
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, x) in logits.iter().enumerate() {
        if *x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Uniform in [0, 1) from (seed, index) with SplitMix64's finaliser.
fn uniform(seed: u64, index: u32) -> f64 {
    let mut z = seed
        ^ u64::from(index)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(
            sample(&[0.0, 3.0, 3.0, 1.0], &SamplingParams::greedy(1), 0),
            1
        );
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_respects_top_p() {
        let logits = [2.0f32, 1.9, 0.0, -1.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
            ..SamplingParams::default()
        };
        let picks: Vec<u32> = (0..64).map(|i| sample(&logits, &p, i)).collect();
        assert_eq!(
            picks,
            (0..64).map(|i| sample(&logits, &p, i)).collect::<Vec<_>>()
        );
        // top_p 0.5 keeps only the best token here (it holds ~0.46, the next pushes past 0.5).
        assert!(picks.iter().all(|&t| t <= 1));
        let wide = SamplingParams { top_p: 1.0, ..p };
        let picks: std::collections::HashSet<u32> =
            (0..256).map(|i| sample(&logits, &wide, i)).collect();
        assert!(
            picks.len() >= 3,
            "full-mass sampling should reach most tokens: {picks:?}"
        );
    }
}
