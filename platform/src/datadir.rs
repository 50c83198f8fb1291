//! The data directory tree the applier, the compiler and the blob layer need, created at boot
//! as upstream's agent creates it (`SetupDataDir`, the blobs and tmp dirs):
//!
//! | path | mode | owner |
//! |---|---|---|
//! | `<base>/data/sys`, `sys/log` | 0750 | root:vcap |
//! | `<base>/data/sys/run` | 0750, a 16 MB tmpfs on the stemcell layout | root:vcap |
//! | `<base>/data/jobs` | 0750 | root:vcap |
//! | `<base>/data/packages` | 0755 | root:vcap |
//! | `<base>/data/sensitive_blobs`, `blobs` | 0700 | root:vcap |
//! | `<base>/data/dynamic_disks` | 0700 | root:vcap |
//! | `<base>/data/tmp` | 0755 | root |
//! | `<base>/sys` | symlink to `data/sys` | |
//!
//! The group is `vcap` where it exists (stemcells), else root's. Existing directories keep
//! their contents; their modes are set again.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A step of the set-up that failed, with its path.
#[derive(Debug, thiserror::Error)]
#[error("setting up {path}: {detail}")]
pub struct DataDirError {
    /// The directory or link being made.
    pub path: PathBuf,
    /// What went wrong.
    pub detail: String,
}

fn err(path: &Path, detail: impl std::fmt::Display) -> DataDirError {
    DataDirError {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// The gid of group `vcap`, if the system has one.
pub fn vcap_gid() -> Option<nix::unistd::Gid> {
    nix::unistd::Group::from_name("vcap")
        .ok()
        .flatten()
        .map(|g| g.gid)
}

fn dir(path: &Path, mode: u32, vcap: bool) -> Result<(), DataDirError> {
    fs::create_dir_all(path).map_err(|e| err(path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| err(path, e))?;
    if vcap && let Some(gid) = vcap_gid() {
        nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
            .map_err(|e| err(path, e))?;
    }
    Ok(())
}

/// Whether `path` is a mount point, from `/proc/self/mountinfo`.
fn is_mount_point(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| String::from_utf8_lossy(&crate::mountinfo::unescape_field(mp)) == want)
}

/// Creates the tree (see the module documentation). `tmpfs_run` mounts the tmpfs on
/// `data/sys/run` when it is not a mount point yet (only the stemcell layout asks for it:
/// a test's base directory must not get mounts).
pub fn setup(base: &Path, tmpfs_run: bool) -> Result<(), DataDirError> {
    let data = base.join("data");
    let sys = data.join("sys");
    dir(&sys, 0o750, true)?;
    dir(&sys.join("log"), 0o750, true)?;
    dir(&data.join("jobs"), 0o750, true)?;
    dir(&data.join("dynamic_disks"), 0o700, true)?;
    dir(&data.join("sensitive_blobs"), 0o700, true)?;
    dir(&data.join("blobs"), 0o700, true)?;
    dir(&data.join("packages"), 0o755, true)?;
    dir(&data.join("tmp"), 0o755, false)?;
    let run = sys.join("run");
    dir(&run, 0o750, true)?;
    if tmpfs_run && !is_mount_point(&run) {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&run)
            .output()
            .map_err(|e| err(&run, format!("running mount: {e}")))?;
        if !out.status.success() {
            return Err(err(
                &run,
                format!(
                    "mount -t tmpfs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        dir(&run, 0o750, true)?;
    }
    let link = base.join("sys");
    match fs::read_link(&link) {
        Ok(t) if t == sys => Ok(()),
        Ok(_) => Err(err(&link, "is a link to somewhere else; left alone")),
        Err(_) if link.exists() => Err(err(&link, "exists and is not a link; left alone")),
        Err(_) => std::os::unix::fs::symlink(&sys, &link).map_err(|e| err(&link, e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_tree_has_upstreams_modes_and_the_sys_link() {
        let base = std::env::temp_dir().join(format!("platform-datadir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("data/packages/keep")).unwrap();
        setup(&base, false).unwrap();
        for (p, m) in [
            ("data/sys", 0o750),
            ("data/sys/log", 0o750),
            ("data/sys/run", 0o750),
            ("data/jobs", 0o750),
            ("data/packages", 0o755),
            ("data/sensitive_blobs", 0o700),
            ("data/blobs", 0o700),
            ("data/dynamic_disks", 0o700),
            ("data/tmp", 0o755),
        ] {
            assert_eq!(mode(&base.join(p)), m, "{p}");
        }
        assert!(base.join("data/packages/keep").is_dir());
        assert_eq!(
            fs::read_link(base.join("sys")).unwrap(),
            base.join("data/sys")
        );
        // Again: nothing to do, no error.
        setup(&base, false).unwrap();
        // A `sys` that is something else is reported, not replaced.
        fs::remove_file(base.join("sys")).unwrap();
        fs::create_dir(base.join("sys")).unwrap();
        assert!(setup(&base, false).unwrap_err().to_string().contains("sys"));
        fs::remove_dir_all(&base).unwrap();
    }
}
