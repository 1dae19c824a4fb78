//! Every refusal of the transport, one by one, on real QUIC endpoints on loopback. Each test
//! proves that the bad peer gets a clear error and that the serving endpoint keeps serving a
//! good peer afterwards.

use std::net::SocketAddr;
use std::sync::Arc;

use pd_transport::pki::{CertAuthority, Validity};
use pd_transport::{
    Endpoint, Identity, PeerIdentity, Service, TransportConfig, TransportError, codec,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Req {
    Echo(u64),
    Who,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Resp {
    Echo(u64),
    You(String),
}

struct Echo;

impl Service for Echo {
    type Request = Req;
    type Response = Resp;
    async fn call(&self, peer: &PeerIdentity, req: Req) -> Result<Resp, String> {
        Ok(match req {
            Req::Echo(n) => Resp::Echo(n),
            Req::Who => Resp::You(peer.name().to_string()),
        })
    }
}

struct Rig {
    ca: CertAuthority,
    server: Endpoint,
    addr: SocketAddr,
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn cfg() -> TransportConfig {
    TransportConfig {
        handshake_timeout_ms: 3000,
        frame_bytes_max: 64 * 1024,
        ..Default::default()
    }
}

fn identity(ca: &CertAuthority, name: &str, v: Validity) -> Identity {
    let i = ca.issue_node(name, v).unwrap();
    Identity::from_pem(&ca.cert_pem, &i.cert_pem, &i.key_pem).unwrap()
}

fn rig() -> Rig {
    let ca = CertAuthority::generate("test").unwrap();
    let server = Endpoint::bind(
        local(),
        &identity(&ca, "node-a", Validity::default()),
        &cfg(),
    )
    .unwrap();
    server.serve(Arc::new(Echo));
    let addr = server.local_addr();
    Rig { ca, server, addr }
}

impl Rig {
    /// A well-behaved peer can still talk to the server.
    async fn assert_still_serving(&self) {
        let good = Endpoint::bind(
            local(),
            &identity(&self.ca, "node-b", Validity::default()),
            &cfg(),
        )
        .unwrap();
        let conn = good
            .connect(self.addr, "node-a")
            .await
            .expect("good peer connects");
        let r: Resp = conn.call(&Req::Echo(42)).await.unwrap();
        assert_eq!(r, Resp::Echo(42));
        let r: Resp = conn.call(&Req::Who).await.unwrap();
        assert_eq!(
            r,
            Resp::You("node-b".into()),
            "server sees the name in our certificate"
        );
    }
}

fn expect_err<T>(r: Result<T, TransportError>, what: &str) -> String {
    match r {
        Ok(_) => panic!("{what}: expected a refusal"),
        Err(e) => {
            let s = e.to_string();
            eprintln!("{what}: {s}");
            s
        }
    }
}

/// The good path works, and the server is identified by name.
#[tokio::test]
async fn good_peers_talk() {
    let r = rig();
    r.assert_still_serving().await;
    drop(r.server);
}

/// A client without any certificate is refused during the TLS handshake.
#[tokio::test]
async fn no_client_certificate_is_refused() {
    let r = rig();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            pd_transport::pki::first_cert_der(&r.ca.cert_pem).unwrap(),
        ))
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(pd_transport::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![pd_transport::tls::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client(local()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let outcome = async {
        let conn = ep
            .connect(r.addr, "node-a")
            .unwrap()
            .await
            .map_err(|e| e.to_string())?;
        let (mut s, mut rcv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        s.write_all(b"PDAG\x01\x00")
            .await
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        rcv.read_exact(&mut b)
            .await
            .map_err(|_| conn.closed_reason_text())?;
        Ok::<_, String>(())
    }
    .await;
    let e = outcome.expect_err("server must refuse a client without a certificate");
    eprintln!("no client certificate: {e}");
    assert!(e.contains("certificate") || e.contains("handshake"), "{e}");
    r.assert_still_serving().await;
}

/// A self-signed certificate naming a real node is refused.
#[tokio::test]
async fn self_signed_certificate_is_refused() {
    let r = rig();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["node-b".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let id = Identity::from_pem(&r.ca.cert_pem, &cert.pem(), &key.serialize_pem()).unwrap();
    let ep = Endpoint::bind(local(), &id, &cfg()).unwrap();
    let e = expect_err(ep.connect(r.addr, "node-a").await, "self-signed");
    assert!(e.contains("certificate") || e.contains("handshake"), "{e}");
    r.assert_still_serving().await;
}

/// A certificate from another cluster's CA is refused.
#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let r = rig();
    let other = CertAuthority::generate("other").unwrap();
    let issued = other.issue_node("node-b", Validity::default()).unwrap();
    // Trusts the real CA (so it would accept the server) but presents a foreign certificate.
    let id = Identity::from_pem(&r.ca.cert_pem, &issued.cert_pem, &issued.key_pem).unwrap();
    let ep = Endpoint::bind(local(), &id, &cfg()).unwrap();
    let e = expect_err(ep.connect(r.addr, "node-a").await, "other CA");
    assert!(e.contains("certificate") || e.contains("handshake"), "{e}");
    r.assert_still_serving().await;

    // And a server with a foreign certificate is refused by our client.
    let foreign = Identity::from_pem(&other.cert_pem, &issued.cert_pem, &issued.key_pem).unwrap();
    let fake = Endpoint::bind(local(), &foreign, &cfg()).unwrap();
    fake.serve(Arc::new(Echo));
    let good = Endpoint::bind(
        local(),
        &identity(&r.ca, "node-c", Validity::default()),
        &cfg(),
    )
    .unwrap();
    let e = expect_err(
        good.connect(fake.local_addr(), "node-b").await,
        "foreign server",
    );
    assert!(
        e.contains("UnknownIssuer") || e.contains("certificate"),
        "{e}"
    );
}

/// An expired certificate is refused, as client and as server.
#[tokio::test]
async fn expired_certificate_is_refused() {
    let r = rig();
    let now = OffsetDateTime::now_utc();
    let past = Validity {
        not_before: now - Duration::days(30),
        not_after: now - Duration::days(1),
    };
    let ep = Endpoint::bind(local(), &identity(&r.ca, "node-b", past), &cfg()).unwrap();
    let e = expect_err(ep.connect(r.addr, "node-a").await, "expired client");
    assert!(e.contains("xpired") || e.contains("certificate"), "{e}");
    r.assert_still_serving().await;

    let stale = Endpoint::bind(local(), &identity(&r.ca, "node-s", past), &cfg()).unwrap();
    stale.serve(Arc::new(Echo));
    let good = Endpoint::bind(
        local(),
        &identity(&r.ca, "node-c", Validity::default()),
        &cfg(),
    )
    .unwrap();
    let e = expect_err(
        good.connect(stale.local_addr(), "node-s").await,
        "expired server",
    );
    assert!(e.contains("xpired"), "{e}");
}

/// Node B's certificate used by a peer that claims to be C is refused with both names in the
/// message; and a server holding A's certificate cannot pass for node B.
#[tokio::test]
async fn certificate_of_another_node_is_refused() {
    let r = rig();
    let ep = Endpoint::bind(
        local(),
        &identity(&r.ca, "node-b", Validity::default()),
        &cfg(),
    )
    .unwrap()
    .claiming("node-c");
    let e = expect_err(ep.connect(r.addr, "node-a").await, "impostor client");
    assert!(e.contains("node-b") && e.contains("node-c"), "{e}");
    r.assert_still_serving().await;

    let good = Endpoint::bind(
        local(),
        &identity(&r.ca, "node-c", Validity::default()),
        &cfg(),
    )
    .unwrap();
    let e = expect_err(good.connect(r.addr, "node-b").await, "impostor server");
    assert!(e.contains("node-b"), "{e}");
}

/// A peer speaking another protocol version is told so in words.
#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let r = rig();
    let id = identity(&r.ca, "node-b", Validity::default());
    let ep = Endpoint::bind_with_version(local(), &id, &cfg(), pd_transport::PROTOCOL_VERSION + 1)
        .unwrap();
    match ep.connect(r.addr, "node-a").await {
        Err(TransportError::VersionMismatch { ours, theirs, .. }) => {
            assert_eq!(ours, pd_transport::PROTOCOL_VERSION + 1);
            assert_eq!(theirs, pd_transport::PROTOCOL_VERSION);
        }
        Err(TransportError::Refused { reason, .. }) => {
            assert!(reason.contains("version"), "{reason}")
        }
        other => panic!("expected a version refusal, got {:?}", other.map(|_| ())),
    }
    r.assert_still_serving().await;
}

/// Sends `frame` as a request on a new stream of a good connection; the answer must be an
/// error reply containing `expect`, and the same connection and the endpoint must keep serving.
async fn raw_request_is_refused(frame: &[u8], expect: &str) {
    let r = rig();
    let id = identity(&r.ca, "node-b", Validity::default());
    let ep = Endpoint::bind(local(), &id, &cfg()).unwrap();
    let conn = ep.connect(r.addr, "node-a").await.unwrap();
    let answer = conn
        .call_raw(frame)
        .await
        .unwrap()
        .expect("an error reply frame");
    let reply: Result<Resp, String> = codec::decode(&answer, 1 << 20).unwrap();
    let e = reply.expect_err("the request must be refused");
    assert!(e.contains(expect), "{e}");
    let ok: Resp = conn.call(&Req::Echo(7)).await.unwrap();
    assert_eq!(ok, Resp::Echo(7), "the same connection still works");
    r.assert_still_serving().await;
}

/// A garbage request frame closes that stream with an error; the connection and the endpoint
/// stay usable.
#[tokio::test]
async fn garbage_frame_is_refused_and_connection_survives() {
    let mut garbage = 9u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 9]);
    raw_request_is_refused(&garbage, "malformed").await;
}

/// A frame above the size limit is refused from its length alone.
#[tokio::test]
async fn oversized_frame_is_refused() {
    let mut big = (10u32 << 20).to_le_bytes().to_vec();
    big.extend_from_slice(&[0u8; 1024]);
    raw_request_is_refused(&big, "exceeds the limit").await;
}

/// Garbage instead of a hello closes that connection with a reason.
#[tokio::test]
async fn garbage_hello_is_refused() {
    let r = rig();
    let id = identity(&r.ca, "node-b", Validity::default());
    let mut tls = id.client_config().unwrap();
    tls.alpn_protocols = vec![pd_transport::tls::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client(local()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let conn = ep.connect(r.addr, "node-a").unwrap().await.unwrap();
    let (mut s, _rcv) = conn.open_bi().await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _ = s.finish();
    let why = conn.closed().await.to_string();
    assert!(why.contains("not a pdagent hello"), "{why}");
    r.assert_still_serving().await;
}

trait CloseText {
    fn closed_reason_text(&self) -> String;
}

impl CloseText for quinn::Connection {
    fn closed_reason_text(&self) -> String {
        self.close_reason()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "stream failed".into())
    }
}

/// Regression: handshakes used to run one after another, so a peer that completed TLS and then
/// stayed silent held up every other peer for the whole handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_does_not_hold_up_others() {
    let r = rig();
    let id = identity(&r.ca, "node-s", Validity::default());
    let qc =
        quinn::crypto::rustls::QuicClientConfig::try_from(id.client_config().unwrap()).unwrap();
    let mut ep = quinn::Endpoint::client(local()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    // TLS completes; no hello ever follows.
    let _silent = ep.connect(r.addr, "node-a").unwrap().await.unwrap();
    let start = std::time::Instant::now();
    r.assert_still_serving().await;
    let waited = start.elapsed();
    assert!(
        waited.as_millis() < u128::from(cfg().handshake_timeout_ms),
        "a good peer waited {waited:?} behind a silent one"
    );
}
