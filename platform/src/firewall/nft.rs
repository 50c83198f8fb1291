//! Running `nft`: one `nft -f -` per change (one kernel transaction), and JSON listings of the
//! agent's own table only (never the whole ruleset: older nft binaries can fail to parse
//! other tools' objects).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{FirewallError, TABLE};

/// How to invoke nft. The binary can be overridden with `BOSH_AGENT_NFT` (tests point it at a
/// wrapper that fails on purpose).
#[derive(Debug, Clone)]
pub struct Nft {
    bin: PathBuf,
}

impl Default for Nft {
    fn default() -> Self {
        let bin = std::env::var_os("BOSH_AGENT_NFT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nft"));
        Nft { bin }
    }
}

impl Nft {
    /// An nft runner using a specific binary.
    pub fn with_binary(bin: impl Into<PathBuf>) -> Self {
        Nft { bin: bin.into() }
    }

    /// Applies `script` as one transaction with `nft -f -`: all of it takes effect or none.
    /// The error carries nft's own message.
    pub fn apply(&self, script: &str) -> Result<(), FirewallError> {
        self.run_script(&["-f", "-"], "apply", script)
    }

    /// Checks `script` with `nft --check -f -`: the kernel validates the transaction (and
    /// loads the modules its expressions need) and then aborts it, so nothing changes. Hook
    /// restrictions are checked only at a real commit.
    pub fn check(&self, script: &str) -> Result<(), FirewallError> {
        self.run_script(&["--check", "-f", "-"], "check", script)
    }

    fn run_script(&self, args: &[&str], action: &str, script: &str) -> Result<(), FirewallError> {
        let words = args.join(" ");
        // nft commits whatever it read when its input ends. Fed through a pipe, an agent
        // killed half-way through a write larger than the pipe leaves nft a prefix that can
        // parse, and commit, as a transaction of its own (a flushed chain without its new
        // rules). A sealed file is complete before nft starts: all of it or nothing.
        let sealed = sealed_script(script);
        let stdin = match &sealed {
            Ok(f) => f
                .try_clone()
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::piped()),
            Err(_) => Stdio::piped(),
        };
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| FirewallError::Spawn {
                cmd: self.describe(&words),
                source,
            })?;
        drop(sealed);
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means nft exited early; its stderr explains why.
            let _ = stdin.write_all(script.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| FirewallError::Spawn {
                cmd: self.describe(&words),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FirewallError::Nft {
                action: action.into(),
                code: out.status.code(),
                stderr: one_line(&out.stderr),
            })
        }
    }

    /// `nft -j list <what>` of an object of the agent's table. `Ok(None)` when the table or
    /// chain does not exist.
    ///
    /// nft prints a `socket cgroupv2` match by walking `/sys/fs/cgroup` and stat-ing every
    /// file until it finds the rule's inode — once per rule, on every listing (40 ms for 30
    /// job rules on a hybrid host, growing with cgroups × rules). So the listing runs from a
    /// thread with a private mount namespace in which an empty tmpfs hides `/sys/fs/cgroup`:
    /// nft then prints the exact inode number at no cost. Where that cannot be set up (no
    /// CAP_SYS_ADMIN), it lists normally and prints paths; readers accept both.
    pub fn list_json(&self, what: &[&str]) -> Result<Option<Value>, FirewallError> {
        let Some(out) = self.list(true, what)? else {
            return Ok(None);
        };
        serde_json::from_slice(&out)
            .map(Some)
            .map_err(|e| FirewallError::Parse {
                context: format!("list {}", what.join(" ")),
                detail: e.to_string(),
            })
    }

    /// `nft list <what>` as text (same hidden-cgroup listing as [`Nft::list_json`]). Unlike
    /// nft 1.0.6's JSON, the text keeps the `level` of `socket cgroupv2` matches, so it is what
    /// drift is detected on.
    pub fn list_text(&self, what: &[&str]) -> Result<Option<String>, FirewallError> {
        Ok(self
            .list(false, what)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Text listing of the whole agent table, or `None` when it does not exist.
    pub fn list_table_text(&self) -> Result<Option<String>, FirewallError> {
        self.list_text(&["table", "inet", TABLE])
    }

    fn list(&self, json: bool, what: &[&str]) -> Result<Option<Vec<u8>>, FirewallError> {
        let mut args = if json {
            vec!["-j", "list"]
        } else {
            vec!["list"]
        };
        args.extend_from_slice(what);
        let out = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // Errors only mean nft will walk the real tree: slower, still correct.
                    let _ = hide_cgroup_fs();
                    Command::new(&self.bin)
                        .args(&args)
                        .stdin(Stdio::null())
                        .output()
                })
                .join()
        })
        .map_err(|_| FirewallError::Parse {
            context: "list".into(),
            detail: "listing thread panicked".into(),
        })?
        .map_err(|source| FirewallError::Spawn {
            cmd: self.describe(&args.join(" ")),
            source,
        })?;
        if !out.status.success() {
            let stderr = one_line(&out.stderr);
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(FirewallError::Nft {
                action: format!("list {}", what.join(" ")),
                code: out.status.code(),
                stderr,
            });
        }
        Ok(Some(out.stdout))
    }

    /// JSON listing of the whole agent table, or `None` when it does not exist.
    pub fn list_table(&self) -> Result<Option<Value>, FirewallError> {
        self.list_json(&["table", "inet", TABLE])
    }

    /// JSON listing of one chain of the agent table, or `None` when it does not exist.
    pub fn list_chain(&self, chain: &str) -> Result<Option<Value>, FirewallError> {
        self.list_json(&["chain", "inet", TABLE, chain])
    }

    fn describe(&self, args: &str) -> String {
        format!("{} {args}", self.bin.display())
    }
}

/// nft's message on one line: its lines (error, offending script line, `^^^` marker) joined
/// with " | ", so a caller can print a one-line reason that is still nft's own words.
pub fn one_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == '~'))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Gives the calling thread a private mount namespace with an empty, read-only tmpfs over
/// `/sys/fs/cgroup`. Only this thread (and the processes it spawns) see it; the mount
/// namespace goes away with them. Nothing of the host's mounts changes.
fn hide_cgroup_fs() -> nix::Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    // Private first, so the tmpfs below cannot propagate back to the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    mount(
        Some("bosh-agent-hidden"),
        crate::cgroup::NFT_CGROUP_ROOT,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k"),
    )
}

/// Directory of the agent's runtime state (`firewall.json`, the lock). `/run/bosh-agent`
/// unless `BOSH_AGENT_RUN_DIR` says otherwise (tests give each agent its own).
pub fn run_dir() -> PathBuf {
    std::env::var_os("BOSH_AGENT_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/bosh-agent"))
}

/// An exclusive lock serialising read-modify-write changes of the table between the agent
/// and concurrent `firewall-allow` calls. Released on drop.
pub struct FirewallLock {
    _lock: nix::fcntl::Flock<File>,
}

/// How long a holder of the firewall lock may keep the agent waiting, and how often the wait
/// is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockWait {
    /// Give up with [`FirewallError::LockTimeout`] after this long.
    pub bound: Duration,
    /// Warn (naming the lock file and the time waited) this often while waiting.
    pub warn_every: Duration,
}

impl Default for LockWait {
    /// Warn every 15 s, give up after 5 minutes: `firewall-allow` holds the lock for
    /// milliseconds, so a holder this slow is hung, and the caller retries later.
    fn default() -> Self {
        LockWait {
            bound: Duration::from_secs(300),
            warn_every: Duration::from_secs(15),
        }
    }
}

/// How often a bounded wait tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(20);

impl FirewallLock {
    fn open(dir: &Path) -> Result<(PathBuf, File), FirewallError> {
        let io = |path: PathBuf| move |source| FirewallError::Io { path, source };
        fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
        let path = dir.join("firewall.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(path.clone()))?;
        Ok((path, file))
    }

    /// Blocks until the lock in `dir` is held (the one-shot commands: their caller bounds
    /// them).
    pub fn acquire(dir: &Path) -> Result<Self, FirewallError> {
        let (path, file) = Self::open(dir)?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, errno)| FirewallError::Io {
                path,
                source: errno.into(),
            },
        )?;
        Ok(FirewallLock { _lock: lock })
    }

    /// Takes the lock in `dir`, waiting at most `wait.bound`; warns every `wait.warn_every`
    /// while another process holds it. Blocks the calling thread (run it off the async
    /// runtime).
    pub fn acquire_within(dir: &Path, wait: LockWait) -> Result<Self, FirewallError> {
        let (path, mut file) = Self::open(dir)?;
        let start = Instant::now();
        let mut next_warning = wait.warn_every;
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    if start.elapsed() >= wait.warn_every {
                        tracing::info!(lock = %path.display(), waited_secs = start.elapsed().as_secs(), "firewall lock taken after waiting");
                    }
                    return Ok(FirewallLock { _lock: lock });
                }
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
                Err((_, errno)) => {
                    return Err(FirewallError::Io {
                        path,
                        source: errno.into(),
                    });
                }
            }
            let waited = start.elapsed();
            if waited >= wait.bound {
                return Err(FirewallError::LockTimeout {
                    path,
                    waited_secs: waited.as_secs(),
                });
            }
            if waited >= next_warning {
                tracing::warn!(lock = %path.display(), waited_secs = waited.as_secs(), bound_secs = wait.bound.as_secs(), "waiting for the firewall lock held by another process");
                next_warning += wait.warn_every;
            }
            std::thread::sleep(LOCK_POLL);
        }
    }
}

/// `script` in an unnamed file (`O_TMPFILE` in the temporary directory, mode 0600, gone when
/// the last descriptor closes), rewound for reading.
fn sealed_script(script: &str) -> std::io::Result<File> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    use std::io::{Seek, SeekFrom};
    let fd = open(
        std::env::temp_dir().as_path(),
        OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )?;
    let mut f = File::from(fd);
    f.write_all(script.as_bytes())?;
    f.seek(SeekFrom::Start(0))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_held_lock_is_waited_for_within_the_bound_then_refused() {
        let dir = std::env::temp_dir().join(format!("fw-lock-{}", std::process::id()));
        let held = FirewallLock::acquire(&dir).unwrap();
        let wait = LockWait {
            bound: Duration::from_millis(200),
            warn_every: Duration::from_millis(50),
        };
        let e = FirewallLock::acquire_within(&dir, wait).err().unwrap();
        assert!(matches!(e, FirewallError::LockTimeout { .. }), "{e}");
        assert!(e.to_string().contains("firewall.lock"), "{e}");
        drop(held);
        let again = FirewallLock::acquire_within(&dir, wait).unwrap();
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nft_errors_become_one_line_without_markers() {
        let e = b"/dev/stdin:3:62-80: Error: cgroupv2 path fails: No such file or directory\nadd rule inet x y socket cgroupv2 level 2 \"a\" accept\n                        ^^^^^^^^^\n";
        assert_eq!(
            one_line(e),
            "/dev/stdin:3:62-80: Error: cgroupv2 path fails: No such file or directory | add rule inet x y socket cgroupv2 level 2 \"a\" accept"
        );
        assert_eq!(one_line(b""), "");
    }
}
