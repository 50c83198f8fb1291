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
//! printed). `FAULTS_NATS_RESTARTS` sets the number of nats-server kills (default 100),
//! `FAULTS_DNS_ROUNDS` the number of outages while DNS times out (default 5). A
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
use integration::sim::{entries, random_bytes, sha1, tgz, uuid};
use integration::{Agent, Exec, Sandbox};
use serde_json::{Value, json};

const AGENT_SIDE: &str = "127.0.0.1:4222";
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
const TASK_LIMIT: Duration = Duration::from_secs(60);
/// How long CPU is sampled while a fault lasts.
const CPU_WINDOW: Duration = Duration::from_secs(4);
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

/// Changes the agent's start command (env, private mounts).
type ExecAdjust = Box<dyn FnOnce(&Sandbox, Exec) -> Exec>;
/// Prepares the sandbox before the agent starts; what it mounts is unmounted by the guard.
type BeforeAgent = Box<dyn FnOnce(&Sandbox) -> Option<Unmount>>;

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
    exec: ExecAdjust,
    /// Called after the sandbox exists and before the agent starts (e.g. mounts under base).
    before_agent: BeforeAgent,
    /// Wait for the first firewall apply (false: a fault prevents it; wait for a pong only).
    ready: bool,
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
            ready: true,
        }
    }
}

/// Fields drop in declaration order: the director and the agent first, the sandbox last.
struct World {
    /// The agent's RSS once it answered its first ping (KiB).
    rss0: u64,
    director: Director,
    agent: Agent,
    _unmount: Option<Unmount>,
    _monit: Monit,
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
    if opts.ready {
        agent
            .wait_ready(integration::READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("agent not ready: {e}"));
    }
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    director.wait_pong(CONNECT_LIMIT);
    if opts.monit {
        monit.start().unwrap_or_else(|e| panic!("{e}"));
    }
    World {
        rss0: rss_kib(agent.pid()),
        director,
        agent,
        _unmount: unmount,
        _monit: monit,
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

    /// Prints the agent's RSS now and at the start; returns the growth in KiB.
    fn report_rss(&self, fault: &str) -> i64 {
        let now = rss_kib(self.agent.pid());
        eprintln!(
            "faults: {fault}: agent RSS {} KiB before, {now} KiB after",
            self.rss0
        );
        now as i64 - self.rss0 as i64
    }
}

/// Unmounts a test's mount however the test ends (the sandbox can then be removed).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
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
    fs::write(w.sb.dir().join("nft.fail"), "").unwrap();
    // Drift the agent must repair: its table gone, behind its back (the real nft).
    let out = w.sb.nft(["delete", "table", "inet", "bosh_agent"]).unwrap();
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
    w.report_rss("nft failing");
}

// ---------------------------------------------------------------------------------------------
// NATS killed and restarted

#[test]
fn nats_server_killed_and_restarted_many_times_loses_no_acknowledged_task() {
    let restarts: usize = std::env::var("FAULTS_NATS_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // Fast restarts: the agent's reconnect backoff capped at 100 ms instead of 1 s (a
    // connection shorter than 1 s does not reset it), so 100 cycles take seconds, not minutes.
    let mut w = world(
        "faults-nats-restarts",
        Opts {
            exec: Box::new(|_, e| e.env("BOSH_AGENT_MBUS_BACKOFF_CAP_MS", "100")),
            ..Opts::default()
        },
    );
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
        let took =
            w.director
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
    // The agent writes its bus counters at every reconcile (1 s).
    let (_, st) = status_when(&w.sb, "agent.nats_bus.connects", CONNECT_LIMIT, |_, st| {
        st["agent"]["nats_bus"]["connects"].as_u64().unwrap_or(0) > restarts as u64
    });
    eprintln!(
        "faults: nats-server restarts: firewall status agent.nats_bus = {}",
        st["agent"]["nats_bus"]
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

#[test]
fn nft_missing_is_reported_and_the_agent_still_serves_the_director() {
    let w = world(
        "faults-nft-missing",
        Opts {
            exec: Box::new(|sb, e| e.env("BOSH_AGENT_NFT", sb.dir().join("no-such-nft"))),
            ready: false,
            ..Opts::default()
        },
    );
    let heartbeats = w
        .director
        .subscribe(&format!("hm.agent.heartbeat.{AGENT_ID}"));
    w.ping_ok();
    let hb = wait_message(&heartbeats, "a heartbeat", CONNECT_LIMIT, |_| true);
    assert_eq!(
        hb["firewall"]["degraded"], true,
        "heartbeat.firewall: {hb:#}"
    );
    let problems = hb["firewall"]["problems"].to_string();
    assert!(
        problems.contains("no-such-nft"),
        "heartbeat.firewall.problems names the nft it could not run: {hb:#}"
    );
    let st = w.status();
    let last = st["agent"]["last_error"].as_str().unwrap_or_default();
    assert!(
        last.contains("no-such-nft"),
        "firewall status agent.last_error: {st:#}"
    );
    let hook_failures = st["agent"]["nats_bus"]["hook_failures"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        hook_failures >= 1,
        "firewall status agent.nats_bus.hook_failures: {st:#}"
    );
    assert_cpu_bounded(&w.agent, "nft missing");
    w.ping_ok();
    w.report_rss("nft missing");
}

// ---------------------------------------------------------------------------------------------
// /proc unreadable

/// The procfs files vitals are read from, each hidden from the agent by an empty file bound
/// over it in the agent's private mount namespace. The agent's own identity (its cgroup and
/// the cgroup2 mount, read from /proc/self) stays readable: without it there is no firewall,
/// which the nft faults cover.
const PROC_VITALS: [&str; 3] = ["/proc/loadavg", "/proc/meminfo", "/proc/stat"];

#[test]
fn proc_unreadable_fails_full_vitals_clearly_and_the_rest_keeps_working() {
    let w = world(
        "faults-proc",
        Opts {
            exec: Box::new(|sb, e| {
                let empty = sb.dir().join("empty");
                fs::write(&empty, "").unwrap();
                let binds: Vec<(PathBuf, PathBuf)> = PROC_VITALS
                    .iter()
                    .map(|p| (empty.clone(), PathBuf::from(p)))
                    .collect();
                e.private_mounts(&binds)
            }),
            ..Opts::default()
        },
    );
    let heartbeats = w
        .director
        .subscribe(&format!("hm.agent.heartbeat.{AGENT_ID}"));
    w.ping_ok();
    let gs = w.call("get_state", json!([]));
    assert!(gs["value"]["agent_id"] == AGENT_ID, "get_state: {gs:#}");
    let full = w.call("get_state", json!(["full"]));
    let msg = full["exception"]["message"].as_str().unwrap_or_default();
    eprintln!("faults: /proc unreadable: get_state full: {full}");
    assert!(
        PROC_VITALS.iter().any(|p| msg.contains(p)),
        "get_state full's exception.message names the procfs file: {full:#}"
    );
    let hb = wait_message(&heartbeats, "a heartbeat", CONNECT_LIMIT, |_| true);
    assert_eq!(
        hb["vitals"],
        json!({}),
        "heartbeat.vitals is empty when procfs cannot be read: {hb:#}"
    );
    assert!(
        hb["job_state"].is_string(),
        "the heartbeat still has job_state: {hb:#}"
    );
    assert_cpu_bounded(&w.agent, "/proc unreadable");
    w.ping_ok();
    w.report_rss("/proc unreadable");
}

// ---------------------------------------------------------------------------------------------
// DNS timing out

/// A UDP socket on 127.0.0.1:53 in the sandbox that never answers: queries time out.
fn black_hole_dns(sb: &Sandbox) -> UdpSocket {
    in_netns(sb)
        .run(Duration::from_secs(5), || async {
            UdpSocket::bind("127.0.0.1:53").unwrap()
        })
        .unwrap()
}

#[test]
fn dns_timing_out_keeps_the_last_address_and_the_agent_reconnects() {
    let mut w = world(
        "faults-dns",
        Opts {
            by_name: true,
            ..Opts::default()
        },
    );
    w.dns.as_mut().unwrap().stop();
    let _hole = black_hole_dns(&w.sb);
    // The director's NATS goes away while names cannot be resolved: every reconnect attempt
    // waits for a DNS timeout. Several outages of random length (the first one is the CPU
    // window), so that the server comes back at different points of the agent's retry cycle.
    // Two delays are printed for each: until the agent is subscribed again (its log's
    // timestamp), and until the director's ping is answered (the director's NATS client
    // reconnects by its own backoff, up to 4 s, so that one says little about the agent).
    let rounds: u32 = std::env::var("FAULTS_DNS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let (mut agent_side, mut director_side) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        w.nats.kill().unwrap();
        if round == 0 {
            assert_cpu_bounded(&w.agent, "DNS timing out, nats-server down");
        } else {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            std::thread::sleep(Duration::from_millis(1000 + u64::from(nanos % 2000)));
        }
        let subscribed_before = subscribed_times(&w.agent).len();
        w.nats.restart();
        let back = std::time::SystemTime::now();
        let took = w.director.wait_pong(CONNECT_LIMIT);
        let again = subscribed_times(&w.agent);
        assert!(
            again.len() > subscribed_before,
            "round {round}: a pong without a new subscription?\n{}",
            w.agent.log()
        );
        let agent_ms = match again[again.len() - 1].duration_since(back) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        eprintln!(
            "faults: DNS timing out, round {round}: the agent subscribed again {agent_ms} ms \
             after nats-server was back; the director's ping answered after {took:?}"
        );
        agent_side.push(agent_ms);
        director_side.push(took.as_millis() as i64);
    }
    agent_side.sort_unstable();
    director_side.sort_unstable();
    eprintln!(
        "faults: DNS timing out: {rounds} outages: re-subscribed after {agent_side:?} ms \
         (median {} ms, max {} ms); director's pong after {director_side:?} ms",
        agent_side[agent_side.len() / 2],
        agent_side[agent_side.len() - 1]
    );
    let st = w.status();
    let failures = st["agent"]["nats_bus"]["resolve_failures"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        failures >= 1,
        "firewall status agent.nats_bus.resolve_failures counts the timeouts: {st:#}"
    );
    assert_eq!(
        nats_endpoints(&w.sb),
        [addr(AGENT_SIDE)],
        "the last resolved endpoint stays protected"
    );
    w.call("get_state", json!([]));
    w.report_rss("DNS timing out");
}

/// When the agent logged "mbus connected and subscribed", each time, from its log's
/// timestamps.
fn subscribed_times(agent: &Agent) -> Vec<std::time::SystemTime> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("mbus connected and subscribed"))
        .filter_map(|l| integration::fleet::observe::parse_rfc3339(l.split_whitespace().next()?))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The blobstore answering 500 or hanging

/// How a [`FakeBlobstore`] answers.
const ANSWER_500: usize = 0;
const ANSWER_NEVER: usize = 1;

/// A tiny HTTP server in the sandbox: every request gets a 500, or no answer at all (the
/// connection is held open) until the server is dropped.
struct FakeBlobstore {
    port: u16,
    mode: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FakeBlobstore {
    fn start(sb: &Sandbox) -> Self {
        let listener = in_netns(sb)
            .run(Duration::from_secs(5), || async {
                TcpListener::bind("127.0.0.1:0").unwrap()
            })
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let mode = Arc::new(AtomicUsize::new(ANSWER_500));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, r, st) = (mode.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (m, r, st) = (m.clone(), r.clone(), st.clone());
                        std::thread::spawn(move || serve(conn, &m, &r, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        FakeBlobstore {
            port,
            mode,
            requests,
            stop,
        }
    }

    fn settings(&self) -> Value {
        json!({"provider": "dav", "options": {
            "endpoint": format!("http://127.0.0.1:{}", self.port),
            "user": "agent", "password": "blob-secret", "retry_attempts": 2}})
    }
}

impl Drop for FakeBlobstore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut conn: TcpStream, mode: &AtomicUsize, requests: &AtomicUsize, stop: &AtomicBool) {
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    requests.fetch_add(1, Ordering::Relaxed);
    if mode.load(Ordering::Relaxed) == ANSWER_500 {
        let body = "simulated blobstore failure";
        let _ = write!(
            conn,
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    } else {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_blobstore_answering_500_or_hanging_fails_the_task_clearly_and_installs_nothing() {
    let w = world("faults-blobstore", Opts::default());
    // The fake blobstore listens in the sandbox the world made; the blobstore settings come
    // from settings.json, so the agent is restarted with them.
    let blob = FakeBlobstore::start(&w.sb);
    let w = restart_with_blobstore(w, blob.settings());
    let base = w.base();
    let id = uuid();
    let spec = package_spec(&id, "da39a3ee5e6b4b0d3255bfef95601890afd80709");

    // 500: the task fails naming the blob, the status and the URL (without the password).
    let t0 = Instant::now();
    let msg = w.task_error("prepare", json!([spec]));
    eprintln!(
        "faults: blobstore 500: prepare failed in {:?}: {msg}",
        t0.elapsed()
    );
    assert!(
        msg.contains(&id)
            && msg.contains("500")
            && msg.contains(&format!("127.0.0.1:{}", blob.port)),
        "prepare's exception.message names the blob, the status and the URL: {msg}"
    );
    assert!(!msg.contains("blob-secret"), "no password in {msg}");
    assert!(blob.requests.load(Ordering::Relaxed) >= 2, "retried");
    assert!(
        entries(&base.join("data/packages/pkg")).is_empty(),
        "nothing installed"
    );
    assert!(!base.join("packages/pkg").exists(), "nothing enabled");

    // Hanging: apply fails within its timeout while ping keeps working.
    blob.mode.store(ANSWER_NEVER, Ordering::Relaxed);
    let t0 = Instant::now();
    let task = w.start_task("apply", json!([spec]));
    w.ping_ok();
    assert_cpu_bounded(&w.agent, "blobstore hanging");
    let r = w
        .director
        .task("get_task", json!([task]), TASK_LIMIT)
        .unwrap();
    let took = t0.elapsed();
    let msg = r["exception"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("faults: blobstore hanging: apply failed after {took:?}: {msg}");
    assert!(
        msg.contains(&id) && msg.to_lowercase().contains("timed out")
            || msg.to_lowercase().contains("timeout"),
        "apply's exception.message names the blob and the timeout: {r}"
    );
    // Two attempts of one timeout each, a pause between them, and slack for the machine.
    assert!(
        took < Duration::from_secs(2 * BLOBSTORE_TIMEOUT_SECONDS + 15),
        "the hang ended by the blobstore timeout: {took:?}"
    );
    assert!(
        entries(&base.join("data/packages/pkg")).is_empty(),
        "nothing installed"
    );
    let gs = w.call("get_state", json!([]));
    assert_ne!(
        gs["value"]["configuration_hash"], "cfg-1",
        "the failed apply did not become the applied spec: {gs:#}"
    );
    w.ping_ok();
    w.report_rss("blobstore 500 and hanging");
}

/// Stops the world's agent and starts another with `blobstore` in settings.json.
fn restart_with_blobstore(mut w: World, blobstore: Value) -> World {
    w.agent.stop().unwrap();
    let mut s = settings(
        &[nats_url(AGENT_SIDE)],
        &w.pki.ca_pem,
        &w.pki.client("agent"),
    );
    s["env"]["bosh"]["blobstores"] = json!([blobstore]);
    let cg = w.sb.cgroup("agent").unwrap();
    let exec = agent_exec_with(
        &w.sb,
        &cg,
        &s,
        true,
        &json!({"HeartbeatIntervalSeconds": 1}),
    )
    .env(
        "BOSH_AGENT_BLOBSTORE_TIMEOUT_SECONDS",
        BLOBSTORE_TIMEOUT_SECONDS.to_string(),
    );
    let mut agent = w.sb.spawn_agent(&exec).unwrap();
    agent.wait_ready(integration::READY_TIMEOUT).unwrap();
    w.agent = agent;
    w.director.wait_pong(CONNECT_LIMIT);
    w.rss0 = rss_kib(w.agent.pid());
    w
}

// ---------------------------------------------------------------------------------------------
// monit down

#[test]
fn monit_down_is_reported_by_get_state_and_start_fails_clearly() {
    let w = world(
        "faults-monit",
        Opts {
            monit: false,
            ..Opts::default()
        },
    );
    // get_state and start both wait for monit's retries (upstream's 20, 1 s apart); they run
    // side by side, and ping is answered meanwhile.
    let t0 = Instant::now();
    let (gs, r, share) = std::thread::scope(|s| {
        let gs = s.spawn(|| w.call("get_state", json!([])));
        let start = s.spawn(|| w.call("start", json!([])));
        std::thread::sleep(Duration::from_millis(500));
        w.ping_ok();
        let share = assert_cpu_bounded(&w.agent, "monit down");
        (gs.join().unwrap(), start.join().unwrap(), share)
    });
    eprintln!(
        "faults: monit down: get_state and start answered within {:?} (CPU {:.1} %): {gs} {r}",
        t0.elapsed(),
        share * 100.0
    );
    let msg = gs["exception"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("2822") && msg.to_lowercase().contains("monit"),
        "get_state's exception.message says monit cannot be reached: {gs:#}"
    );
    let msg = r["exception"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("2822") && msg.to_lowercase().contains("monit"),
        "start's exception.message says monit cannot be reached: {r:#}"
    );
    w.ping_ok();
    w.report_rss("monit down");
}

// ---------------------------------------------------------------------------------------------
// The disk full

/// Every file and symlink below `dir` with its size, sorted (directories are left out: the
/// agent may create its empty working directories, as upstream does).
fn tree(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Writes `<dir>/filler` until the filesystem has no room left.
fn fill(dir: &Path) {
    let mut f = fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
            break;
        }
    }
    // Partial pages are gone too.
    let _ = f.write_all(b"x");
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_fails_prepare_compile_and_logs_clearly_and_leaves_nothing_half_written() {
    let w = world(
        "faults-disk-full",
        Opts {
            dav: true,
            before_agent: Box::new(|sb| {
                let data = sb.dir().join("base/data");
                fs::create_dir_all(&data).unwrap();
                let st = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
                    .arg(&data)
                    .status()
                    .unwrap();
                assert!(st.success(), "mount a small tmpfs on {}", data.display());
                Some(Unmount(data))
            }),
            ..Opts::default()
        },
    );
    let base = w.base();
    let data = base.join("data");
    let dav = w.dav.as_ref().unwrap();
    // A package blob larger than the room left, and a source package to compile.
    let big = tgz(&[("blob.bin", random_bytes(1 << 20), 0o644)], "./");
    let big_id = uuid();
    dav.put_blob(&big_id, &big).unwrap();
    let src = tgz(
        &[(
            "packaging",
            &b"set -e\necho hi > $BOSH_INSTALL_TARGET/hi\n"[..],
            0o644,
        )],
        "./",
    );
    let src_id = uuid();
    dav.put_blob(&src_id, &src).unwrap();
    w.ping_ok();
    fill(&data);
    let before = tree(&data);

    let msg = w.task_error("prepare", json!([package_spec(&big_id, &sha1(&big))]));
    eprintln!("faults: disk full: prepare: {msg}");
    assert!(
        msg.contains(&big_id) && msg.to_lowercase().contains("no space"),
        "prepare's exception.message names the blob and the full disk: {msg}"
    );
    let msg = w.task_error(
        "compile_package",
        json!([src_id, sha1(&src), "pkg", "1", {}]),
    );
    eprintln!("faults: disk full: compile_package: {msg}");
    assert!(
        msg.to_lowercase().contains("no space"),
        "compile_package's exception.message says the disk is full: {msg}"
    );
    // The logs are streamed to the blobstore as they are packed (no temporary file): a full
    // disk does not stop them.
    let r = w.task("fetch_logs", json!(["job", []]));
    eprintln!("faults: disk full: fetch_logs: {r}");
    let logs_id = r["value"]["blobstore_id"].as_str().unwrap_or_default();
    assert!(
        dav.object_path(logs_id).is_file(),
        "fetch_logs works on a full disk and its value.blobstore_id is stored: {r}"
    );
    assert_eq!(
        tree(&data),
        before,
        "nothing half-written is left under data/"
    );
    w.ping_ok();
    assert_cpu_bounded(&w.agent, "disk full");
    assert!(w.call("get_state", json!([]))["value"].is_object());

    // Room again: the same prepare works.
    fs::remove_file(data.join("filler")).unwrap();
    assert_eq!(
        w.task("prepare", json!([package_spec(&big_id, &sha1(&big))]))["value"],
        "prepared"
    );
    w.report_rss("disk full");
}
