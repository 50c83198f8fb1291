//! From a disk's settings to the device node (upstream's device path resolvers).
//!
//! - **identity** (upstream's default): the hint's `path` is the device.
//! - **virtio**: first a `/dev/disk/by-id/*<cid>` link (the cid optionally rewritten by
//!   `DiskIDTransformPattern`/`Replacement`; cids shorter than 20 characters are not looked
//!   up, as upstream), tried for 500 ms after `udevadm trigger` + `settle`; then the hint's
//!   `path`, with `/dev/sdX` also tried as `/dev/xvdX` and `/dev/vdX`, for 30 s.
//!
//! Not here (upstream has them): the scsi resolvers (by volume id, by `id`, by lun and host
//! device id through `/sys/bus/scsi`), iscsi + multipath, and `LunDeviceSymlinkPath`.
//!
//! Whatever a resolver returns is checked before anything touches it: it must resolve (links
//! followed) to a block device under `/dev`, or, with bind mounts, to an absolute directory.
//! A hint can therefore never make the agent partition a regular file or a path elsewhere.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::runner::{Tool, Tools};
use super::{DiskError, DiskSettings};

/// Which resolver upstream's `Platform.Linux.DevicePathResolutionType` names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Resolution {
    /// `""` (upstream's default): the hint's path.
    #[default]
    Identity,
    /// `"virtio"`.
    Virtio,
    /// A type this agent does not implement (`scsi`, `iscsi`, …). The agent still starts;
    /// `list_disk` sees no such disk mounted and `mount_disk` fails saying why: resolving a
    /// scsi disk by its path (upstream's fallback for unknown values) could pick the wrong disk.
    Unsupported(String),
}

impl Resolution {
    /// From the agent.json value.
    pub fn from_config(value: &str) -> Resolution {
        match value {
            "" | "identity" => Resolution::Identity,
            "virtio" => Resolution::Virtio,
            other => Resolution::Unsupported(other.to_string()),
        }
    }
}

/// How to resolve (from agent.json and upstream's timeouts).
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// The resolver.
    pub resolution: Resolution,
    /// Where the by-id links are (`/dev/disk/by-id`; tests point it elsewhere).
    pub by_id_dir: PathBuf,
    /// `DiskIDTransformPattern` (a regex) and `DiskIDTransformReplacement` (`$1`-style).
    pub id_transform: Option<(regex::Regex, String)>,
    /// How long the by-id lookup waits (upstream: 500 ms).
    pub id_wait: Duration,
    /// How long the path lookup waits (upstream: 30 s).
    pub path_wait: Duration,
    /// Whether to run `udevadm trigger` + `settle` before a by-id lookup.
    pub udev: bool,
    /// Paths are directories for bind mounts (`BindMountPersistentDisk`).
    pub bind_mount: bool,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            resolution: Resolution::Identity,
            by_id_dir: PathBuf::from("/dev/disk/by-id"),
            id_transform: None,
            id_wait: Duration::from_millis(500),
            path_wait: Duration::from_secs(30),
            udev: true,
            bind_mount: false,
        }
    }
}

/// Whether to wait for a device that is not there yet (mount) or look once (list, unmount).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Up to the configured waits.
    Bounded,
    /// One look.
    Once,
}

const POLL: Duration = Duration::from_millis(100);

/// The partition-1 node of a device, by the kernel's naming (`sdb` → `sdb1`, `nvme0n1` and
/// `loop3` → `…p1`, `/dev/mapper/x` → `x-part1`). Upstream only special-cases nvme and
/// mapper; the kernel's rule (a name ending in a digit gets `p`) also covers loop, mmcblk
/// and nbd devices.
pub fn partition_path(device: &Path) -> PathBuf {
    let s = device.to_string_lossy();
    if s.starts_with("/dev/mapper/") {
        return PathBuf::from(format!("{s}-part1"));
    }
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p1"))
    } else {
        PathBuf::from(format!("{s}1"))
    }
}

/// The by-id file name pattern for a cid: the transformed id, or `*<cid>`.
fn id_pattern(cfg: &ResolverConfig, cid: &str) -> (String, bool) {
    match &cfg.id_transform {
        Some((re, rep)) if re.is_match(cid) => {
            (re.replace_all(cid, rep.as_str()).into_owned(), false)
        }
        Some(_) => (cid.to_string(), false),
        None => (cid.to_string(), true),
    }
}

fn by_id_matches(cfg: &ResolverConfig, name: &str, suffix_match: bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(&cfg.by_id_dir) else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if suffix_match {
                n.ends_with(name)
            } else {
                n == name
            }
        })
        .map(|e| e.path())
        .collect()
}

fn by_id(
    cfg: &ResolverConfig,
    tools: &Tools,
    s: &DiskSettings,
    wait: Wait,
) -> Result<Option<PathBuf>, DiskError> {
    if s.id.len() < 20 {
        return Ok(None);
    }
    if cfg.udev && tools.has(Tool::Udevadm) {
        // Failures here only make the lookup below less likely to succeed; the fallback
        // resolver still runs.
        let _ = tools.run(Tool::Udevadm, &["trigger"]);
        let _ = tools.run(Tool::Udevadm, &["settle"]);
    }
    let (name, suffix) = id_pattern(cfg, &s.id);
    let deadline = Instant::now() + cfg.id_wait;
    loop {
        let found = by_id_matches(cfg, &name, suffix);
        match found.as_slice() {
            [one] => {
                if let Ok(real) = std::fs::canonicalize(one) {
                    return Ok(Some(real));
                }
            }
            [] => {}
            _ => {
                return Err(DiskError::AmbiguousDevice {
                    pattern: cfg
                        .by_id_dir
                        .join(if suffix { format!("*{name}") } else { name })
                        .display()
                        .to_string(),
                    cid: s.id.clone(),
                });
            }
        }
        if wait == Wait::Once || Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// Upstream's mapped lookup: `/dev/sdX` may be `/dev/xvdX` (Xen) or `/dev/vdX` (KVM).
fn mapped_candidates(path: &str) -> Vec<PathBuf> {
    match path.strip_prefix("/dev/sd") {
        Some(rest) => ["/dev/xvd", "/dev/vd", "/dev/sd"]
            .iter()
            .map(|p| PathBuf::from(format!("{p}{rest}")))
            .collect(),
        None => vec![PathBuf::from(path)],
    }
}

fn check_path(cfg: &ResolverConfig, cid: &str, given: &str) -> Result<(), DiskError> {
    let bad = |detail: &str| DiskError::BadDevicePath {
        cid: cid.to_string(),
        path: given.to_string(),
        detail: detail.to_string(),
    };
    if given.is_empty() {
        return Err(bad("the hint has no path"));
    }
    if !given.starts_with('/') {
        return Err(bad("not an absolute path"));
    }
    if Path::new(given)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(bad("contains '..'"));
    }
    if !cfg.bind_mount && !given.starts_with("/dev/") {
        return Err(bad("not under /dev"));
    }
    Ok(())
}

/// Checks what a path resolved to: a block device under `/dev`, or a directory for binds.
fn check_target(
    cfg: &ResolverConfig,
    cid: &str,
    given: &Path,
    real: &Path,
) -> Result<(), DiskError> {
    use std::os::unix::fs::FileTypeExt;
    let bad = |detail: String| DiskError::BadDevicePath {
        cid: cid.to_string(),
        path: given.display().to_string(),
        detail,
    };
    let meta = std::fs::metadata(real).map_err(|e| bad(format!("{}: {e}", real.display())))?;
    if cfg.bind_mount {
        if meta.is_dir() || meta.file_type().is_block_device() {
            return Ok(());
        }
        return Err(bad(format!(
            "{} is neither a directory nor a block device",
            real.display()
        )));
    }
    if !real.starts_with("/dev") {
        return Err(bad(format!("resolves to {}, outside /dev", real.display())));
    }
    if !meta.file_type().is_block_device() {
        return Err(bad(format!("{} is not a block device", real.display())));
    }
    Ok(())
}

/// Resolves the disk's device (or, with bind mounts, its directory). `Ok(None)` means "not
/// there" after the wait (list and unmount count that as not mounted); mount turns it into
/// [`DiskError::DeviceTimeout`] with [`resolve_required`].
pub fn resolve(
    cfg: &ResolverConfig,
    tools: &Tools,
    s: &DiskSettings,
    wait: Wait,
) -> Result<Option<PathBuf>, DiskError> {
    if let Resolution::Unsupported(kind) = &cfg.resolution {
        if wait == Wait::Once {
            return Ok(None);
        }
        return Err(DiskError::Unsupported(format!(
            "DevicePathResolutionType {kind:?} is not supported by this agent (identity and virtio are)"
        )));
    }
    if cfg.resolution == Resolution::Virtio
        && let Some(real) = by_id(cfg, tools, s, wait)?
    {
        check_target(cfg, &s.id, &real, &real)?;
        return Ok(Some(real));
    }
    check_path(cfg, &s.id, &s.path)?;
    let candidates = if cfg.resolution == Resolution::Virtio {
        mapped_candidates(&s.path)
    } else {
        vec![PathBuf::from(&s.path)]
    };
    let deadline = Instant::now() + cfg.path_wait;
    loop {
        for c in &candidates {
            if let Ok(real) = std::fs::canonicalize(c) {
                check_target(cfg, &s.id, c, &real)?;
                return Ok(Some(real));
            }
        }
        if wait == Wait::Once || Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// [`resolve`] with a bounded wait; a device that never appears is upstream's
/// "Timed out getting real device path for …".
pub fn resolve_required(
    cfg: &ResolverConfig,
    tools: &Tools,
    s: &DiskSettings,
) -> Result<PathBuf, DiskError> {
    resolve(cfg, tools, s, Wait::Bounded)?.ok_or_else(|| {
        DiskError::DeviceTimeout(if s.path.is_empty() {
            s.id.clone()
        } else {
            s.path.clone()
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::disk::DiskEnv;

    #[test]
    fn partition_names_follow_the_kernel() {
        for (dev, part) in [
            ("/dev/sdb", "/dev/sdb1"),
            ("/dev/xvdf", "/dev/xvdf1"),
            ("/dev/nvme1n1", "/dev/nvme1n1p1"),
            ("/dev/loop7", "/dev/loop7p1"),
            ("/dev/mmcblk0", "/dev/mmcblk0p1"),
            ("/dev/mapper/3600a", "/dev/mapper/3600a-part1"),
        ] {
            assert_eq!(partition_path(Path::new(dev)), PathBuf::from(part), "{dev}");
        }
    }

    #[test]
    fn sd_paths_are_also_tried_as_xen_and_kvm_names() {
        assert_eq!(
            mapped_candidates("/dev/sdc"),
            ["/dev/xvdc", "/dev/vdc", "/dev/sdc"].map(PathBuf::from)
        );
        assert_eq!(mapped_candidates("/dev/vdb"), [PathBuf::from("/dev/vdb")]);
    }

    #[test]
    fn hostile_paths_are_refused_before_any_lookup() {
        let cfg = ResolverConfig {
            path_wait: Duration::from_millis(10),
            ..ResolverConfig::default()
        };
        let tools = Tools::find();
        for (path, word) in [
            ("", "no path"),
            ("dev/sdb", "absolute"),
            ("/dev/../etc/passwd", ".."),
            ("/etc/passwd", "not under /dev"),
            ("/tmp/disk.img", "not under /dev"),
            ("/dev/null", "not a block device"),
        ] {
            let s = DiskSettings::from_hint("c", &serde_json::json!(path), &DiskEnv::default())
                .unwrap();
            let e = resolve(&cfg, &tools, &s, Wait::Bounded)
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{path}: {e}");
        }
        // A device that is not there: None once, a timeout error when required.
        let s = DiskSettings::from_hint("c", &serde_json::json!("/dev/sdzz9"), &DiskEnv::default())
            .unwrap();
        assert!(resolve(&cfg, &tools, &s, Wait::Once).unwrap().is_none());
        let e = resolve_required(&cfg, &tools, &s).unwrap_err().to_string();
        assert_eq!(e, "Timed out getting real device path for /dev/sdzz9");
    }

    #[test]
    fn unknown_resolution_types_fail_at_mount_only() {
        assert_eq!(Resolution::from_config(""), Resolution::Identity);
        assert_eq!(Resolution::from_config("virtio"), Resolution::Virtio);
        let cfg = ResolverConfig {
            resolution: Resolution::from_config("scsi"),
            ..ResolverConfig::default()
        };
        let s = DiskSettings::from_hint("c", &serde_json::json!({"id": "1"}), &DiskEnv::default())
            .unwrap();
        let tools = Tools::find();
        assert!(resolve(&cfg, &tools, &s, Wait::Once).unwrap().is_none());
        let e = resolve_required(&cfg, &tools, &s).unwrap_err().to_string();
        assert!(e.contains("\"scsi\" is not supported"), "{e}");
    }
}
