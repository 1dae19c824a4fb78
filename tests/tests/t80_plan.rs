//! `pdctl plan` through the real binary: the JSON document, the human output and its deploy
//! line, a local Hugging Face folder, the time at 64 GPUs, and exit status 64 on bad input.

use std::time::Instant;

use pd_tests::*;

const EX_USAGE: i32 = 64;

fn plan(args: &[&str]) -> std::process::Output {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    pdctl(&all)
}

/// `--json` prints exactly one JSON object with both modes (each with the documented fields),
/// the ratio between them and the frontier; 64 GPUs take under 5 s.
#[test]
fn json_has_both_modes_the_ratio_and_the_frontier_in_under_5_s() {
    let started = Instant::now();
    // The slowest catalog plan seen at 64 GPUs: a small MoE on the fastest GPUs fills many
    // engines with large batches, so the simulations are the longest.
    let out = plan(&[
        "--model",
        "gpt-oss-120b",
        "--system",
        "b200_sxm",
        "--total-gpus",
        "64",
        "--isl",
        "4096",
        "--osl",
        "1024",
        "--ttft",
        "2000",
        "--tpot",
        "50",
        "--json",
    ]);
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(elapsed.as_secs_f64() < 5.0, "{elapsed:?}");
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for mode in ["disaggregated", "colocated"] {
        let m = &v[mode];
        for field in [
            "output_tokens_per_s_per_gpu",
            "output_tokens_per_s_per_user",
            "ttft_ms",
            "tpot_ms",
            "prefill_workers",
            "decode_workers",
            "tp_prefill",
            "tp_decode",
        ] {
            assert!(m[field].is_number(), "{mode}.{field} in {m}");
        }
        assert!(m["ttft_ms"].as_f64().unwrap() <= 2000.0);
        assert!(m["tpot_ms"].as_f64().unwrap() <= 50.0);
    }
    let d = v["disaggregated"]["output_tokens_per_s_per_gpu"]
        .as_f64()
        .unwrap();
    let c = v["colocated"]["output_tokens_per_s_per_gpu"]
        .as_f64()
        .unwrap();
    assert!((v["ratio"].as_f64().unwrap() - d / c).abs() < 1e-9);
    assert!(!v["frontier"].as_array().unwrap().is_empty());
    assert!(
        v["deploy"]
            .as_str()
            .unwrap()
            .starts_with("pdctl deploy gpt-oss-120b")
    );
}

/// The human output names both layouts and the ratio, and its last line is the deploy
/// command; `--dtype fp8` and a mixed fleet are accepted.
#[test]
fn human_output_ends_with_the_deploy_command() {
    let out = plan(&[
        "--model",
        "qwen3-32b",
        "--gpus",
        "h200_sxm:8,h100_sxm:8",
        "--isl",
        "2048",
        "--osl",
        "512",
        "--ttft",
        "1000",
        "--tpot",
        "40",
        "--dtype",
        "fp8",
        "--engine",
        "sglang",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("best disaggregated:"), "{stdout}");
    assert!(stdout.contains("best colocated:"), "{stdout}");
    assert!(stdout.contains("disaggregated / colocated:"), "{stdout}");
    let last = stdout.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("pdctl deploy qwen3-32b --engine sglang --model qwen3-32b"),
        "{last}"
    );
    assert!(
        last.contains("--prefill ") || last.contains("--colocated "),
        "{last}"
    );
}

/// A folder with a Hugging Face config.json is a model too.
#[test]
fn reads_a_local_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("my-llama");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,
            "intermediate_size":14336,"num_attention_heads":32,"num_hidden_layers":32,
            "num_key_value_heads":8,"vocab_size":128256}"#,
    )
    .unwrap();
    let out = plan(&[
        "--model",
        model.to_str().unwrap(),
        "--system",
        "h200_sxm",
        "--total-gpus",
        "8",
        "--isl",
        "1024",
        "--osl",
        "256",
        "--ttft",
        "500",
        "--tpot",
        "30",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "my-llama");
    assert!(v["disaggregated"].is_object());
}

/// Unknown names list the known ones; malformed input names the field; all exit 64.
#[test]
fn bad_input_exits_64_with_a_clear_message() {
    let base = [
        "--isl", "1024", "--osl", "128", "--ttft", "500", "--tpot", "30",
    ];
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "--model",
                "llama-9",
                "--system",
                "h100_sxm",
                "--total-gpus",
                "8",
            ],
            "known models: Llama-3.1-8B",
        ),
        (
            &[
                "--model",
                "llama-3.1-8b",
                "--system",
                "mi300x",
                "--total-gpus",
                "8",
            ],
            "known systems: a100_sxm, h100_sxm, h200_sxm, b200_sxm",
        ),
        (
            &["--model", "llama-3.1-8b", "--gpus", "h100_sxm=8"],
            "expected TYPE:COUNT",
        ),
        (
            &[
                "--model",
                "llama-3.1-8b",
                "--system",
                "h100_sxm",
                "--total-gpus",
                "8",
                "--dtype",
                "int4",
            ],
            "--weights-dtype int4",
        ),
        (
            &[
                "--model",
                "llama-3.1-8b",
                "--system",
                "h100_sxm",
                "--total-gpus",
                "8",
                "--kv-dtype",
                "int4",
            ],
            "not a KV-cache dtype",
        ),
        (
            &["--model", "llama-3.1-8b", "--system", "h100_sxm"],
            "--total-gpus",
        ),
    ];
    for (args, want) in cases {
        let mut all = args.to_vec();
        all.extend_from_slice(&base);
        let out = plan(&all);
        assert_eq!(
            out.status.code(),
            Some(EX_USAGE),
            "{all:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(want),
            "{all:?}: {}",
            text(&out.stderr)
        );
    }
    // A folder whose config.json lacks a field names it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"hidden_size":4096}"#).unwrap();
    let mut all = vec![
        "--model",
        dir.path().to_str().unwrap(),
        "--system",
        "h100_sxm",
        "--total-gpus",
        "8",
    ];
    all.extend_from_slice(&base);
    let out = plan(&all);
    assert_eq!(out.status.code(), Some(EX_USAGE));
    assert!(
        text(&out.stderr).contains("num_hidden_layers"),
        "{}",
        text(&out.stderr)
    );
}
