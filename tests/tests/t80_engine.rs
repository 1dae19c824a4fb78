//! The reference engine as processes of the real binary: `pdagent engine generate` monolithic
//! against disaggregated (KV over QUIC between two engine processes), and `pdagent engine
//! serve` under bad input, cancellation, a lost agent and its test fault knobs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pd_engine::protocol::{AgentMessage, EngineMessage};
use pd_engine::{Prompt, SamplingParams};
use pd_tests::*;
use pdagent::engine::client::EngineClient;
use serde_json::Value;

fn generate(
    model: &str,
    prompt: &str,
    max_tokens: u32,
    mode: &str,
    extra: &[&str],
) -> (Option<i32>, Value, String) {
    let mut args = vec![
        "engine", "generate", "--model", model, "--prompt", prompt, "--mode", mode, "--json",
    ];
    let n = max_tokens.to_string();
    args.extend(["--max-tokens", &n]);
    args.extend(extra);
    let out = pdagent(&args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v, text(&out.stderr))
}

/// Disaggregated generation (prefill engine process, KV over QUIC bulk streams, decode engine
/// process) gives exactly the tokens of one engine doing both, the decode engine computes no
/// prompt token, and the KV bytes are 2 x layers x kv_heads x head_dim x 4 x prompt_tokens.
#[test]
fn disaggregated_equals_monolithic_and_ships_exactly_the_kv() {
    let _g = serial();
    let cases = [
        ("tiny", "Hello", 8),
        ("tiny", "The quick brown fox jumps over the lazy dog. ", 24),
        // Longer than one scheduler step (512 tokens): a chunked prefill, several pieces per layer.
        ("tiny", &"prefill in chunks; ".repeat(40), 6),
        (
            "small",
            "Paged attention, block hashes and a KV cache that travels.",
            8,
        ),
    ];
    for (model, prompt, n) in cases {
        let (c1, mono, e1) = generate(model, prompt, n, "monolithic", &[]);
        assert_eq!(c1, Some(0), "{e1}");
        let (c2, dis, e2) = generate(model, prompt, n, "disaggregated", &[]);
        assert_eq!(c2, Some(0), "{e2}");
        assert_eq!(mono["tokens"], dis["tokens"], "{model} {prompt:?}");
        assert_eq!(mono["text"], dis["text"]);
        assert_eq!(mono["tokens"].as_array().unwrap().len(), n as usize);
        assert_eq!(dis["decode_prompt_tokens_computed"], 0, "{dis}");
        assert_eq!(mono["kv_bytes"], 0);
        let p = dis["prompt_tokens"].as_u64().unwrap();
        assert!(p >= prompt.len() as u64, "{dis}");
        let g = |k: &str| dis[k].as_u64().unwrap();
        assert_eq!(
            g("kv_bytes"),
            2 * g("kv_layers") * g("kv_heads") * g("head_dim") * g("kv_bytes_per_element") * p,
            "{dis}"
        );
        assert!(dis["ttft_ms"].as_f64().unwrap() > 0.0);
    }
    // The tiny preset's documented shape: 4 layers, 2 KV heads of 32, f32.
    let (_, dis, _) = generate("tiny", "abc", 2, "disaggregated", &[]);
    let p = dis["prompt_tokens"].as_u64().unwrap();
    assert_eq!(dis["kv_bytes"].as_u64().unwrap(), 2 * 4 * 2 * 32 * 4 * p);
}

/// A decode engine of another model refuses the KV with the reason; a prompt over the context
/// limit is refused with the limit.
#[test]
fn foreign_kv_and_oversized_prompts_are_refused() {
    let _g = serial();
    let (code, _, err) = generate(
        "tiny",
        "hello",
        4,
        "disaggregated",
        &["--decode-weights-seed", "7"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another model"), "{err}");
    let long = "x".repeat(3000);
    let (code, _, err) = generate("tiny", &long, 4, "monolithic", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("PromptTooLong"), "{err}");
    // Bad engine settings are usage errors.
    let out = pdagent(&[
        "engine",
        "bench",
        "--model",
        "tiny",
        "--compute-threads",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("compute_threads"));
}

struct Served {
    child: Child,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(socket: &Path, extra: &[&str]) -> Served {
    let child = Command::new(bin("pdagent"))
        .args(["engine", "serve", "--model", "tiny", "--socket"])
        .arg(socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Served { child }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(socket: &Path) -> EngineClient {
    EngineClient::connect(socket, "test", Duration::from_secs(60))
        .await
        .unwrap()
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// Garbage on the socket closes that connection and nothing else; a cancelled request ends
/// with `Cancelled` and its KV blocks are free at once; requests of a connection that went away
/// are cancelled; the socket is the owner's only.
#[test]
fn engine_survives_bad_input_and_frees_kv_on_cancel() {
    use std::os::unix::fs::PermissionsExt;
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("e.sock");
    let _e = serve(&sock, &[]);
    rt().block_on(async {
        let bad = connect(&sock).await;
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A frame that says 3 bytes of garbage follow, then the garbage.
        bad.send_raw(&[3, 0, 0, 0, 0xff, 0xfe, 0xfd]).await.unwrap();
        let until = deadline(Duration::from_secs(10));
        while bad.is_connected() {
            assert!(
                std::time::Instant::now() < until,
                "the engine kept a connection that sent garbage"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let c = connect(&sock).await;
        let mut rx = c
            .submit(AgentMessage::Generate {
                id: 1,
                prompt: Prompt::Text("a long story".into()),
                sampling: greedy(100_000),
            })
            .await
            .unwrap();
        // Wait for a few tokens, then cancel.
        let mut tokens = 0;
        while tokens < 3 {
            if let (EngineMessage::Token { .. }, _, _) = rx.recv().await.unwrap() {
                tokens += 1;
            }
        }
        assert!(c.stats().await.unwrap().kv_blocks_used > 0);
        c.cancel(1).await.unwrap();
        let end = loop {
            match rx.recv().await.unwrap().0 {
                EngineMessage::Finished { reason, .. } => break reason,
                EngineMessage::Token { .. } | EngineMessage::Accepted { .. } => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(end, pd_engine::FinishReason::Cancelled);
        assert_eq!(c.stats().await.unwrap().kv_blocks_used, 0);

        // A request whose connection is dropped is cancelled by the engine.
        let gone = connect(&sock).await;
        let mut rx2 = gone
            .submit(AgentMessage::Generate {
                id: 2,
                prompt: Prompt::Text("another long story".into()),
                sampling: greedy(100_000),
            })
            .await
            .unwrap();
        let _ = rx2.recv().await;
        drop(rx2);
        drop(gone);
        let until = deadline(Duration::from_secs(10));
        loop {
            let s = c.stats().await.unwrap();
            if s.running == 0 && s.kv_blocks_used == 0 {
                break;
            }
            assert!(std::time::Instant::now() < until, "{s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Still serving.
        let mut rx = c
            .submit(AgentMessage::Generate {
                id: 3,
                prompt: Prompt::Text("ok".into()),
                sampling: greedy(3),
            })
            .await
            .unwrap();
        loop {
            if let EngineMessage::Finished { output_tokens, .. } = rx.recv().await.unwrap().0 {
                assert_eq!(output_tokens, 3);
                break;
            }
        }
    });
}

/// The engine exits by itself when its agent has been gone longer than the timeout; the fault
/// knobs exist only behind `--test-faults` and crash the engine where asked.
#[test]
fn engine_exits_without_its_agent_and_obeys_test_faults() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("orphan.sock");
    let mut e = serve(&sock, &["--orphan-timeout-ms", "500"]);
    rt().block_on(async {
        let c = connect(&sock).await;
        drop(c);
    });
    let status = wait_for(
        "the orphaned engine to exit",
        deadline(Duration::from_secs(20)),
        || e.child.try_wait().unwrap(),
    );
    assert!(status.success(), "{status:?}");

    let sock = dir.path().join("crash.sock");
    let mut e = serve(&sock, &["--test-faults", "crash_after_tokens=3"]);
    rt().block_on(async {
        let c = connect(&sock).await;
        let mut rx = c
            .submit(AgentMessage::Generate {
                id: 1,
                prompt: Prompt::Text("crash soon".into()),
                sampling: greedy(50),
            })
            .await
            .unwrap();
        let mut tokens = 0;
        // The channel closes without a terminal event: the engine is gone.
        while let Some((m, _, _)) = rx.recv().await {
            assert!(!matches!(m, EngineMessage::Finished { .. }), "{m:?}");
            if matches!(m, EngineMessage::Token { .. }) {
                tokens += 1;
            }
        }
        assert!(
            (1..=3).contains(&tokens),
            "{tokens} tokens before the crash"
        );
    });
    let status = wait_for(
        "the crashing engine to exit",
        deadline(Duration::from_secs(20)),
        || e.child.try_wait().unwrap(),
    );
    assert_eq!(status.code(), Some(101));
    // A slow start delays the hello; a refuse_kv engine refuses every import; a hanging engine
    // stops answering after its tokens (the process stays).
    let sock = dir.path().join("faults.sock");
    let started = std::time::Instant::now();
    let _e = serve(
        &sock,
        &[
            "--test-faults",
            "slow_start_ms=1500,refuse_kv,hang_after_tokens=2",
        ],
    );
    rt().block_on(async {
        let c = connect(&sock).await;
        assert!(started.elapsed() >= Duration::from_millis(1500));
        let header = pd_engine::KvHeader {
            geometry: c.hello().kv,
            token_count: 1,
        };
        let mut rx = c
            .submit(AgentMessage::Decode {
                id: 9,
                header,
                prompt_tokens: vec![65],
                first_token: 66,
                sampling: greedy(4),
            })
            .await
            .unwrap();
        match rx.recv().await.unwrap().0 {
            EngineMessage::Error { kind, .. } => {
                assert_eq!(kind, pd_engine::protocol::ErrorKind::KvRefused)
            }
            other => panic!("{other:?}"),
        }
        let mut rx = c
            .submit(AgentMessage::Generate {
                id: 10,
                prompt: Prompt::Text("hang".into()),
                sampling: greedy(50),
            })
            .await
            .unwrap();
        let mut tokens = 0;
        while let Ok(Some((m, _, _))) =
            tokio::time::timeout(Duration::from_secs(3), rx.recv()).await
        {
            assert!(!matches!(m, EngineMessage::Finished { .. }), "{m:?}");
            if matches!(m, EngineMessage::Token { .. }) {
                tokens += 1;
            }
        }
        assert_eq!(tokens, 2, "a hung engine sends nothing more");
        assert!(
            tokio::time::timeout(Duration::from_secs(2), c.stats())
                .await
                .is_err(),
            "a hung engine does not answer"
        );
    });
    // Unknown faults are usage errors.
    let out = pdagent(&[
        "engine",
        "serve",
        "--socket",
        "/tmp/x.sock",
        "--test-faults",
        "explode",
    ]);
    assert_eq!(out.status.code(), Some(64));
}
