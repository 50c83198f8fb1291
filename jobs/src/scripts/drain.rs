//! Drain scripts: `<base>/jobs/<job>/bin/drain <job_change> <hash_change> <updated_pkgs...>`.
//!
//! The script prints a signed integer. Negative `n`: wait |n| seconds and ask again with
//! `job_check_status`. Zero or positive `n`: wait n seconds and finish. A cancelled drain
//! terminates the running scripts' process groups (SIGTERM, then SIGKILL after a grace period).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::{
    JobScriptError, RunScriptError, SCRIPT_PATH, collect, script_path, spawn, validate_name,
};

/// The first drain argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobChange {
    /// `job_new`: the VM had no jobs before.
    New,
    /// `job_changed`.
    Changed,
    /// `job_shutdown`.
    Shutdown,
    /// `job_check_status`: a re-run after a negative answer.
    CheckStatus,
}

impl JobChange {
    /// The argument as the script sees it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "job_new",
            Self::Changed => "job_changed",
            Self::Shutdown => "job_shutdown",
            Self::CheckStatus => "job_check_status",
        }
    }
}

/// The second drain argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashChange {
    /// `hash_new`: no configuration hash before.
    New,
    /// `hash_changed`.
    Changed,
    /// `hash_unchanged`.
    Unchanged,
}

impl HashChange {
    /// The argument as the script sees it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "hash_new",
            Self::Changed => "hash_changed",
            Self::Unchanged => "hash_unchanged",
        }
    }
}

/// The parts of an apply spec that drain parameters are derived from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainSpec {
    /// Whether the spec has any job (`len(spec.Jobs()) > 0`).
    pub has_jobs: bool,
    /// `configuration_hash`.
    pub configuration_hash: String,
    /// `packages`: name → sha1.
    pub packages: BTreeMap<String, String>,
    /// `persistent_disk`.
    pub persistent_disk: i64,
}

impl DrainSpec {
    /// The JSON shown to scripts as `BOSH_JOB_STATE` / `BOSH_JOB_NEXT_STATE`:
    /// `{"persistent_disk":N}`.
    pub fn presented_state(&self) -> String {
        format!("{{\"persistent_disk\":{}}}", self.persistent_disk)
    }
}

/// Arguments and environment of a drain run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainParams {
    /// First argument.
    pub job_change: JobChange,
    /// Second argument.
    pub hash_change: HashChange,
    /// Remaining arguments, sorted.
    pub updated_packages: Vec<String>,
    /// `BOSH_JOB_STATE`, unset when `None`.
    pub job_state: Option<String>,
    /// `BOSH_JOB_NEXT_STATE`, unset when `None`.
    pub job_next_state: Option<String>,
}

impl DrainParams {
    /// Upstream's `NewUpdateParams(old, new)`: `job_new` when the old spec has no jobs, else
    /// `job_changed`; `hash_new` / `hash_unchanged` / `hash_changed` from the configuration
    /// hashes; updated packages are the new ones missing from the old spec or with another sha1.
    pub fn update(old: &DrainSpec, new: &DrainSpec) -> Self {
        let job_change = if old.has_jobs {
            JobChange::Changed
        } else {
            JobChange::New
        };
        let hash_change = if old.configuration_hash.is_empty() {
            HashChange::New
        } else if old.configuration_hash == new.configuration_hash {
            HashChange::Unchanged
        } else {
            HashChange::Changed
        };
        let updated_packages = new
            .packages
            .iter()
            .filter(|(name, sha1)| old.packages.get(*name) != Some(*sha1))
            .map(|(name, _)| name.clone())
            .collect();
        Self {
            job_change,
            hash_change,
            updated_packages,
            job_state: Some(old.presented_state()),
            job_next_state: Some(new.presented_state()),
        }
    }

    /// Upstream's `NewShutdownParams(old, new)`: `job_shutdown hash_unchanged`, no packages.
    pub fn shutdown(old: &DrainSpec, new: Option<&DrainSpec>) -> Self {
        Self {
            job_change: JobChange::Shutdown,
            hash_change: HashChange::Unchanged,
            updated_packages: Vec::new(),
            job_state: Some(old.presented_state()),
            job_next_state: new.map(DrainSpec::presented_state),
        }
    }

    /// The parameters of a re-run after a negative answer: `job_check_status hash_unchanged`,
    /// no packages, the same `BOSH_JOB_STATE`, no `BOSH_JOB_NEXT_STATE`.
    pub fn to_status_params(&self) -> Self {
        Self {
            job_change: JobChange::CheckStatus,
            hash_change: HashChange::Unchanged,
            updated_packages: Vec::new(),
            job_state: self.job_state.clone(),
            job_next_state: None,
        }
    }
}

/// Timing of drain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOptions {
    /// What one unit of a script's answer means (1 s in production; tests shrink it).
    pub time_unit: Duration,
    /// Between SIGTERM and SIGKILL when cancelled (upstream: 10 s).
    pub terminate_grace: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        Self {
            time_unit: Duration::from_secs(1),
            terminate_grace: Duration::from_secs(10),
        }
    }
}

/// Most of a drain script's stdout kept in memory; the rest is read and dropped.
const MAX_OUTPUT: usize = 64 * 1024;
/// How much of a bad answer an error message quotes.
const QUOTED_OUTPUT: usize = 200;

/// Runs every job's drain script (those that exist) in parallel, following the integer protocol
/// until each finishes, and waits for all. Cancelling `cancel` terminates the running scripts
/// and interrupts waits; every unfinished job then fails with "Script was cancelled by user
/// request". The error summarises like `run_script` (`"1 of 2 drain scripts failed. …"`).
pub async fn drain(
    base_dir: &Path,
    jobs: &[String],
    params: &DrainParams,
    options: &DrainOptions,
    cancel: &CancellationToken,
) -> Result<(), RunScriptError> {
    for job in jobs {
        validate_name("job", job)?;
    }
    let mut tasks = Vec::new();
    for job in jobs {
        let path = script_path(base_dir, job, "drain");
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            continue;
        }
        let job_name = job.clone();
        let params = params.clone();
        let options = *options;
        let cancel = cancel.clone();
        tasks.push((
            job.clone(),
            tokio::spawn(async move { run_job(path, job_name, params, options, cancel).await }),
        ));
    }
    tracing::info!(target: "jobs::scripts", count = tasks.len(), "running drain scripts in parallel");
    collect("drain", tasks).await
}

async fn run_job(
    path: PathBuf,
    job: String,
    mut params: DrainParams,
    options: DrainOptions,
    cancel: CancellationToken,
) -> Result<(), JobScriptError> {
    loop {
        let value = run_once(&path, &job, &params, &options, &cancel).await?;
        tracing::info!(target: "jobs::scripts", %job, value, job_change = params.job_change.as_str(), "drain script answered");
        let wait = scaled(options.time_unit, value.unsigned_abs());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return Err(JobScriptError::Cancelled),
        }
        if value >= 0 {
            return Ok(());
        }
        params = params.to_status_params();
    }
}

fn scaled(unit: Duration, n: u64) -> Duration {
    unit.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

async fn run_once(
    path: &Path,
    job: &str,
    params: &DrainParams,
    options: &DrainOptions,
    cancel: &CancellationToken,
) -> Result<i64, JobScriptError> {
    if cancel.is_cancelled() {
        return Err(JobScriptError::Cancelled);
    }
    let mut command = tokio::process::Command::new(path);
    command
        .arg(params.job_change.as_str())
        .arg(params.hash_change.as_str())
        .args(&params.updated_packages)
        .env("PATH", SCRIPT_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that cancelling reaches the script's children too.
        .process_group(0)
        .kill_on_drop(true);
    for (name, value) in [
        ("BOSH_JOB_STATE", &params.job_state),
        ("BOSH_JOB_NEXT_STATE", &params.job_next_state),
    ] {
        match value {
            Some(v) => command.env(name, v),
            None => command.env_remove(name),
        };
    }
    let mut child = spawn(&mut command)
        .await
        .map_err(|source| JobScriptError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    let stdout = child.stdout.take().map(|s| tokio::spawn(read_limited(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(read_limited(s)));

    let waited = tokio::select! {
        status = child.wait() => Some(status),
        () = cancel.cancelled() => None,
    };
    let Some(status) = waited else {
        terminate(&mut child, options.terminate_grace).await;
        for task in [stdout, stderr].into_iter().flatten() {
            task.abort();
        }
        return Err(JobScriptError::Cancelled);
    };
    let status = status.map_err(|source| JobScriptError::Wait {
        path: path.to_path_buf(),
        source,
    })?;
    let stdout = join_output(stdout).await;
    let stderr = join_output(stderr).await;
    if !stderr.trim().is_empty() {
        tracing::info!(target: "jobs::scripts", job, stderr = %stderr.trim(), "drain script stderr");
    }
    // Upstream ignores the exit code when the script ran: only a run without one (a signal) is
    // an error; otherwise stdout decides.
    if status.code().is_none() {
        return Err(JobScriptError::Killed {
            path: path.to_path_buf(),
            status: status.to_string(),
        });
    }
    stdout
        .trim()
        .parse::<i64>()
        .map_err(|_| JobScriptError::NotAnInteger {
            job: job.to_string(),
            output: stdout.chars().take(QUOTED_OUTPUT).collect(),
        })
}

async fn join_output(task: Option<tokio::task::JoinHandle<String>>) -> String {
    match task {
        Some(task) => task.await.unwrap_or_default(),
        None => String::new(),
    }
}

async fn read_limited(mut reader: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = MAX_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// SIGTERM to the script's process group; SIGKILL to it if the script outlives `grace`.
/// Signals go only to the group this agent created for the script (its pid is the group id).
async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;

    let Some(pgid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return; // already reaped
    };
    let pgid = Pid::from_raw(pgid);
    if let Err(error) = killpg(pgid, Signal::SIGTERM) {
        tracing::warn!(target: "jobs::scripts", %error, "SIGTERM to drain script failed");
    }
    if tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return;
    }
    if let Err(error) = killpg(pgid, Signal::SIGKILL) {
        tracing::warn!(target: "jobs::scripts", %error, "SIGKILL to drain script failed");
    }
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(has_jobs: bool, hash: &str, packages: &[(&str, &str)], disk: i64) -> DrainSpec {
        DrainSpec {
            has_jobs,
            configuration_hash: hash.into(),
            packages: packages
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect(),
            persistent_disk: disk,
        }
    }

    #[test]
    fn update_params_follow_upstream() {
        let old = spec(true, "h1", &[("a", "1"), ("b", "2")], 1024);
        let new = spec(true, "h2", &[("a", "1"), ("b", "3"), ("c", "4")], 2048);
        let p = DrainParams::update(&old, &new);
        assert_eq!(p.job_change.as_str(), "job_changed");
        assert_eq!(p.hash_change.as_str(), "hash_changed");
        assert_eq!(p.updated_packages, ["b", "c"]);
        assert_eq!(p.job_state.as_deref(), Some(r#"{"persistent_disk":1024}"#));
        assert_eq!(
            p.job_next_state.as_deref(),
            Some(r#"{"persistent_disk":2048}"#)
        );

        let fresh = spec(false, "", &[], 0);
        let p = DrainParams::update(&fresh, &new);
        assert_eq!(p.job_change, JobChange::New);
        assert_eq!(p.hash_change, HashChange::New);
        assert_eq!(p.updated_packages, ["a", "b", "c"]);

        let same = DrainParams::update(&old, &old);
        assert_eq!(same.hash_change.as_str(), "hash_unchanged");
        assert!(same.updated_packages.is_empty());
    }

    #[test]
    fn shutdown_and_status_params() {
        let old = spec(true, "h", &[("a", "1")], 10);
        let p = DrainParams::shutdown(&old, None);
        assert_eq!(
            (p.job_change.as_str(), p.hash_change.as_str()),
            ("job_shutdown", "hash_unchanged")
        );
        assert_eq!(p.job_next_state, None);
        let p = DrainParams::shutdown(&old, Some(&spec(true, "h", &[], 20)));
        assert_eq!(
            p.job_next_state.as_deref(),
            Some(r#"{"persistent_disk":20}"#)
        );
        let s = p.to_status_params();
        assert_eq!(s.job_change.as_str(), "job_check_status");
        assert_eq!(s.hash_change, HashChange::Unchanged);
        assert_eq!(s.job_state, p.job_state);
        assert_eq!(s.job_next_state, None);
        assert!(s.updated_packages.is_empty());
    }

    #[test]
    fn waits_scale_and_saturate() {
        assert_eq!(
            scaled(Duration::from_millis(10), 3),
            Duration::from_millis(30)
        );
        assert_eq!(
            scaled(Duration::from_secs(1), u64::MAX),
            Duration::from_secs(u64::from(u32::MAX))
        );
    }
}
