//! Number formats of weights, KV cache and compute.

use std::fmt;
use std::str::FromStr;

use crate::PlanError;

/// A storage format for weights or the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bf16,
    Fp8,
    /// 4-bit weights (GPTQ/AWQ/MXFP4 style). Computed in bf16: the kernels dequantize.
    Int4,
}

impl Dtype {
    /// Bytes per element including the per-group scales that quantized formats carry
    /// (int4: one 8-bit scale per 32 weights, as MXFP4 does, so 4.25 bits).
    pub fn bytes(self) -> f64 {
        match self {
            Dtype::Bf16 => 2.0,
            Dtype::Fp8 => 1.0,
            Dtype::Int4 => 4.25 / 8.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
            Dtype::Int4 => "int4",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" | "fp16" | "float16" => Ok(Dtype::Bf16),
            "fp8" | "float8" | "fp8_e4m3" | "e4m3" => Ok(Dtype::Fp8),
            "int4" | "w4a16" | "mxfp4" => Ok(Dtype::Int4),
            _ => Err(PlanError::UnknownDtype { name: s.into() }),
        }
    }
}

/// The formats of one deployment: weights and KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtypes {
    pub weights: Dtype,
    pub kv: Dtype,
}

impl Dtypes {
    /// Refuses int4 for the KV cache: no engine stores it that way.
    pub fn new(weights: Dtype, kv: Dtype) -> Result<Self, PlanError> {
        if kv == Dtype::Int4 {
            return Err(PlanError::KvDtype {
                dtype: kv.to_string(),
            });
        }
        Ok(Dtypes { weights, kv })
    }

    pub fn bf16() -> Self {
        Dtypes {
            weights: Dtype::Bf16,
            kv: Dtype::Bf16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_case_insensitively_and_refuses_int4_kv() {
        assert_eq!("BF16".parse::<Dtype>().unwrap(), Dtype::Bf16);
        assert_eq!("fp8".parse::<Dtype>().unwrap(), Dtype::Fp8);
        assert_eq!("Int4".parse::<Dtype>().unwrap(), Dtype::Int4);
        assert!(matches!(
            "fp4x".parse::<Dtype>(),
            Err(PlanError::UnknownDtype { .. })
        ));
        assert!(matches!(
            Dtypes::new(Dtype::Int4, Dtype::Int4),
            Err(PlanError::KvDtype { .. })
        ));
        assert!(Dtypes::new(Dtype::Int4, Dtype::Fp8).is_ok());
    }
}
