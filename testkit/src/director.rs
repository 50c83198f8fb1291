//! The director's side of the bus: its own mutual-TLS NATS client sending requests to
//! `agent.<id>` with a fresh `reply_to`, as upstream's director does.
//!
//! [`connect`] is the async building block. [`Director`] wraps a client on a thread of its
//! own ([`InNetns`]) that may have entered a network namespace (`setns`, which moves only the
//! calling thread): its sockets live in the namespace but belong to the test process's
//! cgroup, never to the agent's, so a firewall that guards the agent's cgroup leaves it alone.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::rustls::ClientConfig;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::error::{Error, Result, err};

/// How the director reaches the bus.
#[derive(Debug, Clone)]
pub struct DirectorOptions {
    /// `tls://host:port`.
    pub url: String,
    /// The client's TLS configuration (its certificate, the CA, and how the server's name is
    /// checked).
    pub tls: ClientConfig,
    /// NATS user.
    pub user: String,
    /// NATS password.
    pub password: String,
    /// Requests go to `agent.<agent_id>`.
    pub agent_id: String,
    /// How long [`connect`] keeps trying (a just-started cluster may still be forming).
    pub connect_for: Duration,
}

/// Connects with `opts`, retrying every 100 ms for up to `opts.connect_for`.
pub async fn connect(opts: &DirectorOptions) -> Result<async_nats::Client> {
    let deadline = Instant::now() + opts.connect_for;
    loop {
        let res = async_nats::ConnectOptions::new()
            .require_tls(true)
            .tls_client_config(opts.tls.clone())
            .user_and_password(opts.user.clone(), opts.password.clone())
            .ignore_discovered_servers()
            .connection_timeout(Duration::from_secs(2))
            .connect(opts.url.clone())
            .await;
        match res {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                return err(format!("director cannot connect to {}: {e}", opts.url));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A fresh `<prefix>.<nuid>` subject.
pub fn fresh_subject(client: &async_nats::Client, prefix: &str) -> String {
    format!(
        "{prefix}.{}",
        client.new_inbox().trim_start_matches("_INBOX.")
    )
}

// ---------------------------------------------------------------------------------------------
// A thread that may have entered a network namespace

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A thread driving a current-thread tokio runtime, optionally inside a network namespace;
/// jobs run one after the other on it, and everything spawned by them keeps running in
/// between. The thread ends when this is dropped.
pub struct InNetns {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for InNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InNetns").finish_non_exhaustive()
    }
}

impl InNetns {
    /// A thread inside the network namespace pinned at `netns`.
    pub fn new(netns: &Path) -> Result<Self> {
        Self::start(Some(netns.to_path_buf()))
    }

    /// A thread in this process's own network namespace.
    pub fn here() -> Result<Self> {
        Self::start(None)
    }

    fn start(netns: Option<PathBuf>) -> Result<Self> {
        let file = match &netns {
            Some(p) => Some(
                std::fs::File::open(p)
                    .map_err(|e| Error(format!("opening {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<std::result::Result<(), String>>();
        let thread = std::thread::spawn(move || {
            let entered = match &file {
                Some(f) => nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns: {e}")),
                None => Ok(()),
            };
            let rt = entered.and_then(|()| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("tokio runtime: {e}"))
            });
            let rt = match rt {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(()));
                    rt
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                while let Some(job) = rx.recv().await {
                    job().await;
                }
            });
        });
        let where_ = netns
            .as_ref()
            .map(|p| format!("the network namespace {}", p.display()))
            .unwrap_or_else(|| "this network namespace".into());
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return err(format!("cannot start a thread in {where_}: {e}")),
            Err(e) => return err(format!("the thread in {where_} did not start: {e}")),
        }
        Ok(InNetns {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs `f()` on the thread, bounded by `limit`.
    pub fn run<T, F, Fut>(&self, limit: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (rtx, rrx) = std_mpsc::channel();
        let job: Job = Box::new(move || {
            Box::pin(async move {
                let r = tokio::time::timeout(limit, f()).await;
                let _ = rtx.send(r.map_err(|_| Error(format!("timed out after {limit:?}"))));
            })
        });
        let gone = || Error("the namespace thread is gone".into());
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        rrx.recv_timeout(limit + Duration::from_secs(10))
            .map_err(|e| Error(format!("namespace thread: {e}")))?
    }

    /// [`InNetns::run`] for a job that can fail: its error becomes the result's.
    pub fn try_run<T, E, F, Fut>(&self, limit: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        E: Into<Error> + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + 'static,
    {
        self.run(limit, f)?.map_err(Into::into)
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The director

/// A director: its NATS client on its own [`InNetns`] thread.
#[derive(Debug)]
pub struct Director {
    client: async_nats::Client,
    agent_id: String,
    ns: InNetns,
}

fn nats_err(e: impl std::fmt::Display) -> Error {
    Error(e.to_string())
}

impl Director {
    /// Connects on a fresh thread inside the namespace pinned at `netns` (this process's own
    /// when `None`).
    pub fn connect(netns: Option<&Path>, opts: DirectorOptions) -> Result<Self> {
        let ns = match netns {
            Some(p) => InNetns::new(p)?,
            None => InNetns::here()?,
        };
        let agent_id = opts.agent_id.clone();
        let limit = opts.connect_for + Duration::from_secs(5);
        let client = ns.try_run(limit, move || async move { connect(&opts).await })?;
        Ok(Director {
            client,
            agent_id,
            ns,
        })
    }

    /// The director's thread (for work of a test's own there).
    pub fn ns(&self) -> &InNetns {
        &self.ns
    }

    /// `agent.<agent_id>`.
    pub fn agent_subject(&self) -> String {
        format!("agent.{}", self.agent_id)
    }

    /// Sends `{"method": method, "arguments": [], …}` with a fresh `reply_to`, re-sending every
    /// `resend` (NATS is at most once; a request sent while the agent is between connections
    /// is lost), until a reply arrives or `limit` passes; returns the parsed reply.
    pub fn request_every(&self, method: &str, limit: Duration, resend: Duration) -> Result<Value> {
        let client = self.client.clone();
        let method = method.to_string();
        let subject = self.agent_subject();
        self.ns
            .try_run(limit + Duration::from_secs(1), move || async move {
                let reply_to = fresh_subject(&client, "director");
                let mut replies = client.subscribe(reply_to.clone()).await.map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                let body =
                    json!({"method": method, "arguments": [], "reply_to": reply_to, "protocol": 3});
                let deadline = tokio::time::Instant::now() + limit;
                loop {
                    client
                        .publish(subject.clone(), body.to_string().into())
                        .await
                        .map_err(nats_err)?;
                    let window =
                        resend.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                    if let Ok(Some(msg)) = tokio::time::timeout(window, replies.next()).await {
                        return serde_json::from_slice::<Value>(&msg.payload).map_err(|e| {
                            Error(format!(
                                "reply is not JSON ({e}): {:?}",
                                String::from_utf8_lossy(&msg.payload)
                            ))
                        });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return err(format!("no reply to {method} within {limit:?}"));
                    }
                }
            })
    }

    /// [`Director::request_every`] re-sending every 100 ms.
    pub fn request(&self, method: &str, limit: Duration) -> Result<Value> {
        self.request_every(method, limit, Duration::from_millis(100))
    }

    /// Pings until `{"value":"pong"}` comes back; returns how long it took.
    pub fn wait_pong(&self, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        match self.request("ping", limit) {
            Ok(v) if v == json!({"value": "pong"}) => Ok(t0.elapsed()),
            Ok(v) => err(format!("ping answered with {v}")),
            Err(e) => err(format!("the agent did not answer ping: {e}")),
        }
    }

    /// The director's NATS client, for work of a test's own on [`Director::ns`].
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// A fresh `director.<nuid>` subject for `reply_to`.
    pub fn reply_subject(&self) -> String {
        fresh_subject(&self.client, "director")
    }

    /// Subscribes to `subject` (wildcards allowed, e.g. `hm.agent.>`); every message is
    /// forwarded to the returned channel, stamped with the time it arrived. The subscription
    /// is in place (the server has processed it) when this returns, and lives until the
    /// receiver is dropped and one more message arrives, or until the director is dropped.
    pub fn subscribe(&self, subject: &str) -> Result<std_mpsc::Receiver<Received>> {
        let client = self.client.clone();
        let subject = subject.to_string();
        let (tx, rx) = std_mpsc::channel();
        self.ns
            .try_run(Duration::from_secs(10), move || async move {
                let mut sub = client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| Error(format!("subscribe {subject}: {e}")))?;
                // `flush` only proves the SUB left the socket; a message the agent publishes on
                // its own connection could still reach the server first. A message to ourselves
                // is ordered after the SUB on this connection: once it is back, the subscription
                // is in place.
                let inbox = client.new_inbox();
                let mut echo = client
                    .subscribe(inbox.clone())
                    .await
                    .map_err(|e| Error(format!("subscribe {inbox}: {e}")))?;
                client
                    .publish(inbox, Vec::new().into())
                    .await
                    .map_err(|e| {
                        Error(format!("round trip after subscribing to {subject}: {e}"))
                    })?;
                echo.next().await.ok_or_else(|| {
                    Error(format!("no round trip after subscribing to {subject}"))
                })?;
                drop(echo);
                tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        let got = Received {
                            subject: msg.subject.to_string(),
                            payload: msg.payload.to_vec(),
                            at: Instant::now(),
                        };
                        if tx.send(got).is_err() {
                            break;
                        }
                    }
                });
                Ok::<(), Error>(())
            })?;
        Ok(rx)
    }

    /// Sends `{"method","arguments","reply_to","protocol"}` to the agent once and returns the
    /// parsed reply, or an error when none arrives within `limit`.
    pub fn call(
        &self,
        method: &str,
        arguments: Value,
        protocol: i64,
        limit: Duration,
    ) -> Result<Value> {
        let reply_to = self.reply_subject();
        let body = json!({"method": method, "arguments": arguments, "reply_to": reply_to,
                          "protocol": protocol});
        let bytes = serde_json::to_vec(&body).map_err(nats_err)?;
        match self.publish_raw(bytes, &reply_to, limit)? {
            Some(reply) => serde_json::from_slice(&reply).map_err(|e| {
                Error(format!(
                    "reply to {method} is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&reply)
                ))
            }),
            None => err(format!("no reply to {method} within {limit:?}")),
        }
    }

    /// An asynchronous action as the director runs it: the request, then `get_task` every
    /// 100 ms until the task is no longer running; returns the final reply. A synchronous
    /// answer (no `agent_task_id`) is returned as it is.
    pub fn task(&self, method: &str, arguments: Value, limit: Duration) -> Result<Value> {
        let first = self.call(method, arguments, 3, Duration::from_secs(10))?;
        let Some(id) = first["value"]["agent_task_id"].as_str().map(str::to_string) else {
            return Ok(first);
        };
        let deadline = Instant::now() + limit;
        loop {
            let r = self.call("get_task", json!([id]), 3, Duration::from_secs(10))?;
            if r["value"]["state"] != "running" || r["value"]["agent_task_id"] != id.as_str() {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return err(format!("{method} task {id} still running after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Publishes `body` verbatim (any bytes) to the agent while listening on `reply_to`;
    /// returns the first message there within `wait`, or `None`.
    pub fn publish_raw(
        &self,
        body: Vec<u8>,
        reply_to: &str,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>> {
        let client = self.client.clone();
        let reply_to = reply_to.to_string();
        let subject = self.agent_subject();
        self.ns
            .try_run(wait + Duration::from_secs(5), move || async move {
                let mut replies = client.subscribe(reply_to).await.map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                client
                    .publish(subject, body.into())
                    .await
                    .map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                Ok::<_, Error>(
                    tokio::time::timeout(wait, replies.next())
                        .await
                        .ok()
                        .flatten()
                        .map(|m| m.payload.to_vec()),
                )
            })
    }

    /// One ping, sent once: whether `{"value":"pong"}` came back within `limit`.
    pub fn ping_once(&self, limit: Duration) -> bool {
        matches!(
            self.request_every("ping", limit, limit),
            Ok(v) if v == json!({"value": "pong"})
        )
    }
}

/// A message received by a [`Director::subscribe`] subscription.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its subject.
    pub subject: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// When the director's thread took it from the connection.
    pub at: Instant,
}

impl Received {
    /// The payload as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error(format!(
                "{} payload is not JSON ({e}): {:?}",
                self.subject,
                String::from_utf8_lossy(&self.payload)
            ))
        })
    }
}
