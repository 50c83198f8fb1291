//! Cgroups the tests create under the cgroup2 mount, and their removal (deepest first; never
//! killing anything the harness did not start).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::io_ctx;

use crate::{NFT_CGROUP_ROOT, Result, cgroup2_mount, err};

/// A cgroup directory (a plain handle: removal of the tree is [`Cgroup`]'s job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    path: PathBuf,
}

impl CgroupDir {
    /// A handle for an existing directory (e.g. the v2 root, for the "caller in the root
    /// cgroup" case).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        CgroupDir { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as nft and the agent's rule comments write it: relative to /sys/fs/cgroup
    /// (`unified/...` on hybrid hosts).
    pub fn nft_path(&self) -> String {
        self.path
            .strip_prefix(NFT_CGROUP_ROOT)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| self.path.to_string_lossy().into_owned())
    }

    /// The cgroup's inode: the id `socket cgroupv2` compares and `cgid=` records.
    pub fn inode(&self) -> Result<u64> {
        fs::metadata(&self.path)
            .map(|m| m.ino())
            .map_err(io_ctx(format!("stat {}", self.path.display())))
    }

    /// Pids in this cgroup (not its children).
    pub fn procs(&self) -> Result<Vec<u32>> {
        let f = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&f).map_err(io_ctx(format!("reading {}", f.display())))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// A child handle (not created).
    pub fn join(&self, name: &str) -> CgroupDir {
        CgroupDir {
            path: self.path.join(name),
        }
    }

    /// Creates the directory (and missing parents).
    pub fn create(&self) -> Result<()> {
        fs::create_dir_all(&self.path).map_err(io_ctx(format!("mkdir {}", self.path.display())))
    }

    /// Removes the directory and every cgroup below it; see [`remove_cgroup_tree`].
    pub fn remove(&self) -> Result<()> {
        remove_cgroup_tree(&self.path)
    }
}

impl AsRef<Path> for CgroupDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// A uniquely named cgroup under the cgroup2 mount (`<mount>/bosh-agent-test-<pid>-<n>`),
/// removed with everything below it on drop. Kills nothing: the processes the harness started
/// are gone by then, and anything else left inside is moved to the parent so the directory
/// can go.
#[derive(Debug)]
pub struct Cgroup {
    dir: CgroupDir,
}

impl Cgroup {
    /// Creates the cgroup under the detected cgroup2 mount.
    pub fn create() -> Result<Self> {
        let mount = cgroup2_mount()?;
        Ok(Cgroup {
            dir: CgroupDir {
                path: testkit::unique_dir(&mount, "bosh-agent-test")?,
            },
        })
    }

    /// The cgroup.
    pub fn dir(&self) -> &CgroupDir {
        &self.dir
    }

    /// Creates (if needed) and returns the child `name` (may contain `/`).
    pub fn child(&self, name: &str) -> Result<CgroupDir> {
        let c = self.dir.join(name);
        c.create()?;
        Ok(c)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup_tree(&self.dir.path) {
            eprintln!("integration: {e}");
        }
    }
}

/// Removes a cgroup and its descendants, deepest first. A cgroup whose processes are still
/// exiting is retried for a while; processes that stay are moved to the parent cgroup (never
/// killed: the harness only kills what it started).
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return err(format!("listing {}: {e}", dir.display())),
    };
    let mut first_error = Ok(());
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false)
            && let Err(x) = remove_cgroup_tree(&e.path())
        {
            first_error = first_error.and(Err(x));
        }
    }
    let start = Instant::now();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return first_error,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return first_error,
            Err(e) if start.elapsed() > Duration::from_secs(5) => {
                return err(format!("removing cgroup {}: {e}", dir.display()));
            }
            Err(_) => {
                if start.elapsed() > Duration::from_secs(1) {
                    move_to_parent(dir);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn move_to_parent(dir: &Path) {
    let (Ok(text), Some(parent)) = (fs::read_to_string(dir.join("cgroup.procs")), dir.parent())
    else {
        return;
    };
    for pid in text.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!(
            "integration: moving leftover pid {pid} from {} to {}",
            dir.display(),
            parent.display()
        );
        let _ = fs::write(parent.join("cgroup.procs"), pid);
    }
}
