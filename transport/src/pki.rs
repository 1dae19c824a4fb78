//! The cluster PKI, fully offline: the cluster CA, node and admin certificates, join tokens,
//! and reading who a peer is from its certificate.
//!
//! Names and lifetimes (documented in the README):
//! - the CA certificate lives 10 years (`CA_LIFETIME_DAYS`);
//! - node and admin certificates live 365 days by default (`LEAF_LIFETIME_DAYS_DEFAULT`);
//! - a node certificate carries its node name as its only DNS subject-alternative name and as
//!   its common name; node names are DNS labels (`validate_node_name`), so they never contain a
//!   dot;
//! - the admin certificate carries the name `ADMIN_NAME`, which has a dot and so can never be
//!   mistaken for a node;
//! - a join token is `pdj1.<expiry>.<id>.<mac>.<ca-sha256>`: the MAC is keyed by a secret
//!   derived from the CA key, so only holders of the CA key can mint or check tokens, and the
//!   CA fingerprint lets a joining host pin the CA before it trusts anything (in the manner of
//!   kubeadm's discovery hash).
//!
//! Secrets (`*.key`, `join-token`) are written with mode 0600 and are never overwritten.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;
use time::{Duration, OffsetDateTime};

pub const CA_LIFETIME_DAYS: i64 = 3650;
pub const LEAF_LIFETIME_DAYS_DEFAULT: i64 = 365;
/// The subject name of the operator's admin certificate.
pub const ADMIN_NAME: &str = "admin.pdctl";
/// Clock skew tolerated on `not_before`.
const BACKDATE_MINUTES: i64 = 5;

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const ADMIN_CERT_FILE: &str = "admin.crt";
pub const ADMIN_KEY_FILE: &str = "admin.key";
pub const JOIN_TOKEN_FILE: &str = "join-token";
pub const NODE_CERT_FILE: &str = "node.crt";
pub const NODE_KEY_FILE: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid node name {name:?}: {why}")]
    BadNodeName { name: String, why: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it (remove it first if you mean to)")]
    Exists { path: PathBuf },
    #[error("{what} is not valid PEM: {why}")]
    BadPem { what: String, why: String },
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate names no pdagent identity (no DNS subject-alternative name)")]
    NoIdentity,
    #[error("join token is malformed: {0}")]
    TokenMalformed(&'static str),
    #[error(
        "join token expired at {expired_at} (unix seconds); create a new one with `pdctl token create`"
    )]
    TokenExpired { expired_at: u64 },
    #[error("join token was not issued by this cluster's CA")]
    TokenForeign,
    #[error("certificate request refused: {0}")]
    BadCsr(String),
}

/// Checks that a node name is a DNS label: 1 to 63 of `a-z`, `0-9` and `-`, starting and ending
/// with a letter or digit.
pub fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let bad = |why| {
        Err(PkiError::BadNodeName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("may contain only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must start and end with a letter or digit");
    }
    Ok(())
}

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    Node(String),
    Admin,
}

impl PeerIdentity {
    /// The name in the certificate.
    pub fn name(&self) -> &str {
        match self {
            PeerIdentity::Node(n) => n,
            PeerIdentity::Admin => ADMIN_NAME,
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Node(n) => write!(f, "node {n}"),
            PeerIdentity::Admin => write!(f, "admin"),
        }
    }
}

/// Facts read off a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub identity: PeerIdentity,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub serial_hex: String,
}

/// Reads the pdagent identity, expiry and serial from a DER certificate. The chain and validity
/// are checked by TLS before this is called; this only says which name the certificate carries.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?
        .ok_or(PkiError::NoIdentity)?;
    let dns: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(s) => Some(*s),
            _ => None,
        })
        .collect();
    let identity = match dns.as_slice() {
        [n] if *n == ADMIN_NAME => PeerIdentity::Admin,
        [n] if validate_node_name(n).is_ok() => PeerIdentity::Node(n.to_string()),
        _ => return Err(PkiError::NoIdentity),
    };
    Ok(CertInfo {
        identity,
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
        serial_hex: hex(cert.raw_serial()),
    })
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"<secret>")
            .finish_non_exhaustive()
    }
}

/// Validity window of a certificate to issue. `Default` is now-5min .. now+365 days.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// A short lifetime, for tests of renewal and expiry.
    pub fn seconds_from_now(secs: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::minutes(BACKDATE_MINUTES),
            not_after: now + Duration::seconds(secs),
        }
    }

    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::minutes(BACKDATE_MINUTES),
            not_after: now + Duration::days(days),
        }
    }
}

impl Default for Validity {
    fn default() -> Self {
        Self::days_from_now(LEAF_LIFETIME_DAYS_DEFAULT)
    }
}

/// The cluster's certificate authority: its certificate and key.
pub struct CertAuthority {
    pub cert_pem: String,
    key: KeyPair,
    issuer: rcgen::Certificate,
}

impl CertAuthority {
    /// Makes a new CA for a cluster.
    pub fn generate(cluster_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("pdagent cluster CA {cluster_name}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let v = Validity::days_from_now(CA_LIFETIME_DAYS);
        params.not_before = v.not_before;
        params.not_after = v.not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(CertAuthority {
            cert_pem,
            key,
            issuer: cert,
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadPem {
            what: "CA key".into(),
            why: e.to_string(),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| PkiError::BadPem {
                what: "CA certificate".into(),
                why: e.to_string(),
            })?;
        // A key of another CA would issue certificates nobody trusts: refuse it here.
        let der = first_cert_der(cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::BadPem {
                what: "CA key".into(),
                why: "it is not the key of this CA certificate".into(),
            });
        }
        // Re-signing yields an issuer with the same subject and key, which is all that issuing
        // needs; the PEM we hand out stays the original.
        let issuer = params.self_signed(&key)?;
        Ok(CertAuthority {
            cert_pem: cert_pem.to_string(),
            key,
            issuer,
        })
    }

    /// Loads `ca.crt` and `ca.key` from a directory.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert = read_text(&dir.join(CA_CERT_FILE))?;
        let key = read_text(&dir.join(CA_KEY_FILE))?;
        Self::from_pem(&cert, &key)
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: what a joining host pins.
    pub fn fingerprint(&self) -> String {
        fingerprint_pem(&self.cert_pem).expect("own CA certificate is valid PEM")
    }

    /// Issues a node certificate with a fresh key pair.
    pub fn issue_node(&self, node: &str, validity: Validity) -> Result<Issued, PkiError> {
        validate_node_name(node)?;
        self.issue(node, validity, true)
    }

    /// Issues the operator's admin (client-only) certificate.
    pub fn issue_admin(&self, validity: Validity) -> Result<Issued, PkiError> {
        self.issue(ADMIN_NAME, validity, false)
    }

    fn issue(&self, name: &str, validity: Validity, server: bool) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(name, validity, server)?.signed_by(&key, &self.issuer, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's certificate request. The request must be signed by its own key and name
    /// exactly `node`; everything else in it (extensions, validity, key usages) is ignored and
    /// replaced by what this CA issues to every node, so a request cannot ask for more.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node: &str,
        validity: Validity,
    ) -> Result<String, PkiError> {
        validate_node_name(node)?;
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let names: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                rcgen::SanType::DnsName(n) => n.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if names != [node] {
            return Err(PkiError::BadCsr(format!(
                "the request names {names:?}; it must name exactly {node:?}"
            )));
        }
        csr.params = leaf_params(node, validity, true)?;
        Ok(csr.signed_by(&self.issuer, &self.key)?.pem())
    }

    /// Mints a join token valid for `ttl_secs` from `now_unix`.
    pub fn join_token(&self, now_unix: u64, ttl_secs: u64) -> String {
        let expiry = now_unix.saturating_add(ttl_secs);
        let mut id = [0u8; 8];
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .expect("system randomness");
        let id = hex(&id);
        let mac = self.token_mac(expiry, &id);
        format!("pdj1.{expiry}.{id}.{mac}.{}", self.fingerprint())
    }

    /// Checks a join token: format, issuer, expiry. Returns the token id.
    pub fn verify_join_token(&self, token: &str, now_unix: u64) -> Result<String, PkiError> {
        let t = JoinToken::parse(token)?;
        if t.ca_fingerprint != self.fingerprint() {
            return Err(PkiError::TokenForeign);
        }
        let want = self.token_mac(t.expiry_unix, &t.id);
        let diff = want
            .bytes()
            .zip(t.mac.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 || want.len() != t.mac.len() {
            return Err(PkiError::TokenForeign);
        }
        if now_unix >= t.expiry_unix {
            return Err(PkiError::TokenExpired {
                expired_at: t.expiry_unix,
            });
        }
        Ok(t.id)
    }

    fn token_mac(&self, expiry: u64, id: &str) -> String {
        let mut seed = b"pdagent join token v1".to_vec();
        seed.extend_from_slice(&self.key.serialize_der());
        let secret = ring::digest::digest(&ring::digest::SHA256, &seed);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
        let tag = ring::hmac::sign(&key, format!("{expiry}.{id}").as_bytes());
        hex(&tag.as_ref()[..16])
    }
}

/// A join token taken apart (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub expiry_unix: u64,
    pub id: String,
    pub mac: String,
    pub ca_fingerprint: String,
}

impl JoinToken {
    pub fn parse(token: &str) -> Result<Self, PkiError> {
        let parts: Vec<&str> = token.trim().split('.').collect();
        let [tag, expiry, id, mac, fp] = parts.as_slice() else {
            return Err(PkiError::TokenMalformed(
                "expected pdj1.<expiry>.<id>.<mac>.<ca-sha256>",
            ));
        };
        if *tag != "pdj1" {
            return Err(PkiError::TokenMalformed(
                "unknown token version (expected pdj1)",
            ));
        }
        let expiry_unix = expiry
            .parse()
            .map_err(|_| PkiError::TokenMalformed("expiry is not a number"))?;
        let is_hex = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(id, 16) || !is_hex(mac, 32) || !is_hex(fp, 64) {
            return Err(PkiError::TokenMalformed(
                "id, mac or CA fingerprint has the wrong length",
            ));
        }
        Ok(JoinToken {
            expiry_unix,
            id: id.to_string(),
            mac: mac.to_string(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

/// SHA-256 of the first certificate in a PEM text, lowercase hex.
pub fn fingerprint_pem(pem: &str) -> Result<String, PkiError> {
    let der = first_cert_der(pem)?;
    Ok(hex(
        ring::digest::digest(&ring::digest::SHA256, &der).as_ref()
    ))
}

/// The DER bytes of the first certificate in a PEM text.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::BadPem {
            what: "certificate".into(),
            why: "no CERTIFICATE block".into(),
        })?
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::BadPem {
            what: "certificate".into(),
            why: e.to_string(),
        })
}

/// What this CA puts in every leaf certificate.
fn leaf_params(
    name: &str,
    validity: Validity,
    server: bool,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A fresh key pair and a certificate request naming `node`, for a host that joins with a
/// token: the private key never leaves the host. Returns (request PEM, key PEM).
pub fn node_csr(node: &str) -> Result<(String, String), PkiError> {
    validate_node_name(node)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node.to_string()])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    let csr = params.serialize_request(&key)?;
    let pem = csr.pem().map_err(|e| PkiError::BadCsr(e.to_string()))?;
    Ok((pem, key.serialize_pem()))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system randomness");
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file that must not exist yet; secrets get mode 0600, others 0644.
pub fn write_new(path: &Path, content: &str, secret: bool) -> Result<(), PkiError> {
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                PkiError::Write {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    f.write_all(content.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| PkiError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// What `pdctl cluster init` wrote.
#[derive(Debug, Clone)]
pub struct InitOutcome {
    pub files: Vec<PathBuf>,
    pub ca_fingerprint: String,
    pub token_expiry_unix: u64,
}

/// Creates a cluster's PKI in `dir`: CA, admin credential and a first join token. Refuses to
/// touch a directory that already holds a CA key.
pub fn init_cluster_dir(
    dir: &Path,
    cluster_name: &str,
    now_unix: u64,
    token_ttl_secs: u64,
) -> Result<InitOutcome, PkiError> {
    create_dir(dir)?;
    for f in [
        CA_KEY_FILE,
        CA_CERT_FILE,
        ADMIN_KEY_FILE,
        ADMIN_CERT_FILE,
        JOIN_TOKEN_FILE,
    ] {
        let p = dir.join(f);
        if p.exists() {
            return Err(PkiError::Exists { path: p });
        }
    }
    let ca = CertAuthority::generate(cluster_name)?;
    let admin = ca.issue_admin(Validity::default())?;
    let token = ca.join_token(now_unix, token_ttl_secs);
    let files = [
        (CA_KEY_FILE, ca.key_pem(), true),
        (CA_CERT_FILE, ca.cert_pem.clone(), false),
        (ADMIN_KEY_FILE, admin.key_pem, true),
        (ADMIN_CERT_FILE, admin.cert_pem, false),
        (JOIN_TOKEN_FILE, format!("{token}\n"), true),
    ];
    let mut written = Vec::new();
    for (name, content, secret) in files {
        let p = dir.join(name);
        write_new(&p, &content, secret)?;
        written.push(p);
    }
    Ok(InitOutcome {
        files: written,
        ca_fingerprint: ca.fingerprint(),
        token_expiry_unix: now_unix + token_ttl_secs,
    })
}

/// Issues a node certificate from the CA in `dir` into `dir/nodes/NODE/` (node.crt, node.key
/// and a copy of ca.crt): the folder to copy to that host's `<data_dir>/pki/`.
pub fn issue_node_files(dir: &Path, node: &str, days: i64) -> Result<Vec<PathBuf>, PkiError> {
    validate_node_name(node)?;
    let ca = CertAuthority::load(dir)?;
    let issued = ca.issue_node(node, Validity::days_from_now(days))?;
    let out = dir.join("nodes").join(node);
    create_dir(&out)?;
    let files = [
        (NODE_KEY_FILE, issued.key_pem, true),
        (NODE_CERT_FILE, issued.cert_pem, false),
        (CA_CERT_FILE, ca.cert_pem.clone(), false),
    ];
    let mut written = Vec::new();
    for (name, content, secret) in files {
        let p = out.join(name);
        write_new(&p, &content, secret)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn node_names() {
        for ok in ["node-1", "a", "gpu07", &"x".repeat(63)] {
            validate_node_name(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Node",
            "a.b",
            "a_b",
            &"x".repeat(64),
            "admin.pdctl",
        ] {
            assert!(
                validate_node_name(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = CertAuthority::generate("t").unwrap();
        let n = ca.issue_node("node-7", Validity::default()).unwrap();
        let info = cert_info(&first_cert_der(&n.cert_pem).unwrap()).unwrap();
        assert_eq!(info.identity, PeerIdentity::Node("node-7".into()));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(info.not_after_unix > now + 364 * 86400);
        let a = ca.issue_admin(Validity::default()).unwrap();
        let info = cert_info(&first_cert_der(&a.cert_pem).unwrap()).unwrap();
        assert_eq!(info.identity, PeerIdentity::Admin);
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_issuing() {
        let ca = CertAuthority::generate("t").unwrap();
        let again = CertAuthority::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let tok = ca.join_token(1000, 60);
        assert!(again.verify_join_token(&tok, 1001).is_ok());
    }

    #[test]
    fn join_tokens_expire_and_are_bound_to_their_ca() {
        let ca = CertAuthority::generate("t").unwrap();
        let other = CertAuthority::generate("u").unwrap();
        let tok = ca.join_token(1000, 60);
        assert_eq!(
            JoinToken::parse(&tok).unwrap().ca_fingerprint,
            ca.fingerprint()
        );
        assert!(ca.verify_join_token(&tok, 1059).is_ok());
        assert!(matches!(
            ca.verify_join_token(&tok, 1060),
            Err(PkiError::TokenExpired { expired_at: 1060 })
        ));
        assert!(matches!(
            other.verify_join_token(&tok, 1000),
            Err(PkiError::TokenForeign)
        ));
        // Moving the expiry breaks the MAC.
        let forged = tok.replacen("pdj1.1060.", "pdj1.9999.", 1);
        assert!(matches!(
            ca.verify_join_token(&forged, 1000),
            Err(PkiError::TokenForeign)
        ));
        for bad in ["", "pdj1", "pdj2.1.2.3.4", "pdj1.x.0000000000000000.00.00"] {
            assert!(matches!(
                JoinToken::parse(bad),
                Err(PkiError::TokenMalformed(_))
            ));
        }
    }

    #[test]
    fn init_writes_secrets_0600_and_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let out = init_cluster_dir(d.path(), "t", 1000, 3600).unwrap();
        assert_eq!(out.files.len(), 5);
        for (f, secret) in [
            ("ca.key", true),
            ("admin.key", true),
            ("join-token", true),
            ("ca.crt", false),
        ] {
            let mode = fs::metadata(d.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, if secret { 0o600 } else { 0o644 }, "{f}");
        }
        assert!(matches!(
            init_cluster_dir(d.path(), "t", 1000, 3600),
            Err(PkiError::Exists { .. })
        ));
        let files = issue_node_files(d.path(), "node-2", 30).unwrap();
        assert_eq!(files.len(), 3);
        let pem = fs::read_to_string(d.path().join("nodes/node-2/node.crt")).unwrap();
        let info = cert_info(&first_cert_der(&pem).unwrap()).unwrap();
        assert_eq!(info.identity, PeerIdentity::Node("node-2".into()));
        assert!(
            issue_node_files(d.path(), "node-2", 30).is_err(),
            "no silent overwrite"
        );
        assert!(matches!(
            issue_node_files(d.path(), "Bad_Name", 30),
            Err(PkiError::BadNodeName { .. })
        ));
    }

    #[test]
    fn a_ca_key_must_match_its_certificate() {
        let a = CertAuthority::generate("a").unwrap();
        let b = CertAuthority::generate("b").unwrap();
        assert!(CertAuthority::from_pem(&a.cert_pem, &a.key_pem()).is_ok());
        let e = CertAuthority::from_pem(&a.cert_pem, &b.key_pem())
            .err()
            .unwrap();
        assert!(e.to_string().contains("not the key"), "{e}");
    }

    #[test]
    fn csr_signing_issues_only_what_the_ca_issues() {
        let ca = CertAuthority::generate("a").unwrap();
        let (csr, _key) = node_csr("node-7").unwrap();
        let pem = ca
            .sign_node_csr(&csr, "node-7", Validity::default())
            .unwrap();
        let info = cert_info(&first_cert_der(&pem).unwrap()).unwrap();
        assert_eq!(info.identity, PeerIdentity::Node("node-7".into()));
        assert!(
            ca.sign_node_csr(&csr, "node-8", Validity::default())
                .is_err()
        );
        assert!(
            ca.sign_node_csr("garbage", "node-7", Validity::default())
                .is_err()
        );
    }
}
