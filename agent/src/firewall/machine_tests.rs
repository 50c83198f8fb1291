//! The firewall state machine over the in-memory table: first boot, a restart with an
//! unchanged table, drift repaired, a read-back that does not conform, nft failing, and the
//! uid fallback.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use platform::cgroup::NftCgroupPath;
use platform::firewall::selftest::Established;
use platform::firewall::shape::TableShape;
use platform::firewall::table::FakeTable;
use platform::firewall::{Identity, MONIT_GUARD_CHAIN, SELFTEST_CHAIN};

use super::{Firewall, Problem};
use crate::config::LinuxOptions;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("fw-machine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn cgroup() -> Established {
    Established {
        identity: Identity::Cgroup {
            path: NftCgroupPath::new("unified/system.slice/bosh-agent.service").unwrap(),
            level: 2,
        },
        level_offset: 0,
    }
}

fn machine(table: &FakeTable, dir: &Dir, est: Established) -> Firewall<FakeTable> {
    Firewall::with_identity(&LinuxOptions::default(), table.clone(), dir.0.clone(), est)
}

/// The table the desired state renders to, for comparison with the fake's.
fn desired_shape(fw: &Firewall<FakeTable>) -> TableShape {
    TableShape::of(fw.desired()).unwrap()
}

fn rules(t: &TableShape) -> Vec<(String, Vec<String>)> {
    t.chains
        .iter()
        .map(|(n, c)| (n.clone(), c.rules.iter().map(|(_, r)| r.clone()).collect()))
        .collect()
}

#[test]
fn first_boot_creates_the_table_without_deleting_and_reads_it_back() {
    let (table, dir) = (FakeTable::new(), run_dir("first"));
    let mut fw = machine(&table, &dir, cgroup());
    assert!(fw.apply().unwrap(), "nft ran");
    let applied = table.applied();
    assert_eq!(applied.len(), 1);
    assert!(
        applied[0].starts_with("create table inet bosh_agent"),
        "{}",
        applied[0]
    );
    assert!(
        !applied[0].contains("delete "),
        "a first boot deletes nothing"
    );
    assert!(fw.state().readback_pending);
    fw.read_back_if_due().unwrap();
    assert!(!fw.state().readback_pending);
    assert_eq!(fw.state().repairs, 0);
    assert_eq!(rules(&table.shape()), rules(&desired_shape(&fw)));
    assert!(!fw.watch_health().borrow().degraded);
    // Nothing changed: a reconcile repairs nothing and applies nothing.
    assert_eq!(fw.reconcile().unwrap(), super::Reconciled::default());
    assert_eq!(table.applied().len(), 1);
}

#[test]
fn a_restart_with_an_unchanged_table_applies_nothing() {
    let (table, dir) = (FakeTable::new(), run_dir("restart"));
    let mut fw = machine(&table, &dir, cgroup());
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    let applied_at = fw.state().applied_at;
    drop(fw);
    let mut again = machine(&table, &dir, cgroup());
    assert!(!again.apply().unwrap(), "nothing to apply");
    assert_eq!(table.applied().len(), 1, "no transaction at all");
    assert_eq!(again.state().applied_at, applied_at);
    assert!(!again.state().readback_pending);
    assert_eq!(again.reconcile().unwrap(), super::Reconciled::default());
    // Another desired state (root refused) is applied, with the idempotent script.
    drop(again);
    let mut opts = LinuxOptions::default();
    opts.firewall.monit_allow_root = false;
    let mut other = Firewall::with_identity(&opts, table.clone(), dir.0.clone(), cgroup());
    assert!(other.apply().unwrap());
    assert_eq!(table.applied().len(), 2);
    assert!(
        table.applied()[1].starts_with("add table"),
        "{}",
        table.applied()[1]
    );
}

#[test]
fn drift_is_repaired_and_counted() {
    let (table, dir) = (FakeTable::new(), run_dir("drift"));
    let mut fw = machine(&table, &dir, cgroup());
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    table.tamper(|t| {
        let guard = t.chains.get_mut(MONIT_GUARD_CHAIN).unwrap();
        guard.rules.pop();
    });
    let out = fw.reconcile().unwrap();
    assert!(out.repaired);
    assert_eq!(fw.state().repairs, 1);
    assert_eq!(rules(&table.shape()), rules(&desired_shape(&fw)));
    // A deleted table is drift too.
    table.tamper(|t| *t = TableShape::default());
    assert!(fw.reconcile().unwrap().repaired);
    assert_eq!(fw.state().repairs, 2);
    assert!(table.shape().present);
    assert_eq!(fw.watch_health().borrow().repairs, 2);
}

#[test]
fn a_read_back_that_does_not_conform_is_repaired_not_adopted() {
    let (table, dir) = (FakeTable::new(), run_dir("conform"));
    let mut fw = machine(&table, &dir, cgroup());
    fw.apply().unwrap();
    // Changed between the apply and its read-back: a chain of the agent's gone.
    table.tamper(|t| {
        t.chains.get_mut(MONIT_GUARD_CHAIN).unwrap().rules.clear();
    });
    fw.read_back_if_due().unwrap();
    assert_eq!(fw.state().repairs, 1);
    assert_eq!(table.applied().len(), 2, "applied again");
    assert_eq!(rules(&table.shape()), rules(&desired_shape(&fw)));
    // The reference is now the repaired table: nothing more to repair.
    assert!(!fw.reconcile().unwrap().repaired);
}

#[test]
fn an_nft_failure_is_recorded_degraded_and_retried() {
    let (table, dir) = (FakeTable::new(), run_dir("nft"));
    let mut fw = machine(&table, &dir, cgroup());
    table.fail_applies(Some(
        "Error: Could not process rule: No such file or directory",
    ));
    let e = fw.apply().unwrap_err().to_string();
    assert!(e.contains("Could not process rule"), "{e}");
    assert!(
        fw.state()
            .last_error
            .as_deref()
            .unwrap()
            .contains("Could not process rule")
    );
    let health = fw.watch_health().borrow().clone();
    assert!(health.degraded);
    assert!(
        matches!(health.problems[..], [Problem::ChangeFailed(_)]),
        "{health:?}"
    );
    assert_eq!(health.alert(1).unwrap()["severity"], 2);
    // The state file says so too, for `firewall status`.
    let st = platform::firewall::state::read(&dir.0).unwrap().unwrap();
    assert!(st.last_error.is_some());
    assert!(!table.shape().present, "nothing half-applied");
    table.fail_applies(None);
    fw.reconcile().unwrap();
    assert_eq!(fw.state().last_error, None);
    assert!(!fw.watch_health().borrow().degraded);
    assert_eq!(rules(&table.shape()), rules(&desired_shape(&fw)));
}

#[test]
fn a_listing_that_fails_is_reported_until_one_works_and_the_drift_is_repaired() {
    let (table, dir) = (FakeTable::new(), run_dir("list"));
    let mut fw = machine(&table, &dir, cgroup());
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    assert!(!fw.watch_health().borrow().degraded);
    table.fail_listings(Some("Error: simulated listing failure"));
    // The table vanishes meanwhile: drift the agent cannot see while nft cannot list.
    table.tamper(|t| t.present = false);
    let e = fw.reconcile().unwrap_err().to_string();
    assert!(e.contains("simulated listing failure"), "{e}");
    let health = fw.watch_health().borrow().clone();
    assert!(
        matches!(&health.problems[..], [Problem::ReadBackFailed(m)] if m.contains("simulated")),
        "{health:?}"
    );
    assert_eq!(health.alert(1).unwrap()["severity"], 2, "critical");
    let st = platform::firewall::state::read(&dir.0).unwrap().unwrap();
    assert!(st.readback_error.is_some(), "the state file says so");
    // Still failing: reported, not repeated into the state file with a new value.
    assert!(fw.reconcile().is_err());
    table.fail_listings(None);
    assert!(fw.reconcile().unwrap().repaired, "the drift is repaired");
    assert_eq!(fw.state().readback_error, None);
    assert!(!fw.watch_health().borrow().degraded);
    assert_eq!(rules(&table.shape()), rules(&desired_shape(&fw)));
}

#[test]
fn the_uid_fallback_protects_and_is_reported_as_a_warning() {
    let (table, dir) = (FakeTable::new(), run_dir("uid"));
    let est = Established {
        identity: Identity::Uid {
            uid: 0,
            reason: "cgroup v1 only".into(),
        },
        level_offset: 0,
    };
    let mut fw = machine(&table, &dir, est);
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    assert_eq!(fw.state().repairs, 0, "the uid rule conforms");
    let guard = &table.shape().chains[MONIT_GUARD_CHAIN];
    assert!(
        guard
            .rules
            .iter()
            .any(|(_, r)| r.starts_with("meta skuid 0 ") && r.ends_with("comment \"bosh-agent\"")),
        "{guard:?}"
    );
    assert!(!table.shape().chains.contains_key(SELFTEST_CHAIN));
    let health = fw.watch_health().borrow().clone();
    assert!(health.degraded);
    assert_eq!(health.mode, platform::firewall::state::Mode::Uid);
    let alert = health.alert(1).unwrap();
    assert_eq!(alert["severity"], 4);
    assert!(
        alert["summary"]
            .as_str()
            .unwrap()
            .contains("cgroup v1 only")
    );
}

#[test]
fn nats_endpoints_are_added_then_the_stale_ones_removed_after_the_dial() {
    let (table, dir) = (FakeTable::new(), run_dir("nats"));
    let opts = LinuxOptions {
        enable_nats_firewall: true,
        ..LinuxOptions::default()
    };
    let mut fw = Firewall::with_identity(&opts, table.clone(), dir.0.clone(), cgroup());
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    let a: std::net::SocketAddr = "10.0.0.5:4222".parse().unwrap();
    let b: std::net::SocketAddr = "10.0.0.6:4222".parse().unwrap();
    assert!(fw.protect_nats_endpoints([a].into()).unwrap());
    assert_eq!(
        table.shape().sets["nats_v4"].elements,
        vec!["10.0.0.5 . 4222"]
    );
    fw.after_dial().unwrap();
    // Moved: b is added at once, a stays until after the dial.
    assert!(fw.protect_nats_endpoints([b].into()).unwrap());
    assert!(fw.rebuild_pending());
    assert_eq!(table.shape().sets["nats_v4"].elements.len(), 2);
    fw.after_dial().unwrap();
    assert_eq!(
        table.shape().sets["nats_v4"].elements,
        vec!["10.0.0.6 . 4222"]
    );
    assert_eq!(fw.state().repairs, 0);
    assert!(!fw.reconcile().unwrap().repaired);
}

#[tokio::test]
async fn the_task_reads_back_and_reconciles_without_anyone_sending_commands() {
    let (table, dir) = (FakeTable::new(), run_dir("task"));
    let mut fw = machine(&table, &dir, cgroup());
    fw.apply().unwrap();
    let health = fw.watch_health();
    let (mut task, handle) = super::FirewallTask::new(fw, std::time::Duration::from_millis(20));
    task.read_back_after(std::time::Duration::ZERO);
    drop(handle);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(task.run(stop.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    table.tamper(|t| {
        t.chains.get_mut(MONIT_GUARD_CHAIN).unwrap().rules.pop();
    });
    let mut health = health;
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        health.wait_for(|h| h.repairs == 1),
    )
    .await
    .expect("the drift is repaired by the task's own timer")
    .unwrap();
    stop.cancel();
    let fw = running
        .await
        .unwrap()
        .expect("the state machine comes back");
    assert!(!fw.state().readback_pending);
    assert_eq!(rules(&table.shape()), rules(&desired_shape(&fw)));
}

fn with_policies(json: &str) -> LinuxOptions {
    let c = crate::config::AgentConfig::parse(
        std::path::Path::new("/t/agent.json"),
        &format!(r#"{{"Platform":{{"Linux":{{"Firewall":{json}}}}}}}"#),
    )
    .unwrap();
    c.platform.linux
}

const EGRESS: &str = r#"{"EgressDeny":[{"Destination":"192.0.2.0/24"}],"GuardLocalhost":true}"#;

#[test]
fn absent_policy_keys_render_todays_script() {
    let fw = machine(&FakeTable::new(), &run_dir("absent"), cgroup());
    let opts = with_policies("{}");
    let w = super::machine::build_workload(&opts, &cgroup(), "").unwrap();
    assert_eq!(w, Default::default());
    let mut plain = fw.desired().clone();
    plain.workload = Default::default();
    assert_eq!(
        platform::firewall::render::render_ruleset(fw.desired()),
        platform::firewall::render::render_ruleset(&plain)
    );
    assert!(fw.state().workload.is_null());
}

#[test]
fn configured_policies_are_applied_and_shown() {
    let (table, dir) = (FakeTable::new(), run_dir("policies"));
    let mut fw = Firewall::with_identity(
        &with_policies(EGRESS),
        table.clone(),
        dir.0.clone(),
        cgroup(),
    );
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    let shape = table.shape();
    assert!(
        shape.chains.contains_key(platform::firewall::EGRESS_CHAIN),
        "{:?}",
        shape.chains.keys()
    );
    assert!(
        shape
            .chains
            .contains_key(platform::firewall::LOCALHOST_CHAIN)
    );
    assert_eq!(fw.state().workload["egress"]["deny_ranges_v4"], 1);
    assert_eq!(fw.state().workload["localhost_guard"], true);
    assert!(
        !fw.watch_health().borrow().degraded,
        "{:?}",
        fw.watch_health().borrow()
    );
    // A guarded alert listener matches monit by uid: said in the notes.
    let fw = Firewall::with_identity(
        &with_policies(r#"{"GuardAlertListener":true}"#),
        FakeTable::new(),
        dir.0.clone(),
        cgroup(),
    );
    let notes = fw.watch_health().borrow().notes.clone();
    assert!(notes.iter().any(|n| n.contains("monit")), "{notes:?}");
}

#[test]
fn removing_a_policy_removes_its_chains_at_the_next_start() {
    let (table, dir) = (FakeTable::new(), run_dir("removing"));
    let mut fw = Firewall::with_identity(
        &with_policies(EGRESS),
        table.clone(),
        dir.0.clone(),
        cgroup(),
    );
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    drop(fw);
    let mut fw = machine(&table, &dir, cgroup());
    assert!(fw.apply().unwrap());
    let shape = table.shape();
    for gone in [
        platform::firewall::EGRESS_CHAIN,
        platform::firewall::LOCALHOST_CHAIN,
    ] {
        assert!(
            !shape.chains.contains_key(gone),
            "{gone}: {:?}",
            shape.chains.keys()
        );
    }
    assert!(shape.chains.contains_key(MONIT_GUARD_CHAIN));
    // The jobs' chain stays (jobs own its rules, as monit's), and nothing jumps to it.
    let mut live = rules(&shape);
    live.retain(|(n, _)| n != platform::firewall::EGRESS_JOBS_CHAIN);
    assert_eq!(live, rules(&desired_shape(&fw)));
    fw.read_back_if_due().unwrap();
    assert_eq!(fw.reconcile().unwrap(), super::Reconciled::default());
    assert_eq!(fw.state().repairs, 0);
    assert!(!fw.watch_health().borrow().degraded);
}

#[test]
fn an_invalid_entry_is_refused_by_name_and_the_live_policies_stay() {
    let (table, dir) = (FakeTable::new(), run_dir("invalid"));
    let mut fw = Firewall::with_identity(
        &with_policies(EGRESS),
        table.clone(),
        dir.0.clone(),
        cgroup(),
    );
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    let before = rules(&table.shape());
    drop(fw);
    let bad = r#"{"EgressDeny":[{"Destination":"192.0.2.0/24"},{"Destination":"10.0.0.300/8"}]}"#;
    let mut fw =
        Firewall::with_identity(&with_policies(bad), table.clone(), dir.0.clone(), cgroup());
    let health = fw.watch_health().borrow().clone();
    assert!(health.degraded);
    let refused = health
        .problems
        .iter()
        .find_map(|p| match p {
            Problem::PolicyRefused(e) => Some(e.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        refused.contains("EgressDeny[1].Destination") && refused.contains("10.0.0.300/8"),
        "{refused}"
    );
    assert!(health.alert(1).is_some_and(|a| a["severity"] == 2));
    let applied_before = table.applied().len();
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    assert_eq!(
        rules(&table.shape()),
        before,
        "the live workload chains stay as they were"
    );
    // The kept workload objects are not drift: nothing is repaired.
    assert_eq!(fw.reconcile().unwrap(), super::Reconciled::default());
    assert_eq!(fw.state().repairs, 0);
    assert_eq!(rules(&table.shape()), before);
    for script in &table.applied()[applied_before..] {
        assert!(!script.contains("egress_output"), "{script}");
    }
    // EgressAllowCgroups naming the root cgroup is refused too.
    let fw = Firewall::with_identity(
        &with_policies(
            r#"{"EgressDeny":[{"Destination":"192.0.2.1"}],"EgressAllowCgroups":["/"]}"#,
        ),
        FakeTable::new(),
        dir.0.clone(),
        cgroup(),
    );
    assert!(
        fw.state()
            .workload_refused
            .as_deref()
            .is_some_and(|e| e.contains("EgressAllowCgroups[0]"))
    );
}

#[test]
fn an_allowed_cgroup_that_does_not_exist_refuses_the_workload_policies_naming_it() {
    let opts = with_policies(
        r#"{"EgressDeny":[{"Destination":"192.0.2.1"}],"EgressAllowCgroups":["system.slice/cpi.service","system.slice/other.service"]}"#,
    );
    let w = super::machine::build_workload(&opts, &cgroup(), "").unwrap();
    let err = super::machine::check_allowed_cgroups(&w, |p| p.as_str().ends_with("other.service"))
        .unwrap_err();
    assert!(err.contains("system.slice/cpi.service"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // Every cgroup present: accepted; no egress policy: nothing to check.
    super::machine::check_allowed_cgroups(&w, |_| true).unwrap();
    super::machine::check_allowed_cgroups(&Default::default(), |_| false).unwrap();
}

#[test]
fn allowed_cgroups_resolve_below_the_hybrid_mount_at_their_own_depth() {
    let opts = with_policies(
        r#"{"EgressDeny":[{"Destination":"192.0.2.1"}],"EgressAllowCgroups":["/system.slice/cpi.service"]}"#,
    );
    let w = super::machine::build_workload(&opts, &cgroup(), "unified").unwrap();
    let platform::firewall::policy::EgressPolicy::Enabled(e) = &w.egress else {
        panic!("egress is configured");
    };
    match &e.allowed[..] {
        [Identity::Cgroup { path, level }] => {
            assert_eq!(path.as_str(), "unified/system.slice/cpi.service");
            assert_eq!(
                path.fs_path(),
                std::path::Path::new("/sys/fs/cgroup/unified/system.slice/cpi.service")
            );
            assert_eq!(*level, 2 + u32::try_from(cgroup().level_offset).unwrap());
        }
        other => panic!("{other:?}"),
    }
}

/// A machine brought up with `config`'s policies, applied and read back.
fn running(table: &FakeTable, dir: &Dir, config: &str) -> Firewall<FakeTable> {
    let mut fw = Firewall::with_identity(
        &with_policies(config),
        table.clone(),
        dir.0.clone(),
        cgroup(),
    );
    fw.apply().unwrap();
    fw.read_back_if_due().unwrap();
    fw
}

const INGRESS: &str = r#"{"EgressDeny":[{"Destination":"192.0.2.0/24"}],"IngressAllow":[{"Protocol":"tcp","Ports":"22"},{"Protocol":"tcp","Ports":"8080"}]}"#;

#[test]
fn a_reload_applies_the_new_policies_in_one_transaction_and_removes_what_is_gone() {
    let (table, dir) = (FakeTable::new(), run_dir("reload"));
    let mut fw = running(&table, &dir, INGRESS);
    let n = table.applied().len();
    // An entry removed, a guard added.
    let fewer = r#"{"EgressDeny":[{"Destination":"192.0.2.0/24"}],"IngressAllow":[{"Protocol":"tcp","Ports":"22"}],"GuardLocalhost":true}"#;
    assert_eq!(
        fw.reload(&with_policies(fewer)).unwrap(),
        super::Reloaded::Applied
    );
    assert_eq!(table.applied().len(), n + 1, "one transaction");
    assert_eq!(rules(&table.shape()), rules(&desired_shape(&fw)));
    assert!(
        table
            .shape()
            .chains
            .contains_key(platform::firewall::LOCALHOST_CHAIN)
    );
    assert_eq!(fw.state().reloads, 1);
    assert_eq!(fw.state().reload_error, None);
    assert_eq!(fw.state().workload["localhost_guard"], true);
    let st = platform::firewall::state::read(&dir.0).unwrap().unwrap();
    assert_eq!((st.reloads, st.reload_error), (1, None));
    // The same policies again: nothing to commit, still an outcome.
    assert_eq!(
        fw.reload(&with_policies(fewer)).unwrap(),
        super::Reloaded::Unchanged
    );
    assert_eq!(table.applied().len(), n + 1);
    assert_eq!(fw.state().reloads, 2);
    // Egress and ingress switched off entirely: their objects go in the same transaction.
    fw.reload(&with_policies("{}")).unwrap();
    assert_eq!(table.applied().len(), n + 2);
    let shape = table.shape();
    for gone in [
        platform::firewall::EGRESS_CHAIN,
        platform::firewall::EGRESS_GUARD_CHAIN,
        platform::firewall::INGRESS_CHAIN,
        platform::firewall::LOCALHOST_CHAIN,
    ] {
        assert!(
            !shape.chains.contains_key(gone),
            "{gone}: {:?}",
            shape.chains.keys()
        );
    }
    assert!(shape.chains.contains_key(MONIT_GUARD_CHAIN));
    assert!(fw.state().workload.is_null());
    // No drift afterwards: the read-back of the reload is the reference.
    assert_eq!(fw.reconcile().unwrap(), super::Reconciled::default());
    assert_eq!(fw.state().repairs, 0);
}

#[test]
fn a_refused_reload_changes_nothing_live_or_desired_and_is_recorded() {
    let (table, dir) = (FakeTable::new(), run_dir("reload-bad"));
    let mut fw = running(&table, &dir, INGRESS);
    let (live, desired, n) = (
        rules(&table.shape()),
        fw.desired().clone(),
        table.applied().len(),
    );
    for (bad, names) in [
        (
            r#"{"EgressDeny":[{"Destination":"10.0.0.300/8"}]}"#,
            "10.0.0.300/8",
        ),
        (
            r#"{"IngressAllow":[{"Protocol":"tcp","Ports":"70000"}]}"#,
            "70000",
        ),
    ] {
        let e = fw.reload(&with_policies(bad)).unwrap_err().to_string();
        assert!(e.contains(names), "{e}");
        assert_eq!(fw.state().reload_error.as_deref(), Some(e.as_str()));
        assert_eq!(rules(&table.shape()), live);
        assert_eq!(fw.desired(), &desired);
        assert_eq!(table.applied().len(), n, "nothing committed");
    }
    // A check against the running system (here: one that refuses every policy) refuses too.
    fw.set_workload_check(Some(|_| {
        Err("a lock-out: tcp/22 (sshd) is not allowed".into())
    }));
    let e = fw
        .reload(&with_policies(r#"{"GuardLocalhost":true}"#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lock-out"), "{e}");
    assert_eq!(fw.desired(), &desired);
    // agent.json itself unusable.
    let e =
        fw.reload_failed("agent config /t/agent.json: trailing comma (line 1, column 9)".into());
    assert!(e.to_string().contains("/t/agent.json"), "{e}");
    assert_eq!(fw.state().reloads, 4);
    assert!(
        fw.state()
            .reload_error
            .as_deref()
            .unwrap()
            .contains("line 1")
    );
    assert_eq!(table.applied().len(), n);
    assert_eq!(fw.reconcile().unwrap(), super::Reconciled::default());
    // A valid reload afterwards clears the error.
    fw.set_workload_check(None);
    fw.reload(&with_policies(EGRESS)).unwrap();
    assert_eq!(fw.state().reload_error, None);
    assert_eq!(fw.state().reloads, 5);
}

#[test]
fn a_reload_that_nft_refuses_leaves_the_live_table_and_the_desired_state() {
    let (table, dir) = (FakeTable::new(), run_dir("reload-nft"));
    let mut fw = running(&table, &dir, INGRESS);
    let (live, desired, before) = (
        rules(&table.shape()),
        fw.desired().clone(),
        fw.state().clone(),
    );
    table.fail_applies(Some(
        "Error: Could not process rule: No such file or directory",
    ));
    let e = fw.reload(&with_policies(EGRESS)).unwrap_err().to_string();
    assert!(e.contains("Could not process rule"), "{e}");
    table.fail_applies(None);
    assert_eq!(rules(&table.shape()), live);
    assert_eq!(fw.desired(), &desired);
    assert_eq!(fw.state().workload, before.workload);
    assert_eq!(fw.state().snapshot, before.snapshot);
    assert_eq!(
        fw.state().last_error,
        None,
        "the live table is as good as before"
    );
    assert!(!fw.watch_health().borrow().degraded);
    // Nothing to repair: the reference is the table that stayed.
    assert_eq!(fw.reconcile().unwrap(), super::Reconciled::default());
    assert_eq!(fw.state().repairs, 0);
}

#[test]
fn a_valid_reload_after_a_refused_start_removes_the_policies_left_live() {
    let (table, dir) = (FakeTable::new(), run_dir("reload-refused"));
    drop(running(&table, &dir, EGRESS));
    // Restarted with an invalid entry: the live egress objects are kept.
    let bad = r#"{"EgressDeny":[{"Destination":"10.0.0.300/8"}]}"#;
    let mut fw = running(&table, &dir, bad);
    assert!(fw.state().workload_refused.is_some());
    assert!(
        table
            .shape()
            .chains
            .contains_key(platform::firewall::EGRESS_CHAIN)
    );
    // Fixed by removing the key: the reload removes what the refused start kept.
    fw.reload(&with_policies("{}")).unwrap();
    assert!(
        !table
            .shape()
            .chains
            .contains_key(platform::firewall::EGRESS_CHAIN)
    );
    assert_eq!(fw.state().workload_refused, None);
    assert!(!fw.watch_health().borrow().degraded);
    assert_eq!(fw.reconcile().unwrap(), super::Reconciled::default());
}
