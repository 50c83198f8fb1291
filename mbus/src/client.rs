//! The bus: one supervisor task that owns every connection attempt.
//!
//! Per attempt: back off (none for the first attempt, nor after a stable connection), resolve
//! every URL afresh, await the [`BeforeConnect`] hook with exactly the endpoints about to be
//! dialled, then dial those endpoints (rotating through them in this agent's order, see
//! [`dial_order`]) until one accepts.
//! While connected, requests on `agent.<id>` flow to [`Requests`]; when the connection drops
//! the next attempt starts at once. [`Requests`] outlives every connection, so the agent's
//! subscription survives reconnects.
//!
//! [`Bus::reconfigure`] switches servers or certificate make-before-break: the new session is
//! made by a normal attempt (resolution, hook, dials, confirmed subscription) while the old one
//! keeps serving; only then does the new one take over, and the old one is drained into
//! [`Requests`] before it is dropped.
//!
//! The same make-before-break move takes an agent back to its first endpoint ("home", see
//! [`crate::ReturnHome`]) when a failover or a full restart of a cluster left it elsewhere, so a
//! fleet regains its spread over the nodes and no node is left holding most of it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::rustls::ClientConfig;
use bytes::Bytes;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backoff::{Backoff, BackoffPolicy, ReturnHome};
use crate::hook::{BeforeConnect, ConnectPlan};
use crate::order::dial_order;
use crate::resolve::{Candidate, FreshResolver, ResolverSource};
use crate::session::{self, IncomingMessage, SessionOptions, Step};
use crate::settings::MbusConfig;
use crate::status::{self, BusStats, ConnectionState};
use crate::tls::{CertKeyPair, TlsError, client_config};
use crate::urls::{ServerUrl, UrlError};

/// How long a replaced session keeps its subscription beside the new one before it is drained:
/// time for the new subscription's interest to cross every route of the cluster.
const OVERLAP: Duration = Duration::from_millis(500);

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
    /// Going back to this agent's first endpoint after connecting elsewhere (default
    /// [`ReturnHome::default`]); `None` stays wherever the last attempt landed, as upstream.
    pub return_home: Option<ReturnHome>,
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
            return_home: Some(ReturnHome::default()),
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
    /// The subject would make a control line nats-server refuses by closing the connection.
    #[error(
        "not publishing to a subject of {len} bytes (starting {start:?}): longer than {max} bytes, nats-server would drop the connection"
    )]
    SubjectTooLong {
        /// The first bytes of the subject.
        start: String,
        /// Its length.
        len: usize,
        /// [`MAX_SUBJECT_LEN`].
        max: usize,
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

/// nats-server's default `max_control_line`: a protocol line (`PUB <subject> <size>`,
/// `SUB <subject> <queue> <sid>`) longer than this makes the server close the connection,
/// and every reply still in flight on it is lost.
pub const MAX_CONTROL_LINE: usize = 4096;

/// The longest subject the agent publishes to: the control line less room for the verb, the
/// sizes, a header length and CRLF.
pub const MAX_SUBJECT_LEN: usize = MAX_CONTROL_LINE - 64;

/// The longest `agent_id`: every subject built from it (`agent.<id>` with its queue group,
/// `director.agent.heartbeat.<id>`) stays within [`MAX_SUBJECT_LEN`].
pub const MAX_AGENT_ID_LEN: usize = MAX_SUBJECT_LEN - 64;

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

/// Refuses a subject over [`MAX_SUBJECT_LEN`], quoting only its start.
pub fn check_subject_len(subject: &str) -> Result<(), PublishError> {
    if subject.len() <= MAX_SUBJECT_LEN {
        return Ok(());
    }
    Err(PublishError::SubjectTooLong {
        start: subject.chars().take(32).collect(),
        len: subject.len(),
        max: MAX_SUBJECT_LEN,
    })
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

/// What the supervisor dials: a validated [`MbusConfig`] (servers and TLS material).
struct Destination {
    servers: Vec<ServerUrl>,
    cert: CertKeyPair,
    tls: ClientConfig,
}

impl Destination {
    /// The checks [`Bus::connect`] and [`Bus::reconfigure`] share: at least one dialable URL,
    /// and certificate material a TLS client configuration can be built from.
    fn validate(config: &MbusConfig) -> Result<Destination, ConnectError> {
        if config.servers.is_empty() {
            return Err(ConnectError::NoServers {
                skipped: config.skipped.clone(),
                rejected: config.rejected.clone(),
            });
        }
        let tls = client_config(&config.cert)?;
        Ok(Destination {
            servers: config.servers.clone(),
            cert: config.cert.clone(),
            tls,
        })
    }

    /// Same servers (in the same order) and same certificate material.
    fn same_as(&self, other: &Destination) -> bool {
        self.servers == other.servers && self.cert == other.cert
    }
}

struct Inner {
    shared: Arc<Shared>,
    config: watch::Sender<Arc<Destination>>,
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
        let target = Arc::new(Destination::validate(config)?);
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
        let (config_tx, config_rx) = watch::channel(target);
        let supervisor = Supervisor {
            shared: shared.clone(),
            subject: format!("agent.{}", config.agent_id),
            hook,
            options,
            requests: tx,
        };
        let task_shared = shared.clone();
        let task = runtime.spawn(async move {
            tokio::select! {
                () = supervisor.run(config_rx) => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            task_shared.set_client(None);
            task_shared.state.send_replace(ConnectionState::Stopped);
        });
        let inner = Inner {
            shared,
            config: config_tx,
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

    /// Changes the servers and/or certificate the bus uses, live. `config` is validated
    /// exactly as by [`Bus::connect`]; on error nothing changes. Returns `Ok(false)` when the
    /// servers (same URLs, same order) and the certificate material equal the last
    /// configuration given, and then nothing happens at all. Otherwise returns `Ok(true)` at
    /// once and the supervisor switches in the background, make-before-break:
    /// - while connected, the current session keeps serving until a session to the new
    ///   servers is connected and its subscription confirmed (a normal attempt: fresh
    ///   resolution, the before-connect hook, dials); then the new session becomes the one
    ///   publishes use, and the old one is drained after a 500 ms overlap (for the new
    ///   subscription to reach every node of the cluster): every request it had received, or that
    ///   the server routed to it before processing its UNSUB, still reaches [`Requests`].
    ///   Both sessions subscribe in one queue group, so on one NATS cluster a request is
    ///   delivered to one of them only;
    /// - if the new servers cannot be reached, the old session keeps serving and the switch
    ///   is retried with the normal backoff (warned, counted in [`BusStats::switch_failures`]);
    /// - if the old session ends meanwhile (or the bus was not connected), the ordinary
    ///   reconnect logic takes over with the new configuration.
    ///
    /// `config.agent_id` is ignored: the subject stays `agent.<id>` of [`Bus::connect`].
    pub fn reconfigure(&self, config: &MbusConfig) -> Result<bool, ConnectError> {
        let target = Destination::validate(config)?;
        let changed = self.inner.config.send_if_modified(move |current| {
            if current.same_as(&target) {
                false
            } else {
                *current = Arc::new(target);
                true
            }
        });
        if changed {
            tracing::info!(
                servers = config.servers.len(),
                urls_origin = config.urls_origin,
                "mbus reconfigured; switching make-before-break"
            );
        }
        Ok(changed)
    }

    /// Publishes `payload` on `subject` over the current connection (queued, not awaited on
    /// the wire). Fails fast when not connected, and never sends a subject over
    /// [`MAX_SUBJECT_LEN`] (the server would close the connection).
    pub async fn publish(
        &self,
        subject: impl Into<String>,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        let subject = subject.into();
        check_subject_len(&subject)?;
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
    subject: String,
    hook: Arc<dyn BeforeConnect>,
    options: BusOptions,
    requests: mpsc::Sender<IncomingMessage>,
}

/// How serving one session ended.
enum Served {
    /// The connection is over; why.
    Ended(&'static str),
    /// A session to a newer configuration is connected and subscribed.
    Switched(Box<Switch>),
}

/// A session made for a newer [`Destination`], or to this agent's first endpoint, ready to
/// take over.
struct Switch {
    session: session::Session,
    candidate: Candidate,
    target: Arc<Destination>,
    cursor: usize,
    /// Made by [`Supervisor::return_home`] (same configuration), not by a reconfiguration.
    home: bool,
}

impl Supervisor {
    async fn run(self, mut config: watch::Receiver<Arc<Destination>>) {
        let mut resolver = FreshResolver::new(self.options.resolver.clone());
        let mut backoff = Backoff::new(self.options.backoff);
        let mut cursor = 0usize;
        let mut receiver_gone = false;
        // When the failed attempt before this one started. The backoff delay runs from there,
        // not from its end: an attempt that spent a second on a DNS lookup timing out has
        // already waited that second, so the next one is not held back twice (with DNS down,
        // a server that comes back is dialled within one lookup timeout, not a lookup plus a
        // backoff). Attempts still start at least one delay apart; a lookup is never cut short.
        let mut failed_attempt_began: Option<Instant> = None;
        loop {
            let delay = backoff.next_delay();
            let delay = match failed_attempt_began {
                Some(began) => delay.saturating_sub(began.elapsed()),
                None => delay,
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // The newest configuration; a switch that was pending is thereby superseded.
            let mut target = config.borrow_and_update().clone();
            let began = Instant::now();
            let Some((mut session, mut candidate)) = self
                .attempt(&target, &mut resolver, &mut cursor, false)
                .await
            else {
                failed_attempt_began = Some(began);
                continue;
            };
            failed_attempt_began = None;
            let mut started = Instant::now();
            let (reason, server) = loop {
                let server = target.servers[candidate.server].redacted();
                tracing::info!(%server, endpoint = %candidate.addr, "mbus connected and subscribed");
                self.shared.set_client(Some(session.client.clone()));
                self.shared.state.send_replace(ConnectionState::Connected {
                    server: server.clone(),
                    endpoint: candidate.addr,
                });
                let served = self
                    .serve(
                        &mut session,
                        &target,
                        candidate.addr,
                        &mut config,
                        &mut resolver,
                        &mut receiver_gone,
                    )
                    .await;
                match served {
                    Served::Ended(reason) => break (reason, server),
                    Served::Switched(switch) => {
                        let old = std::mem::replace(&mut session, switch.session);
                        // The new session serves publishes from now on; the old one only
                        // hands over what it still holds.
                        self.shared.set_client(Some(session.client.clone()));
                        let new_server = switch.target.servers[switch.candidate.server].redacted();
                        self.shared.state.send_replace(ConnectionState::Connected {
                            server: new_server.clone(),
                            endpoint: switch.candidate.addr,
                        });
                        let counter = if switch.home {
                            &self.shared.stats.returns_home
                        } else {
                            &self.shared.stats.switches
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(old = %server, old_endpoint = %candidate.addr,
                            new = %new_server, new_endpoint = %switch.candidate.addr,
                            home = switch.home,
                            "mbus switched; draining the old session");
                        // The old session is retired beside the new one, after an overlap:
                        // `reachable_from` proved that the old server routes to the new
                        // subscription, not that every node of the cluster (the director's
                        // among them) has heard of it yet. Both subscriptions are one queue
                        // group, so the overlap delivers nothing twice; what reaches the old
                        // one meanwhile is drained into the requests as before.
                        let (requests, limit) =
                            (self.requests.clone(), self.options.connection_timeout);
                        tokio::spawn(async move {
                            tokio::time::sleep(OVERLAP).await;
                            let mut gone = false;
                            let forwarded = old.retire(limit, &requests, &mut gone).await;
                            tracing::info!(forwarded, "old mbus session drained and closed");
                        });
                        target = switch.target;
                        candidate = switch.candidate;
                        cursor = switch.cursor;
                        started = Instant::now();
                        backoff = Backoff::new(self.options.backoff);
                    }
                }
            };
            self.shared.set_client(None);
            let lasted = started.elapsed();
            tracing::warn!(%server, endpoint = %candidate.addr, reason, ?lasted, "mbus connection ended");
            backoff.connection_ended(lasted);
            // Start the next pass at the next endpoint: the one that just failed is tried last.
            cursor = cursor.wrapping_add(1);
        }
    }

    /// One connection attempt to `target`: resolve every URL afresh, call the hook with the
    /// endpoints about to be dialled, dial. `switching` attempts (made while a session is
    /// still serving) leave the reported state `Connected`.
    async fn attempt(
        &self,
        target: &Destination,
        resolver: &mut FreshResolver,
        cursor: &mut usize,
        switching: bool,
    ) -> Option<(session::Session, Candidate)> {
        let stats = &self.shared.stats;
        let attempt = stats.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if !switching {
            self.shared
                .state
                .send_replace(ConnectionState::Connecting { attempt });
        }
        let resolution = resolver.resolve(&target.servers).await;
        self.before_dialling(attempt, &resolution).await;
        self.dial_any(target, &resolution.candidates, cursor).await
    }

    /// What every attempt does between its resolution and its dials: counts the hosts that
    /// failed to resolve and awaits the hook with exactly the endpoints that may be dialled.
    async fn before_dialling(&self, attempt: u64, resolution: &crate::resolve::Resolution) {
        self.shared
            .stats
            .resolve_failures
            .fetch_add(resolution.failed.len() as u64, Ordering::Relaxed);
        let plan = ConnectPlan {
            attempt,
            endpoints: resolution.endpoints(),
            failed: resolution.failed.clone(),
        };
        self.call_hook(&plan).await;
    }

    /// How this bus opens a session with `tls`.
    fn session_options<'a>(&'a self, tls: &'a ClientConfig) -> SessionOptions<'a> {
        SessionOptions {
            tls,
            connection_timeout: self.options.connection_timeout,
            ping_interval: self.options.ping_interval,
            subject: &self.subject,
        }
    }

    /// Serves `session` (connected to `at`) until its connection ends, or until a
    /// configuration different from `current` — or this agent's first endpoint — has produced
    /// a subscribed session (returned, not yet serving). While a message is being forwarded
    /// the switch attempts are not polled, so they only wait.
    async fn serve(
        &self,
        session: &mut session::Session,
        current: &Arc<Destination>,
        at: std::net::SocketAddr,
        config: &mut watch::Receiver<Arc<Destination>>,
        resolver: &mut FreshResolver,
        receiver_gone: &mut bool,
    ) -> Served {
        let old = session.client.clone();
        let switch = self.switch_when_reconfigured(current, &old, config, resolver);
        tokio::pin!(switch);
        let home = self.return_home(current, at, &old);
        tokio::pin!(home);
        loop {
            tokio::select! {
                biased;
                step = session.step() => match step {
                    Step::Message(m) => session::forward(&self.requests, m, receiver_gone).await,
                    Step::Ended(reason) => return Served::Ended(reason),
                    Step::Idle => {}
                },
                switched = &mut switch => return Served::Switched(Box::new(switched)),
                switched = &mut home => return Served::Switched(Box::new(switched)),
            }
        }
    }

    /// While the session at `at` is not on this agent's first endpoint (the first of
    /// [`dial_order`] over a fresh resolution of `current`), waits a random delay of the
    /// [`BusOptions::return_home`] window, then makes one attempt to that endpoint alone (a
    /// fresh resolution, the before-connect hook, one dial): a subscribed session there that a
    /// request published on the old server reaches ([`session::reachable_from`]) is returned.
    /// A failed dial is counted and tried again after another delay. Never returns when the
    /// option is off, when the session is already home, or when the home server is not one
    /// cluster with the current one (moving could cut the agent off from its director).
    async fn return_home(
        &self,
        current: &Arc<Destination>,
        at: std::net::SocketAddr,
        old: &async_nats::Client,
    ) -> Switch {
        let Some(window) = self.options.return_home else {
            return std::future::pending().await;
        };
        // Its own resolver: the reconfiguration switch holds the supervisor's meanwhile.
        let mut resolver = FreshResolver::new(self.options.resolver.clone());
        let stats = &self.shared.stats;
        loop {
            tokio::time::sleep(window.draw()).await;
            let resolution = resolver.resolve(&current.servers).await;
            let addrs: Vec<std::net::SocketAddr> =
                resolution.candidates.iter().map(|c| c.addr).collect();
            let order = dial_order(
                &self.shared.agent_id,
                &addrs,
                self.options.max_dials_per_attempt,
            );
            let Some(home) = order.first().map(|&i| resolution.candidates[i]) else {
                continue;
            };
            if home.addr == at {
                return std::future::pending().await;
            }
            let attempt = stats.attempts.fetch_add(1, Ordering::Relaxed) + 1;
            self.before_dialling(attempt, &resolution).await;
            let server = &current.servers[home.server];
            let opts = self.session_options(&current.tls);
            stats.dials.fetch_add(1, Ordering::Relaxed);
            let session = match session::open(home.addr, server, &opts).await {
                Ok(session) => session,
                Err(e) => {
                    stats.return_home_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %format!("{server} via {}: {e}", home.addr),
                        current = %at, "mbus first endpoint not reachable yet; staying");
                    continue;
                }
            };
            stats.connects.fetch_add(1, Ordering::Relaxed);
            if let Err(e) =
                session::reachable_from(old, &session.client, self.options.connection_timeout).await
            {
                stats.return_home_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, home = %home.addr, current = %at,
                    "the first mbus endpoint is not one cluster with the current one; \
                    staying where requests are known to arrive");
                drop(session);
                return std::future::pending().await;
            }
            return Switch {
                session,
                candidate: home,
                target: current.clone(),
                cursor: 0,
                home: true,
            };
        }
    }

    /// Waits for a configuration that differs from `current`, then makes attempts to it
    /// (normal backoff between them, always with the newest configuration) until one gives a
    /// subscribed session. Never returns while the configuration equals `current`. Before it
    /// returns, it waits (bounded by the connection timeout) until a request published on the
    /// `old` connection's server reaches the new subscription ([`session::reachable_from`]).
    async fn switch_when_reconfigured(
        &self,
        current: &Destination,
        old: &async_nats::Client,
        config: &mut watch::Receiver<Arc<Destination>>,
        resolver: &mut FreshResolver,
    ) -> Switch {
        let mut backoff = Backoff::new(self.options.backoff);
        let mut cursor = 0usize;
        loop {
            loop {
                if !config.borrow_and_update().same_as(current) {
                    break;
                }
                if config.changed().await.is_err() {
                    // The bus is gone; the supervisor is about to be stopped.
                    std::future::pending::<()>().await;
                }
            }
            let delay = backoff.next_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let target = config.borrow_and_update().clone();
            if target.same_as(current) {
                continue;
            }
            if let Some((session, candidate)) =
                self.attempt(&target, resolver, &mut cursor, true).await
            {
                // The old session keeps serving meanwhile (this future runs beside it).
                if let Err(e) =
                    session::reachable_from(old, &session.client, self.options.connection_timeout)
                        .await
                {
                    tracing::warn!(error = %e, "requests published on the old mbus server may \
                        not reach the new one (not one cluster?); switching anyway");
                }
                return Switch {
                    session,
                    candidate,
                    target,
                    cursor,
                    home: false,
                };
            }
            let stats = &self.shared.stats;
            stats.switch_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "cannot reach the reconfigured mbus servers; the current connection keeps serving, retrying"
            );
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

    /// Dials up to `max_dials_per_attempt` candidates in this agent's order
    /// ([`dial_order`]) starting at position `cursor`; leaves `cursor` on the endpoint that
    /// accepted, or past the ones tried.
    async fn dial_any(
        &self,
        target: &Destination,
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
        let opts = self.session_options(&target.tls);
        let tries = candidates
            .len()
            .min(self.options.max_dials_per_attempt.max(1));
        // `cursor` counts positions in this agent's order, not candidate indices.
        let addrs: Vec<std::net::SocketAddr> = candidates.iter().map(|c| c.addr).collect();
        let order = dial_order(
            &self.shared.agent_id,
            &addrs,
            self.options.max_dials_per_attempt,
        );
        for i in 0..tries {
            let index = cursor.wrapping_add(i) % candidates.len();
            let candidate = candidates[order[index]];
            let server = &target.servers[candidate.server];
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
