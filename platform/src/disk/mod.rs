//! Persistent disks: what the director's disk actions do on the VM, as upstream's agent does
//! it (`add_persistent_disk`, `remove_persistent_disk`, `list_disk`, `mount_disk`,
//! `unmount_disk`, `migrate_disk`, and re-mounting the last disk at boot).
//!
//! [`Disks`] is the one entry point: each director action is one method call, and each
//! method takes the lock that serializes disk changes (the director may run several async
//! tasks at once; two of them partitioning one disk would be a disaster).
//!
//! Layout (base `/var/vcap`): `<base>/store` (0700 when created) takes the disk; when a disk
//! is mounted there already, a second one goes to `<base>/store_migration_target`;
//! `<base>/bosh/persistent_disk_hints.json` and `managed_disk_settings.json` are described in
//! [`store`].
//!
//! The methods block (they run programs and wait for devices): an async caller runs them on
//! a blocking thread. `Disks` is `Send + Sync`; share it in an `Arc`.
//!
//! Guarantees: a partition that holds a file system is never formatted; a disk whose layout
//! is not one partition (or none) is never repartitioned; a hint can only name a block device
//! under `/dev` (or, with `BindMountPersistentDisk`, a directory); bad hints or files are
//! errors that name them, and nothing is changed.

pub mod error;
pub mod format;
pub mod hint;
pub mod migrate;
pub mod mounts;
pub mod partition;
pub mod resolve;
pub mod runner;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

pub use error::DiskError;
pub use format::FileSystem;
pub use hint::{DiskEnv, DiskSettings, IscsiSettings};
pub use mounts::Source;
pub use resolve::{Resolution, ResolverConfig, Wait};
pub use runner::{Tool, Tools};

use partition::Plan;

/// How the disks are handled (agent.json's `Platform.Linux.*` and the base directory).
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The base directory (`/var/vcap`).
    pub base: PathBuf,
    /// Device resolution (`DevicePathResolutionType`, `DiskIDTransform*`) and
    /// `BindMountPersistentDisk` (`resolver.bind_mount`).
    pub resolver: ResolverConfig,
    /// `UsePreformattedPersistentDisk`: no partitioning or formatting; the device (or
    /// directory) itself is mounted.
    pub use_preformatted: bool,
    /// How long to wait for a new or grown partition's node (10 s).
    pub partition_wait: Duration,
    /// `umount` attempts while it fails, and the pause between them (upstream: 600 × 1 s).
    pub unmount_tries: u32,
    /// See `unmount_tries`.
    pub unmount_pause: Duration,
}

impl DiskConfig {
    /// Upstream's defaults for `base`.
    pub fn new(base: impl Into<PathBuf>) -> DiskConfig {
        DiskConfig {
            base: base.into(),
            resolver: ResolverConfig::default(),
            use_preformatted: false,
            partition_wait: Duration::from_secs(10),
            unmount_tries: 600,
            unmount_pause: Duration::from_secs(1),
        }
    }

    /// `<base>/store`.
    pub fn store_dir(&self) -> PathBuf {
        self.base.join("store")
    }

    /// `<base>/store_migration_target`.
    pub fn migration_dir(&self) -> PathBuf {
        self.base.join("store_migration_target")
    }
}

/// The disk parts of the agent's settings: `disks.persistent` (cid → hint, as the CPI wrote
/// it) and `env.persistent_disk_*`.
#[derive(Debug, Clone, Default)]
pub struct SettingsDisks {
    /// `disks.persistent`.
    pub persistent: BTreeMap<String, Value>,
    /// `env.persistent_disk_fs`, `_mount_options`, `_partitioner`.
    pub env: DiskEnv,
}

/// What `mount_disk` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// Where the disk is mounted now.
    pub mount_point: PathBuf,
    /// Whether this call partitioned the disk.
    pub partitioned: bool,
    /// Whether this call made a file system.
    pub formatted: bool,
    /// Whether this call grew the partition and its file system.
    pub grown: bool,
    /// Whether it was mounted there already (nothing mounted by this call).
    pub already: bool,
}

/// What `unmount_disk` did: upstream's value is `{"message": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmounted {
    /// Whether something was unmounted.
    pub unmounted: bool,
    /// `Unmounted partition of {…}` or `Partition of {…} is not mounted` (upstream's words).
    pub message: String,
}

impl Unmounted {
    /// The value the director gets: `{"message": …}`.
    pub fn value(&self) -> Value {
        serde_json::json!({ "message": self.message })
    }
}

/// The persistent disk service (see the module documentation).
#[derive(Debug)]
pub struct Disks {
    cfg: DiskConfig,
    tools: Tools,
    lock: Mutex<()>,
}

impl Disks {
    /// Finds the programs once (see [`Tools`]).
    pub fn new(cfg: DiskConfig) -> Disks {
        Disks {
            cfg,
            tools: Tools::find(),
            lock: Mutex::new(()),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic elsewhere while holding the lock leaves no disk state in memory to distrust.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `add_persistent_disk [cid, hint]`: records the hint (with `env`'s file system, mount
    /// options and partitioner) in the hints file. A bad hint or a damaged hints file is an
    /// error and the file is unchanged. Value for the director: `{}`.
    pub fn add_persistent_disk(
        &self,
        cid: &str,
        hint: &Value,
        env: &DiskEnv,
    ) -> Result<(), DiskError> {
        let settings = DiskSettings::from_hint(cid, hint, env)?;
        let _g = self.guard();
        store::save_hint(&self.cfg.base, settings)
    }

    /// `remove_persistent_disk [cid]`: drops the cid's hint (an unknown cid is fine, as
    /// upstream). Value: `{}`.
    pub fn remove_persistent_disk(&self, cid: &str) -> Result<(), DiskError> {
        let _g = self.guard();
        store::remove_hint(&self.cfg.base, cid)
    }

    /// Every known disk: the settings' `disks.persistent`, then the hints file (which wins,
    /// as upstream).
    pub fn all_disks(
        &self,
        settings: &SettingsDisks,
    ) -> Result<BTreeMap<String, DiskSettings>, DiskError> {
        let mut all = BTreeMap::new();
        for (cid, hint) in &settings.persistent {
            all.insert(
                cid.clone(),
                DiskSettings::from_hint(cid, hint, &settings.env)?,
            );
        }
        all.extend(store::read_hints(&self.cfg.base)?);
        Ok(all)
    }

    /// The device disk `cid` (from the settings or the hints file) resolves to, waiting for it
    /// as `mount_disk` does (bounded): what a named disk association links to, as upstream's
    /// real device path. An unknown cid is [`DiskError::UnknownDisk`].
    pub fn device_path(&self, cid: &str, settings: &SettingsDisks) -> Result<PathBuf, DiskError> {
        let _g = self.guard();
        let s = self.lookup(cid, settings)?;
        resolve::resolve_required(&self.cfg.resolver, &self.tools, &s)
    }

    fn lookup(&self, cid: &str, settings: &SettingsDisks) -> Result<DiskSettings, DiskError> {
        self.all_disks(settings)?
            .remove(cid)
            .ok_or_else(|| DiskError::UnknownDisk(cid.to_string()))
    }

    /// What gets mounted for a resolved device: partition 1, or the device (or directory)
    /// itself when preformatted.
    fn source_for(&self, device: &Path) -> Source {
        if self.cfg.resolver.bind_mount && device.is_dir() {
            Source::Directory(device.to_path_buf())
        } else if self.cfg.use_preformatted {
            Source::Device(device.to_path_buf())
        } else {
            Source::Device(resolve::partition_path(device))
        }
    }

    /// The disk's source as it is now, without waiting. A hint this agent refuses to follow
    /// (a path outside `/dev`, …) names nothing the agent could have mounted: not mounted,
    /// so that one bad hint cannot make `list_disk` (fatal for the director) fail.
    fn current_source(&self, s: &DiskSettings) -> Result<Option<Source>, DiskError> {
        match resolve::resolve(&self.cfg.resolver, &self.tools, s, Wait::Once) {
            Ok(found) => Ok(found.map(|d| self.source_for(&d))),
            Err(e @ DiskError::BadDevicePath { .. }) => {
                tracing::warn!(cid = %s.id, error = %e, "disk counted as not mounted");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `list_disk`: the cids (sorted) whose partition (or device, or directory) is mounted.
    /// A disk whose device is not there counts as not mounted, as upstream.
    pub fn list_disk(&self, settings: &SettingsDisks) -> Result<Vec<String>, DiskError> {
        let _g = self.guard();
        let mounts = mounts::read_mounts()?;
        let mut out = Vec::new();
        for (cid, s) in self.all_disks(settings)? {
            let Some(source) = self.current_source(&s)? else {
                continue;
            };
            if source.path().exists() && !mounts::mount_points_of(&mounts, &source).is_empty() {
                out.push(cid);
            }
        }
        Ok(out)
    }

    /// `mount_disk [cid]`: resolves the device (waiting, bounded), makes or grows its one
    /// partition and file system unless preformatted, mounts it on `<base>/store`, or on
    /// `<base>/store_migration_target` when another disk holds the store, and records the cid
    /// in `managed_disk_settings.json`. Value for the director: `{}`.
    pub fn mount_disk(&self, cid: &str, settings: &SettingsDisks) -> Result<Mounted, DiskError> {
        let _g = self.guard();
        let s = self.lookup(cid, settings)?;
        self.mount_locked(&s)
    }

    fn mount_locked(&self, s: &DiskSettings) -> Result<Mounted, DiskError> {
        let device = resolve::resolve_required(&self.cfg.resolver, &self.tools, s)?;
        let bind = self.cfg.resolver.bind_mount;
        let preformatted = self.cfg.use_preformatted || (bind && device.is_dir());
        // Where it goes is settled before anything on the disk changes: a disk that cannot be
        // mounted (both mount points taken, or mounted elsewhere) is left untouched.
        let source = self.source_for(&device);
        let mount_point = self.choose_mount_point(&source)?;
        let mut done = Mounted {
            mount_point: mount_point.clone(),
            partitioned: false,
            formatted: false,
            grown: false,
            already: false,
        };
        let mut plan = Plan::Keep;
        if !preformatted {
            let fs = FileSystem::from_setting(&s.filesystem)?;
            let table = partition::read_table(&self.tools, &device)?;
            let whole_fs = match &table {
                Some(t) if !t.partitions.is_empty() => None,
                _ => format::probe(&self.tools, &device)?,
            };
            let bytes = partition::device_bytes(&device)?;
            plan = partition::plan(
                &device.to_string_lossy(),
                bytes,
                table.as_ref(),
                whole_fs.as_deref(),
                &s.partitioner,
            )?;
            let part = resolve::partition_path(&device);
            match plan {
                Plan::Create(with) => {
                    partition::create(&self.tools, &device, with, bytes)?;
                    done.partitioned = true;
                }
                Plan::Grow => {
                    partition::grow(&self.tools, &device)?;
                }
                Plan::Keep => {}
            }
            partition::settle_partition(&self.tools, &device, &part, self.cfg.partition_wait)?;
            done.formatted = format::format_if_blank(&self.tools, &part, fs)?;
        }
        let table = mounts::read_mounts()?;
        let already = mounts::mounted_at(&table, &mount_point)
            .is_some_and(|m| mounts::is_mount_of(m, &source));
        let mut grow_after_mount = plan == Plan::Grow;
        if plan == Plan::Grow && !already && format::grow_unmounted(&self.tools, source.path())? {
            grow_after_mount = false;
            done.grown = true;
        }
        if already {
            done.already = true;
        } else {
            if !mount_point.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&mount_point)
                    .map_err(error::io_at(&mount_point))?;
            }
            mounts::mount(
                &self.tools,
                source.path(),
                &mount_point,
                &s.mount_options,
                bind,
            )?;
        }
        if grow_after_mount {
            format::grow_mounted(&self.tools, source.path(), &mount_point)?;
            done.grown = true;
        }
        store::write_managed(&self.cfg.base, &s.id)?;
        Ok(done)
    }

    /// The store, unless another disk holds it; then the migration target. A source mounted
    /// elsewhere already (or a migration target held by a third disk) is an error, as
    /// upstream's "Device … is already mounted to …".
    fn choose_mount_point(&self, source: &Source) -> Result<PathBuf, DiskError> {
        let table = mounts::read_mounts()?;
        let store = self.cfg.store_dir();
        let target = self.cfg.migration_dir();
        let here = mounts::mount_points_of(&table, source);
        let chosen = match mounts::mounted_at(&table, &store) {
            None => store,
            Some(m) if mounts::is_mount_of(m, source) => return Ok(store),
            Some(_) => target,
        };
        if let Some(m) = mounts::mounted_at(&table, &chosen)
            && !mounts::is_mount_of(m, source)
        {
            return Err(DiskError::Mount(format!(
                "Device {} is already mounted to {}, can't mount {}",
                m.source,
                chosen.display(),
                source.path().display()
            )));
        }
        if let Some(other) = here.iter().find(|p| **p != chosen) {
            return Err(DiskError::Mount(format!(
                "Device {} is already mounted to {}, can't mount to {}",
                source.path().display(),
                other.display(),
                chosen.display()
            )));
        }
        Ok(chosen)
    }

    /// `unmount_disk [cid]`: unmounts the disk's partition (or device, or directory) wherever
    /// it is mounted. A disk whose device is not there is "not mounted", as upstream.
    pub fn unmount_disk(
        &self,
        cid: &str,
        settings: &SettingsDisks,
    ) -> Result<Unmounted, DiskError> {
        let _g = self.guard();
        let s = self.lookup(cid, settings)?;
        let mut unmounted = false;
        if let Some(source) = self.current_source(&s)? {
            let table = mounts::read_mounts()?;
            // Innermost first, so that stacked mounts come off in order.
            for mp in mounts::mount_points_of(&table, &source).iter().rev() {
                mounts::unmount(
                    &self.tools,
                    mp,
                    self.cfg.unmount_tries,
                    self.cfg.unmount_pause,
                )?;
                unmounted = true;
            }
        }
        let message = if unmounted {
            format!("Unmounted partition of {}", s.describe())
        } else {
            format!("Partition of {} is not mounted", s.describe())
        };
        Ok(Unmounted { unmounted, message })
    }

    /// `migrate_disk [old, new]`: makes the store read-only (not for bind mounts, which
    /// cannot be remounted so), copies it onto the migration target ([`migrate::copy_tree`]),
    /// unmounts the old disk and moves the new one onto `<base>/store`. Value: `{}`.
    ///
    /// Unlike upstream, which ignores the two cids, they are checked first: `old` must be the
    /// disk on the store and `new` the one on the migration target, else nothing is touched
    /// (an unknown cid is upstream's "could not be found"). The director always sends exactly
    /// that pair, so the check only refuses requests that would copy between other disks than
    /// the ones it names.
    pub fn migrate_disk(
        &self,
        old: &str,
        new: &str,
        settings: &SettingsDisks,
    ) -> Result<(), DiskError> {
        let _g = self.guard();
        let store = self.cfg.store_dir();
        let target = self.cfg.migration_dir();
        let table = mounts::read_mounts()?;
        for mp in [&store, &target] {
            if mounts::mounted_at(&table, mp).is_none() {
                return Err(DiskError::Mount(format!(
                    "Error finding device for mount point {}",
                    mp.display()
                )));
            }
        }
        for (cid, mp) in [(old, &store), (new, &target)] {
            let s = self.lookup(cid, settings)?;
            let here = self.current_source(&s)?.and_then(|src| {
                mounts::mounted_at(&table, mp).filter(|m| mounts::is_mount_of(m, &src))
            });
            if here.is_none() {
                return Err(DiskError::Mount(format!(
                    "Disk '{cid}' is not the disk mounted on {}, refusing to migrate",
                    mp.display()
                )));
            }
        }
        if !self.cfg.resolver.bind_mount {
            mounts::remount_read_only(&self.tools, &store)?;
        }
        if let Err(e) = migrate::copy_tree(&self.tools, &store, &target) {
            // The old disk is still the store: make it writable again, so a failed migration
            // leaves the instance as it was (upstream leaves it read-only).
            if !self.cfg.resolver.bind_mount {
                let _ = self
                    .tools
                    .run(Tool::Mount, &["-o", "remount,rw", &store.to_string_lossy()]);
            }
            return Err(e);
        }
        mounts::unmount(
            &self.tools,
            &store,
            self.cfg.unmount_tries,
            self.cfg.unmount_pause,
        )?;
        mounts::move_mount(&self.tools, &target, &store)
    }

    /// At boot, before jobs start: mounts the disk named in `managed_disk_settings.json`
    /// again (growing it if the disk got bigger), if it has a partition (upstream's
    /// "mountable" test) or is preformatted. Returns the cid mounted, or `None` when there is
    /// no managed disk or it has no partition. A managed cid that no settings or hint know is
    /// an error (upstream's), and so is a file that holds no cid ([`store::parse_managed`]);
    /// both name the file, and a cut-short cid is reported as unknown. Nothing is mounted
    /// then and the file is left as it is: the next `mount_disk` rewrites it.
    pub fn mount_last_managed_disk(
        &self,
        settings: &SettingsDisks,
    ) -> Result<Option<String>, DiskError> {
        let _g = self.guard();
        let Some(cid) = store::read_managed(&self.cfg.base)? else {
            return Ok(None);
        };
        let s = self.lookup(&cid, settings).map_err(|e| match e {
            e @ DiskError::UnknownDisk(_) => DiskError::File {
                path: store::managed_path(&self.cfg.base),
                detail: format!(
                    "the last mounted disk is in neither the settings nor the hints file \
                     (cut short?): {e}"
                ),
            },
            other => other,
        })?;
        if !self.cfg.use_preformatted && !self.cfg.resolver.bind_mount {
            let device = resolve::resolve_required(&self.cfg.resolver, &self.tools, &s)?;
            let table = partition::read_table(&self.tools, &device)?;
            if table.is_none_or(|t| t.partitions.is_empty()) {
                return Ok(None);
            }
        }
        self.mount_locked(&s)?;
        Ok(Some(cid))
    }
}
