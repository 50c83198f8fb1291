//! The agent's lifecycle end to end, with the real `bosh-agent`, a real `nats-server` (mTLS)
//! and, where jobs are involved, a real monit: a process holding the firewall lock never
//! stops request handling; SIGTERM during a `drain` stops the drain (its script gets SIGTERM),
//! names what was stopped, exits 0 and leaves the firewall installed; SIGTERM while a reply is
//! being prepared still delivers the reply. Each test has its own sandbox. Run as root:
//! `cargo test -p integration --test lifecycle`. A test that cannot run (not root, no nft, no
//! cgroup2, no nats-server, no monit) fails with the reason; none is skipped.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use integration::monit::{Monit, alive};
use integration::nats::*;
use integration::{Agent, CgroupDir, Sandbox};
use serde_json::{Value, json};

/// What the agent dials.
const AGENT_SIDE: &str = "127.0.0.1:4222";
/// Bound on "the agent connects and answers ping" after it starts.
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
/// Bound on one request's reply.
const REPLY_LIMIT: Duration = Duration::from_secs(10);
/// The agent's shutdown grace period in these tests.
const GRACE_SECONDS: u64 = 20;

/// A sandbox with nats-server, the agent (NATS firewall on), a connected director, and
/// monit when asked for. Fields drop in order: director, monit, agent, nats-server, sandbox.
struct World {
    director: Director,
    monit: Option<Monit>,
    agent: Agent,
    _nats: NatsServer,
    _agent_cg: CgroupDir,
    sb: Sandbox,
}

fn world(name: &str, with_monit: bool) -> World {
    let sb =
        Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox for {name}: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").expect("agent cgroup");
    let nats = NatsServer::start(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None);
    let mut monit = with_monit.then(|| Monit::prepare(&sb).unwrap_or_else(|e| panic!("{e}")));
    let s = settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent"));
    let agent = start_agent_with(
        &sb,
        &agent_cg,
        &s,
        true,
        &json!({"ShutdownGraceSeconds": GRACE_SECONDS}),
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    if let Some(m) = monit.as_mut() {
        m.start().unwrap_or_else(|e| panic!("{e}"));
        m.wait_sample_running(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    World {
        director,
        monit,
        agent,
        _nats: nats,
        _agent_cg: agent_cg,
        sb,
    }
}

impl World {
    fn call(&self, method: &str, args: Value) -> Value {
        self.director
            .call(method, args, 3, REPLY_LIMIT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.log()))
    }

    fn start_task(&self, method: &str, args: Value) -> String {
        let r = self.call(method, args);
        r["value"]["agent_task_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} did not start a task: {r}"))
            .to_string()
    }

    fn base(&self) -> &Path {
        self.monit.as_ref().expect("a world with monit").base()
    }
}

fn wait_for_file(path: &Path, limit: Duration) -> String {
    integration::wait_for(&format!("{}", path.display()), limit, || {
        Ok(std::fs::read_to_string(path)
            .ok()
            .filter(|t| !t.trim().is_empty()))
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. A process holding the firewall lock for 30 s.

#[test]
fn a_held_firewall_lock_never_stops_ping_or_get_task() {
    let w = world("lc-lock", false);
    // A task to poll: no applied spec, so it has no jobs to run and finishes at once.
    let id = w.start_task("run_script", json!(["pre-start", {}]));
    integration::wait_for("the run_script task", REPLY_LIMIT, || {
        Ok((w.call("get_task", json!([id])) == json!({"value": {}})).then_some(()))
    })
    .unwrap();
    let lock = w.sb.run_dir().join("firewall.lock");
    let mut holder =
        w.sb.exec(["flock", lock.to_str().unwrap(), "sleep", "30"])
            .spawn()
            .unwrap();
    // Held once the file is locked by flock(1): a non-blocking attempt of our own fails.
    integration::wait_for("flock to hold the firewall lock", REPLY_LIMIT, || {
        let out = std::process::Command::new("flock")
            .args(["-n", lock.to_str().unwrap(), "true"])
            .output()
            .map_err(|e| integration::Error(e.to_string()))?;
        Ok((!out.status.success()).then_some(()))
    })
    .unwrap();
    let t0 = Instant::now();
    let (mut pings, mut polls) = (0, 0);
    // Every reconcile (each second) waits for the lock meanwhile; requests are answered all
    // along: each reply below comes within REPLY_LIMIT, a third of the time the lock is held.
    while t0.elapsed() < Duration::from_secs(28) {
        assert_eq!(w.call("ping", json!([])), json!({"value": "pong"}));
        pings += 1;
        assert_eq!(w.call("get_task", json!([id])), json!({"value": {}}));
        polls += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        holder.try_status().unwrap().is_none(),
        "the lock was held throughout"
    );
    eprintln!("while the lock was held: {pings} pings and {polls} get_task answered");
    let log = w.agent.log();
    assert!(
        log.contains("waiting for the firewall lock held by another process"),
        "the wait is logged:\n{log}"
    );
    assert!(log.contains("firewall.lock"), "{log}");
    holder.wait_timeout(Duration::from_secs(10)).unwrap();
    // Once released, the reconcile takes the lock again and says so.
    integration::wait_for("the lock taken again", Duration::from_secs(10), || {
        Ok(w.agent
            .log()
            .contains("firewall lock taken after waiting")
            .then_some(()))
    })
    .unwrap();
    assert_eq!(w.call("ping", json!([])), json!({"value": "pong"}));
}

// ---------------------------------------------------------------------------------------------
// 2. SIGTERM while a drain script runs.

/// A director's partial apply spec (persisted, nothing installed) whose jobs are `jobs`.
fn spec_with_jobs(jobs: &[&str]) -> Value {
    let templates: Vec<Value> = jobs
        .iter()
        .map(|j| json!({"name": j, "version": "1", "sha1": "0123", "blobstore_id": format!("{j}-b")}))
        .collect();
    json!({
        "job": {"name": "web", "templates": templates},
        "deployment": "dep", "name": "web", "index": 0, "id": "uuid-1",
        "rendered_templates_archive": {"sha1": "s", "blobstore_id": "b"}
    })
}

#[test]
fn sigterm_during_a_drain_stops_it_names_it_and_keeps_the_firewall() {
    let mut w = world("lc-drain", true);
    let r = w
        .director
        .task("apply", json!([spec_with_jobs(&["slow"])]), REPLY_LIMIT * 3);
    assert_eq!(r.unwrap(), json!({"value": "applied"}));
    let pidfile = w.sb.dir().join("drain.pid");
    let termfile = w.sb.dir().join("drain.term");
    let script = w.base().join("jobs/slow/bin/drain");
    std::fs::create_dir_all(script.parent().unwrap()).unwrap();
    // `sleep & wait`: the shell runs its trap as soon as the signal comes.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntrap 'echo TERM > {t}; exit 143' TERM\necho $$ > {p}\nsleep 120 &\nwait $!\necho 0\n",
            t = termfile.display(),
            p = pidfile.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let id = w.start_task("drain", json!(["shutdown"]));
    let pid: u32 = wait_for_file(&pidfile, REPLY_LIMIT).trim().parse().unwrap();
    assert!(alive(pid));

    let t0 = Instant::now();
    w.agent
        .proc_mut()
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let status = w
        .agent
        .wait_exit(Duration::from_secs(GRACE_SECONDS + 10))
        .unwrap();
    let took = t0.elapsed();
    let log = w.agent.log();
    assert!(status.success(), "exit status {status}\n{log}");
    assert!(
        took < Duration::from_secs(GRACE_SECONDS),
        "stopped within the grace period ({took:?})\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&termfile).unwrap().trim(),
        "TERM",
        "the drain script got SIGTERM"
    );
    integration::wait_for("the drain script to be gone", REPLY_LIMIT, || {
        Ok((!alive(pid)).then_some(()))
    })
    .unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("task told to stop") && l.contains(&format!("drain {id}"))),
        "the log names the drain it stopped:\n{log}"
    );
    assert!(log.contains("the firewall stays in place"), "{log}");
    assert!(w.sb.agent_table_present().unwrap(), "the firewall stays");
    assert!(chain_exists(&w.sb, "monit_guard"));
    assert!(chain_exists(&w.sb, "nats_guard"));
}

// ---------------------------------------------------------------------------------------------
// 3. SIGTERM while a reply is being prepared.

/// A monit stand-in on 127.0.0.1:2822 that answers every status request after `delay` with an
/// empty status document: `get_state` then takes a while and succeeds.
fn slow_monit(director: &Director, delay: Duration) {
    director
        .ns()
        .run(Duration::from_secs(5), move || async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:2822")
                .await
                .map_err(|e| format!("bind 127.0.0.1:2822: {e}"))?;
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf).await;
                        tokio::time::sleep(delay).await;
                        let body = r#"<?xml version="1.0" encoding="ISO-8859-1"?><monit id="x" incarnation="1" version="5.2.5"></monit>"#;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(resp.as_bytes()).await;
                        let _ = s.shutdown().await;
                    });
                }
            });
            Ok::<(), String>(())
        })
        .unwrap()
        .unwrap();
}

#[test]
fn sigterm_while_a_reply_is_being_prepared_still_delivers_it() {
    let mut w = world("lc-reply", false);
    slow_monit(&w.director, Duration::from_secs(2));
    let reply_to = w.director.reply_subject();
    let body = json!({"method": "get_state", "arguments": [], "reply_to": reply_to, "protocol": 3});
    let bytes = serde_json::to_vec(&body).unwrap();
    let signalled = std::thread::scope(|s| {
        let director = &w.director;
        let waiter =
            s.spawn(move || director.publish_raw(bytes, &reply_to, Duration::from_secs(20)));
        // get_state asks monit twice, 2 s each: the signal comes while it waits.
        std::thread::sleep(Duration::from_millis(800));
        let at = Instant::now();
        w.agent
            .proc_mut()
            .signal(nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let reply = waiter.join().unwrap().unwrap();
        (at, Instant::now(), reply)
    });
    let (sent_signal, got_reply, reply) = signalled;
    let reply = reply.unwrap_or_else(|| panic!("no reply after SIGTERM\n{}", w.agent.log()));
    let v: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(v["value"]["agent_id"], AGENT_ID, "{v}");
    assert!(v["value"]["job_state"].is_string(), "{v}");
    assert!(
        got_reply > sent_signal,
        "the reply was still in flight at SIGTERM"
    );
    let status = w
        .agent
        .wait_exit(Duration::from_secs(GRACE_SECONDS + 10))
        .unwrap();
    let log = w.agent.log();
    assert!(status.success(), "exit status {status}\n{log}");
    let stopping = log.find("stopping").unwrap_or_else(|| panic!("{log}"));
    assert!(
        log[stopping..].contains("stopped; the firewall stays in place"),
        "{log}"
    );
    assert!(w.sb.agent_table_present().unwrap());
}
