//! The transport benchmark: the same bytes through the production QUIC transport (striped over
//! K endpoint pairs), through TLS 1.3 over TCP (tokio-rustls, the same certificates and cipher
//! suite, K connections, writes of 256 KiB) and through plain TCP (K connections), alternating,
//! several repetitions, in one run on loopback. Figures are medians; the ratio is QUIC over
//! TLS/TCP, the fair baseline for an encrypted transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::bulk::{BulkHeader, BulkReader, send_striped, stripe_ranges};
use crate::config::TransportConfig;
use crate::endpoint::{Connection, Endpoint, Service, TransportError};
use crate::pki::{CertAuthority, PeerIdentity, Validity};
use crate::tls::Identity;

/// Size of each write on the TCP baselines.
pub const TCP_WRITE_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub bytes: u64,
    /// Parallelism K: QUIC endpoint pairs, or TCP connections.
    pub streams: usize,
    pub reps: usize,
    pub transport: TransportConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub bytes: u64,
    pub streams: usize,
    pub reps: usize,
    /// Median GB/s (10^9 bytes per second).
    pub quic_gbps: f64,
    pub tls_tcp_gbps: f64,
    pub tcp_gbps: f64,
    /// quic_gbps / tls_tcp_gbps.
    pub ratio: f64,
    /// Largest UDP payload the QUIC connections actually used (after MTU discovery).
    pub datagram_bytes: u16,
    pub gso: bool,
    pub gso_segments_max: usize,
    pub udp_buffer_bytes: usize,
    pub congestion: crate::config::Congestion,
    pub quic_samples_gbps: Vec<f64>,
    pub tls_tcp_samples_gbps: Vec<f64>,
    pub tcp_samples_gbps: Vec<f64>,
    /// QUIC packets the receivers counted as lost, summed over the run.
    pub quic_lost_packets: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("benchmark i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("benchmark setup: {0}")]
    Setup(String),
}

/// Counts bulk bytes and reports each finished part.
struct Sink {
    done: mpsc::UnboundedSender<u64>,
}

impl Service for Sink {
    type Request = ();
    type Response = ();
    async fn call(&self, _: &PeerIdentity, _: ()) -> Result<(), String> {
        Ok(())
    }
    async fn bulk(
        &self,
        _: &PeerIdentity,
        header: BulkHeader,
        mut body: BulkReader,
    ) -> Result<(), String> {
        let mut n = 0u64;
        while let Some(c) = body.chunk().await.map_err(|e| e.to_string())? {
            n += c.len() as u64;
        }
        debug_assert_eq!(n, header.len);
        let _ = self.done.send(n);
        Ok(())
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

struct Pki {
    server: Identity,
    client: Identity,
}

fn bench_pki() -> Result<Pki, BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    let ca = CertAuthority::generate("bench").map_err(|e| setup(&e))?;
    let s = ca
        .issue_node("bench-server", Validity::default())
        .map_err(|e| setup(&e))?;
    let c = ca
        .issue_node("bench-client", Validity::default())
        .map_err(|e| setup(&e))?;
    Ok(Pki {
        server: Identity::from_pem(&ca.cert_pem, &s.cert_pem, &s.key_pem).map_err(|e| setup(&e))?,
        client: Identity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).map_err(|e| setup(&e))?,
    })
}

struct QuicRig {
    lanes: Vec<Connection>,
    done: mpsc::UnboundedReceiver<u64>,
    _servers: Vec<Endpoint>,
    _clients: Vec<Endpoint>,
    udp_buffer: usize,
}

async fn quic_rig(pki: &Pki, k: usize, cfg: &TransportConfig) -> Result<QuicRig, BenchError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = Arc::new(Sink { done: tx });
    let local: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    let mut lanes = Vec::new();
    let mut udp_buffer = usize::MAX;
    for _ in 0..k {
        let s = Endpoint::bind(local, &pki.server, cfg)?;
        s.serve(sink.clone());
        let c = Endpoint::bind(local, &pki.client, cfg)?;
        udp_buffer = udp_buffer
            .min(s.udp_buffer_granted)
            .min(c.udp_buffer_granted);
        lanes.push(c.connect(s.local_addr(), "bench-server").await?);
        servers.push(s);
        clients.push(c);
    }
    Ok(QuicRig {
        lanes,
        done: rx,
        _servers: servers,
        _clients: clients,
        udp_buffer,
    })
}

async fn quic_once(rig: &mut QuicRig, id: u64, data: &Bytes) -> Result<f64, BenchError> {
    let start = Instant::now();
    send_striped(&rig.lanes, id, &[], data.clone()).await?;
    let mut got = 0u64;
    while got < data.len() as u64 {
        got += rig
            .done
            .recv()
            .await
            .ok_or_else(|| BenchError::Setup("QUIC sink went away".into()))?;
    }
    Ok(gbps(data.len() as u64, start.elapsed().as_secs_f64()))
}

/// K TCP (optionally TLS) connections kept across repetitions.
struct TcpRig<S> {
    senders: Vec<S>,
    done: mpsc::UnboundedReceiver<u64>,
}

async fn tcp_rig(
    k: usize,
    tls: Option<&Pki>,
    parts: Vec<u64>,
) -> Result<TcpRig<Box<dyn AsyncWriteUnpin>>, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = match tls {
        Some(p) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            p.server
                .server_config()
                .map_err(|e| BenchError::Setup(e.to_string()))?,
        ))),
        None => None,
    };
    let connector = match tls {
        Some(p) => Some(tokio_rustls::TlsConnector::from(Arc::new(
            p.client
                .client_config()
                .map_err(|e| BenchError::Setup(e.to_string()))?,
        ))),
        None => None,
    };
    let mut senders: Vec<Box<dyn AsyncWriteUnpin>> = Vec::new();
    for part in parts.iter().copied().take(k) {
        let connect = TcpStream::connect(addr);
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let (client, (server, _)) = (client?, accepted?);
        let tx = tx.clone();
        match (&acceptor, &connector) {
            (Some(a), Some(c)) => {
                let name =
                    rustls::pki_types::ServerName::try_from("bench-server").expect("valid name");
                let (cs, ss) = tokio::join!(c.connect(name, client), a.accept(server));
                tokio::spawn(drain(ss?, part, tx));
                senders.push(Box::new(cs?));
            }
            _ => {
                tokio::spawn(drain(server, part, tx));
                senders.push(Box::new(client));
            }
        }
    }
    Ok(TcpRig { senders, done: rx })
}

trait AsyncWriteUnpin: AsyncWrite + Unpin + Send {}
impl<T: AsyncWrite + Unpin + Send> AsyncWriteUnpin for T {}

/// Reads `part` bytes per repetition, forever, reporting each completed part.
async fn drain<R: AsyncRead + Unpin>(mut r: R, part: u64, done: mpsc::UnboundedSender<u64>) {
    let mut buf = vec![0u8; 4 * TCP_WRITE_BYTES];
    loop {
        let mut left = part;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            match r.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n as u64,
            }
        }
        if done.send(part).is_err() {
            return;
        }
    }
}

async fn tcp_once(
    rig: &mut TcpRig<Box<dyn AsyncWriteUnpin>>,
    data: &Bytes,
) -> Result<f64, BenchError> {
    let ranges = stripe_ranges(data.len() as u64, rig.senders.len());
    let start = Instant::now();
    let writes = rig.senders.iter_mut().zip(ranges).map(|(w, (off, len))| {
        let part = data.slice(off as usize..(off + len) as usize);
        async move {
            for chunk in part.chunks(TCP_WRITE_BYTES) {
                w.write_all(chunk).await?;
            }
            w.flush().await
        }
    });
    let results = join_all(writes).await;
    for r in results {
        r?;
    }
    let mut got = 0u64;
    while got < data.len() as u64 {
        got += rig
            .done
            .recv()
            .await
            .ok_or_else(|| BenchError::Setup("TCP reader went away".into()))?;
    }
    Ok(gbps(data.len() as u64, start.elapsed().as_secs_f64()))
}

/// Runs futures concurrently on this task (no spawning: the writers borrow the rig).
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("all ready")).collect()
}

/// Runs the benchmark. Call inside a multi-threaded tokio runtime.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let k = opts.streams.max(1);
    let reps = opts.reps.max(1);
    if opts.bytes < k as u64 {
        return Err(BenchError::Setup(format!(
            "--bytes {} is smaller than --streams {k}",
            opts.bytes
        )));
    }
    let pki = bench_pki()?;
    let data = Bytes::from(vec![0xa5u8; opts.bytes as usize]);
    let warm = data.slice(..(opts.bytes.min(64 << 20) as usize));
    let parts: Vec<u64> = stripe_ranges(opts.bytes, k)
        .into_iter()
        .map(|r| r.1)
        .collect();
    let warm_parts: Vec<u64> = stripe_ranges(warm.len() as u64, k)
        .into_iter()
        .map(|r| r.1)
        .collect();

    let mut quic = quic_rig(&pki, k, &opts.transport).await?;
    // Warm-up (not counted): path-MTU discovery and congestion windows settle.
    quic_once(&mut quic, 0, &warm).await?;
    let mut warm_tls = tcp_rig(k, Some(&pki), warm_parts.clone()).await?;
    tcp_once(&mut warm_tls, &warm).await?;
    drop(warm_tls);
    let mut tls = tcp_rig(k, Some(&pki), parts.clone()).await?;
    let mut tcp = tcp_rig(k, None, parts).await?;

    let (mut q, mut t, mut p) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        q.push(quic_once(&mut quic, rep as u64 + 1, &data).await?);
        t.push(tcp_once(&mut tls, &data).await?);
        p.push(tcp_once(&mut tcp, &data).await?);
    }
    let datagram_bytes = quic
        .lanes
        .iter()
        .map(|c| c.datagram_bytes())
        .min()
        .unwrap_or(0);
    let lost = quic
        .lanes
        .iter()
        .map(|c| c.quic().stats().path.lost_packets)
        .sum();
    let (qm, tm, pm) = (median(&q), median(&t), median(&p));
    Ok(BenchReport {
        bytes: opts.bytes,
        streams: k,
        reps,
        quic_gbps: qm,
        tls_tcp_gbps: tm,
        tcp_gbps: pm,
        ratio: if tm > 0.0 { qm / tm } else { 0.0 },
        datagram_bytes,
        gso: opts.transport.gso,
        gso_segments_max: if opts.transport.gso {
            crate::config::gso_segments_max(opts.transport.max_datagram_bytes)
        } else {
            1
        },
        udp_buffer_bytes: quic.udp_buffer,
        congestion: opts.transport.congestion,
        quic_samples_gbps: q,
        tls_tcp_samples_gbps: t,
        tcp_samples_gbps: p,
        quic_lost_packets: lost,
    })
}
