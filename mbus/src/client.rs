//! The bus: one supervisor task that owns every connection attempt.
//!
//! Per attempt: back off (none for the first attempt, nor after a stable connection), resolve
//! every URL afresh, await the [`BeforeConnect`] hook with exactly the endpoints about to be
//! dialled, then dial those endpoints (rotating among them and among URLs) until one accepts.
//! While connected, requests on `agent.<id>` flow to [`Requests`]; when the connection drops
//! the next attempt starts at once. [`Requests`] outlives every connection, so the agent's
//! subscription survives reconnects.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::rustls::ClientConfig;
use bytes::Bytes;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::hook::{BeforeConnect, ConnectPlan};
use crate::resolve::{Candidate, FreshResolver, ResolverSource};
use crate::session::{self, IncomingMessage, SessionOptions};
use crate::settings::MbusConfig;
use crate::status::{self, BusStats, ConnectionState};
use crate::tls::{TlsError, client_config};
use crate::urls::{ServerUrl, UrlError};

/// Tunables; [`Default`] is what the agent uses.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// Where names are resolved (default: the system's resolv.conf and hosts).
    pub resolver: ResolverSource,
    /// Reconnect backoff (default: immediate, then 250 ms doubling, 1 s cap, with jitter).
    pub backoff: BackoffPolicy,
    /// Bound on one dial (TCP, TLS, NATS handshake), and again on confirming the
    /// subscription. Default 5 s.
    pub connection_timeout: Duration,
    /// NATS PING period; two unanswered PINGs drop the connection. Default 20 s.
    pub ping_interval: Duration,
    /// Bound on one hook call; a timeout counts as a hook failure. Default 30 s.
    pub hook_timeout: Duration,
    /// Dials per attempt at most (rotating start), so that many black-holed endpoints do not
    /// delay the next fresh resolution for long. Default 8.
    pub max_dials_per_attempt: usize,
    /// Requests buffered for the agent before the bus stops reading from NATS. Default 256.
    pub request_capacity: usize,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self {
            resolver: ResolverSource::System,
            backoff: BackoffPolicy::default(),
            connection_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(20),
            hook_timeout: Duration::from_secs(30),
            max_dials_per_attempt: 8,
            request_capacity: 256,
        }
    }
}

/// Why [`Bus::connect`] refused to start. Unreachable servers are not an error: the bus keeps
/// trying in the background.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// No URL can be dialled.
    #[error(
        "no NATS server to dial (skipped https/create-env URLs: {skipped:?}; rejected: {rejected:?})"
    )]
    NoServers {
        /// Redacted `https://` URLs.
        skipped: Vec<String>,
        /// Malformed URLs.
        rejected: Vec<UrlError>,
    },
    /// The certificate material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Called outside a tokio runtime.
    #[error("Bus::connect must be called from within a tokio runtime")]
    NoRuntime,
}

/// Why a publish did not happen.
#[derive(Debug, Error)]
pub enum PublishError {
    /// Between connections (or before the first). NATS is at-most-once: the caller decides
    /// whether to retry; heartbeats simply skip (as upstream does when not connected).
    #[error("not connected to NATS: cannot publish to {subject}")]
    NotConnected {
        /// The subject.
        subject: String,
    },
    /// async-nats refused it (e.g. invalid subject, payload too large).
    #[error("publish to {subject} failed: {reason}")]
    Nats {
        /// The subject.
        subject: String,
        /// async-nats' message.
        reason: String,
    },
}

/// Who a message is for (upstream `handler/target.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `director`
    Director,
    /// `hm` (the health monitor: heartbeats, alerts, shutdown).
    HealthMonitor,
}

/// What a message is (upstream `handler/topic.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// `heartbeat`
    Heartbeat,
    /// `alert`
    Alert,
    /// `shutdown`
    Shutdown,
}

/// The subject `<target>.agent.<topic>.<agent_id>` (upstream's `Send`).
pub fn subject_for(target: Target, topic: Topic, agent_id: &str) -> String {
    let target = match target {
        Target::Director => "director",
        Target::HealthMonitor => "hm",
    };
    let topic = match topic {
        Topic::Heartbeat => "heartbeat",
        Topic::Alert => "alert",
        Topic::Shutdown => "shutdown",
    };
    format!("{target}.agent.{topic}.{agent_id}")
}

/// Incoming requests on `agent.<agent_id>`, across all reconnects. Ends (`None`) only when the
/// bus stops. Read it continuously (hand long actions to tasks): once
/// [`BusOptions::request_capacity`] requests are waiting, the bus stops reading from NATS and
/// notices a dropped connection only after the agent catches up.
#[derive(Debug)]
pub struct Requests {
    rx: mpsc::Receiver<IncomingMessage>,
}

impl Requests {
    /// The next request, in arrival order.
    pub async fn next(&mut self) -> Option<IncomingMessage> {
        self.rx.recv().await
    }
}

struct Shared {
    agent_id: String,
    client: Mutex<Option<async_nats::Client>>,
    state: watch::Sender<ConnectionState>,
    stats: Arc<BusStats>,
}

impl Shared {
    fn set_client(&self, client: Option<async_nats::Client>) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = client;
    }
    fn client(&self) -> Option<async_nats::Client> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

struct Inner {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle gone: stop connecting; dropping the session closes the NATS client.
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// Handle to the message bus. Cheap to clone; the connection stops when the last clone is
/// dropped or [`Bus::shutdown`] is called.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("agent_id", &self.inner.shared.agent_id)
            .field("state", &*self.inner.shared.state.borrow())
            .finish()
    }
}

impl Bus {
    /// Validates the configuration (at least one dialable URL, usable TLS material) and starts
    /// connecting in the background; returns at once, like upstream's `RetryOnFailedConnect`.
    /// `hook` is awaited before every attempt. Must be called inside a tokio runtime.
    pub fn connect(
        config: &MbusConfig,
        hook: Arc<dyn BeforeConnect>,
        options: BusOptions,
    ) -> Result<(Bus, Requests), ConnectError> {
        if config.servers.is_empty() {
            return Err(ConnectError::NoServers {
                skipped: config.skipped.clone(),
                rejected: config.rejected.clone(),
            });
        }
        let tls = client_config(&config.cert)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConnectError::NoRuntime)?;
        let (state, _) = watch::channel(ConnectionState::Connecting { attempt: 0 });
        let shared = Arc::new(Shared {
            agent_id: config.agent_id.clone(),
            client: Mutex::new(None),
            state,
            stats: Arc::new(BusStats::default()),
        });
        let (stop, mut stopped) = watch::channel(false);
        let (tx, rx) = mpsc::channel(options.request_capacity.max(1));
        let supervisor = Supervisor {
            shared: shared.clone(),
            servers: config.servers.clone(),
            subject: format!("agent.{}", config.agent_id),
            tls,
            hook,
            options,
            requests: tx,
        };
        let task_shared = shared.clone();
        let task = runtime.spawn(async move {
            tokio::select! {
                () = supervisor.run() => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            task_shared.set_client(None);
            task_shared.state.send_replace(ConnectionState::Stopped);
        });
        let inner = Inner {
            shared,
            stop,
            task: Mutex::new(Some(task)),
        };
        Ok((
            Bus {
                inner: Arc::new(inner),
            },
            Requests { rx },
        ))
    }

    /// Publishes `payload` on `subject` over the current connection (queued, not awaited on
    /// the wire). Fails fast when not connected.
    pub async fn publish(
        &self,
        subject: impl Into<String>,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        let subject = subject.into();
        let Some(client) = self.inner.shared.client() else {
            return Err(PublishError::NotConnected { subject });
        };
        client
            .publish(subject.clone(), payload)
            .await
            .map_err(|e| PublishError::Nats {
                subject,
                reason: e.to_string(),
            })
    }

    /// Publishes on `<target>.agent.<topic>.<agent_id>` (heartbeats, alerts, shutdown).
    pub async fn publish_to(
        &self,
        target: Target,
        topic: Topic,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        let subject = subject_for(target, topic, &self.inner.shared.agent_id);
        self.publish(subject, payload).await
    }

    /// Waits until everything published so far is written to the socket.
    pub async fn flush(&self) -> Result<(), PublishError> {
        let Some(client) = self.inner.shared.client() else {
            return Err(PublishError::NotConnected {
                subject: String::new(),
            });
        };
        client.flush().await.map_err(|e| PublishError::Nats {
            subject: String::new(),
            reason: e.to_string(),
        })
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.inner.shared.state.borrow().clone()
    }

    /// A receiver that sees every state change (e.g. to wait for `Connected`).
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.shared.state.subscribe()
    }

    /// Counters, shareable with whoever reports status.
    pub fn stats(&self) -> Arc<BusStats> {
        self.inner.shared.stats.clone()
    }

    /// Stops connecting, closes the connection, and waits for the supervisor to finish.
    /// [`Requests::next`] then returns `None`.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

struct Supervisor {
    shared: Arc<Shared>,
    servers: Vec<ServerUrl>,
    subject: String,
    tls: ClientConfig,
    hook: Arc<dyn BeforeConnect>,
    options: BusOptions,
    requests: mpsc::Sender<IncomingMessage>,
}

impl Supervisor {
    async fn run(self) {
        let stats = self.shared.stats.clone();
        let mut resolver = FreshResolver::new(self.options.resolver.clone());
        let mut backoff = Backoff::new(self.options.backoff);
        let mut cursor = 0usize;
        loop {
            let delay = backoff.next_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let attempt = stats.attempts.fetch_add(1, Ordering::Relaxed) + 1;
            self.shared
                .state
                .send_replace(ConnectionState::Connecting { attempt });

            let resolution = resolver.resolve(&self.servers).await;
            stats
                .resolve_failures
                .fetch_add(resolution.failed.len() as u64, Ordering::Relaxed);
            let plan = ConnectPlan {
                attempt,
                endpoints: resolution.endpoints(),
                failed: resolution.failed.clone(),
            };
            self.call_hook(&plan).await;

            let Some((session, candidate)) =
                self.dial_any(&resolution.candidates, &mut cursor).await
            else {
                continue;
            };
            let started = Instant::now();
            let server = self.servers[candidate.server].redacted();
            tracing::info!(%server, endpoint = %candidate.addr, attempt, "mbus connected and subscribed");
            self.shared.set_client(Some(session.client.clone()));
            self.shared.state.send_replace(ConnectionState::Connected {
                server: server.clone(),
                endpoint: candidate.addr,
            });
            let reason = session::serve(session, &self.requests).await;
            self.shared.set_client(None);
            let lasted = started.elapsed();
            tracing::warn!(%server, endpoint = %candidate.addr, reason, ?lasted, "mbus connection ended");
            backoff.connection_ended(lasted);
            // Start the next pass at the next endpoint: the one that just failed is tried last.
            cursor = cursor.wrapping_add(1);
        }
    }

    async fn call_hook(&self, plan: &ConnectPlan) {
        let stats = &self.shared.stats;
        let failure =
            match tokio::time::timeout(self.options.hook_timeout, self.hook.before_connect(plan))
                .await
            {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {:?}", self.options.hook_timeout),
            };
        stats.hook_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(attempt = plan.attempt, reason = %failure,
            "before-connect hook failed; connecting anyway");
        status::write(&stats.last_hook_error, failure);
    }

    /// Dials up to `max_dials_per_attempt` candidates starting at `cursor`; leaves `cursor` on
    /// the endpoint that accepted, or past the ones tried.
    async fn dial_any(
        &self,
        candidates: &[Candidate],
        cursor: &mut usize,
    ) -> Option<(session::Session, Candidate)> {
        let stats = &self.shared.stats;
        if candidates.is_empty() {
            stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            let msg = "no endpoint to dial: no mbus host has resolved yet".to_string();
            tracing::warn!("{msg}");
            status::write(&stats.last_error, msg);
            return None;
        }
        let opts = SessionOptions {
            tls: &self.tls,
            connection_timeout: self.options.connection_timeout,
            ping_interval: self.options.ping_interval,
            subject: &self.subject,
        };
        let tries = candidates
            .len()
            .min(self.options.max_dials_per_attempt.max(1));
        for i in 0..tries {
            let index = cursor.wrapping_add(i) % candidates.len();
            let candidate = candidates[index];
            let server = &self.servers[candidate.server];
            stats.dials.fetch_add(1, Ordering::Relaxed);
            match session::open(candidate.addr, server, &opts).await {
                Ok(session) => {
                    *cursor = index;
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    return Some((session, candidate));
                }
                Err(e) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let msg = format!("{server} via {}: {e}", candidate.addr);
                    tracing::warn!(error = %msg, "mbus dial failed");
                    status::write(&stats.last_error, msg);
                }
            }
        }
        *cursor = cursor.wrapping_add(tries);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert_eq!(
            subject_for(Target::HealthMonitor, Topic::Heartbeat, "123-456"),
            "hm.agent.heartbeat.123-456"
        );
        assert_eq!(
            subject_for(Target::Director, Topic::Shutdown, "x"),
            "director.agent.shutdown.x"
        );
        assert_eq!(
            subject_for(Target::HealthMonitor, Topic::Alert, "x"),
            "hm.agent.alert.x"
        );
    }
}
