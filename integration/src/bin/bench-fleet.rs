//! `bench-fleet`: a fleet of real agents (each its own process, network namespace and cgroup,
//! NATS firewall on) against a three-node nats-server cluster with mutual TLS whose nodes
//! advertise each other (`connect_urls`), and a director that pings every agent and collects
//! heartbeats (the world is `integration::fleet`). It measures:
//!
//! 1. exec → all subscribed (every agent's `agent.<id>` subscription seen in the nodes'
//!    `/connz`), wave by wave, and how the fleet spreads over the nodes;
//! 2. one ping to every agent (round trip), and the heartbeat throughput at the director;
//! 3. one node stopped: time until every agent that was on it is subscribed again elsewhere,
//!    the connects per 100 ms bucket (peak against the mean), director ping latency p50/p99
//!    during the storm;
//! 4. all three nodes restarted: the same;
//! 5. the audit: every (address, port) an agent's SYN left its namespace for, against the
//!    endpoints its table guards.
//!
//! Not a test: it asserts nothing and prints markdown (progress on stderr). Knobs
//! (environment): `FLEET_AGENTS` (200), `FLEET_HEARTBEAT_SECONDS` (2),
//! `FLEET_PING_EVERY_MS` (5: the storm's ping load, round-robin over the agents), `FLEET_WAVE`
//! (25: agents started together; on 2 cores 200 debug agents started at once starve each
//! other's TLS handshakes past nats-server's 2 s TLS timeout, and retry forever),
//! `FLEET_SHOW_SLOWEST=1` (the log of the last agent back after each storm, on stderr).
//!
//! Needs root, nft, nats-server and the binaries next to this one (`cargo build -p cli -p
//! integration`, debug or release). On a panic or SIGINT/SIGTERM the processes in the fleet's
//! cgroups and namespaces are killed by pid and everything is removed.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use integration::bench::cleanup::{emergency_cleanup, install_hooks, register};
use integration::bench::stats::{ms, pct, sorted};
use integration::bench::{Res, env_num, first_line_of};
use integration::fleet::observe::{buckets, peak_and_mean};
use integration::fleet::{Fleet, FleetOptions, LoadResult, NODES};

const BUCKET: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(100);
const LIMIT: Duration = Duration::from_secs(300);
const STORM_LIMIT: Duration = Duration::from_secs(120);

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
    heartbeat: u64,
    ping_every: Duration,
    wave: usize,
}

fn knobs() -> Res<Knobs> {
    Ok(Knobs {
        agents: env_num("FLEET_AGENTS", 200usize)?,
        heartbeat: env_num("FLEET_HEARTBEAT_SECONDS", 2u64)?.max(1),
        ping_every: Duration::from_millis(env_num("FLEET_PING_EVERY_MS", 5u64)?.max(1)),
        wave: env_num("FLEET_WAVE", 25usize)?.max(1),
    })
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

/// What one storm measured.
struct Storm {
    agents: usize,
    /// Agents not back within [`STORM_LIMIT`].
    missing: usize,
    all_seen: Duration,
    last_connect: f64,
    buckets: Vec<usize>,
    load: LoadResult,
    spread: BTreeMap<usize, usize>,
}

fn storm_rows(name: &str, from: &str, s: &Storm) {
    let (peak, mean, ratio) = peak_and_mean(&s.buckets);
    let all_seen = if s.missing == 0 {
        format!("{:.0} ms", ms(s.all_seen))
    } else {
        format!("{} not back within {} s", s.missing, STORM_LIMIT.as_secs())
    };
    println!(
        "| {name} | {} | {from} | {:.0} ms | {all_seen} | {peak} | {mean:.1} | {ratio:.2} | {} | {} lost of {} |",
        s.agents,
        s.last_connect,
        p50_p99(&s.load.latencies),
        s.load.lost,
        s.load.sent
    );
}

/// Waits for `ids` to be subscribed on connections accepted after `since`; the buckets count
/// those connects from `bucket_from`.
fn settle(
    fleet: &mut Fleet,
    ids: &[String],
    since: SystemTime,
    bucket_from: SystemTime,
    t_from: Instant,
    load: integration::fleet::PingLoad,
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
    let load = load.finish(Duration::from_millis(500))?;
    Ok(Storm {
        agents: ids.len(),
        missing,
        all_seen: seen.saturating_duration_since(t_from),
        last_connect: since_ms(last, bucket_from),
        buckets: buckets(&starts, bucket_from, BUCKET),
        load,
        spread,
    })
}

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
    eprintln!(
        "bench-fleet: building a fleet of {} agents ({profile} build)",
        k.agents
    );
    let t_build = Instant::now();
    let mut fleet = Fleet::build(&FleetOptions {
        agents: k.agents,
        heartbeat_seconds: k.heartbeat,
        name: "bench-fleet".into(),
    })?;
    register(fleet.sandbox());
    for a in fleet.agents() {
        integration::bench::cleanup::register_netns(a.netns().file().to_path_buf());
    }
    let build = t_build.elapsed();
    let ids = fleet.ids();

    // 1. exec -> all subscribed, in waves of `k.wave` agents (each wave's agents spawned one
    // after the other, the next wave once all of this one are subscribed).
    let t0 = Instant::now();
    let mut conns = HashMap::new();
    let mut waves: Vec<(Duration, f64, f64)> = Vec::new();
    let mut spawned = Duration::ZERO;
    for start in (0..ids.len()).step_by(k.wave) {
        let end = (start + k.wave).min(ids.len());
        let wave_wall = SystemTime::now();
        let tw = fleet.spawn_range(start..end)?;
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
            "bench-fleet: agents {start}..{end} subscribed {:.1} s after their first exec",
            seen.saturating_duration_since(tw).as_secs_f64()
        );
        conns = c;
    }
    let all_subscribed = t0.elapsed();
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

    // 3. One node stopped: the one with the most agents.
    let placement: HashMap<String, usize> = fleet.placement()?;
    let victim = (0..NODES)
        .filter(|n| *n != NODES - 1) // the director's node stays up
        .max_by_key(|n| placement.values().filter(|v| **v == *n).count())
        .unwrap_or(0);
    let moved: Vec<String> = ids
        .iter()
        .filter(|id| placement.get(*id) == Some(&victim))
        .cloned()
        .collect();
    eprintln!(
        "bench-fleet: stopping node {victim} ({} agents on it)",
        moved.len()
    );
    let load = fleet.director().ping_load(&ids, k.ping_every)?;
    std::thread::sleep(Duration::from_secs(1));
    let kill_wall = SystemTime::now();
    let kill = Instant::now();
    fleet.stop_node(victim)?;
    let one = settle(&mut fleet, &moved, kill_wall, kill_wall, kill, load)?;

    // 4. All three restarted (the stopped one first comes back, and connections age past the
    // backoff's stable_after).
    fleet.start_node(victim)?;
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("bench-fleet: restarting all {NODES} nodes");
    let load = fleet.director().ping_load(&ids, k.ping_every)?;
    std::thread::sleep(Duration::from_secs(1));
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
    let all = settle(&mut fleet, &ids, down_wall, up_wall, up, load)?;

    // 5. The audit.
    let audits = fleet.audit()?;
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

    let mut rss_kb = Vec::new();
    for a in fleet.agents() {
        if let Some(pid) = a.pid()
            && let Ok(m) = integration::bench::procfs::mem(pid)
        {
            rss_kb.push(m.rss_kb as f64);
        }
    }
    fleet.stop_agents(Duration::from_secs(10));
    drop(fleet);
    integration::bench::cleanup::unregister_all();

    println!("# bench-fleet\n");
    println!(
        "{} agents ({profile} build), {NODES} nats-server nodes ({}), {}, {} cores; heartbeat every {} s; \
         the fleet was built (namespaces, veths, audit tables, nodes, director) in {:.1} s.\n",
        ids.len(),
        first_line_of("nats-server", &["--version"]),
        first_line_of("uname", &["-sr"]),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        k.heartbeat,
        build.as_secs_f64()
    );
    println!("## Start\n");
    println!("| what | value |\n|---|---|");
    println!(
        "| waves of | {} agents (the next wave starts once the last is subscribed) |",
        k.wave
    );
    println!(
        "| spawning (placement wrappers, one after the other), all waves | {:.0} ms |",
        ms(spawned)
    );
    let w = |f: fn(&(Duration, f64, f64)) -> f64| {
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
        "| per wave, its first exec → all of it seen subscribed (`/connz` every {} ms), median / max | {} |",
        POLL.as_millis(),
        w(|x| ms(x.0))
    );
    println!(
        "| first exec → every agent subscribed, all waves | {:.0} ms |",
        ms(all_subscribed)
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
    if !rss_kb.is_empty() {
        let s = sorted(&rss_kb);
        println!(
            "| agent VmRSS at the end, p50 / max | {:.1} / {:.1} MB |",
            pct(&s, 0.5) / 1024.0,
            s.last().copied().unwrap_or(0.0) / 1024.0
        );
    }
    println!("\n## Storms\n");
    println!(
        "Connects are the nodes' accept times (`/connz` `start`) of the new connections, in {} ms buckets from the \
         moment shown; mean over every bucket up to the last connect. The ping load sends one ping every {} ms, \
         round-robin over all agents, each once (a ping to an agent between connections is lost: NATS is at most once).\n",
        BUCKET.as_millis(),
        k.ping_every.as_millis()
    );
    println!(
        "| storm | agents | buckets from | last connect accepted | all seen subscribed | peak / 100 ms | mean / 100 ms | peak ÷ mean | ping p50 / p99 during | pings |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    storm_rows(&format!("node {victim} stopped"), "the stop", &one);
    storm_rows(
        &format!(
            "all {NODES} restarted (down in {:.0} ms, up in {:.0} ms)",
            ms(all_down),
            ms(ready)
        ),
        "the restart",
        &all,
    );
    println!(
        "\nNode {victim}'s agents went to: {:?} (node → agents).",
        one.spread
    );
    println!("After the restart: {:?}.", all.spread);
    println!("Connects per bucket, node stopped: {:?}", one.buckets);
    println!("Connects per bucket, all restarted: {:?}", all.buckets);
    println!("\n## Dials without a rule\n");
    println!(
        "Every agent's namespace records each (address, port) a TCP SYN leaves it for; the nodes advertise {advertised:?} \
         (in no agent's settings). Destinations seen: {dialled:?} (address → agents)."
    );
    if unruled.is_empty() {
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
    Ok(())
}
