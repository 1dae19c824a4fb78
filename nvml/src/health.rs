//! Health from facts, as pure functions: a GPU is healthy, degraded or failed, with the reasons
//! in words; and the events between two inventories.

use serde::{Deserialize, Serialize};

use crate::model::{Gpu, GpuInventory, Health};

/// Critical Xid errors after which the GPU cannot be trusted until it is reset or serviced
/// (NVIDIA's Xid catalogue: double-bit ECC, fallen off the bus, uncontained ECC, GSP and
/// row-remapping failures, NVLink fatal errors among them).
pub const FATAL_XIDS: &[u64] = &[48, 62, 64, 74, 79, 92, 94, 95, 119, 120, 140];

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthThresholds {
    /// At or above this GPU temperature the GPU is degraded.
    pub temperature_degraded_c: u32,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        HealthThresholds {
            temperature_degraded_c: 85,
        }
    }
}

/// Judges one GPU from its facts.
pub fn assess(gpu: &Gpu, t: &HealthThresholds) -> (Health, Vec<String>) {
    let mut failed = Vec::new();
    let mut degraded = Vec::new();
    if gpu.lost {
        failed.push("GPU lost (fallen off the bus or not answering)".to_string());
    }
    if let Some(n) = gpu
        .ecc
        .and_then(|e| e.uncorrected_volatile)
        .filter(|n| *n > 0)
    {
        failed.push(format!(
            "{n} uncorrectable ECC error(s) since the driver loaded"
        ));
    }
    if let Some(r) = gpu.remapped_rows {
        if r.failed {
            failed.push("row remapping failed: the GPU needs service".to_string());
        }
        if r.pending {
            degraded.push("row remapping pending: reset the GPU".to_string());
        }
    }
    for x in &gpu.xid_errors {
        if FATAL_XIDS.contains(x) {
            failed.push(format!("critical Xid {x}"));
        } else {
            degraded.push(format!("Xid {x}"));
        }
    }
    if gpu.retired_pages.is_some_and(|r| r.pending) {
        degraded.push("page retirement pending: reset the GPU".to_string());
    }
    if let Some(c) = gpu
        .telemetry
        .temperature_c
        .filter(|c| *c >= t.temperature_degraded_c)
    {
        degraded.push(format!(
            "temperature {c} C at or above {} C",
            t.temperature_degraded_c
        ));
    }
    for e in &gpu.query_errors {
        degraded.push(format!("cannot read {e}"));
    }
    if !failed.is_empty() {
        failed.extend(degraded);
        (Health::Failed, failed)
    } else if !degraded.is_empty() {
        (Health::Degraded, degraded)
    } else {
        (Health::Healthy, Vec::new())
    }
}

/// Fills in `health` and `health_reasons` of every GPU.
pub fn assess_all(inv: &mut GpuInventory, t: &HealthThresholds) {
    for g in &mut inv.gpus {
        let (h, r) = assess(g, t);
        g.health = h;
        g.health_reasons = r;
    }
}

/// A change the agent reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthEvent {
    pub uuid: String,
    pub index: u32,
    /// `None` when the GPU appeared.
    pub from: Option<Health>,
    /// `None` when the GPU disappeared.
    pub to: Option<Health>,
    pub reasons: Vec<String>,
}

/// The health changes between two inventories, matched by UUID: changed states, GPUs that
/// appeared, GPUs that disappeared.
pub fn changes(old: &GpuInventory, new: &GpuInventory) -> Vec<HealthEvent> {
    let mut out = Vec::new();
    for g in &new.gpus {
        match old.gpus.iter().find(|o| o.uuid == g.uuid) {
            Some(o) if o.health == g.health && o.health_reasons == g.health_reasons => {}
            Some(o) => out.push(HealthEvent {
                uuid: g.uuid.clone(),
                index: g.index,
                from: Some(o.health),
                to: Some(g.health),
                reasons: g.health_reasons.clone(),
            }),
            None => out.push(HealthEvent {
                uuid: g.uuid.clone(),
                index: g.index,
                from: None,
                to: Some(g.health),
                reasons: g.health_reasons.clone(),
            }),
        }
    }
    for o in &old.gpus {
        if !new.gpus.iter().any(|g| g.uuid == o.uuid) {
            out.push(HealthEvent {
                uuid: o.uuid.clone(),
                index: o.index,
                from: Some(o.health),
                to: None,
                reasons: vec!["GPU no longer reported".to_string()],
            });
        }
    }
    out
}
