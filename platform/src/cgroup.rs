//! cgroup detection from the kernel's own answers: statfs magic, `/proc/<pid>/cgroup`,
//! `/proc/<pid>/mountinfo` and `cgroup.procs` membership. Nothing here guesses a layout or a
//! level: where the kernel's answers do not determine them, the caller is told so.
//!
//! The parsers are pure (they take text) so that tests can feed fixture files for unified,
//! hybrid, v1-only and nested layouts.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where nft resolves `socket cgroupv2` paths: nft prefixes every cgroup path with this
/// directory (`SYSFS_CGROUPSV2_PATH` in nft's source), whatever the layout.
pub const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The proc inode number of the initial cgroup namespace (`PROC_CGROUP_INIT_INO` in the
/// kernel). Any other value means the process lives in a nested cgroup namespace.
pub const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// How cgroups are mounted on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// cgroup2 is mounted at `/sys/fs/cgroup` (Noble and later stemcells).
    Unified,
    /// v1 controllers are mounted and cgroup2 lives at `/sys/fs/cgroup/unified` (Jammy).
    Hybrid,
    /// Only cgroup v1 hierarchies: `socket cgroupv2` cannot match anything.
    V1Only,
    /// No cgroup filesystem at all.
    None,
}

impl Layout {
    /// The cgroup2 mount point nft sees for this layout, relative to [`NFT_CGROUP_ROOT`]
    /// (`""` or `"unified"`), or `None` when there is no cgroup2 hierarchy.
    pub fn nft_prefix(self) -> Option<&'static str> {
        match self {
            Layout::Unified => Some(""),
            Layout::Hybrid => Some("unified"),
            Layout::V1Only | Layout::None => None,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Unified => "unified (cgroup2 at /sys/fs/cgroup)",
            Layout::Hybrid => "hybrid (cgroup2 at /sys/fs/cgroup/unified)",
            Layout::V1Only => "cgroup v1 only",
            Layout::None => "no cgroup filesystem",
        })
    }
}

/// Errors of cgroup detection. Each names the file or value that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} has no cgroup v2 line (0::<path>)")]
    NoV2Line { path: PathBuf },
    #[error("no cgroup2 hierarchy on this host ({0})")]
    NoCgroup2(Layout),
    #[error("cgroup path {path:?} cannot be used in a firewall rule: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error(
        "cannot find the cgroup directory of pid {pid} (visible path {visible:?}) under {mount}"
    )]
    NotFound {
        pid: u32,
        visible: String,
        mount: PathBuf,
    },
    #[error("moving pid {pid} into {path}: {source}")]
    Move {
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One line of mountinfo, with only the fields detection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The root of the mount inside its filesystem (field 4), e.g. `/` or `/../..` in a
    /// cgroup namespace whose root lies below the mounted hierarchy's root.
    pub root: String,
    /// Where it is mounted (field 5).
    pub mount_point: PathBuf,
    /// Filesystem type (first field after the ` - ` separator).
    pub fs_type: String,
}

/// Parses `/proc/<pid>/mountinfo` text. Lines that do not have the documented shape are
/// skipped: mountinfo is produced by the kernel, and an odd line must not hide the others.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fields: Vec<&str> = pre.split(' ').collect();
            if fields.len() < 5 {
                return None;
            }
            let fs_type = post.split(' ').next()?.to_string();
            Some(MountEntry {
                root: unescape_mount(fields[3]),
                mount_point: PathBuf::from(unescape_mount(fields[4])),
                fs_type,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount(s: &str) -> String {
    String::from_utf8_lossy(&crate::mountinfo::unescape_field(s)).into_owned()
}

/// Classifies the layout from mountinfo alone (used for fixtures and as a cross-check of the
/// statfs answer).
pub fn layout_from_mounts(mounts: &[MountEntry]) -> Layout {
    let v2_at = |p: &str| {
        mounts
            .iter()
            .any(|m| m.fs_type == "cgroup2" && m.mount_point == Path::new(p))
    };
    if v2_at("/sys/fs/cgroup") {
        Layout::Unified
    } else if v2_at("/sys/fs/cgroup/unified") {
        Layout::Hybrid
    } else if mounts.iter().any(|m| m.fs_type == "cgroup") {
        Layout::V1Only
    } else {
        Layout::None
    }
}

/// The cgroup2 mount entry for a layout, if mountinfo lists it.
pub fn cgroup2_mount(mounts: &[MountEntry], layout: Layout) -> Option<&MountEntry> {
    let want = match layout {
        Layout::Unified => Path::new("/sys/fs/cgroup"),
        Layout::Hybrid => Path::new("/sys/fs/cgroup/unified"),
        Layout::V1Only | Layout::None => return None,
    };
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2" && m.mount_point == want)
}

/// Extracts the cgroup v2 path (the `0::<path>` line) from `/proc/<pid>/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (hier, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        (hier == "0" && ctrl.is_empty()).then(|| path.to_string())
    })
}

/// A cgroup path relative to [`NFT_CGROUP_ROOT`] that is safe to place inside a double-quoted
/// nft string. nft strings have no escape for `"`, so anything outside a conservative
/// character set is rejected rather than quoted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct NftCgroupPath(String);

/// Longest path accepted: nft copies the path into a PATH_MAX buffer together with the
/// `/sys/fs/cgroup/` prefix.
const MAX_PATH_LEN: usize = 4000;

impl NftCgroupPath {
    /// Validates `path` (relative to `/sys/fs/cgroup`, no leading slash required).
    ///
    /// Guarantees: the result has no empty, `.` or `..` component, no leading or trailing
    /// slash, and only the characters `A-Za-z0-9 _ . - @ : + = ,` and `/`, so it can be
    /// written as `"<path>"` in an nft script without changing the script's meaning.
    pub fn new(path: &str) -> Result<Self, CgroupError> {
        let bad = |reason| CgroupError::InvalidPath {
            path: path.to_string(),
            reason,
        };
        let trimmed = path.trim_matches('/');
        if trimmed.len() > MAX_PATH_LEN {
            return Err(bad("longer than 4000 bytes"));
        }
        if trimmed.is_empty() {
            return Ok(NftCgroupPath(String::new()));
        }
        for comp in trimmed.split('/') {
            if comp.is_empty() || comp == "." || comp == ".." {
                return Err(bad("empty, '.' or '..' component"));
            }
            if !comp.bytes().all(is_safe_byte) {
                return Err(bad(
                    "contains a character outside A-Za-z0-9_.-@:+=, (nft strings cannot escape it)",
                ));
            }
        }
        Ok(NftCgroupPath(trimmed.to_string()))
    }

    /// The path as nft expects it (relative to `/sys/fs/cgroup`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The absolute directory of this cgroup.
    pub fn fs_path(&self) -> PathBuf {
        Path::new(NFT_CGROUP_ROOT).join(&self.0)
    }
}

impl fmt::Display for NftCgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Bytes allowed in cgroup names that go into nft scripts and comments.
pub fn is_safe_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"_.-@:+=,".contains(&c)
}

/// Number of components of a cgroup path: `/` is 0, `/a/b` is 2.
pub fn depth(path: &str) -> u32 {
    path.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// Whether the process `pid` is in a non-initial cgroup namespace, read from the proc inode
/// of `/proc/<pid>/ns/cgroup` (the kernel's own answer).
pub fn in_cgroup_namespace(pid: u32) -> Result<bool, CgroupError> {
    use std::os::unix::fs::MetadataExt;
    let p = PathBuf::from(format!("/proc/{pid}/ns/cgroup"));
    match fs::metadata(&p) {
        Ok(m) => Ok(m.ino() != INIT_CGROUP_NS_INO),
        // Kernels without cgroup namespaces have no such file: they cannot nest.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(&p)(e)),
    }
}

/// Detects the layout with statfs on the two possible cgroup2 mount points.
pub fn detect_layout() -> Layout {
    use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
    let magic = |p: &str| statfs(p).ok().map(|s| s.filesystem_type());
    if magic("/sys/fs/cgroup") == Some(CGROUP2_SUPER_MAGIC) {
        return Layout::Unified;
    }
    if magic("/sys/fs/cgroup/unified") == Some(CGROUP2_SUPER_MAGIC) {
        return Layout::Hybrid;
    }
    // A v1 host has tmpfs at /sys/fs/cgroup with cgroup mounts below; some have a v1
    // hierarchy mounted directly there.
    let v1 = fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.flatten()
                .any(|e| magic(&e.path().to_string_lossy()) == Some(CGROUP_SUPER_MAGIC))
        })
        .unwrap_or(false);
    if v1 || magic("/sys/fs/cgroup") == Some(CGROUP_SUPER_MAGIC) {
        Layout::V1Only
    } else {
        Layout::None
    }
}

/// Where a process sits in the cgroup v2 hierarchy, as far as the kernel's answers tell.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CgroupPlacement {
    pub layout: Layout,
    /// True when the process is in a nested cgroup namespace: `visible` is then relative to
    /// the namespace root and the kernel's level for nft rules must be probed.
    pub namespaced: bool,
    /// The path the kernel shows in `/proc/<pid>/cgroup`.
    pub visible: String,
    /// The path nft resolves (relative to `/sys/fs/cgroup`), verified by `cgroup.procs`
    /// membership to be the process's own cgroup.
    pub nft_path: NftCgroupPath,
    /// The cgroup's inode number (what the kernel compares in `socket cgroupv2`).
    pub inode: u64,
    /// Depth of `visible`: the level nft needs outside a namespace, and inside one on kernels
    /// whose `socket cgroupv2` levels are namespace-relative (6.11+).
    pub visible_level: u32,
    /// Depth of the directory below the cgroup2 mount: the level older kernels need inside a
    /// namespace when the host's hierarchy is mounted.
    pub mount_level: u32,
}

impl CgroupPlacement {
    /// Levels at which `socket cgroupv2` may match this cgroup, most likely first. Outside a
    /// namespace there is exactly one; inside one, both semantics are candidates.
    pub fn candidate_levels(&self) -> Vec<u32> {
        let mut v = vec![self.visible_level];
        if self.namespaced && self.mount_level != self.visible_level {
            v.push(self.mount_level);
        }
        v
    }
}

/// Resolves the cgroup of `pid`: reads its proc files, finds the directory under the cgroup2
/// mount and proves it by `cgroup.procs` membership.
pub fn placement_of(pid: u32) -> Result<CgroupPlacement, CgroupError> {
    let layout = detect_layout();
    let prefix = layout.nft_prefix().ok_or(CgroupError::NoCgroup2(layout))?;
    let cg_file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&cg_file).map_err(io_err(&cg_file))?;
    let visible = parse_proc_cgroup(&text).ok_or(CgroupError::NoV2Line { path: cg_file })?;
    let mi_file = PathBuf::from(format!("/proc/{pid}/mountinfo"));
    let mounts = parse_mountinfo(&fs::read_to_string(&mi_file).map_err(io_err(&mi_file))?);
    let mount_root = cgroup2_mount(&mounts, layout)
        .map(|m| m.root.clone())
        .unwrap_or_else(|| "/".to_string());
    let namespaced = in_cgroup_namespace(pid)?;
    let mount = Path::new(NFT_CGROUP_ROOT).join(prefix);

    let rel = locate(&mount, &mount_root, &visible, pid)?.ok_or_else(|| CgroupError::NotFound {
        pid,
        visible: visible.clone(),
        mount: mount.clone(),
    })?;
    let nft_path = NftCgroupPath::new(&join_rel(prefix, &rel))?;
    let inode = inode_of(&nft_path.fs_path())?;
    Ok(CgroupPlacement {
        layout,
        namespaced,
        visible_level: depth(&visible),
        mount_level: depth(&rel),
        visible,
        nft_path,
        inode,
    })
}

fn join_rel(prefix: &str, rel: &str) -> String {
    match (prefix.is_empty(), rel.trim_matches('/').is_empty()) {
        (true, _) => rel.trim_matches('/').to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}/{}", rel.trim_matches('/')),
    }
}

/// Candidate directories (relative to the mount) for a visible path, in the order the kernel's
/// answers make likely. Pure, so the nested cases can be tested on fixtures.
pub fn candidate_dirs(mount_root: &str, visible: &str) -> Vec<String> {
    let vis = visible.trim_matches('/');
    let root = mount_root.trim_matches('/');
    let mut out = Vec::new();
    if root.is_empty() {
        // The mount shows the hierarchy root: the visible path (global, or namespace-relative
        // with a private mount) is the directory.
        out.push(vis.to_string());
    } else if !root.starts_with("..") {
        // A subtree is mounted (container without a cgroup namespace): the visible path is
        // global and starts with the mount's root.
        if let Some(rest) = vis.strip_prefix(root) {
            out.push(rest.trim_matches('/').to_string());
        }
        out.push(vis.to_string());
    } else {
        out.push(vis.to_string());
    }
    out
}

/// Finds the directory of `pid`'s cgroup below `mount`: first the candidates, then (inside a
/// namespace whose root is not the mount's) a bounded search for a directory whose path ends
/// with the visible path. Every hit is proved by `cgroup.procs` membership.
fn locate(
    mount: &Path,
    mount_root: &str,
    visible: &str,
    pid: u32,
) -> Result<Option<String>, CgroupError> {
    for cand in candidate_dirs(mount_root, visible) {
        if holds_pid(&mount.join(&cand), pid)? {
            return Ok(Some(cand));
        }
    }
    // Bounded breadth-first search: a nested namespace hides the names of its ancestors.
    let suffix = visible.trim_matches('/');
    let mut queue = vec![String::new()];
    let mut seen = 0usize;
    while let Some(dir) = queue.pop() {
        seen += 1;
        if seen > 20_000 {
            break;
        }
        if (suffix.is_empty() || dir.ends_with(suffix)) && holds_pid(&mount.join(&dir), pid)? {
            return Ok(Some(dir));
        }
        if let Ok(rd) = fs::read_dir(mount.join(&dir)) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    queue.push(if dir.is_empty() {
                        name
                    } else {
                        format!("{dir}/{name}")
                    });
                }
            }
        }
    }
    Ok(None)
}

/// Whether `dir/cgroup.procs` lists `pid`. A directory that vanished or is unreadable simply
/// does not hold it.
pub fn holds_pid(dir: &Path, pid: u32) -> Result<bool, CgroupError> {
    match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(t) => Ok(t.lines().any(|l| l.trim().parse::<u32>().ok() == Some(pid))),
        Err(_) => Ok(false),
    }
}

/// Inode of a cgroup directory: the id `socket cgroupv2` compares.
pub fn inode_of(dir: &Path) -> Result<u64, CgroupError> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(dir).map(|m| m.ino()).map_err(io_err(dir))
}

/// Inodes of every directory of the cgroup2 hierarchy (one walk of directories only, bounded
/// at 1,000,000), to tell which cgroup ids still exist.
pub fn hierarchy_inodes() -> Result<std::collections::HashSet<u64>, CgroupError> {
    use std::os::unix::fs::MetadataExt;
    let layout = detect_layout();
    let prefix = layout.nft_prefix().ok_or(CgroupError::NoCgroup2(layout))?;
    let root = Path::new(NFT_CGROUP_ROOT).join(prefix);
    let mut out = std::collections::HashSet::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let meta = match fs::metadata(&dir) {
            Ok(m) => m,
            // A cgroup removed during the walk simply no longer exists.
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        out.insert(meta.ino());
        if out.len() >= 1_000_000 {
            break;
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(out)
}

/// Parent pid of `pid` from `/proc/<pid>/stat` (the field after the parenthesised command,
/// which may itself contain spaces and parentheses).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ppid(&stat)
}

/// Pure part of [`parent_pid`].
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` descends from `ancestor` (walking parent pids; a process is not its own
/// descendant).
pub fn is_descendant(pid: u32, ancestor: u32) -> bool {
    let mut cur = pid;
    for _ in 0..4096 {
        match parent_pid(cur) {
            Some(p) if p == ancestor => return true,
            Some(p) if p > 1 && p != cur => cur = p,
            _ => return false,
        }
    }
    false
}

/// Name of the child cgroup the agent moves into when its cgroup is shared.
pub const ISOLATION_CHILD: &str = "bosh-agent";

/// What [`isolate_self`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// The agent's cgroup holds only the agent and its descendants.
    AlreadyAlone,
    /// The agent moved from `from` into `to` because `sharers` (other processes) were there.
    Moved {
        from: PathBuf,
        to: PathBuf,
        sharers: Vec<u32>,
    },
}

/// Ensures the agent's cgroup identity is not shared: if its cgroup also holds processes that
/// are not its descendants (e.g. everything runit supervises shares `runit.service`), it moves
/// itself into a dedicated child cgroup. Must run before the agent opens any socket, because a
/// socket keeps the cgroup it was created in.
pub fn isolate_self() -> Result<Isolation, CgroupError> {
    let me = std::process::id();
    let placement = placement_of(me)?;
    let dir = placement.nft_path.fs_path();
    let procs_file = dir.join("cgroup.procs");
    let procs = fs::read_to_string(&procs_file).map_err(io_err(&procs_file))?;
    let sharers: Vec<u32> = procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter(|&p| p != me && !is_descendant(p, me))
        .collect();
    if sharers.is_empty() {
        return Ok(Isolation::AlreadyAlone);
    }
    let child = dir.join(ISOLATION_CHILD);
    match fs::create_dir(&child) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(CgroupError::Move {
                pid: me,
                path: child,
                source,
            });
        }
    }
    fs::write(child.join("cgroup.procs"), me.to_string()).map_err(|source| CgroupError::Move {
        pid: me,
        path: child.clone(),
        source,
    })?;
    Ok(Isolation::Moved {
        from: dir,
        to: child,
        sharers,
    })
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
