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

/// A canonical, handle-free view of the agent-owned part of the table: base chain hooks, rule
/// expressions in order, set types and sorted elements. Job rules and the transient self-test
/// chain are excluded (jobs own them). Equal live state gives an equal value.
pub fn snapshot(listing: &Value) -> Result<Value, FirewallError> {
    let mut chains = Map::new();
    let mut sets = Map::new();
    for obj in objects(listing)? {
        if let Some(c) = obj.get("chain") {
            let name = str_field(c, "name");
            if skip_chain(name) {
                continue;
            }
            let base = c.get("hook").map(|_| {
                json!({"type": c.get("type"), "hook": c.get("hook"), "prio": c.get("prio"), "policy": c.get("policy")})
            });
            chains.insert(name.to_string(), json!({"base": base, "rules": []}));
        } else if let Some(r) = obj.get("rule") {
            let chain = str_field(r, "chain");
            if skip_chain(chain) {
                continue;
            }
            let rule = json!({"expr": r.get("expr"), "comment": r.get("comment")});
            if let Some(rules) = chains
                .get_mut(chain)
                .and_then(|c| c.get_mut("rules"))
                .and_then(Value::as_array_mut)
            {
                rules.push(rule);
            }
        } else if let Some(s) = obj.get("set") {
            let mut elems: Vec<String> = s
                .get("elem")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(Value::to_string).collect())
                .unwrap_or_default();
            elems.sort();
            sets.insert(
                str_field(s, "name").to_string(),
                json!({"type": s.get("type"), "elem": elems}),
            );
        }
    }
    Ok(json!({"chains": chains, "sets": sets}))
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

    #[test]
    fn snapshot_ignores_handles_job_rules_and_element_order() {
        let a: Value = serde_json::from_str(LISTING).unwrap();
        let swapped = LISTING
            .replace(
                r#"{"concat": ["127.0.0.1", 4222]}, {"concat": ["10.0.0.5", 4222]}"#,
                r#"{"concat": ["10.0.0.5", 4222]}, {"concat": ["127.0.0.1", 4222]}"#,
            )
            .replace("\"handle\": 15", "\"handle\": 99")
            .replace("cgid=77", "cgid=1");
        let b: Value = serde_json::from_str(&swapped).unwrap();
        assert_eq!(snapshot(&a).unwrap(), snapshot(&b).unwrap());
        let s = snapshot(&a).unwrap();
        assert!(s["chains"].get("monit_access_jobs").is_none());
        assert_eq!(s["chains"]["monit_access"]["base"]["prio"], json!(-1));
        assert_eq!(
            s["chains"]["monit_guard"]["rules"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn snapshot_sees_a_changed_rule() {
        let a: Value = serde_json::from_str(LISTING).unwrap();
        let b: Value =
            serde_json::from_str(&LISTING.replace("unified/exp/agent", "unified/other")).unwrap();
        assert_ne!(snapshot(&a).unwrap(), snapshot(&b).unwrap());
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
        assert!(snapshot(&json!({"x": 1})).is_err());
        assert!(
            job_rules(&json!({"nftables": [{"rule": {"chain": "monit_access_jobs"}}]})).is_err()
        );
    }
}
