//! Twenty real agents, each in its own network namespace and cgroup with its NATS firewall
//! on, against a three-node nats-server cluster with mutual TLS whose nodes advertise
//! addresses no agent's settings name (see `integration::fleet`). Correctness only, no
//! timing: every agent subscribes and answers ping, heartbeats arrive, the agents are spread
//! over the nodes, every agent of a killed node subscribes again on another and goes back to
//! it once it is up again, and no agent ever dials an address its table has no rule for.
//! Needs root, nft, nats-server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use integration::fleet::{DEFAULT_TLS_TIMEOUT, Fleet, FleetOptions, NODES};

const AGENTS: usize = 20;
/// Bounds on waits only (the machine may be busy); nothing is timed.
const LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

/// The director pings every agent of `ids` (resending each second) and each answers.
fn every_agent_answers(fleet: &Fleet, ids: &[String], when: &str) {
    let round = fleet
        .director()
        .ping_all(ids, LIMIT, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        round.missing.is_empty(),
        "no pong {when} from {:?}",
        round.missing
    );
    assert_eq!(round.answered.len(), ids.len(), "{when}");
}

#[test]
fn a_fleet_on_a_three_node_cluster() {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("fleet: {what} at {:.1} s", t0.elapsed().as_secs_f64());
    let mut fleet = Fleet::build(&FleetOptions {
        heartbeat_seconds: 1,
        // Short, so that the return to a restarted node fits in the test.
        return_home: Some("1000-3000".to_string()),
        ..FleetOptions::new(AGENTS, "fleet-test")
    })
    .unwrap_or_else(|e| panic!("building the fleet: {e}"));
    step("built");
    // Every node runs with the fleet's TLS timeout, and an authorization timeout that covers
    // the handshake (nats-server counts it from the accept).
    let varz = fleet.varz().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(varz.len(), NODES);
    for (i, v) in &varz {
        let tls = v["tls_timeout"].as_f64();
        let auth = v["auth_timeout"].as_f64();
        assert_eq!(
            tls,
            Some(DEFAULT_TLS_TIMEOUT.as_secs_f64()),
            "node {i}: {v}"
        );
        assert!(
            auth.zip(tls).is_some_and(|(a, t)| a > t),
            "node {i}: auth_timeout {auth:?} does not cover tls_timeout {tls:?}"
        );
    }
    let ids = fleet.ids();
    fleet.spawn_agents().unwrap_or_else(|e| panic!("{e}"));

    // All subscribed, and all answer ping.
    let (_, conns) = fleet
        .wait_subscribed(&ids, None, LIMIT, POLL)
        .unwrap_or_else(|e| panic!("{e}"));
    step("subscribed");
    every_agent_answers(&fleet, &ids, "at start");
    assert_eq!(ids.len(), AGENTS);
    for (id, (_, c)) in &conns {
        let a = fleet
            .agents()
            .iter()
            .find(|a| &a.id == id)
            .expect("known agent");
        assert_eq!(
            c.ip,
            std::net::IpAddr::V4(a.ip),
            "{id} connects from its own address"
        );
    }

    // The agents are spread over the nodes (each picks its first node at random).
    let per_node: BTreeMap<usize, usize> = conns.values().fold(BTreeMap::new(), |mut m, (n, _)| {
        *m.entry(*n).or_default() += 1;
        m
    });
    assert!(
        per_node.len() >= 2,
        "all {AGENTS} agents on one node: {per_node:?}"
    );

    step("pinged");
    // Heartbeats from every agent.
    let deadline = Instant::now() + LIMIT;
    loop {
        let from: BTreeSet<String> = fleet
            .director()
            .heartbeats()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if ids.iter().all(|id| from.contains(id)) {
            break;
        }
        let missing: Vec<&String> = ids.iter().filter(|id| !from.contains(*id)).collect();
        assert!(Instant::now() < deadline, "no heartbeat from {missing:?}");
        std::thread::sleep(POLL);
    }

    step("heartbeats");
    // Kill (SIGKILL) the node with the most agents (not the director's, the last): each of them
    // subscribes again on another node.
    let (&victim, _) = per_node
        .iter()
        .filter(|(n, _)| **n != NODES - 1)
        .max_by_key(|(_, n)| **n)
        .expect("a node other than the director's holds agents");
    let moved: Vec<String> = conns
        .iter()
        .filter(|(_, (n, _))| *n == victim)
        .map(|(id, _)| id.clone())
        .collect();
    let before_stop = SystemTime::now();
    fleet.kill_node(victim).unwrap_or_else(|e| panic!("{e}"));
    let (_, after) = fleet
        .wait_subscribed(&moved, Some(before_stop), LIMIT, POLL)
        .unwrap_or_else(|e| panic!("{e}"));
    for id in &moved {
        let (n, _) = after[id];
        assert_ne!(n, victim, "{id} is back on the stopped node");
    }
    step("failed over");
    every_agent_answers(&fleet, &ids, "after the failover");

    // With every node up, each agent is on its own first node; once the killed node is back,
    // its agents return to it (make-before-break: each is then subscribed once, there).
    let homes = fleet.homes();
    for (id, (n, _)) in &conns {
        assert_eq!(homes[id], *n, "{id} did not start on its first node");
    }
    fleet.start_node(victim).unwrap_or_else(|e| panic!("{e}"));
    let (_, back) = fleet
        .wait_home(LIMIT, POLL)
        .unwrap_or_else(|e| panic!("{e}"));
    for id in &moved {
        assert_eq!(back[id].0, victim, "{id} is not back on its node");
    }
    step("returned home");
    every_agent_answers(&fleet, &ids, "after the return");

    // Nobody dialled an address without a rule; everybody dialled (so the audit saw traffic),
    // and every table guards exactly the three configured nodes.
    let configured: Vec<_> = {
        let mut v: Vec<_> = fleet.nodes().iter().map(|n| n.client).collect();
        v.sort();
        v
    };
    assert_eq!(configured.len(), NODES);
    step("pinged again");
    let audits = fleet.audit().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(audits.len(), AGENTS);
    for a in &audits {
        assert!(
            !a.dialled.is_empty(),
            "{}: the audit saw no dial at all",
            a.agent_id
        );
        assert_eq!(a.ruled, configured, "{}: its NATS rules", a.agent_id);
        assert!(
            a.unruled().is_empty(),
            "{} dialled {:?}, which its table has no rule for (rules: {:?})",
            a.agent_id,
            a.unruled(),
            a.ruled
        );
    }

    // The audit itself catches such a dial: one made from the first agent's namespace to a
    // node's advertised address is recorded, and is not in the agent's rules.
    let probe = &fleet.agents()[0];
    let advertised = fleet.nodes()[0].advertised;
    let out = integration::Exec::new([
        "timeout",
        "2",
        "bash",
        "-c",
        &format!("echo > /dev/tcp/{}/{}", advertised.ip(), advertised.port()),
    ])
    .netns(probe.netns().file())
    .output(integration::COMMAND_TIMEOUT)
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = out; // refused or timed out: only the SYN matters
    let audits = fleet.audit().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(audits[0].unruled(), vec![advertised], "{:?}", audits[0]);
    step("audited");
}
