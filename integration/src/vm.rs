//! A simulated VM for the director simulator: a private mount namespace of the test's own
//! (held by a `sleep` the harness started, with a copy of `/etc` bound over `/etc`), in which
//! the agent and monit both run, so the persistent disk the agent mounts on `<base>/store` is
//! the one the deployed job writes to; and loop devices on sparse files as the VM's disks.
//!
//! ```no_run
//! use integration::{Sandbox, vm::{Loop, Vm}};
//! let sb = Sandbox::new("example").expect("sandbox");
//! let vm = Vm::boot(&sb, "vm-1").expect("vm");
//! let disk = Loop::new(sb.dir(), "disk-1", 64).expect("loop device");
//! // … start the agent and monit with `.mountns(&vm.mount_namespace())` …
//! let out = vm.sh("findmnt /").expect("a command in the VM");
//! ```
//!
//! Nothing the VM mounts is seen by the host: the mounts die with the namespace, i.e. when the
//! holder and every process that joined it are gone. The host's accounts are never touched
//! (`useradd` in the VM edits the copy). Loop devices are detached and their files removed on
//! drop; drop the VM (and what runs in it) first, so their mounts are gone.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use testkit::io_ctx;

use crate::{COMMAND_TIMEOUT, Error, Exec, Proc, Result, Sandbox, describe, err, wait_for};

/// Fails with the package to install when one of `tools` is not on PATH.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return err(format!("{tool} is missing (scripts/deps.sh installs it)"));
        }
    }
    Ok(())
}

/// A loop device on a sparse file the test made (`losetup --partscan`, so its partitions get
/// nodes); detached, and the file removed, on drop.
#[derive(Debug)]
pub struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    /// A `mib` MiB device backed by `<dir>/<name>.img` (sparse: it takes no space until
    /// written).
    pub fn new(dir: &Path, name: &str, mib: u64) -> Result<Loop> {
        let file = dir.join(format!("{name}.img"));
        let f = fs::File::create(&file).map_err(io_ctx(format!("creating {}", file.display())))?;
        f.set_len(mib << 20)
            .map_err(io_ctx(format!("sizing {}", file.display())))?;
        drop(f);
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show", "--partscan"]).arg(&file);
        let out = crate::run_with_timeout(cmd, COMMAND_TIMEOUT, "losetup")?;
        if !out.status.success() {
            let _ = fs::remove_file(&file);
            return err(format!("losetup {}: {}", file.display(), describe(&out)));
        }
        Ok(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            file,
        })
    }

    /// The device node (`/dev/loopN`): the hint a CPI's `attach_disk` gives for it.
    pub fn dev(&self) -> &str {
        &self.dev
    }

    /// Its first partition's node (`/dev/loopNp1`): what the agent mounts.
    pub fn partition(&self) -> String {
        format!("{}p1", self.dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = fs::remove_file(&self.file);
    }
}

/// A simulated VM: see the module documentation.
#[derive(Debug)]
pub struct Vm {
    holder: Proc,
    etc: PathBuf,
}

impl Vm {
    /// Copies `/etc` to `<sandbox>/<name>-etc` and starts the holder of a fresh private mount
    /// namespace with that copy bound over `/etc`; returns once the namespace is set up.
    pub fn boot(sb: &Sandbox, name: &str) -> Result<Vm> {
        let etc = sb.dir().join(format!("{name}-etc"));
        let mut cp = Command::new("cp");
        cp.args(["-a", "/etc"]).arg(&etc);
        let out = crate::run_with_timeout(cp, COMMAND_TIMEOUT, "cp -a /etc")?;
        if !out.status.success() {
            return err(format!("copying /etc: {}", describe(&out)));
        }
        let holder = Exec::new(["sleep", "3600"])
            .private_mounts(&[(etc.clone(), PathBuf::from("/etc"))])
            .spawn()?;
        let vm = Vm { holder, etc };
        // The pid is unshare's until the wrappers have exec'd the sleep: only then is the
        // namespace made and /etc bound.
        let comm = format!("/proc/{}/comm", vm.holder.pid());
        let host = fs::metadata("/proc/self/ns/mnt")
            .map_err(io_ctx("stat /proc/self/ns/mnt"))?
            .ino();
        let ns = vm.mount_namespace();
        wait_for(
            "the VM's mount namespace holder",
            Duration::from_secs(10),
            || {
                let ready = fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
                    && fs::metadata(&ns).is_ok_and(|m| m.ino() != host);
                Ok(ready.then_some(()))
            },
        )?;
        Ok(vm)
    }

    /// `/proc/<holder>/ns/mnt`: what [`Exec::mountns`] and [`crate::monit::Monit`] join.
    pub fn mount_namespace(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder.pid()))
    }

    /// The VM's `/etc` as the host sees it (its `passwd`, `group`…).
    pub fn etc(&self) -> &Path {
        &self.etc
    }

    /// Runs `sh -c script` inside the VM's mount namespace.
    pub fn sh(&self, script: &str) -> Result<Output> {
        Exec::new(["sh", "-c", script])
            .mountns(&self.mount_namespace())
            .output(COMMAND_TIMEOUT)
    }

    /// What is mounted on `path` inside the VM (`findmnt`'s SOURCE), `None` when nothing.
    pub fn mount_source(&self, path: &Path) -> Result<Option<String>> {
        let out = self.sh(&format!(
            "findmnt -n -o SOURCE --mountpoint '{}' || true",
            path.display()
        ))?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((!s.is_empty()).then_some(s))
    }

    /// The contents of `path` as a process in the VM reads it.
    pub fn read(&self, path: &Path) -> Result<String> {
        let out = self.sh(&format!("cat '{}'", path.display()))?;
        if !out.status.success() {
            return Err(Error(format!(
                "reading {} in the VM: {}",
                path.display(),
                describe(&out)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
