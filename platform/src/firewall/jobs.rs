//! `firewall-allow monit`: allowing a job's cgroup to reach monit, idempotently, and pruning
//! rules whose cgroup is gone. Planning is pure; the change is one transaction taken under the
//! firewall lock, so concurrent callers never duplicate or lose a rule.

use std::collections::HashSet;
use std::path::Path;

use super::netlink;
use super::nft::{FirewallLock, LockWait, Nft};
use super::readback::{
    self, ForeignJobRule, LiveJobRule, job_rules, job_rules_in, parse_job_comment,
    parse_job_comment_with,
};
use super::render::{
    render_delete_job_rule, render_delete_metadata_job_rule, render_job_rule,
    render_metadata_job_rule,
};
use super::state::RuntimeState;
use super::table::KernelTable;
use super::{
    Comment, EGRESS_JOBS_CHAIN, FirewallError, Identity, JOB_COMMENT_PREFIX, JobRule,
    MAX_COMMENT_LEN, METADATA_COMMENT_PREFIX, MONIT_JOBS_CHAIN,
};
use crate::cgroup::{self, CgroupPlacement};

/// What `firewall-allow monit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowOutcome {
    /// A rule was added (and `replaced` stale rules of the same job deleted with it).
    Added { rule: String, replaced: usize },
    /// A rule for exactly this cgroup was already there; `duplicates` extra copies were removed.
    AlreadyAllowed { rule: String, duplicates: usize },
    /// The rule of an ancestor cgroup (its comment given) already covers the caller: a
    /// `socket cgroupv2` match at the ancestor's level matches every descendant.
    CoveredByAncestor { comment: String },
    /// There is no monit firewall (table or chain absent): nothing to open.
    NotInstalled,
}

/// The change to make in `monit_access_jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Handles of rules to delete.
    pub delete: Vec<u64>,
    /// Whether to add the caller's rule.
    pub add: bool,
    /// The handle of an ancestor's rule that already covers the caller (then `add` is false).
    pub covered_by: Option<u64>,
}

/// The key identifying a job's rule across calls: upstream's job name for bpm cgroups
/// (`runc-bpm-<job>.scope`, so rules added by the Go agent are replaced), else the cgroup path.
/// Either is shortened with a stable hash of the whole and its recognisable tail when it would
/// not fit a comment, so every caller gets a rule whatever its name's length.
pub fn job_key(nft_path: &str) -> String {
    let name = nft_path
        .rsplit('/')
        .find_map(|c| {
            c.strip_prefix("runc-bpm-")
                .and_then(|j| j.strip_suffix(".scope"))
        })
        .filter(|j| !j.is_empty())
        .unwrap_or(nft_path);
    shorten(name, room_after(JOB_COMMENT_PREFIX))
}

/// The key of a `firewall-allow metadata` rule, from the caller's [`job_key`]: the same key
/// where it fits, else shortened the same way. Its prefix is longer than the monit one's, so
/// a key that just fits a monit comment would not fit a metadata comment; monit keys stay as
/// they were, so rules written by earlier agents are still recognised.
pub fn metadata_key(job_key: &str) -> String {
    shorten(job_key, room_after(METADATA_COMMENT_PREFIX))
}

/// Room for a key in a comment with `prefix`, " cgid=" and 20 digits.
fn room_after(prefix: &str) -> usize {
    MAX_COMMENT_LEN - prefix.len() - 6 - 20
}

/// `name` where it fits `room`, else a stable hash of the whole and its recognisable tail.
fn shorten(name: &str, room: usize) -> String {
    if name.len() <= room {
        name.to_string()
    } else {
        // Paths and job names are ASCII (checked by NftCgroupPath), so any cut is a boundary.
        let tail = &name[name.len() - (room - 18)..];
        format!(
            "{:016x}:{}",
            fnv1a(name.as_bytes()),
            tail.trim_start_matches('/')
        )
    }
}

/// FNV-1a 64: stable across Rust versions (std's hasher is not promised to be).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The comment of a job rule.
pub fn job_comment(key: &str, cgid: Option<u64>) -> Result<Comment, super::UnsafeValue> {
    match cgid {
        Some(id) => Comment::new(&format!("{JOB_COMMENT_PREFIX}{key} cgid={id}")),
        None => Comment::new(&format!("{JOB_COMMENT_PREFIX}{key}")),
    }
}

/// Plans the change for a caller with `key` and `cgid` (None for uid rules). Pure but for
/// `exists`, asked only about other rules of the same key.
///
/// `ancestors` are the cgroup ids of the caller's ancestors; `exists` says whether a cgroup id
/// still exists. Guarantees:
/// - a rule for the caller's cgroup, or for an ancestor (which covers the caller), is kept
///   and nothing is added; extra copies of the caller's own rule are removed;
/// - a rule of the same key for another cgroup is replaced only when that cgroup is gone: two
///   live cgroups (a child and its parent, same-named bpm scopes in two slices) never take
///   each other's access;
/// - a same-key rule without a recorded cgroup id (upstream's Go agent wrote those) is
///   replaced by the caller's, as before: it cannot be proved alive and is that job's
///   previous rule;
/// - rules of other keys are never touched.
pub fn plan_allow(
    live: &[LiveJobRule],
    key: &str,
    cgid: Option<u64>,
    ancestors: &HashSet<u64>,
    exists: &mut dyn FnMut(u64) -> bool,
) -> Plan {
    let same: Vec<&LiveJobRule> = live
        .iter()
        .filter(|r| r.key.as_deref() == Some(key))
        .collect();
    // Same-key rules that are not the caller's and may go: no recorded cgroup id, or a
    // cgroup that no longer exists.
    let mut replaceable = |r: &LiveJobRule| match (cgid, r.cgid) {
        _ if r.cgid == cgid => false,
        // A uid rule of the same key (the same uid) is the caller's.
        (None, _) | (Some(_), None) => true,
        (Some(_), Some(other)) => !exists(other),
    };
    let own: Vec<&&LiveJobRule> = same.iter().filter(|r| r.cgid == cgid).collect();
    if !own.is_empty() {
        let mut delete: Vec<u64> = own.iter().skip(1).map(|r| r.handle).collect();
        delete.extend(same.iter().filter(|r| replaceable(r)).map(|r| r.handle));
        delete.sort_unstable();
        return Plan {
            delete,
            add: false,
            covered_by: None,
        };
    }
    let covering = cgid.and_then(|_| {
        live.iter()
            .find(|r| r.key.is_some() && r.cgid.is_some_and(|id| ancestors.contains(&id)))
    });
    if let Some(r) = covering {
        return Plan {
            delete: Vec::new(),
            add: false,
            covered_by: Some(r.handle),
        };
    }
    let delete = same
        .iter()
        .filter(|r| replaceable(r))
        .map(|r| r.handle)
        .collect();
    Plan {
        delete,
        add: true,
        covered_by: None,
    }
}

/// Inodes of the cgroup directories above `path` (relative to the cgroup root nft sees),
/// the caller's ancestors. One that cannot be read is left out: the caller then gets its own
/// rule, which is always safe.
pub fn ancestor_inodes(path: &str) -> HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let root = Path::new(cgroup::NFT_CGROUP_ROOT);
    let mut out = HashSet::new();
    let mut dir = Path::new(path).parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(m) = std::fs::metadata(root.join(d)) {
            out.insert(m.ino());
        }
        dir = d.parent();
    }
    out
}

/// Rules whose cgroup no longer exists (pruned by the agent when it reconciles): rules in
/// the agent's comment format whose recorded cgroup inode is not among `existing` (the
/// inodes of every directory of the cgroup2 hierarchy). Rules the agent cannot prove stale
/// (no `cgid`, e.g. upstream's) are never returned. Pure.
pub fn stale_rules(live: &[LiveJobRule], existing: &HashSet<u64>) -> Vec<u64> {
    live.iter()
        .filter(|r| r.cgid.is_some_and(|id| !existing.contains(&id)))
        .map(|r| r.handle)
        .collect()
}

/// The job's identity: its cgroup (level = visible depth + the agent's offset), or the uid
/// fallback when the agent found cgroup matching unusable here.
pub fn caller_rule(
    placement: Result<CgroupPlacement, cgroup::CgroupError>,
    agent: Option<&RuntimeState>,
    fallback_uid: Option<u32>,
) -> Result<(JobRule, String, Option<u64>), FirewallError> {
    let uid_rule = |why: String| -> Result<(JobRule, String, Option<u64>), FirewallError> {
        let uid = fallback_uid.ok_or_else(|| {
            FirewallError::NoIdentity(format!(
                "{why}; and there is no vcap user for the uid fallback"
            ))
        })?;
        let key = format!("uid={uid}");
        let comment = job_comment(&key, None)?;
        Ok((
            JobRule {
                identity: Identity::Uid { uid, reason: why },
                comment,
            },
            key,
            None,
        ))
    };
    if let Some(st) = agent.filter(|s| s.mode == super::state::Mode::Uid) {
        return uid_rule(format!(
            "the agent uses the uid fallback ({})",
            st.fallback_reason.as_deref().unwrap_or("reason unknown")
        ));
    }
    let p = match placement {
        Ok(p) => p,
        // Only a host without cgroup2 earns the fallback; any other failure (a path nft
        // cannot express, an unreadable proc file) is an error the caller must see.
        Err(e @ cgroup::CgroupError::NoCgroup2(_)) => {
            return uid_rule(format!("cgroup undetectable: {e}"));
        }
        Err(e) => return Err(e.into()),
    };
    if p.visible_level == 0 {
        return Err(FirewallError::NoIdentity(
            "the caller runs in the root cgroup: allowing it would allow every process".into(),
        ));
    }
    let offset = agent.map_or(0, |s| s.level_offset);
    let level = u32::try_from(i64::from(p.visible_level) + offset).map_err(|_| {
        FirewallError::NoIdentity(format!(
            "level offset {offset} does not fit the caller's depth"
        ))
    })?;
    let key = job_key(p.nft_path.as_str());
    let comment = job_comment(&key, Some(p.inode))?;
    Ok((
        JobRule {
            identity: Identity::Cgroup {
                path: p.nft_path,
                level,
            },
            comment,
        },
        key,
        Some(p.inode),
    ))
}

/// One chain of job rules: how its rules are listed, added and deleted.
struct JobsChain {
    list: fn(&Nft) -> Result<Option<Vec<LiveJobRule>>, FirewallError>,
    add: fn(&JobRule) -> String,
    delete: fn(u64) -> String,
}

/// `monit_access_jobs` (`firewall-allow monit`).
const MONIT_JOBS: JobsChain = JobsChain {
    list: live_job_rules,
    add: render_job_rule,
    delete: render_delete_job_rule,
};

/// `egress_access_jobs` (`firewall-allow metadata`).
const METADATA_JOBS: JobsChain = JobsChain {
    list: live_metadata_rules,
    add: render_metadata_job_rule,
    delete: render_delete_metadata_job_rule,
};

/// Allows `rule` in `chain` under the firewall lock in `run_dir`, with the guarantees of
/// [`plan_allow`]. Where there is no such chain, answers [`AllowOutcome::NotInstalled`] even
/// when the lock cannot be taken (a read-only or missing run dir): with no firewall there is
/// nothing to open, and no lock is needed to say so.
fn allow_in(
    nft: &Nft,
    run_dir: &Path,
    rule: &JobRule,
    key: &str,
    cgid: Option<u64>,
    chain: &JobsChain,
) -> Result<AllowOutcome, FirewallError> {
    let _lock = match FirewallLock::acquire(run_dir) {
        Ok(lock) => lock,
        // The lock only serialises changes; the answer "nothing to open" does not change
        // anything, so a lock failure matters only when there is a chain to change.
        Err(e) => {
            return match (chain.list)(nft)? {
                None => Ok(AllowOutcome::NotInstalled),
                Some(_) => Err(e),
            };
        }
    };
    let Some(live) = (chain.list)(nft)? else {
        return Ok(AllowOutcome::NotInstalled);
    };
    let ancestors = match &rule.identity {
        Identity::Cgroup { path, .. } => ancestor_inodes(path.as_str()),
        Identity::Uid { .. } => HashSet::new(),
    };
    // The hierarchy is walked only if a same-key rule for another cgroup must be judged.
    let mut existing: Option<HashSet<u64>> = None;
    let mut walk_error = None;
    let mut exists = |id: u64| {
        let set = existing.get_or_insert_with(|| {
            cgroup::hierarchy_inodes().unwrap_or_else(|e| {
                walk_error = Some(e);
                HashSet::new()
            })
        });
        // Unknown means alive: a rule is never taken away on a guess.
        walk_error.is_some() || set.contains(&id)
    };
    let plan = plan_allow(&live, key, cgid, &ancestors, &mut exists);
    if let Some(handle) = plan.covered_by {
        let comment = live
            .iter()
            .find(|r| r.handle == handle)
            .and_then(|r| r.comment.clone())
            .unwrap_or_default();
        return Ok(AllowOutcome::CoveredByAncestor { comment });
    }
    let mut script: String = plan.delete.iter().map(|h| (chain.delete)(*h)).collect();
    let text = (chain.add)(rule);
    if plan.add {
        script.push_str(&text);
    }
    if !script.is_empty() {
        nft.apply(&script)?;
    }
    let rule = text.trim_end().to_string();
    Ok(if plan.add {
        AllowOutcome::Added {
            rule,
            replaced: plan.delete.len(),
        }
    } else {
        AllowOutcome::AlreadyAllowed {
            rule,
            duplicates: plan.delete.len(),
        }
    })
}

/// Allows the caller's identity to reach monit. Changes are made under the firewall lock in
/// `run_dir`. Where there is no jobs chain, answers [`AllowOutcome::NotInstalled`] even when
/// the lock cannot be taken (a read-only or missing run dir): with no firewall there is
/// nothing to open, and no lock is needed to say so.
pub fn allow_monit(
    nft: &Nft,
    run_dir: &Path,
    rule: &JobRule,
    key: &str,
    cgid: Option<u64>,
) -> Result<AllowOutcome, FirewallError> {
    allow_in(nft, run_dir, rule, key, cgid, &MONIT_JOBS)
}

/// The rules of `monit_access_jobs` (`None` when the chain or table is absent), read over
/// netlink in-process (handles and comments: all that planning needs), or from `nft`'s JSON
/// listing where netlink cannot answer.
fn live_job_rules(nft: &Nft) -> Result<Option<Vec<LiveJobRule>>, FirewallError> {
    match netlink::chain_rules(super::TABLE, MONIT_JOBS_CHAIN) {
        Ok(rules) => Ok(rules.map(|rules| {
            rules
                .into_iter()
                .map(|r| {
                    let (key, cgid) = r
                        .comment
                        .as_deref()
                        .and_then(parse_job_comment)
                        .map_or((None, None), |(k, c)| (Some(k), c));
                    LiveJobRule {
                        handle: r.handle,
                        comment: r.comment,
                        key,
                        cgid,
                        cgroup: None,
                        uid: None,
                    }
                })
                .collect()
        })),
        Err(e) => {
            tracing::debug!(error = %e, "netlink listing failed; asking nft");
            nft.list_chain(MONIT_JOBS_CHAIN)?
                .map(|l| job_rules(&l))
                .transpose()
        }
    }
}

/// What [`reconcile_jobs_chain`] found and did.
#[derive(Debug, Default)]
pub struct JobsChainReconciled {
    /// Job rules whose cgroup is gone, deleted.
    pub pruned: usize,
    /// Rules that are not job rules ([`readback::judge_job_rule`]): deleted, unless `failed`.
    pub foreign: Vec<ForeignJobRule>,
    /// The deletion failed (nothing was deleted: one transaction); `foreign` is still there.
    pub failed: Option<FirewallError>,
}

/// Brings `monit_access_jobs` back to job rules only, in one transaction under the lock (so
/// it never races a concurrent `firewall-allow`): deletes, by handle, the rules whose cgroup
/// is gone and every rule that is none of the job-rule shapes (an unconditional `accept`
/// there would open monit to every process). `vcap_uid` is the uid the documented uid
/// fallback matches. The chain is never flushed: job rules, the agent's and the Go agent's,
/// keep their handles. The listing is nft's JSON, which, unlike the netlink reader, gives
/// the expressions the judgement needs. The lock is waited for at most `wait.bound`.
pub fn reconcile_jobs_chain<T: KernelTable + ?Sized>(
    nft: &T,
    run_dir: &Path,
    wait: LockWait,
    vcap_uid: Option<u32>,
) -> Result<JobsChainReconciled, FirewallError> {
    let _lock = FirewallLock::acquire_within(run_dir, wait)?;
    let Some(listing) = nft.list_chain(MONIT_JOBS_CHAIN)? else {
        return Ok(JobsChainReconciled::default());
    };
    let foreign = readback::foreign_job_rules(&listing, vcap_uid)?;
    let live: Vec<LiveJobRule> = job_rules(&listing)?
        .into_iter()
        .filter(|r| !foreign.iter().any(|f| f.handle == r.handle))
        .collect();
    let stale = if live.iter().any(|r| r.cgid.is_some()) {
        stale_rules(&live, &cgroup::hierarchy_inodes()?)
    } else {
        Vec::new()
    };
    let script: String = stale
        .iter()
        .chain(foreign.iter().map(|f| &f.handle))
        .map(|h| render_delete_job_rule(*h))
        .collect();
    let mut out = JobsChainReconciled {
        pruned: stale.len(),
        foreign,
        failed: None,
    };
    if !script.is_empty()
        && let Err(e) = nft.apply(&script)
    {
        out.pruned = 0;
        out.failed = Some(e);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// `firewall-allow metadata`: the same mechanics on the egress jobs chain.

/// The comment of a `firewall-allow metadata` rule: `bosh-metadata-access:<key>[ cgid=<n>]`;
/// `key` is a [`metadata_key`] (a longer one may not fit).
pub fn metadata_comment(key: &str, cgid: Option<u64>) -> Result<Comment, super::UnsafeValue> {
    match cgid {
        Some(id) => Comment::new(&format!("{METADATA_COMMENT_PREFIX}{key} cgid={id}")),
        None => Comment::new(&format!("{METADATA_COMMENT_PREFIX}{key}")),
    }
}

/// The caller's metadata rule: the identity [`caller_rule`] found, with the metadata comment.
pub fn metadata_rule(
    monit_rule: JobRule,
    key: &str,
    cgid: Option<u64>,
) -> Result<JobRule, FirewallError> {
    Ok(JobRule {
        identity: monit_rule.identity,
        comment: metadata_comment(key, cgid)?,
    })
}

fn live_metadata_rules(nft: &Nft) -> Result<Option<Vec<LiveJobRule>>, FirewallError> {
    match netlink::chain_rules(super::TABLE, EGRESS_JOBS_CHAIN) {
        Ok(rules) => Ok(rules.map(|rules| {
            rules
                .into_iter()
                .map(|r| {
                    let (key, cgid) = r
                        .comment
                        .as_deref()
                        .and_then(|c| parse_job_comment_with(METADATA_COMMENT_PREFIX, c))
                        .map_or((None, None), |(k, c)| (Some(k), c));
                    LiveJobRule {
                        handle: r.handle,
                        comment: r.comment,
                        key,
                        cgid,
                        cgroup: None,
                        uid: None,
                    }
                })
                .collect()
        })),
        Err(e) => {
            tracing::debug!(error = %e, "netlink listing failed; asking nft");
            nft.list_chain(EGRESS_JOBS_CHAIN)?
                .map(|l| job_rules_in(&l, EGRESS_JOBS_CHAIN, METADATA_COMMENT_PREFIX))
                .transpose()
        }
    }
}

/// Allows the caller's identity through the egress deny list (`firewall-allow metadata`),
/// with the guarantees of [`plan_allow`], under the firewall lock. Answers
/// [`AllowOutcome::NotInstalled`] when there is no egress jobs chain (no deny list).
pub fn allow_metadata(
    nft: &Nft,
    run_dir: &Path,
    rule: &JobRule,
    key: &str,
    cgid: Option<u64>,
) -> Result<AllowOutcome, FirewallError> {
    allow_in(nft, run_dir, rule, key, cgid, &METADATA_JOBS)
}

/// Deletes, in one transaction under the lock, the metadata job rules whose cgroup is gone
/// (rules without a recorded cgroup id are kept). Returns how many were deleted.
pub fn prune_metadata_rules(nft: &Nft, run_dir: &Path) -> Result<usize, FirewallError> {
    let _lock = FirewallLock::acquire(run_dir)?;
    let Some(live) = live_metadata_rules(nft)? else {
        return Ok(0);
    };
    if !live.iter().any(|r| r.cgid.is_some()) {
        return Ok(0);
    }
    let stale = stale_rules(&live, &cgroup::hierarchy_inodes()?);
    let script: String = stale
        .iter()
        .map(|h| render_delete_metadata_job_rule(*h))
        .collect();
    if !script.is_empty() {
        nft.apply(&script)?;
    }
    Ok(stale.len())
}

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
