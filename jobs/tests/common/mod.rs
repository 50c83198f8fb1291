//! Shared helpers for the real-part tests: temp dirs, a real monit started on a free loopback
//! port, bounded waits.
#![allow(clippy::unwrap_used, dead_code)]

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use jobs::{ClientOptions, JobSupervisor, MonitCli, MonitClient, RetryPolicy, SupervisorOptions};

/// A fresh directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "jobs-it-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

/// The monit binary: `$JOBS_TEST_MONIT` or `/usr/bin/monit`. A missing monit fails the test.
pub fn monit_binary() -> PathBuf {
    let path = std::env::var_os("JOBS_TEST_MONIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/monit"));
    assert!(
        path.is_file(),
        "these tests need a real monit at {} (Debian package `monit`; set JOBS_TEST_MONIT to \
         use another path)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real monit (`monit -I -c <rc>`) serving HTTP on a free loopback port, with the agent's
/// base directory beside it. Killed by PID on drop, with the processes its jobs left behind.
pub struct RealMonit {
    pub dir: TempDir,
    pub base: PathBuf,
    pub rc: PathBuf,
    pub port: u16,
    child: Child,
}

impl RealMonit {
    /// Starts monit with `checks` (monitrc text) after writing `scripts` (name, body) into the
    /// temp dir and the monit user file through `jobs::setup_monit_user`. `@DIR@` in either is
    /// replaced by the temp dir.
    pub async fn start(tag: &str, checks: &str, scripts: &[(&str, &str)]) -> Self {
        let binary = monit_binary();
        let dir = TempDir::new(tag);
        for (name, body) in scripts {
            let body = body.replace("@DIR@", &dir.path().display().to_string());
            write_script(&dir.path().join(name), &body);
        }
        let base = dir.path().join("base");
        jobs::setup_monit_user(&base).await.unwrap();
        let port = free_port();
        let d = dir.path().display().to_string();
        let rc = dir.path().join("monitrc");
        let text = format!(
            "set daemon 1\n\
             set httpd port {port} and use address 127.0.0.1\n  allow cleartext {user}\n\
             set pidfile {d}/monit.pid\nset statefile {d}/monit.state\nset idfile {d}/monit.id\n\
             set logfile {d}/monit.log\n{checks}",
            user = jobs::monit_user_path(&base).display(),
            checks = checks.replace("@DIR@", &d),
        );
        std::fs::write(&rc, text).unwrap();
        std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
        let child = Command::new(&binary)
            .arg("-I")
            .arg("-c")
            .arg(&rc)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let monit = Self {
            dir,
            base,
            rc,
            port,
            child,
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
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
