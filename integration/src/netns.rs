//! A network namespace of the test's own, pinned on a file: every `nft` of a test runs in one,
//! so the host's ruleset is never touched.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::io_ctx;

use crate::{COMMAND_TIMEOUT, Result, describe, err, run_with_timeout};

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

    /// A process that holds the namespace, returned once it is inside (its
    /// `/proc/<pid>/ns/net` is the namespace's inode): before that, its pid names the host's
    /// namespace, and an interface moved "into" it would land on the host.
    pub fn holder(&self) -> Result<crate::Proc> {
        use std::os::unix::fs::MetadataExt;
        let p = crate::Exec::new(["sleep", "3600"])
            .netns(&self.file)
            .spawn()?;
        let want = fs::metadata(&self.file)
            .map_err(io_ctx(format!("stat {}", self.file.display())))?
            .ino();
        let link = format!("/proc/{}/ns/net", p.pid());
        crate::wait_for(
            "holder inside its namespace",
            std::time::Duration::from_secs(10),
            || {
                Ok(fs::metadata(&link)
                    .is_ok_and(|m| m.ino() == want)
                    .then_some(()))
            },
        )?;
        Ok(p)
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
