#![allow(clippy::unwrap_used)]
use super::*;
use crate::firewall::Comment;
use std::collections::BTreeSet;

fn cg() -> Identity {
    Identity::Cgroup {
        path: NftCgroupPath::new("unified/system.slice/bosh-agent.service").unwrap(),
        level: 2,
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

fn eps(list: &[&str]) -> BTreeSet<SocketAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn monit_only_cgroup_identity_golden() {
    let st = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats: NatsPolicy::Disabled,
    };
    golden("monit-cgroup.nft", &render_ruleset(&st));
}

#[test]
fn monit_without_root_and_uid_identity_golden() {
    let st = DesiredState {
        workload: Default::default(),
        identity: Identity::Uid {
            uid: 0,
            reason: "v1 only".into(),
        },
        monit: MonitPolicy::Enabled { allow_root: false },
        nats: NatsPolicy::Disabled,
    };
    golden("monit-uid-noroot.nft", &render_ruleset(&st));
}

#[test]
fn monit_disabled_and_nats_enabled_golden() {
    let st = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Disabled,
        nats: NatsPolicy::Enabled {
            endpoints: eps(&["10.0.0.6:4222", "10.0.0.5:4222", "[2001:db8::1]:4222"]),
        },
    };
    golden("nats-only.nft", &render_ruleset(&st));
}

#[test]
fn fresh_table_golden_only_creates() {
    let st = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats: NatsPolicy::Enabled {
            endpoints: eps(&["10.0.0.5:4222", "[2001:db8::1]:4222"]),
        },
    };
    let fresh = render_ruleset_fresh(&st);
    golden("fresh-monit-nats.nft", &fresh);
    assert!(
        fresh.starts_with("create table inet bosh_agent\n"),
        "{fresh}"
    );
    for word in ["delete", "flush"] {
        assert!(
            !fresh.contains(word),
            "a fresh table has nothing to {word}: {fresh}"
        );
    }
    // The same rules as the idempotent script, in the same order: only the emptying differs.
    let rules = |script: &str| -> Vec<String> {
        script
            .lines()
            .filter(|l| l.starts_with("add rule") || l.starts_with("add element"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(rules(&fresh), rules(&render_ruleset(&st)));
    // Disabled policies create nothing at all in a fresh table.
    let none = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Disabled,
        nats: NatsPolicy::Disabled,
    };
    assert_eq!(
        render_ruleset_fresh(&none),
        "create table inet bosh_agent\nadd chain inet bosh_agent monit_access_jobs\n"
    );
}

#[test]
fn rendering_is_deterministic_and_order_independent() {
    let a = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats: NatsPolicy::Enabled {
            endpoints: eps(&["10.0.0.6:4222", "10.0.0.5:4222"]),
        },
    };
    let b = DesiredState {
        workload: Default::default(),
        nats: NatsPolicy::Enabled {
            endpoints: eps(&["10.0.0.5:4222", "10.0.0.6:4222"]),
        },
        ..a.clone()
    };
    assert_eq!(render_ruleset(&a), render_ruleset(&b));
    assert_eq!(render_ruleset(&a), render_ruleset(&a.clone()));
}

#[test]
fn every_accept_marks_and_no_rule_uses_conntrack() {
    let st = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats: NatsPolicy::Enabled {
            endpoints: eps(&["10.0.0.5:4222"]),
        },
    };
    let s = render_ruleset(&st);
    for line in s
        .lines()
        .filter(|l| l.contains(" accept") && l.starts_with("add rule"))
    {
        assert!(
            line.contains("meta mark set 0xb054 accept"),
            "unmarked accept: {line}"
        );
    }
    assert!(!s.contains(" ct "), "conntrack must stay off: {s}");
    // The job chain is created but never flushed or deleted.
    assert!(s.contains("add chain inet bosh_agent monit_access_jobs\n"));
    assert!(!s.contains("flush chain inet bosh_agent monit_access_jobs"));
    assert!(!s.contains("delete chain inet bosh_agent monit_access_jobs"));
}

#[test]
fn rebuilt_chains_are_deleted_and_recreated_in_the_same_script() {
    let st = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Enabled { allow_root: true },
        nats: NatsPolicy::Disabled,
    };
    let s = render_ruleset(&st);
    let del = s
        .find("delete chain inet bosh_agent monit_access\n")
        .unwrap();
    let add = s.find("add chain inet bosh_agent monit_access {").unwrap();
    assert!(del < add);
}

#[test]
fn a_thousand_endpoints_render_in_chunks_of_one_script() {
    let endpoints: BTreeSet<SocketAddr> = (0..1024u32)
        .map(|i| SocketAddr::from(([10, 1, (i / 256) as u8, (i % 256) as u8], 4222)))
        .collect();
    let st = DesiredState {
        workload: Default::default(),
        identity: cg(),
        monit: MonitPolicy::Disabled,
        nats: NatsPolicy::Enabled { endpoints },
    };
    let s = render_ruleset(&st);
    assert_eq!(s.matches("add element inet bosh_agent nats_v4").count(), 4);
    assert_eq!(s.matches(" . 4222").count(), 1024);
}

#[test]
fn job_rules_render_with_identity_mark_and_comment() {
    let rule = JobRule {
        identity: cg(),
        comment: Comment::new("bosh-monit-access:web cgid=12").unwrap(),
    };
    assert_eq!(
        render_job_rule(&rule),
        "add rule inet bosh_agent monit_access_jobs socket cgroupv2 level 2 \"unified/system.slice/bosh-agent.service\" meta mark set 0xb054 accept comment \"bosh-monit-access:web cgid=12\"\n"
    );
    assert_eq!(
        render_delete_job_rule(7),
        "delete rule inet bosh_agent monit_access_jobs handle 7\n"
    );
}

#[test]
fn selftest_gives_each_level_its_port_and_resets_the_rest() {
    let p = NftCgroupPath::new("unified/a/b").unwrap();
    let s = render_selftest(&p, &[(2, 4444), (5, 4445)], true);
    assert_eq!(
        s,
        "add table inet bosh_agent\n\
         add chain inet bosh_agent selftest { type filter hook output priority filter - 1; policy accept; }\n\
         add rule inet bosh_agent selftest tcp dport 4444 ip daddr 127.0.0.1 socket cgroupv2 level 2 \"unified/a/b\" accept comment \"level=2\"\n\
         add rule inet bosh_agent selftest tcp dport 4445 ip daddr 127.0.0.1 socket cgroupv2 level 5 \"unified/a/b\" accept comment \"level=5\"\n\
         add rule inet bosh_agent selftest tcp dport { 4444, 4445 } ip daddr 127.0.0.1 reject with tcp reset\n"
    );
    assert!(
        !s.contains("delete"),
        "a fresh namespace has nothing to delete"
    );
    let in_place = render_selftest(&p, &[(2, 4444)], false);
    assert!(
        in_place.contains(
            "flush chain inet bosh_agent selftest\ndelete chain inet bosh_agent selftest\n"
        ),
        "in place, a leftover chain is reset first: {in_place}"
    );
}

#[test]
fn comments_reject_injection() {
    for bad in ["a\" drop", "a\nb", "a;b", "a{b", &"x".repeat(129)] {
        assert!(Comment::new(bad).is_err(), "{bad:?}");
    }
    assert!(Comment::new("bosh-monit-access:a/b cgid=1").is_ok());
}

#[test]
fn nats_additions_only_add_elements() {
    let eps: Vec<SocketAddr> = vec![
        "10.0.0.5:4222".parse().unwrap(),
        "[2001:db8::1]:4223".parse().unwrap(),
    ];
    assert_eq!(
        render_nats_additions(&eps),
        "add element inet bosh_agent nats_v4 { 10.0.0.5 . 4222 }\nadd element inet bosh_agent nats_v6 { 2001:db8::1 . 4223 }\n"
    );
    assert_eq!(render_nats_additions(&[]), "");
}
