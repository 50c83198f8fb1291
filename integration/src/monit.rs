//! A real monit (Debian's `/usr/bin/monit`) for a [`Sandbox`]: a generated control file in the
//! stemcell's place (`<base>/bosh/etc/monitrc`, which the agent passes to `monit -c` for
//! `stop -g vcap`), its HTTP API on 127.0.0.1:2822 inside the sandbox's network namespace with
//! `allow cleartext <base>/monit/monit.user`, alerts mailed to the agent's SMTP receiver on
//! 127.0.0.1:2825 in upstream's mail format, and one sample job
//! of group `vcap` that can run, fail and stop.
//!
//! ```no_run
//! use integration::{Sandbox, monit::Monit};
//! let sb = Sandbox::new("example").expect("sandbox");
//! let mut monit = Monit::prepare(&sb).expect("monitrc and monit.user");
//! // … start the agent with `-b monit.base()`: it keeps the monit.user written here …
//! monit.start().expect("monit running");
//! monit.wait_sample_running(std::time::Duration::from_secs(10)).expect("sample running");
//! let summary = monit.cli(&["summary"]).expect("monit summary");
//! ```
//!
//! Monit runs in the namespace and in a cgroup of its own (`monit`), as root, in the
//! foreground (`-I`); the sample job's processes inherit that cgroup. Its pid, state, id,
//! log and event queue files live in `<sandbox>/monit/`. On drop monit is killed by pid, then
//! every process left in its cgroup (what its jobs started) is killed by pid.
//!
//! The sample job (`check process sample`, pidfile `<sandbox>/sample/sample.pid`): its start
//! program backgrounds a `sleep` and records its pid; its stop program kills it; while
//! `<sandbox>/sample/sample.fail` exists the start program exits 1 without starting anything,
//! so monit sees the job fail.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;
use testkit::monit::{ControlFile, MonitDaemon};
use testkit::{Place, io_ctx as io_err, signal_pid};

use crate::{CgroupDir, Error, Result, Sandbox, describe, wait_for};

pub use testkit::alive;
pub use testkit::monit::{MONIT_BIN, START_TIMEOUT};
/// The sample job's service name.
pub const SAMPLE: &str = "sample";
/// The group the agent supervises.
pub const GROUP: &str = "vcap";

/// A monit for one sandbox; see the module documentation.
#[derive(Debug)]
pub struct Monit {
    base: PathBuf,
    control_file: PathBuf,
    run_dir: PathBuf,
    sample_dir: PathBuf,
    netns: PathBuf,
    mountns: Option<PathBuf>,
    cgroup: CgroupDir,
    cli_cgroup: CgroupDir,
    user: String,
    password: String,
    daemon: Option<MonitDaemon>,
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
    }
    fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

const SAMPLE_SCRIPT: &str = "#!/bin/sh
# The sample job: `start` backgrounds a sleep and records its pid, unless @DIR@/sample.fail
# exists; `stop` kills the recorded process.
case \"$1\" in
  start)
    if [ -f @DIR@/sample.fail ]; then
      echo \"sample: refusing to start (@DIR@/sample.fail exists)\" >&2
      exit 1
    fi
    /bin/sleep 900 >/dev/null 2>&1 </dev/null &
    echo $! > @DIR@/sample.pid ;;
  stop)
    [ -f @DIR@/sample.pid ] && /bin/kill $(/bin/cat @DIR@/sample.pid)
    /bin/rm -f @DIR@/sample.pid ;;
esac
exit 0
";

impl Monit {
    /// Writes the control file, the sample job and `<base>/monit/monit.user` (a well-formed
    /// existing one is kept, as the agent does), where `<base>` is the base directory the
    /// harness gives the agent (`<sandbox>/base`). Does not start monit.
    pub fn prepare(sb: &Sandbox) -> Result<Self> {
        Self::prepare_with(sb, "")
    }

    /// [`Monit::prepare`] with `extra` appended to the control file (more checks). `@DIR@` in
    /// it stands for the sample directory.
    pub fn prepare_with(sb: &Sandbox, extra: &str) -> Result<Self> {
        testkit::require_binary(Path::new(MONIT_BIN), "monit")?;
        let base = sb.dir().join("base");
        let run_dir = sb.dir().join("monit");
        let sample_dir = sb.dir().join("sample");
        for d in [&base, &run_dir, &sample_dir] {
            fs::create_dir_all(d).map_err(io_err(format!("mkdir {}", d.display())))?;
        }
        let user_file = base.join("monit").join("monit.user");
        let existing = fs::read_to_string(&user_file).ok().and_then(|t| {
            let line = t.lines().next()?.to_string();
            let (u, p) = line.split_once(':')?;
            (!u.is_empty() && !p.is_empty()).then(|| (u.to_string(), p.to_string()))
        });
        let (user, password) = match existing {
            Some(c) => c,
            None => {
                let c = ("vcap".to_string(), random_hex(16)?);
                write_file(&user_file, &format!("{}:{}", c.0, c.1), 0o600)?;
                c
            }
        };

        let sd = sample_dir.display().to_string();
        write_file(
            &sample_dir.join("sample.sh"),
            &SAMPLE_SCRIPT.replace("@DIR@", &sd),
            0o755,
        )?;
        let control_file = base.join("bosh").join("etc").join("monitrc");
        let rd = run_dir.display();
        ControlFile {
            port: 2822,
            user_file: user_file.clone(),
            run_dir: run_dir.clone(),
            body: format!(
                "set eventqueue basedir {rd}/events slots 100\n\
                 set mailserver 127.0.0.1 port 2825\n\
                 set alert agent@local\n\
                 set mail-format {{\n  from: monit@localhost\n  subject: Monit Alert\n  \
                 message: Service: $SERVICE\nEvent: $EVENT\nAction: $ACTION\nDate: $DATE\n\
                 Description: $DESCRIPTION\n}}\n\n\
                 check process {SAMPLE} with pidfile {sd}/sample.pid\n  \
                 start program \"{sd}/sample.sh start\" with timeout 5 seconds\n  \
                 stop program \"{sd}/sample.sh stop\"\n  group {GROUP}\n{extra}\n",
                extra = extra.replace("@DIR@", &sd),
            ),
        }
        .write(&control_file)?;
        Ok(Monit {
            base,
            control_file,
            run_dir,
            sample_dir,
            netns: sb.netns().file().to_path_buf(),
            mountns: None,
            cgroup: sb.cgroup("monit")?,
            cli_cgroup: sb.cgroup("monit-cli")?,
            user,
            password,
            daemon: None,
        })
    }

    /// Runs the daemon (and so its jobs) and the CLI in the mount namespace at `file` from
    /// the next [`Monit::start`] on: a simulated VM whose disks the agent mounts there.
    pub fn set_mount_namespace(&mut self, file: &Path) {
        self.mountns = Some(file.to_path_buf());
    }

    /// Starts `monit -I -c <control file>` in the namespace and its cgroup, and waits until
    /// its CLI gets an answer from the daemon (`monit summary`).
    pub fn start(&mut self) -> Result<()> {
        if self.daemon.is_some() {
            return Err(Error("monit is already running".into()));
        }
        let daemon = MonitDaemon::start(
            Path::new(MONIT_BIN),
            &self.control_file,
            &self.place(&self.cgroup),
            &self.place(&self.cli_cgroup),
            &self.run_dir.join("monit.out"),
        );
        match daemon {
            Ok(d) => {
                self.daemon = Some(d);
                Ok(())
            }
            Err(e) => Err(Error(format!("{e}\n{}", self.log()))),
        }
    }

    fn place(&self, cg: &CgroupDir) -> Place {
        Place {
            netns: Some(self.netns.clone()),
            mountns: self.mountns.clone(),
            cgroup: Some(cg.path().to_path_buf()),
        }
    }

    /// Runs `monit -c <control file> <args>` as root in the namespace, from a cgroup of its
    /// own (root is let through by the agent's default `MonitAllowRoot`).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_in(&self.cli_cgroup, args)
    }

    /// [`Monit::cli`] from cgroup `cg`.
    pub fn cli_in(&self, cg: &CgroupDir, args: &[&str]) -> Result<Output> {
        testkit::monit::cli(
            Path::new(MONIT_BIN),
            &self.control_file,
            &self.place(cg),
            args,
        )
    }

    /// `monit status <service>` as `(key, value)` lines (`status`, `monitoring status`, `pid`…).
    pub fn service_status(&self, service: &str) -> Result<Vec<(String, String)>> {
        let out = self.cli(&["status", service])?;
        if !out.status.success() {
            return Err(Error(format!("monit status {service}: {}", describe(&out))));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let (k, v) = l.split_once("  ")?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect())
    }

    /// One field of [`Monit::service_status`] (e.g. `monitoring status`).
    pub fn service_field(&self, service: &str, key: &str) -> Result<Option<String>> {
        Ok(self
            .service_status(service)?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v))
    }

    /// The agent's base directory (`<sandbox>/base`).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The control file (`<base>/bosh/etc/monitrc`).
    pub fn control_file(&self) -> &Path {
        &self.control_file
    }

    /// Where monit's pid, state, id, log and event files are.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The sample job's directory (script, pid file, fail switch).
    pub fn sample_dir(&self) -> &Path {
        &self.sample_dir
    }

    /// Monit's cgroup (the sample job's processes run in it).
    pub fn cgroup(&self) -> &CgroupDir {
        &self.cgroup
    }

    /// The credentials of `monit.user`.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.user, &self.password)
    }

    /// Monit's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(MonitDaemon::pid)
    }

    /// Monit's log file and its stdout/stderr.
    pub fn log(&self) -> String {
        let file = fs::read_to_string(self.run_dir.join("monit.log")).unwrap_or_default();
        let out = self
            .daemon
            .as_ref()
            .map(MonitDaemon::output_text)
            .unwrap_or_default();
        format!("monit.log:\n{file}\nmonit stdout/stderr:\n{out}")
    }

    /// The sample's recorded pid, if its pid file exists.
    pub fn sample_pid(&self) -> Option<u32> {
        fs::read_to_string(self.sample_dir.join("sample.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the sample's recorded process is alive; returns its pid.
    pub fn wait_sample_running(&self, timeout: Duration) -> Result<u32> {
        wait_for("the sample job's process", timeout, || {
            Ok(self.sample_pid().filter(|p| alive(*p)))
        })
        .map_err(|e| Error(format!("{e}\n{}", self.log())))
    }

    /// Waits until the sample has no live process.
    pub fn wait_sample_gone(&self, timeout: Duration) -> Result<()> {
        wait_for("the sample job's process to be gone", timeout, || {
            Ok(self.sample_pid().is_none_or(|p| !alive(p)).then_some(()))
        })
    }

    /// Kills the sample's process behind monit's back (SIGKILL by pid); returns the pid.
    pub fn kill_sample(&self) -> Result<u32> {
        let pid = self
            .sample_pid()
            .ok_or_else(|| Error("the sample job has no pid file".into()))?;
        signal_pid(pid, Signal::SIGKILL)?;
        Ok(pid)
    }

    /// Makes the sample's start program fail (`true`) or work again (`false`).
    pub fn set_sample_failing(&self, failing: bool) -> Result<()> {
        let flag = self.sample_dir.join("sample.fail");
        if failing {
            fs::write(&flag, "").map_err(io_err(format!("writing {}", flag.display())))
        } else {
            match fs::remove_file(&flag) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error(format!("removing {}: {e}", flag.display()))),
            }
        }
    }

    /// Stops monit (SIGTERM, then SIGKILL by drop if it lingers) and kills by pid what its
    /// jobs left in its cgroup.
    pub fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            // On a timeout the daemon is dropped, which kills it by pid.
            let _ = d.stop(Duration::from_secs(5));
        }
        self.kill_leftovers();
    }

    /// Kills (by pid) every process left in monit's cgroup: monit started them all.
    fn kill_leftovers(&self) {
        let res = wait_for("monit's cgroup to empty", Duration::from_secs(5), || {
            let pids = self.cgroup.procs().unwrap_or_default();
            for pid in &pids {
                let _ = signal_pid(*pid, Signal::SIGKILL);
            }
            Ok(pids.is_empty().then_some(()))
        });
        if let Err(e) = res {
            eprintln!("integration: {e}");
        }
    }
}

impl Drop for Monit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- monit ----\n{}\n---- end of monit ----", self.log());
        }
        // The daemon's drop kills monit by pid (SIGKILL) and reaps it.
        drop(self.daemon.take());
        self.kill_leftovers();
    }
}
