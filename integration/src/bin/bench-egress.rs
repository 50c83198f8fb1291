//! `bench-egress`: the costs of the workload policies, side by side in one run, inside
//! throw-away network namespaces (the host's ruleset and interfaces are never touched).
//!
//! Throughput on a shared VM drifts by 10-15 % from one second to the next, which hides a
//! 2 % effect. So the run is many short rounds; each round measures every condition back to
//! back, in an order that rotates from round to round, and every ratio is computed within a
//! round (numerator and denominator measured seconds apart) and reported as the median of the
//! per-round ratios with its interquartile range. Rates are reported as medians too.
//!
//! 1. Unrelated traffic (loopback UDP packets/s and TCP connections/s, which cross the
//!    output hook) with: no table; the floor (one empty output base chain); the floor with
//!    connection tracking on; the egress deny list as rendered (prefilter, conntrack guard)
//!    with 1 range and with `BENCH_RANGES` (10,000) ranges; the N ranges without the
//!    prefilter (the shape before it); and the stateless guard with 1 and N ranges.
//! 2. Allowed inbound traffic over a veth from a second namespace (TCP connections/s, UDP
//!    packets/s) with the ingress allow-list off, off with connection tracking on, and on.
//! 3. Commit time (`nft -f`) of the table with `BENCH_RANGES` ranges, of the full rebuild
//!    after a one-range change, and of that one range added on its own.
//! 4. Where the CPU goes (the throughput rounds cannot resolve 2 % here): a UDP flood pinned
//!    to the last CPU, profiled there with `perf record -e cpu-clock` for
//!    `BENCH_PROFILE_SECONDS` per condition; the share of the samples in nf_tables' code
//!    (the hook walk and every chain and expression) and in conntrack's, their nanoseconds per
//!    packet, and the throughput ratio they imply, `(1 - share_x) / (1 - share_floor)`: what
//!    the rules cost when everything else a packet costs is the same.
//!
//! Knobs: `BENCH_ROUNDS` (40), `BENCH_SECONDS` per measurement (0.25), `BENCH_RANGES`
//! (10000), `BENCH_COMMIT_TRIALS` (7), `BENCH_PROFILE_SECONDS` (3; 0 leaves the profile out,
//! and without `perf` it is reported as not run). Not a test: it asserts nothing and prints
//! figures.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use platform::cgroup::NftCgroupPath;
use platform::firewall::policy::{
    Cidr, Egress, EgressAction, EgressEntry, EgressPolicy, EgressSets, EgressTracking, Ingress,
    IngressEntry, IngressPolicy, IngressSets, PortRange, Proto, WorkloadPolicy,
};
use platform::firewall::render::render_ruleset;
use platform::firewall::{DesiredState, Identity, MonitPolicy, NatsPolicy};

type Res<T> = Result<T, String>;

const SERVER: &str = "10.200.0.1";
const CLIENT: &str = "10.200.0.2";
const TCP_PORT: u16 = 5000;
const UDP_PORT: u16 = 5001;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let res = match args.get(1).map(String::as_str) {
        Some("--inner") => inner(),
        Some("--client") => client(&args[2..]),
        Some("--udp-flood") => udp_flood(&args[2..]),
        _ => outer(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-egress: {e}");
            ExitCode::FAILURE
        }
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn outer() -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err("run as root (it creates network namespaces)".into());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let st = Command::new("unshare")
        .args(["--net", "--"])
        .arg(&me)
        .arg("--inner")
        .status()
        .map_err(|e| format!("unshare: {e}"))?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("inner run failed: {st}"))
}

fn run(cmd: &str, args: &[&str]) -> Res<()> {
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

/// Applies a script with `nft -f -`; returns the wall time of the nft run.
fn nft(script: &str) -> Res<Duration> {
    let start = Instant::now();
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    let took = start.elapsed();
    if out.status.success() {
        Ok(took)
    } else {
        Err(format!(
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn reset() -> Res<()> {
    nft("add table inet bosh_agent\ndelete table inet bosh_agent\n").map(|_| ())
}

fn base(workload: WorkloadPolicy) -> DesiredState {
    DesiredState {
        identity: Identity::Cgroup {
            path: NftCgroupPath::new("").unwrap_or_else(|_| unreachable_path()),
            level: 1,
        },
        monit: MonitPolicy::Disabled,
        nats: NatsPolicy::Disabled,
        workload,
    }
}

fn unreachable_path() -> NftCgroupPath {
    // "" is always a valid path; this is never called.
    NftCgroupPath::new("x").unwrap_or_else(|_| std::process::abort())
}

fn ranges(n: u32) -> Vec<EgressEntry> {
    (0..n)
        .filter_map(|i| {
            let a = Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i.wrapping_mul(512)));
            Cidr::parse(&format!("{a}/24")).ok()
        })
        .map(|destination| EgressEntry {
            destination,
            except: Vec::new(),
        })
        .collect()
}

fn egress(n: u32, tracking: EgressTracking) -> DesiredState {
    base(WorkloadPolicy {
        egress: EgressPolicy::Enabled(Egress {
            sets: EgressSets::compile(&ranges(n)),
            action: EgressAction::Drop,
            tracking,
            allowed: Vec::new(),
        }),
        ..Default::default()
    })
}

fn ingress() -> DesiredState {
    let e = |proto, p| IngressEntry {
        proto,
        ports: PortRange::single(p),
        sources: Vec::new(),
    };
    base(WorkloadPolicy {
        ingress: IngressPolicy::Enabled(Ingress {
            sets: IngressSets::compile(&[
                e(Proto::Tcp, 22),
                e(Proto::Tcp, TCP_PORT),
                e(Proto::Udp, UDP_PORT),
                e(Proto::Tcp, 8443),
            ]),
            allow_icmp: true,
            ct_invalid: Default::default(),
        }),
        ..Default::default()
    })
}

const FLOOR: &str = "add table inet bosh_agent\nadd chain inet bosh_agent floor { type filter hook output priority filter - 1; policy accept; }\n";

/// A table whose only effect is to switch connection tracking on: one input base chain with
/// the rule many hosts carry anyway (the bench's traffic is never invalid, so it never drops).
const CONNTRACK_ON: &str = "add table inet bosh_agent\nadd chain inet bosh_agent ct_only { type filter hook input priority filter; policy accept; }\nadd rule inet bosh_agent ct_only ct state invalid drop\n";

/// UDP packets/s from `from` to a bound (never read) socket at `to`.
fn udp_rate(to: SocketAddr, secs: f64) -> Res<f64> {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let s = UdpSocket::bind(bind).map_err(|e| format!("udp bind: {e}"))?;
    s.connect(to).map_err(|e| format!("udp connect: {e}"))?;
    let payload = [0u8; 64];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..256 {
            // A full receive queue drops the packet after the hooks ran: still counted.
            let _ = s.send(&payload);
            n += 1;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// New TCP connections/s to `to` (each connected and closed).
fn tcp_rate(to: SocketAddr, secs: f64) -> Res<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let c = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| format!("connect {to}: {e}"))?;
        // Reset on close: no TIME-WAIT pile-up exhausting the ephemeral ports.
        let _ = nix::sys::socket::setsockopt(
            &c,
            nix::sys::socket::sockopt::Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        );
        drop(c);
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn serve(addr: SocketAddr) -> Res<()> {
    let l = TcpListener::bind(addr).map_err(|e| format!("listen {addr}: {e}"))?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    Ok(())
}

/// The `p` quantile (0..=1) of sorted values, interpolated between neighbours.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let pos = p * last as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (a, b) = (sorted[lo.min(last)], sorted[hi.min(last)]);
    a + (b - a) * (pos - lo as f64)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn median(v: Vec<f64>) -> f64 {
    quantile(&sorted(v), 0.5)
}

/// Median and interquartile range, printed as `0.995 [0.981-1.004]` (`digits` decimals).
fn spread_with(v: Vec<f64>, digits: usize) -> String {
    let v = sorted(v);
    format!(
        "{:.digits$} [{:.digits$}-{:.digits$}]",
        quantile(&v, 0.5),
        quantile(&v, 0.25),
        quantile(&v, 0.75)
    )
}

fn spread(v: Vec<f64>) -> String {
    spread_with(v, 3)
}

/// One condition: a name and the script that sets it up (none: no table).
struct Condition {
    name: &'static str,
    script: Option<String>,
}

/// Per condition, per round, the two rates `measure` returns. Round `r` runs the conditions
/// starting at `r % len`, so none is always first or last after a reset.
fn run_rounds(
    conds: &[Condition],
    rounds: usize,
    mut measure: impl FnMut() -> Res<[f64; 2]>,
) -> Res<Vec<Vec<[f64; 2]>>> {
    let mut out: Vec<Vec<[f64; 2]>> = vec![Vec::with_capacity(rounds); conds.len()];
    for r in 0..rounds {
        for k in 0..conds.len() {
            let i = (r + k) % conds.len();
            reset()?;
            if let Some(s) = &conds[i].script {
                nft(s)?;
            }
            out[i].push(measure()?);
        }
    }
    reset()?;
    Ok(out)
}

/// Prints the median rates of every condition, then each ratio `num / den` as the median of
/// its per-round ratios with the interquartile range.
fn report(
    title: &str,
    units: [&str; 2],
    conds: &[Condition],
    rates: &[Vec<[f64; 2]>],
    ratios: &[(&str, usize, usize)],
) {
    println!("\n{title:<44} {:>14} {:>14}", units[0], units[1]);
    for (c, r) in conds.iter().zip(rates) {
        let m = |k: usize| median(r.iter().map(|x| x[k]).collect());
        println!("{:<44} {:>14.0} {:>14.0}", c.name, m(0), m(1));
    }
    println!(
        "{:<44} {:>22} {:>22}",
        "ratio (median of per-round ratios [IQR])", units[0], units[1]
    );
    for (name, num, den) in ratios {
        let per_round = |k: usize| -> Vec<f64> {
            rates[*num]
                .iter()
                .zip(&rates[*den])
                .map(|(a, b)| a[k] / b[k])
                .collect()
        };
        println!(
            "{name:<44} {:>22} {:>22}",
            spread(per_round(0)),
            spread(per_round(1))
        );
    }
}

fn inner() -> Res<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 40).max(1);
    let secs: f64 = env_or("BENCH_SECONDS", 0.25);
    let n: u32 = env_or("BENCH_RANGES", 10_000);
    let commit_trials: usize = env_or("BENCH_COMMIT_TRIALS", 7).max(1);
    let profile_secs: f64 = env_or("BENCH_PROFILE_SECONDS", 3.0);
    run("ip", &["link", "set", "lo", "up"])?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "bench-egress: {rounds} rounds × {secs} s per measurement, conditions rotated each round, {n} deny ranges; load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // 1. Unrelated loopback traffic across the output hook.
    let udp_to: SocketAddr = "127.0.0.1:9999".parse().map_err(|e| format!("{e}"))?;
    let _sink = UdpSocket::bind(udp_to).map_err(|e| format!("udp sink: {e}"))?;
    let tcp_to: SocketAddr = "127.0.0.1:9998".parse().map_err(|e| format!("{e}"))?;
    serve(tcp_to)?;
    let tracked = EgressTracking::Conntrack;
    let many = render_ruleset(&egress(n, tracked));
    // The shape before the prefilter: the interval lookup for every packet.
    let many_no_prefilter = many
        .replace("meta nfproto ipv4 @nh,128,16 @egress_deny_v4_hi ", "")
        .replace("meta nfproto ipv6 @nh,192,16 @egress_deny_v6_hi ", "");
    // The conntrack guard switches tracking on for the namespace: the tracked floor
    // separates that cost from the rules'.
    let tracked_floor = format!(
        "{FLOOR}{}",
        CONNTRACK_ON.replace("add table inet bosh_agent\n", "")
    );
    let conds = [
        Condition {
            name: "no table",
            script: None,
        },
        Condition {
            name: "floor (one empty base chain)",
            script: Some(FLOOR.to_string()),
        },
        Condition {
            name: "floor, conntrack on",
            script: Some(tracked_floor),
        },
        Condition {
            name: "egress 1 range (prefilter, conntrack)",
            script: Some(render_ruleset(&egress(1, tracked))),
        },
        Condition {
            name: "egress N ranges (prefilter, conntrack)",
            script: Some(many.clone()),
        },
        Condition {
            name: "egress N ranges, no prefilter (before)",
            script: Some(many_no_prefilter),
        },
        Condition {
            name: "stateless 1 range",
            script: Some(render_ruleset(&egress(1, EgressTracking::Stateless))),
        },
        Condition {
            name: "stateless N ranges",
            script: Some(render_ruleset(&egress(n, EgressTracking::Stateless))),
        },
    ];
    let rates = run_rounds(&conds, rounds, || {
        Ok([udp_rate(udp_to, secs)?, tcp_rate(tcp_to, secs)?])
    })?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let profiles_out = profile_conditions(&conds, &[1, 2, 3, 4, 6, 7], profile_secs, |secs| {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(profile_cpu().to_string()).arg(&me);
        c.args(["--udp-flood", &udp_to.to_string(), &secs.to_string()]);
        c
    })?;
    report(
        "unrelated traffic (loopback, output hook)",
        ["UDP pkt/s", "TCP conn/s"],
        &conds,
        &rates,
        &[
            ("egress N / egress 1 (target >= 0.98)", 4, 3),
            ("egress 1 / tracked floor (target >= 0.98)", 3, 2),
            ("egress N / tracked floor (target >= 0.98)", 4, 2),
            ("egress N no prefilter / egress 1", 5, 3),
            ("stateless N / stateless 1", 7, 6),
            ("stateless 1 / floor (target >= 0.98)", 6, 1),
            ("stateless N / floor (target >= 0.98)", 7, 1),
            ("egress 1 / floor (tracking and rules)", 3, 1),
            ("tracked floor / floor (tracking alone)", 2, 1),
            ("floor / no table", 1, 0),
        ],
    );

    // 2. Allowed inbound traffic over a veth, ingress list off and on.
    let mut peer = Command::new("unshare")
        .args(["--net", "sleep", "3600"])
        .spawn()
        .map_err(|e| format!("unshare: {e}"))?;
    let pid = peer.id().to_string();
    // Wait until the child has its own namespace: before that its pid names ours.
    {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| format!("ns: {e}"))?
            .ino();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(format!("/proc/{pid}/ns/net")).map_or(true, |m| m.ino() == ours) {
            if Instant::now() > deadline {
                let _ = peer.kill();
                return Err("the peer namespace did not appear".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let ns = format!("/proc/{pid}/ns/net");
    let result = (|| -> Res<Vec<Profile>> {
        run(
            "ip",
            &[
                "link", "add", "b0", "type", "veth", "peer", "name", "b1", "netns", &pid,
            ],
        )?;
        run("ip", &["addr", "add", &format!("{SERVER}/24"), "dev", "b0"])?;
        run("ip", &["link", "set", "b0", "up"])?;
        for args in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", "10.200.0.2/24", "dev", "b1"],
            vec!["ip", "link", "set", "b1", "up"],
        ] {
            let mut a = vec!["--net=".to_string() + &ns, "--".into()];
            a.extend(args.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            run("nsenter", &refs)?;
        }
        serve(
            format!("{SERVER}:{TCP_PORT}")
                .parse()
                .map_err(|e| format!("{e}"))?,
        )?;
        let _sink = UdpSocket::bind(format!("{SERVER}:{UDP_PORT}"))
            .map_err(|e| format!("udp sink: {e}"))?;
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        // Any `ct` expression switches connection tracking on for the namespace, and the
        // allow-list needs it for its return traffic. Most VMs track connections already (the
        // stemcell's own firewall, container runtimes, `ct state invalid drop` defaults), so the
        // filter's own cost is measured against that too, not only against an untracked host.
        let ingress_on = render_ruleset(&ingress());
        // The chain's shape before a few single ports became compares: every open port in its
        // protocol's bitmap set, one lookup per packet.
        let ingress_before = ports_in_bitmaps(&ingress_on);
        if ingress_before == ingress_on {
            return Err("the ingress chain no longer has the shape this benchmark rewrites".into());
        }
        let conds = [
            Condition {
                name: "ingress off",
                script: None,
            },
            Condition {
                name: "ingress off, conntrack on",
                script: Some(CONNTRACK_ON.to_string()),
            },
            Condition {
                name: "ingress on",
                script: Some(ingress_on.clone()),
            },
            Condition {
                name: "ingress on, ports in bitmap sets (before)",
                script: Some(ingress_before),
            },
        ];
        let rates = run_rounds(&conds, rounds, || {
            let out = Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .arg("--")
                .arg(&me)
                .args(["--client", &secs.to_string()])
                .output()
                .map_err(|e| format!("client: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "client: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Vec<f64> = text
                .split_whitespace()
                .filter_map(|w| w.parse::<f64>().ok())
                .collect();
            match v[..] {
                [t, u] => Ok([t, u]),
                _ => Err(format!("client printed {text:?}")),
            }
        })?;
        report(
            "allowed inbound over a veth",
            ["TCP conn/s", "UDP pkt/s"],
            &conds,
            &rates,
            &[
                ("on / off, conntrack on (target >= 0.97)", 2, 1),
                ("on / off (target >= 0.97)", 2, 0),
                ("before / off, conntrack on", 3, 1),
                ("on / before", 2, 3),
                ("conntrack on / off (tracking alone)", 1, 0),
            ],
        );
        let udp_to = format!("{SERVER}:{UDP_PORT}");
        let profiles_in = profile_conditions(&conds, &[1, 2, 3], profile_secs, |secs| {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}")).args(["--", "taskset", "-c"]);
            c.arg(profile_cpu().to_string()).arg(&me);
            c.args(["--udp-flood", &udp_to, &secs.to_string()]);
            c
        })?;
        Ok(profiles_in)
    })();
    let _ = peer.kill();
    let _ = peer.wait();
    let profiles_in = result?;

    // 3. Commit times.
    let mut full = Vec::new();
    let mut rebuild = Vec::new();
    let mut single = Vec::new();
    let changed = render_ruleset(&egress(n + 1, tracked));
    let extra = ranges(n + 1).pop().map(|e| e.destination);
    for _ in 0..commit_trials {
        reset()?;
        full.push(nft(&many)?.as_secs_f64() * 1e3);
        rebuild.push(nft(&changed)?.as_secs_f64() * 1e3);
        nft(&many)?;
        if let Some(c) = extra {
            // The range and its prefilter bucket, as one transaction.
            let std::net::IpAddr::V4(a) = c.addr else {
                continue;
            };
            let bucket = u32::from(a) >> 16;
            single.push(
                nft(&format!(
                    "add element inet bosh_agent egress_deny_v4 {{ {c} }}\nadd element inet bosh_agent egress_deny_v4_hi {{ {bucket:#x} }}\n"
                ))?
                .as_secs_f64()
                    * 1e3,
            );
        }
    }
    reset()?;
    println!("\ncommit (nft -f wall time, {commit_trials} trials)  ms: median [IQR]");
    println!(
        "{n} ranges, fresh table              {}",
        spread_with(full, 1)
    );
    println!(
        "rebuild after +1 range              {}",
        spread_with(rebuild, 1)
    );
    println!(
        "+1 range, element only              {}",
        spread_with(single, 1)
    );

    // 4. The profiles (measured with the rounds above, printed last).
    report_profiles(
        "unrelated loopback UDP, output hook",
        &profiles_out,
        &[
            ("egress N / egress 1 (target >= 0.98)", 4, 3),
            ("egress N / tracked floor (target >= 0.98)", 4, 2),
            ("egress 1 / tracked floor (target >= 0.98)", 3, 2),
            ("stateless 1 / floor (target >= 0.98)", 6, 1),
            ("stateless N / floor (target >= 0.98)", 7, 1),
            ("stateless N / stateless 1", 7, 6),
            ("tracked floor / floor", 2, 1),
        ],
    );
    report_profiles(
        "allowed inbound UDP over the veth",
        &profiles_in,
        &[
            ("on / off, conntrack on (target >= 0.97)", 2, 1),
            ("before / off, conntrack on", 3, 1),
            ("on / before", 2, 3),
        ],
    );
    Ok(())
}

/// `script` with its ingress port compares (`… ingress_filter tcp dport 22 accept`) turned
/// back into one bitmap lookup per protocol, the elements added to the sets.
fn ports_in_bitmaps(script: &str) -> String {
    const RULE: &str = "add rule inet bosh_agent ingress_filter ";
    let mut ports: [(&str, Vec<&str>); 2] = [("udp", Vec::new()), ("tcp", Vec::new())];
    let mut out = Vec::new();
    let mut placed = false;
    for line in script.lines() {
        let inline = line.strip_prefix(RULE).and_then(|r| {
            let w: Vec<&str> = r.split_whitespace().collect();
            match w[..] {
                [p @ ("tcp" | "udp"), "dport", n, "accept"] if !n.starts_with('@') => Some((p, n)),
                _ => None,
            }
        });
        match inline {
            Some((p, n)) => {
                if let Some((_, v)) = ports.iter_mut().find(|(q, _)| *q == p) {
                    v.push(n);
                }
                if !placed {
                    out.push(format!("{RULE}udp dport @ingress_udp_ports accept"));
                    out.push(format!("{RULE}tcp dport @ingress_tcp_ports accept"));
                    placed = true;
                }
            }
            None => out.push(line.to_string()),
        }
    }
    // The elements go in after the sets were made and flushed: where the chain is made.
    let mut text = String::new();
    for line in out {
        if line.starts_with("add chain inet bosh_agent ingress_filter {") {
            for (p, v) in ports.iter().filter(|(_, v)| !v.is_empty()) {
                text.push_str(&format!(
                    "add element inet bosh_agent ingress_{p}_ports {{ {} }}\n",
                    v.join(", ")
                ));
            }
        }
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// One condition's profile on the flood's CPU.
struct Profile {
    /// Index of the condition in its list.
    index: usize,
    name: &'static str,
    packets: f64,
    samples: f64,
    nft: f64,
    conntrack: f64,
}

/// The profile's sampling rate (`perf record -F`).
const PROFILE_HZ: u32 = 4999;

/// The CPU the flood and the profile are pinned to: the last one.
fn profile_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .saturating_sub(1)
}

/// nf_tables' code: the hook walk, the chains, every expression and set lookup.
fn is_nftables(sym: &str) -> bool {
    sym == "nf_hook_slow"
        || ["nft_", "__nft_", "nf_tables_", "nft_pipapo"]
            .iter()
            .any(|p| sym.starts_with(p))
}

/// Connection tracking's code.
fn is_conntrack(sym: &str) -> bool {
    [
        "nf_conntrack",
        "__nf_conntrack",
        "nf_ct_",
        "__nf_ct_",
        "ipv4_conntrack",
        "ipv6_conntrack",
        "hash_conntrack",
        "nf_nat",
    ]
    .iter()
    .any(|p| sym.starts_with(p))
}

/// Profiles each condition of `which` (indices into `conds`): sets its ruleset up, runs the
/// flood `flood(secs)` builds under `perf record -e cpu-clock -C <cpu>`, and splits the
/// samples. Empty when `secs` is 0 or perf is missing (said once).
fn profile_conditions(
    conds: &[Condition],
    which: &[usize],
    secs: f64,
    flood: impl Fn(f64) -> Command,
) -> Res<Vec<Profile>> {
    if secs <= 0.0 {
        return Ok(Vec::new());
    }
    if Command::new("perf").arg("--version").output().is_err() {
        println!("\nprofile not run: no `perf` (Debian: apt-get install linux-perf)");
        return Ok(Vec::new());
    }
    let data = std::env::temp_dir().join(format!("bench-egress-{}.perf", std::process::id()));
    let mut out = Vec::new();
    for &i in which {
        let Some(c) = conds.get(i) else {
            return Err(format!("no condition {i} to profile"));
        };
        reset()?;
        if let Some(s) = &c.script {
            nft(s)?;
        }
        let f = flood(secs);
        let mut rec = Command::new("perf");
        rec.args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            &PROFILE_HZ.to_string(),
            "-C",
        ])
        .arg(profile_cpu().to_string())
        .arg("-o")
        .arg(&data)
        .arg("--")
        .arg(f.get_program())
        .args(f.get_args());
        let run = rec.output().map_err(|e| format!("perf record: {e}"))?;
        if !run.status.success() {
            return Err(format!(
                "perf record: {}",
                String::from_utf8_lossy(&run.stderr).trim()
            ));
        }
        let packets: f64 = String::from_utf8_lossy(&run.stdout)
            .split_whitespace()
            .last()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| {
                format!(
                    "the flood printed {:?}",
                    String::from_utf8_lossy(&run.stdout)
                )
            })?;
        let rep = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "-n",
                "--no-children",
                "--sort",
                "sym",
                "-i",
            ])
            .arg(&data)
            .output()
            .map_err(|e| format!("perf report: {e}"))?;
        let _ = std::fs::remove_file(&data);
        let (mut samples, mut nft_s, mut ct_s) = (0.0, 0.0, 0.0);
        for line in String::from_utf8_lossy(&rep.stdout).lines() {
            let mut w = line.split_whitespace();
            let (Some(pct), Some(n), Some(_kind), Some(sym)) =
                (w.next(), w.next(), w.next(), w.next())
            else {
                continue;
            };
            let (Some(_), Ok(n)) = (pct.strip_suffix('%'), n.parse::<f64>()) else {
                continue;
            };
            samples += n;
            if is_nftables(sym) {
                nft_s += n;
            } else if is_conntrack(sym) {
                ct_s += n;
            }
        }
        if samples == 0.0 {
            return Err(format!("perf report gave no samples for {}", c.name));
        }
        out.push(Profile {
            index: i,
            name: c.name,
            packets,
            samples,
            nft: nft_s,
            conntrack: ct_s,
        });
    }
    reset()?;
    Ok(out)
}

/// Prints each profile and the ratios `(1 - nf_tables share of num) / (1 - that of den)`,
/// `num` and `den` being indices into the conditions the profiles were made from.
fn report_profiles(title: &str, profiles: &[Profile], ratios: &[(&str, usize, usize)]) {
    if profiles.is_empty() {
        return;
    }
    println!(
        "\nprofile: {title} (perf cpu-clock on CPU {}, the flood pinned there)",
        profile_cpu()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>12} {:>12} {:>12}",
        "condition", "pkt/s", "samples", "nf_tables %", "ns/pkt nft", "conntrack %"
    );
    let hz = f64::from(PROFILE_HZ);
    for p in profiles {
        let secs = p.samples / hz;
        println!(
            "{:<44} {:>9.0} {:>9.0} {:>12.2} {:>12.1} {:>12.2}",
            p.name,
            p.packets / secs,
            p.samples,
            100.0 * p.nft / p.samples,
            1e9 * p.nft / hz / p.packets,
            100.0 * p.conntrack / p.samples,
        );
    }
    println!("implied throughput ratio, (1 - nf_tables share) / (1 - that of the reference):");
    for (name, num, den) in ratios {
        let find = |i: usize| profiles.iter().find(|p| p.index == i);
        if let (Some(a), Some(b)) = (find(*num), find(*den)) {
            let share = |p: &Profile| p.nft / p.samples;
            println!("{name:<44} {:>9.3}", (1.0 - share(a)) / (1.0 - share(b)));
        }
    }
}

/// `--udp-flood <addr> <secs>`: sends 64-byte datagrams to `addr` for `secs` seconds and
/// prints how many it sent.
fn udp_flood(args: &[String]) -> Res<()> {
    let to: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .ok_or("usage: --udp-flood <addr> <secs>")?;
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let rate = udp_rate(to, secs)?;
    println!("{:.0}", rate * secs);
    Ok(())
}

fn client(args: &[String]) -> Res<()> {
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let _ = CLIENT;
    let t = tcp_rate(
        format!("{SERVER}:{TCP_PORT}")
            .parse()
            .map_err(|e| format!("{e}"))?,
        secs,
    )?;
    let u = udp_rate(
        format!("{SERVER}:{UDP_PORT}")
            .parse()
            .map_err(|e| format!("{e}"))?,
        secs,
    )?;
    println!("{t} {u}");
    Ok(())
}
