//! The disk programs, found once, and a runner that keeps their stderr in the error.
//!
//! Paths are looked up when [`Tools::find`] runs (the agent's start), in the system
//! directories first and then `PATH`, so a changed `PATH` later can never swap the program
//! that partitions a disk. A program that is missing is reported when it is needed, so an
//! agent without (say) `parted` still serves disks that never need it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::DiskError;

/// The programs the disk module runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tool {
    /// util-linux `sfdisk` (MBR partitioning, reading tables as JSON).
    Sfdisk,
    /// GNU `parted` (GPT partitioning, disks over 2 TiB).
    Parted,
    /// cloud-guest-utils `growpart` (growing partition 1).
    Growpart,
    /// util-linux `partx` (telling the kernel about new or grown partitions).
    Partx,
    /// util-linux `blkid` (probing for an existing file system).
    Blkid,
    /// e2fsprogs `mke2fs`.
    Mke2fs,
    /// xfsprogs `mkfs.xfs`.
    MkfsXfs,
    /// e2fsprogs `resize2fs`.
    Resize2fs,
    /// e2fsprogs `e2fsck` (the check `resize2fs` requires before an offline grow).
    E2fsck,
    /// xfsprogs `xfs_growfs`.
    XfsGrowfs,
    /// util-linux `mount`.
    Mount,
    /// util-linux `umount`.
    Umount,
    /// coreutils `cp` (the migration copy).
    Cp,
    /// systemd/eudev `udevadm` (trigger and settle before looking in `/dev/disk/by-id`).
    Udevadm,
}

impl Tool {
    const ALL: [Tool; 14] = [
        Tool::E2fsck,
        Tool::Sfdisk,
        Tool::Parted,
        Tool::Growpart,
        Tool::Partx,
        Tool::Blkid,
        Tool::Mke2fs,
        Tool::MkfsXfs,
        Tool::Resize2fs,
        Tool::XfsGrowfs,
        Tool::Mount,
        Tool::Umount,
        Tool::Cp,
        Tool::Udevadm,
    ];

    /// The program's file name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Sfdisk => "sfdisk",
            Tool::Parted => "parted",
            Tool::Growpart => "growpart",
            Tool::Partx => "partx",
            Tool::Blkid => "blkid",
            Tool::Mke2fs => "mke2fs",
            Tool::MkfsXfs => "mkfs.xfs",
            Tool::Resize2fs => "resize2fs",
            Tool::E2fsck => "e2fsck",
            Tool::XfsGrowfs => "xfs_growfs",
            Tool::Mount => "mount",
            Tool::Umount => "umount",
            Tool::Cp => "cp",
            Tool::Udevadm => "udevadm",
        }
    }
}

/// What a program printed when it succeeded.
#[derive(Debug, Clone)]
pub struct Ran {
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Its exit code (0 unless the caller accepted others).
    pub code: i32,
}

/// The resolved program paths.
#[derive(Debug, Clone)]
pub struct Tools {
    paths: Vec<(Tool, Option<PathBuf>)>,
}

const SYSTEM_DIRS: [&str; 6] = [
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
    "/usr/local/sbin",
    "/usr/local/bin",
];

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Tools {
    /// Looks every program up once.
    pub fn find() -> Tools {
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = SYSTEM_DIRS.iter().map(PathBuf::from).collect();
        dirs.extend(std::env::split_paths(&path_var).filter(|d| d.is_absolute()));
        let paths = Tool::ALL
            .iter()
            .map(|&t| {
                let found = dirs
                    .iter()
                    .map(|d| d.join(t.name()))
                    .find(|p| executable(p));
                (t, found)
            })
            .collect();
        Tools { paths }
    }

    /// The program's path, or [`DiskError::MissingTool`].
    pub fn path(&self, tool: Tool) -> Result<&Path, DiskError> {
        self.paths
            .iter()
            .find(|(t, _)| *t == tool)
            .and_then(|(_, p)| p.as_deref())
            .ok_or(DiskError::MissingTool(tool.name()))
    }

    /// Whether the program was found.
    pub fn has(&self, tool: Tool) -> bool {
        self.path(tool).is_ok()
    }

    /// Runs `tool args…` with `stdin` (if any) and returns its output when it exits 0 (or
    /// with a code in `ok_codes`). Any other end is a [`DiskError::Command`] with the command
    /// line and its stderr.
    pub fn run_accepting(
        &self,
        tool: Tool,
        args: &[&str],
        stdin: Option<&str>,
        ok_codes: &[i32],
    ) -> Result<Ran, DiskError> {
        let path = self.path(tool)?;
        let command = std::iter::once(tool.name())
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let fail = |status: String, stderr: String| DiskError::Command {
            command: command.clone(),
            status,
            stderr,
        };
        let mut cmd = Command::new(path);
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| fail("not started".into(), e.to_string()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|e| fail("stdin not written".into(), e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail("not waited for".into(), e.to_string()))?;
        let ran = Ran {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            code: out.status.code().unwrap_or(-1),
        };
        if out.status.success() || (out.status.code().is_some() && ok_codes.contains(&ran.code)) {
            return Ok(ran);
        }
        Err(fail(out.status.to_string(), ran.stderr))
    }

    /// [`Tools::run_accepting`] with exit 0 only.
    pub fn run(&self, tool: Tool, args: &[&str]) -> Result<Ran, DiskError> {
        self.run_accepting(tool, args, None, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_keep_the_command_and_its_stderr() {
        let tools = Tools::find();
        let e = tools.run(Tool::Cp, &["/nonexistent-src-x", "/nonexistent-dst-y"]);
        let text = format!("{:?}", e.err());
        assert!(text.contains("cp /nonexistent-src-x"), "{text}");
        assert!(text.contains("No such file"), "{text}");
        let missing = Tools { paths: vec![] };
        let e = missing
            .run(Tool::Growpart, &[])
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|t| t.contains("'growpart' is not installed")));
    }
}
