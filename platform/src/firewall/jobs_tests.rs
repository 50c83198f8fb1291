#![allow(clippy::unwrap_used)]
use super::*;
use crate::cgroup::{Layout, NftCgroupPath};

fn live(handle: u64, key: &str, cgid: Option<u64>, cgroup: Option<&str>) -> LiveJobRule {
    LiveJobRule {
        handle,
        comment: Some(format!("bosh-monit-access:{key}")),
        key: Some(key.into()),
        cgid,
        cgroup: cgroup.map(str::to_string),
        uid: None,
    }
}

/// Plans with no known ancestors and every other cgroup gone.
fn plan(live: &[LiveJobRule], key: &str, cgid: Option<u64>) -> Plan {
    plan_allow(live, key, cgid, &Default::default(), &mut |_| false)
}

#[test]
fn a_live_cgroup_of_the_same_key_keeps_its_rule() {
    // Same-named bpm scopes in two slices: both live, both keep access.
    let rules = [live(4, "web", Some(8), None)];
    let p = plan_allow(&rules, "web", Some(9), &Default::default(), &mut |id| {
        id == 8
    });
    assert_eq!(
        p,
        Plan {
            delete: vec![],
            add: true,
            covered_by: None
        }
    );
    // Once 8 is gone, its rule is replaced.
    let p = plan_allow(&rules, "web", Some(9), &Default::default(), &mut |id| {
        id == 9
    });
    assert_eq!(p.delete, vec![4]);
}

#[test]
fn an_ancestors_rule_covers_a_child_and_is_not_cut_off() {
    // A process in a child cgroup of an allowed runc-bpm-web.scope calls firewall-allow: the
    // parent's rule already matches it; the parent keeps its rule and nothing is added.
    let rules = [live(4, "web", Some(8), None), live(5, "db", Some(2), None)];
    let ancestors: std::collections::HashSet<u64> = [1, 8].into_iter().collect();
    let mut asked = Vec::new();
    let p = plan_allow(&rules, "web", Some(9), &ancestors, &mut |id| {
        asked.push(id);
        true
    });
    assert_eq!(
        p,
        Plan {
            delete: vec![],
            add: false,
            covered_by: Some(4)
        }
    );
    // An ancestor's rule of another key covers too.
    let rules = [live(6, "unified/jobs", Some(8), None)];
    assert_eq!(
        plan_allow(&rules, "unified/jobs/web", Some(9), &ancestors, &mut |_| {
            true
        })
        .covered_by,
        Some(6)
    );
    // A parent calling after its child was allowed gets its own rule; the child keeps its.
    let rules = [live(7, "web", Some(9), None)];
    assert_eq!(
        plan_allow(
            &rules,
            "web",
            Some(8),
            &[1].into_iter().collect(),
            &mut |_| true
        ),
        Plan {
            delete: vec![],
            add: true,
            covered_by: None
        }
    );
}

#[test]
fn first_allow_adds() {
    assert_eq!(
        plan(&[live(1, "other", Some(3), None)], "web", Some(9)),
        Plan {
            delete: vec![],
            add: true,
            covered_by: None
        }
    );
}

#[test]
fn repeat_allow_changes_nothing() {
    assert_eq!(
        plan(&[live(4, "web", Some(9), None)], "web", Some(9)),
        Plan {
            delete: vec![],
            add: false,
            covered_by: None
        }
    );
}

#[test]
fn recreated_cgroup_replaces_the_stale_rule() {
    let rules = [live(4, "web", Some(8), None), live(5, "db", Some(2), None)];
    assert_eq!(
        plan(&rules, "web", Some(9)),
        Plan {
            delete: vec![4],
            add: true,
            covered_by: None
        }
    );
}

#[test]
fn duplicates_are_collapsed_to_one() {
    let rules = [
        live(4, "web", Some(9), None),
        live(6, "web", Some(9), None),
        live(7, "web", None, None),
    ];
    assert_eq!(
        plan(&rules, "web", Some(9)),
        Plan {
            delete: vec![6, 7],
            add: false,
            covered_by: None
        }
    );
}

#[test]
fn upstream_rule_without_cgid_is_replaced() {
    assert_eq!(
        plan(&[live(3, "web", None, None)], "web", Some(9)),
        Plan {
            delete: vec![3],
            add: true,
            covered_by: None
        }
    );
}

#[test]
fn job_key_prefers_bpm_job_names() {
    assert_eq!(job_key("unified/system.slice/runc-bpm-web.scope"), "web");
    assert_eq!(job_key("unified/jobs/web"), "unified/jobs/web");
    let long = format!("unified/{}", "a/".repeat(60));
    let k = job_key(long.trim_end_matches('/'));
    assert!(job_comment(&k, Some(u64::MAX)).is_ok(), "{k}");
    assert_ne!(
        job_key(&format!("{}x", "b/".repeat(60))),
        job_key(&format!("{}y", "b/".repeat(60)))
    );
}

#[test]
fn a_long_bpm_job_name_is_hashed_to_fit_and_stays_recognisable() {
    let job = format!("{}-worker", "j".repeat(150));
    let k = job_key(&format!("unified/system.slice/runc-bpm-{job}.scope"));
    assert!(job_comment(&k, Some(u64::MAX)).is_ok(), "{k}");
    assert!(k.ends_with("-worker"), "{k}");
    assert!(
        !k.contains('/'),
        "the key is the job's, not the path's: {k}"
    );
    // Stable, and distinct for names that differ only where the cut dropped them.
    assert_eq!(
        k,
        job_key(&format!("unified/other.slice/runc-bpm-{job}.scope"))
    );
    let other = format!("x{}-worker", "j".repeat(149));
    assert_ne!(
        k,
        job_key(&format!("unified/system.slice/runc-bpm-{other}.scope"))
    );
    // A name that fits is kept as it is.
    let fits = "w".repeat(84);
    assert_eq!(job_key(&format!("a/runc-bpm-{fits}.scope")), fits);
}

/// Found by the `render` fuzz target: a key that just fits a monit comment did not fit the
/// longer metadata prefix, so `firewall-allow metadata` failed for such a job.
#[test]
fn every_job_key_fits_a_metadata_comment_too() {
    for n in [1, 81, 82, 84, 85, 150, 400] {
        for path in [
            format!("unified/system.slice/runc-bpm-{}.scope", "m".repeat(n)),
            format!("unified/{}", "x".repeat(n)),
        ] {
            let key = job_key(&path);
            let meta = metadata_key(&key);
            for cgid in [None, Some(u64::MAX)] {
                assert!(job_comment(&key, cgid).is_ok(), "{path}");
                assert!(metadata_comment(&meta, cgid).is_ok(), "{path}: {meta}");
            }
            // Stable, and the key itself wherever it fits.
            assert_eq!(meta, metadata_key(&key));
            if key.len() <= 81 {
                assert_eq!(meta, key);
            }
        }
    }
    // Distinct keys stay distinct.
    let a = metadata_key(&job_key(&format!("unified/{}a", "x".repeat(83))));
    let b = metadata_key(&job_key(&format!("unified/{}b", "x".repeat(83))));
    assert_ne!(a, b);
}

#[test]
fn stale_rules_are_those_whose_inode_is_gone() {
    let rules = [
        live(1, "a", Some(10), Some("10")),        // alive
        live(2, "b", Some(11), Some("11")),        // gone
        live(3, "c", Some(12), Some("unified/c")), // gone (listing printed a path: no matter)
        live(4, "d", None, Some("77")),            // not ours: never pruned
    ];
    let existing: std::collections::HashSet<u64> = [10, 77, 1].into_iter().collect();
    assert_eq!(stale_rules(&rules, &existing), vec![2, 3]);
}

fn placement(visible_level: u32) -> CgroupPlacement {
    CgroupPlacement {
        layout: Layout::Hybrid,
        namespaced: false,
        visible: "/jobs/web".into(),
        nft_path: NftCgroupPath::new("unified/jobs/web").unwrap(),
        inode: 42,
        visible_level,
        mount_level: visible_level,
    }
}

#[test]
fn caller_rule_uses_level_plus_the_agents_offset() {
    let st = RuntimeState {
        mode: crate::firewall::state::Mode::Cgroup,
        level_offset: 3,
        ..Default::default()
    };
    let (rule, key, cgid) = caller_rule(Ok(placement(2)), Some(&st), None).unwrap();
    assert_eq!(
        rule.identity,
        Identity::Cgroup {
            path: NftCgroupPath::new("unified/jobs/web").unwrap(),
            level: 5
        }
    );
    assert_eq!(key, "unified/jobs/web");
    assert_eq!(cgid, Some(42));
    assert_eq!(
        rule.comment.as_str(),
        "bosh-monit-access:unified/jobs/web cgid=42"
    );
}

#[test]
fn root_cgroup_is_refused() {
    let err = caller_rule(Ok(placement(0)), None, Some(1000)).unwrap_err();
    assert!(err.to_string().contains("root cgroup"), "{err}");
}

#[test]
fn uid_fallback_needs_a_vcap_user() {
    let v1 = Err(crate::cgroup::CgroupError::NoCgroup2(Layout::V1Only));
    let (rule, key, _) = caller_rule(v1, None, Some(1000)).unwrap();
    assert!(matches!(rule.identity, Identity::Uid { uid: 1000, .. }));
    assert_eq!(key, "uid=1000");
    let v1 = Err(crate::cgroup::CgroupError::NoCgroup2(Layout::V1Only));
    assert!(matches!(
        caller_rule(v1, None, None),
        Err(FirewallError::NoIdentity(_))
    ));
    let st = RuntimeState {
        mode: crate::firewall::state::Mode::Uid,
        fallback_reason: Some("x".into()),
        ..Default::default()
    };
    assert!(matches!(
        caller_rule(Ok(placement(2)), Some(&st), Some(7))
            .unwrap()
            .0
            .identity,
        Identity::Uid { uid: 7, .. }
    ));
}

#[test]
fn an_unsafe_path_is_an_error_not_a_fallback() {
    let bad = Err(crate::cgroup::CgroupError::InvalidPath {
        path: "a\"b".into(),
        reason: "x",
    });
    assert!(matches!(
        caller_rule(bad, None, Some(1000)),
        Err(FirewallError::Cgroup(_))
    ));
}
