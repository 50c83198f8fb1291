//! Temporary directories, removed with their contents on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Result, err};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Creates `<parent>/<tag>-<pid>-<n>` (a fresh name: one left by an earlier run is skipped,
/// never reused) and returns its path.
pub fn unique_dir(parent: &Path, tag: &str) -> Result<PathBuf> {
    for _ in 0..1000 {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!("{tag}-{}-{n}", std::process::id()));
        match fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return err(format!("creating {}: {e}", p.display())),
        }
    }
    err(format!("no free name for {tag} under {}", parent.display()))
}

/// A fresh directory under the system temporary directory, deleted with everything in it on
/// drop (a failure to delete is printed, never ignored silently).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<Self> {
        Ok(TempDir {
            path: unique_dir(&std::env::temp_dir(), tag)?,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory (not created).
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("testkit: removing {}: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_names_and_removal_on_drop() -> Result<()> {
        let a = TempDir::new("testkit-t")?;
        let b = TempDir::new("testkit-t")?;
        assert_ne!(a.path(), b.path());
        fs::write(a.join("f"), "x").map_err(crate::io_ctx("writing"))?;
        fs::create_dir(a.join("d")).map_err(crate::io_ctx("mkdir"))?;
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "{} left behind", path.display());
        assert!(b.path().is_dir());
        Ok(())
    }
}
