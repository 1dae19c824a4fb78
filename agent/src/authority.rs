//! Who may change the replicated state. Pure rules, checked where a change is applied.
//!
//! - **The admin credential** may change anything. It is checked by the coordinator itself:
//!   its admin API accepts writes only over mutual TLS with the admin certificate, or on its
//!   own local socket (root on the coordinator's host runs the Raft leader and holds the CA
//!   key: it is an admin already). Any other agent answers an admin write with
//!   `421 not_coordinator` and the coordinator's name, and `pdctl` sends it there: no agent
//!   vouches for an admin write it did not check.
//! - **A node's certificate** speaks for that node only: over the transport, the coordinator
//!   accepts from node N only what N says about itself ([`node_may_propose`]): its GPUs, its
//!   own certificate record, and taking itself out of service (cordon, drain). Registration
//!   goes through `Join` (a node joins under the name of its certificate) and enrollment through
//!   a join token, each checked where it is handled.
//! - **A local socket on a host that is not the coordinator** may read, and may propose what
//!   that node may say about itself (the same rule: cordon or drain this host, which an
//!   operator logged into it for maintenance needs); every other write needs the admin
//!   credential at the coordinator.

use pd_raft::{AdminState, Command};

/// Whether node `node` may propose `cmd` on its own authority (its certificate, or its local
/// socket). `Err` says what the command needs instead.
pub fn node_may_propose(node: &str, cmd: &Command) -> Result<(), String> {
    let about = match cmd {
        Command::SetGpus { node: n, .. } | Command::RecordCertificate { node: n, .. } => n,
        Command::SetAdminState {
            node: n,
            state: AdminState::Cordoned | AdminState::Draining,
        } => n,
        other => {
            return Err(format!(
                "{} needs the admin credential (a node's certificate speaks only for that node)",
                other.kind()
            ));
        }
    };
    if about != node {
        return Err(format!(
            "node {node} may not propose {} about node {about}: a node speaks only for itself",
            cmd.kind()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_raft::{EngineRole, Layout, NodeHealth};
    use std::collections::BTreeMap;

    /// One command of every kind, about node `n`.
    fn every_command(n: &str) -> Vec<Command> {
        let create = Command::CreateDeployment {
            name: "m".into(),
            engine: "builtin".into(),
            model: "tiny".into(),
            tp: 1,
            ttft_ms: None,
            tpot_ms: None,
            layout: Layout::Colocated { engines: 1 },
        };
        vec![
            Command::RegisterNode {
                name: n.into(),
                id: 7,
                address: "127.0.0.1:1".into(),
                labels: BTreeMap::new(),
            },
            Command::SetLabel {
                node: n.into(),
                key: "k".into(),
                value: Some("v".into()),
            },
            Command::SetHealth {
                node: n.into(),
                health: NodeHealth::Down,
            },
            Command::SetAdminState {
                node: n.into(),
                state: AdminState::Active,
            },
            Command::SetAdminState {
                node: n.into(),
                state: AdminState::Cordoned,
            },
            Command::SetAdminState {
                node: n.into(),
                state: AdminState::Draining,
            },
            Command::SetGpus {
                node: n.into(),
                gpus: vec![],
            },
            Command::RemoveNode {
                node: n.into(),
                cert_serial: None,
            },
            Command::EnrollNode {
                node: n.into(),
                id: 7,
                cert_serial: "01".into(),
                not_after_unix: 0,
            },
            Command::RecordCertificate {
                node: n.into(),
                cert_serial: "01".into(),
                not_after_unix: 0,
            },
            create.clone(),
            Command::DeleteDeployment { name: "m".into() },
            Command::ScaleDeployment {
                name: "m".into(),
                layout: Layout::Colocated { engines: 2 },
            },
            Command::SetAssignments {
                deployment: "m".into(),
                assignments: vec![],
            },
            Command::CreateApiKey {
                id: "k".into(),
                name: "k".into(),
                sha256_hex: "00".into(),
                created_unix: 0,
            },
            Command::RevokeApiKey { id: "k".into() },
            Command::RequireApiKeys { required: false },
            Command::FlipNode {
                node: n.into(),
                role: EngineRole::Decode,
            },
            Command::CreateCheckedDeployment {
                name: "m".into(),
                engine: "builtin".into(),
                model: "/etc".into(),
                tp: 1,
                ttft_ms: None,
                tpot_ms: None,
                layout: Layout::Colocated { engines: 1 },
                plan: None,
                model_hosts: None,
            },
            Command::CreateDeploymentWithArgs {
                create: Box::new(create),
                engine_args: vec![],
            },
            Command::SetAutoplan {
                deployment: "m".into(),
                setting: pd_raft::AutoplanSetting::mode(pd_raft::AutoplanMode::On),
            },
            Command::RecordAutoplan {
                deployment: "m".into(),
                event: pd_raft::AutoplanEvent {
                    window: 1,
                    term: 1,
                    decided_unix: 0,
                    mode: pd_raft::AutoplanMode::On,
                    seconds_milli: 0,
                    requests: 0,
                    finished: 0,
                    within_slo: 0,
                    engines_reporting: 0,
                    engines_total: 0,
                    layout: Layout::Colocated { engines: 1 },
                    best: "flip-prefill-to-decode".into(),
                    allowed: true,
                    reason: String::new(),
                    candidates: vec![],
                    notes: vec![],
                    moved: Some(pd_raft::AutoplanMove::Flip {
                        node: n.into(),
                        role: EngineRole::Decode,
                    }),
                },
            },
        ]
    }

    fn self_scoped(cmd: &Command) -> bool {
        matches!(
            cmd,
            Command::SetGpus { .. }
                | Command::RecordCertificate { .. }
                | Command::SetAdminState {
                    state: AdminState::Cordoned | AdminState::Draining,
                    ..
                }
        )
    }

    #[test]
    fn a_node_speaks_only_for_itself_and_only_about_itself() {
        for cmd in every_command("node-2") {
            let verdict = node_may_propose("node-2", &cmd);
            assert_eq!(verdict.is_ok(), self_scoped(&cmd), "{cmd:?}: {verdict:?}");
            if let Err(e) = verdict {
                assert!(e.contains(cmd.kind()), "{e}");
            }
            // Nothing about another node, ever.
            let other = node_may_propose("node-3", &cmd).unwrap_err();
            assert!(other.contains(cmd.kind()), "{other}");
        }
    }

    #[test]
    fn undoing_an_admins_cordon_needs_the_admin() {
        let e = node_may_propose(
            "node-2",
            &Command::SetAdminState {
                node: "node-2".into(),
                state: AdminState::Active,
            },
        )
        .unwrap_err();
        assert!(e.contains("admin credential"), "{e}");
    }
}
