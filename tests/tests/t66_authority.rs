//! Authority and custody over the real transport and admin API: a node's certificate speaks
//! only for that node, admin writes are applied only by the coordinator that checked the admin
//! credential, only hosts an admin made eligible become voters (and so hold the CA key), and a
//! removed voter deletes its copy of the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pd_raft::{AdminState, Command, EngineRole, Layout};
use pd_tests::*;
use pd_transport::{Endpoint, Identity, TransportConfig, TransportError};
use pdagent::wire::{AgentRequest, AgentResponse};

fn node_dir(l: &LocalCluster, node: &str) -> PathBuf {
    l.dir.path().join(node)
}

/// What an admin can change, as the admin API shows it.
fn admin_view(l: &LocalCluster) -> serde_json::Value {
    let s = l.status().expect("status");
    let nodes: Vec<serde_json::Value> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n["name"], "labels": n["labels"], "admin_state": n["admin_state"],
                "raft_role": n["raft_role"], "address": n["address"],
            })
        })
        .collect();
    let json = |args: &[&str]| -> serde_json::Value {
        let out = l.pdctl(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    serde_json::json!({
        "nodes": nodes,
        "apikeys": json(&["apikey", "list", "-o", "json"]),
        "deployments": json(&["deployments", "-o", "json"]),
    })
}

fn coordinator_and_other(l: &LocalCluster) -> (String, String) {
    let s = l.status().unwrap();
    let c = s["coordinator"].as_str().unwrap().to_string();
    let other = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .find(|n| *n != c)
        .unwrap()
        .to_string();
    (c, other)
}

/// Proposes `cmd` to the coordinator over the transport with `node`'s own certificate.
async fn propose_as(
    l: &LocalCluster,
    node: &str,
    coordinator: &str,
    cmd: Command,
) -> Result<AgentResponse, TransportError> {
    let pki = node_dir(l, node).join("data/pki");
    let id = Identity::load(
        &pki.join("ca.crt"),
        &pki.join("node.crt"),
        &pki.join("node.key"),
    )
    .unwrap();
    let ep = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &id,
        &TransportConfig::default(),
    )
    .unwrap();
    let addr = node_addr_transport(l, coordinator);
    let conn = ep.connect(addr, coordinator).await?;
    let r = conn.call(&AgentRequest::Propose(cmd)).await;
    ep.shutdown(Duration::from_millis(100)).await;
    r
}

fn node_addr_transport(l: &LocalCluster, node: &str) -> std::net::SocketAddr {
    let s = l.status().unwrap();
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["address"].as_str())
        .unwrap()
        .parse()
        .unwrap()
}

/// Every change that needs the admin credential, some of them about `about`.
fn admin_commands(about: &str) -> Vec<Command> {
    let create = Command::CreateDeployment {
        name: "stolen".into(),
        engine: "builtin".into(),
        model: "/etc".into(),
        tp: 1,
        ttft_ms: None,
        tpot_ms: None,
        layout: Layout::Colocated { engines: 1 },
    };
    vec![
        Command::CreateApiKey {
            id: "mint".into(),
            name: "minted by a node".into(),
            sha256_hex: "00".repeat(32),
            created_unix: 0,
        },
        Command::RequireApiKeys { required: false },
        Command::RemoveNode {
            node: about.into(),
            cert_serial: None,
        },
        Command::SetLabel {
            node: about.into(),
            key: "pdagent/voter".into(),
            value: Some("eligible".into()),
        },
        create.clone(),
        Command::CreateDeploymentWithArgs {
            create: Box::new(create),
            engine_args: vec![],
        },
        Command::FlipNode {
            node: about.into(),
            role: EngineRole::Decode,
        },
        Command::SetAdminState {
            node: about.into(),
            state: AdminState::Active,
        },
        Command::RegisterNode {
            name: "intruder".into(),
            id: 99,
            address: "127.0.0.99:1".into(),
            labels: BTreeMap::new(),
        },
    ]
}

#[test]
fn a_nodes_certificate_speaks_only_for_that_node() {
    let _g = serial();
    let l = LocalCluster::up(3, free_base(3));
    let (coordinator, node) = coordinator_and_other(&l);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = admin_view(&l);

    // Admin-only changes, about itself, another node or the cluster: refused.
    for about in [node.as_str(), coordinator.as_str()] {
        for cmd in admin_commands(about) {
            let what = format!("{cmd:?}");
            match rt.block_on(propose_as(&l, &node, &coordinator, cmd)) {
                Err(TransportError::Remote(m)) => {
                    assert!(m.contains("refused"), "{what}: {m}")
                }
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
        }
    }
    // What a node may say about itself, said about another node: refused.
    let about_other = [
        Command::SetGpus {
            node: coordinator.clone(),
            gpus: vec![],
        },
        Command::RecordCertificate {
            node: coordinator.clone(),
            cert_serial: "01".into(),
            not_after_unix: 0,
        },
        Command::SetAdminState {
            node: coordinator.clone(),
            state: AdminState::Draining,
        },
    ];
    for cmd in about_other {
        let what = format!("{cmd:?}");
        match rt.block_on(propose_as(&l, &node, &coordinator, cmd)) {
            Err(TransportError::Remote(m)) => {
                assert!(m.contains("speaks only for itself"), "{what}: {m}")
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        admin_view(&l),
        before,
        "a refused proposal changed the state"
    );

    // About itself: taking itself out of service is its own to say.
    let r = rt.block_on(propose_as(
        &l,
        &node,
        &coordinator,
        Command::SetAdminState {
            node: node.clone(),
            state: AdminState::Cordoned,
        },
    ));
    assert!(
        matches!(r, Ok(AgentResponse::Proposed(Ok(_)))),
        "cordoning itself: {r:?}"
    );
    let cordoned = |v: &serde_json::Value| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == node.as_str() && n["admin_state"] == "cordoned")
    };
    assert!(cordoned(&admin_view(&l)));

    // The admin API of an agent that is not the coordinator names the coordinator instead of
    // vouching for the write; pdctl follows it there.
    let only_node = l.dir.path().join("only-node.toml");
    let text_cfg = std::fs::read_to_string(l.config()).unwrap();
    let agents_line = text_cfg
        .lines()
        .find(|x| x.starts_with("agents"))
        .unwrap()
        .to_string();
    let mine = agents_line
        .split('"')
        .find(|a| a.starts_with(&format!("{node}@")))
        .unwrap()
        .to_string();
    std::fs::write(
        &only_node,
        text_cfg.replace(&agents_line, &format!("agents = [\"{mine}\"]")),
    )
    .unwrap();
    let cfg = only_node.to_str().unwrap();
    let out = pdctl(&["--config", cfg, "label", &node, "team=x"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("421") && err.contains(&coordinator) && err.contains("not the coordinator"),
        "{err}"
    );
    let out = l.pdctl(&["uncordon", &node]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!cordoned(&admin_view(&l)));

    // The local socket of a host that is not the coordinator: it may drain its own host,
    // nothing else.
    let sock = l.dir.path().join("sock.toml");
    std::fs::write(
        &sock,
        format!(
            "socket = \"{}\"\n",
            node_dir(&l, &node).join("data/admin.sock").display()
        ),
    )
    .unwrap();
    let cfg = sock.to_str().unwrap();
    let out = pdctl(&["--config", cfg, "label", &coordinator, "team=x"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("local socket may only cordon or drain"),
        "{err}"
    );
    let out = pdctl(&["--config", cfg, "uncordon", &node]);
    assert!(!out.status.success(), "uncordon is the admin's");
    let out = pdctl(&["--config", cfg, "drain", &node]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = admin_view(&l);
    assert!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == node.as_str() && n["admin_state"] == "draining"),
        "{v}"
    );
}

fn role_of(l: &LocalCluster, node: &str) -> String {
    l.status().unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .map(|n| n["raft_role"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn ca_key(l: &LocalCluster, node: &str) -> PathBuf {
    node_dir(l, node).join("data/ca.key")
}

fn wait_file(path: &Path, present: bool, what: &str) {
    wait_for(what, deadline(Duration::from_secs(30)), || {
        (path.exists() == present).then_some(())
    });
}

#[test]
fn only_hosts_an_admin_made_eligible_vote_and_a_removed_voter_gives_up_the_ca_key() {
    let _g = serial();
    // Four hosts, three voters wanted: node-1..3 are made eligible by `local up`, node-4 joined
    // with a token only.
    let l = LocalCluster::up(4, free_base(4));
    assert_eq!(role_of(&l, "node-4"), "learner");
    assert!(!ca_key(&l, "node-4").exists());
    let s = l.status().unwrap();
    assert!(s["voters_short"].is_null(), "{s}");

    // A voter dies: the token-joined host is not promoted in its place, and the status says why.
    let (coordinator, _) = coordinator_and_other(&l);
    let victim = ["node-1", "node-2", "node-3"]
        .into_iter()
        .find(|n| *n != coordinator)
        .unwrap();
    let out = pdctl(&[
        "local",
        "kill",
        victim,
        "--dir",
        l.dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let why = wait_for(
        "the status to say no learner is eligible",
        deadline(Duration::from_secs(30)),
        || {
            let s = l.status()?;
            let down = s["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["name"] == victim && n["health"] == "down");
            let why = s["voters_short"].as_str()?.to_string();
            (down && why.contains("not eligible")).then_some(why)
        },
    );
    assert!(why.contains("pdagent/voter=eligible"), "{why}");
    assert_eq!(role_of(&l, "node-4"), "learner");
    assert!(!ca_key(&l, "node-4").exists());

    // An admin makes it eligible: it replaces the dead voter and takes custody of the key.
    let out = l.pdctl(&["label", "node-4", "pdagent/voter=eligible"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        "node-4 to become a voter",
        deadline(Duration::from_secs(30)),
        || (role_of(&l, "node-4") == "voter").then_some(()),
    );
    wait_file(&ca_key(&l, "node-4"), true, "node-4 to hold the CA key");

    // Removed (not demoted): it deletes its copy.
    let out = l.pdctl(&["remove", "node-4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_file(&ca_key(&l, "node-4"), false, "node-4 to delete the CA key");
    let log = std::fs::read_to_string(node_dir(&l, "node-4").join("agent.log")).unwrap();
    assert!(log.contains("removed from the cluster"), "{log}");
}
