//! Processes the harness starts: a command placed "in netns N, cgroup C, as uid U"
//! ([`Exec`]), long-running ones ([`Proc`], killed by PID and reaped on drop) and short-lived
//! ones with captured output and a timeout ([`Pending`], [`run_with_timeout`]).
//!
//! No `unsafe` and no `pre_exec` hooks: a process is placed by wrapping its command in
//! `nsenter --net=<ns> -- sh -c 'echo $$ > <cgroup>/cgroup.procs; exec …'` (plus
//! `unshare --cgroup` and `setpriv` when asked), each of which execs the next, so the pid the
//! harness holds is the final program's. Nothing is ever stopped by name.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, Result, err, io_ctx, wait_for};

/// Exit code of the `sh` placement wrapper when the process could not be moved into its
/// cgroup: distinct from every code a test asserts on, so a failed placement can never pass
/// for "timed out" (dash exits 2 on a failed redirection).
const PLACEMENT_FAILED: i32 = 125;

/// Where a helper's processes run: a network namespace (the file it is pinned at), a mount
/// namespace and a cgroup directory, each optional (`Place::default()` is the caller's own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    /// `nsenter --net=<file>` when set.
    pub netns: Option<PathBuf>,
    /// `nsenter --mount=<file>` when set (e.g. `/proc/<pid>/ns/mnt` of a process that holds
    /// a private mount namespace: a simulated VM whose mounts its processes share).
    pub mountns: Option<PathBuf>,
    /// Moved into this cgroup before the program runs, when set.
    pub cgroup: Option<PathBuf>,
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid` (a process the caller started, or one its own children started).
pub fn signal_pid(pid: u32, sig: Signal) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| Error(format!("pid {pid} out of range")))?;
    kill(Pid::from_raw(raw), sig).map_err(|e| Error(format!("kill -{sig} {pid}: {e}")))
}

/// A command placed "in netns N, cgroup C, as uid U". Build with
/// [`Exec::new`], then [`Exec::spawn`] (long-running, output to a log file),
/// [`Exec::start`] (captured output, many at once) or [`Exec::output`].
#[derive(Debug, Clone)]
pub struct Exec {
    argv: Vec<OsString>,
    netns: Option<PathBuf>,
    mountns: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    uid: Option<u32>,
    cgroupns: bool,
    join_cgroupns: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    log: Option<PathBuf>,
    held: bool,
    binds: Option<Vec<(PathBuf, PathBuf)>>,
}

impl Exec {
    /// `argv` run in the caller's namespaces and cgroup, as root.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Exec {
            argv: argv
                .into_iter()
                .map(|a| a.as_ref().to_os_string())
                .collect(),
            netns: None,
            mountns: None,
            cgroup: None,
            uid: None,
            cgroupns: false,
            join_cgroupns: None,
            env: Vec::new(),
            log: None,
            held: false,
            binds: None,
        }
    }

    /// Runs the program in a private mount namespace (`unshare -m --propagation private`)
    /// with each `(source, target)` bind-mounted first: what it mounts dies with it, and a
    /// copy of `/etc` bound over `/etc` keeps the host's accounts untouched.
    pub fn private_mounts(mut self, binds: &[(PathBuf, PathBuf)]) -> Self {
        self.binds = Some(binds.to_vec());
        self
    }

    /// Holds the program after the namespace and cgroup placement until [`Proc::release`]:
    /// a benchmark can then time the program alone (moving a process between cgroups can take
    /// 20 ms while the kernel waits for an RCU grace period).
    pub fn held(mut self) -> Self {
        self.held = true;
        self
    }

    /// Runs inside the network namespace pinned at `file`.
    pub fn netns(mut self, file: &Path) -> Self {
        self.netns = Some(file.to_path_buf());
        self
    }

    /// Runs inside the mount namespace at `file` (`nsenter --mount=<file>`, which also makes
    /// the namespace's root the process's root and cwd). Combined with
    /// [`Exec::private_mounts`], the private namespace is made inside this one.
    pub fn mountns(mut self, file: &Path) -> Self {
        self.mountns = Some(file.to_path_buf());
        self
    }

    /// Runs in cgroup `cg` (moved there before the program is executed, so every socket it
    /// opens belongs to `cg`).
    pub fn cgroup(mut self, cg: impl AsRef<Path>) -> Self {
        self.cgroup = Some(cg.as_ref().to_path_buf());
        self
    }

    /// Runs where `place` says (its namespace and cgroup, each when set).
    pub fn place(mut self, place: &Place) -> Self {
        if let Some(ns) = &place.netns {
            self.netns = Some(ns.clone());
        }
        if let Some(ns) = &place.mountns {
            self.mountns = Some(ns.clone());
        }
        if let Some(cg) = &place.cgroup {
            self.cgroup = Some(cg.clone());
        }
        self
    }

    /// Runs as `uid` (gid = uid, no supplementary groups) when `Some`; as root when `None`.
    pub fn user(mut self, uid: Option<u32>) -> Self {
        self.uid = uid;
        self
    }

    /// Runs in a new cgroup namespace rooted at its cgroup (`unshare --cgroup`), so that
    /// `/proc/self/cgroup` shows `0::/`.
    pub fn cgroupns(mut self) -> Self {
        self.cgroupns = true;
        self
    }

    /// Joins the cgroup namespace of process `pid` (`nsenter --cgroup=/proc/<pid>/ns/cgroup`)
    /// after moving into its cgroup: a job inside the same container as a namespaced agent.
    pub fn join_cgroupns_of(mut self, pid: u32) -> Self {
        self.join_cgroupns = Some(PathBuf::from(format!("/proc/{pid}/ns/cgroup")));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Where [`Exec::spawn`] writes stdout and stderr (default: discarded).
    pub fn log(mut self, path: &Path) -> Self {
        self.log = Some(path.to_path_buf());
        self
    }

    /// The full command: `[nsenter [--net=N] [--mount=M] --] [sh -c <move into C> sh C/cgroup.procs]
    /// [unshare --cgroup --] [nsenter --cgroup=P --] [setpriv --reuid=U ... --] argv`. Each wrapper execs the next.
    pub fn command(&self) -> Command {
        let mut words: Vec<OsString> = Vec::new();
        // One nsenter for both: it opens every namespace file before entering any, so the
        // network namespace's file is found even when the mount namespace hides its path.
        if self.netns.is_some() || self.mountns.is_some() {
            words.push("nsenter".into());
            if let Some(ns) = &self.netns {
                let mut a = OsString::from("--net=");
                a.push(ns);
                words.push(a);
            }
            if let Some(ns) = &self.mountns {
                let mut a = OsString::from("--mount=");
                a.push(ns);
                words.push(a);
            }
            words.push("--".into());
        }
        // `read` waits for the release of a held program (one line on its stdin).
        let hold = if self.held { "read _ || exit 1; " } else { "" };
        if let Some(cg) = &self.cgroup {
            words.extend([
                "sh".into(),
                "-c".into(),
                format!("echo $$ > \"$1\" || exit {PLACEMENT_FAILED}; shift; {hold}exec \"$@\"")
                    .into(),
                "sh".into(),
                cg.join("cgroup.procs").into_os_string(),
            ]);
        } else if self.held {
            words.extend([
                "sh".into(),
                "-c".into(),
                format!("{hold}exec \"$@\"").into(),
                "sh".into(),
            ]);
        }
        if self.cgroupns {
            words.extend(["unshare".into(), "--cgroup".into(), "--".into()]);
        }
        if let Some(ns) = &self.join_cgroupns {
            let mut a = OsString::from("--cgroup=");
            a.push(ns);
            words.extend(["nsenter".into(), a, "--".into()]);
        }
        if let Some(binds) = &self.binds {
            let mut script = String::new();
            for i in 0..binds.len() {
                let (a, b) = (2 * i + 1, 2 * i + 2);
                script.push_str(&format!(
                    "mount --bind \"${{{a}}}\" \"${{{b}}}\" || exit 1; "
                ));
            }
            script.push_str(&format!("shift {}; exec \"$@\"", 2 * binds.len()));
            words.extend([
                "unshare".into(),
                "-m".into(),
                "--propagation".into(),
                "private".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
                "sh".into(),
            ]);
            for (src, dst) in binds {
                words.push(src.clone().into_os_string());
                words.push(dst.clone().into_os_string());
            }
        }
        if let Some(uid) = self.uid {
            words.extend([
                "setpriv".into(),
                format!("--reuid={uid}").into(),
                format!("--regid={uid}").into(),
                "--clear-groups".into(),
                "--".into(),
            ]);
        }
        words.extend(self.argv.iter().cloned());
        // An empty argv (a caller's mistake) runs `false`, which fails visibly.
        let fallback = OsString::from("false");
        let (program, args) = words.split_first().unwrap_or((&fallback, &[]));
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(if self.held {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn label(&self) -> String {
        self.argv
            .iter()
            .take(3)
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Starts a long-running process; stdout and stderr go to the log file, if any.
    pub fn spawn(&self) -> Result<Proc> {
        let mut cmd = self.command();
        if let Some(log) = &self.log {
            let f = File::create(log).map_err(io_ctx(format!("creating {}", log.display())))?;
            let f2 = f.try_clone().map_err(io_ctx("dup log file"))?;
            cmd.stdout(f).stderr(f2);
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd
            .spawn()
            .map_err(io_ctx(format!("spawning {}", self.label())))?;
        Ok(Proc {
            child,
            label: self.label(),
            log: self.log.clone(),
        })
    }

    /// Starts a short-lived process whose output is captured; finish with [`Pending::wait`].
    pub fn start(&self) -> Result<Pending> {
        Pending::start(self.command(), self.label())
    }

    /// Runs to completion (killed after `timeout`) and returns its output.
    pub fn output(&self, timeout: Duration) -> Result<Output> {
        self.start()?.wait(timeout)
    }
}

/// Runs `cmd` with captured output, killed after `timeout`.
pub fn run_with_timeout(cmd: Command, timeout: Duration, label: &str) -> Result<Output> {
    Pending::start(cmd, label.to_string())?.wait(timeout)
}

/// A short-lived process with its output being collected (so that a full pipe never blocks it).
#[derive(Debug)]
pub struct Pending {
    child: Child,
    label: String,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Pending {
    fn start(mut cmd: Command, label: String) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(io_ctx(format!("spawning {label}")))?;
        let drain = |r: Option<Box<dyn Read + Send>>| {
            r.map(|mut r| {
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let _ = r.read_to_end(&mut buf);
                    buf
                })
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        Ok(Pending {
            child,
            label,
            stdout,
            stderr,
        })
    }

    /// Pid of the process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit (killing the process after `timeout`) and collects the output.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return err(format!("waiting for {}: {e}", self.label)),
            }
        };
        let status = match status {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let out = self.collect(ExitStatus::default());
                return err(format!(
                    "{} did not finish within {timeout:?}: {}",
                    self.label,
                    describe(&out)
                ));
            }
        };
        Ok(self.collect(status))
    }

    fn collect(&mut self, status: ExitStatus) -> Output {
        let join =
            |h: Option<JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        Output {
            status,
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One line summarising an output: exit code, stdout, stderr.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}; stdout: {:?}; stderr: {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// A long-running process started by the harness; killed (by pid) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    label: String,
    log: Option<PathBuf>,
}

impl Proc {
    /// Pid of the program (the wrappers exec, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(io_ctx(format!("waiting for {}", self.label)))
    }

    /// Sends `sig` if the process is still running. The check and the signal are safe against
    /// pid reuse because the process is not reaped until `try_wait` reports its exit.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid()).map_err(|_| Error("pid out of range".into()))?;
        kill(Pid::from_raw(pid), sig).map_err(|e| Error(format!("kill -{sig} {pid}: {e}")))
    }

    /// Waits for the exit, blocking (for a process known to end soon: no timeout).
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.child
            .wait()
            .map_err(io_ctx(format!("waiting for {}", self.label)))
    }

    /// Waits up to `timeout` for the exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let label = self.label.clone();
        wait_for(&format!("{label} to exit"), timeout, || self.try_status())
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_timeout(timeout)
    }

    /// What the process wrote so far (stdout and stderr), if it has a log.
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The log file, if any.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Waits until the (held) process is in `cg`, i.e. its placement is done.
    pub fn wait_in_cgroup(&mut self, cg: impl AsRef<Path>, timeout: Duration) -> Result<()> {
        let cg = cg.as_ref();
        let pid = self.pid().to_string();
        let procs = cg.join("cgroup.procs");
        wait_for(
            &format!("{} to enter {}", self.label, cg.display()),
            timeout,
            || {
                let text = fs::read_to_string(&procs)
                    .map_err(io_ctx(format!("reading {}", procs.display())))?;
                Ok(text.lines().any(|l| l.trim() == pid).then_some(()))
            },
        )
    }

    /// Lets a program started with [`Exec::held`] go: it is executed now.
    pub fn release(&mut self) -> Result<()> {
        let mut stdin = self
            .child
            .stdin
            .take()
            .ok_or_else(|| Error(format!("{} was not started held", self.label)))?;
        stdin
            .write_all(b"go\n")
            .map_err(io_ctx(format!("releasing {}", self.label)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_captured_and_a_hung_command_is_killed_at_its_timeout() -> Result<()> {
        let out = Exec::new(["sh", "-c", "echo out; echo err >&2; exit 3"])
            .env("X", "1")
            .output(Duration::from_secs(10))?;
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let e = Exec::new(["sleep", "30"])
            .output(Duration::from_millis(200))
            .expect_err("sleep 30 must time out");
        assert!(e.0.contains("did not finish within"), "{e}");
        Ok(())
    }

    #[test]
    fn one_nsenter_enters_the_network_and_mount_namespaces() {
        let argv = |e: &Exec| -> Vec<String> {
            let c = e.command();
            std::iter::once(c.get_program())
                .chain(c.get_args())
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let both = Exec::new(["true"])
            .netns(Path::new("/n"))
            .mountns(Path::new("/proc/7/ns/mnt"));
        assert_eq!(
            argv(&both),
            [
                "nsenter",
                "--net=/n",
                "--mount=/proc/7/ns/mnt",
                "--",
                "true"
            ]
        );
        let place = Place {
            netns: None,
            mountns: Some("/m".into()),
            cgroup: None,
        };
        assert_eq!(
            argv(&Exec::new(["true"]).place(&place)),
            ["nsenter", "--mount=/m", "--", "true"]
        );
        assert_eq!(argv(&Exec::new(["true"])), ["true"]);
    }

    #[test]
    fn a_dropped_proc_is_killed_by_pid_and_reaped() -> Result<()> {
        let p = Exec::new(["sleep", "30"]).spawn()?;
        let pid = p.pid();
        assert!(alive(pid));
        drop(p);
        assert!(!alive(pid), "pid {pid} still alive after drop");
        Ok(())
    }

    #[test]
    fn terminate_ends_a_process_and_its_log_is_kept() -> Result<()> {
        let dir = crate::TempDir::new("testkit-proc")?;
        let log = dir.join("p.log");
        let mut p = Exec::new(["sh", "-c", "echo started; exec sleep 30"])
            .log(&log)
            .spawn()?;
        wait_for("the log line", Duration::from_secs(10), || {
            Ok(p.log_text().contains("started").then_some(()))
        })?;
        let st = p.terminate(Duration::from_secs(10))?;
        assert!(!st.success());
        assert_eq!(p.log_path(), Some(log.as_path()));
        Ok(())
    }
}
