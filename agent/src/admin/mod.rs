//! The admin API that `pdctl` speaks: JSON over HTTP/1.1, served on HTTPS with mutual TLS
//! (only the admin certificate from `pdctl cluster init` is accepted) and on a local unix
//! socket that only the agent's user can open. Any agent answers reads from its replicated
//! state. Writes are applied only by the coordinator, which checks the caller's credential
//! itself: another agent answers `421 not_coordinator` naming it (`error.coordinator`), and
//! `pdctl` sends the write there. A local socket on a host that is not the coordinator may
//! only cordon or drain that host (`authority`).
//!
//! Routes:
//! - `GET /v1/status` — the cluster as this agent sees it (`voters_short` says why it has
//!   fewer Raft voters than it wants, when it has).
//! - `PUT /v1/nodes/{node}/labels/{key}` with `{"value": "..."}`; `DELETE` removes the label.
//! - `POST /v1/nodes/{node}/cordon`, `/uncordon`, `/drain`, `/flip` (`{"role": "prefill" |
//!   "decode"}`: the node's engines change role, see `Command::FlipNode`).
//! - `DELETE /v1/nodes/{node}` — remove the node from the cluster.
//! - `GET /v1/engines` — every assigned engine with its state as its agent reports it.
//! - `GET /v1/deployments` (each with its engines, the planner's prediction for a planned
//!   layout, and the TTFT and TPOT the agents measured); `POST /v1/deployments` with
//!   `{"name", "engine", "model", "tp", "prefill", "decode" | "colocated", "ttft_ms",
//!   "tpot_ms"}`, or `"layout": "planned"` with the targets and optional `"isl"`, `"osl"`,
//!   `"max_gpus"` (the planner sizes it on the free GPUs; see `planned`), and optionally
//!   `"model_fingerprint"`. A model folder is looked for on every node (`models`): engines go
//!   only where a copy matches (409 `model_not_found` when none does). Refused with 409
//!   `does_not_fit` and what is missing when the engines cannot all be placed now;
//!   `DELETE /v1/deployments/{name}`; `PUT /v1/deployments/{name}/layout` with `{"prefill",
//!   "decode"}` or `{"colocated"}`; `GET /v1/deployments/{name}/routable`: whether every
//!   agent's router would route to all of its engines now (`pdctl deploy --wait`).
//! - `GET /v1/apikeys` (ids, names, creation times); `POST /v1/apikeys` with `{"name"}`
//!   answers the new key once (only its SHA-256 is stored) and from then on the OpenAI API
//!   asks for a key; `DELETE /v1/apikeys/{id}`; `PUT /v1/apikeys/required` with
//!   `{"required": bool}` (revoking keys never opens the API, only this does).
//!
//! Errors are `{"error": {"message": ..., "code": ...}}` with a 4xx or 5xx status.

mod deployments;
mod nodes;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use pd_api::{Changed, ErrorBody, ErrorDetail};
use pd_raft::{Applied, ApplyError, Command};
use pd_transport::{Endpoint, PeerIdentity};
use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::control::{ControlPlane, SubmitError};
use crate::peers::Peers;
use crate::wire::{AgentRequest, AgentResponse};

/// Workload a planned layout is sized for when the deployment names none.
pub const PLANNED_ISL_DEFAULT: u32 = 1024;
pub const PLANNED_OSL_DEFAULT: u32 = 256;
/// Bound on asking the coordinator for every node's engines.
const ENGINES_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on asking one agent for its measured latencies.
const LATENCIES_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on a TLS handshake from an admin client.
const ADMIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AdminCtx {
    pub control: Arc<ControlPlane>,
    pub coordinator: Arc<crate::coordinator::Coordinator>,
    pub peers: Arc<Peers>,
    /// This agent's serving metrics (the other agents' are asked for).
    pub metrics: Arc<crate::serving::metrics::Metrics>,
    /// `node.models_dir`: where this host's relative model names are.
    pub models_dir: std::path::PathBuf,
    /// The KV transport of a vllm deployment that names none (from `[drivers.vllm]`).
    pub kv_transport_default: crate::driver::KvTransport,
    /// This agent's serving path (what its router would choose).
    pub serving: Arc<crate::serving::Serving>,
    /// The re-planning loop (its decisions, while this agent is the coordinator).
    pub autoplan: Arc<crate::autoplan::Autoplanner>,
    /// This agent serves the OpenAI API.
    pub api: bool,
    /// Serving the local unix socket (rather than HTTPS with the admin certificate): on a
    /// host that is not the coordinator it may write only what this node may say about
    /// itself (`authority`).
    pub local: bool,
}

/// An API error: status, code and message.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.2,
                code: self.1.to_string(),
                coordinator: None,
            },
        };
        (self.0, Json(body)).into_response()
    }
}

/// A write this agent may not apply: `421 not_coordinator`, naming the coordinator whose
/// admin API takes it (`error.coordinator`; `pdctl` sends the write there).
pub(super) struct NotCoordinator {
    coordinator: String,
    message: String,
}

impl IntoResponse for NotCoordinator {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                code: "not_coordinator".into(),
                coordinator: Some(self.coordinator),
            },
        };
        (StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response()
    }
}

/// A refused admin write.
pub(super) enum WriteError {
    Api(ApiError),
    Elsewhere(NotCoordinator),
}

impl From<ApiError> for WriteError {
    fn from(e: ApiError) -> Self {
        WriteError::Api(e)
    }
}

impl IntoResponse for WriteError {
    fn into_response(self) -> Response {
        match self {
            WriteError::Api(e) => e.into_response(),
            WriteError::Elsewhere(e) => e.into_response(),
        }
    }
}

pub(super) fn apply_error(e: ApplyError) -> ApiError {
    match e {
        ApplyError::UnknownNode(_) => {
            ApiError(StatusCode::NOT_FOUND, "unknown_node", e.to_string())
        }
        ApplyError::BadLabel { .. } | ApplyError::TooManyLabels { .. } => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_label", e.to_string())
        }
        ApplyError::NameTaken { .. } | ApplyError::IdTaken { .. } | ApplyError::Refused(_) => {
            ApiError(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        ApplyError::UnknownDeployment(_) => {
            ApiError(StatusCode::NOT_FOUND, "unknown_deployment", e.to_string())
        }
        ApplyError::DeploymentExists(_) => {
            ApiError(StatusCode::CONFLICT, "deployment_exists", e.to_string())
        }
        ApplyError::BadDeployment(_) => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_deployment", e.to_string())
        }
        ApplyError::BadApiKey(_) => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_api_key", e.to_string())
        }
        ApplyError::UnknownApiKey(_) => {
            ApiError(StatusCode::NOT_FOUND, "unknown_api_key", e.to_string())
        }
    }
}

/// Asks every other agent not recorded down, at once; each answer (or `None`: no answer
/// within `timeout`) by node.
pub(super) async fn ask_other_agents(
    ctx: &AdminCtx,
    s: &pd_raft::ClusterState,
    req: AgentRequest,
    timeout: Duration,
) -> Vec<(String, Option<AgentResponse>)> {
    ctx.peers
        .ask_others(s, ctx.control.node_name(), req, timeout)
        .await
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::NoCoordinator => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_coordinator",
            e.to_string(),
        ),
        e => ApiError(
            StatusCode::BAD_GATEWAY,
            "coordinator_unreachable",
            e.to_string(),
        ),
    }
}

impl AdminCtx {
    /// A write that only the admin may make, sent to an agent that is not the coordinator:
    /// refused at once, naming the coordinator (as `write` would, after the checks).
    pub(super) fn redirect_early(&self) -> Result<(), WriteError> {
        let me = self.control.node_name();
        match self.control.coordinator() {
            Some(c) if c.name != me => Err(WriteError::Elsewhere(self.elsewhere(c.name))),
            _ => Ok(()),
        }
    }

    fn elsewhere(&self, coordinator: String) -> NotCoordinator {
        let me = self.control.node_name();
        let message = if self.local {
            format!(
                "{me} is not the coordinator: its local socket may only cordon or drain {me}; \
                 other changes need the admin credential at the coordinator's admin API ({coordinator})"
            )
        } else {
            format!(
                "{me} is not the coordinator: admin changes are applied by the coordinator, \
                 {coordinator}; send them to its admin API"
            )
        };
        NotCoordinator {
            coordinator,
            message,
        }
    }

    /// Applies `cmd` when this agent is the coordinator (the caller's credential was checked
    /// here: the admin certificate, or this host's local socket). Elsewhere it is not
    /// forwarded on the caller's word: the answer names the coordinator, except for what the
    /// local socket may say about this node itself, which goes to the coordinator as this
    /// node's own proposal (`authority`).
    pub(super) async fn write(&self, cmd: Command) -> Result<Applied, WriteError> {
        let coordinator = match self.control.propose_or_redirect(cmd.clone()).await {
            Ok(Ok(Ok(a))) => return Ok(a),
            Ok(Ok(Err(e))) => return Err(apply_error(e).into()),
            Ok(Err(coordinator)) => coordinator,
            Err(e) => return Err(submit_error(e).into()),
        };
        let me = self.control.node_name();
        if self.local && crate::authority::node_may_propose(me, &cmd).is_ok() {
            return match self.control.submit(cmd).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(apply_error(e).into()),
                Err(e) => Err(submit_error(e).into()),
            };
        }
        Err(WriteError::Elsewhere(self.elsewhere(coordinator)))
    }
}

pub(super) type Ctx = State<Arc<AdminCtx>>;

fn done(a: Applied) -> Json<Changed> {
    Json(Changed {
        changed: a != Applied::Unchanged,
    })
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such admin route".into(),
    )
}

pub fn router(ctx: Arc<AdminCtx>) -> Router {
    use deployments::*;
    use nodes::*;
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/nodes/{node}/labels/{key}",
            put(set_label).delete(delete_label),
        )
        .route("/v1/nodes/{node}/cordon", post(cordon))
        .route("/v1/nodes/{node}/uncordon", post(uncordon))
        .route("/v1/nodes/{node}/drain", post(drain))
        .route("/v1/nodes/{node}/flip", post(flip))
        .route("/v1/nodes/{node}", axum::routing::delete(remove))
        .route("/v1/deployments", get(deployments).post(create_deployment))
        .route("/v1/engines", get(engines))
        .route("/v1/autoplan", get(autoplan))
        .route(
            "/v1/deployments/{name}",
            axum::routing::delete(delete_deployment),
        )
        .route("/v1/deployments/{name}/layout", put(scale_deployment))
        .route("/v1/deployments/{name}/autoplan", put(set_autoplan))
        .route("/v1/events", get(events))
        .route("/v1/deployments/{name}/routable", get(routable))
        .route("/v1/apikeys", get(api_keys).post(create_api_key))
        .route("/v1/apikeys/required", put(require_api_keys))
        .route("/v1/apikeys/{id}", axum::routing::delete(revoke_api_key))
        .fallback(not_found)
        .with_state(ctx)
}

/// A router that refuses everything: served to TLS clients that are not the admin.
fn forbidden(who: String) -> Router {
    Router::new().fallback(move || {
        let who = who.clone();
        async move {
            ApiError(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{who} may not use the admin API: it needs the admin credential"),
            )
        }
    })
}

/// Serves the admin API on HTTPS at `addr`. Binds before returning, so a taken port is an
/// error at start.
pub async fn serve_https(
    addr: SocketAddr,
    endpoint: &Endpoint,
    router: Router,
) -> anyhow::Result<SocketAddr> {
    // Built per connection from the endpoint's current identity, so a renewed certificate is
    // served without a restart (an admin connection is rare; building a config is cheap).
    let acceptor_now = {
        let endpoint = endpoint.clone();
        move || -> anyhow::Result<tokio_rustls::TlsAcceptor> {
            let mut tls = endpoint.identity().server_config()?;
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
        }
    };
    acceptor_now()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the admin API on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                continue;
            };
            let acceptor = match acceptor_now() {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin API: no usable certificate");
                    continue;
                }
            };
            let router = router.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(ADMIN_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        warn!(%remote, error = %e, "refused admin connection");
                        return;
                    }
                    Err(_) => {
                        warn!(%remote, "refused admin connection: TLS handshake timed out");
                        return;
                    }
                };
                let who = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| pd_transport::pki::cert_info(leaf).ok())
                    .map(|i| i.identity);
                let app = match who {
                    Some(PeerIdentity::Admin) => router,
                    Some(other) => forbidden(other.to_string()),
                    None => forbidden("an unidentified client".into()),
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let io = hyper_util::rt::TokioIo::new(tls);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(%remote, error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(bound)
}

/// Serves the admin API on a unix socket that only this user may open (mode 0600).
pub async fn serve_unix(path: &Path, router: Router) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A socket left by a previous run; refuse to remove anything else.
        let meta = std::fs::symlink_metadata(path)?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "admin API on the local socket");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            warn!(error = %e, "admin socket stopped");
        }
    });
    Ok(())
}
