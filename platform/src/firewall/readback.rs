//! Reading the live table back: a canonical snapshot of what the agent owns (to detect
//! drift) and the job rules of `monit_access_jobs`. Pure functions over nft's JSON.

use serde_json::{Map, Value, json};

use super::{FirewallError, JOB_COMMENT_PREFIX, MONIT_JOBS_CHAIN, SELFTEST_CHAIN};

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
    name == MONIT_JOBS_CHAIN || name == SELFTEST_CHAIN
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
    let rest = comment.strip_prefix(JOB_COMMENT_PREFIX)?;
    match rest.rsplit_once(" cgid=") {
        Some((key, id)) => Some((key.to_string(), id.parse().ok())),
        None => Some((rest.to_string(), None)),
    }
}

/// The rules of `monit_access_jobs` in a chain (or table) listing, in chain order.
pub fn job_rules(listing: &Value) -> Result<Vec<LiveJobRule>, FirewallError> {
    let mut out = Vec::new();
    for obj in objects(listing)? {
        let Some(r) = obj.get("rule") else { continue };
        if str_field(r, "chain") != MONIT_JOBS_CHAIN {
            continue;
        }
        let handle =
            r.get("handle")
                .and_then(Value::as_u64)
                .ok_or_else(|| FirewallError::Parse {
                    context: format!("rule of {MONIT_JOBS_CHAIN}"),
                    detail: "rule without a handle".into(),
                })?;
        let comment = r.get("comment").and_then(Value::as_str).map(str::to_string);
        let (key, cgid) = comment
            .as_deref()
            .and_then(parse_job_comment)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
