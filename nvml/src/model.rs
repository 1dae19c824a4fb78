//! What a host's GPUs are and how they are doing. Every field NVML may not support on some
//! machine is an `Option` (NUMA node and NVLink were "not supported" on a single-GPU H200 VM).

use serde::{Deserialize, Serialize};

/// Where an inventory came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Nvml,
    Fixture,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Degraded,
    Failed,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failed => "failed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInventory {
    pub source: Source,
    pub driver_version: Option<String>,
    pub nvml_version: Option<String>,
    /// CUDA version the driver supports, as "major.minor".
    pub cuda_driver_version: Option<String>,
    pub gpus: Vec<Gpu>,
    /// Why there are no GPUs, or what was odd while reading them.
    pub message: Option<String>,
    /// What the last telemetry sample cost, in microseconds.
    pub sample_cost_us: u64,
}

impl GpuInventory {
    pub fn none(message: impl Into<String>) -> Self {
        GpuInventory {
            source: Source::None,
            driver_version: None,
            nvml_version: None,
            cuda_driver_version: None,
            gpus: Vec::new(),
            message: Some(message.into()),
            sample_cost_us: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory: Memory,
    /// e.g. "00000000:18:00.0".
    pub pci_bus_id: String,
    pub pcie: Option<Pcie>,
    /// e.g. "9.0".
    pub compute_capability: Option<String>,
    /// e.g. "Hopper".
    pub architecture: Option<String>,
    pub mig: Mig,
    pub numa_node: Option<u32>,
    /// PCI bus ids at the far end of active NVLinks; `None` where NVLink is not supported.
    pub nvlink_peers: Option<Vec<String>>,
    pub telemetry: Telemetry,
    pub ecc: Option<Ecc>,
    pub retired_pages: Option<RetiredPages>,
    pub remapped_rows: Option<RemappedRows>,
    /// Critical Xid errors NVML reported since the agent started (most recent last, bounded).
    pub xid_errors: Vec<u64>,
    /// The GPU fell off the bus or stopped answering.
    pub lost: bool,
    /// Queries that failed for a reason other than "not supported" (e.g. permission denied).
    pub query_errors: Vec<String>,
    pub health: Health,
    pub health_reasons: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pcie {
    /// Maximum link generation and width the device and slot support.
    pub generation: u32,
    pub width: u32,
    /// Current link (it trains down when idle on some GPUs).
    pub current_generation: Option<u32>,
    pub current_width: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigState {
    Enabled,
    Disabled,
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mig {
    pub mode: MigState,
    /// Mode after the next GPU reset, when it differs.
    pub pending: Option<MigState>,
    pub instances: Vec<MigInstance>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigInstance {
    pub uuid: String,
    pub memory_total_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub utilization_gpu_pct: Option<u32>,
    pub utilization_memory_pct: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ecc {
    pub enabled: bool,
    /// Since the driver loaded.
    pub corrected_volatile: Option<u64>,
    pub uncorrected_volatile: Option<u64>,
    /// Over the GPU's lifetime.
    pub corrected_aggregate: Option<u64>,
    pub uncorrected_aggregate: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredPages {
    pub single_bit: u32,
    pub double_bit: u32,
    /// Retirements waiting for the next GPU reset.
    pub pending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemappedRows {
    pub corrected: u32,
    pub uncorrected: u32,
    /// A remap waits for the next GPU reset.
    pub pending: bool,
    /// A remap failed: the GPU needs service.
    pub failed: bool,
}
