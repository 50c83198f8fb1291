//! The firewall's health as heartbeats and `get_state` report it under the key `firewall`
//! (upstream directors ignore keys they do not know), and the alert a degraded firewall
//! raises. Pure: computed from the state machine's [`RuntimeState`].

use platform::firewall::readback::ForeignJobRule;
use platform::firewall::state::{Mode, MonitState, NatsState, RuntimeState};
use serde::Serialize;
use serde_json::{Value, json};

/// What is wrong with the firewall, one problem each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Cgroup matching was proved not to work; the uid fallback still protects.
    UidFallback { reason: Option<String> },
    /// The last change of the table failed (nft's message).
    ChangeFailed(String),
    /// The live table cannot be listed (nft's message): drift is neither seen nor repaired.
    ReadBackFailed(String),
    /// A rule of `monit_access_jobs` that is not a job rule could not be removed.
    ForeignRuleKept(ForeignJobRule),
    /// The workload policies of agent.json were refused; the live ones were left as they were.
    PolicyRefused(String),
    /// Switched traffic on a bridge bypasses the egress deny list.
    BridgeNetfilter(String),
}

impl Problem {
    /// Whether the firewall may not protect what it should (critical), as opposed to
    /// protecting in a weaker way (the uid fallback: a warning).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Problem::UidFallback { .. })
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::UidFallback { reason } => write!(
                f,
                "cgroup matching unavailable, uid fallback: {}",
                reason.as_deref().unwrap_or("reason unknown")
            ),
            Problem::ChangeFailed(e) => write!(f, "the last firewall change failed: {e}"),
            Problem::ReadBackFailed(e) => write!(
                f,
                "the live firewall cannot be read back, drift is not repaired: {e}"
            ),
            Problem::ForeignRuleKept(r) => write!(
                f,
                "monit_access_jobs holds a rule that is not a job rule and could not be removed: {r}"
            ),
            Problem::PolicyRefused(e) => write!(
                f,
                "the workload firewall policies were refused and left as they were: {e}"
            ),
            Problem::BridgeNetfilter(e) => write!(f, "{e}"),
        }
    }
}

impl Serialize for Problem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The firewall's health. `degraded` is true exactly when there is a problem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    pub degraded: bool,
    pub problems: Vec<Problem>,
    pub mode: Mode,
    pub identity: String,
    pub monit: MonitState,
    pub nats: NatsState,
    pub repairs: u64,
    pub foreign_removed: u64,
    /// How the workload policies match where that is weaker than asked (the uid fallback,
    /// monit's cgroup unknown): not problems, but worth knowing.
    pub notes: Vec<String>,
}

impl Health {
    /// The health a state shows.
    pub fn of(st: &RuntimeState) -> Health {
        let mut problems = Vec::new();
        if st.mode == Mode::Uid {
            problems.push(Problem::UidFallback {
                reason: st.fallback_reason.clone(),
            });
        }
        if let Some(e) = &st.last_error {
            problems.push(Problem::ChangeFailed(e.clone()));
        }
        if let Some(e) = &st.readback_error {
            problems.push(Problem::ReadBackFailed(e.clone()));
        }
        for f in &st.foreign_job_rules {
            problems.push(Problem::ForeignRuleKept(f.clone()));
        }
        if let Some(e) = &st.workload_refused {
            problems.push(Problem::PolicyRefused(e.clone()));
        }
        if let Some(e) = &st.bridge_error {
            problems.push(Problem::BridgeNetfilter(e.clone()));
        }
        Health {
            degraded: !problems.is_empty(),
            problems,
            mode: st.mode,
            identity: st.identity.clone(),
            monit: st.monit,
            nats: st.nats,
            repairs: st.repairs,
            foreign_removed: st.foreign_removed,
            notes: st.workload_notes.clone(),
        }
    }

    /// The alert for a degraded firewall (upstream's alert shape, on `hm.agent.alert.<id>`),
    /// or `None` when it is healthy. A failure is critical (2); the uid fallback alone, which
    /// still protects, is a warning (4).
    pub fn alert(&self, now_unix: i64) -> Option<Value> {
        if !self.degraded {
            return None;
        }
        let failed = self.problems.iter().any(Problem::is_failure);
        let summary: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        Some(json!({
            "id": format!("bosh-agent-firewall-{now_unix}-{}", std::process::id()),
            "severity": if failed { 2 } else { 4 },
            "title": "bosh-agent firewall - degraded - alert",
            "summary": summary.join("; "),
            "created_at": now_unix,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn report_of(st: &RuntimeState) -> Value {
        serde_json::to_value(Health::of(st)).unwrap()
    }

    #[test]
    fn a_healthy_state_reports_no_problem_and_no_alert() {
        let st = RuntimeState {
            mode: Mode::Cgroup,
            identity: "cgroup v2 at level 2 (unified/a)".into(),
            ..RuntimeState::default()
        };
        let r = report_of(&st);
        assert_eq!(r["degraded"], false);
        assert_eq!(r["problems"], json!([]));
        assert_eq!(r["mode"], "cgroup");
        for key in [
            "degraded",
            "problems",
            "mode",
            "identity",
            "monit",
            "nats",
            "repairs",
            "foreign_removed",
        ] {
            assert!(r.get(key).is_some(), "{key}");
        }
        assert_eq!(Health::of(&st).alert(1), None);
    }

    #[test]
    fn fallback_warns_and_a_failed_change_is_critical() {
        let fallback = RuntimeState {
            mode: Mode::Uid,
            fallback_reason: Some("v1 only".into()),
            ..RuntimeState::default()
        };
        let r = report_of(&fallback);
        assert_eq!(r["degraded"], true);
        assert_eq!(r["mode"], "uid");
        let a = Health::of(&fallback).alert(1_700_000_000).unwrap();
        assert_eq!(a["severity"], 4);
        assert_eq!(a["created_at"], 1_700_000_000);
        assert!(a["summary"].as_str().unwrap().contains("v1 only"));
        let failed = RuntimeState {
            mode: Mode::Cgroup,
            last_error: Some("nft: Error: Could not process rule".into()),
            ..RuntimeState::default()
        };
        let a = Health::of(&failed).alert(5).unwrap();
        assert_eq!(a["severity"], 2);
        assert!(
            a["summary"]
                .as_str()
                .unwrap()
                .contains("Could not process rule")
        );
        for key in ["id", "severity", "title", "summary", "created_at"] {
            assert!(a.get(key).is_some(), "upstream's alert has {key}");
        }
    }

    #[test]
    fn a_foreign_job_rule_that_could_not_be_removed_is_critical() {
        let st = RuntimeState {
            mode: Mode::Cgroup,
            foreign_job_rules: vec![ForeignJobRule {
                handle: 7,
                comment: None,
                why: "it lets every process through".into(),
            }],
            ..RuntimeState::default()
        };
        let r = report_of(&st);
        assert_eq!(r["degraded"], true);
        let a = Health::of(&st).alert(1).unwrap();
        assert_eq!(a["severity"], 2);
        assert!(a["summary"].as_str().unwrap().contains("handle 7"), "{a}");
    }
}
