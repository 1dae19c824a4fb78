//! Streaming RPC: responses arrive in order and end cleanly, a server error ends the stream
//! with that error, and a caller that drops its stream cancels the server at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pd_transport::pki::{CertAuthority, Validity};
use pd_transport::{
    Endpoint, Identity, PeerIdentity, ResponseSink, Service, TransportConfig, TransportError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
enum Req {
    Unary(u32),
    /// Count to n, then end (or fail at `fail_at`).
    Count {
        n: u32,
        fail_at: Option<u32>,
    },
    /// Send one item, then wait until cancelled.
    Hold,
}

struct Counter {
    cancelled: mpsc::UnboundedSender<()>,
}

impl Service for Counter {
    type Request = Req;
    type Response = u32;
    fn streams(&self, req: &Req) -> bool {
        !matches!(req, Req::Unary(_))
    }
    async fn call(&self, _: &PeerIdentity, req: Req) -> Result<u32, String> {
        match req {
            Req::Unary(x) => Ok(x + 1),
            _ => Err("not unary".into()),
        }
    }
    async fn stream(
        &self,
        _: &PeerIdentity,
        req: Req,
        out: &mut ResponseSink<u32>,
    ) -> Result<(), String> {
        match req {
            Req::Count { n, fail_at } => {
                for i in 0..n {
                    if Some(i) == fail_at {
                        return Err(format!("failed at {i}"));
                    }
                    out.send(i).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Req::Hold => {
                out.send(7).await.map_err(|e| e.to_string())?;
                let cancelled = out.cancelled();
                if tokio::time::timeout(Duration::from_secs(30), cancelled)
                    .await
                    .is_ok()
                {
                    let _ = self.cancelled.send(());
                }
                Ok(())
            }
            Req::Unary(_) => Err("not a stream".into()),
        }
    }
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_fail_and_cancel() {
    let ca = CertAuthority::generate("t").unwrap();
    let mk = |n: &str| {
        let i = ca.issue_node(n, Validity::default()).unwrap();
        Identity::from_pem(&ca.cert_pem, &i.cert_pem, &i.key_pem).unwrap()
    };
    let cfg = TransportConfig::default();
    let server = Endpoint::bind(local(), &mk("server"), &cfg).unwrap();
    let (tx, mut cancelled) = mpsc::unbounded_channel();
    let _serving = server.serve(Arc::new(Counter { cancelled: tx }));
    let client = Endpoint::bind(local(), &mk("client"), &cfg).unwrap();
    let conn = client.connect(server.local_addr(), "server").await.unwrap();

    // Unary calls still work beside streams.
    let r: u32 = conn.call(&Req::Unary(41)).await.unwrap();
    assert_eq!(r, 42);

    // In order, then a clean end.
    let mut s = conn
        .call_stream::<_, u32>(&Req::Count {
            n: 100,
            fail_at: None,
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(x) = s.next().await.unwrap() {
        got.push(x);
    }
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert!(s.next().await.unwrap().is_none(), "stays ended");

    // A server error ends the stream with its words, after what was sent before it.
    let mut s = conn
        .call_stream::<_, u32>(&Req::Count {
            n: 10,
            fail_at: Some(3),
        })
        .await
        .unwrap();
    for i in 0..3 {
        assert_eq!(s.next().await.unwrap(), Some(i));
    }
    match s.next().await {
        Err(TransportError::Remote(why)) => assert_eq!(why, "failed at 3"),
        other => panic!("expected the server's error, got {other:?}"),
    }

    // Dropping the stream cancels the server's handler at once.
    let mut s = conn.call_stream::<_, u32>(&Req::Hold).await.unwrap();
    assert_eq!(s.next().await.unwrap(), Some(7));
    drop(s);
    tokio::time::timeout(Duration::from_secs(10), cancelled.recv())
        .await
        .expect("the server learns of the cancel")
        .unwrap();

    // The connection is fine afterwards.
    let r: u32 = conn.call(&Req::Unary(1)).await.unwrap();
    assert_eq!(r, 2);
}

/// Serves `Counter` at `addr` on a thread with its own runtime until the returned sender is
/// dropped, then drops the runtime without closing anything (like a killed process).
/// Returns the bound address, and the thread to join.
fn serve_until(
    id: Identity,
    addr: SocketAddr,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (die, dead) = tokio::sync::oneshot::channel::<()>();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(async {
            let server = Endpoint::bind(addr, &id, &TransportConfig::default()).unwrap();
            let (c, _) = mpsc::unbounded_channel();
            let _serving = server.serve(Arc::new(Counter { cancelled: c }));
            tx.send(server.local_addr()).unwrap();
            let _ = dead.await;
            server
        });
        // The runtime goes first: nothing is sent to the peers.
        drop(rt);
        drop(server);
    });
    (rx.recv().unwrap(), die, h)
}

/// An endpoint that died without a word (its process killed) and came back on the same
/// address with the same identity resets its peers' old connections at once: the next call
/// on one fails within a second, not after the idle timeout, and a new connection works.
#[tokio::test(flavor = "current_thread")]
async fn a_restarted_endpoint_resets_stale_connections() {
    let ca = CertAuthority::generate("t").unwrap();
    let mk = |n: &str| {
        let i = ca.issue_node(n, Validity::default()).unwrap();
        Identity::from_pem(&ca.cert_pem, &i.cert_pem, &i.key_pem).unwrap()
    };
    let server_id = mk("server");
    let (addr, kill_first, first) = serve_until(server_id.clone(), local());
    let client = Endpoint::bind(local(), &mk("client"), &TransportConfig::default()).unwrap();
    let conn = client.connect(addr, "server").await.unwrap();
    let r: u32 = conn.call(&Req::Unary(1)).await.unwrap();
    assert_eq!(r, 2);
    drop(kill_first);
    tokio::task::spawn_blocking(move || first.join().unwrap())
        .await
        .unwrap();
    let (_, kill_second, second) = serve_until(server_id, addr);
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), conn.call::<_, u32>(&Req::Unary(1)))
        .await
        .expect("the stale connection fails, not hangs");
    assert!(r.is_err(), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "reset at once, not after the idle timeout: {:?}",
        t.elapsed()
    );
    let conn = client.connect(addr, "server").await.unwrap();
    let r: u32 = conn.call(&Req::Unary(5)).await.unwrap();
    assert_eq!(r, 6);
    drop(kill_second);
    tokio::task::spawn_blocking(move || second.join().unwrap())
        .await
        .unwrap();
}
