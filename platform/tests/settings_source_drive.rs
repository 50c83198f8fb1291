//! The `ConfigDrive` and `CDROM` sources on filesystem images the test makes (labelled
//! CONFIG-2, ext2: see `ext2_image`), attached read-only to loop devices; every mount happens
//! in a private mount namespace, so nothing reaches the host's mount table.
#![allow(clippy::unwrap_used)]

mod settings_source_support;

use std::path::Path;

use platform::settings_source::{
    self, CdromOptions, ConfigDriveOptions, Context, FileOptions, Origin, SourceOptions,
};
use settings_source_support::*;

const USER_DATA: &str = r#"{"agent_id":"drive-agent","mbus":"nats://u:p@10.0.0.6:4222"}"#;
const META_DATA: &str =
    r#"{"instance-id":"i-1","public-keys":{"0":{"openssh-key":"ssh-rsa AAAA cd"}}}"#;

fn drive_files() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ec2/latest/user-data", USER_DATA),
        ("ec2/latest/meta-data.json", META_DATA),
    ]
}

fn openstack(disks: Vec<String>) -> ConfigDriveOptions {
    ConfigDriveOptions {
        disk_paths: disks,
        meta_data_path: "ec2/latest/meta-data.json".into(),
        user_data_path: "ec2/latest/user-data".into(),
        ..ConfigDriveOptions::default()
    }
}

fn context(dir: &Path) -> Context {
    let mut c = Context::new(&dir.join("base"));
    c.scratch_dir = dir.join("scratch");
    std::fs::create_dir_all(&c.scratch_dir).unwrap();
    c.cdrom_wait = quick(2);
    c
}

#[test]
fn a_labelled_config_drive_is_mounted_read_only_read_and_unmounted() {
    require(&["losetup", "mke2fs", "mount"]);
    let dir = TempDir::new();
    let image = ext2_image(dir.path(), "CONFIG-2", &drive_files());
    let lo = LoopDevice::attach(&image);
    // /dev/disk/by-label as udev makes it: a link to the device. The first label is absent.
    let by_label = dir.path().join("by-label");
    std::fs::create_dir_all(&by_label).unwrap();
    std::os::unix::fs::symlink(&lo.device, by_label.join("CONFIG-2")).unwrap();
    let missing = by_label.join("config-2").display().to_string();
    let present = by_label.join("CONFIG-2").display().to_string();
    let d = dir.path().to_path_buf();
    in_private_mount_namespace(move || {
        let c = context(&d);
        let source = SourceOptions::ConfigDrive(openstack(vec![missing.clone(), present.clone()]));
        let loaded = settings_source::load(std::slice::from_ref(&source), &c).unwrap();
        assert_eq!(loaded.settings["agent_id"], "drive-agent");
        assert!(matches!(loaded.origin, Origin::Source { index: 0, .. }));
        assert_eq!(
            settings_source::public_ssh_key(&[source], &c)
                .unwrap()
                .as_deref(),
            Some("ssh-rsa AAAA cd")
        );
        // Unmounted, and the private mount point is gone.
        assert_eq!(mounts_under(&c.scratch_dir), Vec::<String>::new());
        assert_eq!(std::fs::read_dir(&c.scratch_dir).unwrap().count(), 0);

        // A path missing on the drive: unmounted all the same, and the error says where.
        let mut o = openstack(vec![present.clone()]);
        o.user_data_path = "openstack/latest/user_data".into();
        let e = settings_source::fetch(&SourceOptions::ConfigDrive(o), &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no config drive gave openstack/latest/user_data"),
            "{e}"
        );
        assert!(e.contains("No such file"), "{e}");
        assert_eq!(mounts_under(&c.scratch_dir), Vec::<String>::new());
    });
    // Nothing of it is mounted in the test's own namespace either.
    assert_eq!(mounts_under(dir.path()), Vec::<String>::new());
}

#[test]
fn the_mount_options_make_the_drive_read_only_and_inert() {
    require(&["losetup", "mke2fs", "mount"]);
    let dir = TempDir::new();
    let image = ext2_image(dir.path(), "CONFIG-2", &drive_files());
    let lo = LoopDevice::attach(&image);
    let dev = lo.device.clone();
    let d = dir.path().to_path_buf();
    in_private_mount_namespace(move || {
        // The options the sources mount with, as the kernel applies them.
        let mnt = d.join("probe");
        std::fs::create_dir_all(&mnt).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-o", platform::settings_source::MOUNT_OPTIONS, "--"])
            .arg(&dev)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
            .unwrap()
            .to_string();
        let opts = line.split(' ').nth(5).unwrap();
        for o in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(opts.split(',').any(|x| x == o), "{o} missing: {line}");
        }
        assert!(std::fs::write(mnt.join("x"), "y").is_err());
        nix::mount::umount(&mnt).unwrap();
    });
}

#[test]
fn a_config_drive_directory_is_read_in_place() {
    let dir = TempDir::new();
    let tree = dir.path().join("azure");
    write_tree(
        &tree,
        &[("configs/UserData", USER_DATA), ("configs/MetaData", "{}")],
    );
    let c = context(dir.path());
    let o = ConfigDriveOptions {
        disk_paths: vec![tree.display().to_string()],
        meta_data_path: "configs/MetaData".into(),
        user_data_path: "configs/UserData".into(),
        ..ConfigDriveOptions::default()
    };
    let v = settings_source::fetch(&SourceOptions::ConfigDrive(o.clone()), &c).unwrap();
    assert_eq!(v["agent_id"], "drive-agent");
    // Metadata without keys: no key.
    assert_eq!(
        settings_source::public_ssh_key(&[SourceOptions::ConfigDrive(o)], &c).unwrap(),
        None
    );
}

#[test]
fn no_drive_and_a_malformed_drive_fall_through_to_the_next_source_or_the_cache() {
    let dir = TempDir::new();
    let c = context(dir.path());
    let bad = dir.path().join("bad");
    write_tree(&bad, &[("ec2/latest/user-data", "{\"agent_id\": ")]);
    let file = dir.path().join("bootstrap.json");
    let sources = vec![
        SourceOptions::ConfigDrive(openstack(vec![
            "/dev/disk/by-label/NO-SUCH-LABEL-settings-test".into(),
        ])),
        SourceOptions::ConfigDrive(openstack(vec![bad.display().to_string()])),
        SourceOptions::File(FileOptions {
            settings_path: file.display().to_string(),
            ..FileOptions::default()
        }),
    ];
    let e = settings_source::load(&sources, &c).unwrap_err().to_string();
    assert!(
        e.contains("settings source 0 (ConfigDrive): no config drive gave ec2/latest/user-data: /dev/disk/by-label/NO-SUCH-LABEL-settings-test: reading"),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "{}:ec2/latest/user-data: invalid JSON",
            bad.display()
        )),
        "{e}"
    );
    assert!(e.contains("and the cached settings too"), "{e}");

    platform::files::write_private(&c.cache, br#"{"agent_id":"cached"}"#).unwrap();
    let l = settings_source::load(&sources, &c).unwrap();
    assert_eq!(l.settings["agent_id"], "cached");

    std::fs::write(&file, r#"{"agent_id":"file"}"#).unwrap();
    let l = settings_source::load(&sources, &c).unwrap();
    assert_eq!(l.settings["agent_id"], "file");
    assert!(matches!(l.origin, Origin::Source { index: 2, .. }));
}

#[test]
fn vsphere_env_file_is_read_from_the_cdrom() {
    require(&["losetup", "mke2fs", "mount"]);
    let dir = TempDir::new();
    let image = ext2_image(dir.path(), "CDROM", &[("env", USER_DATA)]);
    let lo = LoopDevice::attach(&image);
    let dev = lo.device.clone();
    let d = dir.path().to_path_buf();
    in_private_mount_namespace(move || {
        let mut c = context(&d);
        c.cdrom_device = dev.clone();
        c.cdrom_eject = false;
        let vsphere = vec![
            SourceOptions::VsphereGuestInfo(Default::default()),
            SourceOptions::Cdrom(CdromOptions {
                file_name: "env".into(),
            }),
        ];
        let loaded = settings_source::load(&vsphere, &c).unwrap();
        assert_eq!(loaded.settings["agent_id"], "drive-agent");
        assert!(matches!(
            loaded.origin,
            Origin::Source {
                index: 1,
                kind: "CDROM",
                ..
            }
        ));
        assert_eq!(mounts_under(&c.scratch_dir), Vec::<String>::new());
        assert_eq!(std::fs::read_dir(&c.scratch_dir).unwrap().count(), 0);

        // A file the disc does not have.
        let e = settings_source::fetch(
            &SourceOptions::Cdrom(CdromOptions {
                file_name: "ENV2".into(),
            }),
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("reading {}/ENV2", dev.display())),
            "{e}"
        );
        assert_eq!(mounts_under(&c.scratch_dir), Vec::<String>::new());
    });
}

#[test]
fn a_cdrom_that_does_not_eject_fails_the_source_as_upstream() {
    require(&["losetup", "mke2fs", "mount", "eject"]);
    let dir = TempDir::new();
    let image = ext2_image(dir.path(), "CDROM", &[("env", USER_DATA)]);
    let lo = LoopDevice::attach(&image);
    let dev = lo.device.clone();
    let d = dir.path().to_path_buf();
    in_private_mount_namespace(move || {
        let mut c = context(&d);
        c.cdrom_device = dev.clone();
        // A loop device has no tray: eject refuses it.
        let e = settings_source::fetch(
            &SourceOptions::Cdrom(CdromOptions {
                file_name: "env".into(),
            }),
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!("CD-ROM {}: eject", dev.display())),
            "{e}"
        );
        assert!(!e.contains("drive-agent"), "{e}");
        assert_eq!(mounts_under(&c.scratch_dir), Vec::<String>::new());
    });
}

#[test]
fn a_missing_cdrom_is_waited_for_a_bounded_number_of_tries() {
    let dir = TempDir::new();
    let mut c = context(dir.path());
    c.cdrom_device = dir.path().join("sr9");
    let e = settings_source::fetch(
        &SourceOptions::Cdrom(CdromOptions {
            file_name: "env".into(),
        }),
        &c,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sr9: not readable"), "{e}");
    assert!(e.contains("gave up after 2 attempts"), "{e}");
}

#[test]
fn a_drive_an_earlier_agent_left_mounted_is_unmounted_at_the_next_load() {
    require(&["losetup", "mke2fs", "mount"]);
    let dir = TempDir::new();
    let image = ext2_image(dir.path(), "CONFIG-2", &drive_files());
    let lo = LoopDevice::attach(&image);
    let dev = lo.device.clone();
    let d = dir.path().to_path_buf();
    in_private_mount_namespace(move || {
        let c = context(&d);
        // What a kill between mount and unmount leaves.
        let left = c.scratch_dir.join(".settings-source-1-dead");
        std::fs::create_dir_all(&left).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-o", "ro"])
            .arg(&dev)
            .arg(&left)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // Someone else's mount in the same directory is left alone.
        let other = c.scratch_dir.join("other");
        std::fs::create_dir_all(&other).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &other,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        assert_eq!(mounts_under(&c.scratch_dir).len(), 2);

        platform::files::write_private(&c.cache, br#"{"agent_id":"cached"}"#).unwrap();
        let l = settings_source::load(&[], &c).unwrap();
        assert_eq!(l.settings["agent_id"], "cached");
        assert_eq!(mounts_under(&c.scratch_dir), [other.display().to_string()]);
        assert!(!left.exists());
        nix::mount::umount(&other).unwrap();
    });
}
