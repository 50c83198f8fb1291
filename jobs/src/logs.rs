//! `fetch_logs`: the VM's log files, filtered, as one gzipped tar streamed to the blobstore.
//!
//! As upstream's agent (`agent/action/fetch_logs.go`, `agent/logstarprovider`):
//!
//! - the log types are a comma-separated list: `job` → `<base>/sys/log`, `agent` →
//!   `<base>/bosh/log`, `system` → `/var/log` (archived under `var/log/`); anything else is
//!   `Invalid log type`;
//! - the filters are doublestar globs ([`glob`]) relative to each directory, `**/*` when none
//!   are given; a filter naming a directory means everything below it;
//! - only regular files are archived, under their path relative to their directory; when two
//!   types give the same path the later type's file wins;
//! - the value is `{"blobstore_id": <new UUID>, "sha1": <sha1 hex of the tarball>}`.
//!
//! Where this differs, and why:
//!
//! - Nothing is copied to a temporary directory and no tarball is written to disk: a writer
//!   thread produces the tar.gz straight into the upload ([`blobstore::Blobs::upload_stream`];
//!   with `dav` the body goes out chunked; a command-line provider spools it to a temporary
//!   file, as it only takes files).
//! - **Symbolic links are never followed** and never archived: not the links among the files,
//!   not links to directories. Each file is opened component by component from the log
//!   directory with `O_NOFOLLOW` (`openat`), so a link swapped in between listing and reading
//!   cannot lead outside the directory either. (Upstream's glob and copy follow links, so a
//!   job could have the agent ship `/etc/shadow`.) The log directory itself may be reached
//!   through links (`<base>/sys` is one).
//! - A file that vanishes before it is read (log rotation) is left out; a file that grows or
//!   shrinks while it is read is archived with the size it had when opened (cut or
//!   zero-padded), so the archive is always well-formed.
//! - A filter with a `..` component is refused instead of reaching outside the directory.

pub mod glob;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blobstore::{BlobError, Blobs, Uploaded};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

pub use glob::{Pattern, PatternError};

/// The filter used when the director sends none.
pub const DEFAULT_FILTER: &str = "**/*";
/// Upstream's error for a log type it does not know (the type follows it here).
pub const INVALID_LOG_TYPE: &str = "Invalid log type";
/// Where `system` files go inside the archive (upstream's prefix).
pub const SYSTEM_PREFIX: &str = "var/log";

/// The directories behind the log types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDirs {
    /// `job`: `<base>/sys/log`.
    pub job: PathBuf,
    /// `agent`: `<base>/bosh/log`.
    pub agent: PathBuf,
    /// `system`: `/var/log`.
    pub system: PathBuf,
}

impl LogDirs {
    /// Upstream's directories for base directory `base` (`/var/vcap` on a VM).
    pub fn new(base: &Path) -> Self {
        LogDirs {
            job: base.join("sys/log"),
            agent: base.join("bosh/log"),
            system: PathBuf::from("/var/log"),
        }
    }
}

/// Why logs could not be fetched. Every variant names what it is about.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// A log type other than `job`, `agent` and `system`.
    #[error("Invalid log type '{0}'")]
    InvalidType(String),
    /// A filter that is malformed or reaches outside its directory.
    #[error(transparent)]
    Filter(#[from] PatternError),
    /// Reading a log directory or file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the archive failed (for an upload: the upload stopped).
    #[error("writing the logs archive: {0}")]
    Archive(#[source] io::Error),
    /// The blobstore refused or failed the upload.
    #[error("Create file on blobstore: {0}")]
    Upload(#[source] BlobError),
}

/// Which directory a [`LogType`] reads and where its files go in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogType {
    Job,
    Agent,
    System,
}

impl LogType {
    /// Parses upstream's comma-separated list (`"job"`, `"agent,job,system"`); the order is
    /// kept (a later type's file wins a path clash).
    pub fn parse_list(types: &str) -> Result<Vec<LogType>, LogsError> {
        types
            .split(',')
            .map(|t| match t {
                "job" => Ok(LogType::Job),
                "agent" => Ok(LogType::Agent),
                "system" => Ok(LogType::System),
                other => Err(LogsError::InvalidType(other.chars().take(100).collect())),
            })
            .collect()
    }

    fn dir(self, dirs: &LogDirs) -> &Path {
        match self {
            LogType::Job => &dirs.job,
            LogType::Agent => &dirs.agent,
            LogType::System => &dirs.system,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            LogType::System => SYSTEM_PREFIX,
            _ => "",
        }
    }
}

/// One file to archive: its directory (an index into [`Plan::roots`]), its path below that
/// directory, component by component.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    root: usize,
    components: Vec<OsString>,
}

/// The files to archive, listed once; [`write_archive`] opens and streams them.
#[derive(Debug, Clone)]
pub struct Plan {
    roots: Vec<PathBuf>,
    /// Archive path (without `./`) → entry; sorted, so archives are deterministic.
    entries: BTreeMap<Vec<u8>, Entry>,
}

impl Plan {
    /// Lists the files of `types` matching `filters` (empty: [`DEFAULT_FILTER`]). A log
    /// directory that does not exist contributes nothing; an unreadable subdirectory is
    /// skipped (upstream's glob ignores them too).
    pub fn new(dirs: &LogDirs, types: &[LogType], filters: &[String]) -> Result<Plan, LogsError> {
        let filters: Vec<String> = if filters.is_empty() {
            vec![DEFAULT_FILTER.to_string()]
        } else {
            filters.to_vec()
        };
        let mut parsed = Vec::new();
        for f in &filters {
            parsed.extend(Pattern::parse(f)?);
        }
        let mut plan = Plan {
            roots: Vec::new(),
            entries: BTreeMap::new(),
        };
        for t in types {
            let root = t.dir(dirs).to_path_buf();
            let idx = plan.roots.len();
            let patterns = directory_rule(&root, &parsed);
            for components in list_files(&root) {
                let names: Vec<String> = components
                    .iter()
                    .map(|c| c.to_string_lossy().into_owned())
                    .collect();
                if !patterns.iter().any(|p| p.matches(&names)) {
                    continue;
                }
                let mut key = Vec::new();
                if !t.prefix().is_empty() {
                    key.extend_from_slice(t.prefix().as_bytes());
                    key.push(b'/');
                }
                for (i, c) in components.iter().enumerate() {
                    if i > 0 {
                        key.push(b'/');
                    }
                    key.extend_from_slice(c.as_bytes());
                }
                plan.entries.insert(
                    key,
                    Entry {
                        root: idx,
                        components,
                    },
                );
            }
            plan.roots.push(root);
        }
        Ok(plan)
    }

    /// How many files the archive will hold (fewer if some vanish before they are read).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no file matched.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The archive paths, sorted (for logs and tests).
    pub fn paths(&self) -> Vec<String> {
        self.entries
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }
}

/// Upstream's rule: a filter that names an existing directory (no wildcard) means everything
/// below it. The directory is looked at without following a link.
fn directory_rule(root: &Path, patterns: &[Pattern]) -> Vec<Pattern> {
    patterns
        .iter()
        .map(|p| match p.literal_path() {
            Some(comps) => {
                let path = comps.iter().fold(root.to_path_buf(), |acc, c| acc.join(c));
                if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    p.everything_below()
                } else {
                    p.clone()
                }
            }
            None => p.clone(),
        })
        .collect()
}

/// Every regular file below `root` (links not followed), as component lists.
fn list_files(root: &Path) -> Vec<Vec<OsString>> {
    let mut files = Vec::new();
    let mut stack: Vec<Vec<OsString>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let dir = rel.iter().fold(root.to_path_buf(), |acc, c| acc.join(c));
        let Ok(entries) = fs::read_dir(&dir) else {
            if !rel.is_empty() {
                tracing::warn!(dir = %dir.display(), "log directory unreadable, skipped");
            }
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let mut path = rel.clone();
            path.push(e.file_name());
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                files.push(path);
            }
        }
    }
    files
}

/// Opens `components` below the directory `root` one by one without following any link;
/// `None` when the file is gone, is a link or is not a regular file any more.
fn open_no_follow(
    root: &File,
    components: &[OsString],
) -> io::Result<Option<(File, fs::Metadata)>> {
    let Some((last, dirs)) = components.split_last() else {
        return Ok(None);
    };
    let gone = |e: nix::errno::Errno| {
        use nix::errno::Errno;
        matches!(
            e,
            Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::ENXIO
        )
    };
    let mut current: Option<File> = None;
    for d in dirs {
        let at = current.as_ref().unwrap_or(root);
        match openat(
            at,
            d.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => current = Some(File::from(fd)),
            Err(e) if gone(e) => return Ok(None),
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    let at = current.as_ref().unwrap_or(root);
    // O_NONBLOCK: a FIFO swapped in must not hang the archive; it is refused below anyway.
    let fd = match openat(
        at,
        last.as_os_str(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) if gone(e) => return Ok(None),
        Err(e) => return Err(io::Error::from(e)),
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    Ok(Some((file, meta)))
}

fn dir_header(mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h.set_mtime(mtime);
    h
}

/// What [`write_archive`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    /// Files archived.
    pub files: usize,
    /// Files listed but gone (or no longer regular files) when they were to be read.
    pub vanished: usize,
}

/// Writes the plan's files as a gzipped tar to `out`, like `tar -czf - -C <tmp> .` of
/// upstream's copy: `./`, then each file's parent directories (mode 0755) and the file (its
/// mode, owner and mtime; the size it had when opened).
pub fn write_archive(plan: &Plan, out: impl Write) -> Result<Written, LogsError> {
    let used: std::collections::BTreeSet<usize> = plan.entries.values().map(|e| e.root).collect();
    let mut roots = Vec::new();
    for (i, r) in plan.roots.iter().enumerate() {
        if !used.contains(&i) {
            roots.push(None);
            continue;
        }
        // The directory itself may be reached through links (`<base>/sys` is one).
        match File::open(r) {
            Ok(f) => roots.push(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => roots.push(None),
            Err(source) => {
                return Err(LogsError::Io {
                    what: "opening log directory",
                    path: r.clone(),
                    source,
                });
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let arch = LogsError::Archive;
    tar.append_data(&mut dir_header(now), "./", io::empty())
        .map_err(arch)?;
    let mut made_dirs: std::collections::BTreeSet<Vec<u8>> = Default::default();
    let mut written = Written::default();
    for (key, entry) in &plan.entries {
        let Some(Some(root)) = roots.get(entry.root) else {
            written.vanished += 1;
            continue;
        };
        let root_path = plan.roots.get(entry.root).cloned().unwrap_or_default();
        let path_of = || {
            entry
                .components
                .iter()
                .fold(root_path.clone(), |acc, c| acc.join(c))
        };
        let Some((file, meta)) =
            open_no_follow(root, &entry.components).map_err(|source| LogsError::Io {
                what: "opening log file",
                path: path_of(),
                source,
            })?
        else {
            written.vanished += 1;
            continue;
        };
        // Parent directories first, once each.
        for (i, b) in key.iter().enumerate() {
            if *b == b'/' {
                let dir = key.get(..=i).unwrap_or_default().to_vec();
                if made_dirs.insert(dir.clone()) {
                    let name = Path::new(std::ffi::OsStr::from_bytes(&dir));
                    tar.append_data(&mut dir_header(now), name, io::empty())
                        .map_err(arch)?;
                }
            }
        }
        let size = meta.len();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(u64::from(meta.uid()));
        h.set_gid(u64::from(meta.gid()));
        h.set_mtime(u64::try_from(meta.mtime()).unwrap_or_default());
        h.set_size(size);
        // Exactly `size` bytes whatever the file does meanwhile: cut if it grew, zero-padded if
        // it was truncated under us.
        let body = (&file).take(size).chain(io::repeat(0)).take(size);
        let name = Path::new(std::ffi::OsStr::from_bytes(key));
        tar.append_data(
            &mut h,
            name,
            ReadErrorAt {
                inner: body,
                path: path_of,
            },
        )
        .map_err(arch)?;
        written.files += 1;
    }
    let gz = tar.into_inner().map_err(arch)?;
    let mut out = gz.finish().map_err(arch)?;
    out.flush().map_err(arch)?;
    Ok(written)
}

/// Names the file in a read error (the tar writer only sees an `io::Error`).
struct ReadErrorAt<R, F> {
    inner: R,
    path: F,
}

impl<R: Read, F: Fn() -> PathBuf> Read for ReadErrorAt<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("reading {}: {e}", (self.path)().display()),
            )
        })
    }
}

/// Size of the pieces the archive writer hands to the upload.
const CHUNK: usize = 64 * 1024;
/// Pieces in flight between the writer thread and the upload (bounded memory).
const CHUNKS_IN_FLIGHT: usize = 8;

enum Piece {
    Data(Vec<u8>),
    /// The archive is complete: only after this does the reader report its end.
    Done,
}

/// The writer thread's end of the in-process pipe.
struct PieceWriter {
    tx: SyncSender<Piece>,
    buf: Vec<u8>,
}

impl PieceWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(Piece::Data(data))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped reading"))
    }
}

impl Write for PieceWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

/// The upload's end: reports the end of the stream only after the writer said the archive is
/// complete; if the writer stops early, a read fails with the writer's error (so a cut-short
/// archive is never uploaded as if whole).
struct PieceReader {
    rx: Receiver<Piece>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
    writer: Option<JoinHandle<()>>,
    failure: Arc<Mutex<Option<LogsError>>>,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.current.len() {
                let rest = self.current.get(self.pos..).unwrap_or_default();
                let n = rest.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), rest.get(..n)) {
                    dst.copy_from_slice(src);
                }
                self.pos += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Piece::Data(d)) => {
                    self.current = d;
                    self.pos = 0;
                }
                Ok(Piece::Done) => self.done = true,
                Err(_) => {
                    if let Some(h) = self.writer.take() {
                        let _ = h.join();
                    }
                    let message = match self.failure.lock() {
                        Ok(slot) => slot.as_ref().map(ToString::to_string),
                        Err(_) => None,
                    }
                    .unwrap_or_else(|| "the archive writer stopped".to_string());
                    return Err(io::Error::other(message));
                }
            }
        }
    }
}

impl Drop for PieceReader {
    fn drop(&mut self) {
        // Dropping the receiver makes the writer's next send fail, so it ends promptly.
        let (_, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// Starts a thread writing the plan's archive; returns the stream of its bytes.
fn archive_stream(
    plan: Arc<Plan>,
    failure: Arc<Mutex<Option<LogsError>>>,
) -> io::Result<PieceReader> {
    let (tx, rx) = sync_channel(CHUNKS_IN_FLIGHT);
    let slot = failure.clone();
    let writer = std::thread::Builder::new()
        .name("fetch-logs-tar".into())
        .spawn(move || {
            let mut w = PieceWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
            };
            let result = write_archive(&plan, &mut w).and_then(|written| {
                w.send_buf().map_err(LogsError::Archive)?;
                Ok(written)
            });
            match result {
                Ok(written) => {
                    tracing::debug!(
                        files = written.files,
                        vanished = written.vanished,
                        "logs archive written"
                    );
                    let _ = tx.send(Piece::Done);
                }
                Err(e) => {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(e);
                    }
                }
            }
        })?;
    Ok(PieceReader {
        rx,
        current: Vec::new(),
        pos: 0,
        done: false,
        writer: Some(writer),
        failure,
    })
}

/// The `fetch_logs` action: archives the files of `log_types` (upstream's comma-separated
/// list) matching `filters` and uploads the tar.gz under a new UUID; returns the id and the
/// sha1 of the uploaded bytes (computed while streaming). Bad types and filters fail before
/// anything is read or sent.
pub fn fetch_logs(
    blobs: &Blobs,
    dirs: &LogDirs,
    log_types: &str,
    filters: &[String],
) -> Result<Uploaded, LogsError> {
    let types = LogType::parse_list(log_types)?;
    let plan = Arc::new(Plan::new(dirs, &types, filters)?);
    tracing::info!(types = log_types, files = plan.len(), "fetching logs");
    let failure: Arc<Mutex<Option<LogsError>>> = Arc::new(Mutex::new(None));
    let uploaded = blobs.upload_stream(|| {
        if let Ok(mut s) = failure.lock() {
            *s = None;
        }
        archive_stream(plan.clone(), failure.clone())
    });
    match uploaded {
        Ok(u) => Ok(u),
        Err(e) => {
            // The archive's own failure explains more than "the upload stream failed".
            let own = failure.lock().ok().and_then(|mut s| s.take());
            Err(own.unwrap_or(LogsError::Upload(e)))
        }
    }
}

#[cfg(test)]
mod tests;
