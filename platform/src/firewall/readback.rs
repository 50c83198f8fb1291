//! Reading the live table back: a canonical snapshot of what the agent owns (to detect
//! drift) and the job rules of `monit_access_jobs`. Pure functions over nft's JSON.

use serde_json::{Map, Value, json};

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use super::shape::TableShape;
use super::{
    ALLOW_MARK, DesiredState, EGRESS_JOBS_CHAIN, FirewallError, Identity, JOB_COMMENT_PREFIX,
    MONIT_JOBS_CHAIN, MONIT_PORT, SELFTEST_CHAIN,
};

/// The objects of an `nft -j list` answer (`{"nftables": [...]}`).
fn objects(listing: &Value) -> Result<&Vec<Value>, FirewallError> {
    listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| FirewallError::Parse {
            context: "listing".into(),
            detail: "no top-level \"nftables\" array".into(),
        })
}

/// A canonical view of the agent-owned part of the table, from nft's text listing (which,
/// unlike nft 1.0.6's JSON, keeps the `level` of `socket cgroupv2`): each chain's lines in
/// order, each set's lines with its elements sorted. Job rules and the transient self-test
/// chain are excluded (jobs own them). Equal live state gives an equal value. Pure.
pub fn snapshot(listing: &str) -> Value {
    let mut chains = Map::new();
    let mut sets = Map::new();
    let mut cur: Option<(bool, String, Vec<String>)> = None; // (is_set, name, body lines)
    for line in listing.lines() {
        let Some(rest) = line.strip_prefix('\t') else {
            continue;
        };
        if !rest.starts_with('\t') {
            if rest == "}" {
                if let Some((is_set, name, body)) = cur.take() {
                    if is_set {
                        sets.insert(name, json!(canonical_set(&body)));
                    } else if !skip_chain(&name) {
                        chains.insert(name, json!(body));
                    }
                }
            } else if let Some(n) = rest
                .strip_prefix("chain ")
                .and_then(|r| r.strip_suffix(" {"))
            {
                cur = Some((false, n.to_string(), Vec::new()));
            } else if let Some(n) = rest.strip_prefix("set ").and_then(|r| r.strip_suffix(" {")) {
                cur = Some((true, n.to_string(), Vec::new()));
            }
        } else if let Some((_, _, body)) = cur.as_mut() {
            body.push(rest.trim().to_string());
        }
    }
    json!({"chains": chains, "sets": sets})
}

/// Checks that a snapshot has the shape `desired` renders to ([`TableShape::of`], the
/// renderer's own script interpreted): exactly the chains it leaves, each with as many lines,
/// the agent's own rules (`comment "bosh-agent"`) matching its identity (cgroup level or uid),
/// and exactly its sets with their elements. A read-back taken some time after the apply is
/// only trusted as the drift reference if it conforms: a change made in between (a chain,
/// rule or element removed, another level) is then repaired, not adopted. Pure.
pub fn conforms(snapshot: &Value, desired: &DesiredState) -> Result<(), String> {
    let shape =
        TableShape::of(desired).map_err(|e| format!("the desired state does not render: {e}"))?;
    let want: BTreeMap<&str, usize> = shape
        .agent_chains()
        .map(|(n, c)| (n.as_str(), c.lines()))
        .collect();
    let chains = snapshot
        .get("chains")
        .and_then(Value::as_object)
        .ok_or("no chains in the snapshot")?;
    let have: BTreeMap<&str, usize> = chains
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_array().map_or(0, Vec::len)))
        .collect();
    if have != want {
        return Err(format!(
            "chains and their lines {have:?}, expected {want:?}"
        ));
    }
    let own = match &desired.identity {
        Identity::Cgroup { level, .. } => format!("socket cgroupv2 level {level} "),
        Identity::Uid { uid, .. } => format!("meta skuid {uid} "),
    };
    const OWN: &str = "comment \"bosh-agent\"";
    for (chain, c) in shape.agent_chains() {
        let expected = c.rules.iter().filter(|(_, r)| r.ends_with(OWN)).count();
        let lines = chains.get(chain).and_then(Value::as_array);
        let found = lines
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|l| l.starts_with(&own) && l.ends_with(OWN))
            .count();
        if found != expected {
            return Err(format!(
                "{chain} has {found} rules `{own}… {OWN}`, expected {expected}"
            ));
        }
    }
    let sets = snapshot.get("sets").and_then(Value::as_object);
    let set_names: BTreeSet<&str> = sets
        .map(|s| s.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let want_sets: BTreeSet<&str> = shape.sets.keys().map(String::as_str).collect();
    if set_names != want_sets {
        return Err(format!("sets {set_names:?}, expected {want_sets:?}"));
    }
    for (name, set) in &shape.sets {
        let live = sets
            .and_then(|s| s.get(name))
            .and_then(|s| s.get("elements"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|e| e.as_str().map(canonical_element))
            .collect::<Option<BTreeSet<String>>>()
            .ok_or_else(|| format!("an element of set {name} is not a string"))?;
        let expected: BTreeSet<String> =
            set.elements.iter().map(|e| canonical_element(e)).collect();
        if live != expected {
            return Err(format!("{name} holds {live:?}, expected {expected:?}"));
        }
    }
    Ok(())
}

/// An element as compared: `address . port` in one spelling (nft prints IPv6 addresses its
/// own way), anything else (ranges, prefixes, concatenations) as written, which is how nft
/// lists back what the renderer wrote.
fn canonical_element(e: &str) -> String {
    parse_element(e).map_or_else(|| e.trim().to_string(), |a| a.to_string())
}

/// `10.0.0.5 . 4222` or `2001:db8::1 . 4222`.
fn parse_element(e: &str) -> Option<SocketAddr> {
    let (ip, port) = e.split_once(" . ")?;
    Some(SocketAddr::new(
        ip.trim().parse::<IpAddr>().ok()?,
        port.trim().parse().ok()?,
    ))
}

/// A set's lines with the element list (which nft prints in hash order, wrapped over lines)
/// replaced by its sorted elements.
fn canonical_set(body: &[String]) -> Value {
    let joined = body.join(" ");
    let (head, elements) = match joined.split_once("elements = {") {
        Some((h, rest)) => {
            let list = rest.rsplit_once('}').map_or(rest, |(l, _)| l);
            let mut e: Vec<String> = list
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect();
            e.sort();
            (h.trim().to_string(), e)
        }
        None => (joined.trim().to_string(), Vec::new()),
    };
    json!({"head": head, "elements": elements})
}

fn skip_chain(name: &str) -> bool {
    name == MONIT_JOBS_CHAIN || name == SELFTEST_CHAIN || name == EGRESS_JOBS_CHAIN
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A rule found in `monit_access_jobs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LiveJobRule {
    /// Kernel handle, for precise deletion.
    pub handle: u64,
    /// The rule's comment, if any.
    pub comment: Option<String>,
    /// `<key>` of a `bosh-monit-access:<key>[ cgid=<n>]` comment.
    pub key: Option<String>,
    /// The cgroup inode recorded by the agent when it added the rule.
    pub cgid: Option<u64>,
    /// What nft printed for the `socket cgroupv2` match: a path it found for the inode, or
    /// the bare number when the cgroup no longer exists.
    pub cgroup: Option<String>,
    /// The uid of a `meta skuid` match.
    pub uid: Option<u64>,
}

/// Parses `bosh-monit-access:<key>[ cgid=<n>]`.
pub fn parse_job_comment(comment: &str) -> Option<(String, Option<u64>)> {
    parse_job_comment_with(JOB_COMMENT_PREFIX, comment)
}

/// Parses `<prefix><key>[ cgid=<n>]` (the monit and metadata job rules share the format).
pub fn parse_job_comment_with(prefix: &str, comment: &str) -> Option<(String, Option<u64>)> {
    let rest = comment.strip_prefix(prefix)?;
    match rest.rsplit_once(" cgid=") {
        Some((key, id)) => Some((key.to_string(), id.parse().ok())),
        None => Some((rest.to_string(), None)),
    }
}

/// The rules of `monit_access_jobs` in a chain (or table) listing, in chain order.
pub fn job_rules(listing: &Value) -> Result<Vec<LiveJobRule>, FirewallError> {
    job_rules_in(listing, MONIT_JOBS_CHAIN, JOB_COMMENT_PREFIX)
}

/// The job rules of `chain` whose comments use `prefix`, in chain order.
pub fn job_rules_in(
    listing: &Value,
    chain: &str,
    prefix: &str,
) -> Result<Vec<LiveJobRule>, FirewallError> {
    let mut out = Vec::new();
    for obj in objects(listing)? {
        let Some(r) = obj.get("rule") else { continue };
        if str_field(r, "chain") != chain {
            continue;
        }
        let handle =
            r.get("handle")
                .and_then(Value::as_u64)
                .ok_or_else(|| FirewallError::Parse {
                    context: format!("rule of {chain}"),
                    detail: "rule without a handle".into(),
                })?;
        let comment = r.get("comment").and_then(Value::as_str).map(str::to_string);
        let (key, cgid) = comment
            .as_deref()
            .and_then(|c| parse_job_comment_with(prefix, c))
            .map_or((None, None), |(k, c)| (Some(k), c));
        let (mut cgroup, mut uid) = (None, None);
        for e in r
            .get("expr")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(m) = e.get("match") else { continue };
            let left = m.get("left");
            let right = m.get("right");
            if left
                .and_then(|l| l.get("socket"))
                .and_then(|s| s.get("key"))
                == Some(&json!("cgroupv2"))
            {
                cgroup = right.map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
            if left.and_then(|l| l.get("meta")).and_then(|s| s.get("key")) == Some(&json!("skuid"))
            {
                uid = right.and_then(Value::as_u64);
            }
        }
        out.push(LiveJobRule {
            handle,
            comment,
            key,
            cgid,
            cgroup,
            uid,
        });
    }
    Ok(out)
}

/// What a rule of `monit_access_jobs` is, judged by its expressions (nft's JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobRuleShape {
    /// A rule `firewall-allow` writes: `socket cgroupv2 … meta mark set 0xb054 accept` with
    /// `comment "bosh-monit-access:<key> cgid=<inode>"` naming the matched cgroup, or the uid
    /// fallback `meta skuid <vcap> meta mark set 0xb054 accept` with
    /// `comment "bosh-monit-access:uid=<vcap>"`.
    Agent,
    /// A rule upstream's Go agent writes: `socket cgroupv2 … ip daddr 127.0.0.1 tcp dport 2822
    /// [log prefix "bosh-monit-access: …"] accept` with `comment "bosh-monit-access:<job>"`,
    /// or the same with `meta skuid <vcap>` and no comment. Existing job releases rely on them.
    GoAgent,
    /// Anything else: the reason it is not a job rule.
    Foreign(String),
}

/// A rule of `monit_access_jobs` that is none of the job-rule shapes ([`JobRuleShape`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForeignJobRule {
    /// Kernel handle, for precise deletion.
    pub handle: u64,
    /// The rule's comment, if any.
    pub comment: Option<String>,
    /// Why it is not a job rule.
    pub why: String,
}

impl std::fmt::Display for ForeignJobRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "handle {}", self.handle)?;
        if let Some(c) = &self.comment {
            write!(f, " ({c:?})")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// The identity a job rule's first expression matches.
enum Matched<'a> {
    /// `socket cgroupv2 == <path or inode>`.
    Cgroup(&'a Value),
    /// `meta skuid == <uid>`.
    Uid(u64),
}

fn match_parts(e: &Value) -> Option<(&Value, &Value)> {
    let m = e.get("match")?;
    if m.get("op").and_then(Value::as_str) != Some("==") {
        return None;
    }
    Some((m.get("left")?, m.get("right")?))
}

fn identity_of(e: &Value) -> Option<Matched<'_>> {
    let (left, right) = match_parts(e)?;
    if left.get("socket").and_then(|s| s.get("key")) == Some(&json!("cgroupv2")) {
        return Some(Matched::Cgroup(right));
    }
    if left.get("meta").and_then(|s| s.get("key")) == Some(&json!("skuid")) {
        return right.as_u64().map(Matched::Uid);
    }
    None
}

/// The inode a `socket cgroupv2` match names, where nft printed one rather than a path: it
/// prints the number when it cannot find the cgroup's path (the agent lists with the cgroup
/// tree hidden, so always), as a JSON number or, for some inodes, a string of digits.
fn cgroup_inode(matched: &Value) -> Option<u64> {
    match matched {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    }
}

fn is_allow_mark(e: &Value) -> bool {
    e.get("mangle").is_some_and(|m| {
        m.get("key")
            .and_then(|k| k.get("meta"))
            .and_then(|k| k.get("key"))
            == Some(&json!("mark"))
            && m.get("value").and_then(Value::as_u64) == Some(u64::from(ALLOW_MARK))
    })
}

fn is_accept(e: &Value) -> bool {
    e.as_object()
        .is_some_and(|o| o.len() == 1 && o.get("accept").is_some_and(Value::is_null))
}

fn is_payload(e: &Value, protocol: &str, field: &str, want: &Value) -> bool {
    match_parts(e).is_some_and(|(left, right)| {
        left.get("payload").is_some_and(|p| {
            p.get("protocol") == Some(&json!(protocol)) && p.get("field") == Some(&json!(field))
        }) && right == want
    })
}

/// `ip daddr 127.0.0.1` or `ip6 daddr ::1`: monit's endpoints.
fn is_monit_daddr(e: &Value) -> bool {
    is_payload(e, "ip", "daddr", &json!("127.0.0.1"))
        || is_payload(e, "ip6", "daddr", &json!("::1"))
}

fn is_monit_dport(e: &Value) -> bool {
    is_payload(e, "tcp", "dport", &json!(MONIT_PORT))
}

/// The Go agent's `log prefix "bosh-monit-access: …"`: logging grants nothing.
fn is_go_log(e: &Value) -> bool {
    e.get("log").and_then(Value::as_object).is_some_and(|l| {
        l.len() == 1
            && l.get("prefix")
                .and_then(Value::as_str)
                .is_some_and(|p| p.starts_with(JOB_COMMENT_PREFIX))
    })
}

/// A short description of a rule's expressions, for the reason a rule is refused.
fn describe_exprs(exprs: &[Value]) -> String {
    let parts: Vec<String> = exprs
        .iter()
        .map(|e| {
            let Some((k, v)) = e.as_object().and_then(|o| o.iter().next()) else {
                return "?".into();
            };
            match (k.as_str(), v.get("left").and_then(Value::as_object)) {
                ("match", Some(left)) => {
                    let what = left.iter().next().map_or("?".to_string(), |(lk, lv)| {
                        let sub = lv
                            .get("key")
                            .or_else(|| lv.get("field"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        format!("{lk} {sub}").trim().to_string()
                    });
                    let right = v.get("right").map(Value::to_string).unwrap_or_default();
                    format!("{what} {right}")
                }
                (k, _) => k.to_string(),
            }
        })
        .collect();
    if parts.is_empty() {
        "no expressions".into()
    } else {
        parts.join(" ")
    }
}

/// Judges one rule object of `monit_access_jobs` (the value of a `"rule"` key in an
/// `nft -j` listing). `vcap_uid` is the uid the documented uid fallback matches (the `vcap`
/// user's); without one, no uid rule is a job rule. Pure.
///
/// Guarantees: only the shapes of [`JobRuleShape::Agent`] and [`JobRuleShape::GoAgent`] pass,
/// and each of them matches one identity (a cgroup and its descendants, or the vcap uid)
/// before it accepts; every other rule — an unconditional `accept`, a `counter accept`,
/// another port, a jump, a rule whose cgroup is not the one its comment records — is
/// [`JobRuleShape::Foreign`]. nft's JSON omits the `level` of `socket cgroupv2`, so the level
/// is not judged.
pub fn judge_job_rule(rule: &Value, vcap_uid: Option<u32>) -> JobRuleShape {
    let exprs: &[Value] = rule
        .get("expr")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let comment = rule.get("comment").and_then(Value::as_str);
    let parsed = comment.and_then(parse_job_comment);
    let foreign = |why: String| JobRuleShape::Foreign(format!("{why} [{}]", describe_exprs(exprs)));
    let Some(id) = exprs.first().and_then(identity_of) else {
        return foreign(
            "it does not start with a cgroup or uid match, so it lets every process through".into(),
        );
    };
    if let Matched::Uid(uid) = id {
        match vcap_uid {
            Some(v) if u64::from(v) == uid => {}
            Some(v) => {
                return foreign(format!(
                    "it matches uid {uid}, not the vcap user's uid {v} (the only uid fallback)"
                ));
            }
            None => {
                return foreign(format!(
                    "it matches uid {uid} and there is no vcap user (the only uid fallback)"
                ));
            }
        }
    }
    let rest = &exprs[1..];
    let agent_shape = rest.len() == 2 && is_allow_mark(&rest[0]) && is_accept(&rest[1]);
    let go_shape = match rest {
        [daddr, dport, accept] => {
            is_monit_daddr(daddr) && is_monit_dport(dport) && is_accept(accept)
        }
        [daddr, dport, log, accept] => {
            is_monit_daddr(daddr) && is_monit_dport(dport) && is_go_log(log) && is_accept(accept)
        }
        _ => false,
    };
    match (id, agent_shape, go_shape) {
        (Matched::Cgroup(matched), true, _) => match parsed {
            Some((_, Some(cgid))) => match cgroup_inode(matched) {
                Some(ino) if ino != cgid => foreign(format!(
                    "it matches cgroup {ino} while its comment records cgid={cgid}"
                )),
                _ => JobRuleShape::Agent,
            },
            _ => foreign(format!(
                "the agent's shape without its comment `{JOB_COMMENT_PREFIX}<key> cgid=<inode>`"
            )),
        },
        (Matched::Uid(uid), true, _) => match parsed {
            Some((key, None)) if key == format!("uid={uid}") => JobRuleShape::Agent,
            _ => foreign(format!(
                "the agent's uid shape without its comment `{JOB_COMMENT_PREFIX}uid={uid}`"
            )),
        },
        (Matched::Cgroup(_), _, true) => match parsed {
            Some((_, None)) => JobRuleShape::GoAgent,
            _ => foreign(format!(
                "the Go agent's shape without its comment `{JOB_COMMENT_PREFIX}<job>`"
            )),
        },
        (Matched::Uid(_), _, true) => match (comment, parsed) {
            (None, _) | (Some(_), Some(_)) => JobRuleShape::GoAgent,
            (Some(_), None) => foreign("the Go agent's uid shape with a foreign comment".into()),
        },
        _ => foreign("its expressions are not those of a job rule".into()),
    }
}

/// The rules of `monit_access_jobs` in a chain (or table) listing that are not job rules
/// ([`judge_job_rule`]), in chain order. Pure.
pub fn foreign_job_rules(
    listing: &Value,
    vcap_uid: Option<u32>,
) -> Result<Vec<ForeignJobRule>, FirewallError> {
    let mut out = Vec::new();
    for obj in objects(listing)? {
        let Some(r) = obj.get("rule") else { continue };
        if str_field(r, "chain") != MONIT_JOBS_CHAIN {
            continue;
        }
        if let JobRuleShape::Foreign(why) = judge_job_rule(r, vcap_uid) {
            let handle =
                r.get("handle")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| FirewallError::Parse {
                        context: format!("rule of {MONIT_JOBS_CHAIN}"),
                        detail: "rule without a handle".into(),
                    })?;
            out.push(ForeignJobRule {
                handle,
                comment: r.get("comment").and_then(Value::as_str).map(str::to_string),
                why,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::firewall::{MonitPolicy, NatsPolicy};

    /// nft 1.0.6's text listing of `render_ruleset_fresh` (monit with root, NATS with two
    /// endpoints, cgroup level 2), captured from a real table.
    const REAL: &str = include_str!("../../tests/fixtures/listing-monit-nats.txt");

    fn desired(level: u32, allow_root: bool, eps: &[&str]) -> DesiredState {
        DesiredState {
            workload: Default::default(),
            identity: Identity::Cgroup {
                path: crate::cgroup::NftCgroupPath::new("unified/exp1").unwrap(),
                level,
            },
            monit: MonitPolicy::Enabled { allow_root },
            nats: NatsPolicy::Enabled {
                endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
            },
        }
    }

    const EPS: [&str; 2] = ["10.0.0.5:4222", "[2001:db8::1]:4222"];

    #[test]
    fn a_faithful_read_back_conforms() {
        assert_eq!(conforms(&snapshot(REAL), &desired(2, true, &EPS)), Ok(()));
    }

    #[test]
    fn read_backs_that_drifted_do_not_conform() {
        let want = desired(2, true, &EPS);
        let cases = [
            ("a chain deleted", {
                let a = REAL.find("\tchain monit_access {").unwrap();
                let b = a + REAL[a..].find("\t}\n").unwrap() + 3;
                format!("{}{}", &REAL[..a], &REAL[b..])
            }),
            ("a rule deleted", REAL.replacen("\t\tdrop\n", "", 1)),
            ("another level", REAL.replace("level 2", "level 1")),
            ("an element removed", REAL.replace("10.0.0.5 . 4222", "")),
            (
                "another element",
                REAL.replace("10.0.0.5 . 4222", "10.0.0.9 . 4222"),
            ),
            (
                "a garbled element",
                REAL.replace("10.0.0.5 . 4222", "10.0.0.5"),
            ),
        ];
        for (what, text) in cases {
            assert!(conforms(&snapshot(&text), &want).is_err(), "{what}");
        }
        // The same table against other desired states.
        assert!(conforms(&snapshot(REAL), &desired(3, true, &EPS)).is_err());
        assert!(conforms(&snapshot(REAL), &desired(2, false, &EPS)).is_err());
        assert!(conforms(&snapshot(REAL), &desired(2, true, &EPS[..1])).is_err());
        let uid = DesiredState {
            identity: Identity::Uid {
                uid: 0,
                reason: "test".into(),
            },
            ..want.clone()
        };
        assert!(conforms(&snapshot(REAL), &uid).is_err());
        let no_nats = DesiredState {
            nats: NatsPolicy::Disabled,
            ..want
        };
        assert!(conforms(&snapshot(REAL), &no_nats).is_err());
        assert!(conforms(&serde_json::json!({}), &desired(2, true, &EPS)).is_err());
    }

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
      {"table": {"family": "inet", "name": "bosh_agent", "handle": 1}},
      {"set": {"family": "inet", "name": "nats_v4", "table": "bosh_agent", "type": ["ipv4_addr", "inet_service"], "handle": 11, "elem": [{"concat": ["127.0.0.1", 4222]}, {"concat": ["10.0.0.5", 4222]}]}},
      {"chain": {"family": "inet", "table": "bosh_agent", "name": "monit_access_jobs", "handle": 1}},
      {"chain": {"family": "inet", "table": "bosh_agent", "name": "monit_guard", "handle": 4}},
      {"chain": {"family": "inet", "table": "bosh_agent", "name": "monit_access", "handle": 12, "type": "filter", "hook": "output", "prio": -1, "policy": "accept"}},
      {"rule": {"family": "inet", "table": "bosh_agent", "chain": "monit_guard", "handle": 15, "comment": "bosh-agent", "expr": [{"match": {"op": "==", "left": {"socket": {"key": "cgroupv2"}}, "right": "unified/exp/agent"}}, {"accept": null}]}},
      {"rule": {"family": "inet", "table": "bosh_agent", "chain": "monit_access_jobs", "handle": 21, "comment": "bosh-monit-access:web cgid=77", "expr": [{"match": {"op": "==", "left": {"socket": {"key": "cgroupv2"}}, "right": "unified/jobs/web"}}, {"accept": null}]}},
      {"rule": {"family": "inet", "table": "bosh_agent", "chain": "monit_access_jobs", "handle": 22, "comment": "bosh-monit-access:gone cgid=78", "expr": [{"match": {"op": "==", "left": {"socket": {"key": "cgroupv2"}}, "right": 78}}, {"accept": null}]}},
      {"rule": {"family": "inet", "table": "bosh_agent", "chain": "monit_access_jobs", "handle": 23, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 1000}}, {"accept": null}]}}
    ]}"#;

    #[test]
    fn job_rules_are_parsed_with_handles_keys_and_identities() {
        let rules = job_rules(&serde_json::from_str(LISTING).unwrap()).unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].handle, 21);
        assert_eq!(rules[0].key.as_deref(), Some("web"));
        assert_eq!(rules[0].cgid, Some(77));
        assert_eq!(rules[0].cgroup.as_deref(), Some("unified/jobs/web"));
        assert_eq!(rules[1].cgroup.as_deref(), Some("78"));
        assert_eq!(rules[2].uid, Some(1000));
        assert_eq!(rules[2].key, None);
    }

    const TEXT: &str = "table inet bosh_agent {
\tset nats_v4 {
\t\ttype ipv4_addr . inet_service
\t\telements = { 10.0.0.5 . 4222,
\t\t\t     10.0.0.6 . 4222 }
\t}

\tchain monit_access_jobs {
\t\tsocket cgroupv2 level 1 18949 accept
\t}

\tchain nats_guard {
\t\ttcp flags != syn / syn,ack meta mark set 0x0000b054 accept comment \"in-flow\"
\t\tsocket cgroupv2 level 2 18949 meta mark set 0x0000b054 accept comment \"bosh-agent\"
\t\tdrop
\t}

\tchain nats_access {
\t\ttype filter hook output priority filter - 1; policy accept;
\t\tip daddr . tcp dport @nats_v4 jump nats_guard
\t}
}
";

    #[test]
    fn snapshot_ignores_job_rules_and_element_order() {
        let swapped = TEXT.replace(
            "{ 10.0.0.5 . 4222,\n\t\t\t     10.0.0.6 . 4222 }",
            "{ 10.0.0.6 . 4222, 10.0.0.5 . 4222 }",
        );
        let more_jobs = TEXT.replace(
            "level 1 18949 accept",
            "level 1 18949 accept\n\t\tsocket cgroupv2 level 1 5 accept",
        );
        assert_eq!(snapshot(TEXT), snapshot(&swapped));
        assert_eq!(snapshot(TEXT), snapshot(&more_jobs));
        let s = snapshot(TEXT);
        assert!(s["chains"].get("monit_access_jobs").is_none());
        assert_eq!(s["chains"]["nats_guard"].as_array().unwrap().len(), 3);
        assert_eq!(
            s["sets"]["nats_v4"]["elements"],
            json!(["10.0.0.5 . 4222", "10.0.0.6 . 4222"])
        );
        assert_eq!(
            s["sets"]["nats_v4"]["head"],
            json!("type ipv4_addr . inet_service")
        );
    }

    #[test]
    fn snapshot_sees_a_changed_level_a_rule_and_a_set_element() {
        let s = snapshot(TEXT);
        assert_ne!(s, snapshot(&TEXT.replace("level 2 18949", "level 1 18949")));
        assert_ne!(s, snapshot(&TEXT.replace("\t\tdrop\n", "")));
        assert_ne!(s, snapshot(&TEXT.replace("10.0.0.6", "10.0.0.7")));
        assert_ne!(
            s,
            snapshot(&TEXT.replace("priority filter - 1", "priority filter"))
        );
    }

    #[test]
    fn empty_or_odd_listing_gives_an_empty_snapshot() {
        assert_eq!(snapshot(""), json!({"chains": {}, "sets": {}}));
        assert_eq!(
            snapshot("garbage\n\t}\n"),
            json!({"chains": {}, "sets": {}})
        );
    }

    #[test]
    fn comments_parse_only_with_the_prefix() {
        assert_eq!(
            parse_job_comment("bosh-monit-access:a/b cgid=5"),
            Some(("a/b".into(), Some(5)))
        );
        assert_eq!(
            parse_job_comment("bosh-monit-access:web"),
            Some(("web".into(), None))
        );
        assert_eq!(parse_job_comment("something else"), None);
    }

    #[test]
    fn malformed_listing_is_an_error_not_a_panic() {
        assert!(
            job_rules(&json!({"nftables": [{"rule": {"chain": "monit_access_jobs"}}]})).is_err()
        );
    }

    /// Real `nft -j list chain inet bosh_agent monit_access_jobs` output (nft 1.0.6), listed
    /// with the cgroup tree hidden as the agent lists it (inodes) and without (paths). Rules
    /// in order: handle 3 the agent's cgroup rule (cgid 3711), 4 the agent's uid rule (vcap
    /// uid 1000), 5 the Go agent's cgroup rule, 6 the Go agent's uid rule, 7 `accept`,
    /// 8 `counter accept`, 9 the Go shape on port 22, 10 the agent's shape with a counter,
    /// 11 the agent's comment on another cgroup (the root), 12 the agent's uid shape for uid
    /// 0, 13 the agent's uid shape jumping elsewhere, 14 the agent's shape without a comment.
    const JOBS_INODES: &str = include_str!("../../tests/fixtures/jobs-chain-inodes.json");
    const JOBS_PATHS: &str = include_str!("../../tests/fixtures/jobs-chain-paths.json");

    fn shapes(listing: &str, vcap: Option<u32>) -> Vec<(u64, JobRuleShape)> {
        let v: Value = serde_json::from_str(listing).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("rule"))
            .map(|r| (r["handle"].as_u64().unwrap(), judge_job_rule(r, vcap)))
            .collect()
    }

    #[test]
    fn job_rules_are_judged_by_their_shape() {
        for (what, listing) in [("inodes", JOBS_INODES), ("paths", JOBS_PATHS)] {
            let got = shapes(listing, Some(1000));
            assert_eq!(got.len(), 12, "{what}");
            for (handle, shape) in &got {
                let want = match handle {
                    3 | 4 => Some(JobRuleShape::Agent),
                    5 | 6 => Some(JobRuleShape::GoAgent),
                    _ => None,
                };
                match want {
                    Some(w) => assert_eq!(shape, &w, "{what}: handle {handle}"),
                    None => assert!(
                        matches!(shape, JobRuleShape::Foreign(_)),
                        "{what}: handle {handle} must be foreign: {shape:?}"
                    ),
                }
            }
        }
        let why = |h: u64| match shapes(JOBS_INODES, Some(1000))
            .into_iter()
            .find(|(x, _)| *x == h)
            .unwrap()
            .1
        {
            JobRuleShape::Foreign(w) => w,
            other => panic!("handle {h}: {other:?}"),
        };
        assert!(why(7).contains("every process"), "{}", why(7));
        assert!(why(8).contains("counter"), "{}", why(8));
        assert!(why(9).contains("22"), "{}", why(9));
        assert!(why(11).contains("cgid=3711"), "{}", why(11));
        assert!(why(12).contains("uid 0"), "{}", why(12));
    }

    #[test]
    fn uid_rules_pass_only_for_the_vcap_uid() {
        let got = shapes(JOBS_INODES, Some(2000));
        for h in [4, 6] {
            assert!(
                matches!(
                    got.iter().find(|(x, _)| *x == h).unwrap().1,
                    JobRuleShape::Foreign(_)
                ),
                "handle {h} with another vcap uid"
            );
        }
        let got = shapes(JOBS_INODES, None);
        assert!(matches!(got[1].1, JobRuleShape::Foreign(_)), "no vcap user");
        // Cgroup rules do not depend on the vcap user.
        assert_eq!(got[0].1, JobRuleShape::Agent);
        assert_eq!(got[2].1, JobRuleShape::GoAgent);
    }

    #[test]
    fn foreign_rules_are_listed_with_handles() {
        let v: Value = serde_json::from_str(JOBS_INODES).unwrap();
        let f = foreign_job_rules(&v, Some(1000)).unwrap();
        let handles: Vec<u64> = f.iter().map(|r| r.handle).collect();
        assert_eq!(handles, vec![7, 8, 9, 10, 11, 12, 13, 14]);
        assert_eq!(
            f[3].comment.as_deref(),
            Some("bosh-monit-access:system.slice/web cgid=3711")
        );
    }
}
