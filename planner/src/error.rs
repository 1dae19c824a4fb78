//! The planner's one error type. Every variant carries the input that was refused, so the CLI
//! can print it as it is and exit with `EX_USAGE`.

/// What the planner refuses, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown model {name:?}; known models: {known} (or give a folder with a config.json)")]
    UnknownModel { name: String, known: String },
    #[error("unknown system {name:?}; known systems: {known}")]
    UnknownSystem { name: String, known: String },
    #[error("unknown dtype {name:?}; known dtypes: bf16, fp8, int4")]
    UnknownDtype { name: String },
    #[error("{dtype} is not a KV-cache dtype: the KV cache is stored in bf16 or fp8")]
    KvDtype { dtype: String },
    #[error("config.json is not valid JSON: {reason}")]
    ConfigSyntax { reason: String },
    #[error("config.json lacks the field {field:?} ({what})")]
    MissingField {
        field: &'static str,
        what: &'static str,
    },
    #[error("config.json field {field:?} is {value}, expected {expected}")]
    BadField {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("calibration needs {needed}; got {got}")]
    Calibration { needed: &'static str, got: String },
    #[error("no {mode} layout fits: {reason}")]
    NoLayout { mode: &'static str, reason: String },
}

impl PlanError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        PlanError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
