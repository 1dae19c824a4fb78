//! Failure semantics through a real local cluster (4 nodes, 1 prefill and 2 decode engines of
//! `tiny`, the client on the fourth node): `kill -9` of the decode engine mid-stream and
//! `pdctl local kill` of the decode engine's whole node mid-stream (the stream moves to the
//! other decode engine and equals the undisturbed one at temperature 0), a cut of the KV
//! stream mid-transfer through the UDP fault proxy (retried on the other decode engine before
//! the first byte), and a prefill engine that dies at the end of its prefill (retried). Every
//! request ends cleanly; the prefill engine holds no KV blocks afterwards.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use pd_tests::*;
use serde_json::{Value, json};

fn wait_all_ready(l: &LocalCluster, what: &str, secs: u64) -> Vec<Value> {
    wait_for(what, deadline(Duration::from_secs(secs)), || {
        let out = l.pdctl(&["engines", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let e = v["engines"].as_array()?.clone();
        (e.len() == 3 && e.iter().all(|x| x["state"] == "ready")).then_some(e)
    })
}

/// Waits until the cluster is steady: every live node ready, the 3 engines ready, and
/// requests served without retries (peers connected anew after a restart or a partition).
fn wait_steady(l: &LocalCluster, api: &str, what: &str) -> Vec<Value> {
    wait_for(what, deadline(Duration::from_secs(90)), || {
        let st = l.status()?;
        let nodes = st["nodes"].as_array()?;
        let live = nodes.iter().filter(|n| n["health"] != "down");
        if !live.clone().all(|n| n["health"] == "ready") {
            return None;
        }
        let out = l.pdctl(&["engines", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let e = v["engines"].as_array()?.clone();
        if !(e.len() == 3 && e.iter().all(|x| x["state"] == "ready")) {
            return None;
        }
        let b = recoveries(api, "retry");
        let ok = (0..4).all(|k| {
            complete(api, &format!("Steady {k}: is every engine serving?"), 2).status == 200
        });
        (ok && recoveries(api, "retry") == b && engines(l) == e).then_some(e)
    })
}

fn complete(addr: &str, prompt: &str, max_tokens: u32) -> HttpReply {
    post_json(
        addr,
        "/v1/completions",
        &json!({"model": "pd", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    )
}

fn text_of(r: &HttpReply) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

fn recoveries(addr: &str, kind: &str) -> u64 {
    metric(
        &metrics_of(addr),
        &format!("pdagent_request_recoveries_total{{model=\"pd\",kind=\"{kind}\"}}"),
    )
}

/// Streams `prompt`, calls `fault` with the engine and node streaming it once the first
/// token came, and returns the stream's events and how long it took after the fault.
fn stream_with_fault(
    addr: &str,
    prompt: &str,
    max_tokens: u32,
    fault: impl FnOnce(&str, &str),
) -> (Vec<String>, Duration) {
    let body = json!({"model": "pd", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let mut s = start_stream(addr, &body);
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (engine, node) = streaming_engine(&route_of(&head));
    fault(&engine, &node);
    let t = Instant::now();
    let events = read_sse(&mut s);
    (events, t.elapsed())
}

fn completion_tokens(events: &[String]) -> u64 {
    events
        .iter()
        .rev()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .and_then(|v| v["usage"]["completion_tokens"].as_u64())
        .expect("a usage chunk")
}

#[test]
fn every_request_ends_cleanly_when_engines_hosts_and_links_fail() {
    let _g = serial();
    let l = LocalCluster::up_with(4, 1, free_base(4));
    deploy(
        &l,
        &["pd", "--model", "tiny", "--prefill", "1", "--decode", "2"],
    );
    let placed = wait_all_ready(&l, "3 engines ready", 60);
    let used: Vec<String> = placed
        .iter()
        .map(|e| e["node"].as_str().unwrap().to_string())
        .collect();
    let client_node = ["node-1", "node-2", "node-3", "node-4"]
        .into_iter()
        .find(|n| !used.iter().any(|u| u == n))
        .unwrap();
    let api = node_addr(&l, client_node);
    wait_for("the API serving", deadline(Duration::from_secs(30)), || {
        (complete(&api, "Alfa: warming up.", 2).status == 200).then_some(())
    });

    // 1. kill -9 of the decode engine mid-stream: the stream moves to the other decode engine
    // (prompt and tokens so far replayed) and equals the undisturbed stream.
    let prompt = "Bravo: a long answer that is moved to another engine half way through.";
    let reference = text_of(&complete(&api, prompt, 1500));
    let before = recoveries(&api, "migration");
    let (events, after_kill) = stream_with_fault(&api, prompt, 1500, |engine, _| {
        let pid = pid_of(&engines(&l), engine);
        assert!(
            std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    });
    let (got, finish, _) = stream_text(&events);
    assert_eq!(finish, "length");
    assert_eq!(completion_tokens(&events), 1500);
    assert!(
        got == reference,
        "the migrated stream equals the undisturbed one"
    );
    assert_eq!(recoveries(&api, "migration"), before + 1, "one migration");
    assert!(after_kill < Duration::from_secs(20), "{after_kill:?}");
    wait_all_ready(&l, "the killed engine restarted", 30);

    // 2. The decode engine's whole host dies mid-stream (agent and engines, SIGKILL): the
    // stream moves within seconds; the host's engine is placed elsewhere.
    let prompt = "Charlie: a long answer whose host loses power while it streams.";
    let reference = text_of(&complete(&api, prompt, 1500));
    let before = recoveries(&api, "migration");
    let mut killed_node = String::new();
    let (events, after_kill) = stream_with_fault(&api, prompt, 1500, |_, node| {
        killed_node = node.to_string();
        let out = pdctl(&[
            "local",
            "kill",
            "--dir",
            l.dir.path().to_str().unwrap(),
            node,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    });
    let (got, _, _) = stream_text(&events);
    assert_eq!(completion_tokens(&events), 1500);
    assert!(
        got == reference,
        "the migrated stream equals the undisturbed one"
    );
    assert_eq!(recoveries(&api, "migration"), before + 1);
    assert!(
        after_kill < Duration::from_secs(15),
        "moved off the dead host in {after_kill:?}"
    );
    let replaced = wait_for(
        "the dead host's engine placed elsewhere",
        deadline(Duration::from_secs(30)),
        || {
            let out = l.pdctl(&["engines", "-o", "json"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            let e = v["engines"].as_array()?.clone();
            (e.len() == 3
                && e.iter()
                    .all(|x| x["state"] == "ready" && x["node"] != killed_node.as_str()))
            .then_some(e)
        },
    );

    // 3. A cut of the KV link mid-transfer (UDP fault proxy in front of a decode host): the
    // shipment fails within seconds and the request is retried on the other decode engine
    // before its first byte.
    let decode_node = replaced
        .iter()
        .find(|e| e["role"] == "decode" && e["node"] != client_node)
        .map(|e| e["node"].as_str().unwrap().to_string())
        .expect("a decode engine on a host other than the client's");
    let mut proxy = std::process::Command::new(bin("pdctl"))
        .args(["local", "proxy", "--dir", l.dir.path().to_str().unwrap()])
        .arg(&decode_node)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(l.dir.path().join("proxy.err")).unwrap())
        .spawn()
        .unwrap();
    let mut proxy_in = proxy.stdin.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let out = proxy.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let wait_line = |prefix: &str, secs: u64| -> String {
        let until = deadline(Duration::from_secs(secs));
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "the proxy never printed a line starting with {prefix:?}: {}",
                    std::fs::read_to_string(l.dir.path().join("proxy.err")).unwrap_or_default()
                ),
            }
        }
    };
    wait_line("agent ", 20);
    wait_line("proxy ", 10);
    // Its agent restarted behind the proxy, engines kept: the cluster serves through it.
    let replaced = wait_steady(&l, &api, "the cluster steady behind the proxy");
    let long = |k: usize| {
        format!(
            "Delta {k}: a prompt long enough that its KV is shipped in several pieces. {}",
            "The quick brown fox jumps over the lazy dog. ".repeat(12)
        )
    };
    // The link from the prefill host only (its KV shipments), not the cluster's control
    // traffic from other hosts. The requests enter there too: no decode engine is local to
    // that agent, so its router spreads them over both decode engines.
    let prefill_node = replaced
        .iter()
        .find(|e| e["role"] == "prefill")
        .map(|e| e["node"].as_str().unwrap().to_string())
        .unwrap();
    let prefill_ip = format!("127.0.0.{}", prefill_node.trim_start_matches("node-"));
    let api3 = node_addr(&l, &prefill_node);
    let before = recoveries(&api3, "retry");
    writeln!(proxy_in, "cut 200000 {prefill_ip}").unwrap();
    wait_line("ok: ", 10);
    // Requests at once: the router spreads them over both decode engines (its in-flight
    // counts), so some go through the cut link.
    let t = Instant::now();
    let answers: Vec<(usize, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|k| {
                let api = api3.clone();
                let p = long(k);
                sc.spawn(move || (k, complete(&api, &p, 8)))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let (k, r) = h.join().unwrap();
                eprintln!("request {k}: route {:?}", r.header("x-pdagent-route"));
                (k, text_of(&r))
            })
            .collect()
    });
    let took = t.elapsed();
    eprintln!(
        "client {client_node}, proxy in front of {decode_node}, engines {:?}",
        engines(&l)
            .iter()
            .map(|e| format!("{}@{} {}", e["engine"], e["node"], e["state"]))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "{}",
        metrics_of(&api3)
            .lines()
            .filter(|l| l.starts_with("pdagent_router_engine_load")
                || l.starts_with("pdagent_routing")
                || l.starts_with("pdagent_request_recoveries"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    wait_line("cut ", 5);
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(recoveries(&api3, "retry") > before, "retried");
    writeln!(proxy_in, "heal").unwrap();
    wait_line("ok: ", 10);
    for (k, t) in &answers {
        assert_eq!(&text_of(&complete(&api3, &long(*k), 8)), t, "request {k}");
    }
    drop(proxy_in); // the end of stdin: the agent goes back to its own address
    let status = proxy.wait().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(l.dir.path().join("proxy.err")).unwrap_or_default()
    );
    // The cut was a partition between two hosts: the coordinator may have moved and engines
    // with it; the cluster settles again.
    wait_steady(&l, &api, "the cluster steady after the partition");

    // 4. The prefill engine dies at the end of its prefill, before the first token: the
    // request is retried (decode engine alone) and the client sees nothing of it.
    let prefill_node = engines(&l)
        .iter()
        .find(|e| e["role"] == "prefill")
        .map(|e| e["node"].as_str().unwrap().to_string())
        .unwrap();
    let dir = l.dir.path().to_str().unwrap().to_string();
    let out = pdctl(&[
        "local",
        "kill",
        "--dir",
        &dir,
        "--agent-only",
        &prefill_node,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = pdctl(&[
        "local",
        "start",
        "--dir",
        &dir,
        &prefill_node,
        "--engine-faults",
        "crash_after_tokens=1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Restarted by its (new) agent, the prefill engine now crashes on its first request.
    let old = pid_of(&engines(&l), "pd/prefill-0");
    let _ = std::process::Command::new("kill")
        .args(["-9", &old.to_string()])
        .status();
    wait_for(
        "the prefill engine back, with faults",
        deadline(Duration::from_secs(30)),
        || {
            let e = engines(&l);
            (e.len() == 3
                && e.iter().all(|x| x["state"] == "ready")
                && pid_of(&e, "pd/prefill-0") != old)
                .then_some(())
        },
    );
    let restarts = |e: &[Value]| {
        e.iter()
            .find(|x| x["engine"] == "pd/prefill-0")
            .and_then(|x| x["restarts"].as_u64())
            .unwrap_or(0)
    };
    let restarted = restarts(&engines(&l));
    // Requests until one reaches the prefill engine and is retried (the client's router may
    // still see the engine starting, or its agent's new address, for a moment).
    let (prompt, r) = (0..10)
        .find_map(|k| {
            let before = recoveries(&api, "retry");
            let prompt = format!("Echo {k}: a prompt whose prefill engine dies as it finishes.");
            let r = complete(&api, &prompt, 16);
            assert_eq!(r.status, 200, "{}", r.text());
            eprintln!("echo {k}: route {:?}", r.header("x-pdagent-route"));
            if recoveries(&api, "retry") == before {
                return None;
            }
            // Retried because the engine died (not for another reason).
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if restarts(&engines(&l)) > restarted {
                    return Some((prompt, r));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        })
        .expect("a request reached the prefill engine, which died, and was retried");
    let got = text_of(&r);
    assert!(
        r.header("x-pdagent-route")
            .is_some_and(|v| !v.contains("prefill")),
        "{:?}",
        r.headers
    );
    // The same text as a decode engine computes it undisturbed.
    assert_eq!(text_of(&complete(&api, &prompt, 16)), got);

    // Nothing is stranded: no engine holds KV blocks for requests that ended.
    wait_for(
        "no KV held by ended requests",
        deadline(Duration::from_secs(20)),
        || {
            ["node-1", "node-2", "node-3", "node-4"]
                .iter()
                .filter_map(|n| http(&node_addr(&l, n), "GET", "/metrics", &[], b"").ok())
                .all(|m| {
                    m.text()
                        .lines()
                        .filter(|x| x.starts_with("pdagent_engine_kv_usage_ratio{"))
                        .all(|x| {
                            x.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(0.0)
                        })
                })
                .then_some(())
        },
    );
}

/// A KV piece corrupted after its checksum was taken (the test fault
/// `PDAGENT_FAULT_KV_CORRUPT`: a bad copy or bad memory on the way): the decode host refuses
/// it and counts it, the request is retried (the pair is the only one, so on the same pair)
/// and answers the undisturbed text. Never decoded from wrong KV.
#[test]
fn a_corrupted_kv_piece_is_refused_and_the_request_retried() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt-next-piece");
    let l = LocalCluster::up_env(
        2,
        1,
        free_base(2),
        &[],
        &[("PDAGENT_FAULT_KV_CORRUPT", corrupt.to_str().unwrap())],
    );
    deploy(
        &l,
        &["pd", "--model", "tiny", "--prefill", "1", "--decode", "1"],
    );
    let placed = wait_for("2 engines ready", deadline(Duration::from_secs(60)), || {
        let e = engines(&l);
        (e.len() == 2 && e.iter().all(|x| x["state"] == "ready")).then_some(e)
    });
    let decode_node = placed
        .iter()
        .find(|e| e["role"] == "decode")
        .map(|e| e["node"].as_str().unwrap().to_string())
        .unwrap();
    let api = node_addr(&l, &decode_node);
    let prompt = format!(
        "Juliett: a prompt whose KV is corrupted on its way to the decode host. {}",
        "The quick brown fox jumps over the lazy dog. ".repeat(8)
    );
    let prompt = prompt.as_str();
    wait_for("the API serving", deadline(Duration::from_secs(30)), || {
        (complete(&api, "Kilo: warming up.", 2).status == 200).then_some(())
    });
    let failures = |api: &str| {
        metric(
            &metrics_of(api),
            "pdagent_kv_integrity_failures_total{stage=\"network\"}",
        )
    };
    let (f0, r0) = (failures(&api), recoveries(&api, "retry"));
    std::fs::write(&corrupt, b"").unwrap();
    let r = complete(&api, prompt, 16);
    assert!(!corrupt.exists(), "the fault fired");
    // The same prompt again, undisturbed (the engines are deterministic).
    let reference = text_of(&complete(&api, prompt, 16));
    assert_eq!(text_of(&r), reference, "the undisturbed text");
    assert_eq!(failures(&api), f0 + 1, "the bad piece was counted");
    assert_eq!(recoveries(&api, "retry"), r0 + 1, "and the request retried");
}
