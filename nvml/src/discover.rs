//! Discovery and sampling: a fixture when one is configured, NVML when the library loads (it is
//! opened at run time, never linked), otherwise no GPUs with the reason. Static facts are read
//! once; each `sample` reads only telemetry and error counters, so its cost is bounded by a
//! fixed number of NVML calls per GPU (measured and reported as `sample_cost_us`).

use std::path::Path;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet};
use tracing::{info, warn};

use crate::fixture::{Fixture, FixtureError};
use crate::health::{self, HealthEvent, HealthThresholds};
use crate::model::*;

/// Xid errors kept per GPU.
pub const XIDS_KEPT_MAX: usize = 16;
/// NVLink links probed per GPU (NVML's NVML_NVLINK_MAX_LINKS).
const NVLINK_LINKS_MAX: u32 = 18;

/// The local GPU inventory and its telemetry over time.
pub struct GpuDiscovery {
    backend: Backend,
    thresholds: HealthThresholds,
    last: Option<GpuInventory>,
}

enum Backend {
    Fixture { fixture: Fixture, started: Instant },
    Nvml(Box<NvmlBackend>),
    None(GpuInventory),
}

impl GpuDiscovery {
    /// Opens the fixture if one is given (an unreadable fixture is an error: it is
    /// configuration), else NVML, else nothing. `seed` (the node name) makes fixture UUIDs
    /// unique per host.
    pub fn open(
        fixture: Option<&Path>,
        seed: &str,
        thresholds: HealthThresholds,
    ) -> Result<Self, FixtureError> {
        let backend = match fixture {
            Some(p) => Backend::Fixture {
                fixture: Fixture::load(p, seed)?,
                started: Instant::now(),
            },
            None => open_nvml(),
        };
        Ok(GpuDiscovery {
            backend,
            thresholds,
            last: None,
        })
    }

    /// Where the inventory comes from.
    pub fn source(&self) -> Source {
        match &self.backend {
            Backend::Fixture { .. } => Source::Fixture,
            Backend::Nvml(_) => Source::Nvml,
            Backend::None(inv) => inv.source,
        }
    }

    /// Reads the current inventory with telemetry and health, and the health changes since the
    /// previous sample (every GPU appears as a change on the first sample).
    pub fn sample(&mut self) -> (GpuInventory, Vec<HealthEvent>) {
        let start = Instant::now();
        let mut inv = match &mut self.backend {
            Backend::Fixture { fixture, started } => fixture.at(started.elapsed()),
            Backend::Nvml(n) => n.sample(),
            Backend::None(inv) => inv.clone(),
        };
        health::assess_all(&mut inv, &self.thresholds);
        inv.sample_cost_us = start.elapsed().as_micros() as u64;
        let empty = GpuInventory {
            gpus: Vec::new(),
            ..inv.clone()
        };
        let events = health::changes(self.last.as_ref().unwrap_or(&empty), &inv);
        self.last = Some(inv.clone());
        (inv, events)
    }
}

fn open_nvml() -> Backend {
    match Nvml::init() {
        Ok(nvml) => {
            // One NVML handle lives for the whole process; leaking it lets devices and the event
            // set borrow it for 'static.
            let nvml: &'static Nvml = Box::leak(Box::new(nvml));
            let backend = NvmlBackend::discover(nvml);
            info!(gpus = backend.gpus.len(), driver = ?backend.driver_version, "NVML GPU discovery");
            Backend::Nvml(Box::new(backend))
        }
        Err(NvmlError::NoPermission) => {
            let n = count_device_nodes();
            let msg = format!(
                "NVML refused access (permission denied); {n} NVIDIA device node(s) in /dev reported as degraded"
            );
            warn!("{msg}");
            Backend::None(permission_denied_inventory(n, msg))
        }
        Err(e) => {
            let why = match &e {
                NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                    "libnvidia-ml.so.1 not found (no NVIDIA driver on this host)".to_string()
                }
                NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_string(),
                other => format!("NVML failed to start: {other}"),
            };
            let msg = format!("no GPUs: {why}");
            info!("{msg}");
            Backend::None(GpuInventory::none(msg))
        }
    }
}

fn count_device_nodes() -> u32 {
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia")
                        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                })
                .count() as u32
        })
        .unwrap_or(0)
}

/// GPUs we know exist but cannot read are degraded, not absent.
fn permission_denied_inventory(n: u32, msg: String) -> GpuInventory {
    let mut inv = GpuInventory::none(msg);
    inv.source = Source::Nvml;
    inv.gpus = (0..n)
        .map(|index| Gpu {
            index,
            uuid: format!("unknown-{index}"),
            name: "unknown (NVML permission denied)".to_string(),
            memory: Memory::default(),
            pci_bus_id: String::new(),
            pcie: None,
            compute_capability: None,
            architecture: None,
            mig: Mig {
                mode: MigState::Unsupported,
                pending: None,
                instances: Vec::new(),
            },
            numa_node: None,
            nvlink_peers: None,
            telemetry: Telemetry::default(),
            ecc: None,
            retired_pages: None,
            remapped_rows: None,
            xid_errors: Vec::new(),
            lost: false,
            query_errors: vec!["NVML: permission denied".to_string()],
            health: Health::Degraded,
            health_reasons: Vec::new(),
        })
        .collect();
    inv
}

/// Collects the outcome of optional queries: unsupported is `None`; anything else is noted.
struct Query<'a> {
    errors: &'a mut Vec<String>,
    lost: &'a mut bool,
}

impl Query<'_> {
    fn opt<T>(&mut self, what: &str, r: Result<T, NvmlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(
                NvmlError::NotSupported
                | NvmlError::FunctionNotFound
                | NvmlError::FailedToLoadSymbol(_)
                | NvmlError::NotFound
                | NvmlError::InvalidArg,
            ) => None,
            Err(NvmlError::GpuLost) => {
                *self.lost = true;
                None
            }
            Err(NvmlError::NoPermission) => {
                self.errors.push(format!("{what}: permission denied"));
                None
            }
            Err(e) => {
                self.errors.push(format!("{what}: {e}"));
                None
            }
        }
    }
}

struct NvmlBackend {
    nvml: &'static Nvml,
    driver_version: Option<String>,
    nvml_version: Option<String>,
    cuda_driver_version: Option<String>,
    /// Static facts per GPU, with telemetry refreshed by `sample`.
    gpus: Vec<Gpu>,
    events: Option<EventSet<'static>>,
    message: Option<String>,
}

impl NvmlBackend {
    fn discover(nvml: &'static Nvml) -> Self {
        let driver_version = nvml.sys_driver_version().ok();
        let nvml_version = nvml.sys_nvml_version().ok();
        let cuda_driver_version = nvml
            .sys_cuda_driver_version()
            .ok()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        let mut message = None;
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                message = Some(format!("NVML could not count GPUs: {e}"));
                0
            }
        };
        let mut gpus = Vec::new();
        let mut events = nvml.create_event_set().ok();
        for index in 0..count {
            let mut errors = Vec::new();
            let mut lost = false;
            let device = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    lost = matches!(e, NvmlError::GpuLost);
                    errors.push(format!("device handle: {e}"));
                    gpus.push(unreadable(index, errors, lost));
                    continue;
                }
            };
            let g = static_facts(&device, index, &mut errors, &mut lost);
            if let Some(set) = events.take() {
                events = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(set) => Some(set),
                    // The set is consumed on failure; start a new one for the other GPUs.
                    Err(_) => nvml.create_event_set().ok(),
                };
            }
            gpus.push(g);
        }
        NvmlBackend {
            nvml,
            driver_version,
            nvml_version,
            cuda_driver_version,
            gpus,
            events,
            message,
        }
    }

    fn sample(&mut self) -> GpuInventory {
        self.drain_xids();
        for g in &mut self.gpus {
            let mut errors = Vec::new();
            let mut lost = false;
            match self.nvml.device_by_index(g.index) {
                Ok(d) => telemetry(&d, self.nvml, g, &mut errors, &mut lost),
                Err(e) => {
                    lost = true;
                    errors.push(format!("device handle: {e}"));
                }
            }
            g.query_errors = errors;
            g.lost = lost;
        }
        GpuInventory {
            source: Source::Nvml,
            driver_version: self.driver_version.clone(),
            nvml_version: self.nvml_version.clone(),
            cuda_driver_version: self.cuda_driver_version.clone(),
            gpus: self.gpus.clone(),
            message: self.message.clone(),
            sample_cost_us: 0,
        }
    }

    /// Takes every pending critical-Xid event without blocking.
    fn drain_xids(&mut self) {
        let Some(set) = &self.events else { return };
        for _ in 0..64 {
            match set.wait(0) {
                Ok(ev) => {
                    let Ok(i) = ev.device.index() else { continue };
                    if let (Some(g), Some(XidError::Value(x))) =
                        (self.gpus.get_mut(i as usize), ev.event_data)
                    {
                        warn!(gpu = i, xid = x, "NVML reported a critical Xid error");
                        g.xid_errors.push(x);
                        if g.xid_errors.len() > XIDS_KEPT_MAX {
                            g.xid_errors.remove(0);
                        }
                    }
                }
                Err(_) => break,
            }
        }
    }
}

fn unreadable(index: u32, errors: Vec<String>, lost: bool) -> Gpu {
    let mut g = permission_denied_inventory(1, String::new()).gpus.remove(0);
    g.index = index;
    g.uuid = format!("unreadable-{index}");
    g.name = "unreadable".to_string();
    g.query_errors = errors;
    g.lost = lost;
    g
}

fn static_facts(d: &Device<'static>, index: u32, errors: &mut Vec<String>, lost: &mut bool) -> Gpu {
    let mut q = Query { errors, lost };
    let uuid = q
        .opt("uuid", d.uuid())
        .unwrap_or_else(|| format!("unknown-{index}"));
    let name = q.opt("name", d.name()).unwrap_or_default();
    let pci_bus_id = q
        .opt("pci info", d.pci_info())
        .map(|p| p.bus_id)
        .unwrap_or_default();
    let pcie = match (
        q.opt("pcie max generation", d.max_pcie_link_gen()),
        q.opt("pcie max width", d.max_pcie_link_width()),
    ) {
        (Some(generation), Some(width)) => Some(Pcie {
            generation,
            width,
            current_generation: None,
            current_width: None,
        }),
        _ => None,
    };
    let compute_capability = q
        .opt("compute capability", d.cuda_compute_capability())
        .map(|c| format!("{}.{}", c.major, c.minor));
    let architecture = q
        .opt("architecture", d.architecture())
        .map(|a| a.to_string());
    let numa_node = q.opt("numa node", d.numa_node_id());
    let mig = match q.opt("mig mode", d.mig_mode()) {
        None => Mig {
            mode: MigState::Unsupported,
            pending: None,
            instances: Vec::new(),
        },
        Some(m) => {
            let state = |v: u32| {
                if v == 1 {
                    MigState::Enabled
                } else {
                    MigState::Disabled
                }
            };
            let mut instances = Vec::new();
            if m.current == 1 {
                let max = q.opt("mig device count", d.mig_device_count()).unwrap_or(0);
                for i in 0..max {
                    let Ok(md) = d.mig_device_by_index(i) else {
                        continue;
                    };
                    let Ok(uuid) = md.uuid() else { continue };
                    let total = md.memory_info().map(|m| m.total).unwrap_or(0);
                    instances.push(MigInstance {
                        uuid,
                        memory_total_bytes: total,
                    });
                }
            }
            Mig {
                mode: state(m.current),
                pending: (m.pending != m.current).then(|| state(m.pending)),
                instances,
            }
        }
    };
    let nvlink_peers = nvlink_peers(d);
    let mut g = Gpu {
        index,
        uuid,
        name,
        memory: Memory::default(),
        pci_bus_id,
        pcie,
        compute_capability,
        architecture,
        mig,
        numa_node,
        nvlink_peers,
        telemetry: Telemetry::default(),
        ecc: None,
        retired_pages: None,
        remapped_rows: None,
        xid_errors: Vec::new(),
        lost: *q.lost,
        query_errors: Vec::new(),
        health: Health::Healthy,
        health_reasons: Vec::new(),
    };
    g.query_errors = std::mem::take(q.errors);
    g
}

/// Remote PCI bus ids of active links; `None` when NVLink is not supported at all.
fn nvlink_peers(d: &Device<'static>) -> Option<Vec<String>> {
    let mut supported = false;
    let mut peers = Vec::new();
    for link in 0..NVLINK_LINKS_MAX {
        let l = d.link_wrapper_for(link);
        let Ok(active) = l.is_active() else { continue };
        supported = true;
        let remote = if active {
            l.remote_pci_info().ok()
        } else {
            None
        };
        if let Some(p) = remote.filter(|p| !peers.contains(&p.bus_id)) {
            peers.push(p.bus_id);
        }
    }
    supported.then_some(peers)
}

/// The per-sample reads: a fixed set of NVML calls per GPU.
fn telemetry(
    d: &Device<'static>,
    nvml: &'static Nvml,
    g: &mut Gpu,
    errors: &mut Vec<String>,
    lost: &mut bool,
) {
    let mut q = Query { errors, lost };
    if let Some(m) = q.opt("memory", d.memory_info()) {
        g.memory = Memory {
            total_bytes: m.total,
            used_bytes: m.used,
            free_bytes: m.free,
        };
    }
    if let Some(p) = g.pcie.as_mut() {
        p.current_generation = q.opt("pcie generation", d.current_pcie_link_gen());
        p.current_width = q.opt("pcie width", d.current_pcie_link_width());
    }
    let util = q.opt("utilization", d.utilization_rates());
    g.telemetry = Telemetry {
        temperature_c: q.opt("temperature", d.temperature(TemperatureSensor::Gpu)),
        power_w: q
            .opt("power", d.power_usage())
            .map(|mw| f64::from(mw) / 1000.0),
        power_limit_w: q
            .opt("power limit", d.enforced_power_limit())
            .map(|mw| f64::from(mw) / 1000.0),
        utilization_gpu_pct: util.as_ref().map(|u| u.gpu),
        utilization_memory_pct: util.as_ref().map(|u| u.memory),
    };
    g.ecc = q.opt("ecc mode", d.is_ecc_enabled()).map(|m| {
        let enabled = m.currently_enabled;
        let mut count = |e: MemoryError, c: EccCounter| {
            if enabled {
                q.opt("ecc errors", d.total_ecc_errors(e, c))
            } else {
                None
            }
        };
        Ecc {
            enabled,
            corrected_volatile: count(MemoryError::Corrected, EccCounter::Volatile),
            uncorrected_volatile: count(MemoryError::Uncorrected, EccCounter::Volatile),
            corrected_aggregate: count(MemoryError::Corrected, EccCounter::Aggregate),
            uncorrected_aggregate: count(MemoryError::Uncorrected, EccCounter::Aggregate),
        }
    });
    g.retired_pages = match (
        q.opt(
            "retired pages",
            d.retired_pages(RetirementCause::MultipleSingleBitEccErrors),
        ),
        q.opt(
            "retired pages",
            d.retired_pages(RetirementCause::DoubleBitEccError),
        ),
    ) {
        (Some(s), Some(db)) => Some(RetiredPages {
            single_bit: s.len() as u32,
            double_bit: db.len() as u32,
            pending: q
                .opt("pending retirement", d.are_pages_pending_retired())
                .unwrap_or(false),
        }),
        _ => None,
    };
    g.remapped_rows = remapped_rows(nvml, d).and_then(|r| q.opt("remapped rows", r));
}

/// nvml-wrapper 0.13 has no safe wrapper for nvmlDeviceGetRemappedRows (Ampere and later), so
/// it is called through the loaded library's symbol table.
fn remapped_rows(
    nvml: &'static Nvml,
    d: &Device<'static>,
) -> Option<Result<RemappedRows, NvmlError>> {
    let f = nvml.lib().nvmlDeviceGetRemappedRows.as_ref().ok()?;
    let (mut corr, mut unc, mut pending, mut failed) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: the symbol comes from the loaded NVML library with the signature nvml-wrapper-sys
    // declares; the device handle is valid for 'static (NVML is never shut down), and the four
    // out-pointers point to live locals.
    let ret = unsafe { f(d.handle(), &mut corr, &mut unc, &mut pending, &mut failed) };
    Some(nvml_wrapper::error::nvml_try(ret).map(|()| RemappedRows {
        corrected: corr,
        uncorrected: unc,
        pending: pending != 0,
        failed: failed != 0,
    }))
}

/// How long sampling `n` times takes on average: for the documentation of sampling cost.
pub fn measure_sample_cost(d: &mut GpuDiscovery, n: u32) -> Duration {
    let start = Instant::now();
    for _ in 0..n.max(1) {
        let _ = d.sample();
    }
    start.elapsed() / n.max(1)
}
