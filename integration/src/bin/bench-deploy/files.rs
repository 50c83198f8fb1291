//! File and command helpers of the benchmark: commands that must succeed, ids, digests,
//! emptying, counting and syncing directories.

use super::*;

pub(crate) fn run_ok(cmd: &mut Command, what: &str) -> Res<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn uuid() -> Res<String> {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("reading a uuid: {e}"))
}

pub(crate) fn sha1_hex(bytes: &[u8]) -> String {
    Digest::of(Algorithm::Sha1, bytes).hex
}

/// Removes `dir`'s entries (not `dir`).
pub(crate) fn empty_dir(dir: &Path) -> Res<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        let is_dir = fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        let r = if is_dir {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(|e| format!("removing {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Regular files below `dir` (symlinks not followed) and their total size.
pub(crate) fn count_files(dir: &Path) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                n += 1;
                bytes += m.len();
            }
        }
    }
    (n, bytes)
}

/// Flushes what the last run left dirty, so that its writeback does not land in the next
/// run (only this filesystem; nothing is dropped from the page cache).
pub(crate) fn sync_fs(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = nix::unistd::syncfs(&f);
    }
}
