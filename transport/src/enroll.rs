//! Enrollment: how a host with a join token and no certificate gets its node certificate.
//!
//! The QUIC transport admits only holders of a cluster certificate, so a new host cannot use
//! it yet. Enrollment runs on TLS over TCP on the same port number as the agent's QUIC
//! listener (TCP and UDP ports are separate), in the manner of kubeadm's token discovery:
//! 1. The host parses its join token, which pins the SHA-256 of the cluster CA certificate.
//! 2. It opens TLS 1.3 (ALPN `pdagent-enroll`) to a seed without a client certificate. The seed
//!    presents its node certificate followed by the CA certificate; the host accepts the
//!    connection only if that CA matches the pin and the node certificate is signed by it and
//!    names the seed it dialled. Nothing else is trusted.
//! 3. The host sends `ENROLL_MAGIC`, its protocol version (u16 LE) and one frame:
//!    `EnrollRequest { token, node, csr_pem }`. The certificate request carries a public key the
//!    host made for itself; its private key never leaves the host.
//! 4. The seed (or the coordinator it forwards to) checks the token and the name and answers
//!    one frame: `Ok(Enrolled { cert_pem, ca_pem })` or `Err(reason)`.
//!
//! Requests are bounded in size, time and number in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::codec::{self, CodecError};
use crate::endpoint::{Endpoint, PROTOCOL_VERSION};
use crate::pki::{self, JoinToken, PkiError};
use crate::tls::provider;

/// ALPN of the enrollment protocol (distinct from the transport's, so neither can be mistaken
/// for the other).
pub const ENROLL_ALPN: &[u8] = b"pdagent-enroll";
/// First bytes of an enrollment request.
pub const ENROLL_MAGIC: [u8; 4] = *b"PDEN";
/// Bound on one enrollment message (a request is ~1 KiB, an answer ~2 KiB).
pub const ENROLL_FRAME_BYTES_MAX: usize = 64 * 1024;
/// Enrollments served at once; more connections wait for the TCP backlog.
pub const ENROLLMENTS_IN_FLIGHT_MAX: usize = 16;
/// Bound on one enrollment on the serving side, forwarding to the coordinator included.
pub const ENROLL_SERVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    /// The node name the host asks for; its certificate request must name exactly this.
    pub node: String,
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    pub cert_pem: String,
    pub ca_pem: String,
}

/// Why an enrollment was refused, and whether asking again later may succeed (no coordinator
/// yet) or not (expired token, name taken).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub reason: String,
    pub retryable: bool,
}

impl Refusal {
    pub fn fatal(reason: impl Into<String>) -> Self {
        Refusal {
            reason: reason.into(),
            retryable: false,
        }
    }

    pub fn retry(reason: impl Into<String>) -> Self {
        Refusal {
            reason: reason.into(),
            retryable: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Token(#[from] PkiError),
    #[error("cannot reach {addr} over TCP: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {seed} at {addr} failed: {reason}")]
    Tls {
        seed: String,
        addr: SocketAddr,
        reason: String,
        /// The seed does not hold the CA the token pins (another cluster, or an impostor).
        pin_mismatch: bool,
    },
    #[error("enrolling through {seed} timed out after {ms} ms")]
    Timeout { seed: String, ms: u64 },
    #[error("{seed} refused the enrollment: {reason}")]
    Refused {
        seed: String,
        reason: String,
        retryable: bool,
    },
    #[error("enrollment exchange with {seed} failed: {source}")]
    Exchange { seed: String, source: CodecError },
    #[error("{seed} answered with something unusable: {why}")]
    BadAnswer { seed: String, why: String },
}

impl EnrollError {
    /// Whether trying again (the same or another seed, later) may succeed. A token the cluster
    /// refuses, or a seed that does not hold the CA the token pins, will not get better.
    pub fn is_retryable(&self) -> bool {
        match self {
            EnrollError::Token(_) | EnrollError::BadAnswer { .. } => false,
            EnrollError::Refused { retryable, .. } => *retryable,
            EnrollError::Tls { pin_mismatch, .. } => !pin_mismatch,
            EnrollError::Connect { .. }
            | EnrollError::Timeout { .. }
            | EnrollError::Exchange { .. } => true,
        }
    }
}

/// Decides enrollments. Implemented by the agent (which knows the cluster and may hold the CA
/// key).
pub trait EnrollHandler: Send + Sync + 'static {
    fn enroll(
        &self,
        remote: SocketAddr,
        req: EnrollRequest,
    ) -> impl Future<Output = Result<Enrolled, Refusal>> + Send;
}

/// Serves enrollment on `listener` with the endpoint's current identity, until aborted.
pub fn serve_enrollment<H: EnrollHandler>(
    listener: TcpListener,
    endpoint: Endpoint,
    handler: Arc<H>,
) -> JoinHandle<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(ENROLLMENTS_IN_FLIGHT_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "enrollment listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let endpoint = endpoint.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let served = tokio::time::timeout(
                    ENROLL_SERVE_TIMEOUT,
                    serve_one(tcp, remote, &endpoint, handler.as_ref()),
                )
                .await;
                match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(%remote, error = %e, "enrollment connection failed"),
                    Err(_) => warn!(%remote, "enrollment connection timed out"),
                }
                drop(permit);
            });
        }
    })
}

async fn serve_one<H: EnrollHandler>(
    tcp: TcpStream,
    remote: SocketAddr,
    endpoint: &Endpoint,
    handler: &H,
) -> Result<(), String> {
    let cfg = endpoint
        .identity()
        .enroll_server_config()
        .map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let mut tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut head = [0u8; 6];
    tls.read_exact(&mut head)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    let answer: Result<Enrolled, Refusal> = if head[..4] != ENROLL_MAGIC {
        Err(Refusal::fatal("not a pdagent enrollment request"))
    } else if u16::from_le_bytes([head[4], head[5]]) != PROTOCOL_VERSION {
        Err(Refusal::fatal(format!(
            "protocol version mismatch: you speak {}, this agent speaks {PROTOCOL_VERSION}; run the same pdagent release on every host",
            u16::from_le_bytes([head[4], head[5]])
        )))
    } else {
        match codec::read_frame::<_, EnrollRequest>(&mut tls, ENROLL_FRAME_BYTES_MAX).await {
            Err(e) => Err(Refusal::fatal(format!("bad enrollment request: {e}"))),
            Ok(req) => {
                let node = req.node.clone();
                let r = handler.enroll(remote, req).await;
                match &r {
                    Ok(_) => info!(%remote, %node, "enrolled a new host"),
                    Err(why) => warn!(%remote, %node, why = %why.reason, "refused an enrollment"),
                }
                r
            }
        }
    };
    codec::write_frame(&mut tls, &answer, ENROLL_FRAME_BYTES_MAX)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tls.shutdown().await;
    Ok(())
}

/// Asks the agent `seed` at `addr` for a node certificate, authenticating with `token` and
/// trusting only the CA the token pins.
pub async fn request_certificate(
    addr: SocketAddr,
    seed: &str,
    token: &str,
    node: &str,
    csr_pem: &str,
    timeout: Duration,
) -> Result<Enrolled, EnrollError> {
    let pin = JoinToken::parse(token)?.ca_fingerprint;
    let ms = timeout.as_millis() as u64;
    tokio::time::timeout(timeout, exchange(addr, seed, token, node, csr_pem, &pin))
        .await
        .map_err(|_| EnrollError::Timeout {
            seed: seed.to_string(),
            ms,
        })?
}

async fn exchange(
    addr: SocketAddr,
    seed: &str,
    token: &str,
    node: &str,
    csr_pem: &str,
    pin: &str,
) -> Result<Enrolled, EnrollError> {
    let tls_err = |reason: String| EnrollError::Tls {
        seed: seed.to_string(),
        addr,
        pin_mismatch: reason.contains(PIN_MISMATCH),
        reason,
    };
    let xerr = |source: CodecError| EnrollError::Exchange {
        seed: seed.to_string(),
        source,
    };
    let verifier = PinnedCa {
        fingerprint: pin.to_string(),
        provider: provider(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let name = ServerName::try_from(seed.to_string())
        .map_err(|_| tls_err(format!("{seed:?} is not a valid node name")))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| EnrollError::Connect { addr, source })?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    let mut msg = Vec::with_capacity(2048);
    msg.extend_from_slice(&ENROLL_MAGIC);
    msg.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    msg.extend_from_slice(
        &codec::encode_frame(
            &EnrollRequest {
                token: token.to_string(),
                node: node.to_string(),
                csr_pem: csr_pem.to_string(),
            },
            ENROLL_FRAME_BYTES_MAX,
        )
        .map_err(xerr)?,
    );
    tls.write_all(&msg)
        .await
        .map_err(|e| xerr(CodecError::Io(e)))?;
    tls.flush().await.map_err(|e| xerr(CodecError::Io(e)))?;
    let answer: Result<Enrolled, Refusal> = codec::read_frame(&mut tls, ENROLL_FRAME_BYTES_MAX)
        .await
        .map_err(xerr)?;
    let enrolled = answer.map_err(|r| EnrollError::Refused {
        seed: seed.to_string(),
        reason: r.reason,
        retryable: r.retryable,
    })?;
    let bad = |why: String| EnrollError::BadAnswer {
        seed: seed.to_string(),
        why,
    };
    if pki::fingerprint_pem(&enrolled.ca_pem).map_err(|e| bad(e.to_string()))? != pin {
        return Err(bad(
            "the CA certificate is not the one the token pins".into()
        ));
    }
    let der = pki::first_cert_der(&enrolled.cert_pem).map_err(|e| bad(e.to_string()))?;
    let info = pki::cert_info(&der).map_err(|e| bad(e.to_string()))?;
    if info.identity.name() != node {
        return Err(bad(format!(
            "the certificate names {}, not {node}",
            info.identity
        )));
    }
    Ok(enrolled)
}

const PIN_MISMATCH: &str = "the server did not present the CA certificate the join token pins";

/// Trusts a server only if it presents, after its own certificate, the CA certificate whose
/// SHA-256 the join token pins, and its certificate verifies under that CA for the name
/// dialled.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| {
                pki::hex(ring::digest::digest(&ring::digest::SHA256, c.as_ref()).as_ref())
                    == self.fingerprint
            })
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "{PIN_MISMATCH} (wrong cluster, or a man in the middle)"
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
