//! The sandbox the integration tests, the benchmarks and the demo run the real agent in: a
//! fresh network namespace (so the host's ruleset is never touched: every `nft` runs inside
//! it), cgroups created for the occasion under the cgroup2 mount, processes placed "in netns N,
//! cgroup C, as uid U", and the agent and its one-shot commands with a private run directory.
//!
//! ```no_run
//! use integration::{Sandbox, Probe, NOBODY, MONIT_V4};
//! let sb = Sandbox::new("example").expect("sandbox");
//! let agent_cg = sb.cgroup("agent").expect("cgroup");
//! let other = sb.cgroup("other").expect("cgroup");
//! let _monit = sb.listen(MONIT_V4).expect("listener");
//! let _agent = sb.start_agent(&agent_cg, "{}").expect("agent");
//! assert_eq!(sb.probe(&agent_cg, Some(NOBODY), MONIT_V4).expect("probe"), Probe::Connected);
//! assert_eq!(sb.probe(&other, Some(NOBODY), MONIT_V4).expect("probe"), Probe::TimedOut);
//! ```
//!
//! Everything is cleaned up by `Drop`, also when a test fails: processes the harness started
//! are killed by pid (never by name), then the cgroups it created are removed, then the
//! network namespace is unmounted, then the temporary directory is deleted. Processes must be
//! dropped before their [`Sandbox`] (declare them after it, as locals naturally are).
//!
//! No `unsafe` and no `pre_exec` hooks: a process is placed by wrapping its command in
//! `nsenter --net=<ns> -- sh -c 'echo $$ > <cgroup>/cgroup.procs; exec …'` (plus
//! `unshare --cgroup` and `setpriv` when asked), each of which execs the next, so the pid the
//! harness holds is the final program's.
#![forbid(unsafe_code)]

pub mod dav;
pub mod monit;
pub mod nats;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Monit's API on IPv4 loopback: what the agent's table protects.
pub const MONIT_V4: &str = "127.0.0.1:2822";
/// Monit's API on IPv6 loopback.
pub const MONIT_V6: &str = "[::1]:2822";
/// An unprivileged uid for "non-root" processes (nobody).
pub const NOBODY: u32 = 65534;
/// Where nft resolves `socket cgroupv2` paths (nft prefixes every path with it).
pub const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a probe waits for a connection that should be dropped. A SYN on loopback is
/// answered in microseconds, so a second distinguishes "dropped" from "slow" with a wide margin
/// while keeping the suite fast.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long the agent may take from start to its first successful apply.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for any one-shot command (nft, firewall-allow, status).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit code of the `sh` placement wrapper when the process could not be moved into its
/// cgroup: distinct from every code a test asserts on, so a failed placement can never pass
/// for "timed out" (dash exits 2 on a failed redirection).
const PLACEMENT_FAILED: i32 = 125;

/// What went wrong in the harness, with enough context to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Harness result.
pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

fn io_ctx(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error(format!("{what}: {e}"))
}

/// Polls `f` every 20 ms until it yields a value or `timeout` passes. `f` returning an error
/// stops the wait at once (e.g. the process being waited for died).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Prerequisites and tools

/// Checks what every sandbox needs and says what is missing: root, `nft`, the util-linux
/// tools, and a cgroup2 hierarchy. Tests call this through [`Sandbox::new`] and fail (never
/// skip) with the reason.
pub fn check_prerequisites() -> Result<()> {
    static CHECK: OnceLock<Result<()>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            let euid = nix::unistd::geteuid();
            if !euid.is_root() {
                return err(format!(
                    "the integration tests need root (network namespaces, cgroups, nft); running as euid {euid}"
                ));
            }
            for tool in ["nft", "unshare", "nsenter", "setpriv", "ip", "sh"] {
                if find_in_path(tool).is_none() {
                    let hint = if tool == "nft" { " (apt-get install nftables)" } else { "" };
                    return err(format!("{tool} is not on PATH{hint}"));
                }
            }
            cgroup2_mount().map(|_| ())
        })
        .clone()
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The cgroup2 mount, from the kernel's own answer (statfs magic): `/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    for p in [NFT_CGROUP_ROOT, "/sys/fs/cgroup/unified"] {
        if statfs(p)
            .map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
        {
            return Ok(PathBuf::from(p));
        }
    }
    err("no cgroup2 hierarchy: neither /sys/fs/cgroup nor /sys/fs/cgroup/unified is cgroup2")
}

/// The binaries under test.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `bosh-agent` (override: `BOSH_AGENT_BIN`).
    pub agent: PathBuf,
    /// `netprobe` of this crate (override: `NETPROBE_BIN`).
    pub netprobe: PathBuf,
}

impl Tools {
    /// Finds the binaries next to the running executable (`target/<profile>/`). Under cargo
    /// (`CARGO` is set), first runs `cargo build -p cli` for the same profile and target
    /// directory once per process, so the tests never run a stale agent: `cargo test -p
    /// integration` alone does not build another package's binary.
    pub fn get() -> Result<&'static Tools> {
        static TOOLS: OnceLock<Result<Tools>> = OnceLock::new();
        TOOLS
            .get_or_init(Tools::locate)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn locate() -> Result<Tools> {
        let exe = std::env::current_exe().map_err(io_ctx("current executable"))?;
        let mut bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if bin_dir.file_name() == Some(OsStr::new("deps")) {
            bin_dir.pop();
        }
        let agent = match std::env::var_os("BOSH_AGENT_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                if let Some(cargo) = std::env::var_os("CARGO") {
                    build_agent(&cargo, &bin_dir)?;
                }
                bin_dir.join("bosh-agent")
            }
        };
        let netprobe = std::env::var_os("NETPROBE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin_dir.join("netprobe"));
        for (p, how) in [
            (&agent, "cargo build -p cli"),
            (&netprobe, "cargo build -p integration"),
        ] {
            if !p.is_file() {
                return err(format!("{} does not exist: run `{how}` first", p.display()));
            }
        }
        Ok(Tools { agent, netprobe })
    }
}

fn build_agent(cargo: &OsStr, bin_dir: &Path) -> Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "cli", "--manifest-path"])
        .arg(&manifest);
    match bin_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target) = bin_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(600), "cargo build -p cli")?;
    if !out.status.success() {
        return err(format!(
            "cargo build -p cli failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Temporary directory, network namespace, cgroups

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Creates `<parent>/bosh-agent-test-<pid>-<n>`, skipping names left by an earlier run.
fn create_unique_dir(parent: &Path) -> Result<PathBuf> {
    for _ in 0..1000 {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!("bosh-agent-test-{}-{n}", std::process::id()));
        match fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return err(format!("creating {}: {e}", p.display())),
        }
    }
    err(format!("no free name under {}", parent.display()))
}

/// A temporary directory, deleted on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under the system temporary directory.
    pub fn new() -> Result<Self> {
        Ok(TempDir {
            path: create_unique_dir(&std::env::temp_dir())?,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("integration: removing {}: {e}", self.path.display());
        }
    }
}

/// A network namespace kept alive by a bind mount on a file (`unshare --net=<file>`), with
/// `lo` up. Entered with `nsenter --net=<file>`: unlike `ip netns exec`, that does not remount
/// /sys, so /sys/fs/cgroup stays visible to nft, which resolves cgroup paths there.
#[derive(Debug)]
pub struct Netns {
    file: PathBuf,
}

impl Netns {
    /// Creates the namespace, pinned at `file` (created; must not be in use).
    pub fn create(file: &Path) -> Result<Self> {
        File::create(file).map_err(io_ctx(format!("creating {}", file.display())))?;
        let mut cmd = Command::new("unshare");
        cmd.arg(format!("--net={}", file.display())).arg("true");
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT, "unshare --net")?;
        if !out.status.success() {
            let _ = fs::remove_file(file);
            return err(format!(
                "unshare --net={} failed: {}",
                file.display(),
                describe(&out)
            ));
        }
        let ns = Netns {
            file: file.to_path_buf(),
        };
        let out = run_with_timeout(
            ns.command(["ip", "link", "set", "lo", "up"]),
            COMMAND_TIMEOUT,
            "ip link",
        )?;
        if !out.status.success() {
            return err(format!("bringing lo up: {}", describe(&out)));
        }
        Ok(ns)
    }

    /// The bind-mounted namespace file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// A command that runs `argv` inside the namespace.
    pub fn command<I, S>(&self, argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("nsenter");
        cmd.arg(self.nsenter_arg()).arg("--").args(argv);
        cmd
    }

    fn nsenter_arg(&self) -> OsString {
        let mut a = OsString::from("--net=");
        a.push(&self.file);
        a
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The namespace (and every nft table in it) goes away with the last reference.
        if let Err(e) = nix::mount::umount2(&self.file, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("integration: unmounting {}: {e}", self.file.display());
        }
        let _ = fs::remove_file(&self.file);
    }
}

/// A cgroup directory (a plain handle: removal of the tree is [`Cgroup`]'s job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    path: PathBuf,
}

impl CgroupDir {
    /// A handle for an existing directory (e.g. the v2 root, for the "caller in the root
    /// cgroup" case).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        CgroupDir { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as nft and the agent's rule comments write it: relative to /sys/fs/cgroup
    /// (`unified/...` on hybrid hosts).
    pub fn nft_path(&self) -> String {
        self.path
            .strip_prefix(NFT_CGROUP_ROOT)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| self.path.to_string_lossy().into_owned())
    }

    /// The cgroup's inode: the id `socket cgroupv2` compares and `cgid=` records.
    pub fn inode(&self) -> Result<u64> {
        fs::metadata(&self.path)
            .map(|m| m.ino())
            .map_err(io_ctx(format!("stat {}", self.path.display())))
    }

    /// Pids in this cgroup (not its children).
    pub fn procs(&self) -> Result<Vec<u32>> {
        let f = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&f).map_err(io_ctx(format!("reading {}", f.display())))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// A child handle (not created).
    pub fn join(&self, name: &str) -> CgroupDir {
        CgroupDir {
            path: self.path.join(name),
        }
    }

    /// Creates the directory (and missing parents).
    pub fn create(&self) -> Result<()> {
        fs::create_dir_all(&self.path).map_err(io_ctx(format!("mkdir {}", self.path.display())))
    }

    /// Removes the directory and every cgroup below it; see [`remove_cgroup_tree`].
    pub fn remove(&self) -> Result<()> {
        remove_cgroup_tree(&self.path)
    }
}

/// A uniquely named cgroup under the cgroup2 mount (`<mount>/bosh-agent-test-<pid>-<n>`),
/// removed with everything below it on drop. Kills nothing: the processes the harness started
/// are gone by then, and anything else left inside is moved to the parent so the directory
/// can go.
#[derive(Debug)]
pub struct Cgroup {
    dir: CgroupDir,
}

impl Cgroup {
    /// Creates the cgroup under the detected cgroup2 mount.
    pub fn create() -> Result<Self> {
        let mount = cgroup2_mount()?;
        Ok(Cgroup {
            dir: CgroupDir {
                path: create_unique_dir(&mount)?,
            },
        })
    }

    /// The cgroup.
    pub fn dir(&self) -> &CgroupDir {
        &self.dir
    }

    /// Creates (if needed) and returns the child `name` (may contain `/`).
    pub fn child(&self, name: &str) -> Result<CgroupDir> {
        let c = self.dir.join(name);
        c.create()?;
        Ok(c)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup_tree(&self.dir.path) {
            eprintln!("integration: {e}");
        }
    }
}

/// Removes a cgroup and its descendants, deepest first. A cgroup whose processes are still
/// exiting is retried for a while; processes that stay are moved to the parent cgroup (never
/// killed: the harness only kills what it started).
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return err(format!("listing {}: {e}", dir.display())),
    };
    let mut first_error = Ok(());
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false)
            && let Err(x) = remove_cgroup_tree(&e.path())
        {
            first_error = first_error.and(Err(x));
        }
    }
    let start = Instant::now();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return first_error,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return first_error,
            Err(e) if start.elapsed() > Duration::from_secs(5) => {
                return err(format!("removing cgroup {}: {e}", dir.display()));
            }
            Err(_) => {
                if start.elapsed() > Duration::from_secs(1) {
                    move_to_parent(dir);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn move_to_parent(dir: &Path) {
    let (Ok(text), Some(parent)) = (fs::read_to_string(dir.join("cgroup.procs")), dir.parent())
    else {
        return;
    };
    for pid in text.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!(
            "integration: moving leftover pid {pid} from {} to {}",
            dir.display(),
            parent.display()
        );
        let _ = fs::write(parent.join("cgroup.procs"), pid);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A command placed "in netns N, cgroup C, as uid U". Build with [`Sandbox::exec`] or
/// [`Exec::new`], then [`Exec::spawn`] (long-running, output to a log file),
/// [`Exec::start`] (captured output, many at once) or [`Exec::output`].
#[derive(Debug, Clone)]
pub struct Exec {
    argv: Vec<OsString>,
    netns: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    uid: Option<u32>,
    cgroupns: bool,
    join_cgroupns: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    log: Option<PathBuf>,
    held: bool,
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
            cgroup: None,
            uid: None,
            cgroupns: false,
            join_cgroupns: None,
            env: Vec::new(),
            log: None,
            held: false,
        }
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

    /// Runs in cgroup `cg` (moved there before the program is executed, so every socket it
    /// opens belongs to `cg`).
    pub fn cgroup(mut self, cg: &CgroupDir) -> Self {
        self.cgroup = Some(cg.path.clone());
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

    /// The full command: `[nsenter --net=N --] [sh -c <move into C> sh C/cgroup.procs]
    /// [unshare --cgroup --] [nsenter --cgroup=P --] [setpriv --reuid=U ... --] argv`. Each wrapper execs the next.
    pub fn command(&self) -> Command {
        let mut words: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            let mut a = OsString::from("--net=");
            a.push(ns);
            words.extend(["nsenter".into(), a, "--".into()]);
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
    pub fn wait_in_cgroup(&mut self, cg: &CgroupDir, timeout: Duration) -> Result<()> {
        let pid = self.pid().to_string();
        let procs = cg.path().join("cgroup.procs");
        wait_for(
            &format!("{} to enter {}", self.label, cg.path().display()),
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

/// How a connection attempt ended (`netprobe connect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The handshake completed.
    Connected,
    /// Refused or reset.
    Refused,
    /// No answer within the timeout: the SYN was dropped.
    TimedOut,
    /// Anything else (with the output, to be shown in the assertion).
    Failed(String),
}

// ---------------------------------------------------------------------------------------------
// The agent

/// A running `bosh-agent` (its stderr log is printed if a test panics while it is alive).
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    run_dir: PathBuf,
}

impl Agent {
    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The agent's log (stderr).
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// The state file `firewall.json`, if present and readable.
    pub fn state(&self) -> Option<Value> {
        read_state(&self.run_dir)
    }

    /// Waits until this agent (by pid) has written its state file after a successful first
    /// apply; fails at once if the agent exits. Returns the state.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Value> {
        let pid = u64::from(self.pid());
        let run_dir = self.run_dir.clone();
        let proc = &mut self.proc;
        wait_for(
            "the agent's first firewall apply, read back (firewall.json)",
            timeout,
            || {
                if let Some(status) = proc.try_status()? {
                    return err(format!(
                        "the agent exited ({status}) before it was ready; log:\n{}",
                        proc.log_text()
                    ));
                }
                Ok(read_state(&run_dir).filter(|s| {
                    s["agent_pid"].as_u64() == Some(pid)
                        && s["applied_at"].as_u64().unwrap_or(0) > 0
                        && s["last_error"].is_null()
                        && s["readback_pending"] != true
                }))
            },
        )
        .map_err(|e| Error(format!("{e}\nagent log:\n{}", self.log())))
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc.terminate(Duration::from_secs(10))
    }

    /// Waits for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc.wait_timeout(timeout)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- agent {} log ----\n{}---- end of agent log ----",
                self.pid(),
                self.log()
            );
        }
    }
}

fn read_state(run_dir: &Path) -> Option<Value> {
    let bytes = fs::read(run_dir.join("firewall.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A rule of `monit_access_jobs`, as listed by nft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRule {
    /// Kernel handle.
    pub handle: u64,
    /// The comment (`bosh-monit-access:<key> cgid=<inode>`).
    pub comment: String,
    /// `<key>` of the comment: the cgroup path relative to /sys/fs/cgroup for plain cgroups.
    pub key: Option<String>,
    /// The cgroup inode recorded in the comment.
    pub cgid: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// The sandbox

/// One test's world: a temporary directory, a network namespace, a cgroup subtree, and a
/// private agent run directory shared by the agent and every one-shot command of the test.
/// Dropped in this order: cgroups, network namespace, directory.
#[derive(Debug)]
pub struct Sandbox {
    cgroup: Cgroup,
    netns: Netns,
    dir: TempDir,
    run_dir: PathBuf,
    tools: &'static Tools,
    name: String,
}

impl Sandbox {
    /// Creates a sandbox; fails with the reason when a prerequisite is missing.
    pub fn new(name: &str) -> Result<Self> {
        check_prerequisites()?;
        let tools = Tools::get()?;
        let dir = TempDir::new()?;
        let netns = Netns::create(&dir.path().join("netns"))?;
        let cgroup = Cgroup::create()?;
        let run_dir = dir.path().join("run");
        fs::create_dir(&run_dir).map_err(io_ctx("creating the run dir"))?;
        Ok(Sandbox {
            cgroup,
            netns,
            dir,
            run_dir,
            tools,
            name: name.to_string(),
        })
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an executable script `name` into the sandbox directory and returns its path.
    pub fn script(&self, name: &str, body: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir().join(name);
        fs::write(&path, body).map_err(io_ctx(format!("writing {}", path.display())))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(io_ctx(format!("chmod {}", path.display())))?;
        Ok(path)
    }

    /// An `nft` (for `BOSH_AGENT_NFT`) that refuses the agent's self-test rules, as a kernel
    /// without `socket` support would, and passes everything else to the real nft: the agent
    /// then falls back to uid matching.
    pub fn nft_refusing_selftest(&self) -> Result<PathBuf> {
        self.script(
            "nft-without-selftest",
            "#!/bin/sh\n\
             if [ \"$1\" = -f ] && [ \"$2\" = - ]; then\n\
               s=$(cat)\n\
               case \"$s\" in *'comment \"level='*) echo 'Error: Could not process rule: No such file or directory (simulated)' >&2; exit 1;; esac\n\
               printf '%s\\n' \"$s\" | exec nft -f -\n\
             fi\n\
             exec nft \"$@\"\n",
        )
    }

    /// The agent run directory (`BOSH_AGENT_RUN_DIR` of everything started here).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The network namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The binaries.
    pub fn tools(&self) -> &Tools {
        self.tools
    }

    /// The sandbox's own cgroup (everything it creates is below it).
    pub fn top_cgroup(&self) -> &CgroupDir {
        self.cgroup.dir()
    }

    /// Creates (if needed) the cgroup `name` below the sandbox's cgroup.
    pub fn cgroup(&self, name: &str) -> Result<CgroupDir> {
        self.cgroup.child(name)
    }

    /// A fresh log file path in the sandbox directory.
    pub fn log_path(&self, label: &str) -> PathBuf {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        self.dir().join(format!("{label}-{n}.log"))
    }

    /// `argv` in this sandbox's network namespace, with its run directory.
    pub fn exec<I, S>(&self, argv: I) -> Exec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Exec::new(argv)
            .netns(self.netns.file())
            .env("BOSH_AGENT_RUN_DIR", &self.run_dir)
    }

    /// `bosh-agent <args>` in this sandbox.
    pub fn agent_cmd<I, S>(&self, args: I) -> Exec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv: Vec<OsString> = vec![self.tools.agent.clone().into_os_string()];
        argv.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self.exec(argv)
    }

    /// Runs `nft <args>` in the namespace.
    pub fn nft<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv: Vec<OsString> = vec!["nft".into()];
        argv.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self.exec(argv).output(COMMAND_TIMEOUT)
    }

    /// Applies an nft script (one transaction) in the namespace; fails with nft's message.
    pub fn nft_script(&self, script: &str) -> Result<()> {
        let path = self.log_path("script").with_extension("nft");
        fs::write(&path, script).map_err(io_ctx(format!("writing {}", path.display())))?;
        let out = self.nft([OsStr::new("-f"), path.as_os_str()])?;
        if !out.status.success() {
            return err(format!(
                "nft -f failed: {}\nscript:\n{script}",
                describe(&out)
            ));
        }
        Ok(())
    }

    /// `nft -j list <what>`, or `None` when the object does not exist.
    pub fn nft_json(&self, what: &[&str]) -> Result<Option<Value>> {
        let mut args = vec!["-j", "list"];
        args.extend_from_slice(what);
        let out = self.nft(&args)?;
        if !out.status.success() {
            if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
                return Ok(None);
            }
            return err(format!("nft {}: {}", args.join(" "), describe(&out)));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| Error(format!("nft {} printed invalid JSON: {e}", args.join(" "))))
    }

    /// Whether `table inet bosh_agent` exists in the namespace.
    pub fn agent_table_present(&self) -> Result<bool> {
        Ok(self.nft_json(&["table", "inet", "bosh_agent"])?.is_some())
    }

    /// The rules of `monit_access_jobs`, in chain order (empty if the chain is absent).
    pub fn job_rules(&self) -> Result<Vec<JobRule>> {
        let Some(listing) = self.nft_json(&["chain", "inet", "bosh_agent", "monit_access_jobs"])?
        else {
            return Ok(Vec::new());
        };
        Ok(rules_of(&listing)
            .filter(|r| r["chain"] == "monit_access_jobs")
            .map(|r| {
                let comment = r["comment"].as_str().unwrap_or_default().to_string();
                let (key, cgid) = match comment.strip_prefix("bosh-monit-access:") {
                    Some(rest) => match rest.rsplit_once(" cgid=") {
                        Some((k, id)) => (Some(k.to_string()), id.parse().ok()),
                        None => (Some(rest.to_string()), None),
                    },
                    None => (None, None),
                };
                JobRule {
                    handle: r["handle"].as_u64().unwrap_or_default(),
                    comment,
                    key,
                    cgid,
                }
            })
            .collect())
    }

    /// The job rules whose key is `cg`'s path.
    pub fn job_rules_for(&self, cg: &CgroupDir) -> Result<Vec<JobRule>> {
        let key = cg.nft_path();
        Ok(self
            .job_rules()?
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .collect())
    }

    /// Packet counters of a chain's rules, keyed by rule comment (rules without a comment or
    /// a counter are left out).
    pub fn counters(&self, family: &str, table: &str, chain: &str) -> Result<Vec<(String, u64)>> {
        let listing = self
            .nft_json(&["chain", family, table, chain])?
            .ok_or_else(|| Error(format!("chain {family} {table} {chain} does not exist")))?;
        Ok(rules_of(&listing)
            .filter_map(|r| {
                let comment = r["comment"].as_str()?.to_string();
                let packets = r["expr"]
                    .as_array()?
                    .iter()
                    .find_map(|e| e.get("counter")?.get("packets")?.as_u64())?;
                Some((comment, packets))
            })
            .collect())
    }

    /// Starts `netprobe listen <addr>` (as root, in the sandbox's cgroup) and waits until it
    /// listens.
    pub fn listen(&self, addr: &str) -> Result<Proc> {
        let cg = self.cgroup("listener")?;
        let log = self.log_path("listener");
        let mut p = self
            .exec([
                self.tools.netprobe.as_os_str(),
                OsStr::new("listen"),
                OsStr::new(addr),
            ])
            .cgroup(&cg)
            .log(&log)
            .spawn()?;
        wait_for(
            &format!("a listener on {addr}"),
            Duration::from_secs(10),
            || {
                if let Some(s) = p.try_status()? {
                    return err(format!(
                        "netprobe listen {addr} exited ({s}): {}",
                        p.log_text()
                    ));
                }
                Ok(p.log_text().contains("listening").then_some(()))
            },
        )?;
        Ok(p)
    }

    /// `netprobe connect <addr>` from cgroup `cg` as `uid` (root when `None`), with
    /// [`PROBE_TIMEOUT`].
    pub fn probe(&self, cg: &CgroupDir, uid: Option<u32>, addr: &str) -> Result<Probe> {
        self.probe_timeout(cg, uid, addr, PROBE_TIMEOUT)
    }

    /// Like [`Sandbox::probe`] with an explicit timeout.
    pub fn probe_timeout(
        &self,
        cg: &CgroupDir,
        uid: Option<u32>,
        addr: &str,
        timeout: Duration,
    ) -> Result<Probe> {
        let ms = timeout.as_millis().to_string();
        let out = self
            .exec([
                self.tools.netprobe.as_os_str(),
                OsStr::new("connect"),
                OsStr::new(addr),
                OsStr::new("--timeout-ms"),
                OsStr::new(&ms),
            ])
            .cgroup(cg)
            .user(uid)
            .output(timeout + COMMAND_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Only netprobe's own verdicts count: a wrapper failing (nsenter, setpriv) also exits 1.
        Ok(match out.status.code() {
            Some(0) => Probe::Connected,
            Some(1) if stderr.contains("netprobe: connect") => Probe::Refused,
            Some(2) if stderr.contains("netprobe: connect") => Probe::TimedOut,
            _ => Probe::Failed(describe(&out)),
        })
    }

    /// `netprobe chat`: one connection, `messages` echo round trips `interval` apart.
    pub fn chat(
        &self,
        cg: &CgroupDir,
        uid: Option<u32>,
        addr: &str,
        messages: u32,
        interval: Duration,
    ) -> Result<Output> {
        let (n, ms) = (messages.to_string(), interval.as_millis().to_string());
        let timeout = PROBE_TIMEOUT.as_millis().to_string();
        let argv = [
            self.tools.netprobe.as_os_str(),
            OsStr::new("chat"),
            OsStr::new(addr),
            OsStr::new("--messages"),
            OsStr::new(&n),
            OsStr::new("--interval-ms"),
            OsStr::new(&ms),
            OsStr::new("--timeout-ms"),
            OsStr::new(&timeout),
        ];
        self.exec(argv)
            .cgroup(cg)
            .user(uid)
            .output(interval * messages + COMMAND_TIMEOUT)
    }

    /// Writes `config` as a fresh agent.json in the sandbox directory and returns its path.
    pub fn write_agent_config(&self, config: &str) -> Result<PathBuf> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let conf = self.dir().join(format!("agent-{n}.json"));
        fs::write(&conf, config).map_err(io_ctx(format!("writing {}", conf.display())))?;
        Ok(conf)
    }

    /// The agent's start command (`bosh-agent -P ubuntu -C <conf> -b <dir>/base`) placed in
    /// `cg`, logging to `<conf>.log`; adjust it (e.g. [`Exec::cgroupns`]) before
    /// [`Sandbox::spawn_agent`].
    pub fn agent_exec_with(&self, cg: &CgroupDir, conf: &Path) -> Result<Exec> {
        let base = self.dir().join("base");
        fs::create_dir_all(&base).map_err(io_ctx("creating the base dir"))?;
        let args = [
            OsStr::new("-P"),
            OsStr::new("ubuntu"),
            OsStr::new("-C"),
            conf.as_os_str(),
            OsStr::new("-b"),
            base.as_os_str(),
        ];
        // Trusted certificates from update_settings go to the sandbox, and the system's
        // certificate store is never rebuilt by a test.
        let ca_dir = self.dir().join("ca-certificates");
        Ok(self
            .agent_cmd(args)
            .cgroup(cg)
            .log(&conf.with_extension("log"))
            .env("BOSH_AGENT_CA_CERTS_DIR", &ca_dir)
            .env("BOSH_AGENT_UPDATE_CA_CERTIFICATES", "/bin/true"))
    }

    /// [`Sandbox::write_agent_config`] then [`Sandbox::agent_exec_with`].
    pub fn agent_exec(&self, cg: &CgroupDir, config: &str) -> Result<Exec> {
        let conf = self.write_agent_config(config)?;
        self.agent_exec_with(cg, &conf)
    }

    /// Starts an agent from a prepared command without waiting for it.
    pub fn spawn_agent(&self, exec: &Exec) -> Result<Agent> {
        Ok(Agent {
            proc: exec.spawn()?,
            run_dir: self.run_dir.clone(),
        })
    }

    /// Starts the agent in `cg` with `config` as agent.json and waits until its firewall is
    /// installed.
    pub fn start_agent(&self, cg: &CgroupDir, config: &str) -> Result<Agent> {
        let mut a = self.spawn_agent(&self.agent_exec(cg, config)?)?;
        a.wait_ready(READY_TIMEOUT)?;
        Ok(a)
    }

    /// `bosh-agent firewall-allow monit`, run as root from cgroup `cg`.
    pub fn firewall_allow(&self, cg: &CgroupDir) -> Result<Output> {
        self.agent_cmd(["firewall-allow", "monit"])
            .cgroup(cg)
            .output(COMMAND_TIMEOUT)
    }

    /// `bosh-agent firewall status --json`: the exit code and the parsed JSON.
    pub fn status(&self) -> Result<(i32, Value)> {
        let out = self
            .agent_cmd(["firewall", "status", "--json"])
            .output(COMMAND_TIMEOUT)?;
        let v = serde_json::from_slice(&out.stdout).map_err(|e| {
            Error(format!(
                "firewall status --json printed no JSON ({e}): {}",
                describe(&out)
            ))
        })?;
        Ok((out.status.code().unwrap_or(-1), v))
    }

    /// The sandbox's name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn rules_of(listing: &Value) -> impl Iterator<Item = &Value> {
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule"))
}
