//! The OpenAI-compatible HTTP API on every agent (`[serving] listen`, node-k of a local cluster
//! on 127.0.0.k:8000):
//! - `POST /v1/completions`, `POST /v1/chat/completions`: streaming (SSE ending with
//!   `data: [DONE]`) and not.
//! - `GET /v1/models`, `GET /v1/models/{model}`: the deployments.
//! - `GET /health`: the agent is up. `GET /ready`: some deployment has a ready prefill and
//!   decode engine, or a ready colocated engine (503 otherwise).
//! - `GET /metrics`: Prometheus text.
//!
//! Errors carry OpenAI's body (`{"error": {"message", "type", "param", "code"}}`): 400 bad
//! JSON or parameters, 404 unknown model or route, 405, 413 body over `body_bytes_max`, 429
//! (with `Retry-After`) when this agent serves `inflight_max` requests, 503 (with
//! `Retry-After`) when no engine can take the request, 504 past `request_timeout_ms`. A stream
//! that fails after it began ends with an SSE error event (and no `[DONE]`). `X-Request-Id` is
//! honoured (up to 128 visible ASCII characters) or generated, and returned. Once the cluster
//! has an API key (`pdctl apikey create`), the `/v1/` routes ask for one (`Authorization:
//! Bearer <key>`, 401 otherwise); `/health`, `/ready` and `/metrics` stay open. Non-streaming
//! answers carry `Server-Timing: agent;dur=…, engine;dur=…` (ms): the request's time outside
//! and inside engines. Answers name the engines that served them in `X-Pdagent-Route`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body::Frame;
use pd_openai::{ApiError, ApiKind, FinishReason, Limits, ModelEntry, ResponseMeta, Usage};
use tokio::sync::mpsc;

use super::{Out, Serving};

/// Owner shown in `/v1/models`.
const OWNED_BY: &str = "pdagent";
const REQUEST_ID_HEADER: &str = "x-request-id";
/// The engines that served a request, `engine@node` (`prefill -> decode` when disaggregated;
/// ` => engine@node` for each migration): on streams as of the first token, on other answers
/// complete.
const ROUTE_HEADER: &str = "x-pdagent-route";
const REQUEST_ID_BYTES_MAX: usize = 128;
/// A streaming client that reads nothing for this long is let go.
const SLOW_CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn router(serving: Arc<Serving>) -> Router {
    Router::new()
        .route(
            "/v1/completions",
            axum::routing::post(completions).fallback(method_not_allowed),
        )
        .route(
            "/v1/chat/completions",
            axum::routing::post(chat).fallback(method_not_allowed),
        )
        .route("/v1/models", get(models).fallback(method_not_allowed))
        .route(
            "/v1/models/{model}",
            get(model).fallback(method_not_allowed),
        )
        .route("/health", get(health).fallback(method_not_allowed))
        .route("/ready", get(ready).fallback(method_not_allowed))
        .route("/metrics", get(metrics).fallback(method_not_allowed))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(serving)
}

/// Binds and serves the API; returns the bound address. Each connection is bounded for
/// untrusted clients: at most `connections_max` open (one more is answered 503 and closed), a
/// request head within `header_read_timeout` (also a kept-alive connection's idle limit), a
/// body within `body_read_timeout` (see `generate`).
pub async fn serve(addr: SocketAddr, serving: Arc<Serving>) -> anyhow::Result<SocketAddr> {
    let listener = listen(addr, backlog_for(serving.config().connections_max))
        .map_err(|e| anyhow::anyhow!("cannot bind the OpenAI API on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = router(serving.clone());
    let cfg = serving.config().clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.connections_max));
    let metrics = serving.metrics().clone();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: let some close before trying again.
                    tracing::warn!(error = %e, "the OpenAI API cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.connections_closed.inc(&["full"]);
                tokio::spawn(refuse_full(tcp, cfg.connections_max));
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let svc = hyper_util::service::TowerToHyperService::new(app.clone());
            let metrics = metrics.clone();
            let header_timeout = cfg.header_read_timeout;
            tokio::spawn(async move {
                metrics.connections.fetch_add(1, Ordering::Relaxed);
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                if let Err(e) = served {
                    if e.is_timeout() {
                        metrics.connections_closed.inc(&["header_timeout"]);
                    }
                    tracing::debug!(%remote, error = %e, "OpenAI API connection ended");
                }
                metrics.connections.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            });
        }
    });
    Ok(bound)
}

/// The accept queue's length for `connections_max`: a burst of that many connections waits
/// in the kernel's queue instead of having its SYNs dropped (a dropped SYN costs the client a
/// retransmission, 1 s and then 3 s). The kernel caps it at `net.core.somaxconn`.
fn backlog_for(connections_max: usize) -> u32 {
    connections_max.clamp(1024, 65_535) as u32
}

/// Binds a listening TCP socket with `backlog` (std's bind uses 128).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Pause after a failed accept.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
/// Bound on answering a connection over `connections_max`.
const REFUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers a connection over the bound with 503 (OpenAI's error body) and closes it.
async fn refuse_full(mut tcp: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let e = ApiError::unavailable(
        format!("this agent has {max} connections open, its limit; retry shortly"),
        Some(1),
    );
    let body = e.body();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
}

fn error_response(e: &ApiError, request_id: Option<&str>) -> Response {
    let mut r = Response::new(Body::from(e.body()));
    *r.status_mut() = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(s) = e.retry_after_s {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(id) = request_id.and_then(|i| HeaderValue::from_str(i).ok()) {
        r.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    r
}

async fn not_found(req: Request) -> Response {
    error_response(&ApiError::not_found(req.uri().path()), None)
}

async fn method_not_allowed(method: Method, req: Request) -> Response {
    error_response(
        &ApiError::method_not_allowed(method.as_str(), req.uri().path()),
        None,
    )
}

async fn health() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

async fn ready(State(s): State<Arc<Serving>>) -> Response {
    if s.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        error_response(
            &ApiError::unavailable(
                "no deployment has a ready prefill and decode engine or a ready colocated engine",
                Some(1),
            ),
            None,
        )
    }
}

async fn metrics(State(s): State<Arc<Serving>>) -> Response {
    let gauges = super::gauges::engine_gauges(&s);
    let mut r = Response::new(Body::from(s.metrics.render(&gauges)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn entries(s: &Serving) -> Vec<ModelEntry> {
    s.models()
        .into_iter()
        .map(|(id, created)| ModelEntry {
            id,
            created,
            owned_by: OWNED_BY.into(),
        })
        .collect()
}

fn json(body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn models(State(s): State<Arc<Serving>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.authorize(authorization(&headers)) {
        return error_response(&e, None);
    }
    json(pd_openai::models_list(&entries(&s)))
}

async fn model(
    State(s): State<Arc<Serving>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if let Err(e) = s.authorize(authorization(&headers)) {
        return error_response(&e, None);
    }
    match entries(&s).into_iter().find(|m| m.id == name) {
        Some(m) => json(pd_openai::model_object(&m)),
        None => error_response(&ApiError::model_not_found(&name), None),
    }
}

async fn completions(State(s): State<Arc<Serving>>, req: Request) -> Response {
    generate(s, ApiKind::Completions, req).await
}

async fn chat(State(s): State<Arc<Serving>>, req: Request) -> Response {
    generate(s, ApiKind::Chat, req).await
}

/// The client's request id when it is usable, else a new one.
fn request_id(s: &Serving, headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= REQUEST_ID_BYTES_MAX
                && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", s.new_id()))
}

async fn generate(s: Arc<Serving>, kind: ApiKind, req: Request) -> Response {
    let received = std::time::Instant::now();
    let rid = request_id(&s, req.headers());
    if let Err(e) = s.authorize(authorization(req.headers())) {
        return error_response(&e, Some(&rid));
    }
    let limit = s.config().body_bytes_max;
    let too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit);
    if too_large {
        return error_response(&ApiError::too_large(limit), Some(&rid));
    }
    // The request holds a slot from here, while its body arrives.
    let admission = match s.admit() {
        Ok(a) => a,
        Err(e) => return error_response(&e, Some(&rid)),
    };
    let read_timeout = s.config().body_read_timeout;
    let body = match tokio::time::timeout(
        read_timeout,
        axum::body::to_bytes(req.into_body(), limit),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return error_response(&ApiError::too_large(limit), Some(&rid)),
        Err(_) => {
            s.metrics().connections_closed.inc(&["body_timeout"]);
            let mut r = error_response(
                &ApiError::body_timeout(read_timeout.as_millis() as u64),
                Some(&rid),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    let limits = Limits {
        max_tokens_max: s.config().max_tokens_max,
    };
    let parsed = match kind {
        ApiKind::Completions => pd_openai::parse_completion(&body, &limits),
        ApiKind::Chat => pd_openai::parse_chat(&body, &limits),
    };
    let g = match parsed {
        Ok(g) => g,
        Err(e) => return error_response(&e, Some(&rid)),
    };
    let stream = g.stream;
    let include_usage = g.include_usage;
    let model = g.model.clone();
    // The request's id goes with everything its journey logs (its shipments included).
    let started = {
        let _span = tracing::info_span!("request", request_id = %rid).entered();
        s.start(g, received, admission)
    };
    let mut rx = match started {
        Ok(rx) => rx,
        Err(e) => return error_response(&e, Some(&rid)),
    };
    let id = match kind {
        ApiKind::Completions => format!("cmpl-{rid}"),
        ApiKind::Chat => format!("chatcmpl-{rid}"),
    };
    let created = crate::util::now_unix().max(0) as u64;
    // Wait for the first event: an error before any token is a plain HTTP error.
    let first = match rx.recv().await {
        Some(Out::Error(e)) => return error_response(&e, Some(&rid)),
        Some(ev) => ev,
        None => {
            return error_response(
                &ApiError::internal("the request ended without an answer"),
                Some(&rid),
            );
        }
    };
    let response = Responder {
        kind,
        id,
        created,
        model,
        include_usage,
    };
    if stream {
        let (tx, body_rx) = mpsc::channel::<Bytes>(64);
        let route = match &first {
            Out::FirstToken { route } => HeaderValue::from_str(route).ok(),
            _ => None,
        };
        tokio::spawn(response.stream(first, rx, tx));
        let mut r = Response::new(Body::new(ChannelBody { rx: body_rx }));
        let h = r.headers_mut();
        if let Some(v) = route {
            h.insert(ROUTE_HEADER, v);
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Ok(v) = HeaderValue::from_str(&rid) {
            h.insert(REQUEST_ID_HEADER, v);
        }
        r
    } else {
        let mut text = String::new();
        let mut ev = Some(first);
        loop {
            let next = match ev.take() {
                Some(e) => Some(e),
                None => rx.recv().await,
            };
            match next {
                Some(Out::FirstToken { .. }) => {}
                Some(Out::Text(t)) => text.push_str(&t),
                Some(Out::Done {
                    finish,
                    usage,
                    timing,
                    route,
                }) => {
                    let mut r = json(response.body(&text, finish, usage));
                    if let Ok(v) = HeaderValue::from_str(&rid) {
                        r.headers_mut().insert(REQUEST_ID_HEADER, v);
                    }
                    if let Ok(v) = HeaderValue::from_str(&route) {
                        r.headers_mut().insert(ROUTE_HEADER, v);
                    }
                    // Where the time went, in the standard Server-Timing header (ms).
                    let mut t = format!(
                        "agent;dur={:.3}, engine;dur={:.3}",
                        timing.agent_us() as f64 / 1e3,
                        timing.engine_us as f64 / 1e3
                    );
                    if timing.kv_bytes > 0 {
                        let _ = write!(
                            t,
                            ", kv;dur={:.3};desc=\"{} bytes\"",
                            timing.kv_us as f64 / 1e3,
                            timing.kv_bytes
                        );
                    }
                    if let Ok(v) = HeaderValue::from_str(&t) {
                        r.headers_mut().insert("server-timing", v);
                    }
                    return r;
                }
                Some(Out::Error(e)) => return error_response(&e, Some(&rid)),
                None => {
                    return error_response(
                        &ApiError::internal("the request ended without an answer"),
                        Some(&rid),
                    );
                }
            }
        }
    }
}

/// Shapes one request's answer.
struct Responder {
    kind: ApiKind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Responder {
    fn meta(&self) -> ResponseMeta<'_> {
        ResponseMeta {
            id: &self.id,
            created: self.created,
            model: &self.model,
        }
    }

    fn body(&self, text: &str, finish: FinishReason, usage: Usage) -> String {
        pd_openai::response(self.kind, &self.meta(), text, finish, usage)
    }

    /// Turns the request's events into SSE until its end or the client's departure (the
    /// body channel closes: dropping `rx` cancels the request).
    async fn stream(self, first: Out, mut rx: mpsc::Receiver<Out>, tx: mpsc::Sender<Bytes>) {
        let meta = self.meta();
        // A client that stops reading for this long is let go (its request is cancelled).
        let send = |s: String| {
            let tx = tx.clone();
            async move {
                match tokio::time::timeout(SLOW_CLIENT_TIMEOUT, tx.send(Bytes::from(s))).await {
                    Ok(r) => r.map_err(|_| ()),
                    Err(_) => Err(()),
                }
            }
        };
        if self.kind == ApiKind::Chat
            && send(pd_openai::role_chunk(&meta, self.include_usage))
                .await
                .is_err()
        {
            return;
        }
        let mut ev = Some(first);
        loop {
            let next = match ev.take() {
                Some(e) => Some(e),
                // A client gone while nothing is being sent is noticed at once.
                None => tokio::select! {
                    out = rx.recv() => out,
                    _ = tx.closed() => return,
                },
            };
            let Some(out) = next else {
                let e = ApiError::internal("the request ended without an answer");
                let _ = send(e.sse()).await;
                return;
            };
            let chunk = match out {
                Out::FirstToken { .. } => continue,
                Out::Text(t) => pd_openai::text_chunk(self.kind, &meta, &t, self.include_usage),
                Out::Done { finish, usage, .. } => {
                    let mut last =
                        pd_openai::finish_chunk(self.kind, &meta, finish, self.include_usage);
                    if self.include_usage {
                        last.push_str(&pd_openai::usage_chunk(self.kind, &meta, usage));
                    }
                    last.push_str(pd_openai::SSE_DONE);
                    let _ = send(last).await;
                    return;
                }
                Out::Error(e) => {
                    let _ = send(e.sse()).await;
                    return;
                }
            };
            if send(chunk).await.is_err() {
                return;
            }
        }
    }
}

/// A response body fed by a channel; dropped (client gone) it closes the channel.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}
