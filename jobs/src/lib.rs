//! The agent's jobs and packages: monit's HTTP API (status, start, stop, unmonitor, reload, the
//! aggregate job state), the job scripts (`run_script`, `drain`) with their logs, installing
//! and enabling jobs and packages from an apply spec ([`applier`], [`spec`]) and compiling
//! packages ([`compiler`]).
//!
//! Compatible with upstream's `jobsupervisor/monit`, `agent/script`, `agent/applier` and
//! `agent/compiler`: same endpoint and credentials file, same retry policy, same job state
//! rules, same script paths, arguments, environment and error messages, same bundle layout
//! under `/var/vcap`. Blobs are fetched and unpacked through the `blobstore` crate. This crate
//! knows nothing of NATS, settings or the firewall.
#![forbid(unsafe_code)]

pub mod applier;
pub mod client;
pub mod compiler;
pub mod http;
pub mod logs;
mod random;
pub mod scripts;
pub mod spec;
pub mod status;
pub mod supervisor;

pub use applier::{Applier, ApplyError, DEFAULT_PARALLEL, Layout, bundle_hash};
pub use client::{
    ClientOptions, Credentials, DEFAULT_ENDPOINT, MONIT_USER, MonitClient, MonitError, RetryPolicy,
    monit_user_path, parse_monit_user, read_monit_user, setup_monit_user,
};
pub use compiler::{CompileError, CompileLimits, CompileRequest, compile_package};
pub use scripts::drain::{DrainOptions, DrainParams, DrainSpec, HashChange, JobChange, drain};
pub use scripts::{
    JobFailure, JobScriptError, RunScriptError, SCRIPT_PATH, ScriptsFailed, run_script,
};
pub use spec::{ApplySpec, BlobSource, Job, JobTemplate, PackageSpec, SpecError};
pub use status::{
    MonitStatus, ProcessState, Service, ServiceStatus, StatusParseError, VCAP_GROUP, parse_status,
};
pub use supervisor::{
    CpuVitals, JobState, JobSupervisor, MemoryVitals, MonitCli, Process, SupervisorError,
    SupervisorOptions, UptimeVitals, job_state_expecting, job_state_of, stopped_file,
    wait_before_reload,
};
/// The cancellation signal [`drain`] listens to.
pub use tokio_util::sync::CancellationToken;
