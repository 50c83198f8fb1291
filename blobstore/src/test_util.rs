//! Helpers for this crate's unit tests.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// A fresh directory under the system temporary directory, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(format!("bs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&p).unwrap();
        TestDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
