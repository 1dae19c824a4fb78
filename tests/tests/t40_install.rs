//! The offline install script stages binaries, unit and configuration without network, and
//! never overwrites an operator's configuration; the installed configuration is accepted by the
//! installed binary's own check.

use std::process::Command;

use pd_tests::*;

#[test]
fn install_script_stages_everything_and_keeps_config() {
    let _g = serial();
    let root = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/install.sh");
    let bin_dir = bin("pdagent").parent().unwrap().to_path_buf();
    let run = || {
        Command::new("bash")
            .arg(&script)
            .args([
                "--destdir",
                root.path().to_str().unwrap(),
                "--bin-dir",
                bin_dir.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let r = root.path();
    for f in [
        "usr/local/bin/pdagent",
        "usr/local/bin/pdctl",
        "etc/systemd/system/pdagent.service",
        "etc/pdagent/pdagent.toml",
    ] {
        assert!(r.join(f).exists(), "{f} not installed");
    }
    let unit = std::fs::read_to_string(r.join("etc/systemd/system/pdagent.service")).unwrap();
    for must in [
        "Type=notify",
        "WatchdogSec=",
        "KillMode=process",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "StateDirectory=pdagent",
        "RuntimeDirectory=pdagent",
        "LimitNOFILE=",
        "DeviceAllow=/dev/nvidiactl",
        "ReadWritePaths=",
    ] {
        assert!(unit.contains(must), "unit lacks {must}");
    }
    // The installed configuration parses (it names no node, so give one on the command line;
    // certificates are not there yet, which must be the error).
    let cfg = r.join("etc/pdagent/pdagent.toml");
    let out = Command::new(r.join("usr/local/bin/pdagent"))
        .args([
            "check-config",
            "--config",
            cfg.to_str().unwrap(),
            "--node-name",
            "host-1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("tls.ca_cert"),
        "{}",
        text(&out.stderr)
    );

    // A second install keeps an edited configuration.
    std::fs::write(&cfg, "# edited\n").unwrap();
    let out = run();
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# edited\n");
}
