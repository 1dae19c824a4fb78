//! rustls configurations for the cluster: TLS 1.3 only, one cipher suite, mutual
//! authentication under the cluster CA. The QUIC endpoint and the TLS-over-TCP baseline of the
//! transport benchmark are built from the same configurations, so they are compared like for
//! like.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;

use crate::pki::{self, CertInfo, PkiError};

/// The application protocol name negotiated in TLS. The protocol *version* is exchanged in the
/// first stream (see `endpoint`), so a version mismatch can be reported in words.
pub const ALPN: &[u8] = b"pdagent";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{what}: {why}")]
    Pem { what: String, why: String },
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// One party's credentials: the cluster CA to trust, its own certificate chain and key.
#[derive(Clone)]
pub struct Identity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// What our own certificate says about us.
    pub info: CertInfo,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let pem_err = |what: &str| {
            let what = what.to_string();
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                what: what.clone(),
                why: e.to_string(),
            }
        };
        let ca =
            CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(pem_err("CA certificate"))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("certificate"))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Pem {
                what: "certificate".into(),
                why: "no CERTIFICATE block".into(),
            });
        };
        let info = pki::cert_info(leaf)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("private key"))?;
        Ok(Identity {
            ca,
            chain,
            key: Arc::new(key),
            info,
        })
    }

    /// Reads the three PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::from_pem(
            &pki::read_text(ca)?,
            &pki::read_text(cert)?,
            &pki::read_text(key)?,
        )
    }

    pub fn name(&self) -> &str {
        self.info.identity.name()
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// Server side: TLS 1.3, a client certificate under the cluster CA is required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side: TLS 1.3, the server must present a certificate under the cluster CA that
    /// names the node we meant to reach; we present ours.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

impl Identity {
    /// The key of QUIC stateless resets, derived from this identity's private key: the same
    /// after a restart, so a restarted endpoint resets its peers' connections to the process
    /// that died (they redial at once instead of waiting for the idle timeout).
    pub(crate) fn stateless_reset_key(&self) -> ring::hmac::Key {
        use ring::digest;
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"pdagent quic stateless reset key v1\0");
        ctx.update(self.key.secret_der());
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref())
    }

    /// The key that signs this endpoint's connection IDs, derived like the reset key: a
    /// restarted endpoint still recognizes the IDs its previous incarnation handed out (and
    /// answers them with a stateless reset).
    pub(crate) fn connection_id_key(&self) -> u64 {
        use ring::digest;
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"pdagent quic connection id key v1\0");
        ctx.update(self.key.secret_der());
        let d = ctx.finish();
        let mut k = [0u8; 8];
        k.copy_from_slice(&d.as_ref()[..8]);
        u64::from_le_bytes(k)
    }

    /// The CA certificate this identity trusts, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Server side of enrollment (TLS over TCP): no client certificate (the joining host has
    /// none yet; its join token authenticates it), and the chain carries the CA certificate so
    /// the host can check it against the fingerprint its token pins.
    pub fn enroll_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut chain = self.chain.clone();
        chain.push(self.ca.clone());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(chain, self.key.clone_key())?;
        cfg.alpn_protocols = vec![crate::enroll::ENROLL_ALPN.to_vec()];
        Ok(cfg)
    }
}

/// ring, with the cipher suite pinned to TLS_AES_128_GCM_SHA256 (the suite QUIC's initial
/// packets use anyway, and the fastest on CPUs with AES instructions).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(p)
}
