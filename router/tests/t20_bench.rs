//! The micro-benchmark runs against a full index with a fake clock (real figures come from
//! `cargo run --release -p pd-router --example route_bench`).

/// 200 decisions with a counter clock: each decision reads it twice, so takes one tick.
#[test]
fn bench_runs_with_a_counter_clock() {
    let mut t = 0;
    let report = pd_router::bench::run(200, 1, || {
        t += 1000;
        t
    });
    assert_eq!(report.decisions, 200);
    assert_eq!(
        (report.p50_ns, report.p99_ns, report.max_ns),
        (1000, 1000, 1000)
    );
    assert_eq!(report.engines, 32);
    assert!(
        (99_000..=100_000).contains(&report.index_entries),
        "{report:?}"
    );
}
