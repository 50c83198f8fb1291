#![allow(clippy::unwrap_used)]
//! Hostile and legitimate archives, built byte by byte (the tar crate's builder refuses to
//! write `..` or absolute names, which is exactly what these tests need).

use super::*;
use std::os::unix::fs::MetadataExt;
use testkit::TempDir;

const MTIME: u64 = 1_600_000_000;

/// One raw tar member: a GNU header with exactly these bytes as name and link name.
fn member(name: &str, kind: EntryType, link: &str, data: &[u8], mode: u32) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(MTIME);
    h.set_uid(4242);
    h.set_gid(4242);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn file(name: &str, data: &[u8], mode: u32) -> Vec<u8> {
    member(name, EntryType::Regular, "", data, mode)
}
fn dir(name: &str, mode: u32) -> Vec<u8> {
    member(name, EntryType::Directory, "", b"", mode)
}
fn symlink(name: &str, target: &str) -> Vec<u8> {
    member(name, EntryType::Symlink, target, b"", 0o777)
}
fn hardlink(name: &str, target: &str) -> Vec<u8> {
    member(name, EntryType::Link, target, b"", 0o644)
}

fn tar_of(members: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = members.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A sandbox `<tmp>/box` holding `dest`, so that anything written beside `dest` shows.
struct Sandbox {
    tmp: TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = TempDir::new("blobstore-test").unwrap();
        fs::create_dir(tmp.path().join("box")).unwrap();
        fs::create_dir(tmp.path().join("box/dest")).unwrap();
        Sandbox { tmp }
    }
    fn root(&self) -> PathBuf {
        self.tmp.path().join("box")
    }
    fn dest(&self) -> PathBuf {
        self.root().join("dest")
    }
    /// Everything under the sandbox's root, as `(relative path, kind)` sorted.
    fn listing(&self) -> Vec<String> {
        list(&self.root())
    }
}

fn list(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let m = fs::symlink_metadata(&abs).unwrap();
        if !rel.as_os_str().is_empty() {
            let kind = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&abs).unwrap().display())
            } else if m.is_dir() {
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                format!("file {:o} {}", m.mode() & 0o7777, m.len())
            };
            out.push(format!("{} {kind}", rel.display()));
        }
        if m.is_dir() {
            for e in fs::read_dir(&abs).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out.sort();
    out
}

fn legit() -> Vec<u8> {
    tar_of(&[
        dir("./", 0o755),
        dir("./bin/", 0o750),
        file("./bin/run", b"#!/bin/sh\necho hi\n", 0o755),
        file("./bin/suid", b"x", 0o6755),
        dir("./lib/", 0o755),
        file("./lib/data", b"data!", 0o640),
        symlink("./bin/link", "../lib/data"),
        symlink("./lib/self", "."),
        hardlink("./lib/hard", "./lib/data"),
        file("./implicit/parent/file", b"p", 0o600),
        dir("./ro/", 0o555),
        file("./ro/inside", b"r", 0o444),
    ])
}

fn legit_listing() -> Vec<String> {
    let mut v: Vec<String> = [
        "dest dir 755",
        "dest/bin dir 750",
        "dest/bin/link -> ../lib/data",
        "dest/bin/run file 755 18",
        "dest/bin/suid file 755 1",
        "dest/implicit dir 755",
        "dest/implicit/parent dir 755",
        "dest/implicit/parent/file file 600 1",
        "dest/lib dir 755",
        "dest/lib/data file 640 5",
        "dest/lib/hard file 640 5",
        "dest/lib/self -> .",
        "dest/ro dir 555",
        "dest/ro/inside file 444 1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.sort();
    v
}

#[test]
fn legit_archive_unpacks_exactly_plain_and_gzip() {
    for bytes in [legit(), gzip(&legit())] {
        let sb = Sandbox::new();
        let stats = unpack(&bytes[..], &sb.dest(), &Select::All).unwrap();
        assert_eq!(sb.listing(), legit_listing());
        assert_eq!(stats.entries, 11);
        assert_eq!(stats.skipped, 0);
        let data = sb.dest().join("lib/data");
        assert_eq!(fs::read(sb.dest().join("bin/link")).unwrap(), b"data!");
        // Hard link: same inode.
        assert_eq!(
            fs::metadata(&data).unwrap().ino(),
            fs::metadata(sb.dest().join("lib/hard")).unwrap().ino()
        );
        // Times kept, owners not (we run as whoever runs the tests, never 4242).
        for p in ["bin/run", "lib/data", "bin", "ro", ""] {
            let m = fs::symlink_metadata(sb.dest().join(p)).unwrap();
            assert_eq!(m.mtime(), MTIME as i64, "{p}");
            assert_ne!(m.uid(), 4242, "{p}");
        }
    }
}

/// Asserts the archive is refused with the expected error and that nothing exists outside
/// `dest` afterwards (and no `outside` file anywhere).
fn refused(members: &[Vec<u8>], select: &Select, check: impl Fn(&ArchiveError) -> bool) {
    let sb = Sandbox::new();
    let e = unpack(&tar_of(members)[..], &sb.dest(), select).unwrap_err();
    assert!(check(&e), "unexpected error: {e:?}");
    for line in sb.listing() {
        assert!(
            line == "dest dir 755" || line.starts_with("dest/"),
            "written outside: {line}"
        );
        assert!(!line.contains("pwned"), "hostile entry written: {line}");
    }
    assert!(!sb.tmp.path().join("pwned").exists());
}

#[test]
fn absolute_paths_are_refused() {
    let sb = TempDir::new("blobstore-test").unwrap();
    let outside = sb.path().join("pwned");
    let abs = outside.to_str().unwrap().to_string();
    refused(
        &[file(&abs, b"x", 0o644)],
        &Select::All,
        |e| matches!(e, ArchiveError::AbsolutePath { entry } if *entry == abs),
    );
    assert!(!outside.exists());
    refused(&[file("/pwned", b"x", 0o644)], &Select::All, |e| {
        matches!(e, ArchiveError::AbsolutePath { .. })
    });
}

#[test]
fn parent_components_are_refused() {
    for name in [
        "../pwned",
        "a/../../pwned",
        "./../pwned",
        "a/b/../../../pwned",
        "..",
    ] {
        refused(
            &[dir("a/", 0o755), file(name, b"x", 0o644)],
            &Select::All,
            |e| matches!(e, ArchiveError::ParentDir { entry } if entry == name),
        );
    }
    // Even a `..` that would stay inside, and even outside the selection.
    refused(&[file("a/../b", b"x", 0o644)], &Select::All, |e| {
        matches!(e, ArchiveError::ParentDir { .. })
    });
    refused(
        &[file("other/../../pwned", b"x", 0o644)],
        &Select::Job("web".into()),
        |e| matches!(e, ArchiveError::ParentDir { .. }),
    );
}

#[test]
fn escaping_symlinks_are_refused() {
    for target in [
        "/etc",
        "/",
        "..",
        "../pwned",
        "a/../../pwned",
        "./../..",
        "sub/../../x",
    ] {
        refused(
            &[symlink("link", target)],
            &Select::All,
            |e| matches!(e, ArchiveError::UnsafeSymlink { target: t, .. } if t == target),
        );
    }
    // Relative to the link's directory: one `..` from `a/` is the root, two escape.
    refused(
        &[dir("a/", 0o755), symlink("a/link", "../../pwned")],
        &Select::All,
        |e| matches!(e, ArchiveError::UnsafeSymlink { .. }),
    );
    // Empty target.
    refused(&[symlink("link", "")], &Select::All, |e| {
        matches!(e, ArchiveError::UnsafeSymlink { .. })
    });
}

#[test]
fn symlink_chains_that_escape_are_refused() {
    // s -> . (the root), then t -> s/.. (lexically the root, really the root's parent).
    refused(
        &[symlink("s", "."), symlink("t", "s/..")],
        &Select::All,
        |e| matches!(e, ArchiveError::UnsafeSymlink { entry, .. } if entry == "t"),
    );
    // d -> a/b (deep), then t -> d/../../../x: lexically two levels up, really one up... and
    // out. Resolved through d: a/b, a, root, out.
    refused(
        &[
            dir("a/b/", 0o755),
            symlink("d", "a/b"),
            symlink("t", "d/../../../pwned"),
        ],
        &Select::All,
        |e| matches!(e, ArchiveError::UnsafeSymlink { entry, .. } if entry == "t"),
    );
    // s -> d/.. while d does not exist (lexically the root); then d becomes a symlink to `.`,
    // which would make s point at the root's parent: refused.
    refused(
        &[symlink("s", "d/.."), symlink("d", ".")],
        &Select::All,
        |e| matches!(e, ArchiveError::UnsafeSymlink { entry, .. } if entry == "d"),
    );
    // Same, with d replaced after being a harmless file.
    refused(
        &[
            file("d", b"", 0o644),
            symlink("s", "d/.."),
            symlink("d", "."),
        ],
        &Select::All,
        |e| matches!(e, ArchiveError::UnsafeSymlink { entry, .. } if entry == "d"),
    );
}

#[test]
fn writing_through_a_symlink_is_refused() {
    // The link itself is harmless (inside), but nothing may be written through it.
    refused(
        &[
            dir("sub/", 0o755),
            symlink("l", "sub"),
            file("l/pwned", b"x", 0o644),
        ],
        &Select::All,
        |e| matches!(e, ArchiveError::Conflict { entry, .. } if entry == "l/pwned"),
    );
    refused(
        &[
            dir("sub/", 0o755),
            symlink("l", "sub"),
            dir("l/pwned/", 0o755),
        ],
        &Select::All,
        |e| matches!(e, ArchiveError::Conflict { .. }),
    );
    // A file entry over an existing symlink replaces the link, never writes through it.
    let sb = Sandbox::new();
    let bytes = tar_of(&[
        file("target", b"keep", 0o644),
        symlink("l", "target"),
        file("l", b"new", 0o644),
    ]);
    unpack(&bytes[..], &sb.dest(), &Select::All).unwrap();
    assert_eq!(fs::read(sb.dest().join("target")).unwrap(), b"keep");
    assert_eq!(fs::read(sb.dest().join("l")).unwrap(), b"new");
    assert!(
        !fs::symlink_metadata(sb.dest().join("l"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn hostile_hard_links_are_refused() {
    let tmp = TempDir::new("blobstore-test").unwrap();
    let abs = tmp.path().join("etc-passwd");
    fs::write(&abs, b"secret").unwrap();
    let abs = abs.to_str().unwrap().to_string();
    for (target, why) in [
        (abs.as_str(), "absolute"),
        ("../pwned", "'..'"),
        ("later", "not a file unpacked before"),
        ("dirx", "not a file unpacked before"),
        ("sl", "not a file unpacked before"),
    ] {
        refused(
            &[
                dir("dirx/", 0o755),
                symlink("sl", "dirx"),
                hardlink("h", target),
                file("later", b"x", 0o644),
            ],
            &Select::All,
            |e| matches!(e, ArchiveError::UnsafeHardLink { reason, .. } if reason.contains(why)),
        );
    }
    // Outside the selected job.
    refused(
        &[file("other/f", b"x", 0o644), hardlink("web/h", "other/f")],
        &Select::Job("web".into()),
        |e| matches!(e, ArchiveError::UnsafeHardLink { .. }),
    );
}

#[test]
fn special_files_are_refused() {
    for (kind, word) in [
        (EntryType::Char, "character device"),
        (EntryType::Block, "block device"),
        (EntryType::Fifo, "fifo"),
        (EntryType::new(b'Z'), "type"),
    ] {
        refused(
            &[member("pwned", kind, "", b"", 0o644)],
            &Select::All,
            |e| matches!(e, ArchiveError::SpecialFile { kind, .. } if kind.contains(word)),
        );
    }
}

#[test]
fn a_file_over_a_directory_is_refused() {
    refused(
        &[dir("d/", 0o755), file("d", b"x", 0o644)],
        &Select::All,
        |e| matches!(e, ArchiveError::Conflict { .. }),
    );
    refused(
        &[file("f", b"x", 0o644), file("f/g", b"x", 0o644)],
        &Select::All,
        |e| matches!(e, ArchiveError::Conflict { .. }),
    );
    refused(&[file("./", b"x", 0o644)], &Select::All, |e| {
        matches!(e, ArchiveError::Conflict { .. })
    });
}

#[test]
fn later_duplicate_wins() {
    let sb = Sandbox::new();
    let bytes = tar_of(&[file("f", b"one", 0o644), file("f", b"two", 0o600)]);
    unpack(&bytes[..], &sb.dest(), &Select::All).unwrap();
    assert_eq!(fs::read(sb.dest().join("f")).unwrap(), b"two");
    assert_eq!(
        fs::metadata(sb.dest().join("f")).unwrap().mode() & 0o7777,
        0o600
    );
}

#[test]
fn job_selection_strips_the_prefix_with_or_without_dot() {
    for prefix in ["./", ""] {
        let mut members = Vec::new();
        if !prefix.is_empty() {
            members.push(dir(prefix, 0o755));
        }
        members.extend([
            dir(&format!("{prefix}web/"), 0o750),
            file(&format!("{prefix}web/monit"), b"check", 0o644),
            dir(&format!("{prefix}web/bin/"), 0o755),
            file(&format!("{prefix}web/bin/ctl"), b"ctl", 0o755),
            symlink(&format!("{prefix}web/bin/alias"), "ctl"),
            hardlink(&format!("{prefix}web/hard"), &format!("{prefix}web/monit")),
            dir(&format!("{prefix}webx/"), 0o755),
            file(&format!("{prefix}webx/monit"), b"other", 0o644),
            file(&format!("{prefix}db/monit"), b"db", 0o644),
        ]);
        let bytes = tar_of(&members);
        let sb = Sandbox::new();
        let stats = unpack(&bytes[..], &sb.dest(), &Select::Job("web".into())).unwrap();
        assert_eq!(
            sb.listing(),
            vec![
                "dest dir 750",
                "dest/bin dir 755",
                "dest/bin/alias -> ctl",
                "dest/bin/ctl file 755 3",
                "dest/hard file 644 5",
                "dest/monit file 644 5",
            ],
            "prefix {prefix:?}"
        );
        assert_eq!(stats.entries, 5);
        assert_eq!(stats.skipped, if prefix.is_empty() { 3 } else { 4 });
    }
}

#[test]
fn invalid_job_names_are_refused() {
    for name in ["", "a/b", "..", ".", "/abs", "a/"] {
        let sb = Sandbox::new();
        let e = unpack(&tar_of(&[])[..], &sb.dest(), &Select::Job(name.into())).unwrap_err();
        assert!(
            matches!(e, ArchiveError::InvalidJobName { .. }),
            "{name}: {e:?}"
        );
    }
}

#[test]
fn target_must_be_an_empty_directory() {
    let sb = Sandbox::new();
    fs::write(sb.dest().join("x"), b"").unwrap();
    let e = unpack(&tar_of(&[])[..], &sb.dest(), &Select::All).unwrap_err();
    assert!(matches!(e, ArchiveError::TargetNotEmpty { .. }));
    let e = unpack(&tar_of(&[])[..], &sb.root().join("missing"), &Select::All).unwrap_err();
    assert!(matches!(e, ArchiveError::TargetNotEmpty { .. }));
}

#[test]
fn garbage_and_truncation_are_read_errors() {
    let sb = Sandbox::new();
    let e = unpack(
        &b"this is not a tar archive at all, not even close......"[..],
        &sb.dest(),
        &Select::All,
    );
    assert!(matches!(e, Err(ArchiveError::Read(_))), "{e:?}");
    let sb = Sandbox::new();
    let mut truncated = legit();
    truncated.truncate(512 * 3 + 100);
    let e = unpack(&gzip(&truncated)[..], &sb.dest(), &Select::All);
    assert!(e.is_err(), "{e:?}");
    let sb = Sandbox::new();
    let mut gz = gzip(&legit());
    gz.truncate(gz.len() / 2);
    let e = unpack(&gz[..], &sb.dest(), &Select::All);
    assert!(matches!(e, Err(ArchiveError::Read(_))), "{e:?}");
}

#[test]
fn pack_dir_round_trips_and_hashes_what_it_wrote() {
    let src = Sandbox::new();
    unpack(&legit()[..], &src.dest(), &Select::All).unwrap();
    for gz in [true, false] {
        let tmp = TempDir::new("blobstore-test").unwrap();
        let out = tmp.path().join("out.tgz");
        let d = pack_dir(&src.dest(), &out, gz).unwrap();
        assert_eq!(d.algorithm, Algorithm::Sha1);
        assert_eq!(d, Digest::of(Algorithm::Sha1, &fs::read(&out).unwrap()));
        assert_eq!(fs::read(&out).unwrap().starts_with(&GZIP_MAGIC), gz);
        let back = Sandbox::new();
        unpack(File::open(&out).unwrap(), &back.dest(), &Select::All).unwrap();
        // The root's own entry is not packed: the copy's root keeps its mode.
        assert_eq!(back.listing(), legit_listing());
        // Refuses to overwrite.
        assert!(matches!(
            pack_dir(&src.dest(), &out, gz),
            Err(ArchiveError::Write { .. })
        ));
    }
}

#[test]
fn pack_dir_of_a_missing_dir_leaves_no_file() {
    let tmp = TempDir::new("blobstore-test").unwrap();
    let out = tmp.path().join("out.tgz");
    assert!(pack_dir(&tmp.path().join("missing"), &out, true).is_err());
    assert!(!out.exists());
}
