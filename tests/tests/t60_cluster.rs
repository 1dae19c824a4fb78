//! The control plane with real agent processes on loopback (node-k on 127.0.0.k): a cluster
//! is founded once and joined through seeds; killing the coordinator elects another; killing
//! every voter loses nothing acknowledged; a restarted agent rejoins from its data dir; an
//! agent never founds a cluster by itself; a host with a foreign certificate cannot join.

use std::path::PathBuf;
use std::time::Duration;

use pd_tests::*;

struct Cluster {
    pki: TestPki,
    configs: Vec<PathBuf>,
    agents: Vec<Option<Agent>>,
    addrs: Vec<String>,
}

impl Cluster {
    /// n agents: node-1 bootstraps, the others join through node-1.
    fn start(n: usize) -> Self {
        Self::start_with_voters(n, 3)
    }

    fn start_with_voters(n: usize, voters: u32) -> Self {
        let pki = TestPki::new();
        let addrs: Vec<String> = (1..=n)
            .map(|i| format!("127.0.0.{i}:{}", free_udp_port(&format!("127.0.0.{i}"))))
            .collect();
        let seed = format!("node-1@{}", addrs[0]);
        let configs: Vec<PathBuf> = (1..=n)
            .map(|i| {
                pki.cluster_node(
                    &format!("node-{i}"),
                    &addrs[i - 1],
                    std::slice::from_ref(&seed),
                )
            })
            .collect();
        for cfg in &configs {
            let text = std::fs::read_to_string(cfg).unwrap();
            let text = text.replace("[cluster]\n", &format!("[cluster]\nvoters = {voters}\n"));
            std::fs::write(cfg, text).unwrap();
        }
        let mut c = Cluster {
            pki,
            configs,
            agents: (0..n).map(|_| None).collect(),
            addrs,
        };
        for i in 0..n {
            c.start_node(i, i == 0);
        }
        // Every host may vote (an admin's decision, through the bootstrap coordinator).
        let names: Vec<String> = (2..=n).map(|i| format!("node-{i}")).collect();
        make_eligible(&c.pki.root.path().join("node-1"), &names);
        c
    }

    fn start_node(&mut self, i: usize, bootstrap: bool) {
        let args: &[&str] = if bootstrap { &["--bootstrap"] } else { &[] };
        self.agents[i] = Some(Agent::start(&self.configs[i], args, &[]));
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            a.signal("KILL");
            let _ = a.wait_exit(deadline(Duration::from_secs(10)));
        }
    }

    fn status(&self, i: usize) -> Option<serde_json::Value> {
        status(&self.configs[i], None)
    }

    /// Waits until agent i sees `n` nodes, `voters` of them voters, and a coordinator other
    /// than `not`; returns the coordinator's name.
    fn wait_formed(&self, i: usize, n: usize, voters: usize, not: Option<&str>) -> String {
        wait_for(
            &format!("node-{} to see {n} nodes / {voters} voters", i + 1),
            deadline(Duration::from_secs(40)),
            || {
                let s = self.status(i)?;
                let nodes = s["nodes"].as_array()?;
                let v = nodes.iter().filter(|x| x["raft_role"] == "voter").count();
                let c = s["coordinator"].as_str()?.to_string();
                (nodes.len() == n && v == voters && Some(c.as_str()) != not).then_some(c)
            },
        )
    }

    fn index_of(&self, name: &str) -> usize {
        name.trim_start_matches("node-").parse::<usize>().unwrap() - 1
    }
}

/// Three agents form a cluster with three voters and agree on the coordinator; SIGKILL of the
/// coordinator elects another; the killed agent, restarted, rejoins from its data dir.
#[test]
fn three_agents_form_a_cluster_and_survive_losing_the_coordinator() {
    let _g = serial();
    let mut c = Cluster::start(3);
    let leader = c.wait_formed(0, 3, 3, None);
    for i in 0..3 {
        assert_eq!(
            c.wait_formed(i, 3, 3, None),
            leader,
            "all agree on the coordinator"
        );
    }
    let s = c.status(1).unwrap();
    for n in s["nodes"].as_array().unwrap() {
        assert_eq!(n["health"], "ready");
        assert_eq!(n["admin_state"], "active");
        assert!(n["address"].as_str().unwrap().starts_with("127.0.0."));
    }

    let li = c.index_of(&leader);
    c.kill(li);
    let survivor = (li + 1) % 3;
    let new_leader = wait_for(
        "a new coordinator",
        deadline(Duration::from_secs(30)),
        || {
            let s = c.status(survivor)?;
            let l = s["coordinator"].as_str()?.to_string();
            (l != leader).then_some(l)
        },
    );
    assert_ne!(new_leader, leader);

    // The killed agent comes back from its data dir (no --bootstrap needed, and it would be
    // ignored) and sees the same cluster.
    c.start_node(li, li == 0);
    let seen = c.wait_formed(li, 3, 3, None);
    assert!(!seen.is_empty());
    let log = c.agents[li].as_ref().unwrap().log_text();
    assert!(
        !log.contains("bootstrapping a new cluster") || li == 0,
        "{log}"
    );
}

/// SIGKILL of every voter, then a restart: every acknowledged registration is still there.
#[test]
fn killing_every_voter_loses_nothing_acknowledged() {
    let _g = serial();
    let mut c = Cluster::start(3);
    c.wait_formed(0, 3, 3, None);
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start_node(i, false);
    }
    let leader = c.wait_formed(2, 3, 3, None);
    assert!(leader.starts_with("node-"));
    let s = c.status(0).unwrap();
    let names: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node-1", "node-2", "node-3"]);
}

/// An agent with an empty data dir and no seeds does not found a cluster of its own; a host
/// whose certificate comes from another CA cannot join.
#[test]
fn no_accidental_clusters_and_no_foreign_joins() {
    let _g = serial();
    let c = Cluster::start(1);
    c.wait_formed(0, 1, 1, None);

    // A lone agent: answers, but belongs to nothing.
    let lone_pki = TestPki::new();
    let lone_addr = format!("127.0.0.5:{}", free_udp_port("127.0.0.5"));
    let lone_cfg = lone_pki.cluster_node("node-5", &lone_addr, &[]);
    let lone = Agent::start(&lone_cfg, &[], &[]);
    let s = wait_for(
        "the lone agent to answer",
        deadline(Duration::from_secs(20)),
        || status(&lone_cfg, None),
    );
    assert_eq!(s["in_cluster"], false);
    assert!(s["coordinator"].is_null());
    assert!(lone.log_text().contains("belongs to no cluster"));

    // A host from another CA, seeded at node-1: refused at the TLS handshake, never a member.
    let foreign = TestPki::new();
    let f_addr = format!("127.0.0.6:{}", free_udp_port("127.0.0.6"));
    let f_cfg = foreign.cluster_node("node-6", &f_addr, &[format!("node-1@{}", c.addrs[0])]);
    let f = Agent::start(&f_cfg, &[], &[]);
    wait_for(
        "the foreign join attempt to be refused",
        deadline(Duration::from_secs(20)),
        || {
            f.log_text()
                .contains("cannot join through this seed")
                .then_some(())
        },
    );
    let s = c.status(0).unwrap();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 1, "{s}");
    assert!(
        c.agents[0]
            .as_ref()
            .unwrap()
            .log_text()
            .contains("refused incoming connection")
    );
    drop(c.pki);
}

/// Four agents, three voters: killing a voter's host gets it recorded suspect then down, and a
/// ready learner takes its place; started again, it is ready (as a learner).
#[test]
fn a_dead_voter_is_marked_down_and_replaced() {
    let _g = serial();
    let mut c = Cluster::start(4);
    let leader = wait_for(
        "3 voters and a learner",
        deadline(Duration::from_secs(40)),
        || {
            let s = c.status(0)?;
            let nodes = s["nodes"].as_array()?;
            let voters = nodes.iter().filter(|n| n["raft_role"] == "voter").count();
            let learners = nodes.iter().filter(|n| n["raft_role"] == "learner").count();
            (nodes.len() == 4 && voters == 3 && learners == 1)
                .then(|| s["coordinator"].as_str().map(str::to_string))?
        },
    );
    let s = c.status(0).unwrap();
    let victim = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["raft_role"] == "voter" && n["name"] != leader.as_str())
        .map(|n| n["name"].as_str().unwrap().to_string())
        .unwrap();
    let vi = c.index_of(&victim);
    c.kill(vi);
    let observer = c.index_of(&leader);
    wait_for(
        "the dead voter to be down and replaced",
        deadline(Duration::from_secs(40)),
        || {
            let s = c.status(observer)?;
            let nodes = s["nodes"].as_array()?;
            let dead = nodes.iter().find(|n| n["name"] == victim.as_str())?;
            let voters: Vec<&str> = nodes
                .iter()
                .filter(|n| n["raft_role"] == "voter")
                .filter_map(|n| n["name"].as_str())
                .collect();
            (dead["health"] == "down" && dead["raft_role"] == "learner" && voters.len() == 3)
                .then_some(())
        },
    );
    c.start_node(vi, false);
    wait_for(
        "the restarted node to be ready again",
        deadline(Duration::from_secs(40)),
        || {
            let s = c.status(observer)?;
            let n = s["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["name"] == victim.as_str())?
                .clone();
            (n["health"] == "ready").then_some(())
        },
    );
}

/// A follower paused with SIGSTOP for longer than the election timeout and then resumed costs
/// at most one election. openraft 0.9 has no PreVote: the resumed node campaigns at once with a
/// higher term, which the others refuse (their leader lease is fresh), but the leader, seeing
/// that term, steps down and is elected again: one failed campaign and one election, so the term
/// rises by at most two and at most one leader is established.
#[test]
fn a_paused_follower_coming_back_costs_at_most_one_election() {
    let _g = serial();
    let c = Cluster::start(3);
    let leader = c.wait_formed(0, 3, 3, None);
    let li = c.index_of(&leader);
    let fi = (li + 1) % 3;
    let term_before = c.status(li).unwrap()["term"].as_u64().unwrap();
    let leaders_established = |c: &Cluster| -> usize {
        c.agents
            .iter()
            .flatten()
            .map(|a| a.log_text().matches("become leader").count())
            .sum()
    };
    let established_before = leaders_established(&c);
    let follower = c.agents[fi].as_ref().unwrap();
    follower.signal("STOP");
    // Longer than the test election timeout (1-2 s): on resuming, it has timed out.
    let resume_at = std::time::Instant::now() + Duration::from_secs(4);
    let other = 3 - li - fi;
    wait_for(
        "the pause to last past the election timeout",
        deadline(Duration::from_secs(10)),
        || {
            // The cluster keeps its coordinator while the follower is paused.
            let s = c.status(other)?;
            assert!(s["coordinator"].is_string());
            (std::time::Instant::now() >= resume_at).then_some(())
        },
    );
    follower.signal("CONT");
    // Let it come back and settle: every agent agrees on one coordinator again.
    let after = wait_for(
        "agreement after the resume",
        deadline(Duration::from_secs(30)),
        || {
            let terms: Vec<(String, u64)> = (0..3)
                .map(|i| {
                    let s = c.status(i)?;
                    Some((s["coordinator"].as_str()?.to_string(), s["term"].as_u64()?))
                })
                .collect::<Option<_>>()?;
            terms.windows(2).all(|w| w[0] == w[1]).then(|| terms[0].1)
        },
    );
    let established = leaders_established(&c) - established_before;
    assert!(
        established <= 1,
        "{established} leaders were established after the pause"
    );
    assert!(
        after <= term_before + 2,
        "term went from {term_before} to {after}: more than one campaign and one election"
    );
}

/// Five agents with `cluster.voters = 5` form a cluster of five voters, and survive losing the
/// coordinator.
#[test]
fn five_voters_form_and_fail_over() {
    let _g = serial();
    let mut c = Cluster::start_with_voters(5, 5);
    let leader = c.wait_formed(0, 5, 5, None);
    for i in 1..5 {
        assert_eq!(c.wait_formed(i, 5, 5, None), leader);
    }
    let li = c.index_of(&leader);
    c.kill(li);
    let other = (li + 1) % 5;
    let new = wait_for(
        "a new coordinator among five",
        deadline(Duration::from_secs(30)),
        || {
            let l = c.status(other)?["coordinator"].as_str()?.to_string();
            (l != leader).then_some(l)
        },
    );
    assert_ne!(new, leader);
}

/// Twenty agents on one machine form a cluster of 5 voters and 15 learners.
#[test]
fn twenty_agents_five_voters_fifteen_learners() {
    let _g = serial();
    let c = Cluster::start_with_voters(20, 5);
    wait_for(
        "20 nodes: 5 voters, 15 learners",
        deadline(Duration::from_secs(90)),
        || {
            let s = c.status(0)?;
            let nodes = s["nodes"].as_array()?;
            let voters = nodes.iter().filter(|n| n["raft_role"] == "voter").count();
            let learners = nodes.iter().filter(|n| n["raft_role"] == "learner").count();
            let ready = nodes.iter().filter(|n| n["health"] == "ready").count();
            (nodes.len() == 20 && voters == 5 && learners == 15 && ready == 20).then_some(())
        },
    );
    // A learner sees the same cluster.
    let s = c.status(19).unwrap();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 20);
    assert_eq!(s["raft_state"], "learner");
}
