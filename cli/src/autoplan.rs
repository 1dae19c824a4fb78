//! `pdctl autoplan` and `pdctl events`: the coordinator's re-planning, its setting per
//! deployment and its recorded decisions.

use anyhow::Result;

use crate::client::{AdminClient, segment as seg};
use crate::{block_on, print_json};

/// The bounds a deployment's re-planning moves within (absent: the defaults).
#[derive(clap::Args, Debug, Default)]
pub struct Bounds {
    /// GPUs the deployment may shrink to (default: two engines' worth).
    #[arg(long)]
    min_gpus: Option<u32>,
    /// Lowest prefill:decode engine ratio, e.g. 0.25 (default 1/16).
    #[arg(long, allow_negative_numbers = true)]
    pd_ratio_min: Option<f64>,
    /// Highest prefill:decode engine ratio, e.g. 4 (default 16).
    #[arg(long, allow_negative_numbers = true)]
    pd_ratio_max: Option<f64>,
    /// Predicted goodput gain a move must exceed, e.g. 0.10 for 10% (the default).
    #[arg(long, allow_negative_numbers = true)]
    autoplan_threshold: Option<f64>,
    /// Windows after a move during which no other move is made (default 2).
    #[arg(long)]
    autoplan_cooldown: Option<u32>,
    /// How far a forecast of SLO attainment may miss the measured one and still count as
    /// right, e.g. 0.15 for 15 points (the default); 1 turns the check off.
    #[arg(long, allow_negative_numbers = true)]
    autoplan_tolerance: Option<f64>,
}

impl Bounds {
    fn given(&self) -> bool {
        self.min_gpus.is_some()
            || self.pd_ratio_min.is_some()
            || self.pd_ratio_max.is_some()
            || self.autoplan_threshold.is_some()
            || self.autoplan_cooldown.is_some()
            || self.autoplan_tolerance.is_some()
    }

    /// The request for `mode` (none given: `advise` for a planned layout when bounds are
    /// given, else nothing: the deployment's default).
    pub fn request(
        &self,
        mode: Option<String>,
        max_gpus: Option<u32>,
        planned: bool,
    ) -> Option<pd_api::AutoplanRequest> {
        let mode = match mode {
            Some(m) => m,
            None if self.given() => if planned { "advise" } else { "off" }.to_string(),
            None => return None,
        };
        Some(pd_api::AutoplanRequest {
            mode,
            min_gpus: self.min_gpus,
            max_gpus,
            pd_ratio_min: self.pd_ratio_min,
            pd_ratio_max: self.pd_ratio_max,
            threshold: self.autoplan_threshold,
            cooldown_windows: self.autoplan_cooldown,
            forecast_tolerance: self.autoplan_tolerance,
        })
    }
}

/// `pdctl autoplan [NAME] [MODE] [--explain] [bounds]`.
pub fn run(
    c: &AdminClient,
    name: Option<String>,
    mode: Option<String>,
    explain: bool,
    max_gpus: Option<u32>,
    bounds: Bounds,
    json: bool,
) -> Result<()> {
    if mode.is_some() || bounds.given() || max_gpus.is_some() {
        let Some(name) = name else {
            anyhow::bail!(
                "name the deployment whose re-planning to set: pdctl autoplan NAME on|advise|off"
            );
        };
        let Some(mode) = mode else {
            anyhow::bail!("give the mode with the bounds: pdctl autoplan {name} on|advise|off ...");
        };
        let body = bounds
            .request(Some(mode.clone()), max_gpus, true)
            .expect("a mode was given");
        let path = format!("/v1/deployments/{}/autoplan", seg(&name));
        let v: pd_api::Changed = block_on(c.send("PUT", &path, Some(&body)))??;
        if json {
            return print_json(&v);
        }
        println!(
            "{name}: re-planning {mode}{}",
            if v.changed { "" } else { " (unchanged)" }
        );
        return Ok(());
    }
    if explain {
        let Some(name) = name else {
            anyhow::bail!("name the deployment to explain: pdctl autoplan NAME --explain");
        };
        let path = format!("/v1/events?deployment={}", seg(&name));
        let v: pd_api::Events = block_on(c.get(&path))??;
        let Some(last) = v.events.last() else {
            anyhow::bail!(
                "{name}: no decision recorded yet (planned deployments with both targets are judged every raft.autoplan_interval_ms once they have traffic; `off` records nothing)"
            );
        };
        if json {
            return print_json(last);
        }
        explain_event(last);
        // The live report adds the step-time fit the simulator used (the coordinator's).
        if let Ok(Ok(live)) = block_on(c.get::<pd_api::Autoplan>("/v1/autoplan"))
            && let Some(d) = live.deployments.iter().find(|d| d.deployment == name)
        {
            print_calibration(&d.calibration);
        }
        return Ok(());
    }
    let mut v: pd_api::Autoplan = block_on(c.get("/v1/autoplan"))??;
    if let Some(name) = &name {
        v.deployments.retain(|d| &d.deployment == name);
        if v.deployments.is_empty() {
            anyhow::bail!(
                "{name}: not re-planned (only planned deployments with --ttft-ms and --tpot-ms whose mode is not off)"
            );
        }
    }
    if json {
        print_json(&v)
    } else {
        print_autoplan(&v, name.is_some());
        Ok(())
    }
}

/// `pdctl events [NAME]`.
pub fn events(c: &AdminClient, name: Option<String>, json: bool) -> Result<()> {
    let path = match &name {
        Some(n) => format!("/v1/events?deployment={}", seg(n)),
        None => "/v1/events".to_string(),
    };
    let v: pd_api::Events = block_on(c.get(&path))??;
    if json {
        return print_json(&v);
    }
    println!(
        "{:<9} {:<20} {:>6} {:<6} {:<7} {:>7} {:<24} {:<22} REASON",
        "TIME", "DEPLOYMENT", "WINDOW", "MODE", "LAYOUT", "WITHIN", "BEST", "MOVE"
    );
    for e in &v.events {
        let d = &e.decision;
        println!(
            "{:<9} {:<20} {:>6} {:<6} {:<7} {:>7} {:<24} {:<22} {}",
            hms(d.decided_unix),
            e.deployment,
            d.window,
            d.mode.name(),
            layout_name(&d.layout),
            within(d.within_slo, d.finished),
            d.best,
            d.moved
                .as_ref()
                .map_or_else(|| "-".to_string(), |m| m.to_string()),
            d.reason
        );
    }
    Ok(())
}

fn explain_event(e: &pd_api::Event) {
    let d = &e.decision;
    println!(
        "{}: window {} (term {}), decided at {} UTC, mode {}",
        e.deployment,
        d.window,
        d.term,
        hms(d.decided_unix),
        d.mode.name()
    );
    let secs = d.seconds_milli as f64 / 1e3;
    println!(
        "  measured: {} requests in {:.1} s ({:.2} req/s), {} finished, {} within both targets ({}); {} of {} engines reporting",
        d.requests,
        secs,
        if secs > 0.0 {
            d.requests as f64 / secs
        } else {
            0.0
        },
        d.finished,
        d.within_slo,
        within(d.within_slo, d.finished),
        d.engines_reporting,
        d.engines_total
    );
    println!("  layout in force: {}", layout_name(&d.layout));
    for c in &d.candidates {
        match (c.attainment_ppm, c.goodput_milli, &c.error) {
            (Some(a), Some(g), _) => println!(
                "  {:<24} {:<7} predicted {:>5.1}% within, {:.2} req/s within both targets",
                c.action,
                layout_name(&c.layout),
                a as f64 / 1e4,
                g as f64 / 1e3
            ),
            (_, _, e) => println!(
                "  {:<24} {:<7} not scored: {}",
                c.action,
                layout_name(&c.layout),
                e.as_deref().unwrap_or("-")
            ),
        }
    }
    println!(
        "  best: {}; {}: {}",
        d.best,
        if d.allowed { "allowed" } else { "not allowed" },
        d.reason
    );
    match &d.moved {
        Some(m) => println!("  made: {m}"),
        None => println!("  made: nothing"),
    }
    for n in &d.notes {
        println!("  note: {n}");
    }
}

fn print_calibration(fits: &[pd_api::AutoplanCalibration]) {
    for f in fits {
        match &f.coefficients {
            Some(c) if f.trusted => {
                let get = |k: &str| c.get(k).copied().unwrap_or(0.0);
                println!(
                    "  step times on {} (fitted from {:.0} prefill and {:.0} decode steps): prefill {:.2} ms + {:.3} µs/token + {:.3} ns/token²; decode {:.2} ms + {:.3} ms/sequence + {:.3} µs/context token",
                    f.gpu,
                    f.prefill_steps,
                    f.decode_steps,
                    get("prefill_base_s") * 1e3,
                    get("prefill_per_token_s") * 1e6,
                    get("prefill_per_square_token_s") * 1e9,
                    get("decode_base_s") * 1e3,
                    get("decode_per_seq_s") * 1e3,
                    get("decode_per_context_token_s") * 1e6,
                );
            }
            _ => println!(
                "  step times on {}: the roofline ({})",
                f.gpu,
                f.why.as_deref().unwrap_or("not fitted")
            ),
        }
    }
}

/// `pdctl autoplan`: one line per deployment; `detail` adds every candidate, the notes and
/// the step-time fit.
fn print_autoplan(v: &pd_api::Autoplan, detail: bool) {
    println!(
        "{:<20} {:<6} {:>7} {:>9} {:>8} {:<8} {:<24} {:<8} REASON",
        "DEPLOYMENT", "MODE", "WINDOW", "REQ/S", "WITHIN", "LAYOUT", "BEST", "ALLOWED"
    );
    for d in &v.deployments {
        let best = if d.best == "keep" || d.best_layout.is_empty() {
            d.best.clone()
        } else {
            format!("{} ({})", d.best, d.best_layout)
        };
        println!(
            "{:<20} {:<6} {:>7} {:>9.2} {:>8} {:<8} {:<24} {:<8} {}",
            d.deployment,
            d.mode,
            d.window,
            d.rate_per_s,
            within(d.within_slo, d.judged),
            d.layout,
            best,
            if d.allowed { "yes" } else { "no" },
            d.reason
        );
        if let Some(m) = &d.moved {
            println!("  made: {m}");
        }
        if detail {
            println!(
                "  window: {:.1} s, {} requests, {} judged against the targets, {} of {} engines reporting",
                d.seconds, d.requests, d.judged, d.engines_reporting, d.engines_total
            );
            for c in &d.candidates {
                match (&c.attainment, &c.goodput_rps, &c.error) {
                    (Some(a), Some(g), _) => println!(
                        "  {:<24} {:<8} predicted {:>5.1}% within, {:.2} req/s",
                        c.action,
                        c.layout,
                        a * 100.0,
                        g
                    ),
                    (_, _, e) => println!(
                        "  {:<24} {:<8} not scored: {}",
                        c.action,
                        c.layout,
                        e.as_deref().unwrap_or("-")
                    ),
                }
            }
            for n in &d.notes {
                println!("  note: {n}");
            }
            print_calibration(&d.calibration);
        }
    }
}

fn within(within: u64, of: u64) -> String {
    if of > 0 {
        format!("{:.0}%", 100.0 * within as f64 / of as f64)
    } else {
        "-".into()
    }
}

pub fn layout_name(l: &pd_api::Layout) -> String {
    match l {
        pd_api::Layout::Disaggregated { prefill, decode } => format!("{prefill}P{decode}D"),
        pd_api::Layout::Colocated { engines } => format!("{engines}C"),
    }
}

/// `HH:MM:SS` of a unix time, UTC.
fn hms(unix: i64) -> String {
    let s = unix.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
