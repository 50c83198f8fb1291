//! Pure rendering of nft scripts. Same input, byte-identical output; no I/O.
//!
//! Shape of the table (see README "The firewall it installs"):
//! - base chains `monit_access` and `nats_access` (hook output, priority filter - 1) hold one
//!   cheap pre-filter rule per family that jumps to a guard chain only for packets addressed to
//!   a protected endpoint, so unrelated traffic pays a compare (monit) or one set lookup (NATS)
//!   and no conntrack;
//! - guard chains decide only connection attempts: a segment that is not a SYN (without ACK)
//!   belongs to a flow whose SYN was allowed — or is a stray the server resets — so it is
//!   accepted and marked at once. This lets through the closing ACKs that the kernel sends from
//!   TIME-WAIT or orphaned sockets, which no socket match can see (nftables pitfall 7), without
//!   conntrack. SYNs are accepted (and marked `0xb054`) for the agent, then jobs / root for
//!   monit, and dropped for everyone else, so a refused process never gets a connection.
//!
//! Rebuilt chains are deleted and recreated inside the one transaction (add-then-delete makes
//! this work whether or not they exist, on nft 1.0.2 through current: no `destroy`). Where the
//! table is known to be absent, [`render_ruleset_fresh`] only creates (no deletion, no wait).

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::{
    ALLOW_MARK, DesiredState, EGRESS_JOBS_CHAIN, Identity, JobRule, MONIT_CHAIN, MONIT_GUARD_CHAIN,
    MONIT_JOBS_CHAIN, MONIT_PORT, MonitPolicy, NATS_CHAIN, NATS_GUARD_CHAIN, NATS_SET_V4,
    NATS_SET_V6, NatsPolicy, SELFTEST_CHAIN, TABLE,
};
use crate::cgroup::NftCgroupPath;

#[path = "render_workload.rs"]
mod workload;
pub use workload::Leftovers;

const HOOK: &str = "type filter hook output priority filter - 1; policy accept;";

/// The match expression for an identity.
pub fn identity_match(id: &Identity) -> String {
    match id {
        Identity::Cgroup { path, level } => {
            format!("socket cgroupv2 level {level} \"{}\"", path.as_str())
        }
        Identity::Uid { uid, .. } => format!("meta skuid {uid}"),
    }
}

fn accept_marked() -> String {
    format!("meta mark set {ALLOW_MARK:#x} accept")
}

/// First rule of every guard chain: segments that are not connection attempts pass, marked.
fn not_a_syn_rule(t: &str, chain: &str) -> String {
    format!(
        "add rule {t} {chain} tcp flags & (syn | ack) != syn {} comment \"in-flow\"\n",
        accept_marked()
    )
}

/// Renders the whole desired state as one script. Job rules in `monit_access_jobs` are never
/// touched: the chain is added if missing and otherwise left as it is.
pub fn render_ruleset(state: &DesiredState) -> String {
    render(state, false, Leftovers::none())
}

/// [`render_ruleset`] that also removes the objects of workload policies that are switched
/// off but still in the live table (`leftovers`, from [`Leftovers::in_listing`]). With
/// nothing left over it is byte-identical to [`render_ruleset`].
pub fn render_ruleset_removing(state: &DesiredState, leftovers: Leftovers) -> String {
    render(state, false, leftovers)
}

/// The same state for a host where the table does not exist (a first boot): objects are only
/// created, nothing is flushed or deleted, so nft does not wait on the kernel at its exit
/// (10–15 ms for any deletion). It starts with `create table`, which fails if the table
/// appeared after all — the transaction then changes nothing and the caller falls back to
/// [`render_ruleset`].
pub fn render_ruleset_fresh(state: &DesiredState) -> String {
    render(state, true, Leftovers::none())
}

fn render(state: &DesiredState, fresh: bool, leftovers: Leftovers) -> String {
    let mut s = String::with_capacity(2048);
    let t = format!("inet {TABLE}");
    let verb = if fresh { "create" } else { "add" };
    let _ = writeln!(s, "{verb} table {t}");
    let _ = writeln!(s, "add chain {t} {MONIT_JOBS_CHAIN}");
    let r = Rebuild { t: &t, fresh };
    render_monit(&mut s, &r, &state.identity, state.monit);
    render_nats(&mut s, &r, &state.identity, &state.nats);
    workload::render_workload(&mut s, &r, &state.identity, &state.workload, leftovers);
    // A self-test interrupted by a crash must not leave its chain behind.
    r.remove_chain(&mut s, SELFTEST_CHAIN);
    s
}

/// How rebuilt objects are emptied: not at all in a fresh table.
struct Rebuild<'a> {
    t: &'a str,
    fresh: bool,
}

impl Rebuild<'_> {
    /// Adds a chain (or empties an existing one) and deletes it: the first half of a rebuild,
    /// or a removal. Nothing in a fresh table.
    fn remove_chain(&self, s: &mut String, chain: &str) {
        if !self.fresh {
            reset_chain(s, self.t, chain);
        }
    }

    /// Removes a set if it may exist.
    fn remove_set(&self, s: &mut String, set: &str) {
        if !self.fresh {
            let _ = writeln!(s, "add set {} {set} {{ {} }}", self.t, set_type(set));
            let _ = writeln!(s, "delete set {} {set}", self.t);
        }
    }

    /// Makes an empty regular chain.
    fn empty_chain(&self, s: &mut String, chain: &str) {
        let _ = writeln!(s, "add chain {} {chain}", self.t);
        if !self.fresh {
            let _ = writeln!(s, "flush chain {} {chain}", self.t);
        }
    }

    /// Makes an empty set.
    fn empty_set(&self, s: &mut String, set: &str) {
        let _ = writeln!(s, "add set {} {set} {{ {} }}", self.t, set_type(set));
        if !self.fresh {
            let _ = writeln!(s, "flush set {} {set}", self.t);
        }
    }
}

/// Adds (or empties) a chain and deletes it: the first half of a rebuild, or a removal.
fn reset_chain(s: &mut String, t: &str, chain: &str) {
    let _ = writeln!(s, "add chain {t} {chain}");
    let _ = writeln!(s, "flush chain {t} {chain}");
    let _ = writeln!(s, "delete chain {t} {chain}");
}

fn render_monit(s: &mut String, r: &Rebuild<'_>, id: &Identity, policy: MonitPolicy) {
    let t = r.t;
    // The base chain goes first: it is the only chain that jumps to the guard.
    r.remove_chain(s, MONIT_CHAIN);
    match policy {
        MonitPolicy::Disabled => r.remove_chain(s, MONIT_GUARD_CHAIN),
        MonitPolicy::Enabled { allow_root } => {
            r.empty_chain(s, MONIT_GUARD_CHAIN);
            let _ = writeln!(s, "add chain {t} {MONIT_CHAIN} {{ {HOOK} }}");
            // Port first: on loopback most unrelated traffic fails the first compare.
            let _ = writeln!(
                s,
                "add rule {t} {MONIT_CHAIN} tcp dport {MONIT_PORT} ip daddr 127.0.0.1 jump {MONIT_GUARD_CHAIN}"
            );
            let _ = writeln!(
                s,
                "add rule {t} {MONIT_CHAIN} tcp dport {MONIT_PORT} ip6 daddr ::1 jump {MONIT_GUARD_CHAIN}"
            );
            s.push_str(&not_a_syn_rule(t, MONIT_GUARD_CHAIN));
            let _ = writeln!(
                s,
                "add rule {t} {MONIT_GUARD_CHAIN} {} {} comment \"bosh-agent\"",
                identity_match(id),
                accept_marked()
            );
            let _ = writeln!(
                s,
                "add rule {t} {MONIT_GUARD_CHAIN} jump {MONIT_JOBS_CHAIN}"
            );
            if allow_root {
                let _ = writeln!(
                    s,
                    "add rule {t} {MONIT_GUARD_CHAIN} meta skuid 0 {} comment \"root\"",
                    accept_marked()
                );
            }
            let _ = writeln!(s, "add rule {t} {MONIT_GUARD_CHAIN} drop");
        }
    }
}

fn render_nats(s: &mut String, r: &Rebuild<'_>, id: &Identity, policy: &NatsPolicy) {
    let t = r.t;
    r.remove_chain(s, NATS_CHAIN);
    match policy {
        NatsPolicy::Disabled => {
            r.remove_chain(s, NATS_GUARD_CHAIN);
            for set in [NATS_SET_V4, NATS_SET_V6] {
                r.remove_set(s, set);
            }
        }
        NatsPolicy::Enabled { endpoints } => {
            for set in [NATS_SET_V4, NATS_SET_V6] {
                r.empty_set(s, set);
            }
            render_elements(s, t, NATS_SET_V4, endpoints.iter().filter(|e| e.is_ipv4()));
            render_elements(s, t, NATS_SET_V6, endpoints.iter().filter(|e| e.is_ipv6()));
            r.empty_chain(s, NATS_GUARD_CHAIN);
            let _ = writeln!(s, "add chain {t} {NATS_CHAIN} {{ {HOOK} }}");
            let _ = writeln!(
                s,
                "add rule {t} {NATS_CHAIN} ip daddr . tcp dport @{NATS_SET_V4} jump {NATS_GUARD_CHAIN}"
            );
            let _ = writeln!(
                s,
                "add rule {t} {NATS_CHAIN} ip6 daddr . tcp dport @{NATS_SET_V6} jump {NATS_GUARD_CHAIN}"
            );
            s.push_str(&not_a_syn_rule(t, NATS_GUARD_CHAIN));
            let _ = writeln!(
                s,
                "add rule {t} {NATS_GUARD_CHAIN} {} {} comment \"bosh-agent\"",
                identity_match(id),
                accept_marked()
            );
            let _ = writeln!(s, "add rule {t} {NATS_GUARD_CHAIN} drop");
        }
    }
}

fn set_type(set: &str) -> &'static str {
    if set == NATS_SET_V4 {
        "type ipv4_addr . inet_service;"
    } else {
        "type ipv6_addr . inet_service;"
    }
}

fn render_elements<'a>(
    s: &mut String,
    t: &str,
    set: &str,
    eps: impl Iterator<Item = &'a SocketAddr>,
) {
    let elems: Vec<String> = eps.map(|e| format!("{} . {}", e.ip(), e.port())).collect();
    // Chunks keep lines short; they are still one transaction.
    for chunk in elems.chunks(256) {
        let _ = writeln!(s, "add element {t} {set} {{ {} }}", chunk.join(", "));
    }
}

/// Adds endpoints to the NATS sets without touching anything else: the fast path before a
/// connection attempt. Adding never waits on the kernel (deleting does, 10–15 ms at nft's
/// exit), so stale endpoints are removed by the full rebuild that follows, off the dial path.
pub fn render_nats_additions(endpoints: &[SocketAddr]) -> String {
    let mut s = String::new();
    let t = format!("inet {TABLE}");
    render_elements(
        &mut s,
        &t,
        NATS_SET_V4,
        endpoints.iter().filter(|e| e.is_ipv4()),
    );
    render_elements(
        &mut s,
        &t,
        NATS_SET_V6,
        endpoints.iter().filter(|e| e.is_ipv6()),
    );
    s
}

/// One job rule: accept and mark packets from the job's identity.
pub fn render_job_rule(rule: &JobRule) -> String {
    format!(
        "add rule inet {TABLE} {MONIT_JOBS_CHAIN} {} {} comment \"{}\"\n",
        identity_match(&rule.identity),
        accept_marked(),
        rule.comment.as_str()
    )
}

/// One `firewall-allow metadata` job rule: accept the job's packets to a denied range.
pub fn render_metadata_job_rule(rule: &JobRule) -> String {
    format!(
        "add rule inet {TABLE} {EGRESS_JOBS_CHAIN} {} accept comment \"{}\"\n",
        identity_match(&rule.identity),
        rule.comment.as_str()
    )
}

/// Deletes a rule of the egress jobs chain by its kernel handle.
pub fn render_delete_metadata_job_rule(handle: u64) -> String {
    format!("delete rule inet {TABLE} {EGRESS_JOBS_CHAIN} handle {handle}\n")
}

/// Deletes a rule of the jobs chain by its kernel handle.
pub fn render_delete_job_rule(handle: u64) -> String {
    format!("delete rule inet {TABLE} {MONIT_JOBS_CHAIN} handle {handle}\n")
}

/// The self-test chain on 127.0.0.1: per candidate level, TCP to that level's own port is
/// accepted when `socket cgroupv2` matches at that level; every other SYN to those ports is
/// answered with a reset. A connection to a level's port then succeeds exactly when the kernel
/// matches the agent's socket at that level: the answer is read from `connect`, with no listing.
/// `fresh` (a new, empty network namespace) leaves out the reset of a leftover chain, which
/// would be a deletion (nft then waits 10–15 ms on the kernel at its exit).
pub fn render_selftest(path: &NftCgroupPath, probes: &[(u32, u16)], fresh: bool) -> String {
    let mut s = String::new();
    let t = format!("inet {TABLE}");
    let _ = writeln!(s, "add table {t}");
    if !fresh {
        reset_chain(&mut s, &t, SELFTEST_CHAIN);
    }
    let _ = writeln!(s, "add chain {t} {SELFTEST_CHAIN} {{ {HOOK} }}");
    for (level, port) in probes {
        let _ = writeln!(
            s,
            "add rule {t} {SELFTEST_CHAIN} tcp dport {port} ip daddr 127.0.0.1 socket cgroupv2 level {level} \"{}\" accept comment \"level={level}\"",
            path.as_str()
        );
    }
    if !probes.is_empty() {
        let ports: Vec<String> = probes.iter().map(|(_, p)| p.to_string()).collect();
        let _ = writeln!(
            s,
            "add rule {t} {SELFTEST_CHAIN} tcp dport {{ {} }} ip daddr 127.0.0.1 reject with tcp reset",
            ports.join(", ")
        );
    }
    s
}

/// Removes the self-test chain.
pub fn render_selftest_cleanup() -> String {
    let mut s = String::new();
    reset_chain(&mut s, &format!("inet {TABLE}"), SELFTEST_CHAIN);
    s
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "render_workload_tests.rs"]
mod workload_tests;
