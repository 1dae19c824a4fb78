//! What this agent tells the coordinator about itself: a liveness report every heartbeat (with
//! its GPUs' readings and its engines), and its GPU list, replicated when it changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pd_raft::Command;
use pd_raft::state::GpuRecord;

use crate::control::ControlPlane;
use crate::gpus::SharedInventory;
use crate::util::Unpoisoned;
use crate::wire::{AgentRequest, EngineReport, GpuTelemetry};

/// This node's own engines and GPUs, as its supervisor and GPU sampler last published them.
#[derive(Default)]
pub struct LocalReports {
    engines: Mutex<Vec<EngineReport>>,
    inventory: Option<SharedInventory>,
}

impl LocalReports {
    pub fn new(inventory: Option<SharedInventory>) -> Self {
        LocalReports {
            engines: Mutex::new(Vec::new()),
            inventory,
        }
    }

    pub fn inventory(&self) -> Option<SharedInventory> {
        self.inventory.clone()
    }

    pub fn set_engines(&self, engines: Vec<EngineReport>) {
        *self.engines.locked() = engines;
    }

    /// This node's engines as its supervisor last published them.
    pub fn engines(&self) -> Vec<EngineReport> {
        self.engines.locked().clone()
    }

    /// This node's GPU readings now.
    pub fn telemetry(&self) -> Vec<GpuTelemetry> {
        let Some(inv) = &self.inventory else {
            return Vec::new();
        };
        let inv = inv.locked();
        inv.gpus
            .iter()
            .map(|g| GpuTelemetry {
                index: g.index,
                temperature_c: g.telemetry.temperature_c,
                power_w: g.telemetry.power_w,
                utilization_gpu_pct: g.telemetry.utilization_gpu_pct,
                memory_used_bytes: g.memory.used_bytes,
                health: g.health.to_string(),
            })
            .collect()
    }

    /// This node's GPUs as the replicated state records them.
    fn gpu_records(&self) -> Option<Vec<GpuRecord>> {
        let inv = self.inventory.as_ref()?.locked();
        Some(
            inv.gpus
                .iter()
                .map(|g| GpuRecord {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    name: g.name.clone(),
                    memory_total_bytes: g.memory.total_bytes,
                    health: g.health.to_string(),
                })
                .collect(),
        )
    }
}

/// Reports to the coordinator every `heartbeat` (while another agent coordinates), and
/// replicates this host's GPU list every `interval` when it differs from the recorded one;
/// each on its own clock, so a write waiting out an election never delays a liveness report.
pub async fn report_loop(
    control: Arc<ControlPlane>,
    local: Arc<LocalReports>,
    heartbeat: Duration,
    interval: Duration,
) {
    let beats = async {
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tick.tick().await;
            if control.is_coordinator() {
                continue;
            }
            let req = AgentRequest::NodeReport {
                node: control.me.name.clone(),
                gpus: local.telemetry(),
                engines: local.engines(),
            };
            let _ = control.call_coordinator(&req, 2 * heartbeat).await;
        }
    };
    let gpus = async {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            if let Err(e) = report_gpus(&control, &local).await {
                tracing::debug!(error = %e, "GPU report not replicated yet");
            }
        }
    };
    tokio::join!(beats, gpus);
}

/// Replicates this host's GPU list when it differs from what the cluster records.
async fn report_gpus(control: &ControlPlane, local: &LocalReports) -> Result<(), String> {
    let Some(gpus) = local.gpu_records() else {
        return Ok(());
    };
    let me = control.me.name.clone();
    let Some(recorded) = control.read_state(|s| s.nodes.get(&me).map(|n| n.gpus.clone())) else {
        return Ok(());
    };
    if recorded == gpus {
        return Ok(());
    }
    control
        .submit(Command::SetGpus { node: me, gpus })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}
