//! The application: the agent's life ([`lifecycle`]: build, spawn, drain), the director's
//! requests ([`director`]), the firewall task ([`firewall`]), heartbeats ([`heartbeat`]) and
//! monit's alert mails ([`alerts`]), with agent.json ([`config`]) and settings.json
//! ([`settings`]) as their inputs.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod config;
pub mod director;
pub mod firewall;
pub mod heartbeat;
pub mod lifecycle;
pub mod settings;

use std::path::PathBuf;
use std::time::Duration;

pub use config::{AgentConfig, ConfigError};
pub use lifecycle::App;

/// Upstream's start flags.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `-P`: only `ubuntu` (any Linux stemcell) is supported.
    pub platform: String,
    /// `-C`: path of agent.json.
    pub config: PathBuf,
    /// `-b`: base directory (`/var/vcap`).
    pub base_dir: PathBuf,
    /// `-M`: job supervisor (`monit`).
    pub job_supervisor: String,
}

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("platform {0:?} is not supported (use ubuntu)")]
    Platform(String),
    #[error("job supervisor {0:?} is not supported (use monit)")]
    Supervisor(String),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Vm(#[from] director::actions::vm::VmPartsError),
}

/// Runs the agent until SIGTERM or SIGINT: [`App::build`], [`App::spawn`], then the drain.
pub fn run(opts: RunOptions) -> Result<(), AgentError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let res = rt.block_on(async { App::build(opts).await?.spawn().until_signal().await });
    // A blocking call the grace period cut (the firewall waiting for its lock) must not hold
    // the exit: it was logged by name.
    rt.shutdown_timeout(Duration::from_millis(200));
    res
}
