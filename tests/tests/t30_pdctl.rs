//! `pdctl` through the real binary: the offline PKI commands and the transport benchmark's
//! JSON output.

use pd_tests::*;

/// `cluster init` writes the five files, secrets 0600, and refuses to overwrite; `cluster cert`
/// refuses bad node names.
#[test]
fn cluster_init_and_cert() {
    use std::os::unix::fs::PermissionsExt;
    let _g = serial();
    let pki = TestPki::new();
    let ca = pki.ca_dir();
    for (f, mode) in [
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("admin.crt", 0o644),
        ("admin.key", 0o600),
        ("join-token", 0o600),
    ] {
        let m = std::fs::metadata(ca.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{f}");
    }
    let token = std::fs::read_to_string(ca.join("join-token")).unwrap();
    assert!(token.starts_with("pdj1."), "{token}");
    let again = pdctl(&["cluster", "init", "--dir", ca.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    let bad = pdctl(&[
        "cluster",
        "cert",
        "--dir",
        ca.to_str().unwrap(),
        "--node",
        "Bad.Name",
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("invalid node name"),
        "{}",
        text(&bad.stderr)
    );
    let usage = pdctl(&["cluster", "cert", "--dir", ca.to_str().unwrap()]);
    assert_eq!(
        usage.status.code(),
        Some(64),
        "missing argument is a usage error"
    );
}

/// `pdctl bench transport --json` prints exactly one JSON object with the documented keys.
#[test]
fn bench_transport_json() {
    let _g = serial();
    let out = pdctl(&[
        "bench",
        "transport",
        "--bytes",
        "16777216",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for k in [
        "quic_gbps",
        "tls_tcp_gbps",
        "tcp_gbps",
        "ratio",
        "streams",
        "datagram_bytes",
        "gso",
        "reps",
    ] {
        assert!(v.get(k).is_some(), "missing {k}: {stdout}");
    }
    assert!(v["quic_gbps"].as_f64().unwrap() > 0.0);
    assert!(v["datagram_bytes"].as_u64().unwrap() <= 9000);
}
