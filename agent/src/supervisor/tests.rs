//! The supervisor's tests, on the fake driver (in-memory engines with fault settings).

use super::*;

fn a(gpus: &[u32], generation: u64) -> Assignment {
    Assignment {
        engine: "d/prefill-0".into(),
        deployment: "d".into(),
        role: EngineRole::Prefill,
        node: "n".into(),
        gpus: gpus.to_vec(),
        generation,
    }
}

/// Fencing: an assignment older than one already acted on for any of its GPUs is ignored.
#[test]
fn older_generations_are_ignored() {
    let acted = HashMap::from([(0, 10), (1, 5)]);
    assert!(is_fresh(&a(&[0], 10), &acted));
    assert!(is_fresh(&a(&[0, 1], 12), &acted));
    assert!(!is_fresh(&a(&[0], 9), &acted));
    assert!(!is_fresh(&a(&[1, 0], 7), &acted));
    assert!(is_fresh(&a(&[2], 1), &acted));
}

// The supervisor's decisions with the fake driver: no processes, no sleeps (every wait is
// zero), one reconcile pass at a time.

use crate::driver::fake::{Fake, FakeFaults};
use pd_raft::{Deployment, EngineRole, Layout};

struct TestOrders {
    state: std::sync::Mutex<ClusterState>,
    published: std::sync::Mutex<Vec<EngineReport>>,
}

impl Orders for TestOrders {
    fn state(&self) -> ClusterState {
        self.state.lock().unwrap().clone()
    }
    fn publish(&self, engines: Vec<EngineReport>) {
        *self.published.lock().unwrap() = engines;
    }
}

struct Rig {
    dir: tempfile::TempDir,
    orders: Arc<TestOrders>,
    fake: Arc<Fake>,
    sup: Arc<Supervisor>,
}

const NO_WAITS: Timings = Timings {
    backoff_min: Duration::ZERO,
    backoff_max: Duration::ZERO,
    drain_timeout: Duration::from_secs(3600),
    stop_grace: Duration::ZERO,
};

fn assigned(engines: &[(&str, u32, u64)], driver: &str) -> ClusterState {
    let mut s = ClusterState::default();
    s.deployments.insert(
        "d".into(),
        Deployment {
            name: "d".into(),
            engine: driver.into(),
            model: "m".into(),
            tp: 1,
            ttft_ms: None,
            tpot_ms: None,
            layout: Layout::Colocated { engines: 1 },
            created_at: 1,
        },
    );
    for (engine, gpu, generation) in engines {
        s.assignments.insert(
            engine.to_string(),
            Assignment {
                engine: engine.to_string(),
                deployment: "d".into(),
                role: EngineRole::Both,
                node: "n".into(),
                gpus: vec![*gpu],
                generation: *generation,
            },
        );
    }
    s
}

fn rig(faults: &str, timings: Timings) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::new(FakeFaults::parse(faults).unwrap()));
    let orders = Arc::new(TestOrders {
        state: std::sync::Mutex::new(assigned(&[("d/both-0", 0, 10)], "fake")),
        published: std::sync::Mutex::new(Vec::new()),
    });
    let sup = Supervisor::with_drivers(
        "n",
        dir.path(),
        &dir.path().join("models"),
        orders.clone(),
        None,
        vec![fake.clone()],
        timings,
    )
    .unwrap();
    Rig {
        dir,
        orders,
        fake,
        sup,
    }
}

impl Rig {
    fn report(&self, engine: &str) -> Option<EngineReport> {
        let p = self.orders.published.lock().unwrap();
        p.iter().find(|r| r.engine == engine).cloned()
    }

    fn set(&self, s: ClusterState) {
        *self.orders.state.lock().unwrap() = s;
    }

    async fn passes(&self, n: usize) {
        for _ in 0..n {
            self.sup.reconcile().await;
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_engine_starts_is_probed_ready_and_restarts_after_a_crash() {
    rt().block_on(async {
        let r = rig("slow_start_probes=1", NO_WAITS);
        r.passes(1).await;
        let first = r.report("d/both-0").unwrap();
        assert_eq!(first.state, EngineState::Starting);
        let pid = first.pid.expect("started");
        // The first probe says "not yet", the second is answered.
        r.passes(1).await;
        assert_eq!(r.report("d/both-0").unwrap().state, EngineState::Starting);
        r.passes(1).await;
        let ready = r.report("d/both-0").unwrap();
        assert_eq!(
            (ready.state, ready.pid, ready.restarts),
            (EngineState::Ready, Some(pid), 0)
        );
        assert_eq!(ready.generation, 10);
        assert!(r.dir.path().join("engines/d_both-0.json").exists());

        // kill -9: noticed, started again at once (zero backoff), ready after its probes.
        r.fake.kill(pid);
        r.passes(3).await;
        let again = r.report("d/both-0").unwrap();
        assert_eq!((again.state, again.restarts), (EngineState::Ready, 1));
        assert_ne!(again.pid, Some(pid));
        assert_eq!(r.fake.alive(), vec![again.pid.unwrap()]);
    });
}

#[test]
fn a_crash_loop_ends_failed_and_failed_starts_are_retried() {
    rt().block_on(async {
        let r = rig("exit_after_polls=1", NO_WAITS);
        r.passes(20).await;
        let rep = r.report("d/both-0").unwrap();
        assert_eq!(rep.state, EngineState::Failed);
        assert_eq!(rep.restarts as usize, CRASH_LOOP_RESTARTS_MAX + 1);
        assert_eq!(r.fake.starts() as usize, CRASH_LOOP_RESTARTS_MAX + 1);
        assert!(r.fake.alive().is_empty());

        let r = rig("start_failures=2", NO_WAITS);
        r.passes(2).await;
        assert_eq!(r.report("d/both-0").unwrap().pid, None);
        r.passes(2).await;
        assert_eq!(r.report("d/both-0").unwrap().state, EngineState::Ready);
        assert_eq!(r.fake.starts(), 3);

        // An engine that can never be started (a command that does not run) ends failed,
        // saying why.
        let r = rig("start_failures=100", NO_WAITS);
        r.passes(20).await;
        let rep = r.report("d/both-0").unwrap();
        assert_eq!(rep.state, EngineState::Failed);
        assert!(rep.note.starts_with("cannot start"), "{}", rep.note);
        assert_eq!(r.fake.starts() as usize, CRASH_LOOP_RESTARTS_MAX + 1);
    });
}

#[test]
fn an_older_generation_for_the_same_gpu_is_ignored() {
    rt().block_on(async {
        let r = rig("", NO_WAITS);
        r.passes(2).await;
        let pid = r.report("d/both-0").unwrap().pid.unwrap();
        // A stale writer's assignment (generation 5 < 10) for GPU 0: ignored.
        r.set(assigned(&[("d/both-9", 0, 5)], "fake"));
        r.passes(3).await;
        assert!(r.report("d/both-9").is_none());
        assert!(
            r.fake
                .engines()
                .values()
                .all(|e| e.spec.engine != "d/both-9"),
            "never started"
        );
        // A newer one is acted on.
        r.set(assigned(&[("d/both-9", 0, 11)], "fake"));
        r.passes(2).await;
        assert_eq!(r.report("d/both-9").unwrap().state, EngineState::Ready);
        assert!(r.fake.engines()[&pid].stopped);
    });
}

#[test]
fn an_unassigned_engine_drains_before_it_stops() {
    rt().block_on(async {
        let r = rig("busy_polls=3", NO_WAITS);
        r.passes(2).await;
        let pid = r.report("d/both-0").unwrap().pid.unwrap();
        // Busy for three load samples: the pass that samples it as ready, then two drain
        // passes; stopped on the third.
        r.set(assigned(&[], "fake"));
        r.passes(2).await;
        assert!(
            r.report("d/both-0").is_none(),
            "out of the routers' choice at once"
        );
        assert!(!r.fake.engines()[&pid].stopped, "still draining");
        r.passes(1).await;
        assert!(r.fake.engines()[&pid].stopped);
        assert!(!r.dir.path().join("engines/d_both-0.json").exists());

        // A drain timeout of zero stops a busy engine at once.
        let r = rig(
            "busy_polls=100",
            Timings {
                drain_timeout: Duration::ZERO,
                ..NO_WAITS
            },
        );
        r.passes(2).await;
        let pid = r.report("d/both-0").unwrap().pid.unwrap();
        r.set(assigned(&[], "fake"));
        r.passes(2).await;
        assert!(r.fake.engines()[&pid].stopped);
    });
}

#[test]
fn a_new_supervisor_recovers_running_engines_by_identity() {
    rt().block_on(async {
        let r = rig("fingerprint=7", NO_WAITS);
        r.passes(2).await;
        let pid = r.report("d/both-0").unwrap().pid.unwrap();
        let record: TaskRecord = serde_json::from_str(
            &std::fs::read_to_string(r.dir.path().join("engines/d_both-0.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(record.driver, "fake");
        assert_eq!(record.identity.as_ref().unwrap().model_fingerprint, 7);

        // The agent restarts: the new supervisor takes the engine back, starts nothing.
        let again = |r: &Rig| {
            Supervisor::with_drivers(
                "n",
                r.dir.path(),
                &r.dir.path().join("models"),
                r.orders.clone(),
                None,
                vec![r.fake.clone() as Arc<dyn Driver>],
                NO_WAITS,
            )
            .unwrap()
        };
        let sup = again(&r);
        sup.adopt().await;
        sup.reconcile().await;
        let rep = r.report("d/both-0").unwrap();
        assert_eq!(
            (rep.state, rep.pid, rep.restarts),
            (EngineState::Ready, Some(pid), 0)
        );
        assert_eq!(r.fake.starts(), 1);

        // An engine that answers as another model is not adopted: stopped and replaced.
        r.fake
            .set_faults(FakeFaults::parse("fingerprint=8").unwrap());
        let sup = again(&r);
        sup.adopt().await;
        assert!(!r.fake.engines()[&pid].alive);
        sup.reconcile().await;
        sup.reconcile().await;
        let rep = r.report("d/both-0").unwrap();
        assert_eq!(rep.state, EngineState::Ready);
        assert_ne!(rep.pid, Some(pid));
        assert_eq!(r.fake.starts(), 2);
    });
}

#[test]
fn an_engine_of_an_unknown_driver_is_failed_not_started() {
    rt().block_on(async {
        let r = rig("", NO_WAITS);
        r.set(assigned(&[("d/both-0", 0, 10)], "vllm"));
        r.passes(2).await;
        assert_eq!(r.report("d/both-0").unwrap().state, EngineState::Failed);
        assert_eq!(r.fake.starts(), 0);
    });
}
