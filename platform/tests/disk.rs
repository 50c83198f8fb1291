//! Persistent disks on real loop devices that each test makes (a small sparse file in its own
//! temporary directory, `losetup --find --show --partscan`), detached and deleted in `Drop`
//! whatever happens. No other disk is ever touched: every device path a test hands the agent
//! is one `losetup` printed for it.
//!
//! Mounts: every test re-executes this test binary, running only itself, under
//! `unshare -m --propagation private`. The mounts it makes live in that private mount
//! namespace and vanish with it, so a failing test can never leave a mount on the host (and
//! `/proc/self/mountinfo`, which the agent reads, shows only the test's own mounts besides
//! the host's). Needs root, util-linux, e2fsprogs, xfsprogs, parted, cloud-guest-utils and
//! attr (`scripts/deps.sh`); a missing one fails the test and says which.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use platform::disk::{DiskConfig, DiskEnv, Disks, Resolution, SettingsDisks};
use serde_json::json;

const INNER: &str = "PLATFORM_DISK_TEST_IN_PRIVATE_NS";
const MIB: u64 = 1024 * 1024;

/// Runs `body` in a private mount namespace (see the module documentation).
fn in_private_mount_ns(name: &str, body: impl FnOnce()) {
    if std::env::var_os(INNER).is_some() {
        body();
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the disk tests need root (loop devices, mounts)"
    );
    for tool in [
        "unshare",
        "losetup",
        "sfdisk",
        "parted",
        "growpart",
        "partx",
        "blkid",
        "mke2fs",
        "mkfs.xfs",
        "resize2fs",
        "setfattr",
        "getfattr",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing: run scripts/deps.sh");
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} in the private mount namespace failed:\n{stdout}\n{stderr}"
    );
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary base directory; on drop, whatever is mounted under it is unmounted (lazily)
/// and the tree removed.
struct Base {
    dir: PathBuf,
}

impl Base {
    fn new(name: &str) -> Base {
        let dir = std::env::temp_dir().join(format!("platform-disk-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bosh")).unwrap();
        Base { dir }
    }
    fn config(&self) -> DiskConfig {
        let mut c = DiskConfig::new(self.dir.join("vcap"));
        c.resolver.path_wait = Duration::from_secs(2);
        c.resolver.udev = false;
        c.unmount_tries = 3;
        c.unmount_pause = Duration::from_millis(200);
        c
    }
    fn store(&self) -> PathBuf {
        self.dir.join("vcap/store")
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut ours: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|mp| mp.starts_with(&*self.dir.to_string_lossy()))
            .map(str::to_string)
            .collect();
        ours.reverse();
        for mp in ours {
            let _ = Command::new("umount").args(["-l", &mp]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A loop device over a sparse file the test made; detached and deleted on drop.
struct Loop {
    dev: PathBuf,
    file: PathBuf,
}

impl Loop {
    fn new(base: &Base, name: &str, mib: u64) -> Loop {
        let file = base.dir.join(format!("{name}.img"));
        fs::File::create(&file).unwrap().set_len(mib * MIB).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--partscan", &file.to_string_lossy()])
            .output()
            .unwrap();
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // Made before any check, so that Drop detaches whatever losetup attached.
        let made = Loop { dev, file };
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(made.path().starts_with("/dev/loop"), "{:?}", made.dev);
        made
    }
    fn path(&self) -> String {
        self.dev.to_string_lossy().into_owned()
    }
    fn part(&self) -> PathBuf {
        PathBuf::from(format!("{}p1", self.path()))
    }
    /// The disk "got bigger" (a resize by the IaaS).
    fn grow_to(&self, mib: u64) {
        fs::OpenOptions::new()
            .write(true)
            .open(&self.file)
            .unwrap()
            .set_len(mib * MIB)
            .unwrap();
        run("losetup", &["-c", &self.path()]);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Unmount what is mounted from this device or its partition first, so that the
        // detach is immediate (a busy loop device would only be marked for auto-clear).
        let ours = [rdev_of_opt(&self.dev), rdev_of_opt(&self.part())];
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mps: Vec<String> = text
            .lines()
            .filter(|l| {
                ours.iter()
                    .flatten()
                    .any(|d| l.split(' ').nth(2) == Some(d.as_str()))
            })
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .collect();
        mps.reverse();
        for mp in mps {
            let _ = Command::new("umount").args(["-l", &mp]).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.path()]).status();
        let _ = fs::remove_file(&self.file);
    }
}

fn no_settings() -> SettingsDisks {
    SettingsDisks::default()
}

fn fs_size(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks() * s.fragment_size()
}

fn mount_source_dev(mp: &Path) -> Option<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&*mp.to_string_lossy()))
        .map(|l| l.split(' ').nth(2).unwrap_or_default().to_string())
}

/// Whether sfdisk finds a partition table on `dev`.
fn has_table(dev: &str) -> bool {
    Command::new("sfdisk")
        .args(["--json", dev])
        .output()
        .unwrap()
        .status
        .success()
}

fn rdev_of_opt(p: &Path) -> Option<String> {
    let r = fs::metadata(p).ok()?.rdev();
    Some(format!(
        "{}:{}",
        nix::sys::stat::major(r),
        nix::sys::stat::minor(r)
    ))
}

fn rdev_of(p: &Path) -> String {
    let r = fs::metadata(p).unwrap().rdev();
    format!("{}:{}", nix::sys::stat::major(r), nix::sys::stat::minor(r))
}

#[test]
fn a_new_disk_is_partitioned_formatted_mounted_and_mounted_again_at_boot() {
    in_private_mount_ns(
        "a_new_disk_is_partitioned_formatted_mounted_and_mounted_again_at_boot",
        || {
            let base = Base::new("new");
            let disk = Loop::new(&base, "a", 200);
            let disks = Disks::new(base.config());
            disks
                .add_persistent_disk("disk-a", &json!({"path": disk.path()}), &DiskEnv::default())
                .unwrap();
            let m = disks.mount_disk("disk-a", &no_settings()).unwrap();
            assert!(m.partitioned && m.formatted && !m.already, "{m:?}");
            assert_eq!(m.mount_point, base.store());
            assert_eq!(mount_source_dev(&base.store()), Some(rdev_of(&disk.part())));
            assert_eq!(
                run(
                    "blkid",
                    &[
                        "-p",
                        "-o",
                        "value",
                        "-s",
                        "TYPE",
                        &disk.part().to_string_lossy()
                    ]
                )
                .trim(),
                "ext4"
            );
            // One MBR partition filling the disk.
            let dump = run("sfdisk", &["--json", &disk.path()]);
            assert!(
                dump.contains("\"label\": \"dos\"") && dump.matches("\"node\"").count() == 1,
                "{dump}"
            );
            fs::write(base.store().join("data.txt"), "kept").unwrap();
            assert_eq!(
                fs::read_to_string(base.dir.join("vcap/bosh/managed_disk_settings.json")).unwrap(),
                "disk-a"
            );
            assert_eq!(disks.list_disk(&no_settings()).unwrap(), vec!["disk-a"]);

            let u = disks.unmount_disk("disk-a", &no_settings()).unwrap();
            assert!(u.unmounted);
            assert!(
                u.message.starts_with("Unmounted partition of {ID:disk-a "),
                "{}",
                u.message
            );
            assert_eq!(mount_source_dev(&base.store()), None);
            // The mount point was made 0700.
            assert_eq!(
                fs::metadata(base.store()).unwrap().permissions().mode() & 0o777,
                0o700
            );
            assert!(disks.list_disk(&no_settings()).unwrap().is_empty());
            let again = disks.unmount_disk("disk-a", &no_settings()).unwrap();
            assert!(!again.unmounted);
            assert!(
                again.message.starts_with("Partition of {ID:disk-a ")
                    && again.message.ends_with("is not mounted")
            );

            // An agent restart: a new service, the boot call.
            let restarted = Disks::new(base.config());
            assert_eq!(
                restarted
                    .mount_last_managed_disk(&no_settings())
                    .unwrap()
                    .as_deref(),
                Some("disk-a")
            );
            assert_eq!(
                fs::read_to_string(base.store().join("data.txt")).unwrap(),
                "kept"
            );
            // mount_disk again is a no-op that formats nothing.
            let m = restarted.mount_disk("disk-a", &no_settings()).unwrap();
            assert!(m.already && !m.formatted && !m.partitioned, "{m:?}");
            assert_eq!(
                fs::read_to_string(base.store().join("data.txt")).unwrap(),
                "kept"
            );
        },
    );
}

#[test]
fn a_disk_that_holds_a_file_system_is_mounted_never_formatted() {
    in_private_mount_ns(
        "a_disk_that_holds_a_file_system_is_mounted_never_formatted",
        || {
            let base = Base::new("existing");
            let disk = Loop::new(&base, "a", 200);
            // Someone else's layout: one partition with ext4 and a file, made by hand.
            Command::new("sh")
                .args(["-c", &format!("echo ',,L' | sfdisk -q {}", disk.path())])
                .status()
                .unwrap();
            run("partx", &["-u", &disk.path()]);
            for _ in 0..50 {
                if disk.part().exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            run(
                "mke2fs",
                &[
                    "-q",
                    "-t",
                    "ext4",
                    "-L",
                    "theirs",
                    &disk.part().to_string_lossy(),
                ],
            );
            let scratch = base.dir.join("scratch");
            fs::create_dir_all(&scratch).unwrap();
            run(
                "mount",
                &[&disk.part().to_string_lossy(), &scratch.to_string_lossy()],
            );
            fs::write(scratch.join("precious"), "do not lose").unwrap();
            run("umount", &[&scratch.to_string_lossy()]);

            let disks = Disks::new(base.config());
            // Asked for xfs: the ext4 that is there is kept (upstream's rule too).
            let env = DiskEnv {
                filesystem: "xfs".into(),
                ..DiskEnv::default()
            };
            disks
                .add_persistent_disk("disk-a", &json!(disk.path()), &env)
                .unwrap();
            let m = disks.mount_disk("disk-a", &no_settings()).unwrap();
            assert!(!m.formatted && !m.partitioned, "{m:?}");
            assert_eq!(
                fs::read_to_string(base.store().join("precious")).unwrap(),
                "do not lose"
            );
            assert_eq!(
                run(
                    "blkid",
                    &[
                        "-p",
                        "-o",
                        "value",
                        "-s",
                        "LABEL",
                        &disk.part().to_string_lossy()
                    ]
                )
                .trim(),
                "theirs"
            );
            disks.unmount_disk("disk-a", &no_settings()).unwrap();

            // Mounted elsewhere by someone else: refused, not mounted twice.
            run(
                "mount",
                &[&disk.part().to_string_lossy(), &scratch.to_string_lossy()],
            );
            let e = disks
                .mount_disk("disk-a", &no_settings())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("is already mounted to") && e.contains("scratch"),
                "{e}"
            );
            assert_eq!(mount_source_dev(&base.store()), None);
            let u = disks.unmount_disk("disk-a", &no_settings()).unwrap();
            assert!(u.unmounted);
            assert_eq!(u.value()["message"], json!(u.message));

            // A file system on the whole device (no table) is refused, and left as it was.
            let whole = Loop::new(&base, "whole", 120);
            run(
                "mke2fs",
                &["-q", "-t", "ext4", "-L", "wholedisk", &whole.path()],
            );
            disks
                .add_persistent_disk("disk-w", &json!(whole.path()), &DiskEnv::default())
                .unwrap();
            let e = disks
                .mount_disk("disk-w", &no_settings())
                .unwrap_err()
                .to_string();
            assert!(e.contains("ext4 file system on the whole device"), "{e}");
            assert_eq!(
                run(
                    "blkid",
                    &["-p", "-o", "value", "-s", "LABEL", &whole.path()]
                )
                .trim(),
                "wholedisk"
            );
            assert!(!has_table(&whole.path()));

            // A swap signature on the partition: not ours, not formatted.
            let swap = Loop::new(&base, "swap", 120);
            Command::new("sh")
                .args(["-c", &format!("echo ',,L' | sfdisk -q {}", swap.path())])
                .status()
                .unwrap();
            run("partx", &["-u", &swap.path()]);
            std::thread::sleep(Duration::from_millis(300));
            run("mkswap", &[&swap.part().to_string_lossy()]);
            disks
                .add_persistent_disk("disk-s", &json!(swap.path()), &DiskEnv::default())
                .unwrap();
            let e = disks
                .mount_disk("disk-s", &no_settings())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("holds a swap signature; not formatting it"),
                "{e}"
            );
            assert_eq!(
                run(
                    "blkid",
                    &[
                        "-p",
                        "-o",
                        "value",
                        "-s",
                        "TYPE",
                        &swap.part().to_string_lossy()
                    ]
                )
                .trim(),
                "swap"
            );
        },
    );
}

#[test]
fn migration_to_a_bigger_disk_keeps_owners_modes_xattrs_holes_and_links() {
    in_private_mount_ns(
        "migration_to_a_bigger_disk_keeps_owners_modes_xattrs_holes_and_links",
        || {
            let base = Base::new("migrate");
            let old = Loop::new(&base, "old", 200);
            let new = Loop::new(&base, "new", 400);
            let disks = Disks::new(base.config());
            disks
                .add_persistent_disk(
                    "disk-old",
                    &json!({"path": old.path()}),
                    &DiskEnv::default(),
                )
                .unwrap();
            disks.mount_disk("disk-old", &no_settings()).unwrap();
            let store = base.store();
            let small = fs_size(&store);

            let dir = store.join("job/data");
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
            let f = dir.join("owned");
            fs::write(&f, "owned data").unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
            nix::unistd::chown(&f, Some(1234.into()), Some(5678.into())).unwrap();
            run(
                "setfattr",
                &["-n", "user.bosh", "-v", "kept", &f.to_string_lossy()],
            );
            let sparse = dir.join("sparse");
            let s = fs::File::create(&sparse).unwrap();
            s.set_len(64 * MIB).unwrap();
            std::os::unix::fs::FileExt::write_at(&s, b"x", 10 * MIB).unwrap();
            drop(s);
            std::os::unix::fs::symlink("owned", dir.join("link")).unwrap();

            disks
                .add_persistent_disk(
                    "disk-new",
                    &json!({"path": new.path()}),
                    &DiskEnv::default(),
                )
                .unwrap();
            let m = disks.mount_disk("disk-new", &no_settings()).unwrap();
            assert_eq!(m.mount_point, base.dir.join("vcap/store_migration_target"));
            let mut listed = disks.list_disk(&no_settings()).unwrap();
            listed.sort();
            assert_eq!(listed, vec!["disk-new", "disk-old"]);

            // A third disk has nowhere to go, and is left blank.
            let third = Loop::new(&base, "third", 120);
            disks
                .add_persistent_disk("disk-3", &json!(third.path()), &DiskEnv::default())
                .unwrap();
            let e = disks
                .mount_disk("disk-3", &no_settings())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("is already mounted to") && e.contains("store_migration_target"),
                "{e}"
            );
            assert!(!has_table(&third.path()));

            // Cids that are not the store's and the target's disks: refused, nothing moved.
            for (old_cid, new_cid, want) in [
                (
                    "disk-old",
                    "disk-nope",
                    "Persistent disk with volume id 'disk-nope' could not be found",
                ),
                (
                    "disk-new",
                    "disk-old",
                    "Disk 'disk-new' is not the disk mounted on",
                ),
                (
                    "disk-old",
                    "disk-3",
                    "Disk 'disk-3' is not the disk mounted on",
                ),
            ] {
                let e = disks
                    .migrate_disk(old_cid, new_cid, &no_settings())
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(want), "{old_cid} -> {new_cid}: {e}");
                assert_eq!(mount_source_dev(&store), Some(rdev_of(&old.part())));
                assert_eq!(
                    mount_source_dev(&base.dir.join("vcap/store_migration_target")),
                    Some(rdev_of(&new.part()))
                );
                fs::write(store.join("still-writable"), "yes").unwrap();
            }
            disks
                .migrate_disk("disk-old", "disk-new", &no_settings())
                .unwrap();
            assert_eq!(mount_source_dev(&store), Some(rdev_of(&new.part())));
            assert_eq!(
                mount_source_dev(&base.dir.join("vcap/store_migration_target")),
                None
            );
            assert_eq!(disks.list_disk(&no_settings()).unwrap(), vec!["disk-new"]);
            assert!(
                fs_size(&store) > small + 150 * MIB,
                "{} vs {small}",
                fs_size(&store)
            );

            let meta = fs::metadata(&f).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
            assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
            assert_eq!(
                fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
                0o750
            );
            assert_eq!(fs::read_to_string(&f).unwrap(), "owned data");
            assert_eq!(
                run(
                    "getfattr",
                    &["--only-values", "-n", "user.bosh", &f.to_string_lossy()]
                ),
                "kept"
            );
            let sm = fs::metadata(&sparse).unwrap();
            assert_eq!(sm.len(), 64 * MIB);
            assert!(
                sm.blocks() * 512 < MIB,
                "the sparse file takes {} bytes",
                sm.blocks() * 512
            );
            assert_eq!(
                fs::read_link(dir.join("link")).unwrap(),
                PathBuf::from("owned")
            );
            // The store is writable again (the old disk was the read-only one).
            fs::write(store.join("after"), "x").unwrap();
            assert_eq!(
                fs::read_to_string(base.dir.join("vcap/bosh/managed_disk_settings.json")).unwrap(),
                "disk-new"
            );
            // The old disk was not changed by the copy (it was read-only) and is not mounted.
            let u = disks.unmount_disk("disk-old", &no_settings()).unwrap();
            assert!(!u.unmounted, "{}", u.message);
        },
    );
}

#[test]
fn a_disk_that_got_bigger_has_its_partition_and_file_system_grown() {
    in_private_mount_ns(
        "a_disk_that_got_bigger_has_its_partition_and_file_system_grown",
        || {
            let base = Base::new("grow");
            let disk = Loop::new(&base, "a", 200);
            let disks = Disks::new(base.config());
            disks
                .add_persistent_disk("disk-a", &json!(disk.path()), &DiskEnv::default())
                .unwrap();
            disks.mount_disk("disk-a", &no_settings()).unwrap();
            fs::write(base.store().join("data"), "kept").unwrap();
            let before = fs_size(&base.store());
            disks.unmount_disk("disk-a", &no_settings()).unwrap();

            disk.grow_to(500);
            let m = disks.mount_disk("disk-a", &no_settings()).unwrap();
            assert!(m.grown && !m.formatted && !m.partitioned, "{m:?}");
            assert_eq!(
                fs::read_to_string(base.store().join("data")).unwrap(),
                "kept"
            );
            let after = fs_size(&base.store());
            assert!(after > before + 250 * MIB, "{after} vs {before}");
            // Still one partition.
            let dump = run("sfdisk", &["--json", &disk.path()]);
            assert_eq!(dump.matches("\"node\"").count(), 1, "{dump}");

            // xfs, made by the agent with parted (GPT), grows too.
            let x = Loop::new(&base, "x", 320);
            let env = DiskEnv {
                filesystem: "xfs".into(),
                partitioner: "parted".into(),
                ..DiskEnv::default()
            };
            disks
                .add_persistent_disk("disk-x", &json!(x.path()), &env)
                .unwrap();
            disks.unmount_disk("disk-a", &no_settings()).unwrap();
            let m = disks.mount_disk("disk-x", &no_settings()).unwrap();
            assert!(m.formatted && m.partitioned);
            assert_eq!(
                run(
                    "blkid",
                    &[
                        "-p",
                        "-o",
                        "value",
                        "-s",
                        "TYPE",
                        &x.part().to_string_lossy()
                    ]
                )
                .trim(),
                "xfs"
            );
            assert!(run("sfdisk", &["--json", &x.path()]).contains("\"label\": \"gpt\""));
            fs::write(base.store().join("xdata"), "kept").unwrap();
            let before = fs_size(&base.store());
            disks.unmount_disk("disk-x", &no_settings()).unwrap();
            x.grow_to(600);
            let m = disks.mount_disk("disk-x", &no_settings()).unwrap();
            assert!(m.grown && !m.formatted, "{m:?}");
            assert_eq!(
                fs::read_to_string(base.store().join("xdata")).unwrap(),
                "kept"
            );
            assert!(fs_size(&base.store()) > before + 200 * MIB);
        },
    );
}

#[test]
fn virtio_finds_the_disk_by_id_and_warden_mode_bind_mounts_a_directory() {
    in_private_mount_ns(
        "virtio_finds_the_disk_by_id_and_warden_mode_bind_mounts_a_directory",
        || {
            let base = Base::new("virtio");
            let disk = Loop::new(&base, "a", 120);
            let by_id = base.dir.join("by-id");
            fs::create_dir_all(&by_id).unwrap();
            let cid = "7f3a1e52-0c44-4b5e-9d0a-1b2c3d4e5f60";
            std::os::unix::fs::symlink(&disk.dev, by_id.join(format!("virtio-{cid}"))).unwrap();
            let mut cfg = base.config();
            cfg.resolver.resolution = Resolution::Virtio;
            cfg.resolver.by_id_dir = by_id.clone();
            let disks = Disks::new(cfg);
            // The hint's path is wrong (as after a reboot renamed the devices): by-id wins.
            disks
                .add_persistent_disk(
                    cid,
                    &json!({"path": "/dev/vdzz", "volume_id": "3"}),
                    &DiskEnv::default(),
                )
                .unwrap();
            let m = disks.mount_disk(cid, &no_settings()).unwrap();
            assert!(m.formatted);
            assert_eq!(mount_source_dev(&base.store()), Some(rdev_of(&disk.part())));
            assert_eq!(disks.list_disk(&no_settings()).unwrap(), vec![cid]);
            assert!(disks.unmount_disk(cid, &no_settings()).unwrap().unmounted);
            // Two matches are refused.
            std::os::unix::fs::symlink(&disk.dev, by_id.join(format!("scsi-{cid}"))).unwrap();
            let e = disks
                .mount_disk(cid, &no_settings())
                .unwrap_err()
                .to_string();
            assert!(e.contains("More than one disk matched"), "{e}");

            // Warden: UsePreformattedPersistentDisk + BindMountPersistentDisk with a directory.
            let wbase = Base::new("warden");
            let dir = wbase.dir.join("warden-disk");
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("old"), "from the host").unwrap();
            let mut cfg = wbase.config();
            cfg.use_preformatted = true;
            cfg.resolver.bind_mount = true;
            let warden = Disks::new(cfg);
            warden
                .add_persistent_disk("disk-w", &json!(dir.to_string_lossy()), &DiskEnv::default())
                .unwrap();
            let settings = no_settings();
            assert!(warden.list_disk(&settings).unwrap().is_empty());
            warden.mount_disk("disk-w", &settings).unwrap();
            assert_eq!(
                fs::read_to_string(wbase.store().join("old")).unwrap(),
                "from the host"
            );
            assert_eq!(warden.list_disk(&settings).unwrap(), vec!["disk-w"]);
            // Boot: already mounted, nothing to do but say so.
            assert_eq!(
                warden
                    .mount_last_managed_disk(&settings)
                    .unwrap()
                    .as_deref(),
                Some("disk-w")
            );
            assert!(warden.unmount_disk("disk-w", &settings).unwrap().unmounted);
            assert!(!wbase.store().join("old").exists());
            assert!(dir.join("old").exists());
        },
    );
}

#[test]
fn unknown_cids_and_hostile_hints_are_clear_errors_that_change_nothing() {
    in_private_mount_ns(
        "unknown_cids_and_hostile_hints_are_clear_errors_that_change_nothing",
        || {
            let base = Base::new("hostile");
            let disks = Disks::new(base.config());
            let want = "Persistent disk with volume id 'disk-x' could not be found";
            assert_eq!(
                disks
                    .mount_disk("disk-x", &no_settings())
                    .unwrap_err()
                    .to_string(),
                want
            );
            assert_eq!(
                disks
                    .unmount_disk("disk-x", &no_settings())
                    .unwrap_err()
                    .to_string(),
                want
            );
            assert!(disks.list_disk(&no_settings()).unwrap().is_empty());
            // Nothing to mount again at boot.
            assert_eq!(disks.mount_last_managed_disk(&no_settings()).unwrap(), None);
            // A managed disk file cut short (a cid's prefix) or never filled (NUL bytes):
            // an error naming the file, nothing mounted, the file kept for the next mount.
            let managed = base.dir.join("vcap/bosh/managed_disk_settings.json");
            fs::create_dir_all(managed.parent().unwrap()).unwrap();
            for (text, why) in [
                (
                    &b"disk-"[..],
                    "Persistent disk with volume id 'disk-' could not be found",
                ),
                (b"\0\0\0\0\0\0", "not a disk cid"),
            ] {
                fs::write(&managed, text).unwrap();
                let e = disks
                    .mount_last_managed_disk(&no_settings())
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.starts_with(&format!("{}: ", managed.display())) && e.contains(why),
                    "{e}"
                );
                assert_eq!(fs::read(&managed).unwrap(), text);
                assert!(disks.list_disk(&no_settings()).unwrap().is_empty());
            }
            fs::remove_file(&managed).unwrap();

            // Paths outside /dev, links out of it, char devices, missing devices.
            let hints = base.dir.join("vcap/bosh/persistent_disk_hints.json");
            let outside = base.dir.join("file.img");
            fs::write(&outside, vec![0u8; 4096]).unwrap();
            let link = PathBuf::from(format!("/dev/.platform-disk-test-{}", std::process::id()));
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            struct Rm(PathBuf);
            impl Drop for Rm {
                fn drop(&mut self) {
                    let _ = fs::remove_file(&self.0);
                }
            }
            let _rm = Rm(link.clone());
            for (path, word) in [
                (outside.to_string_lossy().into_owned(), "not under /dev"),
                ("/etc/passwd".to_string(), "not under /dev"),
                ("/dev/../etc/passwd".to_string(), "'..'"),
                (link.to_string_lossy().into_owned(), "outside /dev"),
                ("/dev/null".to_string(), "not a block device"),
                (
                    "/dev/sdzz7".to_string(),
                    "Timed out getting real device path for /dev/sdzz7",
                ),
            ] {
                disks
                    .add_persistent_disk("disk-h", &json!({"path": path}), &DiskEnv::default())
                    .unwrap();
                let e = disks
                    .mount_disk("disk-h", &no_settings())
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(word), "{path}: {e}");
            }
            // The last refused hint is still stored: list and unmount count it as not mounted.
            disks
                .add_persistent_disk("disk-h", &json!("/etc/passwd"), &DiskEnv::default())
                .unwrap();
            assert!(disks.list_disk(&no_settings()).unwrap().is_empty());
            assert!(
                !disks
                    .unmount_disk("disk-h", &no_settings())
                    .unwrap()
                    .unmounted
            );
            assert_eq!(fs::read(&outside).unwrap(), vec![0u8; 4096]);
            assert!(
                !base
                    .dir
                    .join("vcap/bosh/managed_disk_settings.json")
                    .exists()
            );
            assert_eq!(mount_source_dev(&base.store()), None);

            // Bad hints and settings values are refused before anything is stored.
            let before = fs::read(&hints).unwrap();
            for hint in [
                json!({"path": ["x"]}),
                json!(17),
                json!({"iscsi_settings": 3}),
            ] {
                assert!(
                    disks
                        .add_persistent_disk("disk-b", &hint, &DiskEnv::default())
                        .is_err()
                );
            }
            assert_eq!(fs::read(&hints).unwrap(), before);
            let disk = Loop::new(&base, "p", 120);
            let env = DiskEnv {
                filesystem: "btrfs".into(),
                ..DiskEnv::default()
            };
            disks
                .add_persistent_disk("disk-f", &json!(disk.path()), &env)
                .unwrap();
            let e = disks
                .mount_disk("disk-f", &no_settings())
                .unwrap_err()
                .to_string();
            assert_eq!(e, "The filesystem type \"btrfs\" is not supported");
            assert!(!has_table(&disk.path()));
            let env = DiskEnv {
                partitioner: "fdisk".into(),
                ..DiskEnv::default()
            };
            disks
                .add_persistent_disk("disk-p", &json!(disk.path()), &env)
                .unwrap();
            let e = disks
                .mount_disk("disk-p", &no_settings())
                .unwrap_err()
                .to_string();
            assert_eq!(e, "Unknown partitioner type 'fdisk'");
            assert!(!has_table(&disk.path()));

            // A damaged hints file: reported with its path, kept byte for byte.
            fs::write(&hints, b"{\"disk-a\": {\"Path\": ").unwrap();
            let e = disks
                .add_persistent_disk("disk-a", &json!("/dev/sdb"), &DiskEnv::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("persistent_disk_hints.json"), "{e}");
            assert!(
                disks
                    .list_disk(&no_settings())
                    .unwrap_err()
                    .to_string()
                    .contains("persistent_disk_hints.json")
            );
            assert_eq!(fs::read(&hints).unwrap(), b"{\"disk-a\": {\"Path\": ");

            // Settings' disks.persistent are known too (the hints file wins on the same cid).
            fs::remove_file(&hints).unwrap();
            let mut settings = SettingsDisks::default();
            settings
                .persistent
                .insert("disk-s".into(), json!({"path": disk.path()}));
            let env_ok = DiskEnv::default();
            settings.env = env_ok;
            assert!(disks.mount_disk("disk-s", &settings).unwrap().formatted);
            assert_eq!(disks.list_disk(&settings).unwrap(), vec!["disk-s"]);
        },
    );
}

#[test]
fn a_migration_that_cannot_finish_leaves_the_old_store_in_place_and_writable() {
    in_private_mount_ns(
        "a_migration_that_cannot_finish_leaves_the_old_store_in_place_and_writable",
        || {
            let base = Base::new("migrate-full");
            let old = Loop::new(&base, "old", 200);
            // Too small for what the old disk holds.
            let new = Loop::new(&base, "new", 64);
            let disks = Disks::new(base.config());
            disks
                .add_persistent_disk("disk-old", &json!(old.path()), &DiskEnv::default())
                .unwrap();
            disks
                .add_persistent_disk("disk-new", &json!(new.path()), &DiskEnv::default())
                .unwrap();
            disks.mount_disk("disk-old", &no_settings()).unwrap();
            fs::write(base.store().join("big"), vec![7u8; 70 * MIB as usize]).unwrap();
            disks.mount_disk("disk-new", &no_settings()).unwrap();
            let e = disks
                .migrate_disk("disk-old", "disk-new", &no_settings())
                .unwrap_err()
                .to_string();
            assert!(e.contains("cp -a") && e.contains("No space left"), "{e}");
            assert_eq!(mount_source_dev(&base.store()), Some(rdev_of(&old.part())));
            assert_eq!(
                fs::metadata(base.store().join("big")).unwrap().len(),
                70 * MIB
            );
            fs::write(base.store().join("still-writable"), "yes").unwrap();
            let mut listed = disks.list_disk(&no_settings()).unwrap();
            listed.sort();
            assert_eq!(listed, vec!["disk-new", "disk-old"]);
        },
    );
}
