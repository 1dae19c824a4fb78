//! What `/metrics` reads from this host's engines at scrape time: their load, the KV bytes
//! they moved themselves, and their step times.

use std::collections::HashMap;

use crate::util::Unpoisoned;

use super::Serving;
use super::metrics;

impl Serving {
    /// Adds what this host's engines moved themselves since the last look (vLLM's NIXL bytes,
    /// counted by the engine that pulls them) to `pdagent_kv_bytes_received_total{path="engine"}`.
    pub(super) fn count_engine_kv(&self) {
        let now = self.legs.supervisor().engine_kv_moved();
        let mut seen = self.kv_moved_counted.locked();
        for (engine, total) in &now {
            let before = seen.insert(engine.clone(), *total).unwrap_or(0);
            // A restarted engine counts from zero again.
            let delta = if *total >= before {
                total - before
            } else {
                *total
            };
            if delta > 0 {
                self.metrics.kv_bytes_received.add(&["engine"], delta);
            }
        }
    }
}

/// Load of this host's engines, read at `/metrics` time.
pub(super) fn engine_gauges(s: &Serving) -> Vec<metrics::GaugeSample> {
    let engines = s.coordinator.local().engines();
    let series = |f: fn(&crate::wire::EngineReport) -> f64| {
        engines
            .iter()
            .map(|e| (vec![e.engine.clone()], f(e)))
            .collect()
    };
    let view = s.view();
    let seen: Vec<(Vec<String>, f64)> = view
        .models
        .values()
        .flat_map(|m| m.candidates.iter())
        .map(|c| (vec![c.engine.clone()], f64::from(c.queued + c.running)))
        .collect();
    let mut out = vec![
        metrics::GaugeSample {
            name: "pdagent_router_engine_load",
            help: "Requests queued or running in each engine of the cluster, as this agent's router last saw them (reported by the engine's agent).",
            labels: &["engine"],
            values: seen,
            counter: false,
        },
        metrics::GaugeSample {
            name: "pdagent_engine_queue_depth",
            help: "Requests waiting for admission in each engine of this host.",
            labels: &["engine"],
            values: series(|e| f64::from(e.load.queued)),
            counter: false,
        },
        metrics::GaugeSample {
            name: "pdagent_engine_running_requests",
            help: "Requests admitted in each engine of this host.",
            labels: &["engine"],
            values: series(|e| f64::from(e.load.running)),
            counter: false,
        },
        metrics::GaugeSample {
            name: "pdagent_engine_kv_usage_ratio",
            help: "Share of each engine's KV blocks held by live requests.",
            labels: &["engine"],
            values: series(|e| f64::from(e.load.kv_usage)),
            counter: false,
        },
    ];
    out.extend(step_timings(&s.legs.supervisor().engine_stats()));
    out.extend(kv_integrity(s));
    out
}

/// KV that was refused rather than used: pieces whose bytes did not match their checksum (on
/// arrival from another host, or from an engine's connector on this one), and shipments a
/// decode engine asked for and did not get (its engine then computes the prompt itself).
fn kv_integrity(s: &Serving) -> Vec<metrics::GaugeSample> {
    use std::sync::atomic::Ordering::Relaxed;
    let counts = &s.legs.bridge.counts;
    vec![
        metrics::GaugeSample {
            name: "pdagent_kv_integrity_failures_total",
            help: "KV pieces refused because their bytes did not match their checksum, by where they were checked: network (arriving from another host) or engine (from an engine's KV connector on this host).",
            labels: &["stage"],
            values: vec![
                (
                    vec!["network".into()],
                    s.legs.inbox.integrity_failures() as f64,
                ),
                (
                    vec!["engine".into()],
                    counts.local_integrity_failures.load(Relaxed) as f64,
                ),
            ],
            counter: true,
        },
        metrics::GaugeSample {
            name: "pdagent_kv_handovers_failed_total",
            help: "Shipments a decode engine's KV connector asked this agent for and did not get (failed, incomplete, mismatched or timed out); the engine computes those prompts itself.",
            labels: &[],
            values: vec![(Vec::new(), counts.gets_failed.load(Relaxed) as f64)],
            counter: true,
        },
    ]
}

/// The step times each engine of this host measured (its totals since it started), for
/// calibrating the planner (`pdctl bench calibrate`) or a dashboard: prefill-only steps by
/// tokens in the step, decode-only steps by batch and mean context, both bucketed by powers
/// of two (`le` bounds).
fn step_timings(stats: &HashMap<String, pd_engine::EngineStats>) -> Vec<metrics::GaugeSample> {
    let mut p = [Vec::new(), Vec::new(), Vec::new()];
    let mut d = [Vec::new(), Vec::new(), Vec::new()];
    for (engine, s) in stats {
        for t in &s.prefill_timings {
            let l = vec![engine.clone(), t.tokens_max.to_string()];
            p[0].push((l.clone(), t.steps as f64));
            p[1].push((l.clone(), t.tokens_total as f64));
            p[2].push((l, t.seconds_total));
        }
        for t in &s.decode_timings {
            let l = vec![
                engine.clone(),
                t.batch_max.to_string(),
                t.context_tokens_max.to_string(),
            ];
            d[0].push((l.clone(), t.steps as f64));
            d[1].push((l.clone(), t.sequences_total as f64));
            d[2].push((l, t.seconds_total));
        }
    }
    let [p_steps, p_tokens, p_seconds] = p;
    let [d_steps, d_seqs, d_seconds] = d;
    const P: &[&str] = &["engine", "tokens_max"];
    const D: &[&str] = &["engine", "batch_max", "context_tokens_max"];
    let c = |name, help, labels, values| metrics::GaugeSample {
        name,
        help,
        labels,
        values,
        counter: true,
    };
    vec![
        c(
            "pdagent_engine_prefill_steps_total",
            "Prefill-only steps of each engine of this host, by tokens in the step (bucket upper bound).",
            P,
            p_steps,
        ),
        c(
            "pdagent_engine_prefill_step_tokens_total",
            "Prompt tokens computed in those steps.",
            P,
            p_tokens,
        ),
        c(
            "pdagent_engine_prefill_step_seconds_total",
            "Time spent in those steps.",
            P,
            p_seconds,
        ),
        c(
            "pdagent_engine_decode_steps_total",
            "Decode-only steps of each engine of this host, by batch and mean context (bucket upper bounds).",
            D,
            d_steps,
        ),
        c(
            "pdagent_engine_decode_step_sequences_total",
            "Sequences decoded in those steps.",
            D,
            d_seqs,
        ),
        c(
            "pdagent_engine_decode_step_seconds_total",
            "Time spent in those steps.",
            D,
            d_seconds,
        ),
    ]
}
