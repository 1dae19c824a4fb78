//! Times routing decisions against a full prefix index with the real clock:
//! `cargo run --release -p pd-router --example route_bench [DECISIONS] [SEED]`.
//! Round-robin (no cost search, same index walk and records) is the baseline.

use std::time::Instant;

use pd_router::Policy;
use pd_router::bench::{BenchReport, run_with};

fn main() {
    let mut args = std::env::args().skip(1);
    let decisions = args
        .next()
        .map_or(20_000, |s| s.parse().expect("DECISIONS: a number"));
    let seed = args
        .next()
        .map_or(1, |s| s.parse().expect("SEED: a number"));
    let start = Instant::now();
    let clock = || start.elapsed().as_nanos() as u64;
    let baseline = run_with(Policy::RoundRobin, decisions, seed, clock);
    let cost = run_with(Policy::Cost, decisions, seed, clock);
    print(&baseline, None);
    print(&cost, Some(&baseline));
}

fn print(r: &BenchReport, baseline: Option<&BenchReport>) {
    let ratio = |a: u64, b: u64| format!(" ({:.2}x)", a as f64 / b.max(1) as f64);
    let (r50, r99) = baseline.map_or((String::new(), String::new()), |b| {
        (ratio(r.p50_ns, b.p50_ns), ratio(r.p99_ns, b.p99_ns))
    });
    println!(
        "{:<12} {} decisions, {} engines, {} index entries: p50 {:.1} us{r50}, p99 {:.1} us{r99}, p99.9 {:.1} us, max {:.1} us",
        r.policy.as_str(),
        r.decisions,
        r.engines,
        r.index_entries,
        r.p50_ns as f64 / 1e3,
        r.p99_ns as f64 / 1e3,
        r.p999_ns as f64 / 1e3,
        r.max_ns as f64 / 1e3,
    );
}
