//! The decision rules on recorded windows (a capacity model stands in for the simulator),
//! then the simulator's scores on two workload shapes.

use super::*;
use crate::Calibration;
use crate::sim::tests::{measured, tiny};

/// Requests per second one prefill and one decode engine can take in the stand-in model.
const PREFILL_RPS: f64 = 3.0;
const DECODE_RPS: f64 = 10.0;

/// The stand-in model: a split meets the SLOs for the share of the load its slower role can
/// carry.
fn capacity(rate: f64) -> impl FnMut(Split) -> Result<f64, PlanError> {
    move |s: Split| {
        let carried = (s.prefill as f64 * PREFILL_RPS).min(s.decode as f64 * DECODE_RPS);
        Ok((carried / rate).min(1.0))
    }
}

fn window(rate: f64, measured: f64) -> Window {
    let seconds = 15.0;
    let arrivals = (rate * seconds).round() as u64;
    Window {
        seconds,
        arrivals,
        isl: vec![(512, arrivals)],
        osl: vec![(128, arrivals)],
        finished: 1000,
        within_slo: (measured * 1000.0).round() as u64,
        engines_reporting: 4,
        engines_total: 4,
    }
}

fn bounds() -> Bounds {
    Bounds {
        gpus_per_engine: 1,
        min_gpus: 2,
        max_gpus: 8,
        free_gpus: 0,
        pd_ratio_min: 0.25,
        pd_ratio_max: 4.0,
    }
}

const P2D2: Split = Split {
    prefill: 2,
    decode: 2,
};

/// A record of right forecasts for the windows before `index`.
fn record(index: u64, attainment: f64) -> Vec<Past> {
    (0..index)
        .map(|i| Past {
            index: i,
            predicted: Some(attainment),
            measured: Some(attainment),
            moved: false,
        })
        .collect()
}

/// `decide` at window 5 on 2P2D, `rate` req/s of which the window measured `measured` within
/// the targets, scored by the stand-in model.
fn at(rate: f64, measured: f64, bounds: &Bounds, policy: &Policy, history: &[Past]) -> Decision {
    decide(
        5,
        &window(rate, measured),
        P2D2,
        bounds,
        policy,
        history,
        capacity(rate),
    )
}

fn flip(from: Role, to: Role) -> Move {
    Move::Flip { from, to }
}

#[test]
fn a_prefill_bound_window_flips_a_decode_engine_to_prefill() {
    // 10 req/s on 2P2D: prefill carries 6 (60%); 3P1D carries 9 (90%).
    let d = at(10.0, 0.62, &bounds(), &Policy::default(), &record(5, 0.6));
    assert_eq!(d.best, flip(Role::Decode, Role::Prefill), "{d:?}");
    assert!(d.act, "{}", d.reason);
    match d.reason {
        Reason::Gain { gain } => assert!((gain - 0.5).abs() < 1e-9, "{gain}"),
        r => panic!("{r}"),
    }
    assert_eq!(d.past.predicted, Some(0.6));
    assert_eq!(d.past.measured, Some(0.62));
    // Every candidate within the bounds was scored, keeping first; none adds GPUs (none free).
    let moves: Vec<Move> = d.candidates.iter().map(|c| c.mv).collect();
    assert_eq!(moves[0], Move::Keep);
    assert!(!moves.contains(&Move::AddEngine(Role::Prefill)));
    assert!(moves.contains(&Move::RemoveEngine(Role::Decode)));
}

#[test]
fn a_decode_bound_window_flips_a_prefill_engine_to_decode() {
    // Decode-heavy: the stand-in's decode side carries less than prefill at 2P2D.
    let mut score = |s: Split| -> Result<f64, PlanError> {
        let carried = (s.prefill as f64 * 10.0).min(s.decode as f64 * 3.0);
        Ok((carried / 10.0).min(1.0))
    };
    let d = decide(
        5,
        &window(10.0, 0.6),
        P2D2,
        &bounds(),
        &Policy::default(),
        &record(5, 0.6),
        &mut score,
    );
    assert_eq!(d.best, flip(Role::Prefill, Role::Decode));
    assert!(d.act, "{}", d.reason);
}

#[test]
fn a_gain_below_the_threshold_keeps_the_layout() {
    // 6.5 req/s: 2P2D carries 6 (92%), 3P1D all of it (100%): +8%, under 10%.
    let d = at(6.5, 0.92, &bounds(), &Policy::default(), &record(5, 0.92));
    assert_eq!(d.best, flip(Role::Decode, Role::Prefill));
    assert!(!d.act);
    assert!(
        matches!(d.reason, Reason::GainBelowThreshold { gain, .. } if (gain - 1.0 / 0.923_076_923 + 1.0).abs() < 1e-6),
        "{:?}",
        d.reason
    );
    // A load every layout carries: keeping is best.
    let d = at(4.0, 1.0, &bounds(), &Policy::default(), &record(5, 1.0));
    assert_eq!(d.best, Move::Keep);
    assert!(!d.act);
    assert!(d.reason.to_string().contains("below the 10% threshold"));
}

#[test]
fn a_move_is_followed_by_a_cool_down() {
    let policy = Policy::default();
    for (moved_at, act) in [(4, false), (3, false), (2, true)] {
        let mut history = record(5, 0.6);
        history[moved_at as usize].moved = true;
        let d = at(10.0, 0.6, &bounds(), &policy, &history);
        assert_eq!(d.act, act, "moved at {moved_at}: {}", d.reason);
        if !act {
            assert!(
                matches!(d.reason, Reason::CoolingDown { .. }),
                "{}",
                d.reason
            );
        }
    }
}

#[test]
fn a_planner_whose_forecasts_miss_does_not_act() {
    let policy = Policy::default();
    // This window: predicted 60%, measured 100%; with the window before (right), 80% on
    // average: a miss of 20 points.
    let d = at(10.0, 1.0, &bounds(), &policy, &record(5, 0.6));
    assert!(!d.act);
    assert!(
        d.reason
            .to_string()
            .contains("windows 4 to 5: predicted 60%")
            && d.reason.to_string().contains("measured 80%"),
        "{}",
        d.reason
    );
    // The window before missed.
    let mut history = record(5, 0.6);
    history[4].measured = Some(0.2);
    let d = at(10.0, 0.6, &bounds(), &policy, &history);
    assert!(
        d.reason.to_string().contains("windows 4 to 5"),
        "{}",
        d.reason
    );
    // Misses that cancel out over the record are noise, not a wrong model: 50% and 70%
    // measured against 60% predicted.
    let mut history = record(5, 0.6);
    history[4].measured = Some(0.5);
    let d = at(10.0, 0.7, &bounds(), &policy, &history);
    assert!(d.act, "{}", d.reason);
    // No record yet (a new coordinator's first full window): not trusted.
    let d = decide(
        0,
        &window(10.0, 0.6),
        P2D2,
        &bounds(),
        &policy,
        &[],
        capacity(10.0),
    );
    assert!(!d.act);
    assert!(d.reason.to_string().contains("1 window(s)"), "{}", d.reason);
    // A gap in the record (windows lost with a leader change): not trusted.
    let d = decide(
        7,
        &window(10.0, 0.6),
        P2D2,
        &bounds(),
        &policy,
        &record(5, 0.6),
        capacity(10.0),
    );
    assert!(d.reason.to_string().contains("missing"), "{}", d.reason);
    // A record of one window is enough when the policy says so.
    let one = Policy {
        track_record: 1,
        ..policy
    };
    let d = decide(
        0,
        &window(10.0, 0.6),
        P2D2,
        &bounds(),
        &one,
        &[],
        capacity(10.0),
    );
    assert!(d.act, "{}", d.reason);
}

#[test]
fn moves_stay_within_the_bounds() {
    let policy = Policy::default();
    let history = record(5, 0.6);
    // At most 1 prefill per decode: no flip to 3P1D; one free GPU: 3P2D (1.5) is out too.
    let tight = Bounds {
        pd_ratio_max: 1.0,
        free_gpus: 1,
        ..bounds()
    };
    let d = at(10.0, 0.6, &tight, &policy, &history);
    assert_eq!(d.best, Move::Keep, "{:?}", d.candidates);
    assert!(d.candidates.iter().all(|c| c.split.ratio() <= 1.0));
    // With room for it, adding a prefill engine (3P2D) ties with the flip (3P1D): the flip
    // wins, it needs no new GPU.
    let roomy = Bounds {
        free_gpus: 1,
        ..bounds()
    };
    let d = at(10.0, 0.6, &roomy, &policy, &history);
    assert!(
        d.candidates
            .iter()
            .any(|c| c.mv == Move::AddEngine(Role::Prefill))
    );
    assert_eq!(d.best, flip(Role::Decode, Role::Prefill));
    // At the GPU floor nothing is removed; at the ceiling nothing is added.
    let floor = Bounds {
        min_gpus: 4,
        max_gpus: 4,
        free_gpus: 4,
        ..bounds()
    };
    let d = at(10.0, 0.6, &floor, &policy, &history);
    assert!(
        d.candidates.iter().all(|c| c.split.engines() == 4),
        "{:?}",
        d.candidates
    );
    // Never a role left empty.
    let p1d1 = Split {
        prefill: 1,
        decode: 1,
    };
    let d = decide(
        5,
        &window(10.0, 0.3),
        p1d1,
        &bounds(),
        &policy,
        &record(5, 0.3),
        capacity(10.0),
    );
    assert!(
        d.candidates
            .iter()
            .all(|c| c.split.prefill >= 1 && c.split.decode >= 1)
    );
}

#[test]
fn partial_windows_and_missing_reports() {
    let policy = Policy::default();
    let history = record(5, 0.6);
    let mut w = window(10.0, 0.6);
    w.seconds = 7.0;
    let d = decide(5, &w, P2D2, &bounds(), &policy, &history, capacity(10.0));
    assert!(!d.act);
    assert!(
        matches!(d.reason, Reason::PartialWindow { .. }),
        "{}",
        d.reason
    );
    // One of four engines silent: decided on the rest, and said so.
    let mut w = window(10.0, 0.6);
    w.engines_reporting = 3;
    let d = decide(5, &w, P2D2, &bounds(), &policy, &history, capacity(10.0));
    assert!(d.act, "{}", d.reason);
    assert!(
        d.notes.iter().any(|n| n.contains("3 of 4 engines")),
        "{:?}",
        d.notes
    );
    // Fewer than half: not acted on.
    w.engines_reporting = 1;
    let d = decide(5, &w, P2D2, &bounds(), &policy, &history, capacity(10.0));
    assert!(!d.act);
    assert!(matches!(
        d.reason,
        Reason::TooFewReports {
            reporting: 1,
            total: 4
        }
    ));
    // No traffic: nothing to plan for.
    let d = decide(
        5,
        &window(0.0, 1.0),
        P2D2,
        &bounds(),
        &policy,
        &history,
        capacity(1.0),
    );
    assert_eq!(
        (d.best, d.act, d.reason.clone()),
        (Move::Keep, false, Reason::NoTraffic)
    );
    // A candidate the model cannot score is noted and left out.
    let mut score = |s: Split| {
        if s.prefill == 3 {
            Err(PlanError::invalid("layout", "does not fit"))
        } else {
            capacity(10.0)(s)
        }
    };
    let d = decide(
        5,
        &window(10.0, 0.6),
        P2D2,
        &bounds(),
        &policy,
        &history,
        &mut score,
    );
    assert_ne!(d.best, flip(Role::Decode, Role::Prefill));
    assert!(
        d.notes.iter().any(|n| n.contains("does not fit")),
        "{:?}",
        d.notes
    );
}

/// Runs the loop over recorded loads, carrying out every move it may make, with forecasts
/// that are right: the moves made, by window.
fn replay(rates: &[f64], start: Split) -> Vec<(u64, Move, Split)> {
    let policy = Policy::default();
    let mut split = start;
    let mut history: Vec<Past> = Vec::new();
    let mut moves = Vec::new();
    for (i, &rate) in rates.iter().enumerate() {
        let measured = capacity(rate)(split).unwrap();
        let d = decide(
            i as u64,
            &window(rate, measured),
            split,
            &bounds(),
            &policy,
            &history,
            capacity(rate),
        );
        let mut past = d.past;
        if d.act {
            split = d.best.apply(split).unwrap();
            past.moved = true;
            moves.push((i as u64, d.best, split));
        }
        history.push(past);
    }
    moves
}

#[test]
fn a_load_at_a_boundary_does_not_make_it_flip_back_and_forth() {
    // Around the 2P2D/3P1D boundary: never a 10% gain, no move.
    let rates: Vec<f64> = (0..40)
        .map(|i| if i % 2 == 0 { 5.5 } else { 6.5 })
        .collect();
    assert_eq!(replay(&rates, P2D2), vec![]);
    // A real shift that stays: one move once the record allows it, then none.
    let mut rates = vec![5.0; 5];
    rates.extend([10.0; 20]);
    let moves = replay(&rates, P2D2);
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(moves[0].1, flip(Role::Decode, Role::Prefill));
    assert!(moves[0].0 >= 5 && moves[0].0 <= 6, "{moves:?}");
    // A load that swings from one side to the other every window: at most one move per
    // cool-down, never two in a row.
    let swing = |s: Split, rate: f64, prefill_heavy: bool| -> f64 {
        let (cp, cd) = if prefill_heavy {
            (3.0, 10.0)
        } else {
            (10.0, 3.0)
        };
        ((s.prefill as f64 * cp).min(s.decode as f64 * cd) / rate).min(1.0)
    };
    let policy = Policy::default();
    let mut split = P2D2;
    let mut history: Vec<Past> = Vec::new();
    let mut moved_at = Vec::new();
    for i in 0..30u64 {
        let heavy = i % 2 == 0;
        let d = decide(
            i,
            &window(10.0, swing(split, 10.0, heavy)),
            split,
            &bounds(),
            &policy,
            &history,
            |s| Ok(swing(s, 10.0, heavy)),
        );
        let mut past = d.past;
        if d.act {
            split = d.best.apply(split).unwrap();
            past.moved = true;
            moved_at.push(i);
        }
        history.push(past);
    }
    for w in moved_at.windows(2) {
        assert!(
            w[1] - w[0] > u64::from(policy.cooldown_windows),
            "{moved_at:?}"
        );
    }
}

#[test]
fn bad_bounds_and_policies_are_refused_naming_the_field() {
    let field = |e: PlanError| e.to_string();
    let b = Bounds {
        pd_ratio_min: 2.0,
        pd_ratio_max: 1.0,
        ..bounds()
    };
    assert!(field(b.validate().unwrap_err()).contains("pd_ratio_min"));
    let b = Bounds {
        min_gpus: 9,
        ..bounds()
    };
    assert!(field(b.validate().unwrap_err()).contains("min_gpus"));
    let b = Bounds {
        pd_ratio_max: f64::NAN,
        ..bounds()
    };
    assert!(field(b.validate().unwrap_err()).contains("pd_ratio_max"));
    assert!(bounds().validate().is_ok());
    let p = Policy {
        interval_s: 0.0,
        ..Policy::default()
    };
    assert!(field(p.validate().unwrap_err()).contains("interval"));
    let p = Policy {
        gain_threshold: -0.1,
        ..Policy::default()
    };
    assert!(field(p.validate().unwrap_err()).contains("gain_threshold"));
    assert!(Policy::default().validate().is_ok());
}

#[test]
fn histograms_become_draws_in_their_proportions() {
    let LengthDist::Empirical(v) =
        empirical(&vec![(100, 3), (200, 1), (u32::MAX, 0)], "ISL").unwrap()
    else {
        panic!()
    };
    assert_eq!(v.iter().filter(|&&x| x == 50).count(), 750);
    assert_eq!(v.iter().filter(|&&x| x == 150).count(), 250);
    let LengthDist::Empirical(v) = empirical(&vec![(8, 1), (u32::MAX, 1_000_000)], "OSL").unwrap()
    else {
        panic!()
    };
    // The overflow bucket draws its lower bound; a tiny bucket still draws once.
    assert!(v.contains(&4) && v.contains(&8), "{:?}", &v[..3]);
    assert!(empirical(&vec![(8, 0)], "ISL").is_err());
    assert!(empirical(&vec![(8, 1), (4, 1)], "ISL").is_err());
}

fn scorer(model: &ModelSpec) -> SimScorer<'_> {
    let cal = Calibration {
        prefill_base_s: 0.005,
        prefill_per_token_s: 1e-5,
        prefill_per_square_token_s: 0.0,
        decode_base_s: 0.010,
        decode_per_seq_s: 1e-4,
        decode_per_context_token_s: 0.0,
    };
    let perf = measured(model, cal, 4e9);
    let group = |role, max_batch, max_step_tokens| WorkerGroup {
        system: "host".into(),
        role,
        workers: 1,
        perf: perf.clone(),
        max_batch,
        max_step_tokens,
    };
    SimScorer {
        model,
        prefill: group(Role::Prefill, 0, 2048),
        decode: group(Role::Decode, 64, 0),
        slo: Slo {
            ttft_s: 1.0,
            tpot_s: 0.05,
        },
        requests: 2000,
        seed: 7,
    }
}

/// The simulator as the scorer: long prompts with short answers move an engine to prefill,
/// short prompts with long answers move one to decode, on the same 2P2D.
#[test]
fn the_simulator_moves_engines_toward_the_role_the_load_needs() {
    let model = tiny();
    let s = scorer(&model);
    let policy = Policy {
        track_record: 1,
        ..Policy::default()
    };
    for (rate, isl, osl, want) in [
        (100.0, 2000, 4, flip(Role::Decode, Role::Prefill)),
        (25.0, 50, 400, flip(Role::Prefill, Role::Decode)),
    ] {
        let mut w = window(rate, 0.0);
        // Narrow buckets around the lengths: their midpoints are the lengths.
        w.isl = vec![(isl - 1, 0), (isl + 1, 100)];
        w.osl = vec![(osl - 1, 0), (osl + 1, 100)];
        let reqs = s.requests_for(&w).unwrap();
        // The window measured what the model predicts for the layout in force.
        let now = s.attainment(P2D2, &reqs).unwrap();
        w.within_slo = (now * w.finished as f64).round() as u64;
        let d = decide(0, &w, P2D2, &bounds(), &policy, &[], |split| {
            s.attainment(split, &reqs)
        });
        let scores: Vec<String> = d
            .candidates
            .iter()
            .map(|c| format!("{} {:?}", c.split, c.prediction))
            .collect();
        assert_eq!(d.best, want, "ISL {isl} OSL {osl}: {scores:?}");
        assert!(d.act, "{}: {scores:?}", d.reason);
    }
}

#[test]
fn the_step_model_is_fitted_online_only_from_enough_steps() {
    // Steps of a known model: prefill 5 ms + 10 µs per token, decode 10 ms + 100 µs per
    // sequence.
    let prefill = |tokens: f64, steps: f64| PrefillBucket {
        steps,
        tokens: tokens * steps,
        seconds: (0.005 + 1e-5 * tokens) * steps,
    };
    let decode = |batch: f64, steps: f64| DecodeBucket {
        steps,
        sequences: batch * steps,
        seconds: (0.010 + 1e-4 * batch) * steps,
        context_tokens: 256.0,
    };
    let p = [
        prefill(128.0, 20.0),
        prefill(512.0, 20.0),
        prefill(1024.0, 20.0),
    ];
    let d = [decode(4.0, 40.0), decode(32.0, 40.0)];
    let fit = fit_online(&p, &d, 50.0);
    let c = fit.calibration.expect("fitted");
    assert!((c.prefill_base_s - 0.005).abs() < 1e-6, "{c:?}");
    assert!((c.prefill_per_token_s - 1e-5).abs() < 1e-9, "{c:?}");
    assert!((c.decode_per_seq_s - 1e-4).abs() < 1e-8, "{c:?}");
    assert_eq!((fit.prefill_steps, fit.decode_steps), (60.0, 80.0));
    // Too few steps: the roofline stands, and the counts say why.
    let fit = fit_online(&p, &d, 100.0);
    assert!(fit.calibration.is_none());
    assert!(fit.why.unwrap().contains("60 prefill and 80 decode steps"));
    // One prompt length only: enough steps, not enough shapes.
    let fit = fit_online(&[prefill(128.0, 100.0)], &d, 50.0);
    assert!(fit.why.unwrap().contains("distinct prompt lengths"));
    // An empty bucket is no sample.
    assert_eq!(PrefillBucket::default().sample(), None);
}
