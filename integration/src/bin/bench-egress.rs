//! `bench-egress`: the costs of the workload policies, side by side in one run, inside
//! throw-away network namespaces (the host's ruleset and interfaces are never touched).
//!
//! 1. Unrelated traffic (loopback UDP packets/s and TCP connections/s, which cross the
//!    output hook) with: no table, the floor (one empty output base chain), the egress deny
//!    list with 1 range, and with `BENCH_RANGES` (10,000) ranges, and the floor with connection
//!    tracking on (the egress guard switches it on: this separates its cost from the rules').
//!    Conditions are interleaved round by round so machine noise hits all alike; ratios
//!    against the floor, 1 range and the tracked floor.
//! 2. Allowed inbound traffic over a veth from a second namespace (TCP connections/s, UDP
//!    packets/s) with the ingress allow-list off, off with connection tracking on, and on.
//! 3. Commit time (`nft -f`) of the table with `BENCH_RANGES` ranges, of the full rebuild
//!    after a one-range change, and of that one range added on its own.
//!
//! Knobs: `BENCH_TRIALS` (5), `BENCH_SECONDS` per measurement (1.0), `BENCH_RANGES` (10000).
//! Not a test: it asserts nothing and prints figures.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use platform::cgroup::NftCgroupPath;
use platform::firewall::policy::{
    Cidr, Egress, EgressAction, EgressEntry, EgressPolicy, EgressSets, Ingress, IngressEntry,
    IngressPolicy, IngressSets, PortRange, Proto, WorkloadPolicy,
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

fn egress(n: u32) -> DesiredState {
    base(WorkloadPolicy {
        egress: EgressPolicy::Enabled(Egress {
            sets: EgressSets::compile(&ranges(n)),
            action: EgressAction::Drop,
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn inner() -> Res<()> {
    let trials: usize = env_or("BENCH_TRIALS", 5);
    let secs: f64 = env_or("BENCH_SECONDS", 1.0);
    let n: u32 = env_or("BENCH_RANGES", 10_000);
    run("ip", &["link", "set", "lo", "up"])?;
    println!("bench-egress: {trials} trials × {secs} s, {n} deny ranges; medians\n");

    // 1. Unrelated loopback traffic across the output hook.
    let udp_to: SocketAddr = "127.0.0.1:9999".parse().map_err(|e| format!("{e}"))?;
    let _sink = UdpSocket::bind(udp_to).map_err(|e| format!("udp sink: {e}"))?;
    let tcp_to: SocketAddr = "127.0.0.1:9998".parse().map_err(|e| format!("{e}"))?;
    serve(tcp_to)?;
    let one = render_ruleset(&egress(1));
    let many = render_ruleset(&egress(n));
    // The egress guard needs connection tracking (replies to clients in a denied range), which
    // switches it on for the namespace: the tracked floor separates that cost from the rules'.
    let tracked_floor = format!(
        "{FLOOR}{}",
        CONNTRACK_ON.replace("add table inet bosh_agent\n", "")
    );
    let conditions: [(&str, Option<&str>); 5] = [
        ("no table", None),
        ("floor (empty base chain)", Some(FLOOR)),
        ("egress, 1 range", Some(&one)),
        ("egress, N ranges", Some(&many)),
        ("floor, conntrack on", Some(&tracked_floor)),
    ];
    let mut udp: Vec<Vec<f64>> = vec![Vec::new(); conditions.len()];
    let mut tcp: Vec<Vec<f64>> = vec![Vec::new(); conditions.len()];
    for _ in 0..trials {
        for (i, (_, script)) in conditions.iter().enumerate() {
            reset()?;
            if let Some(s) = script {
                nft(s)?;
            }
            udp[i].push(udp_rate(udp_to, secs)?);
            tcp[i].push(tcp_rate(tcp_to, secs)?);
        }
    }
    reset()?;
    let udp: Vec<f64> = udp.into_iter().map(median).collect();
    let tcp: Vec<f64> = tcp.into_iter().map(median).collect();
    println!(
        "unrelated traffic           UDP pkt/s   ratio/floor ratio/1 /tracked    TCP conn/s  ratio/floor ratio/1 /tracked"
    );
    for (i, (name, _)) in conditions.iter().enumerate() {
        println!(
            "{name:<27} {:>10.0}  {:>10.3} {:>8.3} {:>8.3}  {:>10.0}  {:>10.3} {:>8.3} {:>8.3}",
            udp[i],
            udp[i] / udp[1],
            udp[i] / udp[2],
            udp[i] / udp[4],
            tcp[i],
            tcp[i] / tcp[1],
            tcp[i] / tcp[2],
            tcp[i] / tcp[4],
        );
    }

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
    let result = (|| -> Res<()> {
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
        let on = render_ruleset(&ingress());
        // Any `ct` expression switches connection tracking on for the namespace, and the
        // allow-list needs it for its return traffic. Most VMs track connections already (the
        // stemcell's own firewall, container runtimes, `ct state invalid drop` defaults), so the
        // filter's own cost is measured against that too, not only against an untracked host.
        let conds: [(&str, Option<&str>); 3] = [
            ("ingress off", None),
            ("ingress off, conntrack on", Some(CONNTRACK_ON)),
            ("ingress on", Some(&on)),
        ];
        let mut t: Vec<Vec<f64>> = vec![Vec::new(); conds.len()];
        let mut u: Vec<Vec<f64>> = vec![Vec::new(); conds.len()];
        for _ in 0..trials {
            for (i, (_, script)) in conds.iter().enumerate() {
                reset()?;
                if let Some(s) = script {
                    nft(s)?;
                }
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
                let mut it = text
                    .split_whitespace()
                    .filter_map(|w| w.parse::<f64>().ok());
                t[i].push(it.next().unwrap_or(0.0));
                u[i].push(it.next().unwrap_or(0.0));
            }
        }
        reset()?;
        let t: Vec<f64> = t.into_iter().map(median).collect();
        let u: Vec<f64> = u.into_iter().map(median).collect();
        println!("\nallowed inbound over veth   TCP conn/s  UDP pkt/s");
        for (i, (name, _)) in conds.iter().enumerate() {
            println!("{name:<27} {:>10.0} {:>10.0}", t[i], u[i]);
        }
        println!(
            "ratio on/off                {:>10.3} {:>10.3}",
            t[2] / t[0],
            u[2] / u[0]
        );
        println!(
            "ratio on/off, conntrack on  {:>10.3} {:>10.3}",
            t[2] / t[1],
            u[2] / u[1]
        );
        Ok(())
    })();
    let _ = peer.kill();
    let _ = peer.wait();
    result?;

    // 3. Commit times.
    let mut full = Vec::new();
    let mut rebuild = Vec::new();
    let mut single = Vec::new();
    let changed = render_ruleset(&egress(n + 1));
    let extra = ranges(n + 1).pop().map(|e| e.destination);
    for _ in 0..trials {
        reset()?;
        full.push(nft(&many)?.as_secs_f64());
        rebuild.push(nft(&changed)?.as_secs_f64());
        nft(&many)?;
        if let Some(c) = extra {
            single.push(
                nft(&format!(
                    "add element inet bosh_agent egress_deny_v4 {{ {} }}\n",
                    c
                ))?
                .as_secs_f64(),
            );
        }
    }
    reset()?;
    println!("\ncommit (nft -f wall time)   ms");
    println!("{n} ranges, fresh table    {:>8.1}", median(full) * 1e3);
    println!("rebuild after +1 range      {:>8.1}", median(rebuild) * 1e3);
    println!("+1 range, element only      {:>8.1}", median(single) * 1e3);
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
