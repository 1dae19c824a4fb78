//! `pdagent engine serve | generate | bench | export`: the reference engine's commands.
//! `generate` sends one request through engine processes, monolithic or disaggregated.

pub mod generate;

use std::path::PathBuf;
use std::time::Duration;

use pd_engine::protocol::EngineRole;
use pd_engine::{BenchOptions, EngineConfig, ModelSpec};

use crate::engine::serve::{Faults, ServeOptions};
use generate::{GenerateOptions, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Prefill,
    Decode,
    Both,
}

impl From<Role> for EngineRole {
    fn from(r: Role) -> EngineRole {
        match r {
            Role::Prefill => EngineRole::Prefill,
            Role::Decode => EngineRole::Decode,
            Role::Both => EngineRole::Both,
        }
    }
}

/// What every engine command needs to build its model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A preset (`tiny`, `small`: seeded weights, byte tokenizer) or a Llama-family checkpoint
    /// folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Seed of a preset's weights.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// Compute threads of the engine.
    #[arg(long, default_value_t = 1)]
    pub compute_threads: usize,
    /// KV cache size in blocks.
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Tokens per KV block (part of the engine protocol: routers hash blocks of this size).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Token budget of one scheduler step (chunked prefill above it).
    #[arg(long)]
    pub step_tokens_max: Option<usize>,
}

impl ModelArgs {
    pub fn engine_config(&self) -> EngineConfig {
        let d = EngineConfig::default();
        EngineConfig {
            model: ModelSpec::parse(&self.model),
            weights_seed: self.weights_seed,
            compute_threads: self.compute_threads,
            kv_blocks: self.kv_blocks.unwrap_or(d.kv_blocks),
            block_size_tokens: self.block_size.unwrap_or(d.block_size_tokens),
            step_tokens_max: self.step_tokens_max.unwrap_or(d.step_tokens_max),
            ..d
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum EngineCommand {
    /// Run an engine process serving the engine protocol on a unix socket (agents start these).
    Serve {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, value_enum, default_value = "both")]
        role: Role,
        #[command(flatten)]
        model: ModelArgs,
        /// Exit when no agent has been connected this long.
        #[arg(long, default_value_t = 30_000)]
        orphan_timeout_ms: u64,
        /// Fault knobs for tests only: crash_after_tokens=N, hang_after_tokens=N,
        /// slow_start_ms=N, refuse_kv (comma-separated).
        #[arg(long)]
        test_faults: Option<String>,
    },
    /// Run one request through engine processes and print the tokens and timings.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        #[arg(long, value_enum, default_value = "monolithic")]
        mode: Mode,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Give the decode engine other preset weights (a different model): its KV import must
        /// be refused.
        #[arg(long, hide = true)]
        decode_weights_seed: Option<u64>,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write a preset as a Llama checkpoint folder (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json with a chat template) that other engines such as
    /// vLLM load: the same weights as the preset, no download.
    Export {
        /// The preset: tiny or small.
        #[arg(long)]
        model: String,
        /// Seed of the preset's weights (the builtin engine's default is 0).
        #[arg(long, default_value_t = 0)]
        weights_seed: u64,
        /// The folder to write (created; refused when it holds a config.json already).
        #[arg(long)]
        out: PathBuf,
    },
    /// Prefill and decode throughput on one compute thread (in this process).
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt tokens of the prefill measurement.
        #[arg(long, default_value_t = 512)]
        prefill_tokens: usize,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Why an engine command failed: bad input (exit 64) or a failure while running (exit 1).
pub enum EngineFailure {
    Usage(String),
    Failed(anyhow::Error),
}

pub fn run(cmd: EngineCommand) -> Result<(), EngineFailure> {
    match cmd {
        EngineCommand::Export {
            model,
            weights_seed,
            out,
        } => {
            let preset = match model.as_str() {
                "tiny" => pd_engine::Preset::Tiny,
                "small" => pd_engine::Preset::Small,
                other => {
                    return Err(EngineFailure::Usage(format!(
                        "--model {other:?}: a preset, tiny or small"
                    )));
                }
            };
            if out.join("config.json").exists() {
                return Err(EngineFailure::Usage(format!(
                    "--out {}: already holds a checkpoint (config.json); give a new folder",
                    out.display()
                )));
            }
            pd_engine::save_preset_checkpoint(preset, weights_seed, &out)
                .map_err(|e| EngineFailure::Failed(e.into()))?;
            let fp = crate::models::fingerprint(&out)
                .map_err(|e| EngineFailure::Failed(anyhow::anyhow!(e)))?;
            println!(
                "{}: the {model} preset (weights seed {weights_seed}) as a Llama checkpoint, fingerprint {fp}",
                out.display()
            );
            Ok(())
        }
        EngineCommand::Serve {
            socket,
            role,
            model,
            orphan_timeout_ms,
            test_faults,
        } => {
            let faults = match test_faults.as_deref() {
                Some(s) => Faults::parse(s).map_err(EngineFailure::Usage)?,
                None => Faults::default(),
            };
            let engine = model.engine_config();
            engine
                .validate()
                .map_err(|e| EngineFailure::Usage(e.to_string()))?;
            crate::engine::serve::serve(ServeOptions {
                socket,
                role: role.into(),
                engine,
                orphan_timeout: Duration::from_millis(orphan_timeout_ms),
                faults,
            })
            .map_err(EngineFailure::Failed)
        }
        EngineCommand::Generate {
            model,
            prompt,
            max_tokens,
            mode,
            temperature,
            seed,
            decode_weights_seed,
            json,
        } => {
            model
                .engine_config()
                .validate()
                .map_err(|e| EngineFailure::Usage(e.to_string()))?;
            let mut engine_args = vec![
                "--compute-threads".to_string(),
                model.compute_threads.to_string(),
            ];
            for (flag, v) in [
                ("--kv-blocks", model.kv_blocks),
                ("--block-size", model.block_size),
                ("--step-tokens-max", model.step_tokens_max),
            ] {
                if let Some(v) = v {
                    engine_args.extend([flag.to_string(), v.to_string()]);
                }
            }
            let opts = GenerateOptions {
                model: model.model.clone(),
                prompt,
                max_tokens,
                mode,
                temperature,
                seed,
                weights_seed: model.weights_seed,
                decode_weights_seed,
                engine_args,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| EngineFailure::Failed(e.into()))?;
            let r = rt
                .block_on(generate::generate(opts))
                .map_err(EngineFailure::Failed)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&r).map_err(|e| EngineFailure::Failed(e.into()))?
                );
            } else {
                println!("{}", r.text);
                eprintln!(
                    "{} tokens ({}), prompt {} tokens; TTFT {:.1} ms, TPOT {:.2} ms; KV {} bytes in {} pieces; decode computed {} prompt tokens",
                    r.tokens.len(),
                    r.finish_reason,
                    r.prompt_tokens,
                    r.ttft_ms,
                    r.tpot_ms,
                    r.kv_bytes,
                    r.kv_pieces,
                    r.decode_prompt_tokens_computed
                );
            }
            Ok(())
        }
        EngineCommand::Bench {
            model,
            prefill_tokens,
            json,
        } => {
            let cfg = model.engine_config();
            cfg.validate()
                .map_err(|e| EngineFailure::Usage(e.to_string()))?;
            let opts = BenchOptions {
                prefill_tokens,
                ..BenchOptions::default()
            };
            let r = pd_engine::bench(&cfg, &opts).map_err(|e| EngineFailure::Failed(e.into()))?;
            // The baseline measured in the same run: decode at batch 1.
            let base = r.decode.first().map_or(0.0, |d| d.tokens_per_s);
            let speedup = |tps: f64| if base > 0.0 { tps / base } else { 0.0 };
            if json {
                let mut v =
                    serde_json::to_value(&r).map_err(|e| EngineFailure::Failed(e.into()))?;
                v["decode_speedup_vs_batch_1"] = r
                    .decode
                    .iter()
                    .map(|d| speedup(d.tokens_per_s))
                    .collect::<Vec<f64>>()
                    .into();
                println!("{v}");
            } else {
                println!(
                    "model {} on {} compute thread(s)",
                    r.model, r.compute_threads
                );
                println!(
                    "prefill {} tokens: {:.1} ms, {:.0} tokens/s",
                    r.prefill_tokens, r.prefill_ms, r.prefill_tokens_per_s
                );
                for d in &r.decode {
                    println!(
                        "decode batch {:>3} at context {}: step {:.2} ms, {:.0} tokens/s, {:.2}x batch 1",
                        d.batch,
                        d.context_tokens,
                        d.step_ms,
                        d.tokens_per_s,
                        speedup(d.tokens_per_s)
                    );
                }
            }
            Ok(())
        }
    }
}
