//! The `fake` driver, for tests only: engines that live in memory (no process, no socket) and
//! misbehave as told, so that the supervisor's decisions (start, readiness, restart with
//! backoff, crash loops, drains, recovery, fencing) are tested without processes or sleeps.
//!
//! Fault settings, as `FakeFaults::parse("start_failures=2,exit_after_polls=3")`:
//! - `start_failures=N`: the first N starts fail;
//! - `slow_start_probes=N`: each engine answers its first N probes with "not yet";
//! - `probe_error`: every probe fails (the engine answers wrongly);
//! - `exit_after_polls=N`: each engine exits at its N-th `wait` poll;
//! - `busy_polls=N`: a stopping engine still reports running requests N times;
//! - `fingerprint=X`: the model fingerprint the engines report (default 1).

use crate::util::Unpoisoned;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{
    BoxFuture, Capabilities, Driver, EngineSpec, Identity, KvPath, Probe, Task, TaskRecord,
};

pub const NAME: &str = "fake";
pub const CAPABILITIES: Capabilities = Capabilities {
    kv: KvPath::Engine,
    exact_replay: false,
    resume: false,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeFaults {
    pub start_failures: u32,
    pub slow_start_probes: u32,
    pub probe_error: bool,
    pub exit_after_polls: Option<u32>,
    pub busy_polls: u32,
    pub fingerprint: u64,
}

impl Default for FakeFaults {
    fn default() -> Self {
        FakeFaults {
            start_failures: 0,
            slow_start_probes: 0,
            probe_error: false,
            exit_after_polls: None,
            busy_polls: 0,
            fingerprint: 1,
        }
    }
}

impl FakeFaults {
    pub fn parse(spec: &str) -> Result<FakeFaults, String> {
        let mut f = FakeFaults::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            let n = |v: Option<&str>| -> Result<u64, String> {
                v.ok_or_else(|| format!("{key} needs a value"))?
                    .parse()
                    .map_err(|e| format!("{key}: {e}"))
            };
            match key {
                "start_failures" => f.start_failures = n(value)? as u32,
                "slow_start_probes" => f.slow_start_probes = n(value)? as u32,
                "probe_error" => f.probe_error = true,
                "exit_after_polls" => f.exit_after_polls = Some(n(value)? as u32),
                "busy_polls" => f.busy_polls = n(value)? as u32,
                "fingerprint" => f.fingerprint = n(value)?,
                other => return Err(format!("unknown fake fault {other:?}")),
            }
        }
        Ok(f)
    }
}

/// One fake engine.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeEngine {
    pub spec: EngineSpec,
    pub alive: bool,
    pub polls: u32,
    pub probes: u32,
    pub busy_left: u32,
    /// Set once it was told to stop.
    pub stopped: bool,
}

#[derive(Default)]
struct Inner {
    next_pid: u32,
    starts: u32,
    engines: BTreeMap<u32, FakeEngine>,
}

pub struct Fake {
    faults: Mutex<FakeFaults>,
    inner: Mutex<Inner>,
}

impl Fake {
    pub fn new(faults: FakeFaults) -> Self {
        Fake {
            faults: Mutex::new(faults),
            inner: Mutex::new(Inner {
                next_pid: 100_000,
                ..Inner::default()
            }),
        }
    }

    pub fn set_faults(&self, faults: FakeFaults) {
        *self.faults.locked() = faults;
    }

    fn faults(&self) -> FakeFaults {
        self.faults.locked().clone()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// `kill -9` of an engine.
    pub fn kill(&self, pid: u32) {
        if let Some(e) = self.inner().engines.get_mut(&pid) {
            e.alive = false;
        }
    }

    /// Every engine started so far, by pid.
    pub fn engines(&self) -> BTreeMap<u32, FakeEngine> {
        self.inner().engines.clone()
    }

    /// Starts attempted so far (failed ones included).
    pub fn starts(&self) -> u32 {
        self.inner().starts
    }

    /// Pids of the engines alive now.
    pub fn alive(&self) -> Vec<u32> {
        self.inner()
            .engines
            .iter()
            .filter(|(_, e)| e.alive)
            .map(|(p, _)| *p)
            .collect()
    }
}

impl Driver for Fake {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn start(&self, spec: &EngineSpec) -> Result<Task, String> {
        let faults = self.faults();
        let mut inner = self.inner();
        inner.starts += 1;
        if inner.starts <= faults.start_failures {
            return Err(format!("fake start failure {}", inner.starts));
        }
        inner.next_pid += 1;
        let pid = inner.next_pid;
        inner.engines.insert(
            pid,
            FakeEngine {
                spec: spec.clone(),
                alive: true,
                polls: 0,
                probes: 0,
                busy_left: faults.busy_polls,
                stopped: false,
            },
        );
        Ok(Task::new(pid))
    }

    fn wait(&self, task: &mut Task) -> Option<String> {
        let faults = self.faults();
        let mut inner = self.inner();
        let Some(e) = inner.engines.get_mut(&task.pid) else {
            return Some("unknown to the fake driver".into());
        };
        e.polls += 1;
        if faults.exit_after_polls.is_some_and(|n| e.polls >= n) {
            e.alive = false;
        }
        (!e.alive).then(|| "exited".to_string())
    }

    fn probe<'a>(&'a self, _spec: &'a EngineSpec, task: &'a mut Task) -> BoxFuture<'a, Probe> {
        let faults = self.faults();
        let probe = {
            let mut inner = self.inner();
            match inner.engines.get_mut(&task.pid) {
                None => Probe::Failed("unknown to the fake driver".into()),
                Some(e) if !e.alive => Probe::Failed("exited".into()),
                Some(e) => {
                    e.probes += 1;
                    if e.probes <= faults.slow_start_probes {
                        Probe::NotYet
                    } else if faults.probe_error {
                        Probe::Failed("fake probe error".into())
                    } else {
                        Probe::Ready
                    }
                }
            }
        };
        if probe == Probe::Ready {
            task.identity = Some(Identity {
                model_name: "fake".into(),
                model_fingerprint: faults.fingerprint,
            });
        }
        Box::pin(async move { probe })
    }

    fn stats<'a>(
        &'a self,
        task: &'a Task,
        _timeout: Duration,
    ) -> BoxFuture<'a, Option<pd_engine::EngineStats>> {
        let stats = {
            let mut inner = self.inner();
            inner
                .engines
                .get_mut(&task.pid)
                .filter(|e| e.alive)
                .map(|e| {
                    let busy = e.busy_left > 0;
                    e.busy_left = e.busy_left.saturating_sub(1);
                    pd_engine::EngineStats {
                        running: busy as usize,
                        ..Default::default()
                    }
                })
        };
        Box::pin(async move { stats })
    }

    fn stop<'a>(&'a self, task: Task, _grace: Duration) -> BoxFuture<'a, ()> {
        if let Some(e) = self.inner().engines.get_mut(&task.pid) {
            e.alive = false;
            e.stopped = true;
        }
        Box::pin(async {})
    }

    fn recover<'a>(
        &'a self,
        _spec: &'a EngineSpec,
        record: &'a TaskRecord,
    ) -> BoxFuture<'a, Result<Task, String>> {
        let fingerprint = self.faults().fingerprint;
        let result = {
            let mut inner = self.inner();
            match inner.engines.get_mut(&record.pid) {
                Some(e) if e.alive => {
                    let identity = Identity {
                        model_name: "fake".into(),
                        model_fingerprint: fingerprint,
                    };
                    if record.identity.as_ref().is_some_and(|r| *r != identity)
                        || e.spec.role != record.role
                    {
                        e.alive = false;
                        Err("the engine is not the recorded one".to_string())
                    } else {
                        let mut t = Task::new(record.pid);
                        t.identity = Some(identity);
                        Ok(t)
                    }
                }
                _ => Err(format!("pid {} is gone", record.pid)),
            }
        };
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_settings_parse_and_unknown_ones_are_named() {
        let f = FakeFaults::parse("start_failures=2, probe_error,exit_after_polls=3").unwrap();
        assert_eq!(f.start_failures, 2);
        assert!(f.probe_error);
        assert_eq!(f.exit_after_polls, Some(3));
        assert_eq!(FakeFaults::parse("").unwrap(), FakeFaults::default());
        assert!(FakeFaults::parse("melt").unwrap_err().contains("melt"));
        assert!(
            FakeFaults::parse("busy_polls")
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(FakeFaults::parse("busy_polls=x").is_err());
    }
}
