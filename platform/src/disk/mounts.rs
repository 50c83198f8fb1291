//! What is mounted where, from `/proc/self/mountinfo`, and the mount commands.
//!
//! A device counts as mounted when a mount's `major:minor` is the device's number: that holds
//! whatever path the device was mounted by (a by-id link, `/dev/vdb1` or `/dev/sdb1`). A bind
//! mounted directory (`BindMountPersistentDisk`) counts as mounted when another mount point
//! is the same directory (same device and inode): a bind mount's source is not in the table,
//! which is why upstream falls back to the `mount` command there.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::DiskError;
use super::runner::{Tool, Tools};
use crate::mountinfo::unescape_field;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The file system's device number (`major`, `minor`).
    pub dev: (u64, u64),
    /// The path inside that file system that is mounted (`/` unless a bind mount).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The mount source (a device path, `tmpfs`, …).
    pub source: String,
}

fn path_of(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(unescape_field(field)))
}

/// Parses mountinfo text; lines that do not parse are skipped (pure).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let _id = f.next()?;
            let _parent = f.next()?;
            let (maj, min) = f.next()?.split_once(':')?;
            let root = f.next()?;
            let mount_point = f.next()?;
            let rest: Vec<&str> = f.collect();
            let sep = rest.iter().position(|x| *x == "-")?;
            let source = rest.get(sep + 2)?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: path_of(root),
                mount_point: path_of(mount_point),
                source: String::from_utf8_lossy(&unescape_field(source)).into_owned(),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
pub fn read_mounts() -> Result<Vec<MountEntry>, DiskError> {
    let p = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(p).map_err(super::error::io_at(p))?;
    Ok(parse_mountinfo(&text))
}

/// The mount on top at `mount_point`, if it is a mount point.
pub fn mounted_at<'a>(mounts: &'a [MountEntry], mount_point: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == mount_point)
}

/// The device number of a block device.
pub fn rdev(device: &Path) -> Result<(u64, u64), DiskError> {
    let meta = std::fs::metadata(device).map_err(super::error::io_at(device))?;
    let r = meta.rdev();
    Ok((nix::sys::stat::major(r), nix::sys::stat::minor(r)))
}

/// What a persistent disk is, for "is it mounted" questions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A block device (partition 1, or the device itself when preformatted).
    Device(PathBuf),
    /// A directory that is bind mounted.
    Directory(PathBuf),
}

impl Source {
    /// The path given to `mount`.
    pub fn path(&self) -> &Path {
        match self {
            Source::Device(p) | Source::Directory(p) => p,
        }
    }
}

fn same_inode(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Whether `entry` is a mount of `source`.
pub fn is_mount_of(entry: &MountEntry, source: &Source) -> bool {
    match source {
        Source::Device(d) => rdev(d).is_ok_and(|n| n == entry.dev),
        Source::Directory(d) => entry.mount_point != *d && same_inode(&entry.mount_point, d),
    }
}

/// The mount points where `source` is mounted.
pub fn mount_points_of(mounts: &[MountEntry], source: &Source) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter(|m| is_mount_of(m, source))
        .map(|m| m.mount_point.clone())
        .collect()
}

/// `mount [-o opt]… [-o bind] <source> <mount_point>`.
pub fn mount(
    tools: &Tools,
    source: &Path,
    mount_point: &Path,
    options: &[String],
    bind: bool,
) -> Result<(), DiskError> {
    let mut args: Vec<String> = Vec::new();
    for o in options {
        args.push("-o".into());
        args.push(o.clone());
    }
    if bind {
        args.push("-o".into());
        args.push("bind".into());
    }
    args.push(source.to_string_lossy().into_owned());
    args.push(mount_point.to_string_lossy().into_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    tools.run(Tool::Mount, &refs).map(|_| ())
}

/// `mount -o remount,ro <mount_point>`.
pub fn remount_read_only(tools: &Tools, mount_point: &Path) -> Result<(), DiskError> {
    tools
        .run(
            Tool::Mount,
            &["-o", "remount,ro", &mount_point.to_string_lossy()],
        )
        .map(|_| ())
}

/// `mount --move <from> <to>`: the mount changes place in one step, so the store is never
/// seen empty.
pub fn move_mount(tools: &Tools, from: &Path, to: &Path) -> Result<(), DiskError> {
    tools
        .run(
            Tool::Mount,
            &["--move", &from.to_string_lossy(), &to.to_string_lossy()],
        )
        .map(|_| ())
}

/// `umount <mount_point>`, tried `tries` times `pause` apart while it fails (a job may
/// still be closing files; upstream tries 600 times 1 s apart).
pub fn unmount(
    tools: &Tools,
    mount_point: &Path,
    tries: u32,
    pause: Duration,
) -> Result<(), DiskError> {
    let mp = mount_point.to_string_lossy();
    let mut last = None;
    for i in 0..tries.max(1) {
        if i > 0 {
            std::thread::sleep(pause);
        }
        match tools.run(Tool::Umount, &[&mp]) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| DiskError::Mount(format!("umount {mp} did not run"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
97 22 7:1 / /var/vcap/store rw,relatime shared:50 - ext4 /dev/loop1p1 rw
98 22 259:1 /warden/disk\\0401 /var/vcap/my\\040store rw - ext4 /dev/nvme0n1p1 rw
garbage line
99 22 x:y / /bad rw - ext4 /dev/x rw
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].dev, (7, 1));
        assert_eq!(m[1].source, "/dev/loop1p1");
        assert_eq!(m[2].root, PathBuf::from("/warden/disk 1"));
        assert_eq!(m[2].mount_point, PathBuf::from("/var/vcap/my store"));
        assert_eq!(
            mounted_at(&m, Path::new("/var/vcap/store")).map(|e| e.dev),
            Some((7, 1))
        );
        assert!(mounted_at(&m, Path::new("/var/vcap")).is_none());
    }
}
