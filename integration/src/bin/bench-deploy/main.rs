//! `bench-deploy`: what a deploy costs on the VM, the real `bosh-agent` (the release binary
//! next to this one) against real parts in a throw-away [`Sandbox`] (network namespace +
//! cgroups): nats-server with mutual TLS, monit, and Debian's nginx as the director's DAV
//! blobstore (TLS, Basic auth). Nothing on the host is touched: every process runs in the
//! sandbox's namespace, every file under temporary directories.
//!
//! 1. A release of `BENCH_PACKAGES` (5) packages of `BENCH_PACKAGE_MB` (50) MB each, cold
//!    (nothing installed), in two variants: compressible text and incompressible bytes from
//!    /dev/urandom. The package tgz blobs are made once with the system's `tar -czf` and
//!    written into nginx's store under UUIDs with sha1 digests. Three ways to get them onto
//!    the disk, interleaved round by round after one warm-up run of each (`BENCH_ROUNDS`, 3;
//!    medians):
//!    - (A) this agent: the director simulator sends `prepare`, then `apply` (a spec with
//!      `configuration_hash`, one job whose monit file is a `check file` that never starts
//!      anything, so `apply` includes the monit reload it confirms); from the first request
//!      to `apply`'s task result, polling `get_task` every 5 ms; the agent's peak RSS
//!      (VmRSS sampled every 10 ms, and VmHWM reset before the run through
//!      `/proc/<pid>/clear_refs` and read after it);
//!    - (B) the limit: `curl -s | tar -xz` per blob, all at once, verifying nothing;
//!    - (C) upstream's pipeline with the tools it runs: per blob, `curl -o` to a file,
//!      `sha1sum` of the file compared with the digest, `tar --no-same-owner -xzf` into the
//!      target, the file removed; all at once.
//!
//!    Targets are cleared (and the filesystem synced) between runs, outside the timing. Page
//!    caches are not dropped (that would touch the whole machine): the blobs are page-cache
//!    warm in nginx's store for all three, which read them through the same nginx.
//! 2. `compile_package` of a small package whose `packaging` copies a file, and of one that
//!    also sleeps 0.2 s: the agent's wall time for the whole task beside the time inside
//!    `packaging` (timestamps the script writes).
//!
//! Not a test: it asserts nothing beyond checking that every run installed what it should;
//! prints markdown tables (progress on stderr). Needs root, nats-server, monit, nginx, curl
//! and the binaries of `cargo build --release -p cli -p integration`. On a panic (the release
//! profile aborts, so no `Drop` runs) or SIGINT/SIGTERM, the processes of the sandbox (its
//! cgroups and its network namespace, all started here) are killed by pid and its
//! directories removed before the process ends.
#![forbid(unsafe_code)]

mod apply;
mod compile;
mod facts;
mod files;
mod release;
mod world;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blobstore::{Algorithm, Digest};
use integration::bench::cleanup::{
    emergency_cleanup, install_hooks, register, register_dir, unregister_all,
};
use integration::bench::procfs::{RssSampler, children_cpu_ms, mb, status_kb as proc_status_kb};
use integration::bench::stats::{list, median, sorted};
use integration::bench::{Res, env_num, first_line_of, tail};
use integration::dav::DavServer;
use integration::monit::Monit;
use integration::nats::{Director, NATS_CN, NatsServer, Pki, agent_exec_with, nats_url, settings};
use integration::{Agent, READY_TIMEOUT, Sandbox};
use serde_json::{Value, json};

use apply::*;
use compile::*;
use facts::*;
use files::*;
use release::*;
use world::*;

const AGENT_SIDE: &str = "127.0.0.1:4222";
const DIRECTOR_SIDE: &str = "127.0.0.3:4222";
/// How often the simulated director asks `get_task` (the real one: every second or so; a
/// fine poll keeps the quantisation of the figures small).
const TASK_POLL: Duration = Duration::from_millis(5);
/// How often the agent's VmRSS is sampled during a run.
const RSS_POLL: Duration = Duration::from_millis(10);
const TASK_LIMIT: Duration = Duration::from_secs(600);
/// Files per package: a package is rarely one file, and per-file costs (create, chmod,
/// utimes) are part of unpacking.
const FILES_PER_PACKAGE: usize = 10;
const MIB: usize = 1024 * 1024;

fn main() -> ExitCode {
    install_hooks("bench-deploy");
    let t0 = Instant::now();
    let res = run();
    match res {
        Ok(()) => {
            println!(
                "\nbench-deploy: total runtime {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-deploy: {e}");
            emergency_cleanup();
            ExitCode::FAILURE
        }
    }
}

struct Knobs {
    rounds: usize,
    packages: usize,
    package_mb: usize,
    compile_runs: usize,
}

/// utime + stime of a process (its exited threads included), ms; NaN when unreadable.
fn cpu_ms(pid: u32) -> f64 {
    integration::bench::procfs::cpu_ms(pid).map_or(f64::NAN, |(own, _)| own)
}

fn knobs() -> Res<Knobs> {
    Ok(Knobs {
        rounds: env_num("BENCH_ROUNDS", 3)?.max(1),
        packages: env_num("BENCH_PACKAGES", 5)?.max(1),
        package_mb: env_num("BENCH_PACKAGE_MB", 50)?.max(1),
        compile_runs: env_num("BENCH_COMPILE_RUNS", 5)?.max(1),
    })
}

fn prerequisites() -> Res<()> {
    integration::dav::check_nginx().map_err(|e| e.to_string())?;
    integration::bench::prerequisites(
        "it creates a network namespace and cgroups",
        &[
            (integration::nats::NATS_SERVER, "nats-server"),
            (integration::monit::MONIT_BIN, "monit"),
            ("/usr/bin/curl", "curl"),
        ],
    )
}

fn run() -> Res<()> {
    prerequisites()?;
    let k = knobs()?;
    let w = World::new()?;
    facts(&w);
    let mut results = Vec::new();
    for v in [Variant::Text, Variant::Random] {
        results.push(apply_variant(&w, v, &k)?);
    }
    print_apply(&results, &k);
    eprintln!("bench-deploy: compile_package");
    let compiled = compile_section(&w, &k)?;
    print_compile(&compiled);
    let World {
        director,
        mut agent,
        mut monit,
        dav,
        mut nats,
        sb,
        ca_file: _,
    } = w;
    drop(director);
    agent
        .stop()
        .map_err(|e| format!("stopping the agent: {e}"))?;
    drop(agent);
    monit.stop();
    drop(monit);
    drop(dav);
    nats.stop();
    drop(nats);
    drop(sb);
    unregister_all();
    Ok(())
}
