//! vLLM under pdagent, with the real vLLM (its CPU build): a checkpoint written by
//! `pdagent engine export`, engines launched and supervised by the `vllm` driver on a local
//! cluster with fixture GPUs, disaggregated through vLLM's own NixlConnector (the agents only
//! route), through the official OpenAI SDK. Counters and contents are asserted, never
//! latencies (vLLM on 2 shared cores is slow and noisy).
//!
//! vLLM is found through `PDAGENT_TEST_VLLM_PYTHON` (a Python that imports vllm; `.ci/run`
//! sets it) or `target/vllm-venv/bin/python`. Without it the tests print `SKIPPED` and pass,
//! except under CI, where vLLM's absence fails them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pd_tests::*;
use serde_json::{Value, json};

/// A Python that imports vllm, or None (the test skips; under CI it fails).
fn vllm_python() -> Option<String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates: Vec<String> = std::env::var("PDAGENT_TEST_VLLM_PYTHON")
        .into_iter()
        .chain([workspace
            .join("target/vllm-venv/bin/python")
            .to_string_lossy()
            .into_owned()])
        .collect();
    let found = candidates.into_iter().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import vllm, openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide vLLM's CPU build (PDAGENT_TEST_VLLM_PYTHON; .ci/run installs it)"
        );
        println!(
            "SKIPPED: no Python with vllm and openai (set PDAGENT_TEST_VLLM_PYTHON; the README's test command installs it)"
        );
    }
    found
}

/// `pdagent engine export --model tiny` into `dir/tiny`.
fn export_tiny(dir: &Path) -> PathBuf {
    let out_dir = dir.join("tiny");
    let out = pdagent(&[
        "engine",
        "export",
        "--model",
        "tiny",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "export: {}", text(&out.stderr));
    out_dir
}

/// A 2-node local cluster (one fixture GPU each) whose agents run vLLM with `py`.
fn vllm_cluster(py: &str) -> LocalCluster {
    vllm_cluster_env(py, &[])
}

/// As `vllm_cluster`, with environment for the agents (test faults).
fn vllm_cluster_env(py: &str, env: &[(&str, &str)]) -> LocalCluster {
    vllm_cluster_gpus(py, 1, env)
}

/// As `vllm_cluster_env`, with `gpus` fixture GPUs per node.
fn vllm_cluster_gpus(py: &str, gpus: u32, env: &[(&str, &str)]) -> LocalCluster {
    let command = format!("{py} -m vllm.entrypoints.openai.api_server");
    LocalCluster::up_env(
        2,
        gpus,
        free_base(2),
        &[
            "--vllm-command",
            &command,
            "--vllm-kv-device",
            "cpu",
            "--vllm-env",
            "VLLM_CPU_KVCACHE_SPACE=1",
            "--vllm-env",
            "VLLM_CPU_OMP_THREADS_BIND=nobind",
            "--vllm-env",
            "OMP_NUM_THREADS=1",
        ],
        env,
    )
}

/// Engine flags that fit a 2-core machine; float32 so that the builtin engine's tokens can be
/// compared.
const ENGINE_ARGS: &[&str] = &[
    "--engine-arg=--max-model-len=1024",
    "--engine-arg=--max-num-seqs=8",
    "--engine-arg=--enforce-eager",
    "--engine-arg=--dtype=float32",
];

fn deploy_vllm(l: &LocalCluster, name: &str, model: &Path, layout: &[&str]) {
    let mut a = vec![
        "deploy",
        name,
        "--engine",
        "vllm",
        "--model",
        model.to_str().unwrap(),
    ];
    a.extend_from_slice(layout);
    a.extend_from_slice(ENGINE_ARGS);
    a.extend_from_slice(&["--wait", "--wait-timeout-s", "900"]);
    let out = l.pdctl(&a);
    assert!(
        out.status.success(),
        "deploy {name}: {}{}\nengines: {}",
        text(&out.stdout),
        text(&out.stderr),
        text(&l.pdctl(&["engines"]).stdout)
    );
}

/// An engine's entry in `pdctl engines -o json`.
fn engine(l: &LocalCluster, id: &str) -> Value {
    engines(l)
        .into_iter()
        .find(|e| e["engine"] == id)
        .unwrap_or_else(|| panic!("no engine {id}"))
}

/// A vLLM engine's own `/metrics` (its port on 127.0.0.1, from `pdctl engines`).
fn engine_metrics(l: &LocalCluster, id: &str) -> String {
    let port = engine(l, id)["port"].as_u64().expect("an HTTP port");
    http(&format!("127.0.0.1:{port}"), "GET", "/metrics", &[], b"")
        .unwrap()
        .text()
}

/// The sum of a metric's samples whose line contains `filter`.
fn sum_metric(body: &str, name: &str, filter: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn complete(api: &str, model: &str, prompt: &str, max_tokens: u32) -> Value {
    let r = post_json(
        api,
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

const PROMPTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega, said the teacher to the class that morning.",
    "pdagent routes each request to a prefill engine and a decode engine.",
];

/// Disaggregated vLLM: the decode engine does not recompute prompts (NIXL moved their KV);
/// the OpenAI SDK's completions and chat, streaming and not, work through the agents; the
/// text at temperature 0 equals a colocated vLLM's, and the builtin engine's on the same
/// checkpoint; an owned engine argument is refused.
#[test]
fn vllm_disaggregated_through_nixl() {
    let Some(py) = vllm_python() else { return };
    let _g = serial();
    let models = tempfile::tempdir().unwrap();
    let model = export_tiny(models.path());
    let l = vllm_cluster(&py);

    // A flag the driver owns is refused up front, naming it.
    let out = l.pdctl(&[
        "deploy",
        "bad",
        "--engine",
        "vllm",
        "--model",
        model.to_str().unwrap(),
        "--colocated",
        "1",
        "--engine-arg=--port=9",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--port"),
        "{}",
        text(&out.stderr)
    );

    deploy_vllm(
        &l,
        "pd",
        &model,
        &["--prefill", "1", "--decode", "1", "--kv-transport", "nixl"],
    );
    let p = engine(&l, "pd/prefill-0");
    let d = engine(&l, "pd/decode-0");
    assert_eq!(p["driver"], "vllm");
    assert_ne!(p["node"], d["node"], "one GPU per node: two hosts");
    assert!(p["kv_port"].is_u64() && d["kv_port"].is_u64(), "{p} {d}");
    let api = format!("127.0.0.1:{}", l.api_port);
    wait_for("the API ready", deadline(Duration::from_secs(60)), || {
        http(&api, "GET", "/ready", &[], b"")
            .is_ok_and(|r| r.status == 200)
            .then_some(())
    });

    let before = engine_metrics(&l, "pd/decode-0");
    let local0 = sum_metric(
        &before,
        "vllm:prompt_tokens_by_source_total",
        "local_compute",
    );
    let external0 = sum_metric(
        &before,
        "vllm:prompt_tokens_by_source_total",
        "external_kv_transfer",
    );
    let mut disaggregated = Vec::new();
    let mut prompt_tokens = 0u64;
    for prompt in PROMPTS {
        let r = complete(&api, "pd", prompt, 16);
        prompt_tokens += r["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(r["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
        disaggregated.push(r["choices"][0]["text"].as_str().unwrap().to_string());
    }
    // The decode engine took every prompt's KV from the prefill engine: it computed at most
    // the last token of each prompt itself (less than a block per request).
    let after = engine_metrics(&l, "pd/decode-0");
    let local = sum_metric(
        &after,
        "vllm:prompt_tokens_by_source_total",
        "local_compute",
    ) - local0;
    let external = sum_metric(
        &after,
        "vllm:prompt_tokens_by_source_total",
        "external_kv_transfer",
    ) - external0;
    println!(
        "decode engine: {local} prompt tokens computed, {external} from the prefill engine ({prompt_tokens} prompt tokens sent)"
    );
    assert!(
        local < (128 * PROMPTS.len()) as f64,
        "the decode engine recomputed prompts: {local} tokens"
    );
    assert!(
        external + local >= prompt_tokens as f64
            && external >= prompt_tokens as f64 - PROMPTS.len() as f64,
        "external KV tokens {external}, prompt tokens {prompt_tokens}"
    );
    // The decode host's agent counts the bytes NIXL moved, from the engine's own counter.
    let decode_api = node_addr(&l, d["node"].as_str().unwrap());
    let moved = wait_for(
        "the NIXL bytes counted by the decode host's agent",
        deadline(Duration::from_secs(30)),
        || {
            let v = metric(
                &metrics_of(&decode_api),
                "pdagent_kv_bytes_received_total{path=\"engine\"}",
            );
            (v > 0).then_some(v)
        },
    );
    println!("NIXL moved {moved} bytes for {prompt_tokens} prompt tokens");
    // The route names both engines (a prompt not seen before: a cached one may be served by
    // the decode engine alone).
    let r = post_json(
        &api,
        "/v1/completions",
        &json!({"model": "pd", "prompt": "A prompt the engines have not seen: one, two, three, four, five.", "max_tokens": 4, "temperature": 0}),
    );
    let route = r.header("x-pdagent-route").unwrap_or_default().to_string();
    assert!(
        route.contains("pd/prefill-0") && route.contains("pd/decode-0"),
        "{route}"
    );

    // The official OpenAI SDK: completions and chat, streaming and not.
    openai_sdk_client(&py, &api, "pd");

    // Colocated vLLM (at most two vLLM at once on this machine: the pair goes first), and the
    // builtin engine on the same checkpoint.
    let out = l.pdctl(&["undeploy", "pd"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        "the pair's engines gone",
        deadline(Duration::from_secs(120)),
        || {
            engines(&l)
                .iter()
                .all(|e| e["deployment"] != "pd")
                .then_some(())
        },
    );
    deploy_vllm(&l, "co", &model, &["--colocated", "1"]);
    let co_port = engine(&l, "co/both-0")["port"].as_u64().unwrap();
    for (k, prompt) in PROMPTS.iter().enumerate() {
        let co = complete(&api, "co", prompt, 16);
        assert_eq!(
            co["choices"][0]["text"].as_str().unwrap(),
            disaggregated[k],
            "disaggregated and colocated vLLM differ on prompt {k}"
        );
        // The same checkpoint in the builtin engine: the same greedy tokens. (Token ids, not
        // text: the two detokenizers render invalid UTF-8 differently, vLLM holding back what
        // the builtin engine shows as U+FFFD.)
        let v = post_json(
            &format!("127.0.0.1:{co_port}"),
            "/v1/completions",
            &json!({"model": "co", "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": true}),
        )
        .json();
        let vllm_ids: Vec<u64> = v["choices"][0]["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        let out = pdagent(&[
            "engine",
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            "16",
            "--json",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let g: Value = serde_json::from_slice(&out.stdout).unwrap();
        let builtin_ids: Vec<u64> = g["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        let same = vllm_ids
            .iter()
            .zip(&builtin_ids)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "prompt {k}: vLLM {vllm_ids:?}, builtin {builtin_ids:?}: {same} of {} in common",
            vllm_ids.len()
        );
        assert_eq!(
            vllm_ids, builtin_ids,
            "vLLM (float32) and the builtin engine differ on prompt {k}"
        );
    }
}

fn recoveries(api: &str, model: &str, kind: &str) -> u64 {
    metric(
        &metrics_of(api),
        &format!("pdagent_request_recoveries_total{{model=\"{model}\",kind=\"{kind}\"}}"),
    )
}

fn kill9(pid: u64) {
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits until the deployment's engines are all ready; their list.
fn wait_ready(l: &LocalCluster, deployment: &str, n: usize, secs: u64) -> Vec<Value> {
    wait_for(
        &format!("{n} engines of {deployment} ready"),
        deadline(Duration::from_secs(secs)),
        || {
            let e: Vec<Value> = engines(l)
                .into_iter()
                .filter(|e| e["deployment"] == deployment)
                .collect();
            (e.len() == n && e.iter().all(|x| x["state"] == "ready")).then_some(e)
        },
    )
}

/// Failures with vLLM engines: an engine argument vLLM refuses ends the engine `failed` with
/// its log's tail; `kill -9` of a vLLM mid-stream moves the stream to the other engine (the
/// prompt and the tokens so far sent as token ids) and at temperature 0 the text equals the
/// undisturbed one; the killed engine comes back; a client that goes away leaves no request
/// running in the engines; `kill -9` of an agent and its restart re-adopt its vLLM (same pid)
/// without restarting it.
#[test]
fn vllm_failures_are_recovered() {
    let Some(py) = vllm_python() else { return };
    let _g = serial();
    let models = tempfile::tempdir().unwrap();
    let model = export_tiny(models.path());
    let l = vllm_cluster(&py);
    let dir = l.dir.path().to_str().unwrap().to_string();

    // vLLM refuses the argument: the engine crash-loops to `failed`, the deploy says why.
    let out = l.pdctl(&[
        "deploy",
        "broken",
        "--engine",
        "vllm",
        "--model",
        model.to_str().unwrap(),
        "--colocated",
        "1",
        "--engine-arg=--max-model-len=not-a-number",
        "--wait",
        "--wait-timeout-s",
        "600",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("failed"), "{err}");
    assert!(
        err.contains("max-model-len") || err.contains("max_model_len"),
        "the log tail names the argument: {err}"
    );
    let out = l.pdctl(&["undeploy", "broken"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    deploy_vllm(&l, "co", &model, &["--colocated", "2"]);
    let placed = wait_ready(&l, "co", 2, 60);
    assert_ne!(placed[0]["node"], placed[1]["node"]);
    let api = format!("127.0.0.1:{}", l.api_port);
    let prompt = "Echo: a long answer that is moved to another engine half way through.";
    let body = json!({"model": "co", "prompt": prompt, "max_tokens": 300, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let reference = complete(&api, "co", prompt, 300)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();

    // kill -9 of the streaming engine: the stream moves and equals the undisturbed one.
    let before = recoveries(&api, "co", "migration");
    let mut s = start_stream(&api, &body);
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (killed, _) = streaming_engine(&route_of(&head));
    let killed_pid = pid_of(&placed, &killed);
    kill9(killed_pid);
    let events = read_sse(&mut s);
    let (got, finish, usage) = stream_text(&events);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(finish, "length", "{events:?}");
    assert_eq!(usage.unwrap()["completion_tokens"], 300);
    assert_eq!(
        got, reference,
        "the moved stream equals the undisturbed one"
    );
    assert_eq!(recoveries(&api, "co", "migration"), before + 1);
    // The killed engine comes back, as a new process.
    let back = wait_ready(&l, "co", 2, 600);
    let again = back
        .iter()
        .find(|e| e["engine"] == killed.as_str())
        .unwrap();
    assert_ne!(again["pid"].as_u64(), Some(killed_pid));
    assert!(again["restarts"].as_u64().unwrap() >= 1, "{again}");

    // A client that goes away: both engines end with nothing running.
    let running = |e: &Value| {
        let port = e["port"].as_u64().unwrap();
        let m = http(&format!("127.0.0.1:{port}"), "GET", "/metrics", &[], b"")
            .map(|r| r.text())
            .unwrap_or_default();
        sum_metric(&m, "vllm:num_requests_running", "")
    };
    let mut s = start_stream(&api, &body);
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (streaming, _) = streaming_engine(&route_of(&head));
    let e = back
        .iter()
        .find(|e| e["engine"] == streaming.as_str())
        .unwrap()
        .clone();
    assert!(running(&e) >= 1.0, "the request runs in {streaming}");
    drop(s);
    wait_for(
        "no request running in the engines",
        deadline(Duration::from_secs(60)),
        || back.iter().all(|e| running(e) == 0.0).then_some(()),
    );

    // kill -9 of node-2's agent, then its restart: its vLLM is re-adopted, not restarted.
    let on2 = back.iter().find(|e| e["node"] == "node-2").unwrap().clone();
    let out = pdctl(&["local", "kill", "--dir", &dir, "--agent-only", "node-2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = pdctl(&["local", "start", "--dir", &dir, "node-2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The coordinator may still list the old agent's report: wait for the new agent's word.
    let log_path = l.dir.path().join("node-2/agent.log");
    wait_for(
        "the restarted agent re-adopting its engine",
        deadline(Duration::from_secs(120)),
        || {
            std::fs::read_to_string(&log_path)
                .is_ok_and(|t| t.contains("re-adopted a running engine"))
                .then_some(())
        },
    );
    let after = wait_for(
        "node-2's engine ready again",
        deadline(Duration::from_secs(120)),
        || {
            engines(&l).into_iter().find(|e| {
                e["engine"] == on2["engine"] && e["state"] == "ready" && e["node"] == "node-2"
            })
        },
    );
    assert_eq!(after["pid"], on2["pid"], "the same vLLM process: {after}");
    let api2 = format!("127.0.0.2:{}", l.api_port);
    wait_for("node-2 serving", deadline(Duration::from_secs(60)), || {
        let r = post_json(
            &api2,
            "/v1/completions",
            &json!({"model": "co", "prompt": "Foxtrot: still there?", "max_tokens": 4, "temperature": 0}),
        );
        (r.status == 200).then_some(())
    });
}

/// A vLLM engine's own metric, summed over the lines that contain `filter`.
fn vllm_metric(port: u64, name: &str, filter: &str) -> f64 {
    let m = http(&format!("127.0.0.1:{port}"), "GET", "/metrics", &[], b"")
        .map(|r| r.text())
        .unwrap_or_default();
    sum_metric(&m, name, filter)
}

/// The same request computed by one vLLM engine alone (no KV from elsewhere): the reference
/// text of a colocated vLLM.
fn alone(port: u64, prompt: &str, max_tokens: u32) -> String {
    alone_as("pa", port, prompt, max_tokens)
}

/// As `alone`, for deployment `model`.
fn alone_as(model: &str, port: u64, prompt: &str, max_tokens: u32) -> String {
    let v = post_json(
        &format!("127.0.0.1:{port}"),
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    );
    assert_eq!(v.status, 200, "{}", v.text());
    v.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

/// The HTTP ports of deployment `name`'s prefill and decode engines, on two hosts with no NIXL
/// side channel, and the decode host's API address (requests enter there, so the KV crosses
/// the network to reach it), once it is ready.
fn kv_pair(l: &LocalCluster, name: &str) -> (u64, u64, String) {
    let p = engine(l, &format!("{name}/prefill-0"));
    let d = engine(l, &format!("{name}/decode-0"));
    assert_ne!(p["node"], d["node"]);
    assert!(p["kv_port"].is_null(), "no NIXL side channel: {p}");
    let decode_api = node_addr(l, d["node"].as_str().unwrap());
    wait_for("the API ready", deadline(Duration::from_secs(60)), || {
        http(&decode_api, "GET", "/ready", &[], b"")
            .is_ok_and(|r| r.status == 200)
            .then_some(())
    });
    (
        p["port"].as_u64().unwrap(),
        d["port"].as_u64().unwrap(),
        decode_api,
    )
}

/// A prompt over one block of KV (128 tokens): several blocks, the last one partial.
fn long_prompt() -> String {
    format!(
        "A longer prompt, over one block of KV. {}",
        "The quick brown fox jumps over the lazy dog. ".repeat(14)
    )
}

/// Deployment `name` (a prefill engine on node-1, a decode engine on node-2, TP `tp`, KV
/// through the agents) serves prompts short and long through the decode host: every prompt
/// token reaches the decode engine as external KV (less than a block per prompt computed
/// there), the decode host's agent counts exactly the prompt's KV bytes (all ranks), each
/// answer's route names the shipment with one piece per layer and rank, and the text equals
/// what the prefill engine computes alone.
fn kv_through_the_agents(l: &LocalCluster, name: &str, tp: u64) {
    let (pport, dport, decode_api) = kv_pair(l, name);
    let local = |f: &str| vllm_metric(dport, "vllm:prompt_tokens_by_source_total", f);
    let (local0, external0) = (local("local_compute"), local("external_kv_transfer"));
    let received = |api: &str| {
        metric(
            &metrics_of(api),
            "pdagent_kv_bytes_received_total{path=\"network\"}",
        )
    };
    let bytes0 = received(&decode_api);
    // Three prompts, one of them longer than a KV block.
    let long = long_prompt();
    let prompts: Vec<&str> = PROMPTS.iter().copied().chain([long.as_str()]).collect();
    let mut texts = Vec::new();
    let mut prompt_tokens = 0u64;
    for prompt in &prompts {
        let r = post_json(
            &decode_api,
            "/v1/completions",
            &json!({"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let route = r.header("x-pdagent-route").unwrap_or_default().to_string();
        assert!(
            route.starts_with(&format!("{name}/prefill-0@node-1 -[kv "))
                && route.contains(&format!(" bytes, {} pieces, ", 4 * tp))
                && route.ends_with(&format!("]-> {name}/decode-0@node-2")),
            "{route}"
        );
        let timing = r.header("server-timing").unwrap_or_default().to_string();
        assert!(timing.contains("kv;dur="), "{timing}");
        let v = r.json();
        prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let (local_n, external_n) = (
        local("local_compute") - local0,
        local("external_kv_transfer") - external0,
    );
    println!(
        "decode engine: {local_n} prompt tokens computed, {external_n} from the prefill host's agent ({prompt_tokens} prompt tokens)"
    );
    assert!(
        local_n < (128 * prompts.len()) as f64,
        "the decode engine computed prompts: {local_n}"
    );
    assert_eq!(external_n, prompt_tokens as f64);
    // tiny: 4 layers, 2 KV heads of 32, float32. Every prompt token's K and V rows, exactly
    // (rows, not whole blocks: the last block's unused slots are not shipped).
    let per_token = 2 * 4 * 2 * 32 * 4;
    assert_eq!(received(&decode_api) - bytes0, per_token * prompt_tokens);

    // The text is what one vLLM computes alone (the prefill engine, asked directly).
    println!("texts: {texts:?}");
    assert!(texts.iter().any(|t| !t.is_empty()), "texts to compare");
    for (k, prompt) in prompts.iter().enumerate() {
        assert_eq!(alone_as(name, pport, prompt, 16), texts[k], "prompt {k}");
    }
}

/// vLLM's KV through pdagent's own connector and the agents' QUIC (`--kv-transport agent`):
/// the decode engine computes no prompt (every prompt token arrives as external KV), the
/// decode host's agent counts exactly the prompt's KV bytes, the text equals what one vLLM
/// computes alone; a piece corrupted in flight is detected and never yields wrong text; a cut
/// link is retried; an aborted request leaves no KV held on either engine; a pair whose
/// checkpoints differ is refused at deploy time, naming both fingerprints.
#[test]
fn vllm_kv_through_the_agents() {
    let Some(py) = vllm_python() else { return };
    let _g = serial();
    let models = tempfile::tempdir().unwrap();
    let model = export_tiny(models.path());
    let corrupt = models.path().join("corrupt-next-piece");
    let l = vllm_cluster_env(
        &py,
        &[("PDAGENT_FAULT_KV_CORRUPT", corrupt.to_str().unwrap())],
    );

    // Two copies of "m" that differ (node-k's models_dir is node-k/data/models): refused
    // before any engine starts, both fingerprints named.
    for (node, preset) in [("node-1", "tiny"), ("node-2", "small")] {
        let dir = l.dir.path().join(node).join("data/models/m");
        let out = pdagent(&[
            "engine",
            "export",
            "--model",
            preset,
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = l.pdctl(&[
        "deploy",
        "mixed",
        "--engine",
        "vllm",
        "--model",
        "m",
        "--prefill",
        "1",
        "--decode",
        "1",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("node-1: ") && err.contains("node-2: ") && err.contains("differ"),
        "{err}"
    );
    assert!(engines(&l).is_empty(), "nothing placed");

    deploy_vllm(
        &l,
        "pa",
        &model,
        &["--prefill", "1", "--decode", "1", "--kv-transport", "agent"],
    );
    let (pport, dport, decode_api) = kv_pair(&l, "pa");
    let out = l.pdctl(&["deployments", "-o", "json"]);
    assert!(
        text(&out.stdout).contains("--kv-transport=agent"),
        "{}",
        text(&out.stdout)
    );

    kv_through_the_agents(&l, "pa", 1);

    // A piece corrupted after its checksum was taken: detected on the decode host, never
    // decoded from; the request still answers the right text.
    let integrity = |api: &str| {
        metric(
            &metrics_of(api),
            "pdagent_kv_integrity_failures_total{stage=\"network\"}",
        )
    };
    let before = integrity(&decode_api);
    std::fs::write(&corrupt, b"").unwrap();
    let prompt = "Golf: a prompt whose KV is corrupted on its way to the decode host.";
    let got = complete(&decode_api, "pa", prompt, 16)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!corrupt.exists(), "the fault fired");
    assert_eq!(
        integrity(&decode_api),
        before + 1,
        "the bad piece was counted"
    );
    assert_eq!(got, alone(pport, prompt, 16));

    // A client that goes away while its prompt's KV is being made and shipped: neither
    // engine holds KV for it afterwards, and nothing is left waiting in the agents.
    let usage = |port: u64| vllm_metric(port, "vllm:kv_cache_usage_perc", "");
    let running = |port: u64| vllm_metric(port, "vllm:num_requests_running", "");
    for cut_after in [Duration::from_millis(50), Duration::from_millis(400)] {
        let body = json!({"model": "pa", "prompt": long_prompt(), "max_tokens": 200, "temperature": 0, "stream": true});
        let s = start_stream(&decode_api, &body);
        std::thread::sleep(cut_after);
        drop(s);
        wait_for(
            "both engines free of the aborted request",
            deadline(Duration::from_secs(120)),
            || {
                (usage(pport) == 0.0
                    && usage(dport) == 0.0
                    && running(pport) == 0.0
                    && running(dport) == 0.0)
                    .then_some(())
            },
        );
    }

    // The KV link cut for a few seconds (the fault proxy in front of the decode host drops
    // what the prefill host sends): the shipment fails and the request is retried; it ends
    // with the right text or an explicit error, never wrong text; once healed, all is well.
    let mut proxy = std::process::Command::new(bin("pdctl"))
        .args([
            "local",
            "proxy",
            "--dir",
            l.dir.path().to_str().unwrap(),
            "node-2",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(l.dir.path().join("proxy.err")).unwrap())
        .spawn()
        .unwrap();
    let mut proxy_in = proxy.stdin.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let out = proxy.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let wait_line = |prefix: &str, secs: u64| -> String {
        let until = deadline(Duration::from_secs(secs));
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(x) if x.starts_with(prefix) => return x,
                Ok(_) => {}
                Err(_) => panic!(
                    "the proxy never printed a line starting with {prefix:?}: {}",
                    std::fs::read_to_string(l.dir.path().join("proxy.err")).unwrap_or_default()
                ),
            }
        }
    };
    wait_line("agent ", 30);
    wait_line("proxy ", 10);
    wait_for(
        "the decode engine ready behind the proxy",
        deadline(Duration::from_secs(120)),
        || {
            let e = engine(&l, "pa/decode-0");
            (e["state"] == "ready" && e["node"] == "node-2").then_some(())
        },
    );
    wait_for("node-2 serving", deadline(Duration::from_secs(60)), || {
        let body = json!({"model": "pa", "prompt": "Hotel: through the proxy.", "max_tokens": 4, "temperature": 0});
        http(
            &decode_api,
            "POST",
            "/v1/completions",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
        .is_ok_and(|r| r.status == 200)
        .then_some(())
    });
    let retries = |api: &str| {
        metric(
            &metrics_of(api),
            "pdagent_request_recoveries_total{model=\"pa\",kind=\"retry\"}",
        )
    };
    let before = retries(&decode_api);
    use std::io::Write;
    // Each flow from the prefill host is cut after a few more kilobytes: mid-shipment.
    writeln!(proxy_in, "cut 60000 127.0.0.1").unwrap();
    wait_line("ok: ", 10);
    let prompt = format!(
        "India: a prompt whose KV meets a cut link. {}",
        long_prompt()
    );
    let request = {
        let (api, prompt) = (decode_api.clone(), prompt.clone());
        std::thread::spawn(move || {
            post_json(
                &api,
                "/v1/completions",
                &json!({"model": "pa", "prompt": prompt, "max_tokens": 16, "temperature": 0}),
            )
        })
    };
    wait_line("cut ", 120);
    wait_for(
        "the request retried",
        deadline(Duration::from_secs(120)),
        || (retries(&decode_api) > before).then_some(()),
    );
    writeln!(proxy_in, "heal").unwrap();
    wait_line("ok: ", 10);
    let r = request.join().unwrap();
    println!("through the cut link: {} {}", r.status, r.text());
    let reference = alone(pport, &prompt, 16);
    if r.status == 200 {
        assert_eq!(r.json()["choices"][0]["text"].as_str().unwrap(), reference);
    } else {
        assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
    }
    wait_for(
        "served again once healed",
        deadline(Duration::from_secs(60)),
        || {
            let r = post_json(
                &decode_api,
                "/v1/completions",
                &json!({"model": "pa", "prompt": prompt, "max_tokens": 16, "temperature": 0}),
            );
            (r.status == 200)
                .then(|| assert_eq!(r.json()["choices"][0]["text"].as_str().unwrap(), reference))
        },
    );
    drop(proxy_in);
    let _ = proxy.wait();
}

/// Tensor parallelism 2 on both sides (two fixture GPUs per host, vLLM's CPU build runs TP 2
/// as two worker processes): each TP rank's connector ships its own shard (one KV head of
/// tiny's two) as its own shipment and the decode engine's rank of the same number takes it;
/// together they are the whole prompt's KV, and the text is what one engine computes.
#[test]
fn vllm_kv_through_the_agents_at_tp2() {
    let Some(py) = vllm_python() else { return };
    let _g = serial();
    let models = tempfile::tempdir().unwrap();
    let model = export_tiny(models.path());
    let l = vllm_cluster_gpus(&py, 2, &[]);
    deploy_vllm(
        &l,
        "tp",
        &model,
        &[
            "--prefill",
            "1",
            "--decode",
            "1",
            "--tp",
            "2",
            "--kv-transport",
            "agent",
        ],
    );
    assert_eq!(
        engine(&l, "tp/prefill-0")["gpus"].as_array().unwrap().len(),
        2
    );
    kv_through_the_agents(&l, "tp", 2);
}
