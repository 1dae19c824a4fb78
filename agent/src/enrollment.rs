//! Certificates the agent obtains for itself: enrollment with a join token on a host's first
//! start, serving enrollment for other hosts (the coordinator signs), and renewal before
//! expiry. The protocol itself is `pd_transport::enroll`.
//!
//! Files: the CA certificate, node certificate and node key go to the configured `tls.*` paths
//! (by default under `<data_dir>/pki/`), each written whole to a temporary file and renamed
//! into place; the key with mode 0600.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pd_transport::Identity;
use pd_transport::enroll::{EnrollHandler, EnrollRequest, Enrolled, Refusal, request_certificate};
use pd_transport::pki::{self, CertInfo};
use tracing::{info, warn};

use crate::config::Validated;
use crate::util::{now_unix, write_atomic};
use pd_raft::Command;
use pd_raft::network::node_id;
use pd_transport::PeerIdentity;
use pd_transport::pki::Validity;

use crate::control::{ControlPlane, FORWARD_TIMEOUT, WriteError};
use crate::custody::CaCustody;
use crate::wire::{AgentRequest, AgentResponse};

/// Bound on one enrollment exchange with a seed.
const ENROLL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(25);
/// Pauses between rounds over the seeds while no seed can enroll us yet.
const ENROLL_RETRY_MIN: Duration = Duration::from_millis(500);
const ENROLL_RETRY_MAX: Duration = Duration::from_secs(5);
/// A certificate is renewed when less than a third of its lifetime is left, and at the latest
/// this long before it expires.
pub const RENEW_BEFORE_MAX_SECS: i64 = 30 * 86_400;
/// How often the renewal loop looks at the certificate while it is not due.
const RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Whether none of the node's credential files exist yet (a host that has never enrolled).
pub fn credentials_absent(v: &Validated) -> bool {
    [&v.ca_cert, &v.node_cert, &v.node_key]
        .iter()
        .all(|p| !p.exists())
}

/// Enrolls this host through its seeds with `token`: makes a key pair, sends the certificate
/// request, writes the credentials. Retries while seeds cannot answer yet; gives up at once on
/// a refusal that will not change (expired or foreign token, name taken), with its reason.
pub async fn enroll_at_start(v: &Validated, token: &str) -> Result<(), String> {
    let (csr, key) = pki::node_csr(&v.node_name).map_err(|e| e.to_string())?;
    let mut pause = ENROLL_RETRY_MIN;
    let mut round = 0u32;
    loop {
        for seed in &v.seeds {
            match request_certificate(
                seed.address,
                &seed.name,
                token,
                &v.node_name,
                &csr,
                ENROLL_ATTEMPT_TIMEOUT,
            )
            .await
            {
                Ok(got) => {
                    write_credentials(v, Some(&got.ca_pem), &got.cert_pem, &key)?;
                    info!(seed = %seed.name, node = %v.node_name, "enrolled: received this node's certificate");
                    return Ok(());
                }
                Err(e) if !e.is_retryable() => return Err(e.to_string()),
                Err(e) => {
                    if round.is_multiple_of(10) {
                        warn!(seed = %seed.name, error = %e, "cannot enroll through this seed yet; retrying");
                    }
                }
            }
        }
        round += 1;
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(ENROLL_RETRY_MAX);
    }
}

/// Writes the node's credentials to the configured paths (key first: a certificate is never
/// in place without its key).
pub fn write_credentials(
    v: &Validated,
    ca_pem: Option<&str>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), String> {
    let w = |path: &Path, content: &str, secret: bool| {
        write_atomic(path, content, secret).map_err(|e| {
            format!(
                "cannot write {}: {e} (the agent keeps its certificates where it may write: \
                 leave tls.* unset to use <data_dir>/pki/)",
                path.display()
            )
        })
    };
    if let Some(ca) = ca_pem {
        w(&v.ca_cert, ca, false)?;
    }
    w(&v.node_key, key_pem, true)?;
    w(&v.node_cert, cert_pem, false)
}

/// Signs certificates: other hosts' enrollments (here when this agent is the coordinator and
/// holds the CA key, forwarded to the coordinator otherwise) and nodes' renewals.
pub struct Signer {
    pub control: Arc<ControlPlane>,
    pub custody: Arc<CaCustody>,
    /// The cluster CA certificate (PEM), handed to enrolling hosts.
    pub ca_pem: String,
}

impl EnrollHandler for Signer {
    async fn enroll(&self, remote: SocketAddr, req: EnrollRequest) -> Result<Enrolled, Refusal> {
        info!(%remote, node = %req.node, "enrollment request");
        Signer::enroll(self, req.token, req.node, req.csr_pem).await
    }
}

impl Signer {
    /// Enrolls a host that presented a join token: signed here when this agent is the
    /// coordinator, otherwise forwarded to it.
    pub async fn enroll(
        &self,
        token: String,
        node: String,
        csr_pem: String,
    ) -> Result<Enrolled, Refusal> {
        if self.control.is_coordinator() {
            return self.enroll_here(&token, &node, &csr_pem).await;
        }
        let req = AgentRequest::Enroll {
            token,
            node,
            csr_pem,
        };
        match self.control.call_coordinator(&req, FORWARD_TIMEOUT).await {
            Ok(AgentResponse::Certificate { cert_pem, ca_pem }) => {
                Ok(Enrolled { cert_pem, ca_pem })
            }
            Ok(AgentResponse::EnrollRefused { reason, retryable }) => {
                Err(Refusal { reason, retryable })
            }
            Ok(AgentResponse::NotCoordinator { .. }) => {
                Err(Refusal::retry("the coordinator changed; retry"))
            }
            Ok(other) => Err(Refusal::retry(format!("unexpected answer {other:?}"))),
            Err(e) => Err(Refusal::retry(e.to_string())),
        }
    }

    /// The coordinator's side of an enrollment forwarded by another agent.
    pub async fn enroll_forwarded(
        &self,
        token: String,
        node: String,
        csr_pem: String,
    ) -> AgentResponse {
        if !self.control.is_coordinator() {
            return self.control.not_coordinator();
        }
        match self.enroll_here(&token, &node, &csr_pem).await {
            Ok(e) => AgentResponse::Certificate {
                cert_pem: e.cert_pem,
                ca_pem: e.ca_pem,
            },
            Err(r) => AgentResponse::EnrollRefused {
                reason: r.reason,
                retryable: r.retryable,
            },
        }
    }

    async fn enroll_here(
        &self,
        token: &str,
        node: &str,
        csr_pem: &str,
    ) -> Result<Enrolled, Refusal> {
        let ca = self.custody.authority().ok_or_else(|| {
            Refusal::retry(format!(
                "the coordinator {} does not hold the CA key (start the first host with                  `pdagent run --bootstrap --ca-key ca.key`)",
                self.control.me.name
            ))
        })?;
        let token_id = ca
            .verify_join_token(token, now_unix().max(0) as u64)
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        pki::validate_node_name(node).map_err(|e| Refusal::fatal(e.to_string()))?;
        let taken = self.control.read_state(|s| s.nodes.contains_key(node));
        if taken {
            return Err(Refusal::fatal(format!(
                "a node named {node} is already in the cluster; pick another node.name, or                  `pdctl remove {node}` first if that host is gone"
            )));
        }
        let cert_pem = ca
            .sign_node_csr(csr_pem, node, Validity::default())
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        let info = pki::first_cert_der(&cert_pem)
            .and_then(|d| pki::cert_info(&d))
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        let cmd = Command::EnrollNode {
            node: node.to_string(),
            id: node_id(node),
            cert_serial: info.serial_hex,
            not_after_unix: info.not_after_unix,
        };
        match self.control.write(cmd).await {
            Ok(_) => {}
            Err(WriteError::Refused(e)) => return Err(Refusal::fatal(e.to_string())),
            Err(e) => return Err(Refusal::retry(format!("recording the enrollment: {e}"))),
        }
        info!(%node, token = %token_id, "enrolled a host with a join token");
        Ok(Enrolled {
            cert_pem,
            ca_pem: self.ca_pem.clone(),
        })
    }

    /// Renews a node's certificate for its own name (coordinator only): signs the request and
    /// records the new serial.
    pub async fn renew(
        &self,
        requester: &PeerIdentity,
        csr_pem: &str,
    ) -> Result<AgentResponse, String> {
        let PeerIdentity::Node(node) = requester else {
            return Err("only agents renew node certificates".into());
        };
        if !self.control.is_coordinator() {
            return Ok(self.control.not_coordinator());
        }
        if self.control.is_removed(node) {
            return Err(crate::wire::removal_message(node));
        }
        let ca = self
            .custody
            .authority()
            .ok_or("the coordinator does not hold the CA key")?;
        let cert_pem = ca
            .sign_node_csr(csr_pem, node, Validity::default())
            .map_err(|e| e.to_string())?;
        let info = pki::first_cert_der(&cert_pem)
            .and_then(|d| pki::cert_info(&d))
            .map_err(|e| e.to_string())?;
        self.control
            .write(Command::RecordCertificate {
                node: node.clone(),
                cert_serial: info.serial_hex,
                not_after_unix: info.not_after_unix,
            })
            .await
            .map_err(|e| format!("recording the renewal: {e}"))?;
        info!(%node, "renewed a node's certificate");
        Ok(AgentResponse::Certificate {
            cert_pem,
            ca_pem: self.ca_pem.clone(),
        })
    }

    /// Asks the coordinator (possibly this agent) to renew this node's certificate.
    pub async fn request_renewal(&self, csr_pem: String) -> Result<(String, String), String> {
        let me = PeerIdentity::Node(self.control.me.name.clone());
        let answer = if self.control.is_coordinator() {
            self.renew(&me, &csr_pem).await?
        } else {
            self.control
                .call_coordinator(&AgentRequest::Renew { csr_pem }, FORWARD_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?
        };
        match answer {
            AgentResponse::Certificate { cert_pem, ca_pem } => Ok((cert_pem, ca_pem)),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }
}

/// Whether a certificate should be renewed now: less than a third of its lifetime left, or
/// less than `RENEW_BEFORE_MAX_SECS`.
pub fn renewal_due(info: &CertInfo, now_unix: i64) -> bool {
    let lifetime = (info.not_after_unix - info.not_before_unix).max(0);
    let remaining = info.not_after_unix - now_unix;
    remaining < (lifetime / 3).min(RENEW_BEFORE_MAX_SECS)
}

/// Renews this node's certificate before it expires: a new key pair, a request signed by the
/// coordinator over mutual TLS with the current certificate, the files replaced, and the
/// transport switched to the new certificate without a restart.
pub async fn renewal_loop(signer: Arc<Signer>, v: Validated, retry: Duration) {
    loop {
        let current = signer.control.endpoint().identity();
        if !renewal_due(&current.info, now_unix()) {
            tokio::time::sleep(RENEW_CHECK_INTERVAL).await;
            continue;
        }
        match renew_once(&signer, &v).await {
            Ok(info) => info!(
                serial = %info.serial_hex,
                not_after_unix = info.not_after_unix,
                "renewed this node's certificate"
            ),
            Err(e) => {
                warn!(error = %e, "certificate renewal failed; will retry");
                tokio::time::sleep(retry.max(Duration::from_secs(1))).await;
            }
        }
    }
}

async fn renew_once(signer: &Signer, v: &Validated) -> Result<CertInfo, String> {
    let (csr, key) = pki::node_csr(&v.node_name).map_err(|e| e.to_string())?;
    let (cert_pem, ca_pem) = signer.request_renewal(csr).await?;
    let id = Identity::from_pem(&ca_pem, &cert_pem, &key).map_err(|e| e.to_string())?;
    if id.name() != v.node_name {
        return Err(format!(
            "the coordinator issued a certificate for {}",
            id.name()
        ));
    }
    write_credentials(v, None, &cert_pem, &key)?;
    signer
        .control
        .endpoint()
        .reload(&id)
        .map_err(|e| e.to_string())?;
    Ok(id.info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_transport::PeerIdentity;

    fn info(not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            identity: PeerIdentity::Node("n".into()),
            not_before_unix: not_before,
            not_after_unix: not_after,
            serial_hex: "01".into(),
        }
    }

    #[test]
    fn renewal_is_due_in_the_last_third_or_last_30_days() {
        let day = 86_400;
        // A year-long certificate: due 30 days before expiry.
        let y = info(0, 365 * day);
        assert!(!renewal_due(&y, 300 * day));
        assert!(renewal_due(&y, 336 * day));
        // A 9-day certificate: due in its last 3 days.
        let short = info(0, 9 * day);
        assert!(!renewal_due(&short, 5 * day));
        assert!(renewal_due(&short, 6 * day + 1));
        // Expired: due (the coordinator will refuse it, the operator must re-enroll).
        assert!(renewal_due(&short, 10 * day));
    }
}
