//! Configuration parsing and validation: every bad field named.

use super::*;

fn err(text: &str) -> ConfigError {
    match parse_config(text) {
        Err(e) => e,
        Ok(c) => c.validate().unwrap_err(),
    }
}

#[test]
fn empty_file_is_all_defaults() {
    let c = parse_config("").unwrap();
    assert_eq!(c, AgentConfig::default());
    assert_eq!(c.node.listen, DEFAULT_LISTEN);
}

#[test]
fn the_example_config_parses_and_validates() {
    let text = include_str!("../../../systemd/pdagent.toml");
    let c = parse_config(text).unwrap();
    let v = c.validate().unwrap();
    assert_eq!(v.node_name, "node-1");
    assert_eq!(
        c.transport,
        TransportConfig::default(),
        "example documents the defaults"
    );
}

#[test]
fn unknown_fields_are_named() {
    assert_eq!(err("[node]\nnmae = \"x\"\n").field, "node.nmae");
    assert_eq!(err("bogus = 1\n").field, "bogus");
    assert_eq!(err("[transport]\nwindow = 3\n").field, "transport.window");
}

#[test]
fn bad_values_are_named() {
    assert_eq!(err("[node]\nname = \"Bad_Name\"\n").field, "node.name");
    assert_eq!(
        err("[node]\nname = \"n\"\nlisten = \"nowhere\"\n").field,
        "node.listen"
    );
    assert_eq!(
        err("[node]\nname = \"n\"\n[transport]\nmax_datagram_bytes = 100\n").field,
        "transport.max_datagram_bytes"
    );
    assert_eq!(
        err("[node]\nname = \"n\"\n[log]\nformat = \"xml\"\n").field,
        "log.format"
    );
    assert_eq!(
        err("[node]\nname = \"n\"\nworker_threads = \"two\"\n").field,
        "node.worker_threads"
    );
    assert_eq!(
        err("[node]\nname = \"n\"\n[log]\nlevel = \"[[\"\n").field,
        "log.level"
    );
}

#[test]
fn cluster_and_raft_values_are_checked() {
    assert_eq!(
        err("[node]\nname = \"n\"\n[cluster]\nvoters = 2\n").field,
        "cluster.voters"
    );
    assert_eq!(
        err("[node]\nname = \"n\"\n[cluster]\nseeds = [\"x\"]\n").field,
        "cluster.seeds"
    );
    assert_eq!(
        err("[node]\nname = \"n\"\nadvertise = \"0.0.0.0:1\"\n").field,
        "node.advertise"
    );
    assert_eq!(
        err("[node]\nname = \"n\"\n[raft]\nelection_timeout_min_ms = 100\n").field,
        "raft.election_timeout_min_ms"
    );
    let c = parse_config("[node]\nname = \"n\"\nlisten = \"0.0.0.0:7400\"\n[cluster]\nseeds = [\"node-1@127.0.0.1:7400\"]\n").unwrap();
    let v = c.validate().unwrap();
    assert_eq!(v.advertise, None);
    assert_eq!(
        v.seeds[0],
        Seed {
            name: "node-1".into(),
            address: "127.0.0.1:7400".parse().unwrap()
        }
    );
}

#[test]
fn vllm_driver_values_are_checked() {
    let v = |body: &str| err(&format!("[node]\nname = \"n\"\n[drivers.vllm]\n{body}\n"));
    assert_eq!(v("command = []").field, "drivers.vllm.command");
    assert_eq!(v("port_range = \"9000\"").field, "drivers.vllm.port_range");
    assert_eq!(
        v("port_range = \"20010-20000\"").field,
        "drivers.vllm.port_range"
    );
    assert_eq!(v("port_range = \"80-90\"").field, "drivers.vllm.port_range");
    assert_eq!(
        v("kv_buffer_device = \"gpu\"").field,
        "drivers.vllm.kv_buffer_device"
    );
    assert_eq!(
        v("start_timeout_ms = 0").field,
        "drivers.vllm.start_timeout_ms"
    );
    assert_eq!(v("kv_lease_s = 0").field, "drivers.vllm.kv_lease_s");
    assert_eq!(v("bogus = 1").field, "drivers.vllm.bogus");
    let e = v("[drivers.vllm.env]\nCUDA_VISIBLE_DEVICES = \"0\"");
    assert_eq!(e.field, "drivers.vllm.env");
    assert!(e.why.contains("CUDA_VISIBLE_DEVICES"), "{e}");
    let ok = parse_config(
        "[node]\nname = \"n\"\n[drivers.vllm]\ncommand = [\"python3\", \"-m\", \"vllm.entrypoints.openai.api_server\"]\nport_range = \"21000-21099\"\nkv_buffer_device = \"cpu\"\n[drivers.vllm.env]\nVLLM_CPU_KVCACHE_SPACE = \"1\"\n",
    )
    .unwrap();
    ok.validate().unwrap();
    assert_eq!(ok.drivers.vllm.ports().unwrap(), 21000..=21099);
}

#[test]
fn host_names_become_node_names() {
    assert_eq!(
        node_name_from_host("GPU_Host-01.example.com\n"),
        "gpu-host-01"
    );
    assert_eq!(node_name_from_host("_x_"), "x");
    assert_eq!(node_name_from_host(""), "");
}

#[test]
fn flags_override_the_file() {
    let mut c = parse_config("[node]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n").unwrap();
    c.apply(&Overrides {
        node_name: Some("b".into()),
        listen: Some("127.0.0.2:2".into()),
        ..Default::default()
    });
    let v = c.validate().unwrap();
    assert_eq!(v.node_name, "b");
    assert_eq!(v.listen, "127.0.0.2:2".parse().unwrap());
    assert_eq!(
        v.node_cert,
        PathBuf::from(DEFAULT_DATA_DIR).join("pki/node.crt")
    );
}
