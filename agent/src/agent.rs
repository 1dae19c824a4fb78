//! The agent's life cycle: bind the transport with the node certificate, serve peers, tell
//! systemd, keep the watchdog fed, shut down cleanly on SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_transport::{Endpoint, Identity, PROTOCOL_VERSION, PeerIdentity, Service};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::config::Validated;
use crate::notify::Notifier;
use crate::wire::{AgentRequest, AgentResponse};

/// Bound on the graceful part of shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the agent answers on its transport.
pub struct AgentService {
    node: String,
    started: Instant,
}

impl Service for AgentService {
    type Request = AgentRequest;
    type Response = AgentResponse;

    async fn call(&self, _peer: &PeerIdentity, req: AgentRequest) -> Result<AgentResponse, String> {
        match req {
            AgentRequest::Ping { nonce } => Ok(AgentResponse::Pong {
                node: self.node.clone(),
                nonce,
                protocol_version: PROTOCOL_VERSION,
                uptime_ms: self.started.elapsed().as_millis() as u64,
            }),
        }
    }
}

/// Runs the agent until a termination signal. The configuration and identity were validated
/// by the caller before this binds anything.
pub async fn run(cfg: Validated, identity: Identity, notifier: Notifier) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let discovery = cfg.gpu_discovery()?;
    let interval = Duration::from_millis(cfg.config.gpus.sample_interval_ms);
    // Kept for the liveness reports the control plane sends.
    let _inventory = crate::gpus::start_sampler(discovery, interval)?;
    let endpoint = Endpoint::bind(cfg.listen, &identity, &cfg.config.transport)?;
    let service = Arc::new(AgentService {
        node: cfg.node_name.clone(),
        started: Instant::now(),
    });
    let server = endpoint.serve(service);
    info!(
        node = %cfg.node_name,
        listen = %endpoint.local_addr(),
        protocol = PROTOCOL_VERSION,
        "agent ready"
    );
    notifier.ready(&format!("serving on {}", endpoint.local_addr()));
    let watchdog = notifier.watchdog_interval().map(|every| {
        let n = notifier.clone();
        info!(
            interval_ms = every.as_millis() as u64,
            "feeding the systemd watchdog"
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                n.watchdog();
            }
        })
    });
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = why, "shutting down");
    notifier.stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    endpoint.shutdown(SHUTDOWN_GRACE).await;
    server.abort();
    info!("stopped");
    Ok(())
}

/// One ping to a peer agent using this node's identity; returns the answer and the round trip.
pub async fn ping(
    cfg: &Validated,
    identity: &Identity,
    peer: &str,
    addr: std::net::SocketAddr,
    nonce: u64,
) -> anyhow::Result<(AgentResponse, Duration)> {
    let local = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let endpoint = Endpoint::bind(local.parse()?, identity, &cfg.config.transport)?;
    let conn = endpoint.connect(addr, peer).await?;
    let start = Instant::now();
    let resp: AgentResponse = conn.call(&AgentRequest::Ping { nonce }).await?;
    let rtt = start.elapsed();
    conn.close("done");
    endpoint.shutdown(Duration::from_millis(200)).await;
    let AgentResponse::Pong { nonce: n, .. } = &resp;
    if *n != nonce {
        anyhow::bail!("{peer} answered ping {nonce} with pong {n}");
    }
    Ok((resp, rtt))
}
