//! Bulk transfers: raw bytes arrive intact, striped over several endpoints, and a transfer
//! cut by the sender is reported to the receiver at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pd_transport::pki::{CertAuthority, Validity};
use pd_transport::{
    BulkHeader, BulkReader, Endpoint, Identity, PeerIdentity, Service, TransportConfig,
    send_striped,
};
use tokio::sync::mpsc;

/// (transfer_id, offset, meta, bytes) of one received part.
type Part = (u64, u64, Vec<u8>, Vec<u8>);

/// Reassembles transfers and reports (transfer_id, offset, bytes) or an error per part.
struct Collect {
    tx: mpsc::UnboundedSender<Result<Part, String>>,
    total: Mutex<u64>,
}

impl Service for Collect {
    type Request = ();
    type Response = ();
    async fn call(&self, _: &PeerIdentity, _: ()) -> Result<(), String> {
        Ok(())
    }
    async fn bulk(
        &self,
        _: &PeerIdentity,
        h: BulkHeader,
        mut body: BulkReader,
    ) -> Result<(), String> {
        let mut buf = Vec::new();
        if h.transfer_id == ANNOUNCE {
            let _ = self
                .tx
                .send(Ok((h.transfer_id, 0, b"started".to_vec(), vec![])));
        }
        loop {
            match body.chunk().await {
                Ok(Some(c)) => buf.extend_from_slice(&c),
                Ok(None) => break,
                Err(e) => {
                    let _ = self.tx.send(Err(e.to_string()));
                    return Err(e.to_string());
                }
            }
        }
        *self.total.lock().unwrap() += buf.len() as u64;
        let _ = self
            .tx
            .send(Ok((h.transfer_id, h.offset, h.meta.clone(), buf)));
        Ok(())
    }
}

/// Transfers with this id announce that the receiver has started reading them.
const ANNOUNCE: u64 = 1;

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn ids() -> (Identity, Identity) {
    let ca = CertAuthority::generate("t").unwrap();
    let mk = |n: &str| {
        let i = ca.issue_node(n, Validity::default()).unwrap();
        Identity::from_pem(&ca.cert_pem, &i.cert_pem, &i.key_pem).unwrap()
    };
    (mk("recv"), mk("send"))
}

/// 3 lanes on 3 endpoint pairs carry one transfer; reassembled, it equals what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn striped_transfer_arrives_intact() {
    let (rid, sid) = ids();
    let cfg = TransportConfig::default();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = Arc::new(Collect {
        tx,
        total: Mutex::new(0),
    });
    let mut lanes = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..3 {
        let s = Endpoint::bind(local(), &rid, &cfg).unwrap();
        s.serve(sink.clone());
        let c = Endpoint::bind(local(), &sid, &cfg).unwrap();
        lanes.push(c.connect(s.local_addr(), "recv").await.unwrap());
        keep.push((s, c));
    }
    let data: Vec<u8> = (0..(5 << 20) + 7)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    send_striped(&lanes, 99, b"layer-0", Bytes::from(data.clone()))
        .await
        .unwrap();
    let mut whole = vec![0u8; data.len()];
    for _ in 0..3 {
        let (id, off, meta, part) = rx.recv().await.unwrap().unwrap();
        assert_eq!(id, 99);
        assert_eq!(meta, b"layer-0");
        whole[off as usize..off as usize + part.len()].copy_from_slice(&part);
    }
    assert_eq!(whole, data);
    assert_eq!(*sink.total.lock().unwrap(), data.len() as u64);
}

/// A sender that aborts mid-transfer: the receiver gets an error, not a hang and not a
/// short success.
#[tokio::test]
async fn aborted_transfer_is_reported_at_once() {
    let (rid, sid) = ids();
    let cfg = TransportConfig::default();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let s = Endpoint::bind(local(), &rid, &cfg).unwrap();
    s.serve(Arc::new(Collect {
        tx,
        total: Mutex::new(0),
    }));
    let c = Endpoint::bind(local(), &sid, &cfg).unwrap();
    let conn = c.connect(s.local_addr(), "recv").await.unwrap();
    let h = BulkHeader {
        transfer_id: 1,
        offset: 0,
        len: 1 << 20,
        total_len: 1 << 20,
        meta: vec![],
    };
    let mut w = conn.open_bulk(&h).await.unwrap();
    w.write(Bytes::from(vec![1u8; 4096])).await.unwrap();
    // Abort once the receiver is reading (before that, the peer never learns of the transfer).
    let started = rx.recv().await.unwrap().unwrap();
    assert_eq!(started.2, b"started");
    w.abort();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("no hang")
        .unwrap();
    let e = got.expect_err("a cut transfer must be an error");
    assert!(
        e.contains("cut") || e.contains("short") || e.contains("reset"),
        "{e}"
    );
    // Writing more than the header's length is refused on the sender side.
    let mut w = conn.open_bulk(&BulkHeader { len: 10, ..h }).await.unwrap();
    assert!(w.write(Bytes::from(vec![0u8; 11])).await.is_err());
}
