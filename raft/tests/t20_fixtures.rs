//! Replicated-state compatibility against committed bytes. `tests/fixtures/` holds a log entry
//! of every command variant and a snapshot, as encoded on disk, written once by the version
//! that introduced them; this test decodes them with today's code and compares with the
//! values they were written from. A change that alters an encoding in place (a variant's
//! payload, a field of a nested record) fails here instead of on an upgraded host, whose agent
//! would refuse to start on its own Raft log.
//!
//! A new variant or schema: add it to `ALL_COMMANDS`/`entries()` and run once with
//! `PDAGENT_WRITE_FIXTURES=1 cargo test --release -p pd-raft --test t20_fixtures`; existing
//! files are never rewritten.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, StoredMembership};
use pd_raft::state::{
    AdminState, ApiKey, Assignment, AutoplanEvent, AutoplanMode, AutoplanMove, AutoplanScore,
    AutoplanSetting, ClusterState, Command, Deployment, EngineRole, GpuRecord, Layout, ModelHosts,
    NodeHealth, NodeRecord, Placed, PlanRecord,
};
use pd_raft::store::StateMachineData;
use pd_raft::{RaftPeer, TypeConfig};

/// Every command variant, by name. Adding a variant breaks `listed` (an exhaustive match), and
/// then this list and `commands()` must name it, with a fixture.
const ALL_COMMANDS: [&str; 20] = [
    "RegisterNode",
    "SetLabel",
    "SetHealth",
    "SetAdminState",
    "SetGpus",
    "RemoveNode",
    "EnrollNode",
    "RecordCertificate",
    "CreateDeployment",
    "DeleteDeployment",
    "ScaleDeployment",
    "SetAssignments",
    "CreateApiKey",
    "RevokeApiKey",
    "RequireApiKeys",
    "FlipNode",
    "CreateCheckedDeployment",
    "CreateDeploymentWithArgs",
    "SetAutoplan",
    "RecordAutoplan",
];

/// Commands that schema 4 added: their fixtures are under `schema-4/`, the others' under
/// `schema-3/` (written before; an appended variant leaves their bytes as they were).
const SCHEMA_4_COMMANDS: [&str; 2] = ["SetAutoplan", "RecordAutoplan"];

/// Fails to compile when a variant is added, so that it gets a fixture.
#[allow(dead_code)]
fn listed(c: &Command) {
    use Command::*;
    match c {
        RegisterNode { .. } | SetLabel { .. } | SetHealth { .. } | SetAdminState { .. } => {}
        SetGpus { .. } | RemoveNode { .. } | EnrollNode { .. } | RecordCertificate { .. } => {}
        CreateDeployment { .. } | DeleteDeployment { .. } | ScaleDeployment { .. } => {}
        SetAssignments { .. } | CreateApiKey { .. } | RevokeApiKey { .. } => {}
        RequireApiKeys { .. } | FlipNode { .. } | CreateCheckedDeployment { .. } => {}
        CreateDeploymentWithArgs { .. } | SetAutoplan { .. } | RecordAutoplan { .. } => {}
    }
}

fn name_of(c: &Command) -> &'static str {
    c.kind()
}

fn gpu(index: u32) -> GpuRecord {
    GpuRecord {
        index,
        uuid: format!("GPU-0000-{index}"),
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_total_bytes: 85_520_809_984,
        health: "healthy".into(),
    }
}

fn plan() -> PlanRecord {
    PlanRecord {
        layout: Layout::Disaggregated {
            prefill: 1,
            decode: 2,
        },
        isl: 1024,
        osl: 256,
        gpus: "2 x H100".into(),
        describe: "1P (TP1) + 2D (TP1)".into(),
        request_rate_milli: 4_500,
        output_tokens_per_s_per_gpu_milli: 1_234_567,
        output_tokens_per_s_per_user_milli: 45_000,
        ttft_mean_us: 120_000,
        ttft_p90_us: 180_000,
        tpot_mean_us: 20_000,
        tpot_p90_us: 25_000,
        slo_attainment_ppm: 990_000,
        planned_at: 42,
    }
}

fn setting() -> AutoplanSetting {
    AutoplanSetting {
        mode: AutoplanMode::On,
        min_gpus: Some(2),
        max_gpus: Some(8),
        pd_ratio_min_milli: Some(250),
        pd_ratio_max_milli: Some(4000),
        gain_threshold_milli: Some(150),
        cooldown_windows: Some(3),
        forecast_tolerance_milli: Some(200),
    }
}

fn decision() -> AutoplanEvent {
    AutoplanEvent {
        window: 17,
        term: 5,
        decided_unix: 1_800_000_123,
        mode: AutoplanMode::On,
        seconds_milli: 15_002,
        requests: 300,
        finished: 298,
        within_slo: 120,
        engines_reporting: 3,
        engines_total: 4,
        layout: Layout::Disaggregated {
            prefill: 1,
            decode: 3,
        },
        best: "flip-d-to-p".into(),
        allowed: true,
        reason: "predicted goodput gain 80.0%".into(),
        candidates: vec![
            AutoplanScore {
                action: "keep".into(),
                layout: Layout::Disaggregated {
                    prefill: 1,
                    decode: 3,
                },
                attainment_ppm: Some(400_000),
                goodput_milli: Some(8_000),
                error: None,
            },
            AutoplanScore {
                action: "add-prefill".into(),
                layout: Layout::Disaggregated {
                    prefill: 2,
                    decode: 3,
                },
                attainment_ppm: None,
                goodput_milli: None,
                error: Some("no free GPU".into()),
            },
        ],
        notes: vec!["3 of 4 engines reported".into()],
        moved: Some(AutoplanMove::Flip {
            node: "node-2".into(),
            role: EngineRole::Prefill,
        }),
    }
}

fn create() -> Command {
    Command::CreateDeployment {
        name: "chat".into(),
        engine: "builtin".into(),
        model: "tiny".into(),
        tp: 1,
        ttft_ms: Some(500),
        tpot_ms: None,
        layout: Layout::Colocated { engines: 2 },
    }
}

/// One command of every variant, with every field set to something telling.
fn commands() -> Vec<Command> {
    vec![
        Command::RegisterNode {
            name: "node-2".into(),
            id: 0x1234_5678_9abc,
            address: "10.0.0.2:7400".into(),
            labels: BTreeMap::from([("rack".into(), "r1".into())]),
        },
        Command::SetLabel {
            node: "node-2".into(),
            key: "pdagent/voter".into(),
            value: Some("eligible".into()),
        },
        Command::SetHealth {
            node: "node-2".into(),
            health: NodeHealth::Suspect,
        },
        Command::SetAdminState {
            node: "node-2".into(),
            state: AdminState::Draining,
        },
        Command::SetGpus {
            node: "node-2".into(),
            gpus: vec![gpu(0), gpu(1)],
        },
        Command::RemoveNode {
            node: "node-3".into(),
            cert_serial: Some("0a1b2c".into()),
        },
        Command::EnrollNode {
            node: "node-4".into(),
            id: 99,
            cert_serial: "ff00".into(),
            not_after_unix: 1_900_000_000,
        },
        Command::RecordCertificate {
            node: "node-2".into(),
            cert_serial: "beef".into(),
            not_after_unix: 1_800_000_000,
        },
        create(),
        Command::DeleteDeployment { name: "old".into() },
        Command::ScaleDeployment {
            name: "chat".into(),
            layout: Layout::Disaggregated {
                prefill: 1,
                decode: 3,
            },
        },
        Command::SetAssignments {
            deployment: "chat".into(),
            assignments: vec![Placed {
                engine: "chat/decode-0".into(),
                role: EngineRole::Decode,
                node: "node-2".into(),
                gpus: vec![0, 1],
            }],
        },
        Command::CreateApiKey {
            id: "k1".into(),
            name: "ci".into(),
            sha256_hex: "ab".repeat(32),
            created_unix: 1_700_000_000,
        },
        Command::RevokeApiKey { id: "k0".into() },
        Command::RequireApiKeys { required: true },
        Command::FlipNode {
            node: "node-2".into(),
            role: EngineRole::Prefill,
        },
        Command::CreateCheckedDeployment {
            name: "big".into(),
            engine: "vllm".into(),
            model: "/models/llama".into(),
            tp: 2,
            ttft_ms: Some(300),
            tpot_ms: Some(30),
            layout: Layout::Disaggregated {
                prefill: 1,
                decode: 2,
            },
            plan: Some(plan()),
            model_hosts: Some(ModelHosts {
                fingerprint: "f00d".into(),
                nodes: BTreeSet::from(["node-1".into(), "node-2".into()]),
            }),
        },
        Command::CreateDeploymentWithArgs {
            create: Box::new(create()),
            engine_args: vec!["--max-model-len=1024".into()],
        },
        Command::SetAutoplan {
            deployment: "chat".into(),
            setting: setting(),
        },
        Command::RecordAutoplan {
            deployment: "chat".into(),
            event: decision(),
        },
    ]
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(3, 1), index)
}

fn peers() -> BTreeMap<u64, RaftPeer> {
    BTreeMap::from([
        (
            1,
            RaftPeer {
                name: "node-1".into(),
                address: "10.0.0.1:7400".into(),
            },
        ),
        (
            2,
            RaftPeer {
                name: "node-2".into(),
                address: "10.0.0.2:7400".into(),
            },
        ),
    ])
}

fn membership() -> Membership<u64, RaftPeer> {
    Membership::new(vec![BTreeSet::from([1])], peers())
}

/// The log entries, by fixture name.
fn entries() -> Vec<(String, Entry<TypeConfig>)> {
    let mut out: Vec<(String, Entry<TypeConfig>)> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            (
                format!("log-{}", name_of(&c)),
                Entry {
                    log_id: log_id(10 + i as u64),
                    payload: EntryPayload::Normal(c),
                },
            )
        })
        .collect();
    out.push((
        "log-Blank".into(),
        Entry {
            log_id: log_id(1),
            payload: EntryPayload::Blank,
        },
    ));
    out.push((
        "log-Membership".into(),
        Entry {
            log_id: log_id(2),
            payload: EntryPayload::Membership(membership()),
        },
    ));
    out
}

/// A snapshot with every part of the state filled.
fn snapshot() -> StateMachineData {
    let mut s = ClusterState::default();
    s.nodes.insert(
        "node-2".into(),
        NodeRecord {
            name: "node-2".into(),
            id: 2,
            address: "10.0.0.2:7400".into(),
            labels: BTreeMap::from([("pdagent/voter".into(), "eligible".into())]),
            gpus: vec![gpu(0)],
            health: NodeHealth::Ready,
            admin_state: AdminState::Cordoned,
            registered_at: 7,
        },
    );
    s.revoked_serials.insert("0a1b2c".into());
    s.retired_ids.insert(3);
    s.certificates.insert(
        "node-2".into(),
        BTreeMap::from([("beef".into(), 1_800_000_000)]),
    );
    s.deployments.insert(
        "chat".into(),
        Deployment {
            name: "chat".into(),
            engine: "builtin".into(),
            model: "tiny".into(),
            tp: 1,
            ttft_ms: Some(500),
            tpot_ms: None,
            layout: Layout::Colocated { engines: 1 },
            created_at: 12,
        },
    );
    s.assignments.insert(
        "chat/both-0".into(),
        Assignment {
            engine: "chat/both-0".into(),
            deployment: "chat".into(),
            role: EngineRole::Both,
            node: "node-2".into(),
            gpus: vec![0],
            generation: 13,
        },
    );
    s.api_keys.insert(
        "k1".into(),
        ApiKey {
            id: "k1".into(),
            name: "ci".into(),
            sha256_hex: "ab".repeat(32),
            created_unix: 1_700_000_000,
        },
    );
    s.api_keys_required = true;
    s.plans.insert("chat".into(), plan());
    s.model_hosts.insert(
        "chat".into(),
        ModelHosts {
            fingerprint: "f00d".into(),
            nodes: BTreeSet::from(["node-2".into()]),
        },
    );
    s.engine_args
        .insert("chat".into(), vec!["--max-model-len=1024".into()]);
    s.autoplan.insert("chat".into(), setting());
    s.autoplan_events.insert(
        "chat".into(),
        vec![
            decision(),
            AutoplanEvent {
                moved: Some(AutoplanMove::Scale {
                    layout: Layout::Disaggregated {
                        prefill: 2,
                        decode: 2,
                    },
                }),
                ..decision()
            },
        ],
    );
    StateMachineData {
        last_applied: Some(log_id(40)),
        last_membership: StoredMembership::new(Some(log_id(2)), membership()),
        state: s,
    }
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The committed bytes of fixture `name` (written first when asked to and missing).
fn fixture(name: &str, encode_now: &[u8]) -> Vec<u8> {
    let path = dir().join(format!("{name}.bin"));
    if !path.exists() && std::env::var_os("PDAGENT_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, encode_now).unwrap();
    }
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (a new variant or schema writes its fixture once: PDAGENT_WRITE_FIXTURES=1)",
            path.display()
        )
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    pd_transport::codec::encode(v).unwrap()
}

#[test]
fn every_command_has_a_fixture() {
    let names: BTreeSet<String> = commands().iter().map(|c| name_of(c).to_string()).collect();
    let all: BTreeSet<String> = ALL_COMMANDS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        names, all,
        "commands() must hold one command of every variant"
    );
}

#[test]
fn log_entries_decode_from_committed_bytes() {
    for (name, want) in entries() {
        let schema = if SCHEMA_4_COMMANDS.iter().any(|c| name == format!("log-{c}")) {
            4
        } else {
            3
        };
        let bytes = fixture(&format!("schema-{schema}/{name}"), &encode(&want));
        let got: Entry<TypeConfig> = pd_transport::codec::decode(&bytes, 1 << 20)
            .unwrap_or_else(|e| panic!("{name}: the committed bytes no longer decode: {e}"));
        assert_eq!(got, want, "{name}: decodes to something else");
        assert_eq!(
            encode(&want),
            bytes,
            "{name}: today's encoding differs from the committed one"
        );
    }
}

#[test]
fn schema_4_snapshot_decodes_from_committed_bytes() {
    let want = snapshot();
    let bytes = fixture("schema-4/snapshot", &encode(&want));
    let got = StateMachineData::decode(&bytes).expect("the committed snapshot decodes");
    assert_eq!(got.state, want.state);
    assert_eq!(got.last_applied, want.last_applied);
    assert_eq!(got.last_membership, want.last_membership);
}

/// Older schemas: snapshots written by this version's frozen copies of their shapes (schema 1
/// had no plans or model hosts, schema 2 no engine arguments, schema 3 no re-planning), read
/// through today's upgrade.
#[test]
fn older_schema_snapshots_are_upgraded() {
    for (schema, lacks_plans, lacks_args) in [(1, true, true), (2, false, true), (3, false, false)]
    {
        let bytes = std::fs::read(dir().join(format!("schema-{schema}/snapshot.bin")))
            .unwrap_or_else(|e| panic!("schema-{schema}/snapshot.bin: {e}"));
        let got =
            StateMachineData::decode(&bytes).unwrap_or_else(|e| panic!("schema {schema}: {e}"));
        let mut want = snapshot().state;
        if lacks_plans {
            want.plans.clear();
            want.model_hosts.clear();
        }
        if lacks_args {
            want.engine_args.clear();
        }
        want.autoplan.clear();
        want.autoplan_events.clear();
        assert_eq!(got.state, want, "schema {schema}");
        assert_eq!(got.last_applied, snapshot().last_applied);
    }
}

/// Writes the schema-1 and schema-2 snapshot fixtures from frozen copies of those shapes
/// (once; they are committed).
#[test]
fn older_schema_fixtures_exist() {
    #[derive(serde::Serialize)]
    struct V1 {
        schema_version: u32,
        nodes: BTreeMap<String, NodeRecord>,
        revoked_serials: BTreeSet<String>,
        retired_ids: BTreeSet<u64>,
        certificates: BTreeMap<String, BTreeMap<String, i64>>,
        deployments: BTreeMap<String, Deployment>,
        assignments: BTreeMap<String, Assignment>,
        api_keys: BTreeMap<String, ApiKey>,
        api_keys_required: bool,
    }
    #[derive(serde::Serialize)]
    struct V2 {
        schema_version: u32,
        nodes: BTreeMap<String, NodeRecord>,
        revoked_serials: BTreeSet<String>,
        retired_ids: BTreeSet<u64>,
        certificates: BTreeMap<String, BTreeMap<String, i64>>,
        deployments: BTreeMap<String, Deployment>,
        assignments: BTreeMap<String, Assignment>,
        api_keys: BTreeMap<String, ApiKey>,
        api_keys_required: bool,
        plans: BTreeMap<String, PlanRecord>,
        model_hosts: BTreeMap<String, ModelHosts>,
    }
    #[derive(serde::Serialize)]
    struct Data<S> {
        last_applied: Option<LogId<u64>>,
        last_membership: StoredMembership<u64, RaftPeer>,
        state: S,
    }
    let d = snapshot();
    let s = d.state.clone();
    let v1 = Data {
        last_applied: d.last_applied,
        last_membership: d.last_membership.clone(),
        state: V1 {
            schema_version: 1,
            nodes: s.nodes.clone(),
            revoked_serials: s.revoked_serials.clone(),
            retired_ids: s.retired_ids.clone(),
            certificates: s.certificates.clone(),
            deployments: s.deployments.clone(),
            assignments: s.assignments.clone(),
            api_keys: s.api_keys.clone(),
            api_keys_required: s.api_keys_required,
        },
    };
    let v2 = Data {
        last_applied: d.last_applied,
        last_membership: d.last_membership.clone(),
        state: V2 {
            schema_version: 2,
            nodes: s.nodes.clone(),
            revoked_serials: s.revoked_serials.clone(),
            retired_ids: s.retired_ids.clone(),
            certificates: s.certificates.clone(),
            deployments: s.deployments.clone(),
            assignments: s.assignments.clone(),
            api_keys: s.api_keys.clone(),
            api_keys_required: s.api_keys_required,
            plans: s.plans.clone(),
            model_hosts: s.model_hosts.clone(),
        },
    };
    fixture("schema-1/snapshot", &encode(&v1));
    fixture("schema-2/snapshot", &encode(&v2));
}
