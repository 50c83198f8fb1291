//! The atomicity probe: while the real agent's table changes as fast as the test can make it
//! change, a prober in a cgroup that is not allowed connects to monit (IPv4 and IPv6) as fast
//! as it can, and an allowed job does the same. Pass: not one connection for the prober, not
//! one refusal or timeout for the job. Every change is one nft transaction; the test counts
//! them from `nft monitor` ("new generation" lines) in its own network namespace, where
//! nothing else changes the ruleset.
//!
//! What changes the table meanwhile: `firewall-allow monit` from fresh cgroups in parallel
//! loops (each adds a job rule), the agent pruning the rules of those cgroups once they are
//! removed, and the agent rebuilding its NATS rules: the director's name is re-pointed between
//! 127.0.0.1 and 127.0.0.2 every 20 ms by dnsmasq and the nats-server is restarted every 2 s,
//! so each reconnect resolves the name afresh.
//!
//! Knobs: `ATOMICITY_TRANSACTIONS` (default 1000), `ATOMICITY_LOOPS` (parallel
//! `firewall-allow` loops, default 3), `ATOMICITY_MAX_SECONDS` (default 150: the run fails if
//! the transactions were not reached by then). Run as root:
//! `cargo test -p integration --test atomicity -- --nocapture` prints the counts.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use integration::crash::knob;
use integration::nats::*;
use integration::{MONIT_V4, MONIT_V6, NOBODY, Sandbox};

/// The stop file of the storms: under /tmp, so `nobody` can see it appear.
struct StopFile(PathBuf);

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn transactions(log: &std::path::Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("# new generation"))
        .count() as u64
}

/// `attempts=… connected=… refused=… timed_out=… other=…` as numbers.
fn counts(out: &str) -> [u64; 5] {
    let mut c = [0u64; 5];
    let line = out
        .lines()
        .find(|l| l.starts_with("attempts="))
        .unwrap_or_else(|| panic!("no counts in {out:?}"));
    for (i, part) in line.split_whitespace().enumerate().take(5) {
        c[i] = part
            .split_once('=')
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("bad count {part:?}"));
    }
    c
}

#[test]
fn no_connection_slips_through_and_none_is_refused_while_the_table_changes() {
    let want = knob("ATOMICITY_TRANSACTIONS", 1000);
    let loops = knob("ATOMICITY_LOOPS", 3);
    let max = Duration::from_secs(knob("ATOMICITY_MAX_SECONDS", 150));
    let sb = Sandbox::new("atomicity").unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").unwrap();
    let job = sb.cgroup("job").unwrap();
    let prober = sb.cgroup("prober").unwrap();
    let _l4 = sb.listen(MONIT_V4).unwrap();
    let _l6 = sb.listen(MONIT_V6).unwrap();
    let mut server = NatsServer::start(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None);
    let dns = Dns::start(&sb, DIRECTOR_NAME, "127.0.0.1".parse().unwrap());
    let agent = start_agent(
        &sb,
        &agent_cg,
        &settings(
            &[nats_url(&format!("{DIRECTOR_NAME}:4222"))],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
        true,
    );
    wait_endpoints(&sb, &[addr("127.0.0.1:4222")], Duration::from_secs(15));
    let out = sb.firewall_allow(&job).unwrap();
    assert!(out.status.success(), "{}", integration::describe(&out));

    let monitor_log = sb.log_path("nft-monitor");
    let _monitor = sb
        .exec(["nft", "monitor"])
        .log(&monitor_log)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let base = transactions(&monitor_log);

    let stop = StopFile(
        std::env::temp_dir().join(format!("bosh-agent-atomicity-stop-{}", std::process::id())),
    );
    let _ = std::fs::remove_file(&stop.0);
    let storm =
        |cg: &integration::CgroupDir, threads: &str, timeout: &str, pause: &str, label: &str| {
            sb.exec([
                sb.tools().netprobe.as_os_str(),
                OsStr::new("storm"),
                OsStr::new(&format!("{MONIT_V4},{MONIT_V6}")),
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
    let mut prober_p = storm(&prober, "16", "50", "0", "prober");
    // Paced (about 300 connections a second): tens of thousands of closed connections in a
    // minute would exhaust the loopback ports held in TIME_WAIT and time out for that reason.
    let mut allowed_p = storm(&job, "2", "2000", "5", "allowed");

    let done = Arc::new(AtomicBool::new(false));
    let allows = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
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
        let done2 = done.clone();
        let dns = &dns;
        s.spawn(move || {
            let mut i = 0u32;
            while !done2.load(Ordering::Relaxed) {
                let ip = if i.is_multiple_of(2) {
                    "127.0.0.2"
                } else {
                    "127.0.0.1"
                };
                dns.point(DIRECTOR_NAME, ip.parse().unwrap());
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut restarts = 0u32;
        let mut last_restart = Instant::now();
        loop {
            let n = transactions(&monitor_log) - base;
            if n >= want || started.elapsed() > max {
                break;
            }
            if last_restart.elapsed() > Duration::from_secs(2) {
                server.restart();
                restarts += 1;
                last_restart = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, Ordering::Relaxed);
        eprintln!("nats-server restarted {restarts} times");
    });
    let took = started.elapsed();
    let n = transactions(&monitor_log) - base;
    std::fs::write(&stop.0, "").unwrap();
    let p_out = {
        prober_p.wait_timeout(Duration::from_secs(30)).unwrap();
        prober_p.log_text()
    };
    let a_out = {
        allowed_p.wait_timeout(Duration::from_secs(30)).unwrap();
        allowed_p.log_text()
    };
    let [pa, pc, pr, pt, po] = counts(&p_out);
    let [aa, ac, ar, at, ao] = counts(&a_out);
    eprintln!(
        "ATOMICITY: {n} transactions in {took:?} ({} firewall-allow runs); prober: {pa} attempts, {pc} connected, {pt} timed out, {pr} refused, {po} other; allowed job: {aa} attempts, {ac} connected, {ar} refused, {at} timed out, {ao} other",
        allows.load(Ordering::Relaxed)
    );
    assert!(n >= want, "only {n} transactions in {took:?} (want {want})");
    assert_eq!(pc, 0, "the prober connected: {p_out}");
    assert_eq!(po, 0, "prober: {p_out}");
    assert!(pa > 0);
    assert_eq!(ar + at + ao, 0, "the allowed job was refused: {a_out}");
    assert!(ac > 0);
    drop(agent);
}
