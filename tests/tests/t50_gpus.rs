//! `pdagent gpus` and the agent's GPU sampler through the real binary: no driver means zero
//! GPUs and exit 0, fixtures describe any fleet, a bad fixture is a configuration error, and a
//! running agent logs a GPU's health change within its sample interval.

use std::time::Duration;

use pd_tests::*;

fn fixture(name: &str) -> String {
    format!("{}/../nvml/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Without a configuration file and (here) without a driver: exit 0, `"gpus": []` and the
/// reason on stderr; with NVML present, its GPUs.
#[test]
fn gpus_json_without_driver_or_config() {
    let _g = serial();
    let out = pdagent(&["gpus", "--json", "--node-name", "host-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    match v["source"].as_str().unwrap() {
        "none" => {
            assert_eq!(v["gpus"].as_array().unwrap().len(), 0);
            assert!(
                text(&out.stderr).contains("no GPUs"),
                "{}",
                text(&out.stderr)
            );
        }
        "nvml" => assert!(v["driver_version"].is_string()),
        other => panic!("unexpected source {other}"),
    }
}

/// A fixture fleet through the CLI, as JSON and as a table.
#[test]
fn gpus_from_fixture() {
    let _g = serial();
    let f = fixture("8xh100-nvlink.toml");
    let out = pdagent(&[
        "gpus",
        "--json",
        "--node-name",
        "host-1",
        "--gpus-fixture",
        &f,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["source"], "fixture");
    assert_eq!(v["driver_version"], "550.54.15");
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 8);
    assert_eq!(gpus[7]["numa_node"], 1);
    assert_eq!(gpus[0]["nvlink_peers"].as_array().unwrap().len(), 3);
    let table = pdagent(&[
        "gpus",
        "--node-name",
        "host-1",
        "--gpus-fixture",
        &fixture("mixed-faults.toml"),
    ]);
    let t = text(&table.stdout);
    assert!(
        t.contains("NVIDIA L40S") && t.contains("degraded") && t.contains("temperature 91"),
        "{t}"
    );

    let bad = pdagent(&[
        "gpus",
        "--node-name",
        "host-1",
        "--gpus-fixture",
        "/nonexistent/gpus.toml",
    ]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(
        text(&bad.stderr).contains("gpus.fixture"),
        "{}",
        text(&bad.stderr)
    );
}

/// A running agent samples its fixture and logs the L40S going from degraded to failed when
/// it falls off the bus 2 s in.
#[test]
fn agent_logs_gpu_health_changes() {
    let _g = serial();
    let pki = TestPki::new();
    let cfg = pki.node("node-1", "127.0.0.1:0");
    let text0 = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{text0}[gpus]\nfixture = \"{}\"\nsample_interval_ms = 100\n",
            fixture("mixed-faults.toml")
        ),
    )
    .unwrap();
    let mut agent = Agent::start(&cfg, &["--log-format", "json"], &[]);
    let log = wait_for(
        "the failed GPU in the log",
        deadline(Duration::from_secs(20)),
        || {
            let log = agent.log_text();
            log.lines()
                .any(|l| l.contains("GPU health changed") && l.contains("\"to\":\"failed\""))
                .then_some(log)
        },
    );
    assert!(log.contains("critical Xid 79"), "{log}");
    assert!(
        log.contains("\"source\":\"Fixture\"") || log.contains("GPU inventory"),
        "{log}"
    );
    assert!(agent.is_running());
}
