//! Opening a leg on the agent that owns its engine: a local task on this host, or a streaming
//! RPC to another agent whose health is watched while the leg waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pd_router::Candidate;
use pd_transport::ResponseStream;
use tokio::sync::mpsc;

use crate::control::ControlPlane;
use crate::wire::legs::{Failure, Leg, ServeEvent};
use crate::wire::{AgentRequest, AgentResponse};

use super::Serving;
use super::attempt::AttemptFail;

impl Serving {
    /// Opens a leg on the agent of `c`'s engine: a local task or a streaming RPC.
    pub(super) async fn open_leg(&self, c: &Candidate, leg: Leg) -> Result<LegStream, AttemptFail> {
        let fail = |failure, message: String| AttemptFail {
            failure,
            message,
            engine: c.engine.clone(),
        };
        if c.node == self.node {
            let (tx, rx) = mpsc::channel(256);
            let legs = self.legs.clone();
            tokio::spawn(async move { legs.run(leg, tx).await });
            return Ok(LegStream::Local(rx));
        }
        let addr = self.control.node_address(&c.node).ok_or_else(|| {
            fail(
                Failure::Unreachable,
                format!("node {} is not in the cluster", c.node),
            )
        })?;
        let open = async {
            let conn = self.peers.connection(&c.node, addr).await?;
            conn.call_stream::<_, AgentResponse>(&AgentRequest::Serve(leg))
                .await
        };
        match tokio::time::timeout(LEG_OPEN_TIMEOUT, open).await {
            Ok(Ok(s)) => Ok(LegStream::remote(s, self.control.clone(), c.node.clone())),
            Ok(Err(e)) => Err(fail(
                Failure::Unreachable,
                format!("cannot reach node {}: {e}", c.node),
            )),
            Err(_) => Err(fail(
                Failure::Unreachable,
                format!("node {} did not answer within {LEG_OPEN_TIMEOUT:?}", c.node),
            )),
        }
    }
}

/// Bound on opening a leg on another agent (connecting included).
const LEG_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A leg's events, from a local task or (through a forwarding task) another agent; reading
/// it is cancel-safe, and dropping it cancels the leg.
pub(super) enum LegStream {
    Local(mpsc::Receiver<ServeEvent>),
    Remote(mpsc::Receiver<Result<ServeEvent, (Failure, String)>>),
}

/// How often a remote leg checks its node's health while waiting.
const LEG_HEALTH_CHECK: Duration = Duration::from_millis(250);
/// A remote leg silent this long while its node misses heartbeats (suspect) is given up.
const LEG_SILENT_ON_SUSPECT: Duration = Duration::from_secs(1);

impl LegStream {
    /// Forwards a remote leg's events into a channel; when the channel's reader goes away the
    /// stream is dropped, which tells the remote agent to cancel the leg. A node that died
    /// sends nothing, not even a close: the leg is given up as soon as the coordinator marks
    /// the node down, or suspect while the leg is silent, instead of after the transport's
    /// idle timeout.
    fn remote(
        mut s: ResponseStream<AgentResponse>,
        control: Arc<ControlPlane>,
        node: String,
    ) -> LegStream {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut check = tokio::time::interval(LEG_HEALTH_CHECK);
            let mut heard = Instant::now();
            loop {
                let item = tokio::select! {
                    item = s.next() => item,
                    _ = tx.closed() => return,
                    _ = check.tick() => {
                        let health = control.node_health(&node);
                        let silent = heard.elapsed() >= LEG_SILENT_ON_SUSPECT;
                        let gone = match health {
                            Some(pd_raft::NodeHealth::Down) | None => true,
                            Some(pd_raft::NodeHealth::Suspect) => silent,
                            _ => false,
                        };
                        if gone {
                            let why = format!("node {node} stopped answering heartbeats ({health:?})");
                            let _ = tx.send(Err((Failure::Unreachable, why))).await;
                            return;
                        }
                        continue;
                    }
                };
                heard = Instant::now();
                let ev = match item {
                    Ok(Some(AgentResponse::Serve(ev))) => Ok(ev),
                    Ok(Some(other)) => {
                        Err((Failure::Internal, format!("unexpected answer {other:?}")))
                    }
                    Ok(None) => return,
                    Err(e) => Err((Failure::EngineLost, format!("the engine's agent: {e}"))),
                };
                let end = ev.is_err();
                if tx.send(ev).await.is_err() || end {
                    return;
                }
            }
        });
        LegStream::Remote(rx)
    }

    pub(super) async fn next(&mut self, engine: &str) -> Result<ServeEvent, AttemptFail> {
        let fail = |failure, message: String| AttemptFail {
            failure,
            message,
            engine: engine.to_string(),
        };
        let ended = || {
            fail(
                Failure::EngineLost,
                "the leg ended without an answer".into(),
            )
        };
        match self {
            LegStream::Local(rx) => rx.recv().await.ok_or_else(ended),
            LegStream::Remote(rx) => match rx.recv().await {
                Some(Ok(ev)) => Ok(ev),
                Some(Err((failure, why))) => Err(fail(failure, why)),
                None => Err(ended()),
            },
        }
    }
}
