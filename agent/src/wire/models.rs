//! A host's answer about a deployment's model folder.

use serde::{Deserialize, Serialize};

/// What one agent found for a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCheck {
    /// The folder it looked at.
    pub path: String,
    /// The checkpoint fingerprint, when the folder is there and readable.
    pub fingerprint: Option<String>,
    /// Why not, otherwise.
    pub why: Option<String>,
}
