//! The agent's life: [`App::build`] does everything that can fail before anything runs,
//! [`App::spawn`] starts every subsystem as a task of its own (each in its own tracing span,
//! under one cancellation token and one task tracker), and [`Running::shutdown`] drains them
//! in order at SIGTERM/SIGINT.
//!
//! Build order: own cgroup isolated first (before any socket is opened, because a socket keeps
//! the cgroup it was created in) → agent.json → identity self-test → firewall applied → monit
//! user (and monit, on the stemcell layout) → secret files narrowed, data directory tree →
//! settings → the bus's configurations (newest first, with fallbacks) → the job supervisor.
//!
//! Shutdown order: stop taking requests → cancel the cancellable (a running `drain` or
//! `compile_package`: its scripts get SIGTERM) → wait for the rest (requests being answered,
//! a running task) within the grace period (`Platform.Linux.ShutdownGraceSeconds`, 30 s) →
//! the bus flushed and closed → the firewall task stopped and its state written last.
//! Anything still running when the grace period ends is logged by name and left. The firewall
//! stays installed: it protects monit while the agent is down.
//!
//! SIGHUP reloads the firewall policies of agent.json (see [`crate::firewall::Firewall::reload`]);
//! the other keys take effect at the next start, and a reload that sees them changed says so.
//! The pid file ([`pidfile`]) exists while SIGHUP means that, so that `firewall reload` never
//! signals an agent that SIGHUP would end.

pub mod bus;
pub mod pidfile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mbus::{Bus, BusOptions, NoHook, Target, Topic};
use platform::cgroup::{self, Isolation};
use platform::firewall::nft::{Nft, run_dir};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, error, info, info_span, warn};

use crate::config::{self, AgentConfig};
use crate::director::{self, Context, mbus_fallback, protocol, spec, tasks, tasks::Tasks};
use crate::firewall::{Firewall, FirewallHandle, FirewallTask, hook::FirewallHook};
use crate::settings::{self, Settings};
use crate::{AgentError, RunOptions, alerts, heartbeat};

/// The default of `Platform.Linux.ShutdownGraceSeconds`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Everything the agent runs, built and checked, nothing started.
pub struct App {
    base_dir: PathBuf,
    config: AgentConfig,
    config_path: PathBuf,
    /// agent.json as it was at start: what a reload compares with.
    document: serde_json::Value,
    settings: Option<Arc<Settings>>,
    firewall: FirewallTask,
    firewall_handle: FirewallHandle,
    supervisor: Arc<jobs::JobSupervisor>,
    bus: Option<bus::BusPlan>,
    https: Option<director::https::HttpsPlan>,
    grace: Duration,
    vm: director::actions::vm::VmParts,
}

impl App {
    /// Does everything that can fail before anything runs (see the module documentation).
    /// Spawns no task. Only a wrong flag or agent.json stops the start; anything else is
    /// logged and the agent runs without it (the firewall is installed whatever happens).
    pub async fn build(opts: RunOptions) -> Result<App, AgentError> {
        if opts.platform != "ubuntu" {
            return Err(AgentError::Platform(opts.platform));
        }
        if opts.job_supervisor != "monit" {
            return Err(AgentError::Supervisor(opts.job_supervisor));
        }
        isolate();
        let (config, document) = AgentConfig::load_with_document(&opts.config)?;
        info!(config = %opts.config.display(), base_dir = %opts.base_dir.display(), "bosh-agent starting");
        let base_dir = opts.base_dir;
        let linux = &config.platform.linux;
        let mut fw = info_span!("firewall").in_scope(|| {
            let mut fw = Firewall::establish(linux, Nft::default(), run_dir());
            match fw.apply() {
                Ok(_) => info!(identity = %fw.desired().identity, "firewall installed"),
                Err(e) => error!(error = %e, "installing the firewall failed; will retry"),
            }
            fw
        });
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
        let vm = director::actions::vm::VmParts::new(&base_dir, linux)?;
        settings::secure_files(&base_dir);
        // The stemcell layout gets upstream's tmpfs on data/sys/run; another base directory
        // (a sandbox) gets the same tree without mounts.
        if let Err(e) = platform::datadir::setup(&base_dir, base_dir == Path::new("/var/vcap")) {
            error!(error = %e, "cannot set up the data directory; installing jobs will fail");
        }
        let settings = match settings::load(&config, &base_dir) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                error!(error = %e, "no settings: the agent cannot reach the director");
                None
            }
        };
        // The persistent disk is mounted again before monit starts the jobs that use it.
        if let Some(s) = &settings {
            let disks = director::actions::vm::disks_of(s);
            let _span = info_span!("disks").entered();
            match vm.disks.mount_last_managed_disk(&disks) {
                Ok(Some(cid)) => info!(%cid, "persistent disk mounted"),
                Ok(None) => {}
                Err(e) => {
                    error!(error = %e, "mounting the persistent disk failed; jobs that need it will fail")
                }
            }
        }
        start_monit(&base_dir, &linux.service_manager).await;
        let update_settings = settings::load_update_settings(&base_dir);
        // The first mbus URL decides, as upstream: https (create-env) means the agent serves
        // its own API and dials no NATS server.
        let https = match &settings {
            None => Ok(None),
            Some(s) => {
                let _span = info_span!("https").entered();
                director::https::plan(s, update_settings.as_ref())
            }
        };
        let https = match https {
            Ok(p) => Ok(p),
            Err(why) => {
                error!(error = %why, "the agent API cannot start");
                fw.set_bus_stats(Some(serde_json::json!({ "startup_error": why })));
                Err(())
            }
        };
        if let Ok(Some(p)) = &https {
            director::https::report_ingress_cut(&fw.desired().workload, p.url.port);
        }
        let bus = if !matches!(https, Ok(None)) {
            None
        } else {
            let _span = info_span!("mbus").entered();
            let plan = match &settings {
                None => Err("no settings (see the log for the settings source error)".into()),
                Some(s) => bus::plan(s, &base_dir, update_settings.as_ref()),
            };
            match plan {
                Ok(p) => Some(p),
                Err(why) => {
                    error!(error = %why, "the message bus cannot start");
                    fw.set_bus_stats(Some(serde_json::json!({ "startup_error": why })));
                    None
                }
            }
        };
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
        // A damaged spec.json is only named here: the next `apply` rewrites it, and until then
        // the job count is unknown (as before any apply).
        match spec::read_spec(&base_dir) {
            Ok(spec) if director::checks::has_configuration(&spec) => {
                match director::checks::parse_spec(&spec) {
                    Ok(typed) => supervisor.set_expected_jobs(typed.jobs().len()),
                    Err(e) => warn!(error = %e, path = %spec::spec_path(&base_dir).display(),
                        "ignoring the applied spec until the next apply"),
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "ignoring the applied spec until the next apply"),
        }
        let every = Duration::from_secs(linux.firewall.reconcile_interval_seconds.max(1));
        let (mut firewall, firewall_handle) = FirewallTask::new(fw, every);
        // The read-back of the first apply, off the start-up path. With the NATS firewall on,
        // the before-connect hook takes it right after its dial; this is the fallback if no
        // dial comes.
        firewall.read_back_after(if bus.is_some() && linux.enable_nats_firewall {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        });
        let grace = linux
            .shutdown_grace_seconds
            .map_or(DEFAULT_SHUTDOWN_GRACE, Duration::from_secs);
        Ok(App {
            base_dir,
            config,
            config_path: opts.config,
            document,
            settings,
            firewall,
            firewall_handle,
            supervisor: Arc::new(supervisor),
            bus,
            https: https.ok().flatten(),
            grace,
            vm,
        })
    }

    /// Starts every subsystem as an owned task. Must run inside the runtime.
    pub fn spawn(self) -> Running {
        let App {
            base_dir,
            config,
            config_path,
            document,
            settings,
            mut firewall,
            firewall_handle,
            supervisor,
            bus: plan,
            https,
            grace,
            vm,
        } = self;
        let linux = &config.platform.linux;
        let api_port = https.as_ref().map(|p| p.url.port);
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let running = Registry::default();
        let spawn =
            |name: &str, span: Span, fut: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
                let guard = running.enter(name);
                tracker.spawn(
                    async move {
                        fut.await;
                        drop(guard);
                    }
                    .instrument(span),
                );
            };

        let mut bus: Option<(Bus, mbus::Requests, Arc<mbus_fallback::Candidates>)> = None;
        if let Some(plan) = plan {
            let _span = info_span!("mbus").entered();
            let hook: Arc<dyn mbus::BeforeConnect> = if linux.enable_nats_firewall {
                Arc::new(FirewallHook::new(firewall_handle.clone()))
            } else {
                Arc::new(NoHook)
            };
            let options = BusOptions {
                resolver: bus::resolver_source(),
                backoff: bus::backoff_policy(
                    std::env::var("BOSH_AGENT_MBUS_BACKOFF_CAP_MS")
                        .ok()
                        .as_deref(),
                ),
                return_home: bus::return_home(
                    std::env::var("BOSH_AGENT_MBUS_RETURN_HOME_MS")
                        .ok()
                        .as_deref(),
                ),
                ..BusOptions::default()
            };
            match Bus::connect(&plan.cfg, hook, options) {
                Ok((b, requests)) => {
                    info!(agent_id = %plan.cfg.agent_id, servers = plan.cfg.servers.len(), "connecting to the director");
                    firewall.bus_stats(b.stats());
                    bus = Some((b, requests, plan.candidates));
                }
                Err(e) => error!(error = %e, "the message bus cannot start"),
            }
        }

        let fw_stop = CancellationToken::new();
        let fw_guard = running.enter("firewall");
        let fw_task: JoinHandle<Option<Firewall>> = tokio::spawn({
            let fw_stop = fw_stop.clone();
            async move {
                let fw = firewall.run(fw_stop).await;
                drop(fw_guard);
                fw
            }
            .instrument(info_span!("firewall"))
        });

        let (store, recorded) = tasks::Store::open(tasks::store_path(&base_dir));
        let recorded = recorded.unwrap_or_else(|e| {
            error!(error = %e, "no task is resumed; the file is rewritten by the next persistent task");
            Vec::new()
        });
        let store = Arc::new(store);
        let (tasks, worker) = Tasks::with_store(Some(store.clone()));
        spawn(
            "task worker",
            info_span!("tasks"),
            Box::pin(worker.run(stop.clone())),
        );
        let ctx = Arc::new(Context {
            base_dir: base_dir.clone(),
            settings: settings.clone().unwrap_or_default(),
            tasks: tasks.clone(),
            jobs: supervisor,
            bus: bus.as_ref().map(|(b, _, _)| b.clone()),
            mbus_candidates: bus.as_ref().map(|(_, _, c)| c.clone()),
            firewall: firewall_handle.health(),
            vm,
        });
        let resumed = director::resume_recorded(&ctx, recorded, &store);
        if resumed > 0 {
            info!(resumed, "persistent tasks resumed");
        }

        if let Some(plan) = https {
            let every = Duration::from_secs(linux.heartbeat_interval_seconds.unwrap_or(30).max(1));
            spawn(
                "health recorder",
                info_span!("heartbeat"),
                Box::pin(heartbeat::record(ctx.clone(), every, stop.clone())),
            );
            spawn_alert_listener(&spawn, &stop, ctx.settings.ips(), None);
            spawn(
                "agent API",
                info_span!("https"),
                Box::pin(director::https::serve(
                    plan,
                    ctx.clone(),
                    director::https::Limits::default(),
                    tracker.clone(),
                    stop.clone(),
                )),
            );
        }

        let mut the_bus = None;
        if let Some((b, requests, candidates)) = bus {
            spawn(
                "mbus fallback",
                info_span!("mbus"),
                Box::pin(stoppable(
                    stop.clone(),
                    mbus_fallback::supervise(
                        b.clone(),
                        candidates,
                        mbus_fallback::fallback_after(),
                    ),
                )),
            );
            spawn(
                "heartbeats",
                info_span!("heartbeat"),
                // Stopped mid-collection too: asking an absent monit is retried for seconds.
                Box::pin(stoppable(
                    stop.clone(),
                    heartbeat::send(
                        ctx.clone(),
                        b.clone(),
                        Duration::from_secs(linux.heartbeat_interval_seconds.unwrap_or(30).max(1)),
                        stop.clone(),
                    ),
                )),
            );
            spawn_alert_listener(&spawn, &stop, ctx.settings.ips(), Some(b.clone()));
            spawn(
                "firewall alerts",
                info_span!("firewall"),
                Box::pin(crate::firewall::alert::send_alerts(
                    b.clone(),
                    firewall_handle.health(),
                    Duration::from_secs(linux.firewall.reconcile_interval_seconds.max(1)),
                    stop.clone(),
                )),
            );
            let requests_ctx = ctx.clone();
            let requests_bus = b.clone();
            let requests_tracker = tracker.clone();
            let requests_running = running.clone();
            let requests_stop = stop.clone();
            spawn(
                "request loop",
                info_span!("director"),
                Box::pin(serve_requests(
                    requests_ctx,
                    requests_bus,
                    requests,
                    requests_tracker,
                    requests_running,
                    requests_stop,
                )),
            );
            the_bus = Some(b);
        }
        Running {
            stop,
            tracker,
            running,
            tasks,
            bus: the_bus,
            fw_stop,
            fw_task,
            grace,
            reload: Reload {
                config_path,
                document,
                firewall: firewall_handle,
                api_port,
            },
        }
    }
}

/// The running agent: what [`Running::shutdown`] stops.
pub struct Running {
    stop: CancellationToken,
    tracker: TaskTracker,
    running: Registry,
    tasks: Tasks,
    bus: Option<Bus>,
    fw_stop: CancellationToken,
    fw_task: JoinHandle<Option<Firewall>>,
    grace: Duration,
    reload: Reload,
}

/// What a SIGHUP reload needs.
#[derive(Clone)]
struct Reload {
    config_path: PathBuf,
    document: serde_json::Value,
    firewall: FirewallHandle,
    /// The create-env agent API's port when the agent serves it: a reloaded allow-list that
    /// cuts it is reported as at start.
    api_port: Option<u16>,
}

impl Reload {
    /// Reads agent.json again and hands its firewall policies (or why it cannot be used) to
    /// the firewall task; returns once the outcome is recorded.
    async fn run(&self) {
        let path = &self.config_path;
        info!(config = %path.display(), "SIGHUP: reloading the firewall policies of agent.json");
        let opts = match AgentConfig::load_with_document(path) {
            Ok((config, doc)) => {
                let ignored = config::ignored_changes(&self.document, &doc);
                if !ignored.is_empty() {
                    warn!(
                        config = %path.display(),
                        keys = ?ignored,
                        "these keys of agent.json changed; a reload applies only the firewall policies, so they take effect at the next start"
                    );
                }
                Ok(config.platform.linux)
            }
            Err(e) => Err(e.to_string()),
        };
        // The outcome is logged by the firewall task; only a task that is gone is left.
        if let Err(crate::firewall::TaskError::Stopped) =
            self.firewall.reload(opts, self.api_port).await
        {
            warn!("the firewall task has stopped; the reload is not applied");
        }
    }
}

impl Running {
    /// Runs until SIGTERM or SIGINT, then shuts down; SIGHUP reloads the firewall policies
    /// (one reload at a time; signals that arrive during one make one more). The pid file is
    /// written once SIGHUP is handled and removed at the end.
    pub async fn until_signal(self) -> Result<(), AgentError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(AgentError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Runtime)?;
        let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Runtime)?;
        let pid_file = match pidfile::PidFile::write(&run_dir()) {
            Ok(f) => Some(f),
            Err(e) => {
                error!(error = %e, "cannot write the pid file; `bosh-agent firewall reload` cannot find the agent (SIGHUP still reloads)");
                None
            }
        };
        let wanted = Arc::new(tokio::sync::Notify::new());
        let reloader = tokio::spawn({
            let (wanted, reload) = (wanted.clone(), self.reload.clone());
            async move {
                loop {
                    wanted.notified().await;
                    reload.run().await;
                }
            }
            .instrument(info_span!("reload"))
        });
        let which = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => wanted.notify_one(),
            }
        };
        info!(
            signal = which,
            grace_secs = self.grace.as_secs(),
            "stopping"
        );
        // A reload in flight is finished by the firewall task (it owns the change); only the
        // wait for its outcome is dropped.
        reloader.abort();
        self.shutdown().await;
        drop(pid_file);
        Ok(())
    }

    /// Stops in order (see the module documentation) and returns once everything stopped or
    /// the grace period is over; what was cut is logged by name.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.grace;
        self.stop.cancel();
        for (task, cancelled) in self.tasks.stop_cancellable() {
            if cancelled {
                warn!(%task, "stopping: task told to stop");
            } else {
                info!(%task, "stopping: waiting for the task to finish");
            }
        }
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            let cut: Vec<String> = self
                .running
                .names()
                .into_iter()
                .filter(|n| n != "firewall")
                .collect();
            let tasks = self.tasks.unfinished();
            error!(
                grace_secs = self.grace.as_secs(),
                cut = ?cut,
                tasks = ?tasks,
                "the grace period is over: stopping with these still running"
            );
        }
        if let Some(bus) = &self.bus {
            // Replies already published leave before the connection closes.
            let _ = tokio::time::timeout(Duration::from_secs(2), bus.flush()).await;
            bus.shutdown().await;
        }
        self.fw_stop.cancel();
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1));
        match tokio::time::timeout(left, self.fw_task).await {
            Ok(Ok(Some(fw))) => {
                let _ = tokio::task::spawn_blocking(move || fw.write_state()).await;
            }
            Ok(_) => warn!("the firewall state machine was lost; its state file is not updated"),
            Err(_) => error!(
                cut = "firewall",
                "the firewall task is still busy (waiting for its lock?); stopping without writing its state"
            ),
        }
        info!("stopped; the firewall stays in place");
    }
}

/// Names of the subsystems and requests running now, for the shutdown log.
#[derive(Clone, Default)]
struct Registry {
    inner: Arc<Mutex<(u64, BTreeMap<u64, String>)>>,
}

struct Entered {
    registry: Registry,
    id: u64,
}

impl Registry {
    fn enter(&self, name: &str) -> Entered {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, name.to_string());
        Entered {
            registry: self.clone(),
            id,
        }
    }

    fn names(&self) -> Vec<String> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.values().cloned().collect()
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut g = self
            .registry
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.1.remove(&self.id);
    }
}

/// Runs `fut` until `stop`.
async fn stoppable(stop: CancellationToken, fut: impl Future<Output = ()>) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = fut => {}
    }
}

/// Reads requests until `stop`; each is answered on a task of its own (a slow action never
/// delays the next message), tracked so that shutdown waits for its reply.
async fn serve_requests(
    ctx: Arc<Context>,
    bus: Bus,
    mut requests: mbus::Requests,
    tracker: TaskTracker,
    running: Registry,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let method = protocol::decode(&msg.payload).map_or_else(|_| "?".into(), |r| r.method);
        let guard = running.enter(&format!("request {method}"));
        let (ctx, bus) = (ctx.clone(), bus.clone());
        tracker.spawn(
            async move {
                director::handle(ctx, bus, &msg.payload).await;
                drop(guard);
            }
            .instrument(info_span!("request", %method)),
        );
    }
}

/// Spawns monit's alert listener and its forwarder to `bus`. Without a bus (the HTTPS API of
/// create-env) the alerts are received and dropped, as upstream's HTTPS handler drops
/// everything it is asked to send: monit's mails are still accepted.
fn spawn_alert_listener<S>(spawn: &S, stop: &CancellationToken, ips: Vec<String>, bus: Option<Bus>)
where
    S: Fn(&str, Span, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    spawn(
        "monit alert listener",
        info_span!("alerts"),
        Box::pin(stoppable(stop.clone(), async move {
            // The bind is retried with backoff (logged) until it succeeds or the
            // agent stops: a port held at boot must not leave monit's alerts
            // undelivered for the agent's lifetime.
            let listener = alerts::bind_with_retry(
                alerts::LISTEN_ADDR,
                alerts::BIND_RETRY_INITIAL,
                alerts::BIND_RETRY_MAX,
            )
            .await;
            if let Err(e) = alerts::serve(listener, ips, tx).await {
                error!(error = %e, "monit alert listener stopped");
            }
        })),
    );
    spawn(
        "monit alert forwarder",
        info_span!("alerts"),
        Box::pin(stoppable(stop.clone(), forward_alerts(bus, rx))),
    );
}

/// Forwards monit's alerts to the health monitor (drops them without a bus).
async fn forward_alerts(bus: Option<Bus>, mut rx: tokio::sync::mpsc::Receiver<alerts::Alert>) {
    while let Some(alert) = rx.recv().await {
        let Some(bus) = &bus else {
            info!("monit alert dropped: the agent API of create-env has no bus to send it on");
            continue;
        };
        let bytes = serde_json::to_vec(&alert).unwrap_or_default();
        if let Err(e) = bus
            .publish_to(Target::HealthMonitor, Topic::Alert, bytes.into())
            .await
        {
            warn!(error = %e, "alert not sent");
        }
    }
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
