//! pdctl's side of the admin API: JSON over HTTP/1.1, on HTTPS with the admin credential
//! (mutual TLS; the agent's certificate must name the agent we meant), or on an agent's local
//! unix socket. Endpoints are tried in order until one answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use pd_api::ErrorBody;
use serde::Deserialize;
use serde_json::Value;

/// Where `pdctl` looks for its configuration when `--config` is not given: `$PDCTL_CONFIG`,
/// then `./pdctl.toml`, then `/etc/pdagent/pdctl.toml`.
pub fn default_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PDCTL_CONFIG") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("pdctl.toml");
    if local.exists() {
        local
    } else {
        PathBuf::from("/etc/pdagent/pdctl.toml")
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `pdctl.toml`. Relative paths are relative to the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdctlConfig {
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub admin_cert: Option<PathBuf>,
    #[serde(default)]
    pub admin_key: Option<PathBuf>,
    /// Admin API endpoints as "node-name@ip:port", tried in order.
    #[serde(default)]
    pub agents: Vec<String>,
    /// A local agent's admin socket (used before `agents`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

enum Target {
    Tls {
        name: String,
        addr: std::net::SocketAddr,
    },
    Unix(PathBuf),
}

pub struct AdminClient {
    targets: Vec<Target>,
    tls: Option<tokio_rustls::TlsConnector>,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl AdminClient {
    pub fn from_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading {} (pass --config, or set PDCTL_CONFIG; `pdctl local up` writes one)",
                path.display()
            )
        })?;
        let cfg: PdctlConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut targets = Vec::new();
        if let Some(s) = &cfg.socket {
            targets.push(Target::Unix(resolve(base, s)));
        }
        for a in &cfg.agents {
            let (name, addr) = a
                .split_once('@')
                .ok_or_else(|| anyhow!("agents: {a:?} is not name@ip:port"))?;
            let addr = addr
                .parse()
                .map_err(|_| anyhow!("agents: {addr:?} is not ip:port"))?;
            targets.push(Target::Tls {
                name: name.to_string(),
                addr,
            });
        }
        if targets.is_empty() {
            bail!(
                "{} names no agent: set `agents` or `socket`",
                path.display()
            );
        }
        let tls = match (&cfg.ca_cert, &cfg.admin_cert, &cfg.admin_key) {
            (Some(ca), Some(cert), Some(key)) => {
                let id = pd_transport::Identity::load(
                    &resolve(base, ca),
                    &resolve(base, cert),
                    &resolve(base, key),
                )
                .context("loading the admin credential")?;
                let mut c = id.client_config()?;
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsConnector::from(Arc::new(c)))
            }
            _ => None,
        };
        Ok(AdminClient { targets, tls })
    }

    /// The same client, talking only to the agent named `name`.
    pub fn only(&self, name: &str) -> Result<Self> {
        let targets: Vec<Target> = self
            .targets
            .iter()
            .filter_map(|t| match t {
                Target::Tls { name: n, addr } if n == name => Some(Target::Tls {
                    name: n.clone(),
                    addr: *addr,
                }),
                _ => None,
            })
            .collect();
        if targets.is_empty() {
            bail!("no admin endpoint for {name}");
        }
        Ok(AdminClient {
            targets,
            tls: self.tls.clone(),
        })
    }

    /// `GET path`, its answer read as `T`.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send::<(), T>("GET", path, None).await
    }

    /// Sends `body` (when given), and reads the answer as `T`: the admin API's own types
    /// (`pd-api`), so an answer pdctl does not understand is an error naming the route.
    pub async fn send<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let body = body.map(serde_json::to_value).transpose()?;
        let v = self.request(method, path, body).await?;
        serde_json::from_value(v).with_context(|| {
            format!("the agent's answer to {method} {path} is not what this pdctl expects (versions differ?)")
        })
    }

    /// Sends one request; returns the JSON answer, or the API's error message.
    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        // Refuse a malformed request here rather than blame the network for it.
        hyper::Uri::try_from(path).with_context(|| format!("bad request path {path:?}"))?;
        let mut last = None;
        for t in &self.targets {
            match tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.request_one(t, method, path, body.clone()),
            )
            .await
            {
                Ok(Ok((status, v))) => return self.answer(status, v, method, path, &body).await,
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(anyhow!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no admin endpoint"))
            .context("no agent's admin API answered"))
    }

    /// An agent's answer. A write sent to an agent that is not the coordinator is answered
    /// `421 not_coordinator` with the coordinator's name: it is sent again to that agent's
    /// admin API (which checks the admin credential itself), following a leadership change
    /// or two.
    async fn answer(
        &self,
        mut status: hyper::StatusCode,
        mut v: Value,
        method: &str,
        path: &str,
        body: &Option<Value>,
    ) -> Result<Value> {
        for _ in 0..MAX_REDIRECTS {
            let redirect = (status == hyper::StatusCode::MISDIRECTED_REQUEST)
                .then(|| serde_json::from_value::<ErrorBody>(v.clone()).ok())
                .flatten()
                .filter(|e| e.error.code == "not_coordinator")
                .and_then(|e| e.error.coordinator);
            let Some(coordinator) = redirect else {
                break;
            };
            let coordinator = coordinator.as_str();
            let Some(t) = self
                .targets
                .iter()
                .find(|t| matches!(t, Target::Tls { name, .. } if name == coordinator))
            else {
                bail!(
                    "{status}: {}\n(pdctl.toml's `agents` has no admin endpoint for {coordinator}: \
                     add \"{coordinator}@IP:PORT\")",
                    error_message(&v)
                );
            };
            (status, v) = tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.request_one(t, method, path, body.clone()),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "{coordinator}: no answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                )
            })??;
        }
        if status.is_success() {
            return Ok(v);
        }
        bail!("{status}: {}", error_message(&v));
    }

    async fn request_one(
        &self,
        t: &Target,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(hyper::StatusCode, Value)> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "pdagent")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))?;
        match t {
            Target::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .with_context(|| format!("connecting to {}", p.display()))?;
                send(TokioIo::new(s), req).await
            }
            Target::Tls { name, addr } => {
                let tls = self.tls.as_ref().ok_or_else(|| {
                    anyhow!("pdctl.toml has no admin credential (ca_cert, admin_cert, admin_key)")
                })?;
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                        .await
                        .map_err(|_| anyhow!("{name} at {addr}: connect timed out"))?
                        .with_context(|| format!("{name} at {addr}"))?;
                let server = rustls::pki_types::ServerName::try_from(name.clone())?;
                let s = tls
                    .connect(server, tcp)
                    .await
                    .with_context(|| format!("TLS with {name} at {addr}"))?;
                send(TokioIo::new(s), req).await
            }
        }
    }
}

/// The message of an admin API error body, or the whole answer.
fn error_message(v: &Value) -> String {
    serde_json::from_value::<ErrorBody>(v.clone())
        .map(|e| e.error.message)
        .unwrap_or_else(|_| v.to_string())
}

/// Coordinator changes a write follows before giving up.
const MAX_REDIRECTS: usize = 3;

/// Percent-encodes one path segment (a node name or label key from the command line).
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn send<IO>(io: IO, req: hyper::Request<Full<Bytes>>) -> Result<(hyper::StatusCode, Value)>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((status, v))
}
