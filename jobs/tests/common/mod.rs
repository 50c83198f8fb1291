//! Shared helpers for the real-part tests: a real monit (testkit's) on a free loopback port
//! with this crate's client and supervisor, scripts, bounded waits.
#![allow(clippy::unwrap_used, dead_code)]

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jobs::{ClientOptions, JobSupervisor, MonitCli, MonitClient, RetryPolicy, SupervisorOptions};
pub use testkit::TempDir;
use testkit::monit::{ControlFile, MonitDaemon};

/// Writes an executable file.
pub fn write_script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `limit` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The monit binary (testkit's: `$TESTKIT_MONIT` or `/usr/bin/monit`). A missing monit fails
/// the test.
pub fn monit_binary() -> PathBuf {
    testkit::monit::monit_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// A real monit (`monit -I -c <rc>`) serving HTTP on a free loopback port, with the agent's
/// base directory beside it. Killed by PID on drop, with the processes its jobs left behind.
pub struct RealMonit {
    pub dir: TempDir,
    pub base: PathBuf,
    pub rc: PathBuf,
    pub port: u16,
    daemon: Option<MonitDaemon>,
}

impl RealMonit {
    /// Starts monit with `checks` (monitrc text) after writing `scripts` (name, body) into the
    /// temp dir and the monit user file through `jobs::setup_monit_user`. `@DIR@` in either is
    /// replaced by the temp dir.
    pub async fn start(tag: &str, checks: &str, scripts: &[(&str, &str)]) -> Self {
        let binary = monit_binary();
        let dir = TempDir::new(&format!("jobs-it-{tag}")).unwrap();
        for (name, body) in scripts {
            let body = body.replace("@DIR@", &dir.path().display().to_string());
            write_script(&dir.path().join(name), &body);
        }
        let base = dir.path().join("base");
        jobs::setup_monit_user(&base).await.unwrap();
        let port = testkit::net::free_port(&[[127, 0, 0, 1].into()]).unwrap();
        let rc = dir.path().join("monitrc");
        ControlFile {
            port,
            user_file: jobs::monit_user_path(&base),
            run_dir: dir.path().to_path_buf(),
            body: checks.replace("@DIR@", &dir.path().display().to_string()),
        }
        .write(&rc)
        .unwrap();
        let here = testkit::Place::default();
        let daemon = MonitDaemon::start(&binary, &rc, &here, &here, &dir.path().join("monit.out"))
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let monit = Self {
            dir,
            base,
            rc,
            port,
            daemon: Some(daemon),
        };
        let client = monit.client().await;
        wait_for("monit's HTTP API", Duration::from_secs(10), || async {
            client.status().await.ok()
        })
        .await;
        monit
    }

    /// A client reading credentials from the base dir, with fast retries.
    pub async fn client(&self) -> MonitClient {
        let quick = RetryPolicy {
            max_unavailable_attempts: 0,
            max_other_attempts: 3,
            delay: Duration::from_millis(100),
        };
        MonitClient::from_base_dir(
            &self.base,
            ClientOptions {
                endpoint: ([127, 0, 0, 1], self.port).into(),
                short_retry: quick,
                long_retry: RetryPolicy {
                    max_unavailable_attempts: 20,
                    ..quick
                },
                request_timeout: Duration::from_secs(5),
            },
        )
        .await
        .unwrap()
    }

    /// A supervisor using this monit's CLI and control file, polling every 100 ms.
    pub async fn supervisor(&self) -> JobSupervisor {
        JobSupervisor::new(
            self.client().await,
            &self.base,
            SupervisorOptions {
                monit_cli: MonitCli {
                    binary: monit_binary(),
                    control_file: Some(self.rc.clone()),
                },
                poll_interval: Duration::from_millis(100),
                stop_timeout: Duration::from_secs(20),
                reload_check_interval: Duration::from_millis(200),
                ..SupervisorOptions::default()
            },
        )
    }

    /// The pid in `<dir>/<name>.pid`, if any.
    pub fn pid_of(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for RealMonit {
    fn drop(&mut self) {
        // Monit first (by pid), so that it cannot restart what is killed next.
        drop(self.daemon.take());
        // Processes the jobs started, recorded in their pid files.
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "pid")
                    && path.file_stem().is_some_and(|s| s != "monit")
                    && let Some(pid) = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    u32::try_from(pid).is_ok_and(testkit::alive)
}

/// Polls `check` every 50 ms until it is true, or panics after `limit` naming `what`.
pub fn wait_for_sync(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
