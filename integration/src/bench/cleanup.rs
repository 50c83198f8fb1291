//! Cleanup for when `Drop` cannot run: the release profile aborts on panic, and SIGINT or
//! SIGTERM end the process. Every sandbox a benchmark makes is registered while it lives; on
//! a panic or a signal the processes in its cgroups and its network namespace (all started
//! by the benchmark) are killed by pid, its cgroups removed, its namespace unmounted and its
//! directories deleted.

use std::fs;
use std::ops::Deref;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::Res;
use crate::Sandbox;

struct Registered {
    cgroup: PathBuf,
    netns: PathBuf,
    more_netns: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

static SANDBOXES: Mutex<Vec<Registered>> = Mutex::new(Vec::new());
static NAME: OnceLock<String> = OnceLock::new();

fn registry() -> std::sync::MutexGuard<'static, Vec<Registered>> {
    SANDBOXES.lock().unwrap_or_else(|e| e.into_inner())
}

fn name() -> &'static str {
    NAME.get().map(String::as_str).unwrap_or("bench")
}

/// Adds `sb` to the emergency cleanup.
pub fn register(sb: &Sandbox) {
    registry().push(Registered {
        cgroup: sb.top_cgroup().path().to_path_buf(),
        netns: sb.netns().file().to_path_buf(),
        more_netns: Vec::new(),
        dirs: vec![sb.dir().to_path_buf()],
    });
}

/// Adds a network namespace pinned outside the sandbox's own (e.g. one per agent of a
/// fleet) to the last registered sandbox: unmounted before its directories are removed.
pub fn register_netns(file: PathBuf) {
    if let Some(r) = registry().last_mut() {
        r.more_netns.push(file);
    }
}

/// Adds a directory that lives outside the last registered sandbox's (e.g. nginx's).
pub fn register_dir(dir: PathBuf) {
    if let Some(r) = registry().last_mut() {
        r.dirs.push(dir);
    }
}

/// Takes `sb` out of the emergency cleanup (its `Drop` is about to run).
pub fn unregister(sb: &Sandbox) {
    let cg = sb.top_cgroup().path();
    registry().retain(|r| r.cgroup != cg);
}

/// Empties the registry (everything was cleaned up by `Drop`).
pub fn unregister_all() {
    registry().clear();
}

/// A sandbox known to the emergency cleanup while it lives.
pub struct Guarded(Sandbox);

impl Guarded {
    /// A new registered sandbox.
    pub fn new(name: &str) -> Res<Self> {
        let sb = Sandbox::new(name).map_err(|e| format!("sandbox {name}: {e}"))?;
        register(&sb);
        Ok(Guarded(sb))
    }
}

impl Deref for Guarded {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        unregister(&self.0);
    }
}

/// Pids in a cgroup tree (all started by the benchmark: the cgroups are its own).
fn pids_below(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(t) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pids_below(&e.path(), out);
            }
        }
    }
}

/// Pids whose network namespace is the sandbox's (processes started there outside its
/// cgroups, e.g. nginx); this process excluded.
fn pids_in_netns(netns_file: &Path) -> Vec<i32> {
    let Ok(ino) = fs::metadata(netns_file).map(|m| m.ino()) else {
        return Vec::new();
    };
    let want = format!("net:[{ino}]");
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid != me
                && fs::read_link(e.path().join("ns/net")).is_ok_and(|l| l.to_string_lossy() == want)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// Removes every registered sandbox now (see the module documentation).
pub fn emergency_cleanup() {
    let list: Vec<Registered> = std::mem::take(&mut *registry());
    for r in list {
        let mut pids = Vec::new();
        pids_below(&r.cgroup, &mut pids);
        pids.extend(pids_in_netns(&r.netns));
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Err(e) = crate::remove_cgroup_tree(&r.cgroup) {
            eprintln!("{}: {e}", name());
        }
        for ns in r.more_netns.iter().chain([&r.netns]) {
            let _ = nix::mount::umount2(ns, nix::mount::MntFlags::MNT_DETACH);
        }
        for d in &r.dirs {
            let _ = fs::remove_dir_all(d);
            eprintln!("{}: removed {}", name(), d.display());
        }
    }
}

/// Runs [`emergency_cleanup`] on a panic (before the abort) and on SIGINT/SIGTERM (then exits
/// 130). `bench` names the binary in messages.
pub fn install_hooks(bench: &str) {
    let _ = NAME.set(bench.to_string());
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!(
            "{}: panicked; removing the sandboxes before aborting",
            name()
        );
        emergency_cleanup();
    }));
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let got = rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return false;
            };
            tokio::select! {
                _ = int.recv() => true,
                _ = term.recv() => true,
            }
        });
        if got {
            eprintln!("{}: interrupted; removing the sandboxes", name());
            emergency_cleanup();
            std::process::exit(130);
        }
    });
}
