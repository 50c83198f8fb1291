//! The application: bootstrap order, agent.json, and the loop that keeps the firewall as
//! desired until SIGTERM.
//!
//! Bootstrap order (this part of it): own cgroup isolated first (before any socket is
//! opened, because a socket keeps the cgroup it was created in) → agent.json → identity
//! self-test → monit firewall applied → reconcile every `ReconcileIntervalSeconds` until
//! SIGTERM/SIGINT. The firewall stays in place when the agent stops: it protects monit while
//! the agent is down.
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod firewall;
pub mod settings;

use std::path::PathBuf;
use std::time::Duration;

use platform::cgroup::{self, Isolation};
use platform::firewall::nft::{Nft, run_dir};
use tracing::{Instrument, error, info, info_span, warn};

pub use config::{AgentConfig, ConfigError};

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
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(opts: RunOptions) -> Result<(), AgentError> {
    if opts.platform != "ubuntu" {
        return Err(AgentError::Platform(opts.platform));
    }
    if opts.job_supervisor != "monit" {
        return Err(AgentError::Supervisor(opts.job_supervisor));
    }
    isolate();
    let config = AgentConfig::load(&opts.config)?;
    info!(config = %opts.config.display(), base_dir = %opts.base_dir.display(), "bosh-agent starting");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    rt.block_on(serve(config))
}

/// Moves the agent into a dedicated child cgroup when its cgroup is shared.
fn isolate() {
    let _span = info_span!("cgroup").entered();
    match cgroup::isolate_self() {
        Ok(Isolation::AlreadyAlone) => info!("the agent's cgroup holds only the agent"),
        Ok(Isolation::Moved { from, to, sharers }) => info!(
            from = %from.display(), to = %to.display(), sharers = sharers.len(),
            "the agent's cgroup was shared with processes it did not start; moved into a dedicated child cgroup"
        ),
        Err(e) => warn!(error = %e, "cannot check or isolate the agent's cgroup"),
    }
}

async fn serve(config: AgentConfig) -> Result<(), AgentError> {
    let linux = &config.platform.linux;
    let span = info_span!("firewall");
    let mut fw = span.in_scope(|| {
        let mut fw = firewall::Firewall::establish(linux, Nft::default(), run_dir());
        match fw.apply() {
            Ok(_) => info!(identity = %fw.desired().identity, "firewall installed"),
            Err(e) => error!(error = %e, "installing the firewall failed; will retry"),
        }
        fw
    });
    let every = Duration::from_secs(linux.firewall.reconcile_interval_seconds.max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Runtime)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(AgentError::Runtime)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                async {
                    if let Err(e) = fw.reconcile() {
                        error!(error = %e, "firewall reconcile failed; will retry");
                    }
                }
                .instrument(span.clone())
                .await;
            }
        }
    }
    info!("stopping; the firewall stays in place");
    Ok(())
}
