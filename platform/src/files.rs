//! Durable, private file writes: the one way the agent writes a file that may hold a secret
//! (settings, the director's `update_settings`, the applied spec, the mbus that last
//! connected, the firewall state).
//!
//! [`write_private`] guarantees that a reader sees either the old file or the whole new one —
//! also after a power loss — and that the new file is never readable by anyone but root, not
//! even for an instant: the temporary file is created `O_EXCL` with mode 0600 in the target's
//! directory, written, fsynced, renamed over the target, and the directory is fsynced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file [`write_private`] creates.
pub const PRIVATE_MODE: u32 = 0o600;

/// A write that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct WriteError {
    /// The file (or directory) the failing step was about.
    pub path: PathBuf,
    /// What the kernel said.
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `bytes`, mode 0600, durably and atomically (see the module
/// documentation). Missing parent directories are created (mode 0700). On error the old file
/// (if any) is unchanged and no temporary file is left behind.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_durable(path, bytes, PRIVATE_MODE)
}

/// [`write_private`] with another mode, for files that hold no secret and that jobs read
/// (e.g. `instance/health.json`): the same atomicity and durability, mode exactly `mode`.
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(at(dir))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), nonce()));
    let res = write_new(&tmp, bytes, mode).and_then(|()| fs::rename(&tmp, path).map_err(at(path)));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
        return res;
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

fn write_new(tmp: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_MODE & mode)
        .open(tmp)
        .map_err(at(tmp))?;
    // The umask can only remove bits; this makes the mode exact whatever it is (widened only
    // after creation, so the file is never more open than both modes while it fills).
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(at(tmp))?;
    f.write_all(bytes).map_err(at(tmp))?;
    f.sync_all().map_err(at(tmp))
}

/// A per-call suffix so that two writers of one file in one process never share a temporary.
fn nonce() -> String {
    let mut b = [0u8; 6];
    let ok = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if ok.is_err() {
        // Uniqueness within the process is all that matters; time is a fine fallback.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        return format!("{t:x}");
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What [`restrict`] did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restricted {
    /// The file's mode was more open than 0600 and was narrowed (the old mode is given).
    Narrowed(u32),
    /// The file was already private.
    AlreadyPrivate,
    /// There is no such file.
    Absent,
}

/// Makes an existing file private (mode 0600) if it is readable or writable by group or
/// others. Used at boot on the files an older agent (or this one before it wrote them
/// privately) may have left open.
pub fn restrict(path: &Path) -> Result<Restricted, WriteError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Restricted::Absent),
        Err(e) => return Err(at(path)(e)),
    };
    // A link is not followed: whatever it points at is not the agent's file to change.
    if !meta.is_file() {
        return Ok(Restricted::AlreadyPrivate);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(Restricted::AlreadyPrivate);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700)).map_err(at(path))?;
    Ok(Restricted::Narrowed(mode))
}

/// Removes the temporary files [`write_private`] leaves when the process is killed between
/// creating and renaming them (`.<name>.<pid>.<nonce>.tmp` in `dir`). Returns how many.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") && fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("platform-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn new_and_replaced_files_are_0600_with_the_whole_content() {
        let d = tmp("mode");
        let p = d.join("sub/dir/update_settings.json");
        write_private(&p, b"secret-1").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret-1");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        // An existing world-readable file is replaced by a private one.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"secret-2").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret-2");
        assert_eq!(mode(&p), 0o600);
        // No temporary is left.
        let left: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let d = tmp("fail");
        let p = d.join("spec.json");
        write_private(&p, b"old").unwrap();
        // The target is a directory now: the rename fails.
        let q = d.join("adir");
        fs::create_dir_all(q.join("x")).unwrap();
        let e = write_private(&q, b"new").unwrap_err();
        assert!(e.to_string().contains("adir"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn restrict_narrows_open_files_only() {
        let d = tmp("restrict");
        let open = d.join("settings.json");
        fs::write(&open, "x").unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(restrict(&open).unwrap(), Restricted::Narrowed(0o644));
        assert_eq!(mode(&open), 0o600);
        assert_eq!(restrict(&open).unwrap(), Restricted::AlreadyPrivate);
        assert_eq!(restrict(&d.join("none")).unwrap(), Restricted::Absent);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stale_temporaries_are_removed() {
        let d = tmp("stale");
        fs::write(d.join(".spec.json.12.ab.tmp"), "x").unwrap();
        fs::write(d.join("spec.json"), "y").unwrap();
        assert_eq!(remove_stale_temporaries(&d), 1);
        assert!(d.join("spec.json").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
