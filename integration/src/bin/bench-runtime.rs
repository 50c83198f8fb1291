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

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use integration::nats::{
    AGENT_ID, DIRECTOR_NAME, DNSMASQ, Dns, InNetns, NATS_CN, NATS_PASSWORD, NATS_SERVER, NATS_USER,
    Pki, nats_url, settings,
};
use integration::{Agent, CgroupDir, Exec, Proc, Sandbox};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

type Res<T> = Result<T, String>;

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

fn main() -> ExitCode {
    install_cleanup_hooks();
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

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> Res<T> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{key}={v:?} is not a number")),
        Err(_) => Ok(default),
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
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "run as root: it creates network namespaces and cgroups and runs the agent's firewall"
                .into(),
        );
    }
    for (bin, pkg) in [(NATS_SERVER, "nats-server"), (DNSMASQ, "dnsmasq")] {
        if !Path::new(bin).is_file() {
            return Err(format!("{bin} is missing (apt-get install {pkg})"));
        }
    }
    integration::check_prerequisites().map_err(|e| e.to_string())?;
    integration::Tools::get()
        .map_err(|e| format!("{e} (build with `cargo build --release -p cli -p integration`)"))?;
    Ok(())
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

// ---------------------------------------------------------------------------------------------
// Cleanup when Drop cannot run (panic = abort in release; SIGINT/SIGTERM)

struct Registered {
    cgroup: PathBuf,
    netns: PathBuf,
    dir: PathBuf,
}

static SANDBOXES: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// A sandbox known to the emergency cleanup while it lives.
struct Guarded(Sandbox);

impl Guarded {
    fn new(name: &str) -> Res<Self> {
        let sb = Sandbox::new(name).map_err(|e| format!("sandbox {name}: {e}"))?;
        SANDBOXES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Registered {
                cgroup: sb.top_cgroup().path().to_path_buf(),
                netns: sb.netns().file().to_path_buf(),
                dir: sb.dir().to_path_buf(),
            });
        Ok(Guarded(sb))
    }
}

impl std::ops::Deref for Guarded {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let cg = self.0.top_cgroup().path().to_path_buf();
        SANDBOXES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| r.cgroup != cg);
    }
}

/// Pids in a cgroup tree (all of them started by this benchmark: the cgroups are its own).
fn pids_below(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(t) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pids_below(&e.path(), out);
            }
        }
    }
}

fn emergency_cleanup() {
    let list: Vec<Registered> =
        std::mem::take(&mut *SANDBOXES.lock().unwrap_or_else(|e| e.into_inner()));
    for r in list {
        let mut pids = Vec::new();
        pids_below(&r.cgroup, &mut pids);
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Err(e) = integration::remove_cgroup_tree(&r.cgroup) {
            eprintln!("bench-runtime: {e}");
        }
        let _ = nix::mount::umount2(&r.netns, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&r.dir);
        eprintln!("bench-runtime: removed sandbox {}", r.dir.display());
    }
}

fn install_cleanup_hooks() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("bench-runtime: panicked; removing the sandboxes before aborting");
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
            eprintln!("bench-runtime: interrupted; removing the sandboxes");
            emergency_cleanup();
            std::process::exit(130);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Small statistics and /proc readers

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

/// Nearest-rank percentile (`p` in 0..=1) of a sorted slice.
fn pct(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = (p * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "median (min–max)" in ms with `prec` decimals, or why there is none.
fn med_range(v: &[f64], prec: usize) -> String {
    if v.is_empty() {
        return "no sample".into();
    }
    let s = sorted(v);
    format!(
        "{:.prec$} ({:.prec$}–{:.prec$})",
        pct(&s, 0.5),
        s[0],
        s[s.len() - 1]
    )
}

#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss_kb: u64,
    anon_kb: u64,
    file_kb: u64,
    shmem_kb: u64,
    hwm_kb: u64,
    threads: u64,
}

fn mem(pid: u32) -> Res<Mem> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |k: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok(Mem {
        rss_kb: field("VmRSS:"),
        anon_kb: field("RssAnon:"),
        file_kb: field("RssFile:"),
        shmem_kb: field("RssShmem:"),
        hwm_kb: field("VmHWM:"),
        threads: field("Threads:"),
    })
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// CPU time in ms: (the process's own utime + stime, its waited-for children's).
fn cpu_ms(pid: u32) -> Res<(f64, f64)> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let rest = t
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat: no ')'"))?;
    // Fields after the command: state(3) ... utime(14) stime(15) cutime(16) cstime(17).
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 15 {
        return Err(format!("/proc/{pid}/stat: too few fields"));
    }
    let hz = clock_ticks();
    Ok(((f[11] + f[12]) * 1000.0 / hz, (f[13] + f[14]) * 1000.0 / hz))
}

/// On-CPU time in ms of the process's live threads, from the scheduler's nanosecond clock
/// (`/proc/<pid>/task/*/schedstat`): precise where utime/stime count 10 ms ticks, but blind
/// to threads that have exited, so only for short windows.
fn sched_ms(pid: u32) -> Res<f64> {
    let dir = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut ns = 0u64;
    for e in rd.flatten() {
        if let Ok(t) = std::fs::read_to_string(e.path().join("schedstat")) {
            ns += t
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e6)
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as f64)
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Machine facts

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

/// Median wall time of `argv` from spawn to reaped, over `n` runs (blocking wait, no polling).
fn spawn_wait_median(mut make: impl FnMut() -> Command, n: usize) -> Res<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cmd = make();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let t = Instant::now();
        let st = cmd
            .spawn()
            .and_then(|mut c| c.wait())
            .map_err(|e| format!("spawn: {e}"))?;
        v.push(ms(t.elapsed()));
        if !st.success() {
            return Err(format!("{cmd:?} failed: {st}"));
        }
    }
    Ok(pct(&sorted(&v), 0.5))
}

fn facts() -> Res<()> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mount = integration::cgroup2_mount().map_err(|e| e.to_string())?;
    let layout = if mount.ends_with("unified") {
        "hybrid (cgroup2 at /sys/fs/cgroup/unified)"
    } else {
        "unified (cgroup2 at /sys/fs/cgroup)"
    };
    let tools = integration::Tools::get().map_err(|e| e.to_string())?;
    let size = std::fs::metadata(&tools.agent).map_or(0, |m| m.len());
    let true_ms = spawn_wait_median(|| Command::new("/bin/true"), 21)?;
    println!("\n## bench-runtime: the whole agent against real nats-server — machine\n");
    println!("| fact | value |");
    println!("|---|---|");
    println!(
        "| date (UTC) | {} |",
        first_line_of("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    println!("| nproc | {nproc} |");
    println!("| CPU | {cpu} |");
    println!("| kernel | {} |", read("/proc/sys/kernel/osrelease").trim());
    println!("| nft | {} |", first_line_of("nft", &["--version"]));
    println!(
        "| nats-server | {} |",
        first_line_of(NATS_SERVER, &["--version"])
    );
    println!("| cgroups | {layout} |");
    println!(
        "| load average at start | {} |",
        read("/proc/loadavg").trim()
    );
    println!(
        "| agent binary | {} ({:.1} MB) |",
        tools.agent.display(),
        size as f64 / 1e6
    );
    println!(
        "| `/bin/true` spawn → reaped, median of 21 (noise reference; ~4 ms where the Go figures were taken) | {true_ms:.2} ms |"
    );
    println!(
        "\nThe Go agent's figures are from shared/reference/go-agent-baseline.md (another machine of the same \
         kind, 2 vCPU, Linux 6.18); they were not re-measured here."
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// nats-server (Result-returning, with a precise "ready" instant)

struct Server {
    label: String,
    conf: PathBuf,
    dir: PathBuf,
    cgroup: CgroupDir,
    netns: PathBuf,
    proc: Option<Proc>,
    spawns: usize,
    started: Option<Instant>,
}

impl Server {
    /// Writes the configuration (TLS `verify: true`, user/password, optional cluster) for a
    /// server on `listen`; does not start it.
    fn new(
        sb: &Sandbox,
        pki: &Pki,
        label: &str,
        listen: &str,
        cluster: Option<(String, Vec<String>)>,
    ) -> Res<Self> {
        let dir = sb.dir().join(format!("nats-{label}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let leaf = pki.server(NATS_CN);
        let write = |name: &str, text: &str| -> Res<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
            Ok(p)
        };
        let ca = write("ca.pem", &pki.ca_pem)?;
        let cert = write("server.pem", &leaf.cert_pem)?;
        let key = write("server.key", &leaf.key_pem)?;
        let mut conf = format!(
            "listen: \"{listen}\"\n\
             authorization {{ user: \"{NATS_USER}\", password: \"{NATS_PASSWORD}\" }}\n\
             tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
            cert.display(),
            key.display(),
            ca.display()
        );
        if let Some((route_listen, routes)) = cluster {
            let routes: Vec<String> = routes
                .iter()
                .map(|r| format!("\"nats-route://{r}\""))
                .collect();
            conf.push_str(&format!(
                "cluster {{\n  name: \"bosh\"\n  listen: \"{route_listen}\"\n  no_advertise: true\n  routes: [{}]\n}}\n",
                routes.join(", ")
            ));
        }
        let conf = write("nats.conf", &conf)?;
        Ok(Server {
            label: label.to_string(),
            conf,
            dir,
            cgroup: sb.cgroup("nats").map_err(|e| e.to_string())?,
            netns: sb.netns().file().to_path_buf(),
            proc: None,
            spawns: 0,
            started: None,
        })
    }

    fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// Spawns the server with a fresh log, without waiting.
    fn spawn(&mut self) -> Res<()> {
        self.spawns += 1;
        let log = self.dir.join(format!("nats-{}.log", self.spawns));
        let argv = [
            NATS_SERVER.to_string(),
            "-c".to_string(),
            self.conf.display().to_string(),
        ];
        let p = Exec::new(argv)
            .netns(&self.netns)
            .cgroup(&self.cgroup)
            .log(&log)
            .spawn()
            .map_err(|e| format!("nats-server {}: {e}", self.label))?;
        self.proc = Some(p);
        self.started = Some(Instant::now());
        Ok(())
    }

    /// The instant its log says "Server is ready" (checked every millisecond).
    fn wait_ready(&mut self) -> Res<Instant> {
        let label = self.label.clone();
        let p = self
            .proc
            .as_mut()
            .ok_or_else(|| format!("nats-server {label} is not running"))?;
        let path = p
            .log_path()
            .map(Path::to_path_buf)
            .ok_or("nats-server without a log")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("Server is ready") {
                return Ok(Instant::now());
            }
            if let Some(st) = p.try_status().map_err(|e| e.to_string())? {
                return Err(format!(
                    "nats-server {label} exited ({st}): {}",
                    tail(&text, 10)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server {label} not ready in 10 s: {}",
                    tail(&text, 10)
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn start(&mut self) -> Res<()> {
        self.spawn()?;
        self.wait_ready().map(drop)
    }

    /// SIGTERM, then waits for the exit (checked every millisecond); returns when it exited.
    fn stop(&mut self) -> Res<Instant> {
        let Some(mut p) = self.proc.take() else {
            return Ok(Instant::now());
        };
        p.signal(Signal::SIGTERM).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if p.try_status().map_err(|e| e.to_string())?.is_some() {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                return Err(format!("nats-server {} did not stop in 10 s", self.label));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NATS clients of the benchmark: the director and a bare echo responder

/// An mTLS NATS client on a thread inside the sandbox's network namespace (its sockets belong
/// to this process's cgroup, never to the agent's).
struct Client {
    ns: InNetns,
    client: async_nats::Client,
}

fn nats_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The get_state burst after the ping runs.
const GET_STATE_BURST: usize = 12_000;

fn ping_body(reply_to: &str) -> Vec<u8> {
    request_body("ping", reply_to)
}

fn request_body(method: &str, reply_to: &str) -> Vec<u8> {
    json!({"method": method, "arguments": [], "reply_to": reply_to, "protocol": 3})
        .to_string()
        .into_bytes()
}

fn is_pong(payload: &[u8]) -> bool {
    serde_json::from_slice::<Value>(payload).ok() == Some(json!({"value": "pong"}))
}

fn fresh_subject(client: &async_nats::Client, prefix: &str) -> String {
    format!(
        "{prefix}.{}",
        client.new_inbox().trim_start_matches("_INBOX.")
    )
}

struct Series {
    lat_us: Vec<f64>,
    lost: usize,
    bad: usize,
    elapsed: Duration,
}

impl Client {
    fn connect(sb: &Sandbox, pki: &Pki, name: &str, to: &str) -> Res<Self> {
        let ns = InNetns::new(sb.netns().file());
        let leaf = pki.client(name);
        let cert = mbus::CertKeyPair {
            ca: pki.ca_pem.clone(),
            certificate: leaf.cert_pem,
            private_key: leaf.key_pem,
            origin: "bench",
        };
        let url = format!("tls://{to}");
        let client = ns
            .run(Duration::from_secs(15), move || async move {
                let tls = mbus::tls::client_config(&cert).map_err(nats_err)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let res = async_nats::ConnectOptions::new()
                        .require_tls(true)
                        .tls_client_config(tls.clone())
                        .user_and_password(NATS_USER.into(), NATS_PASSWORD.into())
                        .ignore_discovered_servers()
                        .connection_timeout(Duration::from_secs(2))
                        .connect(url.clone())
                        .await;
                    match res {
                        Ok(c) => return Ok(c),
                        Err(e) if Instant::now() >= deadline => {
                            return Err(format!("cannot connect to {url}: {e}"));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
            .and_then(|r| r)?;
        Ok(Client { ns, client })
    }

    /// Answers every ping on [`ECHO_SUBJECT`] as the agent would (JSON in, JSON out), from a
    /// task on this client's thread.
    fn serve_echo(&self) -> Res<()> {
        let client = self.client.clone();
        self.ns
            .run(Duration::from_secs(10), move || async move {
                let mut sub = client.subscribe(ECHO_SUBJECT).await.map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                tokio::spawn(async move {
                    let pong = json!({"value": "pong"}).to_string().into_bytes();
                    while let Some(m) = sub.next().await {
                        let Ok(req) = serde_json::from_slice::<Value>(&m.payload) else {
                            continue;
                        };
                        if let Some(to) = req["reply_to"].as_str() {
                            let _ = client.publish(to.to_string(), pong.clone().into()).await;
                        }
                    }
                });
                Ok(())
            })
            .and_then(|r| r)
    }

    /// Runs `trigger` while pinging the agent every [`POLL_EVERY`]; returns its result, the
    /// instant just before it ran, and the instant the first pong arrived (if any within
    /// `limit`). Only replies to pings sent after the call began count.
    fn pong_around<X>(
        &self,
        limit: Duration,
        trigger: impl FnOnce() -> Res<X>,
    ) -> Res<(X, Instant, Option<Instant>)> {
        let (ready_tx, ready_rx) = std_mpsc::channel::<()>();
        let client = self.client.clone();
        let ns = &self.ns;
        std::thread::scope(|s| {
            let poller = s.spawn(move || {
                ns.run(limit + Duration::from_secs(5), move || {
                    poll_pong(client, ready_tx, limit)
                })
                .and_then(|r| r)
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|e| format!("the ping poller did not start: {e}"))?;
            let t0 = Instant::now();
            let x = trigger();
            let got = poller
                .join()
                .map_err(|_| "the ping poller panicked".to_string())?;
            Ok((x?, t0, got?))
        })
    }

    /// The first pong to pings sent every [`POLL_EVERY`] from now on.
    fn next_pong(&self, limit: Duration) -> Res<Option<Instant>> {
        self.pong_around(limit, || Ok(())).map(|(_, _, t)| t)
    }

    /// `n` sequential pings to `target`, each waiting for its reply.
    fn sequential(&self, target: &str, n: usize) -> Res<Series> {
        let target = target.to_string();
        let client = self.client.clone();
        self.ns
            .run(Duration::from_secs(600), move || async move {
                let reply_to = fresh_subject(&client, "director");
                let mut sub = client.subscribe(reply_to.clone()).await.map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                let body = ping_body(&reply_to);
                let (mut lat_us, mut lost, mut bad) = (Vec::with_capacity(n), 0, 0);
                let start = Instant::now();
                for _ in 0..n {
                    let t = Instant::now();
                    client
                        .publish(target.clone(), body.clone().into())
                        .await
                        .map_err(nats_err)?;
                    match tokio::time::timeout(REPLY_LIMIT, sub.next()).await {
                        Ok(Some(m)) => {
                            lat_us.push(t.elapsed().as_secs_f64() * 1e6);
                            if !is_pong(&m.payload) {
                                bad += 1;
                            }
                        }
                        Ok(None) => return Err("reply subscription closed".to_string()),
                        Err(_) => lost += 1,
                    }
                }
                Ok(Series {
                    lat_us,
                    lost,
                    bad,
                    elapsed: start.elapsed(),
                })
            })
            .and_then(|r| r)
    }

    /// `total` pings to `target` with `concurrency` in flight (a new one sent as each reply
    /// arrives); stops early if no reply arrives for [`REPLY_LIMIT`].
    fn burst(&self, target: &str, concurrency: usize, total: usize) -> Res<Series> {
        self.burst_of(target, "ping", concurrency, total)
    }

    /// [`Self::burst`] of any method without arguments; a reply counts when it is the
    /// method's value (`"pong"` for ping, any `value` otherwise).
    fn burst_of(
        &self,
        target: &str,
        method: &str,
        concurrency: usize,
        total: usize,
    ) -> Res<Series> {
        let target = target.to_string();
        let method = method.to_string();
        let client = self.client.clone();
        self.ns
            .run(Duration::from_secs(600), move || async move {
                let prefix = fresh_subject(&client, "director.tp");
                let mut sub = client
                    .subscribe(format!("{prefix}.*"))
                    .await
                    .map_err(nats_err)?;
                client.flush().await.map_err(nats_err)?;
                let bodies: Vec<Vec<u8>> = (0..total)
                    .map(|i| request_body(&method, &format!("{prefix}.{i}")))
                    .collect();
                let mut sent: Vec<Option<Instant>> = vec![None; total];
                let (mut lat_us, mut bad, mut next, mut done) =
                    (Vec::with_capacity(total), 0, 0usize, 0usize);
                let start = Instant::now();
                while next < concurrency.min(total) {
                    sent[next] = Some(Instant::now());
                    client
                        .publish(target.clone(), bodies[next].clone().into())
                        .await
                        .map_err(nats_err)?;
                    next += 1;
                }
                while done < total {
                    match tokio::time::timeout(REPLY_LIMIT, sub.next()).await {
                        Ok(Some(m)) => {
                            let idx = m
                                .subject
                                .rsplit('.')
                                .next()
                                .and_then(|x| x.parse::<usize>().ok());
                            let Some(t0) = idx.and_then(|i| sent.get_mut(i)?.take()) else {
                                bad += 1;
                                continue;
                            };
                            lat_us.push(t0.elapsed().as_secs_f64() * 1e6);
                            let good = if method == "ping" {
                                is_pong(&m.payload)
                            } else {
                                serde_json::from_slice::<Value>(&m.payload)
                                    .is_ok_and(|v| v.get("value").is_some())
                            };
                            if !good {
                                bad += 1;
                            }
                            done += 1;
                            if next < total {
                                sent[next] = Some(Instant::now());
                                client
                                    .publish(target.clone(), bodies[next].clone().into())
                                    .await
                                    .map_err(nats_err)?;
                                next += 1;
                            }
                        }
                        Ok(None) => return Err("reply subscription closed".to_string()),
                        Err(_) => break,
                    }
                }
                Ok(Series {
                    lat_us,
                    lost: total - done,
                    bad,
                    elapsed: start.elapsed(),
                })
            })
            .and_then(|r| r)
    }
}

async fn poll_pong(
    client: async_nats::Client,
    ready: std_mpsc::Sender<()>,
    limit: Duration,
) -> Res<Option<Instant>> {
    let reply_to = fresh_subject(&client, "director");
    let mut sub = client.subscribe(reply_to.clone()).await.map_err(nats_err)?;
    client.flush().await.map_err(nats_err)?;
    let _ = ready.send(());
    let body = ping_body(&reply_to);
    let target = format!("agent.{AGENT_ID}");
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            m = sub.next() => {
                let at = Instant::now();
                return match m {
                    Some(m) if is_pong(&m.payload) => Ok(Some(at)),
                    Some(m) => Err(format!(
                        "ping answered with {:?}",
                        String::from_utf8_lossy(&m.payload)
                    )),
                    None => Err("reply subscription closed".into()),
                };
            }
            _ = tick.tick() => {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                client
                    .publish(target.clone(), body.clone().into())
                    .await
                    .map_err(nats_err)?;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

/// settings.json and resolv.conf in the sandbox; agent.json per start.
struct AgentFiles {
    settings: PathBuf,
    resolv: PathBuf,
}

impl AgentFiles {
    fn write(sb: &Sandbox, settings: &Value) -> Res<Self> {
        let s = sb.dir().join("settings.json");
        let text = serde_json::to_vec_pretty(settings).map_err(|e| e.to_string())?;
        std::fs::write(&s, text).map_err(|e| format!("{}: {e}", s.display()))?;
        let r = sb.dir().join("resolv.conf");
        std::fs::write(&r, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            .map_err(|e| format!("{}: {e}", r.display()))?;
        Ok(AgentFiles {
            settings: s,
            resolv: r,
        })
    }

    /// The start command: agent.json with only the NATS firewall switch and the settings
    /// source (heartbeat and reconcile intervals at their defaults, 30 s).
    fn exec(&self, sb: &Sandbox, cg: &CgroupDir, nats_firewall: bool) -> Res<Exec> {
        let config = json!({
            "Platform": {"Linux": {"EnableNATSFirewall": nats_firewall}},
            "Infrastructure": {"Settings": {"Sources": [
                {"Type": "File", "SettingsPath": self.settings.display().to_string()}]}}
        });
        Ok(sb
            .agent_exec(cg, &config.to_string())
            .map_err(|e| e.to_string())?
            .env("BOSH_AGENT_RESOLV_CONF", &self.resolv))
    }
}

/// Starts the agent and returns it once it answers a ping, with the time from its exec. The
/// wrapper that places it in `cg` is held until the placement is done and only then released
/// into the agent: the clock starts at the release, as for the Go agent's figure (moving a
/// process between cgroups can take 20 ms while the kernel waits for an RCU grace period, and
/// a service manager does it before the exec, not the agent).
fn start_until_pong(
    sb: &Sandbox,
    director: &Client,
    exec: &Exec,
    cg: &CgroupDir,
) -> Res<(Agent, Duration)> {
    let mut agent = sb
        .spawn_agent(&exec.clone().held())
        .map_err(|e| e.to_string())?;
    let placed = agent
        .proc_mut()
        .wait_in_cgroup(cg, Duration::from_secs(5))
        .map_err(|e| e.to_string());
    let res = placed.and_then(|()| {
        director.pong_around(PONG_LIMIT, || {
            agent.proc_mut().release().map_err(|e| e.to_string())
        })
    });
    match res {
        Ok(((), t0, Some(t))) => Ok((agent, t.saturating_duration_since(t0))),
        Ok((_, _, None)) => {
            let _ = agent.stop();
            Err(format!(
                "the agent did not answer a ping within {PONG_LIMIT:?}; its log:\n{}",
                tail(&agent.log(), 25)
            ))
        }
        Err(e) => {
            let _ = agent.stop();
            Err(e)
        }
    }
}

/// Median of release → exit of `true` behind the same wrappers (nsenter, placement shell),
/// placement excluded as in [`start_until_pong`].
fn wrappers_median(sb: &Sandbox, cg: &CgroupDir, n: usize) -> Res<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut p = sb
            .exec(["true"])
            .cgroup(cg)
            .held()
            .spawn()
            .map_err(|e| e.to_string())?;
        p.wait_in_cgroup(cg, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        p.release().map_err(|e| e.to_string())?;
        p.wait().map_err(|e| e.to_string())?;
        v.push(ms(t.elapsed()));
    }
    Ok(pct(&sorted(&v), 0.5))
}

/// A first boot: no table (a reboot flushed it) and an empty run directory (tmpfs).
fn first_boot(sb: &Sandbox) -> Res<()> {
    let _ = sb.nft(["delete", "table", "inet", "bosh_agent"]);
    if let Ok(rd) = std::fs::read_dir(sb.run_dir()) {
        for e in rd.flatten() {
            let p = e.path();
            let res = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sections 1–3: one nats-server, the director and the echo responder on 127.0.0.3

struct StartCond {
    name: &'static str,
    go: &'static str,
    nats_firewall: bool,
    first_boot: bool,
    took_ms: Vec<f64>,
    cpu_ms: Vec<f64>,
    children_ms: Vec<f64>,
    failures: usize,
}

/// exec → subscribed under four conditions, interleaved round by round.
fn exec_section(
    sb: &Sandbox,
    files: &AgentFiles,
    director: &Client,
    agent_cg: &CgroupDir,
    launch_cg: &CgroupDir,
    k: &Knobs,
) -> Res<()> {
    let cond = |name, go, nats_firewall, first_boot| StartCond {
        name,
        go,
        nats_firewall,
        first_boot,
        took_ms: vec![],
        cpu_ms: vec![],
        children_ms: vec![],
        failures: 0,
    };
    let mut conds = [
        cond(
            "NATS firewall on, first boot (no table)",
            "27.5 (first boot, with its firewall)",
            true,
            true,
        ),
        cond(
            "NATS firewall on, restart (table left by the previous run)",
            "40.1 (with its firewall)",
            true,
            false,
        ),
        cond(
            "NATS firewall off (monit firewall only), first boot",
            "19.3 (16.3–29.7) without any firewall",
            false,
            true,
        ),
        cond(
            "NATS firewall off (monit firewall only), restart",
            "19.3 (16.3–29.7) without any firewall",
            false,
            false,
        ),
    ];
    eprintln!(
        "bench-runtime: exec → subscribed, {} rounds x {} conditions",
        k.starts,
        conds.len()
    );
    let mut failures = 0usize;
    'rounds: for round in 0..k.starts {
        // Fixed order inside a round: each restart follows a first boot of the same kind.
        for c in conds.iter_mut() {
            if c.first_boot {
                first_boot(sb)?;
            }
            let exec = files.exec(sb, agent_cg, c.nats_firewall)?;
            match start_until_pong(sb, director, &exec, agent_cg) {
                Ok((mut agent, took)) => {
                    c.took_ms.push(ms(took));
                    if k.show_log {
                        let spawned = std::time::SystemTime::now() - took;
                        let since = spawned
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        eprintln!(
                            "--- {} ({:.1} ms; spawned at {}.{:06} s past the minute)\n{}",
                            c.name,
                            ms(took),
                            since.as_secs() % 60,
                            since.subsec_micros(),
                            agent.log()
                        );
                    }
                    if let (Ok(own), Ok((_, children))) =
                        (sched_ms(agent.pid()), cpu_ms(agent.pid()))
                    {
                        c.cpu_ms.push(own);
                        c.children_ms.push(children);
                    }
                    agent
                        .stop()
                        .map_err(|e| format!("stopping the agent: {e}"))?;
                }
                Err(e) => {
                    c.failures += 1;
                    failures += 1;
                    eprintln!("bench-runtime: round {round}, {}: {e}", c.name);
                    if failures >= 3 {
                        eprintln!("bench-runtime: 3 failed starts; giving up on this section");
                        break 'rounds;
                    }
                }
            }
        }
    }
    let wrappers = wrappers_median(sb, launch_cg, k.starts.max(11))?;
    println!(
        "\n## exec → subscribed (exec, after the cgroup placement, to the first `ping` answered; pings every {} ms; {} rounds, interleaved; ms)\n",
        POLL_EVERY.as_millis(),
        k.starts
    );
    println!(
        "| condition | this agent: median (min–max) | CPU until then, median: own (schedstat) + `nft` children (10 ms ticks) | failed | Go agent (doc), median |"
    );
    println!("|---|---|---|---|---|");
    for c in &conds {
        let (cpu, children) = (sorted(&c.cpu_ms), sorted(&c.children_ms));
        println!(
            "| {} | {} | {:.1} + {:.0} ms | {} | {} |",
            c.name,
            med_range(&c.took_ms, 1),
            pct(&cpu, 0.5),
            pct(&children, 0.5),
            c.failures,
            c.go
        );
    }
    println!(
        "| launch wrappers alone (release → `true` exited, placement done before), included above | {wrappers:.1} | — | — | — |"
    );
    Ok(())
}

fn single_server_sections(pki: &Pki, k: &Knobs) -> Res<()> {
    let sb = Guarded::new("bench-runtime")?;
    let agent_cg = sb.cgroup("agent").map_err(|e| e.to_string())?;
    let launch_cg = sb.cgroup("launch").map_err(|e| e.to_string())?;
    let mut server = Server::new(&sb, pki, "main", "0.0.0.0:4222", None)?;
    server.start()?;
    let director = Client::connect(&sb, pki, "director", DIRECTOR_SIDE)?;
    let echo = Client::connect(&sb, pki, "echo", DIRECTOR_SIDE)?;
    echo.serve_echo()?;
    let files = AgentFiles::write(
        &sb,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent")),
    )?;

    if k.runs("starts") {
        exec_section(&sb, &files, &director, &agent_cg, &launch_cg, k)?;
    }
    if !k.runs("steady") {
        return Ok(());
    }

    // --- steady state: a fresh agent, firewall on, default intervals, nobody talking to it
    eprintln!(
        "bench-runtime: steady state, {:.0} s idle",
        k.idle.as_secs_f64()
    );
    first_boot(&sb)?;
    let exec = files.exec(&sb, &agent_cg, true)?;
    let (mut agent, took) = start_until_pong(&sb, &director, &exec, &agent_cg)?;
    let pid = agent.pid();
    let connected = Instant::now();
    let spawned = connected - took;
    let cpu_start = cpu_ms(pid)?;
    let sched_start = sched_ms(pid)?;
    std::thread::sleep(
        (spawned + Duration::from_secs(3)).saturating_duration_since(Instant::now()),
    );
    let mem3 = mem(pid)?;
    std::thread::sleep((connected + k.idle).saturating_duration_since(Instant::now()));
    let idle_for = connected.elapsed();
    let cpu_end = cpu_ms(pid)?;
    let mem_idle = mem(pid)?;
    let idle_own = cpu_end.0 - cpu_start.0;
    let idle_children = cpu_end.1 - cpu_start.1;

    // --- ping round trips on the same agent, beside the bare echo responder
    eprintln!(
        "bench-runtime: ping round trips ({} sequential, then {:?} in flight)",
        k.pings, CONCURRENCY
    );
    let agent_subject = format!("agent.{AGENT_ID}");
    let agent_subject = agent_subject.as_str();
    director.sequential(agent_subject, 200)?;
    director.sequential(ECHO_SUBJECT, 200)?;
    let blocks = 8usize;
    let per = k.pings.div_ceil(blocks);
    let (mut seq_agent, mut seq_echo) = (Vec::new(), Vec::new());
    let (mut lost_agent, mut lost_echo, mut bad) = (0, 0, 0);
    let mut agent_cpu = 0.0;
    let mut agent_wall = Duration::ZERO;
    for _ in 0..blocks {
        let c0 = sched_ms(pid)?;
        let s = director.sequential(agent_subject, per)?;
        let c1 = sched_ms(pid)?;
        agent_cpu += c1 - c0;
        agent_wall += s.elapsed;
        seq_agent.extend(s.lat_us);
        lost_agent += s.lost;
        bad += s.bad;
        let e = director.sequential(ECHO_SUBJECT, per)?;
        seq_echo.extend(e.lat_us);
        lost_echo += e.lost;
        bad += e.bad;
    }
    let mut bursts = Vec::new();
    for &c in &CONCURRENCY {
        let a = director.burst(agent_subject, c, BURST)?;
        let e = director.burst(ECHO_SUBJECT, c, BURST)?;
        bad += a.bad + e.bad;
        bursts.push((c, a, e));
    }
    let mem_load = mem(pid)?;
    // Then a burst of get_state, which reads the spec and monit's status for every request:
    // what the agent holds on to afterwards is what a flood of heavier requests leaves
    // behind. monit starts only now (with the monit.user the agent wrote at boot), so the
    // figures above have no monit in them, as before.
    eprintln!("bench-runtime: {GET_STATE_BURST} get_state, 16 in flight");
    let mut monit = integration::monit::Monit::prepare(&sb).map_err(|e| e.to_string())?;
    monit.start().map_err(|e| e.to_string())?;
    let gs = director.burst_of(agent_subject, "get_state", 16, GET_STATE_BURST)?;
    bad += gs.bad;
    std::thread::sleep(Duration::from_secs(2));
    let mem_gs = mem(pid)?;
    monit.stop();
    agent
        .stop()
        .map_err(|e| format!("stopping the agent: {e}"))?;
    drop(agent);

    println!(
        "\n## Steady state (NATS firewall on, heartbeat and reconcile every 30 s, connected and idle for {:.0} s)\n",
        idle_for.as_secs_f64()
    );
    println!("| figure | this agent | target | Go agent (doc) |");
    println!("|---|---|---|---|");
    println!(
        "| VmRSS 3 s after exec | {} | — | 17.3 MB |",
        mb(mem3.rss_kb)
    );
    println!(
        "| VmRSS after {:.0} s connected | {} | ≤ 8 MB | 17.6 MB at 90 s |",
        idle_for.as_secs_f64(),
        mb(mem_idle.rss_kb)
    );
    println!(
        "| RssAnon / RssFile / RssShmem | {} / {} / {} | — | 2.7 MB anonymous |",
        mb(mem_idle.anon_kb),
        mb(mem_idle.file_kb),
        mb(mem_idle.shmem_kb)
    );
    println!(
        "| VmHWM (peak RSS so far) / threads | {} / {} | — | — |",
        mb(mem_idle.hwm_kb),
        mem_idle.threads
    );
    println!(
        "| CPU (utime + stime) while idle, {:.0} s | {:.0} ms (≈ {:.1} ms per 90 s) | — | ~20 ms over 90 s |",
        idle_for.as_secs_f64(),
        idle_own,
        idle_own * 90.0 / idle_for.as_secs_f64()
    );
    println!(
        "| CPU of its children (`nft`) in the same window | {idle_children:.0} ms | — | — (Go uses netlink, no children) |"
    );
    println!(
        "| CPU from exec to subscribed | {sched_start:.1} ms own (schedstat) + {:.0} ms children (`nft`) | — | — |",
        cpu_start.1
    );
    println!(
        "| VmRSS / VmHWM after the ping runs below | {} / {} | — | — |",
        mb(mem_load.rss_kb),
        mb(mem_load.hwm_kb)
    );
    println!(
        "| VmRSS / VmHWM 2 s after {GET_STATE_BURST} get_state, 16 in flight ({:.0}/s, {} lost) | {} / {} | — | — |",
        gs.lat_us.len() as f64 / gs.elapsed.as_secs_f64(),
        gs.lost,
        mb(mem_gs.rss_kb),
        mb(mem_gs.hwm_kb)
    );

    println!(
        "\n## `ping` through nats-server (director → nats-server → responder → nats-server → director; µs)\n"
    );
    println!(
        "The bare echo responder is an async-nats client in this process that decodes the request and \
         publishes `{{\"value\":\"pong\"}}` to its `reply_to`: the path without the agent. Sequential runs \
         are interleaved in {blocks} blocks.\n"
    );
    println!("| figure | this agent | bare NATS echo | Go agent |");
    println!("|---|---|---|---|");
    let (sa, se) = (sorted(&seq_agent), sorted(&seq_echo));
    println!(
        "| sequential round trip p50 / p99 / max ({} pings) | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | not in the baseline |",
        sa.len(),
        pct(&sa, 0.5),
        pct(&sa, 0.99),
        sa.last().copied().unwrap_or(f64::NAN),
        pct(&se, 0.5),
        pct(&se, 0.99),
        se.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "| lost (no reply within {} s) | {lost_agent} | {lost_echo} | — |",
        REPLY_LIMIT.as_secs()
    );
    println!(
        "| agent CPU per sequential ping | {:.0} µs ({:.0} % of one core while pinged) | — | — |",
        agent_cpu * 1000.0 / sa.len().max(1) as f64,
        agent_cpu / ms(agent_wall).max(1e-9) * 100.0
    );
    for (c, a, e) in &bursts {
        let (sa, se) = (sorted(&a.lat_us), sorted(&e.lat_us));
        let rate = |s: &Series| s.lat_us.len() as f64 / s.elapsed.as_secs_f64();
        println!(
            "| {c} in flight, {BURST} pings: replies/s; p50 / p99 | {:.0}/s; {:.0} / {:.0}{} | {:.0}/s; {:.0} / {:.0}{} | — |",
            rate(a),
            pct(&sa, 0.5),
            pct(&sa, 0.99),
            if a.lost > 0 {
                format!(" ({} lost)", a.lost)
            } else {
                String::new()
            },
            rate(e),
            pct(&se, 0.5),
            pct(&se, 0.99),
            if e.lost > 0 {
                format!(" ({} lost)", e.lost)
            } else {
                String::new()
            },
        );
    }
    if bad > 0 {
        println!("\n{bad} replies were not `{{\"value\":\"pong\"}}` or not matched to a request.");
    }
    drop(echo);
    drop(director);
    server.stop()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Section 4: failover in a three-server cluster

fn failover_section(pki: &Pki, k: &Knobs) -> Res<()> {
    let sb = Guarded::new("bench-runtime-failover")?;
    let agent_cg = sb.cgroup("agent").map_err(|e| e.to_string())?;
    // The agent's two servers (127.0.0.1 and 127.0.0.2, port 4222: the name's port cannot
    // change) and the director's (127.0.0.3), one cluster, so that the director stays
    // connected while the agent's server goes away.
    let route = |n: u8| format!("127.0.0.{n}:6222");
    let cluster = |me: u8| {
        Some((
            route(me),
            (1..=3u8)
                .filter(|n| *n != me)
                .map(route)
                .collect::<Vec<_>>(),
        ))
    };
    let ip = |n: usize| -> IpAddr { IpAddr::from([127, 0, 0, n as u8 + 1]) };
    let mut servers = [
        Server::new(&sb, pki, "one", "127.0.0.1:4222", cluster(1))?,
        Server::new(&sb, pki, "two", "127.0.0.2:4222", cluster(2))?,
    ];
    let mut dserver = Server::new(&sb, pki, "director", DIRECTOR_SIDE, cluster(3))?;
    for s in servers.iter_mut() {
        s.start()?;
    }
    dserver.start()?;
    let dns = Dns::start(&sb, DIRECTOR_NAME, ip(0));
    let director = Client::connect(&sb, pki, "director", DIRECTOR_SIDE)?;
    director.ns.wait_answer(DIRECTOR_NAME, ip(0));
    let files = AgentFiles::write(
        &sb,
        &settings(
            &[nats_url(&format!("{DIRECTOR_NAME}:4222"))],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
    )?;
    let exec = files.exec(&sb, &agent_cg, true)?;
    let (mut agent, took) = start_until_pong(&sb, &director, &exec, &agent_cg)?;
    let mut connected_at = Instant::now();
    eprintln!(
        "bench-runtime: failover: agent subscribed {:.0} ms after exec; {} runs per scenario, outages {:?}",
        ms(took),
        k.failover_runs,
        k.outages
    );

    let mut cur = 0usize;
    let mut hot_sigterm = Vec::new();
    let mut hot_exit = Vec::new();
    let mut stop_ms = Vec::new();
    let mut cold: Vec<(Duration, Vec<f64>, Vec<f64>)> = k
        .outages
        .iter()
        .map(|g| (*g, Vec::new(), Vec::new()))
        .collect();
    let mut failed = 0usize;
    let settle = |servers: &[Server; 2], other: usize, connected_at: Instant| -> Res<()> {
        dns.point(DIRECTOR_NAME, ip(other));
        director.ns.wait_answer(DIRECTOR_NAME, ip(other));
        // The agent's connection counts as stable, and a just-restarted server has its routes.
        let mut until = connected_at + STABLE;
        if let Some(st) = servers[other].started {
            until = until.max(st + Duration::from_millis(500));
        }
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        Ok(())
    };
    for _round in 0..k.failover_runs {
        // Hot standby: the other server is up; the name moves to it; the current one stops.
        let other = 1 - cur;
        if !servers[other].running() {
            servers[other].start()?;
        }
        settle(&servers, other, connected_at)?;
        // Pings start once the old server has exited: until then the agent still answers
        // through it.
        let t0 = Instant::now();
        let exited = servers[cur].stop()?;
        let pong = director.next_pong(PONG_LIMIT)?;
        match pong {
            Some(t) => {
                hot_sigterm.push(ms(t.saturating_duration_since(t0)));
                hot_exit.push(ms(t.saturating_duration_since(exited)));
                stop_ms.push(ms(exited.saturating_duration_since(t0)));
                connected_at = t;
                cur = other;
            }
            None => {
                failed += 1;
                eprintln!("bench-runtime: hot failover without a pong within {PONG_LIMIT:?}");
                break;
            }
        }

        // Cold: the other server is down; the name moves to it; the current one stops; the
        // other comes up after the outage.
        for (gap, from_ready, from_loss) in cold.iter_mut() {
            let other = 1 - cur;
            if servers[other].running() {
                servers[other].stop()?;
            }
            settle(&servers, other, connected_at)?;
            let lost = servers[cur].stop()?;
            std::thread::sleep((lost + *gap).saturating_duration_since(Instant::now()));
            servers[other].spawn()?;
            let ready = servers[other].wait_ready()?;
            match director.next_pong(PONG_LIMIT)? {
                Some(t) => {
                    from_ready.push(ms(t.saturating_duration_since(ready)));
                    from_loss.push(ms(t.saturating_duration_since(lost)));
                    connected_at = t;
                    cur = other;
                }
                None => {
                    failed += 1;
                    eprintln!(
                        "bench-runtime: cold failover ({gap:?} outage) without a pong within {PONG_LIMIT:?}"
                    );
                }
            }
        }
        if failed > 0 {
            eprintln!("bench-runtime: agent log tail:\n{}", tail(&agent.log(), 20));
            break;
        }
    }
    agent
        .stop()
        .map_err(|e| format!("stopping the agent: {e}"))?;
    drop(agent);

    println!(
        "\n## Failover: the name re-pointed to the other server of the cluster (ms; target ≤ 2 s median)\n"
    );
    println!(
        "The director pings every {} ms through a third server of the cluster (127.0.0.3), so the figure \
         includes the agent's resolve + rules + TLS dial + subscribe and the cluster routing the ping to it. \
         Each run starts from a connection older than {:.1} s (backoff reset), alternating between 127.0.0.1 and 127.0.0.2.\n",
        POLL_EVERY.as_millis(),
        STABLE.as_secs_f64()
    );
    println!("| scenario | from | median (min–max) | runs | samples |");
    println!("|---|---|---|---|---|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| hot standby: new server already up, old one stopped | SIGTERM to the old server | {} | {} | {} |",
        med_range(&hot_sigterm, 0),
        hot_sigterm.len(),
        list(&hot_sigterm)
    );
    println!(
        "| hot standby (same runs) | the old server's exit (SIGTERM → exit: {}) | {} | {} | {} |",
        med_range(&stop_ms, 0),
        med_range(&hot_exit, 0),
        hot_exit.len(),
        list(&hot_exit)
    );
    for (gap, from_ready, from_loss) in &cold {
        println!(
            "| cold: new server starts {:.1} s after the old one exited | the new server's \"Server is ready\" | {} | {} | {} |",
            gap.as_secs_f64(),
            med_range(from_ready, 0),
            from_ready.len(),
            list(from_ready)
        );
        println!(
            "| cold, {:.1} s outage (same runs) | the old server's exit | {} | {} | {} |",
            gap.as_secs_f64(),
            med_range(from_loss, 0),
            from_loss.len(),
            list(from_loss)
        );
    }
    println!("\nGo agent: no failover figure in the baseline.");
    if failed > 0 {
        println!("\n{failed} failover run(s) got no pong within {PONG_LIMIT:?} (see stderr).");
    }
    drop(director);
    drop(dns);
    for s in servers.iter_mut() {
        s.stop()?;
    }
    dserver.stop()?;
    Ok(())
}
