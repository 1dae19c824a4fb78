//! `pdctl bench failover`: on its own local cluster (free ports, a temp dir, so it can run
//! beside a user's cluster), SIGKILLs the coordinator again and again and measures, each time,
//! from the kill to the first write acknowledged to an outside client through the admin API;
//! the killed node is started again between rounds.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::client::AdminClient;
use crate::local;

/// Bound on one round's wait for a write to be acknowledged, and for the cluster to heal.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub nodes: usize,
    pub rounds: usize,
    pub failover_ms_p50: f64,
    pub failover_ms_max: f64,
    pub samples_ms: Vec<f64>,
    /// The Raft timings of the local cluster.
    pub heartbeat_ms: u64,
    pub election_timeout_ms: [u64; 2],
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

pub fn run(nodes: usize, rounds: usize, quiet: bool) -> Result<FailoverReport> {
    if !(3..=9).contains(&nodes) {
        bail!("--nodes must be between 3 and 9 (a coordinator must be able to fail over)");
    }
    if rounds == 0 || rounds > 100 {
        bail!("--rounds must be between 1 and 100");
    }
    let tmp = std::env::temp_dir().join(format!("pdctl-bench-failover-{}", std::process::id()));
    let base = local::free_base_port(nodes)?;
    let (dir, _) = local::create(
        nodes,
        0,
        &tmp,
        base,
        base + 2,
        &local::VllmLocal::default(),
        true,
    )?;
    let result = rounds_on(&dir, nodes, rounds, quiet);
    let _ = local::down(&dir, true);
    let _ = std::fs::remove_dir_all(&dir);
    let samples = result?;
    let mut sorted = samples.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(FailoverReport {
        nodes,
        rounds,
        failover_ms_p50: percentile(&sorted, 0.5),
        failover_ms_max: *sorted.last().unwrap_or(&0.0),
        samples_ms: samples,
        heartbeat_ms: local::LOCAL_HEARTBEAT_MS,
        election_timeout_ms: [local::LOCAL_ELECTION_MIN_MS, local::LOCAL_ELECTION_MAX_MS],
    })
}

fn rounds_on(dir: &std::path::Path, nodes: usize, rounds: usize, quiet: bool) -> Result<Vec<f64>> {
    let client = AdminClient::from_config(&dir.join("pdctl.toml"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut samples = Vec::new();
    for round in 1..=rounds {
        let status: pd_api::Status = rt.block_on(client.get("/v1/status"))?;
        let Some(leader) = status.coordinator else {
            bail!("round {round}: no coordinator before the kill");
        };
        let target = (1..=nodes)
            .map(|k| format!("node-{k}"))
            .find(|n| *n != leader)
            .expect("at least two nodes");
        let killed_at = Instant::now();
        local::kill(dir, &leader)?;
        let mut i = 0u64;
        let acked = loop {
            i += 1;
            let path = format!("/v1/nodes/{target}/labels/bench");
            let body = pd_api::LabelRequest {
                value: format!("r{round}-{i}"),
            };
            if rt
                .block_on(client.send::<_, pd_api::Changed>("PUT", &path, Some(&body)))
                .is_ok()
            {
                break killed_at.elapsed();
            }
            if killed_at.elapsed() > ROUND_TIMEOUT {
                bail!(
                    "round {round}: no write acknowledged {} s after killing {leader}",
                    ROUND_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let ms = acked.as_secs_f64() * 1e3;
        if !quiet {
            eprintln!(
                "round {round}: killed coordinator {leader}; first acknowledged write after {ms:.0} ms"
            );
        }
        samples.push(ms);
        // Heal before the next round: the killed node back, caught up and following.
        local::start(dir, &leader, None)?;
        let back = client.only(&leader)?;
        let until = Instant::now() + ROUND_TIMEOUT;
        loop {
            if let Ok(v) = rt.block_on(back.get::<pd_api::Status>("/v1/status"))
                && v.in_cluster
                && v.coordinator.is_some()
            {
                break;
            }
            if Instant::now() > until {
                bail!(
                    "round {round}: {leader} did not rejoin within {} s",
                    ROUND_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(samples)
}
