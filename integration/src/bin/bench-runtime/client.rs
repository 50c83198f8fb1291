//! The benchmark's NATS clients: the director (pings, bursts, request series) and a bare
//! echo responder on the same path, each on a thread inside the sandbox's namespace.

use super::*;

/// An mTLS NATS client on a thread inside the sandbox's network namespace (its sockets belong
/// to this process's cgroup, never to the agent's).
pub(crate) struct Client {
    pub(crate) ns: InNetns,
    pub(crate) client: async_nats::Client,
}

pub(crate) fn nats_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The get_state burst after the ping runs.
pub(crate) const GET_STATE_BURST: usize = 12_000;

pub(crate) fn ping_body(reply_to: &str) -> Vec<u8> {
    request_body("ping", reply_to)
}

pub(crate) fn request_body(method: &str, reply_to: &str) -> Vec<u8> {
    json!({"method": method, "arguments": [], "reply_to": reply_to, "protocol": 3})
        .to_string()
        .into_bytes()
}

pub(crate) fn is_pong(payload: &[u8]) -> bool {
    serde_json::from_slice::<Value>(payload).ok() == Some(json!({"value": "pong"}))
}

pub(crate) use testkit::director::fresh_subject;

pub(crate) struct Series {
    pub(crate) lat_us: Vec<f64>,
    pub(crate) lost: usize,
    pub(crate) bad: usize,
    pub(crate) elapsed: Duration,
}

impl Client {
    pub(crate) fn connect(sb: &Sandbox, pki: &Pki, name: &str, to: &str) -> Res<Self> {
        let ns = InNetns::new(sb.netns().file())?;
        let opts = integration::nats::director_options(pki, name, to);
        let client = ns.try_run(Duration::from_secs(15), move || async move {
            testkit::director::connect(&opts).await
        })?;
        Ok(Client { ns, client })
    }

    /// Answers every ping on [`ECHO_SUBJECT`] as the agent would (JSON in, JSON out), from a
    /// task on this client's thread.
    pub(crate) fn serve_echo(&self) -> Res<()> {
        let client = self.client.clone();
        self.ns
            .try_run(Duration::from_secs(10), move || async move {
                let mut sub = client.subscribe(ECHO_SUBJECT).await.map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                tokio::spawn(async move {
                    let pong = json!({"value": "pong"}).to_string().into_bytes();
                    while let Some(m) = sub.next().await {
                        let Ok(req) = serde_json::from_slice::<Value>(&m.payload) else {
                            continue;
                        };
                        if let Some(to) = req["reply_to"].as_str() {
                            let _ = client.publish(to.to_string(), pong.clone().into()).await;
                        }
                    }
                });
                Ok::<(), String>(())
            })
            .map_err(String::from)
    }

    /// Runs `trigger` while pinging the agent every [`POLL_EVERY`]; returns its result, the
    /// instant just before it ran, and the instant the first pong arrived (if any within
    /// `limit`). Only replies to pings sent after the call began count.
    pub(crate) fn pong_around<X>(
        &self,
        limit: Duration,
        trigger: impl FnOnce() -> Res<X>,
    ) -> Res<(X, Instant, Option<Instant>)> {
        let (ready_tx, ready_rx) = std_mpsc::channel::<()>();
        let client = self.client.clone();
        let ns = &self.ns;
        std::thread::scope(|s| {
            let poller = s.spawn(move || {
                ns.try_run(limit + Duration::from_secs(5), move || {
                    poll_pong(client, ready_tx, limit)
                })
                .map_err(String::from)
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|e| format!("the ping poller did not start: {e}"))?;
            let t0 = Instant::now();
            let x = trigger();
            let got = poller
                .join()
                .map_err(|_| "the ping poller panicked".to_string())?;
            Ok((x?, t0, got?))
        })
    }

    /// The first pong to pings sent every [`POLL_EVERY`] from now on.
    pub(crate) fn next_pong(&self, limit: Duration) -> Res<Option<Instant>> {
        self.pong_around(limit, || Ok(())).map(|(_, _, t)| t)
    }

    /// `n` sequential pings to `target`, each waiting for its reply.
    pub(crate) fn sequential(&self, target: &str, n: usize) -> Res<Series> {
        let target = target.to_string();
        let client = self.client.clone();
        self.ns
            .try_run(Duration::from_secs(600), move || async move {
                let reply_to = fresh_subject(&client, "director");
                let mut sub = client.subscribe(reply_to.clone()).await.map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                let body = ping_body(&reply_to);
                let (mut lat_us, mut lost, mut bad) = (Vec::with_capacity(n), 0, 0);
                let start = Instant::now();
                for _ in 0..n {
                    let t = Instant::now();
                    client
                        .publish(target.clone(), body.clone().into())
                        .await
                        .map_err(nats_err)?;
                    match tokio::time::timeout(REPLY_LIMIT, sub.next()).await {
                        Ok(Some(m)) => {
                            lat_us.push(t.elapsed().as_secs_f64() * 1e6);
                            if !is_pong(&m.payload) {
                                bad += 1;
                            }
                        }
                        Ok(None) => return Err("reply subscription closed".to_string()),
                        Err(_) => lost += 1,
                    }
                }
                Ok(Series {
                    lat_us,
                    lost,
                    bad,
                    elapsed: start.elapsed(),
                })
            })
            .map_err(String::from)
    }

    /// `total` pings to `target` with `concurrency` in flight (a new one sent as each reply
    /// arrives); stops early if no reply arrives for [`REPLY_LIMIT`].
    pub(crate) fn burst(&self, target: &str, concurrency: usize, total: usize) -> Res<Series> {
        self.burst_of(target, "ping", concurrency, total)
    }

    /// [`Self::burst`] of any method without arguments; a reply counts when it is the
    /// method's value (`"pong"` for ping, any `value` otherwise).
    pub(crate) fn burst_of(
        &self,
        target: &str,
        method: &str,
        concurrency: usize,
        total: usize,
    ) -> Res<Series> {
        let target = target.to_string();
        let method = method.to_string();
        let client = self.client.clone();
        self.ns
            .try_run(Duration::from_secs(600), move || async move {
                let prefix = fresh_subject(&client, "director.tp");
                let mut sub = client
                    .subscribe(format!("{prefix}.*"))
                    .await
                    .map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                let bodies: Vec<Vec<u8>> = (0..total)
                    .map(|i| request_body(&method, &format!("{prefix}.{i}")))
                    .collect();
                let mut sent: Vec<Option<Instant>> = vec![None; total];
                let (mut lat_us, mut bad, mut next, mut done) =
                    (Vec::with_capacity(total), 0, 0usize, 0usize);
                let start = Instant::now();
                while next < concurrency.min(total) {
                    sent[next] = Some(Instant::now());
                    client
                        .publish(target.clone(), bodies[next].clone().into())
                        .await
                        .map_err(nats_err)?;
                    next += 1;
                }
                while done < total {
                    match tokio::time::timeout(REPLY_LIMIT, sub.next()).await {
                        Ok(Some(m)) => {
                            let idx = m
                                .subject
                                .rsplit('.')
                                .next()
                                .and_then(|x| x.parse::<usize>().ok());
                            let Some(t0) = idx.and_then(|i| sent.get_mut(i)?.take()) else {
                                bad += 1;
                                continue;
                            };
                            lat_us.push(t0.elapsed().as_secs_f64() * 1e6);
                            let good = if method == "ping" {
                                is_pong(&m.payload)
                            } else {
                                serde_json::from_slice::<Value>(&m.payload)
                                    .is_ok_and(|v| v.get("value").is_some())
                            };
                            if !good {
                                bad += 1;
                            }
                            done += 1;
                            if next < total {
                                sent[next] = Some(Instant::now());
                                client
                                    .publish(target.clone(), bodies[next].clone().into())
                                    .await
                                    .map_err(nats_err)?;
                                next += 1;
                            }
                        }
                        Ok(None) => return Err("reply subscription closed".to_string()),
                        Err(_) => break,
                    }
                }
                Ok(Series {
                    lat_us,
                    lost: total - done,
                    bad,
                    elapsed: start.elapsed(),
                })
            })
            .map_err(String::from)
    }
}

pub(crate) async fn poll_pong(
    client: async_nats::Client,
    ready: std_mpsc::Sender<()>,
    limit: Duration,
) -> Res<Option<Instant>> {
    let reply_to = fresh_subject(&client, "director");
    let mut sub = client.subscribe(reply_to.clone()).await.map_err(nats_err)?;
    client.flush().await.map_err(nats_err)?;
    let _ = ready.send(());
    let body = ping_body(&reply_to);
    let target = format!("agent.{AGENT_ID}");
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            m = sub.next() => {
                let at = Instant::now();
                return match m {
                    Some(m) if is_pong(&m.payload) => Ok(Some(at)),
                    Some(m) => Err(format!(
                        "ping answered with {:?}",
                        String::from_utf8_lossy(&m.payload)
                    )),
                    None => Err("reply subscription closed".into()),
                };
            }
            _ = tick.tick() => {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                client
                    .publish(target.clone(), body.clone().into())
                    .await
                    .map_err(nats_err)?;
            }
        }
    }
}
