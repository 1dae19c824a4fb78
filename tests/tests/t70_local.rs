//! What a user tries first, through the real `pdctl`: `pdctl local up` brings up a cluster of
//! real agents with fixture GPUs, `pdctl status -o json` shows it, writes go through the
//! admin API (and are refused without the admin credential), the coordinator can be killed
//! and started again, and `pdctl local down` stops everything.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pd_tests::*;

type Local = LocalCluster;

/// `pdctl local up --nodes 3` then `status -o json`: three ready voters with their GPUs; the
/// JSON has the documented fields; `--config` works after the subcommand too.
#[test]
fn local_up_status_and_writes() {
    let _g = serial();
    let l = Local::up(3, free_base(3));
    let v = l.status().expect("status");
    assert!(v["coordinator"].is_string());
    assert!(v["term"].as_u64().unwrap() >= 1);
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["name"], format!("node-{}", i + 1));
        assert!(
            n["address"]
                .as_str()
                .unwrap()
                .starts_with(&format!("127.0.0.{}:", i + 1))
        );
        assert_eq!(n["raft_role"], "voter");
        assert_eq!(n["health"], "ready");
        assert_eq!(n["admin_state"], "active");
        assert_eq!(n["gpus"].as_array().unwrap().len(), 2);
        assert!(n["labels"].is_object());
    }
    // --config after the subcommand, and --json.
    let out = pdctl(&["nodes", "--json", "--config", l.config().to_str().unwrap()]);
    assert!(out.status.success());
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 3);

    // Liveness reports carry GPU telemetry to the coordinator (outside the log): every node's
    // fixture readings (35 C) are in the status and in `pdctl gpus`, fresh.
    wait_for(
        "every node's telemetry at the coordinator",
        deadline(Duration::from_secs(20)),
        || {
            let out = pdctl(&[
                "gpus",
                "-o",
                "json",
                "--config",
                l.config().to_str().unwrap(),
            ]);
            let g: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (1..=3)
                .all(|k| {
                    let list = g[format!("node-{k}")].as_array();
                    list.is_some_and(|l| {
                        l.len() == 2
                            && l.iter().all(|x| {
                                x["temperature_c"] == 35
                                    && x["telemetry_age_ms"].as_u64().is_some_and(|a| a < 5000)
                            })
                    })
                })
                .then_some(())
        },
    );

    // Writes reach the coordinator (an agent that is not names it, and pdctl goes there).
    assert!(l.pdctl(&["label", "node-2", "rack=r7"]).status.success());
    assert!(l.pdctl(&["cordon", "node-3"]).status.success());
    assert!(l.pdctl(&["drain", "node-1"]).status.success());
    let v = l.status().unwrap();
    assert_eq!(v["nodes"][1]["labels"]["rack"], "r7");
    assert_eq!(v["nodes"][2]["admin_state"], "cordoned");
    assert_eq!(v["nodes"][0]["admin_state"], "draining");
    assert!(l.pdctl(&["uncordon", "node-3"]).status.success());
    assert!(l.pdctl(&["label", "node-2", "rack-"]).status.success());
    let v = l.status().unwrap();
    assert_eq!(v["nodes"][2]["admin_state"], "active");
    assert!(v["nodes"][1]["labels"].get("rack").is_none(), "{v}");
    // Errors are clear and change nothing.
    let out = l.pdctl(&["label", "node-9", "a=b"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown node"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&["label", "node-2", "bad key=x"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid label"),
        "{}",
        text(&out.stderr)
    );
}

async fn https_get(
    addr: &str,
    server: &str,
    client: Option<&Path>,
    ca: &Path,
) -> Result<String, String> {
    let ca_der = pd_transport::pki::first_cert_der(&std::fs::read_to_string(ca).unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der))
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(pd_transport::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some(dir) => {
            let id = pd_transport::Identity::load(
                &dir.join("ca.crt"),
                &dir.join("node.crt"),
                &dir.join("node.key"),
            )
            .unwrap();
            let mut c = id.client_config().unwrap();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            c
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from(server.to_string()).unwrap();
    let mut tls = conn.connect(name, tcp).await.map_err(|e| e.to_string())?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = "PUT /v1/nodes/node-1/labels/x HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 13\r\nconnection: close\r\n\r\n{\"value\":\"y\"}";
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Without a client certificate the admin API refuses at the handshake; with a node's (not the
/// admin's) certificate it answers 403; nothing is written either way.
#[test]
fn admin_api_refuses_unauthenticated_writes() {
    let _g = serial();
    let base = free_base(1);
    let l = Local::up(1, base);
    let addr = format!("127.0.0.1:{}", base + 1);
    let ca = l.dir.path().join("ca/ca.crt");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(https_get(&addr, "node-1", None, &ca)) {
        Err(_) => {}
        Ok(resp) => assert!(
            !resp.contains("200 OK"),
            "served without a certificate: {resp}"
        ),
    }
    let node_pki = l.dir.path().join("node-1/data/pki");
    let resp = rt
        .block_on(https_get(&addr, "node-1", Some(&node_pki), &ca))
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("admin credential"), "{resp}");
    let v = l.status().unwrap();
    assert!(
        v["nodes"][0]["labels"].get("x").is_none(),
        "the refused write changed the labels: {v}"
    );
}

/// Killing the coordinator's host elects another; `local start` brings it back into the same
/// cluster; `local down` stops every agent; a taken port is a clear error.
#[test]
fn local_kill_start_down() {
    let _g = serial();
    let base = free_base(3);
    let l = Local::up(3, base);
    let leader = l.status().unwrap()["coordinator"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = l.dir.path().to_str().unwrap().to_string();
    assert!(
        pdctl(&["local", "kill", "--dir", &dir, &leader])
            .status
            .success()
    );
    let new = wait_for(
        "a new coordinator",
        deadline(Duration::from_secs(30)),
        || {
            let c = l.status()?["coordinator"].as_str()?.to_string();
            (c != leader).then_some(c)
        },
    );
    assert_ne!(new, leader);
    assert!(
        pdctl(&["local", "start", "--dir", &dir, &leader])
            .status
            .success()
    );
    wait_for(
        "the restarted node to be a voter again",
        deadline(Duration::from_secs(30)),
        || {
            let v = l.status()?;
            let n = v["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["name"] == leader.as_str())?
                .clone();
            (n["raft_role"] == "voter" && v["nodes"].as_array()?.len() == 3).then_some(())
        },
    );
    // Another cluster on the same ports is refused up front.
    let other = tempfile::tempdir().unwrap();
    let out = pdctl(&[
        "local",
        "up",
        "--nodes",
        "1",
        "--dir",
        other.path().to_str().unwrap(),
        "--base-port",
        &base.to_string(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("taken"), "{}", text(&out.stderr));

    let out = pdctl(&["local", "down", "--dir", &dir]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).matches("stopped").count(),
        3,
        "{}",
        text(&out.stdout)
    );
    for k in 1..=3 {
        let ip = format!("127.0.0.{k}");
        wait_for("ports released", deadline(Duration::from_secs(10)), || {
            std::net::UdpSocket::bind((ip.as_str(), base))
                .ok()
                .map(|_| ())
        });
    }
}

/// `pdctl bench failover --json` runs on its own cluster (free ports, temp dir) and prints one
/// JSON object with the documented keys.
#[test]
fn bench_failover_json() {
    let _g = serial();
    let out = pdctl(&["bench", "failover", "--rounds", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["rounds"], 2);
    assert_eq!(v["samples_ms"].as_array().unwrap().len(), 2);
    let p50 = v["failover_ms_p50"].as_f64().unwrap();
    let max = v["failover_ms_max"].as_f64().unwrap();
    assert!(p50 > 0.0 && max >= p50, "{v}");
}

/// `pdctl remove` takes a node out of Raft and the cluster state; from then on its agent is
/// refused by the others, even with its still-valid certificate.
#[test]
fn a_removed_node_cannot_come_back() {
    let _g = serial();
    let base = free_base(3);
    let l = Local::up(3, base);
    let v = l.status().unwrap();
    let leader = v["coordinator"].as_str().unwrap().to_string();
    let victim = (1..=3)
        .map(|k| format!("node-{k}"))
        .find(|n| *n != leader)
        .unwrap();
    let out = l.pdctl(&["remove", &victim]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = l.status().unwrap();
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert!(!names.contains(&victim.as_str()), "{names:?}");
    // The removed agent, with its own certificate, asks the coordinator for status: refused.
    let k: usize = leader.trim_start_matches("node-").parse().unwrap();
    let cfg = l.dir.path().join(&victim).join("pdagent.toml");
    let target = format!("{leader}@127.0.0.{k}:{base}");
    let out = pdagent(&[
        "status",
        "--config",
        cfg.to_str().unwrap(),
        "--agent",
        &target,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("was removed"),
        "{}",
        text(&out.stderr)
    );
    // Its certificate is revoked (the list is replicated): refused at the handshake, before
    // any request is read.
    wait_for(
        "the removed node's certificate to be refused as revoked",
        deadline(Duration::from_secs(20)),
        || {
            let out = pdagent(&[
                "status",
                "--config",
                cfg.to_str().unwrap(),
                "--agent",
                &target,
            ]);
            (!out.status.success() && text(&out.stderr).contains("revoked")).then_some(())
        },
    );
    // Removing the coordinator itself is refused with advice.
    let out = l.pdctl(&["remove", &leader]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("coordinator"),
        "{}",
        text(&out.stderr)
    );
}

fn placements(l: &Local) -> Vec<(String, String, Vec<u64>, u64)> {
    let out = l.pdctl(&["deployments", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["engines"].as_array().unwrap().clone())
        .map(|e| {
            (
                e["engine"].as_str().unwrap().to_string(),
                e["node"].as_str().unwrap().to_string(),
                e["gpus"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_u64().unwrap())
                    .collect(),
                e["generation"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Deployments are placed by the coordinator on distinct GPUs, pairs on one host; a deploy
/// that cannot fit is refused saying what is free; bad names are refused; the engines of a
/// node that loses power are placed elsewhere within seconds with a new generation, the others
/// keep theirs; scale and undeploy change the places.
#[test]
fn deployments_are_placed_and_replaced_when_a_node_dies() {
    let _g = serial();
    let base = free_base(3);
    let l = Local::up(3, base);
    let out = l.pdctl(&[
        "deploy",
        "tiny",
        "--model",
        "tiny",
        "--prefill",
        "2",
        "--decode",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let placed = wait_for(
        "four engines placed",
        deadline(Duration::from_secs(20)),
        || {
            let p = placements(&l);
            (p.len() == 4).then_some(p)
        },
    );
    let gpus: std::collections::BTreeSet<(String, u64)> = placed
        .iter()
        .flat_map(|(_, n, g, _)| g.iter().map(|x| (n.clone(), *x)))
        .collect();
    assert_eq!(gpus.len(), 4, "one GPU, one engine: {placed:?}");
    let node_of = |p: &[(String, String, Vec<u64>, u64)], e: &str| {
        p.iter().find(|x| x.0 == e).unwrap().1.clone()
    };
    assert_eq!(
        node_of(&placed, "tiny/prefill-0"),
        node_of(&placed, "tiny/decode-0")
    );

    let out = l.pdctl(&["deploy", "big", "--model", "tiny", "--colocated", "3"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Free GPUs"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&["deploy", "tiny", "--model", "tiny", "--colocated", "1"]);
    assert!(
        text(&out.stderr).contains("exists already"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&["deploy", "Bad_Name", "--model", "tiny", "--colocated", "1"]);
    assert!(
        text(&out.stderr).contains("invalid deployment"),
        "{}",
        text(&out.stderr)
    );

    // The host of prefill-0 loses power: its engines move, the others stay as they were.
    let victim = node_of(&placed, "tiny/prefill-0");
    let out = pdctl(&[
        "local",
        "kill",
        "--dir",
        l.dir.path().to_str().unwrap(),
        &victim,
    ]);
    assert!(out.status.success());
    let moved = wait_for(
        "engines placed off the dead node",
        deadline(Duration::from_secs(15)),
        || {
            let p = placements(&l);
            (p.len() == 4 && p.iter().all(|x| x.1 != victim)).then_some(p)
        },
    );
    for (engine, node, g, generation) in &placed {
        let now = moved.iter().find(|x| x.0 == *engine).unwrap();
        if *node == victim {
            assert!(now.3 > *generation, "{engine} moved with a new generation");
        } else {
            assert_eq!(
                (&now.1, &now.2, now.3),
                (node, g, *generation),
                "{engine} stayed"
            );
        }
    }
    let out = l.pdctl(&["scale", "tiny", "--prefill", "1", "--decode", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        "two engines after scaling",
        deadline(Duration::from_secs(15)),
        || (placements(&l).len() == 2).then_some(()),
    );
    let out = l.pdctl(&["undeploy", "tiny"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(placements(&l).is_empty());
}

fn engine_pid(l: &Local, engine: &str) -> Option<u64> {
    engines(l)
        .iter()
        .find(|e| e["engine"] == engine && e["state"] == "ready")
        .and_then(|e| e["pid"].as_u64())
}

/// Agents run the engines assigned to them: every engine becomes ready (hello and a one-token
/// probe) on its own GPUs; `kill -9` of an engine gets it restarted and ready; an agent killed
/// alone and started again re-adopts its engines (same pids); a node that loses power has its
/// engines started elsewhere; `local down` stops every engine.
#[test]
fn agents_start_restart_and_readopt_engines() {
    let _g = serial();
    let base = free_base(4);
    let l = Local::up(4, base);
    let out = l.pdctl(&[
        "deploy",
        "tiny",
        "--model",
        "tiny",
        "--prefill",
        "2",
        "--decode",
        "2",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("every engine is ready"),
        "{}",
        text(&out.stdout)
    );
    let ready = wait_for(
        "every engine ready",
        deadline(Duration::from_secs(60)),
        || {
            let e = engines(&l);
            (e.len() == 4 && e.iter().all(|x| x["state"] == "ready" && x["pid"].is_u64()))
                .then_some(e)
        },
    );
    let places: std::collections::BTreeSet<String> = ready
        .iter()
        .flat_map(|e| {
            let node = e["node"].as_str().unwrap().to_string();
            e["gpus"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |g| format!("{node}:{g}"))
        })
        .collect();
    assert_eq!(places.len(), 4, "distinct GPUs: {ready:?}");

    // kill -9 of one engine: restarted and ready again within 10 s.
    let victim = "tiny/decode-0";
    let pid = engine_pid(&l, victim).unwrap();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_for(
        "the killed engine back",
        deadline(Duration::from_secs(10)),
        || engine_pid(&l, victim).filter(|p| *p != pid),
    );

    // The agent alone dies and comes back: its engines keep their pids.
    let e = engines(&l);
    let host = e.iter().find(|x| x["engine"] == "tiny/prefill-1").unwrap()["node"]
        .as_str()
        .unwrap()
        .to_string();
    let before: Vec<(String, u64)> = e
        .iter()
        .filter(|x| x["node"] == host.as_str())
        .map(|x| {
            (
                x["engine"].as_str().unwrap().to_string(),
                x["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    let dir = l.dir.path().to_str().unwrap().to_string();
    assert!(
        pdctl(&["local", "kill", "--dir", &dir, "--agent-only", &host])
            .status
            .success()
    );
    assert!(
        pdctl(&["local", "start", "--dir", &dir, &host])
            .status
            .success()
    );
    let log = l.dir.path().join(&host).join("agent.log");
    wait_for(
        "the new agent to re-adopt its engines",
        deadline(Duration::from_secs(20)),
        || {
            let t = std::fs::read_to_string(&log).ok()?;
            (t.matches("re-adopted a running engine").count() >= before.len()).then_some(())
        },
    );
    for (engine, pid) in &before {
        let now = wait_for(
            "the re-adopted engine reported",
            deadline(Duration::from_secs(20)),
            || engine_pid(&l, engine),
        );
        assert_eq!(now, *pid, "{engine} kept its process");
    }

    // The whole host loses power: its engines run elsewhere within 15 s.
    assert!(
        pdctl(&["local", "kill", "--dir", &dir, &host])
            .status
            .success()
    );
    wait_for(
        "engines re-placed and ready off the dead host",
        deadline(Duration::from_secs(20)),
        || {
            let e = engines(&l);
            (e.len() == 4
                && e.iter()
                    .all(|x| x["node"] != host.as_str() && x["state"] == "ready"))
            .then_some(())
        },
    );
    for (_, pid) in &before {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
                let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                s.contains(") Z")
            },
            "engines of a host that lost power are gone"
        );
    }
    let pids: Vec<u64> = engines(&l)
        .iter()
        .filter_map(|x| x["pid"].as_u64())
        .collect();
    assert!(pdctl(&["local", "down", "--dir", &dir]).status.success());
    wait_for(
        "local down to stop every engine",
        deadline(Duration::from_secs(10)),
        || {
            pids.iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
                .then_some(())
        },
    );
}

/// `pdctl flip NODE --role prefill`: the decode engine on that node drains (a stream running
/// on it ends with all its tokens and `[DONE]`), then starts again as a prefill engine on the
/// same GPU; the deployment's counts follow; flipping the last decode engine is refused.
#[test]
fn flip_changes_a_nodes_engines_role_after_their_requests_finish() {
    use std::io::Read;
    let _g = serial();
    let l = LocalCluster::up_with(3, 1, free_base(3));
    deploy(
        &l,
        &["pd", "--model", "tiny", "--prefill", "1", "--decode", "2"],
    );
    let api = node_addr(&l, "node-1");
    wait_for("serving", deadline(Duration::from_secs(30)), || {
        let body =
            serde_json::json!({"model": "pd", "prompt": "Flip: warming up.", "max_tokens": 2});
        (post_json(&api, "/v1/completions", &body).status == 200).then_some(())
    });
    // A long stream (a prompt that runs to max_tokens on `tiny`), and the node of the decode
    // engine that streams it.
    let body = serde_json::json!({"model": "pd", "prompt": "November: a long answer that is still running when its deployment goes away.", "max_tokens": 1500, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let mut s = start_stream(&api, &body);
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1);
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let route = head
        .lines()
        .find_map(|x| x.strip_prefix("x-pdagent-route: "))
        .unwrap_or_else(|| panic!("{head}"))
        .trim()
        .to_string();
    let (engine, node) = route.rsplit(' ').next().unwrap().split_once('@').unwrap();
    assert!(engine.starts_with("pd/decode-"), "{route}");
    let before = engines(&l);
    let gpus = before.iter().find(|e| e["engine"] == engine).unwrap()["gpus"].clone();
    let out = l.pdctl(&["flip", node, "--role", "prefill"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("pd/prefill-1"),
        "{}",
        text(&out.stdout)
    );
    // The stream was not cut: its engine drained.
    let events = read_sse(&mut s);
    let (_, finish, usage) = stream_text(&events);
    assert_eq!(finish, "length");
    assert_eq!(usage.unwrap()["completion_tokens"], 1500);
    // Then the node runs a prefill engine on the same GPU.
    wait_for(
        "the flipped engine ready",
        deadline(Duration::from_secs(60)),
        || {
            let e = engines(&l);
            let on_node: Vec<&serde_json::Value> = e.iter().filter(|x| x["node"] == node).collect();
            (e.len() == 3
                && e.iter().all(|x| x["state"] == "ready")
                && on_node.len() == 1
                && on_node[0]["engine"] == "pd/prefill-1"
                && on_node[0]["gpus"] == gpus)
                .then_some(())
        },
    );
    let d = l.pdctl(&["deployments", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    let dep = v["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "pd")
        .unwrap()
        .clone();
    assert_eq!(dep["layout"]["disaggregated"]["prefill"], 2, "{dep}");
    assert_eq!(dep["layout"]["disaggregated"]["decode"], 1, "{dep}");
    // The cluster serves.
    wait_for(
        "served after the flip",
        deadline(Duration::from_secs(30)),
        || {
            let body =
                serde_json::json!({"model": "pd", "prompt": "Flip: after.", "max_tokens": 4});
            (post_json(&api, "/v1/completions", &body).status == 200).then_some(())
        },
    );
    // The last decode engine cannot flip; a node with nothing to flip says so.
    let last = engines(&l)
        .into_iter()
        .find(|e| e["role"] == "decode")
        .map(|e| e["node"].as_str().unwrap().to_string())
        .unwrap();
    let out = l.pdctl(&["flip", &last, "--role", "prefill"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("without a decode engine"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&["flip", node, "--role", "prefill"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no decode engine to flip"),
        "{}",
        text(&out.stderr)
    );
}

/// `pdctl deploy --layout planned`: the planner sizes the deployment on the free fixture GPUs
/// within `--max-gpus`, the engines run that layout, `pdctl deployments -o json` shows the
/// prediction beside the TTFT and TPOT that every agent's ingress measured (summed over the
/// cluster), and a deployment no layout fits is refused saying why.
#[test]
fn a_planned_deployment_shows_its_prediction_beside_what_is_measured() {
    let _g = serial();
    let base = free_base(3);
    let l = Local::up(3, base);
    let out = l.pdctl(&[
        "deploy",
        "tiny",
        "--model",
        "tiny",
        "--layout",
        "planned",
        "--ttft-ms",
        "500",
        "--tpot-ms",
        "20",
        "--isl",
        "512",
        "--osl",
        "128",
        "--max-gpus",
        "3",
        "--wait",
        "--wait-timeout-s",
        "120",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("planned"),
        "{}",
        text(&out.stdout)
    );
    let deployment = |l: &Local| {
        let out = l.pdctl(&["deployments", "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["deployments"][0].clone()
    };
    let d = deployment(&l);
    let plan = &d["plan"];
    assert_eq!(plan["layout"], d["layout"], "{d}");
    assert_eq!(plan["gpus"], "h100_sxm:3", "{d}");
    assert_eq!(
        (plan["isl"].as_u64(), plan["osl"].as_u64()),
        (Some(512), Some(128))
    );
    let engines = d["engines"].as_array().unwrap().len();
    let wanted = ["prefill", "decode"]
        .iter()
        .map(|r| d["layout"]["disaggregated"][r].as_u64().unwrap_or(0))
        .sum::<u64>()
        + d["layout"]["colocated"]["engines"].as_u64().unwrap_or(0);
    assert!((1..=3).contains(&wanted) && engines as u64 == wanted, "{d}");
    let p = &plan["predicted"];
    assert!(p["request_rate_per_s"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["ttft_ms_p90"].as_f64().unwrap() <= 500.0, "{p}");
    assert!(p["tpot_ms_p90"].as_f64().unwrap() <= 20.0, "{p}");
    assert!(p["slo_attainment"].as_f64().unwrap() >= 0.9, "{p}");
    assert_eq!(d["measured"]["requests"], 0, "{d}");

    // Requests through two agents' APIs: the measurement is the cluster's.
    for k in 0..4 {
        let addr = node_addr(&l, &format!("node-{}", 1 + k % 2));
        let body = serde_json::json!({
            "model": "tiny", "prompt": format!("planned {k}"), "max_tokens": 16, "temperature": 0,
        });
        let r = post_json(&addr, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = deployment(&l)["measured"].clone();
    assert_eq!(m["requests"], 4, "{m}");
    for k in ["ttft_ms_mean", "ttft_ms_p90", "tpot_ms_mean", "tpot_ms_p90"] {
        assert!(m[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {m}");
    }
    let out = l.pdctl(&["deployments"]);
    let table = text(&out.stdout);
    assert!(
        table.contains("(planned)") && table.contains("predicted") && table.contains("measured"),
        "{table}"
    );

    // The coordinator re-plans it every window (10 s in local clusters), in advise mode: the
    // window's requests and SLO attainment, the layout in force scored first, the best move
    // and why; nothing is carried out.
    let autoplan = |l: &Local| -> Option<serde_json::Value> {
        let out = l.pdctl(&["autoplan", "tiny", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["deployments"][0].clone())
    };
    let first = wait_for(
        "a first re-planning window",
        deadline(Duration::from_secs(60)),
        || autoplan(&l).filter(|r| r["window"].as_u64() >= Some(1)),
    );
    for k in 0..4 {
        let addr = node_addr(&l, &format!("node-{}", 1 + k % 2));
        let body = serde_json::json!({
            "model": "tiny", "prompt": format!("replanned {k}"), "max_tokens": 16, "temperature": 0,
        });
        assert_eq!(post_json(&addr, "/v1/completions", &body).status, 200);
    }
    let r = wait_for(
        "a window with the requests",
        deadline(Duration::from_secs(60)),
        || {
            autoplan(&l).filter(|r| {
                r["window"].as_u64() > first["window"].as_u64() && r["requests"].as_u64() >= Some(1)
            })
        },
    );
    assert_eq!(r["mode"], "advise", "{r}");
    assert_eq!(
        r["judged"], r["requests"],
        "every request judged against 500 ms / 20 ms: {r}"
    );
    assert_eq!(r["engines_reporting"], r["engines_total"], "{r}");
    assert!(!r["reason"].as_str().unwrap_or_default().is_empty(), "{r}");
    let layout = &d["layout"];
    if let Some(p) = layout["disaggregated"]["prefill"].as_u64() {
        let dd = layout["disaggregated"]["decode"].as_u64().unwrap();
        assert_eq!(r["layout"], format!("{p}P{dd}D"), "{r}");
        assert_eq!(r["candidates"][0]["action"], "keep", "{r}");
        assert!(r["candidates"][0]["attainment"].as_f64().is_some(), "{r}");
    } else {
        assert!(r["reason"].as_str().unwrap().contains("colocated"), "{r}");
    }
    let out = l.pdctl(&["autoplan", "tiny"]);
    assert!(
        text(&out.stdout).contains("DEPLOYMENT") && text(&out.stdout).contains("window:"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // Advise only: the layout is as planned.
    assert_eq!(deployment(&l)["layout"], d["layout"]);
    assert_eq!(deployment(&l)["autoplan"]["mode"], "advise");
    // Every decision is recorded in the replicated state.
    let out = l.pdctl(&["events", "tiny", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ev: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ev = ev["events"].as_array().unwrap().clone();
    assert!(!ev.is_empty(), "decisions recorded");
    assert!(
        ev.iter()
            .all(|e| e["deployment"] == "tiny" && e["mode"] == "advise" && e["moved"].is_null()),
        "{ev:?}"
    );
    let out = l.pdctl(&["autoplan", "tiny", "--explain"]);
    let explained = text(&out.stdout);
    assert!(
        out.status.success()
            && explained.contains("measured:")
            && explained.contains("made: nothing"),
        "{explained}{}",
        text(&out.stderr)
    );
    // Bounds that contradict each other are refused, naming the field; the mode changes.
    let out = l.pdctl(&[
        "autoplan",
        "tiny",
        "on",
        "--pd-ratio-min",
        "2",
        "--pd-ratio-max",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pd_ratio_min"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&["autoplan", "tiny", "on", "--autoplan-threshold", "-0.1"]);
    assert!(
        text(&out.stderr).contains("threshold"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&["autoplan", "tiny", "off"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(deployment(&l)["autoplan"]["mode"], "off");

    // No layout meets a 1 ms TPOT; an unknown model folder is named.
    let out = l.pdctl(&[
        "deploy",
        "fast",
        "--model",
        "tiny",
        "--layout",
        "planned",
        "--ttft-ms",
        "1",
        "--tpot-ms",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no layout of tiny"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&[
        "deploy",
        "other",
        "--model",
        "/no/such/model",
        "--layout",
        "planned",
        "--ttft-ms",
        "500",
        "--tpot-ms",
        "20",
    ]);
    assert!(
        text(&out.stderr).contains("/no/such/model/config.json"),
        "{}",
        text(&out.stderr)
    );
    let out = l.pdctl(&["undeploy", "tiny"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = l.pdctl(&["deployments", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deployments"], serde_json::json!([]));
}

/// A deployment whose model is a folder runs only where a matching copy is: every agent is
/// asked for its copy's checkpoint fingerprint (relative names are under each agent's
/// `node.models_dir`), engines are placed on the hosts that agree, a host with another copy or
/// none is named, and `--model-fingerprint` picks the copy to use.
#[test]
fn a_model_folder_is_checked_on_the_hosts_before_placement() {
    let _g = serial();
    let base = free_base(3);
    let l = Local::up(3, base);
    let models = |node: &str| l.dir.path().join(node).join("data/models/ck");
    for node in ["node-1", "node-2", "node-3"] {
        pd_engine::save_preset_checkpoint(pd_engine::Preset::Tiny, 1, &models(node)).unwrap();
    }
    // node-3's copy differs (its config has one more byte).
    let cfg = models("node-3").join("config.json");
    let json = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{json}\n")).unwrap();

    let out = l.pdctl(&[
        "deploy",
        "ck",
        "--model",
        "ck",
        "--colocated",
        "4",
        "--wait",
        "--wait-timeout-s",
        "120",
    ]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("on node-1, node-2"), "{said}");
    assert!(
        said.contains("not on node-3: its copy has fingerprint"),
        "{said}"
    );
    let nodes = engine_nodes(&l);
    assert_eq!(nodes.len(), 4);
    assert!(nodes.values().all(|n| n != "node-3"), "{nodes:?}");
    let r = post_json(
        &node_addr(&l, "node-3"),
        "/v1/completions",
        &serde_json::json!({"model": "ck", "prompt": "from a checkpoint", "max_tokens": 8}),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // The hosts with the model are full; node-3 is free but has no matching copy.
    let out = l.pdctl(&["deploy", "more", "--model", "ck", "--colocated", "1"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("node-3 (no copy of the model)"),
        "{}",
        text(&out.stderr)
    );
    // A folder no host has.
    let out = l.pdctl(&["deploy", "none", "--model", "nothing", "--colocated", "1"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no node has it") && err.contains("nothing/config.json"),
        "{err}"
    );
    // Asking for node-3's copy places the engine there.
    let v: serde_json::Value =
        serde_json::from_slice(&l.pdctl(&["deployments", "-o", "json"]).stdout).unwrap();
    let theirs = v["deployments"][0]["model_hosts"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let mine = pdagent::models::fingerprint(&models("node-3")).unwrap();
    assert_ne!(theirs, mine);
    let out = l.pdctl(&[
        "deploy",
        "ck3",
        "--model",
        "ck",
        "--model-fingerprint",
        &mine,
        "--colocated",
        "1",
        "--wait",
        "--wait-timeout-s",
        "120",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(engine_nodes(&l)["ck3/both-0"], "node-3");
}

/// Directives (direct commands outside the log) are fenced by the Raft term: the coordinator's
/// in the current term is carried out; one with an older term is refused naming the newer
/// term; one from a node that is not the term's coordinator is refused; once an agent has seen
/// a newer term in a directive, the older one is refused too. Sent with the nodes' own
/// certificates, over the real transport.
#[test]
fn a_directive_with_a_stale_term_is_refused() {
    use pdagent::wire::{AgentResponse, Directive};
    let _g = serial();
    let base = free_base(3);
    let l = Local::up(3, base);
    let config = |n: &str| l.dir.path().join(n).join("pdagent.toml");
    let s = wait_for("a coordinator", deadline(Duration::from_secs(20)), || {
        let s = status(&config("node-1"), None)?;
        s["coordinator"].is_string().then_some(s)
    });
    let coordinator = s["coordinator"].as_str().unwrap().to_string();
    let term = s["term"].as_u64().unwrap();
    let others: Vec<String> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| n.to_string())
        .filter(|n| *n != coordinator)
        .collect();
    let (target, bystander) = (&others[0], &others[1]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let send = |from: &str, term: u64| {
        let cfg = pdagent::config::read_config(&config(from), true)
            .unwrap()
            .validate()
            .unwrap();
        let id = cfg.load_identity(pdagent::util::now_unix()).unwrap();
        let k = target.trim_start_matches("node-");
        let addr = format!("127.0.0.{k}:{base}").parse().unwrap();
        rt.block_on(pdagent::agent::directive(
            &cfg,
            &id,
            target,
            addr,
            term,
            Directive::Reconcile { index: 0 },
        ))
        .unwrap()
    };
    assert!(
        matches!(send(&coordinator, term), AgentResponse::DirectiveDone),
        "the coordinator's directive in its term is carried out"
    );
    match send(&coordinator, term - 1) {
        AgentResponse::DirectiveRefused { seen_term, why } => {
            assert_eq!(seen_term, term);
            assert!(why.contains("stale term"), "{why}");
        }
        other => panic!("a stale term was not refused: {other:?}"),
    }
    match send(bystander, term) {
        AgentResponse::DirectiveRefused { why, .. } => {
            assert!(why.contains("not the coordinator"), "{why}")
        }
        other => panic!("a non-coordinator was obeyed: {other:?}"),
    }
    // A newer term, seen first in a directive, fences the current one.
    assert!(matches!(
        send(bystander, term + 1),
        AgentResponse::DirectiveDone
    ));
    assert!(matches!(
        send(&coordinator, term),
        AgentResponse::DirectiveRefused { seen_term, .. } if seen_term == term + 1
    ));
}

/// `--autoplan on`: a deployment planned for short prompts, serving 1 prefill and 2 decode
/// engines, gets long prompts. The coordinator fits the engines' step times from their own
/// counters, predicts that a second prefill engine serves more requests within the targets,
/// and flips one decode host to prefill (it drains first), recording the decision with the
/// move; with a long cool-down it moves no more. Every request is answered in full. The
/// forecast check is turned off here (`--autoplan-tolerance 1`): on a loaded 2-core machine
/// how many windows it takes to trust the forecasts varies; the check has pure tests.
#[test]
fn autoplan_on_flips_one_host_when_prompts_grow_long_and_loses_no_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _g = serial();
    let l = LocalCluster::up_with(3, 1, free_base(3));
    let out = l.pdctl(&[
        "deploy",
        "shift",
        "--model",
        "tiny",
        "--layout",
        "planned",
        "--isl",
        "64",
        "--osl",
        "64",
        "--max-gpus",
        "3",
        "--ttft-ms",
        "1500",
        "--tpot-ms",
        "50",
        "--autoplan",
        "on",
        "--autoplan-cooldown",
        "1000",
        "--autoplan-tolerance",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = l.pdctl(&["scale", "shift", "--prefill", "1", "--decode", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let roles = |l: &LocalCluster| -> Option<(usize, usize)> {
        let e: Vec<serde_json::Value> = engines(l)
            .into_iter()
            .filter(|e| e["deployment"] == "shift")
            .collect();
        e.iter().all(|x| x["state"] == "ready").then(|| {
            let n = |r: &str| e.iter().filter(|x| x["role"] == r).count();
            (n("prefill"), n("decode"))
        })
    };
    wait_for("1P2D ready", deadline(Duration::from_secs(120)), || {
        (roles(&l) == Some((1, 2))).then_some(())
    });
    // Requests of several lengths one at a time: the engines' steps take several shapes, so
    // that their step times can be fitted.
    let api = node_addr(&l, "node-1");
    wait_for("serving", deadline(Duration::from_secs(60)), || {
        let body = serde_json::json!({"model": "shift", "prompt": "warming up", "max_tokens": 2});
        (post_json(&api, "/v1/completions", &body).status == 200).then_some(())
    });
    for (i, bytes) in [40, 100, 200, 300, 450, 600, 800, 1000, 1300, 1600]
        .iter()
        .cycle()
        .take(30)
        .enumerate()
    {
        let prompt: String = format!("warm {i} ")
            .chars()
            .chain("a quick brown fox jumps over the lazy dog ".chars().cycle())
            .take(*bytes)
            .collect();
        let body = serde_json::json!({
            "model": "shift", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true,
        });
        assert_eq!(post_json(&api, "/v1/completions", &body).status, 200);
    }
    // Load: long prompts with short outputs (the new shape), and some short prompts with
    // longer outputs, through every agent; each answer is checked whole.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for (k, (prompt_bytes, max_tokens)) in
        [(1200, 4u32), (1200, 4), (48, 32)].into_iter().enumerate()
    {
        let (stop, addr) = (stop.clone(), node_addr(&l, &format!("node-{}", 1 + k % 3)));
        load.push(std::thread::spawn(move || {
            let mut answered = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let prompt: String = format!("shift {k} {i} ")
                    .chars()
                    .chain(
                        "the quick brown fox jumps over the lazy dog "
                            .chars()
                            .cycle(),
                    )
                    .take(prompt_bytes)
                    .collect();
                let body = serde_json::json!({
                    "model": "shift", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": true,
                });
                let r = post_json(&addr, "/v1/completions", &body);
                let tokens = serde_json::from_slice::<serde_json::Value>(&r.body)
                    .ok()
                    .and_then(|v| v["usage"]["completion_tokens"].as_u64());
                answered.push((r.status, tokens, max_tokens));
                i += 1;
            }
            answered
        }));
    }
    let events = |l: &LocalCluster| -> Vec<serde_json::Value> {
        let out = l.pdctl(&["events", "shift", "-o", "json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["events"].as_array().cloned())
            .unwrap_or_default()
    };
    let until = deadline(Duration::from_secs(300));
    let moved = loop {
        let all = events(&l);
        if let Some(m) = all.iter().find(|e| !e["moved"].is_null()) {
            break m.clone();
        }
        if std::time::Instant::now() > until {
            let why: Vec<String> = all
                .iter()
                .map(|e| {
                    format!(
                        "{} {} {} {}",
                        e["window"], e["best"], e["reason"], e["notes"]
                    )
                })
                .collect();
            panic!("no move by the re-planner: {why:#?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(moved["moved"]["flip"]["role"], "prefill", "{moved}");
    assert_eq!(moved["best"], "flip-decode-to-prefill", "{moved}");
    assert_eq!(moved["allowed"], true, "{moved}");
    assert!(
        moved["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap_or_default().contains("fitted from")),
        "the step times were fitted from the engines' counters: {moved}"
    );
    // The flipped host drains, then serves as a prefill engine; the load goes on meanwhile.
    wait_for("2P1D ready", deadline(Duration::from_secs(120)), || {
        (roles(&l) == Some((2, 1))).then_some(())
    });
    // Two more windows under load: the cool-down holds (one move).
    let after = moved["window"].as_u64().unwrap();
    wait_for(
        "two windows after the move",
        deadline(Duration::from_secs(120)),
        || {
            events(&l)
                .iter()
                .any(|e| e["window"].as_u64() >= Some(after + 2))
                .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    let answered: Vec<_> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(answered.len() >= 10, "{answered:?}");
    for (status, tokens, max_tokens) in &answered {
        assert_eq!(*status, 200, "{answered:?}");
        assert_eq!(*tokens, Some(u64::from(*max_tokens)), "{answered:?}");
    }
    let all = events(&l);
    assert_eq!(
        all.iter().filter(|e| !e["moved"].is_null()).count(),
        1,
        "one move: {all:?}"
    );
    let out = l.pdctl(&["deployments", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["deployments"][0]["layout"]["disaggregated"],
        serde_json::json!({"prefill": 2, "decode": 1})
    );
    let out = l.pdctl(&["autoplan", "shift", "--explain"]);
    assert!(
        text(&out.stdout).contains("layout in force: 2P1D"),
        "{}",
        text(&out.stdout)
    );
    let out = l.pdctl(&["events", "shift"]);
    assert!(
        text(&out.stdout).contains("to prefill"),
        "{}",
        text(&out.stdout)
    );

    // The coordinator killed during a flip: a flip is one command in the log, so the new
    // coordinator finds it whole; the host finishes it, and once the old coordinator is back
    // every engine runs once, in the role the log gives it.
    let coordinator = l.status().unwrap()["coordinator"]
        .as_str()
        .unwrap()
        .to_string();
    let host = engines(&l)
        .into_iter()
        .find(|e| {
            e["deployment"] == "shift"
                && e["role"] == "prefill"
                && e["node"] != coordinator.as_str()
        })
        .map(|e| e["node"].as_str().unwrap().to_string())
        .expect("a prefill host that is not the coordinator");
    let out = l.pdctl(&["flip", &host, "--role", "decode"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = l.dir.path().to_str().unwrap().to_string();
    assert!(
        pdctl(&["local", "kill", "--dir", &dir, &coordinator])
            .status
            .success()
    );
    wait_for(
        "a new coordinator",
        deadline(Duration::from_secs(60)),
        || {
            let c = l.status()?["coordinator"].as_str()?.to_string();
            (c != coordinator).then_some(())
        },
    );
    assert!(
        pdctl(&["local", "start", "--dir", &dir, &coordinator])
            .status
            .success()
    );
    wait_for(
        "1P2D ready after the kill",
        deadline(Duration::from_secs(180)),
        || {
            let e: Vec<serde_json::Value> = engines(&l)
                .into_iter()
                .filter(|e| e["deployment"] == "shift")
                .collect();
            let ids: std::collections::BTreeSet<String> =
                e.iter().map(|x| x["engine"].to_string()).collect();
            let places: std::collections::BTreeSet<String> = e
                .iter()
                .map(|x| format!("{}{}", x["node"], x["gpus"]))
                .collect();
            (e.len() == 3 && ids.len() == 3 && places.len() == 3 && roles(&l) == Some((1, 2)))
                .then_some(())
        },
    );
    let on_host: Vec<serde_json::Value> = engines(&l)
        .into_iter()
        .filter(|e| e["node"] == host.as_str())
        .collect();
    assert_eq!(on_host.len(), 1, "{on_host:?}");
    assert_eq!(on_host[0]["role"], "decode", "{on_host:?}");
    let body = serde_json::json!({"model": "shift", "prompt": "after the kill", "max_tokens": 4});
    wait_for(
        "served after the kill",
        deadline(Duration::from_secs(60)),
        || (post_json(&node_addr(&l, &host), "/v1/completions", &body).status == 200).then_some(()),
    );
}
