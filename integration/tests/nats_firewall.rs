//! The NATS link and its firewall end to end: the real `bosh-agent` against real
//! `nats-server`s (TLS `verify: true`, certificates made by the test, server CN
//! `default.nats.bosh-internal`), a real dnsmasq serving the director's name, real `nft` and
//! real sockets, each test in its own network namespace and cgroups (the `integration`
//! harness). Run as root: `cargo test -p integration --test nats_firewall`. A test that cannot
//! run (not root, no nft, no cgroup2, no nats-server, no dnsmasq) fails with the reason.
//!
//! Addresses inside each namespace: the agent dials 127.0.0.1:4222 (or `director.bosh`, which
//! dnsmasq on 127.0.0.1:53 resolves), and the director client dials the same server through
//! 127.0.0.3:4222, an (address, port) pair the NATS firewall does not guard. The director
//! runs in the test process (a thread that entered the namespace), outside the agent's cgroup.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::nats::*;
use integration::{CgroupDir, NOBODY, Probe, Sandbox};
use serde_json::{Value, json};

/// What the agent dials in the single-server tests.
const AGENT_SIDE: &str = "127.0.0.1:4222";
/// Bound on "the agent connects and answers" after it starts or after a server change.
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
/// Longer than the agent's backoff `stable_after` (1 s): a connection that lasted this long
/// is followed by an immediate reconnect attempt.
const STABLE: Duration = Duration::from_millis(1500);
/// A non-root caller.
const USER: Option<u32> = Some(NOBODY);
/// A root caller.
const ROOT: Option<u32> = None;

fn sandbox(name: &str) -> Sandbox {
    Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox for {name}: {e}"))
}

fn cg(sb: &Sandbox, name: &str) -> CgroupDir {
    sb.cgroup(name).expect("create cgroup")
}

/// One server for the agent (127.0.0.1:4222) and the director (127.0.0.3:4222) alike.
fn single_server(sb: &Sandbox, pki: &Pki) -> NatsServer {
    NatsServer::start(sb, pki, NATS_CN, "main", "0.0.0.0:4222", None)
}

fn expect_probe(sb: &Sandbox, cg: &CgroupDir, uid: Option<u32>, to: &str, want: Probe) {
    let got = sb.probe(cg, uid, to).expect("run netprobe connect");
    let who = uid.map_or_else(|| "root".to_string(), |u| format!("uid {u}"));
    assert_eq!(got, want, "{who} in {} -> {to}", cg.nft_path());
}

fn protected(st: &Value) -> Vec<String> {
    st["agent"]["protected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

fn bus(st: &Value, key: &str) -> u64 {
    st["agent"]["nats_bus"][key].as_u64().unwrap_or(0)
}

fn assert_alive(agent: &mut integration::Agent) {
    let st = agent.proc_mut().try_status().expect("agent status");
    assert!(st.is_none(), "the agent exited ({st:?}):\n{}", agent.log());
}

// 1. Request/reply through a director client.
#[test]
fn director_request_reply_ping_and_unknown_method() {
    let sb = sandbox("nats-request-reply");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    let agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent")),
        true,
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);

    let took = director.wait_pong(CONNECT_LIMIT);
    eprintln!("first pong {took:?} after the director connected");
    let reply = director
        .request("frobnicate", Duration::from_secs(5))
        .expect("reply to an unknown method");
    assert_eq!(
        reply,
        json!({"exception": {"message": "unknown message frobnicate"}}),
        "upstream's answer to an unknown method"
    );

    wait_endpoints(&sb, &[addr(AGENT_SIDE)], Duration::from_secs(5));
    let (code, st) = status_when(&sb, "bus counters in status", CONNECT_LIMIT, |_, st| {
        bus(st, "connects") >= 1
    });
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["agent"]["nats"], "enabled", "{st:#}");
    assert_eq!(bus(&st, "hook_failures"), 0, "{st:#}");
    assert!(
        st["agent"]["nats_bus"]["last_hook_error"].is_null(),
        "{st:#}"
    );
    for text in [agent.log(), st.to_string()] {
        assert!(
            !text.contains(NATS_PASSWORD),
            "the NATS password leaked: {text}"
        );
    }
}

// 2. Only the agent's cgroup reaches the protected endpoint.
#[test]
fn only_the_agents_cgroup_reaches_the_nats_endpoint() {
    let sb = sandbox("nats-protect");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _server = single_server(&sb, &pki);
    // Control: before the agent runs, anyone reaches the server.
    expect_probe(&sb, &other, USER, AGENT_SIDE, Probe::Connected);

    let _agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent")),
        true,
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);

    // While the agent is connected: others' SYNs are dropped (root included: the NATS policy
    // has no root exception), a process in the agent's cgroup gets through.
    expect_probe(&sb, &other, USER, AGENT_SIDE, Probe::TimedOut);
    expect_probe(&sb, &other, ROOT, AGENT_SIDE, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, AGENT_SIDE, Probe::Connected);
    // The same server through an unguarded (address, port) pair stays reachable.
    expect_probe(&sb, &other, USER, DIRECTOR_SIDE, Probe::Connected);

    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    assert!(
        protected(&st).contains(&AGENT_SIDE.to_string()),
        "status lists the endpoint as protected: {st:#}"
    );
    assert_eq!(st["agent"]["cgroup_path"], agent_cg.nft_path().as_str());
    assert_eq!(nats_endpoints(&sb), [addr(AGENT_SIDE)]);
    // The agent's own connection was never disturbed by the probes.
    assert!(
        director.ping_once(Duration::from_secs(2)),
        "ping after the probes"
    );

    // Drift: the whole table deleted under the connected agent. The reconcile pass restores
    // the NATS rules for the endpoint in use (not only monit's), and the link survives.
    let out = sb
        .nft(["delete", "table", "inet", "bosh_agent"])
        .expect("nft delete table");
    assert!(out.status.success(), "{}", integration::describe(&out));
    wait_endpoints(&sb, &[addr(AGENT_SIDE)], Duration::from_secs(5));
    expect_probe(&sb, &other, USER, AGENT_SIDE, Probe::TimedOut);
    assert!(
        director.ping_once(Duration::from_secs(2)),
        "ping after the repair"
    );
}

// 3. A stemcell table that drops unmarked packets to the NATS port.
#[test]
fn stemcell_table_sees_only_marked_agent_packets() {
    let sb = sandbox("nats-stemcell");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    // What a stemcell installs for the director's address (inet bosh_firewall, priority 0),
    // with counters. The agent's chain runs first (priority -1) and marks.
    sb.nft_script(
        r#"table inet bosh_firewall {
    chain out {
        type filter hook output priority 0; policy accept;
        ip daddr 127.0.0.1 tcp dport 4222 meta mark 0xb054 counter comment "marked"
        ip daddr 127.0.0.1 tcp dport 4222 meta mark != 0xb054 counter drop comment "unmarked"
    }
}
"#,
    )
    .expect("stemcell table");
    let counters = |sb: &Sandbox| -> (u64, u64) {
        let c = sb
            .counters("inet", "bosh_firewall", "out")
            .expect("counters");
        let get = |name: &str| c.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v);
        (get("marked"), get("unmarked"))
    };
    // Control: the emulation works; without the agent's marks even its cgroup is dropped.
    expect_probe(&sb, &agent_cg, USER, AGENT_SIDE, Probe::TimedOut);
    let (_, dropped_before) = counters(&sb);
    assert!(dropped_before > 0, "the control SYN was counted");

    let _agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent")),
        true,
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    let (marked0, _) = counters(&sb);

    // 20 pings over 2 s, each answered within a second.
    let mut answered = 0;
    let t0 = Instant::now();
    for i in 0..20u32 {
        if director.ping_once(Duration::from_secs(1)) {
            answered += 1;
        }
        let next = Duration::from_millis(100) * (i + 1);
        std::thread::sleep(next.saturating_sub(t0.elapsed()));
    }
    let (marked1, dropped_after) = counters(&sb);
    eprintln!(
        "stemcell table: {answered}/20 pings answered in {:?}; marked packets {marked0} -> {marked1}, \
         unmarked drops {dropped_before} -> {dropped_after}",
        t0.elapsed()
    );
    assert_eq!(answered, 20, "every ping answered");
    assert!(
        marked1 >= marked0 + 20,
        "the agent's packets reach the stemcell table marked ({marked0} -> {marked1})"
    );
    assert_eq!(
        dropped_after, dropped_before,
        "the stemcell table dropped none of the agent's packets"
    );
}

// 4. Failover: the name is re-pointed to a second server, the first is stopped.
#[test]
fn failover_to_a_re_pointed_name_moves_the_rules() {
    let sb = sandbox("nats-failover");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    // Three servers in one cluster: the agent's two (127.0.0.1 and 127.0.0.2, both port
    // 4222, as the name's port cannot change) and the director's (127.0.0.3), so that the
    // director stays connected while the agent's server goes away.
    let route = |n: u8| format!("127.0.0.{n}:6222");
    let cluster = |me: u8| Cluster {
        listen: route(me),
        routes: (1..=3).filter(|n| *n != me).map(route).collect(),
    };
    let mut first = NatsServer::start(
        &sb,
        &pki,
        NATS_CN,
        "first",
        "127.0.0.1:4222",
        Some(cluster(1)),
    );
    let _second = NatsServer::start(
        &sb,
        &pki,
        NATS_CN,
        "second",
        "127.0.0.2:4222",
        Some(cluster(2)),
    );
    let _director_server = NatsServer::start(
        &sb,
        &pki,
        NATS_CN,
        "director",
        DIRECTOR_SIDE,
        Some(cluster(3)),
    );
    let dns = Dns::start(&sb, DIRECTOR_NAME, "127.0.0.1".parse().unwrap());
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director
        .ns()
        .wait_answer(DIRECTOR_NAME, "127.0.0.1".parse().unwrap());
    // Counts (never drops) packets to either agent-side server: a dial made before its rules
    // were committed, or any packet of the agent's flows left unmarked, shows as "unmarked".
    sb.nft_script(
        r#"table inet observer {
    chain out {
        type filter hook output priority 0; policy accept;
        ip daddr { 127.0.0.1, 127.0.0.2 } tcp dport 4222 meta mark != 0xb054 counter comment "unmarked"
        ip daddr { 127.0.0.1, 127.0.0.2 } tcp dport 4222 meta mark 0xb054 counter comment "marked"
    }
}
"#,
    )
    .expect("observer table");

    let _agent = start_agent(
        &sb,
        &agent_cg,
        &settings(
            &[nats_url(&format!("{DIRECTOR_NAME}:4222"))],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
        true,
    );
    director.wait_pong(CONNECT_LIMIT);
    let connected_at = Instant::now();
    wait_endpoints(&sb, &[addr("127.0.0.1:4222")], Duration::from_secs(5));

    dns.point(DIRECTOR_NAME, "127.0.0.2".parse().unwrap());
    director
        .ns()
        .wait_answer(DIRECTOR_NAME, "127.0.0.2".parse().unwrap());
    // A connection shorter than the backoff's "stable" second would (on purpose) delay the
    // reconnect by up to 250 ms; a director's connection normally lasts long, so measure that.
    std::thread::sleep(STABLE.saturating_sub(connected_at.elapsed()));
    let t0 = Instant::now();
    first.stop();
    let stopped = t0.elapsed();
    // Re-sent every 20 ms, so the figure is within 20 ms of the agent's re-subscription.
    let reply = director.request_every("ping", CONNECT_LIMIT, Duration::from_millis(20));
    let took = t0.elapsed();
    assert_eq!(
        reply,
        Ok(json!({"value": "pong"})),
        "ping via the second server"
    );
    eprintln!(
        "FAILOVER: first server stopped (SIGTERM, {stopped:?}) -> ping answered via the second: {took:?}"
    );
    wait_endpoints(&sb, &[addr("127.0.0.2:4222")], Duration::from_secs(5));
    assert!(
        took <= Duration::from_secs(5),
        "failover took {took:?} (issue target: subscribed again within 2 s)"
    );
    let seen = sb
        .counters("inet", "observer", "out")
        .expect("observer counters");
    let count = |name: &str| seen.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v);
    assert!(count("marked") > 0, "the observer saw the agent: {seen:?}");
    assert_eq!(
        count("unmarked"),
        0,
        "every packet the agent sent to either server was marked: {seen:?}"
    );

    // The rules followed the name: the new address is guarded, the old one is not.
    expect_probe(&sb, &other, USER, "127.0.0.2:4222", Probe::TimedOut);
    expect_probe(&sb, &other, USER, "127.0.0.1:4222", Probe::Refused);
    let (_, st) = sb.status().expect("status");
    let p = protected(&st);
    assert!(
        p.contains(&"127.0.0.2:4222".to_string()) && !p.contains(&"127.0.0.1:4222".to_string()),
        "{st:#}"
    );
}

// 5. DNS unreachable while reconnecting: the old rules stay, the agent comes back.
#[test]
fn dns_down_during_reconnect_keeps_the_rules_and_reconnects() {
    let sb = sandbox("nats-dns-down");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let mut server = single_server(&sb, &pki);
    let mut dns = Dns::start(&sb, DIRECTOR_NAME, "127.0.0.1".parse().unwrap());
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director
        .ns()
        .wait_answer(DIRECTOR_NAME, "127.0.0.1".parse().unwrap());
    let _agent = start_agent(
        &sb,
        &agent_cg,
        &settings(
            &[nats_url(&format!("{DIRECTOR_NAME}:4222"))],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
        true,
    );
    director.wait_pong(CONNECT_LIMIT);
    let endpoint = addr(AGENT_SIDE);
    wait_endpoints(&sb, &[endpoint], Duration::from_secs(5));
    drop(director);

    dns.stop();
    assert!(
        director_lookup_fails(&sb),
        "DNS must be unreachable for this test"
    );
    let t0 = Instant::now();
    server.restart();
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    // While the agent reconnects without DNS, the set never loses the endpoint.
    let mut checks = 0;
    let deadline = Instant::now() + CONNECT_LIMIT;
    loop {
        assert_eq!(
            nats_endpoints(&sb),
            [endpoint],
            "the NATS set during the reconnect (check {checks})"
        );
        checks += 1;
        if director.ping_once(Duration::from_millis(300)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not reconnect within {CONNECT_LIMIT:?} with DNS down"
        );
    }
    eprintln!(
        "DNS down: reconnected to the old address {:?} after the server restart ({checks} set checks)",
        t0.elapsed()
    );
    expect_probe(&sb, &other, USER, AGENT_SIDE, Probe::TimedOut);
    let (code, st) = status_when(&sb, "resolve failures in status", CONNECT_LIMIT, |_, st| {
        bus(st, "resolve_failures") >= 1 && bus(st, "connects") >= 2
    });
    assert_eq!(code, 0, "{st:#}");
    assert!(protected(&st).contains(&AGENT_SIDE.to_string()), "{st:#}");
}

// 5b. DNS unreachable at start: nothing to dial and no rules to keep; the agent retries and
// connects once the name resolves.
#[test]
fn dns_down_at_start_is_retried_until_the_name_resolves() {
    let sb = sandbox("nats-dns-late");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    let mut agent = start_agent(
        &sb,
        &agent_cg,
        &settings(
            &[nats_url(&format!("{DIRECTOR_NAME}:4222"))],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
        true,
    );
    let (code, st) = status_when(&sb, "resolve failures in status", CONNECT_LIMIT, |_, st| {
        bus(st, "resolve_failures") >= 2
    });
    assert_alive(&mut agent);
    assert_eq!(bus(&st, "connects"), 0, "{st:#}");
    assert_eq!(nats_endpoints(&sb), [], "nothing resolved, nothing guarded");
    eprintln!(
        "DNS down at start: status exit {code}, nats_bus = {}",
        st["agent"]["nats_bus"]
    );

    let _dns = Dns::start(&sb, DIRECTOR_NAME, "127.0.0.1".parse().unwrap());
    let t0 = Instant::now();
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    eprintln!(
        "DNS down at start: answered {:?} after dnsmasq started",
        t0.elapsed()
    );
    wait_endpoints(&sb, &[addr(AGENT_SIDE)], Duration::from_secs(5));
}

/// Whether a lookup of the director's name fails now (dnsmasq gone).
fn director_lookup_fails(sb: &Sandbox) -> bool {
    let ns = integration::nats::in_netns(sb);
    ns.lookup(DIRECTOR_NAME).is_err()
}

// 6. A dead first URL and a live second.
#[test]
fn dead_first_url_then_live_second_both_protected() {
    let sb = sandbox("nats-dead-first");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _server = single_server(&sb, &pki);
    // Nothing listens on 4223 and up: refused at once. One this agent dials before the live
    // one (its order is keyed by its id), so that the failed dial happens and is reported.
    let dead_port = (4223..4300u16)
        .find(|p| {
            let d = addr(&format!("127.0.0.1:{p}"));
            mbus::dial_order(AGENT_ID, &[d, addr(AGENT_SIDE)], 8) == [0, 1]
        })
        .expect("a port dialled first");
    let dead_addr = format!("127.0.0.1:{dead_port}");
    let dead = dead_addr.as_str();
    let _agent = start_agent(
        &sb,
        &agent_cg,
        &settings(
            &[nats_url(dead), nats_url(AGENT_SIDE)],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
        true,
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    wait_endpoints(&sb, &[addr(dead), addr(AGENT_SIDE)], Duration::from_secs(5));

    // The dead endpoint is guarded too: others time out where the agent's cgroup is refused.
    expect_probe(&sb, &other, USER, dead, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, dead, Probe::Refused);
    expect_probe(&sb, &other, USER, AGENT_SIDE, Probe::TimedOut);
    let (_, st) = status_when(&sb, "bus counters in status", CONNECT_LIMIT, |_, st| {
        bus(st, "connects") >= 1
    });
    let p = protected(&st);
    assert!(
        p.contains(&dead.to_string()) && p.contains(&AGENT_SIDE.to_string()),
        "{st:#}"
    );
    let last = st["agent"]["nats_bus"]["last_error"].as_str().unwrap_or("");
    assert!(
        bus(&st, "connect_failures") >= 1 && last.contains(dead),
        "the failed dial is reported: {st:#}"
    );
}

// 7. 1,024 endpoints commit in one go and are all guarded.
#[test]
fn a_thousand_endpoints_are_all_in_the_sets() {
    let sb = sandbox("nats-1024");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _server = single_server(&sb, &pki);
    // The live one first (the agent dials a few per attempt, in order); then 1,024 IPv4
    // literals in 10.99.0.0/22 and one IPv6 literal, none of which has a route in the
    // namespace.
    let many: Vec<String> = (0..1024u32)
        .map(|i| format!("10.99.{}.{}:4222", i / 256, i % 256))
        .collect();
    let v6 = "[fd00:99::1]:4222";
    let mut urls = vec![nats_url(AGENT_SIDE)];
    urls.extend(many.iter().map(|a| nats_url(a)));
    urls.push(nats_url(v6));
    let t0 = Instant::now();
    let _agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&urls, &pki.ca_pem, &pki.client("agent")),
        true,
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    let mut want: Vec<SocketAddr> = many.iter().map(|a| addr(a)).collect();
    want.push(addr(AGENT_SIDE));
    want.push(addr(v6));
    wait_endpoints(&sb, &want, Duration::from_secs(5));
    eprintln!(
        "1,026 endpoints: agent start -> sets full and ping answered in {:?}",
        t0.elapsed()
    );
    assert_eq!(nats_set(&sb, "nats_v4").map(|v| v.len()), Some(1025));
    assert_eq!(nats_set(&sb, "nats_v6"), Some(vec![addr(v6)]));

    let (_, st) = sb.status().expect("status");
    assert_eq!(protected(&st).len(), 1026 + 2, "NATS + monit endpoints");

    // The last of them is enforced: give the namespace that address (the nats-server listens
    // on 0.0.0.0:4222, so it answers there) and probe it.
    let out = sb
        .exec(["ip", "addr", "add", "10.99.3.255/32", "dev", "lo"])
        .output(integration::COMMAND_TIMEOUT)
        .expect("ip addr add");
    assert!(out.status.success(), "{}", integration::describe(&out));
    expect_probe(&sb, &other, USER, "10.99.3.255:4222", Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, "10.99.3.255:4222", Probe::Connected);
    expect_probe(&sb, &other, USER, AGENT_SIDE, Probe::TimedOut);
}

// 8a. A malformed URL as the only URL: the agent runs on without a bus and says why.
#[test]
fn malformed_only_url_is_named_and_the_agent_keeps_running() {
    let sb = sandbox("nats-bad-url");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let bad = format!("nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:notaport");
    let mut agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&[bad], &pki.ca_pem, &pki.client("agent")),
        true,
    );
    let log = wait_log(&agent, "127.0.0.1:notaport");
    std::thread::sleep(Duration::from_secs(2));
    assert_alive(&mut agent);
    assert!(log.contains("malformed"), "{log}");
    assert!(!agent.log().contains(NATS_PASSWORD), "password in the log");
    assert!(
        chain_exists(&sb, "monit_access"),
        "monit firewall installed"
    );
    bus_not_started_says(&sb, &agent, "notaport", "malformed URL");
}

// 8b. A malformed URL beside a good one: the good one is used, the bad one is named.
#[test]
fn malformed_url_beside_a_good_one_is_named_and_skipped() {
    let sb = sandbox("nats-bad-and-good");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    let bad = "nats://127.0.0.1:42x22".to_string();
    let agent = start_agent(
        &sb,
        &agent_cg,
        &settings(
            &[bad, nats_url(AGENT_SIDE)],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
        true,
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    let log = wait_log(&agent, "127.0.0.1:42x22");
    assert!(log.contains("malformed"), "{log}");
    assert_eq!(nats_endpoints(&sb), [addr(AGENT_SIDE)]);
}

// 8c. No client certificate: a clear error naming the field; the firewall keeps running.
#[test]
fn missing_client_certificate_is_named_and_the_agent_keeps_running() {
    let sb = sandbox("nats-no-cert");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _server = single_server(&sb, &pki);
    let empty = Leaf {
        cert_pem: String::new(),
        key_pem: String::new(),
    };
    let mut agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &empty),
        true,
    );
    let log = wait_log(&agent, "env.bosh.mbus.cert.certificate");
    std::thread::sleep(Duration::from_secs(2));
    assert_alive(&mut agent);
    assert!(log.contains("is empty"), "{log}");
    assert!(
        chain_exists(&sb, "monit_access"),
        "monit firewall installed"
    );
    let _l = sb.listen(integration::MONIT_V4).expect("monit listener");
    expect_probe(&sb, &other, USER, integration::MONIT_V4, Probe::TimedOut);
    bus_not_started_says(
        &sb,
        &agent,
        "env.bosh.mbus.cert.certificate",
        "missing client cert",
    );
}

// 8c'. A certificate and a key that do not belong together: named at start.
#[test]
fn client_certificate_and_key_that_do_not_match_are_named() {
    let sb = sandbox("nats-key-mismatch");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    let mixed = Leaf {
        cert_pem: pki.client("agent").cert_pem,
        key_pem: pki.client("agent").key_pem,
    };
    let mut agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &mixed),
        true,
    );
    let log = wait_log(&agent, "env.bosh.mbus.cert.private_key");
    assert!(log.contains("not a usable pair"), "{log}");
    assert_alive(&mut agent);
    assert!(
        chain_exists(&sb, "monit_access"),
        "monit firewall installed"
    );
    eprintln!(
        "mismatched key: agent log line: {}",
        line_with(&agent.log(), "env.bosh.mbus.cert.private_key")
    );
}

// 8d. A server whose CN does not match: refused with the CN named, retried; once the server
// presents a proper certificate the agent connects.
#[test]
fn server_cn_mismatch_is_named_retried_and_recovers() {
    let sb = sandbox("nats-evil-cn");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let mut evil = NatsServer::start(&sb, &pki, "evil.example.com", "evil", "0.0.0.0:4222", None);
    let mut agent = start_agent(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent")),
        true,
    );
    let (_, st) = status_when(&sb, "CN errors in status", CONNECT_LIMIT, |_, st| {
        bus(st, "attempts") >= 3
            && st["agent"]["nats_bus"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("evil.example.com"))
    });
    assert_eq!(bus(&st, "connects"), 0, "{st:#}");
    assert!(agent.log().contains("evil.example.com"), "{}", agent.log());
    assert_alive(&mut agent);
    assert!(
        chain_exists(&sb, "monit_access"),
        "monit firewall installed"
    );
    eprintln!(
        "CN mismatch: status last_error = {}",
        st["agent"]["nats_bus"]["last_error"]
    );

    evil.stop();
    let _good = NatsServer::start(&sb, &pki, NATS_CN, "good", "0.0.0.0:4222", None);
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    let t = director.wait_pong(CONNECT_LIMIT);
    eprintln!("CN mismatch: connected {t:?} after a proper server came up");
}

// 8e. A client certificate the server does not trust (other CA): the server refuses, the
// agent reports it and retries.
#[test]
fn untrusted_client_certificate_is_reported_and_retried() {
    let sb = sandbox("nats-untrusted-client");
    let pki = Pki::new("ca");
    let stranger = Pki::new("other ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    let mut agent = start_agent(
        &sb,
        &agent_cg,
        &settings(
            &[nats_url(AGENT_SIDE)],
            &pki.ca_pem,
            &stranger.client("agent"),
        ),
        true,
    );
    let (code, st) = status_when(&sb, "dial errors in status", CONNECT_LIMIT, |_, st| {
        bus(st, "attempts") >= 3 && st["agent"]["nats_bus"]["last_error"].is_string()
    });
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(bus(&st, "connects"), 0, "{st:#}");
    let last = st["agent"]["nats_bus"]["last_error"].as_str().unwrap_or("");
    assert!(last.contains(AGENT_SIDE), "names the endpoint: {last}");
    assert_alive(&mut agent);
    eprintln!("untrusted client cert: status last_error = {last}");
}

// 9. EnableNATSFirewall false: no NATS rules (an earlier run's are removed), the link works.
#[test]
fn nats_firewall_disabled_installs_no_nats_rules_and_connects() {
    let sb = sandbox("nats-disabled");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _server = single_server(&sb, &pki);
    let settings = settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent"));

    // An earlier run with the NATS firewall on; its table stays when it stops.
    let mut earlier = start_agent(&sb, &agent_cg, &settings, true);
    wait_endpoints(&sb, &[addr(AGENT_SIDE)], CONNECT_LIMIT);
    earlier.stop().expect("stop the earlier agent");
    drop(earlier);
    eprintln!(
        "NATS firewall disabled: after the earlier (enabled) agent stopped, nats_access {}",
        if chain_exists(&sb, "nats_access") {
            "was left in place"
        } else {
            "was gone already"
        }
    );

    let _agent = start_agent(&sb, &agent_cg, &settings, false);
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    for chain in ["nats_access", "nats_guard"] {
        assert!(!chain_exists(&sb, chain), "chain {chain} must not exist");
    }
    for set in ["nats_v4", "nats_v6"] {
        assert_eq!(nats_set(&sb, set), None, "set {set} must not exist");
    }
    assert!(
        chain_exists(&sb, "monit_access"),
        "monit firewall installed"
    );
    expect_probe(&sb, &other, USER, AGENT_SIDE, Probe::Connected);
    let (code, st) = status_when(&sb, "bus counters in status", CONNECT_LIMIT, |_, st| {
        bus(st, "connects") >= 1
    });
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["agent"]["nats"], "disabled", "{st:#}");
    assert!(!protected(&st).contains(&AGENT_SIDE.to_string()), "{st:#}");
}

/// Waits until the agent's log contains `needle`; returns the log.
/// `firewall status` exits 0 (the firewall is fine) and says why the bus did not start,
/// naming `needle` and never the NATS password.
fn bus_not_started_says(sb: &Sandbox, agent: &integration::Agent, needle: &str, label: &str) {
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    let why = st["agent"]["nats_bus"]["startup_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains(needle) && !why.contains(NATS_PASSWORD),
        "status must say why the bus did not start: {st:#}"
    );
    eprintln!(
        "{label}: agent log line: {}\n  status agent.last_error={} agent.nats_bus={}",
        line_with(&agent.log(), needle),
        st["agent"]["last_error"],
        st["agent"]["nats_bus"]
    );
}

fn wait_log(agent: &integration::Agent, needle: &str) -> String {
    let mut log = String::new();
    let res = integration::wait_for(
        &format!("{needle:?} in the agent log"),
        Duration::from_secs(10),
        || {
            log = agent.log();
            Ok(log.contains(needle).then_some(()))
        },
    );
    if let Err(e) = res {
        panic!("{e}; log:\n{log}");
    }
    log
}

fn line_with(log: &str, needle: &str) -> String {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or("")
        .to_string()
}

// 15. A degraded firewall is never silent: the agent whose self-test fails (an nft that refuses
// the probe, as a kernel without `socket` support would) falls back to uid matching, sends an
// alert on hm.agent.alert.<id>, and says so under `firewall` in heartbeats (get_state: runtime
// tests, which have a monit).
#[test]
fn a_degraded_firewall_is_alerted_and_reported() {
    let sb = sandbox("nats-degraded");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    let alerts = director.subscribe(&format!("hm.agent.alert.{AGENT_ID}"));
    let heartbeats = director.subscribe(&format!("hm.agent.heartbeat.{AGENT_ID}"));

    let nft = sb.nft_refusing_selftest().expect("nft wrapper");
    let exec = agent_exec_with(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent")),
        true,
        &json!({"HeartbeatIntervalSeconds": 1}),
    )
    .env("BOSH_AGENT_NFT", &nft);
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    agent.wait_ready(integration::READY_TIMEOUT).expect("ready");

    let alert = alerts
        .recv_timeout(CONNECT_LIMIT)
        .unwrap_or_else(|e| panic!("no alert ({e}); log:\n{}", agent.log()))
        .json()
        .expect("alert JSON");
    assert_eq!(
        alert["severity"], 4,
        "the fallback still protects: a warning; {alert:#}"
    );
    assert_eq!(alert["title"], "bosh-agent firewall - degraded - alert");
    let summary = alert["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("uid fallback"), "{alert:#}");
    for key in ["id", "created_at"] {
        assert!(
            alert.get(key).is_some(),
            "upstream's alert has {key}: {alert:#}"
        );
    }
    // No monit in this sandbox: job state takes upstream's 20 retries (1 s apart) to be
    // "unknown", so the heartbeat comes after that.
    const MONIT_RETRIES: Duration = Duration::from_secs(45);
    let hb = heartbeats
        .recv_timeout(MONIT_RETRIES)
        .expect("a heartbeat")
        .json()
        .expect("heartbeat JSON");
    assert_eq!(hb["firewall"]["degraded"], true, "{hb:#}");
    assert_eq!(hb["firewall"]["mode"], "uid", "{hb:#}");
    // Once, not every reconcile: the problems did not change.
    assert!(
        alerts.recv_timeout(Duration::from_secs(3)).is_err(),
        "the same problem is alerted once"
    );
    assert_alive(&mut agent);
}

// RUST_LOG=trace: the NATS client's own tracing would print the CONNECT line (user and
// password) and every message it receives; those targets are capped at info, so neither the
// URL's password nor a private key sent in a request reaches the log.
#[test]
fn trace_logging_never_prints_the_password_or_a_private_key() {
    let sb = sandbox("nats-trace-log");
    let pki = Pki::new("ca");
    let agent_cg = cg(&sb, "agent");
    let _server = single_server(&sb, &pki);
    let client = pki.client("agent");
    let exec = agent_exec_with(
        &sb,
        &agent_cg,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &client),
        true,
        &json!({}),
    )
    .env("RUST_LOG", "trace");
    let mut agent = sb.spawn_agent(&exec).expect("spawn agent");
    agent
        .wait_ready(integration::READY_TIMEOUT)
        .expect("agent ready");
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    // A request carrying a key, as update_settings does when the director rotates the
    // certificate (an unknown method here, so nothing else changes).
    let reply = director
        .call(
            "frobnicate",
            json!([client.key_pem]),
            3,
            Duration::from_secs(5),
        )
        .expect("reply");
    assert_eq!(
        reply,
        json!({"exception": {"message": "unknown message frobnicate"}})
    );
    director.wait_pong(CONNECT_LIMIT);
    let log = agent.log();
    assert!(
        log.contains("DEBUG") && log.contains("log filter"),
        "RUST_LOG=trace took effect (the agent's own debug line): {log}"
    );
    assert!(
        !log.contains(NATS_PASSWORD),
        "the password is logged: {log}"
    );
    let key_line = client
        .key_pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() > 20)
        .expect("a base64 line of the key");
    assert!(!log.contains(key_line), "the private key is logged: {log}");
    assert!(
        !log.contains("PRIVATE KEY"),
        "the private key is logged: {log}"
    );
}
