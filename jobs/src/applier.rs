//! Installs and enables jobs and packages from an apply spec, with upstream's bundle layout:
//!
//! - package `<base>/data/packages/<name>/<sha1hex(version + "-" + digest)>` (0755),
//!   enabled as `<base>/packages/<name>`;
//! - job `<base>/data/jobs/<job>/<sha1hex(version + "-" + archive digest)>` (0750, files
//!   fixed to root:vcap, directories and `bin/*` 0750, other files 0640), enabled as
//!   `<base>/jobs/<job>`;
//! - per-job package links `<base>/jobs/<job>/packages/<pkg>` → the package's install dir,
//!   for every package of the spec (upstream gives each job all of them);
//! - job directories `<base>/data/sys/log/<job>`, `<base>/data/sys/run/<job>`,
//!   `<base>/data/<job>` (0770 root:vcap).
//!
//! An install unpacks into a hidden sibling of the install dir and renames it into place only
//! when complete, so an install dir that exists is always whole, a failed install leaves
//! nothing behind, and what was enabled before stays enabled. Links are replaced atomically
//! (a new link at a temporary name renamed over the old one).
//!
//! Ownership: `root:vcap` when a `vcap` group exists, else `root:root`.
//!
//! Everything here is blocking; callers run it on a blocking thread.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use blobstore::{BlobError, Blobs, MultiDigest, Select};
use sha1::Digest as _;

use crate::spec::{ApplySpec, BlobSource, Job, PackageSpec};

/// Upstream's default `env.bosh.parallel`.
pub const DEFAULT_PARALLEL: usize = 5;

/// Why installing, enabling or removing a job or package failed. Every variant names the
/// job, package, blob or path it is about.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A digest string the blob layer refused.
    #[error("Parsing digest {digest:?} of {what} {name}: {reason}")]
    Digest {
        /// `job` or `package`.
        what: &'static str,
        /// The job or package.
        name: String,
        /// The digest string.
        digest: String,
        /// Why.
        reason: String,
    },
    /// Fetching, verifying or unpacking a blob failed.
    #[error("Installing {what} {name} from blob {blob}: {source}")]
    Blob {
        /// `job` or `package`.
        what: &'static str,
        /// The job or package.
        name: String,
        /// The blob id.
        blob: String,
        /// Why (boxed: blob errors are large).
        source: Box<BlobError>,
    },
    /// The rendered templates archive holds nothing for this job.
    #[error("Installing job {name} from blob {blob}: no file with prefix '{name}' found")]
    NoJobFiles {
        /// The job.
        name: String,
        /// The blob id.
        blob: String,
    },
    /// A job to configure is not installed.
    #[error("Configuring job {name}: install dir {path} does not exist")]
    NotInstalled {
        /// The job.
        name: String,
        /// Its install dir.
        path: PathBuf,
    },
    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ApplyError {
    let path = path.to_path_buf();
    move |source| ApplyError::Io {
        action,
        path,
        source,
    }
}

/// The agent's directories under `<base>` (`/var/vcap`), as upstream lays them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    base: PathBuf,
}

impl Layout {
    /// The layout rooted at `base`.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self { base: base.into() }
    }
    /// `<base>`.
    pub fn base(&self) -> &Path {
        &self.base
    }
    /// `<base>/data`.
    pub fn data(&self) -> PathBuf {
        self.base.join("data")
    }
    /// `<base>/data/packages/<name>/<sha1hex(version-digest)>`.
    pub fn package_install(&self, pkg: &PackageSpec) -> PathBuf {
        self.data()
            .join("packages")
            .join(&pkg.name)
            .join(bundle_hash(&pkg.version, &pkg.source.digest))
    }
    /// `<base>/packages/<name>`.
    pub fn package_enable(&self, name: &str) -> PathBuf {
        self.base.join("packages").join(name)
    }
    /// `<base>/data/jobs/<job>/<sha1hex(version-archive digest)>`.
    pub fn job_install(&self, job: &Job) -> PathBuf {
        self.data()
            .join("jobs")
            .join(&job.name)
            .join(bundle_hash(&job.version, &job.source.digest))
    }
    /// `<base>/jobs/<job>`.
    pub fn job_enable(&self, name: &str) -> PathBuf {
        self.base.join("jobs").join(name)
    }
    /// `<base>/monit/job`: the generated `*.monitrc` files monit includes.
    pub fn monit_job_dir(&self) -> PathBuf {
        self.base.join("monit").join("job")
    }
    /// `<base>/data/sys/log/<job>`, `<base>/data/sys/run/<job>`, `<base>/data/<job>`.
    pub fn job_dirs(&self, name: &str) -> [PathBuf; 3] {
        let sys = self.data().join("sys");
        [
            sys.join("log").join(name),
            sys.join("run").join(name),
            self.data().join(name),
        ]
    }
    /// `<base>/data/compile`.
    pub fn compile_dir(&self) -> PathBuf {
        self.data().join("compile")
    }

    /// `start`'s configuration step: for each job (index `i` counted from the last job, as
    /// upstream), copies `<job install>/monit` to `<base>/monit/job/%04d_<job>.monitrc` and
    /// each `<job install>/<label>.monit` to `%04d_<job>_<label>.monitrc` (files 0644).
    /// Only regular files are copied (a symlink in a job archive is never followed). Returns
    /// the files written, in order. No blob is fetched, so no blobstore is needed.
    pub fn configure_monit(&self, spec: &ApplySpec) -> Result<Vec<PathBuf>, ApplyError> {
        let jobs = spec.jobs();
        let dir = self.monit_job_dir();
        std::fs::create_dir_all(&dir).map_err(io_err("Creating", &dir))?;
        let mut written = Vec::new();
        for (i, job) in jobs.iter().rev().enumerate() {
            let install = self.job_install(job);
            if !install.is_dir() {
                return Err(ApplyError::NotInstalled {
                    name: job.name.clone(),
                    path: install,
                });
            }
            let mut sources = Vec::new();
            let monit = install.join("monit");
            if is_regular_file(&monit) {
                sources.push((monit, format!("{i:04}_{}.monitrc", job.name)));
            }
            let mut extra = Vec::new();
            for entry in std::fs::read_dir(&install).map_err(io_err("Reading", &install))? {
                let entry = entry.map_err(io_err("Reading", &install))?;
                let file_name = entry.file_name();
                let Some(file_name) = file_name.to_str() else {
                    continue;
                };
                if file_name.ends_with(".monit") && is_regular_file(&entry.path()) {
                    let label = file_name.replacen(".monit", "", 1);
                    extra.push((entry.path(), format!("{i:04}_{}_{label}.monitrc", job.name)));
                }
            }
            // Go's Glob returns names sorted.
            extra.sort();
            sources.extend(extra);
            for (from, name) in sources {
                let to = dir.join(name);
                std::fs::copy(&from, &to).map_err(io_err("Copying monit file to", &to))?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))
                    .map_err(io_err("Setting mode of", &to))?;
                written.push(to);
            }
        }
        Ok(written)
    }
}

/// sha1 hex of `version + "-" + digest`: upstream's bundle directory name.
pub fn bundle_hash(version: &str, digest: &str) -> String {
    sha1_hex(format!("{version}-{digest}").as_bytes())
}

pub(crate) fn sha1_hex(bytes: &[u8]) -> String {
    let out = sha1::Sha1::digest(bytes);
    out.iter().map(|b| format!("{b:02x}")).collect()
}

/// Installs, enables and removes the jobs and packages of apply specs.
#[derive(Debug, Clone)]
pub struct Applier {
    blobs: Blobs,
    layout: Layout,
    parallel: usize,
}

/// One bundle to install.
enum Task<'a> {
    Job(&'a Job),
    Package(&'a PackageSpec),
}

impl Applier {
    /// An applier for the VM rooted at `base`, fetching through `blobs`, installing
    /// [`DEFAULT_PARALLEL`] bundles at once.
    pub fn new(blobs: Blobs, base: impl Into<PathBuf>) -> Self {
        Self {
            blobs,
            layout: Layout::new(base),
            parallel: DEFAULT_PARALLEL,
        }
    }

    /// Installs up to `parallel` bundles at once (`env.bosh.parallel`; at least 1).
    pub fn with_parallel(mut self, parallel: usize) -> Self {
        self.parallel = parallel.max(1);
        self
    }

    /// The directories this applier works in.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The blob layer.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// `prepare`: downloads and installs, without enabling, every job and package of `spec`
    /// that is not installed yet, `parallel` at once. Every install is attempted; the first
    /// failure (in spec order) is returned, the others are logged. Nothing enabled changes.
    pub fn prepare(&self, spec: &ApplySpec) -> Result<(), ApplyError> {
        let jobs = spec.jobs();
        let packages = spec.packages();
        self.install_missing(&jobs, &packages)
    }

    /// `apply`, when `configuration_hash` is set (otherwise nothing is done and `false` is
    /// returned): installs what is missing (in parallel), resets `<base>/monit/job`, creates
    /// the job directories, enables every job and package, links each job's packages, then
    /// disables and uninstalls every other job and package, old versions of desired ones
    /// included.
    ///
    /// If an install fails, nothing was enabled or removed yet: the previously enabled
    /// versions stay enabled and intact, and the partial install is gone. Calling it again
    /// after any failure is safe. Returns `true` when the jobs were applied: the caller must
    /// then reload monit ([`crate::JobSupervisor::reload`]).
    pub fn apply(&self, spec: &ApplySpec) -> Result<bool, ApplyError> {
        if !spec.has_configuration() {
            return Ok(false);
        }
        let jobs = spec.jobs();
        let packages = spec.packages();
        self.install_missing(&jobs, &packages)?;

        // Upstream resets the monit job configs first; doing it once every install succeeded
        // keeps monit's view intact when an install fails.
        remove_all(&self.layout.monit_job_dir())?;

        let gid = vcap_gid();
        for job in &jobs {
            self.create_job_dirs(&job.name, gid)?;
            let install = self.layout.job_install(job);
            enable(&install, &self.layout.job_enable(&job.name), 0o750, gid)?;
            self.link_job_packages(&job.name, &packages, gid)?;
        }
        let wanted: BTreeSet<PathBuf> = jobs.iter().map(|j| self.layout.job_install(j)).collect();
        keep_only(
            &self.layout.data().join("jobs"),
            &self.layout.base.join("jobs"),
            &wanted,
        )?;

        for pkg in &packages {
            let install = self.layout.package_install(pkg);
            enable(&install, &self.layout.package_enable(&pkg.name), 0o755, gid)?;
        }
        self.keep_only_packages(&packages)?;
        Ok(true)
    }

    /// [`Layout::configure_monit`].
    pub fn configure_monit(&self, spec: &ApplySpec) -> Result<Vec<PathBuf>, ApplyError> {
        self.layout.configure_monit(spec)
    }

    /// Disables and uninstalls every installed package not in `desired` (old versions of
    /// desired packages included).
    pub fn keep_only_packages(&self, desired: &[PackageSpec]) -> Result<(), ApplyError> {
        let wanted: BTreeSet<PathBuf> = desired
            .iter()
            .map(|p| self.layout.package_install(p))
            .collect();
        keep_only(
            &self.layout.data().join("packages"),
            &self.layout.base.join("packages"),
            &wanted,
        )
    }

    /// Installs `pkg` unless installed, then enables it as `<base>/packages/<name>`.
    pub fn apply_package(&self, pkg: &PackageSpec) -> Result<(), ApplyError> {
        self.install_package(pkg)?;
        enable(
            &self.layout.package_install(pkg),
            &self.layout.package_enable(&pkg.name),
            0o755,
            vcap_gid(),
        )
    }

    fn install_missing(&self, jobs: &[Job], packages: &[PackageSpec]) -> Result<(), ApplyError> {
        let mut seen = BTreeSet::new();
        let mut tasks = Vec::new();
        for job in jobs {
            let path = self.layout.job_install(job);
            if !path.exists() && seen.insert(path) {
                tasks.push(Task::Job(job));
            }
        }
        for pkg in packages {
            let path = self.layout.package_install(pkg);
            if !path.exists() && seen.insert(path) {
                tasks.push(Task::Package(pkg));
            }
        }
        if tasks.is_empty() {
            return Ok(());
        }
        let results: Vec<Mutex<Option<Result<(), ApplyError>>>> =
            tasks.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let workers = self.parallel.min(tasks.len());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(task) = tasks.get(i) else { break };
                        let result = match task {
                            Task::Job(job) => self.install_job(job),
                            Task::Package(pkg) => self.install_package(pkg),
                        };
                        if let Ok(mut slot) = results[i].lock() {
                            *slot = Some(result);
                        }
                    }
                });
            }
        });
        let mut first = None;
        for slot in results {
            let result = slot.into_inner().ok().flatten();
            if let Some(Err(e)) = result {
                if first.is_none() {
                    first = Some(e);
                } else {
                    tracing::error!(target: "jobs::applier", error = %e, "install failed");
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Installs `pkg` unless installed (not enabled).
    fn install_package(&self, pkg: &PackageSpec) -> Result<(), ApplyError> {
        let install = self.layout.package_install(pkg);
        self.install_bundle(
            "package",
            &pkg.name,
            &pkg.source,
            &install,
            &Select::All,
            |dir| set_mode_owner(dir, 0o755, vcap_gid()),
        )
    }

    /// Installs `job` unless installed (not enabled), with upstream's owner fix.
    fn install_job(&self, job: &Job) -> Result<(), ApplyError> {
        let install = self.layout.job_install(job);
        let select = Select::Job(job.name.clone());
        self.install_bundle("job", &job.name, &job.source, &install, &select, |dir| {
            let empty = std::fs::read_dir(dir)
                .map_err(io_err("Reading", dir))?
                .next()
                .is_none();
            if empty {
                return Err(ApplyError::NoJobFiles {
                    name: job.name.clone(),
                    blob: job.source.blobstore_id.clone(),
                });
            }
            fix_permissions(dir, vcap_gid())
        })
    }

    /// Unpacks `source` into a hidden sibling of `install`, runs `finish` on it, and renames
    /// it to `install`; on any failure the sibling is removed and `install` stays absent.
    fn install_bundle(
        &self,
        what: &'static str,
        name: &str,
        source: &BlobSource,
        install: &Path,
        select: &Select,
        finish: impl FnOnce(&Path) -> Result<(), ApplyError>,
    ) -> Result<(), ApplyError> {
        if install.exists() {
            return Ok(());
        }
        let digest = MultiDigest::parse(&source.digest).map_err(|e| ApplyError::Digest {
            what,
            name: name.to_string(),
            digest: source.digest.clone(),
            reason: e.to_string(),
        })?;
        let gid = vcap_gid();
        let parent = parent_of(install)?;
        let mode = if what == "job" { 0o750 } else { 0o755 };
        create_dir_owned(parent, mode, gid)?;
        let tmp = temp_sibling(install, "installing");
        tracing::debug!(target: "jobs::applier", what, name, blob = %source.blobstore_id, path = %install.display(), "installing");
        self.blobs
            .unpack(&source.blobstore_id, &digest, &tmp, select)
            .map_err(|e| ApplyError::Blob {
                what,
                name: name.to_string(),
                blob: source.blobstore_id.clone(),
                source: Box::new(e),
            })?;
        let result = finish(&tmp).and_then(|()| {
            std::fs::rename(&tmp, install).map_err(io_err("Moving install into place at", install))
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    fn create_job_dirs(&self, name: &str, gid: Option<u32>) -> Result<(), ApplyError> {
        for dir in self.layout.job_dirs(name) {
            if std::fs::symlink_metadata(&dir).is_ok() {
                continue;
            }
            let parent = parent_of(&dir)?;
            std::fs::create_dir_all(parent).map_err(io_err("Creating", parent))?;
            std::fs::create_dir(&dir).map_err(io_err("Creating job dir", &dir))?;
            set_mode_owner(&dir, 0o770, gid)?;
        }
        Ok(())
    }

    /// `<base>/jobs/<job>/packages/<pkg>` for every package of the spec, and no other links.
    fn link_job_packages(
        &self,
        job: &str,
        packages: &[PackageSpec],
        gid: Option<u32>,
    ) -> Result<(), ApplyError> {
        let dir = self.layout.job_enable(job).join("packages");
        for pkg in packages {
            enable(
                &self.layout.package_install(pkg),
                &dir.join(&pkg.name),
                0o755,
                gid,
            )?;
        }
        let names: BTreeSet<&str> = packages.iter().map(|p| p.name.as_str()).collect();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("Reading", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("Reading", &dir))?;
            let path = entry.path();
            let keep = entry
                .file_name()
                .to_str()
                .is_some_and(|n| names.contains(n));
            if !keep && is_symlink(&path) {
                std::fs::remove_file(&path).map_err(io_err("Removing link", &path))?;
            }
        }
        Ok(())
    }
}

/// Disables and removes every `<install_root>/<name>/<version>` not in `wanted`: the link
/// `<enable_root>/<name>` is removed first if it points at it (so a failed removal never
/// leaves a link to a half-removed bundle that the next listing would miss), then the
/// bundle. Links in `<enable_root>` that point into `install_root` at nothing wanted are
/// removed too, and so are temporary links ([`temp_sibling`]'s) whatever they point at.
fn keep_only(
    install_root: &Path,
    enable_root: &Path,
    wanted: &BTreeSet<PathBuf>,
) -> Result<(), ApplyError> {
    for name_dir in list_dir(install_root)? {
        let Some(name) = name_dir.file_name() else {
            continue;
        };
        let link = enable_root.join(name);
        if !name_dir.is_dir() || is_symlink(&name_dir) {
            continue;
        }
        for bundle in list_dir(&name_dir)? {
            if wanted.contains(&bundle) {
                continue;
            }
            if points_at(&link, &bundle) {
                std::fs::remove_file(&link).map_err(io_err("Disabling", &link))?;
            }
            tracing::debug!(target: "jobs::applier", path = %bundle.display(), "uninstalling");
            remove_all(&bundle)?;
        }
    }
    for link in list_dir(enable_root)? {
        if !is_symlink(&link) {
            continue;
        }
        let Ok(target) = std::fs::read_link(&link) else {
            continue;
        };
        // A temporary link is what an apply killed between making it and renaming it over
        // the enabled one leaves behind; nothing else removes it, whatever it points at.
        let temporary = link
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_temp_link_name);
        if temporary || (target.starts_with(install_root) && !wanted.contains(&target)) {
            std::fs::remove_file(&link).map_err(io_err("Disabling", &link))?;
        }
    }
    Ok(())
}

/// The entries of `dir` (none if it does not exist), sorted.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, ApplyError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("Listing", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        out.push(entry.map_err(io_err("Listing", dir))?.path());
    }
    out.sort();
    Ok(out)
}

/// Whether the symlink `link` resolves to `target`.
fn points_at(link: &Path, target: &Path) -> bool {
    match std::fs::read_link(link) {
        Ok(t) if t == target => true,
        Ok(_) => match (std::fs::canonicalize(link), std::fs::canonicalize(target)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        },
        Err(_) => false,
    }
}

/// Points `link` at `target`, atomically: a new link at a temporary name is renamed over the
/// old one, so readers see the old or the new target, never none. The parent directory is
/// created with `dir_mode`, owned root:vcap. A real directory in the way is removed.
pub(crate) fn enable(
    target: &Path,
    link: &Path,
    dir_mode: u32,
    gid: Option<u32>,
) -> Result<(), ApplyError> {
    if !target.is_dir() {
        return Err(ApplyError::Io {
            action: "Enabling (bundle must be installed)",
            path: target.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    let parent = parent_of(link)?;
    create_dir_owned(parent, dir_mode, gid)?;
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = temp_sibling(link, "link");
    symlink(target, &tmp).map_err(io_err("Creating link", &tmp))?;
    if let Ok(meta) = std::fs::symlink_metadata(link)
        && meta.is_dir()
        && let Err(e) = std::fs::remove_dir_all(link)
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("Removing directory in the way of link", link)(e));
    }
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("Enabling", link)(e));
    }
    Ok(())
}

/// Removes the link `link` if it points at `target`.
pub(crate) fn disable(link: &Path, target: &Path) -> Result<(), ApplyError> {
    if points_at(link, target) {
        std::fs::remove_file(link).map_err(io_err("Disabling", link))?;
    }
    Ok(())
}

/// `rm -rf`: a missing path is fine.
pub(crate) fn remove_all(path: &Path) -> Result<(), ApplyError> {
    let result = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("Removing", path)(e)),
        _ => Ok(()),
    }
}

pub(crate) fn parent_of(path: &Path) -> Result<&Path, ApplyError> {
    path.parent().ok_or_else(|| ApplyError::Io {
        action: "Finding the parent of",
        path: path.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// `<dir>/.<name>.<what>-<pid>-<n>`: unique within this process, and hidden.
pub(crate) fn temp_sibling(path: &Path, what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Whether `name` has the shape [`temp_sibling`] gives links: `.<name>.link-<pid>-<n>`.
fn is_temp_link_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some((_, tail)) = rest.rsplit_once(".link-") else {
        return false;
    };
    tail.split_once('-').is_some_and(|(pid, n)| {
        !pid.is_empty()
            && !n.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The `vcap` group's gid, if the group exists.
pub fn vcap_gid() -> Option<u32> {
    nix::unistd::Group::from_name("vcap")
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// `mkdir -p` with `mode` on the directories it creates, and root:vcap on `dir` (as upstream
/// chowns the install and enable parents).
pub(crate) fn create_dir_owned(dir: &Path, mode: u32, gid: Option<u32>) -> Result<(), ApplyError> {
    if dir.is_dir() {
        return chown_root(dir, gid);
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err("Creating", dir))?;
    chown_root(dir, gid)
}

pub(crate) fn set_mode_owner(path: &Path, mode: u32, gid: Option<u32>) -> Result<(), ApplyError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("Setting mode of", path))?;
    chown_root(path, gid)
}

fn chown_root(path: &Path, gid: Option<u32>) -> Result<(), ApplyError> {
    std::os::unix::fs::lchown(path, Some(0), Some(gid.unwrap_or(0)))
        .map_err(io_err("Setting ownership of", path))
}

/// Upstream's owner fix of an installed job: everything root:vcap; directories and every file
/// under `bin/` 0750; other files 0640. Symlinks are chowned themselves and never followed.
pub(crate) fn fix_permissions(root: &Path, gid: Option<u32>) -> Result<(), ApplyError> {
    let bin = root.join("bin");
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(io_err("Reading", &path))?;
        chown_root(&path, gid)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = if meta.is_dir() || (path.starts_with(&bin) && path != bin) {
            0o750
        } else {
            0o640
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("Setting mode of", &path))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io_err("Reading", &path))? {
                stack.push(entry.map_err(io_err("Reading", &path))?.path());
            }
        }
    }
    Ok(())
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

fn is_regular_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_link_names_are_exactly_the_ones_temp_sibling_makes() {
        let made = temp_sibling(Path::new("/b/jobs/web.link-1-2"), "link");
        let made = made
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(is_temp_link_name(made), "{made}");
        for yes in [".web.link-1-0", ".a.b.link-123-45", "..link-1-1"] {
            assert!(is_temp_link_name(yes), "{yes}");
        }
        for no in [
            "web",
            ".web",
            "web.link-1-0",
            ".web.link-",
            ".web.link-1",
            ".web.link-1-",
            ".web.link--1",
            ".web.link-a-1",
            ".web.link-1-2x",
            ".web.installing-1-0",
        ] {
            assert!(!is_temp_link_name(no), "{no}");
        }
    }
}
