//! Latency histograms as agents hand them to each other (summed across agents by the admin API
//! and the planner).

/// One series of a histogram as it stands: per-bucket (not cumulative) counts, for summing
/// several agents' series and reading a mean and quantiles from them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistSnapshot {
    /// Upper bounds; observations above the last count in `count` only.
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl HistSnapshot {
    /// Adds `other` (same buckets) into `self`; a series with other buckets is refused.
    pub fn merge(&mut self, other: &HistSnapshot) -> bool {
        if self.bounds != other.bounds || self.counts.len() != other.counts.len() {
            return false;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        true
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The `q` quantile, linearly interpolated inside its bucket as Prometheus'
    /// `histogram_quantile` does (the first bucket from 0; beyond the last bound, that bound).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, (&bound, &c)) in self.bounds.iter().zip(&self.counts).enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let into = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
                return Some(lower + (bound - lower) * into);
            }
            below += c;
        }
        self.bounds.last().copied()
    }
}

/// What one agent's ingress measured for one model, for the cluster-wide view
/// (`GET /v1/deployments`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelLatency {
    pub model: String,
    pub ttft: HistSnapshot,
    pub tpot: HistSnapshot,
}

/// What one agent's ingress counted for one model since it started, for the coordinator's
/// re-planning (`autoplan`), which takes the difference of two.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelWorkload {
    pub model: String,
    /// Requests answered, whatever the outcome.
    pub requests: u64,
    /// Finished requests of a deployment with both latency targets: those that met both, and
    /// those that missed one.
    pub within_slo: u64,
    pub missed_slo: u64,
    /// Prompt and output tokens of the finished requests.
    pub prompt_tokens: HistSnapshot,
    pub output_tokens: HistSnapshot,
}

/// One engine's step-time counters since it started (its prefill-only and decode-only steps,
/// bucketed), for the coordinator's online calibration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineSteps {
    pub engine: String,
    pub prefill: Vec<pd_engine::PrefillTiming>,
    pub decode: Vec<pd_engine::DecodeTiming>,
}

impl EngineSteps {
    /// Every engine's counters out of what the supervisor last sampled.
    pub fn of(
        stats: std::collections::HashMap<String, pd_engine::EngineStats>,
    ) -> Vec<EngineSteps> {
        stats
            .into_iter()
            .map(|(engine, s)| EngineSteps {
                engine,
                prefill: s.prefill_timings,
                decode: s.decode_timings,
            })
            .collect()
    }
}
