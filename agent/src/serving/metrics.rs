//! The agent's Prometheus metrics, rendered in the text exposition format (version 0.0.4) at
//! `GET /metrics` on the OpenAI port. No client library: counters and histograms are atomics
//! and small maps, so recording on the request path costs a few nanoseconds.
//!
//! Names follow Prometheus conventions: `pdagent_` prefix, base units (seconds, bytes),
//! `_total` for counters.

use crate::util::Unpoisoned;
use crate::wire::latency::{HistSnapshot, ModelLatency, ModelWorkload};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets in seconds: 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Agent-time buckets in seconds: 50 µs to 1 s.
pub const AGENT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];
/// Per-token buckets in seconds: 0.5 ms to 5 s.
pub const TOKEN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Shipment-size buckets in bytes: 64 KiB to 4 GiB, by fours.
pub const BYTES_BUCKETS: &[f64] = &[
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];
/// Request-length buckets in tokens: 16 to 128 Ki, by twos (prompt and output lengths).
pub const LENGTH_BUCKETS: &[f64] = &[
    16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0, 131072.0,
];
/// Throughput buckets in bytes per second: 10 MB/s to 100 GB/s.
pub const THROUGHPUT_BUCKETS: &[f64] = &[1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11];

/// A histogram with fixed buckets, for one label set.
struct Hist {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in nanoseconds (or the value's base unit times 1e9), to stay atomic.
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Self {
        Hist {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos
            .fetch_add((v.max(0.0) * 1e9) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// A labelled histogram family.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    bounds: &'static [f64],
    series: Mutex<BTreeMap<String, std::sync::Arc<Hist>>>,
}

impl Histogram {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        label: &'static str,
        bounds: &'static [f64],
    ) -> Self {
        Histogram {
            name,
            help,
            label,
            bounds,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn observe(&self, label: &str, v: f64) {
        let h = {
            let mut s = self.series.locked();
            match s.get(label) {
                Some(h) => h.clone(),
                None => {
                    let h = std::sync::Arc::new(Hist::new(self.bounds));
                    s.insert(label.to_string(), h.clone());
                    h
                }
            }
        };
        h.observe(v);
    }

    /// Every series, by label value.
    pub fn snapshot(&self) -> BTreeMap<String, HistSnapshot> {
        let s = self.series.locked();
        s.iter()
            .map(|(label, h)| {
                let snap = HistSnapshot {
                    bounds: h.bounds.to_vec(),
                    counts: h.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
                    count: h.count.load(Ordering::Relaxed),
                    sum: h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
                };
                (label.clone(), snap)
            })
            .collect()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} histogram", self.name);
        let s = self.series.locked();
        for (label, h) in s.iter() {
            let l = format!("{}=\"{}\"", self.label, escape(label));
            let mut cum = 0;
            for (b, c) in h.bounds.iter().zip(&h.counts) {
                cum += c.load(Ordering::Relaxed);
                let _ = writeln!(out, "{}_bucket{{{l},le=\"{b}\"}} {cum}", self.name);
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{}_bucket{{{l},le=\"+Inf\"}} {count}", self.name);
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{}_sum{{{l}}} {sum}", self.name);
            let _ = writeln!(out, "{}_count{{{l}}} {count}", self.name);
        }
    }
}

/// A counter family with labels given as `(name, value)` pairs in a fixed order.
pub struct Counter {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl Counter {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Counter {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn add(&self, values: &[&str], n: u64) {
        debug_assert_eq!(values.len(), self.labels.len());
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        *self.series.locked().entry(key).or_insert(0) += n;
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1);
    }

    /// The sum of the series whose first labels are `prefix` (every outcome of a model, say).
    pub fn sum_of(&self, prefix: &[&str]) -> u64 {
        self.series
            .locked()
            .iter()
            .filter(|(k, _)| k.iter().zip(prefix).all(|(a, b)| a == b))
            .map(|(_, v)| v)
            .sum()
    }

    /// The value of one series (0 if never touched).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.series.locked().get(&key).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} counter", self.name);
        let s = self.series.locked();
        for (values, v) in s.iter() {
            let _ = writeln!(out, "{}{} {v}", self.name, labels(self.labels, values));
        }
    }
}

/// A gauge family set by the code that knows the value (the re-planner's latest figures).
pub struct Gauge {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, f64>>,
}

impl Gauge {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Gauge {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set(&self, values: &[&str], v: f64) {
        debug_assert_eq!(values.len(), self.labels.len());
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.series.locked().insert(key, v);
    }

    /// Forgets every series whose first label is not in `keep` (a deployment gone, or this
    /// agent no longer the coordinator).
    pub fn retain_first(&self, keep: &dyn Fn(&str) -> bool) {
        self.series
            .locked()
            .retain(|k, _| k.first().is_some_and(|f| keep(f)));
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} gauge", self.name);
        for (values, v) in self.series.locked().iter() {
            let _ = writeln!(out, "{}{} {v}", self.name, labels(self.labels, values));
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(names: &[&str], values: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A gauge read at render time.
pub struct GaugeSample {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub values: Vec<(Vec<String>, f64)>,
    /// A counter read at render time (an engine's own totals), not a gauge.
    pub counter: bool,
}

/// Everything `/metrics` shows.
pub struct Metrics {
    pub requests: Counter,
    pub routing: Counter,
    pub recoveries: Counter,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub legs: Counter,
    pub kv_bytes_sent: Counter,
    pub kv_bytes_received: Counter,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub kv_transfer: Histogram,
    /// A decode engine's wait for its shipment (pdagent's vLLM connector).
    pub kv_wait: Histogram,
    pub kv_tail: Histogram,
    /// Bytes per shipment, and each shipment's throughput.
    pub kv_shipment_bytes: Histogram,
    pub kv_throughput: Histogram,
    pub agent_time: Histogram,
    /// Prompt and output tokens of each finished request, by model.
    pub prompt_len: Histogram,
    pub output_len: Histogram,
    /// Finished requests of deployments with both latency targets, by whether they met both.
    pub slo: Counter,
    /// The re-planner's decisions (coordinator only), and its latest predicted and measured
    /// goodput per deployment.
    pub autoplan_decisions: Counter,
    pub autoplan_goodput: Gauge,
    pub inflight: AtomicU64,
    /// Open connections to the OpenAI API.
    pub connections: AtomicU64,
    pub connections_closed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: AtomicU64::new(0),
            connections_closed: Counter::new(
                "pdagent_http_connections_closed_total",
                "Connections to the OpenAI API that this agent closed on its own, by reason: full (connections_max open), header_timeout (no complete request head within header_read_timeout_ms, idle keep-alive included), body_timeout (body_read_timeout_ms).",
                &["reason"],
            ),
            requests: Counter::new(
                "pdagent_requests_total",
                "Requests this agent's OpenAI API answered, by model and outcome.",
                &["model", "outcome"],
            ),
            routing: Counter::new(
                "pdagent_routing_decisions_total",
                "Routing decisions of this agent's router, by kind.",
                &["kind"],
            ),
            recoveries: Counter::new(
                "pdagent_request_recoveries_total",
                "Requests that went on on other engines after theirs failed, by model and kind: retry (before the first token) or migration (after it, replayed exactly).",
                &["model", "kind"],
            ),
            prompt_tokens: Counter::new(
                "pdagent_prompt_tokens_total",
                "Prompt tokens of finished requests, by model.",
                &["model"],
            ),
            generation_tokens: Counter::new(
                "pdagent_generation_tokens_total",
                "Output tokens sent to clients, by model.",
                &["model"],
            ),
            legs: Counter::new(
                "pdagent_engine_legs_total",
                "Request legs this host's engines served, by engine, leg (prefill, decode, generate) and outcome.",
                &["engine", "leg", "outcome"],
            ),
            kv_bytes_sent: Counter::new(
                "pdagent_kv_bytes_sent_total",
                "KV payload bytes this agent's prefill engines handed to a decode engine, by path (network: to another host over QUIC; host: on this host).",
                &["path"],
            ),
            kv_bytes_received: Counter::new(
                "pdagent_kv_bytes_received_total",
                "KV payload bytes this agent's decode engines imported, by path (network, host; engine: pulled by the engines themselves, vLLM's NIXL byte counter).",
                &["path"],
            ),
            ttft: Histogram::new(
                "pdagent_time_to_first_token_seconds",
                "Time from a request's arrival to its first token, by model.",
                "model",
                LATENCY_BUCKETS,
            ),
            tpot: Histogram::new(
                "pdagent_time_per_output_token_seconds",
                "Mean time between output tokens after the first, per request, by model.",
                "model",
                TOKEN_BUCKETS,
            ),
            e2e: Histogram::new(
                "pdagent_request_duration_seconds",
                "Time from a request's arrival to its last byte, by model.",
                "model",
                LATENCY_BUCKETS,
            ),
            kv_transfer: Histogram::new(
                "pdagent_kv_transfer_seconds",
                "Time from a prefill's first KV piece to the decode host's acknowledgement of the last, by path.",
                "path",
                LATENCY_BUCKETS,
            ),
            kv_wait: Histogram::new(
                "pdagent_kv_wait_seconds",
                "Time a decode engine's KV connector waited for its shipment, from asking to the last byte handed over on this host, by path (network, host).",
                "path",
                LATENCY_BUCKETS,
            ),
            kv_tail: Histogram::new(
                "pdagent_kv_tail_seconds",
                "Time from a prefill engine's answer to its KV being whole on the decode host (the part of a shipment not hidden behind the prefill's compute), by path.",
                "path",
                LATENCY_BUCKETS,
            ),
            kv_shipment_bytes: Histogram::new(
                "pdagent_kv_shipment_bytes",
                "KV payload bytes of each shipment, by path (network, host).",
                "path",
                BYTES_BUCKETS,
            ),
            kv_throughput: Histogram::new(
                "pdagent_kv_throughput_bytes_per_second",
                "Each shipment's payload bytes over its transfer time (first piece to the last acknowledgement), by path.",
                "path",
                THROUGHPUT_BUCKETS,
            ),
            agent_time: Histogram::new(
                "pdagent_request_agent_seconds",
                "Time a finished request spent outside engines (ingress, routing, transport, KV shipping, forwarding), by model.",
                "model",
                AGENT_BUCKETS,
            ),
            prompt_len: Histogram::new(
                "pdagent_request_prompt_tokens",
                "Prompt tokens of each finished request, by model.",
                "model",
                LENGTH_BUCKETS,
            ),
            output_len: Histogram::new(
                "pdagent_request_output_tokens",
                "Output tokens of each finished request, by model.",
                "model",
                LENGTH_BUCKETS,
            ),
            slo: Counter::new(
                "pdagent_requests_slo_total",
                "Finished requests of deployments with TTFT and TPOT targets (pdctl deploy --ttft-ms --tpot-ms), by model and result: within (both met) or missed.",
                &["model", "result"],
            ),
            autoplan_decisions: Counter::new(
                "pdagent_autoplan_decisions_total",
                "Re-planning decisions this agent recorded as coordinator, by deployment, the best action (keep, flip-prefill-to-decode, add-decode, ...) and whether it was made (yes) or only recorded (no: advise mode, or not allowed yet).",
                &["deployment", "action", "made"],
            ),
            autoplan_goodput: Gauge::new(
                "pdagent_autoplan_goodput_rps",
                "The re-planner's last window per deployment: requests per second within both SLOs, as the simulator predicted for the layout in force (source=predicted) and as measured (source=measured).",
                &["deployment", "source"],
            ),
            inflight: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// TTFT and TPOT per model, as this agent's ingress measured them since it started.
    pub fn latencies(&self) -> Vec<ModelLatency> {
        let mut tpot = self.tpot.snapshot();
        self.ttft
            .snapshot()
            .into_iter()
            .filter_map(|(model, ttft)| {
                let tpot = tpot.remove(&model)?;
                Some(ModelLatency { model, ttft, tpot })
            })
            .collect()
    }

    /// Per model with finished requests: what the ingress counted since it started.
    pub fn workloads(&self) -> Vec<ModelWorkload> {
        let mut output = self.output_len.snapshot();
        self.prompt_len
            .snapshot()
            .into_iter()
            .filter_map(|(model, prompt_tokens)| {
                let output_tokens = output.remove(&model)?;
                Some(ModelWorkload {
                    requests: self.requests.sum_of(&[&model]),
                    within_slo: self.slo.get(&[&model, "within"]),
                    missed_slo: self.slo.get(&[&model, "missed"]),
                    model,
                    prompt_tokens,
                    output_tokens,
                })
            })
            .collect()
    }

    /// The exposition text, with `gauges` read by the caller now.
    pub fn render(&self, gauges: &[GaugeSample]) -> String {
        let mut out = String::with_capacity(8192);
        self.requests.render(&mut out);
        self.routing.render(&mut out);
        self.recoveries.render(&mut out);
        self.prompt_tokens.render(&mut out);
        self.generation_tokens.render(&mut out);
        self.legs.render(&mut out);
        self.kv_bytes_sent.render(&mut out);
        self.kv_bytes_received.render(&mut out);
        self.ttft.render(&mut out);
        self.tpot.render(&mut out);
        self.e2e.render(&mut out);
        self.kv_transfer.render(&mut out);
        self.kv_wait.render(&mut out);
        self.kv_tail.render(&mut out);
        self.kv_shipment_bytes.render(&mut out);
        self.kv_throughput.render(&mut out);
        self.agent_time.render(&mut out);
        self.prompt_len.render(&mut out);
        self.output_len.render(&mut out);
        self.slo.render(&mut out);
        self.autoplan_decisions.render(&mut out);
        self.autoplan_goodput.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP pdagent_requests_inflight Requests this agent's OpenAI API is serving now."
        );
        let _ = writeln!(out, "# TYPE pdagent_requests_inflight gauge");
        let _ = writeln!(
            out,
            "pdagent_requests_inflight {}",
            self.inflight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP pdagent_http_connections Open connections to this agent's OpenAI API."
        );
        let _ = writeln!(out, "# TYPE pdagent_http_connections gauge");
        let _ = writeln!(
            out,
            "pdagent_http_connections {}",
            self.connections.load(Ordering::Relaxed)
        );
        self.connections_closed.render(&mut out);
        for g in gauges {
            let _ = writeln!(out, "# HELP {} {}", g.name, g.help);
            let kind = if g.counter { "counter" } else { "gauge" };
            let _ = writeln!(out, "# TYPE {} {kind}", g.name);
            for (values, v) in &g.values {
                let _ = writeln!(out, "{}{} {v}", g.name, labels(g.labels, values));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_render_in_the_text_format() {
        let m = Metrics::default();
        m.requests.inc(&["tiny", "ok"]);
        m.requests.inc(&["tiny", "ok"]);
        m.requests.inc(&["tiny", "error"]);
        assert_eq!(m.requests.get(&["tiny", "ok"]), 2);
        assert_eq!(m.requests.get(&["other", "ok"]), 0);
        assert_eq!(m.requests.sum_of(&["tiny"]), 3);
        assert_eq!(m.requests.sum_of(&["other"]), 0);
        m.ttft.observe("tiny", 0.003);
        m.ttft.observe("tiny", 100.0);
        let text = m.render(&[GaugeSample {
            name: "pdagent_engine_queue_depth",
            help: "Requests waiting in each engine of this host.",
            labels: &["engine"],
            values: vec![(vec!["tiny/prefill-0".into()], 2.0)],
            counter: false,
        }]);
        assert!(text.contains("pdagent_requests_total{model=\"tiny\",outcome=\"ok\"} 2\n"));
        assert!(text.contains("# TYPE pdagent_time_to_first_token_seconds histogram\n"));
        // Cumulative buckets; the 100 s sample only in +Inf.
        assert!(text.contains(
            "pdagent_time_to_first_token_seconds_bucket{model=\"tiny\",le=\"0.0025\"} 0\n"
        ));
        assert!(text.contains(
            "pdagent_time_to_first_token_seconds_bucket{model=\"tiny\",le=\"0.005\"} 1\n"
        ));
        assert!(
            text.contains(
                "pdagent_time_to_first_token_seconds_bucket{model=\"tiny\",le=\"60\"} 1\n"
            )
        );
        assert!(text.contains(
            "pdagent_time_to_first_token_seconds_bucket{model=\"tiny\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("pdagent_time_to_first_token_seconds_count{model=\"tiny\"} 2\n"));
        assert!(text.contains("pdagent_engine_queue_depth{engine=\"tiny/prefill-0\"} 2\n"));
        // Every family has HELP and TYPE lines before its samples.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "no TYPE for {name}"
            );
        }
    }

    #[test]
    fn snapshots_merge_and_give_means_and_quantiles() {
        let m = Metrics::default();
        for v in [0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.2, 0.2] {
            m.ttft.observe("tiny", v);
            m.tpot.observe("tiny", v / 10.0);
        }
        m.ttft.observe("other", 1.0);
        let l = m.latencies();
        assert_eq!(l.len(), 1, "a model with no TPOT yet is left out");
        let mut t = l[0].ttft.clone();
        assert_eq!(t.count, 10);
        assert!((t.mean().unwrap() - 0.056).abs() < 1e-9);
        // 8 of 10 in (0.01, 0.025], 2 in (0.1, 0.25]: p50 inside the first, p90 halfway
        // through the second.
        let p50 = t.quantile(0.5).unwrap();
        assert!(p50 > 0.01 && p50 <= 0.025, "{p50}");
        assert!((t.quantile(0.9).unwrap() - 0.175).abs() < 1e-9);
        // Two agents' series add up; other buckets are refused.
        let other = t.clone();
        assert!(t.merge(&other));
        assert_eq!(t.count, 20);
        assert!((t.mean().unwrap() - 0.056).abs() < 1e-9);
        assert!(!t.merge(&l[0].tpot));
        assert_eq!(t.count, 20);
        // Beyond the last bound: the last bound. Empty: none.
        let big = m.ttft.snapshot().remove("other").unwrap();
        assert_eq!(big.quantile(1.0), Some(1.0));
        m.e2e.observe("x", 100.0);
        assert_eq!(m.e2e.snapshot()["x"].quantile(0.5), Some(60.0));
        let empty = HistSnapshot {
            bounds: vec![1.0],
            counts: vec![0],
            count: 0,
            sum: 0.0,
        };
        assert_eq!(empty.quantile(0.9), None);
        assert_eq!(empty.mean(), None);
    }

    #[test]
    fn label_values_are_escaped() {
        let c = Counter::new("x_total", "x", &["model"]);
        c.inc(&["a\"b\\c\nd"]);
        let mut out = String::new();
        c.render(&mut out);
        assert!(out.contains("x_total{model=\"a\\\"b\\\\c\\nd\"} 1\n"));
    }
}
