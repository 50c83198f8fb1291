//! The egress deny list as the real `bosh-agent` installs it from agent.json: real `nft`,
//! real sockets and real cgroups, in network namespaces the test makes (see the
//! `integration` harness). Run as root: `cargo test -p integration --test egress_agent`. A
//! test that cannot run (not root, no nft, no cgroup2) fails with the reason.
//!
//! Topology (per test): the sandbox's namespace is the VM; a second namespace stands in for
//! the metadata service, 169.254.169.254 on its end of a veth pair (10.8.0.2), with a TCP
//! listener on port 80. The VM routes 169.254.169.254 through the veth.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

use integration::{
    COMMAND_TIMEOUT, CgroupDir, Exec, Netns, Probe, Proc, Sandbox, describe, run_with_timeout,
    wait_for,
};
use serde_json::Value;

const METADATA: &str = "169.254.169.254:80";
/// `DenyCloudMetadata` (169.254.169.254 among the cloud endpoints), reconciled every second.
const DENY: &str = r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":1,"DenyCloudMetadata":true}}}}"#;
/// The same VM without the key.
const OPEN: &str = r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":1}}}}"#;
/// An entry that does not parse (a host bit set), beside a valid one.
const INVALID: &str = r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":1,"EgressDeny":[{"Destination":"169.254.169.254"},{"Destination":"10.8.0.1/24"}]}}}}"#;

/// The sandbox (the VM), the metadata namespace and its listener.
struct World {
    // Dropped in this order: the listener and the holder, the namespace, then the sandbox
    // (whose directory holds the namespace's file).
    _procs: Vec<Proc>,
    _meta: Netns,
    sb: Sandbox,
}

fn ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", describe(out));
}

fn sh(ns: &Netns, cmd: &str) {
    let out = run_with_timeout(ns.command(["sh", "-euc", cmd]), COMMAND_TIMEOUT, cmd).unwrap();
    ok(&out, cmd);
}

impl World {
    fn new(name: &str) -> World {
        let sb = Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up {name}: {e}"));
        let meta = Netns::create(&sb.dir().join("meta")).unwrap();
        let hold = meta.holder().unwrap();
        sh(
            sb.netns(),
            &format!(
                "ip link add v-meta type veth peer name eth0 netns {}
                 ip addr add 10.8.0.1/24 dev v-meta; ip link set v-meta up
                 ip route add 169.254.169.254/32 via 10.8.0.2",
                hold.pid()
            ),
        );
        sh(
            &meta,
            "ip addr add 10.8.0.2/24 dev eth0; ip addr add 169.254.169.254/32 dev eth0
             ip link set eth0 up",
        );
        let log = sb.log_path("metadata");
        let mut listener = Exec::new([
            sb.tools().netprobe.as_os_str(),
            OsStr::new("listen"),
            OsStr::new(METADATA),
        ])
        .netns(meta.file())
        .log(&log)
        .spawn()
        .unwrap();
        wait_for("the metadata listener", Duration::from_secs(10), || {
            if let Some(s) = listener.try_status()? {
                return Err(integration::Error(format!(
                    "listener exited ({s}): {}",
                    listener.log_text()
                )));
            }
            Ok(listener.log_text().contains("listening").then_some(()))
        })
        .unwrap();
        World {
            sb,
            _meta: meta,
            _procs: vec![listener, hold],
        }
    }

    fn cg(&self, name: &str) -> CgroupDir {
        self.sb.cgroup(name).unwrap()
    }

    /// How a root connection from `cg` to the metadata address ends (root is denied like
    /// any workload: only identities are allowed).
    fn expect(&self, cg: &CgroupDir, want: Probe) {
        let got = self.sb.probe(cg, None, METADATA).unwrap();
        assert_eq!(got, want, "{} -> {METADATA}", cg.nft_path());
    }

    fn chains(&self) -> Vec<String> {
        let v = self
            .sb
            .nft_json(&["table", "inet", "bosh_agent"])
            .unwrap()
            .unwrap_or(Value::Null);
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["chain"]["name"].as_str().map(str::to_string))
            .collect()
    }

    /// The egress policy's objects as nft lists them: chain names (sorted) and the text of
    /// the guard chain and the IPv4 deny set.
    fn egress_objects(&self) -> (Vec<String>, String) {
        let mut names = self.chains();
        names.sort();
        let mut text = String::new();
        for what in [["chain", "egress_guard"], ["set", "egress_deny_v4"]] {
            let out = self
                .sb
                .nft(["list", what[0], "inet", "bosh_agent", what[1]])
                .unwrap();
            ok(&out, "nft list");
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        (names, text)
    }

    fn allow_metadata(&self, cg: &CgroupDir) -> Output {
        self.sb
            .agent_cmd(["firewall-allow", "metadata"])
            .cgroup(cg)
            .output(COMMAND_TIMEOUT)
            .unwrap()
    }
}

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

#[test]
fn workloads_are_denied_the_metadata_service_the_agent_and_allowed_jobs_are_not() {
    let w = World::new("egress-agent");
    let (agent_cg, workload, job) = (w.cg("agent"), w.cg("workload"), w.cg("job"));
    // Before the agent: nothing is denied (the address is served and reachable).
    w.expect(&workload, Probe::Connected);

    let mut agent = w.sb.start_agent(&agent_cg, DENY).unwrap();
    assert!(
        w.chains().iter().any(|c| c == "egress_output"),
        "{:?}",
        w.chains()
    );
    w.expect(&workload, Probe::TimedOut);
    w.expect(&agent_cg, Probe::Connected);
    w.expect(&job, Probe::TimedOut);

    let out = w.allow_metadata(&job);
    ok(&out, "firewall-allow metadata");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("metadata access granted"),
        "{}",
        describe(&out)
    );
    w.expect(&job, Probe::Connected);
    w.expect(&workload, Probe::TimedOut);

    let (code, status) = w.sb.status().unwrap();
    assert_eq!(code, 0, "{status:#}");
    let eg = &status["agent"]["workload"]["egress"];
    assert_eq!(eg["state"], "enabled", "{status:#}");
    assert_eq!(eg["deny_ranges_v4"], 3, "{status:#}");
    assert!(counter(&status, "egress_denied") >= 1, "{status:#}");
    assert!(status.get("conntrack").is_some(), "{status:#}");
    let text =
        w.sb.agent_cmd(["firewall", "status"])
            .output(COMMAND_TIMEOUT)
            .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("egress deny:   3 IPv4 and 2 IPv6 ranges"),
        "{text}"
    );
    assert!(text.contains("egress_denied"), "{text}");

    // The key removed from agent.json: its chains go at the next start.
    agent.stop().unwrap();
    let mut agent = w.sb.start_agent(&agent_cg, OPEN).unwrap();
    let chains = w.chains();
    assert!(
        !chains
            .iter()
            .any(|c| c.starts_with("egress_") && c != "egress_access_jobs"),
        "{chains:?}"
    );
    assert!(chains.iter().any(|c| c == "monit_access"), "{chains:?}");
    w.expect(&workload, Probe::Connected);
    let (code, status) = w.sb.status().unwrap();
    assert_eq!(code, 0, "{status:#}");
    assert!(status["agent"]["workload"].is_null(), "{status:#}");
    agent.stop().unwrap();
}

#[test]
fn an_invalid_entry_is_reported_by_value_and_leaves_the_live_rules_as_they_were() {
    let w = World::new("egress-invalid");
    let (agent_cg, workload) = (w.cg("agent"), w.cg("workload"));
    let mut agent = w.sb.start_agent(&agent_cg, DENY).unwrap();
    w.expect(&workload, Probe::TimedOut);
    let before = w.egress_objects();
    assert!(before.1.contains("169.254.169.254"), "{}", before.1);
    agent.stop().unwrap();

    let mut agent = w.sb.start_agent(&agent_cg, INVALID).unwrap();
    let state = agent.state().unwrap();
    let refused = state["workload_refused"].as_str().unwrap_or_default();
    assert!(
        refused.contains("EgressDeny[1].Destination") && refused.contains("10.8.0.1/24"),
        "{state:#}"
    );
    assert_eq!(
        w.egress_objects(),
        before,
        "the live egress rules stay as they were"
    );
    assert_eq!(state["repairs"], 0, "{state:#}");
    w.expect(&workload, Probe::TimedOut);
    let (_, status) = w.sb.status().unwrap();
    let warnings = status["warnings"].to_string();
    assert!(warnings.contains("10.8.0.1/24"), "{status:#}");
    assert!(agent.log().contains("10.8.0.1/24"), "{}", agent.log());
    agent.stop().unwrap();
}
