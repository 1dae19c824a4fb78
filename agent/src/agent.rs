//! The agent's life cycle: bind the transport with the node certificate, start the control
//! plane (Raft), serve peers, sample GPUs, tell systemd, keep the watchdog fed, shut down
//! cleanly on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_transport::{
    BulkHeader, BulkReader, Endpoint, Identity, PROTOCOL_VERSION, PeerIdentity, ResponseSink,
    Service,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::config::{ConfigError, Validated};
use crate::control::ControlPlane;
use crate::coordinator::Coordinator;
use crate::custody::CaCustody;
use crate::notify::Notifier;
use crate::peers::Peers;
use crate::reporting::LocalReports;
use crate::wire::{AgentRequest, AgentResponse};

/// Bound on the graceful part of shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the agent answers on its transport.
pub struct AgentService {
    node: String,
    started: Instant,
    control: Arc<ControlPlane>,
    coordinator: Arc<Coordinator>,
    signer: Arc<crate::enrollment::Signer>,
    legs: Arc<crate::serving::legs::Legs>,
    metrics: Arc<crate::serving::metrics::Metrics>,
    models_dir: std::path::PathBuf,
    serving: Arc<crate::serving::Serving>,
    /// This agent serves the OpenAI API.
    api: bool,
}

impl Service for AgentService {
    type Request = AgentRequest;
    type Response = AgentResponse;

    async fn call(&self, peer: &PeerIdentity, req: AgentRequest) -> Result<AgentResponse, String> {
        self.admit(peer, &req)?;
        match req {
            AgentRequest::Ping { nonce } => Ok(AgentResponse::Pong {
                node: self.node.clone(),
                nonce,
                protocol_version: PROTOCOL_VERSION,
                uptime_ms: self.started.elapsed().as_millis() as u64,
            }),
            AgentRequest::Raft(r) => Ok(AgentResponse::Raft(
                pd_raft::network::handle(&self.control.raft, r).await,
            )),
            AgentRequest::Join { name, address } => self.control.join(peer, name, address).await,
            AgentRequest::Propose(cmd) => self.control.propose_from_peer(peer, cmd).await,
            AgentRequest::Status => Ok(AgentResponse::Status(self.control.status())),
            AgentRequest::Heartbeat { node } => self.coordinator.report(peer, &node, None, None),
            AgentRequest::Enroll {
                token,
                node,
                csr_pem,
            } => Ok(self.signer.enroll_forwarded(token, node, csr_pem).await),
            AgentRequest::Renew { csr_pem } => self.signer.renew(peer, &csr_pem).await,
            AgentRequest::FetchCaKey => {
                crate::custody::ca_key_for(&self.control, &self.signer.custody, peer)
            }
            AgentRequest::Report { node, gpus } => {
                self.coordinator.report(peer, &node, Some(gpus), None)
            }
            AgentRequest::Telemetry => Ok(AgentResponse::Telemetry(self.coordinator.telemetry())),
            AgentRequest::NodeReport {
                node,
                gpus,
                engines,
            } => self
                .coordinator
                .report(peer, &node, Some(gpus), Some(engines)),
            AgentRequest::Engines => Ok(AgentResponse::Engines(self.coordinator.engines())),
            AgentRequest::Serve(_) => Err("a Serve request is a stream".into()),
            AgentRequest::KvSeal(seal) => {
                self.legs.inbox.seal(seal);
                Ok(AgentResponse::KvSealed)
            }
            AgentRequest::Latencies => Ok(AgentResponse::Latencies(self.metrics.latencies())),
            AgentRequest::Workload => Ok(AgentResponse::Workload(self.metrics.workloads())),
            AgentRequest::StepTimes => Ok(AgentResponse::StepTimes(
                crate::wire::latency::EngineSteps::of(self.legs.supervisor().engine_stats()),
            )),
            AgentRequest::Directive { term, directive } => {
                self.control.directive(peer, term, directive).await
            }
            AgentRequest::LogTip => Ok(AgentResponse::LogTip(self.control.last_log_id().await)),
            AgentRequest::Routable { deployment } => Ok(AgentResponse::Routable {
                engines: self.serving.routable(&deployment),
                api: self.api,
            }),
            AgentRequest::CheckModel { model } => {
                let dir = self.models_dir.clone();
                tokio::task::spawn_blocking(move || crate::models::check(&dir, &model))
                    .await
                    .map(AgentResponse::ModelCheck)
                    .map_err(|e| format!("checking the model: {e}"))
            }
        }
    }

    fn streams(&self, req: &AgentRequest) -> bool {
        matches!(req, AgentRequest::Serve(_))
    }

    async fn stream(
        &self,
        peer: &PeerIdentity,
        req: AgentRequest,
        out: &mut ResponseSink<AgentResponse>,
    ) -> Result<(), String> {
        self.admit(peer, &req)?;
        let AgentRequest::Serve(leg) = req else {
            return Err("not a stream".into());
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(LEG_EVENTS_BUFFERED);
        let run = self.legs.run(leg, tx);
        let forward = async {
            let cancelled = out.cancelled();
            tokio::pin!(cancelled);
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => {
                            if out.send(AgentResponse::Serve(ev)).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                    _ = &mut cancelled => break,
                }
            }
            // Dropping `rx` tells the leg its reader is gone.
            drop(rx);
        };
        tokio::join!(run, forward);
        Ok(())
    }

    async fn bulk(
        &self,
        peer: &PeerIdentity,
        header: BulkHeader,
        body: BulkReader,
    ) -> Result<(), String> {
        if let Err(e) = self.admit_agent(peer, "only agents ship KV") {
            body.refuse();
            return Err(e);
        }
        self.legs.inbox.accept(header, body).await
    }
}

impl AgentService {
    /// The one check of who is calling, before any request is handled: a removed node is told
    /// so, and requests only agents make (`AgentRequest::agents_only`) are refused to anyone
    /// else (the admin certificate included).
    fn admit(&self, peer: &PeerIdentity, req: &AgentRequest) -> Result<(), String> {
        match req.agents_only() {
            Some(why) => self.admit_agent(peer, why).map(|_| ()),
            None => match peer {
                PeerIdentity::Node(name) if self.control.is_removed(name) => {
                    Err(crate::wire::removal_message(name))
                }
                _ => Ok(()),
            },
        }
    }

    /// `peer` as an agent of this cluster, or why not (`why` when it is not an agent).
    fn admit_agent<'a>(&self, peer: &'a PeerIdentity, why: &str) -> Result<&'a str, String> {
        let PeerIdentity::Node(name) = peer else {
            return Err(why.to_string());
        };
        if self.control.is_removed(name) {
            return Err(crate::wire::removal_message(name));
        }
        Ok(name)
    }
}

/// Events of a leg buffered between its engine and a slow reader.
const LEG_EVENTS_BUFFERED: usize = 256;

/// The address peers reach this agent at: `node.advertise`, or `listen` when it is specific,
/// or (wildcard listen, no advertise) the local address of the route to the first seed.
fn advertise_address(cfg: &Validated, bound: SocketAddr) -> Result<SocketAddr, ConfigError> {
    if let Some(a) = cfg.advertise {
        return Ok(if a.port() == 0 { bound } else { a });
    }
    if let Some(seed) = cfg.seeds.first() {
        // connect() on UDP sends nothing: it only asks the kernel which source address it would
        // use for that destination.
        let probe = std::net::UdpSocket::bind((bound.ip(), 0)).and_then(|s| {
            s.connect(seed.address)?;
            s.local_addr()
        });
        if let Ok(local) = probe {
            return Ok(SocketAddr::new(local.ip(), bound.port()));
        }
    }
    Err(ConfigError {
        field: "node.advertise".into(),
        why: format!(
            "node.listen is {} (a wildcard) and no address could be derived: set node.advertise",
            cfg.listen
        ),
    })
}

/// How `pdagent run` was asked to start.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Found a new cluster (only when the data dir holds no Raft state).
    pub bootstrap: bool,
    /// Take custody of this CA key (copied to `<data_dir>/ca.key`, mode 0600).
    pub ca_key: Option<std::path::PathBuf>,
}

/// Runs the agent until a termination signal. The configuration and identity were validated
/// by the caller before this binds anything.
pub async fn run(
    cfg: Validated,
    identity: Identity,
    notifier: Notifier,
    opts: RunOptions,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let discovery = cfg.gpu_discovery()?;
    let interval = Duration::from_millis(cfg.config.gpus.sample_interval_ms);
    let inventory = crate::gpus::start_sampler(discovery, interval)?;
    let endpoint = Endpoint::bind(cfg.listen, &identity, &cfg.config.transport)?;
    let advertise = advertise_address(&cfg, endpoint.local_addr())?;
    let ca_pem = std::fs::read_to_string(&cfg.ca_cert)?;
    let custody = Arc::new(
        CaCustody::open(&cfg.config.node.data_dir, &ca_pem).map_err(|e| ConfigError {
            field: "node.data_dir".into(),
            why: e,
        })?,
    );
    if let Some(path) = &opts.ca_key {
        let key = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: "--ca-key".into(),
            why: format!("cannot read {}: {e}", path.display()),
        })?;
        custody.store(&key).map_err(|why| ConfigError {
            field: "--ca-key".into(),
            why,
        })?;
        info!(path = %custody.path().display(), "took custody of the CA key");
    }
    // Enrollment shares the transport's port number, on TCP.
    let enroll_listener = tokio::net::TcpListener::bind(endpoint.local_addr())
        .await
        .map_err(|e| ConfigError {
            field: "node.listen".into(),
            why: format!(
                "cannot bind TCP {} for enrollment (the same port as the QUIC transport): {e}",
                endpoint.local_addr()
            ),
        })?;
    let peers = Arc::new(Peers::new(endpoint.clone()));
    let control = ControlPlane::start(&cfg, advertise, peers.clone(), opts.bootstrap).await?;
    let every = Duration::from_millis(cfg.config.raft.coordinator_interval_ms);
    let local = Arc::new(LocalReports::new(Some(inventory)));
    let coordinator = Coordinator::new(&cfg, control.clone(), local.clone());
    let coordinating = coordinator.spawn();
    let reporting = tokio::spawn(crate::reporting::report_loop(
        control.clone(),
        local.clone(),
        Duration::from_millis(cfg.config.cluster.heartbeat_ms),
        every,
    ));
    let keeping = tokio::spawn(crate::custody::custody_loop(
        control.clone(),
        custody.clone(),
        every,
    ));
    let signer = Arc::new(crate::enrollment::Signer {
        control: control.clone(),
        custody: custody.clone(),
        ca_pem,
    });
    let enroll =
        pd_transport::enroll::serve_enrollment(enroll_listener, endpoint.clone(), signer.clone());
    let kv_socket = crate::kv::bridge::socket_path(&cfg.config.node.data_dir);
    let vllm = crate::driver::vllm::Vllm::new(
        cfg.config.drivers.vllm.clone(),
        advertise.ip().to_string(),
        &cfg.config.node.data_dir,
        kv_socket,
    )
    .map_err(|why| ConfigError {
        field: "drivers.vllm".into(),
        why,
    })?;
    let supervisor = crate::supervisor::Supervisor::new(
        &cfg.node_name,
        &cfg.config.node.data_dir,
        &cfg.models_dir,
        Arc::new(SupervisorOrders {
            control: control.clone(),
            local: local.clone(),
        }),
        local.inventory(),
        vec![Arc::new(vllm)],
    )?;
    let metrics = Arc::new(crate::serving::metrics::Metrics::default());
    let serving_cfg = crate::serving::ServingConfig::of(&cfg.config.serving);
    let legs = Arc::new(crate::serving::legs::Legs::new(
        supervisor.clone(),
        peers.clone(),
        control.clone(),
        serving_cfg.kv,
        metrics.clone(),
        &cfg.config.node.data_dir,
    ));
    let bridging = legs.bridge.listen().map_err(|e| ConfigError {
        field: "node.data_dir".into(),
        why: format!("cannot listen on {}: {e}", legs.bridge.path().display()),
    })?;
    let serving = crate::serving::Serving::new(
        serving_cfg,
        control.clone(),
        coordinator.clone(),
        peers.clone(),
        legs.clone(),
        metrics.clone(),
    );
    let refreshing = serving.spawn_refresher();
    let autoplanner = crate::autoplan::Autoplanner::new(
        control.clone(),
        metrics.clone(),
        supervisor.clone(),
        Duration::from_millis(cfg.config.raft.autoplan_interval_ms),
    );
    let replanning = autoplanner.spawn();
    let api_addr = match cfg.serving_listen {
        Some(addr) => Some(crate::serving::ingress::serve(addr, serving.clone()).await?),
        None => None,
    };
    let supervising = tokio::spawn(supervisor.run(
        Duration::from_millis(cfg.config.raft.coordinator_interval_ms),
        control.engines_kick.clone(),
    ));
    let renewal = tokio::spawn(crate::enrollment::renewal_loop(
        signer.clone(),
        cfg.clone(),
        every,
    ));
    let admin = |local: bool| {
        crate::admin::router(Arc::new(crate::admin::AdminCtx {
            control: control.clone(),
            coordinator: coordinator.clone(),
            peers: peers.clone(),
            metrics: metrics.clone(),
            models_dir: cfg.models_dir.clone(),
            kv_transport_default: crate::driver::vllm::default_kv_transport(
                &cfg.config.drivers.vllm,
            ),
            serving: serving.clone(),
            autoplan: autoplanner.clone(),
            api: api_addr.is_some(),
            local,
        }))
    };
    let admin_addr = crate::admin::serve_https(cfg.admin_listen, &endpoint, admin(false)).await?;
    crate::admin::serve_unix(&cfg.admin_socket, admin(true)).await?;
    let service = Arc::new(AgentService {
        node: cfg.node_name.clone(),
        started: Instant::now(),
        control: control.clone(),
        coordinator: coordinator.clone(),
        signer: signer.clone(),
        legs,
        metrics,
        models_dir: cfg.models_dir.clone(),
        serving: serving.clone(),
        api: api_addr.is_some(),
    });
    let server = endpoint.serve(service);
    info!(
        node = %cfg.node_name,
        listen = %endpoint.local_addr(),
        %advertise,
        admin = %admin_addr,
        openai = %api_addr.map_or("none".to_string(), |a| a.to_string()),
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
    enroll.abort();
    renewal.abort();
    refreshing.abort();
    replanning.abort();
    bridging.abort();
    coordinating.abort();
    reporting.abort();
    keeping.abort();
    // Engines keep running: a restarted agent re-adopts them.
    supervising.abort();
    control.shutdown().await;
    endpoint.shutdown(SHUTDOWN_GRACE).await;
    server.abort();
    info!("stopped");
    Ok(())
}

/// One request to an agent with this node's identity, from a throwaway endpoint.
async fn request(
    cfg: &Validated,
    identity: &Identity,
    peer: &str,
    addr: SocketAddr,
    req: &AgentRequest,
) -> anyhow::Result<(AgentResponse, Duration)> {
    let local = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let endpoint = Endpoint::bind(local.parse()?, identity, &cfg.config.transport)?;
    let conn = endpoint.connect(addr, peer).await?;
    let start = Instant::now();
    let resp: AgentResponse = conn.call(req).await?;
    let rtt = start.elapsed();
    conn.close("done");
    endpoint.shutdown(Duration::from_millis(200)).await;
    Ok((resp, rtt))
}

/// One ping to a peer agent using this node's identity; returns the answer and the round trip.
pub async fn ping(
    cfg: &Validated,
    identity: &Identity,
    peer: &str,
    addr: SocketAddr,
    nonce: u64,
) -> anyhow::Result<(AgentResponse, Duration)> {
    let (resp, rtt) = request(cfg, identity, peer, addr, &AgentRequest::Ping { nonce }).await?;
    match &resp {
        AgentResponse::Pong { nonce: n, .. } if *n == nonce => Ok((resp, rtt)),
        other => anyhow::bail!("{peer} answered ping {nonce} with {other:?}"),
    }
}

/// Sends a directive with this node's identity (as a coordinator does); the answer says
/// whether it was carried out or refused.
pub async fn directive(
    cfg: &Validated,
    identity: &Identity,
    peer: &str,
    addr: SocketAddr,
    term: u64,
    directive: crate::wire::Directive,
) -> anyhow::Result<AgentResponse> {
    let req = AgentRequest::Directive { term, directive };
    Ok(request(cfg, identity, peer, addr, &req).await?.0)
}

/// The cluster as the agent at `addr` (by default this host's own agent) sees it.
pub async fn status(
    cfg: &Validated,
    identity: &Identity,
    peer: &str,
    addr: SocketAddr,
) -> anyhow::Result<crate::wire::StatusReport> {
    match request(cfg, identity, peer, addr, &AgentRequest::Status).await? {
        (AgentResponse::Status(s), _) => Ok(s),
        (other, _) => anyhow::bail!("{peer} answered status with {other:?}"),
    }
}

/// The supervisor takes its orders from the replicated state and publishes its engines for
/// liveness reports.
struct SupervisorOrders {
    control: Arc<ControlPlane>,
    local: Arc<LocalReports>,
}

impl crate::supervisor::Orders for SupervisorOrders {
    fn state(&self) -> pd_raft::ClusterState {
        self.control.state_snapshot()
    }

    fn publish(&self, engines: Vec<crate::wire::EngineReport>) {
        self.local.set_engines(engines)
    }
}
