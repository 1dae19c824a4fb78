//! The QUIC endpoint: one per agent (plus extra ones for striped bulk transfers), mutual TLS
//! under the cluster CA, a protocol-version hello on every connection, typed RPC on
//! bidirectional streams and raw bulk bytes on unidirectional streams.
//!
//! Connection opening, in order:
//! 1. TLS 1.3 with ALPN `pdagent`: both sides present certificates under the cluster CA; the
//!    client checks that the server's certificate names the node it meant to reach.
//! 2. The client opens the first bidirectional stream and sends `HELLO_MAGIC`, its protocol
//!    version (u16 LE) and one frame with the identity it claims. This prefix is raw bytes, not
//!    bincode, so that any future version can still read it and answer in words.
//! 3. The server checks the version and that the claimed name is the one in the client's
//!    certificate, and answers: its version (u16 LE), a status byte, and a length-prefixed UTF-8
//!    reason. On refusal it closes the connection with the matching error code.
//!
//! Afterwards every bidirectional stream is one RPC (request frame, response frame) or one
//! streaming RPC (request frame, response frames until the server finishes the stream; the
//! caller cancels by stopping it), and every unidirectional stream is one bulk transfer (header
//! frame, then raw bytes to the end).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{MtuDiscoveryConfig, VarInt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::bulk::{BULK_HEADER_BYTES_MAX, BulkHeader, BulkReader};
use crate::codec::{self, CodecError};
use crate::config::{Congestion, TransportConfig, gso_segments_max};
use crate::pki::{self, PeerIdentity};
use crate::socket::{CappedGsoSocket, bind_udp};
use crate::tls::{Identity, TlsError};

/// The wire protocol version this build speaks. Bumped when a message changes incompatibly
/// (messages are only appended, never renumbered, so most changes need no bump).
pub const PROTOCOL_VERSION: u16 = 2;
/// First bytes on every connection.
pub const HELLO_MAGIC: [u8; 4] = *b"PDAG";
const HELLO_REASON_BYTES_MAX: u32 = 4096;
/// Incoming connections in TLS or hello at once; more are refused until some finish.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 256;

/// Connection close codes (QUIC application error codes).
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const VERSION_MISMATCH: u32 = 0x10;
    pub const IDENTITY_MISMATCH: u32 = 0x11;
    pub const BAD_HELLO: u32 = 0x12;
    pub const OVERLOADED: u32 = 0x13;
    pub const SHUTDOWN: u32 = 0x14;
    pub const REVOKED: u32 = 0x15;
}
/// Stream reset/stop codes.
pub mod stream_code {
    pub const MALFORMED: u32 = 0x20;
    pub const TOO_LARGE: u32 = 0x21;
    pub const REFUSED: u32 = 0x22;
    /// The caller of a streaming RPC stopped listening.
    pub const CANCELLED: u32 = 0x23;
}

const STATUS_OK: u8 = 0;
const STATUS_VERSION: u8 = 1;
const STATUS_IDENTITY: u8 = 2;
const STATUS_BAD_HELLO: u8 = 3;
const STATUS_REVOKED: u8 = 4;

/// Serials (lowercase hex) of revoked certificates. The cluster replicates the list; the agent
/// copies it here, and both ends of every new connection check the other's certificate
/// against it. Cheap to clone; clones share the list.
#[derive(Clone, Default)]
pub struct RevocationList(Arc<std::sync::RwLock<std::collections::HashSet<String>>>);

impl RevocationList {
    /// Replaces the list; returns whether it changed.
    pub fn replace(&self, serials: impl IntoIterator<Item = String>) -> bool {
        let next: std::collections::HashSet<String> = serials.into_iter().collect();
        let mut cur = self.0.write().unwrap_or_else(|p| p.into_inner());
        if *cur == next {
            return false;
        }
        *cur = next;
        true
    }

    pub fn contains(&self, serial_hex: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial_hex)
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the endpoint presents and trusts; replaced as a whole when the certificate renews.
struct Credentials {
    identity: Identity,
    client_cfg: quinn::ClientConfig,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    /// The name the client claims; must be the name in its certificate.
    name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid peer name {0:?} (node names are DNS labels)")]
    BadPeerName(String),
    #[error("connecting to {peer} at {addr} failed: {reason}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("handshake with {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("{peer} at {addr} refused us: {reason}")]
    Refused {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },
    /// The peer (whose certificate we verified) refused ours as revoked: this node was
    /// removed from the cluster.
    #[error("{peer} at {addr} refused us: {reason}")]
    Revoked {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("protocol version mismatch with {peer}: we speak {ours}, it speaks {theirs}")]
    VersionMismatch {
        peer: String,
        ours: u16,
        theirs: u16,
    },
    #[error("{what} timed out after {ms} ms")]
    Timeout { what: String, ms: u64 },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream error: {0}")]
    Stream(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("peer answered with an error: {0}")]
    Remote(String),
}

/// Handles what peers send. Implemented by the agent (which alone knows what messages mean).
pub trait Service: Send + Sync + 'static {
    type Request: DeserializeOwned + Send + 'static;
    type Response: Serialize + Send + 'static;

    /// Answers one RPC. An `Err` reaches the caller as `TransportError::Remote`.
    fn call(
        &self,
        peer: &PeerIdentity,
        req: Self::Request,
    ) -> impl Future<Output = Result<Self::Response, String>> + Send;

    /// Whether `req` is answered by [`Service::stream`] (a sequence of responses) rather than
    /// by [`Service::call`]. The caller knows which it asked for (`Connection::call_stream`).
    fn streams(&self, req: &Self::Request) -> bool {
        let _ = req;
        false
    }

    /// Answers one streaming RPC: any number of responses through `out`, then the end (when
    /// this returns). An `Err` ends the stream with that error. When the caller goes away,
    /// `out.send` fails and `out.cancelled()` resolves.
    fn stream(
        &self,
        peer: &PeerIdentity,
        req: Self::Request,
        out: &mut ResponseSink<Self::Response>,
    ) -> impl Future<Output = Result<(), String>> + Send {
        let _ = (peer, req, out);
        async { Err("this endpoint answers no streams".to_string()) }
    }

    /// Consumes one bulk transfer. The default refuses bulk data.
    fn bulk(
        &self,
        peer: &PeerIdentity,
        header: BulkHeader,
        body: BulkReader,
    ) -> impl Future<Output = Result<(), String>> + Send {
        let _ = (peer, header, body);
        async { Err("this endpoint accepts no bulk transfers".to_string()) }
    }
}

/// The reply frame of an RPC.
type Reply<R> = Result<R, String>;

/// The server's side of a streaming RPC: each response is one frame on the stream.
pub struct ResponseSink<R> {
    send: quinn::SendStream,
    frame_max: usize,
    _item: std::marker::PhantomData<fn(R)>,
}

impl<R: Serialize> ResponseSink<R> {
    /// Sends one response; fails when the caller has gone away (stopped the stream or lost
    /// the connection).
    pub async fn send(&mut self, item: R) -> Result<(), TransportError> {
        let frame = codec::encode_frame(&Reply::<R>::Ok(item), self.frame_max)?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Resolves when the caller stops listening (dropped its stream) or the connection ends.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let stopped = self.send.stopped();
        async move {
            let _ = stopped.await;
        }
    }

    async fn end(mut self, result: Result<(), String>) {
        if let Err(why) = result
            && let Ok(frame) = codec::encode_frame(&Reply::<R>::Err(why), self.frame_max)
        {
            let _ = self.send.write_all(&frame).await;
        }
        let _ = self.send.finish();
    }
}

/// The caller's side of a streaming RPC. Dropping it tells the server to stop.
pub struct ResponseStream<R> {
    recv: quinn::RecvStream,
    frame_max: usize,
    done: bool,
    _item: std::marker::PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> ResponseStream<R> {
    /// The next response; `Ok(None)` after the last one. A stream the server ended with an
    /// error yields `TransportError::Remote`, a cut one the transport error.
    pub async fn next(&mut self) -> Result<Option<R>, TransportError> {
        if self.done {
            return Ok(None);
        }
        let result = self.read_one().await;
        if !matches!(result, Ok(Some(_))) {
            self.done = true;
        }
        result
    }

    async fn read_one(&mut self) -> Result<Option<R>, TransportError> {
        // The stream may end cleanly only between frames.
        let mut len = [0u8; codec::FRAME_HEADER_BYTES];
        let mut got = 0;
        while got < len.len() {
            match self.recv.read(&mut len[got..]).await {
                Ok(Some(n)) => got += n,
                Ok(None) if got == 0 => return Ok(None),
                Ok(None) => return Err(CodecError::Truncated.into()),
                Err(e) => return Err(TransportError::Stream(e.to_string())),
            }
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > self.frame_max {
            return Err(CodecError::FrameTooLarge {
                len: n,
                max: self.frame_max,
            }
            .into());
        }
        let mut body = vec![0u8; n];
        self.recv.read_exact(&mut body).await.map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(_) => TransportError::Codec(CodecError::Truncated),
            quinn::ReadExactError::ReadError(e) => TransportError::Stream(e.to_string()),
        })?;
        match codec::decode::<Reply<R>>(&body, self.frame_max)? {
            Ok(item) => Ok(Some(item)),
            Err(why) => Err(TransportError::Remote(why)),
        }
    }
}

impl<R> Drop for ResponseStream<R> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.recv.stop(VarInt::from_u32(stream_code::CANCELLED));
        }
    }
}

/// A bound QUIC endpoint with this party's identity.
#[derive(Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    creds: Arc<std::sync::RwLock<Credentials>>,
    transport: Arc<quinn::TransportConfig>,
    revoked: RevocationList,
    cfg: Arc<TransportConfig>,
    version: u16,
    claim: Option<String>,
    /// Receive buffer the kernel granted the UDP socket.
    pub udp_buffer_granted: usize,
}

impl Endpoint {
    /// Binds a UDP socket and starts a QUIC endpoint that both accepts and opens connections.
    /// Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        cfg: &TransportConfig,
    ) -> Result<Self, TransportError> {
        Self::bind_with_version(addr, identity, cfg, PROTOCOL_VERSION)
    }

    /// Like `bind`, speaking another protocol version: for tests of the version check.
    #[doc(hidden)]
    pub fn bind_with_version(
        addr: SocketAddr,
        identity: &Identity,
        cfg: &TransportConfig,
        version: u16,
    ) -> Result<Self, TransportError> {
        let transport = Arc::new(quic_transport_config(cfg));
        let (server_cfg, client_cfg) = quic_configs(identity, &transport)?;

        let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(identity.stateless_reset_key()));
        // Connection IDs signed with a key derived from the identity too: an endpoint
        // restarted with the same identity recognizes its predecessor's IDs and answers them
        // with a stateless reset, so peers drop connections to a process that died at once
        // instead of after the idle timeout.
        let cid_key = identity.connection_id_key();
        endpoint_cfg.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        endpoint_cfg
            .max_udp_payload_size(cfg.max_datagram_bytes)
            .map_err(|e| TransportError::Bind {
                addr,
                source: std::io::Error::other(e.to_string()),
            })?;
        let (sock, granted) = bind_udp(addr, cfg.udp_buffer_bytes)
            .map_err(|source| TransportError::Bind { addr, source })?;
        if granted < cfg.udp_buffer_bytes {
            warn!(
                requested = cfg.udp_buffer_bytes,
                granted,
                "kernel capped the UDP receive buffer; raise net.core.rmem_max for bulk throughput"
            );
        }
        let runtime = Arc::new(quinn::TokioRuntime);
        let segments = if cfg.gso {
            gso_segments_max(cfg.max_datagram_bytes)
        } else {
            1
        };
        let socket = CappedGsoSocket::wrap(runtime.as_ref(), sock, segments)
            .map_err(|source| TransportError::Bind { addr, source })?;
        let inner = quinn::Endpoint::new_with_abstract_socket(
            endpoint_cfg,
            Some(server_cfg),
            socket,
            runtime,
        )
        .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(Endpoint {
            inner,
            creds: Arc::new(std::sync::RwLock::new(Credentials {
                identity: identity.clone(),
                client_cfg,
            })),
            transport,
            revoked: RevocationList::default(),
            cfg: Arc::new(cfg.clone()),
            version,
            claim: None,
            udp_buffer_granted: granted,
        })
    }

    /// Claims another name than our certificate's in the hello: for tests of the identity check.
    #[doc(hidden)]
    pub fn claiming(mut self, name: &str) -> Self {
        self.claim = Some(name.to_string());
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// The identity this endpoint presents now.
    pub fn identity(&self) -> Identity {
        self.creds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .identity
            .clone()
    }

    /// Presents `identity` from now on (a renewed certificate): new connections in both
    /// directions use it; established ones keep theirs until they close.
    pub fn reload(&self, identity: &Identity) -> Result<(), TransportError> {
        let (server_cfg, client_cfg) = quic_configs(identity, &self.transport)?;
        self.inner.set_server_config(Some(server_cfg));
        *self.creds.write().unwrap_or_else(|p| p.into_inner()) = Credentials {
            identity: identity.clone(),
            client_cfg,
        };
        info!(serial = %identity.info.serial_hex, "now presenting a new certificate");
        Ok(())
    }

    /// The revocation list both ends of every new connection are checked against.
    pub fn revocations(&self) -> &RevocationList {
        &self.revoked
    }

    pub fn config(&self) -> &TransportConfig {
        &self.cfg
    }

    fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.handshake_timeout_ms)
    }

    /// Opens a connection to node `peer` at `addr`: TLS, then the version hello.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: &str,
    ) -> Result<Connection, TransportError> {
        pki::validate_node_name(peer).map_err(|_| TransportError::BadPeerName(peer.to_string()))?;
        let ms = self.cfg.handshake_timeout_ms;
        let what = format!("connecting to {peer} at {addr}");
        tokio::time::timeout(self.handshake_timeout(), self.connect_inner(addr, peer))
            .await
            .map_err(|_| TransportError::Timeout { what, ms })?
    }

    async fn connect_inner(
        &self,
        addr: SocketAddr,
        peer: &str,
    ) -> Result<Connection, TransportError> {
        let connect_err = |reason: String| TransportError::Connect {
            peer: peer.to_string(),
            addr,
            reason,
        };
        let (client_cfg, my_name) = {
            let c = self.creds.read().unwrap_or_else(|p| p.into_inner());
            (c.client_cfg.clone(), c.identity.name().to_string())
        };
        let conn = self
            .inner
            .connect_with(client_cfg, addr, peer)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(describe_connection_error(&e)))?;
        let theirs = peer_certificate(&conn)?;
        if self.revoked.contains(&theirs.serial_hex) {
            conn.close(
                VarInt::from_u32(close_code::REVOKED),
                b"your certificate is revoked",
            );
            return Err(TransportError::Refused {
                peer: peer.to_string(),
                addr,
                reason: format!(
                    "its certificate (serial {}) is revoked: the node was removed",
                    theirs.serial_hex
                ),
            });
        }
        let hello_err = |e: String| connect_err(format!("during hello: {e}"));
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| connect_err(describe_connection_error(&e)))?;
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&HELLO_MAGIC);
        msg.extend_from_slice(&self.version.to_le_bytes());
        msg.extend_from_slice(&codec::encode_frame(
            &Hello {
                name: self.claim.clone().unwrap_or(my_name),
            },
            4096,
        )?);
        send.write_all(&msg)
            .await
            .map_err(|e| hello_err(e.to_string()))?;
        let _ = send.finish();
        let mut head = [0u8; 3];
        if let Err(e) = recv.read_exact(&mut head).await {
            // The server may have closed the connection with a reason instead of answering.
            return Err(match conn.close_reason() {
                Some(reason) => refused_or_lost(peer, addr, &reason),
                None => hello_err(e.to_string()),
            });
        }
        let theirs = u16::from_le_bytes([head[0], head[1]]);
        let status = head[2];
        let mut len = [0u8; 4];
        let reason = match recv.read_exact(&mut len).await {
            Ok(()) => {
                let len = u32::from_le_bytes(len).min(HELLO_REASON_BYTES_MAX) as usize;
                let mut r = vec![0u8; len];
                let _ = recv.read_exact(&mut r).await;
                String::from_utf8_lossy(&r).into_owned()
            }
            Err(_) => String::new(),
        };
        match status {
            STATUS_OK => {}
            STATUS_VERSION => {
                return Err(TransportError::VersionMismatch {
                    peer: peer.to_string(),
                    ours: self.version,
                    theirs,
                });
            }
            STATUS_REVOKED => {
                return Err(TransportError::Revoked {
                    peer: peer.to_string(),
                    addr,
                    reason,
                });
            }
            _ => {
                return Err(TransportError::Refused {
                    peer: peer.to_string(),
                    addr,
                    reason,
                });
            }
        }
        if theirs != self.version {
            return Err(TransportError::VersionMismatch {
                peer: peer.to_string(),
                ours: self.version,
                theirs,
            });
        }
        Ok(Connection::new(
            conn,
            PeerIdentity::Node(peer.to_string()),
            self.cfg.frame_bytes_max,
        ))
    }

    /// Runs TLS and the hello for one incoming connection, within the handshake timeout.
    /// Refusals are logged and give `None`.
    async fn handshake(&self, incoming: quinn::Incoming) -> Option<Connection> {
        let remote = incoming.remote_address();
        let ms = self.cfg.handshake_timeout_ms;
        match tokio::time::timeout(self.handshake_timeout(), self.accept_one(incoming)).await {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(e)) => {
                warn!(%remote, error = %e, "refused incoming connection");
                None
            }
            Err(_) => {
                warn!(%remote, ms, "refused incoming connection: handshake timed out");
                None
            }
        }
    }

    async fn accept_one(&self, incoming: quinn::Incoming) -> Result<Connection, TransportError> {
        let remote = incoming.remote_address();
        let conn = incoming.await.map_err(|e| TransportError::Handshake {
            addr: remote,
            reason: describe_connection_error(&e),
        })?;
        let cert = peer_certificate(&conn)?;
        let identity = cert.identity.clone();
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut head = [0u8; 6];
        recv.read_exact(&mut head)
            .await
            .map_err(|e| TransportError::Stream(format!("hello: {e}")))?;
        // Every refusal answers the hello in words and closes the connection with its code.
        let verdict: Result<(), (u8, u32, String)> = if self.revoked.contains(&cert.serial_hex) {
            Err((
                STATUS_REVOKED,
                close_code::REVOKED,
                format!(
                    "certificate serial {} is revoked: this node was removed from the cluster",
                    cert.serial_hex
                ),
            ))
        } else if head[..4] != HELLO_MAGIC {
            Err((
                STATUS_BAD_HELLO,
                close_code::BAD_HELLO,
                "not a pdagent hello".into(),
            ))
        } else if u16::from_le_bytes([head[4], head[5]]) != self.version {
            let theirs = u16::from_le_bytes([head[4], head[5]]);
            let reason = format!(
                "protocol version mismatch: you speak {theirs}, this agent speaks {}; run the same pdagent release on every host",
                self.version
            );
            Err((STATUS_VERSION, close_code::VERSION_MISMATCH, reason))
        } else {
            match codec::read_frame::<_, Hello>(&mut recv, 4096).await {
                Err(e) => Err((
                    STATUS_BAD_HELLO,
                    close_code::BAD_HELLO,
                    format!("bad hello: {e}"),
                )),
                Ok(h) if h.name != identity.name() => {
                    let reason = format!(
                        "certificate names {:?} but the peer claims to be {:?}",
                        identity.name(),
                        h.name
                    );
                    Err((STATUS_IDENTITY, close_code::IDENTITY_MISMATCH, reason))
                }
                Ok(_) => Ok(()),
            }
        };
        if let Err((status, code, reason)) = verdict {
            let reason = refuse(&conn, &mut send, self.version, status, code, reason).await;
            return Err(TransportError::Refused {
                peer: identity.to_string(),
                addr: remote,
                reason,
            });
        }
        let mut ok = Vec::new();
        ok.extend_from_slice(&self.version.to_le_bytes());
        ok.push(STATUS_OK);
        ok.extend_from_slice(&0u32.to_le_bytes());
        send.write_all(&ok)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        let _ = send.finish();
        debug!(%remote, peer = %identity, "connection accepted");
        Ok(Connection::new(conn, identity, self.cfg.frame_bytes_max))
    }

    /// Accepts connections and serves them with `service` until the endpoint closes. Every
    /// handshake runs in its own task, at most `HANDSHAKES_IN_FLIGHT_MAX` at once, so a slow or
    /// silent peer cannot hold up the others.
    pub fn serve<S: Service>(&self, service: Arc<S>) -> JoinHandle<()> {
        let ep = self.clone();
        let permits = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX));
        tokio::spawn(async move {
            while let Some(incoming) = ep.inner.accept().await {
                let remote = incoming.remote_address();
                if ep.inner.open_connections() >= ep.cfg.connections_max {
                    warn!(%remote, limit = ep.cfg.connections_max, "refusing connection: at the connection limit");
                    incoming.refuse();
                    continue;
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    warn!(%remote, limit = HANDSHAKES_IN_FLIGHT_MAX, "refusing connection: too many handshakes in flight");
                    incoming.refuse();
                    continue;
                };
                let ep = ep.clone();
                let service = service.clone();
                tokio::spawn(async move {
                    let conn = ep.handshake(incoming).await;
                    drop(permit);
                    if let Some(conn) = conn {
                        conn.serve(service).await;
                    }
                });
            }
        })
    }

    /// Closes every connection and waits (bounded) for peers to be told.
    pub async fn shutdown(&self, timeout: Duration) {
        self.inner.close(
            VarInt::from_u32(close_code::SHUTDOWN),
            b"agent shutting down",
        );
        let _ = tokio::time::timeout(timeout, self.inner.wait_idle()).await;
    }
}

/// An established, authenticated connection.
#[derive(Clone)]
pub struct Connection {
    conn: quinn::Connection,
    peer: PeerIdentity,
    frame_max: usize,
}

impl Connection {
    fn new(conn: quinn::Connection, peer: PeerIdentity, frame_max: usize) -> Self {
        Connection {
            conn,
            peer,
            frame_max,
        }
    }

    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The largest UDP payload the path currently carries (after MTU discovery).
    pub fn datagram_bytes(&self) -> u16 {
        self.conn.stats().path.current_mtu
    }

    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    pub fn close(&self, reason: &str) {
        self.conn
            .close(VarInt::from_u32(close_code::NORMAL), reason.as_bytes());
    }

    /// Resolves when the connection is closed, with the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// One request, one response.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        req: &Req,
    ) -> Result<Resp, TransportError> {
        let frame = codec::encode_frame(req, self.frame_max)?;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        // RPCs go ahead of bulk data queued on the same connection.
        let _ = send.set_priority(1);
        send.write_all(&frame)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        let _ = send.finish();
        let reply: Reply<Resp> = codec::read_frame(&mut recv, self.frame_max).await?;
        reply.map_err(TransportError::Remote)
    }

    /// A streaming RPC: one request, then responses until the server ends the stream. Drop
    /// the returned stream to cancel.
    pub async fn call_stream<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        req: &Req,
    ) -> Result<ResponseStream<Resp>, TransportError> {
        let frame = codec::encode_frame(req, self.frame_max)?;
        let (mut send, recv) = self.conn.open_bi().await?;
        let _ = send.set_priority(1);
        send.write_all(&frame)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        let _ = send.finish();
        Ok(ResponseStream {
            recv,
            frame_max: self.frame_max,
            done: false,
            _item: std::marker::PhantomData,
        })
    }

    /// Sends a raw frame on a new RPC stream and reads the raw answer: for tests that must put
    /// malformed bytes on the wire.
    #[doc(hidden)]
    pub async fn call_raw(
        &self,
        bytes: &[u8],
    ) -> Result<Result<Vec<u8>, CodecError>, TransportError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(bytes)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        let _ = send.finish();
        Ok(codec::read_frame_bytes(&mut recv, self.frame_max).await)
    }

    /// Opens a bulk stream: the header now, the raw bytes through the returned writer.
    pub async fn open_bulk(
        &self,
        header: &BulkHeader,
    ) -> Result<crate::bulk::BulkWriter, TransportError> {
        let frame = codec::encode_frame(header, BULK_HEADER_BYTES_MAX)?;
        let mut send = self.conn.open_uni().await?;
        send.write_all(&frame)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        Ok(crate::bulk::BulkWriter::new(send, header.len))
    }

    /// Sends one whole bulk transfer and waits until the peer has acknowledged every byte.
    pub async fn send_bulk(&self, header: &BulkHeader, data: Bytes) -> Result<(), TransportError> {
        let mut w = self.open_bulk(header).await?;
        w.write(data).await?;
        w.finish().await
    }

    /// Serves RPC and bulk streams from this peer until the connection ends.
    pub async fn serve<S: Service>(self, service: Arc<S>) {
        let peer = self.peer.clone();
        let remote = self.remote_address();
        info!(%peer, %remote, "peer connected");
        let bi = {
            let this = self.clone();
            let service = service.clone();
            async move {
                loop {
                    match this.conn.accept_bi().await {
                        Ok((send, recv)) => {
                            tokio::spawn(serve_rpc(this.clone(), service.clone(), send, recv));
                        }
                        Err(e) => return e,
                    }
                }
            }
        };
        let uni = {
            let this = self.clone();
            async move {
                loop {
                    match this.conn.accept_uni().await {
                        Ok(recv) => {
                            tokio::spawn(serve_bulk(this.clone(), service.clone(), recv));
                        }
                        Err(e) => return e,
                    }
                }
            }
        };
        let why = tokio::select! { e = bi => e, e = uni => e };
        info!(%peer, %remote, reason = %describe_connection_error(&why), "peer disconnected");
    }
}

async fn serve_rpc<S: Service>(
    conn: Connection,
    service: Arc<S>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let max = conn.frame_max;
    let req: Result<S::Request, CodecError> = codec::read_frame(&mut recv, max).await;
    let reply: Reply<S::Response> = match req {
        Ok(req) if service.streams(&req) => {
            let _ = send.set_priority(1);
            let mut sink = ResponseSink {
                send,
                frame_max: max,
                _item: std::marker::PhantomData,
            };
            let result = service.stream(&conn.peer, req, &mut sink).await;
            if let Err(why) = &result {
                debug!(peer = %conn.peer, error = %why, "stream ended with an error");
            }
            sink.end(result).await;
            return;
        }
        Ok(req) => service.call(&conn.peer, req).await,
        Err(e) => {
            warn!(peer = %conn.peer, error = %e, "closing RPC stream: bad request frame");
            let code = match e {
                CodecError::FrameTooLarge { .. } => stream_code::TOO_LARGE,
                _ => stream_code::MALFORMED,
            };
            let _ = recv.stop(VarInt::from_u32(code));
            Err(format!("request refused: {e}"))
        }
    };
    let frame = match codec::encode_frame(&reply, max) {
        Ok(f) => f,
        Err(e) => {
            warn!(peer = %conn.peer, error = %e, "response does not fit in a frame");
            codec::encode_frame(&Reply::<()>::Err(format!("response refused: {e}")), max)
                .expect("short error reply fits")
        }
    };
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
    }
}

async fn serve_bulk<S: Service>(conn: Connection, service: Arc<S>, mut recv: quinn::RecvStream) {
    let header: BulkHeader = match codec::read_frame(&mut recv, BULK_HEADER_BYTES_MAX).await {
        Ok(h) => h,
        Err(e) => {
            warn!(peer = %conn.peer, error = %e, "closing bulk stream: bad header");
            let _ = recv.stop(VarInt::from_u32(stream_code::MALFORMED));
            return;
        }
    };
    let id = header.transfer_id;
    let reader = BulkReader::new(recv, header.len);
    if let Err(e) = service.bulk(&conn.peer, header, reader).await {
        warn!(peer = %conn.peer, transfer = id, error = %e, "bulk transfer failed");
    }
}

/// Answers a hello with a refusal, then closes the connection with `code` and the reason.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    ours: u16,
    status: u8,
    code: u32,
    reason: String,
) -> String {
    let mut msg = Vec::new();
    msg.extend_from_slice(&ours.to_le_bytes());
    msg.push(status);
    msg.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    msg.extend_from_slice(reason.as_bytes());
    let _ = send.write_all(&msg).await;
    let _ = send.finish();
    // Give the answer a moment to arrive before closing; the close carries the reason as well
    // in case it does not.
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    conn.close(VarInt::from_u32(code), reason.as_bytes());
    reason
}

fn peer_certificate(conn: &quinn::Connection) -> Result<pki::CertInfo, TransportError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| TransportError::Stream("peer presented no certificate".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TransportError::Stream("peer presented no certificate".into()))?;
    Ok(pki::cert_info(leaf).map_err(TlsError::Pki)?)
}

/// The QUIC server and client configurations for one identity.
fn quic_configs(
    identity: &Identity,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_crypto = QuicServerConfig::try_from(identity.server_config()?)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_cfg.transport_config(transport.clone());
    let client_crypto = QuicClientConfig::try_from(identity.client_config()?)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_cfg.transport_config(transport.clone());
    Ok((server_cfg, client_cfg))
}

fn refused_or_lost(peer: &str, addr: SocketAddr, e: &quinn::ConnectionError) -> TransportError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close_code::REVOKED) =>
        {
            TransportError::Revoked {
                peer: peer.to_string(),
                addr,
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            }
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            TransportError::Refused {
                peer: peer.to_string(),
                addr,
                reason,
            }
        }
        other => TransportError::Connect {
            peer: peer.to_string(),
            addr,
            reason: describe_connection_error(other),
        },
    }
}

/// A connection error in words an operator can act on.
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TransportError(t) => format!("TLS/QUIC handshake failed: {t}"),
        quinn::ConnectionError::ConnectionClosed(c) => {
            format!(
                "peer closed the connection: {c} (a certificate the peer does not trust is refused this way)"
            )
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!(
                "peer closed the connection: {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        quinn::ConnectionError::TimedOut => "no answer from peer (timed out)".to_string(),
        other => other.to_string(),
    }
}

/// quinn's transport parameters from our configuration.
fn quic_transport_config(cfg: &TransportConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let v = |x: u64| VarInt::from_u64(x).unwrap_or(VarInt::MAX);
    t.stream_receive_window(v(cfg.stream_receive_window_bytes))
        .receive_window(v(cfg.receive_window_bytes))
        .send_window(cfg.send_window_bytes)
        .send_fairness(false)
        .max_concurrent_bidi_streams(VarInt::from_u32(cfg.streams_per_connection_max))
        .max_concurrent_uni_streams(VarInt::from_u32(cfg.streams_per_connection_max))
        .max_idle_timeout(Some(
            VarInt::from_u64(cfg.idle_timeout_ms)
                .unwrap_or(VarInt::MAX)
                .into(),
        ))
        .keep_alive_interval(Some(Duration::from_millis(cfg.keep_alive_ms)))
        .initial_mtu(cfg.initial_datagram_bytes)
        .min_mtu(1200)
        .enable_segmentation_offload(cfg.gso)
        .datagram_receive_buffer_size(None);
    let mut mtud = MtuDiscoveryConfig::default();
    mtud.upper_bound(cfg.max_datagram_bytes);
    t.mtu_discovery_config(Some(mtud));
    match cfg.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    t
}
