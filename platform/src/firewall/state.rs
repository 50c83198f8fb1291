//! The agent's runtime firewall state, `<run dir>/firewall.json`: what it applied, how it
//! identifies itself, and the canonical read-back taken right after its last apply. Read by
//! `firewall status` and by `firewall-allow` (for the level offset and the mode).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::FirewallError;

/// File name inside the run directory.
pub const STATE_FILE: &str = "firewall.json";

/// What the agent last applied. Plain data so that other processes can read it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeState {
    /// How the agent identifies itself in its rules.
    pub mode: Mode,
    /// Human description of the identity (e.g. "cgroup v2 at level 3 (unified/a/b)").
    pub identity: String,
    /// Why the uid fallback is in use, if it is.
    pub fallback_reason: Option<String>,
    /// The agent's cgroup path as nft sees it, in cgroup mode.
    pub cgroup_path: Option<String>,
    /// The level used in the agent's rules, in cgroup mode.
    pub level: Option<u32>,
    /// Added to a job's visible cgroup depth to get its rule level.
    pub level_offset: i64,
    /// cgroup layout of the host.
    pub layout: String,
    /// Whether the agent is in a nested cgroup namespace.
    pub namespaced: bool,
    /// The monit policy.
    pub monit: MonitState,
    /// Protected endpoints, as `addr:port` strings.
    pub protected: Vec<String>,
    /// The NATS policy.
    pub nats: NatsState,
    /// The NATS endpoints of the desired state (`addr:port`): a restarted agent keeps
    /// protecting them until its first resolution says otherwise.
    pub nats_endpoints: Vec<String>,
    /// The (idempotent) script of the desired state that the live table was last brought to.
    /// With `snapshot`, it lets a restarted agent that wants the same state see that the live
    /// table already is that state, and skip the apply.
    pub script: String,
    /// Canonical read-back of the agent-owned chains and sets after the last apply.
    pub snapshot: Value,
    /// The last apply has not been read back yet (`snapshot` is from before it, or null): the
    /// agent takes the read-back off its start-up path, right after it dials the director.
    pub readback_pending: bool,
    /// Seconds since the epoch of the last apply.
    pub applied_at: u64,
    /// How many times drift was repaired since the agent started.
    pub repairs: u64,
    /// How many stale job rules were pruned since the agent started.
    pub pruned: u64,
    /// How many rules that are not job rules were removed from `monit_access_jobs` since the
    /// agent started (each removal pass also counts as one of `repairs`).
    pub foreign_removed: u64,
    /// Rules that are not job rules, found in `monit_access_jobs` at the last reconcile and
    /// still there because their removal failed (empty once they are gone).
    pub foreign_job_rules: Vec<super::readback::ForeignJobRule>,
    /// Last firewall error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Why the last listing of the live table failed (nft broken or missing): drift cannot be
    /// seen or repaired until a listing works again, which clears it.
    pub readback_error: Option<String>,
    /// The message bus's counters: attempts, hook failures, last errors.
    pub nats_bus: Option<Value>,
    /// Pid of the agent that wrote this file.
    pub agent_pid: u32,
    /// The workload policies of the desired state (egress deny, ingress allow-list, guards)
    /// with their sizes, as `firewall status` shows them (null: none configured).
    pub workload: Value,
    /// Why the workload policies of agent.json were refused (an invalid value, a lock-out, a
    /// kernel without what they need): none of them was changed and the live ones, if any,
    /// were left exactly as they were.
    pub workload_refused: Option<String>,
    /// Bridges exist and bridge netfilter could not be turned on: switched traffic bypasses
    /// the egress deny list.
    pub bridge_error: Option<String>,
    /// What a reader should know about how the policies match (the uid fallback, monit's
    /// cgroup unknown), one line each.
    pub workload_notes: Vec<String>,
    /// How many reloads of agent.json's firewall policies (SIGHUP, `firewall reload`) this
    /// agent finished, applied or refused. It grows only after the outcome below is recorded,
    /// so a reader that saw it grow reads the outcome of that reload.
    pub reloads: u64,
    /// Why the last reload was refused or failed (`None`: it was applied, or there was none).
    /// A refused reload changed nothing, live or desired.
    pub reload_error: Option<String>,
}

/// How the agent identifies itself: `cgroup` (proved by the self-test) or `uid` (the fallback).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Cgroup,
    Uid,
}

/// The monit policy as the state file records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitState {
    /// `UseMonitIptablesFirewall`: the stemcell guards monit; no monit chain.
    #[default]
    #[serde(rename = "disabled")]
    Disabled,
    /// Guarded; any root process may pass.
    #[serde(rename = "enabled (root allowed)")]
    RootAllowed,
    /// Guarded; root processes are refused like any other.
    #[serde(rename = "enabled (root refused)")]
    RootRefused,
}

impl MonitState {
    /// The state of a policy.
    pub fn of(p: super::MonitPolicy) -> Self {
        match p {
            super::MonitPolicy::Disabled => MonitState::Disabled,
            super::MonitPolicy::Enabled { allow_root: true } => MonitState::RootAllowed,
            super::MonitPolicy::Enabled { allow_root: false } => MonitState::RootRefused,
        }
    }

    /// Whether the agent guards monit (its jobs chain is reached by packets to monit).
    pub fn guarded(self) -> bool {
        self != MonitState::Disabled
    }
}

/// The NATS policy as the state file records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatsState {
    #[default]
    Disabled,
    Enabled,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Cgroup => "cgroup",
            Mode::Uid => "uid",
        })
    }
}

impl std::fmt::Display for MonitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MonitState::Disabled => "disabled",
            MonitState::RootAllowed => "enabled (root allowed)",
            MonitState::RootRefused => "enabled (root refused)",
        })
    }
}

impl std::fmt::Display for NatsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatsState::Disabled => "disabled",
            NatsState::Enabled => "enabled",
        })
    }
}

/// Path of the state file in `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Reads the state file; `Ok(None)` when no agent has written one, and
/// [`FirewallError::CorruptState`] naming the file when it is not the agent's JSON.
pub fn read(dir: &Path) -> Result<Option<RuntimeState>, FirewallError> {
    let path = state_path(dir);
    match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| FirewallError::CorruptState {
                    path,
                    detail: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FirewallError::Io { path, source }),
    }
}

/// Writes the state file whole, durably (temporary file, fsync, rename, directory fsync:
/// [`crate::files::write_durable`]), mode 0644 (`firewall status` reads it as any user): a
/// reader, and an agent started after a crash or a power loss, sees the old state or the new
/// one, never a part.
pub fn write(dir: &Path, state: &RuntimeState) -> Result<(), FirewallError> {
    let io = |path: PathBuf| move |source| FirewallError::Io { path, source };
    fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let path = state_path(dir);
    let body = serde_json::to_vec_pretty(state).map_err(|e| FirewallError::CorruptState {
        path: path.clone(),
        detail: format!("cannot serialise the state: {e}"),
    })?;
    crate::files::write_durable(&path, &body, STATE_MODE).map_err(|e| FirewallError::Io {
        path: e.path,
        source: e.source,
    })
}

/// The state file's mode.
pub const STATE_MODE: u32 = 0o644;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn typed_fields_keep_the_files_strings() {
        let st = RuntimeState {
            mode: Mode::Uid,
            monit: MonitState::RootRefused,
            nats: NatsState::Enabled,
            ..RuntimeState::default()
        };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["mode"], "uid");
        assert_eq!(v["monit"], "enabled (root refused)");
        assert_eq!(v["nats"], "enabled");
        let back: RuntimeState = serde_json::from_value(v).unwrap();
        assert_eq!(back, st);
        assert_eq!(
            MonitState::RootAllowed.to_string(),
            "enabled (root allowed)"
        );
    }

    #[test]
    fn a_corrupt_state_file_is_named_and_nft_is_not_blamed() {
        let dir = std::env::temp_dir().join(format!("state-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(state_path(&dir), b"{\"mode\": \"cgroup\", trunc").unwrap();
        let e = read(&dir).unwrap_err().to_string();
        fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains(&state_path(&dir).display().to_string()), "{e}");
        assert!(e.contains("corrupt"), "{e}");
        assert!(!e.contains("nft"), "{e}");
    }
}
