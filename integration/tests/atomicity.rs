//! The atomicity probe: while the real agent's table changes as fast as the test can make it
//! change, a prober in a cgroup that is not allowed connects to every protected endpoint —
//! monit (IPv4 and IPv6) and the director's NATS endpoints — as fast as it can, and allowed
//! clients do the same: a job (with a `firewall-allow monit` rule) to monit, and a process in
//! a child cgroup of the agent's (which the NATS rules allow) to NATS. Pass: not one
//! connection for the prober, not one refusal or timeout for the allowed clients. Every
//! change is one nft transaction; the test counts them from `nft monitor` ("new generation"
//! lines) in its own network namespace, where nothing else changes the ruleset, and sorts
//! them by what they changed.
//!
//! What changes the table meanwhile:
//! - `firewall-allow monit` from fresh cgroups in parallel loops (each adds a job rule), and
//!   the agent pruning the rules of those cgroups once they are removed;
//! - the agent rebuilding its NATS rules: the director's name is re-pointed every 20 ms
//!   between {127.0.0.1, 127.0.0.2, 127.0.0.4} and {127.0.0.1, 127.0.0.2, 127.0.0.5}, and the
//!   agent's connection is cut (`ss -K`, the sockets of the agent's own cgroup only) every
//!   `ATOMICITY_NATS_KILL_MS`, so each reconnect resolves the name afresh: the new address is
//!   added on the fast path before the dial and the stale one removed by the rebuild after
//!   it. The probed addresses .1 and .2 are in every answer, so they are protected at every
//!   instant; an address the name no longer has is rightly unprotected and is not probed.
//!   (The connection is cut rather than the server restarted: a restarting server refuses the
//!   allowed client for reasons that have nothing to do with the firewall.)
//! - the workload policies re-applied: agent.json alternates between two valid variants (an
//!   egress range and an ingress port added and removed; the ports the clients use stay
//!   allowed) and `bosh-agent firewall reload` applies each (SIGHUP), in a loop.
//!
//! Knobs: `ATOMICITY_TRANSACTIONS` (default 1000), `ATOMICITY_LOOPS` (parallel
//! `firewall-allow` loops, default 3), `ATOMICITY_MAX_SECONDS` (default 150: the run fails if
//! the transactions were not reached by then), `ATOMICITY_NATS_KILL_MS` (default 200). Run as
//! root: `cargo test -p integration --test atomicity -- --nocapture` prints the counts.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use integration::crash::knob;
use integration::nats::*;
use integration::{MONIT_V4, MONIT_V6, NOBODY, Sandbox};
use serde_json::{Value, json};

/// The stop file of the storms: under /tmp, so `nobody` can see it appear.
struct StopFile(PathBuf);

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The NATS endpoints probed: in every answer for the director's name.
const NATS_A: &str = "127.0.0.1:4222";
const NATS_B: &str = "127.0.0.2:4222";

/// The transactions `nft monitor` saw, by what they changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Kinds {
    /// A job rule added (`firewall-allow monit`).
    allow: u64,
    /// Job rules deleted (the agent's prune).
    prune: u64,
    /// NATS endpoints added on the fast path before a dial.
    nats_add: u64,
    /// The whole table rebuilt: after a dial (stale endpoints removed), a reload, a repair.
    rebuild: u64,
    /// Anything else (shown, and it fails the run: nothing else should change the table).
    other: u64,
}

impl Kinds {
    fn total(&self) -> u64 {
        self.allow + self.prune + self.nats_add + self.rebuild + self.other
    }
}

/// Sorts the transactions of an `nft monitor` log (each block of lines ends with its
/// `# new generation` line); returns the kinds and the first unexpected block.
fn kinds(log: &std::path::Path) -> (Kinds, Option<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut k, mut odd, mut block) = (Kinds::default(), None, Vec::new());
    for line in text.lines() {
        if !line.starts_with("# new generation") {
            block.push(line);
            continue;
        }
        let any = |p: &str| block.iter().any(|l| l.starts_with(p));
        if any("add chain inet bosh_agent ") || any("delete chain inet bosh_agent ") {
            k.rebuild += 1;
        } else if any("add rule inet bosh_agent monit_access_jobs ") {
            k.allow += 1;
        } else if any("delete rule inet bosh_agent monit_access_jobs ") {
            k.prune += 1;
        } else if !block.is_empty()
            && block
                .iter()
                .all(|l| l.starts_with("add element inet bosh_agent nats_"))
        {
            k.nats_add += 1;
        } else {
            k.other += 1;
            odd.get_or_insert_with(|| block.join("\n"));
        }
        block.clear();
    }
    (k, odd)
}

/// `attempts=… connected=… refused=… timed_out=… other=…` as numbers: the totals line, and
/// the per-endpoint lines (`endpoint=<addr> attempts=…`).
fn counts(out: &str) -> ([u64; 5], Vec<(String, [u64; 5])>) {
    let parse = |line: &str| {
        let mut c = [0u64; 5];
        for (i, part) in line.split_whitespace().enumerate().take(5) {
            c[i] = part
                .split_once('=')
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or_else(|| panic!("bad count {part:?} in {line:?}"));
        }
        c
    };
    let line = out
        .lines()
        .find(|l| l.starts_with("attempts="))
        .unwrap_or_else(|| panic!("no counts in {out:?}"));
    let per = out
        .lines()
        .filter_map(|l| l.strip_prefix("endpoint="))
        .map(|l| {
            let (addr, rest) = l.split_once(' ').unwrap_or((l, ""));
            (addr.to_string(), parse(rest))
        })
        .collect();
    (parse(line), per)
}

/// One line per endpoint for the report.
fn per_endpoint(who: &str, per: &[(String, [u64; 5])]) -> String {
    per.iter()
        .map(|(a, [n, c, r, t, o])| {
            format!("  {who} -> {a}: {n} attempts, {c} connected, {r} refused, {t} timed out, {o} other\n")
        })
        .collect()
}

/// The agent.json the agent runs with (`-C` of its command line).
fn config_path(pid: u32) -> PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let i = args.iter().position(|a| *a == b"-C").unwrap();
    PathBuf::from(String::from_utf8(args[i + 1].to_vec()).unwrap())
}

/// The two variants of the workload policies that the reloads alternate between: an egress
/// range and an ingress port differ; sshd's port and the ports the clients use (monit 2822,
/// NATS 4222) are allowed in both.
fn variant(base: &Value, second: bool) -> String {
    let mut deny = vec![json!({"Destination": "192.0.2.0/24"})];
    let mut ports = vec!["22", "2822", "4222", "8080"];
    if second {
        deny.push(json!({"Destination": "198.51.100.0/24"}));
        ports.push("9090");
    }
    let mut c = base.clone();
    let fw = &mut c["Platform"]["Linux"]["Firewall"];
    fw["EgressDeny"] = json!(deny);
    fw["IngressAllow"] = json!(
        ports
            .iter()
            .map(|p| json!({"Protocol": "tcp", "Ports": p}))
            .collect::<Vec<_>>()
    );
    c.to_string()
}

#[test]
fn no_connection_slips_through_and_none_is_refused_while_the_table_changes() {
    let want = knob("ATOMICITY_TRANSACTIONS", 1000);
    let loops = knob("ATOMICITY_LOOPS", 3);
    let max = Duration::from_secs(knob("ATOMICITY_MAX_SECONDS", 150));
    let kill_every = Duration::from_millis(knob("ATOMICITY_NATS_KILL_MS", 200));
    let sb = Sandbox::new("atomicity").unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").unwrap();
    let job = sb.cgroup("job").unwrap();
    let prober = sb.cgroup("prober").unwrap();
    let _l4 = sb.listen(MONIT_V4).unwrap();
    let _l6 = sb.listen(MONIT_V6).unwrap();
    let _server = NatsServer::start(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None);
    let dns = Dns::start(&sb, DIRECTOR_NAME, "127.0.0.1".parse().unwrap());
    let probed: Vec<std::net::IpAddr> =
        vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
    dns.point_all(DIRECTOR_NAME, &probed);
    let policies = variant(&json!({"Platform": {"Linux": {"Firewall": {}}}}), false);
    let mut fw: Value =
        serde_json::from_str::<Value>(&policies).unwrap()["Platform"]["Linux"]["Firewall"].clone();
    fw["ReconcileIntervalSeconds"] = json!(1);
    let exec = agent_exec_with(
        &sb,
        &agent_cg,
        &settings(
            &[nats_url(&format!("{DIRECTOR_NAME}:4222"))],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
        true,
        &json!({ "Firewall": fw }),
    )
    // Reconnect within 50 ms of a cut, so that the cuts become rebuilds.
    .env("BOSH_AGENT_MBUS_BACKOFF_CAP_MS", "50");
    let mut agent = sb.spawn_agent(&exec).unwrap();
    agent.wait_ready(integration::READY_TIMEOUT).unwrap();
    wait_endpoints(&sb, &[addr(NATS_A), addr(NATS_B)], Duration::from_secs(15));
    let out = sb.firewall_allow(&job).unwrap();
    assert!(out.status.success(), "{}", integration::describe(&out));
    let conf = config_path(agent.pid());
    let base_conf: Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    // The NATS client the rules allow: a process in a child cgroup of the agent's.
    let nats_client = agent_cg.join("nats-client");
    nats_client.create().unwrap();
    // The agent's own sockets, as `ss` names its cgroup (relative to the cgroup2 mount).
    let mount = integration::cgroup2_mount().unwrap();
    let agent_rel = format!(
        "/{}",
        agent_cg.path().strip_prefix(&mount).unwrap().display()
    );
    let state0 = agent.state().unwrap();

    let monitor_log = sb.log_path("nft-monitor");
    let _monitor = sb
        .exec(["nft", "monitor"])
        .log(&monitor_log)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let base = kinds(&monitor_log).0;

    let stop = StopFile(
        std::env::temp_dir().join(format!("bosh-agent-atomicity-stop-{}", std::process::id())),
    );
    let _ = std::fs::remove_file(&stop.0);
    let storm = |cg: &integration::CgroupDir,
                 targets: &[&str],
                 threads: &str,
                 timeout: &str,
                 pause: &str,
                 label: &str| {
        sb.exec([
            sb.tools().netprobe.as_os_str(),
            OsStr::new("storm"),
            OsStr::new(&targets.join(",")),
            OsStr::new("--stop-file"),
            stop.0.as_os_str(),
            OsStr::new("--threads"),
            OsStr::new(threads),
            OsStr::new("--timeout-ms"),
            OsStr::new(timeout),
            OsStr::new("--pause-ms"),
            OsStr::new(pause),
        ])
        .cgroup(cg)
        .user(Some(NOBODY))
        .log(&sb.log_path(label))
        .spawn()
        .unwrap()
    };
    // Dropped SYNs cost the prober its timeout: short, and several threads.
    let mut prober_p = storm(
        &prober,
        &[MONIT_V4, MONIT_V6, NATS_A, NATS_B],
        "16",
        "50",
        "0",
        "prober",
    );
    // Paced (about 300 connections a second each): tens of thousands of closed connections
    // in a minute would exhaust the loopback ports held in TIME_WAIT and time out for that
    // reason.
    let mut allowed_p = storm(&job, &[MONIT_V4, MONIT_V6], "2", "2000", "5", "allowed");
    let mut nats_p = storm(&nats_client, &[NATS_A, NATS_B], "2", "2000", "5", "nats");

    let done = Arc::new(AtomicBool::new(false));
    let allows = Arc::new(AtomicU64::new(0));
    let reloads = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut kills = 0u32;
    std::thread::scope(|s| {
        for t in 0..loops {
            let (done, allows, sb) = (done.clone(), allows.clone(), &sb);
            s.spawn(move || {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let cg = sb.cgroup(&format!("loop{t}-{n}")).unwrap();
                    let out = sb.firewall_allow(&cg).unwrap();
                    assert!(out.status.success(), "{}", integration::describe(&out));
                    allows.fetch_add(1, Ordering::Relaxed);
                    // Gone: the agent prunes its rule at its next reconcile.
                    cg.remove().unwrap();
                    n += 1;
                }
            });
        }
        {
            let (done, reloads, sb, conf, base_conf) =
                (done.clone(), reloads.clone(), &sb, &conf, &base_conf);
            s.spawn(move || {
                let mut second = true;
                while !done.load(Ordering::Relaxed) {
                    std::fs::write(conf, variant(base_conf, second)).unwrap();
                    let out = sb
                        .agent_cmd(["firewall", "reload"])
                        .output(integration::COMMAND_TIMEOUT)
                        .unwrap();
                    assert!(out.status.success(), "{}", integration::describe(&out));
                    reloads.fetch_add(1, Ordering::Relaxed);
                    second = !second;
                }
            });
        }
        let done2 = done.clone();
        let dns = &dns;
        let probed = &probed;
        s.spawn(move || {
            let mut i = 0u32;
            while !done2.load(Ordering::Relaxed) {
                let extra = if i.is_multiple_of(2) {
                    "127.0.0.4"
                } else {
                    "127.0.0.5"
                };
                let mut ips = probed.clone();
                ips.push(extra.parse().unwrap());
                dns.point_all(DIRECTOR_NAME, &ips);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut last_kill = Instant::now();
        loop {
            let n = kinds(&monitor_log).0.total() - base.total();
            if n >= want || started.elapsed() > max {
                break;
            }
            if last_kill.elapsed() >= kill_every {
                // Only the agent's own connection: the allowed client's cgroup is a child.
                let out = sb
                    .exec([
                        "ss", "-K", "-tn", "cgroup", &agent_rel, "dport", "=", ":4222",
                    ])
                    .output(integration::COMMAND_TIMEOUT)
                    .unwrap();
                assert!(
                    out.status.success(),
                    "ss -K: {}",
                    integration::describe(&out)
                );
                // One line per socket closed, below the header (none while the agent is
                // still reconnecting).
                kills += String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("ESTAB"))
                    .count() as u32;
                last_kill = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done.store(true, Ordering::Relaxed);
    });
    let took = started.elapsed();
    std::fs::write(&stop.0, "").unwrap();
    let out_of = |p: &mut integration::Proc| {
        p.wait_timeout(Duration::from_secs(30)).unwrap();
        p.log_text()
    };
    let (p_out, a_out, n_out) = (
        out_of(&mut prober_p),
        out_of(&mut allowed_p),
        out_of(&mut nats_p),
    );
    // Settled: the last reconcile's prunes are in the log too.
    std::thread::sleep(Duration::from_millis(300));
    let (k, odd) = kinds(&monitor_log);
    let k = Kinds {
        allow: k.allow - base.allow,
        prune: k.prune - base.prune,
        nats_add: k.nats_add - base.nats_add,
        rebuild: k.rebuild - base.rebuild,
        other: k.other - base.other,
    };
    let state = agent.state().unwrap();
    let count = |st: &Value, key: &str| st[key].as_u64().unwrap_or(0);
    let reloaded = reloads.load(Ordering::Relaxed);
    let repairs = count(&state, "repairs") - count(&state0, "repairs");
    let nats_rebuilds = k.rebuild.saturating_sub(reloaded + repairs);
    let ([pa, pc, pr, pt, po], p_per) = counts(&p_out);
    let ([aa, ac, ar, at, ao], a_per) = counts(&a_out);
    let ([na, nc, nr, nt, no], n_per) = counts(&n_out);
    eprintln!(
        "ATOMICITY: {} transactions in {took:?}: {} firewall-allow, {} prune, {} NATS fast-path additions, {} full rebuilds ({reloaded} reloads, {nats_rebuilds} NATS rebuilds after a dial, {repairs} repairs), {} other; {} firewall-allow runs, {kills} NATS connections cut\n\
         prober: {pa} attempts, {pc} connected, {pt} timed out, {pr} refused, {po} other\n{}\
         allowed job (monit): {aa} attempts, {ac} connected, {ar} refused, {at} timed out, {ao} other\n{}\
         allowed NATS client (agent's child cgroup): {na} attempts, {nc} connected, {nr} refused, {nt} timed out, {no} other\n{}",
        k.total(),
        k.allow,
        k.prune,
        k.nats_add,
        k.rebuild,
        k.other,
        allows.load(Ordering::Relaxed),
        per_endpoint("prober", &p_per),
        per_endpoint("job", &a_per),
        per_endpoint("nats client", &n_per),
    );
    assert!(
        k.total() >= want,
        "only {} transactions in {took:?} (want {want})",
        k.total()
    );
    assert_eq!(k.other, 0, "an unexpected transaction: {odd:?}");
    assert_eq!(pc, 0, "the prober connected: {p_out}");
    assert_eq!(po, 0, "prober: {p_out}");
    assert_eq!(p_per.len(), 4, "{p_out}");
    assert!(p_per.iter().all(|(_, c)| c[0] > 0), "{p_out}");
    assert_eq!(ar + at + ao, 0, "the allowed job was refused: {a_out}");
    assert!(ac > 0);
    assert_eq!(
        nr + nt + no,
        0,
        "the allowed NATS client was refused: {n_out}"
    );
    assert!(n_per.iter().all(|(_, c)| c[1] > 0), "{n_out}");
    // Every kind of change happened, and every reload was applied and counted by the agent.
    assert!(
        reloaded > 0 && k.allow > 0 && k.nats_add > 0 && nats_rebuilds > 0,
        "{k:?}"
    );
    assert_eq!(
        count(&state, "reloads") - count(&state0, "reloads"),
        reloaded,
        "{state:#}"
    );
    assert_eq!(state["reload_error"], Value::Null, "{state:#}");
    drop(agent);
}
