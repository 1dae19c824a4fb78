//! `pd-nvml`: the GPU inventory.
//!
//! Owns: NVML discovery (through nvml-wrapper, which loads libnvidia-ml.so.1 at run time),
//! periodic telemetry sampling, GPU health (healthy, degraded, failed) and its change events,
//! and fixture inventories from TOML for hosts and tests without GPUs.
//!
//! Must never: be linked at build time to libnvidia-ml, or take the agent down: a missing
//! library or driver is zero GPUs with a message; a permission error is degraded GPUs.

pub mod discover;
pub mod fixture;
pub mod health;
pub mod model;

pub use discover::GpuDiscovery;
pub use fixture::{Fixture, FixtureError};
pub use health::{HealthEvent, HealthThresholds};
pub use model::*;
