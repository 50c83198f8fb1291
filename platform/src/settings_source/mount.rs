//! A drive mounted read-only on a fresh private directory for as long as its files are read,
//! then unmounted and the directory removed (also when reading fails: the guard's drop).
//! mount(8) does the mounting so that the filesystem type (vfat, iso9660, udf) is detected as
//! upstream's `mount <device> <dir>` detects it.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, umount2};

use super::error::FetchError;

/// Mount options: nothing on the drive can run, be a device, or be written.
pub const MOUNT_OPTIONS: &str = "ro,nosuid,nodev,noexec";

/// The name of every private mount directory starts with this.
const MOUNT_DIR_PREFIX: &str = ".settings-source-";

/// Unmounts (detaching) and removes the mount directories in `parent` that an agent killed
/// while reading a drive left behind, so that a drive holding settings does not stay mounted
/// across agent restarts. Returns how many were removed.
pub fn remove_stale_mounts(parent: &Path) -> usize {
    // The calling thread's view: a thread may have a mount namespace of its own.
    let Ok(text) = fs::read_to_string("/proc/thread-self/mountinfo") else {
        return 0;
    };
    let mut n = 0;
    for point in stale_mount_points(&text, parent) {
        match umount2(&point, MntFlags::MNT_DETACH) {
            Ok(()) => {
                let _ = fs::remove_dir(&point);
                tracing::warn!(dir = %point.display(), "unmounted a drive an earlier agent left mounted");
                n += 1;
            }
            Err(e) => {
                tracing::warn!(dir = %point.display(), error = %e, "cannot unmount a stale settings mount")
            }
        }
    }
    n
}

/// The mount points of `mountinfo` that are private mount directories directly in `parent`.
fn stale_mount_points(mountinfo: &str, parent: &Path) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| {
            PathBuf::from(std::ffi::OsStr::from_bytes(
                &crate::mountinfo::unescape_field(f),
            ))
        })
        .filter(|p| {
            p.parent() == Some(parent)
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(MOUNT_DIR_PREFIX))
        })
        .collect();
    points.dedup();
    points
}

/// A mounted drive; unmounted on [`ReadOnlyMount::unmount`] or drop.
#[derive(Debug)]
pub(crate) struct ReadOnlyMount {
    dir: PathBuf,
    mounted: bool,
}

impl ReadOnlyMount {
    /// Mounts `device` on a new directory (mode 0700) in `parent` (made, 0700, if missing).
    pub(crate) fn new(device: &Path, parent: &Path) -> Result<Self, FetchError> {
        let dir = parent.join(format!(
            "{MOUNT_DIR_PREFIX}{}-{:x}",
            std::process::id(),
            super::nonce()
        ));
        let fail = |detail: String| FetchError::Mount {
            device: device.to_path_buf(),
            dir: dir.clone(),
            detail,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| fail(format!("creating {}: {e}", parent.display())))?;
        fs::DirBuilder::new()
            .recursive(false)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| fail(format!("creating the mount point: {e}")))?;
        let mut guard = ReadOnlyMount {
            dir: dir.clone(),
            mounted: false,
        };
        let out = Command::new("mount")
            .arg("-o")
            .arg(MOUNT_OPTIONS)
            .arg("--")
            .arg(device)
            .arg(&dir)
            .output()
            .map_err(|e| fail(format!("running mount: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(fail(format!("mount {}: {}", out.status, stderr.trim())));
        }
        guard.mounted = true;
        Ok(guard)
    }

    /// The directory the drive is mounted on.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts and removes the directory; a busy drive is detached (it goes once the last
    /// reader closes it).
    pub(crate) fn unmount(mut self) -> Result<(), FetchError> {
        let r = self.release();
        self.mounted = false;
        r
    }

    fn release(&mut self) -> Result<(), FetchError> {
        if self.mounted {
            if let Err(e) = umount2(&self.dir, MntFlags::empty()) {
                umount2(&self.dir, MntFlags::MNT_DETACH).map_err(|e2| FetchError::Unmount {
                    dir: self.dir.clone(),
                    detail: format!("{e}; detaching: {e2}"),
                })?;
            }
            self.mounted = false;
        }
        fs::remove_dir(&self.dir).map_err(|e| FetchError::Unmount {
            dir: self.dir.clone(),
            detail: format!("removing the mount point: {e}"),
        })
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        if self.dir.exists()
            && let Err(e) = self.release()
        {
            tracing::warn!(error = %e, "settings source: cleaning up a mount");
        }
    }
}

/// `relative` (upstream allows a leading `/`) inside `root`; `..` is refused so that a path
/// of agent.json cannot leave the drive.
pub(crate) fn inside(root: &Path, relative: &str) -> Result<PathBuf, FetchError> {
    let rel = Path::new(relative.trim_start_matches('/'));
    if relative.is_empty() || rel.as_os_str().is_empty() {
        return Err(FetchError::Config(
            "a path inside the drive is empty".into(),
        ));
    }
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(FetchError::Config(format!(
            "path {relative:?} leaves the drive"
        )));
    }
    Ok(root.join(rel))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stale_mount_points_are_ours_directly_in_the_parent() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/vda1 rw
40 22 7:0 / /var/vcap/bosh/.settings-source-12-ab ro - ext2 /dev/loop0 ro
41 22 7:1 / /var/vcap/bosh/.settings-source-12-ab ro - ext2 /dev/loop0 ro
42 22 7:1 / /var/vcap/bosh/x/.settings-source-1-c ro - ext2 /dev/loop1 ro
43 22 7:2 / /var/vcap/bosh/settings ro - tmpfs tmpfs rw
44 22 7:3 / /var/vcap/bosh/.settings-source-9\\0409 ro - ext2 /dev/loop2 ro
";
        assert_eq!(
            stale_mount_points(info, Path::new("/var/vcap/bosh")),
            [
                PathBuf::from("/var/vcap/bosh/.settings-source-12-ab"),
                PathBuf::from("/var/vcap/bosh/.settings-source-9 9"),
            ]
        );
    }

    #[test]
    fn paths_stay_inside_the_drive() {
        let r = Path::new("/m");
        assert_eq!(
            inside(r, "ec2/latest/user-data").unwrap(),
            Path::new("/m/ec2/latest/user-data")
        );
        assert_eq!(
            inside(r, "/configs/UserData").unwrap(),
            Path::new("/m/configs/UserData")
        );
        for bad in ["", "/", "../etc/shadow", "a/../../b"] {
            assert!(inside(r, bad).is_err(), "{bad}");
        }
    }
}
