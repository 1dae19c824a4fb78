//! What the served system is asked to do: request arrivals with prompt (ISL) and output (OSL)
//! lengths, and the latency targets.

use crate::PlanError;
use crate::rng::SplitMix64;

/// One request as the simulator sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    pub arrival_s: f64,
    /// Prompt tokens.
    pub isl: u32,
    /// Output tokens, the first one included.
    pub osl: u32,
}

/// A length distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum LengthDist {
    Fixed(u32),
    Uniform {
        min: u32,
        max: u32,
    },
    /// Draw from observed lengths (a histogram flattened into a list).
    Empirical(Vec<u32>),
}

impl LengthDist {
    fn sample(&self, rng: &mut SplitMix64) -> u32 {
        match self {
            LengthDist::Fixed(n) => *n,
            LengthDist::Uniform { min, max } => rng.range_u32(*min, *max),
            LengthDist::Empirical(v) => v[rng.range_u32(0, v.len() as u32 - 1) as usize],
        }
    }

    pub fn mean(&self) -> f64 {
        match self {
            LengthDist::Fixed(n) => *n as f64,
            LengthDist::Uniform { min, max } => (*min as f64 + *max as f64) / 2.0,
            LengthDist::Empirical(v) => v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64,
        }
    }

    pub fn max(&self) -> u32 {
        match self {
            LengthDist::Fixed(n) => *n,
            LengthDist::Uniform { max, .. } => *max,
            LengthDist::Empirical(v) => v.iter().copied().max().unwrap_or(0),
        }
    }

    fn validate(&self, field: &'static str) -> Result<(), PlanError> {
        let ok = match self {
            LengthDist::Fixed(n) => *n > 0,
            LengthDist::Uniform { min, max } => *min > 0 && min <= max,
            LengthDist::Empirical(v) => !v.is_empty() && v.iter().all(|&x| x > 0),
        };
        if ok {
            Ok(())
        } else {
            Err(PlanError::invalid(
                field,
                format!("{self:?}: lengths must be ≥ 1"),
            ))
        }
    }
}

/// Arrivals of requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Poisson arrivals at `rate_per_s`, lengths drawn independently, reproducible by `seed`.
    Poisson {
        rate_per_s: f64,
        isl: LengthDist,
        osl: LengthDist,
        requests: u32,
        seed: u64,
    },
    /// Recorded requests, replayed as they are (sorted by arrival).
    Trace(Vec<Request>),
}

impl Workload {
    pub fn requests(&self) -> Result<Vec<Request>, PlanError> {
        match self {
            Workload::Poisson {
                rate_per_s,
                isl,
                osl,
                requests,
                seed,
            } => {
                if !(*rate_per_s > 0.0 && rate_per_s.is_finite()) {
                    return Err(PlanError::invalid(
                        "arrival rate",
                        format!("{rate_per_s}/s: it must be positive"),
                    ));
                }
                isl.validate("ISL")?;
                osl.validate("OSL")?;
                let mut rng = SplitMix64::new(*seed);
                let mut t = 0.0;
                Ok((0..*requests)
                    .map(|_| {
                        t += rng.exponential(*rate_per_s);
                        Request {
                            arrival_s: t,
                            isl: isl.sample(&mut rng),
                            osl: osl.sample(&mut rng),
                        }
                    })
                    .collect())
            }
            Workload::Trace(v) => {
                if let Some(r) = v.iter().find(|r| r.isl == 0 || r.osl == 0) {
                    return Err(PlanError::invalid(
                        "trace",
                        format!("{r:?}: ISL and OSL must be ≥ 1"),
                    ));
                }
                let mut v = v.clone();
                v.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
                Ok(v)
            }
        }
    }
}

/// Latency targets that a request meets or misses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    /// Time to first token.
    pub ttft_s: f64,
    /// Mean time per output token after the first.
    pub tpot_s: f64,
}

/// Share of requests that must meet both targets (DistServe's goodput definition).
pub const SLO_ATTAINMENT_TARGET: f64 = 0.9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_is_deterministic_per_seed_and_has_the_asked_rate() {
        let w = |seed| Workload::Poisson {
            rate_per_s: 20.0,
            isl: LengthDist::Uniform { min: 100, max: 300 },
            osl: LengthDist::Fixed(8),
            requests: 20_000,
            seed,
        };
        let a = w(1).requests().unwrap();
        assert_eq!(a, w(1).requests().unwrap());
        assert_ne!(a, w(2).requests().unwrap());
        let rate = a.len() as f64 / a.last().unwrap().arrival_s;
        assert!((rate - 20.0).abs() < 0.5, "{rate}");
        let mean_isl = a.iter().map(|r| r.isl as f64).sum::<f64>() / a.len() as f64;
        assert!((mean_isl - 200.0).abs() < 2.0, "{mean_isl}");
    }

    #[test]
    fn bad_workloads_are_refused() {
        let w = Workload::Poisson {
            rate_per_s: 0.0,
            isl: LengthDist::Fixed(1),
            osl: LengthDist::Fixed(1),
            requests: 1,
            seed: 0,
        };
        assert!(w.requests().is_err());
        let t = Workload::Trace(vec![Request {
            arrival_s: 0.0,
            isl: 0,
            osl: 1,
        }]);
        assert!(t.requests().is_err());
    }
}
