//! One-shot commands: `firewall-allow monit|metadata` (job scripts) and `firewall status`
//! (operators).

use std::path::Path;

use platform::cgroup;
use platform::firewall::jobs::{self, AllowOutcome};
use platform::firewall::nft::Nft;
use platform::firewall::state::{self, RuntimeState};
use platform::firewall::status::{self as fwstatus, ConntrackUsage, PolicyCounter};
use platform::firewall::{FirewallError, readback};
use serde::Serialize;

/// Why `firewall-allow` failed, with its documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum AllowError {
    #[error("firewall-allow must run as root (euid {0})")]
    NotRoot(u32),
    #[error("unknown service {0:?}: only \"monit\" and \"metadata\" can be allowed")]
    UnknownService(String),
    #[error("{0}")]
    NoIdentity(String),
    #[error("{0}")]
    Firewall(FirewallError),
}

impl AllowError {
    /// Exit code (README "Exit codes").
    pub fn exit_code(&self) -> u8 {
        match self {
            AllowError::Firewall(_) => 1,
            AllowError::UnknownService(_) => 2,
            AllowError::NotRoot(_) => 3,
            AllowError::NoIdentity(_) => 4,
        }
    }
}

impl From<FirewallError> for AllowError {
    /// The caller's cgroup being unusable (the root cgroup, a path nft cannot express, a
    /// cgroup that cannot be found) is [`AllowError::NoIdentity`] (exit 4), whatever layer
    /// noticed it; everything else is a firewall error (exit 1).
    fn from(e: FirewallError) -> Self {
        use platform::cgroup::CgroupError;
        match e {
            FirewallError::NoIdentity(m) => AllowError::NoIdentity(m),
            FirewallError::Cgroup(
                e @ (CgroupError::InvalidPath { .. }
                | CgroupError::NotFound { .. }
                | CgroupError::NoV2Line { .. }),
            ) => AllowError::NoIdentity(format!("the caller's cgroup cannot be used: {e}")),
            other => AllowError::Firewall(other),
        }
    }
}

/// Allows the calling process's cgroup (the job's) to reach `service`: `monit` (the monit
/// chain's job rules) or `metadata` (through the egress deny list, on the same mechanics:
/// rules that survive agent restarts, pruned once their cgroup is gone).
pub fn firewall_allow(service: &str, run_dir: &Path) -> Result<AllowOutcome, AllowError> {
    if service != "monit" && service != "metadata" {
        return Err(AllowError::UnknownService(service.to_string()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return Err(AllowError::NotRoot(euid));
    }
    let agent = state::read(run_dir).ok().flatten();
    if service == "metadata" {
        let vcap = crate::firewall::vcap_uid();
        let placement = cgroup::placement_of(std::process::id());
        let (rule, key, cgid) = jobs::caller_rule(placement, agent.as_ref(), vcap)?;
        let key = jobs::metadata_key(&key);
        let rule = jobs::metadata_rule(rule, &key, cgid)?;
        return Ok(jobs::allow_metadata(
            &Nft::default(),
            run_dir,
            &rule,
            &key,
            cgid,
        )?);
    }
    if agent.as_ref().is_some_and(|a| !a.monit.guarded()) {
        // UseMonitIptablesFirewall: nothing jumps to the jobs chain, so a rule there would
        // open nothing; the stemcell's own rules decide.
        return Ok(AllowOutcome::NotInstalled);
    }
    let vcap = crate::firewall::vcap_uid();
    let placement = cgroup::placement_of(std::process::id());
    let (rule, key, cgid) = jobs::caller_rule(placement, agent.as_ref(), vcap)?;
    Ok(jobs::allow_monit(
        &Nft::default(),
        run_dir,
        &rule,
        &key,
        cgid,
    )?)
}

/// What `firewall reload` found when the agent applied the policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadReport {
    /// The agent that was signalled.
    pub pid: u32,
    /// Its count of finished reloads, this one included.
    pub reloads: u64,
}

/// Why `firewall reload` failed (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum ReloadCmdError {
    #[error(transparent)]
    NoAgent(#[from] crate::lifecycle::pidfile::PidError),
    #[error("reading the agent's state: {0}")]
    State(FirewallError),
    #[error(
        "the firewall state file was written by pid {written_by}, not by the agent (pid {pid}) the pid file names"
    )]
    NotItsState { pid: u32, written_by: u32 },
    #[error("signalling the agent (pid {pid}): {source}")]
    Signal { pid: u32, source: nix::errno::Errno },
    #[error("the agent (pid {pid}) changed nothing: {error}")]
    Refused { pid: u32, error: String },
    #[error("the agent (pid {pid}) exited before it reported the reload")]
    Exited { pid: u32 },
    #[error(
        "the agent (pid {pid}) did not report the reload within {} s (still waiting for the firewall lock?)",
        .waited.as_secs()
    )]
    Timeout {
        pid: u32,
        waited: std::time::Duration,
    },
}

/// Asks the running agent to reload its firewall policies from agent.json (SIGHUP to the pid
/// of `<run dir>/bosh-agent.pid`, checked to be a live `bosh-agent`) and waits, up to `wait`,
/// until its state file records the outcome of that reload: `Ok` when the policies are in
/// force, the agent's own error (naming the file and the value) when it changed nothing.
pub fn firewall_reload(
    run_dir: &Path,
    wait: std::time::Duration,
) -> Result<ReloadReport, ReloadCmdError> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = crate::lifecycle::pidfile::running_agent(run_dir)?;
    let its_state = |st: Option<RuntimeState>| -> Result<RuntimeState, ReloadCmdError> {
        let st = st.unwrap_or_default();
        if st.agent_pid != pid {
            return Err(ReloadCmdError::NotItsState {
                pid,
                written_by: st.agent_pid,
            });
        }
        Ok(st)
    };
    let before = its_state(state::read(run_dir).map_err(ReloadCmdError::State)?)?.reloads;
    let raw = i32::try_from(pid).map_err(|_| ReloadCmdError::Signal {
        pid,
        source: nix::errno::Errno::ESRCH,
    })?;
    kill(Pid::from_raw(raw), Signal::SIGHUP)
        .map_err(|source| ReloadCmdError::Signal { pid, source })?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        // A state file being replaced reads as the old or the new one (rename): never torn.
        let st = its_state(state::read(run_dir).map_err(ReloadCmdError::State)?)?;
        if st.reloads > before {
            return match st.reload_error {
                None => Ok(ReloadReport {
                    pid,
                    reloads: st.reloads,
                }),
                Some(error) => Err(ReloadCmdError::Refused { pid, error }),
            };
        }
        if !agent_alive(pid) {
            return Err(ReloadCmdError::Exited { pid });
        }
        if std::time::Instant::now() >= deadline {
            return Err(ReloadCmdError::Timeout { pid, waited: wait });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What `firewall status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The agent's state file, if an agent has written one.
    pub agent: Option<RuntimeState>,
    /// Whether `inet bosh_agent` exists.
    pub table_present: bool,
    /// Whether the live agent-owned chains and sets equal those of the agent's last apply.
    pub matches_desired: bool,
    /// Rules of `monit_access_jobs`.
    pub job_rules: Vec<readback::LiveJobRule>,
    /// Rules of `egress_access_jobs`: the jobs `firewall-allow metadata` let through the
    /// egress deny list (empty when there is no deny list).
    pub metadata_rules: Vec<readback::LiveJobRule>,
    /// Rules of `monit_access_jobs` that are none of the job-rule shapes: drift, which the
    /// agent removes at its next reconcile. While one is there, the table does not match.
    pub foreign_job_rules: Vec<readback::ForeignJobRule>,
    /// What is wrong, one line each (empty when the live table matches).
    pub problems: Vec<String>,
    /// The workload policies' counters (packets dropped per policy); empty without them.
    pub counters: Vec<PolicyCounter>,
    /// Conntrack usage (`None` when conntrack is not loaded).
    pub conntrack: Option<ConntrackUsage>,
    /// What the operator should know although the table matches: refused policies, bridged
    /// traffic bypassing the deny list, a conntrack table above 80 %, weaker matching.
    pub warnings: Vec<String>,
}

/// How long `firewall status` waits for a running agent's pending read-back.
const READBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a process with this pid exists (the agent that wrote the state file).
fn agent_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Reads the agent's state and the live table.
pub fn firewall_status(run_dir: &Path) -> Result<Status, FirewallError> {
    let mut agent = state::read(run_dir)?;
    // A running agent reads its first apply back right after start; give it that moment
    // rather than report "not compared yet".
    let deadline = std::time::Instant::now() + READBACK_WAIT;
    while agent
        .as_ref()
        .is_some_and(|a| a.readback_pending && agent_alive(a.agent_pid))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
        agent = state::read(run_dir)?;
    }
    let nft = Nft::default();
    let live = nft.list_table_text()?.map(|l| readback::snapshot(&l));
    let jobs_listing = nft.list_chain(platform::firewall::MONIT_JOBS_CHAIN)?;
    let job_rules = match &jobs_listing {
        Some(l) => readback::job_rules(l)?,
        None => Vec::new(),
    };
    let metadata_rules = match nft.list_chain(platform::firewall::EGRESS_JOBS_CHAIN)? {
        Some(l) => readback::job_rules_in(
            &l,
            platform::firewall::EGRESS_JOBS_CHAIN,
            platform::firewall::METADATA_COMMENT_PREFIX,
        )?,
        None => Vec::new(),
    };
    // Where the agent guards monit, every rule its jobs chain holds is reached by packets to
    // monit: one that is not a job rule may open it to everyone.
    let foreign_job_rules = match (&jobs_listing, &agent) {
        (Some(l), Some(a)) if a.monit.guarded() => {
            readback::foreign_job_rules(l, crate::firewall::vcap_uid())?
        }
        _ => Vec::new(),
    };
    let table_present = live.is_some();
    let chains_match = match (&agent, &live) {
        (Some(a), Some(l)) => !a.readback_pending && &a.snapshot == l,
        _ => false,
    };
    let matches_desired = chains_match && foreign_job_rules.is_empty();
    let mut problems = Vec::new();
    match (&agent, table_present) {
        (None, _) => problems.push("no agent state file: the agent has not run".to_string()),
        (Some(_), false) => problems.push(format!(
            "table inet {} is absent",
            platform::firewall::TABLE
        )),
        (Some(a), true) if a.readback_pending => {
            problems.push("the agent has not read its last apply back yet".to_string());
        }
        (Some(_), true) if !chains_match => {
            problems.push("the agent's chains or sets differ from its last apply".to_string());
        }
        _ => {}
    }
    for f in &foreign_job_rules {
        problems.push(format!(
            "monit_access_jobs holds a rule that is not a job rule (the agent removes it at its next reconcile): {f}"
        ));
    }
    let mut warnings = Vec::new();
    if let Some(a) = &agent {
        if let Some(e) = &a.workload_refused {
            warnings.push(format!(
                "the workload policies of agent.json were refused (the live ones were left as they were): {e}"
            ));
        }
        if let Some(e) = &a.reload_error {
            warnings.push(format!(
                "the last reload of agent.json changed nothing (the policies in force are those before it): {e}"
            ));
        }
        if let Some(e) = &a.bridge_error {
            warnings.push(e.clone());
        }
        warnings.extend(a.workload_notes.iter().cloned());
    }
    let counters = if table_present {
        fwstatus::read_counters(&nft).unwrap_or_else(|e| {
            warnings.push(format!("reading the policy counters failed: {e}"));
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let conntrack = fwstatus::read_conntrack(Path::new("/proc/sys")).unwrap_or_else(|e| {
        warnings.push(format!("reading conntrack usage failed: {e}"));
        None
    });
    if let Some(c) = conntrack.filter(|c| c.warn) {
        warnings.push(format!(
            "conntrack table {} of {} entries full (above {:.0} %): new connections are dropped when it is full",
            c.count,
            c.max,
            fwstatus::CONNTRACK_WARN_RATIO * 100.0
        ));
    }
    // Drop the bulky snapshot and script from what is shown; the comparison above used them.
    let agent = agent.map(|a| RuntimeState {
        snapshot: serde_json::Value::Null,
        script: String::new(),
        ..a
    });
    Ok(Status {
        agent,
        table_present,
        matches_desired,
        job_rules,
        metadata_rules,
        foreign_job_rules,
        problems,
        counters,
        conntrack,
        warnings,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.agent {
            Some(a) => {
                writeln!(f, "mode:          {}", a.identity)?;
                if let Some(r) = &a.fallback_reason {
                    writeln!(f, "fallback why:  {r}")?;
                }
                writeln!(
                    f,
                    "cgroups:       {} layout{}",
                    a.layout,
                    if a.namespaced {
                        ", nested cgroup namespace"
                    } else {
                        ""
                    }
                )?;
                writeln!(f, "monit:         {}", a.monit)?;
                writeln!(f, "nats:          {}", a.nats)?;
                if let Some(e) = a
                    .nats_bus
                    .as_ref()
                    .and_then(|b| b.get("startup_error"))
                    .and_then(serde_json::Value::as_str)
                {
                    writeln!(f, "nats link:     NOT STARTED: {e}")?;
                } else if let Some(b) = &a.nats_bus {
                    let n = |k: &str| b.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                    writeln!(
                        f,
                        "nats link:     {} attempts, {} connects, {} hook failures, {} resolve failures",
                        n("attempts"),
                        n("connects"),
                        n("hook_failures"),
                        n("resolve_failures")
                    )?;
                    if let Some(e) = b.get("last_hook_error").and_then(serde_json::Value::as_str) {
                        writeln!(f, "NATS FIREWALL DEGRADED: last hook error: {e}")?;
                    }
                }
                writeln!(
                    f,
                    "protected:     {}",
                    if a.protected.is_empty() {
                        "(none)".into()
                    } else {
                        a.protected.join(", ")
                    }
                )?;
                writeln!(
                    f,
                    "repairs:       {} drift repairs ({} foreign job rules removed), {} stale job rules pruned",
                    a.repairs, a.foreign_removed, a.pruned
                )?;
                if let Some(e) = &a.last_error {
                    writeln!(f, "last error:    {e}")?;
                }
                if let Some(e) = &a.readback_error {
                    writeln!(f, "read-back:     FAILED, drift is not repaired: {e}")?;
                }
                write_workload(f, &a.workload)?;
            }
            None => writeln!(
                f,
                "mode:          unknown (no agent state file: the agent has not run)"
            )?,
        }
        writeln!(f, "job rules:     {}", self.job_rules.len())?;
        for r in &self.job_rules {
            writeln!(f, "  - {}", job_rule_who(r))?;
        }
        for r in &self.foreign_job_rules {
            writeln!(f, "  - NOT A JOB RULE, {r}")?;
        }
        // Only where there is a deny list: without one the chain does not exist.
        if self.agent.as_ref().is_some_and(|a| {
            a.workload
                .get("egress")
                .and_then(|e| e.get("state"))
                .and_then(serde_json::Value::as_str)
                == Some("enabled")
        }) || !self.metadata_rules.is_empty()
        {
            writeln!(f, "metadata jobs: {}", self.metadata_rules.len())?;
            for r in &self.metadata_rules {
                writeln!(f, "  - {}", job_rule_who(r))?;
            }
        }
        let live = if !self.table_present {
            "ABSENT (table inet bosh_agent does not exist)"
        } else if self.matches_desired {
            "matches the desired state"
        } else if !self.foreign_job_rules.is_empty() {
            "DIFFERS from the desired state (monit_access_jobs holds rules that are not job rules)"
        } else if self.agent.as_ref().is_some_and(|a| a.readback_pending) {
            "not compared yet (the agent reads its last apply back right after start)"
        } else {
            "DIFFERS from the desired state"
        };
        writeln!(f, "live table:    {live}")?;
        if !self.counters.is_empty() {
            let c: Vec<String> = self
                .counters
                .iter()
                .map(|c| format!("{} {} packets", c.name, c.packets))
                .collect();
            writeln!(f, "counters:      {}", c.join(", "))?;
        }
        if let Some(c) = &self.conntrack {
            writeln!(f, "conntrack:     {} of {} entries", c.count, c.max)?;
        }
        for w in &self.warnings {
            writeln!(f, "WARNING:       {w}")?;
        }
        Ok(())
    }
}

/// The workload policies' lines of `firewall status` (from the state file's summary).
fn write_workload(f: &mut std::fmt::Formatter<'_>, w: &serde_json::Value) -> std::fmt::Result {
    use serde_json::Value;
    if w.is_null() {
        return writeln!(f, "workload:      no egress, ingress or guard policy");
    }
    let s = |v: &Value| match v {
        Value::String(t) => t.clone(),
        other => other.to_string(),
    };
    let eg = &w["egress"];
    if eg["state"] == "enabled" {
        writeln!(
            f,
            "egress deny:   {} IPv4 and {} IPv6 ranges ({} excepted port entries), {}, tracking {}, prefilter buckets {}/{}; allowed besides the agent: {}",
            s(&eg["deny_ranges_v4"]),
            s(&eg["deny_ranges_v6"]),
            s(&eg["except_entries"]),
            s(&eg["action"]),
            s(&eg["tracking"]),
            s(&eg["prefilter_buckets_v4"]),
            s(&eg["prefilter_buckets_v6"]),
            eg["allowed"]
                .as_array()
                .filter(|a| !a.is_empty())
                .map_or_else(
                    || "(none)".into(),
                    |a| a.iter().map(s).collect::<Vec<_>>().join(", ")
                )
        )?;
    } else {
        writeln!(f, "egress deny:   off")?;
    }
    let ing = &w["ingress"];
    if ing["state"] == "enabled" {
        writeln!(
            f,
            "ingress allow: {} from anywhere, {} by-source entries, ICMP {}, ct invalid: {}",
            ing["any_source_ports"]
                .as_array()
                .filter(|a| !a.is_empty())
                .map_or_else(
                    || "(no port)".into(),
                    |a| a.iter().map(s).collect::<Vec<_>>().join(" ")
                ),
            s(&ing["by_source_entries"]),
            if ing["allow_icmp"] == true {
                "allowed"
            } else {
                "dropped"
            },
            s(&ing["ct_invalid"])
        )?;
    } else {
        writeln!(f, "ingress allow: off")?;
    }
    writeln!(
        f,
        "guards:        localhost {}, alert listener {}",
        if w["localhost_guard"] == true {
            "on"
        } else {
            "off"
        },
        s(&w["alert_listener"]["state"])
    )
}

/// Who a job rule lets through, for the listing: its key and cgroup, else what it matches.
fn job_rule_who(r: &readback::LiveJobRule) -> String {
    match (&r.key, &r.cgroup, r.uid) {
        (Some(k), Some(c), _) => format!("{k} (cgroup id {c})"),
        (None, Some(c), _) => format!("cgroup {c} (not added by this agent)"),
        (_, None, Some(u)) => format!("uid {u}"),
        _ => r
            .comment
            .clone()
            .unwrap_or_else(|| "rule without comment".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::cgroup::CgroupError;

    #[test]
    fn an_unrepresentable_cgroup_path_exits_4() {
        let e = AllowError::from(FirewallError::Cgroup(CgroupError::InvalidPath {
            path: "a\"b".into(),
            reason: "contains a quote",
        }));
        assert_eq!(e.exit_code(), 4, "{e}");
        assert!(e.to_string().contains("a\\\"b"), "{e}");
        let e = AllowError::from(FirewallError::Cgroup(CgroupError::NotFound {
            pid: 1,
            visible: "/x".into(),
            mount: "/sys/fs/cgroup".into(),
        }));
        assert_eq!(e.exit_code(), 4, "{e}");
        let e = AllowError::from(FirewallError::NotInstalled);
        assert_eq!(e.exit_code(), 1, "{e}");
    }
}
