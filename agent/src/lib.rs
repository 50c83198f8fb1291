//! The application: bootstrap order, agent.json, and the loop that keeps the firewall as
//! desired until SIGTERM.
//!
//! Bootstrap order (this part of it): own cgroup isolated first (before any socket is
//! opened, because a socket keeps the cgroup it was created in) → agent.json → identity
//! self-test → monit firewall applied → reconcile every `ReconcileIntervalSeconds` until
//! SIGTERM/SIGINT. The firewall stays in place when the agent stops: it protects monit while
//! the agent is down.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod commands;
pub mod config;
pub mod dispatch;
pub mod firewall;
pub mod nats;
pub mod settings;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mbus::{Bus, BusOptions, IncomingMessage, NoHook, Requests, ResolverSource};

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
    rt.block_on(serve(config, opts.base_dir))
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

async fn serve(config: AgentConfig, base_dir: PathBuf) -> Result<(), AgentError> {
    let linux = &config.platform.linux;
    let span = info_span!("firewall");
    let fw = span.in_scope(|| {
        let mut fw = firewall::Firewall::establish(linux, Nft::default(), run_dir());
        match fw.apply() {
            Ok(_) => info!(identity = %fw.desired().identity, "firewall installed"),
            Err(e) => error!(error = %e, "installing the firewall failed; will retry"),
        }
        fw
    });
    let fw = Arc::new(Mutex::new(fw));
    let (bus, mut requests) = match start_bus(&config, &base_dir, &fw) {
        Some((b, r)) => (Some(b), Some(r)),
        None => (None, None),
    };

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
            msg = next_request(&mut requests) => match msg {
                Some(m) => handle(bus.as_ref(), m).await,
                None => requests = None,
            },
            _ = tick.tick() => {
                let fw = fw.clone();
                let stats = bus.as_ref().map(|b| b.stats().snapshot());
                let res = tokio::task::spawn_blocking(move || {
                    let mut fw = fw.lock().unwrap_or_else(|e| e.into_inner());
                    fw.set_bus_stats(stats.and_then(|s| serde_json::to_value(s).ok()));
                    fw.reconcile()
                })
                .instrument(span.clone())
                .await;
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => span.in_scope(|| error!(error = %e, "firewall reconcile failed; will retry")),
                    Err(e) => span.in_scope(|| error!(error = %e, "firewall reconcile task failed")),
                }
            }
        }
    }
    info!("stopping; the firewall stays in place");
    if let Some(b) = bus {
        b.shutdown().await;
    }
    Ok(())
}

/// Starts the bus, or logs why it cannot (the agent keeps its firewall running either way).
fn start_bus(
    config: &AgentConfig,
    base_dir: &Path,
    fw: &Arc<Mutex<firewall::Firewall>>,
) -> Option<(Bus, Requests)> {
    let _span = info_span!("mbus").entered();
    let settings = match settings::load(config, base_dir) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "no settings: the agent cannot reach the director");
            return None;
        }
    };
    let cfg = match mbus::mbus_config(&settings, None) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "settings have no usable mbus");
            return None;
        }
    };
    for s in &cfg.skipped {
        info!(url = %s, "https mbus URL skipped (create-env)");
    }
    for r in &cfg.rejected {
        error!(error = %r, "mbus URL rejected");
    }
    let hook: Arc<dyn mbus::BeforeConnect> = if config.platform.linux.enable_nats_firewall {
        Arc::new(nats::FirewallHook::new(fw.clone()))
    } else {
        Arc::new(NoHook)
    };
    let options = BusOptions {
        resolver: resolver_source(),
        ..BusOptions::default()
    };
    match Bus::connect(&cfg, hook, options) {
        Ok((bus, requests)) => {
            info!(agent_id = %cfg.agent_id, servers = cfg.servers.len(), "connecting to the director");
            Some((bus, requests))
        }
        Err(e) => {
            error!(error = %e, "cannot start the message bus");
            None
        }
    }
}

/// `BOSH_AGENT_RESOLV_CONF` / `BOSH_AGENT_HOSTS` point resolution at other files (tests use
/// them to aim at their own DNS server); by default the system's, re-read every attempt.
fn resolver_source() -> ResolverSource {
    match std::env::var_os("BOSH_AGENT_RESOLV_CONF") {
        Some(rc) => ResolverSource::Files {
            resolv_conf: PathBuf::from(rc),
            hosts: std::env::var_os("BOSH_AGENT_HOSTS").map(PathBuf::from),
        },
        None => ResolverSource::System,
    }
}

async fn next_request(r: &mut Option<Requests>) -> Option<IncomingMessage> {
    match r {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

async fn handle(bus: Option<&Bus>, msg: IncomingMessage) {
    let Some(bus) = bus else { return };
    let req = match dispatch::decode(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "dropping a request that cannot be answered");
            return;
        }
    };
    let body = dispatch::respond(&req);
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    if let Err(e) = bus.publish(req.reply_to.clone(), bytes.into()).await {
        warn!(error = %e, method = %req.method, "cannot reply");
    }
}
