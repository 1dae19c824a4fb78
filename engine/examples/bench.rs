//! Runs the engine benchmark until `pdagent engine bench` exists:
//! `cargo run --release -p pd-engine --example bench -- tiny|small|DIR [--json]
//! [--prefill-tokens=N]`.

use pd_engine::{BenchOptions, EngineConfig, ModelSpec, bench};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str)
        .unwrap_or("tiny");
    let cfg = EngineConfig {
        model: ModelSpec::parse(model),
        ..EngineConfig::default()
    };
    let mut opts = BenchOptions::default();
    if let Some(n) = args
        .iter()
        .find_map(|a| a.strip_prefix("--prefill-tokens="))
    {
        match n.parse() {
            Ok(n) => opts.prefill_tokens = n,
            Err(e) => {
                eprintln!("--prefill-tokens={n}: {e}");
                std::process::exit(64);
            }
        }
    }
    match bench(&cfg, &opts) {
        Ok(r) if args.iter().any(|a| a == "--json") => {
            println!(
                "{}",
                serde_json::to_string_pretty(&r).expect("report serializes")
            );
        }
        Ok(r) => {
            println!(
                "{} on {} thread(s): prefill {} tokens in {:.1} ms = {:.0} tokens/s",
                r.model, r.compute_threads, r.prefill_tokens, r.prefill_ms, r.prefill_tokens_per_s
            );
            for d in &r.decode {
                println!(
                    "  decode batch {:>2} at context {}: {:.1} ms/step = {:.0} tokens/s",
                    d.batch, d.context_tokens, d.step_ms, d.tokens_per_s
                );
            }
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
