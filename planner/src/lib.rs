//! `pd-planner`: decides how many prefill and decode engines a deployment needs.
//!
//! Owns: model and system catalogs, the roofline performance model, the serving simulator and
//! the layout search. Must never: do IO, read the clock or spawn threads.
//!
//! The parts, bottom up: [`model`] and [`system`] (catalogs, Hugging Face `config.json`,
//! NVML names), [`perf`] (step times, memory fit, KV transfer, calibration from measured step
//! times), [`workload`] (arrivals and latency targets), [`sim`] (a discrete-event simulator of
//! one layout) and [`search`] (xPyD and parallelism, disaggregated and colocated, over one or
//! several GPU types), and [`autoplan`] (re-planning a running deployment from one measured
//! window: one move or none, under bounds, a threshold, a cool-down and a forecast check). The CLI (`pdctl plan`) reads files and prints; this crate only
//! computes, deterministically.
//!
//! Architecture invariant: nothing here is `Serialize` and nothing takes a path — the CLI
//! (and later the coordinator) own the formats; `config.json` comes in as text. The same
//! inputs and seed give the same plan on every run.

#![forbid(unsafe_code)]

pub mod autoplan;
mod dtype;
mod error;
pub mod model;
pub mod perf;
mod rng;
pub mod search;
pub mod sim;
pub mod system;
pub mod workload;

pub use dtype::{Dtype, Dtypes};
pub use error::PlanError;
pub use model::{ModelSpec, find_model, parse_hf_config};
pub use perf::{
    Calibration, DecodeSample, Efficiency, PerfModel, PrefillSample, StepCost, StepLoad,
};
pub use search::{Candidate, FrontierPoint, GoodputSearch, GpuPool, Plan, PlanRequest, plan};
pub use sim::{Layout, Role, SimReport, Summary, WorkerGroup, simulate, simulate_after};
pub use system::{SystemSpec, find_system, system_for_nvml_name};
pub use workload::{LengthDist, Request, SLO_ATTAINMENT_TARGET, Slo, Workload};
