//! Certificates the agent obtains for itself: enrollment with a join token on a host's first
//! start, serving enrollment for other hosts (the coordinator signs), and renewal before
//! expiry. The protocol itself is `pd_transport::enroll`.
//!
//! Files: the CA certificate, node certificate and node key go to the configured `tls.*` paths
//! (by default under `<data_dir>/pki/`), each written whole to a temporary file and renamed
//! into place; the key with mode 0600.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pd_transport::Identity;
use pd_transport::enroll::{EnrollHandler, EnrollRequest, Enrolled, Refusal, request_certificate};
use pd_transport::pki::{self, CertInfo};
use tracing::{info, warn};

use crate::config::Validated;
use crate::control::ControlPlane;

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

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Writes `content` to `path` through a temporary file in the same directory and a rename, so
/// a crash leaves either the old file or the new one. Secrets get mode 0600.
pub fn write_atomic(path: &Path, content: &str, secret: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

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

/// Serves other hosts' enrollments through the control plane (which signs when this agent is
/// the coordinator and forwards to the coordinator otherwise).
pub struct Enroller {
    pub control: Arc<ControlPlane>,
}

impl EnrollHandler for Enroller {
    async fn enroll(&self, remote: SocketAddr, req: EnrollRequest) -> Result<Enrolled, Refusal> {
        info!(%remote, node = %req.node, "enrollment request");
        self.control.enroll(req.token, req.node, req.csr_pem).await
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
pub async fn renewal_loop(control: Arc<ControlPlane>, v: Validated, retry: Duration) {
    loop {
        let current = control.endpoint().identity();
        if !renewal_due(&current.info, now_unix()) {
            tokio::time::sleep(RENEW_CHECK_INTERVAL).await;
            continue;
        }
        match renew_once(&control, &v).await {
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

async fn renew_once(control: &ControlPlane, v: &Validated) -> Result<CertInfo, String> {
    let (csr, key) = pki::node_csr(&v.node_name).map_err(|e| e.to_string())?;
    let (cert_pem, ca_pem) = control.request_renewal(csr).await?;
    let id = Identity::from_pem(&ca_pem, &cert_pem, &key).map_err(|e| e.to_string())?;
    if id.name() != v.node_name {
        return Err(format!(
            "the coordinator issued a certificate for {}",
            id.name()
        ));
    }
    write_credentials(v, None, &cert_pem, &key)?;
    control.endpoint().reload(&id).map_err(|e| e.to_string())?;
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

    #[test]
    fn write_atomic_replaces_and_keeps_secrets_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/node.key");
        write_atomic(&p, "one", true).unwrap();
        write_atomic(&p, "two", true).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
