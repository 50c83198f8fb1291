//! The mbus client against real parts on loopback: nats-server with TLS `verify: true` and
//! user/password auth, dnsmasq serving the director's name, certificates made by the test.
//! No root needed. Every wait is bounded; a missing nats-server or dnsmasq fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use mbus::{Bus, BusOptions, ConnectionState, ResolverSource, Target, Topic};
use serde_json::json;

const AGENT_ID: &str = "agent-123-456";

fn lo(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// Fails the test (instead of hanging) if `f` takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

fn config(pki: &Pki, urls: &[String]) -> mbus::MbusConfig {
    let cert = agent_cert(pki);
    let settings = json!({
        "agent_id": AGENT_ID,
        "mbus": "nats://unused.invalid:4222",
        "env": {"bosh": {"mbus": {"urls": urls, "cert": {
            "ca": cert.ca, "certificate": cert.certificate, "private_key": cert.private_key}}}}
    });
    mbus::mbus_config(&settings, None).unwrap()
}

fn options(dns: Option<SocketAddr>) -> BusOptions {
    BusOptions {
        // Without a DNS server the tests use IP literals only; point at a dead port.
        resolver: ResolverSource::NameServer(dns.unwrap_or_else(|| "127.0.0.1:9".parse().unwrap())),
        connection_timeout: Duration::from_secs(2),
        ..BusOptions::default()
    }
}

/// The agent side of the protocol, minimal: reply `{"value":"pong"}` to the body's `reply_to`.
fn spawn_responder(bus: Bus, mut requests: mbus::Requests) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut n = 0;
        while let Some(req) = requests.next().await {
            n += 1;
            let body: serde_json::Value = serde_json::from_slice(&req.payload).unwrap();
            let reply_to = body["reply_to"].as_str().unwrap().to_string();
            // Not connected at this instant is possible during failover: the director retries.
            let _ = bus
                .publish(reply_to, Bytes::from_static(br#"{"value":"pong"}"#))
                .await;
        }
        n
    })
}

/// A director: its own mTLS client (other client cert, same CA) straight to one server.
async fn director(pki: &Pki, addr: SocketAddr) -> async_nats::Client {
    let leaf = pki.client("director").unwrap();
    let tls = mbus::tls::client_config(&mbus::CertKeyPair {
        ca: pki.ca_pem.clone(),
        certificate: leaf.cert_pem,
        private_key: leaf.key_pem,
        origin: "director",
    })
    .unwrap();
    let opts = testkit::director::DirectorOptions {
        url: format!("tls://{addr}"),
        tls,
        user: USER.into(),
        password: PASSWORD.into(),
        agent_id: AGENT_ID.into(),
        // One attempt: the server is up before any director dials it.
        connect_for: Duration::ZERO,
    };
    testkit::director::connect(&opts).await.unwrap()
}

/// Returns once the server has processed everything this client sent before (its SUBs
/// included). `flush` only proves the bytes left the socket; the server reads each connection
/// on its own, so a message another connection publishes right after a bare `flush` can reach
/// the server before this client's SUB does and be lost (this raced in CI). One message through
/// the server to ourselves is ordered after our earlier ops on the same connection.
async fn server_round_trip(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, Bytes::new()).await.unwrap();
    within(Duration::from_secs(10), "a server round trip", echo.next()).await;
}

/// Sends `ping` to the agent (reply subject in the body, as the director does) until a reply
/// comes back; returns how long that took.
async fn ping_agent(director: &async_nats::Client) -> Duration {
    let start = Instant::now();
    let reply_to = format!("director.{}", director.new_inbox().replace("_INBOX.", ""));
    let mut replies = director.subscribe(reply_to.clone()).await.unwrap();
    director.flush().await.unwrap();
    let body = json!({"method": "ping", "arguments": [], "reply_to": reply_to, "protocol": 3});
    within(Duration::from_secs(10), "a reply from the agent", async {
        loop {
            director
                .publish(format!("agent.{AGENT_ID}"), body.to_string().into())
                .await
                .unwrap();
            if let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_millis(200), replies.next()).await
            {
                assert_eq!(&msg.payload[..], br#"{"value":"pong"}"#);
                return start.elapsed();
            }
        }
    })
    .await
}

async fn wait_connected_to(bus: &Bus, endpoint: SocketAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut rx = bus.watch_state();
    within(limit, &format!("connection to {endpoint}"), async {
        rx.wait_for(
            |s| matches!(s, ConnectionState::Connected { endpoint: e, .. } if *e == endpoint),
        )
        .await
        .unwrap();
    })
    .await;
    start.elapsed()
}

async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    within(limit, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The agent's first endpoint (its home: the first of its dial order) and the other one, of
/// two servers on `port`.
fn home_and_away(ip_a: IpAddr, ip_b: IpAddr, port: u16) -> (SocketAddr, SocketAddr) {
    let (a, b) = (SocketAddr::new(ip_a, port), SocketAddr::new(ip_b, port));
    if mbus::dial_order(AGENT_ID, &[a, b], 8)[0] == 0 {
        (a, b)
    } else {
        (b, a)
    }
}

fn url_for(host: &str, port: u16) -> String {
    format!("nats://{USER}:{PASSWORD}@{host}:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_heartbeat_and_hook_before_first_attempt() {
    let pki = pki();
    let port = free_port(&[lo(1)]);
    let server = nats(&pki, NATS_NAME, SocketAddr::new(lo(1), port));
    let dns = dns(NATS_NAME, lo(1));
    wait_answer(&dns, NATS_NAME, lo(1)).await;
    let hook = Arc::new(RecordingHook::default());
    let config = config(&pki, &[url_for(NATS_NAME, port)]);
    let (bus, requests) = Bus::connect(&config, hook.clone(), options(Some(dns.addr()))).unwrap();
    let responder = spawn_responder(bus.clone(), requests);

    wait_connected_to(&bus, server.addr(), Duration::from_secs(10)).await;
    let plans = hook.plans();
    assert_eq!(plans[0].attempt, 1);
    assert_eq!(
        plans[0].endpoints,
        [server.addr()],
        "hook saw the resolved endpoint"
    );
    assert!(plans[0].failed.is_empty());

    let director = director(&pki, server.addr()).await;
    ping_agent(&director).await;

    let mut heartbeats = director
        .subscribe(format!("hm.agent.heartbeat.{AGENT_ID}"))
        .await
        .unwrap();
    server_round_trip(&director).await;
    bus.publish_to(
        Target::HealthMonitor,
        Topic::Heartbeat,
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    let hb = within(Duration::from_secs(5), "heartbeat", heartbeats.next()).await;
    assert_eq!(&hb.unwrap().payload[..], b"{}");

    let stats = bus.stats().snapshot();
    assert_eq!((stats.connects, stats.hook_failures), (1, 0), "{stats:?}");
    assert!(!format!("{stats:?}{:?}", bus.state()).contains(PASSWORD));

    bus.shutdown().await;
    assert_eq!(bus.state(), ConnectionState::Stopped);
    drop(bus);
    let handled = within(Duration::from_secs(5), "responder end", responder)
        .await
        .unwrap();
    assert!(handled >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_re_pointed_name() {
    let pki = pki();
    let port = free_port(&[lo(1), lo(2)]);
    let mut servers = [
        nats(&pki, NATS_NAME, SocketAddr::new(lo(1), port)),
        nats(&pki, NATS_NAME, SocketAddr::new(lo(2), port)),
    ];
    let dns = dns(NATS_NAME, lo(1));
    wait_answer(&dns, NATS_NAME, lo(1)).await;
    let hook = Arc::new(RecordingHook::default());
    let config = config(&pki, &[url_for(NATS_NAME, port)]);
    let (bus, requests) = Bus::connect(&config, hook.clone(), options(Some(dns.addr()))).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);
    wait_connected_to(&bus, servers[0].addr(), Duration::from_secs(10)).await;
    ping_agent(&director(&pki, servers[0].addr()).await).await;

    // Several rounds, alternating: re-point the name, then stop the server in use.
    let mut subscribed = Vec::new();
    let mut answered = Vec::new();
    let mut stable_at = Instant::now() + BusOptions::default().backoff.stable_after;
    for round in 0..4 {
        let (old, new) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        if round >= 1 {
            servers[new].restart().unwrap(); // it was stopped in the previous round
        }
        let new_addr = servers[new].addr();
        let director = director(&pki, new_addr).await; // the new server accepts connections
        dns.point(NATS_NAME, new_addr.ip()).unwrap();
        wait_answer(&dns, NATS_NAME, new_addr.ip()).await;
        let plans_before = hook.plans().len();
        // A director connection normally lasts long; one that ended within the backoff's
        // `stable_after` would (on purpose) not reset the backoff. Measure the normal case.
        tokio::time::sleep(stable_at.saturating_duration_since(Instant::now())).await;

        let t0 = Instant::now();
        servers[old].stop().unwrap();
        let t_sub = wait_connected_to(&bus, new_addr, Duration::from_secs(10)).await;
        let t_reply = t0.elapsed() + ping_agent(&director).await;
        stable_at = Instant::now() + BusOptions::default().backoff.stable_after;
        subscribed.push(t_sub);
        answered.push(t_reply);

        let plans = hook.plans();
        let last = plans.last().unwrap();
        assert_eq!(
            last.endpoints,
            [new_addr],
            "hook saw the new address before the dial"
        );
        assert!(plans[plans_before..].iter().all(|p| p.failed.is_empty()));
    }
    subscribed.sort();
    answered.sort();
    eprintln!(
        "failover (server stopped -> re-subscribed on the new address), 4 rounds: {subscribed:?}; \
         -> first director reply: {answered:?}"
    );
    // How fast is a benchmark figure (bench-runtime), not a test bound: each round already
    // proved that the agent found the moved director and the hook saw the new address first.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_unreachable_during_reconnect_keeps_old_endpoints_and_retries() {
    let pki = pki();
    let port = free_port(&[lo(1)]);
    let mut server = nats(&pki, NATS_NAME, SocketAddr::new(lo(1), port));
    let mut dns = dns(NATS_NAME, lo(1));
    wait_answer(&dns, NATS_NAME, lo(1)).await;
    let hook = Arc::new(RecordingHook::default());
    let config = config(&pki, &[url_for(NATS_NAME, port)]);
    let (bus, requests) = Bus::connect(&config, hook.clone(), options(Some(dns.addr()))).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);
    wait_connected_to(&bus, server.addr(), Duration::from_secs(10)).await;
    let stats = bus.stats();
    let plans_before = hook.plans().len();

    dns.stop().unwrap();
    server.stop().unwrap();
    let t0 = Instant::now();
    wait_until(Duration::from_secs(15), "3 attempts without DNS", || {
        hook.plans().len() >= plans_before + 3
    })
    .await;
    eprintln!("3 hook calls without DNS took {:?}", t0.elapsed());
    let plans = hook.plans();
    let during = &plans[plans.len() - 3..];
    for plan in during {
        assert_eq!(plan.failed.len(), 1, "hook told of the failure: {plan:?}");
        assert_eq!(plan.failed[0].host, NATS_NAME);
        assert!(!plan.failed[0].reason.is_empty());
        assert_eq!(plan.failed[0].carried_over, [server.addr()]);
        assert_eq!(
            plan.endpoints,
            [server.addr()],
            "previous endpoints kept, never empty"
        );
    }
    assert!(matches!(bus.state(), ConnectionState::Connecting { .. }));

    // The director comes back at the old address while DNS is still down.
    server.restart().unwrap();
    let t = wait_connected_to(&bus, server.addr(), Duration::from_secs(15)).await;
    ping_agent(&director(&pki, server.addr()).await).await;
    eprintln!("re-subscribed {t:?} after the server came back (DNS still down)");
    assert!(stats.snapshot().resolve_failures >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_first_url_live_second_and_failing_hook() {
    let pki = pki();
    let live_port = free_port(&[lo(2)]);
    let live = SocketAddr::new(lo(2), live_port);
    // A dead port this agent dials before the live one (its order is keyed by its id), so
    // that the failed dial happens and is reported.
    let dead = (0..64)
        .map(|_| SocketAddr::new(lo(1), free_port(&[lo(1)])))
        .find(|d| mbus::dial_order(AGENT_ID, &[*d, live], 8) == [0, 1])
        .expect("a port dialled first");
    let server = nats(&pki, NATS_NAME, SocketAddr::new(lo(2), live_port));
    let hook = Arc::new(RecordingHook::default());
    hook.fail.store(true, Ordering::SeqCst);
    let urls = [
        url_for("127.0.0.1", dead.port()),
        url_for("127.0.0.2", live_port),
    ];
    let config = config(&pki, &urls);
    let (bus, requests) = Bus::connect(&config, hook.clone(), options(None)).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);

    wait_connected_to(&bus, server.addr(), Duration::from_secs(10)).await;
    ping_agent(&director(&pki, server.addr()).await).await;
    let plans = hook.plans();
    assert_eq!(plans[0].endpoints, [dead, server.addr()]);
    let stats = bus.stats().snapshot();
    assert!(stats.connect_failures >= 1, "{stats:?}");
    let err = stats.last_error.unwrap();
    assert!(
        err.contains(&dead.to_string()) && err.contains("nats://***@127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD), "{err}");
    assert!(stats.hook_failures >= 1, "a failing hook is counted...");
    assert!(stats.last_hook_error.unwrap().contains("simulated failure"));
    assert_eq!(stats.connects, 1, "...and the agent connects anyway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cn_mismatch_is_reported_and_retried() {
    let pki = pki();
    let port = free_port(&[lo(1)]);
    let server = nats(&pki, "evil.example.com", SocketAddr::new(lo(1), port));
    let hook = Arc::new(RecordingHook::default());
    let config = config(&pki, &[url_for("127.0.0.1", port)]);
    let (bus, _requests) = Bus::connect(&config, hook.clone(), options(None)).unwrap();
    let stats = bus.stats();
    wait_until(Duration::from_secs(15), "3 rejected attempts", || {
        stats.attempts() >= 3 && stats.last_error().is_some()
    })
    .await;
    let err = stats.last_error().unwrap();
    assert!(
        err.contains("CommonName \"evil.example.com\" does not match"),
        "error names the CN seen: {err}"
    );
    assert!(err.contains(&server.addr().to_string()), "{err}");
    assert_eq!(stats.connects(), 0);
    assert!(hook.plans().len() >= 3, "hook runs before every retry");
    assert!(matches!(bus.state(), ConnectionState::Connecting { .. }));
}

#[tokio::test]
async fn unusable_settings_are_refused_with_the_field_named() {
    let pki = pki();
    let mut config = config(&pki, &[url_for("127.0.0.1", 4222)]);
    config.cert.private_key = String::new();
    let err = Bus::connect(&config, Arc::new(mbus::NoHook), options(None)).unwrap_err();
    assert!(
        err.to_string()
            .contains("env.bosh.mbus.cert.private_key is empty"),
        "{err}"
    );

    let settings = json!({"agent_id": AGENT_ID, "env": {"bosh": {"mbus": {"urls": [
        "https://u:pw@10.0.0.6:6868", format!("nats://u:{PASSWORD}@bad host")]}}}});
    let config = mbus::mbus_config(&settings, None).unwrap();
    let err = Bus::connect(&config, Arc::new(mbus::NoHook), options(None)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("https://***@10.0.0.6:6868") && msg.contains("bad host"),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD), "{msg}");
}

/// The old async-nats client must never reconnect by itself (that dial would skip the fresh
/// resolution and the hook): every TCP connection the server side sees is one of our dials,
/// each preceded by a hook call. Also checks that reconnect cycles leak no tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_hooked_dials_reach_the_server_and_no_task_leaks() {
    let pki = pki();
    let server = nats(&pki, NATS_NAME, SocketAddr::new(lo(1), free_port(&[lo(1)])));
    let proxy = CutProxy::start(SocketAddr::new(lo(3), free_port(&[lo(3)])), server.addr());
    let hook = Arc::new(RecordingHook::default());
    let config = config(&pki, &[url_for("127.0.0.3", proxy.addr.port())]);
    let options = BusOptions {
        // Reconnect at once after each cut, whatever the connection's age.
        backoff: mbus::BackoffPolicy {
            stable_after: Duration::ZERO,
            spread: Duration::ZERO,
            ..Default::default()
        },
        ..options(None)
    };
    let (bus, requests) = Bus::connect(&config, hook.clone(), options).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);
    let director = director(&pki, server.addr()).await;
    wait_connected_to(&bus, proxy.addr, Duration::from_secs(10)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut tasks_after = Vec::new();
    for cut in 1..=5u64 {
        let mut state = bus.watch_state();
        proxy.cut();
        within(Duration::from_secs(5), "the bus to notice the cut", async {
            state
                .wait_for(|s| matches!(s, ConnectionState::Connecting { .. }))
                .await
                .unwrap();
        })
        .await;
        wait_connected_to(&bus, proxy.addr, Duration::from_secs(5)).await;
        ping_agent(&director).await;
        // Give a stray internal reconnect (if there were one) time to show up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stats = bus.stats().snapshot();
        assert_eq!(stats.connects, cut + 1, "{stats:?}");
        assert_eq!(
            proxy.accepts() as u64,
            stats.dials,
            "a dial we did not make: {stats:?}"
        );
        assert_eq!(hook.plans().len() as u64, stats.attempts, "{stats:?}");
        tasks_after.push(metrics.num_alive_tasks());
    }
    eprintln!("alive tasks after each of 5 reconnects: {tasks_after:?}");
    assert!(
        tasks_after[4] <= tasks_after[0],
        "tasks grow with reconnects: {tasks_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_answer_is_dialled_with_the_cn_rule() {
    let pki = pki();
    let v6: IpAddr = "::1".parse().unwrap();
    let server = nats(&pki, NATS_NAME, SocketAddr::new(v6, free_port(&[v6])));
    let dns = dns(NATS_NAME, v6);
    wait_answer(&dns, NATS_NAME, v6).await;
    let hook = Arc::new(RecordingHook::default());
    let config = config(&pki, &[url_for(NATS_NAME, server.addr().port())]);
    let (bus, requests) = Bus::connect(&config, hook.clone(), options(Some(dns.addr()))).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);
    wait_connected_to(&bus, server.addr(), Duration::from_secs(10)).await;
    assert_eq!(hook.plans()[0].endpoints, [server.addr()]);
    ping_agent(&director(&pki, server.addr()).await).await;
}

/// Waits until a message published through `from` reaches a subscription on `to` (the route
/// between their servers is up and carries `to`'s interest).
/// Two distinct ports free on both addresses: the nodes' client port and their route port.
fn client_and_route_ports(a: IpAddr, b: IpAddr) -> (u16, u16) {
    let port = free_port(&[a, b]);
    loop {
        let p = free_port(&[a, b]);
        if p != port {
            return (port, p);
        }
    }
}

async fn wait_routed(from: &async_nats::Client, to: &async_nats::Client) {
    let inbox = to.new_inbox();
    let mut sub = to.subscribe(inbox.clone()).await.unwrap();
    within(Duration::from_secs(15), "the cluster route", async {
        loop {
            from.publish(inbox.clone(), Bytes::new()).await.unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await
            {
                return;
            }
        }
    })
    .await;
}

/// Pings the agent through `director` every 3 ms, each ping with its own reply subject; after
/// 30 answers calls `trigger`, then keeps pinging until `switching` has completed and 100 more
/// answers came. Then checks that every ping was answered exactly once: late duplicates would
/// cross `late` (the other servers' directors) within a round trip. Returns the pings sent.
async fn every_ping_answered_once(
    director: &async_nats::Client,
    late: &[&async_nats::Client],
    trigger: impl FnOnce(),
    switching: impl Future<Output = Duration>,
) -> usize {
    let mut replies = director.subscribe("director.pings.>").await.unwrap();
    server_round_trip(director).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let (d, stop) = (director.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let body = json!({"method": "ping", "arguments": [],
                    "reply_to": format!("director.pings.{sent}"), "protocol": 3});
                d.publish(format!("agent.{AGENT_ID}"), body.to_string().into())
                    .await
                    .unwrap();
                sent += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            d.flush().await.unwrap();
            sent
        })
    };
    let mut answers: std::collections::HashMap<String, usize> = Default::default();
    let mut next_answer = async |answers: &mut std::collections::HashMap<String, usize>| {
        let msg = within(Duration::from_secs(10), "a ping answer", replies.next())
            .await
            .unwrap();
        assert_eq!(&msg.payload[..], br#"{"value":"pong"}"#);
        *answers.entry(msg.subject.to_string()).or_default() += 1;
    };
    while answers.len() < 30 {
        next_answer(&mut answers).await;
    }
    trigger();
    tokio::pin!(switching);
    let mut switched = false;
    let mut after_switch = 0;
    while after_switch < 100 {
        tokio::select! {
            _ = &mut switching, if !switched => switched = true,
            () = next_answer(&mut answers) => if switched { after_switch += 1 },
        }
    }
    stop.store(true, Ordering::SeqCst);
    let sent = within(Duration::from_secs(10), "the pinger", pinger)
        .await
        .unwrap();
    while answers.values().sum::<usize>() < sent {
        next_answer(&mut answers).await;
    }
    server_round_trip(director).await;
    for other in late {
        server_round_trip(other).await;
    }
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), replies.next()).await
    {
        *answers.entry(msg.subject.to_string()).or_default() += 1;
    }
    for i in 0..sent {
        assert_eq!(
            answers.get(&format!("director.pings.{i}")).copied(),
            Some(1),
            "ping {i} of {sent} must be answered exactly once"
        );
    }
    assert_eq!(answers.len(), sent);
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_switches_live_and_answers_every_request_exactly_once() {
    let pki = pki();
    let (ip_a, ip_b) = (lo(1), lo(2));
    let (port, route_port) = client_and_route_ports(ip_a, ip_b);
    let (route_a, route_b) = (
        SocketAddr::new(ip_a, route_port),
        SocketAddr::new(ip_b, route_port),
    );
    let mut server_a = nats_clustered(
        &pki,
        NATS_NAME,
        SocketAddr::new(ip_a, port),
        route_a,
        &[route_b],
    );
    let server_b = nats_clustered(
        &pki,
        NATS_NAME,
        SocketAddr::new(ip_b, port),
        route_b,
        &[route_a],
    );
    let config_a = config(&pki, &[url_for(&ip_a.to_string(), port)]);
    let config_b = config(&pki, &[url_for(&ip_b.to_string(), port)]);
    let (bus, requests) = Bus::connect(&config_a, Arc::new(mbus::NoHook), options(None)).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);
    wait_connected_to(&bus, server_a.addr(), Duration::from_secs(10)).await;
    let director_a = director(&pki, server_a.addr()).await;
    let director_b = director(&pki, server_b.addr()).await;
    wait_routed(&director_a, &director_b).await;
    wait_routed(&director_b, &director_a).await;
    ping_agent(&director_a).await;

    // Unchanged configuration: nothing happens.
    assert!(!bus.reconfigure(&config_a).unwrap());
    // Invalid configurations are refused and change nothing.
    let mut no_servers = config_b.clone();
    no_servers.servers.clear();
    assert!(matches!(
        bus.reconfigure(&no_servers),
        Err(mbus::ConnectError::NoServers { .. })
    ));
    let mut bad_cert = config_b.clone();
    bad_cert.cert.private_key = "not a key".into();
    assert!(matches!(
        bus.reconfigure(&bad_cert),
        Err(mbus::ConnectError::Tls(_))
    ));
    // An unreachable server: A keeps serving while the switch is retried.
    let dead_port = free_port(&[lo(3)]);
    let config_dead = config(&pki, &[url_for(&lo(3).to_string(), dead_port)]);
    assert!(bus.reconfigure(&config_dead).unwrap());
    let stats = bus.stats();
    wait_until(
        Duration::from_secs(15),
        "two failed switch attempts",
        || stats.switch_failures() >= 2,
    )
    .await;
    ping_agent(&director_a).await;
    assert!(
        matches!(bus.state(), ConnectionState::Connected { endpoint, .. } if endpoint == server_a.addr())
    );
    assert_eq!(stats.connects(), 1, "no reconnect so far");

    // A director on A pings continuously, each ping with its own reply subject, while the bus
    // switches to B.
    every_ping_answered_once(
        &director_a,
        &[&director_b],
        || assert!(bus.reconfigure(&config_b).unwrap()),
        wait_connected_to(&bus, server_b.addr(), Duration::from_secs(15)),
    )
    .await;
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.connects, snapshot.switches),
        (2, 1),
        "{snapshot:?}"
    );

    // Now on B: A can go away, and a director on B is answered.
    server_a.stop().unwrap();
    ping_agent(&director_b).await;
    assert!(
        matches!(bus.state(), ConnectionState::Connected { endpoint, .. } if endpoint == server_b.addr())
    );
    assert!(!bus.reconfigure(&config_b).unwrap());
    bus.shutdown().await;
}

/// Two clustered nodes and an agent that lists both. Its first endpoint in its own dial order
/// ("home") is down at start, so it connects to the other; while home stays down every try
/// fails and the session keeps serving. Once home is up the bus moves there
/// make-before-break: every ping sent during the move is answered exactly once, no connection
/// is lost, and it then stays home (no further tries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_to_its_first_endpoint_make_before_break() {
    let pki = pki();
    let (ip_a, ip_b) = (lo(1), lo(2));
    let (port, route_port) = client_and_route_ports(ip_a, ip_b);
    let (home, away) = home_and_away(ip_a, ip_b, port);
    let route = |addr: SocketAddr| SocketAddr::new(addr.ip(), route_port);
    let away_server = nats_clustered(&pki, NATS_NAME, away, route(away), &[route(home)]);
    let config = config(&pki, &[ip_a, ip_b].map(|ip| url_for(&ip.to_string(), port)));
    let window = mbus::ReturnHome {
        min: Duration::from_millis(1500),
        max: Duration::from_millis(2000),
    };
    let options = BusOptions {
        return_home: Some(window),
        ..options(None)
    };
    let (bus, requests) = Bus::connect(&config, Arc::new(mbus::NoHook), options).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);
    wait_connected_to(&bus, away, Duration::from_secs(10)).await;
    let stats = bus.stats();
    wait_until(Duration::from_secs(10), "a failed try of home", || {
        stats.return_home_failures() >= 1
    })
    .await;
    let director_away = director(&pki, away).await;
    ping_agent(&director_away).await;
    assert!(matches!(bus.state(), ConnectionState::Connected { endpoint, .. } if endpoint == away));
    assert_eq!((stats.connects(), stats.returns_home()), (1, 0));

    let home_server = nats_clustered(&pki, NATS_NAME, home, route(home), &[route(away)]);
    let director_home = director(&pki, home).await;
    wait_routed(&director_away, &director_home).await;
    wait_routed(&director_home, &director_away).await;
    every_ping_answered_once(
        &director_away,
        &[&director_home],
        || {},
        wait_connected_to(&bus, home, Duration::from_secs(15)),
    )
    .await;
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.connects, snapshot.returns_home, snapshot.switches),
        (2, 1, 0),
        "{snapshot:?}"
    );
    // Home now: no further tries however long it runs (two windows here).
    let failures = stats.return_home_failures();
    let attempts = stats.attempts();
    tokio::time::sleep(window.max * 2).await;
    assert_eq!(
        (stats.return_home_failures(), stats.attempts()),
        (failures, attempts)
    );
    // The other node can go away: nothing happens to the agent.
    drop(away_server);
    ping_agent(&director_home).await;
    assert_eq!(stats.connects(), 2);
    drop(home_server);
    bus.shutdown().await;
}

/// The same start, but the two servers are not one cluster: a request published on the
/// current server would never reach a subscription on home. The bus tries home once it
/// answers, sees no probe cross, closes that session and stays where it is, for good: no
/// further tries, the director on the current server still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stays_put_when_its_first_endpoint_is_not_one_cluster_with_the_current() {
    let pki = pki();
    let (ip_a, ip_b) = (lo(1), lo(2));
    let port = free_port(&[ip_a, ip_b]);
    let (home, away) = home_and_away(ip_a, ip_b, port);
    let _away_server = nats(&pki, NATS_NAME, away);
    let config = config(&pki, &[ip_a, ip_b].map(|ip| url_for(&ip.to_string(), port)));
    let window = mbus::ReturnHome {
        min: Duration::from_millis(500),
        max: Duration::from_millis(700),
    };
    let options = BusOptions {
        return_home: Some(window),
        // The probe's bound: short, so that the give-up is quick.
        connection_timeout: Duration::from_secs(1),
        ..options(None)
    };
    let (bus, requests) = Bus::connect(&config, Arc::new(mbus::NoHook), options).unwrap();
    let _responder = spawn_responder(bus.clone(), requests);
    wait_connected_to(&bus, away, Duration::from_secs(10)).await;
    let _home_server = nats(&pki, NATS_NAME, home);
    let stats = bus.stats();
    // Home answers, the session there is made (a second connect), and no probe crosses.
    wait_until(Duration::from_secs(15), "the try of home", || {
        stats.connects() >= 2 && stats.return_home_failures() >= 1
    })
    .await;
    let attempts = stats.attempts();
    tokio::time::sleep(window.max * 3).await;
    let snapshot = stats.snapshot();
    assert_eq!(
        (
            snapshot.connects,
            snapshot.returns_home,
            snapshot.return_home_failures,
            snapshot.attempts
        ),
        (2, 0, 1, attempts),
        "{snapshot:?}"
    );
    assert!(matches!(bus.state(), ConnectionState::Connected { endpoint, .. } if endpoint == away));
    let director_away = director(&pki, away).await;
    ping_agent(&director_away).await;
    bus.shutdown().await;
}
