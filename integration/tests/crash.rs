//! SIGKILL at random points: the real `bosh-agent` killed while it applies its table, while
//! `firewall-allow monit` adds a job's rule, and while a persistent `update_settings` task
//! runs; and the agent started on truncated state files. Real nft, cgroups, nats-server and
//! dnsmasq in the test's own network namespace (the `integration` harness). Run as root:
//! `cargo test -p integration --test crash`. A test that cannot run fails with the reason.
//!
//! Knobs: `CRASH_KILLS` (agent kills, default 100), `CRASH_ALLOW_KILLS` (`firewall-allow`
//! kills, default 25), `CRASH_SEED` (replays the kill points of a printed seed).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::{Duration, Instant};

use integration::crash::{Rng, TableSnapshot, knob, subtree_pids, wait_subtree_empty};
use integration::nats::*;
use integration::{CgroupDir, MONIT_V4, NOBODY, Probe, Sandbox};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// Root allowed to monit (the default), reconcile every second.
const ROOT_ALLOWED: &str = r#"{"Platform":{"Linux":{"Firewall":{"ReconcileIntervalSeconds":1}}}}"#;
/// Root refused: a different table, so each start changes it.
const ROOT_REFUSED: &str =
    r#"{"Platform":{"Linux":{"Firewall":{"MonitAllowRoot":false,"ReconcileIntervalSeconds":1}}}}"#;
const USER: Option<u32> = Some(NOBODY);

fn sandbox(name: &str) -> Sandbox {
    Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox for {name}: {e}"))
}

fn snapshot(sb: &Sandbox) -> TableSnapshot {
    sb.table_snapshot()
        .expect("nft list")
        .expect("the agent's table exists")
}

/// Starts the agent with `config`, waits until it is ready, and returns the table it made.
fn settle(sb: &Sandbox, cg: &CgroupDir, config: &str) -> (integration::Agent, TableSnapshot) {
    let agent = sb.start_agent(cg, config).expect("agent ready");
    (agent, snapshot(sb))
}

fn kill(agent: &mut integration::Agent, cg: &CgroupDir) {
    agent.proc_mut().signal(Signal::SIGKILL).expect("SIGKILL");
    // Generous: under heavy I/O a killed process can sit in an fsync for seconds.
    agent
        .wait_exit(Duration::from_secs(30))
        .expect("killed agent exits");
    // An nft the agent had started runs to its end: read the table only after it.
    wait_subtree_empty(cg, Duration::from_secs(10)).expect("agent cgroup empties");
}

#[test]
fn sigkill_during_applies_and_firewall_allow_leaves_the_old_or_the_new_table() {
    let kills = knob("CRASH_KILLS", 100);
    let allow_kills = knob("CRASH_ALLOW_KILLS", 25);
    let mut rng = Rng::from_env("CRASH_SEED");
    let sb = sandbox("crash-apply");
    let agent_cg = sb.cgroup("agent").expect("cgroup");
    let other = sb.cgroup("other").expect("cgroup");
    let _monit = sb.listen(MONIT_V4).expect("listener");

    // The two states: the same three job rules under either monit policy.
    let (mut agent, _) = settle(&sb, &agent_cg, ROOT_ALLOWED);
    let jobs: Vec<CgroupDir> = (0..3)
        .map(|i| sb.cgroup(&format!("job{i}")).expect("cgroup"))
        .collect();
    for j in &jobs {
        let out = sb.firewall_allow(j).expect("firewall-allow");
        assert!(out.status.success(), "{}", integration::describe(&out));
    }
    kill(&mut agent, &agent_cg);
    let started = Instant::now();
    let (mut agent, allowed) = settle(&sb, &agent_cg, ROOT_ALLOWED);
    let ready_in = started.elapsed();
    kill(&mut agent, &agent_cg);
    let (mut agent, refused) = settle(&sb, &agent_cg, ROOT_REFUSED);
    kill(&mut agent, &agent_cg);
    assert_ne!(
        allowed, refused,
        "the two policies must differ for the test to mean anything"
    );
    assert_eq!(allowed.jobs.len(), 3, "{allowed:#?}");
    assert_eq!(refused.jobs, allowed.jobs);

    // Kill, restart with the other policy, kill again: after each kill the table is the one
    // before that start or the one that start wanted.
    let window = ready_in.mul_f64(1.2);
    let (mut old, mut kept, mut changed) = (refused.clone(), 0u64, 0u64);
    let mut cycle = Vec::new();
    eprintln!("the agent is ready {ready_in:?} after it is started");
    for i in 0..kills {
        let (config, want) = if i % 2 == 0 {
            (ROOT_ALLOWED, &allowed)
        } else {
            (ROOT_REFUSED, &refused)
        };
        let t = Instant::now();
        let mut a = sb
            .spawn_agent(&sb.agent_exec(&agent_cg, config).expect("exec"))
            .expect("spawn");
        std::thread::sleep(rng.below(window));
        kill(&mut a, &agent_cg);
        cycle.push(t.elapsed());
        let now = snapshot(&sb);
        if now == old {
            kept += 1;
        } else if now == *want {
            changed += 1;
        } else {
            panic!(
                "kill {i}: the table is neither the old nor the new state\nold: {old:#?}\nnew: {want:#?}\nnow: {now:#?}\nagent log:\n{}",
                a.log()
            );
        }
        old = now;
    }
    cycle.sort();
    eprintln!(
        "spawn-to-reaped per kill: median {:?}, max {:?}",
        cycle.get(cycle.len() / 2),
        cycle.last()
    );
    eprintln!(
        "{kills} agent kills within {window:?} of start: {kept} left the old table, {changed} the new one"
    );

    // firewall-allow killed at random points, beside a running agent: every earlier job rule
    // stays, the new one is there or not, and nothing else changes.
    let (mut agent, base) = settle(&sb, &agent_cg, ROOT_ALLOWED);
    let mut allow_window = Duration::ZERO;
    let (mut added, mut not_added) = (0u64, 0u64);
    let mut before = base.clone();
    for i in 0..allow_kills {
        let job = sb.cgroup(&format!("new{i}")).expect("cgroup");
        let mut p = sb
            .agent_cmd(["firewall-allow", "monit"])
            .cgroup(&job)
            .spawn()
            .expect("spawn firewall-allow");
        if i == 0 {
            // The first one runs to its end: how long an allow takes bounds the kill points.
            let t = Instant::now();
            let st = p
                .wait_timeout(Duration::from_secs(30))
                .expect("allow exits");
            allow_window = t.elapsed().mul_f64(1.2);
            assert!(st.success(), "firewall-allow failed");
        } else {
            std::thread::sleep(rng.below(allow_window));
            p.signal(Signal::SIGKILL).expect("SIGKILL");
            p.wait_timeout(Duration::from_secs(10)).expect("exits");
        }
        wait_subtree_empty(&job, Duration::from_secs(10)).expect("job cgroup empties");
        let now = snapshot(&sb);
        assert_eq!(
            now.rest, base.rest,
            "allow kill {i}: only the jobs chain may change"
        );
        let key = format!("bosh-monit-access:{}", job.nft_path());
        let new: Vec<&String> = now
            .jobs
            .iter()
            .filter(|c| !before.jobs.contains(c))
            .collect();
        for c in &before.jobs {
            assert!(
                now.jobs.contains(c),
                "allow kill {i}: job rule {c} was lost: {now:#?}"
            );
        }
        match new.as_slice() {
            [] => not_added += 1,
            [c] if c.starts_with(&key) => added += 1,
            more => panic!("allow kill {i}: unexpected rules {more:?}"),
        }
        before = now;
    }
    eprintln!(
        "{allow_kills} firewall-allow runs (the first whole, the rest killed within {allow_window:?}): {added} added their rule, {not_added} did not"
    );

    // Killed once more, then restarted: it converges, every job rule is still there.
    kill(&mut agent, &agent_cg);
    let (_agent, last) = settle(&sb, &agent_cg, ROOT_ALLOWED);
    assert_eq!(last, before, "the restarted agent keeps every job rule");
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["matches_desired"], true, "{st:#}");
    for j in &jobs {
        assert_eq!(sb.probe(j, USER, MONIT_V4).unwrap(), Probe::Connected);
    }
    assert_eq!(sb.probe(&other, USER, MONIT_V4).unwrap(), Probe::TimedOut);
    eprintln!("total kills: {}", kills + allow_kills.saturating_sub(1) + 3);
}

/// A director's `update_settings` is recorded in `<base>/bosh/tasks.json` before it is
/// answered; the agent is SIGKILLed while the task runs (its certificate update hangs); the
/// restarted agent runs it again under the same id, and the director's `get_task` polls get
/// upstream's `"ok"`.
#[test]
fn sigkill_during_update_settings_resumes_the_task_under_its_id() {
    let sb = sandbox("crash-update-settings");
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").expect("cgroup");
    let _server = NatsServer::start(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None);
    let settings = settings(
        &[nats_url("127.0.0.1:4222")],
        &pki.ca_pem,
        &pki.client("agent"),
    );
    // The first certificate update hangs (and says so); later ones succeed at once.
    let first = sb.dir().join("first-update.pid");
    let hang = sb
        .script(
            "update-ca-certificates",
            &format!(
                "#!/bin/sh\nif [ -e {0} ]; then exit 0; fi\necho $$ > {0}.tmp && mv {0}.tmp {0}\nexec sleep 120\n",
                first.display()
            ),
        )
        .expect("script");
    let exec = agent_exec_with(&sb, &agent_cg, &settings, true, &json!({}))
        .env("BOSH_AGENT_UPDATE_CA_CERTIFICATES", &hang);
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    agent.wait_ready(integration::READY_TIMEOUT).expect("ready");
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(Duration::from_secs(15));

    let certs = pki.ca_pem.clone();
    let r = director
        .call(
            "update_settings",
            json!([{"trusted_certs": certs}]),
            3,
            Duration::from_secs(10),
        )
        .expect("reply");
    let id = r["value"]["agent_task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task id: {r}"))
        .to_string();
    assert_eq!(r["value"]["state"], "running", "{r}");
    let tasks = sb.dir().join("base/bosh/tasks.json");
    let recorded: Value = serde_json::from_slice(&fs::read(&tasks).expect("tasks.json")).unwrap();
    assert_eq!(recorded[&id]["TaskID"], id.as_str(), "{recorded}");
    assert_eq!(recorded[&id]["Method"], "update_settings", "{recorded}");
    integration::wait_for(
        "the certificate update to start",
        Duration::from_secs(10),
        || Ok(first.exists().then_some(())),
    )
    .expect("update started");
    let running = director
        .call("get_task", json!([id]), 3, Duration::from_secs(10))
        .expect("get_task");
    assert_eq!(
        running,
        json!({"value": {"agent_task_id": id, "state": "running"}})
    );

    // SIGKILL; the hanging child is ours too (it is in the agent's cgroup): stop it by pid.
    agent.proc_mut().signal(Signal::SIGKILL).expect("SIGKILL");
    agent.wait_exit(Duration::from_secs(10)).expect("exit");
    for pid in subtree_pids(&agent_cg) {
        let _ = testkit::process::signal_pid(pid, Signal::SIGKILL);
    }
    wait_subtree_empty(&agent_cg, Duration::from_secs(10)).expect("cgroup empties");
    assert!(
        fs::read_to_string(&tasks).unwrap().contains(&id),
        "the record outlives the kill"
    );

    let mut again = sb.spawn_agent(&exec).expect("restart");
    again.wait_ready(integration::READY_TIMEOUT).expect("ready");
    director.wait_pong(Duration::from_secs(15));
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        last = director
            .call("get_task", json!([id]), 3, Duration::from_secs(10))
            .expect("get_task");
        if last["value"]["state"] != "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last, json!({"value": "ok"}), "log:\n{}", again.log());
    assert!(
        again
            .log()
            .contains("resuming a task recorded before the last restart"),
        "{}",
        again.log()
    );
    let left: Value = serde_json::from_slice(&fs::read(&tasks).unwrap()).unwrap();
    assert_eq!(left, json!({}), "a finished task leaves the store");
    let saved: Value =
        serde_json::from_slice(&fs::read(sb.dir().join("base/bosh/update_settings.json")).unwrap())
            .unwrap();
    assert_eq!(saved["trusted_certs"], certs.as_str());
    assert!(
        sb.dir()
            .join("ca-certificates/bosh-trusted-cert-1.crt")
            .exists()
    );
}

/// The agent started on its own files cut short (as a power loss could leave a file written
/// without the agent's temp-file-and-rename): each is named in the log with what the agent
/// does instead, the agent runs, and nothing panics. Then the last mounted disk's cid is cut
/// short (the hints file gone): the managed disk file is named and kept. Then the settings
/// source is gone and the settings cache is cut short too: both are named, and the agent still
/// installs its firewall.
#[test]
fn truncated_state_files_at_start_are_named_and_fallen_back_from() {
    let sb = sandbox("crash-truncated");
    let agent_cg = sb.cgroup("agent").expect("cgroup");
    let bosh = sb.dir().join("base/bosh");
    fs::create_dir_all(&bosh).unwrap();
    let settings = json!({"agent_id": AGENT_ID, "mbus": "nats://127.0.0.1:4222",
                          "disks": {"persistent": {"disk-1": "/dev/sdz"}}});
    let records = sb.dir().join("base/instance/dns/records.json");
    fs::create_dir_all(records.parent().unwrap()).unwrap();
    let files: [(std::path::PathBuf, &str, &str); 6] = [
        (
            bosh.join("spec.json"),
            r#"{"deployment":"d","job":{"na"#,
            "ignoring the applied spec",
        ),
        (
            bosh.join("update_settings.json"),
            r#"{"trusted_certs":"-----BEG"#,
            "ignoring malformed update_settings",
        ),
        (
            bosh.join("tasks.json"),
            r#"{"6c1e":{"TaskID":"6c1e","Meth"#,
            "no task is resumed",
        ),
        (
            bosh.join("persistent_disk_hints.json"),
            r#"{"disk-1":{"id":"disk-1","pa"#,
            "mounting the persistent disk failed",
        ),
        (
            sb.run_dir().join("firewall.json"),
            r#"{"mode": "cgroup", "monit": "ena"#,
            "ignoring the previous run's firewall state",
        ),
        (
            records.clone(),
            r#"{"records":[["10.0.0.9","a1b2-web-0.web.def"#,
            "the next sync_dns fetches the director's records and rewrites the file",
        ),
    ];
    for (p, text, _) in &files {
        fs::write(p, text).unwrap();
    }
    fs::write(bosh.join("managed_disk_settings.json"), "disk-1").unwrap();
    let exec = agent_exec_with(&sb, &agent_cg, &settings, false, &json!({}));
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    agent
        .wait_ready(integration::READY_TIMEOUT)
        .expect("ready despite the damaged files");
    for (p, _, fallback) in &files {
        eprintln!("{}", log_line(&agent, &p.display().to_string(), fallback));
    }
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    agent.stop().expect("stops");
    assert_eq!(
        fs::read_to_string(&records).unwrap(),
        files[5].1,
        "the damaged records file is left for sync_dns to replace"
    );

    // The hints file is gone and the last mounted disk's cid is cut short: the managed disk
    // file is named, with what the agent does instead, and kept for the next mount_disk.
    let managed = bosh.join("managed_disk_settings.json");
    fs::remove_file(bosh.join("persistent_disk_hints.json")).unwrap();
    fs::write(&managed, "disk-").unwrap();
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    agent
        .wait_ready(integration::READY_TIMEOUT)
        .expect("ready despite the cut managed disk file");
    let line = log_line(
        &agent,
        &managed.display().to_string(),
        "mounting the persistent disk failed; jobs that need it will fail",
    );
    assert!(
        line.contains("Persistent disk with volume id 'disk-' could not be found"),
        "{line}"
    );
    eprintln!("{line}");
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
    let (code, st) = sb.status().expect("status");
    assert_eq!(code, 0, "{st:#}");
    agent.stop().expect("stops");
    assert_eq!(fs::read_to_string(&managed).unwrap(), "disk-");

    // Every source fails (the settings file is gone) and the cache is cut short.
    let cache = bosh.join("settings.json");
    assert!(cache.exists(), "the first start cached its settings");
    let whole = fs::read(&cache).unwrap();
    fs::write(&cache, &whole[..whole.len() / 2]).unwrap();
    fs::remove_file(sb.dir().join("settings.json")).unwrap();
    let mut agent = sb.spawn_agent(&exec).expect("spawn");
    agent
        .wait_ready(integration::READY_TIMEOUT)
        .expect("firewall without settings");
    eprintln!(
        "{}",
        log_line(&agent, &cache.display().to_string(), "no settings")
    );
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// The agent's log line naming `path` with `fallback` (start-up goes on after the firewall is
/// ready, so it may take a moment).
fn log_line(agent: &integration::Agent, path: &str, fallback: &str) -> String {
    let found = integration::wait_for(
        &format!("{path} named in the log"),
        Duration::from_secs(10),
        || {
            Ok(agent
                .log()
                .lines()
                .find(|l| l.contains(path) && l.contains(fallback))
                .map(str::to_string))
        },
    );
    found.unwrap_or_else(|e| panic!("{e}: {path} with {fallback:?}:\n{}", agent.log()))
}
