//! Fixture inventories: a TOML file that describes any fleet for hosts and tests without GPUs
//! (8×H100 with NVLink, MIG slices, a failed GPU), including telemetry that changes over time.
//! The format is documented in `nvml/FIXTURE.md`; `nvml/fixtures/` has examples.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::model::*;

const MIB: u64 = 1024 * 1024;
/// Bound on GPUs one fixture may describe.
pub const FIXTURE_GPUS_MAX: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read GPU fixture {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("GPU fixture {path}: {why}")]
    Invalid { path: String, why: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    #[serde(default = "default_driver")]
    driver_version: String,
    #[serde(default = "default_nvml")]
    nvml_version: String,
    #[serde(default = "default_cuda")]
    cuda_driver_version: String,
    #[serde(default)]
    gpu: Vec<GpuGroup>,
    #[serde(default)]
    event: Vec<Event>,
}

fn default_driver() -> String {
    "550.54.15".into()
}
fn default_nvml() -> String {
    "12.550.54.15".into()
}
fn default_cuda() -> String {
    "12.4".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum NvLinkSpec {
    /// Full mesh among the GPUs of this group (NVSwitch systems).
    All,
    /// Supported, no active links.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigSlice {
    memory_mib: u64,
}

/// `count` identical GPUs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuGroup {
    #[serde(default = "one")]
    count: u32,
    name: String,
    memory_total_mib: u64,
    #[serde(default)]
    memory_used_mib: u64,
    compute_capability: Option<String>,
    architecture: Option<String>,
    pcie_generation: Option<u32>,
    pcie_width: Option<u32>,
    numa_node: Option<u32>,
    /// Omitted: NVLink not supported.
    nvlink: Option<NvLinkSpec>,
    #[serde(default = "mig_unsupported")]
    mig: MigState,
    #[serde(default)]
    mig_instances: Vec<MigSlice>,
    /// Explicit UUIDs (one per GPU); otherwise derived from the seed and the index.
    #[serde(default)]
    uuids: Vec<String>,
    temperature_c: Option<u32>,
    power_w: Option<f64>,
    power_limit_w: Option<f64>,
    utilization_gpu_pct: Option<u32>,
    utilization_memory_pct: Option<u32>,
    /// Omitted: ECC not supported.
    ecc: Option<bool>,
    #[serde(default)]
    retired_pages_supported: bool,
    #[serde(default)]
    remapped_rows_supported: bool,
}

fn one() -> u32 {
    1
}
fn mig_unsupported() -> MigState {
    MigState::Unsupported
}

/// A change to one GPU (by index) that takes effect `after_ms` after the inventory was loaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    #[serde(default)]
    after_ms: u64,
    gpu: u32,
    temperature_c: Option<u32>,
    power_w: Option<f64>,
    utilization_gpu_pct: Option<u32>,
    memory_used_mib: Option<u64>,
    ecc_corrected: Option<u64>,
    ecc_uncorrected: Option<u64>,
    retired_pages_pending: Option<bool>,
    remapped_rows_pending: Option<bool>,
    remapped_rows_failed: Option<bool>,
    xid: Option<u64>,
    lost: Option<bool>,
    /// A query that now fails with "permission denied" (e.g. "ecc").
    permission_denied: Option<String>,
}

/// A loaded fixture: the GPUs at time zero and the timeline of changes.
#[derive(Debug, Clone)]
pub struct Fixture {
    base: GpuInventory,
    events: Vec<Event>,
}

/// A stable, host-specific UUID for fixture GPU `index` (FNV-1a of seed and index).
fn fixture_uuid(seed: &str, index: u32) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.bytes().chain(index.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let h2 = h.rotate_left(29) ^ 0x9e3779b97f4a7c15;
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xffff,
        h2 >> 48,
        h2 & 0xffff_ffff_ffff
    )
}

impl Fixture {
    /// Reads a fixture file. `seed` (the node name) makes the derived UUIDs unique per host.
    pub fn load(path: &Path, seed: &str) -> Result<Self, FixtureError> {
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, seed).map_err(|why| FixtureError::Invalid {
            path: path.display().to_string(),
            why,
        })
    }

    pub fn parse(text: &str, seed: &str) -> Result<Self, String> {
        let f: FixtureFile =
            toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
        let mut gpus = Vec::new();
        for (gi, g) in f.gpu.iter().enumerate() {
            if g.count == 0 {
                return Err(format!("gpu[{gi}].count must be at least 1"));
            }
            if !g.uuids.is_empty() && g.uuids.len() != g.count as usize {
                return Err(format!(
                    "gpu[{gi}].uuids has {} entries for count {}",
                    g.uuids.len(),
                    g.count
                ));
            }
            if g.memory_used_mib > g.memory_total_mib {
                return Err(format!(
                    "gpu[{gi}].memory_used_mib exceeds memory_total_mib"
                ));
            }
            if !g.mig_instances.is_empty() && g.mig != MigState::Enabled {
                return Err(format!("gpu[{gi}].mig_instances needs mig = \"enabled\""));
            }
            let first = gpus.len() as u32;
            if first + g.count > FIXTURE_GPUS_MAX {
                return Err(format!("more than {FIXTURE_GPUS_MAX} GPUs"));
            }
            let bus = |i: u32| format!("00000000:{:02X}:00.0", 0x18 + i);
            for k in 0..g.count {
                let index = first + k;
                let uuid = g
                    .uuids
                    .get(k as usize)
                    .cloned()
                    .unwrap_or_else(|| fixture_uuid(seed, index));
                let nvlink_peers = g.nvlink.map(|spec| match spec {
                    NvLinkSpec::All => (first..first + g.count)
                        .filter(|j| *j != index)
                        .map(bus)
                        .collect(),
                    NvLinkSpec::None => Vec::new(),
                });
                let mig_instances = g
                    .mig_instances
                    .iter()
                    .enumerate()
                    .map(|(m, s)| MigInstance {
                        uuid: format!("MIG-{}-{m}", &uuid[4..]),
                        memory_total_bytes: s.memory_mib * MIB,
                    })
                    .collect();
                gpus.push(Gpu {
                    index,
                    uuid,
                    name: g.name.clone(),
                    memory: Memory {
                        total_bytes: g.memory_total_mib * MIB,
                        used_bytes: g.memory_used_mib * MIB,
                        free_bytes: (g.memory_total_mib - g.memory_used_mib) * MIB,
                    },
                    pci_bus_id: bus(index),
                    pcie: g
                        .pcie_generation
                        .zip(g.pcie_width)
                        .map(|(generation, width)| Pcie {
                            generation,
                            width,
                            current_generation: Some(generation),
                            current_width: Some(width),
                        }),
                    compute_capability: g.compute_capability.clone(),
                    architecture: g.architecture.clone(),
                    mig: Mig {
                        mode: g.mig,
                        pending: None,
                        instances: mig_instances,
                    },
                    numa_node: g.numa_node,
                    nvlink_peers,
                    telemetry: Telemetry {
                        temperature_c: g.temperature_c,
                        power_w: g.power_w,
                        power_limit_w: g.power_limit_w,
                        utilization_gpu_pct: g.utilization_gpu_pct,
                        utilization_memory_pct: g.utilization_memory_pct,
                    },
                    ecc: g.ecc.map(|enabled| Ecc {
                        enabled,
                        corrected_volatile: enabled.then_some(0),
                        uncorrected_volatile: enabled.then_some(0),
                        corrected_aggregate: enabled.then_some(0),
                        uncorrected_aggregate: enabled.then_some(0),
                    }),
                    retired_pages: g.retired_pages_supported.then_some(RetiredPages {
                        single_bit: 0,
                        double_bit: 0,
                        pending: false,
                    }),
                    remapped_rows: g.remapped_rows_supported.then_some(RemappedRows {
                        corrected: 0,
                        uncorrected: 0,
                        pending: false,
                        failed: false,
                    }),
                    xid_errors: Vec::new(),
                    lost: false,
                    query_errors: Vec::new(),
                    health: Health::Healthy,
                    health_reasons: Vec::new(),
                });
            }
        }
        for (i, e) in f.event.iter().enumerate() {
            if e.gpu as usize >= gpus.len() {
                return Err(format!(
                    "event[{i}].gpu = {} but the fixture has {} GPUs",
                    e.gpu,
                    gpus.len()
                ));
            }
        }
        let mut events = f.event;
        events.sort_by_key(|e| e.after_ms);
        let base = GpuInventory {
            source: Source::Fixture,
            driver_version: Some(f.driver_version),
            nvml_version: Some(f.nvml_version),
            cuda_driver_version: Some(f.cuda_driver_version),
            gpus,
            message: None,
            sample_cost_us: 0,
        };
        Ok(Fixture { base, events })
    }

    /// The inventory as it stands `elapsed` after loading (health not yet assessed).
    pub fn at(&self, elapsed: Duration) -> GpuInventory {
        let mut inv = self.base.clone();
        let now = elapsed.as_millis() as u64;
        for e in self.events.iter().take_while(|e| e.after_ms <= now) {
            let g = &mut inv.gpus[e.gpu as usize];
            let t = &mut g.telemetry;
            t.temperature_c = e.temperature_c.or(t.temperature_c);
            t.power_w = e.power_w.or(t.power_w);
            t.utilization_gpu_pct = e.utilization_gpu_pct.or(t.utilization_gpu_pct);
            if let Some(used) = e.memory_used_mib {
                let used = (used * MIB).min(g.memory.total_bytes);
                g.memory.used_bytes = used;
                g.memory.free_bytes = g.memory.total_bytes - used;
            }
            if let Some(ecc) = g.ecc.as_mut() {
                ecc.corrected_volatile = e.ecc_corrected.or(ecc.corrected_volatile);
                ecc.uncorrected_volatile = e.ecc_uncorrected.or(ecc.uncorrected_volatile);
            }
            if let (Some(r), Some(p)) = (g.retired_pages.as_mut(), e.retired_pages_pending) {
                r.pending = p;
            }
            if let Some(r) = g.remapped_rows.as_mut() {
                r.pending = e.remapped_rows_pending.unwrap_or(r.pending);
                r.failed = e.remapped_rows_failed.unwrap_or(r.failed);
            }
            if let Some(x) = e.xid {
                g.xid_errors.push(x);
            }
            g.lost = e.lost.unwrap_or(g.lost);
            if let Some(q) = &e.permission_denied {
                g.query_errors.push(format!("{q}: permission denied"));
            }
        }
        inv
    }

    /// GPUs described.
    pub fn len(&self) -> usize {
        self.base.gpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.gpus.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_stable_and_differ_between_hosts() {
        assert_eq!(fixture_uuid("node-1", 0), fixture_uuid("node-1", 0));
        assert_ne!(fixture_uuid("node-1", 0), fixture_uuid("node-2", 0));
        assert_ne!(fixture_uuid("node-1", 0), fixture_uuid("node-1", 1));
        assert_eq!(
            fixture_uuid("x", 3).len(),
            "GPU-12345678-1234-1234-1234-123456789012".len()
        );
    }

    #[test]
    fn bad_fixtures_are_refused_with_the_reason() {
        for (text, why) in [
            ("[[gpu]]\nname = \"A\"\n", "memory_total_mib"),
            (
                "[[gpu]]\nname = \"A\"\nmemory_total_mib = 1\ncount = 0\n",
                "count",
            ),
            (
                "[[gpu]]\nname = \"A\"\nmemory_total_mib = 1\nmemory_used_mib = 2\n",
                "memory_used_mib",
            ),
            (
                "[[gpu]]\nname = \"A\"\nmemory_total_mib = 1\nbogus = 1\n",
                "bogus",
            ),
            (
                "[[gpu]]\nname = \"A\"\nmemory_total_mib = 1\n[[event]]\ngpu = 5\n",
                "event[0].gpu",
            ),
            (
                "[[gpu]]\nname = \"A\"\nmemory_total_mib = 1\nmig_instances = [{ memory_mib = 1 }]\n",
                "mig",
            ),
            (
                "[[gpu]]\nname = \"A\"\nmemory_total_mib = 1\ncount = 2\nuuids = [\"GPU-1\"]\n",
                "uuids",
            ),
        ] {
            let e = Fixture::parse(text, "n").unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
