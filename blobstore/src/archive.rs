//! A tar reader that never writes outside its target. See the crate documentation.
//!
//! [`unpack`] reads a tar stream (gzip-compressed or not, told apart by gzip's magic bytes)
//! and writes each entry itself rather than trusting the tar crate's own unpacking, so that
//! every path is checked before anything is created:
//!
//! - absolute paths and `..` components are refused (upstream's GNU tar strips a leading `/`
//!   and skips `..` members; a director never sends either, so refusing the whole archive is
//!   the safer reading);
//! - every parent directory of an entry must be a real directory inside the target: an entry
//!   under a symlink (which only this archive can have created, the target being empty) is
//!   refused, so nothing is ever written through a link;
//! - a symlink's target must be relative and stay inside the target, resolved from the link's
//!   directory and through the symlinks this archive created before it; a symlink may not
//!   later be created or replaced at a path an earlier link's target walks through (which
//!   would change where that link points);
//! - a hard link must point at a regular file this archive already unpacked;
//! - character and block devices, fifos and unknown entry types are refused.
//!
//! Permission bits come from the archive without setuid and setgid; owners are never set (as
//! `tar --no-same-owner`); modification times are kept. Directory modes and times are set
//! after every entry is written, so a read-only directory does not stop its own contents.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;
use tar::EntryType;

use crate::digest::{Algorithm, Digest, Hasher};

/// Which entries of an archive to unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// Every entry (packages, compile sources).
    All,
    /// Only entries under `<job>/` or `./<job>/` (a rendered templates archive holds every job
    /// of the instance), with that prefix stripped.
    Job(String),
}

/// Why an archive was refused. Entry names are the archive's own (lossily decoded).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The stream is not a readable tar (or gzip) archive, or reading it failed.
    #[error("reading the archive: {0}")]
    Read(#[source] io::Error),
    /// Creating or writing a file in the target failed (e.g. no space left).
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An entry's path is absolute.
    #[error("archive entry '{entry}' has an absolute path")]
    AbsolutePath { entry: String },
    /// An entry's path has a `..` component.
    #[error("archive entry '{entry}' has a '..' component")]
    ParentDir { entry: String },
    /// A symlink's target is absolute or leads outside the target directory.
    #[error("archive symlink '{entry}' -> '{target}' is refused: {reason}")]
    UnsafeSymlink {
        entry: String,
        target: String,
        reason: &'static str,
    },
    /// A hard link's target is outside the selection or not a file unpacked before it.
    #[error("archive hard link '{entry}' -> '{target}' is refused: {reason}")]
    UnsafeHardLink {
        entry: String,
        target: String,
        reason: &'static str,
    },
    /// A device, fifo or entry of unknown type.
    #[error("archive entry '{entry}' is a {kind}, which is never unpacked")]
    SpecialFile { entry: String, kind: String },
    /// An entry lies under a symlink, or would replace a directory or a symlink that an
    /// earlier link depends on.
    #[error("archive entry '{entry}' is refused: {reason}")]
    Conflict { entry: String, reason: String },
    /// The job name to select is not one path component.
    #[error("job name '{name}' is not a single path component")]
    InvalidJobName { name: String },
    /// The target is not an existing empty directory.
    #[error("unpack target {} must be an existing empty directory", path.display())]
    TargetNotEmpty { path: PathBuf },
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Entries written (files, directories, links), the root directory not counted.
    pub entries: u64,
    /// Entries skipped because they were outside the selection.
    pub skipped: u64,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Unpacks the tar stream `reader` (gzip or plain) into `dest`, an existing empty directory.
///
/// Guarantees: nothing is created or modified outside `dest` whatever the archive holds (see
/// the module documentation for the rules); on error, what was already written inside `dest`
/// is left for the caller to remove. Reads the archive up to its end-of-archive marker and no
/// further; the caller drains the rest if it hashes the stream.
pub fn unpack<R: Read>(reader: R, dest: &Path, select: &Select) -> Result<Unpacked, ArchiveError> {
    if let Select::Job(name) = select {
        let mut comps = Path::new(name).components();
        if !matches!(
            (comps.next(), comps.next()),
            (Some(Component::Normal(_)), None)
        ) || name.contains('/')
        {
            return Err(ArchiveError::InvalidJobName { name: name.clone() });
        }
    }
    let empty = fs::read_dir(dest)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if !empty || !fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        return Err(ArchiveError::TargetNotEmpty {
            path: dest.to_path_buf(),
        });
    }

    let mut buffered = BufReader::with_capacity(64 * 1024, reader);
    let head = buffered.fill_buf().map_err(ArchiveError::Read)?;
    let gzipped = head.starts_with(&GZIP_MAGIC);
    if gzipped {
        let gz = flate2::bufread::MultiGzDecoder::new(buffered);
        Unpacker::new(dest, select).run(tar::Archive::new(gz))
    } else {
        Unpacker::new(dest, select).run(tar::Archive::new(buffered))
    }
}

struct Unpacker<'a> {
    dest: &'a Path,
    select: &'a Select,
    /// Regular files this archive wrote (relative paths), for hard links.
    files: HashSet<PathBuf>,
    /// Symlinks this archive made: relative path → its target resolved inside `dest`.
    symlinks: HashMap<PathBuf, Vec<PathBuf>>,
    /// Paths some symlink's target walks through (not its last component): replacing one by
    /// a (different) symlink or anything else would change where that link points.
    walked: HashSet<PathBuf>,
    /// Directories whose mode and time are set at the end: (relative path, mode, mtime).
    dirs: Vec<(PathBuf, u32, Option<FileTime>)>,
    stats: Unpacked,
}

/// Keeps the permission bits and the sticky bit; drops setuid and setgid.
fn mask_mode(mode: u32) -> u32 {
    mode & 0o1777
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl<'a> Unpacker<'a> {
    fn new(dest: &'a Path, select: &'a Select) -> Self {
        Unpacker {
            dest,
            select,
            files: HashSet::new(),
            symlinks: HashMap::new(),
            walked: HashSet::new(),
            dirs: Vec::new(),
            stats: Unpacked::default(),
        }
    }

    fn run<R: Read>(mut self, mut archive: tar::Archive<R>) -> Result<Unpacked, ArchiveError> {
        let entries = archive.entries().map_err(ArchiveError::Read)?;
        for entry in entries {
            let mut entry = entry.map_err(ArchiveError::Read)?;
            self.entry(&mut entry)?;
        }
        // Deepest first, so that a read-only parent is set after its children.
        self.dirs
            .sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
        for (rel, mode, mtime) in std::mem::take(&mut self.dirs) {
            let path = self.dest.join(&rel);
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|source| {
                ArchiveError::Write {
                    path: path.clone(),
                    source,
                }
            })?;
            if let Some(t) = mtime {
                filetime::set_file_mtime(&path, t)
                    .map_err(|source| ArchiveError::Write { path, source })?;
            }
        }
        Ok(self.stats)
    }

    /// The entry's path relative to the archive root: no `.` components, no `..`, not
    /// absolute. An empty result is the root itself.
    fn normalize(entry_name: &Path) -> Result<PathBuf, ArchiveError> {
        let mut out = PathBuf::new();
        for c in entry_name.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(ArchiveError::ParentDir {
                        entry: lossy(entry_name),
                    });
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(ArchiveError::AbsolutePath {
                        entry: lossy(entry_name),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Applies the selection: `None` when the entry is not selected.
    fn select(&self, rel: PathBuf) -> Option<PathBuf> {
        match self.select {
            Select::All => Some(rel),
            Select::Job(name) => rel.strip_prefix(name).ok().map(Path::to_path_buf),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ArchiveError> {
        let name = entry.path().map_err(ArchiveError::Read)?.into_owned();
        let kind = entry.header().entry_type();
        let shown = lossy(&name);
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link => {}
            // Extension headers the tar crate did not fold into the next entry: metadata only.
            EntryType::XGlobalHeader | EntryType::XHeader => return Ok(()),
            other => {
                let kind = match other {
                    EntryType::Char => "character device".to_string(),
                    EntryType::Block => "block device".to_string(),
                    EntryType::Fifo => "fifo".to_string(),
                    o => format!("entry of type {:?}", o.as_byte() as char),
                };
                return Err(ArchiveError::SpecialFile { entry: shown, kind });
            }
        }
        let rel = Self::normalize(&name)?;
        let Some(rel) = self.select(rel) else {
            self.stats.skipped += 1;
            return Ok(());
        };
        let mode = mask_mode(entry.header().mode().map_err(ArchiveError::Read)?);
        let mtime = entry
            .header()
            .mtime()
            .ok()
            .and_then(|t| i64::try_from(t).ok())
            .map(|t| FileTime::from_unix_time(t, 0));

        if rel.as_os_str().is_empty() {
            // The archive's root (`./`, or `./<job>/` once stripped): only a directory may be
            // there, and it describes `dest` itself.
            if kind != EntryType::Directory {
                return Err(ArchiveError::Conflict {
                    entry: shown,
                    reason: "only a directory can stand for the archive's root".to_string(),
                });
            }
            self.dirs.push((rel, mode, mtime));
            return Ok(());
        }

        self.make_parents(&rel, &shown)?;
        let path = self.dest.join(&rel);
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.clear(&rel, &shown)?;
                        self.mkdir(&path)?;
                    }
                    Err(_) => self.mkdir(&path)?,
                }
                self.dirs.push((rel, mode, mtime));
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let resolved = self.resolve_symlink(&rel, &target, &shown)?;
                self.clear(&rel, &shown)?;
                std::os::unix::fs::symlink(&target, &path).map_err(|source| {
                    ArchiveError::Write {
                        path: path.clone(),
                        source,
                    }
                })?;
                if let Some(t) = mtime {
                    // Best effort, as tar: a link's own time matters to nobody.
                    let _ = filetime::set_symlink_file_times(&path, t, t);
                }
                self.symlinks.insert(rel, resolved);
            }
            EntryType::Link => {
                let target_name = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let refuse = |reason| ArchiveError::UnsafeHardLink {
                    entry: shown.clone(),
                    target: lossy(&target_name),
                    reason,
                };
                let target_rel = match Self::normalize(&target_name) {
                    Ok(t) => t,
                    Err(ArchiveError::AbsolutePath { .. }) => {
                        return Err(refuse("its target is an absolute path"));
                    }
                    Err(_) => return Err(refuse("its target has a '..' component")),
                };
                let Some(target_rel) = self.select(target_rel) else {
                    return Err(refuse("its target is outside the unpacked entries"));
                };
                if !self.files.contains(&target_rel) {
                    return Err(refuse("its target is not a file unpacked before it"));
                }
                let target_path = self.dest.join(&target_rel);
                if !fs::symlink_metadata(&target_path).is_ok_and(|m| m.is_file()) {
                    return Err(refuse("its target is no longer a regular file"));
                }
                if target_rel != rel {
                    self.clear(&rel, &shown)?;
                    fs::hard_link(&target_path, &path).map_err(|source| ArchiveError::Write {
                        path: path.clone(),
                        source,
                    })?;
                }
                self.files.insert(rel);
            }
            _ => {
                // Regular, contiguous and sparse files: the tar crate expands sparse data.
                self.clear(&rel, &shown)?;
                let write_err = |source| ArchiveError::Write {
                    path: path.clone(),
                    source,
                };
                // `create_new` never follows a symlink, which `clear` has removed anyway.
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(write_err)?;
                copy_entry(entry, &mut file, &path)?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(write_err)?;
                if let Some(t) = mtime {
                    filetime::set_file_handle_times(&file, Some(t), Some(t)).map_err(write_err)?;
                }
                self.files.insert(rel);
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> Result<(), ArchiveError> {
        fs::create_dir(path).map_err(|source| ArchiveError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Creates the missing parents of `rel` as directories (mode 0755 until an entry of the
    /// archive says otherwise) and refuses a parent that is anything but a directory.
    fn make_parents(&mut self, rel: &Path, shown: &str) -> Result<(), ArchiveError> {
        let mut cur = PathBuf::new();
        let parents: Vec<_> = rel
            .parent()
            .map(|p| p.components().collect())
            .unwrap_or_default();
        for c in parents {
            cur.push(c);
            let path = self.dest.join(&cur);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(ArchiveError::Conflict {
                        entry: shown.to_string(),
                        reason: format!("its parent '{}' is a symlink", lossy(&cur)),
                    });
                }
                Ok(_) => {
                    return Err(ArchiveError::Conflict {
                        entry: shown.to_string(),
                        reason: format!("its parent '{}' is not a directory", lossy(&cur)),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&path).map_err(|source| ArchiveError::Write {
                        path: path.clone(),
                        source,
                    })?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .map_err(|source| ArchiveError::Write { path, source })?;
                }
                Err(source) => return Err(ArchiveError::Write { path, source }),
            }
        }
        Ok(())
    }

    /// Removes what an earlier entry left at `rel` (a later entry for the same path wins, as
    /// in tar), refusing to remove a directory or a path an earlier symlink depends on.
    fn clear(&mut self, rel: &Path, shown: &str) -> Result<(), ArchiveError> {
        let path = self.dest.join(rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(ArchiveError::Write { path, source }),
        };
        if meta.is_dir() {
            return Err(ArchiveError::Conflict {
                entry: shown.to_string(),
                reason: "a directory of the same name was unpacked before it".to_string(),
            });
        }
        if self.walked.contains(rel) {
            return Err(ArchiveError::Conflict {
                entry: shown.to_string(),
                reason: "an earlier symlink's target goes through this path".to_string(),
            });
        }
        fs::remove_file(&path).map_err(|source| ArchiveError::Write { path, source })?;
        self.files.remove(rel);
        self.symlinks.remove(rel);
        Ok(())
    }

    /// Resolves symlink `rel` → `target` inside `dest`, lexically from the link's directory
    /// and through the symlinks this archive made; records the paths walked through.
    fn resolve_symlink(
        &mut self,
        rel: &Path,
        target: &Path,
        shown: &str,
    ) -> Result<Vec<PathBuf>, ArchiveError> {
        let refuse = |reason| ArchiveError::UnsafeSymlink {
            entry: shown.to_string(),
            target: lossy(target),
            reason,
        };
        if target.as_os_str().is_empty() {
            return Err(refuse("its target is empty"));
        }
        if self.walked.contains(rel) {
            return Err(refuse("an earlier symlink's target goes through this path"));
        }
        let mut stack: Vec<PathBuf> = rel
            .parent()
            .map(|p| {
                p.components()
                    .map(|c| PathBuf::from(c.as_os_str()))
                    .collect()
            })
            .unwrap_or_default();
        let comps: Vec<Component<'_>> = target.components().collect();
        let mut walked = Vec::new();
        for (i, c) in comps.iter().enumerate() {
            let last = i + 1 == comps.len();
            match c {
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse("its target is absolute"));
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    if stack.pop().is_none() {
                        return Err(refuse("its target leads outside the unpacked tree"));
                    }
                }
                Component::Normal(n) => {
                    stack.push(PathBuf::from(n));
                    let here: PathBuf = stack.iter().collect();
                    if here == rel {
                        return Err(refuse("its target goes through the link itself"));
                    }
                    if !last {
                        walked.push(here.clone());
                        if let Some(resolved) = self.symlinks.get(&here) {
                            stack = resolved.clone();
                        }
                    }
                }
            }
        }
        // The link's own parent directories need no record: `clear` never replaces a
        // directory.
        self.walked.extend(walked);
        Ok(stack)
    }
}

/// Copies an entry's data into `file`, telling a failed read of the archive from a failed
/// write of the file.
fn copy_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    file: &mut File,
    path: &Path,
) -> Result<(), ArchiveError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchiveError::Read(e)),
        };
        file.write_all(buf.get(..n).unwrap_or_default())
            .map_err(|source| ArchiveError::Write {
                path: path.to_path_buf(),
                source,
            })?;
    }
}

/// Writes a tar (gzip-compressed when `gzip`) of the contents of `dir` to the new file `out`,
/// like `tar -czf out -C dir .`: entries in sorted order, symlinks kept as links, modes and
/// times from the files. Returns the sha1 of the bytes written to `out`, computed while
/// writing. On error `out` is removed.
pub fn pack_dir(dir: &Path, out: &Path, gzip: bool) -> Result<Digest, ArchiveError> {
    let result = pack_dir_inner(dir, out, gzip);
    if result.is_err() {
        let _ = fs::remove_file(out);
    }
    result
}

fn pack_dir_inner(dir: &Path, out: &Path, gzip: bool) -> Result<Digest, ArchiveError> {
    let write_err = |source| ArchiveError::Write {
        path: out.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(out)
        .map_err(write_err)?;
    let sink = HashingWriter {
        inner: io::BufWriter::new(file),
        hasher: Hasher::new(Algorithm::Sha1),
    };
    let finish = |mut sink: HashingWriter<io::BufWriter<File>>| -> io::Result<Digest> {
        sink.inner.flush()?;
        let file = sink.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(sink.hasher.finish())
    };
    if gzip {
        let gz = flate2::write::GzEncoder::new(sink, flate2::Compression::default());
        let gz = append_tree(tar::Builder::new(gz), dir)?
            .into_inner()
            .map_err(write_err)?;
        finish(gz.finish().map_err(write_err)?).map_err(write_err)
    } else {
        let sink = append_tree(tar::Builder::new(sink), dir)?
            .into_inner()
            .map_err(write_err)?;
        finish(sink).map_err(write_err)
    }
}

fn append_tree<W: Write>(
    mut builder: tar::Builder<W>,
    dir: &Path,
) -> Result<tar::Builder<W>, ArchiveError> {
    builder.follow_symlinks(false);
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArchiveError::Write { path, source }
    };
    // Depth-first, sorted, iteratively (no recursion on hostile depth).
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        if !rel.as_os_str().is_empty() {
            builder
                .append_path_with_name(&abs, Path::new(".").join(&rel))
                .map_err(read_err(&abs))?;
        }
        let meta = fs::symlink_metadata(&abs).map_err(read_err(&abs))?;
        if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&abs)
                .map_err(read_err(&abs))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()
                .map_err(read_err(&abs))?;
            names.sort();
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
        }
    }
    Ok(builder)
}

struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
#[path = "archive_tests.rs"]
mod tests;
