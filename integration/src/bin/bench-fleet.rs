//! `bench-fleet`: a fleet of real agents (each its own process, network namespace and cgroup,
//! NATS firewall on) against a three-node nats-server cluster with mutual TLS whose nodes
//! advertise each other (`connect_urls`), and a director that pings every agent and collects
//! heartbeats (the world is `integration::fleet`). It measures:
//!
//! 1. exec → all subscribed (every agent's `agent.<id>` subscription seen in the nodes'
//!    `/connz`), and how the fleet spreads over the nodes;
//! 2. one ping to every agent (round trip), and the heartbeat throughput at the director;
//! 3. one node killed (SIGKILL): time until every agent that was on it is subscribed again
//!    elsewhere, the connects per 100 ms bucket (peak against the mean, and the histogram),
//!    both as nats-server accepted them (`/connz`) and as the kernel completed them (the
//!    nodes' SYN-ACKs, captured with tcpdump on the director's bridge), director ping latency p50/p99 during the storm, failed dials and the nodes' TLS
//!    handshake errors meanwhile;
//! 4. all three nodes restarted (SIGTERM each, then each started again): the same;
//!    after the killed node is back, and after the restart, the return of every agent to its
//!    first node (`mbus::ReturnHome`): how long until all are home, the moves per 100 ms, and
//!    the pings lost meanwhile (a move is make-before-break: none should be);
//! 5. the audit: every (address, port) an agent's SYN left its namespace for, against the
//!    endpoints its table guards;
//! 6. memory: every agent's, monit's and node's RSS, and the file descriptors they hold.
//!
//! Not a test: it asserts nothing and prints markdown (progress on stderr), with the load
//! average at each step (a shared machine distorts the figures; the reader should know).
//! Knobs (environment):
//! - `FLEET_AGENTS` (200);
//! - `FLEET_WAVE` (0: all agents started together; N: started N at a time, the next N once
//!   the last are subscribed, and then the start rows are per wave);
//! - `FLEET_TLS_TIMEOUT_MS` (`fleet::DEFAULT_TLS_TIMEOUT`, 10 s: nats-server's TLS handshake
//!   timeout on the nodes; the director's own nats job uses 2 s, which a 2-core machine
//!   running the whole fleet cannot meet in a burst);
//! - `FLEET_ROUNDS` (1: how many times steps 3 and 4 run on the same fleet);
//! - `FLEET_HEARTBEAT_SECONDS` (2), `FLEET_PING_EVERY_MS` (5: the storm's ping load,
//!   round-robin over the agents);
//! - `FLEET_RETURN_HOME_MS` (`5000-15000`: the agents' return-home window, shorter than the
//!   agent's default of 60–300 s so that a round takes seconds; `off` keeps them where the
//!   storm put them, and then the next kill moves whatever the last restart piled on a node);
//! - `FLEET_KEEP_LOGS=<dir>` (every agent's and node's log written there at the end);
//! - `FLEET_SHOW_SLOWEST=1` (the log of the last agent back after each storm, on stderr).
//!
//! Needs root, nft, nats-server, monit, tcpdump (without it the SYN-ACK columns say "not
//! captured") and the binaries next to this one (`cargo build -p
//! cli -p integration`, debug or release). On a panic or SIGINT/SIGTERM the processes in the
//! fleet's cgroups and namespaces are killed by pid and everything is removed.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use integration::bench::cleanup::{emergency_cleanup, install_hooks, register};
use integration::bench::stats::{ms, pct, sorted};
use integration::bench::{Res, env_num, first_line_of};
use integration::fleet::observe::{buckets, count_since, histogram, peak_and_mean, syn_ack_times};
use integration::fleet::{DEFAULT_TLS_TIMEOUT, Fleet, FleetOptions, LoadResult, NODES, PingLoad};

const BUCKET: Duration = Duration::from_millis(100);
/// The director's address on the bridge: its own connections are not the fleet's.
const DIRECTOR_IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 1));
const POLL: Duration = Duration::from_millis(100);
const LIMIT: Duration = Duration::from_secs(300);
const STORM_LIMIT: Duration = Duration::from_secs(120);
/// What the agent logs for a dial that did not give a subscribed session.
const DIAL_FAILED: &str = "mbus dial failed";
/// What nats-server logs for a handshake it gave up on (timeout or error).
const TLS_ERROR: &str = "TLS handshake";

fn main() -> ExitCode {
    install_hooks("bench-fleet");
    let t0 = Instant::now();
    match run() {
        Ok(()) => {
            println!(
                "\nbench-fleet: total runtime {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-fleet: {e}");
            emergency_cleanup();
            ExitCode::FAILURE
        }
    }
}

struct Knobs {
    agents: usize,
    wave: usize,
    tls_timeout: Duration,
    rounds: usize,
    heartbeat: u64,
    ping_every: Duration,
    /// `None` when off.
    return_home: Option<String>,
}

fn knobs() -> Res<Knobs> {
    let agents = env_num("FLEET_AGENTS", 200usize)?;
    let wave = match env_num("FLEET_WAVE", 0usize)? {
        0 => agents.max(1),
        n => n,
    };
    let default_tls = u64::try_from(DEFAULT_TLS_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
    Ok(Knobs {
        agents,
        wave,
        tls_timeout: Duration::from_millis(env_num("FLEET_TLS_TIMEOUT_MS", default_tls)?),
        rounds: env_num("FLEET_ROUNDS", 1usize)?.max(1),
        heartbeat: env_num("FLEET_HEARTBEAT_SECONDS", 2u64)?.max(1),
        ping_every: Duration::from_millis(env_num("FLEET_PING_EVERY_MS", 5u64)?.max(1)),
        return_home: match std::env::var("FLEET_RETURN_HOME_MS") {
            Ok(v) if v.trim().eq_ignore_ascii_case("off") => None,
            Ok(v) => Some(v.trim().to_string()),
            Err(_) => Some("5000-15000".to_string()),
        },
    })
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` prints them.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// "p50 / p99 (n)" of durations in ms.
fn p50_p99(v: &[Duration]) -> String {
    if v.is_empty() {
        return "no sample".into();
    }
    let s = sorted(&v.iter().map(|d| ms(*d)).collect::<Vec<_>>());
    format!(
        "{:.1} / {:.1} ms (max {:.1}, n = {})",
        pct(&s, 0.5),
        pct(&s, 0.99),
        s.last().copied().unwrap_or(f64::NAN),
        s.len()
    )
}

fn since_ms(t: SystemTime, from: SystemTime) -> f64 {
    t.duration_since(from).map(ms).unwrap_or(0.0)
}

/// Log lengths (agents', nodes') noted before a storm, to count what the storm added.
struct Marks {
    agents: Vec<usize>,
    nodes: Vec<usize>,
}

fn marks(fleet: &Fleet) -> Marks {
    Marks {
        agents: fleet.agents().iter().map(|a| a.log().len()).collect(),
        nodes: fleet.nodes().iter().map(|n| n.logs().len()).collect(),
    }
}

/// (failed dials in the agents' logs, TLS handshake errors in the nodes' logs) since `m`.
fn failures_since(fleet: &Fleet, m: &Marks) -> (usize, usize) {
    let dials = fleet
        .agents()
        .iter()
        .zip(&m.agents)
        .map(|(a, from)| count_since(&a.log(), *from, DIAL_FAILED))
        .sum();
    let tls = fleet
        .nodes()
        .iter()
        .zip(&m.nodes)
        .map(|(n, from)| count_since(&n.logs(), *from, TLS_ERROR))
        .sum();
    (dials, tls)
}

/// What one storm measured.
struct Storm {
    name: String,
    agents: usize,
    /// Agents not back within [`STORM_LIMIT`].
    missing: usize,
    all_seen: Duration,
    last_connect: f64,
    buckets: Vec<usize>,
    /// The nodes' SYN-ACKs in the same buckets (None: no capture).
    syn_acks: Option<Vec<usize>>,
    load: LoadResult,
    spread: BTreeMap<usize, usize>,
    failed_dials: usize,
    tls_errors: usize,
    loadavg: String,
}

/// tcpdump on the director's bridge, recording the nodes' SYN-ACKs to the agents: when the
/// kernel completed each connect. `/connz` `start` is when nats-server's accept loop took the
/// connection, which a CPU busy with handshakes delays and batches; the two side by side tell
/// the agents' herd from the server's scheduling.
struct SynCapture {
    child: std::process::Child,
    out: std::path::PathBuf,
    /// Held open so that tcpdump's closing summary never meets a closed pipe.
    _stderr: std::process::ChildStderr,
}

impl SynCapture {
    /// Starts the capture and waits until tcpdump listens; None (with the reason on stderr)
    /// when it cannot, and the storm is then reported without it.
    fn start(fleet: &Fleet, out: std::path::PathBuf) -> Option<Self> {
        use std::io::BufRead;
        let file = match std::fs::File::create(&out) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("bench-fleet: no SYN-ACK capture: {}: {e}", out.display());
                return None;
            }
        };
        let spawned = std::process::Command::new("nsenter")
            .arg(format!(
                "--net={}",
                fleet.sandbox().netns().file().display()
            ))
            .args(["tcpdump", "-i", "br0", "-n", "-tt", "-l", "-B", "8192"])
            .arg("tcp src port 4222 and tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)")
            .stdout(file)
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bench-fleet: no SYN-ACK capture: tcpdump: {e}");
                return None;
            }
        };
        // In the sandbox's namespace: the emergency cleanup kills it with the fleet.
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        };
        let mut reader = std::io::BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(n) if n > 0 && line.contains("listening on") => break,
                Ok(n) if n > 0 => continue,
                _ => {
                    eprintln!(
                        "bench-fleet: no SYN-ACK capture: tcpdump ended: {}",
                        line.trim()
                    );
                    let _ = child.wait();
                    return None;
                }
            }
        }
        Some(Self {
            child,
            out,
            _stderr: reader.into_inner(),
        })
    }

    /// Stops tcpdump (SIGINT, by its pid) and returns the SYN-ACK times it saw.
    fn finish(mut self) -> Vec<SystemTime> {
        // Packets of the last moments are still in tcpdump's buffer.
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let _ = std::fs::remove_file(&self.out);
        syn_ack_times(&text, DIRECTOR_IP)
    }
}

/// Waits for `ids` to be subscribed on connections accepted after `since`; the buckets count
/// those connects from `bucket_from`.
#[allow(clippy::too_many_arguments)]
fn settle(
    fleet: &mut Fleet,
    name: String,
    ids: &[String],
    since: SystemTime,
    bucket_from: SystemTime,
    t_from: Instant,
    ping: PingLoad,
    m: &Marks,
    capture: Option<SynCapture>,
) -> Res<Storm> {
    // A storm that does not settle is reported with what came back, not as a failure.
    let (seen, conns, missing) = match fleet.wait_subscribed(ids, Some(since), STORM_LIMIT, POLL) {
        Ok((seen, conns)) => (seen, conns, 0),
        Err(e) => {
            eprintln!(
                "bench-fleet: {}",
                e.to_string().lines().next().unwrap_or("")
            );
            let mut conns = HashMap::new();
            for (n, c) in fleet.connz()? {
                if c.start >= since {
                    conns.insert(c.agent_id.clone(), (n, c));
                }
            }
            let missing = ids.iter().filter(|id| !conns.contains_key(*id)).count();
            (Instant::now(), conns, missing)
        }
    };
    let syn_acks = capture.map(|c| buckets(&c.finish(), bucket_from, BUCKET));
    let loadavg = load();
    let starts: Vec<SystemTime> = ids
        .iter()
        .filter_map(|id| conns.get(id).map(|(_, c)| c.start))
        .collect();
    let last = starts.iter().max().copied().unwrap_or(bucket_from);
    if std::env::var("FLEET_SHOW_SLOWEST").is_ok_and(|v| v == "1")
        && let Some((id, _)) = conns
            .iter()
            .filter(|(id, _)| ids.contains(id))
            .max_by_key(|(_, (_, c))| c.start)
        && let Some(a) = fleet.agents().iter().find(|a| &a.id == id)
    {
        eprintln!(
            "bench-fleet: the last to reconnect, {id}:\n{}",
            integration::bench::tail(&a.log(), 40)
        );
    }
    let mut spread = BTreeMap::new();
    for id in ids {
        if let Some((n, _)) = conns.get(id) {
            *spread.entry(*n).or_insert(0usize) += 1;
        }
    }
    // Pings keep going for a second after the last agent is back.
    std::thread::sleep(Duration::from_secs(1));
    let load = ping.finish(Duration::from_millis(500))?;
    let (failed_dials, tls_errors) = failures_since(fleet, m);
    let s = Storm {
        name,
        agents: ids.len(),
        missing,
        all_seen: seen.saturating_duration_since(t_from),
        last_connect: since_ms(last, bucket_from),
        buckets: buckets(&starts, bucket_from, BUCKET),
        syn_acks,
        load,
        spread,
        failed_dials,
        tls_errors,
        loadavg,
    };
    eprintln!(
        "bench-fleet: {}: {} agents back, last connect at {:.0} ms, peak {} per 100 ms (load {})",
        s.name,
        s.agents - s.missing,
        s.last_connect,
        peak_and_mean(&s.buckets).0,
        s.loadavg
    );
    Ok(s)
}

/// What one return to the first nodes measured.
struct Homecoming {
    name: String,
    /// Agents whose home connection was accepted after the return began.
    moved: usize,
    /// Agents not home within the limit.
    away: usize,
    all_home: Duration,
    buckets: Vec<usize>,
    load: LoadResult,
    per_node: [usize; NODES],
    failed_dials: usize,
    tls_errors: usize,
    loadavg: String,
}

/// Waits until every agent is subscribed once, on its first node; counts the moves (home
/// connections accepted after `since`) in buckets from `since`.
fn homecoming(
    fleet: &mut Fleet,
    name: String,
    since: SystemTime,
    t_from: Instant,
    ping: PingLoad,
    m: &Marks,
    limit: Duration,
) -> Res<Homecoming> {
    let (seen, placed, away) = match fleet.wait_home(limit, POLL) {
        Ok((seen, placed)) => (seen, placed, 0),
        Err(e) => {
            let line = e.to_string();
            eprintln!("bench-fleet: {}", line.lines().next().unwrap_or(""));
            let homes = fleet.homes();
            let placed: integration::fleet::Placements = fleet
                .connz()?
                .into_iter()
                .map(|(n, c)| (c.agent_id.clone(), (n, c)))
                .collect();
            let away = homes
                .iter()
                .filter(|(id, h)| placed.get(*id).map(|(n, _)| n) != Some(*h))
                .count();
            (Instant::now(), placed, away)
        }
    };
    let loadavg = load();
    let starts: Vec<SystemTime> = placed
        .values()
        .filter(|(_, c)| c.start >= since)
        .map(|(_, c)| c.start)
        .collect();
    let mut per_node = [0usize; NODES];
    for (n, _) in placed.values() {
        per_node[*n] += 1;
    }
    std::thread::sleep(Duration::from_secs(1));
    let load = ping.finish(Duration::from_millis(500))?;
    let (failed_dials, tls_errors) = failures_since(fleet, m);
    let h = Homecoming {
        name,
        moved: starts.len(),
        away,
        all_home: seen.saturating_duration_since(t_from),
        buckets: buckets(&starts, since, BUCKET),
        load,
        per_node,
        failed_dials,
        tls_errors,
        loadavg,
    };
    eprintln!(
        "bench-fleet: {}: {} agents moved home in {:.1} s, {:?} per node (load {})",
        h.name,
        h.moved,
        h.all_home.as_secs_f64(),
        h.per_node,
        h.loadavg
    );
    Ok(h)
}

fn homecoming_row(h: &Homecoming) {
    let (peak, mean, ratio) = peak_and_mean(&h.buckets);
    let all_home = if h.away == 0 {
        format!("{:.1} s", h.all_home.as_secs_f64())
    } else {
        format!("{} still away", h.away)
    };
    println!(
        "| {} | {} | {all_home} | {peak} / {mean:.2} | {ratio:.2} | {:?} | {} | {} lost of {} | {} / {} | {} |",
        h.name,
        h.moved,
        h.per_node,
        p50_p99(&h.load.latencies),
        h.load.lost,
        h.load.sent,
        h.failed_dials,
        h.tls_errors,
        h.loadavg
    );
}

/// Where a storm's capture is written (removed once read).
fn capture_file(round: usize, what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "bench-fleet-{}-{round}-{what}.syn",
        std::process::id()
    ))
}

fn storm_row(s: &Storm) {
    let (peak, mean, ratio) = peak_and_mean(&s.buckets);
    let all_seen = if s.missing == 0 {
        format!("{:.0} ms", ms(s.all_seen))
    } else {
        format!("{} not back within {} s", s.missing, STORM_LIMIT.as_secs())
    };
    let kernel = match &s.syn_acks {
        Some(b) => {
            let (p, m, r) = peak_and_mean(b);
            format!("{p} / {m:.1} | {r:.2}")
        }
        None => "not captured | —".to_string(),
    };
    println!(
        "| {} | {} | {:.0} ms | {all_seen} | {peak} | {mean:.1} | {ratio:.2} | {kernel} | {} | {} lost of {} | {} / {} | {} |",
        s.name,
        s.agents,
        s.last_connect,
        p50_p99(&s.load.latencies),
        s.load.lost,
        s.load.sent,
        s.failed_dials,
        s.tls_errors,
        s.loadavg
    );
}

/// Memory and descriptors of the fleet's processes (before they are stopped).
struct Footprint {
    agent_rss_kb: Vec<f64>,
    agent_anon_kb: f64,
    agent_threads: Vec<f64>,
    agent_fds: Vec<f64>,
    monit_rss_kb: f64,
    nodes: Vec<(f64, usize)>,
    bench_fds: usize,
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn footprint(fleet: &Fleet) -> Footprint {
    let mut f = Footprint {
        agent_rss_kb: Vec::new(),
        agent_anon_kb: 0.0,
        agent_threads: Vec::new(),
        agent_fds: Vec::new(),
        monit_rss_kb: 0.0,
        nodes: Vec::new(),
        bench_fds: fd_count(std::process::id()),
    };
    for a in fleet.agents() {
        if let Some(pid) = a.pid()
            && let Ok(m) = integration::bench::procfs::mem(pid)
        {
            f.agent_rss_kb.push(m.rss_kb as f64);
            f.agent_anon_kb += m.anon_kb as f64;
            f.agent_threads.push(m.threads as f64);
            f.agent_fds.push(fd_count(pid) as f64);
        }
        if let Some(pid) = a.monit_pid()
            && let Ok(m) = integration::bench::procfs::mem(pid)
        {
            f.monit_rss_kb += m.rss_kb as f64;
        }
    }
    for n in fleet.nodes() {
        if let Some(pid) = n.pid()
            && let Ok(m) = integration::bench::procfs::mem(pid)
        {
            f.nodes.push((m.rss_kb as f64 / 1024.0, fd_count(pid)));
        }
    }
    f
}

/// p50 / max of a sample, `prec` decimals, scaled by `scale`.
fn p50_max(v: &[f64], scale: f64, prec: usize) -> String {
    let s = sorted(v);
    format!(
        "{:.prec$} / {:.prec$}",
        pct(&s, 0.5) / scale,
        s.last().copied().unwrap_or(f64::NAN) / scale
    )
}

/// One wave's start: (exec → all seen subscribed, exec → first connect, exec → last connect).
type Wave = (Duration, f64, f64);

fn run() -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err("run as root: it creates network namespaces, cgroups and firewalls".into());
    }
    let k = knobs()?;
    let profile = std::env::current_exe()
        .ok()
        .and_then(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let load_before = load();
    eprintln!(
        "bench-fleet: building a fleet of {} agents ({profile} build; load {load_before})",
        k.agents
    );
    let t_build = Instant::now();
    let mut fleet = Fleet::build(&FleetOptions {
        agents: k.agents,
        heartbeat_seconds: k.heartbeat,
        name: "bench-fleet".into(),
        tls_timeout: k.tls_timeout,
        return_home: Some(k.return_home.clone().unwrap_or_else(|| "off".into())),
    })?;
    register(fleet.sandbox());
    for a in fleet.agents() {
        integration::bench::cleanup::register_netns(a.netns().file().to_path_buf());
    }
    let build = t_build.elapsed();
    let ids = fleet.ids();

    // 1. exec -> all subscribed (each wave's agents spawned one after the other, the next
    // wave once all of this one are subscribed; one wave of all by default).
    let start_marks = marks(&fleet);
    let t0 = Instant::now();
    let mut conns = HashMap::new();
    let mut waves: Vec<Wave> = Vec::new();
    let mut spawned = Duration::ZERO;
    for start in (0..ids.len()).step_by(k.wave) {
        let end = (start + k.wave).min(ids.len());
        let tw = fleet.spawn_range(start..end)?;
        // The wall time of the first agent exec (spawn_range starts the monits before it).
        let wave_wall = SystemTime::now()
            .checked_sub(tw.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        spawned += tw.elapsed();
        let (seen, c) = fleet.wait_subscribed(&ids[start..end], None, LIMIT, POLL)?;
        let wave_conns: Vec<SystemTime> = ids[start..end]
            .iter()
            .filter_map(|id| c.get(id).map(|(_, x)| x.start))
            .collect();
        let first = wave_conns
            .iter()
            .min()
            .map(|t| since_ms(*t, wave_wall))
            .unwrap_or(f64::NAN);
        let last = wave_conns
            .iter()
            .max()
            .map(|t| since_ms(*t, wave_wall))
            .unwrap_or(f64::NAN);
        waves.push((seen.saturating_duration_since(tw), first, last));
        eprintln!(
            "bench-fleet: agents {start}..{end} subscribed {:.1} s after their first exec (load {})",
            seen.saturating_duration_since(tw).as_secs_f64(),
            load()
        );
        conns = c;
    }
    let all_subscribed = t0.elapsed();
    let load_start = load();
    let (start_dials, start_tls) = failures_since(&fleet, &start_marks);
    let mut per_node = [0usize; NODES];
    for (n, _) in conns.values() {
        per_node[*n] += 1;
    }

    // 2. A ping to every agent, and heartbeats.
    let round = fleet
        .director()
        .ping_all(&ids, Duration::from_secs(60), Duration::from_secs(2))?;
    let pings: Vec<Duration> = round.answered.values().copied().collect();
    let window = Duration::from_secs(k.heartbeat * 5);
    let h0 = Instant::now();
    std::thread::sleep(window);
    let h1 = Instant::now();
    let beats: Vec<(String, Instant)> = fleet
        .director()
        .heartbeats()
        .into_iter()
        .filter(|(_, t)| *t >= h0 && *t < h1)
        .collect();
    let heard: std::collections::HashSet<&String> = beats.iter().map(|(id, _)| id).collect();
    let rate = beats.len() as f64 / window.as_secs_f64();
    let expected = ids.len() as f64 / k.heartbeat as f64;
    let load_steady = load();

    let mut storms: Vec<Storm> = Vec::new();
    let mut returns: Vec<Homecoming> = Vec::new();
    // Long enough for a whole window after the last node is ready, and the handshakes.
    let home_limit = STORM_LIMIT
        + k.return_home
            .as_deref()
            .and_then(|w| w.split_once('-'))
            .and_then(|(_, hi)| hi.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
    let mut restart_times: Vec<(Duration, Duration)> = Vec::new();
    for r in 1..=k.rounds {
        // 3. One node killed: the one with the most agents (the director's stays up).
        let placement: HashMap<String, usize> = fleet.placement()?;
        let victim = (0..NODES)
            .filter(|n| *n != NODES - 1)
            .max_by_key(|n| placement.values().filter(|v| **v == *n).count())
            .unwrap_or(0);
        let moved: Vec<String> = ids
            .iter()
            .filter(|id| placement.get(*id) == Some(&victim))
            .cloned()
            .collect();
        eprintln!(
            "bench-fleet: round {r}: killing node {victim} ({} agents on it; load {})",
            moved.len(),
            load()
        );
        let m = marks(&fleet);
        let ping = fleet.director().ping_load(&ids, k.ping_every)?;
        std::thread::sleep(Duration::from_secs(1));
        let capture = SynCapture::start(&fleet, capture_file(r, "kill"));
        let kill_wall = SystemTime::now();
        let kill = Instant::now();
        fleet.kill_node(victim)?;
        let name = format!("round {r}: node {victim} killed");
        storms.push(settle(
            &mut fleet, name, &moved, kill_wall, kill_wall, kill, ping, &m, capture,
        )?);

        // The killed node comes back; its agents return to it.
        let m = marks(&fleet);
        let ping = fleet.director().ping_load(&ids, k.ping_every)?;
        let back_wall = SystemTime::now();
        let back = Instant::now();
        fleet.start_node(victim)?;
        if k.return_home.is_some() {
            let name = format!("round {r}: node {victim} back");
            returns.push(homecoming(
                &mut fleet, name, back_wall, back, ping, &m, home_limit,
            )?);
        } else {
            ping.finish(Duration::from_millis(500))?;
        }
        // 4. All three restarted (connections age past the backoff's stable_after first).
        std::thread::sleep(Duration::from_secs(3));
        eprintln!(
            "bench-fleet: round {r}: restarting all {NODES} nodes (load {})",
            load()
        );
        let m = marks(&fleet);
        let ping = fleet.director().ping_load(&ids, k.ping_every)?;
        std::thread::sleep(Duration::from_secs(1));
        let capture = SynCapture::start(&fleet, capture_file(r, "restart"));
        let down_wall = SystemTime::now();
        let down = Instant::now();
        for n in 0..NODES {
            fleet.stop_node(n)?;
        }
        let all_down = down.elapsed();
        let up_wall = SystemTime::now();
        let up = Instant::now();
        let mut ready = Duration::ZERO;
        for n in 0..NODES {
            ready = fleet.start_node(n)?.saturating_duration_since(up);
        }
        restart_times.push((all_down, ready));
        let name = format!("round {r}: all {NODES} restarted");
        storms.push(settle(
            &mut fleet, name, &ids, down_wall, up_wall, up, ping, &m, capture,
        )?);
        if k.return_home.is_some() {
            let m = marks(&fleet);
            let ping = fleet.director().ping_load(&ids, k.ping_every)?;
            let name = format!("round {r}: after the restart");
            // Moves are counted from here: the storm's own reconnects are not moves.
            returns.push(homecoming(
                &mut fleet,
                name,
                SystemTime::now(),
                up,
                ping,
                &m,
                home_limit,
            )?);
        }
        // Connections age past stable_after before the next round.
        std::thread::sleep(Duration::from_secs(2));
    }

    // 5. The audit (a failure is reported with the figures, not instead of them).
    let (audits, audit_error) = match fleet.audit() {
        Ok(a) => (a, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let unruled: Vec<(String, Vec<std::net::SocketAddr>)> = audits
        .iter()
        .filter(|a| !a.unruled().is_empty())
        .map(|a| (a.agent_id.clone(), a.unruled()))
        .collect();
    let mut dialled: BTreeMap<std::net::SocketAddr, usize> = BTreeMap::new();
    for a in &audits {
        for d in &a.dialled {
            *dialled.entry(*d).or_default() += 1;
        }
    }
    let advertised: Vec<String> = fleet
        .nodes()
        .iter()
        .map(|n| n.advertised.to_string())
        .collect();
    let varz_tls: Vec<String> = fleet
        .varz()?
        .iter()
        .map(|(i, v)| format!("node{i} {}/{}", v["tls_timeout"], v["auth_timeout"]))
        .collect();

    // 6. Memory and descriptors.
    let fp = footprint(&fleet);
    let load_end = load();
    if let Some(dir) = std::env::var_os("FLEET_KEEP_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for a in fleet.agents() {
            let path = dir.join(format!("{}.log", a.id));
            std::fs::write(&path, a.log()).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        for (i, n) in fleet.nodes().iter().enumerate() {
            let path = dir.join(format!("node{i}.log"));
            std::fs::write(&path, n.logs()).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    fleet.stop_agents(Duration::from_secs(10));
    drop(fleet);
    integration::bench::cleanup::unregister_all();

    println!("# bench-fleet\n");
    println!(
        "{} agents ({profile} build), {NODES} nats-server nodes ({}), {}, {} cores; heartbeat every {} s; \
         nats-server TLS timeout {} s (tls/auth timeout per node from `/varz`: {}); \
         the fleet was built (namespaces, veths, audit tables, nodes, director) in {:.1} s.\n",
        ids.len(),
        first_line_of("nats-server", &["--version"]),
        first_line_of("uname", &["-sr"]),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        k.heartbeat,
        k.tls_timeout.as_secs_f64(),
        varz_tls.join(", "),
        build.as_secs_f64()
    );
    println!(
        "Load average (1, 5, 15 min): {load_before} before the build, {load_start} once all were \
         subscribed, {load_steady} after the heartbeat window, {load_end} at the end.\n"
    );
    println!("## Start\n");
    println!("| what | value |\n|---|---|");
    if waves.len() == 1 {
        println!(
            "| agents started | all {} together (spawned one after the other in {:.0} ms) |",
            ids.len(),
            ms(spawned)
        );
        let (seen, first, last) = waves[0];
        println!("| first exec → first connect accepted | {first:.0} ms |");
        println!("| first exec → last connect accepted | {last:.0} ms |");
        println!(
            "| first exec → all seen subscribed (`/connz` every {} ms) | {:.0} ms |",
            POLL.as_millis(),
            ms(seen)
        );
    } else {
        println!(
            "| waves of | {} agents (the next wave starts once the last is subscribed) |",
            k.wave
        );
        println!(
            "| spawning (placement wrappers, one after the other), all waves | {:.0} ms |",
            ms(spawned)
        );
        let w = |f: fn(&Wave) -> f64| {
            let v = sorted(&waves.iter().map(f).collect::<Vec<_>>());
            format!(
                "{:.0} / {:.0} ms",
                pct(&v, 0.5),
                v.last().copied().unwrap_or(f64::NAN)
            )
        };
        println!(
            "| per wave, its first exec → its first connect accepted, median / max | {} |",
            w(|x| x.1)
        );
        println!(
            "| per wave, its first exec → its last connect accepted, median / max | {} |",
            w(|x| x.2)
        );
        println!(
            "| per wave, its first exec → all of it seen subscribed, median / max | {} |",
            w(|x| ms(x.0))
        );
        println!(
            "| first exec → every agent subscribed, all waves | {:.0} ms |",
            ms(all_subscribed)
        );
    }
    println!(
        "| failed dials (agents) / TLS handshake errors (nodes) during the start | {start_dials} / {start_tls} |"
    );
    println!("| agents per node | {per_node:?} |");
    println!(
        "| one ping to every agent, round trip p50 / p99 | {} |",
        p50_p99(&pings)
    );
    println!("| no pong from | {:?} |", round.missing);
    println!(
        "| heartbeats at the director over {} s | {:.1}/s (expected {expected:.1}/s), from {} of {} agents |",
        window.as_secs(),
        rate,
        heard.len(),
        ids.len()
    );

    println!("\n## Storms\n");
    println!(
        "Connects are the nodes' accept times (`/connz` `start`) of the new connections, in {} ms buckets from \
         the kill (node killed) or from the first restart (all restarted); the mean is over every bucket up to \
         the last connect. SYN-ACKs are the same storm seen by the kernel: the nodes' SYN-ACKs to the agents \
         (tcpdump on the director's bridge), each the moment a connect completed, before nats-server's accept \
         loop took it (which a CPU busy with TLS handshakes delays and batches); a retry after a failed handshake \
         is a second SYN-ACK. The ping load sends one ping every {} ms, round-robin over all agents, each once (a \
         ping to an agent between connections is lost: NATS is at most once). Failed dials are the agents' \
         `{DIAL_FAILED}` lines, TLS errors the nodes' `{TLS_ERROR}` lines, during the storm.\n",
        BUCKET.as_millis(),
        k.ping_every.as_millis()
    );
    println!(
        "| storm | agents | last connect accepted | all seen subscribed | peak / 100 ms | mean / 100 ms | peak ÷ mean | SYN-ACKs peak / mean | SYN-ACKs peak ÷ mean | director ping p50 / p99 | pings | failed dials / TLS errors | load after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &storms {
        storm_row(s);
    }
    println!();
    match &k.return_home {
        Some(window) => {
            println!(
                "\n## Back to the first nodes\n\nEach agent away from its first node (`mbus::dial_order`) tries it after a \
                 random wait in {window} ms and moves there make-before-break. Moves are the home connections accepted \
                 after the node came back (or after the restart's storm settled), in {} ms buckets from then; \
                 \"all home after\" counts from the node's start (or the first restart) until every agent was seen \
                 subscribed once, on its first node. Pings are sent throughout, as in \
                 the storms.\n",
                BUCKET.as_millis()
            );
            println!(
                "| after | moves | all home after | peak / mean per 100 ms | peak ÷ mean | agents per node then | director ping p50 / p99 | pings | failed dials / TLS errors | load after |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|");
            for h in &returns {
                homecoming_row(h);
            }
            println!();
        }
        None => println!("Return home off (`FLEET_RETURN_HOME_MS=off`).\n"),
    }
    for (r, (down, up)) in restart_times.iter().enumerate() {
        println!(
            "Round {}: all {NODES} stopped in {:.0} ms, then started (all ready) in {:.0} ms.",
            r + 1,
            ms(*down),
            ms(*up)
        );
    }
    for s in &storms {
        let (peak, _, _) = peak_and_mean(&s.buckets);
        println!(
            "\n{}: agents went to {:?} (node → agents). Connects per {} ms:\n\n```\n{}```",
            s.name,
            s.spread,
            BUCKET.as_millis(),
            histogram(&s.buckets, BUCKET, peak.div_ceil(40).max(1))
        );
        if let Some(b) = &s.syn_acks {
            let series: Vec<String> = b.iter().map(usize::to_string).collect();
            println!(
                "
SYN-ACKs per {} ms: `{}`",
                BUCKET.as_millis(),
                series.join(" ")
            );
        }
    }

    println!("\n## Dials without a rule\n");
    println!(
        "Every agent's namespace records each (address, port) a TCP SYN leaves it for; the nodes advertise {advertised:?} \
         (in no agent's settings). Destinations seen: {dialled:?} (address → agents)."
    );
    if let Some(e) = &audit_error {
        println!("\nThe audit failed: {e}");
    } else if unruled.is_empty() {
        println!(
            "\nNo agent dialled an address its table has no rule for ({} agents audited).",
            audits.len()
        );
    } else {
        println!(
            "\n{} agents dialled addresses without a rule: {unruled:?}",
            unruled.len()
        );
    }

    println!("\n## Memory and descriptors (at the end)\n");
    println!("| what | value |\n|---|---|");
    if !fp.agent_rss_kb.is_empty() {
        println!(
            "| agent VmRSS, p50 / max | {} MB |",
            p50_max(&fp.agent_rss_kb, 1024.0, 1)
        );
        println!(
            "| agents' VmRSS summed / their private (RssAnon) memory summed | {:.0} / {:.0} MB ({} agents) |",
            fp.agent_rss_kb.iter().sum::<f64>() / 1024.0,
            fp.agent_anon_kb / 1024.0,
            fp.agent_rss_kb.len()
        );
        println!(
            "| agent threads, p50 / max | {} |",
            p50_max(&fp.agent_threads, 1.0, 0)
        );
        println!(
            "| agent open descriptors, p50 / max | {} |",
            p50_max(&fp.agent_fds, 1.0, 0)
        );
    }
    println!(
        "| monits' VmRSS summed | {:.0} MB |",
        fp.monit_rss_kb / 1024.0
    );
    println!(
        "| nodes' VmRSS (MB) and open descriptors | {} |",
        fp.nodes
            .iter()
            .map(|(mb, fds)| format!("{mb:.1} MB, {fds} fds"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "| this benchmark's open descriptors (limit {}) | {} |",
        nofile_limit(),
        fp.bench_fds
    );
    Ok(())
}

/// The soft limit on open files, as `/proc/self/limits` says.
fn nofile_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into())
}
