//! The archive reader on hostile bytes: whatever the tar (or gzip) stream holds, nothing is
//! created outside the target directory, and nothing inside it leads out of it (no symlink
//! whose target leaves it, no hard link to a file outside it, no setuid or setgid bit).
#![no_main]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blobstore::archive::{Select, unpack};
use libfuzzer_sys::fuzz_target;

static RUN: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("agent-fuzz-archive-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let dest = root.join("dest");
    fs::create_dir_all(&dest).expect("creating the fuzz target directory");
    // A file outside the target that an escaping entry would overwrite or link to.
    fs::write(root.join("outside"), b"untouched").expect("creating the sentinel");
    let select = if data.first().is_some_and(|b| b & 1 == 1) {
        Select::Job("web".into())
    } else {
        Select::All
    };
    let _ = unpack(data, &dest, &select);

    let mut names: Vec<_> = fs::read_dir(&root)
        .expect("listing the fuzz root")
        .map(|e| e.expect("a root entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["dest", "outside"], "an entry landed outside the target");
    assert_eq!(fs::read(root.join("outside")).expect("the sentinel"), b"untouched");
    let outside_ino = fs::metadata(root.join("outside")).expect("the sentinel").ino();
    check_tree(&dest, &dest, outside_ino);
    fs::remove_dir_all(&root).expect("removing the fuzz root");
});

fn check_tree(dest: &Path, dir: &Path, outside_ino: u64) {
    for entry in fs::read_dir(dir).expect("listing an unpacked directory") {
        let entry = entry.expect("an unpacked entry");
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).expect("an unpacked entry's metadata");
        assert_ne!(meta.ino(), outside_ino, "{} is a hard link out", path.display());
        assert_eq!(meta.permissions().mode() & 0o6000, 0, "{} keeps setuid/setgid", path.display());
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).expect("a symlink's target");
            let parent = path.parent().unwrap_or(dest);
            let resolved = lexical(&parent.join(target));
            assert!(resolved.starts_with(dest), "{} points out of the target", path.display());
        } else if meta.is_dir() {
            check_tree(dest, &path, outside_ino);
        }
    }
}

/// `..` resolved without touching the filesystem (a symlink chain inside the target is
/// checked link by link, so lexical resolution of each is enough).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
