//! The monit client and job supervisor against a real monit (Debian's `monit`), on a free
//! loopback port with a generated monitrc. No root, no network namespace.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RealMonit, alive, wait_for};
use jobs::{JobState, ProcessState, VCAP_GROUP};

const LIMIT: Duration = Duration::from_secs(10);

const SAMPLE_SCRIPT: &str = "#!/bin/sh
case \"$1\" in
  start) /bin/sleep 120 >/dev/null 2>&1 &
         echo $! > @DIR@/sample.pid ;;
  stop)  [ -f @DIR@/sample.pid ] && /bin/kill $(/bin/cat @DIR@/sample.pid)
         /bin/rm -f @DIR@/sample.pid ;;
esac
exit 0
";

/// A job that runs: its start program backgrounds a `sleep` and records its pid.
async fn sample_monit() -> RealMonit {
    let checks = "check process sample with pidfile @DIR@/sample.pid\n  \
                  start program \"@DIR@/sample.sh start\" with timeout 5 seconds\n  \
                  stop program \"@DIR@/sample.sh stop\"\n  group vcap\n";
    RealMonit::start("sample", checks, &[("sample.sh", SAMPLE_SCRIPT)]).await
}

async fn state(monit: &RealMonit) -> JobState {
    monit.supervisor().await.job_state().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_start_stop_and_wait_unmonitor() {
    let monit = sample_monit().await;
    let supervisor = monit.supervisor().await;
    let client = supervisor.client().clone();

    // status lists the service in the vcap group.
    let status = client.status().await.unwrap();
    assert_eq!(status.group_members(VCAP_GROUP), ["sample"]);
    assert!(status.incarnation_number().unwrap() > 0);

    // start → running.
    supervisor.start().await.unwrap();
    wait_for("sample running", LIMIT, || async {
        (state(&monit).await == JobState::Running).then_some(())
    })
    .await;
    let processes = supervisor.processes().await.unwrap();
    assert_eq!(processes.len(), 1);
    assert_eq!(processes[0].name, "sample");
    assert_eq!(processes[0].state, ProcessState::Running);
    assert!(processes[0].memory.kb > 0, "{processes:?}");
    let pid = monit.pid_of("sample").unwrap();
    assert!(alive(pid));

    // stop_and_wait → stopped marker, nothing monitored, the process gone.
    tokio::time::timeout(Duration::from_secs(25), supervisor.stop_and_wait())
        .await
        .unwrap()
        .unwrap();
    assert!(supervisor.stopped_file().exists());
    assert_eq!(supervisor.job_state().await, JobState::Stopped);
    let services = client.status().await.unwrap().services_in_group(VCAP_GROUP);
    assert!(
        services.iter().all(|s| !s.monitored && !s.pending),
        "{services:?}"
    );
    wait_for("sample's process to exit", LIMIT, || async {
        (!alive(pid)).then_some(())
    })
    .await;

    // start again: the marker goes away, states move through starting/failing to running.
    supervisor.start().await.unwrap();
    assert!(!supervisor.stopped_file().exists());
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    loop {
        let s = supervisor.job_state().await;
        seen.push(s);
        if s == JobState::Running {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "not running after {LIMIT:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.iter().all(|s| matches!(
            s,
            JobState::Starting | JobState::Failing | JobState::Running
        )),
        "{seen:?}"
    );

    // unmonitor: monit lets go of the job (not monitored → failing), the process keeps running.
    supervisor.unmonitor().await.unwrap();
    wait_for("sample unmonitored", LIMIT, || async {
        let services = client.status().await.ok()?.services_in_group(VCAP_GROUP);
        services.iter().all(|s| !s.monitored).then_some(())
    })
    .await;
    assert_eq!(supervisor.job_state().await, JobState::Failing);
    let pid = monit.pid_of("sample").unwrap();
    assert!(alive(pid));

    // Protocol ≤ 2 stop: requests the stop and writes the marker without waiting.
    supervisor.start().await.unwrap();
    wait_for("sample monitored again", LIMIT, || async {
        (state(&monit).await == JobState::Running).then_some(())
    })
    .await;
    supervisor.stop().await.unwrap();
    assert_eq!(supervisor.job_state().await, JobState::Stopped);
    wait_for("sample stopped by monit", LIMIT, || async {
        let services = client.status().await.ok()?.services_in_group(VCAP_GROUP);
        services
            .iter()
            .all(|s| !s.monitored && !s.pending)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_start_program_never_creates_the_process_is_failing() {
    // Passive: monit only checks it; the start program exits without starting anything.
    let checks = "check process failer with pidfile @DIR@/failer.pid\n  \
                  start program \"/bin/true\" with timeout 1 seconds\n  \
                  stop program \"/bin/true\"\n  mode passive\n  group vcap\n";
    let monit = RealMonit::start("failer", checks, &[]).await;
    let supervisor = monit.supervisor().await;
    wait_for("failer failing", LIMIT, || async {
        (supervisor.job_state().await == JobState::Failing).then_some(())
    })
    .await;
    // A start request is accepted, and the job still fails.
    supervisor.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(supervisor.job_state().await, JobState::Failing);
    let processes = supervisor.processes().await.unwrap();
    assert_eq!(processes[0].name, "failer");
    assert_eq!(processes[0].state, ProcessState::Failing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_by_monit() {
    let monit = RealMonit::start("badauth", "", &[]).await;
    let client = jobs::MonitClient::new(
        *monit.client().await.options(),
        jobs::Credentials {
            user: "vcap".into(),
            password: "wrong".into(),
        },
    );
    let err = client.status().await.unwrap_err().to_string();
    assert!(
        err.starts_with("Getting monit status: Request failed with 401"),
        "{err}"
    );
    let supervisor = jobs::JobSupervisor::new(client, &monit.base, Default::default());
    assert_eq!(supervisor.job_state().await, JobState::Unknown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_config_and_waits_for_the_new_incarnation() {
    let monit = RealMonit::start("reload", "", &[]).await;
    let supervisor = monit.supervisor().await;
    let client = supervisor.client().clone();
    let before = client.status().await.unwrap();
    assert!(before.group_members(VCAP_GROUP).is_empty());

    // No vcap service: running, unless the applied spec has jobs.
    assert_eq!(supervisor.job_state().await, JobState::Running);
    supervisor.set_expected_jobs(1);
    assert_eq!(supervisor.job_state().await, JobState::Failing);

    // A new check appears in the control file; reload makes monit load it. The first request
    // likely lands in monit's start second (same incarnation), so the retry is exercised too.
    let mut rc = std::fs::read_to_string(&monit.rc).unwrap();
    rc.push_str(&format!(
        "check file late with path {}\n  group vcap\n",
        monit.rc.display()
    ));
    std::fs::write(&monit.rc, rc).unwrap();
    if let Err(e) = supervisor.reload().await {
        panic!(
            "{e}; monit log: {}",
            std::fs::read_to_string(monit.dir.path().join("monit.log")).unwrap_or_default()
        );
    }
    let after = client.status().await.unwrap();
    assert_ne!(after.incarnation, before.incarnation);
    assert_eq!(after.group_members(VCAP_GROUP), ["late"]);
}

/// monit's incarnation counts whole seconds; reloads sent back to back, the first right after
/// monit's start, land in the second of the previous (re)start more often than not. With one
/// request per reload and no retry, each must still be confirmed, and must have re-read the
/// control file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_reloads_are_each_confirmed_by_their_one_request() {
    let monit = RealMonit::start("reload-twice", "", &[]).await;
    let client = monit.client().await;
    let supervisor = jobs::JobSupervisor::new(
        client.clone(),
        &monit.base,
        jobs::SupervisorOptions {
            monit_cli: jobs::MonitCli {
                binary: common::monit_binary(),
                control_file: Some(monit.rc.clone()),
            },
            reload_tries: 1,
            reload_checks: 50,
            reload_check_interval: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let mut incarnation = client.status().await.unwrap().incarnation_number().unwrap();
    let started = std::time::Instant::now();
    let rounds = 5;
    for round in 0..rounds {
        let mut rc = std::fs::read_to_string(&monit.rc).unwrap();
        rc.push_str(&format!(
            "check file late{round} with path {}\n  group vcap\n",
            monit.rc.display()
        ));
        std::fs::write(&monit.rc, rc).unwrap();
        let t = std::time::Instant::now();
        if let Err(e) = supervisor.reload().await {
            panic!(
                "reload {round} (after {:?}): {e}; monit log: {}",
                t.elapsed(),
                std::fs::read_to_string(monit.dir.path().join("monit.log")).unwrap_or_default()
            );
        }
        let status = client.status().await.unwrap();
        let now = status.incarnation_number().unwrap();
        assert_ne!(now, incarnation, "reload {round}");
        incarnation = now;
        let want: Vec<String> = (0..=round).map(|i| format!("late{i}")).collect();
        assert_eq!(status.group_members(VCAP_GROUP), want, "reload {round}");
        eprintln!("REAL_MONIT: reload {round} confirmed in {:?}", t.elapsed());
    }
    eprintln!(
        "REAL_MONIT: {rounds} back-to-back reloads in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_fails_when_monit_cannot_reload() {
    let monit = RealMonit::start("noreload", "", &[]).await;
    let mut options = jobs::SupervisorOptions {
        reload_tries: 2,
        reload_checks: 2,
        reload_check_interval: Duration::from_millis(50),
        ..Default::default()
    };
    // A CLI that cannot reach this monit (wrong control file): every request fails.
    options.monit_cli.binary = common::monit_binary();
    options.monit_cli.control_file = Some(monit.dir.path().join("missing-monitrc"));
    let supervisor = jobs::JobSupervisor::new(monit.client().await, &monit.base, options);
    let err = supervisor.reload().await.unwrap_err().to_string();
    assert!(err.starts_with("Failed to reload monit: before="), "{err}");
}
