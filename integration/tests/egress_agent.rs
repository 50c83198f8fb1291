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
/// `DenyCloudMetadata` with the stateless guard.
const DENY_STATELESS: &str = r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":1,"DenyCloudMetadata":true,"EgressTracking":"stateless"}}}}"#;
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

/// A netprobe TCP listener on `addr` in `ns`, returned once it listens (its log is `name`).
fn listen(sb: &Sandbox, ns: &Netns, name: &str, addr: &str) -> Proc {
    let log = sb.log_path(name);
    let mut listener = Exec::new([
        sb.tools().netprobe.as_os_str(),
        OsStr::new("listen"),
        OsStr::new(addr),
    ])
    .netns(ns.file())
    .log(&log)
    .spawn()
    .unwrap();
    wait_for(
        &format!("the {name} listener"),
        Duration::from_secs(10),
        || {
            if let Some(s) = listener.try_status()? {
                return Err(integration::Error(format!(
                    "listener exited ({s}): {}",
                    listener.log_text()
                )));
            }
            Ok(listener.log_text().contains("listening").then_some(()))
        },
    )
    .unwrap();
    listener
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
        let listener = listen(&sb, &meta, "metadata", METADATA);
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
    // The job's rule is listed with its key (its cgroup path) and its cgroup.
    let rules = status["metadata_rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rules.len(), 1, "{status:#}");
    assert_eq!(
        rules[0]["key"].as_str(),
        Some(job.nft_path().as_str()),
        "{status:#}"
    );
    assert!(rules[0]["cgroup"].is_string(), "{status:#}");
    assert_eq!(status["job_rules"], serde_json::json!([]), "{status:#}");
    let eg = &status["agent"]["workload"]["egress"];
    assert_eq!(eg["state"], "enabled", "{status:#}");
    assert_eq!(eg["deny_ranges_v4"], 3, "{status:#}");
    assert_eq!(eg["tracking"], "conntrack", "{status:#}");
    // 168.63.0.0/16 and 169.254.0.0/16; fd00::/16 and fe80::/16.
    assert_eq!(eg["prefilter_buckets_v4"], 2, "{status:#}");
    assert_eq!(eg["prefilter_buckets_v6"], 2, "{status:#}");
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
    assert!(
        text.contains(&format!(
            "metadata jobs: 1\n  - {} (cgroup id ",
            job.nft_path()
        )),
        "{text}"
    );

    // `EgressTracking: stateless`: the same protection, and no `ct` expression in the table.
    agent.stop().unwrap();
    let mut agent = w.sb.start_agent(&agent_cg, DENY_STATELESS).unwrap();
    w.expect(&workload, Probe::TimedOut);
    w.expect(&agent_cg, Probe::Connected);
    w.expect(&job, Probe::Connected);
    let out = w.sb.nft(["list", "table", "inet", "bosh_agent"]).unwrap();
    ok(&out, "nft list table");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains("egress_guard") && !table.split_whitespace().any(|t| t == "ct"),
        "{table}"
    );
    let (code, status) = w.sb.status().unwrap();
    assert_eq!(code, 0, "{status:#}");
    assert_eq!(
        status["agent"]["workload"]["egress"]["tracking"], "stateless",
        "{status:#}"
    );

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

/// The container side of the bridge test: a namespace behind `br0` in the VM, and a peer on
/// the same bridge with a listener (reached by switching, not routing).
struct Bridge {
    _procs: Vec<Proc>,
    container: Netns,
    _peer: Netns,
}

impl Bridge {
    fn new(w: &World) -> Bridge {
        let container = Netns::create(&w.sb.dir().join("ctr")).unwrap();
        let peer = Netns::create(&w.sb.dir().join("peer")).unwrap();
        let (hc, hp) = (container.holder().unwrap(), peer.holder().unwrap());
        sh(
            w.sb.netns(),
            &format!(
                "ip link add br0 type bridge
                 ip link add v-ctr type veth peer name eth0 netns {c}
                 ip link add v-peer type veth peer name eth0 netns {p}
                 ip link set v-ctr master br0; ip link set v-peer master br0
                 ip addr add 10.7.0.1/24 dev br0
                 for d in br0 v-ctr v-peer; do ip link set $d up; done
                 sysctl -qw net.ipv4.ip_forward=1
                 sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0",
                c = hc.pid(),
                p = hp.pid()
            ),
        );
        sh(
            &container,
            "ip addr add 10.7.0.2/24 dev eth0; ip link set eth0 up; ip route add default via 10.7.0.1",
        );
        sh(
            &peer,
            "ip addr add 10.7.0.3/24 dev eth0; ip link set eth0 up",
        );
        sh(&w._meta, "ip route add 10.7.0.0/24 via 10.8.0.1");
        let listener = listen(&w.sb, &peer, "peer", "10.7.0.3:80");
        Bridge {
            _procs: vec![listener, hc, hp],
            container,
            _peer: peer,
        }
    }

    /// How a connection from the container to `addr` ends.
    fn connect(&self, w: &World, addr: &str) -> Probe {
        let out = Exec::new([
            w.sb.tools().netprobe.as_os_str(),
            OsStr::new("connect"),
            OsStr::new(addr),
            OsStr::new("--timeout-ms"),
            OsStr::new("800"),
        ])
        .netns(self.container.file())
        .output(COMMAND_TIMEOUT)
        .unwrap();
        match out.status.code() {
            Some(0) => Probe::Connected,
            Some(1) => Probe::Refused,
            Some(2) => Probe::TimedOut,
            _ => Probe::Failed(describe(&out)),
        }
    }
}

/// The VM's bridge sysctls, read in its namespace.
fn bridge_sysctls(w: &World) -> String {
    let out = run_with_timeout(
        w.sb.netns().command([
            "sh",
            "-c",
            "cat /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-ip6tables",
        ]),
        COMMAND_TIMEOUT,
        "reading the bridge sysctls",
    )
    .unwrap();
    ok(&out, "reading the bridge sysctls");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_container_behind_a_bridge_is_denied_through_the_forward_hook_by_the_real_agent() {
    let w = World::new("egress-bridge");
    let b = Bridge::new(&w);
    let agent_cg = w.cg("agent");
    // No rules yet, bridge netfilter off: the container reaches both the metadata service
    // (routed by the VM) and its neighbour on the bridge (switched).
    assert_eq!(b.connect(&w, METADATA), Probe::Connected);
    assert_eq!(b.connect(&w, "10.7.0.3:80"), Probe::Connected);
    assert_eq!(bridge_sysctls(&w), "0 0");

    // The agent sees the VM's own interfaces (a sysfs of its namespace, in a private mount
    // namespace: the host's /sys shows the host's), so it finds br0 and must switch bridge
    // netfilter on itself.
    let conf = w.sb.write_agent_config(
        r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":1,"DenyCloudMetadata":true,
            "EgressDeny":[{"Destination":"10.7.0.3"}]}}}}"#,
    )
    .unwrap();
    let sys = w.sb.dir().join("vm-sys");
    std::fs::create_dir_all(&sys).unwrap();
    let base = w.sb.dir().join("base");
    std::fs::create_dir_all(&base).unwrap();
    let exec =
        w.sb.exec([
            OsStr::new("sh"),
            OsStr::new("-euc"),
            OsStr::new(
                r#"t="$1"; shift
                mount -t sysfs sysfs "$t"
                mount --bind "$t/class/net" /sys/class/net
                mount --bind "$t/devices/virtual/net" /sys/devices/virtual/net
                exec "$@""#,
            ),
            OsStr::new("sh"),
            sys.as_os_str(),
            w.sb.tools().agent.as_os_str(),
            OsStr::new("-P"),
            OsStr::new("ubuntu"),
            OsStr::new("-C"),
            conf.as_os_str(),
            OsStr::new("-b"),
            base.as_os_str(),
        ])
        .private_mounts(&[])
        .cgroup(&agent_cg)
        .log(&conf.with_extension("log"))
        .env(
            "BOSH_AGENT_CA_CERTS_DIR",
            w.sb.dir().join("ca-certificates"),
        )
        .env("BOSH_AGENT_UPDATE_CA_CERTIFICATES", "/bin/true");
    let mut agent = w.sb.spawn_agent(&exec).unwrap();
    let state = agent.wait_ready(integration::READY_TIMEOUT).unwrap();
    assert!(state["bridge_error"].is_null(), "{state:#}");
    assert_eq!(
        bridge_sysctls(&w),
        "1 1",
        "the agent switched bridge netfilter on"
    );

    // Routed and switched alike now meet egress_forward.
    let (_, before) = w.sb.status().unwrap();
    let denied = counter(&before, "egress_denied");
    assert_eq!(b.connect(&w, METADATA), Probe::TimedOut);
    assert_eq!(b.connect(&w, "10.7.0.3:80"), Probe::TimedOut);
    let (code, after) = w.sb.status().unwrap();
    assert_eq!(code, 0, "{after:#}");
    assert!(
        counter(&after, "egress_denied") >= denied + 2,
        "{before:#} -> {after:#}"
    );
    assert!(
        !after["warnings"].to_string().contains("bypass"),
        "{after:#}"
    );
    // The agent itself still reaches the metadata service from the VM.
    w.expect(&agent_cg, Probe::Connected);
    agent.stop().unwrap();
}
