//! `run_script` and `drain` with real shell scripts in a temporary base directory.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{TempDir, alive, wait_for, write_script};
use jobs::{CancellationToken, DrainOptions, DrainParams, DrainSpec, JobScriptError, run_script};

fn jobs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn script(base: &Path, job: &str, name: &str, body: &str) {
    write_script(&base.join("jobs").join(job).join("bin").join(name), body);
}

fn fast() -> DrainOptions {
    DrainOptions {
        time_unit: Duration::from_millis(50),
        terminate_grace: Duration::from_millis(500),
    }
}

#[tokio::test]
async fn run_script_reports_failures_like_upstream_and_logs_output() {
    let dir = TempDir::new("run-script").unwrap();
    let base = dir.path();
    script(
        base,
        "good",
        "pre-start",
        "#!/bin/sh\necho \"out $FOO $PATH $1\"\necho err >&2\nexit 0\n",
    );
    script(
        base,
        "bad",
        "pre-start",
        "#!/bin/sh\necho broken >&2\nexit 3\n",
    );
    std::fs::create_dir_all(base.join("jobs/none/bin")).unwrap();
    let env = BTreeMap::from([("FOO".to_string(), "bar".to_string())]);

    let err = run_script(base, &jobs(&["good", "bad", "none"]), "pre-start", &env)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "1 of 2 pre-start scripts failed. Failed Jobs: bad. Successful Jobs: good."
    );
    let failures = err.failures();
    assert_eq!(failures.len(), 1);
    assert!(
        matches!(&failures[0].error, JobScriptError::Exit { status, .. } if status.contains('3')),
        "{:?}",
        failures[0].error
    );

    // A second run appends.
    let _ = run_script(base, &jobs(&["good", "bad"]), "pre-start", &env).await;
    let log = base.join("sys/log/good/pre-start.stdout.log");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "out bar /usr/sbin:/usr/bin:/sbin:/bin \n".repeat(2)
    );
    assert_eq!(
        std::fs::read_to_string(base.join("sys/log/good/pre-start.stderr.log")).unwrap(),
        "err\nerr\n"
    );
    assert_eq!(
        std::fs::read_to_string(base.join("sys/log/bad/pre-start.stderr.log")).unwrap(),
        "broken\nbroken\n"
    );
    let mode = std::fs::metadata(&log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    assert!(!base.join("sys/log/none").exists());

    // Both failing: no "Successful Jobs" sentence; job order is the given order.
    script(base, "good", "post-start", "#!/bin/sh\nexit 1\n");
    script(base, "bad", "post-start", "#!/bin/sh\nexit 1\n");
    let err = run_script(base, &jobs(&["good", "bad"]), "post-start", &env)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "2 of 2 post-start scripts failed. Failed Jobs: good, bad."
    );

    // A script name that would leave the job directory is refused up front.
    let err = run_script(base, &jobs(&["none"]), "../../../bin/sh", &env)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "Invalid script name \"../../../bin/sh\"");
}

#[tokio::test]
async fn run_script_runs_jobs_in_parallel_and_succeeds() {
    let dir = TempDir::new("run-parallel").unwrap();
    let base = dir.path();
    for job in ["a", "b", "c"] {
        script(base, job, "post-deploy", "#!/bin/sh\nsleep 1\n");
    }
    let started = Instant::now();
    run_script(
        base,
        &jobs(&["a", "b", "c"]),
        "post-deploy",
        &BTreeMap::new(),
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    // No job has the script: nothing to do.
    run_script(base, &jobs(&["a"]), "nope", &BTreeMap::new())
        .await
        .unwrap();
}

/// Answers from `answers` in turn, recording argv and the two env vars per call.
fn polling_drain(base: &Path, job: &str, answers: &[&str]) {
    let dir = base.join("jobs").join(job);
    let mut body = String::from("#!/bin/sh\n");
    body.push_str(&format!(
        "n=$(cat {d}/count 2>/dev/null || echo 0)\necho $((n+1)) > {d}/count\n\
         echo \"$* | ${{BOSH_JOB_STATE-unset}} | ${{BOSH_JOB_NEXT_STATE-unset}}\" >> {d}/calls\n",
        d = dir.display()
    ));
    body.push_str("case $n in\n");
    for (i, answer) in answers.iter().enumerate() {
        body.push_str(&format!("  {i}) echo '{answer}' ;;\n"));
    }
    body.push_str("  *) echo 0 ;;\nesac\n");
    script(base, job, "drain", &body);
}

#[tokio::test]
async fn drain_polls_while_negative_then_finishes() {
    let dir = TempDir::new("drain-poll").unwrap();
    let base = dir.path();
    polling_drain(base, "web", &["-1", " -1\n", "0"]);
    polling_drain(base, "worker", &["2"]);
    let old = DrainSpec {
        has_jobs: true,
        configuration_hash: "h1".into(),
        packages: BTreeMap::from([("ruby".into(), "1".into()), ("nginx".into(), "2".into())]),
        persistent_disk: 1024,
    };
    let new = DrainSpec {
        configuration_hash: "h2".into(),
        packages: BTreeMap::from([
            ("ruby".into(), "9".into()),
            ("nginx".into(), "2".into()),
            ("app".into(), "3".into()),
        ]),
        persistent_disk: 2048,
        ..old.clone()
    };
    let params = DrainParams::update(&old, &new);
    let started = Instant::now();
    jobs::drain(
        base,
        &jobs(&["web", "worker", "no-drain"]),
        &params,
        &fast(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    // web: 50 ms + 50 ms + 0; worker: 100 ms, in parallel.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let calls = std::fs::read_to_string(base.join("jobs/web/calls")).unwrap();
    assert_eq!(
        calls,
        "job_changed hash_changed app ruby | {\"persistent_disk\":1024} | {\"persistent_disk\":2048}\n\
         job_check_status hash_unchanged | {\"persistent_disk\":1024} | unset\n\
         job_check_status hash_unchanged | {\"persistent_disk\":1024} | unset\n"
    );
    let calls = std::fs::read_to_string(base.join("jobs/worker/calls")).unwrap();
    assert_eq!(calls.lines().count(), 1);
}

#[tokio::test]
async fn drain_output_must_be_a_signed_integer() {
    let dir = TempDir::new("drain-bad").unwrap();
    let base = dir.path();
    script(
        base,
        "web",
        "drain",
        "#!/bin/sh\necho 'ten seconds please'\n",
    );
    // A non-zero exit with an integer answer is accepted, as upstream does.
    script(base, "api", "drain", "#!/bin/sh\necho +0\nexit 7\n");
    let old = DrainSpec::default();
    let err = jobs::drain(
        base,
        &jobs(&["web", "api"]),
        &DrainParams::shutdown(&old, None),
        &fast(),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "1 of 2 drain scripts failed. Failed Jobs: web. Successful Jobs: api."
    );
    let reason = err.failures()[0].error.to_string();
    assert_eq!(
        reason,
        "Script did not return a signed integer: drain script of job web printed \"ten seconds please\\n\""
    );
}

#[tokio::test]
async fn cancel_terminates_a_long_drain_and_its_children() {
    let dir = TempDir::new("drain-cancel").unwrap();
    let base = dir.path();
    let d = base.join("jobs/slow");
    script(
        base,
        "slow",
        "drain",
        &format!(
            "#!/bin/sh\necho $$ > {d}/script.pid\nsleep 30 &\necho $! > {d}/sleep.pid\nwait\necho 0\n",
            d = d.display()
        ),
    );
    // Ignores SIGTERM (and so does its sleep): needs the SIGKILL after the grace period.
    let e = base.join("jobs/stubborn");
    script(
        base,
        "stubborn",
        "drain",
        &format!(
            "#!/bin/sh\ntrap '' TERM\necho $$ > {e}/script.pid\nsleep 30\necho 0\n",
            e = e.display()
        ),
    );
    let cancel = CancellationToken::new();
    let task = {
        let base = base.to_path_buf();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            jobs::drain(
                &base,
                &jobs(&["slow", "stubborn"]),
                &DrainParams::shutdown(&DrainSpec::default(), None),
                &fast(),
                &cancel,
            )
            .await
        })
    };
    let pid = |p: &Path| -> Option<i32> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let (script_pid, sleep_pid, stubborn_pid) =
        wait_for("drain scripts to start", Duration::from_secs(5), || async {
            Some((
                pid(&d.join("script.pid"))?,
                pid(&d.join("sleep.pid"))?,
                pid(&e.join("script.pid"))?,
            ))
        })
        .await;
    assert!(alive(script_pid) && alive(sleep_pid) && alive(stubborn_pid));

    let started = Instant::now();
    cancel.cancel();
    let err = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("drain did not end after cancel")
        .unwrap()
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        err.to_string(),
        "2 of 2 drain scripts failed. Failed Jobs: slow, stubborn."
    );
    assert!(
        err.failures()
            .iter()
            .all(|f| matches!(f.error, JobScriptError::Cancelled))
    );
    assert_eq!(
        err.failures()[0].error.to_string(),
        "Script was cancelled by user request"
    );
    wait_for(
        "drain processes to be gone",
        Duration::from_secs(3),
        || async {
            (!alive(script_pid) && !alive(sleep_pid) && !alive(stubborn_pid)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn cancel_interrupts_the_wait_after_an_answer() {
    let dir = TempDir::new("drain-cancel-wait").unwrap();
    let base = dir.path();
    // Asks for a 600-unit wait (30 s with the test unit).
    script(base, "web", "drain", "#!/bin/sh\necho 600\n");
    let cancel = CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        })
    };
    let started = Instant::now();
    let err = jobs::drain(
        base,
        &jobs(&["web"]),
        &DrainParams::shutdown(&DrainSpec::default(), None),
        &fast(),
        &cancel,
    )
    .await
    .unwrap_err();
    canceller.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(err.failures()[0].error, JobScriptError::Cancelled));
}
