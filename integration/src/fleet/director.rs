//! The fleet's director: one mutual-TLS NATS client in the director's namespace (outside every
//! agent's namespace and cgroup) that pings agents, collects heartbeats, and keeps a steady
//! ping load going while the cluster is disturbed. Its client reconnects by itself to the one
//! node it dials (async-nats' default), as the director does to its NATS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use testkit::director::{DirectorOptions, InNetns, connect, fresh_subject};

use crate::{Error, Result};

/// Heartbeats as they arrived: (agent id, when).
type Beats = Arc<Mutex<Vec<(String, Instant)>>>;

/// The director's client and what it has collected.
pub struct FleetDirector {
    ns: InNetns,
    client: async_nats::Client,
    beats: Beats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh reply subject prefix and the subscription to everything below it, flushed so that
/// no reply can arrive before the server knows the subscription.
async fn reply_inbox(client: &async_nats::Client) -> Result<(String, async_nats::Subscriber)> {
    let prefix = fresh_subject(client, "director");
    let replies = client
        .subscribe(format!("{prefix}.*"))
        .await
        .map_err(nats_err)?;
    client.flush().await.map_err(nats_err)?;
    Ok((prefix, replies))
}

fn nats_err(e: impl std::fmt::Display) -> Error {
    Error(e.to_string())
}

/// What [`FleetDirector::ping_all`] saw.
#[derive(Debug, Clone)]
pub struct PingRound {
    /// Per agent that answered `pong`: from the last send to its reply.
    pub answered: HashMap<String, Duration>,
    /// Agents that did not answer within the limit.
    pub missing: Vec<String>,
}

/// The outcome of a [`PingLoad`].
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Round-trip times of the answered pings.
    pub latencies: Vec<Duration>,
    /// Pings sent.
    pub sent: usize,
    /// Pings without an answer when the load stopped (NATS is at most once: a request sent
    /// to an agent between connections is lost).
    pub lost: usize,
}

/// A steady ping load (one ping every `every`, round-robin over the agents), running on the
/// director's thread until [`PingLoad::finish`].
pub struct PingLoad {
    stop: tokio::sync::watch::Sender<bool>,
    done: std::sync::mpsc::Receiver<LoadResult>,
}

impl PingLoad {
    /// Stops sending, waits `grace` for late answers and returns what was measured.
    pub fn finish(self, grace: Duration) -> Result<LoadResult> {
        std::thread::sleep(grace);
        let _ = self.stop.send(true);
        self.done
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| Error(format!("the ping load did not report: {e}")))
    }
}

impl FleetDirector {
    /// Connects in the namespace pinned at `netns` with `opts` (its `agent_id` is unused) and
    /// subscribes to every agent's heartbeats (`hm.agent.heartbeat.*`) before it returns.
    pub fn connect(netns: &std::path::Path, opts: DirectorOptions) -> Result<Self> {
        let ns = InNetns::new(netns)?;
        let limit = opts.connect_for + Duration::from_secs(5);
        let client = ns.try_run(limit, move || async move { connect(&opts).await })?;
        let beats: Beats = Arc::default();
        let (c, b) = (client.clone(), beats.clone());
        ns.try_run(Duration::from_secs(10), move || async move {
            let mut sub = c
                .subscribe("hm.agent.heartbeat.*")
                .await
                .map_err(nats_err)?;
            // The SUB is in effect once a message to ourselves on the same connection is back.
            let inbox = c.new_inbox();
            let mut echo = c.subscribe(inbox.clone()).await.map_err(nats_err)?;
            c.publish(inbox, Vec::new().into())
                .await
                .map_err(nats_err)?;
            echo.next()
                .await
                .ok_or_else(|| Error("no round trip after subscribing to heartbeats".into()))?;
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let id = msg
                        .subject
                        .as_str()
                        .strip_prefix("hm.agent.heartbeat.")
                        .unwrap_or("")
                        .to_string();
                    lock(&b).push((id, Instant::now()));
                }
            });
            Ok::<(), Error>(())
        })?;
        Ok(FleetDirector { ns, client, beats })
    }

    /// The director's thread (for work of the harness's own in its namespace).
    pub fn ns(&self) -> &InNetns {
        &self.ns
    }

    /// Heartbeats received so far: (agent id, when), in arrival order.
    pub fn heartbeats(&self) -> Vec<(String, Instant)> {
        lock(&self.beats).clone()
    }

    /// Pings every agent of `ids` (`{"method":"ping"}` to `agent.<id>` with a fresh
    /// `reply_to`), re-sending every `resend` to those that have not answered, until all
    /// answered `pong` or `limit` passed.
    pub fn ping_all(&self, ids: &[String], limit: Duration, resend: Duration) -> Result<PingRound> {
        let client = self.client.clone();
        let ids = ids.to_vec();
        self.ns
            .try_run(limit + Duration::from_secs(5), move || async move {
                let (prefix, mut replies) = reply_inbox(&client).await?;
                let mut sent: HashMap<String, Instant> = HashMap::new();
                let mut answered: HashMap<String, Duration> = HashMap::new();
                let deadline = tokio::time::Instant::now() + limit;
                loop {
                    for id in ids.iter().filter(|id| !answered.contains_key(*id)) {
                        let body = json!({"method": "ping", "arguments": [],
                            "reply_to": format!("{prefix}.{id}"), "protocol": 3});
                        client
                            .publish(format!("agent.{id}"), body.to_string().into())
                            .await
                            .map_err(nats_err)?;
                        sent.insert(id.clone(), Instant::now());
                    }
                    let window = tokio::time::Instant::now() + resend;
                    while answered.len() < ids.len() {
                        let until = window.min(deadline);
                        let Ok(Some(msg)) = tokio::time::timeout_at(until, replies.next()).await
                        else {
                            break;
                        };
                        let id = msg
                            .subject
                            .as_str()
                            .rsplit('.')
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let pong = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                            .is_ok_and(|v| v == json!({"value": "pong"}));
                        if let (true, Some(t)) = (pong, sent.get(&id)) {
                            answered.entry(id).or_insert_with(|| t.elapsed());
                        }
                    }
                    if answered.len() >= ids.len() || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
                let missing = ids
                    .iter()
                    .filter(|id| !answered.contains_key(*id))
                    .cloned()
                    .collect();
                Ok::<_, Error>(PingRound { answered, missing })
            })
    }

    /// Starts a [`PingLoad`] over `ids`: one ping every `every`, each sent once.
    pub fn ping_load(&self, ids: &[String], every: Duration) -> Result<PingLoad> {
        let client = self.client.clone();
        let ids = ids.to_vec();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (done_tx, done) = std::sync::mpsc::channel();
        self.ns
            .try_run(Duration::from_secs(10), move || async move {
                let (prefix, mut replies) = reply_inbox(&client).await?;
                tokio::spawn(async move {
                    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
                    let mut res = LoadResult::default();
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    let mut seq = 0u64;
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => break,
                            _ = tick.tick() => {
                                if ids.is_empty() { continue; }
                                let id = &ids[usize::try_from(seq).unwrap_or(0) % ids.len()];
                                let body = json!({"method": "ping", "arguments": [],
                                    "reply_to": format!("{prefix}.{seq}"), "protocol": 3});
                                // A failed publish (director reconnecting) counts as lost.
                                let _ = client
                                    .publish(format!("agent.{id}"), body.to_string().into())
                                    .await;
                                sent_at.insert(seq, Instant::now());
                                res.sent += 1;
                                seq += 1;
                            }
                            msg = replies.next() => {
                                let Some(msg) = msg else { break };
                                let n = msg.subject.as_str().rsplit('.').next()
                                    .and_then(|s| s.parse::<u64>().ok());
                                if let Some(t) = n.and_then(|n| sent_at.remove(&n)) {
                                    res.latencies.push(t.elapsed());
                                }
                            }
                        }
                    }
                    res.lost = sent_at.len();
                    let _ = done_tx.send(res);
                });
                Ok::<(), Error>(())
            })?;
        Ok(PingLoad { stop, done })
    }
}
