//! `make bench`: the firewall's costs measured side by side in one run, inside a throw-away
//! network namespace (the host's ruleset is never touched).
//!
//! 1. Packet path: new TCP connections/s and unanswered UDP packets/s to an unrelated loopback
//!    port, with no table, with this agent's table, and with the Go agent's rules (rendered
//!    from its source, see shared/reference/go-agent-baseline.md) — conditions interleaved
//!    round by round so that machine noise hits all of them alike; ratios against "no table".
//! 2. `bosh-agent firewall-allow monit`: wall time, first add and repeat, and max RSS of the
//!    command (with the nft it runs), plus nft's own RSS for reference.
//!
//! Not a test: it asserts nothing and prints figures for BENCHMARKS.md.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use platform::cgroup::NftCgroupPath;
use platform::firewall::render::render_ruleset;
use platform::firewall::{DesiredState, Identity, MonitPolicy, NatsPolicy};

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let res = match args.get(1).map(String::as_str) {
        Some("--inner") => inner(&args[2..]),
        Some("--allow-runs") => allow_runs(&args[2..]),
        _ => outer(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn outer() -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err("run as root (it creates a network namespace and cgroups)".into());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let trials = std::env::var("BENCH_TRIALS").unwrap_or_else(|_| "7".into());
    let secs = std::env::var("BENCH_SECONDS").unwrap_or_else(|_| "1".into());
    let st = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(&me)
        .args(["--inner", &trials, &secs])
        .status()
        .map_err(|e| format!("unshare: {e}"))?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("inner run failed: {st}"))
}

fn sh(cmd: &str, args: &[&str]) -> Res<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn nft(script: &str) -> Res<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| format!("nft: {}", String::from_utf8_lossy(&out.stderr)))
}

fn v2_mount() -> Res<PathBuf> {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if Path::new(p).join("cgroup.controllers").exists() {
            return Ok(PathBuf::from(p));
        }
    }
    Err("no cgroup2 hierarchy".into())
}

/// The Go agent's rules (upstream e94765aa1), as listed in go-agent-baseline.md.
fn go_agent_rules(nats: &[SocketAddr]) -> String {
    let mut s = String::from(
        "add table inet bosh_agent_go\n\
         add chain inet bosh_agent_go monit_access_jobs\n\
         add chain inet bosh_agent_go monit_access { type filter hook output priority filter - 1; policy accept; }\n\
         add rule inet bosh_agent_go monit_access jump monit_access_jobs\n\
         add rule inet bosh_agent_go monit_access ct state established,related accept\n\
         add rule inet bosh_agent_go monit_access meta skuid 0 ip daddr 127.0.0.1 tcp dport 2822 accept\n\
         add rule inet bosh_agent_go monit_access ip daddr 127.0.0.1 tcp dport 2822 drop\n",
    );
    if !nats.is_empty() {
        s.push_str("add chain inet bosh_agent_go nats_access { type filter hook output priority filter - 1; policy accept; }\n");
        s.push_str("add rule inet bosh_agent_go nats_access ct state established,related accept\n");
        for a in nats {
            s.push_str(&format!(
                "add rule inet bosh_agent_go nats_access meta skuid 0 ip daddr {} tcp dport {} accept\n\
                 add rule inet bosh_agent_go nats_access ip daddr {} tcp dport {} drop\n",
                a.ip(),
                a.port(),
                a.ip(),
                a.port()
            ));
        }
    }
    s
}

fn clear_tables() -> Res<()> {
    // Only the tables this benchmark creates, inside its own namespace.
    nft(
        "add table inet bosh_agent\ndelete table inet bosh_agent\nadd table inet bosh_agent_go\ndelete table inet bosh_agent_go\nadd table inet bench_floor\ndelete table inet bench_floor\n",
    )
}

struct Condition {
    name: &'static str,
    script: Option<String>,
}

fn inner(args: &[String]) -> Res<()> {
    let trials: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(7);
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    sh("ip", &["link", "set", "lo", "up"])?;
    // Wide port range: RST-closed connections leave no TIME_WAIT, but keep headroom anyway.
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000");

    let v2 = v2_mount()?;
    let cg = v2.join(format!("bosh-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(cg.join("agent")).map_err(|e| e.to_string())?;
    let guard = CgroupDirs(cg.clone());
    let rel = cg
        .join("agent")
        .strip_prefix("/sys/fs/cgroup")
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned();
    let level = rel.split('/').filter(|c| !c.is_empty()).count() as u32
        - u32::from(v2.ends_with("unified"));
    let identity = Identity::Cgroup {
        path: NftCgroupPath::new(&rel).map_err(|e| e.to_string())?,
        level,
    };
    let nats64: BTreeSet<SocketAddr> = (0..64u8)
        .map(|i| SocketAddr::from(([10, 0, 1, i], 4222)))
        .collect();
    let nats64v: Vec<SocketAddr> = nats64.iter().copied().collect();
    let ours = |nats: NatsPolicy| {
        render_ruleset(&DesiredState {
            workload: Default::default(),
            identity: identity.clone(),
            monit: MonitPolicy::Enabled { allow_root: true },
            nats,
        })
    };
    let conds = [
        Condition {
            name: "no table",
            script: None,
        },
        Condition {
            // What any nftables filter of locally generated traffic costs before a rule runs:
            // the output hook enabled at all (with no table, the kernel skips it entirely).
            name: "floor: one empty output base chain",
            script: Some(
                "add table inet bench_floor\nadd chain inet bench_floor c { type filter hook output priority filter - 1; policy accept; }\n"
                    .into(),
            ),
        },
        Condition {
            name: "this agent: monit",
            script: Some(ours(NatsPolicy::Disabled)),
        },
        Condition {
            name: "this agent: monit + NATS (64 endpoints)",
            script: Some(ours(NatsPolicy::Enabled {
                endpoints: nats64.clone(),
            })),
        },
        Condition {
            name: "Go agent rules: monit",
            script: Some(go_agent_rules(&[])),
        },
        Condition {
            name: "Go agent rules: monit + NATS (64 addresses)",
            script: Some(go_agent_rules(&nats64v)),
        },
    ];
    for c in &conds {
        if let Some(s) = &c.script {
            clear_tables()?;
            nft(s)?; // every script must load before measuring anything
        }
    }

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
    let tcp_addr = listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let dur = Duration::from_secs_f64(secs);
    let mut tcp: Vec<Vec<f64>> = vec![Vec::new(); conds.len()];
    let mut udp: Vec<Vec<f64>> = vec![Vec::new(); conds.len()];
    eprintln!(
        "bench: {trials} rounds x {} conditions x 2 loads x {secs}s",
        conds.len()
    );
    for round in 0..trials {
        for k in 0..conds.len() {
            // Rotate the order each round so no condition always runs first or last.
            let i = (k + round) % conds.len();
            clear_tables()?;
            if let Some(s) = &conds[i].script {
                nft(s)?;
            }
            tcp[i].push(tcp_rate(tcp_addr, dur)?);
            udp[i].push(udp_rate(dur)?);
        }
    }
    clear_tables()?;

    println!(
        "\n## Packet path (loopback, {trials} interleaved rounds of {secs} s; median; ratio to no table)\n"
    );
    println!(
        "| condition | new TCP conn/s | ratio | ratio to the floor | unanswered UDP pkt/s | ratio | ratio to the floor |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (t0, u0) = (median(&tcp[0]), median(&udp[0]));
    let (tf, uf) = (median(&tcp[1]), median(&udp[1]));
    for (i, c) in conds.iter().enumerate() {
        let (t, u) = (median(&tcp[i]), median(&udp[i]));
        println!(
            "| {} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} |",
            c.name,
            t,
            t / t0,
            t / tf,
            u,
            u / u0,
            u / uf
        );
    }

    allow_bench(&cg, &identity)?;
    hook_bench(&cg)?;
    drop(guard);
    Ok(())
}

/// Connections per second: connect, then close with RST (linger 0) so that no TIME_WAIT
/// accumulates across trials.
fn tcp_rate(addr: SocketAddr, dur: Duration) -> Res<f64> {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        setsockopt(
            &s,
            Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .map_err(|e| e.to_string())?;
        drop(s);
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Unanswered UDP datagrams per second to a port nobody listens on (unconnected socket, so
/// the ICMP errors do not surface as send errors).
fn udp_rate(dur: Duration) -> Res<f64> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    let buf = [0u8; 64];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..64 {
            let _ = sock.send_to(&buf, to);
            n += 1;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

struct CgroupDirs(PathBuf);
impl Drop for CgroupDirs {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.0) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Installs this agent's monit table, then measures `firewall-allow monit` in a child process
/// (so that its RUSAGE_CHILDREN max RSS covers only those commands and their nft).
fn allow_bench(cg: &Path, identity: &Identity) -> Res<()> {
    let runs = 30;
    nft(&render_ruleset(&DesiredState {
        workload: Default::default(),
        identity: identity.clone(),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats: NatsPolicy::Disabled,
    }))?;
    let agent = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("bosh-agent");
    let run_dir = std::env::temp_dir().join(format!("bosh-agent-bench-run-{}", std::process::id()));
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(&me)
        .arg("--allow-runs")
        .arg(&agent)
        .arg(cg)
        .arg(runs.to_string())
        .env("BOSH_AGENT_RUN_DIR", &run_dir)
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&run_dir);
    if !out.status.success() {
        return Err(format!(
            "allow runs: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    clear_tables()
}

/// Child of [`allow_bench`]: `runs` first adds (each from a new cgroup) and `runs` repeats
/// (from one cgroup), timing each command alone.
fn allow_runs(args: &[String]) -> Res<()> {
    let (agent, cg, runs) = match args {
        [a, c, r] => (
            PathBuf::from(a),
            PathBuf::from(c),
            r.parse::<usize>().map_err(|e| e.to_string())?,
        ),
        _ => return Err("usage: --allow-runs <bosh-agent> <cgroup dir> <runs>".into()),
    };
    let home = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let home_rel = home
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .to_string();
    let v2 = v2_mount()?;
    let home_dir = v2.join(home_rel.trim_start_matches('/'));
    let me = std::process::id().to_string();
    let time_one = |dir: &Path| -> Res<f64> {
        // The child inherits the cgroup the bench sits in at spawn time: the job's.
        std::fs::write(dir.join("cgroup.procs"), &me)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let t = Instant::now();
        let st = Command::new(&agent)
            .args(["firewall-allow", "monit"])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        std::fs::write(home_dir.join("cgroup.procs"), &me).map_err(|e| e.to_string())?;
        st.success()
            .then_some(ms)
            .ok_or_else(|| format!("firewall-allow failed: {st}"))
    };
    let mut first = Vec::new();
    for i in 0..runs {
        let d = cg.join(format!("job{i}"));
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        first.push(time_one(&d)?);
    }
    let mut repeat = Vec::new();
    let d = cg.join("job0");
    for _ in 0..runs {
        repeat.push(time_one(&d)?);
    }
    let rss_tree = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(|e| e.to_string())?
        .max_rss();
    let stats = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        (s[0], s[s.len() / 2], s[s.len() - 1])
    };
    let (a, b, c) = stats(&first);
    let (d2, e, f) = stats(&repeat);
    println!("\n## `bosh-agent firewall-allow monit` ({runs} runs each; min / median / max ms)\n");
    println!("| figure | this agent | Go agent (baseline doc) |");
    println!("|---|---|---|");
    println!("| wall, first add | {a:.2} / {b:.2} / {c:.2} | 5.56 / 6.74 / 25.28 |");
    println!("| wall, repeat | {d2:.2} / {e:.2} / {f:.2} | 11.81 / 17.85 / 24.46 |");
    println!(
        "| max RSS of the command incl. the nft it runs | {:.1} MB | ~12.7 MB |",
        rss_tree as f64 / 1024.0
    );
    Ok(())
}

/// The NATS before-connect hook as the agent runs it: a fresh resolution of the director's
/// name (hosts file with N addresses, re-read each time, as the agent's resolver does), then
/// the commit of exactly those endpoints. "repeat" is a reconnect that resolves to the same
/// endpoints (nothing to commit); "changed" is one where one address moved.
fn hook_bench(cg: &Path) -> Res<()> {
    let runs = 15;
    let me = std::process::id().to_string();
    // The hook runs in the agent; the agent sits in its own cgroup (a cgroup identity).
    let home = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let home_dir = v2_mount()?.join(
        home.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/'),
    );
    let agent_dir = cg.join("agent");
    std::fs::write(agent_dir.join("cgroup.procs"), &me).map_err(|e| e.to_string())?;
    let res = hook_runs(&dir_for_hook()?, runs);
    // Back home, so the benchmark's cgroups can be removed.
    std::fs::write(home_dir.join("cgroup.procs"), &me).map_err(|e| e.to_string())?;
    res
}

fn dir_for_hook() -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bosh-agent-bench-hook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

fn hook_runs(dir: &Path, runs: usize) -> Res<()> {
    use agent::config::LinuxOptions;
    use agent::firewall::Firewall;
    use mbus::{FreshResolver, MbusUrl, ResolverSource, parse_mbus_url};

    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").map_err(|e| e.to_string())?;
    let hosts = dir.join("hosts");
    let url = match parse_mbus_url("nats://director.bench:4222").map_err(|e| e.to_string())? {
        MbusUrl::Server(s) => s,
        MbusUrl::SkippedHttps(u) => return Err(format!("unexpected https {u}")),
    };
    let mut linux = LinuxOptions {
        enable_nats_firewall: true,
        ..LinuxOptions::default()
    };
    linux.firewall.monit_allow_root = true;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut resolver = FreshResolver::new(ResolverSource::Files {
        resolv_conf: resolv,
        hosts: Some(hosts.clone()),
    });

    println!(
        "\n## NATS before-connect hook: fresh resolution + rules committed, as the dial waits for it ({runs} runs; min / median / max ms)\n"
    );
    println!(
        "| endpoints | first | repeat (same answer) | changed (one address moved) | after the dial, off the path (read-back; rebuild when one moved) | Go agent (doc) first / repeat |"
    );
    println!("|---|---|---|---|---|---|");
    for n in [1usize, 64, 1024] {
        let write_hosts = |shift: usize| -> Res<()> {
            let mut t = String::new();
            for i in 0..n {
                let j = if i == 0 { i + shift } else { i };
                t.push_str(&format!(
                    "10.{}.{}.{} director.bench\n",
                    64 + j / 65536,
                    (j / 256) % 256,
                    j % 256
                ));
            }
            std::fs::write(&hosts, t).map_err(|e| e.to_string())
        };
        // Critical path: resolve + protect (what the dial waits for); then what the agent runs
        // after the dial (the exact rebuild when an endpoint went away, else the read-back),
        // timed apart.
        let mut hook = |fw: &mut Firewall, rebuilds: &mut Vec<f64>| -> Res<f64> {
            let t = Instant::now();
            let res = rt.block_on(resolver.resolve(std::slice::from_ref(&url)));
            let eps: BTreeSet<SocketAddr> = res.endpoints().into_iter().collect();
            if eps.len() != n {
                return Err(format!("resolved {} of {n} endpoints", eps.len()));
            }
            let follow_up = fw.protect_nats_endpoints(eps).map_err(|e| e.to_string())?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if follow_up {
                let t = Instant::now();
                fw.after_dial().map_err(|e| e.to_string())?;
                rebuilds.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(ms)
        };
        let (mut first, mut repeat, mut changed, mut rebuilds) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            clear_tables()?;
            let mut fw = Firewall::establish(
                &linux,
                platform::firewall::nft::Nft::default(),
                dir.join("run"),
            );
            fw.apply().map_err(|e| e.to_string())?; // the monit policy, installed at bootstrap
            write_hosts(0)?;
            first.push(hook(&mut fw, &mut rebuilds)?);
            repeat.push(hook(&mut fw, &mut rebuilds)?);
            write_hosts(n + 1)?;
            changed.push(hook(&mut fw, &mut rebuilds)?);
            let live = Command::new("nft")
                .args(["list", "set", "inet", "bosh_agent", "nats_v4"])
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&live.stdout);
            if text.matches(" . 4222").count() != n {
                return Err(format!(
                    "after the rebuild the set holds {} of {n}",
                    text.matches(" . 4222").count()
                ));
            }
        }
        let f = |v: &[f64]| {
            if v.is_empty() {
                return "-".to_string();
            }
            let mut s = v.to_vec();
            s.sort_by(|a, b| a.total_cmp(b));
            format!(
                "{:.2} / {:.2} / {:.2}",
                s[0],
                s[s.len() / 2],
                s[s.len() - 1]
            )
        };
        let go = match n {
            1 => "0.23 / ~10",
            64 => "fails (ENOBUFS above 60)",
            _ => "fails",
        };
        println!(
            "| {n} | {} | {} | {} | {} | {go} |",
            f(&first),
            f(&repeat),
            f(&changed),
            f(&rebuilds)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    clear_tables()
}
