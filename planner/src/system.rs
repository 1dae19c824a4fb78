//! GPU systems: the built-in catalog of published peak figures, the mapping from NVML's GPU
//! names to it, and hosts described by measurements alone.

use crate::{Dtype, PlanError};

/// One GPU of a system, with the links it has to its peers.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemSpec {
    pub name: String,
    /// Peak dense (not 2:4-sparse) tensor throughput in bf16.
    pub bf16_flops_per_s: f64,
    /// Peak dense fp8 tensor throughput; `None` where the GPU has no fp8 tensor cores (A100:
    /// fp8 weights are dequantized and computed in bf16).
    pub fp8_flops_per_s: Option<f64>,
    pub hbm_bytes_per_s: f64,
    pub hbm_bytes: f64,
    /// NVLink bandwidth per GPU and direction (half the "bidirectional" figure NVIDIA quotes).
    pub nvlink_bytes_per_s: f64,
    /// The GPU's own NIC (DGX/HGX: one per GPU), per direction.
    pub network_bytes_per_s: f64,
    /// GPUs that share one NVLink domain: the largest tensor-parallel group.
    pub gpus_per_node: u32,
}

const GB: f64 = 1e9;
const TB: f64 = 1e12;

/// The built-in systems: NVIDIA's published figures for the SXM parts in DGX/HGX hosts
/// (8 GPUs, NVSwitch, one NIC per GPU: 200 Gb/s HDR on A100, 400 Gb/s NDR after).
pub fn catalog() -> Vec<SystemSpec> {
    vec![
        SystemSpec {
            name: "a100_sxm".into(),
            bf16_flops_per_s: 312.0 * TB,
            fp8_flops_per_s: None,
            hbm_bytes_per_s: 2.039 * TB,
            hbm_bytes: 80.0 * GB,
            nvlink_bytes_per_s: 300.0 * GB,
            network_bytes_per_s: 25.0 * GB,
            gpus_per_node: 8,
        },
        SystemSpec {
            name: "h100_sxm".into(),
            bf16_flops_per_s: 989.0 * TB,
            fp8_flops_per_s: Some(1979.0 * TB),
            hbm_bytes_per_s: 3.35 * TB,
            hbm_bytes: 80.0 * GB,
            nvlink_bytes_per_s: 450.0 * GB,
            network_bytes_per_s: 50.0 * GB,
            gpus_per_node: 8,
        },
        SystemSpec {
            name: "h200_sxm".into(),
            bf16_flops_per_s: 989.0 * TB,
            fp8_flops_per_s: Some(1979.0 * TB),
            hbm_bytes_per_s: 4.8 * TB,
            hbm_bytes: 141.0 * GB,
            nvlink_bytes_per_s: 450.0 * GB,
            network_bytes_per_s: 50.0 * GB,
            gpus_per_node: 8,
        },
        SystemSpec {
            name: "b200_sxm".into(),
            bf16_flops_per_s: 2250.0 * TB,
            fp8_flops_per_s: Some(4500.0 * TB),
            hbm_bytes_per_s: 8.0 * TB,
            hbm_bytes: 180.0 * GB,
            nvlink_bytes_per_s: 900.0 * GB,
            network_bytes_per_s: 50.0 * GB,
            gpus_per_node: 8,
        },
    ]
}

/// Finds a catalog system by name, ignoring case; the error lists the known names.
pub fn find_system(name: &str) -> Result<SystemSpec, PlanError> {
    let all = catalog();
    all.iter()
        .find(|s| s.name.eq_ignore_ascii_case(name.trim()))
        .cloned()
        .ok_or_else(|| PlanError::UnknownSystem {
            name: name.into(),
            known: all
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The system of a GPU as NVML names it ("NVIDIA H100 80GB HBM3"). `None` for parts whose
/// figures differ from the catalog's SXM entries (PCIe and NVL cards, 40 GB A100s).
pub fn system_for_nvml_name(nvml_name: &str) -> Option<SystemSpec> {
    let n = nvml_name.trim().to_ascii_uppercase();
    let name = if n.contains("PCIE") || n.contains("NVL") {
        return None;
    } else if n.contains("A100") && n.contains("SXM") && n.contains("80GB") {
        "a100_sxm"
    } else if n.contains("H100") && (n.contains("HBM3") || n.contains("SXM")) {
        "h100_sxm"
    } else if n.contains("H200") {
        "h200_sxm"
    } else if n.contains("B200") {
        "b200_sxm"
    } else {
        return None;
    };
    find_system(name).ok()
}

impl SystemSpec {
    /// A host known only by measurement (the reference engine on a CPU): no peak figures, so
    /// only a `Calibration` can give its step times. `memory_bytes` is what the engine may use
    /// for weights and KV.
    pub fn measured_host(name: &str, memory_bytes: f64, network_bytes_per_s: f64) -> Self {
        SystemSpec {
            name: name.into(),
            bf16_flops_per_s: 0.0,
            fp8_flops_per_s: None,
            hbm_bytes_per_s: 0.0,
            hbm_bytes: memory_bytes,
            nvlink_bytes_per_s: 0.0,
            network_bytes_per_s,
            gpus_per_node: 1,
        }
    }

    /// Whether this system has peak figures a roofline can use.
    pub fn has_peaks(&self) -> bool {
        self.bf16_flops_per_s > 0.0 && self.hbm_bytes_per_s > 0.0
    }

    /// Peak throughput of the matrix multiplies for `weights`: fp8 weights run fp8 GEMMs
    /// where the GPU has them; int4 weights are dequantized to bf16.
    pub fn peak_flops_per_s(&self, weights: Dtype) -> f64 {
        match (weights, self.fp8_flops_per_s) {
            (Dtype::Fp8, Some(f)) => f,
            _ => self.bf16_flops_per_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_match_anchors() {
        let h100 = find_system("H100_SXM").unwrap();
        assert_eq!(h100.bf16_flops_per_s, 989e12);
        assert_eq!(h100.hbm_bytes_per_s, 3.35e12);
        assert_eq!(h100.hbm_bytes, 80e9);
        let h200 = find_system("h200_sxm").unwrap();
        assert_eq!(
            (h200.bf16_flops_per_s, h200.hbm_bytes_per_s),
            (989e12, 4.8e12)
        );
        assert_eq!(h200.hbm_bytes, 141e9);
        assert_eq!(h200.peak_flops_per_s(Dtype::Fp8), 1979e12);
        assert_eq!(h200.peak_flops_per_s(Dtype::Int4), 989e12);
        let a100 = find_system("a100_sxm").unwrap();
        assert_eq!(a100.peak_flops_per_s(Dtype::Fp8), 312e12);
    }

    #[test]
    fn nvml_names_map_to_systems() {
        let sys = |n: &str| system_for_nvml_name(n).map(|s| s.name);
        assert_eq!(sys("NVIDIA H100 80GB HBM3").as_deref(), Some("h100_sxm"));
        assert_eq!(sys("NVIDIA H200").as_deref(), Some("h200_sxm"));
        assert_eq!(sys("NVIDIA A100-SXM4-80GB").as_deref(), Some("a100_sxm"));
        assert_eq!(sys("NVIDIA B200").as_deref(), Some("b200_sxm"));
        assert_eq!(sys("NVIDIA H100 PCIe"), None);
        assert_eq!(sys("NVIDIA A100-SXM4-40GB"), None);
        assert_eq!(sys("Tesla T4"), None);
    }

    #[test]
    fn unknown_system_lists_the_catalog() {
        match find_system("mi300x") {
            Err(PlanError::UnknownSystem { known, .. }) => {
                assert_eq!(known, "a100_sxm, h100_sxm, h200_sxm, b200_sxm")
            }
            other => panic!("{other:?}"),
        }
    }
}
