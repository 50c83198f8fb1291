//! The firewall renderer on hostile models: cgroup paths, comments, job names, ranges and
//! ports built from the fuzz input through the constructors the agent uses
//! (`NftCgroupPath::new`, `PolicyConfig::build` with the agent's cgroup-identity rule,
//! `job_key` + `job_comment` / `metadata_comment`). Each input is either refused by those
//! constructors, or renders a script that:
//! - the table-shape interpreter understands (no statement outside the renderer's subset);
//! - leaves exactly the chains, base-chain hooks, sets and counters the model implies;
//! - names in its rules only the identities, comments, counters and sets the model implies,
//!   in the chains where the model puts them, with no verdict the model did not choose;
//! - holds set elements that, read back as address and port ranges, cover exactly what the
//!   configuration asked for (checked against the raw entries, not the compiled sets);
//! - `nft -c -f -` accepts, in a network namespace of its own (sampled: see `NFT_EVERY`).
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use platform::cgroup::{self, NftCgroupPath};
use platform::firewall::jobs::{job_comment, job_key, metadata_comment, metadata_key};
use platform::firewall::policy::{
    AlertListenerPolicy, CtInvalid, EgressAction, EgressPolicy, EgressTracking, IngressPolicy,
    PREFILTER_MAX_BUCKETS,
};
use platform::firewall::policy_config::{
    EgressDenyConfig, IngressAllowConfig, PolicyConfig, PortsConfig, PortsValue,
};
use platform::firewall::render::{
    self, Leftovers, render_job_rule, render_metadata_job_rule, render_ruleset,
    render_ruleset_fresh, render_ruleset_removing,
};
use platform::firewall::shape::TableShape;
use platform::firewall::*;

/// `nft -c` costs a process, a network namespace and cgroup directories (10–30 ms): it runs
/// on every input whose table shape (which chains, which rule forms) is new, and on every
/// `NFT_EVERY`th input besides.
const NFT_EVERY: u64 = 512;
/// The fuzzer's own cgroup subtree (below the cgroup2 mount) for the paths `nft -c` resolves.
const FUZZ_CGROUP: &str = "bosh-fuzz-render";

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(Some(case)) = generate(&mut u) {
        check(&case);
    }
});

struct Case {
    state: DesiredState,
    config: PolicyConfig,
    variant: u8,
    leftovers: Leftovers,
    monit_jobs: Vec<JobRule>,
    metadata_jobs: Vec<JobRule>,
}

// ---------------------------------------------------------------------------------------------
// Generation: hostile text and well-formed values, mixed.

fn prefix() -> &'static str {
    static P: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    P.get_or_init(|| match cgroup::detect_layout().nft_prefix() {
        Some("") | None => FUZZ_CGROUP.to_string(),
        Some(p) => format!("{p}/{FUZZ_CGROUP}"),
    })
}

fn hostile(u: &mut Unstructured<'_>) -> AResult<String> {
    const PIECES: [&str; 16] = [
        "a", "Z9", "\"", ";", "\n", "{", "}", " ", "/", "..", ".", "@", "#", "$x", "\\", "é",
    ];
    Ok(match u.int_in_range(0u8..=3)? {
        0 => u.arbitrary::<String>()?,
        _ => {
            let n = u.int_in_range(0usize..=6)?;
            let mut s = String::new();
            for _ in 0..n {
                s.push_str(u.choose(&PIECES)?);
            }
            s
        }
    })
}

fn component(u: &mut Unstructured<'_>) -> AResult<String> {
    const SAFE: &[u8] = b"abcxyzABC019_.-@:+=,";
    Ok(match u.int_in_range(0u8..=7)? {
        0 => hostile(u)?,
        1 => "runc-bpm-".to_string() + &word(u, SAFE)? + ".scope",
        2 => "x".repeat(u.int_in_range(200usize..=300)?),
        _ => word(u, SAFE)?,
    })
}

fn word(u: &mut Unstructured<'_>, alphabet: &[u8]) -> AResult<String> {
    let n = u.int_in_range(1usize..=12)?;
    let mut s = String::new();
    for _ in 0..n {
        s.push(char::from(*u.choose(alphabet)?));
    }
    Ok(s)
}

/// A cgroup path: mostly below the fuzzer's subtree, sometimes anywhere or hostile.
fn cgroup_path(u: &mut Unstructured<'_>) -> AResult<String> {
    let n = u.int_in_range(0usize..=5)?;
    let mut parts = Vec::new();
    for _ in 0..n {
        parts.push(component(u)?);
    }
    let tail = parts.join("/");
    Ok(match u.int_in_range(0u8..=7)? {
        0 => tail,
        1 => hostile(u)?,
        2 => format!("/{}/{tail}/", prefix()),
        _ => format!("{}/{tail}", prefix()),
    })
}

fn cidr(u: &mut Unstructured<'_>) -> AResult<String> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => hostile(u)?,
        1..=4 => {
            let p = u.int_in_range(0u8..=33)?;
            let raw = u32::from(u.arbitrary::<u8>()?) << 24 | u32::from(u.arbitrary::<u16>()?);
            let a = if p <= 32 && u.arbitrary::<bool>()? {
                raw & u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0)
            } else {
                raw
            };
            let a = Ipv4Addr::from(a);
            if u.arbitrary::<bool>()? {
                format!("{a}/{p}")
            } else {
                a.to_string()
            }
        }
        5..=7 => {
            let p = u.int_in_range(0u8..=129)?;
            let raw = u128::from(u.arbitrary::<u16>()?) << 112 | u128::from(u.arbitrary::<u32>()?);
            let a = if p <= 128 && u.arbitrary::<bool>()? {
                raw & u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0)
            } else {
                raw
            };
            format!("{}/{p}", Ipv6Addr::from(a))
        }
        8 => {
            // IPv4-mapped, folded to IPv4 by the parser.
            let p = u.int_in_range(96u8..=128)?;
            let a = Ipv4Addr::from(
                u.arbitrary::<u32>()? & u32::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0),
            );
            format!("::ffff:{a}/{p}")
        }
        _ => (*u.choose(&platform::firewall::policy::CLOUD_METADATA)?).to_string(),
    })
}

fn proto(u: &mut Unstructured<'_>) -> AResult<String> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => hostile(u)?,
        1 => "TCP".into(),
        2 | 3 => "tcp".into(),
        _ => "udp".into(),
    })
}

fn ports(u: &mut Unstructured<'_>) -> AResult<PortsValue> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => PortsValue::Text(hostile(u)?),
        1 => PortsValue::Number(u.arbitrary::<u32>()?.into()),
        2 => PortsValue::Number(u.arbitrary::<u16>()?.into()),
        3 => {
            let a = u.arbitrary::<u16>()?;
            let b = a.saturating_add(u.int_in_range(0u16..=300)?);
            PortsValue::Text(format!("{a}-{b}"))
        }
        _ => PortsValue::Text(u.int_in_range(0u32..=70000)?.to_string()),
    })
}

fn small<T>(
    u: &mut Unstructured<'_>,
    max: usize,
    mut f: impl FnMut(&mut Unstructured<'_>) -> AResult<T>,
) -> AResult<Vec<T>> {
    let n = u.int_in_range(0usize..=max)?;
    (0..n).map(|_| f(u)).collect()
}

fn config(u: &mut Unstructured<'_>) -> AResult<PolicyConfig> {
    let choice = |u: &mut Unstructured<'_>, known: &[&str]| -> AResult<Option<String>> {
        Ok(match u.int_in_range(0u8..=4)? {
            0 => None,
            1 => Some(hostile(u)?),
            _ => Some((*u.choose(known)?).to_string()),
        })
    };
    Ok(PolicyConfig {
        egress_deny: small(u, 6, |u| {
            Ok(EgressDenyConfig {
                destination: cidr(u)?,
                except: small(u, 3, |u| {
                    Ok(PortsConfig {
                        protocol: proto(u)?,
                        ports: ports(u)?,
                    })
                })?,
            })
        })?,
        egress_action: choice(u, &["drop", "reject"])?,
        egress_tracking: choice(u, &["conntrack", "stateless"])?,
        deny_cloud_metadata: u.arbitrary()?,
        egress_allow_cgroups: small(u, 2, cgroup_path)?,
        ingress_allow: if u.arbitrary()? {
            Some(small(u, 5, |u| {
                Ok(IngressAllowConfig {
                    protocol: proto(u)?,
                    ports: ports(u)?,
                    sources: small(u, 3, cidr)?,
                })
            })?)
        } else {
            None
        },
        ingress_allow_icmp: u.arbitrary()?,
        ingress_ct_invalid: choice(u, &["drop", "allow-list"])?,
        guard_localhost: u.arbitrary()?,
        guard_alert_listener: u.arbitrary()?,
    })
}

/// The agent's rule for turning a configured cgroup path into an identity (the closure in
/// `agent::firewall::machine`): a valid nft path, not the root, level = depth + offset > 0.
fn cgroup_identity(path: &str, offset: i64) -> Result<Identity, String> {
    let nft_path = NftCgroupPath::new(path).map_err(|e| e.to_string())?;
    let depth = cgroup::depth(nft_path.as_str());
    if depth == 0 {
        return Err("root".into());
    }
    let level = u32::try_from(i64::from(depth) + offset)
        .ok()
        .filter(|l| *l > 0)
        .ok_or("level")?;
    Ok(Identity::Cgroup {
        path: nft_path,
        level,
    })
}

fn offset() -> i64 {
    -i64::from(cgroup::depth(prefix()) - 1)
}

fn identity(u: &mut Unstructured<'_>) -> AResult<Option<Identity>> {
    Ok(if u.int_in_range(0u8..=5)? == 0 {
        Some(Identity::Uid {
            uid: u.arbitrary()?,
            reason: hostile(u)?,
        })
    } else {
        cgroup_identity(&cgroup_path(u)?, offset()).ok()
    })
}

fn generate(u: &mut Unstructured<'_>) -> AResult<Option<Case>> {
    let Some(agent) = identity(u)? else {
        return Ok(None);
    };
    let monit = match u.int_in_range(0u8..=2)? {
        0 => MonitPolicy::Disabled,
        1 => MonitPolicy::Enabled { allow_root: true },
        _ => MonitPolicy::Enabled { allow_root: false },
    };
    let nats = if u.arbitrary()? {
        NatsPolicy::Enabled {
            endpoints: small(u, 4, |u| {
                let ip = if u.arbitrary()? {
                    IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?))
                } else {
                    IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?))
                };
                // mbus URLs carry a port of 1-65535.
                Ok(SocketAddr::new(ip, u.int_in_range(1u16..=u16::MAX)?))
            })?
            .into_iter()
            .collect(),
        }
    } else {
        NatsPolicy::Disabled
    };
    let config = config(u)?;
    let uid_mode = matches!(agent, Identity::Uid { .. });
    let built = config.build(
        &mut |p| {
            if uid_mode {
                Err("uid fallback".into())
            } else {
                cgroup_identity(p, offset())
            }
        },
        Identity::Uid {
            uid: 0,
            reason: "monit's cgroup unknown".into(),
        },
    );
    let Ok(workload) = built else {
        return Ok(None);
    };
    let jobs = |u: &mut Unstructured<'_>, metadata: bool| -> AResult<Vec<JobRule>> {
        let mut out = Vec::new();
        for _ in 0..u.int_in_range(0usize..=2)? {
            let Ok(path) = NftCgroupPath::new(&cgroup_path(u)?) else {
                continue;
            };
            let key = job_key(path.as_str());
            let cgid = if u.arbitrary()? {
                Some(u.arbitrary()?)
            } else {
                None
            };
            // As `firewall-allow metadata` does.
            let comment = if metadata {
                metadata_comment(&metadata_key(&key), cgid)
            } else {
                job_comment(&key, cgid)
            };
            // job_key shortens every key so that the comment fits: a refusal is a finding.
            let comment = comment.unwrap_or_else(|e| panic!("job comment refused: {e}"));
            let level = cgroup::depth(path.as_str());
            out.push(JobRule {
                identity: Identity::Cgroup { path, level },
                comment,
            });
        }
        Ok(out)
    };
    let monit_jobs = jobs(u, false)?;
    let metadata_jobs = if matches!(workload.egress, EgressPolicy::Enabled(_)) {
        jobs(u, true)?
    } else {
        Vec::new()
    };
    Ok(Some(Case {
        state: DesiredState {
            identity: agent,
            monit,
            nats,
            workload,
        },
        config,
        variant: u.int_in_range(0u8..=2)?,
        leftovers: Leftovers {
            egress: u.arbitrary()?,
            ingress: u.arbitrary()?,
            localhost_guard: u.arbitrary()?,
            alert_listener: u.arbitrary()?,
        },
        monit_jobs,
        metadata_jobs,
    }))
}

// ---------------------------------------------------------------------------------------------
// Checks

fn check(case: &Case) {
    let d = &case.state;
    let mut script = match case.variant {
        0 => render_ruleset(d),
        1 => render_ruleset_fresh(d),
        _ => render_ruleset_removing(d, case.leftovers),
    };
    for j in &case.monit_jobs {
        script.push_str(&render_job_rule(j));
    }
    for j in &case.metadata_jobs {
        script.push_str(&render_metadata_job_rule(j));
    }
    let mut shape = TableShape::default();
    if let Err(e) = shape.apply(&script) {
        panic!("the shape interpreter refuses the renderer's script: {e}\n{script}");
    }
    let w = &d.workload;
    let egress = match &w.egress {
        EgressPolicy::Enabled(e) => Some(e),
        EgressPolicy::Disabled => None,
    };
    let ingress = match &w.ingress {
        IngressPolicy::Enabled(i) => Some(i),
        IngressPolicy::Disabled => None,
    };
    let monit_on = d.monit != MonitPolicy::Disabled;
    let nats_on = d.nats != NatsPolicy::Disabled;
    let alerts_monit = match &w.alert_listener {
        AlertListenerPolicy::Guarded { monit } => Some(monit),
        AlertListenerPolicy::Open => None,
    };

    // Chains, hooks, sets, counters: exactly the model's.
    let mut chains: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    chains.insert(MONIT_JOBS_CHAIN, None);
    let out = "type filter hook output priority filter - 1; policy accept;";
    if monit_on {
        chains.insert(MONIT_CHAIN, Some(out));
        chains.insert(MONIT_GUARD_CHAIN, None);
    }
    if nats_on {
        chains.insert(NATS_CHAIN, Some(out));
        chains.insert(NATS_GUARD_CHAIN, None);
    }
    let mut sets: BTreeSet<&str> = BTreeSet::new();
    let mut counters: BTreeSet<&str> = BTreeSet::new();
    if nats_on {
        sets.extend([NATS_SET_V4, NATS_SET_V6]);
    }
    if egress.is_some() {
        chains.insert(EGRESS_CHAIN, Some(out));
        chains.insert(
            EGRESS_FORWARD_CHAIN,
            Some("type filter hook forward priority filter - 1; policy accept;"),
        );
        chains.insert(EGRESS_GUARD_CHAIN, None);
        chains.insert(EGRESS_FORWARD_GUARD_CHAIN, None);
        chains.insert(EGRESS_JOBS_CHAIN, None);
        sets.extend([
            EGRESS_DENY_V4,
            EGRESS_DENY_V6,
            EGRESS_DENY_V4_HI,
            EGRESS_DENY_V6_HI,
            EGRESS_EXCEPT_V4,
            EGRESS_EXCEPT_V6,
        ]);
        counters.insert(EGRESS_COUNTER);
    }
    if ingress.is_some() {
        chains.insert(
            INGRESS_CHAIN,
            Some("type filter hook input priority filter; policy accept;"),
        );
        sets.extend([
            INGRESS_PORTS,
            INGRESS_TCP_PORTS,
            INGRESS_UDP_PORTS,
            INGRESS_SRC_V4,
            INGRESS_SRC_V6,
        ]);
        counters.insert(INGRESS_COUNTER);
    }
    if w.localhost_guard {
        chains.insert(
            LOCALHOST_CHAIN,
            Some("type filter hook input priority filter - 1; policy accept;"),
        );
        counters.insert(LOCALHOST_COUNTER);
    }
    if alerts_monit.is_some() {
        chains.insert(ALERTS_CHAIN, Some(out));
        chains.insert(ALERTS_GUARD_CHAIN, None);
        counters.insert(ALERTS_COUNTER);
    }
    let got: BTreeMap<&str, Option<&str>> = shape
        .chains
        .iter()
        .map(|(n, c)| (n.as_str(), c.hook.as_deref()))
        .collect();
    assert_eq!(got, chains, "chains and hooks\n{script}");
    let got: BTreeSet<&str> = shape.sets.keys().map(String::as_str).collect();
    assert_eq!(got, sets, "sets\n{script}");
    let got: BTreeSet<&str> = shape.counters.iter().map(String::as_str).collect();
    assert_eq!(got, counters, "counters\n{script}");

    // Rules: who may be named where, which verdicts.
    let agent = &d.identity;
    let root = Identity::Uid {
        uid: 0,
        reason: String::new(),
    };
    let mut who: BTreeMap<&str, Vec<(&Identity, Option<&str>)>> = BTreeMap::new();
    if monit_on {
        let g = who.entry(MONIT_GUARD_CHAIN).or_default();
        g.push((agent, Some("bosh-agent")));
    }
    if nats_on {
        who.entry(NATS_GUARD_CHAIN)
            .or_default()
            .push((agent, Some("bosh-agent")));
    }
    if let Some(e) = egress {
        let g = who.entry(EGRESS_GUARD_CHAIN).or_default();
        g.push((agent, Some("bosh-agent")));
        g.extend(e.allowed.iter().map(|i| (i, Some("allowed"))));
    }
    if let Some(m) = alerts_monit {
        let g = who.entry(ALERTS_GUARD_CHAIN).or_default();
        g.push((agent, Some("bosh-agent")));
        g.push((m, Some("monit")));
    }
    if d.monit == (MonitPolicy::Enabled { allow_root: true }) {
        who.entry(MONIT_GUARD_CHAIN)
            .or_default()
            .push((&root, Some("root")));
    }
    let fixed_comments = ["in-flow"];
    let counter_of = |chain: &str| -> Option<&str> {
        match chain {
            EGRESS_GUARD_CHAIN | EGRESS_FORWARD_GUARD_CHAIN => Some(EGRESS_COUNTER),
            INGRESS_CHAIN => Some(INGRESS_COUNTER),
            LOCALHOST_CHAIN => Some(LOCALHOST_COUNTER),
            ALERTS_GUARD_CHAIN => Some(ALERTS_COUNTER),
            _ => None,
        }
    };
    for (chain, c) in &shape.chains {
        let rules: Vec<&str> = c.rules.iter().map(|(_, r)| r.as_str()).collect();
        if chain == MONIT_JOBS_CHAIN || chain == EGRESS_JOBS_CHAIN {
            let jobs = if chain == MONIT_JOBS_CHAIN {
                &case.monit_jobs
            } else {
                &case.metadata_jobs
            };
            assert_eq!(
                rules.len(),
                jobs.len(),
                "{chain}: one rule per job\n{script}"
            );
            for (r, j) in rules.iter().zip(jobs) {
                let (ids, comments, rest) = split_rule(r);
                assert_eq!(ids, vec![id_text(&j.identity)], "{chain}: {r}");
                assert_eq!(
                    comments,
                    vec![j.comment.as_str().to_string()],
                    "{chain}: {r}"
                );
                assert_vocabulary(chain, &rest, r);
            }
            continue;
        }
        let allowed = who.get(chain.as_str()).cloned().unwrap_or_default();
        let mut named = Vec::new();
        for r in &rules {
            let (ids, comments, rest) = split_rule(r);
            assert!(ids.len() <= 1, "{chain}: several identities in {r}");
            for c in &comments {
                let ok = fixed_comments.contains(&c.as_str())
                    || allowed.iter().any(|(_, k)| *k == Some(c.as_str()));
                assert!(ok, "{chain}: comment {c:?} the model did not ask for: {r}");
            }
            if let Some(id) = ids.first() {
                let pos = allowed.iter().position(|(i, k)| {
                    id_text(i) == *id && comments.first().map(String::as_str) == *k
                });
                assert!(pos.is_some(), "{chain}: identity {id} not the model's: {r}");
                named.push(id.clone());
            }
            if r.contains("counter name") {
                let expect =
                    counter_of(chain.as_str()).unwrap_or_else(|| panic!("{chain}: a counter: {r}"));
                assert!(
                    r.contains(&format!("counter name \"{expect}\"")),
                    "{chain}: {r}"
                );
            }
            if r.contains("reject") {
                assert!(
                    egress.is_some_and(|e| e.action == EgressAction::Reject)
                        && (chain == EGRESS_GUARD_CHAIN || chain == EGRESS_FORWARD_GUARD_CHAIN),
                    "{chain}: a reject the model did not ask for: {r}"
                );
            }
            if r.contains("echo-request") {
                assert!(ingress.is_some_and(|i| i.allow_icmp), "{chain}: ICMP: {r}");
            }
            if r.contains("ct state invalid") {
                assert!(
                    ingress.is_some_and(|i| i.ct_invalid == CtInvalid::Drop),
                    "{r}"
                );
            }
            for t in &rest {
                // `@nh,<offset>,<len>` is a raw payload match (the prefilter's key), not a set.
                if let Some(set) = t.strip_prefix('@').filter(|x| !x.starts_with("nh,")) {
                    assert!(sets.contains(set), "{chain}: set {set} absent: {r}");
                }
                if let Some(raw) = t.strip_prefix("@nh,") {
                    assert!(
                        (chain == EGRESS_CHAIN || chain == EGRESS_FORWARD_CHAIN)
                            && (raw == "128,16" || raw == "192,16"),
                        "{chain}: a raw payload match the model did not ask for: {r}"
                    );
                }
                if t == "ct" {
                    assert!(
                        !(egress.is_some_and(|e| e.tracking == EgressTracking::Stateless)
                            && (chain == EGRESS_GUARD_CHAIN
                                || chain == EGRESS_FORWARD_GUARD_CHAIN)),
                        "{chain}: a ct expression in stateless mode: {r}"
                    );
                }
            }
            if let Some(i) = rest.iter().position(|t| t == "jump") {
                let target = rest.get(i + 1).map(String::as_str).unwrap_or("");
                assert!(
                    chains.contains_key(target) && chains[target].is_none(),
                    "{r}"
                );
            }
            assert_vocabulary(chain, &rest, r);
        }
        // Every identity the model allows here is named once; the last rule is the verdict.
        let mut want: Vec<String> = allowed.iter().map(|(i, _)| id_text(i)).collect();
        want.sort();
        named.sort();
        assert_eq!(named, want, "{chain}: identities\n{script}");
        if let Some(e) = egress
            && chain == EGRESS_GUARD_CHAIN
        {
            let verdicts = match e.action {
                EgressAction::Drop => 1,
                EgressAction::Reject => 2,
            };
            let denies = rules
                .iter()
                .filter(|r| r.ends_with("drop") || r.contains("reject"))
                .count();
            assert_eq!(denies, verdicts, "{chain}\n{script}");
        }
    }
    check_elements(case, &shape, &script);
    maybe_nft_check(case, &shape, &script);
}

fn id_text(i: &Identity) -> String {
    render::identity_match(i)
}

/// Splits a rule body into its identity matches, its quoted comments and its other tokens
/// (counter names stay in the tokens, quoted).
fn split_rule(r: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut ids = Vec::new();
    let mut comments = Vec::new();
    let mut rest = Vec::new();
    let mut toks = Tokens::new(r);
    while let Some(t) = toks.next() {
        match t.as_str() {
            "socket" => {
                let parts: Vec<String> = (0..3).filter_map(|_| toks.next()).collect();
                assert!(
                    parts.len() == 3 && parts[0] == "cgroupv2" && parts[1] == "level",
                    "malformed socket match in {r}"
                );
                ids.push(format!(
                    "socket cgroupv2 level {} {}",
                    parts[2],
                    toks.next().unwrap_or_default()
                ));
            }
            "skuid" if rest.last().is_some_and(|l| l == "meta") => {
                rest.pop();
                ids.push(format!("meta skuid {}", toks.next().unwrap_or_default()));
            }
            "comment" => match toks.next() {
                Some(c) if c.starts_with('"') => comments.push(c.trim_matches('"').to_string()),
                other => panic!("comment without a string: {other:?} in {r}"),
            },
            _ => rest.push(t),
        }
    }
    (ids, comments, rest)
}

struct Tokens<'a> {
    s: &'a str,
}

impl<'a> Tokens<'a> {
    fn new(s: &'a str) -> Self {
        Tokens { s }
    }
}

impl Iterator for Tokens<'_> {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        self.s = self.s.trim_start();
        if self.s.is_empty() {
            return None;
        }
        if let Some(rest) = self.s.strip_prefix('"') {
            let end = rest
                .find('"')
                .unwrap_or_else(|| panic!("unterminated string: {}", self.s));
            let tok = format!("\"{}\"", &rest[..end]);
            self.s = &rest[end + 1..];
            return Some(tok);
        }
        let end = self.s.find(char::is_whitespace).unwrap_or(self.s.len());
        let tok = self.s[..end].to_string();
        self.s = &self.s[end..];
        Some(tok)
    }
}

/// Outside identities and comments, a rule holds only the renderer's fixed words: nothing a
/// value from the configuration could have put there.
fn assert_vocabulary(chain: &str, rest: &[String], r: &str) {
    const WORDS: &[&str] = &[
        "tcp",
        "udp",
        "dport",
        "sport",
        "flags",
        "&",
        "(syn",
        "|",
        "ack)",
        "!=",
        "syn",
        "meta",
        "mark",
        "set",
        "accept",
        "drop",
        "jump",
        "ip",
        "ip6",
        "daddr",
        "saddr",
        ".",
        "th",
        "l4proto",
        "nfproto",
        "ipv4",
        "ipv6",
        "ct",
        "state",
        "established,related",
        "invalid",
        "counter",
        "name",
        "reject",
        "with",
        "reset",
        "icmpx",
        "admin-prohibited",
        "fib",
        "type",
        "local",
        "iif",
        "lo",
        "status",
        "dnat",
        "icmp",
        "icmpv6",
        "{",
        "}",
        "ipv6-icmp",
        "destination-unreachable,",
        "echo-request,",
        "time-exceeded",
        "time-exceeded,",
        "echo-request",
        "nd-neighbor-solicit,",
        "nd-neighbor-advert,",
        "nd-router-advert",
        "hoplimit",
        "packet-too-big",
        "mld-listener-query",
        "fe80::/10",
        "127.0.0.1",
        "::1",
        "127.0.0.0/8",
        "0xb054",
    ];
    for t in rest {
        let ok = WORDS.contains(&t.as_str())
            || t.starts_with('@')
            || t.bytes().all(|b| b.is_ascii_digit())
            || (t.starts_with('"')
                && t.ends_with('"')
                && t.len() > 2
                && t[1..t.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'))
            || chain_names().contains(&t.as_str());
        assert!(
            ok,
            "{chain}: token {t:?} is not one the renderer writes: {r}"
        );
    }
}

fn chain_names() -> [&'static str; 8] {
    [
        MONIT_GUARD_CHAIN,
        MONIT_JOBS_CHAIN,
        NATS_GUARD_CHAIN,
        EGRESS_GUARD_CHAIN,
        EGRESS_FORWARD_GUARD_CHAIN,
        EGRESS_JOBS_CHAIN,
        ALERTS_GUARD_CHAIN,
        MONIT_JOBS_CHAIN,
    ]
}

// ---------------------------------------------------------------------------------------------
// Set elements against the raw configuration.

type Range = (u128, u128);

fn parse_ip(s: &str) -> (bool, u128) {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => (false, u128::from(u32::from(a))),
        Ok(IpAddr::V6(a)) => (true, u128::from(a)),
        Err(_) => panic!("element address {s:?} does not parse"),
    }
}

/// An interval element as nft prints it: `a`, `a/p` or `a-b`.
fn parse_range(s: &str) -> (bool, Range) {
    if let Some((a, p)) = s.split_once('/') {
        let (v6, a) = parse_ip(a);
        let bits = if v6 { 128 } else { 32 };
        let p: u32 = p.parse().unwrap_or_else(|_| panic!("prefix in {s:?}"));
        assert!(p <= bits, "{s}");
        let host = if bits - p == 128 {
            u128::MAX
        } else {
            (1u128 << (bits - p)) - 1
        };
        assert_eq!(a & host, 0, "host bits in element {s}");
        (v6, (a, a | host))
    } else if let Some((a, b)) = s.split_once('-') {
        let (f1, a) = parse_ip(a);
        let (f2, b) = parse_ip(b);
        assert!(f1 == f2 && a <= b, "{s}");
        (f1, (a, b))
    } else {
        let (f, a) = parse_ip(s);
        (f, (a, a))
    }
}

fn parse_ports(s: &str) -> (u16, u16) {
    let p = |x: &str| x.parse::<u16>().unwrap_or_else(|_| panic!("port {x:?}"));
    match s.split_once('-') {
        Some((a, b)) => (p(a), p(b)),
        None => (p(s), p(s)),
    }
}

fn cidr_range(text: &str) -> (bool, Range) {
    let c = platform::firewall::policy::Cidr::parse(text).unwrap_or_else(|e| panic!("{e}"));
    let (fam, a, b) = c.range();
    (fam == platform::firewall::policy::Family::V6, (a, b))
}

fn proto_of(text: &str) -> String {
    text.trim().to_ascii_lowercase()
}

/// Whether the union of `ranges` covers `[a, b]`.
fn covers(ranges: &[(u128, u128)], a: u128, b: u128) -> bool {
    let mut v: Vec<(u128, u128)> = ranges.to_vec();
    v.sort_unstable();
    let mut next = a;
    for (x, y) in v {
        if x > next {
            break;
        }
        if y >= next {
            if y >= b {
                return true;
            }
            next = y + 1;
        }
    }
    false
}

/// Points where the set of entries covering an address can change inside `[a, b]`.
fn probes(a: u128, b: u128, bounds: &[Range]) -> Vec<u128> {
    let mut p = vec![a];
    for (x, y) in bounds {
        if *x > a && *x <= b {
            p.push(*x);
        }
        if let Some(n) = y.checked_add(1)
            && n > a
            && n <= b
        {
            p.push(n);
        }
    }
    p
}

fn check_elements(case: &Case, shape: &TableShape, script: &str) {
    let elems = |set: &str| -> Vec<String> {
        shape
            .sets
            .get(set)
            .map(|s| s.elements.clone())
            .unwrap_or_default()
    };
    if let NatsPolicy::Enabled { endpoints } = &case.state.nats {
        let mut got: Vec<String> = elems(NATS_SET_V4);
        got.extend(elems(NATS_SET_V6));
        let want: BTreeSet<String> = endpoints
            .iter()
            .map(|e| format!("{} . {}", e.ip(), e.port()))
            .collect();
        assert_eq!(
            got.iter().cloned().collect::<BTreeSet<_>>(),
            want,
            "{script}"
        );
        assert_eq!(got.len(), want.len());
    }
    let cfg = &case.config;
    if let EgressPolicy::Enabled(eg) = &case.state.workload.egress {
        // The guards' first rule says how replies are told apart.
        let first = |chain: &str| {
            shape
                .chains
                .get(chain)
                .and_then(|c| c.rules.first())
                .map(|(_, r)| r.clone())
                .unwrap_or_default()
        };
        for guard in [EGRESS_GUARD_CHAIN, EGRESS_FORWARD_GUARD_CHAIN] {
            let want = match eg.tracking {
                EgressTracking::Conntrack => "ct state established,related accept",
                EgressTracking::Stateless => "tcp flags & (syn | ack) != syn accept",
            };
            assert_eq!(first(guard), want, "{guard}\n{script}");
        }
        // (family, destination, excepted (proto, ports)) of every raw entry.
        let mut entries: Vec<(bool, Range, Vec<(String, (u16, u16))>)> = Vec::new();
        for e in &cfg.egress_deny {
            let (v6, r) = cidr_range(&e.destination);
            let except = e
                .except
                .iter()
                .map(|p| (proto_of(&p.protocol), ports_of(&p.ports)))
                .collect();
            entries.push((v6, r, except));
        }
        if cfg.deny_cloud_metadata {
            for a in [
                "169.254.169.254",
                "fd00:ec2::254",
                "fe80::a9fe:a9fe",
                "169.254.170.23",
                "168.63.129.16",
            ] {
                let (v6, r) = cidr_range(a);
                let except = vec![
                    ("udp".into(), (53, 53)),
                    ("tcp".into(), (53, 53)),
                    ("udp".into(), (123, 123)),
                ];
                entries.push((v6, r, except));
            }
        }
        for (fam, set, xset) in [
            (false, EGRESS_DENY_V4, EGRESS_EXCEPT_V4),
            (true, EGRESS_DENY_V6, EGRESS_EXCEPT_V6),
        ] {
            let mine: Vec<&(bool, Range, Vec<(String, (u16, u16))>)> =
                entries.iter().filter(|e| e.0 == fam).collect();
            let dests: Vec<Range> = mine.iter().map(|e| e.1).collect();
            // The prefilter: the first 16 bits of every configured destination, each once,
            // or nothing (and no prefilter in the base chains) beyond the cap.
            let (hi_set, shift, raw) = if fam {
                (EGRESS_DENY_V6_HI, 112, "@nh,192,16")
            } else {
                (EGRESS_DENY_V4_HI, 16, "@nh,128,16")
            };
            let mut want: BTreeSet<u128> = BTreeSet::new();
            for (a, b) in &dests {
                want.extend((a >> shift)..=(b >> shift));
            }
            let got: Vec<u128> = elems(hi_set)
                .iter()
                .map(|e| {
                    e.strip_prefix("0x")
                        .and_then(|h| u128::from_str_radix(h, 16).ok())
                        .unwrap_or_else(|| panic!("{hi_set}: element {e:?} is not 0x<hex>"))
                })
                .collect();
            let prefiltered = want.len() <= PREFILTER_MAX_BUCKETS;
            if prefiltered {
                assert_eq!(
                    got.iter().copied().collect::<BTreeSet<_>>(),
                    want,
                    "{hi_set}\n{script}"
                );
                assert_eq!(got.len(), want.len(), "{hi_set}: duplicates");
            } else {
                assert!(got.is_empty(), "{hi_set} beyond the cap\n{script}");
            }
            for base in [EGRESS_CHAIN, EGRESS_FORWARD_CHAIN] {
                let rules: Vec<&String> = shape
                    .chains
                    .get(base)
                    .into_iter()
                    .flat_map(|c| c.rules.iter().map(|(_, r)| r))
                    .filter(|r| r.contains(&format!("@{set} ")))
                    .collect();
                assert_eq!(rules.len(), 1, "{base}: one rule for {set}\n{script}");
                assert_eq!(
                    rules[0].contains(&format!("{raw} @{hi_set} ")),
                    prefiltered,
                    "{base}: {}",
                    rules[0]
                );
            }
            let deny: Vec<Range> = elems(set)
                .iter()
                .map(|s| {
                    let (f, r) = parse_range(s);
                    assert_eq!(f, fam, "{set}: {s}");
                    r
                })
                .collect();
            // Denied = exactly the union of the configured destinations.
            for (a, b) in &deny {
                assert!(
                    covers(&dests, *a, *b),
                    "{set}: {a:#x}-{b:#x} was not asked for\n{script}"
                );
            }
            for (a, b) in &dests {
                assert!(
                    covers(&deny, *a, *b),
                    "{set}: {a:#x}-{b:#x} is missing\n{script}"
                );
            }
            // Every exception is excepted by every entry covering its addresses.
            for x in elems(xset) {
                let parts: Vec<&str> = x.split(" . ").collect();
                assert_eq!(parts.len(), 3, "{xset}: {x}");
                let (f, (a, b)) = parse_range(parts[0]);
                assert_eq!(f, fam);
                let (pa, pb) = parse_ports(parts[2]);
                for probe in probes(a, b, &dests) {
                    let covering: Vec<_> = mine
                        .iter()
                        .filter(|e| e.1.0 <= probe && probe <= e.1.1)
                        .collect();
                    assert!(
                        !covering.is_empty(),
                        "{xset}: {x} is outside every entry\n{script}"
                    );
                    for e in covering {
                        let open: Vec<(u128, u128)> =
                            e.2.iter()
                                .filter(|(p, _)| *p == parts[1])
                                .map(|(_, (a, b))| (u128::from(*a), u128::from(*b)))
                                .collect();
                        assert!(
                            covers(&open, pa.into(), pb.into()),
                            "{xset}: {x} not excepted by {:?}\n{script}",
                            e.1
                        );
                    }
                }
            }
        }
    }
    if let IngressPolicy::Enabled(_) = &case.state.workload.ingress {
        let list = cfg.ingress_allow.as_deref().unwrap_or_default();
        let any: Vec<(String, (u16, u16))> = list
            .iter()
            .filter(|e| e.sources.is_empty())
            .map(|e| (proto_of(&e.protocol), ports_of(&e.ports)))
            .collect();
        for x in elems(INGRESS_PORTS) {
            let (p, r) = x.split_once(" . ").unwrap_or_else(|| panic!("{x}"));
            let (a, b) = parse_ports(r);
            let open: Vec<(u128, u128)> = any
                .iter()
                .filter(|(q, _)| q == p)
                .map(|(_, (a, b))| (u128::from(*a), u128::from(*b)))
                .collect();
            assert!(
                covers(&open, a.into(), b.into()),
                "{INGRESS_PORTS}: {x} not asked for\n{script}"
            );
        }
        for (set, proto) in [(INGRESS_TCP_PORTS, "tcp"), (INGRESS_UDP_PORTS, "udp")] {
            for x in elems(set) {
                let port: u16 = x.parse().unwrap_or_else(|_| panic!("{set}: {x}"));
                assert!(
                    any.iter()
                        .any(|(q, (a, b))| q == proto && *a <= port && port <= *b),
                    "{set}: {x} not asked for\n{script}"
                );
            }
        }
        // A few single ports are compares in the chain instead (`tcp dport 22 accept`).
        for (_, r) in shape.chains.get(INGRESS_CHAIN).into_iter().flat_map(|c| &c.rules) {
            let w: Vec<&str> = r.split_whitespace().collect();
            if let [proto @ ("tcp" | "udp"), "dport", n, "accept"] = w[..]
                && !n.starts_with('@')
            {
                let port: u16 = n.parse().unwrap_or_else(|_| panic!("{INGRESS_CHAIN}: {r}"));
                assert!(
                    any.iter()
                        .any(|(q, (a, b))| q == proto && *a <= port && port <= *b),
                    "{INGRESS_CHAIN}: {r} not asked for\n{script}"
                );
            }
        }
        for (fam, set) in [(false, INGRESS_SRC_V4), (true, INGRESS_SRC_V6)] {
            let by: Vec<(Range, String, (u16, u16))> = list
                .iter()
                .flat_map(|e| {
                    e.sources.iter().filter_map(move |s| {
                        let (f, r) = cidr_range(s);
                        (f == fam).then(|| (r, proto_of(&e.protocol), ports_of(&e.ports)))
                    })
                })
                .collect();
            let bounds: Vec<Range> = by.iter().map(|e| e.0).collect();
            for x in elems(set) {
                let parts: Vec<&str> = x.split(" . ").collect();
                assert_eq!(parts.len(), 3, "{set}: {x}");
                let (f, (a, b)) = parse_range(parts[0]);
                assert_eq!(f, fam);
                let (pa, pb) = parse_ports(parts[2]);
                for probe in probes(a, b, &bounds) {
                    let open: Vec<(u128, u128)> = by
                        .iter()
                        .filter(|(r, p, _)| r.0 <= probe && probe <= r.1 && p == parts[1])
                        .map(|(_, _, (a, b))| (u128::from(*a), u128::from(*b)))
                        .collect();
                    assert!(
                        covers(&open, pa.into(), pb.into()),
                        "{set}: {x} not asked for\n{script}"
                    );
                }
            }
            // And every source entry is open: its first address, each of its ports.
            for (r, p, (a, b)) in &by {
                let open = elems(set).iter().any(|x| {
                    let parts: Vec<&str> = x.split(" . ").collect();
                    let (_, (xa, xb)) = parse_range(parts[0]);
                    let (pa, pb) = parse_ports(parts[2]);
                    xa <= r.0
                        && r.0 <= xb
                        && parts[1] == p
                        && pa <= *a
                        && *a <= pb
                        && pa <= *b
                        && *b <= pb
                }) || any.iter().any(|(q, (x, y))| q == p && *x <= *a && *b <= *y);
                assert!(open, "{set}: {r:?} {p} {a}-{b} is missing\n{script}");
            }
        }
    }
}

fn ports_of(p: &PortsValue) -> (u16, u16) {
    let text = match p {
        PortsValue::Number(n) => n.to_string(),
        PortsValue::Text(s) => s.clone(),
    };
    let r = platform::firewall::policy::PortRange::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    (r.first, r.last)
}

// ---------------------------------------------------------------------------------------------
// nft -c, sampled.

struct Sampler {
    inputs: u64,
    shapes: BTreeSet<Vec<String>>,
    checked: u64,
    skipped: u64,
}

static SAMPLER: Mutex<Sampler> = Mutex::new(Sampler {
    inputs: 0,
    shapes: BTreeSet::new(),
    checked: 0,
    skipped: 0,
});

/// The shape's signature: chain names with their rule forms (digits and strings elided).
fn signature(shape: &TableShape, variant: u8) -> Vec<String> {
    let mut sig = vec![variant.to_string()];
    for (n, c) in &shape.chains {
        for (_, r) in &c.rules {
            let form: String = Tokens::new(r)
                .map(|t| {
                    if t.starts_with('"') || t.bytes().all(|b| b.is_ascii_digit()) {
                        "_".into()
                    } else {
                        t
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            sig.push(format!("{n}: {form}"));
        }
    }
    for (n, s) in &shape.sets {
        sig.push(format!("{n}: {}", s.elements.is_empty()));
    }
    sig.sort();
    sig.dedup();
    sig
}

fn maybe_nft_check(case: &Case, shape: &TableShape, script: &str) {
    let due = {
        let mut s = SAMPLER.lock().unwrap_or_else(|e| e.into_inner());
        if s.inputs == 0 {
            remove_stale(&std::path::Path::new(cgroup::NFT_CGROUP_ROOT).join(prefix()));
        }
        s.inputs += 1;
        let new = s.shapes.insert(signature(shape, case.variant));
        new || s.inputs.is_multiple_of(NFT_EVERY)
    };
    if !due {
        return;
    }
    // Every path nft resolves must exist: make them below the fuzzer's subtree, or skip.
    let d = &case.state;
    let mut ids: Vec<&Identity> = vec![&d.identity];
    if let EgressPolicy::Enabled(e) = &d.workload.egress {
        ids.extend(e.allowed.iter());
    }
    ids.extend(
        case.monit_jobs
            .iter()
            .chain(&case.metadata_jobs)
            .map(|j| &j.identity),
    );
    let paths: Vec<&NftCgroupPath> = ids
        .iter()
        .filter_map(|i| match i {
            Identity::Cgroup { path, .. } => Some(path),
            Identity::Uid { .. } => None,
        })
        .collect();
    let ours = format!("{}/", prefix());
    let mut made = Vec::new();
    let mut ok = true;
    for p in paths {
        if !p.as_str().starts_with(&ours) || !mkdirs(&p.fs_path(), &mut made) {
            ok = false;
            break;
        }
    }
    // The directories go before any verdict: a failing input aborts the process.
    let verdict = if ok { nft_check(script) } else { Ok(()) };
    for dir in made.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
    if let Err(e) = verdict {
        panic!("{e}");
    }
    let mut s = SAMPLER.lock().unwrap_or_else(|e| e.into_inner());
    if ok {
        s.checked += 1;
    } else {
        s.skipped += 1;
    }
    if (s.checked + s.skipped).is_power_of_two() {
        eprintln!(
            "render: nft -c on {} scripts ({} skipped: a path outside the fuzzer's cgroup or one the kernel refuses), {} shapes seen, {} inputs",
            s.checked,
            s.skipped,
            s.shapes.len(),
            s.inputs
        );
    }
}

fn mkdirs(dir: &std::path::Path, made: &mut Vec<std::path::PathBuf>) -> bool {
    if dir.is_dir() {
        return true;
    }
    let Some(parent) = dir.parent() else {
        return false;
    };
    if !mkdirs(parent, made) {
        return false;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {
            made.push(dir.to_path_buf());
            true
        }
        // A name the kernel already holds (a control file such as `cgroup.procs`) is no
        // cgroup: nft would resolve a file, which the agent never does.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => dir.is_dir(),
        Err(_) => false,
    }
}

/// Removes what an earlier run that stopped on a finding left below the fuzzer's subtree
/// (empty cgroups only: rmdir refuses a cgroup with processes).
fn remove_stale(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_stale(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn nft_check(script: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("unshare")
        .args(["--net", "--", "nft", "-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("render: cannot run unshare/nft (root and nft are needed): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("render: waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -c refuses the script: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
