//! The re-planner's part of the replicated state (schema 4): each deployment's setting (mode
//! and bounds) and the decisions the coordinator recorded, a move included when one was made.
//! A decision and its move are one command: a new coordinator finds either both or neither.

use serde::{Deserialize, Serialize};

use super::{
    Applied, ApplyError, ClusterState, CommandResult, EngineRole, Layout, check_deployment,
};

/// Decisions kept per deployment (the oldest are forgotten first).
pub const AUTOPLAN_EVENTS_MAX: usize = 64;
/// Bounds on what one recorded decision carries.
pub const AUTOPLAN_CANDIDATES_MAX: usize = 16;
pub const AUTOPLAN_NOTES_MAX: usize = 16;
pub const AUTOPLAN_TEXT_BYTES_MAX: usize = 1024;
/// P:D ratio bounds may lie within [1/1000, 1000] (in thousandths).
pub const PD_RATIO_MILLI_MIN: u32 = 1;
pub const PD_RATIO_MILLI_MAX: u32 = 1_000_000;
/// Cool-down windows a deployment may ask for.
pub const COOLDOWN_WINDOWS_MAX: u32 = 1000;

/// Whether the coordinator re-plans a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoplanMode {
    /// Not judged at all.
    Off,
    /// Judged every window and recorded; nothing is moved.
    Advise,
    /// Judged, recorded, and the allowed move is made.
    On,
}

impl AutoplanMode {
    pub fn name(self) -> &'static str {
        match self {
            AutoplanMode::Off => "off",
            AutoplanMode::Advise => "advise",
            AutoplanMode::On => "on",
        }
    }

    pub fn parse(s: &str) -> Option<AutoplanMode> {
        match s {
            "off" => Some(AutoplanMode::Off),
            "advise" => Some(AutoplanMode::Advise),
            "on" => Some(AutoplanMode::On),
            _ => None,
        }
    }
}

/// A deployment's re-planning setting. `None` bounds take the defaults: at least two engines,
/// at most what the deployment holds plus the free GPUs, a P:D ratio within [1/16, 16], the
/// 10% gain threshold and a cool-down of 2 windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoplanSetting {
    pub mode: AutoplanMode,
    pub min_gpus: Option<u32>,
    pub max_gpus: Option<u32>,
    /// Prefill engines per decode engine, in thousandths.
    pub pd_ratio_min_milli: Option<u32>,
    pub pd_ratio_max_milli: Option<u32>,
    /// The predicted goodput gain a move must exceed, in thousandths (100: 10%).
    pub gain_threshold_milli: Option<u32>,
    /// Windows after a move during which no other move is made.
    pub cooldown_windows: Option<u32>,
    /// How far (in thousandths of SLO attainment) a forecast may miss what was measured and
    /// still count as right (150: 15 points).
    pub forecast_tolerance_milli: Option<u32>,
}

impl AutoplanSetting {
    /// Mode only, every bound at its default.
    pub fn mode(mode: AutoplanMode) -> AutoplanSetting {
        AutoplanSetting {
            mode,
            min_gpus: None,
            max_gpus: None,
            pd_ratio_min_milli: None,
            pd_ratio_max_milli: None,
            gain_threshold_milli: None,
            cooldown_windows: None,
            forecast_tolerance_milli: None,
        }
    }

    /// Refuses bounds that contradict each other or that no layout can meet, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if let (Some(lo), Some(hi)) = (self.min_gpus, self.max_gpus)
            && lo > hi
        {
            return Err(format!("min_gpus ({lo}) is above max_gpus ({hi})"));
        }
        if self.max_gpus == Some(0) {
            return Err("max_gpus: at least 1".into());
        }
        for (field, v) in [
            ("pd_ratio_min", self.pd_ratio_min_milli),
            ("pd_ratio_max", self.pd_ratio_max_milli),
        ] {
            if let Some(v) = v
                && !(PD_RATIO_MILLI_MIN..=PD_RATIO_MILLI_MAX).contains(&v)
            {
                return Err(format!(
                    "{field}: {} is outside [0.001, 1000]",
                    f64::from(v) / 1000.0
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (self.pd_ratio_min_milli, self.pd_ratio_max_milli)
            && lo > hi
        {
            return Err(format!(
                "pd_ratio_min ({}) is above pd_ratio_max ({})",
                f64::from(lo) / 1000.0,
                f64::from(hi) / 1000.0
            ));
        }
        if let Some(t) = self.gain_threshold_milli
            && t > 10_000
        {
            return Err(format!(
                "gain_threshold: {}% is above 1000%",
                f64::from(t) / 10.0
            ));
        }
        if let Some(t) = self.forecast_tolerance_milli
            && t > 1000
        {
            return Err(format!(
                "forecast_tolerance: {} is above 1",
                f64::from(t) / 1000.0
            ));
        }
        if let Some(c) = self.cooldown_windows
            && c > COOLDOWN_WINDOWS_MAX
        {
            return Err(format!(
                "cooldown_windows: {c} is above {COOLDOWN_WINDOWS_MAX}"
            ));
        }
        Ok(())
    }
}

/// A move the re-planner made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoplanMove {
    /// The deployment's engines on `node` change role to `role` (the node drains first).
    Flip { node: String, role: EngineRole },
    /// The deployment is scaled to `layout` (engines removed drain first).
    Scale { layout: Layout },
}

impl std::fmt::Display for AutoplanMove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AutoplanMove::Flip { node, role } => write!(f, "flip {node} to {role}"),
            AutoplanMove::Scale {
                layout: Layout::Disaggregated { prefill, decode },
            } => write!(f, "scale to {prefill}P{decode}D"),
            AutoplanMove::Scale {
                layout: Layout::Colocated { engines },
            } => write!(f, "scale to {engines} colocated"),
        }
    }
}

/// One candidate of a decision, as recorded (the state holds no floats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoplanScore {
    /// `keep`, `flip-p-to-d`, `add-prefill`, ...
    pub action: String,
    pub layout: Layout,
    /// Predicted share of requests within both SLOs, in millionths.
    pub attainment_ppm: Option<u32>,
    /// Predicted SLO goodput, in thousandths of a request per second.
    pub goodput_milli: Option<u64>,
    pub error: Option<String>,
}

/// One decision of the re-planner, taken or not, with what it was decided on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoplanEvent {
    /// The deployment's window count: consecutive within a coordinator's term; a new
    /// coordinator skips one (its first round only takes a baseline).
    pub window: u64,
    /// The Raft term of the coordinator that decided.
    pub term: u64,
    pub decided_unix: i64,
    pub mode: AutoplanMode,
    /// The window: its length, arrivals, requests finished and within both SLOs, and the
    /// engines whose agents answered.
    pub seconds_milli: u64,
    pub requests: u64,
    pub finished: u64,
    pub within_slo: u64,
    pub engines_reporting: u32,
    pub engines_total: u32,
    /// The layout in force.
    pub layout: Layout,
    /// The best candidate's action (`keep` when nothing beats the layout in force).
    pub best: String,
    /// Whether the rules allow the best move now.
    pub allowed: bool,
    pub reason: String,
    /// Every candidate scored, keeping first.
    pub candidates: Vec<AutoplanScore>,
    pub notes: Vec<String>,
    /// The move made with this decision (mode `on` and allowed), applied with it.
    pub moved: Option<AutoplanMove>,
}

impl AutoplanEvent {
    fn check(&self) -> Result<(), ApplyError> {
        let bad = |why: String| Err(ApplyError::BadDeployment(why));
        if self.candidates.len() > AUTOPLAN_CANDIDATES_MAX {
            return bad(format!(
                "a decision records at most {AUTOPLAN_CANDIDATES_MAX} candidates"
            ));
        }
        if self.notes.len() > AUTOPLAN_NOTES_MAX {
            return bad(format!(
                "a decision records at most {AUTOPLAN_NOTES_MAX} notes"
            ));
        }
        let texts = std::iter::once(&self.reason)
            .chain(std::iter::once(&self.best))
            .chain(&self.notes)
            .chain(self.candidates.iter().map(|c| &c.action))
            .chain(self.candidates.iter().filter_map(|c| c.error.as_ref()));
        for t in texts {
            if t.len() > AUTOPLAN_TEXT_BYTES_MAX {
                return bad(format!(
                    "a decision's texts are at most {AUTOPLAN_TEXT_BYTES_MAX} bytes"
                ));
            }
        }
        Ok(())
    }
}

impl ClusterState {
    /// A deployment's re-planning setting: the one set, else `advise` for a planned deployment
    /// and `off` for others.
    pub fn autoplan_setting(&self, deployment: &str) -> AutoplanSetting {
        self.autoplan.get(deployment).cloned().unwrap_or_else(|| {
            AutoplanSetting::mode(if self.plans.contains_key(deployment) {
                AutoplanMode::Advise
            } else {
                AutoplanMode::Off
            })
        })
    }

    /// See `Command::SetAutoplan`.
    pub(super) fn set_autoplan(
        &mut self,
        deployment: &str,
        setting: &AutoplanSetting,
    ) -> CommandResult {
        if !self.deployments.contains_key(deployment) {
            return Err(ApplyError::UnknownDeployment(deployment.to_string()));
        }
        setting.validate().map_err(ApplyError::BadDeployment)?;
        if self.autoplan_setting(deployment) == *setting {
            return Ok(Applied::Unchanged);
        }
        self.autoplan
            .insert(deployment.to_string(), setting.clone());
        Ok(Applied::Done)
    }

    /// See `Command::RecordAutoplan`.
    pub(super) fn record_autoplan(
        &mut self,
        index: u64,
        deployment: &str,
        event: &AutoplanEvent,
    ) -> CommandResult {
        let Some(d) = self.deployments.get(deployment) else {
            return Err(ApplyError::UnknownDeployment(deployment.to_string()));
        };
        event.check()?;
        let setting = self.autoplan_setting(deployment);
        if setting.mode == AutoplanMode::Off {
            return Err(ApplyError::Refused(format!(
                "re-planning is off for {deployment}"
            )));
        }
        if let Some(mv) = &event.moved {
            // Checked where it is applied: an operator's `off` or `advise`, or a scale or flip,
            // committed after the coordinator decided wins over the decision.
            if setting.mode != AutoplanMode::On {
                return Err(ApplyError::Refused(format!(
                    "re-planning of {deployment} is {}: no move is made",
                    setting.mode.name()
                )));
            }
            if d.layout != event.layout {
                return Err(ApplyError::Refused(format!(
                    "{deployment} changed since the decision (now {:?})",
                    d.layout
                )));
            }
            match mv {
                AutoplanMove::Flip { node, role } => {
                    self.flip_node(node, *role, index, Some(deployment))?;
                }
                AutoplanMove::Scale { layout } => {
                    let (engine, model, tp) = (d.engine.clone(), d.model.clone(), d.tp);
                    check_deployment(deployment, &engine, &model, tp, layout)?;
                    self.deployments
                        .get_mut(deployment)
                        .expect("present")
                        .layout = *layout;
                }
            }
        }
        let events = self
            .autoplan_events
            .entry(deployment.to_string())
            .or_default();
        events.push(event.clone());
        if events.len() > AUTOPLAN_EVENTS_MAX {
            let extra = events.len() - AUTOPLAN_EVENTS_MAX;
            events.drain(..extra);
        }
        Ok(Applied::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            s.apply(
                1,
                &Command::RegisterNode {
                    name: n.to_string(),
                    id: i as u64 + 1,
                    address: format!("127.0.0.1:{}", 7000 + i),
                    labels: Default::default(),
                },
            )
            .unwrap();
        }
        s.apply(
            2,
            &Command::CreateDeployment {
                name: "m".into(),
                engine: "builtin".into(),
                model: "tiny".into(),
                tp: 1,
                ttft_ms: Some(500),
                tpot_ms: Some(50),
                layout: Layout::Disaggregated {
                    prefill: 1,
                    decode: 2,
                },
            },
        )
        .unwrap();
        let placed = |engine: &str, role, node: &str| Placed {
            engine: engine.into(),
            role,
            node: node.into(),
            gpus: vec![0],
        };
        s.apply(
            3,
            &Command::SetAssignments {
                deployment: "m".into(),
                assignments: vec![
                    placed("m/prefill-0", EngineRole::Prefill, "a"),
                    placed("m/decode-0", EngineRole::Decode, "b"),
                    placed("m/decode-1", EngineRole::Decode, "c"),
                ],
            },
        )
        .unwrap();
        s
    }

    fn event(moved: Option<AutoplanMove>) -> AutoplanEvent {
        AutoplanEvent {
            window: 4,
            term: 2,
            decided_unix: 0,
            mode: AutoplanMode::On,
            seconds_milli: 15_000,
            requests: 10,
            finished: 10,
            within_slo: 3,
            engines_reporting: 3,
            engines_total: 3,
            layout: Layout::Disaggregated {
                prefill: 1,
                decode: 2,
            },
            best: "flip-d-to-p".into(),
            allowed: true,
            reason: "predicted goodput gain 50%".into(),
            candidates: vec![],
            notes: vec![],
            moved,
        }
    }

    fn set(s: &mut ClusterState, mode: AutoplanMode) -> CommandResult {
        s.apply(
            5,
            &Command::SetAutoplan {
                deployment: "m".into(),
                setting: AutoplanSetting::mode(mode),
            },
        )
    }

    #[test]
    fn a_deployment_is_off_unless_planned_or_set() {
        let mut s = state();
        assert_eq!(s.autoplan_setting("m").mode, AutoplanMode::Off);
        assert!(
            s.apply(
                6,
                &Command::RecordAutoplan {
                    deployment: "m".into(),
                    event: event(None),
                }
            )
            .is_err()
        );
        assert_eq!(set(&mut s, AutoplanMode::Advise), Ok(Applied::Done));
        assert_eq!(set(&mut s, AutoplanMode::Advise), Ok(Applied::Unchanged));
        assert_eq!(s.autoplan_setting("m").mode, AutoplanMode::Advise);
        // Deleting the deployment forgets its setting and its decisions.
        s.apply(7, &Command::DeleteDeployment { name: "m".into() })
            .unwrap();
        assert!(s.autoplan.is_empty() && s.autoplan_events.is_empty());
    }

    #[test]
    fn a_move_is_applied_with_its_decision_and_only_in_mode_on() {
        let mut s = state();
        let flip = Some(AutoplanMove::Flip {
            node: "c".into(),
            role: EngineRole::Prefill,
        });
        let record = |s: &mut ClusterState, e: AutoplanEvent| {
            s.apply(
                9,
                &Command::RecordAutoplan {
                    deployment: "m".into(),
                    event: e,
                },
            )
        };
        set(&mut s, AutoplanMode::Advise).unwrap();
        let before = s.clone();
        let e = record(&mut s, event(flip.clone())).unwrap_err();
        assert!(e.to_string().contains("advise"), "{e}");
        assert_eq!(s, before, "a refused decision changes nothing");
        // Advice is recorded without a move.
        record(&mut s, event(None)).unwrap();
        assert_eq!(s.autoplan_events["m"].len(), 1);
        assert_eq!(s.assignments, before.assignments);
        set(&mut s, AutoplanMode::On).unwrap();
        record(&mut s, event(flip.clone())).unwrap();
        assert_eq!(
            s.deployments["m"].layout,
            Layout::Disaggregated {
                prefill: 2,
                decode: 1
            }
        );
        let on_c: Vec<_> = s.assignments.values().filter(|a| a.node == "c").collect();
        assert_eq!(on_c.len(), 1);
        assert_eq!(on_c[0].role, EngineRole::Prefill);
        assert_eq!(on_c[0].engine, "m/prefill-1");
        // The same decision again is stale: the layout it was decided on is gone.
        let e = record(&mut s, event(flip)).unwrap_err();
        assert!(e.to_string().contains("changed since"), "{e}");
        // A scale out of bounds is refused whole.
        let mut e = event(Some(AutoplanMove::Scale {
            layout: Layout::Disaggregated {
                prefill: 0,
                decode: 1,
            },
        }));
        e.layout = s.deployments["m"].layout;
        assert!(record(&mut s, e).is_err());
        assert_eq!(s.autoplan_events["m"].len(), 2);
    }

    #[test]
    fn decisions_are_bounded() {
        let mut s = state();
        set(&mut s, AutoplanMode::Advise).unwrap();
        for w in 0..(AUTOPLAN_EVENTS_MAX as u64 + 5) {
            let mut e = event(None);
            e.window = w;
            s.apply(
                10 + w,
                &Command::RecordAutoplan {
                    deployment: "m".into(),
                    event: e,
                },
            )
            .unwrap();
        }
        let kept = &s.autoplan_events["m"];
        assert_eq!(kept.len(), AUTOPLAN_EVENTS_MAX);
        assert_eq!(kept[0].window, 5, "the oldest are forgotten first");
        let mut e = event(None);
        e.notes = vec!["x".repeat(AUTOPLAN_TEXT_BYTES_MAX + 1)];
        assert!(
            s.apply(
                99,
                &Command::RecordAutoplan {
                    deployment: "m".into(),
                    event: e,
                },
            )
            .is_err()
        );
    }

    #[test]
    fn settings_out_of_bounds_are_refused_naming_the_field() {
        let mut s = state();
        let bad = [
            (
                AutoplanSetting {
                    pd_ratio_min_milli: Some(2000),
                    pd_ratio_max_milli: Some(1000),
                    ..AutoplanSetting::mode(AutoplanMode::On)
                },
                "pd_ratio_min",
            ),
            (
                AutoplanSetting {
                    min_gpus: Some(4),
                    max_gpus: Some(2),
                    ..AutoplanSetting::mode(AutoplanMode::On)
                },
                "min_gpus",
            ),
            (
                AutoplanSetting {
                    pd_ratio_max_milli: Some(0),
                    ..AutoplanSetting::mode(AutoplanMode::On)
                },
                "pd_ratio_max",
            ),
            (
                AutoplanSetting {
                    cooldown_windows: Some(COOLDOWN_WINDOWS_MAX + 1),
                    ..AutoplanSetting::mode(AutoplanMode::On)
                },
                "cooldown_windows",
            ),
        ];
        for (setting, field) in bad {
            let e = s
                .apply(
                    5,
                    &Command::SetAutoplan {
                        deployment: "m".into(),
                        setting,
                    },
                )
                .unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
        assert!(s.autoplan.is_empty());
    }
}
