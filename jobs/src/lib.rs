//! Job supervision for the agent: monit's HTTP API (status, start, stop, unmonitor, the
//! aggregate job state) and the job scripts (`run_script`, `drain`) with their logs.
//!
//! Compatible with upstream's `jobsupervisor/monit` and `agent/script`: same endpoint and
//! credentials file, same retry policy, same job state rules, same script paths, arguments,
//! environment and error messages. This crate knows nothing of NATS, settings or the firewall.
#![forbid(unsafe_code)]

pub mod client;
pub mod http;
mod random;
pub mod scripts;
pub mod status;
pub mod supervisor;
#[cfg(test)]
mod testutil;

pub use client::{
    ClientOptions, Credentials, DEFAULT_ENDPOINT, MONIT_USER, MonitClient, MonitError, RetryPolicy,
    monit_user_path, parse_monit_user, read_monit_user, setup_monit_user,
};
pub use scripts::drain::{DrainOptions, DrainParams, DrainSpec, HashChange, JobChange, drain};
pub use scripts::{
    JobFailure, JobScriptError, RunScriptError, SCRIPT_PATH, ScriptsFailed, run_script,
};
pub use status::{
    MonitStatus, ProcessState, Service, ServiceStatus, StatusParseError, VCAP_GROUP, parse_status,
};
pub use supervisor::{
    CpuVitals, JobState, JobSupervisor, MemoryVitals, MonitCli, Process, SupervisorError,
    SupervisorOptions, UptimeVitals, job_state_of, stopped_file,
};
/// The cancellation signal [`drain`] listens to.
pub use tokio_util::sync::CancellationToken;
