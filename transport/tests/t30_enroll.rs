//! Enrollment with a join token over TLS/TCP, certificate revocation at connection time, and
//! switching an endpoint to a renewed certificate, on real sockets on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pd_transport::enroll::{
    EnrollError, EnrollHandler, EnrollRequest, Enrolled, Refusal, request_certificate,
    serve_enrollment,
};
use pd_transport::pki::{self, CertAuthority, Validity};
use pd_transport::{Endpoint, Identity, PeerIdentity, Service, TransportConfig, TransportError};

/// Signs for any token this CA minted that has not expired, as the coordinator does.
struct Signer {
    ca: CertAuthority,
}

impl EnrollHandler for Signer {
    async fn enroll(&self, _remote: SocketAddr, req: EnrollRequest) -> Result<Enrolled, Refusal> {
        self.ca
            .verify_join_token(&req.token, now())
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        let cert_pem = self
            .ca
            .sign_node_csr(&req.csr_pem, &req.node, Validity::default())
            .map_err(|e| Refusal::fatal(e.to_string()))?;
        Ok(Enrolled {
            cert_pem,
            ca_pem: self.ca.cert_pem.clone(),
        })
    }
}

struct Who;

impl Service for Who {
    type Request = ();
    type Response = String;
    async fn call(&self, peer: &PeerIdentity, _req: ()) -> Result<String, String> {
        Ok(peer.name().to_string())
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn identity(ca: &CertAuthority, name: &str) -> Identity {
    let i = ca.issue_node(name, Validity::default()).unwrap();
    Identity::from_pem(&ca.cert_pem, &i.cert_pem, &i.key_pem).unwrap()
}

fn cfg() -> TransportConfig {
    TransportConfig {
        handshake_timeout_ms: 3000,
        ..Default::default()
    }
}

/// A seed: a QUIC endpoint and the enrollment listener on the same port number.
async fn seed(ca: CertAuthority) -> (Endpoint, SocketAddr, CertAuthority) {
    let ep = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity(&ca, "seed"),
        &cfg(),
    )
    .unwrap();
    ep.serve(Arc::new(Who));
    let addr = ep.local_addr();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let ca2 = CertAuthority::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
    serve_enrollment(listener, ep.clone(), Arc::new(Signer { ca }));
    (ep, addr, ca2)
}

async fn enroll(addr: SocketAddr, token: &str, node: &str) -> Result<Identity, EnrollError> {
    let (csr, key) = pki::node_csr(node).unwrap();
    let got = request_certificate(addr, "seed", token, node, &csr, Duration::from_secs(10)).await?;
    Ok(Identity::from_pem(&got.ca_pem, &got.cert_pem, &key).unwrap())
}

/// A host with a valid token gets a certificate for its own key that the cluster accepts on
/// the QUIC transport.
#[tokio::test]
async fn a_valid_token_yields_a_working_certificate() {
    let (ep, addr, ca) = seed(CertAuthority::generate("c").unwrap()).await;
    let token = ca.join_token(now(), 600);
    let id = enroll(addr, &token, "newcomer").await.unwrap();
    assert_eq!(id.name(), "newcomer");
    let me = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &id, &cfg()).unwrap();
    let conn = me.connect(ep.local_addr(), "seed").await.unwrap();
    let who: String = conn.call(&()).await.unwrap();
    assert_eq!(who, "newcomer");
}

/// Expired tokens, tokens of another cluster, forged MACs and requests naming someone else are
/// refused, and the seed goes on enrolling good hosts.
#[tokio::test]
async fn bad_tokens_and_requests_are_refused() {
    let (_ep, addr, ca) = seed(CertAuthority::generate("c").unwrap()).await;

    let expired = ca.join_token(now() - 1000, 10);
    let e = enroll(addr, &expired, "late").await.unwrap_err();
    assert!(matches!(e, EnrollError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
    assert!(!e.is_retryable());

    // A token of another cluster pins another CA: the host refuses the seed during TLS and
    // never sends its token there.
    let other = CertAuthority::generate("other").unwrap();
    let foreign = other.join_token(now(), 600);
    let e = enroll(addr, &foreign, "lost").await.unwrap_err();
    assert!(matches!(e, EnrollError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("pins"), "{e}");
    assert!(
        !e.is_retryable(),
        "a seed of another cluster never becomes right"
    );

    // Right CA pin, forged MAC.
    let good = ca.join_token(now(), 600);
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[3] = "0".repeat(32);
    let forged = parts.join(".");
    let e = enroll(addr, &forged, "forger").await.unwrap_err();
    assert!(e.to_string().contains("not issued"), "{e}");

    // A request whose certificate request names another node.
    let (csr, _key) = pki::node_csr("victim").unwrap();
    let e = request_certificate(
        addr,
        "seed",
        &good,
        "intruder",
        &csr,
        Duration::from_secs(10),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("must name exactly"), "{e}");

    // Garbage instead of TLS, and a connection that says nothing: the seed keeps serving.
    use tokio::io::AsyncWriteExt;
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    enroll(addr, &good, "after-garbage").await.unwrap();
}

/// A revoked certificate is refused in both directions at connection time, with a reason.
#[tokio::test]
async fn revoked_certificates_are_refused_both_ways() {
    let ca = CertAuthority::generate("c").unwrap();
    let server = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity(&ca, "server"),
        &cfg(),
    )
    .unwrap();
    server.serve(Arc::new(Who));
    let client_id = identity(&ca, "client");
    let client = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &client_id, &cfg()).unwrap();

    server
        .revocations()
        .replace([client_id.info.serial_hex.clone()]);
    let e = client
        .connect(server.local_addr(), "server")
        .await
        .err()
        .expect("revoked client refused");
    // Its own certificate revoked: told so distinctly (the agent then gives up the CA key).
    assert!(matches!(e, TransportError::Revoked { .. }), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");

    server.revocations().replace([]);
    let server_serial = server.identity().info.serial_hex;
    client.revocations().replace([server_serial]);
    let e = client
        .connect(server.local_addr(), "server")
        .await
        .err()
        .expect("revoked server refused");
    assert!(e.to_string().contains("revoked"), "{e}");

    client.revocations().replace([]);
    client.connect(server.local_addr(), "server").await.unwrap();
}

/// After `reload`, new connections in both directions use the new certificate.
#[tokio::test]
async fn reload_switches_to_the_renewed_certificate() {
    let ca = CertAuthority::generate("c").unwrap();
    let server = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity(&ca, "server"),
        &cfg(),
    )
    .unwrap();
    server.serve(Arc::new(Who));
    let old = identity(&ca, "client");
    let client = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &old, &cfg()).unwrap();
    client.serve(Arc::new(Who));
    client.connect(server.local_addr(), "server").await.unwrap();

    let renewed = identity(&ca, "client");
    assert_ne!(renewed.info.serial_hex, old.info.serial_hex);
    client.reload(&renewed).unwrap();
    // Revoking the old serial shows which certificate each new connection presents.
    server.revocations().replace([old.info.serial_hex.clone()]);
    client.connect(server.local_addr(), "server").await.unwrap();
    // And as a server: a peer that revoked the old serial reaches the client.
    let peer = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity(&ca, "peer"),
        &cfg(),
    )
    .unwrap();
    peer.revocations().replace([old.info.serial_hex.clone()]);
    let conn = peer.connect(client.local_addr(), "client").await.unwrap();
    let who: String = conn.call(&()).await.unwrap();
    assert_eq!(who, "peer");
}
