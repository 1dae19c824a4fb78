//! The `builtin` driver: the reference engine as a child process (`pdagent engine serve`) in
//! its own process group, so that it outlives an agent restart and is recovered; one compute
//! thread; ready after its hello and a one-token probe.

use std::sync::Arc;
use std::time::Duration;

use pd_engine::protocol::{AgentMessage, EngineMessage, EngineRole as WireRole};
use pd_engine::{Prompt, SamplingParams};
use pd_raft::EngineRole;
use tracing::warn;

use super::{
    BoxFuture, Capabilities, Driver, EngineSpec, Identity, KvPath, Probe, Task, TaskRecord,
};
use crate::engine::client::EngineClient;

pub const NAME: &str = "builtin";
pub const CAPABILITIES: Capabilities = Capabilities {
    kv: KvPath::Agent,
    exact_replay: true,
    resume: true,
};

/// Test-only: when set on the agent, the engines it starts from then on get these
/// `--test-faults` (e.g. `crash_after_tokens=1`).
pub const TEST_ENGINE_FAULTS_ENV: &str = "PDAGENT_TEST_ENGINE_FAULTS";
/// Bound on the hello and the one-token probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on connecting to a recorded engine's socket.
const RECOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An engine with no agent connected this long exits by itself: longer than an agent restart.
const ENGINE_ORPHAN_TIMEOUT_MS: u64 = 60_000;

pub struct Builtin {
    /// The agent's node name, given in the engine protocol's hello.
    node: String,
}

impl Builtin {
    pub fn new(node: &str) -> Self {
        Builtin {
            node: node.to_string(),
        }
    }
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn kill(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn wire_role(r: EngineRole) -> WireRole {
    match r {
        EngineRole::Prefill => WireRole::Prefill,
        EngineRole::Decode => WireRole::Decode,
        EngineRole::Both => WireRole::Both,
    }
}

fn identity_of(c: &EngineClient) -> Identity {
    Identity {
        model_name: c.hello().model_name.clone(),
        model_fingerprint: c.hello().model_fingerprint,
    }
}

impl Driver for Builtin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn start(&self, spec: &EngineSpec) -> Result<Task, String> {
        use std::os::unix::process::CommandExt;
        let _ = std::fs::remove_file(&spec.socket);
        let exe = std::env::current_exe().map_err(|e| format!("the agent's own path: {e}"))?;
        let log =
            std::fs::File::create(&spec.log).map_err(|e| format!("{}: {e}", spec.log.display()))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["engine", "serve", "--socket"])
            .arg(&spec.socket)
            .args(["--role", &spec.role.to_string(), "--model", &spec.model])
            .args(["--orphan-timeout-ms", &ENGINE_ORPHAN_TIMEOUT_MS.to_string()]);
        // Test-only: the engine's fault knobs, for fault tests (`pdctl local start
        // --engine-faults`).
        if let Ok(f) = std::env::var(TEST_ENGINE_FAULTS_ENV)
            && !f.is_empty()
        {
            cmd.args(["--test-faults", &f]);
        }
        cmd.env("CUDA_VISIBLE_DEVICES", &spec.visible_devices)
            .env("RAYON_NUM_THREADS", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Its own process group: the engine outlives an agent restart and is recovered.
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawning the engine: {e}"))?;
        let mut task = Task::new(child.id());
        task.child = Some(child);
        Ok(task)
    }

    fn wait(&self, task: &mut Task) -> Option<String> {
        let alive = match &mut task.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => pid_alive(task.pid),
        };
        if !alive {
            if let Some(mut c) = task.child.take() {
                let status = c.wait().map(|s| s.to_string()).unwrap_or_default();
                return Some(format!("exited ({status})"));
            }
            return Some("exited".into());
        }
        if task.client.as_ref().is_some_and(|c| !c.is_connected()) {
            return Some("closed its socket".into());
        }
        None
    }

    fn probe<'a>(&'a self, spec: &'a EngineSpec, task: &'a mut Task) -> BoxFuture<'a, Probe> {
        Box::pin(async move {
            if task.client.is_none() {
                match EngineClient::connect(&spec.socket, &self.node, Duration::from_millis(50))
                    .await
                {
                    Ok(c) => task.client = Some(Arc::new(c)),
                    Err(_) => return Probe::NotYet,
                }
            }
            let Some(client) = task.client.clone() else {
                return Probe::NotYet;
            };
            if client.hello().role != wire_role(spec.role) {
                return Probe::Failed(format!(
                    "the engine says it is {:?}, not {}",
                    client.hello().role,
                    spec.role
                ));
            }
            match one_token(&client).await {
                Ok(()) => {
                    task.identity = Some(identity_of(&client));
                    Probe::Ready
                }
                Err(e) => Probe::Failed(e),
            }
        })
    }

    fn stats<'a>(
        &'a self,
        task: &'a Task,
        timeout: Duration,
    ) -> BoxFuture<'a, Option<pd_engine::EngineStats>> {
        Box::pin(async move {
            let c = task.client.as_ref().filter(|c| c.is_connected())?;
            tokio::time::timeout(timeout, c.stats()).await.ok()?.ok()
        })
    }

    fn stop<'a>(&'a self, mut task: Task, grace: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(c) = &task.client {
                c.shutdown().await;
            }
            super::wait_exit(&mut task, grace).await;
            if pid_alive(task.pid) {
                kill(task.pid, "KILL");
            }
            if let Some(mut c) = task.child.take() {
                let _ = c.wait();
            }
        })
    }

    fn recover<'a>(
        &'a self,
        spec: &'a EngineSpec,
        record: &'a TaskRecord,
    ) -> BoxFuture<'a, Result<Task, String>> {
        Box::pin(async move {
            if !pid_alive(record.pid) {
                return Err(format!("pid {} is gone", record.pid));
            }
            let refuse = |why: String| {
                kill(record.pid, "KILL");
                Err(why)
            };
            let client = match EngineClient::connect(
                &spec.socket,
                &self.node,
                RECOVER_CONNECT_TIMEOUT,
            )
            .await
            {
                Ok(c) => c,
                Err(e) => return refuse(format!("does not answer on its socket: {e}")),
            };
            if client.hello().role != wire_role(record.role) {
                return refuse(format!(
                    "the engine on the socket is {:?}, the record says {}",
                    client.hello().role,
                    record.role
                ));
            }
            let identity = identity_of(&client);
            if let Some(want) = &record.identity
                && *want != identity
            {
                warn!(engine = %record.engine, ?want, got = ?identity, "engine identity differs from its record");
                return refuse(format!(
                    "the engine on the socket runs {} (fingerprint {:016x}), the record says {} ({:016x})",
                    identity.model_name,
                    identity.model_fingerprint,
                    want.model_name,
                    want.model_fingerprint
                ));
            }
            let mut task = Task::new(record.pid);
            task.client = Some(Arc::new(client));
            task.identity = Some(identity);
            Ok(task)
        })
    }
}

/// A one-token request: the engine computes, not just accepts connections.
async fn one_token(c: &EngineClient) -> Result<(), String> {
    let id = u64::MAX - 1;
    let prompt = Prompt::Tokens(vec![1]);
    let sampling = SamplingParams {
        max_tokens: 1,
        ..SamplingParams::default()
    };
    // A prefill engine only prefills; the others generate.
    let msg = if c.hello().role == WireRole::Prefill {
        AgentMessage::Prefill {
            id,
            prompt,
            sampling,
        }
    } else {
        AgentMessage::Generate {
            id,
            prompt,
            sampling,
        }
    };
    let mut rx = c.submit(msg).await.map_err(|e| e.to_string())?;
    let until = tokio::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some((EngineMessage::Finished { .. }, _, _))) => return Ok(()),
            Ok(Some((EngineMessage::Error { message, .. }, _, _))) => return Err(message),
            Ok(Some(_)) => {}
            Ok(None) => return Err("connection lost".into()),
            Err(_) => return Err("no answer to the probe".into()),
        }
    }
}
