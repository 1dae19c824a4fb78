//! A real `pdagent run` process: it tells systemd it is ready (through a fake NOTIFY_SOCKET),
//! feeds the watchdog, answers pings over QUIC with mutual TLS, refuses foreign peers while it
//! keeps serving, logs JSON when asked, and stops cleanly on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use pd_tests::*;

fn ping(cfg: &std::path::Path, peer: &str, addr: &str) -> (i32, String) {
    let out = pdagent(&[
        "ping",
        "--config",
        cfg.to_str().unwrap(),
        "--peer",
        peer,
        "--addr",
        addr,
    ]);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

/// READY=1 once serving, WATCHDOG=1 at half the watchdog period, pings answered, and
/// STOPPING=1 then exit 0 on SIGTERM.
#[test]
fn agent_notifies_systemd_answers_pings_and_stops_on_sigterm() {
    let _g = serial();
    let pki = TestPki::new();
    let addr = format!("127.0.0.1:{}", free_udp_port("127.0.0.1"));
    let cfg1 = pki.node("node-1", &addr);
    let cfg2 = pki.node("node-2", "127.0.0.2:0");
    let sock_path = pki.root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut agent = Agent::start(
        &cfg1,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut msgs: Vec<String> = Vec::new();
    let recv = |msgs: &mut Vec<String>| {
        let mut buf = [0u8; 512];
        if let Ok(n) = sock.recv(&mut buf) {
            msgs.push(text(&buf[..n]));
        }
    };
    let until = deadline(Duration::from_secs(20));
    wait_for("READY=1", until, || {
        recv(&mut msgs);
        msgs.iter().any(|m| m.contains("READY=1")).then_some(())
    });
    let ready = msgs.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains(&format!("MAINPID={}", agent.child.id())),
        "{ready}"
    );
    wait_for("two watchdog pings", until, || {
        recv(&mut msgs);
        (msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2).then_some(())
    });

    let (code, out) = ping(&cfg2, "node-1", &addr);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pong from node-1"), "{out}");

    agent.signal("TERM");
    let code = agent.wait_exit(deadline(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "{}", agent.log_text());
    wait_for("STOPPING=1", deadline(Duration::from_secs(5)), || {
        recv(&mut msgs);
        msgs.iter().any(|m| m.contains("STOPPING=1")).then_some(())
    });
    // The port is free again.
    std::net::UdpSocket::bind(addr.as_str()).expect("port released after shutdown");
}

/// Peers with foreign certificates, impostors and garbage datagrams are refused with clear
/// errors, and the agent keeps answering good peers.
#[test]
fn agent_refuses_foreign_peers_and_keeps_serving() {
    let _g = serial();
    let pki = TestPki::new();
    let other = TestPki::new();
    let addr = format!("127.0.0.1:{}", free_udp_port("127.0.0.1"));
    let cfg1 = pki.node("node-1", &addr);
    let good = pki.node("node-2", "127.0.0.2:0");
    let foreign = other.node("node-3", "127.0.0.3:0");
    let mut agent = Agent::start(&cfg1, &["--log-format", "json"], &[]);
    let until = deadline(Duration::from_secs(20));
    wait_for("agent to answer", until, || {
        (ping(&good, "node-1", &addr).0 == 0).then_some(())
    });

    // A host from another cluster.
    let (code, out) = ping(&foreign, "node-1", &addr);
    assert_ne!(code, 0);
    assert!(
        out.contains("certificate") || out.contains("handshake"),
        "{out}"
    );
    // Our own node, but asking for the wrong name: the agent's certificate does not name it.
    let (code, out) = ping(&good, "node-7", &addr);
    assert_ne!(code, 0);
    assert!(out.contains("node-7"), "{out}");
    // Garbage datagrams at the QUIC port.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let n = 1 + (i as usize * 37) % 1400;
        let payload: Vec<u8> = (0..n)
            .map(|j| (j as u32 ^ i.wrapping_mul(31)) as u8)
            .collect();
        junk.send_to(&payload, addr.as_str()).unwrap();
    }
    let (code, out) = ping(&good, "node-1", &addr);
    assert_eq!(code, 0, "agent must still serve: {out}");
    assert!(agent.is_running());

    // Logs were JSON, one object per line, and name the refusal.
    let log = agent.log_text();
    let mut refused = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
        refused |= line.contains("refused incoming connection");
    }
    assert!(refused, "refusals are logged: {log}");
}
