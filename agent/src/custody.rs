//! Custody of the cluster CA key on this host.
//!
//! The key lives in `<data_dir>/ca.key` (mode 0600) only while this agent is a Raft voter: the
//! first host gets it from the operator (`pdagent run --bootstrap --ca-key FILE`, or the file
//! copied there), a learner promoted to voter fetches it from the coordinator over mutual TLS,
//! and a voter demoted to learner deletes it. It is never part of the replicated state, so
//! learners never receive it. With the key an agent can check join tokens and sign
//! certificates (enrollment, renewal); without it, it forwards those to the coordinator.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pd_transport::pki::CertAuthority;

/// The custody file's name under the data dir.
pub const CA_KEY_FILE: &str = "ca.key";

pub struct CaCustody {
    path: PathBuf,
    ca_cert_pem: String,
    held: Mutex<Option<Arc<CertAuthority>>>,
}

impl CaCustody {
    /// Opens custody under `data_dir`, loading the key if this host holds it. A key that does
    /// not belong to the cluster CA is an error, not something to ignore.
    pub fn open(data_dir: &Path, ca_cert_pem: &str) -> Result<Self, String> {
        let path = data_dir.join(CA_KEY_FILE);
        let held = match std::fs::read_to_string(&path) {
            Ok(key) => Some(Arc::new(
                CertAuthority::from_pem(ca_cert_pem, &key)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(CaCustody {
            path,
            ca_cert_pem: ca_cert_pem.to_string(),
            held: Mutex::new(held),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The CA, when this host holds its key.
    pub fn authority(&self) -> Option<Arc<CertAuthority>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn holds_key(&self) -> bool {
        self.authority().is_some()
    }

    /// Takes custody of `key_pem` (checked against the CA certificate first).
    pub fn store(&self, key_pem: &str) -> Result<(), String> {
        let ca = CertAuthority::from_pem(&self.ca_cert_pem, key_pem).map_err(|e| e.to_string())?;
        crate::enrollment::write_atomic(&self.path, key_pem, true)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ca));
        Ok(())
    }

    /// Gives up custody: forgets the key and deletes the file. Returns whether it was held.
    pub fn discard(&self) -> Result<bool, String> {
        let was = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(was),
            Err(e) => Err(format!("cannot delete {}: {e}", self.path.display())),
        }
    }
}
