//! The shape of the agent's table as its own scripts describe it: which chains (with their
//! hook line and rules, in order) and which sets (with their elements) a script leaves behind.
//!
//! This is a small interpreter of the subset of nft syntax the renderer writes (`add`/`create`
//! table, `add`/`flush`/`delete` chain and set, `add`/`delete` counter, `add rule`, `add element`, `delete rule …
//! handle`). It is what [`super::readback::conforms`] compares a read-back with — the shape
//! [`super::render::render_ruleset`] produces for a desired state, so a rule added to the
//! renderer is expected by the read-back without editing it — and what the in-memory table of
//! [`super::table::FakeTable`] holds. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use super::render::render_ruleset;
use super::{DesiredState, EGRESS_JOBS_CHAIN, MONIT_JOBS_CHAIN, SELFTEST_CHAIN, TABLE};

/// One chain: its hook line (base chains) and its rules, as the script wrote them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainShape {
    /// `type filter hook output priority filter - 1; policy accept;` for a base chain.
    pub hook: Option<String>,
    /// Rule bodies in order, each with the kernel handle it was given.
    pub rules: Vec<(u64, String)>,
}

impl ChainShape {
    /// How many lines nft prints inside the chain: the hook line, then one per rule.
    pub fn lines(&self) -> usize {
        usize::from(self.hook.is_some()) + self.rules.len()
    }
}

/// One set: its type line and its elements (`address . port`, in insertion order, no
/// duplicates).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetShape {
    /// The declaration inside the braces, e.g. `type ipv4_addr . inet_service;`.
    pub decl: String,
    /// Elements as written.
    pub elements: Vec<String>,
}

/// The agent's table: absent, or its chains and sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableShape {
    /// Whether `inet bosh_agent` exists.
    pub present: bool,
    /// Chains by name.
    pub chains: BTreeMap<String, ChainShape>,
    /// Sets by name.
    pub sets: BTreeMap<String, SetShape>,
    /// Named counters (their values are the kernel's; only their presence is the shape).
    pub counters: std::collections::BTreeSet<String>,
    next_handle: u64,
}

/// A script line the interpreter does not understand or cannot apply (as nft would refuse
/// it: the whole script then changes nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("script line {line}: {why}: {text:?}")]
pub struct ScriptError {
    /// 1-based line number.
    pub line: usize,
    /// The line.
    pub text: String,
    /// Why it cannot be applied.
    pub why: &'static str,
}

impl TableShape {
    /// The shape `desired` renders to, applied to an absent table.
    pub fn of(desired: &DesiredState) -> Result<TableShape, ScriptError> {
        let mut t = TableShape::default();
        t.apply(&render_ruleset(desired))?;
        Ok(t)
    }

    /// Applies `script` as one transaction: on error nothing changes.
    pub fn apply(&mut self, script: &str) -> Result<(), ScriptError> {
        let mut next = self.clone();
        for (i, line) in script.lines().enumerate() {
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            next.apply_line(text).map_err(|why| ScriptError {
                line: i + 1,
                text: text.to_string(),
                why,
            })?;
        }
        *self = next;
        Ok(())
    }

    fn apply_line(&mut self, line: &str) -> Result<(), &'static str> {
        let table = format!("inet {TABLE}");
        let (verb, rest) = line.split_once(' ').ok_or("no object")?;
        let (kind, rest) = rest.split_once(' ').ok_or("no object")?;
        let rest = rest
            .strip_prefix(table.as_str())
            .ok_or("not the agent's table")?
            .trim_start();
        if kind == "table" {
            return match verb {
                "create" if self.present => Err("table exists"),
                "add" | "create" => {
                    self.present = true;
                    Ok(())
                }
                "delete" => {
                    *self = TableShape::default();
                    Ok(())
                }
                _ => Err("unknown verb"),
            };
        }
        if !self.present {
            return Err("no such table");
        }
        let (name, body) = match rest.split_once(' ') {
            Some((n, b)) => (n, b.trim()),
            None => (rest, ""),
        };
        let braced = || {
            body.strip_prefix('{')
                .and_then(|b| b.strip_suffix('}'))
                .map(str::trim)
        };
        match (verb, kind) {
            ("add", "chain") => {
                let chain = self.chains.entry(name.to_string()).or_default();
                if !body.is_empty() {
                    chain.hook = Some(braced().ok_or("chain spec without braces")?.to_string());
                }
            }
            ("flush", "chain") => self.chain(name)?.rules.clear(),
            ("delete", "chain") => {
                let chain = self.chains.get(name).ok_or("no such chain")?;
                if !chain.rules.is_empty() {
                    return Err("chain not empty");
                }
                self.chains.remove(name);
            }
            ("add", "rule") => {
                if body.is_empty() {
                    return Err("rule without expressions");
                }
                self.next_handle += 1;
                let h = self.next_handle;
                self.chain(name)?.rules.push((h, body.to_string()));
            }
            ("delete", "rule") => {
                let h: u64 = body
                    .strip_prefix("handle ")
                    .and_then(|h| h.trim().parse().ok())
                    .ok_or("delete rule without handle")?;
                let chain = self.chain(name)?;
                let before = chain.rules.len();
                chain.rules.retain(|(x, _)| *x != h);
                if chain.rules.len() == before {
                    return Err("no such rule");
                }
            }
            ("add", "set") => {
                let decl = braced().ok_or("set spec without braces")?.to_string();
                self.sets.entry(name.to_string()).or_default().decl = decl;
            }
            ("flush", "set") => self.set(name)?.elements.clear(),
            ("delete", "set") => {
                self.sets.remove(name).ok_or("no such set")?;
            }
            ("add", "counter") => {
                self.counters.insert(name.to_string());
            }
            ("delete", "counter") => {
                if !self.counters.remove(name) {
                    return Err("no such counter");
                }
            }
            ("add", "element") => {
                let list = braced().ok_or("elements without braces")?;
                let set = self.set(name)?;
                for e in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    if !set.elements.iter().any(|x| x == e) {
                        set.elements.push(e.to_string());
                    }
                }
            }
            _ => return Err("not a statement the agent writes"),
        }
        Ok(())
    }

    fn chain(&mut self, name: &str) -> Result<&mut ChainShape, &'static str> {
        self.chains.get_mut(name).ok_or("no such chain")
    }

    fn set(&mut self, name: &str) -> Result<&mut SetShape, &'static str> {
        self.sets.get_mut(name).ok_or("no such set")
    }

    /// Adds `endpoints` to the NATS sets (what the netlink fast path does).
    pub fn add_endpoints(&mut self, endpoints: &[SocketAddr]) -> Result<(), ScriptError> {
        self.apply(&super::render::render_nats_additions(endpoints))
    }

    /// The chains the agent owns (every chain but the jobs' chains and the self-test's).
    pub fn agent_chains(&self) -> impl Iterator<Item = (&String, &ChainShape)> {
        self.chains.iter().filter(|(n, _)| {
            n.as_str() != MONIT_JOBS_CHAIN
                && n.as_str() != EGRESS_JOBS_CHAIN
                && n.as_str() != SELFTEST_CHAIN
        })
    }

    /// The table as `nft list table` prints it (rules as the script wrote them), or `None`
    /// when absent: what [`super::readback::snapshot`] reads.
    pub fn listing(&self) -> Option<String> {
        if !self.present {
            return None;
        }
        let mut s = format!("table inet {TABLE} {{\n");
        for (name, set) in &self.sets {
            let _ = writeln!(s, "\tset {name} {{");
            for part in set.decl.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let _ = writeln!(s, "\t\t{part}");
            }
            if !set.elements.is_empty() {
                let _ = writeln!(s, "\t\telements = {{ {} }}", set.elements.join(", "));
            }
            s.push_str("\t}\n\n");
        }
        for (name, chain) in &self.chains {
            let _ = writeln!(s, "\tchain {name} {{");
            if let Some(h) = &chain.hook {
                let _ = writeln!(s, "\t\t{h}");
            }
            for (_, r) in &chain.rules {
                let _ = writeln!(s, "\t\t{r}");
            }
            s.push_str("\t}\n\n");
        }
        s.push_str("}\n");
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::firewall::render::render_ruleset_fresh;
    use crate::firewall::{
        Identity, MONIT_CHAIN, MONIT_GUARD_CHAIN, MonitPolicy, NATS_GUARD_CHAIN, NatsPolicy,
    };

    fn every_state() -> Vec<DesiredState> {
        let ids = [
            Identity::Cgroup {
                path: crate::cgroup::NftCgroupPath::new("unified/a").unwrap(),
                level: 2,
            },
            Identity::Uid {
                uid: 0,
                reason: "t".into(),
            },
        ];
        let monits = [
            MonitPolicy::Disabled,
            MonitPolicy::Enabled { allow_root: true },
            MonitPolicy::Enabled { allow_root: false },
        ];
        let nats = [
            NatsPolicy::Disabled,
            NatsPolicy::Enabled {
                endpoints: Default::default(),
            },
            NatsPolicy::Enabled {
                endpoints: ["10.0.0.5:4222", "[2001:db8::1]:4222"]
                    .iter()
                    .map(|e| e.parse().unwrap())
                    .collect(),
            },
        ];
        let mut out = Vec::new();
        for identity in &ids {
            for monit in monits {
                for n in &nats {
                    out.push(DesiredState {
                        identity: identity.clone(),
                        monit,
                        nats: n.clone(),
                        workload: Default::default(),
                    });
                }
            }
        }
        out
    }

    #[test]
    fn every_rendered_state_is_understood_and_both_scripts_agree() {
        for d in every_state() {
            let full = TableShape::of(&d).unwrap_or_else(|e| panic!("{d:?}: {e}"));
            let mut fresh = TableShape::default();
            fresh.apply(&render_ruleset_fresh(&d)).unwrap();
            assert_eq!(
                full.chains, fresh.chains,
                "fresh and idempotent scripts differ for {d:?}"
            );
            assert_eq!(full.sets, fresh.sets);
            // The idempotent script applied to its own result changes nothing.
            let mut again = full.clone();
            again.apply(&render_ruleset(&d)).unwrap();
            assert_eq!(again.chains.len(), full.chains.len());
            for (n, c) in &full.chains {
                let rules: Vec<&String> = c.rules.iter().map(|(_, r)| r).collect();
                let again: Vec<&String> = again.chains[n].rules.iter().map(|(_, r)| r).collect();
                assert_eq!(rules, again, "{n}");
            }
            assert!(!full.chains.contains_key(SELFTEST_CHAIN));
            assert_eq!(
                full.chains.contains_key(MONIT_GUARD_CHAIN),
                d.monit != MonitPolicy::Disabled
            );
            assert_eq!(
                full.chains.contains_key(NATS_GUARD_CHAIN),
                d.nats != NatsPolicy::Disabled
            );
        }
    }

    #[test]
    fn the_shape_is_the_renderers() {
        let d = &every_state()[4];
        let t = TableShape::of(d).unwrap();
        assert!(t.chains[MONIT_CHAIN].hook.is_some());
        assert_eq!(t.chains[MONIT_CHAIN].lines(), 3);
        assert_eq!(t.chains[MONIT_GUARD_CHAIN].lines(), 5);
    }

    #[test]
    fn a_failing_line_changes_nothing() {
        let mut t = TableShape::default();
        t.apply("add table inet bosh_agent\nadd chain inet bosh_agent c\n")
            .unwrap();
        let before = t.clone();
        let e = t
            .apply("add rule inet bosh_agent c accept\nadd rule inet bosh_agent nope accept\n")
            .unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(t, before);
        assert!(t.apply("create table inet bosh_agent\n").is_err());
        assert!(t.apply("add rule inet other c accept\n").is_err());
        assert!(t.apply("list ruleset\n").is_err());
    }

    #[test]
    fn the_listing_reads_back_as_the_same_snapshot_for_equal_tables() {
        let d = &every_state()[5];
        let a = TableShape::of(d).unwrap();
        let b = TableShape::of(d).unwrap();
        let snap = crate::firewall::readback::snapshot(&a.listing().unwrap());
        assert_eq!(
            snap,
            crate::firewall::readback::snapshot(&b.listing().unwrap())
        );
        assert_eq!(crate::firewall::readback::conforms(&snap, d), Ok(()));
        assert_eq!(TableShape::default().listing(), None);
    }
}
