//! `pdctl plan`: reads the model (catalog name or a Hugging Face folder), runs the planner
//! and prints the best disaggregated and colocated layouts, the frontier and the `pdctl
//! deploy` command that applies the plan. Everything but the file read and the timing is in
//! `pd-planner`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use pd_planner::search::Candidate;
use pd_planner::{
    Dtype, Dtypes, Efficiency, GpuPool, ModelSpec, Plan, PlanRequest, Role, Slo, StepCost,
};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// A catalog model (case-insensitive), or a folder (or file) with a Hugging Face
    /// config.json.
    #[arg(long)]
    model: String,
    /// GPU type of a uniform fleet (with --total-gpus).
    #[arg(long, required_unless_present = "gpus", conflicts_with = "gpus")]
    system: Option<String>,
    /// GPUs of that type the plan may use.
    #[arg(long, requires = "system", conflicts_with = "gpus")]
    total_gpus: Option<u32>,
    /// A mixed fleet, TYPE:COUNT,...: e.g. h100_sxm:16,a100_sxm:16. The search decides which
    /// type serves which phase.
    #[arg(long)]
    gpus: Option<String>,
    /// Prompt tokens per request.
    #[arg(long)]
    isl: u32,
    /// Output tokens per request.
    #[arg(long)]
    osl: u32,
    /// Time-to-first-token target in milliseconds, for 90% of requests.
    #[arg(long = "ttft")]
    ttft_ms: f64,
    /// Time-per-output-token target in milliseconds, for 90% of requests.
    #[arg(long = "tpot")]
    tpot_ms: f64,
    /// Weights and KV cache dtype: bf16 or fp8 (int4 is weights only: --weights-dtype).
    #[arg(long, conflicts_with_all = ["weights_dtype", "kv_dtype"])]
    dtype: Option<String>,
    /// bf16, fp8 or int4. Default: the checkpoint's own format.
    #[arg(long)]
    weights_dtype: Option<String>,
    /// bf16 or fp8. Default: bf16.
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Engine named in the printed deploy command.
    #[arg(long, default_value = "vllm", value_parser = ["builtin", "vllm", "sglang"])]
    engine: String,
    /// Seed of the simulated arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only this TP size (1, 2, 4 or 8) for prefill and decode alike, as one `pdctl deploy
    /// --tp` gives. Default: the search picks each phase's TP.
    #[arg(long)]
    tp: Option<u32>,
}

const EX_USAGE: i32 = 64;

/// `writeln!` into the output String, which cannot fail.
macro_rules! put {
    ($out:expr) => {{
        let _ = writeln!($out);
    }};
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Bad input is the operator's to fix: say what, exit 64 (EX_USAGE).
fn usage(msg: impl std::fmt::Display) -> ! {
    eprintln!("pdctl: error: {msg}");
    std::process::exit(EX_USAGE)
}

fn load_model(arg: &str) -> ModelSpec {
    let path = Path::new(arg);
    if path.exists() {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| usage(format!("reading {}: {e}", file.display())));
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(path)
        };
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| arg.to_string());
        return pd_planner::parse_hf_config(&name, &text)
            .unwrap_or_else(|e| usage(format!("{}: {e}", file.display())));
    }
    pd_planner::find_model(arg).unwrap_or_else(|e| usage(e))
}

fn parse_pools(args: &PlanArgs) -> Vec<GpuPool> {
    let cost = StepCost::Roofline(Efficiency::default());
    let pool = |name: &str, gpus: u32| GpuPool {
        system: pd_planner::find_system(name).unwrap_or_else(|e| usage(e)),
        gpus,
        cost,
    };
    if let Some(spec) = &args.gpus {
        let mut pools: Vec<GpuPool> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, count)) = part.split_once(':') else {
                usage(format!(
                    "--gpus {part:?}: expected TYPE:COUNT, e.g. h100_sxm:16"
                ))
            };
            let gpus: u32 = count
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .unwrap_or_else(|| {
                    usage(format!("--gpus {part:?}: COUNT must be a positive integer"))
                });
            let p = pool(name.trim(), gpus);
            if pools.iter().any(|q| q.system.name == p.system.name) {
                usage(format!("--gpus names {} twice", p.system.name));
            }
            pools.push(p);
        }
        if pools.is_empty() {
            usage("--gpus names no GPUs");
        }
        return pools;
    }
    let system = args.system.as_deref().unwrap_or_default();
    let Some(total) = args.total_gpus.filter(|n| *n > 0) else {
        usage("--system needs --total-gpus N (N ≥ 1)")
    };
    vec![pool(system, total)]
}

fn dtypes(args: &PlanArgs, model: &ModelSpec) -> Dtypes {
    let parse = |s: &str| s.parse::<Dtype>().unwrap_or_else(|e| usage(e));
    let (weights, kv) = match &args.dtype {
        Some(d) => {
            let d = parse(d);
            if d == Dtype::Int4 {
                usage(
                    "--dtype int4: int4 is a weights format; use --weights-dtype int4 --kv-dtype bf16|fp8",
                )
            }
            (d, d)
        }
        None => (
            args.weights_dtype
                .as_deref()
                .map_or(model.native_weights, parse),
            args.kv_dtype.as_deref().map_or(Dtype::Bf16, parse),
        ),
    };
    Dtypes::new(weights, kv).unwrap_or_else(|e| usage(e))
}

pub fn run(args: PlanArgs, json_out: bool) -> Result<()> {
    let model = load_model(&args.model);
    let pools = parse_pools(&args);
    let dtypes = dtypes(&args, &model);
    for (v, what) in [(args.ttft_ms, "--ttft"), (args.tpot_ms, "--tpot")] {
        if !(v > 0.0 && v.is_finite()) {
            usage(format!(
                "{what} {v}: a target in milliseconds must be positive"
            ));
        }
    }
    if args.isl == 0 || args.osl == 0 {
        usage("--isl and --osl must be at least 1 token");
    }
    let req = PlanRequest {
        model,
        pools,
        dtypes,
        isl: args.isl,
        osl: args.osl,
        slo: Slo {
            ttft_s: args.ttft_ms / 1e3,
            tpot_s: args.tpot_ms / 1e3,
        },
        seed: args.seed,
        tp: args.tp,
    };
    let started = Instant::now();
    let plan = pd_planner::plan(&req).unwrap_or_else(|e| usage(e));
    let search_ms = started.elapsed().as_secs_f64() * 1e3;
    let deploy = deploy_command(&args, &req, &plan);
    if json_out {
        let v = json!({
            "model": req.model.name,
            "weights_dtype": req.dtypes.weights.name(),
            "kv_dtype": req.dtypes.kv.name(),
            "gpus": req.pools.iter().map(|p| json!({"system": p.system.name, "count": p.gpus})).collect::<Vec<_>>(),
            "isl": req.isl,
            "osl": req.osl,
            "ttft_target_ms": args.ttft_ms,
            "tpot_target_ms": args.tpot_ms,
            "disaggregated": plan.disaggregated.as_ref().map(candidate_json),
            "colocated": plan.colocated.as_ref().map(candidate_json),
            "ratio": plan.ratio,
            "frontier": plan.frontier.iter().map(|p| json!({
                "mode": if p.colocated { "colocated" } else { "disaggregated" },
                "layout": p.layout,
                "decode_batch": p.decode_batch,
                "output_tokens_per_s_per_gpu": p.output_tokens_per_s_per_gpu,
                "output_tokens_per_s_per_user": p.output_tokens_per_s_per_user,
                "meets_tpot": p.meets_tpot,
            })).collect::<Vec<_>>(),
            "deploy": deploy,
            "notes": plan.notes,
            "layouts_rated": plan.layouts_rated,
            "simulations": plan.simulations,
            "search_ms": search_ms,
        });
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let mut out = String::new();
    print_human(&mut out, &args, &req, &plan, deploy.as_deref(), search_ms);
    // One write, and a closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

fn candidate_json(c: &Candidate) -> Value {
    let colocated = c.colocated_workers() > 0;
    let (p, d) = if colocated {
        (c.colocated_workers(), c.colocated_workers())
    } else {
        (c.prefill_workers(), c.decode_workers())
    };
    let (tp_p, tp_d) = if colocated {
        (c.tp(Role::Colocated), c.tp(Role::Colocated))
    } else {
        (c.tp(Role::Prefill), c.tp(Role::Decode))
    };
    let summary = |s: &pd_planner::Summary| json!({"mean": ms(s.mean), "p50": ms(s.p50), "p90": ms(s.p90), "p99": ms(s.p99)});
    json!({
        "layout": c.describe(),
        "gpus": c.gpus,
        "fleet_gpus": c.fleet_gpus,
        "output_tokens_per_s_per_gpu": c.output_tokens_per_s_per_gpu,
        "output_tokens_per_s_per_user": c.output_tokens_per_s_per_user,
        "ttft_ms": ms(c.ttft_s.p90),
        "tpot_ms": ms(c.tpot_s.p90),
        "ttft_ms_distribution": summary(&c.ttft_s),
        "tpot_ms_distribution": summary(&c.tpot_s),
        "prefill_workers": p,
        "decode_workers": d,
        "tp_prefill": tp_p,
        "tp_decode": tp_d,
        "colocated_workers": c.colocated_workers(),
        "request_rate_per_s": c.request_rate_per_s,
        "slo_attainment": c.slo_attainment,
        "analytic_output_tokens_per_s_per_gpu": c.analytic_output_tokens_per_s_per_gpu,
        "groups": c.layout.groups.iter().map(|g| json!({
            "system": g.system,
            "role": match g.role { Role::Prefill => "prefill", Role::Decode => "decode", Role::Colocated => "colocated" },
            "workers": g.workers,
            "tp": g.perf.tp,
            "max_batch": g.max_batch,
            "max_step_tokens": g.max_step_tokens,
        })).collect::<Vec<_>>(),
    })
}

/// The deployment name: the model's, lower-case, with anything but letters, digits, '.' and
/// '-' made '-'.
fn deployment_name(model: &str) -> String {
    model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// `pdctl deploy` for the better of the two plans (the documented syntax; deploy itself
/// comes later). Per-phase TP sizes that differ get `--tp-prefill/--tp-decode`, which the
/// documented syntax's single `--tp` cannot say.
fn deploy_command(args: &PlanArgs, req: &PlanRequest, plan: &Plan) -> Option<String> {
    let pick = plan.best()?;
    let mut cmd = format!(
        "pdctl deploy {} --engine {} --model {}",
        deployment_name(&req.model.name),
        args.engine,
        args.model
    );
    if pick.colocated_workers() > 0 {
        cmd += &format!(
            " --tp {} --colocated {}",
            pick.tp(Role::Colocated),
            pick.colocated_workers()
        );
    } else {
        let (tp_p, tp_d) = (pick.tp(Role::Prefill), pick.tp(Role::Decode));
        if tp_p == tp_d {
            cmd += &format!(" --tp {tp_p}");
        } else {
            cmd += &format!(" --tp-prefill {tp_p} --tp-decode {tp_d}");
        }
        cmd += &format!(
            " --prefill {} --decode {}",
            pick.prefill_workers(),
            pick.decode_workers()
        );
    }
    Some(cmd)
}

fn print_candidate(out: &mut String, title: &str, c: Option<&Candidate>) {
    let Some(c) = c else {
        put!(out, "{title}: none (see the notes below)");
        return;
    };
    put!(
        out,
        "{title}: {} on {} of {} GPUs",
        c.describe(),
        c.gpus,
        c.fleet_gpus
    );
    for g in &c.layout.groups {
        let limits = match g.role {
            Role::Prefill => format!("up to {} prompt tokens per step", g.max_step_tokens),
            Role::Decode => format!("decode batch ≤ {}", g.max_batch),
            Role::Colocated => format!(
                "batch ≤ {}, {} tokens per step",
                g.max_batch, g.max_step_tokens
            ),
        };
        let role = match g.role {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Colocated => "colocated",
        };
        put!(
            out,
            "  {role:<9} {} × TP{} on {} ({limits})",
            g.workers,
            g.perf.tp,
            g.system
        );
    }
    put!(
        out,
        "  output {:.0} tok/s/GPU, {:.1} tok/s/user, {:.2} req/s ({:.0}% of requests within both targets)",
        c.output_tokens_per_s_per_gpu,
        c.output_tokens_per_s_per_user,
        c.request_rate_per_s,
        c.slo_attainment * 100.0
    );
    put!(
        out,
        "  TTFT p50 {:.0} ms, p90 {:.0} ms; TPOT p50 {:.1} ms, p90 {:.1} ms (analytic estimate {:.0} tok/s/GPU)",
        ms(c.ttft_s.p50),
        ms(c.ttft_s.p90),
        ms(c.tpot_s.p50),
        ms(c.tpot_s.p90),
        c.analytic_output_tokens_per_s_per_gpu
    );
}

fn print_human(
    out: &mut String,
    args: &PlanArgs,
    req: &PlanRequest,
    plan: &Plan,
    deploy: Option<&str>,
    search_ms: f64,
) {
    let fleet: Vec<String> = req
        .pools
        .iter()
        .map(|p| format!("{} × {}", p.gpus, p.system.name))
        .collect();
    put!(
        out,
        "{} ({} weights, {} KV) on {}; ISL {}, OSL {}; targets for 90% of requests: TTFT ≤ {} ms, TPOT ≤ {} ms",
        req.model.name,
        req.dtypes.weights,
        req.dtypes.kv,
        fleet.join(" + "),
        req.isl,
        req.osl,
        args.ttft_ms,
        args.tpot_ms
    );
    put!(out);
    print_candidate(out, "best disaggregated", plan.disaggregated.as_ref());
    print_candidate(out, "best colocated", plan.colocated.as_ref());
    if let Some(r) = plan.ratio {
        put!(
            out,
            "disaggregated / colocated: {r:.2}× output tokens/s/GPU"
        );
    }
    for n in &plan.notes {
        put!(out, "note: {n}");
    }
    put!(out);
    if plan.frontier.is_empty() {
        put!(out, "frontier: no layout meets the TTFT target");
    } else {
        put!(
            out,
            "frontier (analytic; TTFT target met; * also meets the TPOT target):"
        );
        put!(
            out,
            "  {:<13} {:>6} {:>11} {:>10}  layout",
            "mode",
            "batch",
            "tok/s/user",
            "tok/s/GPU"
        );
    }
    for p in &plan.frontier {
        put!(
            out,
            "  {:<13} {:>6} {:>11.1} {:>10.0}{} {}",
            if p.colocated {
                "colocated"
            } else {
                "disaggregated"
            },
            p.decode_batch,
            p.output_tokens_per_s_per_user,
            p.output_tokens_per_s_per_gpu,
            if p.meets_tpot { "*" } else { " " },
            p.layout
        );
    }
    put!(out);
    put!(
        out,
        "searched {} layouts, simulated {} runs in {:.0} ms",
        plan.layouts_rated,
        plan.simulations,
        search_ms
    );
    match deploy {
        Some(cmd) => {
            if req.pools.len() > 1 {
                put!(
                    out,
                    "# GPU types per phase as listed above (deploy places roles on matching GPUs)"
                );
            }
            put!(out, "{cmd}");
        }
        None => put!(out, "# no layout to deploy: see the notes above"),
    }
}
