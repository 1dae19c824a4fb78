//! Custody of the cluster CA key on this host.
//!
//! The key lives in `<data_dir>/ca.key` (mode 0600) only while this agent is a Raft voter: the
//! first host gets it from the operator (`pdagent run --bootstrap --ca-key FILE`, or the file
//! copied there), a learner promoted to voter fetches it from the coordinator over mutual TLS,
//! and a voter demoted to learner deletes it. It is never part of the replicated state, so
//! learners never receive it. With the key an agent can check join tokens and sign
//! certificates (enrollment, renewal); without it, it forwards those to the coordinator.
//!
//! Also here: the PKI duties every agent runs (`custody_loop`): the revocation list copied into
//! the transport, this node's certificate recorded in the cluster, custody kept in step with
//! the voter set.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pd_raft::Command;
use pd_raft::network::node_id;
use pd_transport::PeerIdentity;
use pd_transport::pki::CertAuthority;
use tracing::{info, warn};

use crate::control::{CONTROL_RPC_TIMEOUT, CallError, ControlPlane};
use crate::util::Unpoisoned;
use crate::wire::{AgentRequest, AgentResponse};

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
        self.held.locked().clone()
    }

    pub fn holds_key(&self) -> bool {
        self.authority().is_some()
    }

    /// Takes custody of `key_pem` (checked against the CA certificate first).
    pub fn store(&self, key_pem: &str) -> Result<(), String> {
        let ca = CertAuthority::from_pem(&self.ca_cert_pem, key_pem).map_err(|e| e.to_string())?;
        crate::util::write_atomic(&self.path, key_pem, true)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        *self.held.locked() = Some(Arc::new(ca));
        Ok(())
    }

    /// Gives up custody: forgets the key and deletes the file. Returns whether it was held.
    pub fn discard(&self) -> Result<bool, String> {
        let was = self.held.locked().take().is_some();
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(was),
            Err(e) => Err(format!("cannot delete {}: {e}", self.path.display())),
        }
    }
}

/// The PKI duties every agent runs each `every`: copy the replicated revocation list into the
/// transport, make sure the cluster knows this node's certificate, and keep CA key custody in
/// step with the voter set.
pub async fn custody_loop(control: Arc<ControlPlane>, custody: Arc<CaCustody>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        sync_revocations(&control);
        if let Err(e) = record_certificate(&control).await {
            tracing::debug!(error = %e, "certificate not recorded yet");
        }
        if let Err(e) = keep_custody(&control, &custody).await {
            tracing::debug!(error = %e, "CA key custody not settled yet");
        }
    }
}

/// Copies the replicated revocation list into the transport, which checks it on every new
/// connection.
fn sync_revocations(control: &ControlPlane) {
    let revoked: Vec<String> = control.read_state(|s| s.revoked_serials.iter().cloned().collect());
    let list = control.endpoint().revocations();
    if list.replace(revoked) {
        info!(revoked = list.len(), "revocation list updated");
    }
}

/// Makes sure the cluster knows this node's certificate, so that removing the node revokes
/// it (certificates issued offline are learnt this way).
async fn record_certificate(control: &ControlPlane) -> Result<(), String> {
    let info = control.endpoint().identity().info;
    let me = &control.me.name;
    let known = control.read_state(|s| {
        !s.nodes.contains_key(me)
            || s.certificates
                .get(me)
                .is_some_and(|c| c.contains_key(&info.serial_hex))
    });
    if known {
        return Ok(());
    }
    control
        .submit(Command::RecordCertificate {
            node: me.clone(),
            cert_serial: info.serial_hex,
            not_after_unix: info.not_after_unix,
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// CA key custody follows the voter set: a voter without the key fetches it from the
/// coordinator; a learner that still holds it deletes it.
/// A node removed from the cluster deletes it too, once it learns of the removal (from its
/// own copy of the state, or from a peer that refuses it).
async fn keep_custody(control: &ControlPlane, custody: &CaCustody) -> Result<(), String> {
    if control.peers().told_removed() || control.is_removed(&control.me.name) {
        if custody.discard()? {
            warn!("this node was removed from the cluster: deleted its copy of the CA key");
        }
        return Ok(());
    }
    let id = control.id;
    let (voter, learner) = control.membership(|m| {
        (
            m.voter_ids().any(|v| v == id),
            m.learner_ids().any(|l| l == id),
        )
    });
    if learner && custody.holds_key() {
        custody.discard()?;
        info!("this agent is no longer a voter: deleted its copy of the CA key");
        return Ok(());
    }
    if !voter || custody.holds_key() {
        return Ok(());
    }
    match control
        .call_coordinator(&AgentRequest::FetchCaKey, CONTROL_RPC_TIMEOUT)
        .await
    {
        Ok(AgentResponse::CaKey { key_pem }) => {
            custody.store(&key_pem)?;
            info!(path = %custody.path().display(), "this voter now holds the CA key");
            Ok(())
        }
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(CallError::NoCoordinator) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Hands the CA key to a voter that asks (coordinator only).
pub fn ca_key_for(
    control: &ControlPlane,
    custody: &CaCustody,
    requester: &PeerIdentity,
) -> Result<AgentResponse, String> {
    let PeerIdentity::Node(name) = requester else {
        return Err("only agents hold the CA key".into());
    };
    if !control.is_coordinator() {
        return Ok(control.not_coordinator());
    }
    let id = node_id(name);
    if !control.membership(|m| m.voter_ids().any(|v| v == id)) {
        return Err(format!(
            "{name} is not a voter; only voters hold the CA key"
        ));
    }
    let ca = custody
        .authority()
        .ok_or("the coordinator does not hold the CA key either")?;
    info!(node = %name, "handing the CA key to a voter");
    Ok(AgentResponse::CaKey {
        key_pem: ca.key_pem(),
    })
}
