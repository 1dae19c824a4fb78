//! The routing decision: cost policy, decision kinds, round-robin and random, errors.
//! Pure: no sockets, clocks or sleeps.

use pd_router::{
    Candidate, ConfigError, Decision, DecisionKind, Policy, Role, RouteError, Router, RouterConfig,
    block_hashes,
};

fn engine(name: &str, node: &str, rack: &str, role: Role) -> Candidate {
    Candidate {
        engine: name.to_owned(),
        node: node.to_owned(),
        rack: Some(rack.to_owned()),
        role,
        queued: 0,
        running: 0,
        kv_usage: 0.0,
        inflight: 0,
        available: true,
    }
}

fn prefill(name: &str, node: &str) -> Candidate {
    engine(name, node, "r1", Role::Prefill)
}

fn decode(name: &str, node: &str) -> Candidate {
    engine(name, node, "r1", Role::Decode)
}

fn router(policy: Policy) -> Router {
    Router::new(RouterConfig {
        policy,
        ..RouterConfig::default()
    })
}

/// A 2 KiB prompt (128 blocks of 16 bytes) whose first `shared` bytes come from `system`.
fn prompt(system: u8, user: u8) -> (Vec<u64>, u32) {
    let mut p = vec![b'a' + system; 1024];
    p.extend(std::iter::repeat_n(b'A' + user, 1024));
    (block_hashes(&p, 16), p.len() as u32)
}

/// Requests sharing a long prefix go to the prefill engine that holds it.
#[test]
fn prefix_affinity_picks_the_engine_holding_the_prefix() {
    let mut r = router(Policy::Cost);
    let c = [prefill("p0", "n1"), prefill("p1", "n1"), decode("d0", "n1")];
    let (first, tokens) = prompt(0, 0);
    r.record("p1", &first);
    let (second, _) = prompt(0, 1); // same 1 KiB system prompt, other user text
    let d = r.route(&second, tokens, &c).unwrap();
    assert_eq!(d.kind(), DecisionKind::Disaggregated);
    assert_eq!(d.prefill(), Some(1));
    assert_eq!((d.cached_blocks, d.prompt_blocks), (64, 128));
    let (other, _) = prompt(5, 1); // another system prompt: no overlap anywhere, lowest index
    assert_eq!(r.route(&other, tokens, &c).unwrap().prefill(), Some(0));
}

/// An engine holding the prefix loses once its queue costs more than the blocks it saves.
#[test]
fn prefix_affinity_yields_to_load() {
    let mut r = router(Policy::Cost);
    let mut c = [prefill("p0", "n1"), prefill("p1", "n1"), decode("d0", "n1")];
    let (blocks, tokens) = prompt(0, 0);
    r.record("p1", &blocks[..64]); // half the prompt cached on p1
    // p1: 64 uncached + 1 queued x 128 = 192 > p0: 128 uncached.
    c[1].queued = 1;
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().prefill(), Some(0));
    // With the whole prompt cached, one queued request is worth waiting for (128 = 128: the tie
    // goes to the lowest index, so give p0 a little load).
    r.record("p1", &blocks);
    c[0].inflight = 1;
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().prefill(), Some(1));
}

/// Without any cache, the least loaded engines win, for prefill and decode.
#[test]
fn load_balances_without_cache() {
    let mut r = router(Policy::Cost);
    let mut c = [
        prefill("p0", "n1"),
        prefill("p1", "n1"),
        decode("d0", "n1"),
        decode("d1", "n1"),
    ];
    c[0].queued = 2;
    c[1].running = 1;
    c[2].running = 5;
    c[3].running = 1;
    c[3].inflight = 2;
    let (blocks, tokens) = prompt(0, 0);
    let d = r.route(&blocks, tokens, &c).unwrap();
    assert_eq!((d.prefill(), d.decode()), (Some(1), 3));
}

/// A decode engine near full KV is avoided even when it runs fewer requests.
#[test]
fn avoids_kv_pressure() {
    let mut r = router(Policy::Cost);
    let mut c = [prefill("p0", "n1"), decode("d0", "n1"), decode("d1", "n1")];
    c[1].running = 1;
    c[1].kv_usage = 0.97; // 1 + 16 x 0.94 = 16.1 requests
    c[2].running = 4;
    c[2].kv_usage = 0.2; // 4 + 0.64
    let (blocks, tokens) = prompt(0, 0);
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().decode(), 2);
    c[2].running = 20;
    assert_eq!(
        r.route(&blocks, tokens, &c).unwrap().decode(),
        1,
        "not at any price"
    );
    c[2].running = 4;
    c[1].kv_usage = f32::NAN; // an unknown usage counts as full
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().decode(), 2);
}

/// At equal load the pair on one node beats the pair in one rack, which beats a cross-rack pair.
#[test]
fn prefers_short_transfer_distance() {
    let mut r = router(Policy::Cost);
    let (blocks, tokens) = prompt(0, 0);
    let far = engine("d-far", "n9", "r2", Role::Decode);
    let rack = engine("d-rack", "n2", "r1", Role::Decode);
    let same = engine("d-same", "n1", "r1", Role::Decode);
    let p = prefill("p0", "n1");
    let c = [p.clone(), far.clone(), rack.clone(), same];
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().decode(), 3);
    let c = [p.clone(), far.clone(), rack];
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().decode(), 2);
    // Without rack labels, another node is simply far: lowest index.
    let mut norack = engine("d-norack", "n2", "r1", Role::Decode);
    norack.rack = None;
    let c = [p, far, norack];
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().decode(), 1);
    // Distance picks the prefill engine too: the one beside the only decode engine.
    let c = [
        prefill("p-far", "n9"),
        prefill("p-near", "n1"),
        decode("d0", "n1"),
    ];
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().prefill(), Some(1));
}

/// Short prompts and cache hits on a decode engine skip remote prefill.
#[test]
fn short_prompts_run_decode_only() {
    let mut r = router(Policy::Cost);
    let c = [prefill("p0", "n1"), decode("d0", "n1"), decode("d1", "n1")];
    let short = block_hashes(&[b'x'; 20], 16);
    let d = r.route(&short, 20, &c).unwrap();
    assert_eq!(d.kind(), DecisionKind::DecodeOnly);
    assert_eq!((d.prefill(), d.decode()), (None, 1));
    // A long prompt whose prefix d1 holds: 2048 - 126 x 16 = 32 uncached tokens.
    let (blocks, tokens) = prompt(0, 0);
    r.record("d1", &blocks[..126]);
    let d = r.route(&blocks, tokens, &c).unwrap();
    assert_eq!(
        (d.kind(), d.decode(), d.cached_blocks),
        (DecisionKind::DecodeOnly, 2, 126)
    );
    // One block fewer cached: 48 tokens to compute, remote prefill again.
    r.forget_engine("d1");
    r.record("d1", &blocks[..125]);
    assert_eq!(
        r.route(&blocks, tokens, &c).unwrap().kind(),
        DecisionKind::Disaggregated
    );
    // 0 turns the shortcut off.
    let mut off = Router::new(RouterConfig {
        short_prompt_tokens: 0,
        ..RouterConfig::default()
    });
    assert_eq!(
        off.route(&short, 20, &c).unwrap().kind(),
        DecisionKind::Disaggregated
    );
}

/// Without an available prefill engine a decode engine serves alone, for every policy.
#[test]
fn no_prefill_falls_back_to_decode_only() {
    for policy in [Policy::Cost, Policy::RoundRobin, Policy::Random] {
        let mut r = router(policy);
        let mut c = [prefill("p0", "n1"), decode("d0", "n1"), decode("d1", "n1")];
        c[0].available = false;
        c[1].running = 3;
        let (blocks, tokens) = prompt(0, 0);
        let d = r.route(&blocks, tokens, &c).unwrap();
        assert_eq!(
            (d.kind(), d.prefill()),
            (DecisionKind::DecodeOnly, None),
            "{policy}"
        );
        if policy == Policy::Cost {
            assert_eq!(d.decode(), 2);
        }
    }
}

/// `Both` engines serve when there is no complete prefill + decode pair; the cost counts the
/// cache and the load.
#[test]
fn colocated_when_no_pair() {
    let mut r = router(Policy::Cost);
    let mut c = [
        engine("b0", "n1", "r1", Role::Both),
        engine("b1", "n2", "r1", Role::Both),
        engine("b2", "n3", "r1", Role::Both),
        prefill("p0", "n1"),
    ];
    c[0].running = 4;
    let (blocks, tokens) = prompt(0, 0);
    r.record("b2", &blocks);
    let d = r.route(&blocks, tokens, &c).unwrap();
    assert_eq!(d.kind(), DecisionKind::Colocated);
    assert_eq!((d.prefill(), d.decode(), d.cached_blocks), (None, 2, 128));
    c[2].queued = 2;
    assert_eq!(r.route(&blocks, tokens, &c).unwrap().decode(), 1);
    // With a complete pair, disaggregated wins over colocated.
    let mut with_pair = c.to_vec();
    with_pair.push(decode("d0", "n1"));
    let d = r.route(&blocks, tokens, &with_pair).unwrap();
    assert_eq!(
        (d.kind(), d.prefill(), d.decode()),
        (DecisionKind::Disaggregated, Some(3), 4)
    );
    assert_eq!(DecisionKind::Colocated.as_str(), "colocated");
    assert_eq!(DecisionKind::DecodeOnly.as_str(), "decode_only");
    assert_eq!(DecisionKind::Disaggregated.as_str(), "disaggregated");
}

/// An unavailable engine is never chosen, whatever it holds and however idle it is, by any
/// policy.
#[test]
fn unavailable_engines_are_never_chosen() {
    for policy in [Policy::Cost, Policy::RoundRobin, Policy::Random] {
        let mut r = router(policy);
        let mut c = [
            prefill("p0", "n1"),
            prefill("p1", "n1"),
            prefill("p2", "n1"),
            decode("d0", "n1"),
            decode("d1", "n1"),
            engine("b0", "n1", "r1", Role::Both),
        ];
        c[1].available = false;
        c[3].available = false;
        c[5].available = false;
        // The unavailable engines are idle and hold the prompt; the others are busy.
        for i in [0, 2, 4] {
            c[i].queued = 50;
        }
        let (blocks, tokens) = prompt(0, 0);
        r.record("p1", &blocks);
        r.record("d0", &blocks);
        for i in 0..50 {
            let (blocks, tokens) = if i % 2 == 0 {
                (blocks.clone(), tokens)
            } else {
                prompt(0, i as u8)
            };
            let d = r.route(&blocks, tokens, &c).unwrap();
            assert!(d.prefill().is_none_or(|p| c[p].available), "{policy} {d:?}");
            assert!(c[d.decode()].available, "{policy} {d:?}");
            assert_eq!(d.decode(), 4);
            assert_eq!(
                d.cached_blocks, 0,
                "what an unavailable engine holds does not count"
            );
        }
    }
}

/// The errors say what is missing.
#[test]
fn errors_name_what_is_missing() {
    let mut r = router(Policy::Cost);
    let (blocks, tokens) = prompt(0, 0);
    assert_eq!(r.route(&blocks, tokens, &[]), Err(RouteError::NoEngines));
    assert!(RouteError::NoEngines.to_string().contains("no engine"));
    let mut c = [
        prefill("p0", "n1"),
        prefill("p1", "n1"),
        decode("d0", "n1"),
        engine("b0", "n1", "r1", Role::Both),
    ];
    c[2].available = false;
    c[3].available = false;
    let err = r.route(&blocks, tokens, &c).unwrap_err();
    assert_eq!(
        err,
        RouteError::NoneAvailable {
            prefill: 2,
            decode: 0,
            unavailable: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "no decode or colocated engine is available (2 prefill, 0 decode ready; 2 engines not \
         ready or with an open circuit)"
    );
}

/// Round-robin cycles prefill and decode engines independently, skipping unavailable ones.
#[test]
fn round_robin_cycles() {
    let mut r = router(Policy::RoundRobin);
    let mut c = [
        prefill("p0", "n1"),
        prefill("p1", "n1"),
        prefill("p2", "n1"),
        decode("d0", "n1"),
        decode("d1", "n1"),
    ];
    let (blocks, tokens) = prompt(0, 0);
    let mut pairs = Vec::new();
    for _ in 0..6 {
        let d = r.route(&blocks, tokens, &c).unwrap();
        pairs.push((d.prefill().unwrap(), d.decode()));
    }
    assert_eq!(pairs, [(0, 3), (1, 4), (2, 3), (0, 4), (1, 3), (2, 4)]);
    c[1].available = false;
    let next: Vec<_> = (0..4)
        .map(|_| r.route(&blocks, tokens, &c).unwrap().prefill().unwrap())
        .collect();
    assert!(next.iter().all(|p| *p != 1));
    assert!(next.contains(&0) && next.contains(&2));
}

fn picks(seed: u64, n: usize) -> Vec<(Option<usize>, usize)> {
    let mut r = Router::new(RouterConfig {
        policy: Policy::Random,
        seed,
        ..RouterConfig::default()
    });
    let c: Vec<Candidate> = (0..8)
        .map(|i| prefill(&format!("p{i}"), "n1"))
        .chain((0..8).map(|i| decode(&format!("d{i}"), "n1")))
        .collect();
    let (blocks, tokens) = prompt(0, 0);
    (0..n)
        .map(|_| {
            let d: Decision = r.route(&blocks, tokens, &c).unwrap();
            (d.prefill(), d.decode())
        })
        .collect()
}

/// Random is deterministic per seed, differs between seeds and reaches every engine.
#[test]
fn random_is_deterministic_per_seed() {
    let a = picks(7, 200);
    assert_eq!(a, picks(7, 200));
    assert_ne!(a, picks(8, 200));
    for i in 0..8 {
        assert!(a.iter().any(|(p, _)| *p == Some(i)));
        assert!(a.iter().any(|(_, d)| *d == 8 + i));
    }
}

/// Cost decisions depend on the inputs and the index only.
#[test]
fn cost_is_deterministic() {
    let mut c = vec![];
    for i in 0..6 {
        c.push(prefill(&format!("p{i}"), &format!("n{}", i % 3)));
        c.push(decode(&format!("d{i}"), &format!("n{}", i % 2)));
    }
    let run = || {
        let mut r = router(Policy::Cost);
        (0..40u8)
            .map(|i| {
                let (blocks, tokens) = prompt(i % 4, i);
                let d = r.route(&blocks, tokens, &c).unwrap();
                r.record_decision(&d, &c, &blocks);
                d
            })
            .collect::<Vec<_>>()
    };
    let first = run();
    assert_eq!(first, run());
    assert!(
        first[4..].iter().all(|d| d.cached_blocks == 64),
        "{first:?}"
    );
}

/// `record_decision` fills the index for the engine that computed the prompt and the decode
/// engine; `forget_engine` clears it.
#[test]
fn record_and_forget() {
    let mut r = router(Policy::Cost);
    let c = [prefill("p0", "n1"), decode("d0", "n1")];
    let (blocks, tokens) = prompt(0, 0);
    let d = r.route(&blocks, tokens, &c).unwrap();
    r.record_decision(&d, &c, &blocks);
    assert_eq!(r.overlap("p0", &blocks), 128);
    assert_eq!(r.overlap("d0", &blocks), 128);
    assert_eq!(r.index_len(), 128);
    assert_eq!(r.index_engines(), 2);
    r.forget_engine("p0");
    assert_eq!(r.overlap("p0", &blocks), 0);
    assert_eq!(r.index_len(), 128, "d0 still holds them");
    r.forget_engine("d0");
    assert_eq!(r.index_len(), 0);
    assert_eq!(r.overlap("nobody", &blocks), 0);
}

/// The index stays within `index_entries_max`, and a request's leading blocks outlive its tail.
#[test]
fn index_bound_is_respected() {
    let mut r = Router::new(RouterConfig {
        index_entries_max: 300,
        ..RouterConfig::default()
    });
    for i in 0..20u8 {
        let (blocks, _) = prompt(i, i);
        r.record("p0", &blocks);
        assert!(r.index_len() <= 300);
    }
    assert_eq!(r.index_len(), 300);
    let (last, _) = prompt(19, 19);
    assert_eq!(r.overlap("p0", &last), 128);
    let (early, _) = prompt(0, 0);
    assert_eq!(r.overlap("p0", &early), 0);
}

/// Policies parse from their configuration names with a clear error; configs are validated.
#[test]
fn policy_names_and_config_validation() {
    for p in [Policy::Cost, Policy::RoundRobin, Policy::Random] {
        assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
        assert_eq!(p.to_string(), p.as_str());
    }
    let err = "least-loaded".parse::<Policy>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown routing policy \"least-loaded\": expected \"cost\", \"round-robin\" or \"random\""
    );
    assert_eq!(RouterConfig::default().validate(), Ok(()));
    let bad = RouterConfig {
        distance_weight: f32::NAN,
        ..RouterConfig::default()
    };
    let err: ConfigError = Router::try_new(bad).unwrap_err();
    assert_eq!(err.field, "distance_weight");
    let bad = RouterConfig {
        block_tokens: 0,
        ..RouterConfig::default()
    };
    assert_eq!(bad.validate().unwrap_err().field, "block_tokens");
    let bad = RouterConfig {
        index_entries_max: 0,
        ..RouterConfig::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("index_entries_max")
    );
}

/// Over random deployments, loads and prompts, every policy picks available engines of the
/// right roles, and fails only when no decode or colocated engine is available.
#[test]
fn random_deployments_keep_the_invariants() {
    let mut x = 0x5EED_u64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for policy in [Policy::Cost, Policy::RoundRobin, Policy::Random] {
        let mut r = Router::new(RouterConfig {
            policy,
            index_entries_max: 2000,
            ..RouterConfig::default()
        });
        for _ in 0..500 {
            let c: Vec<Candidate> = (0..next(11))
                .map(|i| {
                    let role = [Role::Prefill, Role::Decode, Role::Both][next(3) as usize];
                    let mut e = engine(
                        &format!("e{i}"),
                        &format!("n{}", next(4)),
                        &format!("r{}", next(2)),
                        role,
                    );
                    e.queued = next(5) as u32;
                    e.running = next(20) as u32;
                    e.inflight = next(3) as u32;
                    e.kv_usage = next(101) as f32 / 100.0;
                    e.available = next(4) != 0;
                    e
                })
                .collect();
            let (blocks, tokens) = prompt(next(3) as u8, next(3) as u8);
            let cut = next(blocks.len() as u64 + 1) as usize;
            let (blocks, tokens) = (&blocks[..cut], tokens * cut as u32 / blocks.len() as u32);
            let ready = |role| c.iter().filter(|e| e.available && e.role == role).count();
            match r.route(blocks, tokens, &c) {
                Ok(d) => {
                    let role = |i: usize| (c[i].available, c[i].role);
                    match d.kind() {
                        DecisionKind::Disaggregated => {
                            assert_eq!(role(d.prefill().unwrap()), (true, Role::Prefill));
                            assert_eq!(role(d.decode()), (true, Role::Decode));
                        }
                        DecisionKind::DecodeOnly => {
                            assert_eq!(d.prefill(), None);
                            assert_eq!(role(d.decode()), (true, Role::Decode));
                        }
                        DecisionKind::Colocated => {
                            assert_eq!(d.prefill(), None);
                            assert_eq!(role(d.decode()), (true, Role::Both));
                            assert!(ready(Role::Prefill) == 0 || ready(Role::Decode) == 0);
                        }
                    }
                    assert!(d.cached_blocks <= d.prompt_blocks);
                    r.record_decision(&d, &c, blocks);
                }
                Err(RouteError::NoEngines) => assert!(c.is_empty()),
                Err(RouteError::NoneAvailable { prefill, .. }) => {
                    assert_eq!((ready(Role::Decode), ready(Role::Both)), (0, 0));
                    assert_eq!(prefill, ready(Role::Prefill));
                }
            }
            assert!(r.index_len() <= 2000);
        }
    }
}
