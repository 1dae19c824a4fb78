//! Configuration through the real binary: `pdagent check-config` accepts a good file and
//! refuses every bad one with exit status 64 and a message naming the field; `pdagent run`
//! refuses before binding anything.

use std::time::Duration;

use pd_tests::*;

fn check(cfg: &std::path::Path) -> (i32, String) {
    let out = pdagent(&["check-config", "--config", cfg.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stderr) + &text(&out.stdout),
    )
}

/// A good configuration passes; each broken variant exits 64 naming its field.
#[test]
fn bad_configurations_exit_64_naming_the_field() {
    let _g = serial();
    let pki = TestPki::new();
    let good = pki.node("node-1", "127.0.0.1:0");
    let (code, out) = check(&good);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("configuration is valid"), "{out}");
    let base = std::fs::read_to_string(&good).unwrap();
    pki.node("node-2", "127.0.0.1:0");
    let other_key = pki.root.path().join("node-2/pki/node.key");
    let token = std::fs::read_to_string(pki.ca_dir().join("join-token")).unwrap();
    let token = token.trim();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown field",
            format!("{base}colour = \"blue\"\n"),
            "serving.colour",
        ),
        (
            "unknown section",
            format!("{base}[rafts]\nx = 1\n"),
            "rafts",
        ),
        (
            "bad listen",
            base.replace("127.0.0.1:0", "localhost"),
            "node.listen",
        ),
        (
            "bad node name",
            base.replace("name = \"node-1\"", "name = \"Node_1\""),
            "node.name",
        ),
        (
            "datagram too small",
            format!("{base}[transport]\nmax_datagram_bytes = 500\n"),
            "transport.max_datagram_bytes",
        ),
        (
            "wrong type",
            format!("{base}[transport]\ngso = \"yes\"\n"),
            "transport.gso",
        ),
        (
            "bad log format",
            format!("{base}[log]\nformat = \"xml\"\n"),
            "log.format",
        ),
        (
            "keep-alive above idle",
            format!("{base}[transport]\nkeep_alive_ms = 60000\n"),
            "transport.keep_alive_ms",
        ),
        (
            "missing certificate",
            format!("{base}[tls]\nnode_cert = \"/nonexistent/node.crt\"\n"),
            "tls.node_cert",
        ),
        (
            "certificate of another node",
            base.replace("name = \"node-1\"", "name = \"node-9\""),
            "tls.node_cert",
        ),
        (
            "key of another certificate",
            format!("{base}[tls]\nnode_key = \"{}\"\n", other_key.display()),
            "tls.node_key",
        ),
        (
            "join token without seeds",
            format!("{base}[cluster]\njoin_token = \"{token}\"\n"),
            "cluster.join_token",
        ),
        ("not TOML", "[node\nname=".to_string(), "line 1"),
    ];
    for (what, text, field) in cases {
        let p = pki.root.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let (code, out) = check(&p);
        assert_eq!(code, 64, "{what}: expected exit 64, got {code}: {out}");
        assert!(
            out.contains(field),
            "{what}: message must name {field}: {out}"
        );
    }

    // A named file that does not exist is an error too.
    let (code, out) = check(&pki.root.path().join("absent.toml"));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("--config"), "{out}");
}

/// `pdagent run` with a bad configuration exits 64 before binding its port.
#[test]
fn run_refuses_bad_config_before_binding() {
    let _g = serial();
    let pki = TestPki::new();
    let port = free_udp_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let cfg = pki.node("node-1", &listen);
    let text0 = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text0}[transport]\nframe_bytes_max = 1\n")).unwrap();
    let mut a = Agent::start(&cfg, &[], &[]);
    let code = a.wait_exit(deadline(Duration::from_secs(10)));
    assert_eq!(code, Some(64));
    assert!(
        a.log_text().contains("transport.frame_bytes_max"),
        "{}",
        a.log_text()
    );
    // The port was never taken.
    std::net::UdpSocket::bind(("127.0.0.1", port)).expect("port still free");
}

/// Flags override the file (and are validated the same way).
#[test]
fn flags_override_the_file() {
    let _g = serial();
    let pki = TestPki::new();
    let cfg = pki.node("node-1", "127.0.0.1:0");
    let out = pdagent(&[
        "check-config",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.3:9",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("127.0.0.3:9"));
    let out = pdagent(&[
        "check-config",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("node.listen"));
}
