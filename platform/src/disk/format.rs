//! File systems on the persistent partition: probing (`blkid -p`), making one (upstream's
//! `mke2fs -t ext4 -j [-E lazy_itable_init=1]` or `mkfs.xfs`), growing one (`e2fsck` +
//! `resize2fs`, `xfs_growfs`).
//!
//! **A partition that holds any file system is never formatted.** Upstream skips ext4 and xfs
//! only; here any signature blkid knows (a swap area, btrfs, a LUKS header…) stops the format
//! with an error that names it, since something that is not ours is on the disk.

use std::path::Path;

use super::DiskError;
use super::runner::{Tool, Tools};

/// The file systems a persistent disk may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSystem {
    /// ext4 (the default).
    Ext4,
    /// xfs.
    Xfs,
}

impl FileSystem {
    /// From `env.persistent_disk_fs`: `""` is ext4; anything but ext4 or xfs is upstream's
    /// `The filesystem type "…" is not supported`.
    pub fn from_setting(value: &str) -> Result<FileSystem, DiskError> {
        match value {
            "" | "ext4" => Ok(FileSystem::Ext4),
            "xfs" => Ok(FileSystem::Xfs),
            other => Err(DiskError::Unsupported(format!(
                "The filesystem type \"{other}\" is not supported"
            ))),
        }
    }

    /// blkid's name for it.
    pub fn name(self) -> &'static str {
        match self {
            FileSystem::Ext4 => "ext4",
            FileSystem::Xfs => "xfs",
        }
    }
}

/// The `TYPE` from `blkid -p -o export` output (pure).
pub fn parse_blkid_type(export: &str) -> Option<String> {
    export
        .lines()
        .find_map(|l| l.strip_prefix("TYPE="))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The file system (or other signature) `blkid -p` finds on `dev`, if any. blkid's exit 2
/// means "nothing found".
pub fn probe(tools: &Tools, dev: &Path) -> Result<Option<String>, DiskError> {
    let d = dev.to_string_lossy();
    let ran = tools.run_accepting(Tool::Blkid, &["-p", "-o", "export", &d], None, &[2])?;
    if ran.code == 2 {
        return Ok(None);
    }
    Ok(parse_blkid_type(&ran.stdout))
}

/// Formats `part` with `fs` unless it already holds ext4 or xfs (kept, whatever `fs` is, as
/// upstream). Returns whether it formatted.
pub fn format_if_blank(tools: &Tools, part: &Path, fs: FileSystem) -> Result<bool, DiskError> {
    match probe(tools, part)? {
        Some(t) if t == "ext4" || t == "xfs" => return Ok(false),
        Some(other) => {
            return Err(DiskError::Layout {
                device: part.display().to_string(),
                detail: format!("holds a {other} signature; not formatting it"),
            });
        }
        None => {}
    }
    let p = part.to_string_lossy();
    match fs {
        FileSystem::Ext4 => {
            let mut args = vec!["-t", "ext4", "-j"];
            if Path::new("/sys/fs/ext4/features/lazy_itable_init").exists() {
                args.extend(["-E", "lazy_itable_init=1"]);
            }
            args.push(&p);
            let first = tools.run(Tool::Mke2fs, &args);
            // Upstream's one retry: udev may still hold the new partition open.
            if let Err(DiskError::Command { stderr, .. }) = &first
                && stderr.contains("apparently in use by the system")
            {
                std::thread::sleep(std::time::Duration::from_secs(1));
                tools.run(Tool::Mke2fs, &args)?;
            } else {
                first?;
            }
        }
        FileSystem::Xfs => {
            tools.run(Tool::MkfsXfs, &[&p])?;
        }
    }
    Ok(true)
}

/// Grows an ext4 file system on `part`, which is not mounted, to its partition: `e2fsck -f -p`
/// (resize2fs insists on a fresh check; `-p` makes only the repairs that are always safe, and
/// anything more is an error), then `resize2fs`. Offline, because an online grow needs
/// `CAP_SYS_RESOURCE`, which containers often lack; upstream grows online. Returns whether the
/// partition held ext4 (xfs only grows mounted: [`grow_mounted`]).
pub fn grow_unmounted(tools: &Tools, part: &Path) -> Result<bool, DiskError> {
    if probe(tools, part)?.as_deref() != Some("ext4") {
        return Ok(false);
    }
    let p = part.to_string_lossy();
    // Exit 1: errors were corrected, the file system is fine now.
    tools.run_accepting(Tool::E2fsck, &["-f", "-p", &p], None, &[1])?;
    tools.run(Tool::Resize2fs, &[&p])?;
    Ok(true)
}

/// Grows the file system on `part`, mounted on `mount_point`, to its partition (upstream's
/// `resize2fs -f <part>` / `xfs_growfs`).
pub fn grow_mounted(tools: &Tools, part: &Path, mount_point: &Path) -> Result<(), DiskError> {
    match probe(tools, part)?.as_deref() {
        Some("ext4") => {
            tools.run(Tool::Resize2fs, &["-f", &part.to_string_lossy()])?;
        }
        Some("xfs") => {
            // xfs_growfs takes the mount point (newer xfsprogs refuse a device).
            tools.run(Tool::XfsGrowfs, &[&mount_point.to_string_lossy()])?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_is_read() {
        let out = "DEVNAME=/dev/loop0p1\nUUID=1\nVERSION=1.0\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(parse_blkid_type(out).as_deref(), Some("ext4"));
        assert_eq!(parse_blkid_type("DEVNAME=/dev/loop0\nPTTYPE=dos\n"), None);
        assert_eq!(parse_blkid_type(""), None);
        assert_eq!(parse_blkid_type("TYPE=\n"), None);
    }

    #[test]
    fn only_ext4_and_xfs_are_made() {
        assert_eq!(FileSystem::from_setting("").ok(), Some(FileSystem::Ext4));
        assert_eq!(FileSystem::from_setting("xfs").ok(), Some(FileSystem::Xfs));
        let e = FileSystem::from_setting("swap")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("The filesystem type \"swap\" is not supported")
        );
    }
}
