#![allow(clippy::unwrap_used)]
use super::*;
use crate::firewall::policy::Cidr;
use crate::firewall::policy::{
    AlertListenerPolicy, CtInvalid, Egress, EgressAction, EgressEntry, EgressPolicy, EgressSets,
    EgressTracking, Ingress, IngressEntry, IngressPolicy, IngressSets, PortRange, Proto,
    WorkloadPolicy, cloud_metadata_entries,
};
use crate::firewall::{INGRESS_PORTS, INGRESS_TCP_PORTS, INGRESS_UDP_PORTS};

fn cg(path: &str, level: u32) -> Identity {
    Identity::Cgroup {
        path: NftCgroupPath::new(path).unwrap(),
        level,
    }
}

fn golden(name: &str, got: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert_eq!(got, want, "golden file {name} differs");
}

/// The states whose scripts are golden (and which `platform/tests/nft_check.rs` feeds to
/// `nft --check` with an identity that exists on the test host).
pub(crate) fn workload_states(agent: Identity, job: Identity) -> Vec<(&'static str, DesiredState)> {
    let mut egress_entries = cloud_metadata_entries();
    egress_entries.push(EgressEntry {
        destination: Cidr::parse("10.0.0.0/8").unwrap(),
        except: vec![(Proto::Tcp, PortRange::parse("1000-2000").unwrap())],
    });
    egress_entries.push(EgressEntry {
        destination: Cidr::parse("2001:db8::/32").unwrap(),
        except: vec![],
    });
    let egress_with = |action, tracking| {
        EgressPolicy::Enabled(Egress {
            sets: EgressSets::compile(&egress_entries),
            action,
            tracking,
            allowed: vec![job.clone()],
        })
    };
    let egress = |action| egress_with(action, EgressTracking::Conntrack);
    let ingress_entries = vec![
        IngressEntry {
            proto: Proto::Tcp,
            ports: PortRange::single(22),
            sources: vec![],
        },
        IngressEntry {
            proto: Proto::Tcp,
            ports: PortRange::parse("8000-8999").unwrap(),
            sources: vec![],
        },
        IngressEntry {
            proto: Proto::Udp,
            ports: PortRange::single(53),
            sources: vec![
                Cidr::parse("10.0.0.0/8").unwrap(),
                Cidr::parse("fd00::/8").unwrap(),
            ],
        },
    ];
    let ingress = |allow_icmp, ct_invalid| {
        IngressPolicy::Enabled(Ingress {
            sets: IngressSets::compile(&ingress_entries),
            allow_icmp,
            ct_invalid,
        })
    };
    let base = |workload| DesiredState {
        identity: agent.clone(),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats: NatsPolicy::Disabled,
        workload,
    };
    vec![
        (
            "egress-drop.nft",
            base(WorkloadPolicy {
                egress: egress(EgressAction::Drop),
                ..Default::default()
            }),
        ),
        (
            "egress-reject.nft",
            base(WorkloadPolicy {
                egress: egress(EgressAction::Reject),
                ..Default::default()
            }),
        ),
        (
            "egress-stateless-reject.nft",
            base(WorkloadPolicy {
                egress: egress_with(EgressAction::Reject, EgressTracking::Stateless),
                ..Default::default()
            }),
        ),
        (
            "ingress.nft",
            base(WorkloadPolicy {
                ingress: ingress(true, CtInvalid::Drop),
                ..Default::default()
            }),
        ),
        (
            "ingress-noicmp-invalid-allowlist.nft",
            base(WorkloadPolicy {
                ingress: ingress(false, CtInvalid::AllowList),
                ..Default::default()
            }),
        ),
        (
            "localhost-alerts.nft",
            base(WorkloadPolicy {
                localhost_guard: true,
                alert_listener: AlertListenerPolicy::Guarded { monit: job.clone() },
                ..Default::default()
            }),
        ),
        (
            "workload-all.nft",
            base(WorkloadPolicy {
                egress: egress(EgressAction::Drop),
                ingress: ingress(true, CtInvalid::Drop),
                localhost_guard: true,
                alert_listener: AlertListenerPolicy::Guarded { monit: job },
            }),
        ),
    ]
}

fn states() -> Vec<(&'static str, DesiredState)> {
    workload_states(
        cg("unified/system.slice/bosh-agent.service", 2),
        cg("unified/system.slice/runit.service", 2),
    )
}

#[test]
fn workload_goldens() {
    for (name, st) in states() {
        golden(name, &render_ruleset(&st));
        golden(&format!("fresh-{name}"), &render_ruleset_fresh(&st));
    }
}

#[test]
fn switched_off_policies_are_removed_only_when_left_over() {
    let (_, all) = states().pop().unwrap();
    let script = render_ruleset(&all);
    let left = Leftovers::in_listing(
        "table inet bosh_agent {\n\tchain egress_output {\n\t}\n\tset ingress_ports {\n\t}\n\tcounter localhost_dropped {\n\t}\n\tchain alerts_guard {\n\t}\n}\n",
    );
    assert_eq!(
        left,
        Leftovers {
            egress: true,
            ingress: true,
            localhost_guard: true,
            alert_listener: true
        }
    );
    let off = DesiredState {
        workload: WorkloadPolicy::default(),
        ..all.clone()
    };
    // Nothing left over: exactly today's script.
    assert_eq!(
        render_ruleset_removing(&off, Leftovers::none()),
        render_ruleset(&off)
    );
    let removing = render_ruleset_removing(&off, left);
    golden("workload-removed.nft", &removing);
    for obj in [
        "chain inet bosh_agent egress_output",
        "chain inet bosh_agent egress_forward_guard",
        "set inet bosh_agent egress_deny_v4",
        "set inet bosh_agent egress_deny_v4_hi",
        "set inet bosh_agent egress_deny_v6_hi",
        "counter inet bosh_agent egress_denied",
        "chain inet bosh_agent ingress_filter",
        "set inet bosh_agent ingress_src_v6",
        "chain inet bosh_agent localhost_guard",
        "chain inet bosh_agent alerts_guard",
        "counter inet bosh_agent alerts_dropped",
    ] {
        assert!(removing.contains(&format!("delete {obj}")), "{obj}");
    }
    // The job rules of `firewall-allow metadata` are never deleted by a rebuild.
    assert!(!removing.contains("delete chain inet bosh_agent egress_access_jobs"));
    assert!(!script.contains("flush chain inet bosh_agent egress_access_jobs"));
    // A removed entry leaves no element behind: sets are flushed and refilled.
    assert!(script.contains("flush set inet bosh_agent egress_deny_v4\n"));
}

#[test]
fn workload_rules_use_meta_l4proto_and_named_counters() {
    for (name, st) in states() {
        let script = render_ruleset(&st);
        assert!(!script.contains("ip protocol"), "{name}");
        assert!(!script.contains("auto-merge"), "{name}");
        for line in script
            .lines()
            .filter(|l| l.contains(" drop") || l.contains(" reject"))
        {
            if line.contains("monit_guard") || line.contains("nats_guard") {
                continue;
            }
            assert!(line.contains("counter name \""), "{name}: uncounted {line}");
        }
    }
}

#[test]
fn workload_chain_priorities_are_after_conntrack() {
    for (name, st) in states() {
        for line in render_ruleset(&st).lines().filter(|l| l.contains(" hook ")) {
            assert!(
                line.contains("priority filter;") || line.contains("priority filter - 1;"),
                "{name}: {line}"
            );
        }
    }
}

#[test]
fn ten_thousand_ranges_render_in_chunks_of_one_transaction() {
    let entries: Vec<EgressEntry> = (0..10_000u32)
        .map(|i| EgressEntry {
            destination: Cidr::parse(&format!(
                "{}/24",
                std::net::Ipv4Addr::from(0x0a00_0000 + i * 512)
            ))
            .unwrap(),
            except: vec![],
        })
        .collect();
    let st = DesiredState {
        identity: cg("a", 1),
        monit: MonitPolicy::Disabled,
        nats: NatsPolicy::Disabled,
        workload: WorkloadPolicy {
            egress: EgressPolicy::Enabled(Egress {
                sets: EgressSets::compile(&entries),
                action: EgressAction::Drop,
                tracking: EgressTracking::Conntrack,
                allowed: vec![],
            }),
            ..Default::default()
        },
    };
    let script = render_ruleset(&st);
    let lines = script
        .lines()
        .filter(|l| l.starts_with("add element inet bosh_agent egress_deny_v4 "))
        .count();
    assert_eq!(lines, 10_000usize.div_ceil(256));
    // 10.0.0.0 to 10.78.31.255: 79 buckets in the prefilter.
    let hi = script
        .lines()
        .filter(|l| l.starts_with("add element inet bosh_agent egress_deny_v4_hi "))
        .collect::<Vec<_>>();
    assert_eq!(hi.len(), 1);
    assert_eq!(hi[0].matches(", ").count() + 1, 79, "{}", hi[0]);
    assert!(hi[0].contains("{ 0xa00, 0xa01, ") && hi[0].ends_with(", 0xa4e }"));
}

fn egress_state(cidrs: &[&str], tracking: EgressTracking, nats: NatsPolicy) -> DesiredState {
    let entries: Vec<EgressEntry> = cidrs
        .iter()
        .map(|c| EgressEntry {
            destination: Cidr::parse(c).unwrap(),
            except: vec![(Proto::Udp, PortRange::single(53))],
        })
        .collect();
    DesiredState {
        identity: cg("unified/a", 2),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats,
        workload: WorkloadPolicy {
            egress: EgressPolicy::Enabled(Egress {
                sets: EgressSets::compile(&entries),
                action: EgressAction::Drop,
                tracking,
                allowed: vec![],
            }),
            ..Default::default()
        },
    }
}

#[test]
fn the_base_chains_look_the_interval_sets_up_behind_the_prefilter() {
    let st = egress_state(
        &["10.9.0.0/24", "10.10.0.0/15", "fe80::/10"],
        EgressTracking::Conntrack,
        NatsPolicy::Disabled,
    );
    let script = render_ruleset(&st);
    for chain in ["egress_output", "egress_forward"] {
        let guard = if chain == "egress_output" {
            "egress_guard"
        } else {
            "egress_forward_guard"
        };
        let rules: Vec<&str> = script
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("add rule inet bosh_agent {chain} ")))
            .collect();
        assert_eq!(
            rules,
            vec![
                format!(
                    "meta nfproto ipv4 @nh,128,16 @egress_deny_v4_hi ip daddr @egress_deny_v4 jump {guard}"
                ),
                format!(
                    "meta nfproto ipv6 @nh,192,16 @egress_deny_v6_hi ip6 daddr @egress_deny_v6 jump {guard}"
                ),
            ]
        );
    }
    assert!(script.contains(
        "add set inet bosh_agent egress_deny_v4_hi { typeof @nh,128,16; }
"
    ));
    assert!(script.contains(
        "add set inet bosh_agent egress_deny_v6_hi { typeof @nh,192,16; }
"
    ));
    assert!(script.contains(
        "flush set inet bosh_agent egress_deny_v4_hi
"
    ));
    assert!(script.contains(
        "add element inet bosh_agent egress_deny_v4_hi { 0xa09, 0xa0a, 0xa0b }
"
    ));
    let ll: Vec<String> = (0xfe80..=0xfebfu16).map(|b| format!("{b:#x}")).collect();
    assert!(script.contains(&format!(
        "add element inet bosh_agent egress_deny_v6_hi {{ {} }}
",
        ll.join(", ")
    )));
    // The read-back expects the prefilter's elements like any set's.
    let shape = crate::firewall::shape::TableShape::of(&st).unwrap();
    assert_eq!(shape.sets["egress_deny_v4_hi"].elements.len(), 3);
    assert_eq!(shape.sets["egress_deny_v6_hi"].elements.len(), 64);

    // Over the cap (a /0 is 65,536 buckets): that family's rule has no prefilter and its
    // set stays empty; the other family keeps its own.
    let st = egress_state(
        &["0.0.0.0/0", "2001:db8::/32"],
        EgressTracking::Conntrack,
        NatsPolicy::Disabled,
    );
    let script = render_ruleset(&st);
    assert!(
        script.contains(
            "add rule inet bosh_agent egress_output ip daddr @egress_deny_v4 jump egress_guard
"
        ),
        "{script}"
    );
    assert!(script.contains("add rule inet bosh_agent egress_output meta nfproto ipv6 @nh,192,16 @egress_deny_v6_hi ip6 daddr @egress_deny_v6 jump egress_guard
"));
    assert!(!script.contains("add element inet bosh_agent egress_deny_v4_hi"));
    assert!(script.contains(
        "add element inet bosh_agent egress_deny_v6_hi { 0x2001 }
"
    ));
}

#[test]
fn stateless_egress_renders_no_conntrack_expression() {
    let nats = NatsPolicy::Enabled {
        endpoints: ["10.0.0.5:4222", "[2001:db8::1]:4222"]
            .iter()
            .map(|e| e.parse().unwrap())
            .collect(),
    };
    let cidrs = ["169.254.169.254", "10.0.0.0/8", "fd00:ec2::254"];
    for render in [render_ruleset, render_ruleset_fresh] {
        let stateless = render(&egress_state(
            &cidrs,
            EgressTracking::Stateless,
            nats.clone(),
        ));
        let ct: Vec<&str> = stateless
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == "ct"))
            .collect();
        assert!(ct.is_empty(), "ct expressions in stateless mode: {ct:?}");
        for guard in ["egress_guard", "egress_forward_guard"] {
            let first = stateless
                .lines()
                .find(|l| l.starts_with(&format!("add rule inet bosh_agent {guard} ")))
                .unwrap();
            assert_eq!(
                first,
                format!("add rule inet bosh_agent {guard} tcp flags & (syn | ack) != syn accept")
            );
        }
        // The check above can fail: conntrack mode has the expression.
        let tracked = render(&egress_state(
            &cidrs,
            EgressTracking::Conntrack,
            nats.clone(),
        ));
        assert_eq!(
            tracked
                .matches(
                    " ct state established,related accept
"
                )
                .count(),
            2
        );
        // Only the guards' first rule differs.
        let diff: Vec<(&str, &str)> = tracked
            .lines()
            .zip(stateless.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert_eq!(tracked.lines().count(), stateless.lines().count());
    }
}

#[test]
fn metadata_job_rules() {
    let rule = JobRule {
        identity: cg("unified/system.slice/x.scope", 3),
        comment: crate::firewall::Comment::new("bosh-metadata-access:x cgid=7").unwrap(),
    };
    assert_eq!(
        render_metadata_job_rule(&rule),
        "add rule inet bosh_agent egress_access_jobs socket cgroupv2 level 3 \"unified/system.slice/x.scope\" accept comment \"bosh-metadata-access:x cgid=7\"\n"
    );
    assert_eq!(
        render_delete_metadata_job_rule(9),
        "delete rule inet bosh_agent egress_access_jobs handle 9\n"
    );
}

/// Runs `sh -c <cmd>` in a fresh network namespace with `script` on stdin. Fails (never
/// skips) where namespaces or nft are not available.
fn in_fresh_netns(cmd: &str, script: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new("unshare")
        .args(["--net", "sh", "-c", cmd])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare must exist (util-linux) and the test must run as root");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn every_workload_script_is_accepted_by_nft_check_and_by_the_kernel() {
    // A cgroup path that exists on any host (nft resolves it at load time).
    let states = workload_states(cg("", 1), cg("", 1));
    for (name, st) in &states {
        for (how, script) in [
            ("idempotent", render_ruleset(st)),
            ("fresh", render_ruleset_fresh(st)),
        ] {
            let out = in_fresh_netns("nft -c -f - && echo checked", &script);
            assert!(
                out.status.success() && out.stdout.starts_with(b"checked"),
                "{name} ({how}): nft -c: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Hook restrictions (socket, fib) are checked only at a real commit.
            let out = in_fresh_netns("nft -f - && nft list table inet bosh_agent", &script);
            assert!(
                out.status.success(),
                "{name} ({how}): nft -f: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // What the kernel lists back conforms to the state it was rendered from.
            let listing = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                crate::firewall::readback::conforms(
                    &crate::firewall::readback::snapshot(&listing),
                    st
                ),
                Ok(()),
                "{name} ({how}): {listing}"
            );
            // And not to another policy.
            let other = DesiredState {
                workload: WorkloadPolicy::default(),
                ..st.clone()
            };
            assert!(
                crate::firewall::readback::conforms(
                    &crate::firewall::readback::snapshot(&listing),
                    &other
                )
                .is_err(),
                "{name}"
            );
        }
    }
    // Applied twice (a rebuild over itself), then switched off with leftovers removed.
    let (_, all) = states.last().unwrap();
    let off = DesiredState {
        workload: WorkloadPolicy::default(),
        ..all.clone()
    };
    let twice = format!("{}{}", render_ruleset_fresh(all), render_ruleset(all));
    let removing = render_ruleset_removing(
        &off,
        Leftovers::in_listing(&{
            let out = in_fresh_netns("nft -f - && nft list table inet bosh_agent", &twice);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }),
    );
    // Written to a file so the two transactions run in the same namespace.
    let dir = std::env::temp_dir().join(format!("wl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("all.nft"), render_ruleset(all)).unwrap();
    let out = in_fresh_netns(
        &format!(
            "nft -f {} && nft -f - && nft list table inet bosh_agent",
            dir.join("all.nft").display()
        ),
        &removing,
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = String::from_utf8_lossy(&out.stdout);
    assert_eq!(Leftovers::in_listing(&left), Leftovers::none(), "{left}");
    assert!(left.contains("chain egress_access_jobs"), "{left}");
}

#[test]
fn the_kernel_capability_probe_passes_here_and_changes_nothing() {
    let probe = crate::firewall::status::capability_probe();
    let out = in_fresh_netns("nft -c -f - && nft list ruleset", &probe);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "a check left something behind");
    // A failing nft is reported with its message, not swallowed.
    let e = crate::firewall::status::check_kernel(&crate::firewall::nft::Nft::with_binary(
        "/bin/false",
    ))
    .unwrap_err();
    assert!(e.to_string().contains("nft check failed"), "{e}");
}

fn entry(proto: Proto, ports: &str) -> IngressEntry {
    IngressEntry {
        proto,
        ports: PortRange::parse(ports).unwrap(),
        sources: vec![],
    }
}

#[test]
fn open_ports_go_to_bitmaps_up_to_256_wide_and_wider_ranges_stay_intervals() {
    let st = DesiredState {
        identity: cg("unified/system.slice/bosh-agent.service", 2),
        monit: MonitPolicy::Disabled,
        nats: NatsPolicy::Disabled,
        workload: WorkloadPolicy {
            ingress: IngressPolicy::Enabled(Ingress {
                sets: IngressSets::compile(&[
                    entry(Proto::Tcp, "80"),
                    entry(Proto::Tcp, "1000-1255"),
                    entry(Proto::Tcp, "2000-2256"),
                    entry(Proto::Udp, "53"),
                    entry(Proto::Udp, "1024-65535"),
                ]),
                allow_icmp: true,
                ct_invalid: CtInvalid::Drop,
            }),
            ..Default::default()
        },
    };
    let script = render_ruleset(&st);
    let elements = |set: &str| -> Vec<String> {
        let prefix = format!("add element inet bosh_agent {set} {{ ");
        script
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix)?.strip_suffix(" }"))
            .flat_map(|l| l.split(", ").map(str::to_string))
            .collect()
    };
    let tcp = elements(INGRESS_TCP_PORTS);
    let want: Vec<String> = std::iter::once(80)
        .chain(1000..=1255)
        .map(|p: u16| p.to_string())
        .collect();
    assert_eq!(tcp, want);
    // One UDP port is a compare in the chain; its bitmap stays empty.
    assert_eq!(elements(INGRESS_UDP_PORTS), Vec::<String>::new());
    assert_eq!(
        elements(INGRESS_PORTS),
        vec![
            "tcp . 2000-2256".to_string(),
            "udp . 1024-65535".to_string()
        ]
    );
    // The port tests (UDP's compare, TCP's bitmap) come right after the invalid-state drop
    // (which spares loopback), before loopback's accept, replies and ICMP.
    let rules: Vec<&str> = script
        .lines()
        .filter_map(|l| l.strip_prefix("add rule inet bosh_agent ingress_filter "))
        .collect();
    assert_eq!(
        rules[..5],
        [
            "ct state invalid iif != lo counter name \"ingress_dropped\" drop",
            "udp dport 53 accept",
            "tcp dport @ingress_tcp_ports accept",
            "iif lo accept",
            "ct state established,related accept",
        ]
    );
}

#[test]
fn up_to_four_single_ports_are_compares_and_five_go_to_the_bitmap() {
    let st = |tcp: &[&str]| {
        let mut entries: Vec<IngressEntry> = tcp.iter().map(|p| entry(Proto::Tcp, p)).collect();
        entries.push(entry(Proto::Tcp, "9000-9999"));
        DesiredState {
            identity: cg("unified/system.slice/bosh-agent.service", 2),
            monit: MonitPolicy::Disabled,
            nats: NatsPolicy::Disabled,
            workload: WorkloadPolicy {
                ingress: IngressPolicy::Enabled(Ingress {
                    sets: IngressSets::compile(&entries),
                    allow_icmp: false,
                    ct_invalid: CtInvalid::AllowList,
                }),
                ..Default::default()
            },
        }
    };
    let rules = |script: &str| -> Vec<String> {
        script
            .lines()
            .filter_map(|l| l.strip_prefix("add rule inet bosh_agent ingress_filter "))
            .map(str::to_string)
            .collect()
    };
    // Four single ports (a 2-port range counts as two) and a range wider than 256.
    let four = render_ruleset(&st(&["443", "22", "8080-8081"]));
    assert_eq!(
        rules(&four)[..5],
        [
            "tcp dport 22 accept",
            "tcp dport 443 accept",
            "tcp dport 8080 accept",
            "tcp dport 8081 accept",
            "iif lo accept",
        ]
    );
    assert!(!four.contains(&format!("add element inet bosh_agent {INGRESS_TCP_PORTS}")));
    assert!(
        !four.contains("dport @ingress_udp_ports"),
        "no UDP port, no UDP rule"
    );
    assert!(four.contains("add element inet bosh_agent ingress_ports { tcp . 9000-9999 }"));
    assert!(crate::firewall::shape::TableShape::of(&st(&["443", "22", "8080-8081"])).is_ok());
    // A fifth: the bitmap, one lookup.
    let five = render_ruleset(&st(&["443", "22", "8080-8081", "25"]));
    assert_eq!(
        rules(&five)[..2],
        ["tcp dport @ingress_tcp_ports accept", "iif lo accept"]
    );
    assert!(five.contains(&format!(
        "add element inet bosh_agent {INGRESS_TCP_PORTS} {{ 22, 25, 443, 8080, 8081 }}"
    )));
}

#[test]
fn the_bitmap_takes_the_narrowest_ranges_up_to_1024_ports_per_protocol() {
    let r = |a: u16, b: u16| PortRange { first: a, last: b };
    assert_eq!(workload::bitmap_split(&[]), (vec![], vec![]));
    // 256 ports fit one range; 257 do not.
    let (ports, wide) = workload::bitmap_split(&[r(2000, 2256), r(1000, 1255), r(22, 22)]);
    assert_eq!(ports.len(), 257);
    assert_eq!((ports[0], ports[1], ports[256]), (22, 1000, 1255));
    assert_eq!(wide, vec![r(2000, 2256)]);
    // Five ranges of 256: four fill the 1,024 ports, the last (in port order) stays an interval;
    // a single port still fits after them only if room is left, so narrow ones go first.
    let five: Vec<PortRange> = (0..5)
        .map(|i| r(10_000 + i * 1000, 10_255 + i * 1000))
        .collect();
    let mut with_single = five.clone();
    with_single.push(r(443, 443));
    let (ports, wide) = workload::bitmap_split(&with_single);
    assert_eq!(ports.len(), 1 + 3 * 256);
    assert_eq!(ports[0], 443);
    assert_eq!(wide, vec![r(13_000, 13_255), r(14_000, 14_255)]);
    let (ports, wide) = workload::bitmap_split(&five);
    assert_eq!(ports.len(), 1024);
    assert_eq!(wide, vec![r(14_000, 14_255)]);
    // Every port is in exactly one of the two lists.
    let (bitmap, rest) = workload::bitmap_split(&with_single);
    for p in 0..=u16::MAX {
        let in_list = with_single.iter().any(|x| x.first <= p && p <= x.last);
        let in_bitmap = ports_contains(&bitmap, p);
        let in_wide = rest.iter().any(|x| x.first <= p && p <= x.last);
        assert_eq!(in_list, in_bitmap ^ in_wide, "port {p}");
        assert!(!(in_bitmap && in_wide), "port {p}");
    }
}

fn ports_contains(ports: &[u16], p: u16) -> bool {
    ports.binary_search(&p).is_ok()
}
