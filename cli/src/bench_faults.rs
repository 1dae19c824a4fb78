//! `pdctl bench faults`: failure semantics measured. A local cluster of four agents (one
//! fixture GPU each) serves `tiny` with one prefill and two decode engines; the client sends
//! to the fourth agent, which runs no engine. For each fault, one at a time, a fixed-seed
//! open-loop load (Poisson arrivals, streaming, temperature 0) runs while, a third of the way
//! in, the fault strikes:
//! - `kv_link_cut`: the UDP fault proxy in front of one decode host cuts the flow from the
//!   prefill host once it carried 200 kB more (a KV shipment mid-transfer), healed after 3 s;
//! - `prefill_engine_kill`, `decode_engine_kill`: `kill -9` of the engine process;
//! - `decode_node_kill`: SIGKILL of a decode host's agent and engines (the last fault).
//!
//! Per fault it reports requests sent, done, retried (before the first token), migrated
//! (after it), failed with an explicit error, hung (no end within 60 s: must be 0) and lost
//! (no explicit end, or a text that differs from the same request served undisturbed: must
//! be 0); the time until every request caught by the fault had ended; and the time until the
//! deployment's engines were all ready again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;

use pd_api::{EngineReport, EngineRole, EngineState};

use crate::client::AdminClient;
use crate::demo::{deploy_ready, ingress};
use crate::load::{self, LoadRequest, Outcome, Rng};

const MODEL: &str = "tiny";
const SEED: u64 = 11;
/// A request with no end after this long is hung.
const HUNG_AFTER: Duration = Duration::from_secs(60);
/// The cut: this many more bytes on the flow from the prefill host, then nothing.
const CUT_AFTER_BYTES: u64 = 200_000;
const CUT_HEALED_AFTER: Duration = Duration::from_secs(3);
const STEADY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Serialize)]
pub struct FaultResult {
    pub fault: String,
    pub sent: usize,
    pub done: usize,
    pub retried: u64,
    pub migrated: u64,
    pub failed_explicit: usize,
    pub hung: usize,
    pub lost: usize,
    /// From the fault until every request in flight at that moment had ended.
    pub requests_settled_ms: f64,
    /// From the fault until the deployment's engines were all ready again (restarted or
    /// placed elsewhere); none for the link cut, which stops no engine.
    pub engines_back_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct FaultsReport {
    pub model: String,
    pub layout: String,
    pub seed: u64,
    pub requests_per_fault: usize,
    pub rate_per_s: f64,
    pub faults: Vec<FaultResult>,
    pub hung: usize,
    pub lost: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    KvLinkCut,
    PrefillEngineKill,
    DecodeEngineKill,
    DecodeNodeKill,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KvLinkCut => "kv_link_cut",
            Fault::PrefillEngineKill => "prefill_engine_kill",
            Fault::DecodeEngineKill => "decode_engine_kill",
            Fault::DecodeNodeKill => "decode_node_kill",
        }
    }
}

pub fn run(requests: usize, rate: f64, json_out: bool) -> Result<FaultsReport> {
    crate::demo::find_pdagent()?;
    if !(6..=10_000).contains(&requests) {
        bail!("--requests must be between 6 and 10000");
    }
    if !(rate.is_finite() && rate > 0.0 && rate <= 1000.0) {
        bail!("--rate must be in (0, 1000] requests per second");
    }
    let say = |s: String| {
        if !json_out {
            eprintln!("{s}");
        }
    };
    crate::local::with_cluster("bench-faults", 4, 1, |dir, api_port| {
        measure(dir, api_port, requests, rate, &say)
    })
}

/// The deployment's engines.
fn engines(client: &AdminClient, rt: &tokio::runtime::Runtime) -> Result<Vec<EngineReport>> {
    let v: pd_api::Engines = rt.block_on(client.get("/v1/engines"))?;
    Ok(v.engines)
}

fn node_ip(node: &str) -> String {
    format!("127.0.0.{}", node.trim_start_matches("node-"))
}

async fn recoveries(api: SocketAddr) -> (u64, u64) {
    let body = load::get(api, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    let kind = |k: &str| {
        load::metric_sum(
            std::slice::from_ref(&body),
            &format!("pdagent_request_recoveries_total{{model=\"{MODEL}\",kind=\"{k}\"}}"),
        ) as u64
    };
    (kind("retry"), kind("migration"))
}

/// Waits until every engine is ready and requests are served without retries.
fn wait_steady(
    client: &AdminClient,
    rt: &tokio::runtime::Runtime,
    api: SocketAddr,
    dead: Option<&str>,
) -> Result<()> {
    let until = Instant::now() + STEADY_TIMEOUT;
    let probe = |k: usize| LoadRequest {
        ignore_eos: false,
        prompt: format!("steady {k}: is every engine serving?"),
        max_tokens: 2,
        at_s: 0.0,
    };
    loop {
        let e = engines(client, rt)?;
        let placed = e.len() == 3
            && e.iter()
                .all(|x| x.state == EngineState::Ready && dead.is_none_or(|d| x.node != d));
        if placed {
            let before = rt.block_on(recoveries(api));
            let ok = (0..4).all(|k| rt.block_on(load::one(api, MODEL, &probe(k), SEED)).ok);
            if ok && rt.block_on(recoveries(api)) == before {
                return Ok(());
            }
        }
        if Instant::now() > until {
            bail!(
                "the cluster was not steady (engines ready, requests served without retries) within {} s",
                STEADY_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn workload(n: usize, rate: f64, seed: u64) -> Vec<LoadRequest> {
    let mut rng = Rng::new(seed);
    let times = load::poisson_times(n, rate, &mut rng);
    times
        .into_iter()
        .map(|at_s| {
            let bytes = 200 + (rng.next_u64() % 600) as usize;
            LoadRequest {
                ignore_eos: false,
                prompt: load::text(&mut rng, bytes),
                max_tokens: 64 + (rng.next_u64() % 448) as u32,
                at_s,
            }
        })
        .collect()
}

fn measure(
    dir: &std::path::Path,
    api_port: u16,
    requests: usize,
    rate: f64,
    say: &dyn Fn(String),
) -> Result<FaultsReport> {
    let client = AdminClient::from_config(&dir.join("pdctl.toml"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let agents = ingress(4, api_port);
    say("deploying tiny: 1 prefill + 2 decode engines on 4 hosts".to_string());
    deploy_ready(
        &client,
        &rt,
        MODEL,
        MODEL,
        json!({"prefill": 1, "decode": 2}),
        3,
        &agents,
    )?;
    let placed = engines(&client, &rt)?;
    let used: Vec<&str> = placed.iter().map(|e| e.node.as_str()).collect();
    let client_node = (1..=4)
        .map(|k| format!("node-{k}"))
        .find(|n| !used.contains(&n.as_str()))
        .context("no host without an engine for the client")?;
    let k: usize = client_node.trim_start_matches("node-").parse()?;
    let api = agents[k - 1];
    let prefill_node = placed
        .iter()
        .find(|e| e.role == EngineRole::Prefill)
        .map(|e| e.node.clone())
        .context("no prefill engine")?;
    let cut_node = placed
        .iter()
        .find(|e| e.role == EngineRole::Decode)
        .map(|e| e.node.clone())
        .context("no decode engine")?;

    // The fault proxy in front of one decode host, for the whole run.
    say(format!("fault proxy in front of {cut_node}"));
    let wiring = crate::local::ProxyWiring::new(dir, &cut_node)?;
    wiring.stop_agent()?;
    let front = rt.block_on(crate::faultproxy::bind(wiring.public))?;
    wiring.start_behind()?;
    let (proxy_cmd, proxy_lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (notice_tx, notices) = std::sync::mpsc::channel::<String>();
    let proxy = rt.spawn(crate::faultproxy::run(
        front,
        wiring.private,
        crate::faultproxy::Faults::default(),
        SEED,
        proxy_lines,
        move |l| {
            let _ = notice_tx.send(l);
        },
    ));
    let result = (|| -> Result<Vec<FaultResult>> {
        wait_steady(&client, &rt, api, None)?;
        let mut results = Vec::new();
        for (i, fault) in [
            Fault::KvLinkCut,
            Fault::PrefillEngineKill,
            Fault::DecodeEngineKill,
            Fault::DecodeNodeKill,
        ]
        .into_iter()
        .enumerate()
        {
            say(format!("{}: {requests} requests at {rate}/s", fault.name()));
            let r = phase(
                &client,
                &rt,
                dir,
                api,
                fault,
                workload(requests, rate, SEED + i as u64),
                &prefill_node,
                &cut_node,
                &client_node,
                &proxy_cmd,
                &notices,
            )?;
            say(format!(
                "  done {}, retried {}, migrated {}, failed with an error {}, hung {}, lost {}; settled in {:.0} ms{}",
                r.done,
                r.retried,
                r.migrated,
                r.failed_explicit,
                r.hung,
                r.lost,
                r.requests_settled_ms,
                r.engines_back_ms
                    .map(|ms| format!(", engines back in {ms:.0} ms"))
                    .unwrap_or_default()
            ));
            results.push(r);
        }
        Ok(results)
    })();
    proxy.abort();
    let faults = result?;
    Ok(FaultsReport {
        model: MODEL.to_string(),
        layout: "1 prefill + 2 decode engines, 4 hosts".to_string(),
        seed: SEED,
        requests_per_fault: requests,
        rate_per_s: rate,
        hung: faults.iter().map(|f| f.hung).sum(),
        lost: faults.iter().map(|f| f.lost).sum(),
        faults,
    })
}

#[allow(clippy::too_many_arguments)]
fn phase(
    client: &AdminClient,
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    api: SocketAddr,
    fault: Fault,
    work: Vec<LoadRequest>,
    prefill_node: &str,
    cut_node: &str,
    client_node: &str,
    proxy: &tokio::sync::mpsc::UnboundedSender<String>,
    notices: &std::sync::mpsc::Receiver<String>,
) -> Result<FaultResult> {
    let dead = (fault == Fault::DecodeNodeKill).then(|| {
        // A decode host other than the proxied one (and never the client's).
        engines(client, rt)
            .ok()
            .into_iter()
            .flatten()
            .find(|e| e.role == EngineRole::Decode && e.node != cut_node && e.node != client_node)
            .map(|e| e.node)
    });
    let dead = dead.flatten();
    if fault == Fault::DecodeNodeKill && dead.is_none() {
        bail!("no decode host to kill");
    }
    wait_steady(client, rt, api, None)?;
    let (retried0, migrated0) = rt.block_on(recoveries(api));
    let at_fault = work[work.len() / 3].at_s;
    let start = Instant::now();
    let load = rt.spawn({
        let work = work.clone();
        async move { load::open_loop(&[api], MODEL, &work, SEED, HUNG_AFTER).await }
    });
    // The fault, a third of the way in.
    std::thread::sleep(Duration::from_secs_f64(at_fault));
    let struck = start.elapsed();
    let before = engines(client, rt)?;
    let mut killed_pid = None;
    match fault {
        Fault::KvLinkCut => {
            proxy
                .send(format!("cut {CUT_AFTER_BYTES} {}", node_ip(prefill_node)))
                .ok();
        }
        Fault::PrefillEngineKill | Fault::DecodeEngineKill => {
            let role = if fault == Fault::PrefillEngineKill {
                EngineRole::Prefill
            } else {
                EngineRole::Decode
            };
            let e = before
                .iter()
                .find(|e| e.role == role && e.pid.is_some())
                .with_context(|| format!("no {role} engine with a pid"))?;
            killed_pid = e.pid;
            let pid = e.pid.unwrap_or_default();
            let out = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .output()?;
            if !out.status.success() {
                bail!("kill -9 {pid} failed");
            }
        }
        Fault::DecodeNodeKill => {
            crate::local::kill(dir, dead.as_deref().unwrap_or_default())?;
        }
    }
    // Engines back (the cut stops none).
    let mut engines_back = None;
    if fault != Fault::KvLinkCut {
        let until = Instant::now() + STEADY_TIMEOUT;
        while Instant::now() < until {
            let e = engines(client, rt)?;
            let back = e.len() == 3
                && e.iter().all(|x| {
                    x.state == EngineState::Ready
                        && killed_pid.is_none_or(|p| x.pid != Some(p))
                        && dead.as_deref().is_none_or(|d| x.node != d)
                });
            if back {
                engines_back = Some(start.elapsed() - struck);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        std::thread::sleep(CUT_HEALED_AFTER);
        proxy.send("heal".to_string()).ok();
    }
    let outcomes: Vec<Outcome> = rt.block_on(load)?;
    if fault == Fault::KvLinkCut {
        let cut = std::iter::from_fn(|| notices.try_recv().ok()).any(|l| l.starts_with("cut "));
        if !cut {
            bail!("the link was never cut: no KV shipment crossed it (raise --requests or --rate)");
        }
    }
    let (retried1, migrated1) = rt.block_on(recoveries(api));
    // Caught by the fault: sent before it, ended after it.
    let struck_s = struck.as_secs_f64();
    let settled = work
        .iter()
        .zip(&outcomes)
        .filter(|(w, _)| w.at_s <= struck_s)
        .map(|(w, o)| w.at_s + o.e2e.as_secs_f64() - struck_s)
        .fold(0.0f64, f64::max);
    // Each request that ended well, again, undisturbed: its text must be the same.
    wait_steady(client, rt, api, dead.as_deref())?;
    let mut lost = 0;
    for (w, o) in work.iter().zip(&outcomes) {
        if o.ok {
            let again = rt.block_on(load::one(api, MODEL, w, SEED));
            if again.ok && again.text != o.text {
                lost += 1;
            }
        } else if !o.explicit && !o.hung {
            lost += 1;
        }
    }
    Ok(FaultResult {
        fault: fault.name().to_string(),
        sent: outcomes.len(),
        done: outcomes.iter().filter(|o| o.ok).count(),
        retried: retried1.saturating_sub(retried0),
        migrated: migrated1.saturating_sub(migrated0),
        failed_explicit: outcomes.iter().filter(|o| !o.ok && o.explicit).count(),
        hung: outcomes.iter().filter(|o| o.hung).count(),
        lost,
        requests_settled_ms: settled * 1e3,
        engines_back_ms: engines_back.map(|d| d.as_secs_f64() * 1e3),
    })
}

pub fn print(r: &FaultsReport) {
    println!(
        "{}, {}: {} requests per fault at {}/s (seed {})",
        r.model, r.layout, r.requests_per_fault, r.rate_per_s, r.seed
    );
    println!(
        "{:<22} {:>5} {:>5} {:>8} {:>9} {:>7} {:>5} {:>5} {:>11} {:>13}",
        "FAULT",
        "SENT",
        "DONE",
        "RETRIED",
        "MIGRATED",
        "ERRORS",
        "HUNG",
        "LOST",
        "SETTLED_MS",
        "ENGINES_BACK"
    );
    for f in &r.faults {
        println!(
            "{:<22} {:>5} {:>5} {:>8} {:>9} {:>7} {:>5} {:>5} {:>11.0} {:>13}",
            f.fault,
            f.sent,
            f.done,
            f.retried,
            f.migrated,
            f.failed_explicit,
            f.hung,
            f.lost,
            f.requests_settled_ms,
            f.engines_back_ms
                .map(|ms| format!("{ms:.0} ms"))
                .unwrap_or_else(|| "-".to_string())
        );
    }
    println!(
        "hung {} and lost {} in all (both must be 0)",
        r.hung, r.lost
    );
}
