//! The workload policies at the packet level: scripts rendered by `platform::firewall` and
//! applied with the real `nft` inside network namespaces the test makes, real sockets in
//! real cgroups. Nothing here touches the host's ruleset or interfaces: every interface is
//! created inside a test namespace, and the namespaces go away with the test.
//!
//! Topology (one per test):
//! ```text
//!  outside 10.9.0.2 fd09::2 ──veth── vm 10.9.0.1 fd09::1
//!  metadata 169.254.169.254 + 10.8.0.2 (this kernel has no dummy driver) ──veth── vm 10.8.0.1
//!  container 10.7.0.2 ──veth──┐
//!  peer      10.7.0.3 ──veth──┴─ br0 10.7.0.1 in vm (ip_forward on)
//! ```
//! Run as root: `cargo test -p integration --test egress_ingress`. A test that cannot run
//! fails with the reason.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use integration::{
    COMMAND_TIMEOUT, Cgroup, CgroupDir, Exec, Netns, Proc, TempDir, Tools, cgroup2_mount,
    check_prerequisites, describe, run_with_timeout, wait_for,
};
use platform::cgroup::NftCgroupPath;
use platform::firewall::policy::{AlertListenerPolicy, WorkloadPolicy};
use platform::firewall::policy_config::PolicyConfig;
use platform::firewall::readback::{conforms, snapshot};
use platform::firewall::render::{
    Leftovers, render_metadata_job_rule, render_ruleset, render_ruleset_removing,
};
use platform::firewall::status::parse_counters;
use platform::firewall::{DesiredState, Identity, JobRule, MonitPolicy, NatsPolicy};

const METADATA: &str = "169.254.169.254";
const TIMEOUT_MS: &str = "800";

/// Exit codes of netprobe/pktprobe.
const CONNECTED: i32 = 0;
const REFUSED: i32 = 1;
const TIMED_OUT: i32 = 2;

// Fields drop in declaration order: the namespaces (bind mounts inside `dir`) and the
// processes go before the directory, which can then be removed.
struct World {
    vm: Netns,
    outside: Netns,
    meta: Netns,
    container: Netns,
    peer: Netns,
    cg: Cgroup,
    agent: CgroupDir,
    workload: CgroupDir,
    allowed: CgroupDir,
    job: CgroupDir,
    monit: CgroupDir,
    _procs: Vec<Proc>,
    netprobe: PathBuf,
    pktprobe: PathBuf,
    dir: TempDir,
}

fn ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", describe(out));
}

fn sh(ns: &Netns, cmd: &str) {
    let out = run_with_timeout(ns.command(["sh", "-euc", cmd]), COMMAND_TIMEOUT, cmd).unwrap();
    ok(&out, cmd);
}

/// The cgroup as `socket cgroupv2` matches it: its nft path and its depth below the v2 root.
fn identity(cg: &CgroupDir) -> Identity {
    let mount = cgroup2_mount().unwrap();
    let level = cg.path().strip_prefix(&mount).unwrap().components().count() as u32;
    Identity::Cgroup {
        path: NftCgroupPath::new(&cg.nft_path()).unwrap(),
        level,
    }
}

impl World {
    fn new() -> World {
        check_prerequisites().unwrap();
        let tools = Tools::get().unwrap();
        let netprobe = tools.netprobe.clone();
        let pktprobe = netprobe.with_file_name("pktprobe");
        assert!(
            pktprobe.is_file(),
            "{} missing: cargo build -p integration",
            pktprobe.display()
        );
        let dir = TempDir::new("egress").unwrap();
        let ns = |n: &str| Netns::create(&dir.path().join(n)).unwrap();
        let (vm, outside, meta, container, peer) = (
            ns("vm"),
            ns("outside"),
            ns("meta"),
            ns("container"),
            ns("peer"),
        );
        let procs: Vec<Proc> = [&outside, &meta, &container, &peer]
            .iter()
            .map(|n| n.holder().unwrap())
            .collect();
        let pid = |i: usize| procs[i].pid();
        sh(
            &vm,
            &format!(
                "ip link add v-out type veth peer name eth0 netns {o}
                 ip link add v-meta type veth peer name eth0 netns {m}
                 ip link add br0 type bridge
                 ip link add v-ctr type veth peer name eth0 netns {c}
                 ip link add v-peer type veth peer name eth0 netns {p}
                 ip link set v-ctr master br0; ip link set v-peer master br0
                 ip addr add 10.9.0.1/24 dev v-out; ip addr add fd09::1/64 dev v-out nodad
                 ip addr add 10.8.0.1/24 dev v-meta; ip addr add fd08::1/64 dev v-meta nodad
                 ip addr add 10.7.0.1/24 dev br0
                 for d in v-out v-meta br0 v-ctr v-peer; do ip link set $d up; done
                 ip route add {METADATA}/32 via 10.8.0.2
                 ip -6 route add fd00:ec2::254/128 via fd08::2
                 sysctl -qw net.ipv4.ip_forward=1",
                o = pid(0),
                m = pid(1),
                c = pid(2),
                p = pid(3)
            ),
        );
        sh(
            &outside,
            "ip addr add 10.9.0.2/24 dev eth0; ip addr add fd09::2/64 dev eth0 nodad
             ip link set eth0 up; sysctl -qw net.ipv4.ping_group_range='0 0'",
        );
        sh(
            &meta,
            &format!(
                "ip addr add 10.8.0.2/24 dev eth0; ip link set eth0 up
                 ip addr add {METADATA}/32 dev eth0
                 ip addr add fd08::2/64 dev eth0 nodad; ip addr add fd00:ec2::254/128 dev eth0 nodad
                 ip -6 route add default via fd08::1
                 ip route add default via 10.8.0.1"
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
        sh(&vm, "sysctl -qw net.ipv4.ping_group_range='0 0'");
        let cg = Cgroup::create().unwrap();
        let agent = cg.child("agent").unwrap();
        let workload = cg.child("workload").unwrap();
        let allowed = cg.child("allowed").unwrap();
        let job = cg.child("job").unwrap();
        let monit = cg.child("monit").unwrap();
        let mut w = World {
            dir,
            vm,
            outside,
            meta,
            container,
            peer,
            cg,
            agent,
            workload,
            allowed,
            job,
            monit,
            _procs: procs,
            netprobe,
            pktprobe,
        };
        // The metadata service: HTTP on 80, DNS on 53 (udp and tcp).
        let np = w.netprobe.clone();
        let pp = w.pktprobe.clone();
        let meta = w.meta.file().to_path_buf();
        let peer = w.peer.file().to_path_buf();
        w.listen(&meta, &np, &["listen", "169.254.169.254:80"]);
        w.listen(&meta, &np, &["listen", "169.254.169.254:53"]);
        w.listen(&meta, &pp, &["udp-echo", "169.254.169.254:53"]);
        w.listen(&peer, &np, &["listen", "10.7.0.3:80"]);
        w.listen(&meta, &np, &["listen", "[fd00:ec2::254]:80"]);
        w
    }

    fn listen(&mut self, ns: &Path, bin: &Path, args: &[&str]) {
        let n = self._procs.len();
        let log = self.dir.path().join(format!("listener-{n}.log"));
        let mut argv = vec![bin.as_os_str().to_os_string()];
        argv.extend(args.iter().map(|a| a.into()));
        let p = Exec::new(argv).netns(ns).log(&log).spawn().unwrap();
        wait_for("listener ready", Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening")
                .then_some(()))
        })
        .unwrap();
        self._procs.push(p);
    }

    fn nft(&self, ns: &Netns, script: &str) -> Output {
        let mut cmd = ns.command(["nft", "-f", "-"]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn apply(&self, script: &str) {
        let out = self.nft(&self.vm, script);
        ok(&out, &format!("nft -f in the vm:\n{script}"));
    }

    fn list(&self, ns: &Netns, what: &[&str]) -> String {
        let mut argv = vec!["nft"];
        argv.extend_from_slice(what);
        let out = run_with_timeout(ns.command(argv), COMMAND_TIMEOUT, "nft list").unwrap();
        ok(&out, "nft list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn table(&self) -> String {
        self.list(&self.vm, &["list", "table", "inet", "bosh_agent"])
    }

    fn counter(&self, name: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_str(&self.list(
            &self.vm,
            &["-j", "list", "counters", "table", "inet", "bosh_agent"],
        ))
        .unwrap();
        parse_counters(&v)
            .unwrap()
            .into_iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.packets)
    }

    /// Runs a probe in `ns` (and `cg`), returning its exit code.
    fn probe(&self, ns: &Netns, cg: Option<&CgroupDir>, bin: &Path, args: &[&str]) -> i32 {
        let mut argv = vec![bin.as_os_str().to_os_string()];
        argv.extend(args.iter().map(|a| a.into()));
        argv.extend(["--timeout-ms".into(), TIMEOUT_MS.into()]);
        let mut e = Exec::new(argv).netns(ns.file());
        if let Some(cg) = cg {
            e = e.cgroup(cg);
        }
        let out = e.output(Duration::from_secs(10)).unwrap();
        match out.status.code() {
            Some(c @ 0..=2) => c,
            _ => panic!("probe {args:?} failed: {}", describe(&out)),
        }
    }

    fn tcp(&self, ns: &Netns, cg: Option<&CgroupDir>, addr: &str) -> i32 {
        self.probe(ns, cg, &self.netprobe, &["connect", addr])
    }

    fn udp(&self, ns: &Netns, cg: Option<&CgroupDir>, addr: &str) -> i32 {
        self.probe(ns, cg, &self.pktprobe, &["udp", addr])
    }

    fn ping(&self, ns: &Netns, ip: &str) -> i32 {
        self.probe(ns, None, &self.pktprobe, &["ping", ip])
    }

    /// The desired state for a policy configuration (the agent's own monit policy on too, as
    /// on a real VM, so the workload rules are shown to live beside it).
    fn desired(&self, config: &str) -> DesiredState {
        let cfg: PolicyConfig = serde_json::from_str(config).unwrap();
        let mount = cgroup2_mount().unwrap();
        let workload = cfg
            .build(
                &mut |p| {
                    let dir = CgroupDir::at(mount.join(p));
                    if !dir.path().is_dir() {
                        return Err(format!("no cgroup {}", dir.path().display()));
                    }
                    Ok(identity(&dir))
                },
                identity(&self.monit),
            )
            .unwrap();
        DesiredState {
            identity: identity(&self.agent),
            monit: MonitPolicy::Enabled { allow_root: false },
            nats: NatsPolicy::Disabled,
            workload,
        }
    }

    /// `EgressAllowCgroups` path of a test cgroup (relative to the cgroup2 mount).
    fn rel(&self, cg: &CgroupDir) -> String {
        cg.path()
            .strip_prefix(cgroup2_mount().unwrap())
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

#[test]
fn workloads_are_kept_off_the_metadata_service_and_the_agent_is_not() {
    let w = World::new();
    let agent_child = w.agent.join("blobstore-cli");
    agent_child.create().unwrap();
    // Before any rule, everyone reaches the metadata service.
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        CONNECTED
    );
    let config = format!(
        r#"{{"DenyCloudMetadata": true, "EgressAllowCgroups": ["{}"]}}"#,
        w.rel(&w.allowed)
    );
    let st = w.desired(&config);
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));

    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        TIMED_OUT
    );
    assert!(w.counter("egress_denied") >= 1);
    assert_eq!(
        w.tcp(&w.vm, Some(&w.agent), "169.254.169.254:80"),
        CONNECTED
    );
    assert_eq!(
        w.tcp(&w.vm, Some(&agent_child), "169.254.169.254:80"),
        CONNECTED
    );
    assert_eq!(
        w.tcp(&w.vm, Some(&w.allowed), "169.254.169.254:80"),
        CONNECTED
    );
    // DNS on the metadata address stays open to everyone (GCP, Azure).
    assert_eq!(
        w.udp(&w.vm, Some(&w.workload), "169.254.169.254:53"),
        CONNECTED
    );
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:53"),
        CONNECTED
    );

    // `firewall-allow metadata`: a job rule in egress_access_jobs lets the job through, and
    // survives a rebuild of the policy.
    assert_eq!(w.tcp(&w.vm, Some(&w.job), "169.254.169.254:80"), TIMED_OUT);
    let rule = JobRule {
        identity: identity(&w.job),
        comment: platform::firewall::jobs::metadata_comment("job", Some(w.job.inode().unwrap()))
            .unwrap(),
    };
    w.apply(&render_metadata_job_rule(&rule));
    assert_eq!(w.tcp(&w.vm, Some(&w.job), "169.254.169.254:80"), CONNECTED);
    w.apply(&render_ruleset(&st));
    assert_eq!(w.tcp(&w.vm, Some(&w.job), "169.254.169.254:80"), CONNECTED);
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        TIMED_OUT
    );

    // The forward path: a container behind the bridge, routed through the VM.
    assert_eq!(w.tcp(&w.container, None, "169.254.169.254:80"), TIMED_OUT);
    assert_eq!(w.udp(&w.container, None, "169.254.169.254:53"), CONNECTED);

    // Reject: callers fail at once.
    let st = w.desired(r#"{"DenyCloudMetadata": true, "EgressAction": "reject"}"#);
    w.apply(&render_ruleset(&st));
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        REFUSED
    );
    assert_eq!(w.tcp(&w.container, None, "169.254.169.254:80"), REFUSED);
    assert_eq!(
        w.tcp(&w.vm, Some(&w.agent), "169.254.169.254:80"),
        CONNECTED
    );
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));

    // Switched off: everything is removed (the jobs' chain stays), and the service is open.
    let off = DesiredState {
        workload: WorkloadPolicy::default(),
        ..st
    };
    w.apply(&render_ruleset_removing(
        &off,
        Leftovers::in_listing(&w.table()),
    ));
    assert_eq!(Leftovers::in_listing(&w.table()), Leftovers::none());
    assert_eq!(conforms(&snapshot(&w.table()), &off), Ok(()));
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        CONNECTED
    );
    drop(w.cg);
}

/// Runs `pktprobe bridge-netfilter` in the vm with the vm's own /sys (a private mount
/// namespace) and `extra` shell lines run first.
fn bridge_check(w: &World, extra: &str) -> (i32, String) {
    let cmd = format!(
        "mount -t sysfs sysfs /sys; {extra} exec {} bridge-netfilter --modprobe /bin/false",
        w.pktprobe.display()
    );
    let out = run_with_timeout(
        w.vm.command([
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-euc",
            &cmd,
        ]),
        COMMAND_TIMEOUT,
        "bridge-netfilter",
    )
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn switched_bridge_traffic_is_filtered_with_bridge_netfilter_and_fails_closed_without() {
    let w = World::new();
    let st = w.desired(r#"{"EgressDeny": [{"Destination": "10.7.0.3"}]}"#);
    w.apply(&render_ruleset(&st));
    // Off: switched traffic never meets the forward hook — the bypass the check prevents.
    sh(
        &w.vm,
        "sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0",
    );
    assert_eq!(w.tcp(&w.container, None, "10.7.0.3:80"), CONNECTED);
    // The check turns it on and reads it back.
    let (code, text) = bridge_check(&w, "");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("br0") && text.contains("switched_on: true"),
        "{text}"
    );
    assert_eq!(w.tcp(&w.container, None, "10.7.0.3:80"), TIMED_OUT);
    assert!(w.counter("egress_denied") >= 1);
    // Off and not settable (a read-only sysctl): fails closed with the reason.
    sh(&w.vm, "sysctl -qw net.bridge.bridge-nf-call-iptables=0");
    let ro = w.dir.path().join("nf-off");
    std::fs::write(&ro, "0\n").unwrap();
    let (code, text) = bridge_check(
        &w,
        &format!(
            "mount --bind -o ro {} /proc/sys/net/bridge/bridge-nf-call-iptables;",
            ro.display()
        ),
    );
    assert_eq!(code, REFUSED, "{text}");
    assert!(
        text.contains("failed closed") && text.contains("bypasses the egress deny list"),
        "{text}"
    );
}

#[test]
fn the_ingress_allow_list_admits_listed_ports_replies_and_neighbour_discovery() {
    let mut w = World::new();
    let np = w.netprobe.clone();
    let pp = w.pktprobe.clone();
    let vm = w.vm.file().to_path_buf();
    let out = w.outside.file().to_path_buf();
    for a in [
        "10.9.0.1:22",
        "10.9.0.1:8080",
        "[fd09::1]:22",
        "[fd09::1]:8080",
    ] {
        w.listen(&vm, &np, &["listen", a]);
    }
    w.listen(&vm, &pp, &["udp-echo", "10.9.0.1:5353"]);
    // The "director": an outbound connection's replies must pass.
    w.listen(&out, &np, &["listen", "10.9.0.2:4222"]);
    let list = |extra: &str| {
        format!(
            r#"{{"IngressAllow": [{{"Protocol": "tcp", "Ports": "22"}}{extra},
                {{"Protocol": "udp", "Ports": 5353, "Sources": ["10.9.0.0/24"]}}]{}}}"#,
            ""
        )
    };
    let st = w.desired(&list(r#", {"Protocol": "tcp", "Ports": "8000-8999"}"#));
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
    sh(&w.outside, "ip neigh flush dev eth0");
    sh(&w.vm, "ip neigh flush dev v-out");
    for a in [
        "10.9.0.1:22",
        "[fd09::1]:22",
        "10.9.0.1:8080",
        "[fd09::1]:8080",
    ] {
        assert_eq!(w.tcp(&w.outside, None, a), CONNECTED, "{a}");
    }
    assert_eq!(w.udp(&w.outside, None, "10.9.0.1:5353"), CONNECTED);
    assert_eq!(w.ping(&w.outside, "10.9.0.1"), CONNECTED);
    assert_eq!(w.ping(&w.outside, "fd09::1"), CONNECTED);
    // Return traffic of an outbound connection (the director link).
    let chat = Exec::new([
        w.netprobe.as_os_str(),
        "chat".as_ref(),
        "10.9.0.2:4222".as_ref(),
        "--messages".as_ref(),
        "5".as_ref(),
    ])
    .netns(w.vm.file())
    .cgroup(&w.agent)
    .output(Duration::from_secs(10))
    .unwrap();
    ok(&chat, "chat with the director");

    // Removing an entry removes its rule (and its element).
    let st = w.desired(&list(""));
    w.apply(&render_ruleset(&st));
    assert!(!w.table().contains("8000-8999"), "{}", w.table());
    let dropped = w.counter("ingress_dropped");
    assert_eq!(w.tcp(&w.outside, None, "10.9.0.1:8080"), TIMED_OUT);
    assert_eq!(w.tcp(&w.outside, None, "[fd09::1]:8080"), TIMED_OUT);
    assert!(w.counter("ingress_dropped") > dropped);
    assert_eq!(w.tcp(&w.outside, None, "10.9.0.1:22"), CONNECTED);

    // IngressAllowICMP false: ping is dropped; IPv6 neighbour discovery still works.
    let st = w.desired(
        r#"{"IngressAllow": [{"Protocol": "tcp", "Ports": "22"}], "IngressAllowICMP": false}"#,
    );
    w.apply(&render_ruleset(&st));
    assert_eq!(w.ping(&w.outside, "10.9.0.1"), TIMED_OUT);
    assert_eq!(w.ping(&w.outside, "fd09::1"), TIMED_OUT);
    sh(&w.outside, "ip neigh flush dev eth0");
    sh(&w.vm, "ip neigh flush dev v-out");
    assert_eq!(w.tcp(&w.outside, None, "[fd09::1]:22"), CONNECTED);

    // An invalid entry changes nothing live: refused before rendering, naming the value.
    let before = w.table();
    let bad: PolicyConfig = serde_json::from_str(
        r#"{"IngressAllow": [{"Protocol": "tcp", "Ports": "22"}, {"Protocol": "tcp", "Ports": "99999"}]}"#,
    )
    .unwrap();
    let e = bad
        .build(&mut |_| Err("unused".into()), identity(&w.monit))
        .unwrap_err();
    assert!(e.to_string().contains("99999"), "{e}");
    // And a script the kernel refuses (an allowed cgroup that does not exist) leaves the
    // previous ruleset intact: one transaction.
    let mut broken = w.desired(r#"{"DenyCloudMetadata": true}"#);
    if let platform::firewall::policy::EgressPolicy::Enabled(eg) = &mut broken.workload.egress {
        eg.allowed.push(Identity::Cgroup {
            path: NftCgroupPath::new("no-such-cgroup-for-this-test").unwrap(),
            level: 1,
        });
    }
    let out = w.nft(&w.vm, &render_ruleset(&broken));
    assert!(!out.status.success(), "nft accepted a missing cgroup");
    assert_eq!(w.table(), before);
    assert_eq!(w.tcp(&w.outside, None, "10.9.0.1:22"), CONNECTED);
}

#[test]
fn the_localhost_guard_and_the_alert_listener() {
    let mut w = World::new();
    let np = w.netprobe.clone();
    let vm = w.vm.file().to_path_buf();
    w.listen(&vm, &np, &["listen", "127.0.0.1:2822"]);
    w.listen(&vm, &np, &["listen", "127.0.0.1:2825"]);
    // A VM with route_localnet=1, and a neighbour that sends to 127.0.0.1:2822: it aims at a
    // host route through the VM and rewrites the destination after routing.
    sh(
        &w.vm,
        "sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.v-out.route_localnet=1",
    );
    sh(
        &w.outside,
        "ip route add 10.9.0.100/32 via 10.9.0.1 dev eth0
         nft add table ip rewrite
         nft 'add chain ip rewrite post { type filter hook postrouting priority 0; }'
         nft add rule ip rewrite post ip daddr 10.9.0.100 ip daddr set 127.0.0.1",
    );
    // A foreign table in the VM that sees what reaches local delivery after our chains.
    sh(
        &w.vm,
        "nft add table inet foreign
         nft 'add chain inet foreign seen { type filter hook input priority 10; }'
         nft add rule inet foreign seen iifname v-out ip daddr 127.0.0.1 tcp dport 2822 counter",
    );
    let seen = |w: &World| -> u64 {
        let t = w.list(&w.vm, &["list", "table", "inet", "foreign"]);
        t.split("packets ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    // Without the guard the neighbour's SYN is delivered to monit's port.
    let _ = w.tcp(&w.outside, None, "10.9.0.100:2822");
    assert!(
        seen(&w) >= 1,
        "the neighbour's packets do not arrive: the test proves nothing"
    );
    let st = w.desired(r#"{"GuardLocalhost": true, "GuardAlertListener": true}"#);
    assert!(matches!(
        st.workload.alert_listener,
        AlertListenerPolicy::Guarded { .. }
    ));
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
    let before = seen(&w);
    assert_eq!(w.tcp(&w.outside, None, "10.9.0.100:2822"), TIMED_OUT);
    assert_eq!(
        seen(&w),
        before,
        "a packet to 127.0.0.1 from a neighbour was delivered"
    );
    assert!(w.counter("localhost_dropped") >= 1);
    // Loopback itself is untouched: the agent still reaches monit.
    assert_eq!(w.tcp(&w.vm, Some(&w.agent), "127.0.0.1:2822"), CONNECTED);

    // The alert listener: monit and the agent only.
    assert_eq!(w.tcp(&w.vm, Some(&w.monit), "127.0.0.1:2825"), CONNECTED);
    assert_eq!(w.tcp(&w.vm, Some(&w.agent), "127.0.0.1:2825"), CONNECTED);
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "127.0.0.1:2825"), TIMED_OUT);
    assert!(w.counter("alerts_dropped") >= 1);

    // Teardown removes exactly our table.
    sh(&w.vm, "nft delete table inet bosh_agent");
    let all = w.list(&w.vm, &["list", "tables"]);
    assert!(
        all.contains("table inet foreign") && !all.contains("bosh_agent"),
        "{all}"
    );
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "127.0.0.1:2825"), CONNECTED);
}

#[test]
fn drift_in_the_new_chains_is_seen_and_repaired_by_a_rebuild() {
    let w = World::new();
    let st = w.desired(
        r#"{"DenyCloudMetadata": true, "IngressAllow": [{"Protocol": "tcp", "Ports": "22"}], "GuardLocalhost": true}"#,
    );
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
    for drift in [
        "flush chain inet bosh_agent egress_guard",
        "delete element inet bosh_agent egress_deny_v4 { 169.254.169.254 }",
        // The prefilter's bucket of 169.254.0.0/16: without it the range would be open.
        "delete element inet bosh_agent egress_deny_v4_hi { 0xa9fe }",
        "add element inet bosh_agent egress_deny_v6_hi { 0x2001 }",
        "flush chain inet bosh_agent ingress_filter",
        "add element inet bosh_agent ingress_ports { tcp . 23 }",
    ] {
        w.apply(&format!("{drift}\n"));
        assert!(conforms(&snapshot(&w.table()), &st).is_err(), "{drift}");
        w.apply(&render_ruleset(&st));
        assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()), "{drift}");
    }
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        TIMED_OUT
    );
}

#[test]
fn firewall_allow_metadata_adds_prunes_and_covers_ipv6() {
    use platform::firewall::jobs::{
        AllowOutcome, allow_metadata, metadata_comment, prune_metadata_rules,
    };
    use platform::firewall::nft::Nft;
    let w = World::new();
    let st = w.desired(r#"{"DenyCloudMetadata": true}"#);
    w.apply(&render_ruleset(&st));
    // IPv6: the AWS IPv6 endpoint is denied to workloads, open to the agent.
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "[fd00:ec2::254]:80"),
        TIMED_OUT
    );
    assert_eq!(
        w.tcp(&w.vm, Some(&w.agent), "[fd00:ec2::254]:80"),
        CONNECTED
    );
    assert_eq!(w.tcp(&w.vm, Some(&w.job), "[fd00:ec2::254]:80"), TIMED_OUT);

    // The real `allow_metadata` (netlink listing, lock, one nft run), from a thread that
    // entered the VM's network namespace: nft and netlink then talk to the VM's table.
    let gone = w.cg.child("gone").unwrap();
    let run_dir = w.dir.path().join("run");
    let vm_ns = w.vm.file().to_path_buf();
    let (job, gone_cg) = (w.job.clone(), gone.clone());
    let outcomes = std::thread::spawn(move || {
        let f = std::fs::File::open(&vm_ns).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let nft = Nft::default();
        let rule = |cg: &CgroupDir, key: &str| JobRule {
            identity: identity(cg),
            comment: metadata_comment(key, Some(cg.inode().unwrap())).unwrap(),
        };
        let inode = job.inode().unwrap();
        let first = allow_metadata(&nft, &run_dir, &rule(&job, "job"), "job", Some(inode)).unwrap();
        let again = allow_metadata(&nft, &run_dir, &rule(&job, "job"), "job", Some(inode)).unwrap();
        let g = gone_cg.inode().unwrap();
        allow_metadata(&nft, &run_dir, &rule(&gone_cg, "gone"), "gone", Some(g)).unwrap();
        gone_cg.remove().unwrap();
        let pruned = prune_metadata_rules(&nft, &run_dir).unwrap();
        (first, again, pruned)
    })
    .join()
    .unwrap();
    assert!(
        matches!(outcomes.0, AllowOutcome::Added { .. }),
        "{:?}",
        outcomes.0
    );
    assert!(
        matches!(
            outcomes.1,
            AllowOutcome::AlreadyAllowed { duplicates: 0, .. }
        ),
        "{:?}",
        outcomes.1
    );
    assert_eq!(outcomes.2, 1, "the rule of the removed cgroup is pruned");
    let jobs = w.list(
        &w.vm,
        &["list", "chain", "inet", "bosh_agent", "egress_access_jobs"],
    );
    assert_eq!(jobs.matches("bosh-metadata-access:").count(), 1, "{jobs}");
    assert_eq!(w.tcp(&w.vm, Some(&w.job), "[fd00:ec2::254]:80"), CONNECTED);
    assert_eq!(w.tcp(&w.vm, Some(&w.job), "169.254.169.254:80"), CONNECTED);
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        TIMED_OUT
    );
    // The job rule is the jobs': the agent's read-back ignores it.
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
}

/// Entries in the VM's conntrack table (`/proc/net/nf_conntrack` is per network namespace).
fn conntrack_entries(w: &World) -> usize {
    let out = run_with_timeout(
        w.vm.command(["cat", "/proc/net/nf_conntrack"]),
        COMMAND_TIMEOUT,
        "nf_conntrack",
    )
    .unwrap();
    ok(
        &out,
        "cat /proc/net/nf_conntrack (the test needs the nf_conntrack module)",
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn the_prefilter_passes_neighbours_of_a_denied_range_and_keeps_it_denied() {
    let mut w = World::new();
    // Beside 10.9.0.2 (in the denied /24): 10.9.1.2 in the same /16 (same prefilter bucket),
    // 10.10.0.2 in another /16; fd09::3 next to the denied fd09::2.
    sh(
        &w.outside,
        "ip addr add 10.9.1.2/32 dev eth0; ip addr add 10.10.0.2/32 dev eth0
         ip addr add fd09::3/128 dev eth0 nodad",
    );
    sh(
        &w.vm,
        "ip route add 10.9.1.0/24 via 10.9.0.2; ip route add 10.10.0.0/16 via 10.9.0.2",
    );
    let np = w.netprobe.clone();
    let out = w.outside.file().to_path_buf();
    for a in [
        "10.9.0.2:80",
        "10.9.1.2:80",
        "10.10.0.2:80",
        "[fd09::2]:80",
        "[fd09::3]:80",
    ] {
        w.listen(&out, &np, &["listen", a]);
    }
    // Before any rule the workload reaches all of them (else the test proves nothing).
    for a in ["10.9.0.2:80", "10.9.1.2:80", "10.10.0.2:80", "[fd09::2]:80"] {
        assert_eq!(w.tcp(&w.vm, Some(&w.workload), a), CONNECTED, "{a}");
    }
    let st = w
        .desired(r#"{"EgressDeny": [{"Destination": "10.9.0.0/24"}, {"Destination": "fd09::2"}]}"#);
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
    let live = w.table();
    assert!(
        live.contains("@nh,128,16 @egress_deny_v4_hi ip daddr @egress_deny_v4 jump egress_guard")
            && live.contains("elements = { 0xa09 }")
            && live.contains("elements = { 0xfd09 }"),
        "{live}"
    );
    let denied = w.counter("egress_denied");
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "10.9.0.2:80"), TIMED_OUT);
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "[fd09::2]:80"), TIMED_OUT);
    assert!(w.counter("egress_denied") >= denied + 2);
    // Same bucket, outside the range: the interval lookup lets it pass.
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "10.9.1.2:80"), CONNECTED);
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "[fd09::3]:80"), CONNECTED);
    // Another bucket: the prefilter alone lets it pass.
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "10.10.0.2:80"), CONNECTED);
    // The agent is not a workload.
    assert_eq!(w.tcp(&w.vm, Some(&w.agent), "10.9.0.2:80"), CONNECTED);
    // A wider list replaces the buckets exactly (flush and refill in the transaction).
    let st = w.desired(r#"{"EgressDeny": [{"Destination": "10.10.0.0/16"}]}"#);
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
    assert!(w.table().contains("elements = { 0xa0a }"), "{}", w.table());
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "10.9.0.2:80"), CONNECTED);
    assert_eq!(w.tcp(&w.vm, Some(&w.workload), "10.10.0.2:80"), TIMED_OUT);
}

#[test]
fn stateless_egress_drops_new_flows_answers_clients_and_never_tracks() {
    let mut w = World::new();
    let np = w.netprobe.clone();
    let pp = w.pktprobe.clone();
    let (vm, meta) = (w.vm.file().to_path_buf(), w.meta.file().to_path_buf());
    // A UDP service on the metadata address that no exception covers.
    w.listen(&meta, &pp, &["udp-echo", "169.254.169.254:5353"]);
    // Servers on the VM (in the test's cgroup: workloads) for clients in a denied range.
    w.listen(&vm, &np, &["listen", "10.9.0.1:8080"]);
    w.listen(&vm, &pp, &["udp-echo", "10.9.0.1:5353"]);
    let config = |tracking: &str| {
        format!(
            r#"{{"EgressDeny": [{{"Destination": "169.254.169.254", "Except": [{{"Protocol": "udp", "Ports": "53"}}]}},
                {{"Destination": "10.9.0.2"}}]{tracking}}}"#
        )
    };
    let st = w.desired(&config(r#", "EgressTracking": "stateless""#));
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
    let live = w.table();
    assert!(
        !live.split_whitespace().any(|t| t == "ct"),
        "a ct expression in stateless mode:\n{live}"
    );
    assert_eq!(
        conntrack_entries(&w),
        0,
        "conntrack entries before any traffic"
    );
    // A workload's new TCP connection and its UDP to the denied address are dropped (a
    // datagram dropped on the output hook fails its send with EPERM: "refused").
    let denied = w.counter("egress_denied");
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        TIMED_OUT
    );
    assert_eq!(
        w.udp(&w.vm, Some(&w.workload), "169.254.169.254:5353"),
        REFUSED
    );
    assert!(w.counter("egress_denied") >= denied + 2);
    // The exception still passes; the agent still connects.
    assert_eq!(
        w.udp(&w.vm, Some(&w.workload), "169.254.169.254:53"),
        CONNECTED
    );
    assert_eq!(
        w.tcp(&w.vm, Some(&w.agent), "169.254.169.254:80"),
        CONNECTED
    );
    // A server on the VM answers a TCP client in a denied range (its SYN-ACK and data are
    // not connection attempts)...
    assert_eq!(w.tcp(&w.outside, None, "10.9.0.1:8080"), CONNECTED);
    // ...but a UDP reply to that client is dropped: nothing tells it from a new flow.
    assert_eq!(w.udp(&w.outside, None, "10.9.0.1:5353"), TIMED_OUT);
    // And nothing was tracked: conntrack never ran in the VM's namespace.
    assert_eq!(
        conntrack_entries(&w),
        0,
        "stateless mode tracked connections"
    );

    // The same traffic in conntrack mode is tracked (the check above can fail), and the
    // UDP reply passes as `established`.
    let st = w.desired(&config(""));
    w.apply(&render_ruleset(&st));
    assert_eq!(conforms(&snapshot(&w.table()), &st), Ok(()));
    assert!(w.table().contains("ct state established,related accept"));
    assert_eq!(w.tcp(&w.outside, None, "10.9.0.1:8080"), CONNECTED);
    assert_eq!(w.udp(&w.outside, None, "10.9.0.1:5353"), CONNECTED);
    assert_eq!(
        w.tcp(&w.vm, Some(&w.workload), "169.254.169.254:80"),
        TIMED_OUT
    );
    assert!(conntrack_entries(&w) > 0, "conntrack mode tracked nothing");
}
