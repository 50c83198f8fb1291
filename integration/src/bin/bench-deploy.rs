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

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blobstore::{Algorithm, Digest};
use integration::dav::DavServer;
use integration::monit::Monit;
use integration::nats::{Director, NATS_CN, NatsServer, Pki, agent_exec_with, nats_url, settings};
use integration::{Agent, READY_TIMEOUT, Sandbox};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

type Res<T> = Result<T, String>;

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
    install_cleanup_hooks();
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

fn env_num(key: &str, default: usize) -> Res<usize> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{key}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
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
    if !nix::unistd::geteuid().is_root() {
        return Err("run as root: it creates a network namespace and cgroups".into());
    }
    for (bin, pkg) in [
        (integration::nats::NATS_SERVER, "nats-server"),
        (integration::monit::MONIT_BIN, "monit"),
        ("/usr/bin/curl", "curl"),
    ] {
        if !Path::new(bin).is_file() {
            return Err(format!("{bin} is missing (apt-get install {pkg})"));
        }
    }
    integration::dav::check_nginx().map_err(|e| e.to_string())?;
    integration::check_prerequisites().map_err(|e| e.to_string())?;
    integration::Tools::get()
        .map_err(|e| format!("{e} (build with `cargo build --release -p cli -p integration`)"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cleanup when Drop cannot run (panic = abort in release; SIGINT/SIGTERM)

struct Registered {
    cgroup: PathBuf,
    netns: PathBuf,
    dirs: Vec<PathBuf>,
}

static SANDBOXES: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

fn register(sb: &Sandbox) {
    SANDBOXES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Registered {
            cgroup: sb.top_cgroup().path().to_path_buf(),
            netns: sb.netns().file().to_path_buf(),
            dirs: vec![sb.dir().to_path_buf()],
        });
}

/// Adds a directory (nginx's, which lives outside the sandbox's) to the emergency cleanup.
fn register_dir(dir: PathBuf) {
    if let Some(r) = SANDBOXES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .last_mut()
    {
        r.dirs.push(dir);
    }
}

fn unregister_all() {
    SANDBOXES.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Pids in a cgroup tree (all started here: the cgroups are this benchmark's own).
fn pids_below(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(t) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pids_below(&e.path(), out);
            }
        }
    }
}

/// Pids whose network namespace is the sandbox's (nginx and the curl pipelines run there
/// outside its cgroups); this process excluded.
fn pids_in_netns(netns_file: &Path) -> Vec<i32> {
    let Ok(ino) = fs::metadata(netns_file).map(|m| m.ino()) else {
        return Vec::new();
    };
    let want = format!("net:[{ino}]");
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid != me
                && fs::read_link(e.path().join("ns/net")).is_ok_and(|l| l.to_string_lossy() == want)
            {
                out.push(pid);
            }
        }
    }
    out
}

fn emergency_cleanup() {
    let list: Vec<Registered> =
        std::mem::take(&mut *SANDBOXES.lock().unwrap_or_else(|e| e.into_inner()));
    for r in list {
        let mut pids = Vec::new();
        pids_below(&r.cgroup, &mut pids);
        pids.extend(pids_in_netns(&r.netns));
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Err(e) = integration::remove_cgroup_tree(&r.cgroup) {
            eprintln!("bench-deploy: {e}");
        }
        let _ = nix::mount::umount2(&r.netns, nix::mount::MntFlags::MNT_DETACH);
        for d in &r.dirs {
            let _ = fs::remove_dir_all(d);
            eprintln!("bench-deploy: removed {}", d.display());
        }
    }
}

fn install_cleanup_hooks() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("bench-deploy: panicked; removing the sandbox before aborting");
        emergency_cleanup();
    }));
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let got = rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return false;
            };
            tokio::select! {
                _ = int.recv() => true,
                _ = term.recv() => true,
            }
        });
        if got {
            eprintln!("bench-deploy: interrupted; removing the sandbox");
            emergency_cleanup();
            std::process::exit(130);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn list(v: &[f64], prec: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.prec$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn first_line_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn run_ok(cmd: &mut Command, what: &str) -> Res<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn uuid() -> Res<String> {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("reading a uuid: {e}"))
}

fn sha1_hex(bytes: &[u8]) -> String {
    Digest::of(Algorithm::Sha1, bytes).hex
}

/// Removes `dir`'s entries (not `dir`).
fn empty_dir(dir: &Path) -> Res<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        let is_dir = fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        let r = if is_dir {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(|e| format!("removing {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Regular files below `dir` (symlinks not followed) and their total size.
fn count_files(dir: &Path) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                n += 1;
                bytes += m.len();
            }
        }
    }
    (n, bytes)
}

/// Flushes what the last run left dirty, so that its writeback does not land in the next
/// run (only this filesystem; nothing is dropped from the page cache).
fn sync_fs(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = nix::unistd::syncfs(&f);
    }
}

fn proc_status_kb(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process (its exited threads included), ms.
fn cpu_ms(pid: u32) -> f64 {
    let Ok(t) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some((_, rest)) = t.rsplit_once(')') else {
        return f64::NAN;
    };
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 13 {
        return f64::NAN;
    }
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as f64)
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0);
    (f[11] + f[12]) * 1000.0 / hz
}

/// CPU ms of this process's waited-for descendants so far (the shell pipelines).
fn children_cpu_ms() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                tv.tv_sec() as f64 * 1000.0 + tv.tv_usec() as f64 / 1000.0
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(f64::NAN)
}

/// Samples VmRSS/RssAnon of `pid` every [`RSS_POLL`] until stopped; returns the maxima (kB).
struct RssSampler {
    stop: std::sync::Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64)>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut rss, mut anon) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                rss = rss.max(proc_status_kb(pid, "VmRSS:"));
                anon = anon.max(proc_status_kb(pid, "RssAnon:"));
                std::thread::sleep(RSS_POLL);
            }
            (rss, anon)
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0))
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// The world: sandbox, nats-server, nginx, monit, the agent, the director

struct World {
    director: Director,
    agent: Agent,
    monit: Monit,
    dav: DavServer,
    nats: NatsServer,
    sb: Sandbox,
    ca_file: PathBuf,
}

impl World {
    fn new() -> Res<World> {
        let sb = Sandbox::new("bench-deploy").map_err(|e| format!("sandbox: {e}"))?;
        register(&sb);
        let pki = Pki::new("bench ca");
        let agent_cg = sb.cgroup("agent").map_err(|e| e.to_string())?;
        let nats = NatsServer::start_with(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None, "");
        let dav = DavServer::start_in(sb.netns().file()).map_err(|e| format!("nginx: {e}"))?;
        // nginx's directory: <dir>/store/<prefix>/<id>.
        if let Some(d) = dav
            .object_path("x")
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            register_dir(d.to_path_buf());
        }
        let base = sb.dir().join("base");
        let monit = Monit::prepare_with(
            &sb,
            &format!("include {}/monit/job/*.monitrc\n", base.display()),
        )
        .map_err(|e| e.to_string())?;
        let mut s = settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent"));
        s["env"]["bosh"]["blobstores"] = json!([dav.agent_blobstore()]);
        s["networks"] = json!({"default": {"type": "manual", "ip": "10.0.0.9",
            "netmask": "255.255.255.0", "default": ["dns", "gateway"]}});
        let exec = agent_exec_with(&sb, &agent_cg, &s, true, &json!({}));
        let mut agent = sb.spawn_agent(&exec).map_err(|e| e.to_string())?;
        agent.wait_ready(READY_TIMEOUT).map_err(|e| e.to_string())?;
        let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
        director.wait_pong(Duration::from_secs(15));
        let mut monit = monit;
        monit.start().map_err(|e| e.to_string())?;
        let ca_file = sb.dir().join("dav-ca.pem");
        fs::write(&ca_file, dav.ca_pem()).map_err(|e| format!("writing the CA: {e}"))?;
        Ok(World {
            director,
            agent,
            monit,
            dav,
            nats,
            sb,
            ca_file,
        })
    }

    fn base(&self) -> PathBuf {
        self.sb.dir().join("base")
    }

    /// The director's way with an asynchronous action, polling every [`TASK_POLL`]; returns
    /// the final `value` or the error.
    fn task(&self, method: &str, args: Value) -> Res<Value> {
        let first = self
            .director
            .call(method, args, 3, Duration::from_secs(10))?;
        let Some(id) = first["value"]["agent_task_id"].as_str().map(str::to_string) else {
            return first
                .get("value")
                .cloned()
                .ok_or_else(|| format!("{method}: {first}"));
        };
        let deadline = Instant::now() + TASK_LIMIT;
        loop {
            std::thread::sleep(TASK_POLL);
            let r = self
                .director
                .call("get_task", json!([id]), 3, Duration::from_secs(10))?;
            if r["value"]["state"] != "running" || r["value"]["agent_task_id"] != id.as_str() {
                return r.get("value").cloned().ok_or_else(|| {
                    format!(
                        "{method} failed: {r}\nagent log (tail):\n{}",
                        tail(&self.agent.log(), 15)
                    )
                });
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{method} task {id} still running after {TASK_LIMIT:?}"
                ));
            }
        }
    }

    fn url(&self, id: &str) -> String {
        format!(
            "{}/{}/{id}",
            self.dav.url(),
            &Digest::of(Algorithm::Sha1, id.as_bytes()).hex[..2]
        )
    }

    fn upload(&self, bytes: &[u8]) -> Res<String> {
        let id = uuid()?;
        self.dav.put_blob(&id, bytes).map_err(|e| e.to_string())?;
        Ok(id)
    }

    fn netns_arg(&self) -> String {
        format!("--net={}", self.sb.netns().file().display())
    }

    /// `sh -c script` in the sandbox's network namespace; returns the wall time.
    fn shell(&self, script: &str) -> Res<Duration> {
        let t0 = Instant::now();
        let out = Command::new("nsenter")
            .arg(self.netns_arg())
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("nsenter: {e}"))?;
        let took = t0.elapsed();
        if !out.status.success() {
            return Err(format!(
                "pipeline failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(took)
    }

    fn curl_auth(&self) -> String {
        let (user, password) = self.dav.write_user();
        format!(
            "--cacert '{}' -u '{user}:{password}'",
            self.ca_file.display()
        )
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Section 1: apply of a release of big packages

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Text,
    Random,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Text => "compressible (numbered text lines)",
            Variant::Random => "incompressible (/dev/urandom)",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Variant::Text => "text",
            Variant::Random => "rand",
        }
    }
}

struct Blob {
    name: String,
    id: String,
    sha1: String,
    size: u64,
}

/// Writes the package's files and packs them with the system's `tar -czf` (entries `./…`,
/// as the director's blobs); returns the tgz path.
fn make_package(dir: &Path, v: Variant, index: usize, bytes: usize) -> Res<(PathBuf, PathBuf)> {
    let root = dir.join(format!("{}{index}", v.prefix()));
    fs::create_dir_all(root.join("lib")).map_err(|e| format!("mkdir: {e}"))?;
    let per_file = bytes / FILES_PER_PACKAGE;
    let mut urandom = fs::File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    let mut chunk = vec![0u8; MIB];
    for f in 0..FILES_PER_PACKAGE {
        let path = root.join("lib").join(format!("part-{f:02}.bin"));
        let mut out = std::io::BufWriter::with_capacity(
            MIB,
            fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let mut left = per_file;
        let mut line_no = 0u64;
        while left > 0 {
            let n = match v {
                Variant::Random => {
                    let n = left.min(chunk.len());
                    urandom
                        .read_exact(&mut chunk[..n])
                        .map_err(|e| format!("/dev/urandom: {e}"))?;
                    out.write_all(&chunk[..n]).map(|()| n)
                }
                // Numbered lines: varying digits keep gzip from the ~1000:1 of a block
                // repeated verbatim, closer to real text.
                Variant::Text => {
                    let line = format!(
                        "{line_no:010} package {index} file {f}: deploy benchmark text, mostly the same words\n"
                    );
                    line_no += 1;
                    let n = line.len().min(left);
                    out.write_all(&line.as_bytes()[..n]).map(|()| n)
                }
            }
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
            left -= n;
        }
        out.flush()
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    fs::write(root.join("bin-version"), format!("{index}\n")).map_err(|e| e.to_string())?;
    let tgz = dir.join(format!("{}{index}.tgz", v.prefix()));
    Ok((root, tgz))
}

fn build_blobs(w: &World, v: Variant, k: &Knobs) -> Res<Vec<Blob>> {
    let gen_dir = w.sb.dir().join(format!("gen-{}", v.prefix()));
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let mut packs = Vec::new();
    for i in 0..k.packages {
        packs.push(make_package(&gen_dir, v, i, k.package_mb * MIB)?);
    }
    // The system's tar, all at once (gzip of random data is slow).
    let mut children = Vec::new();
    for (root, tgz) in &packs {
        children.push(
            Command::new("tar")
                .arg("-czf")
                .arg(tgz)
                .arg("-C")
                .arg(root)
                .arg(".")
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("tar: {e}"))?,
        );
    }
    for mut c in children {
        let st = c.wait().map_err(|e| format!("tar: {e}"))?;
        if !st.success() {
            return Err(format!("tar -czf failed: {st}"));
        }
    }
    let mut blobs = Vec::new();
    for (i, (_, tgz)) in packs.iter().enumerate() {
        let bytes = fs::read(tgz).map_err(|e| format!("{}: {e}", tgz.display()))?;
        let id = w.upload(&bytes)?;
        blobs.push(Blob {
            name: format!("{}{i}", v.prefix()),
            id,
            sha1: sha1_hex(&bytes),
            size: bytes.len() as u64,
        });
    }
    fs::remove_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    Ok(blobs)
}

fn tgz_of(dir: &Path, files: &[(&str, String, u32)]) -> Res<Vec<u8>> {
    let root = dir.join("root");
    for (path, body, mode) in files {
        let p = root.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        fs::write(&p, body).map_err(|e| e.to_string())?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(|e| e.to_string())?;
    }
    let out = dir.join("out.tgz");
    run_ok(
        Command::new("tar")
            .arg("-czf")
            .arg(&out)
            .arg("-C")
            .arg(&root)
            .arg("."),
        "tar -czf",
    )?;
    let bytes = fs::read(&out).map_err(|e| e.to_string())?;
    fs::remove_dir_all(&root).map_err(|e| e.to_string())?;
    fs::remove_file(&out).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The rendered templates archive: job `web` whose monit file watches a file (monit never
/// starts anything for it).
fn templates(w: &World) -> Res<(String, String)> {
    let dir = w.sb.dir().join("gen-templates");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let monit = format!(
        "check file bench_web with path {}/jobs/web/monit\n  group vcap\n",
        w.base().display()
    );
    let bytes = tgz_of(&dir, &[("web/monit", monit, 0o644)])?;
    fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
    let id = w.upload(&bytes)?;
    Ok((id, sha1_hex(&bytes)))
}

fn apply_spec(blobs: &[Blob], archive: &(String, String), config_hash: &str) -> Value {
    let packages: serde_json::Map<String, Value> = blobs
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                json!({"name": b.name, "version": "1", "sha1": b.sha1, "blobstore_id": b.id}),
            )
        })
        .collect();
    json!({
        "deployment": "bench", "name": "web", "index": 0, "id": "bench-web-0", "az": "z1",
        "job": {"name": "web", "template": "web", "version": "1",
                "templates": [{"name": "web", "version": "w1",
                               "sha1": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
                               "blobstore_id": "job-web-blob"}]},
        "packages": packages,
        "networks": {"default": {"type": "manual", "ip": "10.0.0.9", "netmask": "255.255.255.0",
                                 "default": ["dns", "gateway"]}},
        "configuration_hash": config_hash,
        "persistent_disk": 0,
        "dns_domain_name": "bosh",
        "rendered_templates_archive": {"blobstore_id": archive.0, "sha1": archive.1}
    })
}

#[derive(Default)]
struct AgentRuns {
    total_s: Vec<f64>,
    prepare_s: Vec<f64>,
    apply_s: Vec<f64>,
    cpu_s: Vec<f64>,
    peak_rss_kb: Vec<u64>,
    peak_anon_kb: Vec<u64>,
}

#[derive(Default)]
struct ShellRuns {
    wall_s: Vec<f64>,
    cpu_s: Vec<f64>,
}

/// Whether each of `dirs` holds a package's files (all of them, full size).
fn check_unpacked(dirs: &[PathBuf], k: &Knobs, what: &str) -> Res<()> {
    for d in dirs {
        let (n, bytes) = count_files(d);
        let want = (k.package_mb * MIB / FILES_PER_PACKAGE * FILES_PER_PACKAGE) as u64;
        if n != FILES_PER_PACKAGE + 1 || bytes < want {
            return Err(format!(
                "{what}: {} holds {n} files, {bytes} bytes (want {} files, ≥ {want} bytes)",
                d.display(),
                FILES_PER_PACKAGE + 1
            ));
        }
    }
    Ok(())
}

fn clear_agent_installs(w: &World) -> Res<()> {
    let base = w.base();
    for d in ["data/packages", "data/jobs", "packages", "jobs"] {
        empty_dir(&base.join(d))?;
    }
    Ok(())
}

fn run_agent(w: &World, spec: &Value, blobs: &[Blob], k: &Knobs, runs: &mut AgentRuns) -> Res<()> {
    clear_agent_installs(w)?;
    sync_fs(w.sb.dir());
    let pid = w.agent.pid();
    // "5" resets the peak RSS (VmHWM) to the current RSS.
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| format!("resetting VmHWM: {e}"))?;
    let sampler = RssSampler::start(pid);
    let cpu0 = cpu_ms(pid);
    let t0 = Instant::now();
    let prepared = w.task("prepare", json!([spec]))?;
    let t1 = Instant::now();
    let applied = w.task("apply", json!([spec]))?;
    let t2 = Instant::now();
    let cpu1 = cpu_ms(pid);
    let hwm = proc_status_kb(pid, "VmHWM:");
    let (rss, anon) = sampler.finish();
    if prepared != json!("prepared") || applied != json!("applied") {
        return Err(format!("prepare → {prepared}, apply → {applied}"));
    }
    let dirs: Vec<PathBuf> = blobs
        .iter()
        .map(|b| w.base().join("packages").join(&b.name))
        .map(|link| fs::canonicalize(&link).unwrap_or(link))
        .collect();
    check_unpacked(&dirs, k, "this agent")?;
    runs.total_s.push((t2 - t0).as_secs_f64());
    runs.prepare_s.push((t1 - t0).as_secs_f64());
    runs.apply_s.push((t2 - t1).as_secs_f64());
    runs.cpu_s.push((cpu1 - cpu0) / 1000.0);
    runs.peak_rss_kb.push(rss.max(hwm));
    runs.peak_anon_kb.push(anon);
    clear_agent_installs(w)?;
    Ok(())
}

fn fresh_dirs(root: &Path, n: usize) -> Res<Vec<PathBuf>> {
    if root.exists() {
        fs::remove_dir_all(root).map_err(|e| e.to_string())?;
    }
    (0..n)
        .map(|i| {
            let d = root.join(format!("{i}"));
            fs::create_dir_all(&d)
                .map(|()| d)
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Runs one parallel pipeline per blob (`line(i, blob, dir)`) in one shell and waits for all.
fn run_shell(
    w: &World,
    root: &Path,
    blobs: &[Blob],
    k: &Knobs,
    what: &str,
    line: impl Fn(usize, &Blob, &Path) -> String,
    runs: &mut ShellRuns,
) -> Res<()> {
    let dirs = fresh_dirs(root, blobs.len())?;
    sync_fs(w.sb.dir());
    let mut script = String::from("fail=0\n");
    for (i, (b, d)) in blobs.iter().zip(&dirs).enumerate() {
        script.push_str(&format!("( {} ) & p{i}=$!\n", line(i, b, d)));
    }
    for i in 0..blobs.len() {
        script.push_str(&format!("wait $p{i} || fail=1\n"));
    }
    script.push_str("exit $fail\n");
    let c0 = children_cpu_ms();
    let took = w.shell(&script).map_err(|e| format!("{what}: {e}"))?;
    let c1 = children_cpu_ms();
    check_unpacked(&dirs, k, what)?;
    runs.wall_s.push(took.as_secs_f64());
    runs.cpu_s.push((c1 - c0) / 1000.0);
    fs::remove_dir_all(root).map_err(|e| e.to_string())?;
    Ok(())
}

struct VariantResult {
    variant: Variant,
    tgz_total: u64,
    a: AgentRuns,
    b: ShellRuns,
    c: ShellRuns,
}

fn apply_variant(w: &World, v: Variant, k: &Knobs) -> Res<VariantResult> {
    eprintln!(
        "bench-deploy: building {} packages of {} MB, {}",
        k.packages,
        k.package_mb,
        v.label()
    );
    let blobs = build_blobs(w, v, k)?;
    let archive = templates(w)?;
    let tgz_total = blobs.iter().map(|b| b.size).sum();
    let (mut a, mut b, mut c) = (
        AgentRuns::default(),
        ShellRuns::default(),
        ShellRuns::default(),
    );
    let auth = w.curl_auth();
    let b_root = w.sb.dir().join("limit");
    let c_root = w.sb.dir().join("upstream");
    let c_files = w.sb.dir().join("upstream-downloads");
    // A warm-up of each, so that nginx's and the page cache's first touch is in no figure.
    let mut warm_a = AgentRuns::default();
    let mut warm_s = ShellRuns::default();
    let curl_tar = |_: usize, blob: &Blob, d: &Path| {
        format!(
            "curl -s {auth} '{}' | tar -xz -C '{}'",
            w.url(&blob.id),
            d.display()
        )
    };
    let upstream = |i: usize, blob: &Blob, d: &Path| {
        let f = c_files.join(format!("{i}.tgz"));
        let f = f.display();
        format!(
            "curl -s {auth} -o '{f}' '{}' && [ \"$(sha1sum '{f}' | cut -c1-40)\" = {} ] \
             && tar --no-same-owner -xzf '{f}' -C '{}' && rm -f '{f}'",
            w.url(&blob.id),
            blob.sha1,
            d.display()
        )
    };
    fs::create_dir_all(&c_files).map_err(|e| e.to_string())?;
    eprintln!("bench-deploy: warm-up");
    run_agent(
        w,
        &apply_spec(&blobs, &archive, "warm"),
        &blobs,
        k,
        &mut warm_a,
    )?;
    run_shell(w, &b_root, &blobs, k, "curl | tar", curl_tar, &mut warm_s)?;
    run_shell(w, &c_root, &blobs, k, "upstream", upstream, &mut warm_s)?;
    for round in 0..k.rounds {
        eprintln!("bench-deploy: {} round {}", v.prefix(), round + 1);
        // The order turns each round so that drift on a shared machine hits all alike.
        for step in 0..3 {
            match (round + step) % 3 {
                0 => {
                    let spec = apply_spec(&blobs, &archive, &format!("cfg-{round}"));
                    run_agent(w, &spec, &blobs, k, &mut a)?;
                }
                1 => run_shell(w, &b_root, &blobs, k, "curl | tar", curl_tar, &mut b)?,
                _ => run_shell(w, &c_root, &blobs, k, "upstream", upstream, &mut c)?,
            }
        }
    }
    fs::remove_dir_all(&c_files).map_err(|e| e.to_string())?;
    for blob in &blobs {
        let _ = fs::remove_file(w.dav.object_path(&blob.id));
    }
    Ok(VariantResult {
        variant: v,
        tgz_total,
        a,
        b,
        c,
    })
}

fn print_apply(results: &[VariantResult], k: &Knobs) {
    println!(
        "\n## Apply of {} packages × {} MB from the nginx DAV blobstore (TLS, Basic auth), cold; median of {} rounds, interleaved (s)\n",
        k.packages, k.package_mb, k.rounds
    );
    println!(
        "A = this agent, `prepare` then `apply` (first request → `apply`'s task result; `env.bosh.parallel` 5); \
         B = the limit, `curl -s | tar -xz` per blob, all at once, verifying nothing; \
         C = upstream's pipeline: `curl -o` file, `sha1sum` it, `tar --no-same-owner -xzf`, remove the file, per blob, all at once. \
         Blobs page-cache warm in nginx's store for all three.\n"
    );
    println!(
        "| variant (tgz total) | A: prepare + apply | A: prepare / apply | B: limit | C: upstream pipeline | speed relative to the limit B/A (target ≥ 0.85) | B / A's prepare alone | C/A (target ≥ 1.3) | C / A's prepare alone | A peak RSS (target ≤ 32 MB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let (a, p, ap, b, c) = (
            median(&r.a.total_s),
            median(&r.a.prepare_s),
            median(&r.a.apply_s),
            median(&r.b.wall_s),
            median(&r.c.wall_s),
        );
        let peak = r.a.peak_rss_kb.iter().copied().max().unwrap_or(0);
        println!(
            "| {} ({:.1} MB) | {a:.3} | {p:.3} / {ap:.3} | {b:.3} | {c:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} MB |",
            r.variant.label(),
            r.tgz_total as f64 / 1e6,
            b / a,
            b / p,
            c / a,
            c / p,
            mb(peak)
        );
    }
    println!(
        "\n| variant | samples A (total; prepare) | samples B | samples C | CPU s (user + sys), median: A agent / B pipelines / C pipelines | A peak RSS per run (VmHWM) / peak RssAnon sampled |"
    );
    println!("|---|---|---|---|---|---|");
    for r in results {
        let hwm: Vec<String> =
            r.a.peak_rss_kb
                .iter()
                .map(|kb| format!("{:.1}", mb(*kb)))
                .collect();
        let anon: Vec<String> =
            r.a.peak_anon_kb
                .iter()
                .map(|kb| format!("{:.1}", mb(*kb)))
                .collect();
        println!(
            "| {} | {}; {} | {} | {} | {:.2} / {:.2} / {:.2} | {} / {} MB |",
            r.variant.prefix(),
            list(&r.a.total_s, 3),
            list(&r.a.prepare_s, 3),
            list(&r.b.wall_s, 3),
            list(&r.c.wall_s, 3),
            median(&r.a.cpu_s),
            median(&r.b.cpu_s),
            median(&r.c.cpu_s),
            hwm.join(", "),
            anon.join(", ")
        );
    }
    println!(
        "\n`apply` after `prepare` installs nothing: it enables, writes the monit file and reloads monit; the agent \
         confirms the reload by monit's incarnation, checked every 100 ms. B and C do no such step.\n"
    );
    println!(
        "CPU of B and C counts curl, tar, gzip and sha1sum (waited-for children); nginx's CPU (TLS) is in none of the columns. The agent's CPU is 10 ms ticks."
    );
}

// ---------------------------------------------------------------------------------------------
// Section 2: compile_package

struct CompileRun {
    wall: f64,
    before: f64,
    packaging: f64,
    after: f64,
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn compile_section(w: &World, k: &Knobs) -> Res<Vec<(String, Vec<CompileRun>)>> {
    let stamps = w.sb.dir().join("stamps");
    fs::create_dir_all(&stamps).map_err(|e| e.to_string())?;
    let gen_dir = w.sb.dir().join("gen-compile");
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let payload: String = (0..2000)
        .map(|i| format!("{i:06} payload line of the small package\n"))
        .collect();
    let mut out = Vec::new();
    for (label, extra) in [
        ("copy a 76 kB file", ""),
        ("copy a 76 kB file + `sleep 0.2`", "sleep 0.2\n"),
    ] {
        let packaging = format!(
            "set -e\n\
             date +%s.%N > {s}/start\n\
             cp payload.txt \"$BOSH_INSTALL_TARGET/\"\n\
             {extra}\
             date +%s.%N > {s}/end\n",
            s = stamps.display()
        );
        let src = tgz_of(
            &gen_dir,
            &[
                ("packaging", packaging, 0o644),
                ("payload.txt", payload.clone(), 0o644),
            ],
        )?;
        let sha = sha1_hex(&src);
        let mut runs = Vec::new();
        // One unmeasured run first, as for the apply.
        for n in 0..=k.compile_runs {
            let id = w.upload(&src)?;
            let version = format!("{}.{n}", if extra.is_empty() { 1 } else { 2 });
            let t0 = epoch_now();
            let v = w.task("compile_package", json!([id, sha, "small", version, {}]))?;
            let t1 = epoch_now();
            if v["result"]["blobstore_id"].as_str().is_none() {
                return Err(format!("compile_package → {v}"));
            }
            let read = |f: &str| -> Res<f64> {
                fs::read_to_string(stamps.join(f))
                    .map_err(|e| format!("stamp {f}: {e}"))?
                    .trim()
                    .parse()
                    .map_err(|e| format!("stamp {f}: {e}"))
            };
            let (s, e) = (read("start")?, read("end")?);
            if n > 0 {
                runs.push(CompileRun {
                    wall: t1 - t0,
                    before: s - t0,
                    packaging: e - s,
                    after: t1 - e,
                });
            }
            let _ = fs::remove_file(w.dav.object_path(&id));
        }
        out.push((label.to_string(), runs));
    }
    fs::remove_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    Ok(out)
}

fn print_compile(results: &[(String, Vec<CompileRun>)]) {
    println!(
        "\n## `compile_package` of a small package (median of {} runs after one unmeasured; ms)\n",
        results.first().map_or(0, |r| r.1.len())
    );
    println!(
        "`packaging` = between the script's first and last `date` (its own timestamps); before = from the request to that first \
         `date` (fetch + unpack of the source, `bash -x packaging` started); after = from the last `date` to the task result seen \
         by the director (the script's exit, `tar -czf` of the compiled package, sha1, PUT to nginx, `get_task` polled every {} ms).\n",
        TASK_POLL.as_millis()
    );
    println!(
        "| package | agent wall, whole task (min–max) | inside `packaging` | before packaging | after packaging | agent's own share (wall − packaging) |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, runs) in results {
        let col = |f: fn(&CompileRun) -> f64| -> Vec<f64> {
            runs.iter().map(|r| f(r) * 1000.0).collect()
        };
        let wall = col(|r| r.wall);
        let s = sorted(&wall);
        println!(
            "| {label} | {:.1} ({:.1}–{:.1}) | {:.1} | {:.1} | {:.1} | {:.1} |",
            median(&wall),
            s.first().copied().unwrap_or(f64::NAN),
            s.last().copied().unwrap_or(f64::NAN),
            median(&col(|r| r.packaging)),
            median(&col(|r| r.before)),
            median(&col(|r| r.after)),
            median(&col(|r| r.wall - r.packaging)),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Machine facts

fn disk_of(dir: &Path) -> String {
    let fs_line = Command::new("df")
        .arg("--output=source,fstype")
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".into());
    let dev = fs_line
        .split_whitespace()
        .next()
        .and_then(|s| s.strip_prefix("/dev/"))
        .unwrap_or("")
        .to_string();
    let sys = Path::new("/sys/block").join(&dev);
    let rot = fs::read_to_string(sys.join("queue/rotational"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let vendor = fs::read_to_string(sys.join("device/vendor"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kind = if vendor == "0x1af4" {
        "virtio-blk (medium behind it unknown)".to_string()
    } else if vendor.is_empty() {
        "unknown".to_string()
    } else {
        format!("vendor {vendor}")
    };
    format!("{fs_line}, {kind}, rotational flag {rot}")
}

fn facts(w: &World) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| {
        flags
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|x| x == f))
    };
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1048576.0)
        });
    let agent = &w.sb.tools().agent;
    let agent_size = fs::metadata(agent).map(|m| m.len()).unwrap_or(0);
    println!("## bench-deploy — machine\n");
    println!("| fact | value |");
    println!("|---|---|");
    println!(
        "| date (UTC) | {} |",
        first_line_of("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    println!("| nproc | {} |", first_line_of("nproc", &[]));
    println!(
        "| CPU | {cpu} (sha_ni: {}, avx2: {}) |",
        if has("sha_ni") { "yes" } else { "no" },
        if has("avx2") { "yes" } else { "no" }
    );
    println!("| memory | {mem} |");
    println!("| kernel | {} |", first_line_of("uname", &["-r"]));
    println!(
        "| disk of the sandbox (and nginx's store) | {} |",
        disk_of(w.sb.dir())
    );
    println!(
        "| load average at start | {} |",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "| agent binary | {} ({:.1} MB) |",
        agent.display(),
        agent_size as f64 / 1e6
    );
    println!(
        "| nginx | {} |",
        first_line_of(integration::dav::NGINX, &["-v"])
    );
    println!("| curl | {} |", first_line_of("curl", &["--version"]));
    println!(
        "| tar / gzip | {} / {} |",
        first_line_of("tar", &["--version"]),
        first_line_of("gzip", &["--version"])
    );
    println!(
        "| nats-server | {} |",
        first_line_of(integration::nats::NATS_SERVER, &["--version"])
    );
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
