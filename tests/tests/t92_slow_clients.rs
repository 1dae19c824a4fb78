//! Untrusted clients on the OpenAI port: hundreds of connections that send nothing, trickle
//! their headers or announce a body and never send it cannot hold the port. A normal client is
//! served while they are open; they are closed within the timeouts; one connection over
//! `connections_max` is answered 503.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pd_tests::*;
use serde_json::json;

const HEADER_TIMEOUT_MS: u64 = 3_000;
const BODY_TIMEOUT_MS: u64 = 3_000;
const CONNECTIONS_MAX: usize = 400;
const SILENT: usize = 120;
const TRICKLING: usize = 60;
const NO_BODY: usize = 150;

/// Reads until the server closes the connection (or `until`); returns what it sent, or None
/// when it was still open at `until`.
fn read_until_closed(s: &mut TcpStream, until: Instant) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // Reset by the server: closed.
            Err(_) => return Some(got),
        }
    }
}

fn still_open(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

#[test]
fn stalled_and_trickling_clients_cannot_hold_the_api() {
    let _g = serial();
    let l = LocalCluster::up_with(1, 1, free_base(1));
    deploy(&l, &["m", "--model", "tiny", "--colocated", "1"]);
    let dir = l.dir.path().to_str().unwrap();
    let out = pdctl(&["local", "kill", "--dir", dir, "--agent-only", "node-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cfg = l.dir.path().join("node-1").join("pdagent.toml");
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str(&format!(
        "header_read_timeout_ms = {HEADER_TIMEOUT_MS}\nbody_read_timeout_ms = {BODY_TIMEOUT_MS}\n\
         connections_max = {CONNECTIONS_MAX}\ninflight_max = 256\n"
    ));
    std::fs::write(&cfg, toml).unwrap();
    let out = pdctl(&["local", "start", "--dir", dir, "node-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let addr = format!("127.0.0.1:{}", l.api_port);
    let normal = || {
        let body = json!({"model": "m", "prompt": "Lima: a normal client.", "max_tokens": 4});
        http(
            &addr,
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    wait_for(
        "node-1 serving again",
        deadline(Duration::from_secs(60)),
        || normal().is_ok_and(|r| r.status == 200).then_some(()),
    );

    // The attackers.
    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..SILENT)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\r\n"
    );
    let mut trickling: Vec<TcpStream> = (0..TRICKLING)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let mut no_body: Vec<TcpStream> = (0..NO_BODY)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            let h = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000000\r\n\r\n{{\"model\": \"m\", \"prompt\": \""
            );
            s.write_all(h.as_bytes()).unwrap();
            s
        })
        .collect();
    // One header byte per connection every 200 ms, while a normal client asks.
    let trickle = std::thread::spawn({
        let mut socks: Vec<TcpStream> = trickling.iter().map(|s| s.try_clone().unwrap()).collect();
        let head = head.clone();
        move || {
            for b in head.as_bytes() {
                for s in &mut socks {
                    let _ = s.write_all(&[*b]);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });

    // A normal client is served while all of them are open.
    let r = normal().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let served_after = opened.elapsed();
    assert!(
        served_after < Duration::from_millis(HEADER_TIMEOUT_MS),
        "the normal client waited {served_after:?}"
    );
    assert!(silent.iter_mut().all(still_open));
    assert!(no_body.iter_mut().all(still_open));

    // Every attacker is let go within its timeout (and some slack for a loaded machine).
    let until = opened + Duration::from_millis(HEADER_TIMEOUT_MS.max(BODY_TIMEOUT_MS) + 15_000);
    for s in silent.iter_mut().chain(trickling.iter_mut()) {
        assert!(
            read_until_closed(s, until).is_some(),
            "a stalled connection was still open"
        );
    }
    let mut answered_408 = 0;
    for s in &mut no_body {
        let got = read_until_closed(s, until).expect("a body-less request was still open");
        let text = String::from_utf8_lossy(&got);
        if text.starts_with("HTTP/1.1 408") {
            assert!(text.contains("request_timeout"), "{text}");
            answered_408 += 1;
        }
    }
    assert_eq!(answered_408, NO_BODY, "each waiting body was answered 408");
    let closed_by = opened.elapsed();
    trickle.join().unwrap();
    let m = metrics_of(&addr);
    assert!(
        metric(
            &m,
            "pdagent_http_connections_closed_total{reason=\"header_timeout\"}"
        ) >= (SILENT + TRICKLING) as u64,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "pdagent_http_connections_closed_total{reason=\"body_timeout\"}"
        ) >= NO_BODY as u64,
        "{m}"
    );
    eprintln!(
        "{SILENT} silent, {TRICKLING} trickling, {NO_BODY} body-less connections: a normal \
         request served after {served_after:?}; all closed after {closed_by:?}"
    );
    drop((silent, trickling, no_body));

    // One connection over connections_max is answered 503 and closed. Filling the agent must
    // happen within one header timeout (the first connections are closed after it), which a
    // loaded machine may miss: then the slots are let come back and it is filled again.
    let mut full: Vec<TcpStream> = Vec::new();
    let text = wait_for(
        "a connection over connections_max to be answered 503",
        deadline(Duration::from_secs(60)),
        || {
            full.clear();
            wait_for(
                "the earlier connections' slots to come back",
                deadline(Duration::from_secs(20)),
                || (metric(&metrics_of(&addr), "pdagent_http_connections") <= 1).then_some(()),
            );
            let filling = Instant::now();
            let mut slowest = Duration::ZERO;
            full = (0..CONNECTIONS_MAX)
                .map(|_| {
                    let t = Instant::now();
                    let c = TcpStream::connect(&addr).unwrap();
                    slowest = slowest.max(t.elapsed());
                    c
                })
                .collect();
            // The kernel completes a handshake whatever the agent is doing, unless its accept
            // queue is full and the SYN is dropped: then the client retransmits after 1 s.
            assert!(
                slowest < Duration::from_millis(900),
                "a connection of a burst of {CONNECTIONS_MAX} took {slowest:?}: the accept queue overflowed"
            );
            let mut extra = TcpStream::connect(&addr).ok()?;
            let got = read_until_closed(&mut extra, Instant::now() + Duration::from_secs(5))?;
            let text = String::from_utf8_lossy(&got).into_owned();
            if !text.starts_with("HTTP/1.1 503") {
                eprintln!(
                    "filling {CONNECTIONS_MAX} connections took {:?}; the next was not refused: again",
                    filling.elapsed()
                );
                return None;
            }
            Some(text)
        },
    );
    assert!(text.contains("connections open"), "{text}");
    drop(full);
    wait_for(
        "normal service once they are gone",
        deadline(Duration::from_secs(30)),
        || normal().is_ok_and(|r| r.status == 200).then_some(()),
    );
}
