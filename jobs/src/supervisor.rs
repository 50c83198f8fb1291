//! Job supervision through monit: start, stop, stop-and-wait, unmonitor, the aggregate job state
//! and the per-process list, with upstream's `<base>/monit/stopped` marker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{MonitClient, MonitError};
use crate::status::{MonitStatus, ProcessState, Service, VCAP_GROUP};

/// How to run the monit command line (used by [`JobSupervisor::stop_and_wait`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitCli {
    /// The monit binary; upstream runs `monit` from `PATH`.
    pub binary: PathBuf,
    /// Passed as `-c <control_file>` when set (e.g. `/var/vcap/bosh/etc/monitrc`).
    pub control_file: Option<PathBuf>,
}

impl Default for MonitCli {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("monit"),
            control_file: None,
        }
    }
}

/// Timing and tools of a [`JobSupervisor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorOptions {
    /// The monit command line.
    pub monit_cli: MonitCli,
    /// Pause between status polls in `stop_and_wait` (upstream: 500 ms).
    pub poll_interval: Duration,
    /// Overall limit of `stop_and_wait` (upstream: 5 minutes).
    pub stop_timeout: Duration,
    /// How many times [`JobSupervisor::reload`] asks monit to reload (upstream: 3).
    pub reload_tries: u32,
    /// How many times it checks the incarnation after each request (100; upstream: 10).
    pub reload_checks: u32,
    /// The pause between those checks (100 ms; upstream: 1 s). Monit usually reloads within
    /// a few hundred ms, so checking every second made every `apply` and `start` wait a whole
    /// second; the total wait per request is upstream's 10 s.
    pub reload_check_interval: Duration,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        Self {
            monit_cli: MonitCli::default(),
            poll_interval: Duration::from_millis(500),
            stop_timeout: Duration::from_secs(300),
            reload_tries: 3,
            reload_checks: 100,
            reload_check_interval: Duration::from_millis(100),
        }
    }
}

/// The VM's aggregate job state (`get_state.job_state`, heartbeats), as upstream computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Monit's status could not be read.
    Unknown,
    /// The stopped marker exists.
    Stopped,
    /// Some vcap service is starting.
    Starting,
    /// Some vcap service is not monitored or not running.
    Failing,
    /// Every vcap service runs (also when there are none).
    Running,
}

impl JobState {
    /// The lowercase word used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Failing => "failing",
            Self::Running => "running",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Upstream's `Status()`, pure: checked in order — status unavailable → `unknown`; stopped
/// marker → `stopped`; any vcap service starting → `starting`; any not monitored or not running
/// → `failing`; otherwise `running`.
pub fn job_state_of(status: Option<&MonitStatus>, stopped_marker_exists: bool) -> JobState {
    job_state_expecting(status, stopped_marker_exists, 0)
}

/// [`job_state_of`], knowing that the applied spec has `expected_jobs` jobs: when it has some
/// but monit has no vcap service at all, the state is `failing`, never `running`.
///
/// Upstream reports `running` for an empty vcap group whatever the spec says, so a VM whose
/// monit lost (or never loaded) the job configs looks healthy to the director; this rule is
/// our deviation.
pub fn job_state_expecting(
    status: Option<&MonitStatus>,
    stopped_marker_exists: bool,
    expected_jobs: usize,
) -> JobState {
    let Some(status) = status else {
        return JobState::Unknown;
    };
    if stopped_marker_exists {
        return JobState::Stopped;
    }
    let services = status.services_in_group(VCAP_GROUP);
    if services.iter().any(|s| s.status == ProcessState::Starting) {
        return JobState::Starting;
    }
    if services
        .iter()
        .any(|s| !s.monitored || s.status != ProcessState::Running)
    {
        return JobState::Failing;
    }
    if services.is_empty() && expected_jobs > 0 {
        return JobState::Failing;
    }
    JobState::Running
}

/// One entry of `get_state.processes`: `{name,state,uptime{secs},mem{kb,percent},cpu{total}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Process {
    /// Service name.
    pub name: String,
    /// Per-service state.
    pub state: ProcessState,
    /// Uptime.
    pub uptime: UptimeVitals,
    /// Memory, total with children.
    #[serde(rename = "mem")]
    pub memory: MemoryVitals,
    /// CPU, total with children.
    pub cpu: CpuVitals,
}

/// `uptime`; `secs` is omitted when zero (Go's `omitempty`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UptimeVitals {
    /// Seconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub secs: i64,
}

/// `mem`; `kb` is omitted when zero (Go's `omitempty`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryVitals {
    /// `kilobytetotal`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kb: i64,
    /// `percenttotal`.
    pub percent: f64,
}

/// `cpu`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuVitals {
    /// `percenttotal`.
    pub total: f64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl From<&Service> for Process {
    fn from(s: &Service) -> Self {
        Self {
            name: s.name.clone(),
            state: s.status,
            uptime: UptimeVitals { secs: s.uptime },
            memory: MemoryVitals {
                kb: s.memory_kilobytes_total,
                percent: s.memory_percent_total,
            },
            cpu: CpuVitals {
                total: s.cpu_percent_total,
            },
        }
    }
}

/// Why a supervision operation failed. Messages follow upstream's wording.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Listing the vcap group failed.
    #[error("Getting vcap services: {0}")]
    Services(#[source] MonitError),
    /// Reading monit's status failed.
    #[error("Getting monit status: {0}")]
    Status(#[source] MonitError),
    /// `processes()` could not read the status.
    #[error("Getting service status: {0}")]
    Processes(#[source] MonitError),
    /// A start request failed.
    #[error("Starting service {service}: {source}")]
    Start {
        /// The service.
        service: String,
        /// Why.
        source: MonitError,
    },
    /// A stop request failed.
    #[error("Stopping service {service}: {source}")]
    Stop {
        /// The service.
        service: String,
        /// Why.
        source: MonitError,
    },
    /// An unmonitor request failed.
    #[error("Unmonitoring service {service}: {source}")]
    Unmonitor {
        /// The service.
        service: String,
        /// Why.
        source: MonitError,
    },
    /// The stopped marker could not be written.
    #[error("Creating stopped File {path}: {source}")]
    CreateStopped {
        /// The marker.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The stopped marker could not be removed.
    #[error("Removing stopped File {path}: {source}")]
    RemoveStopped {
        /// The marker.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `monit stop -g vcap` failed.
    #[error("Stop all services: running {command}: {reason}")]
    StopCommand {
        /// The command line.
        command: String,
        /// Exit status and output, or why it could not run.
        reason: String,
    },
    /// Services stayed pending.
    #[error("Timed out waiting for services '{services}' to no longer be pending after {after}")]
    PendingTimeout {
        /// Comma-separated names.
        services: String,
        /// The limit, in words.
        after: String,
    },
    /// Monit's incarnation could not be read before a reload.
    #[error("Getting monit incarnation: {0}")]
    Incarnation(String),
    /// Monit's incarnation did not change after every reload attempt.
    #[error("Failed to reload monit: before={before} after={after}")]
    Reload {
        /// The incarnation before.
        before: i64,
        /// The last one read.
        after: i64,
    },
    /// Services did not stop in time.
    #[error("Timed out waiting for services '{services}' to stop after {after}")]
    StopTimeout {
        /// Comma-separated names.
        services: String,
        /// The limit, in words.
        after: String,
    },
    /// A service reported an error while stopping.
    #[error("Stopping services '[{}]' errored", services.join(" "))]
    Errored {
        /// The errored services.
        services: Vec<String>,
    },
}

/// Margin past the second boundary in [`wait_before_reload`]: monit reads the clock with
/// `time()`, which can lag the precise clock by a scheduler tick.
const RELOAD_CLOCK_MARGIN: Duration = Duration::from_millis(20);

/// How long to wait, at wall-clock time `now`, before asking a monit whose incarnation is
/// `before` to reload, so that the reload's incarnation cannot equal `before`: until the
/// second after `before` (plus a 20 ms margin) when `now` is still in `before`'s second, or up
/// to one second before it (a clock stepped back a little). Zero otherwise: a clock already
/// past `before`, or far behind it (stepped back by more than a second), gives a different
/// incarnation anyway. Never more than about 2 s. Pure.
pub fn wait_before_reload(before: i64, now: std::time::SystemTime) -> Duration {
    let Ok(since_epoch) = now.duration_since(std::time::UNIX_EPOCH) else {
        return Duration::ZERO;
    };
    let Ok(now_secs) = i64::try_from(since_epoch.as_secs()) else {
        return Duration::ZERO;
    };
    let ahead = before.saturating_sub(now_secs);
    if !(0..=1).contains(&ahead) {
        return Duration::ZERO;
    }
    // `ahead` is 0 or 1: the boundary to wait for is `ahead + 1` seconds after `now_secs`.
    let boundary = Duration::from_secs(ahead.unsigned_abs() + 1);
    let into_second = Duration::from_nanos(u64::from(since_epoch.subsec_nanos()));
    boundary.saturating_sub(into_second) + RELOAD_CLOCK_MARGIN
}

/// Supervises the VM's jobs (monit group `vcap`) through monit, upstream's `monitJobSupervisor`.
#[derive(Debug, Clone)]
pub struct JobSupervisor {
    client: MonitClient,
    base_dir: PathBuf,
    options: SupervisorOptions,
    /// Shared by clones: the number of jobs of the applied spec.
    expected_jobs: Arc<AtomicUsize>,
}

impl JobSupervisor {
    /// A supervisor for the VM rooted at `base_dir` (`/var/vcap`).
    pub fn new(
        client: MonitClient,
        base_dir: impl Into<PathBuf>,
        options: SupervisorOptions,
    ) -> Self {
        Self {
            client,
            base_dir: base_dir.into(),
            options,
            expected_jobs: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Records how many jobs the applied spec has (every clone of this supervisor sees it).
    /// While it is positive, [`JobSupervisor::job_state`] is never `running` without a vcap
    /// service (see [`job_state_expecting`]).
    pub fn set_expected_jobs(&self, jobs: usize) {
        self.expected_jobs.store(jobs, Ordering::Relaxed);
    }

    /// The count set by [`JobSupervisor::set_expected_jobs`] (0 until then).
    pub fn expected_jobs(&self) -> usize {
        self.expected_jobs.load(Ordering::Relaxed)
    }

    /// Makes monit re-read its configuration, and confirms it did: runs
    /// `monit [-c <control_file>] reload`, then polls the status until monit's incarnation
    /// differs from the one before (it may go down as well as up: it is monit's start time).
    /// Up to `reload_tries` requests, each followed by up to `reload_checks` checks
    /// `reload_check_interval` apart; a failed request is logged and retried.
    ///
    /// The incarnation is the wall-clock second of monit's last (re)initialisation, so a
    /// reload in that same second leaves it unchanged: it would be taken for none, and the
    /// checks waited out (10 s) before the next request. Each request is therefore sent only
    /// once the clock is past the incarnation's second ([`wait_before_reload`], at most about
    /// 1 s, and only when the previous start or reload was in this very second), so every
    /// reload monit makes shows as a new incarnation.
    ///
    /// Upstream restarts monit through the service manager (`sv`/`systemctl` kill, then
    /// start) instead, because its monit applied a reload only at the next daemon cycle. The
    /// CLI reload is our deviation: it works whatever the service manager, and the wait for
    /// the new incarnation makes it just as certain.
    pub async fn reload(&self) -> Result<(), SupervisorError> {
        let before = self
            .incarnation()
            .await
            .map_err(SupervisorError::Incarnation)?;
        let mut after = before;
        for attempt in 1..=self.options.reload_tries {
            let pause = wait_before_reload(before, std::time::SystemTime::now());
            if !pause.is_zero() {
                tracing::debug!(target: "jobs::monit", before, ?pause,
                    "waiting for the second after monit's incarnation before reloading");
                tokio::time::sleep(pause).await;
            }
            if let Err(error) = self.run_cli(&["reload"], Duration::from_secs(30)).await {
                tracing::error!(target: "jobs::monit", %error, attempt, "Failed to reload monit");
                continue;
            }
            for _ in 0..self.options.reload_checks {
                match self.incarnation().await {
                    Ok(now) if now != before => return Ok(()),
                    Ok(now) => after = now,
                    Err(error) => {
                        tracing::debug!(target: "jobs::monit", %error, "Failed fetching monit incarnation")
                    }
                }
                tracing::debug!(target: "jobs::monit", before, after, "Waiting for monit to reload");
                tokio::time::sleep(self.options.reload_check_interval).await;
            }
        }
        Err(SupervisorError::Reload { before, after })
    }

    async fn incarnation(&self) -> Result<i64, String> {
        let status = self.client.status().await.map_err(|e| e.to_string())?;
        status.incarnation_number().map_err(|e| e.to_string())
    }

    /// The monit client.
    pub fn client(&self) -> &MonitClient {
        &self.client
    }

    /// `<base>/monit/stopped`: present while the director wants the jobs stopped.
    pub fn stopped_file(&self) -> PathBuf {
        stopped_file(&self.base_dir)
    }

    /// Starts every vcap service, then removes the stopped marker. Stops at the first failure.
    pub async fn start(&self) -> Result<(), SupervisorError> {
        let services = self
            .client
            .services_in_group(VCAP_GROUP)
            .await
            .map_err(SupervisorError::Services)?;
        for service in services {
            tracing::debug!(target: "jobs::monit", %service, "starting service");
            self.client
                .start_service(&service)
                .await
                .map_err(|source| SupervisorError::Start { service, source })?;
        }
        let path = self.stopped_file();
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SupervisorError::RemoveStopped { path, source }),
        }
    }

    /// Protocol ≤ 2: asks monit to stop every vcap service, then writes the stopped marker.
    /// Does not wait for the services to be down.
    pub async fn stop(&self) -> Result<(), SupervisorError> {
        let services = self
            .client
            .services_in_group(VCAP_GROUP)
            .await
            .map_err(SupervisorError::Services)?;
        for service in services {
            tracing::debug!(target: "jobs::monit", %service, "stopping service");
            self.client
                .stop_service(&service)
                .await
                .map_err(|source| SupervisorError::Stop { service, source })?;
        }
        self.write_stopped_file().await
    }

    /// Protocol > 2: waits until no vcap service is pending, runs `monit stop -g vcap`, writes
    /// the stopped marker, then waits until no vcap service is monitored or pending. An errored
    /// service fails the call; the whole operation is bounded by `stop_timeout`.
    pub async fn stop_and_wait(&self) -> Result<(), SupervisorError> {
        let deadline = tokio::time::Instant::now() + self.options.stop_timeout;
        let after = describe(self.options.stop_timeout);
        loop {
            let services = self.vcap_services().await?;
            let pending = names(&services, |s| s.pending);
            if pending.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SupervisorError::PendingTimeout {
                    services: pending.join(", "),
                    after,
                });
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }

        self.monitor_before_stop(deadline).await?;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Err(e) = self.run_cli(&["stop", "-g", VCAP_GROUP], remaining).await {
            match self.run_cli(&["summary"], Duration::from_secs(10)).await {
                Ok(summary) => {
                    tracing::error!(target: "jobs::monit", error = %e, %summary, "Failed to stop jobs")
                }
                Err(summary_error) => {
                    tracing::error!(target: "jobs::monit", error = %e, %summary_error, "Failed to stop jobs; also failed to get monit summary")
                }
            }
            return Err(e);
        }
        self.write_stopped_file().await?;

        loop {
            let services = self.vcap_services().await?;
            let errored = names(&services, |s| s.errored);
            if !errored.is_empty() {
                return Err(SupervisorError::Errored { services: errored });
            }
            let to_stop = names(&services, |s| s.monitored || s.pending);
            if to_stop.is_empty() {
                tracing::debug!(target: "jobs::monit", "Successfully stopped all services");
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SupervisorError::StopTimeout {
                    services: to_stop.join(", "),
                    after,
                });
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
    }

    /// Monit 5.2.5 (the stemcell's) runs the stop program of a service that is not monitored;
    /// later monits (Debian's 5.33) skip it and only mark the service stopped, which would
    /// leave a job's processes running after a drain (drain unmonitors first). So services
    /// that are not monitored are monitored again, and the stop is sent once monit has taken
    /// that in (bounded by `deadline`), so their stop programs run whatever the monit version.
    async fn monitor_before_stop(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<(), SupervisorError> {
        let services = self.vcap_services().await?;
        let unmonitored = names(&services, |s| !s.monitored);
        if unmonitored.is_empty() {
            return Ok(());
        }
        tracing::debug!(target: "jobs::monit", services = %unmonitored.join(", "), "monitoring again before the stop");
        for service in &unmonitored {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.run_cli(&["monitor", service], remaining).await?;
        }
        // Monit holds one pending action per service: a stop sent before the monitor is
        // processed would replace it.
        let settle = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let services = self.vcap_services().await?;
            let waiting = names(&services, |s| s.pending || !s.monitored);
            let now = tokio::time::Instant::now();
            if waiting.is_empty() || now >= settle || now >= deadline {
                return Ok(());
            }
            tokio::time::sleep(self.options.poll_interval.min(Duration::from_millis(200))).await;
        }
    }

    /// Asks monit to stop monitoring every vcap service (before drain). Stops at the first
    /// failure.
    pub async fn unmonitor(&self) -> Result<(), SupervisorError> {
        let services = self
            .client
            .services_in_group(VCAP_GROUP)
            .await
            .map_err(SupervisorError::Services)?;
        for service in services {
            tracing::debug!(target: "jobs::monit", %service, "unmonitoring service");
            self.client
                .unmonitor_service(&service)
                .await
                .map_err(|source| SupervisorError::Unmonitor { service, source })?;
        }
        Ok(())
    }

    /// The aggregate job state (see [`job_state_expecting`], with the count of
    /// [`JobSupervisor::set_expected_jobs`]). Never fails: an unreachable monit is `unknown`.
    pub async fn job_state(&self) -> JobState {
        let status = match self.client.status().await {
            Ok(status) => status,
            Err(error) => {
                tracing::debug!(target: "jobs::monit", %error, "job state unknown");
                return JobState::Unknown;
            }
        };
        let stopped = tokio::fs::try_exists(self.stopped_file())
            .await
            .unwrap_or(false);
        job_state_expecting(Some(&status), stopped, self.expected_jobs())
    }

    /// One [`Process`] per vcap service, in monit's order.
    pub async fn processes(&self) -> Result<Vec<Process>, SupervisorError> {
        let status = self
            .client
            .status()
            .await
            .map_err(SupervisorError::Processes)?;
        Ok(status
            .services_in_group(VCAP_GROUP)
            .iter()
            .map(Process::from)
            .collect())
    }

    async fn vcap_services(&self) -> Result<Vec<Service>, SupervisorError> {
        let status = self
            .client
            .status()
            .await
            .map_err(SupervisorError::Status)?;
        Ok(status.services_in_group(VCAP_GROUP))
    }

    async fn write_stopped_file(&self) -> Result<(), SupervisorError> {
        let path = self.stopped_file();
        let result = async {
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            tokio::fs::write(&path, b"").await
        }
        .await;
        result.map_err(|source| SupervisorError::CreateStopped { path, source })
    }

    /// Runs the monit CLI with `args`, bounded by `limit`; returns its stdout.
    async fn run_cli(&self, args: &[&str], limit: Duration) -> Result<String, SupervisorError> {
        let cli = &self.options.monit_cli;
        let mut command = tokio::process::Command::new(&cli.binary);
        let mut words = vec![cli.binary.display().to_string()];
        if let Some(rc) = &cli.control_file {
            command.arg("-c").arg(rc);
            words.push("-c".to_string());
            words.push(rc.display().to_string());
        }
        command.args(args);
        words.extend(args.iter().map(|a| a.to_string()));
        command
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let line = words.join(" ");
        let fail = |reason: String| SupervisorError::StopCommand {
            command: line.clone(),
            reason,
        };
        let output = match tokio::time::timeout(limit, command.output()).await {
            Err(_) => return Err(fail(format!("no exit within {limit:?}"))),
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Ok(Ok(output)) => output,
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            return Ok(stdout);
        }
        Err(fail(format!(
            "{}; stdout: {:?}; stderr: {:?}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// `<base>/monit/stopped`.
pub fn stopped_file(base_dir: &Path) -> PathBuf {
    base_dir.join("monit").join("stopped")
}

fn names(services: &[Service], keep: impl Fn(&Service) -> bool) -> Vec<String> {
    services
        .iter()
        .filter(|s| keep(s))
        .map(|s| s.name.clone())
        .collect()
}

/// "5 minutes" for whole minutes (upstream's wording), otherwise the Debug form ("1.5s").
fn describe(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs >= 60 && secs.is_multiple_of(60) {
        let minutes = secs / 60;
        format!("{minutes} minute{}", if minutes == 1 { "" } else { "s" })
    } else {
        format!("{d:?}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::status::{ServiceGroup, ServiceStatus};

    fn status(services: &[(&str, i64, i64)], group: &[&str]) -> MonitStatus {
        MonitStatus {
            services: services
                .iter()
                .map(|(name, monitor, status)| ServiceStatus {
                    name: name.to_string(),
                    monitor: *monitor,
                    status: *status,
                    ..ServiceStatus::default()
                })
                .collect(),
            service_groups: vec![ServiceGroup {
                name: VCAP_GROUP.to_string(),
                services: group.iter().map(|s| s.to_string()).collect(),
            }],
            ..MonitStatus::default()
        }
    }

    #[test]
    fn a_reload_waits_only_while_the_clock_is_in_the_incarnations_second() {
        use std::time::{SystemTime, UNIX_EPOCH};
        let at = |secs: u64, millis: u64| UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis);
        let ms = Duration::from_millis;
        let margin = RELOAD_CLOCK_MARGIN;
        let inc = 1_800_000_000_i64;
        let s = 1_800_000_000_u64;
        // In the incarnation's second: until the next one, plus the margin.
        assert_eq!(wait_before_reload(inc, at(s, 0)), ms(1000) + margin);
        assert_eq!(wait_before_reload(inc, at(s, 1)), ms(999) + margin);
        assert_eq!(wait_before_reload(inc, at(s, 500)), ms(500) + margin);
        assert_eq!(wait_before_reload(inc, at(s, 999)), ms(1) + margin);
        let nanos = UNIX_EPOCH + Duration::new(s, 999_999_999);
        assert_eq!(
            wait_before_reload(inc, nanos),
            Duration::from_nanos(1) + margin
        );
        // Past it: no wait, whatever the distance.
        for now in [
            at(s + 1, 0),
            at(s + 1, 999),
            at(s + 2, 0),
            at(s + 86_400, 5),
        ] {
            assert_eq!(wait_before_reload(inc, now), Duration::ZERO);
        }
        // A clock stepped back by less than a second: past the incarnation's second too.
        assert_eq!(wait_before_reload(inc, at(s - 1, 0)), ms(2000) + margin);
        assert_eq!(wait_before_reload(inc, at(s - 1, 700)), ms(1300) + margin);
        // Stepped back further: the reload's incarnation is earlier, so different; no wait.
        for now in [at(s - 2, 999), at(s - 3600, 0), UNIX_EPOCH] {
            assert_eq!(wait_before_reload(inc, now), Duration::ZERO);
        }
        // Nonsense incarnations never wait long, and a clock before 1970 never waits.
        for before in [i64::MIN, -1, 0, i64::MAX] {
            assert!(wait_before_reload(before, SystemTime::now()) <= ms(2000) + margin);
        }
        assert_eq!(
            wait_before_reload(inc, UNIX_EPOCH - Duration::from_secs(1)),
            Duration::ZERO
        );
        // From two seconds before the incarnation to two after, every 7 ms: in the two
        // seconds that could give the same incarnation the reload lands after them; in any
        // other second there is no wait.
        for millis in (0..5000).step_by(7) {
            let now = at(s - 2, 0) + ms(millis);
            let second = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
            let wait = wait_before_reload(inc, now);
            let lands = (now + wait).duration_since(UNIX_EPOCH).unwrap().as_secs();
            if second == s - 1 || second == s {
                assert_eq!(lands, s + 1, "{millis} ms: waits {wait:?}");
            } else {
                assert_eq!(wait, Duration::ZERO, "{millis} ms");
            }
        }
    }

    #[test]
    fn job_state_covers_every_branch_in_upstreams_order() {
        let running = status(&[("a", 1, 0), ("b", 1, 0)], &["a", "b"]);
        assert_eq!(job_state_of(None, false), JobState::Unknown);
        assert_eq!(job_state_of(None, true), JobState::Unknown);
        assert_eq!(job_state_of(Some(&running), true), JobState::Stopped);
        assert_eq!(job_state_of(Some(&running), false), JobState::Running);
        // Starting wins over failing, whatever the order.
        let mixed = status(&[("a", 1, 512), ("b", 2, 0)], &["a", "b"]);
        assert_eq!(job_state_of(Some(&mixed), false), JobState::Starting);
        let failing = status(&[("a", 1, 0), ("b", 1, 512)], &["a", "b"]);
        assert_eq!(job_state_of(Some(&failing), false), JobState::Failing);
        let unmonitored = status(&[("a", 0, 0), ("b", 1, 0)], &["a", "b"]);
        assert_eq!(job_state_of(Some(&unmonitored), false), JobState::Failing);
        // Services outside the vcap group do not count.
        let outside = status(&[("a", 1, 0), ("sys", 0, 512)], &["a"]);
        assert_eq!(job_state_of(Some(&outside), false), JobState::Running);
        // An empty (or missing) group is running.
        let empty = status(&[("sys", 2, 0)], &[]);
        assert_eq!(job_state_of(Some(&empty), false), JobState::Running);
        assert_eq!(
            job_state_of(Some(&MonitStatus::default()), false),
            JobState::Running
        );
        // A spec with jobs but no vcap service in monit is failing, not running.
        assert_eq!(
            job_state_expecting(Some(&empty), false, 2),
            JobState::Failing
        );
        assert_eq!(
            job_state_expecting(Some(&empty), true, 2),
            JobState::Stopped
        );
        assert_eq!(job_state_expecting(None, false, 2), JobState::Unknown);
        assert_eq!(
            job_state_expecting(Some(&running), false, 5),
            JobState::Running
        );
        assert_eq!(
            serde_json::to_string(&JobState::Stopped).unwrap(),
            "\"stopped\""
        );
    }

    #[test]
    fn processes_serialize_like_upstream() {
        let s = Service {
            name: "nats".into(),
            monitored: true,
            errored: false,
            pending: false,
            status: ProcessState::Running,
            status_message: String::new(),
            uptime: 880_183,
            memory_percent_total: 0.4,
            memory_kilobytes_total: 4004,
            cpu_percent_total: 2.5,
        };
        let json = serde_json::to_value(vec![Process::from(&s)]).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"name":"nats","state":"running","uptime":{"secs":880183},
                "mem":{"kb":4004,"percent":0.4},"cpu":{"total":2.5}}])
        );
        let zero = Service {
            uptime: 0,
            memory_kilobytes_total: 0,
            status: ProcessState::Unknown,
            ..s
        };
        assert_eq!(
            serde_json::to_string(&Process::from(&zero)).unwrap(),
            r#"{"name":"nats","state":"unknown","uptime":{},"mem":{"percent":0.4},"cpu":{"total":2.5}}"#
        );
    }

    #[test]
    fn errors_read_like_upstream() {
        let e = SupervisorError::Errored {
            services: vec!["a".into(), "b".into()],
        };
        assert_eq!(e.to_string(), "Stopping services '[a b]' errored");
        let e = SupervisorError::StopTimeout {
            services: "a, b".into(),
            after: describe(Duration::from_secs(300)),
        };
        assert_eq!(
            e.to_string(),
            "Timed out waiting for services 'a, b' to stop after 5 minutes"
        );
        assert_eq!(describe(Duration::from_secs(60)), "1 minute");
        assert_eq!(describe(Duration::from_millis(1500)), "1.5s");
    }
}
