//! The fault matrix: the real agent (real nats-server with mutual TLS, real monit, Debian's
//! nginx as the DAV blobstore, dnsmasq, real nft, all in the sandbox's network namespace)
//! while one thing around it breaks. Each test asserts that the agent
//! - keeps answering what the fault allows (`ping`, `get_state`, `get_task`);
//! - reports the fault where a director or an operator looks: `firewall status --json`, the
//!   heartbeat's `firewall` or `vitals`, an alert, or the action's `exception.message`;
//! - does not spin while the fault lasts: its CPU time (utime + stime, with reaped children)
//!   over a window stays under [`CPU_BOUND`] of one core (a spin is about 100 %);
//! - keeps its RSS flat (printed before and after; bounded after the NATS restarts).
//!
//! Run as root: `cargo test -p integration --test faults -- --nocapture` (the figures are
//! printed). `FAULTS_NATS_RESTARTS` sets the number of nats-server kills (default 100). A
//! missing prerequisite fails with the reason.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use integration::dav::DavServer;
use integration::monit::Monit;
use integration::nats::*;
use integration::{Agent, Exec, Sandbox};
use serde_json::{Value, json};

const AGENT_SIDE: &str = "127.0.0.1:4222";
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
const TASK_LIMIT: Duration = Duration::from_secs(60);
/// How long CPU is sampled while a fault lasts.
const CPU_WINDOW: Duration = Duration::from_secs(5);
/// A correctness bound, not a speed figure: a retry loop without a pause uses a whole core.
const CPU_BOUND: f64 = 0.20;
/// How much the RSS may grow over the NATS restarts (a leak per reconnect would exceed it).
const RSS_GROWTH_KIB: u64 = 8 * 1024;
/// The blobstore timeout the agent is given here (`BOSH_AGENT_BLOBSTORE_TIMEOUT_SECONDS`), so
/// that a hanging blobstore fails a task within seconds instead of the default minute.
const BLOBSTORE_TIMEOUT_SECONDS: u64 = 2;

// ---------------------------------------------------------------------------------------------
// /proc/<pid> figures of the agent

/// The agent's CPU time so far in clock ticks: utime + stime + cutime + cstime (children the
/// agent reaped, such as `nft` runs, count: a loop that spawns them is a spin too).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14 of stat, i.e. index 11 after pid, comm and state.
    f[11..15].iter().map(|v| v.parse::<u64>().unwrap()).sum()
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The share of one core the agent used over `window` (1.0 = one core all the time).
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let hz = clock_ticks_per_second() as f64;
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    std::thread::sleep(window);
    let c1 = cpu_ticks(pid);
    (c1 - c0) as f64 / hz / t0.elapsed().as_secs_f64()
}

/// Samples the agent's CPU over [`CPU_WINDOW`], prints it and asserts [`CPU_BOUND`].
fn assert_cpu_bounded(agent: &Agent, fault: &str) -> f64 {
    let share = cpu_share(agent.pid(), CPU_WINDOW);
    eprintln!(
        "faults: {fault}: agent CPU {:.1} % of one core over {CPU_WINDOW:?}",
        share * 100.0
    );
    assert!(
        share < CPU_BOUND,
        "{fault}: the agent used {:.1} % of a core over {CPU_WINDOW:?} (bound {:.0} %): a spin?\n{}",
        share * 100.0,
        CPU_BOUND * 100.0,
        agent.log()
    );
    share
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The world

struct Opts {
    /// Start monit (else it is only prepared: its control file and credentials exist).
    monit: bool,
    /// The DAV blobstore (nginx); else `blobstore` below, or none.
    dav: bool,
    /// Blobstore settings to give the agent when `dav` is false.
    blobstore: Option<Value>,
    /// The director's name instead of 127.0.0.1 in the agent's URL (resolved by dnsmasq).
    by_name: bool,
    /// Adjusts the agent's command before it is spawned (env, private mounts).
    exec: Box<dyn FnOnce(&Sandbox, Exec) -> Exec>,
    /// Called after the sandbox exists and before the agent starts (e.g. mounts under base).
    before_agent: Box<dyn FnOnce(&Sandbox) -> Option<Unmount>>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            monit: true,
            dav: false,
            blobstore: None,
            by_name: false,
            exec: Box::new(|_, e| e),
            before_agent: Box::new(|_| None),
        }
    }
}

/// Fields drop in declaration order: the director and the agent first, the sandbox last.
struct World {
    director: Director,
    agent: Agent,
    _unmount: Option<Unmount>,
    monit: Monit,
    dav: Option<DavServer>,
    dns: Option<Dns>,
    nats: NatsServer,
    pki: Pki,
    sb: Sandbox,
}

fn world(name: &str, opts: Opts) -> World {
    let sb = Sandbox::new(name).unwrap_or_else(|e| panic!("cannot set up the sandbox: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").expect("agent cgroup");
    let nats = NatsServer::start(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None);
    let dns = opts
        .by_name
        .then(|| Dns::start(&sb, DIRECTOR_NAME, "127.0.0.1".parse().unwrap()));
    let dav = opts
        .dav
        .then(|| DavServer::start_in(sb.netns().file()).unwrap_or_else(|e| panic!("nginx: {e}")));
    let base = sb.dir().join("base");
    let mut monit = Monit::prepare_with(
        &sb,
        &format!("include {}/monit/job/*.monitrc\n", base.display()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let unmount = (opts.before_agent)(&sb);
    let url = if opts.by_name {
        nats_url(&format!("{DIRECTOR_NAME}:4222"))
    } else {
        nats_url(AGENT_SIDE)
    };
    let mut s = settings(&[url], &pki.ca_pem, &pki.client("agent"));
    if let Some(d) = &dav {
        s["env"]["bosh"]["blobstores"] = json!([d.agent_blobstore()]);
    } else if let Some(b) = &opts.blobstore {
        s["env"]["bosh"]["blobstores"] = json!([b]);
    }
    let exec = agent_exec_with(
        &sb,
        &agent_cg,
        &s,
        true,
        &json!({"HeartbeatIntervalSeconds": 1}),
    )
    .env(
        "BOSH_AGENT_BLOBSTORE_TIMEOUT_SECONDS",
        BLOBSTORE_TIMEOUT_SECONDS.to_string(),
    );
    let exec = (opts.exec)(&sb, exec);
    let mut agent = sb.spawn_agent(&exec).expect("spawn agent");
    agent
        .wait_ready(integration::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("agent not ready: {e}"));
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    if opts.monit {
        monit.start().unwrap_or_else(|e| panic!("{e}"));
    }
    World {
        director,
        agent,
        _unmount: unmount,
        monit,
        dav,
        dns,
        nats,
        pki,
        sb,
    }
}

impl World {
    fn base(&self) -> PathBuf {
        self.sb.dir().join("base")
    }

    fn call(&self, method: &str, args: Value) -> Value {
        self.director
            .call(method, args, 3, Duration::from_secs(50))
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.log()))
    }

    fn task(&self, method: &str, args: Value) -> Value {
        self.director
            .task(method, args, TASK_LIMIT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.log()))
    }

    /// The task's failure message; panics when the task did not fail.
    fn task_error(&self, method: &str, args: Value) -> String {
        let r = self.task(method, args);
        r["exception"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} did not fail: {r}\n{}", self.agent.log()))
            .to_string()
    }

    fn ping_ok(&self) {
        assert_eq!(
            self.call("ping", json!([])),
            json!({"value": "pong"}),
            "ping"
        );
    }

    /// Starts `method` as a task and returns its id (the director's acknowledgement).
    fn start_task(&self, method: &str, args: Value) -> String {
        let r = self.call(method, args);
        r["value"]["agent_task_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} gave no task id: {r}"))
            .to_string()
    }

    fn status(&self) -> Value {
        self.sb.status().expect("firewall status").1
    }
}

/// Unmounts a test's mount however the test ends (the sandbox can then be removed).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn uuid() -> String {
    let b = fs::read("/proc/sys/kernel/random/uuid").unwrap();
    String::from_utf8(b).unwrap().trim().to_string()
}

fn sha1(bytes: &[u8]) -> String {
    let dir = integration::TempDir::new("bosh-agent-test").unwrap();
    let f = dir.path().join("blob");
    fs::write(&f, bytes).unwrap();
    let out = Command::new("sha1sum").arg(&f).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A `.tgz` holding `files` (name, contents), made with the system's tar.
fn tgz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let dir = integration::TempDir::new("bosh-agent-test").unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    for (name, body) in files {
        fs::write(root.join(name), body).unwrap();
    }
    let out = dir.path().join("out.tgz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    fs::read(out).unwrap()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// An apply/prepare spec with one package `pkg` (blob `id`, digest `sha1`) and no jobs.
fn package_spec(id: &str, sha1: &str) -> Value {
    json!({
        "deployment": "dep", "name": "web", "index": 0, "id": "a1b2-web-0", "az": "z1",
        "job": {"name": "web", "templates": []},
        "packages": {"pkg": {"name": "pkg", "version": "1", "sha1": sha1, "blobstore_id": id}},
        "networks": {"default": {"type": "manual", "ip": "10.0.0.9", "netmask": "255.255.255.0",
                                 "default": ["dns", "gateway"]}},
        "configuration_hash": "cfg-1", "persistent_disk": 0
    })
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits for a message on `rx` whose JSON satisfies `pred`; panics after `limit`.
fn wait_message(
    rx: &std::sync::mpsc::Receiver<Received>,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(m) => {
                let v = m.json().unwrap();
                if pred(&v) {
                    return v;
                }
                last = Some(v);
            }
            Err(_) => panic!("no {what} within {limit:?}; last seen: {last:#?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// nft failing, nft missing

/// An `nft` that runs the real one until `<sandbox>/nft.fail` exists, then fails every call
/// as a broken nft would (exit 1, an error on stderr).
fn failing_nft(sb: &Sandbox) -> PathBuf {
    let flag = sb.dir().join("nft.fail");
    sb.script(
        "nft-failing",
        &format!(
            "#!/bin/sh\n\
             if [ -e {flag} ]; then echo 'Error: simulated nft failure' >&2; exit 1; fi\n\
             exec nft \"$@\"\n",
            flag = flag.display()
        ),
    )
    .unwrap()
}

#[test]
fn nft_failing_is_reported_and_the_agent_keeps_serving() {
    let w = world(
        "faults-nft-failing",
        Opts {
            exec: Box::new(|sb, e| e.env("BOSH_AGENT_NFT", failing_nft(sb))),
            ..Opts::default()
        },
    );
    let alerts = w.director.subscribe(&format!("hm.agent.alert.{AGENT_ID}"));
    let heartbeats = w
        .director
        .subscribe(&format!("hm.agent.heartbeat.{AGENT_ID}"));
    let rss0 = rss_kib(w.agent.pid());
    fs::write(w.sb.dir().join("nft.fail"), "").unwrap();
    // Drift the agent must repair: its table gone, behind its back (the real nft).
    let out = w
        .sb
        .nft(["delete", "table", "inet", "bosh_agent"])
        .unwrap();
    assert!(out.status.success(), "{}", integration::describe(&out));

    let alert = wait_message(&alerts, "a critical alert", CONNECT_LIMIT, |a| {
        a["severity"] == 2
    });
    let summary = alert["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("simulated nft failure"),
        "alert.summary names nft's error: {alert:#}"
    );
    let hb = wait_message(&heartbeats, "a degraded heartbeat", CONNECT_LIMIT, |h| {
        h["firewall"]["degraded"] == true
    });
    let problems = hb["firewall"]["problems"].to_string();
    assert!(
        problems.contains("simulated nft failure"),
        "heartbeat.firewall.problems: {hb:#}"
    );
    let st = w.status();
    eprintln!("faults: nft failing: status = {st}");
    w.ping_ok();
    let gs = w.call("get_state", json!([]));
    assert_eq!(gs["value"]["firewall"]["degraded"], true, "{gs:#}");
    assert_cpu_bounded(&w.agent, "nft failing");

    // nft works again: the agent repairs its table and says so.
    fs::remove_file(w.sb.dir().join("nft.fail")).unwrap();
    wait_message(&heartbeats, "a healthy heartbeat", CONNECT_LIMIT, |h| {
        h["firewall"]["degraded"] == false
    });
    assert!(w.sb.agent_table_present().unwrap(), "the table is back");
    let rss1 = rss_kib(w.agent.pid());
    eprintln!("faults: nft failing: RSS {rss0} KiB before, {rss1} KiB after");
}

// ---------------------------------------------------------------------------------------------
// NATS killed and restarted

#[test]
fn nats_server_killed_and_restarted_many_times_loses_no_acknowledged_task() {
    let restarts: usize = std::env::var("FAULTS_NATS_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut w = world("faults-nats-restarts", Opts::default());
    let pid = w.agent.pid();
    // Warm up (first heartbeats, first get_state) before the baseline.
    w.call("get_state", json!([]));
    let rss0 = rss_kib(pid);
    let t0 = Instant::now();
    let mut acknowledged = Vec::new();
    for i in 0..restarts {
        if i % 10 == 0 {
            // A request the director sent and the agent acknowledged just before the kill.
            let id = w.start_task("run_script", json!(["pre-start", {}]));
            acknowledged.push(id);
        }
        w.nats.kill().unwrap();
        w.nats.restart();
        // The agent re-subscribed: it answers on the new server.
        let took = w
            .director
            .request_every("ping", Duration::from_secs(10), Duration::from_millis(50));
        assert_eq!(
            took.as_ref().ok(),
            Some(&json!({"value": "pong"})),
            "restart {i}: no pong ({took:?})\n{}",
            w.agent.log()
        );
    }
    let elapsed = t0.elapsed();
    for id in &acknowledged {
        let r = w.call("get_task", json!([id]));
        assert!(
            r.get("exception").is_none() && r["value"]["state"] != "running",
            "task {id} acknowledged before a kill is still known and done: {r}"
        );
    }
    let rss1 = rss_kib(pid);
    eprintln!(
        "faults: nats-server killed {restarts} times in {elapsed:?}: RSS {rss0} KiB before, \
         {rss1} KiB after; {} acknowledged tasks queried after reconnects",
        acknowledged.len()
    );
    let st = w.status();
    let connects = st["agent"]["nats_bus"]["connects"].as_u64().unwrap_or(0);
    assert!(
        connects > restarts as u64,
        "firewall status agent.nats_bus.connects counts every reconnect: {st:#}"
    );
    assert!(
        rss1 <= rss0 + RSS_GROWTH_KIB,
        "RSS grew from {rss0} KiB to {rss1} KiB over {restarts} restarts"
    );

    // While the server stays down, the agent retries at its backoff, not in a loop.
    w.nats.kill().unwrap();
    assert_cpu_bounded(&w.agent, "nats-server down");
    w.nats.restart();
    w.director.wait_pong(CONNECT_LIMIT);
}
