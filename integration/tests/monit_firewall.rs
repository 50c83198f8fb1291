//! The monit firewall end to end: the real `bosh-agent`, the real
//! `nft` and real sockets, each test in its own network namespace and cgroups (see the
//! `integration` harness). Run as root: `cargo test -p integration`. A test that cannot run
//! (not root, no nft, no cgroup2) fails with the reason; none is skipped.
//!
//! A forbidden SYN is dropped by the agent's table, so the client times out
//! ([`Probe::TimedOut`]). Job-side probes run as `nobody` ([`USER`]), because root is let
//! through by the default `MonitAllowRoot` rule and would prove nothing.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::symlink;
use std::process::Output;
use std::time::{Duration, Instant};

use integration::{
    COMMAND_TIMEOUT, CgroupDir, MONIT_V4, MONIT_V6, NOBODY, Probe, READY_TIMEOUT, Sandbox,
    cgroup2_mount, describe, wait_for,
};
use serde_json::Value;

/// Reconcile every second, so that drift repair and pruning are observable in a test.
const FAST: &str = r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":1}}}}"#;
/// Reconcile practically never: what a test sees is what the first apply left.
const SLOW: &str = r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":3600}}}}"#;
/// Root refused unless it is the agent or an allowed job.
const NO_ROOT: &str =
    r#"{"Platform":{"Linux":{"Firewall":{"MonitAllowRoot":false,"ReconcileIntervalSeconds":1}}}}"#;

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

/// Asserts how a connection from `cg` as `uid` to `addr` ends.
fn expect_probe(sb: &Sandbox, cg: &CgroupDir, uid: Option<u32>, addr: &str, want: Probe) {
    let got = sb.probe(cg, uid, addr).expect("run netprobe connect");
    let who = match uid {
        Some(u) => format!("uid {u}"),
        None => "root".into(),
    };
    assert_eq!(got, want, "{who} in {} -> {addr}", cg.nft_path());
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: {}", describe(out));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status JSON once it satisfies `pred` (the agent writes its state asynchronously).
fn status_when(
    sb: &Sandbox,
    what: &str,
    timeout: Duration,
    pred: impl Fn(i32, &Value) -> bool,
) -> Value {
    let mut last = None;
    let res = wait_for(what, timeout, || {
        let (code, v) = sb.status()?;
        let ok = pred(code, &v);
        last = Some((code, v.clone()));
        Ok(ok.then_some(v))
    });
    res.unwrap_or_else(|e| panic!("{e}; last status: {last:#?}"))
}

/// Waits until `cg` lists `pid` (the placement wrapper moves a process just after spawn).
fn wait_in_cgroup(cg: &CgroupDir, pid: u32) {
    wait_for(
        &format!("pid {pid} in {}", cg.nft_path()),
        Duration::from_secs(5),
        || Ok(cg.procs()?.contains(&pid).then_some(())),
    )
    .expect("process placed");
}

/// An executable shell script in the sandbox directory.
fn script(sb: &Sandbox, name: &str, body: &str) -> std::path::PathBuf {
    sb.script(name, body).expect("write script")
}

// 1. Who reaches monit with the default configuration.
#[test]
fn agent_cgroup_reaches_monit_and_other_non_root_is_dropped() {
    let sb = sandbox("default-policy");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _v4 = sb.listen(MONIT_V4).expect("listener on 127.0.0.1:2822");
    let _v6 = sb.listen(MONIT_V6).expect("listener on [::1]:2822");

    // Control: before the agent runs nothing is guarded, so the probes themselves work.
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::Connected);

    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "status exit code; {st:#}");
    assert_eq!(
        st["agent"]["mode"], "cgroup",
        "the self-test proved cgroup matching; {st:#}"
    );
    assert_eq!(
        st["agent"]["cgroup_path"],
        agent_cg.nft_path().as_str(),
        "{st:#}"
    );
    assert_eq!(st["table_present"], true);
    assert_eq!(st["matches_desired"], true);

    for addr in [MONIT_V4, MONIT_V6] {
        // A non-root process spawned into the agent's cgroup carries the agent's identity.
        expect_probe(&sb, &agent_cg, USER, addr, Probe::Connected);
        // A non-root process elsewhere: the SYN is dropped.
        expect_probe(&sb, &other, USER, addr, Probe::TimedOut);
        // Root elsewhere passes by default (operators' `monit summary`).
        expect_probe(&sb, &other, ROOT, addr, Probe::Connected);
    }
}

// 1b. MonitAllowRoot: false.
#[test]
fn monit_allow_root_false_drops_root_in_other_cgroups() {
    let sb = sandbox("no-root");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, NO_ROOT).expect("agent ready");

    expect_probe(&sb, &other, ROOT, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, ROOT, MONIT_V4, Probe::Connected);
    let st = sb.status().expect("status").1;
    assert_eq!(st["agent"]["monit"], "enabled (root refused)", "{st:#}");
}

// 1c. `UseMonitIptablesFirewall: true` (upstream key): the stemcell guards monit itself, so
// the agent installs no monit chain and keeps nobody out.
#[test]
fn use_monit_iptables_firewall_skips_the_monit_chain() {
    let sb = sandbox("iptables-monit");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let conf = r#"{"Platform":{"Linux":{"UseMonitIptablesFirewall":true}}}"#;
    let _agent = sb.start_agent(&agent_cg, conf).expect("agent ready");

    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["agent"]["monit"], "disabled", "{st:#}");
    for chain in ["monit_access", "monit_guard"] {
        let listing = sb
            .nft_json(&["chain", "inet", "bosh_agent", chain])
            .expect("nft");
        assert!(
            listing.is_none(),
            "chain {chain} must not exist: {listing:?}"
        );
    }
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::Connected);
}

// 2. A job cgroup gets through after `firewall-allow monit`, also through the argv[0] alias.
#[test]
fn job_cgroup_connects_only_after_firewall_allow() {
    let sb = sandbox("firewall-allow");
    let agent_cg = cg(&sb, "agent");
    let job_a = cg(&sb, "job-a");
    let job_b = cg(&sb, "job-b");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");

    expect_probe(&sb, &job_a, USER, MONIT_V4, Probe::TimedOut);
    let out = sb.firewall_allow(&job_a).expect("firewall-allow");
    assert_exit(&out, 0, "firewall-allow monit from job-a");
    assert!(stdout(&out).contains("granted"), "{}", describe(&out));
    expect_probe(&sb, &job_a, USER, MONIT_V4, Probe::Connected);

    // The name existing job releases call.
    let bin = sb.dir().join("bin");
    fs::create_dir(&bin).expect("mkdir bin");
    let alias = bin.join("bosh-enable-monit-access");
    symlink(&sb.tools().agent, &alias).expect("symlink");
    expect_probe(&sb, &job_b, USER, MONIT_V4, Probe::TimedOut);
    let out = sb
        .exec([&alias])
        .cgroup(&job_b)
        .output(COMMAND_TIMEOUT)
        .expect("alias");
    assert_exit(&out, 0, "bosh-enable-monit-access from job-b");
    expect_probe(&sb, &job_b, USER, MONIT_V4, Probe::Connected);

    for job in [&job_a, &job_b] {
        let rules = sb.job_rules_for(job).expect("list job rules");
        assert_eq!(rules.len(), 1, "one rule for {}: {rules:?}", job.nft_path());
        assert_eq!(
            rules[0].cgid,
            Some(job.inode().expect("inode")),
            "{rules:?}"
        );
    }
    // Job rules are not part of the agent's desired state: status still matches.
    assert_eq!(sb.status().expect("status").0, 0);
}

// 3. An emulated stemcell table that drops unmarked packets to 2822.
#[test]
fn stemcell_table_lets_every_packet_of_an_allowed_flow_through() {
    let sb = sandbox("stemcell");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    // What stemcells install (inet bosh_firewall at priority 0), with counters to see which
    // packets it judged. The agent's chain runs first (priority -1) and marks.
    sb.nft_script(
        r#"table inet bosh_firewall {
    chain out {
        type filter hook output priority 0; policy accept;
        tcp dport 2822 meta mark 0xb054 counter comment "marked"
        tcp dport 2822 meta mark != 0xb054 counter drop comment "unmarked"
    }
}
"#,
    )
    .expect("stemcell table");
    // Control: the emulation works; without the agent's marks even its cgroup is dropped.
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::TimedOut);

    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    let counters = |sb: &Sandbox| -> (u64, u64) {
        let c = sb
            .counters("inet", "bosh_firewall", "out")
            .expect("counters");
        let get = |name: &str| {
            c.iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| *p)
                .expect("counter")
        };
        (get("marked"), get("unmarked"))
    };
    let (marked0, unmarked0) = counters(&sb);
    let start = Instant::now();
    let out = sb
        .chat(&agent_cg, USER, MONIT_V4, 50, Duration::from_millis(40))
        .expect("chat");
    assert_exit(
        &out,
        0,
        "50 round trips over one connection from the agent's cgroup",
    );
    assert!(stdout(&out).contains("echoed 50/50"), "{}", describe(&out));
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "the connection lived for seconds"
    );
    let (marked1, unmarked1) = counters(&sb);
    // Every client packet (SYN, 50 data segments, ACKs, FIN) was marked; none was dropped.
    assert!(
        marked1 - marked0 >= 52,
        "marked packets: {marked0} -> {marked1}"
    );
    assert_eq!(
        unmarked1, unmarked0,
        "no packet of the allowed flow left unmarked"
    );

    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &other, ROOT, MONIT_V4, Probe::Connected);
}

// 4. Concurrency, idempotence, a recreated cgroup, pruning.
#[test]
fn fifty_concurrent_allows_repeat_recreate_and_prune() {
    let sb = sandbox("concurrent");
    let agent_cg = cg(&sb, "agent");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    let jobs: Vec<CgroupDir> = (0..50).map(|i| cg(&sb, &format!("job-{i}"))).collect();

    // All 50 started before any is waited for, so they contend for the lock and the table
    // (and with the agent's once-a-second reconcile).
    let pending: Vec<_> = jobs
        .iter()
        .map(|j| {
            sb.agent_cmd(["firewall-allow", "monit"])
                .cgroup(j)
                .start()
                .expect("start")
        })
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        let out = p
            .wait(Duration::from_secs(60))
            .expect("firewall-allow finished");
        assert_exit(&out, 0, &format!("concurrent firewall-allow from job-{i}"));
    }
    let rules = sb.job_rules().expect("job rules");
    assert_eq!(rules.len(), 50, "exactly 50 rules: {rules:#?}");
    for j in &jobs {
        let key = j.nft_path();
        let mine: Vec<_> = rules
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "one rule for {key}");
        assert_eq!(mine[0].cgid, Some(j.inode().expect("inode")));
    }
    expect_probe(&sb, &jobs[3], USER, MONIT_V4, Probe::Connected);

    // Repeating leaves one rule.
    let out = sb.firewall_allow(&jobs[0]).expect("repeat");
    assert_exit(&out, 0, "repeated firewall-allow");
    assert!(
        stdout(&out).contains("already granted"),
        "{}",
        describe(&out)
    );
    assert_eq!(sb.job_rules_for(&jobs[0]).expect("rules").len(), 1);
    assert_eq!(sb.job_rules().expect("rules").len(), 50);

    // A recreated cgroup (same path, new inode): its stale rule is replaced.
    let old = jobs[1].inode().expect("inode");
    jobs[1].remove().expect("rmdir job-1");
    jobs[1].create().expect("mkdir job-1");
    let new = jobs[1].inode().expect("inode");
    assert_ne!(old, new, "a recreated cgroup has a new inode");
    expect_probe(&sb, &jobs[1], USER, MONIT_V4, Probe::TimedOut);
    let out = sb.firewall_allow(&jobs[1]).expect("allow recreated");
    assert_exit(&out, 0, "firewall-allow from the recreated job-1");
    let mine = sb.job_rules_for(&jobs[1]).expect("rules");
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(
        mine[0].cgid,
        Some(new),
        "the rule is for the new inode: {mine:?}"
    );
    expect_probe(&sb, &jobs[1], USER, MONIT_V4, Probe::Connected);

    // A deleted cgroup: the agent prunes its rule when it reconciles (every second here).
    jobs[2].remove().expect("rmdir job-2");
    wait_for(
        "the agent to prune job-2's rule",
        Duration::from_secs(5),
        || Ok(sb.job_rules_for(&jobs[2])?.is_empty().then_some(())),
    )
    .expect("pruned");
    assert_eq!(sb.job_rules().expect("rules").len(), 49);
    status_when(
        &sb,
        "pruned >= 1 in the state",
        Duration::from_secs(3),
        |_, v| v["agent"]["pruned"].as_u64().unwrap_or(0) >= 1,
    );
}

// 5. Restart: job rules survive, and the table protects monit while the agent is down.
#[test]
fn restart_keeps_job_rules_and_the_table_stays_while_down() {
    let sb = sandbox("restart");
    let agent_cg = cg(&sb, "agent");
    let job = cg(&sb, "job");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let mut agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    assert_exit(
        &sb.firewall_allow(&job).expect("allow"),
        0,
        "firewall-allow",
    );
    let before = sb.job_rules_for(&job).expect("rules");
    assert_eq!(before.len(), 1);

    let status = agent.stop().expect("agent stops on SIGTERM");
    assert!(status.success(), "exit status on SIGTERM: {status}");
    assert!(
        sb.agent_table_present().expect("nft"),
        "the table stays when the agent stops"
    );
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &job, USER, MONIT_V4, Probe::Connected);
    assert_eq!(
        sb.status().expect("status").0,
        0,
        "the stopped agent's table still matches"
    );

    // Restart with a changed policy (root refused): the new policy applies, job rules stay.
    let mut again = sb
        .spawn_agent(&sb.agent_exec(&agent_cg, NO_ROOT).expect("exec"))
        .expect("restart");
    again
        .wait_ready(READY_TIMEOUT)
        .expect("restarted agent ready");
    // The very same rule (same kernel handle): the agent did not flush and re-add it.
    assert_eq!(
        sb.job_rules_for(&job).expect("rules"),
        before,
        "job rule kept across the restart"
    );
    expect_probe(&sb, &job, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &other, ROOT, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::Connected);
}

// 5b. A restart with the same configuration finds the table as it wants it: no transaction at
// all (every rule keeps its kernel handle), and nothing is open while it starts.
#[test]
fn restart_with_the_same_configuration_leaves_the_table_untouched() {
    let sb = sandbox("restart-same");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let handles = || {
        let out = sb
            .nft(["-a", "list", "table", "inet", "bosh_agent"])
            .expect("nft");
        assert!(out.status.success(), "{}", describe(&out));
        stdout(&out)
    };
    let mut agent = sb.start_agent(&agent_cg, SLOW).expect("agent ready");
    let before = handles();
    agent.stop().expect("agent stops");

    let mut again = sb
        .start_agent(&agent_cg, SLOW)
        .expect("restarted agent ready");
    assert_eq!(handles(), before, "no rule was flushed and re-added");
    assert!(
        again.log().contains("nothing to apply"),
        "the agent says why: {}",
        again.log()
    );
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["matches_desired"], true, "{st:#}");
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::Connected);
    again.stop().expect("agent stops");

    // A changed configuration is applied (root refused now), still without opening anything.
    let _third = sb.start_agent(&agent_cg, NO_ROOT).expect("agent ready");
    assert_ne!(handles(), before, "the changed policy was applied");
    assert_eq!(sb.status().expect("status").0, 0);
    expect_probe(&sb, &other, ROOT, MONIT_V4, Probe::TimedOut);
}

// 5c. The first apply is read back off the start-up path; a change made to the table before
// that read-back must be repaired, not taken as the reference.
#[test]
fn a_change_before_the_read_back_is_repaired_not_adopted() {
    let sb = sandbox("early-drift");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let mark = sb.dir().join("deleted-once");
    // An nft that, the first time the installed table is listed, deletes the monit base chain
    // just before listing: the drift lands between the apply and its read-back.
    let nft = script(
        &sb,
        "nft-early-drift",
        &format!(
            "#!/bin/sh\n\
             if [ \"$1 $2 $3 $4\" = 'list table inet bosh_agent' ] && [ ! -e '{m}' ] \\\n\
                && nft list chain inet bosh_agent monit_access >/dev/null 2>&1; then\n\
               touch '{m}'; nft delete chain inet bosh_agent monit_access || exit 1\n\
             fi\n\
             exec nft \"$@\"\n",
            m = mark.display()
        ),
    );
    let exec = sb
        .agent_exec(&agent_cg, SLOW)
        .expect("exec")
        .env("BOSH_AGENT_NFT", &nft);
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    let st = agent.wait_ready(READY_TIMEOUT).expect("agent ready");
    assert!(mark.exists(), "the drift was injected");
    assert!(
        st["repairs"].as_u64().unwrap_or(0) >= 1,
        "the agent repaired the table: {st:#}\n{}",
        agent.log()
    );
    assert!(agent.log().contains("the table changed"), "{}", agent.log());
    let (code, status) = sb.status().expect("status");
    assert_eq!(code, 0, "{status:#}");
    assert!(
        sb.nft_json(&["chain", "inet", "bosh_agent", "monit_access"])
            .expect("nft")
            .is_some(),
        "monit_access is back"
    );
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::Connected);
}

/// Runs `f` in a thread inside the network namespace `netns` (namespaces are per thread).
fn in_netns<T: Send + 'static>(netns: &fs::File, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = netns.try_clone().expect("dup netns");
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread")
}

// 5d. The in-process netlink listing that firewall-allow and the prune plan with gives the same
// handles and comments as nft's own listing (and "absent" for a missing table or chain).
#[test]
fn netlink_listing_agrees_with_nft() {
    use platform::firewall::netlink::{KernelRule, chain_rules};
    let sb = sandbox("netlink");
    let netns = fs::File::open(sb.netns().file()).expect("open netns");
    let read = |chain: &'static str| {
        in_netns(&netns, move || chain_rules("bosh_agent", chain)).expect("netlink read")
    };
    let exists = || {
        in_netns(&netns, || {
            platform::firewall::netlink::table_exists("bosh_agent")
        })
        .expect("netlink read")
    };
    assert!(!exists(), "no table");
    assert_eq!(read("monit_access_jobs"), None, "no table");
    sb.nft_script("add table inet bosh_agent\nadd chain inet bosh_agent other\n")
        .expect("nft");
    assert!(exists(), "the table exists");
    assert_eq!(read("monit_access_jobs"), None, "no chain");
    let mut script = String::from("add chain inet bosh_agent monit_access_jobs\n");
    for i in 0..300u32 {
        let comment = if i % 3 == 0 {
            String::new()
        } else {
            format!(" comment \"bosh-monit-access:job-{i} cgid={}\"", 1000 + i)
        };
        script.push_str(&format!(
            "add rule inet bosh_agent monit_access_jobs meta skuid {i} accept{comment}\n"
        ));
    }
    sb.nft_script(&script).expect("nft");
    let listing = sb
        .nft_json(&["chain", "inet", "bosh_agent", "monit_access_jobs"])
        .expect("nft")
        .expect("chain listed");
    let want: Vec<KernelRule> = listing["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .map(|r| KernelRule {
            handle: r["handle"].as_u64().expect("handle"),
            comment: r["comment"].as_str().map(str::to_string),
        })
        .collect();
    assert_eq!(want.len(), 300);
    assert_eq!(
        read("monit_access_jobs"),
        Some(want),
        "300 rules over several datagrams"
    );
    assert_eq!(
        read("other"),
        Some(Vec::new()),
        "an empty chain is not an absent one"
    );

    // The NATS fast path: endpoints added over netlink in one batch land in the sets exactly
    // as nft would put them; a batch with one bad part changes nothing.
    sb.nft_script(
        "add set inet bosh_agent nats_v4 { type ipv4_addr . inet_service; }\n\
         add set inet bosh_agent nats_v6 { type ipv6_addr . inet_service; }\n\
         add element inet bosh_agent nats_v4 { 10.9.0.0 . 4222 }\n",
    )
    .expect("nft");
    let mut eps: Vec<std::net::SocketAddr> = (0..1500u32)
        .map(|i| std::net::SocketAddr::from(([10, 9, (i / 256) as u8, (i % 256) as u8], 4222)))
        .collect();
    eps.push("[2001:db8::1]:4223".parse().expect("v6"));
    eps.push("[::ffff:10.0.0.1]:4222".parse().expect("v6"));
    let add = |v6_set: &'static str, eps: Vec<std::net::SocketAddr>| {
        in_netns(&netns, move || {
            platform::firewall::netlink::add_endpoints("bosh_agent", "nats_v4", v6_set, &eps)
        })
    };
    let elements = |set: &str| -> Vec<String> {
        let out = sb
            .nft(["-j", "list", "set", "inet", "bosh_agent", set])
            .expect("nft");
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let mut got: Vec<String> = v["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|o| o.get("set"))
            .flat_map(|s| s["elem"].as_array().cloned().unwrap_or_default())
            .map(|e| {
                let c = &e["concat"];
                format!("{} {}", c[0].as_str().unwrap_or("?"), c[1])
            })
            .collect();
        got.sort();
        got
    };
    let failed = add("no_such_set", eps.clone());
    assert!(failed.is_err(), "a missing set is an error: {failed:?}");
    assert_eq!(
        elements("nats_v4").len(),
        1,
        "nothing of a failed batch was added"
    );
    add("nats_v6", eps.clone()).expect("netlink add");
    let mut want: Vec<String> = eps
        .iter()
        .filter(|e| e.is_ipv4())
        .map(|e| format!("{} {}", e.ip(), e.port()))
        .collect();
    want.sort();
    assert_eq!(
        elements("nats_v4"),
        want,
        "1,500 IPv4 endpoints, the existing one kept"
    );
    assert_eq!(
        elements("nats_v6"),
        vec![
            "2001:db8::1 4223".to_string(),
            "::ffff:10.0.0.1 4222".to_string()
        ]
    );
}

// 6. Exit codes of firewall-allow (and of status).
#[test]
fn firewall_allow_exit_codes() {
    let sb = sandbox("exit-codes");
    let agent_cg = cg(&sb, "agent");
    let job = cg(&sb, "job");
    let allow = |cg: &CgroupDir| sb.firewall_allow(cg).expect("firewall-allow");
    let allow_with =
        |exec: integration::Exec| exec.output(COMMAND_TIMEOUT).expect("firewall-allow");

    // No table: nothing to open, exit 0 with a line on stderr (upstream bosh-agent#443).
    let out = allow(&job);
    assert_exit(&out, 0, "no table");
    assert!(
        stderr(&out).contains("no monit firewall"),
        "{}",
        describe(&out)
    );
    // A table without the jobs chain: the same.
    sb.nft(["add", "table", "inet", "bosh_agent"])
        .expect("nft add table");
    let out = allow(&job);
    assert_exit(&out, 0, "table without monit_access_jobs");
    assert!(
        stderr(&out).contains("no monit firewall"),
        "{}",
        describe(&out)
    );
    // Usage: unknown service, missing service.
    let out = allow_with(sb.agent_cmd(["firewall-allow", "nats"]).cgroup(&job));
    assert_exit(&out, 2, "unknown service");
    let out = allow_with(sb.agent_cmd(["firewall-allow"]).cgroup(&job));
    assert_exit(&out, 2, "missing service");
    // Not root.
    let out = allow_with(
        sb.agent_cmd(["firewall-allow", "monit"])
            .cgroup(&job)
            .user(USER),
    );
    assert_exit(&out, 3, "not root");
    assert!(stderr(&out).contains("root"), "{}", describe(&out));

    let _agent = sb.start_agent(&agent_cg, SLOW).expect("agent ready");
    // The caller in the v2 root cgroup: allowing it would allow everyone. The process is
    // moved there only for its own short life.
    let root = CgroupDir::at(cgroup2_mount().expect("cgroup2 mount"));
    let out = allow(&root);
    assert_exit(&out, 4, "caller in the root cgroup");
    assert!(
        sb.job_rules().expect("rules").is_empty(),
        "no rule for the root cgroup"
    );
    // A cgroup name that would be nft syntax if pasted: the caller's cgroup cannot be used
    // (4), nothing injected.
    let evil = cg(&sb, "x\" accept; delete table inet bosh_agent; \"");
    let out = allow(&evil);
    assert_exit(&out, 4, "cgroup path with quotes and semicolons");
    assert!(
        stderr(&out).contains("cannot be used"),
        "{}",
        describe(&out)
    );
    assert!(
        sb.agent_table_present().expect("nft"),
        "the table survived the attempt"
    );
    assert!(
        sb.job_rules().expect("rules").is_empty(),
        "no rule for the evil cgroup"
    );
    // nft fails: exit 1 with nft's own message.
    let wrapper = script(
        &sb,
        "failing-nft",
        "#!/bin/sh\necho 'nft: simulated failure for the test' >&2\nexit 1\n",
    );
    let out = allow_with(
        sb.agent_cmd(["firewall-allow", "monit"])
            .cgroup(&job)
            .env("BOSH_AGENT_NFT", &wrapper),
    );
    assert_exit(&out, 1, "nft failing");
    assert!(
        stderr(&out).contains("simulated failure for the test"),
        "{}",
        describe(&out)
    );
    assert!(sb.job_rules().expect("rules").is_empty());
    // Granted.
    let out = allow(&job);
    assert_exit(&out, 0, "granted");
    assert_eq!(sb.job_rules_for(&job).expect("rules").len(), 1);

    // status: 0 while the table matches, 1 once it drifted (no reconcile for an hour here).
    assert_eq!(sb.status().expect("status").0, 0);
    let out = sb
        .nft(["delete", "chain", "inet", "bosh_agent", "monit_access"])
        .expect("nft");
    assert!(out.status.success(), "{}", describe(&out));
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 1, "status after drift: {st:#}");
    assert_eq!(st["matches_desired"], false);
}

// 6b. Where the cgroup self-test fails, the agent falls back to uid matching and says so.
#[test]
fn failed_self_test_falls_back_to_uid_and_says_why() {
    let sb = sandbox("uid-fallback");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let nft = sb.nft_refusing_selftest().expect("nft wrapper");
    let exec = sb
        .agent_exec(&agent_cg, NO_ROOT)
        .expect("exec")
        .env("BOSH_AGENT_NFT", &nft);
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    let st = agent.wait_ready(READY_TIMEOUT).expect("agent ready");
    assert_eq!(st["mode"], "uid", "{st:#}");
    let reason = st["fallback_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("self-test"),
        "the reason is recorded: {st:#}"
    );
    assert!(
        agent.log().contains("WARN"),
        "the fallback is logged at warn level: {}",
        agent.log()
    );
    let (_, status) = sb.status().expect("status");
    assert_eq!(
        status["agent"]["mode"], "uid",
        "status shows the mode: {status:#}"
    );

    // uid 0 is the agent's identity now; everyone else is still kept out.
    expect_probe(&sb, &agent_cg, ROOT, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::TimedOut);
}

// 7a. The agent in its own cgroup namespace (a nested container).
#[test]
fn cgroup_namespace_agent_keeps_cgroup_mode() {
    let sb = sandbox("cgroupns");
    let ns_root = cg(&sb, "container");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");

    // What the agent sees: its cgroup is the namespace root.
    let out = sb
        .exec(["cat", "/proc/self/cgroup"])
        .cgroup(&ns_root)
        .cgroupns()
        .output(COMMAND_TIMEOUT)
        .expect("cat");
    assert!(
        stdout(&out).lines().any(|l| l == "0::/"),
        "inside unshare --cgroup: {}",
        describe(&out)
    );

    let exec = sb.agent_exec(&ns_root, FAST).expect("exec").cgroupns();
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    let st = agent.wait_ready(READY_TIMEOUT).expect("agent ready");
    eprintln!(
        "namespaced agent: {} (level offset {})",
        st["identity"], st["level_offset"]
    );
    assert_eq!(
        st["namespaced"], true,
        "the agent knows it is namespaced: {st:#}"
    );
    assert_eq!(
        st["mode"], "cgroup",
        "cgroup matching established in a namespace: {st:#}"
    );
    let mine = fs::read_link(format!("/proc/{}/ns/cgroup", agent.pid())).expect("agent ns");
    let ours = fs::read_link("/proc/self/ns/cgroup").expect("our ns");
    assert_ne!(mine, ours, "the agent runs in its own cgroup namespace");

    expect_probe(&sb, &ns_root, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["agent"]["mode"], "cgroup");
}

// 7b. The agent shares its cgroup with an unrelated process: it moves into a child cgroup.
#[test]
fn shared_cgroup_agent_moves_into_its_own_child() {
    let sb = sandbox("shared");
    let shared = cg(&sb, "runit.service");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let mut sleeper = sb
        .exec(["sleep", "600"])
        .cgroup(&shared)
        .spawn()
        .expect("sleep");
    wait_in_cgroup(&shared, sleeper.pid());

    let agent = sb.start_agent(&shared, FAST).expect("agent ready");
    let child = shared.join("bosh-agent");
    assert!(
        child.procs().expect("procs").contains(&agent.pid()),
        "agent in {}",
        child.nft_path()
    );
    assert!(
        agent.log().contains("moved into a dedicated child cgroup"),
        "logged: {}",
        agent.log()
    );
    let st = agent.state().expect("state");
    assert_eq!(st["cgroup_path"], child.nft_path().as_str(), "{st:#}");
    assert!(
        shared.procs().expect("procs").contains(&sleeper.pid()),
        "the sleeper stays"
    );
    assert!(
        sleeper.try_status().expect("status").is_none(),
        "the sleeper still runs"
    );

    // The sleeper's cgroup (the agent's original one) is not the agent any more.
    expect_probe(&sb, &shared, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &child, USER, MONIT_V4, Probe::Connected);
}

// 7c. A container whose root cgroup is shared (runit in a cgroup namespace): the agent moves
// into `<root>/bosh-agent`, and a job of the container, a sibling below the namespace root,
// calls firewall-allow from inside the namespace, where its path and depth are
// namespace-relative: its rule must still match its sockets.
#[test]
fn cgroup_namespace_job_sibling_is_allowed_from_inside() {
    let sb = sandbox("cgroupns-job");
    let ns_root = cg(&sb, "container");
    let job = cg(&sb, "container/job");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let sleeper = sb
        .exec(["sleep", "600"])
        .cgroup(&ns_root)
        .spawn()
        .expect("sleep");
    wait_in_cgroup(&ns_root, sleeper.pid());

    let exec = sb.agent_exec(&ns_root, FAST).expect("exec").cgroupns();
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    let st = agent.wait_ready(READY_TIMEOUT).expect("agent ready");
    eprintln!(
        "namespaced agent: {} (level offset {})",
        st["identity"], st["level_offset"]
    );
    let agent_cg = ns_root.join("bosh-agent");
    assert!(
        agent_cg.procs().expect("procs").contains(&agent.pid()),
        "agent in {}",
        agent_cg.nft_path()
    );
    assert_eq!(st["mode"], "cgroup", "{st:#}");
    assert_eq!(st["namespaced"], true, "{st:#}");
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &ns_root, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &job, USER, MONIT_V4, Probe::TimedOut);

    let out = sb
        .agent_cmd(["firewall-allow", "monit"])
        .cgroup(&job)
        .join_cgroupns_of(agent.pid())
        .output(COMMAND_TIMEOUT)
        .expect("allow");
    assert_exit(
        &out,
        0,
        "firewall-allow inside the agent's cgroup namespace",
    );
    let rules = sb.job_rules_for(&job).expect("rules");
    assert_eq!(rules.len(), 1, "{rules:?}; {}", describe(&out));
    expect_probe(&sb, &job, USER, MONIT_V4, Probe::Connected);
}

// 8. Drift: a deleted base chain is restored by the reconcile loop.
#[test]
fn drift_deleted_chain_is_restored() {
    let sb = sandbox("drift");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");

    let out = sb
        .nft(["delete", "chain", "inet", "bosh_agent", "monit_access"])
        .expect("nft");
    assert!(out.status.success(), "{}", describe(&out));
    let deleted = Instant::now();
    let st = status_when(
        &sb,
        "the agent to restore monit_access",
        Duration::from_secs(3),
        |code, v| {
            code == 0
                && v["matches_desired"] == true
                && v["agent"]["repairs"].as_u64().unwrap_or(0) >= 1
        },
    );
    eprintln!(
        "restored within {:?}: repairs={}",
        deleted.elapsed(),
        st["agent"]["repairs"]
    );
    assert!(
        sb.nft_json(&["chain", "inet", "bosh_agent", "monit_access"])
            .expect("nft")
            .is_some()
    );
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::Connected);
}

// 9. Bad agent.json: the start stops with the file, line and column; nothing is installed.
#[test]
fn malformed_agent_json_stops_the_start() {
    let sb = sandbox("bad-config");
    let agent_cg = cg(&sb, "agent");
    for (text, line) in [
        (
            "{\n  \"Platform\": {\n    \"Linux\": {,}\n  }\n}\n",
            "line 3",
        ),
        (
            r#"{"Platform":{"Linux":{"Firewall":{"MonitAllowRoot":"yes"}}}}"#,
            "line 1",
        ),
    ] {
        let conf = sb.write_agent_config(text).expect("config");
        let mut agent = sb
            .spawn_agent(&sb.agent_exec_with(&agent_cg, &conf).expect("exec"))
            .expect("spawn");
        let status = agent
            .wait_exit(Duration::from_secs(10))
            .expect("the agent exits");
        assert!(!status.success(), "exit status for {text:?}: {status}");
        let log = agent.log();
        assert!(
            log.contains(&conf.display().to_string()),
            "names the file: {log}"
        );
        assert!(
            log.contains(line) && log.contains("column"),
            "names line and column: {log}"
        );
        assert!(
            !sb.agent_table_present().expect("nft"),
            "no table was created"
        );
        assert!(
            !sb.run_dir().join("firewall.json").exists(),
            "no state was written"
        );
    }
}

// Drift the JSON listing cannot see: the agent's own rule with another `level` (nft 1.0.6's
// JSON drops the level). The text-based read-back must notice and repair it.
#[test]
fn drift_changed_level_is_repaired() {
    let sb = sandbox("drift-level");
    let agent_cg = cg(&sb, "agent");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::Connected);

    let guard = sb
        .nft_json(&["chain", "inet", "bosh_agent", "monit_guard"])
        .expect("nft")
        .expect("monit_guard exists");
    let handle = guard["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .find(|r| r["comment"] == "bosh-agent")
        .and_then(|r| r["handle"].as_u64())
        .expect("the agent's rule");
    // One level up compares the parent's id with the agent's cgroup id: never matches.
    let rule = format!(
        "socket cgroupv2 level 1 \"{}\" meta mark set 0xb054 accept comment \"bosh-agent\"",
        agent_cg.nft_path()
    );
    let script = format!("replace rule inet bosh_agent monit_guard handle {handle} {rule}\n");
    sb.nft_script(&script).expect("replace the agent's rule");
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::TimedOut);

    let st = status_when(
        &sb,
        "the agent to repair the level",
        Duration::from_secs(4),
        |code, v| code == 0 && v["agent"]["repairs"].as_u64().unwrap_or(0) >= 1,
    );
    assert_eq!(st["matches_desired"], true);
    expect_probe(&sb, &agent_cg, USER, MONIT_V4, Probe::Connected);
}

// A root flow (allowed by `meta skuid 0`) must close cleanly: the client's last ACKs come from
// TIME-WAIT or orphaned sockets that no socket match sees. Before the in-flow rule they were
// dropped and monit's side hung in LAST-ACK, retransmitting.
#[test]
fn allowed_flows_close_cleanly_without_conntrack() {
    let sb = sandbox("close");
    let agent_cg = cg(&sb, "agent");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    for (who, cgroup, uid) in [("root elsewhere", &other, ROOT), ("agent", &agent_cg, USER)] {
        let out = sb
            .chat(cgroup, uid, MONIT_V4, 3, Duration::from_millis(20))
            .expect("chat");
        assert!(out.status.success(), "{who}: {}", describe(&out));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = sb
            .exec([
                "ss",
                "-tan",
                "state",
                "last-ack",
                "state",
                "fin-wait-1",
                "state",
                "closing",
            ])
            .output(Duration::from_secs(5))
            .expect("ss");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let stuck: Vec<&str> = text
            .lines()
            .skip(1)
            .filter(|l| l.contains(":2822"))
            .collect();
        if stuck.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections stuck closing: {stuck:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And conntrack was never turned on by the agent's table.
    let listing = sb
        .nft(["list", "table", "inet", "bosh_agent"])
        .expect("nft");
    assert!(!String::from_utf8_lossy(&listing.stdout).contains(" ct "));
}

/// `bosh-agent firewall-allow monit` from `cg` with the run directory mounted read-only
/// (a private mount namespace, so only this command sees it read-only; root's permission
/// bits would not stop it).
fn allow_with_read_only_run_dir(sb: &Sandbox, cg: &CgroupDir) -> Output {
    let run = sb.run_dir().to_path_buf();
    sb.exec([
        std::ffi::OsStr::new("unshare"),
        "--mount".as_ref(),
        "--propagation".as_ref(),
        "private".as_ref(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "mount --bind -o ro \"$1\" \"$1\" || exit 97; touch \"$1/probe\" 2>/dev/null && exit 98; exec \"$2\" firewall-allow monit".as_ref(),
        "sh".as_ref(),
        run.as_os_str(),
        sb.tools().agent.as_os_str(),
    ])
    .cgroup(cg)
    .output(COMMAND_TIMEOUT)
    .expect("firewall-allow under a read-only run dir")
}

// A read-only run dir with no firewall installed: nothing to open, exit 0 as documented; with
// a jobs chain to change, the lock is needed and its failure is an error (1).
#[test]
fn read_only_run_dir_without_a_table_exits_0() {
    let sb = sandbox("ro-run-dir");
    let job = cg(&sb, "job");
    let out = allow_with_read_only_run_dir(&sb, &job);
    assert_ne!(
        out.status.code(),
        Some(97),
        "bind mount: {}",
        describe(&out)
    );
    assert_ne!(out.status.code(), Some(98), "the run dir stayed writable");
    assert_exit(&out, 0, "read-only run dir, no table");
    assert!(
        stderr(&out).contains("no monit firewall"),
        "{}",
        describe(&out)
    );
    sb.nft_script("add table inet bosh_agent\nadd chain inet bosh_agent monit_access_jobs\n")
        .expect("jobs chain");
    let out = allow_with_read_only_run_dir(&sb, &job);
    assert_exit(&out, 1, "read-only run dir, jobs chain present");
    assert!(stderr(&out).contains("firewall.lock"), "{}", describe(&out));
    assert!(sb.job_rules().expect("rules").is_empty());
}

// Two live cgroups never take each other's access: a child of an allowed bpm scope is covered
// by its parent's rule (nothing added, the parent keeps its rule), and a same-named bpm scope
// in another slice gets a rule of its own beside the first one's.
#[test]
fn firewall_allow_never_takes_access_from_a_live_cgroup() {
    let sb = sandbox("allow-live");
    let agent_cg = cg(&sb, "agent");
    let web = cg(&sb, "system.slice/runc-bpm-web.scope");
    let child = cg(&sb, "system.slice/runc-bpm-web.scope/worker");
    let twin = cg(&sb, "other.slice/runc-bpm-web.scope");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");

    assert_exit(&sb.firewall_allow(&web).expect("allow"), 0, "allow web");
    let out = sb.firewall_allow(&child).expect("allow");
    assert_exit(&out, 0, "allow from web's child");
    assert!(stdout(&out).contains("ancestor"), "{}", describe(&out));
    let rules = sb.job_rules().expect("rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0].cgid, Some(web.inode().expect("inode")));
    expect_probe(&sb, &web, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &child, USER, MONIT_V4, Probe::Connected);

    assert_exit(
        &sb.firewall_allow(&twin).expect("allow"),
        0,
        "allow the twin",
    );
    let mut ids: Vec<Option<u64>> = sb
        .job_rules()
        .expect("rules")
        .iter()
        .map(|r| r.cgid)
        .collect();
    ids.sort();
    let mut want = vec![Some(web.inode().unwrap()), Some(twin.inode().unwrap())];
    want.sort();
    assert_eq!(ids, want, "both scopes keep a rule");
    expect_probe(&sb, &web, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &twin, USER, MONIT_V4, Probe::Connected);
}

// A bpm job name too long for a comment as it is: its key is hashed to fit, and the job is
// allowed.
#[test]
fn a_long_bpm_job_name_is_allowed() {
    let sb = sandbox("allow-long-bpm");
    let agent_cg = cg(&sb, "agent");
    let job = format!("{}-worker", "j".repeat(150));
    let scope = cg(&sb, &format!("system.slice/runc-bpm-{job}.scope"));
    let _l = sb.listen(MONIT_V4).expect("listener");
    let _agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    expect_probe(&sb, &scope, USER, MONIT_V4, Probe::TimedOut);
    let out = sb.firewall_allow(&scope).expect("allow");
    assert_exit(&out, 0, "allow a long bpm job name");
    let rules = sb.job_rules().expect("rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert!(rules[0].comment.len() <= 128, "{rules:?}");
    assert!(
        rules[0]
            .key
            .as_deref()
            .is_some_and(|k| k.ends_with("-worker")),
        "{rules:?}"
    );
    expect_probe(&sb, &scope, USER, MONIT_V4, Probe::Connected);
}

// The jobs chain is reached by every SYN to monit, so a rule there that is not a job rule (an
// unconditional `accept`) opens monit to everyone. It is drift: the agent removes it by
// handle within one reconcile period and counts the repair; `firewall status` reports it
// while it is there. Job rules — the agent's and the Go agent's — keep their handles and
// their access throughout.
#[test]
fn a_foreign_rule_in_the_jobs_chain_is_removed_within_one_reconcile() {
    let sb = sandbox("jobs-foreign");
    let agent_cg = cg(&sb, "agent");
    let job = cg(&sb, "job");
    let legacy = cg(&sb, "system.slice/runc-bpm-legacy.scope");
    let other = cg(&sb, "other");
    let _l = sb.listen(MONIT_V4).expect("listener");
    let mut agent = sb.start_agent(&agent_cg, FAST).expect("agent ready");
    assert_exit(
        &sb.firewall_allow(&job).expect("allow"),
        0,
        "firewall-allow",
    );
    // A rule as upstream's Go agent writes it (its level is the cgroup's depth here, where
    // upstream assumes `system.slice/<scope>`, depth 2).
    let depth = legacy
        .path()
        .strip_prefix(cgroup2_mount().expect("cgroup2"))
        .expect("under the cgroup2 mount")
        .components()
        .count();
    sb.nft_script(&format!(
        "add rule inet bosh_agent monit_access_jobs socket cgroupv2 level {depth} \"{}\" \
         ip daddr 127.0.0.1 tcp dport 2822 log prefix \"bosh-monit-access: cgroup match: \" \
         accept comment \"bosh-monit-access:legacy\"\n",
        legacy.nft_path()
    ))
    .expect("the Go agent's rule");
    expect_probe(&sb, &legacy, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &job, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::TimedOut);
    // Two reconciles pass: the Go agent's rule is a job rule, not drift.
    std::thread::sleep(Duration::from_millis(2500));
    let before = sb.job_rules().expect("rules");
    assert_eq!(before.len(), 2, "{before:?}");
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["agent"]["repairs"], 0, "{st:#}");

    let add = sb
        .nft([
            "add",
            "rule",
            "inet",
            "bosh_agent",
            "monit_access_jobs",
            "accept",
        ])
        .expect("nft");
    assert!(add.status.success(), "{}", describe(&add));
    let added = Instant::now();
    // Refused again at the packet level within one reconcile period (1 s), give or take a
    // probe (a refused probe takes its whole timeout); the jobs keep their access meanwhile.
    wait_for(
        "the SYN of a process in another cgroup to be dropped again",
        Duration::from_secs(4),
        || {
            expect_probe(&sb, &job, USER, MONIT_V4, Probe::Connected);
            expect_probe(&sb, &legacy, USER, MONIT_V4, Probe::Connected);
            Ok((sb.probe(&other, USER, MONIT_V4)? == Probe::TimedOut).then_some(()))
        },
    )
    .expect("the open rule removed");
    eprintln!(
        "refused again {:?} after the accept was added",
        added.elapsed()
    );
    let st = status_when(
        &sb,
        "the removal counted as a repair",
        Duration::from_secs(3),
        |code, v| {
            code == 0
                && v["agent"]["repairs"].as_u64().unwrap_or(0) >= 1
                && v["agent"]["foreign_removed"].as_u64().unwrap_or(0) == 1
        },
    );
    assert_eq!(st["matches_desired"], true, "{st:#}");
    assert_eq!(st["foreign_job_rules"], serde_json::json!([]), "{st:#}");
    assert_eq!(
        sb.job_rules().expect("rules"),
        before,
        "the job rules kept their handles"
    );
    assert!(
        agent.log().contains("not a job rule"),
        "the removal is logged: {}",
        agent.log()
    );
    expect_probe(&sb, &job, USER, MONIT_V4, Probe::Connected);
    expect_probe(&sb, &legacy, USER, MONIT_V4, Probe::Connected);

    // While such a rule is there, status says so: with the agent stopped it stays.
    agent.stop().expect("agent stops");
    let add = sb
        .nft([
            "add",
            "rule",
            "inet",
            "bosh_agent",
            "monit_access_jobs",
            "counter",
            "accept",
        ])
        .expect("nft");
    assert!(add.status.success(), "{}", describe(&add));
    expect_probe(&sb, &other, USER, MONIT_V4, Probe::Connected);
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 1, "{st:#}");
    assert_eq!(st["matches_desired"], false, "{st:#}");
    assert_eq!(
        st["foreign_job_rules"].as_array().map(Vec::len),
        Some(1),
        "{st:#}"
    );
    assert!(
        st["problems"].as_array().is_some_and(|p| p
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("not a job rule")))),
        "{st:#}"
    );
}
