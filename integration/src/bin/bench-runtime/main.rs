//! `bench-runtime`: the whole agent (the release `bosh-agent` next to this binary) measured
//! against real `nats-server`s with mutual TLS, inside throw-away [`Sandbox`]es (network
//! namespace + cgroups; the host's ruleset and processes are never touched):
//!
//! 1. exec → subscribed: from spawning the agent to the first `ping` answered (the director
//!    pings every 2 ms), NATS firewall on and off, first boot (no table) and restart (table
//!    left by the previous run), interleaved round by round;
//! 2. steady state: RSS (VmRSS, RssAnon) and CPU (utime + stime) of an idle, connected agent
//!    with the default heartbeat and reconcile intervals (30 s), NATS firewall on;
//! 3. `ping` round trip through nats-server, sequential and with requests in flight, beside a
//!    bare NATS echo responder on the same path (the floor the agent adds to);
//! 4. failover: the director's name re-pointed to a second server of the
//!    cluster and the first stopped (hot standby), and the same with the new server coming up
//!    only after an outage (from its "Server is ready" to the agent answering again).
//!
//! Not a test: it asserts nothing and prints markdown tables (progress goes to stderr).
//! Knobs (environment): `BENCH_IDLE_SECONDS` (60), `BENCH_STARTS` (15 per condition),
//! `BENCH_PINGS` (2000), `BENCH_FAILOVER_RUNS` (7 per scenario), `BENCH_OUTAGE_SECONDS`
//! (outages of the cold failover, comma-separated, "1,4"), `BENCH_SECTIONS` (which to run,
//! comma-separated among `starts,steady,failover`; all by default), `BENCH_SHOW_LOG=1` (print
//! the agent's log of every start to stderr: its timestamps show where start-up time goes).
//!
//! Needs root, nft, nats-server, dnsmasq and the binaries of `cargo build --release -p cli -p
//! integration`. On a panic (the release profile aborts, so no `Drop` runs) or SIGINT/SIGTERM,
//! the processes inside the sandboxes' cgroups (all started here) are killed by pid and the
//! sandboxes removed before the process ends.
#![forbid(unsafe_code)]

mod agent;
mod client;
mod facts;
mod failover;
mod server;
mod starts;
mod steady;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use integration::bench::cleanup::{Guarded, install_hooks};
use integration::bench::procfs::{cpu_ms, mem, sched_ms};
use integration::bench::stats::{med_range, ms, pct, sorted};
use integration::bench::{Res, env_num, first_line_of, tail};
use integration::nats::{
    AGENT_ID, DIRECTOR_NAME, DNSMASQ, Dns, InNetns, NATS_CN, NATS_SERVER, Pki, SandboxDns,
    nats_url, settings,
};
use integration::{Agent, CgroupDir, Exec, Sandbox};
use serde_json::{Value, json};

use agent::*;
use client::*;
use facts::*;
use failover::*;
use server::*;
use starts::*;
use steady::*;

/// How often the director pings while waiting for the agent to (re)subscribe.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Bound on one start or one failover.
const PONG_LIMIT: Duration = Duration::from_secs(20);
/// Bound on one reply in the round-trip runs (a longer silence counts the request as lost).
const REPLY_LIMIT: Duration = Duration::from_secs(2);
/// A connection that lasted this long resets the agent's backoff (its `stable_after` is 1 s):
/// a director's connection normally lasts long, so failovers start from that state.
const STABLE: Duration = Duration::from_millis(1500);
/// Where the director and the echo responder dial: an address no agent URL names.
const DIRECTOR_SIDE: &str = "127.0.0.3:4222";
/// What the agent dials in the single-server sandbox.
const AGENT_SIDE: &str = "127.0.0.1:4222";
/// The bare responder's subject.
const ECHO_SUBJECT: &str = "agent.bench-echo";
/// In-flight requests of the throughput runs.
const CONCURRENCY: [usize; 4] = [1, 16, 64, 256];
/// Requests per throughput run.
const BURST: usize = 4000;

/// kB as "x.y MB".
fn mb(kb: u64) -> String {
    format!("{:.1} MB", integration::bench::procfs::mb(kb))
}

fn main() -> ExitCode {
    install_hooks("bench-runtime");
    let t0 = Instant::now();
    let res = run();
    let total = t0.elapsed();
    match res {
        Ok(()) => {
            println!(
                "\nbench-runtime: total runtime {:.1} s",
                total.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Knobs {
    idle: Duration,
    starts: usize,
    pings: usize,
    failover_runs: usize,
    outages: Vec<Duration>,
    sections: Vec<String>,
    show_log: bool,
}

impl Knobs {
    fn runs(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}

fn knobs() -> Res<Knobs> {
    let outages = match std::env::var("BENCH_OUTAGE_SECONDS") {
        Ok(v) => v
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("BENCH_OUTAGE_SECONDS={v:?}: {s:?} is not seconds"))
            })
            .collect::<Res<Vec<_>>>()?,
        Err(_) => vec![Duration::from_secs(1), Duration::from_secs(4)],
    };
    Ok(Knobs {
        idle: Duration::from_secs_f64(env_num("BENCH_IDLE_SECONDS", 60.0f64)?.max(1.0)),
        starts: env_num("BENCH_STARTS", 15usize)?.max(1),
        pings: env_num("BENCH_PINGS", 2000usize)?.max(10),
        failover_runs: env_num("BENCH_FAILOVER_RUNS", 7usize)?.max(1),
        outages,
        sections: {
            let all = ["starts", "steady", "failover"];
            let v: Vec<String> = std::env::var("BENCH_SECTIONS")
                .unwrap_or_else(|_| all.join(","))
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if let Some(bad) = v.iter().find(|s| !all.contains(&s.as_str())) {
                return Err(format!(
                    "BENCH_SECTIONS: unknown section {bad:?} (known: {all:?})"
                ));
            }
            v
        },
        show_log: std::env::var("BENCH_SHOW_LOG").is_ok_and(|v| v == "1"),
    })
}

fn prerequisites() -> Res<()> {
    integration::bench::prerequisites(
        "it creates network namespaces and cgroups and runs the agent's firewall",
        &[(NATS_SERVER, "nats-server"), (DNSMASQ, "dnsmasq")],
    )
}

fn run() -> Res<()> {
    prerequisites()?;
    let k = knobs()?;
    facts()?;
    let pki = Pki::new("bench ca");
    if k.runs("starts") || k.runs("steady") {
        single_server_sections(&pki, &k)?;
    }
    if k.runs("failover") {
        failover_section(&pki, &k)?;
    }
    Ok(())
}
