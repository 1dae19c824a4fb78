//! The agent's view of its GPUs: a sampling thread (NVML calls block) that keeps the latest
//! inventory for liveness reports and logs every health change; and the `pdagent gpus` table.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::Unpoisoned;
use pd_nvml::{GpuDiscovery, GpuInventory, Health, HealthEvent};
use tracing::{info, warn};

/// The latest inventory, shared with whoever reports it.
pub type SharedInventory = Arc<Mutex<GpuInventory>>;

/// Takes a first sample now (so the agent starts with a known inventory), then samples every
/// `interval` on a named thread for the life of the process.
pub fn start_sampler(
    mut discovery: GpuDiscovery,
    interval: Duration,
) -> std::io::Result<SharedInventory> {
    let (inv, events) = discovery.sample();
    log_inventory(&inv);
    log_events(&events);
    let shared = Arc::new(Mutex::new(inv));
    let out = shared.clone();
    std::thread::Builder::new()
        .name("gpu-sampler".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let (inv, events) = discovery.sample();
                log_events(&events);
                *out.locked() = inv;
            }
        })?;
    Ok(shared)
}

fn log_inventory(inv: &GpuInventory) {
    info!(
        source = ?inv.source,
        gpus = inv.gpus.len(),
        driver = inv.driver_version.as_deref().unwrap_or("-"),
        sample_cost_us = inv.sample_cost_us,
        message = inv.message.as_deref().unwrap_or(""),
        "GPU inventory"
    );
}

fn log_events(events: &[HealthEvent]) {
    for e in events {
        let from = e.from.map_or("absent".to_string(), |h| h.to_string());
        let to = e.to.map_or("absent".to_string(), |h| h.to_string());
        let reasons = e.reasons.join("; ");
        if e.to.is_some_and(|h| h == Health::Healthy) {
            info!(gpu = e.index, uuid = %e.uuid, %from, %to, "GPU health");
        } else {
            warn!(gpu = e.index, uuid = %e.uuid, %from, %to, %reasons, "GPU health changed");
        }
    }
}

/// A human table of the inventory.
pub fn table(inv: &GpuInventory) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let src = match inv.source {
        pd_nvml::Source::Nvml => "nvml",
        pd_nvml::Source::Fixture => "fixture",
        pd_nvml::Source::None => "none",
    };
    let _ = writeln!(
        s,
        "source {src}  driver {}  NVML {}  CUDA {}  ({} GPU{}, sample {} us)",
        inv.driver_version.as_deref().unwrap_or("-"),
        inv.nvml_version.as_deref().unwrap_or("-"),
        inv.cuda_driver_version.as_deref().unwrap_or("-"),
        inv.gpus.len(),
        if inv.gpus.len() == 1 { "" } else { "s" },
        inv.sample_cost_us
    );
    if let Some(m) = &inv.message {
        let _ = writeln!(s, "{m}");
    }
    if inv.gpus.is_empty() {
        return s;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let _ = writeln!(
        s,
        "{:<3} {:<24} {:>13} {:<16} {:<6} {:<4} {:<4} {:<6} {:<12} {:>5} {:>11} {:<8}",
        "IDX",
        "NAME",
        "MEM GiB",
        "PCI BUS",
        "PCIE",
        "CC",
        "NUMA",
        "NVLINK",
        "MIG",
        "TEMP",
        "POWER W",
        "HEALTH"
    );
    for g in &inv.gpus {
        let mig = match g.mig.mode {
            pd_nvml::MigState::Enabled => format!("on ({})", g.mig.instances.len()),
            pd_nvml::MigState::Disabled => "off".into(),
            pd_nvml::MigState::Unsupported => "-".into(),
        };
        let power = match (g.telemetry.power_w, g.telemetry.power_limit_w) {
            (Some(p), Some(l)) => format!("{p:.0}/{l:.0}"),
            (Some(p), None) => format!("{p:.0}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<3} {:<24} {:>13} {:<16} {:<6} {:<4} {:<4} {:<6} {:<12} {:>5} {:>11} {:<8}",
            g.index,
            g.name.chars().take(24).collect::<String>(),
            format!(
                "{:.1}/{:.1}",
                gib(g.memory.used_bytes),
                gib(g.memory.total_bytes)
            ),
            g.pci_bus_id,
            opt(g.pcie.map(|p| format!("{}x{}", p.generation, p.width))),
            opt(g.compute_capability.clone()),
            opt(g.numa_node.map(|n| n.to_string())),
            opt(g.nvlink_peers.as_ref().map(|p| p.len().to_string())),
            mig,
            opt(g.telemetry.temperature_c.map(|t| format!("{t}C"))),
            power,
            g.health
        );
        for r in &g.health_reasons {
            let _ = writeln!(s, "    {}: {r}", g.health);
        }
    }
    s
}
