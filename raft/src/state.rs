//! `ClusterState`: the replicated state, changed only by `apply`, which is pure (no IO, no
//! clock): the same commands in the same order give the same state on every agent. Invalid
//! commands are refused deterministically (`ApplyError`) and change nothing.
//!
//! Heartbeats and load do not come through here: only changes of state do.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Version of the replicated state's shape. An agent refuses a snapshot or log with a newer
/// schema than it knows.
pub const SCHEMA_VERSION: u32 = 1;
/// Bounds on what one command may carry.
pub const LABELS_PER_NODE_MAX: usize = 64;
pub const LABEL_BYTES_MAX: usize = 253;
/// Certificates remembered per node (for revocation on removal); the oldest are forgotten
/// first. A node renews at two thirds of a lifetime, so it never holds more than two live ones.
pub const CERTIFICATES_PER_NODE_MAX: usize = 8;

/// Liveness as the coordinator judges it from heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    Ready,
    Suspect,
    Down,
}

/// What the operator wants of a node, independent of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Active,
    Cordoned,
    Draining,
}

/// A GPU as the cluster records it (telemetry stays out of the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    /// "healthy", "degraded" or "failed".
    pub health: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// The Raft node id.
    pub id: u64,
    /// Transport address (IP:port).
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub gpus: Vec<GpuRecord>,
    pub health: NodeHealth,
    pub admin_state: AdminState,
    /// Log index of the command that registered it.
    pub registered_at: u64,
}

/// A change to the cluster. Variants are only appended, never renumbered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegisterNode {
        name: String,
        id: u64,
        address: String,
        labels: BTreeMap<String, String>,
    },
    SetLabel {
        node: String,
        key: String,
        value: Option<String>,
    },
    SetHealth {
        node: String,
        health: NodeHealth,
    },
    SetAdminState {
        node: String,
        state: AdminState,
    },
    SetGpus {
        node: String,
        gpus: Vec<GpuRecord>,
    },
    /// Removes a node and revokes its certificate (by serial).
    RemoveNode {
        node: String,
        cert_serial: Option<String>,
    },
    /// A host enrolled with a join token under a name no registered node holds: its first
    /// certificate. A removed node's name becomes usable again this way.
    EnrollNode {
        node: String,
        id: u64,
        cert_serial: String,
        not_after_unix: i64,
    },
    /// A registered node's certificate (renewed, or issued offline and reported by the node),
    /// remembered so that removing the node revokes it.
    RecordCertificate {
        node: String,
        cert_serial: String,
        not_after_unix: i64,
    },
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Nothing to report (also: a blank or membership entry).
    Done,
    /// The command changed nothing (it asked for the state that already was).
    Unchanged,
    Registered {
        id: u64,
    },
    Removed {
        id: u64,
    },
}

/// A command refused by the state machine; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    #[error("node {name:?} is already registered with id {id}")]
    NameTaken { name: String, id: u64 },
    #[error("node id {id} already belongs to {name:?}")]
    IdTaken { id: u64, name: String },
    #[error("invalid label {key:?}: {why}")]
    BadLabel { key: String, why: String },
    #[error("node {node:?} has {count} labels, the limit is {LABELS_PER_NODE_MAX}")]
    TooManyLabels { node: String, count: usize },
    /// Refused by the coordinator before it reached the log.
    #[error("{0}")]
    Refused(String),
}

/// The response carried back to the proposer through Raft.
pub type CommandResult = Result<Applied, ApplyError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub schema_version: u32,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Serials of revoked certificates (hex).
    pub revoked_serials: BTreeSet<String>,
    /// Ids of removed nodes: refused until the name enrolls again with a join token.
    pub retired_ids: BTreeSet<u64>,
    /// Known certificates per node name: serial (hex) -> expiry (unix seconds).
    #[serde(default)]
    pub certificates: BTreeMap<String, BTreeMap<String, i64>>,
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            schema_version: SCHEMA_VERSION,
            nodes: BTreeMap::new(),
            revoked_serials: BTreeSet::new(),
            retired_ids: BTreeSet::new(),
            certificates: BTreeMap::new(),
        }
    }
}

fn check_label(key: &str, value: Option<&str>) -> Result<(), ApplyError> {
    let bad = |why: &str| {
        Err(ApplyError::BadLabel {
            key: key.to_string(),
            why: why.to_string(),
        })
    };
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
    if key.is_empty() || key.len() > LABEL_BYTES_MAX || !key.chars().all(ok_char) {
        return bad("keys are 1 to 253 of a-z, A-Z, 0-9, '-', '_', '.', '/'");
    }
    if value.is_some_and(|v| v.len() > LABEL_BYTES_MAX || !v.chars().all(ok_char)) {
        return bad("values are at most 253 of a-z, A-Z, 0-9, '-', '_', '.', '/'");
    }
    Ok(())
}

impl ClusterState {
    pub fn node(&self, name: &str) -> Result<&NodeRecord, ApplyError> {
        self.nodes
            .get(name)
            .ok_or_else(|| ApplyError::UnknownNode(name.to_string()))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut NodeRecord, ApplyError> {
        self.nodes
            .get_mut(name)
            .ok_or_else(|| ApplyError::UnknownNode(name.to_string()))
    }

    /// Whether the node with this id was removed from the cluster.
    pub fn is_removed(&self, id: u64) -> bool {
        self.retired_ids.contains(&id)
    }

    pub fn node_by_id(&self, id: u64) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.id == id)
    }

    fn remember_certificate(&mut self, node: &str, serial: &str, not_after_unix: i64) {
        let certs = self.certificates.entry(node.to_string()).or_default();
        certs.insert(serial.to_ascii_lowercase(), not_after_unix);
        while certs.len() > CERTIFICATES_PER_NODE_MAX {
            let oldest = certs
                .iter()
                .min_by_key(|(serial, exp)| (**exp, (*serial).clone()))
                .map(|(s, _)| s.clone());
            if let Some(s) = oldest {
                certs.remove(&s);
            }
        }
    }

    /// Whether a certificate serial (hex) was revoked.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.revoked_serials
            .contains(&serial_hex.to_ascii_lowercase())
    }

    /// Applies one command at log index `index`. Pure: no IO, no clock.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> CommandResult {
        match cmd {
            Command::RegisterNode {
                name,
                id,
                address,
                labels,
            } => {
                for (k, v) in labels {
                    check_label(k, Some(v))?;
                }
                if labels.len() > LABELS_PER_NODE_MAX {
                    return Err(ApplyError::TooManyLabels {
                        node: name.clone(),
                        count: labels.len(),
                    });
                }
                if let Some(n) = self.nodes.get(name) {
                    if n.id == *id {
                        // A re-registration (e.g. after a restart) refreshes the address.
                        let n = self.node_mut(name)?;
                        if n.address == *address {
                            return Ok(Applied::Unchanged);
                        }
                        n.address = address.clone();
                        return Ok(Applied::Registered { id: *id });
                    }
                    return Err(ApplyError::NameTaken {
                        name: name.clone(),
                        id: n.id,
                    });
                }
                if let Some(other) = self.node_by_id(*id) {
                    return Err(ApplyError::IdTaken {
                        id: *id,
                        name: other.name.clone(),
                    });
                }
                if self.retired_ids.contains(id) {
                    return Err(ApplyError::IdTaken {
                        id: *id,
                        name: "(removed node)".into(),
                    });
                }
                self.nodes.insert(
                    name.clone(),
                    NodeRecord {
                        name: name.clone(),
                        id: *id,
                        address: address.clone(),
                        labels: labels.clone(),
                        gpus: Vec::new(),
                        health: NodeHealth::Ready,
                        admin_state: AdminState::Active,
                        registered_at: index,
                    },
                );
                Ok(Applied::Registered { id: *id })
            }
            Command::SetLabel { node, key, value } => {
                check_label(key, value.as_deref())?;
                let n = self.node_mut(node)?;
                let before = n.labels.get(key).cloned();
                if before == *value {
                    return Ok(Applied::Unchanged);
                }
                match value {
                    Some(v) => {
                        if before.is_none() && n.labels.len() >= LABELS_PER_NODE_MAX {
                            return Err(ApplyError::TooManyLabels {
                                node: node.clone(),
                                count: n.labels.len() + 1,
                            });
                        }
                        n.labels.insert(key.clone(), v.clone());
                    }
                    None => {
                        n.labels.remove(key);
                    }
                }
                Ok(Applied::Done)
            }
            Command::SetHealth { node, health } => {
                let n = self.node_mut(node)?;
                if n.health == *health {
                    return Ok(Applied::Unchanged);
                }
                n.health = *health;
                Ok(Applied::Done)
            }
            Command::SetAdminState { node, state } => {
                let n = self.node_mut(node)?;
                if n.admin_state == *state {
                    return Ok(Applied::Unchanged);
                }
                n.admin_state = *state;
                Ok(Applied::Done)
            }
            Command::SetGpus { node, gpus } => {
                let n = self.node_mut(node)?;
                if n.gpus == *gpus {
                    return Ok(Applied::Unchanged);
                }
                n.gpus = gpus.clone();
                Ok(Applied::Done)
            }
            Command::RemoveNode { node, cert_serial } => {
                let n = self
                    .nodes
                    .remove(node)
                    .ok_or_else(|| ApplyError::UnknownNode(node.clone()))?;
                self.retired_ids.insert(n.id);
                if let Some(s) = cert_serial {
                    self.revoked_serials.insert(s.to_ascii_lowercase());
                }
                if let Some(certs) = self.certificates.remove(node) {
                    self.revoked_serials.extend(certs.into_keys());
                }
                Ok(Applied::Removed { id: n.id })
            }
            Command::EnrollNode {
                node,
                id,
                cert_serial,
                not_after_unix,
            } => {
                if let Some(n) = self.nodes.get(node) {
                    return Err(ApplyError::NameTaken {
                        name: node.clone(),
                        id: n.id,
                    });
                }
                self.retired_ids.remove(id);
                self.remember_certificate(node, cert_serial, *not_after_unix);
                Ok(Applied::Done)
            }
            Command::RecordCertificate {
                node,
                cert_serial,
                not_after_unix,
            } => {
                self.node(node)?;
                if self
                    .certificates
                    .get(node)
                    .is_some_and(|c| c.contains_key(&cert_serial.to_ascii_lowercase()))
                {
                    return Ok(Applied::Unchanged);
                }
                self.remember_certificate(node, cert_serial, *not_after_unix);
                Ok(Applied::Done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, id: u64) -> Command {
        Command::RegisterNode {
            name: name.into(),
            id,
            address: format!("127.0.0.{id}:7400"),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn register_label_health_admin_remove() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(1, &reg("node-1", 1)),
            Ok(Applied::Registered { id: 1 })
        );
        assert_eq!(s.apply(2, &reg("node-1", 1)), Ok(Applied::Unchanged));
        assert_eq!(
            s.apply(3, &reg("node-1", 9)),
            Err(ApplyError::NameTaken {
                name: "node-1".into(),
                id: 1
            })
        );
        assert_eq!(
            s.apply(4, &reg("node-2", 1)),
            Err(ApplyError::IdTaken {
                id: 1,
                name: "node-1".into()
            })
        );
        let label = Command::SetLabel {
            node: "node-1".into(),
            key: "rack".into(),
            value: Some("r1".into()),
        };
        assert_eq!(s.apply(5, &label), Ok(Applied::Done));
        assert_eq!(s.apply(6, &label), Ok(Applied::Unchanged));
        assert_eq!(s.nodes["node-1"].labels["rack"], "r1");
        let bad = Command::SetLabel {
            node: "node-1".into(),
            key: "a b".into(),
            value: None,
        };
        assert!(matches!(s.apply(7, &bad), Err(ApplyError::BadLabel { .. })));
        let h = Command::SetHealth {
            node: "node-1".into(),
            health: NodeHealth::Suspect,
        };
        assert_eq!(s.apply(8, &h), Ok(Applied::Done));
        let a = Command::SetAdminState {
            node: "node-1".into(),
            state: AdminState::Cordoned,
        };
        assert_eq!(s.apply(9, &a), Ok(Applied::Done));
        assert_eq!(s.nodes["node-1"].health, NodeHealth::Suspect);
        assert_eq!(s.nodes["node-1"].admin_state, AdminState::Cordoned);
        let unknown = Command::SetHealth {
            node: "node-9".into(),
            health: NodeHealth::Down,
        };
        assert_eq!(
            s.apply(10, &unknown),
            Err(ApplyError::UnknownNode("node-9".into()))
        );
        let rm = Command::RemoveNode {
            node: "node-1".into(),
            cert_serial: Some("ABCD".into()),
        };
        assert_eq!(s.apply(11, &rm), Ok(Applied::Removed { id: 1 }));
        assert!(s.revoked_serials.contains("abcd"));
        // A removed node's id is never reused.
        assert!(matches!(
            s.apply(12, &reg("node-3", 1)),
            Err(ApplyError::IdTaken { .. })
        ));
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("node-1", 1)).unwrap();
        let before = s.clone();
        let cmds = [
            reg("node-1", 2),
            reg("node-2", 1),
            Command::SetLabel {
                node: "node-1".into(),
                key: String::new(),
                value: Some("x".into()),
            },
            Command::SetGpus {
                node: "nope".into(),
                gpus: vec![],
            },
            Command::RemoveNode {
                node: "nope".into(),
                cert_serial: None,
            },
        ];
        for c in &cmds {
            assert!(s.apply(2, c).is_err(), "{c:?}");
            assert_eq!(s, before, "{c:?} changed the state");
        }
    }

    #[test]
    fn same_commands_same_state() {
        let cmds: Vec<Command> = (1..=20)
            .flat_map(|i| {
                vec![
                    reg(&format!("n{}", i % 7), i % 7 + 1),
                    Command::SetLabel {
                        node: format!("n{}", i % 5),
                        key: "k".into(),
                        value: Some(format!("v{i}")),
                    },
                    Command::SetHealth {
                        node: format!("n{}", i % 3),
                        health: NodeHealth::Down,
                    },
                ]
            })
            .collect();
        let run = || {
            let mut s = ClusterState::default();
            let out: Vec<_> = cmds
                .iter()
                .enumerate()
                .map(|(i, c)| s.apply(i as u64, c))
                .collect();
            (s, out)
        };
        assert_eq!(run(), run());
    }

    /// Removing a node revokes every certificate the cluster knows it by; enrolling the name
    /// again with a token lifts the refusal of the name but not of the old certificates.
    #[test]
    fn enroll_record_remove_revokes_and_reenroll() {
        let mut s = ClusterState::default();
        let enroll = |serial: &str| Command::EnrollNode {
            node: "node-2".into(),
            id: 2,
            cert_serial: serial.into(),
            not_after_unix: 100,
        };
        assert_eq!(s.apply(1, &enroll("AA")), Ok(Applied::Done));
        s.apply(2, &reg("node-2", 2)).unwrap();
        // A registered name cannot be enrolled again (a token is no licence to impersonate).
        assert!(matches!(
            s.apply(3, &enroll("bb")),
            Err(ApplyError::NameTaken { .. })
        ));
        let record = |serial: &str, exp| Command::RecordCertificate {
            node: "node-2".into(),
            cert_serial: serial.into(),
            not_after_unix: exp,
        };
        assert_eq!(s.apply(4, &record("cc", 200)), Ok(Applied::Done));
        assert_eq!(s.apply(5, &record("CC", 200)), Ok(Applied::Unchanged));
        assert!(matches!(
            s.apply(
                6,
                &Command::RecordCertificate {
                    node: "ghost".into(),
                    cert_serial: "dd".into(),
                    not_after_unix: 1
                }
            ),
            Err(ApplyError::UnknownNode(_))
        ));
        s.apply(
            7,
            &Command::RemoveNode {
                node: "node-2".into(),
                cert_serial: None,
            },
        )
        .unwrap();
        assert!(s.is_revoked("aa") && s.is_revoked("cc"));
        assert!(s.is_removed(2));
        assert_eq!(s.apply(8, &enroll("ee")), Ok(Applied::Done));
        assert!(!s.is_removed(2));
        assert!(s.is_revoked("aa") && !s.is_revoked("ee"));
    }

    /// The certificates remembered per node are bounded; the oldest go first.
    #[test]
    fn certificates_per_node_are_bounded() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("n", 1)).unwrap();
        for i in 0..(CERTIFICATES_PER_NODE_MAX as i64 + 3) {
            s.apply(
                2 + i as u64,
                &Command::RecordCertificate {
                    node: "n".into(),
                    cert_serial: format!("{i:02x}"),
                    not_after_unix: 1000 + i,
                },
            )
            .unwrap();
        }
        let certs = &s.certificates["n"];
        assert_eq!(certs.len(), CERTIFICATES_PER_NODE_MAX);
        assert!(!certs.contains_key("00") && certs.contains_key("0a"));
    }
}
