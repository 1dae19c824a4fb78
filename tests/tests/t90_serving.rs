//! The serving path through a real local cluster: OpenAI requests, streaming and not, through
//! any agent; disaggregated (KV shipped over QUIC between hosts) and colocated give the same
//! text at temperature 0; usage, finish reasons and SSE framing; the KV byte counters match the
//! formula; every error answer has OpenAI's body; a client that goes away frees the engines.

use std::time::Duration;

use pd_tests::*;
use serde_json::{Value, json};

/// KV payload bytes per prompt token of the `tiny` preset: K and V x 4 layers x 2 KV heads x
/// head_dim 32 x 4 bytes (f32).
const TINY_KV_BYTES_PER_TOKEN: u64 = 2 * 4 * 2 * 32 * 4;

#[test]
fn openai_api_serves_disaggregated_and_colocated() {
    let _g = serial();
    let l = LocalCluster::up_with(3, 1, free_base(3));
    // Targets no request here misses: every finished request of "pd" counts as within.
    deploy(
        &l,
        &[
            "pd",
            "--model",
            "tiny",
            "--prefill",
            "1",
            "--decode",
            "1",
            "--ttft-ms",
            "600000",
            "--tpot-ms",
            "600000",
        ],
    );
    deploy(&l, &["co", "--model", "tiny", "--colocated", "1"]);
    let api = |k: u32| format!("127.0.0.{k}:{}", l.api_port);
    wait_for(
        "every API ready with both models",
        deadline(Duration::from_secs(30)),
        || {
            (1..=3)
                .all(|k| {
                    let ready =
                        http(&api(k), "GET", "/ready", &[], b"").is_ok_and(|r| r.status == 200);
                    let models = http(&api(k), "GET", "/v1/models", &[], b"")
                        .map(|r| r.text())
                        .unwrap_or_default();
                    ready && models.contains("\"pd\"") && models.contains("\"co\"")
                })
                .then_some(())
        },
    );
    // `/ready` means some deployment can serve: wait until every agent serves both (each
    // agent's view of the engines catches up within a refresh).
    wait_for(
        "every agent serving both deployments",
        deadline(Duration::from_secs(30)),
        || {
            (1..=3)
                .all(|k| {
                    ["pd", "co"].iter().all(|m| {
                        let body = json!({"model": m, "prompt": "Oscar: is everyone there?", "max_tokens": 1});
                        http(
                            &api(k),
                            "POST",
                            "/v1/completions",
                            &[("Content-Type", "application/json")],
                            body.to_string().as_bytes(),
                        )
                        .is_ok_and(|r| r.status == 200)
                    })
                })
                .then_some(())
        },
    );
    let nodes = engine_nodes(&l);
    let prefill_node = node_addr(&l, &nodes["pd/prefill-0"]);
    let decode_node = node_addr(&l, &nodes["pd/decode-0"]);
    assert_ne!(
        prefill_node, decode_node,
        "one GPU per node: the KV crosses hosts"
    );

    let models = http(&api(2), "GET", "/v1/models", &[], b"").unwrap().json();
    assert_eq!(models["object"], "list");
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "pd" && m["object"] == "model")
    );
    assert_eq!(
        http(&api(2), "GET", "/health", &[], b"").unwrap().status,
        200
    );

    // Non-streaming, through different agents: disaggregated equals colocated.
    let prompts = [
        "Alpha: the quick brown fox jumps over the lazy dog while the cat sleeps on the mat.",
        "Bravo: pack my box with five dozen liquor jugs, then sphinx of black quartz, judge my vow.",
        "Charlie: how vexingly quick daft zebras jump over the fence in the cold morning air!",
    ];
    let mut first_text = String::new();
    for (i, p) in prompts.iter().enumerate() {
        let body =
            |model: &str| json!({"model": model, "prompt": p, "max_tokens": 12, "temperature": 0});
        let pd = post_json(&api(1 + (i as u32 % 3)), "/v1/completions", &body("pd"));
        let co = post_json(&api(3 - (i as u32 % 3)), "/v1/completions", &body("co"));
        assert_eq!(pd.status, 200, "{}", pd.text());
        assert_eq!(co.status, 200, "{}", co.text());
        let (pd, co) = (pd.json(), co.json());
        assert_eq!(pd["object"], "text_completion");
        assert!(pd["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(pd["model"], "pd");
        assert_eq!(
            pd["choices"][0]["text"], co["choices"][0]["text"],
            "prompt {i}"
        );
        assert_eq!(
            pd["choices"][0]["finish_reason"],
            co["choices"][0]["finish_reason"]
        );
        assert_eq!(pd["usage"], co["usage"]);
        // The byte tokenizer: one token per byte, plus BOS.
        assert_eq!(pd["usage"]["prompt_tokens"], p.len() as u64 + 1);
        let n = pd["usage"]["completion_tokens"].as_u64().unwrap();
        let finish = pd["choices"][0]["finish_reason"].as_str().unwrap();
        assert!((1..=12).contains(&n));
        assert!(finish == "stop" || (finish == "length" && n == 12), "{pd}");
        assert_eq!(
            pd["usage"]["total_tokens"],
            pd["usage"]["prompt_tokens"].as_u64().unwrap() + n
        );
        if i == 0 {
            first_text = pd["choices"][0]["text"].as_str().unwrap().to_string();
            // The engine's own text for this prompt, in one process: nothing lost or added on
            // the way through the agents (regression: a token's text was dropped).
            let out = pdagent(&[
                "engine",
                "generate",
                "--model",
                "tiny",
                "--prompt",
                p,
                "--max-tokens",
                "12",
                "--json",
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let own: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(pd["choices"][0]["text"], own["text"], "{own}");
            assert_eq!(
                pd["usage"]["completion_tokens"],
                own["tokens"].as_array().unwrap().len()
            );
        }
    }

    // Streaming gives the same text, framed as SSE, with usage when asked.
    let r = post_json(
        &api(2),
        "/v1/completions",
        &json!({"model": "pd", "prompt": prompts[0], "max_tokens": 12, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let (text, finish, usage) = stream_text(&r.sse());
    assert_eq!(text, first_text);
    assert!(finish == "length" || finish == "stop");
    assert_eq!(usage.unwrap()["prompt_tokens"], prompts[0].len() as u64 + 1);

    // Chat, both ways and both modes: the same text; the stream opens with the role.
    let chat = |model: &str, stream: bool, k: u32| {
        post_json(
            &api(k),
            "/v1/chat/completions",
            &json!({"model": model, "messages": [
                {"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": [{"type": "text", "text": "Name three colours of the rainbow."}]}
            ], "max_completion_tokens": 10, "temperature": 0, "stream": stream}),
        )
    };
    let a = chat("pd", false, 3);
    let b = chat("co", false, 2);
    assert_eq!(a.status, 200, "{}", a.text());
    let (a, b) = (a.json(), b.json());
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
    let s = chat("pd", true, 1);
    let events = s.sse();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (text, _, usage) = stream_text(&events);
    assert_eq!(
        text,
        a["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(usage.is_none(), "no usage chunk unless asked");

    // The KV bytes of one new prompt: the formula, sent by the prefill host, received by the
    // decode host.
    let sent0 = metric(
        &metrics_of(&prefill_node),
        "pdagent_kv_bytes_sent_total{path=\"network\"}",
    );
    let recv0 = metric(
        &metrics_of(&decode_node),
        "pdagent_kv_bytes_received_total{path=\"network\"}",
    );
    let p = "Delta: a wholly new prompt that shares no prefix with anything sent before it, of some length.";
    let r = post_json(
        &api(1),
        "/v1/completions",
        &json!({"model": "pd", "prompt": p, "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let tokens = r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let sent = metric(
        &metrics_of(&prefill_node),
        "pdagent_kv_bytes_sent_total{path=\"network\"}",
    ) - sent0;
    let recv = metric(
        &metrics_of(&decode_node),
        "pdagent_kv_bytes_received_total{path=\"network\"}",
    ) - recv0;
    assert_eq!(sent, TINY_KV_BYTES_PER_TOKEN * tokens);
    assert_eq!(recv, sent);
    // One token needs no KV shipped: the decode engine computes it alone.
    let r = post_json(
        &api(1),
        "/v1/completions",
        &json!({"model": "pd", "prompt": "Lima: one token only, from a prompt nobody sent before today.", "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 1);
    assert_eq!(
        metric(
            &metrics_of(&prefill_node),
            "pdagent_kv_bytes_sent_total{path=\"network\"}"
        ) - sent0,
        sent,
        "nothing shipped for a one-token request"
    );
    let m = metrics_of(&api(1));
    assert!(
        metric(
            &m,
            "pdagent_routing_decisions_total{kind=\"disaggregated\"}"
        ) >= 1,
        "{m}"
    );
    assert!(m.contains("# TYPE pdagent_time_to_first_token_seconds histogram"));
    assert!(m.contains("pdagent_requests_total{model=\"pd\",outcome=\"ok\"}"));
    // Every finished request of "pd" judged against its targets, its lengths counted; "co"
    // has no targets.
    let ok = metric(&m, "pdagent_requests_total{model=\"pd\",outcome=\"ok\"}");
    assert!(ok >= 1);
    assert_eq!(
        metric(
            &m,
            "pdagent_requests_slo_total{model=\"pd\",result=\"within\"}"
        ),
        ok,
        "{m}"
    );
    assert_eq!(
        metric(&m, "pdagent_request_prompt_tokens_count{model=\"pd\"}"),
        ok
    );
    assert_eq!(
        metric(&m, "pdagent_request_output_tokens_count{model=\"pd\"}"),
        ok
    );
    assert!(
        !m.contains("pdagent_requests_slo_total{model=\"co\""),
        "{m}"
    );

    // Errors, each with OpenAI's body.
    let a1 = api(1);
    let e = error_of(
        &http(
            &a1,
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            b"{\"model\": ",
        )
        .unwrap(),
        400,
    );
    assert_eq!(e["type"], "invalid_request_error");
    let e = error_of(
        &post_json(
            &a1,
            "/v1/completions",
            &json!({"model": "nope", "prompt": "x"}),
        ),
        404,
    );
    assert_eq!(e["code"], "model_not_found");
    let e = error_of(
        &post_json(
            &a1,
            "/v1/completions",
            &json!({"model": "pd", "prompt": "x", "temperature": 5}),
        ),
        400,
    );
    assert_eq!(e["param"], "temperature");
    let e = error_of(
        &post_json(
            &a1,
            "/v1/chat/completions",
            &json!({"model": "pd", "messages": []}),
        ),
        400,
    );
    assert_eq!(e["param"], "messages");
    let big = vec![b'x'; 5 << 20];
    error_of(
        &http(
            &a1,
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            &big,
        )
        .unwrap(),
        413,
    );
    error_of(&http(&a1, "GET", "/v1/nothing", &[], b"").unwrap(), 404);
    error_of(&http(&a1, "GET", "/v1/completions", &[], b"").unwrap(), 405);
    // A prompt longer than the model's context (2048 tokens for tiny).
    let long = "y".repeat(3000);
    let e = error_of(
        &post_json(
            &a1,
            "/v1/completions",
            &json!({"model": "co", "prompt": long}),
        ),
        400,
    );
    assert!(
        e["message"].as_str().unwrap().contains("context")
            || e["message"].as_str().unwrap().contains("long"),
        "{e}"
    );
    // X-Request-Id is honoured and returned; one is made up when absent.
    let r = http(
        &a1,
        "POST",
        "/v1/completions",
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "req-42"),
        ],
        json!({"model": "co", "prompt": "Hello there", "max_tokens": 2})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.header("x-request-id"), Some("req-42"));
    assert_eq!(r.json()["id"], "cmpl-req-42");
    assert!(
        post_json(
            &a1,
            "/v1/completions",
            &json!({"model": "nope", "prompt": "x"})
        )
        .header("x-request-id")
        .is_some_and(|v| !v.is_empty())
    );

    // A client that goes away mid-stream: the engines stop working on its request.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&a1).unwrap();
        let body = json!({"model": "pd", "prompt": prompts[1], "max_tokens": 2000, "temperature": 0, "stream": true}).to_string();
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        // Gone after the first bytes, while the engine has ~2000 tokens to go.
        drop(s);
    }
    wait_for(
        "the decode engine idle after the client left",
        deadline(Duration::from_secs(10)),
        || {
            (metric(
                &metrics_of(&decode_node),
                "pdagent_engine_running_requests{engine=\"pd/decode-0\"}",
            ) == 0)
                .then_some(())
        },
    );
    wait_for(
        "the cancel counted",
        deadline(Duration::from_secs(5)),
        || {
            (metric(
                &metrics_of(&a1),
                "pdagent_requests_total{model=\"pd\",outcome=\"cancelled\"}",
            ) == 1)
                .then_some(())
        },
    );

    // A deployment with no engine ready (its model folder is on the hosts, but its
    // config.json is not a model's: the engine cannot start): 503 with Retry-After and
    // OpenAI's body. (A folder on no host is refused at deploy time: t70.)
    let out = l.pdctl(&["undeploy", "co"]);
    assert!(out.status.success(), "{}", pd_tests::text(&out.stderr));
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("config.json"), "{}").unwrap();
    let out = l.pdctl(&[
        "deploy",
        "broken",
        "--model",
        broken.path().to_str().unwrap(),
        "--colocated",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        pd_tests::text(&out.stdout),
        pd_tests::text(&out.stderr)
    );
    wait_for(
        "the broken model listed",
        deadline(Duration::from_secs(10)),
        || {
            http(&a1, "GET", "/v1/models", &[], b"")
                .is_ok_and(|r| r.text().contains("\"broken\""))
                .then_some(())
        },
    );
    let r = post_json(
        &a1,
        "/v1/completions",
        &json!({"model": "broken", "prompt": "x", "max_tokens": 2}),
    );
    let e = error_of(&r, 503);
    assert!(e["message"].as_str().unwrap().contains("broken"), "{e}");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    // The other deployment is unaffected.
    assert_eq!(post_json(&a1, "/v1/completions", &json!({"model": "pd", "prompt": "Juliet: still serving while another deployment is broken.", "max_tokens": 2})).status, 200);
}

/// Reads an SSE response from `s` until it ends; returns the `data:` payloads.
/// Bounded queues: past `serving.inflight_max` an agent answers 429 with `Retry-After`; a
/// stream whose decode engine dies after the first token ends with an SSE error event (not
/// `[DONE]`), and the agent goes on serving.
#[test]
fn overload_and_failures_are_explicit() {
    let _g = serial();
    let l = LocalCluster::up_with(2, 1, free_base(2));
    deploy(
        &l,
        &["pd", "--model", "tiny", "--prefill", "1", "--decode", "1"],
    );
    // node-2 with room for one request at a time; its engine keeps running (re-adopted).
    let cfg = l.dir.path().join("node-2").join("pdagent.toml");
    let out = pdctl(&[
        "local",
        "kill",
        "--dir",
        l.dir.path().to_str().unwrap(),
        "--agent-only",
        "node-2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str("inflight_max = 1\n");
    assert!(toml.trim_end().ends_with("inflight_max = 1"));
    std::fs::write(&cfg, toml).unwrap();
    let out = pdctl(&[
        "local",
        "start",
        "--dir",
        l.dir.path().to_str().unwrap(),
        "node-2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a2 = format!("127.0.0.2:{}", l.api_port);
    // Served again: its engines re-adopted (until then its legs fail over, here to nothing).
    wait_for(
        "node-2 serving again",
        deadline(Duration::from_secs(30)),
        || {
            let body = json!({"model": "pd", "prompt": "Kilo: warming up after the restart of the agent.", "max_tokens": 2});
            http(
                &a2,
                "POST",
                "/v1/completions",
                &[("Content-Type", "application/json")],
                body.to_string().as_bytes(),
            )
            .is_ok_and(|r| r.status == 200)
            .then_some(())
        },
    );
    let long = json!({"model": "pd", "prompt": "Echo: the quick brown fox jumps over the lazy dog again and again and again.", "max_tokens": 1500, "temperature": 0, "stream": true});
    let mut first = start_stream(&a2, &long);
    {
        use std::io::Read;
        let mut buf = [0u8; 512];
        let n = first.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "the first stream started: {head}"
        );
    }
    let r = post_json(
        &a2,
        "/v1/completions",
        &json!({"model": "pd", "prompt": "x", "max_tokens": 2}),
    );
    let e = error_of(&r, 429);
    assert_eq!(e["type"], "rate_limit_error");
    assert!(
        r.header("retry-after")
            .is_some_and(|v| v.parse::<u32>().is_ok()),
        "{:?}",
        r.headers
    );
    drop(first);

    // kill -9 of the decode engine mid-stream: an SSE error event ends the stream.
    let decode_pid = wait_for(
        "the decode engine's pid",
        deadline(Duration::from_secs(10)),
        || {
            let engines: Value =
                serde_json::from_slice(&l.pdctl(&["engines", "-o", "json"]).stdout).ok()?;
            engines["engines"]
                .as_array()?
                .iter()
                .find(|e| e["engine"] == "pd/decode-0")
                .and_then(|e| e["pid"].as_u64())
        },
    );
    let a1 = format!("127.0.0.1:{}", l.api_port);
    wait_for(
        "node-1's API ready",
        deadline(Duration::from_secs(30)),
        || {
            http(&a1, "GET", "/ready", &[], b"")
                .is_ok_and(|r| r.status == 200)
                .then_some(())
        },
    );
    let mut s = start_stream(&a1, &long);
    {
        use std::io::Read;
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).unwrap() > 0);
    }
    let killed = std::process::Command::new("kill")
        .args(["-9", &decode_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let events = read_sse(&mut s);
    let last = events.last().expect("events");
    assert_ne!(last, "[DONE]", "a failed stream must not end with [DONE]");
    let v: Value = serde_json::from_str(last).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    // The engine is restarted and the cluster serves again.
    let small = json!({"model": "pd", "prompt": "Foxtrot: after the storm, a calm and clear sky over the quiet harbor.", "max_tokens": 4});
    wait_for(
        "a request served after the restart",
        deadline(Duration::from_secs(30)),
        || (post_json(&a1, "/v1/completions", &small).status == 200).then_some(()),
    );

    // API keys: once the cluster has one, every agent asks for a key; revoked, it is refused.
    let out = l.pdctl(&["apikey", "create", "--name", "ci"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_string();
    assert!(key.starts_with("pdk_"), "{key}");
    let with_key = |addr: &str, key: &str| {
        http(
            addr,
            "POST",
            "/v1/completions",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &format!("Bearer {key}")),
            ],
            small.to_string().as_bytes(),
        )
        .unwrap()
    };
    for addr in [&a1, &a2] {
        wait_for(
            "the key required",
            deadline(Duration::from_secs(10)),
            || (post_json(addr, "/v1/completions", &small).status == 401).then_some(()),
        );
        let e = error_of(&post_json(addr, "/v1/completions", &small), 401);
        assert_eq!(e["code"], "invalid_api_key");
        assert_eq!(with_key(addr, &key).status, 200);
        error_of(&with_key(addr, "pdk_00000000_wrong"), 401);
        error_of(&http(addr, "GET", "/v1/models", &[], b"").unwrap(), 401);
        assert_eq!(http(addr, "GET", "/health", &[], b"").unwrap().status, 200);
    }
    let list = text(&l.pdctl(&["apikey", "list"]).stdout);
    let id = key.split('_').nth(1).unwrap();
    assert!(
        list.contains(id) && list.contains("ci") && !list.contains(&key),
        "{list}"
    );
    let out = l.pdctl(&["apikey", "revoke", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        "the revoked key refused",
        deadline(Duration::from_secs(10)),
        || (with_key(&a2, &key).status == 401).then_some(()),
    );
    // With no key left the API still asks for one, until told otherwise.
    error_of(&post_json(&a1, "/v1/completions", &small), 401);
    let out = l.pdctl(&["apikey", "require", "no"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        "the API open again",
        deadline(Duration::from_secs(10)),
        || (post_json(&a1, "/v1/completions", &small).status == 200).then_some(()),
    );
}

/// `pdctl demo --json` (the README's first command) runs both layouts to the end.
#[test]
fn demo_runs_both_layouts() {
    let _g = serial();
    let out = pdctl(&["demo", "--requests", "4", "--json"]);
    assert!(
        out.status.success(),
        "demo: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for layout in ["disaggregated", "colocated"] {
        assert_eq!(v[layout]["ok"], 4, "{v}");
        assert_eq!(v[layout]["failed"], 0, "{v}");
        assert!(v[layout]["ttft_p50_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(
        v["disaggregated"]["kv_mb_shipped"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert_eq!(v["colocated"]["kv_mb_shipped"].as_f64().unwrap(), 0.0);
}

/// `pdctl bench calibrate --json` (tiny, one short run): the engines' step-time counters fit
/// the planner and its prediction stands beside the measurement, one JSON object on stdout.
/// (Accuracy is not asserted here: a loaded CI machine is not the quiet one the README figures
/// come from.)
#[test]
fn bench_calibrate_reports_prediction_and_measurement() {
    let _g = serial();
    let out = pdctl(&[
        "bench",
        "calibrate",
        "--model",
        "tiny",
        "--requests",
        "8",
        "--reps",
        "1",
        "--json",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "{stdout}{}",
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // The report always comes; the exit status says whether the predictions held.
    assert_eq!(
        out.status.success(),
        v["within_tolerance"] == true,
        "{v}{}",
        text(&out.stderr)
    );
    if !out.status.success() {
        assert!(
            text(&out.stderr).contains("outside the stated tolerance"),
            "{}",
            text(&out.stderr)
        );
    }
    assert!(v["prefill_samples"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["decode_samples"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(v["runs"].as_array().unwrap().len(), 1, "{v}");
    for k in [
        "measured_ttft_ms",
        "predicted_ttft_ms",
        "measured_tpot_ms",
        "predicted_tpot_ms",
        "capacity_per_s",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {v}");
    }
    assert!(v["ttft_error"].as_f64().unwrap().is_finite(), "{v}");
    let out = pdctl(&["bench", "calibrate", "--model", "huge"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("tiny or small"),
        "{}",
        text(&out.stderr)
    );
}

/// A Python with the official `openai` SDK and `prometheus_client`: `PDAGENT_TEST_PYTHON`,
/// `target/pyenv` (`tests/setup.sh`), or `python3` when it has both; elsewhere the test says it
/// skipped (under CI it fails).
fn python_with_clients() -> Option<String> {
    let pyenv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    let candidates: Vec<String> = std::env::var("PDAGENT_TEST_PYTHON")
        .into_iter()
        .chain([pyenv.to_string_lossy().into_owned(), "python3".to_string()])
        .collect();
    candidates.into_iter().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import openai, prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The official OpenAI Python SDK as people use it, and the Prometheus parser on /metrics.
#[test]
fn openai_python_sdk_works() {
    let Some(py) = python_with_clients() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide a Python with openai and prometheus_client (PDAGENT_TEST_PYTHON)"
        );
        eprintln!("skipped: no Python with openai and prometheus_client (set PDAGENT_TEST_PYTHON)");
        return;
    };
    let _g = serial();
    let l = LocalCluster::up_with(2, 1, free_base(2));
    deploy(
        &l,
        &["pd", "--model", "tiny", "--prefill", "1", "--decode", "1"],
    );
    let a = format!("127.0.0.2:{}", l.api_port);
    wait_for("the API ready", deadline(Duration::from_secs(30)), || {
        http(&a, "GET", "/ready", &[], b"")
            .is_ok_and(|r| r.status == 200)
            .then_some(())
    });
    openai_sdk_client(&py, &a, "pd");
}

/// Generate legs each engine served, summed over the agents' `/metrics`.
fn generate_legs(l: &LocalCluster, nodes: u32) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for k in 1..=nodes {
        let body = metrics_of(&format!("127.0.0.{k}:{}", l.api_port));
        for line in body
            .lines()
            .filter(|l| l.starts_with("pdagent_engine_legs_total{"))
        {
            if !line.contains("leg=\"generate\"") || !line.contains("outcome=\"ok\"") {
                continue;
            }
            let engine = line
                .split("engine=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *out.entry(engine.to_string()).or_insert(0) += v as u64;
        }
    }
    out
}

/// The engine that served the one request sent between two snapshots.
fn served_by(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let grew: Vec<&String> = after
        .iter()
        .filter(|(e, n)| **n > before.get(*e).copied().unwrap_or(0))
        .map(|(e, _)| e)
        .collect();
    assert_eq!(grew.len(), 1, "{before:?} -> {after:?}");
    grew[0].clone()
}

/// Requests sharing a long prefix go to the engine that holds it, even when the tie-break
/// (both engines idle) would pick the other one.
#[test]
fn shared_prefixes_go_to_the_engine_that_holds_them() {
    let _g = serial();
    let l = LocalCluster::up_with(2, 1, free_base(2));
    deploy(&l, &["co", "--model", "tiny", "--colocated", "2"]);
    let a1 = format!("127.0.0.1:{}", l.api_port);
    wait_for("the API ready", deadline(Duration::from_secs(30)), || {
        http(&a1, "GET", "/ready", &[], b"")
            .is_ok_and(|r| r.status == 200)
            .then_some(())
    });
    // Occupy one engine with a long stream, so the first prefixed request goes to the other.
    let busy = json!({"model": "co", "prompt": "Hotel: a stream that keeps one engine busy for a while, nothing shared.", "max_tokens": 1800, "temperature": 0, "stream": true});
    let mut s = start_stream(&a1, &busy);
    {
        use std::io::Read;
        let mut buf = [0u8; 64];
        assert!(s.read(&mut buf).unwrap() > 0);
    }
    let prefix = "India: ".to_string()
        + &"a long shared system prompt about rivers, mountains and quiet harbors. ".repeat(10);
    let ask = |suffix: &str| {
        let before = generate_legs(&l, 2);
        let r = post_json(
            &a1,
            "/v1/completions",
            &json!({"model": "co", "prompt": format!("{prefix}{suffix}"), "max_tokens": 2, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        // Legs are counted when they end; wait until this one is.
        wait_for("the leg counted", deadline(Duration::from_secs(5)), || {
            let after = generate_legs(&l, 2);
            (after.values().sum::<u64>() > before.values().sum::<u64>())
                .then(|| served_by(&before, &after))
        })
    };
    let holder = ask("Question zero?");
    drop(s);
    wait_for(
        "the busy stream cancelled",
        deadline(Duration::from_secs(10)),
        || (metric(&metrics_of(&a1), "pdagent_requests_inflight") == 0).then_some(()),
    );
    // Until this agent's router sees both engines idle (load reports lag by a heartbeat and a
    // view refresh).
    wait_for(
        "both engines idle in the router's view",
        deadline(Duration::from_secs(10)),
        || {
            let m = metrics_of(&a1);
            (metric(&m, "pdagent_router_engine_load{engine=\"co/both-0\"}") == 0
                && metric(&m, "pdagent_router_engine_load{engine=\"co/both-1\"}") == 0
                && m.contains("pdagent_router_engine_load{engine=\"co/both-1\"} 0"))
            .then_some(())
        },
    );
    for q in ["Question one?", "Question two?", "Question three?"] {
        assert_eq!(
            ask(q),
            holder,
            "a request sharing the prefix went elsewhere"
        );
    }
}

/// Undeploying while a request streams: its engines drain (no new requests, the running one
/// finishes with `[DONE]`), then stop.
#[test]
fn undeploy_drains_running_requests() {
    let _g = serial();
    let l = LocalCluster::up_with(2, 1, free_base(2));
    deploy(
        &l,
        &["pd", "--model", "tiny", "--prefill", "1", "--decode", "1"],
    );
    let a1 = format!("127.0.0.1:{}", l.api_port);
    wait_for("serving", deadline(Duration::from_secs(30)), || {
        let body = json!({"model": "pd", "prompt": "Mike: warming up before the drain test starts.", "max_tokens": 2});
        http(
            &a1,
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .is_ok_and(|r| r.status == 200)
        .then_some(())
    });
    let long = json!({"model": "pd", "prompt": "November: a long answer that is still running when its deployment goes away.", "max_tokens": 1500, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let mut s = start_stream(&a1, &long);
    let mut head = [0u8; 256];
    {
        use std::io::Read;
        let n = s.read(&mut head).unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    }
    let out = l.pdctl(&["undeploy", "pd"]);
    assert!(out.status.success(), "{}", pd_tests::text(&out.stderr));
    let events = read_sse(&mut s);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{:?}",
        events.last()
    );
    let usage: Value = events
        .iter()
        .rev()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .expect("a usage chunk");
    let n = usage["completion_tokens"].as_u64().unwrap();
    // All of it: the undeploy came while it ran (one token per millisecond or so on `tiny`).
    assert_eq!(n, 1500, "{usage}");
    // Then the engines are gone.
    wait_for(
        "the engines stopped",
        deadline(Duration::from_secs(40)),
        || {
            let v: Value =
                serde_json::from_slice(&l.pdctl(&["engines", "-o", "json"]).stdout).ok()?;
            let engines_left = v["engines"].as_array()?.len();
            let procs = std::process::Command::new("pgrep")
                .args(["-f", &format!("{}.*engine serve", l.dir.path().display())])
                .output()
                .ok()?;
            (engines_left == 0 && procs.stdout.is_empty()).then_some(())
        },
    );
}

/// A deployment made again under the same engine ids starts with empty caches: the router
/// forgets what it believed the old engines held (regression: a prompt sent before was routed
/// to the new decode engine alone, as a prefix-cache hit it no longer has).
#[test]
fn a_deployment_made_again_is_not_believed_to_hold_old_prefixes() {
    let _g = serial();
    let l = LocalCluster::up_with(2, 1, free_base(2));
    let api = format!("127.0.0.1:{}", l.api_port);
    let prompt = format!(
        "Juliett: a prompt long enough to be prefilled apart. {}",
        "Rivers, mountains and quiet harbors. ".repeat(12)
    );
    let route = || {
        let r = post_json(
            &api,
            "/v1/completions",
            &json!({"model": "pd", "prompt": prompt, "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.header("x-pdagent-route").unwrap_or_default().to_string()
    };
    let up = || {
        deploy(
            &l,
            &["pd", "--model", "tiny", "--prefill", "1", "--decode", "1"],
        );
        wait_for("the API ready", deadline(Duration::from_secs(60)), || {
            http(&api, "GET", "/ready", &[], b"")
                .is_ok_and(|r| r.status == 200)
                .then_some(())
        });
    };
    up();
    assert!(route().contains("pd/prefill-0"), "disaggregated at first");
    // The decode engine holds the prompt now: served there alone.
    assert!(!route().contains("pd/prefill-0"), "a prefix-cache hit");
    let out = l.pdctl(&["undeploy", "pd"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        "the engines gone",
        deadline(Duration::from_secs(60)),
        || engines(&l).is_empty().then_some(()),
    );
    up();
    let r = route();
    assert!(
        r.contains("pd/prefill-0"),
        "the new engines hold nothing: {r}"
    );
}
