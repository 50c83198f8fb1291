#![allow(clippy::unwrap_used)]
use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../tests/fixtures/", $name))
    };
}

#[test]
fn layouts_are_classified_from_mountinfo() {
    let cases = [
        (fixture!("mountinfo-unified.txt"), Layout::Unified),
        (fixture!("mountinfo-hybrid.txt"), Layout::Hybrid),
        (fixture!("mountinfo-v1.txt"), Layout::V1Only),
        (fixture!("mountinfo-none.txt"), Layout::None),
        (fixture!("mountinfo-nested.txt"), Layout::Hybrid),
        (fixture!("mountinfo-container-subtree.txt"), Layout::Unified),
    ];
    for (text, want) in cases {
        assert_eq!(layout_from_mounts(&parse_mountinfo(text)), want, "{text}");
    }
}

#[test]
fn nft_prefix_follows_the_layout() {
    assert_eq!(Layout::Unified.nft_prefix(), Some(""));
    assert_eq!(Layout::Hybrid.nft_prefix(), Some("unified"));
    assert_eq!(Layout::V1Only.nft_prefix(), None);
    assert_eq!(Layout::None.nft_prefix(), None);
}

#[test]
fn cgroup2_mount_root_is_read_from_mountinfo() {
    let nested = parse_mountinfo(fixture!("mountinfo-nested.txt"));
    assert_eq!(
        cgroup2_mount(&nested, Layout::Hybrid).unwrap().root,
        "/../.."
    );
    let sub = parse_mountinfo(fixture!("mountinfo-container-subtree.txt"));
    assert_eq!(
        cgroup2_mount(&sub, Layout::Unified).unwrap().root,
        "/docker/4f1e"
    );
    let v1 = parse_mountinfo(fixture!("mountinfo-v1.txt"));
    assert!(cgroup2_mount(&v1, Layout::V1Only).is_none());
}

#[test]
fn mountinfo_escapes_are_decoded_and_odd_lines_skipped() {
    let m = parse_mountinfo("1 2 0:3 /a\\040b /mnt/x\\134y rw - ext4 /dev/x rw\ngarbage line\n");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].root, "/a b");
    assert_eq!(m[0].mount_point, PathBuf::from("/mnt/x\\y"));
    assert_eq!(m[0].fs_type, "ext4");
}

#[test]
fn v2_line_is_found_in_proc_cgroup() {
    assert_eq!(
        parse_proc_cgroup(fixture!("cgroup-hybrid.txt")).as_deref(),
        Some("/system.slice/bosh-agent.service")
    );
    assert_eq!(
        parse_proc_cgroup(fixture!("cgroup-unified.txt")).as_deref(),
        Some("/system.slice/runit.service")
    );
    assert_eq!(
        parse_proc_cgroup(fixture!("cgroup-nested.txt")).as_deref(),
        Some("/")
    );
    assert_eq!(parse_proc_cgroup(fixture!("cgroup-v1.txt")), None);
    // A path may contain ':'; only the first two separators count.
    assert_eq!(parse_proc_cgroup("0::/a:b").as_deref(), Some("/a:b"));
    assert_eq!(parse_proc_cgroup(""), None);
}

#[test]
fn depth_counts_components() {
    assert_eq!(depth("/"), 0);
    assert_eq!(depth(""), 0);
    assert_eq!(depth("/system.slice/bosh-agent.service"), 2);
    assert_eq!(depth("a/b/c/"), 3);
}

#[test]
fn candidate_dirs_cover_plain_subtree_and_nested_mounts() {
    assert_eq!(
        candidate_dirs("/", "/system.slice/x.service"),
        vec!["system.slice/x.service"]
    );
    assert_eq!(
        candidate_dirs("/docker/4f1e", "/docker/4f1e/job"),
        vec!["job", "docker/4f1e/job"]
    );
    assert_eq!(candidate_dirs("/../..", "/"), vec![""]);
    assert_eq!(candidate_dirs("/../..", "/inner"), vec!["inner"]);
}

#[test]
fn placement_levels_cover_both_kernel_semantics_only_when_namespaced() {
    let mut p = CgroupPlacement {
        layout: Layout::Hybrid,
        namespaced: false,
        visible: "/a/b".into(),
        nft_path: NftCgroupPath::new("unified/a/b").unwrap(),
        inode: 7,
        visible_level: 2,
        mount_level: 2,
    };
    assert_eq!(p.candidate_levels(), vec![2]);
    p.namespaced = true;
    p.visible_level = 0;
    assert_eq!(p.candidate_levels(), vec![0, 2]);
}

#[test]
fn safe_paths_are_accepted_and_normalised() {
    for ok in [
        "unified/system.slice/runc-bpm-web.scope",
        "a/b@c:d+e=f,g",
        "/x/y/",
        "",
    ] {
        NftCgroupPath::new(ok).unwrap();
    }
    assert_eq!(NftCgroupPath::new("/x/y/").unwrap().as_str(), "x/y");
    assert_eq!(
        NftCgroupPath::new("unified/a").unwrap().fs_path(),
        PathBuf::from("/sys/fs/cgroup/unified/a")
    );
}

#[test]
fn injection_attempts_in_paths_are_rejected() {
    for bad in [
        "a\"; flush ruleset; \"",
        "a\nadd rule inet x y drop",
        "a;b",
        "a{b}",
        "a b",
        "a/../b",
        "a//b",
        "a/./b",
        "a\\b",
        "a#b",
        "a$b",
        "a'b",
        "a\tb",
        "a\u{0}b",
        "ä",
    ] {
        let err = NftCgroupPath::new(bad).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot be used in a firewall rule"),
            "{bad:?}: {err}"
        );
    }
    assert!(NftCgroupPath::new(&"a".repeat(4001)).is_err());
}

#[test]
fn stat_ppid_survives_parentheses_in_the_command() {
    assert_eq!(parse_stat_ppid("42 (a) b) c) S 17 42 42 0"), Some(17));
    assert_eq!(parse_stat_ppid("1 (init) S 0 1 1"), Some(0));
    assert_eq!(parse_stat_ppid("garbage"), None);
}

#[test]
fn this_process_is_found_in_its_own_cgroup() {
    // Reads the real /proc of the test process: proves the resolution end to end on whatever
    // layout this machine has (the README requires cgroup2, unified or hybrid).
    let p = placement_of(std::process::id()).unwrap();
    assert!(holds_pid(&p.nft_path.fs_path(), std::process::id()).unwrap());
    assert_eq!(inode_of(&p.nft_path.fs_path()).unwrap(), p.inode);
    assert_eq!(p.layout, detect_layout());
}
