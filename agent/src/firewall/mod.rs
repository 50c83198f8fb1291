//! The firewall as a task that owns its state: one [`FirewallTask`] owns the [`Firewall`]
//! state machine (no lock around it); the mbus before-connect hook ([`hook`]) and the task's
//! own timers (reconcile, the first read-back, the work after a dial) drive it; it publishes
//! the typed [`Health`] (a `watch`) that heartbeats, `get_state` and the degraded-firewall
//! alert ([`alert`]) read. The runtime state file is written only for the one-shot commands
//! ([`commands`]: `firewall status`, `firewall-allow`).
//!
//! The state machine's calls block (nft, netlink, the firewall lock, which is waited for
//! within a bound and logged every 15 s): the task runs each on the blocking pool, so request
//! handling and signals never wait for the firewall.

pub mod alert;
pub mod commands;
pub mod health;
pub mod hook;
pub mod machine;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use platform::firewall::FirewallError;
use platform::firewall::nft::Nft;
use platform::firewall::table::KernelTable;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

pub use health::{Health, Problem};
pub use machine::{Firewall, Reconciled, ReloadError, Reloaded, vcap_uid};

use crate::config::LinuxOptions;

/// What the hook asks of the firewall task.
enum Command {
    /// Protect exactly these NATS endpoints before a dial.
    Protect {
        endpoints: BTreeSet<SocketAddr>,
        reply: oneshot::Sender<Result<Protected, FirewallError>>,
    },
    /// Finish what [`Command::Protect`] left (stale endpoints, the read-back) after `after`.
    AfterDial { after: Duration },
    /// Replace the policies with those of a reloaded agent.json, or record why it could not
    /// be read.
    Reload {
        opts: Result<Box<LinuxOptions>, String>,
        /// Checked against the reloaded allow-list ([`crate::director::https::report_ingress_cut`]).
        api_port: Option<u16>,
        reply: oneshot::Sender<Result<Reloaded, ReloadError>>,
    },
}

/// What [`FirewallHandle::protect_nats_endpoints`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protected {
    /// Work is left for after the dial ([`FirewallHandle::after_dial`]).
    pub follow_up: bool,
    /// Endpoints no longer resolved are still in the sets (removed after the dial).
    pub removing: bool,
}

/// Why the firewall task did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("the firewall task has stopped")]
    Stopped,
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

/// How the rest of the agent talks to the firewall task. Cheap to clone.
#[derive(Clone)]
pub struct FirewallHandle {
    tx: mpsc::Sender<Command>,
    health: watch::Receiver<Health>,
}

impl FirewallHandle {
    /// Makes `endpoints` protected now (the fast path before a dial); see
    /// [`Firewall::protect_nats_endpoints`].
    pub async fn protect_nats_endpoints(
        &self,
        endpoints: BTreeSet<SocketAddr>,
    ) -> Result<Protected, TaskError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Protect { endpoints, reply })
            .await
            .map_err(|_| TaskError::Stopped)?;
        Ok(rx.await.map_err(|_| TaskError::Stopped)??)
    }

    /// Asks the task to finish the last protection's work after `after` (returns at once).
    pub async fn after_dial(&self, after: Duration) -> Result<(), TaskError> {
        self.tx
            .send(Command::AfterDial { after })
            .await
            .map_err(|_| TaskError::Stopped)
    }

    /// Reloads the policies from `opts` (see [`Firewall::reload`]), or records that the
    /// reloaded agent.json could not be used (`Err`, the reason). Returns once the outcome is
    /// recorded in the state file. With `api_port` (the create-env agent API's), a committed
    /// allow-list that admits no tcp/`api_port` is reported as at start.
    pub async fn reload(
        &self,
        opts: Result<LinuxOptions, String>,
        api_port: Option<u16>,
    ) -> Result<Reloaded, TaskError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Reload {
                opts: opts.map(Box::new),
                api_port,
                reply,
            })
            .await
            .map_err(|_| TaskError::Stopped)?;
        Ok(rx.await.map_err(|_| TaskError::Stopped)??)
    }

    /// The firewall's health, as it changes.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }
}

/// The task that owns the firewall; see the module documentation.
pub struct FirewallTask<T: KernelTable = Nft> {
    fw: Option<Firewall<T>>,
    rx: mpsc::Receiver<Command>,
    every: Duration,
    read_back_after: Option<Duration>,
    bus_stats: Option<Arc<mbus::BusStats>>,
}

impl<T: KernelTable> FirewallTask<T> {
    /// The task for `fw`, reconciling every `every`, and the handle that talks to it.
    pub fn new(fw: Firewall<T>, every: Duration) -> (FirewallTask<T>, FirewallHandle) {
        let (tx, rx) = mpsc::channel(16);
        let health = fw.watch_health();
        (
            FirewallTask {
                fw: Some(fw),
                rx,
                every: every.max(Duration::from_millis(1)),
                read_back_after: None,
                bus_stats: None,
            },
            FirewallHandle { tx, health },
        )
    }

    /// Takes the read-back of the first apply `after` the task starts, unless a dial took it
    /// before (the hook takes it right after the dial).
    pub fn read_back_after(&mut self, after: Duration) {
        self.read_back_after = Some(after);
    }

    /// Records the bus's counters in the state file at every reconcile.
    pub fn bus_stats(&mut self, stats: Arc<mbus::BusStats>) {
        self.bus_stats = Some(stats);
    }

    /// Runs `f` on the state machine on the blocking pool; `None` when the machine is gone
    /// (a panic in an earlier call).
    async fn blocking<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Firewall<T>) -> R + Send + 'static,
    ) -> Option<R> {
        let mut fw = self.fw.take()?;
        match tokio::task::spawn_blocking(move || {
            let r = f(&mut fw);
            (fw, r)
        })
        .await
        {
            Ok((fw, r)) => {
                self.fw = Some(fw);
                Some(r)
            }
            Err(e) => {
                error!(error = %e, "the firewall state machine failed; the firewall stays as it is");
                None
            }
        }
    }

    /// Serves the hook and the timers until `stop` is cancelled; returns the state machine
    /// (for the last write of its state at shutdown), or `None` if it was lost.
    pub async fn run(mut self, stop: CancellationToken) -> Option<Firewall<T>> {
        let start = Instant::now();
        let mut tick = tokio::time::interval_at(start + self.every, self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut read_back = self.read_back_after.map(|d| start + d);
        let mut after_dial: Option<Instant> = None;
        // Without a hook (no bus, or the NATS firewall off) nothing sends commands: the
        // timers keep running.
        let mut commands_open = true;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                cmd = self.rx.recv(), if commands_open => match cmd {
                    None => commands_open = false,
                    Some(Command::Protect { endpoints, reply }) => {
                        let res = self
                            .blocking(move |fw| {
                                fw.protect_nats_endpoints(endpoints).map(|follow_up| Protected {
                                    follow_up,
                                    removing: fw.rebuild_pending(),
                                })
                            })
                            .await;
                        if let Some(res) = res {
                            let _ = reply.send(res);
                        }
                    }
                    Some(Command::Reload { opts, api_port, reply }) => {
                        let res = self
                            .blocking(move |fw| match opts {
                                Ok(opts) => {
                                    let res = fw.reload(&opts);
                                    if res.is_ok()
                                        && let Some(port) = api_port
                                    {
                                        crate::director::https::report_ingress_cut(
                                            &fw.desired().workload,
                                            port,
                                        );
                                    }
                                    res
                                }
                                Err(why) => Err(fw.reload_failed(why)),
                            })
                            .await;
                        if let Some(res) = res {
                            let _ = reply.send(res);
                        }
                    }
                    Some(Command::AfterDial { after }) => {
                        let at = Instant::now() + after;
                        after_dial = Some(after_dial.map_or(at, |t| t.min(at)));
                        // The dial's read-back supersedes the start-up one.
                        read_back = None;
                    }
                },
                () = sleep_until(after_dial) => {
                    after_dial = None;
                    if let Some(Err(e)) = self.blocking(|fw| fw.after_dial()).await {
                        warn!(error = %e, "finishing the NATS rules failed; the reconcile will retry");
                    }
                }
                () = sleep_until(read_back) => {
                    read_back = None;
                    if let Some(Err(e)) = self.blocking(|fw| fw.read_back_if_due()).await {
                        warn!(error = %e, "reading the firewall back failed; the reconcile will retry");
                    }
                }
                _ = tick.tick() => {
                    let stats = self.bus_stats.as_ref().map(|s| s.snapshot());
                    let res = self
                        .blocking(move |fw| {
                            if let Some(s) = stats {
                                fw.set_bus_stats(serde_json::to_value(s).ok());
                            }
                            fw.reconcile()
                        })
                        .await;
                    if let Some(Err(e)) = res {
                        error!(error = %e, "firewall reconcile failed; will retry");
                    }
                }
            }
        }
        if let (Some(fw), Some(stats)) = (self.fw.as_mut(), &self.bus_stats) {
            fw.set_bus_stats(serde_json::to_value(stats.snapshot()).ok());
        }
        self.fw
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod machine_tests;
