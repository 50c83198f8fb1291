//! The application: bootstrap order, agent.json, and the loop that keeps the firewall as
//! desired until SIGTERM.
//!
//! Bootstrap order: own cgroup isolated first (before any socket is opened, because a socket
//! keeps the cgroup it was created in) → agent.json → identity self-test → monit firewall
//! applied → monit user → secret files narrowed, data directory tree → settings → the bus
//! (newest mbus first, with a fallback) → reconcile every `ReconcileIntervalSeconds` until
//! SIGTERM/SIGINT. The firewall stays in place when the agent stops: it protects monit while
//! the agent is down.
#![forbid(unsafe_code)]

pub mod actions;
pub mod alerts;
pub mod commands;
pub mod config;
pub mod deploy;
pub mod dispatch;
pub mod firewall;
pub mod heartbeat;
pub mod mbus_fallback;
pub mod nats;
pub mod protocol;
pub mod settings;
pub mod tasks;
pub mod update_settings;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mbus::{Bus, BusOptions, IncomingMessage, NoHook, Requests, ResolverSource, Target, Topic};

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
    let creds = match jobs::setup_monit_user(&base_dir).await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cannot set up the monit user file; job state will be unknown");
            jobs::Credentials {
                user: "vcap".into(),
                password: String::new(),
            }
        }
    };
    start_monit(&base_dir, &linux.service_manager).await;
    settings::secure_files(&base_dir);
    // The stemcell layout gets upstream's tmpfs on data/sys/run; another base directory (a
    // sandbox) gets the same tree without mounts.
    if let Err(e) = platform::datadir::setup(&base_dir, base_dir == Path::new("/var/vcap")) {
        error!(error = %e, "cannot set up the data directory; installing jobs will fail");
    }
    let settings = settings::load(&config, &base_dir).unwrap_or_else(|e| {
        error!(error = %e, "no settings: the agent cannot reach the director");
        serde_json::Value::Null
    });
    let update_settings = settings::load_update_settings(&base_dir);
    let (bus, mut requests, candidates) =
        match start_bus(&config, &settings, &base_dir, update_settings.as_ref(), &fw) {
            Some((b, r, c)) => (Some(b), Some(r), Some(c)),
            None => (None, None, None),
        };
    if let (Some(b), Some(c)) = (&bus, &candidates) {
        tokio::spawn(
            mbus_fallback::supervise(b.clone(), c.clone(), mbus_fallback::fallback_after())
                .instrument(info_span!("mbus")),
        );
    }
    {
        // The read-back of the first apply, off the start-up path. With the NATS firewall on,
        // the before-connect hook takes it right after its dial (a read-back now would hold
        // the firewall while the hook waits for it); this is the fallback if no dial comes.
        let delay = if bus.is_some() && linux.enable_nats_firewall {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        let fw = fw.clone();
        let span = span.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let res = tokio::task::spawn_blocking(move || {
                fw.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read_back_if_due()
            })
            .await;
            if let Ok(Err(e)) = res {
                span.in_scope(|| warn!(error = %e, "reading the firewall back failed; the reconcile loop will retry"));
            }
        });
    }
    let supervisor = jobs::JobSupervisor::new(
        jobs::MonitClient::new(jobs::ClientOptions::default(), creds),
        base_dir.clone(),
        jobs::SupervisorOptions {
            // The stemcell's monitrc, for `monit stop -g vcap` (stop with protocol > 2).
            monit_cli: jobs::MonitCli {
                binary: "monit".into(),
                control_file: Some(base_dir.join("bosh").join("etc").join("monitrc"))
                    .filter(|p| p.exists()),
            },
            ..jobs::SupervisorOptions::default()
        },
    );
    // After a restart, the applied spec says how many jobs monit should be running.
    if let Ok(spec) = actions::read_spec(&base_dir)
        && deploy::has_configuration(&spec)
        && let Ok(typed) = deploy::parse_spec(&spec)
    {
        supervisor.set_expected_jobs(typed.jobs().len());
    }
    let ctx = Arc::new(dispatch::Context {
        base_dir: base_dir.clone(),
        agent_id: settings
            .get("agent_id")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        settings: settings.clone(),
        tasks: tasks::Tasks::start(),
        jobs: Arc::new(supervisor),
        notifier: bus.clone().map(|bus| actions::Notifier { bus }),
        mbus_candidates: candidates,
    });
    if let Some(b) = &bus {
        spawn_heartbeats(
            ctx.clone(),
            b.clone(),
            linux.heartbeat_interval_seconds.unwrap_or(30),
        );
        spawn_alerts(b.clone(), &settings).await;
        spawn_firewall_alerts(b.clone(), every_reconcile(linux));
    }

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
                Some(m) => {
                    if let Some(b) = &bus {
                        tokio::spawn(handle(ctx.clone(), b.clone(), m));
                    }
                }
                None => requests = None,
            },
            _ = tick.tick() => {
                let fw = fw.clone();
                let stats = bus.as_ref().map(|b| b.stats().snapshot());
                let res = tokio::task::spawn_blocking(move || {
                    let mut fw = fw.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(s) = stats {
                        fw.set_bus_stats(serde_json::to_value(s).ok());
                    }
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
/// The candidates, in order: the persisted `update_settings` (upstream's precedence), the mbus
/// that last connected (when it differs), and the settings alone (when nothing connected
/// before). The bus starts on the first usable one; [`mbus_fallback::supervise`] moves on
/// when it does not connect.
fn start_bus(
    config: &AgentConfig,
    settings: &serde_json::Value,
    base_dir: &Path,
    update_settings: Option<&serde_json::Value>,
    fw: &Arc<Mutex<firewall::Firewall>>,
) -> Option<(Bus, Requests, Arc<mbus_fallback::Candidates>)> {
    let _span = info_span!("mbus").entered();
    let not_started = |why: String| {
        error!(error = %why, "the message bus cannot start");
        let mut fw = fw.lock().unwrap_or_else(|e| e.into_inner());
        fw.set_bus_stats(Some(serde_json::json!({ "startup_error": why })));
    };
    if settings.is_null() {
        not_started("no settings (see the log for the settings source error)".into());
        return None;
    }
    let mut list: Vec<mbus_fallback::Candidate> = Vec::new();
    if let Some(u) = update_settings {
        match mbus_fallback::candidate(settings, Some(u), "update_settings.json") {
            Ok(c) => list.push(c),
            Err(why) => warn!(error = %why, "the persisted update_settings give no usable mbus"),
        }
    }
    let mut have_last = false;
    let last_path = update_settings::last_connected_path(base_dir);
    if let Some(doc) = std::fs::read(&last_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    {
        match mbus_fallback::candidate(settings, Some(&doc), "mbus_last_connected.json") {
            Ok(c) => {
                have_last = true;
                if list.iter().all(|x| x.cfg != c.cfg) {
                    list.push(c);
                }
            }
            Err(why) => {
                warn!(error = %why, path = %last_path.display(), "the recorded mbus is not usable")
            }
        }
    }
    let alone = mbus_fallback::candidate(settings, None, "settings");
    match alone {
        Ok(c) if !have_last && list.iter().all(|x| x.cfg != c.cfg) => list.push(c),
        Ok(_) => {}
        Err(e) if list.is_empty() => {
            not_started(format!("settings have no usable mbus: {e}"));
            return None;
        }
        Err(e) => warn!(error = %e, "the settings alone give no usable mbus"),
    }
    let Some(cfg) = list.first().map(|c| c.cfg.clone()) else {
        not_started("no usable mbus configuration".into());
        return None;
    };
    if list.len() > 1 {
        info!(
            first = list[0].origin,
            fallbacks = list.len() - 1,
            "mbus: starting with the newest configuration, with a fallback"
        );
    }
    let candidates = mbus_fallback::Candidates::new(base_dir, settings, list);
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
            Some((bus, requests, candidates))
        }
        Err(e) => {
            not_started(e.to_string());
            None
        }
    }
}

/// The checks `Bus::connect` makes (a dialable URL, usable certificate material), applied to
/// a configuration that includes update_settings before it is preferred.
pub(crate) fn usable(
    cfg: Result<mbus::MbusConfig, mbus::SettingsError>,
) -> Result<mbus::MbusConfig, String> {
    let cfg = cfg.map_err(|e| e.to_string())?;
    if cfg.servers.is_empty() {
        let rejected: Vec<String> = cfg.rejected.iter().map(ToString::to_string).collect();
        return Err(if rejected.is_empty() {
            "no dialable mbus URL".into()
        } else {
            format!("no dialable mbus URL (rejected: {})", rejected.join("; "))
        });
    }
    mbus::tls::client_config(&cfg.cert).map_err(|e| e.to_string())?;
    Ok(cfg)
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

/// Answers one request on its own task: a slow action never delays the next message.
async fn handle(ctx: Arc<dispatch::Context>, bus: Bus, msg: IncomingMessage) {
    let req = match protocol::decode(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "dropping a request that cannot be answered");
            return;
        }
    };
    let resp = dispatch::dispatch(&ctx, &req).await;
    let bytes = protocol::encode_limited(&resp, protocol::RESPONSE_MAX_LEN);
    if let Err(e) = bus.publish(req.reply_to.clone(), bytes.into()).await {
        warn!(error = %e, method = %req.method, "cannot reply");
    }
}

/// Heartbeats: one as soon as the bus is connected, then every `every` seconds.
fn spawn_heartbeats(ctx: Arc<dispatch::Context>, bus: Bus, every: u64) {
    tokio::spawn(
        async move {
            let mut state = bus.watch_state();
            let _ = state
                .wait_for(|s| matches!(s, mbus::ConnectionState::Connected { .. }))
                .await;
            let mut tick = tokio::time::interval(Duration::from_secs(every.max(1)));
            loop {
                tick.tick().await;
                let hb = heartbeat::collect(&ctx).await;
                let bytes = serde_json::to_vec(&hb).unwrap_or_default();
                if let Err(e) = bus
                    .publish_to(Target::HealthMonitor, Topic::Heartbeat, bytes.into())
                    .await
                {
                    warn!(error = %e, "heartbeat not sent");
                }
            }
        }
        .instrument(info_span!("heartbeat")),
    );
}

fn every_reconcile(linux: &config::LinuxOptions) -> Duration {
    Duration::from_secs(linux.firewall.reconcile_interval_seconds.max(1))
}

/// Sends an alert when the firewall is degraded (uid fallback, a failed change): once
/// connected, then whenever the problems change. A firewall failure never goes unnoticed.
fn spawn_firewall_alerts(bus: Bus, every: Duration) {
    tokio::spawn(
        async move {
            let mut state = bus.watch_state();
            let _ = state
                .wait_for(|s| matches!(s, mbus::ConnectionState::Connected { .. }))
                .await;
            let mut sent: Option<serde_json::Value> = None;
            loop {
                let report = firewall::report(&run_dir());
                let problems = report.get("problems").cloned();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                match firewall::degraded_alert(&report, now) {
                    Some(alert) if sent != problems => {
                        let bytes = serde_json::to_vec(&alert).unwrap_or_default();
                        match bus
                            .publish_to(Target::HealthMonitor, Topic::Alert, bytes.into())
                            .await
                        {
                            Ok(()) => {
                                warn!(summary = %alert["summary"], "firewall degraded; alert sent");
                                sent = problems;
                            }
                            Err(e) => warn!(error = %e, "firewall alert not sent; will retry"),
                        }
                    }
                    Some(_) => {}
                    None => sent = None,
                }
                tokio::time::sleep(every).await;
            }
        }
        .instrument(info_span!("firewall")),
    );
}

/// The SMTP receiver monit mails alerts to, forwarding them to the health monitor.
async fn spawn_alerts(bus: Bus, settings: &serde_json::Value) {
    let ips: Vec<String> = settings
        .get("networks")
        .and_then(|n| n.as_object())
        .map(|n| {
            n.values()
                .filter_map(|v| v.get("ip")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    // The bind is retried with backoff (logged) until it succeeds or the agent stops: a
    // port held at boot must not leave monit's alerts undelivered for the agent's lifetime.
    tokio::spawn(async move {
        let listener = alerts::bind_with_retry(
            alerts::LISTEN_ADDR,
            alerts::BIND_RETRY_INITIAL,
            alerts::BIND_RETRY_MAX,
        )
        .await;
        if let Err(e) = alerts::serve(listener, ips, tx).await {
            error!(error = %e, "monit alert listener stopped");
        }
    });
    tokio::spawn(async move {
        while let Some(alert) = rx.recv().await {
            let bytes = serde_json::to_vec(&alert).unwrap_or_default();
            if let Err(e) = bus
                .publish_to(Target::HealthMonitor, Topic::Alert, bytes.into())
                .await
            {
                warn!(error = %e, "alert not sent");
            }
        }
    });
}

/// Starts monit through the service manager, as upstream (10 tries, 1 s apart) — only for the
/// stemcell layout (`-b /var/vcap`): with another base directory (tests, sandboxes) the
/// caller runs its own monit, and the host's must not be touched.
async fn start_monit(base_dir: &Path, service_manager: &str) {
    if base_dir != Path::new("/var/vcap") {
        info!(base_dir = %base_dir.display(), "not the stemcell layout: monit is not started by the agent");
        return;
    }
    let (cmd, args): (&str, &[&str]) = if service_manager == "systemd" {
        ("systemctl", &["start", "monit"])
    } else {
        ("sv", &["start", "monit"])
    };
    for attempt in 1..=10 {
        match tokio::process::Command::new(cmd).args(args).status().await {
            Ok(s) if s.success() => {
                info!(%cmd, "monit started");
                return;
            }
            other => warn!(attempt, ?other, %cmd, "starting monit failed"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    error!("monit could not be started; job state will be unknown");
}
