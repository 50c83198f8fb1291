//! One NATS connection to one resolved endpoint ("session"), made with async-nats.
//!
//! Why not one long-lived async-nats client with `reconnect_to_server_callback`: that callback
//! may only pick an address already in the client's server pool, and the pool cannot be
//! changed while the client is reconnecting (commands are not processed then). So a client
//! could never dial an address resolved during an outage without resolving the name a second
//! time itself (getaddrinfo) — the double resolution the firewall must avoid. Instead the bus
//! (client.rs) drives reconnects: each session is a fresh client to `tls://<ip>:<port>`, and
//! the session's client must never reconnect by itself:
//! - `max_reconnects(1)` plus a callback that returns the real endpoint only on its first call
//!   (the initial connect) and a sentinel (`127.0.0.1:0`, refused locally without a packet
//!   leaving the host) afterwards. After a drop, async-nats spends its one reconnect on the
//!   sentinel, then gives up with `MaxReconnects` and its task ends: no dial to a possibly
//!   stale address, no leaked task. Subscribers then end, which the bus sees.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::rustls::ClientConfig;
use async_nats::{ConnectOptions, Event, ReconnectToServer, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::urls::{Credentials, ServerUrl};

/// Queue group of the `agent.<id>` subscription. Normally there is one subscriber, so this
/// changes nothing; while a reconfiguration overlaps two sessions on the same NATS cluster,
/// the server delivers each request to exactly one of them, never to both.
pub(crate) const QUEUE_GROUP: &str = "bosh-agent";

/// Never dialled successfully: port 0 is refused by the local stack.
const SENTINEL: &str = "tls://127.0.0.1:0";

/// Options a session needs (a subset of [`crate::BusOptions`]).
pub(crate) struct SessionOptions<'a> {
    pub tls: &'a ClientConfig,
    pub connection_timeout: Duration,
    pub ping_interval: Duration,
    pub subject: &'a str,
}

/// A live connection whose `agent.<id>` subscription the server has confirmed.
pub(crate) struct Session {
    pub client: async_nats::Client,
    pub subscriber: async_nats::Subscriber,
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// Dials `addr` (one attempt, no automatic reconnect), authenticates with the URL's
/// credentials, subscribes to `opts.subject` and waits until the server has processed the
/// subscription. The error text names the endpoint but never the credentials.
pub(crate) async fn open(
    addr: SocketAddr,
    server: &ServerUrl,
    opts: &SessionOptions<'_>,
) -> Result<Session, String> {
    let real: ServerAddr = format!("tls://{addr}")
        .parse()
        .map_err(|e| format!("cannot use address {addr}: {e}"))?;
    let sentinel: ServerAddr = SENTINEL
        .parse()
        .map_err(|e| format!("internal sentinel address: {e}"))?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let (first, after) = (real.clone(), sentinel.clone());
    let mut options = ConnectOptions::new()
        .name("bosh-agent")
        .require_tls(true)
        .tls_client_config(opts.tls.clone())
        .connection_timeout(opts.connection_timeout)
        .ping_interval(opts.ping_interval)
        .ignore_discovered_servers()
        .retain_servers_order()
        .max_reconnects(1)
        .event_callback(move |event| {
            let tx = events_tx.clone();
            async move {
                // The receiver is gone once the bus has moved on; nothing to do then.
                let _ = tx.send(event);
            }
        })
        .reconnect_to_server_callback(move |_pool, _info| {
            let addr = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                first.clone()
            } else {
                after.clone()
            };
            async move {
                Some(ReconnectToServer {
                    addr,
                    delay: Some(Duration::ZERO),
                })
            }
        });
    options = match &server.credentials {
        Some(Credentials::UserPassword { user, password }) => {
            options.user_and_password(user.clone(), password.clone())
        }
        Some(Credentials::Token(token)) => options.token(token.clone()),
        None => options,
    };
    // Without retry_on_initial_connect, connect() makes exactly one attempt and reports it.
    let client = options
        .connect(vec![real, sentinel])
        .await
        .map_err(|e| e.to_string())?;
    let subscriber = tokio::time::timeout(
        opts.connection_timeout,
        subscribe_confirmed(&client, opts.subject),
    )
    .await
    .map_err(|_| {
        format!(
            "server did not confirm the subscription within {:?}",
            opts.connection_timeout
        )
    })??;
    Ok(Session {
        client,
        subscriber,
        events,
    })
}

/// Subscribes, then proves the server has registered it: the server handles one connection's
/// operations in order, so once a message we publish to a private inbox comes back, the
/// earlier SUB is in effect. Works with any server version (no PING API in async-nats).
async fn subscribe_confirmed(
    client: &async_nats::Client,
    subject: &str,
) -> Result<async_nats::Subscriber, String> {
    let subscriber = client
        .queue_subscribe(subject.to_string(), QUEUE_GROUP.to_string())
        .await
        .map_err(|e| format!("cannot subscribe to {subject}: {e}"))?;
    let inbox = client.new_inbox();
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("cannot subscribe to probe inbox: {e}"))?;
    client
        .publish(inbox, Bytes::new())
        .await
        .map_err(|e| format!("cannot publish probe: {e}"))?;
    if probe.next().await.is_none() {
        return Err("connection closed before the subscription was confirmed".to_string());
    }
    // Best effort: an error here only leaves an idle inbox subscription on this connection.
    let _ = probe.unsubscribe().await;
    Ok(subscriber)
}

/// A request received on `agent.<id>`: the raw payload. The reply subject is the JSON body's
/// `reply_to` (decoded by the agent), not the NATS reply subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    /// The subject it arrived on (`agent.<id>`).
    pub subject: String,
    /// The message body as received.
    pub payload: Bytes,
}

/// What one [`Session::step`] produced.
pub(crate) enum Step {
    /// A request to forward.
    Message(IncomingMessage),
    /// The connection is over; why.
    Ended(&'static str),
    /// An event that needs no action (e.g. lame duck mode, logged).
    Idle,
}

impl Session {
    /// Waits for the next message or connection event. Cancel-safe: a message is either
    /// returned or still queued in the subscriber. Messages come first, so any message that
    /// arrived before a disconnect is delivered.
    pub(crate) async fn step(&mut self) -> Step {
        tokio::select! {
            biased;
            msg = self.subscriber.next() => match msg {
                None => Step::Ended("subscription ended"),
                Some(msg) => Step::Message(IncomingMessage {
                    subject: msg.subject.to_string(),
                    payload: msg.payload,
                }),
            },
            event = self.events.recv() => match event {
                None => Step::Ended("client closed"),
                Some(Event::Disconnected) => Step::Ended("disconnected"),
                Some(Event::Closed) => Step::Ended("closed"),
                Some(Event::LameDuckMode) => {
                    tracing::info!("mbus server entered lame duck mode");
                    Step::Idle
                }
                Some(_) => Step::Idle,
            },
        }
    }

    /// Retires a session that another one has replaced: unsubscribes with a drain (UNSUB, then
    /// a PING round trip, after which async-nats ends the stream), so every message the server
    /// routed to this subscription before it processed the UNSUB is yielded, and hands each of
    /// them to `requests` ([`forward`]). Bounded by `limit` (a dead connection ends the stream
    /// too). Returns how many messages were forwarded.
    pub(crate) async fn retire(
        mut self,
        limit: Duration,
        requests: &mpsc::Sender<IncomingMessage>,
        receiver_gone: &mut bool,
    ) -> usize {
        if let Err(e) = self.subscriber.drain().await {
            tracing::warn!(error = %e, "draining the replaced mbus subscription failed");
        }
        let mut forwarded = 0usize;
        let drained = tokio::time::timeout(limit, async {
            while let Some(msg) = self.subscriber.next().await {
                let incoming = IncomingMessage {
                    subject: msg.subject.to_string(),
                    payload: msg.payload,
                };
                forward(requests, incoming, receiver_gone).await;
                forwarded += 1;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?limit,
                "the replaced mbus subscription did not finish draining in time"
            );
        }
        forwarded
    }
}

/// Hands one request to the bus's requests channel; once its receiver is gone, requests are
/// discarded (warned once, through `receiver_gone`).
pub(crate) async fn forward(
    requests: &mpsc::Sender<IncomingMessage>,
    incoming: IncomingMessage,
    receiver_gone: &mut bool,
) {
    if !*receiver_gone && requests.send(incoming).await.is_err() {
        *receiver_gone = true;
        tracing::warn!("mbus requests receiver dropped: discarding requests");
    }
}

/// Proves that a request published on `old`'s server now reaches `new`'s subscriptions, when
/// the two servers are one cluster: subscribes a fresh inbox on `new` after its `agent.<id>`
/// subscription, and publishes to it through `old` until one arrives. A server forwards a
/// connection's interest over the route in order, so once the inbox is reachable from the old
/// server, so is the new `agent.<id>` subscription, and retiring the old one loses nothing.
/// Err when nothing arrives within `limit` (e.g. servers that are not clustered).
pub(crate) async fn reachable_from(
    old: &async_nats::Client,
    new: &async_nats::Client,
    limit: Duration,
) -> Result<(), String> {
    let inbox = new.new_inbox();
    let mut probe = new
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("cannot subscribe to the overlap probe: {e}"))?;
    let res = tokio::time::timeout(limit, async {
        loop {
            old.publish(inbox.clone(), Bytes::new())
                .await
                .map_err(|e| format!("cannot publish the overlap probe: {e}"))?;
            match tokio::time::timeout(Duration::from_millis(50), probe.next()).await {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => return Err("the new connection closed".to_string()),
                Err(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no probe crossed within {limit:?}")));
    // Best effort: an error only leaves an idle inbox subscription.
    let _ = probe.unsubscribe().await;
    res
}
