//! Job scripts: `run_script` (any `bin/<script>` of every job, logged under `<base>/sys/log`)
//! and `drain` (see [`drain`](mod@drain)). Jobs run in parallel; results are reported in the
//! order the jobs were given.

pub mod drain;

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The `PATH` job scripts run with (upstream's `pathenv`).
pub const SCRIPT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// `<base>/jobs/<job>/bin/<script>`.
pub fn script_path(base_dir: &Path, job: &str, script: &str) -> PathBuf {
    base_dir.join("jobs").join(job).join("bin").join(script)
}

/// `<base>/sys/log/<job>`.
pub fn job_log_dir(base_dir: &Path, job: &str) -> PathBuf {
    base_dir.join("sys").join("log").join(job)
}

/// Why one job's script failed.
#[derive(Debug, thiserror::Error)]
pub enum JobScriptError {
    /// A log file or its directory could not be opened.
    #[error("opening log file {path}: {source}")]
    Log {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The script could not be started.
    #[error("starting {path}: {source}")]
    Spawn {
        /// The script.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for the script failed.
    #[error("waiting for {path}: {source}")]
    Wait {
        /// The script.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The script exited unsuccessfully.
    #[error("{path} failed: {status}")]
    Exit {
        /// The script.
        path: PathBuf,
        /// Exit code or signal.
        status: String,
    },
    /// The script was killed by a signal before printing a result (drain).
    #[error("Running drain script {path}: {status}")]
    Killed {
        /// The script.
        path: PathBuf,
        /// The signal.
        status: String,
    },
    /// A drain script's stdout is not a signed integer.
    #[error("Script did not return a signed integer: drain script of job {job} printed {output:?}")]
    NotAnInteger {
        /// The job.
        job: String,
        /// Its stdout (possibly shortened).
        output: String,
    },
    /// The run was cancelled; the script was terminated.
    #[error("Script was cancelled by user request")]
    Cancelled,
    /// The task running the script ended abnormally.
    #[error("script task of job {job} failed: {reason}")]
    Task {
        /// The job.
        job: String,
        /// Why.
        reason: String,
    },
}

/// One failed job and why.
#[derive(Debug)]
pub struct JobFailure {
    /// The job.
    pub job: String,
    /// Why its script failed.
    pub error: JobScriptError,
}

/// Some scripts of a parallel run failed. `Display` is exactly upstream's summary:
/// `"<n> of <m> <script> scripts failed. Failed Jobs: a, b. Successful Jobs: c."`
/// (the last sentence only when some succeeded); the reasons are in [`failures`](Self::failures).
#[derive(Debug)]
pub struct ScriptsFailed {
    /// The script name (`pre-start`, `drain`, …).
    pub script: String,
    /// Failed jobs with their reasons, in the given job order.
    pub failures: Vec<JobFailure>,
    /// Jobs whose script succeeded, in the given job order.
    pub succeeded: Vec<String>,
}

impl std::fmt::Display for ScriptsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let failed: Vec<&str> = self.failures.iter().map(|x| x.job.as_str()).collect();
        write!(
            f,
            "{} of {} {} scripts failed. Failed Jobs: {}",
            failed.len(),
            failed.len() + self.succeeded.len(),
            self.script,
            failed.join(", ")
        )?;
        if !self.succeeded.is_empty() {
            write!(f, ". Successful Jobs: {}", self.succeeded.join(", "))?;
        }
        f.write_str(".")
    }
}

impl std::error::Error for ScriptsFailed {}

/// Why a `run_script` or `drain` call failed.
#[derive(Debug, thiserror::Error)]
pub enum RunScriptError {
    /// A job or script name would leave `<base>/jobs` (empty, `.`, `..`, or contains `/` or NUL).
    #[error("Invalid {kind} name {name:?}")]
    InvalidName {
        /// `job` or `script`.
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// Some scripts failed; see [`ScriptsFailed`].
    #[error(transparent)]
    Failed(#[from] ScriptsFailed),
}

impl RunScriptError {
    /// The per-job reasons, if scripts ran and failed.
    pub fn failures(&self) -> &[JobFailure] {
        match self {
            Self::Failed(f) => &f.failures,
            Self::InvalidName { .. } => &[],
        }
    }
}

pub(crate) fn validate_name(kind: &'static str, name: &str) -> Result<(), RunScriptError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(RunScriptError::InvalidName {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Runs the spawned per-job tasks to completion and summarises them in job order.
pub(crate) async fn collect(
    script: &str,
    tasks: Vec<(String, tokio::task::JoinHandle<Result<(), JobScriptError>>)>,
) -> Result<(), RunScriptError> {
    let mut failures = Vec::new();
    let mut succeeded = Vec::new();
    for (job, task) in tasks {
        let result = task.await.unwrap_or_else(|e| {
            Err(JobScriptError::Task {
                job: job.clone(),
                reason: e.to_string(),
            })
        });
        match result {
            Ok(()) => {
                tracing::info!(target: "jobs::scripts", %job, script, "script has successfully executed");
                succeeded.push(job);
            }
            Err(error) => {
                tracing::error!(target: "jobs::scripts", %job, script, %error, "script has failed");
                failures.push(JobFailure { job, error });
            }
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    Err(ScriptsFailed {
        script: script.to_string(),
        failures,
        succeeded,
    }
    .into())
}

/// Runs `<base>/jobs/<job>/bin/<script>` for every job that has it, all in parallel, and waits
/// for all of them.
///
/// Each runs with the agent's environment, `PATH` set to [`SCRIPT_PATH`], then `env` on top; no
/// arguments; stdin empty; stdout and stderr appended to
/// `<base>/sys/log/<job>/<script>.stdout.log` / `.stderr.log` (files 0640, directory 0750). A
/// script fails when it cannot start or exits non-zero. Jobs without the script are skipped and
/// not counted.
pub async fn run_script(
    base_dir: &Path,
    jobs: &[String],
    script: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), RunScriptError> {
    validate_name("script", script)?;
    for job in jobs {
        validate_name("job", job)?;
    }
    let mut tasks = Vec::new();
    for job in jobs {
        let path = script_path(base_dir, job, script);
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            tracing::debug!(target: "jobs::scripts", %job, script, "no such script");
            continue;
        }
        let log_dir = job_log_dir(base_dir, job);
        let script = script.to_string();
        let env = env.clone();
        tasks.push((
            job.clone(),
            tokio::spawn(async move { run_one(path, log_dir, script, env).await }),
        ));
    }
    tracing::info!(target: "jobs::scripts", script, count = tasks.len(), "running scripts in parallel");
    collect(script, tasks).await
}

async fn run_one(
    path: PathBuf,
    log_dir: PathBuf,
    script: String,
    env: BTreeMap<String, String>,
) -> Result<(), JobScriptError> {
    let (stdout, stderr) = open_logs(&log_dir, &script).await?;
    let mut command = tokio::process::Command::new(&path);
    command
        .env("PATH", SCRIPT_PATH)
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut child = spawn(&mut command)
        .await
        .map_err(|source| JobScriptError::Spawn {
            path: path.clone(),
            source,
        })?;
    let status = child.wait().await.map_err(|source| JobScriptError::Wait {
        path: path.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(JobScriptError::Exit {
            path,
            status: status.to_string(),
        })
    }
}

/// Spawns `command`, retrying briefly on `ETXTBSY`: a script that was just written can be
/// "busy" while a concurrent fork elsewhere in the process still holds its write descriptor.
pub(crate) async fn spawn(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    const ETXTBSY: i32 = 26;
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

async fn open_logs(log_dir: &Path, script: &str) -> Result<(Stdio, Stdio), JobScriptError> {
    let dir = log_dir.to_path_buf();
    let script = script.to_string();
    let opened = tokio::task::spawn_blocking(move || -> Result<(Stdio, Stdio), JobScriptError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(|source| JobScriptError::Log {
                path: dir.clone(),
                source,
            })?;
        let open = |suffix: &str| -> Result<Stdio, JobScriptError> {
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join(format!("{script}.{suffix}.log"));
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(&path)
                .map(Stdio::from)
                .map_err(|source| JobScriptError::Log { path, source })
        };
        Ok((open("stdout")?, open("stderr")?))
    })
    .await;
    opened.unwrap_or_else(|e| {
        Err(JobScriptError::Log {
            path: log_dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn summary_matches_upstream_exactly() {
        let failure = |job: &str| JobFailure {
            job: job.into(),
            error: JobScriptError::Cancelled,
        };
        let e = ScriptsFailed {
            script: "pre-start".into(),
            failures: vec![failure("a"), failure("b")],
            succeeded: vec!["c".into()],
        };
        assert_eq!(
            e.to_string(),
            "2 of 3 pre-start scripts failed. Failed Jobs: a, b. Successful Jobs: c."
        );
        let e = ScriptsFailed {
            script: "drain".into(),
            failures: vec![failure("a")],
            succeeded: vec![],
        };
        assert_eq!(
            e.to_string(),
            "1 of 1 drain scripts failed. Failed Jobs: a."
        );
    }

    #[test]
    fn names_that_escape_are_rejected() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(validate_name("job", bad).is_err(), "{bad:?}");
        }
        for good in ["nats", "pre-start", "post_deploy", "a.b", "..a"] {
            assert!(validate_name("script", good).is_ok(), "{good:?}");
        }
        let e = validate_name("script", "../../bin/sh").unwrap_err();
        assert_eq!(e.to_string(), "Invalid script name \"../../bin/sh\"");
        assert!(e.failures().is_empty());
    }
}
