//! Joining with a join token, CA key custody and certificate renewal, with real agent
//! processes on loopback (node-k on 127.0.0.k). Each test founds its own cluster: node-1
//! bootstraps with the CA key; the other hosts start with no certificate at all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pd_tests::*;
use pd_transport::pki::{self, CertAuthority, Validity};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A founded one-node cluster plus what other hosts need to reach it.
struct Founded {
    pki: TestPki,
    seed: String,
    seed_cfg: PathBuf,
    agents: Vec<Agent>,
}

const LIVENESS: &str = "heartbeat_ms = 100\nsuspect_after_ms = 1000\ndown_after_ms = 3000\n";

fn found(voters: u32) -> Founded {
    let pki = TestPki::new();
    let addr = format!("127.0.0.1:{}", free_udp_port("127.0.0.1"));
    let seed = format!("node-1@{addr}");
    let cfg = pki.cluster_node("node-1", &addr, std::slice::from_ref(&seed));
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[cluster]\n", &format!("[cluster]\nvoters = {voters}\n")),
    )
    .unwrap();
    let key = pki.ca_dir().join(pki::CA_KEY_FILE);
    let a = Agent::start(
        &cfg,
        &["--bootstrap", "--ca-key", key.to_str().unwrap()],
        &[],
    );
    let f = Founded {
        pki,
        seed,
        seed_cfg: cfg,
        agents: vec![a],
    };
    f.wait_nodes(1, 1);
    f
}

impl Founded {
    fn ca(&self) -> CertAuthority {
        CertAuthority::load(&self.pki.ca_dir()).unwrap()
    }

    /// A host with no credentials: a config with the seed and `token`, nothing in pki/.
    fn bare_host(&self, k: u32, token: &str, voters: u32) -> PathBuf {
        let name = format!("node-{k}");
        let ip = format!("127.0.0.{k}");
        let listen = format!("{ip}:{}", free_udp_port(&ip));
        let data = self.pki.root.path().join(&name);
        let cfg = self.pki.root.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"{listen}\"\nworker_threads = 1\n\
                 [admin]\nlisten = \"{ip}:0\"\n[serving]\nlisten = \"{ip}:0\"\n\
                 [cluster]\nvoters = {voters}\nseeds = [\"{}\"]\njoin_token = \"{token}\"\n{LIVENESS}{TEST_RAFT}",
                data.display(),
                self.seed
            ),
        )
        .unwrap();
        cfg
    }

    /// Waits until the seed sees `n` ready nodes, `voters` of them voters.
    fn wait_nodes(&self, n: usize, voters: usize) -> serde_json::Value {
        wait_for(
            &format!("{n} ready nodes, {voters} voters"),
            deadline(Duration::from_secs(60)),
            || {
                let s = status(&self.seed_cfg, None)?;
                let nodes = s["nodes"].as_array()?;
                let ready = nodes.iter().filter(|x| x["health"] == "ready").count();
                let v = nodes.iter().filter(|x| x["raft_role"] == "voter").count();
                (nodes.len() == n && ready == n && v == voters && s["coordinator"].is_string())
                    .then_some(s)
            },
        )
    }
}

fn data_dir(cfg: &Path) -> PathBuf {
    cfg.with_extension("")
}

/// Hosts with nothing but a seed and a join token get certificates for keys they made
/// themselves, join, and are promoted; voters take custody of the CA key (mode 0600) and a
/// learner never holds it. The same token serves several hosts until it expires, but never to
/// take the name of a node that is in the cluster.
#[test]
fn hosts_join_with_a_token_and_voters_take_custody_of_the_ca_key() {
    let _g = serial();
    let mut f = found(3);
    let token = f.ca().join_token(now(), 600);
    let hosts: Vec<PathBuf> = (2..=4).map(|k| f.bare_host(k, &token, 3)).collect();
    for h in &hosts {
        f.agents.push(Agent::start(h, &[], &[]));
    }
    // A join token is not a vote: the hosts join as learners, and the status says why the
    // cluster has fewer voters than it wants.
    f.wait_nodes(4, 1);
    let cfg = socket_config(&data_dir(&f.seed_cfg));
    let out = pdctl(&["--config", cfg.to_str().unwrap(), "status", "-o", "json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let why = s["voters_short"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("pdagent/voter=eligible"), "{s}");
    for h in &hosts {
        assert!(!data_dir(h).join("ca.key").exists());
    }
    // An admin makes two of them eligible (through the coordinator's local socket).
    make_eligible(
        &data_dir(&f.seed_cfg),
        &["node-2".to_string(), "node-3".to_string()],
    );
    f.wait_nodes(4, 3);
    for h in &hosts {
        let d = data_dir(h);
        assert_eq!(mode(&d.join("pki/node.key")), 0o600);
        assert_eq!(
            std::fs::read_to_string(d.join("pki/ca.crt")).unwrap(),
            f.ca().cert_pem
        );
        // The host's own credentials work: it can ask its agent for the cluster.
        let s = status(h, None).expect("status with the enrolled certificate");
        assert_eq!(s["in_cluster"], true, "{s}");
    }
    // Voters hold the CA key, learners do not.
    let s = status(&f.seed_cfg, None).unwrap();
    let role = |name: &str| -> String {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()["raft_role"]
            .as_str()
            .unwrap()
            .to_string()
    };
    wait_for(
        "voters to hold the CA key",
        deadline(Duration::from_secs(30)),
        || {
            hosts
                .iter()
                .enumerate()
                .all(|(i, h)| {
                    let key = data_dir(h).join("ca.key");
                    (role(&format!("node-{}", i + 2)) == "voter") == key.exists()
                })
                .then_some(())
        },
    );
    for (i, h) in hosts.iter().enumerate() {
        let key = data_dir(h).join("ca.key");
        if role(&format!("node-{}", i + 2)) == "voter" {
            assert_eq!(mode(&key), 0o600);
            assert_eq!(
                std::fs::read_to_string(&key).unwrap(),
                f.ca().key_pem(),
                "the voter holds the cluster's CA key"
            );
        }
    }

    // A fifth host asks for node-2's name with the same (valid) token: refused, exit 64.
    let impostor = f.bare_host(5, &token, 3);
    let text = std::fs::read_to_string(&impostor)
        .unwrap()
        .replace("name = \"node-5\"", "name = \"node-2\"");
    std::fs::write(&impostor, text).unwrap();
    let mut a = Agent::start(&impostor, &[], &[]);
    assert_eq!(a.wait_exit(deadline(Duration::from_secs(30))), Some(64));
    assert!(
        a.log_text().contains("already in the cluster"),
        "{}",
        a.log_text()
    );
    assert!(!data_dir(&impostor).join("pki/node.crt").exists());
    f.wait_nodes(4, 3);
}

/// An expired token, a token of another cluster and a forged one are refused: the agent exits
/// with status 64 and the reason, writes no credentials, and the cluster goes on.
#[test]
fn expired_foreign_or_forged_tokens_cannot_join() {
    let _g = serial();
    let f = found(1);
    let ca = f.ca();
    let expired = ca.join_token(now() - 3600, 60);
    let foreign = CertAuthority::generate("elsewhere")
        .unwrap()
        .join_token(now(), 600);
    let mut forged: Vec<String> = ca
        .join_token(now(), 600)
        .split('.')
        .map(str::to_string)
        .collect();
    forged[3] = "f".repeat(32);
    let forged = forged.join(".");
    for (k, token, why) in [
        (2, expired, "expired"),
        (3, foreign, "pins"),
        (4, forged, "not issued by this cluster's CA"),
    ] {
        let cfg = f.bare_host(k, &token, 1);
        // Before its first start, a host with a token and no certificate has a valid config.
        let out = pdagent(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("enrolls with cluster.join_token"));
        let mut a = Agent::start(&cfg, &[], &[]);
        assert_eq!(
            a.wait_exit(deadline(Duration::from_secs(30))),
            Some(64),
            "{}",
            a.log_text()
        );
        assert!(a.log_text().contains(why), "{why}: {}", a.log_text());
        assert!(!data_dir(&cfg).join("pki/node.key").exists());
    }
    // A malformed token is a configuration error before anything is tried.
    let cfg = f.bare_host(5, "pdj1.nonsense", 1);
    let out = pdagent(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("cluster.join_token"),
        "{}",
        text(&out.stderr)
    );
    f.wait_nodes(1, 1);
}

/// A node whose certificate nears its end gets a new one from the coordinator for a new key
/// pair, writes it, and goes on serving with it without a restart.
#[test]
fn certificates_renew_themselves_before_expiry() {
    let _g = serial();
    let f = found(1);
    // node-2 with an offline certificate that has 3 minutes left: renewal is due at once.
    let ip = "127.0.0.2";
    let listen = format!("{ip}:{}", free_udp_port(ip));
    let cfg = f
        .pki
        .cluster_node("node-2", &listen, std::slice::from_ref(&f.seed));
    let pki_dir = data_dir(&cfg).join("pki");
    let short = f
        .ca()
        .issue_node("node-2", Validity::seconds_from_now(180))
        .unwrap();
    std::fs::write(pki_dir.join("node.crt"), &short.cert_pem).unwrap();
    std::fs::write(pki_dir.join("node.key"), &short.key_pem).unwrap();
    let old = pki::cert_info(&pki::first_cert_der(&short.cert_pem).unwrap()).unwrap();
    let mut f = f;
    f.agents.push(Agent::start(&cfg, &[], &[]));
    let renewed = wait_for(
        "node-2 to renew its certificate",
        deadline(Duration::from_secs(60)),
        || {
            let pem = std::fs::read_to_string(pki_dir.join("node.crt")).ok()?;
            let info = pki::cert_info(&pki::first_cert_der(&pem).ok()?).ok()?;
            (info.serial_hex != old.serial_hex).then_some(info)
        },
    );
    assert!(renewed.not_after_unix > now() as i64 + 300 * 86_400);
    assert_eq!(mode(&pki_dir.join("node.key")), 0o600);
    assert_ne!(
        std::fs::read_to_string(pki_dir.join("node.key")).unwrap(),
        short.key_pem,
        "a renewal makes a new key pair"
    );
    // The agent logs the renewal just after it replaced the files.
    wait_for(
        "the renewal in node-2's log",
        deadline(Duration::from_secs(10)),
        || {
            f.agents[1]
                .log_text()
                .contains("renewed this node's certificate")
                .then_some(())
        },
    );
    // The renewed files are what `pdagent status` on that host now uses, and the cluster sees
    // node-2 as ready.
    f.wait_nodes(2, 1);
    assert_eq!(status(&cfg, None).unwrap()["in_cluster"], true);
}
