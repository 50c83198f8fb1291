//! Rendering of the workload policies (egress deny list, ingress allow-list, localhost guard,
//! alert listener). Pure, like the rest of the renderer. A disabled policy renders nothing,
//! so today's inputs give today's script byte for byte; objects left by a policy that was
//! switched off are removed only when the caller says they exist ([`Leftovers`]).
//!
//! Shapes (see README "Workload policies"):
//! - egress: base chains on output and forward (priority filter - 1: after any DNAT, before
//!   SNAT in postrouting) jump to a guard only for packets whose destination is in the deny
//!   interval set. A prefilter comes first: the destination's first 16 bits in a plain
//!   16-bit set, which the kernel keeps as a bitmap, so unrelated traffic pays one bit test
//!   per family whatever the deny list's size, and the interval lookup (a binary search)
//!   runs only for packets in a /16 that holds a deny range. The guard accepts replies (`ct
//!   state established,related`, or in stateless mode every TCP segment that does not open a
//!   connection: a server on the VM still answers clients in a denied range), addresses local
//!   to the VM, excepted `address . protocol . port`, the agent, allowed cgroups and job
//!   rules, and denies the rest;
//! - ingress: one base chain on input at priority filter (after conntrack at -200): loopback,
//!   the invalid-state drop, then the ports open to everyone as one bitmap test per protocol
//!   (a new connection or a one-way UDP stream to an open port is decided in four rules), then
//!   replies, ICMP, DHCP, the wide port ranges and the per-source lists, then a counted drop;
//! - localhost guard: input, priority filter - 1: 127.0.0.0/8 and ::1 not arrived on `lo`;
//! - alert listener: output, like monit's guard, for 127.0.0.1:2825 and ::1:2825.
//!
//! Sets are interval sets filled with merged, disjoint elements (the policy module merges
//! them), so `auto-merge` is not needed — nft refuses it on concatenations, and a flush and
//! refill inside the transaction replaces the contents exactly.

use std::fmt::Write as _;

use super::super::policy::{
    AddrRange, AlertListenerPolicy, CtInvalid, EgressAction, EgressPolicy, EgressTracking,
    IngressPolicy, PortRange, Proto, WorkloadPolicy,
};
use super::super::{
    ALERTS_CHAIN, ALERTS_COUNTER, ALERTS_GUARD_CHAIN, ALERTS_PORT, EGRESS_CHAIN, EGRESS_COUNTER,
    EGRESS_DENY_V4, EGRESS_DENY_V4_HI, EGRESS_DENY_V6, EGRESS_DENY_V6_HI, EGRESS_EXCEPT_V4,
    EGRESS_EXCEPT_V6, EGRESS_FORWARD_CHAIN, EGRESS_FORWARD_GUARD_CHAIN, EGRESS_GUARD_CHAIN,
    EGRESS_JOBS_CHAIN, INGRESS_CHAIN, INGRESS_COUNTER, INGRESS_PORTS, INGRESS_SRC_V4,
    INGRESS_SRC_V6, INGRESS_TCP_PORTS, INGRESS_UDP_PORTS, Identity, LOCALHOST_CHAIN,
    LOCALHOST_COUNTER,
};
use super::{Rebuild, identity_match, not_a_syn_rule};

const OUTPUT: &str = "type filter hook output priority filter - 1; policy accept;";
const FORWARD: &str = "type filter hook forward priority filter - 1; policy accept;";
const INPUT: &str = "type filter hook input priority filter; policy accept;";
const INPUT_EARLY: &str = "type filter hook input priority filter - 1; policy accept;";

/// Objects of switched-off workload policies that exist in the live table and are to be
/// removed. [`Leftovers::none`] is what a caller without a read-back passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub egress: bool,
    pub ingress: bool,
    pub localhost_guard: bool,
    pub alert_listener: bool,
}

impl Leftovers {
    /// Nothing to remove.
    pub fn none() -> Self {
        Leftovers::default()
    }

    /// Which policies have objects in a live listing (nft's text of the table). Pure.
    pub fn in_listing(listing: &str) -> Self {
        let has = |name: &str| {
            listing.contains(&format!("\tchain {name} {{"))
                || listing.contains(&format!("\tset {name} {{"))
                || listing.contains(&format!("\tcounter {name} {{"))
        };
        Leftovers {
            egress: [
                EGRESS_CHAIN,
                EGRESS_GUARD_CHAIN,
                EGRESS_DENY_V4,
                EGRESS_DENY_V4_HI,
                EGRESS_DENY_V6_HI,
                EGRESS_COUNTER,
            ]
            .iter()
            .any(|n| has(n)),
            ingress: [
                INGRESS_CHAIN,
                INGRESS_PORTS,
                INGRESS_TCP_PORTS,
                INGRESS_UDP_PORTS,
                INGRESS_COUNTER,
            ]
            .iter()
            .any(|n| has(n)),
            localhost_guard: has(LOCALHOST_CHAIN) || has(LOCALHOST_COUNTER),
            alert_listener: has(ALERTS_CHAIN) || has(ALERTS_GUARD_CHAIN) || has(ALERTS_COUNTER),
        }
    }
}

fn set_type(set: &str) -> &'static str {
    match set {
        EGRESS_DENY_V4 => "type ipv4_addr; flags interval;",
        EGRESS_DENY_V6 => "type ipv6_addr; flags interval;",
        // The destination's first 16 bits: offset 16 bytes into an IPv4 header, 24 into IPv6.
        EGRESS_DENY_V4_HI => "typeof @nh,128,16;",
        EGRESS_DENY_V6_HI => "typeof @nh,192,16;",
        EGRESS_EXCEPT_V4 | INGRESS_SRC_V4 => {
            "type ipv4_addr . inet_proto . inet_service; flags interval;"
        }
        EGRESS_EXCEPT_V6 | INGRESS_SRC_V6 => {
            "type ipv6_addr . inet_proto . inet_service; flags interval;"
        }
        // No interval flag: with a 16-bit key the kernel picks its bitmap backend.
        INGRESS_TCP_PORTS => "typeof tcp dport;",
        INGRESS_UDP_PORTS => "typeof udp dport;",
        _ => "type inet_proto . inet_service; flags interval;",
    }
}

fn empty_set(s: &mut String, r: &Rebuild<'_>, set: &str) {
    let _ = writeln!(s, "add set {} {set} {{ {} }}", r.t, set_type(set));
    if !r.fresh {
        let _ = writeln!(s, "flush set {} {set}", r.t);
    }
}

fn remove_set(s: &mut String, r: &Rebuild<'_>, set: &str) {
    if !r.fresh {
        let _ = writeln!(s, "add set {} {set} {{ {} }}", r.t, set_type(set));
        let _ = writeln!(s, "delete set {} {set}", r.t);
    }
}

fn remove_counter(s: &mut String, r: &Rebuild<'_>, counter: &str) {
    if !r.fresh {
        let _ = writeln!(s, "add counter {} {counter}", r.t);
        let _ = writeln!(s, "delete counter {} {counter}", r.t);
    }
}

/// Adds a named counter; an existing one keeps its values across rebuilds.
fn counter(s: &mut String, r: &Rebuild<'_>, counter: &str) {
    let _ = writeln!(s, "add counter {} {counter}", r.t);
}

fn elements(s: &mut String, t: &str, set: &str, elems: Vec<String>) {
    // Chunks keep lines short; they are still one transaction.
    for chunk in elems.chunks(256) {
        let _ = writeln!(s, "add element {t} {set} {{ {} }}", chunk.join(", "));
    }
}

fn triples(v: &[(AddrRange, Proto, super::super::policy::PortRange)]) -> Vec<String> {
    v.iter()
        .map(|(a, p, r)| format!("{a} . {p} . {r}"))
        .collect()
}

fn rule(s: &mut String, t: &str, chain: &str, body: &str) {
    let _ = writeln!(s, "add rule {t} {chain} {body}");
}

/// Appends the workload policies to a script being rendered.
pub(super) fn render_workload(
    s: &mut String,
    r: &Rebuild<'_>,
    agent: &Identity,
    w: &WorkloadPolicy,
    leftovers: Leftovers,
) {
    render_egress(s, r, agent, &w.egress, leftovers.egress);
    render_ingress(s, r, &w.ingress, leftovers.ingress);
    render_localhost(s, r, w.localhost_guard, leftovers.localhost_guard);
    render_alerts(s, r, agent, &w.alert_listener, leftovers.alert_listener);
}

fn remove_egress(s: &mut String, r: &Rebuild<'_>) {
    for chain in [
        EGRESS_CHAIN,
        EGRESS_FORWARD_CHAIN,
        EGRESS_GUARD_CHAIN,
        EGRESS_FORWARD_GUARD_CHAIN,
    ] {
        r.remove_chain(s, chain);
    }
    for set in EGRESS_SETS {
        remove_set(s, r, set);
    }
    remove_counter(s, r, EGRESS_COUNTER);
}

fn render_egress(
    s: &mut String,
    r: &Rebuild<'_>,
    agent: &Identity,
    policy: &EgressPolicy,
    leftover: bool,
) {
    let t = r.t;
    let EgressPolicy::Enabled(eg) = policy else {
        if leftover {
            // The job rules' chain stays, like monit's: jobs own it, and nothing jumps to it.
            remove_egress(s, r);
        }
        return;
    };
    // Base chains first: they are the only ones that jump to the guards.
    r.remove_chain(s, EGRESS_CHAIN);
    r.remove_chain(s, EGRESS_FORWARD_CHAIN);
    counter(s, r, EGRESS_COUNTER);
    for set in EGRESS_SETS {
        empty_set(s, r, set);
    }
    for (i, set) in [EGRESS_DENY_V4, EGRESS_DENY_V6].into_iter().enumerate() {
        elements(
            s,
            t,
            set,
            eg.sets.deny[i].iter().map(ToString::to_string).collect(),
        );
    }
    for (i, set) in [EGRESS_DENY_V4_HI, EGRESS_DENY_V6_HI]
        .into_iter()
        .enumerate()
    {
        // As nft lists them (lowercase hex), so the read-back compares like for like.
        let buckets = eg.sets.prefilter[i].iter().flatten();
        elements(s, t, set, buckets.map(|b| format!("{b:#x}")).collect());
    }
    for (i, set) in [EGRESS_EXCEPT_V4, EGRESS_EXCEPT_V6].into_iter().enumerate() {
        elements(s, t, set, triples(&eg.sets.except[i]));
    }
    let _ = writeln!(s, "add chain {t} {EGRESS_JOBS_CHAIN}");
    let verdict = |s: &mut String, chain: &str| match eg.action {
        EgressAction::Drop => rule(
            s,
            t,
            chain,
            &format!("counter name \"{EGRESS_COUNTER}\" drop"),
        ),
        EgressAction::Reject => {
            rule(
                s,
                t,
                chain,
                &format!(
                    "meta l4proto tcp counter name \"{EGRESS_COUNTER}\" reject with tcp reset"
                ),
            );
            rule(
                s,
                t,
                chain,
                &format!("counter name \"{EGRESS_COUNTER}\" reject with icmpx admin-prohibited"),
            );
        }
    };
    let common = |s: &mut String, chain: &str| {
        match eg.tracking {
            EgressTracking::Conntrack => rule(s, t, chain, "ct state established,related accept"),
            // Only a connection attempt is judged: replies of a server here, and segments of
            // flows opened before the range was denied, pass. No conntrack needed.
            EgressTracking::Stateless => rule(s, t, chain, "tcp flags & (syn | ack) != syn accept"),
        }
        rule(
            s,
            t,
            chain,
            &format!("ip daddr . meta l4proto . th dport @{EGRESS_EXCEPT_V4} accept"),
        );
        rule(
            s,
            t,
            chain,
            &format!("ip6 daddr . meta l4proto . th dport @{EGRESS_EXCEPT_V6} accept"),
        );
    };
    r.empty_chain(s, EGRESS_GUARD_CHAIN);
    common(s, EGRESS_GUARD_CHAIN);
    // bosh-dns on 169.254.0.2 and the like: addresses of this VM are never denied.
    rule(s, t, EGRESS_GUARD_CHAIN, "fib daddr type local accept");
    rule(
        s,
        t,
        EGRESS_GUARD_CHAIN,
        &format!("{} accept comment \"bosh-agent\"", identity_match(agent)),
    );
    for id in &eg.allowed {
        rule(
            s,
            t,
            EGRESS_GUARD_CHAIN,
            &format!("{} accept comment \"allowed\"", identity_match(id)),
        );
    }
    rule(
        s,
        t,
        EGRESS_GUARD_CHAIN,
        &format!("jump {EGRESS_JOBS_CHAIN}"),
    );
    verdict(s, EGRESS_GUARD_CHAIN);
    // Forwarded packets have no local socket: only replies and exceptions pass.
    r.empty_chain(s, EGRESS_FORWARD_GUARD_CHAIN);
    common(s, EGRESS_FORWARD_GUARD_CHAIN);
    verdict(s, EGRESS_FORWARD_GUARD_CHAIN);
    for (chain, hook, guard) in [
        (EGRESS_CHAIN, OUTPUT, EGRESS_GUARD_CHAIN),
        (EGRESS_FORWARD_CHAIN, FORWARD, EGRESS_FORWARD_GUARD_CHAIN),
    ] {
        let _ = writeln!(s, "add chain {t} {chain} {{ {hook} }}");
        for (i, (nfproto, hi, daddr, set, hi_set)) in [
            ("ipv4", 128, "ip", EGRESS_DENY_V4, EGRESS_DENY_V4_HI),
            ("ipv6", 192, "ip6", EGRESS_DENY_V6, EGRESS_DENY_V6_HI),
        ]
        .into_iter()
        .enumerate()
        {
            let prefilter = if eg.sets.prefilter[i].is_some() {
                format!("meta nfproto {nfproto} @nh,{hi},16 @{hi_set} ")
            } else {
                String::new()
            };
            rule(
                s,
                t,
                chain,
                &format!("{prefilter}{daddr} daddr @{set} jump {guard}"),
            );
        }
    }
}

/// Every set of the egress policy.
const EGRESS_SETS: [&str; 6] = [
    EGRESS_DENY_V4,
    EGRESS_DENY_V6,
    EGRESS_DENY_V4_HI,
    EGRESS_DENY_V6_HI,
    EGRESS_EXCEPT_V4,
    EGRESS_EXCEPT_V6,
];

/// The ingress allow-list's sets, in the order they are made.
const INGRESS_SETS: [&str; 5] = [
    INGRESS_PORTS,
    INGRESS_TCP_PORTS,
    INGRESS_UDP_PORTS,
    INGRESS_SRC_V4,
    INGRESS_SRC_V6,
];

/// Open ranges of at most this many ports are listed port by port in the bitmap sets; wider
/// ones stay intervals (checked later in the chain), so that `1024-65535` does not become
/// 64,512 elements re-added at every rebuild.
const BITMAP_MAX_RANGE: u32 = 256;

/// At most this many ports per protocol go to a bitmap set, narrowest ranges first: the
/// kernel's insertion into a bitmap set slows down as it fills (about 0.3 s to refill 4,096
/// elements on 2 cores, 5 s for 16,384), and every rebuild refills it.
const BITMAP_MAX_PORTS: u32 = 1024;

/// At most this many single ports of one protocol are tested one compare each instead of in
/// their bitmap set. A set lookup is a chain of kernel calls (about 2 % of a 4 µs packet on
/// the reference VM, see BENCHMARKS.md) where a port compare is inline in the rule walk, so a
/// few compares cost a packet less than one lookup.
const INLINE_MAX_PORTS: usize = 4;

/// The open ports of one protocol split into (ports for the bitmap, ranges left as
/// intervals): ranges of at most [`BITMAP_MAX_RANGE`] ports, narrowest first, while the
/// total stays within [`BITMAP_MAX_PORTS`]. Both lists come out in ascending order.
pub(super) fn bitmap_split(ranges: &[PortRange]) -> (Vec<u16>, Vec<PortRange>) {
    let width = |r: &PortRange| u32::from(r.last) - u32::from(r.first) + 1;
    let mut by_width: Vec<&PortRange> = ranges.iter().collect();
    by_width.sort_by_key(|r| (width(r), r.first));
    let (mut ports, mut wide, mut total) = (Vec::new(), Vec::new(), 0u32);
    for r in by_width {
        if width(r) <= BITMAP_MAX_RANGE && total + width(r) <= BITMAP_MAX_PORTS {
            total += width(r);
            ports.extend(r.first..=r.last);
        } else {
            wide.push(*r);
        }
    }
    ports.sort_unstable();
    wide.sort_by_key(|r| r.first);
    (ports, wide)
}

fn render_ingress(s: &mut String, r: &Rebuild<'_>, policy: &IngressPolicy, leftover: bool) {
    let t = r.t;
    let IngressPolicy::Enabled(ing) = policy else {
        if leftover {
            r.remove_chain(s, INGRESS_CHAIN);
            for set in INGRESS_SETS {
                remove_set(s, r, set);
            }
            remove_counter(s, r, INGRESS_COUNTER);
        }
        return;
    };
    r.remove_chain(s, INGRESS_CHAIN);
    counter(s, r, INGRESS_COUNTER);
    for set in INGRESS_SETS {
        empty_set(s, r, set);
    }
    let mut wide = Vec::new();
    // Per protocol (TCP, then UDP), the rules that accept its open ports: compares, or its
    // bitmap's lookup.
    let mut open_rules: Vec<Vec<String>> = Vec::new();
    for (p, set) in [
        (Proto::Tcp, INGRESS_TCP_PORTS),
        (Proto::Udp, INGRESS_UDP_PORTS),
    ] {
        let ranges: Vec<PortRange> = ing
            .sets
            .any_source
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, r)| r)
            .collect();
        // Disjoint: the compiled sets merge overlapping ranges.
        let (ports, rest) = bitmap_split(&ranges);
        let rules = if ports.len() <= INLINE_MAX_PORTS {
            ports
                .iter()
                .map(|n| format!("{p} dport {n} accept"))
                .collect()
        } else {
            elements(s, t, set, ports.iter().map(ToString::to_string).collect());
            vec![format!("{p} dport @{set} accept")]
        };
        open_rules.push(rules);
        wide.extend(rest.iter().map(|r| format!("{p} . {r}")));
    }
    elements(s, t, INGRESS_PORTS, wide);
    elements(s, t, INGRESS_SRC_V4, triples(&ing.sets.by_source[0]));
    elements(s, t, INGRESS_SRC_V6, triples(&ing.sets.by_source[1]));
    let c = INGRESS_CHAIN;
    let _ = writeln!(s, "add chain {t} {c} {{ {INPUT} }}");
    // Loopback is accepted whatever its state; everything else conntrack calls invalid is
    // dropped first. The state is tested before the interface, so a valid packet (nearly all
    // of them) pays one test here, and loopback's accept can follow the open ports: every
    // packet gets the verdict it would get with `iif lo accept` first.
    if ing.ct_invalid == CtInvalid::Drop {
        rule(
            s,
            t,
            c,
            &format!("ct state invalid iif != lo counter name \"{INGRESS_COUNTER}\" drop"),
        );
    }
    // Open ports before replies: a new connection or a one-way UDP stream to them, and a
    // server's established traffic, stop here after a compare or one bit test. UDP first.
    for text in open_rules.iter().rev().flatten() {
        rule(s, t, c, text);
    }
    rule(s, t, c, "iif lo accept");
    rule(s, t, c, "ct state established,related accept");
    if ing.allow_icmp {
        rule(
            s,
            t,
            c,
            "meta l4proto icmp icmp type { destination-unreachable, echo-request, time-exceeded } accept",
        );
        rule(
            s,
            t,
            c,
            "meta l4proto ipv6-icmp icmpv6 type { destination-unreachable, time-exceeded, echo-request } accept",
        );
    }
    // IPv6 does not work without these: neighbour discovery and router advertisements (only
    // from the link: hop limit 255), path MTU discovery, and the router's listener queries.
    rule(
        s,
        t,
        c,
        "meta l4proto ipv6-icmp icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } ip6 hoplimit 255 accept",
    );
    rule(
        s,
        t,
        c,
        "meta l4proto ipv6-icmp icmpv6 type packet-too-big accept",
    );
    rule(
        s,
        t,
        c,
        "meta l4proto ipv6-icmp icmpv6 type mld-listener-query ip6 saddr fe80::/10 accept",
    );
    // DHCP replies: the lease must renew.
    rule(
        s,
        t,
        c,
        "meta nfproto ipv4 udp sport 67 udp dport 68 accept",
    );
    rule(
        s,
        t,
        c,
        "meta nfproto ipv6 udp sport 547 udp dport 546 accept",
    );
    rule(
        s,
        t,
        c,
        &format!("meta l4proto . th dport @{INGRESS_PORTS} accept"),
    );
    rule(
        s,
        t,
        c,
        &format!("ip saddr . meta l4proto . th dport @{INGRESS_SRC_V4} accept"),
    );
    rule(
        s,
        t,
        c,
        &format!("ip6 saddr . meta l4proto . th dport @{INGRESS_SRC_V6} accept"),
    );
    rule(s, t, c, &format!("counter name \"{INGRESS_COUNTER}\" drop"));
}

fn render_localhost(s: &mut String, r: &Rebuild<'_>, on: bool, leftover: bool) {
    let t = r.t;
    if !on {
        if leftover {
            r.remove_chain(s, LOCALHOST_CHAIN);
            remove_counter(s, r, LOCALHOST_COUNTER);
        }
        return;
    }
    r.remove_chain(s, LOCALHOST_CHAIN);
    counter(s, r, LOCALHOST_COUNTER);
    let c = LOCALHOST_CHAIN;
    let _ = writeln!(s, "add chain {t} {c} {{ {INPUT_EARLY} }}");
    // A DNAT to loopback (a node port) arrives on another interface on purpose.
    rule(
        s,
        t,
        c,
        &format!(
            "iif != lo ip daddr 127.0.0.0/8 ct status != dnat counter name \"{LOCALHOST_COUNTER}\" drop"
        ),
    );
    rule(
        s,
        t,
        c,
        &format!("iif != lo ip6 daddr ::1 counter name \"{LOCALHOST_COUNTER}\" drop"),
    );
}

fn render_alerts(
    s: &mut String,
    r: &Rebuild<'_>,
    agent: &Identity,
    policy: &AlertListenerPolicy,
    leftover: bool,
) {
    let t = r.t;
    let AlertListenerPolicy::Guarded { monit } = policy else {
        if leftover {
            r.remove_chain(s, ALERTS_CHAIN);
            r.remove_chain(s, ALERTS_GUARD_CHAIN);
            remove_counter(s, r, ALERTS_COUNTER);
        }
        return;
    };
    r.remove_chain(s, ALERTS_CHAIN);
    counter(s, r, ALERTS_COUNTER);
    r.empty_chain(s, ALERTS_GUARD_CHAIN);
    let g = ALERTS_GUARD_CHAIN;
    s.push_str(&not_a_syn_rule(t, g));
    rule(
        s,
        t,
        g,
        &format!("{} accept comment \"bosh-agent\"", identity_match(agent)),
    );
    rule(
        s,
        t,
        g,
        &format!("{} accept comment \"monit\"", identity_match(monit)),
    );
    rule(s, t, g, &format!("counter name \"{ALERTS_COUNTER}\" drop"));
    let c = ALERTS_CHAIN;
    let _ = writeln!(s, "add chain {t} {c} {{ {OUTPUT} }}");
    rule(
        s,
        t,
        c,
        &format!("tcp dport {ALERTS_PORT} ip daddr 127.0.0.1 jump {g}"),
    );
    rule(
        s,
        t,
        c,
        &format!("tcp dport {ALERTS_PORT} ip6 daddr ::1 jump {g}"),
    );
}
